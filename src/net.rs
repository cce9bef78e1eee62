//! Frames on QUIC streams: reads with a timeout and the size cap, writes, and one-shot requests.
//!
//! The byte-level rules live in [`crate::wire`]; this module only moves frames over quinn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::wire::{self, ErrorCode, Request, RequestBody, Response, ResponseBody, WireError};

/// How long one frame may take to arrive once a read starts.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a whole request (open, write, wait for the answer) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("timed out reading a frame")]
    Timeout,
    #[error("stream: {0}")]
    Stream(String),
}

impl FrameError {
    /// The code to reset or stop the stream with after this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Wire(e) => e.code(),
            FrameError::Timeout => ErrorCode::Timeout,
            FrameError::Stream(_) => ErrorCode::Closed,
        }
    }
}

pub fn varint(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as u32)
}

/// Reads one frame of at most `max` bytes; `Ok(None)` when the peer finished the stream cleanly
/// before a new frame.
///
/// Cancel-safe only between frames: dropping it mid-frame loses the partial frame.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_payload(recv, timeout, max).await? {
        Some(payload) => Ok(Some(wire::decode_payload(&payload)?)),
        None => Ok(None),
    }
}

/// Reads one frame's payload (undecoded) of at most `max` bytes, as [`read_frame`] does. A
/// payload that then fails to decode leaves the stream at the next frame.
pub async fn read_payload(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; wire::HEADER_LEN];
    match tokio::time::timeout(timeout, recv.read_exact(&mut header)).await {
        Err(_) => return Err(FrameError::Timeout),
        Ok(Ok(())) => {}
        Ok(Err(quinn::ReadExactError::FinishedEarly(0))) => return Ok(None),
        Ok(Err(quinn::ReadExactError::FinishedEarly(n))) => {
            return Err(WireError::Malformed(format!(
                "stream ended inside a frame header ({n} bytes)"
            ))
            .into())
        }
        Ok(Err(quinn::ReadExactError::ReadError(e))) => {
            return Err(FrameError::Stream(e.to_string()))
        }
    }
    // The cap is checked here, before the payload buffer exists.
    let len = wire::decode_header(header)?;
    if len > max {
        return Err(WireError::TooLarge(len).into());
    }
    // The buffer grows with the bytes that arrive: a header alone must not make us hold the
    // frame it announces (for the read timeout, on every stream a peer may open).
    let mut payload = Vec::new();
    let read = async {
        while payload.len() < len {
            match recv.read_chunk(len - payload.len(), true).await {
                Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(FrameError::from(WireError::Malformed(format!(
                        "stream ended after {} of {len} payload bytes",
                        payload.len()
                    ))))
                }
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => return Err(FrameError::Timeout),
        Ok(result) => result?,
    }
    Ok(Some(payload))
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), FrameError> {
    let frame = wire::encode_frame(message)?;
    send.write_all(&frame)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))
}

/// Refuses a stream after bad input: stop reading and reset writing with `code`.
pub fn refuse_stream(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: ErrorCode) {
    let _ = recv.stop(varint(code));
    let _ = send.reset(varint(code));
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the stream without answering")]
    NoAnswer,
    #[error("the answer echoes request id {got}, expected {expected}")]
    WrongId { expected: u64, got: u64 },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends one request on a new bidirectional stream and waits for its response.
pub async fn request(
    conn: &quinn::Connection,
    body: RequestBody,
) -> Result<ResponseBody, RequestError> {
    let result = tokio::time::timeout(REQUEST_TIMEOUT, request_inner(conn, body))
        .await
        .map_err(|_| RequestError::Timeout(REQUEST_TIMEOUT))?;
    match result {
        // A stream failing because the connection closed: report why it closed.
        Err(RequestError::Frame(FrameError::Stream(_))) if conn.close_reason().is_some() => {
            Err(RequestError::Connection(
                conn.close_reason()
                    .unwrap_or(quinn::ConnectionError::LocallyClosed),
            ))
        }
        other => other,
    }
}

async fn request_inner(
    conn: &quinn::Connection,
    body: RequestBody,
) -> Result<ResponseBody, RequestError> {
    let id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Request { id, body }).await?;
    let _ = send.finish();
    let response: Response = read_frame(&mut recv, READ_TIMEOUT, wire::MAX_FRAME)
        .await?
        .ok_or(RequestError::NoAnswer)?;
    if response.id != id {
        return Err(RequestError::WrongId {
            expected: id,
            got: response.id,
        });
    }
    Ok(response.body)
}

/// Current time in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Binds a QUIC endpoint. An unspecified IPv6 address (`[::]`, the default) makes one dual-stack
/// socket serving IPv4 and IPv6; where IPv6 is disabled it falls back to `0.0.0.0` on the same
/// port.
pub fn bind_endpoint(
    config: quinn::ServerConfig,
    listen: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    bind_endpoint_with(quinn::EndpointConfig::default(), config, listen)
}

/// Like [`bind_endpoint`], with an endpoint configuration (the content server's keeps its
/// stateless reset key across restarts).
pub fn bind_endpoint_with(
    endpoint: quinn::EndpointConfig,
    config: quinn::ServerConfig,
    listen: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let bind = |addr: std::net::SocketAddr| {
        let socket = std::net::UdpSocket::bind(addr)?;
        quinn::Endpoint::new(
            endpoint.clone(),
            Some(config.clone()),
            socket,
            std::sync::Arc::new(quinn::TokioRuntime),
        )
    };
    match bind(listen) {
        Err(e) if listen.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            let v4 = std::net::SocketAddr::from(([0, 0, 0, 0], listen.port()));
            tracing::info!("IPv6 unavailable ({e}); listening on {v4} (IPv4 only)");
            bind(v4)
        }
        other => other,
    }
}
