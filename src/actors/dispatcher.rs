//! The dispatcher: on every node, active on the leader only.
//!
//! Every node's dispatcher takes client requests; a follower forwards them to the leader
//! (`requests::forward`). The leader's dispatcher serves them (`requests::Leader`) and
//! schedules: it assigns pending tasks to live runners (least loaded first, within capacity) and
//! puts the tasks of vanished runners back to pending. Scheduling runs when something may have
//! changed (a new task, a runner joining or leaving, a task finishing: any change the mirror takes
//! in) and on a periodic sweep.
//!
//! On winning the election the dispatcher first reloads its mirror from ZooKeeper, and only then
//! serves and schedules. On losing it (or on losing the certainty, when the session is suspended)
//! it stops at once; its fence makes any write still in flight fail.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::election::Leadership;
use super::requests::{forward, Leader};
use super::targets;
use crate::api::{ApiError, ClientReply, ClientRequest, PeerReply, PeerRequest};
use crate::cache::TaskMirror;
use crate::coord::{CoordError, EventKind};
use crate::exec::StopToken;
use crate::model::{Change, DesiredState, NodeId, RunnerInfo, Task, TaskId, TaskState};
use crate::schedule::{Schedule, WindowCheck};
use crate::store::{decode, layout, Fence, StoreError, TaskStore};
use crate::transport::Transport;

/// Most tasks one scheduling pass looks at.
pub const MAX_PASS_TASKS: usize = 10_000;
/// Delay that folds a burst of triggers into one scheduling pass.
const PASS_DEBOUNCE: Duration = Duration::from_millis(20);
/// How often the leader checks that every running task still has a claim.
const CLAIM_AUDIT_INTERVAL: Duration = Duration::from_secs(10);
/// How long an accepted assignment counts towards its runner's load while the mirror has not
/// yet seen the task running.
const ASSIGNED_GRACE: Duration = Duration::from_secs(10);

/// A client request, from the host handle or forwarded by a follower.
#[derive(Message)]
#[rtype(result = "Result<ClientReply, ApiError>")]
pub struct Client {
    /// The request.
    pub request: ClientRequest,
    /// Came from another node: serve it if leading, never forward it again.
    pub forwarded: bool,
}

/// Whether this node leads and serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderStatus {
    /// Won the election and confirmed it.
    pub leader: bool,
    /// Leading, with the mirror reloaded: serving and scheduling.
    pub ready: bool,
}

/// Run a scheduling pass soon.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick;

#[derive(Message)]
#[rtype(result = "()")]
struct Ready(u64);

#[derive(Message)]
#[rtype(result = "()")]
struct RunnersChanged(Vec<RunnerInfo>);

#[derive(Message)]
#[rtype(result = "()")]
struct PassData {
    term: u64,
    /// The oldest page of pending tasks, then the page at the rotating cursor.
    pending: Vec<Task>,
    /// This pass saw every pending task.
    complete: bool,
    /// The last task (created ms, id) of the cursor's page, where the next pass's second page
    /// starts (strictly after it); `None`: right after the oldest page (the rotation starts
    /// again).
    next_cursor: Option<(i64, TaskId)>,
    running: Vec<Task>,
    /// Paused tasks hold their targets too (see [`super::targets`]).
    paused: Vec<Task>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Assigned {
    id: TaskId,
    runner: NodeId,
    result: Result<(), ApiError>,
    /// The call reached the runner (its answer is `result`); `false`: the transport failed.
    reached: bool,
}

/// What a dispatcher needs.
pub(crate) struct DispatcherConfig {
    pub node: NodeId,
    pub store: TaskStore,
    pub mirror: Arc<TaskMirror>,
    pub transport: Arc<dyn Transport>,
    pub schedule: Schedule,
    pub sweep_interval: Duration,
    pub request_timeout: Duration,
    pub call_timeout: Duration,
    pub mailbox_capacity: usize,
    pub status: watch::Sender<LeaderStatus>,
    /// Pending tasks read per page of a pass ([`MAX_PASS_TASKS`] but in tests).
    pub pass_page: usize,
    /// How long and how many finished tasks are kept.
    pub retention: Retention,
}

/// How long and how many finished (succeeded, failed, canceled) tasks the leader keeps before it
/// deletes them, oldest first, fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// A finished task older than this (since it finished) is deleted.
    pub max_age: Duration,
    /// Beyond this many finished tasks, the oldest are deleted.
    pub max_count: usize,
}

/// Finished tasks deleted per retention round at most, so that a backlog goes out gradually.
pub const RETENTION_BATCH: usize = 500;

struct Lead {
    fence: Fence,
    term: u64,
    ready: bool,
}

/// The dispatcher actor. See the module docs.
pub struct Dispatcher {
    config: DispatcherConfig,
    lead: Option<Lead>,
    term: u64,
    runners: Arc<Vec<RunnerInfo>>,
    /// Assignments sent and not answered.
    in_flight: HashMap<TaskId, NodeId>,
    /// Assignments accepted that the mirror may not show yet.
    assigned: HashMap<TaskId, (NodeId, Instant)>,
    /// Tasks whose assignment failed, and when to try again.
    backoff: HashMap<TaskId, (Instant, u32)>,
    /// Runners that could not be called: not assigned to until then (and how many times in a
    /// row), so that tasks go to runners that answer.
    unreachable: HashMap<NodeId, (Instant, u32)>,
    /// Tasks being put back to pending.
    rescuing: HashSet<TaskId>,
    /// Pending tasks being settled to paused or canceled in this pass.
    settling: HashSet<TaskId>,
    /// Waiting notes written on pending tasks outside their windows, so each is written once.
    noted: HashMap<TaskId, String>,
    /// When the timer for the earliest window opening fires, Unix milliseconds.
    wake_at: Option<i64>,
    /// When every running task's claim was last checked.
    last_audit: Option<Instant>,
    pass_scheduled: bool,
    /// Where the next pass reads its second page of pending tasks (created ms): passes rotate
    /// through every pending task, so one that can run is found however many wait ahead of it.
    pending_cursor: Option<(i64, TaskId)>,
    /// The tasks assigned and not yet seen running (`in_flight` and `assigned`): they hold
    /// their target volumes even when a pass does not see them among its pages.
    held: HashMap<TaskId, Task>,
    /// A retention round is running.
    retaining: bool,
    stop: StopToken,
}

impl Dispatcher {
    pub(crate) fn new(config: DispatcherConfig) -> Self {
        Dispatcher {
            config,
            lead: None,
            term: 0,
            runners: Arc::new(Vec::new()),
            in_flight: HashMap::new(),
            assigned: HashMap::new(),
            backoff: HashMap::new(),
            unreachable: HashMap::new(),
            rescuing: HashSet::new(),
            settling: HashSet::new(),
            noted: HashMap::new(),
            wake_at: None,
            last_audit: None,
            pass_scheduled: false,
            pending_cursor: None,
            held: HashMap::new(),
            retaining: false,
            stop: StopToken::new(),
        }
    }

    fn leader(&self) -> Option<Leader> {
        let lead = self.lead.as_ref().filter(|l| l.ready)?;
        Some(Leader {
            store: self.config.store.clone(),
            fence: lead.fence.clone(),
            mirror: self.config.mirror.clone(),
            transport: self.config.transport.clone(),
            runners: self.runners.clone(),
            call_timeout: self.config.call_timeout,
        })
    }

    fn publish(&self) {
        let status = LeaderStatus { leader: self.lead.is_some(), ready: self.lead.as_ref().is_some_and(|l| l.ready) };
        self.config.status.send_if_modified(|s| std::mem::replace(s, status) != status);
    }

    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.pass_scheduled || !self.lead.as_ref().is_some_and(|l| l.ready) {
            return;
        }
        self.pass_scheduled = true;
        ctx.run_later(PASS_DEBOUNCE, |act, ctx| act.start_pass(ctx));
    }

    /// Reads what a pass needs from the mirror (off the actor thread) and sends it back.
    fn start_pass(&mut self, ctx: &mut Context<Self>) {
        let Some(lead) = self.lead.as_ref().filter(|l| l.ready) else {
            self.pass_scheduled = false;
            return;
        };
        let (mirror, term, addr) = (self.config.mirror.clone(), lead.term, ctx.address());
        let (page, cursor) = (self.config.pass_page, self.pending_cursor);
        actix::spawn(async move {
            let pending = async {
                let mut pending = mirror.list_by_state(TaskState::Pending, i64::MIN, page).await?;
                let key = |t: &Task| (t.control.created_at_ms, t.id);
                let Some(last) = pending.last().filter(|_| pending.len() >= page).map(key) else {
                    return Ok((pending, true, None));
                };
                // More than a page waits: add the page strictly after the cursor (after the
                // oldest page when the rotation starts again), so that every pending task is
                // looked at in turn, however many share a millisecond.
                let after = cursor.filter(|c| *c > last).unwrap_or(last);
                let next = mirror.list_by_state_after(TaskState::Pending, after, page).await?;
                let next_cursor = next.last().filter(|_| next.len() >= page).map(key);
                let complete = cursor.is_none() && next.len() < page;
                let seen: HashSet<TaskId> = pending.iter().map(|t| t.id).collect();
                pending.extend(next.into_iter().filter(|t| !seen.contains(&t.id)));
                Ok::<_, crate::cache::CacheError>((pending, complete, next_cursor))
            };
            let running = mirror.list_by_state(TaskState::Running, i64::MIN, MAX_PASS_TASKS).await;
            let paused = mirror.list_by_state(TaskState::Paused, i64::MIN, MAX_PASS_TASKS).await;
            match (pending.await, running, paused) {
                (Ok((pending, complete, next_cursor)), Ok(running), Ok(paused)) => {
                    let _ = addr.send(PassData { term, pending, complete, next_cursor, running, paused }).await;
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    warn!(error = %e, "cannot read the task mirror for scheduling");
                    let none = Vec::new;
                    let data = PassData {
                        term,
                        pending: none(),
                        complete: false,
                        next_cursor: None,
                        running: none(),
                        paused: none(),
                    };
                    let _ = addr.send(data).await;
                }
            }
        });
    }

    fn schedule(&mut self, data: PassData, ctx: &mut Context<Self>) {
        let PassData { pending, complete, next_cursor, running, paused, .. } = data;
        let Some(lead) = self.lead.as_ref().filter(|l| l.ready) else { return };
        let fence = lead.fence.clone();
        let now = Instant::now();
        let pending_ids: HashSet<TaskId> = pending.iter().map(|t| t.id).collect();
        let started: HashSet<TaskId> = running.iter().chain(&paused).map(|t| t.id).collect();
        // Forget what concerns tasks no longer pending: those seen running or paused, and, from a
        // pass that saw every pending task, those it did not see.
        let gone = |id: &TaskId| started.contains(id) || (complete && !pending_ids.contains(id));
        self.assigned.retain(|id, (_, at)| !gone(id) && now.duration_since(*at) < ASSIGNED_GRACE);
        self.backoff.retain(|id, _| !gone(id));
        let (in_flight, assigned) = (&self.in_flight, &self.assigned);
        self.held.retain(|id, _| in_flight.contains_key(id) || assigned.contains_key(id));

        let runners = self.runners.clone();
        let mut load: HashMap<&NodeId, u32> = runners.iter().map(|r| (&r.node, 0)).collect();
        for task in &running {
            if let Some(count) = task.status.runner.as_ref().and_then(|r| load.get_mut(r)) {
                *count += 1;
            }
        }
        for runner in self.in_flight.values().chain(self.assigned.values().map(|(r, _)| r)) {
            if let Some(count) = load.get_mut(runner) {
                *count += 1;
            }
        }

        self.noted.retain(|id, _| !gone(id));
        // Tasks assigned but not seen running hold their targets, seen in a page or not.
        let held: Vec<&Task> = self.held.values().filter(|t| !pending_ids.contains(&t.id)).collect();
        let unfinished: Vec<&Task> = pending.iter().chain(&running).chain(&paused).chain(held).collect();
        let queued = targets::blocked(&unfinished);
        let mut sends = Vec::new();
        let mut full = false;
        let mut earliest_opening: Option<i64> = None;
        self.settling.clear();
        for task in pending.iter().filter(|t| t.control.desired != DesiredState::Run) {
            // Asked to pause or cancel but handed back as pending (a runner's shutdown or a
            // rescue raced the request): settle it, or it would wait forever and hold its target.
            self.settle(task, &fence);
        }
        for task in &pending {
            if task.control.desired != DesiredState::Run
                || self.in_flight.contains_key(&task.id)
                || self.assigned.contains_key(&task.id)
                || self.backoff.get(&task.id).is_some_and(|(at, _)| *at > now)
            {
                continue;
            }
            if let Some(holder) = queued.get(&task.id) {
                self.note_waiting(task, targets::waiting_note(task, holder), &fence);
                continue;
            }
            if let WindowCheck::Closed { opens_at_ms, note } = self.config.schedule.check(&task.control) {
                earliest_opening = Some(earliest_opening.map_or(opens_at_ms, |e| e.min(opens_at_ms)));
                self.note_waiting(task, note, &fence);
                continue;
            }
            let choice = runners
                .iter()
                .filter(|r| self.unreachable.get(&r.node).is_none_or(|(until, _)| *until <= now))
                .filter(|r| load.get(&r.node).copied().unwrap_or(u32::MAX) < r.capacity)
                .min_by_key(|r| (load.get(&r.node).copied().unwrap_or(u32::MAX), r.node.clone()));
            let Some(runner) = choice else {
                full = true;
                break;
            };
            *load.get_mut(&runner.node).expect("chosen runners have a load") += 1;
            sends.push((task.id, runner.clone()));
            self.held.insert(task.id, task.clone());
        }
        // Runners have room and more tasks wait beyond this pass's pages: look at the next page
        // at once. A full cluster or a complete pass starts the rotation again.
        self.pending_cursor = next_cursor;
        if !complete && !full && !runners.is_empty() && next_cursor.is_some() {
            self.pass_scheduled = true;
            ctx.run_later(PASS_DEBOUNCE, |act, ctx| act.start_pass(ctx));
        }
        for (id, runner) in sends {
            self.in_flight.insert(id, runner.node.clone());
            let (transport, timeout, addr) = (self.config.transport.clone(), self.config.call_timeout, ctx.address());
            actix::spawn(async move {
                let (result, reached) = match transport.call(&runner.address, PeerRequest::Assign { id }, timeout).await
                {
                    Ok(PeerReply::Assign(result)) => (result, true),
                    Ok(other) => (Err(ApiError::Internal(format!("runner answered {other:?}"))), true),
                    Err(e) => (Err(ApiError::Unavailable(e.to_string())), false),
                };
                let _ = addr.send(Assigned { id, runner: runner.node, result, reached }).await;
            });
        }

        if let Some(at) = earliest_opening {
            self.wake_at_ms(at, ctx);
        }

        // A running task whose runner vanished goes back to pending once its claim is gone. So
        // does one whose runner lives but let the claim go (it gave up on an unreachable
        // ZooKeeper, or re-registered on a new session): those are found by a periodic audit of
        // every running task's claim.
        let live: HashSet<&NodeId> = runners.iter().map(|r| &r.node).collect();
        let audit = self.last_audit.is_none_or(|at| now.duration_since(at) >= CLAIM_AUDIT_INTERVAL);
        if audit {
            self.last_audit = Some(now);
        }
        for task in running {
            let Some(owner) = task.status.runner.clone() else { continue };
            if (live.contains(&owner) && !audit) || !self.rescuing.insert(task.id) {
                continue;
            }
            let (store, fence, addr, id) = (self.config.store.clone(), fence.clone(), ctx.address(), task.id);
            actix::spawn(async move {
                rescue(&store, &fence, id, &owner).await;
                let _ = addr.send(Rescued(id)).await;
            });
        }
    }

    /// Deletes finished tasks beyond the retention's age or count (see [`Retention`]), at most
    /// [`RETENTION_BATCH`] per round, in the background.
    fn retain_finished(&mut self, ctx: &mut Context<Self>) {
        let Some(lead) = self.lead.as_ref().filter(|l| l.ready) else { return };
        if self.retaining {
            return;
        }
        self.retaining = true;
        let (mirror, store, fence) = (self.config.mirror.clone(), self.config.store.clone(), lead.fence.clone());
        let (retention, now_ms) = (self.config.retention, self.config.schedule.clock().now_ms());
        // Owned by the actor: it ends with the dispatcher.
        let round = retention_round(mirror, store, fence, retention, now_ms);
        ctx.spawn(round.into_actor(self).map(|(), act, _| act.retaining = false));
    }

    /// Moves a pending task whose operators asked to pause or cancel it to that state.
    fn settle(&mut self, task: &Task, fence: &Fence) {
        if !self.settling.insert(task.id) {
            return;
        }
        let (store, fence, id) = (self.config.store.clone(), fence.clone(), task.id);
        actix::spawn(async move {
            let moved = store
                .transition(&id, &fence, |task| match (task.state(), task.control.desired) {
                    (TaskState::Pending, DesiredState::Pause) => Ok(Some((TaskState::Paused, Change::Plain))),
                    (TaskState::Pending, DesiredState::Cancel) => Ok(Some((TaskState::Canceled, Change::Plain))),
                    _ => Ok(None),
                })
                .await;
            if let Err(e) = moved {
                debug!(task = %id, error = %e, "cannot settle a pending task that should not run");
            }
        });
    }

    /// Writes why a pending task waits, once per note.
    fn note_waiting(&mut self, task: &Task, note: String, fence: &Fence) {
        if task.status.waiting.as_deref() == Some(note.as_str()) || self.noted.get(&task.id) == Some(&note) {
            return;
        }
        self.noted.insert(task.id, note.clone());
        let (store, fence, id) = (self.config.store.clone(), fence.clone(), task.id);
        actix::spawn(async move {
            if let Err(e) = store.annotate(&id, &fence, Some(note)).await {
                debug!(task = %id, error = %e, "cannot note why the task waits");
            }
        });
    }

    /// Makes sure a scheduling pass runs when the earliest waiting window opens (by the node's
    /// clock, so a test's manual clock drives it).
    fn wake_at_ms(&mut self, at: i64, ctx: &mut Context<Self>) {
        if self.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        self.wake_at = Some(at);
        let (clock, addr, stop) = (self.config.schedule.clock().clone(), ctx.address(), self.stop.clone());
        actix::spawn(async move {
            tokio::select! {
                _ = clock.sleep_until(at) => {
                    let _ = addr.send(Wake(at)).await;
                }
                _ = stop.cancelled() => {}
            }
        });
    }

    fn watch_runners(&self, ctx: &mut Context<Self>) {
        let (store, addr, stop) = (self.config.store.clone(), ctx.address(), self.stop.clone());
        actix::spawn(async move {
            tokio::select! {
                _ = follow_runners(store, addr) => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    fn watch_mirror(&self, ctx: &mut Context<Self>) {
        let (mut status, addr, stop) = (self.config.mirror.subscribe(), ctx.address(), self.stop.clone());
        actix::spawn(async move {
            // What scheduling depends on; a progress-only batch (most of a copy's writes)
            // starts no pass.
            let relevant = |s: &crate::cache::MirrorStatus| (s.synced, s.reloads, s.state_batches);
            let mut seen = relevant(&status.borrow_and_update());
            loop {
                tokio::select! {
                    changed = status.changed() => if changed.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                let now = relevant(&status.borrow_and_update());
                if now == seen {
                    continue;
                }
                match addr.try_send(Kick) {
                    Ok(()) => seen = now,
                    // A full mailbox: the next batch tries again.
                    Err(_) if addr.connected() => {}
                    Err(_) => return,
                }
            }
        });
    }
}

/// Puts a vanished runner's task back to pending, if nobody holds its claim.
async fn rescue(store: &TaskStore, fence: &Fence, id: TaskId, owner: &NodeId) {
    match store.claim_holder(&id).await {
        Ok(None) => {}
        Ok(Some(holder)) => {
            debug!(task = %id, %holder, "task still claimed; not rescuing");
            return;
        }
        Err(e) => {
            debug!(task = %id, error = %e, "cannot check the task's claim");
            return;
        }
    }
    let result = store
        .transition(&id, fence, |t| match (t.state(), t.status.runner.as_ref()) {
            (TaskState::Running, Some(runner)) if runner == owner => Ok(Some((TaskState::Pending, Change::Plain))),
            _ => Ok(None),
        })
        .await;
    match result {
        Ok(task) if task.state() == TaskState::Pending => {
            info!(task = %id, runner = %owner, "runner vanished; task back to pending")
        }
        Ok(_) => {}
        Err(e) => warn!(task = %id, error = %e, "cannot put the task of a vanished runner back to pending"),
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Rescued(TaskId);

/// A waiting task's window opened.
#[derive(Message)]
#[rtype(result = "()")]
struct Wake(i64);

impl Handler<Wake> for Dispatcher {
    type Result = ();

    fn handle(&mut self, Wake(at): Wake, ctx: &mut Context<Self>) {
        if self.wake_at == Some(at) {
            self.wake_at = None;
        }
        self.kick(ctx);
    }
}

/// Follows `/runners` and reports the live runners whenever they change.
async fn follow_runners(store: TaskStore, addr: Addr<Dispatcher>) {
    let coord = store.coordination().clone();
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        let listed = async {
            let (names, watch) = coord.children_watch(layout::RUNNERS).await?;
            let mut runners = Vec::new();
            for name in names {
                match coord.get(&crate::coord::join(layout::RUNNERS, &name)).await {
                    Ok((data, _)) => match decode::<RunnerInfo>(&name, &data) {
                        Ok(info) => runners.push(info),
                        Err(e) => warn!(runner = %name, error = %e, "unreadable runner registration"),
                    },
                    Err(CoordError::NoNode { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, CoordError>((runners, watch))
        };
        match listed.await {
            Ok((runners, watch)) => {
                delays.reset();
                if addr.send(RunnersChanged(runners)).await.is_err() {
                    return;
                }
                if watch.await.kind == EventKind::SessionLost {
                    let mut session = coord.subscribe();
                    let _ = session.wait_for(|s| s.state == crate::coord::SessionState::Connected).await;
                }
            }
            Err(e) => {
                debug!(error = %e, "cannot list runners; retrying");
                delays.wait().await;
            }
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        self.watch_runners(ctx);
        self.watch_mirror(ctx);
        ctx.run_interval(self.config.sweep_interval, |act, ctx| act.kick(ctx));
        let every = (self.config.sweep_interval * 5).clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |act, ctx| act.retain_finished(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.stop.cancel();
    }
}

impl Handler<Leadership> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        match msg {
            Leadership::Gained(fence) => {
                self.term += 1;
                let term = self.term;
                info!(node = %self.config.node, term, "leading; reloading the task mirror before acting");
                self.lead = Some(Lead { fence, term, ready: false });
                self.in_flight.clear();
                self.assigned.clear();
                let (mirror, addr) = (self.config.mirror.clone(), ctx.address());
                actix::spawn(async move {
                    mirror.reload().await;
                    let _ = addr.send(Ready(term)).await;
                });
            }
            Leadership::Lost => {
                if self.lead.take().is_some() {
                    info!(node = %self.config.node, "stopped dispatching");
                }
            }
        }
        self.publish();
    }
}

impl Handler<Ready> for Dispatcher {
    type Result = ();

    fn handle(&mut self, Ready(term): Ready, ctx: &mut Context<Self>) {
        if let Some(lead) = self.lead.as_mut().filter(|l| l.term == term) {
            lead.ready = true;
            info!(node = %self.config.node, term, "dispatcher ready");
            self.publish();
            self.kick(ctx);
        }
    }
}

/// One retention round (see [`Dispatcher::retain_finished`]): deletes the finished tasks
/// beyond the retention's age or count, oldest first, at most [`RETENTION_BATCH`].
async fn retention_round(mirror: Arc<TaskMirror>, store: TaskStore, fence: Fence, retention: Retention, now_ms: i64) {
    if !mirror.subscribe().borrow().synced {
        return;
    }
    let finished = async {
        let (mut total, mut oldest) = (0, Vec::new());
        for state in [TaskState::Succeeded, TaskState::Failed, TaskState::Canceled] {
            total += mirror.count_by_state(state).await?;
            oldest.extend(mirror.list_by_state(state, i64::MIN, RETENTION_BATCH).await?);
        }
        Ok::<_, crate::cache::CacheError>((total, oldest))
    };
    let (total, mut oldest) = match finished.await {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %e, "retention cannot read the task mirror");
            return;
        }
    };
    oldest.sort_by_key(|t| (t.status.updated_at_ms, t.control.created_at_ms));
    let excess = total.saturating_sub(retention.max_count);
    let cutoff = now_ms.saturating_sub(retention.max_age.as_millis() as i64);
    let doomed = oldest
        .iter()
        .enumerate()
        .filter(|(i, t)| *i < excess || t.status.updated_at_ms < cutoff)
        .map(|(_, t)| t.id)
        .take(RETENTION_BATCH);
    let mut deleted = 0;
    for id in doomed {
        match store.delete_finished(&id, &fence).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => {
                let _ = mirror.remove(id).await;
                deleted += 1;
            }
            Err(StoreError::Fenced { .. }) => break,
            Err(e @ StoreError::Coord(_)) if e.is_transient() => {
                debug!(error = %e, "retention stops this round: the coordination service is unavailable");
                break;
            }
            Err(e) => debug!(task = %id, error = %e, "retention cannot delete a finished task yet"),
        }
    }
    if deleted > 0 {
        info!(deleted, finished = total, "retention deleted finished tasks");
    }
}

impl Handler<Kick> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: Kick, ctx: &mut Context<Self>) {
        self.kick(ctx);
    }
}

impl Handler<PassData> for Dispatcher {
    type Result = ();

    fn handle(&mut self, data: PassData, ctx: &mut Context<Self>) {
        self.pass_scheduled = false;
        if self.lead.as_ref().is_some_and(|l| l.term == data.term && l.ready) {
            self.schedule(data, ctx);
        }
    }
}

impl Handler<Assigned> for Dispatcher {
    type Result = ();

    fn handle(&mut self, Assigned { id, runner, result, reached }: Assigned, ctx: &mut Context<Self>) {
        self.in_flight.remove(&id);
        match result {
            Ok(()) => {
                self.backoff.remove(&id);
                if self.unreachable.remove(&runner).is_some() {
                    info!(%runner, "runner answers again; assigning to it");
                }
                self.assigned.insert(id, (runner, Instant::now()));
            }
            Err(e) => {
                if let (false, ApiError::Unavailable(reason)) = (reached, &e) {
                    // The call did not reach the runner (down, partitioned, or refusing this
                    // node): leave it out for a while rather than send it every task in turn.
                    // (A runner that answered, even with a refusal, is reachable.)
                    let times = self.unreachable.get(&runner).map_or(0, |(_, n)| *n) + 1;
                    let pause = crate::retry::ASSIGN.delay(times);
                    if times == 1 {
                        warn!(%runner, %reason, pause_ms = pause.as_millis() as u64, "cannot call the runner; not assigning to it for a while");
                    }
                    self.unreachable.insert(runner.clone(), (Instant::now() + pause, times));
                }
                let failures = self.backoff.get(&id).map_or(0, |(_, n)| *n) + 1;
                let delay = crate::retry::ASSIGN.delay(failures);
                debug!(task = %id, %runner, error = %e, retry_in_ms = delay.as_millis() as u64, "assignment failed");
                self.backoff.insert(id, (Instant::now() + delay, failures));
                ctx.run_later(delay, |act, ctx| act.kick(ctx));
            }
        }
    }
}

impl Handler<Rescued> for Dispatcher {
    type Result = ();

    fn handle(&mut self, Rescued(id): Rescued, ctx: &mut Context<Self>) {
        self.rescuing.remove(&id);
        self.kick(ctx);
    }
}

impl Handler<RunnersChanged> for Dispatcher {
    type Result = ();

    fn handle(&mut self, RunnersChanged(runners): RunnersChanged, ctx: &mut Context<Self>) {
        debug!(runners = runners.len(), "runners changed");
        self.unreachable.retain(|node, _| runners.iter().any(|r| &r.node == node));
        self.runners = Arc::new(runners);
        self.kick(ctx);
    }
}

impl Handler<Client> for Dispatcher {
    type Result = ResponseFuture<Result<ClientReply, ApiError>>;

    fn handle(&mut self, Client { request, forwarded }: Client, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(leader) = self.leader() {
            let (addr, write) = (ctx.address(), request.is_write());
            return Box::pin(async move {
                let reply = leader.serve(request).await;
                if write && reply.is_ok() {
                    super::tell(&addr.clone().recipient(), Kick);
                }
                reply
            });
        }
        if forwarded {
            return Box::pin(async { Err(ApiError::NotLeader { leader: None }) });
        }
        let (store, transport) = (self.config.store.clone(), self.config.transport.clone());
        let deadline = Instant::now() + self.config.request_timeout;
        let call_timeout = self.config.call_timeout;
        Box::pin(async move { forward(&store, transport.as_ref(), request, deadline, call_timeout).await })
    }
}
