//! The one retry mechanism of `ferry cp`, shared by every endpoint kind:
//! connecting behind a per-peer circuit breaker, retrying retryable failures
//! under the copy's [`RetryPolicy`] and budget with seeded jitter, and the
//! `ferry status` records of the files in flight. An endpoint kind only says
//! whom it talks to and how to connect ([`Endpoint`]); it never retries or
//! keeps records itself.

use std::collections::HashMap;
use std::sync::Arc;

// Time through tokio's clock, so paused-time tests drive retries and cool-downs.
use tokio::time::Instant;

use ferry_proto::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use rand::{Rng, SeedableRng};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::retry::{RetryDecision, RetryPolicy};
use crate::status::{PeerStatus, StatusDir, TransferRecord};

use super::CopyOptions;

pub(crate) type BoxFut<'s, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 's>>;

/// What an endpoint kind gives the runner: the peer it talks to and how to
/// open a session with it.
pub(crate) trait Endpoint: Sync {
    /// A connected session (a native [`crate::client::Session`], an SSH connection, ...).
    type Session: Send;
    /// Whether progress made during a failed attempt starts the attempt count
    /// again (for kinds whose whole-file transfers run as one attempt).
    const PROGRESS_RESETS: bool;
    /// The peer as breakers and `ferry status` name it (`host:port`).
    fn peer(&self) -> String;
    fn connect(&self) -> BoxFut<'_, Self::Session>;
}

/// Retries, breakers, jitter and status records of one copy (or of one of
/// its parallel workers, see [`Runner::fork`]).
pub(crate) struct Runner {
    retry: RetryPolicy,
    pub(crate) rng: rand::rngs::StdRng,
    pub(crate) progress: Arc<Progress>,
    /// Records of unfinished transfers, for `ferry status`.
    pub(crate) status: StatusDir,
    /// One circuit breaker per peer.
    breakers: HashMap<String, CircuitBreaker>,
    peers: PeerStatus,
    /// End of the retry budget of the current operation, if there is one.
    deadline: Option<Instant>,
}

impl Runner {
    pub(crate) fn new(opts: &CopyOptions, progress: Arc<Progress>) -> Runner {
        Runner {
            retry: opts.retry.clone(),
            rng: match opts.seed {
                Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
                None => rand::rngs::StdRng::from_entropy(),
            },
            progress,
            status: StatusDir::new(&opts.state_dir),
            breakers: HashMap::new(),
            peers: PeerStatus::new(&opts.state_dir),
            deadline: None,
        }
    }

    /// A runner for a parallel worker: the same policy, breakers (as they
    /// stand), records and progress; its own retry jitter.
    pub(crate) fn fork(&mut self) -> Runner {
        Runner {
            retry: self.retry.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(self.rng.gen()),
            progress: self.progress.clone(),
            status: self.status.clone(),
            breakers: self.breakers.clone(),
            peers: self.peers.clone(),
            deadline: None,
        }
    }

    /// Starts the retry budget of an operation at `start`.
    pub(crate) fn start_budget(&mut self, start: Instant) {
        self.deadline = self.retry.budget.map(|b| start + b);
    }

    /// Runs `f` on a connected session, reconnecting and retrying retryable
    /// failures under the copy's retry policy.
    pub(crate) async fn with_session<E: Endpoint, T>(
        &mut self,
        ep: &E,
        session: &mut Option<E::Session>,
        mut f: impl for<'s> FnMut(&'s mut E::Session) -> BoxFut<'s, T>,
    ) -> Result<T> {
        let mut attempt = 0u32;
        let mut start = Instant::now();
        self.start_budget(start);
        loop {
            let before = Progress::get(&self.progress.bytes_done);
            let r = async {
                if session.is_none() {
                    *session = Some(self.connect(ep).await?);
                }
                let s = session
                    .as_mut()
                    .ok_or_else(|| Error::Store("no session".into()))?;
                f(s).await
            }
            .await;
            match r {
                Ok(v) => return Ok(v),
                Err(e) => {
                    *session = None;
                    if E::PROGRESS_RESETS && Progress::get(&self.progress.bytes_done) > before {
                        // Progress is not failure: start the count again.
                        attempt = 0;
                        start = Instant::now();
                        self.start_budget(start);
                    }
                    attempt += 1;
                    self.backoff(e, attempt, start).await?;
                }
            }
        }
    }

    /// Connects, respecting the peer's circuit breaker: while it is open no
    /// connection is attempted at all; transitions are logged, counted and
    /// shown by `ferry status`.
    pub(crate) async fn connect<E: Endpoint>(&mut self, ep: &E) -> Result<E::Session> {
        let peer = ep.peer();
        let breaker = self
            .breakers
            .entry(peer.clone())
            .or_insert_with(|| CircuitBreaker::new(BreakerConfig::default()));
        loop {
            match breaker.allow(Instant::now().into_std()) {
                Ok(()) => break,
                Err(until) => {
                    if let Some(d) = self.deadline {
                        if Instant::from_std(until) > d {
                            tokio::time::sleep_until(d).await;
                            return Err(Error::Timeout(format!(
                                "{peer}: circuit breaker stays open past the retry budget"
                            )));
                        }
                    }
                    let wait = until.saturating_duration_since(Instant::now().into_std());
                    info!(
                        peer = %peer,
                        wait_ms = wait.as_millis() as u64,
                        "circuit breaker open: not connecting until the cool-down ends"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Progress::add(&self.progress.connects, 1);
        let r = ep.connect().await;
        let now = Instant::now().into_std();
        let breaker = self
            .breakers
            .entry(peer.clone())
            .or_insert_with(|| CircuitBreaker::new(BreakerConfig::default()));
        match &r {
            Ok(_) => breaker.on_success(now),
            Err(e) if e.is_retryable() => breaker.on_failure(now),
            Err(_) => {}
        }
        while let Some((from, to)) = breaker.poll_transition() {
            warn!(
                peer = %peer,
                from = from.name(),
                to = to.name(),
                "circuit breaker"
            );
            match to {
                BreakerState::Open { .. } => Progress::add(&self.progress.breaker_opens, 1),
                BreakerState::Closed => Progress::add(&self.progress.breaker_closes, 1),
                BreakerState::HalfOpen => {}
            }
            self.peers.put(&peer, to);
        }
        r
    }

    /// Sleeps before the next attempt, or gives up with the error.
    pub(crate) async fn backoff(&mut self, e: Error, attempt: u32, start: Instant) -> Result<()> {
        if !e.is_retryable() {
            return Err(e);
        }
        let delay =
            match self
                .retry
                .decide(attempt, start.elapsed(), e.retry_after(), &mut self.rng)
            {
                RetryDecision::After(d) => d,
                RetryDecision::GiveUp => {
                    return Err(Error::RetriesExhausted {
                        attempts: attempt,
                        last: Box::new(e),
                    })
                }
            };
        Progress::add(&self.progress.retries, 1);
        warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Ends a status record after a failed attempt: kept with why, as
    /// interrupted (it may be retried) or failed.
    pub(crate) fn interrupted(&self, rec: &mut TransferRecord, done: u64, e: &Error) {
        rec.bytes_done = done;
        rec.last_error = Some(e.to_string());
        rec.state = if e.is_retryable() {
            crate::status::RecordState::Interrupted
        } else {
            crate::status::RecordState::Failed
        };
        let _ = self.status.put(rec);
    }
}
