//! The daemon's side of the control socket (protocol in [`crate::control`]).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Daemon, DaemonError};
use crate::control::{ControlRequest, Reply, WatchLine, MAX_LINE};
use crate::wire::Session;

/// Control connections held at once.
const MAX_CLIENTS: usize = 64;
/// How long `session set` waits for the server to confirm.
const SYNC_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket with mode 0600, replacing a stale socket file left by a crash.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |reason: String| DaemonError::Control {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another daemon is listening on it".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

pub(crate) async fn serve(daemon: Daemon, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            _ = daemon.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("refusing control client: at the limit");
            continue;
        };
        let d = daemon.clone();
        daemon.spawn(
            async move {
                let _permit = permit;
                if let Err(e) = serve_client(d, stream).await {
                    debug!("control client: {e}");
                }
            },
            tracing::info_span!("control-client"),
        );
    }
}

async fn serve_client(daemon: Daemon, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = String::new();
        reader.get_mut().set_limit(MAX_LINE as u64 + 1);
        let n = tokio::select! {
            _ = daemon.cancelled() => return Ok(()),
            n = reader.read_line(&mut line) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if n > MAX_LINE {
            send(
                &mut write,
                &Reply::error(format!("request line longer than {MAX_LINE} bytes")),
            )
            .await?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let request: ControlRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&mut write, &Reply::error(format!("bad request: {e}"))).await?;
                continue;
            }
        };
        if request == ControlRequest::Watch {
            return watch(daemon, write).await;
        }
        let reply = handle(&daemon, request).await;
        send(&mut write, &reply).await?;
    }
}

async fn send<T: serde::Serialize>(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    value: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

async fn watch(daemon: Daemon, mut write: tokio::net::unix::OwnedWriteHalf) -> std::io::Result<()> {
    let mut pushes = daemon.subscribe();
    send(&mut write, &Reply::ok()).await?;
    loop {
        let record = tokio::select! {
            _ = daemon.cancelled() => return Ok(()),
            r = pushes.recv() => r,
        };
        match record {
            Ok(push) => send(&mut write, &WatchLine { push }).await?,
            Err(RecvError::Lagged(n)) => {
                warn!("a watcher fell behind and missed {n} pushes (they are in the inbox)");
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

async fn handle(daemon: &Daemon, request: ControlRequest) -> Reply {
    match request {
        ControlRequest::Status => Reply {
            status: Some(daemon.status().await),
            ..Reply::ok()
        },
        ControlRequest::Peers => Reply {
            peers: Some(daemon.peers()),
            ..Reply::ok()
        },
        ControlRequest::SessionSet {
            uri,
            title,
            position,
            meta,
        } => {
            if uri.is_empty() {
                return Reply::error("the session needs a uri");
            }
            if position.is_some_and(|p| !p.is_finite() || p < 0.0) {
                return Reply::error("position must be a non-negative number of seconds");
            }
            let session = Session {
                uri,
                title,
                position,
                meta,
            };
            let synced = daemon.set_session(Some(session), SYNC_WAIT).await;
            Reply {
                server_synced: Some(synced),
                ..Reply::ok()
            }
        }
        ControlRequest::SessionClear => {
            let synced = daemon.set_session(None, SYNC_WAIT).await;
            Reply {
                server_synced: Some(synced),
                ..Reply::ok()
            }
        }
        ControlRequest::SessionShow => Reply {
            session: Some(daemon.session()),
            ..Reply::ok()
        },
        ControlRequest::Pull { peer, timeout_secs } => {
            let timeout = timeout_secs
                .filter(|t| t.is_finite() && *t > 0.0 && *t < 86_400.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(DEFAULT_PULL_TIMEOUT);
            match daemon.pull(&peer, timeout).await {
                Ok(outcome) => Reply {
                    push: outcome.push,
                    linked_until: Some(outcome.linked_until),
                    timing: Some(outcome.timing),
                    ..Reply::ok()
                },
                Err(e) => Reply {
                    refused: e.refusal().map(|r| r.reason.to_string()),
                    ..Reply::error(e.to_string())
                },
            }
        }
        ControlRequest::Watch => Reply::error("watch is handled as a stream"),
        ControlRequest::Trust { id } => match daemon.resolve_id(&id) {
            Ok(id) => match daemon.trust(id) {
                Ok(changed) => Reply {
                    changed: Some(changed),
                    ..Reply::ok()
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Err(e) => Reply::error(e.to_string()),
        },
        ControlRequest::Untrust { id } => match daemon.resolve_id(&id) {
            Ok(id) => match daemon.untrust(id).await {
                Ok((untrusted, revoked)) => Reply {
                    changed: Some(untrusted.changed),
                    revoked,
                    warning: untrusted.in_config.then(|| {
                        format!(
                            "the config file still lists {id} in [trust] peers; it stays revoked \
                             until `handoff trust {id}` (remove it from the config too)"
                        )
                    }),
                    ..Reply::ok()
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Err(e) => Reply::error(e.to_string()),
        },
        ControlRequest::Pair { peer } => match daemon.pair(&peer).await {
            Ok(code) => Reply {
                peer_id: Some(code.peer.to_string()),
                code: Some(code.code),
                ..Reply::ok()
            },
            Err(e) => Reply {
                refused: match &e {
                    crate::daemon::PairError::Refused { refusal, .. } => {
                        Some(refusal.reason.to_string())
                    }
                    _ => None,
                },
                ..Reply::error(e.to_string())
            },
        },
        ControlRequest::PairConfirm { peer, code } => match daemon.resolve_id(&peer) {
            Ok(id) => match daemon.confirm_pair(id, &code) {
                Ok(changed) => Reply {
                    changed: Some(changed),
                    ..Reply::ok()
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Err(e) => Reply::error(e.to_string()),
        },
        ControlRequest::Trusted => Reply {
            trusted: Some(daemon.trusted()),
            ..Reply::ok()
        },
        ControlRequest::Inbox => match daemon.inbox().await {
            Ok(items) => Reply {
                items: Some(items),
                ..Reply::ok()
            },
            Err(e) => Reply::error(e.to_string()),
        },
    }
}
