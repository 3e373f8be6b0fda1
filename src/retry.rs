//! The crate's one retry policy: exponential backoff with jitter and a cap, built on `backon`.
//!
//! Every loop that retries something that may succeed later (a ZooKeeper call that met a
//! connection loss, a session being re-established, a registration, an assignment to a runner,
//! a task step that failed for a passing reason) waits by a [`Backoff`] from this module, so that
//! the crate has one rule for it:
//!
//! - retry `n` (from 1) waits a uniformly random time in `[d, 2d)`, with
//!   `d = min · 2^(n−1)`, and never longer than `max`;
//! - the jitter is drawn per process, so nodes that met the same outage do not all come back at
//!   the same instant.
//!
//! Errors that cannot succeed are not retried at all: callers check
//! [`CoordError::is_transient`](crate::coord::CoordError::is_transient) and its siblings first.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// An exponential backoff with jitter, between `min` and a cap of `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The shortest wait (the first retry waits between `min` and `2·min`).
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

/// Calls to the coordination service and everything that follows a session: connecting,
/// starting, watches, registration, election, sweeps. 100 ms, doubling, up to 5 s.
pub(crate) const COORDINATION: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// A task step that failed for a passing reason, or a busy target: 100 ms, doubling, up to 10 s.
pub(crate) const STEP: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Assignments the dispatcher could not deliver, and runners it could not call: 200 ms,
/// doubling, up to 10 s.
pub(crate) const ASSIGN: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

/// A compare-and-set that lost a race to another writer: 5 ms, doubling, up to 100 ms.
pub(crate) const CAS: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(100));

/// A request forwarded to a leader that is not there yet: 20 ms, doubling, up to 1 s.
pub(crate) const FORWARD: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));

impl Backoff {
    /// A policy from `min` (positive) to `max` (at least `min`).
    pub const fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max }
    }

    /// A fresh, endless sequence of waits.
    pub fn delays(&self) -> Delays {
        Delays { policy: *self, inner: self.exponential().build() }
    }

    /// The wait before retry number `attempt` (from 1), for callers that count attempts
    /// themselves rather than keep a [`Delays`].
    pub fn delay(&self, attempt: u32) -> Duration {
        // The base doubles at most 40 times before any sane cap is reached.
        let skip = attempt.saturating_sub(1).min(40) as usize;
        self.delays().nth(skip).unwrap_or(self.max)
    }

    fn exponential(&self) -> ExponentialBuilder {
        // backon adds a jitter of up to the base itself, so the base stops at half the cap.
        ExponentialBuilder::new()
            .with_min_delay(self.min)
            .with_max_delay((self.max / 2).max(self.min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }
}

impl BackoffBuilder for Backoff {
    type Backoff = Delays;

    fn build(self) -> Delays {
        self.delays()
    }
}

/// An endless sequence of waits by a [`Backoff`]; [`Delays::reset`] after a success.
#[derive(Debug)]
pub struct Delays {
    policy: Backoff,
    inner: backon::ExponentialBackoff,
}

impl Delays {
    /// Starts again from the shortest wait (after a success).
    pub fn reset(&mut self) {
        *self = self.policy.delays();
    }

    /// Sleeps for the next wait.
    pub async fn wait(&mut self) {
        let delay = self.next().unwrap_or(self.policy.max);
        tokio::time::sleep(delay).await;
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.inner.next().unwrap_or(self.policy.max).min(self.policy.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_with_jitter_and_stay_under_the_cap() {
        let policy = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..200 {
            let waits: Vec<Duration> = policy.delays().take(12).collect();
            for (n, wait) in waits.iter().enumerate() {
                let base = (policy.min * 2u32.pow(n as u32)).min(policy.max / 2);
                assert!(*wait >= base && *wait < base * 2 + Duration::from_millis(1), "retry {}: {wait:?}", n + 1);
                assert!(*wait <= policy.max, "retry {}: {wait:?} over the cap", n + 1);
            }
        }
    }

    #[test]
    fn two_sequences_do_not_wait_in_lockstep() {
        let waits = |_| COORDINATION.delays().take(8).collect::<Vec<_>>();
        let runs: Vec<Vec<Duration>> = (0..5).map(waits).collect();
        assert!(runs.windows(2).any(|w| w[0] != w[1]), "five sequences drew the same waits: {runs:?}");
    }

    #[test]
    fn reset_starts_again_from_the_shortest_wait() {
        let mut delays = STEP.delays();
        let late = delays.nth(10).unwrap();
        assert!(late >= STEP.max / 2, "{late:?}");
        delays.reset();
        assert!(delays.next().unwrap() < STEP.min * 2);
    }

    #[test]
    fn counted_attempts_follow_the_same_rule() {
        assert!(ASSIGN.delay(1) < ASSIGN.min * 2 && ASSIGN.delay(1) >= ASSIGN.min);
        assert!(ASSIGN.delay(1_000) <= ASSIGN.max && ASSIGN.delay(1_000) >= ASSIGN.max / 2);
        assert!(ASSIGN.delay(0) < ASSIGN.min * 2);
    }

    #[test]
    fn a_minimum_above_half_the_cap_is_still_capped() {
        let policy = Backoff::new(Duration::from_secs(4), Duration::from_secs(5));
        assert!(policy.delays().take(20).all(|d| d <= policy.max && d >= policy.min));
    }
}
