//! Records of the transfers this machine started, one small JSON file each
//! under `STATE_DIR/transfers/`, replaced atomically. `ferry status` reads them
//! without touching the database a running transfer holds.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// A transfer this machine started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: String,
    /// "upload" or "download".
    pub direction: String,
    pub local: String,
    pub remote: String,
    pub size: u64,
    pub bytes_done: u64,
    pub state: RecordState,
    pub last_error: Option<String>,
    pub updated_unix: u64,
    /// Process that last worked on it.
    pub pid: u32,
    /// Hex identity of the source version being sent (uploads).
    #[serde(default)]
    pub source: String,
}

/// Where an unfinished transfer stands (`active` in JSON, and so on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// A process is working on it.
    Active,
    /// Its last attempt was cut off; a retry can finish it.
    Interrupted,
    /// It failed in a way a retry does not mend.
    Failed,
    Complete,
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            RecordState::Active => "active",
            RecordState::Interrupted => "interrupted",
            RecordState::Failed => "failed",
            RecordState::Complete => "complete",
        })
    }
}

/// The folder of transfer records.
#[derive(Debug, Clone)]
pub struct StatusDir {
    dir: PathBuf,
}

impl StatusDir {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("transfers"),
        }
    }

    pub fn put(&self, rec: &TransferRecord) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::local(&self.dir, e))?;
        let mut rec = rec.clone();
        rec.updated_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        rec.pid = std::process::id();
        let body = serde_json::to_vec_pretty(&rec).map_err(|e| Error::Store(e.to_string()))?;
        write_atomic(&self.dir.join(format!("{}.json", rec.id)), &body)
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
    }

    /// Every record, oldest first; unreadable files are skipped.
    pub fn list(&self) -> Vec<TransferRecord> {
        let mut out: Vec<TransferRecord> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by_key(|r: &TransferRecord| r.updated_unix);
        out
    }

    /// The unfinished record for this (direction, local, remote), if any.
    pub fn find(&self, direction: &str, local: &str, remote: &str) -> Option<TransferRecord> {
        self.list().into_iter().find(|r| {
            r.direction == direction
                && r.local == local
                && r.remote == remote
                && r.state != RecordState::Complete
        })
    }
}

/// The circuit-breaker state of each peer, as last seen by a transfer, one
/// small JSON file per peer under `STATE_DIR/peers/`.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    dir: PathBuf,
}

/// One peer's breaker, for `ferry status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    pub addr: String,
    /// "closed", "open" or "half-open".
    pub breaker: String,
    /// For an open breaker: when the next attempt may be made (unix seconds).
    pub retry_at_unix: Option<u64>,
    pub updated_unix: u64,
}

impl PeerStatus {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("peers"),
        }
    }

    fn file(&self, addr: &str) -> PathBuf {
        let safe: String = addr
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// Records a state change (best effort: status display only).
    pub fn put(&self, addr: &str, state: ferry_proto::breaker::BreakerState) {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let retry_at_unix = match state {
            ferry_proto::breaker::BreakerState::Open { until } => {
                #[allow(clippy::disallowed_methods)]
                let left = until.saturating_duration_since(std::time::Instant::now());
                Some(now_unix + left.as_secs() + 1)
            }
            _ => None,
        };
        let rec = PeerRecord {
            addr: addr.to_string(),
            breaker: state.name().to_string(),
            retry_at_unix,
            updated_unix: now_unix,
        };
        if std::fs::create_dir_all(&self.dir).is_ok() {
            if let Ok(body) = serde_json::to_vec_pretty(&rec) {
                let _ = write_atomic(&self.file(addr), &body);
            }
        }
    }

    pub fn list(&self) -> Vec<PeerRecord> {
        let mut out: Vec<PeerRecord> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.addr.cmp(&b.addr));
        out
    }
}
