//! The Redis backend (`[store] kind = "redis"`): the state of every server node of a deployment
//! in one Redis, so all nodes share sessions, links, used nonces and push logs (a push stored
//! through one node is in the log a terminal resumes from on any other).
//!
//! # Key layout
//!
//! Every key starts with `handoff:v1:`, the layout's version. A terminal's keys carry its ID as a
//! hash tag (`handoff:v1:{<id>}:…`), so they share one hash slot:
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `handoff:v1:epoch` | string | the push logs' epoch (decimal, non-zero) | none |
//! | `handoff:v1:sweep` | zset | keys to sweep, scored by the earliest deadline in each | none |
//! | `handoff:v1:seen` | zset | terminal IDs, scored by when each was last seen | none |
//! | `…{id}:known` | string | when `id` was last seen (Unix s) | none |
//! | `…{id}:session` | string | `id`'s session (bincode) | none |
//! | `…{id}:followers` | zset | terminals following `id`, scored by `until` | see below |
//! | `…{id}:following` | zset | terminals `id` follows, scored by `until` | see below |
//! | `…{id}:since` | hash | terminal following `id` → where in `id`'s stream its link began | as `followers` |
//! | `…{id}:nonces` | zset | nonces (16 bytes) of tickets `id` signed, scored by `not_after` | see below |
//! | `…{id}:revoked` | hash | terminal `id` revoked → the time it did, by `id`'s clock (tickets `id` issued it until then are refused) | until the newest revocation no longer matters |
//! | `…{id}:revoked_until` | zset | the same terminals, scored by when each revocation no longer matters (at most `[limits] revocations_per_terminal` are kept) | the same |
//! | `…{id}:cursor` | hash | `next` (the next offset), `acked` (everything below is acknowledged) | none |
//! | `…{id}:log` | zset | `id`'s pushes scored by offset; member: the offset (8 bytes, big-endian) then the bincode [`StoredPush`] | see below |
//! | `…{id}:expiry` | zset | the same offsets (8 bytes), scored by `expires_at` | see below |
//! | `…{id}:collapse` | hash | collapse key → offset of the latest item with it | see below |
//!
//! A terminal's stream (what all its followers receive) is a log like the others, under the ID
//! [`super::stream_key`] gives for it.
//!
//! A key holding deadlines expires [`GRACE`] after the latest deadline in it (extended, never
//! shortened, on each write), so state nobody sweeps still goes away. Deadlines themselves are
//! judged against the `now` the server passes in, never against Redis's clock: key TTLs are set
//! relative to that `now` and only collect garbage. The cursor never expires: dropping it would
//! restart offsets at 0 inside the same epoch.
//!
//! # Atomicity
//!
//! Each [`Op`] is one atomic step on one terminal's slot: a Lua script (`EVALSHA`) where it reads
//! before it writes — append (offset assignment and collapse replacement), ack, nonce use, sweep
//! — and single commands elsewhere. Two ops are not: a link is two single-slot writes (the first
//! terminal's `followers`, then the second's `following`), and so is an unlink; between them a
//! reader may see one side only. Registering a key in `handoff:v1:sweep`, and a link set's TTL,
//! are separate commands too; a missed registration only delays garbage collection to the key's
//! TTL. A touch sets `known` and scores the terminal in `handoff:v1:seen`; idle expiry is a
//! script per terminal that checks the score and the terminal's links and then deletes `known`
//! and `session`.
//!
//! The append script also declares `handoff:v1:epoch`, so that epoch check and offset assignment
//! are one step, and the idle-expiry script declares `handoff:v1:seen`. Those two scripts touch
//! a second slot: this backend talks to a single Redis (or a replicated primary), not to a
//! Cluster, and on a Cluster they would need per-slot copies of those keys.
//!
//! # Epoch
//!
//! `handoff:v1:epoch` is created with `SET NX` from a random non-zero value. If Redis loses its
//! data (a restart without persistence, `FLUSHALL`), the key is gone: the append script, which
//! gets the epoch the node believes in, refuses to assign an offset, the node creates a new epoch
//! (`SET NX`, so concurrent nodes agree on one), reads it back and retries. Every batch also
//! ends with a `GET` of the key, so a loss is noticed on the next write of any kind. Offsets thus
//! never restart at 0 under an old epoch. Redis must not evict keys (`maxmemory-policy
//! noeviction`): an evicted cursor would restart one log's offsets silently.
//!
//! # Batches and durability
//!
//! A batch from the store's group commit goes out as one pipeline (one round trip); a sweep
//! takes a few more. A write counts as done when Redis has applied it: how durable that is, is
//! Redis's own configuration (`appendonly yes` with `appendfsync always` for every acknowledged
//! push to survive a Redis crash; `everysec` may lose the last second). A batch that fails half
//! way (connection lost, Redis out of memory) may be partly applied; every op but an append is
//! safe to repeat, and a repeated append stores the push twice.
//!
//! # Connection
//!
//! One connection, used from the store thread only. A call that loses it fails with an error
//! naming the URL (its password redacted), and the next call connects again.

mod scripts;
mod write;

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::{Connection, ErrorKind, RedisError, RedisResult, Value};
use tracing::{info, warn};

use super::{new_epoch, Backend, LogRead, Op, Outcome, StoreError, StoredPush};
use crate::config::redact_url;
use crate::identity::TerminalId;
use crate::wire::{self, Session};
use scripts::Scripts;
use write::{apply_run, describe, expire_idle, sweep};

const PREFIX: &str = "handoff:v1:";
const EPOCH_KEY: &str = "handoff:v1:epoch";
const SWEEP_KEY: &str = "handoff:v1:sweep";
/// Terminals by when they were last seen (for [`Op::ExpireIdle`]).
const SEEN_KEY: &str = "handoff:v1:seen";
/// How long a key outlives the latest deadline it holds (clock skew between nodes and Redis).
const GRACE: u64 = 3600;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one reply (a sweep script over a large log included).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Log items fetched per round trip when reading.
const READ_PAGE: usize = 1024;
/// Keys swept per round trip, and the most rounds of one sweep (the rest waits for the next).
const SWEEP_PAGE: usize = 256;
const SWEEP_ROUNDS: usize = 64;
/// Times a batch is retried after the epoch changed or Redis forgot the scripts.
const RETRIES: usize = 3;

/// `id`'s key `what`, hash-tagged by `id`.
fn key(id: &TerminalId, what: &str) -> String {
    format!("{PREFIX}{{{id}}}:{what}")
}

/// Why a call failed: Redis (or the connection to it), or what came back.
enum Failure {
    Redis(RedisError),
    Other(String),
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Self {
        Failure::Redis(e)
    }
}

impl Failure {
    /// Whether the connection can no longer be trusted (it is gone, or replies may be out of
    /// step with requests), so the next call must connect again.
    fn breaks_connection(&self) -> bool {
        match self {
            Failure::Redis(e) => !matches!(
                e.kind(),
                ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::UnexpectedReturnType
            ),
            Failure::Other(_) => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Redis(e) => write!(f, "{e}"),
            Failure::Other(s) => f.write_str(s),
        }
    }
}

fn unexpected(what: &str, value: &Value) -> Failure {
    Failure::Other(format!("unexpected reply to {what}: {value:?}"))
}

/// The store in Redis. See the module documentation for the layout and its guarantees.
pub struct RedisBackend {
    /// The URL with its password redacted: the only form that appears in messages.
    shown: String,
    client: redis::Client,
    /// `None` after a failure that broke the connection; the next call connects again.
    conn: Mutex<Option<Connection>>,
    scripts: Scripts,
    epoch: u64,
}

impl RedisBackend {
    /// Connects to the Redis at `url` (`redis://`, `rediss://`, `redis+unix://`), loads the
    /// scripts and reads the epoch, creating it if this Redis has none.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let open_err = |reason: String| StoreError::Open {
            path: shown.clone(),
            reason,
        };
        let client = redis::Client::open(url).map_err(|e| open_err(e.to_string()))?;
        let scripts = Scripts::new();
        let mut slot = None;
        let conn = connect(&client, &scripts, &mut slot).map_err(|e| open_err(e.to_string()))?;
        let epoch = establish_epoch(conn).map_err(|e| open_err(e.to_string()))?;
        check_config(conn, &shown);
        Ok(Self {
            shown,
            client,
            conn: Mutex::new(slot),
            scripts,
            epoch,
        })
    }

    /// Runs a read on the connection (connecting first if needed).
    fn read<T>(
        &self,
        what: impl fmt::Display,
        f: impl FnOnce(&mut Connection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = connect(&self.client, &self.scripts, &mut slot)
            .map_err(Failure::from)
            .and_then(f);
        settle(&self.shown, &mut slot, what, result)
    }
}

/// The connection in `slot`, connecting (and loading the scripts) if there is none.
fn connect<'a>(
    client: &redis::Client,
    scripts: &Scripts,
    slot: &'a mut Option<Connection>,
) -> RedisResult<&'a mut Connection> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => {
            let mut conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            conn.set_write_timeout(Some(IO_TIMEOUT))?;
            scripts.load(&mut conn)?;
            conn
        }
    };
    Ok(slot.insert(conn))
}

/// Turns a call's result into the store's, dropping the connection if the failure broke it.
fn settle<T>(
    shown: &str,
    slot: &mut Option<Connection>,
    what: impl fmt::Display,
    result: Result<T, Failure>,
) -> Result<T, StoreError> {
    result.map_err(|e| {
        let lost = e.breaks_connection();
        if lost {
            *slot = None;
        }
        let again = if lost {
            " (the connection is dropped; the next call reconnects)"
        } else {
            ""
        };
        StoreError::Backend(format!("redis {shown}: {what}: {e}{again}"))
    })
}

/// The epoch in Redis, created if missing. `SET NX` makes concurrent nodes agree on one value.
fn establish_epoch(conn: &mut Connection) -> Result<u64, Failure> {
    for _ in 0..RETRIES {
        let (current,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(EPOCH_KEY)
            .arg(new_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(EPOCH_KEY)
            .query(conn)?;
        // Gone again between SET and GET only if Redis lost its data once more: try again.
        if let Some(text) = current {
            return parse_epoch(&text);
        }
    }
    Err(Failure::Other(format!(
        "{EPOCH_KEY} vanished {RETRIES} times right after it was set"
    )))
}

fn parse_epoch(text: &str) -> Result<u64, Failure> {
    text.parse::<u64>()
        .ok()
        .filter(|e| *e != 0)
        .ok_or_else(|| Failure::Other(format!("{EPOCH_KEY} holds {text:?}, not an epoch")))
}

/// Says what in Redis's configuration weakens this backend. Managed Redis often refuses
/// `CONFIG`; then nothing is said.
fn check_config(conn: &mut Connection, shown: &str) {
    let get = |conn: &mut Connection, name: &str| -> Option<String> {
        let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn).ok()?;
        pair.into_iter().nth(1)
    };
    if let Some(policy) = get(conn, "maxmemory-policy").filter(|p| p != "noeviction") {
        warn!(
            "redis {shown}: maxmemory-policy is {policy}; use noeviction, or an evicted log cursor \
             restarts that terminal's offsets"
        );
    }
    if get(conn, "appendonly").is_some_and(|a| a == "no") {
        info!(
            "redis {shown}: appendonly is off, so a Redis restart loses the push logs \
             (terminals are then told their window was lost)"
        );
    }
}

/// A batch, as error messages name it.
struct Batch<'a>(&'a [Op]);

impl fmt::Display for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a batch of {} write(s)", self.0.len())?;
        if let Some(first) = self.0.first() {
            write!(f, " starting with {}", describe(first))?;
        }
        f.write_str(" (some may have been applied)")
    }
}

/// One op's result within a batch: its outcome, or why it alone failed (the message, shown
/// URL included).
type OpResult = Result<Outcome, String>;

/// A log's `next` and `acked`, absent before its first append.
type Cursor = (Option<u64>, Option<u64>);

/// Decodes a log member: the offset (8 bytes, big-endian), then the item.
fn decode_item(member: &[u8]) -> Result<StoredPush, Failure> {
    let (offset, payload) = member
        .split_first_chunk::<8>()
        .ok_or_else(|| Failure::Other(format!("a log member of {} bytes", member.len())))?;
    let mut push: StoredPush = wire::decode_payload(payload)
        .map_err(|e| Failure::Other(format!("a log item does not decode: {e}")))?;
    push.item.offset = u64::from_be_bytes(*offset);
    Ok(push)
}

/// Terminals and deadlines from a `followers`/`following` set, those after `now`.
fn links(conn: &mut Connection, set: &str, now: u64) -> Result<Vec<(TerminalId, u64)>, Failure> {
    let members: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
        .arg(set)
        .arg(format!("({now}"))
        .arg("+inf")
        .arg("WITHSCORES")
        .query(conn)?;
    members
        .into_iter()
        .map(|(id, until)| {
            let id = id
                .parse()
                .map_err(|e| Failure::Other(format!("{set} holds {id:?}: {e}")))?;
            // Deadlines are whole seconds far below 2^53, so the score is exact.
            Ok((id, until as u64))
        })
        .collect()
}

impl Backend for RedisBackend {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let slot = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        let shown = self.shown.clone();
        let mut out: Vec<Option<OpResult>> = vec![None; ops.len()];
        // An op whose push or session no frame can carry is refused before anything is sent,
        // so it cannot be half applied.
        let mut send = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match op.check() {
                Ok(()) => send.push(i),
                Err(e) => out[i] = Some(Err(e.to_string())),
            }
        }
        let result = (|| {
            let conn = connect(&self.client, &self.scripts, slot)?;
            let run = |conn: &mut Connection, epoch: &mut u64, idx: &[usize]| {
                let run_ops: Vec<Op> = idx.iter().map(|&i| ops[i].clone()).collect();
                let mut done = vec![None; run_ops.len()];
                apply_run(conn, &self.scripts, &shown, epoch, &run_ops, &mut done)?;
                Ok::<_, Failure>(done)
            };
            // Runs between sweeps and follows go out as one pipeline each; a sweep takes its
            // own round trips, and a follow two (the nonce decides whether the rest happens).
            let mut pending: Vec<usize> = Vec::new();
            for &i in &send {
                let op = &ops[i];
                if !matches!(
                    op,
                    Op::Sweep { .. }
                        | Op::Follow { .. }
                        | Op::ExpireIdle { .. }
                        | Op::Link {
                            unless_revoked: Some(_),
                            ..
                        }
                ) {
                    pending.push(i);
                    continue;
                }
                let idx = std::mem::take(&mut pending);
                for (j, r) in idx.iter().zip(run(conn, &mut self.epoch, &idx)?) {
                    out[*j] = r;
                }
                if let Op::Sweep { now } = op {
                    sweep(conn, &self.scripts, *now)?;
                    out[i] = Some(Ok(Outcome::Done));
                    continue;
                }
                if let Op::ExpireIdle { now, seen_before } = op {
                    let n = expire_idle(conn, &self.scripts, *now, *seen_before)?;
                    out[i] = Some(Ok(Outcome::Expired(n)));
                    continue;
                }
                if let Op::Link { .. } = op {
                    out[i] = Some(link_checked(
                        conn,
                        &self.scripts,
                        &shown,
                        &mut self.epoch,
                        op,
                    )?);
                    continue;
                }
                let Some((use_nonce, link, append)) = super::follow_parts(op) else {
                    continue;
                };
                let mut fresh = [None];
                apply_run(
                    conn,
                    &self.scripts,
                    &shown,
                    &mut self.epoch,
                    std::slice::from_ref(&use_nonce),
                    &mut fresh,
                )?;
                match fresh[0].take() {
                    Some(Ok(Outcome::Fresh(Some(true)))) => {}
                    other => {
                        out[i] = other;
                        continue;
                    }
                }
                // The link checks the revocation again (one may have come since the nonce's
                // check); the session is copied only once it holds.
                match link_checked(conn, &self.scripts, &shown, &mut self.epoch, &link)? {
                    Ok(Outcome::Done) => {}
                    other => {
                        out[i] = Some(other);
                        continue;
                    }
                }
                let mut done = [None];
                if let Some(append) = append {
                    apply_run(
                        conn,
                        &self.scripts,
                        &shown,
                        &mut self.epoch,
                        std::slice::from_ref(&append),
                        &mut done,
                    )?;
                }
                out[i] = Some(match done[0].take() {
                    Some(Err(e)) => Err(e),
                    Some(Ok(Outcome::Offset(o))) => Ok(Outcome::Followed(Some(o))),
                    _ => Ok(Outcome::Followed(None)),
                });
            }
            let last: Vec<usize> = std::mem::take(&mut pending);
            for (j, r) in last.iter().zip(run(conn, &mut self.epoch, &last)?) {
                out[*j] = r;
            }
            Ok(())
        })();
        settle(&self.shown, slot, Batch(ops), result)?;
        Ok(out
            .into_iter()
            .map(|o| match o {
                Some(Ok(outcome)) => Ok(outcome),
                Some(Err(reason)) => Err(StoreError::Backend(reason)),
                None => Err(StoreError::Backend("redis: an op got no outcome".into())),
            })
            .collect())
    }

    fn known(&self, id: &TerminalId) -> Result<bool, StoreError> {
        self.read(format_args!("is {id} known"), |conn| {
            let n: i64 = redis::cmd("EXISTS").arg(key(id, "known")).query(conn)?;
            Ok(n > 0)
        })
    }

    fn seen(&self, id: &TerminalId) -> Result<Option<u64>, StoreError> {
        self.read(format_args!("when {id} was seen"), |conn| {
            // The score idle expiry reads (only ever raised), not `known`'s last write.
            let seen: Option<u64> = redis::cmd("ZSCORE")
                .arg(SEEN_KEY)
                .arg(id.to_string())
                .query(conn)?;
            Ok(seen)
        })
    }

    fn session(&self, id: &TerminalId) -> Result<Option<Session>, StoreError> {
        self.read(format_args!("the session of {id}"), |conn| {
            let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key(id, "session")).query(conn)?;
            bytes
                .map(|b| wire::decode_payload(&b))
                .transpose()
                .map_err(|e| Failure::Other(format!("the stored session does not decode: {e}")))
        })
    }

    fn followers(
        &self,
        first: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        self.read(format_args!("followers of {first}"), |conn| {
            links(conn, &key(first, "followers"), now)
        })
    }

    fn following(
        &self,
        second: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        self.read(format_args!("terminals {second} follows"), |conn| {
            links(conn, &key(second, "following"), now)
        })
    }

    fn link_since(
        &self,
        first: &TerminalId,
        second: &TerminalId,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.read(format_args!("the link of {second} to {first}"), |conn| {
            let (until, since): (Option<u64>, Option<u64>) = redis::pipe()
                .cmd("ZSCORE")
                .arg(key(first, "followers"))
                .arg(second.to_string())
                .cmd("HGET")
                .arg(key(first, "since"))
                .arg(second.to_string())
                .query(conn)?;
            Ok(until
                .filter(|until| *until > now)
                .map(|_| since.unwrap_or(0)))
        })
    }

    fn log(
        &self,
        to: &TerminalId,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<LogRead, StoreError> {
        self.read(format_args!("the log of {to}"), |conn| {
            if limit == 0 {
                // Only the cursor (how the server learns where a log ends).
                let (next, acked): Cursor = redis::cmd("HMGET")
                    .arg(key(to, "cursor"))
                    .arg("next")
                    .arg("acked")
                    .query(conn)?;
                return Ok(LogRead {
                    items: Vec::new(),
                    acked: acked.unwrap_or(0),
                    next: next.unwrap_or(0),
                });
            }
            let page = limit.min(READ_PAGE);
            let log = key(to, "log");
            // Cursor and first page in one transaction, so they agree.
            let (cursor, mut members): (Cursor, Vec<Vec<u8>>) = redis::pipe()
                .atomic()
                .cmd("HMGET")
                .arg(key(to, "cursor"))
                .arg("next")
                .arg("acked")
                .cmd("ZRANGEBYSCORE")
                .arg(&log)
                .arg(from)
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(page)
                .query(conn)?;
            let mut items = Vec::new();
            loop {
                let full = members.len() == page;
                let mut last = None;
                for member in &members {
                    let push = decode_item(member)?;
                    last = Some(push.item.offset);
                    if push.expires_at > now && items.len() < limit {
                        items.push(push);
                    }
                }
                // More only if this page was full and expired items left room.
                let Some(last) = last.filter(|_| full && items.len() < limit) else {
                    break;
                };
                members = redis::cmd("ZRANGEBYSCORE")
                    .arg(&log)
                    .arg(format!("({last}"))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(page)
                    .query(conn)?;
            }
            let (next, acked) = cursor;
            Ok(LogRead {
                items,
                acked: acked.unwrap_or(0),
                next: next.unwrap_or(0),
            })
        })
    }
}

/// Applies a link that checks the first terminal's revocations ([`Op::Link`] with
/// `unless_revoked`). The first terminal's side decides in one script; the second's side goes
/// in the same pipeline (another slot), so when the first refused it is undone.
fn link_checked(
    conn: &mut Connection,
    scripts: &Scripts,
    shown: &str,
    epoch: &mut u64,
    link: &Op,
) -> Result<OpResult, Failure> {
    let mut linked = [None];
    apply_run(
        conn,
        scripts,
        shown,
        epoch,
        std::slice::from_ref(link),
        &mut linked,
    )?;
    let result = linked[0]
        .take()
        .unwrap_or_else(|| Err(format!("redis {shown}: the link had no answer")));
    if let (Ok(Outcome::Revoked), Op::Link { first, second, .. }) = (&result, link) {
        let unlink = Op::Unlink {
            first: *first,
            second: *second,
        };
        let mut undone = [None];
        apply_run(conn, scripts, shown, epoch, &[unlink], &mut undone)?;
        if let Some(Err(e)) = undone[0].take() {
            return Ok(Err(e));
        }
    }
    Ok(result)
}
