//! Message types. Every enum here is append-only (bincode encodes variants by position).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{ServerId, TerminalId};

/// What a terminal is showing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub uri: String,
    pub title: String,
    /// Playback position in seconds, where it applies.
    pub position: Option<f64>,
    pub meta: BTreeMap<String, String>,
}

/// A request; the response echoes `id`. One request per bidirectional stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Terminal → terminal: "give me your interface info" (patent S110).
    InterfaceInfo,
    /// Terminal → its server: what this terminal shows now (`None`: nothing).
    SetSession(Option<Session>),
    /// Terminal → server: "push me what `first` shows" (patent S120).
    Follow(InfoRequest),
    /// Terminal → terminal: one step of pairing (see [`PairStep`]).
    Pair(PairStep),
    /// Terminal → its server: end the link of `second` following this terminal and refuse
    /// every ticket this terminal issued for `second` at or before `at` (Unix seconds, by this
    /// terminal's clock): revocation.
    Revoke { second: TerminalId, at: u64 },
    /// Terminal → server, first on every connection: where its push log left off, and where
    /// it left off in the stream of each terminal it follows (fan-out on read: a change that
    /// all of a terminal's followers receive is stored once, in that terminal's stream). The
    /// server answers [`ResponseBody::Welcome`] and then opens the push stream.
    Hello {
        cursor: Option<Cursor>,
        streams: Vec<StreamCursor>,
    },
}

/// A position in a recipient's push log: everything below `next` in `epoch` was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub next: u64,
}

/// A position in the stream of `owner` (what all of `owner`'s followers receive): everything
/// below `next` in `epoch` was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub owner: TerminalId,
    pub epoch: u64,
    pub next: u64,
}

/// Pairing is commit-then-reveal, so neither side can choose its nonce after seeing the other's:
/// the terminal with the smaller ID (the initiator) sends `Commit` (a hash of both IDs and its
/// nonce), the other answers with its own nonce ([`ResponseBody::PairNonce`]), then the initiator
/// reveals its nonce. Both derive the 6-digit code from both keys and both nonces. Every attempt
/// uses fresh nonces on both sides, and any deviation ends the attempt (docs/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairStep {
    Commit {
        commitment: [u8; 32],
    },
    Reveal {
        nonce: [u8; 16],
    },
    /// Responder → initiator: "my user started pairing with you" (so the initiator's user sees
    /// the request). Changes nothing on the initiator but its list of pairing requests.
    Invite,
}

/// The information request of patent S120: both identifiers and the ticket `first` signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoRequest {
    pub first: TerminalId,
    pub second: TerminalId,
    pub ticket: SignedTicket,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ResponseBody {
    InterfaceInfo(Box<InterfaceInfo>),
    Refused(Refusal),
    /// The server stored the session sent with `SetSession`.
    SessionStored,
    /// The server linked the requester to `first` until `until` (Unix seconds).
    Linked {
        until: u64,
        has_session: bool,
    },
    /// Pairing: the responder's nonce, answering a `Commit`.
    PairNonce {
        nonce: [u8; 16],
    },
    /// Pairing: the reveal matched the commitment; both sides can show the code.
    Paired,
    /// The server ended the link (`removed`: there was one).
    Revoked {
        removed: bool,
    },
    /// Answer to `Hello`: pushes follow from offset `start` of `epoch`. `window_lost`: the
    /// cursor could not be honoured (unknown, too old, or from another epoch); the terminal then
    /// gets the current state instead of what it missed.
    Welcome {
        epoch: u64,
        start: u64,
        window_lost: bool,
    },
}

/// A refusal the requester can show its user. Its message is the refusing party's text; it is
/// shown without control and bidi characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.reason,
            crate::text::clean(self.message.clone())
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The peer's trust policy does not accept the requester.
    NotTrusted,
    /// The peer is not attached to a content server, so there is nothing to hand off.
    NoServer,
    /// The ticket failed a check.
    BadTicket,
    /// This endpoint does not serve that request.
    WrongEndpoint,
    /// Over a limit; try later.
    Busy,
    /// A pairing request the receiving terminal's user has not started (or that expired).
    NotPairing,
    /// A pairing reveal that does not match its commitment.
    BadPairing,
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotTrusted => "not trusted",
            Self::NoServer => "no content server",
            Self::BadTicket => "bad ticket",
            Self::WrongEndpoint => "wrong endpoint",
            Self::Busy => "busy",
            Self::NotPairing => "not pairing",
            Self::BadPairing => "pairing failed",
        })
    }
}

/// Interface info of patent S110: where the first terminal's server is, who it is, and a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub server: ServerInfo,
    pub first: TerminalId,
    /// What the first terminal shows now, as a preview; the server's push is authoritative.
    pub session: Option<Session>,
    pub ticket: SignedTicket,
}

/// A content server: its identity (pinned by whoever connects) and addresses (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: ServerId,
    pub addrs: Vec<String>,
}

/// A ticket: `first` lets `second` follow it on `server` until `not_after`, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub first: TerminalId,
    pub second: TerminalId,
    pub server: ServerId,
    /// Unix seconds, by the first terminal's clock. A revocation by `first` refuses every ticket
    /// for `second` issued at or before it.
    pub issued_at: u64,
    /// Unix seconds; at most the server's maximum lease after `issued_at`.
    pub not_after: u64,
    pub nonce: [u8; 16],
}

/// A ticket with `first`'s signature over [`Ticket::signing_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    pub ticket: Ticket,
    pub signature: Signature,
}

/// An Ed25519 signature (serde has no derive for 64-byte arrays, so bytes by hand).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(bytes))
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                self.visit_bytes(v)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Signature, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// Terminal → server on the push stream: everything below `next` is safely delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushAck {
    Ack { next: u64 },
}

/// Server → terminal, on the push stream the server opens on the terminal's connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerPush {
    /// An item of the terminal's own push log (acknowledged with [`PushAck::Ack`]).
    Item(PushItem),
    /// An item of the stream of `owner`, a terminal this one follows: a change of `owner`'s
    /// session (`from` is `owner`) or a publisher's push to `owner`'s followers (`from` is
    /// `None`). `item.offset` is its position in that stream; the terminal keeps the stream's
    /// cursor and says it in its next `Hello` (streams are not acknowledged: they are shared).
    Stream { owner: TerminalId, item: PushItem },
}

/// [`ServerPush`] by reference, encoded exactly as the owned one (bincode encodes a variant by
/// its position, and a reference as what it points to): a server sends what its log holds
/// without copying it first.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum ServerPushRef<'a> {
    Item(&'a PushItem),
    Stream {
        owner: &'a TerminalId,
        item: &'a PushItem,
    },
}

/// One pushed item. `from` is the terminal whose session it is (`None` for a publisher's own push).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushItem {
    /// Position in the recipient's push log, or in the stream it came on.
    pub offset: u64,
    pub from: Option<TerminalId>,
    pub uri: String,
    pub title: String,
    pub body: Option<String>,
    pub position: Option<f64>,
    pub meta: BTreeMap<String, String>,
}

impl PushItem {
    /// The push that carries `from`'s session.
    pub fn from_session(offset: u64, from: TerminalId, session: &Session) -> Self {
        Self {
            offset,
            from: Some(from),
            uri: session.uri.clone(),
            title: session.title.clone(),
            body: None,
            position: session.position,
            meta: session.meta.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal's message is the peer's (or server's) text, and may name a terminal: shown,
    /// it has no control or bidi characters.
    #[test]
    fn a_refusal_is_shown_without_control_or_bidi_characters() {
        let refusal = Refusal {
            reason: RefusalReason::NotPairing,
            message: "tv\u{202E}vt\u{1b}[2J is not pairing".into(),
        };
        assert_eq!(refusal.to_string(), "not pairing: tvvt[2J is not pairing");
    }
}
