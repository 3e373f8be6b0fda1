//! Time, injectable: every part of the crate that needs "now", or needs to wait for a wall-clock
//! moment (a run window opening), asks a [`Clock`], so tests move time instead of waiting hours.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;

/// Longest single sleep of [`SystemClock::sleep_until`]: it wakes at least this often to notice a
/// wall clock that was stepped (NTP, an operator).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> i64;

    /// Resolves once [`Clock::now_ms`] has reached `deadline_ms`.
    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()>;

    /// Now, as a timestamp.
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.now_ms()).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }

    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            loop {
                let left = deadline_ms.saturating_sub(SystemClock.now_ms());
                if left <= 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(left as u64).min(MAX_SLEEP)).await;
            }
        })
    }
}

/// A clock that moves only when told to; for tests. Sleepers wake when it is moved past their
/// deadline. Cheap to clone; clones share the time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now_ms: Arc<watch::Sender<i64>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock { now_ms: Arc::new(watch::Sender::new(now_ms)) }
    }

    /// A clock standing at `at`.
    pub fn at(at: jiff::Timestamp) -> Self {
        ManualClock::new(at.as_millisecond())
    }

    /// Sets the time (it may go backwards, as a stepped wall clock can).
    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.send_replace(now_ms);
    }

    /// Sets the time to `at`.
    pub fn set(&self, at: jiff::Timestamp) {
        self.set_ms(at.as_millisecond());
    }

    /// Moves the time forward by `delta_ms`.
    pub fn advance_ms(&self, delta_ms: i64) {
        self.now_ms.send_modify(|now| *now += delta_ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        *self.now_ms.borrow()
    }

    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        let mut now = self.now_ms.subscribe();
        Box::pin(async move {
            // The sender lives in every clone of the clock; if all are gone, time stands still.
            if now.wait_for(|now| *now >= deadline_ms).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleepers_wake_when_time_passes_their_deadline() {
        let clock = ManualClock::new(1_000);
        let sleeper = tokio::spawn(clock.sleep_until(5_000));
        clock.advance_ms(3_000);
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "4 000 < 5 000");
        clock.set_ms(5_000);
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.unwrap().unwrap();
        assert_eq!(clock.now().as_millisecond(), 5_000);
    }

    #[tokio::test]
    async fn system_sleep_until_the_past_returns_at_once() {
        let now = SystemClock.now_ms();
        tokio::time::timeout(Duration::from_secs(1), SystemClock.sleep_until(now - 10)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), SystemClock.sleep_until(now + 20)).await.unwrap();
    }
}
