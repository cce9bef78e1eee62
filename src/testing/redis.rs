//! A private `redis-server` per test. It listens on a Unix socket in its own directory and on no
//! TCP port at all (`--port 0`), so a test never sends a packet on any interface; the socket also
//! works from inside the network namespaces integration tests build, which share the filesystem.
//! It keeps nothing on disk (`--save ""`, `--appendonly no`), and the guard kills it on drop.
//!
//! Without `redis-server` installed, [`RedisServer::start_or_skip`] skips the test with a note
//! on stderr, except under CI (`CI=true`), where that is a failure.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BINARY: &str = "redis-server";
/// How long a fresh server may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    #[error(
        "redis-server is not installed (not found on PATH; Debian: apt-get install redis-server)"
    )]
    NotInstalled,
    #[error("cannot create the directory {path} for redis-server: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the socket path {0} is too long for a Unix socket; set TMPDIR to a shorter directory"
    )]
    PathTooLong(PathBuf),
    #[error("cannot start redis-server: {0}")]
    Spawn(std::io::Error),
    #[error("redis-server on {socket} did not answer PING within {timeout:?} ({reason}); its log:\n{log}")]
    NotReady {
        socket: PathBuf,
        timeout: Duration,
        reason: String,
        log: String,
    },
}

/// A running `redis-server` on a Unix socket; killed, and its directory removed, on drop.
pub struct RedisServer {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts a server in a new private directory and waits until it answers PING.
    pub fn start() -> Result<Self, RedisServerError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "handoff-redis-{}-{}-{:08x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        let socket = dir.join("redis.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RedisServerError::PathTooLong(socket));
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| RedisServerError::Dir {
                path: dir.clone(),
                source,
            })?;
        // From here on, drop removes the directory (and kills the server), also on error.
        let mut server = Self {
            child: None,
            dir,
            socket,
        };
        server.spawn()?;
        Ok(server)
    }

    /// [`RedisServer::start`] for a test named `test`: `None` (the test should return) when
    /// redis-server is not installed, said on stderr; a panic when it is missing under
    /// `CI=true`, or when it is installed but does not start.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start() {
            Ok(server) => Some(server),
            Err(RedisServerError::NotInstalled) if !on_ci() => {
                eprintln!("skipping {test}: redis-server not installed");
                None
            }
            Err(e @ RedisServerError::NotInstalled) => {
                panic!("{test}: {e}, and CI=true forbids skipping this test")
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// The URL the redis crate connects to: `redis+unix:///…/redis.sock`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the server and starts a fresh one on the same socket. Nothing survives (there is no
    /// persistence), as when a Redis without `appendonly` restarts; clients lose their connections.
    pub fn restart(&mut self) -> Result<(), RedisServerError> {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        self.spawn()
    }

    /// Runs one command on a connection of its own (e.g. `["FLUSHALL"]`), as another client would.
    pub fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut con = redis::Client::open(self.url())?.get_connection()?;
        let Some((name, rest)) = args.split_first() else {
            return Ok(redis::Value::Nil);
        };
        redis::cmd(name).arg(rest).query(&mut con)
    }

    fn spawn(&mut self) -> Result<(), RedisServerError> {
        let log = self.dir.join("redis.log");
        let child = Command::new(BINARY)
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RedisServerError::NotInstalled,
                _ => RedisServerError::Spawn(e),
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), RedisServerError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let reason = loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                break format!("it exited with {status}");
            }
            let last = match self.command(&["PING"]) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                break format!("last attempt: {last}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Err(RedisServerError::NotReady {
            socket: self.socket.clone(),
            timeout: READY_TIMEOUT,
            reason,
            log: std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default(),
        })
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}
