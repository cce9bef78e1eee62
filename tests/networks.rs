//! The networks people have (issue 5), on namespace LANs with the built binary: IPv6 only (with
//! link-local addresses and their scope), an interface going down and up, addresses changing, a
//! terminal on two networks, and `handoff doctor` telling a blocked server apart.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Sets A's session, waits until B lists A, and pulls it from B: the first push is A's session.
fn pull_works(lan: &Lan, a_id: &str, title: &str) {
    let out = handoff(&["pull", a_id, "--json", "--socket", &lan.socket("b")]);
    assert!(
        out.status.success(),
        "pull: {}\nA:\n{}\nB:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("a"),
        lan.log("b")
    );
    assert_eq!(json_lines(&out.stdout)[0]["title"], title);
}

/// Starts the server on host srv, A attached to it and trusting B, and B; returns A's ID.
fn server_a_trusting_b(lan: &mut Lan) -> String {
    let (_, server_id) = lan.start_server("srv");
    let b_id = id_of(&lan.path("b"));
    let server = lan.server_section("srv", &server_id);
    lan.start_daemon("a", &format!("{server}[trust]\npeers = [\"{b_id}\"]\n"));
    lan.start_daemon("b", "");
    lan.status("a")["id"].as_str().unwrap().to_string()
}

/// Starts the daemon on `host` with mDNS on `interfaces` (a TOML list) instead of eth0.
fn start_daemon_on(lan: &mut Lan, host: &str, interfaces: &str, extra: &str) {
    let config = lan.daemon_config(host, extra);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "interfaces = [\"eth0\"]",
        &format!("interfaces = {interfaces}"),
    );
    std::fs::write(&config, text).unwrap();
    lan.launch_daemon(host, &config);
}

fn addrs(peer: &serde_json::Value) -> Vec<String> {
    peer["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn handoff_on_an_ipv6_only_lan() {
    if !require_root("handoff_on_an_ipv6_only_lan") {
        return;
    }
    let mut lan = Lan::with_stack("v6", &["srv", "a", "b"], Stack::V6Only);
    let a_id = server_a_trusting_b(&mut lan);
    let out = lan.session_set("a", "https://m.example/v6", "Over IPv6");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("a")
    );

    // B lists A with its ULA and its link-local address, the latter with its interface scope.
    let peer = wait_for(Duration::from_secs(20), || {
        lan.peers("b")
            .into_iter()
            .find(|p| p["id"] == a_id.as_str() && addrs(p).iter().any(|a| a.starts_with("fe80::")))
    })
    .unwrap_or_else(|| {
        panic!(
            "B never listed A with a link-local address\n{}",
            lan.log("b")
        )
    });
    let listed = addrs(&peer);
    assert!(listed.contains(&"fd99::2".to_string()), "{listed:?}");
    assert!(
        listed
            .iter()
            .any(|a| a.starts_with("fe80::") && a.contains('%')),
        "link-local without scope: {listed:?}"
    );
    assert!(
        listed.iter().all(|a| a.contains(':')),
        "an IPv4 address on an IPv6-only LAN: {listed:?}"
    );
    pull_works(&lan, &a_id, "Over IPv6");

    // With its ULA gone, A is still reachable through its link-local address (with scope).
    lan.ip_in("a", &["addr", "del", "fd99::2/64", "dev", "eth0"]);
    let out = handoff(&["pull", &a_id, "--json", "--socket", &lan.socket("b")]);
    assert!(
        out.status.success(),
        "pull over link-local: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("b")
    );
}

#[test]
fn discovery_recovers_when_an_interface_goes_down_and_up() {
    if !require_root("discovery_recovers_when_an_interface_goes_down_and_up") {
        return;
    }
    let mut lan = Lan::new("ifud", &["srv", "a", "b"]);
    let a_id = server_a_trusting_b(&mut lan);
    assert!(lan
        .session_set("a", "https://m.example/1", "Before")
        .status
        .success());
    lan.wait_for_peer("b", &a_id);

    // Down: A is unreachable, so B drops it (liveness), well within 30 s.
    lan.ip_in("a", &["link", "set", "eth0", "down"]);
    let down = Instant::now();
    wait_for(Duration::from_secs(30), || {
        (!lan.peers("b").iter().any(|p| p["id"] == a_id.as_str())).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "B still lists A 30 s after its link went down\n{}",
            lan.log("b")
        )
    });
    eprintln!(
        "A left B's peers {:?} after its link went down",
        down.elapsed()
    );

    // Up again, on a new address: A announces itself again, B lists the new address, and the
    // handoff works (A's server link reconnects too).
    lan.ip_in("a", &["addr", "flush", "dev", "eth0"]);
    lan.ip_in("a", &["addr", "add", "10.99.0.22/24", "dev", "eth0"]);
    lan.ip_in("a", &["link", "set", "eth0", "up"]);
    let up = Instant::now();
    let peer = wait_for(Duration::from_secs(30), || {
        lan.peers("b")
            .into_iter()
            .find(|p| p["id"] == a_id.as_str() && addrs(p).contains(&"10.99.0.22".to_string()))
    })
    .unwrap_or_else(|| {
        panic!(
            "B never saw A again on 10.99.0.22\nA:\n{}\nB:\n{}",
            lan.log("a"),
            lan.log("b")
        )
    });
    eprintln!(
        "B listed A again {:?} after its link came back: {:?}",
        up.elapsed(),
        addrs(&peer)
    );
    wait_for(Duration::from_secs(30), || {
        (lan.status("a")["server"]["connected"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("A did not reconnect to its server\n{}", lan.log("a")));
    assert!(lan
        .session_set("a", "https://m.example/2", "After")
        .status
        .success());
    pull_works(&lan, &a_id, "After");
}

#[test]
fn a_dual_homed_terminal_is_reachable_from_both_networks() {
    if !require_root("a_dual_homed_terminal_is_reachable_from_both_networks") {
        return;
    }
    // srv, a and b on 10.99.0.0/24; a and c (and srv, for c's server traffic) on 10.98.0.0/24.
    let mut lan = Lan::new("dual", &["srv", "a", "b", "c"]);
    // Move c to the second network only.
    lan.ip_in("c", &["link", "set", "eth0", "down"]);
    lan.attach("c", "two", "eth1", "10.98.0.3/24");
    lan.attach("a", "two", "eth1", "10.98.0.2/24");
    lan.attach("srv", "two", "eth1", "10.98.0.1/24");
    // c reaches the server's first address through its second one (the server holds both).
    lan.ip_in("c", &["route", "add", "10.99.0.0/24", "via", "10.98.0.1"]);
    let (_, server_id) = lan.start_server("srv");
    let b_id = id_of(&lan.path("b"));
    let c_id = id_of(&lan.path("c"));
    let server = lan.server_section("srv", &server_id);
    start_daemon_on(
        &mut lan,
        "a",
        r#"["eth0", "eth1"]"#,
        &format!("{server}[trust]\npeers = [\"{b_id}\", \"{c_id}\"]\n"),
    );
    lan.start_daemon("b", "");
    start_daemon_on(&mut lan, "c", r#"["eth1"]"#, "");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    assert!(lan
        .session_set("a", "https://m.example/dual", "Both sides")
        .status
        .success());

    for (on, own_net) in [("b", "10.99.0.2"), ("c", "10.98.0.2")] {
        let peer = wait_for(Duration::from_secs(20), || {
            lan.peers(on)
                .into_iter()
                .find(|p| p["id"] == a_id.as_str() && addrs(p).contains(&own_net.to_string()))
        })
        .unwrap_or_else(|| panic!("{on} never listed A at {own_net}\n{}", lan.log(on)));
        eprintln!("{on} lists A at {:?}", addrs(&peer));
        let out = handoff(&["pull", &a_id, "--json", "--socket", &lan.socket(on)]);
        assert!(
            out.status.success(),
            "pull from {on}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lan.log(on)
        );
        assert_eq!(json_lines(&out.stdout)[0]["title"], "Both sides");
    }
}

#[test]
fn doctor_reports_a_blocked_server_as_not_ok() {
    if !require_root("doctor_reports_a_blocked_server_as_not_ok") {
        return;
    }
    let mut lan = Lan::new("doc", &["srv", "a", "b"]);
    let (_, server_id) = lan.start_server("srv");
    let server = lan.server_section("srv", &server_id);
    lan.start_daemon("a", &server);
    lan.start_daemon("b", "");
    let b_id = lan.status("b")["id"].as_str().unwrap().to_string();
    lan.wait_for_peer("a", &b_id);
    let config = lan.path("a.toml");
    let doctor = |lan: &Lan| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lan.host("a").ns,
                BIN,
                "doctor",
                "--json",
                "--wait",
                "3",
            ])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let lines = json_lines(&out.stdout);
        (
            out.status.code(),
            lines,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let find = |lines: &[serde_json::Value], prefix: &str| {
        lines
            .iter()
            .find(|l| l["check"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no {prefix} line in {lines:?}"))
    };

    // Everything reachable: all ok, exit 0.
    let (code, lines, stderr) = doctor(&lan);
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}");
    assert_eq!(find(&lines, "interface eth0")["ok"], true);
    assert_eq!(find(&lines, "multicast eth0")["ok"], true);
    assert_eq!(find(&lines, "daemon")["ok"], true);
    assert_eq!(find(&lines, "server ")["ok"], true);
    let peer = find(&lines, "peer b");
    assert_eq!(peer["ok"], true, "{peer}");
    let firewall = find(&lines, "firewall");
    assert!(
        firewall["detail"].as_str().unwrap().contains("UDP 5353"),
        "{firewall}"
    );

    // The server's answers to A are dropped: the server line is not ok, with a firewall hint.
    lan.ip_in(
        "srv",
        &[
            "route",
            "add",
            "blackhole",
            &format!("{}/32", lan.host("a").ip),
        ],
    );
    let (code, lines, stderr) = doctor(&lan);
    assert_eq!(code, Some(1), "{lines:?}");
    assert!(stderr.starts_with("error:"), "{stderr}");
    let server_line = find(&lines, "server ");
    assert_eq!(server_line["ok"], false, "{server_line}");
    assert!(
        server_line["detail"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "{server_line}"
    );
    assert!(
        server_line["hint"].as_str().unwrap().contains("UDP 47700"),
        "{server_line}"
    );
    assert_eq!(find(&lines, "peer b")["ok"], true, "peers are still fine");

    // A wrong pinned id is told apart from a blocked path.
    lan.ip_in(
        "srv",
        &[
            "route",
            "del",
            "blackhole",
            &format!("{}/32", lan.host("a").ip),
        ],
    );
    let wrong = id_of(&lan.path("someone-else"));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&server_id, &wrong);
    std::fs::write(&config, text).unwrap();
    let (code, lines, _) = doctor(&lan);
    assert_eq!(code, Some(1));
    let server_line = find(&lines, "server ");
    assert!(
        server_line["hint"]
            .as_str()
            .unwrap()
            .contains("another key"),
        "{server_line}"
    );

    // A configured interface that does not exist is named.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("interfaces = [\"eth0\"]", "interfaces = [\"eth7\"]");
    std::fs::write(&config, text).unwrap();
    let (_, lines, _) = doctor(&lan);
    let line = find(&lines, "interface eth7");
    assert_eq!(line["ok"], false);
    assert_eq!(line["detail"], "does not exist");
}

use std::process::Command;
