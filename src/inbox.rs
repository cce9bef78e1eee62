//! The inbox: every push this terminal received, oldest first, in `state_dir/inbox.jsonl`.
//!
//! One JSON object per line, appended and fsynced before the push is shown anywhere else. A crash
//! can leave a torn last line; reading skips it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::control::PushRecord;

pub const INBOX_FILE: &str = "inbox.jsonl";

#[derive(Debug, thiserror::Error)]
#[error("inbox {path}: {source}")]
pub struct InboxError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Debug)]
pub struct Inbox {
    path: PathBuf,
    file: Mutex<File>,
}

impl Inbox {
    pub fn open(state_dir: &Path) -> Result<Self, InboxError> {
        let path = state_dir.join(INBOX_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| InboxError {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends one record durably. Blocking: call from a blocking context.
    pub fn append(&self, record: &PushRecord) -> Result<(), InboxError> {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        (&*file)
            .write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|source| InboxError {
                path: self.path.clone(),
                source,
            })
    }

    /// Every record, oldest first. Blocking.
    pub fn list(&self) -> Result<Vec<PushRecord>, InboxError> {
        let file = File::open(&self.path).map_err(|source| InboxError {
            path: self.path.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| InboxError {
                path: self.path.clone(),
                source,
            })?;
            // A torn or foreign line is skipped rather than hiding everything after it.
            if let Ok(record) = serde_json::from_str(&line) {
                out.push(record);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.list().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
