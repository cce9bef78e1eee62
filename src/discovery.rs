//! mDNS discovery (DESIGN §3) through mdns-sd: advertise this daemon and browse for peers.
//!
//! The service type is `_handoff._udp.local.`; TXT carries only `v`, `id` and `name`. What mDNS says
//! is a claim: a peer is only ever reached through a QUIC handshake that pins the advertised ID.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::identity::TerminalId;
use crate::peer::{Peer, PeerAddr};
use crate::wire::txt::Advert;

pub const SERVICE_TYPE: &str = "_handoff._udp.local.";

/// How long a verified peer has to answer before it is dropped.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for the goodbye to go out.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// What browsing reports to the daemon.
#[derive(Debug, Clone)]
pub enum DiscoveryEvent {
    /// A peer resolved (new, or an update of one already known).
    Resolved(Peer),
    /// A peer said goodbye (or its records expired).
    Removed { instance: String },
    /// A resolution that is not a usable handoff advert.
    Ignored { instance: String, reason: String },
}

/// A running advertisement and browse.
pub struct Discovery {
    mdns: ServiceDaemon,
    fullname: String,
    events: mdns_sd::Receiver<ServiceEvent>,
    me: TerminalId,
}

impl Discovery {
    /// Registers `advert` on `port` and starts browsing, on `interfaces` only (empty: all that the
    /// crate selects). `listen` decides the advertised addresses: a specific IP is advertised as
    /// is, an unspecified one lets mdns-sd advertise each interface's addresses.
    pub fn start(
        interfaces: &[String],
        advert: &Advert,
        listen: SocketAddr,
    ) -> Result<Self, DiscoveryError> {
        let mdns = ServiceDaemon::new()?;
        if !interfaces.is_empty() {
            mdns.disable_interface(IfKind::All)?;
            let kinds: Vec<IfKind> = interfaces.iter().map(|n| IfKind::Name(n.clone())).collect();
            mdns.enable_interface(kinds)?;
        }
        let short = advert.id.short();
        let instance = format!("{}-{}", advert.name, &short[..6]);
        let host = format!("handoff-{short}.local.");
        let props: Vec<(&str, String)> = advert.properties();
        let props: Vec<(&str, &str)> = props.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let info = if listen.ip().is_unspecified() {
            ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                "",
                listen.port(),
                &props[..],
            )?
            .enable_addr_auto()
        } else {
            ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                listen.ip(),
                listen.port(),
                &props[..],
            )?
        };
        let fullname = info.get_fullname().to_string();
        mdns.register(info)?;
        let events = mdns.browse(SERVICE_TYPE)?;
        Ok(Self {
            mdns,
            fullname,
            events,
            me: advert.id,
        })
    }

    /// The next browse event about another daemon; `None` when mdns-sd has stopped.
    ///
    /// Cancel-safe.
    pub async fn next(&self) -> Option<DiscoveryEvent> {
        loop {
            let event = self.events.recv_async().await.ok()?;
            match event {
                ServiceEvent::ServiceResolved(svc) => {
                    if svc.ty_domain != SERVICE_TYPE {
                        continue;
                    }
                    let props = svc.txt_properties.iter().map(|p| (p.key(), p.val_str()));
                    let advert = match Advert::parse(props) {
                        Ok(a) => a,
                        Err(e) => {
                            return Some(DiscoveryEvent::Ignored {
                                instance: svc.fullname.clone(),
                                reason: e.to_string(),
                            })
                        }
                    };
                    if advert.id == self.me {
                        continue;
                    }
                    let addrs: BTreeSet<PeerAddr> = svc.addresses.iter().map(peer_addr).collect();
                    return Some(DiscoveryEvent::Resolved(Peer {
                        id: advert.id,
                        name: advert.name,
                        instance: svc.fullname.clone(),
                        addrs,
                        port: svc.port,
                        last_seen: Instant::now(),
                    }));
                }
                ServiceEvent::ServiceRemoved(_, fullname) => {
                    if fullname == self.fullname {
                        continue;
                    }
                    return Some(DiscoveryEvent::Removed { instance: fullname });
                }
                _ => continue,
            }
        }
    }

    /// Asks whether `instance` is still there (RFC 6762 §10.4): if nothing answers within
    /// [`VERIFY_TIMEOUT`], mdns-sd flushes its records and reports it removed.
    pub fn verify(&self, instance: &str) {
        if let Err(e) = self.mdns.verify(instance.to_string(), VERIFY_TIMEOUT) {
            tracing::debug!("cannot verify {instance}: {e}");
        }
    }

    /// Says goodbye (so peers drop us within about a second) and stops mdns-sd.
    pub async fn shutdown(&self) {
        if let Ok(rx) = self.mdns.unregister(&self.fullname) {
            let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv_async()).await;
        }
        if let Ok(rx) = self.mdns.shutdown() {
            let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv_async()).await;
        }
    }
}

/// Browses (without advertising) on `interfaces` for `wait` and returns every peer resolved
/// (for `handoff doctor`).
pub async fn browse_for(
    interfaces: &[String],
    wait: Duration,
) -> Result<Vec<Peer>, DiscoveryError> {
    let mdns = ServiceDaemon::new()?;
    if !interfaces.is_empty() {
        mdns.disable_interface(IfKind::All)?;
        let kinds: Vec<IfKind> = interfaces.iter().map(|n| IfKind::Name(n.clone())).collect();
        mdns.enable_interface(kinds)?;
    }
    let events = mdns.browse(SERVICE_TYPE)?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv_async()).await {
        let ServiceEvent::ServiceResolved(svc) = event else {
            continue;
        };
        let props = svc.txt_properties.iter().map(|p| (p.key(), p.val_str()));
        if let Ok(advert) = Advert::parse(props) {
            found.push(Peer {
                id: advert.id,
                name: advert.name,
                instance: svc.fullname.clone(),
                addrs: svc.addresses.iter().map(peer_addr).collect(),
                port: svc.port,
                last_seen: Instant::now(),
            });
        }
    }
    if let Ok(rx) = mdns.shutdown() {
        let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv_async()).await;
    }
    Ok(found)
}

fn peer_addr(ip: &ScopedIp) -> PeerAddr {
    match ip {
        ScopedIp::V6(v6) if v6.addr().is_unicast_link_local() => PeerAddr {
            ip: IpAddr::V6(*v6.addr()),
            scope_id: v6.scope_id().index,
        },
        other => PeerAddr {
            ip: other.to_ip_addr(),
            scope_id: 0,
        },
    }
}
