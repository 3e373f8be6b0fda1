//! The runner's local lease on its ZooKeeper session: how a runner fences itself.
//!
//! ZooKeeper expires a session once it has heard nothing from it for the session timeout; then
//! the session's claims vanish and the dispatcher hands their tasks to other runners. A runner
//! cut off from ZooKeeper (a partition, a freeze, a slow network) learns of that late, or never,
//! so it must stop writing **before** the server can expire the session. The rule:
//!
//! > A runner may write a task's target only while its local lease is valid. The lease is
//! > renewed by a successful round trip to ZooKeeper *sent* at local time `t`, on the session
//! > that holds the claim, and it is then valid until `t + session_timeout / 2`.
//!
//! The server cannot have expired the session before `t + session_timeout`: it heard from the
//! session at or after `t`. The half that is left is the margin for the **clock assumption** and
//! for writes in flight, together: for instance, the local monotonic clock runs no slower than
//! the server's by more than a factor of 1.5 (so the lease ends within `3/4` of the session
//! timeout, server time) and a write issued before the lease ends reaches the disk within the
//! last quarter. A write slower than that is what the backend's fencing catches (see the `copy`
//! module's contract). The clock is the monotonic one, which stops while the machine is
//! suspended: a host suspended with a lease is no safer than one frozen, and the backend's
//! fencing covers both.
//!
//! The lease is renewed by heartbeats (an `exists` of the chroot) sent every sixth of the
//! session timeout without waiting for earlier answers, so a healthy runner never sees it lapse,
//! and one slow answer does not lapse it either. A lapsed lease is not the end: if the same
//! session comes back, the next round trip renews it and the runner checks that its claim is
//! still there before it writes again; if the session expired, its claims are gone and the runner
//! drops its tasks.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::coord::{Coordination, SessionState};

/// Shortest heartbeat interval, whatever the session timeout.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);

/// The lease as last renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// The session generation the lease is about (see [`SessionStatus`](crate::coord::SessionStatus)).
    pub generation: u64,
    /// Writes are allowed until this instant; `None`: not now.
    pub valid_until: Option<Instant>,
}

/// A reader of the local lease. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalLease {
    state: Option<watch::Receiver<LeaseState>>,
}

impl LocalLease {
    /// A lease that never lapses: for runs that no session guards (tests, one-shot copies).
    pub fn unlimited() -> Self {
        LocalLease { state: None }
    }

    /// A lease that follows `state`.
    pub fn following(state: watch::Receiver<LeaseState>) -> Self {
        LocalLease { state: Some(state) }
    }

    /// Until when writes of session generation `generation` are allowed (`None`: not now);
    /// `Some(far future)` for an unlimited lease.
    pub fn valid_until(&self, generation: u64) -> Option<Instant> {
        match &self.state {
            None => Some(far_future()),
            Some(state) => {
                let state = *state.borrow();
                state.valid_until.filter(|_| state.generation == generation)
            }
        }
    }

    /// Whether writes of session generation `generation` are allowed now (read from the clock
    /// at the call, so a process that was frozen sees its lease lapsed as soon as it runs again).
    pub fn is_valid(&self, generation: u64) -> bool {
        self.valid_until(generation).is_some_and(|until| Instant::now() < until)
    }

    /// Waits until the lease of `generation` lapses (returns at once if it has).
    pub async fn lapsed(&self, generation: u64) {
        let Some(state) = &self.state else { return std::future::pending().await };
        let mut state = state.clone();
        loop {
            let Some(until) = self.valid_until(generation).filter(|until| Instant::now() < *until) else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                changed = state.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Waits until the lease of `generation` is valid again; `false` if it never can be (the
    /// session of that generation is gone, or the keeper stopped).
    pub async fn renewed(&self, generation: u64) -> bool {
        let Some(state) = &self.state else { return true };
        let mut state = state.clone();
        loop {
            if self.is_valid(generation) {
                return true;
            }
            if state.borrow().generation > generation {
                return false;
            }
            if state.changed().await.is_err() {
                return false;
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// Heartbeats in flight at most: a slow answer does not hold up the next heartbeat.
const MAX_HEARTBEATS_IN_FLIGHT: usize = 4;

/// Keeps the local lease of a coordination handle's session: heartbeats, renewals, and lapses.
/// A heartbeat goes out every sixth of the session timeout whether or not the previous ones
/// were answered, and any answer renews the lease from the time its request was sent (never
/// moving the lease back), so one slow answer does not lapse a healthy runner. Runs until
/// `coord` is closed or every reader is gone.
pub async fn keep(coord: Arc<dyn Coordination>, lease: watch::Sender<LeaseState>) {
    let mut session = coord.subscribe();
    let mut beats = FuturesUnordered::new();
    let mut next_beat = Instant::now();
    loop {
        let status = *session.borrow_and_update();
        if status.state == SessionState::Closed {
            lease.send_replace(LeaseState { generation: status.generation, valid_until: None });
            return;
        }
        if status.state == SessionState::Expired || status.generation != lease.borrow().generation {
            lease.send_replace(LeaseState { generation: status.generation, valid_until: None });
        }
        if lease.is_closed() {
            return;
        }
        let timeout = coord.session_timeout();
        tokio::select! {
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat = Instant::now() + (timeout / 6).max(MIN_HEARTBEAT);
                if status.state == SessionState::Connected && beats.len() < MAX_HEARTBEATS_IN_FLIGHT {
                    let coord = coord.clone();
                    beats.push(async move {
                        let sent = Instant::now();
                        let answered = tokio::time::timeout(timeout, coord.exists("/")).await;
                        (status.generation, sent, matches!(answered, Ok(Ok(_))))
                    });
                }
            }
            Some((generation, sent, answered)) = beats.next() => {
                let now = *session.borrow();
                if answered && now.generation == generation && now.state != SessionState::Expired {
                    let until = sent + timeout / 2;
                    lease.send_if_modified(|state| {
                        let renew = state.generation == generation && state.valid_until.is_none_or(|u| u < until);
                        if renew {
                            state.valid_until = Some(until);
                        }
                        renew
                    });
                } else if !answered {
                    debug!(generation, "lease heartbeat got no answer");
                }
            }
            changed = session.changed() => if changed.is_err() { return },
        }
    }
}

/// Starts [`keep`] for `coord` on the current actix/tokio task set; returns its reader.
pub fn start(coord: Arc<dyn Coordination>) -> LocalLease {
    let generation = coord.status().generation;
    let (tx, rx) = watch::channel(LeaseState { generation, valid_until: None });
    actix::spawn(keep(coord, tx));
    LocalLease::following(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::EmbeddedServer;

    #[tokio::test(start_paused = true)]
    async fn lease_lapses_at_half_the_session_timeout_after_the_last_answer_and_comes_back() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let server = EmbeddedServer::new();
                let handle = server.connect();
                let coord: Arc<dyn Coordination> = Arc::new(handle.clone());
                let timeout = coord.session_timeout();
                let lease = start(coord.clone());
                let generation = coord.status().generation;
                assert!(lease.renewed(generation).await);
                assert!(lease.is_valid(generation));
                let suspended_at = Instant::now();
                handle.suspend();
                lease.lapsed(generation).await;
                let lapsed_after = Instant::now() - suspended_at;
                assert!(lapsed_after <= timeout / 2, "lapsed {lapsed_after:?} after the last contact");
                assert!(!lease.is_valid(generation));
                handle.resume();
                assert!(lease.renewed(generation).await);
                assert!(!lease.is_valid(generation + 1), "a lease is for one session");
            })
            .await;
    }
}
