//! Splitting frames off a byte stream: [`FrameDecoder`] checks a frame's
//! length against the bounds before it is buffered, then hands its body to
//! [`Message::decode`]; a driver may take a `Data` frame's payload straight
//! into memory of its own ([`FrameDecoder::data_header`]).

use bytes::{Buf, BytesMut};

use super::{kind, DataHeader, DecodeError, Message, MAX_CONTROL_FRAME, MAX_FRAME};
use crate::hash::ChunkHash;
use crate::wire::{as_array, as_u32, as_u64, bounded, get_varint};

/// Splits frames off a byte buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// A tighter bound on any frame than the protocol's, while one is set
    /// (a server sets one until the client has authenticated).
    limit: Option<u32>,
}

/// The largest frame a server reads before the client has authenticated
/// (a `Hello` is a few hundred bytes).
pub const MAX_UNAUTHENTICATED_FRAME: u32 = 64 * 1024;

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds every frame to `limit` bytes (`None`: the protocol's bounds).
    pub fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }

    /// How many bytes the next frame needs in total, if its header is buffered;
    /// lets a driver reserve exactly once for a large frame.
    pub fn needed(buf: &[u8]) -> Option<usize> {
        if buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let cap = if buf[4] == kind::Data {
            MAX_FRAME
        } else {
            MAX_CONTROL_FRAME + 1
        };
        Some(4 + len.min(cap) as usize)
    }

    /// Whether `buf` starts with (the first bytes of) a `Data` frame.
    pub fn starts_data(buf: &[u8]) -> bool {
        buf.get(4) == Some(&kind::Data)
    }

    /// The header of a `Data` frame at the front of `buf`, once it is
    /// buffered, when the payload is the frame's last field (as
    /// [`super::encode_data_header`] writes it): a driver may then read the payload
    /// straight into memory of its own. `None` for anything else (another
    /// frame, a header not yet whole, a field after the payload, a frame over
    /// a bound): [`FrameDecoder::decode`] takes those, and its errors.
    pub fn data_header(&self, buf: &[u8]) -> Option<DataHeader> {
        let head = buf.get(..5)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if head[4] != kind::Data
            || len == 0
            || len > MAX_FRAME
            || self.limit.is_some_and(|l| len > l)
        {
            return None;
        }
        let end = 4 + len as usize;
        let (mut index, mut offset, mut tag) = (None, None, None);
        let mut pos = 5;
        loop {
            let (field, a) = get_varint(buf.get(pos..)?).ok()?;
            let (flen, b) = get_varint(buf.get(pos + a..)?).ok()?;
            let start = pos + a + b;
            let flen = usize::try_from(flen).ok()?;
            if field == 4 {
                if start.checked_add(flen)? != end {
                    return None;
                }
                return Some(DataHeader {
                    index: index?,
                    offset: offset?,
                    tag: tag?,
                    payload_start: start,
                    payload_len: flen,
                });
            }
            let value = buf.get(start..start.checked_add(flen)?)?;
            match field {
                1 => index = Some(as_u32(value).ok()?),
                2 => offset = Some(as_u64(value).ok()?),
                3 => tag = Some(ChunkHash(as_array(value).ok()?)),
                _ => {}
            }
            pos = start + flen;
            if pos >= end {
                return None;
            }
        }
    }

    /// Takes one message off the front of `buf`. `Ok(None)` means more bytes
    /// are needed; optional frames of unknown type are consumed and skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        loop {
            if buf.len() < 5 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len == 0 {
                return Err(DecodeError::Malformed("empty frame"));
            }
            bounded("frame", u64::from(len), u64::from(MAX_FRAME))?;
            if let Some(limit) = self.limit {
                bounded(
                    "frame before authentication",
                    u64::from(len),
                    u64::from(limit),
                )?;
            }
            let kind = buf[4];
            if kind != kind::Data && len > MAX_CONTROL_FRAME + 1 {
                return Err(DecodeError::TooLarge {
                    what: "control frame",
                    len: u64::from(len),
                    max: u64::from(MAX_CONTROL_FRAME),
                });
            }
            if buf.len() < 4 + len as usize {
                return Ok(None);
            }
            buf.advance(5);
            let body = buf.split_to(len as usize - 1).freeze();
            if let Some(m) = Message::decode(kind, body)? {
                return Ok(Some(m));
            }
        }
    }
}
