//! Errors of the protocol core, grouped by who is at fault.

use crate::failure::Failure;
use crate::hash::ChunkHash;
pub use crate::wire::DecodeError;

/// Why a transfer could not go on, as seen by the protocol core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The peer violated the protocol (bad frame, wrong state, out-of-range chunk).
    #[error("peer violated the protocol: {0}")]
    PeerMisbehaved(String),
    /// The peer speaks a version we do not support.
    #[error("incompatible peer: {0}")]
    Incompatible(String),
    /// The same chunk failed verification repeatedly.
    #[error("integrity failure on chunk {chunk}: expected {expected}, got {actual}")]
    IntegrityFailure {
        chunk: u32,
        expected: ChunkHash,
        actual: ChunkHash,
    },
    /// The whole-file digest did not match after every chunk verified.
    #[error("whole-file digest mismatch: sender {expected}, receiver {actual}")]
    DigestMismatch {
        expected: ChunkHash,
        actual: ChunkHash,
    },
    /// A chunk was rejected by the receiver too many times.
    #[error("chunk {chunk} was rejected {times} times by the receiver")]
    ChunkRejectedRepeatedly { chunk: u32, times: u32 },
    /// The source changed while it was being sent.
    #[error("source changed during the transfer (chunk {chunk} hashed differently)")]
    SourceChanged { chunk: u32 },
    /// The peer reported an error.
    #[error("peer reported: {0}")]
    Remote(Failure),
}

impl ProtoError {
    /// Whether trying again (reconnecting and resuming) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProtoError::PeerMisbehaved(_) => true,
            ProtoError::Incompatible(_) => false,
            ProtoError::IntegrityFailure { .. } => false,
            ProtoError::DigestMismatch { .. } => false,
            ProtoError::ChunkRejectedRepeatedly { .. } => false,
            ProtoError::SourceChanged { .. } => true,
            ProtoError::Remote(f) => f.code.is_retryable(),
        }
    }
}

impl From<DecodeError> for ProtoError {
    fn from(e: DecodeError) -> Self {
        ProtoError::PeerMisbehaved(e.to_string())
    }
}
