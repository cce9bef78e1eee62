//! How many terminals one source network may make this server know (DESIGN §6: "state of
//! strangers is bounded"). A source is an IPv4 address or an IPv6 /64 (one host's usual share,
//! so rotating addresses inside it does not multiply the quota). Each source may have at most
//! `[limits] known_terminals_per_source` distinct terminal IDs seen within
//! `[limits] idle_terminal_secs`, the time after which the store forgets an idle terminal; a
//! new ID past that is refused before anything about it is stored.
//!
//! One host may hold a whole IPv6 /48 (a common allocation), 65,536 /64s: the /64s of one /48
//! share [`PER_48`] quotas, so that no one /48 can fill the table.
//!
//! The table is this node's memory: it starts empty at each start, and in a cluster each node
//! keeps its own. It holds at most [`MAX_TRACKED`] IDs; when full of live entries, new IDs are
//! refused until some age out. A terminal the store already knows is admitted without it (the
//! caller checks): it adds no state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::TerminalId;

/// How many quotas of `known_terminals_per_source` the /64s of one IPv6 /48 share.
pub const PER_48: usize = 16;

/// Most terminal IDs tracked over all sources (about 100 bytes each).
pub const MAX_TRACKED: usize = 1 << 20;

/// A source network: an IPv4 address, or the /64 prefix of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl Source {
    /// The /48 an IPv6 source is in.
    fn wide(&self) -> Option<[u8; 6]> {
        match self {
            Source::V4(_) => None,
            Source::V6(prefix) => prefix.first_chunk().copied(),
        }
    }
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Source::V6(prefix)
            }
        }
    }
}

/// Why a terminal was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source already has its quota of terminals.
    Quota,
    /// The table is full of live entries.
    Full,
}

/// Terminal IDs seen per source, with when each was last seen.
#[derive(Debug)]
pub struct KnownPerSource {
    quota: usize,
    window: Duration,
    max_tracked: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<Source, HashMap<TerminalId, Instant>>,
    /// IDs tracked per IPv6 /48, over its /64s.
    wide: HashMap<[u8; 6], usize>,
    tracked: usize,
}

impl State {
    /// Counts `n` IDs of `source` as no longer tracked.
    fn forget(&mut self, source: &Source, n: usize) {
        self.tracked -= n;
        if let Some(wide) = source.wide() {
            if let Some(count) = self.wide.get_mut(&wide) {
                *count -= n;
                if *count == 0 {
                    self.wide.remove(&wide);
                }
            }
        }
    }

    /// Drops the IDs not seen within `window` (all sources).
    fn prune_all(&mut self, now: Instant, window: Duration) {
        let mut forgotten = Vec::new();
        self.sources.retain(|source, ids| {
            let before = ids.len();
            ids.retain(|_, seen| now.saturating_duration_since(*seen) < window);
            forgotten.push((*source, before - ids.len()));
            !ids.is_empty()
        });
        for (source, n) in forgotten.into_iter().filter(|(_, n)| *n > 0) {
            self.forget(&source, n);
        }
    }
}

impl KnownPerSource {
    pub fn new(quota: usize, window: Duration) -> Self {
        Self::with_capacity(quota, window, MAX_TRACKED)
    }

    fn with_capacity(quota: usize, window: Duration, max_tracked: usize) -> Self {
        Self {
            quota,
            window,
            max_tracked,
            state: Mutex::new(State::default()),
        }
    }

    /// Admits `id` connecting from `ip` at `now`: it was seen from that source within the
    /// window (refreshed), or the source (and its /48) is under its quota (recorded).
    pub fn admit(&self, ip: IpAddr, id: TerminalId, now: Instant) -> Result<(), Refused> {
        let source = Source::from(ip);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = state.sources.get_mut(&source) {
            if let Some(seen) = ids.get_mut(&id) {
                *seen = now;
                return Ok(());
            }
            let before = ids.len();
            ids.retain(|_, seen| now.saturating_duration_since(*seen) < self.window);
            let (gone, left) = (before - ids.len(), ids.len());
            state.forget(&source, gone);
            if left >= self.quota {
                return Err(Refused::Quota);
            }
        }
        if let Some(wide) = source.wide() {
            if state.wide.get(&wide).copied().unwrap_or(0) >= self.quota * PER_48 {
                state.prune_all(now, self.window);
                if state.wide.get(&wide).copied().unwrap_or(0) >= self.quota * PER_48 {
                    return Err(Refused::Quota);
                }
            }
        }
        if state.tracked >= self.max_tracked {
            state.prune_all(now, self.window);
            if state.tracked >= self.max_tracked {
                return Err(Refused::Full);
            }
        }
        state.sources.entry(source).or_default().insert(id, now);
        state.tracked += 1;
        if let Some(wide) = source.wide() {
            *state.wide.entry(wide).or_default() += 1;
        }
        Ok(())
    }

    /// Marks terminals that are connected now as seen (their entries never age out meanwhile).
    pub fn refresh(&self, seen: impl IntoIterator<Item = (IpAddr, TerminalId)>, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, id) in seen {
            if let Some(at) = state
                .sources
                .get_mut(&Source::from(ip))
                .and_then(|ids| ids.get_mut(&id))
            {
                *at = now;
            }
        }
        state.prune_all(now, self.window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> TerminalId {
        TerminalId::from_bytes([n; 32])
    }

    #[test]
    fn a_source_gets_its_quota_and_known_ids_always_come_back() {
        let t = KnownPerSource::new(2, Duration::from_secs(100));
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.admit(a, id(1), now), Ok(()));
        assert_eq!(t.admit(a, id(2), now), Ok(()));
        assert_eq!(t.admit(a, id(3), now), Err(Refused::Quota));
        assert_eq!(
            t.admit(a, id(1), now),
            Ok(()),
            "a known ID is not a new one"
        );
        assert_eq!(
            t.admit(b, id(3), now),
            Ok(()),
            "another source has its own quota"
        );
        // Once an ID has been idle for the window, its slot is free again.
        let later = now + Duration::from_secs(100);
        t.refresh([(a, id(1))], now + Duration::from_secs(50));
        assert_eq!(t.admit(a, id(3), later), Ok(()));
        assert_eq!(t.admit(a, id(4), later), Err(Refused::Quota));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = KnownPerSource::new(1, Duration::from_secs(100));
        let now = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.admit(one, id(1), now), Ok(()));
        assert_eq!(t.admit(same_64, id(2), now), Err(Refused::Quota));
        assert_eq!(t.admit(other_64, id(2), now), Ok(()));
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(t.admit(v4, id(3), now), Ok(()));
        assert_eq!(t.admit(mapped, id(4), now), Err(Refused::Quota));
    }

    /// A host with an IPv6 /48 (a common allocation) holds 65,536 /64s, each a source with its
    /// own quota: enough to fill the whole table, after which every new terminal anywhere was
    /// refused for `idle_terminal_secs`. A /48 shares [`PER_48`] quotas.
    #[test]
    fn one_ipv6_48_cannot_fill_the_table() {
        let t = KnownPerSource::with_capacity(2, Duration::from_secs(100), 200);
        let now = Instant::now();
        let mut admitted = 0;
        for n in 0..100u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 1, n, 0, 0, 0, 1]);
            for k in 0..2u8 {
                let mut bytes = [0; 32];
                bytes[..2].copy_from_slice(&n.to_be_bytes());
                bytes[2] = k;
                if t.admit(ip, TerminalId::from_bytes(bytes), now).is_ok() {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, 2 * PER_48, "one /48's share");
        let elsewhere = IpAddr::from([0x2001, 0xdb8, 2, 0, 0, 0, 0, 1]);
        assert_eq!(t.admit(elsewhere, id(1), now), Ok(()), "room for others");
    }

    #[test]
    fn the_table_is_bounded() {
        let t = KnownPerSource::with_capacity(10, Duration::from_secs(100), 3);
        let now = Instant::now();
        for n in 1..=3u8 {
            let ip = IpAddr::from([198, 51, 100, n]);
            assert_eq!(t.admit(ip, id(n), now), Ok(()));
        }
        let ip = IpAddr::from([198, 51, 100, 9]);
        assert_eq!(t.admit(ip, id(9), now), Err(Refused::Full));
        assert_eq!(
            t.admit(ip, id(9), now + Duration::from_secs(100)),
            Ok(()),
            "room again once entries aged out"
        );
    }
}
