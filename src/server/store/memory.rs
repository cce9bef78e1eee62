//! The in-memory backend: everything is lost on restart (a new epoch every start).

use std::collections::{BTreeMap, HashMap};

use super::{new_epoch, Backend, LogRead, Op, Outcome, StoreError, StoredPush};
use crate::identity::TerminalId;
use crate::wire::ticket::{ReplayCache, TicketError};
use crate::wire::Session;

#[derive(Debug, Default)]
struct Log {
    items: BTreeMap<u64, StoredPush>,
    next: u64,
    acked: u64,
}

#[derive(Debug)]
pub struct MemoryBackend {
    epoch: u64,
    /// Terminal → when it was last seen.
    known: HashMap<TerminalId, u64>,
    sessions: HashMap<TerminalId, Session>,
    /// (first, second) → (until, since).
    links: BTreeMap<(TerminalId, TerminalId), (u64, u64)>,
    nonces: ReplayCache,
    /// (first, second) → (revoked at, by first's clock; keep until).
    revoked: HashMap<(TerminalId, TerminalId), (u64, u64)>,
    logs: HashMap<TerminalId, Log>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self {
            epoch: new_epoch(),
            known: HashMap::new(),
            sessions: HashMap::new(),
            links: BTreeMap::new(),
            nonces: ReplayCache::new(usize::MAX),
            revoked: HashMap::new(),
            logs: HashMap::new(),
        }
    }

    /// Whether `first` revoked `second`'s tickets issued at or before `issued`.
    fn revoked_since(&self, first: &TerminalId, second: &TerminalId, issued: u64) -> bool {
        self.revoked
            .get(&(*first, *second))
            .is_some_and(|(at, _)| *at >= issued)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for MemoryBackend {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        // Memory holds anything, but what it holds must reach a terminal: an op the other
        // backends could not store is refused here too.
        Ok(ops
            .iter()
            .map(|op| {
                op.check()?;
                Ok(self.apply_one(op))
            })
            .collect())
    }

    fn known(&self, id: &TerminalId) -> Result<bool, StoreError> {
        Ok(self.known.contains_key(id))
    }

    fn seen(&self, id: &TerminalId) -> Result<Option<u64>, StoreError> {
        Ok(self.known.get(id).copied())
    }

    fn session(&self, id: &TerminalId) -> Result<Option<Session>, StoreError> {
        Ok(self.sessions.get(id).cloned())
    }

    fn followers(
        &self,
        first: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        let lo = (*first, TerminalId::from_bytes([0; 32]));
        let hi = (*first, TerminalId::from_bytes([255; 32]));
        Ok(self
            .links
            .range(lo..=hi)
            .filter(|(_, (until, _))| *until > now)
            .map(|((_, s), (u, _))| (*s, *u))
            .collect())
    }

    fn following(
        &self,
        second: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        Ok(self
            .links
            .iter()
            .filter(|((_, s), (until, _))| s == second && *until > now)
            .map(|((f, _), (u, _))| (*f, *u))
            .collect())
    }

    fn link_since(
        &self,
        first: &TerminalId,
        second: &TerminalId,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .links
            .get(&(*first, *second))
            .filter(|(until, _)| *until > now)
            .map(|(_, since)| *since))
    }

    fn log(
        &self,
        to: &TerminalId,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<LogRead, StoreError> {
        let Some(log) = self.logs.get(to) else {
            return Ok(LogRead {
                items: Vec::new(),
                acked: 0,
                next: 0,
            });
        };
        let items = log
            .items
            .range(from..)
            .map(|(_, p)| p)
            .filter(|p| p.expires_at > now)
            .take(limit)
            .cloned()
            .collect();
        Ok(LogRead {
            items,
            acked: log.acked,
            next: log.next,
        })
    }
}

impl MemoryBackend {
    fn apply_one(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Follow { .. } => {
                let Some((use_nonce, link, append)) = super::follow_parts(op) else {
                    unreachable!("op is a Follow")
                };
                let fresh = self.apply_one(&use_nonce);
                if fresh != Outcome::Fresh(Some(true)) {
                    return fresh;
                }
                self.apply_one(&link);
                let offset = append.map(|a| match self.apply_one(&a) {
                    Outcome::Offset(o) => o,
                    _ => unreachable!("an append answers with its offset"),
                });
                Outcome::Followed(offset)
            }
            Op::Touch { id, now } => {
                let seen = self.known.entry(*id).or_insert(*now);
                *seen = (*seen).max(*now);
                Outcome::Done
            }
            Op::ExpireIdle { now, seen_before } => {
                let linked: std::collections::HashSet<TerminalId> = self
                    .links
                    .iter()
                    .filter(|(_, (until, _))| *until > *now)
                    .flat_map(|((first, second), _)| [*first, *second])
                    .collect();
                let idle: Vec<TerminalId> = self
                    .known
                    .iter()
                    .filter(|(id, seen)| **seen < *seen_before && !linked.contains(*id))
                    .map(|(id, _)| *id)
                    .collect();
                for id in &idle {
                    self.known.remove(id);
                    self.sessions.remove(id);
                }
                Outcome::Expired(idle.len() as u64)
            }
            Op::SetSession { id, session } => {
                match session {
                    Some(s) => self.sessions.insert(*id, s.clone()),
                    None => self.sessions.remove(id),
                };
                Outcome::Done
            }
            Op::Link {
                first,
                second,
                until,
                since,
                unless_revoked,
            } => {
                if unless_revoked.is_some_and(|issued| self.revoked_since(first, second, issued)) {
                    return Outcome::Revoked;
                }
                self.links.insert((*first, *second), (*until, *since));
                Outcome::Done
            }
            Op::Unlink { first, second } => {
                Outcome::Removed(self.links.remove(&(*first, *second)).is_some())
            }
            Op::Revoke {
                first,
                second,
                at,
                keep_until,
                capacity,
                now,
            } => {
                let live = self
                    .revoked
                    .iter()
                    .filter(|((f, _), (_, keep))| f == first && keep > now)
                    .count();
                if !self.revoked.contains_key(&(*first, *second)) && live >= *capacity {
                    self.links.remove(&(*first, *second));
                    return Outcome::Full;
                }
                let entry = self.revoked.entry((*first, *second)).or_insert((0, 0));
                *entry = (entry.0.max(*at), entry.1.max(*keep_until));
                Outcome::Removed(self.links.remove(&(*first, *second)).is_some())
            }
            Op::UseNonce {
                first,
                second,
                issued_at,
                nonce,
                not_after,
                now,
                capacity,
            } => {
                if self.revoked_since(first, second, *issued_at) {
                    return Outcome::Revoked;
                }
                self.nonces.set_capacity(*capacity);
                match self.nonces.use_nonce(*first, *nonce, *not_after, *now) {
                    Ok(()) => Outcome::Fresh(Some(true)),
                    Err(TicketError::ReplayCacheFull) => Outcome::Fresh(None),
                    Err(_) => Outcome::Fresh(Some(false)),
                }
            }
            Op::Append { to, push, now } => {
                let log = self.logs.entry(*to).or_default();
                if let Some(key) = &push.collapse_key {
                    let acked = log.acked;
                    log.items.retain(|offset, p| {
                        *offset < acked || p.collapse_key.as_ref() != Some(key)
                    });
                }
                let offset = log.next;
                log.next += 1;
                log.items.insert(offset, push.stored(offset, *now));
                Outcome::Offset(offset)
            }
            Op::Ack { to, next } => {
                if let Some(log) = self.logs.get_mut(to) {
                    log.acked = log.acked.max((*next).min(log.next));
                    let keep = log.items.split_off(&log.acked);
                    log.items = keep;
                }
                Outcome::Done
            }
            Op::Sweep { now } => {
                for log in self.logs.values_mut() {
                    log.items.retain(|_, p| p.expires_at > *now);
                }
                self.links.retain(|_, (until, _)| *until > *now);
                self.nonces.expire(*now);
                self.revoked.retain(|_, (_, keep)| *keep > *now);
                Outcome::Done
            }
        }
    }
}
