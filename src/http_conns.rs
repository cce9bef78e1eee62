//! The HTTP connections a listener holds (the server's API, the daemon's metrics): at most a
//! cap, and at the cap a new connection takes the place of the one that has waited longest for
//! a request, so half-sent requests cannot lock out a real one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;

/// The HTTP connections held, each with the instant it started waiting for a request (`None`
/// while it is being answered).
#[derive(Default)]
pub(crate) struct Connections {
    next: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
}

struct Held {
    waiting_since: Option<Instant>,
    evict: CancellationToken,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more under `cap`: evicts the connection that has waited longest for
    /// a request. `false` if every held connection is being answered.
    pub(crate) fn make_room(&self, cap: usize) -> Result<bool, ()> {
        let held = self.lock();
        // Evicted connections stay listed until their task ends; they no longer count.
        if held.len() < cap || held.values().filter(|h| !h.evict.is_cancelled()).count() < cap {
            return Ok(false);
        }
        let oldest = held
            .values()
            .filter(|h| !h.evict.is_cancelled())
            .filter_map(|h| h.waiting_since.map(|since| (since, &h.evict)))
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, evict)) => {
                evict.cancel();
                Ok(true)
            }
            None => Err(()),
        }
    }

    pub(crate) fn insert(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.lock().insert(
            id,
            Held {
                waiting_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        (id, evict)
    }

    pub(crate) fn set_waiting(&self, id: u64, waiting: bool) {
        if let Some(held) = self.lock().get_mut(&id) {
            held.waiting_since = waiting.then(Instant::now);
        }
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// What a connection gets when the cap is reached and every held connection is busy.
pub(crate) const TOO_MANY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 43\r\nconnection: close\r\n\r\n{\"error\":\"too many connections; try again\"}";

/// HTTP/1 on `io` with `app`, for connection `id` of `conns`: marked waiting between requests
/// (so it can be evicted for a new one), headers within `header_timeout` and at most
/// `max_header_bytes` (at least the library's 8 KiB).
pub(crate) fn serve_tracked<I>(
    io: I,
    app: axum::Router,
    conns: &Arc<Connections>,
    id: u64,
    header_timeout: Duration,
    max_header_bytes: usize,
) -> hyper::server::conn::http1::Connection<
    TokioIo<I>,
    impl hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body, Future: Send>
        + Send,
>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let inner = TowerToHyperService::new(app);
    let tracked = conns.clone();
    let service = hyper::service::service_fn(move |request| {
        tracked.set_waiting(id, false);
        let answer = hyper::service::Service::call(&inner, request);
        let tracked = tracked.clone();
        async move {
            let response = answer.await;
            tracked.set_waiting(id, true);
            response
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_header_bytes)
        .serve_connection(TokioIo::new(io), service)
}
