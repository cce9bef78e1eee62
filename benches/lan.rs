//! Handoff latency on a LAN of network namespaces (DESIGN §9), with the release binary.
//!
//! Run as root: `cargo bench --bench lan` (options: `-- --pulls N --cli-pulls N --cold N`).
//! Builds a bridge with hosts srv (server), a (attached, showing a session) and b (pulling), and
//! a spare host c for cold starts, then measures:
//! - warm handoff: `pull` of the already-discovered A until the first push arrives, through B's
//!   control socket (what a local app sees) and through the `handoff pull` CLI (process start
//!   included);
//! - cold discovery: a new daemon on c starts → B's peer list shows it;
//! - goodbye: SIGTERM of that daemon → B's peer list drops it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::*;

fn summary(label: &str, samples: &mut [f64]) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<42} n={:<4} p50={:>8.2} ms  p90={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        samples[samples.len() - 1]
    );
}

fn daemon_config(lan: &Lan, name: &str, extra: &str) -> String {
    let path = lan.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n[discovery]\ninterfaces = [\"eth0\"]\n[quic]\nlisten = \"0.0.0.0:47600\"\n{extra}",
            lan.path(name).display(),
            lan.path(&format!("{name}.sock")).display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn peers_of(socket: &str) -> Vec<serde_json::Value> {
    let out = handoff(&["peers", "--json", "--socket", socket]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls B's peer list over one control connection (cheaper than spawning the CLI), every 5 ms.
fn wait_peer(
    control: &mut (BufReader<UnixStream>, UnixStream),
    id: &str,
    present: bool,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let reply = call(control, "{\"cmd\":\"peers\"}");
        let listed = reply["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["id"] == id));
        if listed == present {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn connect(socket: &str) -> (BufReader<UnixStream>, UnixStream) {
    let stream = UnixStream::connect(socket).unwrap();
    (BufReader::new(stream.try_clone().unwrap()), stream)
}

fn call(control: &mut (BufReader<UnixStream>, UnixStream), line: &str) -> serde_json::Value {
    control.1.write_all(line.as_bytes()).unwrap();
    control.1.write_all(b"\n").unwrap();
    let mut reply = String::new();
    control.0.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn main() {
    if !require_root("bench lan") {
        return;
    }
    let pulls = numeric_arg("--pulls", 500);
    let cli_pulls = numeric_arg("--cli-pulls", 50);
    let cold = numeric_arg("--cold", 15);

    let mut lan = Lan::new("bench", &["srv", "a", "b", "c"]);
    let server_id = id_of(&lan.path("srv"));
    let b_id = id_of(&lan.path("b"));
    let srv_ip = lan.host("srv").ip.clone();
    let srv_config = lan.path("srv.toml");
    std::fs::write(
        &srv_config,
        format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"{srv_ip}:47700\"\n[limits]\nrequests_per_sec_per_terminal = 100000\n",
            lan.path("srv").display()
        ),
    )
    .unwrap();
    // A back-to-back pull loop is far above the per-peer rates a daemon allows by default.
    let a_config = daemon_config(
        &lan,
        "a",
        &format!(
            "[server]\naddr = \"{srv_ip}:47700\"\nid = \"{server_id}\"\n[trust]\npeers = [\"{b_id}\"]\n[limits]\nhandshakes_per_sec_per_source = 100000\nrequests_per_sec_per_peer = 100000\n"
        ),
    );
    let b_config = daemon_config(&lan, "b", "");
    lan.spawn(
        "srv",
        &["server", "--config", srv_config.to_str().unwrap()],
        "srv",
    );
    lan.spawn("a", &["daemon", "--config", &a_config], "a");
    lan.spawn("b", &["daemon", "--config", &b_config], "b");
    let (a_sock, b_sock) = (lan.path("a.sock"), lan.path("b.sock"));
    assert!(
        wait_for_socket(&a_sock, Duration::from_secs(10))
            && wait_for_socket(&b_sock, Duration::from_secs(10))
    );
    let (a_sock, b_sock) = (
        a_sock.to_str().unwrap().to_string(),
        b_sock.to_str().unwrap().to_string(),
    );
    let out = handoff(&[
        "session",
        "set",
        "--socket",
        &a_sock,
        "--uri",
        "https://media.example/bbb.mp4",
        "--title",
        "Big Buck Bunny",
    ]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(20), || {
        peers_of(&b_sock)
            .iter()
            .any(|p| p["name"] == "a")
            .then_some(())
    })
    .expect("B discovers A");

    println!(
        "setup: 4 network namespaces on one bridge (veth), release build, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // Warm-up: the first pull also dials the server; later pulls reuse that link.
    let mut control = connect(&b_sock);
    for _ in 0..5 {
        assert_eq!(
            call(&mut control, "{\"cmd\":\"pull\",\"peer\":\"a\"}")["ok"],
            true
        );
    }
    let mut socket_ms = Vec::new();
    let mut info_ms = Vec::new();
    for _ in 0..pulls {
        let start = Instant::now();
        let reply = call(&mut control, "{\"cmd\":\"pull\",\"peer\":\"a\"}");
        socket_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(reply["push"]["title"], "Big Buck Bunny", "{reply}");
        info_ms.push(reply["timing"]["interface_info_ms"].as_f64().unwrap());
    }
    summary("warm pull via control socket", &mut socket_ms);
    summary("  of which: interface info from A", &mut info_ms);

    let mut cli_ms = Vec::new();
    for _ in 0..cli_pulls {
        let start = Instant::now();
        let out = handoff(&["pull", "a", "--json", "--socket", &b_sock]);
        cli_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success());
    }
    summary("warm pull via `handoff pull` (process incl.)", &mut cli_ms);

    let mut discovery_ms = Vec::new();
    let mut goodbye_ms = Vec::new();
    for i in 0..cold {
        let name = format!("cold{i}");
        let config = daemon_config(&lan, &name, "");
        let id = id_of(&lan.path(&name));
        let start = Instant::now();
        let child = lan.spawn("c", &["daemon", "--config", &config], &name);
        let seen = wait_peer(&mut control, &id, true, Duration::from_secs(20))
            .expect("B lists the new daemon");
        discovery_ms.push((seen - start).as_secs_f64() * 1000.0);
        let stop = Instant::now();
        lan.signal(child, libc::SIGTERM);
        let gone =
            wait_peer(&mut control, &id, false, Duration::from_secs(20)).expect("B drops it");
        goodbye_ms.push((gone - stop).as_secs_f64() * 1000.0);
        lan.wait(child, Duration::from_secs(10));
    }
    summary("cold discovery (daemon start -> listed)", &mut discovery_ms);
    summary("goodbye (SIGTERM -> dropped from peers)", &mut goodbye_ms);
}
