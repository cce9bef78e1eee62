//! Server load (DESIGN §9, issue 4), with the release binary as the server and this process as
//! the load generator holding many terminal connections.
//!
//! Run as root: `cargo bench --bench server` (options: `-- --terminals N --followers N
//! --pushes N --publishers N --store-pushes N --nodes 1|2`). Builds a LAN of namespace hosts:
//! `srv` (running `handoff server` with the embedded store and the HTTP API) and `load` (this
//! process, via a thread that joined that namespace). With `--nodes 2`, two server nodes `srv`
//! and `srv2` share one identity and a `redis-server` (on a Unix socket in the bench's directory);
//! terminals and publishers are spread over both nodes. It measures:
//! - durable pushes/s through the store alone (group commit, in this process, fsync per batch);
//! - durable pushes/s through the HTTP publish API (keep-alive connections, 2xx = on disk);
//! - 1:1 pushes to N connected terminals: publish → the terminal reads it, p50/p99;
//! - one session change fanned out to N followers: until every follower has it, p50/p99;
//! - server memory (VmRSS) per idle connected terminal.
//!
//! With `--reconnect N` it runs only the idle and restart stages, on a fresh server: N terminals
//! connect and say hello (the server's RSS with them, minus before, per terminal), then the
//! server is stopped (SIGTERM) and started again, and the terminals come back on their own with
//! the daemon's reconnect policy ([`handoff::daemon::Reconnect`]: jittered delays) and the
//! cursor of their last welcome; it prints how long until every one was welcomed again, and how
//! many handshakes resumed a TLS session.
//!
//! Then the same load against Mosquitto 2 in the same namespaces (`benches/server/mosquitto.rs`; skipped
//! with `--no-mosquitto` or when `mosquitto` is not installed), and a table of the ratios.

#[path = "server/mosquitto.rs"]
mod mosquitto;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use handoff::identity::Identity;
use handoff::net::{self, read_frame, unix_now};
use handoff::server::store::{EmbeddedBackend, NewPush, Op, Store};
use handoff::tls::{self, TransportLimits};
use handoff::wire::{self, InfoRequest, RequestBody, ResponseBody, ServerPush, Session, Ticket};
use support::*;

const TOKEN: &str = "bench-token-0123456789";

fn percentiles(label: &str, samples: &mut [f64]) {
    if samples.is_empty() {
        println!("{label:<48} no samples");
        return;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<48} n={:<6} p50={:>8.2} ms  p90={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        samples[samples.len() - 1]
    );
}

/// Durable appends through the store actor, from many concurrent writers (group commit).
fn store_throughput(dir: &std::path::Path, pushes: usize, followers: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::start(Box::new(
            EmbeddedBackend::open(&dir.join("bench.redb")).unwrap(),
        ));
        let writers = 256;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let to = handoff::identity::TerminalId::from_bytes([(w % 251) as u8; 32]);
                for i in 0..pushes / writers {
                    let push = NewPush {
                        from: None,
                        uri: format!("u://{w}/{i}"),
                        title: "bench".into(),
                        body: None,
                        position: None,
                        meta: Default::default(),
                        ttl: Duration::from_secs(3600),
                        collapse_key: None,
                    };
                    store
                        .write_one(Op::Append {
                            to,
                            push,
                            now: unix_now(),
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed();
        let n = (pushes / writers) * writers;
        println!(
            "{:<48} {} pushes in {:.2} s = {:.0} pushes/s ({writers} concurrent writers)",
            "durable appends, store alone (fsync per batch)",
            n,
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64()
        );
        // One session change with `followers` followers: fan-out on read stores it once, in
        // the first terminal's stream, with the session itself; its cost does not depend on
        // the number of followers.
        let first = handoff::identity::TerminalId::from_bytes([255; 32]);
        let session = Session {
            uri: "https://media.example/video".into(),
            title: "A video".into(),
            position: Some(1.0),
            meta: Default::default(),
        };
        let mut times = Vec::new();
        for _ in 0..20 {
            let ops = vec![
                Op::SetSession {
                    id: first,
                    session: Some(session.clone()),
                },
                Op::Append {
                    to: handoff::server::store::stream_key(&first),
                    push: NewPush::session(first, &session, Duration::from_secs(3600)),
                    now: unix_now(),
                },
            ];
            let started = Instant::now();
            store.write(ops).await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        percentiles(
            &format!("fan-out commit, store alone (any of {followers} followers)"),
            &mut times,
        );
        store.close().await;
    });
}

/// A keep-alive HTTP/1.1 connection.
struct Http {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Http {
    fn connect(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> u16 {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.writer.write_all(req.as_bytes()).unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        status
    }
}

/// One simulated terminal: its connection and the time each push (by title) arrived.
struct Terminal {
    id: handoff::identity::TerminalId,
    conn: quinn::Connection,
}

const LIMITS: TransportLimits = TransportLimits {
    max_bidi_streams: 4,
    max_uni_streams: 0,
    idle_timeout: Duration::from_secs(60),
    keep_alive: Some(Duration::from_secs(10)),
};

type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// Connects `n` terminals (each its own key), says hello, and records push arrivals by title.
async fn connect_terminals(
    endpoint: &quinn::Endpoint,
    servers: &[SocketAddr],
    server_id: handoff::identity::TerminalId,
    n: usize,
    arrivals: Arrivals,
) -> Vec<Terminal> {
    let mut out = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let server = servers[i % servers.len()];
        let identity = Identity::generate().unwrap();
        let config = tls::client_config(&identity, server_id, LIMITS).unwrap();
        let endpoint = endpoint.clone();
        let arrivals = arrivals.clone();
        pending.push(tokio::spawn(async move {
            // A server busy with thousands of handshakes may time some out: try again.
            let mut attempt = 0;
            let conn = loop {
                match endpoint
                    .connect_with(config.clone(), server, tls::SERVER_NAME)
                    .unwrap()
                    .await
                {
                    Ok(conn) => break conn,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        let _ = e;
                    }
                    Err(e) => panic!("cannot connect a terminal: {e}"),
                }
            };
            match net::request(
                &conn,
                RequestBody::Hello {
                    cursor: None,
                    streams: Vec::new(),
                },
            )
            .await
            .unwrap()
            {
                ResponseBody::Welcome { .. } => {}
                other => panic!("{other:?}"),
            }
            let reader = conn.clone();
            tokio::spawn(async move {
                let Ok((_send, mut recv)) = reader.accept_bi().await else {
                    return;
                };
                while let Ok(Some(ServerPush::Item(item) | ServerPush::Stream { item, .. })) =
                    read_frame::<ServerPush>(&mut recv, Duration::from_secs(3600), wire::MAX_FRAME)
                        .await
                {
                    arrivals
                        .lock()
                        .unwrap()
                        .entry(item.title)
                        .or_default()
                        .push(Instant::now());
                }
            });
            Terminal {
                id: identity.id(),
                conn,
            }
        }));
        // Keep the number of handshakes in flight bounded.
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                out.push(p.await.unwrap());
            }
        }
    }
    for p in pending {
        out.push(p.await.unwrap());
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A terminal that stays connected, and reconnects as the daemon does whenever it loses the
/// server, saying hello with the cursor of its last welcome. Each welcome is recorded.
async fn returning_terminal(
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    server_id: handoff::identity::TerminalId,
    welcomes: Arc<Mutex<Vec<Instant>>>,
    failures: Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    let identity = Identity::generate().unwrap();
    // The daemon's transport: keep-alives every 5 s, 12 s idle timeout.
    let config = tls::client_config(&identity, server_id, handoff::daemon::DIAL_LIMITS).unwrap();
    let mut reconnect = handoff::daemon::Reconnect::default();
    let mut cursor = None;
    loop {
        let attempt = async {
            let conn = endpoint
                .connect_with(config.clone(), server, tls::SERVER_NAME)
                .ok()?
                .await
                .ok()?;
            match net::request(
                &conn,
                RequestBody::Hello {
                    cursor,
                    streams: Vec::new(),
                },
            )
            .await
            .ok()?
            {
                ResponseBody::Welcome { epoch, start, .. } => {
                    Some((conn, wire::Cursor { epoch, next: start }))
                }
                _ => None,
            }
        };
        // The daemon gives one dial 3 s (server_link's CONNECT_TIMEOUT).
        let delay = match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Some((conn, welcomed_at))) => {
                cursor = Some(welcomed_at);
                welcomes.lock().unwrap().push(Instant::now());
                reconnect.connected();
                tokio::select! {
                    _ = stop.cancelled() => {
                        conn.close(0u32.into(), b"done");
                        return;
                    }
                    _ = conn.closed() => {}
                }
                reconnect.after_loss()
            }
            _ => {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reconnect.after_failure()
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// `handoff_tls_resumptions_total` from the server's `/metrics`.
fn resumptions(http_addr: &str) -> u64 {
    let Ok(mut stream) = TcpStream::connect(http_addr) else {
        return 0;
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix("handoff_tls_resumptions_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The idle-memory and restart stages (`--reconnect N`).
fn idle_and_restart(lan: &mut Lan, server: usize, config: &str, n: usize) {
    let quic: SocketAddr = lan.host("srv").addr(47700).parse().unwrap();
    let http_addr = lan.host("srv").addr(47780);
    let server_id: handoff::identity::TerminalId = id_of(&lan.path("srv")).parse().unwrap();
    let pid = lan.pid(server);
    let welcomes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let failures: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let wait_welcomes = |welcomes: &Arc<Mutex<Vec<Instant>>>, count: usize, limit: Duration| {
        let deadline = Instant::now() + limit;
        while welcomes.lock().unwrap().len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let load = {
        let (welcomes, failures, stop) = (welcomes.clone(), failures.clone(), stop.clone());
        lan.spawn_in("load", move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
                let mut tasks = Vec::with_capacity(n);
                for i in 0..n {
                    tasks.push(tokio::spawn(returning_terminal(
                        endpoint.clone(),
                        quic,
                        server_id,
                        welcomes.clone(),
                        failures.clone(),
                        stop.clone(),
                    )));
                    // The first connects 64 at a time, as the other stages do.
                    if i % 64 == 63 {
                        while welcomes.lock().unwrap().len() + 64 < i {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), endpoint.wait_idle()).await;
            })
        })
    };
    let rss_before = rss_kib(pid);
    let started = Instant::now();
    wait_welcomes(&welcomes, n, Duration::from_secs(600));
    println!(
        "{:<48} {} terminals in {:.1} s",
        "connected",
        welcomes.lock().unwrap().len(),
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    let rss_idle = rss_kib(pid);
    println!(
        "{:<48} RSS {rss_before} KiB before, {rss_idle} KiB with {n} idle terminals = {:.1} KiB per terminal",
        "server memory, idle terminals",
        rss_idle.saturating_sub(rss_before) as f64 / n as f64
    );

    let failed_before = failures.load(std::sync::atomic::Ordering::Relaxed);
    // The restart: SIGTERM (the server closes every connection), wait for its exit, start again.
    let stopped = Instant::now();
    lan.signal(server, libc::SIGTERM);
    lan.wait(server, Duration::from_secs(30))
        .expect("the server stops");
    let down = stopped.elapsed();
    let restarted = Instant::now();
    let server = lan.spawn_env(
        "srv",
        &["server", "--config", config],
        "srv-restarted",
        &[("RUST_LOG", "info")],
    );
    wait_for(Duration::from_secs(30), || {
        lan.log("srv-restarted")
            .contains("server listening")
            .then_some(())
    })
    .expect("server restarts");
    let listening = restarted.elapsed();
    wait_welcomes(&welcomes, 2 * n, Duration::from_secs(120));
    let mut back: Vec<f64> = welcomes.lock().unwrap()[n..]
        .iter()
        .map(|t| (*t - restarted).as_secs_f64() * 1000.0)
        .collect();
    println!(
        "{:<48} stopped in {:.2} s; restarted, listening after {:.2} s",
        "server restart",
        down.as_secs_f64(),
        listening.as_secs_f64()
    );
    let all = back.iter().copied().fold(0.0, f64::max);
    println!(
        "{:<48} {} of {n} welcomed again; the last {:.2} s after the restart began",
        "returning terminals",
        back.len(),
        all / 1000.0
    );
    percentiles("  restart -> terminal welcomed again", &mut back);
    println!(
        "{:<48} {} before the restart, {} after (no answer within 3 s, or refused)",
        "failed dial attempts",
        failed_before,
        failures.load(std::sync::atomic::Ordering::Relaxed) - failed_before
    );
    let resumed = lan.run_in("load", move || resumptions(&http_addr));
    println!(
        "{:<48} {resumed} of the restarted server's handshakes resumed a TLS session",
        "TLS resumptions",
    );
    stop.cancel();
    let _ = load.join();
    lan.signal(server, libc::SIGTERM);
    let _ = lan.wait(server, Duration::from_secs(30));
}

fn main() {
    if !require_root("bench server") {
        return;
    }
    let reconnect = numeric_arg("--reconnect", 0);
    let terminals = numeric_arg("--terminals", 1000);
    let followers = numeric_arg("--followers", 10_000);
    let pushes = numeric_arg("--pushes", 20_000);
    let publishers = numeric_arg("--publishers", 32);
    let store_pushes = numeric_arg("--store-pushes", 100_000);
    println!("setup: release build, {} cores; server in namespace srv, load generator in namespace load, veth bridge",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));

    let versus = !std::env::args().any(|a| a == "--no-mosquitto")
        && std::process::Command::new("mosquitto")
            .arg("-h")
            .output()
            .is_ok();
    let nodes = numeric_arg("--nodes", 1).clamp(1, 2);
    let hosts: &[&str] = if nodes == 2 {
        &["srv", "srv2", "load"]
    } else {
        &["srv", "load"]
    };
    let mut lan = Lan::new("sb", hosts);
    if store_pushes > 0 {
        store_throughput(lan.dir.path(), store_pushes, followers);
    }
    let redis = (nodes == 2).then(|| {
        handoff::testing::redis::RedisServer::start().expect("redis-server for --nodes 2")
    });

    let server_id = id_of(&lan.path("srv"));
    let node_hosts: Vec<&str> = hosts[..nodes].to_vec();
    let mut pids = Vec::new();
    let mut quic = Vec::new();
    let mut http_addrs = Vec::new();
    for host in &node_hosts {
        if *host != "srv" {
            // One deployment, one identity.
            std::fs::create_dir_all(lan.path(host)).unwrap();
            std::fs::copy(
                lan.path("srv").join("identity.key"),
                lan.path(host).join("identity.key"),
            )
            .unwrap();
        }
        // One load generator holds every connection: raise the per-source limits.
        let store = match &redis {
            Some(redis) => {
                let token_file = lan.path("token");
                std::fs::write(&token_file, TOKEN).unwrap();
                std::fs::set_permissions(
                    &token_file,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                format!(
                    "[store]\nkind = \"redis\"\nurl = \"{}\"\n[http]\nlisten = \"{}\"\ntoken_file = \"{}\"\n",
                    redis.url(),
                    lan.host(host).addr(47780),
                    token_file.display()
                )
            }
            None => lan.http_server_toml(host, TOKEN),
        };
        let extra = format!(
            "{store}[limits]\nmax_connections = 30000\nmax_connections_per_source = 30000\nhandshakes_per_sec_per_source = 100000\nrequests_per_sec_per_terminal = 100000\nknown_terminals_per_source = 100000\nrequests_per_sec_per_source = 1000000\nsession_bytes_per_sec_per_source = 4000000000\n"
        );
        let config = lan.server_config(host, &extra);
        // A production log level for the restart stage: a debug line per connection would be
        // part of what it measures.
        let level: &[(&str, &str)] = if reconnect > 0 {
            &[("RUST_LOG", "info")]
        } else {
            &[]
        };
        let server = lan.spawn_env(host, &["server", "--config", &config], host, level);
        wait_for(Duration::from_secs(10), || {
            lan.log(host).contains("server listening").then_some(())
        })
        .expect("server starts");
        if reconnect > 0 {
            idle_and_restart(&mut lan, server, &config, reconnect);
            return;
        }
        pids.push(lan.pid(server));
        quic.push(lan.host(host).addr(47700).parse::<SocketAddr>().unwrap());
        http_addrs.push(lan.host(host).addr(47780));
    }
    println!(
        "servers: {nodes} node(s), {}",
        if redis.is_some() {
            "sharing one redis-server (Unix socket, no persistence)"
        } else {
            "embedded store (redb, fsync per commit)"
        }
    );
    let server_id: handoff::identity::TerminalId = server_id.parse().unwrap();
    let rss_all = move || pids.iter().map(|pid| rss_kib(*pid)).sum::<u64>();

    let ours = lan.run_in("load", move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
            let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
            let rss_before = rss_all();
            let started = Instant::now();
            let conns = connect_terminals(&endpoint, &quic, server_id, terminals, arrivals.clone()).await;
            println!("{:<48} {} terminals in {:.1} s", "connected", conns.len(), started.elapsed().as_secs_f64());

            // 1:1 pushes through the HTTP API: `publishers` keep-alive connections, round robin.
            let ids: Vec<String> = conns.iter().map(|t| t.id.to_string()).collect();
            let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
            let started = Instant::now();
            let mut threads = Vec::new();
            for p in 0..publishers {
                let (ids, sent) = (ids.clone(), sent.clone());
                let http_addr = http_addrs[p % http_addrs.len()].clone();
                threads.push(tokio::task::spawn_blocking(move || {
                    let mut http = Http::connect(&http_addr);
                    let mut ok = 0;
                    for i in (p..pushes).step_by(publishers) {
                        let title = format!("p{i}");
                        sent.lock().unwrap().insert(title.clone(), Instant::now());
                        let to = &ids[i % ids.len()];
                        let status = http.request("POST", &format!("/v1/terminals/{to}/push"), &format!(r#"{{"uri":"u://{i}","title":"{title}"}}"#));
                        if status == 200 {
                            ok += 1;
                        }
                    }
                    ok
                }));
            }
            let mut ok = 0;
            for t in threads {
                ok += t.await.unwrap();
            }
            let publish_secs = started.elapsed().as_secs_f64();
            let deadline = Instant::now() + Duration::from_secs(60);
            while arrivals.lock().unwrap().keys().filter(|k| k.starts_with('p')).count() < ok && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let all_secs = started.elapsed().as_secs_f64();
            let mut latency: Vec<f64> = {
                let sent = sent.lock().unwrap();
                let arrivals = arrivals.lock().unwrap();
                sent.iter()
                    .filter_map(|(title, at)| arrivals.get(title).map(|a| (a[0] - *at).as_secs_f64() * 1000.0))
                    .collect()
            };
            println!(
                "{:<48} {ok} of {pushes} acknowledged in {publish_secs:.2} s = {:.0} pushes/s durable ({publishers} HTTP publishers); all delivered after {all_secs:.2} s",
                format!("1:1 pushes, {} terminals", conns.len()),
                ok as f64 / publish_secs
            );
            percentiles("  publish -> terminal received", &mut latency);
            let mut measured = mosquitto::Measured {
                rate: ok as f64 / publish_secs,
                p99_1to1_ms: p99(&mut latency),
                ..Default::default()
            };

            // Fan-out: `followers` terminals follow one first terminal A; A's session changes once.
            let extra_needed = followers.saturating_sub(conns.len());
            let mut all = conns;
            let started = Instant::now();
            all.extend(connect_terminals(&endpoint, &quic, server_id, extra_needed, arrivals.clone()).await);
            println!("{:<48} {} terminals in {:.1} s", "connected for fan-out", all.len(), started.elapsed().as_secs_f64());
            let rss_connected = rss_all();
            let a = Identity::generate().unwrap();
            let a_conn = endpoint
                .connect_with(tls::client_config(&a, server_id, LIMITS).unwrap(), quic[0], tls::SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            // Attached first: the server refuses tickets of terminals it has never seen.
            net::request(&a_conn, RequestBody::SetSession(None)).await.unwrap();
            let mut linking = Vec::new();
            for (n, t) in all.iter().take(followers).enumerate() {
                let mut nonce = [0u8; 16];
                nonce[..8].copy_from_slice(&(n as u64).to_be_bytes());
                let ticket = Ticket { first: a.id(), second: t.id, server: server_id, issued_at: unix_now(), not_after: unix_now() + 600, nonce }.sign(&a);
                let conn = t.conn.clone();
                let (first, second) = (a.id(), t.id);
                linking.push(tokio::spawn(async move {
                    net::request(&conn, RequestBody::Follow(InfoRequest { first, second, ticket })).await.unwrap()
                }));
                // Link in waves, so no request waits past its timeout behind thousands of others.
                if linking.len() >= 256 {
                    for l in linking.drain(..) {
                        assert!(matches!(l.await.unwrap(), ResponseBody::Linked { .. }));
                    }
                }
            }
            for l in linking {
                assert!(matches!(l.await.unwrap(), ResponseBody::Linked { .. }));
            }
            println!("{:<48} {followers} followers of one terminal", "linked");
            let session = Session { uri: "u://fanout".into(), title: "fanout".into(), position: None, meta: Default::default() };
            let changed = Instant::now();
            assert!(matches!(net::request(&a_conn, RequestBody::SetSession(Some(session))).await.unwrap(), ResponseBody::SessionStored));
            let stored = changed.elapsed();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let got = arrivals.lock().unwrap().get("fanout").map(|v| v.len()).unwrap_or(0);
                if got >= followers || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut fan: Vec<f64> = arrivals
                .lock()
                .unwrap()
                .get("fanout")
                .map(|v| v.iter().map(|t| (*t - changed).as_secs_f64() * 1000.0).collect())
                .unwrap_or_default();
            println!(
                "{:<48} {} of {followers} delivered; stored (one commit) after {:.1} ms",
                "fan-out of one session change",
                fan.len(),
                stored.as_secs_f64() * 1000.0
            );
            percentiles("  change -> follower received", &mut fan);
            measured.fanout_delivered = fan.len();
            measured.fanout_p99_ms = p99(&mut fan);
            let per_conn = (rss_connected.saturating_sub(rss_before)) as f64 / all.len().max(1) as f64;
            measured.kib_per_conn = per_conn;
            println!(
                "{:<48} RSS {} KiB before, {} KiB with {} connections = {:.1} KiB per connection",
                "server memory", rss_before, rss_connected, all.len(), per_conn
            );
            for t in &all {
                t.conn.close(0u32.into(), b"done");
            }
            // Closing 10,000 connections can take a while to drain; do not wait forever.
            let _ = tokio::time::timeout(Duration::from_secs(10), endpoint.wait_idle()).await;
            measured
        })
    });
    if !versus {
        println!("mosquitto: skipped (--no-mosquitto, or not installed: apt install mosquitto)");
        return;
    }
    // The handoff server is done; Mosquitto gets the machine to itself.
    for node in 0..nodes {
        lan.signal(node, libc::SIGTERM);
        let _ = lan.wait(node, Duration::from_secs(10));
    }
    let ip: std::net::IpAddr = lan.host("srv").ip.parse().unwrap();
    let pki = mosquitto::Pki::new(ip);
    let config = mosquitto::write_config(&lan.path("mosquitto"), &pki, &lan.host("srv").ip);
    let log = std::fs::File::create(lan.path("mosquitto.log")).unwrap();
    let mut broker = std::process::Command::new("ip")
        .args(["netns", "exec", &lan.host("srv").ns, "mosquitto", "-c"])
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start mosquitto");
    let broker_pid = broker.id();
    let tls = format!("{ip}:8883");
    wait_for(Duration::from_secs(10), || {
        lan.run_in("load", {
            let tls = tls.clone();
            move || std::net::TcpStream::connect(&tls).ok()
        })
        .map(|_| ())
    })
    .unwrap_or_else(|| {
        let log = std::fs::read_to_string(lan.path("mosquitto.log")).unwrap_or_default();
        panic!("mosquitto does not listen on {tls}:\n{log}")
    });
    let version = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!("{version}: TLS 1.3 subscribers with client certificates, QoS 1, persistent sessions; TCP publishers");
    let theirs = lan.run_in("load", move || {
        mosquitto::run(
            &pki, ip, broker_pid, terminals, followers, pushes, publishers,
        )
    });
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(broker_pid as i32, libc::SIGTERM) };
    let _ = broker.wait();
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "side by side", "handoff", "mosquitto", "ratio"
    );
    let row = |name: &str, ours: f64, theirs: f64, ratio: f64, unit: &str| {
        println!("{name:<34} {ours:>10.1}{unit:<2} {theirs:>10.1}{unit:<2} {ratio:>9.2}x");
    };
    row(
        "1:1 rate (higher is better)",
        ours.rate,
        theirs.rate,
        ours.rate / theirs.rate,
        "/s",
    );
    row(
        "1:1 p99 (lower is better)",
        ours.p99_1to1_ms,
        theirs.p99_1to1_ms,
        theirs.p99_1to1_ms / ours.p99_1to1_ms,
        "ms",
    );
    row(
        "fan-out p99 (lower is better)",
        ours.fanout_p99_ms,
        theirs.fanout_p99_ms,
        theirs.fanout_p99_ms / ours.fanout_p99_ms,
        "ms",
    );
    row(
        "KiB per idle connection (lower)",
        ours.kib_per_conn,
        theirs.kib_per_conn,
        theirs.kib_per_conn / ours.kib_per_conn,
        "Ki",
    );
    println!(
        "fan-out delivered: handoff {} of {followers}, mosquitto {} of {followers}; a ratio >= 1.00x means handoff is at or ahead",
        ours.fanout_delivered, theirs.fanout_delivered
    );
}

fn p99(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() as f64 - 1.0) * 0.99).round() as usize]
}
