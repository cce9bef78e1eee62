//! The peer-facing side of the endpoint: answers interface-info requests (patent S110) and
//! pairing steps.
//!
//! Any peer that completes the mutual-TLS handshake may ask; the trust policy decides whether it
//! gets interface info with a ticket or a refusal it can show its user. Limits (DESIGN §7) apply
//! before the handshake and after it, arranged so that strangers cannot take from trusted peers
//! what those need:
//! - before: when handshakes pile up (half of `max_pending_handshakes`), a source must prove its
//!   address with a QUIC Retry round trip before any handshake state exists; then per-source
//!   handshake rate and connection count (a source is an IPv4 address or an IPv6 /64), from which
//!   addresses where a trusted key proved itself recently are exempt; then the handshakes in
//!   progress, capped: when all are taken the oldest one from a source not known as trusted is
//!   dropped, and each has `handshake_timeout` to finish;
//! - after: a key not on the trust list spends its source's budget of unknown handshakes and may
//!   take a connection slot only while one is free; a trusted key takes a slot even when all are
//!   held, closing the oldest connection of an unknown key. Then requests per peer, streams per
//!   connection, frame size.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{lock, Daemon};
use crate::identity::TerminalId;
use crate::limits::{source_key, SourceGuard};
use crate::net::{read_frame, refuse_stream, varint, write_frame, READ_TIMEOUT};
use crate::tls::{peer_id, peer_name};
use crate::wire::{
    ErrorCode, InterfaceInfo, Refusal, RefusalReason, Request, RequestBody, Response, ResponseBody,
    Ticket,
};

/// Handshakes in progress and established connections (see the module docs).
struct Admission {
    state: Mutex<AdmissionState>,
    max_pending: usize,
    max_connections: usize,
}

#[derive(Default)]
struct AdmissionState {
    next: u64,
    /// Handshakes in progress, oldest first: whether the source is known as trusted, and the
    /// token that drops it.
    pending: BTreeMap<u64, (bool, CancellationToken)>,
    /// Established connections of trusted keys.
    trusted: usize,
    /// Established connections of other keys, oldest first.
    unknown: BTreeMap<u64, quinn::Connection>,
}

/// A handshake's place among those in progress; leaves when dropped.
struct PendingSlot {
    admission: Arc<Admission>,
    key: u64,
    dropped: CancellationToken,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        lock(&self.admission.state).pending.remove(&self.key);
    }
}

/// An established connection's slot; freed when dropped.
struct ConnectionSlot {
    admission: Arc<Admission>,
    /// `None` for a trusted key's slot.
    unknown: Option<u64>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut state = lock(&self.admission.state);
        match self.unknown {
            Some(key) => {
                state.unknown.remove(&key);
            }
            None => state.trusted = state.trusted.saturating_sub(1),
        }
    }
}

impl Admission {
    fn pending(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// A place for a new handshake; when all are taken, the oldest one from a source not known
    /// as trusted is dropped for it (the `bool` says so). `None`: every place is held by a
    /// known source.
    fn begin(self: &Arc<Self>, known: bool) -> Option<(PendingSlot, bool)> {
        let mut state = lock(&self.state);
        let mut evicted = false;
        if state.pending.len() >= self.max_pending {
            let oldest = state
                .pending
                .iter()
                .find(|(_, (known, _))| !known)
                .map(|(key, _)| *key)?;
            if let Some((_, token)) = state.pending.remove(&oldest) {
                token.cancel();
            }
            evicted = true;
        }
        let key = state.next;
        state.next += 1;
        let dropped = CancellationToken::new();
        state.pending.insert(key, (known, dropped.clone()));
        Some((
            PendingSlot {
                admission: self.clone(),
                key,
                dropped,
            },
            evicted,
        ))
    }

    /// A slot for a trusted key; if all are held, the oldest unknown key's connection is
    /// returned for closing. `None`: every slot is a trusted key's.
    fn connect_trusted(self: &Arc<Self>) -> Option<(ConnectionSlot, Option<quinn::Connection>)> {
        let mut state = lock(&self.state);
        let mut evicted = None;
        if state.trusted + state.unknown.len() >= self.max_connections {
            let oldest = *state.unknown.keys().next()?;
            evicted = state.unknown.remove(&oldest);
        }
        state.trusted += 1;
        let slot = ConnectionSlot {
            admission: self.clone(),
            unknown: None,
        };
        Some((slot, evicted))
    }

    /// A slot for a key not on the trust list, if one is free.
    fn connect_unknown(self: &Arc<Self>, conn: &quinn::Connection) -> Option<ConnectionSlot> {
        let mut state = lock(&self.state);
        if state.trusted + state.unknown.len() >= self.max_connections {
            return None;
        }
        let key = state.next;
        state.next += 1;
        state.unknown.insert(key, conn.clone());
        Some(ConnectionSlot {
            admission: self.clone(),
            unknown: Some(key),
        })
    }
}

pub(crate) async fn serve(daemon: Daemon) {
    let limits = daemon.shared.config.limits;
    let admission = Arc::new(Admission {
        state: Mutex::default(),
        max_pending: limits.max_pending_handshakes,
        max_connections: limits.max_connections,
    });
    let retry_above = limits.max_pending_handshakes / 2;
    loop {
        let incoming = tokio::select! {
            _ = daemon.cancelled() => return,
            incoming = daemon.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        let guards = &daemon.shared.guards;
        // Canonical, so an IPv4 peer counts the same on a dual-stack socket (::ffff:a.b.c.d).
        let ip = incoming.remote_address().ip().to_canonical();
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && admission.pending() >= retry_above
        {
            // Stateless: a source that cannot receive at its address never gets further.
            daemon
                .shared
                .metrics
                .inc("handoff_handshake_retries_total", None);
            let _ = incoming.retry();
            continue;
        }
        let source = source_key(ip);
        let known = guards.trusted_sources.contains(ip);
        if !known && !guards.handshakes_per_source.allow(&source) {
            daemon.over_limit(
                "handshakes_per_sec_per_source",
                format_args!("handshakes from {source}"),
            );
            incoming.refuse();
            continue;
        }
        let source_slot = if known {
            None
        } else {
            let Some(slot) = guards.per_source.acquire(source) else {
                daemon.over_limit(
                    "max_connections_per_source",
                    format_args!("refusing {source}"),
                );
                incoming.refuse();
                continue;
            };
            Some(slot)
        };
        let Some((pending, evicted)) = admission.begin(known) else {
            daemon.over_limit(
                "max_pending_handshakes",
                format_args!("refusing {ip}: every handshake in progress is a trusted source's"),
            );
            incoming.refuse();
            continue;
        };
        if evicted {
            daemon.over_limit(
                "max_pending_handshakes",
                format_args!("dropped the oldest handshake in progress for one from {ip}"),
            );
        }
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(e) => {
                daemon.log_limited(
                    "peer_handshake_failed",
                    format_args!("peer handshake failed: {e}"),
                );
                continue;
            }
        };
        let d = daemon.clone();
        let admission = admission.clone();
        daemon.spawn(
            async move {
                let timeout = d.shared.config.limits.handshake_timeout;
                let outcome = tokio::select! {
                    _ = pending.dropped.cancelled() => {
                        d.shared.metrics.inc(
                            "handoff_handshakes_failed_total",
                            Some(("reason", "dropped")),
                        );
                        return;
                    }
                    outcome = tokio::time::timeout(timeout, connecting) => outcome,
                };
                drop(pending);
                let conn = match outcome {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        d.shared
                            .metrics
                            .inc("handoff_handshakes_failed_total", Some(("reason", "tls")));
                        d.log_limited(
                            "peer_handshake_failed",
                            format_args!("peer handshake failed: {e}"),
                        );
                        return;
                    }
                    Err(_) => {
                        d.shared.metrics.inc(
                            "handoff_handshakes_failed_total",
                            Some(("reason", "timeout")),
                        );
                        d.over_limit(
                            "handshake_timeout_secs",
                            format_args!("dropped a peer handshake after {timeout:?}"),
                        );
                        return;
                    }
                };
                d.shared.metrics.inc("handoff_connections_total", None);
                let Some(peer) = peer_id(&conn) else {
                    conn.close(varint(ErrorCode::Unexpected), b"no usable certificate");
                    return;
                };
                // The key holder reached us: it is present, and its certificate names it.
                d.note_proof(&peer, peer_name(&conn), None);
                let Some(_slot) = admit(&d, &admission, &conn, peer, ip, source_slot) else {
                    return;
                };
                let span = tracing::info_span!("peer", id = %peer.short());
                serve_connection(d, conn, peer).instrument(span).await;
            },
            tracing::Span::none(),
        );
    }
}

/// Gives an established connection its slot, or closes it (see the module docs). A trusted
/// key's connection stops counting against its source.
fn admit(
    daemon: &Daemon,
    admission: &Arc<Admission>,
    conn: &quinn::Connection,
    peer: TerminalId,
    ip: IpAddr,
    source_slot: Option<SourceGuard>,
) -> Option<(ConnectionSlot, Option<SourceGuard>)> {
    let guards = &daemon.shared.guards;
    if daemon.shared.trust.is_trusted(&peer) {
        guards.trusted_sources.insert(ip);
        drop(source_slot);
        let Some((slot, evicted)) = admission.connect_trusted() else {
            daemon.over_limit(
                "max_connections",
                format_args!("closing {}: every slot is a trusted peer's", peer.short()),
            );
            conn.close(varint(ErrorCode::Busy), b"too many connections");
            return None;
        };
        if let Some(other) = evicted {
            daemon.over_limit(
                "max_connections",
                format_args!("closed an unknown key's connection for {}", peer.short()),
            );
            other.close(varint(ErrorCode::Busy), b"making room for a trusted peer");
        }
        return Some((slot, None));
    }
    if !guards.unknown_handshakes.allow(&source_key(ip)) {
        daemon.over_limit(
            "unknown_handshakes_per_sec",
            format_args!("closing {}", peer.short()),
        );
        conn.close(
            varint(ErrorCode::Busy),
            b"too many handshakes from unknown keys",
        );
        return None;
    }
    let Some(slot) = admission.connect_unknown(conn) else {
        daemon.over_limit("max_connections", format_args!("closing {}", peer.short()));
        conn.close(varint(ErrorCode::Busy), b"too many connections");
        return None;
    };
    Some((slot, source_slot))
}

async fn serve_connection(daemon: Daemon, conn: quinn::Connection, peer: TerminalId) {
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = daemon.cancelled() => {
                conn.close(varint(ErrorCode::Shutdown), b"shutting down");
                return;
            }
            stream = conn.accept_bi() => match stream {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        // Streams are capped by the transport (limits.max_streams_per_connection).
        let d = daemon.clone();
        tokio::spawn(
            async move {
                let max_frame = d.shared.config.limits.max_frame;
                let request: Request = match read_frame(&mut recv, READ_TIMEOUT, max_frame).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        d.shared
                            .metrics
                            .inc("handoff_bad_frames_total", Some(("code", e.code().name())));
                        if let Some(suppressed) = d.shared.guards.log.check("bad_frame") {
                            warn!(suppressed, "bad request from peer: {e}");
                        }
                        refuse_stream(&mut send, &mut recv, e.code());
                        return;
                    }
                };
                let body = if !d.shared.guards.requests_per_peer.allow(&peer) {
                    d.over_limit(
                        "requests_per_sec_per_peer",
                        format_args!("from {}", peer.short()),
                    );
                    refusal(
                        &d,
                        RefusalReason::Busy,
                        "too many requests; slow down".into(),
                    )
                } else {
                    match request.body {
                        RequestBody::InterfaceInfo => interface_info(&d, peer),
                        RequestBody::Pair(step) => d.answer_pair_step(peer, step),
                        other => {
                            if let Some(suppressed) = d.shared.guards.log.check("wrong_endpoint") {
                                debug!(suppressed, "peer sent a server request: {other:?}");
                            }
                            refusal(
                                &d,
                                RefusalReason::WrongEndpoint,
                                "a terminal only answers interface-info and pairing requests"
                                    .into(),
                            )
                        }
                    }
                };
                let response = Response {
                    id: request.id,
                    body,
                };
                if write_frame(&mut send, &response).await.is_ok() {
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            }
            .in_current_span(),
        );
    }
}

/// A refusal, counted by reason.
pub(crate) fn refusal(daemon: &Daemon, reason: RefusalReason, message: String) -> ResponseBody {
    let label = reason.to_string().replace(' ', "_");
    daemon
        .shared
        .metrics
        .inc("handoff_refusals_total", Some(("reason", &label)));
    ResponseBody::Refused(Refusal { reason, message })
}

/// Builds interface info for `peer`, or the refusal it gets.
fn interface_info(daemon: &Daemon, peer: TerminalId) -> ResponseBody {
    let shared = &daemon.shared;
    if !shared.trust.accepts(&peer) {
        if let Some(suppressed) = shared.guards.log.check("refused_interface_info") {
            warn!(peer = %peer, suppressed, "refused interface info: peer is not trusted");
        }
        return refusal(
            daemon,
            RefusalReason::NotTrusted,
            format!(
                "{} does not trust this terminal; on it, run `handoff trust {peer}`",
                shared.config.name
            ),
        );
    }
    let Some(home) = &shared.home else {
        return refusal(
            daemon,
            RefusalReason::NoServer,
            format!("{} is not attached to a content server", shared.config.name),
        );
    };
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    // Dated after any revocation of this peer, so the server never takes it for a ticket
    // issued before one.
    let issued_at = shared.trust.issue_time(&peer);
    let ticket = Ticket {
        first: daemon.id(),
        second: peer,
        server: home.server.id,
        issued_at,
        not_after: issued_at + shared.config.lease.as_secs(),
        nonce,
    }
    .sign(&shared.identity);
    // One line per interval at info (with the count held back), trusted peers' included: each
    // may ask at its request rate. Every one at debug.
    if let Some(suppressed) = shared.guards.log.check("gave_interface_info") {
        info!(peer = %peer.short(), suppressed, "gave interface info");
    } else {
        debug!(peer = %peer.short(), "gave interface info");
    }
    shared.metrics.inc("handoff_interface_info_total", None);
    ResponseBody::InterfaceInfo(Box::new(InterfaceInfo {
        server: home.server.clone(),
        first: daemon.id(),
        session: daemon.session(),
        ticket,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_pending: usize) -> Arc<Admission> {
        Arc::new(Admission {
            state: Mutex::default(),
            max_pending,
            max_connections: 4,
        })
    }

    #[test]
    fn a_full_set_of_handshakes_drops_the_oldest_strangers() {
        let a = admission(3);
        let (known, _) = a.begin(true).unwrap();
        let (first, _) = a.begin(false).unwrap();
        let (second, evicted) = a.begin(false).unwrap();
        assert!(!evicted && a.pending() == 3);
        // Full: the oldest stranger's handshake is dropped, not the known source's.
        let (_third, evicted) = a.begin(false).unwrap();
        assert!(evicted && first.dropped.is_cancelled() && !known.dropped.is_cancelled());
        assert_eq!(a.pending(), 3);
        drop(first);
        assert_eq!(a.pending(), 3, "an evicted slot was already freed");
        drop(second);
        assert_eq!(a.pending(), 2);
        // Only known sources hold places: a newcomer is refused.
        let b = admission(2);
        let _k1 = b.begin(true).unwrap();
        let _k2 = b.begin(true).unwrap();
        assert!(b.begin(false).is_none() && b.begin(true).is_none());
    }
}
