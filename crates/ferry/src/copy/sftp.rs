//! The `sftp://` endpoint kind of `ferry cp`: plans uploads and downloads
//! over SFTP and runs each file's resumable, verified transfer
//! ([`crate::sftp::upload`], [`crate::sftp::download`]) under the shared
//! [`Runner`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::time::Instant;
use tracing::warn;

use super::runner::{BoxFut, Endpoint, Runner};
use super::{CopyOptions, CopySummary};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sftp::auth::{self, Conn, SshConfig};
use crate::sftp::{
    download, explain_failure, listing, mkdir_p, remote_parent, upload, FileOutcome, FileReport,
    Job, SftpOptions, SftpTarget,
};
use crate::status::TransferRecord;
use crate::store::Store;

/// An SSH server as the runner sees it.
struct Ssh<'a> {
    target: &'a SftpTarget,
    config: &'a SshConfig,
}

impl Endpoint for Ssh<'_> {
    type Session = Arc<Conn>;
    // A whole file moves in one attempt: what it got through is kept.
    const PROGRESS_RESETS: bool = true;
    fn peer(&self) -> String {
        self.target.hostport()
    }
    fn connect(&self) -> BoxFut<'_, Arc<Conn>> {
        Box::pin(async move { Ok(Arc::new(auth::connect(self.target, self.config).await?)) })
    }
}

/// Runs a copy where one side is `sftp://`.
pub(super) async fn copy(
    srcs: &[String],
    dst: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopySummary> {
    let started = Instant::now();
    let store = Arc::new(Store::open_shared(&opts.state_dir)?);
    let upload = dst.starts_with("sftp://");
    let mut runner = SftpCopy {
        sftp: &opts.sftp,
        store,
        core: Runner::new(opts, progress.clone()),
        conn: None,
        progress: progress.clone(),
        digests: Vec::new(),
        reports: Vec::new(),
        made_dirs: std::collections::HashSet::new(),
        skipped: 0,
        failed: 0,
    };
    if upload {
        if srcs.iter().any(|s| s.contains("://")) {
            return Err(Error::Usage(
                "with an sftp:// destination all sources must be local".into(),
            ));
        }
        let t = SftpTarget::parse_with_user(dst, opts.sftp.ssh.default_user())?;
        let into_dir = dst.ends_with('/') || srcs.len() > 1 || t.path.is_empty() || {
            let t2 = t.clone();
            runner
                .with_conn(&t, move |c| {
                    let (c, t2) = (c.clone(), t2.clone());
                    Box::pin(async move { upload::is_remote_dir(&c, &t2).await })
                })
                .await?
        };
        let mut plan = crate::walk::Plan::new();
        for s in srcs {
            plan.add_source(Path::new(s), &t.path, into_dir, opts.walk())?;
        }
        runner.skipped += plan.skipped.len() as u64;
        runner.failed += plan.failed.len() as u64;
        let items: Vec<Item> = plan
            .items
            .into_iter()
            .map(|it| {
                let (local, remote) = (it.local, t.with_path(it.dest));
                match it.kind {
                    crate::walk::Kind::File { size } => Item::File(Job {
                        local,
                        remote,
                        size,
                    }),
                    crate::walk::Kind::Dir { .. } => Item::Dir { local, remote },
                }
            })
            .collect();
        runner.count(&items);
        for it in items {
            match it {
                Item::File(job) => runner.upload_one(job).await?,
                Item::Dir { remote, .. } => runner.upload_dir(&remote).await?,
            }
        }
    } else {
        let dst_path = PathBuf::from(dst);
        let dst_is_dir = dst.ends_with('/') || srcs.len() > 1 || dst_path.is_dir();
        let mut jobs = Vec::new();
        let mut claims = crate::walk::Claims::default();
        for s in srcs {
            let t = SftpTarget::parse_with_user(s, opts.sftp.ssh.default_user())?;
            let t2 = t.clone();
            let walk = opts.walk();
            let found = runner
                .with_conn(&t, move |c| {
                    let (c, t2) = (c.clone(), t2.clone());
                    Box::pin(async move { listing::list(&c, &t2, walk).await })
                })
                .await?;
            runner.skipped += found.skipped.len() as u64;
            runner.failed += found.failed.len() as u64;
            let base = download::base_name(&t.path);
            let target = if dst_is_dir {
                dst_path.join(&base)
            } else {
                dst_path.clone()
            };
            for (rel, what) in found.items {
                let remote = if rel.is_empty() {
                    t.path.clone()
                } else {
                    format!("{}/{rel}", t.path.trim_end_matches('/'))
                };
                // Names come from the server: never let one climb out of the target.
                if !rel.is_empty() && !crate::walk::is_safe_relative(&rel) {
                    tracing::error!(
                        "{}: not copied: the server listed an unsafe path",
                        t.url(&remote)
                    );
                    runner.failed += 1;
                    continue;
                }
                let local = if rel.is_empty() {
                    target.clone()
                } else {
                    target.join(&rel)
                };
                let is_dir = what == listing::Listed::Dir;
                if let Err(line) = claims.claim(&local.to_string_lossy(), &t.url(&remote), is_dir) {
                    tracing::error!("{line}");
                    runner.failed += 1;
                    continue;
                }
                let remote = t.with_path(remote);
                jobs.push(match what {
                    listing::Listed::File { size } => Item::File(Job {
                        local,
                        remote,
                        size,
                    }),
                    listing::Listed::Dir => Item::Dir { local, remote },
                });
            }
        }
        runner.count(&jobs);
        for it in jobs {
            match it {
                Item::File(job) => runner.download_one(job).await?,
                Item::Dir { local, .. } => crate::fsutil::create_dirs_durable(&local)
                    .map_err(|e| Error::local(&local, e))?,
            }
        }
    }
    let digest = if runner.digests.len() == 1 {
        runner.digests[0].1.to_hex().to_string()
    } else {
        let mut h = blake3::Hasher::new();
        for (p, d) in &runner.digests {
            h.update(p.as_bytes());
            h.update(&[0]);
            h.update(d.as_bytes());
        }
        h.finalize().to_hex().to_string()
    };
    let summary = CopySummary {
        files: runner.digests.len() as u64,
        bytes_total: Progress::get(&progress.bytes_total),
        bytes_sent: Progress::get(&progress.bytes_sent),
        bytes_resumed: Progress::get(&progress.bytes_resumed),
        retries: Progress::get(&progress.retries),
        data_lanes: 0,
        files_at_once: 1,
        duration_s: started.elapsed().as_secs_f64(),
        digest,
        alg: "blake3".into(),
        skipped: runner.skipped,
        per_file: runner.reports,
    };
    super::finish(summary, runner.failed)
}

/// An SFTP copy: the shared [`Runner`] plus what SFTP jobs need.
struct SftpCopy<'a> {
    sftp: &'a SftpOptions,
    store: Arc<Store>,
    core: Runner,
    conn: Option<Arc<Conn>>,
    progress: Arc<Progress>,
    digests: Vec<(String, blake3::Hash)>,
    reports: Vec<FileReport>,
    /// Remote directories known to exist (made or seen by this copy).
    made_dirs: std::collections::HashSet<String>,
    /// Left out of trees on purpose (symlinks, special files).
    skipped: u64,
    /// Could not be copied (reported one by one as planned).
    failed: u64,
}

/// One thing an SFTP copy plans: a file to move, or a directory to make.
enum Item {
    File(Job),
    Dir { local: PathBuf, remote: SftpTarget },
}

impl SftpCopy<'_> {
    fn count(&self, items: &[Item]) {
        let files: Vec<&Job> = items
            .iter()
            .filter_map(|it| match it {
                Item::File(job) => Some(job),
                Item::Dir { .. } => None,
            })
            .collect();
        Progress::add(&self.progress.files_total, files.len() as u64);
        Progress::add(
            &self.progress.bytes_total,
            files.iter().map(|j| j.size).sum(),
        );
    }

    /// Runs `f` on a connection under the shared runner (progress resets
    /// the attempt count).
    async fn with_conn<T>(
        &mut self,
        t: &SftpTarget,
        f: impl for<'s> FnMut(&'s mut Arc<Conn>) -> BoxFut<'s, T>,
    ) -> Result<T> {
        let ep = Ssh {
            target: t,
            config: &self.sftp.ssh,
        };
        self.core.with_session(&ep, &mut self.conn, f).await
    }

    /// Starts the `ferry status` record of one file's transfer.
    fn track(
        &mut self,
        direction: &str,
        local: &Path,
        remote: String,
        size: u64,
    ) -> TransferRecord {
        let local = std::fs::canonicalize(local)
            .unwrap_or_else(|_| local.to_path_buf())
            .display()
            .to_string();
        if let Some(old) = self.core.status.find(direction, &local, &remote) {
            self.core.status.remove(&old.id);
        }
        let id: [u8; 16] = rand::Rng::gen(&mut self.core.rng);
        let rec = TransferRecord {
            id: crate::fsutil::hex(&id),
            direction: direction.into(),
            local,
            remote,
            size,
            bytes_done: 0,
            state: crate::status::RecordState::Active,
            last_error: None,
            updated_unix: 0,
            pid: 0,
            source: String::new(),
        };
        let _ = self.core.status.put(&rec);
        rec
    }

    /// Ends a status record: removed when the file is done, else kept with why.
    fn untrack<T>(&self, mut rec: TransferRecord, r: &Result<T>) {
        match r {
            Ok(_) => self.core.status.remove(&rec.id),
            Err(e) => {
                let done = Progress::get(&self.progress.current_done);
                self.core.interrupted(&mut rec, done, e);
            }
        }
    }

    /// Makes sure the directory `path` exists on the server (`mkdir -p`).
    async fn ensure_dir(&mut self, t: &SftpTarget, path: String) -> Result<()> {
        if self.made_dirs.contains(&path) {
            return Ok(());
        }
        let d = t.with_path(path.clone());
        self.with_conn(t, move |c| {
            let (c, d) = (c.clone(), d.clone());
            Box::pin(async move { mkdir_p(&c, &d).await })
        })
        .await?;
        self.made_dirs.insert(path);
        Ok(())
    }

    /// A directory of an uploaded tree, and its missing parents.
    async fn upload_dir(&mut self, t: &SftpTarget) -> Result<()> {
        if let Some(parent) = remote_parent(&t.path) {
            self.ensure_dir(t, parent).await?;
        }
        self.ensure_dir(t, t.path.clone()).await
    }

    async fn upload_one(&mut self, job: Job) -> Result<()> {
        let t = job.remote.clone();
        // Missing parents are made, as native copies do.
        if let Some(parent) = remote_parent(&t.path) {
            self.ensure_dir(&t, parent).await?;
        }
        self.progress
            .start_file(&job.local.display().to_string(), job.size);
        let size = job.size;
        let (store, progress, verify) =
            (self.store.clone(), self.progress.clone(), self.sftp.verify);
        let stop = self.sftp.stop_after_ranges;
        let rec = self.track("upload", &job.local, t.url(&t.path), job.size);
        let out = self
            .with_conn(&t, move |c| {
                let (c, job, store, progress) =
                    (c.clone(), job.clone(), store.clone(), progress.clone());
                Box::pin(async move {
                    progress.undo_file();
                    match upload::upload(&c, &job, &store, &progress, verify, stop).await {
                        // A plain failure may be a full disk: ask while connected.
                        Err(e) => Err(explain_failure(&c, &job.remote, size, e).await),
                        ok => ok,
                    }
                })
            })
            .await;
        self.untrack(rec, &out);
        let out = out?;
        self.finish(&t.path, t.url(&t.path), out);
        Ok(())
    }

    async fn download_one(&mut self, job: Job) -> Result<()> {
        let t = job.remote.clone();
        self.progress.start_file(&t.url(&t.path), job.size);
        let local = job.local.clone();
        let stop = self.sftp.stop_after_ranges;
        let (store, progress, verify) =
            (self.store.clone(), self.progress.clone(), self.sftp.verify);
        let rec = self.track("download", &local, t.url(&t.path), job.size);
        let out = self
            .with_conn(&t, move |c| {
                let (c, job, store, progress) =
                    (c.clone(), job.clone(), store.clone(), progress.clone());
                Box::pin(async move {
                    progress.undo_file();
                    download::download(&c, &job, &store, &progress, verify, stop).await
                })
            })
            .await;
        self.untrack(rec, &out);
        let out = out?;
        self.finish(&t.path, local.display().to_string(), out);
        Ok(())
    }

    /// Records a finished file; `path` keys its digest, `shown` names it in the report.
    fn finish(&mut self, path: &str, shown: String, out: FileOutcome) {
        Progress::add(&self.progress.files_done, 1);
        for n in out.notes {
            // What happened (resumed, restarted, fell back) is for the user to see.
            warn!("{n}");
        }
        if let Some(d) = out.digest {
            self.digests.push((path.to_string(), d));
        }
        self.reports.push(FileReport {
            path: shown,
            resume: out.resume,
            verified_by: out.verified_by,
        });
    }
}
