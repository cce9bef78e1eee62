//! Delivery as a promise (issue 4), in process on loopback: the HTTP publish API, offline
//! terminals resuming from their cursor, collapse keys, TTLs, server restarts and stale cursors.

mod support;

use std::time::Duration;

use handoff::daemon::Daemon;
use handoff::identity::Identity;
use handoff::net::{self, read_frame, unix_now};
use handoff::server::Server;
use handoff::wire::{self, Cursor, InfoRequest, RequestBody, ResponseBody, ServerPush, Ticket};
use support::inproc::*;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn next_push(
    rx: &mut tokio::sync::broadcast::Receiver<handoff::control::PushRecord>,
) -> handoff::control::PushRecord {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a push in time")
        .unwrap()
}

#[tokio::test]
async fn http_api_answers_each_case_with_the_documented_status() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", Some(&server), vec![])).await;
    wait_connected(&b).await;
    let mut pushes = b.subscribe();
    let path = format!("/v1/terminals/{}/push", b.id());
    let good = br#"{"uri":"https://media.example/a","title":"A","body":"hello","meta":{"k":"v"}}"#;

    let (status, body) = http(http_addr, "POST", &path, None, good).await;
    assert_eq!(status, 401, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("bearer token"));
    assert_eq!(
        http(http_addr, "POST", &path, Some("wrong"), good).await.0,
        401
    );
    let (status, body) = http(
        http_addr,
        "POST",
        "/v1/terminals/nope/push",
        Some(&token),
        good,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        http(http_addr, "POST", &path, Some(&token), b"{not json")
            .await
            .0,
        400
    );
    assert_eq!(
        http(
            http_addr,
            "POST",
            &path,
            Some(&token),
            br#"{"uri":"u","title":"t","ttl_secs":0}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http(
            http_addr,
            "POST",
            &path,
            Some(&token),
            br#"{"uri":"u","title":"t","extra":1}"#
        )
        .await
        .0,
        400
    );
    let stranger = Identity::generate().unwrap().id();
    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{stranger}/push"),
        Some(&token),
        good,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("never connected"));
    let huge = format!(r#"{{"uri":"u","title":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = http(http_addr, "POST", &path, Some(&token), huge.as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert!(json(&body)["error"].is_string());

    // None of those reached B; the good one does, once stored.
    let (status, body) = http(http_addr, "POST", &path, Some(&token), good).await;
    assert_eq!(status, 200, "{body}");
    let answer = json(&body);
    assert_eq!(answer["offset"], 0);
    assert_eq!(answer["epoch"], server.epoch());
    let push = next_push(&mut pushes).await;
    assert_eq!(
        (
            push.title.as_str(),
            push.body.as_deref(),
            push.from.as_deref()
        ),
        ("A", Some("hello"), None)
    );
    assert_eq!(push.meta.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        b.inbox().await.unwrap().len(),
        1,
        "the failed requests stored nothing"
    );

    let (status, body) = http(http_addr, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["status"], "ok");
    let (status, metrics) = http(http_addr, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("handoff_pushes_stored_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("handoff_http_refusals_total{reason=\"unauthorized\"} 2"),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.starts_with("handoff_")));
}

/// `POST /v1/push`: many pushes in one request, one commit; each answered on its own, a bad one
/// failing alone; the good ones delivered in order.
#[tokio::test]
async fn a_batch_publish_stores_the_good_pushes_and_answers_each() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", Some(&server), vec![])).await;
    let c = start(terminal(dir.path(), "c", Some(&server), vec![])).await;
    wait_connected(&b).await;
    wait_connected(&c).await;
    let mut b_pushes = b.subscribe();
    let mut c_pushes = c.subscribe();
    let stranger = Identity::generate().unwrap().id();
    let (b_id, c_id) = (b.id(), c.id());
    let batch = format!(
        r#"[
        {{"to":"{b_id}","uri":"https://m.example/1","title":"b1"}},
        {{"to":"{c_id}","uri":"https://m.example/2","title":"c1"}},
        {{"to":"{stranger}","uri":"https://m.example/3","title":"nobody"}},
        {{"uri":"https://m.example/4","title":"no to"}},
        {{"to":"{b_id}","uri":"u","title":"t","ttl_secs":0}},
        {{"to":"{b_id}","uri":"u","title":"t","extra":1}},
        {{"to":"{b_id}","uri":"u","title":"{}"}},
        {{"to":"{b_id}","uri":"https://m.example/5","title":"b2"}}
    ]"#,
        "x".repeat(70 * 1024)
    );
    let (status, body) = http(http_addr, "POST", "/v1/push", None, batch.as_bytes()).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(
        http_addr,
        "POST",
        "/v1/push",
        Some(&token),
        batch.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer = json(&body);
    assert_eq!(answer["epoch"], server.epoch());
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(200))
        .collect();
    assert_eq!(statuses, [200, 200, 404, 400, 400, 400, 413, 200], "{body}");
    assert_eq!(results[0]["offset"], 0);
    assert_eq!(results[0]["terminal"], b_id.to_string());
    assert_eq!(results[1]["offset"], 0);
    assert_eq!(results[7]["offset"], 1);
    assert!(results[2]["error"]
        .as_str()
        .unwrap()
        .contains("never connected"));
    assert_eq!(next_push(&mut b_pushes).await.title, "b1");
    assert_eq!(next_push(&mut b_pushes).await.title, "b2");
    assert_eq!(next_push(&mut c_pushes).await.title, "c1");
    assert_eq!(b.inbox().await.unwrap().len(), 2);

    for bad in [&b"{}"[..], b"[1]", b"not json"] {
        let (status, body) = http(http_addr, "POST", "/v1/push", Some(&token), bad).await;
        assert_eq!(status, 400, "{body}");
    }
    let too_many = format!(
        "[{}]",
        vec![format!(r#"{{"to":"{b_id}","uri":"u","title":"t"}}"#); 1001].join(",")
    );
    let (status, body) = http(
        http_addr,
        "POST",
        "/v1/push",
        Some(&token),
        too_many.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        b.inbox().await.unwrap().len(),
        2,
        "refused batches stored nothing"
    );
}

#[tokio::test]
async fn followers_push_and_session_put_reach_every_follower() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b_id = Identity::load_or_create(&dir.path().join("b"))
        .unwrap()
        .id();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b_id])).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    assert!(
        b.pull("a", WAIT).await.unwrap().push.is_none(),
        "A shows nothing yet"
    );
    let mut pushes = b.subscribe();

    let body = br#"{"uri":"https://media.example/news","title":"News"}"#;
    let (status, answer) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/followers/push", a.id()),
        Some(&token),
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(json(&answer)["pushed"], 1);
    assert_eq!(next_push(&mut pushes).await.title, "News");

    let session =
        br#"{"uri":"https://media.example/film","title":"Film","position":30.0,"meta":{}}"#;
    let (status, answer) = http(
        http_addr,
        "PUT",
        &format!("/v1/terminals/{}/session", a.id()),
        Some(&token),
        session,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(json(&answer)["followers"], 1);
    let push = next_push(&mut pushes).await;
    assert_eq!((push.title.as_str(), push.position), ("Film", Some(30.0)));
    assert_eq!(push.from.as_deref(), Some(a.id().to_string().as_str()));
}

/// Waits until `daemon`'s inbox holds at least `n` items; returns their titles.
async fn inbox_titles(daemon: &Daemon, n: usize) -> Vec<String> {
    tokio::time::timeout(WAIT, async {
        loop {
            let titles: Vec<String> = daemon
                .inbox()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.title)
                .collect();
            if titles.len() >= n {
                return titles;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the inbox fills in time")
}

/// Starts terminal "b" attached to `server`, in `dir`.
async fn start_b(dir: &std::path::Path, server: &Server) -> Daemon {
    let b = start(terminal(dir, "b", Some(server), vec![])).await;
    wait_connected(&b).await;
    b
}

#[tokio::test]
async fn an_offline_terminal_gets_what_it_missed_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start_b(dir.path(), &server).await;
    let b_id = b.id();
    let mut pushes = b.subscribe();
    let publish = |body: String| {
        let token = token.clone();
        async move {
            let (status, answer) = http(
                http_addr,
                "POST",
                &format!("/v1/terminals/{b_id}/push"),
                Some(&token),
                body.as_bytes(),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    publish(r#"{"uri":"u://0","title":"online"}"#.into()).await;
    assert_eq!(next_push(&mut pushes).await.title, "online");
    b.shutdown().await;

    // While B is away: plain items, two with one collapse key (only the latter survives), and
    // one that expires before B returns.
    publish(r#"{"uri":"u://1","title":"one"}"#.into()).await;
    publish(r#"{"uri":"u://2","title":"score 1-0","collapse_key":"score"}"#.into()).await;
    publish(r#"{"uri":"u://3","title":"short-lived","ttl_secs":1}"#.into()).await;
    publish(r#"{"uri":"u://4","title":"score 2-0","collapse_key":"score"}"#.into()).await;
    publish(r#"{"uri":"u://5","title":"five"}"#.into()).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let b = start_b(dir.path(), &server).await;
    let titles = inbox_titles(&b, 4).await;
    assert_eq!(titles, ["online", "one", "score 2-0", "five"]);
    let offsets: Vec<u64> = b.inbox().await.unwrap().iter().map(|r| r.offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order: {offsets:?}"
    );
    let mut pushes = b.subscribe();
    // Nothing more arrives, and a restart does not deliver anything twice.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), pushes.recv())
            .await
            .is_err()
    );
    b.shutdown().await;
    let b = start_b(dir.path(), &server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let titles: Vec<String> = b
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.title)
        .collect();
    assert_eq!(titles, ["online", "one", "score 2-0", "five"]);
    assert_eq!(b.metrics().get("handoff_push_windows_lost_total", None), 0);
}

#[tokio::test]
async fn the_embedded_store_keeps_pushes_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let b = start_b(dir.path(), &server).await;
    let b_id = b.id();
    b.shutdown().await;
    for i in 0..3 {
        let body = format!(r#"{{"uri":"u://{i}","title":"t{i}"}}"#);
        let (status, _) = http(
            server.http_addr().unwrap(),
            "POST",
            &format!("/v1/terminals/{b_id}/push"),
            Some(&token),
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200);
    }
    let epoch = server.epoch();
    server.shutdown().await;
    drop(server);
    // A new endpoint (the old port may linger); the same store file.
    let (server, _) = start_server_with_http(dir.path(), loopback()).await;
    assert_eq!(server.epoch(), epoch, "same store, same epoch");
    let b = start_b(dir.path(), &server).await;
    assert_eq!(inbox_titles(&b, 3).await, ["t0", "t1", "t2"]);
    assert_eq!(b.metrics().get("handoff_push_windows_lost_total", None), 0);
}

#[tokio::test]
async fn a_stale_cursor_is_told_and_gets_the_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start_server_with_http(dir.path(), loopback()).await;
    let a = Identity::generate().unwrap();
    let x = Identity::generate().unwrap();
    // A shows something; X follows A with a ticket A signed.
    let a_conn = raw_connect(&a, server.id(), server.local_addr()).await;
    let session = session("current");
    assert!(matches!(
        net::request(&a_conn, RequestBody::SetSession(Some(session.clone())))
            .await
            .unwrap(),
        ResponseBody::SessionStored
    ));
    let hello = |cursor| RequestBody::Hello {
        cursor,
        streams: Vec::new(),
    };
    let x_conn = raw_connect(&x, server.id(), server.local_addr()).await;
    match net::request(&x_conn, hello(None)).await.unwrap() {
        ResponseBody::Welcome {
            epoch,
            start,
            window_lost,
        } => {
            assert_eq!(
                (epoch, start, window_lost),
                (server.epoch(), 0, false),
                "a new terminal has nothing to lose"
            );
        }
        other => panic!("{other:?}"),
    }
    let ticket = Ticket {
        first: a.id(),
        second: x.id(),
        server: server.id(),
        issued_at: unix_now(),
        not_after: unix_now() + 60,
        nonce: [1; 16],
    }
    .sign(&a);
    let follow = RequestBody::Follow(InfoRequest {
        first: a.id(),
        second: x.id(),
        ticket,
    });
    assert!(matches!(
        net::request(&x_conn, follow).await.unwrap(),
        ResponseBody::Linked {
            has_session: true,
            ..
        }
    ));
    x_conn.close(0u32.into(), b"bye");

    // X comes back with a cursor from another epoch: it is told, and gets A's current session.
    let x_conn = raw_connect(&x, server.id(), server.local_addr()).await;
    let stale = Some(Cursor {
        epoch: server.epoch() ^ 1,
        next: 5,
    });
    match net::request(&x_conn, hello(stale)).await.unwrap() {
        ResponseBody::Welcome { window_lost, .. } => {
            assert!(window_lost, "the stale cursor must be reported")
        }
        other => panic!("{other:?}"),
    }
    let (_send, mut recv) = tokio::time::timeout(WAIT, x_conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let mut titles = Vec::new();
    while let Ok(Ok(Some(ServerPush::Item(item)))) = tokio::time::timeout(
        Duration::from_millis(500),
        read_frame::<ServerPush>(&mut recv, WAIT, wire::MAX_FRAME),
    )
    .await
    {
        titles.push(item.title);
    }
    assert!(
        titles.last().is_some_and(|t| t == "current"),
        "got {titles:?}"
    );
    // A cursor from the future is no better.
    let x2 = raw_connect(&x, server.id(), server.local_addr()).await;
    match net::request(
        &x2,
        hello(Some(Cursor {
            epoch: server.epoch(),
            next: 10_000,
        })),
    )
    .await
    .unwrap()
    {
        ResponseBody::Welcome { window_lost, .. } => assert!(window_lost),
        other => panic!("{other:?}"),
    }
}

/// A raw terminal's push stream: the frames the server sends it, in order.
struct RawTerminal {
    conn: quinn::Connection,
    recv: Option<quinn::RecvStream>,
}

impl RawTerminal {
    /// Connects and says hello with `streams` cursors.
    async fn connect(id: &Identity, server: &Server, streams: Vec<wire::StreamCursor>) -> Self {
        let conn = raw_connect(id, server.id(), server.local_addr()).await;
        let hello = RequestBody::Hello {
            cursor: None,
            streams,
        };
        match net::request(&conn, hello).await.unwrap() {
            ResponseBody::Welcome { .. } => {}
            other => panic!("{other:?}"),
        }
        Self { conn, recv: None }
    }

    /// Follows `first`, with a ticket `first` signed.
    async fn follow(&self, me: &Identity, first: &Identity, server: &Server) {
        let answer = follow_with_ticket(&self.conn, first, me.id(), server).await;
        assert!(matches!(answer, ResponseBody::Linked { .. }), "{answer:?}");
    }

    /// The next frame on the push stream.
    async fn next(&mut self) -> ServerPush {
        if self.recv.is_none() {
            let (_send, recv) = tokio::time::timeout(WAIT, self.conn.accept_bi())
                .await
                .expect("a push stream in time")
                .unwrap();
            self.recv = Some(recv);
        }
        let recv = self.recv.as_mut().unwrap();
        read_frame::<ServerPush>(recv, WAIT, wire::MAX_FRAME)
            .await
            .unwrap()
            .expect("a push in time")
    }

    /// The next item of `owner`'s stream, skipping items of the terminal's own log.
    async fn next_from(&mut self, owner: &Identity) -> wire::PushItem {
        loop {
            match self.next().await {
                ServerPush::Stream { owner: o, item } if o == owner.id() => return item,
                ServerPush::Stream { owner: o, item } => {
                    panic!("an item of {o}'s stream: {item:?}")
                }
                ServerPush::Item(_) => continue,
            }
        }
    }
}

async fn set_session(conn: &quinn::Connection, title: &str) {
    let answer = net::request(conn, RequestBody::SetSession(Some(session(title))))
        .await
        .unwrap();
    assert!(matches!(answer, ResponseBody::SessionStored), "{answer:?}");
}

/// Fan-out on read: a change that all of A's followers receive is stored once, in A's stream,
/// whatever the number of followers, and each follower reads it from its own cursor: after a
/// reconnect it gets what it missed (sessions collapsed to the latest, followers pushes each
/// once, in order), and never what was streamed before it followed, whatever cursor it claims.
#[tokio::test]
async fn a_change_is_stored_once_and_each_follower_reads_it_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let a = Identity::generate().unwrap();
    let a_conn = RawTerminal::connect(&a, &server, Vec::new()).await;
    let ids: Vec<Identity> = (0..10).map(|_| Identity::generate().unwrap()).collect();
    let mut followers = Vec::new();
    for id in &ids {
        let t = RawTerminal::connect(id, &server, Vec::new()).await;
        t.follow(id, &a, &server).await;
        followers.push(t);
    }
    let stored = || server.metrics().get("handoff_pushes_stored_total", None);

    let before = stored();
    set_session(&a_conn.conn, "s1").await;
    assert_eq!(stored() - before, 1, "one push stored for ten followers");
    let mut s1 = None;
    for f in &mut followers {
        let item = f.next_from(&a).await;
        assert_eq!((item.title.as_str(), item.from), ("s1", Some(a.id())));
        assert!(s1.is_none_or(|o| o == item.offset), "one offset for all");
        s1 = Some(item.offset);
    }
    let s1 = s1.unwrap();

    let before = stored();
    let (status, answer) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/followers/push", a.id()),
        Some(&token),
        br#"{"uri":"https://media.example/n1","title":"n1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(json(&answer)["pushed"], 10);
    assert_eq!(stored() - before, 1);
    for f in &mut followers {
        let item = f.next_from(&a).await;
        assert_eq!((item.title.as_str(), item.from), ("n1", None));
        assert_eq!(item.offset, s1 + 1);
    }

    // The first follower goes away; A changes twice and publishes once meanwhile.
    let gone = followers.remove(0);
    gone.conn.close(0u32.into(), b"bye");
    set_session(&a_conn.conn, "s2").await;
    set_session(&a_conn.conn, "s3").await;
    let (status, answer) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/followers/push", a.id()),
        Some(&token),
        br#"{"uri":"https://media.example/n2","title":"n2"}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for f in &mut followers {
        let titles = [
            f.next_from(&a).await.title,
            f.next_from(&a).await.title,
            f.next_from(&a).await.title,
        ];
        assert_eq!(titles, ["s2", "s3", "n2"], "connected: every change");
    }
    // Back with its cursor in A's stream: what it missed, s2 collapsed into s3.
    let cursor = |next| wire::StreamCursor {
        owner: a.id(),
        epoch: server.epoch(),
        next,
    };
    let mut back = RawTerminal::connect(&ids[0], &server, vec![cursor(s1 + 2)]).await;
    let got = [back.next_from(&a).await, back.next_from(&a).await];
    assert_eq!(
        got.iter().map(|i| i.title.as_str()).collect::<Vec<_>>(),
        ["s3", "n2"]
    );
    assert!(got[0].offset < got[1].offset);

    // A new follower claiming to have read A's stream from its start gets nothing streamed
    // before it followed: the next stream item it gets is the next change.
    let z = Identity::generate().unwrap();
    let z_conn = RawTerminal::connect(&z, &server, Vec::new()).await;
    z_conn.follow(&z, &a, &server).await;
    z_conn.conn.close(0u32.into(), b"bye");
    let mut z_back = RawTerminal::connect(&z, &server, vec![cursor(0)]).await;
    set_session(&a_conn.conn, "s4").await;
    assert_eq!(z_back.next_from(&a).await.title, "s4");
    assert_eq!(back.next_from(&a).await.title, "s4");
    server.shutdown().await;
}

/// A revoked follower reads nothing more from the first terminal's stream: neither on its live
/// connection nor after a reconnect with an old cursor.
#[tokio::test]
async fn a_revoked_follower_reads_nothing_more_from_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let a = Identity::generate().unwrap();
    let (b, c) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a_conn = RawTerminal::connect(&a, &server, Vec::new()).await;
    let mut b_conn = RawTerminal::connect(&b, &server, Vec::new()).await;
    let mut c_conn = RawTerminal::connect(&c, &server, Vec::new()).await;
    b_conn.follow(&b, &a, &server).await;
    c_conn.follow(&c, &a, &server).await;
    set_session(&a_conn.conn, "before").await;
    let first = b_conn.next_from(&a).await;
    assert_eq!(first.title, "before");
    assert_eq!(c_conn.next_from(&a).await.title, "before");

    let revoke = RequestBody::Revoke {
        second: b.id(),
        at: unix_now(),
    };
    let answer = net::request(&a_conn.conn, revoke).await.unwrap();
    assert!(
        matches!(answer, ResponseBody::Revoked { removed: true }),
        "{answer:?}"
    );
    set_session(&a_conn.conn, "after").await;
    assert_eq!(c_conn.next_from(&a).await.title, "after");
    // What B gets next is a push of its own published after that: not A's change.
    let marker = |title: &str| format!(r#"{{"uri":"https://media.example/m","title":"{title}"}}"#);
    let path = format!("/v1/terminals/{}/push", b.id());
    let (status, answer) = http(
        http_addr,
        "POST",
        &path,
        Some(&token),
        marker("m1").as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    match b_conn.next().await {
        ServerPush::Item(item) => assert_eq!(item.title, "m1"),
        other => panic!("revoked, yet got {other:?}"),
    }
    // Nor after a reconnect claiming it read A's stream only up to the first change.
    b_conn.conn.close(0u32.into(), b"bye");
    let cursor = wire::StreamCursor {
        owner: a.id(),
        epoch: server.epoch(),
        next: first.offset + 1,
    };
    let mut b_back = RawTerminal::connect(&b, &server, vec![cursor]).await;
    let (status, answer) = http(
        http_addr,
        "POST",
        &path,
        Some(&token),
        marker("m2").as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    loop {
        match b_back.next().await {
            ServerPush::Item(item) if item.title == "m2" => break,
            ServerPush::Item(_) => continue,
            other => panic!("revoked, yet got {other:?}"),
        }
    }
    server.shutdown().await;
}
