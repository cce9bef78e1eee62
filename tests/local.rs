//! What a terminal keeps and lets others touch on its own machine: who may drive a daemon
//! through its control socket (issues 11.10, 12.3), the files a config names (11.11, 12.2), and
//! the bounds of the inbox and the hook queue (11.9).
//!
//! The tests run as root and act as ordinary users (`nobody`, `daemon`) by starting the CLI with
//! another uid and gid. Daemons run in process on the host's loopback (no mDNS), or as their own
//! process on a namespace host when the test needs the real binary.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use handoff::accounts;
use handoff::config::ControlGroup;
use handoff::identity::Identity;
use support::inproc::*;
use support::{handoff, require_root, Lan, BIN};

/// An unprivileged user with its primary group (Debian's `nobody`, `nogroup`).
const NOBODY: (u32, u32) = (65_534, 65_534);
/// Another one, not in `nogroup` (Debian's `daemon`).
const OTHER: (u32, u32) = (1, 1);

/// Whether the accounts these tests act as exist; they belong to every Debian system.
fn users_exist(test: &str) -> bool {
    let ok = accounts::user(NOBODY.0).is_some_and(|(_, gid)| gid == NOBODY.1)
        && accounts::group_id("nogroup") == Some(NOBODY.1)
        && accounts::user(OTHER.0).is_some_and(|(_, gid)| gid == OTHER.1);
    if !ok {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test} needs the users nobody (in nogroup) and daemon"
        );
        eprintln!("SKIPPED {test}: needs the users nobody (in nogroup) and daemon");
    }
    ok
}

/// `handoff ARGS` run as `user` (uid, gid; no supplementary groups).
async fn handoff_as(user: (u32, u32), args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .uid(user.0)
        .gid(user.1)
        .env_remove("HANDOFF_SOCKET");
    command.output().await.expect("run handoff")
}

/// `handoff ARGS` run as `user` (uid, gid) with exactly the supplementary `groups`, through
/// setpriv (std's `Command::uid` clears them, and `pre_exec` runs too late to set them).
async fn handoff_with_groups(user: (u32, u32), groups: &[u32], args: &[&str]) -> Output {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    let mut command = tokio::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        command.arg(format!("--groups={}", groups.join(",")));
    }
    command
        .arg("--")
        .arg(BIN)
        .args(args)
        .env_remove("HANDOFF_SOCKET")
        .kill_on_drop(true);
    command.output().await.expect("run setpriv")
}

/// Daemon "a" in `dir`, its control socket in `dir/run`, usable by group `nogroup` (`nobody`'s).
fn with_control_group(dir: &Path) -> handoff::config::DaemonConfig {
    let mut config = terminal(dir, "a", None, vec![]);
    config.control_socket = dir.join("run").join("control.sock");
    config.control_group = Some(ControlGroup {
        name: "nogroup".into(),
        gid: NOBODY.1,
    });
    config
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A test directory that other users may traverse (the socket's own directory decides).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `[control] group = "nogroup"`: the socket is 0660 in group nogroup and its directory 0710,
/// so `nobody` runs `handoff peers`; `daemon`, not in the group, is told it needs the group.
#[tokio::test]
async fn a_member_of_the_control_group_drives_the_daemon_and_others_are_told_why_not() {
    if !require_root("control group") || !users_exist("control group") {
        return;
    }
    let dir = open_dir();
    let config = with_control_group(dir.path());
    let daemon = start(config.clone()).await;
    let socket = config.control_socket.to_str().unwrap().to_string();

    let sock = std::fs::metadata(&socket).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o660);
    assert_eq!(sock.gid(), NOBODY.1);
    let run = std::fs::metadata(dir.path().join("run")).unwrap();
    assert_eq!(run.mode() & 0o777, 0o710);
    assert_eq!(run.gid(), NOBODY.1);

    let out = handoff_as(NOBODY, &["peers", "--json", "--socket", &socket]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = handoff_as(NOBODY, &["status", "--json", "--socket", &socket]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&daemon.id().to_string()));

    let out = handoff_as(OTHER, &["peers", "--socket", &socket]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: permission denied on ")
            && err.contains("root")
            && !err.contains("is `handoff daemon` running"),
        "{err}"
    );
    // Word for word as systemd/README.md quotes it ("Desktop users").
    assert!(
        err.trim_end().ends_with(
            "control.sock: you cannot reach its directory; you need to be in the daemon's \
             [control] group or root"
        ),
        "{err}"
    );
    daemon.shutdown().await;
}

/// A desktop user is in the control group as a supplementary group (`usermod -aG handoff
/// alice`), never as their primary one: `daemon` (primary group `daemon`) with `nogroup` among
/// its supplementary groups, as a login session would give it, drives the daemon; the same user
/// without it is refused.
#[tokio::test]
async fn a_caller_in_the_control_group_as_a_supplementary_group_drives_the_daemon() {
    let test = "control group as a supplementary group";
    if !require_root(test) || !users_exist(test) {
        return;
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test} needs setpriv (util-linux)"
        );
        eprintln!("SKIPPED {test}: needs setpriv (util-linux)");
        return;
    }
    let dir = open_dir();
    let config = with_control_group(dir.path());
    let daemon = start(config.clone()).await;
    let socket = config.control_socket.to_str().unwrap().to_string();
    let out = handoff_with_groups(
        OTHER,
        &[NOBODY.1],
        &["status", "--json", "--socket", &socket],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&daemon.id().to_string()));
    let stranger = Identity::generate().unwrap().id().to_string();
    let out = handoff_with_groups(
        OTHER,
        &[NOBODY.1],
        &["trust", &stranger, "--socket", &socket],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.trusted().len(), 1);

    let out = handoff_with_groups(OTHER, &[], &["status", "--socket", &socket]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied on "),
        "{}",
        text(&out)
    );
    daemon.shutdown().await;
}

/// Without a group, only root and the daemon's user may use the socket. Even with the socket
/// opened to everyone by hand (what an attacker who wins a race at startup would see), the
/// daemon checks the caller's credentials: `nobody` cannot add a peer to root's trust list.
#[tokio::test]
async fn the_daemon_checks_who_is_calling_even_through_a_loosened_socket() {
    if !require_root("peer credentials") || !users_exist("peer credentials") {
        return;
    }
    let dir = open_dir();
    let mut config = terminal(dir.path(), "a", None, vec![]);
    config.control_socket = dir.path().join("run").join("control.sock");
    let daemon = start(config.clone()).await;
    let socket = config.control_socket.to_str().unwrap().to_string();
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(dir.path().join("run")).unwrap().mode() & 0o777,
        0o700
    );

    // The socket's mode keeps nobody out, and the message says who may use it.
    let out = handoff_as(NOBODY, &["peers", "--socket", &socket]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied on "), "{err}");

    // Opened by hand: the daemon itself refuses.
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = Identity::generate().unwrap().id().to_string();
    let out = handoff_as(NOBODY, &["trust", &stranger, "--socket", &socket]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(daemon.trusted().is_empty(), "nobody changed the trust list");
    let counters = daemon.metrics().snapshot();
    assert_eq!(
        counters.get("handoff_refusals_total{reason=\"control_credentials\"}"),
        Some(&1),
        "{counters:?}"
    );
    // Root still may.
    let out = tokio::process::Command::new(BIN)
        .args(["trust", &stranger, "--socket", &socket])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.trusted().len(), 1);
    daemon.shutdown().await;
}

/// What `nobody`'s connect() attempts on a path met: the path missing, permission denied, or
/// anything else (connected, or refused after reaching the socket: it was open to others).
#[derive(Debug, Default)]
struct Attempts {
    missing: usize,
    denied: usize,
    reached: Vec<String>,
}

/// Calls connect() on `socket` as `nobody` until `stop` is set: at once whenever an entry
/// appears in the socket's directory (inotify), in a burst, and otherwise every few ms. Only
/// this thread becomes `nobody` (the raw syscalls change the calling thread's credentials, not
/// the process's, unlike the libc wrappers), so the test keeps root elsewhere. It runs on CPU 0
/// like the daemon (see [`on_cpu0_behind`]), so that waking on the daemon's bind() preempts it
/// before it can do anything more.
fn connect_as_nobody(
    socket: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Attempts> {
    use std::os::unix::ffi::OsStrExt;
    std::thread::spawn(move || {
        let dir = std::ffi::CString::new(socket.parent().unwrap().as_os_str().as_bytes()).unwrap();
        // SAFETY: raw credential and scheduling syscalls on this thread only, which runs
        // nothing but this loop; the inotify descriptor is this thread's and closed at the end.
        let inotify = unsafe {
            let mut cpus: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut cpus);
            assert_eq!(libc::sched_setaffinity(0, size_of_val(&cpus), &cpus), 0);
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            let (u, g) = (NOBODY.0, NOBODY.1);
            assert_eq!(libc::syscall(libc::SYS_setresgid, g, g, g), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, u, u, u), 0);
            let fd = libc::inotify_init1(libc::IN_CLOEXEC);
            assert!(fd >= 0);
            let watch =
                libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO);
            assert!(watch >= 0, "{}", std::io::Error::last_os_error());
            fd
        };
        let mut attempts = Attempts::default();
        let attempt =
            |attempts: &mut Attempts| match std::os::unix::net::UnixStream::connect(&socket) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => attempts.missing += 1,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => attempts.denied += 1,
                Err(e) => attempts.reached.push(e.to_string()),
                Ok(_) => attempts.reached.push("connected".into()),
            };
        let mut events = [0u8; 4096];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut poll = libc::pollfd {
                fd: inotify,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll and read on this thread's descriptor, into a buffer it owns.
            let woken = unsafe {
                libc::poll(&mut poll, 1, 5) > 0
                    && libc::read(inotify, events.as_mut_ptr().cast(), events.len()) > 0
            };
            for _ in 0..if woken { 200 } else { 1 } {
                attempt(&mut attempts);
            }
        }
        // SAFETY: this thread's descriptor, not used again.
        unsafe { libc::close(inotify) };
        attempts
    })
}

/// Runs the child on CPU 0 at the lowest priority: the attacker, on the same CPU and woken
/// when an entry appears, runs before the child's next instruction.
fn on_cpu0_behind(command: &mut Command) {
    // SAFETY: affinity and priority calls are async-signal-safe and touch only the child.
    unsafe {
        command.pre_exec(|| {
            let mut cpus: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut cpus);
            libc::sched_setaffinity(0, size_of_val(&cpus), &cpus);
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            Ok(())
        });
    }
}

/// A daemon started under umask 000, in a directory others may traverse (as /run), binds its
/// control socket with its final mode: `nobody`, calling connect() on the path without pause
/// while the daemon starts and stops again and again, is only ever denied permission — it never
/// reaches the socket, not even to be refused by the credential check after connecting.
#[test]
fn under_umask_000_the_socket_is_never_open_to_others() {
    if !require_root("umask 000") || !users_exist("umask 000") {
        return;
    }
    let lan = Lan::new("umask", &["a"]);
    std::fs::set_permissions(lan.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = lan.path("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("control.sock");
    let config = lan.daemon_config("a", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &lan.path("a.sock").display().to_string(),
        &socket.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = connect_as_nobody(socket.clone(), stop.clone());
    let ns = lan.host("a").ns.clone();
    let mut starts = 0;
    let mut mode = None;
    for _ in 0..8 {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns, BIN, "daemon", "--config", &config])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: umask is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        on_cpu0_behind(&mut command);
        let mut child = command.spawn().unwrap();
        let up = support::wait_for_socket(&socket, Duration::from_secs(10));
        mode = std::fs::metadata(&socket).ok().map(|m| m.mode() & 0o777);
        // SAFETY: kill of the child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        starts += usize::from(up);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = attacker.join().unwrap();
    assert_eq!(starts, 8, "the daemon did not start every time");
    assert_eq!(mode, Some(0o600), "the socket");
    assert!(
        attempts.reached.is_empty(),
        "nobody reached the socket {} times (first: {:?}; {} denied, {} missing)",
        attempts.reached.len(),
        attempts.reached.first(),
        attempts.denied,
        attempts.missing
    );
    // The attacker ran while the socket was there: it can fail.
    assert!(attempts.denied > 0, "{attempts:?}");
    // The state the daemon made under umask 000 is private too.
    let state = lan.path("a");
    assert_eq!(state.metadata().unwrap().mode() & 0o777, 0o700);
    for file in ["identity.key", "inbox.jsonl"] {
        let mode = Path::new(&state).join(file).metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

/// A state_dir that is a symlink another user owns is refused with status 78: whoever owns the
/// link (and can write where it lives) can point it elsewhere at any time, so even a link to a
/// directory of the right owner and mode could hand them the key later. A link made by root or
/// by the user running handoff is followed as before.
#[test]
fn a_state_dir_symlink_owned_by_another_user_is_refused_with_78() {
    if !require_root("state_dir symlink") || !users_exist("state_dir symlink") {
        return;
    }
    let mut lan = Lan::new("stlink", &["h"]);
    let state = lan.path("h");
    let target = lan.path("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&target, &state).unwrap();
    std::os::unix::fs::lchown(&state, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
    let config = lan.daemon_config("h", "");
    let child = lan.spawn("h", &["daemon", "--config", &config], "d");
    let code = lan.wait(child, Duration::from_secs(20));
    let log = lan.log("d");
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("state_dir") && log.contains("symlink") && log.contains("nobody"),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{log}");
    let out = handoff(&["id", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));

    // The same link made by root is followed.
    std::os::unix::fs::lchown(&state, Some(0), Some(0)).unwrap();
    let out = handoff(&["id", "--state-dir", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(target.join("identity.key").exists());
}

/// Every problem with a file the config names stops the daemon and the server with status 78,
/// so systemd does not restart them into it: a state_dir owned by another user, a key file
/// others can read, a token file missing, empty or readable by others. Run on a namespace host,
/// so a program that wrongly starts sends nothing on the host's network.
#[test]
fn file_problems_stop_daemon_and_server_with_78() {
    if !require_root("file problems") || !users_exist("file problems") {
        return;
    }
    let mut lan = Lan::new("files", &["h"]);
    let state = lan.path("h");
    let run = |lan: &mut Lan, args: &[&str], log: &str| {
        let child = lan.spawn("h", args, log);
        let code = lan.wait(child, Duration::from_secs(20));
        (code, lan.log(log))
    };

    // The daemon, in a state_dir another user made: nothing is written into it.
    std::fs::create_dir(&state).unwrap();
    chown(&state, NOBODY.0, NOBODY.1);
    let config = lan.daemon_config("h", "");
    let (code, log) = run(&mut lan, &["daemon", "--config", &config], "d1");
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("state_dir") && log.contains("owned by"),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);

    // Its key file readable by others.
    chown(&state, 0, 0);
    support::id_of(&state);
    let key = state.join("identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, log) = run(&mut lan, &["daemon", "--config", &config], "d2");
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The server's token file: missing, empty, readable by others.
    let token = lan.path("publish.token");
    let http = format!(
        "[http]\nlisten = \"{}\"\ntoken_file = \"{}\"\n",
        lan.host("h").addr(47780),
        token.display()
    );
    let config = lan.server_config("h", &http);
    let (code, log) = run(&mut lan, &["server", "--config", &config], "s1");
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("http.token_file"), "{log}");
    std::fs::write(&token, "").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, log) = run(&mut lan, &["server", "--config", &config], "s2");
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("is empty"), "{log}");
    std::fs::write(&token, "s3cret").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, log) = run(&mut lan, &["server", "--config", &config], "s3");
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("chmod 600") && !log.contains("s3cret"),
        "{log}"
    );
    // A token path that cannot be read as a file (a directory, mode 0700).
    std::fs::remove_file(&token).unwrap();
    std::fs::create_dir(&token).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, log) = run(&mut lan, &["server", "--config", &config], "s4");
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("http.token_file") && log.contains("cannot read token file"),
        "{log}"
    );
}

/// A token file the server's user cannot read (root's, mode 0600, the server run as `nobody`):
/// `config check` and the server itself exit 78 naming the key, before anything is bound.
#[tokio::test]
async fn an_unreadable_token_file_exits_78() {
    let test = "an unreadable token file";
    if !require_root(test) || !users_exist(test) {
        return;
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test} needs setpriv (util-linux)"
        );
        eprintln!("SKIPPED {test}: needs setpriv (util-linux)");
        return;
    }
    let dir = open_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown(&state, NOBODY.0, NOBODY.1);
    let token = dir.path().join("publish.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Loopback only, should the server ever start.
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[http]\n\
             listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            state.display(),
            token.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let out = handoff_with_groups(NOBODY, &[], &["config", "check", "--config", config]).await;
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.token_file") && err.contains("Permission denied"),
        "{}",
        text(&out)
    );
    let server = tokio::time::timeout(
        Duration::from_secs(60),
        handoff_with_groups(NOBODY, &[], &["server", "--config", config]),
    )
    .await
    .expect("the server exits at once");
    assert_eq!(server.status.code(), Some(78), "{}", text(&server));
    assert!(
        String::from_utf8_lossy(&server.stderr).contains("http.token_file"),
        "{}",
        text(&server)
    );
    assert!(!text(&server).contains("s3cret"));
}

/// systemd's credentials: a `DynamicUser=` server cannot read the root-only token file, so the
/// unit passes it with `LoadCredential=publish.token:/etc/handoff/publish.token`, and the
/// server reads it from `$CREDENTIALS_DIRECTORY` (here while the configured path does not even
/// exist). The publish API then accepts that token.
#[test]
fn the_server_reads_its_token_from_systemd_credentials() {
    if !require_root("credentials") {
        return;
    }
    let mut lan = Lan::new("creds", &["h"]);
    let credentials = lan.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("publish.token"), "from-systemd\n").unwrap();
    std::fs::set_permissions(
        credentials.join("publish.token"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let addr = lan.host("h").addr(47780);
    let http = format!(
        "[http]\nlisten = \"{addr}\"\ntoken_file = \"/nonexistent/handoff/publish.token\"\n"
    );
    let config = lan.server_config("h", &http);
    let check = Command::new(BIN)
        .args(["config", "check", "--config", &config])
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    lan.spawn_env(
        "h",
        &["server", "--config", &config],
        "h",
        &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())],
    );
    support::wait_for(Duration::from_secs(10), || {
        lan.log("h").contains("http api listening").then_some(())
    })
    .unwrap_or_else(|| panic!("the server did not start\n{}", lan.log("h")));
    let stranger = Identity::generate().unwrap().id();
    let path = format!("/v1/terminals/{stranger}/push");
    let body = r#"{"uri":"https://m.example/1","title":"t"}"#;
    let (right, wrong) = lan.run_in("h", move || {
        (
            support::http_post(&addr, &path, "from-systemd", body),
            support::http_post(&addr, &path, "guess", body),
        )
    });
    // Past the token check: the terminal is unknown (404). A wrong token: 401.
    assert_eq!(right, Some(404), "{}", lan.log("h"));
    assert_eq!(wrong, Some(401));
}

/// A flood of pushes: at most `max_hook_queue` hooks wait for a slot (the rest are dropped and
/// counted), and the inbox keeps the newest `max_inbox_items`.
#[tokio::test]
async fn a_flood_of_pushes_is_bounded_in_the_hook_queue_and_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let mut config = terminal(dir.path(), "a", Some(&server), vec![]);
    config.limits.max_hook_queue = 2;
    config.limits.max_inbox_items = 10;
    // Each hook marks that it started, waits for the test to release it (30 s at most, so
    // nothing outlives a failed test for long), and marks that it ran.
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let script = format!(
        "cd {} && touch started.$$ && for i in $(seq 600); do [ -e release ] && break; \
         sleep 0.05; done; touch ran.$$",
        marks.display()
    );
    config.on_push = vec!["sh".into(), "-c".into(), script];
    let a = start(config).await;
    wait_connected(&a).await;
    for n in 0..20 {
        let publication = handoff::server::Publication {
            uri: format!("https://m.example/{n}"),
            title: format!("p{n}"),
            body: None,
            meta: Default::default(),
            ttl_secs: None,
            collapse_key: None,
        };
        server.publish(a.id(), publication).await.unwrap();
    }
    let count = |prefix: &str| {
        std::fs::read_dir(&marks)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count()
    };
    tokio::time::timeout(WAIT, async {
        while a.metrics().get("handoff_pushes_received_total", None) < 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("20 pushes delivered");
    // 8 hooks run, 2 wait, 10 were dropped.
    let hits = a.metrics().get(
        "handoff_limit_hits_total",
        Some(("limit", "max_hook_queue")),
    );
    assert_eq!(hits, 10);
    tokio::time::timeout(WAIT, async {
        while count("started.") < 8 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("8 hooks started");
    std::fs::write(marks.join("release"), b"").unwrap();
    tokio::time::timeout(WAIT, async {
        while count("ran.") < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the 10 queued hooks ran");
    assert_eq!(count("started."), 10, "only the queued hooks ran");

    // The inbox holds the newest 10.
    let titles: Vec<String> = a
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.title)
        .collect();
    let newest: Vec<String> = (10..20).map(|n| format!("p{n}")).collect();
    assert_eq!(titles, newest);
    assert_eq!(a.status().await.inbox, 10);
    assert!(a.metrics().get("handoff_inbox_dropped_total", None) > 0);
    a.shutdown().await;
}

/// The daemon's metrics listener (`[metrics] listen`) held every connection anyone opened, for
/// as long as they kept it, each a file descriptor of the daemon's (which also opens its inbox
/// and answers its control socket). It now holds at most 64, dropping the one that has waited
/// longest for a request for a new one, and gives each 10 s to send its request: a scrape still
/// gets through past a crowd of half-sent requests.
#[tokio::test]
async fn the_metrics_listener_holds_a_bounded_number_of_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = open_dir();
    let mut config = terminal(dir.path(), "a", None, vec![]);
    config.metrics_listen = Some(loopback());
    let a = start(config).await;
    let addr: std::net::SocketAddr = a.status().await.metrics.unwrap().parse().unwrap();
    let mut crowd = Vec::new();
    for _ in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        crowd.push(tcp);
    }
    // The oldest 36 are let go at once.
    let mut closed = 0;
    for tcp in crowd.iter_mut().take(36) {
        let mut buf = [0; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 36, "connections past 64 are dropped");
    let (status, body) = http(addr, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("handoff_peers"), "{body}");
    a.shutdown().await;
}

/// The control socket held 64 connections for everyone together, and a member of the control
/// group could take them all (64 `handoff watch`es, or connections sending nothing): the
/// owner's own CLI, and `handoff player`, were then dropped without a word. A member now holds
/// at most 8, and is told so past that; the owner always gets in.
#[tokio::test]
async fn a_member_of_the_control_group_cannot_lock_the_owner_out() {
    if !require_root("control lockout") || !users_exist("control lockout") {
        return;
    }
    let dir = open_dir();
    let config = with_control_group(dir.path());
    let daemon = start(config.clone()).await;
    let socket = config.control_socket.to_str().unwrap().to_string();
    let mut watchers: Vec<std::process::Child> = (0..70)
        .map(|_| {
            Command::new(BIN)
                .args(["watch", "--socket", &socket])
                .uid(NOBODY.0)
                .gid(NOBODY.1)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // All but 8 are told why they cannot stay.
    let deadline = std::time::Instant::now() + 3 * WAIT;
    let mut refused = Vec::new();
    while refused.len() < 62 && std::time::Instant::now() < deadline {
        for child in watchers.iter_mut() {
            if !refused.contains(&child.id()) && child.try_wait().unwrap().is_some() {
                refused.push(child.id());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut told = 0;
    for child in watchers.iter_mut() {
        if refused.contains(&child.id()) {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(err.contains("too many control connections"), "{err}");
            told += 1;
        }
    }
    assert_eq!(told, 62, "8 watchers stay, the rest are refused");
    // The owner (root here) gets in, and so does the member's next call after a watcher ends.
    let reply = handoff::control::call(
        &config.control_socket,
        &handoff::control::ControlRequest::Status,
        WAIT,
    )
    .await
    .expect("the owner is served");
    assert!(reply.ok, "{reply:?}");
    for child in watchers.iter_mut() {
        if !refused.contains(&child.id()) {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
    let out = handoff_as(NOBODY, &["status", "--socket", &socket]).await;
    assert!(out.status.success(), "{}", text(&out));
    // A watcher that only shut down its sending side (`socat` once its input ended) watches on.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"cmd\":\"watch\"}\n").await.unwrap();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let ok = lines.next_line().await.unwrap().unwrap();
    assert!(ok.contains("\"ok\":true"), "{ok}");
    write.shutdown().await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await;
    assert!(
        next.is_err(),
        "the daemon ended a half-closed watch: {next:?}"
    );
    daemon.shutdown().await;
}

/// Not a test on its own: run (as another user) by
/// `a_flood_of_refused_connections_cannot_lock_the_owner_out`, with
/// `HANDOFF_TEST_HOLD_SOCKET` set, it opens 300 connections to that control socket, sends
/// nothing, reads nothing, and holds them for 4 s.
#[test]
fn hold_control_connections() {
    let Ok(socket) = std::env::var("HANDOFF_TEST_HOLD_SOCKET") else {
        return;
    };
    let held: Vec<_> = (0..300)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    println!("held {}", held.len());
    std::thread::sleep(Duration::from_secs(4));
}

/// A member of the control group that opens connections faster than they are refused: each
/// refusal waited up to a second for the caller to finish (so it reads the reason), holding one
/// of the 64 slots meanwhile, and the accept loop waited for a slot, so the owner's connection
/// waited behind hundreds of the member's. Now root and the daemon's user are known by their
/// credentials at once and never wait behind anyone else's checks or refusals.
#[tokio::test]
async fn a_flood_of_refused_connections_cannot_lock_the_owner_out() {
    if !require_root("control flood") || !users_exist("control flood") {
        return;
    }
    let dir = open_dir();
    let config = with_control_group(dir.path());
    let daemon = start(config.clone()).await;
    let mut attacker = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hold_control_connections", "--nocapture"])
        .env("HANDOFF_TEST_HOLD_SOCKET", &config.control_socket)
        .uid(NOBODY.0)
        .gid(NOBODY.1)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        attacker.stdout.take().unwrap(),
    ));
    let held = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the attacker connects")
            .unwrap()
            .expect("the attacker says how many it holds");
        if let Some(n) = line.strip_prefix("held ") {
            break n.parse::<usize>().unwrap();
        }
    };
    assert!(held > 100, "the attacker holds {held}");
    let reply = handoff::control::call(
        &config.control_socket,
        &handoff::control::ControlRequest::Status,
        Duration::from_secs(2),
    )
    .await
    .expect("the owner is served while the flood lasts");
    assert!(reply.ok, "{reply:?}");
    assert!(attacker.wait().await.unwrap().success());
    daemon.shutdown().await;
}
