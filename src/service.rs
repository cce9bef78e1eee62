//! Running under systemd: `sd_notify` readiness, stopping and watchdog messages.
//!
//! With `Type=notify` systemd passes `NOTIFY_SOCKET`; the daemon and server send `READY=1` once
//! they serve (endpoint bound, mDNS registered, store open, HTTP bound), `STOPPING=1` when
//! shutdown begins, `RELOADING=1` then `READY=1` around a SIGHUP reload, and `WATCHDOG=1` at half the `WatchdogSec` interval when one is set. Without
//! `NOTIFY_SOCKET` every call does nothing.
//!
//! Started by hand, a process gets the shell's soft limit on open files (often 1024, as low as
//! the HTTP API's default connection cap): [`raise_open_files_limit`] raises it to the hard limit.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification (newline-separated `KEY=VALUE` lines); errors are logged, not fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): the name follows a leading NUL.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}

/// Tells systemd a reload (SIGHUP) began; `READY=1` ends it. `MONOTONIC_USEC` lets
/// `Type=notify-reload` match the message to the signal it sent.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let usec = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0 {
        now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
    } else {
        0
    };
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// The watchdog interval systemd asks for, if it asks and means this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval until the returned task is aborted.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()? / 2;
    Some(tokio::spawn(async move {
        loop {
            notify("WATCHDOG=1");
            tokio::time::sleep(interval).await;
        }
    }))
}

/// Open files a daemon or server may need besides its HTTP connections: sockets, the store, the
/// control clients, hooks, the files it reads and writes.
pub const OPEN_FILES_SPARE: u64 = 256;

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, and warns when even
/// that leaves fewer than `needed` descriptors for what `needs` names: outside systemd the soft
/// limit is often 1024, and accepting would fail (EMFILE) before a connection cap that high is
/// reached. Returns the soft limit now in force (`None` if it cannot be read).
pub fn raise_open_files_limit(needed: u64, needs: &str) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!("cannot read the open files limit: {e}");
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "raised the open files limit"
            );
            limit.rlim_cur = raised.rlim_cur;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!("cannot raise the open files limit: {e}");
        }
    }
    let now = limit.rlim_cur;
    if now != libc::RLIM_INFINITY && now < needed {
        tracing::warn!(
            limit = now,
            needed,
            "the open files limit (RLIMIT_NOFILE, hard limit included) is below what {needs} \
             may use: new connections may fail with \"too many open files\" before the cap; \
             raise it (LimitNOFILE= under systemd, ulimit -n) or lower the cap"
        );
    }
    Some(now)
}
