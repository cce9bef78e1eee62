//! The links this terminal made (pulls and auto-follows): at which content server it follows
//! which peer, and until when. A push that names a peer as its source (`from`) is delivered only
//! if this terminal follows that peer at the server that sent it, so a server cannot attribute
//! content to a peer it does not carry for us, nor keep pushing a peer's session once the link
//! (and the ticket it came from) is over. Publishers' pushes name no peer and are not concerned.
//!
//! A link is recorded before its `Follow` request goes out (the server may push the peer's
//! session before its answer arrives), for as long as the ticket and this terminal's lease allow;
//! pushes are accepted until [`GRACE`] after that, for clocks that differ. The record is kept in
//! `state_dir/links.json`, so pushes for a live link still arrive after a restart. A renewal
//! that moves a link's end by less than half of [`GRACE`] is not written again (pulling the
//! same peer again costs no fsync): after a restart such a link is accepted until at least half
//! of [`GRACE`] past its latest end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::identity::{ServerId, TerminalId};

pub const LINKS_FILE: &str = "links.json";

/// How long after a link's end its pushes are still accepted: the clock skew tickets allow.
pub const GRACE: u64 = crate::wire::ticket::MAX_CLOCK_SKEW;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    server: String,
    peer: String,
    until: u64,
}

/// A link's end, and the end `links.json` holds for it (0: not written yet).
#[derive(Debug, Clone, Copy)]
struct End {
    until: u64,
    saved: u64,
}

#[derive(Debug)]
pub struct Links {
    path: PathBuf,
    map: Mutex<BTreeMap<(ServerId, TerminalId), End>>,
}

impl Links {
    /// Reads `state_dir/links.json`. A file that cannot be read is reported and ignored: the
    /// links it held come back at their next renewal or pull.
    pub fn open(state_dir: &Path) -> Self {
        let path = state_dir.join(LINKS_FILE);
        let mut map = BTreeMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<Vec<Record>>(&text) {
                Ok(records) => {
                    for r in records {
                        if let (Ok(server), Ok(peer)) = (r.server.parse(), r.peer.parse()) {
                            map.insert(
                                (server, peer),
                                End {
                                    until: r.until,
                                    saved: r.until,
                                },
                            );
                        }
                    }
                }
                Err(e) => warn!("{}: {e}; starting without recorded links", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("{}: {e}; starting without recorded links", path.display()),
        }
        Self {
            path,
            map: Mutex::new(map),
        }
    }

    /// Records that this terminal follows `peer` at `server` until `until` (the later of this
    /// and what was recorded), drops links over for longer than [`GRACE`], and saves.
    pub fn record(&self, server: ServerId, peer: TerminalId, until: u64, now: u64) {
        let records: Vec<Record> = {
            let mut map = self.lock();
            let entry = map.entry((server, peer)).or_insert(End { until, saved: 0 });
            entry.until = entry.until.max(until);
            if entry.saved != 0 && entry.until <= entry.saved.saturating_add(GRACE / 2) {
                return;
            }
            map.retain(|_, end| end.until.saturating_add(GRACE) >= now);
            map.values_mut().for_each(|end| end.saved = end.until);
            map.iter()
                .map(|((server, peer), end)| Record {
                    server: server.to_string(),
                    peer: peer.to_string(),
                    until: end.until,
                })
                .collect()
        };
        let text = serde_json::to_vec_pretty(&records).unwrap_or_default();
        if let Err(e) = crate::files::write_private_file(&self.path, &text) {
            warn!(
                "{}: {e}; the link is kept in memory only",
                self.path.display()
            );
        }
    }

    /// Whether a push `server` sent naming `peer` as its source is one this terminal asked for.
    pub fn allows(&self, server: &ServerId, peer: &TerminalId, now: u64) -> bool {
        self.lock()
            .get(&(*server, *peer))
            .is_some_and(|end| end.until.saturating_add(GRACE) >= now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(ServerId, TerminalId), End>> {
        // Every update completes under the lock; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_allows_its_peer_at_its_server_only_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = (ServerId::from_bytes([1; 32]), ServerId::from_bytes([2; 32]));
        let (a, c) = (
            TerminalId::from_bytes([3; 32]),
            TerminalId::from_bytes([4; 32]),
        );
        let links = Links::open(dir.path());
        assert!(!links.allows(&s1, &a, 1000));
        links.record(s1, a, 2000, 1000);
        assert!(links.allows(&s1, &a, 1000));
        assert!(links.allows(&s1, &a, 2000 + GRACE));
        assert!(!links.allows(&s1, &a, 2001 + GRACE), "over, past the grace");
        assert!(!links.allows(&s2, &a, 1000), "another server");
        assert!(!links.allows(&s1, &c, 1000), "another peer");
        links.record(s1, a, 1500, 1000);
        assert!(
            links.allows(&s1, &a, 2000),
            "a shorter link does not shorten it"
        );

        let reopened = Links::open(dir.path());
        assert!(reopened.allows(&s1, &a, 2000));
        assert!(!reopened.allows(&s2, &a, 1000));
        // Expired links are dropped at the next record.
        reopened.record(s2, c, 9000, 5000);
        assert!(!Links::open(dir.path()).allows(&s1, &a, 0));
    }

    /// Renewing a link by less than half the grace writes nothing (a warm pull costs no
    /// fsync); the file then still covers the link's latest end, the half grace included.
    /// A longer renewal, or a new link, is written.
    #[test]
    fn small_renewals_are_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let (s, a, c) = (
            ServerId::from_bytes([1; 32]),
            TerminalId::from_bytes([3; 32]),
            TerminalId::from_bytes([4; 32]),
        );
        let file = dir.path().join(LINKS_FILE);
        let links = Links::open(dir.path());
        links.record(s, a, 2000, 1000);
        let written = std::fs::read(&file).unwrap();
        links.record(s, a, 2000 + GRACE / 2, 1000);
        assert_eq!(std::fs::read(&file).unwrap(), written, "not written again");
        assert!(
            links.allows(&s, &a, 2000 + GRACE / 2 + GRACE),
            "in memory: the new end"
        );
        let reopened = Links::open(dir.path());
        assert!(reopened.allows(&s, &a, 2000 + GRACE / 2 + GRACE / 2));
        links.record(s, a, 2001 + GRACE / 2, 1000);
        assert!(Links::open(dir.path()).allows(&s, &a, 2001 + GRACE / 2 + GRACE));
        links.record(s, c, 3000, 1000);
        assert!(Links::open(dir.path()).allows(&s, &c, 3000));
    }

    #[test]
    fn an_unreadable_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LINKS_FILE), "not json").unwrap();
        let links = Links::open(dir.path());
        let (s, a) = (
            ServerId::from_bytes([1; 32]),
            TerminalId::from_bytes([3; 32]),
        );
        assert!(!links.allows(&s, &a, 0));
        links.record(s, a, 10, 0);
        assert!(Links::open(dir.path()).allows(&s, &a, 10));
    }
}
