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
    pub state: QueueState,
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

/// Where a queued copy stands (`queued` or `running` in its file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueState {
    /// Waiting for its next attempt.
    Queued,
    /// A process is running it (its lock tells which is alive).
    Running,
}

/// The outbox folder.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    locks: PathBuf,
}

/// A file in the queue folder that could not be read as an entry. It is
/// kept where it is: the copy it held is reported, never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub path: PathBuf,
    /// What is wrong with it, in a few words.
    pub problem: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "damaged queue entry {}: {}; kept: inspect it, then delete it and run the copy again",
            self.path.display(),
            self.problem
        )
    }
}

/// What the queue folder holds: one entry per transfer id, and the files
/// that could not be read.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Oldest first; two files carrying one id are one entry.
    pub entries: Vec<QueueEntry>,
    pub damaged: Vec<Damaged>,
}

/// Queue files are small; anything larger is not one of ours.
const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// Whether `id` can name a queue entry (and so a file in the queue folder).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit())
}

impl Queue {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("queue"),
            locks: state_dir.join("locks"),
        }
    }

    /// The folder the entries live in.
    pub fn dir(&self) -> &Path {
        &self.dir
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
            state: QueueState::Running,
            attempts: 0,
            last_error: None,
            created_unix: now,
            updated_unix: now,
            next_attempt_unix: 0,
            pid: std::process::id(),
            ssh: None,
        }
    }

    fn file_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Saves an entry: written whole to a temporary file, synced, renamed
    /// over `ID.json` and the folder synced, so a crash leaves the old entry
    /// or the new one, never a truncated one.
    pub fn put(&self, e: &QueueEntry) -> Result<()> {
        if !is_valid_id(&e.id) {
            return Err(Error::Usage(format!("{:?} is not a queue entry id", e.id)));
        }
        crate::fsutil::create_dirs_durable(&self.dir)
            .map_err(|err| Error::local(&self.dir, err))?;
        let mut e = e.clone();
        e.updated_unix = now_unix();
        let body = serde_json::to_vec_pretty(&e).map_err(|err| Error::Store(err.to_string()))?;
        write_atomic(&self.file_of(&e.id), &body)
    }

    /// Removes every file carrying this id (and its lock file). Only for a
    /// verified completion or the user's explicit request.
    pub fn remove(&self, id: &str) -> Result<()> {
        if !is_valid_id(id) {
            return Err(Error::Usage(format!("{id:?} is not a queue entry id")));
        }
        let mut removed = false;
        for (path, parsed) in self.files() {
            if matches!(&parsed, Ok(e) if e.id == id) {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(Error::local(&path, err)),
                }
            }
        }
        if removed {
            crate::fsutil::fsync_dir(&self.dir)?;
        }
        let _ = std::fs::remove_file(self.lock_path(id));
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<QueueEntry> {
        if !is_valid_id(id) {
            return None;
        }
        self.list().into_iter().find(|e| e.id == id)
    }

    /// Every entry, oldest first (see [`Queue::scan`] for the damaged ones).
    pub fn list(&self) -> Vec<QueueEntry> {
        self.scan().entries
    }

    /// Every `*.json` file of the folder, read and parsed.
    fn files(&self) -> Vec<(PathBuf, std::result::Result<QueueEntry, String>)> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => return vec![(self.dir.clone(), Err(format!("cannot list: {e}")))],
        };
        let mut out = Vec::new();
        for de in rd {
            let de = match de {
                Ok(de) => de,
                Err(e) => {
                    out.push((self.dir.clone(), Err(format!("cannot list: {e}"))));
                    continue;
                }
            };
            let name = de.file_name();
            let name = name.to_string_lossy();
            // Temporary files of an atomic write start with a dot.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let path = de.path();
            out.push((path.clone(), read_entry(&path)));
        }
        out
    }

    /// Reads the folder: entries deduplicated by transfer id (the file named
    /// `ID.json` wins, else the most recently updated), and every file that
    /// could not be read, so that no queued copy goes unmentioned.
    pub fn scan(&self) -> Scan {
        let mut scan = Scan::default();
        let mut by_id: std::collections::HashMap<String, (bool, QueueEntry)> =
            std::collections::HashMap::new();
        for (path, parsed) in self.files() {
            match parsed {
                Ok(e) => {
                    let canonical = path == self.file_of(&e.id);
                    let better = match by_id.get(&e.id) {
                        None => true,
                        Some((c, old)) => (canonical, e.updated_unix) > (*c, old.updated_unix),
                    };
                    if better {
                        by_id.insert(e.id.clone(), (canonical, e));
                    }
                }
                Err(problem) => scan.damaged.push(Damaged { path, problem }),
            }
        }
        scan.entries = by_id.into_values().map(|(_, e)| e).collect();
        scan.entries
            .sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        scan.damaged.sort_by(|a, b| a.path.cmp(&b.path));
        scan
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.locks.join(format!("{id}.lock"))
    }

    /// Takes the entry's lock: while the returned claim lives, no other
    /// process (and no other claim in this one) runs this entry. `Ok(None)`
    /// when someone else holds it.
    pub fn claim(&self, id: &str) -> Result<Option<LockFile>> {
        if !is_valid_id(id) {
            return Err(Error::Usage(format!("{id:?} is not a queue entry id")));
        }
        // A `ferry status` probing the lock holds it for an instant: try a
        // few times before calling the entry busy.
        for _ in 0..5 {
            if let Some(l) = LockFile::try_exclusive(&self.lock_path(id))? {
                return Ok(Some(l));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(None)
    }

    /// The process holding the entry's lock now, if any: `Some(pid)` (0 when
    /// it has not written its pid yet).
    pub fn running_elsewhere(&self, id: &str) -> Option<u32> {
        if !is_valid_id(id) {
            return None;
        }
        LockFile::holder(&self.lock_path(id))
    }

    /// Whether another process (or another claim in this one) is running
    /// this entry now. Decided by the entry's lock, not by the pid recorded
    /// in the entry, which may be stale or reused.
    pub fn is_running_elsewhere(&self, id: &str) -> bool {
        self.running_elsewhere(id).is_some()
    }
}

fn read_entry(path: &Path) -> std::result::Result<QueueEntry, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut body = Vec::new();
    f.take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read: {e}"))?;
    if body.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!("larger than {MAX_ENTRY_BYTES} bytes"));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("empty (truncated)".into());
    }
    let e: QueueEntry = serde_json::from_slice(&body).map_err(|e| {
        if e.is_eof() {
            format!("truncated ({e})")
        } else {
            format!("not a queue entry ({e})")
        }
    })?;
    if !is_valid_id(&e.id) {
        return Err(format!("its id {:?} is not a queue entry id", e.id));
    }
    Ok(e)
}

/// An exclusive advisory lock (`flock`) on a file, held while this lives; the
/// holder's pid is written into the file for messages. The kernel drops the
/// lock when the process dies, so a crash never leaves a stale lock.
#[derive(Debug)]
pub struct LockFile {
    _file: std::fs::File,
}

impl LockFile {
    /// Takes the lock, or `Ok(None)` if another holder has it.
    pub fn try_exclusive(path: &Path) -> Result<Option<LockFile>> {
        use rustix::fs::{flock, FlockOperation};
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let dir = crate::fsutil::parent_of(path);
        std::fs::create_dir_all(&dir).map_err(|e| Error::local(&dir, e))?;
        // A lock file removed (by a holder finishing) between our open and
        // our lock is a lock nobody else will look at: open it again.
        let mut file = loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::local(path, e))?;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(Error::local(path, e.into())),
            }
            let held = file.metadata().map_err(|e| Error::local(path, e))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => break file,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::local(path, e)),
            }
        };
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::local(path, e))?;
        Ok(Some(LockFile { _file: file }))
    }

    /// The pid of the process holding the lock on `path` (0 if unknown), or
    /// `None` when nobody holds it. Probes with a shared lock, so it never
    /// takes the lock for itself for longer than an instant.
    pub fn holder(path: &Path) -> Option<u32> {
        use rustix::fs::{flock, FlockOperation};
        let file = std::fs::File::open(path).ok()?;
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => None,
            Err(rustix::io::Errno::WOULDBLOCK) => Some(
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
            ),
            Err(_) => None,
        }
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
        e.state = QueueState::Queued;
        q.put(&e).unwrap();
        let again = q.entry_for(&srcs, "ferry://h/x", false, "blake3");
        assert_eq!(again.id, e.id);
        let other = q.entry_for(&srcs, "ferry://h/y", false, "blake3");
        assert_ne!(other.id, e.id);
        assert_eq!(q.get(&e.id).unwrap().state, QueueState::Queued);
        assert!(q.get("../../etc/passwd").is_none());
        q.remove(&e.id).unwrap();
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
