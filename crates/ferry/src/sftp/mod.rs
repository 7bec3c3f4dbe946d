//! `ferry cp` to and from SFTP servers (OpenSSH and others): resumable,
//! verified uploads and downloads.
//!
//! * [`auth`]: SSH connection, host keys, keys and agent.
//! * [`sidecar`]: the local record of unfinished transfers (in the state store).
//! * [`upload`]: `PATH.part` on the server, proven prefix, checkpointed ranges, rename.
//! * [`download`]: local `.NAME.ferry.part`, checkpointed ranges, atomic rename.
//! * [`remote_hash`]: the server hashes ranges (check-file, or b3sum/sha256sum over exec).
//!
//! Resume design: a file is cut into fixed ranges ([`sidecar::RANGE_SIZE`]);
//! once a range is written and flushed on the receiving side its BLAKE3
//! digest is recorded. A resume first checks the source against the record
//! (size, mtime, identity, tail digest per [`Verify`]), then proves the kept
//! ranges of the partial (all of them by default, hashed by the server where
//! it can, see [`remote_hash`]; only the last with `--verify tail`) and
//! rewrites from the first range that does not verify.

pub mod auth;
pub mod download;
pub mod listing;
pub mod remote_hash;
pub mod sidecar;
pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::copy::{CopyOptions, CopySummary};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::retry::RetryDecision;
use crate::status::{PeerStatus, StatusDir, TransferRecord};
use crate::store::Store;
use ferry_proto::breaker::{BreakerConfig, BreakerState, CircuitBreaker};

pub use auth::{PassphrasePrompt, SshConfig};

/// How strictly a resume and a finished transfer are verified.
///
/// The default, [`Verify::Full`], proves every byte: the bytes kept from an
/// earlier run before anything is appended to them, and every byte of the
/// finished file before it is renamed into place. The weaker levels are
/// opt-ins that trade proof for speed; each says what it does not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verify {
    /// Only the source's size is compared on resume, and the finished file's
    /// size. Does not check any byte, nor whether the source was rewritten.
    Size,
    /// Size and modification time. Does not check any byte, nor a source
    /// rewritten with its old mtime put back.
    Mtime,
    /// Size, mtime, the source's identity (ctime, inode) and a digest of its
    /// last 64 KiB; the last recorded range of the partial is read back
    /// before appending, and the last range of the finished file before the
    /// rename. Does not check the earlier kept ranges nor the earlier new
    /// ones: damage there goes unnoticed.
    Tail,
    /// As `tail`, plus every kept range is proven before appending and every
    /// range of the finished file before the rename: hashed by the server
    /// where it can (`check-file-handle`, or `b3sum`, `openssl dgst -sha256`,
    /// `sha256sum` or `shasum` over an SSH exec channel) and compared with the same hash of the local
    /// copy, otherwise read back. For downloads the local part is re-hashed
    /// and, where the server hashes, the remote source's kept ranges are
    /// proven unchanged. The default: named `full` because that is the
    /// guarantee; how it was met is reported per file ([`VerifiedBy`]).
    #[default]
    Full,
}

impl std::str::FromStr for Verify {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "size" => Verify::Size,
            "mtime" => Verify::Mtime,
            "tail" => Verify::Tail,
            "full" => Verify::Full,
            _ => {
                return Err(Error::Usage(format!(
                    "--verify {s}: expected size, mtime, tail or full"
                )))
            }
        })
    }
}

/// `sftp://[USER@]HOST[:PORT]/PATH`. The path is taken as given: relative to
/// the login directory, or absolute with a second slash (`sftp://h//tmp/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl SftpTarget {
    pub fn parse(s: &str) -> Result<SftpTarget> {
        let rest = s
            .strip_prefix("sftp://")
            .ok_or_else(|| Error::Usage(format!("{s}: not an sftp:// URL")))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rfind('@') {
            Some(i) => (authority[..i].to_string(), &authority[i + 1..]),
            None => (
                std::env::var("USER").unwrap_or_else(|_| "root".into()),
                authority,
            ),
        };
        let (host, port) = crate::hostport::parse(hostport, 22)
            .map_err(|why| Error::Usage(format!("{s}: {why}")))?;
        if host.is_empty() || user.is_empty() {
            return Err(Error::Usage(format!("{s}: missing host or user")));
        }
        Ok(SftpTarget {
            user,
            host,
            port,
            path: path.to_string(),
        })
    }

    pub fn hostport(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("sftp://{}@{}/{}", self.user, self.hostport(), path)
    }

    fn with_path(&self, path: String) -> SftpTarget {
        SftpTarget {
            path,
            ..self.clone()
        }
    }
}

/// Options of an SFTP copy beyond the common [`CopyOptions`].
#[derive(Debug, Clone, Default)]
pub struct SftpOptions {
    pub ssh: SshConfig,
    pub verify: Verify,
    /// For tests: fail (as a crash would, without cleanup) once this many
    /// ranges of an upload or download have been checkpointed.
    #[doc(hidden)]
    pub stop_after_ranges: Option<usize>,
}

pub(crate) fn sftp_err(
    op: &'static str,
    path: &str,
    host: &str,
    e: russh_sftp::client::error::Error,
) -> Error {
    use russh_sftp::client::error::Error as E;
    match e {
        E::Status(s) => Error::SftpStatus {
            op,
            path: path.to_string(),
            code: s.status_code as u32,
            msg: format!("{} ({})", s.error_message, s.status_code),
        },
        e => Error::Ssh {
            host: host.to_string(),
            msg: format!("{op} {path}: {e}"),
        },
    }
}

pub(crate) fn is_no_such_file(e: &russh_sftp::client::error::Error) -> bool {
    matches!(e, russh_sftp::client::error::Error::Status(s)
        if s.status_code == russh_sftp::protocol::StatusCode::NoSuchFile)
}

/// What happened to one file, for the summary and the output.
#[derive(Debug)]
pub struct FileOutcome {
    pub digest: Option<blake3::Hash>,
    pub notes: Vec<String>,
    pub resume: Resume,
    pub verified_by: VerifiedBy,
}

/// How a file's transfer began, relative to an earlier interrupted one.
/// Serialized with `outcome` as the tag: `{"outcome":"resumed","offset":16777216}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Resume {
    /// No earlier attempt was recorded: sent from byte 0.
    Fresh,
    /// The recorded prefix verified; sending went on from `offset`.
    Resumed { offset: u64 },
    /// An earlier attempt was recorded but nothing of it could be used.
    Restarted { reason: RestartReason },
    /// The partial failed verification near its end: walked back to the last
    /// range that verified and rewrote from `offset` (the record had reached `recorded`).
    Repaired { offset: u64, recorded: u64 },
    /// The server cannot write at an offset into an existing file: sent from
    /// byte 0. `refused_offset` is the probe it refused; absent when the host
    /// was already remembered as such.
    FallbackRestart {
        #[serde(skip_serializing_if = "Option::is_none")]
        refused_offset: Option<u64>,
    },
    /// Every range was already written and recorded (a stop between the last
    /// range and the rename): nothing was sent, the partial was verified and renamed.
    AlreadyComplete,
}

/// Why [`Resume::Restarted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartReason {
    /// The source (local file for an upload, remote file for a download)
    /// differs from the one the partial was made from.
    SourceChanged,
    /// Not even the first recorded range of the partial verified (or the
    /// partial is gone).
    PartialUnusable,
}

impl std::fmt::Display for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::Fresh => write!(f, "fresh"),
            Resume::Resumed { offset } => write!(f, "resumed from byte {offset}"),
            Resume::Restarted {
                reason: RestartReason::SourceChanged,
            } => write!(f, "restarted (source changed)"),
            Resume::Restarted {
                reason: RestartReason::PartialUnusable,
            } => write!(f, "restarted (partial unusable)"),
            Resume::Repaired { offset, recorded } => write!(
                f,
                "repaired (partial verified only up to byte {offset} of {recorded} recorded; rewrote from there)"
            ),
            Resume::FallbackRestart {
                refused_offset: Some(o),
            } => write!(
                f,
                "fallback_restart (server refused a write at offset {o}; sent from byte 0)"
            ),
            Resume::FallbackRestart { refused_offset: None } => write!(
                f,
                "fallback_restart (server known not to write at an offset; sent from byte 0)"
            ),
            Resume::AlreadyComplete => write!(f, "already_complete (nothing to send)"),
        }
    }
}

/// How the finished file was checked before it was renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VerifiedBy {
    /// `--verify size|mtime`: its size only.
    #[serde(rename = "size")]
    Size,
    /// Ranges read back and compared with the BLAKE3 digests of what was sent.
    #[serde(rename = "readback")]
    Readback,
    /// The server hashed the ranges itself (`check-file-handle` extension).
    #[serde(rename = "check-file")]
    CheckFile,
    /// The server ran `b3sum` over the ranges (SSH exec channel).
    #[serde(rename = "b3sum")]
    B3sum,
    /// The server ran `openssl dgst -sha256` over the ranges (SSH exec channel).
    #[serde(rename = "openssl-sha256")]
    OpensslSha256,
    /// The server ran `sha256sum` over the ranges (SSH exec channel).
    #[serde(rename = "sha256sum")]
    Sha256sum,
    /// The server ran `shasum -a 256` over the ranges (SSH exec channel).
    #[serde(rename = "shasum")]
    Shasum,
}

impl VerifiedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifiedBy::Size => "size",
            VerifiedBy::Readback => "readback",
            VerifiedBy::CheckFile => "check-file",
            VerifiedBy::B3sum => "b3sum",
            VerifiedBy::OpensslSha256 => "openssl-sha256",
            VerifiedBy::Sha256sum => "sha256sum",
            VerifiedBy::Shasum => "shasum",
        }
    }
}

/// One file of an SFTP copy, for `--json` (`per_file`) and the human output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    /// Where the file was written: the `sftp://` URL of an upload, the local path of a download.
    pub path: String,
    #[serde(flatten)]
    pub resume: Resume,
    pub verified_by: VerifiedBy,
}

impl std::fmt::Display for FileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}; verified by {}",
            self.path,
            self.resume,
            self.verified_by.as_str()
        )
    }
}

/// Runs a copy where one side is `sftp://`.
pub async fn copy(
    srcs: &[String],
    dst: &str,
    opts: &CopyOptions,
    sftp: &SftpOptions,
    progress: Arc<Progress>,
) -> Result<CopySummary> {
    let started = Instant::now();
    let store = Arc::new(Store::open_shared(&opts.state_dir)?);
    let upload = dst.starts_with("sftp://");
    let mut runner = Runner {
        opts,
        sftp,
        store,
        conn: None,
        progress: progress.clone(),
        rng: rand::SeedableRng::from_entropy(),
        digests: Vec::new(),
        notes: Vec::new(),
        reports: Vec::new(),
        breakers: std::collections::HashMap::new(),
        peers: PeerStatus::new(&opts.state_dir),
        status: StatusDir::new(&opts.state_dir),
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
        let t = SftpTarget::parse(dst)?;
        let into_dir = dst.ends_with('/') || srcs.len() > 1 || t.path.is_empty() || {
            let t2 = t.clone();
            runner
                .with_conn(&t, move |c| {
                    let t2 = t2.clone();
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
        let jobs: Vec<Job> = plan
            .items
            .into_iter()
            .map(|it| Job {
                local: it.local,
                remote: t.with_path(it.dest),
                size: match it.kind {
                    crate::walk::Kind::File { size } => size,
                    crate::walk::Kind::Dir { .. } => u64::MAX,
                },
            })
            .collect();
        runner.count(&jobs);
        for j in jobs {
            runner.upload_one(j).await?;
        }
    } else {
        let dst_path = PathBuf::from(dst);
        let dst_is_dir = dst.ends_with('/') || srcs.len() > 1 || dst_path.is_dir();
        let mut jobs = Vec::new();
        let mut claims = crate::walk::Claims::default();
        for s in srcs {
            let t = SftpTarget::parse(s)?;
            let t2 = t.clone();
            let walk = opts.walk();
            let found = runner
                .with_conn(&t, move |c| {
                    let t2 = t2.clone();
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
                jobs.push(Job {
                    local,
                    remote: t.with_path(remote),
                    size: match what {
                        listing::Listed::File { size } => size,
                        listing::Listed::Dir => u64::MAX,
                    },
                });
            }
        }
        runner.count(&jobs);
        for j in jobs {
            runner.download_one(j).await?;
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
    crate::copy::finish(summary, runner.failed)
}

/// One file to move.
#[derive(Debug, Clone)]
pub struct Job {
    pub local: PathBuf,
    pub remote: SftpTarget,
    pub size: u64,
}

/// The directory holding a remote path, if the path names one (`None` for
/// a bare name: it goes in the login directory, which exists).
fn remote_parent(path: &str) -> Option<String> {
    let p = path.trim_end_matches('/');
    let i = p.rfind('/')?;
    Some(if i == 0 {
        "/".into()
    } else {
        p[..i].to_string()
    })
}

/// Creates a remote directory and its missing parents (`mkdir -p`); one
/// that exists already, or that appears meanwhile, is fine.
async fn mkdir_p(c: &auth::Conn, t: &SftpTarget) -> Result<()> {
    let host = t.hostport();
    let is_dir = |a: &russh_sftp::protocol::FileAttributes| {
        a.permissions.is_some_and(|p| p & 0o170000 == 0o040000)
    };
    match c.raw.stat(t.path.clone()).await {
        Ok(a) if is_dir(&a.attrs) => return Ok(()),
        Ok(_) => {}
        Err(e) if is_no_such_file(&e) => {}
        Err(e) => return Err(sftp_err("stat", &t.path, &host, e)),
    }
    let mut prefix = if t.path.starts_with('/') {
        "/".to_string()
    } else {
        String::new()
    };
    for part in t.path.split('/').filter(|p| !p.is_empty()) {
        prefix = crate::walk::join(&prefix, part);
        match c.raw.stat(prefix.clone()).await {
            Ok(a) if is_dir(&a.attrs) => continue,
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "{}: exists and is not a directory",
                    t.url(&prefix)
                )))
            }
            Err(e) if is_no_such_file(&e) => {}
            Err(e) => return Err(sftp_err("stat", &prefix, &host, e)),
        }
        if let Err(e) = c
            .raw
            .mkdir(
                prefix.clone(),
                russh_sftp::protocol::FileAttributes::default(),
            )
            .await
        {
            // Made by someone else meanwhile?
            match c.raw.stat(prefix.clone()).await {
                Ok(a) if is_dir(&a.attrs) => {}
                _ => return Err(sftp_err("mkdir", &prefix, &host, e)),
            }
        }
    }
    Ok(())
}

/// After a write, close or fsync came back with a plain `SSH_FX_FAILURE`:
/// asks the server how much space is left (`statvfs@openssh.com`) and, if
/// its file system is (nearly) full, says so. `need` is the file's size.
async fn explain_failure(c: &auth::Conn, t: &SftpTarget, need: u64, e: Error) -> Error {
    if !matches!(e, Error::SftpStatus { code: 4, .. }) || !c.has("statvfs@openssh.com") {
        return e;
    }
    let dir = remote_parent(&t.path).unwrap_or_else(|| ".".into());
    let Ok(v) = c.raw.statvfs(dir).await else {
        return e;
    };
    let avail = v.blocks_avail.saturating_mul(v.fragment_size.max(1));
    // Nearly full: less left than the file needs, and under 16 MiB.
    if avail < need.clamp(4096, NEARLY_FULL) {
        return Error::NoSpace {
            host: t.hostport(),
            path: t.path.clone(),
            avail,
        };
    }
    e
}

/// Free space under which a failed write is put down to a full disk.
const NEARLY_FULL: u64 = 16 << 20;

type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

struct Runner<'a> {
    opts: &'a CopyOptions,
    sftp: &'a SftpOptions,
    store: Arc<Store>,
    conn: Option<Arc<auth::Conn>>,
    progress: Arc<Progress>,
    rng: rand::rngs::StdRng,
    digests: Vec<(String, blake3::Hash)>,
    notes: Vec<String>,
    reports: Vec<FileReport>,
    /// One circuit breaker per SSH host, as for native transfers.
    breakers: std::collections::HashMap<String, CircuitBreaker>,
    peers: PeerStatus,
    /// Records of unfinished transfers, for `ferry status`.
    status: StatusDir,
    /// Remote directories known to exist (made or seen by this copy).
    made_dirs: std::collections::HashSet<String>,
    /// Left out of trees on purpose (symlinks, special files).
    skipped: u64,
    /// Could not be copied (reported one by one as planned).
    failed: u64,
}

impl Runner<'_> {
    fn count(&self, jobs: &[Job]) {
        let files: Vec<_> = jobs.iter().filter(|j| j.size != u64::MAX).collect();
        Progress::add(&self.progress.files_total, files.len() as u64);
        Progress::add(
            &self.progress.bytes_total,
            files.iter().map(|j| j.size).sum(),
        );
    }

    /// Runs `f` on a connection, reconnecting and retrying retryable failures
    /// under the copy's retry policy (progress resets the attempt count).
    async fn with_conn<T>(
        &mut self,
        t: &SftpTarget,
        mut f: impl FnMut(Arc<auth::Conn>) -> BoxFut<T>,
    ) -> Result<T> {
        let mut attempt = 0u32;
        let mut start = Instant::now();
        loop {
            let before = Progress::get(&self.progress.bytes_done);
            let r = async {
                let c = match &self.conn {
                    Some(c) => c.clone(),
                    None => {
                        let c = Arc::new(self.connect(t).await?);
                        self.conn = Some(c.clone());
                        c
                    }
                };
                f(c).await
            }
            .await;
            let e = match r {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !e.is_retryable() {
                return Err(e);
            }
            self.conn = None;
            if Progress::get(&self.progress.bytes_done) > before {
                attempt = 0;
                start = Instant::now();
            }
            attempt += 1;
            let delay = match self
                .opts
                .retry
                .decide(attempt, start.elapsed(), None, &mut self.rng)
            {
                RetryDecision::After(d) => d,
                RetryDecision::GiveUp => {
                    return Err(Error::RetriesExhausted {
                        attempts: attempt,
                        last: Box::new(e),
                    })
                }
            };
            Progress::add(&self.progress.retries, 1);
            warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "sftp: retrying");
            tokio::time::sleep(delay.min(Duration::from_secs(60))).await;
        }
    }

    /// Connects, respecting the host's circuit breaker: while it is open no
    /// connection is attempted; transitions are logged, counted and shown by
    /// `ferry status`.
    async fn connect(&mut self, t: &SftpTarget) -> Result<auth::Conn> {
        let host = t.hostport();
        loop {
            let breaker = self
                .breakers
                .entry(host.clone())
                .or_insert_with(|| CircuitBreaker::new(BreakerConfig::default()));
            match breaker.allow(Instant::now().into_std()) {
                Ok(()) => break,
                Err(until) => {
                    let wait = until.saturating_duration_since(Instant::now().into_std());
                    tracing::info!(
                        peer = %host,
                        wait_ms = wait.as_millis() as u64,
                        "circuit breaker open: not connecting until the cool-down ends"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Progress::add(&self.progress.connects, 1);
        let r = auth::connect(t, &self.sftp.ssh).await;
        let now = Instant::now().into_std();
        let breaker = self
            .breakers
            .entry(host.clone())
            .or_insert_with(|| CircuitBreaker::new(BreakerConfig::default()));
        match &r {
            Ok(_) => breaker.on_success(now),
            Err(e) if e.is_retryable() => breaker.on_failure(now),
            Err(_) => {}
        }
        while let Some((from, to)) = breaker.poll_transition() {
            warn!(
                peer = %host,
                from = from.name(),
                to = to.name(),
                "circuit breaker"
            );
            match to {
                BreakerState::Open { .. } => Progress::add(&self.progress.breaker_opens, 1),
                BreakerState::Closed => Progress::add(&self.progress.breaker_closes, 1),
                BreakerState::HalfOpen => {}
            }
            self.peers.put(&host, to);
        }
        r
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
        if let Some(old) = self.status.find(direction, &local, &remote) {
            self.status.remove(&old.id);
        }
        let id: [u8; 16] = rand::Rng::gen(&mut self.rng);
        let rec = TransferRecord {
            id: crate::fsutil::hex(&id),
            direction: direction.into(),
            local,
            remote,
            size,
            bytes_done: 0,
            state: "active".into(),
            last_error: None,
            updated_unix: 0,
            pid: 0,
            source: String::new(),
        };
        let _ = self.status.put(&rec);
        rec
    }

    /// Ends a status record: removed when the file is done, else kept with why.
    fn untrack<T>(&self, mut rec: TransferRecord, r: &Result<T>) {
        match r {
            Ok(_) => self.status.remove(&rec.id),
            Err(e) => {
                rec.bytes_done = Progress::get(&self.progress.current_done);
                rec.last_error = Some(e.to_string());
                rec.state = if e.is_retryable() {
                    "interrupted".into()
                } else {
                    "failed".into()
                };
                let _ = self.status.put(&rec);
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
            let d = d.clone();
            Box::pin(async move { mkdir_p(&c, &d).await })
        })
        .await?;
        self.made_dirs.insert(path);
        Ok(())
    }

    async fn upload_one(&mut self, job: Job) -> Result<()> {
        let t = job.remote.clone();
        // Missing parents are made, as native copies do.
        if let Some(parent) = remote_parent(&t.path) {
            self.ensure_dir(&t, parent).await?;
        }
        if job.size == u64::MAX {
            return self.ensure_dir(&t, t.path.clone()).await;
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
                let (job, store, progress) = (job.clone(), store.clone(), progress.clone());
                Box::pin(async move {
                    progress.undo_file();
                    upload::upload(&c, &job, &store, &progress, verify, stop).await
                })
            })
            .await;
        let out = match (out, self.conn.clone()) {
            (Err(e), Some(c)) => Err(explain_failure(&c, &t, size, e).await),
            (out, _) => out,
        };
        self.untrack(rec, &out);
        let out = out?;
        self.finish(&t.path, t.url(&t.path), out);
        Ok(())
    }

    async fn download_one(&mut self, job: Job) -> Result<()> {
        let t = job.remote.clone();
        if job.size == u64::MAX {
            return crate::fsutil::create_dirs_durable(&job.local)
                .map_err(|e| Error::local(&job.local, e));
        }
        self.progress.start_file(&t.url(&t.path), job.size);
        let local = job.local.clone();
        let stop = self.sftp.stop_after_ranges;
        let (store, progress, verify) =
            (self.store.clone(), self.progress.clone(), self.sftp.verify);
        let rec = self.track("download", &local, t.url(&t.path), job.size);
        let out = self
            .with_conn(&t, move |c| {
                let (job, store, progress) = (job.clone(), store.clone(), progress.clone());
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
            self.notes.push(n);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = SftpTarget::parse("sftp://bob@h:2222/a/b").unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port, t.path.as_str()),
            ("bob", "h", 2222, "a/b")
        );
        let t = SftpTarget::parse("sftp://bob@h//tmp/x").unwrap();
        assert_eq!((t.port, t.path.as_str()), (22, "/tmp/x"));
        let t = SftpTarget::parse("sftp://bob@[::1]:22/x").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.hostport(), "[::1]:22");
        assert!(SftpTarget::parse("sftp://bob@h:xx/x").is_err());
        for bad in [
            "sftp://bob@h:0/x",
            "sftp://bob@h:65536/x",
            "sftp://bob@[::1/x",
        ] {
            let e = SftpTarget::parse(bad).unwrap_err();
            assert_eq!(e.class(), crate::ErrorClass::Usage, "{bad}: {e}");
        }
        assert!(SftpTarget::parse("sftp:///x").is_err());
        assert_eq!("full".parse::<Verify>().unwrap(), Verify::Full);
        assert!("nope".parse::<Verify>().is_err());
    }
}
