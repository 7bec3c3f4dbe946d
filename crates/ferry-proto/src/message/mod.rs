//! Messages and their framing.
//!
//! A frame is `len: u32 big-endian | type: u8 | body`, where `len` counts the
//! type byte and the body. The body is a field sequence (the `wire` module), so
//! fields can be added without breaking older peers. Frame types with the high
//! bit set (`0x80..`) are optional: a peer that does not know one skips it.
//! Unknown types below `0x80` close the connection.
//!
//! Each family of messages has its file, with its payload types and the
//! encoding and decoding of its bodies: `hello` (`Hello`, `Welcome`),
//! `control` (`Failure`, `Ok`, `Ping`, `Pong`), `listing` (`Stat`, `List`,
//! `Mkdir`), `transfer` (one file's transfer) and `batch` (small files). This
//! file holds the [`Message`] enum, the table of messages (one line each: frame
//! type, variant, family, encoder and decoder; the `messages!` macro of
//! `codec.rs` makes the tags, the names and the dispatch from it), and the
//! [`FrameDecoder`] (in `frame.rs`).
//!
//! Adding a message touches three places: a variant of [`Message`], one line
//! in the table below, and the message's `encode_*`/`decode_*` pair in its
//! family's file. The compiler refuses a variant without a line, and the
//! table refuses a frame type used twice.

use bytes::{Bytes, BytesMut};

use crate::chunk::MAX_CHUNK;
use crate::hash::{ChunkHash, TransferId};
use crate::ranges::RangeSet;
use crate::wire::{bounded, FieldReader, FieldWriter};
use codec::messages;

mod batch;
mod codec;
mod control;
mod frame;
mod hello;
mod listing;
#[cfg(test)]
mod tests;
mod transfer;

pub use self::batch::{BatchFailure, BatchFile};
pub use self::frame::{FrameDecoder, MAX_UNAUTHENTICATED_FRAME};
pub use self::hello::Version;
pub use self::listing::{Entry, EntryKind};
pub use self::transfer::{encode_data_header, DataHeader, FileMeta};
pub use crate::failure::{Failure, FailureCode};
pub use crate::wire::{DecodeError, MAX_RANGES};

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
/// Most entries in one `ListReply` frame.
pub const MAX_LIST_ENTRIES: usize = 1024;
/// Files in one small-file batch.
pub const MAX_BATCH_FILES: usize = 1024;
/// Largest file sent whole inside a batch (one chunk of the smallest size).
pub const MAX_BATCH_FILE: u64 = 256 * 1024;
/// Most versions, capabilities or algorithms one message may list.
const MAX_LIST: usize = 64;

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

// The table of messages, one line each (see `codec.rs`):
// tag presence Variant { fields } => family::{encoder, decoder};
messages! {
    1 required Hello { versions, caps, token, agent, stall_ms } => hello::{encode_hello, decode_hello};
    2 required Welcome { version, caps, server, stall_ms } => hello::{encode_welcome, decode_welcome};
    3 required Failure { 0: failure } => control::{encode_failure, decode_failure};
    10 required Stat { path } => listing::{encode_stat, decode_stat};
    11 required StatReply { entry } => listing::{encode_stat_reply, decode_stat_reply};
    12 required List { path } => listing::{encode_list, decode_list};
    13 required ListReply { entries, more } => listing::{encode_list_reply, decode_list_reply};
    14 required Mkdir { path, mode, mtime_ns } => listing::{encode_mkdir, decode_mkdir};
    15 required Ok {} => control::{encode_ok, decode_ok};
    20 required PutOpen { id, path, meta } => transfer::{encode_put_open, decode_put_open};
    21 required GetOpen { id, path, algs } => transfer::{encode_get_open, decode_get_open};
    22 required GetMeta { id, meta } => transfer::{encode_get_meta, decode_get_meta};
    23 required Offer { ranges, hashes, more } => transfer::{encode_offer, decode_offer};
    24 required Agreed { ranges } => transfer::{encode_agreed, decode_agreed};
    25 required Data { index, offset, tag, payload } => transfer::{encode_data, decode_data};
    26 required Ack { ranges } => transfer::{encode_ack, decode_ack};
    27 required Reject { index } => transfer::{encode_reject, decode_reject};
    28 required Need { ranges } => transfer::{encode_need, decode_need};
    29 required Done { digest } => transfer::{encode_done, decode_done};
    30 required Complete { digest } => transfer::{encode_complete, decode_complete};
    31 required Lane { id } => transfer::{encode_lane, decode_lane};
    40 required BatchPut { alg, files } => batch::{encode_batch_put, decode_batch_put};
    41 required BatchNeed { indexes } => batch::{encode_batch_need, decode_batch_need};
    42 required BatchData { index, payload } => batch::{encode_batch_data, decode_batch_data};
    43 required BatchCommit {} => batch::{encode_batch_commit, decode_batch_commit};
    44 required BatchResult { done, failures } => batch::{encode_batch_result, decode_batch_result};
    45 required BatchGet { alg, files } => batch::{encode_batch_get, decode_batch_get};
    46 required BatchItem { index, file, payload } => batch::{encode_batch_item, decode_batch_item};
    0x80 optional Ping { nonce, received } => control::{encode_ping, decode_ping};
    0x81 optional Pong { nonce } => control::{encode_pong, decode_pong};
}

impl Message {
    /// Encodes this message as one complete frame.
    pub fn encode(&self) -> Bytes {
        // The header's place is kept and filled in once the body is written.
        let mut w = FieldWriter::after(BytesMut::zeroed(5));
        let kind = self.encode_body(&mut w);
        let mut frame = w.finish();
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        frame[4] = kind;
        frame.freeze()
    }

    /// Decodes the body of a frame of type `kind`; `Ok(None)` for an optional
    /// type this version does not know.
    pub fn decode(kind: u8, body: Bytes) -> Result<Option<Message>, DecodeError> {
        if kind != kind::Data {
            bounded(
                "control frame",
                body.len() as u64,
                u64::from(MAX_CONTROL_FRAME),
            )?;
        }
        match Message::body_decoder(kind) {
            Some(decode) => decode(FieldReader::new(body)).map(Some),
            None if kind >= 0x80 => Ok(None),
            None => Err(DecodeError::UnknownFrame(kind)),
        }
    }
}
