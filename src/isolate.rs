//! Private network namespaces, so the demo never sends a packet beyond this machine.
//!
//! mdns-sd joins the mDNS multicast group on every interface when it starts, before it can be
//! told to use only some. Inside a fresh network namespace the only interface is loopback, so
//! nothing can leave the machine. Must be called before any thread is started.

use std::io;

/// Moves the calling process into a new network namespace holding only `lo`, and brings `lo` up.
///
/// As root this is a plain `unshare(CLONE_NEWNET)`; otherwise it tries an unprivileged user
/// namespace first. Call it before starting threads (a user namespace requires it).
pub fn enter_private_network() -> io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; it fails cleanly if not permitted.
    let as_root = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
    if !as_root {
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // SAFETY: as above.
        if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        std::fs::write("/proc/self/setgroups", "deny")?;
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))?;
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    }
    loopback_up()
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket used only for two interface ioctls on a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            Err(io::Error::last_os_error())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}
