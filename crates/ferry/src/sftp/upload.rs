//! Uploads: data goes to `PATH.part` on the server, range by range; each
//! range is written with many requests in flight, flushed
//! (`fsync@openssh.com`) and only then recorded in the sidecar. A resume
//! proves the remote prefix by reading back recorded ranges, rewrites from
//! the first one that does not verify, and the finished file is verified per
//! [`Verify`] before it is renamed over `PATH` (`posix-rename@openssh.com`
//! where offered; otherwise remove-then-rename, which leaves a moment with
//! no file at `PATH`).
//!
//! The finished file is verified by reading its ranges back, or, where the
//! server announces `check-file-handle`, by asking it for a SHA-256 of the
//! range and comparing with the source's (no data comes back over the
//! network). OpenSSH's sftp-server does not offer that extension, so against
//! OpenSSH it is always read-back; the tests cover check-file with a shim
//! that adds it in front of sftp-server.

use std::os::unix::fs::FileExt;
use std::path::Path;

use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use std::sync::Arc;

use russh_sftp::client::RawSftpSession;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::auth::Conn;
use super::remote_hash::{self, Hashing, Local};
use super::remote_io::{range_count, range_len, sftp_string, Pieces, WINDOW};
use super::sidecar::{self, PendingFlush, Sidecar, RANGE_SIZE, TAIL_LEN};
use super::{
    is_no_such_file, sftp_err, FileOutcome, Job, RestartReason, Resume, SftpTarget, VerifiedBy,
    Verify,
};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::store::Store;

/// A range being read and hashed: its bytes and [`sidecar::range_digest`].
type Prefetch = tokio::task::JoinHandle<Result<(Pieces, String)>>;

/// Ranges written between two flushes + sidecar records.
const CHECKPOINT_RANGES: usize = 4;

/// Whether the target path names an existing directory.
pub async fn is_remote_dir(c: &Conn, t: &SftpTarget) -> Result<bool> {
    match c.raw.stat(t.path.clone()).await {
        Ok(a) => Ok(a.attrs.is_dir()),
        Err(e) if is_no_such_file(&e) => Ok(false),
        Err(e) => Err(sftp_err("stat", &t.path, &t.hostport(), e)),
    }
}

/// Creates a remote directory unless it exists.
pub async fn mkdir(c: &Conn, t: &SftpTarget) -> Result<()> {
    if is_remote_dir(c, t).await? {
        return Ok(());
    }
    c.raw
        .mkdir(t.path.clone(), FileAttributes::default())
        .await
        .map_err(|e| sftp_err("mkdir", &t.path, &t.hostport(), e))?;
    Ok(())
}

fn tail_digest(f: &std::fs::File, path: &Path, size: u64) -> Result<String> {
    let n = size.min(TAIL_LEN);
    let mut buf = vec![0u8; n as usize];
    f.read_exact_at(&mut buf, size - n)
        .map_err(|e| Error::local(path, e))?;
    Ok(sidecar::hex32(&blake3::hash(&buf)))
}

/// Range `i` of a local file, in pieces of `block` bytes (one write request each).
fn read_local_range(
    f: &std::fs::File,
    path: &Path,
    size: u64,
    i: u64,
    block: u32,
) -> Result<Pieces> {
    let (start, len) = (i * RANGE_SIZE, range_len(size, i));
    let block = u64::from(block.max(1));
    let mut pieces = Vec::with_capacity(len.div_ceil(block) as usize);
    let mut at = 0;
    while at < len {
        let mut buf = vec![0u8; block.min(len - at) as usize];
        f.read_exact_at(&mut buf, start + at)
            .map_err(|e| Error::local(path, e))?;
        at += buf.len() as u64;
        pieces.push(buf);
    }
    Ok(Pieces(pieces))
}

type WriteResult = std::result::Result<u64, russh_sftp::client::error::Error>;

/// Write requests in flight (at most [`WINDOW`]) across ranges; ranges are
/// reported done in order, once every request of theirs was acknowledged.
struct Writes<'a> {
    c: &'a Conn,
    handle: &'a str,
    what: &'a str,
    host: &'a str,
    set: JoinSet<WriteResult>,
    /// Requests in flight at most: [`WINDOW`], or 1 for a server that takes
    /// writes only in order.
    window: usize,
    /// Ranges issued and not yet taken, in order.
    ranges: std::collections::VecDeque<InFlightRange>,
}

struct InFlightRange {
    off: u64,
    unanswered: usize,
    digest: String,
    len: u64,
}

impl<'a> Writes<'a> {
    fn new(c: &'a Conn, handle: &'a str, what: &'a str, host: &'a str, window: usize) -> Self {
        Self {
            c,
            handle,
            what,
            host,
            set: JoinSet::new(),
            window: window.max(1),
            ranges: Default::default(),
        }
    }

    /// Sends the range at `off`, waiting for answers whenever the window is full.
    async fn issue(&mut self, off: u64, data: Pieces, digest: String) -> Result<()> {
        let len = data.len();
        let pieces = data.into_inner();
        self.ranges.push_back(InFlightRange {
            off,
            unanswered: pieces.len(),
            digest,
            len,
        });
        let mut at = off;
        for piece in pieces {
            while self.set.len() >= self.window {
                self.answer().await?;
            }
            let (raw, h, n) = (self.c.raw.clone(), self.handle.to_string(), piece.len());
            self.set
                .spawn(async move { raw.write(h, at, piece).await.map(|_| off) });
            at += n as u64;
        }
        Ok(())
    }

    /// Waits for one answer.
    async fn answer(&mut self) -> Result<()> {
        let Some(r) = self.set.join_next().await else {
            return Ok(());
        };
        let off = r
            .map_err(|e| Error::Ssh {
                host: self.host.into(),
                msg: e.to_string(),
            })?
            .map_err(|e| sftp_err("write", self.what, self.host, e))?;
        if let Some(r) = self.ranges.iter_mut().find(|r| r.off == off) {
            r.unanswered = r.unanswered.saturating_sub(1);
        }
        Ok(())
    }

    /// Waits for every answer.
    async fn finish(&mut self) -> Result<()> {
        while !self.set.is_empty() {
            self.answer().await?;
        }
        Ok(())
    }

    /// The oldest range, if all of it was acknowledged: (digest, length).
    fn take_done(&mut self) -> Option<(String, u64)> {
        if self.ranges.front().is_some_and(|r| r.unanswered == 0) {
            self.ranges.pop_front().map(|r| (r.digest, r.len))
        } else {
            None
        }
    }
}

/// Where checkpoint flushes (`fsync@openssh.com`) go while writes continue.
struct Flusher {
    raw: Arc<RawSftpSession>,
    handle: String,
    /// Whether `raw` is a side session of its own (closed at the end).
    side: bool,
    has_fsync: bool,
}

impl Flusher {
    /// A side session with `part` open for reading when the server allows
    /// one (fsync covers the file, whichever descriptor wrote it: data the
    /// main session had acknowledged is durable once it answers), else the
    /// main session and its handle.
    /// `side` false: no side session (too few checkpoints to pay for one).
    async fn open(c: &Conn, main_handle: &str, part: &str, side: bool) -> Self {
        let main = Self {
            raw: c.raw.clone(),
            handle: main_handle.to_string(),
            side: false,
            has_fsync: c.has("fsync@openssh.com"),
        };
        if !side {
            return main;
        }
        let Some(raw) = c.side_session().await else {
            return main;
        };
        match raw
            .open(part.to_string(), OpenFlags::READ, FileAttributes::default())
            .await
        {
            Ok(h) => {
                debug!(part, "checkpoint flushes go on a side session");
                Self {
                    raw: Arc::new(raw),
                    handle: h.handle,
                    side: true,
                    has_fsync: true,
                }
            }
            Err(e) => {
                debug!(error = %e, part, "side session cannot open the partial; flushing on the main session");
                main
            }
        }
    }

    /// Flushes everything written and acknowledged so far (nothing to do
    /// where the server offers no `fsync@openssh.com`).
    fn flush(&self, what: &str, host: &str) -> impl std::future::Future<Output = Result<()>> {
        let (raw, h, what, host) = (
            self.raw.clone(),
            self.handle.clone(),
            what.to_string(),
            host.to_string(),
        );
        let has = self.has_fsync;
        async move {
            if has {
                raw.fsync(h)
                    .await
                    .map_err(|e| sftp_err("fsync", &what, &host, e))?;
            }
            Ok(())
        }
    }

    /// [`Flusher::flush`] as a task of its own, while more is written.
    fn start(&self, what: &str, host: &str) -> tokio::task::JoinHandle<Result<()>> {
        tokio::spawn(self.flush(what, host))
    }

    async fn close(self) {
        if self.side {
            let _ = self.raw.close(self.handle).await;
            let _ = self.raw.close_session();
        }
    }
}

/// Records `ranges` (flushed on the server) in the sidecar.
fn claim(
    store: &Store,
    key: &str,
    rec: &mut Sidecar,
    ranges: &[String],
    stop_after_ranges: Option<usize>,
) -> Result<()> {
    rec.ranges = ranges.to_vec();
    sidecar::put(store, key, rec)?;
    if stop_after_ranges.is_some_and(|n| rec.ranges.len() >= n) {
        return Err(Error::Usage("stopped for a test".into()));
    }
    Ok(())
}

/// Renames `part` over `dst`: atomically with `posix-rename@openssh.com`,
/// otherwise (not offered, or refused) by removing `dst` first, since plain
/// SFTP rename refuses to replace. Returns whether the rename was atomic.
async fn rename_over(c: &Conn, part: &str, dst: &str, host: &str) -> Result<bool> {
    if c.has("posix-rename@openssh.com") {
        let mut data = Vec::new();
        sftp_string(&mut data, part);
        sftp_string(&mut data, dst);
        let r = c
            .raw
            .extended("posix-rename@openssh.com", data)
            .await
            .map_err(|e| sftp_err("posix-rename", dst, host, e))?;
        match r {
            Packet::Status(s) if s.status_code == StatusCode::Ok => return Ok(true),
            Packet::Status(s) => {
                warn!(%host, status = %s.status_code, "posix-rename refused; removing then renaming")
            }
            _ => {
                return Err(Error::SftpStatus {
                    op: "posix-rename",
                    path: dst.into(),
                    code: 4,
                    msg: "unexpected reply".into(),
                })
            }
        }
    }
    let _ = c.raw.remove(dst.to_string()).await;
    c.raw
        .rename(part.to_string(), dst.to_string())
        .await
        .map_err(|e| sftp_err("rename", dst, host, e))?;
    Ok(false)
}

/// What is at the remote `PATH.part`, seen without following a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Missing,
    /// A regular file of this size.
    Regular(u64),
    /// A symlink, directory, or anything else (or a type the server does not say).
    Other {
        dir: bool,
    },
}

async fn part_kind(c: &Conn, part: &str, host: &str) -> Result<PartKind> {
    match c.raw.lstat(part.to_string()).await {
        Ok(a) => {
            let kind = a.attrs.permissions.unwrap_or(0) & 0o170_000;
            Ok(match kind {
                0o100_000 => PartKind::Regular(a.attrs.size.unwrap_or(0)),
                k => PartKind::Other {
                    dir: k == 0o040_000,
                },
            })
        }
        Err(e) if is_no_such_file(&e) => Ok(PartKind::Missing),
        Err(e) => Err(sftp_err("lstat", part, host, e)),
    }
}

/// Removes a name that is not a regular file: a symlink is removed itself
/// (its target is untouched), an empty directory with rmdir.
async fn remove_name(c: &Conn, part: &str, host: &str, dir: bool) -> Result<()> {
    let r = if dir {
        c.raw.rmdir(part.to_string()).await
    } else {
        c.raw.remove(part.to_string()).await
    };
    match r {
        Ok(_) => Ok(()),
        Err(e) if is_no_such_file(&e) => Ok(()),
        Err(e) => Err(sftp_err("remove", part, host, e)),
    }
}

/// How many recorded ranges of the remote partial (`part_size` bytes, a
/// regular file) still verify, and how that was proved. With `full`, all of
/// them, against the record and the source as it is now: hashed by the
/// server where it can, else read back. Otherwise only the last one, walking
/// back on a mismatch.
#[allow(clippy::too_many_arguments)]
async fn proven_ranges(
    c: &Conn,
    store: &Store,
    part: &str,
    host: &str,
    rec: &Sidecar,
    size: u64,
    part_size: u64,
    verify: Verify,
    hashing: &Hashing,
    src: Local<'_>,
) -> Result<(usize, Option<VerifiedBy>)> {
    let covered = (0..range_count(size))
        .take_while(|&i| i * RANGE_SIZE + range_len(size, i) <= part_size)
        .count();
    let k = rec.ranges.len().min(covered);
    if k == 0 {
        return Ok((0, None));
    }
    if verify == Verify::Full {
        if let Some((bad, by)) = remote_hash::server_first_mismatch(
            c,
            store,
            hashing,
            part,
            host,
            size,
            0..k as u64,
            src,
            &rec.ranges,
        )
        .await?
        {
            return Ok((bad as usize, Some(by)));
        }
    }
    let h = c
        .raw
        .open(part.to_string(), OpenFlags::READ, FileAttributes::default())
        .await
        .map_err(|e| sftp_err("open", part, host, e))?
        .handle;
    let r = if verify == Verify::Full {
        remote_hash::readback_first_mismatch(
            c,
            &h,
            part,
            host,
            size,
            0..k as u64,
            Some(src),
            &rec.ranges,
        )
        .await
        .map(|bad| bad as usize)
    } else {
        // Prove the range we would append to; on mismatch walk back to the
        // last one that verifies.
        let mut i = k;
        let mut r = Ok(0);
        while i > 0 {
            let j = (i - 1) as u64;
            match remote_hash::readback_first_mismatch(
                c,
                &h,
                part,
                host,
                size,
                j..j + 1,
                None,
                &rec.ranges,
            )
            .await
            {
                Ok(b) if b > j => break,
                Ok(_) => {}
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
            warn!(part, range = j, "remote partial damaged; walking back");
            i -= 1;
        }
        r.map(|_| i)
    };
    let _ = c.raw.close(h).await;
    Ok((r?, Some(VerifiedBy::Readback)))
}

/// The server failed a write because it takes writes only in order (rclone
/// serve sftp without a write cache answers "Illegal seek").
fn needs_in_order_writes(e: &Error) -> bool {
    matches!(e, Error::SftpStatus { op: "write", msg, .. }
        if msg.to_ascii_lowercase().contains("illegal seek"))
}

/// Uploads one file; see the module documentation. Some servers need a
/// second go, remembered per host in the state store: one that fails writes
/// sent many at a time is sent one write at a time, and one whose partial
/// no longer holds the bytes proven before this run's writes (rclone's write
/// cache reopens a file without its content) is sent from byte 0 in one go.
pub async fn upload(
    c: &Conn,
    job: &Job,
    store: &Store,
    progress: &Progress,
    verify: Verify,
    stop_after_ranges: Option<usize>,
) -> Result<FileOutcome> {
    let host = job.remote.hostport();
    let mut notes = Vec::new();
    loop {
        let r = upload_once(c, job, store, progress, verify, stop_after_ranges).await;
        let mut caps = sidecar::host_caps(store, &host)?;
        let note = match r {
            Ok(Attempt::Done(mut out)) => {
                notes.append(&mut out.notes);
                out.notes = notes;
                return Ok(out);
            }
            Ok(Attempt::KeptBytesLost { range }) if !caps.no_offset_writes => {
                caps.no_offset_writes = true;
                format!(
                    "{host}: range {range} of the partial, proven before this run wrote to it, no longer verified (the server does not keep a file's content when it is reopened); remembered, sending from byte 0"
                )
            }
            Ok(Attempt::KeptBytesLost { range }) => {
                return Err(Error::SftpIntegrity {
                    path: format!("{}.part", job.remote.path),
                    detail: format!("range {range} differs after a fresh upload"),
                })
            }
            Err(e) if needs_in_order_writes(&e) && !caps.in_order_writes => {
                caps.in_order_writes = true;
                format!("{host}: server takes writes only in order ({e}); remembered, sending one write at a time")
            }
            Err(e) => return Err(e),
        };
        warn!("{note}");
        notes.push(note);
        sidecar::put_host_caps(store, &host, &caps)?;
        progress.undo_file();
    }
}

/// How one go of [`upload_once`] ended.
enum Attempt {
    Done(FileOutcome),
    /// A range kept from an earlier run was proven, then differed after this
    /// run wrote to the partial.
    KeptBytesLost {
        range: u64,
    },
}

async fn upload_once(
    c: &Conn,
    job: &Job,
    store: &Store,
    progress: &Progress,
    verify: Verify,
    stop_after_ranges: Option<usize>,
) -> Result<Attempt> {
    let host = job.remote.hostport();
    let remote = job.remote.path.clone();
    let part = format!("{remote}.part");
    let url = job.remote.url(&remote);
    let local_key = std::fs::canonicalize(&job.local)
        .unwrap_or_else(|_| job.local.clone())
        .display()
        .to_string();
    let key = sidecar::upload_key(&local_key, &url);
    let f = std::fs::File::open(&job.local).map_err(|e| Error::local(&job.local, e))?;
    let md = f.metadata().map_err(|e| Error::local(&job.local, e))?;
    let (size, mtime_ns) = (md.len(), fsutil::mtime_ns(&md));
    let source_id = fsutil::hex(&fsutil::source_id(&md));
    let tail = tail_digest(&f, &job.local, size)?;
    let mut caps = sidecar::host_caps(store, &host)?;
    let mut notes = Vec::new();
    let src = Local {
        file: &f,
        path: &job.local,
    };
    let hashing = remote_hash::hashing(
        c,
        store,
        format!("{}@{host}", job.remote.user),
        verify == Verify::Full,
    )
    .await?;

    // Never write through a name we did not create: a symlink (or anything
    // but a regular file) at PATH.part is removed, and the part made anew.
    let mut kind = part_kind(c, &part, &host).await?;
    if let PartKind::Other { dir } = kind {
        warn!(
            part,
            "remote partial is not a regular file; removing that name"
        );
        remove_name(c, &part, &host, dir).await?;
        notes.push(format!(
            "{part}: not a regular file (a symlink or directory); removed that name and created the partial anew"
        ));
        kind = PartKind::Missing;
    }

    let mut ranges: Vec<String> = Vec::new();
    let mut resume = Resume::Fresh;
    let mut proof = None;
    if let Some(rec) = sidecar::get(store, &key)? {
        let same = rec.size == size
            && rec.range_size == RANGE_SIZE
            && (verify < Verify::Mtime || rec.mtime_ns == mtime_ns)
            && (verify < Verify::Tail || (rec.tail == tail && rec.source_id == source_id));
        if rec.ranges.is_empty() {
            // Nothing was recorded: as good as a first attempt.
        } else if !same {
            resume = Resume::Restarted {
                reason: RestartReason::SourceChanged,
            };
            notes.push(format!(
                "{}: source changed since the interrupted upload; remote partial discarded, uploading from the start",
                job.local.display()
            ));
        } else if caps.no_offset_writes {
            resume = Resume::FallbackRestart {
                refused_offset: None,
            };
            notes.push(format!(
                "{host}: server cannot write at an offset (remembered); uploading {} from the start",
                job.local.display()
            ));
        } else if let PartKind::Regular(part_size) = kind {
            let (good, by) = proven_ranges(
                c, store, &part, &host, &rec, size, part_size, verify, &hashing, src,
            )
            .await?;
            proof = by;
            resume = if good == 0 {
                Resume::Restarted {
                    reason: RestartReason::PartialUnusable,
                }
            } else if good < rec.ranges.len() {
                Resume::Repaired {
                    offset: good as u64 * RANGE_SIZE,
                    recorded: (rec.ranges.len() as u64 * RANGE_SIZE).min(size),
                }
            } else {
                Resume::Resumed {
                    offset: (good as u64 * RANGE_SIZE).min(size),
                }
            };
            if good < rec.ranges.len() {
                warn!(
                    part,
                    good, "remote partial damaged here; rewriting from this range"
                );
                notes.push(format!(
                    "{part}: remote partial verified up to range {good} of {}; rewriting from byte {}",
                    rec.ranges.len(),
                    good as u64 * RANGE_SIZE
                ));
            }
            ranges = rec.ranges[..good].to_vec();
        } else {
            resume = Resume::Restarted {
                reason: RestartReason::PartialUnusable,
            };
        }
    }
    // All ranges may be recorded already (a crash before the rename).
    let mut resume_at = (ranges.len() as u64 * RANGE_SIZE).min(size);
    let mut handle = if resume_at > 0 {
        let h = c
            .raw
            .open(part.clone(), OpenFlags::WRITE, FileAttributes::default())
            .await
            .map_err(|e| sftp_err("open", &part, &host, e))?
            .handle;
        // Cut off whatever lies past the proven prefix (a part extended past
        // the file's size would otherwise fail the size check every time).
        match cut_to(c, &h, resume_at, kind).await {
            Ok(()) => h,
            Err(e) => {
                warn!(part, error = %e, "cannot truncate the remote partial; starting it over");
                notes.push(format!(
                    "{part}: could not cut the partial back to byte {resume_at} ({e}); uploading from the start"
                ));
                let _ = c.raw.close(h).await;
                ranges.clear();
                resume_at = 0;
                proof = None;
                resume = Resume::Restarted {
                    reason: RestartReason::PartialUnusable,
                };
                create_part(c, &part, &host).await?
            }
        }
    } else {
        create_part(c, &part, &host).await?
    };
    if resume_at > 0 && resume_at < size {
        // Probe: can this server write at an offset into an existing file?
        let mut probe_data = vec![0u8; (size - resume_at).min(u64::from(c.block)) as usize];
        f.read_exact_at(&mut probe_data, resume_at)
            .map_err(|e| Error::local(&job.local, e))?;
        let probe = c.raw.write(handle.clone(), resume_at, probe_data).await;
        if let Err(e) = probe {
            match e {
                russh_sftp::client::error::Error::Status(s) => {
                    warn!(%host, status = %s.status_code, "offset write refused; falling back to a fresh upload");
                    caps.no_offset_writes = true;
                    sidecar::put_host_caps(store, &host, &caps)?;
                    notes.push(format!(
                        "{host}: server refused a write at offset {resume_at} ({}); remembered, restarting {} from zero",
                        s.error_message,
                        job.local.display()
                    ));
                    resume = Resume::FallbackRestart {
                        refused_offset: Some(resume_at),
                    };
                    let _ = c.raw.close(handle).await;
                    ranges.clear();
                    resume_at = 0;
                    proof = None;
                    handle = create_part(c, &part, &host).await?;
                }
                e => return Err(sftp_err("write", &part, &host, e)),
            }
        }
    }
    if resume_at > 0 && resume_at == size && matches!(resume, Resume::Resumed { .. }) {
        resume = Resume::AlreadyComplete;
    }
    if resume_at > 0 {
        info!(part, resume_at, "resuming upload");
        notes.push(format!(
            "{}: resumed at byte {resume_at} of {size}",
            job.local.display()
        ));
        Progress::add(&progress.bytes_resumed, resume_at);
        progress.done(resume_at);
    }
    let mut rec = Sidecar {
        scheme: sidecar::RANGE_SCHEME,
        size,
        mtime_ns,
        tail,
        range_size: RANGE_SIZE,
        ranges: ranges.clone(),
        source_id: source_id.clone(),
    };
    sidecar::put(store, &key, &rec)?;

    let n = range_count(size);
    let mut digests = ranges;
    // Read and hash the next range on the blocking pool while this one is on the wire.
    let block = c.block;
    let prefetch = |i: u64| -> Result<Prefetch> {
        let f = f.try_clone().map_err(|e| Error::local(&job.local, e))?;
        let path = job.local.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let data = read_local_range(&f, &path, size, i, block)?;
            let d = data.digest(size, i);
            Ok((data, d))
        }))
    };
    let first = digests.len() as u64;
    let mut next = if first < n {
        Some(prefetch(first)?)
    } else {
        None
    };
    let every = if stop_after_ranges.is_some() {
        1
    } else {
        CHECKPOINT_RANGES
    };
    // The server flushes ranges already written while the next ones go out;
    // the record claims them only once that flush answered.
    let mut flushing = PendingFlush::default();
    // A side session costs a round trip and a server process: only for
    // files with checkpoints in the middle.
    let flusher = Flusher::open(c, &handle, &part, n - first > every as u64).await;
    // One pipeline across ranges: the next range's requests go out while the
    // last ones of this range are still unanswered (a range is 8 MiB, about
    // the window, so draining at each range would halve the throughput).
    let window = if caps.in_order_writes { 1 } else { WINDOW };
    let mut writes = Writes::new(c, &handle, &part, &host, window);
    for i in first..=n {
        if i < n {
            let Some(job_handle) = next.take() else {
                break;
            };
            let (data, digest) = job_handle
                .await
                .map_err(|e| Error::local(&job.local, std::io::Error::other(e.to_string())))??;
            if i + 1 < n {
                next = Some(prefetch(i + 1)?);
            }
            writes.issue(i * RANGE_SIZE, data, digest).await?;
        } else {
            writes.finish().await?;
        }
        if let Some(k) = flushing.finish_if_done().await? {
            claim(store, &key, &mut rec, &digests[..k], stop_after_ranges)?;
        }
        // Ranges fully acknowledged, in order.
        while let Some((digest, len)) = writes.take_done() {
            digests.push(digest);
            Progress::add(&progress.bytes_sent, len);
            progress.done(len);
            if digests.len() - flushing.covers_or(rec.ranges.len()) < every {
                continue;
            }
            if let Some(k) = flushing.finish().await? {
                claim(store, &key, &mut rec, &digests[..k], stop_after_ranges)?;
            }
            flushing.start(digests.len(), flusher.start(&part, &host));
            if stop_after_ranges.is_some() {
                // Tests stop at an exact record: nothing left in flight.
                if let Some(k) = flushing.finish().await? {
                    claim(store, &key, &mut rec, &digests[..k], stop_after_ranges)?;
                }
            }
        }
    }
    flushing.finish().await?;
    flusher.flush(&part, &host).await?;
    flusher.close().await;
    rec.ranges = digests.clone();
    sidecar::put(store, &key, &rec)?;
    let _ = c.raw.close(handle).await;

    // The source must not have changed under us.
    let md2 = std::fs::metadata(&job.local).map_err(|e| Error::local(&job.local, e))?;
    if fsutil::hex(&fsutil::source_id(&md2)) != source_id {
        return Err(Error::SourceUnstable {
            path: job.local.display().to_string(),
            times: 1,
        });
    }
    // With `full` every range, the kept ones again: a server may lose them
    // when the partial is reopened for writing.
    let check = Check {
        rec: &rec,
        size,
        verify,
        from: 0,
        hashing: &hashing,
        src,
    };
    let verified_by = match verify_remote(c, store, &part, &host, check).await? {
        Verdict::Proven(Some(by)) => by,
        Verdict::Proven(None) if verify < Verify::Tail => VerifiedBy::Size,
        // An empty file: the size is all there is.
        Verdict::Proven(None) => proof.unwrap_or(VerifiedBy::Readback),
        Verdict::Differs { range, .. } if range < first => {
            // Proven on resume, lost since: the next go starts from byte 0
            // (the record stays, so that it reports a fallback restart).
            return Ok(Attempt::KeptBytesLost { range });
        }
        Verdict::Differs { range, by } => {
            return Err(Error::SftpIntegrity {
                path: part.clone(),
                detail: format!(
                    "range {range} (bytes {}..{}) differs: {} does not match the source",
                    range * RANGE_SIZE,
                    range * RANGE_SIZE + range_len(size, range),
                    describe(by)
                ),
            })
        }
    };
    if !rename_over(c, &part, &remote, &host).await? {
        notes.push(format!(
            "{host}: no atomic rename (posix-rename@openssh.com); {remote} was removed, then {part} renamed to it"
        ));
    }
    sidecar::remove(store, &key)?;
    // The file's BLAKE3 from the digests of its ranges (no second pass).
    let digest = sidecar::file_digest(size, &rec.ranges).ok_or_else(|| {
        Error::Store(format!(
            "{}: range digests do not cover the file",
            job.local.display()
        ))
    })?;
    Ok(Attempt::Done(FileOutcome {
        digest: Some(digest),
        notes,
        resume,
        verified_by,
    }))
}

/// Creates the remote partial anew: whatever is at that name is removed
/// first (a link is removed, never followed) and the file is created with
/// CREATE|EXCL, so the handle is to a file this upload made.
async fn create_part(c: &Conn, part: &str, host: &str) -> Result<String> {
    if let PartKind::Other { dir: true } = part_kind(c, part, host).await? {
        remove_name(c, part, host, true).await?;
    } else {
        remove_name(c, part, host, false).await?;
    }
    Ok(c.raw
        .open(
            part.to_string(),
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE,
            FileAttributes::default(),
        )
        .await
        .map_err(|e| sftp_err("open", part, host, e))?
        .handle)
}

/// Truncates the open partial to `len` bytes when it is longer (`kind` is
/// what lstat said before it was opened).
async fn cut_to(
    c: &Conn,
    handle: &str,
    len: u64,
    kind: PartKind,
) -> std::result::Result<(), russh_sftp::client::error::Error> {
    if matches!(kind, PartKind::Regular(n) if n <= len) {
        return Ok(());
    }
    let attrs = FileAttributes {
        size: Some(len),
        ..FileAttributes::empty()
    };
    c.raw.fsetstat(handle.to_string(), attrs).await.map(|_| ())
}

/// What [`verify_remote`] checks the finished partial against.
struct Check<'a> {
    rec: &'a Sidecar,
    size: u64,
    verify: Verify,
    /// With `full`: the first range to prove.
    from: u64,
    hashing: &'a Hashing,
    src: Local<'a>,
}

fn describe(by: VerifiedBy) -> &'static str {
    match by {
        VerifiedBy::CheckFile => "the server's hash (check-file-handle)",
        VerifiedBy::B3sum => "the server's b3sum",
        VerifiedBy::OpensslSha256 => "the server's openssl dgst -sha256",
        VerifiedBy::Sha256sum => "the server's sha256sum",
        VerifiedBy::Shasum => "the server's shasum -a 256",
        VerifiedBy::Readback | VerifiedBy::Size => "what was read back",
    }
}

/// Checks the finished `.part` before the rename: that it is a regular file
/// of the source's size always; with `tail` its last range, with `full` every
/// range not proven earlier in this run: hashed by the server where it can
/// (compared with the same hash of the source), otherwise read back and
/// compared with the BLAKE3 digests of what was sent.
async fn verify_remote(
    c: &Conn,
    store: &Store,
    part: &str,
    host: &str,
    k: Check<'_>,
) -> Result<Verdict> {
    let integrity = |detail: String| Error::SftpIntegrity {
        path: part.into(),
        detail,
    };
    match part_kind(c, part, host).await? {
        PartKind::Regular(n) if n == k.size => {}
        PartKind::Regular(n) => return Err(integrity(format!("size is {n}, expected {}", k.size))),
        _ => return Err(integrity("no longer a regular file".into())),
    }
    let n = range_count(k.size);
    let from = match k.verify {
        Verify::Full => k.from,
        Verify::Tail => n.saturating_sub(1),
        _ => n,
    };
    if from >= n {
        return Ok(Verdict::Proven(None));
    }
    if let Some((bad, by)) = remote_hash::server_first_mismatch(
        c,
        store,
        k.hashing,
        part,
        host,
        k.size,
        from..n,
        k.src,
        &k.rec.ranges,
    )
    .await?
    {
        if bad < n {
            return Ok(Verdict::Differs { range: bad, by });
        }
        return Ok(Verdict::Proven(Some(by)));
    }
    let h = c
        .raw
        .open(part.to_string(), OpenFlags::READ, FileAttributes::default())
        .await
        .map_err(|e| sftp_err("open", part, host, e))?
        .handle;
    let bad = remote_hash::readback_first_mismatch(
        c,
        &h,
        part,
        host,
        k.size,
        from..n,
        None,
        &k.rec.ranges,
    )
    .await;
    let _ = c.raw.close(h).await;
    Ok(match bad? {
        b if b < n => Verdict::Differs {
            range: b,
            by: VerifiedBy::Readback,
        },
        _ => Verdict::Proven(Some(VerifiedBy::Readback)),
    })
}

/// What [`verify_remote`] found.
enum Verdict {
    /// Every range it was asked to check matched; how (`None`: none checked).
    Proven(Option<VerifiedBy>),
    /// This range differs.
    Differs { range: u64, by: VerifiedBy },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sftp::remote_io::parse_check_file_reply;

    #[test]
    fn illegal_seek_on_a_write_asks_for_in_order_writes() {
        let e = |op, msg: &str| Error::SftpStatus {
            op,
            path: "f.part".into(),
            code: 4,
            msg: msg.into(),
        };
        assert!(needs_in_order_writes(&e("write", "Illegal seek (Failure)")));
        assert!(!needs_in_order_writes(&e("write", "Permission denied")));
        assert!(!needs_in_order_writes(&e("open", "Illegal seek")));
    }

    #[test]
    fn check_file_replies() {
        let mut r = Vec::new();
        sftp_string(&mut r, "check-file");
        sftp_string(&mut r, "sha256");
        r.extend_from_slice(&[7u8; 32]);
        assert_eq!(parse_check_file_reply(&r), Some(("sha256", vec![7u8; 32])));
        // Wrong length, an algorithm not asked for, truncated, wrong tag.
        assert_eq!(parse_check_file_reply(&r[..r.len() - 1]), None);
        let mut md5 = Vec::new();
        sftp_string(&mut md5, "check-file");
        sftp_string(&mut md5, "md5");
        md5.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_check_file_reply(&md5), None);
        assert_eq!(parse_check_file_reply(&r[..6]), None);
        let mut other = Vec::new();
        sftp_string(&mut other, "nope");
        assert_eq!(parse_check_file_reply(&other), None);
    }
}
