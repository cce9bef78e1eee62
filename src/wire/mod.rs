//! The wire format (DESIGN §4): message types, framing, the one bincode configuration, mDNS TXT
//! parsing, ticket checks and the application error codes.
//!
//! Pure code: no tokio, no quinn, so everything here can be fuzzed and golden-tested. A frame is a
//! `u32` big-endian payload length followed by a bincode 2 (serde mode) payload. The length is
//! checked against [`MAX_FRAME`] before anything is allocated, and bincode itself is limited to the
//! same size in [`config`], the only place it is configured.
//!
//! Message enums are append-only: bincode encodes a variant by its position.

mod message;
pub mod ticket;
pub mod txt;

pub use message::*;

use serde::{de::DeserializeOwned, Serialize};

use crate::identity::TerminalId;

/// The ALPN every handoff connection negotiates; the version is the protocol major.
pub const ALPN: &[u8] = b"handoff/3";

/// The protocol major, advertised in mDNS TXT `v`.
pub const PROTOCOL_MAJOR: u32 = 3;

/// [`PROTOCOL_MAJOR`] as the TXT record writes it.
pub const PROTOCOL_MAJOR_TEXT: &str = "3";

/// Hard cap on one frame's payload, checked before allocating.
pub const MAX_FRAME: usize = 64 * 1024;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// The one bincode configuration: standard (varint) encoding with a byte limit.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Why bytes are not a valid frame or message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame is empty")]
    Empty,
    #[error("undecodable message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

impl WireError {
    /// The application error code a peer sees when it sent this.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge(_) => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Encodes `message` as one frame: header and payload.
///
/// ```
/// use handoff::wire::{decode_frame, encode_frame, Request, RequestBody};
///
/// let frame = encode_frame(&Request { id: 7, body: RequestBody::InterfaceInfo }).unwrap();
/// // A u32 big-endian length, then the bincode payload: id 7, variant 0.
/// assert_eq!(frame, [0, 0, 0, 2, 7, 0]);
/// let back: Request = decode_frame(&frame).unwrap();
/// assert_eq!(back.id, 7);
/// ```
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; HEADER_LEN];
    bincode::serde::encode_into_std_write(message, &mut out, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a frame header and returns the payload length, refusing oversized or empty frames.
pub fn decode_header(header: [u8; HEADER_LEN]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    Ok(len)
}

/// Encodes `message` as a bare payload (no header), e.g. for storage.
pub fn encode_payload<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let frame = encode_frame(message)?;
    Ok(frame[HEADER_LEN..].to_vec())
}

/// Decodes one payload; every byte must belong to the message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::TooLarge(payload.len()));
    }
    let (message, read) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if read != payload.len() {
        return Err(WireError::Trailing(payload.len() - read));
    }
    Ok(message)
}

/// Where a [`ServerPush`] item belongs, from the first bytes of its payload, also when the
/// rest does not decode: what a terminal needs to skip an item it cannot read. The stream's
/// owner (`None`: the terminal's own log) and the item's offset there.
pub fn push_offset(payload: &[u8]) -> Option<(Option<TerminalId>, u64)> {
    /// The leading fields of `ServerPush::Item(PushItem { offset, .. })` and of
    /// `ServerPush::Stream { owner, item: PushItem { offset, .. } }`.
    #[derive(serde::Deserialize)]
    enum Head {
        Item(u64),
        Stream(TerminalId, u64),
    }
    match bincode::serde::decode_from_slice::<Head, _>(payload, config()).ok()? {
        (Head::Item(offset), _) => Some((None, offset)),
        (Head::Stream(owner, offset), _) => Some((Some(owner), offset)),
    }
}

/// Decodes a whole frame (header and payload) held in memory.
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    let header: [u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| WireError::Malformed("frame shorter than its header".into()))?;
    let len = decode_header(header)?;
    let payload = &frame[HEADER_LEN..];
    if payload.len() != len {
        return Err(WireError::Malformed(format!(
            "header says {len} bytes, frame holds {}",
            payload.len()
        )));
    }
    decode_payload(payload)
}

/// Application error codes, used to close a stream (reset/stop) or a connection.
///
/// | code | meaning |
/// |---|---|
/// | 0 | closed normally |
/// | 1 | frame larger than [`MAX_FRAME`] |
/// | 2 | undecodable frame or message |
/// | 3 | a read timed out |
/// | 4 | a message this endpoint does not serve here |
/// | 5 | over a limit (streams, connections, queue) |
/// | 6 | the endpoint is shutting down |
/// | 7 | replaced by a newer connection of the same terminal |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    Closed = 0,
    FrameTooLarge = 1,
    Malformed = 2,
    Timeout = 3,
    Unexpected = 4,
    Busy = 5,
    Shutdown = 6,
    Replaced = 7,
}

impl ErrorCode {
    pub fn from_u64(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Closed,
            1 => Self::FrameTooLarge,
            2 => Self::Malformed,
            3 => Self::Timeout,
            4 => Self::Unexpected,
            5 => Self::Busy,
            6 => Self::Shutdown,
            7 => Self::Replaced,
            _ => return None,
        })
    }

    /// A short snake_case name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::FrameTooLarge => "frame_too_large",
            Self::Malformed => "malformed",
            Self::Timeout => "timeout",
            Self::Unexpected => "unexpected",
            Self::Busy => "busy",
            Self::Shutdown => "shutdown",
            Self::Replaced => "replaced",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::FrameTooLarge => "frame too large",
            Self::Malformed => "malformed message",
            Self::Timeout => "timed out",
            Self::Unexpected => "unexpected message",
            Self::Busy => "busy: over a limit",
            Self::Shutdown => "shutting down",
            Self::Replaced => "replaced by a newer connection",
        }
    }
}

#[cfg(test)]
mod tests;
