//! Pairing: two people run `handoff pair` on their terminals, compare a 6-digit code, confirm,
//! and each terminal adds the other to its trust list.
//!
//! A short-authentication-string protocol (docs/PROTOCOL.md has the full argument). The terminal
//! with the smaller ID is the initiator, the other the responder; either user may start first
//! (the responder invites the initiator, whose user then sees the request). One attempt:
//!
//! 1. initiator → responder: `Commit(H(I ‖ R ‖ n_I))`, with a fresh 128-bit nonce `n_I`;
//! 2. responder → initiator: `PairNonce(n_R)`, a fresh nonce made on receipt of that commitment;
//! 3. initiator → responder: `Reveal(n_I)`; the responder checks it against the commitment;
//! 4. both show `code(I, R, n_I, n_R)`; each user compares and confirms.
//!
//! Neither side can choose its nonce after learning the other's, so a man in the middle (who must
//! use keys of its own, as TLS pins keys) makes the two codes it faces match with probability
//! 10⁻⁶ per attempt. That holds only if a nonce is never used twice: every attempt makes new
//! nonces on both sides, and any deviation — an answer out of order, a second commitment, a
//! reveal that does not match — aborts the attempt with an error the user sees; the user must
//! start again. Attempts are capped per peer and per minute, and each costs a user's action.
//! A request the user did not start is answered with a refusal, remembered in a bounded list,
//! and never changes trust.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::RngCore;
use ring::digest::{digest, SHA256};
use tracing::{info, warn};

use super::peer_service::refusal;
use super::{lock, Daemon};
use crate::identity::TerminalId;
use crate::net::{self, varint};
use crate::peer::FindError;
use crate::trust::TrustError;
use crate::wire::{ErrorCode, PairStep, Refusal, RefusalReason, RequestBody, ResponseBody};

/// How long a pairing attempt (and then its code, awaiting confirmation) stays valid.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the initiator asks again while the responder's user has not started yet.
const RETRY: Duration = Duration::from_millis(300);
/// Attempts (nonce exchanges) with one peer within [`PER_PEER_WINDOW`].
pub const ATTEMPTS_PER_PEER: usize = 3;
const PER_PEER_WINDOW: Duration = Duration::from_secs(600);
/// Attempts with all peers within a minute.
pub const ATTEMPTS_PER_MINUTE: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Find(#[from] FindError),
    #[error(
        "{name} did not pair within {secs} s: run `handoff pair` on it too, naming this terminal"
    )]
    Timeout { name: String, secs: u64 },
    #[error("pairing refused by {name}: {refusal}")]
    Refused { name: String, refusal: Refusal },
    #[error("pairing with {name} aborted: {reason}; nothing was trusted (start again on both terminals if this was not an attack)")]
    Aborted { name: String, reason: String },
    #[error("too many pairing attempts with {name}; try again in {wait_secs} s")]
    TooManyAttempts { name: String, wait_secs: u64 },
    #[error("cannot pair with this terminal itself")]
    Myself,
    #[error(
        "no pairing with {0} is waiting for confirmation (it expired, or the code was never shown)"
    )]
    NotPending(String),
    #[error("the code does not match the one shown for {0}; pairing cancelled")]
    WrongCode(String),
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// A shown pairing code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairCode {
    pub peer: TerminalId,
    pub name: String,
    pub code: String,
}

/// Where one attempt stands on this side.
#[derive(Debug)]
enum Stage {
    /// The user started; no nonce has been exchanged.
    Waiting,
    /// Responder: gave `nonce` for `commitment`; the reveal is due.
    Committed {
        commitment: [u8; 32],
        nonce: [u8; 16],
    },
    /// Both nonces known: the code is shown, awaiting the user's confirmation.
    Code(String),
    /// The attempt deviated from the protocol; the user is told why.
    Aborted(String),
}

#[derive(Debug)]
struct Intent {
    expires: Instant,
    stage: Stage,
}

/// Pairing state: attempts this terminal's user started, unsolicited requests seen, and the
/// times of recent attempts (for the caps).
#[derive(Debug, Default)]
pub(crate) struct Pairings {
    intents: HashMap<TerminalId, Intent>,
    unsolicited: HashMap<TerminalId, Instant>,
    attempts: VecDeque<(Instant, TerminalId)>,
}

impl Pairings {
    /// Seconds until another attempt with `peer` is allowed, or `None` if one is allowed now.
    fn attempt_wait(&mut self, peer: &TerminalId, now: Instant) -> Option<u64> {
        while self
            .attempts
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= PER_PEER_WINDOW)
        {
            self.attempts.pop_front();
        }
        let with_peer: Vec<Instant> = self
            .attempts
            .iter()
            .filter(|(_, p)| p == peer)
            .map(|(at, _)| *at)
            .collect();
        let minute = Duration::from_secs(60);
        let recent: Vec<Instant> = self
            .attempts
            .iter()
            .filter(|(at, _)| now.duration_since(*at) < minute)
            .map(|(at, _)| *at)
            .collect();
        let mut wait = None;
        if with_peer.len() >= ATTEMPTS_PER_PEER {
            let oldest = with_peer[with_peer.len() - ATTEMPTS_PER_PEER];
            wait = Some(PER_PEER_WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        if recent.len() >= ATTEMPTS_PER_MINUTE {
            let oldest = recent[recent.len() - ATTEMPTS_PER_MINUTE];
            let w = minute.saturating_sub(now.duration_since(oldest));
            wait = Some(wait.map_or(w, |v: Duration| v.max(w)));
        }
        wait.map(|w| w.as_secs().max(1))
    }

    fn record_attempt(&mut self, peer: TerminalId, now: Instant) {
        self.attempts.push_back((now, peer));
    }
}

/// The commitment to the initiator's nonce, bound to both IDs (so it means nothing in another
/// pairing).
pub fn commitment(initiator: &TerminalId, responder: &TerminalId, nonce: &[u8; 16]) -> [u8; 32] {
    let mut input = b"handoff/2 pairing commitment\0".to_vec();
    input.extend_from_slice(initiator.as_bytes());
    input.extend_from_slice(responder.as_bytes());
    input.extend_from_slice(nonce);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &input).as_ref());
    out
}

/// The 6-digit code both sides show.
pub fn code(
    initiator: &TerminalId,
    responder: &TerminalId,
    n_i: &[u8; 16],
    n_r: &[u8; 16],
) -> String {
    let mut input = b"handoff/2 pairing code\0".to_vec();
    input.extend_from_slice(initiator.as_bytes());
    input.extend_from_slice(responder.as_bytes());
    input.extend_from_slice(n_i);
    input.extend_from_slice(n_r);
    let hash = digest(&SHA256, &input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    format!("{:06}", u64::from_be_bytes(first) % 1_000_000)
}

fn fresh_nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// What one initiator attempt came to.
enum Attempt {
    /// The responder's user has not started yet (nothing was revealed): ask again.
    NotYet,
    Code(String),
}

impl Daemon {
    /// Starts pairing with `query` and waits until both sides have derived the code.
    pub async fn pair(&self, query: &str) -> Result<PairCode, PairError> {
        let peer = self.find_peer(query).await?;
        let me = self.id();
        if peer.id == me {
            return Err(PairError::Myself);
        }
        let now = Instant::now();
        let deadline = now + PAIR_TIMEOUT;
        {
            let mut pairings = lock(&self.shared.pairings);
            if let Some(wait_secs) = pairings.attempt_wait(&peer.id, now) {
                return Err(PairError::TooManyAttempts {
                    name: peer.name.clone(),
                    wait_secs,
                });
            }
            pairings.unsolicited.remove(&peer.id);
            pairings.intents.insert(
                peer.id,
                Intent {
                    expires: deadline,
                    stage: Stage::Waiting,
                },
            );
        }
        info!(peer = %peer.id.short(), "pairing started");
        let result = if me < peer.id {
            self.pair_as_initiator(&peer, deadline).await
        } else {
            self.pair_as_responder(&peer, deadline).await
        };
        match result {
            Ok(code) => Ok(PairCode {
                peer: peer.id,
                name: peer.name,
                code,
            }),
            Err(e) => {
                lock(&self.shared.pairings).intents.remove(&peer.id);
                if let PairError::Aborted { .. } = e {
                    self.shared
                        .metrics
                        .inc("handoff_pairings_total", Some(("result", "aborted")));
                }
                Err(e)
            }
        }
    }

    /// Initiator: one attempt after another until the responder's user has started too; an
    /// attempt that got as far as a nonce exchange is the last, whatever its outcome.
    async fn pair_as_initiator(
        &self,
        peer: &crate::peer::Peer,
        deadline: Instant,
    ) -> Result<String, PairError> {
        loop {
            if Instant::now() >= deadline {
                return Err(PairError::Timeout {
                    name: peer.name.clone(),
                    secs: PAIR_TIMEOUT.as_secs(),
                });
            }
            match self.initiate(peer).await? {
                Attempt::NotYet => tokio::time::sleep(RETRY).await,
                Attempt::Code(code) => {
                    self.pair_completed(peer.id, &code);
                    return Ok(code);
                }
            }
        }
    }

    /// One attempt as initiator, with a nonce of its own.
    async fn initiate(&self, peer: &crate::peer::Peer) -> Result<Attempt, PairError> {
        let Ok(conn) = self.dial_peer(peer).await else {
            // Unreachable for now; nothing was sent.
            return Ok(Attempt::NotYet);
        };
        let me = self.id();
        let aborted = |reason: String| PairError::Aborted {
            name: peer.name.clone(),
            reason,
        };
        let my_nonce = fresh_nonce();
        let attempt = async {
            let commit = RequestBody::Pair(PairStep::Commit {
                commitment: commitment(&me, &peer.id, &my_nonce),
            });
            let their_nonce = match net::request(&conn, commit).await {
                Ok(ResponseBody::PairNonce { nonce }) => nonce,
                Ok(ResponseBody::Refused(r)) if r.reason == RefusalReason::NotPairing => {
                    return Ok(Attempt::NotYet)
                }
                Ok(ResponseBody::Refused(refusal)) => {
                    return Err(PairError::Refused {
                        name: peer.name.clone(),
                        refusal,
                    })
                }
                Ok(other) => {
                    return Err(aborted(format!(
                        "the peer answered the commitment out of protocol ({})",
                        response_kind(&other)
                    )))
                }
                // Nothing was revealed: the next attempt makes a new nonce anyway.
                Err(_) => return Ok(Attempt::NotYet),
            };
            lock(&self.shared.pairings).record_attempt(peer.id, Instant::now());
            // From here on the attempt ends, whatever happens: our nonce is about to be known.
            match net::request(
                &conn,
                RequestBody::Pair(PairStep::Reveal { nonce: my_nonce }),
            )
            .await
            {
                Ok(ResponseBody::Paired) => {
                    Ok(Attempt::Code(code(&me, &peer.id, &my_nonce, &their_nonce)))
                }
                Ok(ResponseBody::Refused(r)) => {
                    Err(aborted(format!("the peer refused the reveal ({r})")))
                }
                Ok(other) => Err(aborted(format!(
                    "the peer answered the reveal out of protocol ({})",
                    response_kind(&other)
                ))),
                Err(e) => Err(aborted(format!("no answer to the reveal ({e})"))),
            }
        }
        .await;
        conn.close(varint(ErrorCode::Closed), b"done");
        attempt
    }

    /// Responder: invite the initiator, then wait for its attempt to reach a code or abort.
    async fn pair_as_responder(
        &self,
        peer: &crate::peer::Peer,
        deadline: Instant,
    ) -> Result<String, PairError> {
        let daemon = self.clone();
        let invited = peer.clone();
        self.spawn(
            async move {
                if let Ok(conn) = daemon.dial_peer(&invited).await {
                    let _ = net::request(&conn, RequestBody::Pair(PairStep::Invite)).await;
                    conn.close(varint(ErrorCode::Closed), b"done");
                }
            },
            tracing::info_span!("pair-invite", peer = %peer.id.short()),
        );
        let mut changes = self.shared.pair_changes.subscribe();
        let wait = async {
            loop {
                match lock(&self.shared.pairings)
                    .intents
                    .get(&peer.id)
                    .map(|i| &i.stage)
                {
                    Some(Stage::Code(code)) => return Ok(code.clone()),
                    Some(Stage::Aborted(reason)) => {
                        return Err(PairError::Aborted {
                            name: peer.name.clone(),
                            reason: reason.clone(),
                        })
                    }
                    None => {
                        return Err(PairError::Aborted {
                            name: peer.name.clone(),
                            reason: "the attempt was replaced or expired".into(),
                        })
                    }
                    Some(_) => {}
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout_at(deadline.into(), wait)
            .await
            .unwrap_or_else(|_| {
                Err(PairError::Timeout {
                    name: peer.name.clone(),
                    secs: PAIR_TIMEOUT.as_secs(),
                })
            })
    }

    fn pair_completed(&self, peer: TerminalId, code: &str) {
        if let Some(intent) = lock(&self.shared.pairings).intents.get_mut(&peer) {
            intent.stage = Stage::Code(code.to_string());
            // The user now has PAIR_TIMEOUT to compare and confirm.
            intent.expires = Instant::now() + PAIR_TIMEOUT;
        }
        self.shared.pair_changes.send_modify(|n| *n += 1);
        info!(peer = %peer.short(), "pairing code ready; waiting for the user to confirm");
    }

    /// Confirms a shown code: the peer joins the trust list. Returns whether the list changed.
    pub fn confirm_pair(&self, peer: TerminalId, code: &str) -> Result<bool, PairError> {
        let name = peer.short();
        let shown = {
            let mut pairings = lock(&self.shared.pairings);
            let Some(intent) = pairings.intents.remove(&peer) else {
                return Err(PairError::NotPending(name));
            };
            match intent.stage {
                Stage::Code(shown) if intent.expires > Instant::now() => shown,
                _ => return Err(PairError::NotPending(name)),
            }
        };
        if shown != code.trim() {
            warn!(peer = %peer, "pairing code mismatch; pairing cancelled");
            self.shared
                .metrics
                .inc("handoff_pairings_total", Some(("result", "wrong_code")));
            return Err(PairError::WrongCode(name));
        }
        self.shared
            .metrics
            .inc("handoff_pairings_total", Some(("result", "paired")));
        Ok(self.trust(peer)?)
    }

    /// Peers that asked to pair without this terminal's user starting it (last 30 s).
    pub fn pair_requests(&self) -> Vec<TerminalId> {
        let now = Instant::now();
        let mut pairings = lock(&self.shared.pairings);
        pairings
            .unsolicited
            .retain(|_, at| now.duration_since(*at) < PAIR_TIMEOUT);
        pairings.unsolicited.keys().copied().collect()
    }

    /// Answers one pairing step from `peer` (see the module docs).
    pub(crate) fn answer_pair_step(&self, peer: TerminalId, step: PairStep) -> ResponseBody {
        let me = self.id();
        let now = Instant::now();
        let mut pairings = lock(&self.shared.pairings);
        pairings.intents.retain(|_, i| i.expires > now);
        let ours = pairings.intents.contains_key(&peer);
        if ours && step == PairStep::Invite {
            // Our user started too; our own attempt is under way.
            return ResponseBody::Refused(Refusal {
                reason: RefusalReason::NotPairing,
                message: "already pairing with you".into(),
            });
        }
        // Only the initiator (the smaller ID) commits and reveals.
        if !ours || peer > me || step == PairStep::Invite {
            return self.unsolicited_pair_step(pairings, peer, now);
        }
        let wait = pairings.attempt_wait(&peer, now);
        let Some(intent) = pairings.intents.get_mut(&peer) else {
            return self.unsolicited_pair_step(pairings, peer, now);
        };
        let deviation = match (step, &intent.stage) {
            (PairStep::Commit { commitment }, Stage::Waiting) => {
                if let Some(wait_secs) = wait {
                    format!("too many pairing attempts; try again in {wait_secs} s")
                } else {
                    // A fresh nonce for this attempt, made only now that the initiator is
                    // committed to its own.
                    let nonce = fresh_nonce();
                    intent.stage = Stage::Committed { commitment, nonce };
                    pairings.record_attempt(peer, now);
                    return ResponseBody::PairNonce { nonce };
                }
            }
            (
                PairStep::Reveal { nonce },
                Stage::Committed {
                    commitment: c,
                    nonce: mine,
                },
            ) => {
                if self::commitment(&peer, &me, &nonce) == *c {
                    let code = code(&peer, &me, &nonce, mine);
                    drop(pairings);
                    self.pair_completed(peer, &code);
                    return ResponseBody::Paired;
                }
                "the revealed nonce does not match its commitment".to_string()
            }
            (_, Stage::Aborted(reason)) => reason.clone(),
            (PairStep::Commit { .. }, _) => "a second commitment in one attempt".to_string(),
            (PairStep::Reveal { .. }, Stage::Waiting) => "a reveal before any commitment".into(),
            (_, _) => "a pairing step after the code was shown".to_string(),
        };
        if !matches!(intent.stage, Stage::Aborted(_)) {
            warn!(peer = %peer, "pairing aborted: {deviation}");
            intent.stage = Stage::Aborted(deviation.clone());
            drop(pairings);
            self.shared.pair_changes.send_modify(|n| *n += 1);
        }
        refusal(
            self,
            RefusalReason::BadPairing,
            format!("pairing aborted: {deviation}"),
        )
    }

    /// A pairing step our user did not ask for: remember it (bounded), tell the user once in a
    /// while, change nothing.
    fn unsolicited_pair_step(
        &self,
        mut pairings: std::sync::MutexGuard<'_, Pairings>,
        peer: TerminalId,
        now: Instant,
    ) -> ResponseBody {
        let limit = self.shared.config.limits.pending_pairings;
        pairings
            .unsolicited
            .retain(|_, at| now.duration_since(*at) < PAIR_TIMEOUT);
        let full = pairings.unsolicited.len() >= limit && !pairings.unsolicited.contains_key(&peer);
        if full {
            drop(pairings);
            self.over_limit(
                "pending_pairings",
                format_args!("ignoring a pairing request from {}", peer.short()),
            );
            return refusal(
                self,
                RefusalReason::Busy,
                "too many pending pairing requests".into(),
            );
        }
        pairings.unsolicited.insert(peer, now);
        drop(pairings);
        if let Some(suppressed) = self.shared.guards.log.check("pair_request") {
            info!(peer = %peer, suppressed, "a peer asks to pair; run `handoff pair {peer}` to accept");
        }
        refusal(
            self,
            RefusalReason::NotPairing,
            format!(
                "{} is not pairing with this terminal; run `handoff pair` on it within {} s",
                self.shared.config.name,
                PAIR_TIMEOUT.as_secs()
            ),
        )
    }
}

/// A response's kind, for error messages (never its contents, which come from the peer).
fn response_kind(body: &ResponseBody) -> &'static str {
    match body {
        ResponseBody::InterfaceInfo(_) => "interface info",
        ResponseBody::Refused(_) => "a refusal",
        ResponseBody::SessionStored => "session stored",
        ResponseBody::Linked { .. } => "linked",
        ResponseBody::PairNonce { .. } => "a nonce",
        ResponseBody::Paired => "paired",
        ResponseBody::Revoked { .. } => "revoked",
        ResponseBody::Welcome { .. } => "welcome",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_depends_on_every_input() {
        let a = TerminalId::from_bytes([1; 32]);
        let b = TerminalId::from_bytes([2; 32]);
        let base = code(&a, &b, &[3; 16], &[4; 16]);
        assert_eq!(base.len(), 6);
        assert!(base.chars().all(|c| c.is_ascii_digit()));
        assert_eq!(code(&a, &b, &[3; 16], &[4; 16]), base);
        assert_ne!(code(&b, &a, &[3; 16], &[4; 16]), base);
        assert_ne!(code(&a, &b, &[5; 16], &[4; 16]), base);
        assert_ne!(code(&a, &b, &[3; 16], &[5; 16]), base);
    }

    #[test]
    fn commitment_binds_the_nonce_and_both_ids() {
        let a = TerminalId::from_bytes([1; 32]);
        let b = TerminalId::from_bytes([2; 32]);
        let c = TerminalId::from_bytes([3; 32]);
        assert_eq!(commitment(&a, &b, &[1; 16]), commitment(&a, &b, &[1; 16]));
        assert_ne!(commitment(&a, &b, &[1; 16]), commitment(&a, &b, &[2; 16]));
        assert_ne!(commitment(&a, &b, &[1; 16]), commitment(&a, &c, &[1; 16]));
        assert_ne!(commitment(&a, &b, &[1; 16]), commitment(&b, &a, &[1; 16]));
    }

    #[test]
    fn attempts_are_capped_per_peer_and_per_minute() {
        let mut p = Pairings::default();
        let now = Instant::now();
        let a = TerminalId::from_bytes([1; 32]);
        for _ in 0..ATTEMPTS_PER_PEER {
            assert_eq!(p.attempt_wait(&a, now), None);
            p.record_attempt(a, now);
        }
        let wait = p.attempt_wait(&a, now).expect("capped per peer");
        assert!(wait > 60 && wait <= PER_PEER_WINDOW.as_secs(), "{wait}");
        assert_eq!(p.attempt_wait(&a, now + PER_PEER_WINDOW), None);
        let mut p = Pairings::default();
        for i in 0..ATTEMPTS_PER_MINUTE {
            p.record_attempt(TerminalId::from_bytes([i as u8 + 10; 32]), now);
        }
        assert!(p.attempt_wait(&a, now).is_some(), "capped per minute");
        assert_eq!(p.attempt_wait(&a, now + Duration::from_secs(61)), None);
    }
}
