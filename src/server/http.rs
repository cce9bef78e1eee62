//! The server's HTTP API (DESIGN §8): content backends publish with a bearer token; `/healthz`
//! and `/metrics` (Prometheus text) need none. Bodies are JSON, capped at 64 KiB; errors are
//! `{"error": "..."}` with a 4xx/5xx status. A publish is answered 2xx only once the push is
//! durably stored.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use tracing::{info, warn};

use super::{Publication, PublishError, Server};
use crate::config::HttpConfig;
use crate::identity::TerminalId;
use crate::wire::Session;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

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
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/terminals/{id}/push", post(push_one))
        .route("/v1/terminals/{id}/followers/push", post(push_followers))
        .route("/v1/terminals/{id}/session", put(set_session))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(App {
            server: server.clone(),
            token,
        });
    let cancel = server.shared.cancel.clone();
    server.shared.tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            warn!("http listener failed: {e}");
        }
    });
    info!(%addr, "http api listening");
    Ok(addr)
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
    let text = app.server.metrics().render(&[(
        "handoff_connected_terminals",
        "terminals connected now",
        app.server.connected() as f64,
    )]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Checks the bearer token, the terminal ID and the body; the common front of the publish API.
fn admit<T: serde::de::DeserializeOwned>(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<(TerminalId, T), (StatusCode, String)> {
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
    let id: TerminalId = id
        .parse()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad terminal id: {e}")))?;
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            (status, format!("request body larger than {MAX_BODY} bytes"))
        } else {
            (status, e.body_text())
        }
    })?;
    let parsed = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))?;
    Ok((id, parsed))
}

fn publish_error(e: PublishError) -> Response {
    match e {
        PublishError::UnknownTerminal(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        PublishError::BadTtl(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        PublishError::Store(_) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn push_one(
    State(app): State<App>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (id, publication): (TerminalId, Publication) = match admit(&app, &headers, &id, body) {
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
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (id, publication): (TerminalId, Publication) = match admit(&app, &headers, &id, body) {
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
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (id, session): (TerminalId, Option<Session>) = match admit(&app, &headers, &id, body) {
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
