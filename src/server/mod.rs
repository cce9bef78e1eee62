//! The content server's push hub (DESIGN §5, §6).
//!
//! Terminals connect with mutual TLS; the connection's certificate key is the terminal's ID. A
//! terminal first says `Hello` with its cursor; the server answers where its push log resumes
//! and opens the push stream. On the connection a terminal sets its session (`SetSession`), asks
//! to follow another terminal (`Follow`, patent S120/S210) and revokes followers (`Revoke`).
//! Content backends publish through the HTTP API ([`http`]).
//!
//! Every push is appended to the recipient's log in the [`store`] before it is sent (S220): the
//! log is the truth, and each connection sends it in order from the terminal's cursor, taking
//! new items from a fast-path queue and re-reading the log whenever it fell behind. Terminals
//! acknowledge offsets on the push stream; acknowledged items leave the log.
//!
//! One task serves a connection: it accepts request streams (each request then runs in a task
//! of its own until answered), writes the push stream and reads its acknowledgements. An idle
//! connection holds that task, its [`Outbox`] and quinn's connection state, nothing else.
//!
//! Shutdown: cancel (stop accepting), close every connection with [`ErrorCode::Shutdown`], wait
//! for the tasks, then the store thread finishes its queue.
//!
//! Where things are: this file starts and stops the server; `conn` serves a terminal's
//! connection (handshake, `Hello`, request dispatch); `follow` checks tickets and records follows
//! and revocations; `publish` stores pushes and session changes and hands them to connections;
//! `push_stream` writes a connection's push stream and reads its acknowledgements; `background`
//! runs the sweep, the epoch watch and the cross-node tasks.

pub mod cluster;
mod http;
pub mod store;
pub mod strangers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{PushConfig, ServerConfig, ServerLimits};
use crate::identity::{Identity, TerminalId};
use crate::limits::{source_key, KeyedLimiter, LogLimiter, PendingHandshakes, SourceCounter};
use crate::metrics::Metrics;
use crate::net::{read_frame, refuse_stream, unix_now, varint, write_frame, READ_TIMEOUT};
use crate::tls::{self, peer_id, TransportLimits};
use crate::wire::ticket::Expectation;
use crate::wire::{
    self, Cursor, ErrorCode, InfoRequest, PushAck, Refusal, RefusalReason, Request, RequestBody,
    Response, ResponseBody, ServerPush, ServerPushRef, Session, StreamCursor,
};
use store::{NewPush, Op, Outcome, Store, StoreError, StoredPush};

/// `warn!`/`info!` for a line that remote input can trigger (DESIGN §7: logs are no flood
/// vector): at most one per `key` and interval ([`LogLimiter`]), each with the count of lines
/// held back since the last (`suppressed`).
macro_rules! limited {
    ($server:expr, $key:literal, $level:ident!($($arg:tt)+)) => {
        if let Some(suppressed) = $server.shared.log_limit.check($key) {
            $level!(suppressed, $($arg)+);
        }
    };
}

mod background;
mod conn;
mod follow;
mod publish;
mod push_stream;

use background::*;
use conn::*;
pub use publish::{Publication, PublishError};
use push_stream::*;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the QUIC endpoint on {addr} ([quic] listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

impl ServerError {
    /// The exit status for this error: 78 (bad configuration) for a token file that needs
    /// fixing by hand, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Http(http::HttpError::Token(_)) => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

struct Shared {
    identity: Identity,
    endpoint: quinn::Endpoint,
    store: Store,
    conns: Mutex<HashMap<TerminalId, ConnSlot>>,
    limits: ServerLimits,
    push: PushConfig,
    cancel: CancellationToken,
    tasks: TaskTracker,
    next_conn_id: AtomicU64,
    /// Shared with the TLS ticketer, which counts resumptions.
    metrics: Arc<Metrics>,
    per_source: SourceCounter,
    handshakes: KeyedLimiter<std::net::IpAddr>,
    requests: KeyedLimiter<TerminalId>,
    source_requests: KeyedLimiter<IpAddr>,
    /// Bytes session changes may have stored, per source network.
    session_bytes: KeyedLimiter<std::net::IpAddr>,
    log_limit: LogLimiter,
    /// Terminals per source network, for `[limits] known_terminals_per_source`.
    strangers: strangers::KnownPerSource,
    http_addr: Mutex<Option<SocketAddr>>,
    /// The other nodes sharing this store (Redis), if any.
    cluster: Option<Arc<cluster::Cluster>>,
}

/// A running server. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Opens the store, binds the QUIC endpoint (and the HTTP listener, if configured) and starts
    /// accepting terminals. Returns once all are ready.
    pub async fn start(identity: Identity, config: &ServerConfig) -> Result<Self, ServerError> {
        let store = Store::open(&config.store, &config.state_dir)?;
        let cluster = match &config.store {
            crate::config::StoreKind::Redis { url } => {
                Some(cluster::Cluster::connect(url.expose_secret())?)
            }
            _ => None,
        };
        let metrics = Arc::new(Metrics::new());
        let tickets = Arc::new(tls::Tickets::new(&identity, metrics.clone()));
        let server_config = tls::server_config_with_tickets(
            &identity,
            terminal_transport(&config.limits),
            tickets,
        )?;
        // A restarted server resets the connections it lost, so their terminals come back at
        // once (see `tls::endpoint_config`).
        let endpoint_config = tls::endpoint_config(&identity);
        let endpoint = crate::net::bind_endpoint_with(
            endpoint_config,
            server_config,
            config.listen,
            Some(crate::net::SERVER_UDP_BUFFER),
        )
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let server = Server {
            shared: Arc::new(Shared {
                identity,
                endpoint,
                store,
                conns: Mutex::new(HashMap::new()),
                limits: config.limits,
                push: config.push,
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
                next_conn_id: AtomicU64::new(1),
                metrics,
                per_source: SourceCounter::new(config.limits.max_connections_per_source),
                handshakes: KeyedLimiter::new(config.limits.handshakes_per_sec_per_source, 65_536),
                requests: KeyedLimiter::new(config.limits.requests_per_sec_per_terminal, 65_536),
                source_requests: KeyedLimiter::new(
                    config.limits.requests_per_sec_per_source,
                    65_536,
                ),
                session_bytes: KeyedLimiter::new(
                    config.limits.session_bytes_per_sec_per_source,
                    65_536,
                ),
                log_limit: LogLimiter::new(Duration::from_secs(10)),
                strangers: strangers::KnownPerSource::new(
                    config.limits.known_terminals_per_source,
                    config.limits.idle_terminal,
                ),
                http_addr: Mutex::new(None),
                cluster,
            }),
        };
        if let Some(http) = &config.http {
            let addr = http::serve(server.clone(), http).await?;
            *server
                .shared
                .http_addr
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(addr);
        }
        info!(
            id = %server.id(),
            quic = %server.local_addr(),
            epoch = server.shared.store.epoch(),
            store = ?config.store,
            "server listening"
        );
        server
            .shared
            .tasks
            .spawn(accept(server.clone()).instrument(tracing::info_span!("accept")));
        server.shared.tasks.spawn(sweep(server.clone()));
        if let Some(cluster) = server.shared.cluster.clone() {
            server.shared.tasks.spawn(watch_epoch(server.clone()));
            let (tx, rx) = mpsc::channel(1024);
            let cancel = server.shared.cancel.clone();
            let subscriber = cluster.clone();
            std::thread::Builder::new()
                .name("handoff-cluster".into())
                .spawn(move || subscriber.subscribe(tx, cancel))
                .map_err(|e| {
                    StoreError::Backend(format!("cannot start the cluster thread: {e}"))
                })?;
            server.shared.tasks.spawn(apply_wakes(server.clone(), rx));
            server
                .shared
                .tasks
                .spawn(refresh_registrations(server.clone()));
            info!(
                node = cluster.node(),
                "cluster node: sharing the store with other nodes"
            );
        }
        Ok(server)
    }

    pub fn id(&self) -> TerminalId {
        self.shared.identity.id()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound HTTP address, if the HTTP API is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self
            .shared
            .http_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The push logs' epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.store.epoch()
    }

    /// Terminals connected now.
    pub fn connected(&self) -> usize {
        self.conns().len()
    }

    /// Bytes held in the connections' fast paths now: pushes and stream items on their way to
    /// terminals, queued or being sent (not counting what the transport holds).
    pub fn queued_push_bytes(&self) -> usize {
        self.conns()
            .values()
            .map(|slot| slot.outbox.queued.load(Ordering::Acquire))
            .sum()
    }

    /// The server's counters (for `/metrics` and tests).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, ConnSlot>> {
        // The map is never left half-updated; a poisoned lock is still consistent.
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a hit on `limit` and logs it at most once per interval.
    fn over_limit(&self, limit: &'static str, detail: std::fmt::Arguments<'_>) {
        self.shared
            .metrics
            .inc("handoff_limit_hits_total", Some(("limit", limit)));
        if let Some(suppressed) = self.shared.log_limit.check(limit) {
            warn!(limit, suppressed, "over limit: {detail}");
        }
    }

    /// Stops accepting, closes every connection, and waits for the tasks.
    pub async fn shutdown(&self) {
        info!("server shutting down");
        self.shared.cancel.cancel();
        self.shared
            .endpoint
            .close(varint(ErrorCode::Shutdown), b"shutting down");
        self.shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(3), self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("some connections did not finish within 3 s");
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
        // Commit what is queued, then release the store (its file lock too).
        self.shared.store.close().await;
        info!("server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A returning terminal costs no store write (no fsync) at connect; a new one, or one
    /// away for half the idle period, is marked seen.
    #[tokio::test]
    async fn only_new_or_long_gone_terminals_are_written_at_connect() {
        let store = Store::start(Box::new(store::MemoryBackend::new()));
        let id = TerminalId::from_bytes([7; 32]);
        let idle = Duration::from_secs(1000);
        let now = 1_000_000;
        let seen = || store.read(move |b| b.seen(&id));
        assert!(register(&store, idle, id, None, now).await.unwrap(), "new");
        assert!(store.read(move |b| b.known(&id)).await.unwrap());
        let at = seen().await.unwrap();
        assert!(!register(&store, idle, id, at, now + 1).await.unwrap());
        assert!(!register(&store, idle, id, at, now + 499).await.unwrap());
        assert!(
            register(&store, idle, id, at, now + 500).await.unwrap(),
            "away"
        );
        let seen = store.read(move |b| b.seen(&id)).await.unwrap();
        assert_eq!(seen, Some(now + 500));
        store.close().await;
    }
}
