//! The conformance suite every backend passes (run by `conformance_tests!` for each backend).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::identity::TerminalId;
use crate::testing::redis::RedisServer;

/// Cases about bounds under abuse (oversized ops, idle strangers), for every backend.
mod bounds;

const NOW: u64 = 1_800_000_000;

fn id(b: u8) -> TerminalId {
    TerminalId::from_bytes([b; 32])
}

fn push(title: &str, key: Option<&str>, ttl: u64) -> NewPush {
    NewPush {
        from: Some(id(9)),
        uri: format!("u://{title}"),
        title: title.into(),
        body: Some("b".into()),
        position: Some(1.5),
        meta: BTreeMap::from([("k".into(), "v".into())]),
        ttl: Duration::from_secs(ttl),
        collapse_key: key.map(str::to_string),
    }
}

fn append(b: &mut dyn Backend, to: TerminalId, p: NewPush) -> u64 {
    match b
        .apply(&[Op::Append {
            to,
            push: p,
            now: NOW,
        }])
        .unwrap()[0]
    {
        Outcome::Offset(o) => o,
        other => panic!("{other:?}"),
    }
}

fn titles(b: &dyn Backend, to: TerminalId, from: u64, now: u64) -> Vec<String> {
    b.log(&to, from, 100, now)
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.item.title)
        .collect()
}

pub fn offsets_are_monotonic_per_recipient(b: &mut dyn Backend) {
    assert_ne!(b.epoch(), 0);
    assert_eq!(append(b, id(1), push("a", None, 60)), 0);
    assert_eq!(append(b, id(1), push("b", None, 60)), 1);
    assert_eq!(append(b, id(2), push("x", None, 60)), 0);
    assert_eq!(append(b, id(1), push("c", None, 60)), 2);
    let read = b.log(&id(1), 0, 100, NOW).unwrap();
    assert_eq!(read.next, 3);
    assert_eq!(read.acked, 0);
    let offsets: Vec<u64> = read.items.iter().map(|p| p.item.offset).collect();
    assert_eq!(offsets, [0, 1, 2]);
    let first = &read.items[0].item;
    assert_eq!(first.from, Some(id(9)));
    assert_eq!(first.body.as_deref(), Some("b"));
    assert_eq!(first.position, Some(1.5));
    assert_eq!(first.meta.get("k").map(String::as_str), Some("v"));
    assert_eq!(titles(b, id(1), 1, NOW), ["b", "c"]);
    assert_eq!(b.log(&id(1), 0, 2, NOW).unwrap().items.len(), 2);
    // A recipient without a log reads empty, not an error.
    let empty = b.log(&id(7), 0, 10, NOW).unwrap();
    assert!(empty.items.is_empty() && empty.next == 0);
}

pub fn acks_trim_and_never_go_back(b: &mut dyn Backend) {
    for t in ["a", "b", "c", "d"] {
        append(b, id(1), push(t, None, 60));
    }
    b.apply(&[Op::Ack { to: id(1), next: 2 }]).unwrap();
    let read = b.log(&id(1), 0, 100, NOW).unwrap();
    assert_eq!(read.acked, 2);
    assert_eq!(
        read.items
            .iter()
            .map(|p| p.item.title.as_str())
            .collect::<Vec<_>>(),
        ["c", "d"]
    );
    // An older ack does not move the cursor back; an ack past the end is clamped.
    b.apply(&[Op::Ack { to: id(1), next: 1 }]).unwrap();
    assert_eq!(b.log(&id(1), 0, 100, NOW).unwrap().acked, 2);
    b.apply(&[Op::Ack {
        to: id(1),
        next: 99,
    }])
    .unwrap();
    let read = b.log(&id(1), 0, 100, NOW).unwrap();
    assert_eq!((read.acked, read.next), (4, 4));
    assert!(read.items.is_empty());
    // Offsets continue after trimming.
    assert_eq!(append(b, id(1), push("e", None, 60)), 4);
}

pub fn collapse_keys_keep_only_the_latest_unacked(b: &mut dyn Backend) {
    append(b, id(1), push("v1", Some("k"), 60));
    append(b, id(1), push("other", Some("j"), 60));
    append(b, id(1), push("v2", Some("k"), 60));
    append(b, id(1), push("plain", None, 60));
    assert_eq!(titles(b, id(1), 0, NOW), ["other", "v2", "plain"]);
    // Once acknowledged, an item is not touched by later collapses.
    b.apply(&[Op::Ack { to: id(1), next: 4 }]).unwrap();
    append(b, id(1), push("v3", Some("k"), 60));
    assert_eq!(titles(b, id(1), 0, NOW), ["v3"]);
    // Other recipients are unaffected.
    append(b, id(2), push("w1", Some("k"), 60));
    assert_eq!(titles(b, id(2), 0, NOW), ["w1"]);
    assert_eq!(titles(b, id(1), 0, NOW), ["v3"]);
}

pub fn expired_items_are_not_delivered(b: &mut dyn Backend) {
    append(b, id(1), push("short", None, 10));
    append(b, id(1), push("long", None, 1000));
    assert_eq!(titles(b, id(1), 0, NOW + 5), ["short", "long"]);
    assert_eq!(titles(b, id(1), 0, NOW + 10), ["long"]);
    b.apply(&[Op::Sweep { now: NOW + 10 }]).unwrap();
    assert_eq!(
        titles(b, id(1), 0, NOW),
        ["long"],
        "the sweep removed the expired item for good"
    );
}

pub fn links_expire_and_can_be_revoked(b: &mut dyn Backend) {
    b.apply(&[
        Op::Link {
            first: id(1),
            second: id(2),
            until: NOW + 100,
            since: 0,
            unless_revoked: None,
        },
        Op::Link {
            first: id(1),
            second: id(3),
            until: NOW + 10,
            since: 0,
            unless_revoked: None,
        },
        Op::Link {
            first: id(4),
            second: id(2),
            until: NOW + 100,
            since: 0,
            unless_revoked: None,
        },
    ])
    .unwrap();
    let mut f = b.followers(&id(1), NOW).unwrap();
    f.sort();
    assert_eq!(f, [(id(2), NOW + 100), (id(3), NOW + 10)]);
    assert_eq!(b.followers(&id(1), NOW + 10).unwrap(), [(id(2), NOW + 100)]);
    let mut g = b.following(&id(2), NOW).unwrap();
    g.sort();
    assert_eq!(g, [(id(1), NOW + 100), (id(4), NOW + 100)]);
    // Renewing replaces the lease.
    b.apply(&[Op::Link {
        first: id(1),
        second: id(3),
        until: NOW + 500,
        since: 0,
        unless_revoked: None,
    }])
    .unwrap();
    assert!(b
        .followers(&id(1), NOW + 200)
        .unwrap()
        .contains(&(id(3), NOW + 500)));
    assert_eq!(
        b.apply(&[Op::Unlink {
            first: id(1),
            second: id(2)
        }])
        .unwrap(),
        [Outcome::Removed(true)]
    );
    assert_eq!(
        b.apply(&[Op::Unlink {
            first: id(1),
            second: id(2)
        }])
        .unwrap(),
        [Outcome::Removed(false)]
    );
    assert_eq!(b.following(&id(2), NOW).unwrap(), [(id(4), NOW + 100)]);
}

pub fn nonces_are_single_use_and_bounded(b: &mut dyn Backend) {
    let use_nonce = |b: &mut dyn Backend, n: u8, not_after: u64, now: u64| match b
        .apply(&[Op::UseNonce {
            first: id(1),
            second: id(2),
            issued_at: NOW,
            nonce: [n; 16],
            not_after,
            now,
            capacity: 2,
        }])
        .unwrap()[0]
    {
        Outcome::Fresh(f) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(use_nonce(b, 1, NOW + 10, NOW), Some(true));
    assert_eq!(use_nonce(b, 1, NOW + 10, NOW), Some(false));
    assert_eq!(use_nonce(b, 2, NOW + 100, NOW), Some(true));
    assert_eq!(use_nonce(b, 3, NOW + 100, NOW), None, "full of live nonces");
    // Once nonce 1 expired, its slot is reused; nonce 2 is still remembered.
    assert_eq!(use_nonce(b, 3, NOW + 100, NOW + 20), Some(true));
    assert_eq!(use_nonce(b, 2, NOW + 100, NOW + 20), Some(false));
}

/// Nonces are counted per first terminal: one terminal's full quota (a stranger minting
/// tickets between its own keys) never refuses another's.
pub fn nonce_quotas_are_per_first_terminal(b: &mut dyn Backend) {
    let use_nonce = |b: &mut dyn Backend, first: u8, n: u8| match b
        .apply(&[Op::UseNonce {
            first: id(first),
            second: id(9),
            issued_at: NOW,
            nonce: [n; 16],
            not_after: NOW + 100,
            now: NOW,
            capacity: 3,
        }])
        .unwrap()[0]
    {
        Outcome::Fresh(f) => f,
        other => panic!("{other:?}"),
    };
    for n in 0..3 {
        assert_eq!(use_nonce(b, 5, n), Some(true));
    }
    assert_eq!(use_nonce(b, 5, 3), None, "terminal 5's quota is full");
    for n in 0..3 {
        assert_eq!(use_nonce(b, 6, n), Some(true), "terminal 6 has its own");
    }
    // A sweep keeps the count right: nothing expired yet, still full.
    b.apply(&[Op::Sweep { now: NOW + 1 }]).unwrap();
    assert_eq!(use_nonce(b, 5, 4), None);
}

/// A revocation ends the link and refuses every ticket issued up to its time, and only those;
/// nothing changes for a refused ticket.
pub fn revocations_refuse_older_tickets(b: &mut dyn Backend) {
    let follow = |b: &mut dyn Backend, issued_at: u64, n: u8, now: u64| {
        b.apply(&[Op::Follow {
            first: id(1),
            second: id(2),
            issued_at,
            nonce: [n; 16],
            not_after: issued_at + 60,
            until: issued_at + 60,
            since: 0,
            now,
            capacity: 10,
            push: None,
        }])
        .unwrap()[0]
    };
    assert_eq!(follow(b, NOW, 1, NOW), Outcome::Followed(None));
    let revoke = Op::Revoke {
        first: id(1),
        second: id(2),
        at: NOW + 5,
        keep_until: NOW + 100,
        capacity: 10,
        now: NOW + 5,
    };
    assert_eq!(b.apply(&[revoke]).unwrap(), [Outcome::Removed(true)]);
    assert!(b.followers(&id(1), NOW + 5).unwrap().is_empty());
    // A hoarded ticket issued before (or in the same second as) the revocation: refused, and
    // its nonce is not used up.
    assert_eq!(follow(b, NOW + 2, 2, NOW + 6), Outcome::Revoked);
    assert_eq!(follow(b, NOW + 5, 3, NOW + 6), Outcome::Revoked);
    assert!(b.followers(&id(1), NOW + 6).unwrap().is_empty());
    // Another second terminal, or another first terminal, is not affected.
    let other = Op::Follow {
        first: id(1),
        second: id(3),
        issued_at: NOW,
        nonce: [4; 16],
        not_after: NOW + 60,
        until: NOW + 60,
        since: 0,
        now: NOW + 6,
        capacity: 10,
        push: None,
    };
    assert_eq!(b.apply(&[other]).unwrap(), [Outcome::Followed(None)]);
    // A ticket issued after the revocation (the peer was trusted again) works.
    assert_eq!(follow(b, NOW + 6, 2, NOW + 6), Outcome::Followed(None));
    // An older revocation sent again does not move the time back.
    let older = Op::Revoke {
        first: id(1),
        second: id(2),
        at: NOW,
        keep_until: NOW + 100,
        capacity: 10,
        now: NOW + 6,
    };
    b.apply(&[older]).unwrap();
    assert_eq!(follow(b, NOW + 4, 5, NOW + 6), Outcome::Revoked);
    // A sweep before the revocation stops mattering keeps it.
    b.apply(&[Op::Sweep { now: NOW + 50 }]).unwrap();
    assert_eq!(follow(b, NOW + 4, 6, NOW + 50), Outcome::Revoked);
}

/// A backend may make a follow in steps (Redis: the nonce, checked against revocations, then the
/// link). A revocation that lands between the two must still win: the link step checks it again,
/// in the same step as the link, and makes none (the revocation had already ended any link).
pub fn a_revocation_between_a_follows_steps_wins(b: &mut dyn Backend) {
    let follow = Op::Follow {
        first: id(1),
        second: id(2),
        issued_at: NOW,
        nonce: [1; 16],
        not_after: NOW + 60,
        until: NOW + 60,
        since: 0,
        now: NOW,
        capacity: 10,
        push: None,
    };
    let (use_nonce, link, _) = super::follow_parts(&follow).unwrap();
    assert_eq!(b.apply(&[use_nonce]).unwrap(), [Outcome::Fresh(Some(true))]);
    let revoke = Op::Revoke {
        first: id(1),
        second: id(2),
        at: NOW,
        keep_until: NOW + 100,
        capacity: 10,
        now: NOW,
    };
    assert_eq!(b.apply(&[revoke]).unwrap(), [Outcome::Removed(false)]);
    assert_eq!(b.apply(&[link]).unwrap(), [Outcome::Revoked]);
    assert!(b.followers(&id(1), NOW + 1).unwrap().is_empty());
    assert!(b.following(&id(2), NOW + 1).unwrap().is_empty());
    assert_eq!(b.link_since(&id(1), &id(2), NOW + 1).unwrap(), None);
}

/// Each revocation names a second of the first terminal's choosing, so one first terminal keeps
/// at most `capacity` live ones: past that a new second is refused (its link still ends), while
/// re-sending one kept, another first terminal's, and one after the old expired still work.
pub fn revocations_are_bounded_per_first_terminal(b: &mut dyn Backend) {
    let revoke = |b: &mut dyn Backend, first: u8, second: u8, now: u64| {
        b.apply(&[Op::Revoke {
            first: id(first),
            second: id(second),
            at: now,
            keep_until: now + 100,
            capacity: 2,
            now,
        }])
        .unwrap()[0]
    };
    assert_eq!(revoke(b, 1, 2, NOW), Outcome::Removed(false));
    assert_eq!(revoke(b, 1, 3, NOW + 1), Outcome::Removed(false));
    let link = Op::Link {
        first: id(1),
        second: id(4),
        until: NOW + 60,
        since: 0,
        unless_revoked: None,
    };
    b.apply(&[link]).unwrap();
    assert_eq!(revoke(b, 1, 4, NOW + 2), Outcome::Full);
    assert!(
        b.followers(&id(1), NOW + 2).unwrap().is_empty(),
        "link ended"
    );
    // Not recorded: a ticket issued before is not refused.
    let follow = Op::UseNonce {
        first: id(1),
        second: id(4),
        issued_at: NOW,
        nonce: [9; 16],
        not_after: NOW + 60,
        now: NOW + 3,
        capacity: 10,
    };
    assert_eq!(b.apply(&[follow]).unwrap(), [Outcome::Fresh(Some(true))]);
    assert_eq!(revoke(b, 1, 2, NOW + 3), Outcome::Removed(false));
    assert_eq!(revoke(b, 5, 2, NOW + 3), Outcome::Removed(false));
    // Once the first two no longer matter, there is room again.
    assert_eq!(revoke(b, 1, 4, NOW + 102), Outcome::Removed(false));
    assert_eq!(revoke(b, 1, 6, NOW + 102), Outcome::Full);
}

pub fn follows_are_one_step_and_refused_replays_change_nothing(b: &mut dyn Backend) {
    let follow = |b: &mut dyn Backend, second: u8, n: u8, with_push: bool| {
        b.apply(&[Op::Follow {
            first: id(1),
            second: id(second),
            issued_at: NOW,
            nonce: [n; 16],
            not_after: NOW + 60,
            until: NOW + 50,
            since: 0,
            now: NOW,
            capacity: 2,
            push: with_push.then(|| push("session", Some("session:1"), 60)),
        }])
        .unwrap()[0]
    };
    // Fresh: linked, and the session push is in the second's log.
    assert_eq!(follow(b, 2, 1, true), Outcome::Followed(Some(0)));
    assert_eq!(b.followers(&id(1), NOW).unwrap(), [(id(2), NOW + 50)]);
    assert_eq!(titles(b, id(2), 0, NOW), ["session"]);
    // The same nonce again (say, after a revocation): refused, and nothing changes.
    b.apply(&[Op::Unlink {
        first: id(1),
        second: id(2),
    }])
    .unwrap();
    assert_eq!(follow(b, 2, 1, true), Outcome::Fresh(Some(false)));
    assert!(b.followers(&id(1), NOW).unwrap().is_empty());
    assert_eq!(titles(b, id(2), 0, NOW), ["session"]);
    // Without a session: linked, nothing pushed.
    assert_eq!(follow(b, 3, 2, false), Outcome::Followed(None));
    assert!(titles(b, id(3), 0, NOW).is_empty());
    // The replay cache is full (capacity 2): refused, no link.
    assert_eq!(follow(b, 4, 3, true), Outcome::Fresh(None));
    assert!(!b
        .followers(&id(1), NOW)
        .unwrap()
        .iter()
        .any(|(s, _)| *s == id(4)));
    assert!(titles(b, id(4), 0, NOW).is_empty());
}

pub fn sessions_and_known_terminals(b: &mut dyn Backend) {
    assert!(!b.known(&id(1)).unwrap());
    assert_eq!(b.seen(&id(1)).unwrap(), None);
    b.apply(&[Op::Touch {
        id: id(1),
        now: NOW,
    }])
    .unwrap();
    assert!(b.known(&id(1)).unwrap());
    assert_eq!(b.seen(&id(1)).unwrap(), Some(NOW));
    // Seen only moves forward.
    b.apply(&[
        Op::Touch {
            id: id(1),
            now: NOW + 5,
        },
        Op::Touch {
            id: id(1),
            now: NOW + 1,
        },
    ])
    .unwrap();
    assert_eq!(b.seen(&id(1)).unwrap(), Some(NOW + 5));
    let session = Session {
        uri: "u".into(),
        title: "t".into(),
        position: None,
        meta: BTreeMap::new(),
    };
    b.apply(&[Op::SetSession {
        id: id(1),
        session: Some(session.clone()),
    }])
    .unwrap();
    assert_eq!(b.session(&id(1)).unwrap(), Some(session));
    b.apply(&[Op::SetSession {
        id: id(1),
        session: None,
    }])
    .unwrap();
    assert_eq!(b.session(&id(1)).unwrap(), None);
}

/// Many concurrent writers through the actor: every append gets its own offset, in one epoch.
pub async fn concurrent_appends_through_the_actor(store: Store) {
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for j in 0..16 {
                let op = Op::Append {
                    to: id(1),
                    push: push(&format!("{i}-{j}"), None, 60),
                    now: NOW,
                };
                match store.write_one(op).await.unwrap() {
                    Outcome::Offset(o) => got.push(o),
                    other => panic!("{other:?}"),
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one writer's offsets are increasing"
        );
        all.extend(got);
    }
    all.sort();
    assert_eq!(all, (0..1024).collect::<Vec<u64>>());
    let read = store.read(|b| b.log(&id(1), 0, 2000, NOW)).await.unwrap();
    assert_eq!(read.items.len(), 1024);
}

/// Acknowledgements through the actor wait for no commit of their own, yet a read after them
/// sees them, the highest wins, and a write sharing their commit gets its own outcome.
pub async fn acks_through_the_actor_are_held_then_applied(store: Store) {
    for t in ["a", "b", "c", "d"] {
        let op = Op::Append {
            to: id(1),
            push: push(t, None, 60),
            now: NOW,
        };
        store.write_one(op).await.unwrap();
    }
    store.ack(id(1), 2);
    store.ack(id(2), 7);
    // Joins the commit of this append, which still gets its own offset.
    let op = Op::Append {
        to: id(1),
        push: push("e", None, 60),
        now: NOW,
    };
    assert!(matches!(
        store.write_one(op).await.unwrap(),
        Outcome::Offset(4)
    ));
    let read = store.read(|b| b.log(&id(1), 0, 100, NOW)).await.unwrap();
    assert_eq!(read.acked, 2);
    assert_eq!(
        read.items
            .iter()
            .map(|p| p.item.title.as_str())
            .collect::<Vec<_>>(),
        ["c", "d", "e"]
    );
    // Held ones are applied before a read, the highest of them kept.
    store.ack(id(1), 4);
    store.ack(id(1), 3);
    let read = store.read(|b| b.log(&id(1), 0, 100, NOW)).await.unwrap();
    assert_eq!(read.acked, 4);
    assert_eq!(read.items.len(), 1);
}

/// Instantiates the suite for one backend. `$make` gives `Some((guard, backend))`, the guard
/// living as long as the test, or `None` to skip (a backend whose server is not installed).
/// A link records where in the first terminal's stream it began, for as long as it lives:
/// not after it expired, was unlinked or revoked, and a new link records its own.
pub fn links_remember_where_they_began_in_the_stream(b: &mut dyn Backend) {
    let link = |second: u8, until: u64, since: u64| Op::Link {
        first: id(1),
        second: id(second),
        until,
        since,
        unless_revoked: None,
    };
    b.apply(&[
        link(2, NOW + 100, 5),
        link(3, NOW + 10, 7),
        link(4, NOW + 100, 0),
    ])
    .unwrap();
    assert_eq!(b.link_since(&id(1), &id(2), NOW).unwrap(), Some(5));
    assert_eq!(b.link_since(&id(1), &id(3), NOW).unwrap(), Some(7));
    assert_eq!(b.link_since(&id(1), &id(4), NOW).unwrap(), Some(0));
    assert_eq!(
        b.link_since(&id(2), &id(1), NOW).unwrap(),
        None,
        "not the other way"
    );
    assert_eq!(b.link_since(&id(1), &id(5), NOW).unwrap(), None);
    assert_eq!(
        b.link_since(&id(1), &id(3), NOW + 10).unwrap(),
        None,
        "expired"
    );
    b.apply(&[
        Op::Unlink {
            first: id(1),
            second: id(2),
        },
        Op::Revoke {
            first: id(1),
            second: id(4),
            at: NOW,
            keep_until: NOW + 100,
            capacity: 10,
            now: NOW,
        },
    ])
    .unwrap();
    assert_eq!(b.link_since(&id(1), &id(2), NOW).unwrap(), None, "unlinked");
    assert_eq!(b.link_since(&id(1), &id(4), NOW).unwrap(), None, "revoked");
    // Linked again later: where the new link began.
    b.apply(&[link(2, NOW + 100, 12)]).unwrap();
    assert_eq!(b.link_since(&id(1), &id(2), NOW).unwrap(), Some(12));
    b.apply(&[Op::Sweep { now: NOW + 50 }]).unwrap();
    assert_eq!(b.link_since(&id(1), &id(2), NOW + 50).unwrap(), Some(12));
    assert_eq!(b.link_since(&id(1), &id(3), NOW + 50).unwrap(), None);
}

/// A terminal's stream is kept under its stream key like any log: offsets of its own,
/// sessions collapsing to the latest (nobody acknowledges a stream), other pushes each kept.
pub fn a_stream_is_one_log_for_every_follower(b: &mut dyn Backend) {
    let first = id(1);
    let stream = stream_key(&first);
    assert_ne!(stream, first);
    assert_eq!(stream, stream_key(&first), "the same key every time");
    assert_ne!(stream, stream_key(&id(2)));
    let session = |title: &str| push(title, Some(&format!("session:{first}")), 60);
    assert_eq!(append(b, first, push("own", None, 60)), 0);
    assert_eq!(append(b, stream, session("s1")), 0);
    assert_eq!(append(b, stream, push("news", None, 60)), 1);
    assert_eq!(append(b, stream, session("s2")), 2);
    assert_eq!(append(b, stream, session("s3")), 3);
    assert_eq!(titles(b, stream, 0, NOW), ["news", "s3"]);
    assert_eq!(titles(b, stream, 2, NOW), ["s3"]);
    assert_eq!(
        titles(b, first, 0, NOW),
        ["own"],
        "the terminal's own log apart"
    );
    assert_eq!(b.log(&stream, 0, 0, NOW).unwrap().next, 4);
    assert!(
        !b.known(&stream).unwrap(),
        "no terminal is known by a stream key"
    );
    b.apply(&[Op::Sweep { now: NOW + 60 }]).unwrap();
    assert!(
        titles(b, stream, 0, NOW + 60).is_empty(),
        "expired items go"
    );
    assert_eq!(append(b, stream, session("s4")), 4, "offsets never restart");
}

macro_rules! conformance_tests {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn offsets_are_monotonic_per_recipient() {
                let Some((_guard, mut b)) = $make else { return };
                super::offsets_are_monotonic_per_recipient(b.as_mut());
            }
            #[test]
            fn follows_are_one_step_and_refused_replays_change_nothing() {
                let Some((_guard, mut b)) = $make else { return };
                super::follows_are_one_step_and_refused_replays_change_nothing(b.as_mut());
            }
            #[test]
            fn acks_trim_and_never_go_back() {
                let Some((_guard, mut b)) = $make else { return };
                super::acks_trim_and_never_go_back(b.as_mut());
            }
            #[test]
            fn collapse_keys_keep_only_the_latest_unacked() {
                let Some((_guard, mut b)) = $make else { return };
                super::collapse_keys_keep_only_the_latest_unacked(b.as_mut());
            }
            #[test]
            fn expired_items_are_not_delivered() {
                let Some((_guard, mut b)) = $make else { return };
                super::expired_items_are_not_delivered(b.as_mut());
            }
            #[test]
            fn links_expire_and_can_be_revoked() {
                let Some((_guard, mut b)) = $make else { return };
                super::links_expire_and_can_be_revoked(b.as_mut());
            }
            #[test]
            fn nonces_are_single_use_and_bounded() {
                let Some((_guard, mut b)) = $make else { return };
                super::nonces_are_single_use_and_bounded(b.as_mut());
            }
            #[test]
            fn nonce_quotas_are_per_first_terminal() {
                let Some((_guard, mut b)) = $make else { return };
                super::nonce_quotas_are_per_first_terminal(b.as_mut());
            }
            #[test]
            fn revocations_refuse_older_tickets() {
                let Some((_guard, mut b)) = $make else { return };
                super::revocations_refuse_older_tickets(b.as_mut());
            }
            #[test]
            fn a_revocation_between_a_follows_steps_wins() {
                let Some((_guard, mut b)) = $make else { return };
                super::a_revocation_between_a_follows_steps_wins(b.as_mut());
            }
            #[test]
            fn revocations_are_bounded_per_first_terminal() {
                let Some((_guard, mut b)) = $make else { return };
                super::revocations_are_bounded_per_first_terminal(b.as_mut());
            }
            #[test]
            fn sessions_and_known_terminals() {
                let Some((_guard, mut b)) = $make else { return };
                super::sessions_and_known_terminals(b.as_mut());
            }
            #[test]
            fn links_remember_where_they_began_in_the_stream() {
                let Some((_guard, mut b)) = $make else { return };
                super::links_remember_where_they_began_in_the_stream(b.as_mut());
            }
            #[test]
            fn a_stream_is_one_log_for_every_follower() {
                let Some((_guard, mut b)) = $make else { return };
                super::a_stream_is_one_log_for_every_follower(b.as_mut());
            }
            #[tokio::test]
            async fn concurrent_appends_through_the_actor() {
                let Some((_guard, b)) = $make else { return };
                super::concurrent_appends_through_the_actor(Store::start(b)).await;
            }
            #[tokio::test]
            async fn acks_through_the_actor_are_held_then_applied() {
                let Some((_guard, b)) = $make else { return };
                super::acks_through_the_actor_are_held_then_applied(Store::start(b)).await;
            }
        }
    };
}

fn memory() -> Option<((), Box<dyn Backend>)> {
    Some(((), Box::new(MemoryBackend::new())))
}

fn embedded() -> Option<(tempfile::TempDir, Box<dyn Backend>)> {
    let dir = tempfile::tempdir().unwrap();
    let b = EmbeddedBackend::open(&dir.path().join("store.redb")).unwrap();
    Some((dir, Box::new(b)))
}

/// A backend on a `redis-server` of its own (Unix socket only), or `None` to skip.
fn redis() -> Option<(RedisServer, Box<dyn Backend>)> {
    let server = RedisServer::start_or_skip("redis conformance test")?;
    let b = RedisBackend::open(&server.url()).unwrap();
    Some((server, Box::new(b)))
}

conformance_tests!(memory_backend, memory());
conformance_tests!(embedded_backend, embedded());
conformance_tests!(redis_backend, redis());

#[test]
fn embedded_store_survives_reopening_with_its_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let epoch = {
        let mut b = EmbeddedBackend::open(&path).unwrap();
        append(&mut b, id(1), push("kept", None, 3600));
        b.apply(&[
            Op::Touch {
                id: id(1),
                now: NOW,
            },
            Op::Link {
                first: id(2),
                second: id(1),
                until: NOW + 60,
                since: 0,
                unless_revoked: None,
            },
        ])
        .unwrap();
        b.epoch()
    };
    {
        let mut b = EmbeddedBackend::open(&path).unwrap();
        b.apply(&[Op::Revoke {
            first: id(7),
            second: id(8),
            at: NOW,
            keep_until: NOW + 100,
            capacity: 10,
            now: NOW,
        }])
        .unwrap();
    }
    let mut b = EmbeddedBackend::open(&path).unwrap();
    let hoarded = Op::Follow {
        first: id(7),
        second: id(8),
        issued_at: NOW - 1,
        nonce: [1; 16],
        not_after: NOW + 60,
        until: NOW + 60,
        since: 0,
        now: NOW,
        capacity: 10,
        push: None,
    };
    assert_eq!(
        b.apply(&[hoarded]).unwrap(),
        [Outcome::Revoked],
        "a revocation survives a restart"
    );
    assert_eq!(b.epoch(), epoch);
    assert_eq!(titles(&b, id(1), 0, NOW), ["kept"]);
    assert!(b.known(&id(1)).unwrap());
    assert_eq!(b.followers(&id(2), NOW).unwrap(), [(id(1), NOW + 60)]);
    // A new file is a new epoch.
    let other = EmbeddedBackend::open(&dir.path().join("other.redb")).unwrap();
    assert_ne!(other.epoch(), epoch);
}

#[test]
fn memory_backends_have_distinct_epochs() {
    assert_ne!(MemoryBackend::new().epoch(), MemoryBackend::new().epoch());
}

fn offset(outcome: Outcome) -> u64 {
    match outcome {
        Outcome::Offset(o) => o,
        other => panic!("{other:?}"),
    }
}

/// Redis lost everything (FLUSHALL from another client): the next append notices, starts a new
/// epoch and a fresh log, and never hands out offset 0 again under the old epoch.
#[test]
fn redis_data_loss_starts_a_new_epoch() {
    let Some((server, mut b)) = redis() else {
        return;
    };
    assert_eq!(append(b.as_mut(), id(1), push("a", None, 60)), 0);
    assert_eq!(append(b.as_mut(), id(1), push("b", None, 60)), 1);
    let before = b.epoch();
    server.command(&["FLUSHALL"]).unwrap();
    assert_eq!(append(b.as_mut(), id(1), push("c", None, 60)), 0);
    assert_ne!(
        b.epoch(),
        before,
        "the offset restarted, so the epoch must change"
    );
    assert_ne!(b.epoch(), 0);
    let read = b.log(&id(1), 0, 100, NOW).unwrap();
    assert_eq!(titles(b.as_ref(), id(1), 0, NOW), ["c"]);
    assert_eq!((read.acked, read.next), (0, 1));
    // A write of another kind also notices a loss.
    let before = b.epoch();
    server.command(&["FLUSHALL"]).unwrap();
    b.apply(&[Op::Touch {
        id: id(2),
        now: NOW,
    }])
    .unwrap();
    assert_ne!(b.epoch(), before);
}

/// The store actor publishes the backend's new epoch before it answers the write.
#[tokio::test]
async fn redis_store_epoch_follows_the_backend() {
    let Some((server, b)) = redis() else {
        return;
    };
    let store = Store::start(b);
    let write = |title: &str| Op::Append {
        to: id(1),
        push: push(title, None, 60),
        now: NOW,
    };
    assert_eq!(offset(store.write_one(write("a")).await.unwrap()), 0);
    let before = store.epoch();
    server.command(&["FLUSHALL"]).unwrap();
    assert_eq!(offset(store.write_one(write("b")).await.unwrap()), 0);
    assert_ne!(store.epoch(), before);
    let read = store.read(|b| b.log(&id(1), 0, 10, NOW)).await.unwrap();
    assert_eq!(read.items.len(), 1);
    assert_eq!(read.items[0].item.title, "b");
}

/// A lost connection fails one call with a clear error; the next call connects again.
#[test]
fn redis_reconnects_after_a_restart() {
    let Some((mut server, mut b)) = redis() else {
        return;
    };
    append(b.as_mut(), id(1), push("a", None, 60));
    let before = b.epoch();
    server.restart().unwrap();
    let err = b.known(&id(1)).unwrap_err().to_string();
    assert!(err.contains("redis redis+unix://"), "{err}");
    assert!(err.contains("reconnects"), "{err}");
    // The restarted Redis kept nothing (no persistence): a new epoch, a fresh log.
    assert!(!b.known(&id(1)).unwrap());
    assert_eq!(append(b.as_mut(), id(1), push("b", None, 60)), 0);
    assert_ne!(b.epoch(), before);
    server.restart().unwrap();
    let err = b
        .apply(&[Op::Ack { to: id(1), next: 1 }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("may have been applied"), "{err}");
    assert_eq!(append(b.as_mut(), id(1), push("c", None, 60)), 0);
}

/// Every per-terminal key is hash-tagged by its terminal and versioned; what holds deadlines
/// expires on its own; the cursor does not.
#[test]
fn redis_key_layout() {
    let Some((server, mut b)) = redis() else {
        return;
    };
    let one = id(1).to_string();
    append(b.as_mut(), id(1), push("a", Some("k"), 60));
    b.apply(&[
        Op::Touch {
            id: id(1),
            now: NOW,
        },
        Op::Link {
            first: id(1),
            second: id(2),
            until: NOW + 100,
            since: 0,
            unless_revoked: None,
        },
        Op::UseNonce {
            first: id(1),
            second: id(2),
            issued_at: NOW,
            nonce: [7; 16],
            not_after: NOW + 100,
            now: NOW,
            capacity: 10,
        },
    ])
    .unwrap();
    let keys = match server.command(&["KEYS", "*"]).unwrap() {
        ::redis::Value::Array(keys) => keys,
        other => panic!("{other:?}"),
    };
    let mut names: Vec<String> = keys
        .iter()
        .map(|k| match k {
            ::redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    names.sort();
    let tagged = |what: &str| format!("handoff:v1:{{{one}}}:{what}");
    let mut expected = vec![
        "handoff:v1:epoch".to_string(),
        "handoff:v1:seen".to_string(),
        "handoff:v1:sweep".to_string(),
        tagged("collapse"),
        tagged("cursor"),
        tagged("expiry"),
        tagged("followers"),
        tagged("known"),
        tagged("log"),
        tagged("nonces"),
        tagged("since"),
        format!("handoff:v1:{{{}}}:following", id(2)),
    ];
    expected.sort();
    assert_eq!(names, expected);
    let ttl = |key: &str| match server.command(&["TTL", key]).unwrap() {
        ::redis::Value::Int(t) => t,
        other => panic!("{other:?}"),
    };
    for what in ["log", "expiry", "collapse", "nonces", "followers", "since"] {
        assert!(ttl(&tagged(what)) > 0, "{what} expires");
    }
    for persistent in [
        tagged("cursor"),
        tagged("known"),
        "handoff:v1:epoch".into(),
        "handoff:v1:seen".into(),
    ] {
        assert_eq!(ttl(&persistent), -1, "{persistent} never expires");
    }
}

#[test]
fn redis_errors_never_show_the_password() {
    let Some((server, _b)) = redis() else {
        return;
    };
    let missing = server.socket().with_file_name("missing.sock");
    let url = format!("redis+unix://{}?pass=s3cret", missing.display());
    let err = RedisBackend::open(&url).err().unwrap().to_string();
    assert!(!err.contains("s3cret"), "{err}");
    assert!(err.contains("pass=***"), "{err}");
    server
        .command(&["CONFIG", "SET", "requirepass", "right"])
        .unwrap();
    let url = format!("redis+unix://{}?pass=wr0ng", server.socket().display());
    let err = RedisBackend::open(&url).err().unwrap().to_string();
    assert!(!err.contains("wr0ng"), "{err}");
}

/// A sweep empties what expired and forgets the keys it emptied; what lives on stays.
#[test]
fn redis_sweep_leaves_only_live_state() {
    let Some((server, mut b)) = redis() else {
        return;
    };
    append(b.as_mut(), id(1), push("short", Some("k"), 10));
    append(b.as_mut(), id(3), push("long", Some("k"), 1000));
    b.apply(&[
        Op::Link {
            first: id(1),
            second: id(2),
            until: NOW + 10,
            since: 0,
            unless_revoked: None,
        },
        Op::UseNonce {
            first: id(1),
            second: id(2),
            issued_at: NOW,
            nonce: [7; 16],
            not_after: NOW + 10,
            now: NOW,
            capacity: 10,
        },
    ])
    .unwrap();
    b.apply(&[Op::Sweep { now: NOW + 10 }]).unwrap();
    let keys = match server.command(&["KEYS", "*"]).unwrap() {
        ::redis::Value::Array(keys) => keys.len(),
        other => panic!("{other:?}"),
    };
    // epoch, sweep (holding id 3's log), and the cursors of 1 and 3; id 3's log, expiry and
    // collapse hash.
    assert_eq!(keys, 7);
    let due = server
        .command(&["ZRANGE", "handoff:v1:sweep", "0", "-1", "WITHSCORES"])
        .unwrap();
    let log3 = format!("handoff:v1:{{{}}}:log", id(3));
    assert_eq!(
        due,
        ::redis::Value::Array(vec![
            ::redis::Value::BulkString(log3.into_bytes()),
            ::redis::Value::BulkString((NOW + 1000).to_string().into_bytes()),
        ])
    );
    assert_eq!(titles(b.as_ref(), id(3), 0, NOW), ["long"]);
    assert!(b.followers(&id(1), NOW).unwrap().is_empty());
    // The nonce was forgotten with its ticket; offsets go on.
    assert_eq!(append(b.as_mut(), id(1), push("again", None, 10)), 1);
}

/// A backend that counts the acknowledgements applied to it, for the store thread's ticker.
struct CountingAcks {
    inner: MemoryBackend,
    acks: Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend for CountingAcks {
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn apply_each(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let acks = ops.iter().filter(|op| matches!(op, Op::Ack { .. })).count();
        self.acks.fetch_add(acks, Ordering::SeqCst);
        self.inner.apply_each(ops)
    }
    fn known(&self, id: &TerminalId) -> Result<bool, StoreError> {
        self.inner.known(id)
    }
    fn seen(&self, id: &TerminalId) -> Result<Option<u64>, StoreError> {
        self.inner.seen(id)
    }
    fn session(&self, id: &TerminalId) -> Result<Option<Session>, StoreError> {
        self.inner.session(id)
    }
    fn followers(
        &self,
        first: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        self.inner.followers(first, now)
    }
    fn following(
        &self,
        second: &TerminalId,
        now: u64,
    ) -> Result<Vec<(TerminalId, u64)>, StoreError> {
        self.inner.following(second, now)
    }
    fn link_since(
        &self,
        first: &TerminalId,
        second: &TerminalId,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.link_since(first, second, now)
    }
    fn log(
        &self,
        to: &TerminalId,
        from: u64,
        limit: usize,
        now: u64,
    ) -> Result<LogRead, StoreError> {
        self.inner.log(to, from, limit, now)
    }
}

/// With no write or read to carry them, held acknowledgements are applied by the ticker within
/// about [`ACK_FLUSH`]; and those still held when the last handle goes are applied then.
#[tokio::test]
async fn held_acks_are_applied_without_a_write_to_carry_them() {
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = Store::start(Box::new(CountingAcks {
        inner: MemoryBackend::new(),
        acks: acks.clone(),
    }));
    store.ack(id(1), 1);
    let deadline = std::time::Instant::now() + ACK_FLUSH * 20;
    while acks.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ticker never applied a held acknowledgement"
        );
        tokio::time::sleep(ACK_FLUSH / 5).await;
    }
    assert_eq!(acks.load(Ordering::SeqCst), 1);

    // The last handle dropped with one held: applied before the thread ends.
    store.ack(id(2), 1);
    drop(store);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acks.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "an acknowledgement held at the end was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
