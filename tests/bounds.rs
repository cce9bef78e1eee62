//! Bounded under abuse (issue 11), the server's side, in process on loopback: what the server
//! acknowledges fits every limit on its way to the terminal, a terminal skips an item it cannot
//! read instead of stalling, strangers' state expires, the HTTP API holds up under half-sent
//! requests, and remote input cannot flood the log.

mod support;

use std::time::Duration;

use handoff::config::ServerRef;
use handoff::identity::Identity;
use handoff::net::{read_frame, write_frame};
use handoff::tls::{self, TransportLimits};
use handoff::wire::{
    self, PushAck, PushItem, Request, RequestBody, Response, ResponseBody, ServerPush, Session,
};
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

/// A JSON publication of exactly `len` bytes whose uri fills it.
fn publication_of(len: usize) -> String {
    let frame = r#"{"uri":"","title":"big"}"#;
    format!(
        r#"{{"uri":"{}","title":"big"}}"#,
        "u".repeat(len - frame.len())
    )
}

/// Issue 11.1: a 65,529-byte publication was answered 200, and the terminal, unable to decode
/// the push, stalled for good. Now it is refused with 413 naming the limit, and counted; the
/// terminal goes on receiving.
#[tokio::test]
async fn an_oversized_push_is_refused_with_413_and_the_terminal_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", Some(&server), vec![])).await;
    wait_connected(&b).await;
    let mut pushes = b.subscribe();
    let id = b.id();

    let big = publication_of(65_529);
    for path in [
        format!("/v1/terminals/{id}/push"),
        format!("/v1/terminals/{id}/followers/push"),
    ] {
        let (status, body) = http(http_addr, "POST", &path, Some(&token), big.as_bytes()).await;
        assert_eq!(status, 413, "{path}: {body}");
        let error = json(&body)["error"].as_str().unwrap().to_string();
        assert!(error.contains("65536-byte frame limit"), "{error}");
    }
    // A session that would be pushed to followers is held to the same limit.
    let session = format!(
        r#"{{"uri":"{}","title":"t","position":null,"meta":{{}}}}"#,
        "u".repeat(65_400)
    );
    let (status, body) = http(
        http_addr,
        "PUT",
        &format!("/v1/terminals/{id}/session"),
        Some(&token),
        session.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let metrics = server.metrics();
    assert_eq!(
        metrics.get("handoff_limit_hits_total", Some(("limit", "push_size"))),
        2
    );
    assert_eq!(
        metrics.get("handoff_limit_hits_total", Some(("limit", "session_size"))),
        1
    );

    // The largest publication that still fits is accepted and arrives whole: the limit refuses
    // only what cannot be delivered.
    let mut fits = 65_529;
    let (status, body) = loop {
        let (status, body) = http(
            http_addr,
            "POST",
            &format!("/v1/terminals/{id}/push"),
            Some(&token),
            publication_of(fits).as_bytes(),
        )
        .await;
        if status != 413 {
            break (status, body);
        }
        fits -= 4;
    };
    assert_eq!(status, 200, "{body}");
    assert!(fits > 65_400, "only {fits} bytes fit");
    let push = next_push(&mut pushes).await;
    assert_eq!(push.uri.len(), fits - r#"{"uri":"","title":"big"}"#.len());
    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{id}/push"),
        Some(&token),
        br#"{"uri":"https://media.example/after","title":"after"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_push(&mut pushes).await.title, "after");
    server.shutdown().await;
}

/// Issue 11.2: a session that fits a request frame but whose push to followers would not is
/// refused before it joins a batch, with a message naming the limit.
#[tokio::test]
async fn an_oversized_session_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let a = Identity::generate().unwrap();
    let conn = raw_connect(&a, server.id(), server.local_addr()).await;
    let session = |uri_len: usize| Session {
        uri: "u".repeat(uri_len),
        title: "t".into(),
        position: None,
        meta: Default::default(),
    };
    let big = RequestBody::SetSession(Some(session(65_450)));
    assert!(
        wire::encode_frame(&Request {
            id: 1,
            body: big.clone()
        })
        .is_ok(),
        "the request itself fits a frame"
    );
    match handoff::net::request(&conn, big).await.unwrap() {
        ResponseBody::Refused(r) => {
            assert!(r.message.contains("65536-byte frame limit"), "{r}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server
            .metrics()
            .get("handoff_limit_hits_total", Some(("limit", "session_size"))),
        1
    );
    // The connection and the store go on.
    assert_eq!(
        handoff::net::request(&conn, RequestBody::SetSession(Some(session(100))))
            .await
            .unwrap(),
        ResponseBody::SessionStored
    );
    server.shutdown().await;
}

/// A server that says hello and stores sessions, for a terminal to connect to; the test drives
/// its push stream by hand.
async fn answer_requests(conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let Ok(Some(request)) = read_frame::<Request>(&mut recv, WAIT, wire::MAX_FRAME).await
            else {
                return;
            };
            let body = match request.body {
                RequestBody::Hello { .. } => ResponseBody::Welcome {
                    epoch: 7,
                    start: 0,
                    window_lost: false,
                },
                _ => ResponseBody::SessionStored,
            };
            let response = Response {
                id: request.id,
                body,
            };
            if write_frame(&mut send, &response).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        });
    }
}

/// Terminal b, started in `dir`, attached to a scripted server (an endpoint answering with
/// [`answer_requests`]); returns b, b's connection as the server sees it (the test drives its
/// push streams), and the endpoint, which must outlive the test.
async fn terminal_at_scripted_server(
    dir: &std::path::Path,
) -> (handoff::daemon::Daemon, quinn::Connection, quinn::Endpoint) {
    let identity = Identity::generate().unwrap();
    let limits = TransportLimits {
        max_bidi_streams: 16,
        max_uni_streams: 0,
        idle_timeout: Duration::from_secs(30),
        keep_alive: None,
    };
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&identity, limits).unwrap(), loopback())
            .unwrap();
    let mut config = terminal(dir, "b", None, vec![]);
    config.server = Some(ServerRef {
        id: identity.id(),
        addrs: vec![endpoint.local_addr().unwrap().to_string()],
    });
    let b = start(config).await;
    let conn = tokio::time::timeout(WAIT, async {
        endpoint.accept().await.unwrap().await.unwrap()
    })
    .await
    .expect("the terminal connects");
    tokio::spawn(answer_requests(conn.clone()));
    wait_connected(&b).await;
    (b, conn, endpoint)
}

/// Reads acknowledgements on a push stream until one reaches `offset`; returns it.
async fn acknowledged_up_to(recv: &mut quinn::RecvStream, offset: u64) -> u64 {
    tokio::time::timeout(WAIT, async {
        loop {
            match read_frame::<PushAck>(recv, WAIT, wire::MAX_FRAME).await {
                Ok(Some(PushAck::Ack { next })) if next >= offset => return next,
                Ok(Some(_)) => continue,
                other => panic!("no acknowledgement: {other:?}"),
            }
        }
    })
    .await
    .expect("acknowledged in time")
}

/// Issue 11.1, the terminal's side: an item that does not decode (here one that fits a frame
/// but exceeds the decoder's limit, as the server used to send) is reported, acknowledged past,
/// and the items after it are delivered.
#[tokio::test]
async fn a_terminal_skips_an_undecodable_push_and_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let (b, conn, _endpoint) = terminal_at_scripted_server(dir.path()).await;
    let mut pushes = b.subscribe();

    let item = |offset: u64, uri: String, title: &str| {
        ServerPush::Item(PushItem {
            offset,
            from: None,
            uri,
            title: title.into(),
            body: None,
            position: None,
            meta: Default::default(),
        })
    };
    let bad = wire::encode_frame(&item(0, "u".repeat(65_500), "bad")).unwrap();
    assert!(bad.len() - 4 <= wire::MAX_FRAME);
    assert!(
        wire::decode_frame::<ServerPush>(&bad).is_err(),
        "the first item must not decode"
    );
    let good = wire::encode_frame(&item(1, "https://media.example/ok".into(), "after")).unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bad).await.unwrap();
    send.write_all(&good).await.unwrap();

    assert_eq!(next_push(&mut pushes).await.title, "after");
    let acked = acknowledged_up_to(&mut recv, 2).await;
    assert_eq!(acked, 2);
    assert_eq!(b.metrics().get("handoff_pushes_undecodable_total", None), 1);
}

/// A hostile content server sends a push at the last offset there is (`u64::MAX`, past which no
/// acknowledgement can point): the terminal refuses that push stream as malformed instead of
/// overflowing, delivers nothing from it, and still takes the server's next push stream.
#[tokio::test]
async fn a_push_at_the_last_offset_is_refused_and_the_terminal_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let (b, conn, _endpoint) = terminal_at_scripted_server(dir.path()).await;
    let mut pushes = b.subscribe();

    let item = |offset: u64, title: &str| {
        wire::encode_frame(&ServerPush::Item(PushItem {
            offset,
            from: None,
            uri: "https://media.example/x".into(),
            title: title.into(),
            body: None,
            position: None,
            meta: Default::default(),
        }))
        .unwrap()
    };
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&item(u64::MAX, "last")).await.unwrap();
    let stopped = tokio::time::timeout(WAIT, send.stopped())
        .await
        .expect("the terminal stops the stream");
    assert_eq!(
        stopped.unwrap(),
        Some(quinn::VarInt::from_u32(wire::ErrorCode::Malformed as u32))
    );
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&item(0, "next")).await.unwrap();
    assert_eq!(next_push(&mut pushes).await.title, "next");
    assert!(
        b.inbox().await.unwrap().iter().all(|p| p.title != "last"),
        "the push at the last offset was delivered"
    );
}

/// A hostile content server attributes a session to a peer this terminal never followed there
/// (`from` = that peer): it is acknowledged but not delivered (no inbox entry, no watcher, no
/// hook, no player), and counted; a publisher's push (no `from`) still is.
#[tokio::test]
async fn a_server_cannot_attribute_a_push_to_a_peer_not_followed_there() {
    let dir = tempfile::tempdir().unwrap();
    let (b, conn, _endpoint) = terminal_at_scripted_server(dir.path()).await;
    let mut pushes = b.subscribe();

    let someone = Identity::generate().unwrap().id();
    let item = |offset: u64, from: Option<handoff::identity::TerminalId>, title: &str| {
        wire::encode_frame(&ServerPush::Item(PushItem {
            offset,
            from,
            uri: "https://media.example/x".into(),
            title: title.into(),
            body: None,
            position: Some(1.0),
            meta: Default::default(),
        }))
        .unwrap()
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&item(0, Some(someone), "forged"))
        .await
        .unwrap();
    send.write_all(&item(1, None, "published")).await.unwrap();
    assert_eq!(next_push(&mut pushes).await.title, "published");
    let acked = acknowledged_up_to(&mut recv, 2).await;
    assert_eq!(
        acked, 2,
        "the refused push is acknowledged, never stalls the stream"
    );
    let inbox = b.inbox().await.unwrap();
    assert_eq!(
        inbox.iter().map(|p| p.title.as_str()).collect::<Vec<_>>(),
        ["published"]
    );
    assert_eq!(
        b.metrics().get("handoff_pushes_not_followed_total", None),
        1
    );
}

/// A server with the HTTP API and the given limits; returns it and the publish token.
async fn start_server_with_limits(
    dir: &std::path::Path,
    limits: impl FnOnce(&mut handoff::config::ServerLimits),
) -> (handoff::server::Server, String) {
    let token = "test-token-0123456789".to_string();
    let token_file = dir.join("publish.token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut config = handoff::config::ServerConfig::with_defaults(
        dir.join("server"),
        loopback(),
        handoff::config::StoreKind::Embedded,
    );
    config.http = Some(handoff::config::HttpConfig {
        listen: loopback(),
        token_file: Some(token_file),
    });
    limits(&mut config.limits);
    let server = handoff::server::Server::start(
        Identity::load_or_create(&config.state_dir).unwrap(),
        &config,
    )
    .await
    .unwrap();
    (server, token)
}

/// Waits until the server closes `stream` (end of stream or reset); returns what it sent.
async fn closed_by_server(mut stream: tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(3 * WAIT, stream.read_to_end(&mut got))
        .await
        .expect("the server closes a half-sent request");
    got
}

/// Issue 11.6: half-sent requests are closed after the header timeout; while they hold every
/// connection slot, `/healthz` and a publish still work; a body that never comes is answered
/// 408; 404 and 405 answer JSON like every other error.
#[tokio::test]
async fn half_sent_requests_time_out_and_never_lock_out_the_api() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.http_max_connections = 16;
        l.http_header_timeout = Duration::from_secs(2);
        l.http_body_timeout = Duration::from_secs(2);
    })
    .await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", Some(&server), vec![])).await;
    wait_connected(&b).await;
    let mut pushes = b.subscribe();

    // Far more half-sent requests than there are slots.
    let mut half_sent = Vec::new();
    for _ in 0..64 {
        let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
        stream
            .write_all(b"POST /v1/terminals/x/push HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        half_sent.push(stream);
    }
    let (status, body) = http(http_addr, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["status"], "ok");
    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/push", b.id()),
        Some(&token),
        br#"{"uri":"https://media.example/a","title":"while flooded"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_push(&mut pushes).await.title, "while flooded");
    // Every half-sent request is closed: the oldest to make room, the rest at the timeout.
    for stream in half_sent {
        closed_by_server(stream).await;
    }
    let hits = |limit| {
        server
            .metrics()
            .get("handoff_limit_hits_total", Some(("limit", limit)))
    };
    assert!(
        hits("http_max_connections") >= 48,
        "{}",
        hits("http_max_connections")
    );
    assert!(hits("http_header_timeout") >= 1);

    // A body announced but never sent: 408, in JSON.
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let head = format!(
        "POST /v1/terminals/{}/push HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: 40\r\n\r\n",
        b.id()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8(closed_by_server(stream).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        json(body)["error"].as_str().unwrap().contains("body"),
        "{body}"
    );
    assert!(hits("http_body_timeout") >= 1);

    // Every error status answers JSON.
    for (method, path, status) in [
        ("GET", "/nope", 404),
        ("GET", "/v1/terminals/x/push", 405),
        ("DELETE", "/healthz", 405),
        ("GET", "/v1/terminals/x/session", 405),
    ] {
        let (got, body) = http(http_addr, method, path, Some(&token), b"").await;
        assert_eq!(got, status, "{method} {path}: {body}");
        let error = json(&body)["error"].as_str().unwrap().to_string();
        assert!(!error.is_empty(), "{method} {path}");
    }
    server.shutdown().await;
}

/// Issue 11.3: one network cannot make the server know unbounded terminals: past
/// `known_terminals_per_source` new IDs are refused before anything is stored, while the ones
/// it has come back as before.
#[tokio::test]
async fn one_network_gets_a_bounded_number_of_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.known_terminals_per_source = 3;
    })
    .await;
    let http_addr = server.http_addr().unwrap();
    let hello = RequestBody::Hello {
        cursor: None,
        streams: Vec::new(),
    };
    let mut known = Vec::new();
    for _ in 0..3 {
        let me = Identity::generate().unwrap();
        let conn = raw_connect(&me, server.id(), server.local_addr()).await;
        let answer = handoff::net::request(&conn, hello.clone()).await.unwrap();
        assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
        conn.close(0u32.into(), b"done");
        known.push(me);
    }
    let stranger = Identity::generate().unwrap();
    let conn = raw_connect(&stranger, server.id(), server.local_addr()).await;
    let reason = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the server closes the connection");
    assert!(
        reason
            .to_string()
            .contains("too many terminals from this network"),
        "{reason}"
    );
    assert_eq!(
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "known_terminals_per_source"))
        ),
        1
    );
    // Nothing about it was stored: the publish API does not know it.
    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/push", stranger.id()),
        Some(&token),
        br#"{"uri":"https://media.example/a","title":"a"}"#,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    // A terminal the network already has is served as before.
    let conn = raw_connect(&known[0], server.id(), server.local_addr()).await;
    let answer = handoff::net::request(&conn, hello).await.unwrap();
    assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    server.shutdown().await;
}

/// The count of terminals per network is this node's memory and starts empty: after a
/// restart, strangers from a terminal's network took the quota before it came back, and the
/// terminal the server had served for days was refused. A terminal the store knows adds no
/// state, so it is admitted whatever the count.
#[tokio::test]
async fn a_known_terminal_is_admitted_after_a_restart_whoever_took_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let quota = |l: &mut handoff::config::ServerLimits| l.known_terminals_per_source = 2;
    let (server, _token) = start_server_with_limits(dir.path(), quota).await;
    let hello = RequestBody::Hello {
        cursor: None,
        streams: Vec::new(),
    };
    let known = Identity::generate().unwrap();
    let conn = raw_connect(&known, server.id(), server.local_addr()).await;
    let answer = handoff::net::request(&conn, hello.clone()).await.unwrap();
    assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    conn.close(0u32.into(), b"done");
    server.shutdown().await;
    drop(server);

    let (server, _token) = start_server_with_limits(dir.path(), quota).await;
    for _ in 0..2 {
        let stranger = Identity::generate().unwrap();
        let conn = raw_connect(&stranger, server.id(), server.local_addr()).await;
        let answer = handoff::net::request(&conn, hello.clone()).await.unwrap();
        assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    }
    let conn = raw_connect(&known, server.id(), server.local_addr()).await;
    let answer = handoff::net::request(&conn, hello).await;
    assert!(
        matches!(answer, Ok(ResponseBody::Welcome { .. })),
        "{answer:?}: {:?}",
        conn.close_reason()
    );
    server.shutdown().await;
}

/// Log lines captured from this thread's tracing events.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

/// A publisher sends pushes as fast as it likes; the terminal logs one "push received" line
/// per interval at info, with the count held back, not one per push.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_pushes_logs_a_bounded_number_of_lines() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Every task of this test runs on this thread (current-thread runtime).
    let _logs = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", Some(&server), vec![])).await;
    wait_connected(&b).await;
    let mut pushes = b.subscribe();
    for i in 0..20 {
        let body = format!(r#"{{"uri":"https://media.example/{i}","title":"burst {i}"}}"#);
        let path = format!("/v1/terminals/{}/push", b.id());
        let (status, body) = http(http_addr, "POST", &path, Some(&token), body.as_bytes()).await;
        assert_eq!(status, 200, "{body}");
    }
    for i in 0..20 {
        assert_eq!(next_push(&mut pushes).await.title, format!("burst {i}"));
    }
    let lines = captured.lines_with("push received");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    b.shutdown().await;
    server.shutdown().await;
}

/// Issue 11.8: 10,519 "refused follow" lines in 30 s came from one host. Each line remote input
/// can trigger is now logged at most once per interval, with the count held back.
#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_refused_follows_logs_a_bounded_number_of_lines() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Every task of this test runs on this thread (current-thread runtime).
    let _logs = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start_server_with_limits(dir.path(), |l| {
        l.requests_per_sec_per_terminal = 1_000_000;
    })
    .await;
    let mallory = Identity::generate().unwrap();
    let victim = Identity::generate().unwrap();
    let conn = raw_connect(&mallory, server.id(), server.local_addr()).await;
    let started = std::time::Instant::now();
    // A ticket naming the victim as first, signed by mallory: refused, every time.
    let follow = |n: u64| {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&n.to_be_bytes());
        let ticket = wire::Ticket {
            first: victim.id(),
            second: mallory.id(),
            server: server.id(),
            issued_at: handoff::net::unix_now(),
            not_after: handoff::net::unix_now() + 60,
            nonce,
        }
        .sign(&mallory);
        RequestBody::Follow(wire::InfoRequest {
            first: victim.id(),
            second: mallory.id(),
            ticket,
        })
    };
    let flood = 1_000;
    for n in 0..flood {
        match handoff::net::request(&conn, follow(n)).await.unwrap() {
            ResponseBody::Refused(r) => assert!(r.message.contains("signed"), "{r}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        server
            .metrics()
            .get("handoff_refusals_total", Some(("reason", "bad_ticket"))),
        flood
    );
    // After the interval, the next line says how many were held back.
    // (A new connection: the test client's idle timeout is shorter than the wait.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let conn = raw_connect(&mallory, server.id(), server.local_addr()).await;
    handoff::net::request(&conn, follow(flood)).await.unwrap();
    let lines = captured.lines_with("refused follow");
    let intervals = started.elapsed().as_secs() / 10 + 1;
    assert!(
        (2..=intervals as usize + 1).contains(&lines.len()),
        "{} lines for {} refusals in {:?}:\n{}",
        lines.len(),
        flood + 1,
        started.elapsed(),
        lines.join("\n")
    );
    let held_back: u64 = lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        held_back + lines.len() as u64,
        flood + 1,
        "every refusal is accounted for"
    );
    server.shutdown().await;
}

/// One terminal cannot fill the store with revocations: each names a second terminal of its
/// choosing, so a stranger sending them at its request rate (with `at` far in the future, kept
/// forever) grew the store without bound. A revocation dated past the clock-skew allowance is
/// refused; past `[limits] revocations_per_terminal` live ones, new seconds are refused and
/// counted; re-sending a live one, an outdated one (nothing left to refuse: it only unlinks),
/// and other terminals' revocations still work.
#[tokio::test]
async fn one_terminal_cannot_store_unbounded_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |l| {
        l.revocations_per_terminal = 4;
    })
    .await;
    let now = handoff::net::unix_now();
    let mallory = Identity::generate().unwrap();
    let conn = raw_connect(&mallory, server.id(), server.local_addr()).await;
    let revoke = |second: handoff::identity::TerminalId, at: u64| {
        let conn = conn.clone();
        async move {
            handoff::net::request(&conn, RequestBody::Revoke { second, at })
                .await
                .unwrap()
        }
    };
    let forever = revoke(Identity::generate().unwrap().id(), u64::MAX).await;
    match &forever {
        ResponseBody::Refused(r) => assert!(r.message.contains("in the future"), "{r}"),
        other => panic!("a revocation dated in the far future was accepted: {other:?}"),
    }
    let seconds: Vec<_> = (0..4).map(|_| Identity::generate().unwrap().id()).collect();
    for second in &seconds {
        let answer = revoke(*second, now).await;
        assert_eq!(answer, ResponseBody::Revoked { removed: false });
    }
    let over = revoke(Identity::generate().unwrap().id(), now).await;
    match &over {
        ResponseBody::Refused(r) => {
            assert!(r.message.contains("revocations_per_terminal"), "{r}")
        }
        other => panic!("a revocation past the limit was accepted: {other:?}"),
    }
    assert_eq!(
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "revocations_per_terminal"))
        ),
        1
    );
    // A live one again (a daemon re-sends its revocations on every reconnect).
    assert_eq!(
        revoke(seconds[0], now + 1).await,
        ResponseBody::Revoked { removed: false }
    );
    // One so old that every ticket it could refuse has expired: nothing to keep.
    let old = now - 2 * 3600 - 2 * wire::ticket::MAX_CLOCK_SKEW;
    assert_eq!(
        revoke(Identity::generate().unwrap().id(), old).await,
        ResponseBody::Revoked { removed: false }
    );
    // Another terminal's revocations are its own.
    let alice = Identity::generate().unwrap();
    let a = raw_connect(&alice, server.id(), server.local_addr()).await;
    assert_eq!(
        handoff::net::request(
            &a,
            RequestBody::Revoke {
                second: mallory.id(),
                at: now
            }
        )
        .await
        .unwrap(),
        ResponseBody::Revoked { removed: false }
    );
    server.shutdown().await;
}

/// Request headers are buffered until they are complete; hyper's default lets each connection
/// buffer about 400 KiB of them, so `http_max_connections` half-sent requests could hold 400 MiB
/// of the server's memory without a token. Headers past `[limits] http_max_header_bytes` are
/// answered 431 and the connection closed.
#[tokio::test]
async fn oversized_request_headers_are_refused() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |_| {}).await;
    let addr = server.http_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let pad = "p".repeat(200 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {pad}\r\n\r\n");
    // The server may close before it read everything: a failed write is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = closed_by_server(stream).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "200 KiB of headers were answered: {}",
        text.lines().next().unwrap_or("(nothing)")
    );
    assert_json_error(&text, "http_max_header_bytes");
    // Counted once the connection's task ends, which may be just after the close.
    let hits = || {
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "http_max_header_bytes")),
        )
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while hits() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hits(), 1);
    // Ordinary requests are served.
    let (status, body) = http(addr, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

/// Asserts that a whole HTTP answer has a JSON body `{"error": "..."}` (with a matching
/// content-type and length) whose message mentions `needle`.
fn assert_json_error(answer: &str, needle: &str) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {answer}"));
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{answer}"
    );
    assert!(
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
        "{answer}"
    );
    let error = json(body)["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(needle), "{answer}");
}

/// Requests the HTTP library refuses before they reach the API (a malformed request line or
/// header, an overlong URI) are answered in JSON too, like every other error.
#[tokio::test]
async fn malformed_requests_are_answered_400_in_json() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |_| {}).await;
    let addr = server.http_addr().unwrap();
    for request in [
        "GET /healthz HTTP/1.1\r\nhost x\r\n\r\n",
        "G@T /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        "GET /healthz HTTP/9.9\r\nhost: x\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = closed_by_server(stream).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400"), "{request:?}: {text}");
        assert_json_error(&text, "malformed");
    }
    let (status, body) = http(addr, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

/// A session change used to be stored once for the terminal and once more for each follower,
/// and one network may hold hundreds of keys that follow one another: with a large session and
/// its own keys as followers, one host had the store write hundreds of times what it sent. With
/// fan-out on read a change is stored once, in the first terminal's stream, however many follow
/// it; and what session changes store is budgeted per source network (`[limits]
/// session_bytes_per_sec_per_source`): past it a change is refused as busy, counted, and
/// nothing is stored.
#[tokio::test]
async fn session_fan_out_is_budgeted_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |l| {
        l.session_bytes_per_sec_per_source = 64 * 1024;
    })
    .await;
    let first = Identity::generate().unwrap();
    let conn = raw_connect(&first, server.id(), server.local_addr()).await;
    let hello = RequestBody::Hello {
        cursor: None,
        streams: Vec::new(),
    };
    handoff::net::request(&conn, hello.clone()).await.unwrap();
    // Eight of the attacker's own keys follow the first, with tickets it signs.
    let mut followers = Vec::new();
    for _ in 0..8 {
        let second = Identity::generate().unwrap();
        let c = raw_connect(&second, server.id(), server.local_addr()).await;
        let answer = follow_with_ticket(&c, &first, second.id(), &server).await;
        assert!(matches!(answer, ResponseBody::Linked { .. }), "{answer:?}");
        followers.push(c);
    }
    // 20 KB sessions: each change stores about 40 KB (the session, and the one push its eight
    // followers read), so the budget of 64 KiB a second lets fewer than two through a second.
    let stored_before = server.metrics().get("handoff_pushes_stored_total", None);
    let started = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..4 {
        let session = Session {
            uri: format!("https://media.example/{i}/{}", "u".repeat(20_000)),
            title: "t".into(),
            position: None,
            meta: Default::default(),
        };
        match handoff::net::request(&conn, RequestBody::SetSession(Some(session)))
            .await
            .unwrap()
        {
            ResponseBody::SessionStored => {}
            ResponseBody::Refused(r) => {
                assert!(
                    r.message.contains("session_bytes_per_sec_per_source"),
                    "{r}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let stored = server.metrics().get("handoff_pushes_stored_total", None) - stored_before;
    // Whatever the machine's speed: no more than the budget's bytes, the burst included.
    let passed = 4 - refused;
    let budget = 64 * 1024 * (1 + started.elapsed().as_secs());
    assert!(
        refused > 0 && passed * 40_000 <= budget,
        "{passed} of 4 changes passed within a budget of {budget} bytes; {stored} pushes stored"
    );
    assert_eq!(stored, passed, "one push per change, not one per follower");
    assert_eq!(
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "session_bytes_per_sec_per_source"))
        ),
        refused
    );
    server.shutdown().await;
}

/// The other ways a session is copied are budgeted with changes: a follow copies the first
/// terminal's session into the second's log, and a reconnect whose window was lost copies every
/// followed session again — at the handshake rate, a few hundred bytes of hello made the store
/// write kilobytes per followed terminal.
#[tokio::test]
async fn resyncs_are_budgeted_per_source_too() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |l| {
        l.session_bytes_per_sec_per_source = 64 * 1024;
    })
    .await;
    // Setting up (each session stored and streamed, then copied at the follow) stays within
    // the budget's burst.
    let session = Session {
        uri: format!("https://media.example/{}", "u".repeat(4_000)),
        title: "t".into(),
        position: None,
        meta: Default::default(),
    };
    let second = Identity::generate().unwrap();
    let c = raw_connect(&second, server.id(), server.local_addr()).await;
    for _ in 0..4 {
        let first = Identity::generate().unwrap();
        let conn = raw_connect(&first, server.id(), server.local_addr()).await;
        let set = RequestBody::SetSession(Some(session.clone()));
        let answer = handoff::net::request(&conn, set).await.unwrap();
        assert_eq!(answer, ResponseBody::SessionStored);
        let answer = follow_with_ticket(&c, &first, second.id(), &server).await;
        assert!(matches!(answer, ResponseBody::Linked { .. }), "{answer:?}");
    }
    c.close(0u32.into(), b"done");
    // Reconnects with a cursor of another epoch: each resyncs 4 sessions of over 4,000 bytes.
    let started = std::time::Instant::now();
    let mut refused = 0;
    for _ in 0..16 {
        let conn = raw_connect(&second, server.id(), server.local_addr()).await;
        let hello = RequestBody::Hello {
            cursor: Some(wire::Cursor { epoch: 1, next: 0 }),
            streams: Vec::new(),
        };
        match handoff::net::request(&conn, hello).await {
            Ok(ResponseBody::Welcome { window_lost, .. }) => assert!(window_lost),
            Ok(other) => panic!("{other:?}"),
            Err(_) => {
                let reason = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();
                assert!(reason.to_string().contains("session budget"), "{reason}");
                refused += 1;
            }
        }
        conn.close(0u32.into(), b"done");
    }
    // Whatever the machine's speed: what passed fits the budget and its refill.
    let passed = 16 - refused;
    let allowed = 65_536.0 * (1.0 + started.elapsed().as_secs_f64());
    assert!(
        refused > 0 && passed as f64 * 16_000.0 <= allowed,
        "{passed} of 16 resyncs passed ({allowed} bytes allowed)"
    );
    server.shutdown().await;
}

/// One host may hold `known_terminals_per_source` keys, and each had its own request rate, so
/// the host could send that many times more requests (each a signature check, a store read or
/// write). The keys of one source network now share `[limits] requests_per_sec_per_source`.
#[tokio::test]
async fn the_keys_of_one_network_share_a_request_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = start_server_with_limits(dir.path(), |l| {
        l.requests_per_sec_per_source = 10;
    })
    .await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let key = Identity::generate().unwrap();
        conns.push(raw_connect(&key, server.id(), server.local_addr()).await);
    }
    let started = std::time::Instant::now();
    let (mut passed, mut refused) = (0, 0);
    for conn in &conns {
        // Each key stays well under its own rate (100 a second by default).
        for _ in 0..10 {
            match handoff::net::request(conn, RequestBody::SetSession(None))
                .await
                .unwrap()
            {
                ResponseBody::SessionStored => passed += 1,
                ResponseBody::Refused(r) => {
                    assert!(r.message.contains("from this network"), "{r}");
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    // Whatever the machine's speed: what passed fits the rate and its burst.
    let allowed = 10.0 * (1.0 + started.elapsed().as_secs_f64());
    assert!(
        refused > 0 && passed as f64 <= allowed,
        "{passed} of 40 requests passed ({allowed} allowed)"
    );
    assert_eq!(
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "requests_per_sec_per_source"))
        ),
        refused
    );
    server.shutdown().await;
}

/// A peer that a terminal pulls from names the server to link through; one naming a thousand
/// addresses (each resolved, then dialed with a 3 s timeout, in turn) held `handoff pull` and
/// the link for close to an hour. Interface info naming more than 8 server addresses (or one
/// longer than 255 bytes) is now refused as unusable.
#[tokio::test]
async fn interface_info_naming_a_thousand_server_addresses_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mallory = Identity::generate().unwrap();
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&mallory, limits()).unwrap(), loopback())
            .unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    introduce(&b, "mallory", mallory.id(), endpoint.local_addr().unwrap());
    let fake_server = Identity::generate().unwrap().id();
    let b_id = b.id();
    let mallory_id = mallory.id();
    let mallory = std::sync::Arc::new(mallory);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let mallory = mallory.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(Some(request)) =
                        read_frame::<Request>(&mut recv, WAIT, wire::MAX_FRAME).await
                    else {
                        return;
                    };
                    let now = handoff::net::unix_now();
                    let ticket = wire::Ticket {
                        first: mallory.id(),
                        second: b_id,
                        server: fake_server,
                        issued_at: now,
                        not_after: now + 600,
                        nonce: rand::random(),
                    }
                    .sign(&mallory);
                    let info = wire::InterfaceInfo {
                        server: wire::ServerInfo {
                            id: fake_server,
                            addrs: vec!["127.0.0.1:9".to_string(); 1000],
                        },
                        first: mallory.id(),
                        session: None,
                        ticket,
                    };
                    let response = Response {
                        id: request.id,
                        body: ResponseBody::InterfaceInfo(Box::new(info)),
                    };
                    if write_frame(&mut send, &response).await.is_ok() {
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                }
            });
        }
    });
    let query = mallory_id.to_string();
    let pull = b.pull(&query, Duration::from_secs(5));
    let outcome = tokio::time::timeout(Duration::from_secs(30), pull)
        .await
        .expect("the pull ends within 30 s");
    match outcome {
        Err(e @ handoff::daemon::PullError::BadInfo { .. }) => {
            assert!(e.to_string().contains("server addresses"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// Issue 11.3, end to end: the server's own sweep forgets strangers. With `idle_terminal`
/// shortened (the sweep runs at least five times per idle period), a terminal that came once,
/// set a session and left is forgotten — the publish API no longer knows it — while a terminal
/// still connected and two that left but are linked (as first and second) stay known.
#[tokio::test]
async fn the_sweep_forgets_strangers_but_not_connected_or_linked_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.idle_terminal = Duration::from_secs(2);
    })
    .await;
    let http_addr = server.http_addr().unwrap();
    let hello = RequestBody::Hello {
        cursor: None,
        streams: Vec::new(),
    };
    let connect = |me: Identity| {
        let server = &server;
        let hello = hello.clone();
        async move {
            let conn = raw_connect(&me, server.id(), server.local_addr()).await;
            let answer = handoff::net::request(&conn, hello).await.unwrap();
            assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
            (me, conn)
        }
    };
    let (stranger, stranger_conn) = connect(Identity::generate().unwrap()).await;
    let answer = handoff::net::request(
        &stranger_conn,
        RequestBody::SetSession(Some(session("passing-by"))),
    )
    .await
    .unwrap();
    assert!(matches!(answer, ResponseBody::SessionStored), "{answer:?}");
    let (first, first_conn) = connect(Identity::generate().unwrap()).await;
    let (second, second_conn) = connect(Identity::generate().unwrap()).await;
    let answer = follow_with_ticket(&second_conn, &first, second.id(), &server).await;
    assert!(matches!(answer, ResponseBody::Linked { .. }), "{answer:?}");
    let (connected, _connected_conn) = connect(Identity::generate().unwrap()).await;
    for conn in [&stranger_conn, &first_conn, &second_conn] {
        conn.close(0u32.into(), b"gone");
    }

    let publish = |id: handoff::identity::TerminalId| {
        let token = token.clone();
        async move {
            http(
                http_addr,
                "POST",
                &format!("/v1/terminals/{id}/push"),
                Some(&token),
                br#"{"uri":"https://media.example/a","title":"a"}"#,
            )
            .await
        }
    };
    // Forgotten once it has been idle for two seconds and a sweep ran.
    tokio::time::timeout(6 * WAIT, async {
        while publish(stranger.id()).await.0 != 404 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the sweep forgets the stranger");
    assert_eq!(
        server
            .metrics()
            .get("handoff_terminals_expired_total", None),
        1
    );
    for (who, id) in [
        ("connected", connected.id()),
        ("first", first.id()),
        ("second", second.id()),
    ] {
        let (status, body) = publish(id).await;
        assert_eq!(status, 200, "{who}: {body}");
    }
    server.shutdown().await;
}

/// A raw terminal connection that keeps itself alive (as an attacker's would) whether or not
/// it reads anything.
async fn connect_keeping_alive(
    identity: &Identity,
    server: &handoff::server::Server,
) -> quinn::Connection {
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let transport = TransportLimits {
        keep_alive: Some(Duration::from_millis(500)),
        ..limits()
    };
    let config = tls::client_config(identity, server.id(), transport).unwrap();
    endpoint
        .connect_with(config, server.local_addr(), tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// The second terminal of a fresh link on `server`: connected (kept alive, never reading its
/// push stream), said hello and following the first. Returns the first, the second and its
/// connection.
async fn a_follower_that_reads_nothing(
    server: &handoff::server::Server,
) -> (Identity, Identity, quinn::Connection) {
    let first = Identity::generate().unwrap();
    let a = raw_connect(&first, server.id(), server.local_addr()).await;
    handoff::net::request(&a, HELLO).await.unwrap();
    let second = Identity::generate().unwrap();
    let b = connect_keeping_alive(&second, server).await;
    let answer = handoff::net::request(&b, HELLO).await.unwrap();
    assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    let answer = follow_with_ticket(&b, &first, second.id(), server).await;
    assert!(matches!(answer, ResponseBody::Linked { .. }), "{answer:?}");
    (first, second, b)
}

const HELLO: RequestBody = RequestBody::Hello {
    cursor: None,
    streams: Vec::new(),
};

/// Publishes `each` pushes of 60 KB to `second` and as many to `first`'s followers.
async fn publish_big(
    server: &handoff::server::Server,
    token: &str,
    first: &Identity,
    second: &Identity,
    each: usize,
) {
    let push = publication_of(60_000);
    for _ in 0..each {
        for to in [
            format!("/v1/terminals/{}/push", second.id()),
            format!("/v1/terminals/{}/followers/push", first.id()),
        ] {
            let addr = server.http_addr().unwrap();
            let (status, body) = http(addr, "POST", &to, Some(token), push.as_bytes()).await;
            assert_eq!(status, 200, "{to}: {body}");
        }
    }
}

/// A terminal that stops reading its push stream, its connection kept alive, while pushes for
/// it pile up: the server held every one in the connection's fast paths (1,024 items of up to
/// 64 KiB, for its own log and for each stream it follows) for as long as the connection
/// lived: 14 MB for the 15 MB below. Now a connection's fast paths hold at most 256 KiB; the
/// rest waits only in the store, where it is anyway.
#[tokio::test]
async fn a_terminal_that_stops_reading_costs_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.push_stall = Duration::from_secs(600);
    })
    .await;
    let (first, second, b) = a_follower_that_reads_nothing(&server).await;
    publish_big(&server, &token, &first, &second, 128).await;
    let held = server.queued_push_bytes();
    assert!(b.close_reason().is_none(), "still connected");
    assert!(
        held <= 256 * 1024,
        "{held} bytes held for a terminal that reads nothing"
    );
    server.shutdown().await;
}

/// ... and such a terminal is let go after `[limits] push_stall_secs`: its connection closed,
/// so that it holds no task and no memory of the server's for longer. Nothing is lost: back,
/// and reading, it gets every push, in order.
#[tokio::test]
async fn a_terminal_that_stops_reading_is_let_go_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.push_stall = Duration::from_secs(2);
    })
    .await;
    let (first, second, b) = a_follower_that_reads_nothing(&server).await;
    const EACH: usize = 64;
    publish_big(&server, &token, &first, &second, EACH).await;
    let reason = tokio::time::timeout(3 * WAIT, b.closed())
        .await
        .expect("a terminal that reads nothing is let go");
    assert!(reason.to_string().contains("not read for 2 s"), "{reason}");
    assert_eq!(
        server.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "push_stall_secs"))
        ),
        1
    );

    let b = raw_connect(&second, server.id(), server.local_addr()).await;
    let answer = handoff::net::request(&b, HELLO).await.unwrap();
    assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    let (_send, mut recv) = tokio::time::timeout(WAIT, b.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let (mut own, mut streamed) = (0, 0);
    while own < EACH || streamed < EACH {
        let frame: ServerPush = read_frame(&mut recv, WAIT, wire::MAX_FRAME)
            .await
            .unwrap()
            .expect("the push stream goes on");
        match frame {
            ServerPush::Item(item) => {
                assert_eq!(item.offset, own as u64, "in order, none missing");
                own += 1;
            }
            ServerPush::Stream { owner, item } => {
                assert_eq!(owner, first.id());
                assert_eq!(item.offset, streamed as u64, "in order, none missing");
                streamed += 1;
            }
        }
    }
    server.shutdown().await;
}

/// ... nor after a reconnect with pushes waiting: the connection read a page of 256 items of
/// the log and held it while the terminal took none of it (up to 16 MiB per connection, for
/// `push_stall_secs`, again at every reconnect). A page is now cut to 256 KiB.
#[tokio::test]
async fn a_terminal_that_comes_back_and_stops_reading_costs_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_limits(dir.path(), |l| {
        l.push_stall = Duration::from_secs(600);
    })
    .await;
    let (first, second, b) = a_follower_that_reads_nothing(&server).await;
    b.close(0u32.into(), b"away");
    tokio::time::timeout(WAIT, async {
        while server.connected() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // Away: 128 pushes of 60 KB to it and 128 to the first terminal's followers wait in the store.
    publish_big(&server, &token, &first, &second, 128).await;
    let b = connect_keeping_alive(&second, &server).await;
    let answer = handoff::net::request(&b, HELLO).await.unwrap();
    assert!(matches!(answer, ResponseBody::Welcome { .. }), "{answer:?}");
    // Back, it reads nothing: once the transport's windows are full, the connection holds what
    // it read for it.
    let mut held = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = held.max(server.queued_push_bytes());
    }
    assert!(b.close_reason().is_none(), "still connected");
    assert!(held > 0, "the terminal was sent its backlog");
    assert!(
        held <= 256 * 1024 + 65_536,
        "{held} bytes held for a terminal that reads nothing"
    );
    server.shutdown().await;
}
