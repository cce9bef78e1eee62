//! The Lua scripts (in `lua/`), each an atomic step on one terminal's keys, and how they are
//! loaded and called (`EVALSHA`). Every script starts with `lua/helpers.lua`.

use redis::{Connection, RedisResult, Script};

const HELPERS: &str = include_str!("lua/helpers.lua");
const APPEND: &str = include_str!("lua/append.lua");
const ACK: &str = include_str!("lua/ack.lua");
const USE_NONCE: &str = include_str!("lua/use_nonce.lua");
const REVOKE: &str = include_str!("lua/revoke.lua");
const LINK: &str = include_str!("lua/link.lua");
const SWEEP_LOG: &str = include_str!("lua/sweep_log.lua");
const SWEEP_DEADLINES: &str = include_str!("lua/sweep_deadlines.lua");
const EXPIRE_IDLE: &str = include_str!("lua/expire_idle.lua");

pub(super) struct Scripts {
    /// Assigns the next offset (checking the epoch) and replaces an unacknowledged item with
    /// the same collapse key.
    pub append: Script,
    /// Moves the acknowledged cursor up and trims the log below it.
    pub ack: Script,
    /// Records a ticket nonce unless revoked, used before, or the first terminal's set is full.
    pub use_nonce: Script,
    /// Records a revocation (the time only grows) and keeps it as long as it matters.
    pub revoke: Script,
    /// Links a second terminal on the first's side, unless revoked meanwhile.
    pub link: Script,
    /// Drops a log's expired items and stale collapse entries.
    pub sweep_log: Script,
    /// Drops the due members of a links or nonces set (and a followers set's `since` entries).
    pub sweep_deadlines: Script,
    /// Forgets one idle, unlinked terminal's known entry and session.
    pub expire_idle: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_helpers = |body: &str| Script::new(&format!("{HELPERS}{body}"));
        Self {
            append: with_helpers(APPEND),
            ack: with_helpers(ACK),
            use_nonce: with_helpers(USE_NONCE),
            revoke: with_helpers(REVOKE),
            link: with_helpers(LINK),
            sweep_log: with_helpers(SWEEP_LOG),
            sweep_deadlines: with_helpers(SWEEP_DEADLINES),
            expire_idle: with_helpers(EXPIRE_IDLE),
        }
    }

    /// Loads every script, so `EVALSHA` finds them (after a connect, or a `NOSCRIPT`).
    pub fn load(&self, conn: &mut Connection) -> RedisResult<()> {
        for script in [
            &self.append,
            &self.ack,
            &self.use_nonce,
            &self.revoke,
            &self.link,
            &self.sweep_log,
            &self.sweep_deadlines,
            &self.expire_idle,
        ] {
            script.load(conn)?;
        }
        Ok(())
    }
}

/// Appends `EVALSHA script <keys> ` to `pipe`; the caller adds the arguments.
pub(super) fn evalsha<'p>(
    pipe: &'p mut redis::Pipeline,
    script: &Script,
    keys: &[&str],
) -> &'p mut redis::Pipeline {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
}
