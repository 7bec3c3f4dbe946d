//! When to try again: exponential backoff with full jitter, capped in
//! attempts and total time. Pure: the caller passes elapsed time and a seeded
//! RNG, so every schedule is reproducible under test.
//!
//! Full jitter (a uniform draw in `0..=min(ceiling, initial·multiplier^n)`)
//! spreads reconnecting clients apart best when many lose the same server at
//! once, and never waits longer than the capped exponential.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    /// Attempts in a row without progress before giving up (0 = unlimited).
    pub max_attempts: u32,
    /// Total time without progress before giving up (`None` = unlimited).
    pub budget: Option<Duration>,
}

/// Longest "retry after" hint from a peer that is obeyed.
pub const MAX_HINT: Duration = Duration::from_secs(300);

/// What a failed attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait this long, then try again.
    After(Duration),
    /// The policy is exhausted (attempts or budget).
    GiveUp,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            max_attempts: 10,
            budget: None,
        }
    }
}

impl RetryPolicy {
    /// Decides after failed attempt number `attempt` (from 1), honouring the
    /// peer's "retry after" hint when it asks for more patience than the schedule.
    pub fn decide(
        &self,
        attempt: u32,
        elapsed: Duration,
        hint: Option<Duration>,
        rng: &mut impl Rng,
    ) -> RetryDecision {
        match self.delay(attempt, elapsed, rng) {
            None => RetryDecision::GiveUp,
            Some(d) => {
                // A hint is honoured up to 5 minutes: a peer cannot park us forever.
                let d = hint.map_or(d, |h| d.max(h.min(MAX_HINT)));
                match self.budget {
                    Some(b) if elapsed + d > b => RetryDecision::After(b.saturating_sub(elapsed)),
                    _ => RetryDecision::After(d),
                }
            }
        }
    }

    /// The wait before attempt `attempt + 1` (attempts count from 1), or
    /// `None` when the policy says stop.
    pub fn delay(&self, attempt: u32, elapsed: Duration, rng: &mut impl Rng) -> Option<Duration> {
        if self.max_attempts != 0 && attempt >= self.max_attempts {
            return None;
        }
        if self.budget.is_some_and(|b| elapsed >= b) {
            return None;
        }
        let exp = self.initial.as_secs_f64()
            * self
                .multiplier
                .powi(attempt.saturating_sub(1).min(64) as i32);
        let cap = exp.min(self.max_delay.as_secs_f64()).max(0.0);
        let d = Duration::from_secs_f64(rng.gen_range(0.0..=cap));
        Some(match self.budget {
            Some(b) => d.min(b.saturating_sub(elapsed)),
            None => d,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_stay_within_the_capped_exponential() {
        let p = RetryPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for attempt in 1..10 {
            let cap = (0.25 * 2f64.powi(attempt as i32 - 1)).min(30.0);
            for _ in 0..100 {
                let d = p
                    .delay(attempt, Duration::ZERO, &mut rng)
                    .unwrap()
                    .as_secs_f64();
                assert!(d <= cap + 1e-9, "attempt {attempt}: {d} > {cap}");
            }
        }
        assert!(p.delay(10, Duration::ZERO, &mut rng).is_none());
    }

    #[test]
    fn jitter_is_spread_over_the_whole_range() {
        // Full jitter: draws for one attempt fill [0, cap] roughly uniformly.
        let p = RetryPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cap = 0.25 * 2f64.powi(3);
        let mut buckets = [0u32; 4];
        for _ in 0..4000 {
            let d = p.delay(4, Duration::ZERO, &mut rng).unwrap().as_secs_f64();
            buckets[((d / cap * 4.0) as usize).min(3)] += 1;
        }
        for b in buckets {
            assert!((800..1200).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let p = RetryPolicy::default();
        let a: Vec<_> = (1..8)
            .map(|i| p.delay(i, Duration::ZERO, &mut rand::rngs::StdRng::seed_from_u64(9)))
            .collect();
        let b: Vec<_> = (1..8)
            .map(|i| p.delay(i, Duration::ZERO, &mut rand::rngs::StdRng::seed_from_u64(9)))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn server_hint_is_honoured_within_reason() {
        let p = RetryPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(5)), &mut rng),
            RetryDecision::After(Duration::from_secs(5))
        );
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(9999)), &mut rng),
            RetryDecision::After(Duration::from_secs(300))
        );
        assert_eq!(
            p.decide(10, Duration::ZERO, None, &mut rng),
            RetryDecision::GiveUp
        );
    }

    #[test]
    fn budget_stops_and_clips() {
        let p = RetryPolicy {
            budget: Some(Duration::from_secs(1)),
            max_attempts: 0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        assert!(p.delay(1, Duration::from_secs(2), &mut rng).is_none());
        assert!(
            p.delay(20, Duration::from_millis(900), &mut rng).unwrap()
                <= Duration::from_millis(100)
        );
    }
}
