//! The local record of an unfinished SFTP transfer, kept in ferry's state
//! store (never as litter next to the user's files).
//!
//! For an upload it describes the source when the upload started (size,
//! mtime, a digest of its tail) and, per checkpointed range, the BLAKE3
//! digest of what was written; a range is only recorded after the server
//! flushed it (`fsync@openssh.com` where offered). For a download it
//! describes the remote file (size, mtime) and the ranges written and
//! fsynced into the local `.part`.

use redb::TableDefinition;

use crate::error::{Error, Result};
use crate::store::Store;

/// key -> JSON of [`Sidecar`].
const SIDECARS: TableDefinition<&str, &[u8]> = TableDefinition::new("sftp_sidecars");
/// `host:port` -> JSON of [`HostCaps`].
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("sftp_hosts");

/// Checkpoint granularity: one digest per range.
pub const RANGE_SIZE: u64 = 8 << 20;
/// Bytes of the source's tail hashed into the sidecar.
pub const TAIL_LEN: u64 = 64 << 10;
/// Bound on recorded ranges (a 8 TiB file), so a damaged record cannot make us allocate wildly.
const MAX_RANGES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sidecar {
    /// Size of the source (local file for uploads, remote file for downloads).
    pub size: u64,
    /// Modification time of the source, in nanoseconds (remote: seconds * 1e9).
    pub mtime_ns: i64,
    /// Hex BLAKE3 of the last [`TAIL_LEN`] bytes of a local source (empty for downloads).
    pub tail: String,
    pub range_size: u64,
    /// Hex digest of each checkpointed range, in order from offset 0 (see
    /// [`range_digest`]).
    pub ranges: Vec<String>,
    /// How `ranges` are computed; a record of another scheme (an older
    /// ferry's plain per-range BLAKE3) is treated as absent.
    #[serde(default)]
    pub scheme: u32,
    /// Hex of [`crate::fsutil::source_id`] of a local source (size, mtime,
    /// ctime, inode, device), as native copies compare it; empty for
    /// downloads and in records of older ferries (which then do not match
    /// an upload's source).
    #[serde(default)]
    pub source_id: String,
}

/// The current [`Sidecar::scheme`]: ranges are BLAKE3 subtrees.
pub const RANGE_SCHEME: u32 = 2;

/// What we learned about a server, remembered per host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostCaps {
    /// The server refused a write at an offset into an existing file
    /// (object-storage gateways): uploads there always start from zero.
    pub no_offset_writes: bool,
    /// The server failed writes sent with many requests in flight ("Illegal
    /// seek": rclone serve sftp without a write cache takes writes only in
    /// order): uploads there send one write at a time.
    #[serde(default)]
    pub in_order_writes: bool,
}

/// Which hashing command an account may run on a host (see
/// [`super::remote_hash`]), and when that was probed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecCaps {
    /// `b3sum`, `sha256sum` or `shasum`; `None`: none works.
    pub tool: Option<String>,
    pub probed_unix: u64,
}

fn exec_key(account: &str) -> String {
    format!("exec\0{account}")
}

pub fn exec_caps(store: &Store, account: &str) -> Result<Option<ExecCaps>> {
    store.with_db(|db| {
        let tx = db.begin_read()?;
        let t = match tx.open_table(HOSTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let caps = t
            .get(exec_key(account).as_str())?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        Ok(caps)
    })
}

pub fn put_exec_caps(store: &Store, account: &str, caps: &ExecCaps) -> Result<()> {
    let body = serde_json::to_vec(caps).map_err(|e| Error::Store(e.to_string()))?;
    store.with_db(|db| {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(HOSTS)?;
            t.insert(exec_key(account).as_str(), body.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    })
}

pub fn remove_exec_caps(store: &Store, account: &str) -> Result<()> {
    store.with_db(|db| {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(HOSTS)?;
            t.remove(exec_key(account).as_str())?;
        }
        tx.commit()?;
        Ok(())
    })
}

pub fn upload_key(local: &str, remote: &str) -> String {
    format!("up\0{local}\0{remote}")
}

pub fn download_key(local: &str, remote: &str) -> String {
    format!("down\0{local}\0{remote}")
}

pub fn get(store: &Store, key: &str) -> Result<Option<Sidecar>> {
    store.with_db(|db| {
        let tx = db.begin_read()?;
        let t = match tx.open_table(SIDECARS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(v) = t.get(key)? else {
            return Ok(None);
        };
        // A record we cannot read is treated as absent: the transfer starts fresh.
        let rec: Option<Sidecar> = serde_json::from_slice(v.value()).ok();
        Ok(rec.filter(|r| {
            r.range_size == RANGE_SIZE && r.scheme == RANGE_SCHEME && r.ranges.len() <= MAX_RANGES
        }))
    })
}

/// Stores `rec` durably (redb commits with fsync).
pub fn put(store: &Store, key: &str, rec: &Sidecar) -> Result<()> {
    let body = serde_json::to_vec(rec).map_err(|e| Error::Store(e.to_string()))?;
    store.with_db(|db| {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(SIDECARS)?;
            t.insert(key, body.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    })
}

pub fn remove(store: &Store, key: &str) -> Result<()> {
    store.with_db(|db| {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(SIDECARS)?;
            t.remove(key)?;
        }
        tx.commit()?;
        Ok(())
    })
}

pub fn host_caps(store: &Store, host: &str) -> Result<HostCaps> {
    store.with_db(|db| {
        let tx = db.begin_read()?;
        let t = match tx.open_table(HOSTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HostCaps::default()),
            Err(e) => return Err(e.into()),
        };
        let caps = t
            .get(host)?
            .and_then(|v| serde_json::from_slice(v.value()).ok())
            .unwrap_or_default();
        Ok(caps)
    })
}

pub fn put_host_caps(store: &Store, host: &str, caps: &HostCaps) -> Result<()> {
    let body = serde_json::to_vec(caps).map_err(|e| Error::Store(e.to_string()))?;
    store.with_db(|db| {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(HOSTS)?;
            t.insert(host, body.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    })
}

pub fn hex32(d: &blake3::Hash) -> String {
    d.to_hex().to_string()
}

/// The digest of range `i` (bytes `data`) of a file of `size` bytes: the
/// chaining value of that range as a subtree of the file's BLAKE3 tree, or
/// the file's BLAKE3 itself when the file is one range. Ranges are aligned
/// powers of two of BLAKE3 chunks (8 MiB), and the last, shorter one is the
/// right edge of the tree, so each range is a subtree and [`file_digest`]
/// gets the whole file's BLAKE3 from the range digests: one hashing pass
/// gives both the checkpoint records and the file's digest.
pub fn range_digest(size: u64, i: u64, data: &[u8]) -> String {
    range_digest_of_pieces(size, i, [data])
}

/// [`range_digest`] of a range held as consecutive pieces.
pub fn range_digest_of_pieces<'a>(
    size: u64,
    i: u64,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> String {
    use blake3::hazmat::HasherExt;
    let mut h = blake3::Hasher::new();
    if size > RANGE_SIZE {
        h.set_input_offset(i * RANGE_SIZE);
    }
    for p in pieces {
        h.update(p);
    }
    if size <= RANGE_SIZE {
        hex32(&h.finalize())
    } else {
        hex32(&blake3::Hash::from_bytes(h.finalize_non_root()))
    }
}

/// The BLAKE3 of a whole file of `size` bytes from its [`range_digest`]s
/// (all of them, in order); `None` if they do not fit the size or are not hex.
pub fn file_digest(size: u64, ranges: &[String]) -> Option<blake3::Hash> {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    if ranges.len() as u64 != size.div_ceil(RANGE_SIZE) {
        return None;
    }
    if size <= RANGE_SIZE {
        return match ranges.first() {
            None => Some(blake3::hash(b"")),
            Some(h) => blake3::Hash::from_hex(h).ok(),
        };
    }
    let cvs: Vec<[u8; 32]> = ranges
        .iter()
        .map(|h| blake3::Hash::from_hex(h).ok().map(|h| *h.as_bytes()))
        .collect::<Option<_>>()?;
    // The subtree over ranges [lo, hi), `len` bytes: split where BLAKE3 does
    // (always on a range boundary: left sides are powers of two of 8 MiB or more).
    fn merge(cvs: &[[u8; 32]], lo: usize, hi: usize, len: u64) -> [u8; 32] {
        if hi - lo == 1 {
            return cvs[lo];
        }
        let left = left_subtree_len(len);
        let mid = lo + (left / RANGE_SIZE) as usize;
        merge_subtrees_non_root(
            &merge(cvs, lo, mid, left),
            &merge(cvs, mid, hi, len - left),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(size);
    let mid = (left / RANGE_SIZE) as usize;
    let (l, r) = (
        merge(&cvs, 0, mid, left),
        merge(&cvs, mid, cvs.len(), size - left),
    );
    Some(merge_subtrees_root(&l, &r, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole file's BLAKE3 from range digests, for sizes around the
    /// range and tree boundaries (1, 2, 3, 4, 5 ranges; short last ranges).
    #[test]
    fn range_digests_give_the_file_blake3() {
        let r = RANGE_SIZE as usize;
        let mut data = vec![0u8; 5 * r + 3];
        let mut x: u32 = 1;
        for b in data.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        for len in [
            0,
            1,
            1025,
            r - 1,
            r,
            r + 1,
            r + 1024,
            2 * r,
            2 * r + 7,
            3 * r,
            3 * r + 1,
            4 * r,
            4 * r + 5,
            5 * r + 3,
        ] {
            let d = &data[..len];
            let size = len as u64;
            let ranges: Vec<String> = d
                .chunks(r)
                .enumerate()
                .map(|(i, c)| range_digest(size, i as u64, c))
                .collect();
            assert_eq!(
                file_digest(size, &ranges),
                Some(blake3::hash(d)),
                "size {len}"
            );
        }
        // A wrong count or a changed range does not give the file's digest.
        let d = &data[..2 * r + 7];
        let mut ranges: Vec<String> = d
            .chunks(r)
            .enumerate()
            .map(|(i, c)| range_digest(d.len() as u64, i as u64, c))
            .collect();
        assert_eq!(file_digest(d.len() as u64, &ranges[..2]), None);
        ranges[1] = range_digest(d.len() as u64, 0, &d[..r]);
        assert_ne!(file_digest(d.len() as u64, &ranges), Some(blake3::hash(d)));
    }

    #[test]
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = upload_key("/a", "sftp://h/b");
        assert_eq!(get(&store, &key).unwrap(), None);
        let rec = Sidecar {
            scheme: RANGE_SCHEME,
            size: 9,
            mtime_ns: 5,
            tail: "ab".into(),
            range_size: RANGE_SIZE,
            ranges: vec!["00".into()],
            source_id: "0a".into(),
        };
        put(&store, &key, &rec).unwrap();
        assert_eq!(get(&store, &key).unwrap(), Some(rec));
        remove(&store, &key).unwrap();
        assert_eq!(get(&store, &key).unwrap(), None);
        assert!(!host_caps(&store, "h:22").unwrap().no_offset_writes);
        put_host_caps(
            &store,
            "h:22",
            &HostCaps {
                no_offset_writes: true,
                in_order_writes: false,
            },
        )
        .unwrap();
        assert!(host_caps(&store, "h:22").unwrap().no_offset_writes);
        // A record written before source_id existed still loads (and then
        // matches no upload's source).
        let old = br#"{"size":9,"mtime_ns":5,"tail":"ab","range_size":8388608,"ranges":["00"],"scheme":2}"#;
        let tx = store.db_for_tests().begin_write().unwrap();
        tx.open_table(SIDECARS)
            .unwrap()
            .insert(key.as_str(), old.as_slice())
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(get(&store, &key).unwrap().unwrap().source_id, "");
        let caps = ExecCaps {
            tool: Some("sha256sum".into()),
            probed_unix: 7,
        };
        put_exec_caps(&store, "u@h:22", &caps).unwrap();
        assert_eq!(exec_caps(&store, "u@h:22").unwrap(), Some(caps));
        remove_exec_caps(&store, "u@h:22").unwrap();
        assert_eq!(exec_caps(&store, "u@h:22").unwrap(), None);
    }
}

/// A flush (remote `fsync@openssh.com`, or a local `sync_data`) running while
/// more data moves, and how many ranges it covers. The record may claim those
/// ranges only once it succeeded: data durable before the record says so.
#[derive(Default)]
pub(crate) struct PendingFlush {
    running: Option<(usize, tokio::task::JoinHandle<Result<()>>)>,
}

impl PendingFlush {
    /// Ranges that will be recorded once the running flush answers, else `recorded`.
    pub fn covers_or(&self, recorded: usize) -> usize {
        self.running.as_ref().map_or(recorded, |(k, _)| *k)
    }

    pub fn start(&mut self, covers: usize, task: tokio::task::JoinHandle<Result<()>>) {
        self.running = Some((covers, task));
    }

    /// Waits for the running flush, if any; returns the ranges it covered.
    pub async fn finish(&mut self) -> Result<Option<usize>> {
        let Some((k, task)) = self.running.take() else {
            return Ok(None);
        };
        task.await
            .map_err(|e| Error::Store(format!("flush task: {e}")))??;
        Ok(Some(k))
    }

    /// As [`PendingFlush::finish`], but only if the flush already answered.
    pub async fn finish_if_done(&mut self) -> Result<Option<usize>> {
        if self.running.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            self.finish().await
        } else {
            Ok(None)
        }
    }
}
