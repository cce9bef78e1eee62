//! The server's background tasks: cross-node wakes and registrations (Redis), the epoch watch,
//! and the minute sweep.

use super::*;

/// How often expired items, links and nonces are swept from the store (more often when
/// `[limits] idle_terminal_secs` is short: see [`sweep_every`]).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The sweep's period: [`SWEEP_EVERY`], or a fifth of `idle_terminal` if that is shorter, so a
/// connected terminal is marked seen several times per idle period whatever it is. (Validated
/// configurations have `idle_terminal` of at least 300 s, so this is a minute; tests shorten it.)
fn sweep_every(idle_terminal: Duration) -> Duration {
    SWEEP_EVERY.min(idle_terminal / 5)
}

/// Raises the `latest` of terminals another node appended for, and wakes their writers.
pub(super) async fn apply_wakes(server: Server, mut rx: mpsc::Receiver<Vec<cluster::Wake>>) {
    loop {
        let wakes = tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            wakes = rx.recv() => match wakes {
                Some(w) => w,
                None => return,
            },
        };
        let conns = server.conns();
        for wake in wakes {
            let Some(slot) = conns.get(&wake.to) else {
                continue;
            };
            match wake.stream {
                None => {
                    slot.outbox.latest.fetch_max(wake.next, Ordering::AcqRel);
                }
                // Only a stream the connection sends: one it does not know yet is read when
                // its follow or hello adds it.
                Some(owner) => match slot.outbox.streams().get_mut(&owner) {
                    Some(stream) if stream.latest != UNREAD => {
                        stream.latest = stream.latest.max(wake.next)
                    }
                    _ => continue,
                },
            }
            slot.outbox.wake.notify_one();
        }
    }
}

/// Keeps this node's terminals registered, and has the store check its epoch, every
/// [`cluster::REFRESH_EVERY`].
pub(super) async fn refresh_registrations(server: Server) {
    let Some(cluster) = server.shared.cluster.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(cluster::REFRESH_EVERY) => {}
        }
        let ids: Vec<TerminalId> = server.conns().keys().copied().collect();
        let c = cluster.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.register(&ids)).await {
            warn!("cannot refresh cluster registrations: {e}");
        }
        // An empty batch has the store check its epoch, so a Redis that lost its data is
        // noticed even when nothing else is written.
        if let Err(e) = server.shared.store.write(Vec::new()).await {
            warn!("store epoch check: {e}");
        }
    }
}

/// When the push logs' epoch changes (Redis lost its data), every connected terminal's position
/// is meaningless: close the connections, so each reconnects, says hello with its old cursor,
/// is told its window was lost, and resyncs.
pub(super) async fn watch_epoch(server: Server) {
    let mut known = server.epoch();
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = server.epoch();
        if now == known {
            continue;
        }
        warn!(
            old = known,
            new = now,
            "the push logs were lost (new epoch); terminals resync"
        );
        known = now;
        let conns: Vec<quinn::Connection> = server
            .conns()
            .values()
            .map(|slot| slot.conn.clone())
            .collect();
        for conn in conns {
            conn.close(
                varint(ErrorCode::Busy),
                b"push log lost; reconnect to resync",
            );
        }
    }
}

/// Sweeps expired items, links and nonces from the store once a minute, and forgets terminals
/// idle for `[limits] idle_terminal_secs`: the terminals connected to this node are marked seen
/// first, so only those neither connected (to any node) nor linked go.
pub(super) async fn sweep(server: Server) {
    let every = sweep_every(server.shared.limits.idle_terminal);
    loop {
        tokio::select! {
            _ = server.shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = unix_now();
        let connected: Vec<(std::net::IpAddr, TerminalId)> = server
            .conns()
            .iter()
            .map(|(id, slot)| (slot.conn.remote_address().ip(), *id))
            .collect();
        server
            .shared
            .strangers
            .refresh(connected.iter().copied(), Instant::now());
        let mut ops: Vec<Op> = connected
            .into_iter()
            .map(|(_, id)| Op::Touch { id, now })
            .collect();
        ops.push(Op::Sweep { now });
        let idle = server.shared.limits.idle_terminal.as_secs();
        ops.push(Op::ExpireIdle {
            now,
            seen_before: now.saturating_sub(idle),
        });
        match server.shared.store.write(ops).await {
            Ok(outcomes) => {
                if let Some(Outcome::Expired(n)) = outcomes.last() {
                    server
                        .shared
                        .metrics
                        .add("handoff_terminals_expired_total", None, *n);
                }
            }
            Err(e) => warn!("store sweep: {e}"),
        }
    }
}
