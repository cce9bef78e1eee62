//! The trust list (DESIGN §7): peers from the config plus those added with `handoff trust`,
//! persisted in `state_dir/trust.json`, and revocations.
//!
//! A revocation (`handoff untrust`, or a peer dropped from the config) is the emergency brake: it
//! records when it happened, and the daemon tells its server to refuse every ticket it issued
//! that peer at or before that moment; tickets issued later are dated after it. A revocation by
//! `untrust` also overrides the config (which can only add trust) until the user trusts the peer
//! again, and it refuses the peer under `accept = "any"` too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::AcceptPolicy;
use crate::identity::{write_private_file, TerminalId};

pub const TRUST_FILE: &str = "trust.json";

/// How long a revocation's time is kept after the peer is trusted again: longer than any ticket
/// dated before it can live (the longest lease plus clock skew).
pub const REVOCATION_MEMORY: u64 = 86_400 + crate::wire::ticket::MAX_CLOCK_SKEW;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read trust list {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write trust list {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is this terminal's own ID; name another terminal (see `handoff peers`)")]
    Myself(TerminalId),
}

/// A revocation of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Unix seconds: tickets issued to the peer at or before this are refused by the server.
    pub at: u64,
    /// Whether the peer stays untrusted (until `handoff trust`); false once trusted again, or
    /// for a peer only dropped from the config.
    pub active: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    peers: Vec<String>,
    #[serde(default)]
    revoked: BTreeMap<String, Revocation>,
}

#[derive(Debug, Default)]
struct Persisted {
    added: BTreeSet<TerminalId>,
    revoked: BTreeMap<TerminalId, Revocation>,
}

/// What `untrust` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Untrusted {
    /// The peer was trusted before.
    pub changed: bool,
    /// The config file still lists the peer (the revocation overrides it).
    pub in_config: bool,
    /// The revocation's time, to send to the server.
    pub at: u64,
}

#[derive(Debug)]
pub struct TrustStore {
    /// The policy and peers from the config file; replaced on reload.
    config: Mutex<(AcceptPolicy, BTreeSet<TerminalId>)>,
    state: Mutex<Persisted>,
    path: PathBuf,
    /// The latest issue time of any ticket given out since start: a revocation is dated no
    /// earlier, so that tickets issued while the clock was ahead (before it was stepped back)
    /// are refused too.
    latest_issued: std::sync::atomic::AtomicU64,
}

fn now() -> u64 {
    crate::net::unix_now()
}

impl TrustStore {
    pub fn open(
        state_dir: &Path,
        policy: AcceptPolicy,
        from_config: &[TerminalId],
    ) -> Result<Self, TrustError> {
        let path = state_dir.join(TRUST_FILE);
        let read_err = |reason: String| TrustError::Read {
            path: path.clone(),
            reason,
        };
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: TrustFile =
                    serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
                let parse =
                    |p: &String| p.parse::<TerminalId>().map_err(|e| read_err(e.to_string()));
                Persisted {
                    added: file.peers.iter().map(parse).collect::<Result<_, _>>()?,
                    revoked: file
                        .revoked
                        .iter()
                        .map(|(id, r)| Ok((parse(id)?, *r)))
                        .collect::<Result<_, TrustError>>()?,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(read_err(e.to_string())),
        };
        Ok(Self {
            config: Mutex::new((policy, from_config.iter().copied().collect())),
            state: Mutex::new(state),
            path,
            latest_issued: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Whether `id` is on the trust list (and not revoked).
    pub fn is_trusted(&self, id: &TerminalId) -> bool {
        let state = self.lock();
        !Self::active(&state, id) && (self.in_config(id) || state.added.contains(id))
    }

    fn active(state: &Persisted, id: &TerminalId) -> bool {
        state.revoked.get(id).is_some_and(|r| r.active)
    }

    /// Whether the user revoked `id` (it stays untrusted until trusted again).
    pub fn is_revoked(&self, id: &TerminalId) -> bool {
        Self::active(&self.lock(), id)
    }

    fn in_config(&self, id: &TerminalId) -> bool {
        self.config_lock().1.contains(id)
    }

    /// Whether the policy lets `id` fetch interface info.
    pub fn accepts(&self, id: &TerminalId) -> bool {
        if self.policy() == AcceptPolicy::Any {
            !self.is_revoked(id)
        } else {
            self.is_trusted(id)
        }
    }

    pub fn policy(&self) -> AcceptPolicy {
        self.config_lock().0
    }

    /// Replaces the policy and the peers from the config file (on reload); IDs added with
    /// `handoff trust` stay. Returns the config peers added and removed.
    pub fn set_config(
        &self,
        policy: AcceptPolicy,
        peers: &[TerminalId],
    ) -> (Vec<TerminalId>, Vec<TerminalId>) {
        let new: BTreeSet<TerminalId> = peers.iter().copied().collect();
        let mut config = self.config_lock();
        let added = new.difference(&config.1).copied().collect();
        let removed = config.1.difference(&new).copied().collect();
        *config = (policy, new);
        (added, removed)
    }

    /// Adds `id` (lifting a revocation); returns false if it was already trusted.
    pub fn trust(&self, id: TerminalId) -> Result<bool, TrustError> {
        let was = self.is_trusted(&id);
        let in_config = self.in_config(&id);
        let mut state = self.lock();
        let before_revoked = state.revoked.get(&id).copied();
        let before_added = state.added.contains(&id);
        if let Some(r) = state.revoked.get_mut(&id) {
            r.active = false;
        }
        if !in_config {
            state.added.insert(id);
        }
        if before_revoked == state.revoked.get(&id).copied()
            && before_added == state.added.contains(&id)
        {
            return Ok(false);
        }
        if let Err(e) = self.persist(&state) {
            if let Some(r) = before_revoked {
                state.revoked.insert(id, r);
            }
            if !before_added {
                state.added.remove(&id);
            }
            return Err(e);
        }
        Ok(!was)
    }

    /// Revokes `id`: it is no longer trusted (also if the config lists it, until trusted
    /// again), and tickets issued to it until now are to be refused.
    pub fn untrust(&self, id: TerminalId) -> Result<Untrusted, TrustError> {
        let was = self.is_trusted(&id);
        let in_config = self.in_config(&id);
        let mut state = self.lock();
        let before = (state.added.clone(), state.revoked.clone());
        state.added.remove(&id);
        let at = self
            .revocation_time()
            .max(state.revoked.get(&id).map_or(0, |r| r.at));
        state.revoked.insert(id, Revocation { at, active: true });
        if let Err(e) = self.persist(&state) {
            (state.added, state.revoked) = before;
            return Err(e);
        }
        Ok(Untrusted {
            changed: was,
            in_config,
            at,
        })
    }

    /// Records that `id` lost trust without the user revoking it (dropped from the config):
    /// tickets issued to it until now are to be refused, but listing it again trusts it.
    /// Returns the revocation's time.
    pub fn note_dropped(&self, id: TerminalId) -> Result<u64, TrustError> {
        let mut state = self.lock();
        let before = state.revoked.get(&id).copied();
        let at = self.revocation_time().max(before.map_or(0, |r| r.at));
        let active = before.is_some_and(|r| r.active);
        state.revoked.insert(id, Revocation { at, active });
        if let Err(e) = self.persist(&state) {
            match before {
                Some(r) => state.revoked.insert(id, r),
                None => state.revoked.remove(&id),
            };
            return Err(e);
        }
        Ok(at)
    }

    /// The earliest issue time a new ticket for `id` may carry: after its last revocation, so
    /// the server never mistakes it for one issued before.
    pub fn ticket_floor(&self, id: &TerminalId) -> u64 {
        self.lock().revoked.get(id).map_or(0, |r| r.at + 1)
    }

    /// The issue time of a new ticket for `id`: now, and after its last revocation. Recorded,
    /// so that a later revocation is dated no earlier whatever the clock does meanwhile.
    pub fn issue_time(&self, id: &TerminalId) -> u64 {
        let at = now().max(self.ticket_floor(id));
        self.latest_issued
            .fetch_max(at, std::sync::atomic::Ordering::AcqRel);
        at
    }

    /// When a revocation made now is dated: now, or the latest ticket's issue time if the
    /// clock has since gone back.
    fn revocation_time(&self) -> u64 {
        now().max(
            self.latest_issued
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Revocations the server must still hear of (their tickets may not have expired): sent
    /// again on every connection to the server, in case one was missed.
    pub fn revocations(&self) -> Vec<(TerminalId, u64)> {
        let horizon = now().saturating_sub(REVOCATION_MEMORY);
        self.lock()
            .revoked
            .iter()
            .filter(|(_, r)| r.at > horizon)
            .map(|(id, r)| (*id, r.at))
            .collect()
    }

    /// Config peers the user revoked (the config lists them, but they are not trusted).
    pub fn revoked_in_config(&self) -> Vec<TerminalId> {
        let config = self.config_lock().1.clone();
        let state = self.lock();
        config
            .into_iter()
            .filter(|id| Self::active(&state, id))
            .collect()
    }

    /// Every trusted ID with where it comes from: `"config"` or `"added"`.
    pub fn entries(&self) -> Vec<(TerminalId, &'static str)> {
        let config = self.config_lock().1.clone();
        let state = self.lock();
        let mut out: Vec<(TerminalId, &'static str)> = config
            .iter()
            .filter(|id| !Self::active(&state, id))
            .map(|id| (*id, "config"))
            .collect();
        out.extend(
            state
                .added
                .iter()
                .filter(|id| !config.contains(id))
                .map(|id| (*id, "added")),
        );
        out.sort();
        out
    }

    /// Every trusted ID (config and added).
    pub fn list(&self) -> BTreeSet<TerminalId> {
        self.entries().into_iter().map(|(id, _)| id).collect()
    }

    fn config_lock(&self) -> std::sync::MutexGuard<'_, (AcceptPolicy, BTreeSet<TerminalId>)> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        // A poisoned lock only means another thread panicked mid-update; the sets are valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, state: &Persisted) -> Result<(), TrustError> {
        // Revocations of peers trusted again are kept only while tickets dated before them
        // could still be presented.
        let horizon = now().saturating_sub(REVOCATION_MEMORY);
        let file = TrustFile {
            peers: state.added.iter().map(|id| id.to_string()).collect(),
            revoked: state
                .revoked
                .iter()
                .filter(|(_, r)| r.active || r.at > horizon)
                .map(|(id, r)| (id.to_string(), *r))
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
        text.push('\n');
        write_private_file(&self.path, text.as_bytes()).map_err(|source| TrustError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_is_persisted_and_config_peers_are_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let a = TerminalId::from_bytes([1; 32]);
        let b = TerminalId::from_bytes([2; 32]);
        let c = TerminalId::from_bytes([3; 32]);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        assert!(store.accepts(&a));
        assert!(!store.accepts(&b));
        assert!(store.trust(b).unwrap());
        assert!(!store.trust(b).unwrap());
        drop(store);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        assert!(store.accepts(&b));
        assert!(!store.accepts(&c));
        assert!(store.untrust(b).unwrap().changed);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[]).unwrap();
        assert!(!store.accepts(&b));
        let any = TrustStore::open(dir.path(), AcceptPolicy::Any, &[]).unwrap();
        assert!(any.accepts(&c));
        assert!(!any.is_trusted(&c));
    }

    /// Tickets issued while the clock was ahead carry that time; once the clock is stepped
    /// back, a revocation dated by it alone would come before them, and the server would keep
    /// taking them. It is dated no earlier than the latest ticket issued.
    #[test]
    fn a_revocation_is_dated_after_every_ticket_issued_even_if_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let b = TerminalId::from_bytes([2; 32]);
        let c = TerminalId::from_bytes([3; 32]);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[b, c]).unwrap();
        let issued = store.issue_time(&b);
        assert!(issued >= now());
        // As issue_time records it with a clock two minutes ahead (stepped back since).
        let ahead = now() + 120;
        store
            .latest_issued
            .fetch_max(ahead, std::sync::atomic::Ordering::AcqRel);
        let revoked = store.untrust(b).unwrap();
        assert!(revoked.at >= ahead, "{} < {ahead}", revoked.at);
        assert!(store.ticket_floor(&b) > ahead);
        assert!(store.note_dropped(c).unwrap() >= ahead);
    }

    #[test]
    fn reloading_the_config_keeps_added_peers() {
        let dir = tempfile::tempdir().unwrap();
        let a = TerminalId::from_bytes([1; 32]);
        let b = TerminalId::from_bytes([2; 32]);
        let c = TerminalId::from_bytes([3; 32]);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        store.trust(b).unwrap();
        let (added, removed) = store.set_config(AcceptPolicy::Trusted, &[c]);
        assert_eq!((added, removed), (vec![c], vec![a]));
        assert!(!store.accepts(&a));
        assert!(store.accepts(&b) && store.accepts(&c));
        assert!(
            !store.untrust(a).unwrap().changed,
            "a was no longer trusted"
        );
        store.set_config(AcceptPolicy::Any, &[]);
        assert!(
            !store.accepts(&a),
            "a revoked peer is refused under \"any\" too"
        );
        assert!(store.accepts(&TerminalId::from_bytes([9; 32])));
    }

    #[test]
    fn untrusting_a_config_peer_revokes_it_until_trusted_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = TerminalId::from_bytes([1; 32]);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        assert_eq!(store.ticket_floor(&a), 0);
        let u = store.untrust(a).unwrap();
        assert!(u.changed && u.in_config);
        assert!(!store.accepts(&a));
        assert_eq!(store.revoked_in_config(), vec![a]);
        assert_eq!(store.revocations(), vec![(a, u.at)]);
        assert_eq!(store.ticket_floor(&a), u.at + 1);
        drop(store);
        // Persisted: still revoked after a restart with the same config.
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        assert!(!store.is_trusted(&a));
        assert!(store.trust(a).unwrap());
        assert!(store.is_trusted(&a));
        assert!(store.revoked_in_config().is_empty());
        // Tickets after the trust are still dated after the revocation.
        assert_eq!(store.ticket_floor(&a), u.at + 1);
        assert_eq!(store.entries(), vec![(a, "config")]);
    }
}
