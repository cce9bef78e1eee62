//! A LAN of network namespaces that a test builds for itself (DESIGN §10).
//!
//! One namespace per host plus one holding a bridge; each host has `eth0`, a veth whose other end
//! is on the bridge, with address 10.99.0.N/24 (N = 1, 2, ... in the order given) and its IPv6
//! link-local address. Names carry the process id and a tag, so parallel tests never collide; the
//! namespaces (and every process started in them) are removed on drop, also when a test fails.
//! Nothing here touches the host's own interfaces.
#![allow(dead_code)]

pub mod inproc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_handoff");

/// Whether this process may build namespaces. Without root, a test says so and skips, except
/// under CI (`CI=true`), where a missing privilege is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root to build network namespaces, and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: needs root to build network namespaces (run the tests as root)");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets `key=value` (dotted sysctl name) inside namespace `ns`.
fn sysctl(ns: &str, setting: &str) {
    let (key, value) = setting.split_once('=').expect("key=value");
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "sysctl {setting} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Host {
    pub name: String,
    pub ns: String,
    /// The host's address on the first network: 10.99.0.N, or fd99::N on an IPv6-only LAN.
    pub ip: String,
}

impl Host {
    /// `ip:port`, with brackets for IPv6.
    pub fn addr(&self, port: u16) -> String {
        if self.ip.contains(':') {
            format!("[{}]:{port}", self.ip)
        } else {
            format!("{}:{port}", self.ip)
        }
    }
}

/// The addresses a test LAN gives its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// 10.99.0.N/24 plus the automatic IPv6 link-local address.
    V4,
    /// fd99::N/64 plus the IPv6 link-local address; no IPv4 at all.
    V6Only,
}

pub struct Lan {
    bridge_ns: String,
    pub hosts: Vec<Host>,
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Lan {
    /// Builds the LAN with one host per name.
    pub fn new(tag: &str, names: &[&str]) -> Lan {
        Self::with_stack(tag, names, Stack::V4)
    }

    /// Builds the LAN with one host per name, addressed as `stack` says.
    pub fn with_stack(tag: &str, names: &[&str], stack: Stack) -> Lan {
        let prefix = format!("ho{}{tag}", std::process::id());
        let bridge_ns = format!("{prefix}-br");
        let mut lan = Lan {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        ip(&["netns", "add", &bridge_ns]);
        ip(&["-n", &bridge_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            ip(&["netns", "add", &ns]);
            // Record the host at once, so drop removes it even if a later step fails.
            let (host_ip, cidr) = match stack {
                Stack::V4 => (format!("10.99.0.{}", i + 1), 24),
                Stack::V6Only => (format!("fd99::{}", i + 1), 64),
            };
            lan.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                ip: host_ip.clone(),
            });
            let port = format!("p{i}");
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // No duplicate address detection: addresses are usable at once (it would delay
            // link-local addresses by a second or two).
            sysctl(&ns, "net.ipv6.conf.default.accept_dad=0");
            sysctl(&ns, "net.ipv6.conf.all.accept_dad=0");
            ip(&[
                "-n", &bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&[
                "-n", &bridge_ns, "link", "set", &port, "master", "br0", "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/{cidr}"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lan
    }

    /// Connects `host` to a further network `net` (a bridge made on first use) through a new
    /// interface `ifname` with address `cidr`, e.g. a second network of a dual-homed host.
    pub fn attach(&mut self, host: &str, net: &str, ifname: &str, cidr: &str) {
        let bridge = format!("br-{net}");
        let exists = Command::new("ip")
            .args(["-n", &self.bridge_ns, "link", "show", &bridge])
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            ip(&[
                "-n",
                &self.bridge_ns,
                "link",
                "add",
                &bridge,
                "type",
                "bridge",
            ]);
            ip(&["-n", &self.bridge_ns, "link", "set", &bridge, "up"]);
        }
        let ns = self.host(host).ns.clone();
        let port = format!("{net}-{host}");
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &port,
            "master",
            &bridge,
            "up",
        ]);
        ip(&["-n", &ns, "addr", "add", cidr, "dev", ifname]);
        ip(&["-n", &ns, "link", "set", ifname, "up"]);
    }

    /// Runs `ip ARGS` inside `host`'s namespace (interface changes during a test).
    pub fn ip_in(&self, host: &str, args: &[&str]) {
        let mut full = vec!["-n", self.host(host).ns.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("host exists")
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Starts `handoff ARGS` inside `host`'s namespace, logging to `<dir>/<log>.log`.
    /// Returns the index to use with [`Lan::signal`] and [`Lan::wait`].
    pub fn spawn(&mut self, host: &str, args: &[&str], log: &str) -> usize {
        self.spawn_env(host, args, log, &[])
    }

    /// Like [`Lan::spawn`], with extra environment variables.
    pub fn spawn_env(
        &mut self,
        host: &str,
        args: &[&str],
        log: &str,
        env: &[(&str, &str)],
    ) -> usize {
        let ns = self.host(host).ns.clone();
        let log = std::fs::File::create(self.path(&format!("{log}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, BIN])
            .args(args)
            .env("RUST_LOG", "handoff=debug,info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn handoff");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Sends a signal to a spawned process (`ip netns exec` execs, so the pid is handoff's).
    pub fn signal(&self, index: usize, signal: i32) {
        let pid = self.children[index].id() as i32;
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
    }

    /// The pid of a spawned process.
    pub fn pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// Waits for a spawned process to exit, returning its exit code.
    pub fn wait(&mut self, index: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.children[index].try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `f` on a thread that has joined `host`'s network namespace: sockets it opens, and
    /// threads it starts, live on that host. Used for attackers and raw clients in tests.
    pub fn run_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.spawn_in(host, f)
            .join()
            .expect("thread in namespace panicked")
    }

    /// Like [`Lan::run_in`], without waiting for the thread.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.host(host).ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Writes a daemon config for host `name` (mDNS on its eth0, QUIC on 47600, state and
    /// socket in the test's directory) with `extra` TOML appended; returns its path.
    pub fn daemon_config(&self, name: &str, extra: &str) -> String {
        let path = self.path(&format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n[discovery]\ninterfaces = [\"eth0\"]\n[quic]\nlisten = \"[::]:47600\"\n{extra}",
            self.path(name).display(),
            self.path(&format!("{name}.sock")).display(),
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// Writes a server config for host `name`, listening on its address, port 47700.
    pub fn server_config(&self, name: &str, extra: &str) -> String {
        let path = self.path(&format!("{name}.toml"));
        let text = format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"{}\"\n{extra}",
            self.path(name).display(),
            self.host(name).addr(47700)
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// The control socket of the daemon on host `name`.
    pub fn socket(&self, name: &str) -> String {
        self.path(&format!("{name}.sock"))
            .to_str()
            .unwrap()
            .to_string()
    }

    /// Starts `handoff daemon` on host `name` with `extra` config and waits for its socket.
    pub fn start_daemon(&mut self, name: &str, extra: &str) -> usize {
        let config = self.daemon_config(name, extra);
        self.launch_daemon(name, &config)
    }

    /// Starts `handoff daemon --config CONFIG` on host `name` and waits for its socket.
    pub fn launch_daemon(&mut self, name: &str, config: &str) -> usize {
        let index = self.spawn(name, &["daemon", "--config", config], name);
        assert!(
            wait_for_socket(&self.path(&format!("{name}.sock")), Duration::from_secs(10)),
            "{name} did not start:\n{}",
            self.log(name)
        );
        index
    }

    /// Starts `handoff server` on host `name`; returns its process index and ID.
    pub fn start_server(&mut self, name: &str) -> (usize, String) {
        let id = id_of(&self.path(name));
        let config = self.server_config(name, "");
        let index = self.spawn(name, &["server", "--config", &config], name);
        let ready = wait_for(Duration::from_secs(10), || {
            self.log(name).contains("server listening").then_some(())
        });
        assert!(
            ready.is_some(),
            "server {name} did not start:\n{}",
            self.log(name)
        );
        (index, id)
    }

    /// The `[server]` section for a terminal attached to the server on host `name`.
    pub fn server_section(&self, name: &str, id: &str) -> String {
        format!(
            "[server]\naddr = \"{}\"\nid = \"{id}\"\n",
            self.host(name).addr(47700)
        )
    }

    /// `handoff session set` on the daemon of host `on`.
    pub fn session_set(&self, on: &str, uri: &str, title: &str) -> Output {
        handoff(&[
            "session",
            "set",
            "--socket",
            &self.socket(on),
            "--uri",
            uri,
            "--title",
            title,
        ])
    }

    /// Writes `token` to a 0600 file and returns the server TOML for the embedded store and an
    /// HTTP API on host `host`'s address, port 47780, using that token.
    pub fn http_server_toml(&self, host: &str, token: &str) -> String {
        let token_file = self.path("token");
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        format!(
            "[store]\nkind = \"embedded\"\n[http]\nlisten = \"{}:47780\"\ntoken_file = \"{}\"\n",
            self.host(host).ip,
            token_file.display()
        )
    }

    /// `handoff peers --json` on host `on`.
    pub fn peers(&self, on: &str) -> Vec<serde_json::Value> {
        let out = handoff(&["peers", "--json", "--socket", &self.socket(on)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&out.stdout)
    }

    /// `handoff status --json` on host `on`.
    pub fn status(&self, on: &str) -> serde_json::Value {
        let out = handoff(&["status", "--json", "--socket", &self.socket(on)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until `on` lists the peer `id`, returning its entry.
    pub fn wait_for_peer(&self, on: &str, id: &str) -> serde_json::Value {
        wait_for(Duration::from_secs(20), || {
            self.peers(on).into_iter().find(|p| p["id"] == id)
        })
        .unwrap_or_else(|| panic!("{on} never listed {id}\n{}", self.log(on)))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge_ns])
            .status();
    }
}

/// Runs `handoff ARGS` in the test's own namespace (for CLI commands that only use a socket).
pub fn handoff(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run handoff")
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a daemon answers on its control socket.
pub fn wait_for_socket(socket: &Path, timeout: Duration) -> bool {
    let socket = socket.to_str().unwrap().to_string();
    wait_for(timeout, || {
        handoff(&["status", "--socket", &socket])
            .status
            .success()
            .then_some(())
    })
    .is_some()
}

/// The ID of the identity in `dir` (created if missing).
pub fn id_of(dir: &Path) -> String {
    let out = handoff(&["id", "--state-dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Parses JSON Lines output.
pub fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// A blocking HTTP/1.1 POST (one request per connection); `None` when the server could not be
/// reached or answered nothing.
pub fn http_post(addr: &str, path: &str, token: &str, body: &str) -> Option<u16> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = http_exchange(addr, &request)?;
    response.split(' ').nth(1)?.parse().ok()
}

/// A blocking HTTP/1.1 GET; the body of a 200 answer, else `None`.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let response = http_exchange(addr, &request)?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1)? == "200").then(|| body.to_string())
}

fn http_exchange(addr: &str, request: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The number after `name` on the command line (benchmark options), or `default`.
pub fn numeric_arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
