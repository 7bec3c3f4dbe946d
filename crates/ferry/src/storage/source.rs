//! Local files being sent: opened once, read by offset, checked unchanged
//! before the end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::{HashAlg, ProtoError};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::store::{HeldChunks, Store};

/// The file being sent.
pub struct SourceFile {
    pub file: Arc<File>,
    pub path: PathBuf,
    /// Identity at open time (see [`fsutil::source_id`]).
    pub source_id: Vec<u8>,
    /// Key of this source's remembered chunk hashes.
    pub key: [u8; 16],
    pub alg: HashAlg,
}

/// Reads `len` bytes at `offset`; a short file means the source changed.
pub(crate) fn read_source(
    file: &File,
    path: &std::path::Path,
    offset: u64,
    len: u32,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Proto(ProtoError::SourceChanged { chunk: 0 })
        } else {
            Error::local(path, e)
        }
    })
}

impl SourceFile {
    /// Fails if the source is no longer the version that was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        let md = std::fs::metadata(&self.path).map_err(|e| Error::local(&self.path, e))?;
        let now = fsutil::source_id(&md);
        if now != self.source_id {
            return Err(Error::Proto(ProtoError::SourceChanged { chunk: 0 }));
        }
        Ok(())
    }
}

/// A source opened for sending.
pub struct PreparedSource {
    pub src: SourceFile,
    /// What the peer is told about it.
    pub meta: ferry_proto::message::FileMeta,
    /// Chunk hashes remembered from earlier runs of this version.
    pub known: HeldChunks,
}

/// Opens a source file for sending: its metadata for the peer, and any chunk
/// hashes remembered from earlier runs for this exact version of it.
pub fn prepare_send(store: &Store, path: &std::path::Path, alg: HashAlg) -> Result<PreparedSource> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(path).map_err(|e| Error::local(path, e))?;
    let md = file.metadata().map_err(|e| Error::local(path, e))?;
    if !md.is_file() {
        return Err(Error::Usage(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let source_id = fsutil::source_id(&md);
    let chosen = ferry_proto::ChunkLayout::for_size(md.len());
    let layout = ferry_proto::ChunkLayout::new(md.len(), chosen.chunk_size()).ok_or_else(|| {
        Error::Usage(format!(
            "{} is too large ({} bytes)",
            path.display(),
            md.len()
        ))
    })?;
    let key = fsutil::source_key(
        &path.to_string_lossy(),
        &source_id,
        layout.chunk_size(),
        alg.name(),
    );
    let known = store.source_hashes(&key)?;
    let meta = ferry_proto::message::FileMeta {
        size: md.len(),
        mtime_ns: fsutil::mtime_ns(&md),
        mode: md.mode() & 0o7777,
        chunk_size: layout.chunk_size(),
        alg: alg.name().to_string(),
        source_id: bytes::Bytes::from(source_id.clone()),
    };
    Ok(PreparedSource {
        src: SourceFile {
            file: Arc::new(file),
            path: path.to_path_buf(),
            source_id,
            key,
            alg,
        },
        meta,
        known,
    })
}
