//! Several server nodes sharing one Redis (issue 6), on a namespace LAN with the built binary:
//! A attached to node 1 and B to node 2 (pull, follow, publish through either node), node 2
//! killed with SIGKILL while pushes flow (B fails over, nothing acknowledged is lost), and Redis
//! losing its data (terminals resync under a new epoch).
//!
//! Each test starts its own `redis-server` on a Unix socket in a private directory (no TCP at
//! all); the server processes in the namespaces reach it through the file system.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff::testing::redis::RedisServer;
use support::*;

const TOKEN: &str = "cluster-test-token";

/// Starts a server node on `host` using `redis` and the shared key in `key_dir`, with its HTTP
/// API on port 47780.
fn start_node(lan: &mut Lan, host: &str, redis: &RedisServer, key_dir: &std::path::Path) -> usize {
    let state = lan.path(host);
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // One deployment, one identity: every node holds the same key file.
    let key = state.join("identity.key");
    std::fs::copy(key_dir.join("identity.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token = lan.path("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let extra = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n[http]\nlisten = \"{}\"\ntoken_file = \"{}\"\n",
        redis.url(),
        lan.host(host).addr(47780),
        token.display()
    );
    let config = lan.server_config(host, &extra);
    let index = lan.spawn(host, &["server", "--config", &config], host);
    wait_for(Duration::from_secs(10), || {
        lan.log(host).contains("server listening").then_some(())
    })
    .unwrap_or_else(|| panic!("node {host} did not start\n{}", lan.log(host)));
    index
}

fn server_addrs(lan: &Lan, id: &str, nodes: &[&str]) -> String {
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("\"{}\"", lan.host(n).addr(47700)))
        .collect();
    format!("[server]\naddrs = [{}]\nid = \"{id}\"\n", addrs.join(", "))
}

fn wait_connected(lan: &Lan, host: &str) {
    wait_for(Duration::from_secs(30), || {
        (lan.status(host)["server"]["connected"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("{host} never connected to a node\n{}", lan.log(host)));
}

fn inbox_titles(lan: &Lan, host: &str) -> Vec<String> {
    let out = handoff(&["inbox", "--json", "--socket", &lan.socket(host)]);
    json_lines(&out.stdout)
        .iter()
        .map(|r| r["title"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `host`'s inbox ends with `title`; returns the inbox.
fn wait_for_title(lan: &Lan, host: &str, title: &str) -> Vec<String> {
    wait_for(Duration::from_secs(60), || {
        let inbox = inbox_titles(lan, host);
        inbox.iter().any(|t| t == title).then_some(inbox)
    })
    .unwrap_or_else(|| panic!("{host} never received {title:?}\n{}", lan.log(host)))
}

fn publish(lan: &Lan, via: &str, path: &str, title: &str) -> Option<u16> {
    let addr = lan.host(via).addr(47780);
    let (path, body) = (
        path.to_string(),
        format!(r#"{{"uri":"u://{title}","title":"{title}"}}"#),
    );
    lan.run_in("pub", move || http_post(&addr, &path, TOKEN, &body))
}

#[test]
fn terminals_on_different_nodes_hand_off_and_survive_a_node_killed() {
    if !require_root("terminals_on_different_nodes_hand_off_and_survive_a_node_killed") {
        return;
    }
    let Some(redis) = RedisServer::start_or_skip("cluster: cross-node delivery") else {
        return;
    };
    let mut lan = Lan::new("clu", &["n1", "n2", "a", "b", "pub"]);
    let key_dir = lan.path("deployment");
    let server_id = id_of(&key_dir);
    start_node(&mut lan, "n1", &redis, &key_dir);
    let node2 = start_node(&mut lan, "n2", &redis, &key_dir);
    assert_eq!(
        id_of(&lan.path("n2")),
        server_id,
        "both nodes hold one identity"
    );

    let b_id = id_of(&lan.path("b"));
    let a_server = server_addrs(&lan, &server_id, &["n1"]);
    lan.start_daemon("a", &format!("{a_server}[trust]\npeers = [\"{b_id}\"]\n"));
    // B prefers node 2 and fails over to node 1.
    lan.start_daemon("b", &server_addrs(&lan, &server_id, &["n2", "n1"]));
    wait_connected(&lan, "a");
    wait_connected(&lan, "b");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    assert!(
        lan.log("b").contains(&lan.host("n2").ip),
        "B is on node 2\n{}",
        lan.log("b")
    );

    // Pull: A's session (stored through node 1) reaches B through node 2.
    assert!(lan
        .session_set("a", "https://m.example/1", "One")
        .status
        .success());
    lan.wait_for_peer("b", &a_id);
    let out = handoff(&["pull", &a_id, "--json", "--socket", &lan.socket("b")]);
    assert!(
        out.status.success(),
        "pull: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("b"),
        lan.log("n2")
    );
    assert_eq!(json_lines(&out.stdout)[0]["title"], "One");

    // Follow: A's next change, stored by node 1, is pushed to B by node 2.
    assert!(lan
        .session_set("a", "https://m.example/2", "Two")
        .status
        .success());
    wait_for_title(&lan, "b", "Two");

    // Publish through either node's HTTP API: to B, and to A's followers (B).
    let to_b = format!("/v1/terminals/{b_id}/push");
    let followers = format!("/v1/terminals/{a_id}/followers/push");
    assert_eq!(
        publish(&lan, "n1", &to_b, "via-n1").map(|s| s / 100),
        Some(2)
    );
    assert_eq!(
        publish(&lan, "n2", &to_b, "via-n2").map(|s| s / 100),
        Some(2)
    );
    assert_eq!(
        publish(&lan, "n1", &followers, "fan-n1").map(|s| s / 100),
        Some(2)
    );
    let inbox = wait_for_title(&lan, "b", "fan-n1");
    assert_eq!(
        inbox,
        ["One", "Two", "via-n1", "via-n2", "fan-n1"],
        "in order, once"
    );

    // Node 2 (B's) is killed while a publisher pushes through node 1.
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let addr = lan.host("n1").addr(47780);
        let stop = stop.clone();
        lan.spawn_in("pub", move || {
            let mut acknowledged = Vec::new();
            for i in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = format!(r#"{{"uri":"u://{i}","title":"n{i}"}}"#);
                match http_post(&addr, &to_b, TOKEN, &body) {
                    Some(s) if (200..300).contains(&s) => acknowledged.push(format!("n{i}")),
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            acknowledged
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    lan.signal(node2, libc::SIGKILL);
    // B notices (idle timeout) and fails over to node 1.
    wait_for(Duration::from_secs(40), || {
        (lan.log("b").matches("connected to server").count() >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("B did not fail over\n{}", lan.log("b")));
    eprintln!(
        "B failed over {:?} after node 2 was killed",
        killed.elapsed()
    );
    let acknowledged = publishing.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(
        acknowledged.len() > 300,
        "node 1 kept acknowledging: {}",
        acknowledged.len()
    );
    let last = acknowledged.last().unwrap().clone();
    let inbox = wait_for_title(&lan, "b", &last);
    let received: Vec<&String> = inbox.iter().filter(|t| t.starts_with('n')).collect();
    let wanted: Vec<&String> = acknowledged.iter().collect();
    assert_eq!(received, wanted, "every acknowledged push once, in order");
}

#[test]
fn redis_losing_its_data_makes_terminals_resync_under_a_new_epoch() {
    if !require_root("redis_losing_its_data_makes_terminals_resync_under_a_new_epoch") {
        return;
    }
    let Some(redis) = RedisServer::start_or_skip("cluster: redis flushed") else {
        return;
    };
    let mut lan = Lan::new("flu", &["n1", "b", "pub"]);
    let key_dir = lan.path("deployment");
    let server_id = id_of(&key_dir);
    start_node(&mut lan, "n1", &redis, &key_dir);
    lan.start_daemon("b", &server_addrs(&lan, &server_id, &["n1"]));
    wait_connected(&lan, "b");
    let b_id = lan.status("b")["id"].as_str().unwrap().to_string();
    let to_b = format!("/v1/terminals/{b_id}/push");
    assert_eq!(
        publish(&lan, "n1", &to_b, "before").map(|s| s / 100),
        Some(2)
    );
    wait_for_title(&lan, "b", "before");

    redis.command(&["FLUSHALL"]).unwrap();
    // The node notices (at its next write or heartbeat), closes B's connection; B says hello
    // with its old cursor and is told the window was lost.
    wait_for(Duration::from_secs(40), || {
        let lost = lan.status("b")["counters"]["handoff_push_windows_lost_total"].as_u64();
        (lost == Some(1)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "B was never told\nB:\n{}\nnode:\n{}",
            lan.log("b"),
            lan.log("n1")
        )
    });
    assert!(lan.log("n1").contains("new epoch"), "{}", lan.log("n1"));
    wait_connected(&lan, "b");
    let epochs: Vec<String> = lan
        .log("b")
        .lines()
        .filter(|l| l.contains("connected to server"))
        .filter_map(|l| l.split("epoch=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    assert!(
        epochs.len() >= 2 && epochs[0] != epochs[epochs.len() - 1],
        "{epochs:?}"
    );

    // The new log delivers, and the old push is not delivered again.
    assert_eq!(
        publish(&lan, "n1", &to_b, "after").map(|s| s / 100),
        Some(2)
    );
    let inbox = wait_for_title(&lan, "b", "after");
    assert_eq!(inbox, ["before", "after"]);
}
