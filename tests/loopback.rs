//! In-process integration tests on the host's loopback: real QUIC endpoints on port 0, real mutual
//! TLS, real tickets. Discovery (mDNS) is off here; peers are added to the table by hand, as mDNS
//! would. The namespace LAN tests (tests/lan.rs) cover discovery.

mod support;

use std::time::Duration;

use handoff::daemon::{Daemon, PullError};
use handoff::identity::{Identity, TerminalId};
use handoff::net::{self, read_frame, unix_now, write_frame, RequestError};
use handoff::peer::FindError;
use handoff::server::Server;
use handoff::tls;
use handoff::wire::{
    self, ErrorCode, InfoRequest, RefusalReason, Request, RequestBody, Response, ResponseBody,
    Ticket,
};
use support::inproc::*;

struct World {
    _dir: tempfile::TempDir,
    server: Server,
    a: Daemon,
    b: Daemon,
    c: Daemon,
}

/// A server; A attached to it and trusting B only; B and C with no server of their own.
async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let c = start(terminal(dir.path(), "c", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b.id()])).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    introduce(&c, "a", a.id(), a.quic_addr());
    World {
        _dir: dir,
        server,
        a,
        b,
        c,
    }
}

#[tokio::test]
async fn pull_pushes_the_session_and_every_change() {
    let w = world().await;
    assert!(
        w.a.set_session(Some(session("first")), WAIT).await,
        "server did not store A's session"
    );
    let outcome = w.b.pull("a", WAIT).await.unwrap();
    let push = outcome.push.expect("a push");
    assert_eq!(push.title, "first");
    assert_eq!(push.from.as_deref(), Some(w.a.id().to_string().as_str()));
    assert!(outcome.linked_until > unix_now());

    let mut pushes = w.b.subscribe();
    assert!(w.a.set_session(Some(session("second")), WAIT).await);
    let next = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.title, "second");
    assert!(next.offset > push.offset);

    let inbox = w.b.inbox().await.unwrap();
    let titles: Vec<&str> = inbox.iter().map(|r| r.title.as_str()).collect();
    assert_eq!(titles, ["first", "second"]);
    w.server.shutdown().await;
}

#[tokio::test]
async fn untrusted_peer_is_refused_with_a_reason() {
    let w = world().await;
    w.a.set_session(Some(session("x")), WAIT).await;
    let err = w.c.pull("a", WAIT).await.unwrap_err();
    let refusal = err.refusal().expect("a refusal");
    assert_eq!(refusal.reason, RefusalReason::NotTrusted);
    let text = err.to_string();
    assert!(
        text.contains("refused by a") && text.contains("not trusted"),
        "{text}"
    );
    assert!(
        text.contains(&w.c.id().to_string()),
        "the refusal tells how to fix it: {text}"
    );

    // Once A trusts C, the same pull works.
    w.a.trust(w.c.id()).unwrap();
    assert!(w.c.pull("a", WAIT).await.unwrap().push.is_some());
    // And untrusting refuses again.
    w.a.untrust(w.c.id()).await.unwrap();
    assert!(w.c.pull("a", WAIT).await.unwrap_err().refusal().is_some());
}

#[tokio::test]
async fn pinned_tls_rejects_a_peer_with_another_key() {
    let w = world().await;
    // B is told that A's ID is also at C's address, under another name. That name is only
    // claimed (A's key holder calls itself "a"): it leads nowhere, whether the claim is still
    // there or already dropped (a check dialled C's address and met the wrong key).
    introduce(&w.b, "impostor", w.a.id(), w.c.quic_addr());
    let err = w.b.pull("impostor", WAIT).await.unwrap_err();
    assert!(
        matches!(
            err,
            PullError::Find(FindError::Unverified(_) | FindError::NotFound(_))
        ),
        "{err}"
    );
    // D knows A's ID only at C's address. Whether D's pull or D's own check of the claim dials
    // first, the endpoint there fails the key check and the claim is dropped.
    let dir = tempfile::tempdir().unwrap();
    let d = start(terminal(dir.path(), "d", None, vec![])).await;
    introduce(&d, "a", w.a.id(), w.c.quic_addr());
    let a_id = w.a.id().to_string();
    match d.pull(&a_id, WAIT).await.unwrap_err() {
        PullError::Unreachable { reason, .. } => {
            assert!(
                reason.contains("does not hold the expected key"),
                "{reason}"
            )
        }
        PullError::Find(FindError::NotFound(_)) => {}
        other => panic!("{other}"),
    }
    tokio::time::timeout(WAIT, async {
        while d.metrics().get(
            "handoff_handshakes_failed_total",
            Some(("reason", "wrong_key")),
        ) == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the key check failed");
    assert!(d.peers().iter().all(|p| p.id != a_id), "{:?}", d.peers());
}

#[tokio::test]
async fn pinned_tls_rejects_a_server_with_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let impostor = Identity::generate().unwrap();
    let client = Identity::generate().unwrap();
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    // Expect a key the server does not hold.
    let config = tls::client_config(&client, impostor.id(), limits()).unwrap();
    let err = endpoint
        .connect_with(config, server.local_addr(), tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ApplicationVerificationFailure"),
        "{err}"
    );
    // Expecting the right key works.
    let config = tls::client_config(&client, server.id(), limits()).unwrap();
    let conn = endpoint
        .connect_with(config, server.local_addr(), tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    assert_eq!(tls::peer_id(&conn), Some(server.id()));
}

/// Sends raw bytes on a new stream and returns the error code the stream was reset with.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<u64> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    match tokio::time::timeout(WAIT, recv.read_to_end(wire::MAX_FRAME))
        .await
        .unwrap()
    {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Some(code.into_inner()),
        other => panic!("expected a reset, got {other:?}"),
    }
}

fn bad_frames() -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    let mut oversized = ((wire::MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0; 16]);
    vec![
        (
            "garbage",
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
            ErrorCode::Malformed,
        ),
        (
            "unknown variant",
            vec![0, 0, 0, 2, 1, 77],
            ErrorCode::Malformed,
        ),
        (
            "truncated payload",
            vec![0, 0, 0, 40, 1, 2],
            ErrorCode::Malformed,
        ),
        ("truncated header", vec![0, 0], ErrorCode::Malformed),
        ("oversized", oversized, ErrorCode::FrameTooLarge),
        ("empty frame", vec![0, 0, 0, 0], ErrorCode::Malformed),
    ]
}

#[tokio::test]
async fn bad_frames_to_a_daemon_reset_the_stream_and_others_are_still_served() {
    let w = world().await;
    w.a.set_session(Some(session("still-here")), WAIT).await;
    // B is trusted by A: bad input from a trusted peer must not hurt either.
    let b_identity = Identity::load_or_create(&w._dir.path().join("b")).unwrap();
    let conn = raw_connect(&b_identity, w.a.id(), w.a.quic_addr()).await;
    for (what, bytes, code) in bad_frames() {
        assert_eq!(send_raw(&conn, &bytes).await, Some(code as u64), "{what}");
    }
    // The same connection still gets answers to a good request.
    match net::request(&conn, RequestBody::InterfaceInfo)
        .await
        .unwrap()
    {
        ResponseBody::InterfaceInfo(info) => assert_eq!(info.first, w.a.id()),
        other => panic!("{other:?}"),
    }
    // A request a terminal does not serve gets a refusal, not a crash.
    match net::request(&conn, RequestBody::SetSession(None))
        .await
        .unwrap()
    {
        ResponseBody::Refused(r) => assert_eq!(r.reason, RefusalReason::WrongEndpoint),
        other => panic!("{other:?}"),
    }
    // And the daemon still serves everyone else.
    assert_eq!(
        w.b.pull("a", WAIT).await.unwrap().push.unwrap().title,
        "still-here"
    );
}

#[tokio::test]
async fn bad_frames_to_the_server_reset_the_stream_and_others_are_still_served() {
    let w = world().await;
    w.a.set_session(Some(session("still-here")), WAIT).await;
    let stranger = Identity::generate().unwrap();
    let conn = raw_connect(&stranger, w.server.id(), w.server.local_addr()).await;
    for (what, bytes, code) in bad_frames() {
        assert_eq!(send_raw(&conn, &bytes).await, Some(code as u64), "{what}");
    }
    assert!(matches!(
        net::request(&conn, RequestBody::SetSession(None))
            .await
            .unwrap(),
        ResponseBody::SessionStored
    ));
    assert_eq!(
        w.b.pull("a", WAIT).await.unwrap().push.unwrap().title,
        "still-here"
    );
}

/// Sends a Follow for `first` signed by `signer` on `conn`, whose identity is `second`.
async fn follow(
    conn: &quinn::Connection,
    ticket: Ticket,
    signer: &Identity,
    second: TerminalId,
) -> ResponseBody {
    let first = ticket.first;
    let signed = ticket.sign(signer);
    net::request(
        conn,
        RequestBody::Follow(InfoRequest {
            first,
            second,
            ticket: signed,
        }),
    )
    .await
    .unwrap()
}

fn assert_refused(body: ResponseBody, needle: &str) {
    match body {
        ResponseBody::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::BadTicket);
            assert!(
                r.message.contains(needle),
                "{} does not mention {needle}",
                r.message
            );
        }
        other => panic!("expected a refusal mentioning {needle}, got {other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_forged_replayed_expired_and_misdirected_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let a = Identity::generate().unwrap();
    let b = Identity::generate().unwrap();
    let mallory = Identity::generate().unwrap();
    // A is attached to the server (tickets of terminals never seen there are refused).
    let a_conn = raw_connect(&a, server.id(), server.local_addr()).await;
    assert!(matches!(
        net::request(&a_conn, RequestBody::SetSession(None)).await,
        Ok(ResponseBody::SessionStored)
    ));
    let conn = raw_connect(&b, server.id(), server.local_addr()).await;
    let good = |nonce: u8| Ticket {
        first: a.id(),
        second: b.id(),
        server: server.id(),
        issued_at: unix_now(),
        not_after: unix_now() + 60,
        nonce: [nonce; 16],
    };
    // Forged: claims to be A's, signed by Mallory.
    assert_refused(
        follow(&conn, good(1), &mallory, b.id()).await,
        "not signed by the first terminal",
    );
    // Made for another second terminal (Mallory), presented by B.
    let for_mallory = Ticket {
        second: mallory.id(),
        ..good(2)
    };
    assert_refused(
        follow(&conn, for_mallory, &a, mallory.id()).await,
        "another second terminal",
    );
    // For another server.
    let elsewhere = Ticket {
        server: mallory.id(),
        ..good(3)
    };
    assert_refused(follow(&conn, elsewhere, &a, b.id()).await, "another server");
    // Expired.
    let expired = Ticket {
        not_after: unix_now() - 1,
        ..good(4)
    };
    assert_refused(follow(&conn, expired, &a, b.id()).await, "expired");
    // Longer than the server's maximum lease (1 h by default): refused, so its nonce need not
    // be remembered for longer than a lease.
    let long = Ticket {
        not_after: unix_now() + 3600 + 60,
        ..good(5)
    };
    assert_refused(
        follow(&conn, long, &a, b.id()).await,
        "longer than the server's maximum lease",
    );
    // Issued a week ago for a week and a bit: refused although little of it is left.
    let hoarded = Ticket {
        issued_at: unix_now() - 7 * 24 * 3600,
        not_after: unix_now() + 60,
        ..good(8)
    };
    assert_refused(
        follow(&conn, hoarded, &a, b.id()).await,
        "longer than the server's maximum lease",
    );
    // Dated in the future.
    let future = Ticket {
        issued_at: unix_now() + 3600,
        not_after: unix_now() + 3660,
        ..good(9)
    };
    assert_refused(follow(&conn, future, &a, b.id()).await, "in the future");
    // Signed by a terminal that never attached to this server.
    let stranger = Identity::generate().unwrap();
    let unknown = Ticket {
        first: stranger.id(),
        ..good(10)
    };
    assert_refused(
        follow(&conn, unknown, &stranger, b.id()).await,
        "not attached to this server",
    );
    // Good, then replayed.
    assert!(matches!(
        follow(&conn, good(6), &a, b.id()).await,
        ResponseBody::Linked { .. }
    ));
    assert_refused(follow(&conn, good(6), &a, b.id()).await, "already used");
    // A good ticket stolen by Mallory is useless: her TLS identity is not the ticket's second.
    let m_conn = raw_connect(&mallory, server.id(), server.local_addr()).await;
    assert_refused(
        follow(&m_conn, good(7), &a, b.id()).await,
        "another second terminal",
    );
}

#[tokio::test]
async fn control_socket_speaks_json_lines() {
    let w = world().await;
    let socket = w._dir.path().join("b.sock");
    let mode = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"{\"cmd\":\"peers\"}\n").await.unwrap();
    let reply: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["peers"][0]["name"], "a");
    assert_eq!(reply["peers"][0]["trusted"], false);
    // A bad line gets an error and the connection keeps working.
    write
        .write_all(b"not json\n{\"cmd\":\"session_show\"}\n")
        .await
        .unwrap();
    let bad: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("bad request"));
    let shown: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(shown["ok"], true);
    assert!(shown["session"].is_null());
}

#[tokio::test]
async fn raw_frames_are_what_the_wire_module_says() {
    // A hand-built request frame gets a hand-checked response frame: the framing is the documented
    // one (u32 big-endian length, bincode payload), not something the helpers hide.
    let w = world().await;
    let b_identity = Identity::load_or_create(&w._dir.path().join("b")).unwrap();
    let conn = raw_connect(&b_identity, w.a.id(), w.a.quic_addr()).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &Request {
            id: 42,
            body: RequestBody::InterfaceInfo,
        },
    )
    .await
    .unwrap();
    send.finish().unwrap();
    let response: Response = read_frame(&mut recv, WAIT, wire::MAX_FRAME)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.id, 42);
    let ResponseBody::InterfaceInfo(info) = response.body else {
        panic!("{:?}", response.body)
    };
    assert_eq!(info.ticket.ticket.second, b_identity.id());
    assert_eq!(info.server.id, w.server.id());
    assert!(info.ticket.signature.0 != [0; 64]);
}

#[tokio::test]
async fn pairing_shows_one_code_on_both_sides_and_trusts_only_when_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let c = start(terminal(dir.path(), "c", None, vec![])).await;
    introduce(&b, "c", c.id(), c.quic_addr());
    introduce(&c, "b", b.id(), b.quic_addr());
    let (on_b, on_c) = tokio::join!(b.pair("c"), c.pair("b"));
    let (on_b, on_c) = (on_b.unwrap(), on_c.unwrap());
    assert_eq!(on_b.code, on_c.code, "both sides show the same code");
    assert_eq!(on_b.peer, c.id());
    assert_eq!(on_c.peer, b.id());
    // Nothing is trusted before the users confirm.
    assert!(b.trusted().is_empty() && c.trusted().is_empty());
    assert!(b.confirm_pair(c.id(), &on_b.code).unwrap());
    assert_eq!(b.trusted()[0].id, c.id().to_string());
    assert_eq!(b.trusted()[0].source, "added");
    // A wrong code on C cancels C's side: C does not trust B, and cannot confirm afterwards.
    let wrong = if on_c.code == "000000" {
        "000001"
    } else {
        "000000"
    };
    assert!(c.confirm_pair(b.id(), wrong).is_err());
    assert!(c.confirm_pair(b.id(), &on_c.code).is_err());
    assert!(c.trusted().is_empty());
    // A second pairing gives a fresh code (fresh nonces).
    let (again_b, again_c) = tokio::join!(b.pair("c"), c.pair("b"));
    assert_eq!(
        again_b.as_ref().unwrap().code,
        again_c.as_ref().unwrap().code
    );
    assert!(c.confirm_pair(b.id(), &again_c.unwrap().code).unwrap());
    assert_eq!(c.trusted().len(), 1);
}

#[tokio::test]
async fn unsolicited_pairing_requests_change_nothing() {
    let w = world().await;
    let stranger = Identity::generate().unwrap();
    let conn = raw_connect(&stranger, w.a.id(), w.a.quic_addr()).await;
    let commit = RequestBody::Pair(wire::PairStep::Commit {
        commitment: [9; 32],
    });
    match net::request(&conn, commit).await.unwrap() {
        ResponseBody::Refused(r) => assert_eq!(r.reason, RefusalReason::NotPairing),
        other => panic!("{other:?}"),
    }
    let reveal = RequestBody::Pair(wire::PairStep::Reveal { nonce: [9; 16] });
    assert!(matches!(
        net::request(&conn, reveal).await.unwrap(),
        ResponseBody::Refused(_)
    ));
    assert!(!w
        .a
        .trusted()
        .iter()
        .any(|t| t.id == stranger.id().to_string()));
    assert_eq!(w.a.pair_requests(), vec![stranger.id()]);
}

#[tokio::test]
async fn untrust_ends_the_live_link_and_refuses_later_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![])).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    a.trust(b.id()).unwrap();
    a.set_session(Some(session("before")), WAIT).await;
    b.pull("a", WAIT).await.unwrap();
    let mut pushes = b.subscribe();
    let (untrusted, revoked) = a.untrust(b.id()).await.unwrap();
    assert!(untrusted.changed && !untrusted.in_config);
    assert_eq!(
        revoked.removed(),
        Some(true),
        "the server ended B's live link"
    );
    // A's next change no longer reaches B.
    a.set_session(Some(session("after")), WAIT).await;
    let got = tokio::time::timeout(Duration::from_secs(1), pushes.recv()).await;
    assert!(got.is_err(), "B still received {got:?}");
    let err = b.pull("a", WAIT).await.unwrap_err();
    assert_eq!(err.refusal().unwrap().reason, RefusalReason::NotTrusted);
}

#[tokio::test]
async fn auto_follow_links_without_a_pull() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b_id = Identity::load_or_create(&dir.path().join("b"))
        .unwrap()
        .id();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b_id])).await;
    let mut b_config = terminal(dir.path(), "b", None, vec![]);
    b_config.follow_peers = vec![a.id()];
    let b = start(b_config).await;
    let mut pushes = b.subscribe();
    a.set_session(Some(session("followed")), WAIT).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    let push = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .expect("auto-follow push")
        .unwrap();
    assert_eq!(push.title, "followed");
    assert_eq!(b.follows().len(), 1);
    assert!(b.follows()[0].1 > unix_now());
    // Later changes arrive too.
    a.set_session(Some(session("next")), WAIT).await;
    let push = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(push.title, "next");
}

#[tokio::test]
async fn request_rate_per_peer_is_limited_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b_identity = Identity::load_or_create(&dir.path().join("b")).unwrap();
    let mut a_config = terminal(dir.path(), "a", Some(&server), vec![b_identity.id()]);
    a_config.limits.requests_per_sec_per_peer = 2;
    let a = start(a_config).await;
    let conn = raw_connect(&b_identity, a.id(), a.quic_addr()).await;
    let mut busy = 0;
    for _ in 0..6 {
        if let ResponseBody::Refused(r) = net::request(&conn, RequestBody::InterfaceInfo)
            .await
            .unwrap()
        {
            assert_eq!(r.reason, RefusalReason::Busy);
            busy += 1;
        }
    }
    assert!(busy >= 3, "only {busy} of 6 requests were refused");
    assert_eq!(
        a.metrics().get(
            "handoff_limit_hits_total",
            Some(("limit", "requests_per_sec_per_peer"))
        ),
        busy
    );
}

#[tokio::test]
async fn handshakes_from_unknown_keys_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut a_config = terminal(dir.path(), "a", None, vec![]);
    a_config.limits.unknown_handshakes_per_sec = 1;
    let a = start(a_config).await;
    let mut closed = 0;
    for _ in 0..4 {
        let conn = raw_connect(&Identity::generate().unwrap(), a.id(), a.quic_addr()).await;
        let r = net::request(&conn, RequestBody::InterfaceInfo).await;
        if let Err(RequestError::Connection(quinn::ConnectionError::ApplicationClosed(close))) = r {
            assert_eq!(close.error_code.into_inner(), ErrorCode::Busy as u64);
            closed += 1;
        }
    }
    assert!(closed >= 2, "only {closed} of 4 strangers were turned away");
}
