//! Trust that cannot be outlived (issue 10.2–10.4), in process on loopback: revocation against
//! hoarded tickets, revoking a peer the config lists, a server that answers an endless link,
//! and strangers filling the replay cache. Each test plays the attacker with keys of its own.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff::config::{ServerConfig, StoreKind};
use handoff::identity::{Identity, TerminalId};
use handoff::net::{self, unix_now};
use handoff::server::Server;
use handoff::tls::{self, TransportLimits};
use handoff::wire::{
    self, InfoRequest, RefusalReason, Request, RequestBody, Response, ResponseBody, SignedTicket,
    Ticket,
};
use support::inproc::*;

/// B's interface info from A, over B's own key.
async fn fetch_ticket(b: &Identity, a: TerminalId, a_addr: SocketAddr) -> SignedTicket {
    let conn = raw_connect(b, a, a_addr).await;
    match net::request(&conn, RequestBody::InterfaceInfo)
        .await
        .unwrap()
    {
        ResponseBody::InterfaceInfo(info) => info.ticket,
        other => panic!("A refused B: {other:?}"),
    }
}

async fn follow(conn: &quinn::Connection, ticket: SignedTicket) -> ResponseBody {
    let request = RequestBody::Follow(InfoRequest {
        first: ticket.ticket.first,
        second: ticket.ticket.second,
        ticket,
    });
    net::request(conn, request).await.unwrap()
}

fn assert_refused(body: ResponseBody, needle: &str) {
    match body {
        ResponseBody::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::BadTicket, "{}", r.message);
            assert!(
                r.message.contains(needle),
                "{:?} lacks {needle:?}",
                r.message
            );
        }
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

async fn server_at(dir: &std::path::Path, replay_cache: usize) -> Server {
    let mut config =
        ServerConfig::with_defaults(dir.join("server"), loopback(), StoreKind::Embedded);
    config.limits.replay_cache = replay_cache;
    Server::start(
        Identity::load_or_create(&config.state_dir).unwrap(),
        &config,
    )
    .await
    .unwrap()
}

/// A server with the key in `dir`, listening on `listen` (the address of one that was just
/// stopped, so its terminals find it again), on `store`.
async fn server_on(dir: &std::path::Path, listen: SocketAddr, store: StoreKind) -> Server {
    let config = ServerConfig::with_defaults(dir.join("server"), listen, store);
    tokio::time::timeout(WAIT, async {
        loop {
            let identity = Identity::load_or_create(&config.state_dir).unwrap();
            match Server::start(identity, &config).await {
                Ok(server) => return server,
                // The stopped server's socket may linger for a moment.
                Err(e) => {
                    eprintln!("server on {listen} not up yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
    .expect("the server starts again on its address")
}

/// Waits until `daemon` noticed that its home server is gone.
async fn wait_disconnected(daemon: &handoff::daemon::Daemon) {
    tokio::time::timeout(WAIT, async {
        while daemon.status().await.server.is_some_and(|s| s.connected) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the daemon noticed the server is gone");
}

/// While trusted, B hoards a ticket; A's server goes away and A revokes B meanwhile (the server
/// cannot hear of it); the server comes back on `store` at the same address, A reconnects and
/// sends the revocation first, and the hoarded ticket is refused. Returns A, B, the ticket and
/// the server.
async fn revoke_while_the_server_is_down(
    dir: &std::path::Path,
    store: StoreKind,
) -> (handoff::daemon::Daemon, Identity, SignedTicket, Server) {
    let server = server_on(dir, loopback(), store.clone()).await;
    let addr = server.local_addr();
    let b = Identity::generate().unwrap();
    let a = start(terminal(dir, "a", Some(&server), vec![])).await;
    wait_connected(&a).await;
    a.trust(b.id()).unwrap();
    let spare = fetch_ticket(&b, a.id(), a.quic_addr()).await;

    server.shutdown().await;
    drop(server);
    wait_disconnected(&a).await;
    let (untrusted, revoked) = a.untrust(b.id()).await.unwrap();
    assert!(untrusted.changed);
    assert_eq!(revoked.removed(), None, "the server is unreachable");

    let server = server_on(dir, addr, store).await;
    wait_connected(&a).await;
    let b_srv = raw_connect(&b, server.id(), server.local_addr()).await;
    assert_refused(follow(&b_srv, spare.clone()).await, "revoked");
    (a, b, spare, server)
}

/// Revocations made while the server was unreachable are sent again on reconnect (embedded
/// store: the restarted server's own state does not know of the revocation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_while_the_server_is_down_reaches_it_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, _, server) = revoke_while_the_server_is_down(dir.path(), StoreKind::Embedded).await;
    a.shutdown().await;
    server.shutdown().await;
}

/// The same on Redis; and the revocation is kept there: a new server on the same Redis, with A
/// gone (so nobody sends it again), still refuses the hoarded ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_resent_on_reconnect_is_kept_in_redis() {
    let Some(redis) = handoff::testing::redis::RedisServer::start_or_skip(
        "trust: a revocation resent on reconnect is kept in redis",
    ) else {
        return;
    };
    let store = StoreKind::Redis {
        url: handoff::config::RedisUrl::parse(&redis.url()).unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, spare, server) = revoke_while_the_server_is_down(dir.path(), store.clone()).await;
    a.shutdown().await;
    server.shutdown().await;
    drop(server);

    let server = server_on(dir.path(), loopback(), store).await;
    let b_srv = raw_connect(&b, server.id(), server.local_addr()).await;
    assert_refused(follow(&b_srv, spare).await, "revoked");
    server.shutdown().await;
}

/// While trusted, B hoards a second ticket; A revokes B; the spare ticket is useless at the
/// server, also after the server restarts, while a ticket A issues after trusting B again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrust_makes_hoarded_tickets_useless_also_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_at(dir.path(), 1024).await;
    let b = Identity::generate().unwrap();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![])).await;
    wait_connected(&a).await;
    a.trust(b.id()).unwrap();
    a.set_session(Some(session("before")), WAIT).await;

    let first = fetch_ticket(&b, a.id(), a.quic_addr()).await;
    let spare = fetch_ticket(&b, a.id(), a.quic_addr()).await;
    let b_srv = raw_connect(&b, server.id(), server.local_addr()).await;
    assert!(matches!(
        follow(&b_srv, first).await,
        ResponseBody::Linked { .. }
    ));

    let (untrusted, revoked) = a.untrust(b.id()).await.unwrap();
    assert!(untrusted.changed);
    assert_eq!(revoked.removed(), Some(true), "the live link ended");
    assert_refused(follow(&b_srv, spare.clone()).await, "revoked");

    // The revocation is kept by the store: a restarted server still refuses the spare.
    drop(b_srv);
    let dir_path = dir.path().to_path_buf();
    server.shutdown().await;
    let server = server_at(&dir_path, 1024).await;
    let b_srv = raw_connect(&b, server.id(), server.local_addr()).await;
    assert_refused(follow(&b_srv, spare).await, "revoked");
    a.shutdown().await;
    server.shutdown().await;
}

/// Trusted again, B gets tickets dated after the revocation, which the server accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_trusted_again_after_a_revocation_can_follow() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_at(dir.path(), 1024).await;
    let b = Identity::generate().unwrap();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![])).await;
    wait_connected(&a).await;
    a.trust(b.id()).unwrap();
    a.untrust(b.id()).await.unwrap();
    // In the same second as the revocation, too.
    a.trust(b.id()).unwrap();
    let ticket = fetch_ticket(&b, a.id(), a.quic_addr()).await;
    assert!(ticket.ticket.issued_at > unix_now().saturating_sub(5));
    let b_srv = raw_connect(&b, server.id(), server.local_addr()).await;
    assert!(matches!(
        follow(&b_srv, ticket).await,
        ResponseBody::Linked { .. }
    ));
    a.shutdown().await;
    server.shutdown().await;
}

/// `untrust` of a peer listed in `[trust] peers` works (no error): the live link ends, a hoarded
/// ticket is refused, pulls are refused at once, the reply warns that the config still lists
/// the peer, and it stays revoked across a restart with the same config, until `trust`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrust_of_a_config_peer_revokes_it_until_trusted_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_at(dir.path(), 1024).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let config = terminal(dir.path(), "a", Some(&server), vec![b.id()]);
    let a = start(config.clone()).await;
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    a.set_session(Some(session("x")), WAIT).await;
    b.pull("a", WAIT).await.unwrap();
    let follows = b.follows();
    assert_eq!(follows.len(), 1, "a pull's link is listed");
    assert_eq!(follows[0].0, a.id());
    // B's own key (the daemon's), hoarding a spare ticket while the config trusts it.
    let b_key = Identity::load_or_create(&dir.path().join("b")).unwrap();
    let spare = fetch_ticket(&b_key, a.id(), a.quic_addr()).await;

    let reply = handoff::control::call(
        &config.control_socket,
        &handoff::control::ControlRequest::Untrust {
            id: b.id().to_string(),
        },
        WAIT,
    )
    .await
    .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.changed, Some(true));
    assert_eq!(reply.revoked, Some(true), "the live link ended");
    let warning = reply.warning.expect("a warning that the config lists B");
    assert!(
        warning.contains("[trust] peers") && warning.contains(&b.id().to_string()),
        "{warning}"
    );
    let b_srv = raw_connect(&b_key, server.id(), server.local_addr()).await;
    assert_refused(follow(&b_srv, spare).await, "revoked");
    let err = b.pull("a", WAIT).await.unwrap_err();
    assert_eq!(err.refusal().unwrap().reason, RefusalReason::NotTrusted);

    a.shutdown().await;
    // At start, the daemon warns that its config lists a revoked peer (logged from the task
    // that starts it, which runs on this thread).
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let logs = tracing::subscriber::set_default(subscriber);
    let a = start(config).await;
    drop(logs);
    let text = captured.text();
    assert!(
        text.lines().any(|l| l.contains("WARN")
            && l.contains(&b.id().to_string())
            && l.contains("[trust] peers lists a peer revoked")),
        "no warning at start in:\n{text}"
    );
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    let err = b.pull("a", WAIT).await.unwrap_err();
    assert_eq!(
        err.refusal().unwrap().reason,
        RefusalReason::NotTrusted,
        "the revocation outlives a restart"
    );
    assert!(a.trust(b.id()).unwrap());
    b.pull("a", WAIT).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await;
}

/// Log lines captured from this thread's tracing events.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

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
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Two keys of a stranger's own mint tickets for each other as fast as they can; they fill
/// only their own quota, and a legitimate pull on the same server keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_minting_tickets_cannot_starve_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_at(dir.path(), 20).await;
    let (x, y) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    // X attaches (as anyone may), so its tickets are considered at all.
    let x_srv = raw_connect(&x, server.id(), server.local_addr()).await;
    assert!(matches!(
        net::request(&x_srv, RequestBody::SetSession(None)).await,
        Ok(ResponseBody::SessionStored)
    ));
    let y_srv = raw_connect(&y, server.id(), server.local_addr()).await;
    let mut linked = 0;
    let mut full = 0;
    for n in 0..40u8 {
        let ticket = Ticket {
            first: x.id(),
            second: y.id(),
            server: server.id(),
            issued_at: unix_now(),
            not_after: unix_now() + 3000,
            nonce: [n; 16],
        }
        .sign(&x);
        match follow(&y_srv, ticket).await {
            ResponseBody::Linked { .. } => linked += 1,
            ResponseBody::Refused(r) if r.message.contains("too many live tickets") => full += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((linked, full), (20, 20), "X's own quota filled up");

    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b.id()])).await;
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    a.set_session(Some(session("legit")), WAIT).await;
    let pulled = b
        .pull("a", WAIT)
        .await
        .expect("a legitimate pull during the flood");
    assert_eq!(pulled.push.unwrap().title, "legit");
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await;
}

const SERVE: TransportLimits = TransportLimits {
    max_bidi_streams: 16,
    max_uni_streams: 0,
    idle_timeout: Duration::from_secs(30),
    keep_alive: None,
};

/// A server that answers every follow with a link that never ends, counts B's connections, and
/// drops each of B's after 12 s (to see whether B comes back).
async fn endless_server(key: Identity, b: TerminalId) -> (SocketAddr, Arc<AtomicUsize>) {
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&key, SERVE).unwrap(), loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let from_b = Arc::new(AtomicUsize::new(0));
    let count = from_b.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            if tls::peer_id(&conn) == Some(b) {
                count.fetch_add(1, Ordering::SeqCst);
                let conn = conn.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    conn.close(0u32.into(), b"dropped");
                });
            }
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(Some(request)) =
                        net::read_frame::<Request>(&mut recv, net::READ_TIMEOUT, wire::MAX_FRAME)
                            .await
                    else {
                        continue;
                    };
                    let body = match request.body {
                        RequestBody::Hello { .. } => ResponseBody::Welcome {
                            epoch: 1,
                            start: 0,
                            window_lost: false,
                        },
                        RequestBody::SetSession(_) => ResponseBody::SessionStored,
                        RequestBody::Revoke { .. } => ResponseBody::Revoked { removed: false },
                        RequestBody::Follow(_) => ResponseBody::Linked {
                            until: u64::MAX,
                            has_session: false,
                        },
                        _ => continue,
                    };
                    let response = Response {
                        id: request.id,
                        body,
                    };
                    let _ = net::write_frame(&mut send, &response).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (addr, from_b)
}

/// The second terminal trusts the server only as far as the ticket goes: a link answered with
/// `until = u64::MAX` still ends with the ticket, and B does not reconnect after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_make_a_link_outlive_the_ticket() {
    endless_link_ends_after(Duration::from_secs(10), Duration::from_secs(600)).await;
}

/// Nor B's own lease: A signs tickets for an hour, B's `[trust] lease_secs` is 10 s, and the
/// link answered with `until = u64::MAX` ends after B's 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_make_a_link_outlive_the_second_terminals_lease() {
    endless_link_ends_after(Duration::from_secs(3600), Duration::from_secs(10)).await;
}

/// B pulls from A (tickets for `a_lease`, B's own lease `b_lease`) through a server that
/// answers an endless link; the link ends by the shorter of the two (one is 10 s), and B does
/// not come back after it.
async fn endless_link_ends_after(a_lease: Duration, b_lease: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let evil_dir = dir.path().join("evil");
    let evil = Identity::load_or_create(&evil_dir).unwrap();
    let mut b_config = terminal(dir.path(), "b", None, vec![]);
    b_config.lease = b_lease;
    let b = start(b_config).await;
    let (evil_addr, b_conns) =
        endless_server(Identity::load_or_create(&evil_dir).unwrap(), b.id()).await;
    let mut config = terminal(dir.path(), "a", None, vec![b.id()]);
    config.server = Some(handoff::config::ServerRef {
        id: evil.id(),
        addrs: vec![evil_addr.to_string()],
    });
    config.lease = a_lease;
    let a = start(config).await;
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());

    let pulled = b.pull("a", WAIT).await.unwrap();
    let now = unix_now();
    let lease = a_lease.min(b_lease).as_secs();
    assert!(
        pulled.linked_until <= now + lease + 1,
        "B took the server's word: linked until {}, {} s from now (A's lease {a_lease:?}, \
         B's {b_lease:?})",
        pulled.linked_until,
        pulled.linked_until.saturating_sub(now)
    );
    assert_eq!(b_conns.load(Ordering::SeqCst), 1);
    // Past the link's end (plus slack), B has let go and never comes back.
    tokio::time::sleep(Duration::from_secs(lease + 6)).await;
    assert_eq!(
        b_conns.load(Ordering::SeqCst),
        1,
        "B reconnected to keep a link its ticket and lease no longer cover"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A peer whose certificate names it with a bidi control (U+202E, which shows the rest of the
/// line reversed) is shown without it: in `handoff trusted`, `handoff peers`, and in the message
/// of a pull naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proven_name_with_bidi_characters_is_shown_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = terminal(dir.path(), "a", None, vec![]);
    config.name = "tv\u{202E}vt".into();
    config.accept = handoff::config::AcceptPolicy::Any;
    let a = start(config).await;
    let b = start(terminal(dir.path(), "b", None, vec![a.id()])).await;
    introduce(&b, "advert", a.id(), a.quic_addr());
    // A has no server: the pull is refused, after the handshake proved A's certificate name.
    let err = b.pull(&a.id().to_string(), WAIT).await.unwrap_err();
    assert_eq!(
        err.refusal().map(|r| r.reason),
        Some(RefusalReason::NoServer),
        "{err}"
    );
    let trusted = b.trusted();
    assert_eq!(trusted.len(), 1);
    assert_eq!(trusted[0].name.as_deref(), Some("tvvt"), "{trusted:?}");
    let peers = b.peers();
    assert_eq!(peers[0].name, "tvvt");
    let err = b.pull("tvvt", WAIT).await.unwrap_err();
    assert!(err.to_string().contains("tvvt"), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A revocation the server refuses (here: past `[limits] revocations_per_terminal`) is not
/// silent: `handoff untrust` warns that tickets issued before stay valid there until they
/// expire, and names the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_server_refuses_is_reported_to_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut server_config =
        ServerConfig::with_defaults(dir.path().join("server"), loopback(), StoreKind::Embedded);
    server_config.limits.revocations_per_terminal = 1;
    let server = Server::start(
        Identity::load_or_create(&server_config.state_dir).unwrap(),
        &server_config,
    )
    .await
    .unwrap();
    let (p1, p2) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let config = terminal(dir.path(), "a", Some(&server), vec![]);
    let a = start(config.clone()).await;
    wait_connected(&a).await;
    let call = |request| {
        let socket = config.control_socket.clone();
        async move {
            handoff::control::call(&socket, &request, WAIT)
                .await
                .unwrap()
        }
    };
    for p in [&p1, &p2] {
        let trusted = call(handoff::control::ControlRequest::Trust {
            id: p.id().to_string(),
        })
        .await;
        assert!(trusted.ok, "{trusted:?}");
    }
    let first = call(handoff::control::ControlRequest::Untrust {
        id: p1.id().to_string(),
    })
    .await;
    assert!(first.ok && first.warning.is_none(), "{first:?}");
    let second = call(handoff::control::ControlRequest::Untrust {
        id: p2.id().to_string(),
    })
    .await;
    assert!(second.ok, "untrusted here all the same: {second:?}");
    assert_eq!(second.changed, Some(true));
    let warning = second.warning.expect("a warning that the server refused");
    assert!(
        warning.contains("refused the revocation") && warning.contains("revocations_per_terminal"),
        "{warning}"
    );
    a.shutdown().await;
    server.shutdown().await;
}

/// A peer names the content server of others, by its real ID, at an address where nothing
/// answers (its interface info is its own word). The second terminal pulled from it, failed to
/// reach the server, and kept that address for the server's ID: every later pull through the
/// same server, from honest peers that named its real address, failed too, until a restart.
/// Now the addresses come from each pull's interface info (the one last reached first), and
/// the honest pull works.
#[tokio::test]
async fn a_peer_naming_a_server_at_a_false_address_cannot_block_later_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b.id()])).await;
    wait_connected(&a).await;
    // Nothing answers here: a socket that reads nothing.
    let hole = std::net::UdpSocket::bind(loopback()).unwrap();
    let mut liar = terminal(dir.path(), "liar", None, vec![b.id()]);
    liar.server = Some(handoff::config::ServerRef {
        id: server.id(),
        addrs: vec![hole.local_addr().unwrap().to_string()],
    });
    let liar = start(liar).await;
    introduce(&b, "liar", liar.id(), liar.quic_addr());
    introduce(&b, "a", a.id(), a.quic_addr());

    let lied = b.pull("liar", WAIT).await;
    assert!(lied.is_err(), "{lied:?}");
    assert!(a.set_session(Some(session("honest")), WAIT).await);
    let pulled = b.pull("a", WAIT).await.expect("an honest pull works");
    assert_eq!(pulled.push.unwrap().title, "honest");
    for d in [a, b, liar] {
        d.shutdown().await;
    }
    server.shutdown().await;
}

/// A server that refused a follow kept the second terminal's connection open for good (the
/// daemon keeps its connections alive), and could push on it whatever it liked for as long as
/// it liked: the user saw the pull fail, and pushes kept arriving. Now a link no follow wants
/// is closed at once.
#[tokio::test]
async fn a_server_that_refused_a_follow_keeps_no_connection_to_push_on() {
    let dir = tempfile::tempdir().unwrap();
    // The server takes links of at most a minute; A's tickets ask for ten: refused.
    let mut config =
        ServerConfig::with_defaults(dir.path().join("server"), loopback(), StoreKind::Embedded);
    config.limits.max_lease = Duration::from_secs(60);
    let server = Server::start(
        Identity::load_or_create(&config.state_dir).unwrap(),
        &config,
    )
    .await
    .unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let mut a = terminal(dir.path(), "a", Some(&server), vec![b.id()]);
    a.lease = Duration::from_secs(600);
    let a = start(a).await;
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());

    let refused = b.pull("a", WAIT).await;
    assert!(refused.is_err(), "{refused:?}");
    tokio::time::timeout(WAIT, async {
        while server.connected() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("B no longer connected to a server it follows nobody on");
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await;
}

/// A server this terminal is not attached to is there for the terminals it follows on it:
/// their sessions, and publishers' pushes to their followers, come on their streams. A
/// publisher's push to this terminal itself came through too, from any server it had
/// followed someone on; it is no longer delivered (counted as not followed).
#[tokio::test]
async fn only_the_home_server_delivers_a_publishers_own_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start_server_with_http(dir.path(), loopback()).await;
    let http_addr = server.http_addr().unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b.id()])).await;
    wait_connected(&a).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    assert!(a.set_session(Some(session("film")), WAIT).await);
    let mut pushes = b.subscribe();
    b.pull("a", WAIT).await.unwrap();
    assert_eq!(pushes.recv().await.unwrap().title, "film");

    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/push", b.id()),
        Some(&token),
        br#"{"uri":"https://ads.example/","title":"not yours to send"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        http_addr,
        "POST",
        &format!("/v1/terminals/{}/followers/push", a.id()),
        Some(&token),
        br#"{"uri":"https://media.example/next","title":"to a's followers"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Sent after the other on the same push stream: when it is here, the other was dropped.
    let next = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.title, "to a's followers");
    assert_eq!(
        b.metrics().get("handoff_pushes_not_followed_total", None),
        1
    );
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await;
}

/// A QUIC endpoint holding `key` that answers each request (each on its own task) with what
/// `answer` makes of it, given the caller's ID; `None` answers nothing.
async fn scripted_endpoint<F, Fut>(key: Identity, answer: F) -> SocketAddr
where
    F: Fn(TerminalId, RequestBody) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<ResponseBody>> + Send + 'static,
{
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&key, SERVE).unwrap(), loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let Some(caller) = tls::peer_id(&conn) else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        let Ok(Some(request)) = net::read_frame::<Request>(
                            &mut recv,
                            net::READ_TIMEOUT,
                            wire::MAX_FRAME,
                        )
                        .await
                        else {
                            return;
                        };
                        let Some(body) = answer(caller, request.body).await else {
                            return;
                        };
                        let response = Response {
                            id: request.id,
                            body,
                        };
                        let _ = net::write_frame(&mut send, &response).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    addr
}

/// Error messages carry a peer's own words: a server address it names, a reason it gives for
/// closing. Such text reached the user's terminal with its control characters (an escape
/// sequence can set the window title, write the clipboard, hide text). A server address with
/// control characters is now refused as bad interface info, and error messages shown to the
/// user are cleaned.
#[tokio::test]
async fn a_peers_words_in_an_error_reach_the_user_without_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let liar_dir = dir.path().join("liar");
    let liar = Identity::load_or_create(&liar_dir).unwrap();
    let liar_id = liar.id();
    let signer = Identity::load_or_create(&liar_dir).unwrap();
    let addr = scripted_endpoint(liar, move |second, _| {
        let server = Identity::generate().unwrap().id();
        let now = unix_now();
        let info = wire::InterfaceInfo {
            server: wire::ServerInfo {
                id: server,
                addrs: vec!["\u{1b}]0;owned\u{7}\u{1b}[2J:1".into()],
            },
            first: signer.id(),
            session: None,
            ticket: Ticket {
                first: signer.id(),
                second,
                server,
                issued_at: now,
                not_after: now + 60,
                nonce: rand::random(),
            }
            .sign(&signer),
        };
        std::future::ready(Some(ResponseBody::InterfaceInfo(Box::new(info))))
    })
    .await;
    introduce(&b, "liar", liar_id, addr);
    let error = b
        .pull(&liar_id.to_string(), WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.chars().any(char::is_control), "{error:?}");
    assert!(error.contains("server address"), "{error}");
    b.shutdown().await;
}

/// A server that answers `slow`'s follows after a second and refuses everyone else's at once.
async fn slow_then_refusing_server(key: Identity, slow: TerminalId) -> SocketAddr {
    scripted_endpoint(key, move |_, body| async move {
        Some(match body {
            RequestBody::Hello { .. } => ResponseBody::Welcome {
                epoch: 1,
                start: 0,
                window_lost: false,
            },
            RequestBody::SetSession(_) => ResponseBody::SessionStored,
            RequestBody::Revoke { .. } => ResponseBody::Revoked { removed: false },
            RequestBody::Follow(info) if info.first == slow => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                ResponseBody::Linked {
                    until: unix_now() + 60,
                    has_session: false,
                }
            }
            RequestBody::Follow(_) => ResponseBody::Refused(wire::Refusal {
                reason: RefusalReason::BadTicket,
                message: "no".into(),
            }),
            _ => return None,
        })
    })
    .await
}

/// A refused follow closes its link's connection only if nothing else wants it: not while
/// another follow on the same server is still waiting for its answer (it would fail, though
/// the server may have linked it).
#[tokio::test]
async fn a_refused_follow_does_not_close_a_follow_in_progress_on_the_same_server() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server_key = Identity::load_or_create(&server_dir).unwrap();
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let slow = start(terminal(dir.path(), "slow", None, vec![b.id()])).await;
    let addr =
        slow_then_refusing_server(Identity::load_or_create(&server_dir).unwrap(), slow.id()).await;
    let at_server = |name: &str| {
        let mut config = terminal(dir.path(), name, None, vec![b.id()]);
        config.server = Some(handoff::config::ServerRef {
            id: server_key.id(),
            addrs: vec![addr.to_string()],
        });
        config
    };
    slow.shutdown().await;
    let slow = start(at_server("slow")).await;
    let refused = start(at_server("refused")).await;
    wait_connected(&slow).await;
    wait_connected(&refused).await;
    introduce(&b, "slow", slow.id(), slow.quic_addr());
    introduce(&b, "refused", refused.id(), refused.quic_addr());

    let (linked, other) = tokio::join!(b.pull("slow", WAIT), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.pull("refused", WAIT).await
    });
    assert!(other.is_err(), "{other:?}");
    let linked = linked.expect("the slower follow is linked");
    assert!(linked.linked_until > unix_now());
    for d in [b, slow, refused] {
        d.shutdown().await;
    }
}
