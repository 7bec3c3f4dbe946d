//! Tag-length-value field encoding used inside every message body.
//!
//! A message body is a sequence of fields `tag (varint) | len (varint) | value`.
//! Decoders skip tags they do not know, so a newer peer may add fields without
//! breaking an older one; a field a decoder requires but does not find is an
//! error. Integers are unsigned LEB128 varints, strings are UTF-8, nested
//! structures are themselves field sequences.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ranges::RangeSet;

/// A frame or message from the peer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The peer sent bytes that do not form a valid message.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A length or count exceeds what this implementation accepts.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// A required field is missing.
    #[error("message {message} lacks required field {field}")]
    MissingField {
        message: &'static str,
        field: &'static str,
    },
    /// A frame type this version does not know and cannot skip.
    #[error("unknown frame type {0}")]
    UnknownFrame(u8),
}

/// Largest value a varint may carry (u64).
const MAX_VARINT_LEN: usize = 10;

pub(crate) fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Reads a varint from the front of `input`, returning it and the number of bytes used.
pub(crate) fn get_varint(input: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut v: u64 = 0;
    for (i, b) in input.iter().enumerate().take(MAX_VARINT_LEN) {
        let part = u64::from(b & 0x7f);
        if i == MAX_VARINT_LEN - 1 && part > 1 {
            return Err(DecodeError::Malformed("varint overflows u64"));
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    if input.len() >= MAX_VARINT_LEN {
        Err(DecodeError::Malformed("varint too long"))
    } else {
        Err(DecodeError::Malformed("truncated varint"))
    }
}

/// Builds a field sequence.
#[derive(Default)]
pub(crate) struct FieldWriter {
    buf: BytesMut,
}

impl FieldWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Writes fields after what `prefix` already holds (a frame header).
    pub(crate) fn after(prefix: BytesMut) -> Self {
        Self { buf: prefix }
    }

    pub(crate) fn bytes(&mut self, tag: u64, value: &[u8]) -> &mut Self {
        put_varint(&mut self.buf, tag);
        put_varint(&mut self.buf, value.len() as u64);
        self.buf.put_slice(value);
        self
    }

    pub(crate) fn u64(&mut self, tag: u64, value: u64) -> &mut Self {
        let mut tmp = BytesMut::with_capacity(MAX_VARINT_LEN);
        put_varint(&mut tmp, value);
        self.bytes(tag, &tmp)
    }

    pub(crate) fn str(&mut self, tag: u64, value: &str) -> &mut Self {
        self.bytes(tag, value.as_bytes())
    }

    pub(crate) fn bool(&mut self, tag: u64, value: bool) -> &mut Self {
        self.u64(tag, u64::from(value))
    }

    pub(crate) fn nested(&mut self, tag: u64, inner: FieldWriter) -> &mut Self {
        self.bytes(tag, &inner.buf)
    }

    pub(crate) fn finish(self) -> BytesMut {
        self.buf
    }
}

/// Iterates over the fields of a sequence; every value is a cheap slice of the input.
pub(crate) struct FieldReader {
    rest: Bytes,
}

impl FieldReader {
    pub(crate) fn new(body: Bytes) -> Self {
        Self { rest: body }
    }

    /// The next field, `None` at the end.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u64, Bytes)>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (tag, n1) = get_varint(&self.rest)?;
        let (len, n2) = get_varint(&self.rest[n1..])?;
        let start = n1 + n2;
        let len = usize::try_from(len).map_err(|_| DecodeError::Malformed("field too long"))?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.rest.len())
            .ok_or(DecodeError::Malformed("field runs past end of message"))?;
        let value = self.rest.slice(start..end);
        self.rest = self.rest.slice(end..);
        Ok(Some((tag, value)))
    }
}

pub(crate) fn as_u64(value: &[u8]) -> Result<u64, DecodeError> {
    let (v, n) = get_varint(value)?;
    if n != value.len() {
        return Err(DecodeError::Malformed("trailing bytes after integer"));
    }
    Ok(v)
}

pub(crate) fn as_u32(value: &[u8]) -> Result<u32, DecodeError> {
    u32::try_from(as_u64(value)?).map_err(|_| DecodeError::Malformed("integer out of range"))
}

/// Refuses `len` past `max`: the one check behind every bound on what a peer
/// sends (string and byte fields, lists, counts, frames).
pub(crate) fn bounded(what: &'static str, len: u64, max: u64) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::TooLarge { what, len, max });
    }
    Ok(())
}

/// A field the message cannot do without.
pub(crate) fn required<T>(
    value: Option<T>,
    message: &'static str,
    field: &'static str,
) -> Result<T, DecodeError> {
    value.ok_or(DecodeError::MissingField { message, field })
}

pub(crate) fn as_string(value: &[u8], max: usize) -> Result<String, DecodeError> {
    bounded("string", value.len() as u64, max as u64)?;
    String::from_utf8(value.to_vec()).map_err(|_| DecodeError::Malformed("string is not UTF-8"))
}

/// A byte field of at most `max` bytes (a cheap slice of the body).
pub(crate) fn as_bounded_bytes(
    value: &Bytes,
    max: usize,
    what: &'static str,
) -> Result<Bytes, DecodeError> {
    bounded(what, value.len() as u64, max as u64)?;
    Ok(value.clone())
}

/// Appends one more item of a repeated field, refusing the item past `max`
/// before `item` decodes it.
pub(crate) fn push_bounded<T>(
    list: &mut Vec<T>,
    max: usize,
    what: &'static str,
    item: impl FnOnce() -> Result<T, DecodeError>,
) -> Result<(), DecodeError> {
    bounded(what, list.len() as u64 + 1, max as u64)?;
    list.push(item()?);
    Ok(())
}

pub(crate) fn as_array<const N: usize>(value: &[u8]) -> Result<[u8; N], DecodeError> {
    value
        .try_into()
        .map_err(|_| DecodeError::Malformed("fixed-size field has the wrong length"))
}

/// Most ranges in one range-set field.
pub const MAX_RANGES: usize = 64 * 1024;

/// A range set as a field value: `start, len` varint pairs.
pub(crate) fn encode_ranges(set: &RangeSet) -> Bytes {
    let mut b = BytesMut::new();
    for r in set.iter_ranges() {
        put_varint(&mut b, u64::from(r.start));
        put_varint(&mut b, u64::from(r.end - r.start));
    }
    b.freeze()
}

pub(crate) fn decode_ranges(mut v: &[u8]) -> Result<RangeSet, DecodeError> {
    // Collected, sorted, then inserted in order: O(n log n) whatever order a
    // peer sends them in (inserting out of order one by one is quadratic).
    let mut list = Vec::new();
    let mut n = 0usize;
    while !v.is_empty() {
        n += 1;
        bounded("range set", n as u64, MAX_RANGES as u64)?;
        let (start, a) = get_varint(v)?;
        let (len, b) = get_varint(&v[a..])?;
        v = &v[a + b..];
        let start =
            u32::try_from(start).map_err(|_| DecodeError::Malformed("range start out of range"))?;
        let end = u64::from(start) + len;
        let end =
            u32::try_from(end).map_err(|_| DecodeError::Malformed("range end out of range"))?;
        list.push(start..end);
    }
    list.sort_unstable_by_key(|r| r.start);
    let mut set = RangeSet::new();
    for r in list {
        set.insert_range(r);
    }
    Ok(set)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_roundtrip(v: u64) {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            let (got, n) = get_varint(&b).unwrap();
            prop_assert_eq!(got, v);
            prop_assert_eq!(n, b.len());
        }

        #[test]
        fn reader_never_panics(data: Vec<u8>) {
            let mut r = FieldReader::new(Bytes::from(data));
            for _ in 0..64 {
                match r.next_field() {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
    }

    #[test]
    fn varint_rejects_overflow() {
        let bad = [0xffu8; 11];
        assert!(get_varint(&bad).is_err());
        let mut max = BytesMut::new();
        put_varint(&mut max, u64::MAX);
        assert_eq!(get_varint(&max).unwrap().0, u64::MAX);
        let mut over = max.to_vec();
        over[9] = 0x02;
        assert!(get_varint(&over).is_err());
    }

    #[test]
    fn unknown_fields_are_visible_and_skippable() {
        let mut w = FieldWriter::new();
        w.u64(1, 7).str(99, "future").u64(2, 8);
        let mut r = FieldReader::new(w.finish().freeze());
        let mut seen = vec![];
        while let Some((tag, _)) = r.next_field().unwrap() {
            seen.push(tag);
        }
        assert_eq!(seen, vec![1, 99, 2]);
    }

    #[test]
    fn ranges_in_reverse_order_decode_quickly_and_merge() {
        // 64 K disjoint ranges, worst order for one-by-one insertion.
        let mut b = bytes::BytesMut::new();
        for i in (0..MAX_RANGES as u64).rev() {
            put_varint(&mut b, i * 2);
            put_varint(&mut b, 1);
        }
        let set = decode_ranges(&b).unwrap();
        assert_eq!(set.iter_ranges().count(), MAX_RANGES);
        // Overlapping and touching ranges, unordered, merge.
        let mut b = bytes::BytesMut::new();
        for (start, len) in [(10u64, 5u64), (0, 3), (3, 2), (12, 10)] {
            put_varint(&mut b, start);
            put_varint(&mut b, len);
        }
        let set = decode_ranges(&b).unwrap();
        assert_eq!(
            set.iter_ranges().cloned().collect::<Vec<_>>(),
            vec![0..5, 10..22]
        );
    }
}
