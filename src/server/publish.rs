//! Publishing: pushes from content backends (one terminal, a batch, a terminal's followers),
//! session changes pushed to followers, and handing what was stored to the connections.

use super::*;

/// Why a publish was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("terminal {0} has never connected to this server")]
    UnknownTerminal(TerminalId),
    #[error("ttl_secs must be between 1 and {0}")]
    BadTtl(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a publisher sends (the HTTP body of DESIGN §8).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publication {
    pub uri: String,
    pub title: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub meta: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub collapse_key: Option<String>,
}

impl Server {
    /// Hands freshly stored pushes to the connections of their recipients.
    pub(super) fn announce(&self, pushes: Vec<(TerminalId, StoredPush)>, accepted: Instant) {
        let conns = self.conns();
        let mut elsewhere = Vec::new();
        for (to, push) in pushes {
            self.shared.metrics.inc("handoff_pushes_stored_total", None);
            let Some(slot) = conns.get(&to) else {
                if self.shared.cluster.is_some() {
                    elsewhere.push(cluster::Wake {
                        to,
                        stream: None,
                        next: push.item.offset + 1,
                    });
                }
                continue;
            };
            let outbox = &slot.outbox;
            outbox
                .latest
                .fetch_max(push.item.offset + 1, Ordering::AcqRel);
            // A full fast path is fine: woken, the task sees it is behind and reads the log.
            // Otherwise it takes the item from the queue and never needs the store.
            {
                let mut fast = outbox.fast.lock().unwrap_or_else(|e| e.into_inner());
                if fast.len() < FAST_PATH && outbox.reserve(conn::held(&push)) {
                    fast.push_back((push, accepted));
                }
            }
            outbox.wake.notify_one();
        }
        drop(conns);
        self.wake_elsewhere(elsewhere);
    }

    /// Hands an item freshly appended to `owner`'s stream to the connections of `followers`
    /// (those with a link alive when it was published): one frame, encoded once, for all.
    pub(super) fn announce_stream(
        &self,
        owner: TerminalId,
        push: StoredPush,
        followers: &[(TerminalId, u64)],
        accepted: Instant,
    ) {
        self.shared.metrics.inc("handoff_pushes_stored_total", None);
        let offset = push.item.offset;
        let frame = match wire::encode_frame(&ServerPush::Stream {
            owner,
            item: push.item,
        }) {
            Ok(frame) => bytes::Bytes::from(frame),
            // Checked to fit before it was stored; a connection reading the stream reports it.
            Err(e) => return debug!("cannot encode a stream item: {e}"),
        };
        let item = Arc::new(SharedItem { offset, frame });
        let mut elsewhere = Vec::new();
        let conns = self.conns();
        for (follower, _) in followers {
            let Some(slot) = conns.get(follower) else {
                if self.shared.cluster.is_some() {
                    elsewhere.push(cluster::Wake {
                        to: *follower,
                        stream: Some(owner),
                        next: offset + 1,
                    });
                }
                continue;
            };
            // A connection that does not send this stream yet reads it when its hello or
            // follow adds it.
            if let Some(stream) = slot.outbox.streams().get_mut(&owner) {
                if stream.latest != UNREAD {
                    stream.latest = stream.latest.max(offset + 1);
                }
                if stream.fast.len() < FAST_PATH && slot.outbox.reserve(item.held()) {
                    stream.fast.push_back((item.clone(), accepted));
                }
            } else {
                continue;
            }
            slot.outbox.wake.notify_one();
        }
        drop(conns);
        self.wake_elsewhere(elsewhere);
    }

    /// Recipients held by other nodes: tell those nodes (a hint; see `cluster`).
    fn wake_elsewhere(&self, elsewhere: Vec<cluster::Wake>) {
        let Some(cluster) = self
            .shared
            .cluster
            .clone()
            .filter(|_| !elsewhere.is_empty())
        else {
            return;
        };
        let server = self.clone();
        self.shared.tasks.spawn(async move {
            let woken = tokio::task::spawn_blocking(move || cluster.wake(&elsewhere)).await;
            if let Ok(Err(e)) = woken {
                limited!(server, "cluster", warn!("cannot wake other nodes: {e}"));
            }
        });
    }

    /// Appends `push` once, to `owner`'s stream (with `extra` ops in the same commit), and
    /// hands it to `followers`. Returns its offset in the stream.
    pub(super) async fn store_stream_push(
        &self,
        owner: TerminalId,
        push: NewPush,
        followers: &[(TerminalId, u64)],
        mut extra: Vec<Op>,
    ) -> Result<u64, StoreError> {
        let now = unix_now();
        let accepted = Instant::now();
        extra.push(Op::Append {
            to: store::stream_key(&owner),
            push: push.clone(),
            now,
        });
        let outcomes = self.shared.store.write(extra).await?;
        self.shared
            .metrics
            .observe("handoff_push_store_seconds", accepted.elapsed());
        let Some(Outcome::Offset(offset)) = outcomes.last().copied() else {
            return Err(StoreError::Backend(format!(
                "an append answered {:?}",
                outcomes.last()
            )));
        };
        self.announce_stream(owner, push.into_stored(offset, now), followers, accepted);
        Ok(offset)
    }

    /// Appends pushes (each to its recipient's log, in one commit) and announces them.
    pub(super) async fn store_pushes(
        &self,
        items: Vec<(TerminalId, NewPush)>,
        mut extra: Vec<Op>,
    ) -> Result<Vec<u64>, StoreError> {
        let now = unix_now();
        let accepted = Instant::now();
        let n_extra = extra.len();
        extra.extend(items.iter().map(|(to, push)| Op::Append {
            to: *to,
            push: push.clone(),
            now,
        }));
        let outcomes = self.shared.store.write(extra).await?;
        self.shared
            .metrics
            .observe("handoff_push_store_seconds", accepted.elapsed());
        let offsets: Vec<u64> = outcomes[n_extra..]
            .iter()
            .map(|o| match o {
                Outcome::Offset(off) => *off,
                _ => 0,
            })
            .collect();
        self.announce(
            items
                .into_iter()
                .zip(&offsets)
                .map(|((to, p), off)| (to, p.into_stored(*off, now)))
                .collect(),
            accepted,
        );
        Ok(offsets)
    }

    /// Publishes to one terminal (HTTP API). Resolves once the push is durably stored.
    pub async fn publish(&self, to: TerminalId, p: Publication) -> Result<u64, PublishError> {
        let push = self.new_push(p)?;
        // A terminal connected here was marked seen when it connected, and the sweep keeps it
        // so while it stays: only others cost a store read.
        let connected = self.conns().contains_key(&to);
        if !connected && !self.known(to).await? {
            return Err(PublishError::UnknownTerminal(to));
        }
        Ok(self.store_pushes(vec![(to, push)], Vec::new()).await?[0])
    }

    /// Publishes many pushes, each to one terminal, in one commit (HTTP batch API). Each gets
    /// its own answer: a push refused (unknown terminal, bad ttl, too large) fails alone and the
    /// others are stored. Resolves once the accepted ones are durably stored.
    pub async fn publish_many(
        &self,
        batch: Vec<(TerminalId, Publication)>,
    ) -> Result<Vec<Result<u64, PublishError>>, StoreError> {
        let mut answers: Vec<Result<u64, PublishError>> = Vec::with_capacity(batch.len());
        // Per position in the batch: the push to store, if it passed the checks so far.
        let mut pending: Vec<Option<(TerminalId, NewPush)>> = Vec::with_capacity(batch.len());
        let mut to_check = Vec::new();
        {
            let conns = self.conns();
            for (i, (to, p)) in batch.into_iter().enumerate() {
                match self.new_push(p) {
                    Ok(push) => {
                        if !conns.contains_key(&to) {
                            to_check.push((i, to));
                        }
                        pending.push(Some((to, push)));
                        // Replaced by its outcome below: every pending push gets one.
                        answers.push(Ok(0));
                    }
                    Err(e) => {
                        pending.push(None);
                        answers.push(Err(e));
                    }
                }
            }
        }
        if !to_check.is_empty() {
            let unknown = self
                .shared
                .store
                .read(move |b| {
                    let mut unknown = Vec::new();
                    for (i, to) in to_check {
                        if !b.known(&to)? {
                            unknown.push((i, to));
                        }
                    }
                    Ok(unknown)
                })
                .await?;
            for (i, to) in unknown {
                pending[i] = None;
                answers[i] = Err(PublishError::UnknownTerminal(to));
            }
        }
        let (slots, items): (Vec<usize>, Vec<(TerminalId, NewPush)>) = pending
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| item.map(|item| (i, item)))
            .unzip();
        let now = unix_now();
        let accepted = Instant::now();
        let ops = items
            .iter()
            .map(|(to, push)| Op::Append {
                to: *to,
                push: push.clone(),
                now,
            })
            .collect();
        let outcomes = self.shared.store.write_each(ops).await;
        self.shared
            .metrics
            .observe("handoff_push_store_seconds", accepted.elapsed());
        let mut stored = Vec::with_capacity(items.len());
        for ((i, (to, push)), outcome) in slots.into_iter().zip(items).zip(outcomes) {
            answers[i] = match outcome {
                Ok(Outcome::Offset(offset)) => {
                    stored.push((to, push.into_stored(offset, now)));
                    Ok(offset)
                }
                Ok(other) => {
                    Err(StoreError::Backend(format!("unexpected outcome {other:?}")).into())
                }
                Err(e) => Err(e.into()),
            };
        }
        self.announce(stored, accepted);
        Ok(answers)
    }

    /// Publishes to every terminal following `first`: stored once, in `first`'s stream, which
    /// each follower's connection reads (fan-out on read). Returns the followers, each with the
    /// item's offset (in that stream). With no follower nothing is stored.
    pub async fn publish_to_followers(
        &self,
        first: TerminalId,
        p: Publication,
    ) -> Result<Vec<(TerminalId, u64)>, PublishError> {
        let push = self.new_push(p)?;
        let now = unix_now();
        let (known, followers) = self
            .shared
            .store
            .read(move |b| Ok((b.known(&first)?, b.followers(&first, now)?)))
            .await?;
        if !known {
            return Err(PublishError::UnknownTerminal(first));
        }
        if followers.is_empty() {
            return Ok(Vec::new());
        }
        let offset = self
            .store_stream_push(first, push, &followers, Vec::new())
            .await?;
        Ok(followers.into_iter().map(|(f, _)| (f, offset)).collect())
    }

    /// Sets what `id` shows and pushes it to its followers (a terminal's `SetSession`, or a
    /// content backend through HTTP). Returns the number of followers pushed to.
    pub async fn set_session(
        &self,
        id: TerminalId,
        session: Option<Session>,
    ) -> Result<usize, StoreError> {
        let now = unix_now();
        let followers = self
            .shared
            .store
            .read(move |b| b.followers(&id, now))
            .await?;
        let set = Op::SetSession {
            id,
            session: session.clone(),
        };
        let Some(session) = session else {
            self.shared.store.write(vec![set]).await?;
            return Ok(0);
        };
        let ttl = self.shared.push.default_ttl;
        // What followers get must fit a frame; refused before anything is stored.
        if let Err(e) = NewPush::session(id, &session, ttl).check_size("session") {
            self.over_limit("session_size", format_args!("from {}: {e}", id.short()));
            return Err(e);
        }
        // Stored once, in this terminal's stream, whether it has followers now or not: one
        // that follows later starts at its link, and the session collapses there (latest wins).
        self.store_stream_push(
            id,
            NewPush::session(id, &session, ttl),
            &followers,
            vec![set],
        )
        .await?;
        Ok(followers.len())
    }

    /// Whether the server has ever seen `id`.
    pub async fn known(&self, id: TerminalId) -> Result<bool, StoreError> {
        self.shared.store.read(move |b| b.known(&id)).await
    }

    pub(super) fn new_push(&self, p: Publication) -> Result<NewPush, PublishError> {
        let max = self.shared.push.max_ttl.as_secs();
        let ttl = match p.ttl_secs {
            None => self.shared.push.default_ttl,
            Some(t) if (1..=max).contains(&t) => Duration::from_secs(t),
            Some(_) => return Err(PublishError::BadTtl(max)),
        };
        let push = NewPush {
            from: None,
            uri: p.uri,
            title: p.title,
            body: p.body,
            position: None,
            meta: p.meta,
            ttl,
            collapse_key: p.collapse_key,
        };
        // Accepted means deliverable: a push no frame can carry is refused up front.
        if let Err(e) = push.check_size("push") {
            self.over_limit("push_size", format_args!("{e}"));
            return Err(e.into());
        }
        Ok(push)
    }
}
