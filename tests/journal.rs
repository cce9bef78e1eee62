//! Log lines under systemd (issue 12.4): when stderr is the journal (`JOURNAL_STREAM` names the
//! very file stderr is), every line carries its sd-daemon priority — `<3>` error, `<4>` warn,
//! `<6>` info, `<7>` debug — the fatal `error:` line included; anywhere else lines are plain.
//!
//! The binary's stderr is a file here, and `JOURNAL_STREAM` is set to that file's device and inode,
//! exactly as systemd sets it for the stream it connects to journald.

mod support;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use handoff::identity::Identity;
use handoff::tls::{self, TransportLimits};
use support::{wait_for, BIN};

/// A file for a child's stderr, and the `JOURNAL_STREAM` value naming it.
fn stderr_file(path: &Path) -> (File, String) {
    let file = File::create(path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    (file, stream)
}

/// A child process killed when the test ends, also when it fails.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_server(config: &Path, log: &Path, journal_stream: &str) -> std::process::ExitStatus {
    let (stderr, _) = stderr_file(log);
    Command::new(BIN)
        .args(["server", "--config", config.to_str().unwrap()])
        .env("JOURNAL_STREAM", journal_stream)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(stderr)
        .status()
        .unwrap()
}

#[test]
fn the_fatal_error_line_has_the_error_priority_only_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[store]\nkind = \"tape\"\n").unwrap();
    let log = dir.path().join("stderr");

    // JOURNAL_STREAM names the file stderr is: a journal line.
    let stream = stderr_file(&log).1;
    let status = run_server(&config, &log, &stream);
    assert_eq!(status.code(), Some(78));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("<3>error: "), "{text:?}");
    assert!(text.contains("store.kind"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");

    // The variable inherited by a process whose stderr is another file: plain lines.
    let (file, _) = stderr_file(&log);
    let meta = file.metadata().unwrap();
    drop(file);
    let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
    let status = run_server(&config, &log, &other);
    assert_eq!(status.code(), Some(78));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("error: "), "{text:?}");
}

/// A server on loopback, driven to log at every level: debug (a failed handshake), info (start,
/// reload, stop), warn (a changed key that needs a restart) and error (a reload of a broken file).
#[test]
fn every_server_log_line_carries_its_priority_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    let state = dir.path().join("state");
    let write_config = |listen: &str| {
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n[quic]\nlisten = \"{listen}\"\n[store]\nkind = \"memory\"\n",
                state.display()
            ),
        )
        .unwrap();
    };
    write_config("127.0.0.1:0");
    let log = dir.path().join("stderr");
    let (stderr, stream) = stderr_file(&log);
    let mut child = Running(
        Command::new(BIN)
            .args(["server", "--config", config.to_str().unwrap()])
            .env("JOURNAL_STREAM", &stream)
            .env("RUST_LOG", "handoff=debug,warn")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_line = |needle: &str| {
        wait_for(Duration::from_secs(30), || {
            let text = read();
            text.lines()
                .find(|l| l.contains(needle))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", read()))
    };

    let listening = wait_line("server listening");
    assert!(listening.starts_with("<6>"), "{listening}");
    let port: u16 = listening
        .split("quic=127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listening}"));

    // A client pinning another key aborts the handshake; the server logs that at debug.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Identity::generate().unwrap();
        let wrong = Identity::generate().unwrap().id();
        let limits = TransportLimits {
            max_bidi_streams: 0,
            max_uni_streams: 0,
            idle_timeout: Duration::from_secs(10),
            keep_alive: None,
        };
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = tls::client_config(&client, wrong, limits).unwrap();
        let connecting = endpoint
            .connect_with(config, ([127, 0, 0, 1], port).into(), tls::SERVER_NAME)
            .unwrap();
        let result = tokio::time::timeout(Duration::from_secs(20), connecting).await;
        assert!(matches!(result, Ok(Err(_))), "a wrong pinned key must fail");
        endpoint.wait_idle().await;
    });
    let handshake = wait_line("handshake failed");
    assert!(handshake.starts_with("<7>"), "{handshake}");

    write_config("127.0.0.1:1");
    // SAFETY: kill has no memory-safety preconditions; pid is our child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let warn = wait_line("not reloadable");
    assert!(warn.starts_with("<4>"), "{warn}");

    std::fs::write(&config, "[quic\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let error = wait_line("config not reloaded");
    assert!(error.starts_with("<3>"), "{error}");

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(30), || child.0.try_wait().unwrap());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", read());
    let text = read();
    assert!(
        text.contains("<6>") && text.contains("server stopped"),
        "{text}"
    );
    for line in text.lines() {
        let prefixed = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .any(|p| line.starts_with(p));
        assert!(prefixed, "a line without a priority: {line:?}\n{text}");
        // journald stamps lines itself.
        assert!(!line[3..].starts_with("20"), "a timestamp in {line:?}");
    }
}

#[test]
fn lines_are_plain_when_stderr_is_not_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n",
            state.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr");
    let (stderr, _) = stderr_file(&log);
    let mut child = Running(
        Command::new(BIN)
            .args(["server", "--config", config.to_str().unwrap()])
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = wait_for(Duration::from_secs(30), || {
        read().contains("server listening").then_some(())
    });
    // SAFETY: kill has no memory-safety preconditions; the pid is our child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(30), || child.0.try_wait().unwrap());
    let text = read();
    assert!(started.is_some(), "{text}");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{text}");
    for line in text.lines() {
        assert!(!line.starts_with('<'), "{line:?}");
        assert!(line.contains("INFO"), "{line:?}");
    }
}
