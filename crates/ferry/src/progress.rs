//! Shared counters a UI can poll while a copy runs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Progress of one `cp` run; all counters are monotonic except `current_*`.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Bytes verified at the receiver (durably) or skipped as already there.
    pub bytes_done: AtomicU64,
    /// Payload bytes put on the wire by this run.
    pub bytes_sent: AtomicU64,
    /// Bytes skipped because the other end already held them verified.
    pub bytes_resumed: AtomicU64,
    pub retries: AtomicU64,
    /// Connection attempts made (successful or not).
    pub connects: AtomicU64,
    /// Times a peer's circuit breaker opened, and closed again.
    pub breaker_opens: AtomicU64,
    pub breaker_closes: AtomicU64,
    /// Extra connections (data lanes) that carried a file's data beside its
    /// control connection.
    pub lanes: AtomicU64,
    pub current_name: Mutex<String>,
    pub current_size: AtomicU64,
    pub current_done: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn start_file(&self, name: &str, size: u64) {
        if let Ok(mut n) = self.current_name.lock() {
            *n = name.to_string();
        }
        self.current_size.store(size, Relaxed);
        self.current_done.store(0, Relaxed);
    }

    /// Counts verified bytes for the current file and the total.
    pub fn done(&self, n: u64) {
        self.bytes_done.fetch_add(n, Relaxed);
        self.current_done.fetch_add(n, Relaxed);
    }

    /// Takes back bytes counted as done for a file that must start over.
    pub fn undo_file(&self) {
        let n = self.current_done.swap(0, Relaxed);
        self.bytes_done
            .fetch_sub(n.min(self.bytes_done.load(Relaxed)), Relaxed);
    }

    pub fn current(&self) -> (String, u64, u64) {
        let name = self
            .current_name
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        (
            name,
            self.current_size.load(Relaxed),
            self.current_done.load(Relaxed),
        )
    }
}
