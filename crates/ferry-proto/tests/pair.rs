//! Pure in-memory simulation of a sender and a receiver: no sockets, no files,
//! virtual time. Messages between them can be dropped, duplicated, reordered and
//! corrupted; sessions can be cut (a crash loses whatever was not checkpointed).
//! Every run must end with a byte-identical file.

#![allow(clippy::single_range_in_vec_init)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ferry_proto::hash::verify_chunk;
use ferry_proto::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK: u32 = 1024;
const INTERESTING_SIZES: &[u64] = &[
    0,
    1,
    CHUNK as u64 - 1,
    CHUNK as u64,
    CHUNK as u64 + 1,
    37 * CHUNK as u64 + 5,
];

#[derive(Default, Clone, Copy)]
struct Faults {
    drop_data: f64,
    drop_control: f64,
    dup: f64,
    reorder: f64,
    corrupt: f64,
    /// Probability per step that the session is cut (a crash of either side).
    cut: f64,
    /// Cut the session once this many payload bytes were sent in total.
    cut_at_payload: Option<u64>,
}

/// Both ends' durable state, kept across sessions.
struct World {
    src: Vec<u8>,
    layout: ChunkLayout,
    id: TransferId,
    alg: HashAlg,
    /// The receiver's `.part` contents (page cache and disk as one).
    part: Vec<u8>,
    /// Chunks written since the last checkpoint: lost in a crash.
    unsynced: Vec<u32>,
    /// Receiver journal: durable verified chunks.
    journal: BTreeMap<u32, ChunkHash>,
    /// Sender journal: hashes of chunks the receiver acknowledged.
    sender_journal: BTreeMap<u32, ChunkHash>,
    final_file: Option<Vec<u8>>,
    /// The receiver finalised the file (its journal keeps the record).
    finalized: bool,
    payload_sent: u64,
    sessions: u32,
}

impl World {
    fn new(src: Vec<u8>, alg: HashAlg) -> Self {
        let layout = ChunkLayout::new(src.len() as u64, CHUNK).unwrap();
        Self {
            part: vec![0; src.len()],
            src,
            layout,
            id: TransferId([9; 16]),
            alg,
            unsynced: vec![],
            journal: BTreeMap::new(),
            sender_journal: BTreeMap::new(),
            final_file: None,
            finalized: false,
            payload_sent: 0,
            sessions: 0,
        }
    }

    fn chunk(&self, buf: &[u8], i: u32) -> Vec<u8> {
        let off = self.layout.offset(i) as usize;
        buf[off..off + self.layout.len(i) as usize].to_vec()
    }

    /// One connection's worth of transfer. Returns true when the file completed.
    fn session(&mut self, f: Faults, rng: &mut StdRng) -> bool {
        self.sessions += 1;
        // Virtual time: one real instant as the origin, then advanced by hand.
        #[allow(clippy::disallowed_methods)]
        let mut now = Instant::now();
        let rcfg = ReceiverConfig {
            checkpoint_bytes: 4 * CHUNK as u64,
            checkpoint_interval: Duration::from_millis(50),
        };
        let scfg = SenderConfig {
            window_bytes: 16 * CHUNK as u64,
            max_chunk_retries: 1000,
        };
        let mut rx = if self.finalized {
            Receiver::already_final(self.id, self.layout, self.alg, rcfg, self.journal.clone())
        } else {
            Receiver::new(self.id, self.layout, self.alg, rcfg, self.journal.clone())
        };
        let mut tx = Sender::new(
            self.id,
            self.layout,
            self.alg,
            scfg,
            self.sender_journal.clone(),
        );
        let mut to_rx: VecDeque<Message> = VecDeque::new();
        let mut to_tx: VecDeque<Message> = VecDeque::new();
        let mut idle = 0;
        for _step in 0..100_000 {
            if rng.gen_bool(f.cut) || f.cut_at_payload.is_some_and(|n| self.payload_sent >= n) {
                self.crash(rng);
                return false;
            }
            let mut progressed = false;
            // Sender output.
            while let Some(t) = tx.poll_transmit() {
                progressed = true;
                let m = match t {
                    Transmit::Message(m) => m,
                    Transmit::Chunk { index, offset, .. } => {
                        let data = self.chunk(&self.src, index);
                        let tag = match tx.chunk_read(index, self.alg.hash(&data)) {
                            Ok(t) => t,
                            Err(_) => return false,
                        };
                        self.payload_sent += data.len() as u64;
                        Message::Data {
                            index,
                            offset,
                            tag,
                            payload: data.into(),
                        }
                    }
                };
                self.send(&mut to_rx, m, f, rng);
            }
            while let Some(m) = rx.poll_transmit() {
                progressed = true;
                self.send(&mut to_tx, m, f, rng);
            }
            // Deliver one message each way.
            if let Some(m) = to_rx.pop_front() {
                progressed = true;
                let r = match m {
                    Message::Data {
                        index,
                        offset,
                        tag,
                        payload,
                    } => match rx.accept_data(index, offset, payload.len()) {
                        Ok(DataVerdict::Write) => {
                            match verify_chunk(self.alg, &self.id, index, offset, &payload, &tag) {
                                Ok(h) => {
                                    let off = offset as usize;
                                    self.part[off..off + payload.len()].copy_from_slice(&payload);
                                    self.unsynced.push(index);
                                    rx.chunk_written(now, index, h);
                                }
                                Err(_) => rx.chunk_corrupt(index),
                            }
                            Ok(())
                        }
                        Ok(DataVerdict::Duplicate) => Ok(()),
                        Err(e) => Err(e),
                    },
                    other => rx.handle(other),
                };
                if r.is_err() {
                    return false;
                }
            }
            if let Some(m) = to_tx.pop_front() {
                progressed = true;
                if tx
                    .handle_offer_aware(m, &self.src, &self.layout, self.alg)
                    .is_err()
                {
                    return false;
                }
            }
            while let Some(e) = tx.poll_event() {
                if let SenderEvent::Acked { chunks, .. } = e {
                    for i in chunks.iter() {
                        self.sender_journal.insert(i, tx.source_hash(i).unwrap());
                    }
                }
            }
            while let Some(e) = rx.poll_event() {
                progressed = true;
                match e {
                    ReceiverEvent::Checkpoint(list) => {
                        self.unsynced.clear();
                        for (i, h) in &list {
                            self.journal.insert(*i, *h);
                        }
                        rx.checkpoint_committed(&list);
                    }
                    ReceiverEvent::Forget(set) => {
                        for i in set.iter() {
                            self.journal.remove(&i);
                        }
                    }
                    ReceiverEvent::VerifyStale(set) => {
                        let res: Vec<_> = set
                            .iter()
                            .map(|i| (i, Some(self.alg.hash(&self.chunk(&self.part, i)))))
                            .collect();
                        rx.stale_checked(&res);
                    }
                    ReceiverEvent::Finalize { digest } => {
                        self.final_file = Some(self.part.clone());
                        self.finalized = true;
                        rx.finalized(digest);
                    }
                    ReceiverEvent::Completed { .. } => {}
                }
            }
            if let Some(t) = rx.poll_timeout() {
                if to_rx.is_empty() {
                    now = now.max(t);
                    rx.handle_timeout(now);
                }
            }
            if tx.is_complete() {
                return true;
            }
            if progressed {
                idle = 0;
            } else {
                idle += 1;
                if idle > 3 {
                    // Nothing moves: the stall watchdog tears the connection down.
                    return false;
                }
            }
            now += Duration::from_millis(1);
        }
        panic!("session did not settle");
    }

    fn send(&self, q: &mut VecDeque<Message>, m: Message, f: Faults, rng: &mut StdRng) {
        let is_data = matches!(m, Message::Data { .. });
        if rng.gen_bool(if is_data { f.drop_data } else { f.drop_control }) {
            return;
        }
        let m = match m {
            Message::Data {
                index,
                offset,
                tag,
                payload,
            } if !payload.is_empty() && rng.gen_bool(f.corrupt) => {
                let mut p = payload.to_vec();
                let at = rng.gen_range(0..p.len());
                p[at] ^= 1 << rng.gen_range(0..8);
                Message::Data {
                    index,
                    offset,
                    tag,
                    payload: p.into(),
                }
            }
            m => m,
        };
        if is_data && rng.gen_bool(f.dup) {
            q.push_back(m.clone());
        }
        if is_data && rng.gen_bool(f.reorder) && matches!(q.back(), Some(Message::Data { .. })) {
            let last = q.pop_back().unwrap();
            q.push_back(m);
            q.push_back(last);
        } else {
            q.push_back(m);
        }
    }

    /// Power loss: chunks written since the last checkpoint turn to garbage.
    fn crash(&mut self, rng: &mut StdRng) {
        for i in std::mem::take(&mut self.unsynced) {
            let off = self.layout.offset(i) as usize;
            for b in &mut self.part[off..off + self.layout.len(i) as usize] {
                *b = rng.gen();
            }
        }
    }
}

/// The driver's duty before an `Offer`: fill unknown source hashes by reading.
trait OfferAware {
    fn handle_offer_aware(
        &mut self,
        m: Message,
        src: &[u8],
        layout: &ChunkLayout,
        alg: HashAlg,
    ) -> Result<(), ProtoError>;
}

impl OfferAware for Sender {
    fn handle_offer_aware(
        &mut self,
        m: Message,
        src: &[u8],
        layout: &ChunkLayout,
        alg: HashAlg,
    ) -> Result<(), ProtoError> {
        if let Message::Offer { ranges, .. } = &m {
            for i in self.unknown_in(ranges) {
                let off = layout.offset(i) as usize;
                self.set_source_hash(i, alg.hash(&src[off..off + layout.len(i) as usize]));
            }
        }
        self.handle(m)
    }
}

fn data(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..size).map(|_| rng.gen()).collect()
}

fn run(size: u64, faults: Faults, seed: u64, alg: HashAlg) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = World::new(data(size, seed), alg);
    while !w.session(faults, &mut rng) {
        assert!(
            w.sessions < 500,
            "seed {seed} size {size}: no completion after 500 sessions"
        );
    }
    assert_eq!(
        w.final_file.as_deref(),
        Some(&w.src[..]),
        "seed {seed} size {size}: final file differs"
    );
    w
}

#[test]
fn clean_transfer_of_interesting_sizes_sends_each_byte_once() {
    for &size in INTERESTING_SIZES {
        for alg in [HashAlg::Blake3, HashAlg::Sha256] {
            let w = run(size, Faults::default(), 1, alg);
            assert_eq!(w.sessions, 1);
            assert_eq!(w.payload_sent, size);
        }
    }
}

#[test]
fn survives_drops_duplicates_reordering_and_corruption() {
    let f = Faults {
        drop_data: 0.05,
        drop_control: 0.01,
        dup: 0.05,
        reorder: 0.1,
        corrupt: 0.05,
        cut: 0.0,
        cut_at_payload: None,
    };
    for seed in 0..40 {
        for &size in INTERESTING_SIZES {
            run(size, f, seed, HashAlg::Blake3);
        }
    }
}

#[test]
fn survives_crashes_and_resends_little() {
    let f = Faults {
        cut: 0.01,
        ..Faults::default()
    };
    for seed in 0..40 {
        let size = 200 * CHUNK as u64 + 3;
        let w = run(size, f, seed, HashAlg::Blake3);
        // Each cut loses at most the un-checkpointed bytes plus the sender's window.
        let bound = size + u64::from(w.sessions) * (4 + 16 + 1) * CHUNK as u64;
        assert!(
            w.payload_sent <= bound,
            "seed {seed}: sent {} > bound {bound} over {} sessions",
            w.payload_sent,
            w.sessions
        );
    }
}

#[test]
fn damaged_partial_is_detected_and_only_damaged_chunks_resent() {
    let size = 40 * CHUNK as u64;
    let mut rng = StdRng::seed_from_u64(7);
    let mut w = World::new(data(size, 7), HashAlg::Blake3);
    assert!(!w.session(
        Faults {
            cut_at_payload: Some(size * 3 / 4),
            ..Faults::default()
        },
        &mut rng
    ));
    let held: Vec<u32> = w.journal.keys().copied().collect();
    assert!(
        held.len() >= 8,
        "half the file should be checkpointed, got {}",
        held.len()
    );
    // Flip one bit in two held chunks while nothing runs.
    let victims = [held[1], held[held.len() / 2]];
    for v in victims {
        let off = w.layout.offset(v) as usize + rng.gen_range(0..CHUNK as usize);
        w.part[off] ^= 0x10;
    }
    let before = w.payload_sent;
    let missing = size - w.journal.len() as u64 * CHUNK as u64;
    assert!(w.session(Faults::default(), &mut rng));
    assert_eq!(w.final_file.as_deref(), Some(&w.src[..]));
    assert_eq!(
        w.payload_sent - before,
        missing + 2 * CHUNK as u64,
        "only the missing and the two damaged chunks go again"
    );
}

#[test]
fn truncated_partial_is_detected() {
    let size = 40 * CHUNK as u64;
    let mut rng = StdRng::seed_from_u64(8);
    let mut w = World::new(data(size, 8), HashAlg::Sha256);
    assert!(!w.session(
        Faults {
            cut_at_payload: Some(size * 3 / 4),
            ..Faults::default()
        },
        &mut rng
    ));
    // Zero the tail of the partial, as a truncate-then-extend would.
    let cut = (size / 4) as usize;
    for b in &mut w.part[cut..] {
        *b = 0;
    }
    assert!(w.session(Faults::default(), &mut rng));
    assert_eq!(w.final_file.as_deref(), Some(&w.src[..]));
}

#[test]
fn sender_that_missed_complete_learns_it_without_resending() {
    let size = 10 * CHUNK as u64;
    let mut rng = StdRng::seed_from_u64(9);
    let mut w = World::new(data(size, 9), HashAlg::Blake3);
    // Cut right after everything was sent: the receiver may finalise, the sender may not hear.
    while !w.finalized {
        w = World::new(data(size, 9), HashAlg::Blake3);
        let _ = w.session(
            Faults {
                cut: 0.05,
                ..Faults::default()
            },
            &mut rng,
        );
    }
    let before = w.payload_sent;
    assert!(w.session(Faults::default(), &mut rng));
    assert_eq!(
        w.payload_sent, before,
        "nothing re-sent for a finalised file"
    );
}

#[test]
fn sender_detects_a_source_that_changed_under_it() {
    let size = 8 * CHUNK as u64;
    let mut w = World::new(data(size, 3), HashAlg::Blake3);
    // Sender knows hash of chunk 2 from an earlier run, but the source is now different.
    let stale = HashAlg::Blake3.hash(b"old content");
    let mut tx = Sender::new(w.id, w.layout, w.alg, SenderConfig::default(), [(2, stale)]);
    tx.handle(Message::Offer {
        ranges: RangeSet::new(),
        hashes: bytes::Bytes::new(),
        more: false,
    })
    .unwrap();
    let mut err = None;
    while let Some(t) = tx.poll_transmit() {
        if let Transmit::Chunk { index, .. } = t {
            let d = w.chunk(&w.src, index);
            if let Err(e) = tx.chunk_read(index, HashAlg::Blake3.hash(&d)) {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(err, Some(ProtoError::SourceChanged { chunk: 2 }));
    w.sessions = 0;
}

#[test]
fn offer_with_wrong_hash_is_not_agreed() {
    let size = 4 * CHUNK as u64;
    let src = data(size, 5);
    let layout = ChunkLayout::new(size, CHUNK).unwrap();
    let id = TransferId([1; 16]);
    let good = HashAlg::Blake3.hash(&src[..CHUNK as usize]);
    let known = (0..4).map(|i| {
        (
            i,
            HashAlg::Blake3.hash(&src[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize]),
        )
    });
    let mut tx = Sender::new(id, layout, HashAlg::Blake3, SenderConfig::default(), known);
    let mut hashes = good.0.to_vec();
    hashes.extend_from_slice(&[0u8; 32]);
    tx.handle(Message::Offer {
        ranges: RangeSet::from_ranges([0..2]),
        hashes: hashes.into(),
        more: false,
    })
    .unwrap();
    assert_eq!(
        tx.poll_transmit(),
        Some(Transmit::Message(Message::Agreed {
            ranges: RangeSet::from_ranges([0..1])
        }))
    );
}

#[test]
fn hostile_messages_are_errors_not_panics() {
    let layout = ChunkLayout::new(10 * 1024, CHUNK).unwrap();
    let mut rx = Receiver::new(
        TransferId::default(),
        layout,
        HashAlg::Blake3,
        ReceiverConfig::default(),
        [],
    );
    assert!(rx.accept_data(0, 0, 1024).is_err(), "data before Agreed");
    assert!(
        rx.handle(Message::Agreed {
            ranges: RangeSet::from_ranges([0..1])
        })
        .is_err(),
        "agreeing to unoffered chunks"
    );
    let mut rx = Receiver::new(
        TransferId::default(),
        layout,
        HashAlg::Blake3,
        ReceiverConfig::default(),
        [],
    );
    rx.handle(Message::Agreed {
        ranges: RangeSet::new(),
    })
    .unwrap();
    assert!(rx.accept_data(10, 10 * 1024, 1024).is_err());
    assert!(rx.accept_data(1, 0, 1024).is_err());
    assert!(rx.accept_data(1, 1024, 1023).is_err());
    assert!(rx.accept_data(1, 1024, 1024).is_ok());
    let mut tx = Sender::new(
        TransferId::default(),
        layout,
        HashAlg::Blake3,
        SenderConfig::default(),
        [],
    );
    assert!(tx
        .handle(Message::Offer {
            ranges: RangeSet::from_ranges([50..51]),
            hashes: vec![0; 32].into(),
            more: false
        })
        .is_err());
    assert!(
        tx.handle(Message::Need {
            ranges: RangeSet::from_ranges([0..1])
        })
        .is_err(),
        "Need before handshake"
    );
}

/// Data on several connections (lanes) next to the control connection: reads
/// finish in any order, each lane is FIFO but lanes and control interleave at
/// random, so `Done` could overtake data. Every chunk must still be sent once
/// (a `Need` for a merely late chunk would fail here: no retries allowed).
#[test]
fn lanes_interleave_freely_and_send_each_chunk_once() {
    let alg = HashAlg::Blake3;
    let id = TransferId([7; 16]);
    for seed in 0..30u64 {
        let size = 37 * CHUNK as u64 + 5;
        let src = data(size, seed);
        let layout = ChunkLayout::new(size, CHUNK).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let lanes_n = 1 + (seed % 4) as usize;
        let mut tx = Sender::new(
            id,
            layout,
            alg,
            SenderConfig {
                window_bytes: 16 * CHUNK as u64,
                max_chunk_retries: 0,
            },
            [],
        );
        tx.set_lanes(lanes_n + 1);
        let rcfg = ReceiverConfig {
            checkpoint_bytes: 4 * CHUNK as u64,
            checkpoint_interval: Duration::from_millis(50),
        };
        let mut rx = Receiver::new(id, layout, alg, rcfg, []);
        #[allow(clippy::disallowed_methods)]
        let mut now = Instant::now();
        // Queue 0 is the control connection (which carries data too).
        let mut to_rx: Vec<VecDeque<Message>> = vec![VecDeque::new(); lanes_n + 1];
        let mut to_tx: VecDeque<Message> = VecDeque::new();
        let mut reading: Vec<(u32, u64)> = Vec::new();
        let mut part = vec![0u8; size as usize];
        let mut final_file = None;
        let mut sent = 0u64;
        let mut steps = 0;
        while !tx.is_complete() {
            steps += 1;
            assert!(steps < 200_000, "seed {seed}: transfer did not settle");
            while let Some(t) = tx.poll_transmit() {
                match t {
                    Transmit::Message(m) => to_rx[0].push_back(m),
                    Transmit::Chunk { index, offset, .. } => reading.push((index, offset)),
                }
            }
            assert!(reading.len() <= lanes_n + 1, "more reads than lanes");
            if !reading.is_empty() && rng.gen_bool(0.9) {
                let (index, offset) = reading.swap_remove(rng.gen_range(0..reading.len()));
                let off = offset as usize;
                let payload = src[off..off + layout.len(index) as usize].to_vec();
                let tag = tx.chunk_read(index, alg.hash(&payload)).unwrap();
                sent += payload.len() as u64;
                // Before the first Ack data stays on the control connection.
                let q = if tx.lanes_ready() {
                    rng.gen_range(0..=lanes_n)
                } else {
                    0
                };
                to_rx[q].push_back(Message::Data {
                    index,
                    offset,
                    tag,
                    payload: payload.into(),
                });
            }
            // Lanes drain slowly next to the control connection, so they lag.
            let q = if rng.gen_bool(0.5) {
                0
            } else {
                rng.gen_range(0..to_rx.len())
            };
            if let Some(m) = to_rx[q].pop_front() {
                match m {
                    Message::Data {
                        index,
                        offset,
                        tag,
                        payload,
                    } => match rx.accept_data(index, offset, payload.len()).unwrap() {
                        DataVerdict::Write => {
                            let h = verify_chunk(alg, &id, index, offset, &payload, &tag).unwrap();
                            let off = offset as usize;
                            part[off..off + payload.len()].copy_from_slice(&payload);
                            rx.chunk_written(now, index, h);
                        }
                        DataVerdict::Duplicate => panic!("seed {seed}: chunk {index} twice"),
                    },
                    m => rx.handle(m).unwrap(),
                }
            }
            while let Some(e) = rx.poll_event() {
                match e {
                    ReceiverEvent::Checkpoint(list) => rx.checkpoint_committed(&list),
                    ReceiverEvent::Finalize { digest } => {
                        final_file = Some(part.clone());
                        rx.finalized(digest);
                    }
                    ReceiverEvent::Forget(_) | ReceiverEvent::VerifyStale(_) => {
                        panic!("seed {seed}: nothing should be forgotten or stale")
                    }
                    ReceiverEvent::Completed { .. } => {}
                }
            }
            while let Some(m) = rx.poll_transmit() {
                to_tx.push_back(m);
            }
            if let Some(m) = to_tx.pop_front() {
                tx.handle(m).unwrap();
            }
            while tx.poll_event().is_some() {}
            now += Duration::from_millis(1);
            rx.handle_timeout(now);
        }
        assert_eq!(final_file.as_deref(), Some(&src[..]), "seed {seed}");
        assert_eq!(sent, size, "seed {seed}: every byte sent exactly once");
    }
}

/// A receiver of `n` chunks of seeded data in its data phase (past `Agreed`),
/// with each chunk's content hash and the file's digest.
fn receiving(n: u32, seed: u64) -> (Receiver, ChunkLayout, Vec<ChunkHash>, ChunkHash) {
    let size = u64::from(n) * u64::from(CHUNK);
    let src = data(size, seed);
    let layout = ChunkLayout::new(size, CHUNK).unwrap();
    let alg = HashAlg::Blake3;
    let mut rx = Receiver::new(
        TransferId::default(),
        layout,
        alg,
        ReceiverConfig::default(),
        [],
    );
    rx.handle(Message::Agreed {
        ranges: RangeSet::new(),
    })
    .unwrap();
    let hashes: Vec<ChunkHash> = (0..n)
        .map(|i| alg.hash(&src[layout.offset(i) as usize..][..layout.len(i) as usize]))
        .collect();
    let digest = hash::file_digest(alg, size, CHUNK, hashes.iter());
    (rx, layout, hashes, digest)
}

/// One instant for the receiver tests, which never let a timer run (virtual
/// time): a write reported later must not find a checkpoint timer expired.
#[allow(clippy::disallowed_methods)]
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// Reports chunk `i`'s write as returned, with its hash from `hashes`.
fn written(rx: &mut Receiver, hashes: &[ChunkHash], i: u32) {
    rx.chunk_written(t0(), i, hashes[i as usize]);
}

/// Takes what the receiver has to send and its events.
fn pump(rx: &mut Receiver, events: &mut Vec<ReceiverEvent>, sent: &mut Vec<Message>) {
    while let Some(m) = rx.poll_transmit() {
        sent.push(m);
    }
    while let Some(e) = rx.poll_event() {
        events.push(e);
    }
}

/// [`pump`], committing every checkpoint asked for as a driver would.
fn pump_committing(rx: &mut Receiver, events: &mut Vec<ReceiverEvent>, sent: &mut Vec<Message>) {
    loop {
        while let Some(m) = rx.poll_transmit() {
            sent.push(m);
        }
        let Some(e) = rx.poll_event() else { break };
        if let ReceiverEvent::Checkpoint(list) = &e {
            rx.checkpoint_committed(list);
        }
        events.push(e);
    }
}

/// The chunk lists of the checkpoints among `events`.
fn checkpoints_in(events: &[ReceiverEvent]) -> Vec<Vec<(u32, ChunkHash)>> {
    events
        .iter()
        .filter_map(|e| match e {
            ReceiverEvent::Checkpoint(list) => Some(list.clone()),
            _ => None,
        })
        .collect()
}

/// A chunk whose write has started (`chunk_writing`) but not returned is
/// neither missing nor written: `Done` arriving meanwhile asks for nothing
/// again, a copy arriving is a duplicate, and once the write returns the
/// receiver checkpoints and finishes without waiting for a timer.
#[test]
fn a_chunk_being_written_is_not_asked_for_again() {
    let (mut rx, layout, hashes, digest) = receiving(3, 9);
    for i in 0..2 {
        written(&mut rx, &hashes, i);
    }
    // The last chunk's write is under way.
    assert_eq!(
        rx.accept_data(2, layout.offset(2), layout.len(2) as usize)
            .unwrap(),
        DataVerdict::Write
    );
    rx.chunk_writing(2);
    rx.handle(Message::Done { digest }).unwrap();
    assert_eq!(
        rx.accept_data(2, layout.offset(2), layout.len(2) as usize)
            .unwrap(),
        DataVerdict::Duplicate,
        "a copy of a chunk being written"
    );
    let mut events = Vec::new();
    let mut sent = Vec::new();
    pump(&mut rx, &mut events, &mut sent);
    assert!(
        !sent.iter().any(|m| matches!(m, Message::Need { .. })),
        "nothing asked for again: {sent:?}"
    );
    // Chunks 0 and 1 are checkpointed on `Done`; the write returns later.
    let first = checkpoints_in(&events);
    assert_eq!(first.len(), 1, "{events:?}");
    rx.checkpoint_committed(&first[0]);
    written(&mut rx, &hashes, 2);
    events.clear();
    pump(&mut rx, &mut events, &mut sent);
    let second = checkpoints_in(&events);
    assert_eq!(second.len(), 1, "checkpointed at once: {events:?}");
    rx.checkpoint_committed(&second[0]);
    events.clear();
    pump(&mut rx, &mut events, &mut sent);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Finalize { digest: d } if *d == digest)),
        "{events:?}"
    );
    assert!(!sent.iter().any(|m| matches!(m, Message::Need { .. })));
}

#[test]
fn a_chunk_failing_verification_after_done_waits_for_the_next_done() {
    let (mut rx, layout, hashes, digest) = receiving(3, 11);
    let mut sent = Vec::new();
    let mut events = Vec::new();
    written(&mut rx, &hashes, 0);
    // Chunks 1 and 2 are being verified and written when `Done` comes.
    rx.chunk_writing(1);
    rx.chunk_writing(2);
    rx.handle(Message::Done { digest }).unwrap();
    written(&mut rx, &hashes, 1);
    // Chunk 2 turns out damaged: asked for again, once, by `Reject`.
    rx.chunk_corrupt(2);
    pump_committing(&mut rx, &mut events, &mut sent);
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::Reject { index: 2 })),
        "{sent:?}"
    );
    assert!(
        !sent.iter().any(|m| matches!(m, Message::Need { .. })),
        "asked for once, not twice: {sent:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Finalize { .. })),
        "{events:?}"
    );
    // The sender sends chunk 2 again, then a new `Done`.
    assert_eq!(
        rx.accept_data(2, layout.offset(2), layout.len(2) as usize)
            .unwrap(),
        DataVerdict::Write
    );
    rx.chunk_writing(2);
    written(&mut rx, &hashes, 2);
    pump_committing(&mut rx, &mut events, &mut sent);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Finalize { .. })),
        "finishing waits for the new Done: {events:?}"
    );
    rx.handle(Message::Done { digest })
        .expect("the new Done is in the data phase");
    pump_committing(&mut rx, &mut events, &mut sent);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Finalize { digest: d } if *d == digest)),
        "{events:?}"
    );
}

#[test]
fn chunks_written_during_the_last_checkpoint_are_checkpointed_when_it_ends() {
    let (mut rx, _, hashes, digest) = receiving(4, 12);
    let checkpoints = |rx: &mut Receiver| {
        let mut out = Vec::new();
        while let Some(e) = rx.poll_event() {
            match e {
                ReceiverEvent::Checkpoint(list) => out.push(list),
                ReceiverEvent::Finalize { .. } => out.push(Vec::new()),
                _ => {}
            }
        }
        out
    };
    for i in 0..2 {
        written(&mut rx, &hashes, i);
    }
    rx.chunk_writing(2);
    rx.chunk_writing(3);
    // `Done` starts a checkpoint of chunks 0 and 1; 2 and 3 are still being written.
    rx.handle(Message::Done { digest }).unwrap();
    let first = checkpoints(&mut rx);
    assert_eq!(first.len(), 1, "{first:?}");
    // Both writes return while that checkpoint runs.
    written(&mut rx, &hashes, 2);
    written(&mut rx, &hashes, 3);
    assert!(checkpoints(&mut rx).is_empty(), "one checkpoint at a time");
    rx.checkpoint_committed(&first[0]);
    let second = checkpoints(&mut rx);
    assert_eq!(
        second.first().map(|l| l.len()),
        Some(2),
        "chunks 2 and 3 go at once, not when the timer fires: {second:?}"
    );
    rx.checkpoint_committed(&second[0]);
    assert_eq!(checkpoints(&mut rx), vec![Vec::new()], "then it finalizes");
}

#[test]
fn chunks_are_read_ahead_and_done_waits_for_every_read() {
    let size = 4 * CHUNK as u64;
    let src = data(size, 13);
    let layout = ChunkLayout::new(size, CHUNK).unwrap();
    let alg = HashAlg::Blake3;
    let mut tx = Sender::new(
        TransferId::default(),
        layout,
        alg,
        SenderConfig::default(),
        [],
    );
    tx.set_read_ahead(3);
    tx.handle(Message::Offer {
        ranges: RangeSet::new(),
        hashes: Vec::new().into(),
        more: false,
    })
    .unwrap();
    assert!(matches!(
        tx.poll_transmit(),
        Some(Transmit::Message(Message::Agreed { .. }))
    ));
    let mut asked = Vec::new();
    while let Some(Transmit::Chunk { index, .. }) = tx.poll_transmit() {
        asked.push(index);
    }
    assert_eq!(asked, [0, 1, 2], "three reads under way at once, no more");
    let hash = |i: u32| alg.hash(&src[layout.offset(i) as usize..][..layout.len(i) as usize]);
    tx.chunk_read(0, hash(0)).unwrap();
    assert!(matches!(
        tx.poll_transmit(),
        Some(Transmit::Chunk { index: 3, .. })
    ));
    tx.chunk_read(1, hash(1)).unwrap();
    tx.chunk_read(3, hash(3)).unwrap();
    assert_eq!(
        tx.poll_transmit(),
        None,
        "no Done while chunk 2 is being read"
    );
    tx.chunk_read(2, hash(2)).unwrap();
    assert!(matches!(
        tx.poll_transmit(),
        Some(Transmit::Message(Message::Done { .. }))
    ));
}
