#![allow(clippy::single_range_in_vec_init)]

#[test]
fn a_limit_refuses_large_frames_from_their_header_alone() {
    let mut dec = super::FrameDecoder::new();
    dec.set_limit(Some(super::MAX_UNAUTHENTICATED_FRAME));
    // A Data frame header announcing 8 MiB: refused before the body arrives.
    let mut buf = bytes::BytesMut::new();
    buf.extend_from_slice(&(8u32 << 20).to_be_bytes());
    buf.extend_from_slice(&[super::kind::Data]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(super::DecodeError::TooLarge { .. })
    ));
    dec.set_limit(None);
    assert!(matches!(dec.decode(&mut buf), Ok(None)));
}

use super::*;
use bytes::BufMut;
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
    frame.put_u8(kind::Data);
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

/// Field values a generated message is built from.
#[derive(Debug, Clone)]
struct Fields {
    small: u32,
    big: u64,
    signed: i64,
    flag: bool,
    text: String,
    blob: Vec<u8>,
    hash: [u8; 32],
    ranges: Vec<(u32, u32)>,
    maybe: Option<u64>,
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<i64>(),
        any::<bool>(),
        "\\PC{0,8}",
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<[u8; 32]>(),
        proptest::collection::vec((0u32..1 << 20, 1u32..64), 0..8),
        any::<Option<u64>>(),
    )
        .prop_map(
            |(small, big, signed, flag, text, blob, hash, ranges, maybe)| Fields {
                small,
                big,
                signed,
                flag,
                text,
                blob,
                hash,
                ranges,
                maybe,
            },
        )
}

/// One message of every variant, its fields drawn from `f` (within bounds).
fn every_variant(f: &Fields) -> Vec<Message> {
    let ranges = RangeSet::from_ranges(f.ranges.iter().map(|&(s, n)| s..s + n));
    let blob = Bytes::from(f.blob.clone());
    let meta = FileMeta {
        size: f.big,
        mtime_ns: f.signed,
        mode: f.small,
        chunk_size: f.small,
        alg: f.text.clone(),
        source_id: blob.clone(),
    };
    let version = Version {
        major: f.small as u16,
        minor: (f.small >> 16) as u16,
    };
    let entry = Entry {
        path: f.text.clone(),
        kind: [EntryKind::Missing, EntryKind::File, EntryKind::Dir][f.small as usize % 3],
        size: f.big,
        mtime_ns: f.signed,
        mode: f.small,
    };
    let file = BatchFile {
        path: f.text.clone(),
        size: f.big % (MAX_BATCH_FILE + 1),
        mtime_ns: f.signed,
        mode: f.small,
        digest: ChunkHash(f.hash),
    };
    let failure = Failure {
        code: FailureCode::from_u64(f.big),
        message: f.text.clone(),
        retry_after_ms: f.maybe,
    };
    let id = TransferId(f.hash[..16].try_into().unwrap());
    let texts = vec![f.text.clone(); f.blob.len() % 4];
    vec![
        Message::Hello {
            versions: vec![version; f.blob.len() % 3],
            caps: texts.clone(),
            token: blob.clone(),
            agent: f.text.clone(),
            stall_ms: f.maybe,
        },
        Message::Welcome {
            version,
            caps: texts.clone(),
            server: f.text.clone(),
            stall_ms: f.maybe,
        },
        Message::Failure(failure.clone()),
        Message::Stat {
            path: f.text.clone(),
        },
        Message::StatReply {
            entry: entry.clone(),
        },
        Message::List {
            path: f.text.clone(),
        },
        Message::ListReply {
            entries: vec![entry; f.blob.len() % 3],
            more: f.flag,
        },
        Message::Mkdir {
            path: f.text.clone(),
            mode: f.small,
            mtime_ns: f.signed,
        },
        Message::Ok,
        Message::PutOpen {
            id,
            path: f.text.clone(),
            meta: meta.clone(),
        },
        Message::GetOpen {
            id,
            path: f.text.clone(),
            algs: texts.clone(),
        },
        Message::GetMeta { id, meta },
        Message::Offer {
            ranges: ranges.clone(),
            hashes: Bytes::from(vec![f.hash[0]; 32 * ranges.count() as usize]),
            more: f.flag,
        },
        Message::Agreed {
            ranges: ranges.clone(),
        },
        Message::Data {
            index: f.small,
            offset: f.big,
            tag: ChunkHash(f.hash),
            payload: blob.clone(),
        },
        Message::Ack {
            ranges: ranges.clone(),
        },
        Message::Reject { index: f.small },
        Message::Need {
            ranges: ranges.clone(),
        },
        Message::Done {
            digest: ChunkHash(f.hash),
        },
        Message::Complete {
            digest: ChunkHash(f.hash),
        },
        Message::Lane { id },
        Message::BatchPut {
            alg: f.text.clone(),
            files: vec![file.clone(); f.blob.len() % 3],
        },
        Message::BatchNeed {
            indexes: ranges.clone(),
        },
        Message::BatchData {
            index: f.small,
            payload: blob.clone(),
        },
        Message::BatchCommit,
        Message::BatchResult {
            done: ranges,
            failures: vec![
                BatchFailure {
                    index: f.small,
                    failure
                };
                f.blob.len() % 3
            ],
        },
        Message::BatchGet {
            alg: f.text.clone(),
            files: vec![file.clone(); f.blob.len() % 3],
        },
        Message::BatchItem {
            index: f.small,
            file,
            payload: f.flag.then_some(blob),
        },
        Message::Ping {
            nonce: f.big,
            received: f.maybe,
        },
        Message::Pong { nonce: f.big },
    ]
}

fn table_tag(name: &str) -> u8 {
    kind::ALL
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(tag, _, _)| *tag)
        .unwrap_or_else(|| panic!("{name} is not in the table"))
}

proptest! {
    #[test]
    fn every_message_in_the_table_round_trips(f in fields()) {
        for m in every_variant(&f) {
            let frame = m.encode();
            prop_assert_eq!(frame[4], table_tag(m.name()), "{}", m.name());
            let mut buf = BytesMut::from(&frame[..]);
            let got = FrameDecoder::new().decode(&mut buf);
            prop_assert_eq!(got, Ok(Some(m.clone())), "{}", m.name());
            prop_assert!(buf.is_empty(), "{}", m.name());
        }
    }
}

#[test]
fn the_generated_messages_cover_the_table() {
    let f = Fields {
        small: 1,
        big: 2,
        signed: -3,
        flag: true,
        text: "x".into(),
        blob: vec![1],
        hash: [4; 32],
        ranges: vec![(0, 2)],
        maybe: None,
    };
    let mut generated: Vec<_> = every_variant(&f).iter().map(Message::name).collect();
    let mut table: Vec<_> = kind::ALL.iter().map(|(_, name, _)| *name).collect();
    generated.sort_unstable();
    table.sort_unstable();
    assert_eq!(generated, table);
}

#[test]
fn frame_types_in_the_table_are_unique_and_optional_ones_have_the_high_bit() {
    let mut tags: Vec<u8> = kind::ALL.iter().map(|(tag, _, _)| *tag).collect();
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), kind::ALL.len());
    for (tag, name, optional) in kind::ALL {
        assert_eq!(*optional, *tag >= 0x80, "{name}");
        assert!(Message::body_decoder(*tag).is_some(), "{name}");
    }
}

/// The `what` of the `TooLarge` that decoding `m` fails with.
fn refused_as(m: &Message) -> &'static str {
    let mut buf = BytesMut::from(&m.encode()[..]);
    match FrameDecoder::new().decode(&mut buf) {
        Err(DecodeError::TooLarge { what, .. }) => what,
        other => panic!("{} was not refused as too large: {other:?}", m.name()),
    }
}

fn decodes(m: &Message) -> bool {
    let mut buf = BytesMut::from(&m.encode()[..]);
    FrameDecoder::new().decode(&mut buf) == Ok(Some(m.clone()))
}

#[test]
fn a_string_over_its_bound_is_refused() {
    let at = |n| Message::Stat {
        path: "a".repeat(n),
    };
    assert!(decodes(&at(MAX_PATH)));
    assert_eq!(refused_as(&at(MAX_PATH + 1)), "string");
}

#[test]
fn a_byte_field_over_its_bound_is_refused() {
    let hello = |n| Message::Hello {
        versions: vec![],
        caps: vec![],
        token: Bytes::from(vec![7; n]),
        agent: String::new(),
        stall_ms: None,
    };
    assert!(decodes(&hello(MAX_TOKEN)));
    assert_eq!(refused_as(&hello(MAX_TOKEN + 1)), "token");
    let put = |n| Message::PutOpen {
        id: TransferId([1; 16]),
        path: "f".into(),
        meta: FileMeta {
            size: 1,
            mtime_ns: 0,
            mode: 0,
            chunk_size: 1024,
            alg: "blake3".into(),
            source_id: Bytes::from(vec![1; n]),
        },
    };
    assert!(decodes(&put(64)));
    assert_eq!(refused_as(&put(65)), "source id");
    let data = |n: u64| Message::BatchData {
        index: 0,
        payload: Bytes::from(vec![0; n as usize]),
    };
    assert!(decodes(&data(MAX_BATCH_FILE)));
    assert_eq!(refused_as(&data(MAX_BATCH_FILE + 1)), "batch file");
}

#[test]
fn a_list_over_its_bound_is_refused() {
    let entry = Entry {
        path: "a".into(),
        kind: EntryKind::File,
        size: 1,
        mtime_ns: 0,
        mode: 0,
    };
    let page = |n| Message::ListReply {
        entries: vec![entry.clone(); n],
        more: false,
    };
    assert!(decodes(&page(MAX_LIST_ENTRIES)));
    assert_eq!(refused_as(&page(MAX_LIST_ENTRIES + 1)), "list page");
    let file = BatchFile {
        path: "a".into(),
        size: 1,
        mtime_ns: 0,
        mode: 0,
        digest: ChunkHash([0; 32]),
    };
    let put = |n| Message::BatchPut {
        alg: "blake3".into(),
        files: vec![file.clone(); n],
    };
    assert!(decodes(&put(MAX_BATCH_FILES)));
    assert_eq!(refused_as(&put(MAX_BATCH_FILES + 1)), "batch");
    let result = |n| Message::BatchResult {
        done: RangeSet::new(),
        failures: vec![
            BatchFailure {
                index: 0,
                failure: Failure::new(FailureCode::Io, "x"),
            };
            n
        ],
    };
    assert!(decodes(&result(MAX_BATCH_FILES)));
    assert_eq!(refused_as(&result(MAX_BATCH_FILES + 1)), "batch result");
}

#[test]
fn a_range_set_over_its_bound_is_refused() {
    let ack = |n: u32| Message::Ack {
        ranges: RangeSet::from_ranges((0..n).map(|i| 2 * i..2 * i + 1)),
    };
    assert!(decodes(&ack(MAX_RANGES as u32)));
    assert_eq!(refused_as(&ack(MAX_RANGES as u32 + 1)), "range set");
}

#[test]
fn a_count_over_its_bound_is_refused() {
    let offer = |n: u32| Message::Offer {
        ranges: RangeSet::full(n),
        hashes: Bytes::from(vec![0; 32 * n as usize]),
        more: false,
    };
    assert!(decodes(&offer(MAX_OFFER_CHUNKS)));
    assert_eq!(refused_as(&offer(MAX_OFFER_CHUNKS + 1)), "offer");
    let item = |size| Message::BatchItem {
        index: 0,
        file: BatchFile {
            path: "a".into(),
            size,
            mtime_ns: 0,
            mode: 0,
            digest: ChunkHash([0; 32]),
        },
        payload: None,
    };
    assert!(decodes(&item(MAX_BATCH_FILE)));
    assert_eq!(refused_as(&item(MAX_BATCH_FILE + 1)), "batch file");
}

#[test]
fn a_control_body_over_its_bound_is_refused_and_a_data_body_is_not() {
    let body = Bytes::from(vec![0; MAX_CONTROL_FRAME as usize + 1]);
    assert!(matches!(
        Message::decode(kind::Stat, body.clone()),
        Err(DecodeError::TooLarge {
            what: "control frame",
            ..
        })
    ));
    let data = Message::Data {
        index: 0,
        offset: 0,
        tag: ChunkHash([0; 32]),
        payload: body,
    };
    let frame = data.encode();
    assert_eq!(
        Message::decode(kind::Data, frame.slice(5..)),
        Ok(Some(data))
    );
}
