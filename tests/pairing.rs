//! Pairing under attack (issue 10.1), in process on loopback: real daemons, and Mallory as a
//! scripted peer holding keys of her own. She sits between A and B: to A she is "the phone" (key
//! M1), to B she is "the PC" (key M2, a real daemon that pairs with B honestly). She wins if A and
//! B are shown the same code while each is paired with one of her keys.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff::daemon::pairing::{code, commitment};
use handoff::daemon::Daemon;
use handoff::daemon::PairError;
use handoff::identity::{Identity, TerminalId};
use handoff::net;
use handoff::tls::{self, TransportLimits};
use handoff::wire::{
    self, PairStep, Refusal, RefusalReason, Request, RequestBody, Response, ResponseBody,
};
use support::inproc::*;

const SERVE: TransportLimits = TransportLimits {
    max_bidi_streams: 8,
    max_uni_streams: 0,
    idle_timeout: Duration::from_secs(10),
    keep_alive: None,
};

/// An identity whose ID compares to `than` as `greater` asks (so Mallory picks her role).
fn key_ordered(than: TerminalId, greater: bool) -> Identity {
    loop {
        let key = Identity::generate().unwrap();
        if (key.id() > than) == greater {
            return key;
        }
    }
}

/// What Mallory's scripted endpoint saw and did.
#[derive(Default)]
struct Seen {
    commitments: Vec<[u8; 32]>,
    reveals: Vec<[u8; 16]>,
    /// Nonces Mallory gave out as responder.
    nonces_given: usize,
}

/// How Mallory's responder answers.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Answer the first reveal with junk; on a retry that reuses the revealed nonce, grind her own
    /// nonce until A's code equals `target`.
    JunkThenGrind,
    /// Say "not pairing" to the first three commitments (A retries), then answer honestly.
    NotYetThenHonest,
}

/// Mallory's responder endpoint holding `key`: answers A's pairing steps per `script`.
async fn mallory_responder(
    key: Identity,
    victim: TerminalId,
    target: Arc<Mutex<Option<String>>>,
    script: Script,
) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&key, SERVE).unwrap(), loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    tokio::spawn(async move {
        let me = key.id();
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let Ok(Some(request)) =
                    net::read_frame::<Request>(&mut recv, net::READ_TIMEOUT, wire::MAX_FRAME).await
                else {
                    break;
                };
                let body = match request.body {
                    RequestBody::Pair(PairStep::Commit { .. })
                        if script == Script::NotYetThenHonest
                            && state.lock().unwrap().commitments.len() < 3 =>
                    {
                        if let RequestBody::Pair(PairStep::Commit { commitment }) = request.body {
                            state.lock().unwrap().commitments.push(commitment);
                        }
                        ResponseBody::Refused(Refusal {
                            reason: RefusalReason::NotPairing,
                            message: "not yet".into(),
                        })
                    }
                    RequestBody::Pair(PairStep::Commit { commitment }) => {
                        let mut seen = state.lock().unwrap();
                        let reused = seen.commitments.contains(&commitment);
                        seen.commitments.push(commitment);
                        seen.nonces_given += 1;
                        let known = if reused {
                            seen.reveals.last().copied()
                        } else {
                            None
                        };
                        drop(seen);
                        let mut my_nonce: [u8; 16] = rand::random();
                        if let (Some(n_a), Script::JunkThenGrind) = (known, script) {
                            // The retry reuses a nonce A already revealed: choose ours so the
                            // codes match.
                            let goal = target.lock().unwrap().clone().unwrap();
                            let mut counter = 0u128;
                            loop {
                                my_nonce = counter.to_be_bytes();
                                if code(&victim, &me, &n_a, &my_nonce) == goal {
                                    break;
                                }
                                counter += 1;
                            }
                        }
                        ResponseBody::PairNonce { nonce: my_nonce }
                    }
                    RequestBody::Pair(PairStep::Reveal { nonce }) => {
                        let mut seen = state.lock().unwrap();
                        seen.reveals.push(nonce);
                        if seen.reveals.len() == 1 && script == Script::JunkThenGrind {
                            // Junk: neither Paired nor a refusal.
                            ResponseBody::SessionStored
                        } else {
                            ResponseBody::Paired
                        }
                    }
                    _ => ResponseBody::Refused(Refusal {
                        reason: RefusalReason::WrongEndpoint,
                        message: "no".into(),
                    }),
                };
                let _ = net::write_frame(
                    &mut send,
                    &Response {
                        id: request.id,
                        body,
                    },
                )
                .await;
                let _ = send.finish();
            }
        }
    });
    (addr, seen)
}

/// B pairs honestly with Mallory's second key (a real daemon), so Mallory knows B's code.
async fn b_code_with(b: &Daemon, m2: &Daemon) -> String {
    let (m2_id, b_id) = (m2.id().to_string(), b.id().to_string());
    let (on_b, on_m2) = tokio::join!(b.pair(&m2_id), m2.pair(&b_id));
    let (on_b, on_m2) = (on_b.unwrap(), on_m2.unwrap());
    assert_eq!(on_b.code, on_m2.code, "honest pairing shows one code");
    on_b.code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_answering_junk_then_grinding_never_matches_the_codes() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(terminal(dir.path(), "pc", None, vec![])).await;
    let b = start(terminal(dir.path(), "phone", None, vec![])).await;
    let m2 = start(terminal(dir.path(), "mallory-as-pc", None, vec![])).await;
    introduce(&b, "pc", m2.id(), m2.quic_addr());
    introduce(&m2, "phone", b.id(), b.quic_addr());

    // Mallory's key towards A is larger than A's, so A initiates and reveals first.
    let m1 = key_ordered(a.id(), true);
    let m1_id = m1.id();
    let target = Arc::new(Mutex::new(None));
    let (m1_addr, seen) =
        mallory_responder(m1, a.id(), target.clone(), Script::JunkThenGrind).await;
    introduce(&a, "phone", m1_id, m1_addr);

    let mut shown_same = 0;
    let mut aborted = 0;
    for attempt in 0..3 {
        let code_b = b_code_with(&b, &m2).await;
        *target.lock().unwrap() = Some(code_b.clone());
        match tokio::time::timeout(Duration::from_secs(60), a.pair(&m1_id.to_string()))
            .await
            .expect("A's pairing ends")
        {
            Ok(shown) if shown.code == code_b => shown_same += 1,
            Ok(_) => {}
            Err(e) => {
                aborted += 1;
                let text = e.to_string();
                assert!(
                    text.contains("aborted") || text.contains("too many pairing attempts"),
                    "attempt {attempt}: a deviation must abort with a clear error, got {text}"
                );
            }
        }
        // Clear whatever B and M2 are waiting to confirm.
        let _ = b.confirm_pair(m2.id(), "000000");
        let _ = m2.confirm_pair(b.id(), "000000");
    }
    assert_eq!(shown_same, 0, "Mallory got A and B shown the same code");
    assert!(aborted > 0, "the junk reply must abort A's attempt");
    let seen = seen.lock().unwrap();
    let distinct: HashSet<_> = seen.commitments.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.commitments.len(),
        "A re-sent a commitment (its nonce was reused across attempts)"
    );
}

/// While the responder's user has not started, the initiator asks again with a new nonce each
/// time (nothing was revealed, but nothing is reused either), and an honest answer then pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_retrying_before_the_responder_is_ready_never_reuses_a_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(terminal(dir.path(), "pc", None, vec![])).await;
    let m1 = key_ordered(a.id(), true);
    let m1_id = m1.id();
    let target = Arc::new(Mutex::new(None));
    let (m1_addr, seen) = mallory_responder(m1, a.id(), target, Script::NotYetThenHonest).await;
    introduce(&a, "phone", m1_id, m1_addr);
    let shown = tokio::time::timeout(Duration::from_secs(60), a.pair(&m1_id.to_string()))
        .await
        .expect("pairing ends")
        .expect("pairs once the peer answers");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.commitments.len(), 4, "three refused, one answered");
    let distinct: HashSet<_> = seen.commitments.iter().collect();
    assert_eq!(distinct.len(), 4, "a retry reused a nonce");
    assert_eq!(seen.reveals.len(), 1);
    assert_eq!(shown.code.len(), 6);
}

/// Mallory as initiator towards B (her key is the smaller): she cannot get a second nonce from B
/// in one attempt (which would let her try codes until one matches), nor reveal a nonce she did
/// not commit to; each deviation aborts B's attempt with an error B's user sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_gives_one_nonce_per_attempt_and_aborts_on_deviation() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(terminal(dir.path(), "phone", None, vec![])).await;
    let m = key_ordered(b.id(), false);
    let m_id = m.id();
    // B's user pairs with "the PC" (Mallory's key).
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&m, SERVE).unwrap(), loopback()).unwrap();
    introduce(&b, "pc", m_id, endpoint.local_addr().unwrap());
    let commit = |n: u8| {
        RequestBody::Pair(PairStep::Commit {
            commitment: commitment(&m_id, &b.id(), &[n; 16]),
        })
    };

    // Deviation 1: a second commitment after B gave its nonce.
    let pairing = {
        let b = b.clone();
        tokio::spawn(async move { b.pair(&m_id.to_string()).await })
    };
    let conn = raw_connect(&m, b.id(), b.quic_addr()).await;
    let answer = loop {
        // Until B's user has started, B says it is not pairing.
        match net::request(&conn, commit(1)).await.unwrap() {
            ResponseBody::Refused(r) if r.reason == RefusalReason::NotPairing => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => break other,
        }
    };
    assert!(
        matches!(answer, ResponseBody::PairNonce { .. }),
        "{answer:?}"
    );
    match net::request(&conn, commit(2)).await.unwrap() {
        ResponseBody::Refused(r) => assert_eq!(r.reason, RefusalReason::BadPairing),
        other => panic!("a second nonce in one attempt: {other:?}"),
    }
    let err = pairing.await.unwrap().unwrap_err();
    assert!(
        matches!(err, PairError::Aborted { .. }) && err.to_string().contains("second commitment"),
        "{err}"
    );

    // Deviation 2: a reveal that does not match the commitment.
    let pairing = {
        let b = b.clone();
        tokio::spawn(async move { b.pair(&m_id.to_string()).await })
    };
    loop {
        match net::request(&conn, commit(3)).await.unwrap() {
            ResponseBody::Refused(r) if r.reason == RefusalReason::NotPairing => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            ResponseBody::PairNonce { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    let reveal = RequestBody::Pair(PairStep::Reveal { nonce: [4; 16] });
    assert!(matches!(
        net::request(&conn, reveal).await.unwrap(),
        ResponseBody::Refused(_)
    ));
    let err = pairing.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // The attempts are capped: a third nonce exchange with the same peer within ten minutes
    // is allowed, a fourth is not (B's user is told to wait).
    let pairing = {
        let b = b.clone();
        tokio::spawn(async move { b.pair(&m_id.to_string()).await })
    };
    loop {
        match net::request(&conn, commit(5)).await.unwrap() {
            ResponseBody::Refused(r) if r.reason == RefusalReason::NotPairing => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            ResponseBody::PairNonce { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    let reveal = RequestBody::Pair(PairStep::Reveal { nonce: [5; 16] });
    assert!(matches!(
        net::request(&conn, reveal).await.unwrap(),
        ResponseBody::Paired
    ));
    pairing
        .await
        .unwrap()
        .expect("an honest third attempt shows a code");
    let _ = b.confirm_pair(m_id, "000000");
    let err = b.pair(&m_id.to_string()).await.unwrap_err();
    assert!(matches!(err, PairError::TooManyAttempts { .. }), "{err}");
}
