//! The inbox: every push this terminal received, oldest first, in `state_dir/inbox.jsonl`.
//!
//! One JSON object per line, appended and fsynced before the push is shown anywhere else or
//! acknowledged to the server. Each line records the server and the epoch/offset of the push, so
//! a push the server sends again (after a crash or reconnect) is recognised and not delivered
//! twice: the cursors are rebuilt from the file at start. A crash can leave a torn last line;
//! reading skips it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::control::PushRecord;
use crate::identity::ServerId;
use crate::wire::Cursor;

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
}

#[derive(Debug)]
struct State {
    file: File,
    /// Per server: the epoch and the next offset not yet delivered.
    cursors: HashMap<ServerId, Cursor>,
    len: usize,
}

#[derive(Debug)]
pub struct Inbox {
    path: PathBuf,
    state: Mutex<State>,
}

impl Inbox {
    pub fn open(state_dir: &Path) -> Result<Self, InboxError> {
        let path = state_dir.join(INBOX_FILE);
        let err = |source| InboxError {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
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
        let mut cursors: HashMap<ServerId, Cursor> = HashMap::new();
        let mut len = 0;
        for entry in read_entries(&path).map_err(err)? {
            len += 1;
            let Ok(server) = entry.server.parse::<ServerId>() else {
                continue;
            };
            let next = entry.push.offset + 1;
            let cursor = cursors.entry(server).or_insert(Cursor {
                epoch: entry.epoch,
                next,
            });
            if cursor.epoch != entry.epoch {
                // A later epoch in the file supersedes the earlier one.
                *cursor = Cursor {
                    epoch: entry.epoch,
                    next,
                };
            } else {
                cursor.next = cursor.next.max(next);
            }
        }
        Ok(Self {
            path,
            state: Mutex::new(State { file, cursors, len }),
        })
    }

    /// Where this terminal's log at `server` left off.
    pub fn cursor(&self, server: &ServerId) -> Option<Cursor> {
        self.lock().cursors.get(server).copied()
    }

    /// Keeps `push` (from `server`, in `epoch`) durably, unless it was delivered before.
    /// Returns whether it is new. Blocking: call from a blocking context.
    pub fn append(
        &self,
        server: &ServerId,
        epoch: u64,
        push: &PushRecord,
    ) -> Result<bool, InboxError> {
        let mut state = self.lock();
        if let Some(cursor) = state.cursors.get(server) {
            if cursor.epoch == epoch && push.offset < cursor.next {
                return Ok(false);
            }
        }
        let entry = Entry {
            push: push.clone(),
            server: server.to_string(),
            epoch,
        };
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        (&state.file)
            .write_all(&line)
            .and_then(|()| state.file.sync_data())
            .map_err(|source| InboxError {
                path: self.path.clone(),
                source,
            })?;
        state.cursors.insert(
            *server,
            Cursor {
                epoch,
                next: push.offset + 1,
            },
        );
        state.len += 1;
        Ok(true)
    }

    /// Every record, oldest first. Blocking.
    pub fn list(&self) -> Result<Vec<PushRecord>, InboxError> {
        let entries = read_entries(&self.path).map_err(|source| InboxError {
            path: self.path.clone(),
            source,
        })?;
        Ok(entries.into_iter().map(|e| e.push).collect())
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Appends either completed or did not touch the state; a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_entries(path: &Path) -> std::io::Result<Vec<Entry>> {
    let file = File::open(path)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        // A torn or foreign line is skipped rather than hiding everything after it.
        if let Ok(entry) = serde_json::from_str(&line?) {
            out.push(entry);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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

    #[test]
    fn duplicates_are_dropped_across_restarts_and_epochs_reset() {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerId::from_bytes([1; 32]);
        let inbox = Inbox::open(dir.path()).unwrap();
        assert!(inbox.append(&server, 7, &record(0, "a")).unwrap());
        assert!(inbox.append(&server, 7, &record(1, "b")).unwrap());
        assert!(
            !inbox.append(&server, 7, &record(1, "b")).unwrap(),
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
        let inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 7, next: 2 }));
        assert_eq!(inbox.len(), 2);
        assert!(!inbox.append(&server, 7, &record(0, "a")).unwrap());
        // A new epoch starts over.
        assert!(inbox.append(&server, 8, &record(0, "c")).unwrap());
        assert_eq!(inbox.cursor(&server), Some(Cursor { epoch: 8, next: 1 }));
        let titles: Vec<String> = inbox.list().unwrap().into_iter().map(|r| r.title).collect();
        assert_eq!(titles, ["a", "b", "c"]);
    }
}
