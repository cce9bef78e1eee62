//! Auto-follow: `[follow] peers` (or `auto = true` for every trusted peer). While such a peer is
//! on the LAN this terminal links to it by itself and renews the link before the lease ends; when
//! the peer leaves, renewals stop and the link lapses at the end of its lease.

use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::{lock, Daemon};
use crate::identity::TerminalId;
use crate::net::unix_now;

/// How often the follow set is re-examined even without peer-table changes.
const TICK: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One followed peer.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FollowState {
    /// Unix seconds the current link lasts until (0 before the first link).
    pub until: u64,
    /// Unix seconds the current link was made.
    pub linked_at: u64,
    #[serde(skip)]
    pub next_attempt: Instant,
    pub failures: u32,
}

impl Daemon {
    /// Whether `id` is to be followed automatically.
    pub(crate) fn wants_to_follow(&self, id: &TerminalId) -> bool {
        let live = lock(&self.shared.live);
        live.follow_peers.contains(id) || (live.follow_auto && self.shared.trust.is_trusted(id))
    }

    /// Peers this terminal follows now (by a pull or automatically), with the Unix time their
    /// link lasts until.
    pub fn follows(&self) -> Vec<(TerminalId, u64)> {
        let now = unix_now();
        let mut linked = lock(&self.shared.linked);
        linked.retain(|_, until| *until > now);
        let mut out: Vec<(TerminalId, u64)> = linked.iter().map(|(id, u)| (*id, *u)).collect();
        out.sort();
        out
    }
}

/// Whether a link made at `linked_at` lasting until `until` is due for renewal: past 80% of its
/// lease.
fn due(state: &FollowState, now: u64) -> bool {
    let lease = state.until.saturating_sub(state.linked_at);
    now >= state.linked_at + lease * 4 / 5
}

pub(crate) async fn run(daemon: Daemon) {
    loop {
        tokio::select! {
            _ = daemon.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
            _ = daemon.peers_changed() => {}
        }
        let present: Vec<_> = lock(&daemon.shared.peers)
            .list()
            .into_iter()
            .filter(|p| daemon.wants_to_follow(&p.id))
            .collect();
        for peer in present {
            let now = unix_now();
            let ready = match lock(&daemon.shared.follows).get(&peer.id) {
                None => true,
                Some(s) => due(s, now) && Instant::now() >= s.next_attempt,
            };
            if !ready {
                continue;
            }
            let outcome = tokio::select! {
                _ = daemon.cancelled() => return,
                outcome = daemon.link_to(&peer) => outcome,
            };
            let mut follows = lock(&daemon.shared.follows);
            let entry = follows.entry(peer.id).or_insert(FollowState {
                until: 0,
                linked_at: 0,
                next_attempt: Instant::now(),
                failures: 0,
            });
            match outcome {
                Ok(link) => {
                    info!(peer = %peer.id.short(), until = link.until, "auto-follow linked");
                    entry.until = link.until;
                    entry.linked_at = now;
                    entry.failures = 0;
                }
                Err(e) => {
                    entry.failures += 1;
                    let backoff =
                        (TICK * 2u32.saturating_pow(entry.failures.min(6))).min(MAX_BACKOFF);
                    entry.next_attempt = Instant::now() + backoff;
                    warn!(peer = %peer.id.short(), "auto-follow failed (retrying in {backoff:?}): {e}");
                }
            }
        }
        // Forget lapsed links of peers that left, and failed attempts at peers no longer wanted.
        let now = unix_now();
        let mut follows = lock(&daemon.shared.follows);
        follows.retain(|id, s| {
            s.until > now || (s.failures > 0 && s.until == 0 && daemon.wants_to_follow(id))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_four_fifths_of_the_lease() {
        let s = FollowState {
            until: 1600,
            linked_at: 1000,
            next_attempt: Instant::now(),
            failures: 0,
        };
        assert!(!due(&s, 1000));
        assert!(!due(&s, 1479));
        assert!(due(&s, 1480));
    }
}
