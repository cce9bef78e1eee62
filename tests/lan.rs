//! End to end with the built binary on a LAN of network namespaces (DESIGN §10): a server host and
//! terminal hosts A, B, C; real mDNS across a bridge, real QUIC, the CLI driving the daemons
//! through their control sockets.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

const DISCOVERY_WAIT: Duration = Duration::from_secs(20);

#[test]
fn handoff_across_a_namespace_lan() {
    if !require_root("handoff_across_a_namespace_lan") {
        return;
    }
    let mut lan = Lan::new("e2e", &["srv", "a", "b", "c"]);
    let server_id = id_of(&lan.path("srv"));
    let b_id = id_of(&lan.path("b"));
    let server_ip = lan.host("srv").ip.clone();

    let server_config = lan.path("srv.toml");
    std::fs::write(
        &server_config,
        format!("state_dir = \"{}\"\n[quic]\nlisten = \"{server_ip}:47700\"\n[store]\nkind = \"memory\"\n", lan.path("srv").display()),
    )
    .unwrap();
    let a_config = lan.daemon_config("a",
        &format!("[server]\naddr = \"{server_ip}:47700\"\nid = \"{server_id}\"\n[trust]\naccept = \"trusted\"\npeers = [\"{b_id}\"]\n"),
    );
    let hook_file = lan.path("hook.txt");
    let b_config = lan.daemon_config("b",
        &format!(
            "[hooks]\non_push = [\"/bin/sh\", \"-c\", \"printf '%s|%s\\\\n' \\\"$1\\\" \\\"$2\\\" >> {}\", \"hook\", \"{{uri}}\", \"{{title}}\"]\n",
            hook_file.display()
        ),
    );
    let c_config = lan.daemon_config("c", "");
    for config in [&a_config, &b_config, &c_config] {
        let out = handoff(&["config", "check", "--config", config]);
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    lan.spawn(
        "srv",
        &["server", "--config", server_config.to_str().unwrap()],
        "srv",
    );
    let a = lan.spawn("a", &["daemon", "--config", &a_config], "a");
    lan.spawn("b", &["daemon", "--config", &b_config], "b");
    lan.spawn("c", &["daemon", "--config", &c_config], "c");
    for name in ["a", "b", "c"] {
        assert!(
            wait_for_socket(&lan.path(&format!("{name}.sock")), Duration::from_secs(10)),
            "{name} did not start:\n{}",
            lan.log(name)
        );
    }
    let a_id = handoff(&["status", "--json", "--socket", &lan.socket("a")]);
    let a_status: serde_json::Value = serde_json::from_slice(&a_id.stdout).unwrap();
    let a_id = a_status["id"].as_str().unwrap().to_string();

    // A sets a session; its server stores it.
    let out = handoff(&[
        "session",
        "set",
        "--socket",
        &lan.socket("a"),
        "--uri",
        "https://media.example/bbb.mp4",
        "--title",
        "Big Buck Bunny",
        "--position",
        "12",
        "--meta",
        "kind=video",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "server did not confirm: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("a")
    );

    // B lists A, over real mDNS across the bridge.
    let a_peer = wait_for(DISCOVERY_WAIT, || {
        lan.peers("b")
            .into_iter()
            .find(|p| p["id"] == a_id.as_str())
    })
    .unwrap_or_else(|| panic!("B never listed A\n{}", lan.log("b")));
    assert_eq!(a_peer["name"], "a");
    assert_eq!(a_peer["port"], 47600);
    assert_eq!(a_peer["trusted"], false);
    assert!(
        a_peer["addrs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "10.99.0.2"),
        "{a_peer}"
    );

    // B pulls A: the first push is A's session.
    let out = handoff(&["pull", "a", "--json", "--socket", &lan.socket("b")]);
    assert!(
        out.status.success(),
        "pull failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("b")
    );
    let pushed = json_lines(&out.stdout);
    assert_eq!(pushed.len(), 1);
    let first = &pushed[0];
    assert_eq!(first["from"], a_id.as_str());
    assert_eq!(first["uri"], "https://media.example/bbb.mp4");
    assert_eq!(first["title"], "Big Buck Bunny");
    assert_eq!(first["position"], 12.0);
    assert_eq!(first["meta"]["kind"], "video");
    assert!(first["body"].is_null());

    // B's watch prints A's next change.
    let mut watch = Command::new(BIN)
        .args(["watch", "--json", "--socket", &lan.socket("b")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the watcher time to subscribe before the change it must see.
    std::thread::sleep(Duration::from_millis(500));
    let out = lan.session_set("a", "https://media.example/sintel.mp4", "Sintel");
    assert!(out.status.success());
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("watch printed nothing\n{}", lan.log("b")));
    let change: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(change["title"], "Sintel");
    assert_eq!(change["from"], a_id.as_str());
    assert!(change["offset"].as_u64() > first["offset"].as_u64());
    let _ = watch.kill();
    let _ = watch.wait();

    // The on_push hook ran for both pushes.
    let hooked = wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&hook_file).unwrap_or_default();
        (text.lines().count() >= 2).then_some(text)
    })
    .unwrap_or_else(|| panic!("hook did not run\n{}", lan.log("b")));
    assert_eq!(
        hooked.lines().collect::<Vec<_>>(),
        [
            "https://media.example/bbb.mp4|Big Buck Bunny",
            "https://media.example/sintel.mp4|Sintel"
        ]
    );

    // The inbox kept both, oldest first.
    let out = handoff(&["inbox", "--json", "--socket", &lan.socket("b")]);
    let inbox = json_lines(&out.stdout);
    let titles: Vec<&str> = inbox.iter().map(|i| i["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["Big Buck Bunny", "Sintel"]);

    // C, which A does not trust, is refused with a clear error.
    wait_for(DISCOVERY_WAIT, || {
        lan.peers("c")
            .into_iter()
            .find(|p| p["id"] == a_id.as_str())
    })
    .expect("C lists A");
    let out = handoff(&["pull", "a", "--socket", &lan.socket("c")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error:")
            && stderr.contains("refused")
            && stderr.contains("not trusted"),
        "{stderr}"
    );
    assert!(
        lan.log("a").contains("not trusted"),
        "A logs the refusal with C's id"
    );

    // SIGTERM of A: B drops it within 3 s, and A exits cleanly.
    let before = Instant::now();
    lan.signal(a, libc::SIGTERM);
    let gone = wait_for(Duration::from_secs(3), || {
        (!lan.peers("b").iter().any(|p| p["id"] == a_id.as_str())).then_some(())
    });
    let elapsed = before.elapsed();
    assert!(
        gone.is_some(),
        "B still lists A {elapsed:?} after SIGTERM\n{}",
        lan.log("b")
    );
    assert_eq!(
        lan.wait(a, Duration::from_secs(10)),
        Some(0),
        "A's exit\n{}",
        lan.log("a")
    );
    eprintln!("A left B's peers {elapsed:?} after SIGTERM");
}

#[test]
fn a_peer_killed_without_goodbye_leaves_the_peer_table() {
    if !require_root("a_peer_killed_without_goodbye_leaves_the_peer_table") {
        return;
    }
    let mut lan = Lan::new("kill", &["a", "b"]);
    let a = lan.start_daemon("a", "");
    lan.start_daemon("b", "");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    lan.wait_for_peer("b", &a_id);
    // SIGKILL: no goodbye. The records' TTL is 120 s; liveness checks must drop it well before.
    let killed = Instant::now();
    lan.signal(a, libc::SIGKILL);
    let gone = wait_for(Duration::from_secs(30), || {
        (!lan.peers("b").iter().any(|p| p["id"] == a_id.as_str())).then_some(())
    });
    assert!(
        gone.is_some(),
        "B still lists A 30 s after it was killed\n{}",
        lan.log("b")
    );
    eprintln!("a killed peer left B's table after {:?}", killed.elapsed());
}

#[test]
fn daemon_and_server_tell_systemd_when_ready_and_stopping() {
    if !require_root("daemon_and_server_tell_systemd_when_ready_and_stopping") {
        return;
    }
    let mut lan = Lan::new("sdn", &["srv", "a"]);
    for (host, program) in [("srv", "server"), ("a", "daemon")] {
        let socket_path = lan.path(&format!("{host}.notify"));
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let config = if program == "server" {
            lan.server_config(host, "")
        } else {
            lan.daemon_config(host, "")
        };
        let env = [
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ];
        let child = lan.spawn_env(host, &[program, "--config", &config], host, &env);
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        // READY=1 first (nothing before it but, possibly, nothing at all), then watchdog pings.
        while seen
            .iter()
            .filter(|m: &&String| m.starts_with("WATCHDOG=1"))
            .count()
            < 2
        {
            let n = socket.recv(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{program}: no notification ({e}); saw {seen:?}\n{}",
                    lan.log(host)
                )
            });
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(seen[0].starts_with("READY=1"), "{program}: {seen:?}");
        if program == "daemon" {
            assert!(
                wait_for_socket(&lan.path("a.sock"), Duration::from_secs(1)),
                "READY=1 came before the daemon served"
            );
        }
        lan.signal(child, libc::SIGTERM);
        let stopping = loop {
            let n = socket.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message != "WATCHDOG=1" {
                break message;
            }
        };
        assert_eq!(stopping, "STOPPING=1", "{program}");
        assert_eq!(
            lan.wait(child, Duration::from_secs(10)),
            Some(0),
            "{program} exit\n{}",
            lan.log(host)
        );
    }
}

/// SIGHUP reloads the trust list without dropping the server connection: B, refused before,
/// can pull A after A's config trusts it. A changed `quic.listen` is named as needing a restart.
/// A's optional metrics listener reports the refusal and the pull.
#[test]
fn sighup_reloads_the_trust_list_without_dropping_connections() {
    if !require_root("sighup_reloads_the_trust_list_without_dropping_connections") {
        return;
    }
    let mut lan = Lan::new("hup", &["srv", "a", "b"]);
    let (_, server_id) = lan.start_server("srv");
    let b_id = id_of(&lan.path("b"));
    let a_ip = lan.host("a").ip.clone();
    let server = lan.server_section("srv", &server_id);
    let metrics = format!("[metrics]\nlisten = \"{a_ip}:47690\"\n");
    let a = lan.start_daemon("a", &format!("{server}{metrics}"));
    lan.start_daemon("b", "");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    assert_eq!(lan.status("a")["metrics"], format!("{a_ip}:47690"));
    assert!(lan
        .session_set("a", "https://m.example/1", "One")
        .status
        .success());
    lan.wait_for_peer("b", &a_id);
    // The metrics below count A's discovery of B. B seeing A says nothing about it: A learns
    // of B only from B's announcement, which follows B's own probing (about 0.75 s), and on a
    // loaded machine everything up to the metrics check can finish before that.
    lan.wait_for_peer("a", &b_id);

    let out = handoff(&["pull", &a_id, "--socket", &lan.socket("b")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not trusted"),
        "{stderr}"
    );

    // Trust B in the file (and change something that cannot be reloaded), then SIGHUP.
    lan.daemon_config(
        "a",
        &format!("{server}{metrics}[trust]\npeers = [\"{b_id}\"]\n[log]\nlevel = \"debug\"\n"),
    );
    let config = lan.path("a.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[::]:47600", "[::]:47601");
    std::fs::write(&config, text).unwrap();
    lan.signal(a, libc::SIGHUP);
    wait_for(Duration::from_secs(10), || {
        lan.log("a").contains("config reloaded").then_some(())
    })
    .unwrap_or_else(|| panic!("A did not reload\n{}", lan.log("a")));
    let log = lan.log("a");
    assert!(
        log.contains("trust.peers: +1 -0") && log.contains("quic.listen"),
        "{log}"
    );
    assert_eq!(lan.status("a")["trusted"], 1);

    let out = handoff(&["pull", &a_id, "--json", "--socket", &lan.socket("b")]);
    assert!(
        out.status.success(),
        "pull after reload: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lan.log("a")
    );
    assert_eq!(json_lines(&out.stdout)[0]["title"], "One");
    // Still the one server connection, and still serving on the old port.
    let log = lan.log("a");
    assert_eq!(log.matches("connected to server").count(), 1, "{log}");
    assert_eq!(lan.status("a")["server"]["connected"], true);
    assert!(lan.status("a")["quic"]
        .as_str()
        .unwrap()
        .ends_with(":47600"));
    // The debug level applies from now on.
    assert!(
        log.contains("DEBUG"),
        "no debug lines after the reload\n{log}"
    );

    // A bad config is refused and the running one kept.
    std::fs::write(&config, "nmae = 1\n").unwrap();
    lan.signal(a, libc::SIGHUP);
    wait_for(Duration::from_secs(10), || {
        lan.log("a").contains("config not reloaded").then_some(())
    })
    .unwrap_or_else(|| panic!("A did not refuse the bad config\n{}", lan.log("a")));
    assert!(lan.log("a").contains("nmae"));
    assert_eq!(lan.status("a")["trusted"], 1);

    // The metrics listener (in A's namespace) shows the refusal and the pull it served.
    let text = lan.run_in("b", move || http_get(&format!("{a_ip}:47690"), "/metrics"));
    let text = text.unwrap_or_else(|| panic!("no metrics\n{}", lan.log("a")));
    assert!(
        text.contains("handoff_refusals_total{reason=\"not_trusted\"} 1"),
        "{text}"
    );
    assert!(text.contains("handoff_interface_info_total 1"), "{text}");
    assert!(text.contains("handoff_server_connected 1"), "{text}");
    assert!(
        text.contains("handoff_discovery_events_total{event=\"resolved\"}"),
        "{text}"
    );

    // Dropping B from the file and reloading ends B's live link at the server at once, as
    // `handoff untrust` does: A's next change does not reach B.
    lan.daemon_config("a", &format!("{server}{metrics}"));
    lan.signal(a, libc::SIGHUP);
    wait_for(Duration::from_secs(10), || {
        lan.log("a")
            .contains("no longer trusted after reload")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("A did not revoke B\n{}", lan.log("a")));
    assert!(
        lan.log("a").contains("revoked=Some(true)"),
        "{}",
        lan.log("a")
    );
    assert!(lan
        .session_set("a", "https://m.example/2", "Two")
        .status
        .success());
    std::thread::sleep(Duration::from_secs(2));
    let out = handoff(&["inbox", "--json", "--socket", &lan.socket("b")]);
    let titles: Vec<String> = json_lines(&out.stdout)
        .iter()
        .map(|r| r["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        titles,
        ["One"],
        "B still received A's change after the reload"
    );
}
