//! The embedded backend: one redb file in the server's `state_dir` (`store.redb`). Every batch
//! of writes is one transaction committed with immediate durability (one fsync), so a write
//! acknowledged by [`super::Store::write`] survives a crash of the process or the machine.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{new_epoch, Backend, LogRead, Op, Outcome, StoreError, StoredPush};
use crate::identity::TerminalId;
use crate::wire::{self, Session};

const SCHEMA: u64 = 1;
/// Failed ops one batch is retried without before the whole batch is given up (a broken disk
/// rather than bad ops).
const MAX_FAILED_OPS: usize = 8;

type Id<'a> = &'a [u8; 32];

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// terminal → when it was last seen.
const KNOWN: TableDefinition<Id, u64> = TableDefinition::new("known");
const SESSIONS: TableDefinition<Id, &[u8]> = TableDefinition::new("sessions");
/// (first, second) → until, and the same reversed for lookups by follower.
const LINKS: TableDefinition<(Id, Id), u64> = TableDefinition::new("links");
const LINKS_BY_SECOND: TableDefinition<(Id, Id), u64> = TableDefinition::new("links_by_second");
/// (first, second) → where in first's stream the link began (see [`Op::Link`]).
const LINK_SINCE: TableDefinition<(Id, Id), u64> = TableDefinition::new("link_since");
const NONCES: TableDefinition<(Id, &[u8; 16]), u64> = TableDefinition::new("nonces");
/// first → how many nonces of its tickets `NONCES` holds (the per-terminal quota).
const NONCE_COUNTS: TableDefinition<Id, u64> = TableDefinition::new("nonce_counts");
/// (first, second) → (revoked at, by first's clock; keep until).
const REVOKED: TableDefinition<(Id, Id), (u64, u64)> = TableDefinition::new("revoked");
/// (recipient, offset) → encoded [`StoredPush`].
const LOG: TableDefinition<(Id, u64), &[u8]> = TableDefinition::new("log");
/// recipient → (next offset, acknowledged below).
const CURSORS: TableDefinition<Id, (u64, u64)> = TableDefinition::new("cursors");
/// (recipient, collapse key) → offset of the latest item with that key.
const COLLAPSE: TableDefinition<(Id, &str), u64> = TableDefinition::new("collapse");

pub struct EmbeddedBackend {
    db: Database,
    epoch: u64,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::backend(e)
}

impl EmbeddedBackend {
    /// Opens (or creates) the store file; a new file starts a new epoch.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        let txn = db.begin_write().map_err(|e| open_err(&e))?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(|e| open_err(&e))?;
            let schema = meta
                .get("schema")
                .map_err(|e| open_err(&e))?
                .map(|v| v.value());
            match schema {
                Some(SCHEMA) | None => {}
                Some(other) => {
                    return Err(open_err(&format!(
                        "schema version {other}, this build reads {SCHEMA}"
                    )))
                }
            }
            meta.insert("schema", SCHEMA).map_err(|e| open_err(&e))?;
            let existing = meta
                .get("epoch")
                .map_err(|e| open_err(&e))?
                .map(|v| v.value());
            match existing {
                Some(epoch) => epoch,
                None => {
                    let epoch = new_epoch();
                    meta.insert("epoch", epoch).map_err(|e| open_err(&e))?;
                    epoch
                }
            }
        };
        // Create every table, so reads never meet a missing one.
        txn.open_table(KNOWN).map_err(|e| open_err(&e))?;
        txn.open_table(SESSIONS).map_err(|e| open_err(&e))?;
        txn.open_table(LINKS).map_err(|e| open_err(&e))?;
        txn.open_table(LINKS_BY_SECOND).map_err(|e| open_err(&e))?;
        txn.open_table(LINK_SINCE).map_err(|e| open_err(&e))?;
        txn.open_table(NONCES).map_err(|e| open_err(&e))?;
        txn.open_table(LOG).map_err(|e| open_err(&e))?;
        txn.open_table(CURSORS).map_err(|e| open_err(&e))?;
        txn.open_table(COLLAPSE).map_err(|e| open_err(&e))?;
        txn.commit().map_err(|e| open_err(&e))?;
        // The file holds the identity-free server state; keep it private like the key.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        Ok(Self { db, epoch })
    }
}

impl Backend for EmbeddedBackend {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        // One transaction for the batch. An op that fails aborts it; the batch then runs again
        // without that op, so it fails alone and the happy path stays one commit.
        let mut failed: Vec<Option<StoreError>> = ops.iter().map(|_| None).collect();
        for _ in 0..=MAX_FAILED_OPS {
            let txn = self.db.begin_write().map_err(err)?;
            let mut out = Vec::with_capacity(ops.len());
            let mut culprit = None;
            // Open while a run of appends lasts; closed before any other op opens its tables.
            let mut appends: Option<AppendTables> = None;
            for (i, op) in ops.iter().enumerate() {
                if failed[i].is_some() {
                    out.push(None);
                    continue;
                }
                let applied = if matches!(op, Op::Append { .. }) {
                    let tables = match &mut appends {
                        Some(tables) => tables,
                        None => appends.insert(AppendTables::open(&txn)?),
                    };
                    tables.append(op)
                } else {
                    appends = None;
                    apply_one(&txn, op)
                };
                match applied {
                    Ok(outcome) => out.push(Some(outcome)),
                    Err(e) => {
                        culprit = Some((i, e));
                        break;
                    }
                }
            }
            drop(appends);
            if let Some((i, e)) = culprit {
                txn.abort().map_err(err)?;
                failed[i] = Some(e);
                continue;
            }
            txn.commit().map_err(err)?;
            return Ok(out
                .into_iter()
                .zip(failed)
                .map(|(outcome, failure)| match (outcome, failure) {
                    (Some(outcome), _) => Ok(outcome),
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(StoreError::Backend("an op got no outcome".into())),
                })
                .collect());
        }
        Err(StoreError::Backend(format!(
            "more than {MAX_FAILED_OPS} operations of one batch failed; the first: {}",
            failed
                .iter()
                .flatten()
                .next()
                .map(|e| e.to_string())
                .unwrap_or_default()
        )))
    }

    fn known(&self, id: &TerminalId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        Ok(txn
            .open_table(KNOWN)
            .map_err(err)?
            .get(id.as_bytes())
            .map_err(err)?
            .is_some())
    }

    fn seen(&self, id: &TerminalId) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        Ok(txn
            .open_table(KNOWN)
            .map_err(err)?
            .get(id.as_bytes())
            .map_err(err)?
            .map(|v| v.value()))
    }

    fn session(&self, id: &TerminalId) -> Result<Option<Session>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(SESSIONS).map_err(err)?;
        let Some(bytes) = table.get(id.as_bytes()).map_err(err)? else {
            return Ok(None);
        };
        Ok(Some(wire::decode_payload(bytes.value()).map_err(err)?))
    }

    fn followers(
        &self,
        first: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        links_of(&txn.open_table(LINKS).map_err(err)?, first, now)
    }

    fn following(
        &self,
        second: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        links_of(&txn.open_table(LINKS_BY_SECOND).map_err(err)?, second, now)
    }

    fn link_since(
        &self,
        first: &TerminalId,
        second: &TerminalId,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let key = (first.as_bytes(), second.as_bytes());
        let live = txn
            .open_table(LINKS)
            .map_err(err)?
            .get(key)
            .map_err(err)?
            .is_some_and(|until| until.value() > now);
        if !live {
            return Ok(None);
        }
        let since = txn
            .open_table(LINK_SINCE)
            .map_err(err)?
            .get(key)
            .map_err(err)?
            .map_or(0, |v| v.value());
        Ok(Some(since))
    }

    fn log(
        &self,
        to: &TerminalId,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<LogRead, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let (next, acked) = txn
            .open_table(CURSORS)
            .map_err(err)?
            .get(to.as_bytes())
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        let log = txn.open_table(LOG).map_err(err)?;
        let mut items = Vec::new();
        for entry in log
            .range((to.as_bytes(), from)..=(to.as_bytes(), u64::MAX))
            .map_err(err)?
        {
            let (_, value) = entry.map_err(err)?;
            let push: StoredPush = wire::decode_payload(value.value()).map_err(err)?;
            if push.expires_at > now {
                items.push(push);
                if items.len() >= limit {
                    break;
                }
            }
        }
        Ok(LogRead { items, acked, next })
    }
}

fn links_of(
    table: &impl ReadableTable<(Id<'static>, Id<'static>), u64>,
    key: &TerminalId,
    now: u64,
) -> Result<Vec<(TerminalId, u64)>, StoreError> {
    let mut out = Vec::new();
    for entry in table
        .range((key.as_bytes(), &[0u8; 32])..=(key.as_bytes(), &[255u8; 32]))
        .map_err(err)?
    {
        let (k, until) = entry.map_err(err)?;
        let until = until.value();
        if until > now {
            out.push((TerminalId::from_bytes(*k.value().1), until));
        }
    }
    Ok(out)
}

/// The tables an append writes, opened once for a run of appends (a fan-out is thousands of
/// them in one batch, and opening a table costs more than the insert).
struct AppendTables<'txn> {
    cursors: redb::Table<'txn, Id<'static>, (u64, u64)>,
    log: redb::Table<'txn, (Id<'static>, u64), &'static [u8]>,
    collapse: redb::Table<'txn, (Id<'static>, &'static str), u64>,
}

impl<'txn> AppendTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            cursors: txn.open_table(CURSORS).map_err(err)?,
            log: txn.open_table(LOG).map_err(err)?,
            collapse: txn.open_table(COLLAPSE).map_err(err)?,
        })
    }

    fn append(&mut self, op: &Op) -> Result<Outcome, StoreError> {
        let Op::Append { to, push, now } = op else {
            return Err(StoreError::Backend("not an append".into()));
        };
        let (next, acked) = self
            .cursors
            .get(to.as_bytes())
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        if let Some(key) = &push.collapse_key {
            let previous = self
                .collapse
                .get((to.as_bytes(), key.as_str()))
                .map_err(err)?
                .map(|v| v.value());
            if let Some(old) = previous.filter(|old| *old >= acked) {
                self.log.remove((to.as_bytes(), old)).map_err(err)?;
            }
            self.collapse
                .insert((to.as_bytes(), key.as_str()), next)
                .map_err(err)?;
        }
        let bytes = wire::encode_payload(&push.stored(next, *now)).map_err(err)?;
        self.log
            .insert((to.as_bytes(), next), bytes.as_slice())
            .map_err(err)?;
        self.cursors
            .insert(to.as_bytes(), (next + 1, acked))
            .map_err(err)?;
        Ok(Outcome::Offset(next))
    }
}

/// Whether `first` revoked `second`'s tickets issued at or before `issued`.
fn revoked_since(
    txn: &WriteTransaction,
    first: &TerminalId,
    second: &TerminalId,
    issued: u64,
) -> Result<bool, StoreError> {
    let revoked = txn
        .open_table(REVOKED)
        .map_err(err)?
        .get((first.as_bytes(), second.as_bytes()))
        .map_err(err)?
        .map(|v| v.value().0);
    Ok(revoked.is_some_and(|at| at >= issued))
}

fn apply_one(txn: &WriteTransaction, op: &Op) -> Result<Outcome, StoreError> {
    Ok(match op {
        Op::Follow { .. } => {
            let Some((use_nonce, link, append)) = super::follow_parts(op) else {
                unreachable!("op is a Follow")
            };
            let fresh = apply_one(txn, &use_nonce)?;
            if fresh != Outcome::Fresh(Some(true)) {
                return Ok(fresh);
            }
            apply_one(txn, &link)?;
            let offset = match append {
                Some(a) => match apply_one(txn, &a)? {
                    Outcome::Offset(o) => Some(o),
                    other => {
                        return Err(StoreError::Backend(format!("an append answered {other:?}")))
                    }
                },
                None => None,
            };
            Outcome::Followed(offset)
        }
        Op::Touch { id, now } => {
            let mut t = txn.open_table(KNOWN).map_err(err)?;
            let seen = t.get(id.as_bytes()).map_err(err)?.map(|v| v.value());
            if seen.is_none_or(|seen| seen < *now) {
                t.insert(id.as_bytes(), *now).map_err(err)?;
            }
            Outcome::Done
        }
        Op::ExpireIdle { now, seen_before } => {
            let mut known = txn.open_table(KNOWN).map_err(err)?;
            let links = txn.open_table(LINKS).map_err(err)?;
            let links_by_second = txn.open_table(LINKS_BY_SECOND).map_err(err)?;
            let mut idle = Vec::new();
            for entry in known.iter().map_err(err)? {
                let (id, seen) = entry.map_err(err)?;
                if seen.value() >= *seen_before {
                    continue;
                }
                let id = TerminalId::from_bytes(*id.value());
                if links_of(&links, &id, *now)?.is_empty()
                    && links_of(&links_by_second, &id, *now)?.is_empty()
                {
                    idle.push(id);
                }
            }
            let mut sessions = txn.open_table(SESSIONS).map_err(err)?;
            for id in &idle {
                known.remove(id.as_bytes()).map_err(err)?;
                sessions.remove(id.as_bytes()).map_err(err)?;
            }
            Outcome::Expired(idle.len() as u64)
        }
        Op::SetSession { id, session } => {
            let mut t = txn.open_table(SESSIONS).map_err(err)?;
            match session {
                Some(s) => {
                    let bytes = wire::encode_payload(s).map_err(err)?;
                    t.insert(id.as_bytes(), bytes.as_slice()).map_err(err)?;
                }
                None => {
                    t.remove(id.as_bytes()).map_err(err)?;
                }
            }
            Outcome::Done
        }
        Op::Link {
            first,
            second,
            until,
            since,
            unless_revoked,
        } => {
            if let Some(issued) = unless_revoked {
                if revoked_since(txn, first, second, *issued)? {
                    return Ok(Outcome::Revoked);
                }
            }
            txn.open_table(LINKS)
                .map_err(err)?
                .insert((first.as_bytes(), second.as_bytes()), *until)
                .map_err(err)?;
            txn.open_table(LINK_SINCE)
                .map_err(err)?
                .insert((first.as_bytes(), second.as_bytes()), *since)
                .map_err(err)?;
            txn.open_table(LINKS_BY_SECOND)
                .map_err(err)?
                .insert((second.as_bytes(), first.as_bytes()), *until)
                .map_err(err)?;
            Outcome::Done
        }
        Op::Unlink { first, second } => {
            let removed = txn
                .open_table(LINKS)
                .map_err(err)?
                .remove((first.as_bytes(), second.as_bytes()))
                .map_err(err)?
                .is_some();
            txn.open_table(LINKS_BY_SECOND)
                .map_err(err)?
                .remove((second.as_bytes(), first.as_bytes()))
                .map_err(err)?;
            txn.open_table(LINK_SINCE)
                .map_err(err)?
                .remove((first.as_bytes(), second.as_bytes()))
                .map_err(err)?;
            Outcome::Removed(removed)
        }
        Op::Revoke {
            first,
            second,
            at,
            keep_until,
            capacity,
            now,
        } => {
            let mut t = txn.open_table(REVOKED).map_err(err)?;
            let key = (first.as_bytes(), second.as_bytes());
            let old = t.get(key).map_err(err)?.map(|v| v.value());
            if old.is_none() {
                // Live ones; the sweep removes the others within a minute.
                let mut live = 0;
                for entry in t
                    .range((first.as_bytes(), &[0u8; 32])..=(first.as_bytes(), &[255u8; 32]))
                    .map_err(err)?
                {
                    let (_, keep) = entry.map_err(err)?.1.value();
                    live += usize::from(keep > *now);
                }
                if live >= *capacity {
                    drop(t);
                    let unlink = Op::Unlink {
                        first: *first,
                        second: *second,
                    };
                    apply_one(txn, &unlink)?;
                    return Ok(Outcome::Full);
                }
            }
            let (old_at, old_keep) = old.unwrap_or((0, 0));
            t.insert(key, (old_at.max(*at), old_keep.max(*keep_until)))
                .map_err(err)?;
            drop(t);
            apply_one(
                txn,
                &Op::Unlink {
                    first: *first,
                    second: *second,
                },
            )?
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
            if revoked_since(txn, first, second, *issued_at)? {
                return Ok(Outcome::Revoked);
            }
            let mut t = txn.open_table(NONCES).map_err(err)?;
            if t.get((first.as_bytes(), nonce)).map_err(err)?.is_some() {
                return Ok(Outcome::Fresh(Some(false)));
            }
            let mut counts = txn.open_table(NONCE_COUNTS).map_err(err)?;
            let mut count = counts
                .get(first.as_bytes())
                .map_err(err)?
                .map_or(0, |v| v.value());
            if count >= *capacity as u64 {
                // Only this first terminal's nonces: strangers minting tickets between their
                // own keys fill only their own quota.
                let range = (first.as_bytes(), &[0u8; 16])..=(first.as_bytes(), &[0xffu8; 16]);
                t.retain_in(range.clone(), |_, n| n > *now).map_err(err)?;
                count = t.range(range).map_err(err)?.count() as u64;
                if count >= *capacity as u64 {
                    counts.insert(first.as_bytes(), count).map_err(err)?;
                    return Ok(Outcome::Fresh(None));
                }
            }
            t.insert((first.as_bytes(), nonce), *not_after)
                .map_err(err)?;
            counts.insert(first.as_bytes(), count + 1).map_err(err)?;
            Outcome::Fresh(Some(true))
        }
        Op::Append { .. } => AppendTables::open(txn)?.append(op)?,
        Op::Ack { to, next } => {
            let mut cursors = txn.open_table(CURSORS).map_err(err)?;
            let Some((end, acked)) = cursors.get(to.as_bytes()).map_err(err)?.map(|v| v.value())
            else {
                return Ok(Outcome::Done);
            };
            let new_acked = acked.max((*next).min(end));
            if new_acked > acked {
                cursors
                    .insert(to.as_bytes(), (end, new_acked))
                    .map_err(err)?;
                let mut log = txn.open_table(LOG).map_err(err)?;
                log.retain_in(
                    (to.as_bytes(), acked)..(to.as_bytes(), new_acked),
                    |_, _| false,
                )
                .map_err(err)?;
            }
            Outcome::Done
        }
        Op::Sweep { now } => {
            let mut log = txn.open_table(LOG).map_err(err)?;
            log.retain(|_, bytes| {
                wire::decode_payload::<StoredPush>(bytes)
                    .map(|p| p.expires_at > *now)
                    .unwrap_or(false)
            })
            .map_err(err)?;
            txn.open_table(LINKS)
                .map_err(err)?
                .retain(|_, until| until > *now)
                .map_err(err)?;
            txn.open_table(LINKS_BY_SECOND)
                .map_err(err)?
                .retain(|_, until| until > *now)
                .map_err(err)?;
            {
                let links = txn.open_table(LINKS).map_err(err)?;
                txn.open_table(LINK_SINCE)
                    .map_err(err)?
                    .retain(|key, _| links.get(key).is_ok_and(|l| l.is_some()))
                    .map_err(err)?;
            }
            let mut nonces = txn.open_table(NONCES).map_err(err)?;
            nonces.retain(|_, n| n > *now).map_err(err)?;
            // Recount what is left per first terminal.
            let mut live: std::collections::HashMap<[u8; 32], u64> = Default::default();
            for entry in nonces.iter().map_err(err)? {
                let (k, _) = entry.map_err(err)?;
                *live.entry(*k.value().0).or_default() += 1;
            }
            let mut counts = txn.open_table(NONCE_COUNTS).map_err(err)?;
            counts.retain(|_, _| false).map_err(err)?;
            for (first, n) in &live {
                counts.insert(first, *n).map_err(err)?;
            }
            txn.open_table(REVOKED)
                .map_err(err)?
                .retain(|_, (_, keep)| keep > *now)
                .map_err(err)?;
            Outcome::Done
        }
    })
}
