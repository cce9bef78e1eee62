//! Helpers for in-process tests on the host's loopback (no mDNS: peers are introduced by hand).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff::config::{DaemonConfig, ServerConfig, ServerRef, StoreKind};
use handoff::daemon::{Daemon, DaemonOptions};
use handoff::identity::{Identity, TerminalId};
use handoff::peer::{Peer, PeerAddr};
use handoff::server::Server;
use handoff::tls::{self, TransportLimits};
use handoff::wire::Session;

pub const WAIT: Duration = Duration::from_secs(10);

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub async fn start_server(dir: &Path) -> Server {
    let config = ServerConfig::with_defaults(dir.join("server"), loopback(), StoreKind::Embedded);
    Server::start(
        Identity::load_or_create(&config.state_dir).unwrap(),
        &config,
    )
    .await
    .unwrap()
}

pub fn terminal(
    dir: &Path,
    name: &str,
    server: Option<&Server>,
    trusted: Vec<TerminalId>,
) -> DaemonConfig {
    let mut config =
        DaemonConfig::with_defaults(name, dir.join(name), dir.join(format!("{name}.sock")));
    config.listen = loopback();
    config.server = server.map(|s| ServerRef {
        id: s.id(),
        addrs: vec![s.local_addr().to_string()],
    });
    config.trusted_peers = trusted;
    config
}

pub async fn start(config: DaemonConfig) -> Daemon {
    Daemon::start(config, DaemonOptions { discovery: false })
        .await
        .unwrap()
}

/// Tells `who` that `peer` is at `addr`, claiming `id` (as an mDNS advert would).
pub fn introduce(who: &Daemon, name: &str, id: TerminalId, addr: SocketAddr) {
    who.learn_peer(Peer {
        id,
        name: name.into(),
        instance: format!("{name}._handoff._udp.local."),
        addrs: BTreeSet::from([PeerAddr {
            ip: addr.ip(),
            scope_id: 0,
        }]),
        port: addr.port(),
        last_seen: Instant::now(),
    });
}

pub fn session(title: &str) -> Session {
    Session {
        uri: format!("https://media.example/{title}"),
        title: title.into(),
        position: Some(3.0),
        meta: BTreeMap::new(),
    }
}

pub fn limits() -> TransportLimits {
    // Servers open the push stream as a bidirectional stream.
    TransportLimits {
        max_bidi_streams: 4,
        max_uni_streams: 0,
        idle_timeout: Duration::from_secs(10),
        keep_alive: None,
    }
}

/// A raw QUIC client holding `identity`, connected to `addr` pinned to `expected`.
pub async fn raw_connect(
    identity: &Identity,
    expected: TerminalId,
    addr: SocketAddr,
) -> quinn::Connection {
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let config = tls::client_config(identity, expected, limits()).unwrap();
    endpoint
        .connect_with(config, addr, tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Starts a server with the HTTP API on loopback, with a publish token; returns it and the token.
pub async fn start_server_with_http(dir: &Path, listen: SocketAddr) -> (Server, String) {
    let token = "test-token-0123456789".to_string();
    let token_file = dir.join("publish.token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut config = ServerConfig::with_defaults(dir.join("server"), listen, StoreKind::Embedded);
    config.http = Some(handoff::config::HttpConfig {
        listen: loopback(),
        token_file: Some(token_file),
    });
    let server = Server::start(
        Identity::load_or_create(&config.state_dir).unwrap(),
        &config,
    )
    .await
    .unwrap();
    (server, token)
}

/// A minimal HTTP/1.1 client: one request per connection. Returns the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading everything; ignore a reset while sending.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `daemon` is connected to its home server.
pub async fn wait_connected(daemon: &Daemon) {
    tokio::time::timeout(WAIT, async {
        while !daemon.status().await.server.is_some_and(|s| s.connected) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("connected to the server");
}

/// `second`, connected as `conn`, follows `first` at `server` with a fresh ten-minute ticket
/// `first` signed; returns the server's answer.
pub async fn follow_with_ticket(
    conn: &quinn::Connection,
    first: &Identity,
    second: TerminalId,
    server: &Server,
) -> handoff::wire::ResponseBody {
    let now = handoff::net::unix_now();
    let ticket = handoff::wire::Ticket {
        first: first.id(),
        second,
        server: server.id(),
        issued_at: now,
        not_after: now + 600,
        nonce: rand::random(),
    }
    .sign(first);
    let follow = handoff::wire::RequestBody::Follow(handoff::wire::InfoRequest {
        first: first.id(),
        second,
        ticket,
    });
    handoff::net::request(conn, follow).await.unwrap()
}
