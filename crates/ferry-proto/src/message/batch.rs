//! Small files, many to a round trip: `BatchPut`/`BatchNeed`/`BatchData`/
//! `BatchCommit` up, `BatchGet`/`BatchItem` down, `BatchResult` to close
//! either, and the [`BatchFile`] and [`BatchFailure`] they carry.

use bytes::Bytes;

use super::{Message, MAX_BATCH_FILE, MAX_BATCH_FILES, MAX_PATH};
use crate::failure::{Failure, FailureCode, MAX_TEXT};
use crate::hash::ChunkHash;
use crate::ranges::RangeSet;
use crate::wire::{
    as_array, as_bounded_bytes, as_string, as_u32, as_u64, bounded, decode_ranges, encode_ranges,
    push_bounded, required, DecodeError, FieldReader, FieldWriter,
};

/// One small file announced in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    /// The whole-file digest (see `hash::small_file_digest`).
    pub digest: ChunkHash,
}

/// Why one file of a batch was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    pub index: u32,
    pub failure: Failure,
}

fn encode_batch_file(f: &BatchFile) -> FieldWriter {
    let mut e = FieldWriter::new();
    e.str(1, &f.path)
        .u64(2, f.size)
        .u64(3, f.mtime_ns as u64)
        .u64(4, u64::from(f.mode))
        .bytes(5, &f.digest.0);
    e
}

fn decode_batch_file(body: Bytes) -> Result<BatchFile, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut path, mut size, mut mtime, mut mode, mut digest) = (None, None, 0, 0, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => path = Some(as_string(&v, MAX_PATH)?),
            2 => size = Some(as_u64(&v)?),
            3 => mtime = as_u64(&v)? as i64,
            4 => mode = as_u32(&v)?,
            5 => digest = Some(ChunkHash(as_array(&v)?)),
            _ => {}
        }
    }
    let size = required(size, "BatchFile", "size")?;
    bounded("batch file", size, MAX_BATCH_FILE)?;
    Ok(BatchFile {
        path: required(path, "BatchFile", "path")?,
        size,
        mtime_ns: mtime,
        mode,
        digest: required(digest, "BatchFile", "digest")?,
    })
}

fn decode_batch_failure(body: Bytes) -> Result<BatchFailure, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut index, mut f) = (None, Failure::new(FailureCode::Other(0), ""));
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => index = Some(as_u32(&v)?),
            2 => f.code = FailureCode::from_u64(as_u64(&v)?),
            3 => f.message = as_string(&v, MAX_TEXT)?,
            4 => f.retry_after_ms = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok(BatchFailure {
        index: required(index, "BatchFailure", "index")?,
        failure: f,
    })
}

fn encode_batch_failure(f: &BatchFailure) -> FieldWriter {
    let mut e = FieldWriter::new();
    e.u64(1, u64::from(f.index))
        .u64(2, f.failure.code.to_u64())
        .str(3, &f.failure.message);
    if let Some(ms) = f.failure.retry_after_ms {
        e.u64(4, ms);
    }
    e
}

/// The body of `BatchPut` and `BatchGet`: a hash algorithm and the files.
fn encode_files(w: &mut FieldWriter, alg: &str, files: &[BatchFile]) {
    w.str(1, alg);
    for f in files {
        w.nested(2, encode_batch_file(f));
    }
}

fn decode_files(mut r: FieldReader) -> Result<(String, Vec<BatchFile>), DecodeError> {
    let (mut alg, mut files) = (None, Vec::new());
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => alg = Some(as_string(&v, 64)?),
            2 => push_bounded(&mut files, MAX_BATCH_FILES, "batch", || {
                decode_batch_file(v)
            })?,
            _ => {}
        }
    }
    let alg = required(alg, "BatchPut/BatchGet", "alg")?;
    Ok((alg, files))
}

pub(super) fn encode_batch_put(w: &mut FieldWriter, alg: &str, files: &[BatchFile]) {
    encode_files(w, alg, files);
}

pub(super) fn decode_batch_put(r: FieldReader) -> Result<Message, DecodeError> {
    let (alg, files) = decode_files(r)?;
    Ok(Message::BatchPut { alg, files })
}

pub(super) fn encode_batch_get(w: &mut FieldWriter, alg: &str, files: &[BatchFile]) {
    encode_files(w, alg, files);
}

pub(super) fn decode_batch_get(r: FieldReader) -> Result<Message, DecodeError> {
    let (alg, files) = decode_files(r)?;
    Ok(Message::BatchGet { alg, files })
}

/// A whole small file's content, bounded like the file itself.
fn batch_payload(v: &Bytes) -> Result<Bytes, DecodeError> {
    as_bounded_bytes(v, MAX_BATCH_FILE as usize, "batch file")
}

pub(super) fn encode_batch_item(
    w: &mut FieldWriter,
    index: &u32,
    file: &BatchFile,
    payload: &Option<Bytes>,
) {
    w.u64(1, u64::from(*index))
        .nested(2, encode_batch_file(file));
    if let Some(p) = payload {
        w.bytes(3, p);
    }
}

pub(super) fn decode_batch_item(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut index, mut file, mut payload) = (None, None, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => index = Some(as_u32(&v)?),
            2 => file = Some(decode_batch_file(v)?),
            3 => payload = Some(batch_payload(&v)?),
            _ => {}
        }
    }
    Ok(Message::BatchItem {
        index: required(index, "BatchItem", "index")?,
        file: required(file, "BatchItem", "file")?,
        payload,
    })
}

pub(super) fn encode_batch_need(w: &mut FieldWriter, indexes: &RangeSet) {
    w.bytes(1, &encode_ranges(indexes));
}

pub(super) fn decode_batch_need(mut r: FieldReader) -> Result<Message, DecodeError> {
    let mut indexes = RangeSet::new();
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            indexes = decode_ranges(&v)?;
        }
    }
    Ok(Message::BatchNeed { indexes })
}

pub(super) fn encode_batch_data(w: &mut FieldWriter, index: &u32, payload: &[u8]) {
    w.u64(1, u64::from(*index)).bytes(2, payload);
}

pub(super) fn decode_batch_data(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut index, mut payload) = (None, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => index = Some(as_u32(&v)?),
            2 => payload = Some(batch_payload(&v)?),
            _ => {}
        }
    }
    Ok(Message::BatchData {
        index: required(index, "BatchData", "index")?,
        payload: payload.unwrap_or_default(),
    })
}

/// `BatchCommit` has no body.
pub(super) fn encode_batch_commit(_: &mut FieldWriter) {}

pub(super) fn decode_batch_commit(_: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::BatchCommit)
}

pub(super) fn encode_batch_result(w: &mut FieldWriter, done: &RangeSet, failures: &[BatchFailure]) {
    w.bytes(1, &encode_ranges(done));
    for f in failures {
        w.nested(2, encode_batch_failure(f));
    }
}

pub(super) fn decode_batch_result(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut done, mut failures) = (RangeSet::new(), Vec::new());
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => done = decode_ranges(&v)?,
            2 => push_bounded(&mut failures, MAX_BATCH_FILES, "batch result", || {
                decode_batch_failure(v)
            })?,
            _ => {}
        }
    }
    Ok(Message::BatchResult { done, failures })
}
