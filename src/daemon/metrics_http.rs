//! The daemon's optional Prometheus listener (`[metrics] listen`): `GET /metrics` only, no token,
//! so it belongs on loopback or a management network.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tracing::{info, warn};

use super::{lock, Daemon, DaemonError};

/// Binds the listener and serves it until shutdown. Returns the bound address.
pub(crate) async fn start(
    daemon: &Daemon,
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, DaemonError> {
    let bind_error = |source| DaemonError::MetricsBind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(daemon.clone());
    let cancel = daemon.shared.cancel.clone();
    daemon.spawn(
        async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
            {
                warn!("metrics listener failed: {e}");
            }
        },
        tracing::info_span!("metrics"),
    );
    info!(addr = %bound, "metrics listening");
    Ok(bound)
}

async fn metrics(State(daemon): State<Daemon>) -> impl IntoResponse {
    let sh = &daemon.shared;
    let connected = sh.home.as_ref().is_some_and(|h| h.is_connected());
    let text = sh.metrics.render(&[
        (
            "handoff_peers",
            "peers in the peer table",
            lock(&sh.peers).len() as f64,
        ),
        (
            "handoff_trusted_peers",
            "IDs on the trust list",
            sh.trust.list().len() as f64,
        ),
        (
            "handoff_follows",
            "peers followed now",
            daemon.follows().len() as f64,
        ),
        (
            "handoff_inbox_items",
            "pushes kept in the inbox",
            sh.inbox.len() as f64,
        ),
        (
            "handoff_server_connected",
            "1 while connected to the home server",
            f64::from(u8::from(connected)),
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
