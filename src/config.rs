//! Configuration (DESIGN §8) in two layers: a serde mirror of the TOML that rejects unknown keys,
//! and validated structs of real types. Every error names the key it is about; the binary exits
//! with status 78 (EX_CONFIG) on any of them, so systemd does not restart into the same mistake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::identity::{ServerId, TerminalId};

/// sysexits' EX_CONFIG.
pub const EXIT_CONFIG: i32 = 78;

pub const DEFAULT_DAEMON_PORT: u16 = 47600;
pub const DEFAULT_SERVER_PORT: u16 = 47700;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A file or directory the config names is not fit for use (state_dir, key or token file).
    #[error("config key `{key}`: {source}")]
    File {
        key: &'static str,
        source: crate::files::FileError,
    },
}

fn file_problem(key: &'static str) -> impl FnOnce(crate::files::FileError) -> ConfigError {
    move |source| ConfigError::File { key, source }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// `path`, if absolute: a relative one would depend on the directory the program starts in
/// (a user unit starts in the home directory), and `~` is not expanded.
fn absolute(key: &'static str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        return Ok(path);
    }
    let hint = match path.strip_prefix("~") {
        Ok(rest) => match std::env::var_os("HOME") {
            Some(home) => format!(
                " (`~` is not expanded: write {})",
                Path::new(&home).join(rest).display()
            ),
            None => " (`~` is not expanded: write the home directory out)".to_string(),
        },
        Err(_) => String::new(),
    };
    Err(invalid(
        key,
        format!("{} is not an absolute path{hint}", path.display()),
    ))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message names the key and shows the offending line with a `^^^` under the
        // mistake, over several lines; they are kept.
        message: e.to_string().trim_end().to_string(),
    })
}

fn parse_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an address like 0.0.0.0:47600"),
        )
    })
}

fn parse_id(key: &'static str, text: &str) -> Result<TerminalId, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("{text:?} is not an id: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Daemon

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    name: Option<String>,
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    quic: RawQuic,
    server: Option<RawServerRef>,
    #[serde(default)]
    trust: RawTrust,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    follow: RawFollow,
    #[serde(default)]
    limits: RawDaemonLimits,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    player: RawPlayer,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    group: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// The default log filter of the long-running programs.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Level names a `[log] level` directive may end in.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `[log] level` filter (`info`, `debug`, `handoff=debug,warn`, ...). Each directive is a
/// level or `TARGET=LEVEL`: a bare word that is not a level (`verbose`) would parse as a target
/// name and silence everything else, so it is refused.
fn parse_log_level(raw: RawLog) -> Result<String, ConfigError> {
    let level = raw.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    let is_level = |word: &str| {
        let word = word.trim().to_ascii_lowercase();
        LOG_LEVELS.contains(&word.as_str())
    };
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(invalid(
            "log.level",
            format!("is empty; use a level ({})", LOG_LEVELS.join(", ")),
        ));
    }
    for directive in directives {
        let ok = match directive.rsplit_once('=') {
            Some((target, lvl)) => !target.trim().is_empty() && is_level(lvl),
            None => is_level(directive),
        };
        if !ok {
            return Err(invalid(
                "log.level",
                format!(
                    "{directive:?} in {level:?} is neither a level ({}) nor TARGET=LEVEL",
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| invalid("log.level", format!("{level:?} is not a log filter: {e}")))?;
    Ok(level)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFollow {
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    auto: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemonLimits {
    max_frame: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    handshakes_per_sec_per_source: Option<u32>,
    unknown_handshakes_per_sec: Option<u32>,
    requests_per_sec_per_peer: Option<u32>,
    pending_pairings: Option<usize>,
    max_inbox_items: Option<usize>,
    max_inbox_bytes: Option<u64>,
    max_hook_queue: Option<usize>,
    max_pending_handshakes: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    max_peers: Option<usize>,
    max_addrs_per_peer: Option<usize>,
    peer_checks_per_round: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    #[serde(default)]
    interfaces: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuic {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerRef {
    addr: Option<String>,
    addrs: Option<Vec<String>>,
    id: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    accept: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    lease_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    #[serde(default)]
    on_push: Vec<String>,
    schemes: Option<Vec<String>>,
}

/// Who may fetch this terminal's interface info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptPolicy {
    /// Only peers on the trust list (the default).
    Trusted,
    /// Anyone who completes the handshake (kiosks, demos; must be chosen explicitly).
    Any,
}

/// The content server a terminal is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRef {
    pub id: ServerId,
    /// `host:port` of every node; tried in order.
    pub addrs: Vec<String>,
}

/// A validated daemon configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub name: String,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Interface names for mDNS; empty means every multicast interface.
    pub interfaces: Vec<String>,
    pub listen: SocketAddr,
    pub server: Option<ServerRef>,
    pub accept: AcceptPolicy,
    pub trusted_peers: Vec<TerminalId>,
    /// How long a ticket this terminal signs stays valid (the link lease).
    pub lease: Duration,
    /// argv run for every push; `{uri}`, `{title}` and `{from}` are substituted (see
    /// [`crate::hook`]).
    pub on_push: Vec<String>,
    /// The uri schemes a push may have for the hook to get it (lowercase).
    pub hook_schemes: Vec<String>,
    /// Peers followed automatically whenever they are on the LAN.
    pub follow_peers: Vec<TerminalId>,
    /// Follow every trusted peer automatically.
    pub follow_auto: bool,
    pub limits: DaemonLimits,
    /// The log filter (`[log] level`); `RUST_LOG`, when set, wins over it.
    pub log_level: String,
    /// Where to serve Prometheus metrics over HTTP (`[metrics] listen`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The group whose members may use the control socket (`[control] group`); without it only
    /// the daemon's user and root may.
    pub control_group: Option<ControlGroup>,
    /// `[player]`: read by `handoff player`, not by the daemon.
    pub player: PlayerConfig,
}

/// `[control] group`, resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    pub name: String,
    pub gid: u32,
}

/// Bounds on what peers can make a daemon do; over a limit a request is refused or a connection
/// closed with an error code, counted in `handoff_limit_hits_total{limit=...}`, and logged at
/// most once per 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonLimits {
    /// Largest frame accepted, in bytes (at most the protocol's 65536).
    pub max_frame: usize,
    /// Concurrent request streams one peer connection may open.
    pub max_streams_per_connection: u32,
    /// Peer connections held at once.
    pub max_connections: usize,
    /// Peer connections held at once from one source address.
    pub max_connections_per_source: usize,
    /// New handshakes accepted per second from one source (before any key is known).
    /// Sources are IPv4 addresses and IPv6 /64 prefixes; addresses where a trusted key proved
    /// itself recently are exempt from per-source limits.
    pub handshakes_per_sec_per_source: u32,
    /// Completed handshakes per second from keys that are not on the trust list, per source.
    pub unknown_handshakes_per_sec: u32,
    /// Requests per second from one peer ID.
    pub requests_per_sec_per_peer: u32,
    /// Unsolicited pairing requests remembered at once.
    pub pending_pairings: usize,
    /// Pushes the inbox keeps; beyond it the oldest are dropped.
    pub max_inbox_items: usize,
    /// Bytes the inbox keeps (its file holds up to a quarter more before it is rewritten);
    /// beyond it the oldest pushes are dropped.
    pub max_inbox_bytes: u64,
    /// Pushes waiting for a free hook slot; beyond it a push runs no hook (it is still in the
    /// inbox and reaches `watch`).
    pub max_hook_queue: usize,
    /// Handshakes in progress at once. From half of it on, a source must prove its address
    /// (QUIC Retry) before its handshake starts; when all are taken, the oldest handshake from
    /// a source not known as trusted is dropped for the new one.
    pub max_pending_handshakes: usize,
    /// How long a peer has to complete its handshake.
    pub handshake_timeout: Duration,
    /// mDNS claims (peer adverts) held in the peer table. When it is full, claims that no
    /// handshake proved, of peers not on the trust list, make room first.
    pub max_peers: usize,
    /// Addresses kept per advert, and dialled or listed per peer.
    pub max_addrs_per_peer: usize,
    /// Peers checked per liveness round (every 10 s) by a QUIC handshake: new adverts, and
    /// verified peers whose last check is a round old.
    pub peer_checks_per_round: usize,
}

impl Default for DaemonLimits {
    fn default() -> Self {
        Self {
            max_frame: crate::wire::MAX_FRAME,
            max_streams_per_connection: 8,
            max_connections: 64,
            max_connections_per_source: 8,
            handshakes_per_sec_per_source: 20,
            unknown_handshakes_per_sec: 20,
            requests_per_sec_per_peer: 20,
            pending_pairings: 16,
            max_inbox_items: 1000,
            max_inbox_bytes: 8 * 1024 * 1024,
            max_hook_queue: 64,
            max_pending_handshakes: 32,
            handshake_timeout: Duration::from_secs(2),
            max_peers: 128,
            max_addrs_per_peer: 16,
            peer_checks_per_round: 32,
        }
    }
}

fn check_frame(key: &'static str, value: usize) -> Result<usize, ConfigError> {
    if !(256..=crate::wire::MAX_FRAME).contains(&value) {
        return Err(invalid(
            key,
            format!("must be between 256 and {}", crate::wire::MAX_FRAME),
        ));
    }
    Ok(value)
}

fn at_least_one<T: PartialOrd + From<u8> + Copy>(
    key: &'static str,
    value: T,
) -> Result<T, ConfigError> {
    if value < T::from(1) {
        return Err(invalid(key, "must be at least 1"));
    }
    Ok(value)
}

impl DaemonConfig {
    /// A configuration with every default, for programs that build one in code (the demo,
    /// tests): `interfaces` empty, listening on `[::]:47600`, no server, trusting nobody.
    pub fn with_defaults(name: &str, state_dir: PathBuf, control_socket: PathBuf) -> Self {
        let mut config = Self::validate(RawDaemon {
            name: Some(name.to_string()),
            ..RawDaemon::default()
        })
        .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}"));
        config.state_dir = state_dir;
        config.control_socket = control_socket;
        config
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawDaemon = parse(path, text)?;
        Self::validate(raw)
    }

    fn validate(raw: RawDaemon) -> Result<Self, ConfigError> {
        let name = match raw.name {
            Some(name) => name,
            None => default_name(),
        };
        if name.is_empty() || name.len() > crate::wire::txt::MAX_NAME_LEN {
            return Err(invalid("name", "must be 1 to 63 bytes"));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("name", "must not hold control characters"));
        }
        let listen = match raw.quic.listen {
            Some(text) => parse_addr("quic.listen", &text)?,
            None => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_DAEMON_PORT)),
        };
        let server = match raw.server {
            None => None,
            Some(s) => {
                let addrs = match (s.addr, s.addrs) {
                    (Some(_), Some(_)) => {
                        return Err(invalid("server.addrs", "give either `addr` or `addrs`"))
                    }
                    (Some(a), None) => vec![a],
                    (None, Some(list)) if !list.is_empty() => list,
                    _ => return Err(invalid("server.addr", "missing: the server's host:port")),
                };
                // Peers pulling from this terminal refuse more (they dial each in turn).
                if addrs.len() > 8 || addrs.iter().any(|a| a.len() > 255) {
                    return Err(invalid(
                        "server.addrs",
                        "at most 8 addresses, each at most 255 bytes",
                    ));
                }
                for addr in &addrs {
                    if !addr.contains(':') {
                        return Err(invalid(
                            "server.addr",
                            format!("{addr:?} has no port (host:port)"),
                        ));
                    }
                }
                let id = s.id.ok_or_else(|| invalid("server.id", "missing"))?;
                Some(ServerRef {
                    id: parse_id("server.id", &id)?,
                    addrs,
                })
            }
        };
        let accept = match raw.trust.accept.as_deref() {
            None | Some("trusted") => AcceptPolicy::Trusted,
            Some("any") => AcceptPolicy::Any,
            Some(other) => {
                return Err(invalid(
                    "trust.accept",
                    format!("{other:?} is neither \"trusted\" nor \"any\""),
                ))
            }
        };
        let trusted_peers = raw
            .trust
            .peers
            .iter()
            .map(|p| parse_id("trust.peers", p))
            .collect::<Result<_, _>>()?;
        let lease = Duration::from_secs(raw.trust.lease_secs.unwrap_or(600));
        if lease < Duration::from_secs(10) || lease > Duration::from_secs(86_400) {
            return Err(invalid(
                "trust.lease_secs",
                "must be between 10 and 86400 seconds",
            ));
        }
        for ifname in &raw.discovery.interfaces {
            if ifname.is_empty() || ifname.len() > 15 {
                return Err(invalid(
                    "discovery.interfaces",
                    format!("{ifname:?} is not an interface name"),
                ));
            }
        }
        if raw.hooks.on_push.first().is_some_and(|p| p.is_empty()) {
            return Err(invalid("hooks.on_push", "the program name is empty"));
        }
        let hook_schemes = match raw.hooks.schemes {
            None => crate::hook::DEFAULT_SCHEMES.map(String::from).to_vec(),
            Some(list) => {
                for scheme in &list {
                    if !crate::hook::is_scheme(scheme) {
                        return Err(invalid(
                            "hooks.schemes",
                            format!("{scheme:?} is not a URI scheme (e.g. \"https\")"),
                        ));
                    }
                }
                list.iter().map(|s| s.to_ascii_lowercase()).collect()
            }
        };
        let follow_peers = raw
            .follow
            .peers
            .iter()
            .map(|p| parse_id("follow.peers", p))
            .collect::<Result<_, _>>()?;
        let d = DaemonLimits::default();
        let l = raw.limits;
        let limits = DaemonLimits {
            max_frame: check_frame("limits.max_frame", l.max_frame.unwrap_or(d.max_frame))?,
            max_streams_per_connection: at_least_one(
                "limits.max_streams_per_connection",
                l.max_streams_per_connection
                    .unwrap_or(d.max_streams_per_connection),
            )?,
            max_connections: at_least_one(
                "limits.max_connections",
                l.max_connections.unwrap_or(d.max_connections),
            )?,
            max_connections_per_source: at_least_one(
                "limits.max_connections_per_source",
                l.max_connections_per_source
                    .unwrap_or(d.max_connections_per_source),
            )?,
            handshakes_per_sec_per_source: at_least_one(
                "limits.handshakes_per_sec_per_source",
                l.handshakes_per_sec_per_source
                    .unwrap_or(d.handshakes_per_sec_per_source),
            )?,
            unknown_handshakes_per_sec: at_least_one(
                "limits.unknown_handshakes_per_sec",
                l.unknown_handshakes_per_sec
                    .unwrap_or(d.unknown_handshakes_per_sec),
            )?,
            requests_per_sec_per_peer: at_least_one(
                "limits.requests_per_sec_per_peer",
                l.requests_per_sec_per_peer
                    .unwrap_or(d.requests_per_sec_per_peer),
            )?,
            pending_pairings: at_least_one(
                "limits.pending_pairings",
                l.pending_pairings.unwrap_or(d.pending_pairings),
            )?,
            max_inbox_items: at_least_one(
                "limits.max_inbox_items",
                l.max_inbox_items.unwrap_or(d.max_inbox_items),
            )?,
            max_inbox_bytes: l.max_inbox_bytes.unwrap_or(d.max_inbox_bytes),
            max_hook_queue: l.max_hook_queue.unwrap_or(d.max_hook_queue),
            max_pending_handshakes: match l.max_pending_handshakes {
                Some(n) if n < 2 => {
                    return Err(invalid(
                        "limits.max_pending_handshakes",
                        "must be at least 2",
                    ))
                }
                n => n.unwrap_or(d.max_pending_handshakes),
            },
            handshake_timeout: match l.handshake_timeout_secs {
                Some(secs) if !(1..=60).contains(&secs) => {
                    return Err(invalid(
                        "limits.handshake_timeout_secs",
                        "must be between 1 and 60",
                    ))
                }
                secs => secs.map_or(d.handshake_timeout, Duration::from_secs),
            },
            max_peers: at_least_one("limits.max_peers", l.max_peers.unwrap_or(d.max_peers))?,
            max_addrs_per_peer: at_least_one(
                "limits.max_addrs_per_peer",
                l.max_addrs_per_peer.unwrap_or(d.max_addrs_per_peer),
            )?,
            peer_checks_per_round: at_least_one(
                "limits.peer_checks_per_round",
                l.peer_checks_per_round.unwrap_or(d.peer_checks_per_round),
            )?,
        };
        // One push of the largest frame must fit, or the inbox could keep nothing.
        if limits.max_inbox_bytes < crate::wire::MAX_FRAME as u64 * 2 {
            return Err(invalid(
                "limits.max_inbox_bytes",
                format!(
                    "must be at least {} (two frames)",
                    crate::wire::MAX_FRAME * 2
                ),
            ));
        }
        let control_group = match raw.control.group {
            None => None,
            Some(name) => {
                let gid = crate::accounts::group_id(&name).ok_or_else(|| {
                    invalid(
                        "control.group",
                        format!("there is no group {name:?} on this system"),
                    )
                })?;
                Some(ControlGroup { name, gid })
            }
        };
        let state_dir = absolute(
            "state_dir",
            raw.state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/handoff")),
        )?;
        let control_socket = absolute(
            "control_socket",
            raw.control_socket
                .unwrap_or_else(|| PathBuf::from("/run/handoff/control.sock")),
        )?;
        Ok(Self {
            name,
            state_dir,
            control_socket,
            interfaces: raw.discovery.interfaces,
            listen,
            server,
            accept,
            trusted_peers,
            lease,
            on_push: raw.hooks.on_push,
            hook_schemes,
            follow_peers,
            follow_auto: raw.follow.auto,
            limits,
            log_level: parse_log_level(raw.log)?,
            metrics_listen: raw
                .metrics
                .listen
                .map(|text| parse_addr("metrics.listen", &text))
                .transpose()?,
            control_group,
            player: PlayerConfig::validate(raw.player)?,
        })
    }

    /// Checks the files this config names, as the daemon will use them: `state_dir` (if it
    /// exists: owned by this user, not writable by group or others) and its key file (mode
    /// 0600). `handoff config check` and the daemon run it before anything else.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        check_state_files(&self.state_dir)
    }

    /// What `handoff config check` reports: [`Self::check_files`]'s problems, except that a
    /// state_dir another user owns is a note (returned) rather than an error.
    pub fn check_files_as_admin(&self) -> Result<Vec<String>, ConfigError> {
        check_state_files_as_admin(&self.state_dir)
    }
}

/// `state_dir` and the key file in it, as [`crate::identity::Identity::load_or_create`] will
/// find them.
fn check_state_files(state_dir: &Path) -> Result<(), ConfigError> {
    crate::files::check_state_dir(state_dir).map_err(file_problem("state_dir"))?;
    crate::files::check_private_file(&state_dir.join(crate::identity::KEY_FILE), "key file")
        .map_err(file_problem("state_dir"))?;
    Ok(())
}

/// [`check_state_files`] for whoever checks a service's config (root, for a `DynamicUser=`
/// unit whose state_dir its transient user owns after the first start): another owner is a
/// note naming it, since only the program at start can tell whether it runs as that owner.
fn check_state_files_as_admin(state_dir: &Path) -> Result<Vec<String>, ConfigError> {
    let owner =
        crate::files::check_state_dir_of_any_owner(state_dir).map_err(file_problem("state_dir"))?;
    crate::files::check_private_file(&state_dir.join(crate::identity::KEY_FILE), "key file")
        .map_err(file_problem("state_dir"))?;
    Ok(owner
        .map(|uid| {
            format!(
                "state_dir {} is owned by {}, not by {} who runs this check: only that user may \
                 run handoff with this config (a DynamicUser= service's state directory is its \
                 transient user's; run as anyone else, the program refuses it and exits 78)",
                state_dir.display(),
                crate::accounts::describe_user(uid),
                crate::accounts::describe_user(crate::accounts::euid())
            )
        })
        .into_iter()
        .collect())
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "handoff".to_string())
}

// ---------------------------------------------------------------------------------------------
// Player (`handoff player`, see crate::player)

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlayer {
    share: Option<Vec<String>>,
    clear_on_stop: Option<bool>,
    position_poll_secs: Option<f64>,
    settle_secs: Option<f64>,
    open: Option<bool>,
    drive: Option<Vec<String>>,
    replace_playing: Option<bool>,
    #[serde(default)]
    command: Vec<String>,
    schemes: Option<Vec<String>>,
    load_timeout_secs: Option<f64>,
    tolerance_secs: Option<f64>,
}

/// `[player]`: how `handoff player` bridges the desktop's media players (MPRIS on the session
/// bus) and the daemon. Player patterns match the bus name after `org.mpris.MediaPlayer2.`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlayerConfig {
    /// Players whose playback becomes this terminal's session; empty shares nothing.
    pub share: Vec<String>,
    /// Clear the session when the shared player stops or quits (else the last one stays).
    pub clear_on_stop: bool,
    /// How often the position of a playing player is read (players do not signal it).
    pub position_poll: Duration,
    /// How long a player's track must stay unchanged before it is shared (players show
    /// provisional metadata while loading).
    pub settle: Duration,
    /// Open what followed terminals push in a player.
    pub open: bool,
    /// Players that may be told to open a push.
    pub drive: Vec<String>,
    /// Take over a player that is playing something else.
    pub replace_playing: bool,
    /// argv started when no player to drive is running; empty starts nothing.
    pub command: Vec<String>,
    /// URI schemes shared and opened (lowercase).
    pub schemes: Vec<String>,
    /// How long a player may take to load a pushed URI (or to appear after `command`).
    pub load_timeout: Duration,
    /// Position differences up to this are not changes (neither shared nor followed).
    pub tolerance: Duration,
}

impl Default for PlayerConfig {
    fn default() -> Self {
        Self::validate(RawPlayer::default())
            .unwrap_or_else(|e| unreachable!("the player defaults are valid: {e}"))
    }
}

impl PlayerConfig {
    fn validate(raw: RawPlayer) -> Result<Self, ConfigError> {
        fn patterns(
            key: &'static str,
            list: Option<Vec<String>>,
        ) -> Result<Vec<String>, ConfigError> {
            let list = list.unwrap_or_else(|| vec!["*".to_string()]);
            for pattern in &list {
                let valid = !pattern.is_empty()
                    && pattern.len() <= 255
                    && pattern
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '*'));
                if !valid {
                    return Err(invalid(
                        key,
                        format!("{pattern:?} is not a player name pattern (e.g. \"mpv\", \"vlc\", \"*\")"),
                    ));
                }
            }
            Ok(list)
        }
        fn secs(
            key: &'static str,
            value: Option<f64>,
            default: f64,
            min: f64,
            max: f64,
        ) -> Result<Duration, ConfigError> {
            let value = value.unwrap_or(default);
            if !(min..=max).contains(&value) {
                return Err(invalid(
                    key,
                    format!("must be between {min} and {max} seconds"),
                ));
            }
            Ok(Duration::from_secs_f64(value))
        }
        if raw.command.first().is_some_and(|p| p.is_empty()) {
            return Err(invalid("player.command", "the program name is empty"));
        }
        let schemes = match raw.schemes {
            None => crate::hook::DEFAULT_SCHEMES.map(String::from).to_vec(),
            Some(list) => {
                for scheme in &list {
                    if !crate::hook::is_scheme(scheme) {
                        return Err(invalid(
                            "player.schemes",
                            format!("{scheme:?} is not a URI scheme (e.g. \"https\")"),
                        ));
                    }
                }
                list.iter().map(|s| s.to_ascii_lowercase()).collect()
            }
        };
        Ok(Self {
            share: patterns("player.share", raw.share)?,
            clear_on_stop: raw.clear_on_stop.unwrap_or(true),
            position_poll: secs(
                "player.position_poll_secs",
                raw.position_poll_secs,
                5.0,
                0.5,
                600.0,
            )?,
            settle: secs("player.settle_secs", raw.settle_secs, 1.0, 0.0, 30.0)?,
            open: raw.open.unwrap_or(true),
            drive: patterns("player.drive", raw.drive)?,
            replace_playing: raw.replace_playing.unwrap_or(false),
            command: raw.command,
            schemes,
            load_timeout: secs(
                "player.load_timeout_secs",
                raw.load_timeout_secs,
                20.0,
                1.0,
                300.0,
            )?,
            tolerance: secs("player.tolerance_secs", raw.tolerance_secs, 2.0, 0.5, 60.0)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Server

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    quic: RawQuic,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    limits: RawServerLimits,
    http: Option<RawHttp>,
    #[serde(default)]
    push: RawPush,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPush {
    default_ttl_secs: Option<u64>,
    max_ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    url: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServerLimits {
    max_lease_secs: Option<u64>,
    max_connections: Option<usize>,
    replay_cache: Option<usize>,
    max_frame: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_connections_per_source: Option<usize>,
    handshakes_per_sec_per_source: Option<u32>,
    max_pending_handshakes: Option<usize>,
    requests_per_sec_per_terminal: Option<u32>,
    requests_per_sec_per_source: Option<u32>,
    session_bytes_per_sec_per_source: Option<u32>,
    idle_terminal_secs: Option<u64>,
    known_terminals_per_source: Option<usize>,
    revocations_per_terminal: Option<usize>,
    http_max_connections: Option<usize>,
    http_max_header_bytes: Option<usize>,
    http_header_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    push_stall_secs: Option<u64>,
}

/// Where the server keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// In memory: lost on restart (tests, demos).
    Memory,
    /// redb in `state_dir/store.redb`: durable, one process (the default).
    Embedded,
    /// A Redis server shared by every server node of a deployment (`store.url`).
    Redis { url: RedisUrl },
}

/// The schemes `store.url` accepts: TCP, TLS, and a Unix socket (two spellings).
const REDIS_SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];

/// A Redis URL as `store.url` gives it. It may carry a password, so `Debug` and `Display` show
/// it redacted ([`redact_url`]); only [`RedisUrl::expose_secret`] gives the real text, for the
/// client that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Checks that `text` is a Redis URL the client can use (without connecting).
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = redact_url(text);
        if !REDIS_SCHEMES.iter().any(|s| text.starts_with(s)) {
            return Err(format!(
                "{shown:?} is not a redis://, rediss://, redis+unix:// or unix:// URL"
            ));
        }
        // The client's own parser decides what it can connect to; its messages never repeat
        // the URL, so they are safe to show.
        redis::IntoConnectionInfo::into_connection_info(text)
            .map_err(|e| format!("{shown:?} is not a usable Redis URL: {e}"))?;
        Ok(Self(text.to_string()))
    }

    /// The URL with its password, for the Redis client only: never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({:?})", redact_url(&self.0))
    }
}

/// Query keys whose values the Redis client reads and that never carry a secret. Every other
/// query value is redacted, whatever its key (the client may learn new ones).
const REDIS_PLAIN_QUERY_KEYS: [&str; 2] = ["db", "protocol"];

/// `url` with everything that can carry a secret replaced by `***`: the password in the user
/// info (`redis://user:pass@host` → `redis://user:***@host`) and every query value but `db` and
/// `protocol` (Unix socket URLs carry the password as `pass=`).
///
/// The URL is parsed the way the Redis client parses it ([`redis::parse_redis_url`]), so what
/// is hidden is what the client would use: query keys are percent-decoded (`?%70ass=x` is
/// `pass`) and shown decoded. A URL the client cannot parse (it would not connect with it) is
/// redacted by text, hiding too much rather than too little.
pub fn redact_url(url: &str) -> String {
    let Some(mut parsed) = redis::parse_redis_url(url) else {
        return redact_unparsed_url(url);
    };
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return redact_unparsed_url(url);
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if REDIS_PLAIN_QUERY_KEYS.contains(&k.as_ref()) {
                    v.into_owned()
                } else {
                    "***".to_string()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// [`redact_url`] for text that is not a URL the client accepts: every query value but the
/// plain ones, and everything between the first `:` after `://` and the last `@`.
fn redact_unparsed_url(url: &str) -> String {
    // Query parameters first, so an `@` inside a password there cannot mislead the second step.
    let url = match url.split_once('?') {
        Some((head, tail)) => {
            let (query, fragment) = match tail.find('#') {
                Some(h) => tail.split_at(h),
                None => (tail, ""),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if REDIS_PLAIN_QUERY_KEYS.contains(&k) && !v.contains('%') => {
                        pair.to_string()
                    }
                    Some((k, _)) => format!("{k}=***"),
                    None => pair.to_string(),
                })
                .collect();
            format!("{head}?{}{fragment}", pairs.join("&"))
        }
        None => url.to_string(),
    };
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url;
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url;
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}***{}",
            &url[..scheme_end],
            &rest[..=colon],
            &rest[at..]
        ),
        None => url,
    }
}

/// The HTTP listener: publish API, `/healthz`, `/metrics`.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// File holding the publish API's bearer token (mode 0600). Without it the publish API
    /// answers 401 to everyone; `/healthz` and `/metrics` need no token.
    pub token_file: Option<PathBuf>,
}

/// Lifetimes of pushes in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushConfig {
    /// TTL of a push that names none (session pushes included).
    pub default_ttl: Duration,
    /// Longest TTL a publisher may ask for.
    pub max_ttl: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(86_400),
            max_ttl: Duration::from_secs(7 * 86_400),
        }
    }
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub store: StoreKind,
    pub limits: ServerLimits,
    pub http: Option<HttpConfig>,
    pub push: PushConfig,
    /// The log filter (`[log] level`); `RUST_LOG`, when set, wins over it.
    pub log_level: String,
}

impl ServerConfig {
    /// A configuration with every default but the store (tests, the demo, benchmarks).
    pub fn with_defaults(state_dir: PathBuf, listen: SocketAddr, store: StoreKind) -> Self {
        Self {
            state_dir,
            listen,
            store,
            limits: ServerLimits::default(),
            http: None,
            push: PushConfig::default(),
            log_level: DEFAULT_LOG_LEVEL.to_string(),
        }
    }
}

impl ServerConfig {
    /// Keys whose value differs in `new` but apply only after a restart (everything but the
    /// log level, which is reloadable).
    pub fn needs_restart(&self, new: &ServerConfig) -> Vec<&'static str> {
        let http = |c: &ServerConfig| c.http.as_ref().map(|h| (h.listen, h.token_file.clone()));
        [
            ("state_dir", self.state_dir != new.state_dir),
            ("quic.listen", self.listen != new.listen),
            ("store", self.store != new.store),
            ("http", http(self) != http(new)),
            ("push", self.push != new.push),
            ("limits", self.limits != new.limits),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
    }
}

/// Bounds on what terminals can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Longest link a ticket may ask for; a ticket valid for longer (from its issue time) is
    /// refused, so its nonce never needs remembering for longer than this.
    pub max_lease: Duration,
    /// Terminal connections held at once.
    pub max_connections: usize,
    /// Live tickets remembered for replay protection, per first terminal (tickets strangers
    /// mint between their own keys fill only their own quota).
    pub replay_cache: usize,
    /// Largest frame accepted, in bytes (at most the protocol's 65536).
    pub max_frame: usize,
    /// Concurrent request streams one terminal connection may open.
    pub max_streams_per_connection: u32,
    /// Connections held at once from one source (an IPv4 address, an IPv6 /64).
    pub max_connections_per_source: usize,
    /// New handshakes accepted per second from one source (the same).
    pub handshakes_per_sec_per_source: u32,
    /// Handshakes in progress at once. From half of it on, a source must prove its address
    /// (QUIC Retry) before its handshake starts; when all are taken, the oldest is dropped for
    /// the new one (a real handshake takes a round trip or two, a stalled one is an attack's).
    pub max_pending_handshakes: usize,
    /// Requests per second from one terminal ID.
    pub requests_per_sec_per_terminal: u32,
    /// Requests per second from all terminals of one source network together (one host may
    /// hold `known_terminals_per_source` keys, each with its own per-terminal rate).
    pub requests_per_sec_per_source: u32,
    /// Bytes per second that sessions from one source network (an IPv4 address, an IPv6 /64)
    /// may have stored: a change costs its size twice (the session and the one push its
    /// followers read), a follow the session it copies, a resync the sessions it copies (each
    /// at most this much, so any one fits). Bounds what a host's keys can make the store write.
    pub session_bytes_per_sec_per_source: u32,
    /// How long the store keeps a terminal that is neither connected nor linked (its
    /// known-terminal entry and its session).
    pub idle_terminal: Duration,
    /// Distinct terminals one source network (an IPv4 address, an IPv6 /64) may have known to
    /// this server node within `idle_terminal`.
    pub known_terminals_per_source: usize,
    /// Live revocations one first terminal may have stored (each names a second terminal of
    /// its choosing, so without a bound one terminal could fill the store).
    pub revocations_per_terminal: usize,
    /// HTTP connections held at once; at the cap a new one takes the place of the connection
    /// that has waited longest for a request.
    pub http_max_connections: usize,
    /// Most bytes of request line and headers one request may have (each connection buffers
    /// them until they are complete); more are answered 431.
    pub http_max_header_bytes: usize,
    /// Longest wait for a request's headers (also on an idle keep-alive connection).
    pub http_header_timeout: Duration,
    /// Longest wait for a request's body.
    pub http_body_timeout: Duration,
    /// Longest a terminal may leave its push stream unread while pushes wait for it; then its
    /// connection is closed (it reconnects and resumes where it left off).
    pub push_stall: Duration,
}

/// The bounds of `limits.http_max_header_bytes` (the HTTP library needs at least 8 KiB).
pub const MIN_HTTP_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_HTTP_HEADER_BYTES: usize = 1024 * 1024;

/// The shortest `limits.idle_terminal_secs`: connected terminals are marked seen once a minute.
pub const MIN_IDLE_TERMINAL: Duration = Duration::from_secs(300);

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_lease: Duration::from_secs(3600),
            max_connections: 20_000,
            replay_cache: 16_384,
            max_frame: crate::wire::MAX_FRAME,
            max_streams_per_connection: 4,
            max_connections_per_source: 256,
            handshakes_per_sec_per_source: 200,
            max_pending_handshakes: 1024,
            requests_per_sec_per_terminal: 100,
            requests_per_sec_per_source: 1000,
            session_bytes_per_sec_per_source: 4 * 1024 * 1024,
            idle_terminal: Duration::from_secs(7 * 86_400),
            known_terminals_per_source: 256,
            revocations_per_terminal: 1024,
            http_max_connections: 1024,
            http_max_header_bytes: 16 * 1024,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            push_stall: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawServer = parse(path, text)?;
        let listen = match raw.quic.listen {
            Some(text) => parse_addr("quic.listen", &text)?,
            None => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_SERVER_PORT)),
        };
        let store = match (raw.store.kind.as_deref(), raw.store.url) {
            (None | Some("embedded"), None) => StoreKind::Embedded,
            (Some("memory"), None) => StoreKind::Memory,
            (Some("redis"), Some(url)) => StoreKind::Redis {
                url: RedisUrl::parse(&url).map_err(|reason| invalid("store.url", reason))?,
            },
            (Some("redis"), None) => return Err(invalid(
                "store.url",
                "missing: kind = \"redis\" needs the server's URL, e.g. \"redis://10.0.0.7:6379\"",
            )),
            (None | Some("embedded" | "memory"), Some(_)) => {
                return Err(invalid("store.url", "only used with kind = \"redis\""))
            }
            (Some(other), _) => {
                return Err(invalid(
                    "store.kind",
                    format!("{other:?} is not \"embedded\", \"memory\" or \"redis\""),
                ))
            }
        };
        let http = match raw.http {
            None => None,
            Some(h) => Some(HttpConfig {
                listen: parse_addr(
                    "http.listen",
                    h.listen.as_deref().unwrap_or("127.0.0.1:47780"),
                )?,
                token_file: h.token_file,
            }),
        };
        let push_defaults = PushConfig::default();
        let push = PushConfig {
            default_ttl: raw
                .push
                .default_ttl_secs
                .map(Duration::from_secs)
                .unwrap_or(push_defaults.default_ttl),
            max_ttl: raw
                .push
                .max_ttl_secs
                .map(Duration::from_secs)
                .unwrap_or(push_defaults.max_ttl),
        };
        if push.default_ttl.is_zero() {
            return Err(invalid("push.default_ttl_secs", "must be at least 1"));
        }
        if push.max_ttl < push.default_ttl {
            return Err(invalid(
                "push.max_ttl_secs",
                "must be at least push.default_ttl_secs",
            ));
        }
        let defaults = ServerLimits::default();
        let limits = ServerLimits {
            max_lease: raw
                .limits
                .max_lease_secs
                .map(Duration::from_secs)
                .unwrap_or(defaults.max_lease),
            max_connections: raw
                .limits
                .max_connections
                .unwrap_or(defaults.max_connections),
            replay_cache: raw.limits.replay_cache.unwrap_or(defaults.replay_cache),
            max_frame: check_frame(
                "limits.max_frame",
                raw.limits.max_frame.unwrap_or(defaults.max_frame),
            )?,
            max_streams_per_connection: at_least_one(
                "limits.max_streams_per_connection",
                raw.limits
                    .max_streams_per_connection
                    .unwrap_or(defaults.max_streams_per_connection),
            )?,
            max_connections_per_source: at_least_one(
                "limits.max_connections_per_source",
                raw.limits
                    .max_connections_per_source
                    .unwrap_or(defaults.max_connections_per_source),
            )?,
            handshakes_per_sec_per_source: at_least_one(
                "limits.handshakes_per_sec_per_source",
                raw.limits
                    .handshakes_per_sec_per_source
                    .unwrap_or(defaults.handshakes_per_sec_per_source),
            )?,
            max_pending_handshakes: match raw.limits.max_pending_handshakes {
                Some(n) if n < 2 => {
                    return Err(invalid(
                        "limits.max_pending_handshakes",
                        "must be at least 2",
                    ))
                }
                n => n.unwrap_or(defaults.max_pending_handshakes),
            },
            requests_per_sec_per_terminal: at_least_one(
                "limits.requests_per_sec_per_terminal",
                raw.limits
                    .requests_per_sec_per_terminal
                    .unwrap_or(defaults.requests_per_sec_per_terminal),
            )?,
            requests_per_sec_per_source: at_least_one(
                "limits.requests_per_sec_per_source",
                raw.limits
                    .requests_per_sec_per_source
                    .unwrap_or(defaults.requests_per_sec_per_source),
            )?,
            session_bytes_per_sec_per_source: match raw.limits.session_bytes_per_sec_per_source {
                Some(n) if (n as usize) < crate::wire::MAX_FRAME => {
                    return Err(invalid(
                        "limits.session_bytes_per_sec_per_source",
                        format!("must be at least {} (one frame)", crate::wire::MAX_FRAME),
                    ))
                }
                n => n.unwrap_or(defaults.session_bytes_per_sec_per_source),
            },
            idle_terminal: raw
                .limits
                .idle_terminal_secs
                .map(Duration::from_secs)
                .unwrap_or(defaults.idle_terminal),
            known_terminals_per_source: at_least_one(
                "limits.known_terminals_per_source",
                raw.limits
                    .known_terminals_per_source
                    .unwrap_or(defaults.known_terminals_per_source),
            )?,
            revocations_per_terminal: at_least_one(
                "limits.revocations_per_terminal",
                raw.limits
                    .revocations_per_terminal
                    .unwrap_or(defaults.revocations_per_terminal),
            )?,
            http_max_connections: at_least_one(
                "limits.http_max_connections",
                raw.limits
                    .http_max_connections
                    .unwrap_or(defaults.http_max_connections),
            )?,
            http_max_header_bytes: match raw.limits.http_max_header_bytes {
                Some(n) if !(MIN_HTTP_HEADER_BYTES..=MAX_HTTP_HEADER_BYTES).contains(&n) => {
                    return Err(invalid(
                        "limits.http_max_header_bytes",
                        format!(
                            "must be between {MIN_HTTP_HEADER_BYTES} and {MAX_HTTP_HEADER_BYTES}"
                        ),
                    ))
                }
                n => n.unwrap_or(defaults.http_max_header_bytes),
            },
            http_header_timeout: Duration::from_secs(at_least_one(
                "limits.http_header_timeout_secs",
                raw.limits
                    .http_header_timeout_secs
                    .unwrap_or(defaults.http_header_timeout.as_secs()),
            )?),
            http_body_timeout: Duration::from_secs(at_least_one(
                "limits.http_body_timeout_secs",
                raw.limits
                    .http_body_timeout_secs
                    .unwrap_or(defaults.http_body_timeout.as_secs()),
            )?),
            push_stall: Duration::from_secs(at_least_one(
                "limits.push_stall_secs",
                raw.limits
                    .push_stall_secs
                    .unwrap_or(defaults.push_stall.as_secs()),
            )?),
        };
        if limits.idle_terminal < MIN_IDLE_TERMINAL {
            return Err(invalid(
                "limits.idle_terminal_secs",
                format!("must be at least {}", MIN_IDLE_TERMINAL.as_secs()),
            ));
        }
        if limits.max_lease < Duration::from_secs(10) {
            return Err(invalid("limits.max_lease_secs", "must be at least 10"));
        }
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if limits.replay_cache == 0 {
            return Err(invalid("limits.replay_cache", "must be at least 1"));
        }
        Ok(Self {
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/handoff-server")),
            listen,
            store,
            limits,
            http,
            push,
            log_level: parse_log_level(raw.log)?,
        })
    }

    /// Checks the files this config names, as the server will use them: `state_dir` and its key
    /// file (as for the daemon) and the token file (readable, mode 0600, not empty; from
    /// systemd's credentials directory when it holds the file's base name).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        check_state_files(&self.state_dir)?;
        self.check_token_file()
    }

    /// What `handoff config check` reports: [`Self::check_files`]'s problems, except that a
    /// state_dir another user owns is a note (returned) rather than an error.
    pub fn check_files_as_admin(&self) -> Result<Vec<String>, ConfigError> {
        let notes = check_state_files_as_admin(&self.state_dir)?;
        self.check_token_file()?;
        Ok(notes)
    }

    fn check_token_file(&self) -> Result<(), ConfigError> {
        if let Some(token_file) = self.http.as_ref().and_then(|h| h.token_file.as_deref()) {
            crate::files::read_secret(token_file, "token file")
                .map_err(file_problem("http.token_file"))?;
        }
        Ok(())
    }
}

/// Which program a config file is for, judged by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Daemon,
    Server,
}

/// Top-level keys only a daemon config has.
const DAEMON_KEYS: [&str; 9] = [
    "name",
    "control_socket",
    "discovery",
    "server",
    "trust",
    "hooks",
    "follow",
    "metrics",
    "control",
];
/// Top-level keys only a server config has.
const SERVER_KEYS: [&str; 3] = ["store", "http", "push"];
/// `[limits]` keys only a daemon config has.
const DAEMON_LIMITS: [&str; 6] = [
    "unknown_handshakes_per_sec",
    "requests_per_sec_per_peer",
    "pending_pairings",
    "max_inbox_items",
    "max_inbox_bytes",
    "max_hook_queue",
];
/// `[limits]` keys only a server config has.
const SERVER_LIMITS: [&str; 3] = [
    "max_lease_secs",
    "replay_cache",
    "requests_per_sec_per_terminal",
];

/// Guesses whether `text` configures a daemon or a server from the keys only one of them has;
/// `None` when they do not tell (a file valid for both, or one that does not parse).
pub fn guess_kind(text: &str) -> Option<ConfigKind> {
    let table = text.parse::<toml::Table>().ok()?;
    let count = |keys: &[&str], table: &toml::Table| {
        keys.iter().filter(|k| table.contains_key(**k)).count()
    };
    let limits = table.get("limits").and_then(|l| l.as_table());
    let mut daemon = count(&DAEMON_KEYS, &table);
    let mut server = count(&SERVER_KEYS, &table);
    if let Some(limits) = limits {
        daemon += count(&DAEMON_LIMITS, limits);
        server += count(&SERVER_LIMITS, limits);
    }
    match daemon.cmp(&server) {
        std::cmp::Ordering::Greater => Some(ConfigKind::Daemon),
        std::cmp::Ordering::Less => Some(ConfigKind::Server),
        std::cmp::Ordering::Equal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::from_toml(Path::new("test.toml"), text)
    }

    fn server(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::from_toml(Path::new("test.toml"), text)
    }

    /// The shipped daemon.toml, whose `[control] group` is the `handoff` group the package
    /// creates, pointed at this process's own group so that it loads on any machine.
    fn shipped_daemon() -> DaemonConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/daemon.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let line = "\ngroup = \"handoff\"\n";
        assert_eq!(
            text.matches(line).count(),
            1,
            "the example names group handoff"
        );
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let mine = crate::accounts::group_name(gid).unwrap();
        let text = text.replace(line, &format!("\ngroup = \"{mine}\"\n"));
        let d = DaemonConfig::from_toml(&path, &text).unwrap();
        assert_eq!(d.control_group.as_ref().map(|g| g.gid), Some(gid));
        d
    }

    #[test]
    fn shipped_examples_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let d = shipped_daemon();
        assert_eq!(d.accept, AcceptPolicy::Trusted);
        assert!(d.server.is_some());
        // The example documents every limit with its default.
        assert_eq!(d.limits, DaemonLimits::default());
        let s = ServerConfig::load(&root.join("server.toml")).unwrap();
        assert_eq!(s.listen.port(), DEFAULT_SERVER_PORT);
        assert_eq!(s.store, StoreKind::Embedded);
        assert_eq!(s.http.as_ref().map(|h| h.listen.port()), Some(47780));
        assert_eq!(s.push, PushConfig::default());
        assert_eq!(
            s.limits,
            ServerLimits::default(),
            "the example shows the defaults"
        );
        let text = std::fs::read_to_string(root.join("server.toml")).unwrap();
        assert_eq!(guess_kind(&text), Some(ConfigKind::Server));
        let text = std::fs::read_to_string(root.join("daemon.toml")).unwrap();
        assert_eq!(guess_kind(&text), Some(ConfigKind::Daemon));
    }

    /// `[hooks] schemes`: the default, a valid list (lowercased), and a bad scheme refused
    /// naming the key; the shipped example shows the key with its default.
    #[test]
    fn hook_schemes_are_checked() {
        assert_eq!(daemon("").unwrap().hook_schemes, ["http", "https"]);
        let d = daemon("[hooks]\nschemes = [\"HTTPS\", \"magnet\", \"web+x\"]").unwrap();
        assert_eq!(d.hook_schemes, ["https", "magnet", "web+x"]);
        for bad in ["ht tp", "", "1http", "http:"] {
            match daemon(&format!("[hooks]\nschemes = [\"https\", {bad:?}]")) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "hooks.schemes"),
                other => panic!("{bad:?}: expected an error on hooks.schemes, got {other:?}"),
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let text = std::fs::read_to_string(root.join("daemon.toml")).unwrap();
        let hooks = text
            .split("[hooks]")
            .nth(1)
            .unwrap()
            .split("\n[")
            .next()
            .unwrap();
        assert!(
            hooks.contains("\nschemes = [\"http\", \"https\"]"),
            "config/daemon.toml shows [hooks] schemes with its default:{hooks}"
        );
    }

    #[test]
    fn daemon_abuse_limits_are_checked() {
        let d = daemon("[limits]\nmax_peers = 5\nhandshake_timeout_secs = 3\n").unwrap();
        assert_eq!(d.limits.max_peers, 5);
        assert_eq!(d.limits.handshake_timeout, Duration::from_secs(3));
        for (text, key) in [
            (
                "handshake_timeout_secs = 0",
                "limits.handshake_timeout_secs",
            ),
            (
                "max_pending_handshakes = 1",
                "limits.max_pending_handshakes",
            ),
            ("max_peers = 0", "limits.max_peers"),
            ("max_addrs_per_peer = 0", "limits.max_addrs_per_peer"),
            ("peer_checks_per_round = 0", "limits.peer_checks_per_round"),
        ] {
            let err = daemon(&format!("[limits]\n{text}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn defaults_are_sane() {
        let d = daemon("").unwrap();
        assert_eq!(d.listen.port(), DEFAULT_DAEMON_PORT);
        assert_eq!(d.accept, AcceptPolicy::Trusted);
        assert!(d.server.is_none());
        assert_eq!(d.lease, Duration::from_secs(600));
        assert_eq!(d.log_level, "info");
        assert_eq!(d.metrics_listen, None);
    }

    #[test]
    fn state_dir_and_control_socket_must_be_absolute() {
        for (text, key) in [
            ("state_dir = \"~/.local/state/handoff\"", "state_dir"),
            ("state_dir = \"state\"", "state_dir"),
            ("control_socket = \"run/control.sock\"", "control_socket"),
        ] {
            match daemon(text) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{text}");
                    assert!(reason.contains("not an absolute path"), "{reason}");
                    if text.contains('~') {
                        assert!(reason.contains("`~` is not expanded"), "{reason}");
                    }
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let d = daemon("state_dir = \"/home/u/.local/state/handoff\"").unwrap();
        assert_eq!(d.state_dir, PathBuf::from("/home/u/.local/state/handoff"));
    }

    #[test]
    fn log_level_and_metrics_listener_are_checked() {
        let d =
            daemon("[log]\nlevel = \"handoff=debug,warn\"\n[metrics]\nlisten = \"127.0.0.1:9\"")
                .unwrap();
        assert_eq!(d.log_level, "handoff=debug,warn");
        assert_eq!(d.metrics_listen, Some("127.0.0.1:9".parse().unwrap()));
        match daemon("[log]\nlevel = \"loud=[\"") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "log.level"),
            other => panic!("{other:?}"),
        }
        match daemon("[metrics]\nlisten = \"9100\"") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "metrics.listen"),
            other => panic!("{other:?}"),
        }
        match server("[log]\nlevel = \"a=b=c\"") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "log.level"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_group_and_local_bounds_are_checked() {
        let d = daemon("[control]\ngroup = \"root\"").unwrap();
        assert_eq!(
            d.control_group,
            Some(ControlGroup {
                name: "root".into(),
                gid: 0
            })
        );
        assert_eq!(daemon("").unwrap().control_group, None);
        for (text, key) in [
            ("[control]\ngroup = \"no-such-group-here\"", "control.group"),
            ("[limits]\nmax_inbox_items = 0", "limits.max_inbox_items"),
            ("[limits]\nmax_inbox_bytes = 1000", "limits.max_inbox_bytes"),
        ] {
            match daemon(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(daemon("[control]\ngrp = \"x\"")
            .unwrap_err()
            .to_string()
            .contains("grp"));
        let d = daemon("[limits]\nmax_inbox_items = 5\nmax_hook_queue = 0").unwrap();
        assert_eq!(d.limits.max_inbox_items, 5);
        assert_eq!(d.limits.max_hook_queue, 0);
        // A log level that is no level would silence every line: refused.
        for bad in ["verbose", "", "handoff=loud", "info,,chatty"] {
            match daemon(&format!("[log]\nlevel = \"{bad}\"")) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "log.level", "{bad}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in [
            "warn",
            "DEBUG",
            "handoff=debug,warn",
            "handoff::daemon=trace,off",
        ] {
            assert!(
                daemon(&format!("[log]\nlevel = \"{good}\"")).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = daemon("nmae = \"x\"").unwrap_err().to_string();
        assert!(err.contains("nmae"), "{err}");
        let err = daemon("[quic]\nlisten = \"0.0.0.0:1\"\nport = 3").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = server("[store]\nknd = \"memory\"").unwrap_err();
        assert!(err.to_string().contains("knd"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("[quic]\nlisten = \"nope\"", "quic.listen"),
            ("[trust]\naccept = \"everyone\"", "trust.accept"),
            ("[trust]\npeers = [\"abc\"]", "trust.peers"),
            ("[server]\naddr = \"127.0.0.1:1\"", "server.id"),
            ("[server]\nid = \"x\"", "server.addr"),
            (
                "[server]\naddrs = [\"a:1\",\"a:1\",\"a:1\",\"a:1\",\"a:1\",\"a:1\",\"a:1\",\"a:1\",\"a:1\"]",
                "server.addrs",
            ),
            ("name = \"\"", "name"),
        ];
        for (text, key) in cases {
            match daemon(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
        match server("[store]\nkind = \"floppy\"") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "store.kind"),
            other => panic!("{other:?}"),
        }
        for (text, key) in [
            (
                "[limits]\nidle_terminal_secs = 299",
                "limits.idle_terminal_secs",
            ),
            (
                "[limits]\nknown_terminals_per_source = 0",
                "limits.known_terminals_per_source",
            ),
            (
                "[limits]\nrevocations_per_terminal = 0",
                "limits.revocations_per_terminal",
            ),
            (
                "[limits]\nmax_pending_handshakes = 1",
                "limits.max_pending_handshakes",
            ),
            (
                "[limits]\nhttp_max_header_bytes = 4096",
                "limits.http_max_header_bytes",
            ),
            (
                "[limits]\nsession_bytes_per_sec_per_source = 1000",
                "limits.session_bytes_per_sec_per_source",
            ),
            (
                "[limits]\nhttp_max_connections = 0",
                "limits.http_max_connections",
            ),
            (
                "[limits]\nhttp_header_timeout_secs = 0",
                "limits.http_header_timeout_secs",
            ),
            (
                "[limits]\nhttp_body_timeout_secs = 0",
                "limits.http_body_timeout_secs",
            ),
            ("[limits]\npush_stall_secs = 0", "limits.push_stall_secs"),
        ] {
            match server(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn redis_store_needs_a_redis_url() {
        let s = server("[store]\nkind = \"redis\"\nurl = \"redis://app:s3cret@10.0.0.7:6379/2\"")
            .unwrap();
        let StoreKind::Redis { url } = &s.store else {
            panic!("{:?}", s.store);
        };
        assert_eq!(url.expose_secret(), "redis://app:s3cret@10.0.0.7:6379/2");
        // The password never shows in what gets logged.
        assert_eq!(url.to_string(), "redis://app:***@10.0.0.7:6379/2");
        assert!(!format!("{:?}", s.store).contains("s3cret"));
        for ok in [
            "rediss://cache.example:6380",
            "redis+unix:///run/redis/redis.sock",
            "unix:///run/redis/redis.sock?db=1",
        ] {
            let text = format!("[store]\nkind = \"redis\"\nurl = \"{ok}\"");
            assert!(server(&text).is_ok(), "{ok}");
        }
        let cases = [
            ("[store]\nkind = \"redis\"", "store.url"),
            (
                "[store]\nkind = \"redis\"\nurl = \"http://10.0.0.7\"",
                "store.url",
            ),
            (
                "[store]\nkind = \"redis\"\nurl = \"10.0.0.7:6379\"",
                "store.url",
            ),
            ("[store]\nkind = \"redis\"\nurl = \"redis://\"", "store.url"),
            (
                "[store]\nkind = \"redis\"\nurl = \"redis://h/notadb\"",
                "store.url",
            ),
            (
                "[store]\nkind = \"memory\"\nurl = \"redis://h\"",
                "store.url",
            ),
            ("[store]\nurl = \"redis://h\"", "store.url"),
        ];
        for (text, key) in cases {
            match server(text) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{text}: {reason}")
                }
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
        let err = server("[store]\nkind = \"redis\"\nurl = \"http://u:s3cret@h\"")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn redis_urls_are_redacted() {
        for (url, shown) in [
            ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
            ("redis://:pw@h", "redis://:***@h"),
            ("redis://u@h", "redis://u@h"),
            ("redis://h:6379", "redis://h:6379"),
            (
                "rediss://u:p@ss:w@h/#insecure",
                "rediss://u:***@h/#insecure",
            ),
            ("redis://u:p?w@h", "redis://u:***@h"),
            (
                "redis+unix:///s.sock?db=1&pass=pw&user=u",
                "redis+unix:///s.sock?db=1&pass=***&user=***",
            ),
            ("unix:///s?password=a@b#x", "unix:///s?password=***#x"),
            // Keys as the client decodes them: `%70ass` is `pass`, `pa%73s` too.
            ("unix:///s?%70ass=SECRET", "unix:///s?pass=***"),
            (
                "redis+unix:///s?db=2&pa%73s=SECRET",
                "redis+unix:///s?db=2&pass=***",
            ),
            // Values of keys the client does not know are hidden too, and so is a repeated key.
            (
                "redis://h/?protocol=3&x=SECRET&pass=a&pass=SECRET",
                "redis://h/?protocol=3&x=***&pass=***&pass=***",
            ),
            // A percent-encoded password in the user info.
            ("redis://u:%53ECRET@h", "redis://u:***@h"),
            ("unix:///s?%70ass=SECRET&db=%31", "unix:///s?pass=***&db=1"),
            // Not parsable by the client: redacted by text, encoded keys included.
            ("not a url", "not a url"),
            ("redis://h:bad?%70ass=SECRET", "redis://h:bad?%70ass=***"),
        ] {
            let redacted = redact_url(url);
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("SECRET"), "{url} → {redacted}");
        }
    }

    #[test]
    fn player_section_is_validated() {
        let p = shipped_daemon().player;
        assert_eq!(p.drive, ["mpv", "vlc"]);
        assert_eq!(p.command, ["mpv", "--idle=yes", "--force-window=yes"]);
        assert_eq!(p.position_poll, Duration::from_secs(5));
        assert!(p.open && p.clear_on_stop && !p.replace_playing);
        let d = daemon("").unwrap().player;
        assert_eq!(d, PlayerConfig::default());
        assert_eq!(d.share, ["*"]);
        assert_eq!(d.schemes, ["http", "https"]);
        assert!(d.command.is_empty());
        assert_eq!(d.settle, Duration::from_secs(1));
        assert_eq!(d.tolerance, Duration::from_secs(2));
        let p = daemon("[player]\nschemes = [\"HTTPS\", \"file\"]\nsettle_secs = 0.25")
            .unwrap()
            .player;
        assert_eq!(p.schemes, ["https", "file"]);
        assert_eq!(p.settle, Duration::from_millis(250));
        let cases = [
            ("[player]\nshare = [\"org.mpris/x\"]", "player.share"),
            ("[player]\ndrive = [\"\"]", "player.drive"),
            ("[player]\nschemes = [\"ht tp\"]", "player.schemes"),
            (
                "[player]\nposition_poll_secs = 0",
                "player.position_poll_secs",
            ),
            ("[player]\nsettle_secs = -1", "player.settle_secs"),
            (
                "[player]\nload_timeout_secs = 1000",
                "player.load_timeout_secs",
            ),
            ("[player]\ntolerance_secs = 0.1", "player.tolerance_secs"),
            ("[player]\ncommand = [\"\", \"x\"]", "player.command"),
        ];
        for (text, key) in cases {
            match daemon(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
        let err = daemon("[player]\nopen_on_push = true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("open_on_push"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected_naming_the_key() {
        let err = daemon("[trust]\npeers = \"notalist\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("peers"), "{err}");
    }
}
