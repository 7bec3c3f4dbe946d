//! What a copy reports: the summary of a run and, for SFTP copies, what
//! happened to each file. A leaf: the engine's modules and its errors use
//! these types, and they use none of the engine's.

/// What a copy did, for `--json` and the closing line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopySummary {
    pub files: u64,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub bytes_resumed: u64,
    pub retries: u64,
    /// Extra connections opened to carry large files' data (`--streams`).
    pub data_lanes: u64,
    /// Most files moved at once, each on its own connection (`--streams`).
    pub files_at_once: u64,
    pub duration_s: f64,
    /// The whole-file digest for one file; for several, a digest over (path, digest) pairs.
    pub digest: String,
    pub alg: String,
    /// Symlinks and special files left out of trees (each was warned about).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
    /// SFTP copies: what happened to each file (fresh, resumed, repaired, ...)
    /// and how it was verified. Empty, and absent from JSON, for native copies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_file: Vec<FileReport>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How a file's transfer began, relative to an earlier interrupted one.
/// Serialized with `outcome` as the tag: `{"outcome":"resumed","offset":16777216}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Resume {
    /// No earlier attempt was recorded: sent from byte 0.
    Fresh,
    /// The recorded prefix verified; sending went on from `offset`.
    Resumed { offset: u64 },
    /// An earlier attempt was recorded but nothing of it could be used.
    Restarted { reason: RestartReason },
    /// The partial failed verification near its end: walked back to the last
    /// range that verified and rewrote from `offset` (the record had reached `recorded`).
    Repaired { offset: u64, recorded: u64 },
    /// The server cannot write at an offset into an existing file: sent from
    /// byte 0. `refused_offset` is the probe it refused; absent when the host
    /// was already remembered as such.
    FallbackRestart {
        #[serde(skip_serializing_if = "Option::is_none")]
        refused_offset: Option<u64>,
    },
    /// Every range was already written and recorded (a stop between the last
    /// range and the rename): nothing was sent, the partial was verified and renamed.
    AlreadyComplete,
}

/// Why [`Resume::Restarted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartReason {
    /// The source (local file for an upload, remote file for a download)
    /// differs from the one the partial was made from.
    SourceChanged,
    /// Not even the first recorded range of the partial verified (or the
    /// partial is gone).
    PartialUnusable,
}

impl std::fmt::Display for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::Fresh => write!(f, "fresh"),
            Resume::Resumed { offset } => write!(f, "resumed from byte {offset}"),
            Resume::Restarted {
                reason: RestartReason::SourceChanged,
            } => write!(f, "restarted (source changed)"),
            Resume::Restarted {
                reason: RestartReason::PartialUnusable,
            } => write!(f, "restarted (partial unusable)"),
            Resume::Repaired { offset, recorded } => write!(
                f,
                "repaired (partial verified only up to byte {offset} of {recorded} recorded; rewrote from there)"
            ),
            Resume::FallbackRestart {
                refused_offset: Some(o),
            } => write!(
                f,
                "fallback_restart (server refused a write at offset {o}; sent from byte 0)"
            ),
            Resume::FallbackRestart { refused_offset: None } => write!(
                f,
                "fallback_restart (server known not to write at an offset; sent from byte 0)"
            ),
            Resume::AlreadyComplete => write!(f, "already_complete (nothing to send)"),
        }
    }
}

/// How the finished file was checked before it was renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VerifiedBy {
    /// `--verify size|mtime`: its size only.
    #[serde(rename = "size")]
    Size,
    /// Ranges read back and compared with the BLAKE3 digests of what was sent.
    #[serde(rename = "readback")]
    Readback,
    /// The server hashed the ranges itself (`check-file-handle` extension).
    #[serde(rename = "check-file")]
    CheckFile,
    /// The server ran `b3sum` over the ranges (SSH exec channel).
    #[serde(rename = "b3sum")]
    B3sum,
    /// The server ran `openssl dgst -sha256` over the ranges (SSH exec channel).
    #[serde(rename = "openssl-sha256")]
    OpensslSha256,
    /// The server ran `sha256sum` over the ranges (SSH exec channel).
    #[serde(rename = "sha256sum")]
    Sha256sum,
    /// The server ran `shasum -a 256` over the ranges (SSH exec channel).
    #[serde(rename = "shasum")]
    Shasum,
}

impl VerifiedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifiedBy::Size => "size",
            VerifiedBy::Readback => "readback",
            VerifiedBy::CheckFile => "check-file",
            VerifiedBy::B3sum => "b3sum",
            VerifiedBy::OpensslSha256 => "openssl-sha256",
            VerifiedBy::Sha256sum => "sha256sum",
            VerifiedBy::Shasum => "shasum",
        }
    }
}

/// One file of an SFTP copy, for `--json` (`per_file`) and the human output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    /// Where the file was written: the `sftp://` URL of an upload, the local path of a download.
    pub path: String,
    #[serde(flatten)]
    pub resume: Resume,
    pub verified_by: VerifiedBy,
}

impl std::fmt::Display for FileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}; verified by {}",
            self.path,
            self.resume,
            self.verified_by.as_str()
        )
    }
}
