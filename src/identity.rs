//! Long-lived identities (DESIGN §2).
//!
//! Every terminal and server owns one Ed25519 key pair, created on first start and stored as PKCS#8
//! PEM in `state_dir/identity.key` with mode 0600. The identifier is the raw 32-byte public key,
//! written as lowercase unpadded base32 (52 characters). The self-signed certificate presented in TLS
//! is rebuilt from the key at every start; it only carries the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// File name of the key inside a state directory.
pub const KEY_FILE: &str = "identity.key";

/// Length of an ID in its text form.
pub const ID_TEXT_LEN: usize = 52;

/// The identifier of a terminal or a server: its Ed25519 public key.
///
/// On the wire it is 32 raw bytes; for humans it is lowercase base32 without padding.
///
/// ```
/// use handoff::identity::TerminalId;
///
/// let id = TerminalId::from_bytes([0; 32]);
/// let text = id.to_string();
/// assert_eq!(text.len(), 52);
/// assert_eq!(text.parse::<TerminalId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TerminalId([u8; 32]);

/// Servers and terminals share one identifier type.
pub type ServerId = TerminalId;

impl TerminalId {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short prefix of the text form, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }

    /// Checks an Ed25519 signature made by the key this ID names. Small-order keys never
    /// verify: signatures for them can be made without any private key.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        !self.is_small_order()
            && UnparsedPublicKey::new(&ED25519, &self.0)
                .verify(message, signature)
                .is_ok()
    }

    /// Whether the key is one of the Ed25519 points of small order (whatever its sign bit).
    /// No real key pair has one; anyone can sign for them, so they are refused as identities.
    pub fn is_small_order(&self) -> bool {
        let mut bytes = self.0;
        bytes[31] &= 0x7f;
        SMALL_ORDER.contains(&bytes)
    }
}

/// The Ed25519 public keys of small order, sign bit cleared (libsodium's blocklist: 14
/// encodings with the sign bit). Found by fuzzing `SignedTicket::check`; see docs/FUZZING.md.
const SMALL_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    small_order_key(&[0x01], 0x00, 0x00),
    small_order_key(
        &[
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        0x00,
        0x05,
    ),
    small_order_key(
        &[
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        0x00,
        0x7a,
    ),
    // p - 1, p and p + 1 (that is -1, 0 and 1, the last two spelled non-canonically).
    small_order_key(&[0xec], 0xff, 0x7f),
    small_order_key(&[0xed], 0xff, 0x7f),
    small_order_key(&[0xee], 0xff, 0x7f),
];

/// `head`, then `fill` up to byte 31, then `last`.
const fn small_order_key(head: &[u8], fill: u8, last: u8) -> [u8; 32] {
    let mut out = [fill; 32];
    let mut i = 0;
    while i < head.len() {
        out[i] = head[i];
        i += 1;
    }
    out[31] = last;
    out
}

impl fmt::Display for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = data_encoding::BASE32_NOPAD.encode(&self.0);
        f.write_str(&text.to_ascii_lowercase())
    }
}

impl fmt::Debug for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TerminalId({})", self.short())
    }
}

/// Why a text is not an ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdParseError {
    #[error("an id is {ID_TEXT_LEN} base32 characters, got {0}")]
    Length(usize),
    #[error("an id is base32 (a-z, 2-7): {0:?} is not")]
    Alphabet(String),
}

impl FromStr for TerminalId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != ID_TEXT_LEN {
            return Err(IdParseError::Length(s.len()));
        }
        let upper = s.to_ascii_uppercase();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|_| IdParseError::Alphabet(s.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| IdParseError::Alphabet(s.to_string()))?;
        // Reject non-canonical spellings (trailing bits set), so one key has exactly one text.
        let id = TerminalId(bytes);
        if id.to_string() != s.to_ascii_lowercase() {
            return Err(IdParseError::Alphabet(s.to_string()));
        }
        Ok(id)
    }
}

/// Failures loading or creating an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} does not hold an Ed25519 PKCS#8 key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot build a certificate for the key: {0}")]
    Certificate(String),
}

impl IdentityError {
    /// The exit status for this error: 78 (bad configuration) when the state directory or the
    /// key file needs fixing by hand, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::File(_) | Self::BadKey { .. } => crate::config::EXIT_CONFIG,
            Self::Read { .. } | Self::Write { .. } | Self::Certificate(_) => 1,
        }
    }
}

/// A key pair together with the certificate that carries it in TLS.
///
/// `Debug` prints only the ID: the private key never reaches a log.
pub struct Identity {
    id: TerminalId,
    signer: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    certificate: CertificateDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Creates a fresh identity that lives only in memory (tests, the demo's server).
    pub fn generate() -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        Self::from_pkcs8(key.serialize_der(), Path::new("<memory>"))
    }

    /// Loads the identity from `state_dir`, creating the key on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        create_state_dir(state_dir)?;
        let path = state_dir.join(KEY_FILE);
        match crate::files::check_private_file(&path, "key file") {
            Ok(true) => {
                let pem = std::fs::read_to_string(&path).map_err(|source| IdentityError::Read {
                    path: path.clone(),
                    source,
                })?;
                let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKey {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Self::from_pkcs8(key.serialize_der(), &path)
            }
            Ok(false) => {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .map_err(|e| IdentityError::Certificate(e.to_string()))?;
                write_private_file(&path, key.serialize_pem().as_bytes()).map_err(|source| {
                    IdentityError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                Self::from_pkcs8(key.serialize_der(), &path)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn from_pkcs8(pkcs8: Vec<u8>, path: &Path) -> Result<Self, IdentityError> {
        let bad = |reason: String| IdentityError::BadKey {
            path: path.to_path_buf(),
            reason,
        };
        let signer =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| bad(e.to_string()))?;
        let public: [u8; 32] = signer
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| bad("public key is not 32 bytes".into()))?;
        let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).map_err(|e| bad(e.to_string()))?;
        let certificate = rcgen::CertificateParams::new(vec!["handoff".to_string()])
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| IdentityError::Certificate(e.to_string()))?
            .der()
            .clone();
        Ok(Self {
            id: TerminalId(public),
            signer,
            pkcs8,
            certificate,
        })
    }

    pub fn id(&self) -> TerminalId {
        self.id
    }

    /// Signs `message` with the private key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let sig = self.signer.sign(message);
        let mut out = [0u8; 64];
        // An Ed25519 signature is always 64 bytes.
        out.copy_from_slice(sig.as_ref());
        out
    }

    pub fn certificate(&self) -> CertificateDer<'static> {
        self.certificate.clone()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; refuses one owned by another user or
/// writable by group or others (see [`crate::files::prepare_state_dir`]).
pub fn create_state_dir(dir: &Path) -> Result<(), IdentityError> {
    Ok(crate::files::prepare_state_dir(dir)?)
}

pub use crate::files::write_private_file;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn id_text_round_trip() {
        let identity = Identity::generate().unwrap();
        let text = identity.id().to_string();
        assert_eq!(text.len(), ID_TEXT_LEN);
        assert!(text
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)));
        assert_eq!(text.parse::<TerminalId>().unwrap(), identity.id());
        assert_eq!(
            text.to_ascii_uppercase().parse::<TerminalId>().unwrap(),
            identity.id()
        );
    }

    #[test]
    fn id_text_rejects_bad_input() {
        assert_eq!("abc".parse::<TerminalId>(), Err(IdParseError::Length(3)));
        let bad = "1".repeat(ID_TEXT_LEN);
        assert!(matches!(
            bad.parse::<TerminalId>(),
            Err(IdParseError::Alphabet(_))
        ));
        // The last character carries 4 unused bits: a non-zero tail is not canonical.
        let id = TerminalId([0; 32]).to_string();
        let mut noncanonical = id[..ID_TEXT_LEN - 1].to_string();
        noncanonical.push('b');
        assert!(noncanonical.parse::<TerminalId>().is_err());
    }

    #[test]
    fn key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = Identity::load_or_create(&state).unwrap();
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Identity::load_or_create(&state).unwrap();
        assert_eq!(first.id(), second.id());
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::File(crate::files::FileError::LooseMode { .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
        assert_eq!(err.exit_code(), crate::config::EXIT_CONFIG);
    }

    /// Another user pre-created the state directory (world-writable) and planted a link where
    /// the key's temporary file used to go: the key must never land in a file they can read.
    #[test]
    fn a_state_dir_prepared_by_another_user_never_receives_the_key() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let stolen = dir.path().join("stolen");
        fs::write(&stolen, b"").unwrap();
        fs::set_permissions(&stolen, fs::Permissions::from_mode(0o666)).unwrap();
        std::os::unix::fs::symlink(&stolen, state.join("identity.tmp")).unwrap();
        if crate::accounts::euid() == 0 {
            let path = std::ffi::CString::new(state.as_os_str().as_bytes()).unwrap();
            // SAFETY: chown of a path this test made.
            assert_eq!(unsafe { libc::chown(path.as_ptr(), 65_534, 65_534) }, 0);
            let err = Identity::load_or_create(&state).unwrap_err();
            assert!(err.to_string().contains("owned by"), "{err}");
            assert_eq!(err.exit_code(), crate::config::EXIT_CONFIG);
            assert_eq!(unsafe { libc::chown(path.as_ptr(), 0, 0) }, 0);
        }
        let err = Identity::load_or_create(&state).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        assert_eq!(err.exit_code(), crate::config::EXIT_CONFIG);
        assert!(!state.join(KEY_FILE).exists());
        // Made private, the directory is used; the planted link is removed, never followed.
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        Identity::load_or_create(&state).unwrap();
        assert_eq!(
            fs::read(&stolen).unwrap(),
            b"",
            "the key was written through the link"
        );
        let key = fs::symlink_metadata(state.join(KEY_FILE)).unwrap();
        assert!(key.file_type().is_file());
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        assert!(fs::symlink_metadata(state.join("identity.tmp")).is_err());
    }

    #[test]
    fn signatures_verify_only_with_the_right_key() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let sig = a.sign(b"hello");
        assert!(a.id().verify(b"hello", &sig));
        assert!(!a.id().verify(b"hellO", &sig));
        assert!(!b.id().verify(b"hello", &sig));
    }

    #[test]
    fn small_order_keys_never_verify() {
        // The identity point: R = identity, S = 0 "signs" every message for it.
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        let mut forged = [0u8; 64];
        forged[0] = 1;
        let weak = TerminalId(identity_point);
        assert!(weak.is_small_order());
        assert!(!weak.verify(b"anything", &forged));
        let mut signed_bit = identity_point;
        signed_bit[31] |= 0x80;
        assert!(TerminalId(signed_bit).is_small_order());
        assert!(!Identity::generate().unwrap().id().is_small_order());
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let a = Identity::generate().unwrap();
        let text = format!("{a:?}");
        assert!(text.contains(&a.id().short()));
        assert!(!text.contains("pkcs8"));
    }
}
