//! `Hello` and `Welcome`: the first frame each way, and the [`Version`] they carry.

use bytes::Bytes;

use super::{Message, MAX_LIST, MAX_TOKEN};
use crate::wire::{
    as_bounded_bytes, as_string, as_u64, required, DecodeError, FieldReader, FieldWriter,
};

/// A protocol version; peers must share the major number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    fn to_u64(self) -> u64 {
        (u64::from(self.major) << 16) | u64::from(self.minor)
    }
    fn from_u64(v: u64) -> Result<Self, DecodeError> {
        if v > u64::from(u32::MAX) {
            return Err(DecodeError::Malformed("version out of range"));
        }
        Ok(Version {
            major: (v >> 16) as u16,
            minor: v as u16,
        })
    }
}

pub(super) fn encode_hello(
    w: &mut FieldWriter,
    versions: &[Version],
    caps: &[String],
    token: &[u8],
    agent: &str,
    stall_ms: &Option<u64>,
) {
    for v in versions {
        w.u64(1, v.to_u64());
    }
    for c in caps {
        w.str(2, c);
    }
    w.bytes(3, token).str(4, agent);
    if let Some(ms) = stall_ms {
        w.u64(5, *ms);
    }
}

pub(super) fn decode_hello(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut versions, mut caps, mut token, mut agent, mut stall_ms) =
        (vec![], vec![], Bytes::new(), String::new(), None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 if versions.len() < MAX_LIST => versions.push(Version::from_u64(as_u64(&v)?)?),
            2 if caps.len() < MAX_LIST => caps.push(as_string(&v, 64)?),
            3 => token = as_bounded_bytes(&v, MAX_TOKEN, "token")?,
            4 => agent = as_string(&v, 256)?,
            5 => stall_ms = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok(Message::Hello {
        versions,
        caps,
        token,
        agent,
        stall_ms,
    })
}

pub(super) fn encode_welcome(
    w: &mut FieldWriter,
    version: &Version,
    caps: &[String],
    server: &str,
    stall_ms: &Option<u64>,
) {
    w.u64(1, version.to_u64());
    for c in caps {
        w.str(2, c);
    }
    w.str(3, server);
    if let Some(ms) = stall_ms {
        w.u64(4, *ms);
    }
}

pub(super) fn decode_welcome(mut r: FieldReader) -> Result<Message, DecodeError> {
    let (mut version, mut caps, mut server, mut stall_ms) = (None, vec![], String::new(), None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => version = Some(Version::from_u64(as_u64(&v)?)?),
            2 if caps.len() < MAX_LIST => caps.push(as_string(&v, 64)?),
            3 => server = as_string(&v, 256)?,
            4 => stall_ms = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok(Message::Welcome {
        version: required(version, "Welcome", "version")?,
        caps,
        server,
        stall_ms,
    })
}
