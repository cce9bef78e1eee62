//! `handoff pull`: steps 2–5 of the flow (DESIGN §5) from the second terminal's side.
//!
//! Dial the peer pinning the ID it advertised, fetch its interface info, check that the info and
//! ticket are about the peer and us, send the information request to the server the info names
//! (pinning that server's ID), and wait for the first push of the peer's session.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use super::server_link::{explain_connect_error, is_key_mismatch, LinkError};
use super::{lock, Daemon};
use crate::control::{PullTiming, PushRecord};
use crate::net::{self, unix_now, varint, RequestError};
use crate::peer::{FindError, Peer};
use crate::tls::SERVER_NAME;
use crate::wire::{ErrorCode, InfoRequest, Refusal, RequestBody, ResponseBody};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a dial waits for one address before also trying the next.
const DIAL_STAGGER: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Find(#[from] FindError),
    #[error("cannot reach {name}: {reason}")]
    Unreachable { name: String, reason: String },
    #[error("refused by {by}: {refusal}")]
    Refused { by: String, refusal: Refusal },
    #[error("{name} sent unusable interface info: {reason}")]
    BadInfo { name: String, reason: String },
    #[error("asking {name}: {source}")]
    Request { name: String, source: RequestError },
    #[error(transparent)]
    Server(#[from] LinkError),
    #[error("linked to {name}, but no push arrived within {timeout:?}")]
    NoPush { name: String, timeout: Duration },
    #[error("unexpected answer from {name}: {answer}")]
    Protocol { name: String, answer: String },
}

impl PullError {
    /// The refusal reason, when the pull was refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            PullError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}

/// What a pull achieved.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// The first push of the peer's session; `None` if the peer shows nothing now.
    pub push: Option<PushRecord>,
    /// Unix seconds until which this terminal follows the peer.
    pub linked_until: u64,
    pub timing: PullTiming,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What linking to a peer achieved (steps 2–5 without waiting for the push).
#[derive(Debug, Clone)]
pub struct LinkOutcome {
    /// Unix seconds until which this terminal follows the peer.
    pub until: u64,
    /// Whether the peer showed something when the link was made (then a push follows).
    pub has_session: bool,
    pub interface_info_ms: f64,
    pub linked_ms: f64,
}

impl Daemon {
    /// Pulls what `query` (a peer's ID, unique ID prefix or unique name) is showing.
    pub async fn pull(&self, query: &str, timeout: Duration) -> Result<PullOutcome, PullError> {
        let started = Instant::now();
        let peer = self
            .shared
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .find(query)?;
        // Subscribe before linking: the server may push before its answer arrives.
        let mut pushes = self.subscribe();
        let link = self.link_to(&peer).await?;
        let timing = |pushed: Option<f64>| PullTiming {
            interface_info_ms: link.interface_info_ms,
            linked_ms: link.linked_ms,
            pushed_ms: pushed,
        };
        if !link.has_session {
            return Ok(PullOutcome {
                push: None,
                linked_until: link.until,
                timing: timing(None),
            });
        }
        let from = peer.id.to_string();
        let wait = async {
            loop {
                match pushes.recv().await {
                    Ok(record) if record.from.as_deref() == Some(from.as_str()) => {
                        return Some(record)
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(record)) => {
                self.shared
                    .metrics
                    .observe("handoff_pull_seconds", started.elapsed());
                Ok(PullOutcome {
                    push: Some(record),
                    linked_until: link.until,
                    timing: timing(Some(ms(started.elapsed()))),
                })
            }
            _ => Err(PullError::NoPush {
                name: peer.name,
                timeout,
            }),
        }
    }

    /// Fetches `peer`'s interface info and asks the server it names to link us to it.
    pub(crate) async fn link_to(&self, peer: &Peer) -> Result<LinkOutcome, PullError> {
        let started = Instant::now();
        let name = peer.name.clone();
        let conn = self.dial_peer(peer).await?;
        let answer = net::request(&conn, RequestBody::InterfaceInfo).await;
        conn.close(varint(ErrorCode::Closed), b"done");
        let info = match answer {
            Ok(ResponseBody::InterfaceInfo(info)) => info,
            Ok(ResponseBody::Refused(refusal)) => {
                return Err(PullError::Refused { by: name, refusal });
            }
            Ok(other) => {
                return Err(PullError::Protocol {
                    name,
                    answer: format!("{other:?}"),
                });
            }
            Err(source) => return Err(PullError::Request { name, source }),
        };
        let ticket = &info.ticket.ticket;
        let me = self.id();
        let problem = if info.first != peer.id || ticket.first != peer.id {
            Some("it names another terminal as first")
        } else if ticket.second != me {
            Some("its ticket was made for another terminal")
        } else if ticket.server != info.server.id {
            Some("its ticket is for another server than the one it names")
        } else if info.server.addrs.is_empty() {
            Some("it names no server address")
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(PullError::BadInfo {
                name,
                reason: reason.into(),
            });
        }
        let interface_info_ms = ms(started.elapsed());
        info!(peer = %peer.id.short(), server = %info.server.id.short(), "got interface info");

        let link = self.link_for(&info.server);
        let request = RequestBody::Follow(InfoRequest {
            first: peer.id,
            second: me,
            ticket: info.ticket.clone(),
        });
        let (until, has_session) = match link.request(self, request).await? {
            // The server is trusted only as far as the ticket goes: whatever it answers, the
            // link ends with the ticket, and never later than this terminal's own lease.
            ResponseBody::Linked { until, has_session } => (
                until
                    .min(ticket.not_after)
                    .min(unix_now().saturating_add(self.shared.config.lease.as_secs())),
                has_session,
            ),
            ResponseBody::Refused(refusal) => {
                return Err(PullError::Refused {
                    by: format!("server {}", info.server.id.short()),
                    refusal,
                });
            }
            other => {
                return Err(PullError::Protocol {
                    name: "server".into(),
                    answer: format!("{other:?}"),
                });
            }
        };
        link.keep_until(self, until);
        lock(&self.shared.linked)
            .entry(peer.id)
            .and_modify(|u| *u = (*u).max(until))
            .or_insert(until);
        info!(peer = %peer.id.short(), until, "following");
        self.shared.metrics.inc("handoff_links_total", None);
        Ok(LinkOutcome {
            until,
            has_session,
            interface_info_ms,
            linked_ms: ms(started.elapsed()),
        })
    }

    /// Dials a peer at each advertised address in turn, pinning its advertised ID. An address
    /// whose endpoint holds another key is an impostor's claim: it is dropped from the table.
    pub(crate) async fn dial_peer(&self, peer: &Peer) -> Result<quinn::Connection, PullError> {
        let unreachable = |reason: String| PullError::Unreachable {
            name: peer.name.clone(),
            reason,
        };
        let config = self
            .dial_config(peer.id)
            .map_err(|e| unreachable(e.to_string()))?;
        // Happy eyeballs (RFC 8305 in spirit): a peer may advertise addresses that do not
        // work from here (another network of a dual-homed peer, a stale address). Start with
        // the first, start the next every DIAL_STAGGER while none has answered, keep the first
        // connection that completes and drop the rest. All in this task: a spawned task per
        // attempt cost the warm pull a scheduling hop (measured: p99 10.7 -> 17 ms).
        let mut errors = Vec::new();
        let mut waiting = peer.dial_addrs().into_iter();
        let mut live: Vec<(
            std::net::SocketAddr,
            tokio::time::Instant,
            quinn::Connecting,
        )> = Vec::new();
        let mut next_start = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_start {
                if let Some(addr) = waiting.next() {
                    match self
                        .shared
                        .endpoint
                        .connect_with(config.clone(), addr, SERVER_NAME)
                    {
                        Ok(connecting) => live.push((addr, now + CONNECT_TIMEOUT, connecting)),
                        Err(e) => errors.push(format!("{addr}: {e}")),
                    }
                    next_start = now + DIAL_STAGGER;
                    continue;
                }
            }
            if live.is_empty() {
                if waiting.len() == 0 {
                    break;
                }
                // Nothing in flight (the last start failed at once): start the next now.
                next_start = now;
                continue;
            }
            let wake_at = live
                .iter()
                .map(|(_, deadline, _)| *deadline)
                .chain((waiting.len() > 0).then_some(next_start))
                .min()
                .unwrap_or(next_start);
            let finished = std::future::poll_fn(|cx| {
                for (i, (_, _, connecting)) in live.iter_mut().enumerate() {
                    if let std::task::Poll::Ready(result) = std::pin::Pin::new(connecting).poll(cx)
                    {
                        return std::task::Poll::Ready((i, result));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                (i, result) = finished => {
                    let (addr, _, _) = live.swap_remove(i);
                    match result {
                        Ok(conn) => return Ok(conn),
                        Err(e) => {
                            if is_key_mismatch(&e) {
                                let dropped = self
                                    .shared
                                    .peers
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .drop_claim(&peer.id, &addr);
                                self.shared.metrics.inc(
                                    "handoff_handshakes_failed_total",
                                    Some(("reason", "wrong_key")),
                                );
                                warn!(peer = %peer.id, %addr, ?dropped, "an endpoint claiming this id holds another key; ignoring its claim");
                            }
                            errors.push(format!("{addr}: {}", explain_connect_error(&e)));
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = tokio::time::Instant::now();
                    live.retain(|(addr, deadline, _)| {
                        let alive = *deadline > now;
                        if !alive {
                            errors.push(format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"));
                        }
                        alive
                    });
                }
            }
        }
        if errors.is_empty() {
            errors.push("it advertised no address".into());
        }
        // Perhaps it is gone without a goodbye: have mDNS check now rather than at the next round.
        self.suspect(&peer.id).await;
        Err(unreachable(errors.join("; ")))
    }
}
