//! Files that hold secrets or state (DESIGN §7): the state directory, atomic private writes, and
//! secret files such as the server's token.
//!
//! - `state_dir` must be a directory owned by the user running handoff and not writable by
//!   group or others: a directory another user created or can write could hand them the key.
//!   A symlink to it is followed only if that user or root owns the link.
//! - Every write of a file in it goes through [`write_private_file`]: a fresh temporary file
//!   (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600), fsynced, renamed over the target. A link
//!   planted where the temporary file goes is never followed; temporary files a crash left
//!   behind are removed when the directory is next opened ([`prepare_state_dir`]).
//! - A secret file is read from systemd's credentials directory (`$CREDENTIALS_DIRECTORY`, set
//!   by `LoadCredential=`) when that holds a file of the same base name, otherwise from its path,
//!   which must not be accessible by group or others.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::accounts;

/// Suffix of the temporary files [`write_private_file`] makes.
const TMP_SUFFIX: &str = ".tmp";

/// What is wrong with a file or directory handoff was told to use. Each of these is a problem
/// with the configuration or the files it names, so the programs exit 78 on them.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot create state_dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot inspect {what} {path}: {source}")]
    Inspect {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state_dir {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "state_dir {path} is owned by {owner}, not by {me} who runs handoff: another user could \
         read or replace the keys in it; use a directory {me} owns (or run handoff as its owner)"
    )]
    ForeignOwner {
        path: PathBuf,
        owner: String,
        me: String,
    },
    #[error(
        "state_dir {path} is a symlink owned by {owner}: that user could point it elsewhere at \
         any time; name the directory itself in the config, or have {me} or root own the link"
    )]
    ForeignLink {
        path: PathBuf,
        owner: String,
        me: String,
    },
    #[error(
        "state_dir {path} is writable by group or others (mode {mode:o}); run `chmod go-w {path}`"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "{what} {path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    LooseMode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
}

/// Creates `dir` (mode 0700, parents included) if it is missing, then checks it as
/// [`check_state_dir`] does and removes temporary files a crash left in it.
pub fn prepare_state_dir(dir: &Path) -> Result<(), FileError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| FileError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    // Checked after creating too: another user may have made it first.
    check_state_dir(dir)?;
    remove_stale_tmp(dir);
    Ok(())
}

/// Checks an existing state directory: a directory owned by this process's user, not writable
/// by group or others. It may be a symlink to one only if the link is owned by that user or
/// root (another owner could repoint it). A missing one passes (it will be created).
pub fn check_state_dir(dir: &Path) -> Result<(), FileError> {
    let Some(meta) = state_dir_metadata(dir)? else {
        return Ok(());
    };
    // The owner first: another user's directory is refused whatever its mode.
    let me = accounts::euid();
    if meta.uid() != me {
        return Err(FileError::ForeignOwner {
            path: dir.to_path_buf(),
            owner: accounts::describe_user(meta.uid()),
            me: accounts::describe_user(me),
        });
    }
    check_state_dir_mode(dir, &meta)
}

/// [`check_state_dir`] for someone checking a config on behalf of another user (`handoff config
/// check` run as root for a service's config): the same checks, except that an owner other than
/// this process's user is returned (its uid) instead of refused.
pub fn check_state_dir_of_any_owner(dir: &Path) -> Result<Option<u32>, FileError> {
    let Some(meta) = state_dir_metadata(dir)? else {
        return Ok(None);
    };
    check_state_dir_mode(dir, &meta)?;
    Ok((meta.uid() != accounts::euid()).then_some(meta.uid()))
}

/// The state directory's metadata: `None` if it is missing, an error if it is not a directory
/// or a symlink owned by another user than this process's or root (who could repoint it).
fn state_dir_metadata(dir: &Path) -> Result<Option<fs::Metadata>, FileError> {
    let me = accounts::euid();
    if let Ok(link) = fs::symlink_metadata(dir) {
        if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 {
            return Err(FileError::ForeignLink {
                path: dir.to_path_buf(),
                owner: accounts::describe_user(link.uid()),
                me: accounts::describe_user(me),
            });
        }
    }
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Inspect {
                what: "state_dir",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(FileError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    Ok(Some(meta))
}

fn check_state_dir_mode(dir: &Path, meta: &fs::Metadata) -> Result<(), FileError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FileError::Writable {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Checks that a private file (a key) is not accessible by group or others. Returns whether it
/// exists.
pub fn check_private_file(path: &Path, what: &'static str) -> Result<bool, FileError> {
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(FileError::LooseMode {
                    what,
                    path: path.to_path_buf(),
                    mode,
                });
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Inspect {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a file readable by its owner only, atomically: a new temporary file beside it
/// (created exclusively, never through a symlink, mode 0600), fsync, rename over `path`, fsync
/// of the directory. A crash leaves either the old file or the new one, plus perhaps a
/// temporary file that [`prepare_state_dir`] removes later.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let (tmp, mut file) = create_tmp(path)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Numbers the temporary files of this process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Creates `.NAME.PID.N.tmp` beside `path` with `O_EXCL | O_NOFOLLOW`, trying further names if
/// one is taken.
fn create_tmp(path: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name to write")
    })?;
    let pid = std::process::id();
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{pid}.{n}{TMP_SUFFIX}"));
        let tmp = path.with_file_name(tmp_name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "every temporary name for {} is taken; remove the .{}.*.tmp files beside it",
            path.display(),
            name.to_string_lossy()
        ),
    ))
}

/// Removes temporary files of [`write_private_file`] whose writer is gone (its pid is not a
/// live process), and `NAME.tmp` files of older versions. `unlink` never follows a link, so a
/// planted one is removed, not its target.
fn remove_stale_tmp(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(TMP_SUFFIX) {
            continue;
        }
        let stale = match tmp_writer(name) {
            Some(pid) => !process_alive(pid),
            // An older version's fixed temporary names.
            None => matches!(name, "identity.tmp" | "trust.tmp"),
        };
        if stale {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a stale temporary file")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), "cannot remove a stale temporary file: {e}")
                }
            }
        }
    }
}

/// The pid in a temporary name `.NAME.PID.N.tmp`.
fn tmp_writer(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(TMP_SUFFIX)?;
    let mut parts = inner.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    parts.next()?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks whether the process exists; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Where a secret named by `path` is read from: systemd's credentials directory when it holds a
/// file with the same base name (`LoadCredential=publish.token:/etc/handoff/publish.token`),
/// else `path` itself.
pub fn secret_source(path: &Path) -> PathBuf {
    secret_source_in(std::env::var_os("CREDENTIALS_DIRECTORY").as_deref(), path)
}

fn secret_source_in(credentials: Option<&std::ffi::OsStr>, path: &Path) -> PathBuf {
    if let (Some(dir), Some(name)) = (credentials, path.file_name()) {
        let candidate = Path::new(dir).join(name);
        if !dir.as_bytes().is_empty() && candidate.is_file() {
            return candidate;
        }
    }
    path.to_path_buf()
}

/// Reads a secret (a bearer token): from the credentials directory if it has it (systemd keeps
/// that private), else from `path`, which must not be accessible by group or others. Surrounding
/// whitespace is trimmed; an empty secret is an error.
pub fn read_secret(path: &Path, what: &'static str) -> Result<String, FileError> {
    let source = secret_source(path);
    if source == path {
        check_private_file(path, what)?;
    }
    let text = fs::read_to_string(&source).map_err(|e| FileError::Read {
        what,
        path: source.clone(),
        source: e,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(FileError::Empty { what, path: source });
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_planted_link_at_the_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret.key");
        let outside = dir.path().join("readable-by-the-attacker");
        fs::write(&outside, b"").unwrap();
        // Plant links at the next temporary names this process will try.
        let next = NEXT.load(Ordering::Relaxed);
        for n in next..next + 8 {
            let name = format!(".secret.key.{}.{n}.tmp", std::process::id());
            let _ = symlink(&outside, dir.path().join(name));
        }
        write_private_file(&target, b"PRIVATE").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"PRIVATE");
        assert_eq!(
            fs::read(&outside).unwrap(),
            b"",
            "the link's target was written"
        );
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn stale_temporary_files_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(".trust.json.999999999.0.tmp");
        let live = dir
            .path()
            .join(format!(".trust.json.{}.7.tmp", std::process::id()));
        let legacy = dir.path().join("identity.tmp");
        let elsewhere = dir.path().join("target");
        fs::write(&elsewhere, b"keep").unwrap();
        symlink(&elsewhere, &dead).unwrap();
        fs::write(&live, b"").unwrap();
        fs::write(&legacy, b"").unwrap();
        prepare_state_dir(dir.path()).unwrap();
        assert!(fs::symlink_metadata(&dead).is_err());
        assert!(fs::symlink_metadata(&legacy).is_err());
        assert!(live.exists(), "a live writer's file was removed");
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert_eq!(tmp_writer(".a.b.12.3.tmp"), Some(12));
        assert_eq!(tmp_writer(".a.tmp"), None);
    }

    #[test]
    fn state_dir_writable_by_others_or_owned_by_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        prepare_state_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_state_dir(&state).unwrap_err();
        assert!(matches!(err, FileError::Writable { .. }), "{err}");
        assert!(err.to_string().contains("chmod go-w"), "{err}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_state_dir(&file),
            Err(FileError::NotADirectory { .. })
        ));
        if accounts::euid() == 0 {
            // SAFETY: chown on a path we just created; no memory is shared.
            let path = std::ffi::CString::new(state.as_os_str().as_bytes()).unwrap();
            assert_eq!(unsafe { libc::chown(path.as_ptr(), 65_534, 65_534) }, 0);
            let err = prepare_state_dir(&state).unwrap_err();
            assert!(matches!(err, FileError::ForeignOwner { .. }), "{err}");
            assert!(err.to_string().contains("uid 65534"), "{err}");
        }
    }

    #[test]
    fn secrets_come_from_the_credentials_directory_when_it_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("publish.token");
        fs::write(&token, "from-path\n").unwrap();
        fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(&token, "token file"),
            Err(FileError::LooseMode { .. })
        ));
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&token, "token file").unwrap(), "from-path");
        fs::write(&token, " \n").unwrap();
        assert!(matches!(
            read_secret(&token, "token file"),
            Err(FileError::Empty { .. })
        ));
        assert!(matches!(
            read_secret(&dir.path().join("missing"), "token file"),
            Err(FileError::Read { .. })
        ));
        // systemd's credentials directory wins when it has the base name, else the path.
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        let etc = Path::new("/etc/handoff/publish.token");
        assert_eq!(secret_source_in(Some(creds.as_os_str()), etc), etc);
        fs::write(creds.join("publish.token"), "from-systemd").unwrap();
        assert_eq!(
            secret_source_in(Some(creds.as_os_str()), etc),
            creds.join("publish.token")
        );
        assert_eq!(secret_source_in(None, etc), etc);
    }
}
