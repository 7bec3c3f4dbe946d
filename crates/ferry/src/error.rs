//! Errors of the engine, each with the class that decides the exit code and
//! whether a retry can help.

use std::io;

use ferry_proto::{FailureCode, ProtoError};

/// Who or what is at fault; maps to exit codes in the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller asked for something impossible (bad arguments, bad paths).
    Usage,
    /// Authentication or permission refused.
    Auth,
    /// The peer could not be reached or kept failing.
    Unreachable,
    /// Data did not verify.
    Integrity,
    /// Local file-system trouble.
    LocalIo,
    /// The peer broke the protocol or is incompatible.
    Protocol,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection to {addr} failed: {source}")]
    Io { addr: String, source: io::Error },
    /// A server could not bind its listening address.
    #[error("cannot listen on {addr}: {}", listen_reason(.source))]
    Listen { addr: String, source: io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server certificate fingerprint for {host} is {actual}, but {expected} was expected{}", fingerprint_hint(.file))]
    FingerprintMismatch {
        host: String,
        expected: String,
        actual: String,
        /// The known-servers file the expected fingerprint came from; `None`
        /// when it was given with `--fingerprint`.
        file: Option<String>,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("{path}: {source}")]
    LocalIo { path: String, source: io::Error },
    #[error("state store: {0}")]
    Store(String),
    /// The state store's file is damaged (a crash of the disk, a full disk):
    /// nothing is written on the strength of it.
    #[error("state store {path} is damaged ({detail}); nothing was written. Move it aside and run again (mv {path} {path}.damaged): transfers then start over from what the other side verified")]
    StoreDamaged { path: String, detail: String },
    #[error("source {path} changed during the transfer; it was restarted {times} times and kept changing")]
    SourceUnstable { path: String, times: u32 },
    #[error("{0}")]
    NotFound(String),
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: Box<Error> },
    /// SSH host key not in the known-hosts file (and `--accept-new-host-key` not given).
    #[error("host key of {host} ({fingerprint}) is not in {file}; pass --accept-new-host-key to trust and record it")]
    HostKeyUnknown {
        host: String,
        fingerprint: String,
        file: String,
    },
    /// SSH host key differs from the recorded one: always refused.
    #[error("HOST KEY OF {host} CHANGED: it is now {fingerprint}, but {file} line {line} records another key; refusing to connect (if the change is legitimate, remove that line)")]
    HostKeyChanged {
        host: String,
        fingerprint: String,
        file: String,
        line: usize,
    },
    /// No offered key (or agent identity) was accepted by the SSH server.
    #[error("{user}@{host}: authentication refused ({tried})")]
    SshAuth {
        user: String,
        host: String,
        tried: String,
    },
    /// The SSH transport failed (connection lost, timeout, protocol error).
    #[error("ssh {host}: {msg}")]
    Ssh { host: String, msg: String },
    /// The SFTP server answered a request with an error status.
    #[error("sftp {op} {path}: {msg}")]
    SftpStatus {
        op: &'static str,
        path: String,
        /// The SFTP status code (2 no such file, 3 permission denied, 4 failure, 8 unsupported).
        code: u32,
        msg: String,
    },
    /// An SFTP write failed and the server's file system is (nearly) full.
    #[error("no space left on {host}:{path} ({avail} bytes free there); free some space and run the copy again (it resumes)")]
    NoSpace {
        host: String,
        path: String,
        avail: u64,
    },
    /// The SSH host key is marked `@revoked` in the known-hosts file: always refused.
    #[error("host key of {host} ({fingerprint}) is marked @revoked in {file} line {line}; refusing to connect")]
    HostKeyRevoked {
        host: String,
        fingerprint: String,
        file: String,
        line: usize,
    },
    /// Some files could not be copied (each was reported on its own line);
    /// the rest were. `summary` tells what was copied.
    #[error("{failed} file(s) could not be copied (see the errors above); {} copied", summary.files)]
    NotAllCopied {
        failed: u64,
        summary: Box<crate::report::CopySummary>,
    },
    /// Data on the SFTP server did not verify after it was written.
    #[error("sftp {path}: verification failed: {detail}")]
    SftpIntegrity { path: String, detail: String },
}

/// What to do about a fingerprint mismatch, by where the expected one came from.
fn fingerprint_hint(file: &Option<String>) -> String {
    match file {
        Some(f) => format!(
            " (known servers file: {f}); if the server's key really changed, remove that line"
        ),
        None => " (given with --fingerprint); check the value, or ask the server's operator for `ferry serve`'s fingerprint line".into(),
    }
}

impl Error {
    pub fn local(path: impl AsRef<std::path::Path>, source: io::Error) -> Self {
        Error::LocalIo {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// Whether reconnecting and resuming can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Io { .. } | Error::Timeout(_) => true,
            Error::Tls(_) => true,
            Error::Proto(p) => p.is_retryable(),
            Error::LocalIo { .. } | Error::Usage(_) | Error::FingerprintMismatch { .. } => false,
            Error::Listen { .. } => false,
            Error::Store(_) | Error::SourceUnstable { .. } | Error::NotFound(_) => false,
            Error::StoreDamaged { .. } => false,
            Error::RetriesExhausted { .. } => false,
            Error::Ssh { .. } => true,
            Error::HostKeyUnknown { .. } | Error::HostKeyChanged { .. } | Error::SshAuth { .. } => {
                false
            }
            Error::SftpStatus { .. } | Error::SftpIntegrity { .. } => false,
            Error::NoSpace { .. } | Error::HostKeyRevoked { .. } | Error::NotAllCopied { .. } => {
                false
            }
        }
    }

    /// The peer's "try again no sooner than" hint, if it gave one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Proto(ProtoError::Remote(f)) => {
                f.retry_after_ms.map(std::time::Duration::from_millis)
            }
            Error::RetriesExhausted { last, .. } => last.retry_after(),
            _ => None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Usage(_) | Error::NotFound(_) => ErrorClass::Usage,
            Error::Connect { .. } | Error::Io { .. } | Error::Timeout(_) | Error::Tls(_) => {
                ErrorClass::Unreachable
            }
            Error::FingerprintMismatch { .. } => ErrorClass::Auth,
            Error::LocalIo { .. }
            | Error::Store(_)
            | Error::StoreDamaged { .. }
            | Error::Listen { .. } => ErrorClass::LocalIo,
            Error::SourceUnstable { .. } => ErrorClass::Integrity,
            Error::HostKeyUnknown { .. } | Error::HostKeyChanged { .. } | Error::SshAuth { .. } => {
                ErrorClass::Auth
            }
            Error::Ssh { .. } => ErrorClass::Unreachable,
            Error::SftpStatus { code: 2, .. } => ErrorClass::Usage,
            Error::SftpStatus { code: 3, .. } => ErrorClass::Auth,
            Error::SftpStatus { .. } => ErrorClass::Protocol,
            Error::SftpIntegrity { .. } => ErrorClass::Integrity,
            Error::NoSpace { .. } => ErrorClass::LocalIo,
            Error::HostKeyRevoked { .. } => ErrorClass::Auth,
            // Names that cannot be carried, or two sources for one destination.
            Error::NotAllCopied { .. } => ErrorClass::Usage,
            Error::RetriesExhausted { last, .. } => match last.class() {
                ErrorClass::Protocol => ErrorClass::Unreachable,
                c => c,
            },
            Error::Proto(p) => match p {
                ProtoError::IntegrityFailure { .. }
                | ProtoError::DigestMismatch { .. }
                | ProtoError::ChunkRejectedRepeatedly { .. } => ErrorClass::Integrity,
                ProtoError::SourceChanged { .. } => ErrorClass::Integrity,
                ProtoError::Remote(f) => match f.code {
                    FailureCode::Unauthorized | FailureCode::PermissionDenied => ErrorClass::Auth,
                    FailureCode::BadRequest | FailureCode::NotFound => ErrorClass::Usage,
                    FailureCode::Integrity => ErrorClass::Integrity,
                    FailureCode::NoSpace | FailureCode::Io => ErrorClass::LocalIo,
                    FailureCode::Busy
                    | FailureCode::Internal
                    | FailureCode::InsufficientStorage => ErrorClass::Unreachable,
                    _ => ErrorClass::Protocol,
                },
                _ => ErrorClass::Protocol,
            },
        }
    }
}

/// Why a bind failed, in words for whoever started the server.
fn listen_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use".into(),
        io::ErrorKind::AddrNotAvailable => "no such address on this host".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Corrupted(detail) => damaged(detail),
            e => Error::Store(e.to_string()),
        }
    }
}

/// A damaged store; the file's path is filled in by the store's guard.
fn damaged(detail: String) -> Error {
    Error::StoreDamaged {
        path: String::new(),
        detail,
    }
}

impl From<redb::StorageError> for Error {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Corrupted(detail) => damaged(detail),
            e => Error::Store(e.to_string()),
        }
    }
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                match e.into() {
                    redb::Error::Corrupted(detail) => damaged(detail),
                    e => Error::Store(e.to_string()),
                }
            }
        }
    )*};
}
store_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
