//! Shared counters a UI can poll while a copy runs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

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
    /// Which [`FileProgress`] the `current_*` fields show (files may run in
    /// parallel; the one started last is shown).
    current_gen: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// A file first counted as `counted` bytes in `bytes_total` turned out to
    /// be `size` (it grew or shrank since it was planned): the total follows,
    /// and `counted` becomes `size`, so a file seen again is not counted twice.
    pub fn resize_file(&self, counted: &AtomicU64, size: u64) {
        let old = counted.swap(size, Relaxed);
        if size >= old {
            self.bytes_total.fetch_add(size - old, Relaxed);
        } else {
            let less = old - size;
            let _ = self
                .bytes_total
                .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(less)));
        }
    }

    pub fn start_file(&self, name: &str, size: u64) {
        if let Ok(mut n) = self.current_name.lock() {
            *n = name.to_string();
        }
        self.current_size.store(size, Relaxed);
        self.current_done.store(0, Relaxed);
        self.current_gen.fetch_add(1, Relaxed);
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

/// One file's share of a run's [`Progress`]: it counts the file's own verified
/// bytes (so they can be taken back if the file must start over, whatever
/// other files run beside it) and feeds the run's totals. It dereferences to
/// the run's counters for everything else.
#[derive(Debug)]
pub struct FileProgress {
    run: Arc<Progress>,
    done: AtomicU64,
    gen: AtomicU64,
}

impl FileProgress {
    /// A file that is not shown as the current one (a server's transfer).
    pub fn detached(run: Arc<Progress>) -> Self {
        Self {
            run,
            done: AtomicU64::new(0),
            gen: AtomicU64::new(u64::MAX),
        }
    }

    /// A file that starts now and is shown as the current one.
    pub fn start(run: &Arc<Progress>, name: &str, size: u64) -> Self {
        let f = Self::detached(run.clone());
        f.show(name, size);
        f
    }

    /// Shows this file as the current one (again), with what it has done.
    pub fn show(&self, name: &str, size: u64) {
        self.run.start_file(name, size);
        self.gen.store(self.run.current_gen.load(Relaxed), Relaxed);
        self.run
            .current_done
            .store(self.done.load(Relaxed), Relaxed);
    }

    fn is_shown(&self) -> bool {
        self.run.current_gen.load(Relaxed) == self.gen.load(Relaxed)
    }

    /// Counts verified bytes for this file and the run.
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, Relaxed);
        self.run.bytes_done.fetch_add(n, Relaxed);
        if self.is_shown() {
            self.run.current_done.fetch_add(n, Relaxed);
        }
    }

    /// Bytes of this file counted as done.
    pub fn file_done(&self) -> u64 {
        self.done.load(Relaxed)
    }

    /// Takes back this file's bytes: it must start over.
    pub fn undo(&self) {
        let n = self.done.swap(0, Relaxed);
        let _ = self
            .run
            .bytes_done
            .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(n)));
        if self.is_shown() {
            self.run.current_done.store(0, Relaxed);
        }
    }
}

impl std::ops::Deref for FileProgress {
    type Target = Progress;
    fn deref(&self) -> &Progress {
        &self.run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file planned at one size that grows, shrinks, or is seen again at
    /// the same size on a retry moves the total by what changed, once.
    #[test]
    fn the_total_follows_a_file_that_grew_or_shrank() {
        let p = Progress::default();
        Progress::add(&p.bytes_total, 1000 + 50);
        let counted = AtomicU64::new(1000);
        for (size, total) in [(400, 450), (400, 450), (1200, 1250), (0, 50)] {
            p.resize_file(&counted, size);
            assert_eq!(Progress::get(&p.bytes_total), total, "to {size}");
        }
    }
}
