//! The terminal daemon (DESIGN §1, §5): discovery, the peer-facing QUIC service, links to content
//! servers, pulls, and delivery of pushes.
//!
//! One QUIC endpoint serves both roles: it accepts peers asking for interface info
//! ([`peer_service`]) and dials peers and servers ([`pull`], [`server_link`]).
//!
//! Shutdown order ([`Daemon::shutdown`]): cancel the root token (control socket and peer accept
//! loops stop, link supervisors end), send the mDNS goodbye, close every QUIC connection with
//! [`ErrorCode::Shutdown`], remove the control socket, then wait for the tasks to drain.

mod control_server;
mod follow;
mod links;
mod liveness;
mod metrics_http;
pub mod pairing;
mod peer_service;
mod pull;
mod reload;
mod server_link;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

pub use pairing::{PairCode, PairError, PAIR_TIMEOUT};
pub use pull::{LinkOutcome, PullError, PullOutcome};
pub use reload::ReloadReport;
pub use server_link::Reconnect;
pub(crate) use server_link::{explain_connect_error, is_key_mismatch};

use crate::config::{AcceptPolicy, DaemonConfig};
use crate::control::{PeerRecord, PushRecord, ServerStatus, StatusRecord};
use crate::discovery::{Discovery, DiscoveryEvent};
use crate::identity::{Identity, IdentityError, ServerId, TerminalId};
use crate::inbox::{Inbox, InboxError, InboxLimits};
use crate::limits::{KeyedLimiter, LogLimiter, RecentSources, SourceCounter};
use crate::metrics::Metrics;
use crate::net::varint;
use crate::peer::{Change, Peer, PeerTable, TableLimits};
use crate::tls::{self, TransportLimits};
use crate::trust::{TrustError, TrustStore};
use crate::wire::{self, ErrorCode, PushItem, ServerInfo, Session};
use server_link::{FollowInFlight, ServerLink};

/// Pushes buffered for slow `watch` subscribers before they are told they lagged.
const PUSH_BUFFER: usize = 256;
/// Hook processes running at once; further pushes wait for a slot, up to
/// `[limits] max_hook_queue` of them.
const HOOK_SLOTS: usize = 8;
/// Links to servers other than our own kept in the map before unused ones are dropped.
const MAX_LINKS: usize = 256;

/// Connections the daemon opens (to peers and servers): servers may open push streams.
/// The idle timeout is what notices a server node that died without closing (then the link
/// fails over to the next address): keep-alives every 5 s keep a live connection well inside it.
pub const DIAL_LIMITS: TransportLimits = TransportLimits {
    max_bidi_streams: 4,
    max_uni_streams: 0,
    idle_timeout: Duration::from_secs(12),
    keep_alive: Some(Duration::from_secs(5)),
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the QUIC endpoint on {addr} ([quic] listen): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start mDNS discovery: {0}")]
    Discovery(#[from] crate::discovery::DiscoveryError),
    #[error("cannot bind the metrics listener on {addr} ([metrics] listen): {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("control socket {path}: {reason}")]
    Control {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The control socket's directory or group is not fit for use: fix the config or the
    /// directory.
    #[error("control socket {path}: {reason}")]
    ControlDir {
        path: std::path::PathBuf,
        reason: String,
    },
}

impl DaemonError {
    /// The exit status for this error: 78 (bad configuration) when a file, directory or group
    /// the config names needs fixing by hand, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Identity(e) => e.exit_code(),
            Self::ControlDir { .. } => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// How the daemon is started; the binary uses the defaults.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Run mDNS discovery (tests on the host's loopback turn it off and add peers by hand).
    pub discovery: bool,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self { discovery: true }
    }
}

/// What the terminal shows, versioned so the server link knows what it has synced.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionState {
    pub version: u64,
    pub session: Option<Session>,
}

pub(crate) struct Shared {
    pub identity: Identity,
    /// The config the daemon started with.
    pub config: DaemonConfig,
    /// The reloadable part of the config, as last loaded.
    pub live: Mutex<reload::LiveConfig>,
    pub endpoint: quinn::Endpoint,
    pub dial_config: Mutex<HashMap<TerminalId, quinn::ClientConfig>>,
    pub peers: Mutex<PeerTable>,
    pub trust: TrustStore,
    pub session: watch::Sender<SessionState>,
    pub home: Option<Arc<ServerLink>>,
    pub links: Mutex<HashMap<ServerId, Arc<ServerLink>>>,
    pub pushes: broadcast::Sender<PushRecord>,
    pub peer_changes: watch::Sender<u64>,
    pub inbox: Inbox,
    /// Hook processes running at once.
    pub hooks: Arc<Semaphore>,
    /// Hooks running or waiting for a slot: `HOOK_SLOTS + [limits] max_hook_queue`.
    pub hook_queue: Arc<Semaphore>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    pub discovery: tokio::sync::Mutex<Option<Arc<Discovery>>>,
    pub started: Instant,
    pub metrics: Metrics,
    pub guards: Guards,
    pub pairings: Mutex<pairing::Pairings>,
    pub pair_changes: watch::Sender<u64>,
    pub follows: Mutex<HashMap<TerminalId, follow::FollowState>>,
    /// Every link this terminal made (pulls and auto-follows): peer → Unix seconds it lasts until.
    pub linked: Mutex<HashMap<TerminalId, u64>>,
    /// The same per server, on disk: whose pushes each server may deliver.
    pub followed: links::Links,
    /// The bound address of the metrics listener, if one is configured.
    pub metrics_addr: Mutex<Option<std::net::SocketAddr>>,
}

/// The limiters of DESIGN §7, built from `[limits]`. Sources are keyed by
/// [`crate::limits::source_key`] (IPv6 per /64).
pub(crate) struct Guards {
    pub handshakes_per_source: KeyedLimiter<std::net::IpAddr>,
    pub per_source: SourceCounter,
    pub unknown_handshakes: KeyedLimiter<std::net::IpAddr>,
    pub requests_per_peer: KeyedLimiter<TerminalId>,
    /// Addresses where a trusted key proved itself recently: exempt from per-source limits.
    pub trusted_sources: RecentSources,
    pub log: LogLimiter,
}

/// A handle to a running daemon. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    pub(crate) shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Sections under these locks never leave the data half-updated, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the home server did with a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRevocation {
    /// It ended the link (`removed`: there was one) and refuses older tickets.
    Done { removed: bool },
    /// It refused (its message: over `revocations_per_terminal`, a clock too far ahead): the
    /// link may have ended, but older tickets are not refused there.
    Refused(String),
    /// No answer (it is sent again when the connection comes back).
    Unreachable,
    /// This terminal has no server.
    NoServer,
}

impl ServerRevocation {
    /// `Some(removed)` when the server confirmed.
    pub fn removed(&self) -> Option<bool> {
        match self {
            Self::Done { removed } => Some(*removed),
            _ => None,
        }
    }
}

impl Daemon {
    /// Starts every part of the daemon: identity, QUIC endpoint, server link, discovery and the
    /// control socket. Returns once all are bound and registered.
    pub async fn start(config: DaemonConfig, options: DaemonOptions) -> Result<Self, DaemonError> {
        // Before anything is created: a daemon already serving this socket is not disturbed.
        control_server::ensure_free(&config.control_socket)?;
        // The certificate carries the name, so peers learn it from the key holder (DESIGN §7).
        let identity = Identity::load_or_create(&config.state_dir)?.named(&config.name)?;
        let trust = TrustStore::open(&config.state_dir, config.accept, &config.trusted_peers)?;
        for id in trust.revoked_in_config() {
            warn!(peer = %id, "[trust] peers lists a peer revoked with `handoff untrust`; it stays revoked until `handoff trust`");
        }
        let inbox = Inbox::open(
            &config.state_dir,
            InboxLimits {
                max_items: config.limits.max_inbox_items,
                max_bytes: config.limits.max_inbox_bytes,
            },
        )?;
        let limits = config.limits;
        let peer_transport = TransportLimits {
            max_bidi_streams: limits.max_streams_per_connection,
            max_uni_streams: 0,
            idle_timeout: Duration::from_secs(15),
            keep_alive: None,
        };
        let server_config = tls::server_config(&identity, peer_transport)?;
        let endpoint =
            crate::net::bind_endpoint(server_config, config.listen).map_err(|source| {
                DaemonError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        let home = config.server.as_ref().map(|s| {
            Arc::new(ServerLink::new(
                ServerInfo {
                    id: s.id,
                    addrs: s.addrs.clone(),
                },
                true,
            ))
        });
        let shared = Arc::new(Shared {
            config: config.clone(),
            live: Mutex::new(reload::LiveConfig::of(&config)),
            endpoint,
            dial_config: Mutex::new(HashMap::new()),
            peers: Mutex::new(PeerTable::new(TableLimits {
                max_claims: limits.max_peers,
                max_addrs_per_peer: limits.max_addrs_per_peer,
            })),
            trust,
            session: watch::Sender::new(SessionState::default()),
            home,
            links: Mutex::new(HashMap::new()),
            pushes: broadcast::Sender::new(PUSH_BUFFER),
            peer_changes: watch::Sender::new(0),
            inbox,
            hooks: Arc::new(Semaphore::new(HOOK_SLOTS)),
            hook_queue: Arc::new(Semaphore::new(HOOK_SLOTS + limits.max_hook_queue)),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            discovery: tokio::sync::Mutex::new(None),
            started: Instant::now(),
            identity,
            metrics: Metrics::new(),
            guards: Guards {
                handshakes_per_source: KeyedLimiter::new(
                    limits.handshakes_per_sec_per_source,
                    4096,
                ),
                per_source: SourceCounter::new(limits.max_connections_per_source),
                unknown_handshakes: KeyedLimiter::new(limits.unknown_handshakes_per_sec, 4096),
                requests_per_peer: KeyedLimiter::new(limits.requests_per_sec_per_peer, 4096),
                trusted_sources: RecentSources::new(256, Duration::from_secs(600)),
                log: LogLimiter::new(Duration::from_secs(10)),
            },
            pairings: Mutex::new(pairing::Pairings::default()),
            pair_changes: watch::Sender::new(0),
            follows: Mutex::new(HashMap::new()),
            linked: Mutex::new(HashMap::new()),
            followed: links::Links::open(&config.state_dir),
            metrics_addr: Mutex::new(None),
        });
        let daemon = Daemon { shared };
        let me = daemon.id();
        info!(id = %me, name = %config.name, quic = %daemon.quic_addr(), "daemon starting");

        if let Some(addr) = config.metrics_listen {
            let bound = metrics_http::start(&daemon, addr).await?;
            *lock(&daemon.shared.metrics_addr) = Some(bound);
        }
        let listener = control_server::bind(&config.control_socket, config.control_group.as_ref())?;
        daemon.spawn(
            control_server::serve(daemon.clone(), listener),
            tracing::info_span!("control"),
        );
        daemon.spawn(
            peer_service::serve(daemon.clone()),
            tracing::info_span!("peers"),
        );
        if let Some(home) = daemon.shared.home.clone() {
            let span = tracing::info_span!("server", id = %home.server.id.short());
            daemon.spawn(server_link::supervise_home(daemon.clone(), home), span);
        }
        // Always running, so a reload can add follows; idle while there are none.
        daemon.spawn(follow::run(daemon.clone()), tracing::info_span!("follow"));
        if options.discovery {
            for unusable in crate::doctor::unusable_interfaces(&config.interfaces) {
                warn!(
                    "[discovery] interfaces: {} {}: mDNS cannot use it ({})",
                    unusable.check,
                    unusable.detail,
                    unusable.hint.unwrap_or_default()
                );
            }
            let advert = wire::txt::Advert {
                version: wire::PROTOCOL_MAJOR,
                id: me,
                name: config.name.clone(),
            };
            let discovery = Arc::new(Discovery::start(
                &config.interfaces,
                &advert,
                daemon.quic_addr(),
            )?);
            *daemon.shared.discovery.lock().await = Some(discovery.clone());
            daemon.spawn(
                browse(daemon.clone(), discovery.clone()),
                tracing::info_span!("discovery"),
            );
            daemon.spawn(
                liveness::run(daemon.clone(), Some(discovery)),
                tracing::info_span!("liveness"),
            );
            info!(interfaces = ?config.interfaces, "advertising on mDNS");
        } else {
            // Peers introduced by hand (tests) are checked all the same.
            daemon.spawn(
                liveness::run(daemon.clone(), None),
                tracing::info_span!("liveness"),
            );
        }
        Ok(daemon)
    }

    /// Counts a hit on `limit` and logs it at most once per interval.
    pub(crate) fn over_limit(&self, limit: &'static str, detail: std::fmt::Arguments<'_>) {
        self.shared
            .metrics
            .inc("handoff_limit_hits_total", Some(("limit", limit)));
        if let Some(suppressed) = self.shared.guards.log.check(limit) {
            warn!(limit, suppressed, "over limit: {detail}");
        }
    }

    /// Logs a line that remote input can trigger at most once per interval per `key`, with
    /// how many were held back since the last one (so an attack cannot flood the log).
    pub(crate) fn log_limited(&self, key: &'static str, detail: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.shared.guards.log.check(key) {
            debug!(suppressed, "{detail}");
        }
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub(crate) fn spawn<F>(&self, future: F, span: tracing::Span)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.shared.tasks.spawn(future.instrument(span));
    }

    pub fn id(&self) -> TerminalId {
        self.shared.identity.id()
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The bound UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> std::net::SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Records a peer's claim as discovery would; used by discovery and by tests that run
    /// without mDNS. The claim's ID gets checked by a handshake soon after (see `liveness`).
    pub fn learn_peer(&self, peer: Peer) {
        let (id, name) = (peer.id, peer.name.clone());
        let trust = &self.shared.trust;
        let (change, hits) = {
            let mut peers = lock(&self.shared.peers);
            let change = peers.upsert(peer, |id| trust.is_trusted(id));
            (change, peers.take_hits())
        };
        if hits.truncated > 0 {
            self.over_limit(
                "max_addrs_per_peer",
                format_args!("an mDNS advert for {} lists too many addresses", id.short()),
            );
        }
        if hits.evicted > 0 {
            self.over_limit(
                "max_peers",
                format_args!(
                    "the peer table is full: dropped an unverified advert for a newer one"
                ),
            );
        }
        match change {
            Change::Added => {
                if let Some(suppressed) = self.shared.guards.log.check("peer_discovered") {
                    info!(peer = %id.short(), claimed_name = %name, suppressed, "peer discovered");
                }
            }
            Change::Updated => {}
            Change::Refused => {
                self.over_limit(
                    "max_peers",
                    format_args!(
                        "ignoring an mDNS advert for {}: the peer table is full",
                        id.short()
                    ),
                );
                return;
            }
        }
        self.shared.peer_changes.send_modify(|n| *n += 1);
    }

    fn forget_instance(&self, instance: &str) {
        let left = lock(&self.shared.peers).remove_instance(instance);
        if let Some(peer) = left {
            if let Some(suppressed) = self.shared.guards.log.check("peer_left") {
                info!(peer = %peer.id.short(), name = %peer.name, suppressed, "peer left");
            }
        }
        // Also when other claims of the ID remain: it may have to prove itself again.
        self.shared.peer_changes.send_modify(|n| *n += 1);
    }

    /// Peers as `handoff peers` lists them: under the name a handshake proved (`verified`
    /// says whether the key answered since it was last suspected gone). A trusted peer is
    /// listed only while verified, so nobody else's advert can keep it listed.
    pub fn peers(&self) -> Vec<PeerRecord> {
        let views = lock(&self.shared.peers).views();
        views
            .into_iter()
            .filter_map(|v| {
                let trusted = self.shared.trust.is_trusted(&v.peer.id);
                if trusted && !v.verified {
                    return None;
                }
                let p = v.peer;
                Some(PeerRecord {
                    id: p.id.to_string(),
                    name: crate::text::clean(p.name),
                    addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    port: p.port,
                    trusted,
                    verified: v.verified && v.name_proven,
                })
            })
            .collect()
    }

    /// Waits until the peer table changes. Cancel-safe.
    pub async fn peers_changed(&self) {
        let mut rx = self.shared.peer_changes.subscribe();
        let _ = rx.changed().await;
    }

    /// Sets what this terminal shows and waits (up to `wait`) until its server stored it.
    /// Returns whether the server has it; without a server, `false`.
    pub async fn set_session(&self, session: Option<Session>, wait: Duration) -> bool {
        let mut version = 0;
        self.shared.session.send_modify(|s| {
            s.version += 1;
            s.session = session;
            version = s.version;
        });
        info!(version, "session changed");
        let Some(home) = &self.shared.home else {
            return false;
        };
        let mut synced = home.synced.subscribe();
        tokio::time::timeout(wait, synced.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn session(&self) -> Option<Session> {
        self.shared.session.borrow().session.clone()
    }

    /// Receives every push delivered from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PushRecord> {
        self.shared.pushes.subscribe()
    }

    pub fn trust(&self, id: TerminalId) -> Result<bool, TrustError> {
        if id == self.id() {
            return Err(TrustError::Myself(id));
        }
        let changed = self.shared.trust.trust(id)?;
        if changed {
            info!(peer = %id, "peer trusted");
        }
        Ok(changed)
    }

    /// Revokes `id` (DESIGN §7): it leaves the trust list (a config peer stays revoked until
    /// trusted again), and the home server ends its link and refuses every ticket this terminal
    /// issued it until now. Returns what the trust list did and whether the server removed a
    /// link (`None`: no server, or it could not be reached; the revocation is sent again on
    /// every connection to the server).
    pub async fn untrust(
        &self,
        id: TerminalId,
    ) -> Result<(crate::trust::Untrusted, ServerRevocation), TrustError> {
        if id == self.id() {
            return Err(TrustError::Myself(id));
        }
        let untrusted = self.shared.trust.untrust(id)?;
        info!(peer = %id, "peer revoked");
        if untrusted.in_config {
            warn!(peer = %id, "the config file still lists this revoked peer in [trust] peers; it stays revoked until `handoff trust`");
        }
        let revoked = self.revoke_at_server(id, untrusted.at).await;
        Ok((untrusted, revoked))
    }

    /// Asks the home server to end `id`'s link to this terminal at once and refuse the tickets
    /// issued it at or before `at`.
    pub(crate) async fn revoke_at_server(&self, id: TerminalId, at: u64) -> ServerRevocation {
        let Some(home) = self.shared.home.clone() else {
            return ServerRevocation::NoServer;
        };
        match tokio::time::timeout(
            Duration::from_secs(2),
            home.request(self, wire::RequestBody::Revoke { second: id, at }),
        )
        .await
        {
            Ok(Ok(wire::ResponseBody::Revoked { removed })) => ServerRevocation::Done { removed },
            Ok(Ok(wire::ResponseBody::Refused(refusal))) => {
                warn!(
                    "the server refused the revocation of {}: {refusal}",
                    id.short()
                );
                ServerRevocation::Refused(refusal.to_string())
            }
            Ok(Ok(other)) => {
                warn!("server answered Revoke with {other:?}");
                ServerRevocation::Unreachable
            }
            Ok(Err(e)) => {
                warn!("could not revoke {}'s link at the server: {e}", id.short());
                ServerRevocation::Unreachable
            }
            Err(_) => {
                warn!(
                    "the server did not answer the revocation of {} in time",
                    id.short()
                );
                ServerRevocation::Unreachable
            }
        }
    }

    /// The trust list: each ID with its source (`"config"` or `"added"`) and name, if discovered.
    pub fn trusted(&self) -> Vec<crate::control::TrustedRecord> {
        let peers = lock(&self.shared.peers);
        self.shared
            .trust
            .entries()
            .into_iter()
            .map(|(id, source)| crate::control::TrustedRecord {
                id: id.to_string(),
                source: source.to_string(),
                name: peers
                    .views()
                    .into_iter()
                    .find(|v| v.peer.id == id && v.name_proven)
                    .map(|v| v.peer.name),
            })
            .collect()
    }

    /// Resolves a CLI argument naming a peer: a known peer's name or ID prefix, or a full ID.
    /// This terminal's own name or ID prefix resolves to its own ID when no peer matches, so
    /// that `trust` and `untrust` can say it is this terminal's own.
    pub fn resolve_id(&self, query: &str) -> Result<TerminalId, crate::peer::FindError> {
        if let Ok(id) = query.trim().parse() {
            return Ok(id);
        }
        let found = lock(&self.shared.peers).find(query).map(|p| p.id);
        let query = query.trim();
        let me = self.id();
        let is_me = query == self.shared.config.name
            || (query.len() >= crate::peer::MIN_ID_PREFIX
                && me.to_string().starts_with(&query.to_ascii_lowercase()));
        match found {
            Err(crate::peer::FindError::NotFound(_)) if is_me => Ok(me),
            found => found,
        }
    }

    pub async fn inbox(&self) -> Result<Vec<PushRecord>, InboxError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.inbox.list())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    pub async fn status(&self) -> StatusRecord {
        let inbox = self.shared.inbox.len();
        let sh = &self.shared;
        StatusRecord {
            id: self.id().to_string(),
            name: sh.config.name.clone(),
            quic: self.quic_addr().to_string(),
            accept: match sh.trust.policy() {
                AcceptPolicy::Trusted => "trusted".into(),
                AcceptPolicy::Any => "any".into(),
            },
            server: sh.home.as_ref().map(|h| ServerStatus {
                id: h.server.id.to_string(),
                addrs: h.server.addrs.clone(),
                connected: h.is_connected(),
            }),
            peers: self.peers().len(),
            trusted: sh.trust.list().len(),
            inbox,
            session: self.session(),
            uptime_secs: sh.started.elapsed().as_secs(),
            follows: self
                .follows()
                .into_iter()
                .map(|(id, until)| crate::control::FollowRecord {
                    id: id.to_string(),
                    until,
                })
                .collect(),
            pair_requests: self
                .pair_requests()
                .iter()
                .map(|id| id.to_string())
                .collect(),
            counters: sh.metrics.snapshot(),
            metrics: lock(&sh.metrics_addr).map(|a| a.to_string()),
        }
    }

    /// Hands a push from `server` to the user, exactly once: inbox first (durably, skipping a
    /// push already delivered), then watchers, then the hook.
    pub(crate) async fn deliver(
        &self,
        server: ServerId,
        stream: Option<TerminalId>,
        epoch: u64,
        item: PushItem,
    ) {
        let record = PushRecord::from(item);
        let shared = self.shared.clone();
        let stored = record.clone();
        let append = move || {
            shared
                .inbox
                .append(&server, stream.as_ref(), epoch, &stored)
        };
        let fresh = match tokio::task::spawn_blocking(append).await {
            Ok(Ok(appended)) => {
                if let Some(limit) = appended.limit {
                    self.shared.metrics.add(
                        "handoff_inbox_dropped_total",
                        None,
                        appended.dropped as u64,
                    );
                    self.over_limit(
                        limit,
                        format_args!("the inbox dropped its {} oldest pushes", appended.dropped),
                    );
                }
                if appended.repeat {
                    debug!(
                        offset = record.offset,
                        "push repeats the inbox's newest from this terminal: kept once"
                    );
                }
                appended.fresh
            }
            Ok(Err(e)) => {
                warn!("push not kept in the inbox: {e}");
                true
            }
            Err(e) => {
                warn!("inbox task failed: {e}");
                true
            }
        };
        if !fresh {
            debug!(offset = record.offset, "push delivered before; not again");
            self.shared
                .metrics
                .inc("handoff_pushes_duplicate_total", None);
            return;
        }
        // Pushes come as fast as a publisher sends them: one line per interval at info (with
        // the count held back), every one at debug.
        let from = record.from.as_deref().unwrap_or("publisher");
        if let Some(suppressed) = self.shared.guards.log.check("push_received") {
            info!(from = %from, title = %record.title, offset = record.offset, suppressed, "push received");
        } else {
            debug!(from = %from, title = %record.title, offset = record.offset, "push received");
        }
        self.shared
            .metrics
            .inc("handoff_pushes_received_total", None);
        let _ = self.shared.pushes.send(record.clone());
        let hook = lock(&self.shared.live).on_push.clone();
        if !hook.is_empty() {
            self.run_hook(hook, record);
        }
    }

    fn run_hook(&self, hook: Vec<String>, record: PushRecord) {
        let schemes = lock(&self.shared.live).hook_schemes.clone();
        let argv = match crate::hook::argv(&hook, &record, &schemes) {
            Ok(argv) => argv,
            Err(refusal) => {
                self.shared.metrics.inc("handoff_hooks_refused_total", None);
                if let Some(suppressed) = self.shared.guards.log.check("hook_refused") {
                    warn!(
                        offset = record.offset,
                        suppressed, "on_push hook not run for this push: {refusal}"
                    );
                }
                return;
            }
        };
        // A place in the queue first, so pushes cannot pile up waiting for a slot.
        let Ok(queued) = self.shared.hook_queue.clone().try_acquire_owned() else {
            self.over_limit(
                "max_hook_queue",
                format_args!(
                    "on_push hook not run for offset {}: {} hooks wait already (the push is in \
                     the inbox)",
                    record.offset, self.shared.config.limits.max_hook_queue
                ),
            );
            return;
        };
        let slots = self.shared.hooks.clone();
        self.spawn(
            async move {
                let _queued = queued;
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                let mut command = tokio::process::Command::new(&argv[0]);
                command
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(false);
                match command.status().await {
                    Ok(status) if status.success() => debug!("on_push hook ran"),
                    Ok(status) => warn!(program = %argv[0], %status, "on_push hook failed"),
                    Err(e) => warn!(program = %argv[0], "cannot run on_push hook: {e}"),
                }
            },
            tracing::info_span!("hook"),
        );
    }

    /// The server link for `server`: the home link if it is our own server, else a link kept
    /// while follows on it live.
    /// The server link for `server`, with a follow marked in progress on it: the home link if
    /// it is our own server, else a link kept while follows on it live.
    pub(crate) fn link_for(&self, server: &ServerInfo) -> FollowInFlight {
        if let Some(home) = &self.shared.home {
            if home.server.id == server.id {
                return home.follow_started();
            }
        }
        let link = {
            let mut links = lock(&self.shared.links);
            // Peers name servers of their choosing: links nothing holds any more are dropped
            // before the map grows past a bound. Marked in progress under the same lock, so
            // the one handed out is never dropped while the follow uses it.
            if links.len() >= MAX_LINKS && !links.contains_key(&server.id) {
                links.retain(|_, link| !link.unused());
            }
            links
                .entry(server.id)
                .or_insert_with(|| Arc::new(ServerLink::new(server.clone(), false)))
                .follow_started()
        };
        // Each peer names the server's addresses in its own words; the latest are tried (after
        // the one last reached), so a peer that lied about them blocks no later pull.
        link.learn_addrs(&server.addrs);
        link
    }

    /// A client configuration pinning `expected`; built once per key.
    pub(crate) fn dial_config(
        &self,
        expected: TerminalId,
    ) -> Result<quinn::ClientConfig, tls::TlsError> {
        let mut cache = lock(&self.shared.dial_config);
        if let Some(config) = cache.get(&expected) {
            return Ok(config.clone());
        }
        let config = tls::client_config(&self.shared.identity, expected, DIAL_LIMITS)?;
        // Bounded: peers come and go, but the cache is cheap to rebuild.
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(expected, config.clone());
        Ok(config)
    }

    /// A token cancelled when the daemon shuts down.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shared.cancel.cancelled()
    }

    /// Stops the daemon in the documented order and waits for its tasks.
    pub async fn shutdown(&self) {
        info!("daemon shutting down");
        self.shared.cancel.cancel();
        if let Some(discovery) = self.shared.discovery.lock().await.take() {
            discovery.shutdown().await;
        }
        self.shared
            .endpoint
            .close(varint(ErrorCode::Shutdown), b"shutting down");
        let _ = std::fs::remove_file(&self.shared.config.control_socket);
        self.shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(3), self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not finish within 3 s");
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
        info!("daemon stopped");
    }
}

impl Daemon {
    /// A peer did not answer: ask mDNS at once whether it is still there.
    pub(crate) async fn suspect(&self, id: &TerminalId) {
        let instances = lock(&self.shared.peers).instances_of(id);
        if let Some(discovery) = self.shared.discovery.lock().await.as_ref() {
            for instance in instances {
                discovery.verify(&instance);
            }
        }
    }
}

/// Feeds mDNS events into the peer table until shutdown.
async fn browse(daemon: Daemon, discovery: Arc<Discovery>) {
    loop {
        let event = tokio::select! {
            _ = daemon.cancelled() => break,
            event = discovery.next() => event,
        };
        let Some(event) = event else { break };
        let kind = match &event {
            DiscoveryEvent::Resolved(_) => "resolved",
            DiscoveryEvent::Removed { .. } => "removed",
            DiscoveryEvent::Ignored { .. } => "ignored",
        };
        daemon
            .shared
            .metrics
            .inc("handoff_discovery_events_total", Some(("event", kind)));
        match event {
            DiscoveryEvent::Resolved(peer) => daemon.learn_peer(peer),
            DiscoveryEvent::Removed { instance } => daemon.forget_instance(&instance),
            DiscoveryEvent::Ignored { instance, reason } => daemon.log_limited(
                "ignored_advert",
                format_args!("ignoring mDNS advert {instance}: {reason}"),
            ),
        }
    }
}
