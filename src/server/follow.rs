//! Follows and revocations: the ticket checks of a `Follow` (patent S120/S210), a first
//! terminal's `Revoke`, and the per-network budget for what session changes make the store
//! write.

use super::*;

impl Server {
    /// Charges `cost` bytes to `source`'s session budget; counts and logs a refusal.
    pub(super) fn charge_session_bytes(
        &self,
        source: IpAddr,
        cost: u64,
        what: std::fmt::Arguments<'_>,
    ) -> bool {
        if self.shared.session_bytes.allow_n(&source, cost) {
            return true;
        }
        self.over_limit(
            "session_bytes_per_sec_per_source",
            format_args!("{what} from {source}: {cost} bytes"),
        );
        false
    }

    /// Charges a session change to its source network's budget: its size twice, for the
    /// session and for the one push all its followers read (fan-out on read: the store cost
    /// does not grow with followers). `Some(refusal)` when over the budget (then nothing is
    /// stored).
    pub(super) fn session_budget(
        &self,
        id: TerminalId,
        source: IpAddr,
        session: Option<&Session>,
    ) -> Option<ResponseBody> {
        let session = session?;
        let size = NewPush::session(id, session, Duration::ZERO).size_bound();
        let cost = (size as u64).saturating_mul(2);
        let what = format_args!("session of {}", id.short());
        if self.charge_session_bytes(source, cost, what) {
            return None;
        }
        Some(ResponseBody::Refused(Refusal {
            reason: RefusalReason::Busy,
            message: format!(
                "session changes from this network are over the server's budget ([limits] \
                 session_bytes_per_sec_per_source = {}; this one stores {size} bytes twice: \
                 the session and the push its followers read); try again in a second",
                self.shared.limits.session_bytes_per_sec_per_source
            ),
        }))
    }

    /// `first` revokes `second` (DESIGN §7): ends the link and refuses every ticket `first`
    /// issued for `second` up to `at` (by `first`'s clock). The record is kept until all such
    /// tickets have expired, so a time past the clock-skew allowance (which would keep it for
    /// ever) is refused, an outdated one only ends the link, and one terminal keeps at most
    /// `[limits] revocations_per_terminal` of them: each names a second of its own choosing.
    pub(super) async fn revoke(
        &self,
        first: TerminalId,
        second: TerminalId,
        at: u64,
    ) -> Result<ResponseBody, StoreError> {
        let now = unix_now();
        let skew = wire::ticket::MAX_CLOCK_SKEW;
        let lease = self.shared.limits.max_lease.as_secs();
        if at > now.saturating_add(skew) {
            return Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::BadTicket,
                message: format!(
                    "the revocation is dated {} s in the future, more than the {skew} s the \
                     server allows; check this terminal's clock",
                    at - now
                ),
            }));
        }
        let op = if at.saturating_add(lease + skew) <= now {
            // Every ticket issued up to `at` has expired: nothing to remember.
            Op::Unlink { first, second }
        } else {
            Op::Revoke {
                first,
                second,
                at,
                // Until every ticket issued up to `at` has expired, whichever clock is ahead.
                keep_until: now.max(at).saturating_add(lease + skew),
                capacity: self.shared.limits.revocations_per_terminal,
                now,
            }
        };
        let outcome = self.shared.store.write_one(op).await?;
        // The revoked terminal's connection here stops reading this stream at once; on another
        // node, at its next read of the stream (each checks the link), and fresh items are
        // only handed to the followers a publish found linked.
        if let Some(slot) = self.conns().get(&second) {
            slot.outbox.drop_stream(&first);
        }
        if outcome == Outcome::Full {
            let limit = self.shared.limits.revocations_per_terminal;
            self.over_limit(
                "revocations_per_terminal",
                format_args!("{} revoking {}", first.short(), second.short()),
            );
            return Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::Busy,
                message: format!(
                    "this terminal has {limit} revocations stored on the server ([limits] \
                     revocations_per_terminal); the link was ended, but tickets issued before \
                     were not revoked; try again in {} s",
                    lease + skew
                ),
            }));
        }
        let removed = outcome == Outcome::Removed(true);
        limited!(
            self,
            "revoked",
            info!(second = %second.short(), removed, "revoked by its first terminal")
        );
        Ok(ResponseBody::Revoked { removed })
    }

    /// Patent S210: check the request and ticket, record the link, push the current session.
    pub(super) async fn follow(
        &self,
        second: TerminalId,
        source: IpAddr,
        request: InfoRequest,
    ) -> Result<ResponseBody, StoreError> {
        let refuse = |message: String| {
            self.shared
                .metrics
                .inc("handoff_refusals_total", Some(("reason", "bad_ticket")));
            limited!(
                self,
                "refused_follow",
                warn!(second = %second, first = %request.first, "refused follow: {message}")
            );
            Ok(ResponseBody::Refused(Refusal {
                reason: RefusalReason::BadTicket,
                message,
            }))
        };
        if request.second != second {
            return refuse(
                "the ticket was made for another second terminal than the connection's identity"
                    .into(),
            );
        }
        let now = unix_now();
        let expect = Expectation {
            first: request.first,
            second,
            server: self.id(),
            now,
            max_lifetime: self.shared.limits.max_lease.as_secs(),
        };
        if let Err(e) = request.ticket.check(&expect) {
            return refuse(e.to_string());
        }
        let ticket = &request.ticket.ticket;
        // The link lasts as long as the ticket, capped by the server's maximum lease.
        let until = ticket
            .not_after
            .min(now + self.shared.limits.max_lease.as_secs());
        let first = request.first;
        // The link begins at the stream's end (a live link keeps where it began), so the
        // follower never reads what was streamed before it followed.
        let (known, session, since, new_link) = self
            .shared
            .store
            .read(move |b| {
                let (since, new_link) = match b.link_since(&first, &second, now)? {
                    Some(since) => (since, false),
                    None => (b.log(&store::stream_key(&first), 0, 0, now)?.next, true),
                };
                Ok((b.known(&first)?, b.session(&first)?, since, new_link))
            })
            .await?;
        if !known {
            // Tickets between keys that never attached here would only fill the store.
            return refuse(wire::ticket::TicketError::UnknownFirst.to_string());
        }
        let ttl = self.shared.push.default_ttl;
        let push = session.as_ref().map(|s| NewPush::session(first, s, ttl));
        // A follow copies the first terminal's session into the second's log: budgeted like a
        // session change, before anything (the nonce too) is used.
        if let Some(push) = &push {
            let what = format_args!("follow of {}", first.short());
            if !self.charge_session_bytes(source, push.size_bound() as u64, what) {
                return Ok(ResponseBody::Refused(Refusal {
                    reason: RefusalReason::Busy,
                    message: format!(
                        "follows and session changes from this network are over the server's \
                         budget ([limits] session_bytes_per_sec_per_source = {}); try again in \
                         a second",
                        self.shared.limits.session_bytes_per_sec_per_source
                    ),
                }));
            }
        }
        // Nonce, link and the session push in one atomic step and one commit.
        let follow = Op::Follow {
            first,
            second,
            issued_at: ticket.issued_at,
            nonce: ticket.nonce,
            not_after: ticket.not_after,
            until,
            since,
            now,
            capacity: self.shared.limits.replay_cache,
            push: push.clone(),
        };
        let accepted = Instant::now();
        match self.shared.store.write_one(follow).await? {
            Outcome::Followed(offset) => {
                self.shared
                    .metrics
                    .observe("handoff_push_store_seconds", accepted.elapsed());
                if let (Some(offset), Some(push)) = (offset, push) {
                    self.announce(vec![(second, push.stored(offset, now))], accepted);
                }
                // A new link's connection knows where the stream ended (nothing to read until
                // the next change); a renewed one keeps its place.
                if let Some(slot) = self.conns().get(&second) {
                    slot.outbox
                        .follow_stream(first, since, new_link.then_some(since));
                }
            }
            Outcome::Fresh(None) => {
                return refuse(wire::ticket::TicketError::ReplayCacheFull.to_string())
            }
            Outcome::Revoked => return refuse(wire::ticket::TicketError::Revoked.to_string()),
            _ => return refuse(wire::ticket::TicketError::Replayed.to_string()),
        }
        limited!(
            self,
            "linked",
            info!(first = %first.short(), until, "linked")
        );
        self.shared.metrics.inc("handoff_links_total", None);
        Ok(ResponseBody::Linked {
            until,
            has_session: session.is_some(),
        })
    }
}
