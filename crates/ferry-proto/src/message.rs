//! Messages and their framing.
//!
//! A frame is `len: u32 big-endian | type: u8 | body`, where `len` counts the
//! type byte and the body. The body is a field sequence ([`crate::wire`]), so
//! fields can be added without breaking older peers. Frame types with the high
//! bit set (`0x80..`) are optional: a peer that does not know one skips it.
//! Unknown types below `0x80` close the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::chunk::MAX_CHUNK;
use crate::failure::MAX_TEXT;
pub use crate::failure::{Failure, FailureCode};
use crate::hash::{ChunkHash, TransferId};
use crate::ranges::RangeSet;
use crate::wire::{
    as_array, as_string, as_u32, as_u64, get_varint, put_varint, DecodeError, FieldReader,
    FieldWriter,
};

/// Largest frame (type byte and body) accepted: a full chunk plus headroom.
pub const MAX_FRAME: u32 = MAX_CHUNK + 64 * 1024;
/// Largest non-data frame.
pub const MAX_CONTROL_FRAME: u32 = 1024 * 1024;
/// Longest path, in bytes, that a peer may send.
pub const MAX_PATH: usize = 4096;
/// Longest token a `Hello` may carry.
pub const MAX_TOKEN: usize = 1024;
/// Most chunk entries in one `Offer` frame.
pub const MAX_OFFER_CHUNKS: u32 = 16 * 1024;
/// Most ranges in one range-set field.
pub const MAX_RANGES: usize = 64 * 1024;
/// Most entries in one `ListReply` frame.
pub const MAX_LIST_ENTRIES: usize = 1024;
/// Files in one small-file batch.
pub const MAX_BATCH_FILES: usize = 1024;
/// Largest file sent whole inside a batch (one chunk of the smallest size).
pub const MAX_BATCH_FILE: u64 = 256 * 1024;
/// Most versions or capabilities a hello may carry.
const MAX_LIST: usize = 64;

/// A protocol version; peers must share the major number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    fn to_u64(self) -> u64 {
        (u64::from(self.major) << 16) | u64::from(self.minor)
    }
    fn from_u64(v: u64) -> Result<Self, DecodeError> {
        if v > u64::from(u32::MAX) {
            return Err(DecodeError::Malformed("version out of range"));
        }
        Ok(Version {
            major: (v >> 16) as u16,
            minor: v as u16,
        })
    }
}

/// What kind of thing a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Missing,
    File,
    Dir,
}

impl EntryKind {
    fn to_u64(self) -> u64 {
        match self {
            EntryKind::Missing => 0,
            EntryKind::File => 1,
            EntryKind::Dir => 2,
        }
    }
    fn from_u64(v: u64) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(EntryKind::Missing),
            1 => Ok(EntryKind::File),
            2 => Ok(EntryKind::Dir),
            _ => Err(DecodeError::Malformed("unknown entry kind")),
        }
    }
}

/// Metadata of one file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the request's base, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
}

/// What the sender says about the file it is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub chunk_size: u32,
    pub alg: String,
    /// Opaque identity of the source version (size, mtime, ctime, inode); a
    /// different value means the source changed and any partial is discarded.
    pub source_id: Bytes,
}

/// One small file announced in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    /// The whole-file digest (see `hash::small_file_digest`).
    pub digest: ChunkHash,
}

/// Why one file of a batch was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    pub index: u32,
    pub failure: Failure,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Client → server, first frame of a connection.
    Hello {
        versions: Vec<Version>,
        caps: Vec<String>,
        token: Bytes,
        agent: String,
        /// The client's stall limit in milliseconds (absent: unknown): the
        /// server keeps its keepalives well inside it.
        stall_ms: Option<u64>,
    },
    /// Server → client: the version and capabilities chosen.
    Welcome {
        version: Version,
        caps: Vec<String>,
        server: String,
        /// The server's stall limit in milliseconds (absent: unknown).
        stall_ms: Option<u64>,
    },
    /// Either side: a request or transfer failed.
    Failure(Failure),
    /// Client → server: what is at `path`?
    Stat {
        path: String,
    },
    StatReply {
        entry: Entry,
    },
    /// Client → server: list the tree under `path` (recursive).
    List {
        path: String,
    },
    /// Server → client: one page of entries; `more` says whether pages follow.
    ListReply {
        entries: Vec<Entry>,
        more: bool,
    },
    /// Client → server: create a directory (and parents).
    Mkdir {
        path: String,
        mode: u32,
        mtime_ns: i64,
    },
    /// Server → client: the request succeeded (no payload).
    Ok,
    /// Client → server: start or resume an upload to `path`.
    PutOpen {
        id: TransferId,
        path: String,
        meta: FileMeta,
    },
    /// Client → server: start or resume a download of `path`.
    GetOpen {
        id: TransferId,
        path: String,
        algs: Vec<String>,
    },
    /// Client → server, as the first request of a fresh authenticated
    /// connection: make this connection an extra data lane of the running
    /// transfer `id` (opened by `PutOpen` or `GetOpen` on another connection).
    /// The server answers `Ok`; from then on the lane carries only `Data` from
    /// the sender and `Ping`s, and closes with the transfer.
    Lane {
        id: TransferId,
    },
    /// Server → client: metadata of the file about to be downloaded.
    GetMeta {
        id: TransferId,
        meta: FileMeta,
    },
    /// Receiver → sender: chunks it holds verified, with their content hashes.
    /// `hashes` holds 32 bytes per chunk of `ranges`, in order.
    Offer {
        ranges: RangeSet,
        hashes: Bytes,
        more: bool,
    },
    /// Sender → receiver: the chunks of the offer both ends now treat as verified.
    Agreed {
        ranges: RangeSet,
    },
    /// Sender → receiver: one chunk.
    Data {
        index: u32,
        offset: u64,
        tag: ChunkHash,
        payload: Bytes,
    },
    /// Receiver → sender: these chunks are verified and durably stored.
    Ack {
        ranges: RangeSet,
    },
    /// Receiver → sender: this chunk failed verification; send it again.
    Reject {
        index: u32,
    },
    /// Receiver → sender: these chunks are needed (again).
    Need {
        ranges: RangeSet,
    },
    /// Sender → receiver: every chunk was sent; here is the whole-file digest.
    Done {
        digest: ChunkHash,
    },
    /// Receiver → sender: the file is verified and in place under its final name.
    Complete {
        digest: ChunkHash,
    },
    /// Client → server: store these small files (each sent whole in one
    /// `BatchData`); the server answers `BatchNeed`.
    BatchPut {
        alg: String,
        files: Vec<BatchFile>,
    },
    /// Server → client: the files of the batch it does not already hold
    /// identically (by index); the others are in place already.
    BatchNeed {
        indexes: RangeSet,
    },
    /// Client → server: the content of file `index` of the current batch.
    BatchData {
        index: u32,
        payload: Bytes,
    },
    /// Client → server: all data of the batch was sent; make it durable.
    BatchCommit,
    /// Server → client: the files now in place, verified and durable, and the
    /// ones that failed, with why.
    BatchResult {
        done: RangeSet,
        failures: Vec<BatchFailure>,
    },
    /// Client → server: send me these small files. Each entry carries what the
    /// client already holds at that path (size and digest; an all-zero digest
    /// for nothing), so identical files are not sent.
    BatchGet {
        alg: String,
        files: Vec<BatchFile>,
    },
    /// Server → client, answering `BatchGet`: file `index` as the server has
    /// it; `payload` is absent when the client's copy is already identical.
    /// The answer ends with `BatchResult`.
    BatchItem {
        index: u32,
        file: BatchFile,
        payload: Option<Bytes>,
    },
    /// Either side, keepalive. A receiver may add how many bytes it has
    /// read from the peer so far in this transfer: proof that data still
    /// moves while no chunk completes (one chunk can take minutes on a slow
    /// link), so the sender does not take the receiver for stuck.
    Ping {
        nonce: u64,
        received: Option<u64>,
    },
    Pong {
        nonce: u64,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const FAILURE: u8 = 3;
    pub const STAT: u8 = 10;
    pub const STAT_REPLY: u8 = 11;
    pub const LIST: u8 = 12;
    pub const LIST_REPLY: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const OK: u8 = 15;
    pub const PUT_OPEN: u8 = 20;
    pub const GET_OPEN: u8 = 21;
    pub const GET_META: u8 = 22;
    pub const OFFER: u8 = 23;
    pub const AGREED: u8 = 24;
    pub const DATA: u8 = 25;
    pub const ACK: u8 = 26;
    pub const REJECT: u8 = 27;
    pub const NEED: u8 = 28;
    pub const DONE: u8 = 29;
    pub const COMPLETE: u8 = 30;
    pub const LANE: u8 = 31;
    pub const BATCH_PUT: u8 = 40;
    pub const BATCH_NEED: u8 = 41;
    pub const BATCH_DATA: u8 = 42;
    pub const BATCH_COMMIT: u8 = 43;
    pub const BATCH_RESULT: u8 = 44;
    pub const BATCH_GET: u8 = 45;
    pub const BATCH_ITEM: u8 = 46;
    pub const PING: u8 = 0x80;
    pub const PONG: u8 = 0x81;
}

fn encode_ranges(set: &RangeSet) -> Bytes {
    let mut b = BytesMut::new();
    for r in set.iter_ranges() {
        put_varint(&mut b, u64::from(r.start));
        put_varint(&mut b, u64::from(r.end - r.start));
    }
    b.freeze()
}

fn decode_ranges(mut v: &[u8]) -> Result<RangeSet, DecodeError> {
    // Collected, sorted, then inserted in order: O(n log n) whatever order a
    // peer sends them in (inserting out of order one by one is quadratic).
    let mut list = Vec::new();
    let mut n = 0usize;
    while !v.is_empty() {
        n += 1;
        if n > MAX_RANGES {
            return Err(DecodeError::TooLarge {
                what: "range set",
                len: n as u64,
                max: MAX_RANGES as u64,
            });
        }
        let (start, a) = get_varint(v)?;
        let (len, b) = get_varint(&v[a..])?;
        v = &v[a + b..];
        let start =
            u32::try_from(start).map_err(|_| DecodeError::Malformed("range start out of range"))?;
        let end = u64::from(start) + len;
        let end =
            u32::try_from(end).map_err(|_| DecodeError::Malformed("range end out of range"))?;
        list.push(start..end);
    }
    list.sort_unstable_by_key(|r| r.start);
    let mut set = RangeSet::new();
    for r in list {
        set.insert_range(r);
    }
    Ok(set)
}

fn encode_entry(e: &Entry) -> FieldWriter {
    let mut w = FieldWriter::new();
    w.str(1, &e.path)
        .u64(2, e.kind.to_u64())
        .u64(3, e.size)
        .u64(4, e.mtime_ns as u64)
        .u64(5, u64::from(e.mode));
    w
}

fn decode_entry(body: Bytes) -> Result<Entry, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut path, mut kind, mut size, mut mtime, mut mode) = (None, None, 0, 0, 0);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => path = Some(as_string(&v, MAX_PATH)?),
            2 => kind = Some(EntryKind::from_u64(as_u64(&v)?)?),
            3 => size = as_u64(&v)?,
            4 => mtime = as_u64(&v)? as i64,
            5 => mode = as_u32(&v)?,
            _ => {}
        }
    }
    Ok(Entry {
        path: path.ok_or(DecodeError::MissingField {
            message: "entry",
            field: "path",
        })?,
        kind: kind.ok_or(DecodeError::MissingField {
            message: "entry",
            field: "kind",
        })?,
        size,
        mtime_ns: mtime,
        mode,
    })
}

fn encode_batch_file(f: &BatchFile) -> FieldWriter {
    let mut e = FieldWriter::new();
    e.str(1, &f.path)
        .u64(2, f.size)
        .u64(3, f.mtime_ns as u64)
        .u64(4, u64::from(f.mode))
        .bytes(5, &f.digest.0);
    e
}

fn decode_batch_file(body: Bytes) -> Result<BatchFile, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut path, mut size, mut mtime, mut mode, mut digest) = (None, None, 0, 0, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => path = Some(as_string(&v, MAX_PATH)?),
            2 => size = Some(as_u64(&v)?),
            3 => mtime = as_u64(&v)? as i64,
            4 => mode = as_u32(&v)?,
            5 => digest = Some(ChunkHash(as_array(&v)?)),
            _ => {}
        }
    }
    let missing = |field| DecodeError::MissingField {
        message: "BatchFile",
        field,
    };
    let size = size.ok_or(missing("size"))?;
    if size > MAX_BATCH_FILE {
        return Err(DecodeError::TooLarge {
            what: "batch file",
            len: size,
            max: MAX_BATCH_FILE,
        });
    }
    Ok(BatchFile {
        path: path.ok_or(missing("path"))?,
        size,
        mtime_ns: mtime,
        mode,
        digest: digest.ok_or(missing("digest"))?,
    })
}

fn decode_batch_failure(body: Bytes) -> Result<BatchFailure, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut index, mut f) = (None, Failure::new(FailureCode::Other(0), ""));
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => index = Some(as_u32(&v)?),
            2 => f.code = FailureCode::from_u64(as_u64(&v)?),
            3 => f.message = as_string(&v, MAX_TEXT)?,
            4 => f.retry_after_ms = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok(BatchFailure {
        index: index.ok_or(DecodeError::MissingField {
            message: "BatchFailure",
            field: "index",
        })?,
        failure: f,
    })
}

fn encode_meta(w: &mut FieldWriter, m: &FileMeta) {
    w.u64(10, m.size)
        .u64(11, m.mtime_ns as u64)
        .u64(12, u64::from(m.mode))
        .u64(13, u64::from(m.chunk_size))
        .str(14, &m.alg)
        .bytes(15, &m.source_id);
}

#[derive(Default)]
struct MetaFields {
    size: Option<u64>,
    mtime: i64,
    mode: u32,
    chunk_size: Option<u32>,
    alg: Option<String>,
    source_id: Bytes,
}

impl MetaFields {
    /// Consumes a field if it belongs to the file metadata.
    fn take(&mut self, tag: u64, v: &Bytes) -> Result<bool, DecodeError> {
        match tag {
            10 => self.size = Some(as_u64(v)?),
            11 => self.mtime = as_u64(v)? as i64,
            12 => self.mode = as_u32(v)?,
            13 => self.chunk_size = Some(as_u32(v)?),
            14 => self.alg = Some(as_string(v, 32)?),
            15 => {
                if v.len() > 64 {
                    return Err(DecodeError::TooLarge {
                        what: "source id",
                        len: v.len() as u64,
                        max: 64,
                    });
                }
                self.source_id = v.clone()
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, message: &'static str) -> Result<FileMeta, DecodeError> {
        Ok(FileMeta {
            size: self.size.ok_or(DecodeError::MissingField {
                message,
                field: "size",
            })?,
            mtime_ns: self.mtime,
            mode: self.mode,
            chunk_size: self.chunk_size.ok_or(DecodeError::MissingField {
                message,
                field: "chunk_size",
            })?,
            alg: self.alg.ok_or(DecodeError::MissingField {
                message,
                field: "alg",
            })?,
            source_id: self.source_id,
        })
    }
}

impl Message {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Failure(_) => "Failure",
            Message::Stat { .. } => "Stat",
            Message::StatReply { .. } => "StatReply",
            Message::List { .. } => "List",
            Message::ListReply { .. } => "ListReply",
            Message::Mkdir { .. } => "Mkdir",
            Message::Ok => "Ok",
            Message::PutOpen { .. } => "PutOpen",
            Message::GetOpen { .. } => "GetOpen",
            Message::GetMeta { .. } => "GetMeta",
            Message::Lane { .. } => "Lane",
            Message::Offer { .. } => "Offer",
            Message::Agreed { .. } => "Agreed",
            Message::Data { .. } => "Data",
            Message::Ack { .. } => "Ack",
            Message::Reject { .. } => "Reject",
            Message::Need { .. } => "Need",
            Message::Done { .. } => "Done",
            Message::Complete { .. } => "Complete",
            Message::BatchPut { .. } => "BatchPut",
            Message::BatchNeed { .. } => "BatchNeed",
            Message::BatchData { .. } => "BatchData",
            Message::BatchCommit => "BatchCommit",
            Message::BatchResult { .. } => "BatchResult",
            Message::BatchGet { .. } => "BatchGet",
            Message::BatchItem { .. } => "BatchItem",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
        }
    }

    /// Encodes this message as one complete frame.
    pub fn encode(&self) -> Bytes {
        if let Message::Data {
            index,
            offset,
            tag,
            payload,
        } = self
        {
            let mut b = encode_data_header(*index, *offset, tag, payload.len());
            b.extend_from_slice(payload);
            return b.freeze();
        }
        let mut w = FieldWriter::new();
        let kind = match self {
            Message::Hello {
                versions,
                caps,
                token,
                agent,
                stall_ms,
            } => {
                for v in versions {
                    w.u64(1, v.to_u64());
                }
                for c in caps {
                    w.str(2, c);
                }
                w.bytes(3, token).str(4, agent);
                if let Some(ms) = stall_ms {
                    w.u64(5, *ms);
                }
                kind::HELLO
            }
            Message::Welcome {
                version,
                caps,
                server,
                stall_ms,
            } => {
                w.u64(1, version.to_u64());
                for c in caps {
                    w.str(2, c);
                }
                w.str(3, server);
                if let Some(ms) = stall_ms {
                    w.u64(4, *ms);
                }
                kind::WELCOME
            }
            Message::Failure(f) => {
                w.u64(1, f.code.to_u64()).str(2, &f.message);
                if let Some(ms) = f.retry_after_ms {
                    w.u64(3, ms);
                }
                kind::FAILURE
            }
            Message::Stat { path } => {
                w.str(1, path);
                kind::STAT
            }
            Message::StatReply { entry } => {
                w.nested(1, encode_entry(entry));
                kind::STAT_REPLY
            }
            Message::List { path } => {
                w.str(1, path);
                kind::LIST
            }
            Message::ListReply { entries, more } => {
                for e in entries {
                    w.nested(1, encode_entry(e));
                }
                w.bool(2, *more);
                kind::LIST_REPLY
            }
            Message::Mkdir {
                path,
                mode,
                mtime_ns,
            } => {
                w.str(1, path)
                    .u64(2, u64::from(*mode))
                    .u64(3, *mtime_ns as u64);
                kind::MKDIR
            }
            Message::Ok => kind::OK,
            Message::PutOpen { id, path, meta } => {
                w.bytes(1, &id.0).str(2, path);
                encode_meta(&mut w, meta);
                kind::PUT_OPEN
            }
            Message::GetOpen { id, path, algs } => {
                w.bytes(1, &id.0).str(2, path);
                for a in algs {
                    w.str(3, a);
                }
                kind::GET_OPEN
            }
            Message::Lane { id } => {
                w.bytes(1, &id.0);
                kind::LANE
            }
            Message::GetMeta { id, meta } => {
                w.bytes(1, &id.0);
                encode_meta(&mut w, meta);
                kind::GET_META
            }
            Message::Offer {
                ranges,
                hashes,
                more,
            } => {
                w.bytes(1, &encode_ranges(ranges))
                    .bytes(2, hashes)
                    .bool(3, *more);
                kind::OFFER
            }
            Message::Agreed { ranges } => {
                w.bytes(1, &encode_ranges(ranges));
                kind::AGREED
            }
            Message::Ack { ranges } => {
                w.bytes(1, &encode_ranges(ranges));
                kind::ACK
            }
            Message::Reject { index } => {
                w.u64(1, u64::from(*index));
                kind::REJECT
            }
            Message::Need { ranges } => {
                w.bytes(1, &encode_ranges(ranges));
                kind::NEED
            }
            Message::Done { digest } => {
                w.bytes(1, &digest.0);
                kind::DONE
            }
            Message::Complete { digest } => {
                w.bytes(1, &digest.0);
                kind::COMPLETE
            }
            Message::BatchPut { alg, files } | Message::BatchGet { alg, files } => {
                w.str(1, alg);
                for f in files {
                    w.nested(2, encode_batch_file(f));
                }
                if matches!(self, Message::BatchPut { .. }) {
                    kind::BATCH_PUT
                } else {
                    kind::BATCH_GET
                }
            }
            Message::BatchItem {
                index,
                file,
                payload,
            } => {
                w.u64(1, u64::from(*index))
                    .nested(2, encode_batch_file(file));
                if let Some(p) = payload {
                    w.bytes(3, p);
                }
                kind::BATCH_ITEM
            }
            Message::BatchNeed { indexes } => {
                w.bytes(1, &encode_ranges(indexes));
                kind::BATCH_NEED
            }
            Message::BatchData { index, payload } => {
                w.u64(1, u64::from(*index)).bytes(2, payload);
                kind::BATCH_DATA
            }
            Message::BatchCommit => kind::BATCH_COMMIT,
            Message::BatchResult { done, failures } => {
                w.bytes(1, &encode_ranges(done));
                for f in failures {
                    let mut e = FieldWriter::new();
                    e.u64(1, u64::from(f.index))
                        .u64(2, f.failure.code.to_u64())
                        .str(3, &f.failure.message);
                    if let Some(ms) = f.failure.retry_after_ms {
                        e.u64(4, ms);
                    }
                    w.nested(2, e);
                }
                kind::BATCH_RESULT
            }
            Message::Ping { nonce, received } => {
                w.u64(1, *nonce);
                if let Some(n) = received {
                    w.u64(2, *n);
                }
                kind::PING
            }
            Message::Pong { nonce } => {
                w.u64(1, *nonce);
                kind::PONG
            }
            Message::Data { .. } => unreachable!("handled above"),
        };
        let body = w.finish();
        let mut out = BytesMut::with_capacity(5 + body.len());
        out.put_u32(1 + body.len() as u32);
        out.put_u8(kind);
        out.extend_from_slice(&body);
        out.freeze()
    }

    /// Decodes the body of a frame of type `kind`.
    pub fn decode(kind: u8, body: Bytes) -> Result<Option<Message>, DecodeError> {
        if kind != kind::DATA && body.len() > MAX_CONTROL_FRAME as usize {
            return Err(DecodeError::TooLarge {
                what: "control frame",
                len: body.len() as u64,
                max: u64::from(MAX_CONTROL_FRAME),
            });
        }
        let mut r = FieldReader::new(body);
        let missing = |message, field| DecodeError::MissingField { message, field };
        let msg = match kind {
            kind::HELLO => {
                let (mut versions, mut caps, mut token, mut agent, mut stall_ms) =
                    (vec![], vec![], Bytes::new(), String::new(), None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 if versions.len() < MAX_LIST => {
                            versions.push(Version::from_u64(as_u64(&v)?)?)
                        }
                        2 if caps.len() < MAX_LIST => caps.push(as_string(&v, 64)?),
                        3 => {
                            if v.len() > MAX_TOKEN {
                                return Err(DecodeError::TooLarge {
                                    what: "token",
                                    len: v.len() as u64,
                                    max: MAX_TOKEN as u64,
                                });
                            }
                            token = v
                        }
                        4 => agent = as_string(&v, 256)?,
                        5 => stall_ms = Some(as_u64(&v)?),
                        _ => {}
                    }
                }
                Message::Hello {
                    versions,
                    caps,
                    token,
                    agent,
                    stall_ms,
                }
            }
            kind::WELCOME => {
                let (mut version, mut caps, mut server, mut stall_ms) =
                    (None, vec![], String::new(), None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => version = Some(Version::from_u64(as_u64(&v)?)?),
                        2 if caps.len() < MAX_LIST => caps.push(as_string(&v, 64)?),
                        3 => server = as_string(&v, 256)?,
                        4 => stall_ms = Some(as_u64(&v)?),
                        _ => {}
                    }
                }
                Message::Welcome {
                    version: version.ok_or(missing("Welcome", "version"))?,
                    caps,
                    server,
                    stall_ms,
                }
            }
            kind::FAILURE => {
                let mut f = Failure::new(FailureCode::Other(0), "");
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => f.code = FailureCode::from_u64(as_u64(&v)?),
                        2 => f.message = as_string(&v, MAX_TEXT)?,
                        3 => f.retry_after_ms = Some(as_u64(&v)?),
                        _ => {}
                    }
                }
                Message::Failure(f)
            }
            kind::STAT | kind::LIST => {
                let mut path = None;
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        path = Some(as_string(&v, MAX_PATH)?);
                    }
                }
                let path = path.ok_or(missing("Stat/List", "path"))?;
                if kind == kind::STAT {
                    Message::Stat { path }
                } else {
                    Message::List { path }
                }
            }
            kind::STAT_REPLY => {
                let mut entry = None;
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        entry = Some(decode_entry(v)?);
                    }
                }
                Message::StatReply {
                    entry: entry.ok_or(missing("StatReply", "entry"))?,
                }
            }
            kind::LIST_REPLY => {
                let (mut entries, mut more) = (vec![], false);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => {
                            if entries.len() >= MAX_LIST_ENTRIES {
                                return Err(DecodeError::TooLarge {
                                    what: "list page",
                                    len: entries.len() as u64 + 1,
                                    max: MAX_LIST_ENTRIES as u64,
                                });
                            }
                            entries.push(decode_entry(v)?)
                        }
                        2 => more = as_u64(&v)? != 0,
                        _ => {}
                    }
                }
                Message::ListReply { entries, more }
            }
            kind::MKDIR => {
                let (mut path, mut mode, mut mtime) = (None, 0o755, 0);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => path = Some(as_string(&v, MAX_PATH)?),
                        2 => mode = as_u32(&v)?,
                        3 => mtime = as_u64(&v)? as i64,
                        _ => {}
                    }
                }
                Message::Mkdir {
                    path: path.ok_or(missing("Mkdir", "path"))?,
                    mode,
                    mtime_ns: mtime,
                }
            }
            kind::OK => Message::Ok,
            kind::PUT_OPEN | kind::GET_META => {
                let (mut id, mut path, mut meta) = (None, None, MetaFields::default());
                while let Some((tag, v)) = r.next_field()? {
                    if meta.take(tag, &v)? {
                        continue;
                    }
                    match tag {
                        1 => id = Some(TransferId(as_array(&v)?)),
                        2 => path = Some(as_string(&v, MAX_PATH)?),
                        _ => {}
                    }
                }
                let name = if kind == kind::PUT_OPEN {
                    "PutOpen"
                } else {
                    "GetMeta"
                };
                let id = id.ok_or(missing(name, "id"))?;
                let meta = meta.finish(name)?;
                if kind == kind::PUT_OPEN {
                    Message::PutOpen {
                        id,
                        path: path.ok_or(missing(name, "path"))?,
                        meta,
                    }
                } else {
                    Message::GetMeta { id, meta }
                }
            }
            kind::LANE => {
                let mut id = None;
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        id = Some(TransferId(as_array(&v)?));
                    }
                }
                Message::Lane {
                    id: id.ok_or(missing("Lane", "id"))?,
                }
            }
            kind::GET_OPEN => {
                let (mut id, mut path, mut algs) = (None, None, vec![]);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => id = Some(TransferId(as_array(&v)?)),
                        2 => path = Some(as_string(&v, MAX_PATH)?),
                        3 if algs.len() < MAX_LIST => algs.push(as_string(&v, 32)?),
                        _ => {}
                    }
                }
                Message::GetOpen {
                    id: id.ok_or(missing("GetOpen", "id"))?,
                    path: path.ok_or(missing("GetOpen", "path"))?,
                    algs,
                }
            }
            kind::OFFER => {
                let (mut ranges, mut hashes, mut more) = (RangeSet::new(), Bytes::new(), false);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => ranges = decode_ranges(&v)?,
                        2 => hashes = v,
                        3 => more = as_u64(&v)? != 0,
                        _ => {}
                    }
                }
                let n = ranges.count();
                if n > u64::from(MAX_OFFER_CHUNKS) {
                    return Err(DecodeError::TooLarge {
                        what: "offer",
                        len: n,
                        max: u64::from(MAX_OFFER_CHUNKS),
                    });
                }
                if hashes.len() as u64 != n * 32 {
                    return Err(DecodeError::Malformed(
                        "offer hash count does not match its ranges",
                    ));
                }
                Message::Offer {
                    ranges,
                    hashes,
                    more,
                }
            }
            kind::AGREED | kind::ACK | kind::NEED => {
                let mut ranges = RangeSet::new();
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        ranges = decode_ranges(&v)?;
                    }
                }
                match kind {
                    kind::AGREED => Message::Agreed { ranges },
                    kind::ACK => Message::Ack { ranges },
                    _ => Message::Need { ranges },
                }
            }
            kind::DATA => {
                let (mut index, mut offset, mut tag_v, mut payload) = (None, None, None, None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => index = Some(as_u32(&v)?),
                        2 => offset = Some(as_u64(&v)?),
                        3 => tag_v = Some(ChunkHash(as_array(&v)?)),
                        4 => payload = Some(v),
                        _ => {}
                    }
                }
                Message::Data {
                    index: index.ok_or(missing("Data", "index"))?,
                    offset: offset.ok_or(missing("Data", "offset"))?,
                    tag: tag_v.ok_or(missing("Data", "tag"))?,
                    payload: payload.ok_or(missing("Data", "payload"))?,
                }
            }
            kind::REJECT => {
                let mut index = None;
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        index = Some(as_u32(&v)?);
                    }
                }
                Message::Reject {
                    index: index.ok_or(missing("Reject", "index"))?,
                }
            }
            kind::DONE | kind::COMPLETE => {
                let mut digest = None;
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        digest = Some(ChunkHash(as_array(&v)?));
                    }
                }
                let digest = digest.ok_or(missing("Done/Complete", "digest"))?;
                if kind == kind::DONE {
                    Message::Done { digest }
                } else {
                    Message::Complete { digest }
                }
            }
            kind::BATCH_PUT | kind::BATCH_GET => {
                let (mut alg, mut files) = (None, Vec::new());
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => alg = Some(as_string(&v, 64)?),
                        2 => {
                            if files.len() >= MAX_BATCH_FILES {
                                return Err(DecodeError::TooLarge {
                                    what: "batch",
                                    len: files.len() as u64 + 1,
                                    max: MAX_BATCH_FILES as u64,
                                });
                            }
                            files.push(decode_batch_file(v)?);
                        }
                        _ => {}
                    }
                }
                let alg = alg.ok_or(missing("BatchPut/BatchGet", "alg"))?;
                if kind == kind::BATCH_PUT {
                    Message::BatchPut { alg, files }
                } else {
                    Message::BatchGet { alg, files }
                }
            }
            kind::BATCH_ITEM => {
                let (mut index, mut file, mut payload) = (None, None, None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => index = Some(as_u32(&v)?),
                        2 => file = Some(decode_batch_file(v)?),
                        3 => {
                            if v.len() as u64 > MAX_BATCH_FILE {
                                return Err(DecodeError::TooLarge {
                                    what: "batch file",
                                    len: v.len() as u64,
                                    max: MAX_BATCH_FILE,
                                });
                            }
                            payload = Some(v)
                        }
                        _ => {}
                    }
                }
                Message::BatchItem {
                    index: index.ok_or(missing("BatchItem", "index"))?,
                    file: file.ok_or(missing("BatchItem", "file"))?,
                    payload,
                }
            }
            kind::BATCH_NEED => {
                let mut indexes = RangeSet::new();
                while let Some((tag, v)) = r.next_field()? {
                    if tag == 1 {
                        indexes = decode_ranges(&v)?;
                    }
                }
                Message::BatchNeed { indexes }
            }
            kind::BATCH_DATA => {
                let (mut index, mut payload) = (None, None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => index = Some(as_u32(&v)?),
                        2 => {
                            if v.len() as u64 > MAX_BATCH_FILE {
                                return Err(DecodeError::TooLarge {
                                    what: "batch file",
                                    len: v.len() as u64,
                                    max: MAX_BATCH_FILE,
                                });
                            }
                            payload = Some(v)
                        }
                        _ => {}
                    }
                }
                Message::BatchData {
                    index: index.ok_or(missing("BatchData", "index"))?,
                    payload: payload.unwrap_or_default(),
                }
            }
            kind::BATCH_COMMIT => Message::BatchCommit,
            kind::BATCH_RESULT => {
                let (mut done, mut failures) = (RangeSet::new(), Vec::new());
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => done = decode_ranges(&v)?,
                        2 => {
                            if failures.len() >= MAX_BATCH_FILES {
                                return Err(DecodeError::TooLarge {
                                    what: "batch result",
                                    len: failures.len() as u64 + 1,
                                    max: MAX_BATCH_FILES as u64,
                                });
                            }
                            failures.push(decode_batch_failure(v)?);
                        }
                        _ => {}
                    }
                }
                Message::BatchResult { done, failures }
            }
            kind::PING | kind::PONG => {
                let (mut nonce, mut received) = (0, None);
                while let Some((tag, v)) = r.next_field()? {
                    match tag {
                        1 => nonce = as_u64(&v)?,
                        2 => received = Some(as_u64(&v)?),
                        _ => {}
                    }
                }
                if kind == kind::PING {
                    Message::Ping { nonce, received }
                } else {
                    Message::Pong { nonce }
                }
            }
            k if k >= 0x80 => return Ok(None),
            k => return Err(DecodeError::UnknownFrame(k)),
        };
        Ok(Some(msg))
    }
}

/// Encodes everything of a `Data` frame but the payload, which the caller
/// writes right after (so a chunk is never copied into a frame buffer).
pub fn encode_data_header(
    index: u32,
    offset: u64,
    tag: &ChunkHash,
    payload_len: usize,
) -> BytesMut {
    let mut w = FieldWriter::new();
    w.u64(1, u64::from(index)).u64(2, offset).bytes(3, &tag.0);
    let mut head = w.finish();
    put_varint(&mut head, 4);
    put_varint(&mut head, payload_len as u64);
    let mut out = BytesMut::with_capacity(5 + head.len());
    out.put_u32((1 + head.len() + payload_len) as u32);
    out.put_u8(kind::DATA);
    out.extend_from_slice(&head);
    out
}

/// A `Data` frame's header (see [`FrameDecoder::data_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub index: u32,
    pub offset: u64,
    pub tag: ChunkHash,
    /// Where the payload starts, counted from the frame's first byte.
    pub payload_start: usize,
    pub payload_len: usize,
}

/// Splits frames off a byte buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// A tighter bound on any frame than the protocol's, while one is set
    /// (a server sets one until the client has authenticated).
    limit: Option<u32>,
}

/// The largest frame a server reads before the client has authenticated
/// (a `Hello` is a few hundred bytes).
pub const MAX_UNAUTHENTICATED_FRAME: u32 = 64 * 1024;

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds every frame to `limit` bytes (`None`: the protocol's bounds).
    pub fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }

    /// How many bytes the next frame needs in total, if its header is buffered;
    /// lets a driver reserve exactly once for a large frame.
    pub fn needed(buf: &[u8]) -> Option<usize> {
        if buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let cap = if buf[4] == kind::DATA {
            MAX_FRAME
        } else {
            MAX_CONTROL_FRAME + 1
        };
        Some(4 + len.min(cap) as usize)
    }

    /// Whether `buf` starts with (the first bytes of) a `Data` frame.
    pub fn starts_data(buf: &[u8]) -> bool {
        buf.get(4) == Some(&kind::DATA)
    }

    /// The header of a `Data` frame at the front of `buf`, once it is
    /// buffered, when the payload is the frame's last field (as
    /// [`encode_data_header`] writes it): a driver may then read the payload
    /// straight into memory of its own. `None` for anything else (another
    /// frame, a header not yet whole, a field after the payload, a frame over
    /// a bound): [`FrameDecoder::decode`] takes those, and its errors.
    pub fn data_header(&self, buf: &[u8]) -> Option<DataHeader> {
        let head = buf.get(..5)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if head[4] != kind::DATA
            || len == 0
            || len > MAX_FRAME
            || self.limit.is_some_and(|l| len > l)
        {
            return None;
        }
        let end = 4 + len as usize;
        let (mut index, mut offset, mut tag) = (None, None, None);
        let mut pos = 5;
        loop {
            let (field, a) = get_varint(buf.get(pos..)?).ok()?;
            let (flen, b) = get_varint(buf.get(pos + a..)?).ok()?;
            let start = pos + a + b;
            let flen = usize::try_from(flen).ok()?;
            if field == 4 {
                if start.checked_add(flen)? != end {
                    return None;
                }
                return Some(DataHeader {
                    index: index?,
                    offset: offset?,
                    tag: tag?,
                    payload_start: start,
                    payload_len: flen,
                });
            }
            let value = buf.get(start..start.checked_add(flen)?)?;
            match field {
                1 => index = Some(as_u32(value).ok()?),
                2 => offset = Some(as_u64(value).ok()?),
                3 => tag = Some(ChunkHash(as_array(value).ok()?)),
                _ => {}
            }
            pos = start + flen;
            if pos >= end {
                return None;
            }
        }
    }

    /// Takes one message off the front of `buf`. `Ok(None)` means more bytes
    /// are needed; optional frames of unknown type are consumed and skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        loop {
            if buf.len() < 5 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len == 0 {
                return Err(DecodeError::Malformed("empty frame"));
            }
            if len > MAX_FRAME {
                return Err(DecodeError::TooLarge {
                    what: "frame",
                    len: u64::from(len),
                    max: u64::from(MAX_FRAME),
                });
            }
            if let Some(limit) = self.limit.filter(|l| len > *l) {
                return Err(DecodeError::TooLarge {
                    what: "frame before authentication",
                    len: u64::from(len),
                    max: u64::from(limit),
                });
            }
            let kind = buf[4];
            if kind != kind::DATA && len > MAX_CONTROL_FRAME + 1 {
                return Err(DecodeError::TooLarge {
                    what: "control frame",
                    len: u64::from(len),
                    max: u64::from(MAX_CONTROL_FRAME),
                });
            }
            if buf.len() < 4 + len as usize {
                return Ok(None);
            }
            buf.advance(5);
            let body = buf.split_to(len as usize - 1).freeze();
            if let Some(m) = Message::decode(kind, body)? {
                return Ok(Some(m));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    #[test]
    fn ranges_in_reverse_order_decode_quickly_and_merge() {
        // 64 K disjoint ranges, worst order for one-by-one insertion.
        let mut b = bytes::BytesMut::new();
        for i in (0..super::MAX_RANGES as u64).rev() {
            super::put_varint(&mut b, i * 2);
            super::put_varint(&mut b, 1);
        }
        let set = super::decode_ranges(&b).unwrap();
        assert_eq!(set.iter_ranges().count(), super::MAX_RANGES);
        // Overlapping and touching ranges, unordered, merge.
        let mut b = bytes::BytesMut::new();
        for (start, len) in [(10u64, 5u64), (0, 3), (3, 2), (12, 10)] {
            super::put_varint(&mut b, start);
            super::put_varint(&mut b, len);
        }
        let set = super::decode_ranges(&b).unwrap();
        assert_eq!(
            set.iter_ranges().cloned().collect::<Vec<_>>(),
            vec![0..5, 10..22]
        );
    }

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
}
