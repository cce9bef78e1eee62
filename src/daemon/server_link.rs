//! A terminal's connection to one content server.
//!
//! The home link (the `[server]` of the config) is kept up for the daemon's whole life and syncs
//! the session on every change. A link to another server, learned from a peer's interface info,
//! is kept while a follow on it lives. Pushes arrive on streams the server opens on the link's
//! connection; each stream is read in order and every item is delivered before the next is read.
//!
//! After a lost connection the link waits a random part of [`Reconnect::LOSS_SPREAD`] before it
//! dials again, and a random delay between half and all of an exponential backoff after each
//! failed attempt: the terminals of a server that restarts lose it at the same instant, and
//! without the jitter they would come back at the same instants too, in waves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Daemon;
use crate::identity::ServerId;
use crate::net::{self, unix_now, varint, FrameError, RequestError};
use crate::tls::SERVER_NAME;
use crate::wire::{
    ErrorCode, PushAck, RefusalReason, RequestBody, ResponseBody, ServerInfo, ServerPush,
};

/// How long one connection attempt to one address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a session the server refused as busy waits before it is sent again.
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// The delays before reconnect attempts: random, so that many terminals that lost one server
/// together do not all come back at the same instant (DESIGN §9: a restarted server serves
/// 10,000 returning terminals within 10 s).
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// The ceiling of the next delay after a failed attempt; doubles up to [`BACKOFF_MAX`].
    ceiling: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            ceiling: BACKOFF_MIN,
        }
    }
}

impl Reconnect {
    /// The first attempt after losing a live connection comes at a random instant within this.
    pub const LOSS_SPREAD: Duration = Duration::from_secs(2);

    /// The delay before the first attempt after a live connection was lost: uniform in
    /// `[0, LOSS_SPREAD]`. Resets the backoff.
    pub fn after_loss(&mut self) -> Duration {
        self.ceiling = BACKOFF_MIN;
        random_up_to(Self::LOSS_SPREAD)
    }

    /// The delay before the next attempt after one failed: uniform between half the backoff
    /// and all of it; the backoff doubles each time, from 250 ms up to 30 s.
    pub fn after_failure(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(BACKOFF_MAX);
        ceiling / 2 + random_up_to(ceiling / 2)
    }

    /// A connection was made: the next failure starts the backoff from its minimum.
    pub fn connected(&mut self) {
        self.ceiling = BACKOFF_MIN;
    }
}

fn random_up_to(max: Duration) -> Duration {
    let millis = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=millis))
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach server {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error(transparent)]
    Request(#[from] RequestError),
}

pub(crate) struct ServerLink {
    /// The server, with the addresses configured (home link) or first learned.
    pub server: ServerInfo,
    home: bool,
    /// Where a dial tries: the address the last connection was made at first, then those of
    /// the latest interface info that named this server (a peer's own word: one that names
    /// the server at a false address must not keep later pulls from reaching it).
    dial_at: std::sync::Mutex<DialAt>,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    connected: AtomicBool,
    /// Unix seconds until which a non-home link is wanted (the latest follow's lease).
    wanted_until: AtomicU64,
    keeper_running: AtomicBool,
    /// Follows in progress on this link (from `link_for` until linked or failed).
    follows_in_flight: std::sync::atomic::AtomicUsize,
    /// The highest session version the server confirmed (home link only).
    pub synced: watch::Sender<u64>,
}

/// A follow in progress on a link (see [`ServerLink::follow_started`]).
pub(crate) struct FollowInFlight(Arc<ServerLink>);

impl std::ops::Deref for FollowInFlight {
    type Target = Arc<ServerLink>;
    fn deref(&self) -> &Arc<ServerLink> {
        &self.0
    }
}

impl Drop for FollowInFlight {
    fn drop(&mut self) {
        self.0.follows_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a link dials (see [`ServerLink::learn_addrs`]).
struct DialAt {
    reached: Option<SocketAddr>,
    addrs: Vec<String>,
}

impl ServerLink {
    pub fn new(server: ServerInfo, home: bool) -> Self {
        Self {
            dial_at: std::sync::Mutex::new(DialAt {
                reached: None,
                addrs: server.addrs.clone(),
            }),
            server,
            home,
            conn: tokio::sync::Mutex::new(None),
            connected: AtomicBool::new(false),
            wanted_until: AtomicU64::new(0),
            keeper_running: AtomicBool::new(false),
            follows_in_flight: std::sync::atomic::AtomicUsize::new(0),
            synced: watch::Sender::new(0),
        }
    }

    /// The addresses of the latest interface info naming this server: tried after the one
    /// last reached. A home link keeps its configured ones.
    pub fn learn_addrs(&self, addrs: &[String]) {
        if !self.home {
            self.dial_at().addrs = addrs.to_vec();
        }
    }

    fn dial_at(&self) -> std::sync::MutexGuard<'_, DialAt> {
        // Every update leaves it consistent; a poisoned lock is still usable.
        self.dial_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The live connection, dialing the server (and saying hello) if there is none. Cancel-safe.
    pub async fn connection(&self, daemon: &Daemon) -> Result<quinn::Connection, LinkError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = self.dial(daemon).await?;
        let cursor = daemon.shared.inbox.cursor(&self.server.id);
        let streams = daemon.shared.inbox.stream_cursors(&self.server.id);
        let (epoch, start, window_lost) =
            match net::request(&conn, RequestBody::Hello { cursor, streams }).await? {
                ResponseBody::Welcome {
                    epoch,
                    start,
                    window_lost,
                } => (epoch, start, window_lost),
                other => {
                    conn.close(varint(ErrorCode::Unexpected), b"expected welcome");
                    return Err(LinkError::Unreachable {
                        server: self.server.id.short(),
                        reason: format!("answered hello with {other:?}"),
                    });
                }
            };
        if window_lost {
            daemon
                .shared
                .metrics
                .inc("handoff_push_windows_lost_total", None);
            warn!(server = %self.server.id.short(), ?cursor, epoch, "the server could not resume this terminal's pushes; it resends the current state");
        }
        info!(server = %self.server.id.short(), remote = %conn.remote_address(), epoch, start, "connected to server");
        if self.home {
            // Revocations the server may have missed (made while it was unreachable) go first.
            for (second, at) in daemon.shared.trust.revocations() {
                match net::request(&conn, RequestBody::Revoke { second, at }).await {
                    Ok(ResponseBody::Revoked { .. }) => {
                        debug!(peer = %second.short(), at, "revocation sent")
                    }
                    other => warn!(peer = %second.short(), "revocation not confirmed: {other:?}"),
                }
            }
        }
        self.connected.store(true, Ordering::Relaxed);
        *slot = Some(conn.clone());
        daemon.spawn(
            read_pushes(daemon.clone(), conn.clone(), self.server.id, epoch),
            tracing::info_span!("pushes", server = %self.server.id.short()),
        );
        Ok(conn)
    }

    async fn dial(&self, daemon: &Daemon) -> Result<quinn::Connection, LinkError> {
        let unreachable = |reason: String| LinkError::Unreachable {
            server: self.server.id.short(),
            reason,
        };
        let config = daemon
            .dial_config(self.server.id)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut errors = Vec::new();
        let (reached, addrs) = {
            let at = self.dial_at();
            (at.reached, at.addrs.clone())
        };
        let mut tried = Vec::new();
        for addr in reached.map(|a| a.to_string()).into_iter().chain(addrs) {
            let resolved = match tokio::net::lookup_host(addr.as_str()).await {
                Ok(list) => list.collect::<Vec<_>>(),
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            for sockaddr in resolved {
                if tried.contains(&sockaddr) {
                    continue;
                }
                tried.push(sockaddr);
                let connecting =
                    match daemon
                        .shared
                        .endpoint
                        .connect_with(config.clone(), sockaddr, SERVER_NAME)
                    {
                        Ok(c) => c,
                        Err(e) => {
                            errors.push(format!("{sockaddr}: {e}"));
                            continue;
                        }
                    };
                match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                    Ok(Ok(conn)) => {
                        self.dial_at().reached = Some(sockaddr);
                        return Ok(conn);
                    }
                    Ok(Err(e)) => errors.push(format!("{sockaddr}: {}", explain_connect_error(&e))),
                    Err(_) => {
                        errors.push(format!("{sockaddr}: no answer within {CONNECT_TIMEOUT:?}"))
                    }
                }
            }
        }
        Err(unreachable(errors.join("; ")))
    }

    /// Sends one request on the link's connection.
    pub async fn request(
        &self,
        daemon: &Daemon,
        body: RequestBody,
    ) -> Result<ResponseBody, LinkError> {
        let conn = self.connection(daemon).await?;
        Ok(net::request(&conn, body).await?)
    }

    /// Marks a follow in progress on this link until the guard is dropped: meanwhile the link
    /// is neither released nor dropped from the daemon's map.
    pub fn follow_started(self: &Arc<Self>) -> FollowInFlight {
        self.follows_in_flight.fetch_add(1, Ordering::AcqRel);
        FollowInFlight(self.clone())
    }

    /// Whether no follow wants this link: not home, none in progress, none kept.
    fn unwanted(&self) -> bool {
        !self.home
            && self.follows_in_flight.load(Ordering::Acquire) == 0
            && !self.keeper_running.load(Ordering::Acquire)
            && self.wanted_until.load(Ordering::Relaxed) <= unix_now()
    }

    /// Closes the connection of a link no follow wants (one the server refused, say), so that
    /// server has no connection to push on. Not the home link, nor one a follow in progress or
    /// a live follow keeps.
    pub async fn release_if_unwanted(&self) {
        if !self.unwanted() {
            return;
        }
        let mut slot = self.conn.lock().await;
        // Asked again: a follow may have begun while the lock was awaited.
        if !self.unwanted() {
            return;
        }
        if let Some(conn) = slot.take() {
            conn.close(varint(ErrorCode::Closed), b"not following");
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Whether nothing holds this link: no follow wants it and it has no connection.
    pub fn unused(&self) -> bool {
        self.unwanted() && !self.is_connected()
    }

    /// Keeps a non-home link up until `until` (Unix seconds), reconnecting if it drops.
    pub fn keep_until(self: &Arc<Self>, daemon: &Daemon, until: u64) {
        self.wanted_until.fetch_max(until, Ordering::Relaxed);
        if self.home || self.keeper_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.clone();
        daemon.spawn(
            keep(daemon.clone(), link),
            tracing::info_span!("follow-link", server = %self.server.id.short()),
        );
    }
}

/// Whether a handshake failed because the endpoint holds another key than the pinned one.
pub(crate) fn is_key_mismatch(e: &quinn::ConnectionError) -> bool {
    e.to_string().contains("ApplicationVerificationFailure")
}

/// Explains a failed handshake in words a user can act on.
pub(crate) fn explain_connect_error(e: &quinn::ConnectionError) -> String {
    // A close's reason is the other side's own text.
    let text = crate::text::clean(e.to_string());
    if is_key_mismatch(e) {
        "the endpoint does not hold the expected key (wrong id, or an impersonator)".into()
    } else {
        text
    }
}

/// The home link: connect, sync the session now and on every change, reconnect on loss.
pub(crate) async fn supervise_home(daemon: Daemon, link: Arc<ServerLink>) {
    let mut sessions = daemon.shared.session.subscribe();
    let mut reconnect = Reconnect::default();
    let mut last_error = String::new();
    loop {
        let conn = tokio::select! {
            _ = daemon.cancelled() => return,
            conn = link.connection(&daemon) => conn,
        };
        let conn = match conn {
            Ok(conn) => {
                reconnect.connected();
                last_error.clear();
                conn
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    warn!("{text}; retrying");
                    last_error = text;
                }
                link.connected.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = daemon.cancelled() => return,
                    _ = tokio::time::sleep(reconnect.after_failure()) => {}
                }
                continue;
            }
        };
        // Sync until the connection fails; then reconnect and sync again.
        loop {
            let state = sessions.borrow_and_update().clone();
            match net::request(&conn, RequestBody::SetSession(state.session)).await {
                Ok(ResponseBody::SessionStored) => {
                    debug!(version = state.version, "server stored the session");
                    link.synced.send_replace(state.version);
                }
                Ok(ResponseBody::Refused(r)) if r.reason == RefusalReason::Busy => {
                    // Over a server budget: the latest session goes again shortly, so
                    // followers are not left with an older one until the next change.
                    warn!("server refused the session for now: {r}; sending it again in {BUSY_RETRY:?}");
                    tokio::select! {
                        _ = daemon.cancelled() => return,
                        _ = conn.closed() => break,
                        _ = tokio::time::sleep(BUSY_RETRY) => continue,
                    }
                }
                Ok(other) => warn!("server answered SetSession with {other:?}"),
                Err(e) => {
                    warn!("session sync failed: {e}");
                    conn.close(varint(ErrorCode::Closed), b"sync failed");
                    break;
                }
            }
            tokio::select! {
                _ = daemon.cancelled() => return,
                changed = sessions.changed() => if changed.is_err() { return },
                _ = conn.closed() => {
                    warn!("lost the server connection; reconnecting");
                    break;
                }
            }
        }
        link.connected.store(false, Ordering::Relaxed);
        tokio::select! {
            _ = daemon.cancelled() => return,
            _ = tokio::time::sleep(reconnect.after_loss()) => {}
        }
    }
}

/// A follow link: reconnect while wanted, drop the connection when the lease ends.
async fn keep(daemon: Daemon, link: Arc<ServerLink>) {
    let mut reconnect = Reconnect::default();
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = daemon.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let until = link.wanted_until.load(Ordering::Relaxed);
        let now = unix_now();
        if now >= until {
            break;
        }
        let conn = match link.connection(&daemon).await {
            Ok(conn) => {
                reconnect.connected();
                conn
            }
            Err(e) => {
                warn!("{e}; retrying");
                delay = reconnect.after_failure();
                continue;
            }
        };
        delay = Duration::ZERO;
        tokio::select! {
            _ = daemon.cancelled() => break,
            _ = conn.closed() => {
                link.connected.store(false, Ordering::Relaxed);
                delay = reconnect.after_loss();
            }
            _ = tokio::time::sleep(Duration::from_secs(until.saturating_sub(now))) => {}
        }
    }
    if let Some(conn) = link.conn.lock().await.take() {
        conn.close(varint(ErrorCode::Closed), b"lease ended");
    }
    link.connected.store(false, Ordering::Relaxed);
    link.keeper_running.store(false, Ordering::Release);
    // A follow that renewed the lease while this keeper was ending needs a keeper again.
    if link.wanted_until.load(Ordering::Relaxed) > unix_now()
        && !daemon.shared.cancel.is_cancelled()
    {
        link.keep_until(&daemon, 0);
    }
}

/// How long acknowledgements are held to be sent together.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Reads the push stream the server opens on `conn`, delivering items in order and
/// acknowledging them once they are in the inbox.
async fn read_pushes(daemon: Daemon, conn: quinn::Connection, server: ServerId, epoch: u64) {
    loop {
        let (send, mut recv) = tokio::select! {
            _ = daemon.cancelled() => return,
            stream = conn.accept_bi() => match stream {
                Ok(s) => s,
                Err(e) => {
                    debug!("push streams ended: {e}");
                    return;
                }
            },
        };
        let acked = watch::Sender::new(0u64);
        daemon.spawn(
            send_acks(send, acked.subscribe()),
            tracing::info_span!("acks"),
        );
        loop {
            // A push stream is long-lived: idle time between items is not a timeout, so the
            // per-frame timeout is long; connection keep-alive detects a dead server.
            match net::read_payload(
                &mut recv,
                Duration::from_secs(24 * 3600),
                crate::wire::MAX_FRAME,
            )
            .await
            {
                Ok(Some(payload)) => match crate::wire::decode_payload::<ServerPush>(&payload) {
                    // No log reaches the last offset: nothing could acknowledge past it.
                    Ok(ServerPush::Item(item)) if item.offset == u64::MAX => {
                        warn!(
                            "bad push frame from server: an item at offset {}",
                            item.offset
                        );
                        let _ = recv.stop(varint(ErrorCode::Malformed));
                        break;
                    }
                    Ok(ServerPush::Item(item)) => {
                        let next = item.offset + 1;
                        match item.from {
                            Some(from)
                                if !daemon.shared.followed.allows(&server, &from, unix_now()) =>
                            {
                                not_followed(&daemon, &server, Some(&from), item.offset);
                            }
                            // A publisher's own push: only from the server this terminal is
                            // attached to. Another server is there for the terminals followed
                            // on it, whose sessions and publishers' pushes come on their
                            // streams.
                            None if !is_home(&daemon, &server) => {
                                not_followed(&daemon, &server, None, item.offset);
                            }
                            _ => daemon.deliver(server, None, epoch, item).await,
                        }
                        acked.send_replace(next);
                    }
                    Ok(ServerPush::Stream { item, .. }) if item.offset == u64::MAX => {
                        warn!(
                            "bad push frame from server: a stream item at offset {}",
                            item.offset
                        );
                        let _ = recv.stop(varint(ErrorCode::Malformed));
                        break;
                    }
                    // A followed terminal's stream: only from a terminal followed at this
                    // server, and only its own session or a publisher's push to its followers.
                    // Streams are not acknowledged; the inbox keeps their cursors.
                    Ok(ServerPush::Stream { owner, item }) => {
                        if !daemon.shared.followed.allows(&server, &owner, unix_now())
                            || item.from.is_some_and(|from| from != owner)
                        {
                            not_followed(&daemon, &server, Some(&owner), item.offset);
                        } else {
                            daemon.deliver(server, Some(owner), epoch, item).await;
                        }
                    }
                    // An item this terminal cannot read: report it and acknowledge past it, so
                    // one bad item never stalls the ones after it.
                    Err(e) => {
                        match crate::wire::push_offset(&payload)
                            .and_then(|(stream, o)| Some((stream, o.checked_add(1)?)))
                        {
                            Some((None, next)) => {
                                skip_undecodable(&daemon, next - 1, &e);
                                acked.send_modify(|acked| *acked = (*acked).max(next));
                            }
                            // Nothing to acknowledge on a stream: the item is skipped.
                            Some((Some(_), next)) => skip_undecodable(&daemon, next - 1, &e),
                            None => {
                                warn!("bad push frame from server: {e}");
                                let _ = recv.stop(varint(e.code()));
                                break;
                            }
                        }
                    }
                },
                Ok(None) => break,
                Err(FrameError::Stream(e)) => {
                    debug!("push stream closed: {e}");
                    break;
                }
                Err(e) => {
                    warn!("bad push frame from server: {e}");
                    let _ = recv.stop(varint(e.code()));
                    break;
                }
            }
        }
    }
}

/// Counts and reports (at most once per interval) a push this terminal does not take from that
/// server: one naming a peer it does not follow there (`from`), or a publisher's push from a
/// server it is not attached to (`None`). It is acknowledged (so it never stalls the stream)
/// but not delivered.
fn not_followed(
    daemon: &Daemon,
    server: &ServerId,
    from: Option<&crate::identity::TerminalId>,
    offset: u64,
) {
    daemon
        .shared
        .metrics
        .inc("handoff_pushes_not_followed_total", None);
    if let Some(suppressed) = daemon.shared.guards.log.check("not_followed_push") {
        let what = match from {
            Some(from) => format!(
                "a session of {}, which this terminal does not follow there",
                from.short()
            ),
            None => "a publisher's push, but this terminal is not attached to it".into(),
        };
        warn!(
            offset,
            suppressed,
            "server {} pushed {what}; not delivered",
            server.short()
        );
    }
}

fn is_home(daemon: &Daemon, server: &ServerId) -> bool {
    daemon
        .shared
        .home
        .as_ref()
        .is_some_and(|home| home.server.id == *server)
}

/// Counts and reports (at most once per interval) a push item that does not decode.
fn skip_undecodable(daemon: &Daemon, offset: u64, e: &crate::wire::WireError) {
    daemon
        .shared
        .metrics
        .inc("handoff_pushes_undecodable_total", None);
    if let Some(suppressed) = daemon.shared.guards.log.check("undecodable_push") {
        warn!(
            offset,
            suppressed, "skipping a push item that does not decode: {e}"
        );
    }
}

/// Sends the latest delivered offset back on the push stream, at most every [`ACK_DELAY`].
async fn send_acks(mut send: quinn::SendStream, mut acked: watch::Receiver<u64>) {
    while acked.changed().await.is_ok() {
        tokio::time::sleep(ACK_DELAY).await;
        let next = *acked.borrow_and_update();
        if net::write_frame(&mut send, &PushAck::Ack { next })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reconnect delays are spread at random (terminals that lost a server together do not
    /// come back together), grow on failure up to the cap, and start over once connected.
    #[test]
    fn reconnect_delays_are_jittered_and_bounded() {
        let losses: Vec<Duration> = (0..200)
            .map(|_| Reconnect::default().after_loss())
            .collect();
        assert!(losses.iter().all(|d| *d <= Reconnect::LOSS_SPREAD));
        let distinct: std::collections::BTreeSet<_> = losses.iter().collect();
        assert!(
            distinct.len() > 100,
            "{} distinct delays of 200",
            distinct.len()
        );
        assert!(losses.iter().any(|d| *d < Reconnect::LOSS_SPREAD / 2));
        assert!(losses.iter().any(|d| *d > Reconnect::LOSS_SPREAD / 2));

        let mut r = Reconnect::default();
        let mut ceiling = BACKOFF_MIN;
        for _ in 0..12 {
            let d = r.after_failure();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(BACKOFF_MAX);
        }
        assert_eq!(ceiling, BACKOFF_MAX);
        r.connected();
        assert!(r.after_failure() <= BACKOFF_MIN);
        r.after_failure();
        assert!(r.after_loss() <= Reconnect::LOSS_SPREAD);
        assert!(
            r.after_failure() <= BACKOFF_MIN,
            "a loss starts the backoff over"
        );
    }
}
