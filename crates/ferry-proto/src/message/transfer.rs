//! One file's transfer: opening it (`PutOpen`, `GetOpen`, `GetMeta`, `Lane`),
//! agreeing on what the receiver holds (`Offer`, `Agreed`), moving chunks
//! (`Data`, `Ack`, `Reject`, `Need`) and closing it (`Done`, `Complete`).

use bytes::{BufMut, Bytes, BytesMut};

use super::{kind, Message, MAX_LIST, MAX_OFFER_CHUNKS, MAX_PATH};
use crate::hash::{ChunkHash, TransferId};
use crate::ranges::RangeSet;
use crate::wire::{
    as_array, as_bounded_bytes, as_string, as_u32, as_u64, bounded, decode_ranges, encode_ranges,
    put_varint, required, DecodeError, FieldReader, FieldWriter,
};

/// What the sender says about the file it is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub chunk_size: u32,
    pub alg: String,
    /// Opaque identity of the source version (size, mtime, ctime, inode); a
    /// different value means the source changed and any partial is discarded.
    pub source_id: Bytes,
}

fn encode_meta(w: &mut FieldWriter, m: &FileMeta) {
    w.u64(10, m.size)
        .u64(11, m.mtime_ns as u64)
        .u64(12, u64::from(m.mode))
        .u64(13, u64::from(m.chunk_size))
        .str(14, &m.alg)
        .bytes(15, &m.source_id);
}

#[derive(Default)]
struct MetaFields {
    size: Option<u64>,
    mtime: i64,
    mode: u32,
    chunk_size: Option<u32>,
    alg: Option<String>,
    source_id: Bytes,
}

impl MetaFields {
    /// Consumes a field if it belongs to the file metadata.
    fn take(&mut self, tag: u64, v: &Bytes) -> Result<bool, DecodeError> {
        match tag {
            10 => self.size = Some(as_u64(v)?),
            11 => self.mtime = as_u64(v)? as i64,
            12 => self.mode = as_u32(v)?,
            13 => self.chunk_size = Some(as_u32(v)?),
            14 => self.alg = Some(as_string(v, 32)?),
            15 => self.source_id = as_bounded_bytes(v, 64, "source id")?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, message: &'static str) -> Result<FileMeta, DecodeError> {
        Ok(FileMeta {
            size: required(self.size, message, "size")?,
            mtime_ns: self.mtime,
            mode: self.mode,
            chunk_size: required(self.chunk_size, message, "chunk_size")?,
            alg: required(self.alg, message, "alg")?,
            source_id: self.source_id,
        })
    }
}

/// The body of `PutOpen` and `GetMeta`: an id, a path (`PutOpen` only) and the file's metadata.
fn decode_open(
    mut r: FieldReader,
    name: &'static str,
) -> Result<(TransferId, Option<String>, FileMeta), DecodeError> {
    let (mut id, mut path, mut meta) = (None, None, MetaFields::default());
    while let Some((tag, v)) = r.next_field()? {
        if meta.take(tag, &v)? {
            continue;
        }
        match tag {
            1 => id = Some(TransferId(as_array(&v)?)),
            2 => path = Some(as_string(&v, MAX_PATH)?),
            _ => {}
        }
    }
    let id = required(id, name, "id")?;
    let meta = meta.finish(name)?;
    Ok((id, path, meta))
}

pub(super) fn encode_put_open(w: &mut FieldWriter, id: &TransferId, path: &str, meta: &FileMeta) {
    w.bytes(1, &id.0).str(2, path);
    encode_meta(w, meta);
}

pub(super) fn decode_put_open(r: FieldReader) -> Result<Message, DecodeError> {
    let (id, path, meta) = decode_open(r, "PutOpen")?;
    Ok(Message::PutOpen {
        id,
        path: required(path, "PutOpen", "path")?,
        meta,
    })
}

pub(super) fn encode_get_meta(w: &mut FieldWriter, id: &TransferId, meta: &FileMeta) {
    w.bytes(1, &id.0);
    encode_meta(w, meta);
}

pub(super) fn decode_get_meta(r: FieldReader) -> Result<Message, DecodeError> {
    let (id, _, meta) = decode_open(r, "GetMeta")?;
    Ok(Message::GetMeta { id, meta })
}

pub(super) fn encode_lane(w: &mut FieldWriter, id: &TransferId) {
    w.bytes(1, &id.0);
}

pub(super) fn decode_lane(mut r: FieldReader) -> Result<Message, DecodeError> {
    let mut id = None;
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            id = Some(TransferId(as_array(&v)?));
        }
    }
    Ok(Message::Lane {
        id: required(id, "Lane", "id")?,
    })
}

pub(super) fn encode_get_open(w: &mut FieldWriter, id: &TransferId, path: &str, algs: &[String]) {
    w.bytes(1, &id.0).str(2, path);
    for a in algs {
        w.str(3, a);
    }
}

pub(super) fn decode_get_open(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut id, mut path, mut algs) = (None, None, vec![]);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => id = Some(TransferId(as_array(&v)?)),
            2 => path = Some(as_string(&v, MAX_PATH)?),
            3 if algs.len() < MAX_LIST => algs.push(as_string(&v, 32)?),
            _ => {}
        }
    }
    Ok(Message::GetOpen {
        id: required(id, "GetOpen", "id")?,
        path: required(path, "GetOpen", "path")?,
        algs,
    })
}

pub(super) fn encode_offer(w: &mut FieldWriter, ranges: &RangeSet, hashes: &[u8], more: &bool) {
    w.bytes(1, &encode_ranges(ranges))
        .bytes(2, hashes)
        .bool(3, *more);
}

pub(super) fn decode_offer(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut ranges, mut hashes, mut more) = (RangeSet::new(), Bytes::new(), false);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => ranges = decode_ranges(&v)?,
            2 => hashes = v,
            3 => more = as_u64(&v)? != 0,
            _ => {}
        }
    }
    let n = ranges.count();
    bounded("offer", n, u64::from(MAX_OFFER_CHUNKS))?;
    if hashes.len() as u64 != n * 32 {
        return Err(DecodeError::Malformed(
            "offer hash count does not match its ranges",
        ));
    }
    Ok(Message::Offer {
        ranges,
        hashes,
        more,
    })
}

/// The body of `Agreed`, `Ack` and `Need`: one range set.
fn encode_range_body(w: &mut FieldWriter, ranges: &RangeSet) {
    w.bytes(1, &encode_ranges(ranges));
}

fn decode_range_body(mut r: FieldReader) -> Result<RangeSet, DecodeError> {
    let mut ranges = RangeSet::new();
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            ranges = decode_ranges(&v)?;
        }
    }
    Ok(ranges)
}

pub(super) fn encode_agreed(w: &mut FieldWriter, ranges: &RangeSet) {
    encode_range_body(w, ranges);
}

pub(super) fn decode_agreed(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Agreed {
        ranges: decode_range_body(r)?,
    })
}

pub(super) fn encode_ack(w: &mut FieldWriter, ranges: &RangeSet) {
    encode_range_body(w, ranges);
}

pub(super) fn decode_ack(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Ack {
        ranges: decode_range_body(r)?,
    })
}

pub(super) fn encode_need(w: &mut FieldWriter, ranges: &RangeSet) {
    encode_range_body(w, ranges);
}

pub(super) fn decode_need(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Need {
        ranges: decode_range_body(r)?,
    })
}

pub(super) fn encode_data(
    w: &mut FieldWriter,
    index: &u32,
    offset: &u64,
    tag: &ChunkHash,
    payload: &[u8],
) {
    w.u64(1, u64::from(*index))
        .u64(2, *offset)
        .bytes(3, &tag.0)
        .bytes(4, payload);
}

pub(super) fn decode_data(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut index, mut offset, mut tag_v, mut payload) = (None, None, None, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => index = Some(as_u32(&v)?),
            2 => offset = Some(as_u64(&v)?),
            3 => tag_v = Some(ChunkHash(as_array(&v)?)),
            4 => payload = Some(v),
            _ => {}
        }
    }
    Ok(Message::Data {
        index: required(index, "Data", "index")?,
        offset: required(offset, "Data", "offset")?,
        tag: required(tag_v, "Data", "tag")?,
        payload: required(payload, "Data", "payload")?,
    })
}

pub(super) fn encode_reject(w: &mut FieldWriter, index: &u32) {
    w.u64(1, u64::from(*index));
}

pub(super) fn decode_reject(mut r: FieldReader) -> Result<Message, DecodeError> {
    let mut index = None;
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            index = Some(as_u32(&v)?);
        }
    }
    Ok(Message::Reject {
        index: required(index, "Reject", "index")?,
    })
}

/// The body of `Done` and `Complete`: the whole-file digest.
fn encode_digest(w: &mut FieldWriter, digest: &ChunkHash) {
    w.bytes(1, &digest.0);
}

fn decode_digest(mut r: FieldReader) -> Result<ChunkHash, DecodeError> {
    let mut digest = None;
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            digest = Some(ChunkHash(as_array(&v)?));
        }
    }
    required(digest, "Done/Complete", "digest")
}

pub(super) fn encode_done(w: &mut FieldWriter, digest: &ChunkHash) {
    encode_digest(w, digest);
}

pub(super) fn decode_done(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Done {
        digest: decode_digest(r)?,
    })
}

pub(super) fn encode_complete(w: &mut FieldWriter, digest: &ChunkHash) {
    encode_digest(w, digest);
}

pub(super) fn decode_complete(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Complete {
        digest: decode_digest(r)?,
    })
}

/// Encodes everything of a `Data` frame but the payload, which the caller
/// writes right after (so a chunk is never copied into a frame buffer).
pub fn encode_data_header(
    index: u32,
    offset: u64,
    tag: &ChunkHash,
    payload_len: usize,
) -> BytesMut {
    let mut w = FieldWriter::new();
    w.u64(1, u64::from(index)).u64(2, offset).bytes(3, &tag.0);
    let mut head = w.finish();
    put_varint(&mut head, 4);
    put_varint(&mut head, payload_len as u64);
    let mut out = BytesMut::with_capacity(5 + head.len());
    out.put_u32((1 + head.len() + payload_len) as u32);
    out.put_u8(kind::Data);
    out.extend_from_slice(&head);
    out
}

/// A `Data` frame's header (see [`super::FrameDecoder::data_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub index: u32,
    pub offset: u64,
    pub tag: ChunkHash,
    /// Where the payload starts, counted from the frame's first byte.
    pub payload_start: usize,
    pub payload_len: usize,
}
