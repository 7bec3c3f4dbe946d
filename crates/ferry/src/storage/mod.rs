//! Where received files are kept and sent files are read from: the seam
//! between the transfer drivers (and the server's handlers) and the bytes
//! at rest.
//!
//! * [`Storage`]: a namespace of files (stat, list, open for reading, start
//!   or resume receiving one).
//! * [`Partial`]: one file being received: its chunks, the journal of the
//!   chunks verified in it, and putting it in place.
//! * [`local`]: the local file system with the redb journal, the first
//!   implementation (`O_DIRECT` writes, fsync before journal, atomic rename).
//! * [`source`]: local files being sent.
//!
//! # What a store must promise
//!
//! The drivers build ferry's guarantee (a file appears under its final name
//! only when every byte is verified; nothing verified is sent twice) on
//! these, and on nothing else about the store:
//!
//! * **Durability before acknowledgement.** When [`Partial::commit`] returns,
//!   the data of every chunk it lists, written before the call, survives a
//!   crash or power loss, and so does the record that they are verified. The
//!   receiver acknowledges chunks only after that. Data first, then the
//!   record that claims it: a record never outlives its data.
//! * **Idempotent chunk writes.** [`Partial::write_chunk`] may be called
//!   again for the same offset with the same bytes (a resend, a resume, a
//!   data lane racing the control connection); the result is the same as
//!   one write. Writes to distinct chunks may run at once, from several
//!   threads.
//! * **Atomic finalize.** [`Partial::finalize`] puts the whole file, cut to
//!   its size and with its metadata, under its final name in one step:
//!   readers see the old content (or nothing) or the new file, never a
//!   mixture, and a crash at any point leaves one of the two. It refuses if
//!   the partial's data was swapped for something else meanwhile.
//! * **Only what it wrote.** A partial is resumed only if it is the very
//!   one the journal's chunks were written to; anything else under its name
//!   (a link, another file) is never followed or trusted.
//!
//! Nothing here assumes a POSIX file: chunks are addressed by offset, names
//! are the paths the server resolved under its root, and the journal is the
//! store's own business. Calls may block (disk or network).

use std::path::Path;
use std::sync::Arc;

use ferry_proto::message::{Entry, FileMeta};
use ferry_proto::{HashAlg, RangeSet, Receiver, ReceiverConfig, TransferId};

use crate::error::Result;
use crate::fsutil::BufPool;
use crate::store::HeldChunks;

pub mod local;
pub mod source;

pub use local::LocalStorage;
pub use source::{PreparedSource, SourceFile};

/// A namespace of files a server serves (see the module doc for what an
/// implementation must promise).
pub trait Storage: Send + Sync + 'static {
    /// `name` as a file or directory entry shown as `shown`; `None` if it is
    /// neither (missing, a special file).
    fn stat(&self, name: &Path, shown: String) -> Option<Entry>;

    /// Files and directories under `name` (or `name` itself if a file),
    /// with paths relative to it. Partials are never listed; links and
    /// names the wire cannot carry are listed as `Missing`.
    fn list(&self, name: &Path) -> std::io::Result<Vec<Entry>>;

    /// Makes room for a file at `name`: its parent directories exist (and
    /// survive a crash) when this returns.
    fn make_parents(&self, name: &Path) -> Result<()>;

    /// Whether a partial of this very source version is kept for `name`
    /// (a resume, whose space is mostly taken already).
    fn holds_partial(&self, name: &Path, meta: &FileMeta) -> bool;

    /// Bytes free for new files near `name`, if the store knows.
    fn free_bytes(&self, name: &Path) -> Option<u64>;

    /// Starts receiving `meta` into `name`, or resumes the partial kept for
    /// the same source version: the receiver state machine (knowing what is
    /// already held) and the partial to write into. May read back a whole
    /// file already in place, so it can take long.
    fn prepare_receive(
        &self,
        name: &Path,
        id: TransferId,
        meta: &FileMeta,
        cfg: ReceiverConfig,
    ) -> Result<(Receiver, Arc<dyn Partial>)>;

    /// Opens `name` for sending, with the chunk hashes remembered from
    /// earlier sends of this exact version.
    fn open_source(&self, name: &Path, alg: HashAlg) -> Result<PreparedSource>;
}

/// One file being received (see the module doc for what an implementation
/// must promise). Every method may block: the drivers run writes, reads,
/// commits and finalize on blocking threads.
pub trait Partial: Send + Sync + 'static {
    /// The file's final name, for messages.
    fn name(&self) -> &Path;

    /// Memory the store would like payloads to arrive in (aligned for
    /// `O_DIRECT`, say), or `None` if any memory does.
    fn payload_pool(&self) -> Option<BufPool>;

    /// Writes one verified chunk's bytes at `offset` (idempotent). Not yet
    /// durable: [`Partial::commit`] makes it so.
    fn write_chunk(&self, offset: u64, data: bytes::Bytes) -> Result<()>;

    /// Reads back `buf.len()` bytes at `offset` (re-checking chunks kept
    /// from an earlier run).
    fn read_chunk(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// Makes the listed chunks' data durable, then records them as verified.
    fn commit(&self, chunks: &HeldChunks) -> Result<()>;

    /// Drops chunks from the record (they no longer verify).
    fn forget(&self, chunks: &RangeSet) -> Result<()>;

    /// Puts the whole file in place under its final name, atomically, and
    /// records that it is.
    fn finalize(&self) -> Result<()>;
}
