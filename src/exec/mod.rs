//! Executors: what actually does a task's work, step by step.
//!
//! The task controller owns the life of a task run (claim, control, commits, state); an
//! [`TaskExecutor`] owns the work. The controller calls [`TaskRun::step`] repeatedly and commits
//! the progress after every step, so a step is the unit of resumption (for a copy: an extent).
//! A step must stop early, at a safe point, when its [`StopToken`] is cancelled (for a copy:
//! at the next block), and leave in `progress` only what is durable.
//!
//! A run writes only under its [`Licence`]: the claim's [`WriterLease`] (which the storage checks)
//! and the runner's [`LocalLease`] on its session (which the run checks before every write, so
//! that a runner cut off from ZooKeeper stops writing before its claim can pass to another).
//!
//! The copy engine is the crate's real executor; [`SimulatedExecutor`] stands in for it in tests
//! of the cluster's behaviour, where what matters is steps, stops and resumes, not bytes.

use std::time::Duration;

use async_trait::async_trait;

use crate::lease::LocalLease;
use crate::model::{Task, TaskProgress, WriterLease};

pub use tokio_util::sync::CancellationToken as StopToken;

/// Why a run or a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// A passing failure (a peer unreachable, a volume busy): the controller retries with backoff,
    /// up to its limit, from the last committed progress.
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// A failure that retrying cannot cure (a volume missing, sizes that do not match): the task
    /// fails with this reason.
    #[error("{0}")]
    Permanent(String),
    /// The storage admitted a newer writer lease for the target: another runner (or another
    /// task) owns it now. The controller stops the run at once and never retries the write.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The runner's local lease on its session lapsed ([`Licence::check`]): the run stops at
    /// once; the controller writes again only once the same session answers and its claim is
    /// confirmed.
    #[error("lease lapsed: {0}")]
    Lapsed(String),
    /// The target is held by another writer that has not let it go yet (the file backend's
    /// writer lock): retried with backoff, without counting toward the failure limit, since
    /// the holder lets go when it stops or dies.
    #[error("busy: {0}")]
    Busy(String),
}

/// What a run may write under: the claim's writer lease and the runner's local lease on the
/// session that holds the claim. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Licence {
    lease: WriterLease,
    local: LocalLease,
    generation: u64,
}

impl Licence {
    /// A licence for writes under `lease` while `local` is valid for session `generation`.
    pub fn new(lease: WriterLease, local: LocalLease, generation: u64) -> Self {
        Licence { lease, local, generation }
    }

    /// A licence whose local lease never lapses: for runs no session guards (tests, one-shot
    /// copies). The storage still fences by `lease`.
    pub fn unlimited(lease: WriterLease) -> Self {
        Licence { lease, local: LocalLease::unlimited(), generation: 0 }
    }

    /// The writer lease the storage checks.
    pub fn lease(&self) -> &WriterLease {
        &self.lease
    }

    /// The local lease.
    pub fn local(&self) -> &LocalLease {
        &self.local
    }

    /// The session generation the claim belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `Ok` while writes are allowed; [`ExecError::Lapsed`] once the local lease has lapsed.
    /// Reads the clock at the call: call it right before each write.
    pub fn check(&self) -> Result<(), ExecError> {
        if self.local.is_valid(self.generation) {
            Ok(())
        } else {
            Err(ExecError::Lapsed(format!(
                "the local lease on the session lapsed (no answer from the coordination service in time); {} may \
                 no longer write",
                self.lease
            )))
        }
    }
}

/// What a step achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More work remains (the step may also have stopped early because the token was
    /// cancelled).
    More,
    /// All work is done; [`TaskRun::finish`] comes next.
    Done,
}

/// Starts runs of tasks. Shared by all controllers of a node.
#[async_trait]
pub trait TaskExecutor: Send + Sync + 'static {
    /// Prepares a run of `task` resuming from `progress` (which it may update, for instance with
    /// the source snapshot it chose: the controller commits it before the first step). The run
    /// writes only under `licence`.
    async fn start(
        &self,
        task: &Task,
        licence: &Licence,
        progress: &mut TaskProgress,
    ) -> Result<Box<dyn TaskRun>, ExecError>;
}

/// One run of one task on one runner.
#[async_trait]
pub trait TaskRun: Send {
    /// Does the next unit of work, stopping early at a safe point if `stop` is cancelled.
    /// On return `progress` describes only what is durable.
    async fn step(&mut self, progress: &mut TaskProgress, stop: &StopToken) -> Result<Step, ExecError>;

    /// Completes the task after the last step (for a copy: flush, snapshot the target, record
    /// the digest).
    async fn finish(&mut self, progress: &mut TaskProgress) -> Result<(), ExecError> {
        let _ = progress;
        Ok(())
    }
}

/// An executor that "works" for a fixed number of steps of fixed duration, advancing the cursor
/// by one unit per step. For tests of scheduling, failover, pause and cancel.
#[derive(Clone, Debug)]
pub struct SimulatedExecutor {
    steps: u64,
    step_duration: Duration,
    unit_bytes: u64,
}

impl SimulatedExecutor {
    /// Tasks take `steps` steps of `step_duration` each; a step stands for `unit_bytes` bytes.
    pub fn new(steps: u64, step_duration: Duration, unit_bytes: u64) -> Self {
        SimulatedExecutor { steps, step_duration, unit_bytes }
    }
}

impl Default for SimulatedExecutor {
    /// Ten steps of 10 ms, of 1 MiB each.
    fn default() -> Self {
        SimulatedExecutor::new(10, Duration::from_millis(10), 1 << 20)
    }
}

#[async_trait]
impl TaskExecutor for SimulatedExecutor {
    async fn start(
        &self,
        _task: &Task,
        licence: &Licence,
        progress: &mut TaskProgress,
    ) -> Result<Box<dyn TaskRun>, ExecError> {
        let total = self.steps * self.unit_bytes;
        if progress.total_bytes.is_some_and(|t| t != total) {
            return Err(ExecError::Permanent(format!(
                "progress says {} bytes in all, this executor does {total}",
                progress.total_bytes.unwrap_or_default()
            )));
        }
        progress.total_bytes = Some(total);
        Ok(Box::new(SimulatedRun {
            total,
            step_duration: self.step_duration,
            unit_bytes: self.unit_bytes,
            licence: licence.clone(),
        }))
    }
}

struct SimulatedRun {
    total: u64,
    step_duration: Duration,
    unit_bytes: u64,
    licence: Licence,
}

#[async_trait]
impl TaskRun for SimulatedRun {
    async fn step(&mut self, progress: &mut TaskProgress, stop: &StopToken) -> Result<Step, ExecError> {
        if progress.cursor_bytes >= self.total {
            return Ok(Step::Done);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(Step::More),
            _ = tokio::time::sleep(self.step_duration) => {}
        }
        // The "write" of this step.
        self.licence.check()?;
        let unit = self.unit_bytes.min(self.total - progress.cursor_bytes);
        progress.cursor_bytes += unit;
        progress.counters.bytes_copied += unit;
        Ok(if progress.cursor_bytes >= self.total { Step::Done } else { Step::More })
    }
}
