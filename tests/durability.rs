//! Nothing acknowledged is lost (issue 4), on a namespace LAN with the real binary: the server is
//! killed with SIGKILL while a publisher pushes (to the terminal, or to the followers of a
//! terminal it follows: its stream), and a terminal's link is cut while pushes are published;
//! afterwards the terminal's inbox holds every acknowledged push, once, in order.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const TOKEN: &str = "durability-test-token";

/// A server (embedded store, HTTP API on its address) and terminal b attached to it.
fn deployment(tag: &str) -> (Lan, usize, String) {
    deployment_on(tag, &["srv", "b", "pub"])
}

fn deployment_on(tag: &str, hosts: &[&str]) -> (Lan, usize, String) {
    let mut lan = Lan::new(tag, hosts);
    let server_id = id_of(&lan.path("srv"));
    let extra = lan.http_server_toml("srv", TOKEN);
    let config = lan.server_config("srv", &extra);
    let server = lan.spawn("srv", &["server", "--config", &config], "srv");
    assert!(
        wait_for(Duration::from_secs(10), || lan
            .log("srv")
            .contains("server listening")
            .then_some(()))
        .is_some(),
        "{}",
        lan.log("srv")
    );
    // The inbox must hold every push of the run (by default it keeps the newest 1000).
    let b_config = format!(
        "{}[limits]\nmax_inbox_items = 1000000\n",
        lan.server_section("srv", &server_id)
    );
    lan.start_daemon("b", &b_config);
    assert!(
        wait_for(Duration::from_secs(10), || lan.status("b")["server"]
            ["connected"]
            .as_bool()
            .unwrap_or(false)
            .then_some(()))
        .is_some(),
        "b never connected\n{}",
        lan.log("b")
    );
    let b_id = lan.status("b")["id"].as_str().unwrap().to_string();
    (lan, server, b_id)
}

/// Publishes `count` numbered pushes to `to` from host pub, one after another, until done or
/// `stop`; returns the numbers that got a 2xx. Failed requests (server down) move on.
fn publisher(
    lan: &Lan,
    to: &str,
    count: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<usize>> {
    publish_to(lan, format!("/v1/terminals/{to}/push"), count, stop)
}

/// [`publisher`] to any push path.
fn publish_to(
    lan: &Lan,
    path: String,
    count: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<usize>> {
    let addr = format!("{}:47780", lan.host("srv").ip);
    lan.spawn_in("pub", move || {
        let mut acknowledged = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..count {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let body = format!(r#"{{"uri":"u://{i}","title":"{i}"}}"#);
            match http_post(&addr, &path, TOKEN, &body) {
                Some(status) if (200..300).contains(&status) => acknowledged.push(i),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        acknowledged
    })
}

fn inbox_numbers(lan: &Lan) -> Vec<usize> {
    let out = handoff(&["inbox", "--json", "--socket", &lan.socket("b")]);
    json_lines(&out.stdout)
        .iter()
        .map(|r| r["title"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Every acknowledged number is in the inbox; nothing is there twice; everything is in order.
fn check_inbox(lan: &Lan, acknowledged: &[usize]) {
    let wanted = acknowledged.last().copied();
    let inbox = wait_for(Duration::from_secs(60), || {
        let inbox = inbox_numbers(lan);
        wanted.is_none_or(|w| inbox.contains(&w)).then_some(inbox)
    })
    .unwrap_or_else(|| {
        panic!(
            "b never received the last acknowledged push\n{}",
            lan.log("b")
        )
    });
    assert!(
        inbox.windows(2).all(|w| w[0] < w[1]),
        "out of order or duplicated: {inbox:?}"
    );
    let missing: Vec<&usize> = acknowledged.iter().filter(|i| !inbox.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost: {missing:?}\n--- b ---\n{}\n--- srv ---\n{}{}",
        lan.log("b"),
        lan.log("srv"),
        lan.log("srv2")
    );
}

#[test]
fn a_server_killed_mid_stream_loses_no_acknowledged_push() {
    if !require_root("durability: SIGKILL of the server") {
        return;
    }
    let (mut lan, server, b_id) = deployment("ck");
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publisher(&lan, &b_id, 3000, stop.clone());
    // Let a few hundred pushes through, then kill the server without warning and restart it.
    wait_for(Duration::from_secs(30), || {
        (inbox_numbers(&lan).len() >= 300).then_some(())
    })
    .expect("pushes flow");
    kill_and_restart_server(&mut lan, server);
    let acknowledged = publishing.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(
        acknowledged.len() > 1000,
        "only {} pushes were acknowledged",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() < 3000,
        "no push failed: the kill did not interrupt publishing"
    );
    check_inbox(&lan, &acknowledged);
    eprintln!(
        "{} of 3000 pushes acknowledged across the kill; all delivered once, in order",
        acknowledged.len()
    );
}

/// Kills the server (process `server`) with SIGKILL and starts it again: same config, same
/// store, its log in `srv2`.
fn kill_and_restart_server(lan: &mut Lan, server: usize) {
    lan.signal(server, libc::SIGKILL);
    assert_eq!(
        lan.wait(server, Duration::from_secs(5)),
        None,
        "killed by a signal, no exit code"
    );
    std::thread::sleep(Duration::from_millis(500));
    let config = lan.path("srv.toml").to_str().unwrap().to_string();
    lan.spawn("srv", &["server", "--config", &config], "srv2");
    assert!(
        wait_for(Duration::from_secs(10), || lan
            .log("srv2")
            .contains("server listening")
            .then_some(()))
        .is_some(),
        "{}",
        lan.log("srv2")
    );
}

/// Pushes to A's followers are stored once, in A's stream, and B reads that stream from its
/// own cursor: across a SIGKILL of the server B still gets every acknowledged one, once, in
/// order, resuming from the stream cursor its inbox kept.
#[test]
fn a_server_killed_mid_fan_out_loses_no_acknowledged_push_to_followers() {
    if !require_root("durability: SIGKILL of the server during a fan-out") {
        return;
    }
    let (mut lan, server, b_id) = deployment_on("cf", &["srv", "a", "b", "pub"]);
    let server_id = id_of(&lan.path("srv"));
    lan.start_daemon(
        "a",
        &format!(
            "{}[trust]\npeers = [\"{b_id}\"]\n",
            lan.server_section("srv", &server_id)
        ),
    );
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    lan.wait_for_peer("b", &a_id);
    // A shows nothing (its inbox entries would not be numbers): the pull links and says so.
    let out = handoff(&["pull", &a_id, "--json", "--socket", &lan.socket("b")]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("linked to"),
        "pull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("b")
    );
    let stop = Arc::new(AtomicBool::new(false));
    let path = format!("/v1/terminals/{a_id}/followers/push");
    let publishing = publish_to(&lan, path, 2000, stop.clone());
    wait_for(Duration::from_secs(30), || {
        (inbox_numbers(&lan).len() >= 200).then_some(())
    })
    .expect("pushes to followers flow");
    kill_and_restart_server(&mut lan, server);
    let acknowledged = publishing.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(
        acknowledged.len() > 500 && acknowledged.len() < 2000,
        "{} of 2000 pushes acknowledged: the kill must interrupt publishing, not stop it",
        acknowledged.len()
    );
    check_inbox(&lan, &acknowledged);
    assert!(
        lan.log("b").matches("connected to server").count() >= 2,
        "b reconnected\n{}",
        lan.log("b")
    );
    eprintln!(
        "{} of 2000 pushes to followers acknowledged across the kill; all delivered once, in order",
        acknowledged.len()
    );
}

#[test]
fn a_terminal_cut_off_from_the_network_gets_everything_after() {
    if !require_root("durability: terminal offline") {
        return;
    }
    let (lan, _server, b_id) = deployment("of");
    let b_ns = lan.host("b").ns.clone();
    let link = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["-n", &b_ns, "link", "set", "eth0", state])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link set {state}");
    };
    let stop = Arc::new(AtomicBool::new(false));
    link("down");
    let acknowledged = publisher(&lan, &b_id, 200, stop).join().unwrap();
    assert_eq!(
        acknowledged.len(),
        200,
        "the server acknowledges pushes for an unreachable terminal"
    );
    let during = inbox_numbers(&lan).len();
    std::thread::sleep(Duration::from_secs(3));
    link("up");
    check_inbox(&lan, &acknowledged);
    assert_eq!(during, 0, "nothing arrived while the link was down");
}
