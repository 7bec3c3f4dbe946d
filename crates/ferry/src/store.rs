//! The durable state of both ends, in one redb database per state directory.
//!
//! Tables:
//! * `partials`: destination path → [`PartialRecord`] of a file being received.
//! * `partial_chunks`: (destination path, chunk) → content hash, verified and
//!   durable (data fsynced before the row is committed).
//! * `source_hashes`: (source key, chunk) → content hash of a source chunk
//!   the receiver acknowledged, so a resume need not re-read the source.
//!
//! What `ferry status` shows lives beside it as small JSON files ([`crate::status`]),
//! so it can be read while a transfer holds the database.

use std::path::{Path, PathBuf};

use ferry_proto::ChunkHash;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const PARTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("partials");
const PARTIAL_CHUNKS: TableDefinition<(&str, u32), &[u8; 32]> =
    TableDefinition::new("partial_chunks");
const SOURCE_HASHES: TableDefinition<(&[u8; 16], u32), &[u8; 32]> =
    TableDefinition::new("source_hashes");

/// What the receiver knows about a partial (or just finalised) file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartialRecord {
    pub transfer_id: String,
    pub size: u64,
    pub chunk_size: u32,
    pub alg: String,
    pub mtime_ns: i64,
    pub mode: u32,
    /// Hex of the sender's source identity.
    pub source_id: String,
    /// Set once the file is in place under its final name.
    pub finalized: bool,
    /// The partial file this record's chunks were written to: a resume
    /// trusts only that file (absent in records of older versions, whose
    /// partials are then started afresh).
    #[serde(default)]
    pub part: Option<crate::fsutil::FileIdent>,
}

/// Chunk index and content hash, as the journal keeps them.
pub type HeldChunks = Vec<(u32, ChunkHash)>;

thread_local! {
    /// Set while a guarded store call runs: its panics are reported as a
    /// damaged store, not printed as a crash.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a call into the database, turning what redb does on a damaged file
/// (a panic on an impossible layout, a `Corrupted` error) into
/// [`Error::StoreDamaged`] naming the file, so the caller stops before
/// anything is written on the strength of that state.
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    let damaged = |detail: String| Error::StoreDamaged {
        path: path.display().to_string(),
        detail,
    };
    match r {
        Ok(Err(Error::StoreDamaged { path: p, detail })) if p.is_empty() => Err(damaged(detail)),
        Ok(r) => r,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "its layout is impossible".into());
            Err(damaged(detail))
        }
    }
}

/// Opens the database, waiting a little if another ferry process holds it.
fn open_with_wait(path: &Path) -> Result<Database> {
    let mut waited = 0;
    loop {
        match guard(path, || Ok(Database::builder().create(path)))? {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if waited < 100 => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                waited += 1;
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Store(format!(
                    "{} is in use by another ferry process; use another --state-dir or wait for it to finish",
                    path.display()
                )))
            }
            Err(e) => return Err(open_error(path, e)),
        }
    }
}

/// What a failure to open the database means for the user.
fn open_error(path: &Path, e: redb::DatabaseError) -> Error {
    use redb::{DatabaseError, StorageError};
    let damaged = |detail: String| Error::StoreDamaged {
        path: path.display().to_string(),
        detail,
    };
    match e {
        DatabaseError::Storage(StorageError::Corrupted(detail)) => damaged(detail),
        DatabaseError::Storage(StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            damaged("the file is cut short".into())
        }
        DatabaseError::Storage(StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            damaged("it is not a ferry state store, or its header was overwritten".into())
        }
        DatabaseError::RepairAborted => damaged("its repair was aborted".into()),
        e => Error::Store(format!("{}: {e}", path.display())),
    }
}

/// The embedded store.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `DIR/state.redb`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::local(dir, e))?;
        let path = dir.join("state.redb");
        let db = open_with_wait(&path)?;
        Self::init(db, path)
    }

    /// Opens `DIR/state.redb`, or, while another process holds it, the first
    /// free `DIR/state-N.redb`: concurrent `ferry cp` runs then work side by
    /// side (a run that lands on another file re-reads source chunks to prove
    /// a resume instead of using remembered hashes).
    pub fn open_shared(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::local(dir, e))?;
        for n in 0..16 {
            let name = if n == 0 {
                "state.redb".to_string()
            } else {
                format!("state-{n}.redb")
            };
            let path = dir.join(name);
            match guard(&path, || Ok(Database::builder().create(&path)))? {
                Ok(db) => return Self::init(db, path),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => continue,
                Err(e) => return Err(open_error(&path, e)),
            }
        }
        Err(Error::Store(format!(
            "{}: too many ferry processes share this state directory",
            dir.display()
        )))
    }

    fn init(db: Database, path: PathBuf) -> Result<Self> {
        guard(&path, || {
            let tx = db.begin_write()?;
            tx.open_table(PARTIALS)?;
            tx.open_table(PARTIAL_CHUNKS)?;
            tx.open_table(SOURCE_HASHES)?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(Self { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database, for modules that keep their own tables (the
    /// SFTP sidecars), under the same guard as every call of the store: a
    /// damaged file is [`Error::StoreDamaged`], never a panic.
    pub(crate) fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        guard(&self.path, || f(&self.db))
    }

    #[cfg(test)]
    pub(crate) fn db_for_tests(&self) -> &Database {
        &self.db
    }

    // ---- receiver side ----

    pub fn partial(&self, dest: &str) -> Result<Option<(PartialRecord, HeldChunks)>> {
        guard(&self.path, || {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(PARTIALS)?;
            let Some(v) = t.get(dest)? else {
                return Ok(None);
            };
            let rec: PartialRecord = match serde_json::from_slice(v.value()) {
                Ok(r) => r,
                Err(_) => return Ok(None),
            };
            let c = tx.open_table(PARTIAL_CHUNKS)?;
            let mut chunks = Vec::new();
            for row in c.range((dest, 0u32)..=(dest, u32::MAX))? {
                let (k, v) = row?;
                chunks.push((k.value().1, ChunkHash(*v.value())));
            }
            Ok(Some((rec, chunks)))
        })
    }

    /// Replaces any record for `dest` with a fresh one with no chunks.
    pub fn start_partial(&self, dest: &str, rec: &PartialRecord) -> Result<()> {
        guard(&self.path, || {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut c = tx.open_table(PARTIAL_CHUNKS)?;
                c.retain_in((dest, 0u32)..=(dest, u32::MAX), |_, _| false)?;
                let mut t = tx.open_table(PARTIALS)?;
                t.insert(dest, serde_json::to_vec(rec).unwrap_or_default().as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Records chunks as verified and durable. Call only after their data was fsynced.
    pub fn commit_chunks(&self, dest: &str, chunks: &[(u32, ChunkHash)]) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut c = tx.open_table(PARTIAL_CHUNKS)?;
                for (i, h) in chunks {
                    c.insert((dest, *i), &h.0)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn forget_chunks(&self, dest: &str, chunks: impl Iterator<Item = u32>) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut c = tx.open_table(PARTIAL_CHUNKS)?;
                for i in chunks {
                    c.remove((dest, i))?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Rewrites the record of `dest`, keeping its chunks.
    pub fn update_partial(&self, dest: &str, rec: &PartialRecord) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(PARTIALS)?;
                t.insert(dest, serde_json::to_vec(rec).unwrap_or_default().as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn mark_finalized(&self, dest: &str) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(PARTIALS)?;
                let rec = t
                    .get(dest)?
                    .and_then(|v| serde_json::from_slice::<PartialRecord>(v.value()).ok());
                if let Some(mut rec) = rec {
                    rec.finalized = true;
                    t.insert(
                        dest,
                        serde_json::to_vec(&rec).unwrap_or_default().as_slice(),
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn remove_partial(&self, dest: &str) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut c = tx.open_table(PARTIAL_CHUNKS)?;
                c.retain_in((dest, 0u32)..=(dest, u32::MAX), |_, _| false)?;
                let mut t = tx.open_table(PARTIALS)?;
                t.remove(dest)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    // ---- sender side ----

    pub fn source_hashes(&self, key: &[u8; 16]) -> Result<HeldChunks> {
        guard(&self.path, || {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(SOURCE_HASHES)?;
            let mut out = Vec::new();
            for row in t.range((key, 0u32)..=(key, u32::MAX))? {
                let (k, v) = row?;
                out.push((k.value().1, ChunkHash(*v.value())));
            }
            Ok(out)
        })
    }

    /// Remembers chunk hashes of a source version. They are a cache (lost,
    /// they cost a re-hash on resume, never a wrong result), so a commit
    /// that is not `durable` skips the fsync: it is visible at once and
    /// reaches the disk with the next durable commit. An empty durable call
    /// makes the earlier ones durable.
    pub fn add_source_hashes(
        &self,
        key: &[u8; 16],
        hashes: &[(u32, ChunkHash)],
        durable: bool,
    ) -> Result<()> {
        guard(&self.path, || {
            if hashes.is_empty() && !durable {
                return Ok(());
            }
            let mut tx = self.db.begin_write()?;
            if !durable {
                tx.set_durability(Durability::None);
            }
            {
                let mut t = tx.open_table(SOURCE_HASHES)?;
                for (i, h) in hashes {
                    t.insert((key, *i), &h.0)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn drop_source_hashes(&self, key: &[u8; 16]) -> Result<()> {
        guard(&self.path, || {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(SOURCE_HASHES)?;
                t.retain_in((key, 0u32)..=(key, u32::MAX), |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_open_falls_back_while_the_main_file_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open_shared(dir.path()).unwrap();
        let b = Store::open_shared(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        drop(a);
        let c = Store::open_shared(dir.path()).unwrap();
        assert!(c.path().ends_with("state.redb"));
    }

    #[test]
    fn partial_lifecycle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rec = PartialRecord {
            transfer_id: "00".repeat(16),
            size: 10,
            chunk_size: 1024,
            alg: "blake3".into(),
            mtime_ns: 1,
            mode: 0o644,
            source_id: "ab".into(),
            finalized: false,
            part: Some(crate::fsutil::FileIdent { dev: 1, ino: 2 }),
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.start_partial("/a", &rec).unwrap();
            s.commit_chunks("/a", &[(0, ChunkHash([1; 32])), (2, ChunkHash([2; 32]))])
                .unwrap();
            s.commit_chunks("/b", &[(0, ChunkHash([3; 32]))]).unwrap();
            s.forget_chunks("/a", [2].into_iter()).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let (r, chunks) = s.partial("/a").unwrap().unwrap();
        assert_eq!(r, rec);
        assert_eq!(chunks, vec![(0, ChunkHash([1; 32]))]);
        s.start_partial("/a", &rec).unwrap();
        assert!(s.partial("/a").unwrap().unwrap().1.is_empty());
        s.remove_partial("/a").unwrap();
        assert!(s.partial("/a").unwrap().is_none());
        let key = [5u8; 16];
        s.add_source_hashes(&key, &[(1, ChunkHash([9; 32]))], true)
            .unwrap();
        s.add_source_hashes(&key, &[(2, ChunkHash([8; 32]))], false)
            .unwrap();
        assert_eq!(
            s.source_hashes(&key).unwrap(),
            vec![(1, ChunkHash([9; 32])), (2, ChunkHash([8; 32]))],
            "a commit without fsync is visible at once"
        );
        s.drop_source_hashes(&key).unwrap();
        assert!(s.source_hashes(&key).unwrap().is_empty());
    }

    /// A store cut short or overwritten (a crash of the disk, a full disk)
    /// never panics: opening it or any call on it either works or says the
    /// file is damaged, naming it.
    #[test]
    fn a_damaged_store_is_reported_never_a_panic() {
        use std::os::unix::fs::FileExt;
        type Damage = fn(&std::fs::File, u64);
        let damages: [(&str, Damage); 4] = [
            ("cut to half", |f, len| f.set_len(len / 2).unwrap()),
            ("cut to 100 bytes", |f, _| f.set_len(100).unwrap()),
            ("middle overwritten", |f, len| {
                f.write_all_at(&vec![0xff; 64 * 1024], len / 3).unwrap()
            }),
            ("header overwritten", |f, _| {
                f.write_all_at(&[0x5a; 512], 0).unwrap()
            }),
        ];
        for (what, damage) in damages {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = Store::open(dir.path()).unwrap();
                for i in 0..200u32 {
                    let key = [i as u8; 16];
                    s.add_source_hashes(&key, &[(i, ChunkHash([1; 32]))], true)
                        .unwrap();
                }
            }
            let p = dir.path().join("state.redb");
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            damage(&f, f.metadata().unwrap().len());
            drop(f);
            let run = std::panic::catch_unwind(|| {
                let s = Store::open(dir.path())?;
                for i in 0..200u32 {
                    s.source_hashes(&[i as u8; 16])?;
                }
                s.partial("/a")?;
                s.commit_chunks("/a", &[(0, ChunkHash([2; 32]))])
            });
            let Ok(r) = run else {
                panic!("{what}: a panic escaped");
            };
            if let Err(e) = r {
                assert!(
                    matches!(&e, Error::StoreDamaged { path, .. } if path.ends_with("state.redb")),
                    "{what}: {e}"
                );
                assert!(e.to_string().contains("mv "), "{what}: {e}");
            }
        }
    }
}
