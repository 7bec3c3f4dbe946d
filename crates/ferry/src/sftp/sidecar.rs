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
    /// Hex BLAKE3 of each checkpointed range, in order from offset 0.
    pub ranges: Vec<String>,
}

/// What we learned about a server, remembered per host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostCaps {
    /// The server refused a write at an offset into an existing file
    /// (object-storage gateways): uploads there always start from zero.
    pub no_offset_writes: bool,
}

pub fn upload_key(local: &str, remote: &str) -> String {
    format!("up\0{local}\0{remote}")
}

pub fn download_key(local: &str, remote: &str) -> String {
    format!("down\0{local}\0{remote}")
}

pub fn get(store: &Store, key: &str) -> Result<Option<Sidecar>> {
    let tx = store.db().begin_read()?;
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
    Ok(rec.filter(|r| r.range_size > 0 && r.ranges.len() <= MAX_RANGES))
}

/// Stores `rec` durably (redb commits with fsync).
pub fn put(store: &Store, key: &str, rec: &Sidecar) -> Result<()> {
    let body = serde_json::to_vec(rec).map_err(|e| Error::Store(e.to_string()))?;
    let tx = store.db().begin_write()?;
    {
        let mut t = tx.open_table(SIDECARS)?;
        t.insert(key, body.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

pub fn remove(store: &Store, key: &str) -> Result<()> {
    let tx = store.db().begin_write()?;
    {
        let mut t = tx.open_table(SIDECARS)?;
        t.remove(key)?;
    }
    tx.commit()?;
    Ok(())
}

pub fn host_caps(store: &Store, host: &str) -> Result<HostCaps> {
    let tx = store.db().begin_read()?;
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
}

pub fn put_host_caps(store: &Store, host: &str, caps: &HostCaps) -> Result<()> {
    let body = serde_json::to_vec(caps).map_err(|e| Error::Store(e.to_string()))?;
    let tx = store.db().begin_write()?;
    {
        let mut t = tx.open_table(HOSTS)?;
        t.insert(host, body.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

pub fn hex32(d: &blake3::Hash) -> String {
    d.to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = upload_key("/a", "sftp://h/b");
        assert_eq!(get(&store, &key).unwrap(), None);
        let rec = Sidecar {
            size: 9,
            mtime_ns: 5,
            tail: "ab".into(),
            range_size: RANGE_SIZE,
            ranges: vec!["00".into()],
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
            },
        )
        .unwrap();
        assert!(host_caps(&store, "h:22").unwrap().no_offset_writes);
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
