//! The daemon's optional Prometheus listener (`[metrics] listen`): `GET /metrics` only, no token,
//! so it belongs on loopback or a management network. Bounded like the server's API: at most
//! [`MAX_CONNECTIONS`] held (the longest-waiting dropped for a new one), headers within
//! [`HEADER_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{lock, Daemon, DaemonError};
use crate::http_conns::{serve_tracked, Connections, TOO_MANY};

/// Connections held at once.
const MAX_CONNECTIONS: usize = 64;
/// Longest wait for a request's headers (also on an idle keep-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of request line and headers (the HTTP library's least).
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Binds the listener and serves it until shutdown. Returns the bound address.
pub(crate) async fn start(
    daemon: &Daemon,
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, DaemonError> {
    let bind_error = |source| DaemonError::MetricsBind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(daemon.clone());
    daemon.spawn(
        accept(daemon.clone(), listener, app),
        tracing::info_span!("metrics"),
    );
    info!(addr = %bound, "metrics listening");
    Ok(bound)
}

/// Accepts connections until shutdown: at most [`MAX_CONNECTIONS`], the one that has waited
/// longest for a request dropped for a new one; each has [`HEADER_TIMEOUT`] to send a request.
async fn accept(daemon: Daemon, listener: tokio::net::TcpListener, app: Router) {
    let conns = Arc::new(Connections::default());
    let cancel = daemon.shared.cancel.clone();
    loop {
        let tcp = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little rather than spin.
                    debug!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let limit = Some(("limit", "metrics_connections"));
        match conns.make_room(MAX_CONNECTIONS) {
            Ok(false) => {}
            Ok(true) => daemon.shared.metrics.inc("handoff_limit_hits_total", limit),
            Err(()) => {
                daemon.shared.metrics.inc("handoff_limit_hits_total", limit);
                let _ = tcp.try_write(TOO_MANY);
                continue;
            }
        }
        let (id, evict) = conns.insert();
        let (app, conns, cancel) = (app.clone(), conns.clone(), cancel.clone());
        daemon.spawn(
            async move {
                serve_connection(tcp, app, &conns, id, evict, cancel).await;
                conns.remove(id);
            },
            tracing::Span::current(),
        );
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    app: Router,
    conns: &Arc<Connections>,
    id: u64,
    evict: CancellationToken,
    cancel: CancellationToken,
) {
    let connection = serve_tracked(tcp, app, conns, id, HEADER_TIMEOUT, MAX_HEADER_BYTES);
    tokio::select! {
        served = connection => if let Err(e) = served {
            debug!("metrics connection: {e}");
        },
        _ = evict.cancelled() => {}
        _ = cancel.cancelled() => {}
    }
}

async fn metrics(State(daemon): State<Daemon>) -> impl IntoResponse {
    let sh = &daemon.shared;
    let connected = sh.home.as_ref().is_some_and(|h| h.is_connected());
    let text = sh.metrics.render(&[
        (
            "handoff_peers",
            "peers in the peer table",
            lock(&sh.peers).len() as f64,
        ),
        (
            "handoff_trusted_peers",
            "IDs on the trust list",
            sh.trust.list().len() as f64,
        ),
        (
            "handoff_follows",
            "peers followed now",
            daemon.follows().len() as f64,
        ),
        (
            "handoff_inbox_items",
            "pushes kept in the inbox",
            sh.inbox.len() as f64,
        ),
        (
            "handoff_server_connected",
            "1 while connected to the home server",
            f64::from(u8::from(connected)),
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
