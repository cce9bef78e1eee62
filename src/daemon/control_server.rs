//! The daemon's side of the control socket (protocol in [`crate::control`]).

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Daemon, DaemonError};
use crate::accounts;
use crate::config::ControlGroup;
use crate::control::{ControlRequest, Reply, WatchLine, MAX_LINE};
use crate::wire::Session;

/// Control connections held at once.
const MAX_CLIENTS: usize = 64;
/// Of those, what one user other than root and the daemon's own (a member of the control
/// group) may hold, and what all such users may hold together: the rest are kept for root and
/// the daemon's user, so that no member can lock the owner out.
const MAX_PER_MEMBER: usize = 8;
const MAX_MEMBERS: usize = 48;
/// Callers other than root and the daemon's user being checked or told why not, at once; past
/// that a new one is dropped.
const MAX_CHECKS: usize = 128;

/// Connections held by control-group members, per user.
#[derive(Default)]
struct Members(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// A member's connection slot; given back when dropped.
struct MemberSlot {
    members: Arc<Members>,
    uid: u32,
}

impl Members {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `uid`, unless it holds [`MAX_PER_MEMBER`] or members hold [`MAX_MEMBERS`].
    fn admit(self: &Arc<Self>, uid: u32) -> Option<MemberSlot> {
        let mut held = self.lock();
        if held.values().sum::<usize>() >= MAX_MEMBERS
            || held.get(&uid).is_some_and(|n| *n >= MAX_PER_MEMBER)
        {
            return None;
        }
        *held.entry(uid).or_default() += 1;
        Some(MemberSlot {
            members: self.clone(),
            uid,
        })
    }
}

impl Drop for MemberSlot {
    fn drop(&mut self) {
        let mut held = self.members.lock();
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}
/// How long `session set` waits for the server to confirm.
const SYNC_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the control socket with its final mode from the start: 0600, or 0660 and group
/// `[control] group`. The socket is bound inside a fresh private directory (mode 0700), given
/// its mode and group there, then renamed into place, so no one else can ever connect to it
/// while it is looser (whatever the process umask); the rename also replaces a stale socket
/// left by a crash. The socket's directory is created 0700 (0710 with the group) or, if it
/// exists, must not be writable by other users (unless sticky, as /tmp).
pub(crate) fn bind(path: &Path, group: Option<&ControlGroup>) -> Result<UnixListener, DaemonError> {
    let err = |reason: String| DaemonError::Control {
        path: path.to_path_buf(),
        reason,
    };
    let Some(name) = path.file_name() else {
        return Err(err("the path has no file name".into()));
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    prepare_dir(path, dir, group)?;
    // Checked again: another daemon may have bound it since `ensure_free`.
    ensure_free(path)?;
    let private = make_private_dir(dir, name).map_err(|e| {
        err(format!(
            "cannot make a private directory in {} to bind in: {e}",
            dir.display()
        ))
    })?;
    let staged = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| err(e.to_string()))?;
        let mode = match group {
            Some(group) => {
                chown_group(&staged, group.gid).map_err(|e| DaemonError::ControlDir {
                    path: path.to_path_buf(),
                    reason: group_error(group, &e),
                })?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&staged, path)
            .map_err(|e| err(format!("cannot move it into place: {e}")))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Refuses a socket another daemon listens on. [`super::Daemon::start`] calls it before it
/// creates anything (state directory, key, trust list), so a second daemon started by mistake
/// leaves no trace.
pub(crate) fn ensure_free(path: &Path) -> Result<(), DaemonError> {
    if std::fs::symlink_metadata(path).is_ok()
        && std::os::unix::net::UnixStream::connect(path).is_ok()
    {
        return Err(DaemonError::Control {
            path: path.to_path_buf(),
            reason: "another daemon is listening on it (control_socket)".into(),
        });
    }
    Ok(())
}

/// Makes sure the socket's directory is safe to bind in and, with a group, traversable by it.
fn prepare_dir(path: &Path, dir: &Path, group: Option<&ControlGroup>) -> Result<(), DaemonError> {
    let err = |reason: String| DaemonError::ControlDir {
        path: path.to_path_buf(),
        reason,
    };
    let mode = if group.is_some() { 0o710 } else { 0o700 };
    let created = match std::fs::symlink_metadata(dir) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| err(format!("cannot create {}: {e}", parent.display())))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => true,
                // Someone made it meanwhile: checked below like any existing directory.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(err(format!("cannot create {}: {e}", dir.display()))),
            }
        }
        Err(e) => return Err(err(format!("cannot inspect {}: {e}", dir.display()))),
    };
    let meta = std::fs::metadata(dir)
        .map_err(|e| err(format!("cannot inspect {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(err(format!("{} is not a directory", dir.display())));
    }
    let me = accounts::euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(err(format!(
            "its directory {} is owned by {}: that user could replace the socket; use a \
             directory owned by {} or root",
            dir.display(),
            accounts::describe_user(meta.uid()),
            accounts::describe_user(me),
        )));
    }
    let dir_mode = meta.mode() & 0o7777;
    if dir_mode & 0o022 != 0 && dir_mode & 0o1000 == 0 {
        return Err(err(format!(
            "its directory {} is writable by group or others (mode {dir_mode:o}): they could \
             replace the socket; run `chmod go-w {}` or use another directory",
            dir.display(),
            dir.display()
        )));
    }
    if created {
        if let Some(group) = group {
            chown_group(dir, group.gid).map_err(|e| err(group_error(group, &e)))?;
        }
        // Exactly this mode, whatever the umask took away (it can only have taken).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("cannot set the mode of {}: {e}", dir.display())))?;
        return Ok(());
    }
    let Some(group) = group else { return Ok(()) };
    let traversable = dir_mode & 0o001 != 0 || (meta.gid() == group.gid && dir_mode & 0o010 != 0);
    if traversable {
        return Ok(());
    }
    // A directory of our own that holds only the socket (systemd's RuntimeDirectory=) is
    // opened to the group; any other is left alone and the fix named.
    if meta.uid() == me && holds_only_the_socket(dir, path) {
        chown_group(dir, group.gid).map_err(|e| err(group_error(group, &e)))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode | 0o010))
            .map_err(|e| err(format!("cannot set the mode of {}: {e}", dir.display())))?;
        return Ok(());
    }
    warn!(
        dir = %dir.display(),
        "members of group {} cannot reach the control socket: its directory is not \
         traversable by them (mode {dir_mode:o}); run `chgrp {} {}` and `chmod g+x {}`",
        group.name,
        group.name,
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// Whether `dir` holds nothing but the socket `path` (and this module's staging directories).
fn holds_only_the_socket(dir: &Path, path: &Path) -> bool {
    let (Some(name), Ok(entries)) = (path.file_name(), std::fs::read_dir(dir)) else {
        return false;
    };
    let staging = format!(".{}.", name.to_string_lossy());
    entries.flatten().all(|entry| {
        let entry = entry.file_name();
        entry == name || entry.to_string_lossy().starts_with(&staging)
    })
}

/// Creates `DIR/.NAME.PID.N` with mode 0700, trying further names if one exists.
fn make_private_dir(dir: &Path, name: &std::ffi::OsStr) -> std::io::Result<PathBuf> {
    let pid = std::process::id();
    let mut last = None;
    for n in 0..16u32 {
        let mut staged = std::ffi::OsString::from(".");
        staged.push(name);
        staged.push(format!(".{pid}.{n}"));
        let candidate = dir.join(staged);
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

fn chown_group(path: &Path, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

fn group_error(group: &ControlGroup, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "cannot hand it to group {} ([control] group): the daemon's user is not a member \
             (with systemd, add SupplementaryGroups={} to the unit)",
            group.name, group.name
        )
    } else {
        format!(
            "cannot hand it to group {} ([control] group): {e}",
            group.name
        )
    }
}

/// Whether the process at the other end of `stream` may use the socket: root, the daemon's own
/// user, or (with `[control] group`) a member of that group; returns its uid. The socket's mode
/// already keeps others out; this holds even if the mode was loosened by hand.
async fn peer_allowed(stream: &UnixStream, group: Option<&ControlGroup>) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let (uid, gid) = (cred.uid(), cred.gid());
    if uid == 0 || uid == accounts::euid() {
        return Ok(uid);
    }
    if let Some(group) = group {
        let wanted = group.gid;
        // The caller's own process groups first (a member's login gives it the group as a
        // supplementary one), then the group database, which may be remote (NSS): off the
        // runtime's threads.
        let in_process = accounts::peer_groups(stream.as_raw_fd())
            .is_some_and(|groups| groups.contains(&wanted));
        let member = in_process
            || tokio::task::spawn_blocking(move || accounts::is_member(uid, gid, wanted))
                .await
                .unwrap_or(false);
        if member {
            return Ok(uid);
        }
        return Err(format!(
            "permission denied: {} is not root, the daemon's user or a member of group {}",
            accounts::describe_user(uid),
            group.name
        ));
    }
    Err(format!(
        "permission denied: {} is not root or the daemon's user (the daemon's [control] group \
         can let a group in)",
        accounts::describe_user(uid)
    ))
}

/// Serves the control socket: at most [`MAX_CLIENTS`] connections, of which members of the
/// control group hold at most [`MAX_PER_MEMBER`] each and [`MAX_MEMBERS`] together. Root and
/// the daemon's user are known by their credentials at once and wait for a free slot; anyone
/// else is checked (a group lookup may take a while) and, if refused, told why (which may take
/// a second) under a bound of its own, [`MAX_CHECKS`], so neither can hold the owner's slots.
pub(crate) async fn serve(daemon: Daemon, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let checks = Arc::new(Semaphore::new(MAX_CHECKS));
    let members = Arc::new(Members::default());
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
        let d = daemon.clone();
        if is_owner(&stream) {
            let slots = slots.clone();
            daemon.spawn(
                async move {
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return;
                    };
                    if let Err(e) = serve_client(d, stream).await {
                        debug!("control client: {e}");
                    }
                },
                tracing::info_span!("control-client"),
            );
            continue;
        }
        let Ok(check) = checks.clone().try_acquire_owned() else {
            debug!("dropping a control client: too many being checked");
            continue;
        };
        let (slots, members) = (slots.clone(), members.clone());
        daemon.spawn(
            async move {
                let group = d.shared.config.control_group.clone();
                let uid = match peer_allowed(&stream, group.as_ref()).await {
                    Ok(uid) => uid,
                    Err(reason) => {
                        refuse(&d, stream, "control_credentials", reason).await;
                        return;
                    }
                };
                let (member, slot) = match (members.admit(uid), slots.try_acquire_owned()) {
                    (Some(member), Ok(slot)) => (member, slot),
                    _ => {
                        let reason = format!(
                            "too many control connections: {} may hold {MAX_PER_MEMBER}, and \
                             members of the control group {MAX_MEMBERS} together",
                            accounts::describe_user(uid)
                        );
                        refuse(&d, stream, "control_connections", reason).await;
                        return;
                    }
                };
                drop(check);
                let _held = (member, slot);
                if let Err(e) = serve_client(d, stream).await {
                    debug!("control client: {e}");
                }
            },
            tracing::info_span!("control-client"),
        );
    }
}

/// Whether the caller is root or the daemon's own user (its credentials say so at once).
fn is_owner(stream: &UnixStream) -> bool {
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == accounts::euid())
}

/// Tells a client it may not use the socket, counts it and logs it (rate-limited: local users
/// could otherwise fill the log).
async fn refuse(daemon: &Daemon, stream: UnixStream, kind: &'static str, reason: String) {
    daemon
        .shared
        .metrics
        .inc("handoff_refusals_total", Some(("reason", kind)));
    if let Some(suppressed) = daemon.shared.guards.log.check(kind) {
        warn!(suppressed, "refused a control connection: {reason}");
    }
    let (read, mut write) = stream.into_split();
    // Say why, then let the client finish writing its request (for at most a second) so it
    // reads the reason rather than a broken pipe.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        send(&mut write, &Reply::error(reason)).await?;
        let mut sink = read.take(MAX_LINE as u64 + 1);
        tokio::io::copy(&mut sink, &mut tokio::io::sink()).await
    })
    .await;
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
            return watch(daemon, reader, write).await;
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

/// Sends every push until the client goes. A client that closed its connection gives back its
/// slot at once, not at the next push (which may be days away); one that only shut down its
/// sending side (`socat` after its input ended) keeps watching.
async fn watch(
    daemon: Daemon,
    mut reader: BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut pushes = daemon.subscribe();
    send(&mut write, &Reply::ok()).await?;
    let mut byte = [0u8; 1];
    let mut reading = true;
    loop {
        let record = tokio::select! {
            _ = daemon.cancelled() => return Ok(()),
            read = reader.read(&mut byte), if reading => {
                // Anything more it sends is ignored; its end is a hang-up or a half close.
                if matches!(read, Ok(0) | Err(_)) {
                    let ready = write.as_ref().ready(tokio::io::Interest::WRITABLE).await?;
                    if ready.is_write_closed() {
                        return Ok(());
                    }
                    reading = false;
                }
                continue;
            }
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
                Ok((untrusted, revoked)) => {
                    let config = untrusted.in_config.then(|| {
                        format!(
                            "the config file still lists {id} in [trust] peers; it stays revoked \
                             until `handoff trust {id}` (remove it from the config too)"
                        )
                    });
                    let refused = match &revoked {
                        crate::daemon::ServerRevocation::Refused(why) => Some(format!(
                            "the server refused the revocation: {why}; tickets issued to it \
                             before now stay valid there until they expire"
                        )),
                        _ => None,
                    };
                    let warnings: Vec<String> = config.into_iter().chain(refused).collect();
                    Reply {
                        changed: Some(untrusted.changed),
                        revoked: revoked.removed(),
                        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
                        ..Reply::ok()
                    }
                }
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
