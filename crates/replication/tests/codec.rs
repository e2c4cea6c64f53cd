//! The frame codec against every message and against hostile bytes:
//! round trips are exact, and anything that is not a valid frame is a
//! clean `FrameError` (never a panic, never a bogus message).

mod common;

use std::time::Duration;

use block_api::AlignedBuf;
use proptest::prelude::*;
use proptest::strategy::LazyJust;
use replication::frame::{
    FRAME_PAYLOAD_MAX, Frame, FrameError, FrameReader, FrameWriter, HEADER_LEN, MAGIC, Message,
    MessageRef, TRAILER_LEN, encode_frame,
};
use replication::{
    CHECKSUM_BLOCKS_MAX, ErrorCode, PROTOCOL_VERSION, READ_LEN_MAX, Request, Response,
};

const BLOCK: u64 = 4096;
/// Highest block index an offset may have while leaving room for the
/// longest range the strategies generate.
const OFFSET_BLOCKS_MAX: u64 = u64::MAX / BLOCK - (1 << 22);

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("test runtime")
        .block_on(f)
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..1024u64).prop_map(|b| b * BLOCK),
        (0..=OFFSET_BLOCKS_MAX).prop_map(|b| b * BLOCK),
    ]
}

/// 1 to 64 blocks (up to 256 KiB, past the inline limit) of seeded bytes.
fn data() -> impl Strategy<Value = AlignedBuf> {
    (1..=64usize, any::<u64>()).prop_map(|(blocks, seed)| common::pattern(blocks * 4096, seed))
}

fn request() -> impl Strategy<Value = Request> {
    let ids = || (any::<u64>(), any::<u64>(), any::<u64>());
    prop_oneof![
        (ids(), offset(), data(), any::<bool>()).prop_map(
            |((volume, slab, epoch), offset, data, fua)| {
                Request::Write {
                    volume,
                    slab,
                    epoch,
                    offset,
                    data,
                    fua,
                }
            }
        ),
        (ids(), offset(), 1..=READ_LEN_MAX / 4096).prop_map(
            |((volume, slab, epoch), offset, blocks)| {
                Request::Read {
                    volume,
                    slab,
                    epoch,
                    offset,
                    len: blocks * 4096,
                }
            }
        ),
        (ids(), offset(), 1..=(1u64 << 22)).prop_map(|((volume, slab, epoch), offset, blocks)| {
            Request::WriteZeroes {
                volume,
                slab,
                epoch,
                offset,
                len: blocks * BLOCK,
            }
        }),
        (ids(), offset(), 1..=(1u64 << 22)).prop_map(|((volume, slab, epoch), offset, blocks)| {
            Request::Trim {
                volume,
                slab,
                epoch,
                offset,
                len: blocks * BLOCK,
            }
        }),
        LazyJust::new(|| Request::Flush),
        ids().prop_map(|(volume, slab, epoch)| Request::Allocate {
            volume,
            slab,
            epoch
        }),
        (ids(), offset(), 1..=CHECKSUM_BLOCKS_MAX).prop_map(
            |((volume, slab, epoch), offset, blocks)| {
                Request::Checksums {
                    volume,
                    slab,
                    epoch,
                    offset,
                    blocks,
                }
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(volume, slab)| Request::Release { volume, slab }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        any::<u64>().prop_map(|current| ErrorCode::StaleEpoch { current }),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Io),
        Just(ErrorCode::Checksum),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Busy),
        Just(ErrorCode::ShuttingDown),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        LazyJust::new(|| Response::Ok),
        data().prop_map(Response::Data),
        (any::<u32>(), any::<u64>())
            .prop_map(|(disk, extent)| Response::Allocated { disk, extent }),
        prop::collection::vec(any::<u64>(), 1..300).prop_map(Response::Checksums),
        (error_code(), ".{0,200}").prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        request().prop_map(Message::Request),
        response().prop_map(Message::Response),
    ]
}

fn as_ref(m: &Message) -> MessageRef<'_> {
    match m {
        Message::Request(r) => MessageRef::Request(r),
        Message::Response(r) => MessageRef::Response(r),
    }
}

/// A comparable form: the debug text (every field but data bytes) and the
/// data bytes.
fn plain(m: &Message) -> (String, Vec<u8>) {
    let data = match m {
        Message::Request(Request::Write { data, .. }) | Message::Response(Response::Data(data)) => {
            data.as_slice().to_vec()
        }
        _ => Vec::new(),
    };
    (format!("{m:?}"), data)
}

/// Every frame in `bytes`, or the first error.
async fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut reader = FrameReader::new(bytes);
    let mut frames = Vec::new();
    while let Some(f) = reader.read_frame(Duration::from_secs(5)).await? {
        frames.push(f);
    }
    Ok(frames)
}

/// Frames written through `FrameWriter` (the I/O path) into memory.
async fn write_all(frames: &[(u64, Message)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = FrameWriter::new(&mut out);
    for (id, m) in frames {
        w.write(*id, as_ref(m))
            .await
            .expect("encode a valid message");
    }
    w.flush().await.expect("flush into memory");
    drop(w);
    out
}

fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// A header with valid magic, version and header CRC around any kind,
/// flags and length: gets past the first checks to the deeper ones.
fn forged_header(kind: u8, flags: u8, request_id: u64, payload_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6] = kind;
    h[7] = flags;
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h[16..20].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_exactly(id in any::<u64>(), m in message()) {
        let sent = [(id, m)];
        let bytes = block_on(write_all(&sent));
        let frames = block_on(decode_all(&bytes))
            .map_err(|e| TestCaseError::fail(format!("decode failed: {e}")))?;
        prop_assert_eq!(frames.len(), 1, "one frame written, {} read", frames.len());
        prop_assert_eq!(frames[0].request_id, id, "request id changed");
        prop_assert_eq!(plain(&frames[0].message), plain(&sent[0].1), "message changed in transit");
    }

    #[test]
    fn streams_of_messages_round_trip_in_order(
        msgs in prop::collection::vec((any::<u64>(), message()), 1..8)
    ) {
        let bytes = block_on(write_all(&msgs));
        let frames = block_on(decode_all(&bytes)).map_err(|e| TestCaseError::fail(format!("decode failed: {e}")))?;
        prop_assert_eq!(frames.len(), msgs.len(), "frame count changed");
        for ((id, sent), got) in msgs.iter().zip(&frames) {
            prop_assert_eq!(got.request_id, *id, "request id changed");
            prop_assert_eq!(plain(&got.message), plain(sent), "message changed in transit");
        }
    }

    #[test]
    fn writer_and_one_shot_encoder_produce_the_same_bytes(id in any::<u64>(), m in message()) {
        let one_shot = encode_frame(id, as_ref(&m)).expect("encode a valid message");
        let streamed = block_on(write_all(&[(id, m)]));
        prop_assert!(one_shot == streamed, "FrameWriter and encode_frame disagree");
    }

    #[test]
    fn random_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let result = block_on(decode_all(&bytes));
        if bytes.is_empty() {
            prop_assert!(matches!(result, Ok(ref f) if f.is_empty()), "empty input: {result:?}");
        } else {
            prop_assert!(result.is_err(), "random bytes decoded as frames: {result:?}");
        }
    }

    #[test]
    fn truncated_frames_are_refused_as_truncated(id in any::<u64>(), m in message(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_frame(id, as_ref(&m)).expect("encode a valid message");
        let cut = 1 + cut.index(bytes.len() - 1); // 1..len: inside the frame
        let result = block_on(decode_all(&bytes[..cut]));
        prop_assert!(
            matches!(result, Err(FrameError::Truncated { .. })),
            "frame of {} bytes cut at {cut}: {result:?}", bytes.len()
        );
    }

    #[test]
    fn any_single_bit_flip_is_detected(id in any::<u64>(), m in message(), bit in any::<prop::sample::Index>()) {
        let mut bytes = encode_frame(id, as_ref(&m)).expect("encode a valid message");
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let result = block_on(decode_all(&bytes));
        prop_assert!(result.is_err(), "flipping bit {bit} went unnoticed: {result:?}");
    }

    #[test]
    fn damaged_frames_never_panic(
        id in any::<u64>(),
        m in message(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let mut bytes = encode_frame(id, as_ref(&m)).expect("encode a valid message");
        for (at, byte) in damage {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        // Whatever it decodes to, it returns.
        let _ = block_on(decode_all(&bytes));
    }

    #[test]
    fn forged_headers_with_random_bodies_are_checked_field_by_field(
        kind in prop_oneof![
            3 => prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 8, 0x81, 0x83, 0x84, 0x85]),
            1 => any::<u8>(),
        ],
        flags in prop_oneof![Just(0u8), Just(1u8), any::<u8>()],
        id in any::<u64>(),
        body in prop_oneof![
            // The fixed body sizes, an error with a message, a checksum list.
            3 => prop::sample::select(vec![0usize, 12, 16, 24, 36, 40])
                .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
            1 => prop::collection::vec(any::<u8>(), 9..60),
            1 => (1..20usize).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n * 8)),
            1 => prop::collection::vec(any::<u8>(), 0..200),
        ],
        valid_crc in prop_oneof![3 => Just(true), 1 => Just(false)],
    ) {
        let header = forged_header(kind, flags, id, body.len() as u32);
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&body);
        let crc = if valid_crc { crc32c(&bytes) } else { crc32c(&bytes) ^ 1 };
        bytes.extend_from_slice(&crc.to_le_bytes());
        match block_on(decode_all(&bytes)) {
            Err(_) => {}
            Ok(frames) => {
                // Only a well-formed frame with its own CRC may decode, and
                // what it decodes to re-encodes to the same bytes.
                prop_assert!(valid_crc, "a frame with a bad CRC decoded");
                prop_assert_eq!(frames.len(), 1);
                let again = encode_frame(id, as_ref(&frames[0].message)).expect("re-encode");
                prop_assert!(again == bytes, "decoded {:?} re-encodes differently", frames[0].message);
            }
        }
    }

    #[test]
    fn oversized_lengths_are_refused_from_the_header_alone(
        kind in any::<u8>(),
        len in (FRAME_PAYLOAD_MAX + 1)..=u32::MAX,
    ) {
        let header = forged_header(kind, 0, 1, len);
        let result = block_on(decode_all(&header));
        prop_assert!(
            matches!(result, Err(FrameError::TooLarge { .. } | FrameError::UnknownKind(_))),
            "a {len}-byte payload was not refused before reading: {result:?}"
        );
    }
}

#[test]
fn largest_write_and_read_reply_round_trip() {
    let data = common::pattern(replication::WRITE_DATA_MAX, 42);
    let expected = data.as_slice().to_vec();
    let msgs = [
        (
            1,
            Message::Request(Request::Write {
                volume: 1,
                slab: 2,
                epoch: 3,
                offset: 0,
                data,
                fua: true,
            }),
        ),
        (
            2,
            Message::Response(Response::Data(AlignedBuf::from_slice(&expected))),
        ),
        (
            3,
            Message::Response(Response::Checksums(vec![7; CHECKSUM_BLOCKS_MAX as usize])),
        ),
    ];
    let bytes = block_on(write_all(&msgs));
    let frames = block_on(decode_all(&bytes)).expect("decode the largest frames");
    assert_eq!(frames.len(), 3);
    for ((_, sent), got) in msgs.iter().zip(&frames) {
        assert!(
            plain(sent) == plain(&got.message),
            "a largest-size {} frame changed in transit",
            sent_name(sent)
        );
    }
    assert!(
        bytes.len() > TRAILER_LEN,
        "frames were written through FrameWriter"
    );
}

fn sent_name(m: &Message) -> &'static str {
    match m {
        Message::Request(r) => r.name(),
        Message::Response(r) => r.name(),
    }
}

#[test]
fn a_write_one_block_over_the_limit_is_not_encoded() {
    let req = Request::Write {
        volume: 1,
        slab: 1,
        epoch: 1,
        offset: 0,
        data: AlignedBuf::zeroed(replication::WRITE_DATA_MAX + 2 * 4096),
        fua: false,
    };
    assert!(
        encode_frame(1, MessageRef::Request(&req)).is_err(),
        "an over-limit Write was encoded"
    );
}
