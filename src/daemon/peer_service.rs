//! The peer-facing side of the endpoint: answers interface-info requests (patent S110).
//!
//! Any peer that completes the mutual-TLS handshake may ask; the trust policy decides whether it
//! gets interface info with a ticket or a refusal it can show its user.

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

/// Peer connections held at once; more are refused before the handshake.
const MAX_PEER_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(daemon: Daemon) {
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            _ = daemon.cancelled() => return,
            incoming = daemon.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "refusing peer connection: at the limit");
            incoming.refuse();
            continue;
        };
        let d = daemon.clone();
        daemon.spawn(
            async move {
                let _permit = permit;
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => return debug!("peer handshake failed: {e}"),
                    Err(_) => return debug!("peer handshake timed out"),
                };
                let Some(peer) = peer_id(&conn) else {
                    conn.close(varint(ErrorCode::Unexpected), b"no usable certificate");
                    return;
                };
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
        // Streams are capped by the transport (PEER_LIMITS), so this spawns a bounded number.
        let d = daemon.clone();
        tokio::spawn(
            async move {
                let request: Request = match read_frame(&mut recv, READ_TIMEOUT).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        warn!("bad request from peer: {e}");
                        refuse_stream(&mut send, &mut recv, e.code());
                        return;
                    }
                };
                let body = match request.body {
                    RequestBody::InterfaceInfo => interface_info(&d, peer),
                    other => {
                        debug!("peer sent a server request: {other:?}");
                        ResponseBody::Refused(Refusal {
                            reason: RefusalReason::WrongEndpoint,
                            message: "a terminal only answers interface-info requests".into(),
                        })
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

/// Builds interface info for `peer`, or the refusal it gets.
fn interface_info(daemon: &Daemon, peer: TerminalId) -> ResponseBody {
    let shared = &daemon.shared;
    if !shared.trust.accepts(&peer) {
        warn!(peer = %peer, "refused interface info: peer is not trusted");
        return ResponseBody::Refused(Refusal {
            reason: RefusalReason::NotTrusted,
            message: format!(
                "{} does not trust this terminal; on it, run `handoff trust {peer}`",
                shared.config.name
            ),
        });
    }
    let Some(home) = &shared.home else {
        return ResponseBody::Refused(Refusal {
            reason: RefusalReason::NoServer,
            message: format!("{} is not attached to a content server", shared.config.name),
        });
    };
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    let ticket = Ticket {
        first: daemon.id(),
        second: peer,
        server: home.server.id,
        not_after: unix_now() + shared.config.lease.as_secs(),
        nonce,
    }
    .sign(&shared.identity);
    info!(peer = %peer.short(), "gave interface info");
    ResponseBody::InterfaceInfo(Box::new(InterfaceInfo {
        server: home.server.clone(),
        first: daemon.id(),
        session: daemon.session(),
        ticket,
    }))
}
