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

macro_rules! bounds_tests {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

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
