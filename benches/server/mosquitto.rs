//! The same load against Mosquitto 2 (Debian's package), for the side-by-side numbers of DESIGN
//! §9: subscribers over TLS 1.3 with client certificates (Ed25519, as handoff's keys), QoS 1,
//! persistent sessions (clean session off); publishers over plain TCP (handoff's publishers use
//! plain HTTP), each waiting for its PUBACK before the next publish (as a handoff publisher waits
//! for its 2xx). The MQTT 3.1.1 client is the few packets this needs, written here.
//!
//! Latency is measured as for handoff: the instant a publish is sent, recorded by its title, to
//! the instant a subscriber has read it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ED25519};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

/// What one run measured, for the comparison table.
#[derive(Debug, Default, Clone, Copy)]
pub struct Measured {
    pub rate: f64,
    pub p99_1to1_ms: f64,
    pub fanout_p99_ms: f64,
    pub fanout_delivered: usize,
    pub kib_per_conn: f64,
}

/// Certificates for the broker and its subscribers, signed by a CA of the bench's own.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    client: rustls::ClientConfig,
}

impl Pki {
    pub fn new(server_ip: std::net::IpAddr) -> Self {
        let ca_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL takes a certificate whose issuer is its own subject for
        // self-signed.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "handoff bench CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let server_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut server_params = CertificateParams::new(vec![server_ip.to_string()]).unwrap();
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mosquitto");
        let server = server_params.signed_by(&server_key, &issuer).unwrap();
        let client_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut client_params = CertificateParams::new(vec!["subscriber".to_string()]).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "subscriber");
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![client_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
            )
            .unwrap();
        Self {
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: openssl_pem(&server_key),
            client,
        }
    }
}

/// The key as PEM that OpenSSL 3.0 reads: ring writes Ed25519 keys as PKCS#8 v2 (with the public
/// key), which OpenSSL 3.0 refuses; the v1 form holds only the 32-byte seed.
fn openssl_pem(key: &KeyPair) -> String {
    let der = key.serialize_der();
    // v2: 30 51 02 01 01 30 05 06 03 2b 65 70 04 22 04 20 <seed> 81 21 00 <public key>
    assert!(
        der.len() == 83
            && der[5..16] == [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20],
        "an Ed25519 PKCS#8 v2 document"
    );
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v1.extend_from_slice(&der[16..48]);
    let b64 = data_encoding::BASE64.encode(&v1);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}

/// Writes the broker's config into `dir`: plain TCP for publishers on 1883, TLS 1.3 with
/// required client certificates on 8883, persistence on. Returns the config's path.
pub fn write_config(dir: &std::path::Path, pki: &Pki, ip: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in [
        ("ca.pem", &pki.ca_pem),
        ("server.pem", &pki.server_cert_pem),
        ("server.key", &pki.server_key_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let config = format!(
        "user root\n\
         per_listener_settings false\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {dir}/\n\
         max_queued_messages 100000\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         listener 1883 {ip}\n\
         listener 8883 {ip}\n\
         cafile {dir}/ca.pem\n\
         certfile {dir}/server.pem\n\
         keyfile {dir}/server.key\n\
         require_certificate true\n\
         tls_version tlsv1.3\n",
        dir = dir.display()
    );
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, config).unwrap();
    path
}

// MQTT 3.1.1 packet types.
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;

fn packet(kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind << 4 | flags];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&0u16.to_be_bytes()); // no keep-alive
    string(&mut body, client_id);
    packet(CONNECT, 0, &body)
}

fn subscribe_packet(id: u16, topic: &str) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    string(&mut body, topic);
    body.push(1); // QoS 1
    packet(SUBSCRIBE, 0b0010, &body)
}

fn publish_packet(id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    packet(PUBLISH, 0b0010, &body)
}

/// Reads one packet: its type, flags and body.
async fn read_packet<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u8, u8, Vec<u8>)> {
    let first = r.read_u8().await?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let byte = r.read_u8().await?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok((first >> 4, first & 0x0f, body))
}

type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;
type Writer = Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>;

/// A connected subscriber: the write half, shared with its reader task (which sends PUBACKs).
pub struct Subscriber {
    writer: Writer,
}

impl Subscriber {
    /// Subscribes to `topic` (QoS 1); the SUBACK is read by the reader task.
    async fn subscribe(&self, id: u16, topic: &str) {
        let mut w = self.writer.lock().await;
        w.write_all(&subscribe_packet(id, topic)).await.unwrap();
    }
}

async fn subscriber(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
    n: usize,
    topic: Option<String>,
    arrivals: Arrivals,
    subscribed: Arc<tokio::sync::Semaphore>,
) -> Subscriber {
    let mut attempt = 0;
    let stream = loop {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        match connector.connect(name, tcp).await {
            Ok(s) => break s,
            Err(e) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                let _ = e;
            }
            Err(e) => panic!("TLS to mosquitto: {e}"),
        }
    };
    let (mut reader, mut writer): (ReadHalf<_>, WriteHalf<_>) = tokio::io::split(stream);
    writer
        .write_all(&connect_packet(&format!("sub-{n}"), false))
        .await
        .unwrap();
    let (kind, _, body) = read_packet(&mut reader).await.unwrap();
    assert!(
        kind == CONNACK && body.get(1) == Some(&0),
        "CONNACK {body:?}"
    );
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
    let acks = writer.clone();
    tokio::spawn(async move {
        while let Ok((kind, flags, body)) = read_packet(&mut reader).await {
            match kind {
                PUBLISH => {
                    let at = Instant::now();
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let qos = (flags >> 1) & 3;
                    let mut rest = &body[2 + topic_len..];
                    if qos > 0 {
                        let id = [rest[0], rest[1]];
                        rest = &rest[2..];
                        let _ = acks.lock().await.write_all(&packet(PUBACK, 0, &id)).await;
                    }
                    let title = String::from_utf8_lossy(rest).into_owned();
                    arrivals.lock().unwrap().entry(title).or_default().push(at);
                }
                SUBACK => subscribed.add_permits(1),
                _ => {}
            }
        }
    });
    let sub = Subscriber { writer };
    if let Some(topic) = topic {
        sub.subscribe(1, &topic).await;
    }
    sub
}

/// Connects subscribers `range`, at most 64 handshakes at a time; with `one_to_one`, subscriber
/// `n` subscribes to `t/<n>`.
async fn connect_subscribers(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
    range: std::ops::Range<usize>,
    one_to_one: bool,
    arrivals: Arrivals,
    subscribed: Arc<tokio::sync::Semaphore>,
) -> Vec<Subscriber> {
    let mut subs = Vec::with_capacity(range.len());
    let mut pending = Vec::new();
    for n in range {
        pending.push(tokio::spawn(subscriber(
            connector.clone(),
            addr,
            n,
            one_to_one.then(|| format!("t/{n}")),
            arrivals.clone(),
            subscribed.clone(),
        )));
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                subs.push(p.await.unwrap());
            }
        }
    }
    for p in pending {
        subs.push(p.await.unwrap());
    }
    subs
}

/// A publisher on plain TCP that waits for each PUBACK.
struct Publisher {
    stream: TcpStream,
    next_id: u16,
}

impl Publisher {
    async fn connect(addr: SocketAddr, n: usize) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .write_all(&connect_packet(&format!("pub-{n}"), true))
            .await
            .unwrap();
        let (kind, _, _) = read_packet(&mut stream).await.unwrap();
        assert_eq!(kind, CONNACK);
        Self { stream, next_id: 1 }
    }

    /// Publishes with QoS 1 and waits for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if self
            .stream
            .write_all(&publish_packet(id, topic, payload))
            .await
            .is_err()
        {
            return false;
        }
        loop {
            match read_packet(&mut self.stream).await {
                Ok((PUBACK, _, body)) if body[..2] == id.to_be_bytes() => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Runs the 1:1, fan-out and memory measurements against a broker at `ip` (TLS on 8883, TCP on
/// 1883) whose process is `pid`. Call from a thread inside the load namespace.
pub fn run(
    pki: &Pki,
    ip: std::net::IpAddr,
    pid: u32,
    terminals: usize,
    followers: usize,
    pushes: usize,
    publishers: usize,
) -> Measured {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client.clone()));
    let (tls, tcp) = (SocketAddr::new(ip, 8883), SocketAddr::new(ip, 1883));
    rt.block_on(async move {
        let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let subscribed = Arc::new(tokio::sync::Semaphore::new(0));
        let rss_before = super::rss_kib(pid);
        let started = Instant::now();
        let mut subs = Vec::with_capacity(followers.max(terminals));
        let connect = |range: std::ops::Range<usize>, one_to_one: bool| {
            connect_subscribers(
                connector.clone(),
                tls,
                range,
                one_to_one,
                arrivals.clone(),
                subscribed.clone(),
            )
        };
        subs.extend(connect(0..terminals, true).await);
        let _ = subscribed.acquire_many(terminals as u32).await.unwrap();
        println!(
            "{:<48} {} TLS subscribers in {:.1} s",
            "mosquitto: connected",
            subs.len(),
            started.elapsed().as_secs_f64()
        );

        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let mut publisher = Publisher::connect(tcp, p).await;
                let mut ok = 0;
                for i in (p..pushes).step_by(publishers) {
                    let title = format!("p{i}");
                    sent.lock().unwrap().insert(title.clone(), Instant::now());
                    if publisher
                        .publish(&format!("t/{}", i % terminals), title.as_bytes())
                        .await
                    {
                        ok += 1;
                    }
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        let publish_secs = started.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(60);
        while arrivals
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with('p'))
            .count()
            < ok
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut latency: Vec<f64> = {
            let sent = sent.lock().unwrap();
            let arrivals = arrivals.lock().unwrap();
            sent.iter()
                .filter_map(|(title, at)| {
                    arrivals
                        .get(title)
                        .map(|a| (a[0] - *at).as_secs_f64() * 1000.0)
                })
                .collect()
        };
        let rate = ok as f64 / publish_secs;
        println!(
            "{:<48} {ok} of {pushes} acknowledged in {publish_secs:.2} s = {rate:.0} msgs/s ({publishers} TCP publishers, QoS 1)",
            format!("mosquitto: 1:1, {terminals} subscribers"),
        );
        super::percentiles("  publish -> subscriber received", &mut latency.clone());
        let p99_1to1_ms = super::p99(&mut latency);

        // Fan-out: every subscriber (the 1:1 ones and more, up to `followers`) subscribes to one
        // topic; one message goes out.
        let started = Instant::now();
        let more = connect(subs.len()..followers, false).await;
        subs.extend(more);
        for sub in subs.iter().take(followers) {
            sub.subscribe(2, "fan").await;
        }
        let _ = subscribed.acquire_many(followers as u32).await.unwrap();
        println!(
            "{:<48} {} subscribers in {:.1} s",
            "mosquitto: subscribed for fan-out",
            followers,
            started.elapsed().as_secs_f64()
        );
        let rss_connected = super::rss_kib(pid);
        let mut publisher = Publisher::connect(tcp, publishers).await;
        let changed = Instant::now();
        assert!(publisher.publish("fan", b"fanout").await);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = arrivals
                .lock()
                .unwrap()
                .get("fanout")
                .map(|v| v.len())
                .unwrap_or(0);
            if got >= followers || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut fan: Vec<f64> = arrivals
            .lock()
            .unwrap()
            .get("fanout")
            .map(|v| {
                v.iter()
                    .map(|t| (*t - changed).as_secs_f64() * 1000.0)
                    .collect()
            })
            .unwrap_or_default();
        let fanout_delivered = fan.len();
        println!(
            "{:<48} {fanout_delivered} of {followers} delivered",
            "mosquitto: fan-out of one message"
        );
        super::percentiles("  publish -> subscriber received", &mut fan.clone());
        let kib_per_conn =
            rss_connected.saturating_sub(rss_before) as f64 / subs.len().max(1) as f64;
        println!(
            "{:<48} RSS {rss_before} KiB before, {rss_connected} KiB with {} connections = {kib_per_conn:.1} KiB per connection",
            "mosquitto: memory",
            subs.len()
        );
        drop(subs);
        Measured {
            rate,
            p99_1to1_ms,
            fanout_p99_ms: super::p99(&mut fan),
            fanout_delivered,
            kib_per_conn,
        }
    })
}
