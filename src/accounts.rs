//! Unix users and groups, looked up through libc (and so through NSS: files, LDAP, systemd's
//! dynamic users): names for messages, the gid of `[control] group`, and whether a user is a
//! member of a group. The lookups may block on a remote directory: call them off the runtime's
//! worker threads where that matters.

use std::ffi::{CStr, CString};

/// Buffer size for the `*_r` lookups when `sysconf` gives no hint; doubled on `ERANGE`.
const LOOKUP_BUFFER: usize = 1024;
/// Largest buffer tried before giving up on one entry.
const LOOKUP_BUFFER_MAX: usize = 1 << 20;

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The gid of group `name`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    lookup(
        |grp: *mut libc::group, buf, len, result| {
            // SAFETY: every pointer is valid for the call; `buf` has `len` bytes.
            unsafe { libc::getgrnam_r(name.as_ptr(), grp, buf, len, result) }
        },
        |grp| grp.gr_gid,
    )
}

/// The name of group `gid`, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    lookup(
        |grp: *mut libc::group, buf, len, result| {
            // SAFETY: as above.
            unsafe { libc::getgrgid_r(gid, grp, buf, len, result) }
        },
        // SAFETY: after a successful call gr_name points to a C string inside the live buffer.
        |grp| unsafe { c_string(grp.gr_name) },
    )
}

/// The name and primary gid of user `uid`, if it has an entry.
pub fn user(uid: u32) -> Option<(String, u32)> {
    lookup(
        |pwd: *mut libc::passwd, buf, len, result| {
            // SAFETY: as above.
            unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
        },
        // SAFETY: after a successful call pw_name points to a C string inside the live buffer.
        |pwd| (unsafe { c_string(pwd.pw_name) }, pwd.pw_gid),
    )
}

/// # Safety
/// `ptr` is null or points to a NUL-terminated string.
unsafe fn c_string(ptr: *const libc::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// A user's name for messages: `name (uid N)`, or `uid N` without an entry.
pub fn describe_user(uid: u32) -> String {
    match user(uid) {
        Some((name, _)) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The supplementary groups of the process at the other end of the Unix socket `fd`, as they
/// were when it connected (`SO_PEERGROUPS`): the groups its login gave it, which the peer
/// credentials' single gid leaves out. `None` if the kernel cannot tell.
pub fn peer_groups(fd: std::os::fd::RawFd) -> Option<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that many and sets
        // `len` to the size it wrote (or, with ERANGE, the size it needs).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count.min(groups.len()));
            return Some(groups);
        }
        let grow = std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && count > groups.len()
            && count <= 65_536;
        if !grow {
            return None;
        }
        groups.resize(count, 0);
    }
}

/// Whether user `uid` (whose process runs with primary group `gid`) belongs to group `group`:
/// as its primary group, or as a supplementary group in the group database.
pub fn is_member(uid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let Some((name, primary)) = user(uid) else {
        return false;
    };
    if primary == group {
        return true;
    }
    let Ok(name) = CString::new(name) else {
        return false;
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` has room for `count` entries; getgrouplist writes at most that many
        // and sets `count` to the number it needs.
        let rc =
            unsafe { libc::getgrouplist(name.as_ptr(), primary, groups.as_mut_ptr(), &mut count) };
        let needed = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            return groups[..needed.min(groups.len())].contains(&group);
        }
        if needed <= groups.len() || needed > 65_536 {
            return false;
        }
        groups.resize(needed, 0);
    }
}

/// Runs a `get*_r` call with a growing buffer, then `read`s the entry while the buffer its
/// pointers point into is alive. `call(entry, buf, len, result)` returns the call's error
/// number. `None` when there is no entry or the lookup failed.
fn lookup<T, R>(
    call: impl Fn(*mut T, *mut libc::c_char, libc::size_t, *mut *mut T) -> libc::c_int,
    read: impl FnOnce(&T) -> R,
) -> Option<R> {
    let mut size = LOOKUP_BUFFER;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: the entry is plain C data (integers and pointers); all zeroes is a valid value
        // and a successful call overwrites it.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut result: *mut T = std::ptr::null_mut();
        let rc = call(&mut entry, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && size < LOOKUP_BUFFER_MAX {
            size *= 2;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some(read(&entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_its_group_are_known() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(user(0), Some(("root".into(), 0)));
        assert_eq!(describe_user(0), "root (uid 0)");
        assert!(is_member(0, 0, 0));
        assert_eq!(group_id("no-such-group-handoff"), None);
        assert_eq!(group_id("bad\0name"), None);
    }

    #[test]
    fn membership_counts_primary_and_supplementary_groups() {
        // Only where the usual accounts exist (Debian's nobody/nogroup).
        let (Some(nogroup), Some((_, nobody_gid))) = (group_id("nogroup"), user(65_534)) else {
            return;
        };
        assert!(is_member(65_534, nobody_gid, nogroup));
        // A process that dropped to another gid is still a member through its passwd entry.
        assert!(is_member(65_534, 12_345, nogroup));
        assert!(!is_member(65_534, nobody_gid, 0));
    }
}
