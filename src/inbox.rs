//! The inbox: every push this terminal received, oldest first, in `state_dir/inbox.jsonl`.
//!
//! One JSON object per line, appended and fsynced before the push is shown anywhere else or
//! acknowledged to the server. Each line records the server and the epoch/offset of the push, so
//! a push the server sends again (after a crash or reconnect) is recognised and not delivered
//! twice: the cursors are rebuilt from the file at start. A push that came on the stream of a
//! followed terminal (fan-out on read) records that terminal too: each stream has a cursor of
//! its own. A crash can leave a torn last line; reading skips it.
//!
//! A push that repeats the newest kept push from the same terminal — the same session pushed
//! again because it was pulled again or its follow renewed, with nothing changed — is kept once:
//! the inbox is a history of what was shown, and a second identical entry tells the user
//! nothing. It is still delivered (to `pull`, `watch` and the hook); only a cursor line is
//! written for it, so it is known as delivered across restarts. A change of anything (uri,
//! title, body, position, meta) is a new entry, and so is going back to an earlier session.
//! Publishers' pushes are always kept: the same news pushed twice may be meant twice.
//!
//! The inbox is bounded (`[limits] max_inbox_items`, `max_inbox_bytes`): it keeps the newest
//! pushes and drops the oldest. Once the file holds a quarter more than the limits allow, it is
//! rewritten (atomically, through [`crate::files::write_private_file`]) with the newest pushes
//! that fit, followed by one cursor line per server, so the pushes dropped are never delivered
//! again. Listing shows the newest pushes within the limits even before that rewrite.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::control::PushRecord;
use crate::identity::{ServerId, TerminalId};
use crate::wire::{Cursor, StreamCursor};

pub const INBOX_FILE: &str = "inbox.jsonl";

#[derive(Debug, thiserror::Error)]
#[error("inbox {path}: {source}")]
pub struct InboxError {
    path: PathBuf,
    source: std::io::Error,
}

/// One line of the inbox file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    push: PushRecord,
    server: String,
    epoch: u64,
    /// The followed terminal whose stream carried the push; absent for the terminal's own log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
}

/// Where a push came from at a server: this terminal's own log (`None`), or the stream of a
/// terminal it follows.
type LogKey = (ServerId, Option<TerminalId>);

/// Parses the server and stream named in a line; `None` if either does not parse.
fn log_key(server: &str, stream: Option<&str>) -> Option<LogKey> {
    let server = server.parse().ok()?;
    match stream {
        None => Some((server, None)),
        Some(stream) => Some((server, Some(stream.parse().ok()?))),
    }
}

/// A line written when the file is rewritten: where a server's log left off, so pushes dropped
/// from the file are still known as delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorLine {
    cursor_server: String,
    cursor_epoch: u64,
    cursor_next: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor_stream: Option<String>,
}

/// A parsed line of the inbox file.
enum Line {
    Entry(Entry, u64),
    Cursor(CursorLine),
}

/// How much the inbox keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    pub max_items: usize,
    pub max_bytes: u64,
}

/// What [`Inbox::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// The push was not delivered before (and is now kept).
    pub fresh: bool,
    /// Old pushes dropped by the rewrite this append caused.
    pub dropped: usize,
    /// The limit that made the rewrite drop them: `"max_inbox_items"` or `"max_inbox_bytes"`.
    pub limit: Option<&'static str>,
    /// The push repeats the newest kept push from the same terminal, so it was not kept a
    /// second time (it is fresh all the same: deliver it).
    pub repeat: bool,
}

/// Cursor lines (one per repeated push) the file may gather beyond one per server before it is
/// rewritten.
const MAX_EXTRA_CURSOR_LINES: usize = 64;

#[derive(Debug)]
struct State {
    file: File,
    /// Per server and stream: the epoch and the next offset not yet delivered.
    cursors: HashMap<LogKey, Cursor>,
    /// The size in bytes of each push in the file, oldest first.
    sizes: VecDeque<u64>,
    /// Their sum.
    bytes: u64,
    /// Per sending terminal: the newest push from it in the file, to recognise a repeat.
    latest: HashMap<String, PushRecord>,
    /// Cursor lines in the file.
    cursor_lines: usize,
}

impl State {
    /// How many of the newest pushes fit the limits.
    fn kept(&self, limits: InboxLimits) -> usize {
        newest_within(self.sizes.iter().copied(), limits)
    }

    /// The limit the pushes in the file exceed, if any.
    fn exceeded(&self, limits: InboxLimits) -> Option<&'static str> {
        if self.sizes.len() > limits.max_items {
            Some("max_inbox_items")
        } else if self.bytes > limits.max_bytes {
            Some("max_inbox_bytes")
        } else {
            None
        }
    }

    /// Whether `push` repeats the newest kept push from its terminal (all but the offset).
    fn repeats(&self, push: &PushRecord) -> bool {
        let Some(from) = &push.from else {
            return false;
        };
        self.latest.get(from).is_some_and(|last| {
            let PushRecord {
                from: _,
                uri,
                title,
                body,
                position,
                meta,
                offset: _,
            } = last;
            *uri == push.uri
                && *title == push.title
                && *body == push.body
                && *position == push.position
                && *meta == push.meta
        })
    }

    /// Remembers `push` as the newest from its terminal.
    fn note_latest(&mut self, push: &PushRecord) {
        if let Some(from) = &push.from {
            self.latest.insert(from.clone(), push.clone());
        }
    }
}

#[derive(Debug)]
pub struct Inbox {
    path: PathBuf,
    limits: InboxLimits,
    state: Mutex<State>,
}

impl Inbox {
    pub fn open(state_dir: &Path, limits: InboxLimits) -> Result<Self, InboxError> {
        let path = state_dir.join(INBOX_FILE);
        let err = |source| InboxError {
            path: path.clone(),
            source,
        };
        let mut file = open_append(&path).map_err(err)?;
        // End a line torn by a crash, so the next append starts a line of its own.
        let len = file.metadata().map_err(err)?.len();
        let mut last = [b'\n'];
        if len > 0 {
            std::os::unix::fs::FileExt::read_exact_at(
                &File::open(&path).map_err(err)?,
                &mut last,
                len - 1,
            )
            .map_err(err)?;
        }
        if last[0] != b'\n' {
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(err)?;
        }
        let mut cursors: HashMap<LogKey, Cursor> = HashMap::new();
        let mut sizes = VecDeque::new();
        let mut latest = HashMap::new();
        let mut cursor_lines = 0;
        for line in read_lines(&path).map_err(err)? {
            let (key, epoch, next) = match line {
                Line::Entry(entry, size) => {
                    sizes.push_back(size);
                    if let Some(from) = &entry.push.from {
                        latest.insert(from.clone(), entry.push.clone());
                    }
                    (
                        log_key(&entry.server, entry.stream.as_deref()),
                        entry.epoch,
                        entry.push.offset + 1,
                    )
                }
                Line::Cursor(c) => {
                    cursor_lines += 1;
                    (
                        log_key(&c.cursor_server, c.cursor_stream.as_deref()),
                        c.cursor_epoch,
                        c.cursor_next,
                    )
                }
            };
            let Some(key) = key else {
                continue;
            };
            let cursor = cursors.entry(key).or_insert(Cursor { epoch, next });
            if cursor.epoch != epoch {
                // A later epoch in the file supersedes the earlier one.
                *cursor = Cursor { epoch, next };
            } else {
                cursor.next = cursor.next.max(next);
            }
        }
        let bytes = sizes.iter().sum();
        Ok(Self {
            path,
            limits,
            state: Mutex::new(State {
                file,
                cursors,
                sizes,
                bytes,
                latest,
                cursor_lines,
            }),
        })
    }

    /// Where this terminal's log at `server` left off.
    pub fn cursor(&self, server: &ServerId) -> Option<Cursor> {
        self.lock().cursors.get(&(*server, None)).copied()
    }

    /// Where the streams of the terminals followed at `server` left off.
    pub fn stream_cursors(&self, server: &ServerId) -> Vec<StreamCursor> {
        self.lock()
            .cursors
            .iter()
            .filter_map(|((s, stream), c)| {
                let owner = stream.filter(|_| s == server)?;
                Some(StreamCursor {
                    owner,
                    epoch: c.epoch,
                    next: c.next,
                })
            })
            .collect()
    }

    /// Keeps `push` (from `server`, in `epoch`) durably, unless it was delivered before or
    /// repeats the newest push kept from its terminal (then only its cursor is kept), and drops
    /// the oldest pushes when the file has grown past the limits. Blocking: call from a blocking
    /// context.
    pub fn append(
        &self,
        server: &ServerId,
        stream: Option<&TerminalId>,
        epoch: u64,
        push: &PushRecord,
    ) -> Result<Appended, InboxError> {
        let key = (*server, stream.copied());
        let mut state = self.lock();
        if let Some(cursor) = state.cursors.get(&key) {
            if cursor.epoch == epoch && push.offset < cursor.next {
                return Ok(Appended::default());
            }
        }
        let repeat = state.repeats(push);
        let mut line = if repeat {
            serde_json::to_vec(&CursorLine {
                cursor_server: server.to_string(),
                cursor_epoch: epoch,
                cursor_next: push.offset + 1,
                cursor_stream: stream.map(|s| s.to_string()),
            })
        } else {
            serde_json::to_vec(&Entry {
                push: push.clone(),
                server: server.to_string(),
                epoch,
                stream: stream.map(|s| s.to_string()),
            })
        }
        .unwrap_or_default();
        line.push(b'\n');
        (&state.file)
            .write_all(&line)
            .and_then(|()| state.file.sync_data())
            .map_err(|source| InboxError {
                path: self.path.clone(),
                source,
            })?;
        state.cursors.insert(
            key,
            Cursor {
                epoch,
                next: push.offset + 1,
            },
        );
        if repeat {
            state.cursor_lines += 1;
        } else {
            let size = line.len() as u64;
            state.sizes.push_back(size);
            state.bytes += size;
            state.note_latest(push);
        }
        let mut appended = Appended {
            fresh: true,
            repeat,
            ..Appended::default()
        };
        let limits = self.limits;
        let items_over = state.sizes.len() > limits.max_items + limits.max_items / 4;
        let bytes_over = state.bytes > limits.max_bytes + limits.max_bytes / 4;
        let cursors_over = state.cursor_lines > state.cursors.len() + MAX_EXTRA_CURSOR_LINES;
        if items_over || bytes_over || cursors_over {
            let exceeded = if items_over {
                Some("max_inbox_items")
            } else if bytes_over {
                Some("max_inbox_bytes")
            } else {
                // Rewritten for the cursor lines; pushes go only if they were over a limit.
                state.exceeded(limits)
            };
            appended.dropped = self.rewrite(&mut state)?;
            appended.limit = exceeded.filter(|_| appended.dropped > 0);
        }
        Ok(appended)
    }

    /// Rewrites the file with the newest pushes within the limits and a cursor line per server;
    /// returns how many pushes it dropped.
    fn rewrite(&self, state: &mut State) -> Result<usize, InboxError> {
        let err = |source| InboxError {
            path: self.path.clone(),
            source,
        };
        let kept = state.kept(self.limits);
        let entries: Vec<(Entry, u64)> = read_lines(&self.path)
            .map_err(err)?
            .into_iter()
            .filter_map(|line| match line {
                Line::Entry(entry, size) => Some((entry, size)),
                Line::Cursor(_) => None,
            })
            .collect();
        let skip = entries.len().saturating_sub(kept);
        let mut text = Vec::new();
        let mut sizes = VecDeque::new();
        let mut latest = HashMap::new();
        for (entry, _) in &entries[skip..] {
            let start = text.len();
            text.extend(serde_json::to_vec(entry).unwrap_or_default());
            text.push(b'\n');
            sizes.push_back((text.len() - start) as u64);
            if let Some(from) = &entry.push.from {
                latest.insert(from.clone(), entry.push.clone());
            }
        }
        // After the entries: the cursors win over what the kept entries say.
        for ((server, stream), cursor) in &state.cursors {
            let line = CursorLine {
                cursor_server: server.to_string(),
                cursor_epoch: cursor.epoch,
                cursor_next: cursor.next,
                cursor_stream: stream.map(|s| s.to_string()),
            };
            text.extend(serde_json::to_vec(&line).unwrap_or_default());
            text.push(b'\n');
        }
        crate::files::write_private_file(&self.path, &text).map_err(err)?;
        state.file = open_append(&self.path).map_err(err)?;
        state.bytes = sizes.iter().sum();
        state.sizes = sizes;
        state.latest = latest;
        state.cursor_lines = state.cursors.len();
        Ok(skip)
    }

    /// The newest records within the limits, oldest first. Blocking.
    pub fn list(&self) -> Result<Vec<PushRecord>, InboxError> {
        let lines = read_lines(&self.path).map_err(|source| InboxError {
            path: self.path.clone(),
            source,
        })?;
        let entries: Vec<(PushRecord, u64)> = lines
            .into_iter()
            .filter_map(|line| match line {
                Line::Entry(entry, size) => Some((entry.push, size)),
                Line::Cursor(_) => None,
            })
            .collect();
        // The limits apply to what was read: pushes appended while the file was being read are
        // not in `entries`, and must not push older ones out of the listing.
        let kept = newest_within(entries.iter().map(|(_, size)| *size), self.limits);
        let skip = entries.len() - kept;
        Ok(entries
            .into_iter()
            .skip(skip)
            .map(|(push, _)| push)
            .collect())
    }

    /// How many records [`Inbox::list`] shows.
    pub fn len(&self) -> usize {
        self.lock().kept(self.limits)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Appends either completed or did not touch the state; a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens the inbox file for appending (created 0600), never through a symlink.
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// How many of the newest pushes (their line sizes, oldest first) fit the limits.
fn newest_within(sizes: impl DoubleEndedIterator<Item = u64>, limits: InboxLimits) -> usize {
    let mut bytes = 0;
    let mut kept = 0;
    for size in sizes.rev() {
        if kept == limits.max_items || bytes + size > limits.max_bytes {
            break;
        }
        bytes += size;
        kept += 1;
    }
    kept
}

fn read_lines(path: &Path) -> std::io::Result<Vec<Line>> {
    let file = File::open(path)?;
    let mut out = Vec::new();
    // Split on bytes: a line torn inside a character is not UTF-8, and must not stop the read.
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        // A torn or foreign line is skipped rather than hiding everything after it.
        if let Ok(cursor) = serde_json::from_slice::<CursorLine>(&line) {
            out.push(Line::Cursor(cursor));
        } else if let Ok(entry) = serde_json::from_slice::<Entry>(&line) {
            out.push(Line::Entry(entry, line.len() as u64 + 1));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const LIMITS: InboxLimits = InboxLimits {
        max_items: 1000,
        max_bytes: 1 << 20,
    };

    fn record(offset: u64, title: &str) -> PushRecord {
        PushRecord {
            from: None,
            uri: "u".into(),
            title: title.into(),
            body: None,
            position: None,
            meta: BTreeMap::new(),
            offset,
        }
    }

    /// A listing taken while pushes are being appended shows every push from the first on
    /// (the limits are far away): appends racing the read never hide the oldest ones.
    #[test]
    fn a_listing_during_appends_never_hides_the_oldest_pushes() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let appending = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..600 {
                    inbox
                        .append(&server, None, 1, &record(i, &i.to_string()))
                        .unwrap();
                }
                appending.store(false, std::sync::atomic::Ordering::Relaxed);
            });
            let mut listings = 0;
            while appending.load(std::sync::atomic::Ordering::Relaxed) {
                let listed = inbox.list().unwrap();
                let offsets: Vec<u64> = listed.iter().map(|p| p.offset).collect();
                let expected: Vec<u64> = (0..offsets.len() as u64).collect();
                assert_eq!(
                    offsets, expected,
                    "listing {listings} lost its oldest pushes"
                );
                listings += 1;
            }
        });
        assert_eq!(inbox.list().unwrap().len(), 600);
    }

    #[test]
    fn duplicates_are_dropped_across_restarts_and_epochs_reset() {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert!(
            inbox
                .append(&server, None, 7, &record(0, "a"))
                .unwrap()
                .fresh
        );
        assert!(
            inbox
                .append(&server, None, 7, &record(1, "b"))
                .unwrap()
                .fresh
        );
        assert!(
            !inbox
                .append(&server, None, 7, &record(1, "b"))
                .unwrap()
                .fresh,
            "resent: not delivered twice"
        );
        drop(inbox);
        // A torn last line (crash mid-write) is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(INBOX_FILE))
            .unwrap()
            .write_all(b"{\"from\":nu")
            .unwrap();
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 7, next: 2 }));
        assert_eq!(inbox.len(), 2);
        assert!(
            !inbox
                .append(&server, None, 7, &record(0, "a"))
                .unwrap()
                .fresh
        );
        // A new epoch starts over.
        assert!(
            inbox
                .append(&server, None, 8, &record(0, "c"))
                .unwrap()
                .fresh
        );
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 8, next: 1 }));
        let titles: Vec<String> = inbox.list().unwrap().into_iter().map(|r| r.title).collect();
        assert_eq!(titles, ["a", "b", "c"]);
    }

    /// A crash mid-write can tear a line inside a character (the JSON is UTF-8, titles need
    /// not be ASCII): that line is skipped like any torn line, and the inbox opens.
    #[test]
    fn a_line_torn_inside_a_character_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        let server = ServerId::from_bytes([1; 32]);
        assert!(
            inbox
                .append(&server, None, 7, &record(0, "café"))
                .unwrap()
                .fresh
        );
        drop(inbox);
        let line = serde_json::to_vec(&record(1, "crème")).unwrap();
        let cut = line.windows(2).position(|w| w == "è".as_bytes()).unwrap() + 1;
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(INBOX_FILE))
            .unwrap()
            .write_all(&line[..cut])
            .unwrap();
        let inbox = Inbox::open(dir.path(), LIMITS).expect("opens past a torn character");
        let titles: Vec<String> = inbox.list().unwrap().into_iter().map(|r| r.title).collect();
        assert_eq!(titles, ["café"]);
        assert!(
            inbox
                .append(&server, None, 7, &record(1, "crème"))
                .unwrap()
                .fresh
        );
        let titles: Vec<String> = inbox.list().unwrap().into_iter().map(|r| r.title).collect();
        assert_eq!(titles, ["café", "crème"]);
    }

    /// Each followed terminal's stream has a cursor of its own, apart from the terminal's own
    /// log at the same server: the same offset in two of them is two pushes. The cursors
    /// survive a restart and a rewrite.
    #[test]
    fn streams_keep_cursors_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let (a, b) = (
            TerminalId::from_bytes([2; 32]),
            TerminalId::from_bytes([3; 32]),
        );
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert!(
            inbox
                .append(&server, None, 7, &record(0, "own"))
                .unwrap()
                .fresh
        );
        assert!(
            inbox
                .append(&server, Some(&a), 7, &record(0, "a0"))
                .unwrap()
                .fresh
        );
        assert!(
            inbox
                .append(&server, Some(&a), 7, &record(1, "a1"))
                .unwrap()
                .fresh
        );
        assert!(
            inbox
                .append(&server, Some(&b), 7, &record(0, "b0"))
                .unwrap()
                .fresh
        );
        assert!(
            !inbox
                .append(&server, Some(&a), 7, &record(0, "a0"))
                .unwrap()
                .fresh
        );
        let streams = |inbox: &Inbox| {
            let mut c = inbox.stream_cursors(&server);
            c.sort_by_key(|c| c.owner);
            c
        };
        let expected = [
            StreamCursor {
                owner: a,
                epoch: 7,
                next: 2,
            },
            StreamCursor {
                owner: b,
                epoch: 7,
                next: 1,
            },
        ];
        assert_eq!(streams(&inbox), expected);
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 7, next: 1 }));
        assert!(inbox
            .stream_cursors(&ServerId::from_bytes([9; 32]))
            .is_empty());
        drop(inbox);
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(streams(&inbox), expected);
        assert!(
            !inbox
                .append(&server, Some(&b), 7, &record(0, "b0"))
                .unwrap()
                .fresh
        );
        let mut state = inbox.lock();
        inbox.rewrite(&mut state).unwrap();
        drop(state);
        drop(inbox);
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(streams(&inbox), expected);
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 7, next: 1 }));
    }

    /// Pulling an unchanged session again (or a follow's renewal) delivers it again with a new
    /// offset; the inbox keeps it once, and still knows the new offset as delivered after a
    /// restart. Any change, going back to an earlier session, and publishers' pushes are kept.
    #[test]
    fn a_repeated_unchanged_session_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let from = |offset: u64, title: &str, by: &str| PushRecord {
            from: Some(by.into()),
            position: Some(12.0),
            ..record(offset, title)
        };
        let titles = |inbox: &Inbox| -> Vec<(String, u64)> {
            inbox
                .list()
                .unwrap()
                .into_iter()
                .map(|r| (r.title, r.offset))
                .collect()
        };
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert!(
            !inbox
                .append(&server, None, 1, &from(0, "a", "tv"))
                .unwrap()
                .repeat
        );
        let again = inbox.append(&server, None, 1, &from(1, "a", "tv")).unwrap();
        assert!(again.fresh && again.repeat, "{again:?}");
        assert_eq!(titles(&inbox), [("a".to_string(), 0)]);
        assert_eq!(inbox.len(), 1);
        // Another terminal showing the same thing is another entry.
        assert!(
            !inbox
                .append(&server, None, 1, &from(2, "a", "pc"))
                .unwrap()
                .repeat
        );
        // Still a repeat of tv's newest, with pc's push in between.
        assert!(
            inbox
                .append(&server, None, 1, &from(3, "a", "tv"))
                .unwrap()
                .repeat
        );
        drop(inbox);

        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 1, next: 4 }));
        assert!(
            !inbox
                .append(&server, None, 1, &from(3, "a", "tv"))
                .unwrap()
                .fresh
        );
        assert!(
            inbox
                .append(&server, None, 1, &from(4, "a", "tv"))
                .unwrap()
                .repeat
        );
        // A moved position is a change; so is going back to "a" after "b".
        let mut moved = from(5, "a", "tv");
        moved.position = Some(40.0);
        assert!(!inbox.append(&server, None, 1, &moved).unwrap().repeat);
        assert!(
            !inbox
                .append(&server, None, 1, &from(6, "b", "tv"))
                .unwrap()
                .repeat
        );
        assert!(
            !inbox
                .append(&server, None, 1, &from(7, "a", "tv"))
                .unwrap()
                .repeat
        );
        // A publisher's push twice is twice.
        assert!(
            !inbox
                .append(&server, None, 1, &record(8, "news"))
                .unwrap()
                .repeat
        );
        assert!(
            !inbox
                .append(&server, None, 1, &record(9, "news"))
                .unwrap()
                .repeat
        );
        let offsets: Vec<u64> = titles(&inbox).into_iter().map(|(_, o)| o).collect();
        assert_eq!(offsets, [0, 2, 5, 6, 7, 8, 9]);

        // Endless repeats leave a bounded file that still knows the newest offset.
        let before = std::fs::metadata(dir.path().join(INBOX_FILE))
            .unwrap()
            .len();
        for offset in 10..1000 {
            let repeated = inbox
                .append(&server, None, 1, &from(offset, "a", "tv"))
                .unwrap();
            assert!(repeated.repeat && repeated.dropped == 0, "{repeated:?}");
        }
        let after = std::fs::metadata(dir.path().join(INBOX_FILE))
            .unwrap()
            .len();
        assert!(after < before + 100 * 200, "{before} -> {after}");
        assert_eq!(offsets.len(), inbox.len());
        drop(inbox);
        let inbox = Inbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(
            inbox.cursor(&server),
            Some(Cursor {
                epoch: 1,
                next: 1000
            })
        );
        assert!(
            inbox
                .append(&server, None, 1, &from(1000, "a", "tv"))
                .unwrap()
                .repeat
        );
        assert_eq!(inbox.len(), offsets.len());
    }

    /// A flood of pushes leaves the newest `max_items` in the inbox and a file that stops
    /// growing; a push dropped from the file is still known as delivered, across a restart.
    #[test]
    fn the_inbox_keeps_the_newest_pushes_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let limits = InboxLimits {
            max_items: 8,
            max_bytes: 1 << 20,
        };
        let inbox = Inbox::open(dir.path(), limits).unwrap();
        let mut dropped = 0;
        let mut largest_file = 0;
        for offset in 0..100 {
            let appended = inbox
                .append(&server, None, 1, &record(offset, &format!("p{offset}")))
                .unwrap();
            assert!(appended.fresh);
            dropped += appended.dropped;
            if appended.dropped > 0 {
                assert_eq!(appended.limit, Some("max_inbox_items"));
            }
            let len = std::fs::metadata(dir.path().join(INBOX_FILE))
                .unwrap()
                .len();
            largest_file = largest_file.max(len);
            assert!(inbox.len() <= 8);
        }
        let titles: Vec<String> = inbox.list().unwrap().into_iter().map(|r| r.title).collect();
        let newest: Vec<String> = (92..100).map(|i| format!("p{i}")).collect();
        assert_eq!(titles, newest);
        assert!(dropped >= 80, "{dropped}");
        // At most 8 + 2 pushes (the quarter before a rewrite) and a cursor line.
        assert!(largest_file < 11 * 200, "{largest_file}");
        drop(inbox);
        let inbox = Inbox::open(dir.path(), limits).unwrap();
        assert_eq!(
            inbox.cursor(&server),
            Some(Cursor {
                epoch: 1,
                next: 100
            })
        );
        assert!(
            !inbox
                .append(&server, None, 1, &record(3, "p3"))
                .unwrap()
                .fresh
        );
        assert_eq!(inbox.list().unwrap().len(), 8);

        // The byte limit: big pushes leave only what fits.
        let limits = InboxLimits {
            max_items: 1000,
            max_bytes: 10_000,
        };
        let other = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(other.path(), limits).unwrap();
        let mut hit = None;
        for offset in 0..40 {
            let mut big = record(offset, "big");
            big.body = Some("x".repeat(1000));
            hit = hit.or(inbox.append(&server, None, 1, &big).unwrap().limit);
        }
        assert_eq!(hit, Some("max_inbox_bytes"));
        let kept = inbox.list().unwrap();
        assert!(kept.len() < 10 && kept.len() >= 8, "{}", kept.len());
        assert_eq!(kept.last().unwrap().offset, 39);
        assert!(
            std::fs::metadata(other.path().join(INBOX_FILE))
                .unwrap()
                .len()
                < 12_600
        );
    }
}
