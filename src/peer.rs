//! The peer table: who mDNS says is on the LAN (DESIGN §3).
//!
//! Entries are claims until a QUIC handshake pins the ID. Repeated resolutions update an entry; a
//! goodbye removes it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use std::time::Instant;

use crate::identity::TerminalId;

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
}

/// The peer table, keyed by mDNS instance: several instances may claim one ID (a terminal on two
/// networks, or an impostor). Lookups merge them by ID, so an impostor's claim cannot hide the
/// real terminal's addresses; a dial that fails the key check drops the instance that claimed it.
#[derive(Debug, Default)]
pub struct PeerTable {
    instances: HashMap<String, Peer>,
}

/// What an update did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The ID was not in the table before.
    Added,
    Updated,
}

impl PeerTable {
    /// Records a resolution; an instance's addresses are replaced by its latest resolution.
    pub fn upsert(&mut self, peer: Peer) -> Change {
        let known = self.instances.values().any(|p| p.id == peer.id);
        self.instances.insert(peer.instance.clone(), peer);
        if known {
            Change::Updated
        } else {
            Change::Added
        }
    }

    /// Removes an mDNS instance (a goodbye); returns the peer if no other instance claims its ID.
    pub fn remove_instance(&mut self, instance: &str) -> Option<Peer> {
        let peer = self.instances.remove(instance)?;
        (!self.instances.values().any(|p| p.id == peer.id)).then_some(peer)
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
        bad
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
        merged
    }

    /// The peer with `id`, its instances merged: all addresses, the latest name and port.
    pub fn get(&self, id: &TerminalId) -> Option<Peer> {
        let mut claims: Vec<&Peer> = self.instances.values().filter(|p| p.id == *id).collect();
        claims.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
        let (latest, rest) = claims.split_first()?;
        let mut merged = (*latest).clone();
        for other in rest {
            if other.port == merged.port {
                merged.addrs.extend(other.addrs.iter().copied());
            }
        }
        Some(merged)
    }

    /// Peers (merged by ID), sorted by name, then ID.
    pub fn list(&self) -> Vec<Peer> {
        let ids: BTreeSet<TerminalId> = self.instances.values().map(|p| p.id).collect();
        let mut out: Vec<Peer> = ids.iter().filter_map(|id| self.get(id)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
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

    /// Finds a peer by full ID, unique ID prefix or unique name.
    pub fn find(&self, query: &str) -> Result<Peer, FindError> {
        let query = query.trim();
        if let Ok(id) = query.parse::<TerminalId>() {
            return self
                .get(&id)
                .ok_or_else(|| FindError::NotFound(query.into()));
        }
        let peers = self.list();
        let by_name: Vec<&Peer> = peers.iter().filter(|p| p.name == query).collect();
        let lower = query.to_ascii_lowercase();
        let by_prefix: Vec<&Peer> = if query.len() >= MIN_ID_PREFIX {
            peers
                .iter()
                .filter(|p| p.id.to_string().starts_with(&lower))
                .collect()
        } else {
            Vec::new()
        };
        let matches = if by_name.is_empty() {
            by_prefix
        } else {
            by_name
        };
        match matches.as_slice() {
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
        Peer {
            id: TerminalId::from_bytes([byte; 32]),
            name: name.into(),
            instance: format!("{name}-{byte}._handoff._udp.local."),
            addrs: BTreeSet::from([PeerAddr {
                ip: "10.0.0.1".parse().unwrap(),
                scope_id: 0,
            }]),
            port: 1,
            last_seen: Instant::now(),
        }
    }

    #[test]
    fn find_by_id_prefix_and_name() {
        let mut table = PeerTable::default();
        assert_eq!(table.upsert(peer(1, "tv")), Change::Added);
        assert_eq!(table.upsert(peer(1, "tv")), Change::Updated);
        assert_eq!(table.len(), 1);
        table.upsert(peer(2, "phone"));
        table.upsert(peer(3, "phone"));
        let tv = TerminalId::from_bytes([1; 32]);
        assert_eq!(table.find("tv").unwrap().id, tv);
        assert_eq!(table.find(&tv.to_string()).unwrap().id, tv);
        assert_eq!(table.find(&tv.to_string()[..6]).unwrap().id, tv);
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
    }

    #[test]
    fn an_impostor_claim_does_not_hide_the_real_peer() {
        let mut table = PeerTable::default();
        table.upsert(peer(1, "tv"));
        let mut impostor = peer(1, "tv");
        impostor.instance = "evil._handoff._udp.local.".into();
        impostor.addrs = BTreeSet::from([PeerAddr {
            ip: "10.0.0.66".parse().unwrap(),
            scope_id: 0,
        }]);
        table.upsert(impostor);
        let merged = table.find("tv").unwrap();
        assert_eq!(
            merged.addrs.len(),
            2,
            "both claims are dialled; the handshake decides"
        );
        let bad = table.drop_claim(&merged.id, &"10.0.0.66:1".parse().unwrap());
        assert_eq!(bad, ["evil._handoff._udp.local."]);
        assert_eq!(table.find("tv").unwrap().addrs.len(), 1);
        // A goodbye of one instance keeps the ID while another instance still claims it.
        table.upsert(peer(1, "tv"));
        assert!(table.remove_instance("nope").is_none());
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
