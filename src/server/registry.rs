//! The server's registry (DESIGN §6): terminals with their current session and connection, links
//! (second follows first until a time), per-recipient push offsets, and the ticket replay cache.
//!
//! Pure bookkeeping under one lock; sending happens outside it, on the deliveries returned.

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::identity::TerminalId;
use crate::wire::ticket::{ReplayCache, TicketError};
use crate::wire::{PushItem, Session, Ticket};

/// Where pushes for one connected terminal go.
#[derive(Debug, Clone)]
pub struct ConnSlot {
    pub conn_id: u64,
    pub tx: mpsc::Sender<PushItem>,
    pub conn: quinn::Connection,
}

/// A push to hand to a connection's writer.
#[derive(Debug)]
pub struct Delivery {
    pub to: TerminalId,
    pub slot: ConnSlot,
    pub item: PushItem,
}

#[derive(Debug, Default)]
struct Terminal {
    session: Option<Session>,
    conn: Option<ConnSlot>,
    next_offset: u64,
}

#[derive(Debug)]
pub struct Registry {
    terminals: HashMap<TerminalId, Terminal>,
    /// first → (second → until, Unix seconds).
    followers: HashMap<TerminalId, HashMap<TerminalId, u64>>,
    replay: ReplayCache,
}

impl Registry {
    pub fn new(replay_capacity: usize) -> Self {
        Self {
            terminals: HashMap::new(),
            followers: HashMap::new(),
            replay: ReplayCache::new(replay_capacity),
        }
    }

    /// Records `slot` as `id`'s connection; returns the connection it replaces.
    pub fn attach(&mut self, id: TerminalId, slot: ConnSlot) -> Option<ConnSlot> {
        self.terminals.entry(id).or_default().conn.replace(slot)
    }

    /// Forgets `id`'s connection if it is still `conn_id`. A terminal with nothing left to
    /// remember (no session, not followed, not following) is dropped entirely.
    pub fn detach(&mut self, id: TerminalId, conn_id: u64) {
        let Some(t) = self.terminals.get_mut(&id) else {
            return;
        };
        if t.conn.as_ref().is_some_and(|c| c.conn_id == conn_id) {
            t.conn = None;
        }
        let follows = self.followers.values().any(|f| f.contains_key(&id));
        if t.conn.is_none() && t.session.is_none() && !self.followers.contains_key(&id) && !follows
        {
            self.terminals.remove(&id);
        }
    }

    pub fn connected(&self) -> usize {
        self.terminals.values().filter(|t| t.conn.is_some()).count()
    }

    pub fn session(&self, id: &TerminalId) -> Option<&Session> {
        self.terminals.get(id)?.session.as_ref()
    }

    /// Stores `id`'s session and returns the pushes for its live followers.
    pub fn set_session(
        &mut self,
        id: TerminalId,
        session: Option<Session>,
        now: u64,
    ) -> Vec<Delivery> {
        self.terminals.entry(id).or_default().session = session.clone();
        let Some(session) = session else {
            return Vec::new();
        };
        let followers: Vec<TerminalId> = match self.followers.get_mut(&id) {
            Some(f) => {
                f.retain(|_, until| *until > now);
                f.keys().copied().collect()
            }
            None => return Vec::new(),
        };
        followers
            .into_iter()
            .filter_map(|second| self.push_to(second, id, &session))
            .collect()
    }

    /// Checks a ticket's nonce against the replay cache and records it.
    pub fn use_nonce(&mut self, ticket: &Ticket, now: u64) -> Result<(), TicketError> {
        self.replay.check_and_insert(ticket, now)
    }

    /// Links `second` to `first` until `until`; returns the push of `first`'s current session.
    pub fn follow(
        &mut self,
        second: TerminalId,
        first: TerminalId,
        until: u64,
    ) -> (bool, Option<Delivery>) {
        self.followers
            .entry(first)
            .or_default()
            .insert(second, until);
        let Some(session) = self.session(&first).cloned() else {
            return (false, None);
        };
        (true, self.push_to(second, first, &session))
    }

    fn push_to(&mut self, to: TerminalId, from: TerminalId, session: &Session) -> Option<Delivery> {
        let t = self.terminals.get_mut(&to)?;
        let slot = t.conn.clone()?;
        let item = PushItem::from_session(t.next_offset, from, session);
        t.next_offset += 1;
        Some(Delivery { to, slot, item })
    }

    /// Ends the link of `second` following `first`; returns whether there was one.
    pub fn unlink(&mut self, first: TerminalId, second: TerminalId) -> bool {
        let Some(followers) = self.followers.get_mut(&first) else {
            return false;
        };
        let removed = followers.remove(&second).is_some();
        if followers.is_empty() {
            self.followers.remove(&first);
        }
        removed
    }

    /// Drops links whose lease ended.
    pub fn expire(&mut self, now: u64) {
        self.followers.retain(|_, f| {
            f.retain(|_, until| *until > now);
            !f.is_empty()
        });
    }
}
