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

/// Asks for `bytes` of receive and send buffer on `socket`: past `net.core.rmem_max` and
/// `wmem_max` where the process may (`SO_RCVBUFFORCE`, CAP_NET_ADMIN), else up to them.
/// Returns the receive buffer granted, as the kernel counts it (it doubles what is set, for
/// its bookkeeping).
pub fn grow_udp_buffers(socket: &std::net::UdpSocket, bytes: usize) -> usize {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option: libc::c_int| {
        // SAFETY: `fd` is an open socket owned by `socket` for the whole call, and the option
        // value is a c_int whose size is passed with it.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(force) {
            set(plain);
        }
    }
    let mut granted: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above; `granted` and `len` outlive the call and `len` is its size.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_mut(&mut granted).cast(),
            &mut len,
        ) == 0
    };
    if ok {
        usize::try_from(granted).unwrap_or(0)
    } else {
        0
    }
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
    bind_endpoint_with(quinn::EndpointConfig::default(), config, listen, None)
}

/// The UDP receive and send buffers a content server asks for. When a restarted server's
/// terminals all come back, thousands of handshake packets arrive at once; those beyond the
/// socket's receive buffer are dropped by the kernel, and each drop costs a terminal a
/// retransmission timeout (a third of a second, doubling) or a failed dial. Linux's default
/// (`net.core.rmem_default`, 208 KiB) holds fewer than a hundred such packets.
pub const SERVER_UDP_BUFFER: usize = 8 << 20;

/// Below this granted receive buffer a server warns: its socket drops packets under a burst of
/// returning terminals.
const UDP_BUFFER_WARN: usize = 2 << 20;

/// Like [`bind_endpoint`], with an endpoint configuration (the content server's keeps its
/// stateless reset key across restarts) and, if given, the size of the socket's receive and
/// send buffers to ask for ([`grow_udp_buffers`]).
pub fn bind_endpoint_with(
    endpoint: quinn::EndpointConfig,
    config: quinn::ServerConfig,
    listen: std::net::SocketAddr,
    buffers: Option<usize>,
) -> std::io::Result<quinn::Endpoint> {
    let bind = |addr: std::net::SocketAddr| {
        let socket = std::net::UdpSocket::bind(addr)?;
        if let Some(bytes) = buffers {
            let granted = grow_udp_buffers(&socket, bytes);
            if granted < bytes.min(UDP_BUFFER_WARN) {
                tracing::warn!(
                    "the UDP receive buffer is {} KiB (asked for {} KiB): a burst of returning \
                     terminals will see packets dropped; raise net.core.rmem_max (sysctl) to \
                     at least {bytes}",
                    granted / 1024,
                    bytes / 1024
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer is raised past the kernel's default: to what was asked when the process may
    /// force it (root), else as far as `net.core.rmem_max` lets it.
    #[test]
    fn udp_buffers_grow_as_far_as_allowed() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let asked = 4 << 20;
        let granted = grow_udp_buffers(&socket, asked);
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // The kernel reports twice what it was set to.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let expected = if root { asked } else { asked.min(rmem_max) };
        assert!(
            granted >= 2 * expected,
            "asked for {asked}, granted {granted} (rmem_max {rmem_max}, root {root})"
        );
    }
}
