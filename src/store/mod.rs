//! The task store: tasks in ZooKeeper, written by role, fenced, compare-and-set.
//!
//! A task is three records (see [`layout`]): **control** (spec, run window, desired state),
//! written only by the dispatcher; **progress** (cursor, counters), written only by the runner
//! that holds the task's claim; and **status** (state, runner, reason), changed by either through
//! the transition table. Because control and progress are separate znodes, a progress write
//! cannot touch a run window however stale the writer's copy of the task is (the bug the seeds
//! record); because every write carries the version it read, two writers of one record cannot
//! both win.
//!
//! Every write is **fenced**: it is an atomic `multi` whose first operation checks that the
//! writer's [`Fence`] node still exists. A fence is an ephemeral node of the writer's session that
//! proves its role: the dispatcher's election candidate, or the runner's claim on the task. When
//! the session expires the node vanishes and every later write of the old role fails with
//! [`StoreError::Fenced`], even if the writer has not noticed yet.
//!
//! This module reads and writes ZooKeeper; it does not decide anything. The dispatcher and the
//! runners decide, and call it.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use crate::clock::Clock;
use crate::coord::{ensure_path, CoordError, Coordination, CreateMode, Op, OpResult, Stat, Version};
use crate::model::{
    Change, NodeId, RecordVersions, RunWindow, Task, TaskControl, TaskId, TaskProgress, TaskSpec, TaskState,
    TaskStatus, VipConfig, VipNodeStatus,
};
use crate::schedule::ScheduleSettings;

mod error;
pub mod layout;

pub use error::StoreError;

/// Result of a task-store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How many times a compare-and-set is retried when other writers keep winning.
pub const CAS_ATTEMPTS: u32 = 16;

/// Proof of a role: an ephemeral node the writer's session created and never sets. A fenced
/// write succeeds only while that node exists at version 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    path: String,
}

impl Fence {
    /// A fence on the node at `path` (an ephemeral node of the writer's session).
    pub fn new(path: impl Into<String>) -> Self {
        Fence { path: path.into() }
    }

    /// The fence node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self) -> Op {
        Op::Check { path: self.path.clone(), version: 0 }
    }
}

/// A runner's claim on a task: the only licence to write its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLock {
    id: TaskId,
    runner: NodeId,
    fence: Fence,
    epoch: u64,
    progress_version: Version,
}

impl TaskLock {
    /// The claimed task.
    pub fn task_id(&self) -> TaskId {
        self.id
    }

    /// The runner holding the claim.
    pub fn runner(&self) -> &NodeId {
        &self.runner
    }

    /// The claim node, as a fence for writes made under it.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The claim's epoch: the claim node's creation zxid, which grows with every claim of any
    /// task. The storage fences target writes by it (see [`WriterLease`](crate::model::WriterLease)).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The writer lease of this claim.
    pub fn lease(&self) -> crate::model::WriterLease {
        crate::model::WriterLease::new(self.id, self.epoch)
    }
}

/// Tasks in the coordination service. Cheap to clone.
#[derive(Clone)]
pub struct TaskStore {
    coord: Arc<dyn Coordination>,
    clock: Arc<dyn Clock>,
}

impl TaskStore {
    /// A store over `coord`, stamping records with `clock`.
    pub fn new(coord: Arc<dyn Coordination>, clock: Arc<dyn Clock>) -> Self {
        TaskStore { coord, clock }
    }

    /// The coordination handle underneath.
    pub fn coordination(&self) -> &Arc<dyn Coordination> {
        &self.coord
    }

    /// Creates the layout's persistent parents if missing. Idempotent.
    pub async fn init(&self) -> Result<()> {
        for root in layout::ROOTS {
            ensure_path(self.coord.as_ref(), root).await?;
        }
        Ok(())
    }

    /// The cluster's schedule settings: `ours` if none were stored yet (this node is the
    /// cluster's first; they are stored now), else the stored ones, which the caller compares
    /// with its own. Never overwrites.
    pub async fn agree_schedule(&self, ours: &ScheduleSettings) -> Result<ScheduleSettings> {
        match self.coord.create(layout::SCHEDULE, &encode(ours), CreateMode::Persistent).await {
            Ok(_) => Ok(ours.clone()),
            Err(CoordError::NodeExists { .. }) => {
                let (data, _) = self.coord.get(layout::SCHEDULE).await?;
                decode(layout::SCHEDULE, &data)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The cluster's transport-credential verifier: `ours` if none was stored yet (stored now),
    /// else the stored one, which the caller compares with its own. Never overwrites.
    pub async fn agree_verifier(&self, ours: &str) -> Result<String> {
        match self.coord.create(layout::SECRET_VERIFIER, ours.as_bytes(), CreateMode::Persistent).await {
            Ok(_) => Ok(ours.to_string()),
            Err(CoordError::NodeExists { .. }) => {
                let (data, _) = self.coord.get(layout::SECRET_VERIFIER).await?;
                Ok(String::from_utf8_lossy(&data).into_owned())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a new task, all three records at once. Idempotent: creating an id that exists with
    /// the same spec returns the stored task (a client retrying after a lost answer); with a
    /// different spec it is [`StoreError::AlreadyExists`].
    pub async fn create(
        &self,
        id: TaskId,
        spec: TaskSpec,
        run_window: Option<RunWindow>,
        fence: &Fence,
    ) -> Result<Task> {
        spec.validate()?;
        let now = self.clock.now_ms();
        let control = TaskControl::new(spec, run_window, now);
        let status = TaskStatus::pending(now);
        let progress = TaskProgress::default();
        let persistent = |path: String, data: Vec<u8>| Op::Create { path, data, mode: CreateMode::Persistent };
        let ops = vec![
            fence.check(),
            persistent(layout::task(&id), encode(&control)),
            persistent(layout::status(&id), encode(&status)),
            persistent(layout::progress(&id), encode(&progress)),
            persistent(layout::locks(&id), Vec::new()),
        ];
        match self.coord.multi(ops).await {
            Ok(_) => {
                // The answer carries the incarnation, like every later read of the task. Should
                // this read fail, the answer says 0 ("unknown"), which readers accept.
                let incarnation = match self.coord.exists(&layout::task(&id)).await {
                    Ok(Some(stat)) => stat.czxid,
                    _ => 0,
                };
                let versions = RecordVersions { incarnation, ..RecordVersions::default() };
                Ok(Task { id, control, status, progress, versions })
            }
            Err(e) => {
                let e = fence_error(e, fence)?;
                if !matches!(e.root(), CoordError::NodeExists { .. }) {
                    return Err(e.into());
                }
                let stored = self.get(&id).await?;
                if stored.control.spec == control.spec {
                    Ok(stored)
                } else {
                    Err(StoreError::AlreadyExists { id })
                }
            }
        }
    }

    /// Reads a task's three records.
    pub async fn get(&self, id: &TaskId) -> Result<Task> {
        let paths = (layout::task(id), layout::status(id), layout::progress(id));
        let (control, status, progress) = tokio::join!(
            self.read_stat::<TaskControl>(&paths.0),
            self.read_stat::<TaskStatus>(&paths.1),
            self.read_stat::<TaskProgress>(&paths.2),
        );
        let not_found = |e: StoreError| match e {
            StoreError::Coord(CoordError::NoNode { .. }) => StoreError::NotFound { id: *id },
            other => other,
        };
        let (control, control_stat) = control.map_err(not_found)?;
        let (status, status_stat) = status.map_err(not_found)?;
        let (progress, progress_stat) = progress.map_err(not_found)?;
        let versions = RecordVersions {
            incarnation: control_stat.czxid,
            control: control_stat.version,
            status: status_stat.version,
            progress: progress_stat.version,
        };
        Ok(Task { id: *id, control, status, progress, versions })
    }

    /// The ids of all stored tasks, in creation order. Names under `/tasks` that are not task ids
    /// are skipped.
    pub async fn list_ids(&self) -> Result<Vec<TaskId>> {
        let names = self.coord.children(layout::TASKS).await?;
        let mut ids: Vec<TaskId> = names.iter().filter_map(|n| n.parse().ok()).collect();
        ids.sort();
        Ok(ids)
    }

    /// Changes a task's control record (dispatcher only): reads it, lets `change` edit it, and
    /// writes it back if it is still at the version read, retrying otherwise. Returns the task as
    /// stored after the change.
    pub async fn update_control<F>(&self, id: &TaskId, fence: &Fence, mut change: F) -> Result<Task>
    where
        F: FnMut(&mut TaskControl) -> Result<()> + Send,
    {
        self.rewrite(id, fence, Record::Control, |task| {
            change(&mut task.control)?;
            task.control.updated_at_ms = self.clock.now_ms();
            Ok(true)
        })
        .await
    }

    /// Moves a task's status through the transition table. `decide` sees the task as stored and
    /// returns the target state (or `None` to leave it as it is); the move is written if the
    /// status is still at the version read, retried otherwise. Returns the task as stored after.
    pub async fn transition<F>(&self, id: &TaskId, fence: &Fence, mut decide: F) -> Result<Task>
    where
        F: FnMut(&Task) -> Result<Option<(TaskState, Change)>> + Send,
    {
        self.rewrite(id, fence, Record::Status, |task| {
            let Some((to, change)) = decide(task)? else { return Ok(false) };
            task.status = task.status.transition(to, change, self.clock.now_ms())?;
            debug!(task = %task.id, state = %to, "status changing");
            Ok(true)
        })
        .await
    }

    /// Sets or clears the waiting note of a task's status without changing its state (why a
    /// task is not moving: `waiting for run window, opens ...`). A no-op if the note is already
    /// the same. Returns the task as stored after.
    pub async fn annotate(&self, id: &TaskId, fence: &Fence, waiting: Option<String>) -> Result<Task> {
        self.rewrite(id, fence, Record::Status, |task| {
            if task.status.waiting == waiting {
                return Ok(false);
            }
            task.status.waiting = waiting.clone();
            task.status.updated_at_ms = self.clock.now_ms();
            Ok(true)
        })
        .await
    }

    /// The compare-and-set loop under every control and status change: reads the task, lets
    /// `edit` change it (`false`: leave it as it is), and writes `record` back under `fence` if
    /// it is still at the version read; retries a lost race with backoff.
    async fn rewrite<F>(&self, id: &TaskId, fence: &Fence, record: Record, mut edit: F) -> Result<Task>
    where
        F: FnMut(&mut Task) -> Result<bool> + Send,
    {
        for attempt in 0..CAS_ATTEMPTS {
            let mut task = self.get(id).await?;
            if !edit(&mut task)? {
                return Ok(task);
            }
            let (path, data, expected) = match record {
                Record::Control => (layout::task(id), encode(&task.control), task.versions.control),
                Record::Status => (layout::status(id), encode(&task.status), task.versions.status),
            };
            match self.coord.multi(vec![fence.check(), Op::Set { path, data, expected: Some(expected) }]).await {
                Ok(results) => {
                    let version = set_version(&results, 1);
                    match record {
                        Record::Control => task.versions.control = version,
                        Record::Status => task.versions.status = version,
                    }
                    return Ok(task);
                }
                Err(e) => retry_on_bad_version(fence_error(e, fence)?, attempt).await?,
            }
        }
        Err(StoreError::Conflict { id: *id, record: record.name() })
    }

    /// Claims a task for `runner`. Fails with [`StoreError::Claimed`] if another runner holds it;
    /// the claim lasts until [`TaskStore::release`] or the end of the runner's session.
    pub async fn claim(&self, id: &TaskId, runner: &NodeId) -> Result<TaskLock> {
        let locks = layout::locks(id);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("{locks}/{}{}-", layout::CLAIM_PREFIX, &token[..12]);
        let ours = match self.coord.create(&prefix, runner.as_str().as_bytes(), CreateMode::EphemeralSequential).await {
            Ok(path) => path,
            Err(CoordError::NoNode { .. }) => return Err(StoreError::NotFound { id: *id }),
            Err(e) if e.is_transient() => {
                // The create may have landed: find it by its token so it does not block the task,
                // now and, if this fails too, in the background until it is gone.
                self.sweep_claims(locks.clone(), prefix[locks.len() + 1..].to_string());
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        match self.settle_claim(id, runner, &locks, &ours).await {
            Ok(lock) => Ok(lock),
            Err(e) => {
                // Leave no claim behind: a claim nobody knows it holds would block the task until
                // the session ends. If the delete fails, it is retried in the background.
                match self.coord.delete(&ours, None).await {
                    Ok(()) | Err(CoordError::NoNode { .. }) => {}
                    Err(_) => self.sweep_claims(locks.clone(), prefix[locks.len() + 1..].to_string()),
                }
                Err(e)
            }
        }
    }

    /// Decides a fresh claim node `ours`: owner if it (or an earlier, forgotten claim of this same
    /// session) has the lowest sequence; `Claimed` otherwise.
    async fn settle_claim(&self, id: &TaskId, runner: &NodeId, locks: &str, ours: &str) -> Result<TaskLock> {
        let mut names = self.coord.children(locks).await?;
        layout::sort_by_sequence(&mut names);
        let Some(first) = names.first().map(|name| format!("{locks}/{name}")) else {
            return Err(StoreError::Coord(CoordError::NoNode { path: ours.to_string() }));
        };
        let (owner, epoch) = if first == ours {
            match self.coord.exists(ours).await? {
                Some(stat) => (first, stat.czxid as u64),
                None => return Err(StoreError::Coord(CoordError::NoNode { path: ours.to_string() })),
            }
        } else {
            match self.coord.get(&first).await {
                Ok((data, stat))
                    if stat.ephemeral_owner == self.coord.session_id() && node_id(&data).as_ref() == Some(runner) =>
                {
                    let _ = self.coord.delete(ours, None).await;
                    (first, stat.czxid as u64)
                }
                Ok((data, _)) => return Err(StoreError::Claimed { id: *id, holder: node_id(&data) }),
                Err(CoordError::NoNode { .. }) => return Err(StoreError::Claimed { id: *id, holder: None }),
                Err(e) => return Err(e.into()),
            }
        };
        let progress_version = match self.read::<TaskProgress>(&layout::progress(id)).await {
            Ok((_, version)) => version,
            Err(e) => {
                if owner != ours {
                    // The adopted earlier claim would be forgotten again: remove it too.
                    let name = owner.rsplit('/').next().unwrap_or_default().to_string();
                    self.sweep_claims(locks.to_string(), name);
                }
                return Err(e);
            }
        };
        let fence = Fence::new(owner);
        Ok(TaskLock { id: *id, runner: runner.clone(), fence, epoch, progress_version })
    }

    /// Gives a claim up. A claim already gone (session expired) is not an error. If the
    /// coordination service does not answer, the delete goes on in the background until it is
    /// done or the session ends, so a claim let go never blocks its task.
    pub async fn release(&self, lock: TaskLock) -> Result<()> {
        match self.coord.delete(lock.fence.path(), None).await {
            Ok(()) | Err(CoordError::NoNode { .. }) => Ok(()),
            Err(e) if e.is_transient() => {
                let (locks, name) = lock.fence.path().rsplit_once('/').expect("claims live under a task's locks");
                self.sweep_claims(locks.to_string(), name.to_string());
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// In the background, deletes this session's claims under `locks` whose names start with
    /// `name_prefix` (a claim's token, or its whole name), retrying with backoff until none is
    /// left or the session ends (its ephemeral claims go with it). The cure for a claim whose
    /// create, or whose delete, met a lost reply: nobody would know it holds it.
    fn sweep_claims(&self, locks: String, name_prefix: String) {
        let coord = self.coord.clone();
        let generation = coord.status().generation;
        tokio::spawn(async move {
            let mut delays = crate::retry::COORDINATION.delays();
            while coord.status().generation == generation && coord.status().state != crate::coord::SessionState::Closed
            {
                let swept = async {
                    for name in coord.children(&locks).await?.into_iter().filter(|n| n.starts_with(&name_prefix)) {
                        match coord.delete(&crate::coord::join(&locks, &name), None).await {
                            Ok(()) | Err(CoordError::NoNode { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                };
                match swept.await {
                    Ok(()) | Err(CoordError::NoNode { .. }) => return,
                    Err(e) if e.is_transient() => {
                        debug!(%locks, %name_prefix, error = %e, "cannot remove a claim yet; retrying");
                        delays.wait().await;
                    }
                    Err(e) => {
                        tracing::warn!(%locks, %name_prefix, error = %e, "cannot remove a claim");
                        return;
                    }
                }
            }
        });
    }

    /// The runner holding a task's claim, if any.
    pub async fn claim_holder(&self, id: &TaskId) -> Result<Option<NodeId>> {
        let locks = layout::locks(id);
        let mut names = match self.coord.children(&locks).await {
            Ok(names) => names,
            Err(CoordError::NoNode { .. }) => return Err(StoreError::NotFound { id: *id }),
            Err(e) => return Err(e.into()),
        };
        layout::sort_by_sequence(&mut names);
        for name in names {
            match self.coord.get(&format!("{locks}/{name}")).await {
                Ok((data, _)) => return Ok(node_id(&data)),
                Err(CoordError::NoNode { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Commits progress under a claim. Refused with [`StoreError::Fenced`] once the claim is gone.
    /// Safe to retry after a transient error: a retry of a write that had landed succeeds.
    pub async fn commit_progress(&self, lock: &mut TaskLock, progress: &TaskProgress) -> Result<()> {
        self.commit(lock, progress, None).await.map(drop)
    }

    /// Commits progress and moves the status in one atomic write under a claim (for instance the
    /// final progress with `Succeeded`). Returns the task as stored after.
    pub async fn commit_with_transition(
        &self,
        lock: &mut TaskLock,
        progress: &TaskProgress,
        to: TaskState,
        change: Change,
    ) -> Result<Task> {
        self.commit(lock, progress, Some((to, change)))
            .await
            .and_then(|task| task.ok_or(StoreError::NotFound { id: lock.id }))
    }

    async fn commit(
        &self,
        lock: &mut TaskLock,
        progress: &TaskProgress,
        transition: Option<(TaskState, Change)>,
    ) -> Result<Option<Task>> {
        let id = lock.id;
        for attempt in 0..CAS_ATTEMPTS {
            let mut task = match &transition {
                Some(_) => Some(self.get(&id).await?),
                None => None,
            };
            let data = encode(progress);
            let mut ops = vec![
                lock.fence.check(),
                Op::Set { path: layout::progress(&id), data: data.clone(), expected: Some(lock.progress_version) },
            ];
            if let (Some(task), Some((to, change))) = (task.as_mut(), &transition) {
                task.status = task.status.transition(*to, change.clone(), self.clock.now_ms())?;
                let status = encode(&task.status);
                ops.push(Op::Set { path: layout::status(&id), data: status, expected: Some(task.versions.status) });
            }
            match self.coord.multi(ops).await {
                Ok(results) => {
                    lock.progress_version = set_version(&results, 1);
                    if let Some(task) = task.as_mut() {
                        task.progress = progress.clone();
                        task.versions.progress = lock.progress_version;
                        task.versions.status = set_version(&results, 2);
                    }
                    return Ok(task);
                }
                Err(e) => match fence_error(e, &lock.fence)? {
                    CoordError::OpFailed { index: 1, .. } => {
                        // Only this claim writes progress: a newer version is our own earlier
                        // write whose answer was lost, or a broken invariant.
                        let (stored, version) = self.read::<TaskProgress>(&layout::progress(&id)).await?;
                        if stored != *progress {
                            return Err(StoreError::Fenced { fence: lock.fence.path().to_string() });
                        }
                        lock.progress_version = version;
                        match &transition {
                            None => return Ok(None),
                            Some((to, _)) => {
                                let task = self.get(&id).await?;
                                if task.status.state == *to {
                                    return Ok(Some(task));
                                }
                            }
                        }
                    }
                    other => retry_on_bad_version(other, attempt).await?,
                },
            }
        }
        Err(StoreError::Conflict { id, record: "status" })
    }

    /// Sets a service's VIP configuration (dispatcher only), creating or replacing it.
    pub async fn set_vip(&self, config: &VipConfig, fence: &Fence) -> Result<()> {
        config.validate()?;
        let path = layout::vip(&config.service);
        loop {
            let op = match self.coord.exists(&path).await? {
                Some(stat) => Op::Set { path: path.clone(), data: encode(config), expected: Some(stat.version) },
                None => Op::Create { path: path.clone(), data: encode(config), mode: CreateMode::Persistent },
            };
            match self.coord.multi(vec![fence.check(), op]).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let e = fence_error(e, fence)?;
                    // Someone created or changed it meanwhile: read again and retry.
                    if !matches!(
                        e.root(),
                        CoordError::NodeExists { .. } | CoordError::BadVersion { .. } | CoordError::NoNode { .. }
                    ) {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// Removes a service's VIP configuration (dispatcher only). `false` if there was none.
    pub async fn delete_vip(&self, service: &str, fence: &Fence) -> Result<bool> {
        crate::model::check_service_name(service)?;
        match self.coord.multi(vec![fence.check(), Op::Delete { path: layout::vip(service), expected: None }]).await {
            Ok(_) => Ok(true),
            Err(e) => match fence_error(e, fence)? {
                e if matches!(e.root(), CoordError::NoNode { .. }) => Ok(false),
                e => Err(e.into()),
            },
        }
    }

    /// Every VIP configuration, by service name.
    pub async fn vips(&self) -> Result<Vec<VipConfig>> {
        let mut configs = Vec::new();
        for name in self.coord.children(layout::VIPS).await? {
            match self.read::<VipConfig>(&crate::coord::join(layout::VIPS, &name)).await {
                Ok((config, _)) => configs.push(config),
                Err(StoreError::Coord(CoordError::NoNode { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(configs)
    }

    /// Deletes a finished (succeeded, failed or canceled) task and its records in one fenced
    /// multi, provided its status is still the one read: a task that moved meanwhile is not
    /// deleted. Answers the task as it was. A task that is not finished is refused
    /// ([`StoreError::NotFinished`]); one already gone is [`StoreError::NotFound`]. A delete whose
    /// reply was lost is looked up: if the task is gone, the delete happened, and the task is
    /// answered as if the reply had come.
    pub async fn delete_finished(&self, id: &TaskId, fence: &Fence) -> Result<Task> {
        let task = self.get(id).await?;
        if !task.state().is_terminal() {
            return Err(StoreError::NotFinished { id: *id, state: task.state() });
        }
        let delete = |path: String| Op::Delete { path, expected: None };
        let ops = vec![
            fence.check(),
            Op::Check { path: layout::status(id), version: task.versions.status },
            delete(layout::progress(id)),
            delete(layout::locks(id)),
            delete(layout::status(id)),
            delete(layout::task(id)),
        ];
        match self.coord.multi(ops).await {
            Ok(_) => Ok(task),
            Err(e) if e.is_transient() => match self.coord.exists(&layout::task(id)).await {
                Ok(None) => Ok(task),
                _ => Err(e.into()),
            },
            Err(e) => {
                let e = fence_error(e, fence)?;
                match e.root() {
                    // A claim still under the task (a runner that has not let go yet): later.
                    CoordError::NotEmpty { .. } => Err(StoreError::StillClaimed { id: *id }),
                    CoordError::BadVersion { .. } => Err(StoreError::Conflict { id: *id, record: "status" }),
                    CoordError::NoNode { .. } => Err(StoreError::NotFound { id: *id }),
                    _ => Err(e.into()),
                }
            }
        }
    }

    /// Every live node's VIP report, by node id.
    pub async fn vip_statuses(&self) -> Result<Vec<(NodeId, VipNodeStatus)>> {
        let mut statuses = Vec::new();
        for name in self.coord.children(layout::VIP_STATUS).await? {
            let Ok(node) = NodeId::new(name.clone()) else { continue };
            match self.read::<VipNodeStatus>(&crate::coord::join(layout::VIP_STATUS, &name)).await {
                Ok((status, _)) => statuses.push((node, status)),
                Err(StoreError::Coord(CoordError::NoNode { .. })) => {}
                // A report this version cannot read says nothing; the others still count.
                Err(StoreError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        statuses.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(statuses)
    }

    /// Publishes this node's VIP report (an ephemeral node of this session, replaced in place).
    /// A report left by an earlier session of this node (a restart within its session timeout)
    /// is replaced by one of this session, since the old one vanishes when that session ends.
    pub async fn put_vip_status(&self, node: &NodeId, status: &VipNodeStatus) -> Result<()> {
        let path = layout::vip_status(node);
        let data = encode(status);
        loop {
            match self.coord.set(&path, &data, None).await {
                Ok(stat) if stat.ephemeral_owner == self.coord.session_id() => return Ok(()),
                Ok(stat) => match self.coord.delete(&path, Some(stat.version)).await {
                    Ok(()) | Err(CoordError::NoNode { .. } | CoordError::BadVersion { .. }) => {}
                    Err(e) => return Err(e.into()),
                },
                Err(CoordError::NoNode { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            match self.coord.create(&path, &data, CreateMode::Ephemeral).await {
                Ok(_) => return Ok(()),
                // Created meanwhile (a lost reply of our own create): set it.
                Err(CoordError::NodeExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn read<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Version)> {
        let (value, stat) = self.read_stat(path).await?;
        Ok((value, stat.version))
    }

    async fn read_stat<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Stat)> {
        let (data, stat) = self.coord.get(path).await?;
        Ok((decode(path, &data)?, stat))
    }
}

/// The records a compare-and-set rewrites.
#[derive(Clone, Copy, Debug)]
enum Record {
    Control,
    Status,
}

impl Record {
    fn name(self) -> &'static str {
        match self {
            Record::Control => "control",
            Record::Status => "status",
        }
    }
}

/// Serializes a record. Records are plain data; encoding cannot fail.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

/// Deserializes a record read from `path`.
pub(crate) fn decode<T: DeserializeOwned>(path: &str, data: &[u8]) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| StoreError::Corrupt { path: path.to_string(), reason: e.to_string() })
}

fn node_id(data: &[u8]) -> Option<NodeId> {
    std::str::from_utf8(data).ok().and_then(|s| NodeId::new(s).ok())
}

/// The new version written by the `Set` at `index` of a successful multi.
fn set_version(results: &[OpResult], index: usize) -> Version {
    match results.get(index) {
        Some(OpResult::Set(stat)) => stat.version,
        other => unreachable!("multi result {index} of a fenced set is {other:?}"),
    }
}

/// Turns a failed fence check (operation 0) into [`StoreError::Fenced`]; passes other errors on.
fn fence_error(e: CoordError, fence: &Fence) -> Result<CoordError> {
    match e {
        CoordError::OpFailed { index: 0, .. } => Err(StoreError::Fenced { fence: fence.path().to_string() }),
        other => Ok(other),
    }
}

/// Waits before the next compare-and-set attempt if `e` is a lost race; fails otherwise.
async fn retry_on_bad_version(e: CoordError, attempt: u32) -> Result<()> {
    if matches!(e.root(), CoordError::BadVersion { .. }) {
        tokio::time::sleep(crate::retry::CAS.delay(attempt + 1)).await;
        Ok(())
    } else {
        Err(e.into())
    }
}
