//! Pairing: two people run `handoff pair` on their terminals, compare a 6-digit code, confirm,
//! and each terminal adds the other to its trust list.
//!
//! The code comes from both public keys and a fresh nonce from each side, exchanged
//! commit-then-reveal: the terminal with the smaller ID (the initiator) first sends a hash of its
//! nonce, the responder answers with its nonce, then the initiator reveals. Neither side learns
//! the other's nonce before fixing its own, so a man in the middle (who must use its own key, as
//! TLS pins keys) cannot steer the two codes to match; they match by chance one time in a
//! million. A pairing attempt expires after 30 s; a request the user did not start is answered
//! with a refusal, remembered in a bounded list, and never changes trust.

use std::collections::HashMap;
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
const RETRY: Duration = Duration::from_millis(300);

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

#[derive(Debug)]
struct Intent {
    expires: Instant,
    my_nonce: [u8; 16],
    /// The initiator's commitment (responder side).
    commitment: Option<[u8; 32]>,
    /// Set once both nonces are known.
    code: Option<String>,
}

/// Pairing state: attempts this terminal's user started, and unsolicited requests seen.
#[derive(Debug, Default)]
pub(crate) struct Pairings {
    intents: HashMap<TerminalId, Intent>,
    unsolicited: HashMap<TerminalId, Instant>,
}

fn commitment(nonce: &[u8; 16]) -> [u8; 32] {
    let mut input = b"handoff/1 pairing commitment\0".to_vec();
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
    let mut input = b"handoff/1 pairing code\0".to_vec();
    input.extend_from_slice(initiator.as_bytes());
    input.extend_from_slice(responder.as_bytes());
    input.extend_from_slice(n_i);
    input.extend_from_slice(n_r);
    let hash = digest(&SHA256, &input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    format!("{:06}", u64::from_be_bytes(first) % 1_000_000)
}

impl Daemon {
    /// Starts pairing with `query` and waits until both sides have derived the code.
    pub async fn pair(&self, query: &str) -> Result<PairCode, PairError> {
        let peer = self.find_peer(query).await?;
        let me = self.id();
        let mut my_nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut my_nonce);
        let deadline = Instant::now() + PAIR_TIMEOUT;
        lock(&self.shared.pairings).intents.insert(
            peer.id,
            Intent {
                expires: deadline,
                my_nonce,
                commitment: None,
                code: None,
            },
        );
        info!(peer = %peer.id.short(), "pairing started");
        let timeout = || PairError::Timeout {
            name: peer.name.clone(),
            secs: PAIR_TIMEOUT.as_secs(),
        };
        let mut changes = self.shared.pair_changes.subscribe();
        if me < peer.id {
            // Initiator: commit, get the responder's nonce, reveal. Retry while the other user
            // has not started pairing yet.
            loop {
                if Instant::now() >= deadline {
                    return Err(timeout());
                }
                match self.initiate(&peer, my_nonce).await {
                    Ok(Some(their_nonce)) => {
                        let code = code(&me, &peer.id, &my_nonce, &their_nonce);
                        self.pair_completed(peer.id, &code);
                        return Ok(PairCode {
                            peer: peer.id,
                            name: peer.name,
                            code,
                        });
                    }
                    Ok(None) => tokio::time::sleep(RETRY).await,
                    Err(e @ PairError::Refused { .. }) => return Err(e),
                    Err(_) => tokio::time::sleep(RETRY).await,
                }
            }
        }
        // Responder: the initiator drives the exchange through `answer_pair_step`.
        let wait = async {
            loop {
                if let Some(code) = lock(&self.shared.pairings)
                    .intents
                    .get(&peer.id)
                    .and_then(|i| i.code.clone())
                {
                    return code;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(code) => Ok(PairCode {
                peer: peer.id,
                name: peer.name,
                code,
            }),
            Err(_) => Err(timeout()),
        }
    }

    /// One attempt as initiator: `Ok(None)` if the responder is not pairing (yet).
    async fn initiate(
        &self,
        peer: &crate::peer::Peer,
        my_nonce: [u8; 16],
    ) -> Result<Option<[u8; 16]>, PairError> {
        let refused = |refusal: Refusal| PairError::Refused {
            name: peer.name.clone(),
            refusal,
        };
        let conn = self
            .dial_peer(peer)
            .await
            .map_err(|_| PairError::NotPending(peer.name.clone()))?;
        let commit = RequestBody::Pair(PairStep::Commit {
            commitment: commitment(&my_nonce),
        });
        let answer = net::request(&conn, commit).await;
        let result = match answer {
            Ok(ResponseBody::PairNonce { nonce }) => {
                match net::request(
                    &conn,
                    RequestBody::Pair(PairStep::Reveal { nonce: my_nonce }),
                )
                .await
                {
                    Ok(ResponseBody::Paired) => Ok(Some(nonce)),
                    Ok(ResponseBody::Refused(r)) => Err(refused(r)),
                    _ => Err(PairError::NotPending(peer.name.clone())),
                }
            }
            Ok(ResponseBody::Refused(r)) if r.reason == RefusalReason::NotPairing => Ok(None),
            Ok(ResponseBody::Refused(r)) => Err(refused(r)),
            _ => Err(PairError::NotPending(peer.name.clone())),
        };
        conn.close(varint(ErrorCode::Closed), b"done");
        result
    }

    fn pair_completed(&self, peer: TerminalId, code: &str) {
        if let Some(intent) = lock(&self.shared.pairings).intents.get_mut(&peer) {
            intent.code = Some(code.to_string());
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
            match intent.code {
                Some(shown) if intent.expires > Instant::now() => shown,
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
        let intent = pairings.intents.get_mut(&peer).filter(|_| peer < me);
        match (step, intent) {
            (PairStep::Commit { commitment }, Some(intent)) if intent.code.is_none() => {
                // A fresh nonce per commitment: an initiator that retries must not get to
                // choose its nonce knowing ours.
                rand::rng().fill_bytes(&mut intent.my_nonce);
                intent.commitment = Some(commitment);
                ResponseBody::PairNonce {
                    nonce: intent.my_nonce,
                }
            }
            (PairStep::Reveal { nonce }, Some(intent)) if intent.code.is_none() => {
                if intent.commitment != Some(commitment(&nonce)) {
                    intent.commitment = None;
                    drop(pairings);
                    warn!(peer = %peer, "pairing reveal does not match its commitment");
                    return refusal(
                        self,
                        RefusalReason::BadPairing,
                        "the revealed nonce does not match the commitment".into(),
                    );
                }
                let code = code(&peer, &me, &nonce, &intent.my_nonce);
                drop(pairings);
                self.pair_completed(peer, &code);
                ResponseBody::Paired
            }
            _ => {
                // Unsolicited: remember it (bounded), tell the user once in a while, change nothing.
                let limit = self.shared.config.limits.pending_pairings;
                pairings
                    .unsolicited
                    .retain(|_, at| now.duration_since(*at) < PAIR_TIMEOUT);
                let full = pairings.unsolicited.len() >= limit
                    && !pairings.unsolicited.contains_key(&peer);
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
    fn commitment_binds_the_nonce() {
        assert_eq!(commitment(&[1; 16]), commitment(&[1; 16]));
        assert_ne!(commitment(&[1; 16]), commitment(&[2; 16]));
    }
}
