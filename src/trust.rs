//! The trust list (DESIGN §7): peers from the config plus those added with `handoff trust`,
//! persisted in `state_dir/trust.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::AcceptPolicy;
use crate::identity::{write_private_file, TerminalId};

pub const TRUST_FILE: &str = "trust.json";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read trust list {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write trust list {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is trusted by the config file ([trust] peers); remove it there")]
    InConfig(TerminalId),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TrustFile {
    peers: Vec<String>,
}

#[derive(Debug)]
pub struct TrustStore {
    /// The policy and peers from the config file; replaced on reload.
    config: Mutex<(AcceptPolicy, BTreeSet<TerminalId>)>,
    added: Mutex<BTreeSet<TerminalId>>,
    path: PathBuf,
}

impl TrustStore {
    pub fn open(
        state_dir: &Path,
        policy: AcceptPolicy,
        from_config: &[TerminalId],
    ) -> Result<Self, TrustError> {
        let path = state_dir.join(TRUST_FILE);
        let added = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: TrustFile =
                    serde_json::from_str(&text).map_err(|e| TrustError::Read {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                file.peers
                    .iter()
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()
                    .map_err(|e: crate::identity::IdParseError| TrustError::Read {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                return Err(TrustError::Read {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        Ok(Self {
            config: Mutex::new((policy, from_config.iter().copied().collect())),
            added: Mutex::new(added),
            path,
        })
    }

    /// Whether `id` is on the trust list.
    pub fn is_trusted(&self, id: &TerminalId) -> bool {
        self.in_config(id) || self.lock().contains(id)
    }

    fn in_config(&self, id: &TerminalId) -> bool {
        self.config_lock().1.contains(id)
    }

    /// Whether the policy lets `id` fetch interface info.
    pub fn accepts(&self, id: &TerminalId) -> bool {
        self.policy() == AcceptPolicy::Any || self.is_trusted(id)
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

    /// Adds `id`; returns false if it was already trusted.
    pub fn trust(&self, id: TerminalId) -> Result<bool, TrustError> {
        if self.in_config(&id) {
            return Ok(false);
        }
        let mut added = self.lock();
        if !added.insert(id) {
            return Ok(false);
        }
        if let Err(e) = self.persist(&added) {
            added.remove(&id);
            return Err(e);
        }
        Ok(true)
    }

    /// Removes `id`; returns false if it was not trusted.
    pub fn untrust(&self, id: TerminalId) -> Result<bool, TrustError> {
        if self.in_config(&id) {
            return Err(TrustError::InConfig(id));
        }
        let mut added = self.lock();
        if !added.remove(&id) {
            return Ok(false);
        }
        if let Err(e) = self.persist(&added) {
            added.insert(id);
            return Err(e);
        }
        Ok(true)
    }

    /// Every trusted ID with where it comes from: `"config"` or `"added"`.
    pub fn entries(&self) -> Vec<(TerminalId, &'static str)> {
        let mut out: Vec<(TerminalId, &'static str)> = self
            .config_lock()
            .1
            .iter()
            .map(|id| (*id, "config"))
            .collect();
        out.extend(self.lock().iter().map(|id| (*id, "added")));
        out.sort();
        out
    }

    /// Every trusted ID (config and added).
    pub fn list(&self) -> BTreeSet<TerminalId> {
        let mut all = self.lock().clone();
        all.extend(self.config_lock().1.iter().copied());
        all
    }

    fn config_lock(&self) -> std::sync::MutexGuard<'_, (AcceptPolicy, BTreeSet<TerminalId>)> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<TerminalId>> {
        // A poisoned lock only means another thread panicked mid-update of a set; the set is valid.
        self.added.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, added: &BTreeSet<TerminalId>) -> Result<(), TrustError> {
        let file = TrustFile {
            peers: added.iter().map(|id| id.to_string()).collect(),
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
        assert!(matches!(store.untrust(a), Err(TrustError::InConfig(_))));
        drop(store);
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[a]).unwrap();
        assert!(store.accepts(&b));
        assert!(!store.accepts(&c));
        assert!(store.untrust(b).unwrap());
        let store = TrustStore::open(dir.path(), AcceptPolicy::Trusted, &[]).unwrap();
        assert!(!store.accepts(&b));
        let any = TrustStore::open(dir.path(), AcceptPolicy::Any, &[]).unwrap();
        assert!(any.accepts(&c));
        assert!(!any.is_trusted(&c));
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
            store.untrust(a).is_ok(),
            "a is no longer fixed by the config"
        );
        store.set_config(AcceptPolicy::Any, &[]);
        assert!(store.accepts(&a));
    }
}
