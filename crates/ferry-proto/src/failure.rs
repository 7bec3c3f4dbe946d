//! Why a request or a transfer failed, as the peers tell each other.
//!
//! A leaf: the wire messages carry a [`Failure`], and [`crate::ProtoError`]
//! wraps one the peer reported.

/// Longest free-text message.
pub(crate) const MAX_TEXT: usize = 4096;

/// Why a request or a transfer failed, as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureCode {
    BadRequest,
    Unauthorized,
    PermissionDenied,
    NotFound,
    Busy,
    Io,
    NoSpace,
    Integrity,
    SourceChanged,
    VersionRefused,
    Internal,
    Protocol,
    /// The receiver's disk is nearly full: no new uploads for now (retry later).
    InsufficientStorage,
    /// A code this version does not know.
    Other(u64),
}

impl FailureCode {
    pub fn to_u64(self) -> u64 {
        match self {
            FailureCode::BadRequest => 1,
            FailureCode::Unauthorized => 2,
            FailureCode::PermissionDenied => 3,
            FailureCode::NotFound => 4,
            FailureCode::Busy => 5,
            FailureCode::Io => 6,
            FailureCode::NoSpace => 7,
            FailureCode::Integrity => 8,
            FailureCode::SourceChanged => 9,
            FailureCode::VersionRefused => 10,
            FailureCode::Internal => 11,
            FailureCode::Protocol => 12,
            FailureCode::InsufficientStorage => 13,
            FailureCode::Other(v) => v,
        }
    }

    pub fn from_u64(v: u64) -> Self {
        match v {
            1 => FailureCode::BadRequest,
            2 => FailureCode::Unauthorized,
            3 => FailureCode::PermissionDenied,
            4 => FailureCode::NotFound,
            5 => FailureCode::Busy,
            6 => FailureCode::Io,
            7 => FailureCode::NoSpace,
            8 => FailureCode::Integrity,
            9 => FailureCode::SourceChanged,
            10 => FailureCode::VersionRefused,
            11 => FailureCode::Internal,
            12 => FailureCode::Protocol,
            13 => FailureCode::InsufficientStorage,
            v => FailureCode::Other(v),
        }
    }

    /// Whether a later attempt can succeed without anyone changing anything.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureCode::Busy
                | FailureCode::Io
                | FailureCode::Internal
                | FailureCode::SourceChanged
                | FailureCode::Protocol
                | FailureCode::InsufficientStorage
        )
    }
}

/// An error report carried by a `Failure` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
    /// A hint from the peer: try again no sooner than this.
    pub retry_after_ms: Option<u64>,
}

impl Failure {
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_TEXT {
            let mut cut = MAX_TEXT;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Failure {
            code,
            message,
            retry_after_ms: None,
        }
    }
}
