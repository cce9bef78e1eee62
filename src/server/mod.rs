//! The content server's push hub (DESIGN §5, §6).
//!
//! Terminals connect with mutual TLS; the connection's certificate key is the terminal's ID. On a
//! connection a terminal sets its session (`SetSession`) and asks to follow another terminal
//! (`Follow`, patent S120/S210). The server checks the ticket, records the link, and pushes the
//! first terminal's session to the follower on a stream it opens on the follower's connection
//! (S220), then every later change while the link lives.
//!
//! Shutdown: cancel (stop accepting), close every connection with [`ErrorCode::Shutdown`], wait
//! for the tasks.

mod registry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{ServerConfig, ServerLimits};
use crate::identity::{Identity, TerminalId};
use crate::limits::{KeyedLimiter, LogLimiter, SourceCounter};
use crate::metrics::Metrics;
use crate::net::{read_frame, refuse_stream, unix_now, varint, write_frame, READ_TIMEOUT};
use crate::tls::{self, peer_id, TransportLimits};
use crate::wire::ticket::Expectation;
use crate::wire::{
    ErrorCode, InfoRequest, PushItem, Refusal, RefusalReason, Request, RequestBody, Response,
    ResponseBody, ServerPush,
};
use registry::{ConnSlot, Delivery, Registry};

/// Pushes queued per connection; a terminal that falls this far behind is disconnected.
const PUSH_QUEUE: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a ticket may be valid; bounds how long its nonce is remembered.
const MAX_TICKET_LIFETIME: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the QUIC endpoint on {addr} ([quic] listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    identity: Identity,
    endpoint: quinn::Endpoint,
    registry: Mutex<Registry>,
    limits: ServerLimits,
    cancel: CancellationToken,
    tasks: TaskTracker,
    next_conn_id: AtomicU64,
    metrics: Metrics,
    per_source: SourceCounter,
    handshakes: KeyedLimiter<std::net::IpAddr>,
    requests: KeyedLimiter<TerminalId>,
    log_limit: LogLimiter,
}

/// A running server. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the QUIC endpoint and starts accepting terminals.
    pub fn start(identity: Identity, config: &ServerConfig) -> Result<Self, ServerError> {
        let transport = TransportLimits {
            max_bidi_streams: config.limits.max_streams_per_connection,
            max_uni_streams: 0,
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
        };
        let server_config = tls::server_config(&identity, transport)?;
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            ServerError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let server = Server {
            shared: Arc::new(Shared {
                identity,
                endpoint,
                registry: Mutex::new(Registry::new(config.limits.replay_cache)),
                limits: config.limits,
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
                next_conn_id: AtomicU64::new(1),
                metrics: Metrics::new(),
                per_source: SourceCounter::new(config.limits.max_connections_per_source),
                handshakes: KeyedLimiter::new(config.limits.handshakes_per_sec_per_source, 65_536),
                requests: KeyedLimiter::new(config.limits.requests_per_sec_per_terminal, 65_536),
                log_limit: LogLimiter::new(Duration::from_secs(10)),
            }),
        };
        info!(id = %server.id(), quic = %server.local_addr(), "server listening");
        server
            .shared
            .tasks
            .spawn(accept(server.clone()).instrument(tracing::info_span!("accept")));
        server.shared.tasks.spawn(expire_links(server.clone()));
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

    /// Terminals connected now.
    pub fn connected(&self) -> usize {
        self.registry().connected()
    }

    /// The server's counters (for `/metrics` and tests).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
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

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registry operations never leave it half-updated; a poisoned lock is still consistent.
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        info!("server stopped");
    }

    fn send(&self, delivery: Delivery) {
        let Delivery { to, slot, item } = delivery;
        if let Err(e) = slot.tx.try_send(item) {
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.over_limit(
                        "push_queue",
                        format_args!("push queue of {} full; disconnecting it", to.short()),
                    );
                    slot.conn.close(varint(ErrorCode::Busy), b"push queue full");
                }
                mpsc::error::TrySendError::Closed(_) => {
                    debug!(terminal = %to.short(), "connection gone")
                }
            }
        }
    }
}

async fn accept(server: Server) {
    let slots = Arc::new(Semaphore::new(server.shared.limits.max_connections));
    loop {
        let incoming = tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            incoming = server.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        let ip = incoming.remote_address().ip();
        if !server.shared.handshakes.allow(&ip) {
            server.over_limit(
                "handshakes_per_sec_per_source",
                format_args!("handshakes from {ip}"),
            );
            incoming.refuse();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            server.over_limit("max_connections", format_args!("refusing {ip}"));
            incoming.refuse();
            continue;
        };
        let Some(source) = server.shared.per_source.acquire(ip) else {
            server.over_limit("max_connections_per_source", format_args!("refusing {ip}"));
            incoming.refuse();
            continue;
        };
        let s = server.clone();
        server.shared.tasks.spawn(async move {
            let _permit = (permit, source);
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    s.shared
                        .metrics
                        .inc("handoff_handshakes_failed_total", Some(("reason", "tls")));
                    return debug!("handshake failed: {e}");
                }
                Err(_) => {
                    s.shared.metrics.inc(
                        "handoff_handshakes_failed_total",
                        Some(("reason", "timeout")),
                    );
                    return debug!("handshake timed out");
                }
            };
            let Some(id) = peer_id(&conn) else {
                conn.close(varint(ErrorCode::Unexpected), b"no usable certificate");
                return;
            };
            let span = tracing::info_span!("terminal", id = %id.short());
            serve_terminal(s, conn, id).instrument(span).await;
        });
    }
}

async fn serve_terminal(server: Server, conn: quinn::Connection, id: TerminalId) {
    let conn_id = server.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(PUSH_QUEUE);
    let replaced = server.registry().attach(
        id,
        ConnSlot {
            conn_id,
            tx,
            conn: conn.clone(),
        },
    );
    if let Some(old) = replaced {
        old.conn.close(
            varint(ErrorCode::Replaced),
            b"replaced by a newer connection",
        );
    }
    debug!(remote = %conn.remote_address(), "terminal connected");
    server
        .shared
        .tasks
        .spawn(write_pushes(conn.clone(), rx).in_current_span());
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = server.shared.cancel.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(s) => s,
                Err(e) => {
                    debug!("terminal disconnected: {e}");
                    break;
                }
            },
        };
        // The transport caps concurrent streams per connection (`limits.max_streams_per_connection`).
        let s = server.clone();
        tokio::spawn(
            async move {
                let request: Request =
                    match read_frame(&mut recv, READ_TIMEOUT, s.shared.limits.max_frame).await {
                        Ok(Some(r)) => r,
                        Ok(None) => return,
                        Err(e) => {
                            s.shared
                                .metrics
                                .inc("handoff_bad_frames_total", Some(("code", e.code().name())));
                            if let Some(suppressed) = s.shared.log_limit.check("bad_frame") {
                                warn!(suppressed, "bad request: {e}");
                            }
                            refuse_stream(&mut send, &mut recv, e.code());
                            return;
                        }
                    };
                let body = if s.shared.requests.allow(&id) {
                    s.handle(id, request.body)
                } else {
                    s.over_limit(
                        "requests_per_sec_per_terminal",
                        format_args!("from {}", id.short()),
                    );
                    ResponseBody::Refused(Refusal {
                        reason: RefusalReason::Busy,
                        message: "too many requests; slow down".into(),
                    })
                };
                if write_frame(
                    &mut send,
                    &Response {
                        id: request.id,
                        body,
                    },
                )
                .await
                .is_ok()
                {
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            }
            .in_current_span(),
        );
    }
    server.registry().detach(id, conn_id);
}

impl Server {
    fn handle(&self, id: TerminalId, body: RequestBody) -> ResponseBody {
        match body {
            RequestBody::SetSession(session) => {
                debug!(title = ?session.as_ref().map(|s| &s.title), "session set");
                let deliveries = self.registry().set_session(id, session, unix_now());
                for d in deliveries {
                    self.send(d);
                }
                ResponseBody::SessionStored
            }
            RequestBody::Follow(request) => self.follow(id, request),
            RequestBody::Revoke { second } => {
                let removed = self.registry().unlink(id, second);
                info!(second = %second.short(), removed, "link revoked by its first terminal");
                ResponseBody::Revoked { removed }
            }
            RequestBody::InterfaceInfo | RequestBody::Pair(_) => ResponseBody::Refused(Refusal {
                reason: RefusalReason::WrongEndpoint,
                message: "a server does not serve terminal-to-terminal requests".into(),
            }),
        }
    }

    /// Patent S210: check the request and ticket, record the link, push the current session.
    fn follow(&self, second: TerminalId, request: InfoRequest) -> ResponseBody {
        let refuse = |message: String| {
            warn!(second = %second, first = %request.first, "refused follow: {message}");
            ResponseBody::Refused(Refusal {
                reason: RefusalReason::BadTicket,
                message,
            })
        };
        if request.second != second {
            return refuse(
                "the request names another second terminal than the connection's identity".into(),
            );
        }
        let now = unix_now();
        let expect = Expectation {
            first: request.first,
            second,
            server: self.id(),
            now,
            max_lifetime: MAX_TICKET_LIFETIME,
        };
        if let Err(e) = request.ticket.check(&expect) {
            return refuse(e.to_string());
        }
        let mut registry = self.registry();
        if let Err(e) = registry.use_nonce(&request.ticket.ticket, now) {
            drop(registry);
            return refuse(e.to_string());
        }
        // The link lasts as long as the ticket, capped by the server's maximum lease.
        let until = request
            .ticket
            .ticket
            .not_after
            .min(now + self.shared.limits.max_lease.as_secs());
        let (has_session, delivery) = registry.follow(second, request.first, until);
        drop(registry);
        info!(first = %request.first.short(), until, "linked");
        if let Some(d) = delivery {
            self.send(d);
        }
        ResponseBody::Linked { until, has_session }
    }
}

/// Writes queued pushes, in order, on one stream opened on the terminal's connection.
async fn write_pushes(conn: quinn::Connection, mut rx: mpsc::Receiver<PushItem>) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(item) = rx.recv().await {
        let send = match stream.as_mut() {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => stream.insert(s),
                Err(e) => return debug!("cannot open push stream: {e}"),
            },
        };
        if let Err(e) = write_frame(send, &ServerPush::Item(item)).await {
            return debug!("push stream failed: {e}");
        }
    }
}

/// Drops expired links once a minute.
async fn expire_links(server: Server) {
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => server.registry().expire(unix_now()),
        }
    }
}
