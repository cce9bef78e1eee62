//! The push stream of one connection: the terminal's log in order from its cursor, then the
//! streams of the terminals it follows, each in order from its own cursor (fan-out on read),
//! new items from the fast paths, and the acknowledgements that come back on it.

use super::*;

/// Items read from the log at a time when catching up.
pub(super) const PAGE: usize = 256;

/// A page read from a log, cut to what fits [`FAST_PATH_BYTES`] (at least one item): the
/// connection holds it while a slow terminal takes it, so it is bounded like the fast paths.
/// Cut in the store's thread, so what is left out is freed at once.
fn within_budget(mut read: store::LogRead) -> store::LogRead {
    let mut bytes = 0;
    let fits = read
        .items
        .iter()
        .take_while(|push| {
            bytes += conn::held(push);
            bytes <= FAST_PATH_BYTES
        })
        .count();
    read.items.truncate(fits.max(1));
    read
}

/// The push stream of one connection: `id`'s log in order from its start, then every new item;
/// the terminal's acknowledgements come back on it.
pub(super) struct PushStream {
    conn: quinn::Connection,
    pub(super) send: quinn::SendStream,
    pub(super) acks: AckReader,
    /// The next offset to send.
    pub(super) next: u64,
    /// The highest acknowledgement handed to the store.
    acked: u64,
}

impl PushStream {
    pub(super) fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        start: u64,
    ) -> Self {
        Self {
            conn,
            send,
            acks: AckReader::new(recv),
            next: start,
            acked: 0,
        }
    }

    /// Hands the terminal's acknowledgement to the store (held there, applied with a later
    /// commit). Only one that moves forward, and never past what was sent: a terminal that
    /// sends acknowledgements by the thousand, or for offsets it never got, costs the store at
    /// most one message per push it received. When the store's queue is full it is skipped;
    /// the next one carries it.
    pub(super) fn hand_ack_to_store(&mut self, server: &Server, id: TerminalId, next: u64) {
        let next = next.min(self.next);
        if next > self.acked && server.shared.store.ack(id, next) {
            self.acked = next;
        }
    }

    /// Sends what the fast path holds, then reads the log while behind (after a reconnect, or
    /// when the fast path overflowed). `Err` when the connection is done for.
    pub(super) async fn send_pending(
        &mut self,
        server: &Server,
        id: TerminalId,
        outbox: &Outbox,
    ) -> Result<(), ()> {
        loop {
            for (push, accepted) in outbox.take_fast() {
                // Older ones were sent from the log; after a gap the log read below has it.
                if push.item.offset == self.next {
                    self.send(server, &push).await?;
                    server
                        .shared
                        .metrics
                        .observe("handoff_push_delivery_seconds", accepted.elapsed());
                }
                outbox.release(conn::held(&push));
            }
            let latest = outbox.latest.load(Ordering::Acquire);
            if self.next >= latest {
                return Ok(());
            }
            let (next, now) = (self.next, unix_now());
            let read = match server
                .shared
                .store
                .read(move |b| Ok(within_budget(b.log(&id, next, PAGE, now)?)))
                .await
            {
                Ok(read) => read,
                Err(e) => {
                    limited!(server, "store", warn!("store: {e}"));
                    self.conn
                        .close(varint(ErrorCode::Busy), b"store unavailable");
                    return Err(());
                }
            };
            if read.items.is_empty() {
                // Everything up to the log's end was collapsed, expired or acknowledged.
                self.next = self.next.max(read.next.min(latest));
                return Ok(());
            }
            // Held while a slow terminal takes it: counted with the fast paths.
            outbox.hold(read.items.iter().map(conn::held).sum());
            for push in read.items {
                self.send(server, &push).await?;
                outbox.release(conn::held(&push));
            }
        }
    }

    /// Sends what the followed streams hold past this connection's cursors in them: their fast
    /// paths, then reads of the stream while behind. A stream is read only while the link is
    /// alive (checked in the same read): a revoked or lapsed link's stream is dropped.
    pub(super) async fn send_streams(
        &mut self,
        server: &Server,
        id: TerminalId,
        outbox: &Outbox,
    ) -> Result<(), ()> {
        loop {
            // What each stream has waiting, taken under the lock and sent outside it.
            let work: Vec<(TerminalId, u64, u64, FastItems)> = outbox
                .streams()
                .iter_mut()
                .filter(|(_, s)| s.behind())
                .map(|(owner, s)| (*owner, s.next, s.latest, std::mem::take(&mut s.fast)))
                .collect();
            if work.is_empty() {
                return Ok(());
            }
            for (owner, mut next, latest, fast) in work {
                for (item, accepted) in fast {
                    // Older ones were sent from a read; after a gap the read below has it.
                    if item.offset == next {
                        self.send_frame(server, item.frame.clone()).await?;
                        next = item.offset + 1;
                        server
                            .shared
                            .metrics
                            .observe("handoff_push_delivery_seconds", accepted.elapsed());
                    }
                    outbox.release(item.held());
                }
                let mut end = None;
                if next < latest {
                    let now = unix_now();
                    let read = server
                        .shared
                        .store
                        .read(move |b| {
                            let Some(since) = b.link_since(&owner, &id, now)? else {
                                return Ok(None);
                            };
                            let key = store::stream_key(&owner);
                            let read = b.log(&key, next.max(since), PAGE, now)?;
                            Ok(Some(within_budget(read)))
                        })
                        .await;
                    let read = match read {
                        Ok(read) => read,
                        Err(e) => {
                            limited!(server, "store", warn!("store: {e}"));
                            self.conn
                                .close(varint(ErrorCode::Busy), b"store unavailable");
                            return Err(());
                        }
                    };
                    let Some(read) = read else {
                        outbox.drop_stream(&owner);
                        continue;
                    };
                    if read.items.is_empty() {
                        // Up to the stream's end everything was collapsed or expired.
                        next = next.max(read.next);
                        end = Some(read.next);
                    }
                    outbox.hold(read.items.iter().map(conn::held).sum());
                    for push in read.items {
                        let held = conn::held(&push);
                        let offset = push.item.offset;
                        let frame = wire::encode_frame(&ServerPush::Stream {
                            owner,
                            item: push.item,
                        })
                        .map_err(|e| debug!("cannot encode a stream item: {e}"))?;
                        self.send_frame(server, frame.into()).await?;
                        outbox.release(held);
                        next = next.max(offset + 1);
                    }
                }
                if let Some(s) = outbox.streams().get_mut(&owner) {
                    s.next = s.next.max(next);
                    if let Some(end) = end {
                        if s.latest == UNREAD {
                            s.latest = end;
                        }
                    }
                }
            }
        }
    }

    /// Sends one frame. A terminal that leaves its push stream unread for `[limits]
    /// push_stall_secs` is let go: its connection is closed (it reconnects and resumes where
    /// it left off), so it holds neither the connection's task nor its fast paths.
    async fn send_frame(&mut self, server: &Server, frame: bytes::Bytes) -> Result<(), ()> {
        let stall = server.shared.limits.push_stall;
        match tokio::time::timeout(stall, self.send.write_chunk(frame)).await {
            Ok(Ok(())) => {
                server.shared.metrics.inc("handoff_pushes_sent_total", None);
                Ok(())
            }
            Ok(Err(e)) => {
                debug!("push stream failed: {e}");
                Err(())
            }
            Err(_) => {
                server.over_limit(
                    "push_stall_secs",
                    format_args!(
                        "push stream of {} not read for {} s; connection closed",
                        self.conn.remote_address(),
                        stall.as_secs()
                    ),
                );
                let reason = format!("push stream not read for {} s", stall.as_secs());
                self.conn
                    .close(varint(ErrorCode::Timeout), reason.as_bytes());
                Err(())
            }
        }
    }

    pub(super) async fn send(&mut self, server: &Server, push: &StoredPush) -> Result<(), ()> {
        let frame = wire::encode_frame(&ServerPushRef::Item(&push.item))
            .map_err(|e| debug!("cannot encode a push: {e}"))?;
        self.send_frame(server, frame.into()).await?;
        self.next = push.item.offset + 1;
        Ok(())
    }
}

/// The largest acknowledgement frame read.
pub(super) const MAX_ACK: usize = 64;

/// Reads acknowledgement frames off the push stream into a buffer of its own, so that a read
/// cancelled by the connection's `select!` loses no bytes of a frame.
pub(super) struct AckReader {
    pub(super) recv: quinn::RecvStream,
    pub(super) buf: [u8; wire::HEADER_LEN + MAX_ACK],
    pub(super) len: usize,
    /// The stream ended or carried a bad frame: nothing more is read.
    pub(super) ended: bool,
}

impl AckReader {
    pub(super) fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: [0; wire::HEADER_LEN + MAX_ACK],
            len: 0,
            ended: false,
        }
    }

    /// Reads what has arrived; returns the highest acknowledged offset among the frames it
    /// completed, if any. Cancel-safe: the only await is quinn's `read`, which is.
    pub(super) async fn read(&mut self) -> Option<u64> {
        let n = match self.recv.read(&mut self.buf[self.len..]).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                self.ended = true;
                return None;
            }
            Err(e) => {
                debug!("ack stream ended: {e}");
                self.ended = true;
                return None;
            }
        };
        self.len += n;
        let mut acked = None;
        loop {
            match self.frame() {
                Ok(Some((PushAck::Ack { next }, used))) => {
                    acked = acked.max(Some(next));
                    self.buf.copy_within(used..self.len, 0);
                    self.len -= used;
                }
                Ok(None) => return acked,
                Err(e) => {
                    debug!("ack stream ended: {e}");
                    let _ = self.recv.stop(varint(e.code()));
                    self.ended = true;
                    return acked;
                }
            }
        }
    }

    /// The first complete frame in the buffer and the bytes it took.
    pub(super) fn frame(&self) -> Result<Option<(PushAck, usize)>, wire::WireError> {
        let Some(header) = self.buf[..self.len].first_chunk::<{ wire::HEADER_LEN }>() else {
            return Ok(None);
        };
        let len = wire::decode_header(*header)?;
        if len > MAX_ACK {
            return Err(wire::WireError::TooLarge(len));
        }
        let end = wire::HEADER_LEN + len;
        if self.len < end {
            return Ok(None);
        }
        let ack = wire::decode_payload(&self.buf[wire::HEADER_LEN..end])?;
        Ok(Some((ack, end)))
    }
}
