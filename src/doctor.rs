//! `handoff doctor`: checks, from this host, what a daemon with a given config needs from the
//! network: the interfaces discovery uses, multicast membership on them, which peers answer a
//! pinned QUIC handshake, whether the configured server answers with its pinned ID, whether the
//! daemon itself runs, and which UDP ports a firewall must let through.
//!
//! Every check is a [`Check`] line: ok or not ok, what was seen, and a hint when not ok. The
//! doctor dials with a throwaway identity, so it needs no access to the daemon's key.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::DaemonConfig;
use crate::daemon::{explain_connect_error, is_key_mismatch, DIAL_LIMITS};
use crate::identity::{Identity, TerminalId};
use crate::tls::{self, SERVER_NAME};

const MDNS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const MDNS_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What was checked, e.g. `interface eth0`, `server 192.0.2.10:47700`.
    pub check: String,
    pub ok: bool,
    /// What was seen.
    pub detail: String,
    /// What to do about it, when not ok (and for the firewall line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// A network interface as the kernel reports it.
#[derive(Debug, Clone)]
struct Interface {
    name: String,
    index: u32,
    up: bool,
    multicast: bool,
    loopback: bool,
    addrs: Vec<IpAddr>,
}

/// Runs every check for `config`, listening `wait` for peers on mDNS.
pub async fn run(config: &DaemonConfig, wait: Duration) -> Vec<Check> {
    let mut report = Vec::new();
    let interfaces = list_interfaces();
    let used = interfaces_used(config, &interfaces, &mut report);
    for iface in &used {
        report.push(multicast_membership(iface));
    }
    report.push(daemon_running(&config.control_socket).await);
    let names: Vec<String> = used.iter().map(|i| i.name.clone()).collect();
    match dial_checks(config, &names, wait).await {
        Ok(checks) => report.extend(checks),
        Err(failed) => report.push(failed),
    }
    report.push(firewall(config, &used));
    report
}

/// The checks that dial (the server's addresses, then every peer found on `interfaces`), from a
/// throwaway identity; `Err` when dialling is impossible here at all.
async fn dial_checks(
    config: &DaemonConfig,
    interfaces: &[String],
    wait: Duration,
) -> Result<Vec<Check>, Check> {
    let probe = Identity::generate().map_err(|e| {
        Check::fail(
            "quic",
            format!("cannot make a probe identity: {e}"),
            "this is a bug; please report it",
        )
    })?;
    let endpoint = probe_endpoint().map_err(|e| {
        Check::fail(
            "quic",
            format!("cannot open a UDP socket: {e}"),
            "the doctor needs to send UDP; check the sandbox or seccomp profile",
        )
    })?;
    let mut report = Vec::new();
    match &config.server {
        Some(server) => {
            for addr in &server.addrs {
                report.push(server_answers(&endpoint, &probe, server.id, addr).await);
            }
        }
        None => report.push(Check::ok(
            "server",
            "none configured ([server]); this terminal can pull but not hand off",
        )),
    }
    report.extend(peers_answer(&endpoint, &probe, interfaces, wait).await);
    endpoint.close(0u32.into(), b"doctor done");
    Ok(report)
}

/// The interfaces discovery uses: the configured ones (each must exist, be up and do multicast),
/// or every up, multicast, non-loopback interface.
fn interfaces_used(
    config: &DaemonConfig,
    all: &[Interface],
    report: &mut Vec<Check>,
) -> Vec<Interface> {
    let mut used = Vec::new();
    if config.interfaces.is_empty() {
        used = all
            .iter()
            .filter(|i| i.up && i.multicast && !i.loopback && !i.addrs.is_empty())
            .cloned()
            .collect();
        if used.is_empty() {
            report.push(Check::fail(
                "interfaces",
                "no interface is up with multicast and an address",
                "connect to a network, or name interfaces in [discovery] interfaces",
            ));
        }
    } else {
        for name in &config.interfaces {
            match configured_interface(name, all) {
                Ok(i) => used.push(i.clone()),
                Err(failed) => report.push(failed),
            }
        }
    }
    for i in &used {
        let addrs: Vec<String> = i.addrs.iter().map(|a| scoped(*a, i.index)).collect();
        let kind = if i.loopback { "loopback" } else { "multicast" };
        report.push(Check::ok(
            format!("interface {}", i.name),
            format!("up, {kind}, {}", addrs.join(" ")),
        ));
    }
    used
}

/// One interface named in `[discovery] interfaces`: usable for mDNS, or why not. Loopback needs
/// no multicast flag: the kernel loops multicast back on `lo` regardless, and mDNS works there.
fn configured_interface<'a>(name: &str, all: &'a [Interface]) -> Result<&'a Interface, Check> {
    match all.iter().find(|i| i.name == name) {
        None => Err(Check::fail(
            format!("interface {name}"),
            "does not exist",
            format!("fix [discovery] interfaces; this host has: {}", names(all)),
        )),
        Some(i) if !i.up => Err(Check::fail(
            format!("interface {name}"),
            "is down",
            format!("bring it up (ip link set {name} up)"),
        )),
        Some(i) if !i.multicast && !i.loopback => Err(Check::fail(
            format!("interface {name}"),
            "has multicast off",
            format!("ip link set {name} multicast on"),
        )),
        Some(i) if i.addrs.is_empty() => Err(Check::fail(
            format!("interface {name}"),
            "has no address",
            "give it an address (DHCP, SLAAC or static)",
        )),
        Some(i) => Ok(i),
    }
}

/// The interfaces named in `[discovery] interfaces` that mDNS cannot use now (missing, down, no
/// multicast, no address), each as a not-ok check: what the daemon warns about when it starts.
pub fn unusable_interfaces(names: &[String]) -> Vec<Check> {
    if names.is_empty() {
        return Vec::new();
    }
    let all = list_interfaces();
    names
        .iter()
        .filter_map(|name| configured_interface(name, &all).err())
        .collect()
}

fn names(all: &[Interface]) -> String {
    let list: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
    list.join(", ")
}

fn scoped(ip: IpAddr, index: u32) -> String {
    match ip {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => format!("{v6}%{index}"),
        other => other.to_string(),
    }
}

/// Joins the mDNS groups on `iface` from a throwaway socket, as the daemon's mDNS does.
fn multicast_membership(iface: &Interface) -> Check {
    let name = format!("multicast {}", iface.name);
    let mut joined = Vec::new();
    let mut failed = Vec::new();
    if let Some(IpAddr::V4(v4)) = iface.addrs.iter().find(|a| a.is_ipv4()) {
        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| s.join_multicast_v4(&MDNS_V4, v4))
        {
            Ok(()) => joined.push(MDNS_V4.to_string()),
            Err(e) => failed.push(format!("{MDNS_V4}: {e}")),
        }
    }
    if iface.addrs.iter().any(|a| a.is_ipv6()) {
        match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
            .and_then(|s| s.join_multicast_v6(&MDNS_V6, iface.index))
        {
            Ok(()) => joined.push(MDNS_V6.to_string()),
            Err(e) => failed.push(format!("{MDNS_V6}: {e}")),
        }
    }
    if failed.is_empty() && !joined.is_empty() {
        Check::ok(name, format!("joined {}", joined.join(" and ")))
    } else {
        Check::fail(
            name,
            format!("cannot join: {}", failed.join("; ")),
            "the interface or a sandbox refuses multicast; mDNS discovery cannot work here",
        )
    }
}

async fn daemon_running(socket: &Path) -> Check {
    let name = "daemon";
    match crate::control::call(
        socket,
        &crate::control::ControlRequest::Status,
        Duration::from_secs(2),
    )
    .await
    {
        Ok(reply) => match reply.status {
            Some(s) => {
                let server = match &s.server {
                    Some(server) if server.connected => "connected to its server",
                    Some(_) => "NOT connected to its server",
                    None => "no server configured",
                };
                Check::ok(
                    name,
                    format!(
                        "running as {} ({}), {} peers, {server}",
                        s.name,
                        &s.id[..10],
                        s.peers
                    ),
                )
            }
            None => Check::fail(
                name,
                format!("{} answered without a status", socket.display()),
                "is another program on this socket?",
            ),
        },
        Err(e) => Check::fail(
            name,
            format!("no daemon on {}: {e}", socket.display()),
            "start it (systemctl start handoff-daemon) or point --config at its config",
        ),
    }
}

fn probe_endpoint() -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
        .or_else(|_| quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))
}

/// Dials `addr` pinning `expected`: Ok(()) when the handshake completes.
async fn dial(
    endpoint: &quinn::Endpoint,
    probe: &Identity,
    expected: TerminalId,
    addr: SocketAddr,
) -> Result<(), String> {
    let config = tls::client_config(probe, expected, DIAL_LIMITS).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"doctor");
            Ok(())
        }
        Ok(Err(e)) if is_key_mismatch(&e) => Err(explain_connect_error(&e)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {DIAL_TIMEOUT:?}")),
    }
}

async fn server_answers(
    endpoint: &quinn::Endpoint,
    probe: &Identity,
    id: TerminalId,
    addr: &str,
) -> Check {
    let name = format!("server {addr}");
    let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(addr).await {
        Ok(list) => list.collect(),
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot resolve: {e}"),
                "fix [server] addr, or this host's DNS",
            )
        }
    };
    let mut errors = Vec::new();
    for socket in resolved {
        match dial(endpoint, probe, id, socket).await {
            Ok(()) => {
                return Check::ok(
                    name,
                    format!("answers at {socket} with the pinned id {}", id.short()),
                )
            }
            Err(e) => errors.push(format!("{socket}: {e}")),
        }
    }
    let detail = errors.join("; ");
    let hint = if detail.contains("expected key") {
        "the server holds another key: check [server] id against `handoff id` on the server"
            .to_string()
    } else {
        let port = addr.rsplit(':').next().unwrap_or("47700");
        format!("is the server running? a firewall on the way must allow UDP {port} to it")
    };
    Check::fail(name, detail, hint)
}

/// Browses mDNS for `wait`, then dials every peer found, pinning the ID it advertised.
async fn peers_answer(
    endpoint: &quinn::Endpoint,
    probe: &Identity,
    interfaces: &[String],
    wait: Duration,
) -> Vec<Check> {
    let found = match crate::discovery::browse_for(interfaces, wait).await {
        Ok(found) => found,
        Err(e) => {
            return vec![Check::fail(
                "peers",
                format!("cannot browse mDNS: {e}"),
                "is UDP 5353 usable here?",
            )]
        }
    };
    if found.is_empty() {
        return vec![Check::fail(
            "peers",
            format!("no handoff daemon answered on mDNS within {wait:?}"),
            "are other terminals on this network and running? \
             a firewall must allow UDP 5353 (mDNS) in and out",
        )];
    }
    let mut by_id: BTreeMap<TerminalId, crate::peer::Peer> = BTreeMap::new();
    for peer in found {
        by_id
            .entry(peer.id)
            .and_modify(|p| p.addrs.extend(peer.addrs.iter().copied()))
            .or_insert(peer);
    }
    let mut report = Vec::new();
    for peer in by_id.into_values() {
        let name = format!("peer {} ({})", peer.name, peer.id.short());
        let mut errors = Vec::new();
        let mut answered = None;
        for addr in peer.dial_addrs() {
            match dial(endpoint, probe, peer.id, addr).await {
                Ok(()) => {
                    answered = Some(addr);
                    break;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        report.push(match answered {
            Some(addr) => Check::ok(name, format!("answers at {addr}")),
            None => Check::fail(
                name,
                errors.join("; "),
                format!(
                    "seen on mDNS but QUIC does not get through: a firewall must allow UDP {}",
                    peer.port
                ),
            ),
        });
    }
    report
}

fn firewall(config: &DaemonConfig, used: &[Interface]) -> Check {
    let on: Vec<&str> = used.iter().map(|i| i.name.as_str()).collect();
    let mut detail = format!(
        "allow in and out on {}: UDP 5353 (mDNS, groups 224.0.0.251 and ff02::fb) and \
         UDP {} (QUIC from peers)",
        if on.is_empty() {
            "the LAN".to_string()
        } else {
            on.join(", ")
        },
        config.listen.port()
    );
    if let Some(server) = &config.server {
        detail.push_str(&format!(
            "; out to the server: UDP {}",
            server.addrs.join(", ")
        ));
    }
    Check {
        check: "firewall".into(),
        ok: true,
        detail,
        hint: Some(
            "firewalld: firewall-cmd --permanent --add-service=handoff && firewall-cmd --reload; \
             ufw: ufw allow handoff (the package installs both; else see systemd/README.md)"
                .into(),
        ),
    }
}

/// Every interface with its index, flags and addresses, as the kernel reports them to this
/// process: names and indexes from `if_nameindex(3)`, flags from `SIOCGIFFLAGS`, addresses from
/// netlink (if-addrs). Not from /sys/class/net: in a container that is often the sysfs of
/// another network namespace, with other interfaces and other indexes.
fn list_interfaces() -> Vec<Interface> {
    let addrs = if_addrs::get_if_addrs().unwrap_or_default();
    // Any socket serves for the flags ioctl; it is never bound or used to send.
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .or_else(|_| std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)))
        .ok();
    let mut out: Vec<Interface> = name_index()
        .into_iter()
        .map(|(name, index)| {
            let flags = probe
                .as_ref()
                .and_then(|socket| interface_flags(socket, &name))
                .unwrap_or(0);
            Interface {
                up: flags & libc::IFF_UP != 0,
                multicast: flags & libc::IFF_MULTICAST != 0,
                loopback: flags & libc::IFF_LOOPBACK != 0,
                addrs: addrs
                    .iter()
                    .filter(|a| a.name == name)
                    .map(|a| a.ip())
                    .collect(),
                name,
                index,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The names and indexes of this network namespace's interfaces.
fn name_index() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns null or an array ending with a zeroed entry, whose names are
    // NUL-terminated strings; it stays valid until the if_freenameindex below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.push((name, (*entry).if_index));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The `IFF_*` flags of interface `name`, or None when the kernel does not say.
fn interface_flags(socket: &std::net::UdpSocket, name: &str) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name (the rest of the zeroed array) and
    // writes ifru_flags of the request it is given, which lives across the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFFLAGS the union holds the flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    // The flags are an unsigned 16-bit field that the C type calls short.
    Some(libc::c_int::from(flags as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, up: bool, multicast: bool, loopback: bool) -> Interface {
        Interface {
            name: name.into(),
            index: 1,
            up,
            multicast,
            loopback,
            addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }

    #[test]
    fn loopback_is_listed_up_with_the_kernels_index() {
        let all = list_interfaces();
        let lo = all
            .iter()
            .find(|i| i.loopback)
            .unwrap_or_else(|| panic!("no loopback in {all:?}"));
        assert!(lo.up, "{lo:?}");
        assert!(lo.index > 0, "{lo:?}");
        // SAFETY: the name is a valid C string; if_nametoindex only reads it.
        let name = std::ffi::CString::new(lo.name.clone()).unwrap();
        assert_eq!(unsafe { libc::if_nametoindex(name.as_ptr()) }, lo.index);
    }

    #[test]
    fn loopback_needs_no_multicast_flag_but_other_interfaces_do() {
        let all = [
            iface("lo", true, false, true),
            iface("eth0", true, false, false),
            iface("eth1", false, true, false),
        ];
        assert!(configured_interface("lo", &all).is_ok());
        let detail = |name| configured_interface(name, &all).unwrap_err().detail;
        assert_eq!(detail("eth0"), "has multicast off");
        assert_eq!(detail("eth1"), "is down");
        let missing = configured_interface("wlan9", &all).unwrap_err();
        assert_eq!(missing.check, "interface wlan9");
        assert_eq!(missing.detail, "does not exist");
        assert!(missing.hint.unwrap().contains("lo, eth0, eth1"));
    }
}
