//! Tickets (DESIGN §5, §7): made and signed by the first terminal, checked by the server.
//!
//! A ticket is bound to one second terminal, one server, a short lifetime (never longer than the
//! server's maximum lease) and a single-use nonce; its issue time lets the first terminal revoke
//! every ticket it gave a peer before a moment. The signature covers a domain-separated encoding,
//! so it cannot be confused with any other signature the same key makes.

use std::collections::HashMap;

use super::{Signature, SignedTicket, Ticket};
use crate::identity::{Identity, ServerId, TerminalId};

/// Prefix of the signed bytes: protocol, purpose, separator.
const DOMAIN: &[u8] = b"handoff/2 ticket\0";

/// How far the first terminal's clock may run ahead of the server's, in seconds.
pub const MAX_CLOCK_SKEW: u64 = 300;

impl Ticket {
    /// The exact bytes the first terminal signs: the domain, then the fields in order.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + 32 * 3 + 8 * 2 + 16);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(self.first.as_bytes());
        out.extend_from_slice(self.second.as_bytes());
        out.extend_from_slice(self.server.as_bytes());
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    /// Signs the ticket with `signer`, which must be the ticket's `first`.
    pub fn sign(self, signer: &Identity) -> SignedTicket {
        let signature = Signature(signer.sign(&self.signing_bytes()));
        SignedTicket {
            ticket: self,
            signature,
        }
    }
}

/// Why a ticket is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is not signed by the first terminal")]
    BadSignature,
    #[error("the request's first terminal is not the ticket's")]
    WrongFirst,
    #[error("the ticket was made for another second terminal")]
    WrongSecond,
    #[error("the ticket was made for another server")]
    WrongServer,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket is valid for longer than the server's maximum lease")]
    LeaseTooLong,
    #[error("the ticket was issued in the future (check the first terminal's clock)")]
    IssuedInFuture,
    #[error("the ticket was already used")]
    Replayed,
    #[error("the first terminal has too many live tickets; try again later")]
    ReplayCacheFull,
    #[error("the first terminal revoked this second terminal's tickets")]
    Revoked,
    #[error("the first terminal is not attached to this server")]
    UnknownFirst,
}

/// What the server expects of a ticket presented on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Expectation {
    /// The first terminal named in the request.
    pub first: TerminalId,
    /// The TLS identity of the connection the request came on.
    pub second: TerminalId,
    /// The server's own ID.
    pub server: ServerId,
    /// Now, in Unix seconds.
    pub now: u64,
    /// The longest a ticket may be valid from its issue time, in seconds: the server's maximum
    /// lease. With [`MAX_CLOCK_SKEW`] it bounds how long a nonce must be remembered.
    pub max_lifetime: u64,
}

impl SignedTicket {
    /// Checks everything about a ticket except replay (see [`ReplayCache`]).
    pub fn check(&self, expect: &Expectation) -> Result<(), TicketError> {
        let t = &self.ticket;
        if t.first != expect.first {
            return Err(TicketError::WrongFirst);
        }
        if !t.first.verify(&t.signing_bytes(), &self.signature.0) {
            return Err(TicketError::BadSignature);
        }
        if t.second != expect.second {
            return Err(TicketError::WrongSecond);
        }
        if t.server != expect.server {
            return Err(TicketError::WrongServer);
        }
        if t.not_after <= expect.now {
            return Err(TicketError::Expired);
        }
        if t.issued_at > expect.now.saturating_add(MAX_CLOCK_SKEW) {
            return Err(TicketError::IssuedInFuture);
        }
        if t.not_after.saturating_sub(t.issued_at) > expect.max_lifetime {
            return Err(TicketError::LeaseTooLong);
        }
        Ok(())
    }
}

/// Remembers used nonces until their tickets expire, per first terminal: each first terminal has
/// `capacity` slots, so tickets minted between strangers' own keys never use another terminal's.
#[derive(Debug)]
pub struct ReplayCache {
    used: HashMap<TerminalId, HashMap<[u8; 16], u64>>,
    capacity: usize,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            used: HashMap::new(),
            capacity,
        }
    }

    /// Records the ticket's nonce, or refuses it if it was seen before.
    ///
    /// Expired entries are dropped when the first terminal's slots are full; a ticket can never
    /// be replayed after its entry is dropped, because by then it has expired too.
    pub fn check_and_insert(&mut self, ticket: &Ticket, now: u64) -> Result<(), TicketError> {
        self.use_nonce(ticket.first, ticket.nonce, ticket.not_after, now)
    }

    /// The same for a nonce given by its parts (how stores keep them).
    pub fn use_nonce(
        &mut self,
        first: TerminalId,
        nonce: [u8; 16],
        not_after: u64,
        now: u64,
    ) -> Result<(), TicketError> {
        let used = self.used.entry(first).or_default();
        if used.contains_key(&nonce) {
            return Err(TicketError::Replayed);
        }
        if used.len() >= self.capacity {
            used.retain(|_, n| *n > now);
            if used.len() >= self.capacity {
                return Err(TicketError::ReplayCacheFull);
            }
        }
        used.insert(nonce, not_after);
        Ok(())
    }

    /// Forgets nonces of tickets expired at `now`.
    pub fn expire(&mut self, now: u64) {
        self.used.retain(|_, used| {
            used.retain(|_, not_after| *not_after > now);
            !used.is_empty()
        });
    }

    /// Changes the capacity per first terminal (it applies from the next insertion on).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Nonces remembered, over all first terminals.
    pub fn len(&self) -> usize {
        self.used.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        a: Identity,
        b: Identity,
        server: Identity,
    }

    fn fixture() -> Fixture {
        Fixture {
            a: Identity::generate().unwrap(),
            b: Identity::generate().unwrap(),
            server: Identity::generate().unwrap(),
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn ticket(f: &Fixture) -> Ticket {
        Ticket {
            first: f.a.id(),
            second: f.b.id(),
            server: f.server.id(),
            issued_at: NOW,
            not_after: NOW + 600,
            nonce: [7; 16],
        }
    }

    fn expect(f: &Fixture) -> Expectation {
        Expectation {
            first: f.a.id(),
            second: f.b.id(),
            server: f.server.id(),
            now: NOW,
            max_lifetime: 3600,
        }
    }

    #[test]
    fn good_ticket_passes() {
        let f = fixture();
        assert_eq!(ticket(&f).sign(&f.a).check(&expect(&f)), Ok(()));
    }

    #[test]
    fn wrong_signer_is_refused() {
        let f = fixture();
        // B signs a ticket that claims to come from A.
        let forged = ticket(&f).sign(&f.b);
        assert_eq!(forged.check(&expect(&f)), Err(TicketError::BadSignature));
    }

    #[test]
    fn tampered_ticket_is_refused() {
        let f = fixture();
        let mut signed = ticket(&f).sign(&f.a);
        signed.ticket.not_after += 1;
        assert_eq!(signed.check(&expect(&f)), Err(TicketError::BadSignature));
    }

    #[test]
    fn wrong_second_terminal_is_refused() {
        let f = fixture();
        let c = Identity::generate().unwrap();
        let signed = ticket(&f).sign(&f.a);
        let e = Expectation {
            second: c.id(),
            ..expect(&f)
        };
        assert_eq!(signed.check(&e), Err(TicketError::WrongSecond));
    }

    #[test]
    fn wrong_first_terminal_is_refused() {
        let f = fixture();
        let signed = ticket(&f).sign(&f.a);
        let e = Expectation {
            first: f.b.id(),
            ..expect(&f)
        };
        assert_eq!(signed.check(&e), Err(TicketError::WrongFirst));
    }

    #[test]
    fn wrong_server_is_refused() {
        let f = fixture();
        let other = Identity::generate().unwrap();
        let signed = ticket(&f).sign(&f.a);
        let e = Expectation {
            server: other.id(),
            ..expect(&f)
        };
        assert_eq!(signed.check(&e), Err(TicketError::WrongServer));
    }

    #[test]
    fn expired_ticket_is_refused() {
        let f = fixture();
        let signed = ticket(&f).sign(&f.a);
        let e = Expectation {
            now: NOW + 600,
            ..expect(&f)
        };
        assert_eq!(signed.check(&e), Err(TicketError::Expired));
    }

    #[test]
    fn overlong_lease_is_refused() {
        let f = fixture();
        let signed = ticket(&f).sign(&f.a);
        let e = Expectation {
            max_lifetime: 599,
            ..expect(&f)
        };
        assert_eq!(signed.check(&e), Err(TicketError::LeaseTooLong));
    }

    #[test]
    fn a_ticket_longer_than_the_lease_is_refused_whatever_the_server_clock() {
        let f = fixture();
        // Issued long ago with a long lifetime: even where little of it is left, refused.
        let old = Ticket {
            issued_at: NOW - 7 * 24 * 3600,
            not_after: NOW + 60,
            ..ticket(&f)
        };
        assert_eq!(
            old.sign(&f.a).check(&expect(&f)),
            Err(TicketError::LeaseTooLong)
        );
        let future = Ticket {
            issued_at: NOW + MAX_CLOCK_SKEW + 1,
            not_after: NOW + MAX_CLOCK_SKEW + 60,
            ..ticket(&f)
        };
        assert_eq!(
            future.sign(&f.a).check(&expect(&f)),
            Err(TicketError::IssuedInFuture)
        );
    }

    #[test]
    fn replayed_nonce_is_refused() {
        let f = fixture();
        let t = ticket(&f);
        let mut cache = ReplayCache::new(16);
        assert_eq!(cache.check_and_insert(&t, NOW), Ok(()));
        assert_eq!(cache.check_and_insert(&t, NOW), Err(TicketError::Replayed));
        let fresh = Ticket {
            nonce: [8; 16],
            ..t.clone()
        };
        assert_eq!(cache.check_and_insert(&fresh, NOW), Ok(()));
    }

    #[test]
    fn replay_cache_is_bounded_and_forgets_only_expired_tickets() {
        let f = fixture();
        let mut cache = ReplayCache::new(2);
        let mk = |n: u8, not_after: u64| Ticket {
            nonce: [n; 16],
            not_after,
            ..ticket(&f)
        };
        cache.check_and_insert(&mk(1, NOW + 10), NOW).unwrap();
        cache.check_and_insert(&mk(2, NOW + 1000), NOW).unwrap();
        assert_eq!(
            cache.check_and_insert(&mk(3, NOW + 1000), NOW),
            Err(TicketError::ReplayCacheFull)
        );
        // Once ticket 1 has expired its slot is reused; ticket 2 is still remembered.
        cache
            .check_and_insert(&mk(3, NOW + 1000), NOW + 20)
            .unwrap();
        assert_eq!(
            cache.check_and_insert(&mk(2, NOW + 1000), NOW + 20),
            Err(TicketError::Replayed)
        );
        assert_eq!(cache.len(), 2);
        // Another first terminal has slots of its own.
        let other = Identity::generate().unwrap();
        let theirs = Ticket {
            first: other.id(),
            ..mk(9, NOW + 1000)
        };
        assert_eq!(cache.check_and_insert(&theirs, NOW + 20), Ok(()));
        assert_eq!(cache.len(), 3);
    }
}
