//! Mutual TLS 1.3 with pinned Ed25519 keys (DESIGN §2, §4).
//!
//! Certificates are self-signed carriers of a key; no CA is involved. A client pins exactly the
//! key it expects and fails the handshake for any other. A server requires a client certificate,
//! checks that the client proves possession of its key (the TLS 1.3 CertificateVerify signature)
//! and records the key as the peer's ID ([`peer_id`]); whether that ID may do anything is the
//! application's decision, so it can answer with a clear refusal.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, TerminalId};
use crate::metrics::Metrics;
use crate::wire::ALPN;

/// The server name used in every handshake; verification ignores it (keys are pinned instead).
pub const SERVER_NAME: &str = "handoff";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE, AlgorithmIdentifier
/// {1.3.101.112}, BIT STRING of 33 bytes with no unused bits. The 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

/// Limits applied to QUIC connections.
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Concurrent bidirectional streams a peer may open towards us.
    pub max_bidi_streams: u32,
    /// Concurrent unidirectional streams a peer may open towards us.
    pub max_uni_streams: u32,
    pub idle_timeout: Duration,
    pub keep_alive: Option<Duration>,
}

impl TransportLimits {
    fn transport(&self) -> Arc<quinn::TransportConfig> {
        Arc::new(self.config())
    }

    /// quinn's transport configuration with these limits, to refine further.
    pub fn config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(self.max_bidi_streams.into());
        t.max_concurrent_uni_streams(self.max_uni_streams.into());
        // Idle timeouts fit in a VarInt for any sane value; fall back to quinn's default if not.
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.keep_alive_interval(self.keep_alive);
        t
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Extracts the Ed25519 key of a certificate, which is the holder's ID.
pub fn id_from_certificate(cert: &CertificateDer<'_>) -> Option<TerminalId> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let spki = spki.as_ref();
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX)?;
    let key: [u8; 32] = key.try_into().ok()?;
    // A small-order key proves nothing: anyone can sign for it.
    Some(TerminalId::from_bytes(key)).filter(|id| !id.is_small_order())
}

/// The verified ID of the peer on a connection.
pub fn peer_id(conn: &quinn::Connection) -> Option<TerminalId> {
    id_from_certificate(&peer_certificate(conn)?)
}

/// The name the peer on a connection gives itself in its certificate (see
/// [`Identity::named`]). The handshake proved that the peer holds the certificate's key, so the
/// name comes from the key holder; `None` if it carries no usable name.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    name_from_certificate(&peer_certificate(conn)?)
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.into_iter().next()
}

/// The name a certificate's subject gives as its `pseudonym` (see [`Identity::named`]), if it
/// is a usable friendly name: UTF-8, 1 to
/// [`MAX_NAME_LEN`](crate::wire::txt::MAX_NAME_LEN) bytes, no control characters (the rules of
/// the mDNS `name`), and not empty once bidi characters are stripped ([`crate::text::clean`]).
pub fn name_from_certificate(cert: &CertificateDer<'_>) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    // signature, issuer, validity, subject, ... }, ... } (RFC 5280 §4.1).
    let (_, cert, _) = der::expect(cert.as_ref(), der::SEQUENCE)?;
    let (_, mut tbs, _) = der::expect(cert, der::SEQUENCE)?;
    if tbs.first() == Some(&der::VERSION) {
        tbs = der::element(tbs)?.2;
    }
    for _ in 0..4 {
        // serial, signature, issuer, validity
        tbs = der::element(tbs)?.2;
    }
    let (_, mut subject, _) = der::expect(tbs, der::SEQUENCE)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value }
    while !subject.is_empty() {
        let (_, mut set, rest) = der::expect(subject, der::SET)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = der::expect(set, der::SEQUENCE)?;
            set = rest;
            let (_, oid, value) = der::expect(attribute, der::OID)?;
            if oid != der::PSEUDONYM {
                continue;
            }
            let (tag, text, _) = der::element(value)?;
            if tag != der::UTF8_STRING && tag != der::PRINTABLE_STRING {
                return None;
            }
            let name = std::str::from_utf8(text).ok()?;
            if name.len() > crate::wire::txt::MAX_NAME_LEN || name.chars().any(char::is_control) {
                return None;
            }
            // Every name shown for a peer, or naming it in a message, comes from here: bidi
            // controls (which reorder what a reader sees) go (DESIGN §7).
            let name = crate::text::clean(name.to_string());
            return (!name.is_empty()).then_some(name);
        }
    }
    None
}

/// Just enough DER to find a certificate's subject (definite lengths only, as DER requires).
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;
    pub const VERSION: u8 = 0xa0;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const PRINTABLE_STRING: u8 = 0x13;
    /// 2.5.4.65 (id-at-pseudonym), encoded.
    pub const PSEUDONYM: &[u8] = &[0x55, 0x04, 0x41];

    /// The first element of `input`: its tag, its contents and what follows it.
    pub fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    /// Like [`element`], failing unless the tag is `tag`.
    pub fn expect(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
        element(input).filter(|(t, _, _)| *t == tag)
    }
}

/// TLS 1.3 session tickets sealed with a key derived from the server's identity key, so a
/// terminal coming back after a server restart resumes its session (no certificate signature or
/// verification on either side) instead of doing a full handshake.
///
/// Tickets are sealed with ChaCha20-Poly1305 under a key per [`TICKET_PERIOD`], derived (HKDF)
/// from the identity key and the period's number; a ticket opens during its period and the next.
/// rustls resumes only with `psk_dhe_ke`, so a resumed connection still runs an ephemeral key
/// exchange: whoever learns the identity key later can open old tickets, but not the traffic of
/// the connections that resumed with them. A resumed session carries the client certificate the
/// first handshake verified, so [`peer_id`] works on it as on any other connection.
pub struct Tickets {
    secret: ring::hkdf::Prk,
    rng: ring::rand::SystemRandom,
    /// Counts `handoff_tls_resumptions_total`: tickets that opened.
    metrics: Arc<Metrics>,
}

/// How long one ticket key is used for new tickets; it opens tickets one period more.
pub const TICKET_PERIOD: Duration = Duration::from_secs(12 * 3600);
const TICKET_PERIOD_BYTES: usize = 8;
const TICKET_NONCE: usize = 12;

impl Tickets {
    pub fn new(identity: &Identity, metrics: Arc<Metrics>) -> Self {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"handoff tls tickets v1");
        let key = identity.private_key();
        Self {
            secret: salt.extract(key.secret_der()),
            rng: ring::rand::SystemRandom::new(),
            metrics,
        }
    }

    /// How many resumptions the server accepted since it started.
    pub fn resumed(&self) -> u64 {
        self.metrics.get("handoff_tls_resumptions_total", None)
    }

    fn key(&self, period: u64) -> Option<ring::aead::LessSafeKey> {
        let info = period.to_be_bytes();
        let info = [info.as_slice()];
        let okm = self
            .secret
            .expand(&info, &ring::aead::CHACHA20_POLY1305)
            .ok()?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).ok()?;
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &bytes).ok()?;
        Some(ring::aead::LessSafeKey::new(key))
    }

    fn period_now() -> u64 {
        crate::net::unix_now() / TICKET_PERIOD.as_secs()
    }

    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let key = self.key(period)?;
        let mut nonce = [0u8; TICKET_NONCE];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(TICKET_PERIOD_BYTES + TICKET_NONCE + plain.len() + 16);
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(period.to_be_bytes()),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn open(&self, now: u64, cipher: &[u8]) -> Option<Vec<u8>> {
        let (period, rest) = cipher.split_at_checked(TICKET_PERIOD_BYTES)?;
        let period = u64::from_be_bytes(period.try_into().ok()?);
        if period > now || now - period > 1 {
            return None;
        }
        let (nonce, sealed) = rest.split_at_checked(TICKET_NONCE)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key(period)?
            .open_in_place(
                nonce,
                ring::aead::Aad::from(period.to_be_bytes()),
                &mut sealed,
            )
            .ok()?;
        let plain = plain.to_vec();
        self.metrics.inc("handoff_tls_resumptions_total", None);
        Some(plain)
    }
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // A ticket sealed at the end of its period still opens for one more period.
        u32::try_from(TICKET_PERIOD.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(Self::period_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(Self::period_now(), cipher)
    }
}

/// The content server's endpoint configuration: a restarted server resets the connections of
/// its predecessor, so a terminal whose connection it no longer has is told so by its next
/// keep-alive and reconnects at once, instead of waiting for its idle timeout.
///
/// That takes the stateless reset key derived from the identity key ([`reset_key`]) and
/// connection IDs that every process accepts (quinn's default signs its IDs with a key of the
/// process and drops packets for IDs it did not sign, so a restarted server would ignore its
/// predecessor's). Resets may go out every 500 µs, not quinn's 20 ms, which would take 200 s
/// to tell 10,000 terminals: a reset is smaller than the packet that caused it, so it
/// amplifies nothing.
pub fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::new(reset_key(identity));
    config
        .cid_generator(|| Box::new(RandomCids))
        .min_reset_interval(Duration::from_micros(500));
    config
}

/// Random 8-byte connection IDs, valid to any process (see [`endpoint_config`]).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The key of the stateless resets the server sends for packets of connections it does not
/// know, derived from its identity key so that it survives a restart.
pub fn reset_key(identity: &Identity) -> Arc<dyn quinn::crypto::HmacKey> {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"handoff stateless reset v1");
    let key = identity.private_key();
    let prk = salt.extract(key.secret_der());
    let key: ring::hmac::Key = prk
        .expand(&[], ring::hmac::HMAC_SHA256)
        .map(Into::into)
        // Expanding 32 bytes from SHA-256 cannot exceed HKDF's limit of 255 blocks.
        .expect("hkdf expands one block");
    Arc::new(key)
}

/// A server endpoint configuration: our certificate, client certificates required.
pub fn server_config(
    identity: &Identity,
    limits: TransportLimits,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(identity, limits.transport(), None)
}

/// A server endpoint configuration like [`server_config`] that hands out session tickets
/// sealed by `tickets`, so returning clients resume (the content server).
pub fn server_config_with_tickets(
    identity: &Identity,
    transport: quinn::TransportConfig,
    tickets: Arc<Tickets>,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(identity, Arc::new(transport), Some(tickets))
}

fn server_config_with(
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
    tickets: Option<Arc<Tickets>>,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyKeyClientVerifier {
            provider: provider(),
        }))
        .with_single_cert(vec![identity.certificate()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    if let Some(tickets) = tickets {
        // Stateless: the ticket carries the session, so nothing per client is kept here, and
        // tickets outlive a restart. Two per handshake: a dial that gets no answer (the server
        // still down) uses one up, and the next can still resume.
        tls.ticketer = tickets;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 2;
    }
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// A client configuration that accepts only a server holding `expected`'s key.
pub fn client_config(
    identity: &Identity,
    expected: TerminalId,
    limits: TransportLimits,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
            expected,
            provider: provider(),
        }))
        .with_client_auth_cert(vec![identity.certificate()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(limits.transport());
    Ok(config)
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Client side: the server must hold exactly the pinned key.
#[derive(Debug)]
struct PinnedServerVerifier {
    expected: TerminalId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match id_from_certificate(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: any client holding an Ed25519 key may finish the handshake; the key is its ID.
#[derive(Debug)]
struct AnyKeyClientVerifier {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyKeyClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match id_from_certificate(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_id() {
        let identity = Identity::generate().unwrap();
        assert_eq!(
            id_from_certificate(&identity.certificate()),
            Some(identity.id())
        );
    }

    #[test]
    fn a_named_certificate_carries_id_and_name() {
        let identity = Identity::generate().unwrap();
        assert_eq!(name_from_certificate(&identity.certificate()), None);
        let named = identity.named("Living room TV ✓").unwrap();
        let cert = named.certificate();
        assert_eq!(id_from_certificate(&cert), Some(named.id()));
        assert_eq!(
            name_from_certificate(&cert).as_deref(),
            Some("Living room TV ✓")
        );
        let long = Identity::generate()
            .unwrap()
            .named(&"x".repeat(64))
            .unwrap();
        assert_eq!(name_from_certificate(&long.certificate()), None);
        let control = Identity::generate().unwrap().named("a\u{7}b").unwrap();
        assert_eq!(name_from_certificate(&control.certificate()), None);
    }

    /// A name the key holder chose may still carry bidi controls, which reorder what a reader
    /// sees ("invoice\u{202E}fdp.exe" shows as "invoiceexe.pdf"): they are stripped where the
    /// name is accepted, so `peers`, `trusted` and every message naming the peer show it clean.
    #[test]
    fn certificate_names_lose_their_bidi_characters() {
        let tricky = Identity::generate()
            .unwrap()
            .named("tv\u{202E}moor gnivil")
            .unwrap();
        assert_eq!(
            name_from_certificate(&tricky.certificate()).as_deref(),
            Some("tvmoor gnivil")
        );
        let only_bidi = Identity::generate()
            .unwrap()
            .named("\u{202E}\u{2066}")
            .unwrap();
        assert_eq!(name_from_certificate(&only_bidi.certificate()), None);
    }

    #[test]
    fn truncated_certificates_have_no_name() {
        let cert = Identity::generate()
            .unwrap()
            .named("tv")
            .unwrap()
            .certificate();
        for len in 0..cert.len() {
            let cut = CertificateDer::from(cert.as_ref()[..len].to_vec());
            assert_eq!(name_from_certificate(&cut), None, "cut at {len}");
        }
    }

    proptest::proptest! {
        /// Whatever a peer presents, reading a name never panics and yields a usable name or
        /// none: random bytes, and a real named certificate with one byte changed.
        #[test]
        fn certificate_names_are_usable_or_absent(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            at in 0usize..4096,
            byte in proptest::prelude::any::<u8>(),
        ) {
            let usable = |name: Option<String>| {
                name.is_none_or(|n| {
                    !n.is_empty() && n.len() <= 63 && !n.chars().any(crate::text::is_unsafe)
                })
            };
            proptest::prop_assert!(usable(name_from_certificate(&CertificateDer::from(garbage))));
            static CERT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let cert = CERT.get_or_init(|| {
                Identity::generate().unwrap().named("tv").unwrap().certificate().to_vec()
            });
            let mut changed = cert.clone();
            let i = at % changed.len();
            changed[i] = byte;
            proptest::prop_assert!(usable(name_from_certificate(&CertificateDer::from(changed))));
        }
    }

    #[test]
    fn garbage_certificate_has_no_id() {
        assert_eq!(
            id_from_certificate(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            None
        );
    }

    #[test]
    fn tickets_open_only_under_their_key_and_period() {
        let identity = Identity::generate().unwrap();
        let tickets = Tickets::new(&identity, Arc::default());
        let sealed = tickets.seal(100, b"session").unwrap();
        assert_eq!(tickets.open(100, &sealed).as_deref(), Some(&b"session"[..]));
        assert_eq!(tickets.open(101, &sealed).as_deref(), Some(&b"session"[..]));
        assert_eq!(tickets.open(102, &sealed), None, "two periods on");
        assert_eq!(tickets.open(99, &sealed), None, "from the future");
        // The same key after a restart; another key never.
        let restarted = Tickets::new(&identity, Arc::default());
        assert!(restarted.open(100, &sealed).is_some());
        let other = Tickets::new(&Identity::generate().unwrap(), Arc::default());
        assert_eq!(other.open(100, &sealed), None);
        // Any byte changed, or any length cut, fails to open.
        for i in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[i] ^= 1;
            assert_eq!(tickets.open(100, &changed), None, "byte {i} changed");
            assert_eq!(tickets.open(100, &sealed[..i]), None, "cut at {i}");
        }
        assert_eq!(tickets.resumed(), 2);
    }

    /// A client that connected once resumes its session on the next connection, also to a
    /// restarted server holding the same key, and the server still knows who it is.
    #[tokio::test]
    async fn clients_resume_across_a_server_restart() {
        let limits = TransportLimits {
            max_bidi_streams: 4,
            max_uni_streams: 0,
            idle_timeout: Duration::from_secs(10),
            keep_alive: None,
        };
        let server = Identity::generate().unwrap();
        let client = Identity::generate().unwrap();
        let config = client_config(&client, server.id(), limits).unwrap();
        let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // One connection: the server reads a byte and answers, so the client has its ticket
        // (sent right after the handshake) by the time the answer arrives.
        async fn once(
            listener: &quinn::Endpoint,
            dialer: &quinn::Endpoint,
            config: &quinn::ClientConfig,
        ) -> TerminalId {
            let addr = listener.local_addr().unwrap();
            let accept = async {
                let conn = listener.accept().await.unwrap().await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let got = recv.read_to_end(16).await.unwrap();
                send.write_all(&got).await.unwrap();
                send.finish().unwrap();
                let _ = conn.closed().await;
                peer_id(&conn).unwrap()
            };
            let dial = async {
                let conn = dialer
                    .connect_with(config.clone(), addr, SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap();
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                send.write_all(b"x").await.unwrap();
                send.finish().unwrap();
                assert_eq!(recv.read_to_end(16).await.unwrap(), b"x");
                conn.close(0u32.into(), b"done");
            };
            let (id, ()) = tokio::time::timeout(Duration::from_secs(20), async {
                tokio::join!(accept, dial)
            })
            .await
            .expect("connection within 20 s");
            id
        }
        let tickets = Arc::new(Tickets::new(&server, Arc::default()));
        let first = quinn::Endpoint::server(
            server_config_with_tickets(&server, limits.config(), tickets.clone()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(once(&first, &dialer, &config).await, client.id());
        assert_eq!(tickets.resumed(), 0, "the first handshake is a full one");
        assert_eq!(once(&first, &dialer, &config).await, client.id());
        assert_eq!(tickets.resumed(), 1, "the second connection resumed");
        first.close(0u32.into(), b"restart");
        let tickets = Arc::new(Tickets::new(&server, Arc::default()));
        let restarted = quinn::Endpoint::server(
            server_config_with_tickets(&server, limits.config(), tickets.clone()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(once(&restarted, &dialer, &config).await, client.id());
        assert_eq!(tickets.resumed(), 1, "resumed with the restarted server");
    }

    /// A restarted server holding the same key resets the connections it no longer knows, so
    /// their terminals notice at their next keep-alive rather than at their idle timeout.
    #[tokio::test]
    async fn a_restarted_server_resets_connections_it_lost() {
        let server = Identity::generate().unwrap();
        let client = Identity::generate().unwrap();
        let serve = TransportLimits {
            max_bidi_streams: 4,
            max_uni_streams: 0,
            idle_timeout: Duration::from_secs(60),
            keep_alive: None,
        };
        let dial = TransportLimits {
            keep_alive: Some(Duration::from_millis(200)),
            ..serve
        };
        let bind = |addr| {
            crate::net::bind_endpoint_with(
                endpoint_config(&server),
                server_config(&server, serve).unwrap(),
                addr,
                None,
            )
        };
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // The client talks to a relay in front of the server, so that the server can be
        // replaced behind one address; the first one then vanishes without a word, as a
        // crashed process would.
        let relay = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let target = std::sync::Arc::new(std::sync::Mutex::new(first.local_addr().unwrap()));
        let upstream =
            std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client_addr = std::sync::Arc::new(std::sync::Mutex::new(None));
        tokio::spawn({
            let (relay, target, upstream, client_addr) = (
                relay.clone(),
                target.clone(),
                upstream.clone(),
                client_addr.clone(),
            );
            async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = relay.recv_from(&mut buf).await {
                    *client_addr.lock().unwrap() = Some(from);
                    let to = *target.lock().unwrap();
                    let _ = upstream.send_to(&buf[..n], to).await;
                }
            }
        });
        tokio::spawn({
            let (relay, upstream, client_addr) =
                (relay.clone(), upstream.clone(), client_addr.clone());
            async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, _)) = upstream.recv_from(&mut buf).await {
                    let to = *client_addr.lock().unwrap();
                    if let Some(to) = to {
                        let _ = relay.send_to(&buf[..n], to).await;
                    }
                }
            }
        });
        let addr = relay.local_addr().unwrap();
        let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = client_config(&client, server.id(), dial).unwrap();
        let (conn, _accepted) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                async {
                    dialer
                        .connect_with(config, addr, SERVER_NAME)
                        .unwrap()
                        .await
                        .unwrap()
                },
                async { first.accept().await.unwrap().await.unwrap() }
            )
        })
        .await
        .expect("connected within 20 s");
        let restarted = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        *target.lock().unwrap() = restarted.local_addr().unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed())
            .await
            .expect("the connection ends long before its 60 s idle timeout");
        assert!(
            matches!(closed, quinn::ConnectionError::Reset),
            "{closed:?}"
        );
    }
}
