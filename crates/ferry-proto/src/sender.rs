//! The sending side of one file transfer, as a sans-IO state machine.
//!
//! Calling order, for a driver:
//! 1. [`Sender::new`] with the source's layout and any chunk hashes already known
//!    (from the journal of an earlier run).
//! 2. Feed every message from the receiver to [`Sender::handle`]. Before an
//!    `Offer`, call [`Sender::unknown_in`] and supply the missing source hashes with
//!    [`Sender::set_source_hash`] (reading the source), so the offer can be checked.
//! 3. Loop on [`Sender::poll_transmit`]: a [`Transmit::Message`] is written as is; a
//!    [`Transmit::Chunk`] is read from the source, hashed and passed to
//!    [`Sender::chunk_read`], which returns the tag to send in the `Data` frame.
//! 4. Drain [`Sender::poll_event`] for progress and completion.
//!
//! The sender keeps no chunk data: a chunk that must go again is read again.

use std::collections::{HashMap, VecDeque};

use crate::chunk::ChunkLayout;
use crate::error::{Misbehavior, ProtoError};
use crate::hash::{chunk_tag, file_digest, ChunkHash, HashAlg, TransferId};
use crate::message::Message;
use crate::ranges::RangeSet;

/// Tunables of the sender.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Most bytes sent but not yet acknowledged as durable.
    pub window_bytes: u64,
    /// How often one chunk may be rejected or needed again before the transfer fails.
    pub max_chunk_retries: u32,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            window_bytes: 32 * 1024 * 1024,
            max_chunk_retries: 4,
        }
    }
}

/// What the driver must put on the wire next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    Message(Message),
    /// Read, hash and send this chunk.
    Chunk {
        index: u32,
        offset: u64,
        len: u32,
    },
}

/// Things the application may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The resume handshake settled: these chunks need not be sent.
    Resumed { chunks: RangeSet, bytes: u64 },
    /// The receiver durably holds these chunks (store their hashes).
    Acked { chunks: RangeSet, bytes: u64 },
    /// The receiver rejected a chunk, which will be sent again.
    Rejected { index: u32 },
    /// The file is in place at the receiver, verified with this digest.
    Completed { digest: ChunkHash },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitOffer,
    Sending,
    AwaitComplete,
    Complete,
}

/// Sender state machine for one file.
pub struct Sender {
    id: TransferId,
    layout: ChunkLayout,
    alg: HashAlg,
    cfg: SenderConfig,
    hashes: Vec<Option<ChunkHash>>,
    phase: Phase,
    offered: RangeSet,
    agreed: RangeSet,
    queue: RangeSet,
    in_flight: RangeSet,
    in_flight_bytes: u64,
    acked: RangeSet,
    retries: HashMap<u32, u32>,
    /// Chunks handed to the driver to read, not yet reported by `chunk_read`.
    awaiting_read: RangeSet,
    /// How many chunks the driver may be reading at once (one per connection
    /// carrying data).
    max_reads: usize,
    /// How many chunks the driver may read ahead on the control connection
    /// (see [`Sender::set_read_ahead`]).
    read_ahead: usize,
    /// `Done` waits until every chunk is acknowledged: set when data travels on
    /// more than one connection, where `Done` could overtake it.
    done_after_acks: bool,
    /// An `Ack` came in this session: the receiver is in its data phase, so
    /// data may travel on other connections than the one carrying `Agreed`.
    heard_ack: bool,
    out: VecDeque<Message>,
    events: VecDeque<SenderEvent>,
}

impl Sender {
    /// `known` are content hashes of source chunks recorded in an earlier run.
    pub fn new(
        id: TransferId,
        layout: ChunkLayout,
        alg: HashAlg,
        cfg: SenderConfig,
        known: impl IntoIterator<Item = (u32, ChunkHash)>,
    ) -> Self {
        let mut hashes = vec![None; layout.count() as usize];
        for (i, h) in known {
            if let Some(slot) = hashes.get_mut(i as usize) {
                *slot = Some(h);
            }
        }
        Self {
            id,
            layout,
            alg,
            cfg,
            hashes,
            phase: Phase::AwaitOffer,
            offered: RangeSet::new(),
            agreed: RangeSet::new(),
            queue: RangeSet::new(),
            in_flight: RangeSet::new(),
            in_flight_bytes: 0,
            acked: RangeSet::new(),
            retries: HashMap::new(),
            awaiting_read: RangeSet::new(),
            max_reads: 1,
            read_ahead: 1,
            done_after_acks: false,
            heard_ack: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn id(&self) -> TransferId {
        self.id
    }

    /// The driver now carries data on `connections` connections (data lanes)
    /// and reads chunks for them concurrently: up to that many chunks may await
    /// [`Sender::chunk_read`] at once. Since `Data` on one connection may
    /// arrive after `Done` on another, from now on `Done` is sent only once
    /// every chunk is acknowledged (otherwise the receiver would ask for chunks
    /// that are merely late). Until the first `Ack` the receiver may not have
    /// seen `Agreed` yet, so data stays on the control connection and one read
    /// at a time: see [`Sender::lanes_ready`].
    pub fn set_lanes(&mut self, connections: usize) {
        self.max_reads = connections.max(1);
        if connections > 1 {
            self.done_after_acks = true;
        }
    }

    /// Whether data may go on connections other than the control connection:
    /// the receiver acknowledged something in this session, so it is past
    /// `Agreed` and in its data phase.
    pub fn lanes_ready(&self) -> bool {
        self.heard_ack && self.max_reads > 1
    }

    /// The driver reads up to `n` chunks ahead for the control connection
    /// (at least 1), so reading and hashing the next chunks overlap sending
    /// this one. Their `Data` frames still go out in the order read.
    pub fn set_read_ahead(&mut self, n: usize) {
        self.read_ahead = n.max(1);
    }

    fn read_slots(&self) -> u64 {
        let lanes = if self.heard_ack {
            self.max_reads.saturating_sub(1)
        } else {
            0
        };
        (self.read_ahead + lanes) as u64
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// Chunks the receiver holds durably (agreed at resume or acknowledged).
    pub fn acked(&self) -> &RangeSet {
        &self.acked
    }

    pub fn is_complete(&self) -> bool {
        self.phase == Phase::Complete
    }

    /// A known source hash.
    pub fn source_hash(&self, index: u32) -> Option<ChunkHash> {
        self.hashes.get(index as usize).copied().flatten()
    }

    /// Indices of `ranges` whose source hash is not known yet.
    pub fn unknown_in(&self, ranges: &RangeSet) -> Vec<u32> {
        ranges
            .iter()
            .filter(|&i| (i as usize) < self.hashes.len() && self.hashes[i as usize].is_none())
            .collect()
    }

    /// Records a source hash computed by the driver (to check an offer).
    pub fn set_source_hash(&mut self, index: u32, hash: ChunkHash) {
        if let Some(slot) = self.hashes.get_mut(index as usize) {
            *slot = Some(hash);
        }
    }

    /// Feeds one message from the receiver.
    pub fn handle(&mut self, msg: Message) -> Result<(), ProtoError> {
        match msg {
            Message::Offer {
                ranges,
                hashes,
                more,
            } => {
                if self.phase != Phase::AwaitOffer {
                    return Err(ProtoError::out_of_order(
                        "Offer",
                        "after the resume handshake",
                    ));
                }
                for (k, i) in ranges.iter().enumerate() {
                    if i >= self.layout.count() {
                        return Err(Misbehavior::ChunkPastEnd { message: "Offer" }.into());
                    }
                    let mut h = [0u8; 32];
                    h.copy_from_slice(&hashes[32 * k..32 * k + 32]);
                    self.offered.insert(i);
                    if self.source_hash(i) == Some(ChunkHash(h)) {
                        self.agreed.insert(i);
                    }
                }
                if !more {
                    self.phase = Phase::Sending;
                    self.acked = self.agreed.clone();
                    self.queue = RangeSet::full(self.layout.count()).difference(&self.agreed);
                    self.out.push_back(Message::Agreed {
                        ranges: self.agreed.clone(),
                    });
                    self.events.push_back(SenderEvent::Resumed {
                        bytes: self.layout.bytes_in(&self.agreed),
                        chunks: self.agreed.clone(),
                    });
                }
                Ok(())
            }
            Message::Ack { ranges } => {
                self.expect_transfer("Ack")?;
                self.heard_ack = true;
                let newly = ranges.intersection(&self.in_flight);
                if newly.is_empty() {
                    return Ok(());
                }
                self.in_flight = self.in_flight.difference(&newly);
                self.in_flight_bytes = self
                    .in_flight_bytes
                    .saturating_sub(self.layout.bytes_in(&newly));
                self.acked = self.acked.union(&newly);
                for i in newly.iter() {
                    self.retries.remove(&i);
                }
                self.events.push_back(SenderEvent::Acked {
                    bytes: self.layout.bytes_in(&newly),
                    chunks: newly,
                });
                Ok(())
            }
            Message::Reject { index } => {
                self.expect_transfer("Reject")?;
                if index >= self.layout.count() {
                    return Err(Misbehavior::ChunkPastEnd { message: "Reject" }.into());
                }
                self.events.push_back(SenderEvent::Rejected { index });
                self.requeue(&RangeSet::from_iter([index]))
            }
            Message::Need { ranges } => {
                self.expect_transfer("Need")?;
                if ranges.iter_ranges().any(|r| r.end > self.layout.count()) {
                    return Err(Misbehavior::ChunkPastEnd { message: "Need" }.into());
                }
                self.requeue(&ranges)
            }
            Message::Complete { digest } => {
                if self.phase != Phase::AwaitComplete {
                    return Err(ProtoError::out_of_order("Complete", "before Done"));
                }
                let ours = self.digest().ok_or_else(|| {
                    ProtoError::out_of_order("Complete", "while hashes are missing")
                })?;
                if ours != digest {
                    return Err(ProtoError::DigestMismatch {
                        expected: ours,
                        actual: digest,
                    });
                }
                self.phase = Phase::Complete;
                self.events.push_back(SenderEvent::Completed { digest });
                Ok(())
            }
            Message::Failure(f) => Err(ProtoError::Remote(f)),
            Message::Ping { nonce, .. } => {
                self.out.push_back(Message::Pong { nonce });
                Ok(())
            }
            Message::Pong { .. } => Ok(()),
            other => Err(ProtoError::unexpected(other.name(), "during a transfer")),
        }
    }

    fn expect_transfer(&self, what: &'static str) -> Result<(), ProtoError> {
        match self.phase {
            Phase::Sending | Phase::AwaitComplete => Ok(()),
            _ => Err(ProtoError::out_of_order(what, "outside the data phase")),
        }
    }

    fn requeue(&mut self, ranges: &RangeSet) -> Result<(), ProtoError> {
        for i in ranges.iter() {
            let n = self.retries.entry(i).or_insert(0);
            *n += 1;
            if *n > self.cfg.max_chunk_retries {
                return Err(ProtoError::ChunkRejectedRepeatedly {
                    chunk: i,
                    times: *n,
                });
            }
        }
        let was_in_flight = ranges.intersection(&self.in_flight);
        self.in_flight_bytes = self
            .in_flight_bytes
            .saturating_sub(self.layout.bytes_in(&was_in_flight));
        self.in_flight = self.in_flight.difference(ranges);
        self.acked = self.acked.difference(ranges);
        self.queue = self.queue.union(ranges);
        if self.phase == Phase::AwaitComplete {
            self.phase = Phase::Sending;
        }
        Ok(())
    }

    /// The next thing to put on the wire, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(m) = self.out.pop_front() {
            return Some(Transmit::Message(m));
        }
        if self.phase != Phase::Sending || self.awaiting_read.count() >= self.read_slots() {
            return None;
        }
        if let Some(index) = self.queue.first() {
            let len = self.layout.len(index);
            if self.in_flight_bytes > 0
                && self.in_flight_bytes + u64::from(len) > self.cfg.window_bytes
            {
                return None;
            }
            self.queue.remove(index);
            self.in_flight.insert(index);
            self.in_flight_bytes += u64::from(len);
            self.awaiting_read.insert(index);
            return Some(Transmit::Chunk {
                index,
                offset: self.layout.offset(index),
                len,
            });
        }
        if !self.awaiting_read.is_empty() || (self.done_after_acks && !self.in_flight.is_empty()) {
            return None;
        }
        let digest = self.digest()?;
        self.phase = Phase::AwaitComplete;
        Some(Transmit::Message(Message::Done { digest }))
    }

    /// The driver read chunk `index` and hashed it; returns the tag for its `Data` frame.
    /// Fails if the same chunk hashed differently before: the source changed.
    pub fn chunk_read(&mut self, index: u32, content: ChunkHash) -> Result<ChunkHash, ProtoError> {
        if !self.awaiting_read.contains(index) {
            return Err(Misbehavior::UnrequestedChunk { index }.into());
        }
        self.awaiting_read.remove(index);
        match self.source_hash(index) {
            Some(h) if h != content => return Err(ProtoError::SourceChanged { chunk: index }),
            _ => self.set_source_hash(index, content),
        }
        Ok(chunk_tag(
            self.alg,
            &self.id,
            index,
            self.layout.offset(index),
            self.layout.len(index),
            &content,
        ))
    }

    /// Bytes sent but not yet acknowledged as durable.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Whether the window is full (the driver may wait for acks).
    pub fn window_full(&self) -> bool {
        self.phase == Phase::Sending
            && !self.queue.is_empty()
            && self.awaiting_read.count() < self.read_slots()
            && self.poll_would_block()
    }

    fn poll_would_block(&self) -> bool {
        self.queue
            .first()
            .map(|i| {
                self.in_flight_bytes > 0
                    && self.in_flight_bytes + u64::from(self.layout.len(i)) > self.cfg.window_bytes
            })
            .unwrap_or(false)
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Whole-file digest, once every chunk hash is known.
    pub fn digest(&self) -> Option<ChunkHash> {
        let hashes: Option<Vec<ChunkHash>> = self.hashes.iter().copied().collect();
        Some(file_digest(
            self.alg,
            self.layout.size(),
            self.layout.chunk_size(),
            hashes?.iter(),
        ))
    }
}
