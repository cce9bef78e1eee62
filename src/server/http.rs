//! The server's HTTP API (DESIGN §8): content backends publish with a bearer token; `/healthz`
//! and `/metrics` (Prometheus text) need none. Bodies are JSON, capped at 64 KiB (a batch at
//! 1 MiB); errors are `{"error": "..."}` with a 4xx/5xx status, every one of them (404 and 405
//! included, and the 400 and 431 the HTTP library answers itself: see [`JsonParseErrors`]). A
//! publish is answered 2xx only once the push is durably stored; a batch answers each push on
//! its own.
//!
//! Bounds (`[limits] http_*`): headers must arrive within a timeout (also on an idle
//! keep-alive connection) and fit a size (else 431), and a body must arrive within another; at most `http_max_connections` are held,
//! and at the cap a new connection takes the place of the one that has waited longest for a
//! request, so half-sent requests cannot lock out `/healthz` or a publisher.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::store::StoreError;
use super::{Publication, PublishError, Server};
use crate::config::HttpConfig;
use crate::http_conns::{serve_tracked, Connections, TOO_MANY};
use crate::identity::TerminalId;
use crate::wire::Session;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest body of a batch publish (`POST /v1/push`).
pub const MAX_BATCH_BODY: usize = 1024 * 1024;
/// Most pushes in one batch publish.
pub const MAX_BATCH_ITEMS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot bind the HTTP listener on {addr} ([http] listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Missing, unreadable, empty, or readable by group or others (`[http] token_file`).
    #[error("config key `http.token_file`: {0}")]
    Token(#[from] crate::files::FileError),
}

/// The publish token. `Debug` never shows it.
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads the token from systemd's credentials directory when it has the file's base name,
    /// else from `path` (see [`crate::files::read_secret`]).
    fn read(path: &Path) -> Result<Self, HttpError> {
        Ok(Self(crate::files::read_secret(path, "token file")?))
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().max(b.len()) {
            diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
        }
        diff == 0
    }
}

#[derive(Clone)]
struct App {
    server: Server,
    token: Option<Arc<Token>>,
    body_timeout: Duration,
}

/// Binds the listener and serves until the server shuts down; returns the bound address.
pub async fn serve(server: Server, config: &HttpConfig) -> Result<SocketAddr, HttpError> {
    let token = config
        .token_file
        .as_deref()
        .map(Token::read)
        .transpose()?
        .map(Arc::new);
    if token.is_none() {
        warn!("no [http] token_file: the publish API refuses every request");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| HttpError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: config.listen,
        source,
    })?;
    let limits = server.shared.limits;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/push", post(push_batch))
        .route("/v1/terminals/{id}/push", post(push_one))
        .route("/v1/terminals/{id}/followers/push", post(push_followers))
        .route("/v1/terminals/{id}/session", put(set_session))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(App {
            server: server.clone(),
            token,
            body_timeout: limits.http_body_timeout,
        });
    let accept = accept(
        server.clone(),
        listener,
        app,
        Arc::new(Connections::default()),
    );
    server.shared.tasks.spawn(accept);
    info!(%addr, "http api listening");
    Ok(addr)
}

/// Accepts HTTP connections until the server shuts down, within `[limits] http_*`.
async fn accept(
    server: Server,
    listener: tokio::net::TcpListener,
    app: Router,
    conns: Arc<Connections>,
) {
    let limits = server.shared.limits;
    let cancel = server.shared.cancel.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little rather than spin.
                    if let Some(suppressed) = server.shared.log_limit.check("http_accept") {
                        warn!(suppressed, "http accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match conns.make_room(limits.http_max_connections) {
            Ok(false) => {}
            Ok(true) => server.over_limit(
                "http_max_connections",
                format_args!("closing the longest-waiting connection for {peer}"),
            ),
            Err(()) => {
                server.over_limit("http_max_connections", format_args!("refusing {peer}"));
                let _ = tcp.try_write(TOO_MANY);
                continue;
            }
        }
        let (id, evict) = conns.insert();
        let (s, app, conns) = (server.clone(), app.clone(), conns.clone());
        server.shared.tasks.spawn(async move {
            serve_connection(&s, tcp, app, &conns, id, evict).await;
            conns.remove(id);
        });
    }
}

/// Serves one connection until it closes, times out, is evicted, or the server shuts down.
async fn serve_connection(
    server: &Server,
    tcp: tokio::net::TcpStream,
    app: Router,
    conns: &Arc<Connections>,
    id: u64,
    evict: CancellationToken,
) {
    let limits = server.shared.limits;
    let tcp = JsonParseErrors {
        io: tcp,
        max_header_bytes: limits.http_max_header_bytes,
        rewritten: None,
    };
    // The header limit is checked in config to be within what the library accepts.
    let connection = serve_tracked(
        tcp,
        app,
        conns,
        id,
        limits.http_header_timeout,
        limits.http_max_header_bytes,
    );
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => match served {
            Err(e) if e.is_timeout() => server.over_limit(
                "http_header_timeout",
                format_args!("no request headers within {:?}", limits.http_header_timeout),
            ),
            Err(e) if e.is_parse_too_large() => server.over_limit(
                "http_max_header_bytes",
                format_args!(
                    "request headers over {} bytes",
                    limits.http_max_header_bytes
                ),
            ),
            Err(e) => debug!("http connection: {e}"),
            Ok(()) => {}
        },
        _ = evict.cancelled() => {}
        _ = server.shared.cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
        }
    }
}

/// An HTTP connection's stream that gives the HTTP library's own error answers a JSON body.
///
/// hyper answers a request it cannot parse itself (400 for a malformed request line or header,
/// 414, 431 for headers over `http_max_header_bytes`), with an empty body and no hook to change
/// it. Those are the only answers with an error status and `content-length: 0` (the API's own
/// errors all carry `{"error": ...}`), and each is a head written alone: it is recognized as it
/// is written and sent with a JSON body instead.
struct JsonParseErrors<T> {
    io: T,
    max_header_bytes: usize,
    /// The rewritten answer being sent, and how many of its bytes are out.
    rewritten: Option<(Vec<u8>, usize)>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.rewritten.is_none() {
            this.rewritten = with_json_error(buf, this.max_header_bytes).map(|b| (b, 0));
        }
        let Some((bytes, sent)) = this.rewritten.as_mut() else {
            return std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        };
        // Until all of the rewritten answer is out, hyper is told nothing of `buf` was.
        while *sent < bytes.len() {
            match std::task::ready!(std::pin::Pin::new(&mut this.io).poll_write(cx, &bytes[*sent..]))
            {
                Ok(0) => return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => *sent += n,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
        this.rewritten = None;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut written = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(head), None) = (written.next(), written.next()) {
            if self.rewritten.is_some() || with_json_error(head, self.max_header_bytes).is_some() {
                return self.poll_write(cx, head);
            }
        }
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// If `written` is a whole answer head with an error status and `content-length: 0` (one of
/// hyper's own answers to a request it could not parse), the same answer with a JSON body.
fn with_json_error(written: &[u8], max_header_bytes: usize) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(written.strip_suffix(b"\r\n\r\n")?).ok()?;
    let status: u16 = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let empty = |line: &str| line.eq_ignore_ascii_case("content-length: 0");
    if !(400..600).contains(&status) || !head.split("\r\n").any(empty) {
        return None;
    }
    let message = match status {
        400 => "malformed request: bad request line, header or version".to_string(),
        431 => format!(
            "request headers over {max_header_bytes} bytes ([limits] http_max_header_bytes)"
        ),
        _ => StatusCode::from_u16(status)
            .ok()?
            .canonical_reason()?
            .to_lowercase(),
    };
    let body = json!({ "error": message }).to_string();
    let mut answer = String::with_capacity(written.len() + body.len() + 64);
    for line in head.split("\r\n") {
        if empty(line) {
            answer.push_str("content-type: application/json\r\n");
            answer.push_str(&format!("content-length: {}\r\n", body.len()));
        } else {
            answer.push_str(line);
            answer.push_str("\r\n");
        }
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

/// Gives every error response a JSON body `{"error": "..."}`: axum's own (an unknown method,
/// a bad path parameter) come as text or empty.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match Limited::new(body, 4096).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_string(),
        Err(_) => String::new(),
    };
    let mut message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    if let Some(allow) = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
    {
        message = format!("{message}; allowed: {allow}");
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = Body::from(json!({ "error": message }).to_string());
    Response::from_parts(parts, body)
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    Json(
        json!({ "status": "ok", "epoch": app.server.epoch(), "connected": app.server.connected() }),
    )
    .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let text = app.server.metrics().render(&[
        (
            "handoff_connected_terminals",
            "terminals connected now",
            app.server.connected() as f64,
        ),
        (
            "handoff_push_queued_bytes",
            "bytes of pushes held for connected terminals, not yet sent",
            app.server.queued_push_bytes() as f64,
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Checks the bearer token, the terminal ID and the body (read within the body timeout); the
/// common front of the publish API.
async fn admit<T: serde::de::DeserializeOwned>(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    body: Body,
) -> Result<(TerminalId, T), (StatusCode, String)> {
    authorize(app, headers)?;
    let id: TerminalId = id
        .parse()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad terminal id: {e}")))?;
    let body = read_body(app, body, MAX_BODY).await?;
    let parsed = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))?;
    Ok((id, parsed))
}

/// Checks the bearer token.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let authorized =
        matches!((&app.token, presented), (Some(token), Some(p)) if token.matches(p.trim()));
    if !authorized {
        app.server.shared.metrics.inc(
            "handoff_http_refusals_total",
            Some(("reason", "unauthorized")),
        );
        return Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ));
    }
    Ok(())
}

/// Reads a request body of at most `max` bytes within `[limits] http_body_timeout_secs`.
async fn read_body(app: &App, body: Body, max: usize) -> Result<Bytes, (StatusCode, String)> {
    match tokio::time::timeout(app.body_timeout, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {max} bytes"),
        )),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => {
            app.server.over_limit(
                "http_body_timeout",
                format_args!("no request body within {:?}", app.body_timeout),
            );
            Err((
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    app.body_timeout.as_secs()
                ),
            ))
        }
    }
}

fn publish_error(e: PublishError) -> Response {
    error(publish_status(&e), e.to_string())
}

fn publish_status(e: &PublishError) -> StatusCode {
    match e {
        PublishError::UnknownTerminal(_) => StatusCode::NOT_FOUND,
        PublishError::BadTtl(_) => StatusCode::BAD_REQUEST,
        PublishError::Store(StoreError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        PublishError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `POST /v1/push`: a JSON array of pushes, each `{"to": id, ...}` with the body of a single
/// push, stored in one commit. 200 with one result per push, in order: `{"terminal","offset"}`
/// once stored, or `{"status","error"}` (the status a single push would have got). A bad item
/// fails alone.
async fn push_batch(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    if let Err((status, message)) = authorize(&app, &headers) {
        return error(status, message);
    }
    let body = match read_body(&app, body, MAX_BATCH_BODY).await {
        Ok(b) => b,
        Err((status, message)) => return error(status, message),
    };
    let items: Vec<serde_json::Map<String, serde_json::Value>> = match serde_json::from_slice(&body)
    {
        Ok(items) => items,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad JSON body (an array of push objects, each with \"to\"): {e}"),
            )
        }
    };
    if items.len() > MAX_BATCH_ITEMS {
        app.server.over_limit(
            "http_batch_items",
            format_args!("a batch of {} pushes", items.len()),
        );
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} pushes in one batch; at most {MAX_BATCH_ITEMS}",
                items.len()
            ),
        );
    }
    // Each item parsed on its own: a bad one gets its own 400.
    let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(items.len());
    let mut batch = Vec::new();
    let mut positions = Vec::new();
    for mut item in items {
        let to = match item.remove("to") {
            Some(serde_json::Value::String(to)) => to,
            _ => {
                results.push(Some(item_error(
                    StatusCode::BAD_REQUEST,
                    "each push needs \"to\": a terminal id".into(),
                )));
                continue;
            }
        };
        let to: TerminalId = match to.parse() {
            Ok(id) => id,
            Err(e) => {
                results.push(Some(item_error(
                    StatusCode::BAD_REQUEST,
                    format!("bad terminal id: {e}"),
                )));
                continue;
            }
        };
        match serde_json::from_value::<Publication>(serde_json::Value::Object(item)) {
            Ok(publication) => {
                positions.push(results.len());
                results.push(None);
                batch.push((to, publication));
            }
            Err(e) => results.push(Some(item_error(
                StatusCode::BAD_REQUEST,
                format!("bad push: {e}"),
            ))),
        }
    }
    let tos: Vec<TerminalId> = batch.iter().map(|(to, _)| *to).collect();
    let answers = match app.server.publish_many(batch).await {
        Ok(answers) => answers,
        Err(e) => return publish_error(e.into()),
    };
    for ((position, to), answer) in positions.into_iter().zip(tos).zip(answers) {
        results[position] = Some(match answer {
            Ok(offset) => json!({ "terminal": to.to_string(), "offset": offset }),
            Err(e) => item_error(publish_status(&e), e.to_string()),
        });
    }
    let results: Vec<serde_json::Value> = results.into_iter().flatten().collect();
    Json(json!({ "results": results, "epoch": app.server.epoch() })).into_response()
}

fn item_error(status: StatusCode, message: String) -> serde_json::Value {
    json!({ "status": status.as_u16(), "error": message })
}

async fn push_one(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (id, publication): (TerminalId, Publication) = match admit(&app, &headers, &id, body).await
    {
        Ok(v) => v,
        Err((status, message)) => return error(status, message),
    };
    match app.server.publish(id, publication).await {
        Ok(offset) => Json(
            json!({ "offset": offset, "epoch": app.server.epoch(), "terminal": id.to_string() }),
        )
        .into_response(),
        Err(e) => publish_error(e),
    }
}

async fn push_followers(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (id, publication): (TerminalId, Publication) = match admit(&app, &headers, &id, body).await
    {
        Ok(v) => v,
        Err((status, message)) => return error(status, message),
    };
    match app.server.publish_to_followers(id, publication).await {
        Ok(sent) => {
            let offsets: serde_json::Map<String, serde_json::Value> = sent
                .iter()
                .map(|(to, offset)| (to.to_string(), json!(offset)))
                .collect();
            Json(json!({ "pushed": sent.len(), "offsets": offsets, "epoch": app.server.epoch() }))
                .into_response()
        }
        Err(e) => publish_error(e),
    }
}

async fn set_session(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (id, session): (TerminalId, Option<Session>) = match admit(&app, &headers, &id, body).await
    {
        Ok(v) => v,
        Err((status, message)) => return error(status, message),
    };
    match app.server.known(id).await {
        Ok(true) => {}
        Ok(false) => return publish_error(PublishError::UnknownTerminal(id)),
        Err(e) => return publish_error(e.into()),
    }
    match app.server.set_session(id, session).await {
        Ok(followers) => Json(json!({ "followers": followers })).into_response(),
        Err(e) => publish_error(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only hyper's own empty error answers are rewritten; the API's answers pass unchanged.
    #[test]
    fn only_empty_error_answers_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(with_json_error(head, 16384).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{answer}"
        );
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.ends_with("\r\ndate: x"), "{answer}");
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(error["error"].as_str().unwrap().contains("16384"), "{body}");
        for untouched in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"error\":\"x\"}",
        ] {
            assert!(with_json_error(untouched, 16384).is_none(), "{untouched:?}");
        }
    }

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].is_string());
    }

    #[test]
    fn token_compare_and_debug() {
        let t = Token("s3cret".into());
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cretx"));
        assert!(!t.matches(""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }
}
