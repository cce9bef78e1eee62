//! The peer-facing side of the endpoint: answers interface-info requests (patent S110) and
//! pairing steps.
//!
//! Any peer that completes the mutual-TLS handshake may ask; the trust policy decides whether it
//! gets interface info with a ticket or a refusal it can show its user. Limits (DESIGN §7) apply
//! before the handshake (per-source handshake rate, connections per source, connections in all)
//! and after it (handshakes from keys not on the trust list, requests per peer, streams per
//! connection, frame size).

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use super::Daemon;
use crate::identity::TerminalId;
use crate::net::{read_frame, refuse_stream, unix_now, varint, write_frame, READ_TIMEOUT};
use crate::tls::peer_id;
use crate::wire::{
    ErrorCode, InterfaceInfo, Refusal, RefusalReason, Request, RequestBody, Response, ResponseBody,
    Ticket,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(daemon: Daemon) {
    let limits = daemon.shared.config.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let incoming = tokio::select! {
            _ = daemon.cancelled() => return,
            incoming = daemon.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        // Canonical, so an IPv4 peer counts the same on a dual-stack socket (::ffff:a.b.c.d).
        let ip = incoming.remote_address().ip().to_canonical();
        if !daemon.shared.guards.handshakes_per_source.allow(&ip) {
            daemon.over_limit(
                "handshakes_per_sec_per_source",
                format_args!("handshakes from {ip}"),
            );
            incoming.refuse();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            daemon.over_limit("max_connections", format_args!("refusing {ip}"));
            incoming.refuse();
            continue;
        };
        let Some(source) = daemon.shared.guards.per_source.acquire(ip) else {
            daemon.over_limit("max_connections_per_source", format_args!("refusing {ip}"));
            incoming.refuse();
            continue;
        };
        let d = daemon.clone();
        daemon.spawn(
            async move {
                let _slots = (permit, source);
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        d.shared
                            .metrics
                            .inc("handoff_handshakes_failed_total", Some(("reason", "tls")));
                        return debug!("peer handshake failed: {e}");
                    }
                    Err(_) => {
                        d.shared.metrics.inc(
                            "handoff_handshakes_failed_total",
                            Some(("reason", "timeout")),
                        );
                        return debug!("peer handshake timed out");
                    }
                };
                d.shared.metrics.inc("handoff_connections_total", None);
                let Some(peer) = peer_id(&conn) else {
                    conn.close(varint(ErrorCode::Unexpected), b"no usable certificate");
                    return;
                };
                if !d.shared.trust.is_trusted(&peer)
                    && !d.shared.guards.unknown_handshakes.allow(&())
                {
                    d.over_limit(
                        "unknown_handshakes_per_sec",
                        format_args!("closing {}", peer.short()),
                    );
                    conn.close(
                        varint(ErrorCode::Busy),
                        b"too many handshakes from unknown keys",
                    );
                    return;
                }
                let span = tracing::info_span!("peer", id = %peer.short());
                serve_connection(d, conn, peer).instrument(span).await;
            },
            tracing::Span::none(),
        );
    }
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
                            debug!("peer sent a server request: {other:?}");
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
        warn!(peer = %peer, "refused interface info: peer is not trusted");
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
    let issued_at = unix_now().max(shared.trust.ticket_floor(&peer));
    let ticket = Ticket {
        first: daemon.id(),
        second: peer,
        server: home.server.id,
        issued_at,
        not_after: issued_at + shared.config.lease.as_secs(),
        nonce,
    }
    .sign(&shared.identity);
    info!(peer = %peer.short(), "gave interface info");
    shared.metrics.inc("handoff_interface_info_total", None);
    ResponseBody::InterfaceInfo(Box::new(InterfaceInfo {
        server: home.server.clone(),
        first: daemon.id(),
        session: daemon.session(),
        ticket,
    }))
}
