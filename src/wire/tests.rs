//! Golden bytes and round trips for every wire message, and the frame cap.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::identity::TerminalId;

fn id(byte: u8) -> TerminalId {
    TerminalId::from_bytes([byte; 32])
}

fn session() -> Session {
    Session {
        uri: "u".into(),
        title: "t".into(),
        position: Some(1.5),
        meta: BTreeMap::from([("k".into(), "v".into())]),
    }
}

fn signed_ticket() -> SignedTicket {
    SignedTicket {
        ticket: Ticket {
            first: id(1),
            second: id(2),
            server: id(3),
            issued_at: 200,
            not_after: 300,
            nonce: [4; 16],
        },
        signature: Signature([5; 64]),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The frame of `message`, as hex, with runs of 32 identical ID bytes (or 16 nonce bytes, 64
/// signature bytes) written as `<aa*32>` so the expectations stay readable.
fn golden<T: Serialize>(message: &T) -> String {
    let mut text = hex(&encode_frame(message).unwrap());
    for (byte, run) in [(1u8, 32), (2, 32), (3, 32), (4, 16), (5, 64)] {
        let full = format!("{byte:02x}").repeat(run);
        text = text.replace(&full, &format!("<{byte:02x}*{run}>"));
    }
    text
}

fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    message: &T,
) {
    let frame = encode_frame(message).unwrap();
    assert_eq!(&decode_frame::<T>(&frame).unwrap(), message);
}

#[test]
fn golden_requests() {
    let cases: Vec<(Request, &str)> = vec![
        (
            Request {
                id: 7,
                body: RequestBody::InterfaceInfo,
            },
            "000000020700",
        ),
        (
            Request {
                id: 7,
                body: RequestBody::SetSession(None),
            },
            "00000003070100",
        ),
        (
            Request {
                id: 300,
                body: RequestBody::SetSession(Some(session())),
            },
            "00000017fb2c0101010175017401000000000000f83f01016b0176",
        ),
        (
            Request {
                id: 7,
                body: RequestBody::Follow(InfoRequest {
                    first: id(1),
                    second: id(2),
                    ticket: signed_ticket(),
                }),
            },
            "000000f70702<01*32><02*32><01*32><02*32><03*32>c8fb2c01<04*16>40<05*64>",
        ),
    ];
    for (message, expected) in cases {
        assert_eq!(golden(&message), expected, "{message:?}");
        round_trip(&message);
    }
}

#[test]
fn golden_responses() {
    let info = InterfaceInfo {
        server: ServerInfo {
            id: id(3),
            addrs: vec!["h:1".into()],
        },
        first: id(1),
        session: None,
        ticket: signed_ticket(),
    };
    let cases: Vec<(Response, &str)> = vec![
        (
            Response {
                id: 7,
                body: ResponseBody::InterfaceInfo(Box::new(info)),
            },
            "000000fd0700<03*32>0103683a31<01*32>00<01*32><02*32><03*32>c8fb2c01<04*16>40<05*64>",
        ),
        (
            Response {
                id: 7,
                body: ResponseBody::Refused(Refusal {
                    reason: RefusalReason::NotTrusted,
                    message: "no".into(),
                }),
            },
            "00000006070100026e6f",
        ),
        (
            Response {
                id: 7,
                body: ResponseBody::SessionStored,
            },
            "000000020702",
        ),
        (
            Response {
                id: 7,
                body: ResponseBody::Linked {
                    until: 9,
                    has_session: true,
                },
            },
            "0000000407030901",
        ),
    ];
    for (message, expected) in cases {
        assert_eq!(golden(&message), expected, "{message:?}");
        round_trip(&message);
    }
}

#[test]
fn golden_push() {
    let push = ServerPush::Item(PushItem {
        offset: 2,
        from: Some(id(1)),
        uri: "u".into(),
        title: "t".into(),
        body: None,
        position: None,
        meta: BTreeMap::new(),
    });
    assert_eq!(golden(&push), "0000002a0002<01*32>0101750174000000");
    round_trip(&push);
}

#[test]
fn frame_cap_is_checked_before_allocating() {
    assert_eq!(
        decode_header(((MAX_FRAME + 1) as u32).to_be_bytes()),
        Err(WireError::TooLarge(MAX_FRAME + 1))
    );
    assert_eq!(
        decode_header(u32::MAX.to_be_bytes()),
        Err(WireError::TooLarge(u32::MAX as usize))
    );
    assert_eq!(decode_header(0u32.to_be_bytes()), Err(WireError::Empty));
    assert_eq!(
        decode_header((MAX_FRAME as u32).to_be_bytes()),
        Ok(MAX_FRAME)
    );
}

#[test]
fn oversized_messages_are_not_encoded() {
    let big = Request {
        id: 1,
        body: RequestBody::SetSession(Some(Session {
            uri: "x".repeat(MAX_FRAME),
            title: String::new(),
            position: None,
            meta: BTreeMap::new(),
        })),
    };
    assert!(encode_frame(&big).is_err());
}

#[test]
fn garbage_truncated_and_trailing_bytes_are_refused() {
    // Unknown variant index.
    assert!(matches!(
        decode_payload::<Request>(&[7, 99]),
        Err(WireError::Malformed(_))
    ));
    // Truncated: a Follow without its body.
    assert!(matches!(
        decode_payload::<Request>(&[7, 2, 1]),
        Err(WireError::Malformed(_))
    ));
    // Trailing bytes after a complete message.
    assert_eq!(
        decode_payload::<Request>(&[7, 0, 0]),
        Err(WireError::Trailing(1))
    );
    // A string length far beyond the frame: refused by the bincode limit, not allocated.
    let mut huge = vec![7, 1, 1, 0xfc];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_payload::<Request>(&huge).is_err());
    // Header and payload length disagree.
    assert!(decode_frame::<Request>(&[0, 0, 0, 5, 7, 0]).is_err());
}

fn arb_id() -> impl Strategy<Value = TerminalId> {
    any::<[u8; 32]>().prop_map(TerminalId::from_bytes)
}

fn arb_session() -> impl Strategy<Value = Session> {
    (
        ".{0,40}",
        ".{0,40}",
        proptest::option::of(0.0f64..1e7),
        proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
    )
        .prop_map(|(uri, title, position, meta)| Session {
            uri,
            title,
            position,
            meta,
        })
}

fn arb_ticket() -> impl Strategy<Value = SignedTicket> {
    (
        arb_id(),
        arb_id(),
        arb_id(),
        any::<(u64, u64)>(),
        any::<[u8; 16]>(),
        proptest::collection::vec(any::<u8>(), 64),
    )
        .prop_map(
            |(first, second, server, (issued_at, not_after), nonce, sig)| SignedTicket {
                ticket: Ticket {
                    first,
                    second,
                    server,
                    issued_at,
                    not_after,
                    nonce,
                },
                signature: Signature(sig.try_into().unwrap_or([0; 64])),
            },
        )
}

fn arb_request() -> impl Strategy<Value = Request> {
    let body = prop_oneof![
        Just(RequestBody::InterfaceInfo),
        proptest::option::of(arb_session()).prop_map(RequestBody::SetSession),
        (arb_id(), arb_id(), arb_ticket()).prop_map(|(first, second, ticket)| RequestBody::Follow(
            InfoRequest {
                first,
                second,
                ticket
            }
        )),
    ];
    (any::<u64>(), body).prop_map(|(id, body)| Request { id, body })
}

fn arb_response() -> impl Strategy<Value = Response> {
    let reason = prop_oneof![
        Just(RefusalReason::NotTrusted),
        Just(RefusalReason::NoServer),
        Just(RefusalReason::BadTicket),
        Just(RefusalReason::WrongEndpoint),
        Just(RefusalReason::Busy),
    ];
    let body = prop_oneof![
        (
            arb_id(),
            proptest::collection::vec(".{0,20}", 0..3),
            arb_id(),
            proptest::option::of(arb_session()),
            arb_ticket()
        )
            .prop_map(|(sid, addrs, first, session, ticket)| {
                ResponseBody::InterfaceInfo(Box::new(InterfaceInfo {
                    server: ServerInfo { id: sid, addrs },
                    first,
                    session,
                    ticket,
                }))
            }),
        (reason, ".{0,40}")
            .prop_map(|(reason, message)| ResponseBody::Refused(Refusal { reason, message })),
        Just(ResponseBody::SessionStored),
        (any::<u64>(), any::<bool>())
            .prop_map(|(until, has_session)| ResponseBody::Linked { until, has_session }),
    ];
    (any::<u64>(), body).prop_map(|(id, body)| Response { id, body })
}

fn arb_push() -> impl Strategy<Value = ServerPush> {
    (
        any::<u64>(),
        proptest::option::of(arb_id()),
        arb_session(),
        proptest::option::of(".{0,40}"),
    )
        .prop_map(|(offset, from, s, body)| {
            ServerPush::Item(PushItem {
                offset,
                from,
                uri: s.uri,
                title: s.title,
                body,
                position: s.position,
                meta: s.meta,
            })
        })
}

proptest! {
    #[test]
    fn requests_round_trip(message in arb_request()) {
        round_trip(&message);
    }

    #[test]
    fn responses_round_trip(message in arb_response()) {
        round_trip(&message);
    }

    #[test]
    fn pushes_round_trip(message in arb_push()) {
        round_trip(&message);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame::<Request>(&bytes);
        let _ = decode_frame::<Response>(&bytes);
        let _ = decode_frame::<ServerPush>(&bytes);
    }
}

fn item_for_stream() -> PushItem {
    PushItem {
        offset: 0,
        from: None,
        uri: "u".into(),
        title: "t".into(),
        body: None,
        position: None,
        meta: BTreeMap::new(),
    }
}

#[test]
fn a_push_items_offset_is_read_even_when_the_rest_does_not_decode() {
    let item = PushItem {
        offset: 300,
        from: Some(id(1)),
        uri: "u".into(),
        title: "t".into(),
        body: None,
        position: None,
        meta: BTreeMap::new(),
    };
    let payload = encode_payload(&ServerPush::Item(item)).unwrap();
    assert_eq!(push_offset(&payload), Some((None, 300)));
    // Cut after the offset (varint 300 is 3 bytes after the 1-byte variant): the item no longer
    // decodes, its offset still does.
    assert!(decode_payload::<ServerPush>(&payload[..6]).is_err());
    assert_eq!(push_offset(&payload[..4]), Some((None, 300)));
    assert_eq!(push_offset(&payload[..2]), None);
    assert_eq!(push_offset(&[]), None);
    // A variant that is not a push has no offset.
    assert_eq!(push_offset(&[2, 5]), None);
    // A stream item: its owner and its offset in that stream, also cut short.
    let stream = ServerPush::Stream {
        owner: id(2),
        item: PushItem {
            offset: 301,
            ..item_for_stream()
        },
    };
    let payload = encode_payload(&stream).unwrap();
    assert_eq!(push_offset(&payload), Some((Some(id(2)), 301)));
    assert!(decode_payload::<ServerPush>(&payload[..payload.len() - 1]).is_err());
    assert_eq!(push_offset(&payload[..36]), Some((Some(id(2)), 301)));
}

#[test]
fn the_major_text_is_the_major() {
    assert_eq!(PROTOCOL_MAJOR_TEXT, PROTOCOL_MAJOR.to_string());
}

/// The borrowed form of a push encodes to the same bytes as the owned one.
#[test]
fn a_push_by_reference_encodes_as_the_push() {
    let item = PushItem {
        offset: 77,
        from: Some(id(3)),
        meta: BTreeMap::from([("k".into(), "v".into())]),
        ..item_for_stream()
    };
    assert_eq!(
        encode_payload(&ServerPushRef::Item(&item)).unwrap(),
        encode_payload(&ServerPush::Item(item.clone())).unwrap()
    );
    assert_eq!(
        encode_payload(&ServerPushRef::Stream {
            owner: &id(4),
            item: &item
        })
        .unwrap(),
        encode_payload(&ServerPush::Stream {
            owner: id(4),
            item: item.clone()
        })
        .unwrap()
    );
}
