//! Abuse of a daemon's network-facing side on a namespace LAN (issues 10 and 11): scripted
//! attackers in their own host namespaces against real `handoff daemon` processes. Each test
//! fails on a daemon without the defence it names.

mod support;

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use handoff::identity::{Identity, TerminalId};
use handoff::net;
use handoff::tls::{self, TransportLimits};
use handoff::wire::{RequestBody, ResponseBody};
use support::*;

const LIMITS: TransportLimits = TransportLimits {
    max_bidi_streams: 0,
    max_uni_streams: 0,
    idle_timeout: Duration::from_secs(10),
    keep_alive: None,
};

/// Runs an async block on a one-thread runtime (inside a namespace thread).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn counter(status: &serde_json::Value, series: &str) -> u64 {
    status["counters"][series].as_u64().unwrap_or(0)
}

fn limit_hits(status: &serde_json::Value, limit: &str) -> u64 {
    counter(
        status,
        &format!("handoff_limit_hits_total{{limit=\"{limit}\"}}"),
    )
}

fn pull(lan: &Lan, on: &str, peer: &str) -> std::process::Output {
    handoff(&[
        "pull",
        peer,
        "--json",
        "--timeout",
        "5",
        "--socket",
        &lan.socket(on),
    ])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server on `srv`; terminal `a` attached to it, trusting `b`, showing a session, with
/// `a_extra` config; terminal `b`; the other hosts empty. Returns the LAN and A's ID.
fn deployment(tag: &str, hosts: &[&str], a_extra: &str) -> (Lan, String) {
    let mut lan = Lan::new(tag, hosts);
    let (_, server_id) = lan.start_server("srv");
    let b_id = id_of(&lan.path("b"));
    let a_config = format!(
        "{}[trust]\npeers = [\"{b_id}\"]\n{a_extra}",
        lan.server_section("srv", &server_id)
    );
    lan.start_daemon("a", &a_config);
    lan.start_daemon("b", "");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    let out = lan.session_set("a", "https://media.example/x", "X");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        stderr(&out)
    );
    (lan, a_id)
}

/// A UDP socket for QUIC clients that hears nothing but Retry packets: its handshakes stay
/// half-open at the server, also after answering a Retry (as an attacker at a real address
/// would).
#[derive(Debug)]
struct DeafSocket(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for DeafSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.0.poll_recv(cx, bufs, meta) {
                // A Retry is a long-header packet of type 3: first byte 0b11_11_xxxx.
                Poll::Ready(Ok(n)) if n > 0 && meta[0].len > 0 && bufs[0][0] & 0xf0 == 0xf0 => {
                    return Poll::Ready(Ok(1))
                }
                Poll::Ready(Ok(_)) => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A client endpoint at `ip` whose handshakes never finish.
fn deaf_endpoint(ip: IpAddr) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket).unwrap();
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(DeafSocket(inner)),
        runtime,
    )
    .unwrap()
}

/// Issue 11.4: half-open handshakes from many addresses (9 IPv4 ones, and 32 IPv6 ones from
/// one /64) must not take the connection slots a trusted peer needs.
#[test]
fn half_open_handshakes_do_not_take_a_trusted_peers_slots() {
    if !require_root("abuse: half-open handshakes") {
        return;
    }
    let (lan, a_id) = deployment("ho", &["srv", "a", "b", "m"], "");
    lan.wait_for_peer("b", &a_id);
    let out = pull(&lan, "b", "a");
    assert!(out.status.success(), "{}", stderr(&out));

    lan.ip_in("a", &["addr", "add", "fd98::a/64", "dev", "eth0"]);
    let a_v4: SocketAddr = format!("{}:47600", lan.host("a").ip).parse().unwrap();
    let a_v6: SocketAddr = "[fd98::a]:47600".parse().unwrap();
    let mut sources = Vec::new();
    for i in 0..9 {
        let ip = format!("10.99.0.{}", 100 + i);
        lan.ip_in("m", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        sources.push((ip.parse::<IpAddr>().unwrap(), a_v4));
    }
    for i in 0..32 {
        let ip = format!("fd98::1:{i:x}");
        lan.ip_in("m", &["addr", "add", &format!("{ip}/64"), "dev", "eth0"]);
        sources.push((ip.parse::<IpAddr>().unwrap(), a_v6));
    }
    let a_tid: TerminalId = a_id.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let (stop2, started2) = (stop.clone(), started.clone());
    // Each source keeps 12 handshakes open, each until the client gives up after 3 s.
    let flood = lan.spawn_in("m", move || {
        block_on(async move {
            let mallory = Identity::generate().unwrap();
            let config = tls::client_config(&mallory, a_tid, LIMITS).unwrap();
            let mut tasks = Vec::new();
            for (ip, target) in sources {
                let endpoint = deaf_endpoint(ip);
                for _ in 0..12 {
                    let (endpoint, config, stop, started) = (
                        endpoint.clone(),
                        config.clone(),
                        stop2.clone(),
                        started2.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        let deadline = Instant::now() + Duration::from_secs(90);
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            let Ok(connecting) =
                                endpoint.connect_with(config.clone(), target, tls::SERVER_NAME)
                            else {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
                            started.fetch_add(1, Ordering::Relaxed);
                            let _ = tokio::time::timeout(Duration::from_secs(3), connecting).await;
                        }
                    }));
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    });
    // Every attacking task has started its first handshake, and a second round has begun.
    wait_for(Duration::from_secs(30), || {
        (started.load(Ordering::Relaxed) >= 41 * 12 + 100).then_some(())
    })
    .expect("the flood started");
    let mut failures = Vec::new();
    for i in 0..6 {
        let out = pull(&lan, "b", "a");
        if !out.status.success() {
            failures.push(format!("pull {i}: {}", stderr(&out)));
        }
    }
    let status = lan.status("a");
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of 6 pulls by a trusted peer failed during the flood:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        lan.log("a")
    );
    let retried = counter(&status, "handoff_handshake_retries_total");
    let evicted = limit_hits(&status, "max_pending_handshakes");
    assert!(
        retried > 0 && evicted > 0,
        "address validation ({retried}) or pending-handshake eviction ({evicted}) never engaged: {status}"
    );
    eprintln!(
        "{} half-open handshakes started; A sent {retried} Retry packets and dropped {evicted} pending handshakes; 6 pulls completed",
        started.load(Ordering::Relaxed)
    );
}

/// Issue 11.5: two hosts completing handshakes with throwaway keys, each under the per-source
/// limit, must not spend a third host's budget at a kiosk (`accept = "any"`).
#[test]
fn one_host_cannot_spend_anothers_unknown_handshake_budget() {
    if !require_root("abuse: unknown-key handshakes") {
        return;
    }
    let mut lan = Lan::new("ub", &["srv", "a", "c", "m1", "m2"]);
    let (_, server_id) = lan.start_server("srv");
    let a_config = format!(
        "{}[trust]\naccept = \"any\"\n",
        lan.server_section("srv", &server_id)
    );
    lan.start_daemon("a", &a_config);
    lan.start_daemon("c", "");
    let a_id = lan.status("a")["id"].as_str().unwrap().to_string();
    let out = lan.session_set("a", "https://media.example/kiosk", "Kiosk");
    assert!(out.status.success(), "{}", stderr(&out));
    lan.wait_for_peer("c", &a_id);
    let a_addr: SocketAddr = format!("{}:47600", lan.host("a").ip).parse().unwrap();
    let a_tid: TerminalId = a_id.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut floods = Vec::new();
    for host in ["m1", "m2"] {
        let (stop, done) = (stop.clone(), done.clone());
        // 18 completed handshakes per second, each with a fresh key (the per-source limit
        // is 20 per second).
        floods.push(lan.spawn_in(host, move || {
            block_on(async move {
                let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
                let mut tick = tokio::time::interval(Duration::from_millis(1000 / 18));
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tick.tick().await;
                    let (endpoint, done) = (endpoint.clone(), done.clone());
                    tokio::spawn(async move {
                        let key = Identity::generate().unwrap();
                        let config = tls::client_config(&key, a_tid, LIMITS).unwrap();
                        let connecting = endpoint
                            .connect_with(config, a_addr, tls::SERVER_NAME)
                            .unwrap();
                        if let Ok(Ok(conn)) =
                            tokio::time::timeout(Duration::from_secs(3), connecting).await
                        {
                            done.fetch_add(1, Ordering::Relaxed);
                            // Hold it until the daemon decides, as a real client would.
                            let _ = tokio::time::timeout(Duration::from_millis(200), conn.closed())
                                .await;
                        }
                    });
                }
            })
        }));
    }
    wait_for(Duration::from_secs(30), || {
        (done.load(Ordering::Relaxed) >= 60).then_some(())
    })
    .expect("the attackers are handshaking");
    let mut failures = Vec::new();
    for i in 0..10 {
        let out = pull(&lan, "c", "a");
        if !out.status.success() {
            failures.push(format!("pull {i}: {}", stderr(&out)));
        }
    }
    let status = lan.status("a");
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of 10 pulls from the kiosk failed while two other hosts handshook:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} attacker handshakes completed; 10 pulls completed; {status}",
        done.load(Ordering::Relaxed)
    );
}

/// A thread on `host` that counts mDNS queries whose first question names an instance
/// starting with `prefix`, sent by other hosts, until `stop` is set.
fn count_mdns_queries(
    lan: &Lan,
    host: &str,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let count = Arc::new(AtomicUsize::new(0));
    let own_ip: IpAddr = lan.host(host).ip.parse().unwrap();
    let seen = count.clone();
    let handle = lan.spawn_in(host, move || {
        let socket = shared_mdns_socket();
        let IpAddr::V4(own_v4) = own_ip else {
            panic!("an IPv4 LAN")
        };
        socket
            .join_multicast_v4(&"224.0.0.251".parse().unwrap(), &own_v4)
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 9000];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if from.ip() == own_ip {
                continue;
            }
            let packet = &buf[..n];
            // Header: QR is the top bit of byte 2; QDCOUNT is bytes 4-5.
            if n < 13 || packet[2] & 0x80 != 0 || u16::from_be_bytes([packet[4], packet[5]]) == 0 {
                continue;
            }
            let label_len = usize::from(packet[12]);
            let label = packet.get(13..13 + label_len).unwrap_or_default();
            if label.starts_with(prefix.as_bytes()) {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    (count, handle)
}

/// A UDP socket on port 5353 shared with the host's mDNS responders (SO_REUSEADDR/PORT).
fn shared_mdns_socket() -> std::net::UdpSocket {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the addresses passed are
    // valid for the lengths given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(rc, 0);
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 5353u16.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind 5353: {}", io::Error::last_os_error());
        std::net::UdpSocket::from_raw_fd(fd)
    }
}

/// Registers `count` fake handoff adverts on `host` (random IDs, instance names `fakeN`),
/// kept until `stop` is set.
fn fake_adverts(
    lan: &Lan,
    host: &str,
    count: usize,
    stop: Arc<AtomicBool>,
    registered: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let ip = lan.host(host).ip.clone();
    lan.spawn_in(host, move || {
        let mdns = mdns_sd::ServiceDaemon::new().unwrap();
        mdns.disable_interface(mdns_sd::IfKind::All).unwrap();
        mdns.enable_interface(mdns_sd::IfKind::Name("eth0".into()))
            .unwrap();
        for i in 0..count {
            let id = Identity::generate().unwrap().id().to_string();
            let name = format!("fake{i}");
            let props = [
                ("v", handoff::wire::PROTOCOL_MAJOR_TEXT),
                ("id", id.as_str()),
                ("name", name.as_str()),
            ];
            let info = mdns_sd::ServiceInfo::new(
                "_handoff._udp.local.",
                &name,
                &format!("{name}.local."),
                ip.as_str(),
                47600,
                &props[..],
            )
            .unwrap();
            // mdns-sd's command queue is bounded: wait for room.
            while let Err(e) = mdns.register(info.clone()) {
                assert!(matches!(e, mdns_sd::Error::Again), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            registered.fetch_add(1, Ordering::Relaxed);
        }
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = mdns.shutdown();
    })
}

/// Issue 11.7: a flood of fake adverts fills a capped peer table, and the daemon does not send
/// mDNS queries about the fakes.
#[test]
fn a_flood_of_fake_adverts_is_capped_and_not_queried() {
    if !require_root("abuse: fake mDNS adverts") {
        return;
    }
    let mut lan = Lan::new("mf", &["b", "m"]);
    lan.start_daemon("b", "[limits]\nmax_peers = 32\n");
    let stop = Arc::new(AtomicBool::new(false));
    let registered = Arc::new(AtomicUsize::new(0));
    let (queries, listener) = count_mdns_queries(&lan, "m", "fake", stop.clone());
    let adverts = fake_adverts(&lan, "m", 200, stop.clone(), registered.clone());
    let full = wait_for(Duration::from_secs(60), || {
        let status = lan.status("b");
        (limit_hits(&status, "max_peers") > 0).then_some(status)
    });
    let queries_at_full = queries.load(Ordering::Relaxed);
    // Two liveness rounds (every 10 s) with the table full.
    std::thread::sleep(Duration::from_secs(22));
    let status = lan.status("b");
    let queried = queries.load(Ordering::Relaxed) - queries_at_full;
    stop.store(true, Ordering::Relaxed);
    adverts.join().unwrap();
    listener.join().unwrap();
    let full = full.unwrap_or_else(|| {
        panic!(
            "the peer table never reached its cap of 32 ({} adverts registered; {queried} queries about them in 22 s): {status}",
            registered.load(Ordering::Relaxed),
        )
    });
    assert!(
        full["peers"].as_u64().unwrap() <= 32 && status["peers"].as_u64().unwrap() <= 32,
        "{full}\n{status}"
    );
    assert!(
        queried <= 10,
        "B sent {queried} mDNS queries about fake adverts in 22 s"
    );
    eprintln!(
        "{} fake adverts; B holds {} peers; {queried} queries about them in 22 s",
        registered.load(Ordering::Relaxed),
        status["peers"]
    );
}

/// Issue 11.7: an advert claiming A's ID with 40 addresses (that answer nothing) must not make
/// a pull of A dial them: B dials the address where A proved its key first, and a bounded
/// number of addresses in all.
#[test]
fn stuffed_addresses_do_not_slow_a_pull() {
    if !require_root("abuse: stuffed addresses") {
        return;
    }
    let (lan, a_id) = deployment("sa", &["srv", "a", "b", "m"], "");
    lan.wait_for_peer("b", &a_id);
    // The stuffed addresses sort before A's 10.99.0.2. M holds them (so it sees what B sends
    // there) and B reaches them on its LAN.
    lan.ip_in("b", &["route", "add", "10.0.0.0/24", "dev", "eth0"]);
    let stuffed: Vec<String> = (1..=40).map(|i| format!("10.0.0.{i}")).collect();
    for ip in &stuffed {
        lan.ip_in("m", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let dialled: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (stop2, dialled2, addrs) = (stop.clone(), dialled.clone(), stuffed.clone());
    let claimed = a_id.clone();
    let mallory = lan.spawn_in("m", move || {
        block_on(async move {
            for ip in addrs.clone() {
                let socket = tokio::net::UdpSocket::bind(format!("{ip}:47600"))
                    .await
                    .unwrap();
                let dialled = dialled2.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    while socket.recv_from(&mut buf).await.is_ok() {
                        dialled.lock().unwrap().insert(ip.clone());
                    }
                });
            }
            let mdns = mdns_sd::ServiceDaemon::new().unwrap();
            mdns.disable_interface(mdns_sd::IfKind::All).unwrap();
            mdns.enable_interface(mdns_sd::IfKind::Name("eth0".into()))
                .unwrap();
            let props = [
                ("v", handoff::wire::PROTOCOL_MAJOR_TEXT),
                ("id", claimed.as_str()),
                ("name", "a"),
            ];
            let info = mdns_sd::ServiceInfo::new(
                "_handoff._udp.local.",
                "a-stuffed",
                "stuffed.local.",
                addrs.join(",").as_str(),
                47600,
                &props[..],
            )
            .unwrap();
            mdns.register(info).unwrap();
            let _ = ready_tx.send(());
            while !stop2.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = mdns.shutdown();
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // B has resolved the stuffed advert: its mDNS events count it.
    let resolved =
        |s: &serde_json::Value| counter(s, "handoff_discovery_events_total{event=\"resolved\"}");
    let before = resolved(&lan.status("b"));
    wait_for(Duration::from_secs(20), || {
        (resolved(&lan.status("b")) > before).then_some(())
    })
    .unwrap_or_else(|| panic!("B never resolved the stuffed advert\n{}", lan.log("b")));
    let mut took = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let out = pull(&lan, "b", "a");
        took.push(t.elapsed());
        assert!(out.status.success(), "pull {i}: {}", stderr(&out));
        assert_eq!(json_lines(&out.stdout)[0]["from"], a_id.as_str());
    }
    let capped = limit_hits(&lan.status("b"), "max_addrs_per_peer");
    stop.store(true, Ordering::Relaxed);
    mallory.join().unwrap();
    assert!(capped > 0, "B kept all 40 addresses of the stuffed advert");
    let dialled = dialled.lock().unwrap().clone();
    assert!(
        dialled.len() <= 3,
        "B dialled {} of the 40 stuffed addresses: {dialled:?}",
        dialled.len()
    );
    eprintln!("3 pulls with 40 stuffed addresses took {took:?}; B dialled {dialled:?}");
}

/// Issue 10.6: an impostor advertising a trusted peer's ID under another name (at its own
/// address, and at the peer's real address) neither renames the peer nor keeps it listed after
/// it left, and its name is no pull or trust target.
#[test]
fn an_unverified_advert_cannot_rename_or_keep_a_trusted_peer() {
    if !require_root("abuse: impostor name") {
        return;
    }
    let mut lan = Lan::new("nm", &["srv", "a", "b", "m"]);
    let (_, server_id) = lan.start_server("srv");
    let a_id = id_of(&lan.path("a"));
    let b_id = id_of(&lan.path("b"));
    let a_config = format!(
        "{}[trust]\npeers = [\"{b_id}\"]\n",
        lan.server_section("srv", &server_id)
    );
    let a = lan.start_daemon("a", &a_config);
    lan.start_daemon("b", &format!("[trust]\npeers = [\"{a_id}\"]\n"));
    let out = lan.session_set("a", "https://media.example/x", "X");
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = lan.wait_for_peer("b", &a_id);
    assert_eq!(entry["trusted"], true, "{entry}");

    let (m_ip, a_ip) = (lan.host("m").ip.clone(), lan.host("a").ip.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (stop2, claimed) = (stop.clone(), a_id.clone());
    let impostor = lan.spawn_in("m", move || {
        let mdns = mdns_sd::ServiceDaemon::new().unwrap();
        mdns.disable_interface(mdns_sd::IfKind::All).unwrap();
        mdns.enable_interface(mdns_sd::IfKind::Name("eth0".into()))
            .unwrap();
        // One claim at Mallory's own address, one at A's real address (where a handshake
        // does reach A's key).
        for (instance, name, ip) in [
            ("impostor-1", "impostor", m_ip.as_str()),
            ("impostor-2", "impostor2", a_ip.as_str()),
        ] {
            let props = [
                ("v", handoff::wire::PROTOCOL_MAJOR_TEXT),
                ("id", claimed.as_str()),
                ("name", name),
            ];
            let info = mdns_sd::ServiceInfo::new(
                "_handoff._udp.local.",
                instance,
                &format!("{instance}.local."),
                ip,
                47600,
                &props[..],
            )
            .unwrap();
            mdns.register(info).unwrap();
        }
        let _ = ready_tx.send(());
        while !stop2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = mdns.shutdown();
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // For 12 s (a liveness round and more), B shows A under A's own name only.
    let until = Instant::now() + Duration::from_secs(12);
    let mut names = BTreeSet::new();
    while Instant::now() < until {
        for p in lan.peers("b") {
            if p["id"] == a_id.as_str() {
                names.insert(p["name"].as_str().unwrap_or("").to_string());
                assert_eq!(p["trusted"], true, "{p}");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        names,
        BTreeSet::from(["a".to_string()]),
        "B showed A's ID under these names"
    );
    for cmd in [&["pull", "impostor"][..], &["trust", "impostor2"][..]] {
        let out = handoff(&[cmd, &["--socket", &lan.socket("b")]].concat());
        assert!(!out.status.success(), "`{}` worked", cmd.join(" "));
        let err = stderr(&out);
        assert!(
            err.contains("no peer") || err.contains("not verified"),
            "{err}"
        );
    }
    let out = pull(&lan, "b", "a");
    assert!(out.status.success(), "{}", stderr(&out));

    // A leaves; Mallory keeps advertising A's ID. B stops listing it and does not list it again.
    lan.signal(a, libc::SIGTERM);
    wait_for(Duration::from_secs(20), || {
        (!lan.peers("b").iter().any(|p| p["id"] == a_id.as_str())).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the impostor's claims kept A listed: {:?}\n{}",
            lan.peers("b"),
            lan.log("b")
        )
    });
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let listed: Vec<_> = lan
            .peers("b")
            .into_iter()
            .filter(|p| p["id"] == a_id.as_str())
            .collect();
        assert!(listed.is_empty(), "A is listed again: {listed:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    impostor.join().unwrap();
}

/// Issue 11.8: a flood of refused requests, handshakes from strangers and bad handshakes makes
/// a bounded number of log lines, and a later line says how many were held back.
#[test]
fn a_flood_of_refusals_logs_a_bounded_number_of_lines() {
    if !require_root("abuse: log flood") {
        return;
    }
    let limits = "[limits]\nhandshakes_per_sec_per_source = 100000\nunknown_handshakes_per_sec = 100000\nrequests_per_sec_per_peer = 100000\nmax_connections_per_source = 1000\n";
    let (lan, a_id) = deployment("lg", &["srv", "a", "b", "m"], limits);
    lan.wait_for_peer("b", &a_id);
    let a_addr: SocketAddr = format!("{}:47600", lan.host("a").ip).parse().unwrap();
    let a_tid: TerminalId = a_id.parse().unwrap();
    let lines_before = lan.log("a").lines().count();
    let refused = lan.run_in("m", move || {
        block_on(async move {
            let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
            let mut refused = 0;
            // One stranger asking 300 times on one connection, 150 strangers asking once.
            let mallory = Identity::generate().unwrap();
            let config = tls::client_config(&mallory, a_tid, LIMITS).unwrap();
            let conn = endpoint
                .connect_with(config, a_addr, tls::SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            for _ in 0..300 {
                if let Ok(ResponseBody::Refused(_)) =
                    net::request(&conn, RequestBody::InterfaceInfo).await
                {
                    refused += 1;
                }
            }
            for _ in 0..150 {
                let key = Identity::generate().unwrap();
                let config = tls::client_config(&key, a_tid, LIMITS).unwrap();
                if let Ok(conn) = endpoint
                    .connect_with(config, a_addr, tls::SERVER_NAME)
                    .unwrap()
                    .await
                {
                    if let Ok(ResponseBody::Refused(_)) =
                        net::request(&conn, RequestBody::InterfaceInfo).await
                    {
                        refused += 1;
                    }
                }
            }
            // Handshakes that pin a key A does not hold fail at the client; ones that offer a
            // certificate A cannot read fail at A.
            for _ in 0..150 {
                let other = Identity::generate().unwrap();
                let config =
                    tls::client_config(&Identity::generate().unwrap(), other.id(), LIMITS).unwrap();
                let _ = endpoint
                    .connect_with(config, a_addr, tls::SERVER_NAME)
                    .unwrap()
                    .await;
            }
            refused
        })
    });
    assert!(refused >= 400, "only {refused} requests were refused");
    // Let the last lines reach the log.
    std::thread::sleep(Duration::from_millis(500));
    let log = lan.log("a");
    let flood_lines: Vec<&str> = log.lines().skip(lines_before).collect();
    assert!(
        flood_lines.len() <= 40,
        "{refused} refusals made {} log lines:\n{}",
        flood_lines.len(),
        flood_lines[..flood_lines.len().min(60)].join("\n")
    );
    // After the interval, the next refusal's line says how many were held back.
    std::thread::sleep(Duration::from_secs(11));
    lan.run_in("m", move || {
        block_on(async move {
            let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
            let config = tls::client_config(&Identity::generate().unwrap(), a_tid, LIMITS).unwrap();
            let conn = endpoint
                .connect_with(config, a_addr, tls::SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            let _ = net::request(&conn, RequestBody::InterfaceInfo).await;
        })
    });
    // Every refusal is accounted for: logged, or counted in a later line's `suppressed=`.
    let held = |line: &str| -> Option<u64> {
        let n = line.split("suppressed=").nth(1)?;
        n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let accounted = wait_for(Duration::from_secs(5), || {
        let log = lan.log("a");
        let lines: Vec<&str> = log
            .lines()
            .skip(lines_before)
            .filter(|l| l.contains("refused interface info"))
            .collect();
        let total: u64 = lines.iter().map(|l| 1 + held(l).unwrap_or(0)).sum();
        let summary = lines.last().and_then(|l| held(l)).unwrap_or(0);
        (total > refused as u64 && summary > 0).then_some((lines.len(), total))
    });
    let (lines, total) = accounted.unwrap_or_else(|| {
        panic!(
            "the held-back refusals are not counted:\n{}",
            lan.log("a")
                .lines()
                .skip(lines_before)
                .filter(|l| l.contains("refused interface info"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    eprintln!(
        "{} refusals (and one more) in {lines} log lines, which count {total}",
        refused
    );
}

/// Connects to the server at `to` with a fresh key and says hello; why not, if it failed.
async fn server_hello(expected: TerminalId, to: SocketAddr) -> Result<(), String> {
    let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
    let me = Identity::generate().unwrap();
    let limits = TransportLimits {
        max_bidi_streams: 4,
        ..LIMITS
    };
    let config = tls::client_config(&me, expected, limits).unwrap();
    let connecting = endpoint
        .connect_with(config, to, tls::SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no handshake within 5 s".into()),
    };
    let hello = net::request(
        &conn,
        RequestBody::Hello {
            cursor: None,
            streams: Vec::new(),
        },
    );
    match tokio::time::timeout(Duration::from_secs(5), hello).await {
        Ok(Ok(ResponseBody::Welcome { .. })) => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(_) => Err("no welcome within 5 s".into()),
    }
}

/// Half-open handshakes held the server's connection slots for their whole 5 s timeout, so a
/// flood of them from a few addresses, each well under its per-source limits, locked every
/// terminal out. The server now holds at most `max_pending_handshakes` in progress (dropping
/// the oldest for a new one) and, once half are taken, asks new sources to prove their address
/// (QUIC Retry) before any handshake state exists.
#[test]
fn half_open_handshakes_do_not_lock_terminals_out_of_the_server() {
    if !require_root("abuse: half-open handshakes at the server") {
        return;
    }
    let mut lan = Lan::new("sh", &["srv", "b", "m"]);
    let server_id: TerminalId = id_of(&lan.path("srv")).parse().unwrap();
    let config = lan.server_config(
        "srv",
        "[store]\nkind = \"memory\"\n[limits]\nmax_connections = 64\nmax_pending_handshakes = 16\n",
    );
    lan.spawn("srv", &["server", "--config", &config], "srv");
    let ready = wait_for(Duration::from_secs(10), || {
        lan.log("srv").contains("server listening").then_some(())
    });
    assert!(ready.is_some(), "server did not start:\n{}", lan.log("srv"));
    let server: SocketAddr = lan.host("srv").addr(47700).parse().unwrap();
    let mut sources = Vec::new();
    for i in 0..9 {
        let ip = format!("10.99.0.{}", 100 + i);
        lan.ip_in("m", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        sources.push(ip.parse::<IpAddr>().unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let (stop2, started2) = (stop.clone(), started.clone());
    // Each source starts a handshake every 200 ms (5/s, far below its limit) and never gives
    // one up: the server holds each until its own handshake timeout.
    let flood = lan.spawn_in("m", move || {
        block_on(async move {
            let mallory = Identity::generate().unwrap();
            let config = tls::client_config(&mallory, server_id, LIMITS).unwrap();
            let endpoints: Vec<quinn::Endpoint> = sources.into_iter().map(deaf_endpoint).collect();
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                for endpoint in &endpoints {
                    if let Ok(connecting) =
                        endpoint.connect_with(config.clone(), server, tls::SERVER_NAME)
                    {
                        started2.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(tokio::time::timeout(Duration::from_secs(30), connecting));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    // More than 64 handshakes are held by now.
    wait_for(Duration::from_secs(30), || {
        (started.load(Ordering::Relaxed) >= 9 * 15).then_some(())
    })
    .expect("the flood started");
    let results = lan.run_in("b", move || {
        block_on(async move {
            let mut results = Vec::new();
            for _ in 0..6 {
                results.push(server_hello(server_id, server).await);
            }
            results
        })
    });
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{} of 6 terminal connections failed during the flood:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        lan.log("srv")
    );
    assert!(
        lan.log("srv").contains("max_pending_handshakes"),
        "the pending-handshake cap never engaged:\n{}",
        lan.log("srv")
    );
}

/// A client that sends its handshake and never answers (a deaf socket on loopback) holds a
/// pending handshake at the daemon only until `[limits] handshake_timeout_secs`: then it is
/// dropped, counted as that limit's hit and as a failed handshake. In process, no namespace.
#[tokio::test]
async fn a_silent_clients_handshake_is_dropped_at_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::inproc::terminal(dir.path(), "a", None, vec![]);
    config.limits.handshake_timeout = Duration::from_secs(1);
    let a = support::inproc::start(config).await;
    let endpoint = deaf_endpoint(IpAddr::from([127, 0, 0, 1]));
    let mallory = Identity::generate().unwrap();
    let client = tls::client_config(&mallory, a.id(), LIMITS).unwrap();
    let connecting = endpoint
        .connect_with(client, a.quic_addr(), tls::SERVER_NAME)
        .unwrap();
    let handshake = tokio::spawn(connecting);
    let metrics = a.metrics();
    let hits = || {
        metrics.get(
            "handoff_limit_hits_total",
            Some(("limit", "handshake_timeout_secs")),
        )
    };
    tokio::time::timeout(support::inproc::WAIT, async {
        while hits() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the silent handshake is dropped");
    assert_eq!(hits(), 1);
    assert_eq!(
        metrics.get(
            "handoff_handshakes_failed_total",
            Some(("reason", "timeout"))
        ),
        1
    );
    assert_eq!(metrics.get("handoff_connections_total", None), 0);
    handshake.abort();
    a.shutdown().await;
}
