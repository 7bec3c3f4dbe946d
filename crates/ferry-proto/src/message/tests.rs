#![allow(clippy::single_range_in_vec_init)]

#[test]
fn a_limit_refuses_large_frames_from_their_header_alone() {
    let mut dec = super::FrameDecoder::new();
    dec.set_limit(Some(super::MAX_UNAUTHENTICATED_FRAME));
    // A Data frame header announcing 8 MiB: refused before the body arrives.
    let mut buf = bytes::BytesMut::new();
    buf.extend_from_slice(&(8u32 << 20).to_be_bytes());
    buf.extend_from_slice(&[super::kind::DATA]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(super::DecodeError::TooLarge { .. })
    ));
    dec.set_limit(None);
    assert!(matches!(dec.decode(&mut buf), Ok(None)));
}

use super::*;
use proptest::prelude::*;

fn samples() -> Vec<Message> {
    let meta = FileMeta {
        size: 5,
        mtime_ns: -3,
        mode: 0o644,
        chunk_size: 1024,
        alg: "blake3".into(),
        source_id: Bytes::from_static(b"src"),
    };
    vec![
        Message::Hello {
            versions: vec![Version { major: 1, minor: 0 }],
            caps: vec!["hash:blake3".into()],
            token: Bytes::from_static(b"t"),
            agent: "x".into(),
            stall_ms: Some(2000),
        },
        Message::Hello {
            versions: vec![],
            caps: vec![],
            token: Bytes::new(),
            agent: String::new(),
            stall_ms: None,
        },
        Message::Welcome {
            version: Version { major: 1, minor: 2 },
            caps: vec![],
            server: "s".into(),
            stall_ms: Some(30_000),
        },
        Message::Welcome {
            version: Version { major: 1, minor: 0 },
            caps: vec![],
            server: String::new(),
            stall_ms: None,
        },
        Message::Failure(Failure {
            code: FailureCode::Busy,
            message: "busy".into(),
            retry_after_ms: Some(5),
        }),
        Message::Stat { path: "a/b".into() },
        Message::StatReply {
            entry: Entry {
                path: "a".into(),
                kind: EntryKind::Dir,
                size: 0,
                mtime_ns: 7,
                mode: 0o755,
            },
        },
        Message::List { path: "".into() },
        Message::ListReply {
            entries: vec![Entry {
                path: "a".into(),
                kind: EntryKind::File,
                size: 9,
                mtime_ns: 1,
                mode: 0o600,
            }],
            more: true,
        },
        Message::Mkdir {
            path: "d".into(),
            mode: 0o700,
            mtime_ns: 5,
        },
        Message::Ok,
        Message::PutOpen {
            id: TransferId([1; 16]),
            path: "f".into(),
            meta: meta.clone(),
        },
        Message::GetOpen {
            id: TransferId([2; 16]),
            path: "f".into(),
            algs: vec!["sha256".into()],
        },
        Message::GetMeta {
            id: TransferId([2; 16]),
            meta,
        },
        Message::Lane {
            id: TransferId([3; 16]),
        },
        Message::Offer {
            ranges: RangeSet::from_ranges([0..2, 5..6]),
            hashes: Bytes::from(vec![9u8; 96]),
            more: false,
        },
        Message::Agreed {
            ranges: RangeSet::from_ranges([0..2]),
        },
        Message::BatchPut {
            alg: "blake3".into(),
            files: vec![BatchFile {
                path: "d/a".into(),
                size: 4096,
                mtime_ns: 7,
                mode: 0o644,
                digest: ChunkHash([8; 32]),
            }],
        },
        Message::BatchNeed {
            indexes: RangeSet::from_ranges([0..3]),
        },
        Message::BatchGet {
            alg: "sha256".into(),
            files: vec![BatchFile {
                path: "x".into(),
                size: 0,
                mtime_ns: 0,
                mode: 0,
                digest: ChunkHash([0; 32]),
            }],
        },
        Message::BatchItem {
            index: 0,
            file: BatchFile {
                path: "x".into(),
                size: 3,
                mtime_ns: 9,
                mode: 0o600,
                digest: ChunkHash([1; 32]),
            },
            payload: Some(Bytes::from_static(b"abc")),
        },
        Message::BatchItem {
            index: 1,
            file: BatchFile {
                path: "y".into(),
                size: 3,
                mtime_ns: 9,
                mode: 0o600,
                digest: ChunkHash([1; 32]),
            },
            payload: None,
        },
        Message::BatchData {
            index: 2,
            payload: Bytes::from_static(b"small"),
        },
        Message::BatchCommit,
        Message::BatchResult {
            done: RangeSet::from_ranges([0..1]),
            failures: vec![BatchFailure {
                index: 1,
                failure: Failure::new(FailureCode::Integrity, "bad"),
            }],
        },
        Message::Data {
            index: 3,
            offset: 3072,
            tag: ChunkHash([4; 32]),
            payload: Bytes::from_static(b"payload"),
        },
        Message::Ack {
            ranges: RangeSet::from_ranges([1..4]),
        },
        Message::Reject { index: 2 },
        Message::Need {
            ranges: RangeSet::new(),
        },
        Message::Done {
            digest: ChunkHash([5; 32]),
        },
        Message::Complete {
            digest: ChunkHash([6; 32]),
        },
        Message::Ping {
            nonce: 1,
            received: None,
        },
        Message::Ping {
            nonce: 2,
            received: Some(u64::MAX),
        },
        Message::Pong { nonce: 2 },
    ]
}

#[test]
fn roundtrip_every_message() {
    let mut dec = FrameDecoder::new();
    for m in samples() {
        let mut buf = BytesMut::from(&m.encode()[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(m.clone()),
            "{}",
            m.name()
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn incomplete_then_complete() {
    let frame = Message::Reject { index: 42 }.encode();
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    for (i, b) in frame.iter().enumerate() {
        buf.put_u8(*b);
        let got = dec.decode(&mut buf).unwrap();
        assert_eq!(got.is_some(), i == frame.len() - 1);
    }
}

#[test]
fn oversized_frames_are_refused_before_buffering() {
    let mut buf = BytesMut::new();
    buf.put_u32(MAX_FRAME + 1);
    buf.put_u8(25);
    assert!(matches!(
        FrameDecoder::new().decode(&mut buf),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut buf = BytesMut::new();
    buf.put_u32(MAX_CONTROL_FRAME + 100);
    buf.put_u8(1);
    assert!(matches!(
        FrameDecoder::new().decode(&mut buf),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn optional_unknown_frames_are_skipped_required_are_refused() {
    let mut buf = BytesMut::new();
    buf.put_u32(3);
    buf.put_u8(0xF0);
    buf.put_slice(b"zz");
    buf.extend_from_slice(&Message::Ok.encode());
    assert_eq!(
        FrameDecoder::new().decode(&mut buf).unwrap(),
        Some(Message::Ok)
    );
    let mut buf = BytesMut::new();
    buf.put_u32(1);
    buf.put_u8(0x70);
    assert_eq!(
        FrameDecoder::new().decode(&mut buf),
        Err(DecodeError::UnknownFrame(0x70))
    );
}

#[test]
fn offer_hash_count_must_match() {
    let m = Message::Offer {
        ranges: RangeSet::from_ranges([0..2]),
        hashes: Bytes::from(vec![0u8; 32]),
        more: false,
    };
    assert!(FrameDecoder::new()
        .decode(&mut BytesMut::from(&m.encode()[..]))
        .is_err());
}

proptest! {
    #[test]
    fn data_header_agrees_with_decode(
        index: u32,
        offset: u64,
        tag: [u8; 32],
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        cut in 0usize..200,
    ) {
        let tag = ChunkHash(tag);
        let mut frame = encode_data_header(index, offset, &tag, payload.len());
        let head_len = frame.len();
        frame.extend_from_slice(&payload);
        let dec = FrameDecoder::new();
        let h = dec.data_header(&frame).expect("a whole header");
        prop_assert_eq!((h.index, h.offset, h.tag), (index, offset, tag));
        prop_assert_eq!((h.payload_start, h.payload_len), (head_len, payload.len()));
        prop_assert_eq!(&frame[h.payload_start..], &payload[..]);
        // A header not yet whole gives nothing; bytes of payload missing do not matter.
        let part = dec.data_header(&frame[..cut.min(frame.len())]);
        prop_assert_eq!(part.is_some(), cut >= head_len);
        let mut buf = frame.clone();
        let m = FrameDecoder::new().decode(&mut buf).unwrap();
        prop_assert_eq!(m, Some(Message::Data { index, offset, tag, payload: Bytes::from(payload) }));
    }

    #[test]
    fn data_header_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = FrameDecoder::new().data_header(&data);
    }
}

/// The header of an 8 MiB chunk holds the header, not room for the chunk:
/// reserving it cost an mmap and a munmap per chunk sent.
#[test]
fn a_data_header_does_not_reserve_its_payload() {
    let head = encode_data_header(7, 8 << 20, &ChunkHash([1; 32]), 8 << 20);
    assert!(head.len() < 64, "{}", head.len());
    assert!(head.capacity() < 4096, "{}", head.capacity());
}

#[test]
fn data_header_leaves_a_payload_that_is_not_last_to_decode() {
    let tag = ChunkHash([7; 32]);
    let mut w = FieldWriter::new();
    w.u64(1, 3)
        .u64(2, 4096)
        .bytes(3, &tag.0)
        .bytes(4, b"abcd")
        .u64(9, 1);
    let body = w.finish();
    let mut frame = BytesMut::new();
    frame.put_u32(1 + body.len() as u32);
    frame.put_u8(kind::DATA);
    frame.extend_from_slice(&body);
    assert_eq!(FrameDecoder::new().data_header(&frame), None);
    let m = FrameDecoder::new().decode(&mut frame).unwrap();
    assert!(matches!(m, Some(Message::Data { index: 3, .. })));
    // Bounded like decode: over the limit before authentication, nothing.
    let mut limited = FrameDecoder::new();
    limited.set_limit(Some(16));
    let big = encode_data_header(1, 0, &tag, 100);
    assert_eq!(limited.data_header(&big), None);
}

proptest! {
    #[test]
    fn decoder_never_panics(data: Vec<u8>) {
        let mut buf = BytesMut::from(&data[..]);
        let mut dec = FrameDecoder::new();
        for _ in 0..16 {
            match dec.decode(&mut buf) { Ok(Some(_)) => {}, _ => break }
        }
    }

    #[test]
    fn mutated_frames_never_panic(idx in 0usize..22, pos: usize, byte: u8) {
        let m = &samples()[idx];
        let mut v = m.encode().to_vec();
        let p = pos % v.len();
        v[p] = byte;
        let mut buf = BytesMut::from(&v[..]);
        let _ = FrameDecoder::new().decode(&mut buf);
    }
}
