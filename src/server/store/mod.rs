//! The server's state behind one trait (DESIGN §6): sessions, known terminals, links, used ticket
//! nonces, revocations, and a per-recipient push log with monotonic offsets inside an epoch.
//!
//! Fan-out on read: what all of a terminal's followers receive (its session changes, a
//! publisher's push to its followers) is appended once, to that terminal's *stream*: a log like
//! any other, kept under [`stream_key`] of its owner, read by every follower's connection from
//! a cursor of its own and never acknowledged (items leave it by collapse or expiry). A link
//! records where in the first terminal's stream it began (`since`), so a follower never reads
//! what was streamed before it followed.
//!
//! Backends implement [`Backend`] with operations that are each atomic on their own and never
//! span recipients (so a Redis backend can implement them as scripts on hash-tagged keys). The
//! [`Store`] actor owns the backend on a dedicated thread and applies every run of consecutive
//! writes in one commit: many pushes share one fsync (group commit), and a write's future
//! resolves only once that commit is durable. Each op is checked before it joins a batch
//! ([`Op::check`]), and an op that still fails in the backend fails alone: the writes sharing
//! its commit are applied without it ([`Backend::apply_each`]).
//!
//! A terminal's acknowledgements are not worth an fsync each: losing one only means its pushes
//! are sent again, and the terminal's inbox drops what it already has. [`Store::ack`] hands one
//! to the store thread without waiting; acknowledgements are kept there, one per terminal (the
//! highest), and applied with the next commit of writes, before the next read, at close, or at
//! the latest [`ACK_FLUSH`] after they came.
//!
//! The epoch can change while the store runs: a Redis backend notices when Redis lost its data
//! and starts a new epoch, and [`Store::epoch`] follows it after every batch.

mod embedded;
mod memory;
mod redis;

#[cfg(test)]
mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::identity::TerminalId;
use crate::wire::{self, PushItem, ServerPush, Session};

pub use embedded::EmbeddedBackend;
pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// Messages queued for the store thread before senders wait.
const QUEUE: usize = 65_536;
/// Most write operations applied in one commit.
const MAX_BATCH: usize = 4096;
/// Longest an acknowledgement waits in the store thread for a commit to join.
pub const ACK_FLUSH: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store: {0}")]
    Backend(String),
    #[error("the store has stopped")]
    Stopped,
    /// A write refused before it reached the backend: what it stores would not fit a frame on
    /// its way to the terminal. Nothing was changed.
    #[error(
        "{what} too large: pushed to a terminal it takes up to {size} bytes, over the \
         {limit}-byte frame limit"
    )]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
}

impl StoreError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// A push as the log keeps it: the item as sent, and what the log needs to manage it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPush {
    pub item: PushItem,
    /// Unix seconds after which the item is no longer delivered.
    pub expires_at: u64,
    pub collapse_key: Option<String>,
}

/// A push to append; the store assigns its offset.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPush {
    pub from: Option<TerminalId>,
    pub uri: String,
    pub title: String,
    pub body: Option<String>,
    pub position: Option<f64>,
    pub meta: BTreeMap<String, String>,
    pub ttl: Duration,
    /// A newer push with the same key replaces an older one not yet acknowledged.
    pub collapse_key: Option<String>,
}

impl NewPush {
    /// The push that carries `from`'s session; sessions collapse per sender.
    pub fn session(from: TerminalId, session: &Session, ttl: Duration) -> Self {
        Self {
            from: Some(from),
            uri: session.uri.clone(),
            title: session.title.clone(),
            body: None,
            position: session.position,
            meta: session.meta.clone(),
            ttl,
            collapse_key: Some(format!("session:{from}")),
        }
    }

    /// An upper bound on what this push takes on the wire and when decoded, whatever offset and
    /// expiry it gets: bincode needs at most 9 bytes for a length or a `u64` and claims 8 when
    /// decoding, so each string counts 9 bytes more than its text, and the fixed fields (offset,
    /// sender, options, position, expiry, variant tags) fit in 128.
    pub(crate) fn size_bound(&self) -> usize {
        let strings = [
            Some(&self.uri),
            Some(&self.title),
            self.body.as_ref(),
            self.collapse_key.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(self.meta.iter().flat_map(|(k, v)| [k, v]));
        128 + strings.map(|s| 9 + s.len()).sum::<usize>()
    }

    /// Checks that this push fits every frame and store limit on its way to the terminal,
    /// whatever offset and expiry it gets: the log's record and the push frame both encode and
    /// decode within [`wire::MAX_FRAME`]. Small pushes pass on [`NewPush::size_bound`] alone.
    pub fn check_size(&self, what: &'static str) -> Result<(), StoreError> {
        let bound = self.size_bound();
        if bound <= wire::MAX_FRAME {
            return Ok(());
        }
        let worst = self.stored(u64::MAX, u64::MAX);
        let record = wire::encode_payload(&worst)
            .and_then(|bytes| wire::decode_payload::<StoredPush>(&bytes));
        let frame = wire::encode_frame(&ServerPush::Item(worst.item.clone()))
            .and_then(|bytes| wire::decode_frame::<ServerPush>(&bytes));
        match (record, frame) {
            (Ok(_), Ok(_)) => Ok(()),
            _ => Err(StoreError::TooLarge {
                what,
                size: bound,
                limit: wire::MAX_FRAME,
            }),
        }
    }

    /// [`NewPush::stored`], taking the push instead of copying it.
    pub(crate) fn into_stored(self, offset: u64, now: u64) -> StoredPush {
        StoredPush {
            item: PushItem {
                offset,
                from: self.from,
                uri: self.uri,
                title: self.title,
                body: self.body,
                position: self.position,
                meta: self.meta,
            },
            expires_at: now.saturating_add(self.ttl.as_secs().max(1)),
            collapse_key: self.collapse_key,
        }
    }

    pub(crate) fn stored(&self, offset: u64, now: u64) -> StoredPush {
        StoredPush {
            item: PushItem {
                offset,
                from: self.from,
                uri: self.uri.clone(),
                title: self.title.clone(),
                body: self.body.clone(),
                position: self.position,
                meta: self.meta.clone(),
            },
            expires_at: now.saturating_add(self.ttl.as_secs().max(1)),
            collapse_key: self.collapse_key.clone(),
        }
    }
}

/// One write; each is atomic on its own.
#[derive(Debug, Clone)]
pub enum Op {
    /// Marks a terminal as seen at `now` (the HTTP API answers 404 for terminals not known).
    /// The latest time counts: it is what [`Op::ExpireIdle`] judges.
    Touch { id: TerminalId, now: u64 },
    SetSession {
        id: TerminalId,
        session: Option<Session>,
    },
    /// Links `second` to `first` until `until`; `since` is where in `first`'s stream the
    /// link begins (the stream's end when the link was made, kept when a live link is renewed).
    /// With `unless_revoked` (a follow's ticket's issue time), no link is made if `first`
    /// revoked `second`'s tickets issued at or before it ([`Outcome::Revoked`]): checked in the
    /// same step as the link, so that a backend that makes a follow in steps (the nonce, then
    /// the link) never links after a revocation that came between them.
    Link {
        first: TerminalId,
        second: TerminalId,
        until: u64,
        since: u64,
        unless_revoked: Option<u64>,
    },
    Unlink {
        first: TerminalId,
        second: TerminalId,
    },
    /// Records a ticket nonce of `first`'s (`capacity` live ones per first terminal);
    /// `Fresh(false)` if it was used before, [`Outcome::Revoked`] if `first` revoked `second`'s
    /// tickets issued at or before `issued_at` (then nothing is recorded).
    UseNonce {
        first: TerminalId,
        second: TerminalId,
        issued_at: u64,
        nonce: [u8; 16],
        not_after: u64,
        now: u64,
        capacity: usize,
    },
    /// `first` revokes `second`: ends the link and refuses every ticket `first` issued for
    /// `second` at or before `at` (by `first`'s clock), remembered until `keep_until` (by the
    /// server's, when every such ticket has expired). Answers whether a link was removed, or
    /// [`Outcome::Full`] when `first` has `capacity` revocations stored already and none for
    /// `second` (each names a second of `first`'s choosing): then the link is ended all the
    /// same (that stores nothing), but the revocation is not recorded.
    Revoke {
        first: TerminalId,
        second: TerminalId,
        at: u64,
        keep_until: u64,
        capacity: usize,
        /// Revocations kept until `now` or earlier no longer count.
        now: u64,
    },
    /// A follow request with a checked ticket, as one atomic step: uses the ticket's nonce
    /// (as [`Op::UseNonce`]); only if it was fresh, links `second` to `first` until `until`
    /// and appends `push` (the first terminal's current session) to `second`'s log. Answers
    /// [`Outcome::Followed`], or the nonce's [`Outcome::Fresh`] refusal with nothing changed.
    /// One commit instead of two on the warm pull's path.
    Follow {
        first: TerminalId,
        second: TerminalId,
        issued_at: u64,
        nonce: [u8; 16],
        not_after: u64,
        until: u64,
        /// As for [`Op::Link`].
        since: u64,
        now: u64,
        capacity: usize,
        push: Option<NewPush>,
    },
    /// Appends to `to`'s log; an older unacknowledged item with the same collapse key is removed.
    Append {
        to: TerminalId,
        push: NewPush,
        now: u64,
    },
    /// `to` has everything below `next`: those items may go.
    Ack { to: TerminalId, next: u64 },
    /// Drops expired items, links, nonces and revocations.
    Sweep { now: u64 },
    /// Forgets terminals last seen before `seen_before` that have no link alive at `now`, as
    /// first or second: their known-terminal entry and their session (their push log keeps
    /// its cursor, so offsets never restart). Answers [`Outcome::Expired`] with how many.
    ExpireIdle { now: u64, seen_before: u64 },
}

/// The parts of an [`Op::Follow`]: the nonce use that decides, and what follows if it is fresh.
pub(crate) fn follow_parts(op: &Op) -> Option<(Op, Op, Option<Op>)> {
    let Op::Follow {
        first,
        second,
        issued_at,
        nonce,
        not_after,
        until,
        since,
        now,
        capacity,
        push,
    } = op
    else {
        return None;
    };
    let use_nonce = Op::UseNonce {
        first: *first,
        second: *second,
        issued_at: *issued_at,
        nonce: *nonce,
        not_after: *not_after,
        now: *now,
        capacity: *capacity,
    };
    let link = Op::Link {
        first: *first,
        second: *second,
        until: *until,
        since: *since,
        unless_revoked: Some(*issued_at),
    };
    let append = push.clone().map(|push| Op::Append {
        to: *second,
        push,
        now: *now,
    });
    Some((use_nonce, link, append))
}

impl Op {
    /// Checks what this op would store against the limits on its way to a terminal, before it
    /// joins a batch: a push, and a session (as the push its followers get), must fit a frame.
    pub fn check(&self) -> Result<(), StoreError> {
        match self {
            Op::Append { push, .. } => push.check_size("push"),
            Op::SetSession {
                id,
                session: Some(session),
            } => NewPush::session(*id, session, Duration::ZERO).check_size("session"),
            Op::Follow {
                push: Some(push), ..
            } => push.check_size("the first terminal's session"),
            _ => Ok(()),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Offset(u64),
    Removed(bool),
    /// For `UseNonce`: `Some(true)` fresh, `Some(false)` replayed, `None` cache full. For
    /// `Follow`, the refusals (`Some(false)`, `None`).
    Fresh(Option<bool>),
    /// For `Follow`: linked; the offset of the session push, if there was one.
    Followed(Option<u64>),
    /// For `UseNonce` and `Follow`: the first terminal revoked this ticket; nothing changed.
    Revoked,
    /// For `ExpireIdle`: how many terminals were forgotten.
    Expired(u64),
    /// For `Revoke`: the first terminal has as many revocations stored as it may; the link
    /// was ended, the revocation not recorded.
    Full,
}

/// A slice of a recipient's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRead {
    /// Live items with offset ≥ the requested start, in order.
    pub items: Vec<StoredPush>,
    /// Everything below this was acknowledged (and may be gone).
    pub acked: u64,
    /// The offset the next append will get.
    pub next: u64,
}

/// A storage backend. Writes come in batches that the backend makes durable together.
pub trait Backend: Send + 'static {
    /// The epoch of the push logs: a new value whenever they were lost (a new store, or a
    /// Redis that lost its data). It may change after [`Backend::apply`], never elsewhere.
    fn epoch(&self) -> u64;
    /// Applies `ops` in order and makes them durable before returning, each op on its own: an
    /// op that fails answers `Err` in its place, changes nothing, and the others are applied as
    /// if it were not there. `Err` for the whole call: the batch as such failed (a commit, a
    /// lost connection). An empty batch is how a shared backend (Redis) is asked to check that
    /// its data is still there (the epoch).
    fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError>;
    /// [`Backend::apply_each`], failing if any op failed.
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Outcome>, StoreError> {
        self.apply_each(ops)?.into_iter().collect()
    }
    fn known(&self, id: &TerminalId) -> Result<bool, StoreError>;
    /// When `id` was last marked seen ([`Op::Touch`], Unix s), if it is known.
    fn seen(&self, id: &TerminalId) -> Result<Option<u64>, StoreError>;
    fn session(&self, id: &TerminalId) -> Result<Option<Session>, StoreError>;
    /// Terminals following `first` with links alive at `now`.
    fn followers(&self, first: &TerminalId, now: u64)
        -> Result<Vec<(TerminalId, u64)>, StoreError>;
    /// Terminals `second` follows with links alive at `now`.
    fn following(
        &self,
        second: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError>;
    /// Where in `first`'s stream the link of `second` began, if that link is alive at `now`.
    fn link_since(
        &self,
        first: &TerminalId,
        second: &TerminalId,
        now: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// Up to `limit` live items of `to`'s log from offset `from` (`to` may be a
    /// [`stream_key`]).
    fn log(
        &self,
        to: &TerminalId,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<LogRead, StoreError>;
}

type ReadFn = Box<dyn FnOnce(&dyn Backend) + Send>;

enum Msg {
    Write {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
    },
    Read(ReadFn),
    /// A terminal acknowledged its log up to `next` (see [`Store::ack`]).
    Ack {
        to: TerminalId,
        next: u64,
    },
    /// Apply the acknowledgements held (sent by the store's ticker).
    FlushAcks,
    /// Finish the queue before this, drop the backend, confirm.
    Close(oneshot::Sender<()>),
}

/// A handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Msg>,
    /// The backend's epoch as of its last batch; the store thread keeps it current.
    epoch: Arc<AtomicU64>,
}

impl Store {
    /// Starts the store thread over `backend`.
    pub fn start(backend: Box<dyn Backend>) -> Self {
        let epoch = Arc::new(AtomicU64::new(backend.epoch()));
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread_epoch = epoch.clone();
        let acks_held = Arc::new(AtomicBool::new(false));
        let held = acks_held.clone();
        std::thread::Builder::new()
            .name("handoff-store".into())
            .spawn(move || run(backend, rx, &thread_epoch, &held))
            .unwrap_or_else(|e| panic!("cannot start the store thread: {e}"));
        // Flushes held acknowledgements when no write comes to carry them. It sleeps while
        // none are held, and ends once the store thread has (its sends fail).
        let ticker = tx.downgrade();
        std::thread::Builder::new()
            .name("handoff-store-acks".into())
            .spawn(move || loop {
                std::thread::sleep(ACK_FLUSH);
                let Some(tx) = ticker.upgrade() else {
                    return;
                };
                if acks_held.load(Ordering::Acquire) && tx.try_send(Msg::FlushAcks).is_err() {
                    // A full queue will commit soon and carry the acknowledgements along.
                    if tx.is_closed() {
                        return;
                    }
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the store's acknowledgement ticker: {e}"));
        Self { tx, epoch }
    }

    /// Opens the backend named by the config.
    pub fn open(kind: &crate::config::StoreKind, state_dir: &Path) -> Result<Self, StoreError> {
        let backend: Box<dyn Backend> = match kind {
            crate::config::StoreKind::Memory => Box::new(MemoryBackend::new()),
            crate::config::StoreKind::Embedded => {
                crate::identity::create_state_dir(state_dir).map_err(|e| StoreError::Open {
                    path: state_dir.display().to_string(),
                    reason: e.to_string(),
                })?;
                Box::new(EmbeddedBackend::open(&state_dir.join("store.redb"))?)
            }
            crate::config::StoreKind::Redis { url } => {
                Box::new(RedisBackend::open(url.expose_secret())?)
            }
        };
        Ok(Self::start(backend))
    }

    /// The push logs' current epoch. It changes only when the backend lost its logs (Redis).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Applies writes; resolves once they are durable. Cancel-safe (the writes still happen).
    /// Each op is checked first ([`Op::check`]); one that would not fit its limits fails the
    /// write before anything is queued. An op that fails in the backend fails this write only,
    /// never the others sharing its commit; this write's other ops, each atomic on its own, may
    /// then have been applied.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
        for op in &ops {
            op.check()?;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Write { ops, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Writes each op on its own: one failing (its check, or in the backend) fails alone. Ops
    /// queued together still share a commit.
    pub async fn write_each(&self, ops: Vec<Op>) -> Vec<Result<Outcome, StoreError>> {
        let mut waiting = Vec::with_capacity(ops.len());
        for op in ops {
            if let Err(e) = op.check() {
                waiting.push(Err(e));
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let sent = self.tx.send(Msg::Write {
                ops: vec![op],
                reply,
            });
            waiting.push(match sent.await {
                Ok(()) => Ok(rx),
                Err(_) => Err(StoreError::Stopped),
            });
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for w in waiting {
            outcomes.push(match w {
                Ok(rx) => match rx.await {
                    Ok(Ok(mut out)) => out.pop().ok_or(StoreError::Stopped),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::Stopped),
                },
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    pub async fn write_one(&self, op: Op) -> Result<Outcome, StoreError> {
        self.write(vec![op]).await?.pop().ok_or(StoreError::Stopped)
    }

    /// Records that `to` has received its log up to `next`, without waiting: the store applies
    /// it (trims the log, raises the acknowledged offset) with a later commit, at the latest
    /// [`ACK_FLUSH`] from now. One lost in a crash only means pushes sent again. Never blocks:
    /// `false` when the queue is full and the acknowledgement was not taken (a later, higher one
    /// carries it).
    pub fn ack(&self, to: TerminalId, next: u64) -> bool {
        match self.tx.try_send(Msg::Ack { to, next }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }

    /// Applies everything queued, then closes the backend (releasing its file). Later calls
    /// fail with [`StoreError::Stopped`].
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Runs a read on the store thread. It sees every write whose future has resolved.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job: ReadFn = Box::new(move |b| {
            let _ = reply.send(f(b));
        });
        self.tx
            .send(Msg::Read(job))
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// The store thread: applies queued writes as one batch (one commit), with the acknowledgements
/// held. Reads are answered as they come, also while a batch is being gathered: a read sees
/// every write its caller has seen complete, and every acknowledgement sent before it, and never
/// holds a batch back.
fn run(
    mut backend: Box<dyn Backend>,
    mut rx: mpsc::Receiver<Msg>,
    epoch: &AtomicU64,
    acks_held: &AtomicBool,
) {
    let mut acks: HashMap<TerminalId, u64> = HashMap::new();
    loop {
        let Some(first) = rx.blocking_recv() else {
            // Every handle is gone: keep what was acknowledged.
            if !acks.is_empty() {
                apply_acks(backend.as_mut(), &mut acks, epoch);
            }
            return;
        };
        let mut ops_all = Vec::new();
        let mut replies = Vec::new();
        let mut close = None;
        let mut flush = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Read(job) => {
                    if !acks.is_empty() {
                        apply_acks(backend.as_mut(), &mut acks, epoch);
                    }
                    job(backend.as_ref())
                }
                Msg::Write { ops, reply } => {
                    replies.push((reply, ops.len()));
                    ops_all.extend(ops);
                }
                Msg::Ack { to, next } => {
                    let held = acks.entry(to).or_insert(next);
                    *held = (*held).max(next);
                }
                Msg::FlushAcks => flush = true,
                Msg::Close(reply) => {
                    close = Some(reply);
                    break;
                }
            }
            if ops_all.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !replies.is_empty() {
            // The held acknowledgements join this commit; their outcomes are nobody's.
            let held = acks.len();
            if held > 0 {
                let mut with_acks: Vec<Op> = acks
                    .drain()
                    .map(|(to, next)| Op::Ack { to, next })
                    .collect();
                with_acks.append(&mut ops_all);
                ops_all = with_acks;
            }
            let applied = backend.apply_each(&ops_all);
            // Before the replies go out, so a caller that saw its write done sees the epoch
            // the write was made in.
            epoch.store(backend.epoch(), Ordering::Release);
            match applied {
                Ok(results) => {
                    // Each write gets its own ops' results: it fails if one of them failed.
                    let mut results = results.into_iter().skip(held);
                    for (reply, n) in replies {
                        let mine: Vec<_> = results.by_ref().take(n).collect();
                        let _ = reply.send(mine.into_iter().collect());
                    }
                }
                Err(e) => {
                    for (reply, _) in replies {
                        let _ = reply.send(Err(StoreError::Backend(e.to_string())));
                    }
                }
            }
        } else if (flush || close.is_some()) && !acks.is_empty() {
            apply_acks(backend.as_mut(), &mut acks, epoch);
        }
        acks_held.store(!acks.is_empty(), Ordering::Release);
        if let Some(reply) = close {
            drop(backend);
            let _ = reply.send(());
            return;
        }
    }
}

/// Applies the acknowledgements held, in a commit of their own.
fn apply_acks(backend: &mut dyn Backend, acks: &mut HashMap<TerminalId, u64>, epoch: &AtomicU64) {
    let ops: Vec<Op> = acks
        .drain()
        .map(|(to, next)| Op::Ack { to, next })
        .collect();
    // Nobody waits for these: a failure only means the pushes are sent again.
    if let Err(e) = backend.apply_each(&ops) {
        tracing::debug!("store: acknowledgements not applied: {e}");
    }
    epoch.store(backend.epoch(), Ordering::Release);
}

/// The key under which the stream of `owner` is kept: a log like a terminal's, whose key no
/// terminal can hold (a hash, not a public key anyone has the private key of), so nobody can
/// connect as it, and the HTTP API never knows it (it is never marked seen).
pub fn stream_key(owner: &TerminalId) -> TerminalId {
    let mut input = b"handoff stream\0".to_vec();
    input.extend_from_slice(owner.as_bytes());
    let hash = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut bytes = [0; 32];
    bytes.copy_from_slice(hash.as_ref());
    TerminalId::from_bytes(bytes)
}

/// A random epoch for a new store.
pub(crate) fn new_epoch() -> u64 {
    // Never 0, so "no epoch" stays distinguishable.
    rand::random::<u64>().max(1)
}
