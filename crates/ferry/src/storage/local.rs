//! The local file system as a [`Storage`]: partials are `.part` files beside
//! their final names (created `O_EXCL|O_NOFOLLOW`, written with `O_DIRECT`
//! where aligned, fsynced before the redb journal records their chunks,
//! renamed into place after a final fsync), and the journal is the server's
//! [`Store`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::message::{Entry, EntryKind, FileMeta};
use ferry_proto::{HashAlg, RangeSet, Receiver, ReceiverConfig, TransferId};
use tracing::{info, warn};

use super::source::{prepare_send, PreparedSource};
use super::{Partial, Storage};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::store::{HeldChunks, PartialRecord, Store};

/// Files under a directory the caller has resolved names in, with partials
/// recorded in `journal`.
pub struct LocalStorage {
    journal: Arc<Store>,
    /// Write received chunks past the page cache where the filesystem allows
    /// (see [`fsutil::open_direct`]).
    direct_io: bool,
}

impl LocalStorage {
    pub fn new(journal: Arc<Store>, direct_io: bool) -> Self {
        LocalStorage { journal, direct_io }
    }
}

impl Storage for LocalStorage {
    fn stat(&self, name: &Path, shown: String) -> Option<Entry> {
        // Followed: the caller's resolution kept `name` inside the root.
        match std::fs::metadata(name) {
            Ok(md) if md.is_file() || md.is_dir() => Some(entry_for(shown, &md)),
            _ => None,
        }
    }

    fn list(&self, name: &Path) -> std::io::Result<Vec<Entry>> {
        list_tree(name)
    }

    fn make_parents(&self, name: &Path) -> Result<()> {
        let parent = fsutil::parent_of(name);
        fsutil::create_dirs_durable(&parent).map_err(|e| Error::local(&parent, e))
    }

    fn holds_partial(&self, name: &Path, meta: &FileMeta) -> bool {
        let source_hex = fsutil::hex(&meta.source_id);
        matches!(self.journal.partial(&name.to_string_lossy()),
            Ok(Some((rec, _))) if rec.source_id == source_hex && rec.size == meta.size)
    }

    fn free_bytes(&self, name: &Path) -> Option<u64> {
        let st = rustix::fs::statvfs(fsutil::parent_of(name)).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn prepare_receive(
        &self,
        name: &Path,
        id: TransferId,
        meta: &FileMeta,
        cfg: ReceiverConfig,
    ) -> Result<(Receiver, Arc<dyn Partial>)> {
        prepare_receive(&self.journal, name, id, meta, cfg, self.direct_io)
    }

    fn open_source(&self, name: &Path, alg: HashAlg) -> Result<PreparedSource> {
        prepare_send(&self.journal, name, alg)
    }
}

/// A file being received: its `.part` file and its journal record.
pub struct LocalPartial {
    final_path: PathBuf,
    part_path: PathBuf,
    /// Locked (see [`fsutil::lock_part`]) as long as it is open: each chunk
    /// write holds the partial, so no other writer gets the lock before the
    /// last write is done.
    file: File,
    /// The partial file opened for `O_DIRECT` writes, where allowed
    /// (see [`fsutil::open_direct`]).
    direct: Option<File>,
    /// Aligned memory payloads are read into, or copied into for `O_DIRECT`.
    pool: fsutil::BufPool,
    journal: Arc<Store>,
    /// Key of this destination in the journal.
    key: String,
    /// The file's size: what the partial is cut to before it is put in place.
    size: u64,
    mode: u32,
    mtime_ns: i64,
}

impl Partial for LocalPartial {
    fn name(&self) -> &Path {
        &self.final_path
    }

    fn payload_pool(&self) -> Option<fsutil::BufPool> {
        Some(self.pool.clone())
    }

    /// An aligned chunk with an `O_DIRECT` descriptor is written past the
    /// page cache, from the pooled memory it was read into (or an aligned
    /// copy); if `O_DIRECT` refuses it, through the page cache.
    fn write_chunk(&self, offset: u64, data: bytes::Bytes) -> Result<()> {
        let io = match self
            .direct
            .as_ref()
            .filter(|_| fsutil::direct_aligned(offset, data.len()))
        {
            Some(direct) => {
                let data = if fsutil::direct_memory(&data) {
                    data
                } else {
                    fsutil::AlignedBuf::copy_of(&data, self.pool.take()).into_bytes(&self.pool)
                };
                match fsutil::write_direct(direct, &data, offset) {
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        self.file.write_all_at(&data, offset)
                    }
                    r => r,
                }
            }
            None => self.file.write_all_at(&data, offset),
        };
        io.map_err(|e| Error::local(&self.part_path, e))
    }

    fn read_chunk(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn commit(&self, chunks: &HeldChunks) -> Result<()> {
        // Durability order: the data first, then the journal that claims it.
        self.file
            .sync_data()
            .map_err(|e| Error::local(&self.part_path, e))?;
        self.journal.commit_chunks(&self.key, chunks)
    }

    fn forget(&self, chunks: &RangeSet) -> Result<()> {
        self.journal.forget_chunks(&self.key, chunks.iter())
    }

    fn finalize(&self) -> Result<()> {
        fsutil::finalize_part(
            &self.file,
            &self.part_path,
            &self.final_path,
            self.size,
            self.mode,
            self.mtime_ns,
        )?;
        self.journal.mark_finalized(&self.key)
    }
}

/// Prepares to receive `meta` into `final_path`: resumes the partial file if
/// the journal has one for the same source version, else starts afresh.
/// `direct_io`: write chunks past the page cache where the filesystem allows
/// (see [`fsutil::open_direct`]).
pub fn prepare_receive(
    store: &Arc<Store>,
    final_path: &std::path::Path,
    id: TransferId,
    meta: &FileMeta,
    cfg: ReceiverConfig,
    direct_io: bool,
) -> Result<(Receiver, Arc<dyn Partial>)> {
    let (rx, partial) = prepare_local(store, final_path, id, meta, cfg, direct_io)?;
    Ok((rx, Arc::new(partial)))
}

/// [`prepare_receive`], with the partial as the local type it is.
fn prepare_local(
    store: &Arc<Store>,
    final_path: &std::path::Path,
    id: TransferId,
    meta: &FileMeta,
    cfg: ReceiverConfig,
    direct_io: bool,
) -> Result<(Receiver, LocalPartial)> {
    let layout = ferry_proto::ChunkLayout::new(meta.size, meta.chunk_size).ok_or_else(|| {
        Error::Proto(
            ferry_proto::Misbehavior::BadChunkSize {
                chunk_size: meta.chunk_size,
                size: meta.size,
            }
            .into(),
        )
    })?;
    let alg = HashAlg::from_name(&meta.alg).ok_or_else(|| {
        Error::Proto(ferry_proto::Incompatibility::UnknownHashAlg(meta.alg.clone()).into())
    })?;
    let open_direct = |file: &File| direct_io.then(|| fsutil::open_direct(file)).flatten();
    let key = final_path.to_string_lossy().into_owned();
    let part_path = fsutil::part_path(final_path);
    let source_hex = fsutil::hex(&meta.source_id);
    let same_source = |r: &PartialRecord| {
        r.source_id == source_hex
            && r.size == meta.size
            && r.chunk_size == meta.chunk_size
            && r.alg == meta.alg
    };
    let dest = |file: File, direct: Option<File>| -> LocalPartial {
        LocalPartial {
            final_path: final_path.to_path_buf(),
            part_path: part_path.clone(),
            file,
            direct,
            pool: fsutil::BufPool::default(),
            journal: store.clone(),
            key: key.clone(),
            size: meta.size,
            mode: meta.mode,
            mtime_ns: meta.mtime_ns,
        }
    };
    if let Some((old, chunks)) = store.partial(&key)? {
        let whole = chunks.len() as u32 == layout.count();
        if same_source(&old) && whole && (old.finalized || !part_path.exists()) {
            // Finalised earlier (the sender did not hear, or the same copy
            // is run again), or killed between the rename and the journal
            // saying so. A file still carrying the mtime and size we gave it
            // is trusted after a finalised record; anything else (edited,
            // touched, replaced) is re-hashed against the journal first.
            // Either way it must be a regular file under that name, never
            // something reached through a link.
            if let Some(file) = open_final(final_path) {
                let md = file.metadata().map_err(|e| Error::local(final_path, e))?;
                let untouched = old.finalized
                    && md.len() == meta.size
                    && fsutil::mtime_ns(&md) == meta.mtime_ns;
                if untouched || confirm_in_place(store, &key, &file, layout, alg, &chunks)? {
                    let rx = Receiver::already_final(id, layout, alg, cfg, chunks.iter().copied());
                    return Ok((rx, dest(file, None)));
                }
            }
            info!(path = %final_path.display(), "the file in place no longer matches what was sent; sending it again");
        } else if same_source(&old) && !old.finalized {
            // Resume only the very file the journal's chunks were written to.
            if let Some(file) = fsutil::reopen_part(&part_path, Some(old.part.unwrap_or(NO_IDENT)))?
            {
                let len = file
                    .metadata()
                    .map_err(|e| Error::local(&part_path, e))?
                    .len();
                if len > meta.size {
                    // Bytes past the file's end are never part of it.
                    file.set_len(meta.size)
                        .map_err(|e| Error::local(&part_path, e))?;
                    file.sync_all().map_err(|e| Error::local(&part_path, e))?;
                    warn!(path = %final_path.display(), extra = len - meta.size, "partial file had grown past the file's size; cut back");
                }
                // A partial shorter than a chunk's end lost that chunk (truncation).
                let held: Vec<_> = chunks
                    .into_iter()
                    .filter(|(i, _)| layout.offset(*i) + u64::from(layout.len(*i)) <= len)
                    .collect();
                info!(transfer = %id, path = %final_path.display(), held = held.len(), "resuming partial file");
                let rx = Receiver::new(id, layout, alg, cfg, held);
                let direct = open_direct(&file);
                return Ok((rx, dest(file, direct)));
            }
            info!(path = %final_path.display(), "the partial file is not the one this transfer wrote; starting over");
        } else if !same_source(&old) {
            info!(path = %final_path.display(), "source changed since the partial file was started; starting over");
        }
    }
    let file = fsutil::create_part(&part_path)?;
    file.set_len(meta.size)
        .map_err(|e| Error::local(&part_path, e))?;
    fsutil::fsync_dir(&fsutil::parent_of(&part_path))?;
    let rec = PartialRecord {
        transfer_id: id.to_hex(),
        size: meta.size,
        chunk_size: meta.chunk_size,
        alg: meta.alg.clone(),
        mtime_ns: meta.mtime_ns,
        mode: meta.mode,
        source_id: source_hex.clone(),
        finalized: false,
        part: Some(fsutil::FileIdent::of_file(&file, &part_path)?),
    };
    store.start_partial(&key, &rec)?;
    let rx = Receiver::new(id, layout, alg, cfg, Vec::new());
    let direct = open_direct(&file);
    Ok((rx, dest(file, direct)))
}

/// A record of an older version names no partial file: no file matches it.
const NO_IDENT: fsutil::FileIdent = fsutil::FileIdent { dev: 0, ino: 0 };

/// The final file, opened for reading only if that name is a regular file
/// itself (not a link to one elsewhere).
fn open_final(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()?;
    f.metadata().ok()?.file_type().is_file().then_some(f)
}

/// The final file exists but the journal never learnt it was finalised (a crash
/// between rename and commit): re-hash it against the journal, and if every
/// chunk matches, record it and answer as an already finished transfer.
fn confirm_in_place(
    store: &Store,
    key: &str,
    file: &File,
    layout: ferry_proto::ChunkLayout,
    alg: HashAlg,
    chunks: &HeldChunks,
) -> Result<bool> {
    if file.metadata().map(|m| m.len()).unwrap_or(0) != layout.size() {
        return Ok(false);
    }
    let mut buf = Vec::new();
    for (i, h) in chunks {
        buf.resize(layout.len(*i) as usize, 0);
        if file.read_exact_at(&mut buf, layout.offset(*i)).is_err() || alg.hash(&buf) != *h {
            return Ok(false);
        }
    }
    store.mark_finalized(key)?;
    info!(path = %key, "file was already in place and verifies");
    Ok(true)
}

pub(crate) fn entry_for(path: String, md: &std::fs::Metadata) -> Entry {
    use std::os::unix::fs::MetadataExt;
    Entry {
        path,
        kind: if md.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::File
        },
        size: if md.is_dir() { 0 } else { md.len() },
        mtime_ns: fsutil::mtime_ns(md),
        mode: md.mode() & 0o7777,
    }
}

/// Lists files and directories under `dir` (or `dir` itself if a file), with
/// paths relative to `dir`. Symlinks, special files and partials are skipped.
fn list_tree(dir: &Path) -> std::io::Result<Vec<Entry>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    // The requested path itself is followed (`resolve` kept it in the root).
    let md = std::fs::metadata(dir)?;
    if md.is_file() {
        return Ok(vec![entry_for(String::new(), &md)]);
    }
    // A `Missing` entry is something listed but not served, for the client to
    // report: a symlink (mode S_IFLNK; links inside a tree are never
    // followed, so no walk can loop), or a name that is not UTF-8 (its path
    // shows the bytes escaped, as no UTF-8 path can name it).
    let missing = |path: String, mode: u32| Entry {
        path,
        kind: EntryKind::Missing,
        size: 0,
        mtime_ns: 0,
        mode,
    };
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut items: Vec<_> = std::fs::read_dir(&d)?.flatten().collect();
        items.sort_by_key(|e| e.file_name());
        for e in items {
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let os_name = e.file_name();
            let Some(name) = os_name.to_str().map(str::to_string) else {
                if md.is_dir() || md.is_file() || md.file_type().is_symlink() {
                    let shown = crate::walk::escape_bytes(os_name.as_bytes());
                    let mut path = crate::walk::join(&rel, &shown);
                    // Within the wire's path limit, on a character boundary.
                    while path.len() > 4000 {
                        path.pop();
                    }
                    warn!(dir = %d.display(), name = %shown, "not listed: the name is not UTF-8");
                    out.push(missing(path, md.mode() & 0o170000));
                }
                continue;
            };
            if fsutil::is_part_name(&name) {
                continue;
            }
            let rel_path = crate::walk::join(&rel, &name);
            if md.file_type().is_symlink() {
                out.push(missing(rel_path, 0o120000));
            } else if md.is_dir() {
                out.push(entry_for(rel_path.clone(), &md));
                stack.push((e.path(), rel_path));
            } else if md.is_file() {
                out.push(entry_for(rel_path, &md));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store contract on the local file system: a chunk written twice
    /// is one write, committed chunks are what a resume finds, and the file
    /// appears under its name only on finalize, whole.
    #[test]
    fn chunks_written_twice_resume_and_appear_only_when_finalized() {
        let dir = tempfile::TempDir::new().unwrap();
        let journal = Arc::new(Store::open(&dir.path().join("state")).unwrap());
        let storage = LocalStorage::new(journal, true);
        let name = dir.path().join("f.bin");
        let chunk = ferry_proto::chunk::MIN_CHUNK as usize;
        let data: Vec<u8> = (0..2 * chunk + 100).map(|i| (i % 251) as u8).collect();
        let meta = FileMeta {
            size: data.len() as u64,
            mtime_ns: 1_000_000_000,
            mode: 0o644,
            chunk_size: chunk as u32,
            alg: "blake3".into(),
            source_id: bytes::Bytes::from_static(b"source"),
        };
        let id = TransferId([7; 16]);
        let piece = |i: usize| &data[i * chunk..((i + 1) * chunk).min(data.len())];
        let hash = |i: usize| (i as u32, HashAlg::Blake3.hash(piece(i)));
        let cfg = ReceiverConfig::default;

        let (_, part) = storage.prepare_receive(&name, id, &meta, cfg()).unwrap();
        for i in [0, 1, 1] {
            let at = (i * chunk) as u64;
            part.write_chunk(at, bytes::Bytes::copy_from_slice(piece(i)))
                .unwrap();
        }
        part.commit(&vec![hash(0), hash(1)]).unwrap();
        drop(part);
        assert!(
            !name.exists(),
            "nothing under the final name before finalize"
        );

        let (rx, part) = storage.prepare_receive(&name, id, &meta, cfg()).unwrap();
        assert_eq!(rx.held().count(), 2, "the committed chunks are resumed");
        part.write_chunk((2 * chunk) as u64, bytes::Bytes::copy_from_slice(piece(2)))
            .unwrap();
        part.commit(&vec![hash(2)]).unwrap();
        assert!(
            !name.exists(),
            "nothing under the final name before finalize"
        );
        part.finalize().unwrap();
        assert_eq!(std::fs::read(&name).unwrap(), data);
        assert!(!fsutil::part_path(&name).exists());
    }

    /// `direct_io: false` receives through the page cache only: no
    /// `O_DIRECT` descriptor is opened, whatever the filesystem allows;
    /// `true` opens one where it can.
    #[test]
    fn direct_io_off_opens_no_direct_descriptor() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state")).unwrap());
        let meta = ferry_proto::message::FileMeta {
            size: 3 * fsutil::DIRECT_ALIGN as u64,
            mtime_ns: 0,
            mode: 0o644,
            chunk_size: 1 << 20,
            alg: HashAlg::Blake3.name().to_string(),
            source_id: vec![1u8; 8].into(),
        };
        let receive = |name: &str, direct_io: bool| {
            prepare_local(
                &store,
                &dir.path().join(name),
                ferry_proto::TransferId([1; 16]),
                &meta,
                ferry_proto::ReceiverConfig::default(),
                direct_io,
            )
            .unwrap()
            .1
        };
        let off = receive("off.bin", false);
        assert!(off.part_path.exists());
        assert!(off.direct.is_none());
        // On, it is opened wherever the filesystem allows it.
        let on = receive("on.bin", true);
        assert_eq!(on.direct.is_some(), fsutil::open_direct(&on.file).is_some());
    }
}
