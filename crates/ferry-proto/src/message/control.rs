//! Messages outside any request: `Failure`, `Ok`, and the `Ping`/`Pong` keepalive.

use super::{kind, Message};
use crate::failure::{Failure, FailureCode, MAX_TEXT};
use crate::wire::{as_string, as_u64, DecodeError, FieldReader, FieldWriter};

pub(super) fn encode(m: &Message, w: &mut FieldWriter) -> u8 {
    match m {
        Message::Failure(f) => {
            w.u64(1, f.code.to_u64()).str(2, &f.message);
            if let Some(ms) = f.retry_after_ms {
                w.u64(3, ms);
            }
            kind::FAILURE
        }
        Message::Ok => kind::OK,
        Message::Ping { nonce, received } => {
            w.u64(1, *nonce);
            if let Some(n) = received {
                w.u64(2, *n);
            }
            kind::PING
        }
        Message::Pong { nonce } => {
            w.u64(1, *nonce);
            kind::PONG
        }
        other => unreachable!("{} is not a control message", other.name()),
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

pub(super) fn decode_pong(r: FieldReader) -> Result<Message, DecodeError> {
    let (nonce, _) = decode_keepalive(r)?;
    Ok(Message::Pong { nonce })
}
