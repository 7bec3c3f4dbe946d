//! Drivers that run the protocol core's [`Sender`] and [`Receiver`] over a
//! connection, doing the file and journal I/O they ask for. Both the client
//! and the server use them: the uploader sends, the downloader receives.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::hash::verify_chunk;
use ferry_proto::{
    ChunkHash, DataVerdict, Message, ProtoError, Receiver, ReceiverEvent, Sender, SenderEvent,
    Transmit,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::lanes::{Arrived, Job, Lanes, RecvLanes, SendLanes, Sent, SourceRef};
use crate::progress::{FileProgress, Progress};
use crate::storage::local::prepare_receive;
use crate::storage::source::read_source;
use crate::storage::Partial;
use crate::store::{HeldChunks, Store};

pub use crate::faults::FaultPlan;
pub use crate::storage::source::{prepare_send, PreparedSource, SourceFile};

/// Caps the payload rate of one transfer (`--bwlimit`).
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    /// `rate` in bytes per second; `None` for 0.
    pub fn new(rate: u64) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate,
            start: Instant::now(),
            bytes: 0,
        })
    }

    pub async fn consume(&mut self, n: u64) {
        self.bytes += n;
        let due = self.start + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
    }
}

/// Runs a [`Sender`] over a connection, reading from a source file, until
/// the receiver has verified every chunk (see [`SendDriver::run`]).
pub struct SendDriver<'a> {
    pub conn: &'a mut Conn,
    pub tx: Sender,
    pub src: &'a SourceFile,
    /// Where acknowledged chunks' hashes are remembered for next time.
    pub store: Arc<Store>,
    pub progress: &'a FileProgress,
    pub throttle: Option<Throttle>,
    /// Extra connections for the data as they open (see [`crate::lanes`]).
    pub lanes: Option<Lanes>,
}

impl SendDriver<'_> {
    /// Runs the sender to completion; returns the verified digest.
    pub async fn run(self) -> Result<ChunkHash> {
        let SendDriver {
            conn,
            mut tx,
            src,
            store,
            progress,
            throttle,
            lanes,
        } = self;
        drive_sender(conn, &mut tx, src, &store, progress, throttle, lanes).await
    }
}

async fn drive_sender(
    conn: &mut Conn,
    tx: &mut Sender,
    src: &SourceFile,
    store: &Arc<Store>,
    progress: &FileProgress,
    mut throttle: Option<Throttle>,
    lanes: Option<Lanes>,
) -> Result<ChunkHash> {
    let tid = tx.id();
    let mut lanes = SendLanes::new(
        lanes,
        SourceRef {
            file: src.file.clone(),
            path: src.path.clone(),
            alg: src.alg,
            id: tid,
        },
        tx.layout().chunk_size(),
        conn.timeouts.keepalive,
    );
    // Chunks read and hashed on blocking threads ahead of sending, in order.
    let ahead = (READ_AHEAD_BYTES / tx.layout().chunk_size().max(1) as usize).clamp(2, 4);
    tx.set_read_ahead(ahead);
    let mut reads = std::collections::VecDeque::new();
    let mut free: Vec<Vec<u8>> = Vec::new();
    let mut last_write = Instant::now();
    let mut last_heard = Instant::now();
    // Last time the transfer moved: a chunk sent or acknowledged.
    let mut last_progress = Instant::now();
    // The most the receiver said it had read (see `peer_progress`).
    let mut peer_received = 0u64;
    let mut remembered = Remembered::new();
    loop {
        // Drain what has arrived, but not past the end of this transfer: the
        // peer may already have sent its next request behind `Complete`.
        while !tx.is_complete() {
            let Some(m) = conn.rd.try_next().await? else {
                break;
            };
            last_heard = Instant::now();
            peer_progress(&m, &mut peer_received, &mut last_progress);
            sender_handle(conn, tx, m, src, store).await?;
        }
        while let Some(ev) = lanes.try_next() {
            lane_event(ev, tx, &mut lanes, progress, &mut last_progress)?;
        }
        let mut acked_hashes = Vec::new();
        while let Some(ev) = tx.poll_event() {
            match ev {
                SenderEvent::Resumed { bytes, chunks } => {
                    info!(transfer = %tid, chunks = chunks.count(), bytes, "resuming: receiver already holds verified chunks");
                    Progress::add(&progress.bytes_resumed, bytes);
                    progress.done(bytes);
                }
                SenderEvent::Acked { chunks, bytes } => {
                    last_progress = Instant::now();
                    lanes.moved.fetch_add(bytes, Ordering::Relaxed);
                    debug!(transfer = %tid, ranges = ?chunks, "acked");
                    progress.done(bytes);
                    acked_hashes.extend(
                        chunks
                            .iter()
                            .filter_map(|i| tx.source_hash(i).map(|h| (i, h))),
                    );
                }
                SenderEvent::Rejected { index } => {
                    warn!(transfer = %tid, chunk = index, "receiver rejected a chunk; sending it again");
                }
                SenderEvent::Completed { digest } => {
                    remembered.add(store, &src.key, &acked_hashes, true)?;
                    return Ok(digest);
                }
            }
        }
        remembered.add(store, &src.key, &acked_hashes, false)?;
        // The oldest read goes out once it is done, when as many are under
        // way as may be, or when there is nothing else to do.
        let oldest_due = reads
            .front()
            .is_some_and(|r: &ChunkRead| r.is_finished() || reads.len() >= ahead);
        let next = if oldest_due { None } else { tx.poll_transmit() };
        match next {
            Some(Transmit::Message(m)) => {
                if matches!(m, Message::Done { .. }) {
                    src.check_unchanged()?;
                }
                conn.wr.send(&m).await?;
                if !matches!(m, Message::Ack { .. }) {
                    conn.wr.flush().await?;
                }
                last_write = Instant::now();
            }
            Some(Transmit::Chunk { index, offset, len }) => {
                if tx.lanes_ready() {
                    if let Ok(()) = lanes.try_dispatch(Job { index, offset, len }) {
                        continue;
                    }
                }
                let (file, path, alg) = (src.file.clone(), src.path.clone(), src.alg);
                let mut buf = free.pop().unwrap_or_default();
                reads.push_back(tokio::task::spawn_blocking(move || {
                    let read = read_source(&file, &path, offset, len, &mut buf).map(|()| {
                        let content = alg.hash(&buf);
                        (buf, content)
                    });
                    (index, offset, read)
                }));
            }
            None if !reads.is_empty() => {
                if let Some(r) = reads.pop_front() {
                    let (index, offset, read) = r.await.map_err(|e| Error::Store(e.to_string()))?;
                    let (buf, content) = read?;
                    let chunk = ReadChunk {
                        index,
                        offset,
                        buf: &buf,
                        content,
                    };
                    send_read(conn, tx, progress, throttle.as_mut(), chunk).await?;
                    free.push(buf);
                    last_progress = Instant::now();
                    last_write = Instant::now();
                }
            }
            None => {
                conn.wr.flush().await?;
                let wait = conn
                    .timeouts
                    .keepalive
                    .saturating_sub(last_write.elapsed())
                    .min(conn.timeouts.stall.saturating_sub(last_heard.elapsed()))
                    .min(if tx.in_flight_bytes() > 0 {
                        conn.timeouts.ack.saturating_sub(last_progress.elapsed())
                    } else {
                        conn.timeouts.keepalive
                    });
                tokio::select! {
                    r = conn.rd.next() => {
                        let m = r?.ok_or_else(|| closed(&conn.peer))?;
                        last_heard = Instant::now();
                        peer_progress(&m, &mut peer_received, &mut last_progress);
                        sender_handle(conn, tx, m, src, store).await?;
                    }
                    ev = lanes.next() => lane_event(ev, tx, &mut lanes, progress, &mut last_progress)?,
                    _ = tokio::time::sleep(wait) => {
                        if last_heard.elapsed() >= conn.timeouts.stall {
                            return Err(Error::Timeout(format!("nothing heard from {} for {}s", conn.peer, conn.timeouts.stall.as_secs_f64())));
                        }
                        if tx.in_flight_bytes() > 0 && last_progress.elapsed() >= conn.timeouts.ack {
                            warn!(transfer = %tid, acked = ?tx.acked(), "no chunk acknowledged although the connection is alive; reconnecting");
                            return Err(Error::Timeout(format!("no chunk acknowledged by {} for {}s", conn.peer, conn.timeouts.ack.as_secs_f64())));
                        }
                        if last_write.elapsed() < conn.timeouts.keepalive {
                            continue;
                        }
                        conn.send(&Message::Ping { nonce: 0, received: None }).await?;
                        last_write = Instant::now();
                    }
                }
            }
        }
    }
}

/// How often a sender makes the chunk hashes it remembers durable: an
/// fsync per acknowledgement would hold the send loop up for a disk flush
/// ~128 times per 1024 chunks (seconds per GiB on a slow disk), for a cache.
/// Killed, a sender loses at most this much of it and re-hashes that part of
/// the source on resume.
const REMEMBER_DURABLY_EVERY: Duration = Duration::from_secs(1);

/// The sender's side of the source hash cache (see
/// [`Store::add_source_hashes`]): acknowledged chunks' hashes are committed
/// at once, durably every [`REMEMBER_DURABLY_EVERY`] and at the end.
struct Remembered {
    synced: Instant,
    unsynced: bool,
}

/// How [`Remembered::add`] committed: with an fsync or without.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Durable(bool);

impl Remembered {
    fn new() -> Self {
        Remembered {
            synced: Instant::now(),
            unsynced: false,
        }
    }

    fn add(
        &mut self,
        store: &Store,
        key: &[u8; 16],
        hashes: &[(u32, ChunkHash)],
        last: bool,
    ) -> Result<Option<Durable>> {
        if hashes.is_empty() && !(last && self.unsynced) {
            return Ok(None);
        }
        let durable = last || self.synced.elapsed() >= REMEMBER_DURABLY_EVERY;
        store.add_source_hashes(key, hashes, durable)?;
        if durable {
            self.synced = Instant::now();
        }
        self.unsynced = !durable;
        Ok(Some(Durable(durable)))
    }
}

/// Bytes of source read and hashed ahead of sending (see `drive_sender`):
/// 2 to 4 chunks.
const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;

/// A chunk being read and hashed on a blocking thread: index, offset, and
/// the bytes with their content hash.
type ChunkRead = tokio::task::JoinHandle<(u32, u64, Result<(Vec<u8>, ChunkHash)>)>;

/// A chunk read and hashed, ready to go out.
struct ReadChunk<'b> {
    index: u32,
    offset: u64,
    buf: &'b [u8],
    content: ChunkHash,
}

/// Sends a chunk that was read and hashed: the sender core gives its tag
/// (or finds the source changed), then the `Data` frame goes out.
async fn send_read(
    conn: &mut Conn,
    tx: &mut Sender,
    progress: &FileProgress,
    throttle: Option<&mut Throttle>,
    chunk: ReadChunk<'_>,
) -> Result<()> {
    let ReadChunk {
        index,
        offset,
        buf,
        content,
    } = chunk;
    let tag = tx.chunk_read(index, content).map_err(|e| match e {
        ProtoError::SourceChanged { .. } => {
            Error::Proto(ProtoError::SourceChanged { chunk: index })
        }
        e => Error::Proto(e),
    })?;
    conn.wr.send_data(index, offset, &tag, buf).await?;
    Progress::add(&progress.bytes_sent, buf.len() as u64);
    if let Some(t) = throttle {
        conn.wr.flush().await?;
        t.consume(buf.len() as u64).await;
    }
    Ok(())
}

/// A receiver's keepalive may say how much it has read so far: more than
/// last time is progress, as an acknowledgement would be. Without it, a chunk
/// that takes longer than the acknowledgement limit to cross a slow link
/// (8 MiB at under ~140 KB/s) would tear down every attempt while data flows.
pub(crate) fn peer_progress(m: &Message, peer_received: &mut u64, last_progress: &mut Instant) {
    if let Message::Ping {
        received: Some(n), ..
    } = m
    {
        if *n > *peer_received {
            *peer_received = *n;
            *last_progress = Instant::now();
        }
    }
}

/// A lane joined, sent a chunk, or failed.
fn lane_event(
    ev: Sent,
    tx: &mut Sender,
    lanes: &mut SendLanes,
    progress: &FileProgress,
    last_progress: &mut Instant,
) -> Result<()> {
    match ev {
        Sent::Joined => {
            lanes.joined();
            Progress::add(&progress.lanes, 1);
            // Each lane reads one chunk, one more waits in the queue, and the
            // control connection carries data too when the lanes are all busy.
            tx.set_lanes(lanes.count() + 2);
            info!(transfer = %tx.id(), connections = lanes.count() + 1, "sending on several connections");
        }
        Sent::Chunk { index, content } => {
            tx.chunk_read(index, content).map_err(|e| match e {
                ProtoError::SourceChanged { .. } => {
                    Error::Proto(ProtoError::SourceChanged { chunk: index })
                }
                e => Error::Proto(e),
            })?;
            Progress::add(&progress.bytes_sent, u64::from(tx.layout().len(index)));
            *last_progress = Instant::now();
        }
        Sent::Failed(e) => {
            if tx.acked().count() == u64::from(tx.layout().count()) {
                debug!(transfer = %tx.id(), error = %e, "a data lane closed after the last chunk");
            } else {
                warn!(transfer = %tx.id(), error = %e, "a data lane failed");
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn sender_handle(
    conn: &mut Conn,
    tx: &mut Sender,
    m: Message,
    src: &SourceFile,
    store: &Arc<Store>,
) -> Result<()> {
    if let Message::Offer { ranges, .. } = &m {
        let unknown = tx.unknown_in(ranges);
        if !unknown.is_empty() {
            hash_offered(conn, tx, src, store, unknown).await?;
        }
    }
    tx.handle(m).map_err(Error::Proto)
}

/// Bytes of source hashed per blocking job while checking an offer.
const OFFER_HASH_BATCH: u64 = 64 * 1024 * 1024;

/// Chunks the receiver offers that we have no record of are checked against
/// the source itself. That can be most of a large file (the sender's journal
/// was lost, say), so it runs off the async threads in batches, keeps the
/// connection alive in between, and remembers the hashes for next time.
async fn hash_offered(
    conn: &mut Conn,
    tx: &mut Sender,
    src: &SourceFile,
    store: &Arc<Store>,
    unknown: Vec<u32>,
) -> Result<()> {
    let layout = tx.layout();
    let total: u64 = unknown.iter().map(|&i| u64::from(layout.len(i))).sum();
    if total > OFFER_HASH_BATCH {
        info!(transfer = %tx.id(), chunks = unknown.len(), bytes = total, "hashing the chunks the receiver holds, to agree on them");
    }
    let mut last_ping = Instant::now();
    let mut rest = unknown.as_slice();
    while !rest.is_empty() {
        let mut bytes = 0u64;
        let n = rest
            .iter()
            .take_while(|&&i| {
                let fits = bytes == 0 || bytes + u64::from(layout.len(i)) <= OFFER_HASH_BATCH;
                bytes += u64::from(layout.len(i));
                fits
            })
            .count()
            .max(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        let jobs: Vec<(u32, u64, u32)> = batch
            .iter()
            .map(|&i| (i, layout.offset(i), layout.len(i)))
            .collect();
        let (file, path, alg) = (src.file.clone(), src.path.clone(), src.alg);
        let hashes = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            jobs.into_iter()
                .map(|(i, off, len)| {
                    read_source(&file, &path, off, len, &mut buf)?;
                    Ok((i, alg.hash(&buf)))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Error::local(&src.path, std::io::Error::other(e.to_string())))??;
        for &(i, h) in &hashes {
            tx.set_source_hash(i, h);
        }
        store.add_source_hashes(&src.key, &hashes, true)?;
        if last_ping.elapsed() >= conn.timeouts.keepalive {
            conn.send(&Message::Ping {
                nonce: 0,
                received: None,
            })
            .await?;
            last_ping = Instant::now();
        }
    }
    Ok(())
}

fn closed(peer: &str) -> Error {
    Error::Io {
        addr: peer.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by peer",
        ),
    }
}

/// What a receive ended with.
pub struct Received {
    pub digest: ChunkHash,
    pub bytes_received: u64,
}

/// Runs a [`Receiver`] over a connection into a [`Partial`] until the file
/// is verified and in place (see [`ReceiveDriver::run`]).
pub struct ReceiveDriver<'a> {
    pub conn: &'a mut Conn,
    pub rx: Receiver,
    /// Where the chunks go (see [`crate::storage`]).
    pub dest: Arc<dyn Partial>,
    pub progress: &'a FileProgress,
    pub faults: Option<&'a FaultPlan>,
    pub throttle: Option<Throttle>,
    /// Extra connections carrying data as they open (see [`crate::lanes`]).
    pub lanes: Option<Lanes>,
    /// Fires when a newer connection of the same transfer arrived.
    pub superseded: Option<&'a tokio::sync::Notify>,
}

impl<'a> ReceiveDriver<'a> {
    /// A driver with no faults, throttle, lanes or supersession.
    pub fn new(
        conn: &'a mut Conn,
        rx: Receiver,
        dest: Arc<dyn Partial>,
        progress: &'a FileProgress,
    ) -> Self {
        ReceiveDriver {
            conn,
            rx,
            dest,
            progress,
            faults: None,
            throttle: None,
            lanes: None,
            superseded: None,
        }
    }

    /// Runs the receiver to completion: the file is verified and in place.
    /// When `superseded` fires, the receive ends as a broken link does: the
    /// chunks verified so far are made durable first, so the newer
    /// connection finds them.
    pub async fn run(self) -> Result<Received> {
        let ReceiveDriver {
            conn,
            mut rx,
            dest,
            progress,
            faults,
            throttle,
            lanes,
            superseded,
        } = self;
        let rx = &mut rx;
        let mut checkpoint = None;
        let mut lanes = RecvLanes::new(
            lanes,
            rx.alg(),
            rx.id(),
            rx.layout().chunk_size(),
            conn.timeouts.stall,
        );
        let mut writes = Writes::new(dest.clone(), progress);
        conn.rd.pool_payloads(dest.payload_pool());
        let r = tokio::select! {
            r = receive_loop(
                conn,
                rx,
                &mut writes,
                faults,
                throttle,
                &mut checkpoint,
                &mut lanes,
            ) => r,
            _ = notified_opt(superseded) => Err(Error::Io {
                addr: conn.peer.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "superseded by a newer connection of the same transfer",
                ),
            }),
        };
        // However it ended: no write may land after this (a new writer of the
        // partial could otherwise be overwritten by an old chunk).
        let drained = writes.drain(rx, &lanes).await;
        conn.rd.pool_payloads(None);
        let r = r.and_then(|ok| drained.map(|()| ok));
        // Only when the link failed: after a protocol or integrity error the
        // partial may be reset, and must not gain chunks behind that reset.
        if let Err(Error::Io { .. } | Error::Timeout(_)) = &r {
            keep_verified(rx, &dest, checkpoint).await;
        }
        r
    }
}

type CheckpointTask = tokio::task::JoinHandle<Result<HeldChunks>>;

/// After the connection broke: waits for a running checkpoint and makes the
/// chunks verified since then durable too, so a resume does not ask for them
/// again. Failures here only cost a re-send; they are logged.
async fn keep_verified(
    rx: &mut Receiver,
    dest: &Arc<dyn Partial>,
    checkpoint: Option<CheckpointTask>,
) {
    let tid = rx.id();
    debug!(transfer = %tid, checkpoint_running = checkpoint.is_some(), received = rx.received_bytes(), "connection lost: keeping verified chunks");
    if let Some(h) = checkpoint {
        if let Ok(Ok(list)) = h.await {
            rx.checkpoint_committed(&list);
        }
    }
    let list = rx.take_pending();
    if list.is_empty() {
        return;
    }
    let dest = dest.clone();
    let n = list.len();
    let r = tokio::task::spawn_blocking(move || dest.commit(&list)).await;
    match r {
        Ok(Ok(())) => {
            info!(transfer = %tid, chunks = n, "connection lost: kept the chunks verified since the last checkpoint")
        }
        Ok(Err(e)) => warn!(transfer = %tid, error = %e, "could not keep the last verified chunks"),
        Err(e) => warn!(transfer = %tid, error = %e, "could not keep the last verified chunks"),
    }
}

async fn receive_loop(
    conn: &mut Conn,
    rx: &mut Receiver,
    writes: &mut Writes<'_>,
    faults: Option<&FaultPlan>,
    mut throttle: Option<Throttle>,
    checkpoint: &mut Option<CheckpointTask>,
    lanes: &mut RecvLanes,
) -> Result<Received> {
    let (dest, progress) = (writes.dest.clone(), writes.progress);
    let tid = rx.id();
    let alg = rx.alg();
    let mut last_heard = Instant::now();
    // Bytes count as heard, not only whole frames: on a slow link one large
    // chunk may take longer than the stall limit to arrive.
    let mut heard_bytes = conn.rd.bytes_in;
    let mut last_write = Instant::now();
    loop {
        let mut wrote = false;
        while let Some(m) = rx.poll_transmit() {
            conn.wr.send(&m).await?;
            wrote = true;
        }
        if wrote {
            conn.wr.flush().await?;
            last_write = Instant::now();
        }
        let mut handled = false;
        while let Some(ev) = rx.poll_event() {
            handled = true;
            match ev {
                ReceiverEvent::Checkpoint(list) if faults.is_some_and(|f| f.take_withhold()) => {
                    warn!(transfer = %tid, chunks = list.len(), "fault injector: withholding this checkpoint (no acknowledgement will follow)");
                }
                ReceiverEvent::Checkpoint(list) => {
                    let dest = dest.clone();
                    *checkpoint = Some(tokio::task::spawn_blocking(move || {
                        dest.commit(&list)?;
                        Ok(list)
                    }));
                }
                ReceiverEvent::Forget(set) => {
                    warn!(transfer = %tid, ranges = ?set, "dropping chunks that no longer verify");
                    dest.forget(&set)?;
                }
                ReceiverEvent::VerifyStale(set) => {
                    info!(transfer = %tid, chunks = set.count(), "re-checking chunks kept from an earlier run");
                    let file = dest.clone();
                    let layout = rx.layout();
                    let mut job = tokio::task::spawn_blocking(move || {
                        let mut buf = Vec::new();
                        set.iter()
                            .map(|i| {
                                buf.resize(layout.len(i) as usize, 0);
                                let h = file
                                    .read_chunk(layout.offset(i), &mut buf)
                                    .ok()
                                    .map(|_| alg.hash(&buf));
                                (i, h)
                            })
                            .collect::<Vec<_>>()
                    });
                    let results = loop {
                        tokio::select! {
                            r = &mut job => break r.map_err(|e| Error::Store(e.to_string()))?,
                            _ = tokio::time::sleep(conn.timeouts.keepalive) => conn.send(&Message::Ping { nonce: 1, received: None }).await?,
                        }
                    };
                    let bad = results
                        .iter()
                        .filter(|(i, h)| h.is_none() || rx.held_hash(*i) != *h)
                        .count();
                    if bad > 0 {
                        warn!(transfer = %tid, damaged = bad, "partial file was damaged while nothing ran; those chunks will be sent again");
                    }
                    rx.stale_checked(&results);
                }
                ReceiverEvent::Finalize { digest } => {
                    writes.drain(rx, lanes).await?;
                    let done = dest.clone();
                    tokio::task::spawn_blocking(move || done.finalize())
                        .await
                        .map_err(|e| Error::Store(e.to_string()))??;
                    info!(transfer = %tid, path = %dest.name().display(), digest = %digest, "verified and in place");
                    rx.finalized(digest);
                }
                ReceiverEvent::Completed { digest } => {
                    while let Some(m) = rx.poll_transmit() {
                        conn.wr.send(&m).await?;
                    }
                    conn.wr.flush().await?;
                    return Ok(Received {
                        digest,
                        bytes_received: rx.received_bytes(),
                    });
                }
            }
        }
        if handled {
            // Handling events may have queued messages: send them before waiting.
            continue;
        }
        let timer = rx.poll_timeout().map(Instant::from_std);
        tokio::select! {
            r = conn.rd.next() => {
                let m = r?.ok_or_else(|| closed(&conn.peer))?;
                last_heard = Instant::now();
                match m {
                    Message::Data { index, offset, tag, payload } => {
                        match rx.accept_data(index, offset, payload.len()).map_err(Error::Proto)? {
                            DataVerdict::Duplicate => {}
                            DataVerdict::Write => {
                                let payload = match faults {
                                    Some(f) if f.take_corruption() && !payload.is_empty() => {
                                        warn!(transfer = %tid, chunk = index, "fault injector: flipping a bit of this chunk in flight");
                                        let mut p = payload.to_vec();
                                        p[0] ^= 0x01;
                                        bytes::Bytes::from(p)
                                    }
                                    _ => payload,
                                };
                                let n = payload.len() as u64;
                                writes.write(rx, lanes, index, offset, payload, Check::Tag(tag)).await?;
                                if let Some(t) = throttle.as_mut() {
                                    t.consume(n).await;
                                }
                            }
                        }
                    }
                    other => {
                        let agreed = matches!(other, Message::Agreed { .. });
                        rx.handle(other).map_err(Error::Proto)?;
                        if agreed {
                            let held = rx.held();
                            let bytes = rx.layout().bytes_in(&held);
                            if bytes > 0 {
                                info!(transfer = %tid, chunks = held.count(), bytes, "resuming: already holding verified chunks");
                            }
                            Progress::add(&progress.bytes_resumed, bytes);
                            progress.done(bytes);
                        }
                    }
                }
            }
            ev = lanes.next() => match ev {
                Arrived::Joined => {
                    lanes.joined();
                    Progress::add(&progress.lanes, 1);
                    info!(transfer = %tid, connections = lanes.count() + 1, "receiving on several connections");
                }
                Arrived::Failed(e) => {
                    warn!(transfer = %tid, error = %e, "a data lane failed");
                    return Err(e);
                }
                Arrived::Chunk { index, offset, payload, verdict } => {
                    last_heard = Instant::now();
                    match rx.accept_data(index, offset, payload.len()).map_err(Error::Proto)? {
                        DataVerdict::Duplicate => {}
                        DataVerdict::Write => writes.write(rx, lanes, index, offset, payload, Check::Done(verdict)).await?,
                    }
                }
            },
            Some(done) = futures_util::StreamExt::next(&mut writes.running), if !writes.running.is_empty() => {
                writes.take_in(rx, lanes, done)?;
            }
            r = join_opt(checkpoint.as_mut()), if checkpoint.is_some() => {
                *checkpoint = None;
                let list = r.map_err(|e| Error::Store(e.to_string()))??;
                debug!(transfer = %tid, chunks = list.len(), "checkpoint committed");
                rx.checkpoint_committed(&list);
            }
            _ = sleep_opt(timer), if timer.is_some() => {
                rx.handle_timeout(Instant::now().into_std());
            }
            _ = tokio::time::sleep(conn.timeouts.keepalive) => {
                if conn.rd.bytes_in != heard_bytes {
                    heard_bytes = conn.rd.bytes_in;
                    last_heard = Instant::now();
                }
                if last_heard.elapsed() >= conn.timeouts.stall {
                    return Err(Error::Timeout(format!("no data from {} for {}s", conn.peer, conn.timeouts.stall.as_secs_f64())));
                }
                if last_write.elapsed() >= conn.timeouts.keepalive {
                    // With what has arrived so far: a chunk may take longer
                    // than the sender's acknowledgement limit on a slow link.
                    let received = conn.rd.data_in() + lanes.data_in();
                    conn.send(&Message::Ping { nonce: 2, received: Some(received) }).await?;
                    last_write = Instant::now();
                }
            }
        }
    }
}

/// Bytes of chunk writes under way at once (see [`Writes`]): 2 to 4 writes,
/// fewer of larger chunks, so memory stays bounded.
const WRITES_IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;

/// What a chunk write under way gives back: how the chunk verified (its
/// content hash, or the hash of what came instead) and how the write went.
struct Written {
    index: u32,
    offset: u64,
    len: u64,
    verdict: std::result::Result<ChunkHash, ChunkHash>,
    io: Result<()>,
}

/// How a chunk is to be checked before it is written.
enum Check {
    /// Against the tag its frame carried, with the write (off the receive task).
    Tag(ChunkHash),
    /// Already checked (a data lane verifies on its own task).
    Done(std::result::Result<ChunkHash, ChunkHash>),
}

/// Chunks being verified and written on blocking threads, bounded by
/// [`WRITES_IN_FLIGHT_BYTES`]: hashing and the disk's time overlap receiving
/// and decrypting the next chunks. A chunk counts as written (and goes into
/// a checkpoint, whose `fdatasync` follows) only once its write returned.
/// Each write also holds the partial: no other writer can take it over
/// before the last write is done.
struct Writes<'a> {
    running: futures_util::stream::FuturesUnordered<tokio::task::JoinHandle<Written>>,
    dest: Arc<dyn Partial>,
    progress: &'a FileProgress,
}

impl<'a> Writes<'a> {
    fn new(dest: Arc<dyn Partial>, progress: &'a FileProgress) -> Self {
        Writes {
            running: Default::default(),
            dest,
            progress,
        }
    }

    /// Waits for every write under way and takes each in; the first error
    /// is returned after all are done.
    async fn drain(&mut self, rx: &mut Receiver, lanes: &RecvLanes) -> Result<()> {
        use futures_util::StreamExt;
        let mut first = Ok(());
        while let Some(done) = self.running.next().await {
            let r = self.take_in(rx, lanes, done);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Takes in a chunk that was verified and written on a blocking thread:
    /// one that failed verification is asked for again; else the chunk
    /// counts as written.
    fn take_in(
        &mut self,
        rx: &mut Receiver,
        lanes: &RecvLanes,
        done: std::result::Result<Written, tokio::task::JoinError>,
    ) -> Result<()> {
        let w = done.map_err(|e| Error::Store(e.to_string()))?;
        let content = match w.verdict {
            Ok(content) => content,
            Err(actual) => {
                corrupt(rx, w.index, w.offset, w.len, actual);
                return Ok(());
            }
        };
        w.io?;
        chunk_in(rx, self.progress, lanes, w.index, w.len, content);
        Ok(())
    }

    /// Verifies a chunk and writes it into the partial on a blocking
    /// thread, or asks for it again.
    async fn write(
        &mut self,
        rx: &mut Receiver,
        lanes: &RecvLanes,
        index: u32,
        offset: u64,
        payload: bytes::Bytes,
        check: Check,
    ) -> Result<()> {
        use futures_util::StreamExt;
        if let Check::Done(Err(actual)) = check {
            corrupt(rx, index, offset, payload.len() as u64, actual);
            return Ok(());
        }
        let most = (WRITES_IN_FLIGHT_BYTES / payload.len().max(1)).clamp(2, 4);
        while self.running.len() >= most {
            if let Some(done) = self.running.next().await {
                self.take_in(rx, lanes, done)?;
            }
        }
        let (alg, tid, partial) = (rx.alg(), rx.id(), self.dest.clone());
        rx.chunk_writing(index);
        self.running.push(tokio::task::spawn_blocking(move || {
            let len = payload.len() as u64;
            let verdict = match check {
                Check::Tag(tag) => verify_chunk(alg, &tid, index, offset, &payload, &tag),
                Check::Done(v) => v,
            };
            let io = match &verdict {
                Err(_) => Ok(()),
                Ok(_) => partial.write_chunk(offset, payload),
            };
            drop(partial);
            Written {
                index,
                offset,
                len,
                verdict,
                io,
            }
        }));
        Ok(())
    }
}

/// A chunk failed verification: ask for it again.
fn corrupt(rx: &mut Receiver, index: u32, offset: u64, len: u64, actual: ChunkHash) {
    warn!(transfer = %rx.id(), chunk = index, offset, len, actual = %actual, "chunk failed verification; asking for it again");
    rx.chunk_corrupt(index);
}

/// A chunk is in the partial file (not yet durable): progress and the receiver.
fn chunk_in(
    rx: &mut Receiver,
    progress: &FileProgress,
    lanes: &RecvLanes,
    index: u32,
    n: u64,
    content: ChunkHash,
) {
    Progress::add(&progress.bytes_sent, n);
    progress.done(n);
    lanes.count_moved(n);
    rx.chunk_written(Instant::now().into_std(), index, content);
}

async fn join_opt<T>(
    h: Option<&mut tokio::task::JoinHandle<T>>,
) -> std::result::Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn notified_opt(n: Option<&tokio::sync::Notify>) {
    match n {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// [`prepare_receive`] off the async threads (it may re-hash a whole file that
/// is already in place), with keepalives on `conn` meanwhile so the peer does
/// not take the pause for a dead link.
pub async fn prepare_receive_live(
    conn: &mut Conn,
    store: &Arc<Store>,
    final_path: &std::path::Path,
    id: ferry_proto::TransferId,
    meta: &ferry_proto::message::FileMeta,
    cfg: ferry_proto::ReceiverConfig,
    direct_io: bool,
) -> Result<(Receiver, Arc<dyn Partial>)> {
    let (store, path, meta) = (store.clone(), final_path.to_path_buf(), meta.clone());
    blocking_live(conn, move || {
        prepare_receive(&store, &path, id, &meta, cfg, direct_io)
    })
    .await
}

/// Runs `job` off the async threads (a store call that may take long), with
/// keepalives on `conn` meanwhile so the peer does not take the pause for a
/// dead link.
pub async fn blocking_live<T: Send + 'static>(
    conn: &mut Conn,
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let mut job = tokio::task::spawn_blocking(job);
    loop {
        tokio::select! {
            r = &mut job => return r.map_err(|e| Error::Store(e.to_string()))?,
            _ = tokio::time::sleep(conn.timeouts.keepalive) => conn.send(&Message::Ping { nonce: 4, received: None }).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes are committed with every acknowledgement but fsynced only once
    /// a second and at the end, where the last commit also makes durable
    /// what came before it without an fsync.
    #[tokio::test(start_paused = true)]
    async fn remembered_hashes_are_fsynced_once_a_second_and_at_the_end() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = [3u8; 16];
        let h = |i: u32| (i, ChunkHash([i as u8; 32]));
        let mut r = Remembered::new();
        let (now, half) = (Duration::ZERO, REMEMBER_DURABLY_EVERY / 2);
        let (lazy, synced) = (Some(Durable(false)), Some(Durable(true)));
        // (wait first, chunks acknowledged, last, how it commits, why)
        let steps = [
            (now, vec![h(0)], false, lazy, "within the second"),
            (now, vec![], false, None, "nothing to commit"),
            (half, vec![h(1)], false, lazy, "still within it"),
            (half, vec![h(2)], false, synced, "a second on"),
            (now, vec![], true, None, "all durable already"),
            (now, vec![h(3)], false, lazy, "within the next"),
            (now, vec![], true, synced, "the end syncs"),
        ];
        for (wait, hashes, last, commits, why) in steps {
            tokio::time::sleep(wait).await;
            assert_eq!(
                r.add(&store, &key, &hashes, last).unwrap(),
                commits,
                "{why}"
            );
        }
        let all: Vec<_> = (0..4).map(h).collect();
        assert_eq!(store.source_hashes(&key).unwrap(), all);
    }
}
