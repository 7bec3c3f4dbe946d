//! The wire format, pinned: one example of every message, encoded to the
//! exact bytes older peers expect, and decoded back from them.

#![allow(clippy::single_range_in_vec_init)]

use bytes::{Bytes, BytesMut};
use ferry_proto::message::{BatchFailure, BatchFile, Entry, EntryKind, FileMeta, Version};
use ferry_proto::{ChunkHash, Failure, FailureCode, FrameDecoder, Message, RangeSet, TransferId};

fn examples() -> Vec<Message> {
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
            versions: vec![
                Version { major: 1, minor: 0 },
                Version { major: 2, minor: 3 },
            ],
            caps: vec!["hash:blake3".into(), "lanes".into()],
            token: Bytes::from_static(b"tok"),
            agent: "ferry/1".into(),
            stall_ms: Some(2000),
        },
        Message::Welcome {
            version: Version { major: 1, minor: 2 },
            caps: vec!["lanes".into()],
            server: "s".into(),
            stall_ms: Some(30_000),
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
                mtime_ns: -1,
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
            algs: vec!["sha256".into(), "blake3".into()],
        },
        Message::Lane {
            id: TransferId([3; 16]),
        },
        Message::GetMeta {
            id: TransferId([2; 16]),
            meta,
        },
        Message::Offer {
            ranges: RangeSet::from_ranges([0..2, 5..6]),
            hashes: Bytes::from(vec![9u8; 96]),
            more: true,
        },
        Message::Agreed {
            ranges: RangeSet::from_ranges([0..2]),
        },
        Message::Data {
            index: 3,
            offset: 3072,
            tag: ChunkHash([4; 32]),
            payload: Bytes::from_static(b"payload"),
        },
        Message::Ack {
            ranges: RangeSet::from_ranges([1..4, 300..70000]),
        },
        Message::Reject { index: 2 },
        Message::Need {
            ranges: RangeSet::from_ranges([7..8]),
        },
        Message::Done {
            digest: ChunkHash([5; 32]),
        },
        Message::Complete {
            digest: ChunkHash([6; 32]),
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
        Message::BatchData {
            index: 2,
            payload: Bytes::from_static(b"small"),
        },
        Message::BatchCommit,
        Message::BatchResult {
            done: RangeSet::from_ranges([0..1]),
            failures: vec![BatchFailure {
                index: 1,
                failure: Failure {
                    code: FailureCode::Integrity,
                    message: "bad".into(),
                    retry_after_ms: Some(9),
                },
            }],
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
            index: 1,
            file: BatchFile {
                path: "x".into(),
                size: 3,
                mtime_ns: 9,
                mode: 0o600,
                digest: ChunkHash([1; 32]),
            },
            payload: Some(Bytes::from_static(b"abc")),
        },
        Message::Ping {
            nonce: 1,
            received: Some(1 << 40),
        },
        Message::Pong { nonce: 2 },
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The table as the encoder makes it now: shown when it differs, so a new
/// message's line can be added (and a changed one looked into).
fn table_now() -> String {
    examples()
        .iter()
        .map(|m| format!("    (\"{}\", \"{}\"),\n", m.name(), hex(&m.encode())))
        .collect()
}

/// Bytes the encoder produced before messages moved to one file per family.
const GOLDEN: &[(&str, &str)] = &[
    ("Hello", "000000310101038080040103838008020b686173683a626c616b653302056c616e65730303746f6b040766657272792f310502d00f"),
    ("Welcome", "0000001502010382800402056c616e65730301730403b0ea01"),
    ("Failure", "0000000d03010105020462757379030105"),
    ("Stat", "000000060a0103612f62"),
    ("StatReply", "000000130b01100101610201020301000401070502ed03"),
    ("List", "000000030c0100"),
    ("ListReply", "0000001f0d0119010161020101030109040affffffffffffffffff0105028003020101"),
    ("Mkdir", "0000000b0e0101640202c003030105"),
    ("Ok", "000000010f"),
    ("PutOpen", "0000003a140110010101010101010101010101010101010201660a01050b0afdffffffffffffffff010c02a4030d0280080e06626c616b65330f03737263"),
    ("GetOpen", "000000261501100202020202020202020202020202020202016603067368613235360306626c616b6533"),
    ("Lane", "000000131f011003030303030303030303030303030303"),
    ("GetMeta", "00000037160110020202020202020202020202020202020a01050b0afdffffffffffffffff010c02a4030d0280080e06626c616b65330f03737263"),
    ("Offer", "0000006c170104000205010260090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909030101"),
    ("Agreed", "000000051801020002"),
    ("Data", "0000003319010103020280180320040404040404040404040404040404040404040404040404040404040404040404077061796c6f6164"),
    ("Ack", "0000000a1a01070103ac02c4a004"),
    ("Reject", "000000041b010102"),
    ("Need", "000000051c01020701"),
    ("Done", "000000231d01200505050505050505050505050505050505050505050505050505050505050505"),
    ("Complete", "000000231e01200606060606060606060606060606060606060606060606060606060606060606"),
    ("BatchPut", "0000003d280106626c616b653302320103642f61020280200301070402a40305200808080808080808080808080808080808080808080808080808080808080808"),
    ("BatchNeed", "000000052901020003"),
    ("BatchData", "0000000b2a0101020205736d616c6c"),
    ("BatchCommit", "000000012b"),
    ("BatchResult", "000000152c01020001020e0101010201080303626164040109"),
    ("BatchGet", "000000392d0106736861323536022e01017802010003010004010005200000000000000000000000000000000000000000000000000000000000000000"),
    ("BatchItem", "0000003a2e010101022f01017802010303010904028003052001010101010101010101010101010101010101010101010101010101010101010303616263"),
    ("Ping", "0000000c800101010206808080808020"),
    ("Pong", "0000000481010102"),
];

#[test]
fn every_message_encodes_to_its_pinned_bytes_and_back() {
    let examples = examples();
    assert_eq!(
        examples.len(),
        GOLDEN.len(),
        "the table now:\n{}",
        table_now()
    );
    for (m, (name, want)) in examples.into_iter().zip(GOLDEN) {
        assert_eq!(m.name(), *name);
        let bytes = m.encode();
        assert_eq!(
            hex(&bytes),
            *want,
            "{name} encodes differently; the table now:\n{}",
            table_now()
        );
        let mut buf = BytesMut::from(&bytes[..]);
        let got = FrameDecoder::new().decode(&mut buf).unwrap();
        assert_eq!(got, Some(m), "{name} decodes differently");
        assert!(buf.is_empty(), "{name} left bytes behind");
    }
}

#[test]
fn every_kind_of_message_has_an_example() {
    let mut names: Vec<_> = examples().iter().map(Message::name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 30);
}
