//! Data lanes: extra connections that carry one transfer's `Data` frames
//! beside its control connection, so one large file moves over several
//! connections at once (several congestion windows on a lossy long path,
//! several cores for hashing and TLS).
//!
//! A lane is an ordinary authenticated connection whose first request is
//! `Lane { id }`; the server hands it to the transfer `id` running on another
//! connection. Everything but `Data` stays on the control connection: the
//! resume handshake, acknowledgements, `Done` and `Complete`. The sender's
//! state machine keeps data on the control connection until the receiver has
//! acknowledged something (it is past `Agreed`), and sends `Done` only once
//! every chunk is acknowledged (see [`ferry_proto::Sender::set_lanes`]), so
//! nothing depends on ordering between connections.
//!
//! A lane that fails fails the attempt, like its control connection would:
//! the transfer resumes on fresh connections and nothing verified is sent
//! again.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::hash::{chunk_tag, verify_chunk};
use ferry_proto::{ChunkHash, HashAlg, Message, ProtoError, TransferId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::faults::FaultPlan;
use crate::storage::source::read_source;

/// Most extra connections one transfer takes (16 connections in all).
pub const MAX_LANES: usize = 15;

/// Memory the lanes of one transfer may hold in chunks in transit, per side:
/// each lane holds about two chunks (one being decoded or read, one handed
/// on), so large chunks mean fewer lanes.
pub const LANE_MEMORY: u64 = 32 * 1024 * 1024;

/// How many lanes a transfer with this chunk size takes (1 to [`MAX_LANES`]).
pub fn lane_cap(chunk_size: u32) -> usize {
    let per_lane = 2 * u64::from(chunk_size.max(1));
    ((LANE_MEMORY / per_lane) as usize).clamp(1, MAX_LANES)
}

/// How long a server lets a `Lane` request wait for its transfer to open on
/// the other connection (the two race: the lane may arrive first).
pub const LANE_JOIN_WAIT: Duration = Duration::from_secs(5);

/// Files smaller than this never get lanes in the adaptive mode: they are done
/// before a lane would be up to speed.
pub const AUTO_MIN_SIZE: u64 = 64 * 1024 * 1024;

/// How many connections carry one large file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Streams {
    /// Start with one and add connections while each addition still raises
    /// the measured throughput (by 10 % or more), up to 8; only for files of
    /// at least [`AUTO_MIN_SIZE`].
    #[default]
    Auto,
    /// Exactly this many connections (1: no lanes) for every file large
    /// enough to have a chunk per connection.
    Fixed(usize),
}

impl Streams {
    /// `auto` or a count from 1 to 16.
    pub fn parse(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Streams::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LANES + 1).contains(&n) => Ok(Streams::Fixed(n)),
            _ => Err(Error::Usage(format!(
                "--streams takes 'auto' or a number from 1 to {}, not {s:?}",
                MAX_LANES + 1
            ))),
        }
    }
}

/// Extra connections handed to a transfer driver as they are opened, and a
/// counter of the payload the transfer moved (for the adaptive count).
pub struct Lanes {
    pub incoming: mpsc::Receiver<Conn>,
    /// Payload bytes moved: acknowledged by the receiver (sending side) or
    /// verified and written (receiving side).
    pub moved: Arc<AtomicU64>,
    /// Fault injection for chunks that arrive on lanes (tests, demo).
    pub faults: Option<Arc<FaultPlan>>,
}

impl Lanes {
    /// A channel for lanes and the driver's end of it.
    pub fn channel() -> (mpsc::Sender<Conn>, Lanes) {
        let (tx, rx) = mpsc::channel(MAX_LANES + 1);
        (
            tx,
            Lanes {
                incoming: rx,
                moved: Arc::new(AtomicU64::new(0)),
                faults: None,
            },
        )
    }
}

fn lane_closed(peer: &str) -> Error {
    Error::Io {
        addr: peer.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "data lane closed by peer",
        ),
    }
}

// ---- sending side ----------------------------------------------------------

/// A chunk for a lane to read, hash and send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub index: u32,
    pub offset: u64,
    pub len: u32,
}

/// What a sending lane reports to the driver.
pub(crate) enum Sent {
    /// A lane joined and is running.
    Joined,
    /// The chunk went out; its content hash is for the state machine.
    Chunk {
        index: u32,
        content: ChunkHash,
    },
    Failed(Error),
}

/// What a sending lane needs to read and tag chunks.
#[derive(Clone)]
pub(crate) struct SourceRef {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub alg: HashAlg,
    pub id: TransferId,
}

/// The sending driver's lanes.
pub(crate) struct SendLanes {
    pub moved: Arc<AtomicU64>,
    jobs_tx: mpsc::Sender<Job>,
    sent_rx: mpsc::Receiver<Sent>,
    /// The joiner, which owns the lanes' tasks: dropping it ends them.
    _tasks: JoinSet<()>,
    count: usize,
    src_id: TransferId,
}

impl SendLanes {
    pub fn new(lanes: Option<Lanes>, src: SourceRef, chunk_size: u32, keepalive: Duration) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(1);
        let (sent_tx, sent_rx) = mpsc::channel(MAX_LANES + 1);
        let mut tasks = JoinSet::new();
        let src_id = src.id;
        let moved = match lanes {
            Some(l) => {
                let jobs = Arc::new(tokio::sync::Mutex::new(jobs_rx));
                let events = sent_tx.clone();
                spawn_joiner(
                    &mut tasks,
                    l.incoming,
                    lane_cap(chunk_size),
                    sent_tx,
                    || Sent::Joined,
                    move |conn| {
                        let (jobs, sent, src) = (jobs.clone(), events.clone(), src.clone());
                        async move {
                            if let Err(e) = send_lane(conn, jobs, &sent, src, keepalive).await {
                                let _ = sent.send(Sent::Failed(e)).await;
                            }
                        }
                    },
                );
                l.moved
            }
            None => Arc::new(AtomicU64::new(0)),
        };
        Self {
            moved,
            jobs_tx,
            sent_rx,
            _tasks: tasks,
            count: 0,
            src_id,
        }
    }

    /// Lanes running now (as far as the driver has heard).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Notes a lane the joiner started.
    pub fn joined(&mut self) {
        self.count += 1;
        debug!(transfer = %self.src_id, lanes = self.count, "data lane joined");
    }

    /// Hands a chunk to an idle lane; gives it back if none is free.
    pub fn try_dispatch(&mut self, job: Job) -> std::result::Result<(), Job> {
        if self.count == 0 {
            return Err(job);
        }
        self.jobs_tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
        })
    }

    /// A lane's report (joined, a chunk sent, failed); never returns when
    /// there is nothing to wait for.
    pub async fn next(&mut self) -> Sent {
        match self.sent_rx.recv().await {
            Some(s) => s,
            // The joiner and every lane are gone (they hold senders).
            None => std::future::pending().await,
        }
    }

    /// The same without waiting.
    pub fn try_next(&mut self) -> Option<Sent> {
        self.sent_rx.try_recv().ok()
    }
}

/// Takes lanes off `incoming` as they open and starts `run` on each at once,
/// up to `cap`, telling the driver with `joined()` on `events`. A lane must
/// start serving its connection when it joins, not when the driver is next
/// free: the driver may sit in a write to a slow control connection for up
/// to its stall limit, while the peer's stall clock for the lane runs from
/// the join. Dropping `tasks` ends the joiner and with it every lane.
fn spawn_joiner<E, F, Fut>(
    tasks: &mut JoinSet<()>,
    mut incoming: mpsc::Receiver<Conn>,
    cap: usize,
    events: mpsc::Sender<E>,
    joined: fn() -> E,
    mut run: F,
) where
    E: Send + 'static,
    F: FnMut(Conn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tasks.spawn(async move {
        let mut running = JoinSet::new();
        let mut count = 0;
        loop {
            tokio::select! {
                c = incoming.recv() => {
                    let Some(conn) = c else { break };
                    if count >= cap {
                        warn!(peer = %conn.peer, "more data lanes than allowed; closing this one");
                        continue;
                    }
                    count += 1;
                    running.spawn(run(conn));
                    if events.send(joined()).await.is_err() {
                        return;
                    }
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        drop(events);
        while running.join_next().await.is_some() {}
    });
}

async fn send_lane(
    mut conn: Conn,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    sent: &mpsc::Sender<Sent>,
    src: SourceRef,
    keepalive: Duration,
) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        let job = {
            let mut q = jobs.lock().await;
            match q.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                Err(mpsc::error::TryRecvError::Empty) => None,
            }
        };
        let job = match job {
            Some(j) => j,
            None => {
                // Nothing queued: push out what is buffered, then wait. The
                // wait for the queue's lock counts too: while one idle lane
                // holds it in `recv`, the others wait on the lock, and each
                // must still ping within the keepalive.
                conn.wr.flush().await?;
                let next = async { jobs.lock().await.recv().await };
                match tokio::time::timeout(keepalive, next).await {
                    Ok(Some(j)) => j,
                    Ok(None) => return Ok(()),
                    Err(_) => {
                        conn.send(&Message::Ping {
                            nonce: 3,
                            received: None,
                        })
                        .await?;
                        continue;
                    }
                }
            }
        };
        read_source(&src.file, &src.path, job.offset, job.len, &mut buf)?;
        let content = src.alg.hash(&buf);
        let tag = chunk_tag(src.alg, &src.id, job.index, job.offset, job.len, &content);
        conn.wr.send_data(job.index, job.offset, &tag, &buf).await?;
        if sent
            .send(Sent::Chunk {
                index: job.index,
                content,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

// ---- receiving side --------------------------------------------------------

/// A chunk that arrived on a lane, already checked against its tag.
pub(crate) enum Arrived {
    Chunk {
        index: u32,
        offset: u64,
        payload: bytes::Bytes,
        /// The content hash, or what the payload hashed to when the tag did not match.
        verdict: std::result::Result<ChunkHash, ChunkHash>,
    },
    /// A lane joined and is running.
    Joined,
    Failed(Error),
}

/// The receiving driver's lanes.
pub(crate) struct RecvLanes {
    pub moved: Arc<AtomicU64>,
    /// Bytes of `Data` frames read on the lanes so far, including frames
    /// still arriving (progress the receiver reports in its keepalives).
    data_in: Arc<AtomicU64>,
    arrived_rx: mpsc::Receiver<Arrived>,
    /// The joiner, which owns the lanes' tasks: dropping it ends them.
    _tasks: JoinSet<()>,
    count: usize,
    id: TransferId,
}

impl RecvLanes {
    pub fn new(
        lanes: Option<Lanes>,
        alg: HashAlg,
        id: TransferId,
        chunk_size: u32,
        stall: Duration,
    ) -> Self {
        // Chunks wait for the one writer here: few, so memory stays bounded
        // (each lane holds one more while it waits).
        let (arrived_tx, arrived_rx) = mpsc::channel(2);
        let data_in = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let moved = match lanes {
            Some(l) => {
                let (out, faults, meter) = (arrived_tx.clone(), l.faults, data_in.clone());
                spawn_joiner(
                    &mut tasks,
                    l.incoming,
                    lane_cap(chunk_size),
                    arrived_tx,
                    || Arrived::Joined,
                    move |mut conn| {
                        conn.rd.meter(meter.clone());
                        let (out, faults) = (out.clone(), faults.clone());
                        async move {
                            if let Err(e) = recv_lane(conn, &out, alg, id, stall, faults).await {
                                let _ = out.send(Arrived::Failed(e)).await;
                            }
                        }
                    },
                );
                l.moved
            }
            None => Arc::new(AtomicU64::new(0)),
        };
        Self {
            moved,
            data_in,
            arrived_rx,
            _tasks: tasks,
            count: 0,
            id,
        }
    }

    /// A lane's report: joined, a chunk, failed.
    pub async fn next(&mut self) -> Arrived {
        match self.arrived_rx.recv().await {
            Some(a) => a,
            // The joiner and every lane are gone (they hold senders).
            None => std::future::pending().await,
        }
    }

    /// Notes a lane the joiner started.
    pub fn joined(&mut self) {
        self.count += 1;
        debug!(transfer = %self.id, lanes = self.count, "data lane joined");
    }

    /// Lanes running now (as far as the driver has heard).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of `Data` frames read on the lanes, whole or still arriving.
    pub fn data_in(&self) -> u64 {
        self.data_in.load(Ordering::Relaxed)
    }

    pub fn count_moved(&self, n: u64) {
        self.moved.fetch_add(n, Ordering::Relaxed);
    }
}

async fn recv_lane(
    mut conn: Conn,
    out: &mpsc::Sender<Arrived>,
    alg: HashAlg,
    id: TransferId,
    stall: Duration,
    faults: Option<Arc<FaultPlan>>,
) -> Result<()> {
    loop {
        let m = conn
            .rd
            .next_within(stall)
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "nothing on a data lane from {} for {}s",
                    conn.peer,
                    stall.as_secs_f64()
                ))
            })??
            .ok_or_else(|| lane_closed(&conn.peer))?;
        match m {
            Message::Data {
                index,
                offset,
                tag,
                payload,
            } => {
                let payload = match &faults {
                    Some(f) if !payload.is_empty() && f.take_corruption() => {
                        warn!(transfer = %id, chunk = index, "fault injector: flipping a bit of this chunk on a data lane");
                        let mut p = payload.to_vec();
                        p[0] ^= 0x01;
                        bytes::Bytes::from(p)
                    }
                    _ => payload,
                };
                let verdict = verify_chunk(alg, &id, index, offset, &payload, &tag);
                let a = Arrived::Chunk {
                    index,
                    offset,
                    payload,
                    verdict,
                };
                if out.send(a).await.is_err() {
                    return Ok(());
                }
            }
            Message::Ping { .. } | Message::Pong { .. } => {}
            other => {
                return Err(Error::Proto(ProtoError::unexpected(
                    other.name(),
                    "on a data lane",
                )))
            }
        }
    }
}
