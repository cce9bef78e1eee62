//! `[discovery] interfaces` as a daemon and `handoff doctor` see them (issue 12.7): a named
//! interface that does not exist is warned about when the daemon starts, and loopback — where
//! mDNS works although `lo` has no multicast flag — is not reported as broken by the doctor.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

/// A daemon config on host `a` of `lan`: loopback QUIC on `port`, mDNS on `interfaces`.
fn config(lan: &Lan, name: &str, port: u16, interfaces: &str) -> String {
    let path = lan.path(&format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
         [discovery]\ninterfaces = {interfaces}\n[quic]\nlisten = \"127.0.0.1:{port}\"\n",
        lan.path(name).display(),
        lan.path(&format!("{name}.sock")).display(),
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn start(lan: &mut Lan, name: &str, config: &str) {
    lan.spawn("a", &["daemon", "--config", config], name);
    assert!(
        wait_for_socket(&lan.path(&format!("{name}.sock")), Duration::from_secs(20)),
        "{name} did not start:\n{}",
        lan.log(name)
    );
}

#[test]
fn doctor_passes_loopback_and_the_daemon_warns_of_a_missing_interface() {
    if !require_root("doctor_passes_loopback_and_the_daemon_warns_of_a_missing_interface") {
        return;
    }
    let mut lan = Lan::new("ifs", &["a"]);
    let other = config(&lan, "other", 47601, "[\"lo\", \"nosuch0\"]");
    start(&mut lan, "other", &other);
    let me = config(&lan, "me", 47600, "[\"lo\"]");
    start(&mut lan, "me", &me);

    // The daemon runs, and says at start that it cannot use nosuch0 (and nothing about lo).
    let log = lan.log("other");
    let warning = log
        .lines()
        .find(|l| l.contains("nosuch0"))
        .unwrap_or_else(|| panic!("no warning about nosuch0:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("does not exist"), "{warning}");
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("interface lo")),
        "{log}"
    );

    let out = Command::new("ip")
        .args(["netns", "exec", &lan.host("a").ns, BIN, "doctor", "--json"])
        .args(["--wait", "5", "--config", &me])
        .output()
        .unwrap();
    let lines = json_lines(&out.stdout);
    let find = |prefix: &str| {
        lines
            .iter()
            .find(|l| l["check"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no {prefix} line in {lines:?}"))
    };
    let interface = find("interface lo");
    assert_eq!(interface["ok"], true, "{interface}");
    let multicast = find("multicast lo");
    assert_eq!(multicast["ok"], true, "{multicast}");
    // Discovery on lo works: the doctor finds the other daemon there and reaches it.
    let peer = find("peer other");
    assert_eq!(peer["ok"], true, "{peer}");
    assert_eq!(find("daemon")["ok"], true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
