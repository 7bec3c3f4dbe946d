//! Small files in batches: the filesystem side.
//!
//! Files that fit in one chunk (at most 256 KiB) are not worth a transfer of
//! their own: each would cost several round trips, a journal entry and a few
//! fsyncs. Instead the client announces up to 1024 of them at once
//! (`BatchPut`, with each file's digest), the receiver answers which ones it
//! does not already hold identically (`BatchNeed`), the client streams those
//! whole (`BatchData`), and on `BatchCommit` the receiver makes them durable
//! and visible together:
//!
//! 1. every file of the batch was written to its hidden `.NAME.ferry.part`,
//!    verified against its digest first (a bad one is never written);
//! 2. one `syncfs` per filesystem makes all of their data durable (instead of
//!    one fsync per file);
//! 3. each part is renamed over its final name (atomic);
//! 4. each directory that received a file is fsynced once.
//!
//! Where `syncfs` is refused, each part is fsynced instead. A batch whose
//! directories span filesystems (a mount point inside the tree) gets one
//! `syncfs` on each.
//!
//! A crash anywhere leaves each file either absent, as it was, or complete
//! and verified; re-running the copy re-announces the batch and only the files
//! not yet in place are sent again. No journal entry is needed: the content
//! itself, compared by digest, says what is already there.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferry_proto::hash::small_file_digest;
use ferry_proto::message::BatchFile;
use ferry_proto::HashAlg;

use crate::error::{Error, Result};
use crate::fsutil;

/// Whether `path` already holds exactly `f` (same size and digest). If so, its
/// mode and mtime are brought in line, as a fresh copy would have them. A
/// directory in the way is an error.
pub fn already_there(path: &Path, f: &BatchFile, alg: HashAlg) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::local(path, e)),
    };
    if md.is_dir() {
        return Err(Error::Usage(format!("{:?} is a directory", f.path)));
    }
    if !md.is_file() || md.len() != f.size {
        return Ok(false);
    }
    let data = std::fs::read(path).map_err(|e| Error::local(path, e))?;
    if data.len() as u64 != f.size || small_file_digest(alg, &data) != f.digest {
        return Ok(false);
    }
    let mode_ok = f.mode == 0 || md.mode() & 0o777 == f.mode & 0o777;
    let mtime_ok = f.mtime_ns <= 0 || fsutil::mtime_ns(&md) == f.mtime_ns;
    if !(mode_ok && mtime_ok) {
        let file = File::options()
            .write(true)
            .open(path)
            .map_err(|e| Error::local(path, e))?;
        fsutil::apply_meta(&file, path, f.mode, f.mtime_ns)?;
    }
    Ok(true)
}

/// Writes one verified file of a batch to its `.part` (not yet durable).
pub fn write_part(final_path: &Path, f: &BatchFile, data: &[u8]) -> Result<PathBuf> {
    let part = fsutil::part_path(final_path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&part)
        .map_err(|e| Error::local(&part, e))?;
    file.write_all(data).map_err(|e| Error::local(&part, e))?;
    fsutil::apply_meta(&file, &part, f.mode, f.mtime_ns)?;
    Ok(part)
}

/// Makes written parts durable and renames them into place; returns, for each
/// `(part, final)` pair in order, whether it is now in place.
pub fn commit(written: &[(PathBuf, PathBuf)]) -> Vec<Result<()>> {
    if written.is_empty() {
        return Vec::new();
    }
    // Durability order: every part's data, then the names.
    let dirs: BTreeSet<PathBuf> = written.iter().map(|(_, f)| fsutil::parent_of(f)).collect();
    if let Err(e) = sync_data(&dirs, written) {
        return written.iter().map(|_| Err(e.clone_io())).collect();
    }
    let out: Vec<Result<()>> = written
        .iter()
        .map(|(part, fin)| std::fs::rename(part, fin).map_err(|e| Error::local(fin, e)))
        .collect();
    if let Err(e) = sync_names(&dirs) {
        // The renames happened but may not survive a crash: report them
        // as failed so the client sends them again (idempotent).
        tracing::warn!(error = %e, "directory fsync failed");
        return written.iter().map(|_| Err(e.clone_io())).collect();
    }
    out
}

/// One `syncfs` per filesystem the batch wrote to: far cheaper than an fsync
/// per file when a batch holds hundreds of them. `None` when `syncfs` is
/// refused: the caller falls back to one fsync per file.
fn syncfs_each(dirs: &BTreeSet<PathBuf>) -> Option<Result<()>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = BTreeSet::new();
    for d in dirs {
        let f = match File::open(d) {
            Ok(f) => f,
            Err(e) => return Some(Err(Error::local(d, e))),
        };
        let dev = match f.metadata() {
            Ok(m) => m.dev(),
            Err(e) => return Some(Err(Error::local(d, e))),
        };
        if seen.insert(dev) && rustix::fs::syncfs(&f).is_err() {
            return None;
        }
    }
    Some(Ok(()))
}

/// Every written part's data durable.
fn sync_data(dirs: &BTreeSet<PathBuf>, written: &[(PathBuf, PathBuf)]) -> Result<()> {
    match syncfs_each(dirs) {
        Some(r) => r,
        None => {
            for (part, _) in written {
                let f = File::open(part).map_err(|e| Error::local(part, e))?;
                f.sync_all().map_err(|e| Error::local(part, e))?;
            }
            Ok(())
        }
    }
}

/// The renames durable: each directory that holds one fsynced once. (One
/// more `syncfs` instead measured no faster for 100 directories a batch,
/// and would flush everything else on the filesystem too.)
fn sync_names(dirs: &BTreeSet<PathBuf>) -> Result<()> {
    for d in dirs {
        fsutil::fsync_dir(d)?;
    }
    Ok(())
}

/// Removes parts written for a batch that will not be committed.
pub fn discard(written: &[(PathBuf, PathBuf)]) {
    for (part, _) in written {
        let _ = std::fs::remove_file(part);
    }
}

trait CloneIo {
    fn clone_io(&self) -> Error;
}

impl CloneIo for Error {
    fn clone_io(&self) -> Error {
        match self {
            Error::LocalIo { path, source } => Error::LocalIo {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            other => Error::Store(other.to_string()),
        }
    }
}

/// The server's side of one `BatchGet` entry: the file as it is now, and its
/// content unless the client's copy (`want.size`, `want.digest`) is identical.
/// A file too large for a batch is an error (the client fetches it the
/// ordinary way).
pub fn read_for_get(
    root: &Path,
    want: &BatchFile,
    alg: HashAlg,
    cache: &mut std::collections::HashMap<String, PathBuf>,
) -> Result<(BatchFile, Option<bytes::Bytes>)> {
    use std::os::unix::fs::MetadataExt;
    let full = crate::paths::resolve_cached(root, &want.path, cache)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let md = std::fs::metadata(&full).map_err(|e| Error::local(&full, e))?;
    if !md.is_file() {
        return Err(Error::NotFound(format!("{:?} is not a file", want.path)));
    }
    if md.len() > ferry_proto::message::MAX_BATCH_FILE {
        return Err(Error::Usage(format!(
            "{:?} is too large for a batch",
            want.path
        )));
    }
    let data = std::fs::read(&full).map_err(|e| Error::local(&full, e))?;
    if data.len() as u64 > ferry_proto::message::MAX_BATCH_FILE {
        return Err(Error::Usage(format!(
            "{:?} grew too large for a batch",
            want.path
        )));
    }
    let digest = small_file_digest(alg, &data);
    let file = BatchFile {
        path: want.path.clone(),
        size: data.len() as u64,
        mtime_ns: fsutil::mtime_ns(&md),
        mode: md.mode() & 0o777,
        digest,
    };
    let same = want.size == file.size && want.digest == digest;
    Ok((file, (!same).then(|| bytes::Bytes::from(data))))
}

/// The client's side of a `BatchGet` entry: what it holds at `local` (size and
/// digest), or an all-zero digest when it holds nothing comparable.
pub fn local_view(local: &Path, remote: &str, expect_size: u64, alg: HashAlg) -> BatchFile {
    let none = BatchFile {
        path: remote.to_string(),
        size: 0,
        mtime_ns: 0,
        mode: 0,
        digest: ferry_proto::ChunkHash([0; 32]),
    };
    match std::fs::symlink_metadata(local) {
        Ok(md) if md.is_file() && md.len() == expect_size => match std::fs::read(local) {
            Ok(data) => BatchFile {
                size: data.len() as u64,
                digest: small_file_digest(alg, &data),
                ..none
            },
            Err(_) => none,
        },
        _ => none,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch spread over two filesystems (here /tmp and /dev/shm where it
    /// is a separate tmpfs) is synced on each and renamed into place.
    #[test]
    fn commit_spans_filesystems() {
        let a = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        let b = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let file = |p: &Path, body: &[u8]| BatchFile {
            path: p.display().to_string(),
            size: body.len() as u64,
            mtime_ns: 0,
            mode: 0o644,
            digest: small_file_digest(HashAlg::Blake3, body),
        };
        let mut written = Vec::new();
        for (i, dir) in [a.path(), b.path(), a.path()].into_iter().enumerate() {
            let fin = dir.join(format!("f{i}"));
            let body = vec![i as u8; 100 + i];
            let part = write_part(&fin, &file(&fin, &body), &body).unwrap();
            assert!(part.exists() && !fin.exists());
            written.push((part, fin));
        }
        let results = commit(&written);
        assert_eq!(results.len(), 3);
        for ((part, fin), r) in written.iter().zip(results) {
            r.unwrap();
            assert!(!part.exists());
            let i = fin.file_name().unwrap().to_string_lossy()[1..]
                .parse::<usize>()
                .unwrap();
            assert_eq!(std::fs::read(fin).unwrap(), vec![i as u8; 100 + i]);
        }
    }
}
