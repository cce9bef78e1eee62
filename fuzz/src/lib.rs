//! Bodies of the fuzz targets in `fuzz_targets/` (docs/FUZZING.md).
//!
//! They live here, not in the targets, so that `tests/fuzz_regressions.rs` in the main package
//! includes this file and runs the very same code on fixed inputs: the harness cannot rot. Only
//! the crate's public API is used. Each body panics when a property fails and otherwise returns
//! what it saw, so the tests can assert on it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::OnceLock;

use handoff::identity::{Identity, TerminalId};
use handoff::wire::ticket::{Expectation, ReplayCache, TicketError, MAX_CLOCK_SKEW};
use handoff::wire::txt::{Advert, TxtError, MAX_NAME_LEN};
use handoff::wire::{
    decode_frame, decode_header, decode_payload, encode_frame, PushAck, Request, RequestBody,
    Response, ServerPush, Signature, SignedTicket, Ticket, WireError, HEADER_LEN, MAX_FRAME,
    PROTOCOL_MAJOR,
};
use serde::{de::DeserializeOwned, Serialize};

/// A wire message as the targets need it.
pub trait Message: Serialize + DeserializeOwned + PartialEq + Debug {}

impl<T: Serialize + DeserializeOwned + PartialEq + Debug> Message for T {}

/// What the `frame` target saw.
#[derive(Debug)]
pub struct FrameOutcome {
    /// `decode_header` on the first four bytes, if there are four.
    pub header: Option<Result<usize, WireError>>,
    pub request: Result<Request, WireError>,
    pub response: Result<Response, WireError>,
    pub push: Result<ServerPush, WireError>,
    pub ack: Result<PushAck, WireError>,
}

/// `frame` target: the input as a whole frame (header and payload), decoded as each type a peer
/// can send: `Request`, `Response`, `ServerPush`, `PushAck`.
///
/// Properties: header errors are the frame's errors; a frame whose header names its payload's
/// length decodes exactly like that payload; whatever decodes re-encodes and decodes again to an
/// equal value.
pub fn frame(data: &[u8]) -> FrameOutcome {
    let header = data.get(..HEADER_LEN).map(|bytes| {
        let mut h = [0; HEADER_LEN];
        h.copy_from_slice(bytes);
        decode_header(h)
    });
    FrameOutcome {
        request: frame_as(data, &header),
        response: frame_as(data, &header),
        push: frame_as(data, &header),
        ack: frame_as(data, &header),
        header,
    }
}

fn frame_as<T: Message>(
    data: &[u8],
    header: &Option<Result<usize, WireError>>,
) -> Result<T, WireError> {
    let decoded = decode_frame::<T>(data);
    match header {
        None => assert!(
            matches!(decoded, Err(WireError::Malformed(_))),
            "a frame shorter than its header gave {decoded:?}"
        ),
        Some(Err(e)) => assert_eq!(decoded.as_ref().err(), Some(e), "header error not reported"),
        Some(Ok(len)) => {
            assert!(
                *len > 0 && *len <= MAX_FRAME,
                "header accepted length {len}"
            );
            let payload = &data[HEADER_LEN..];
            if *len == payload.len() {
                same_outcome(&decoded, &decode_payload::<T>(payload));
            } else {
                assert!(
                    matches!(decoded, Err(WireError::Malformed(_))),
                    "header says {len}, payload is {}, yet {decoded:?}",
                    payload.len()
                );
            }
        }
    }
    if let Ok(value) = &decoded {
        round_trip(value);
    }
    decoded
}

/// What the `message` target saw.
#[derive(Debug)]
pub struct MessageOutcome {
    pub request: Result<Request, WireError>,
    pub response: Result<Response, WireError>,
    pub push: Result<ServerPush, WireError>,
    pub ack: Result<PushAck, WireError>,
}

/// `message` target: the input as one payload, decoded as each of the same four types.
///
/// Properties: the same bytes behind a correct header decode the same way as a frame; a
/// `Trailing(n)` error means the first `len - n` bytes are a message; whatever decodes
/// re-encodes and decodes again to an equal value.
pub fn message(data: &[u8]) -> MessageOutcome {
    MessageOutcome {
        request: payload_as(data),
        response: payload_as(data),
        push: payload_as(data),
        ack: payload_as(data),
    }
}

fn payload_as<T: Message>(data: &[u8]) -> Result<T, WireError> {
    let decoded = decode_payload::<T>(data);
    if data.is_empty() {
        assert!(
            matches!(decoded, Err(WireError::Malformed(_))),
            "an empty payload gave {decoded:?}"
        );
    } else if data.len() <= MAX_FRAME {
        let mut frame = (data.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(data);
        same_outcome(&decode_frame::<T>(&frame), &decoded);
    }
    match &decoded {
        Ok(value) => round_trip(value),
        Err(WireError::Trailing(n)) => {
            assert!(
                *n > 0 && *n < data.len(),
                "Trailing({n}) of {} bytes",
                data.len()
            );
            let head = decode_payload::<T>(&data[..data.len() - n]);
            assert!(
                head.is_ok(),
                "the message before {n} trailing bytes: {head:?}"
            );
        }
        Err(_) => {}
    }
    decoded
}

/// Encodes `value`, decodes it, and checks the result is the same message.
fn round_trip<T: Message>(value: &T) {
    let frame = encode_frame(value).expect("a decoded message re-encodes");
    let back: T = decode_frame(&frame).expect("a re-encoded frame decodes");
    // Compare bytes: a NaN position makes the values unequal to themselves.
    assert_eq!(encode_frame(&back), Ok(frame), "re-encoding is not stable");
    if reflexive(value) {
        assert_eq!(&back, value);
    }
}

/// Two decodes of the same message bytes must agree.
fn same_outcome<T: Message>(a: &Result<T, WireError>, b: &Result<T, WireError>) {
    match (a, b) {
        (Ok(x), Ok(y)) => assert_eq!(encode_frame(x), encode_frame(y)),
        (Err(e), Err(f)) => assert_eq!(e, f),
        _ => panic!("frame and payload decodes disagree: {a:?} vs {b:?}"),
    }
}

/// False when `value` holds a NaN.
#[allow(clippy::eq_op)]
fn reflexive<T: PartialEq>(value: &T) -> bool {
    value == value
}

/// `txt` target: mDNS TXT properties parsed into an [`Advert`].
///
/// Input: a flag byte, then (if bit 1 is set) 32 bytes of an ID, then text, read as lossy UTF-8
/// and split on NUL into `key=value` entries. The flags prepend a valid `v` (bit 0), `id` (bit 1)
/// and `name` (bit 2) entries, which the text's own entries override (the last one wins), so the
/// fuzzer reaches the success path without guessing a 52-character base32 ID.
///
/// Properties: an advert is only built from a supported version, the last `id` entry (trimmed,
/// any case) and the last `name` entry, which is short and free of control characters; it parses
/// back from its own properties; `Missing(key)` means no entry has that key.
pub fn txt(data: &[u8]) -> Result<Advert, TxtError> {
    let mut input = Reader(data);
    let flags = input.byte();
    let id_text = (flags & 2 != 0).then(|| TerminalId::from_bytes(input.array()).to_string());
    let text = String::from_utf8_lossy(input.rest());
    let version = PROTOCOL_MAJOR.to_string();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    if flags & 1 != 0 {
        pairs.push(("v", &version));
    }
    if let Some(id) = &id_text {
        pairs.push(("id", id));
    }
    if flags & 4 != 0 {
        pairs.push(("name", "fuzz"));
    }
    if !text.is_empty() {
        pairs.extend(
            text.split('\0')
                .map(|entry| entry.split_once('=').unwrap_or((entry, ""))),
        );
    }
    let last = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    };

    let parsed = Advert::parse(pairs.iter().copied());
    match &parsed {
        Ok(advert) => {
            assert_eq!(advert.version, PROTOCOL_MAJOR);
            assert!(
                advert.name.len() <= MAX_NAME_LEN && !advert.name.chars().any(char::is_control)
            );
            assert_eq!(last("name"), Some(advert.name.as_str()));
            let id = last("id").expect("an advert has an id entry");
            assert_eq!(id.trim().to_ascii_lowercase(), advert.id.to_string());
            let props = advert.properties();
            let again = Advert::parse(props.iter().map(|(k, v)| (*k, v.as_str())));
            assert_eq!(again.as_ref(), Ok(advert), "an advert does not parse back");
        }
        Err(TxtError::Missing(key)) => assert_eq!(last(key), None, "{key} reported missing"),
        Err(TxtError::Version(v)) => assert_ne!(*v, PROTOCOL_MAJOR),
        Err(TxtError::Invalid { .. }) => {}
    }
    parsed
}

/// The identity the `ticket` target signs with, made once per process.
pub fn fuzz_identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| Identity::generate().expect("generate the fuzzing identity"))
}

/// Bytes of a ticket's fields in [`Ticket::signing_bytes`]: three IDs, `issued_at`, `not_after`,
/// the nonce.
const TICKET_FIELDS_LEN: usize = 32 * 3 + 8 * 2 + 16;

/// What the `ticket` target saw.
#[derive(Debug)]
pub struct TicketOutcome {
    /// The ticket that was checked, if the input made one.
    pub ticket: Option<SignedTicket>,
    pub check: Option<Result<(), TicketError>>,
    /// The replay cache's answer to each step, in order.
    pub replays: Vec<Result<(), TicketError>>,
}

/// `ticket` target: ticket checks and the replay cache.
///
/// Input layout (missing bytes read as zero):
///
/// | bytes | meaning |
/// |---|---|
/// | 0 | flags: bit 0 the ticket is that of a `Follow` request decoded from the tail (else the tail is raw ticket bytes); bit 1 re-sign it with the fuzzing identity as `first`; bits 2, 3, 4 the expectation's first, second, server match the request (else a different ID); bits 5-7 the replay cache's capacity |
/// | 1..9 | now (u64 big-endian) |
/// | 9..17 | the longest ticket lifetime the server accepts |
/// | 17..19, 19 | the signing byte to mutate and the XOR mask (signature property, with bit 1) |
/// | 20..36 | 8 replay steps: a nonce tweak, seconds to advance the clock |
/// | 36.. | a `Request` payload, or first, second, server, issued_at, not_after, nonce, signature |
///
/// Properties: `check` answers exactly what the rules of DESIGN §5 say, in their order, and no
/// ticket verifies unless the fuzzing identity signed it (small-order keys excepted, see
/// docs/FUZZING.md); the replay cache never exceeds its capacity, refuses a nonce right after
/// accepting it, refuses only nonces it accepted before, and accepts a nonce again only once the
/// ticket that used it has expired; see [`signature_property`] for the signature.
pub fn ticket(data: &[u8]) -> TicketOutcome {
    let mut input = Reader(data);
    let flags = input.byte();
    let now = input.u64();
    let max_lifetime = input.u64();
    let mutate_at = usize::from(u16::from_be_bytes(input.array()));
    let mask = input.byte();
    let steps: [u8; 16] = input.array();
    let tail = input.rest();

    let raw = raw_ticket(tail);
    let (mut signed, named_first, named_second) = if flags & 1 != 0 {
        match decode_payload::<Request>(tail) {
            Ok(Request {
                body: RequestBody::Follow(info),
                ..
            }) => (info.ticket, info.first, info.second),
            _ => {
                return TicketOutcome {
                    ticket: None,
                    check: None,
                    replays: Vec::new(),
                }
            }
        }
    } else {
        let first = raw.ticket.first;
        let second = raw.ticket.second;
        (raw.clone(), first, second)
    };

    let resigned = flags & 2 != 0;
    let named_first = if resigned {
        let identity = fuzz_identity();
        signed = Ticket {
            first: identity.id(),
            ..signed.ticket
        }
        .sign(identity);
        signature_property(raw.ticket, now, mutate_at, mask);
        identity.id()
    } else {
        named_first
    };

    let pick = |bit: u8, id: TerminalId| if flags & bit != 0 { id } else { other(id) };
    let expect = Expectation {
        first: pick(4, named_first),
        second: pick(8, named_second),
        server: pick(16, signed.ticket.server),
        now,
        max_lifetime,
    };
    let check = signed.check(&expect);
    assert_eq!(
        check,
        expected_check(&signed.ticket, &expect, resigned),
        "check disagrees with the rules for {signed:?} against {expect:?}"
    );

    let replays = replay(&signed.ticket, usize::from(flags >> 5), now, &steps);
    TicketOutcome {
        ticket: Some(signed),
        check: Some(check),
        replays,
    }
}

/// The rules of DESIGN §5 in the order `check` applies them; only the fuzzing identity's
/// signatures are valid.
fn expected_check(t: &Ticket, expect: &Expectation, signed_by_us: bool) -> Result<(), TicketError> {
    if t.first != expect.first {
        Err(TicketError::WrongFirst)
    } else if !signed_by_us {
        Err(TicketError::BadSignature)
    } else if t.second != expect.second {
        Err(TicketError::WrongSecond)
    } else if t.server != expect.server {
        Err(TicketError::WrongServer)
    } else if t.not_after <= expect.now {
        Err(TicketError::Expired)
    } else if u128::from(t.issued_at) > u128::from(expect.now) + u128::from(MAX_CLOCK_SKEW) {
        Err(TicketError::IssuedInFuture)
    } else if t.not_after.saturating_sub(t.issued_at) > expect.max_lifetime {
        Err(TicketError::LeaseTooLong)
    } else {
        Ok(())
    }
}

/// Feeds variants of `ticket` to a replay cache of `capacity` while the clock moves forward.
fn replay(
    ticket: &Ticket,
    capacity: usize,
    start: u64,
    steps: &[u8],
) -> Vec<Result<(), TicketError>> {
    let mut cache = ReplayCache::new(capacity);
    // Every nonce accepted so far, with the expiry of the last ticket that used it.
    let mut accepted: HashMap<[u8; 16], u64> = HashMap::new();
    let mut now = start;
    let mut outcomes = Vec::new();
    for step in steps.chunks(2) {
        let (tweak, advance) = (step[0], step.get(1).copied().unwrap_or(0));
        now = now.saturating_add(u64::from(advance));
        let mut variant = ticket.clone();
        variant.nonce[0] ^= tweak & 0x0f;
        variant.not_after = variant.not_after.saturating_add(u64::from(tweak >> 4));
        let outcome = cache.check_and_insert(&variant, now);
        match outcome {
            Ok(()) => {
                if let Some(expired) = accepted.insert(variant.nonce, variant.not_after) {
                    assert!(
                        now >= expired,
                        "nonce accepted again at {now}, before {expired}"
                    );
                }
                assert_eq!(
                    cache.check_and_insert(&variant, now),
                    Err(TicketError::Replayed)
                );
            }
            Err(TicketError::Replayed) => {
                assert!(
                    accepted.contains_key(&variant.nonce),
                    "a fresh nonce was refused"
                );
            }
            Err(TicketError::ReplayCacheFull) => assert_eq!(cache.len(), capacity),
            Err(e) => panic!("the replay cache answered {e:?}"),
        }
        assert!(
            cache.len() <= capacity,
            "{} entries in a cache of {capacity}",
            cache.len()
        );
        outcomes.push(outcome);
    }
    outcomes
}

/// Signs `ticket` with the fuzzing identity (as its first terminal) and checks that it passes an
/// expectation that matches it at `now`, and that XOR-ing `mask` (0 counts as 1) into its signing
/// byte `index` (modulo their length), or into the same byte of the signature, makes it fail.
pub fn signature_property(ticket: Ticket, now: u64, index: usize, mask: u8) {
    let identity = fuzz_identity();
    let ticket = Ticket {
        first: identity.id(),
        ..ticket
    };
    let signed = ticket.clone().sign(identity);
    let matching = Expectation {
        first: ticket.first,
        second: ticket.second,
        server: ticket.server,
        now,
        max_lifetime: ticket.not_after.saturating_sub(ticket.issued_at),
    };
    let expected = if ticket.not_after <= now {
        Err(TicketError::Expired)
    } else if u128::from(ticket.issued_at) > u128::from(now) + u128::from(MAX_CLOCK_SKEW) {
        Err(TicketError::IssuedInFuture)
    } else {
        Ok(())
    };
    assert_eq!(signed.check(&matching), expected, "a freshly signed ticket");

    let bytes = ticket.signing_bytes();
    let domain = bytes.len() - TICKET_FIELDS_LEN;
    assert_eq!(
        &bytes[domain..],
        &ticket_fields(&ticket)[..],
        "signing bytes changed layout"
    );
    let mask = mask.max(1);
    let index = index % bytes.len();
    let mut mutated = bytes.clone();
    mutated[index] ^= mask;
    assert!(
        !identity.id().verify(&mutated, &signed.signature.0),
        "signature still valid with signing byte {index} ^ {mask:#04x}"
    );
    // The same mutation made through the fields (the domain prefix has none) fails `check`, even
    // against an expectation that names the tampered fields.
    if index >= domain {
        let tampered = raw_ticket(&mutated[domain..]).ticket;
        let expect = Expectation {
            first: tampered.first,
            second: tampered.second,
            server: tampered.server,
            now: 0,
            max_lifetime: u64::MAX,
        };
        let tampered = SignedTicket {
            ticket: tampered,
            signature: signed.signature,
        };
        assert_eq!(tampered.check(&expect), Err(TicketError::BadSignature));
    }
    let mut forged = signed;
    forged.signature.0[index % 64] ^= mask;
    assert_eq!(forged.check(&matching), Err(TicketError::BadSignature));
}

/// A signed ticket from raw bytes in the order of [`Ticket::signing_bytes`]: first, second,
/// server, issued_at, not_after (both big-endian), nonce; then the signature. Missing bytes are
/// zero.
fn raw_ticket(bytes: &[u8]) -> SignedTicket {
    let mut input = Reader(bytes);
    let first = TerminalId::from_bytes(input.array());
    let second = TerminalId::from_bytes(input.array());
    let server = TerminalId::from_bytes(input.array());
    let issued_at = input.u64();
    let not_after = input.u64();
    let nonce = input.array();
    let signature = Signature(input.array());
    SignedTicket {
        ticket: Ticket {
            first,
            second,
            server,
            issued_at,
            not_after,
            nonce,
        },
        signature,
    }
}

fn ticket_fields(t: &Ticket) -> Vec<u8> {
    let mut out = Vec::with_capacity(TICKET_FIELDS_LEN);
    out.extend_from_slice(t.first.as_bytes());
    out.extend_from_slice(t.second.as_bytes());
    out.extend_from_slice(t.server.as_bytes());
    out.extend_from_slice(&t.issued_at.to_be_bytes());
    out.extend_from_slice(&t.not_after.to_be_bytes());
    out.extend_from_slice(&t.nonce);
    out
}

/// Whether `id` is a small-order key (the library refuses these as identities).
pub fn is_small_order(id: &TerminalId) -> bool {
    id.is_small_order()
}

/// An ID that differs from `id`.
fn other(id: TerminalId) -> TerminalId {
    let mut bytes = *id.as_bytes();
    bytes[0] ^= 1;
    TerminalId::from_bytes(bytes)
}

/// Reads fixed-size fields off the input; past its end every byte is zero.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}
