//! The durable outbox: a `ferry cp` that could not finish within its retry
//! budget stays queued here (one JSON file per entry under `STATE_DIR/queue/`,
//! replaced atomically), and `ferry resume` or `ferry agent` finish it later.
//!
//! An entry is the copy itself (sources, destination, options), not its bytes:
//! re-running a copy is idempotent, since every file resumes from what the other
//! end holds verified and a file already in place is confirmed without being
//! sent again. Running the same `ferry cp` again joins its entry.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    pub srcs: Vec<String>,
    pub dst: String,
    pub recursive: bool,
    /// `-L`: symlinks inside trees are followed.
    #[serde(default)]
    pub follow_links: bool,
    pub alg: String,
    /// "running", "queued".
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_unix: u64,
    pub updated_unix: u64,
    /// Earliest time the agent tries it again (unix seconds).
    pub next_attempt_unix: u64,
    /// Process running it now (for "running").
    pub pid: u32,
    /// For copies to or from `sftp://`: the SSH settings the copy was started
    /// with, so `ferry resume` and `ferry agent` finish it the same way (the
    /// passphrase is never stored: it comes from the environment again).
    #[serde(default)]
    pub ssh: Option<QueuedSsh>,
}

/// SSH settings of a queued SFTP copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct QueuedSsh {
    pub identities: Vec<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_key: bool,
    pub verify: String,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The outbox folder.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

impl Queue {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("queue"),
        }
    }

    /// The entry for this exact copy, or a new one (not yet saved).
    pub fn entry_for(&self, srcs: &[String], dst: &str, recursive: bool, alg: &str) -> QueueEntry {
        if let Some(e) = self
            .list()
            .into_iter()
            .find(|e| e.srcs == srcs && e.dst == dst && e.recursive == recursive)
        {
            return e;
        }
        let raw: [u8; 8] = rand::random();
        let now = now_unix();
        QueueEntry {
            id: crate::fsutil::hex(&raw),
            srcs: srcs.to_vec(),
            dst: dst.to_string(),
            recursive,
            follow_links: false,
            alg: alg.to_string(),
            state: "running".into(),
            attempts: 0,
            last_error: None,
            created_unix: now,
            updated_unix: now,
            next_attempt_unix: 0,
            pid: std::process::id(),
            ssh: None,
        }
    }

    pub fn put(&self, e: &QueueEntry) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|err| Error::local(&self.dir, err))?;
        let mut e = e.clone();
        e.updated_unix = now_unix();
        let body = serde_json::to_vec_pretty(&e).map_err(|err| Error::Store(err.to_string()))?;
        write_atomic(&self.dir.join(format!("{}.json", e.id)), &body)
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
    }

    pub fn get(&self, id: &str) -> Option<QueueEntry> {
        if !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        std::fs::read(self.dir.join(format!("{id}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Vec<QueueEntry> {
        let mut out: Vec<QueueEntry> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by_key(|e: &QueueEntry| e.created_unix);
        out
    }

    /// Whether another live process is running this entry now.
    pub fn is_running_elsewhere(e: &QueueEntry) -> bool {
        e.state == "running"
            && e.pid != std::process::id()
            && Path::new(&format!("/proc/{}", e.pid)).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_copy_joins_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path());
        let srcs = vec!["a".to_string()];
        let mut e = q.entry_for(&srcs, "ferry://h/x", false, "blake3");
        e.state = "queued".into();
        q.put(&e).unwrap();
        let again = q.entry_for(&srcs, "ferry://h/x", false, "blake3");
        assert_eq!(again.id, e.id);
        let other = q.entry_for(&srcs, "ferry://h/y", false, "blake3");
        assert_ne!(other.id, e.id);
        assert_eq!(q.get(&e.id).unwrap().state, "queued");
        assert!(q.get("../../etc/passwd").is_none());
        q.remove(&e.id);
        assert!(q.list().is_empty());
    }
}

#[cfg(test)]
mod ssh_tests {
    use super::*;

    #[test]
    fn queued_sftp_copies_keep_their_ssh_settings_and_old_entries_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path());
        let mut e = q.entry_for(&["/a".to_string()], "sftp://u@h/x", false, "blake3");
        e.ssh = Some(QueuedSsh {
            identities: vec![PathBuf::from("/k/id_ed25519")],
            known_hosts: Some(PathBuf::from("/k/known_hosts")),
            accept_new_host_key: true,
            verify: "full".into(),
        });
        q.put(&e).unwrap();
        assert_eq!(q.get(&e.id).unwrap().ssh, e.ssh);
        // An entry written before the field existed.
        let mut v = serde_json::to_value(&e).unwrap();
        v.as_object_mut().unwrap().remove("ssh");
        let old: QueueEntry = serde_json::from_value(v).unwrap();
        assert_eq!(old.ssh, None);
    }
}
