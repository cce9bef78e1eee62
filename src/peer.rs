//! The peer table: who mDNS says is on the LAN (DESIGN §3), and what handshakes proved.
//!
//! An mDNS advert is a *claim* (an ID, a name, addresses) that anyone on the LAN can make. A
//! claim becomes useful only through a QUIC handshake that pins the claimed ID: it proves the
//! key holder is reachable, and the holder's certificate carries the name it gives itself. So
//! the table keeps, per ID, a **proof** (the address that answered, the proven name) apart from
//! the claims, and:
//! - shows the proven name, never a claimed one, once the ID has been proven; resolves names
//!   (for `pull`, `trust`, `pair`) only to proven names;
//! - dials the address that answered last first, then a bounded number of claimed ones;
//! - holds at most [`TableLimits::max_claims`] claims, [`MAX_CLAIMS_PER_ID`] per ID and
//!   [`TableLimits::max_addrs_per_peer`] addresses per ID; when full, claims of untrusted IDs
//!   make room first, unproven ones before proven ones.
//!
//! Repeated resolutions update a claim; a goodbye removes it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use std::time::{Duration, Instant};

use crate::identity::TerminalId;

/// Claims (mDNS instances) one ID may have: its own, and a few others (a terminal that
/// re-registered, or impostors). Beyond it the oldest claim that holds no proven address goes.
pub const MAX_CLAIMS_PER_ID: usize = 4;

/// An address a peer was seen at; IPv6 link-local addresses keep their interface scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerAddr {
    pub ip: IpAddr,
    pub scope_id: u32,
}

impl PeerAddr {
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        match self.ip {
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, self.scope_id)),
            ip => SocketAddr::new(ip, port),
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V6(v6) if self.scope_id != 0 => write!(f, "{v6}%{}", self.scope_id),
            ip => write!(f, "{ip}"),
        }
    }
}

/// A claim: what one mDNS instance says about a peer. (From [`PeerTable::get`] and
/// [`PeerTable::find`], the claims of one ID merged, named with the proven name if there is one.)
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: TerminalId,
    pub name: String,
    /// The mDNS instance name, used to match goodbyes.
    pub instance: String,
    pub addrs: BTreeSet<PeerAddr>,
    pub port: u16,
    pub last_seen: Instant,
}

impl Peer {
    /// Addresses to dial, IPv4 first (no scope to get wrong), then IPv6.
    pub fn dial_addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .addrs
            .iter()
            .map(|a| a.socket_addr(self.port))
            .collect();
        out.sort_by_key(|a| a.is_ipv6());
        out
    }
}

/// The shortest ID prefix that names a peer: shorter ones match too easily by accident.
pub const MIN_ID_PREFIX: usize = 4;
/// A peer as `handoff peers` shows it: its claims merged, and whether its key answered a
/// handshake since it was last suspected gone.
#[derive(Debug, Clone)]
pub struct PeerView {
    /// Named with the proven name when there is one, else with the latest claim's name.
    pub peer: Peer,
    /// The ID's key answered a handshake (and has not failed one since).
    pub verified: bool,
    /// `peer.name` is the name the key holder gave itself.
    pub name_proven: bool,
}

/// Why a query names no single peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error("no peer matches {0:?} (see `handoff peers`)")]
    NotFound(String),
    #[error(
        "no peer is named {0:?}, and an ID prefix needs at least {MIN_ID_PREFIX} characters \
         (see `handoff peers`)"
    )]
    PrefixTooShort(String),
    #[error("{query:?} matches several peers: {candidates}")]
    Ambiguous { query: String, candidates: String },
    #[error(
        "no peer has proven the name {0:?}: only unverified mDNS adverts claim it (use the peer's ID, or wait until it answers a handshake)"
    )]
    Unverified(String),
}

/// Bounds on what mDNS adverts can make the table hold (DESIGN §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLimits {
    /// Claims (mDNS instances) held at once.
    pub max_claims: usize,
    /// Addresses kept per claim, and dialled or shown per ID.
    pub max_addrs_per_peer: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        Self {
            max_claims: 128,
            max_addrs_per_peer: 16,
        }
    }
}

/// What a handshake pinning an ID proved.
#[derive(Debug, Clone, Default)]
struct IdState {
    /// The name the key holder gave itself in its certificate (kept while the ID is listed).
    name: Option<String>,
    /// Whether the key answered a handshake since it was last suspected gone.
    verified: bool,
    /// The address where it answered our last dial.
    addr: Option<SocketAddr>,
    /// When the last liveness check or probe ended, and how many failed in a row.
    checked: Option<Instant>,
    failures: u32,
}

/// The peer table, keyed by mDNS instance: several instances may claim one ID (a terminal on two
/// networks, or an impostor). Lookups merge them by ID, so an impostor's claim cannot hide the
/// real terminal's addresses; a dial that fails the key check drops the instance that claimed it.
#[derive(Debug, Default)]
pub struct PeerTable {
    instances: HashMap<String, Peer>,
    ids: HashMap<TerminalId, IdState>,
    limits: TableLimits,
    /// Limits hit, not yet reported ([`PeerTable::take_hits`]).
    hits: TableHits,
}

/// Limits the table enforced since they were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableHits {
    /// Claims evicted to make room for newer ones.
    pub evicted: usize,
    /// Claims cut to [`TableLimits::max_addrs_per_peer`] addresses.
    pub truncated: usize,
}

/// What an update did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The ID was not in the table before.
    Added,
    Updated,
    /// The table is full of claims that rank above this one; it was not recorded.
    Refused,
}

impl PeerTable {
    pub fn new(limits: TableLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Records a resolution; an instance's addresses are replaced by its latest resolution.
    /// `trusted` says which IDs are on the trust list (their claims are evicted last).
    pub fn upsert(&mut self, mut peer: Peer, trusted: impl Fn(&TerminalId) -> bool) -> Change {
        let max_addrs = self.limits.max_addrs_per_peer.max(1);
        if peer.addrs.len() > max_addrs {
            peer.addrs = peer.addrs.iter().copied().take(max_addrs).collect();
            self.hits.truncated += 1;
        }
        let known = self.ids.contains_key(&peer.id);
        match self.instances.get(&peer.instance) {
            Some(old) if old.id == peer.id => {}
            Some(old) => {
                // The instance now claims another ID: it is a new claim of that ID.
                let old_id = old.id;
                self.instances.remove(&peer.instance);
                self.forget_if_unclaimed(&old_id);
                if !self.make_room(&peer, &trusted) {
                    return Change::Refused;
                }
            }
            None => {
                if !self.make_room(&peer, &trusted) {
                    return Change::Refused;
                }
            }
        }
        self.ids.entry(peer.id).or_default();
        self.instances.insert(peer.instance.clone(), peer);
        if known {
            Change::Updated
        } else {
            Change::Added
        }
    }

    /// Frees a place for the new claim `peer`, if one of lower rank can go.
    fn make_room(&mut self, peer: &Peer, trusted: &impl Fn(&TerminalId) -> bool) -> bool {
        // Per ID: the oldest claim holding no proven address.
        let proven_addr = self.ids.get(&peer.id).and_then(|s| s.addr);
        let mut same: Vec<&Peer> = self
            .instances
            .values()
            .filter(|p| p.id == peer.id)
            .collect();
        if same.len() >= MAX_CLAIMS_PER_ID {
            same.retain(|p| !proven_addr.is_some_and(|a| p.dial_addrs().contains(&a)));
            let Some(oldest) = same.iter().min_by_key(|p| p.last_seen) else {
                return false;
            };
            let instance = oldest.instance.clone();
            self.instances.remove(&instance);
            self.hits.evicted += 1;
        }
        if self.instances.len() < self.limits.max_claims.max(1) {
            return true;
        }
        // Table full: evict the claim of lowest rank (untrusted before trusted, then unproven
        // before proven, then the least recently seen), if it ranks below the newcomer. Trusted
        // first: an attacker can make its own keys answer handshakes, not a trusted peer's.
        let rank = |id: &TerminalId, seen: Instant| {
            let verified = self.ids.get(id).is_some_and(|s| s.verified);
            (trusted(id), verified, seen)
        };
        let newcomer = rank(&peer.id, peer.last_seen);
        let Some(lowest) = self
            .instances
            .values()
            .min_by_key(|p| rank(&p.id, p.last_seen))
        else {
            return true;
        };
        if rank(&lowest.id, lowest.last_seen) >= newcomer {
            return false;
        }
        let (instance, id) = (lowest.instance.clone(), lowest.id);
        self.instances.remove(&instance);
        self.forget_if_unclaimed(&id);
        self.hits.evicted += 1;
        true
    }

    /// The limits hit since the last call.
    pub fn take_hits(&mut self) -> TableHits {
        std::mem::take(&mut self.hits)
    }

    fn forget_if_unclaimed(&mut self, id: &TerminalId) {
        if !self.instances.values().any(|p| p.id == *id) {
            self.ids.remove(id);
        }
    }

    /// Removes an mDNS instance (a goodbye); returns the peer if no other instance claims its ID.
    /// If others still do and the leaving one held the proven address, the ID must prove itself
    /// again: the claims left may be an impostor's.
    pub fn remove_instance(&mut self, instance: &str) -> Option<Peer> {
        let peer = self.instances.remove(instance)?;
        if self.instances.values().any(|p| p.id == peer.id) {
            if let Some(state) = self.ids.get_mut(&peer.id) {
                let held_proof = match state.addr {
                    Some(addr) => peer.dial_addrs().contains(&addr),
                    None => true,
                };
                if held_proof {
                    state.verified = false;
                    state.checked = None;
                }
            }
            return None;
        }
        self.ids.remove(&peer.id);
        Some(peer)
    }

    /// Drops every instance claiming `id` at `addr` (it failed the key check there).
    pub fn drop_claim(&mut self, id: &TerminalId, addr: &SocketAddr) -> Vec<String> {
        let bad: Vec<String> = self
            .instances
            .values()
            .filter(|p| p.id == *id && p.dial_addrs().contains(addr))
            .map(|p| p.instance.clone())
            .collect();
        for instance in &bad {
            self.instances.remove(instance);
        }
        if let Some(state) = self.ids.get_mut(id) {
            if state.addr == Some(*addr) {
                state.addr = None;
                state.verified = false;
            }
        }
        self.forget_if_unclaimed(id);
        bad
    }

    /// Records that `id`'s key answered a handshake: `name` is what its certificate says (if
    /// anything), `addr` where we reached it (`None` when it reached us). Returns whether the
    /// ID is in the table (proofs of IDs nobody claims are not kept).
    pub fn prove(
        &mut self,
        id: &TerminalId,
        name: Option<String>,
        addr: Option<SocketAddr>,
    ) -> bool {
        let Some(state) = self.ids.get_mut(id) else {
            return false;
        };
        state.verified = true;
        state.failures = 0;
        state.checked = Some(Instant::now());
        if name.is_some() {
            state.name = name;
        } else if state.name.is_none() {
            // A certificate without a name: the key is proven, the name is not; show the ID.
            state.name = Some(id.short());
        }
        if addr.is_some() {
            state.addr = addr;
        }
        true
    }

    /// Records that a check of `id` failed: it must prove itself again before it counts as
    /// present (its proven name stays).
    pub fn suspect(&mut self, id: &TerminalId) {
        if let Some(state) = self.ids.get_mut(id) {
            state.verified = false;
            state.failures = state.failures.saturating_add(1);
            state.checked = Some(Instant::now());
        }
    }

    /// Whether `id` answered a handshake since it was last suspected gone.
    pub fn is_verified(&self, id: &TerminalId) -> bool {
        self.ids.get(id).is_some_and(|s| s.verified)
    }

    /// Up to `max` IDs due for a check at `now`, most urgent first: never-checked claims of
    /// trusted IDs, liveness checks of trusted IDs, never-checked claims of other IDs, liveness
    /// checks of the others, then retries of claims that failed (backing off exponentially from
    /// `every`).
    pub fn due_for_check(
        &self,
        now: Instant,
        every: Duration,
        max: usize,
        trusted: impl Fn(&TerminalId) -> bool,
    ) -> Vec<TerminalId> {
        let mut due: Vec<((u8, Option<Instant>), TerminalId)> = self
            .ids
            .iter()
            .filter_map(|(id, s)| {
                let trusted = trusted(id);
                let class = match (s.verified, s.checked, trusted) {
                    (false, None, true) => 0,
                    (true, Some(at), true) if now.saturating_duration_since(at) >= every => 1,
                    (false, None, false) => 2,
                    (true, Some(at), false) if now.saturating_duration_since(at) >= every => 3,
                    (false, Some(at), _) => {
                        let backoff = every.saturating_mul(1 << s.failures.min(5));
                        if now.saturating_duration_since(at) < backoff {
                            return None;
                        }
                        4
                    }
                    (true, None, _) => 1 + 2 * u8::from(!trusted),
                    _ => return None,
                };
                Some(((class, s.checked), *id))
            })
            .collect();
        due.sort();
        due.into_iter().take(max).map(|(_, id)| id).collect()
    }

    /// Every mDNS instance in the table.
    pub fn instances(&self) -> Vec<String> {
        self.instances.keys().cloned().collect()
    }

    /// The mDNS instances claiming `id`.
    pub fn instances_of(&self, id: &TerminalId) -> Vec<String> {
        self.instances
            .values()
            .filter(|p| p.id == *id)
            .map(|p| p.instance.clone())
            .collect()
    }

    /// Removes every instance claiming `id`.
    pub fn remove(&mut self, id: &TerminalId) -> Option<Peer> {
        let merged = self.get(id);
        self.instances.retain(|_, p| p.id != *id);
        self.ids.remove(id);
        merged
    }

    /// The claims of `id`, the one holding the proven address first, then the latest.
    fn claims(&self, id: &TerminalId) -> Vec<&Peer> {
        let proven = self.ids.get(id).and_then(|s| s.addr);
        let mut claims: Vec<&Peer> = self.instances.values().filter(|p| p.id == *id).collect();
        claims.sort_by_key(|p| {
            let holds = proven.is_some_and(|a| p.dial_addrs().contains(&a));
            (std::cmp::Reverse(holds), std::cmp::Reverse(p.last_seen))
        });
        claims
    }

    /// The peer with `id`, its claims merged: addresses (at most `max_addrs_per_peer`, the
    /// proven claim's first), the port of the first claim, and the proven name (else the
    /// latest claim's).
    pub fn get(&self, id: &TerminalId) -> Option<Peer> {
        let claims = self.claims(id);
        let (first, rest) = claims.split_first()?;
        let mut merged = (*first).clone();
        let max = self.limits.max_addrs_per_peer.max(1);
        for other in rest {
            if other.port != merged.port {
                continue;
            }
            for addr in &other.addrs {
                if merged.addrs.len() >= max {
                    break;
                }
                merged.addrs.insert(*addr);
            }
        }
        if let Some(name) = self.ids.get(id).and_then(|s| s.name.clone()) {
            merged.name = name;
        }
        Some(merged)
    }

    /// Where to dial `id`, in order, at most `max` addresses: where it answered last, then
    /// the claims' addresses taken in turn from each claim (the proven claim first, then the
    /// latest), IPv4 first within a claim. So addresses stuffed into one claim cost at most
    /// one attempt each round, and never delay the address that worked.
    pub fn dial_plan(&self, id: &TerminalId, max: usize) -> Vec<SocketAddr> {
        let claims = self.claims(id);
        let mut plan: Vec<SocketAddr> = Vec::new();
        if let Some(addr) = self.ids.get(id).and_then(|s| s.addr) {
            if claims.iter().any(|p| p.dial_addrs().contains(&addr)) {
                plan.push(addr);
            }
        }
        let lists: Vec<Vec<SocketAddr>> = claims.iter().map(|p| p.dial_addrs()).collect();
        let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for list in &lists {
                if plan.len() >= max {
                    return plan;
                }
                if let Some(addr) = list.get(i) {
                    if !plan.contains(addr) {
                        plan.push(*addr);
                    }
                }
            }
        }
        plan.truncate(max);
        plan
    }

    /// Peers (merged by ID) with what is proven about them, sorted by name, then ID.
    pub fn views(&self) -> Vec<PeerView> {
        let ids: BTreeSet<TerminalId> = self.instances.values().map(|p| p.id).collect();
        let mut out: Vec<PeerView> = ids
            .iter()
            .filter_map(|id| {
                let state = self.ids.get(id);
                Some(PeerView {
                    peer: self.get(id)?,
                    verified: state.is_some_and(|s| s.verified),
                    name_proven: state.is_some_and(|s| s.name.is_some()),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            a.peer
                .name
                .cmp(&b.peer.name)
                .then(a.peer.id.cmp(&b.peer.id))
        });
        out
    }

    /// Peers (merged by ID), sorted by name, then ID.
    pub fn list(&self) -> Vec<Peer> {
        self.views().into_iter().map(|v| v.peer).collect()
    }

    /// Number of distinct IDs.
    pub fn len(&self) -> usize {
        self.instances
            .values()
            .map(|p| p.id)
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Finds a peer by full ID, unique ID prefix or unique *proven* name: a name only an
    /// unverified advert claims is refused ([`FindError::Unverified`]), so an impostor's advert
    /// can never make a name point at its ID.
    pub fn find(&self, query: &str) -> Result<Peer, FindError> {
        let query = query.trim();
        if let Ok(id) = query.parse::<TerminalId>() {
            return self
                .get(&id)
                .ok_or_else(|| FindError::NotFound(query.into()));
        }
        let views = self.views();
        let by_name: Vec<&Peer> = views
            .iter()
            .filter(|v| v.name_proven && v.peer.name == query)
            .map(|v| &v.peer)
            .collect();
        let lower = query.to_ascii_lowercase();
        let by_prefix: Vec<&Peer> = if query.len() >= MIN_ID_PREFIX {
            views
                .iter()
                .filter(|v| v.peer.id.to_string().starts_with(&lower))
                .map(|v| &v.peer)
                .collect()
        } else {
            Vec::new()
        };
        // Both kinds: anyone may name its key another peer's ID prefix (adverts carry IDs), so
        // a name never hides the peer a typed prefix means; two different peers are ambiguous.
        let mut matches = by_name;
        for p in by_prefix {
            if !matches.iter().any(|m| m.id == p.id) {
                matches.push(p);
            }
        }
        match matches.as_slice() {
            [] if self.instances.values().any(|p| p.name == query) => {
                Err(FindError::Unverified(query.into()))
            }
            [] if query.len() < MIN_ID_PREFIX && looks_like_id_prefix(&lower) => {
                Err(FindError::PrefixTooShort(query.into()))
            }
            [] => Err(FindError::NotFound(query.into())),
            [one] => Ok((*one).clone()),
            many => Err(FindError::Ambiguous {
                query: query.into(),
                candidates: many
                    .iter()
                    .map(|p| format!("{} ({})", p.name, p.id.short()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The IDs whose claims carry `name` but whose name is not proven (candidates for a
    /// handshake that settles it).
    pub fn unproven_named(&self, name: &str) -> Vec<TerminalId> {
        let ids: BTreeSet<TerminalId> = self
            .instances
            .values()
            .filter(|p| p.name == name)
            .map(|p| p.id)
            .filter(|id| self.ids.get(id).is_none_or(|s| s.name.is_none()))
            .collect();
        ids.into_iter().collect()
    }
}

/// Whether `text` could begin an ID: lowercase base32 (a-z, 2-7).
fn looks_like_id_prefix(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(byte: u8, name: &str) -> Peer {
        claim(byte, name, &format!("{name}-{byte}"), &["10.0.0.1"])
    }

    fn claim(byte: u8, name: &str, instance: &str, ips: &[&str]) -> Peer {
        Peer {
            id: TerminalId::from_bytes([byte; 32]),
            name: name.into(),
            instance: format!("{instance}._handoff._udp.local."),
            addrs: ips
                .iter()
                .map(|ip| PeerAddr {
                    ip: ip.parse().unwrap(),
                    scope_id: 0,
                })
                .collect(),
            port: 1,
            last_seen: Instant::now(),
        }
    }

    fn untrusted(_: &TerminalId) -> bool {
        false
    }

    fn id(byte: u8) -> TerminalId {
        TerminalId::from_bytes([byte; 32])
    }

    #[test]
    fn find_by_id_prefix_and_proven_name() {
        let mut table = PeerTable::default();
        assert_eq!(table.upsert(peer(1, "tv"), untrusted), Change::Added);
        assert_eq!(table.upsert(peer(1, "tv"), untrusted), Change::Updated);
        assert_eq!(table.len(), 1);
        table.upsert(peer(2, "phone"), untrusted);
        table.upsert(peer(3, "phone"), untrusted);
        let tv = id(1);
        // Names are claims until a handshake proves them.
        assert_eq!(
            table.find("tv").unwrap_err(),
            FindError::Unverified("tv".into())
        );
        assert_eq!(table.unproven_named("tv"), [tv]);
        assert!(table.prove(&tv, Some("tv".into()), None));
        assert!(table.unproven_named("tv").is_empty());
        assert_eq!(table.find("tv").unwrap().id, tv);
        assert_eq!(table.find(&tv.to_string()).unwrap().id, tv);
        assert_eq!(table.find(&tv.to_string()[..6]).unwrap().id, tv);
        table.prove(&id(2), Some("phone".into()), None);
        table.prove(&id(3), Some("phone".into()), None);
        assert!(matches!(
            table.find("phone"),
            Err(FindError::Ambiguous { .. })
        ));
        assert!(matches!(table.find("radio"), Err(FindError::NotFound(_))));
        // Too short to be a prefix: the message says how long one must be.
        let short = table.find(&tv.to_string()[..3]).unwrap_err();
        assert_eq!(short, FindError::PrefixTooShort(tv.to_string()[..3].into()));
        assert!(
            short.to_string().contains("at least 4 characters"),
            "{short}"
        );
        assert!(matches!(table.find("tv!"), Err(FindError::NotFound(_))));
        assert!(table.remove_instance("tv-1._handoff._udp.local.").is_some());
        assert!(table.find("tv").is_err());
        // A proof of an ID nobody claims is not kept.
        assert!(!table.prove(&tv, Some("tv".into()), None));
    }

    /// Anyone may name its own key anything, also a trusted peer's ID prefix (adverts carry
    /// IDs): a name must not take what a user types as an ID prefix to another terminal.
    #[test]
    fn a_name_shaped_like_another_peers_id_prefix_does_not_take_it() {
        let mut table = PeerTable::default();
        let tv = id(1);
        let prefix = tv.to_string()[..8].to_string();
        table.upsert(peer(1, "tv"), untrusted);
        table.upsert(peer(2, &prefix), untrusted);
        table.prove(&tv, Some("tv".into()), None);
        table.prove(&id(2), Some(prefix.clone()), None);
        match table.find(&prefix) {
            Err(FindError::Ambiguous { candidates, .. }) => {
                assert!(candidates.contains(&tv.short()), "{candidates}")
            }
            other => panic!("{prefix:?} found {other:?}"),
        }
        // A longer prefix, or the name of a peer no prefix matches, still finds its one peer.
        assert_eq!(table.find(&tv.to_string()[..10]).unwrap().id, tv);
        assert_eq!(table.find("tv").unwrap().id, tv);
    }

    #[test]
    fn an_unproven_claim_never_renames_a_proven_peer() {
        let mut table = PeerTable::default();
        table.upsert(claim(1, "tv", "tv", &["10.0.0.1"]), untrusted);
        table.prove(
            &id(1),
            Some("tv".into()),
            Some("10.0.0.1:1".parse().unwrap()),
        );
        table.upsert(claim(1, "impostor", "evil", &["10.0.0.66"]), untrusted);
        let view = &table.views()[0];
        assert_eq!(view.peer.name, "tv");
        assert!(view.verified && view.name_proven);
        assert!(matches!(
            table.find("impostor"),
            Err(FindError::Unverified(_))
        ));
        // The impostor's goodbye changes nothing; the real claim's goodbye leaves the ID to
        // prove itself again, still under its proven name.
        table.upsert(claim(1, "impostor2", "evil2", &["10.0.0.67"]), untrusted);
        assert!(table
            .remove_instance("evil2._handoff._udp.local.")
            .is_none());
        assert!(table.is_verified(&id(1)));
        assert!(table.remove_instance("tv._handoff._udp.local.").is_none());
        assert!(!table.is_verified(&id(1)));
        assert_eq!(table.views()[0].peer.name, "tv");
        assert_eq!(
            table.due_for_check(Instant::now(), Duration::from_secs(10), 8, untrusted),
            [id(1)]
        );
    }

    #[test]
    fn an_impostor_claim_does_not_hide_the_real_peer() {
        let mut table = PeerTable::default();
        table.upsert(peer(1, "tv"), untrusted);
        let mut impostor = peer(1, "tv");
        impostor.instance = "evil._handoff._udp.local.".into();
        impostor.addrs = BTreeSet::from([PeerAddr {
            ip: "10.0.0.66".parse().unwrap(),
            scope_id: 0,
        }]);
        table.upsert(impostor, untrusted);
        let merged = table.find(&id(1).to_string()).unwrap();
        assert_eq!(
            merged.addrs.len(),
            2,
            "both claims are dialled; the handshake decides"
        );
        let bad = table.drop_claim(&merged.id, &"10.0.0.66:1".parse().unwrap());
        assert_eq!(bad, ["evil._handoff._udp.local."]);
        assert_eq!(table.get(&id(1)).unwrap().addrs.len(), 1);
        // A goodbye of one instance keeps the ID while another instance still claims it.
        table.upsert(peer(1, "tv"), untrusted);
        assert!(table.remove_instance("nope").is_none());
    }

    #[test]
    fn the_dial_plan_starts_where_the_key_answered_and_is_bounded() {
        let mut table = PeerTable::default();
        table.upsert(claim(1, "tv", "tv", &["10.99.0.2"]), untrusted);
        let stuffed: Vec<String> = (1..=40).map(|i| format!("10.0.0.{i}")).collect();
        let stuffed: Vec<&str> = stuffed.iter().map(String::as_str).collect();
        table.upsert(claim(1, "tv", "stuffed", &stuffed), untrusted);
        // Unproven: one address from each claim in turn, so the real one comes second.
        let plan = table.dial_plan(&id(1), 4);
        assert_eq!(plan.len(), 4);
        assert!(
            plan[..2].contains(&"10.99.0.2:1".parse().unwrap()),
            "{plan:?}"
        );
        // Proven: the address that answered comes first.
        table.prove(
            &id(1),
            Some("tv".into()),
            Some("10.99.0.2:1".parse().unwrap()),
        );
        assert_eq!(
            table.dial_plan(&id(1), 4)[0],
            "10.99.0.2:1".parse().unwrap()
        );
        // The stuffed claim kept only max_addrs_per_peer addresses, and so does the merge.
        assert_eq!(table.get(&id(1)).unwrap().addrs.len(), 16);
        assert_eq!(table.take_hits().truncated, 1);
    }

    #[test]
    fn a_full_table_makes_room_with_untrusted_unproven_claims_first() {
        let mut table = PeerTable::new(TableLimits {
            max_claims: 3,
            max_addrs_per_peer: 4,
        });
        let trusted = |id: &TerminalId| *id == TerminalId::from_bytes([2; 32]);
        table.upsert(peer(1, "proven"), trusted);
        table.prove(&id(1), Some("proven".into()), None);
        table.upsert(peer(2, "trusted"), trusted);
        table.upsert(peer(3, "fake3"), trusted);
        // A fake replaces the older fake, never the proven or the trusted claim.
        assert_eq!(table.take_hits(), TableHits::default());
        assert_eq!(table.upsert(peer(4, "fake4"), trusted), Change::Added);
        assert_eq!(table.take_hits().evicted, 1);
        let ids: BTreeSet<TerminalId> = table.list().iter().map(|p| p.id).collect();
        assert_eq!(ids, BTreeSet::from([id(1), id(2), id(4)]));
        // A claim of a trusted ID outranks the fake; once only proven and trusted claims are
        // left, a fake is refused.
        assert_eq!(
            table.upsert(peer(2, "trusted-again"), trusted),
            Change::Updated
        );
        assert_eq!(table.upsert(peer(5, "fake5"), trusted), Change::Refused);
        assert_eq!(table.len(), 2);
        // A trusted ID's claim outranks even a proven claim of an untrusted ID (an attacker
        // can make its own keys answer).
        let mut other = peer(2, "trusted");
        other.instance = "trusted-2b".into();
        assert_eq!(table.upsert(other, trusted), Change::Updated);
        assert_eq!(
            table.list().iter().map(|p| p.id).collect::<Vec<_>>(),
            [id(2)]
        );
        // At most MAX_CLAIMS_PER_ID claims of one ID.
        let mut table = PeerTable::default();
        for i in 0..10 {
            table.upsert(claim(7, "x", &format!("x{i}"), &["10.0.0.1"]), untrusted);
        }
        assert_eq!(table.instances_of(&id(7)).len(), MAX_CLAIMS_PER_ID);
    }

    #[test]
    fn checks_are_ordered_and_back_off() {
        let mut table = PeerTable::default();
        let trusted = |id: &TerminalId| *id == TerminalId::from_bytes([2; 32]);
        table.upsert(peer(1, "new"), trusted);
        table.upsert(peer(2, "trusted"), trusted);
        let now = Instant::now();
        let every = Duration::from_secs(10);
        assert_eq!(table.due_for_check(now, every, 8, trusted), [id(2), id(1)]);
        assert_eq!(table.due_for_check(now, every, 1, trusted), [id(2)]);
        table.prove(&id(2), None, None);
        table.suspect(&id(1));
        assert!(table
            .due_for_check(Instant::now(), every, 8, trusted)
            .is_empty());
        let later = Instant::now() + Duration::from_secs(21);
        assert_eq!(
            table.due_for_check(later, every, 8, trusted),
            [id(2), id(1)]
        );
        table.suspect(&id(1));
        let later = Instant::now() + Duration::from_secs(21);
        assert_eq!(table.due_for_check(later, every, 8, trusted), [id(2)]);
    }

    #[test]
    fn link_local_keeps_scope() {
        let a = PeerAddr {
            ip: "fe80::1".parse().unwrap(),
            scope_id: 3,
        };
        assert_eq!(a.to_string(), "fe80::1%3");
        assert_eq!(a.socket_addr(5).to_string(), "[fe80::1%3]:5");
    }
}
