//! Client side of a connection: TLS with pinning, hello, and the requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::handshake::{accept_welcome, client_hello, keepalive_for};
use ferry_proto::message::{BatchFailure, BatchFile, Entry, FileMeta};
use ferry_proto::{
    ChunkHash, ChunkLayout, HashAlg, Message, ProtoError, RangeSet, ReceiverConfig, Sender,
    SenderConfig, TransferId,
};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::conn::{Conn, Timeouts};
use crate::error::{Error, Result};
use crate::lanes::{lane_cap, Lanes, Streams, AUTO_MIN_SIZE, LANE_JOIN_WAIT};
use crate::progress::FileProgress;
use crate::store::Store;
use crate::tls::{client_config, normalize_fingerprint, KnownServers};
use crate::transfer::{prepare_receive_live, PreparedSource, ReceiveDriver, SendDriver, Throttle};
use crate::transport::{server_name, tcp::TcpDialer, DialTarget, Dialer, TransportConfig};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub token: Option<Vec<u8>>,
    /// Expected server fingerprint; overrides the known-servers file.
    pub fingerprint: Option<String>,
    pub known_servers: KnownServers,
    pub connect_timeout: Duration,
    /// Route connections through this address instead (a proxy or fault injector),
    /// while pinning and naming the server by its real address.
    pub via: Option<String>,
    /// Payload bytes per second per transfer; 0 for no limit.
    pub bwlimit: u64,
    /// Stall watchdog and keepalive.
    pub timeouts: Timeouts,
    /// What carries the connection (TCP+TLS unless told otherwise).
    pub dialer: Arc<dyn Dialer>,
    /// The tuning of a dialer made for a URL that names its transport
    /// (`ferry+quic://`, ...).
    pub transport: TransportConfig,
    /// Write downloaded chunks past the page cache where the filesystem
    /// allows (see [`crate::fsutil::open_direct`]); `true` is the default.
    pub direct_io: bool,
    /// Connections per large file (see [`crate::lanes`]).
    pub streams: Streams,
}

impl ClientConfig {
    /// Defaults: no token, pins from `known_servers`, TCP+TLS, 10 s connect
    /// timeout, no bandwidth limit, the default stall watchdog.
    pub fn new(known_servers: KnownServers) -> Self {
        Self {
            token: None,
            fingerprint: None,
            known_servers,
            connect_timeout: Duration::from_secs(10),
            via: None,
            bwlimit: 0,
            timeouts: Timeouts::default(),
            dialer: Arc::new(TcpDialer::default()),
            transport: TransportConfig::default(),
            direct_io: true,
            streams: Streams::Auto,
        }
    }
}

/// An authenticated connection to a server.
pub struct Session {
    conn: Conn,
    pub addr: String,
    /// How this session was set up, to open data lanes the same way.
    cfg: ClientConfig,
    bwlimit: u64,
    /// Capabilities both ends have.
    caps: Vec<String>,
}

/// One small file for [`Session::put_batch`], read whole.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub file: BatchFile,
    pub data: bytes::Bytes,
}

/// What a `BatchGet` brought: per requested file, the server's view and its
/// verified content (`None` content: the local copy is already identical),
/// or nothing when the file is in `failures`.
#[derive(Debug, Clone, Default)]
pub struct GetBatch {
    pub items: Vec<Option<(BatchFile, Option<bytes::Bytes>)>>,
    pub failures: Vec<BatchFailure>,
}

/// What the server did with a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Files now in place, verified and durable.
    pub done: RangeSet,
    /// The files whose content was sent (the others were already there).
    pub sent: RangeSet,
    pub failures: Vec<BatchFailure>,
}

fn remote(f: ferry_proto::Failure) -> Error {
    Error::Proto(ProtoError::Remote(f))
}

fn unexpected(m: &Message) -> Error {
    Error::Proto(ProtoError::unexpected(m.name(), "from server"))
}

impl Session {
    pub async fn connect(addr: &str, cfg: &ClientConfig) -> Result<Session> {
        let given = cfg
            .fingerprint
            .as_deref()
            .map(normalize_fingerprint)
            .transpose()?;
        let token = cfg.token.as_deref().unwrap_or(b"");
        if token.len() > ferry_proto::message::MAX_TOKEN {
            return Err(Error::Usage(format!(
                "the token is {} bytes long; a server accepts at most {} (check --token-file or FERRY_TOKEN)",
                token.len(),
                ferry_proto::message::MAX_TOKEN
            )));
        }
        let pinned_file = given
            .is_none()
            .then(|| cfg.known_servers.path().display().to_string());
        let expected = given.or_else(|| cfg.known_servers.lookup(addr));
        let (tls_cfg, seen) = client_config(expected.clone())?;
        let dial = cfg.via.as_deref().unwrap_or(addr);
        let target = DialTarget {
            addr: dial,
            server_name: server_name(addr),
            tls: Arc::new(tls_cfg),
            timeout: cfg.connect_timeout,
        };
        let stream = match cfg.dialer.dial(target).await {
            Ok(s) => s,
            Err(Error::Connect { source, .. }) => {
                return Err(Error::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
            Err(Error::Tls(e)) => {
                if let (Some(exp), Some(got)) = (&expected, seen()) {
                    if *exp != got {
                        return Err(Error::FingerprintMismatch {
                            host: addr.to_string(),
                            expected: exp.clone(),
                            actual: got,
                            file: pinned_file,
                        });
                    }
                }
                return Err(Error::Tls(format!("{addr}: {e}")));
            }
            Err(Error::Timeout(what)) => return Err(Error::Timeout(format!("{what} with {addr}"))),
            Err(e) => return Err(e),
        };
        if expected.is_none() {
            if let Some(fp) = seen() {
                cfg.known_servers.record(addr, &fp)?;
                info!(server = addr, fingerprint = %fp, file = %cfg.known_servers.path().display(), "pinned new server fingerprint");
            }
        }
        let mut conn = Conn::new(stream, addr.to_string());
        conn.set_timeouts(cfg.timeouts);
        conn.send(&client_hello(
            token,
            &format!("ferry/{}", env!("CARGO_PKG_VERSION")),
            cfg.timeouts.stall,
        ))
        .await?;
        let caps = match tokio::time::timeout(cfg.connect_timeout, conn.rd.expect())
            .await
            .map_err(|_| Error::Timeout(format!("hello from {addr}")))??
        {
            Message::Welcome {
                version,
                caps,
                stall_ms,
                ..
            } => {
                conn.timeouts.keepalive = keepalive_for(conn.timeouts.keepalive, stall_ms);
                accept_welcome(version, &caps).map_err(remote)?.caps
            }
            Message::Failure(f) => return Err(remote(f)),
            m => return Err(unexpected(&m)),
        };
        Ok(Session {
            conn,
            addr: addr.to_string(),
            cfg: cfg.clone(),
            bwlimit: cfg.bwlimit,
            caps,
        })
    }

    /// Writes raw bytes on the connection (for tests of hostile input).
    #[doc(hidden)]
    pub async fn raw_write(&mut self, bytes: &[u8]) -> Result<()> {
        self.conn.wr.raw(bytes).await
    }

    async fn call(&mut self, m: &Message) -> Result<Message> {
        self.conn.send(m).await?;
        self.reply().await
    }

    /// The next reply, answering and skipping keepalives.
    async fn reply(&mut self) -> Result<Message> {
        loop {
            match self.conn.rd.expect().await? {
                Message::Failure(f) => return Err(remote(f)),
                Message::Ping { nonce, .. } => self.conn.send(&Message::Pong { nonce }).await?,
                Message::Pong { .. } => {}
                m => return Ok(m),
            }
        }
    }

    pub async fn stat(&mut self, path: &str) -> Result<Entry> {
        match self
            .call(&Message::Stat {
                path: path.to_string(),
            })
            .await?
        {
            Message::StatReply { entry } => Ok(entry),
            m => Err(unexpected(&m)),
        }
    }

    pub async fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut m = self
            .call(&Message::List {
                path: path.to_string(),
            })
            .await?;
        loop {
            match m {
                Message::ListReply { entries, more } => {
                    out.extend(entries);
                    if !more {
                        return Ok(out);
                    }
                }
                m => return Err(unexpected(&m)),
            }
            m = self.reply().await?;
        }
    }

    pub async fn mkdir(&mut self, path: &str, mode: u32, mtime_ns: i64) -> Result<()> {
        match self
            .call(&Message::Mkdir {
                path: path.to_string(),
                mode,
                mtime_ns,
            })
            .await?
        {
            Message::Ok => Ok(()),
            m => Err(unexpected(&m)),
        }
    }

    /// Creates many directories (and sets their mode and mtime), pipelined:
    /// up to 256 requests are in flight, so a tree of thousands of
    /// directories costs a few round trips, not thousands.
    pub async fn mkdir_many(&mut self, dirs: &[(String, u32, i64)]) -> Result<()> {
        const WINDOW: usize = 256;
        let mut first_err = None;
        for group in dirs.chunks(WINDOW) {
            for (path, mode, mtime_ns) in group {
                self.conn
                    .wr
                    .send(&Message::Mkdir {
                        path: path.clone(),
                        mode: *mode,
                        mtime_ns: *mtime_ns,
                    })
                    .await?;
            }
            self.conn.wr.flush().await?;
            let mut replies = 0;
            while replies < group.len() {
                match self.conn.rd.expect().await? {
                    Message::Ok => replies += 1,
                    Message::Failure(f) => {
                        replies += 1;
                        first_err.get_or_insert(remote(f));
                    }
                    Message::Ping { nonce, .. } => self.conn.send(&Message::Pong { nonce }).await?,
                    Message::Pong { .. } => {}
                    m => return Err(unexpected(&m)),
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the server stores small files in batches.
    pub fn supports_batch(&self) -> bool {
        self.caps.iter().any(|c| c == "batch:v1")
    }

    /// Stores many small files at once (see [`crate::batch`]): announces them,
    /// sends those the server does not already hold, and waits until they are
    /// durable and in place.
    pub async fn put_batch(&mut self, alg: HashAlg, items: &[BatchItem]) -> Result<BatchOutcome> {
        let n = items.len() as u32;
        self.conn
            .send(&Message::BatchPut {
                alg: alg.name().to_string(),
                files: items.iter().map(|i| i.file.clone()).collect(),
            })
            .await?;
        let need = loop {
            match self.conn.rd.expect().await? {
                Message::BatchNeed { indexes } => break indexes,
                Message::Ping { nonce, .. } => self.conn.send(&Message::Pong { nonce }).await?,
                Message::Pong { .. } => {}
                Message::Failure(f) => return Err(remote(f)),
                m => return Err(unexpected(&m)),
            }
        };
        if need.iter().any(|i| i >= n) {
            return Err(Error::Proto(
                ferry_proto::Misbehavior::BatchIndexOutOfRange {
                    message: "BatchNeed",
                }
                .into(),
            ));
        }
        let mut throttle = Throttle::new(self.bwlimit);
        for i in need.iter() {
            let item = &items[i as usize];
            self.conn
                .wr
                .send_batched(&Message::BatchData {
                    index: i,
                    payload: item.data.clone(),
                })
                .await?;
            if let Some(t) = throttle.as_mut() {
                self.conn.wr.flush().await?;
                t.consume(item.data.len() as u64).await;
            }
        }
        self.conn.send(&Message::BatchCommit).await?;
        // The server's keepalives say how much of the batch has reached it:
        // on a slow link that can take longer than the limit, and is no
        // stuck server while it grows.
        let mut last_progress = tokio::time::Instant::now();
        let mut seen = 0u64;
        loop {
            let wait = self
                .conn
                .timeouts
                .ack
                .saturating_sub(last_progress.elapsed());
            let m = tokio::time::timeout(wait, self.conn.rd.expect())
                .await
                .map_err(|_| Error::Timeout(format!("batch result from {}", self.addr)))??;
            crate::transfer::peer_progress(&m, &mut seen, &mut last_progress);
            match m {
                Message::BatchResult { done, failures } => {
                    if done.iter().any(|i| i >= n) || failures.iter().any(|f| f.index >= n) {
                        return Err(Error::Proto(
                            ferry_proto::Misbehavior::BatchIndexOutOfRange {
                                message: "BatchResult",
                            }
                            .into(),
                        ));
                    }
                    return Ok(BatchOutcome {
                        done,
                        sent: need,
                        failures,
                    });
                }
                Message::Ping { nonce, .. } => self.conn.send(&Message::Pong { nonce }).await?,
                Message::Pong { .. } => {}
                Message::Failure(f) => return Err(remote(f)),
                m => return Err(unexpected(&m)),
            }
        }
    }

    /// Fetches many small files at once. `want` says, per file, what the
    /// client already holds (see [`crate::batch::local_view`]); each returned
    /// item is verified here: its payload matches its size and digest, or it
    /// has no payload because the client's copy is identical. Files that
    /// failed on the server, or whose item did not verify, are in `failures`.
    pub async fn get_batch(&mut self, alg: HashAlg, want: &[BatchFile]) -> Result<GetBatch> {
        let n = want.len();
        self.conn
            .send(&Message::BatchGet {
                alg: alg.name().to_string(),
                files: want.to_vec(),
            })
            .await?;
        let mut items: Vec<Option<(BatchFile, Option<bytes::Bytes>)>> = vec![None; n];
        let mut failures = Vec::new();
        // A server may not send more than it was asked for, with some slack
        // for files that grew.
        let budget: u64 = want
            .iter()
            .map(|f| f.size)
            .sum::<u64>()
            .saturating_mul(2)
            .saturating_add(n as u64 * ferry_proto::message::MAX_BATCH_FILE / 4)
            .max(1 << 20);
        let mut received = 0u64;
        let misbehaved = |m: ferry_proto::Misbehavior| Error::Proto(m.into());
        loop {
            let m = self
                .conn
                .rd
                .expect_within(self.conn.timeouts.stall)
                .await
                .map_err(|_| Error::Timeout(format!("batch from {}", self.addr)))??;
            match m {
                Message::BatchItem {
                    index,
                    file,
                    payload,
                } => {
                    let i = index as usize;
                    let Some(w) = want.get(i) else {
                        return Err(misbehaved(ferry_proto::Misbehavior::BatchIndexOutOfRange {
                            message: "BatchItem",
                        }));
                    };
                    if items[i].is_some() || file.path != w.path {
                        return Err(misbehaved(ferry_proto::Misbehavior::BatchItemRepeated {
                            index,
                        }));
                    }
                    match &payload {
                        Some(p) => {
                            received += p.len() as u64;
                            if received > budget {
                                return Err(misbehaved(
                                    ferry_proto::Misbehavior::BatchOverBudget { received, budget },
                                ));
                            }
                            if p.len() as u64 != file.size
                                || ferry_proto::hash::small_file_digest(alg, p) != file.digest
                            {
                                failures.push(BatchFailure {
                                    index,
                                    failure: ferry_proto::Failure::new(
                                        ferry_proto::FailureCode::Integrity,
                                        "content does not match its digest",
                                    ),
                                });
                                continue;
                            }
                        }
                        None => {
                            if file.digest != w.digest || file.size != w.size {
                                return Err(misbehaved(
                                    ferry_proto::Misbehavior::BatchItemWithoutContent { index },
                                ));
                            }
                        }
                    }
                    items[i] = Some((file, payload));
                }
                Message::BatchResult { failures: f, .. } => {
                    if f.iter().any(|x| x.index as usize >= n) {
                        return Err(misbehaved(ferry_proto::Misbehavior::BatchIndexOutOfRange {
                            message: "BatchResult",
                        }));
                    }
                    failures.extend(f);
                    return Ok(GetBatch { items, failures });
                }
                Message::Ping { nonce, .. } => self.conn.send(&Message::Pong { nonce }).await?,
                Message::Pong { .. } => {}
                Message::Failure(f) => return Err(remote(f)),
                m => return Err(unexpected(&m)),
            }
        }
    }

    /// Uploads one file (resuming what the server holds); returns the digest.
    pub async fn put(
        &mut self,
        id: TransferId,
        source: &PreparedSource,
        remote_path: &str,
        store: &Arc<Store>,
        progress: &FileProgress,
    ) -> Result<ChunkHash> {
        let (src, meta) = (&source.src, source.meta.clone());
        let layout = ChunkLayout::new(meta.size, meta.chunk_size)
            .ok_or_else(|| Error::Usage(format!("{} is too large", src.path.display())))?;
        self.conn
            .send(&Message::PutOpen {
                id,
                path: remote_path.to_string(),
                meta,
            })
            .await?;
        let tx = Sender::new(
            id,
            layout,
            src.alg,
            SenderConfig::default(),
            source.known.iter().copied(),
        );
        let (lanes, _opener) = self.start_lanes(id, layout).unzip();
        SendDriver {
            conn: &mut self.conn,
            tx,
            src,
            store: store.clone(),
            progress,
            throttle: Throttle::new(self.bwlimit),
            lanes,
        }
        .run()
        .await
    }

    /// Whether the server takes data lanes.
    pub fn supports_lanes(&self) -> bool {
        self.caps.iter().any(|c| c == "lanes:v1")
    }

    /// Starts opening data lanes for transfer `id` if this file gets more than
    /// one connection; the lanes reach the driver through the returned
    /// [`Lanes`], and stop being opened when the guard is dropped.
    fn start_lanes(&self, id: TransferId, layout: ChunkLayout) -> Option<(Lanes, AbortOnDrop)> {
        // A rate limit is per transfer and enforced on one connection.
        if !self.supports_lanes() || self.bwlimit > 0 {
            return None;
        }
        // Lanes hold chunks in memory: larger chunks, fewer lanes.
        let most = lane_cap(layout.chunk_size()) + 1;
        let plan = match self.cfg.streams {
            Streams::Fixed(n) if n > 1 && u64::from(layout.count()) >= n as u64 => {
                Streams::Fixed(n.min(most))
            }
            Streams::Auto if layout.size() >= AUTO_MIN_SIZE => Streams::Auto,
            _ => return None,
        };
        let (tx, lanes) = Lanes::channel();
        let opener = tokio::spawn(open_lanes(
            self.addr.clone(),
            self.cfg.clone(),
            id,
            plan,
            most.min(AUTO_MAX_CONNECTIONS),
            lanes.moved.clone(),
            tx,
        ));
        Some((lanes, AbortOnDrop(opener)))
    }

    /// Downloads one file into `local` (resuming a local partial), asking for
    /// chunk hashes with `alg` if the server has it; returns the digest.
    #[allow(clippy::too_many_arguments)]
    pub async fn get(
        &mut self,
        id: TransferId,
        alg: HashAlg,
        remote_path: &str,
        local: &Path,
        store: &Arc<Store>,
        progress: &FileProgress,
        on_meta: impl FnOnce(&FileMeta),
    ) -> Result<ChunkHash> {
        // The preferred algorithm first; the server takes the first it has.
        let mut algs = vec![alg.name().to_string()];
        for other in [HashAlg::Blake3, HashAlg::Sha256] {
            if other != alg {
                algs.push(other.name().to_string());
            }
        }
        let meta = match self
            .call(&Message::GetOpen {
                id,
                path: remote_path.to_string(),
                algs,
            })
            .await?
        {
            Message::GetMeta { id: got, meta } if got == id => meta,
            m => return Err(unexpected(&m)),
        };
        on_meta(&meta);
        let (rx, dest) = prepare_receive_live(
            &mut self.conn,
            store,
            local,
            id,
            &meta,
            ReceiverConfig::default(),
            self.cfg.direct_io,
        )
        .await?;
        let layout = rx.layout();
        let (lanes, _opener) = self.start_lanes(id, layout).unzip();
        let r = ReceiveDriver {
            throttle: Throttle::new(self.bwlimit),
            lanes,
            ..ReceiveDriver::new(&mut self.conn, rx, dest, progress)
        }
        .run()
        .await?;
        Ok(r.digest)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most connections the adaptive mode opens for one file.
const AUTO_MAX_CONNECTIONS: usize = 8;
/// How long the adaptive mode measures throughput after each change.
const AUTO_WINDOW: Duration = Duration::from_millis(1500);
/// A new connection must raise throughput by this factor to be followed by another.
const AUTO_GAIN: f64 = 1.10;

/// Opens one data lane: a new authenticated connection that joins transfer
/// `id`, running on another connection (see [`crate::lanes`]).
pub async fn open_lane(addr: &str, cfg: &ClientConfig, id: TransferId) -> Result<Conn> {
    let mut s = Session::connect(addr, cfg).await?;
    s.conn.send(&Message::Lane { id }).await?;
    // The server may wait for the transfer to open before it answers.
    let m = tokio::time::timeout(cfg.connect_timeout + LANE_JOIN_WAIT, s.conn.rd.expect())
        .await
        .map_err(|_| Error::Timeout(format!("lane answer from {addr}")))??;
    match m {
        Message::Ok => Ok(s.conn),
        Message::Failure(f) => Err(remote(f)),
        m => Err(unexpected(&m)),
    }
}

/// Opens the lanes of one transfer: all at once for a fixed count; for
/// `auto`, one at a time while each new connection still raises the measured
/// throughput by [`AUTO_GAIN`]. A lane that cannot be opened is not fatal: the
/// transfer goes on with the connections it has.
async fn open_lanes(
    addr: String,
    cfg: ClientConfig,
    id: TransferId,
    plan: Streams,
    auto_max: usize,
    moved: Arc<AtomicU64>,
    out: mpsc::Sender<Conn>,
) {
    match plan {
        Streams::Fixed(n) => {
            let mut set = tokio::task::JoinSet::new();
            for _ in 1..n {
                let (addr, cfg) = (addr.clone(), cfg.clone());
                set.spawn(async move { open_lane(&addr, &cfg, id).await });
            }
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(c)) => {
                        if out.send(c).await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(transfer = %id, error = %e, "could not open a data lane; going on with fewer connections")
                    }
                    Err(_) => {}
                }
            }
            info!(transfer = %id, connections = n, "streams: fixed count");
        }
        Streams::Auto => {
            let rate = |since: tokio::time::Instant, from: u64| {
                let bytes = moved.load(Ordering::Relaxed).saturating_sub(from);
                bytes as f64 / since.elapsed().as_secs_f64().max(1e-3)
            };
            let (mut t0, mut m0) = (tokio::time::Instant::now(), moved.load(Ordering::Relaxed));
            tokio::time::sleep(AUTO_WINDOW).await;
            let mut best = rate(t0, m0);
            let mut conns = 1;
            while conns < auto_max {
                match open_lane(&addr, &cfg, id).await {
                    Ok(c) => {
                        if out.send(c).await.is_err() {
                            return;
                        }
                        conns += 1;
                    }
                    Err(e) => {
                        warn!(transfer = %id, error = %e, "could not open a data lane; going on with fewer connections");
                        break;
                    }
                }
                (t0, m0) = (tokio::time::Instant::now(), moved.load(Ordering::Relaxed));
                tokio::time::sleep(AUTO_WINDOW).await;
                let r = rate(t0, m0);
                debug!(transfer = %id, connections = conns, rate_mb_s = r / 1e6, before_mb_s = best / 1e6, "streams: measured");
                if r < best * AUTO_GAIN {
                    break;
                }
                best = r;
            }
            info!(transfer = %id, connections = conns, rate_mb_s = best / 1e6, "streams: settled (adaptive)");
        }
    }
}
