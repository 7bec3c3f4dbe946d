//! Running queued copies: one entry at a time under its lock
//! ([`run_entry`], behind `ferry cp` and `ferry resume`), and the drain passes
//! and reconciliation report of `ferry agent` ([`Agent`]).
//!
//! The rules, whoever runs an entry:
//! * one process at a time per entry (a `flock` on `STATE_DIR/locks/ID.lock`,
//!   taken before the entry is read again and held for the whole copy), and
//!   one agent at a time per state directory (`STATE_DIR/locks/agent.lock`,
//!   held for the agent's life);
//! * an entry leaves the queue only on a verified completion (or when the
//!   user removes it): a failure, even one only the user can fix such as a
//!   refused token, keeps it queued with the reason and a later retry time;
//! * a transfer id delivered by an agent is never run again by it, and every
//!   entry still queued or damaged is reported with why.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;

use ferry_proto::{FailureCode, ProtoError};

use crate::copy::CopySummary;
use crate::error::{Error, Result};
use crate::queue::{now_unix, Damaged, LockFile, Queue, QueueEntry};

/// Another process is at work on what was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Busy {
    #[error("another ferry agent ({}) is draining {state_dir}; stop it first, or let it finish the queue", pid_text(*.pid))]
    Agent { pid: u32, state_dir: String },
    #[error("queue entry {id} is being run by another ferry process ({}) right now; wait for it to finish (see ferry status)", pid_text(*.pid))]
    Entry { id: String, pid: u32 },
}

fn pid_text(pid: u32) -> String {
    if pid == 0 {
        "pid unknown".into()
    } else {
        format!("pid {pid}")
    }
}

/// How the copy of an entry came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A `ferry cp` typed now: the entry may not be on disk yet.
    NewCopy,
    /// An entry already in the queue (`ferry resume`, `ferry agent`).
    Queued,
}

/// What became of one run of an entry.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// Verified and complete; the entry is gone from the queue, unless
    /// `left_behind` says why its file could not be removed.
    Completed {
        summary: CopySummary,
        left_behind: Option<Error>,
    },
    /// Kept in the queue with `reason`, to be tried again at `next_attempt_unix`.
    Queued {
        error: Error,
        reason: String,
        next_attempt_unix: u64,
    },
    /// A new copy that failed in a way time will not fix: the user sees the
    /// error now, so it is not queued.
    Failed(Error),
    /// Another process is running this entry.
    Busy(Busy),
    /// The entry left the queue (completed elsewhere) before it could run.
    Gone,
}

/// Whether a failure means "try later" rather than "someone must change something".
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::RetriesExhausted { last, .. } => last.is_retryable(),
        e => e.is_retryable(),
    }
}

/// The reason recorded in a queued entry and shown in reports.
pub fn describe_failure(e: &Error) -> String {
    let root = match e {
        Error::RetriesExhausted { last, .. } => last.as_ref(),
        e => e,
    };
    match root {
        Error::Proto(ProtoError::Remote(f)) if f.code == FailureCode::Unauthorized => format!(
            "server refused our token: set FERRY_TOKEN or --token-file ({})",
            f.message
        ),
        Error::Proto(ProtoError::Remote(f)) if f.code == FailureCode::PermissionDenied => {
            format!("server refused permission: {}", f.message)
        }
        _ => e.to_string(),
    }
}

/// Seconds before an entry is tried again after its `attempts`-th failure.
pub fn backoff_secs(attempts: u32, retry_after: Option<std::time::Duration>) -> u64 {
    let own = (5u64 << attempts.min(6)).min(300);
    own.max(retry_after.map_or(0, |d| d.as_secs().min(3600)))
}

/// Runs one entry under its lock. `run` performs the copy itself.
///
/// The entry is read again once its lock is held: an entry completed by
/// another process in the meantime is not run again ([`Outcome::Gone`]).
/// Errors are those of the queue folder itself (an entry that cannot be
/// saved); what the copy says is in the [`Outcome`].
pub async fn run_entry<F, Fut>(
    queue: &Queue,
    mut entry: QueueEntry,
    origin: Origin,
    run: F,
) -> Result<Outcome>
where
    F: FnOnce(QueueEntry) -> Fut,
    Fut: Future<Output = Result<CopySummary>>,
{
    let Some(_claim) = queue.claim(&entry.id)? else {
        return Ok(Outcome::Busy(Busy::Entry {
            pid: queue.running_elsewhere(&entry.id).unwrap_or(0),
            id: entry.id,
        }));
    };
    let fresh = match queue.get(&entry.id) {
        Some(on_disk) => {
            entry.attempts = on_disk.attempts;
            entry.created_unix = on_disk.created_unix;
            false
        }
        None if origin == Origin::NewCopy => true,
        None => return Ok(Outcome::Gone),
    };
    entry.state = crate::queue::QueueState::Running;
    entry.pid = std::process::id();
    entry.attempts = entry.attempts.saturating_add(1);
    queue.put(&entry)?;
    match run(entry.clone()).await {
        Ok(summary) => Ok(Outcome::Completed {
            summary,
            left_behind: queue.remove(&entry.id).err(),
        }),
        Err(e) if fresh && !is_transient(&e) => {
            // Only this run ever saw the entry: the error is the report.
            if let Err(rm) = queue.remove(&entry.id) {
                tracing::warn!(entry = %entry.id, error = %rm, "could not remove the queue entry of a failed copy");
            }
            Ok(Outcome::Failed(e))
        }
        Err(e) => {
            let reason = describe_failure(&e);
            entry.state = crate::queue::QueueState::Queued;
            entry.last_error = Some(reason.clone());
            entry.next_attempt_unix = now_unix() + backoff_secs(entry.attempts, e.retry_after());
            queue.put(&entry)?;
            Ok(Outcome::Queued {
                next_attempt_unix: entry.next_attempt_unix,
                error: e,
                reason,
            })
        }
    }
}

/// Something that happened to one entry during a pass.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    Completed {
        entry: &'a QueueEntry,
        summary: &'a CopySummary,
    },
    /// Completed, but its queue file could not be removed.
    LeftBehind {
        entry: &'a QueueEntry,
        error: &'a Error,
    },
    /// Still queued: `reason`, next attempt in `retry_in_secs`.
    Queued {
        entry: &'a QueueEntry,
        reason: &'a str,
        retry_in_secs: u64,
    },
    /// Being run by another process.
    Busy {
        entry: &'a QueueEntry,
        busy: &'a Busy,
    },
    /// The queue folder could not record the entry's state.
    QueueError {
        entry: &'a QueueEntry,
        error: &'a Error,
    },
}

/// The drainer behind `ferry agent`: holds the state directory's agent lock
/// for its life, runs what is due on each [`Agent::pass`], and says what is
/// still missing in [`Agent::report`].
#[derive(Debug)]
pub struct Agent {
    queue: Queue,
    _lock: LockFile,
    delivered: HashSet<String>,
    completed: Vec<QueueEntry>,
    left_behind: Vec<(QueueEntry, String)>,
    first_pass: bool,
}

impl Agent {
    /// Takes the agent lock of `state_dir`, or says who holds it.
    pub fn start(state_dir: &Path) -> Result<std::result::Result<Agent, Busy>> {
        let path = state_dir.join("locks").join("agent.lock");
        let Some(lock) = LockFile::try_exclusive(&path)? else {
            return Ok(Err(Busy::Agent {
                pid: LockFile::holder(&path).unwrap_or(0),
                state_dir: state_dir.display().to_string(),
            }));
        };
        Ok(Ok(Agent {
            queue: Queue::new(state_dir),
            _lock: lock,
            delivered: HashSet::new(),
            completed: Vec::new(),
            left_behind: Vec::new(),
            first_pass: true,
        }))
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// One pass over the queue: every entry that is due (all of them on the
    /// first pass) is run with `run`, and `on_event` hears what became of it.
    /// Returns how many entries were run.
    pub async fn pass<F, Fut>(&mut self, mut run: F, mut on_event: impl FnMut(Event<'_>)) -> usize
    where
        F: FnMut(QueueEntry) -> Fut,
        Fut: Future<Output = Result<CopySummary>>,
    {
        let now = now_unix();
        let mut ran = 0;
        for e in self.queue.list() {
            if self.delivered.contains(&e.id) || (!self.first_pass && e.next_attempt_unix > now) {
                continue;
            }
            ran += 1;
            let entry = e.clone();
            match run_entry(&self.queue, e, Origin::Queued, &mut run).await {
                Ok(Outcome::Completed {
                    summary,
                    left_behind,
                }) => {
                    self.delivered.insert(entry.id.clone());
                    on_event(Event::Completed {
                        entry: &entry,
                        summary: &summary,
                    });
                    if let Some(error) = left_behind {
                        on_event(Event::LeftBehind {
                            entry: &entry,
                            error: &error,
                        });
                        self.left_behind.push((entry.clone(), error.to_string()));
                    }
                    self.completed.push(entry);
                }
                Ok(Outcome::Queued {
                    reason,
                    next_attempt_unix,
                    ..
                }) => on_event(Event::Queued {
                    entry: &entry,
                    reason: &reason,
                    retry_in_secs: next_attempt_unix.saturating_sub(now_unix()),
                }),
                Ok(Outcome::Failed(error)) => on_event(Event::QueueError {
                    entry: &entry,
                    error: &error,
                }),
                Ok(Outcome::Busy(busy)) => on_event(Event::Busy {
                    entry: &entry,
                    busy: &busy,
                }),
                Ok(Outcome::Gone) => ran -= 1,
                Err(error) => on_event(Event::QueueError {
                    entry: &entry,
                    error: &error,
                }),
            }
        }
        self.first_pass = false;
        ran
    }

    /// What this agent completed, and everything still in the queue with why.
    pub fn report(&self) -> Reconciliation {
        let scan = self.queue.scan();
        let mut queued = Vec::new();
        for e in scan.entries {
            if self.delivered.contains(&e.id) {
                continue;
            }
            let running_in = self.queue.running_elsewhere(&e.id);
            queued.push(StillQueued {
                entry: e,
                running_in,
            });
        }
        Reconciliation {
            completed: self.completed.clone(),
            queued,
            damaged: scan.damaged,
            left_behind: self
                .left_behind
                .iter()
                .filter(|(e, _)| self.queue.get(&e.id).is_some())
                .cloned()
                .collect(),
        }
    }
}

/// An entry still in the queue, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StillQueued {
    pub entry: QueueEntry,
    /// The process running it now, if another one is (0: pid unknown).
    pub running_in: Option<u32>,
}

/// The reconciliation report: never "nothing missing" while anything is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub completed: Vec<QueueEntry>,
    pub queued: Vec<StillQueued>,
    pub damaged: Vec<Damaged>,
    /// Delivered, but the queue file could not be removed (and why).
    pub left_behind: Vec<(QueueEntry, String)>,
}

fn what(e: &QueueEntry) -> String {
    format!("{} ({} -> {})", e.id, e.srcs.join(" "), e.dst)
}

impl Reconciliation {
    /// Nothing queued, damaged or left behind.
    pub fn nothing_missing(&self) -> bool {
        self.queued.is_empty() && self.damaged.is_empty() && self.left_behind.is_empty()
    }

    /// Whether only the user can make progress: nothing is queued, but
    /// damaged entries or files left behind remain.
    pub fn needs_user(&self) -> bool {
        self.queued.is_empty() && !self.nothing_missing()
    }

    /// What changed between two reports, ignoring the passing of time.
    pub fn key(&self) -> Vec<String> {
        let mut k: Vec<String> = self.completed.iter().map(|e| e.id.clone()).collect();
        for q in &self.queued {
            k.push(format!(
                "{} {:?} {:?}",
                q.entry.id, q.entry.last_error, q.running_in
            ));
        }
        k.extend(self.damaged.iter().map(|d| d.to_string()));
        k.extend(self.left_behind.iter().map(|(e, _)| e.id.clone()));
        k
    }

    /// The report as lines: a headline, then one line per entry.
    pub fn lines(&self, now_unix: u64) -> Vec<String> {
        let head = if self.nothing_missing() {
            format!(
                "reconciliation: {} completed, nothing missing",
                self.completed.len()
            )
        } else {
            format!(
                "reconciliation: {} completed, {} still queued, {} damaged, {} left behind",
                self.completed.len(),
                self.queued.len(),
                self.damaged.len(),
                self.left_behind.len()
            )
        };
        let mut out = vec![head];
        out.extend(
            self.completed
                .iter()
                .map(|e| format!("  completed {}", what(e))),
        );
        for q in &self.queued {
            let why = q.entry.last_error.as_deref().unwrap_or("not tried yet");
            out.push(match q.running_in {
                Some(pid) => format!(
                    "  queued {}: running now in another process ({})",
                    what(&q.entry),
                    pid_text(pid)
                ),
                None => format!(
                    "  queued {}: {why}; next attempt in {}s",
                    what(&q.entry),
                    q.entry.next_attempt_unix.saturating_sub(now_unix)
                ),
            });
        }
        out.extend(self.damaged.iter().map(|d| format!("  {d}")));
        for (e, err) in &self.left_behind {
            out.push(format!(
                "  completed {} but its queue file could not be removed ({err}); delete it",
                what(e)
            ));
        }
        out
    }
}
