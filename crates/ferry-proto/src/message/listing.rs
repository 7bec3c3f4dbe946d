//! Questions about the server's tree: `Stat`, `List`, `Mkdir` and their
//! answers, and the [`Entry`] they carry.

use bytes::Bytes;

use super::{Message, MAX_LIST_ENTRIES, MAX_PATH};
use crate::wire::{
    as_string, as_u32, as_u64, push_bounded, required, DecodeError, FieldReader, FieldWriter,
};

/// What kind of thing a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Missing,
    File,
    Dir,
}

impl EntryKind {
    fn to_u64(self) -> u64 {
        match self {
            EntryKind::Missing => 0,
            EntryKind::File => 1,
            EntryKind::Dir => 2,
        }
    }
    fn from_u64(v: u64) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(EntryKind::Missing),
            1 => Ok(EntryKind::File),
            2 => Ok(EntryKind::Dir),
            _ => Err(DecodeError::Malformed("unknown entry kind")),
        }
    }
}

/// Metadata of one file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the request's base, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
}

fn encode_entry(e: &Entry) -> FieldWriter {
    let mut w = FieldWriter::new();
    w.str(1, &e.path)
        .u64(2, e.kind.to_u64())
        .u64(3, e.size)
        .u64(4, e.mtime_ns as u64)
        .u64(5, u64::from(e.mode));
    w
}

fn decode_entry(body: Bytes) -> Result<Entry, DecodeError> {
    let mut r = FieldReader::new(body);
    let (mut path, mut kind, mut size, mut mtime, mut mode) = (None, None, 0, 0, 0);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => path = Some(as_string(&v, MAX_PATH)?),
            2 => kind = Some(EntryKind::from_u64(as_u64(&v)?)?),
            3 => size = as_u64(&v)?,
            4 => mtime = as_u64(&v)? as i64,
            5 => mode = as_u32(&v)?,
            _ => {}
        }
    }
    Ok(Entry {
        path: required(path, "entry", "path")?,
        kind: required(kind, "entry", "kind")?,
        size,
        mtime_ns: mtime,
        mode,
    })
}

/// The body of `Stat` and `List`: one path.
fn encode_path(w: &mut FieldWriter, path: &str) {
    w.str(1, path);
}

fn decode_path(mut r: FieldReader) -> Result<String, DecodeError> {
    let mut path = None;
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            path = Some(as_string(&v, MAX_PATH)?);
        }
    }
    required(path, "Stat/List", "path")
}

pub(super) fn encode_stat(w: &mut FieldWriter, path: &str) {
    encode_path(w, path);
}

pub(super) fn decode_stat(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Stat {
        path: decode_path(r)?,
    })
}

pub(super) fn encode_list(w: &mut FieldWriter, path: &str) {
    encode_path(w, path);
}

pub(super) fn decode_list(r: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::List {
        path: decode_path(r)?,
    })
}

pub(super) fn encode_stat_reply(w: &mut FieldWriter, entry: &Entry) {
    w.nested(1, encode_entry(entry));
}

pub(super) fn decode_stat_reply(mut r: FieldReader) -> Result<Message, DecodeError> {
    let mut entry = None;
    while let Some((tag, v)) = r.next_field()? {
        if tag == 1 {
            entry = Some(decode_entry(v)?);
        }
    }
    Ok(Message::StatReply {
        entry: required(entry, "StatReply", "entry")?,
    })
}

pub(super) fn encode_list_reply(w: &mut FieldWriter, entries: &[Entry], more: &bool) {
    for e in entries {
        w.nested(1, encode_entry(e));
    }
    w.bool(2, *more);
}

pub(super) fn decode_list_reply(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut entries, mut more) = (vec![], false);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => push_bounded(&mut entries, MAX_LIST_ENTRIES, "list page", || {
                decode_entry(v)
            })?,
            2 => more = as_u64(&v)? != 0,
            _ => {}
        }
    }
    Ok(Message::ListReply { entries, more })
}

pub(super) fn encode_mkdir(w: &mut FieldWriter, path: &str, mode: &u32, mtime_ns: &i64) {
    w.str(1, path)
        .u64(2, u64::from(*mode))
        .u64(3, *mtime_ns as u64);
}

pub(super) fn decode_mkdir(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut path, mut mode, mut mtime) = (None, 0o755, 0);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => path = Some(as_string(&v, MAX_PATH)?),
            2 => mode = as_u32(&v)?,
            3 => mtime = as_u64(&v)? as i64,
            _ => {}
        }
    }
    Ok(Message::Mkdir {
        path: required(path, "Mkdir", "path")?,
        mode,
        mtime_ns: mtime,
    })
}
