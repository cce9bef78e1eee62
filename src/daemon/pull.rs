//! `handoff pull`: steps 2–5 of the flow (DESIGN §5) from the second terminal's side.
//!
//! Dial the peer pinning the ID it advertised, fetch its interface info, check that the info and
//! ticket are about the peer and us, send the information request to the server the info names
//! (pinning that server's ID), and wait for the first push of the peer's session.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use super::server_link::{explain_connect_error, is_key_mismatch, LinkError, ServerLink};
use super::{lock, Daemon};
use crate::control::{PullTiming, PushRecord};
use crate::net::{self, unix_now, varint, RequestError};
use crate::peer::{FindError, Peer};
use crate::text;
use crate::tls::{peer_name, SERVER_NAME};
use crate::wire::{ErrorCode, InfoRequest, InterfaceInfo, Refusal, RequestBody, ResponseBody};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a dial waits for one address before also trying the next.
const DIAL_STAGGER: Duration = Duration::from_millis(250);
/// Addresses one dial tries at most: the one that answered last, then others in turn from
/// each claim (see [`crate::peer::PeerTable::dial_plan`]). With [`DIAL_STAGGER`], addresses
/// stuffed into adverts cost a dial at most 0.75 s, and nothing once the peer has answered.
const MAX_DIAL_ADDRS: usize = 4;
/// No attempt starts later than this into a dial, and none outlives it.
const DIAL_DEADLINE: Duration = Duration::from_secs(3);
/// IDs checked at once when a name is only claimed by unverified adverts.
const MAX_NAME_CHECKS: usize = 4;
/// Server addresses a peer's interface info may name (each is resolved and dialed in turn),
/// and the longest one.
const MAX_SERVER_ADDRS: usize = 8;
const MAX_SERVER_ADDR_LEN: usize = 255;

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
    /// Pulls what `query` (a peer's ID, unique ID prefix or unique proven name) is showing.
    pub async fn pull(&self, query: &str, timeout: Duration) -> Result<PullOutcome, PullError> {
        let started = Instant::now();
        let peer = self.find_peer(query).await?;
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

    /// Finds a peer by ID, unique ID prefix or unique proven name, like
    /// [`crate::peer::PeerTable::find`]; a name that only unverified adverts claim is settled
    /// first by handshakes with (a few of) the IDs claiming it: each key holder's certificate
    /// says what it is called.
    pub(crate) async fn find_peer(&self, query: &str) -> Result<Peer, FindError> {
        let found = super::lock(&self.shared.peers).find(query);
        let Err(FindError::Unverified(_)) = found else {
            return found;
        };
        let mut ids = super::lock(&self.shared.peers).unproven_named(query.trim());
        ids.sort_by_key(|id| !self.shared.trust.is_trusted(id));
        ids.truncate(MAX_NAME_CHECKS);
        let checks = ids.iter().map(|id| async move {
            let peer = super::lock(&self.shared.peers).get(id);
            if let Some(peer) = peer {
                if let Ok(conn) = self.dial_peer(&peer).await {
                    conn.close(varint(ErrorCode::Closed), b"checked");
                }
            }
        });
        futures_join_all(checks).await;
        super::lock(&self.shared.peers).find(query)
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
        } else if info.server.addrs.len() > MAX_SERVER_ADDRS
            || info.server.addrs.iter().any(|a| {
                a.len() > MAX_SERVER_ADDR_LEN
                    || a.chars().any(|c| c.is_whitespace() || text::is_unsafe(c))
            })
        {
            // Each is resolved and dialed in turn: a peer must not make us try thousands. And
            // each may be shown in an error: no control characters.
            Some(
                "it names more than 8 server addresses, or a server address longer than 255 \
                 bytes or with spaces or control characters",
            )
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

        let in_flight = self.link_for(&info.server);
        let link = Arc::clone(&in_flight);
        let linked = self.follow_on(&link, peer, &info).await;
        drop(in_flight);
        if linked.is_err() {
            // A server that refused (or answered nonsense) gets no connection kept open to
            // push on, unless another follow there still wants it.
            link.release_if_unwanted().await;
        }
        let (until, has_session) = linked?;
        info!(peer = %peer.id.short(), until, "following");
        self.shared.metrics.inc("handoff_links_total", None);
        Ok(LinkOutcome {
            until,
            has_session,
            interface_info_ms,
            linked_ms: ms(started.elapsed()),
        })
    }

    /// Asks `link`'s server to let this terminal follow `peer` with the ticket in `info`;
    /// returns the link's end and whether the peer shows something.
    async fn follow_on(
        &self,
        link: &Arc<ServerLink>,
        peer: &Peer,
        info: &InterfaceInfo,
    ) -> Result<(u64, bool), PullError> {
        let (me, ticket) = (self.id(), &info.ticket.ticket);
        // Before the request: the server may push the peer's session before it answers.
        let now = unix_now();
        self.shared.followed.record(
            info.server.id,
            peer.id,
            ticket
                .not_after
                .min(now.saturating_add(self.shared.config.lease.as_secs())),
            now,
        );
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
        Ok((until, has_session))
    }

    /// Dials a peer pinning its ID (see [`Daemon::dial`]). When no address answers, the peer
    /// must prove itself again, and mDNS is asked at once whether it is still there.
    pub(crate) async fn dial_peer(&self, peer: &Peer) -> Result<quinn::Connection, PullError> {
        let result = self.dial(peer).await;
        if result.is_err() {
            self.note_failure(&peer.id);
            // Perhaps it is gone without a goodbye: have mDNS check now rather than at the
            // next round.
            self.suspect(&peer.id).await;
        }
        result
    }

    /// Dials a peer pinning its ID, at the addresses of the table's dial plan (where it answered
    /// last first; at most [`MAX_DIAL_ADDRS`], within [`DIAL_DEADLINE`]). A handshake that
    /// completes proves the ID and the name in its certificate; an address whose endpoint holds
    /// another key is an impostor's claim: it is dropped from the table.
    pub(crate) async fn dial(&self, peer: &Peer) -> Result<quinn::Connection, PullError> {
        let unreachable = |reason: String| PullError::Unreachable {
            name: peer.name.clone(),
            reason,
        };
        let config = self
            .dial_config(peer.id)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut plan = super::lock(&self.shared.peers).dial_plan(&peer.id, MAX_DIAL_ADDRS);
        if plan.is_empty() {
            plan = peer.dial_addrs();
            plan.truncate(MAX_DIAL_ADDRS);
        }
        // Happy eyeballs (RFC 8305 in spirit): a peer may advertise addresses that do not
        // work from here (another network of a dual-homed peer, a stale address). Start with
        // the first, start the next every DIAL_STAGGER while none has answered, keep the first
        // connection that completes and drop the rest. All in this task: a spawned task per
        // attempt cost the warm pull a scheduling hop (measured: p99 10.7 -> 17 ms).
        let mut errors = Vec::new();
        let mut waiting = plan.into_iter();
        let mut live: Vec<(
            std::net::SocketAddr,
            tokio::time::Instant,
            quinn::Connecting,
        )> = Vec::new();
        let started = tokio::time::Instant::now();
        let deadline = started + DIAL_DEADLINE;
        let mut next_start = started;
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_start && now < deadline {
                if let Some(addr) = waiting.next() {
                    match self
                        .shared
                        .endpoint
                        .connect_with(config.clone(), addr, SERVER_NAME)
                    {
                        Ok(connecting) => {
                            live.push((addr, (now + CONNECT_TIMEOUT).min(deadline), connecting))
                        }
                        Err(e) => errors.push(format!("{addr}: {e}")),
                    }
                    next_start = now + DIAL_STAGGER;
                    continue;
                }
            }
            if live.is_empty() {
                if waiting.len() == 0 || now >= deadline {
                    break;
                }
                // Nothing in flight (the last start failed at once): start the next now.
                next_start = now;
                continue;
            }
            let wake_at = live
                .iter()
                .map(|(_, deadline, _)| *deadline)
                .chain((waiting.len() > 0 && next_start < deadline).then_some(next_start))
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
                        Ok(conn) => {
                            self.proven(peer.id, &conn, addr);
                            return Ok(conn);
                        }
                        Err(e) => {
                            if is_key_mismatch(&e) {
                                let dropped = super::lock(&self.shared.peers)
                                    .drop_claim(&peer.id, &addr);
                                self.shared.metrics.inc(
                                    "handoff_handshakes_failed_total",
                                    Some(("reason", "wrong_key")),
                                );
                                if let Some(suppressed) =
                                    self.shared.guards.log.check("wrong_key_claim")
                                {
                                    warn!(peer = %peer.id, %addr, ?dropped, suppressed, "an endpoint claiming this id holds another key; ignoring its claim");
                                }
                            }
                            errors.push(format!("{addr}: {}", explain_connect_error(&e)));
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = tokio::time::Instant::now();
                    live.retain(|(addr, until, _)| {
                        let alive = *until > now;
                        if !alive {
                            errors.push(format!("{addr}: no answer within {:?}", until.duration_since(started).min(CONNECT_TIMEOUT)));
                        }
                        alive
                    });
                }
            }
        }
        if errors.is_empty() {
            errors.push("it advertised no address".into());
        }
        Err(unreachable(errors.join("; ")))
    }

    /// Records what a completed dial proved: `id` answers at `addr` under the name its
    /// certificate carries; a trusted key's address is exempt from per-source limits.
    fn proven(
        &self,
        id: crate::identity::TerminalId,
        conn: &quinn::Connection,
        addr: std::net::SocketAddr,
    ) {
        self.note_proof(&id, peer_name(conn), Some(addr));
        if self.shared.trust.is_trusted(&id) {
            self.shared.guards.trusted_sources.insert(addr.ip());
        }
    }
}

/// Runs futures concurrently in this task and waits for all of them.
async fn futures_join_all<F: Future<Output = ()>>(futures: impl IntoIterator<Item = F>) {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}
