//! The task center as it runs in production: task servers as separate OS processes (the
//! `task_server` example binary) coordinated through a real ZooKeeper, killed with SIGKILL,
//! cut off from ZooKeeper, and outliving ZooKeeper outages.
//!
//! The test process watches the cluster through its own ZooKeeper session on the cluster's
//! chroot (ZooKeeper is the truth: tasks are read with [`TaskStore`]) and talks to the nodes
//! over TCP as `taskctl` does, with the cluster secret. A [`TaskLog`] follows `/tasks` through a
//! persistent recursive watch, so the order of claims, status changes and progress writes of
//! every task can be checked after the fact (one owner at a time, a cursor that never goes back).
//!
//! Each scenario uses its own chroot on the shared ZooKeeper, except the outages, which stop and
//! restart a private server. Every wait follows a ZooKeeper watch or a process event; the only
//! sleep is the length of a ZooKeeper outage, which is the event itself.
//!
//! Tasks run on the daemon's simulated executor: 40 steps of 100 ms, 1 MiB each, progress
//! committed after every step, so a task runs about 4 s and a resumed task's counters add up to
//! the total only if it resumed from its last committed progress. Except in section 7, where the
//! nodes run the real copy engine over one shared file backend (a temporary directory, as a block
//! service is shared) and copies are checked byte for byte against their source snapshots.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::node::{example_binary, NodeConfig, NodeProcess};
use common::tasks::{wait_state, wait_task};
use common::writers::WriterWatch;
use common::{init_tracing, shared_zk, step, unique_chroot, wait_status, within, Proxy, ZkServer};
use futures::StreamExt;
use task_center::actors::{current_leader, LeaderInfo};
use task_center::api::{ApiError, ClientReply, ClientRequest, ListFilter, PeerReply, PeerRequest};
use task_center::clock::SystemClock;
use task_center::coord::{
    CoordError, Coordination, EventKind, SessionState, Stat, Version, WatchEvent, ZkConfig, ZkCoordination,
};
use task_center::copy::{CopyBackend, CopyEngine, FileBackend, VolumeDigest, VolumeRef};
use task_center::model::{
    CopyOptions, CopyVolumeSpec, DesiredState, RunWindow, SnapshotId, Task, TaskId, TaskProgress, TaskSpec, TaskState,
    TaskStatus, TimeOfDay, Verify, VolumeId,
};
use task_center::store::layout::{self, TaskPath};
use task_center::store::TaskStore;
use task_center::transport::{TcpConfig, TcpTransport, Transport};

/// The cluster secret every node and the test share.
const SECRET: &str = "cluster-test-secret-0123456789ab";
/// Steps of a simulated task, their length, and the bytes one step stands for (the daemon's
/// simulated executor counts 1 MiB per step).
const SIM_STEPS: u64 = 40;
const SIM_STEP_MS: u64 = 100;
const UNIT_BYTES: u64 = 1 << 20;
const TOTAL_BYTES: u64 = SIM_STEPS * UNIT_BYTES;
/// Session timeout of the nodes: a dead node's claims vanish this long after its death.
const SESSION_MS: u64 = 4_000;
/// Session timeout of the test's own observer session: long enough to outlive every outage.
const OBSERVER_SESSION_MS: u64 = 30_000;
const SWEEP_MS: u64 = 500;

/// Hang guard for one wait on the cluster (a leader, a task's state).
const WAIT: Duration = Duration::from_secs(30);
/// Hang guard for a whole scenario.
const CASE: Duration = Duration::from_secs(150);
/// Hang guard for one client call (a follower forwards for up to 30 s while electing).
const CALL: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// Helpers

use common::tasks::spec;

fn node_config(id: &str, zookeeper: &str, session_timeout_ms: u64, tasks_per_runner: u32) -> NodeConfig {
    NodeConfig {
        session_timeout_ms: Some(session_timeout_ms),
        tasks_per_runner: Some(tasks_per_runner),
        sweep_interval_ms: Some(SWEEP_MS),
        sim_steps: Some(SIM_STEPS),
        sim_step_ms: Some(SIM_STEP_MS),
        ..NodeConfig::new(id, zookeeper, SECRET)
    }
}

/// Starts the nodes one after the other (the first one started usually leads).
async fn start_nodes(configs: &[NodeConfig]) -> Vec<NodeProcess> {
    let mut nodes = Vec::new();
    for config in configs {
        nodes.push(NodeProcess::start(config).await);
    }
    nodes
}

fn node<'a>(nodes: &'a mut [NodeProcess], id: &str) -> &'a mut NodeProcess {
    nodes.iter_mut().find(|n| n.node_id() == id).unwrap_or_else(|| panic!("no node {id}"))
}

fn runner_of(task: &Task) -> String {
    task.status.runner.as_ref().map(|r| r.to_string()).unwrap_or_default()
}

/// Waits for the session to be connected again after a transient error; panics on other errors.
async fn on_error(coord: &dyn Coordination, what: &str, e: CoordError) {
    if !e.is_transient() {
        panic!("{what}: {e}");
    }
    let mut session = coord.subscribe();
    let _ = session.wait_for(|s| s.state == SessionState::Connected).await;
}

/// The test's view of the cluster: its own ZooKeeper session on the chroot, the task store over
/// it, and a TCP transport with the cluster secret.
struct Observer {
    coord: Arc<ZkCoordination>,
    store: TaskStore,
    transport: TcpTransport,
}

impl Observer {
    async fn connect(connect: &str) -> Observer {
        let mut config = ZkConfig::new(connect);
        config.session_timeout_ms = OBSERVER_SESSION_MS;
        let coord = match step("the observer connects", ZkCoordination::connect(config)).await {
            Ok(coord) => Arc::new(coord),
            Err(e) => panic!("the observer cannot connect to {connect}: {e}"),
        };
        let store = TaskStore::new(coord.clone(), Arc::new(SystemClock));
        step("create the layout", store.init()).await.expect("create the layout");
        let transport = TcpTransport::new(TcpConfig::new(SECRET.as_bytes().to_vec())).expect("a valid TCP config");
        Observer { coord, store, transport }
    }

    fn coord(&self) -> &dyn Coordination {
        self.coord.as_ref()
    }

    /// Sends a client request to the node at `address`, as `taskctl` does.
    async fn request(&self, address: &str, request: ClientRequest) -> Result<ClientReply, ApiError> {
        call(&self.transport, address, request).await
    }

    /// A request whose answer must be one task.
    async fn task_request(&self, address: &str, request: ClientRequest) -> Task {
        let what = format!("{request:?} through {address}");
        match self.request(address, request).await {
            Ok(ClientReply::Task(task)) => task,
            other => panic!("{what}: {other:?}"),
        }
    }

    /// Creates task number `n` through the node at `address`; returns the answer.
    async fn create(&self, address: &str, n: usize) -> Task {
        let id = TaskId::generate();
        let task = self.task_request(address, ClientRequest::Create { id, spec: spec(n), run_window: None }).await;
        assert_eq!(task.id, id, "the create answer is about another task");
        task
    }

    /// One task as stored in ZooKeeper.
    async fn task(&self, id: TaskId) -> Task {
        match step("read a task from ZooKeeper", self.store.get(&id)).await {
            Ok(task) => task,
            Err(e) => panic!("cannot read task {id} from ZooKeeper: {e}"),
        }
    }

    /// A task's progress record and its version, as stored.
    async fn progress(&self, id: TaskId) -> (TaskProgress, Version) {
        let (data, stat) = step("read progress", self.coord.get(&layout::progress(&id))).await.expect("read progress");
        (serde_json::from_slice(&data).expect("decode progress"), stat.version)
    }

    /// The holder of a task's claim (the lowest claim node): its path and its runner.
    async fn claim(&self, id: TaskId) -> Option<(String, String)> {
        let locks = layout::locks(&id);
        let mut names = step("list claims", self.coord.children(&locks)).await.expect("list claims");
        layout::sort_by_sequence(&mut names);
        for name in names {
            let path = format!("{locks}/{name}");
            match step("read a claim", self.coord.get(&path)).await {
                Ok((data, _)) => return Some((path, String::from_utf8_lossy(&data).into_owned())),
                Err(CoordError::NoNode { .. }) => continue,
                Err(e) => panic!("read claim {path}: {e}"),
            }
        }
        None
    }

    /// Waits (through a children watch on `/election`) until the leader satisfies `pred`.
    async fn wait_leader(&self, what: &str, pred: impl Fn(&LeaderInfo) -> bool) -> LeaderInfo {
        within(WAIT, what, async {
            loop {
                let watch = match self.coord.children_watch(layout::ELECTION).await {
                    Ok((_, watch)) => watch,
                    Err(e) => {
                        on_error(self.coord(), "watch /election", e).await;
                        continue;
                    }
                };
                match current_leader(self.coord()).await {
                    Ok(Some(leader)) if pred(&leader) => return leader,
                    Ok(_) => {}
                    Err(e) => {
                        on_error(self.coord(), "read the leader", e).await;
                        continue;
                    }
                }
                watch.await;
            }
        })
        .await
    }

    /// Waits (through a children watch) until the children of `path` satisfy `pred`.
    async fn wait_children(&self, path: &str, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        within(WAIT, what, async {
            loop {
                match self.coord.children_watch(path).await {
                    Ok((names, _)) if pred(&names) => return names,
                    Ok((_, watch)) => {
                        watch.await;
                    }
                    Err(e) => on_error(self.coord(), path, e).await,
                }
            }
        })
        .await
    }

    /// Waits until every node runs its runner.
    async fn wait_runners(&self, count: usize) {
        self.wait_children(layout::RUNNERS, "every runner registers", |names| names.len() == count).await;
    }

    /// Waits (through an exists watch) until the node at `path` satisfies `pred`.
    async fn wait_node(&self, path: &str, what: &str, pred: impl Fn(Option<&Stat>) -> bool) -> Option<Stat> {
        within(WAIT, what, async {
            loop {
                match self.coord.exists_watch(path).await {
                    Ok((stat, _)) if pred(stat.as_ref()) => return stat,
                    Ok((_, watch)) => {
                        watch.await;
                    }
                    Err(e) => on_error(self.coord(), path, e).await,
                }
            }
        })
        .await
    }

    /// Waits (through an exists watch on the progress record) until a task's committed progress
    /// satisfies `pred`.
    async fn wait_progress(&self, id: TaskId, what: &str, pred: impl Fn(&TaskProgress) -> bool) -> TaskProgress {
        let path = layout::progress(&id);
        within(WAIT, what, async {
            loop {
                match self.coord.exists_watch(&path).await {
                    Ok((Some(_), watch)) => {
                        let (progress, _) = self.progress(id).await;
                        if pred(&progress) {
                            return progress;
                        }
                        watch.await;
                    }
                    Ok((None, watch)) => {
                        watch.await;
                    }
                    Err(e) => on_error(self.coord(), &path, e).await,
                }
            }
        })
        .await
    }

    /// Waits (through watches on their status records) until every task in `tasks` has
    /// succeeded, `timeout` in all. On timeout, panics with where a late task stands: its status,
    /// its claim and the session holding it, and its runner's registration.
    async fn wait_all_succeeded(&self, tasks: &[Task], timeout: Duration) {
        let all = async {
            for task in tasks {
                // The harness's own guard is longer: the one above fires first, with the diagnosis.
                wait_state(self.coord(), task.id, TaskState::Succeeded, timeout + WAIT).await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_ok() {
            return;
        }
        let mut late = Vec::new();
        for task in tasks {
            let task = self.task(task.id).await;
            if task.state() != TaskState::Succeeded {
                late.push(self.diagnose(&task).await);
            }
        }
        panic!("tasks did not succeed within {timeout:?}:\n{}", late.join("\n"));
    }

    /// Where a task stands, for a failure message.
    async fn diagnose(&self, task: &Task) -> String {
        let session = |stat: Option<Stat>| stat.map_or("none".to_string(), |s| format!("{:#x}", s.ephemeral_owner));
        let claim = match self.claim(task.id).await {
            Some((path, holder)) => {
                let owner = session(self.coord.exists(&path).await.ok().flatten());
                format!("claimed by {holder} (session {owner})")
            }
            None => "no claim".to_string(),
        };
        let registration = match &task.status.runner {
            Some(runner) => {
                let owner = session(self.coord.exists(&layout::runner(runner)).await.ok().flatten());
                format!("runner {runner} registered by session {owner}")
            }
            None => "no runner".to_string(),
        };
        format!(
            "  task {}: {} on {:?} (attempt {}), cursor {} of {}; {claim}; {registration}",
            task.id,
            task.state(),
            task.status.runner.as_ref().map(|r| r.as_str()),
            task.status.attempts,
            task.progress.cursor_bytes,
            TOTAL_BYTES
        )
    }
}

/// One client call over TCP; a transport failure is a test failure.
async fn call(transport: &TcpTransport, address: &str, request: ClientRequest) -> Result<ClientReply, ApiError> {
    match transport.call(address, PeerRequest::Client(request.clone()), CALL).await {
        Ok(PeerReply::Client(result)) => result,
        Ok(other) => panic!("{address} answered {request:?} with {other:?}"),
        Err(e) => panic!("{address} did not answer {request:?}: {e}"),
    }
}

/// Every record of `/tasks`, in the order ZooKeeper changed them, as seen through one persistent
/// recursive watch of the observer's session. Status and progress records are read at each of
/// their events (a sample: a read may already see a later write, never an earlier one).
struct TaskLog {
    state: Arc<Mutex<LogState>>,
    follower: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct LogState {
    events: Vec<WatchEvent>,
    progress: Vec<(TaskId, Version, TaskProgress)>,
    status: Vec<(TaskId, Version, TaskStatus)>,
    /// `Resync` or `SessionLost`: events may be missing from here on.
    gaps: Vec<EventKind>,
}

impl TaskLog {
    async fn start(observer: &Observer) -> TaskLog {
        let mut tree = step("watch /tasks", observer.coord.watch_tree(layout::TASKS)).await.expect("watch /tasks");
        let coord = observer.coord.clone();
        let state = Arc::new(Mutex::new(LogState::default()));
        let log = state.clone();
        let follower = tokio::spawn(async move {
            while let Some(event) = tree.next().await {
                let (kind, path) = (event.kind, event.path.clone());
                log.lock().unwrap().events.push(event);
                if matches!(kind, EventKind::Resync | EventKind::SessionLost) {
                    log.lock().unwrap().gaps.push(kind);
                    continue;
                }
                if !matches!(kind, EventKind::Created | EventKind::DataChanged) {
                    continue;
                }
                match layout::parse_task_path(&path) {
                    Some(TaskPath::Progress(id)) => {
                        if let Ok((data, stat)) = coord.get(&path).await {
                            let progress = serde_json::from_slice(&data).expect("decode progress");
                            log.lock().unwrap().progress.push((id, stat.version, progress));
                        }
                    }
                    Some(TaskPath::Status(id)) => {
                        if let Ok((data, stat)) = coord.get(&path).await {
                            let status = serde_json::from_slice(&data).expect("decode status");
                            log.lock().unwrap().status.push((id, stat.version, status));
                        }
                    }
                    _ => {}
                }
            }
        });
        TaskLog { state, follower }
    }

    fn gaps(&self) -> Vec<EventKind> {
        self.state.lock().unwrap().gaps.clone()
    }

    /// The events about one task, in order.
    fn events(&self, id: TaskId) -> Vec<WatchEvent> {
        let prefix = layout::task(&id);
        let state = self.state.lock().unwrap();
        state.events.iter().filter(|e| e.path == prefix || e.path.starts_with(&format!("{prefix}/"))).cloned().collect()
    }

    /// Progress samples of one task, by version.
    fn progress(&self, id: TaskId) -> Vec<(Version, TaskProgress)> {
        let state = self.state.lock().unwrap();
        let mut samples: Vec<_> =
            state.progress.iter().filter(|(i, _, _)| *i == id).map(|(_, v, p)| (*v, p.clone())).collect();
        samples.sort_by_key(|(v, _)| *v);
        samples.dedup_by_key(|(v, _)| *v);
        samples
    }

    /// Status samples of one task, by version.
    fn statuses(&self, id: TaskId) -> Vec<(Version, TaskStatus)> {
        let state = self.state.lock().unwrap();
        let mut samples: Vec<_> =
            state.status.iter().filter(|(i, _, _)| *i == id).map(|(_, v, s)| (*v, s.clone())).collect();
        samples.sort_by_key(|(v, _)| *v);
        samples.dedup_by_key(|(v, _)| *v);
        samples
    }

    /// The committed cursor never went back, and after the write at version `from.0` it never
    /// fell below `from.1`.
    fn assert_cursor_never_back(&self, id: TaskId, from: Option<(Version, u64)>) {
        let samples = self.progress(id);
        assert!(!samples.is_empty(), "no progress of task {id} was seen");
        for pair in samples.windows(2) {
            let ((v0, p0), (v1, p1)) = (&pair[0], &pair[1]);
            assert!(
                p1.cursor_bytes >= p0.cursor_bytes,
                "task {id}: the cursor went back from {} (version {v0}) to {} (version {v1})",
                p0.cursor_bytes,
                p1.cursor_bytes
            );
        }
        if let Some((version, cursor)) = from {
            let after: Vec<_> = samples.iter().filter(|(v, _)| *v > version).collect();
            assert!(!after.is_empty(), "task {id}: no progress was committed after version {version}");
            for (v, p) in after {
                assert!(
                    p.cursor_bytes >= cursor,
                    "task {id}: the resumed run committed cursor {} (version {v}), behind the last committed {cursor}",
                    p.cursor_bytes
                );
            }
        }
    }

    /// One owner at a time: `old_claim` vanished before the next claim of the task was created,
    /// and no progress was written between the two. Returns the new claim's path.
    fn assert_handover(&self, id: TaskId, old_claim: &str) -> String {
        let events = self.events(id);
        let progress = layout::progress(&id);
        let claims = format!("{}/{}", layout::locks(&id), layout::CLAIM_PREFIX);
        let deleted = events
            .iter()
            .position(|e| e.kind == EventKind::Deleted && e.path == old_claim)
            .unwrap_or_else(|| panic!("task {id}: the deletion of the old claim {old_claim} was not seen"));
        let created = events[deleted..]
            .iter()
            .position(|e| e.kind == EventKind::Created && e.path.starts_with(&claims))
            .map(|i| i + deleted)
            .unwrap_or_else(|| panic!("task {id}: no claim after the old one vanished: {:?}", &events[deleted..]));
        let writes: Vec<_> = events[deleted..created]
            .iter()
            .filter(|e| e.kind == EventKind::DataChanged && e.path == progress)
            .collect();
        assert!(writes.is_empty(), "task {id}: progress written while nobody held its claim: {writes:?}");
        events[created].path.clone()
    }

    /// The task left `victim` through pending: after its status at `running_version` (running on
    /// `victim`, first attempt), the next running status is another runner's second attempt,
    /// and everything in between is pending.
    fn assert_rescued_through_pending(&self, id: TaskId, victim: &str, running_version: Version) {
        let samples = self.statuses(id);
        let second = samples
            .iter()
            .find(|(v, s)| *v > running_version && s.state == TaskState::Running)
            .unwrap_or_else(|| panic!("task {id}: never ran again after version {running_version}: {samples:?}"));
        assert_eq!(second.1.attempts, 2, "task {id}: the rerun is not the second attempt: {samples:?}");
        assert_ne!(second.1.runner.as_ref().map(|r| r.as_str()), Some(victim), "task {id} ran on the dead runner");
        let between: Vec<_> = samples.iter().filter(|(v, _)| *v > running_version && *v < second.0).collect();
        for (v, s) in &between {
            assert_eq!(s.state, TaskState::Pending, "task {id}: status version {v} between two runs: {s:?}");
        }
        if between.is_empty() {
            // The pending status was overwritten before the log read it. The transition table
            // allows running -> running only through pending, so one write in between must be it.
            assert_eq!(second.0, running_version + 2, "task {id}: writes between two runs were missed: {samples:?}");
        }
    }
}

impl Drop for TaskLog {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// A task that ran to the end, exactly once over its whole life: every byte counted once.
fn assert_finished_exactly(task: &Task) {
    let id = task.id;
    assert_eq!(task.state(), TaskState::Succeeded, "task {id}: {:?}", task.status);
    assert_eq!(task.progress.total_bytes, Some(TOTAL_BYTES), "task {id}: total");
    assert_eq!(task.progress.cursor_bytes, TOTAL_BYTES, "task {id}: the cursor is not at the end");
    assert_eq!(
        task.progress.counters.bytes_copied, TOTAL_BYTES,
        "task {id}: bytes copied over all runs differ from the total: a run did not resume from the committed \
         progress"
    );
}

/// Invariant 4 at the end of a scenario: the tasks in ZooKeeper are exactly the accepted ones,
/// each created once (its incarnation is the one the create answer gave), and each is terminal,
/// pending, or running with its runner holding the claim.
async fn assert_accounted(observer: &Observer, accepted: &[Task]) {
    let stored: BTreeSet<TaskId> =
        step("list task ids", observer.store.list_ids()).await.expect("list task ids").into_iter().collect();
    let expected: BTreeSet<TaskId> = accepted.iter().map(|t| t.id).collect();
    assert_eq!(expected.len(), accepted.len(), "an id was accepted twice");
    assert_eq!(stored, expected, "the tasks in ZooKeeper are not the accepted ones");
    for answer in accepted {
        let task = observer.task(answer.id).await;
        if answer.versions.incarnation != 0 {
            assert_eq!(task.versions.incarnation, answer.versions.incarnation, "task {} was created again", task.id);
        }
        match task.state() {
            s if s.is_terminal() => {}
            TaskState::Pending => {}
            TaskState::Running => {
                let holder = observer.claim(task.id).await.map(|(_, holder)| holder);
                assert_eq!(
                    holder.as_deref(),
                    task.status.runner.as_ref().map(|r| r.as_str()),
                    "task {} says it runs on {:?} but that runner holds no claim on it",
                    task.id,
                    task.status.runner
                );
            }
            other => panic!("task {} ended {other}: {:?}", task.id, task.status),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The leader is killed while tasks run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_leader_while_tasks_run() {
    init_tracing();
    within(CASE, "kill -9 the leader while tasks run", async {
        let connect = shared_zk().connect_string(&unique_chroot("kill-9-leader"));
        let observer = Observer::connect(&connect).await;
        let log = TaskLog::start(&observer).await;
        let configs: Vec<_> = ["n1", "n2", "n3"].iter().map(|n| node_config(n, &connect, SESSION_MS, 4)).collect();
        let mut nodes = start_nodes(&configs).await;
        observer.wait_runners(3).await;
        let leader = observer.wait_leader("a first leader", |_| true).await;
        let leader_id = leader.node.to_string();
        let follower = nodes.iter().find(|n| n.node_id() != leader_id).unwrap().address().to_string();

        let mut accepted = Vec::new();
        for n in 0..9 {
            accepted.push(observer.create(&follower, n).await);
        }
        for task in &accepted {
            wait_state(observer.coord(), task.id, TaskState::Running, WAIT).await;
        }
        let mut before = Vec::new();
        for task in &accepted {
            before.push(observer.task(task.id).await);
        }
        let doomed: Vec<TaskId> = before.iter().filter(|t| runner_of(t) == leader_id).map(|t| t.id).collect();
        let spread: Vec<String> = before.iter().map(runner_of).collect();
        assert!(!doomed.is_empty(), "the leader's runner got none of the tasks: {spread:?}");
        let mut claims = HashMap::new();
        for id in &doomed {
            observer.wait_progress(*id, "the leader's tasks make progress", |p| p.cursor_bytes >= 5 * UNIT_BYTES).await;
            let (claim, holder) = observer.claim(*id).await.expect("a running task is claimed");
            assert_eq!(holder, leader_id);
            claims.insert(*id, claim);
        }

        node(&mut nodes, &leader_id).kill_9();
        // The dead node's last committed progress. (A write it sent just before dying may still
        // land after this read; it can only move the cursor forward.)
        let mut committed = HashMap::new();
        for id in &doomed {
            let (progress, version) = observer.progress(*id).await;
            assert!(progress.cursor_bytes < TOTAL_BYTES, "task {id} finished before the kill");
            committed.insert(*id, (version, progress.cursor_bytes));
        }

        let new_leader = observer.wait_leader("a new leader", |l| l.node.as_str() != leader_id).await;
        let survivors: Vec<&NodeProcess> = nodes.iter().filter(|n| n.node_id() != leader_id).collect();
        assert!(survivors.iter().any(|n| n.node_id() == new_leader.node.as_str()), "{new_leader:?} is not a survivor");
        // The new leader serves new requests, also those its follower forwards.
        let other = survivors.iter().find(|n| n.node_id() != new_leader.node.as_str()).unwrap();
        let late = observer.create(other.address(), 100).await;
        accepted.push(late.clone());
        let direct = observer.create(&new_leader.address, 101).await;
        accepted.push(direct.clone());

        observer.wait_all_succeeded(&accepted, WAIT).await;
        for earlier in &before {
            let id = earlier.id;
            let task = observer.task(id).await;
            assert_finished_exactly(&task);
            if doomed.contains(&id) {
                assert_eq!(task.status.attempts, 2, "task {id} of the dead runner: {:?}", task.status);
                assert_ne!(runner_of(&task), leader_id);
                log.assert_handover(id, &claims[&id]);
                log.assert_rescued_through_pending(id, &leader_id, earlier.versions.status);
                log.assert_cursor_never_back(id, Some(committed[&id]));
            } else {
                assert_eq!(task.status.attempts, 1, "task {id} on a surviving runner was disturbed: {:?}", task.status);
                assert_eq!(task.status.runner, earlier.status.runner, "task {id} moved");
                log.assert_cursor_never_back(id, None);
            }
        }
        for created in [&late, &direct] {
            let task = observer.task(created.id).await;
            assert_finished_exactly(&task);
            assert_eq!(task.status.attempts, 1);
        }
        assert_accounted(&observer, &accepted).await;
        assert!(log.gaps().is_empty(), "the observer's watch missed events: {:?}", log.gaps());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. A runner is killed in the middle of a task

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_runner_mid_task() {
    init_tracing();
    within(CASE, "kill -9 a runner mid-task", async {
        let connect = shared_zk().connect_string(&unique_chroot("kill-9-runner"));
        let observer = Observer::connect(&connect).await;
        let log = TaskLog::start(&observer).await;
        let configs: Vec<_> = ["n1", "n2", "n3"].iter().map(|n| node_config(n, &connect, SESSION_MS, 2)).collect();
        let mut nodes = start_nodes(&configs).await;
        observer.wait_runners(3).await;
        let leader = observer.wait_leader("a leader", |_| true).await;
        let leader_id = leader.node.to_string();
        let follower = nodes.iter().find(|n| n.node_id() != leader_id).unwrap().address().to_string();

        let mut accepted = Vec::new();
        for n in 0..4 {
            accepted.push(observer.create(&follower, n).await);
        }
        for task in &accepted {
            wait_state(observer.coord(), task.id, TaskState::Running, WAIT).await;
        }
        let mut before = Vec::new();
        for task in &accepted {
            before.push(observer.task(task.id).await);
        }
        let victim = before.iter().map(runner_of).find(|r| *r != leader_id).unwrap_or_else(|| {
            panic!("only the leader runs tasks: {:?}", before.iter().map(runner_of).collect::<Vec<_>>())
        });
        let victims: Vec<TaskId> = before.iter().filter(|t| runner_of(t) == victim).map(|t| t.id).collect();
        let mut claims = HashMap::new();
        for id in &victims {
            observer.wait_progress(*id, "the victim's tasks make progress", |p| p.cursor_bytes >= 5 * UNIT_BYTES).await;
            let (claim, holder) = observer.claim(*id).await.expect("a running task is claimed");
            assert_eq!(holder, victim);
            claims.insert(*id, claim);
        }

        node(&mut nodes, &victim).kill_9();
        let mut committed = HashMap::new();
        for id in &victims {
            let (progress, version) = observer.progress(*id).await;
            assert!(progress.cursor_bytes < TOTAL_BYTES, "task {id} finished before the kill");
            committed.insert(*id, (version, progress.cursor_bytes));
        }
        // Its session expires after the timeout: the registration goes, with every claim.
        observer
            .wait_node(&layout::runner(&victim.parse().unwrap()), "the victim's session expires", |s| s.is_none())
            .await;

        observer.wait_all_succeeded(&accepted, WAIT).await;
        for earlier in &before {
            let id = earlier.id;
            let task = observer.task(id).await;
            assert_finished_exactly(&task);
            if victims.contains(&id) {
                assert_eq!(task.status.attempts, 2, "task {id} of the dead runner: {:?}", task.status);
                assert_ne!(runner_of(&task), victim);
                log.assert_handover(id, &claims[&id]);
                log.assert_rescued_through_pending(id, &victim, earlier.versions.status);
                log.assert_cursor_never_back(id, Some(committed[&id]));
            } else {
                assert_eq!(task.status.attempts, 1, "task {id} on a surviving runner was disturbed: {:?}", task.status);
                log.assert_cursor_never_back(id, None);
            }
        }
        let still = observer.wait_leader("the leader", |_| true).await;
        assert_eq!(still.node, leader.node, "the leader changed although only a follower died");
        assert_accounted(&observer, &accepted).await;
        assert!(log.gaps().is_empty(), "the observer's watch missed events: {:?}", log.gaps());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. A runner cut off from ZooKeeper until its session expires

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_runner_stops_writing() {
    init_tracing();
    within(CASE, "an expired runner stops writing", async {
        let zk = shared_zk();
        let chroot = unique_chroot("expired-runner");
        let connect = zk.connect_string(&chroot);
        let proxy = Proxy::start(zk.port());
        let observer = Observer::connect(&connect).await;
        let log = TaskLog::start(&observer).await;
        // n1 starts first and leads; n2, the one to be cut off, is a runner only.
        let mut nodes = start_nodes(&[node_config("n1", &connect, SESSION_MS, 2)]).await;
        observer.wait_leader("n1 leads", |l| l.node.as_str() == "n1").await;
        let cut_config = node_config("n2", &proxy.connect_string(&chroot), 2_000, 2);
        nodes.extend(start_nodes(&[cut_config, node_config("n3", &connect, SESSION_MS, 2)]).await);
        observer.wait_runners(3).await;
        let n3 = node(&mut nodes, "n3").address().to_string();

        let mut accepted = Vec::new();
        for n in 0..3 {
            accepted.push(observer.create(&n3, n).await);
        }
        for task in &accepted {
            wait_state(observer.coord(), task.id, TaskState::Running, WAIT).await;
        }
        let mut before = Vec::new();
        for task in &accepted {
            before.push(observer.task(task.id).await);
        }
        let spread: Vec<String> = before.iter().map(runner_of).collect();
        let target =
            before.iter().find(|t| runner_of(t) == "n2").unwrap_or_else(|| panic!("n2 runs nothing: {spread:?}"));
        let id = target.id;
        observer.wait_progress(id, "n2 makes progress", |p| p.cursor_bytes >= 3 * UNIT_BYTES).await;
        let (claim, holder) = observer.claim(id).await.expect("a running task is claimed");
        assert_eq!(holder, "n2");
        let registration = layout::runner(&"n2".parse().unwrap());
        let old_session =
            observer.coord.exists(&registration).await.unwrap().expect("n2 is registered").ephemeral_owner;

        tokio::task::block_in_place(|| proxy.block());
        // The server expires n2's session: its claim vanishes (and its registration with it).
        observer.wait_node(&claim, "n2's session expires", |s| s.is_none()).await;
        let (progress, version) = observer.progress(id).await;
        // The task goes back to pending and runs on another runner while n2 is still cut off.
        let rerun = wait_task(observer.coord(), id, WAIT, |s| s.state == TaskState::Running && s.attempts == 2).await;
        assert_ne!(rerun.runner.as_ref().map(|r| r.as_str()), Some("n2"));
        tokio::task::block_in_place(|| proxy.unblock());

        // n2 comes back with a new session and registers again; it was never killed.
        observer
            .wait_node(&registration, "n2 registers again", |s| s.is_some_and(|s| s.ephemeral_owner != old_session))
            .await;
        assert!(node(&mut nodes, "n2").is_alive(), "the partitioned node died");
        let cut = node(&mut nodes, "n2").address().to_string();
        let shown = observer.task_request(&cut, ClientRequest::Show { id }).await;
        assert_eq!(shown.id, id);

        observer.wait_all_succeeded(&accepted, WAIT).await;
        let task = observer.task(id).await;
        assert_finished_exactly(&task);
        assert_eq!(task.status.attempts, 2);
        assert_eq!(task.status.runner, rerun.runner, "the task changed runner again");
        // Every progress write after the expiry came from the new claim holder: none between the
        // old claim's deletion and the new claim; after it, a write of n2 would have made the new
        // runner's next version-checked commit fail (and the task would not have succeeded with
        // counters adding up).
        log.assert_handover(id, &claim);
        log.assert_rescued_through_pending(id, "n2", target.versions.status);
        log.assert_cursor_never_back(id, Some((version, progress.cursor_bytes)));
        for earlier in before.iter().filter(|t| t.id != id) {
            let other = observer.task(earlier.id).await;
            assert_finished_exactly(&other);
            assert_eq!(other.status.attempts, 1, "task {} was disturbed: {:?}", other.id, other.status);
        }
        assert!(node(&mut nodes, "n2").is_alive(), "the partitioned node died");
        assert_accounted(&observer, &accepted).await;
        assert!(log.gaps().is_empty(), "the observer's watch missed events: {:?}", log.gaps());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. ZooKeeper itself goes away and comes back

/// Two nodes on a private ZooKeeper, tasks running; ZooKeeper stops for `outage` and restarts.
/// Every accepted task must succeed afterwards and new requests must be served. The nodes'
/// sessions must survive the outage if `sessions_survive`, and expire otherwise.
async fn zookeeper_outage(case: &str, session_timeout_ms: u64, outage: Duration, sessions_survive: bool) {
    let server = tokio::task::spawn_blocking(ZkServer::start).await.expect("start a private ZooKeeper");
    let connect = server.connect_string(&unique_chroot(case));
    let observer = Observer::connect(&connect).await;
    let configs: Vec<_> = ["n1", "n2"].iter().map(|n| node_config(n, &connect, session_timeout_ms, 4)).collect();
    let nodes = start_nodes(&configs).await;
    observer.wait_runners(2).await;
    let leader = observer.wait_leader("a leader", |_| true).await;
    let follower = nodes.iter().find(|n| n.node_id() != leader.node.as_str()).unwrap().address().to_string();

    let mut accepted = Vec::new();
    for n in 0..4 {
        accepted.push(observer.create(&follower, n).await);
    }
    for task in &accepted {
        wait_state(observer.coord(), task.id, TaskState::Running, WAIT).await;
        observer.wait_progress(task.id, "tasks make progress", |p| p.cursor_bytes >= 3 * UNIT_BYTES).await;
    }
    let mut sessions = Vec::new();
    for node in &nodes {
        let registration = layout::runner(&node.node_id().parse().unwrap());
        let stat = step("read a registration", observer.coord.exists(&registration)).await.unwrap();
        sessions.push((registration, stat.expect("the node is registered").ephemeral_owner));
    }

    tokio::task::block_in_place(|| server.stop());
    // A client asks for a task during the outage; the follower keeps trying to reach a leader.
    // If the answer is a success, the task must be there and run like the others.
    let (transport, address) = (observer.transport.clone(), follower.clone());
    let during = tokio::spawn(async move {
        let request = ClientRequest::Create { id: TaskId::generate(), spec: spec(50), run_window: None };
        call(&transport, &address, request).await
    });
    // The outage itself: there is nothing to wait for but time, so here a sleep is the event.
    tokio::time::sleep(outage).await;
    tokio::task::block_in_place(|| server.restart());

    let mut session = observer.coord.subscribe();
    wait_status(&mut session, WAIT, |s| s.state == SessionState::Connected).await;
    if sessions_survive {
        assert_eq!(observer.coord.status().generation, 1, "the observer's session did not survive");
    }
    match during.await.expect("the request during the outage") {
        Ok(ClientReply::Task(task)) => accepted.push(task),
        Ok(other) => panic!("a create answered {other:?}"),
        Err(e) => assert!(e.is_transient(), "a create during the outage failed for good: {e}"),
    }
    let late = observer.create(&follower, 100).await;
    accepted.push(late);

    observer.wait_all_succeeded(&accepted, WAIT).await;
    for task in &accepted {
        assert_finished_exactly(&observer.task(task.id).await);
    }
    assert_accounted(&observer, &accepted).await;
    // The outage was what it was meant to be: the nodes' sessions survived it, or expired.
    for (registration, before) in sessions {
        let now = observer.wait_node(&registration, "the node is registered", |s| s.is_some()).await.unwrap();
        let survived = now.ephemeral_owner == before;
        assert_eq!(survived, sessions_survive, "{registration}: session {before:#x} then {:#x}", now.ephemeral_owner);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_outage_and_recovery() {
    init_tracing();
    within(CASE, "a ZooKeeper outage shorter than the session timeout", async {
        zookeeper_outage("zk-outage-short", 10_000, Duration::from_secs(3), true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_outage_longer_than_the_session_timeout() {
    init_tracing();
    within(CASE, "a ZooKeeper outage longer than the session timeout", async {
        // The client gives a silent session up after 7/5 of its timeout (5.6 s here).
        zookeeper_outage("zk-outage-long", SESSION_MS, Duration::from_secs(8), false).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Every request through a follower

/// A run window from `from` to `to` minutes after the current time of day in UTC, the daemon's
/// time zone (negative: before it).
fn window_from_now(from: i64, to: i64) -> RunWindow {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 / 60;
    let at = |offset: i64| {
        let minute = (now + offset).rem_euclid(24 * 60);
        TimeOfDay::new((minute / 60) as u8, (minute % 60) as u8).unwrap()
    };
    RunWindow::new(at(from), at(to)).unwrap()
}

/// Invariant 3: the answer to a change is the task as stored after it (its control record is
/// the one in ZooKeeper, at the same version; the dispatcher is its only writer).
async fn assert_answer_is_stored(observer: &Observer, answer: &Task) {
    let stored = observer.task(answer.id).await;
    assert_eq!(answer.control, stored.control, "the answer's control record is not the stored one");
    assert_eq!(answer.versions.control, stored.versions.control, "the answer is not the latest control record");
    assert!(answer.versions.status <= stored.versions.status, "the answer's status is from the future");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_to_a_follower_is_served() {
    init_tracing();
    within(CASE, "requests through a follower", async {
        let connect = shared_zk().connect_string(&unique_chroot("follower-requests"));
        let observer = Observer::connect(&connect).await;
        let configs: Vec<_> = ["n1", "n2"].iter().map(|n| node_config(n, &connect, SESSION_MS, 4)).collect();
        let nodes = start_nodes(&configs).await;
        observer.wait_runners(2).await;
        let leader = observer.wait_leader("a leader", |_| true).await;
        let f = nodes.iter().find(|n| n.node_id() != leader.node.as_str()).unwrap().address().to_string();

        match observer.request(&f, ClientRequest::ListRunners).await {
            Ok(ClientReply::Runners(runners)) => assert_eq!(runners.len(), 2, "{runners:?}"),
            other => panic!("list runners: {other:?}"),
        }
        let task = observer.create(&f, 1).await;
        let id = task.id;
        assert_eq!(task.state(), TaskState::Pending);
        assert_answer_is_stored(&observer, &task).await;
        let other = observer.create(&f, 2).await;

        let shown = observer.task_request(&f, ClientRequest::Show { id }).await;
        assert_eq!((shown.id, &shown.control.spec), (id, &task.control.spec));
        match observer.request(&f, ClientRequest::List(ListFilter::default())).await {
            Ok(ClientReply::Tasks(tasks)) => {
                assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [id, other.id], "oldest first");
            }
            reply => panic!("list: {reply:?}"),
        }
        // Bad input: a typed error naming the field, and nothing stored.
        let mut bad = spec(3);
        let TaskSpec::CopyVolume(copy) = &mut bad;
        copy.source_hosts.clear();
        match observer.request(&f, ClientRequest::Create { id: TaskId::generate(), spec: bad, run_window: None }).await
        {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "source_hosts"),
            reply => panic!("an invalid create: {reply:?}"),
        }
        let missing = TaskId::generate();
        match observer.request(&f, ClientRequest::Show { id: missing }).await {
            Err(ApiError::NotFound { id }) => assert_eq!(id, missing),
            reply => panic!("show a missing task: {reply:?}"),
        }

        // Pause a running task: the answer carries the change; the runner stops.
        wait_state(observer.coord(), id, TaskState::Running, WAIT).await;
        let paused = observer.task_request(&f, ClientRequest::Pause { id }).await;
        assert_eq!(paused.control.desired, DesiredState::Pause);
        assert_answer_is_stored(&observer, &paused).await;
        wait_state(observer.coord(), id, TaskState::Paused, WAIT).await;
        let (at_pause, _) = observer.progress(id).await;
        assert!(at_pause.cursor_bytes < TOTAL_BYTES, "paused after the end");

        let resumed = observer.task_request(&f, ClientRequest::Resume { id }).await;
        assert_eq!(resumed.control.desired, DesiredState::Run);
        assert_eq!(resumed.state(), TaskState::Pending, "the answer is not the status as written");
        assert_answer_is_stored(&observer, &resumed).await;
        wait_task(observer.coord(), id, WAIT, |s| s.state == TaskState::Running && s.attempts == 2).await;

        // Run windows, changed while the task runs and commits progress. An open window: the
        // task keeps running, and its progress writes never touch the window (invariant 2).
        let open = window_from_now(-60, 60);
        let set = observer.task_request(&f, ClientRequest::SetRunWindow { id, run_window: Some(open) }).await;
        assert_eq!(set.control.run_window, Some(open), "the answer does not carry the new window");
        assert_answer_is_stored(&observer, &set).await;
        let cursor = observer.progress(id).await.0.cursor_bytes;
        observer.wait_progress(id, "progress after the window change", |p| p.cursor_bytes > cursor).await;
        assert_eq!(observer.task(id).await.control.run_window, Some(open), "progress overwrote the window");
        // A window closed now: the runner stops at its next step and waits, visibly, keeping its claim.
        let closed = window_from_now(120, 180);
        let set = observer.task_request(&f, ClientRequest::SetRunWindow { id, run_window: Some(closed) }).await;
        assert_eq!(set.control.run_window, Some(closed), "the answer does not carry the new window");
        assert_answer_is_stored(&observer, &set).await;
        let waiting = wait_task(observer.coord(), id, WAIT, |s| s.waiting.is_some()).await;
        assert_eq!(waiting.state, TaskState::Running, "outside its window: {waiting:?}");
        let note = waiting.waiting.clone().unwrap_or_default();
        assert!(note.contains(&closed.to_string()), "the waiting note does not name the window: {note:?}");
        // Cleared, the window no longer holds the task back.
        let cleared = observer.task_request(&f, ClientRequest::SetRunWindow { id, run_window: None }).await;
        assert_eq!(cleared.control.run_window, None);
        assert_answer_is_stored(&observer, &cleared).await;
        wait_task(observer.coord(), id, WAIT, |s| s.waiting.is_none()).await;
        let cursor = observer.progress(id).await.0.cursor_bytes;
        observer.wait_progress(id, "progress after the window is cleared", |p| p.cursor_bytes > cursor).await;

        let canceled = observer.task_request(&f, ClientRequest::Cancel { id }).await;
        assert_eq!(canceled.control.desired, DesiredState::Cancel);
        assert_answer_is_stored(&observer, &canceled).await;
        wait_state(observer.coord(), id, TaskState::Canceled, WAIT).await;
        let again = observer.task_request(&f, ClientRequest::Cancel { id }).await;
        assert_eq!(again.state(), TaskState::Canceled, "cancel is idempotent");
        match observer.request(&f, ClientRequest::Pause { id }).await {
            Err(ApiError::WrongState { state: TaskState::Canceled, .. }) => {}
            reply => panic!("pausing a canceled task: {reply:?}"),
        }
        let final_progress = observer.progress(id).await.0;
        assert!(final_progress.cursor_bytes >= at_pause.cursor_bytes, "the resumed run went behind the pause");

        observer.wait_all_succeeded(std::slice::from_ref(&other), WAIT).await;
        assert_finished_exactly(&observer.task(other.id).await);
        match observer
            .request(&f, ClientRequest::List(ListFilter { state: Some(TaskState::Canceled), ..Default::default() }))
            .await
        {
            Ok(ClientReply::Tasks(tasks)) => assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [id]),
            reply => panic!("list canceled: {reply:?}"),
        }
        assert_accounted(&observer, &[task, other]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. The command line against a follower

/// Runs the `taskctl` example against `node` with `secret`; returns its output.
fn taskctl(node: &str, secret: &str, args: &[&str]) -> Output {
    taskctl_within(node, secret, 20_000, args)
}

/// Runs `taskctl` with `--timeout-ms timeout_ms`.
fn taskctl_within(node: &str, secret: &str, timeout_ms: u64, args: &[&str]) -> Output {
    let mut cmd = taskctl_command(node, secret, timeout_ms, args);
    tokio::task::block_in_place(|| cmd.output()).expect("run taskctl")
}

/// Runs a `taskctl` command that lasts (`task watch`) to its end; kills it and panics after
/// `limit`.
async fn taskctl_until(node: &str, secret: &str, limit: Duration, args: &[&str]) -> Output {
    let mut cmd = taskctl_command(node, secret, 20_000, args);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run taskctl");
    let pid = child.id() as libc::pid_t;
    let mut waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(limit, &mut waiter).await {
        Ok(joined) => joined.expect("the taskctl waiter").expect("taskctl's output"),
        Err(_) => {
            // SAFETY: kill(2) on our child, not reaped yet (the waiter is still waiting for it).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            let output = waiter.await.expect("the taskctl waiter").expect("taskctl's output");
            panic!("taskctl {args:?} did not end within {limit:?}; stdout:\n{}", text(&output.stdout));
        }
    }
}

/// The `taskctl` example, to talk to `node` with `secret`.
fn taskctl_command(node: &str, secret: &str, timeout_ms: u64, args: &[&str]) -> Command {
    let mut cmd = Command::new(example_binary("taskctl"));
    cmd.args(["--node", node, "--timeout-ms", &timeout_ms.to_string()])
        .args(args)
        .env("TASK_CENTER_SECRET", secret)
        .env_remove("TASK_CENTER_NODE")
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            // Never outlive the test's thread that waits for it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `taskctl` succeeded; its stdout.
fn ok(output: Output, what: &str) -> String {
    assert!(output.status.success(), "taskctl {what}: {:?}\nstderr: {}", output.status, text(&output.stderr));
    text(&output.stdout)
}

/// The value of a `key  value` line of `taskctl task show`.
fn shown(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|line| {
            line.strip_prefix(key).filter(|rest| rest.starts_with(' ')).map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taskctl_talks_to_any_node() {
    init_tracing();
    within(CASE, "taskctl against a follower", async {
        let connect = shared_zk().connect_string(&unique_chroot("taskctl"));
        let observer = Observer::connect(&connect).await;
        let configs: Vec<_> = ["n1", "n2"].iter().map(|n| node_config(n, &connect, SESSION_MS, 4)).collect();
        let nodes = start_nodes(&configs).await;
        observer.wait_runners(2).await;
        let leader = observer.wait_leader("a leader", |_| true).await;
        let f = nodes.iter().find(|n| n.node_id() != leader.node.as_str()).unwrap().address().to_string();

        let created = ok(
            taskctl(
                &f,
                SECRET,
                &[
                    "task",
                    "create",
                    "--source-volume",
                    "vol-a",
                    "--target-volume",
                    "vol-b",
                    "--source-hosts",
                    "198.51.100.1:10201,198.51.100.2:10201",
                    "--target-hosts",
                    "203.0.113.1:10201",
                ],
            ),
            "task create",
        );
        let id: TaskId = shown(&created, "id").parse().expect("the created task's id");
        let id_text = id.to_string();
        assert_eq!(shown(&created, "state"), "pending");
        let stored = observer.task(id).await;
        let TaskSpec::CopyVolume(copy) = &stored.control.spec;
        assert_eq!(copy.source_hosts, ["198.51.100.1:10201", "198.51.100.2:10201"]);

        // An aligned table: every row's cells start where the header's titles start.
        let listed = ok(taskctl(&f, SECRET, &["task", "list"]), "task list");
        let mut lines = listed.lines();
        let header = lines.next().expect("a header line");
        assert!(header.starts_with("ID  "), "header: {header:?}");
        let titles = ["ID", "STATE", "RUNNER", "PROGRESS", "WINDOW", "SPEC"];
        assert_eq!(header.split_whitespace().collect::<Vec<_>>(), titles, "header: {header:?}");
        let columns: Vec<usize> = titles.iter().map(|t| header.find(t).unwrap()).collect();
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 1, "one task listed:\n{listed}");
        let row = rows[0];
        assert!(row.starts_with(&id_text), "row: {row:?}");
        for (title, &column) in titles.iter().zip(&columns).skip(1) {
            let cell = &row[column..];
            assert!(!cell.starts_with(' ') && row[..column].ends_with("  "), "column {title} misaligned in {row:?}");
        }
        let state_cell = row[columns[1]..].split_whitespace().next().unwrap();
        assert!(["pending", "running"].contains(&state_cell), "state cell {state_cell:?}");

        let json = ok(taskctl(&f, SECRET, &["--json", "task", "show", &id_text]), "--json task show");
        let value: serde_json::Value = serde_json::from_str(&json).expect("task show --json prints JSON");
        assert_eq!(value["id"].as_str(), Some(id_text.as_str()), "{json}");
        let listed = ok(taskctl(&f, SECRET, &["task", "list", "--json"]), "task list --json");
        let value: serde_json::Value = serde_json::from_str(&listed).expect("task list --json prints JSON");
        assert_eq!(value.as_array().map(|a| a.len()), Some(1), "{listed}");

        let set = ok(taskctl(&f, SECRET, &["task", "set-runtime", &id_text, "01:00", "05:00"]), "task set-runtime");
        assert_eq!(shown(&set, "run window"), "01:00-05:00", "the answer shows the new window:\n{set}");
        let window: RunWindow = "01:00-05:00".parse().unwrap();
        assert_eq!(observer.task(id).await.control.run_window, Some(window));

        let bad = taskctl(&f, SECRET, &["task", "set-runtime", &id_text, "25:00", "05:00"]);
        assert_eq!(bad.status.code(), Some(2), "a malformed window: {:?}", bad.status);
        let stderr = text(&bad.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr:?}");
        assert!(stderr.contains("25:00"), "the error names the value: {stderr:?}");
        assert!(bad.stdout.is_empty(), "nothing on stdout: {:?}", text(&bad.stdout));
        assert_eq!(observer.task(id).await.control.run_window, Some(window), "a refused window changed the task");
        // (Unless it is 01:00-05:00 UTC now, the task waits for its window; cleared, it runs.)
        let cleared = ok(taskctl(&f, SECRET, &["task", "set-runtime", &id_text, "--clear"]), "set-runtime --clear");
        assert_eq!(shown(&cleared, "run window"), "any time", "the answer shows no window:\n{cleared}");
        assert_eq!(observer.task(id).await.control.run_window, None);

        let wrong = taskctl_within(&f, "not-the-cluster-secret-at-all-0123", 2_000, &["task", "show", &id_text]);
        let stderr = text(&wrong.stderr);
        assert!(!wrong.status.success(), "a wrong secret was accepted: {}", text(&wrong.stdout));
        assert_ne!(wrong.status.code(), Some(101), "taskctl panicked: {stderr}");
        assert!(!stderr.contains("panicked"), "taskctl panicked: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr:?}");
        assert!(wrong.stdout.is_empty(), "a wrong secret printed: {:?}", text(&wrong.stdout));

        // `task watch` follows the task to its end: one line redrawn in place, then the final state.
        let watched = taskctl_until(&f, SECRET, WAIT, &["task", "watch", &id_text, "--interval-ms", "200"]).await;
        let out = ok(watched, "task watch");
        let redraws: Vec<&str> = out.split(['\r', '\n']).filter(|l| !l.trim().is_empty()).collect();
        assert!(out.starts_with('\r') && redraws.len() >= 2, "watch redraws a line in place: {out:?}");
        let last = redraws.last().unwrap();
        assert!(last.starts_with(&format!("task {id_text} succeeded")), "the final line: {last:?} in {out:?}");
        let bar = redraws[redraws.len() - 2];
        assert!(bar.starts_with("succeeded") && bar.contains("100.0%"), "the last redraw: {bar:?}");
        assert!(bar.contains(&format!("[{}]", "#".repeat(30))), "a full bar: {bar:?}");
        wait_state(observer.coord(), id, TaskState::Succeeded, WAIT).await;
        assert_finished_exactly(&observer.task(id).await);

        // `task show` for people: progress with extent, rate and time left, times in UTC.
        let show = ok(taskctl(&f, SECRET, &["task", "show", &id_text]), "task show");
        assert_eq!(shown(&show, "state"), "succeeded");
        assert_eq!(shown(&show, "progress"), "40.0 MiB of 40.0 MiB (100.0%)", "{show}");
        assert_eq!(shown(&show, "extent"), "all 1 done (256.0 MiB each)", "{show}");
        assert_eq!(shown(&show, "rate"), "-", "the simulated executor reports no rate:\n{show}");
        assert_eq!(shown(&show, "eta"), "-", "{show}");
        let created = jiff::Timestamp::from_millisecond(stored.control.created_at_ms).unwrap();
        assert_eq!(shown(&show, "created"), created.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(), "{show}");

        // With --json, one JSON line per refresh, the last one the finished task.
        let second = observer.create(&f, 7).await;
        let second_id = second.id.to_string();
        let args = ["--json", "task", "watch", second_id.as_str(), "--interval-ms", "200"];
        let out = ok(taskctl_until(&f, SECRET, WAIT, &args).await, "task watch --json");
        let lines: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect();
        assert!(lines.len() >= 2, "a line per refresh: {out}");
        assert!(lines.iter().all(|v| v["id"].as_str() == Some(second_id.as_str())), "{out}");
        assert_eq!(lines.last().unwrap()["status"]["state"].as_str(), Some("succeeded"), "{out}");
        assert_finished_exactly(&observer.task(second.id).await);
        // A task that did not succeed: exit status 1, and the final line says how it ended.
        let canceled = observer.create(&f, 8).await;
        observer.task_request(&f, ClientRequest::Cancel { id: canceled.id }).await;
        wait_state(observer.coord(), canceled.id, TaskState::Canceled, WAIT).await;
        let watched = taskctl_until(&f, SECRET, WAIT, &["task", "watch", &canceled.id.to_string()]).await;
        assert_eq!(watched.status.code(), Some(1), "watching a canceled task: {:?}", watched.status);
        let out = text(&watched.stdout);
        assert!(out.trim_end().ends_with(&format!("task {} canceled", canceled.id)), "{out:?}");
        assert_accounted(&observer, &[stored, second, canceled]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. A real copy of a volume, its runner killed mid-copy

/// The copied volume: 512 MiB, in 32 MiB extents of the default 64 KiB blocks.
const VOLUME_BYTES: u64 = 512 << 20;
const EXTENT_BYTES: u64 = 32 << 20;
const BLOCK_BYTES: u64 = task_center::model::DEFAULT_BLOCK_SIZE_BYTES as u64;
/// Payload per second: the ~110 MiB of data take a few seconds, so the copy is killed mid-way.
const BANDWIDTH_BYTES_PER_SECOND: u64 = 32 << 20;
/// The block services of the source and of the target (directories of the shared file backend).
const SOURCE_HOST: &str = "198.51.100.1:10201";
const TARGET_HOST: &str = "203.0.113.1:10201";
/// Hang guard for a copy to end, a rescue after a kill included (the nodes are debug builds,
/// and a verified copy hashes every extent on both sides).
const COPY_WAIT: Duration = Duration::from_secs(120);
/// Hang guard for the whole scenario.
const COPY_CASE: Duration = Duration::from_secs(300);

/// A deterministic generator (xorshift64), so every run writes the same volume.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `[low, high)`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes()[..chunk.len()]);
        }
        buf
    }
}

fn volume_ref(host: &str, name: &str) -> VolumeRef {
    VolumeRef { hosts: vec![host.to_string()], volume: VolumeId::new(name).unwrap() }
}

/// A verified, throttled copy of `source` to `target`, incremental if `base` is given.
fn copy_spec(source: &VolumeRef, target: &VolumeRef, base: Option<SnapshotId>) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: base,
        options: CopyOptions {
            extent_size_bytes: EXTENT_BYTES,
            bandwidth_limit_bytes_per_second: Some(BANDWIDTH_BYTES_PER_SECOND),
            verify: Some(Verify::Xxh3),
            ..CopyOptions::default()
        },
    })
}

/// A node that copies volumes for real, over the file backend at `volumes` (shared by every
/// node, as a block service is).
fn copy_node_config(id: &str, zookeeper: &str, volumes: &std::path::Path) -> NodeConfig {
    NodeConfig {
        session_timeout_ms: Some(SESSION_MS),
        tasks_per_runner: Some(2),
        sweep_interval_ms: Some(SWEEP_MS),
        volumes_root: Some(volumes.to_path_buf()),
        ..NodeConfig::new(id, zookeeper, SECRET)
    }
}

/// Writes scattered data into the source through the backend: in every extent, runs of
/// pseudo-random bytes of random lengths (not block-aligned) at random offsets, about 8 MiB per
/// extent, and one run of explicit zeroes (allocated, but zero); the rest stays holes. Returns
/// the runs of random data, in the order written (later runs may overlap earlier ones).
///
/// No extent is all holes, to work around a stall in the engine: `verify_extent` hashes the
/// zeroes of unallocated blocks inline, never yielding between them, on the node's actor thread,
/// which also runs its ZooKeeper session. In a debug build one verified 32 MiB extent of holes
/// holds that thread for about 0.6 s; on a loaded machine two of them made a node miss its
/// ZooKeeper read timeout (1.6 s) and drop the task, which then ran a third time.
async fn scatter_source(backend: &FileBackend, source: &VolumeRef, rng: &mut XorShift) -> Vec<Range<u64>> {
    let volume = backend.open_target(source, &setup_lease()).await.expect("open the source for writing");
    let mut runs = Vec::new();
    for extent in 0..VOLUME_BYTES / EXTENT_BYTES {
        let base = extent * EXTENT_BYTES;
        let mut in_extent = 0;
        while in_extent < 8 << 20 {
            let len = rng.range(1, 1 << 20);
            let offset = base + rng.range(0, EXTENT_BYTES - len);
            volume.write(offset, rng.bytes(len as usize)).await.expect("write the source");
            runs.push(offset..offset + len);
            in_extent += len;
        }
        let zeroes = rng.range(BLOCK_BYTES, 4 * BLOCK_BYTES);
        let offset = base + rng.range(0, EXTENT_BYTES - zeroes);
        volume.write(offset, vec![0; zeroes as usize]).await.expect("write zeroes to the source");
    }
    volume.flush().await.expect("flush the source");
    runs
}

/// Changes some blocks of the source after a first copy: new data in a few places, zeroes
/// written over data, and a hole punched through data (inside the last long runs of data that
/// `scatter_source` wrote).
async fn change_source(backend: &FileBackend, source: &VolumeRef, runs: &[Range<u64>], rng: &mut XorShift) {
    let volume = backend.open_target(source, &setup_lease()).await.expect("open the source for writing");
    for _ in 0..12 {
        let len = rng.range(1, 512 << 10);
        let offset = rng.range(0, VOLUME_BYTES - len);
        volume.write(offset, rng.bytes(len as usize)).await.expect("change the source");
    }
    let mut long = runs.iter().rev().filter(|r| r.end - r.start >= 8 * BLOCK_BYTES);
    let (zeroed, punched) = (long.next().expect("a long run"), long.next().expect("another long run"));
    let (zeroed, punched) = (zeroed.start + BLOCK_BYTES, punched.start + BLOCK_BYTES);
    volume.write(zeroed, vec![0; 3 * BLOCK_BYTES as usize]).await.expect("write zeroes over data");
    volume.zero(punched..punched + 4 * BLOCK_BYTES).await.expect("punch a hole through data");
    volume.flush().await.expect("flush the source");
}

/// What a copy must have produced, read from the image files.
#[derive(Debug, Default)]
struct Expected {
    /// The digest of the source snapshot, as a verified copy records it.
    digest: Option<String>,
    /// Blocks holding a non-zero byte: a full copy sends exactly these.
    data_blocks: u64,
    /// Blocks holding a non-zero byte that differ from the base: an incremental copy sends these.
    changed_blocks: u64,
    /// Blocks holding a non-zero byte equal to the base: an incremental copy skips these.
    unchanged_blocks: u64,
}

/// Compares the target with the source snapshot, byte for byte (panics naming the first byte
/// that differs), computes the snapshot's digest, and counts its blocks, against `base` if
/// given. Blocking: run it with `spawn_blocking`.
fn check_copy(snapshot: &std::path::Path, target: &std::path::Path, base: Option<&std::path::Path>) -> Expected {
    use std::os::unix::fs::FileExt;
    let open = |path: &std::path::Path| {
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let len = file.metadata().unwrap().len();
        assert_eq!(len, VOLUME_BYTES, "{} is {len} bytes", path.display());
        file
    };
    let (snapshot, target, base) = (open(snapshot), open(target), base.map(open));
    let mut expected = Expected::default();
    let mut digest = VolumeDigest::new(Verify::Xxh3);
    let (mut source_extent, mut target_extent) = (vec![0u8; EXTENT_BYTES as usize], vec![0u8; EXTENT_BYTES as usize]);
    let mut base_extent = vec![0u8; if base.is_some() { EXTENT_BYTES as usize } else { 0 }];
    let zeroes = vec![0u8; BLOCK_BYTES as usize];
    for offset in (0..VOLUME_BYTES).step_by(EXTENT_BYTES as usize) {
        snapshot.read_exact_at(&mut source_extent, offset).expect("read the source snapshot");
        target.read_exact_at(&mut target_extent, offset).expect("read the target");
        if source_extent != target_extent {
            let at = source_extent.iter().zip(&target_extent).position(|(a, b)| a != b).unwrap() as u64;
            panic!(
                "the target differs from the source snapshot at byte {} (extent {}, block {})",
                offset + at,
                offset / EXTENT_BYTES,
                (offset + at) / BLOCK_BYTES
            );
        }
        digest.push_extent(&source_extent);
        if let Some(base) = &base {
            base.read_exact_at(&mut base_extent, offset).expect("read the base snapshot");
        }
        for (i, block) in source_extent.chunks(BLOCK_BYTES as usize).enumerate() {
            // A comparison with zeroes is a memcmp, fast even in a debug build.
            if *block == zeroes[..block.len()] {
                continue;
            }
            expected.data_blocks += 1;
            if base.is_some() {
                let range = i * BLOCK_BYTES as usize..(i + 1) * BLOCK_BYTES as usize;
                if base_extent[range] == *block {
                    expected.unchanged_blocks += 1;
                } else {
                    expected.changed_blocks += 1;
                }
            }
        }
    }
    expected.digest = digest.finish();
    expected
}

/// [`check_copy`] of a finished copy task: its source snapshot against `target`.
async fn check_copy_task(
    backend: &FileBackend,
    source: &VolumeRef,
    target: &VolumeRef,
    task: &Task,
    base: Option<&SnapshotId>,
) -> Expected {
    let snapshot = CopyEngine::snapshot_name(&task.id);
    assert_eq!(task.progress.source_snapshot.as_ref(), Some(&snapshot), "task {}: source snapshot", task.id);
    let snapshot = backend.snapshot_path(source, &snapshot);
    let target = backend.volume_path(target);
    let base = base.map(|b| backend.snapshot_path(source, b));
    let check = tokio::task::spawn_blocking(move || check_copy(&snapshot, &target, base.as_deref()));
    within(COPY_WAIT, "compare the target with the source snapshot", check).await.expect("the comparison")
}

/// A copy task that ended exact: succeeded, every byte counted once, the recorded digest that of
/// its source snapshot, and a snapshot of the target under the task's name for the next copy.
async fn assert_copy_exact(backend: &FileBackend, target: &VolumeRef, task: &Task, expected: &Expected) {
    let (id, p) = (task.id, &task.progress);
    assert_eq!(task.state(), TaskState::Succeeded, "task {id}: {:?}", task.status);
    assert_eq!(p.total_bytes, Some(VOLUME_BYTES), "task {id}: total");
    assert_eq!(p.cursor_bytes, VOLUME_BYTES, "task {id}: the cursor is not at the end");
    assert_eq!(p.counters.total(), VOLUME_BYTES, "task {id}: counters {:?}", p.counters);
    assert!(expected.digest.is_some());
    assert_eq!(p.digest, expected.digest, "task {id}: the recorded digest is not the source snapshot's");
    let snapshot = CopyEngine::snapshot_name(&id);
    let exists = backend.snapshot_exists(target, &snapshot).await.expect("look up the target snapshot");
    assert!(exists, "task {id}: no snapshot {snapshot} of the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_runner_mid_copy_and_the_copy_is_exact() {
    init_tracing();
    within(COPY_CASE, "a real copy, its runner killed", async {
        let connect = shared_zk().connect_string(&unique_chroot("real-copy"));
        let observer = Observer::connect(&connect).await;
        let log = TaskLog::start(&observer).await;
        let volumes = tempfile::Builder::new().prefix("tc-volumes-").tempdir().expect("temp dir");
        let backend = FileBackend::new(volumes.path());
        let source = volume_ref(SOURCE_HOST, "vm-disk-1");
        let target = volume_ref(TARGET_HOST, "vm-disk-1-copy");
        step("create the source", backend.create_volume(&source, VOLUME_BYTES)).await.expect("create the source");
        step("create the target", backend.create_volume(&target, VOLUME_BYTES)).await.expect("create the target");
        let mut rng = XorShift(0x5eed_c0b1);
        let runs = step("write the source", scatter_source(&backend, &source, &mut rng)).await;

        let configs: Vec<_> =
            ["n1", "n2", "n3"].iter().map(|n| copy_node_config(n, &connect, volumes.path())).collect();
        let mut nodes = start_nodes(&configs).await;
        observer.wait_runners(3).await;
        observer.wait_leader("a leader", |_| true).await;
        let writers = WriterWatch::start(nodes.iter().map(|n| n.pid()).collect(), vec![backend.volume_path(&target)]);

        // A full copy; killed after its first committed extent.
        let address = nodes[0].address().to_string();
        let create =
            ClientRequest::Create { id: TaskId::generate(), spec: copy_spec(&source, &target, None), run_window: None };
        let first = observer.task_request(&address, create).await;
        let id = first.id;
        wait_state(observer.coord(), id, TaskState::Running, WAIT).await;
        observer.wait_progress(id, "an extent is committed", |p| p.cursor_bytes >= EXTENT_BYTES).await;
        let running = observer.task(id).await;
        assert_eq!((running.state(), running.status.attempts), (TaskState::Running, 1), "{:?}", running.status);
        let victim = runner_of(&running);
        let (claim, holder) = observer.claim(id).await.expect("a running task is claimed");
        assert_eq!(holder, victim);
        node(&mut nodes, &victim).kill_9();
        // Its last committed progress. (A write it sent just before dying may still land after
        // this read; it can only move the cursor forward.)
        let (committed, version) = observer.progress(id).await;
        assert!(
            committed.cursor_bytes >= EXTENT_BYTES && committed.cursor_bytes < VOLUME_BYTES,
            "the copy was not mid-way at the kill: cursor {} of {VOLUME_BYTES}",
            committed.cursor_bytes
        );
        assert_eq!(committed.cursor_bytes % BLOCK_BYTES, 0, "the cursor is committed at block boundaries");
        let rerun =
            wait_task(observer.coord(), id, COPY_WAIT, |s| s.state == TaskState::Running && s.attempts == 2).await;
        assert_ne!(rerun.runner.as_ref().map(|r| r.as_str()), Some(victim.as_str()), "resumed on the dead runner");
        wait_state(observer.coord(), id, TaskState::Succeeded, COPY_WAIT).await;
        let first = observer.task(id).await;
        assert_eq!(first.status.attempts, 2, "{:?}", first.status);
        assert_eq!(first.status.runner, rerun.runner, "the task changed runner again");
        // One owner at a time, and the second run resumed from the last committed extent.
        let new_claim = log.assert_handover(id, &claim);
        assert_ne!(new_claim, claim);
        log.assert_rescued_through_pending(id, &victim, running.versions.status);
        log.assert_cursor_never_back(id, Some((version, committed.cursor_bytes)));
        let resumed_at = log.progress(id).into_iter().find(|(v, _)| *v > version).map(|(_, p)| p.cursor_bytes);
        assert!(
            resumed_at.is_some_and(|c| c >= committed.cursor_bytes),
            "the resumed run's first commit {resumed_at:?} is behind the committed cursor {}",
            committed.cursor_bytes
        );

        // Invariant 5: the target is the source snapshot, byte for byte, and so is the digest.
        let expected = check_copy_task(&backend, &source, &target, &first, None).await;
        assert_copy_exact(&backend, &target, &first, &expected).await;
        assert_eq!(
            first.progress.counters.bytes_copied,
            expected.data_blocks * BLOCK_BYTES,
            "a full copy sends every block holding data exactly once, over both runs: {:?}",
            first.progress.counters
        );
        assert_eq!(first.progress.counters.bytes_skipped_unchanged, 0);
        // What `taskctl task show` makes of a real copy's progress.
        let survivor = nodes.iter().find(|n| n.node_id() != victim).expect("a live node").address().to_string();
        let show = ok(taskctl(&survivor, SECRET, &["task", "show", &id.to_string()]), "task show");
        assert_eq!(shown(&show, "progress"), "512.0 MiB of 512.0 MiB (100.0%)", "{show}");
        assert_eq!(shown(&show, "extent"), "all 16 done (32.0 MiB each)", "{show}");
        assert!(shown(&show, "rate").ends_with(" MiB/s"), "{show}");
        assert_eq!(shown(&show, "digest"), expected.digest.clone().unwrap(), "{show}");

        // An incremental copy against the first copy's snapshot, after some blocks changed.
        step("change the source", change_source(&backend, &source, &runs, &mut rng)).await;
        let base = CopyEngine::snapshot_name(&id);
        let spec = copy_spec(&source, &target, Some(base.clone()));
        let create = ClientRequest::Create { id: TaskId::generate(), spec, run_window: None };
        let second = observer.task_request(&survivor, create).await;
        wait_state(observer.coord(), second.id, TaskState::Succeeded, COPY_WAIT).await;
        // (Not necessarily in one attempt: on a loaded machine a node may lose its connection and
        // drop the task, which then resumes elsewhere; the counts below hold across resumes.)
        let incremental = observer.task(second.id).await;
        let expected = check_copy_task(&backend, &source, &target, &incremental, Some(&base)).await;
        assert_copy_exact(&backend, &target, &incremental, &expected).await;
        let counters = &incremental.progress.counters;
        assert!(expected.changed_blocks > 0 && expected.unchanged_blocks > 0, "{expected:?}");
        assert!(counters.bytes_skipped_unchanged > 0, "{counters:?}");
        assert_eq!(counters.bytes_copied, expected.changed_blocks * BLOCK_BYTES, "only changed blocks are sent");
        assert_eq!(counters.bytes_skipped_unchanged, expected.unchanged_blocks * BLOCK_BYTES, "{counters:?}");
        assert_ne!(expected.digest, first.progress.digest, "the source did change");
        assert_one_writer(&writers, &backend.volume_path(&target), 2);
        assert_accounted(&observer, &[first, second]).await;
        assert!(log.gaps().is_empty(), "the observer's watch missed events: {:?}", log.gaps());
    })
    .await;
}

/// The writer lease tests write volumes under, outside any task.
fn setup_lease() -> task_center::model::WriterLease {
    task_center::model::WriterLease::new(task_center::model::TaskId::from_bytes([0; 16]), 1)
}

/// "At most one writer per target volume at any instant", sampled from outside (see
/// [`WriterWatch`]); and at least `writers` processes were seen writing it over the scenario
/// (the watch saw the copies at all).
fn assert_one_writer(watch: &WriterWatch, volume: &std::path::Path, writers: usize) {
    let overlaps = watch.overlaps();
    assert!(
        overlaps.is_empty(),
        "two processes wrote {} at once: {:?}",
        volume.display(),
        &overlaps[..overlaps.len().min(5)]
    );
    let seen = watch.writers(volume);
    assert!(
        seen.len() >= writers,
        "{} writers of {} seen in {} samples: {seen:?}",
        seen.len(),
        volume.display(),
        watch.samples()
    );
}

/// Compares two image files byte for byte; panics naming the first byte that differs.
async fn assert_same_bytes(a: std::path::PathBuf, b: std::path::PathBuf) {
    let compare = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let open = |p: &std::path::Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let (mut x, mut y) = (open(&a), open(&b));
        assert_eq!(
            x.metadata().unwrap().len(),
            y.metadata().unwrap().len(),
            "{} and {}: sizes",
            a.display(),
            b.display()
        );
        let (mut bx, mut by) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
        let mut offset = 0u64;
        loop {
            let n = x.read(&mut bx).unwrap();
            if n == 0 {
                return;
            }
            y.read_exact(&mut by[..n]).unwrap();
            if bx[..n] != by[..n] {
                let at = bx[..n].iter().zip(&by[..n]).position(|(p, q)| p != q).unwrap() as u64;
                panic!("{} differs from {} at byte {}", b.display(), a.display(), offset + at);
            }
            offset += n as u64;
        }
    });
    within(COPY_WAIT, "compare two snapshots", compare).await.expect("the comparison");
}

// ---------------------------------------------------------------------------------------------
// 8. A runner partitioned from ZooKeeper in the middle of a copy step longer than its session

/// Payload per second of the partitioned copy: 8 MiB of data per 32 MiB extent take 2 s, as
/// long as the partitioned node's session timeout, so the partition falls inside a step.
const SLOW_BYTES_PER_SECOND: u64 = 4 << 20;
/// The partitioned node's session timeout.
const CUT_SESSION_MS: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_writer_never_writes_again_and_every_copy_is_exact() {
    init_tracing();
    within(COPY_CASE, "a partitioned writer", async {
        let zk = shared_zk();
        let chroot = unique_chroot("partitioned-writer");
        let connect = zk.connect_string(&chroot);
        let proxy = Proxy::start(zk.port());
        let observer = Observer::connect(&connect).await;
        let log = TaskLog::start(&observer).await;
        let volumes = tempfile::Builder::new().prefix("tc-volumes-").tempdir().expect("temp dir");
        let backend = FileBackend::new(volumes.path());
        let source = volume_ref(SOURCE_HOST, "vm-disk-2");
        let target = volume_ref(TARGET_HOST, "vm-disk-2-copy");
        let (decoy_source, decoy_target) = (volume_ref(SOURCE_HOST, "decoy"), volume_ref(TARGET_HOST, "decoy-copy"));
        for volume in [&source, &target, &decoy_source, &decoy_target] {
            step("create a volume", backend.create_volume(volume, VOLUME_BYTES)).await.expect("create a volume");
        }
        let mut rng = XorShift(0xfe7c_ed01);
        let runs = step("write the source", scatter_source(&backend, &source, &mut rng)).await;
        step("write the decoy", scatter_source(&backend, &decoy_source, &mut rng)).await;

        // n1 leads; n2 reaches ZooKeeper through the proxy, with a short session.
        let mut nodes = start_nodes(&[copy_node_config("n1", &connect, volumes.path())]).await;
        observer.wait_leader("n1 leads", |l| l.node.as_str() == "n1").await;
        let cut = NodeConfig {
            session_timeout_ms: Some(CUT_SESSION_MS),
            ..copy_node_config("n2", &proxy.connect_string(&chroot), volumes.path())
        };
        nodes.extend(start_nodes(&[cut]).await);
        observer.wait_runners(2).await;
        let writers = WriterWatch::start(nodes.iter().map(|n| n.pid()).collect(), vec![backend.volume_path(&target)]);
        let n1 = node(&mut nodes, "n1").address().to_string();

        // The decoy takes n1's first slot (least loaded first, then by name), so the copy goes
        // to n2.
        let decoy = ClientRequest::Create {
            id: TaskId::generate(),
            spec: copy_spec(&decoy_source, &decoy_target, None),
            run_window: None,
        };
        let decoy = observer.task_request(&n1, decoy).await;
        wait_state(observer.coord(), decoy.id, TaskState::Running, WAIT).await;
        let mut spec = copy_spec(&source, &target, None);
        let TaskSpec::CopyVolume(copy) = &mut spec;
        copy.options.bandwidth_limit_bytes_per_second = Some(SLOW_BYTES_PER_SECOND);
        copy.options.checkpoint_bytes = EXTENT_BYTES;
        copy.options.checkpoint_interval_ms = 60_000;
        let create = ClientRequest::Create { id: TaskId::generate(), spec, run_window: None };
        let first = observer.task_request(&n1, create).await;
        let id = first.id;
        let running = wait_state(observer.coord(), id, TaskState::Running, WAIT).await;
        assert_eq!(running.runner.as_ref().map(|r| r.as_str()), Some("n2"), "{running:?}");
        observer.wait_progress(id, "n2 commits an extent", |p| p.cursor_bytes >= EXTENT_BYTES).await;
        let (claim, _) = observer.claim(id).await.expect("a running task is claimed");
        let mark = node(&mut nodes, "n2").stderr_mark();

        // Cut n2 off in the middle of a step; its session expires, and n1 takes the copy over.
        tokio::task::block_in_place(|| proxy.block());
        observer.wait_node(&claim, "n2's session expires", |s| s.is_none()).await;
        let rerun =
            wait_task(observer.coord(), id, COPY_WAIT, |s| s.state == TaskState::Running && s.attempts == 2).await;
        assert_eq!(rerun.runner.as_ref().map(|r| r.as_str()), Some("n1"), "{rerun:?}");
        observer.wait_progress(id, "n1 writes", |p| p.updated_at_ms > 0 && p.cursor_bytes > 2 * EXTENT_BYTES).await;
        tokio::task::block_in_place(|| proxy.unblock());
        wait_state(observer.coord(), id, TaskState::Succeeded, COPY_WAIT).await;
        let first = observer.task(id).await;
        let expected = check_copy_task(&backend, &source, &target, &first, None).await;
        assert_copy_exact(&backend, &target, &first, &expected).await;
        log.assert_handover(id, &claim);

        // n2 stopped writing on its own, before its session could expire: its local lease
        // lapsed (half its session after the last answer) and every later write was refused.
        let said = node(&mut nodes, "n2").stderr_since(mark);
        let lapses = said.iter().filter(|l| l.contains("local lease lapsed")).count();
        assert!(lapses >= 1, "n2 never noticed its lease lapse: {said:#?}");
        assert!(node(&mut nodes, "n2").is_alive(), "the partitioned node died");

        // Two incremental copies on top, each against the one before: n2 is back and may run them.
        let mut tasks = vec![first];
        for _ in 0..2 {
            step("change the source", change_source(&backend, &source, &runs, &mut rng)).await;
            let base = CopyEngine::snapshot_name(&tasks.last().unwrap().id);
            let spec = copy_spec(&source, &target, Some(base.clone()));
            let create = ClientRequest::Create { id: TaskId::generate(), spec, run_window: None };
            let next = observer.task_request(&n1, create).await;
            wait_state(observer.coord(), next.id, TaskState::Succeeded, COPY_WAIT).await;
            let next = observer.task(next.id).await;
            let expected = check_copy_task(&backend, &source, &target, &next, Some(&base)).await;
            assert_copy_exact(&backend, &target, &next, &expected).await;
            tasks.push(next);
        }
        // Every target snapshot equals its source snapshot, byte for byte, at the end: no late
        // write landed in any of them.
        for task in &tasks {
            let name = CopyEngine::snapshot_name(&task.id);
            assert_same_bytes(backend.snapshot_path(&source, &name), backend.snapshot_path(&target, &name)).await;
        }
        // The volume's newest admitted lease is the last copy's claim.
        let newest = backend.newest_lease(&target).await.expect("read the lease").expect("a lease");
        assert_eq!(newest.task, tasks.last().unwrap().id);
        assert_one_writer(&writers, &backend.volume_path(&target), 2);
        log.assert_cursor_never_back(id, None);
        wait_state(observer.coord(), decoy.id, TaskState::Succeeded, COPY_WAIT).await;
        let decoy = observer.task(decoy.id).await;
        tasks.push(decoy);
        assert_accounted(&observer, &tasks).await;
        assert!(log.gaps().is_empty(), "the observer's watch missed events: {:?}", log.gaps());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Two tasks to one target, and a cancel inside a 1 B/s bandwidth wait

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tasks_to_one_target_queue_and_a_cancel_at_1_byte_per_second_takes_effect() {
    init_tracing();
    within(COPY_CASE, "two tasks to one target", async {
        let connect = shared_zk().connect_string(&unique_chroot("one-target"));
        let observer = Observer::connect(&connect).await;
        let volumes = tempfile::Builder::new().prefix("tc-volumes-").tempdir().expect("temp dir");
        let backend = FileBackend::new(volumes.path());
        let (a, c) = (volume_ref(SOURCE_HOST, "vol-a"), volume_ref(SOURCE_HOST, "vol-c"));
        let target = volume_ref(TARGET_HOST, "vol-d");
        for volume in [&a, &c, &target] {
            step("create a volume", backend.create_volume(volume, VOLUME_BYTES)).await.expect("create a volume");
        }
        let mut rng = XorShift(0x0e7a_39e1);
        step("write vol-a", scatter_source(&backend, &a, &mut rng)).await;
        step("write vol-c", scatter_source(&backend, &c, &mut rng)).await;
        let configs: Vec<_> = ["n1", "n2"].iter().map(|n| copy_node_config(n, &connect, volumes.path())).collect();
        let mut nodes = start_nodes(&configs).await;
        observer.wait_runners(2).await;
        observer.wait_leader("a leader", |_| true).await;
        let writers = WriterWatch::start(nodes.iter().map(|n| n.pid()).collect(), vec![backend.volume_path(&target)]);
        let address = node(&mut nodes, "n2").address().to_string();

        // vol-a -> vol-d runs; vol-c -> vol-d, created while it runs, waits behind it.
        let create = |source: &VolumeRef| ClientRequest::Create {
            id: TaskId::generate(),
            spec: copy_spec(source, &target, None),
            run_window: None,
        };
        let first = observer.task_request(&address, create(&a)).await;
        wait_state(observer.coord(), first.id, TaskState::Running, WAIT).await;
        let second = observer.task_request(&address, create(&c)).await;
        let queued = wait_task(observer.coord(), second.id, WAIT, |s| s.waiting.is_some()).await;
        let note = queued.waiting.clone().unwrap();
        assert!(note.contains(&first.id.to_string()) && note.contains("vol-d"), "{note}");
        let shown = ok(taskctl(&address, SECRET, &["task", "show", &second.id.to_string()]), "task show");
        assert!(shown.contains(&format!("queued behind task {}", first.id)), "{shown}");
        wait_state(observer.coord(), first.id, TaskState::Succeeded, COPY_WAIT).await;
        wait_state(observer.coord(), second.id, TaskState::Succeeded, COPY_WAIT).await;
        let (first, second) = (observer.task(first.id).await, observer.task(second.id).await);
        // Both exact: each target snapshot is its own source's snapshot.
        for (task, source) in [(&first, &a), (&second, &c)] {
            let name = CopyEngine::snapshot_name(&task.id);
            assert_same_bytes(backend.snapshot_path(source, &name), backend.snapshot_path(&target, &name)).await;
        }
        let expected = check_copy_task(&backend, &c, &target, &second, None).await;
        assert_copy_exact(&backend, &target, &second, &expected).await;
        assert_one_writer(&writers, &backend.volume_path(&target), 1);

        // A copy at 1 B/s waits for its bandwidth; a cancel ends the wait at once (within the
        // stop timeout, 2 s, plus a commit: the guard leaves room for a loaded machine).
        let mut spec = copy_spec(&a, &target, None);
        let TaskSpec::CopyVolume(copy) = &mut spec;
        copy.options.bandwidth_limit_bytes_per_second = Some(1);
        let slow = observer
            .task_request(&address, ClientRequest::Create { id: TaskId::generate(), spec, run_window: None })
            .await;
        wait_state(observer.coord(), slow.id, TaskState::Running, WAIT).await;
        ok(taskctl(&address, SECRET, &["task", "cancel", &slow.id.to_string()]), "task cancel");
        within(Duration::from_secs(10), "a cancel inside a bandwidth wait", async {
            wait_state(observer.coord(), slow.id, TaskState::Canceled, WAIT).await
        })
        .await;
        let slow = observer.task(slow.id).await;
        assert_eq!(slow.progress.counters.bytes_copied, 0, "{:?}", slow.progress);
        assert_accounted(&observer, &[first, second, slow]).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 10. A second node with a live node's id

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_a_live_nodes_id_refuses_to_start_and_displaces_nothing() {
    init_tracing();
    within(CASE, "a duplicate node id", async {
        let connect = shared_zk().connect_string(&unique_chroot("duplicate-id"));
        let observer = Observer::connect(&connect).await;
        let mut nodes = start_nodes(&[node_config("n1", &connect, SESSION_MS, 2)]).await;
        observer.wait_runners(1).await;
        observer.wait_leader("n1 leads", |l| l.node.as_str() == "n1").await;
        let registration = layout::runner(&"n1".parse().unwrap());
        let owner = observer.coord.exists(&registration).await.unwrap().expect("n1 is registered").ephemeral_owner;

        // The newcomer waits up to twice its session timeout for the registration to expire
        // (it would, had n1 crashed), then exits naming the id.
        let dir = tempfile::tempdir().expect("temp dir");
        let config = node_config("n1", &connect, SESSION_MS, 2);
        let mut newcomer = Command::new(example_binary("task_server"));
        newcomer
            .args(config.args(dir.path()))
            .env("TASK_CENTER_SECRET", SECRET)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let run = tokio::task::spawn_blocking(move || newcomer.output());
        let output = within(Duration::from_secs(40), "the newcomer exits", run).await.expect("join").expect("run it");
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "a duplicate node started: {stderr}");
        assert!(stderr.contains("node id n1 is registered by another live session"), "{stderr}");

        // n1 was not displaced: same registration, and it still runs tasks.
        let now = observer.coord.exists(&registration).await.unwrap().expect("n1 is still registered").ephemeral_owner;
        assert_eq!(now, owner, "the registration changed hands");
        let address = node(&mut nodes, "n1").address().to_string();
        let task = observer.create(&address, 1).await;
        let done = wait_state(observer.coord(), task.id, TaskState::Succeeded, WAIT).await;
        assert_eq!(done.runner.as_ref().map(|r| r.as_str()), Some("n1"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cluster_secret_refuses_to_start() {
    init_tracing();
    within(CASE, "a wrong cluster secret", async {
        let connect = shared_zk().connect_string(&unique_chroot("wrong-secret"));
        let observer = Observer::connect(&connect).await;
        let _nodes = start_nodes(&[node_config("n1", &connect, SESSION_MS, 2)]).await;
        observer.wait_runners(1).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut stranger = Command::new(example_binary("task_server"));
        stranger
            .args(node_config("n2", &connect, SESSION_MS, 2).args(dir.path()))
            .env("TASK_CENTER_SECRET", "another-secret-0123456789abcdef")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let run = tokio::task::spawn_blocking(move || stranger.output());
        let output = within(Duration::from_secs(40), "the stranger exits", run).await.expect("join").expect("run it");
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "a node with another secret started: {stderr}");
        assert!(stderr.contains("cluster secret is not the cluster's"), "{stderr}");
        // It never registered as a runner, so no task can be assigned to a node nobody can call.
        let runners = observer.coord.children(layout::RUNNERS).await.expect("list runners");
        assert_eq!(runners, vec!["n1".to_string()]);
    })
    .await;
}
