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
    PeerMisbehaved(#[source] Misbehavior),
    /// The peer speaks a version, or uses an algorithm, we do not support.
    #[error("incompatible peer: {0}")]
    Incompatible(#[source] Incompatibility),
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

/// How the peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Misbehavior {
    /// A frame could not be decoded.
    #[error("{0}")]
    Decode(#[source] DecodeError),
    /// A message with no place where it arrived; `context` says where
    /// ("during a transfer", "between requests", ...).
    #[error("unexpected {got} {context}")]
    UnexpectedMessage {
        got: &'static str,
        context: &'static str,
    },
    /// A message the exchange knows, at a moment it does not allow.
    #[error("{message} {when}")]
    OutOfOrder {
        message: &'static str,
        when: &'static str,
    },
    /// The first frame of a connection was not `Hello`.
    #[error("first frame was not Hello")]
    FirstFrameNotHello,
    /// A message names a chunk past the end of the file.
    #[error("{message} names a chunk past the end of the file")]
    ChunkPastEnd { message: &'static str },
    /// `Agreed` names chunks the receiver did not offer.
    #[error("Agreed names chunks that were not offered")]
    AgreedNotOffered,
    /// A `Data` frame does not fit the file's chunk layout.
    #[error(
        "Data for chunk {index} at offset {offset} with {len} bytes does not fit the file layout"
    )]
    DataOutsideLayout { index: u32, offset: u64, len: usize },
    /// The driver reported reading a chunk the sender did not ask for.
    #[error("driver reported chunk {index} it was not asked for")]
    UnrequestedChunk { index: u32 },
    /// The file's announced chunk size does not suit its size.
    #[error("unacceptable chunk size {chunk_size} for {size} bytes")]
    BadChunkSize { chunk_size: u32, size: u64 },
    /// A batch message names a file past the end of the batch.
    #[error("{message} names a file beyond the batch")]
    BatchIndexOutOfRange { message: &'static str },
    /// Content of a batch file that was not asked for, or came twice.
    #[error("batch data for file {index}, which was not asked for")]
    BatchDataUnasked { index: u32 },
    /// The batch was committed before every file asked for arrived.
    #[error("batch committed with files missing")]
    BatchIncomplete,
    /// A batch answer repeats a file, or names it differently.
    #[error("batch answer: file {index} twice, or under another name")]
    BatchItemRepeated { index: u32 },
    /// A batch answer says a file is unchanged that the client does not hold.
    #[error("batch answer: no content for file {index}, which we do not hold")]
    BatchItemWithoutContent { index: u32 },
    /// A batch answer carries far more data than its files' sizes.
    #[error("batch answer: far more data than asked for ({received} > {budget} bytes)")]
    BatchOverBudget { received: u64, budget: u64 },
}

/// What the peer and this build do not share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Incompatibility {
    /// Negotiation found no common version; the failure is the one sent to the peer.
    #[error("{}", .0.message)]
    Version(Failure),
    /// The peer hashes chunks with an algorithm this build does not know.
    #[error("unknown hash algorithm {0:?}")]
    UnknownHashAlg(String),
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

    /// The peer sent `got` where it has no place (`context`: "during a transfer", ...).
    pub fn unexpected(got: &'static str, context: &'static str) -> Self {
        ProtoError::PeerMisbehaved(Misbehavior::UnexpectedMessage { got, context })
    }

    /// The peer sent `message` at a moment that does not allow it (`when`: "outside the data phase", ...).
    pub fn out_of_order(message: &'static str, when: &'static str) -> Self {
        ProtoError::PeerMisbehaved(Misbehavior::OutOfOrder { message, when })
    }
}

impl From<Misbehavior> for ProtoError {
    fn from(m: Misbehavior) -> Self {
        ProtoError::PeerMisbehaved(m)
    }
}

impl From<Incompatibility> for ProtoError {
    fn from(i: Incompatibility) -> Self {
        ProtoError::Incompatible(i)
    }
}

impl From<DecodeError> for ProtoError {
    fn from(e: DecodeError) -> Self {
        ProtoError::PeerMisbehaved(Misbehavior::Decode(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureCode;

    /// The texts users see stay what they were when these errors were strings.
    #[test]
    fn typed_errors_read_as_before() {
        let cases: Vec<(ProtoError, &str)> = vec![
            (
                DecodeError::Malformed("empty frame").into(),
                "peer violated the protocol: malformed message: empty frame",
            ),
            (
                ProtoError::unexpected("Ack", "during a transfer"),
                "peer violated the protocol: unexpected Ack during a transfer",
            ),
            (
                ProtoError::out_of_order("Done", "outside the data phase"),
                "peer violated the protocol: Done outside the data phase",
            ),
            (
                Misbehavior::ChunkPastEnd { message: "Need" }.into(),
                "peer violated the protocol: Need names a chunk past the end of the file",
            ),
            (
                Misbehavior::BadChunkSize {
                    chunk_size: 7,
                    size: 9,
                }
                .into(),
                "peer violated the protocol: unacceptable chunk size 7 for 9 bytes",
            ),
            (
                Incompatibility::UnknownHashAlg("md5".into()).into(),
                "incompatible peer: unknown hash algorithm \"md5\"",
            ),
            (
                Incompatibility::Version(Failure::new(
                    FailureCode::VersionRefused,
                    "no common protocol version",
                ))
                .into(),
                "incompatible peer: no common protocol version",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn retryable_answers_are_those_of_the_string_errors() {
        assert!(ProtoError::from(Misbehavior::BatchIncomplete).is_retryable());
        assert!(ProtoError::from(DecodeError::UnknownFrame(9)).is_retryable());
        assert!(!ProtoError::from(Incompatibility::UnknownHashAlg("x".into())).is_retryable());
    }

    #[test]
    fn a_decode_error_stays_in_the_source_chain() {
        use std::error::Error;
        let e = ProtoError::from(DecodeError::UnknownFrame(9));
        let m = e.source().expect("a misbehavior");
        let d = m.source().expect("a decode error");
        assert_eq!(
            d.downcast_ref::<DecodeError>(),
            Some(&DecodeError::UnknownFrame(9))
        );
    }
}
