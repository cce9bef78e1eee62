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

/// Issue 11.1, the terminal's side: an item that does not decode (here one that fits a frame
/// but exceeds the decoder's limit, as the server used to send) is reported, acknowledged past,
/// and the items after it are delivered.
#[tokio::test]
async fn a_terminal_skips_an_undecodable_push_and_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
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
    let mut config = terminal(dir.path(), "b", None, vec![]);
    config.server = Some(ServerRef {
        id: identity.id(),
        addrs: vec![endpoint.local_addr().unwrap().to_string()],
    });
    let b = start(config).await;
    let mut pushes = b.subscribe();
    let conn = tokio::time::timeout(WAIT, async {
        endpoint.accept().await.unwrap().await.unwrap()
    })
    .await
    .expect("the terminal connects");
    tokio::spawn(answer_requests(conn.clone()));
    wait_connected(&b).await;

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
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match read_frame::<PushAck>(&mut recv, WAIT, wire::MAX_FRAME).await {
                Ok(Some(PushAck::Ack { next })) if next >= 2 => return next,
                Ok(Some(_)) => continue,
                other => panic!("no acknowledgement: {other:?}"),
            }
        }
    })
    .await
    .expect("acknowledged in time");
    assert_eq!(acked, 2);
    assert_eq!(b.metrics().get("handoff_pushes_undecodable_total", None), 1);
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
