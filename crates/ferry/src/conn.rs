//! Framed message I/O over any byte stream (TCP+TLS today; QUIC, WebSocket or
//! an in-memory duplex tomorrow).

use bytes::{Buf, BytesMut};
use ferry_proto::message::encode_data_header;
use ferry_proto::{ChunkHash, FrameDecoder, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// Any bidirectional byte stream a connection can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

pub type BoxStream = Box<dyn Stream>;

/// Reads whole messages; cancel-safe (bytes read are kept in the buffer).
pub struct FramedRead<R> {
    inner: R,
    buf: BytesMut,
    dec: FrameDecoder,
    peer: String,
    /// Bytes read off the stream so far.
    pub bytes_in: u64,
    /// Of those, the bytes of whole frames other than `Data` (see `data_in`).
    control_in: u64,
    /// Where `data_in` is added up with other connections' (see `meter`).
    meter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// How much of `data_in` the meter has been given.
    metered: u64,
    /// Where `Data` payloads are read straight into (see [`FramedRead::pool_payloads`]).
    pool: Option<crate::fsutil::BufPool>,
    /// A `Data` frame whose payload is being read into aligned memory.
    partial: Option<PartialData>,
}

/// A `Data` payload being read straight into aligned memory: kept in the
/// reader, not in the future reading it, so a `next` dropped halfway (a
/// `select!` taking another branch) loses nothing.
struct PartialData {
    header: ferry_proto::DataHeader,
    buf: crate::fsutil::AlignedBuf,
    filled: usize,
    pool: crate::fsutil::BufPool,
}

/// Payloads at least this long are read straight into aligned memory.
const DIRECT_PAYLOAD_MIN: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FramedRead<R> {
    pub fn new(inner: R, peer: String) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(256 * 1024),
            dec: FrameDecoder::new(),
            peer,
            bytes_in: 0,
            control_in: 0,
            meter: None,
            metered: 0,
            pool: None,
            partial: None,
        }
    }

    /// Reads the payloads of large `Data` frames straight into aligned
    /// memory from `pool` (or stops, with `None`): no copy out of the frame
    /// buffer, and a payload can go to an `O_DIRECT` write as it is. Each
    /// allocation goes back to the pool when its payload is dropped.
    pub fn pool_payloads(&mut self, pool: Option<crate::fsutil::BufPool>) {
        self.pool = pool;
    }

    /// If a large `Data` frame's header is buffered, starts reading its
    /// payload straight into aligned memory, with what is buffered of it.
    fn start_direct(&mut self) {
        let Some(pool) = &self.pool else { return };
        let Some(h) = self.dec.data_header(&self.buf) else {
            return;
        };
        if h.payload_len < DIRECT_PAYLOAD_MIN {
            return;
        }
        let mut buf = crate::fsutil::AlignedBuf::with_len(h.payload_len, pool.take());
        let have = (self.buf.len() - h.payload_start).min(h.payload_len);
        buf.bytes_mut()[..have].copy_from_slice(&self.buf[h.payload_start..h.payload_start + have]);
        self.buf.advance(h.payload_start + have);
        self.partial = Some(PartialData {
            header: h,
            buf,
            filled: have,
            pool: pool.clone(),
        });
    }

    /// Gives the meter what `data_in` grew by.
    fn update_meter(&mut self) {
        if let Some(meter) = &self.meter {
            // Only growth: a control frame, once whole, leaves `data_in`.
            let d = self.bytes_in - self.control_in;
            if d > self.metered {
                meter.fetch_add(d - self.metered, std::sync::atomic::Ordering::Relaxed);
                self.metered = d;
            }
        }
    }

    /// Adds this connection's `data_in` to `meter` as it grows, frames still
    /// arriving included (a lane's progress, summed over the lanes). The
    /// meter only grows: a keepalive read together with the end of a `Data`
    /// frame stays counted, which needs data arriving anyway.
    pub fn meter(&mut self, meter: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.metered = self.data_in();
        meter.fetch_add(self.metered, std::sync::atomic::Ordering::Relaxed);
        self.meter = Some(meter);
    }

    /// Bounds every frame to `limit` bytes until called again with `None`.
    pub fn set_frame_limit(&mut self, limit: Option<u32>) {
        self.dec.set_limit(limit);
    }

    /// The next message if a whole one has already been read off the
    /// stream; never waits. A server takes a pipelined run of requests in
    /// together with it.
    pub fn next_buffered(&mut self) -> Result<Option<Message>, Error> {
        if self.partial.is_some() {
            // A payload still arriving comes first.
            return Ok(None);
        }
        let held = self.buf.len();
        let m = self
            .dec
            .decode(&mut self.buf)
            .map_err(|e| Error::Proto(e.into()))?;
        if !matches!(m, Some(Message::Data { .. })) {
            // Keepalives, control frames and skipped optional frames.
            self.control_in += (held - self.buf.len()) as u64;
        }
        self.update_meter();
        Ok(m)
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, Error> {
        loop {
            if self.partial.is_none() {
                self.start_direct();
            }
            let whole = |p: &PartialData| p.filled == p.header.payload_len;
            if let Some(p) = self.partial.take_if(|p| whole(p)) {
                let h = p.header;
                return Ok(Some(Message::Data {
                    index: h.index,
                    offset: h.offset,
                    tag: h.tag,
                    payload: p.buf.into_bytes(&p.pool),
                }));
            }
            if let Some(p) = &mut self.partial {
                let n = self
                    .inner
                    .read(&mut p.buf.bytes_mut()[p.filled..])
                    .await
                    .map_err(|e| read_error(&self.peer, e))?;
                if n == 0 {
                    return Err(read_error(&self.peer, cut_off()));
                }
                p.filled += n;
                self.bytes_in += n as u64;
                self.update_meter();
                continue;
            }
            if let Some(m) = self.next_buffered()? {
                return Ok(Some(m));
            }
            // A large `Data` frame read into pooled memory needs room for its
            // header only.
            let direct = self.pool.is_some() && FrameDecoder::starts_data(&self.buf);
            if let Some(need) = FrameDecoder::needed(&self.buf).filter(|_| !direct) {
                if need > self.buf.capacity() {
                    self.buf.reserve(need - self.buf.len());
                }
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| read_error(&self.peer, e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(read_error(&self.peer, cut_off()));
            }
            self.bytes_in += n as u64;
        }
    }

    /// Bytes of `Data` frames read so far, including the part of one still
    /// arriving: unlike `bytes_in`, keepalives do not make it grow (a frame
    /// other than `Data` counts until it is whole, which takes a moment).
    pub fn data_in(&self) -> u64 {
        self.bytes_in - self.control_in
    }

    /// The next message, or `Err(Stalled)` when not one byte arrived for
    /// `stall`: a frame that keeps arriving, however slowly, is no stall (on
    /// a slow link one large chunk may take longer than the limit).
    pub async fn next_within(
        &mut self,
        stall: std::time::Duration,
    ) -> Result<Result<Option<Message>, Error>, Stalled> {
        loop {
            let before = self.bytes_in;
            match tokio::time::timeout(stall, self.next()).await {
                Ok(r) => return Ok(r),
                Err(_) if self.bytes_in != before => continue,
                Err(_) => return Err(Stalled),
            }
        }
    }

    /// [`FramedRead::next_within`] that treats end of stream as an error.
    pub async fn expect_within(
        &mut self,
        stall: std::time::Duration,
    ) -> Result<Result<Message, Error>, Stalled> {
        let r = self.next_within(stall).await?;
        Ok(r.and_then(|m| m.ok_or_else(|| self.closed())))
    }

    /// End of stream where a message was expected.
    fn closed(&self) -> Error {
        Error::Io {
            addr: self.peer.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by peer",
            ),
        }
    }

    /// Like [`FramedRead::next`] but treats end of stream as an error.
    pub async fn expect(&mut self) -> Result<Message, Error> {
        let m = self.next().await?;
        m.ok_or_else(|| self.closed())
    }

    /// A message if one can be had without waiting.
    pub async fn try_next(&mut self) -> Result<Option<Message>, Error> {
        tokio::select! {
            biased;
            r = self.next() => match r? {
                Some(m) => Ok(Some(m)),
                None => Err(self.closed()),
            },
            _ = std::future::ready(()) => Ok(None),
        }
    }
}

/// A failed read from `peer`.
fn read_error(peer: &str, source: std::io::Error) -> Error {
    Error::Io {
        addr: peer.to_string(),
        source,
    }
}

/// The stream ended inside a frame.
fn cut_off() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "connection closed in the middle of a frame",
    )
}

/// How long silence or a blocked write may last before a connection is
/// declared stalled and torn down (the transfer then resumes on a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Nothing heard from the peer for this long.
    pub stall: std::time::Duration,
    /// Send a keepalive after this long without writing.
    pub keepalive: std::time::Duration,
    /// A sender with data outstanding that sees no chunk acknowledged for this
    /// long, while the connection itself is alive (keepalives answered), tears
    /// it down and resumes on a new one: the receiver is stuck, not the link.
    /// A write that cannot move for this long (or `stall`, if longer) fails too.
    pub ack: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stall: std::time::Duration::from_secs(30),
            keepalive: std::time::Duration::from_secs(10),
            ack: std::time::Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// Keepalives at a third of the stall limit, so a live peer is never taken for dead.
    pub fn with_stall(stall: std::time::Duration) -> Self {
        Self {
            stall,
            keepalive: (stall / 3).max(std::time::Duration::from_millis(100)),
            ack: stall * 2,
        }
    }
}

/// Nothing arrived for the stall limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

/// Writes messages.
pub struct FramedWrite<W> {
    inner: W,
    peer: String,
    stall: std::time::Duration,
    /// Bytes written to the stream so far.
    pub bytes_out: u64,
    /// Small frames queued by [`FramedWrite::send_batched`], written before
    /// anything else goes out.
    queued: Vec<u8>,
}

/// Queued small frames are written once they reach this many bytes: one
/// write (a few TLS records, one syscall) instead of one per 4 KiB file.
const COALESCE_BYTES: usize = 64 * 1024;

impl<W: AsyncWrite + Unpin> FramedWrite<W> {
    pub fn new(inner: W, peer: String) -> Self {
        Self {
            inner,
            peer,
            stall: Timeouts::default().stall,
            bytes_out: 0,
            queued: Vec::new(),
        }
    }

    fn err(&self, e: std::io::Error) -> Error {
        Error::Io {
            addr: self.peer.clone(),
            source: e,
        }
    }

    async fn put(&mut self, b: &[u8]) -> Result<(), Error> {
        // Pieces small enough that even a slow link moves one well within the limit.
        for piece in b.chunks(64 * 1024) {
            match tokio::time::timeout(self.stall, self.inner.write_all(piece)).await {
                Ok(r) => r.map_err(|e| self.err(e))?,
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "writing to {} made no progress for {:.1}s",
                        self.peer,
                        self.stall.as_secs_f64()
                    )))
                }
            }
        }
        Ok(())
    }

    pub async fn send(&mut self, m: &Message) -> Result<(), Error> {
        self.put_queued().await?;
        let b = m.encode();
        self.put(&b).await?;
        self.bytes_out += b.len() as u64;
        Ok(())
    }

    /// Queues a message behind the others queued, and writes them all once
    /// they add up to [`COALESCE_BYTES`]; the next `send`, `send_data` or
    /// `flush` writes the rest first. For runs of small frames (files of a
    /// batch), which would otherwise cost a TLS record and a syscall each.
    pub async fn send_batched(&mut self, m: &Message) -> Result<(), Error> {
        self.queued.extend_from_slice(&m.encode());
        if self.queued.len() >= COALESCE_BYTES {
            self.put_queued().await?;
        }
        Ok(())
    }

    async fn put_queued(&mut self) -> Result<(), Error> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let q = std::mem::take(&mut self.queued);
        self.put(&q).await?;
        self.bytes_out += q.len() as u64;
        // Keep the allocation for the next run.
        self.queued = q;
        self.queued.clear();
        Ok(())
    }

    /// Sends a chunk without copying it into a frame buffer.
    pub async fn send_data(
        &mut self,
        index: u32,
        offset: u64,
        tag: &ChunkHash,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.put_queued().await?;
        let head = encode_data_header(index, offset, tag, payload.len());
        self.put(&head).await?;
        self.put(payload).await?;
        self.bytes_out += (head.len() + payload.len()) as u64;
        Ok(())
    }

    /// Writes bytes that are not a frame (tests only).
    #[doc(hidden)]
    pub async fn raw(&mut self, b: &[u8]) -> Result<(), Error> {
        self.put_queued().await?;
        self.inner.write_all(b).await.map_err(|e| self.err(e))?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), Error> {
        self.put_queued().await?;
        match tokio::time::timeout(self.stall, self.inner.flush()).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(Error::Timeout(format!(
                "flushing to {} made no progress for {:.1}s",
                self.peer,
                self.stall.as_secs_f64()
            ))),
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.inner.shutdown().await;
    }
}

/// A connection: both halves of a stream.
pub struct Conn {
    pub rd: FramedRead<tokio::io::ReadHalf<BoxStream>>,
    pub wr: FramedWrite<tokio::io::WriteHalf<BoxStream>>,
    pub peer: String,
    pub timeouts: Timeouts,
}

impl Conn {
    pub fn new(stream: BoxStream, peer: String) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            rd: FramedRead::new(r, peer.clone()),
            wr: FramedWrite::new(w, peer.clone()),
            peer,
            timeouts: Timeouts::default(),
        }
    }

    pub fn set_timeouts(&mut self, t: Timeouts) {
        self.timeouts = t;
        // A write that cannot move means the peer is not reading: a stuck
        // receiver, given the same time as the acknowledgement watchdog. A
        // moving link frees a blocked writer only in steps (over TCP, once a
        // third of the send buffer has left: ~1.3 MiB of autotuning's 4 MiB),
        // which on a slow link takes longer than the read stall limit.
        self.wr.stall = t.ack.max(t.stall);
    }

    /// Sends and flushes one message.
    pub async fn send(&mut self, m: &Message) -> Result<(), Error> {
        self.wr.send(m).await?;
        self.wr.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(index: u32, len: usize) -> Message {
        Message::BatchData {
            index,
            payload: bytes::Bytes::from(vec![index as u8; len]),
        }
    }

    /// Queued frames go out in order, before anything sent after them, and
    /// only once they fill a write or something else is sent.
    #[tokio::test]
    async fn batched_frames_keep_their_order_and_are_coalesced() {
        let (a, b) = tokio::io::duplex(4 << 20);
        let mut wr = FramedWrite::new(a, "test".into());
        let mut rd = FramedRead::new(b, "test".into());
        wr.send_batched(&item(0, 4096)).await.unwrap();
        wr.send_batched(&item(1, 4096)).await.unwrap();
        assert_eq!(wr.bytes_out, 0, "two small frames are held back");
        wr.send(&Message::BatchCommit).await.unwrap();
        assert_eq!(rd.expect().await.unwrap(), item(0, 4096));
        assert_eq!(rd.expect().await.unwrap(), item(1, 4096));
        assert_eq!(rd.expect().await.unwrap(), Message::BatchCommit);
        // Enough of them are written without a flush, whole frames only.
        let before = wr.bytes_out;
        for i in 0..20 {
            wr.send_batched(&item(i, 4096)).await.unwrap();
        }
        let frame = item(0, 4096).encode().len() as u64;
        let written = wr.bytes_out - before;
        assert!(written >= COALESCE_BYTES as u64, "{written}");
        assert_eq!(written % frame, 0);
        let whole = written / frame;
        assert!(whole < 20);
        for i in 0..whole as u32 {
            assert_eq!(rd.expect().await.unwrap(), item(i, 4096));
        }
        wr.flush().await.unwrap();
        for i in whole as u32..20 {
            assert_eq!(rd.expect().await.unwrap(), item(i, 4096));
        }
        assert_eq!(wr.bytes_out - before, 20 * frame);
    }

    /// Keepalives do not count as data received; a `Data` frame counts from
    /// its first byte, before it is whole.
    #[tokio::test]
    async fn data_in_counts_data_frames_not_keepalives() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut rd = FramedRead::new(b, "test".into());
        let ping = ping_frame();
        a.write_all(&ping).await.unwrap();
        assert!(matches!(rd.expect().await.unwrap(), Message::Ping { .. }));
        assert_eq!(rd.data_in(), 0);
        assert_eq!(rd.bytes_in, ping.len() as u64);
        let data = data_frame();
        // Half of it: still arriving, but counted.
        a.write_all(&data[..500]).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), rd.next()).await;
        assert!(r.is_err(), "half a frame is no message");
        assert_eq!(rd.data_in(), 500);
        a.write_all(&data[500..]).await.unwrap();
        a.write_all(&ping).await.unwrap();
        assert!(matches!(rd.expect().await.unwrap(), Message::Data { .. }));
        assert!(matches!(rd.expect().await.unwrap(), Message::Ping { .. }));
        assert_eq!(rd.data_in(), data.len() as u64);
    }

    /// A 1000-byte chunk's frame.
    #[tokio::test]
    async fn a_large_payload_read_into_pooled_memory_survives_cancelled_reads() {
        use tokio::io::AsyncWriteExt;
        let payload: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
        let frame = Message::Data {
            index: 3,
            offset: 3 << 20,
            tag: ferry_proto::hash::ChunkHash([9; 32]),
            payload: bytes::Bytes::from(payload.clone()),
        }
        .encode();
        let ping = ping_frame();
        let (mut a, b) = tokio::io::duplex(16 * 1024);
        let pool = crate::fsutil::BufPool::default();
        let mut rd = FramedRead::new(b, "test".into());
        rd.pool_payloads(Some(pool.clone()));
        let (f, p) = (frame.clone(), ping.clone());
        let writer = tokio::spawn(async move {
            for piece in f.chunks(7000).chain(p.chunks(5)) {
                a.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        // Every read is cut short by a timer now and then: nothing may be lost.
        let mut got = Vec::new();
        let mut cancelled = 0;
        while got.len() < 2 {
            tokio::select! {
                r = rd.next() => got.push(r.unwrap().unwrap()),
                _ = tokio::task::yield_now() => cancelled += 1,
            }
        }
        assert!(cancelled > 0, "the reads were cancelled at times");
        let _a = writer.await.unwrap();
        match &got[0] {
            Message::Data {
                index,
                offset,
                payload: p,
                ..
            } => {
                assert_eq!((*index, *offset), (3, 3 << 20));
                assert!(p[..] == payload[..], "payload intact");
                assert!(crate::fsutil::direct_memory(p), "in aligned memory");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(got[1], Message::Ping { .. }));
        assert_eq!(rd.data_in(), frame.len() as u64);
        assert_eq!(rd.bytes_in, (frame.len() + ping.len()) as u64);
        drop(got);
        assert!(pool.take().is_some(), "the memory went back to the pool");
    }

    fn data_frame() -> bytes::Bytes {
        Message::Data {
            index: 0,
            offset: 0,
            tag: ferry_proto::hash::ChunkHash([7; 32]),
            payload: bytes::Bytes::from(vec![1u8; 1000]),
        }
        .encode()
    }

    fn ping_frame() -> bytes::Bytes {
        Message::Ping {
            nonce: 0,
            received: None,
        }
        .encode()
    }

    /// Two connections' `data_in` add up on one meter as bytes arrive, a
    /// frame still arriving included, keepalives left out.
    #[tokio::test]
    async fn a_meter_adds_up_data_in_over_connections() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::AsyncWriteExt;
        let meter = std::sync::Arc::new(AtomicU64::new(0));
        let data = data_frame();
        let ping = ping_frame();
        let mut sides = Vec::new();
        for _ in 0..2 {
            let (mut a, b) = tokio::io::duplex(1 << 20);
            let mut rd = FramedRead::new(b, "test".into());
            rd.meter(meter.clone());
            a.write_all(&ping).await.unwrap();
            assert!(matches!(rd.expect().await.unwrap(), Message::Ping { .. }));
            a.write_all(&data[..300]).await.unwrap();
            let r = tokio::time::timeout(std::time::Duration::from_millis(50), rd.next()).await;
            assert!(r.is_err(), "part of a frame is no message");
            sides.push((a, rd));
        }
        assert_eq!(meter.load(Ordering::Relaxed), 600);
        for (a, rd) in &mut sides {
            a.write_all(&data[300..]).await.unwrap();
            assert!(matches!(rd.expect().await.unwrap(), Message::Data { .. }));
            a.write_all(&ping).await.unwrap();
            assert!(matches!(rd.expect().await.unwrap(), Message::Ping { .. }));
        }
        assert_eq!(meter.load(Ordering::Relaxed), 2 * data.len() as u64);
    }
}
