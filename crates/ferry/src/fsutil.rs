//! File-system helpers: durable writes, atomic renames, file identity.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use crate::error::{Error, Result};

/// fsyncs a directory so a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::local(dir, e))?;
    d.sync_all().map_err(|e| Error::local(dir, e))
}

/// `mkdir -p` that makes each new directory durable: after creating one,
/// its parent is fsynced, so a crash cannot lose a directory that holds
/// a file we already reported as in place.
pub fn create_dirs_durable(dir: &Path) -> std::io::Result<()> {
    create_dirs_durable_many([dir])
        .map(|_| ())
        .map_err(|(_, e)| e)
}

/// [`create_dirs_durable`] for a whole tree: every directory is created
/// first, then each one that gained an entry is fsynced once. A hundred
/// directories under one parent cost one fsync of the parent, not a
/// hundred (on a journalled ext4, ~4 ms instead of ~90). Nothing is
/// durable until it returns `Ok`; an error names the path it is about.
/// Returns those of `dirs` it created (the others existed already, and keep
/// their own mode and mtime).
pub fn create_dirs_durable_many<'a>(
    dirs: impl IntoIterator<Item = &'a Path>,
) -> std::result::Result<std::collections::BTreeSet<PathBuf>, (PathBuf, std::io::Error)> {
    let mut grew = std::collections::BTreeSet::new();
    let mut created = std::collections::BTreeSet::new();
    for dir in dirs {
        if create_dirs_noting(dir, &mut grew).map_err(|e| (dir.to_path_buf(), e))? {
            created.insert(dir.to_path_buf());
        }
    }
    fsync_dirs(&grew)?;
    Ok(created)
}

/// `mkdir -p` that does not fsync: adds the directory each new one was
/// created in to `grew`, for [`fsync_dirs`] once the run is made. Returns
/// whether `dir` itself was created by this call; an existing
/// non-directory at `dir` is an error (`NotADirectory`).
pub fn create_dirs_noting(
    dir: &Path,
    grew: &mut std::collections::BTreeSet<PathBuf>,
) -> std::io::Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    if dir.exists() {
        return Err(not_a_directory());
    }
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    while !cur.exists() {
        missing.push(cur.clone());
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p.to_path_buf(),
            _ => break,
        }
    }
    let mut made_last = false;
    for d in missing.iter().rev() {
        made_last = match std::fs::create_dir(d) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => false,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(not_a_directory())
            }
            Err(e) => return Err(e),
        };
        if made_last {
            grew.insert(parent_of(d));
        }
    }
    Ok(made_last)
}

fn not_a_directory() -> std::io::Error {
    std::io::Error::from_raw_os_error(rustix::io::Errno::NOTDIR.raw_os_error())
}

/// fsyncs each of `dirs`; an error names the directory.
pub fn fsync_dirs(
    dirs: &std::collections::BTreeSet<PathBuf>,
) -> std::result::Result<(), (PathBuf, std::io::Error)> {
    for d in dirs {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| (d.clone(), e))?;
    }
    Ok(())
}

/// Parent directory of `p` ("." for a bare name).
pub fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `body` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    write_atomic_mode(path, body, 0o644)
}

/// [`write_atomic`] for secrets: the file is created with mode 0600, so it is
/// never readable by others, not even for a moment.
pub fn write_private(path: &Path, body: &[u8]) -> Result<()> {
    write_atomic_mode(path, body, 0o600)
}

fn write_atomic_mode(path: &Path, body: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_of(path);
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    {
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::local(&tmp, e))?;
        f.write_all(body).map_err(|e| Error::local(&tmp, e))?;
        f.sync_all().map_err(|e| Error::local(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::local(path, e))?;
    fsync_dir(&dir)
}

/// The `.part` name a file is received under until it is verified.
pub fn part_path(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(final_path).join(format!(".{name}.ferry.part"))
}

/// Whether a directory entry name is one of ferry's partial files.
pub fn is_part_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".ferry.part")
}

/// Which file a descriptor or a name refers to: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdent {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdent {
    pub fn of(md: &std::fs::Metadata) -> Self {
        FileIdent {
            dev: md.dev(),
            ino: md.ino(),
        }
    }

    /// The identity of an open file.
    pub fn of_file(f: &File, path: &Path) -> Result<Self> {
        Ok(Self::of(&f.metadata().map_err(|e| Error::local(path, e))?))
    }
}

/// Options for a partial file: read and write, never through a link at the
/// last component (`O_NOFOLLOW`), without blocking on a FIFO planted there.
fn part_options() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true).write(true).custom_flags(
        (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC)
            .bits() as i32,
    );
    o
}

/// Whether `f`, opened at `path`, is a partial file ferry can write without
/// touching anything else: a regular file with one name.
fn is_private_regular(f: &File, path: &Path) -> Result<bool> {
    let md = f.metadata().map_err(|e| Error::local(path, e))?;
    Ok(md.file_type().is_file() && md.nlink() == 1)
}

/// Creates a fresh partial file at `path`, for this transfer alone, and takes
/// its lock (see [`lock_part`]). Whatever was at that name before (a part of
/// an earlier run, or a symlink, hard link, FIFO or device someone planted) is
/// never opened for writing: its name is removed (removing a link leaves its
/// target alone) and the part is created anew with `O_EXCL | O_NOFOLLOW`, so
/// the bytes written land in a file that nobody else can reach. A part that
/// another ferry process holds is refused, not removed.
pub fn create_part(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    for _ in 0..4 {
        match part_options().create_new(true).mode(0o600).open(path) {
            Ok(f) => {
                lock_part(&f, path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let md = std::fs::symlink_metadata(path).map_err(|e| Error::local(path, e))?;
                if md.is_dir() {
                    return Err(Error::local(
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "a directory is in the way of the partial file",
                        ),
                    ));
                }
                if md.file_type().is_file() {
                    // Ours from an earlier run, possibly still being written
                    // by another process: its lock tells.
                    if let Ok(old) = part_options().open(path) {
                        lock_part(&old, path)?;
                    }
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::local(path, e)),
                }
            }
            Err(e) => return Err(Error::local(path, e)),
        }
    }
    Err(Error::local(
        path,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "something keeps appearing at the partial file's name",
        ),
    ))
}

/// Opens the partial file at `path` to resume it, only if it is still the
/// file this transfer made: a regular file with one name, not reached
/// through a link, and (where the journal recorded it) the same inode.
/// `None` means it is missing or not to be trusted: start afresh with
/// [`create_part`].
pub fn reopen_part(path: &Path, expect: Option<FileIdent>) -> Result<Option<File>> {
    let f = match part_options().open(path) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    if !is_private_regular(&f, path)? {
        return Ok(None);
    }
    if let Some(want) = expect {
        if FileIdent::of_file(&f, path)? != want {
            return Ok(None);
        }
    }
    lock_part(&f, path)?;
    Ok(Some(f))
}

/// Opens the partial file at `path` for writing at offsets, resuming it if it
/// is a private regular file (see [`reopen_part`]), else creating it afresh
/// (see [`create_part`]); takes its lock either way.
pub fn open_part(path: &Path) -> Result<File> {
    match reopen_part(path, None)? {
        Some(f) => Ok(f),
        None => create_part(path),
    }
}

/// Whether `path` still names the open file `f` (nothing was swapped in).
pub fn still_named(f: &File, path: &Path) -> bool {
    let (Ok(named), Ok(open)) = (std::fs::symlink_metadata(path), f.metadata()) else {
        return false;
    };
    named.file_type().is_file() && FileIdent::of(&named) == FileIdent::of(&open)
}

/// Alignment of `O_DIRECT` writes (offset, length and memory): 4096 covers
/// devices with 512-byte and 4 KiB logical blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// A second descriptor on a partial file for writes that bypass the page
/// cache (`O_DIRECT`), or `None` where the filesystem refuses it (callers
/// skip it when their `direct_io` setting is off). Received chunks are fsynced anyway and never read
/// back, so the page cache only costs a copy (and, in VMs that hand freed
/// memory back to the host, a fault per fresh page: on this test VM a
/// buffered 2 GiB write took 8-10 s and 6-9 CPU s, an `O_DIRECT` one
/// 2.1-2.6 s and 0.6 CPU s). The caller's descriptor keeps the lock and
/// does the fsyncs, which cover both (they act on the file).
pub fn open_direct(part: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Reopened through the descriptor, not the name: the name may have been
    // replaced since, the descriptor cannot.
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(format!("/proc/self/fd/{}", part.as_raw_fd()))
        .ok()
}

/// Whether a write at `offset` of `len` bytes can go through `O_DIRECT`.
pub fn direct_aligned(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

/// Bytes in memory aligned for `O_DIRECT` (to [`DIRECT_ALIGN`]), in an
/// allocation that can be reused for the next chunk.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes (zeroes, or what `reuse` held) to be filled in.
    pub fn with_len(len: usize, reuse: Option<Vec<u8>>) -> Self {
        let mut raw = reuse.unwrap_or_default();
        if raw.len() < len + DIRECT_ALIGN {
            raw.resize(len + DIRECT_ALIGN, 0);
        }
        // Never past the slack (an unaligned start only makes the kernel
        // refuse the write with EINVAL, and the page cache takes it).
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { raw, start, len }
    }

    /// A copy of `data`, in `reuse` if given (grown as needed).
    pub fn copy_of(data: &[u8], reuse: Option<Vec<u8>>) -> Self {
        let mut b = Self::with_len(data.len(), reuse);
        b.bytes_mut().copy_from_slice(data);
        b
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// These bytes as [`bytes::Bytes`]; the allocation goes back to `pool`
    /// when the last reference is dropped.
    pub fn into_bytes(self, pool: &BufPool) -> bytes::Bytes {
        bytes::Bytes::from_owner(Pooled {
            buf: self,
            pool: pool.clone(),
        })
    }
}

/// Allocations for chunk payloads, handed back when a payload is dropped
/// (see [`AlignedBuf::into_bytes`]) and reused: a fresh multi-megabyte
/// allocation per chunk costs a page fault per page, and the allocator
/// keeps what it freed, so memory grew with the chunk size. Holds at most
/// [`BufPool::KEEP`] free allocations.
#[derive(Clone, Default)]
pub struct BufPool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    pub const KEEP: usize = 4;

    pub fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.pop()
    }

    pub fn give(&self, raw: Vec<u8>) {
        if let Ok(mut free) = self.0.lock() {
            if free.len() < Self::KEEP {
                free.push(raw);
            }
        }
    }
}

/// An [`AlignedBuf`] inside [`bytes::Bytes`], going back to its pool when dropped.
struct Pooled {
    buf: AlignedBuf,
    pool: BufPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.bytes()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf.raw));
    }
}

/// Writes `buf` at `offset` through an `O_DIRECT` descriptor. `EINVAL`
/// means the write was refused as it is (memory, offset or length not
/// aligned): the caller writes it through the page cache instead.
pub fn write_direct(f: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, offset)
}

/// Whether `buf` sits in memory aligned for `O_DIRECT`.
pub fn direct_memory(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
}

/// One writer per partial file, across processes: an exclusive advisory lock
/// held as long as the file is open. A second `ferry` writing the same
/// destination (two downloads to one local path, two servers on one root) is
/// refused instead of interleaving its chunks with ours.
pub fn lock_part(f: &File, path: &Path) -> Result<()> {
    use rustix::fs::{flock, FlockOperation};
    match flock(f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::LocalIo {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another ferry process is writing this file right now",
            ),
        }),
        // Filesystems without locks: go on unprotected rather than fail.
        Err(_) => Ok(()),
    }
}

/// mtime in nanoseconds since the epoch.
pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// An identity of a file version: changes when its content may have changed
/// (size, mtime and ctime in ns, inode, device). ctime cannot be set back by
/// users, so an edit that restores mtime is still seen.
pub fn source_id(md: &std::fs::Metadata) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&md.size().to_be_bytes());
    v.extend_from_slice(&mtime_ns(md).to_be_bytes());
    v.extend_from_slice(&md.ctime().to_be_bytes());
    v.extend_from_slice(&md.ctime_nsec().to_be_bytes());
    v.extend_from_slice(&md.ino().to_be_bytes());
    v.extend_from_slice(&md.dev().to_be_bytes());
    v
}

/// Sets permission bits and mtime on an open file.
pub fn apply_meta(f: &File, path: &Path, mode: u32, mtime_ns: i64) -> Result<()> {
    if mode != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| Error::local(path, e))?;
    }
    if mtime_ns > 0 {
        let t = UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64);
        f.set_modified(t).map_err(|e| Error::local(path, e))?;
    }
    Ok(())
}

/// Sets a directory's permission bits and mtime.
pub fn apply_dir_meta(path: &Path, mode: u32, mtime_ns: i64) -> Result<()> {
    if mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| Error::local(path, e))?;
    }
    if mtime_ns > 0 {
        let f = File::open(path).map_err(|e| Error::local(path, e))?;
        let t = UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64);
        f.set_modified(t).map_err(|e| Error::local(path, e))?;
    }
    Ok(())
}

/// Finalises a verified partial file: cut to its expected `size` (bytes past
/// it are never part of a file), metadata, fsync, atomic rename, dir fsync.
/// The rename happens only while `part_path` still names the file that was
/// written and verified, so nothing swapped in under that name is ever put in
/// place.
pub fn finalize_part(
    part: &File,
    part_path: &Path,
    final_path: &Path,
    size: u64,
    mode: u32,
    mtime_ns: i64,
) -> Result<()> {
    let len = part
        .metadata()
        .map_err(|e| Error::local(part_path, e))?
        .len();
    if len != size {
        part.set_len(size).map_err(|e| Error::local(part_path, e))?;
    }
    apply_meta(part, part_path, mode, mtime_ns)?;
    part.sync_all().map_err(|e| Error::local(part_path, e))?;
    if !still_named(part, part_path) {
        return Err(Error::local(
            part_path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the partial file was replaced while it was written; not putting it in place",
            ),
        ));
    }
    std::fs::rename(part_path, final_path).map_err(|e| Error::local(final_path, e))?;
    fsync_dir(&parent_of(final_path))
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The key under which a source's chunk hashes are remembered.
pub fn source_key(path: &str, source_id: &[u8], chunk_size: u32, alg: &str) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry source key\0");
    h.update(path.as_bytes());
    h.update(&[0]);
    h.update(source_id);
    h.update(&chunk_size.to_be_bytes());
    h.update(alg.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

/// Raises this process's soft limit on open files to its hard limit (at most
/// 65,536), as a server with many connections, and batches holding unnamed
/// parts open until they commit, want. Best effort: the limit stays where it
/// was if raising it is refused. Call it before anything is running.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let want = l.maximum.map_or(65_536, |m| m.min(65_536));
    if l.current.is_some_and(|c| c < want) {
        l.current = Some(want);
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// This process's umask, read once from `/proc/self/status` (`umask(2)`
/// cannot be read without setting it, which races with other threads);
/// `None` where that is not available.
pub fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_partial_file_has_one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".x.ferry.part");
        let first = open_part(&p).unwrap();
        let e = open_part(&p).unwrap_err();
        assert!(e.to_string().contains("another ferry process"), "{e}");
        drop(first);
        open_part(&p).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_of_directories_is_made_and_each_parent_noted_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let want = [root.join("a/b/c"), root.join("a/b/d"), root.join("e")];
        let mut grew = std::collections::BTreeSet::new();
        for d in &want {
            create_dirs_noting(d, &mut grew).unwrap();
        }
        let noted: Vec<_> = grew.iter().cloned().collect();
        assert_eq!(
            noted,
            [root.to_path_buf(), root.join("a"), root.join("a/b")],
            "each directory that gained an entry, once"
        );
        fsync_dirs(&grew).unwrap();
        for d in &want {
            assert!(d.is_dir(), "{}", d.display());
        }
        // Already there: nothing to note, nothing to fsync.
        let mut again = std::collections::BTreeSet::new();
        create_dirs_noting(&want[0], &mut again).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn a_file_in_the_way_names_the_directory_that_could_not_be_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let ok = dir.path().join("ok");
        let bad = dir.path().join("f/sub");
        let (at, e) = create_dirs_durable_many([ok.as_path(), bad.as_path()]).unwrap_err();
        assert_eq!(at, bad);
        assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory, "{e}");
        assert!(ok.is_dir(), "the ones before it are made");
    }

    #[test]
    fn only_directories_made_here_are_reported_made_and_a_file_is_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let new = dir.path().join("new/sub");
        let made = create_dirs_durable_many([old.as_path(), new.as_path()]).unwrap();
        assert_eq!(made.into_iter().collect::<Vec<_>>(), [new]);
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let mut grew = std::collections::BTreeSet::new();
        let e = create_dirs_noting(&file, &mut grew).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory, "{e}");
        assert!(grew.is_empty());
    }

    #[test]
    fn direct_writes_land_and_misaligned_ones_are_refused_with_einval() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".x.ferry.part");
        let part = open_part(&p).unwrap();
        part.set_len(3 * DIRECT_ALIGN as u64).unwrap();
        let Some(direct) = open_direct(&part) else {
            eprintln!("no O_DIRECT on this filesystem: nothing to check");
            return;
        };
        let data: Vec<u8> = (0..2 * DIRECT_ALIGN).map(|i| (i % 251) as u8).collect();
        assert!(direct_aligned(DIRECT_ALIGN as u64, data.len()));
        let buf = AlignedBuf::copy_of(&data, None);
        write_direct(&direct, buf.bytes(), DIRECT_ALIGN as u64).unwrap();
        let mut back = vec![0u8; data.len()];
        part.read_exact_at(&mut back, DIRECT_ALIGN as u64).unwrap();
        assert_eq!(back, data);
        // What the receiver writes through the page cache instead.
        assert!(!direct_aligned(100, data.len()));
        // The allocation goes back to its pool once dropped, for the next chunk.
        let pool = BufPool::default();
        drop(buf.into_bytes(&pool));
        let buf = AlignedBuf::copy_of(&data, pool.take());
        assert_eq!(buf.bytes(), &data[..]);
        let e = write_direct(&direct, buf.bytes(), 100).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::INVAL.raw_os_error()),
            "{e}"
        );
    }
}
