//! The native `ferry://` endpoint kind of `ferry cp`: plans uploads and
//! downloads against a ferry server and moves them (small files in batches,
//! large ones chunked, several at once with `--streams`) under the shared
//! [`runner::Runner`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

// Time through tokio's clock, so paused-time tests drive retries and cool-downs.
use tokio::time::Instant;

use ferry_proto::message::{BatchFile, Entry, EntryKind, MAX_BATCH_FILE, MAX_BATCH_FILES};
use ferry_proto::{ChunkHash, HashAlg, TransferId};
use rand::Rng;
use tracing::{error, info, warn};

use super::runner::{self, BoxFut};
use super::{finish, CopyOptions, CopySummary};
use crate::client::{BatchItem, ClientConfig, Session};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lanes::Streams;
use crate::progress::{FileProgress, Progress};
use crate::status::TransferRecord;
use crate::store::Store;
use crate::transfer::prepare_send;
use crate::transport::Transport;
use crate::walk::{Claims, Kind, Plan, Planned};

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local(PathBuf),
    /// `ferry://host:port/path`; `path` is relative to the server root.
    Remote {
        addr: String,
        path: String,
    },
}

pub const DEFAULT_PORT: u16 = 7787;

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint> {
        let Some(rest) = s.strip_prefix("ferry://") else {
            if s.contains("://") {
                return Err(Error::Usage(format!(
                    "{s}: unsupported URL scheme (ferry://, ferry+quic://, ferry+tcp://, ferry+auto://, sftp:// or a local path)"
                )));
            }
            return Ok(Endpoint::Local(PathBuf::from(s)));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = crate::hostport::parse(hostport, DEFAULT_PORT)
            .map_err(|why| Error::Usage(format!("{s}: {why}")))?;
        let addr = crate::hostport::join(&host, port);
        if path.len() > ferry_proto::message::MAX_PATH {
            return Err(Error::Usage(format!(
                "{s}: the path is {} bytes long; at most {} can be sent",
                path.len(),
                ferry_proto::message::MAX_PATH
            )));
        }
        Ok(Endpoint::Remote {
            addr,
            path: path.to_string(),
        })
    }

    fn display(&self) -> String {
        match self {
            Endpoint::Local(p) => p.display().to_string(),
            Endpoint::Remote { addr, path } => format!("ferry://{addr}/{path}"),
        }
    }
}

/// One file to move.
#[derive(Debug, Clone)]
struct FileJob {
    local: PathBuf,
    remote: String,
    size: u64,
}

/// A directory to create (and stamp with its metadata at the end).
#[derive(Debug, Clone)]
struct DirJob {
    local: PathBuf,
    remote: String,
    mode: u32,
    mtime_ns: i64,
}

fn base_name(p: &str) -> String {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string()
}

/// Runs a copy between local paths and a `ferry://` server.
pub(super) async fn copy(
    srcs: &[String],
    dst: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopySummary> {
    let started = Instant::now();
    // `ferry+quic://` and friends choose the transport for this copy.
    let mut scheme_transport = None;
    let mut plain = |s: &str| -> Result<String> {
        let (t, url) = Transport::split_scheme(s)?;
        if let Some(t) = t {
            if scheme_transport.is_some_and(|prev| prev != t) {
                return Err(Error::Usage(
                    "the URLs name different transports; use one".into(),
                ));
            }
            scheme_transport = Some(t);
        }
        Ok(url)
    };
    let srcs: Vec<String> = srcs.iter().map(|s| plain(s)).collect::<Result<_>>()?;
    let dst = plain(dst)?;
    let dst = dst.as_str();
    let scheme_opts;
    let opts = match scheme_transport {
        Some(t) => {
            let mut o = opts.clone();
            o.client.dialer = t.dialer(&o.client.transport);
            scheme_opts = o;
            &scheme_opts
        }
        None => opts,
    };
    let srcs: Vec<Endpoint> = srcs
        .iter()
        .map(|s| Endpoint::parse(s))
        .collect::<Result<_>>()?;
    let dst_ep = Endpoint::parse(dst)?;
    let store = Arc::new(Store::open_shared(&opts.state_dir)?);
    let mut runner = Runner {
        opts,
        store,
        core: runner::Runner::new(opts, progress.clone()),
        session: None,
        progress: progress.clone(),
        digests: Vec::new(),
        files_at_once: 0,
        skipped: 0,
        failed: 0,
    };
    let dst_is_dir_hint = dst.ends_with('/') || srcs.len() > 1;
    match (&srcs[0], &dst_ep) {
        (Endpoint::Local(_), Endpoint::Remote { addr, path }) => {
            if srcs.iter().any(|s| !matches!(s, Endpoint::Local(_))) {
                return Err(Error::Usage("all sources must be on the same side".into()));
            }
            let addr = addr.clone();
            let dst_entry = runner
                .with_session(&addr, |s| Box::pin(s.stat_owned(path.clone())))
                .await?;
            let into_dir = dst_is_dir_hint || dst_entry.kind == EntryKind::Dir || path.is_empty();
            let mut plan = Plan::with_check(server_accepts);
            for s in &srcs {
                let Endpoint::Local(p) = s else { continue };
                plan.add_source(p, path, into_dir, opts.walk())?;
            }
            let (files, dirs) = upload_jobs(plan.items);
            runner.skipped += plan.skipped.len() as u64;
            runner.failed += plan.failed.len() as u64;
            runner.upload(&addr, files, dirs).await?;
        }
        (Endpoint::Remote { addr, .. }, Endpoint::Local(dst_path)) => {
            let addr = addr.clone();
            let dst_is_dir = dst_is_dir_hint || dst_path.is_dir();
            let (mut files, mut dirs) = (Vec::new(), Vec::new());
            let mut down = DownloadPlan {
                addr: addr.clone(),
                claims: Claims::default(),
                skipped: 0,
                failed: 0,
            };
            for s in &srcs {
                let Endpoint::Remote { addr: a, path } = s else {
                    return Err(Error::Usage("all sources must be on the same side".into()));
                };
                if *a != addr {
                    return Err(Error::Usage(
                        "all remote sources must be on one server".into(),
                    ));
                }
                let p = path.clone();
                let entry = runner
                    .with_session(&addr, |s| Box::pin(s.stat_owned(p.clone())))
                    .await?;
                let target = if dst_is_dir {
                    dst_path.join(base_name(path))
                } else {
                    dst_path.clone()
                };
                if let Err(line) = down.claims.claim(
                    &target.to_string_lossy(),
                    &s.display(),
                    entry.kind == EntryKind::Dir,
                ) {
                    error!("{line}");
                    down.failed += 1;
                    continue;
                }
                match entry.kind {
                    EntryKind::Missing => {
                        return Err(Error::NotFound(format!(
                            "{}: no such file or directory on the server",
                            s.display()
                        )))
                    }
                    EntryKind::File => files.push(FileJob {
                        local: target,
                        remote: path.clone(),
                        size: entry.size,
                    }),
                    EntryKind::Dir => {
                        if !opts.recursive {
                            return Err(Error::Usage(format!(
                                "{} is a directory (use -r)",
                                s.display()
                            )));
                        }
                        let p = path.clone();
                        let entries = runner
                            .with_session(&addr, |s| Box::pin(s.list_owned(p.clone())))
                            .await?;
                        dirs.push(DirJob {
                            local: target.clone(),
                            remote: path.clone(),
                            mode: entry.mode,
                            mtime_ns: entry.mtime_ns,
                        });
                        down.plan(&entries, path, &target, &mut files, &mut dirs);
                    }
                }
            }
            runner.skipped += down.skipped;
            runner.failed += down.failed;
            runner.download(&addr, files, dirs).await?;
        }
        (Endpoint::Local(_), Endpoint::Local(_)) => {
            return Err(Error::Usage(
                "both sides are local; one of SRC or DST must be ferry://HOST/PATH".into(),
            ))
        }
        (Endpoint::Remote { .. }, Endpoint::Remote { .. }) => {
            return Err(Error::Usage(
                "copying between two servers is not supported; one side must be local".into(),
            ))
        }
    }
    let digest = if runner.digests.len() == 1 {
        runner.digests[0].1.to_hex()
    } else {
        let mut h = opts.alg.hash(b"");
        let mut hasher = ferry_proto::hash::Hasher::new(opts.alg);
        // Files may finish in any order when several move at once.
        runner.digests.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, d) in &runner.digests {
            hasher.update(p.as_bytes());
            hasher.update(&[0]);
            hasher.update(&d.0);
        }
        if !runner.digests.is_empty() {
            h = hasher.finalize();
        }
        h.to_hex()
    };
    let summary = CopySummary {
        files: runner.digests.len() as u64,
        bytes_total: Progress::get(&progress.bytes_total),
        bytes_sent: Progress::get(&progress.bytes_sent),
        bytes_resumed: Progress::get(&progress.bytes_resumed),
        retries: Progress::get(&progress.retries),
        data_lanes: Progress::get(&progress.lanes),
        files_at_once: runner.files_at_once.max(1) as u64,
        duration_s: started.elapsed().as_secs_f64(),
        digest,
        alg: opts.alg.name().to_string(),
        skipped: runner.skipped,
        per_file: Vec::new(),
    };
    finish(summary, runner.failed)
}

/// Whether a ferry server takes `dest` as a path (it refuses some names a
/// local file system allows: backslashes, device names, partial-file names).
fn server_accepts(dest: &str) -> std::result::Result<(), String> {
    let max = ferry_proto::message::MAX_PATH;
    if dest.len() > max {
        return Err(format!(
            "the path is {} bytes long; at most {max} can be sent",
            dest.len()
        ));
    }
    crate::paths::split_relative(dest)
        .map(|_| ())
        .map_err(|e| format!("the server refuses this name: {e}"))
}

/// Native upload jobs from a walk's plan.
fn upload_jobs(items: Vec<Planned>) -> (Vec<FileJob>, Vec<DirJob>) {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for it in items {
        match it.kind {
            Kind::File { size } => files.push(FileJob {
                local: it.local,
                remote: it.dest,
                size,
            }),
            Kind::Dir { mode, mtime_ns } => dirs.push(DirJob {
                local: it.local,
                remote: it.dest,
                mode,
                mtime_ns,
            }),
        }
    }
    (files, dirs)
}

/// Planning a native download from a server's listing.
struct DownloadPlan {
    addr: String,
    claims: Claims,
    skipped: u64,
    failed: u64,
}

/// `st_mode` type bits of a symlink: a `Missing` entry a server lists with
/// them is a symlink it did not follow.
const S_IFLNK: u32 = 0o120000;
const S_IFMT: u32 = 0o170000;

impl DownloadPlan {
    fn plan(
        &mut self,
        entries: &[Entry],
        base: &str,
        target: &Path,
        files: &mut Vec<FileJob>,
        dirs: &mut Vec<DirJob>,
    ) {
        let url = |p: &str| format!("ferry://{}/{}", self.addr, crate::walk::join(base, p));
        for e in entries {
            if e.kind == EntryKind::Missing {
                // Listed but not served: a symlink (the server does not
                // follow links inside a tree), or a name that is not UTF-8
                // (its path shows the bytes escaped).
                if e.mode & S_IFMT == S_IFLNK {
                    warn!(
                        "skipping symlink {} (ferry servers do not follow links inside a tree)",
                        url(&e.path)
                    );
                    self.skipped += 1;
                } else {
                    error!(
                        "{}: not copied: the name on the server is not valid UTF-8, which ferry cannot carry (rename it there)",
                        url(&e.path)
                    );
                    self.failed += 1;
                }
                continue;
            }
            // Entries come from the server: never let one climb out of the target.
            if crate::paths::split_relative(&e.path).is_err() || e.path.is_empty() {
                error!(
                    "{}: not copied: the server listed an unsafe path",
                    url(&e.path)
                );
                self.failed += 1;
                continue;
            }
            let local = target.join(&e.path);
            let remote = crate::walk::join(base, &e.path);
            if let Err(line) = self.claims.claim(
                &local.to_string_lossy(),
                &url(&e.path),
                e.kind == EntryKind::Dir,
            ) {
                error!("{line}");
                self.failed += 1;
                continue;
            }
            match e.kind {
                EntryKind::Dir => dirs.push(DirJob {
                    local,
                    remote,
                    mode: e.mode,
                    mtime_ns: e.mtime_ns,
                }),
                EntryKind::File => files.push(FileJob {
                    local,
                    remote,
                    size: e.size,
                }),
                EntryKind::Missing => {}
            }
        }
    }
}

/// Groups small files into batches bounded in count, bytes and announcement size.
fn batch_groups<'j>(small: &[&'j FileJob]) -> Vec<Vec<&'j FileJob>> {
    const MAX_BYTES: u64 = 8 * 1024 * 1024;
    const MAX_ANNOUNCE: usize = 768 * 1024;
    let mut out = Vec::new();
    let mut cur: Vec<&FileJob> = Vec::new();
    let (mut bytes, mut announce) = (0u64, 0usize);
    for &f in small {
        let a = f.remote.len() + 64;
        if !cur.is_empty()
            && (cur.len() >= MAX_BATCH_FILES
                || bytes + f.size > MAX_BYTES
                || announce + a > MAX_ANNOUNCE)
        {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
            announce = 0;
        }
        bytes += f.size;
        announce += a;
        cur.push(f);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads the files of one batch group on a blocking thread.
fn read_group(
    group: &[&FileJob],
    alg: HashAlg,
) -> tokio::task::JoinHandle<Vec<Result<Option<BatchItem>>>> {
    let paths: Vec<(PathBuf, String)> = group
        .iter()
        .map(|j| (j.local.clone(), j.remote.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|(local, remote)| read_small(&local, &remote, alg))
            .collect()
    })
}

/// Reads a small file whole for a batch; `None` if it is no longer small or
/// changed while being read (it then goes the ordinary way, which detects
/// changes chunk by chunk).
fn read_small(local: &Path, remote: &str, alg: HashAlg) -> Result<Option<BatchItem>> {
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(local).map_err(|e| Error::local(local, e))?;
    if !before.is_file() || before.len() > MAX_BATCH_FILE {
        return Ok(None);
    }
    let data = std::fs::read(local).map_err(|e| Error::local(local, e))?;
    let after = std::fs::metadata(local).map_err(|e| Error::local(local, e))?;
    if fsutil::source_id(&before) != fsutil::source_id(&after) || data.len() as u64 != after.len() {
        return Ok(None);
    }
    Ok(Some(BatchItem {
        file: BatchFile {
            path: remote.to_string(),
            size: data.len() as u64,
            mtime_ns: fsutil::mtime_ns(&after),
            mode: after.mode() & 0o777,
            digest: ferry_proto::hash::small_file_digest(alg, &data),
        },
        data: bytes::Bytes::from(data),
    }))
}

/// A native copy: the shared [`runner::Runner`] plus what native jobs need.
struct Runner<'a> {
    opts: &'a CopyOptions,
    store: Arc<Store>,
    core: runner::Runner,
    session: Option<Session>,
    progress: Arc<Progress>,
    digests: Vec<(String, ChunkHash)>,
    /// Most file workers that ran at once.
    files_at_once: usize,
    /// Left out of trees on purpose (symlinks, special files).
    skipped: u64,
    /// Could not be copied (reported one by one as planned).
    failed: u64,
}

/// A `ferry://` server as the runner sees it.
struct Native<'a> {
    addr: &'a str,
    client: &'a ClientConfig,
}

impl runner::Endpoint for Native<'_> {
    type Session = Session;
    const PROGRESS_RESETS: bool = false;
    fn peer(&self) -> String {
        self.addr.to_string()
    }
    fn connect(&self) -> BoxFut<'_, Session> {
        Box::pin(Session::connect(self.addr, self.client))
    }
}

impl Session {
    async fn stat_owned(&mut self, p: String) -> Result<Entry> {
        self.stat(&p).await
    }
    async fn list_owned(&mut self, p: String) -> Result<Vec<Entry>> {
        self.list(&p).await
    }
}

/// Most files one copy moves at once.
const MAX_FILE_WORKERS: usize = 8;
/// How long the adaptive mode measures throughput before deciding on another file worker.
const FILE_WINDOW: Duration = Duration::from_millis(1000);
/// Another worker must have raised throughput by this factor for one more to start.
const FILE_GAIN: f64 = 1.10;

/// One file worker: takes files from the shared queue until it is empty or
/// another worker failed.
async fn file_worker(
    w: &mut Runner<'_>,
    addr: &str,
    queue: &std::sync::Mutex<std::collections::VecDeque<&FileJob>>,
    failed: &std::sync::atomic::AtomicBool,
    up: bool,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        if failed.load(Relaxed) {
            return Ok(());
        }
        let Some(job) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
            return Ok(());
        };
        let r = if up {
            w.upload_one(addr, job).await
        } else {
            w.download_one(addr, job).await
        };
        if let Err(e) = r {
            failed.store(true, Relaxed);
            return Err(e);
        }
    }
}

/// Batch workers for small files (see `Runner::batches`): two are enough to
/// keep one batch on the wire while the other is committed.
const BATCH_WORKERS: usize = 2;

/// Which way a batch worker moves its groups.
#[derive(Clone, Copy)]
enum Way {
    Up,
    /// Down, with this many groups being stored at once by one worker.
    Down {
        storing: usize,
    },
}

/// Groups of small files waiting for a batch worker.
type GroupQueue<'j> = std::sync::Mutex<std::collections::VecDeque<&'j Vec<&'j FileJob>>>;

async fn batch_worker<'j>(
    w: &mut Runner<'_>,
    addr: &str,
    queue: &GroupQueue<'j>,
    failed: &std::sync::atomic::AtomicBool,
    way: Way,
) -> Result<Vec<&'j FileJob>> {
    match way {
        Way::Up => up_worker(w, addr, queue, failed).await,
        Way::Down { storing } => down_worker(w, addr, queue, failed, storing).await,
    }
}

/// One download batch worker: takes groups from `queue` until it is empty;
/// up to `depth` fetched groups are written and committed on blocking
/// threads while the next is fetched (one writes its files while another
/// waits on its `syncfs`, which leaves the CPU idle).
async fn down_worker<'j>(
    w: &mut Runner<'_>,
    addr: &str,
    queue: &GroupQueue<'j>,
    failed: &std::sync::atomic::AtomicBool,
    depth: usize,
) -> Result<Vec<&'j FileJob>> {
    use std::sync::atomic::Ordering::Relaxed;
    let take = || queue.lock().ok().and_then(|mut q| q.pop_front());
    let mut fallback = Vec::new();
    let mut storing = std::collections::VecDeque::new();
    let mut fetch_failed = None;
    while let Some(group) = take() {
        if failed.load(Relaxed) {
            break;
        }
        let fetched = match w.fetch_batch(addr, group.clone()).await {
            Ok(f) => f,
            Err(e) => {
                failed.store(true, Relaxed);
                fetch_failed = Some(e);
                break;
            }
        };
        if storing.len() >= depth.max(1) {
            if let Some(prev) = storing.pop_front() {
                fallback.extend(
                    w.stored_batch(prev)
                        .await
                        .inspect_err(|_| failed.store(true, Relaxed))?,
                );
            }
        }
        storing.push_back(fetched.store(w.opts.alg));
    }
    // Groups being stored are taken in even when a fetch failed.
    while let Some(prev) = storing.pop_front() {
        fallback.extend(
            w.stored_batch(prev)
                .await
                .inspect_err(|_| failed.store(true, Relaxed))?,
        );
    }
    match fetch_failed {
        Some(e) => Err(e),
        None => Ok(fallback),
    }
}

/// One upload batch worker: takes groups from `queue` until it is empty,
/// reading the next group while the current one is sent.
async fn up_worker<'j>(
    w: &mut Runner<'_>,
    addr: &str,
    queue: &GroupQueue<'j>,
    failed: &std::sync::atomic::AtomicBool,
) -> Result<Vec<&'j FileJob>> {
    use std::sync::atomic::Ordering::Relaxed;
    let take = || queue.lock().ok().and_then(|mut q| q.pop_front());
    let mut fallback = Vec::new();
    let mut next = take().map(|g| (g, read_group(g, w.opts.alg)));
    while let Some((group, reading)) = next.take() {
        if failed.load(Relaxed) {
            break;
        }
        let read = reading.await.map_err(|e| Error::Store(e.to_string()))?;
        next = take().map(|g| (g, read_group(g, w.opts.alg)));
        match w.upload_batch(addr, group, read).await {
            Ok(f) => fallback.extend(f),
            Err(e) => {
                failed.store(true, Relaxed);
                return Err(e);
            }
        }
    }
    Ok(fallback)
}

impl<'a> Runner<'a> {
    /// A runner for a parallel file worker: the same options, journal, status
    /// records and progress; its own connection and retry jitter.
    fn fork(&mut self) -> Runner<'a> {
        Runner {
            opts: self.opts,
            store: self.store.clone(),
            core: self.core.fork(),
            session: None,
            progress: self.progress.clone(),
            digests: Vec::new(),
            files_at_once: 0,
            skipped: 0,
            failed: 0,
        }
    }

    /// How many files may move at once: one with a rate limit (it is per
    /// transfer) or `--streams 1`; up to N with `--streams N`; with `auto`,
    /// up to [`MAX_FILE_WORKERS`], grown while it pays (see `transfer_files`).
    fn file_workers(&self, files: usize) -> usize {
        if files < 2 || self.opts.client.bwlimit > 0 {
            return 1;
        }
        match self.opts.client.streams {
            Streams::Fixed(n) => n.min(files),
            Streams::Auto => MAX_FILE_WORKERS.min(files),
        }
    }

    /// Moves files that do not go in batches, several at once on separate
    /// connections when that pays: each file worker has its own connection,
    /// retries and resume, and takes the next file from a shared queue. With
    /// `--streams auto` the copy starts with one worker and adds one each
    /// second while the previous addition raised the measured throughput
    /// (verified bytes per second) by 10 % or more, which is what per-file
    /// round trips on a long path cost; a fixed count starts all at once.
    async fn transfer_files(&mut self, addr: &str, jobs: Vec<&FileJob>, up: bool) -> Result<()> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let max = self.file_workers(jobs.len());
        if max <= 1 {
            for j in jobs {
                if up {
                    self.upload_one(addr, j).await?;
                } else {
                    self.download_one(addr, j).await?;
                }
            }
            return Ok(());
        }
        let queue =
            std::sync::Mutex::new(jobs.into_iter().collect::<std::collections::VecDeque<_>>());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut workers = Vec::with_capacity(max);
        let mut first = self.fork();
        first.session = self.session.take();
        workers.push(first);
        for _ in 1..max {
            workers.push(self.fork());
        }
        let adaptive = matches!(self.opts.client.streams, Streams::Auto);
        let progress = self.progress.clone();
        let mut first_err = None;
        let mut started = 1;
        {
            let mut pool = workers.iter_mut();
            let mut running = FuturesUnordered::new();
            for w in pool.by_ref().take(if adaptive { 1 } else { max }) {
                running.push(file_worker(w, addr, &queue, &failed, up));
            }
            if !adaptive {
                started = max;
            }
            let mut growing = adaptive;
            let mut mark = (Instant::now(), Progress::get(&progress.bytes_done));
            let mut best = 0.0f64;
            loop {
                tokio::select! {
                    r = running.next() => match r {
                        None => break,
                        Some(Err(e)) => {
                            first_err.get_or_insert(e);
                        }
                        Some(Ok(())) => {}
                    },
                    _ = tokio::time::sleep_until(mark.0 + FILE_WINDOW), if growing => {
                        let done = Progress::get(&progress.bytes_done);
                        let rate = done.saturating_sub(mark.1) as f64 / mark.0.elapsed().as_secs_f64().max(1e-3);
                        mark = (Instant::now(), done);
                        let more = queue.lock().map(|q| !q.is_empty()).unwrap_or(false);
                        if started > 1 && rate < best * FILE_GAIN {
                            growing = false;
                        } else if let (true, Some(w)) = (more, pool.next()) {
                            best = best.max(rate);
                            running.push(file_worker(w, addr, &queue, &failed, up));
                            started += 1;
                        } else {
                            growing = false;
                        }
                        if !growing {
                            info!(workers = started, rate_mb_s = rate / 1e6, "files: settled on this many at once");
                        }
                    }
                }
            }
        }
        info!(workers = started, "files moved in parallel");
        self.files_at_once = self.files_at_once.max(started);
        for w in &mut workers {
            self.digests.append(&mut w.digests);
        }
        self.session = workers.first_mut().and_then(|w| w.session.take());
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs `f` on a connected session, reconnecting and retrying retryable failures.
    async fn with_session<T>(
        &mut self,
        addr: &str,
        f: impl for<'s> FnMut(&'s mut Session) -> BoxFut<'s, T>,
    ) -> Result<T> {
        let ep = Native {
            addr,
            client: &self.opts.client,
        };
        self.core.with_session(&ep, &mut self.session, f).await
    }

    /// Connects if needed, behind the peer's circuit breaker.
    async fn ensure_session(&mut self, addr: &str) -> Result<()> {
        if self.session.is_some() {
            return Ok(());
        }
        let ep = Native {
            addr,
            client: &self.opts.client,
        };
        self.session = Some(self.core.connect(&ep).await?);
        Ok(())
    }

    async fn upload(&mut self, addr: &str, files: Vec<FileJob>, dirs: Vec<DirJob>) -> Result<()> {
        self.count(&files);
        // Directories first, writable by us until their metadata is set at the end.
        let create: Arc<Vec<(String, u32, i64)>> = Arc::new(
            dirs.iter()
                .map(|d| (d.remote.clone(), d.mode | 0o700, 0))
                .collect(),
        );
        self.with_session(addr, |s| {
            let create = create.clone();
            Box::pin(async move { s.mkdir_many(&create).await })
        })
        .await?;
        let batching = self
            .with_session(addr, |s| Box::pin(async move { Ok(s.supports_batch()) }))
            .await?;
        let (small, large): (Vec<&FileJob>, Vec<&FileJob>) = if batching {
            files.iter().partition(|f| f.size <= MAX_BATCH_FILE)
        } else {
            (Vec::new(), files.iter().collect())
        };
        let groups = batch_groups(&small);
        let fallback = self.batches(addr, &groups, true).await?;
        self.transfer_files(addr, fallback.into_iter().chain(large).collect(), true)
            .await?;
        // Directory metadata last, deepest first, since adding files changes mtimes.
        let stamp: Arc<Vec<(String, u32, i64)>> = Arc::new(
            dirs.iter()
                .rev()
                .map(|d| (d.remote.clone(), d.mode, d.mtime_ns))
                .collect(),
        );
        self.with_session(addr, |s| {
            let stamp = stamp.clone();
            Box::pin(async move { s.mkdir_many(&stamp).await })
        })
        .await?;
        Ok(())
    }

    /// Moves groups of small files as batches, up (`upload`) or down. With
    /// two groups or more (and more than one stream allowed), two batch
    /// workers on two connections take groups in turn, so one batch moves
    /// while the receiving end makes the other durable (its `syncfs` and
    /// links); an uploading worker reads (and hashes) its next group while
    /// its current one is in flight. Returns the files that must go the
    /// ordinary way instead.
    async fn batches<'j>(
        &mut self,
        addr: &str,
        groups: &'j [Vec<&'j FileJob>],
        upload: bool,
    ) -> Result<Vec<&'j FileJob>> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let workers = self.file_workers(groups.len()).min(BATCH_WORKERS);
        let queue: GroupQueue<'j> = std::sync::Mutex::new(groups.iter().collect());
        let failed = std::sync::atomic::AtomicBool::new(false);
        // Two groups being stored in all.
        let way = match upload {
            true => Way::Up,
            false => Way::Down {
                storing: 2 / workers.max(1),
            },
        };
        if workers <= 1 {
            return batch_worker(self, addr, &queue, &failed, way).await;
        }
        let mut forks: Vec<Runner<'a>> = (1..workers).map(|_| self.fork()).collect();
        let mut fallback = Vec::new();
        let mut first_err = None;
        {
            let mut running = FuturesUnordered::new();
            running.push(batch_worker(self, addr, &queue, &failed, way));
            for w in forks.iter_mut() {
                running.push(batch_worker(w, addr, &queue, &failed, way));
            }
            while let Some(r) = running.next().await {
                match r {
                    Ok(f) => fallback.extend(f),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        for w in &mut forks {
            self.digests.append(&mut w.digests);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(fallback),
        }
    }

    /// Sends one group of small files as a batch; returns the files that must
    /// go the ordinary way instead (changed while read, refused in the batch).
    async fn upload_batch<'j>(
        &mut self,
        addr: &str,
        group: &[&'j FileJob],
        read: Vec<Result<Option<BatchItem>>>,
    ) -> Result<Vec<&'j FileJob>> {
        let alg = self.opts.alg;
        let mut items = Vec::new();
        let mut jobs = Vec::new();
        let mut fallback = Vec::new();
        for (job, r) in group.iter().zip(read) {
            match r? {
                Some(item) => {
                    items.push(item);
                    jobs.push(*job);
                }
                None => fallback.push(*job),
            }
        }
        if items.is_empty() {
            return Ok(fallback);
        }
        self.progress.start_file(
            &format!("{} small files", items.len()),
            items.iter().map(|i| i.file.size).sum(),
        );
        let items = Arc::new(items);
        let outcome = self
            .with_session(addr, |s| {
                let items = items.clone();
                Box::pin(async move { s.put_batch(alg, &items).await })
            })
            .await?;
        for f in &outcome.failures {
            if let Some(job) = jobs.get(f.index as usize) {
                warn!(path = %job.local.display(), code = ?f.failure.code, message = %f.failure.message, "not stored in the batch; sending it on its own");
                fallback.push(*job);
            }
        }
        for i in outcome.done.iter() {
            let (Some(job), Some(item)) = (jobs.get(i as usize), items.get(i as usize)) else {
                continue;
            };
            let size = item.file.size;
            if outcome.sent.contains(i) {
                Progress::add(&self.progress.bytes_sent, size);
            } else {
                Progress::add(&self.progress.bytes_resumed, size);
            }
            self.progress.done(size);
            Progress::add(&self.progress.files_done, 1);
            self.digests.push((job.remote.clone(), item.file.digest));
        }
        info!(
            files = items.len(),
            stored = outcome.done.count(),
            sent = outcome.sent.count(),
            "batch stored"
        );
        Ok(fallback)
    }

    fn count(&self, files: &[FileJob]) {
        Progress::add(&self.progress.files_total, files.len() as u64);
        Progress::add(
            &self.progress.bytes_total,
            files.iter().map(|f| f.size).sum(),
        );
    }

    async fn upload_one(&mut self, addr: &str, job: &FileJob) -> Result<()> {
        let remote_display = format!("ferry://{addr}/{}", job.remote);
        let local_key = std::fs::canonicalize(&job.local)
            .unwrap_or_else(|_| job.local.clone())
            .display()
            .to_string();
        let fp = Arc::new(FileProgress::start(
            &self.progress,
            &job.local.display().to_string(),
            job.size,
        ));
        // What this file counts for in the total; follows its real size.
        let counted = std::sync::atomic::AtomicU64::new(job.size);
        let mut attempt = 0u32;
        let mut restarts = 0u32;
        let mut start = Instant::now();
        self.core.start_budget(start);
        let mut last_source: Option<Vec<u8>> = None;
        loop {
            fp.undo();
            let prepared = prepare_send(&self.store, &job.local, self.opts.alg)?;
            let (src, meta) = (&prepared.src, prepared.meta.clone());
            if let Some(prev) = &last_source {
                if *prev != src.source_id {
                    restarts += 1;
                    if restarts > 3 {
                        return Err(Error::SourceUnstable {
                            path: job.local.display().to_string(),
                            times: restarts - 1,
                        });
                    }
                    warn!(path = %job.local.display(), "source changed; restarting this file from its new content");
                }
            }
            last_source = Some(src.source_id.clone());
            self.progress.resize_file(&counted, meta.size);
            fp.show(&job.local.display().to_string(), meta.size);
            // Join the unfinished transfer of this same file version, if any.
            let source_hex = fsutil::hex(&src.source_id);
            let existing = self
                .core
                .status
                .find("upload", &local_key, &remote_display)
                .filter(|r| r.source == source_hex);
            let id = match &existing {
                Some(r) => {
                    TransferId::from_hex(&r.id).unwrap_or_else(|| random_id(&mut self.core.rng))
                }
                None => random_id(&mut self.core.rng),
            };
            let mut rec = TransferRecord {
                id: id.to_hex(),
                direction: "upload".into(),
                local: local_key.clone(),
                remote: remote_display.clone(),
                size: meta.size,
                bytes_done: 0,
                state: crate::status::RecordState::Active,
                last_error: None,
                updated_unix: 0,
                pid: 0,
                source: source_hex,
            };
            if let Some(old) = self.core.status.find("upload", &local_key, &remote_display) {
                if old.id != rec.id {
                    self.core.status.remove(&old.id);
                }
            }
            self.core.status.put(&rec)?;
            info!(transfer = %id, from = %job.local.display(), to = %remote_display, size = meta.size, "upload");
            let store = self.store.clone();
            let progress = fp.clone();
            let remote_path = job.remote.clone();
            let r = self
                .run_tracked(addr, &mut rec, &fp, |s| {
                    Box::pin(
                        async move { s.put(id, &prepared, &remote_path, &store, &progress).await },
                    )
                })
                .await;
            match r {
                Ok(digest) => {
                    self.core.status.remove(&rec.id);
                    Progress::add(&self.progress.files_done, 1);
                    self.digests.push((job.remote.clone(), digest));
                    return Ok(());
                }
                Err(e) => {
                    let progressed = fp.file_done() > rec.bytes_done;
                    self.core.interrupted(&mut rec, fp.file_done(), &e);
                    if progressed {
                        // Progress is not failure: start the count again.
                        attempt = 0;
                        start = Instant::now();
                        self.core.start_budget(start);
                    }
                    attempt += 1;
                    self.core.backoff(e, attempt, start).await?;
                }
            }
        }
    }

    /// Runs one transfer attempt on a (re)connected session, updating the
    /// status record every couple of seconds.
    async fn run_tracked<T>(
        &mut self,
        addr: &str,
        rec: &mut TransferRecord,
        fp: &FileProgress,
        f: impl for<'s> FnOnce(&'s mut Session) -> BoxFut<'s, T>,
    ) -> Result<T> {
        self.ensure_session(addr).await?;
        let r = {
            let session = self
                .session
                .as_mut()
                .ok_or_else(|| Error::Store("no session".into()))?;
            let fut = f(session);
            tokio::pin!(fut);
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tick.tick() => {
                        rec.bytes_done = fp.file_done();
                        let _ = self.core.status.put(rec);
                    }
                }
            }
        };
        if r.is_err() {
            self.session = None;
        }
        r
    }

    async fn download(&mut self, addr: &str, files: Vec<FileJob>, dirs: Vec<DirJob>) -> Result<()> {
        self.count(&files);
        // Only the directories made here take the source's mode and mtime.
        let made = fsutil::create_dirs_durable_many(dirs.iter().map(|d| d.local.as_path()))
            .map_err(|(p, e)| Error::local(&p, e))?;
        let batching = self
            .with_session(addr, |s| Box::pin(async move { Ok(s.supports_batch()) }))
            .await?;
        let (small, large): (Vec<&FileJob>, Vec<&FileJob>) = if batching {
            files.iter().partition(|f| f.size <= MAX_BATCH_FILE)
        } else {
            (Vec::new(), files.iter().collect())
        };
        let groups = batch_groups(&small);
        let fallback = self.batches(addr, &groups, false).await?;
        self.transfer_files(addr, fallback.into_iter().chain(large).collect(), false)
            .await?;
        for d in dirs.iter().rev().filter(|d| made.contains(&d.local)) {
            fsutil::apply_dir_meta(&d.local, d.mode, d.mtime_ns)?;
        }
        Ok(())
    }

    /// Fetches one group of small files as a batch; [`Fetched::store`] then
    /// makes them durable together (see [`crate::batch`]).
    async fn fetch_batch<'j>(
        &mut self,
        addr: &str,
        group: Vec<&'j FileJob>,
    ) -> Result<Fetched<'j>> {
        let alg = self.opts.alg;
        // What is here already, so identical files are not fetched again.
        let locals: Vec<(PathBuf, String, u64)> = group
            .iter()
            .map(|j| (j.local.clone(), j.remote.clone(), j.size))
            .collect();
        let want = tokio::task::spawn_blocking(move || {
            // Each parent once: a batch spans few directories.
            let parents: std::collections::BTreeSet<&Path> =
                locals.iter().filter_map(|(l, _, _)| l.parent()).collect();
            let _ = fsutil::create_dirs_durable_many(parents);
            locals
                .iter()
                .map(|(l, r, size)| crate::batch::local_view(l, r, *size, alg))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?;
        self.progress.start_file(
            &format!("{} small files", group.len()),
            group.iter().map(|j| j.size).sum(),
        );
        let want = Arc::new(want);
        let got = self
            .with_session(addr, |s| {
                let want = want.clone();
                Box::pin(async move { s.get_batch(alg, &want).await })
            })
            .await?;
        let failed: std::collections::HashSet<u32> = got.failures.iter().map(|f| f.index).collect();
        let mut fallback = Vec::new();
        for f in &got.failures {
            if let Some(job) = group.get(f.index as usize) {
                warn!(path = %job.remote, code = ?f.failure.code, message = %f.failure.message, "not fetched in the batch; fetching it on its own");
                fallback.push(*job);
            }
        }
        let mut work = Vec::new();
        for (i, item) in got.items.into_iter().enumerate() {
            let Some((file, payload)) = item else {
                if !failed.contains(&(i as u32)) {
                    fallback.push(group[i]);
                }
                continue;
            };
            if failed.contains(&(i as u32)) {
                continue;
            }
            work.push((i, group[i].local.clone(), file, payload));
        }
        Ok(Fetched {
            group,
            work,
            fallback,
        })
    }

    /// Takes in a group once it is stored: progress, digests, and the files
    /// that must go the ordinary way instead.
    async fn stored_batch<'j>(&mut self, s: Storing<'j>) -> Result<Vec<&'j FileJob>> {
        let Storing {
            group,
            task,
            mut fallback,
        } = s;
        let results = task.await.map_err(|e| Error::Store(e.to_string()))?;
        let mut fetched = 0u64;
        for (i, file, n, r) in results {
            match r {
                Ok(()) => {
                    if n > 0 {
                        Progress::add(&self.progress.bytes_sent, n);
                        fetched += 1;
                    } else {
                        Progress::add(&self.progress.bytes_resumed, file.size);
                    }
                    self.progress.done(file.size);
                    Progress::add(&self.progress.files_done, 1);
                    self.digests.push((group[i].remote.clone(), file.digest));
                }
                Err(e) if matches!(e, Error::LocalIo { .. }) => return Err(e),
                Err(_) => fallback.push(group[i]),
            }
        }
        info!(files = group.len(), fetched, "batch fetched");
        Ok(fallback)
    }

    async fn download_one(&mut self, addr: &str, job: &FileJob) -> Result<()> {
        let remote_display = format!("ferry://{addr}/{}", job.remote);
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
        // What this file counts for in the total; follows its real size.
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(job.size));
        let local_key = local.display().to_string();
        let fp = Arc::new(FileProgress::start(
            &self.progress,
            &remote_display,
            job.size,
        ));
        let mut attempt = 0u32;
        let mut start = Instant::now();
        self.core.start_budget(start);
        loop {
            fp.undo();
            let id = match self
                .core
                .status
                .find("download", &local_key, &remote_display)
            {
                Some(r) => {
                    TransferId::from_hex(&r.id).unwrap_or_else(|| random_id(&mut self.core.rng))
                }
                None => random_id(&mut self.core.rng),
            };
            let mut rec = TransferRecord {
                id: id.to_hex(),
                direction: "download".into(),
                local: local_key.clone(),
                remote: remote_display.clone(),
                size: job.size,
                bytes_done: 0,
                state: crate::status::RecordState::Active,
                last_error: None,
                updated_unix: 0,
                pid: 0,
                source: String::new(),
            };
            self.core.status.put(&rec)?;
            info!(transfer = %id, from = %remote_display, to = %local.display(), "download");
            let store = self.store.clone();
            let progress = fp.clone();
            let (remote_path, local2) = (job.remote.clone(), local.clone());
            let total = self.progress.clone();
            let counted = counted.clone();
            let alg = self.opts.alg;
            let r = self
                .run_tracked(addr, &mut rec, &fp, |s| {
                    Box::pin(async move {
                        s.get(id, alg, &remote_path, &local2, &store, &progress, |m| {
                            total.resize_file(&counted, m.size);
                        })
                        .await
                    })
                })
                .await;
            match r {
                Ok(digest) => {
                    self.core.status.remove(&rec.id);
                    Progress::add(&self.progress.files_done, 1);
                    self.digests.push((job.remote.clone(), digest));
                    return Ok(());
                }
                Err(e) => {
                    let progressed = fp.file_done() > rec.bytes_done;
                    self.core.interrupted(&mut rec, fp.file_done(), &e);
                    if progressed {
                        attempt = 0;
                        start = Instant::now();
                        self.core.start_budget(start);
                    }
                    attempt += 1;
                    self.core.backoff(e, attempt, start).await?;
                }
            }
        }
    }
}

fn random_id(rng: &mut rand::rngs::StdRng) -> TransferId {
    TransferId(rng.gen())
}

/// One file of a fetched batch: its index in the group, where it goes, what
/// the server says it is, and its content (`None`: identical here already).
type FetchedFile = (usize, PathBuf, BatchFile, Option<bytes::Bytes>);
/// What storing one file of a batch gave: index, file, bytes written, result.
type StoredFile = (usize, BatchFile, u64, Result<()>);

/// A batch fetched and verified, not yet on disk.
struct Fetched<'j> {
    group: Vec<&'j FileJob>,
    work: Vec<FetchedFile>,
    fallback: Vec<&'j FileJob>,
}

/// A batch being written and committed on a blocking thread.
struct Storing<'j> {
    group: Vec<&'j FileJob>,
    task: tokio::task::JoinHandle<Vec<StoredFile>>,
    fallback: Vec<&'j FileJob>,
}

impl<'j> Fetched<'j> {
    /// Writes each file to its part, syncs them together and renames them
    /// into place, off the runtime.
    fn store(self, alg: HashAlg) -> Storing<'j> {
        let work = self.work;
        let task = tokio::task::spawn_blocking(move || {
            let mut written = Vec::new();
            let mut written_at = Vec::new();
            let mut out = Vec::new();
            for (i, local, file, payload) in work {
                match payload {
                    Some(data) => match crate::batch::write_part(&local, &file, &data) {
                        Ok(part) => {
                            written.push(part);
                            written_at.push((i, file, data.len() as u64));
                        }
                        Err(e) => out.push((i, file, 0, Err(e))),
                    },
                    None => {
                        // Identical already: bring mode and mtime in line.
                        let r = crate::batch::already_there(&local, &file, alg).and_then(|same| {
                            if same {
                                Ok(())
                            } else {
                                Err(Error::Store("local file changed".into()))
                            }
                        });
                        out.push((i, file, 0, r));
                    }
                }
            }
            let committed = crate::batch::commit(&written);
            for ((i, file, n), r) in written_at.into_iter().zip(committed) {
                out.push((i, file, n, r));
            }
            out
        });
        Storing {
            group: self.group,
            task,
            fallback: self.fallback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("a/b").unwrap(),
            Endpoint::Local("a/b".into())
        );
        assert_eq!(
            Endpoint::parse("ferry://h/x/y").unwrap(),
            Endpoint::Remote {
                addr: "h:7787".into(),
                path: "x/y".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ferry://h:9/").unwrap(),
            Endpoint::Remote {
                addr: "h:9".into(),
                path: "".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ferry://[::1]:9/a").unwrap(),
            Endpoint::Remote {
                addr: "[::1]:9".into(),
                path: "a".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ferry://[::1]/a").unwrap(),
            Endpoint::Remote {
                addr: "[::1]:7787".into(),
                path: "a".into()
            }
        );
        assert!(Endpoint::parse("http://x/y").is_err());
        assert!(Endpoint::parse("ferry:///y").is_err());
    }
}
