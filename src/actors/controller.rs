//! The task controller: one actor per task a runner holds.
//!
//! It drives the task's [`TaskRun`] step by step, commits progress after every step (fenced on
//! the runner's claim), and obeys the task's control record: a pause or cancel stops the current
//! step at its next safe point (a block, for a copy), commits what is durable, and moves the task
//! to `Paused` or `Canceled`. It learns of control changes from the runner (the dispatcher's
//! call) and from its own ZooKeeper watch on the control record, so a runner cut off from the
//! dispatcher still obeys.
//!
//! The actor is the task's mailbox; the work runs in a task it spawns ([`Drive`]), which owns the
//! claim, so no state is shared between the two but a `watch` channel of [`Directive`]s.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::runner::{ControllerFinished, Outcome, Runner};
use crate::coord::EventKind;
use crate::exec::{ExecError, Step, StopToken, TaskExecutor, TaskRun};
use crate::model::{Change, DesiredState, Task, TaskControl, TaskProgress, TaskState};
use crate::schedule::{Schedule, WindowCheck};
use crate::store::{layout, StoreError, TaskLock, TaskStore};

/// Temporary executor failures tolerated in a row before the task fails.
pub const MAX_TEMPORARY_FAILURES: u32 = 10;
/// Attempts to commit one checkpoint while the coordination service is unreachable.
pub const MAX_COMMIT_ATTEMPTS: u32 = 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the controller should be doing, as last learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    /// The control record as last read.
    pub control: TaskControl,
    /// The runner is shutting down: checkpoint and hand the task back.
    pub shutdown: bool,
}

impl Directive {
    fn should_stop(&self) -> bool {
        self.shutdown || self.control.desired != DesiredState::Run
    }
}

/// Re-read the control record (it changed, says the dispatcher or a watch).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refresh;

/// Checkpoint and hand the task back (the runner is shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Checkpoint;

/// Stop at once without writing anything (the claim is gone, or the node is being killed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abandon;

/// One task's controller. See the module docs.
pub struct TaskController {
    task: Task,
    store: TaskStore,
    directive: watch::Sender<Directive>,
    abandon: StopToken,
    drive: Option<Drive>,
}

impl TaskController {
    /// A controller for `task`, claimed under `lock`; it starts driving when the actor starts.
    pub(crate) fn new(
        task: Task,
        lock: TaskLock,
        store: TaskStore,
        executor: Arc<dyn TaskExecutor>,
        schedule: Schedule,
        runner: Addr<Runner>,
    ) -> Self {
        let (directive, directives) = watch::channel(Directive { control: task.control.clone(), shutdown: false });
        let abandon = StopToken::new();
        let drive = Drive {
            task: task.clone(),
            lock,
            store: store.clone(),
            executor,
            schedule,
            waiting: false,
            directives,
            abandon: abandon.clone(),
            runner,
        };
        TaskController { task, store, directive, abandon, drive: Some(drive) }
    }
}

impl Actor for TaskController {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(drive) = self.drive.take() {
            actix::spawn(drive.run());
        }
        let (store, id, addr, abandon) = (self.store.clone(), self.task.id, ctx.address(), self.abandon.clone());
        actix::spawn(async move {
            tokio::select! {
                _ = abandon.cancelled() => {}
                _ = watch_control(store, id, addr) => {}
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.abandon.cancel();
    }
}

/// Follows the control record through one-shot watches; asks the actor to refresh on a change.
async fn watch_control(store: TaskStore, id: crate::model::TaskId, addr: Addr<TaskController>) {
    let path = layout::task(&id);
    let mut delay = BACKOFF_MIN;
    loop {
        match store.coordination().exists_watch(&path).await {
            Ok((_, watch)) => {
                delay = BACKOFF_MIN;
                let event = watch.await;
                if addr.try_send(Refresh).is_err() && !addr.connected() {
                    return;
                }
                if event.kind == EventKind::Deleted {
                    return;
                }
            }
            Err(e) => {
                debug!(task = %id, error = %e, "cannot watch the control record; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl Handler<Refresh> for TaskController {
    type Result = ();

    fn handle(&mut self, _: Refresh, _ctx: &mut Context<Self>) {
        let (store, id, directive) = (self.store.clone(), self.task.id, self.directive.clone());
        actix::spawn(async move {
            match store.get(&id).await {
                Ok(task) => {
                    directive.send_if_modified(|d| {
                        let changed = d.control != task.control;
                        d.control = task.control;
                        changed
                    });
                }
                Err(e) => debug!(task = %id, error = %e, "cannot re-read the control record"),
            }
        });
    }
}

impl Handler<Checkpoint> for TaskController {
    type Result = ();

    fn handle(&mut self, _: Checkpoint, _ctx: &mut Context<Self>) {
        self.directive.send_modify(|d| d.shutdown = true);
    }
}

impl Handler<Abandon> for TaskController {
    type Result = ();

    fn handle(&mut self, _: Abandon, ctx: &mut Context<Self>) {
        self.abandon.cancel();
        ctx.stop();
    }
}

/// The work of one controller: owns the claim and the run.
struct Drive {
    task: Task,
    lock: TaskLock,
    store: TaskStore,
    executor: Arc<dyn TaskExecutor>,
    schedule: Schedule,
    /// Whether the status carries a waiting note written by this drive.
    waiting: bool,
    directives: watch::Receiver<Directive>,
    abandon: StopToken,
    runner: Addr<Runner>,
}

/// How a drive ended, before it is reported.
enum End {
    /// Moved to this state (and released the claim).
    Moved(TaskState),
    /// Stopped without a state change: the claim is gone, or the controller was abandoned.
    Dropped(String),
}

impl Drive {
    async fn run(mut self) {
        let id = self.task.id;
        let abandon = self.abandon.clone();
        let end = tokio::select! {
            end = self.drive() => end,
            _ = abandon.cancelled() => End::Dropped("abandoned".into()),
        };
        let outcome = match end {
            End::Moved(state) => {
                info!(task = %id, %state, "task left this runner");
                Outcome::Moved(state)
            }
            End::Dropped(reason) => {
                warn!(task = %id, %reason, "controller stopped without a state change");
                Outcome::Dropped(reason)
            }
        };
        self.runner.do_send(ControllerFinished { id, outcome });
    }

    async fn drive(&mut self) -> End {
        let mut progress = self.task.progress.clone();
        let mut run = match self.open(&mut progress).await {
            Ok(run) => run,
            Err(end) => return end,
        };
        let mut failures = 0;
        loop {
            let directive = self.directives.borrow_and_update().clone();
            if directive.should_stop() {
                return self.stop(&progress, &directive).await;
            }
            let until_ms = match self.schedule.check(&directive.control) {
                WindowCheck::Closed { opens_at_ms, note } => {
                    // Progress is committed (after every step); keep the claim and wait, visibly.
                    if let Err(end) = self.annotate(Some(note)).await {
                        return end;
                    }
                    let opens = self.schedule.clock().sleep_until(opens_at_ms);
                    tokio::select! {
                        _ = opens => {}
                        changed = self.directives.changed() => if changed.is_err() {
                            return End::Dropped("controller gone".into());
                        },
                    }
                    continue;
                }
                WindowCheck::Open { until_ms } => until_ms,
            };
            if self.waiting {
                if let Err(end) = self.annotate(None).await {
                    return end;
                }
            }
            match self.step(run.as_mut(), &mut progress, until_ms).await {
                Ok(Step::More) => {
                    failures = 0;
                    if let Err(end) = self.commit(&progress).await {
                        return end;
                    }
                }
                Ok(Step::Done) => {
                    return match run.finish(&mut progress).await {
                        Ok(()) => self.finish(&progress, TaskState::Succeeded, Change::Plain).await,
                        Err(e) => self.fail(&progress, e).await,
                    };
                }
                Err(ExecError::Temporary(reason)) if failures < MAX_TEMPORARY_FAILURES => {
                    failures += 1;
                    warn!(task = %self.task.id, %reason, failures, "temporary failure; retrying from the last checkpoint");
                    progress = self.task.progress.clone();
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => return self.fail(&progress, e).await,
            }
        }
    }

    /// Starts the run, retrying temporary failures; commits what `start` recorded.
    async fn open(&mut self, progress: &mut TaskProgress) -> Result<Box<dyn TaskRun>, End> {
        let mut failures = 0;
        loop {
            match self.executor.start(&self.task, progress).await {
                Ok(run) => {
                    self.commit(progress).await?;
                    return Ok(run);
                }
                Err(ExecError::Temporary(reason)) if failures < MAX_TEMPORARY_FAILURES => {
                    failures += 1;
                    warn!(task = %self.task.id, %reason, failures, "cannot start the task yet; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => return Err(self.fail(progress, e).await),
            }
        }
    }

    /// Runs one step; cancels its stop token as soon as the directive says stop, or the run
    /// window closes (at `until_ms`, or because a change moved it).
    async fn step(
        &mut self,
        run: &mut dyn TaskRun,
        progress: &mut TaskProgress,
        until_ms: Option<i64>,
    ) -> Result<Step, ExecError> {
        let token = StopToken::new();
        let step = run.step(progress, &token);
        tokio::pin!(step);
        let clock = self.schedule.clock().clone();
        let closes = async move {
            match until_ms {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(closes);
        loop {
            tokio::select! {
                result = &mut step => return result,
                _ = &mut closes, if !token.is_cancelled() => token.cancel(),
                changed = self.directives.changed(), if !token.is_cancelled() => {
                    let stop = match changed {
                        Err(_) => true,
                        Ok(()) => {
                            let directive = self.directives.borrow();
                            directive.should_stop() || matches!(self.schedule.check(&directive.control), WindowCheck::Closed { .. })
                        }
                    };
                    if stop {
                        token.cancel();
                    }
                }
            }
        }
    }

    /// Writes (or clears) the waiting note on the task's status, under the claim.
    async fn annotate(&mut self, note: Option<String>) -> Result<(), End> {
        let waiting = note.is_some();
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            match self.store.annotate(&self.task.id, self.lock.fence(), note.clone()).await {
                Ok(_) => {
                    self.waiting = waiting;
                    if let Some(note) = &note {
                        info!(task = %self.task.id, %note, "outside its run window");
                    }
                    return Ok(());
                }
                Err(e) if e.is_transient() => tokio::time::sleep(backoff(attempt)).await,
                Err(e) => return Err(self.lost(e).await),
            }
        }
        Err(self.give_up().await)
    }

    /// Commits progress, retrying while the coordination service is unreachable.
    async fn commit(&mut self, progress: &TaskProgress) -> Result<(), End> {
        let mut progress = progress.clone();
        progress.updated_at_ms = self.schedule.clock().now_ms();
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            match self.store.commit_progress(&mut self.lock, &progress).await {
                Ok(()) => {
                    self.task.progress = progress;
                    return Ok(());
                }
                Err(e) if e.is_transient() => tokio::time::sleep(backoff(attempt)).await,
                Err(e) => return Err(self.lost(e).await),
            }
        }
        Err(self.give_up().await)
    }

    async fn stop(&mut self, progress: &TaskProgress, directive: &Directive) -> End {
        let (to, why) = match directive.control.desired {
            _ if directive.shutdown => (TaskState::Pending, "runner shutting down"),
            DesiredState::Pause => (TaskState::Paused, "paused"),
            DesiredState::Cancel => (TaskState::Canceled, "canceled"),
            DesiredState::Run => unreachable!("stop is only called when the directive says stop"),
        };
        debug!(task = %self.task.id, %to, why, "stopping at a safe point");
        self.finish(progress, to, Change::Plain).await
    }

    async fn fail(&mut self, progress: &TaskProgress, e: ExecError) -> End {
        let reason = match e {
            ExecError::Temporary(r) => format!("gave up after {MAX_TEMPORARY_FAILURES} temporary failures: {r}"),
            ExecError::Permanent(r) => r,
        };
        self.finish(progress, TaskState::Failed, Change::Failed(reason)).await
    }

    /// Commits the last progress with a state change, atomically, then releases the claim.
    async fn finish(&mut self, progress: &TaskProgress, to: TaskState, change: Change) -> End {
        let mut progress = progress.clone();
        progress.updated_at_ms = self.schedule.clock().now_ms();
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            match self.store.commit_with_transition(&mut self.lock, &progress, to, change.clone()).await {
                Ok(_) => {
                    let _ = self.store.release(self.lock.clone()).await;
                    return End::Moved(to);
                }
                Err(e) if e.is_transient() => tokio::time::sleep(backoff(attempt)).await,
                Err(e) => return self.lost(e).await,
            }
        }
        self.give_up().await
    }

    async fn lost(&mut self, e: StoreError) -> End {
        if !matches!(e, StoreError::Fenced { .. }) {
            let _ = self.store.release(self.lock.clone()).await;
        }
        End::Dropped(e.to_string())
    }

    /// The coordination service stayed unreachable: let the claim go so that the dispatcher can
    /// reschedule the task from its last checkpoint.
    async fn give_up(&mut self) -> End {
        let _ = self.store.release(self.lock.clone()).await;
        End::Dropped("coordination unreachable; claim released".into())
    }
}

fn backoff(attempt: u32) -> Duration {
    (BACKOFF_MIN * 2u32.saturating_pow(attempt.min(16))).min(BACKOFF_MAX)
}
