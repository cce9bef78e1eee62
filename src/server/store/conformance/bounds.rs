//! Conformance cases about bounds (DESIGN §6 "everything accepted is deliverable", "state of
//! strangers is bounded"): one bad op fails alone, and idle strangers' state expires. Run for
//! every backend by `bounds_tests!`.

use super::*;

/// A push that no frame can carry: the store cannot encode it.
fn oversized() -> NewPush {
    let mut p = push("huge", None, 60);
    p.uri = "u".repeat(crate::wire::MAX_FRAME + 10);
    p
}

/// Queues `writes` so the store thread takes them as one batch (one commit): the thread is held
/// in a read until every write is queued. Bypasses [`Store::write`]'s checks, as a write that
/// slipped past them would. Returns each write's result.
async fn one_batch(store: &Store, writes: Vec<Vec<Op>>) -> Vec<Result<Vec<Outcome>, StoreError>> {
    let (held_tx, held_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let hold: ReadFn = Box::new(move |_| {
        let _ = held_tx.send(());
        let _ = release_rx.recv();
    });
    store.tx.send(Msg::Read(hold)).await.unwrap();
    held_rx.await.unwrap();
    let mut replies = Vec::new();
    for ops in writes {
        let (reply, rx) = oneshot::channel();
        store.tx.send(Msg::Write { ops, reply }).await.unwrap();
        replies.push(rx);
    }
    release_tx.send(()).unwrap();
    let mut out = Vec::new();
    for rx in replies {
        out.push(rx.await.unwrap());
    }
    out
}

/// An op the backend cannot apply fails alone: the writes batched with it in one commit
/// succeed, and it changes nothing.
pub async fn one_bad_op_fails_alone(store: Store) {
    let good = |to: u8, title: &str| Op::Append {
        to: id(to),
        push: push(title, None, 60),
        now: NOW,
    };
    let results = one_batch(
        &store,
        vec![
            vec![good(1, "before")],
            vec![Op::Append {
                to: id(2),
                push: oversized(),
                now: NOW,
            }],
            vec![
                Op::Touch {
                    id: id(3),
                    now: NOW,
                },
                good(3, "after"),
            ],
        ],
    )
    .await;
    assert_eq!(results[0].as_ref().unwrap(), &[Outcome::Offset(0)]);
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert_eq!(
        results[2].as_ref().unwrap(),
        &[Outcome::Done, Outcome::Offset(0)]
    );
    let (one, two, three, known) = store
        .read(|b| {
            Ok((
                b.log(&id(1), 0, 10, NOW)?,
                b.log(&id(2), 0, 10, NOW)?,
                b.log(&id(3), 0, 10, NOW)?,
                b.known(&id(3))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(
        (two.items.len(), two.next),
        (0, 0),
        "the bad op changed nothing"
    );
    assert_eq!(three.items[0].item.title, "after");
    assert!(known);
    // The store goes on as usual.
    assert_eq!(
        store.write_one(good(2, "next")).await.unwrap(),
        Outcome::Offset(0)
    );
}

/// Terminals neither connected (touched since) nor linked are forgotten after the idle time:
/// their known entry and session; their log's offsets go on.
pub fn idle_strangers_expire(b: &mut dyn Backend) {
    let session = |title: &str| Session {
        uri: format!("u://{title}"),
        title: title.into(),
        position: None,
        meta: BTreeMap::new(),
    };
    let touch = |n: u8, now: u64| Op::Touch { id: id(n), now };
    let mut ops = Vec::new();
    for n in 1..=4 {
        ops.push(touch(n, NOW));
        ops.push(Op::SetSession {
            id: id(n),
            session: Some(session(&n.to_string())),
        });
    }
    ops.push(Op::Link {
        first: id(4),
        second: id(2),
        until: NOW + 1000,
        since: 0,
        unless_revoked: None,
    });
    b.apply(&ops).unwrap();
    assert_eq!(append(b, id(1), push("kept", None, 5000)), 0);
    // A touch counts the latest time; an older one does not move it back.
    b.apply(&[touch(3, NOW + 500), touch(3, NOW + 100)])
        .unwrap();

    let expire = |b: &mut dyn Backend, now: u64, seen_before: u64| {
        b.apply(&[Op::ExpireIdle { now, seen_before }]).unwrap()[0]
    };
    // 1 is idle; 2 and 4 are linked (as second and first); 3 was seen since.
    assert_eq!(expire(b, NOW + 600, NOW + 300), Outcome::Expired(1));
    assert!(!b.known(&id(1)).unwrap());
    assert_eq!(b.session(&id(1)).unwrap(), None);
    for n in 2..=4 {
        assert!(b.known(&id(n)).unwrap(), "{n} is kept");
        assert_eq!(b.session(&id(n)).unwrap(), Some(session(&n.to_string())));
    }
    // Once the link lapsed, its ends go too; 3 stays until it has been idle long enough.
    assert_eq!(expire(b, NOW + 1000, NOW + 400), Outcome::Expired(2));
    assert!(!b.known(&id(2)).unwrap() && !b.known(&id(4)).unwrap());
    assert_eq!(b.session(&id(4)).unwrap(), None);
    assert!(b.known(&id(3)).unwrap());
    assert_eq!(expire(b, NOW + 1000, NOW + 501), Outcome::Expired(1));
    assert!(!b.known(&id(3)).unwrap());
    assert_eq!(expire(b, NOW + 1000, NOW + 1000), Outcome::Expired(0));
    // A forgotten terminal that comes back is known again, and its log goes on where it was.
    b.apply(&[touch(1, NOW + 2000)]).unwrap();
    assert!(b.known(&id(1)).unwrap());
    assert_eq!(append(b, id(1), push("again", None, 5000)), 1);
    assert_eq!(titles(b, id(1), 0, NOW), ["kept", "again"]);
}

/// A write whose op would not fit a frame on its way to the terminal is refused before it is
/// queued, naming the limit, and changes nothing.
#[tokio::test]
async fn an_oversized_write_is_refused_before_the_batch() {
    let store = Store::start(Box::new(MemoryBackend::new()));
    let session = Session {
        uri: "u".repeat(crate::wire::MAX_FRAME - 20),
        title: "t".into(),
        position: None,
        meta: BTreeMap::new(),
    };
    for op in [
        Op::Append {
            to: id(1),
            push: oversized(),
            now: NOW,
        },
        Op::SetSession {
            id: id(1),
            session: Some(session),
        },
    ] {
        match store.write(vec![op]).await {
            Err(StoreError::TooLarge { limit, size, .. }) => {
                assert_eq!(limit, crate::wire::MAX_FRAME);
                assert!(size > limit);
            }
            other => panic!("{other:?}"),
        }
    }
    let (log, session) = store
        .read(|b| Ok((b.log(&id(1), 0, 10, NOW)?, b.session(&id(1))?)))
        .await
        .unwrap();
    assert_eq!((log.next, session), (0, None));
}

proptest::proptest! {
    /// The cheap bound never lets through a push that does not fit, and the full check never
    /// refuses one that does: whatever the mix of long strings and many small meta entries
    /// (which cost the decoder more than their encoded bytes).
    #[test]
    fn the_size_check_admits_exactly_what_decodes(
        uri in 0usize..66_000,
        entries in 0usize..4_000,
        key_len in 0usize..20,
        collapse in proptest::option::of(0usize..100),
    ) {
        let mut p = push("t", None, 60);
        p.uri = "u".repeat(uri);
        p.meta = (0..entries).map(|i| (format!("{i:0key_len$}"), String::new())).collect();
        p.collapse_key = collapse.map(|n| "k".repeat(n));
        let worst = p.stored(u64::MAX, u64::MAX);
        let delivers = crate::wire::encode_payload(&worst)
            .and_then(|b| crate::wire::decode_payload::<StoredPush>(&b))
            .is_ok()
            && crate::wire::encode_frame(&ServerPush::Item(worst.item.clone()))
                .and_then(|f| crate::wire::decode_frame::<ServerPush>(&f))
                .is_ok();
        if p.size_bound() <= crate::wire::MAX_FRAME {
            proptest::prop_assert!(delivers, "the bound admitted what does not decode");
        }
        proptest::prop_assert_eq!(p.check_size("push").is_ok(), delivers);
    }
}

macro_rules! bounds_tests {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn idle_strangers_expire() {
                let Some((_guard, mut b)) = $make else { return };
                super::idle_strangers_expire(b.as_mut());
            }

            #[tokio::test]
            async fn one_bad_op_fails_alone() {
                let Some((_guard, b)) = $make else { return };
                super::one_bad_op_fails_alone(Store::start(b)).await;
            }
        }
    };
}

bounds_tests!(memory_backend, super::memory());
bounds_tests!(embedded_backend, super::embedded());
bounds_tests!(redis_backend, super::redis());
