//! Remote text reaching the `on_push` hook (issue 10.5), in process: a publisher (anyone the
//! server's token admits, or any server a peer names) chooses the uri and title of a push. The
//! hook gets them only as data: one-pass substitution, no argument starting with '-', only the
//! allowed uri schemes, no control or bidi characters.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::inproc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_text_reaches_the_hook_only_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let out = dir.path().join("hook.out");
    let mut config = terminal(dir.path(), "b", Some(&server), vec![]);
    config.on_push = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf '%s|%s\\n' \"$1\" \"$2\" >> {}", out.display()),
        "hook".into(),
        "{uri}".into(),
        "{title}".into(),
    ];
    let b = start(config).await;
    wait_connected(&b).await;
    let path = format!("/v1/terminals/{}/push", b.id());
    let pushes = [
        // Would be an option to the program: refused.
        (
            "https://media.example/1",
            "--log-file=/var/lib/handoff/trust.json",
        ),
        // Schemes outside [hooks] schemes: refused.
        ("file:///etc/passwd", "local"),
        ("javascript:alert(1)", "script"),
        ("-o/tmp/x", "dash uri"),
        // Placeholders inside values stay literal.
        ("https://media.example/{title}", "t{uri}{from}"),
        // Control and bidi characters are dropped.
        ("https://media.example/5", "a\u{1b}[2Jb\u{202E}c"),
        ("https://media.example/done", "done"),
    ];
    for (uri, title) in pushes {
        let body = serde_json::json!({ "uri": uri, "title": title }).to_string();
        let (status, answer) = http(http_addr, "POST", &path, Some(&token), body.as_bytes()).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Every push is delivered (the inbox keeps them all); the hook ran for the safe ones only.
    let lines = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains("|done") && b.inbox().await.unwrap().len() == pushes.len() {
                // Hooks run concurrently; give any earlier one a moment to finish writing.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return std::fs::read_to_string(&out).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the hook ran for the last push");
    let got: BTreeSet<&str> = lines.lines().collect();
    let want = BTreeSet::from([
        "https://media.example/{title}|t{uri}{from}",
        "https://media.example/5|a[2Jbc",
        "https://media.example/done|done",
    ]);
    assert_eq!(got, want);
    let refused = b.status().await.counters["handoff_hooks_refused_total"];
    assert_eq!(refused, 4);
    b.shutdown().await;
    server.shutdown().await;
}
