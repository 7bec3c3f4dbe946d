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
//! 1. every file of the batch was written, verified against its digest first
//!    (a bad one is never written), to an unnamed file in its directory
//!    (`O_TMPFILE`), or where that cannot be had to its hidden
//!    `.NAME.ferry.part`;
//! 2. one `syncfs` per filesystem makes all of their data durable (instead of
//!    one fsync per file);
//! 3. each unnamed file is linked in under its final name (atomic; over an
//!    existing file it is linked to its part name and renamed over it), each
//!    named part renamed over its final name (atomic);
//! 4. each directory that received a file is fsynced once.
//!
//! Unnamed files save a name created and renamed away per file (~20 % of the
//! filesystem time for 10,000 files of 4 KiB on ext4), and a crash before
//! step 3 leaves nothing behind. Each holds a file descriptor until the commit,
//! so they are used while this process has descriptors to spare (see
//! [`anon_budget`]).
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
use std::fs::File;
use std::io::Write;
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
    already_there_seen(path, crate::paths::Seen::Unknown, f, alg)
}

/// [`already_there`] given what resolving the path saw there (one `stat`
/// less per file). A stale `Found` is safe: the content is read and
/// compared; a stale `Missing` only sends the file again.
pub fn already_there_seen(
    path: &Path,
    seen: crate::paths::Seen,
    f: &BatchFile,
    alg: HashAlg,
) -> Result<bool> {
    use crate::paths::Seen;
    use std::os::unix::fs::MetadataExt;
    let md = match seen {
        Seen::Missing => return Ok(false),
        Seen::Found(md) => md,
        Seen::Unknown => match std::fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::local(path, e)),
        },
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

/// A file of a batch written but not yet in place.
pub struct Part {
    /// Where it goes.
    pub fin: PathBuf,
    kind: PartKind,
}

enum PartKind {
    /// A hidden `.NAME.ferry.part` beside the final name, and which file it
    /// was when written (only that file is put in place).
    Named(PathBuf, fsutil::FileIdent),
    /// An unnamed file in the final name's directory, and its descriptor's
    /// share of the budget.
    Anon(File, AnonSlot),
}

impl Part {
    /// The part file's name, if it has one.
    #[cfg(test)]
    fn part_path(&self) -> Option<&Path> {
        match &self.kind {
            PartKind::Named(p, _) => Some(p),
            PartKind::Anon(..) => None,
        }
    }
}

/// Descriptors held by unnamed parts in this process now.
static ANON_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many unnamed parts may be open at once: half the descriptors this
/// process may open (`RLIMIT_NOFILE`), so connections, the journal and
/// everything else keep the other half; none where `/proc/self/fd` (which
/// `linkat` names them by) is missing.
fn anon_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        if !Path::new("/proc/self/fd").is_dir() {
            return 0;
        }
        match rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            Some(n) => usize::try_from(n / 2).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
    })
}

/// One unnamed part's share of [`anon_budget`], given back when dropped.
struct AnonSlot;

impl AnonSlot {
    fn take() -> Option<AnonSlot> {
        use std::sync::atomic::Ordering;
        let budget = anon_budget();
        let mut held = ANON_HELD.load(Ordering::Relaxed);
        loop {
            if held >= budget {
                return None;
            }
            match ANON_HELD.compare_exchange_weak(
                held,
                held + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(AnonSlot),
                Err(now) => held = now,
            }
        }
    }
}

impl Drop for AnonSlot {
    fn drop(&mut self) {
        ANON_HELD.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Writes one verified file of a batch (not yet durable, not yet visible).
pub fn write_part(final_path: &Path, f: &BatchFile, data: &[u8]) -> Result<Part> {
    write_part_as(final_path, f, data, true)
}

fn write_part_as(final_path: &Path, f: &BatchFile, data: &[u8], anon: bool) -> Result<Part> {
    // Created with its final mode where the umask leaves it whole (one
    // `fchmod` less per file); otherwise, or for a leftover named part, the
    // mode is set after.
    let want = f.mode & 0o777;
    let exact = f.mode != 0 && fsutil::umask().is_some_and(|u| want & u == 0);
    let create_mode = if exact { want } else { 0o600 };
    let slot = if anon { AnonSlot::take() } else { None };
    let anon = slot.and_then(|slot| open_anon(final_path, create_mode).map(|f| (f, slot)));
    // Which kind of part, before it has its file.
    enum Kind {
        Anon(AnonSlot),
        Named(PathBuf),
    }
    let (mut file, kind, set_mode) = match anon {
        Some((file, slot)) => (file, Kind::Anon(slot), !exact),
        None => {
            // Never through whatever is at the part's name: see create_part.
            let part = fsutil::part_path(final_path);
            let file = fsutil::create_part(&part)?;
            (file, Kind::Named(part), true)
        }
    };
    let shown = match &kind {
        Kind::Named(part) => part.as_path(),
        Kind::Anon(_) => final_path,
    };
    file.write_all(data).map_err(|e| Error::local(shown, e))?;
    fsutil::apply_meta(&file, shown, if set_mode { f.mode } else { 0 }, f.mtime_ns)?;
    let kind = match kind {
        Kind::Named(part) => {
            let ident = fsutil::FileIdent::of_file(&file, &part)?;
            PartKind::Named(part, ident)
        }
        Kind::Anon(slot) => PartKind::Anon(file, slot),
    };
    Ok(Part {
        fin: final_path.to_path_buf(),
        kind,
    })
}

/// An unnamed file in `final_path`'s directory, or `None` where the
/// filesystem has none (the caller writes a named part instead).
fn open_anon(final_path: &Path, mode: u32) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    let dir = fsutil::parent_of(final_path);
    let fd = rustix::fs::open(
        &dir,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .ok()?;
    Some(File::from(fd))
}

/// Makes written parts durable and puts them in place; returns, for each
/// part in order, whether it is now in place.
pub fn commit(parts: &[Part]) -> Vec<Result<()>> {
    if parts.is_empty() {
        return Vec::new();
    }
    // Durability order: every part's data, then the names.
    let dirs: BTreeSet<PathBuf> = parts.iter().map(|p| fsutil::parent_of(&p.fin)).collect();
    if let Err(e) = sync_data(&dirs, parts) {
        return parts.iter().map(|_| Err(e.clone_io())).collect();
    }
    let out: Vec<Result<()>> = parts.iter().map(put_in_place).collect();
    if let Err(e) = sync_names(&dirs) {
        // The names are in place but may not survive a crash: report them
        // as failed so the client sends them again (idempotent).
        tracing::warn!(error = %e, "directory fsync failed");
        return parts.iter().map(|_| Err(e.clone_io())).collect();
    }
    out
}

/// Gives a durable part its final name, atomically.
fn put_in_place(p: &Part) -> Result<()> {
    use rustix::fs::{linkat, AtFlags, CWD};
    let fin = &p.fin;
    match &p.kind {
        PartKind::Named(part, ident) => {
            let named = std::fs::symlink_metadata(part).map_err(|e| Error::local(part, e))?;
            if !named.file_type().is_file() || fsutil::FileIdent::of(&named) != *ident {
                return Err(Error::local(
                    part,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the partial file was replaced while it was written; not putting it in place",
                    ),
                ));
            }
            std::fs::rename(part, fin).map_err(|e| Error::local(fin, e))
        }
        PartKind::Anon(file, _) => {
            use std::os::fd::AsRawFd;
            let me = format!("/proc/self/fd/{}", file.as_raw_fd());
            match linkat(CWD, &me, CWD, fin, AtFlags::SYMLINK_FOLLOW) {
                Ok(()) => {
                    // A part left by an earlier attempt (a crash, or a
                    // chunked transfer of the same file) is garbage now.
                    let _ = std::fs::remove_file(fsutil::part_path(fin));
                    Ok(())
                }
                Err(rustix::io::Errno::EXIST) => {
                    // Replacing a file: link to the part name, rename over.
                    let part = fsutil::part_path(fin);
                    match std::fs::remove_file(&part) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::local(&part, e)),
                    }
                    linkat(CWD, &me, CWD, &part, AtFlags::SYMLINK_FOLLOW)
                        .map_err(|e| Error::local(&part, e.into()))?;
                    std::fs::rename(&part, fin).map_err(|e| Error::local(fin, e))
                }
                Err(e) => Err(Error::local(fin, e.into())),
            }
        }
    }
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
fn sync_data(dirs: &BTreeSet<PathBuf>, parts: &[Part]) -> Result<()> {
    match syncfs_each(dirs) {
        Some(r) => r,
        None => {
            for p in parts {
                match &p.kind {
                    PartKind::Named(part, _) => {
                        let f = File::open(part).map_err(|e| Error::local(part, e))?;
                        f.sync_all().map_err(|e| Error::local(part, e))?;
                    }
                    PartKind::Anon(file, _) => {
                        file.sync_all().map_err(|e| Error::local(&p.fin, e))?
                    }
                }
            }
            Ok(())
        }
    }
}

/// The new names durable: each directory that holds one fsynced once. (One
/// more `syncfs` instead measured no faster for 100 directories a batch,
/// and would flush everything else on the filesystem too.)
fn sync_names(dirs: &BTreeSet<PathBuf>) -> Result<()> {
    for d in dirs {
        fsutil::fsync_dir(d)?;
    }
    Ok(())
}

/// Removes parts written for a batch that will not be committed (an
/// unnamed one vanishes when its descriptor closes).
pub fn discard(parts: Vec<Part>) {
    for p in parts {
        if let PartKind::Named(part, _) = &p.kind {
            let _ = std::fs::remove_file(part);
        }
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
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let (full, seen) = crate::paths::resolve_cached_seen(root, &want.path, cache)
        .map_err(|e| Error::Usage(e.to_string()))?;
    // What resolving saw is this file's metadata unless it was a symlink.
    let md = match seen {
        crate::paths::Seen::Found(md) => md,
        _ => std::fs::metadata(&full).map_err(|e| Error::local(&full, e))?,
    };
    if !md.is_file() {
        return Err(Error::NotFound(format!("{:?} is not a file", want.path)));
    }
    if md.len() > ferry_proto::message::MAX_BATCH_FILE {
        return Err(Error::Usage(format!(
            "{:?} is too large for a batch",
            want.path
        )));
    }
    // Read with the size already known (no second stat), and at most one
    // byte past the limit.
    let mut data = Vec::with_capacity(md.len() as usize + 1);
    std::fs::File::open(&full)
        .and_then(|f| {
            f.take(ferry_proto::message::MAX_BATCH_FILE + 1)
                .read_to_end(&mut data)
        })
        .map_err(|e| Error::local(&full, e))?;
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
            assert!(!fin.exists());
            written.push(part);
        }
        let results = commit(&written);
        assert_eq!(results.len(), 3);
        for (part, r) in written.iter().zip(results) {
            r.unwrap();
            let fin = &part.fin;
            let i = fin.file_name().unwrap().to_string_lossy()[1..]
                .parse::<usize>()
                .unwrap();
            assert_eq!(std::fs::read(fin).unwrap(), vec![i as u8; 100 + i]);
        }
        drop(written);
        for dir in [a.path(), b.path()] {
            let names = names(dir);
            assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
        }
    }

    fn meta(body: &[u8], mode: u32, mtime_ns: i64) -> BatchFile {
        BatchFile {
            path: String::new(),
            size: body.len() as u64,
            mtime_ns,
            mode,
            digest: small_file_digest(HashAlg::Blake3, body),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Named and unnamed parts alike never write through a link planted at
    /// the part's name (a symlink or a hard link to a file elsewhere), and a
    /// named part swapped for a link after it was written is not put in place.
    #[test]
    fn links_planted_at_a_part_name_are_never_followed() {
        for anon in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let victim = d.path().join("victim");
            std::fs::write(&victim, b"not yours").unwrap();
            for (i, hard) in [false, true].into_iter().enumerate() {
                let fin = d.path().join(format!("f{i}"));
                let part = fsutil::part_path(&fin);
                if hard {
                    std::fs::hard_link(&victim, &part).unwrap();
                } else {
                    std::os::unix::fs::symlink(&victim, &part).unwrap();
                }
                let body = b"batch file body";
                let p = write_part_as(&fin, &meta(body, 0o644, 0), body, anon).unwrap();
                for r in commit(&[p]) {
                    r.unwrap();
                }
                assert_eq!(std::fs::read(&victim).unwrap(), b"not yours", "anon={anon}");
                let md = std::fs::symlink_metadata(&fin).unwrap();
                assert!(md.file_type().is_file(), "anon={anon}");
                assert_eq!(std::fs::read(&fin).unwrap(), body);
            }
        }
        // Swapped after writing: refused, nothing put in place.
        let d = tempfile::tempdir().unwrap();
        let fin = d.path().join("g");
        let p = write_part_as(&fin, &meta(b"x", 0o644, 0), b"x", false).unwrap();
        let part = fsutil::part_path(&fin);
        std::fs::remove_file(&part).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &part).unwrap();
        assert!(commit(&[p]).remove(0).is_err());
        assert!(!fin.exists());
    }

    /// Unnamed and named parts alike: invisible until committed, then in
    /// place with their mode and mtime, replacing what was there; a named
    /// part left over from before (another mode) is reused and fixed, or
    /// removed once an unnamed one is in place.
    #[test]
    fn parts_of_either_kind_replace_and_carry_metadata() {
        use std::os::unix::fs::PermissionsExt;
        for anon in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let old = d.path().join("old");
            std::fs::write(&old, b"previous content").unwrap();
            let new = d.path().join("new");
            let stale = fsutil::part_path(&new);
            std::fs::write(&stale, b"a leftover part").unwrap();
            std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o600)).unwrap();
            let mut parts = Vec::new();
            for (fin, body, mode) in [(&old, &b"fresh"[..], 0o640), (&new, &b"made"[..], 0o644)] {
                let p = write_part_as(fin, &meta(body, mode, 1_000_000_000), body, anon).unwrap();
                assert_eq!(p.part_path().is_none(), anon, "anon={anon}");
                parts.push(p);
            }
            assert_eq!(std::fs::read(&old).unwrap(), b"previous content");
            assert!(!new.exists());
            for r in commit(&parts) {
                r.unwrap();
            }
            drop(parts);
            for (fin, body, mode) in [(&old, &b"fresh"[..], 0o640), (&new, &b"made"[..], 0o644)] {
                assert_eq!(std::fs::read(fin).unwrap(), body, "anon={anon}");
                let md = std::fs::metadata(fin).unwrap();
                assert_eq!(md.permissions().mode() & 0o777, mode, "anon={anon}");
                assert_eq!(fsutil::mtime_ns(&md), 1_000_000_000, "anon={anon}");
            }
            // No part is left, the stale one included.
            assert_eq!(names(d.path()), vec!["new", "old"], "anon={anon}");
        }
    }

    /// A batch given up leaves nothing behind: named parts are removed,
    /// unnamed ones vanish with their descriptor, and the budget is returned.
    #[test]
    fn discarded_parts_leave_nothing() {
        use std::sync::atomic::Ordering;
        let d = tempfile::tempdir().unwrap();
        let mut parts = Vec::new();
        for (i, anon) in [true, false, true].into_iter().enumerate() {
            let fin = d.path().join(format!("f{i}"));
            parts.push(write_part_as(&fin, &meta(b"x", 0o644, 0), b"x", anon).unwrap());
        }
        assert!(ANON_HELD.load(Ordering::Relaxed) >= 2);
        assert_eq!(names(d.path()), vec![".f1.ferry.part".to_string()]);
        discard(parts);
        assert!(names(d.path()).is_empty());
    }
}
