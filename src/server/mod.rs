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

pub mod cluster;
mod http;
pub mod store;
pub mod strangers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
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
    Response, ResponseBody, ServerPush, Session,
};
use store::{NewPush, Op, Outcome, Store, StoreError, StoredPush};

/// Items queued per connection on the fast path; past that the writer reads the log instead.
const FAST_PATH: usize = 1024;
/// Items read from the log at a time when catching up.
const PAGE: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often expired items, links and nonces are swept from the store.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a terminal may have in flight towards the server on one stream, and on all of them.
const TERMINAL_STREAM_WINDOW: u32 = 16 * 1024;
const TERMINAL_WINDOW: u32 = 32 * 1024;
/// What the server keeps in flight towards one terminal, unacknowledged.
const TERMINAL_SEND_WINDOW: u64 = 64 * 1024;

/// The transport of terminal connections. A terminal sends small requests and acknowledgements
/// and receives pushes, so small flow-control windows cost it nothing, and they bound what one
/// terminal can make the server buffer (quinn's defaults: 1.25 MB per stream, and no bound over
/// all streams). Windows bound only what is in flight: a frame larger than a window (up to
/// `[limits] max_frame`) goes through in pieces as the reader consumes it. No datagrams.
fn terminal_transport(limits: &ServerLimits) -> quinn::TransportConfig {
    let mut t = TransportLimits {
        max_bidi_streams: limits.max_streams_per_connection,
        max_uni_streams: 0,
        idle_timeout: Duration::from_secs(30),
        keep_alive: None,
    }
    .config();
    t.stream_receive_window(TERMINAL_STREAM_WINDOW.into())
        .receive_window(TERMINAL_WINDOW.into())
        .send_window(TERMINAL_SEND_WINDOW)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        // One datagram per send: quinn keeps each connection's send buffer at its largest
        // batch, and a terminal gets small pushes (about 1 KiB less per connection).
        .enable_segmentation_offload(false);
    t
}

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

/// Where a terminal's push stream starts (see [`Server::hello`]).
struct Hello {
    start: u64,
    window_lost: bool,
    /// The log's end when the terminal said hello.
    end: u64,
}

/// Where a connected terminal's pushes go.
struct ConnSlot {
    conn_id: u64,
    conn: quinn::Connection,
    outbox: Arc<Outbox>,
}

/// What the connection's task shares with those who push to its terminal, in one allocation.
struct Outbox {
    /// Fresh pushes with the instant they were accepted (for the delivery latency histogram),
    /// at most [`FAST_PATH`]; past that the task reads the log instead. The task takes the
    /// whole queue at once, so an idle connection holds no buffer here.
    fast: Mutex<VecDeque<(StoredPush, Instant)>>,
    /// One past the newest offset appended for this terminal.
    latest: AtomicU64,
    /// Wakes the connection's task: new pushes, or the terminal said hello.
    wake: Notify,
    /// Set by the first `Hello`.
    hello_said: std::sync::atomic::AtomicBool,
    /// Where the push stream starts; [`NOT_STARTED`] until the hello is answered.
    start: AtomicU64,
}

const NOT_STARTED: u64 = u64::MAX;

impl Outbox {
    fn new() -> Self {
        Self {
            fast: Mutex::new(VecDeque::new()),
            latest: AtomicU64::new(0),
            wake: Notify::new(),
            hello_said: std::sync::atomic::AtomicBool::new(false),
            start: AtomicU64::new(NOT_STARTED),
        }
    }

    fn take_fast(&self) -> VecDeque<(StoredPush, Instant)> {
        std::mem::take(&mut *self.fast.lock().unwrap_or_else(|e| e.into_inner()))
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

/// Why a publish was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("terminal {0} has never connected to this server")]
    UnknownTerminal(TerminalId),
    #[error("ttl_secs must be between 1 and {0}")]
    BadTtl(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a publisher sends (the HTTP body of DESIGN §8).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publication {
    pub uri: String,
    pub title: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub meta: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub collapse_key: Option<String>,
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
        let endpoint =
            crate::net::bind_endpoint_with(endpoint_config, server_config, config.listen).map_err(
                |source| ServerError::Bind {
                    addr: config.listen,
                    source,
                },
            )?;
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

    /// Hands freshly stored pushes to the connections of their recipients.
    fn announce(&self, pushes: Vec<(TerminalId, StoredPush)>, accepted: Instant) {
        let conns = self.conns();
        let mut elsewhere = Vec::new();
        for (to, push) in pushes {
            self.shared.metrics.inc("handoff_pushes_stored_total", None);
            let Some(slot) = conns.get(&to) else {
                if self.shared.cluster.is_some() {
                    elsewhere.push((to, push.item.offset + 1));
                }
                continue;
            };
            let outbox = &slot.outbox;
            outbox
                .latest
                .fetch_max(push.item.offset + 1, Ordering::AcqRel);
            // A full fast path is fine: woken, the task sees it is behind and reads the log.
            // Otherwise it takes the item from the queue and never needs the store.
            {
                let mut fast = outbox.fast.lock().unwrap_or_else(|e| e.into_inner());
                if fast.len() < FAST_PATH {
                    fast.push_back((push, accepted));
                }
            }
            outbox.wake.notify_one();
        }
        drop(conns);
        // Recipients held by other nodes: tell those nodes (a hint; see `cluster`).
        if let Some(cluster) = self
            .shared
            .cluster
            .clone()
            .filter(|_| !elsewhere.is_empty())
        {
            let server = self.clone();
            self.shared.tasks.spawn(async move {
                let woken = tokio::task::spawn_blocking(move || cluster.wake(&elsewhere)).await;
                if let Ok(Err(e)) = woken {
                    limited!(server, "cluster", warn!("cannot wake other nodes: {e}"));
                }
            });
        }
    }

    /// Appends pushes (each to its recipient's log, in one commit) and announces them.
    async fn store_pushes(
        &self,
        items: Vec<(TerminalId, NewPush)>,
        mut extra: Vec<Op>,
    ) -> Result<Vec<u64>, StoreError> {
        let now = unix_now();
        let accepted = Instant::now();
        let n_extra = extra.len();
        let stored: Vec<(TerminalId, NewPush)> = items.clone();
        extra.extend(
            items
                .into_iter()
                .map(|(to, push)| Op::Append { to, push, now }),
        );
        let outcomes = self.shared.store.write(extra).await?;
        self.shared
            .metrics
            .observe("handoff_push_store_seconds", accepted.elapsed());
        let offsets: Vec<u64> = outcomes[n_extra..]
            .iter()
            .map(|o| match o {
                Outcome::Offset(off) => *off,
                _ => 0,
            })
            .collect();
        self.announce(
            stored
                .into_iter()
                .zip(&offsets)
                .map(|((to, p), off)| (to, p.stored(*off, now)))
                .collect(),
            accepted,
        );
        Ok(offsets)
    }

    /// Publishes to one terminal (HTTP API). Resolves once the push is durably stored.
    pub async fn publish(&self, to: TerminalId, p: Publication) -> Result<u64, PublishError> {
        let push = self.new_push(p)?;
        // A terminal connected here was marked seen when it connected, and the sweep keeps it
        // so while it stays: only others cost a store read.
        let connected = self.conns().contains_key(&to);
        if !connected && !self.known(to).await? {
            return Err(PublishError::UnknownTerminal(to));
        }
        Ok(self.store_pushes(vec![(to, push)], Vec::new()).await?[0])
    }

    /// Publishes many pushes, each to one terminal, in one commit (HTTP batch API). Each gets
    /// its own answer: a push refused (unknown terminal, bad ttl, too large) fails alone and the
    /// others are stored. Resolves once the accepted ones are durably stored.
    pub async fn publish_many(
        &self,
        batch: Vec<(TerminalId, Publication)>,
    ) -> Result<Vec<Result<u64, PublishError>>, StoreError> {
        let mut answers: Vec<Result<u64, PublishError>> = Vec::with_capacity(batch.len());
        // Per position in the batch: the push to store, if it passed the checks so far.
        let mut pending: Vec<Option<(TerminalId, NewPush)>> = Vec::with_capacity(batch.len());
        let mut to_check = Vec::new();
        {
            let conns = self.conns();
            for (i, (to, p)) in batch.into_iter().enumerate() {
                match self.new_push(p) {
                    Ok(push) => {
                        if !conns.contains_key(&to) {
                            to_check.push((i, to));
                        }
                        pending.push(Some((to, push)));
                        answers.push(Ok(0));
                    }
                    Err(e) => {
                        pending.push(None);
                        answers.push(Err(e));
                    }
                }
            }
        }
        if !to_check.is_empty() {
            let unknown = self
                .shared
                .store
                .read(move |b| {
                    let mut unknown = Vec::new();
                    for (i, to) in to_check {
                        if !b.known(&to)? {
                            unknown.push((i, to));
                        }
                    }
                    Ok(unknown)
                })
                .await?;
            for (i, to) in unknown {
                pending[i] = None;
                answers[i] = Err(PublishError::UnknownTerminal(to));
            }
        }
        let (slots, items): (Vec<usize>, Vec<(TerminalId, NewPush)>) = pending
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| item.map(|item| (i, item)))
            .unzip();
        let now = unix_now();
        let accepted = Instant::now();
        let ops = items
            .iter()
            .map(|(to, push)| Op::Append {
                to: *to,
                push: push.clone(),
                now,
            })
            .collect();
        let outcomes = self.shared.store.write_each(ops).await;
        self.shared
            .metrics
            .observe("handoff_push_store_seconds", accepted.elapsed());
        let mut stored = Vec::with_capacity(items.len());
        for ((i, (to, push)), outcome) in slots.into_iter().zip(items).zip(outcomes) {
            answers[i] = match outcome {
                Ok(Outcome::Offset(offset)) => {
                    stored.push((to, push.stored(offset, now)));
                    Ok(offset)
                }
                Ok(other) => {
                    Err(StoreError::Backend(format!("unexpected outcome {other:?}")).into())
                }
                Err(e) => Err(e.into()),
            };
        }
        self.announce(stored, accepted);
        Ok(answers)
    }

    /// Publishes to every terminal following `first`; returns each follower's offset.
    pub async fn publish_to_followers(
        &self,
        first: TerminalId,
        p: Publication,
    ) -> Result<Vec<(TerminalId, u64)>, PublishError> {
        let push = self.new_push(p)?;
        let now = unix_now();
        let (known, followers) = self
            .shared
            .store
            .read(move |b| Ok((b.known(&first)?, b.followers(&first, now)?)))
            .await?;
        if !known {
            return Err(PublishError::UnknownTerminal(first));
        }
        let items: Vec<(TerminalId, NewPush)> =
            followers.iter().map(|(f, _)| (*f, push.clone())).collect();
        let offsets = self.store_pushes(items, Vec::new()).await?;
        Ok(followers.into_iter().map(|(f, _)| f).zip(offsets).collect())
    }

    /// Sets what `id` shows and pushes it to its followers (a terminal's `SetSession`, or a
    /// content backend through HTTP). Returns the number of followers pushed to.
    pub async fn set_session(
        &self,
        id: TerminalId,
        session: Option<Session>,
    ) -> Result<usize, StoreError> {
        let now = unix_now();
        let followers = self
            .shared
            .store
            .read(move |b| b.followers(&id, now))
            .await?;
        let set = Op::SetSession {
            id,
            session: session.clone(),
        };
        let Some(session) = session else {
            self.shared.store.write(vec![set]).await?;
            return Ok(0);
        };
        let ttl = self.shared.push.default_ttl;
        // What followers get must fit a frame; refused before anything is stored.
        if let Err(e) = NewPush::session(id, &session, ttl).check_size("session") {
            self.over_limit("session_size", format_args!("from {}: {e}", id.short()));
            return Err(e);
        }
        let items: Vec<(TerminalId, NewPush)> = followers
            .iter()
            .map(|(f, _)| (*f, NewPush::session(id, &session, ttl)))
            .collect();
        let n = items.len();
        self.store_pushes(items, vec![set]).await?;
        Ok(n)
    }

    /// Whether the server has ever seen `id`.
    pub async fn known(&self, id: TerminalId) -> Result<bool, StoreError> {
        self.shared.store.read(move |b| b.known(&id)).await
    }

    fn new_push(&self, p: Publication) -> Result<NewPush, PublishError> {
        let max = self.shared.push.max_ttl.as_secs();
        let ttl = match p.ttl_secs {
            None => self.shared.push.default_ttl,
            Some(t) if (1..=max).contains(&t) => Duration::from_secs(t),
            Some(_) => return Err(PublishError::BadTtl(max)),
        };
        let push = NewPush {
            from: None,
            uri: p.uri,
            title: p.title,
            body: p.body,
            position: None,
            meta: p.meta,
            ttl,
            collapse_key: p.collapse_key,
        };
        // Accepted means deliverable: a push no frame can carry is refused up front.
        if let Err(e) = push.check_size("push") {
            self.over_limit("push_size", format_args!("{e}"));
            return Err(e.into());
        }
        Ok(push)
    }
}

/// Accepts terminals. Before any handshake state exists: once half of `max_pending_handshakes`
/// are in progress, a source must prove its address with a QUIC Retry round trip (so forged
/// source addresses never get further); then per-source handshake rate and connection count,
/// and the connection slots. Handshakes in progress are capped, the oldest dropped for a new one,
/// so stalled handshakes cannot hold the slots terminals need.
async fn accept(server: Server) {
    let limits = server.shared.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let pending = PendingHandshakes::new(limits.max_pending_handshakes);
    let retry_above = limits.max_pending_handshakes / 2;
    loop {
        let incoming = tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            incoming = server.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && pending.len() >= retry_above
        {
            // Stateless: a source that cannot receive at its address never gets further.
            server
                .shared
                .metrics
                .inc("handoff_handshake_retries_total", None);
            let _ = incoming.retry();
            continue;
        }
        // An IPv4 address (also IPv4-mapped on a dual-stack socket), or an IPv6 /64: one host
        // usually holds a whole /64, and rotating addresses in it must gain nothing.
        let source = source_key(incoming.remote_address().ip());
        if !server.shared.handshakes.allow(&source) {
            server.over_limit(
                "handshakes_per_sec_per_source",
                format_args!("handshakes from {source}"),
            );
            incoming.refuse();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            server.over_limit("max_connections", format_args!("refusing {source}"));
            incoming.refuse();
            continue;
        };
        let Some(source_slot) = server.shared.per_source.acquire(source) else {
            server.over_limit(
                "max_connections_per_source",
                format_args!("refusing {source}"),
            );
            incoming.refuse();
            continue;
        };
        let (handshake, evicted) = pending.begin();
        if evicted {
            server.over_limit(
                "max_pending_handshakes",
                format_args!("dropped the oldest handshake in progress for one from {source}"),
            );
        }
        let s = server.clone();
        server.shared.tasks.spawn(async move {
            let _slots = (permit, source_slot);
            let outcome = tokio::select! {
                _ = handshake.dropped.cancelled() => {
                    s.shared.metrics.inc(
                        "handoff_handshakes_failed_total",
                        Some(("reason", "dropped")),
                    );
                    return;
                }
                outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming) => outcome,
            };
            drop(handshake);
            let conn = match outcome {
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
    // Before anything about a new terminal is stored: is its network over its quota?
    let ip = conn.remote_address().ip().to_canonical();
    let source = source_key(ip);
    if let Err(refused) = server.shared.strangers.admit(ip, id, Instant::now()) {
        let limit = match refused {
            strangers::Refused::Quota => "known_terminals_per_source",
            strangers::Refused::Full => "known_terminals_tracked",
        };
        server.over_limit(limit, format_args!("refusing {} from {ip}", id.short()));
        conn.close(
            varint(ErrorCode::Busy),
            b"too many terminals from this network",
        );
        return;
    }
    let idle = server.shared.limits.idle_terminal;
    if let Err(e) = register(&server.shared.store, idle, id, unix_now()).await {
        limited!(server, "store", warn!("store: {e}"));
        conn.close(varint(ErrorCode::Busy), b"store unavailable");
        return;
    }
    let conn_id = server.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let outbox = Arc::new(Outbox::new());
    let slot = ConnSlot {
        conn_id,
        conn: conn.clone(),
        outbox: outbox.clone(),
    };
    if let Some(old) = server.conns().insert(id, slot) {
        old.conn.close(
            varint(ErrorCode::Replaced),
            b"replaced by a newer connection",
        );
    }
    server.shared.metrics.inc("handoff_connections_total", None);
    debug!(remote = %conn.remote_address(), "terminal connected");
    // Registered after the slot exists and before the log is read at hello, so no push appended
    // by another node can fall between the two.
    if let Some(cluster) = server.shared.cluster.clone() {
        match tokio::task::spawn_blocking(move || cluster.register(&[id])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => limited!(
                server,
                "cluster",
                warn!("cannot register with the cluster: {e}")
            ),
            Err(e) => limited!(
                server,
                "cluster",
                warn!("cluster registration task failed: {e}")
            ),
        }
    }
    // Opened once the terminal said hello.
    let mut push: Option<PushStream> = None;
    loop {
        if let Some(p) = push.as_mut() {
            if p.send_pending(&server, &conn, id, &outbox).await.is_err() {
                break;
            }
        }
        tokio::select! {
            _ = server.shared.cancel.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let request = serve_request(server.clone(), conn.clone(), id, source, outbox.clone(), send, recv);
                    tokio::spawn(request.in_current_span());
                }
                Err(e) => {
                    debug!("terminal disconnected: {e}");
                    break;
                }
            },
            _ = outbox.wake.notified() => {
                let start = outbox.start.load(Ordering::Acquire);
                if push.is_none() && start != NOT_STARTED {
                    match conn.open_bi().await {
                        Ok((send, recv)) => push = Some(PushStream::new(send, recv, start)),
                        Err(e) => {
                            debug!("cannot open the push stream: {e}");
                            break;
                        }
                    }
                }
            }
            read = async {
                match push.as_mut() {
                    Some(p) => p.acks.read().await,
                    None => std::future::pending().await,
                }
            }, if push.as_ref().is_some_and(|p| !p.acks.ended) => {
                if let Some(next) = read {
                    server.shared.metrics.inc("handoff_pushes_acked_total", None);
                    let s = server.clone();
                    // Acks only ever raise the acknowledged offset, so their order is free.
                    server.shared.tasks.spawn(async move {
                        if let Err(e) = s.shared.store.write_one(Op::Ack { to: id, next }).await {
                            limited!(s, "store", warn!("store: {e}"));
                        }
                    }.in_current_span());
                }
            }
        }
    }
    let still_ours = {
        let mut conns = server.conns();
        let ours = conns.get(&id).is_some_and(|slot| slot.conn_id == conn_id);
        if ours {
            conns.remove(&id);
        }
        ours
    };
    if let Some(cluster) = server.shared.cluster.clone().filter(|_| still_ours) {
        let _ = tokio::task::spawn_blocking(move || cluster.unregister(&id)).await;
    }
}

/// Reads one request from a stream the terminal opened and answers it.
async fn serve_request(
    s: Server,
    conn: quinn::Connection,
    id: TerminalId,
    source: std::net::IpAddr,
    outbox: Arc<Outbox>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
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
    let body = if !s.shared.requests.allow(&id) {
        s.over_limit(
            "requests_per_sec_per_terminal",
            format_args!("from {}", id.short()),
        );
        ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: "too many requests; slow down".into(),
        })
    } else if !s.shared.source_requests.allow(&source) {
        s.over_limit("requests_per_sec_per_source", format_args!("from {source}"));
        ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: "too many requests from this network; slow down".into(),
        })
    } else if let RequestBody::Hello { cursor } = request.body {
        if outbox.hello_said.swap(true, Ordering::AcqRel) {
            ResponseBody::Refused(Refusal {
                reason: RefusalReason::WrongEndpoint,
                message: "hello was already said on this connection".into(),
            })
        } else {
            match s.hello(id, cursor, source).await {
                Ok(None) => {
                    conn.close(
                        varint(ErrorCode::Busy),
                        b"resync over this network's session budget; reconnect later",
                    );
                    return;
                }
                Ok(Some(Hello {
                    start,
                    window_lost,
                    end,
                })) => {
                    // The connection's task sends the log from `start` up to at least its end.
                    outbox.latest.fetch_max(end.max(start), Ordering::AcqRel);
                    outbox.start.store(start, Ordering::Release);
                    outbox.wake.notify_one();
                    ResponseBody::Welcome {
                        epoch: s.epoch(),
                        start,
                        window_lost,
                    }
                }
                Err(e) => {
                    limited!(s, "store", warn!("store: {e}"));
                    conn.close(varint(ErrorCode::Busy), b"store unavailable");
                    return;
                }
            }
        }
    } else {
        s.handle(id, source, request.body).await
    };
    respond(send, request.id, body).await;
}

/// Marks a connecting terminal known (publishes to it are accepted from now on); returns
/// whether it wrote. A returning terminal seen within half of `[limits] idle_terminal_secs` is
/// left as it is: the sweep marks connected terminals seen every minute, long before idle expiry
/// could take it, so a reconnect storm reads the store but commits (and fsyncs) nothing.
async fn register(
    store: &Store,
    idle_terminal: Duration,
    id: TerminalId,
    now: u64,
) -> Result<bool, StoreError> {
    let recent = idle_terminal.as_secs() / 2;
    let seen = store.read(move |b| b.seen(&id)).await?;
    if seen.is_some_and(|seen| now.saturating_sub(seen) < recent) {
        return Ok(false);
    }
    store.write_one(Op::Touch { id, now }).await?;
    Ok(true)
}

async fn respond(mut send: quinn::SendStream, id: u64, body: ResponseBody) {
    if write_frame(&mut send, &Response { id, body }).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

impl Server {
    /// Decides where `id`'s push stream starts, and whether its cursor could be honoured. When
    /// it could not, the current sessions of the terminals it follows are appended so it gets
    /// the current state.
    /// `None` when the resync is over `source`'s session budget (nothing was stored).
    async fn hello(
        &self,
        id: TerminalId,
        cursor: Option<Cursor>,
        source: IpAddr,
    ) -> Result<Option<Hello>, StoreError> {
        let epoch = self.epoch();
        let now = unix_now();
        let log = self
            .shared
            .store
            .read(move |b| b.log(&id, 0, 0, now))
            .await?;
        let (start, window_lost) = match cursor {
            Some(c) if c.epoch == epoch && c.next >= log.acked && c.next <= log.next => {
                (c.next, false)
            }
            Some(c) => {
                limited!(
                    self,
                    "resync",
                    info!(
                        cursor_epoch = c.epoch,
                        cursor = c.next,
                        epoch,
                        acked = log.acked,
                        next = log.next,
                        "cursor not honoured; resyncing"
                    )
                );
                (log.acked, true)
            }
            None => (log.acked, log.acked > 0),
        };
        if window_lost {
            self.shared.metrics.inc("handoff_resyncs_total", None);
            let followed = self
                .shared
                .store
                .read(move |b| {
                    let mut out = Vec::new();
                    for (first, _) in b.following(&id, now)? {
                        if let Some(session) = b.session(&first)? {
                            out.push((first, session));
                        }
                    }
                    Ok(out)
                })
                .await?;
            let ttl = self.shared.push.default_ttl;
            // A session stored before sessions were size-checked may not fit a push: it is
            // left out rather than failing every hello of its followers.
            let items: Vec<(TerminalId, NewPush)> = followed
                .iter()
                .map(|(first, s)| (id, NewPush::session(*first, s, ttl)))
                .filter(|(_, push)| push.check_size("session").is_ok())
                .collect();
            // Reconnecting costs a copy of every followed session: budgeted like changes.
            let cost = items.iter().map(|(_, p)| p.size_bound() as u64).sum();
            if !self.charge_session_bytes(source, cost, format_args!("resync of {}", id.short())) {
                return Ok(None);
            }
            self.store_pushes(items, Vec::new()).await?;
        }
        Ok(Some(Hello {
            start,
            window_lost,
            end: log.next,
        }))
    }

    /// Charges `cost` bytes to `source`'s session budget; counts and logs a refusal.
    fn charge_session_bytes(
        &self,
        source: IpAddr,
        cost: u64,
        what: std::fmt::Arguments<'_>,
    ) -> bool {
        if self.shared.session_bytes.allow_n(&source, cost) {
            return true;
        }
        self.over_limit(
            "session_bytes_per_sec_per_source",
            format_args!("{what} from {source}: {cost} bytes"),
        );
        false
    }

    /// Answers one request of terminal `id`, connected from source network `source`.
    async fn handle(&self, id: TerminalId, source: IpAddr, body: RequestBody) -> ResponseBody {
        let result = match body {
            RequestBody::SetSession(session) => {
                debug!(title = ?session.as_ref().map(|s| &s.title), "session set");
                match self.session_budget(id, source, session.as_ref()).await {
                    Ok(Some(refused)) => Ok(refused),
                    Ok(None) => self
                        .set_session(id, session)
                        .await
                        .map(|_| ResponseBody::SessionStored),
                    Err(e) => Err(e),
                }
            }
            RequestBody::Follow(request) => self.follow(id, source, request).await,
            RequestBody::Revoke { second, at } => self.revoke(id, second, at).await,
            RequestBody::Hello { .. } => unreachable!("hello is handled by the connection loop"),
            RequestBody::InterfaceInfo | RequestBody::Pair(_) => {
                Ok(ResponseBody::Refused(Refusal {
                    reason: RefusalReason::WrongEndpoint,
                    message: "a server does not serve terminal-to-terminal requests".into(),
                }))
            }
        };
        result.unwrap_or_else(|e| match e {
            // Over a size limit (counted where it was found): the message names the limit.
            StoreError::TooLarge { .. } => ResponseBody::Refused(Refusal {
                reason: RefusalReason::Busy,
                message: e.to_string(),
            }),
            e => {
                limited!(self, "store", warn!("store: {e}"));
                ResponseBody::Refused(Refusal {
                    reason: RefusalReason::Busy,
                    message: "the server's store failed; try again".into(),
                })
            }
        })
    }

    /// Charges a session change to its source network's budget: its size once for the session
    /// and once per follower it is pushed to. `Some(refusal)` when over the budget (then
    /// nothing is stored).
    async fn session_budget(
        &self,
        id: TerminalId,
        source: IpAddr,
        session: Option<&Session>,
    ) -> Result<Option<ResponseBody>, StoreError> {
        let Some(session) = session else {
            return Ok(None);
        };
        let now = unix_now();
        let followers = self
            .shared
            .store
            .read(move |b| b.followers(&id, now))
            .await?
            .len();
        let size = NewPush::session(id, session, Duration::ZERO).size_bound();
        let cost = (size as u64).saturating_mul(1 + followers as u64);
        let what = format_args!("session of {} to {followers} followers", id.short());
        if self.charge_session_bytes(source, cost, what) {
            return Ok(None);
        }
        Ok(Some(ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: format!(
                "session changes from this network are over the server's budget ([limits] \
                 session_bytes_per_sec_per_source = {}; this one stores {size} bytes for the \
                 session and each of {followers} followers); try again in a second",
                self.shared.limits.session_bytes_per_sec_per_source
            ),
        })))
    }

    /// `first` revokes `second` (DESIGN §7): ends the link and refuses every ticket `first`
    /// issued for `second` up to `at` (by `first`'s clock). The record is kept until all such
    /// tickets have expired, so a time past the clock-skew allowance (which would keep it for
    /// ever) is refused, an outdated one only ends the link, and one terminal keeps at most
    /// `[limits] revocations_per_terminal` of them: each names a second of its own choosing.
    async fn revoke(
        &self,
        first: TerminalId,
        second: TerminalId,
        at: u64,
    ) -> Result<ResponseBody, StoreError> {
        let now = unix_now();
        let skew = wire::ticket::MAX_CLOCK_SKEW;
        let lease = self.shared.limits.max_lease.as_secs();
        if at > now.saturating_add(skew) {
            return Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::BadTicket,
                message: format!(
                    "the revocation is dated {} s in the future, more than the {skew} s the \
                     server allows; check this terminal's clock",
                    at - now
                ),
            }));
        }
        let op = if at.saturating_add(lease + skew) <= now {
            // Every ticket issued up to `at` has expired: nothing to remember.
            Op::Unlink { first, second }
        } else {
            Op::Revoke {
                first,
                second,
                at,
                // Until every ticket issued up to `at` has expired, whichever clock is ahead.
                keep_until: now.max(at).saturating_add(lease + skew),
                capacity: self.shared.limits.revocations_per_terminal,
                now,
            }
        };
        let outcome = self.shared.store.write_one(op).await?;
        if outcome == Outcome::Full {
            let limit = self.shared.limits.revocations_per_terminal;
            self.over_limit(
                "revocations_per_terminal",
                format_args!("{} revoking {}", first.short(), second.short()),
            );
            return Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::Busy,
                message: format!(
                    "this terminal has {limit} revocations stored on the server ([limits] \
                     revocations_per_terminal); the link was ended, but tickets issued before \
                     were not revoked; try again in {} s",
                    lease + skew
                ),
            }));
        }
        let removed = outcome == Outcome::Removed(true);
        limited!(
            self,
            "revoked",
            info!(second = %second.short(), removed, "revoked by its first terminal")
        );
        Ok(ResponseBody::Revoked { removed })
    }

    /// Patent S210: check the request and ticket, record the link, push the current session.
    async fn follow(
        &self,
        second: TerminalId,
        source: IpAddr,
        request: InfoRequest,
    ) -> Result<ResponseBody, StoreError> {
        let refuse = |message: String| {
            self.shared
                .metrics
                .inc("handoff_refusals_total", Some(("reason", "bad_ticket")));
            limited!(
                self,
                "refused_follow",
                warn!(second = %second, first = %request.first, "refused follow: {message}")
            );
            Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::BadTicket,
                message,
            }))
        };
        if request.second != second {
            return refuse(
                "the ticket was made for another second terminal than the connection's identity"
                    .into(),
            );
        }
        let now = unix_now();
        let expect = Expectation {
            first: request.first,
            second,
            server: self.id(),
            now,
            max_lifetime: self.shared.limits.max_lease.as_secs(),
        };
        if let Err(e) = request.ticket.check(&expect) {
            return refuse(e.to_string());
        }
        let ticket = &request.ticket.ticket;
        // The link lasts as long as the ticket, capped by the server's maximum lease.
        let until = ticket
            .not_after
            .min(now + self.shared.limits.max_lease.as_secs());
        let first = request.first;
        let (known, session) = self
            .shared
            .store
            .read(move |b| Ok((b.known(&first)?, b.session(&first)?)))
            .await?;
        if !known {
            // Tickets between keys that never attached here would only fill the store.
            return refuse(wire::ticket::TicketError::UnknownFirst.to_string());
        }
        let ttl = self.shared.push.default_ttl;
        let push = session.as_ref().map(|s| NewPush::session(first, s, ttl));
        // A follow copies the first terminal's session into the second's log: budgeted like a
        // session change, before anything (the nonce too) is used.
        if let Some(push) = &push {
            let what = format_args!("follow of {}", first.short());
            if !self.charge_session_bytes(source, push.size_bound() as u64, what) {
                return Ok(ResponseBody::Refused(Refusal {
                    reason: RefusalReason::Busy,
                    message: format!(
                        "follows and session changes from this network are over the server's \
                         budget ([limits] session_bytes_per_sec_per_source = {}); try again in \
                         a second",
                        self.shared.limits.session_bytes_per_sec_per_source
                    ),
                }));
            }
        }
        // Nonce, link and the session push in one atomic step and one commit.
        let follow = Op::Follow {
            first,
            second,
            issued_at: ticket.issued_at,
            nonce: ticket.nonce,
            not_after: ticket.not_after,
            until,
            now,
            capacity: self.shared.limits.replay_cache,
            push: push.clone(),
        };
        let accepted = Instant::now();
        match self.shared.store.write_one(follow).await? {
            Outcome::Followed(offset) => {
                self.shared
                    .metrics
                    .observe("handoff_push_store_seconds", accepted.elapsed());
                if let (Some(offset), Some(push)) = (offset, push) {
                    self.announce(vec![(second, push.stored(offset, now))], accepted);
                }
            }
            Outcome::Fresh(None) => {
                return refuse(wire::ticket::TicketError::ReplayCacheFull.to_string())
            }
            Outcome::Revoked => return refuse(wire::ticket::TicketError::Revoked.to_string()),
            _ => return refuse(wire::ticket::TicketError::Replayed.to_string()),
        }
        limited!(
            self,
            "linked",
            info!(first = %first.short(), until, "linked")
        );
        self.shared.metrics.inc("handoff_links_total", None);
        Ok(ResponseBody::Linked {
            until,
            has_session: session.is_some(),
        })
    }
}

/// The push stream of one connection: `id`'s log in order from its start, then every new item;
/// the terminal's acknowledgements come back on it.
struct PushStream {
    send: quinn::SendStream,
    acks: AckReader,
    /// The next offset to send.
    next: u64,
}

impl PushStream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream, start: u64) -> Self {
        Self {
            send,
            acks: AckReader::new(recv),
            next: start,
        }
    }

    /// Sends what the fast path holds, then reads the log while behind (after a reconnect, or
    /// when the fast path overflowed). `Err` when the connection is done for.
    async fn send_pending(
        &mut self,
        server: &Server,
        conn: &quinn::Connection,
        id: TerminalId,
        outbox: &Outbox,
    ) -> Result<(), ()> {
        loop {
            for (push, accepted) in outbox.take_fast() {
                // Older ones were sent from the log; after a gap the log read below has it.
                if push.item.offset == self.next {
                    self.send(server, &push).await?;
                    server
                        .shared
                        .metrics
                        .observe("handoff_push_delivery_seconds", accepted.elapsed());
                }
            }
            let latest = outbox.latest.load(Ordering::Acquire);
            if self.next >= latest {
                return Ok(());
            }
            let (next, now) = (self.next, unix_now());
            let read = match server
                .shared
                .store
                .read(move |b| b.log(&id, next, PAGE, now))
                .await
            {
                Ok(read) => read,
                Err(e) => {
                    limited!(server, "store", warn!("store: {e}"));
                    conn.close(varint(ErrorCode::Busy), b"store unavailable");
                    return Err(());
                }
            };
            if read.items.is_empty() {
                // Everything up to the log's end was collapsed, expired or acknowledged.
                self.next = self.next.max(read.next.min(latest));
                return Ok(());
            }
            for push in read.items {
                self.send(server, &push).await?;
            }
        }
    }

    async fn send(&mut self, server: &Server, push: &StoredPush) -> Result<(), ()> {
        match write_frame(&mut self.send, &ServerPush::Item(push.item.clone())).await {
            Ok(()) => {
                server.shared.metrics.inc("handoff_pushes_sent_total", None);
                self.next = push.item.offset + 1;
                Ok(())
            }
            Err(e) => {
                debug!("push stream failed: {e}");
                Err(())
            }
        }
    }
}

/// The largest acknowledgement frame read.
const MAX_ACK: usize = 64;

/// Reads acknowledgement frames off the push stream into a buffer of its own, so that a read
/// cancelled by the connection's `select!` loses no bytes of a frame.
struct AckReader {
    recv: quinn::RecvStream,
    buf: [u8; wire::HEADER_LEN + MAX_ACK],
    len: usize,
    /// The stream ended or carried a bad frame: nothing more is read.
    ended: bool,
}

impl AckReader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: [0; wire::HEADER_LEN + MAX_ACK],
            len: 0,
            ended: false,
        }
    }

    /// Reads what has arrived; returns the highest acknowledged offset among the frames it
    /// completed, if any. Cancel-safe: the only await is quinn's `read`, which is.
    async fn read(&mut self) -> Option<u64> {
        let n = match self.recv.read(&mut self.buf[self.len..]).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                self.ended = true;
                return None;
            }
            Err(e) => {
                debug!("ack stream ended: {e}");
                self.ended = true;
                return None;
            }
        };
        self.len += n;
        let mut acked = None;
        loop {
            match self.frame() {
                Ok(Some((PushAck::Ack { next }, used))) => {
                    acked = acked.max(Some(next));
                    self.buf.copy_within(used..self.len, 0);
                    self.len -= used;
                }
                Ok(None) => return acked,
                Err(e) => {
                    debug!("ack stream ended: {e}");
                    let _ = self.recv.stop(varint(e.code()));
                    self.ended = true;
                    return acked;
                }
            }
        }
    }

    /// The first complete frame in the buffer and the bytes it took.
    fn frame(&self) -> Result<Option<(PushAck, usize)>, wire::WireError> {
        let Some(header) = self.buf[..self.len].first_chunk::<{ wire::HEADER_LEN }>() else {
            return Ok(None);
        };
        let len = wire::decode_header(*header)?;
        if len > MAX_ACK {
            return Err(wire::WireError::TooLarge(len));
        }
        let end = wire::HEADER_LEN + len;
        if self.len < end {
            return Ok(None);
        }
        let ack = wire::decode_payload(&self.buf[wire::HEADER_LEN..end])?;
        Ok(Some((ack, end)))
    }
}

/// Raises the `latest` of terminals another node appended for, and wakes their writers.
async fn apply_wakes(server: Server, mut rx: mpsc::Receiver<Vec<(TerminalId, u64)>>) {
    loop {
        let wakes = tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            wakes = rx.recv() => match wakes {
                Some(w) => w,
                None => return,
            },
        };
        let conns = server.conns();
        for (id, next) in wakes {
            if let Some(slot) = conns.get(&id) {
                slot.outbox.latest.fetch_max(next, Ordering::AcqRel);
                slot.outbox.wake.notify_one();
            }
        }
    }
}

/// Keeps this node's terminals registered, and has the store check its epoch, every
/// [`cluster::REFRESH_EVERY`].
async fn refresh_registrations(server: Server) {
    let Some(cluster) = server.shared.cluster.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(cluster::REFRESH_EVERY) => {}
        }
        let ids: Vec<TerminalId> = server.conns().keys().copied().collect();
        let c = cluster.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.register(&ids)).await {
            warn!("cannot refresh cluster registrations: {e}");
        }
        // An empty batch has the store check its epoch, so a Redis that lost its data is
        // noticed even when nothing else is written.
        if let Err(e) = server.shared.store.write(Vec::new()).await {
            warn!("store epoch check: {e}");
        }
    }
}

/// When the push logs' epoch changes (Redis lost its data), every connected terminal's position
/// is meaningless: close the connections, so each reconnects, says hello with its old cursor,
/// is told its window was lost, and resyncs.
async fn watch_epoch(server: Server) {
    let mut known = server.epoch();
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = server.epoch();
        if now == known {
            continue;
        }
        warn!(
            old = known,
            new = now,
            "the push logs were lost (new epoch); terminals resync"
        );
        known = now;
        let conns: Vec<quinn::Connection> = server
            .conns()
            .values()
            .map(|slot| slot.conn.clone())
            .collect();
        for conn in conns {
            conn.close(
                varint(ErrorCode::Busy),
                b"push log lost; reconnect to resync",
            );
        }
    }
}

/// Sweeps expired items, links and nonces from the store once a minute, and forgets terminals
/// idle for `[limits] idle_terminal_secs`: the terminals connected to this node are marked seen
/// first, so only those neither connected (to any node) nor linked go.
async fn sweep(server: Server) {
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let now = unix_now();
        let connected: Vec<(std::net::IpAddr, TerminalId)> = server
            .conns()
            .iter()
            .map(|(id, slot)| (slot.conn.remote_address().ip(), *id))
            .collect();
        server
            .shared
            .strangers
            .refresh(connected.iter().copied(), Instant::now());
        let mut ops: Vec<Op> = connected
            .into_iter()
            .map(|(_, id)| Op::Touch { id, now })
            .collect();
        ops.push(Op::Sweep { now });
        let idle = server.shared.limits.idle_terminal.as_secs();
        ops.push(Op::ExpireIdle {
            now,
            seen_before: now.saturating_sub(idle),
        });
        match server.shared.store.write(ops).await {
            Ok(outcomes) => {
                if let Some(Outcome::Expired(n)) = outcomes.last() {
                    server
                        .shared
                        .metrics
                        .add("handoff_terminals_expired_total", None, *n);
                }
            }
            Err(e) => warn!("store sweep: {e}"),
        }
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
        assert!(register(&store, idle, id, now).await.unwrap(), "new");
        assert!(store.read(move |b| b.known(&id)).await.unwrap());
        assert!(!register(&store, idle, id, now + 1).await.unwrap());
        assert!(!register(&store, idle, id, now + 499).await.unwrap());
        assert!(register(&store, idle, id, now + 500).await.unwrap(), "away");
        let seen = store.read(move |b| b.seen(&id)).await.unwrap();
        assert_eq!(seen, Some(now + 500));
        store.close().await;
    }
}
