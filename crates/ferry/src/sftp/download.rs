//! Downloads: data goes to the local `.NAME.ferry.part`, range by range
//! (many read requests in flight); each range is fsynced before the sidecar
//! records its digest. A resume needs the remote file unchanged (size and
//! mtime), proves the local prefix against the recorded digests (last range,
//! or all with `--verify full`), and the finished part is renamed
//! atomically, then the directory fsynced.

use std::os::unix::fs::FileExt;

use russh_sftp::protocol::{FileAttributes, OpenFlags};
use tracing::{info, warn};

use super::auth::Conn;
use super::remote_hash;
use super::remote_io::{range_count, range_len, read_remote_owned, Pieces};
use super::sidecar::{self, PendingFlush, Sidecar, RANGE_SIZE};
use super::{sftp_err, FileOutcome, Job, RestartReason, Resume, VerifiedBy, Verify};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::store::Store;

const CHECKPOINT_RANGES: usize = 4;

pub fn base_name(p: &str) -> String {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string()
}

/// Downloads one file; see the module documentation.
pub async fn download(
    c: &Conn,
    job: &Job,
    store: &Store,
    progress: &Progress,
    verify: Verify,
    stop_after_ranges: Option<usize>,
) -> Result<FileOutcome> {
    let host = job.remote.hostport();
    let remote = job.remote.path.clone();
    let parent = fsutil::parent_of(&job.local);
    fsutil::create_dirs_durable(&parent).map_err(|e| Error::local(&parent, e))?;
    let parent = std::fs::canonicalize(&parent).map_err(|e| Error::local(&parent, e))?;
    let name = job
        .local
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", job.local.display())))?;
    let local = parent.join(name);
    if local.is_dir() {
        return Err(Error::Usage(format!("{} is a directory", local.display())));
    }
    let part_path = fsutil::part_path(&local);
    let key = sidecar::download_key(&local.display().to_string(), &job.remote.url(&remote));
    let a = c
        .raw
        .stat(remote.clone())
        .await
        .map_err(|e| sftp_err("stat", &remote, &host, e))?
        .attrs;
    let size = a.size.ok_or_else(|| Error::SftpStatus {
        op: "stat",
        path: remote.clone(),
        code: 4,
        msg: "server did not report a size".into(),
    })?;
    let mtime_ns = i64::from(a.mtime.unwrap_or(0)) * 1_000_000_000;
    let mode = a.permissions.unwrap_or(0o644) & 0o777;
    let mut notes = Vec::new();

    let part = fsutil::open_part(&part_path)?;
    let mut ranges: Vec<String> = Vec::new();
    let mut resume = Resume::Fresh;
    if let Some(rec) = sidecar::get(store, &key)? {
        if rec.ranges.is_empty() {
            // Nothing was recorded: as good as a first attempt.
        } else if rec.size == size && rec.mtime_ns == mtime_ns && rec.range_size == RANGE_SIZE {
            let have = part
                .metadata()
                .map_err(|e| Error::local(&part_path, e))?
                .len();
            let covered = (0..range_count(size))
                .take_while(|&i| i * RANGE_SIZE + range_len(size, i) <= have)
                .count();
            let k = rec.ranges.len().min(covered);
            let check = |i: usize| -> Result<bool> {
                let mut buf = vec![0u8; range_len(size, i as u64) as usize];
                part.read_exact_at(&mut buf, i as u64 * RANGE_SIZE)
                    .map_err(|e| Error::local(&part_path, e))?;
                Ok(sidecar::range_digest(size, i as u64, &buf) == rec.ranges[i])
            };
            let mut good = k;
            if verify == Verify::Full {
                if let Some(bad) = (0..k).find(|&i| !check(i).unwrap_or(false)) {
                    good = bad;
                }
                good = prove_source_prefix(
                    c, store, job, &part, &part_path, size, good, &rec, &mut notes,
                )
                .await?;
            } else {
                while good > 0 && !check(good - 1)? {
                    good -= 1;
                }
            }
            if good < rec.ranges.len() {
                warn!(part = %part_path.display(), good, "local partial damaged or short; rewriting from there");
            }
            resume = if good == 0 {
                Resume::Restarted {
                    reason: RestartReason::PartialUnusable,
                }
            } else if good < rec.ranges.len() {
                Resume::Repaired {
                    offset: good as u64 * RANGE_SIZE,
                    recorded: (rec.ranges.len() as u64 * RANGE_SIZE).min(size),
                }
            } else if (good as u64 * RANGE_SIZE) >= size {
                Resume::AlreadyComplete
            } else {
                Resume::Resumed {
                    offset: good as u64 * RANGE_SIZE,
                }
            };
            ranges = rec.ranges[..good].to_vec();
        } else {
            resume = Resume::Restarted {
                reason: RestartReason::SourceChanged,
            };
            notes.push(format!(
                "{}: remote file changed since the interrupted download; starting over",
                job.remote.url(&remote)
            ));
        }
    }
    let resume_at = (ranges.len() as u64 * RANGE_SIZE).min(size);
    part.set_len(resume_at)
        .map_err(|e| Error::local(&part_path, e))?;
    if resume_at > 0 {
        info!(part = %part_path.display(), resume_at, "resuming download");
        notes.push(format!(
            "{}: resumed at byte {resume_at} of {size}",
            local.display()
        ));
        Progress::add(&progress.bytes_resumed, resume_at);
        progress.done(resume_at);
    }
    let mut rec = Sidecar {
        scheme: sidecar::RANGE_SCHEME,
        size,
        mtime_ns,
        tail: String::new(),
        range_size: RANGE_SIZE,
        ranges: ranges.clone(),
        source_id: String::new(),
    };
    sidecar::put(store, &key, &rec)?;

    let h = c
        .raw
        .open(remote.clone(), OpenFlags::READ, FileAttributes::default())
        .await
        .map_err(|e| sftp_err("open", &remote, &host, e))?
        .handle;
    let n = range_count(size);
    let mut digests = ranges;
    let first = digests.len() as u64;
    // Three stages run at once: the network (the next ranges are requested
    // while one is taken in, so the server always has requests to answer),
    // the disk (a thread of its own writes each range and hashes it, so a
    // write held up by writeback does not hold up the reads), and this loop,
    // which records ranges once a sync made them durable.
    let read = |i: u64| {
        tokio::spawn(read_remote_owned(
            c.raw.clone(),
            c.block,
            h.clone(),
            i * RANGE_SIZE,
            range_len(size, i),
            remote.clone(),
            host.clone(),
        ))
    };
    const READS_AHEAD: u64 = 2;
    let mut reads: std::collections::VecDeque<_> =
        (first..n.min(first + READS_AHEAD)).map(read).collect();
    let writer = RangeWriter::start(
        part.try_clone().map_err(|e| Error::local(&part_path, e))?,
        part_path.clone(),
        size,
    );
    let mut syncing = PendingFlush::default();
    let every = if stop_after_ranges.is_some() {
        1
    } else {
        CHECKPOINT_RANGES
    };
    let mut written = writer.written;
    let to_disk = writer.to_disk;
    let mut next_write = first;
    for i in first..n {
        let want = range_len(size, i);
        let Some(task) = reads.pop_front() else {
            break;
        };
        let data = task.await.map_err(|e| Error::Ssh {
            host: host.clone(),
            msg: e.to_string(),
        })??;
        if i + READS_AHEAD < n {
            reads.push_back(read(i + READS_AHEAD));
        }
        if data.len() != want {
            let _ = c.raw.close(h).await;
            return Err(Error::Ssh {
                host: host.clone(),
                msg: format!(
                    "{remote}: file shrank during the download (range {i}: {} of {want} bytes)",
                    data.len()
                ),
            });
        }
        // Waits here only when the disk is two ranges behind.
        if to_disk.send((i, data)).await.is_err() {
            break; // the writer failed: its error comes below
        }
        // A sync that finished: the record claims what it covered.
        if let Some(k) = syncing.finish_if_done().await? {
            rec.ranges = digests[..k].to_vec();
            sidecar::put(store, &key, &rec)?;
        }
        while let Ok(w) = written.try_recv() {
            take_written(w?, &mut digests, &mut next_write, progress)?;
            if digests.len() - syncing.covers_or(rec.ranges.len()) < every {
                continue;
            }
            // Data durable before the record claims it; the sync runs on
            // the blocking pool while the next ranges arrive and are written.
            let mut done = syncing.finish().await?;
            let f = part.try_clone().map_err(|e| Error::local(&part_path, e))?;
            let pp = part_path.clone();
            syncing.start(
                digests.len(),
                tokio::task::spawn_blocking(move || {
                    f.sync_data().map_err(|e| Error::local(&pp, e))
                }),
            );
            if stop_after_ranges.is_some() {
                done = syncing.finish().await?;
            }
            if let Some(k) = done {
                rec.ranges = digests[..k].to_vec();
                sidecar::put(store, &key, &rec)?;
                if stop_after_ranges.is_some_and(|n| rec.ranges.len() >= n) {
                    let _ = c.raw.close(h).await;
                    return Err(Error::Usage("stopped for a test".into()));
                }
            }
        }
    }
    drop(to_disk);
    while let Some(w) = written.recv().await {
        take_written(w?, &mut digests, &mut next_write, progress)?;
    }
    writer
        .done
        .await
        .map_err(|e| Error::local(&part_path, std::io::Error::other(e.to_string())))?;
    if next_write != n {
        return Err(Error::local(
            &part_path,
            std::io::Error::other(format!("{} of {n} ranges written", next_write)),
        ));
    }
    let _ = c.raw.close(h).await;
    syncing.finish().await?;
    part.sync_data().map_err(|e| Error::local(&part_path, e))?;
    rec.ranges = digests.clone();
    sidecar::put(store, &key, &rec)?;

    // Verify the part on disk: size always, ranges re-read per --verify.
    let len = part
        .metadata()
        .map_err(|e| Error::local(&part_path, e))?
        .len();
    if len != size {
        return Err(Error::SftpIntegrity {
            path: part_path.display().to_string(),
            detail: format!("local part is {len} bytes, expected {size}"),
        });
    }
    let from = match verify {
        Verify::Full => 0,
        Verify::Tail => n.saturating_sub(1),
        _ => n,
    };
    for i in from..n {
        let mut buf = vec![0u8; range_len(size, i) as usize];
        part.read_exact_at(&mut buf, i * RANGE_SIZE)
            .map_err(|e| Error::local(&part_path, e))?;
        if rec.ranges.get(i as usize) != Some(&sidecar::range_digest(size, i, &buf)) {
            return Err(Error::SftpIntegrity {
                path: part_path.display().to_string(),
                detail: format!("range {i} on disk differs from what was received"),
            });
        }
    }
    fsutil::finalize_part(&part, &part_path, &local, size, mode, mtime_ns)?;
    sidecar::remove(store, &key)?;
    // The file's BLAKE3 from the digests of its ranges (no second pass).
    let digest = sidecar::file_digest(size, &digests).ok_or_else(|| {
        Error::Store(format!(
            "{}: range digests do not cover the file",
            local.display()
        ))
    })?;
    Ok(FileOutcome {
        digest: Some(digest),
        notes,
        resume,
        // The local part is re-read (last range, or all) and compared with
        // the digests of what was received.
        verified_by: if verify >= Verify::Tail {
            VerifiedBy::Readback
        } else {
            VerifiedBy::Size
        },
    })
}

/// The remote source can only be compared by size and mtime through SFTP
/// attributes; where the server hashes (see [`remote_hash`]) its kept ranges
/// are hashed there and compared with the local part's (already proven
/// against the record), so a source rewritten with the same size and mtime
/// is caught. Returns how many of the `good` kept ranges still match.
#[allow(clippy::too_many_arguments)]
async fn prove_source_prefix(
    c: &Conn,
    store: &Store,
    job: &Job,
    part: &std::fs::File,
    part_path: &std::path::Path,
    size: u64,
    good: usize,
    rec: &Sidecar,
    notes: &mut Vec<String>,
) -> Result<usize> {
    if good == 0 {
        return Ok(0);
    }
    let host = job.remote.hostport();
    let remote = &job.remote.path;
    let url = job.remote.url(remote);
    let hashing =
        remote_hash::hashing(c, store, format!("{}@{host}", job.remote.user), true).await?;
    let local = remote_hash::Local {
        file: part,
        path: part_path,
    };
    let r = remote_hash::server_first_mismatch(
        c,
        store,
        &hashing,
        remote,
        &host,
        size,
        0..good as u64,
        local,
        &rec.ranges,
    )
    .await?;
    match r {
        Some((bad, _)) if (bad as usize) < good => {
            warn!(%url, range = bad, "remote file differs from the kept part; downloading from there");
            notes.push(format!(
                "{url}: remote file changed at range {bad} (same size and mtime); downloading again from byte {}",
                bad * RANGE_SIZE
            ));
            Ok(bad as usize)
        }
        Some((_, by)) => {
            info!(%url, by = by.as_str(), "remote file's kept prefix proven unchanged");
            Ok(good)
        }
        None => {
            notes.push(format!(
                "{url}: the server cannot hash files, so the remote file was compared by size and mtime only; the kept local bytes were re-hashed"
            ));
            Ok(good)
        }
    }
}

/// A range written to the local part: its index, hex BLAKE3 and length.
type Written = (u64, String, u64);

/// The disk stage of a download: one thread writes ranges in order to the
/// part and hashes each ([`sidecar::range_digest`]).
struct RangeWriter {
    to_disk: tokio::sync::mpsc::Sender<(u64, Pieces)>,
    written: tokio::sync::mpsc::UnboundedReceiver<Result<Written>>,
    done: tokio::task::JoinHandle<()>,
}

impl RangeWriter {
    fn start(part: std::fs::File, path: std::path::PathBuf, size: u64) -> Self {
        // Two ranges queued at most: memory stays bounded when the disk is slow.
        let (to_disk, mut rx) = tokio::sync::mpsc::channel::<(u64, Pieces)>(2);
        let (tx, written) = tokio::sync::mpsc::unbounded_channel();
        let done = tokio::task::spawn_blocking(move || {
            while let Some((i, data)) = rx.blocking_recv() {
                let r = data
                    .write_at(&part, i * RANGE_SIZE)
                    .map_err(|e| Error::local(&path, e));
                if let Err(e) = r {
                    let _ = tx.send(Err(e));
                    break;
                }
                let d = data.digest(size, i);
                if tx.send(Ok((i, d, data.len()))).is_err() {
                    break;
                }
            }
        });
        Self {
            to_disk,
            written,
            done,
        }
    }
}

/// Takes one written range into `digests` (ranges arrive in order).
fn take_written(
    (i, digest, len): Written,
    digests: &mut Vec<String>,
    next: &mut u64,
    progress: &Progress,
) -> Result<()> {
    if i != *next {
        return Err(Error::Store(format!(
            "range {i} written out of order (expected {next})"
        )));
    }
    *next += 1;
    digests.push(digest);
    Progress::add(&progress.bytes_sent, len);
    progress.done(len);
    Ok(())
}
