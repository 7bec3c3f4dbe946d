//! `ferry cp`: planning a copy of files and trees, and running it under one
//! runner so that it finishes across dropped connections.
//!
//! * `runner`: retries, backoff, circuit breakers and status records, for
//!   every endpoint kind. An endpoint kind implements its small `Endpoint`
//!   trait (who the peer is, how to connect) and never retries by itself.
//! * `native`: the `ferry://` kind (batches, chunked files, parallel files).
//! * `sftp`: the `sftp://` kind (per-file resumable, verified transfers).
//!
//! Adding a scheme: its module here (planning, jobs, an `Endpoint`), one
//! line in [`copy`] choosing it, and the CLI's URL handling.

mod native;
mod runner;
mod sftp;

use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::HashAlg;

use crate::client::ClientConfig;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::retry::RetryPolicy;

pub use native::{Endpoint, DEFAULT_PORT};

/// Options of one copy run.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub recursive: bool,
    /// Follow symlinks met inside trees (`-L`), with loop detection; by
    /// default they are skipped with a warning (see [`crate::walk`]).
    pub follow_links: bool,
    pub state_dir: PathBuf,
    pub client: ClientConfig,
    pub retry: RetryPolicy,
    pub alg: HashAlg,
    /// Seed of the retry jitter; `None` draws one from the OS. Tests and
    /// simulations fix it so a run can be replayed.
    pub seed: Option<u64>,
    /// How `sftp://` endpoints are reached and verified.
    pub sftp: crate::sftp::SftpOptions,
}

pub use crate::report::CopySummary;

impl CopyOptions {
    /// How local trees are walked for an upload.
    pub fn walk(&self) -> crate::walk::WalkOptions {
        crate::walk::WalkOptions {
            recursive: self.recursive,
            follow_links: self.follow_links,
        }
    }
}

/// Runs a copy; `progress` is updated as it goes.
pub async fn copy(
    srcs: &[String],
    dst: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopySummary> {
    if srcs.is_empty() {
        return Err(Error::Usage("nothing to copy".into()));
    }
    if dst.starts_with("sftp://") || srcs.iter().any(|s| s.starts_with("sftp://")) {
        return sftp::copy(srcs, dst, opts, progress).await;
    }
    native::copy(srcs, dst, opts, progress).await
}

/// The summary, or [`Error::NotAllCopied`] carrying it when some files
/// could not be copied.
pub(crate) fn finish(summary: CopySummary, failed: u64) -> Result<CopySummary> {
    if failed > 0 {
        return Err(Error::NotAllCopied {
            failed,
            summary: Box::new(summary),
        });
    }
    Ok(summary)
}
