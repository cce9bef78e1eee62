//! The mDNS TXT record of a daemon (DESIGN §3): `v` (protocol major), `id` (full ID), `name`.
//!
//! Nothing else goes there: anyone on the LAN reads it. What it says is only a claim; the QUIC
//! handshake, which pins `id`, proves it.

use crate::identity::TerminalId;

/// Longest friendly name accepted from the network, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// What a daemon advertises about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub version: u32,
    pub id: TerminalId,
    pub name: String,
}

/// Why a TXT record is not a usable advert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    #[error("TXT key {0:?} is missing")]
    Missing(&'static str),
    #[error("TXT key {key:?} is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("protocol version {0} is not supported")]
    Version(u32),
}

impl Advert {
    /// The TXT properties to register.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        vec![
            ("v", self.version.to_string()),
            ("id", self.id.to_string()),
            ("name", self.name.clone()),
        ]
    }

    /// Parses TXT properties as received; unknown keys are ignored (later versions may add some).
    pub fn parse<'a>(
        props: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TxtError> {
        let (mut version, mut id, mut name) = (None, None, None);
        for (key, value) in props {
            match key.to_ascii_lowercase().as_str() {
                "v" => version = Some(value),
                "id" => id = Some(value),
                "name" => name = Some(value),
                _ => {}
            }
        }
        let version: u32 = version.ok_or(TxtError::Missing("v"))?.parse().map_err(
            |e: std::num::ParseIntError| TxtError::Invalid {
                key: "v",
                reason: e.to_string(),
            },
        )?;
        if version != super::PROTOCOL_MAJOR {
            return Err(TxtError::Version(version));
        }
        let id = id.ok_or(TxtError::Missing("id"))?.parse().map_err(
            |e: crate::identity::IdParseError| TxtError::Invalid {
                key: "id",
                reason: e.to_string(),
            },
        )?;
        let name = name.ok_or(TxtError::Missing("name"))?;
        if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(TxtError::Invalid {
                key: "name",
                reason: "longer than 63 bytes or holds control characters".into(),
            });
        }
        Ok(Self {
            version,
            id,
            // It may end up in a message naming the peer: no bidi controls (DESIGN §7).
            name: crate::text::clean(name.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> TerminalId {
        TerminalId::from_bytes([3; 32])
    }

    #[test]
    fn round_trip() {
        let advert = Advert {
            version: super::super::PROTOCOL_MAJOR,
            id: id(),
            name: "living-room".into(),
        };
        let props = advert.properties();
        let parsed = Advert::parse(props.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
        assert_eq!(parsed, advert);
    }

    #[test]
    fn rejects_missing_and_invalid_keys() {
        let idt = id().to_string();
        assert_eq!(
            Advert::parse([("id", idt.as_str()), ("name", "x")]),
            Err(TxtError::Missing("v"))
        );
        assert_eq!(
            Advert::parse([("v", "1"), ("id", idt.as_str()), ("name", "x")]),
            Err(TxtError::Version(1))
        );
        assert!(matches!(
            Advert::parse([("v", "3"), ("id", "nope"), ("name", "x")]),
            Err(TxtError::Invalid { key: "id", .. })
        ));
        assert!(matches!(
            Advert::parse([("v", "3"), ("id", idt.as_str()), ("name", "a\nb")]),
            Err(TxtError::Invalid { key: "name", .. })
        ));
    }

    /// A claimed name keeps no bidi controls: it may end up in a message naming the peer.
    #[test]
    fn advert_names_lose_their_bidi_characters() {
        let idt = id().to_string();
        let advert =
            Advert::parse([("v", "3"), ("id", idt.as_str()), ("name", "tv\u{202E}vt")]).unwrap();
        assert_eq!(advert.name, "tvvt");
    }
}
