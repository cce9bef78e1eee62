//! The control socket: a Unix stream socket (mode 0600, 0660 with `[control] group`) speaking
//! JSON Lines, through which the CLI and local programs drive the daemon.
//!
//! Each request is one JSON object on one line with a `cmd` field; the daemon answers with one
//! line `{"ok":true,...}` or `{"ok":false,"error":"..."}`. `watch` answers `{"ok":true}` and then
//! one `{"push":{...}}` line per push until the client disconnects. The README documents every
//! command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::wire::{PushItem, Session};

/// Longest request line the daemon reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request on the control socket. A field the command does not have is an error naming it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", from = "RequestLine")]
pub enum ControlRequest {
    Status,
    Peers,
    SessionSet {
        uri: String,
        #[serde(default)]
        title: String,
        #[serde(default)]
        position: Option<f64>,
        #[serde(default)]
        meta: BTreeMap<String, String>,
    },
    SessionClear,
    SessionShow,
    Pull {
        peer: String,
        #[serde(default)]
        timeout_secs: Option<f64>,
    },
    Watch,
    Trust {
        id: String,
    },
    Untrust {
        id: String,
    },
    Inbox,
    /// Start pairing with a peer; answers once both sides show the code.
    Pair {
        peer: String,
    },
    /// Confirm the code shown for a peer: it joins the trust list.
    PairConfirm {
        peer: String,
        code: String,
    },
    /// The trust list.
    Trusted,
}

/// A request line as read: [`ControlRequest`] with every command a struct, because serde ignores
/// extra fields after the tag of a unit variant (`{"cmd":"status","verbose":true}` would pass).
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum RequestLine {
    Status {},
    Peers {},
    SessionSet {
        uri: String,
        #[serde(default)]
        title: String,
        #[serde(default)]
        position: Option<f64>,
        #[serde(default)]
        meta: BTreeMap<String, String>,
    },
    SessionClear {},
    SessionShow {},
    Pull {
        peer: String,
        #[serde(default)]
        timeout_secs: Option<f64>,
    },
    Watch {},
    Trust {
        id: String,
    },
    Untrust {
        id: String,
    },
    Inbox {},
    Pair {
        peer: String,
    },
    PairConfirm {
        peer: String,
        code: String,
    },
    Trusted {},
}

impl From<RequestLine> for ControlRequest {
    fn from(line: RequestLine) -> Self {
        match line {
            RequestLine::Status {} => Self::Status,
            RequestLine::Peers {} => Self::Peers,
            RequestLine::SessionSet {
                uri,
                title,
                position,
                meta,
            } => Self::SessionSet {
                uri,
                title,
                position,
                meta,
            },
            RequestLine::SessionClear {} => Self::SessionClear,
            RequestLine::SessionShow {} => Self::SessionShow,
            RequestLine::Pull { peer, timeout_secs } => Self::Pull { peer, timeout_secs },
            RequestLine::Watch {} => Self::Watch,
            RequestLine::Trust { id } => Self::Trust { id },
            RequestLine::Untrust { id } => Self::Untrust { id },
            RequestLine::Inbox {} => Self::Inbox,
            RequestLine::Pair { peer } => Self::Pair { peer },
            RequestLine::PairConfirm { peer, code } => Self::PairConfirm { peer, code },
            RequestLine::Trusted {} => Self::Trusted,
        }
    }
}

/// An entry of the trust list as `handoff trusted --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedRecord {
    pub id: String,
    /// `"config"` (from `[trust] peers`) or `"added"` (`handoff trust`, pairing).
    pub source: String,
    /// The peer's name, if it is on the LAN now.
    pub name: Option<String>,
}

/// A followed peer in `handoff status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowRecord {
    pub id: String,
    /// Unix seconds the link lasts until.
    pub until: u64,
}

/// A peer as printed by `handoff peers --json` (DESIGN §8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub id: String,
    pub name: String,
    pub addrs: Vec<String>,
    pub port: u16,
    pub trusted: bool,
    /// Whether the peer's key answered a handshake (since it was last suspected gone) and
    /// `name` is the one it gives itself. `false`: only mDNS adverts vouch for this entry, and
    /// its name is no target for `pull`, `trust` or `pair`.
    #[serde(default)]
    pub verified: bool,
}

/// A pushed item as printed by `--json` (DESIGN §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRecord {
    pub from: Option<String>,
    pub uri: String,
    pub title: String,
    pub body: Option<String>,
    pub position: Option<f64>,
    pub meta: BTreeMap<String, String>,
    pub offset: u64,
}

impl From<PushItem> for PushRecord {
    fn from(item: PushItem) -> Self {
        Self {
            from: item.from.map(|id| id.to_string()),
            uri: crate::text::clean(item.uri),
            title: crate::text::clean(item.title),
            body: item.body,
            position: item.position,
            meta: item.meta,
            offset: item.offset,
        }
    }
}

/// Where a pull spent its time, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullTiming {
    /// Until the peer's interface info (with its ticket) arrived.
    pub interface_info_ms: f64,
    /// Until the server confirmed the link.
    pub linked_ms: f64,
    /// Until the first push arrived (absent when the peer shows nothing).
    pub pushed_ms: Option<f64>,
}

/// The daemon's state as `handoff status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub id: String,
    pub name: String,
    pub quic: String,
    pub accept: String,
    pub server: Option<ServerStatus>,
    pub peers: usize,
    pub trusted: usize,
    pub inbox: usize,
    pub session: Option<Session>,
    pub uptime_secs: u64,
    /// Every live link to a followed peer (made by a pull or by following automatically),
    /// with the Unix time it lasts until.
    pub follows: Vec<FollowRecord>,
    /// Peers that asked to pair in the last 30 s without this terminal's user starting it.
    pub pair_requests: Vec<String>,
    /// Counters (the same as the daemon's metrics): refusals, limit hits, pushes, ...
    pub counters: BTreeMap<String, u64>,
    /// Where the daemon serves Prometheus metrics (`[metrics] listen`), if anywhere.
    #[serde(default)]
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
}

/// One reply line. Fields not set for a command are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With a refusal by a peer or server: the reason, e.g. "not trusted".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<PeerRecord>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Option<Session>>,
    /// After `session_set`/`session_clear`: whether the content server has stored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_synced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<PullTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<PushRecord>>,
    /// After `trust`/`untrust`: whether the trust list changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// After `untrust`: whether the server ended a live link (absent: no server reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
    /// Something the user should know although the command succeeded (printed as a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// After `pair`: the peer's full ID and the 6-digit code to compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted: Option<Vec<TrustedRecord>>,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    /// A failure. Its message may quote remote text (a peer's refusal, a server's reason for
    /// closing, an address a peer named): it is cleaned of control characters here, once for
    /// every command.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(crate::text::clean_lines(message.into())),
            ..Self::default()
        }
    }
}

/// One line of a `watch` stream after the first reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchLine {
    pub push: PushRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}", connect_message(path, source))]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the control connection")]
    Closed,
    #[error("the daemon sent an unreadable line: {0}")]
    BadLine(String),
}

/// What to tell a user whose connection to the socket failed: a permission problem says who may
/// use it; a missing socket or one nobody listens on asks whether the daemon runs.
fn connect_message(path: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            let who = match std::fs::metadata(path) {
                Ok(meta) if meta.mode() & 0o060 == 0o060 => {
                    let group = crate::accounts::group_name(meta.gid())
                        .unwrap_or_else(|| format!("gid {}", meta.gid()));
                    format!("you need to be in group {group} or root")
                }
                Ok(meta) => format!(
                    "only {} and root may use it (the daemon's [control] group can let a \
                     group in)",
                    crate::accounts::describe_user(meta.uid())
                ),
                // Its directory is closed to us: the group's members (or root) can reach it.
                Err(_) => "you cannot reach its directory; you need to be in the daemon's \
                           [control] group or root"
                    .to_string(),
            };
            format!("permission denied on {shown}: {who}")
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "cannot connect to the daemon's control socket {shown}: {e} (is `handoff daemon` \
             running?)"
        ),
        _ => format!("cannot connect to the daemon's control socket {shown}: {e}"),
    }
}

/// A connection to a daemon's control socket.
pub struct ControlClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(read),
            writer,
        })
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, request: &ControlRequest) -> Result<Reply, ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::BadLine(e.to_string()))?;
        line.push(b'\n');
        if let Err(e) = self.writer.write_all(&line).await {
            // A daemon that refused this client said why before closing.
            return match self.read_line::<Reply>().await {
                Ok(reply) if !reply.ok => Ok(reply),
                _ => Err(e.into()),
            };
        }
        self.read_line().await
    }

    /// Reads the next line of a reply stream (`watch`).
    pub async fn read_line<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| ClientError::BadLine(format!("{e}: {line}")))
    }
}

/// Calls one request on the socket at `path`, with a deadline.
pub async fn call(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    tokio::time::timeout(timeout, async {
        let mut client = ControlClient::connect(path).await?;
        client.call(request).await
    })
    .await
    .map_err(|_| {
        ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the daemon did not answer",
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_documented_json() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"session_set","uri":"u","title":"t","meta":{"k":"v"}}"#)
                .unwrap();
        assert_eq!(
            r,
            ControlRequest::SessionSet {
                uri: "u".into(),
                title: "t".into(),
                position: None,
                meta: BTreeMap::from([("k".into(), "v".into())])
            }
        );
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"pull","peer":"tv"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Pull {
                peer: "tv".into(),
                timeout_secs: None
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"explode"}"#).is_err());
        // A misspelt or foreign field is an error naming it, not silently dropped, also for
        // commands without fields.
        for (line, field) in [
            (r#"{"cmd":"session_set","uri":"u","titel":"x"}"#, "titel"),
            (r#"{"cmd":"status","verbose":true}"#, "verbose"),
            (r#"{"cmd":"watch","since":0}"#, "since"),
            (r#"{"cmd":"pull","peer":"tv","timeout":3}"#, "timeout"),
        ] {
            let e = serde_json::from_str::<ControlRequest>(line).unwrap_err();
            assert!(e.to_string().contains(field), "{line}: {e}");
        }
        // Every command still reads as it is written.
        for request in [
            ControlRequest::Status,
            ControlRequest::Peers,
            ControlRequest::SessionClear,
            ControlRequest::SessionShow,
            ControlRequest::Watch,
            ControlRequest::Inbox,
            ControlRequest::Trusted,
            ControlRequest::Trust { id: "x".into() },
            ControlRequest::Untrust { id: "x".into() },
            ControlRequest::Pair { peer: "x".into() },
            ControlRequest::PairConfirm {
                peer: "x".into(),
                code: "123456".into(),
            },
        ] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(
                serde_json::from_str::<ControlRequest>(&line).unwrap(),
                request
            );
        }
    }

    #[test]
    fn push_record_has_the_contract_fields() {
        let record = PushRecord {
            from: None,
            uri: "u".into(),
            title: "t".into(),
            body: None,
            position: Some(1.5),
            meta: BTreeMap::new(),
            offset: 3,
        };
        let v: serde_json::Value = serde_json::to_value(&record).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut expected = vec!["body", "from", "meta", "offset", "position", "title", "uri"];
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        assert!(v["from"].is_null());
    }
}
