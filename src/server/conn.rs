//! Terminal connections: the handshake, one task per connection (request streams, the push
//! stream and its acknowledgements), `Hello` (where a terminal's pushes resume) and the
//! dispatch of every other request.

use super::*;

/// Items queued per connection on the fast path; past that the writer reads the log instead.
pub(super) const FAST_PATH: usize = 1024;

/// Bytes one connection's fast paths may hold (its own pushes and the items of the streams it
/// follows, queued or being sent); past that, new items wait only in the store, where they
/// are anyway, and the task reads them when it gets there. With `[limits] push_stall_secs`,
/// this bounds what a terminal that stops reading costs the server (with its transport's
/// send window).
pub(super) const FAST_PATH_BYTES: usize = 256 * 1024;

pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a terminal may have in flight towards the server on one stream, and on all of them.
pub(super) const TERMINAL_STREAM_WINDOW: u32 = 16 * 1024;
pub(super) const TERMINAL_WINDOW: u32 = 32 * 1024;
/// What the server keeps in flight towards one terminal, unacknowledged.
pub(super) const TERMINAL_SEND_WINDOW: u64 = 64 * 1024;

/// The transport of terminal connections. A terminal sends small requests and acknowledgements
/// and receives pushes, so small flow-control windows cost it nothing, and they bound what one
/// terminal can make the server buffer (quinn's defaults: 1.25 MB per stream, and no bound over
/// all streams). Windows bound only what is in flight: a frame larger than a window (up to
/// `[limits] max_frame`) goes through in pieces as the reader consumes it. No datagrams.
pub(super) fn terminal_transport(limits: &ServerLimits) -> quinn::TransportConfig {
    let mut t = TransportLimits {
        max_bidi_streams: limits.max_streams_per_connection,
        max_uni_streams: 0,
        idle_timeout: Duration::from_secs(30),
        keep_alive: None,
    }
    .config();
    t.stream_receive_window(TERMINAL_STREAM_WINDOW.into())
        .receive_window(TERMINAL_WINDOW.into())
        .send_window(TERMINAL_SEND_WINDOW)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        // One datagram per send: quinn keeps each connection's send buffer at its largest
        // batch, and a terminal gets small pushes (about 1 KiB less per connection).
        .enable_segmentation_offload(false);
    t
}

/// Where a terminal's push stream starts (see [`Server::hello`]).
pub(super) struct Hello {
    pub(super) start: u64,
    pub(super) window_lost: bool,
    /// The log's end when the terminal said hello.
    pub(super) end: u64,
    /// Where each followed terminal's stream starts.
    pub(super) streams: Vec<(TerminalId, u64)>,
}

/// An item of a terminal's stream, encoded once as the frame every follower gets.
pub(super) struct SharedItem {
    pub(super) offset: u64,
    pub(super) frame: bytes::Bytes,
}

/// Where a connection is in the stream of a terminal its terminal follows.
pub(super) struct StreamState {
    /// The next offset to send.
    pub(super) next: u64,
    /// One past the newest offset known appended; [`UNREAD`] until the stream was read.
    pub(super) latest: u64,
    /// Fresh items as announced, at most [`FAST_PATH`] (and the connection's
    /// [`FAST_PATH_BYTES`]); past that the task reads the stream.
    pub(super) fast: FastItems,
}

impl SharedItem {
    /// What one connection's queue entry for this item holds (the frame is shared by every
    /// follower's connection, but each is charged for it: a connection's bound is its own).
    pub(super) fn held(&self) -> usize {
        std::mem::size_of::<(Arc<SharedItem>, Instant)>() + self.frame.len()
    }
}

/// What a queued push holds, its heap included (roughly: strings by length, map entries by
/// a fixed overhead each).
pub(super) fn held(push: &StoredPush) -> usize {
    let item = &push.item;
    std::mem::size_of::<(StoredPush, Instant)>()
        + item.uri.len()
        + item.title.len()
        + item.body.as_ref().map_or(0, String::len)
        + item
            .meta
            .iter()
            .map(|(k, v)| 64 + k.len() + v.len())
            .sum::<usize>()
        + push.collapse_key.as_ref().map_or(0, String::len)
}

/// Stream items handed to a connection, each with the instant it was accepted.
pub(super) type FastItems = VecDeque<(Arc<SharedItem>, Instant)>;

/// A stream's `latest` before the connection read it: read it to learn where it ends.
pub(super) const UNREAD: u64 = u64::MAX;

impl StreamState {
    pub(super) fn from(next: u64) -> Self {
        Self {
            next,
            latest: UNREAD,
            fast: VecDeque::new(),
        }
    }

    pub(super) fn behind(&self) -> bool {
        !self.fast.is_empty() || self.next < self.latest
    }
}

/// Where a connected terminal's pushes go.
pub(super) struct ConnSlot {
    pub(super) conn_id: u64,
    pub(super) conn: quinn::Connection,
    pub(super) outbox: Arc<Outbox>,
}

/// What the connection's task shares with those who push to its terminal, in one allocation.
pub(super) struct Outbox {
    /// Fresh pushes with the instant they were accepted (for the delivery latency histogram),
    /// at most [`FAST_PATH`] (and [`FAST_PATH_BYTES`] with the streams'); past that the task
    /// reads the log instead. The task takes the whole queue at once, so an idle connection
    /// holds no buffer here.
    pub(super) fast: Mutex<VecDeque<(StoredPush, Instant)>>,
    /// One past the newest offset appended for this terminal.
    pub(super) latest: AtomicU64,
    /// Wakes the connection's task: new pushes, or the terminal said hello.
    pub(super) wake: Notify,
    /// Bytes held by items in the fast paths (this one and the streams'), queued or taken by
    /// the task and not yet sent.
    pub(super) queued: AtomicUsize,
    /// Set by the first `Hello`.
    pub(super) hello_said: std::sync::atomic::AtomicBool,
    /// Where the push stream starts; [`NOT_STARTED`] until the hello is answered.
    pub(super) start: AtomicU64,
    /// The streams of the terminals followed with a link alive when the terminal said hello or
    /// followed since (fan-out on read). A stream whose link ended is dropped when the task
    /// next reads it; revocations drop it at once.
    pub(super) streams: Mutex<HashMap<TerminalId, StreamState>>,
}

pub(super) const NOT_STARTED: u64 = u64::MAX;

impl Outbox {
    pub(super) fn new() -> Self {
        Self {
            fast: Mutex::new(VecDeque::new()),
            latest: AtomicU64::new(0),
            wake: Notify::new(),
            queued: AtomicUsize::new(0),
            hello_said: std::sync::atomic::AtomicBool::new(false),
            start: AtomicU64::new(NOT_STARTED),
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `bytes` more held in the fast paths, if they fit in [`FAST_PATH_BYTES`].
    pub(super) fn reserve(&self, bytes: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held + bytes).filter(|&held| held <= FAST_PATH_BYTES)
            })
            .is_ok()
    }

    /// Counts `bytes` more held, whatever the bound (a page read from the store, sent next).
    pub(super) fn hold(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Counts `bytes` as no longer held (sent, or dropped).
    pub(super) fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(super) fn take_fast(&self) -> VecDeque<(StoredPush, Instant)> {
        std::mem::take(&mut *self.fast.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, StreamState>> {
        // Every update leaves the map consistent; a poisoned lock is still usable.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts sending `owner`'s stream from `since` (a follow), or moves a stream already
    /// known up to `since` (a new link never reads what was streamed before it). `end`: where
    /// the stream ended when the link began, if known (a new link); else the task reads the
    /// stream to learn it.
    pub(super) fn follow_stream(&self, owner: TerminalId, since: u64, end: Option<u64>) {
        self.streams()
            .entry(owner)
            .and_modify(|s| s.next = s.next.max(since))
            .or_insert_with(|| StreamState {
                latest: end.unwrap_or(UNREAD),
                ..StreamState::from(since)
            });
        self.wake.notify_one();
    }

    /// Stops sending `owner`'s stream (the link was revoked).
    pub(super) fn drop_stream(&self, owner: &TerminalId) {
        if let Some(stream) = self.streams().remove(owner) {
            self.release(stream.fast.iter().map(|(item, _)| item.held()).sum());
        }
    }
}

/// Accepts terminals. Before any handshake state exists: once half of `max_pending_handshakes`
/// are in progress, a source must prove its address with a QUIC Retry round trip (so forged
/// source addresses never get further); then per-source handshake rate and connection count,
/// and the connection slots. Handshakes in progress are capped, the oldest dropped for a new one,
/// so stalled handshakes cannot hold the slots terminals need.
pub(super) async fn accept(server: Server) {
    let limits = server.shared.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let pending = PendingHandshakes::new(limits.max_pending_handshakes);
    let retry_above = limits.max_pending_handshakes / 2;
    loop {
        let incoming = tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            incoming = server.shared.endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && pending.len() >= retry_above
        {
            // Stateless: a source that cannot receive at its address never gets further.
            server
                .shared
                .metrics
                .inc("handoff_handshake_retries_total", None);
            let _ = incoming.retry();
            continue;
        }
        // An IPv4 address (also IPv4-mapped on a dual-stack socket), or an IPv6 /64: one host
        // usually holds a whole /64, and rotating addresses in it must gain nothing.
        let source = source_key(incoming.remote_address().ip());
        if !server.shared.handshakes.allow(&source) {
            server.over_limit(
                "handshakes_per_sec_per_source",
                format_args!("handshakes from {source}"),
            );
            incoming.refuse();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            server.over_limit("max_connections", format_args!("refusing {source}"));
            incoming.refuse();
            continue;
        };
        let Some(source_slot) = server.shared.per_source.acquire(source) else {
            server.over_limit(
                "max_connections_per_source",
                format_args!("refusing {source}"),
            );
            incoming.refuse();
            continue;
        };
        let (handshake, evicted) = pending.begin();
        if evicted {
            server.over_limit(
                "max_pending_handshakes",
                format_args!("dropped the oldest handshake in progress for one from {source}"),
            );
        }
        let s = server.clone();
        server.shared.tasks.spawn(async move {
            let _slots = (permit, source_slot);
            let outcome = tokio::select! {
                _ = handshake.dropped.cancelled() => {
                    s.shared.metrics.inc(
                        "handoff_handshakes_failed_total",
                        Some(("reason", "dropped")),
                    );
                    return;
                }
                outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming) => outcome,
            };
            drop(handshake);
            let conn = match outcome {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    s.shared
                        .metrics
                        .inc("handoff_handshakes_failed_total", Some(("reason", "tls")));
                    return debug!("handshake failed: {e}");
                }
                Err(_) => {
                    s.shared.metrics.inc(
                        "handoff_handshakes_failed_total",
                        Some(("reason", "timeout")),
                    );
                    return debug!("handshake timed out");
                }
            };
            let Some(id) = peer_id(&conn) else {
                conn.close(varint(ErrorCode::Unexpected), b"no usable certificate");
                return;
            };
            let span = tracing::info_span!("terminal", id = %id.short());
            serve_terminal(s, conn, id).instrument(span).await;
        });
    }
}

pub(super) async fn serve_terminal(server: Server, conn: quinn::Connection, id: TerminalId) {
    let (store, idle, now) = (
        &server.shared.store,
        server.shared.limits.idle_terminal,
        unix_now(),
    );
    let seen = match store.read(move |b| b.seen(&id)).await {
        Ok(seen) => seen,
        Err(e) => {
            limited!(server, "store", warn!("store: {e}"));
            conn.close(varint(ErrorCode::Busy), b"store unavailable");
            return;
        }
    };
    // Before anything about a new terminal is stored: is its network over its quota? One the
    // store knows adds no state, and is admitted whatever the count (this node's memory, which
    // strangers may have filled since it started); it is counted if there is room.
    let known = seen.is_some_and(|seen| now.saturating_sub(seen) < idle.as_secs());
    let ip = conn.remote_address().ip().to_canonical();
    let source = source_key(ip);
    let admitted = server.shared.strangers.admit(ip, id, Instant::now());
    if let Err(refused) = admitted.or_else(|refused| if known { Ok(()) } else { Err(refused) }) {
        let limit = match refused {
            strangers::Refused::Quota => "known_terminals_per_source",
            strangers::Refused::Full => "known_terminals_tracked",
        };
        server.over_limit(limit, format_args!("refusing {} from {ip}", id.short()));
        conn.close(
            varint(ErrorCode::Busy),
            b"too many terminals from this network",
        );
        return;
    }
    if let Err(e) = register(store, idle, id, seen, now).await {
        limited!(server, "store", warn!("store: {e}"));
        conn.close(varint(ErrorCode::Busy), b"store unavailable");
        return;
    }
    let conn_id = server.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let outbox = Arc::new(Outbox::new());
    let slot = ConnSlot {
        conn_id,
        conn: conn.clone(),
        outbox: outbox.clone(),
    };
    if let Some(old) = server.conns().insert(id, slot) {
        old.conn.close(
            varint(ErrorCode::Replaced),
            b"replaced by a newer connection",
        );
    }
    server.shared.metrics.inc("handoff_connections_total", None);
    debug!(remote = %conn.remote_address(), "terminal connected");
    // Registered after the slot exists and before the log is read at hello, so no push appended
    // by another node can fall between the two.
    if let Some(cluster) = server.shared.cluster.clone() {
        match tokio::task::spawn_blocking(move || cluster.register(&[id])).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => limited!(
                server,
                "cluster",
                warn!("cannot register with the cluster: {e}")
            ),
            Err(e) => limited!(
                server,
                "cluster",
                warn!("cluster registration task failed: {e}")
            ),
        }
    }
    // Opened once the terminal said hello.
    let mut push: Option<PushStream> = None;
    loop {
        if let Some(p) = push.as_mut() {
            if p.send_pending(&server, id, &outbox).await.is_err()
                || p.send_streams(&server, id, &outbox).await.is_err()
            {
                break;
            }
        }
        tokio::select! {
            _ = server.shared.cancel.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let request = serve_request(server.clone(), conn.clone(), id, source, outbox.clone(), send, recv);
                    tokio::spawn(request.in_current_span());
                }
                Err(e) => {
                    debug!("terminal disconnected: {e}");
                    break;
                }
            },
            _ = outbox.wake.notified() => {
                let start = outbox.start.load(Ordering::Acquire);
                if push.is_none() && start != NOT_STARTED {
                    match conn.open_bi().await {
                        Ok((send, recv)) => push = Some(PushStream::new(conn.clone(), send, recv, start)),
                        Err(e) => {
                            debug!("cannot open the push stream: {e}");
                            break;
                        }
                    }
                }
            }
            read = async {
                match push.as_mut() {
                    Some(p) => p.acks.read().await,
                    None => std::future::pending().await,
                }
            }, if push.as_ref().is_some_and(|p| !p.acks.ended) => {
                if let (Some(next), Some(p)) = (read, push.as_mut()) {
                    server.shared.metrics.inc("handoff_pushes_acked_total", None);
                    p.hand_ack_to_store(&server, id, next);
                }
            }
        }
    }
    let still_ours = {
        let mut conns = server.conns();
        let ours = conns.get(&id).is_some_and(|slot| slot.conn_id == conn_id);
        if ours {
            conns.remove(&id);
        }
        ours
    };
    if let Some(cluster) = server.shared.cluster.clone().filter(|_| still_ours) {
        let _ = tokio::task::spawn_blocking(move || cluster.unregister(&id)).await;
    }
}

/// Reads one request from a stream the terminal opened and answers it.
pub(super) async fn serve_request(
    s: Server,
    conn: quinn::Connection,
    id: TerminalId,
    source: std::net::IpAddr,
    outbox: Arc<Outbox>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request: Request =
        match read_frame(&mut recv, READ_TIMEOUT, s.shared.limits.max_frame).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                s.shared
                    .metrics
                    .inc("handoff_bad_frames_total", Some(("code", e.code().name())));
                if let Some(suppressed) = s.shared.log_limit.check("bad_frame") {
                    warn!(suppressed, "bad request: {e}");
                }
                refuse_stream(&mut send, &mut recv, e.code());
                return;
            }
        };
    let body = if !s.shared.requests.allow(&id) {
        s.over_limit(
            "requests_per_sec_per_terminal",
            format_args!("from {}", id.short()),
        );
        ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: "too many requests; slow down".into(),
        })
    } else if !s.shared.source_requests.allow(&source) {
        s.over_limit("requests_per_sec_per_source", format_args!("from {source}"));
        ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: "too many requests from this network; slow down".into(),
        })
    } else if let RequestBody::Hello { cursor, streams } = request.body {
        if outbox.hello_said.swap(true, Ordering::AcqRel) {
            ResponseBody::Refused(Refusal {
                reason: RefusalReason::WrongEndpoint,
                message: "hello was already said on this connection".into(),
            })
        } else {
            match s.hello(id, cursor, streams, source).await {
                Ok(None) => {
                    conn.close(
                        varint(ErrorCode::Busy),
                        b"resync over this network's session budget; reconnect later",
                    );
                    return;
                }
                Ok(Some(Hello {
                    start,
                    window_lost,
                    end,
                    streams,
                })) => {
                    // The connection's task sends the log from `start` up to at least its end,
                    // then each followed stream from where it starts to its end.
                    outbox.latest.fetch_max(end.max(start), Ordering::AcqRel);
                    let replaced: usize = {
                        let mut known = outbox.streams();
                        streams
                            .into_iter()
                            .filter_map(|(owner, start)| {
                                known.insert(owner, StreamState::from(start))
                            })
                            .flat_map(|old| old.fast)
                            .map(|(item, _)| item.held())
                            .sum()
                    };
                    // Items queued by a follow before the hello are read again from its start.
                    outbox.release(replaced);
                    outbox.start.store(start, Ordering::Release);
                    outbox.wake.notify_one();
                    ResponseBody::Welcome {
                        epoch: s.epoch(),
                        start,
                        window_lost,
                    }
                }
                Err(e) => {
                    limited!(s, "store", warn!("store: {e}"));
                    conn.close(varint(ErrorCode::Busy), b"store unavailable");
                    return;
                }
            }
        }
    } else {
        s.handle(id, source, request.body).await
    };
    respond(send, request.id, body).await;
}

/// Marks a connecting terminal known (publishes to it are accepted from now on); returns
/// whether it wrote. A returning terminal seen within half of `[limits] idle_terminal_secs` is
/// left as it is: the sweep marks connected terminals seen every minute, long before idle expiry
/// could take it, so a reconnect storm reads the store but commits (and fsyncs) nothing.
/// `seen`: when the store last saw it (Unix seconds), as read before.
pub(super) async fn register(
    store: &Store,
    idle_terminal: Duration,
    id: TerminalId,
    seen: Option<u64>,
    now: u64,
) -> Result<bool, StoreError> {
    let recent = idle_terminal.as_secs() / 2;
    if seen.is_some_and(|seen| now.saturating_sub(seen) < recent) {
        return Ok(false);
    }
    store.write_one(Op::Touch { id, now }).await?;
    Ok(true)
}

pub(super) async fn respond(mut send: quinn::SendStream, id: u64, body: ResponseBody) {
    if write_frame(&mut send, &Response { id, body }).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

impl Server {
    /// Decides where `id`'s push stream starts, and whether its cursor could be honoured. When
    /// it could not, the current sessions of the terminals it follows are appended so it gets
    /// the current state.
    /// `None` when the resync is over `source`'s session budget (nothing was stored).
    pub(super) async fn hello(
        &self,
        id: TerminalId,
        cursor: Option<Cursor>,
        cursors: Vec<StreamCursor>,
        source: IpAddr,
    ) -> Result<Option<Hello>, StoreError> {
        let epoch = self.epoch();
        let now = unix_now();
        // Each followed stream starts at the terminal's cursor in it, never before its link
        // began (what was streamed before is not the follower's) nor past its end.
        let (log, streams) = self
            .shared
            .store
            .read(move |b| {
                let log = b.log(&id, 0, 0, now)?;
                let mut streams = Vec::new();
                for (first, _) in b.following(&id, now)? {
                    let Some(since) = b.link_since(&first, &id, now)? else {
                        continue;
                    };
                    let end = b.log(&store::stream_key(&first), 0, 0, now)?.next;
                    let cursor = cursors
                        .iter()
                        .find(|c| c.owner == first && c.epoch == epoch)
                        .map_or(since, |c| c.next);
                    streams.push((first, cursor.max(since).min(end)));
                }
                Ok((log, streams))
            })
            .await?;
        let (start, window_lost) = match cursor {
            Some(c) if c.epoch == epoch && c.next >= log.acked && c.next <= log.next => {
                (c.next, false)
            }
            Some(c) => {
                limited!(
                    self,
                    "resync",
                    info!(
                        cursor_epoch = c.epoch,
                        cursor = c.next,
                        epoch,
                        acked = log.acked,
                        next = log.next,
                        "cursor not honoured; resyncing"
                    )
                );
                (log.acked, true)
            }
            None => (log.acked, log.acked > 0),
        };
        if window_lost {
            self.shared.metrics.inc("handoff_resyncs_total", None);
            let followed = self
                .shared
                .store
                .read(move |b| {
                    let mut out = Vec::new();
                    for (first, _) in b.following(&id, now)? {
                        // The first terminal's side decides (an entry on the second's side
                        // may outlive a link refused or revoked meanwhile).
                        if b.link_since(&first, &id, now)?.is_none() {
                            continue;
                        }
                        if let Some(session) = b.session(&first)? {
                            out.push((first, session));
                        }
                    }
                    Ok(out)
                })
                .await?;
            let ttl = self.shared.push.default_ttl;
            // A session stored before sessions were size-checked may not fit a push: it is
            // left out rather than failing every hello of its followers.
            let items: Vec<(TerminalId, NewPush)> = followed
                .iter()
                .map(|(first, s)| (id, NewPush::session(*first, s, ttl)))
                .filter(|(_, push)| push.check_size("session").is_ok())
                .collect();
            // Reconnecting costs a copy of every followed session: budgeted like changes.
            let cost = items.iter().map(|(_, p)| p.size_bound() as u64).sum();
            if !self.charge_session_bytes(source, cost, format_args!("resync of {}", id.short())) {
                return Ok(None);
            }
            self.store_pushes(items, Vec::new()).await?;
        }
        Ok(Some(Hello {
            start,
            window_lost,
            end: log.next,
            streams,
        }))
    }

    /// Answers one request of terminal `id`, connected from source network `source`.
    pub(super) async fn handle(
        &self,
        id: TerminalId,
        source: IpAddr,
        body: RequestBody,
    ) -> ResponseBody {
        let result = match body {
            RequestBody::SetSession(session) => {
                debug!(title = ?session.as_ref().map(|s| &s.title), "session set");
                match self.session_budget(id, source, session.as_ref()) {
                    Some(refused) => Ok(refused),
                    None => self
                        .set_session(id, session)
                        .await
                        .map(|_| ResponseBody::SessionStored),
                }
            }
            RequestBody::Follow(request) => self.follow(id, source, request).await,
            RequestBody::Revoke { second, at } => self.revoke(id, second, at).await,
            RequestBody::Hello { .. } => unreachable!("hello is handled by the connection loop"),
            RequestBody::InterfaceInfo | RequestBody::Pair(_) => {
                Ok(ResponseBody::Refused(Refusal {
                    reason: RefusalReason::WrongEndpoint,
                    message: "a server does not serve terminal-to-terminal requests".into(),
                }))
            }
        };
        result.unwrap_or_else(|e| match e {
            // Over a size limit (counted where it was found): the message names the limit.
            StoreError::TooLarge { .. } => ResponseBody::Refused(Refusal {
                reason: RefusalReason::Busy,
                message: e.to_string(),
            }),
            e => {
                limited!(self, "store", warn!("store: {e}"));
                ResponseBody::Refused(Refusal {
                    reason: RefusalReason::Busy,
                    message: "the server's store failed; try again".into(),
                })
            }
        })
    }
}
