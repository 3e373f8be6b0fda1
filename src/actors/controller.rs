//! The task controller: one actor per task a runner holds.
//!
//! It drives the task's [`TaskRun`] step by step, commits progress after every step (fenced on
//! the runner's claim), and obeys the task's control record: a pause or cancel stops the current
//! step at its next safe point (a block, for a copy), commits what is durable, and moves the task
//! to `Paused` or `Canceled`. It learns of control changes from the runner (the dispatcher's
//! call) and from its own ZooKeeper watch on the control record, so a runner cut off from the
//! dispatcher still obeys.
//!
//! The actor is the task's mailbox; the work runs in a task it spawns (`Drive`), which owns the
//! claim, so no state is shared between the two but a `watch` channel of [`Directive`]s.
//!
//! # The data plane, deadlines and stops
//!
//! The executor's calls (`start`, every `step`, `finish`) run on the node's **data-plane
//! runtime**, never on the thread of the ZooKeeper session and the actors, each as a task of its
//! own, so that a slow, CPU-heavy, hung or panicking backend cannot starve the session or take
//! the controller down:
//!
//! - **Deadline**: a call that has not returned after `step_timeout` (four times that for
//!   `start` and `finish`, which take snapshots) is aborted and counts as a temporary failure (a
//!   hung backend call).
//! - **Stops preempt**: on pause, cancel, shutdown or the end of the run window the step's stop
//!   token is cancelled (the copy stops at its next block and ends any wait for bandwidth); a
//!   step still running `stop_timeout` later is aborted and the task stops from its last
//!   committed progress. So a stop takes effect within `stop_timeout` plus one progress commit.
//! - **Lease**: the run writes only while the runner's local lease on its session is valid (see
//!   [`crate::lease`]); when it lapses the call is aborted **at once** (the engine also checks
//!   the lease before each write), and the controller waits for the same session to answer
//!   again and confirms that its claim still exists before it writes again.
//! - **Panics** are caught: a temporary failure with the panic's message, retried with backoff
//!   like any other, and after the limit of temporary failures in a row (by default
//!   [`MAX_TEMPORARY_FAILURES`]) the task fails with it as its reason.
//! - **Fenced by the storage** (it admitted a newer writer lease): if the claim is gone, the task
//!   is dropped (its new owner goes on); if the lease is valid and the claim is still ours,
//!   another task holds the volume and the task fails with the storage's reason. With a lapsed
//!   lease it is a lapse. A **busy** target (another writer still holds it) is waited for with
//!   backoff, not counted as a failure.
//! - The run, and with it the target, is let go whenever the controller waits: for the window,
//!   for the lease, or on a commit during which the lease lapsed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::runner::{ControllerFinished, Outcome, Runner};
use crate::coord::EventKind;
use crate::exec::{ExecError, Licence, Step, StopToken, TaskExecutor, TaskRun};
use crate::model::{Change, DesiredState, Task, TaskControl, TaskProgress, TaskState};
use crate::schedule::{Schedule, WindowCheck};
use crate::store::{layout, StoreError, TaskLock, TaskStore};

/// Temporary executor failures tolerated in a row before the task fails, by default (see
/// [`TaskCenterBuilder::temporary_failure_limit`](crate::TaskCenterBuilder::temporary_failure_limit)).
pub const MAX_TEMPORARY_FAILURES: u32 = 10;
/// Attempts to commit one checkpoint while the coordination service is unreachable.
pub const MAX_COMMIT_ATTEMPTS: u32 = 20;

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

/// How the controller bounds the executor's calls (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct DriveSettings {
    /// The runtime the executor's calls run on.
    pub data: tokio::runtime::Handle,
    /// A call that runs longer is aborted (a temporary failure).
    pub step_timeout: Duration,
    /// A call still running this long after a stop was asked is aborted.
    pub stop_timeout: Duration,
    /// Temporary failures in a row after which the task fails.
    pub failure_limit: u32,
}

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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        task: Task,
        lock: TaskLock,
        licence: Licence,
        store: TaskStore,
        executor: Arc<dyn TaskExecutor>,
        schedule: Schedule,
        settings: DriveSettings,
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
            licence,
            settings,
            failures: 0,
            busy: 0,
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
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        match store.coordination().exists_watch(&path).await {
            Ok((_, watch)) => {
                delays.reset();
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
                delays.wait().await;
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
    licence: Licence,
    settings: DriveSettings,
    /// Temporary failures in a row.
    failures: u32,
    /// Waits for a busy target in a row (for the backoff; not a failure).
    busy: u32,
}

/// How a drive ended, before it is reported.
enum End {
    /// Moved to this state (and released the claim).
    Moved(TaskState),
    /// Stopped without a state change: the claim is gone, or the controller was abandoned.
    Dropped(String),
}

/// How a call on the data plane ended.
enum Call<T> {
    /// It returned.
    Returned(T),
    /// It panicked, with this message.
    Panicked(String),
    /// It ran past the step timeout and was aborted.
    TimedOut,
    /// A stop was asked (or the window closed) and it did not return within the stop timeout.
    Stopped,
    /// The local lease lapsed; it was aborted at once.
    Lapsed,
}

/// What the drive does next after a call that did not move the task on.
enum Next {
    /// A temporary failure: counted, retried with backoff.
    Retry(String),
    /// The target is busy: retried with backoff, not counted.
    Wait(String),
    /// Stopped, or the lease lapsed: the top of the loop decides.
    Resume,
    /// The drive is over.
    End(End),
}

/// `start` and `finish` take snapshots, which copy whole volumes where the storage cannot
/// reflink: their deadline is this many step timeouts.
const SNAPSHOT_DEADLINE_FACTOR: u32 = 4;

/// What a step hands back: the run, the progress, and the step's result.
type Stepped = (Box<dyn TaskRun>, TaskProgress, Result<Step, ExecError>);

/// A task on the data plane, aborted when dropped (so that abandoning a drive aborts its call).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
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
        let _ = self.runner.send(ControllerFinished { id, outcome }).await;
    }

    async fn drive(&mut self) -> End {
        let mut progress = self.task.progress.clone();
        let mut run: Option<Box<dyn TaskRun>> = None;
        loop {
            let directive = self.directives.borrow_and_update().clone();
            if directive.should_stop() {
                let committed = self.task.progress.clone();
                return self.stop(&committed, &directive).await;
            }
            let until_ms = match self.schedule.check(&directive.control) {
                WindowCheck::Closed { opens_at_ms, note } => {
                    // Progress is committed (after every step); keep the claim, let the target
                    // go, and wait, visibly.
                    run = None;
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
            // (A note about a busy target stays until the target is open.)
            if self.waiting && self.busy == 0 {
                if let Err(end) = self.annotate(None).await {
                    return end;
                }
            }
            if !self.licence.local().is_valid(self.licence.generation()) {
                run = None;
                if let Err(end) = self.regain().await {
                    return end;
                }
                continue;
            }
            let next = match run.take() {
                None => match self.open(&mut progress).await {
                    Ok(opened) => {
                        // Back to the top: a stop or a window change may have come meanwhile.
                        run = Some(opened);
                        self.busy = 0;
                        continue;
                    }
                    Err(next) => next,
                },
                Some(current) => match self.step(current, progress.clone(), until_ms).await {
                    Call::Returned((current, stepped, Ok(Step::More))) => {
                        self.failures = 0;
                        progress = stepped;
                        match self.commit_holding(current, &progress).await {
                            Ok(kept) => run = kept,
                            Err(end) => return end,
                        }
                        continue;
                    }
                    Call::Returned((current, stepped, Ok(Step::Done))) => match self.complete(current, stepped).await {
                        Ok(end) => return end,
                        Err(next) => next,
                    },
                    Call::Returned((current, stepped, Err(e))) => {
                        if matches!(e, ExecError::Temporary(_)) {
                            run = Some(current);
                        }
                        self.after_error(&stepped, e).await
                    }
                    Call::Panicked(message) => Next::Retry(format!("the step panicked: {message}")),
                    Call::TimedOut => {
                        Next::Retry(format!("the step did not finish within {:?}", self.settings.step_timeout))
                    }
                    // The top of the loop stops, waits for the window or regains the lease.
                    Call::Stopped | Call::Lapsed => Next::Resume,
                },
            };
            progress = self.task.progress.clone();
            let waited = match next {
                Next::Retry(reason) => self.retry(reason, true).await,
                Next::Wait(reason) => self.retry(reason, false).await,
                Next::Resume => Ok(()),
                Next::End(end) => return end,
            };
            if let Err(end) = waited {
                return end;
            }
        }
    }

    /// What to do after the executor failed with `e`.
    async fn after_error(&mut self, progress: &TaskProgress, e: ExecError) -> Next {
        match e {
            ExecError::Temporary(reason) => Next::Retry(reason),
            ExecError::Busy(reason) => Next::Wait(reason),
            ExecError::Lapsed(_) => Next::Resume,
            // The engine may see its lease lapse (and the storage refuse) before this loop does.
            ExecError::Fenced(_) if !self.licence.local().is_valid(self.licence.generation()) => Next::Resume,
            ExecError::Fenced(reason) => Next::End(self.fenced(reason).await),
            e @ ExecError::Permanent(_) => Next::End(self.fail(progress, e).await),
        }
    }

    /// Waits before the next try: counts a temporary failure (`counted`; the task fails once
    /// there were too many in a row) or a busy target (not counted). A stop asked, a lapsed
    /// lease or a control change cut the wait short.
    async fn retry(&mut self, reason: String, counted: bool) -> Result<(), End> {
        if self.directives.borrow().should_stop() {
            return Ok(());
        }
        let attempt = if counted {
            if self.failures >= self.settings.failure_limit {
                let progress = self.task.progress.clone();
                return Err(self.fail(&progress, ExecError::Temporary(reason)).await);
            }
            self.failures += 1;
            warn!(task = %self.task.id, %reason, failures = self.failures, "temporary failure; retrying from the last checkpoint");
            self.failures
        } else {
            self.busy = self.busy.saturating_add(1);
            info!(task = %self.task.id, %reason, "the target is busy; waiting for its writer to let go");
            if self.busy == 1 {
                // Visible in `task show`, like a closed window.
                self.annotate(Some(format!("waiting for the target volume: {reason}"))).await?;
            }
            self.busy
        };
        let local = self.licence.local().clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => Ok(()),
            _ = local.lapsed(self.licence.generation()) => Ok(()),
            changed = self.directives.changed() => match changed {
                Ok(()) => Ok(()),
                Err(_) => Err(End::Dropped("controller gone".into())),
            },
        }
    }

    /// Commits progress while holding the run; lets the run (and its target) go at once if the
    /// local lease lapses meanwhile. Hands the run back if it was kept.
    async fn commit_holding(
        &mut self,
        run: Box<dyn TaskRun>,
        progress: &TaskProgress,
    ) -> Result<Option<Box<dyn TaskRun>>, End> {
        let mut held = Some(run);
        let local = self.licence.local().clone();
        let generation = self.licence.generation();
        let committed = {
            let commit = self.commit(progress);
            tokio::pin!(commit);
            tokio::select! {
                committed = &mut commit => committed,
                _ = local.lapsed(generation) => {
                    held = None;
                    commit.await
                }
            }
        };
        committed.map(|()| held)
    }

    /// Starts the run on the data plane; commits what `start` recorded.
    async fn open(&mut self, progress: &mut TaskProgress) -> Result<Box<dyn TaskRun>, Next> {
        let (executor, task, licence, mut started) =
            (self.executor.clone(), self.task.clone(), self.licence.clone(), progress.clone());
        let deadline = self.settings.step_timeout * SNAPSHOT_DEADLINE_FACTOR;
        let call = self
            .call(None, deadline, move |_stop| async move {
                let run = executor.start(&task, &licence, &mut started).await;
                (started, run)
            })
            .await;
        match call {
            Call::Returned((started, Ok(run))) => {
                *progress = started;
                match self.commit_holding(run, progress).await {
                    Ok(Some(run)) => Ok(run),
                    Ok(None) => Err(Next::Resume),
                    Err(end) => Err(Next::End(end)),
                }
            }
            Call::Returned((started, Err(e))) => Err(self.after_error(&started, e).await),
            Call::Panicked(message) => Err(Next::Retry(format!("starting the task panicked: {message}"))),
            Call::TimedOut => Err(Next::Retry(format!("starting the task did not finish within {deadline:?}"))),
            Call::Stopped | Call::Lapsed => Err(Next::Resume),
        }
    }

    /// Runs one step on the data plane.
    async fn step(
        &mut self,
        mut run: Box<dyn TaskRun>,
        mut progress: TaskProgress,
        until_ms: Option<i64>,
    ) -> Call<Stepped> {
        let deadline = self.settings.step_timeout;
        self.call(until_ms, deadline, move |stop| async move {
            let result = run.step(&mut progress, &stop).await;
            (run, progress, result)
        })
        .await
    }

    /// Completes the task after its last step: `finish` on the data plane (it snapshots the
    /// target), then the final commit.
    async fn complete(&mut self, mut run: Box<dyn TaskRun>, mut progress: TaskProgress) -> Result<End, Next> {
        let deadline = self.settings.step_timeout * SNAPSHOT_DEADLINE_FACTOR;
        let call = self
            .call(None, deadline, move |_stop| async move {
                let result = run.finish(&mut progress).await;
                (progress, result)
            })
            .await;
        match call {
            Call::Returned((progress, Ok(()))) => Ok(self.finish(&progress, TaskState::Succeeded, Change::Plain).await),
            Call::Returned((progress, Err(e))) => match self.after_error(&progress, e).await {
                Next::End(end) => Ok(end),
                next => Err(next),
            },
            Call::Panicked(message) => Err(Next::Retry(format!("finishing the task panicked: {message}"))),
            Call::TimedOut => Err(Next::Retry(format!("finishing the task did not finish within {deadline:?}"))),
            Call::Stopped | Call::Lapsed => Err(Next::Resume),
        }
    }

    /// Runs `work` on the data plane, bounded as the module docs say: aborted at once when the
    /// local lease lapses, after the step timeout, and `stop_timeout` after a stop was asked (or
    /// the window closed at `until_ms`), which first cancels the token `work` gets.
    async fn call<T, F, Fut>(&mut self, until_ms: Option<i64>, deadline: Duration, work: F) -> Call<T>
    where
        T: Send + 'static,
        F: FnOnce(StopToken) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let token = StopToken::new();
        let mut handle = AbortOnDrop(self.settings.data.spawn(work(token.clone())));
        let generation = self.licence.generation();
        let local = self.licence.local().clone();
        let lapsed = local.lapsed(generation);
        tokio::pin!(lapsed);
        let deadline = tokio::time::sleep(deadline);
        tokio::pin!(deadline);
        let grace = tokio::time::sleep(self.settings.step_timeout);
        tokio::pin!(grace);
        let clock = self.schedule.clock().clone();
        let closes = async move {
            match until_ms {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(closes);
        // A stop asked before the call began (its change already seen) stops it at once.
        let directive = self.directives.borrow().clone();
        if directive.should_stop() || matches!(self.schedule.check(&directive.control), WindowCheck::Closed { .. }) {
            token.cancel();
            grace.as_mut().reset(tokio::time::Instant::now() + self.settings.stop_timeout);
        }
        loop {
            let stopping = token.is_cancelled();
            tokio::select! {
                biased;
                _ = &mut lapsed => {
                    warn!(task = %self.task.id, lease = %self.licence.lease(), "local lease lapsed: writes stopped at once");
                    return Call::Lapsed;
                }
                joined = &mut handle => return match joined {
                    Ok(value) => Call::Returned(value),
                    Err(e) if e.is_panic() => Call::Panicked(panic_message(e.into_panic())),
                    Err(_) => Call::Stopped,
                },
                _ = &mut deadline => return Call::TimedOut,
                _ = &mut grace, if stopping => {
                    warn!(task = %self.task.id, "the executor did not stop within {:?}; abandoned its call", self.settings.stop_timeout);
                    return Call::Stopped;
                }
                _ = &mut closes, if !stopping => {
                    token.cancel();
                    grace.as_mut().reset(tokio::time::Instant::now() + self.settings.stop_timeout);
                }
                changed = self.directives.changed(), if !stopping => {
                    let stop = match changed {
                        Err(_) => true,
                        Ok(()) => {
                            let directive = self.directives.borrow();
                            directive.should_stop() || matches!(self.schedule.check(&directive.control), WindowCheck::Closed { .. })
                        }
                    };
                    if stop {
                        debug!(task = %self.task.id, "stop asked: the executor's call stops at its next safe point");
                        token.cancel();
                        grace.as_mut().reset(tokio::time::Instant::now() + self.settings.stop_timeout);
                    }
                }
            }
        }
    }

    /// After the local lease lapsed: waits for the same session to answer again, then confirms
    /// that the claim is still this session's. A stop asked meanwhile returns `Ok` (the caller's
    /// loop stops the task).
    async fn regain(&mut self) -> Result<(), End> {
        let generation = self.licence.generation();
        let local = self.licence.local().clone();
        tokio::select! {
            renewed = local.renewed(generation) => if !renewed {
                return Err(End::Dropped("the session ended while the local lease had lapsed; the claim is gone".into()));
            },
            changed = self.directives.changed() => return match changed {
                Ok(()) => Ok(()),
                Err(_) => Err(End::Dropped("controller gone".into())),
            },
        }
        let coord = self.store.coordination().clone();
        let mut attempt = 0;
        loop {
            match coord.exists(self.lock.fence().path()).await {
                Ok(Some(stat)) if stat.ephemeral_owner == coord.session_id() => {
                    info!(task = %self.task.id, "local lease renewed and claim confirmed; resuming from the last checkpoint");
                    return Ok(());
                }
                Ok(_) => return Err(End::Dropped("the claim is gone (found after the local lease lapsed)".into())),
                Err(e) if e.is_transient() && attempt < MAX_COMMIT_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    // Let the claim go (harmless if it is gone): the task must not stay running
                    // under a claim that nobody works under.
                    let _ = self.store.release(self.lock.clone()).await;
                    return Err(End::Dropped(format!("cannot confirm the claim: {e}; released it")));
                }
            }
        }
    }

    /// The storage refused a write under this claim's lease: drop the task if the claim is gone
    /// (a newer owner runs it), fail it if the claim is still ours (another task holds the
    /// volume).
    async fn fenced(&mut self, reason: String) -> End {
        warn!(task = %self.task.id, lease = %self.licence.lease(), %reason, "the storage refused a write");
        let coord = self.store.coordination().clone();
        match coord.exists(self.lock.fence().path()).await {
            Ok(Some(stat)) if stat.ephemeral_owner == coord.session_id() => {
                let progress = self.task.progress.clone();
                self.fail(&progress, ExecError::Permanent(format!("the target refused this task's writes: {reason}")))
                    .await
            }
            Ok(_) => End::Dropped(format!("fenced: {reason}")),
            Err(e) => {
                let _ = self.store.release(self.lock.clone()).await;
                End::Dropped(format!("fenced: {reason}; the claim could not be checked ({e}) and was released"))
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
                Err(e) if e.is_transient() => {
                    debug!(task = %self.task.id, error = %e, attempt, "cannot write the task's records yet; retrying");
                    tokio::time::sleep(backoff(attempt)).await
                }
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
                Err(e) if e.is_transient() => {
                    debug!(task = %self.task.id, error = %e, attempt, "cannot write the task's records yet; retrying");
                    tokio::time::sleep(backoff(attempt)).await
                }
                Err(e) => return Err(self.lost(e).await),
            }
        }
        Err(self.give_up().await)
    }

    async fn stop(&mut self, progress: &TaskProgress, directive: &Directive) -> End {
        // What operators asked wins over a shutdown: a task handed back as pending while it
        // should be paused or canceled would wait for a dispatcher that never assigns it.
        let (to, why) = match directive.control.desired {
            DesiredState::Pause => (TaskState::Paused, "paused"),
            DesiredState::Cancel => (TaskState::Canceled, "canceled"),
            DesiredState::Run if directive.shutdown => (TaskState::Pending, "runner shutting down"),
            DesiredState::Run => unreachable!("stop is only called when the directive says stop"),
        };
        debug!(task = %self.task.id, %to, why, "stopping at a safe point");
        self.finish(progress, to, Change::Plain).await
    }

    async fn fail(&mut self, progress: &TaskProgress, e: ExecError) -> End {
        let reason = match e {
            ExecError::Temporary(r) => format!("gave up after {} temporary failures: {r}", self.failures),
            ExecError::Permanent(r) | ExecError::Fenced(r) | ExecError::Lapsed(r) | ExecError::Busy(r) => r,
        };
        warn!(task = %self.task.id, %reason, "task failed");
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
                Err(e) if e.is_transient() => {
                    debug!(task = %self.task.id, error = %e, attempt, "cannot write the task's records yet; retrying");
                    tokio::time::sleep(backoff(attempt)).await
                }
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

/// The wait after `attempt` earlier failures (from 0), by the crate's retry policy.
fn backoff(attempt: u32) -> Duration {
    crate::retry::STEP.delay(attempt.saturating_add(1))
}

/// The message of a caught panic.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic.downcast_ref::<&str>().map_or("a panic with no message".to_string(), |m| m.to_string()),
    }
}
