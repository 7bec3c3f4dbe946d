//! A circuit breaker per peer, driven by the caller's clock.
//!
//! Closed: attempts go through; it opens after `consecutive_failures` failures
//! in a row, or when at least `min_samples` attempts within `window` failed at
//! `failure_rate` or more. Open: no attempt is made until `cooldown` has passed
//! (the cool-down doubles, up to `max_cooldown`, each time a probe fails).
//! Half-open: exactly one probe goes through; its success closes the breaker,
//! its failure opens it again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub window: Duration,
    pub failure_rate: f64,
    pub min_samples: usize,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            window: Duration::from_secs(60),
            failure_rate: 0.5,
            min_samples: 10,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

/// The breaker's state, for logs and `ferry status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    samples: VecDeque<(Instant, bool)>,
    cooldown: Duration,
    probe_out: bool,
    transitions: VecDeque<(BreakerState, BreakerState)>,
}

impl CircuitBreaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let cooldown = cfg.cooldown;
        Self {
            cfg,
            state: BreakerState::Closed,
            consecutive: 0,
            samples: VecDeque::new(),
            cooldown,
            probe_out: false,
            transitions: VecDeque::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    fn set(&mut self, to: BreakerState) {
        if std::mem::discriminant(&to) != std::mem::discriminant(&self.state) {
            self.transitions.push_back((self.state, to));
        }
        self.state = to;
    }

    /// State changes since the last call, oldest first (for logging).
    pub fn poll_transition(&mut self) -> Option<(BreakerState, BreakerState)> {
        self.transitions.pop_front()
    }

    /// May an attempt be made now? `Err(t)`: not before `t`.
    pub fn allow(&mut self, now: Instant) -> Result<(), Instant> {
        match self.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open { until } if now < until => Err(until),
            BreakerState::Open { .. } => {
                self.set(BreakerState::HalfOpen);
                self.probe_out = true;
                Ok(())
            }
            BreakerState::HalfOpen if self.probe_out => {
                Err(now + self.cfg.cooldown.min(Duration::from_secs(1)))
            }
            BreakerState::HalfOpen => {
                self.probe_out = true;
                Ok(())
            }
        }
    }

    pub fn on_success(&mut self, now: Instant) {
        self.record(now, true);
        self.consecutive = 0;
        self.probe_out = false;
        self.cooldown = self.cfg.cooldown;
        self.set(BreakerState::Closed);
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.record(now, false);
        self.consecutive += 1;
        match self.state {
            BreakerState::HalfOpen => {
                self.probe_out = false;
                self.cooldown = (self.cooldown * 2).min(self.cfg.max_cooldown);
                self.set(BreakerState::Open {
                    until: now + self.cooldown,
                });
            }
            BreakerState::Closed => {
                let fails = self.samples.iter().filter(|(_, ok)| !ok).count();
                let rate_trips = self.samples.len() >= self.cfg.min_samples
                    && fails as f64 >= self.cfg.failure_rate * self.samples.len() as f64;
                if self.consecutive >= self.cfg.consecutive_failures || rate_trips {
                    self.set(BreakerState::Open {
                        until: now + self.cooldown,
                    });
                }
            }
            BreakerState::Open { .. } => {}
        }
    }

    fn record(&mut self, now: Instant, ok: bool) {
        self.samples.push_back((now, ok));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.cfg.window)
        {
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Instant {
        #[allow(clippy::disallowed_methods)] // one origin; the test advances time by hand
        Instant::now()
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_then_closes() {
        let t0 = origin();
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        for i in 0..4 {
            assert!(b.allow(t0).is_ok());
            b.on_failure(t0 + Duration::from_millis(i));
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.on_failure(t0);
        let until = t0 + Duration::from_secs(5);
        assert_eq!(b.state(), BreakerState::Open { until });
        assert_eq!(
            b.poll_transition(),
            Some((BreakerState::Closed, BreakerState::Open { until }))
        );
        // No attempt during the cool-down.
        assert_eq!(b.allow(t0 + Duration::from_secs(4)), Err(until));
        // One probe after it; a second caller waits.
        assert!(b.allow(until).is_ok());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(until).is_err());
        b.on_success(until);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(until).is_ok());
    }

    #[test]
    fn failed_probe_reopens_with_longer_cooldown() {
        let t0 = origin();
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..Default::default()
        });
        b.on_failure(t0);
        let t1 = t0 + Duration::from_secs(5);
        assert!(b.allow(t1).is_ok());
        b.on_failure(t1);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t1 + Duration::from_secs(10)
            }
        );
        let mut t = t1;
        for _ in 0..10 {
            t += Duration::from_secs(200);
            assert!(b.allow(t).is_ok());
            b.on_failure(t);
        }
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t + Duration::from_secs(30)
            },
            "capped"
        );
    }

    #[test]
    fn failure_rate_over_window_trips() {
        let t0 = origin();
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        // Alternate success and failure: never 5 in a row, but 50 % failures.
        for i in 0..10u64 {
            let t = t0 + Duration::from_secs(i);
            if i % 2 == 0 {
                b.on_success(t);
            } else {
                b.on_failure(t);
            }
        }
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = origin();
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        for i in 0..9u64 {
            b.on_failure(t0 + Duration::from_secs(i * 100));
            b.on_success(t0 + Duration::from_secs(i * 100 + 1));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
