//! The sans-IO core of ferry's file-transfer protocol.
//!
//! Nothing in this crate touches a socket, a file, a clock or a global RNG:
//! the drivers in the `ferry` crate feed it bytes and `now`, and do what it says.
//!
//! A tour of the modules:
//! * [`message`]: frames and messages, their encoding and bounded decoding.
//! * `wire` (private): the field encoding inside a message body, and [`DecodeError`].
//! * `failure` (private): [`Failure`] and [`FailureCode`], the error report peers exchange.
//! * [`handshake`]: version and capability negotiation.
//! * [`chunk`]: how a file is cut into chunks ([`ChunkLayout`]).
//! * [`ranges`]: sets of chunk indices ([`RangeSet`]), the currency of resume.
//! * [`hash`]: content hashes, position-bound chunk tags, the whole-file digest.
//! * [`sender`] and [`receiver`]: the two state machines of one file transfer.
//! * [`retry`] and [`breaker`]: when to try again, and when to stop trying a peer for a while.
//! * [`error`]: errors, grouped by who is at fault, each saying whether a retry can help.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod chunk;
pub mod error;
mod failure;
pub mod handshake;
pub mod hash;
pub mod message;
pub mod ranges;
pub mod receiver;
pub mod retry;
pub mod sender;
mod wire;

pub use wire::DecodeError;

pub use chunk::ChunkLayout;
pub use error::{Incompatibility, Misbehavior, ProtoError};
pub use failure::{Failure, FailureCode};
pub use hash::{ChunkHash, HashAlg, TransferId};
pub use message::{DataHeader, FrameDecoder, Message};
pub use ranges::RangeSet;
pub use receiver::{DataVerdict, Receiver, ReceiverConfig, ReceiverEvent};
pub use sender::{Sender, SenderConfig, SenderEvent, Transmit};
