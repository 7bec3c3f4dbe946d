//! The receiving side of one file transfer, as a sans-IO state machine.
//!
//! Calling order, for a driver:
//! 1. [`Receiver::new`] with the chunks the journal holds for this partial file
//!    (index and content hash). Their data was written in an earlier run and is
//!    *stale*: it is re-read and checked once before the file is finalised.
//! 2. Send what [`Receiver::poll_transmit`] returns (first the `Offer`).
//! 3. For each message from the sender: a `Data` frame goes through
//!    [`Receiver::accept_data`]; if it answers [`DataVerdict::Write`], the driver
//!    verifies the tag ([`crate::hash::verify_chunk`]), writes the bytes at the
//!    offset, then calls [`Receiver::chunk_written`] or [`Receiver::chunk_corrupt`].
//!    Every other message goes to [`Receiver::handle`].
//! 4. Act on [`Receiver::poll_event`]:
//!    * `Checkpoint`: make the data durable (fsync), then commit the listed
//!      chunks to the journal, then call [`Receiver::checkpoint_committed`];
//!    * `Forget`: remove these chunks from the journal;
//!    * `VerifyStale`: re-read and hash each listed chunk, report with
//!      [`Receiver::stale_checked`];
//!    * `Finalize`: fsync, set metadata, rename the `.part` file atomically,
//!      fsync the directory, then call [`Receiver::finalized`].
//! 5. Arm a timer at [`Receiver::poll_timeout`] and call [`Receiver::handle_timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};

use crate::chunk::ChunkLayout;
use crate::error::{Misbehavior, ProtoError};
use crate::hash::{file_digest, ChunkHash, HashAlg, TransferId};
use crate::message::{Message, MAX_OFFER_CHUNKS};
use crate::ranges::RangeSet;

/// Tunables of the receiver.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Checkpoint once this many verified bytes are waiting.
    pub checkpoint_bytes: u64,
    /// ... or once the oldest waiting chunk is this old.
    pub checkpoint_interval: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            checkpoint_bytes: 8 * 1024 * 1024,
            checkpoint_interval: Duration::from_millis(250),
        }
    }
}

/// What to do with an incoming `Data` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Verify and write it.
    Write,
    /// Already held: drop it (chunk writes are idempotent; this saves the I/O).
    Duplicate,
}

/// Work the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// fsync the data, commit these chunks to the journal, then `checkpoint_committed`.
    Checkpoint(Vec<(u32, ChunkHash)>),
    /// These chunks are no longer held (the sender disagreed or they were damaged).
    Forget(RangeSet),
    /// Re-read these chunks and report their hashes with `stale_checked`.
    VerifyStale(RangeSet),
    /// Every chunk verified and the digest matched: put the file in place.
    Finalize { digest: ChunkHash },
    /// The file is in place and the sender was told.
    Completed { digest: ChunkHash },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitAgreed,
    Receiving,
    Finalizing,
    Complete,
}

/// Receiver state machine for one file.
pub struct Receiver {
    id: TransferId,
    layout: ChunkLayout,
    alg: HashAlg,
    cfg: ReceiverConfig,
    /// Verified and durable (journal committed).
    have: Vec<Option<ChunkHash>>,
    /// Held from an earlier run and not re-read in this one.
    stale: RangeSet,
    stale_check_running: bool,
    /// Verified and written, not yet durable.
    pending: Vec<(u32, ChunkHash)>,
    pending_set: RangeSet,
    /// Chunks verified and handed to a write that has not returned yet
    /// (see [`Receiver::chunk_writing`]): neither missing nor written.
    writing: RangeSet,
    pending_bytes: u64,
    pending_since: Option<Instant>,
    checkpoint_running: bool,
    done: Option<ChunkHash>,
    phase: Phase,
    out: VecDeque<Message>,
    events: VecDeque<ReceiverEvent>,
    received_bytes: u64,
    /// The file was already finalised in an earlier session (the sender missed `Complete`).
    already_final: bool,
}

impl Receiver {
    /// `held`: chunks the journal says are verified and durable from an earlier run.
    pub fn new(
        id: TransferId,
        layout: ChunkLayout,
        alg: HashAlg,
        cfg: ReceiverConfig,
        held: impl IntoIterator<Item = (u32, ChunkHash)>,
    ) -> Self {
        let mut have = vec![None; layout.count() as usize];
        let mut stale = RangeSet::new();
        for (i, h) in held {
            if let Some(slot) = have.get_mut(i as usize) {
                *slot = Some(h);
                stale.insert(i);
            }
        }
        let mut r = Self {
            id,
            layout,
            alg,
            cfg,
            have,
            stale,
            stale_check_running: false,
            pending: Vec::new(),
            pending_set: RangeSet::new(),
            writing: RangeSet::new(),
            pending_bytes: 0,
            pending_since: None,
            checkpoint_running: false,
            done: None,
            phase: Phase::AwaitAgreed,
            out: VecDeque::new(),
            events: VecDeque::new(),
            received_bytes: 0,
            already_final: false,
        };
        r.queue_offer();
        r
    }

    /// A receiver for a transfer whose file was finalised in an earlier session
    /// but whose sender never saw `Complete`: it offers every chunk and, once the
    /// sender agrees and the digest matches, answers `Complete` without touching
    /// the file again.
    pub fn already_final(
        id: TransferId,
        layout: ChunkLayout,
        alg: HashAlg,
        cfg: ReceiverConfig,
        hashes: impl IntoIterator<Item = (u32, ChunkHash)>,
    ) -> Self {
        let mut r = Self::new(id, layout, alg, cfg, hashes);
        r.stale = RangeSet::new();
        r.already_final = true;
        r
    }

    fn queue_offer(&mut self) {
        let held: Vec<(u32, ChunkHash)> = self
            .have
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|h| (i as u32, h)))
            .collect();
        let pages: Vec<&[(u32, ChunkHash)]> = if held.is_empty() {
            vec![&[]]
        } else {
            held.chunks(MAX_OFFER_CHUNKS as usize).collect()
        };
        let n = pages.len();
        for (k, page) in pages.into_iter().enumerate() {
            let mut hashes = BytesMut::with_capacity(page.len() * 32);
            for (_, h) in page {
                hashes.put_slice(&h.0);
            }
            let ranges: RangeSet = page.iter().map(|(i, _)| *i).collect();
            self.out.push_back(Message::Offer {
                ranges,
                hashes: hashes.freeze(),
                more: k + 1 < n,
            });
        }
    }

    pub fn id(&self) -> TransferId {
        self.id
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    pub fn alg(&self) -> HashAlg {
        self.alg
    }

    /// Chunks verified and durable.
    pub fn held(&self) -> RangeSet {
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The recorded hash of a held chunk.
    pub fn held_hash(&self, index: u32) -> Option<ChunkHash> {
        self.have.get(index as usize).copied().flatten()
    }

    /// Payload bytes accepted in this session.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    pub fn is_complete(&self) -> bool {
        self.phase == Phase::Complete
    }

    /// Checks a `Data` frame's header against the layout before anything is written.
    pub fn accept_data(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<DataVerdict, ProtoError> {
        if self.phase != Phase::Receiving {
            return Err(ProtoError::out_of_order("Data", "outside the data phase"));
        }
        if index >= self.layout.count()
            || offset != self.layout.offset(index)
            || len != self.layout.len(index) as usize
        {
            return Err(Misbehavior::DataOutsideLayout { index, offset, len }.into());
        }
        if self.have[index as usize].is_some()
            || self.pending_set.contains(index)
            || self.writing.contains(index)
        {
            return Ok(DataVerdict::Duplicate);
        }
        Ok(DataVerdict::Write)
    }

    /// A chunk passed verification and its write was started, to be
    /// reported with [`Receiver::chunk_written`] once it returns. Meanwhile
    /// the chunk is not asked for again (a copy arriving is a duplicate) and
    /// the transfer does not finish.
    pub fn chunk_writing(&mut self, index: u32) {
        if (index as usize) < self.have.len() {
            self.writing.insert(index);
        }
    }

    /// A chunk passed verification and was written (not yet durable).
    pub fn chunk_written(&mut self, now: Instant, index: u32, content: ChunkHash) {
        self.writing.remove(index);
        if (index as usize) >= self.have.len()
            || self.pending_set.contains(index)
            || self.have[index as usize].is_some()
        {
            return;
        }
        let len = u64::from(self.layout.len(index));
        self.pending.push((index, content));
        self.pending_set.insert(index);
        self.pending_bytes += len;
        self.received_bytes += len;
        self.pending_since.get_or_insert(now);
        // After `Done`, the last write to return checkpoints at once.
        if self.pending_bytes >= self.cfg.checkpoint_bytes
            || (self.done.is_some() && self.writing.is_empty())
        {
            self.start_checkpoint();
        }
    }

    /// A chunk failed verification (maybe after [`Receiver::chunk_writing`]):
    /// ask for it again. A `Done` already in hand no longer holds: the sender
    /// sends the chunk again and then a new `Done`, which is waited for
    /// (finishing on the old one would meet the new one after the end).
    pub fn chunk_corrupt(&mut self, index: u32) {
        self.writing.remove(index);
        if self.done.take().is_some() {
            // The chunks written meanwhile need not wait for that `Done`.
            self.start_checkpoint();
        }
        self.out.push_back(Message::Reject { index });
    }

    fn start_checkpoint(&mut self) {
        if self.checkpoint_running || self.pending.is_empty() {
            return;
        }
        self.checkpoint_running = true;
        self.pending_since = None;
        self.pending_bytes = 0;
        self.events
            .push_back(ReceiverEvent::Checkpoint(std::mem::take(&mut self.pending)));
    }

    /// The driver made these chunks durable and committed them.
    pub fn checkpoint_committed(&mut self, chunks: &[(u32, ChunkHash)]) {
        self.checkpoint_running = false;
        let mut acked = RangeSet::new();
        for &(i, h) in chunks {
            if let Some(slot) = self.have.get_mut(i as usize) {
                *slot = Some(h);
                acked.insert(i);
            }
            self.pending_set.remove(i);
        }
        if !acked.is_empty() {
            self.out.push_back(Message::Ack { ranges: acked });
        }
        // After `Done`, what was written meanwhile goes at once: nothing more
        // is coming to fill a checkpoint, and waiting for the timer would
        // hold the transfer's end back by the whole interval.
        if self.pending_bytes >= self.cfg.checkpoint_bytes || self.done.is_some() {
            self.start_checkpoint();
        }
        self.try_finish();
    }

    /// Verified, written chunks not yet handed to a checkpoint: for a driver
    /// whose connection broke, to make them durable before it gives up (so
    /// they are not sent again). The receiver forgets them; it is not used
    /// afterwards.
    pub fn take_pending(&mut self) -> Vec<(u32, ChunkHash)> {
        self.pending_since = None;
        self.pending_bytes = 0;
        for &(i, _) in &self.pending {
            self.pending_set.remove(i);
        }
        std::mem::take(&mut self.pending)
    }

    /// When [`Receiver::handle_timeout`] wants to be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.checkpoint_running {
            return None;
        }
        self.pending_since.map(|t| t + self.cfg.checkpoint_interval)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            self.start_checkpoint();
        }
    }

    /// Feeds a non-`Data` message from the sender.
    pub fn handle(&mut self, msg: Message) -> Result<(), ProtoError> {
        match msg {
            Message::Agreed { ranges } => {
                if self.phase != Phase::AwaitAgreed {
                    return Err(ProtoError::out_of_order("Agreed", "twice"));
                }
                let held = self.held();
                if !ranges.difference(&held).is_empty() {
                    return Err(Misbehavior::AgreedNotOffered.into());
                }
                let refused = held.difference(&ranges);
                if !refused.is_empty() {
                    for i in refused.iter() {
                        self.have[i as usize] = None;
                    }
                    self.stale = self.stale.difference(&refused);
                    self.events.push_back(ReceiverEvent::Forget(refused));
                }
                self.phase = Phase::Receiving;
                Ok(())
            }
            Message::Done { digest } => {
                if self.phase != Phase::Receiving {
                    return Err(ProtoError::out_of_order("Done", "outside the data phase"));
                }
                self.done = Some(digest);
                self.start_checkpoint();
                self.try_finish();
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

    /// Moves towards finalisation once `Done` came and nothing is in progress.
    fn try_finish(&mut self) {
        let Some(expected) = self.done else { return };
        if self.phase != Phase::Receiving
            || self.checkpoint_running
            || self.stale_check_running
            || !self.pending.is_empty()
            || !self.writing.is_empty()
        {
            return;
        }
        let missing: RangeSet = (0..self.layout.count())
            .filter(|&i| self.have[i as usize].is_none())
            .collect();
        if !missing.is_empty() {
            self.done = None;
            self.out.push_back(Message::Need { ranges: missing });
            return;
        }
        if !self.stale.is_empty() {
            self.stale_check_running = true;
            self.events
                .push_back(ReceiverEvent::VerifyStale(self.stale.clone()));
            return;
        }
        let digest = self.digest_now();
        if digest != expected {
            // Every chunk matched the sender's tag or its agreed hash, so this
            // means the sender's view of the source moved under it.
            self.done = None;
            self.phase = Phase::Complete;
            self.events
                .push_back(ReceiverEvent::Forget(RangeSet::full(self.layout.count())));
            self.out
                .push_back(Message::Failure(crate::failure::Failure::new(
                    // Every chunk is forgotten, so a retry starts this file
                    // clean: retryable, bounded by the sender's attempt cap.
                    crate::failure::FailureCode::SourceChanged,
                    format!("whole-file digest mismatch: sender {expected}, receiver {digest}; starting the file over"),
                )));
            return;
        }
        if self.already_final {
            self.finalized(digest);
            return;
        }
        self.phase = Phase::Finalizing;
        self.events.push_back(ReceiverEvent::Finalize { digest });
    }

    fn digest_now(&self) -> ChunkHash {
        let hashes: Vec<ChunkHash> = self.have.iter().map(|h| h.unwrap_or_default()).collect();
        file_digest(
            self.alg,
            self.layout.size(),
            self.layout.chunk_size(),
            hashes.iter(),
        )
    }

    /// Results of re-reading stale chunks: `(index, hash of what is on disk now)`;
    /// `None` means the chunk could not be read at all (file truncated).
    pub fn stale_checked(&mut self, results: &[(u32, Option<ChunkHash>)]) {
        self.stale_check_running = false;
        let mut bad = RangeSet::new();
        for &(i, h) in results {
            if !self.stale.contains(i) {
                continue;
            }
            self.stale.remove(i);
            if h.is_none() || self.have[i as usize] != h {
                self.have[i as usize] = None;
                bad.insert(i);
            }
        }
        if !bad.is_empty() {
            self.events.push_back(ReceiverEvent::Forget(bad));
        }
        self.try_finish();
    }

    /// The file is in place under its final name.
    pub fn finalized(&mut self, digest: ChunkHash) {
        self.phase = Phase::Complete;
        self.out.push_back(Message::Complete { digest });
        self.events.push_back(ReceiverEvent::Completed { digest });
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }
}
