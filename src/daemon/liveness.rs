//! Checking peers by handshake (DESIGN §3, §7). What mDNS says is a claim; a QUIC handshake that
//! pins the claimed ID proves it, and carries the name the key holder gives itself.
//!
//! One task wakes when the peer table changes and every [`TICK`], asks the table which IDs are
//! due (new claims at once, trusted ones first; verified peers every [`LIVENESS_EVERY`]; claims
//! that failed, backing off) and checks them, [`IN_FLIGHT`] at a time, within a budget of
//! `[limits] peer_checks_per_round` per [`LIVENESS_EVERY`]. A check is a handshake (no request),
//! closed at once. A verified peer that fails its check must prove itself again, and mDNS is asked
//! whether it is still there (RFC 6762 §10.4), so a peer that crashed leaves the table within
//! about 20 s. Claims that never answered get no mDNS queries at all: everything the daemon
//! sends about peers is bounded by the check budget, however many adverts arrive.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::Instrument;

use super::{lock, Daemon};
use crate::discovery::Discovery;
use crate::identity::TerminalId;
use crate::limits::TokenBucket;
use crate::net::varint;
use crate::wire::ErrorCode;

/// How often a verified peer is checked again.
pub(super) const LIVENESS_EVERY: Duration = Duration::from_secs(10);
/// How often the task looks for due checks when nothing changes.
const TICK: Duration = Duration::from_secs(1);
/// Checks running at once.
const IN_FLIGHT: usize = 4;

impl Daemon {
    /// Records that `id`'s key answered a handshake (see [`crate::peer::PeerTable::prove`]);
    /// watchers of the peer table hear of it when that changes what `handoff peers` shows.
    pub(crate) fn note_proof(
        &self,
        id: &TerminalId,
        name: Option<String>,
        addr: Option<std::net::SocketAddr>,
    ) {
        let changed = {
            let mut peers = lock(&self.shared.peers);
            let before = peers.get(id).map(|p| (peers.is_verified(id), p.name));
            peers.prove(id, name, addr);
            let after = peers.get(id).map(|p| (peers.is_verified(id), p.name));
            before != after
        };
        if changed {
            self.shared.peer_changes.send_modify(|n| *n += 1);
        }
    }

    /// Records that a check or dial of `id` found no one holding its key.
    pub(crate) fn note_failure(&self, id: &TerminalId) {
        let changed = {
            let mut peers = lock(&self.shared.peers);
            let was = peers.is_verified(id);
            peers.suspect(id);
            was
        };
        if changed {
            self.shared.peer_changes.send_modify(|n| *n += 1);
        }
    }
}

/// Runs the checks until shutdown; `discovery` is asked about peers that stopped answering.
pub(super) async fn run(daemon: Daemon, discovery: Option<Arc<Discovery>>) {
    let per_round = daemon.shared.config.limits.peer_checks_per_round;
    let mut budget = TokenBucket::new(
        per_round as f64 / LIVENESS_EVERY.as_secs_f64(),
        per_round as f64,
    );
    let mut running: JoinSet<TerminalId> = JoinSet::new();
    let mut checking: HashSet<TerminalId> = HashSet::new();
    loop {
        tokio::select! {
            _ = daemon.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
            _ = daemon.peers_changed() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(id) = done {
                    checking.remove(&id);
                }
            }
        }
        while let Some(done) = running.try_join_next() {
            if let Ok(id) = done {
                checking.remove(&id);
            }
        }
        if running.len() >= IN_FLIGHT {
            continue;
        }
        let due = {
            let trust = &daemon.shared.trust;
            lock(&daemon.shared.peers).due_for_check(
                Instant::now(),
                LIVENESS_EVERY,
                IN_FLIGHT + checking.len(),
                |id| trust.is_trusted(id),
            )
        };
        for id in due {
            if running.len() >= IN_FLIGHT {
                break;
            }
            if checking.contains(&id) {
                continue;
            }
            if !budget.try_take(Instant::now()) {
                daemon.over_limit(
                    "peer_checks_per_round",
                    format_args!("peer checks wait for the next round"),
                );
                break;
            }
            checking.insert(id);
            let span = tracing::info_span!("check", id = %id.short());
            running.spawn(check(daemon.clone(), id, discovery.clone()).instrument(span));
        }
    }
}

/// Checks one ID: a handshake pinning it, closed at once.
async fn check(daemon: Daemon, id: TerminalId, discovery: Option<Arc<Discovery>>) -> TerminalId {
    let (peer, was_verified) = {
        let peers = lock(&daemon.shared.peers);
        (peers.get(&id), peers.is_verified(&id))
    };
    let Some(peer) = peer else {
        return id;
    };
    daemon.shared.metrics.inc("handoff_peer_checks_total", None);
    match daemon.dial(&peer).await {
        Ok(conn) => conn.close(varint(ErrorCode::Closed), b"checked"),
        Err(e) => {
            daemon.note_failure(&id);
            daemon
                .shared
                .metrics
                .inc("handoff_peer_checks_failed_total", None);
            if was_verified {
                daemon.log_limited(
                    "peer_check_failed",
                    format_args!("{} stopped answering: {e}", id.short()),
                );
                // A peer that answered before: ask mDNS whether it is still there.
                if let Some(discovery) = &discovery {
                    let instances = lock(&daemon.shared.peers).instances_of(&id);
                    for instance in instances {
                        discovery.verify(&instance);
                    }
                }
            }
        }
    }
    id
}
