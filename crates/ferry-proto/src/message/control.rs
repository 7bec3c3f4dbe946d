//! Messages outside any request: `Failure`, `Ok`, and the `Ping`/`Pong` keepalive.

use super::Message;
use crate::failure::{Failure, FailureCode, MAX_TEXT};
use crate::wire::{as_string, as_u64, DecodeError, FieldReader, FieldWriter};

pub(super) fn encode_failure(w: &mut FieldWriter, f: &Failure) {
    w.u64(1, f.code.to_u64()).str(2, &f.message);
    if let Some(ms) = f.retry_after_ms {
        w.u64(3, ms);
    }
}

pub(super) fn decode_failure(mut r: FieldReader) -> Result<Message, DecodeError> {
    let mut f = Failure::new(FailureCode::Other(0), "");
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => f.code = FailureCode::from_u64(as_u64(&v)?),
            2 => f.message = as_string(&v, MAX_TEXT)?,
            3 => f.retry_after_ms = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok(Message::Failure(f))
}

/// `Ok` has no body.
pub(super) fn encode_ok(_: &mut FieldWriter) {}

pub(super) fn decode_ok(_: FieldReader) -> Result<Message, DecodeError> {
    Ok(Message::Ok)
}

pub(super) fn encode_ping(w: &mut FieldWriter, nonce: &u64, received: &Option<u64>) {
    w.u64(1, *nonce);
    if let Some(n) = received {
        w.u64(2, *n);
    }
}

/// The body of `Ping` and `Pong`: a nonce, and for `Ping` the bytes received.
fn decode_keepalive(mut r: FieldReader) -> Result<(u64, Option<u64>), DecodeError> {
    let (mut nonce, mut received) = (0, None);
    while let Some((tag, v)) = r.next_field()? {
        match tag {
            1 => nonce = as_u64(&v)?,
            2 => received = Some(as_u64(&v)?),
            _ => {}
        }
    }
    Ok((nonce, received))
}

pub(super) fn decode_ping(r: FieldReader) -> Result<Message, DecodeError> {
    let (nonce, received) = decode_keepalive(r)?;
    Ok(Message::Ping { nonce, received })
}

pub(super) fn encode_pong(w: &mut FieldWriter, nonce: &u64) {
    w.u64(1, *nonce);
}

pub(super) fn decode_pong(r: FieldReader) -> Result<Message, DecodeError> {
    let (nonce, _) = decode_keepalive(r)?;
    Ok(Message::Pong { nonce })
}
