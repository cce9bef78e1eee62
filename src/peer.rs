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

/// Why a query names no single peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error("no peer matches {0:?} (see `handoff peers`)")]
    NotFound(String),
    #[error("{query:?} matches several peers: {candidates}")]
    Ambiguous { query: String, candidates: String },
}

#[derive(Debug, Default)]
pub struct PeerTable {
    peers: HashMap<TerminalId, Peer>,
}

/// What an update did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
}

impl PeerTable {
    /// Records a resolution of `peer`; addresses are replaced by the latest resolution.
    pub fn upsert(&mut self, peer: Peer) -> Change {
        match self.peers.insert(peer.id, peer) {
            None => Change::Added,
            Some(_) => Change::Updated,
        }
    }

    /// Removes the peer registered under an mDNS instance name (a goodbye).
    pub fn remove_instance(&mut self, instance: &str) -> Option<Peer> {
        let id = self.peers.values().find(|p| p.instance == instance)?.id;
        self.peers.remove(&id)
    }

    pub fn remove(&mut self, id: &TerminalId) -> Option<Peer> {
        self.peers.remove(id)
    }

    pub fn get(&self, id: &TerminalId) -> Option<&Peer> {
        self.peers.get(id)
    }

    /// Peers sorted by name, then ID.
    pub fn list(&self) -> Vec<Peer> {
        let mut out: Vec<Peer> = self.peers.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Finds a peer by full ID, unique ID prefix or unique name.
    pub fn find(&self, query: &str) -> Result<Peer, FindError> {
        let query = query.trim();
        if let Ok(id) = query.parse::<TerminalId>() {
            return self
                .peers
                .get(&id)
                .cloned()
                .ok_or_else(|| FindError::NotFound(query.into()));
        }
        let by_name: Vec<&Peer> = self.peers.values().filter(|p| p.name == query).collect();
        let lower = query.to_ascii_lowercase();
        let by_prefix: Vec<&Peer> = if query.len() >= 4 {
            self.peers
                .values()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(byte: u8, name: &str) -> Peer {
        Peer {
            id: TerminalId::from_bytes([byte; 32]),
            name: name.into(),
            instance: format!("{name}._handoff._udp.local."),
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
        assert!(table.remove_instance("tv._handoff._udp.local.").is_some());
        assert!(table.find("tv").is_err());
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
