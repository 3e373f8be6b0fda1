//! The LMDB mirror against a real ZooKeeper and a real LMDB file.
//!
//! Every case checks what a user of [`TaskMirror`] relies on: after writes (concurrent ones,
//! missed ones, ones made across a server restart or a session expiry) the mirror holds exactly
//! what ZooKeeper holds, its indexes list exactly the right tasks in the right order, and a
//! deleted or corrupt cache file is rebuilt with the same contents (invariant 6).
//!
//! No case sleeps to wait for the mirror: [`wait_converged`] compares ZooKeeper with the mirror
//! and, while they differ, waits for the mirror's next applied batch or reload
//! ([`MirrorStatus`]). Timeouts are guards against hangs only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use task_center::cache::{MirrorStatus, TaskMirror};
use task_center::clock::{ManualClock, SystemClock};
use task_center::coord::{
    Coordination, CreateMode, EventKind, Op, SessionState, SessionStatus, WatchEvent, ZkConfig, ZkCoordination,
};
use task_center::model::{
    Change, CopyOptions, CopyVolumeSpec, DesiredState, NodeId, ProgressCounters, RunWindow, Task, TaskId, TaskProgress,
    TaskSpec, TaskState, TimeOfDay, VolumeId,
};
use task_center::store::{layout, Fence, StoreError, TaskLock, TaskStore};
use tokio::sync::watch;

use common::{init_tracing, shared_zk, step, unique_chroot, wait_status, within, Proxy, ZkServer};

/// Guard for a whole case.
const CASE_TIMEOUT: Duration = Duration::from_secs(180);
/// Guard for one wait for convergence.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Guard for a session to reach a state.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Creation times of the tasks start here (2023-11-14), so they are far from "now" and known.
const BASE_MS: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers

async fn zk_connect(config: ZkConfig) -> Arc<ZkCoordination> {
    let what = format!("connect to ZooKeeper at {}", config.connect);
    match step(&what, ZkCoordination::connect(config)).await {
        Ok(coord) => Arc::new(coord),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// A writer: its own ZooKeeper session, its own clock, and a fence node of that session.
struct Writer {
    coord: Arc<ZkCoordination>,
    store: TaskStore,
    fence: Fence,
    clock: Arc<ManualClock>,
    runner: NodeId,
}

impl Writer {
    async fn connect(connect: String, name: &str) -> Writer {
        let coord = zk_connect(ZkConfig::new(connect)).await;
        let clock = Arc::new(ManualClock::new(BASE_MS));
        let store = TaskStore::new(coord.clone(), clock.clone());
        step("init the layout", store.init()).await.expect("init the layout");
        let path = format!("/writer-{name}");
        let path = step("create the fence", coord.create(&path, b"", CreateMode::Ephemeral))
            .await
            .unwrap_or_else(|e| panic!("create fence {path}: {e}"));
        let runner = NodeId::new(format!("runner-{name}")).expect("a valid node id");
        Writer { coord, store, fence: Fence::new(path), clock, runner }
    }

    /// Creates a task at the given creation time.
    async fn create_at(&self, created_ms: i64, n: usize, window: Option<RunWindow>) -> Task {
        self.clock.set_ms(created_ms);
        let id = TaskId::generate();
        let task = step("create", self.store.create(id, spec(n), window, &self.fence))
            .await
            .unwrap_or_else(|e| panic!("create task {n}: {e}"));
        assert_eq!(task.control.created_at_ms, created_ms);
        task
    }

    /// Creates a task one second after the clock's current time.
    async fn create(&self, n: usize, window: Option<RunWindow>) -> Task {
        let at = self.clock_ms() + 1_000;
        self.create_at(at, n, window).await
    }

    fn clock_ms(&self) -> i64 {
        use task_center::clock::Clock;
        self.clock.now_ms()
    }

    fn tick(&self) {
        self.clock.advance_ms(7);
    }

    async fn set_window(&self, id: &TaskId, window: Option<RunWindow>) -> Task {
        self.tick();
        step(
            "update_control",
            self.store.update_control(id, &self.fence, |c| {
                c.run_window = window;
                Ok(())
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("set the window of {id}: {e}"))
    }

    async fn set_desired(&self, id: &TaskId, desired: DesiredState) -> Task {
        self.tick();
        step(
            "update_control",
            self.store.update_control(id, &self.fence, |c| {
                c.desired = desired;
                Ok(())
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("set desired {desired:?} on {id}: {e}"))
    }

    /// Moves a task to `to` under the writer's own fence (a dispatcher's move).
    async fn transition(&self, id: &TaskId, to: TaskState, change: Change) -> Task {
        self.tick();
        step("transition", self.store.transition(id, &self.fence, |_| Ok(Some((to, change.clone())))))
            .await
            .unwrap_or_else(|e| panic!("move {id} to {to}: {e}"))
    }

    /// Claims a task and moves it to `Running` under the claim (a runner's start).
    async fn start(&self, id: &TaskId) -> TaskLock {
        self.tick();
        let lock =
            step("claim", self.store.claim(id, &self.runner)).await.unwrap_or_else(|e| panic!("claim {id}: {e}"));
        let runner = self.runner.clone();
        step(
            "to running",
            self.store
                .transition(id, lock.fence(), |_| Ok(Some((TaskState::Running, Change::Claimed(runner.clone()))))),
        )
        .await
        .unwrap_or_else(|e| panic!("move {id} to running: {e}"));
        lock
    }

    async fn progress(&self, lock: &mut TaskLock, cursor: u64) {
        self.tick();
        let progress = progress(cursor, self.clock_ms());
        step("commit_progress", self.store.commit_progress(lock, &progress))
            .await
            .unwrap_or_else(|e| panic!("commit progress of {}: {e}", lock.task_id()));
    }

    /// Commits the final progress and moves to `to` in one write, then releases the claim.
    async fn finish(&self, mut lock: TaskLock, cursor: u64, to: TaskState, change: Change) -> Task {
        self.tick();
        let progress = progress(cursor, self.clock_ms());
        let id = lock.task_id();
        let task = step("commit_with_transition", self.store.commit_with_transition(&mut lock, &progress, to, change))
            .await
            .unwrap_or_else(|e| panic!("finish {id} as {to}: {e}"));
        step("release", self.store.release(lock)).await.unwrap_or_else(|e| panic!("release {id}: {e}"));
        task
    }

    /// Moves a claimed task to `to` under its claim (no progress), then releases the claim.
    async fn stop(&self, lock: TaskLock, to: TaskState) {
        self.tick();
        let id = lock.task_id();
        step("transition", self.store.transition(&id, lock.fence(), |_| Ok(Some((to, Change::Plain)))))
            .await
            .unwrap_or_else(|e| panic!("move {id} to {to}: {e}"));
        step("release", self.store.release(lock)).await.unwrap_or_else(|e| panic!("release {id}: {e}"));
    }

    /// Deletes a task entirely: its status, progress, claim parent and control node, in one
    /// atomic multi. The task must hold no claim.
    async fn delete(&self, id: &TaskId) {
        let ops = [layout::status(id), layout::progress(id), layout::locks(id), layout::task(id)]
            .into_iter()
            .map(|path| Op::Delete { path, expected: None })
            .collect();
        step("delete a task", self.coord.multi(ops)).await.unwrap_or_else(|e| panic!("delete task {id}: {e}"));
    }

    async fn close(self) {
        step("close the writer", self.coord.close()).await;
    }
}

fn spec(n: usize) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: VolumeId::new(format!("vol-{n}")).unwrap(),
        target_volume: VolumeId::new(format!("copy-{n}")).unwrap(),
        source_hosts: vec!["198.51.100.1:10201".into()],
        target_hosts: vec!["198.51.100.2:10201".into()],
        base_snapshot: None,
        options: CopyOptions::default(),
    })
}

fn progress(cursor: u64, now_ms: i64) -> TaskProgress {
    TaskProgress {
        cursor_bytes: cursor,
        total_bytes: Some(64 << 30),
        counters: ProgressCounters {
            bytes_copied: cursor / 2,
            bytes_skipped_hole: cursor - cursor / 2,
            ..Default::default()
        },
        rate_bytes_per_second: 100 << 20,
        updated_at_ms: now_ms,
        ..Default::default()
    }
}

fn window(start: (u8, u8), end: (u8, u8)) -> RunWindow {
    RunWindow::new(TimeOfDay::new(start.0, start.1).unwrap(), TimeOfDay::new(end.0, end.1).unwrap()).unwrap()
}

/// A mirror's own session and store (reads only, so the clock does not matter).
async fn mirror_store(config: ZkConfig) -> (Arc<ZkCoordination>, TaskStore) {
    let coord = zk_connect(config).await;
    let store = TaskStore::new(coord.clone(), Arc::new(SystemClock));
    (coord, store)
}

async fn start_mirror(store: &TaskStore, dir: &Path) -> TaskMirror {
    step("start the mirror", TaskMirror::start(store.clone(), dir))
        .await
        .unwrap_or_else(|e| panic!("start the mirror in {}: {e}", dir.display()))
}

/// Every task in ZooKeeper, by id.
async fn zk_tasks(store: &TaskStore) -> BTreeMap<TaskId, Task> {
    let ids = step("list ids", store.list_ids()).await.expect("list the task ids in ZooKeeper");
    let tasks: Vec<Task> = futures::stream::iter(ids)
        .map(|id| async move { step("get", store.get(&id)).await.unwrap_or_else(|e| panic!("get {id}: {e}")) })
        .buffered(16)
        .collect()
        .await;
    tasks.into_iter().map(|t| (t.id, t)).collect()
}

/// How the mirror differs from ZooKeeper: one line per differing task; empty when converged.
async fn differences(store: &TaskStore, mirror: &TaskMirror) -> Vec<String> {
    let ids = step("list ids", store.list_ids()).await.expect("list the task ids in ZooKeeper");
    let pairs: Vec<(TaskId, Option<Task>, Option<Task>)> = futures::stream::iter(ids.iter().copied())
        .map(|id| async move {
            let truth = match step("get", store.get(&id)).await {
                Ok(task) => Some(task),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => panic!("get {id} from ZooKeeper: {e}"),
            };
            let cached = mirror.get(id).await.unwrap_or_else(|e| panic!("get {id} from the mirror: {e}"));
            (id, truth, cached)
        })
        .buffered(16)
        .collect()
        .await;
    let mut diffs: Vec<String> = pairs
        .into_iter()
        .filter(|(_, truth, cached)| truth != cached)
        .map(|(id, truth, cached)| format!("{id}: ZooKeeper {truth:?}\n    mirror {cached:?}"))
        .collect();
    let live: BTreeSet<TaskId> = ids.into_iter().collect();
    let cached = mirror.ids().await.expect("the mirror's ids");
    diffs.extend(cached.into_iter().filter(|id| !live.contains(id)).map(|id| format!("{id}: only in the mirror")));
    diffs
}

/// Whether the mirror holds exactly what ZooKeeper holds.
async fn converged(store: &TaskStore, mirror: &TaskMirror) -> bool {
    differences(store, mirror).await.is_empty()
}

/// Waits until the mirror holds exactly what ZooKeeper holds (read through `store`), checking
/// again after every batch or reload the mirror reports. Returns the mirror's status then.
async fn wait_converged(what: &str, store: &TaskStore, mirror: &TaskMirror) -> MirrorStatus {
    let mut status: watch::Receiver<MirrorStatus> = mirror.subscribe();
    let mut last = Vec::new();
    let started = Instant::now();
    let outcome = tokio::time::timeout(CONVERGE_TIMEOUT, async {
        loop {
            // Mark the current status seen *before* checking, so that a batch applied between
            // the check and the wait wakes the wait.
            status.borrow_and_update();
            last = differences(store, mirror).await;
            if last.is_empty() {
                return Ok(());
            }
            if status.changed().await.is_err() {
                return Err("the mirror's follower stopped");
            }
        }
    })
    .await;
    let now = *status.borrow();
    match outcome {
        Ok(Ok(())) => {
            eprintln!("{what}: converged in {:?} ({now:?})", started.elapsed());
            now
        }
        Ok(Err(why)) => panic!("{what}: {why}; {} tasks differ:\n{}", last.len(), last.join("\n")),
        Err(_) => panic!(
            "{what}: the mirror did not converge within {CONVERGE_TIMEOUT:?} (status {now:?}); {} tasks differ, first ones:\n{}",
            last.len(),
            last.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        ),
    }
}

/// The mirror's whole listing by creation time.
async fn listing(mirror: &TaskMirror) -> Vec<Task> {
    mirror.list_by_created(i64::MIN, i64::MAX, usize::MAX).await.expect("list the mirror by creation time")
}

/// Tasks sorted the way the mirror's indexes sort them.
fn sorted(mut tasks: Vec<Task>) -> Vec<Task> {
    tasks.sort_by_key(|t| (t.control.created_at_ms, t.id));
    tasks
}

fn ids_of(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

/// The states under which the mirror's state index lists `id`.
async fn listed_states(mirror: &TaskMirror, id: TaskId) -> Vec<TaskState> {
    let mut states = Vec::new();
    for state in TaskState::ALL {
        let tasks = mirror.list_by_state(state, i64::MIN, usize::MAX).await.expect("list by state");
        let hits = tasks.iter().filter(|t| t.id == id).count();
        assert!(hits <= 1, "{id} is listed {hits} times under {state}");
        if hits == 1 {
            states.push(state);
        }
    }
    states
}

/// Checks both indexes against ZooKeeper's contents: every state's listing, and the listing by
/// creation time.
async fn assert_indexes_match(store: &TaskStore, mirror: &TaskMirror) {
    let truth: Vec<Task> = zk_tasks(store).await.into_values().collect();
    for state in TaskState::ALL {
        let want = sorted(truth.iter().filter(|t| t.state() == state).cloned().collect());
        let got = mirror.list_by_state(state, i64::MIN, usize::MAX).await.expect("list by state");
        assert_eq!(ids_of(&got), ids_of(&want), "tasks listed under {state}");
        assert_eq!(got, want, "tasks listed under {state}");
    }
    assert_eq!(listing(mirror).await, sorted(truth), "tasks listed by creation time");
}

/// Fills a cluster with `count` tasks in a mix of states; returns them as created.
///
/// By `n % 5`: 0 pending; 1 running (claim held); 2 succeeded; 3 pending with a window changed
/// twice; 4 failed.
async fn populate(w: &Writer, first: usize, count: usize) -> Vec<Task> {
    let mut created = Vec::new();
    let mut held = Vec::new();
    for n in first..first + count {
        let task = w.create(n, (n % 2 == 0).then(|| window((1, 0), (5, 0)))).await;
        let id = task.id;
        created.push(task);
        match n % 5 {
            0 => {}
            1 => {
                let mut lock = w.start(&id).await;
                w.progress(&mut lock, 256 << 20).await;
                held.push(lock);
            }
            2 => {
                let mut lock = w.start(&id).await;
                w.progress(&mut lock, 256 << 20).await;
                w.finish(lock, 512 << 20, TaskState::Succeeded, Change::Plain).await;
            }
            3 => {
                w.set_window(&id, Some(window((22, 0), (4, 0)))).await;
                w.set_window(&id, Some(window((23, 30), (5, 15)))).await;
            }
            _ => {
                let lock = w.start(&id).await;
                w.finish(lock, 0, TaskState::Failed, Change::Failed("target volume is read-only".into())).await;
            }
        }
    }
    // Claims of running tasks stay held by the writer's session; they are ephemeral.
    drop(held);
    created
}

// ---------------------------------------------------------------------------------------------
// 1. A burst of concurrent writes

const WRITERS: usize = 8;
const TASKS_PER_WRITER: usize = 25;

/// Creation time of writer `w`'s `j`-th task: distinct, interleaved across writers, known.
fn burst_created_ms(w: usize, j: usize) -> i64 {
    BASE_MS + ((j * WRITERS + w) as i64) * 1_000
}

/// One writer of the burst: creates its tasks and drives every other one through a scenario.
/// Returns `(id, created_ms, expected state)` of each task.
async fn burst_writer(w: Writer, index: usize) -> Vec<(TaskId, i64, TaskState)> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for j in 0..TASKS_PER_WRITER {
        let created_ms = burst_created_ms(index, j);
        let n = index * 1_000 + j;
        let task = w.create_at(created_ms, n, (j % 3 == 0).then(|| window((2, 0), (6, 0)))).await;
        let id = task.id;
        let state = if j % 2 == 0 {
            TaskState::Pending
        } else {
            match (index + j) % 6 {
                0 => {
                    let mut lock = w.start(&id).await;
                    w.progress(&mut lock, 256 << 20).await;
                    w.progress(&mut lock, 512 << 20).await;
                    w.finish(lock, 1 << 30, TaskState::Succeeded, Change::Plain).await;
                    TaskState::Succeeded
                }
                1 => {
                    let mut lock = w.start(&id).await;
                    w.progress(&mut lock, 256 << 20).await;
                    w.finish(lock, 256 << 20, TaskState::Failed, Change::Failed("source snapshot vanished".into()))
                        .await;
                    TaskState::Failed
                }
                2 => {
                    let mut lock = w.start(&id).await;
                    w.progress(&mut lock, 768 << 20).await;
                    w.set_desired(&id, DesiredState::Pause).await;
                    w.stop(lock, TaskState::Paused).await;
                    TaskState::Paused
                }
                3 => {
                    w.set_window(&id, Some(window((22, 0), (4, 0)))).await;
                    w.set_desired(&id, DesiredState::Cancel).await;
                    w.transition(&id, TaskState::Canceled, Change::Plain).await;
                    TaskState::Canceled
                }
                4 => {
                    w.set_window(&id, Some(window((20, 0), (23, 0)))).await;
                    w.set_window(&id, None).await;
                    w.set_window(&id, Some(window((0, 30), (3, 45)))).await;
                    TaskState::Pending
                }
                _ => {
                    let mut lock = w.start(&id).await;
                    for k in 1..=3 {
                        w.progress(&mut lock, k << 28).await;
                    }
                    if j % 4 == 1 {
                        // Still running: the claim stays held by the writer's session.
                        held.push(lock);
                        TaskState::Running
                    } else {
                        w.stop(lock, TaskState::Pending).await;
                        TaskState::Pending
                    }
                }
            }
        };
        out.push((id, created_ms, state));
    }
    // Claims of running tasks stay held: the case keeps the writer's session open until it ends.
    drop(held);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_converges_after_a_burst_of_concurrent_writes() {
    within(CASE_TIMEOUT, "burst of concurrent writes", async {
        init_tracing();
        let server = shared_zk();
        let chroot = unique_chroot("cache-burst");
        let (mirror_coord, mirror_store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
        step("init", mirror_store.init()).await.expect("init the layout");
        let dir = tempfile::tempdir().expect("a temp dir");
        let mirror = start_mirror(&mirror_store, dir.path()).await;
        step("first sync", mirror.wait_synced()).await;

        let mut writers = Vec::new();
        for i in 0..WRITERS {
            writers.push(Writer::connect(server.connect_string(&chroot), &format!("w{i}")).await);
        }
        let coords: Vec<Arc<ZkCoordination>> = writers.iter().map(|w| w.coord.clone()).collect();
        let handles: Vec<_> = writers.into_iter().enumerate().map(|(i, w)| tokio::spawn(burst_writer(w, i))).collect();
        let mut expected = Vec::new();
        for handle in handles {
            expected.extend(handle.await.expect("a writer panicked"));
        }
        assert_eq!(expected.len(), WRITERS * TASKS_PER_WRITER);

        // ZooKeeper holds what the writers wrote (a check of the setup, not of the mirror).
        let truth = zk_tasks(&mirror_store).await;
        assert_eq!(truth.len(), WRITERS * TASKS_PER_WRITER, "tasks in ZooKeeper");
        for (id, created_ms, state) in &expected {
            let task = &truth[id];
            assert_eq!((task.control.created_at_ms, task.state()), (*created_ms, *state), "task {id} in ZooKeeper");
        }
        let states: BTreeSet<TaskState> = expected.iter().map(|e| e.2).collect();
        assert_eq!(states.len(), TaskState::ALL.len(), "the burst reaches every state");

        wait_converged("after the burst", &mirror_store, &mirror).await;
        assert_eq!(mirror.ids().await.unwrap().len(), WRITERS * TASKS_PER_WRITER);
        assert_indexes_match(&mirror_store, &mirror).await;

        // Each state's listing, against the writers' own record of what they did.
        for state in TaskState::ALL {
            let mut want: Vec<(i64, TaskId)> =
                expected.iter().filter(|e| e.2 == state).map(|(id, created, _)| (*created, *id)).collect();
            want.sort();
            let got = mirror.list_by_state(state, i64::MIN, usize::MAX).await.unwrap();
            let got: Vec<(i64, TaskId)> = got.iter().map(|t| (t.control.created_at_ms, t.id)).collect();
            assert_eq!(got, want, "tasks listed under {state}");
        }

        // A sub-range by creation time: `from` inclusive, `to` exclusive, oldest first.
        let (from, to) = (burst_created_ms(0, 5), burst_created_ms(0, 15));
        let mut want: Vec<(i64, TaskId)> =
            expected.iter().filter(|e| (from..to).contains(&e.1)).map(|(id, created, _)| (*created, *id)).collect();
        want.sort();
        assert_eq!(want.len(), 10 * WRITERS);
        let got = mirror.list_by_created(from, to, usize::MAX).await.unwrap();
        assert_eq!(got.iter().map(|t| (t.control.created_at_ms, t.id)).collect::<Vec<_>>(), want);
        for task in &got {
            assert_eq!(task, &truth[&task.id], "listed task {} against ZooKeeper", task.id);
        }
        // A limit takes the oldest.
        let first = mirror.list_by_created(from, to, 7).await.unwrap();
        assert_eq!(ids_of(&first), ids_of(&got[..7]));
        // The state index honours `from_ms` and the limit too.
        let pending_from: Vec<TaskId> = {
            let mut v: Vec<(i64, TaskId)> = expected
                .iter()
                .filter(|e| e.2 == TaskState::Pending && e.1 >= from)
                .map(|(id, created, _)| (*created, *id))
                .collect();
            v.sort();
            v.into_iter().map(|(_, id)| id).collect()
        };
        let got = mirror.list_by_state(TaskState::Pending, from, usize::MAX).await.unwrap();
        assert_eq!(ids_of(&got), pending_from, "pending tasks created at or after {from}");
        let got = mirror.list_by_state(TaskState::Pending, from, 3).await.unwrap();
        assert_eq!(ids_of(&got), pending_from[..3], "the 3 oldest pending tasks created at or after {from}");

        mirror.shutdown().await;
        for coord in coords {
            step("close a writer", coord.close()).await;
        }
        step("close the mirror's session", mirror_coord.close()).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. The state index follows transitions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_index_follows_transitions() {
    within(CASE_TIMEOUT, "state index follows transitions", async {
        init_tracing();
        let server = shared_zk();
        let chroot = unique_chroot("cache-state-index");
        let w = Writer::connect(server.connect_string(&chroot), "w").await;
        let (mirror_coord, store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let mirror = start_mirror(&store, dir.path()).await;
        // A neighbour that stays pending, so the listings are not trivially empty.
        let other = w.create(1, None).await;

        let task = w.create(2, None).await;
        let id = task.id;
        wait_converged("created", &store, &mirror).await;
        assert_eq!(listed_states(&mirror, id).await, [TaskState::Pending]);
        assert_eq!(listed_states(&mirror, other.id).await, [TaskState::Pending]);

        let mut lock = w.start(&id).await;
        wait_converged("running", &store, &mirror).await;
        assert_eq!(listed_states(&mirror, id).await, [TaskState::Running]);
        assert_eq!(mirror.get(id).await.unwrap().unwrap().status.runner.as_ref(), Some(&w.runner));

        w.progress(&mut lock, 1 << 30).await;
        let done = w.finish(lock, 2 << 30, TaskState::Succeeded, Change::Plain).await;
        wait_converged("succeeded", &store, &mirror).await;
        assert_eq!(listed_states(&mirror, id).await, [TaskState::Succeeded]);
        assert_eq!(mirror.get(id).await.unwrap(), Some(done.clone()));
        assert_eq!(mirror.get(id).await.unwrap().unwrap().progress.cursor_bytes, 2 << 30);
        assert_eq!(listed_states(&mirror, other.id).await, [TaskState::Pending]);
        // One entry each in the creation index as well.
        assert_eq!(ids_of(&listing(&mirror).await), [other.id, id]);

        mirror.shutdown().await;
        w.close().await;
        step("close the mirror's session", mirror_coord.close()).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Missed events: the mirror is cut off while others write

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_catches_up_after_missing_events() {
    within(CASE_TIMEOUT, "catch up after missing events", async {
        init_tracing();
        let server = shared_zk();
        let chroot = unique_chroot("cache-missed-events");
        let w = Writer::connect(server.connect_string(&chroot), "w").await;
        let before = populate(&w, 0, 10).await;

        let proxy = Proxy::start(server.port());
        let mut config = ZkConfig::new(proxy.connect_string(&chroot));
        config.session_timeout_ms = 10_000;
        let (mirror_coord, mirror_store) = mirror_store(config).await;
        let mut session = mirror_coord.subscribe();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mirror = start_mirror(&mirror_store, dir.path()).await;
        // Read ZooKeeper through the writer's session: the mirror's is about to be cut off.
        wait_converged("before the partition", &w.store, &mirror).await;
        let count_before = mirror.ids().await.unwrap().len();
        assert_eq!(count_before, 10);

        proxy.block();
        wait_status(&mut session, SESSION_TIMEOUT, |s| s.state == SessionState::Suspended).await;

        // 50 writes the mirror cannot see.
        let doomed = before.iter().find(|t| t.state() == TaskState::Pending).expect("a pending task").id;
        w.delete(&doomed).await; // 1
        let mut created = Vec::new();
        for n in 100..120 {
            created.push(w.create(n, None).await); // 20
        }
        for (k, task) in created.iter().enumerate() {
            w.set_window(&task.id, Some(window(((k % 24) as u8, 0), (((k + 3) % 24) as u8, 0)))).await;
            // 20
        }
        for task in &created[..9] {
            w.transition(&task.id, TaskState::Canceled, Change::Plain).await; // 9
        }
        assert!(w.store.get(&doomed).await.is_err(), "the deleted task is gone from ZooKeeper");
        // Cut off, the mirror still answers from its file, with what it last saw.
        assert!(mirror.get(doomed).await.unwrap().is_some(), "the cut-off mirror saw the deletion");
        assert_eq!(mirror.ids().await.unwrap().len(), count_before, "the cut-off mirror saw new tasks");

        proxy.unblock();
        let now = wait_status(&mut session, SESSION_TIMEOUT, |s| s.state == SessionState::Connected).await;
        assert_eq!(now.generation, 1, "the mirror's session survived the partition");
        wait_converged("after the partition", &w.store, &mirror).await;
        assert_eq!(mirror.get(doomed).await.unwrap(), None, "the deleted task is still in the mirror");
        assert_eq!(mirror.ids().await.unwrap().len(), 10 - 1 + 20);
        assert!(!ids_of(&listing(&mirror).await).contains(&doomed), "the deleted task is still indexed by creation");
        assert_eq!(
            listed_states(&mirror, doomed).await,
            Vec::<TaskState>::new(),
            "the deleted task is still indexed by state"
        );
        assert_indexes_match(&w.store, &mirror).await;

        // The mirror follows again: writes after the reconnection arrive through its watch.
        let late = w.create(1_000, None).await;
        w.set_window(&created[10].id, None).await;
        w.transition(&created[11].id, TaskState::Canceled, Change::Plain).await;
        wait_converged("writes after the partition", &w.store, &mirror).await;
        assert_eq!(mirror.get(late.id).await.unwrap(), Some(late));

        mirror.shutdown().await;
        step("close the mirror's session", mirror_coord.close()).await;
        w.close().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. ZooKeeper restarts

async fn restart_case(case: &str, kill: bool) {
    init_tracing();
    let server = ZkServer::start();
    let chroot = unique_chroot(case);
    let w = Writer::connect(server.connect_string(&chroot), "before").await;
    populate(&w, 0, 15).await;
    // Close it now: its session is not needed across the restart.
    let clock_ms = w.clock_ms();
    w.close().await;

    let mut config = ZkConfig::new(server.connect_string(&chroot));
    config.session_timeout_ms = 10_000;
    config.operation_timeout_ms = 2_000;
    let (mirror_coord, mirror_store) = mirror_store(config).await;
    let mut session = mirror_coord.subscribe();
    let dir = tempfile::tempdir().expect("a temp dir");
    let mirror = start_mirror(&mirror_store, dir.path()).await;
    wait_converged("before the restart", &mirror_store, &mirror).await;
    let before = listing(&mirror).await;
    assert_eq!(before.len(), 15);
    let reloads_before = mirror.subscribe().borrow().reloads;

    if kill {
        server.kill();
    } else {
        server.stop();
    }
    wait_status(&mut session, SESSION_TIMEOUT, |s| s.state != SessionState::Connected).await;
    // ZooKeeper is down: reads are still answered, from the file.
    assert_eq!(listing(&mirror).await, before, "the mirror's listing while ZooKeeper is down");
    server.restart();
    // The mirror reconnects (same session) and reloads: it may have missed events. Writes made
    // after that reload reach it only through its watch.
    let reloaded = within(SESSION_TIMEOUT, "the mirror reloads after the restart", async {
        let mut status = mirror.subscribe();
        let reloaded = *status.wait_for(|s| s.synced && s.reloads > reloads_before).await.expect("the follower runs");
        reloaded
    })
    .await;
    eprintln!("{case}: the mirror after the restart: {reloaded:?}, session {:?}", *session.borrow());

    let w = Writer::connect(server.connect_string(&chroot), "after").await;
    w.clock.set_ms(clock_ms);
    let created = populate(&w, 100, 10).await;
    w.set_window(&before[0].id, Some(window((3, 0), (4, 0)))).await;
    w.transition(&before[0].id, TaskState::Canceled, Change::Plain).await;
    w.delete(&before.iter().find(|t| t.state() == TaskState::Pending && t.id != before[0].id).unwrap().id).await;

    wait_converged("after the restart", &w.store, &mirror).await;
    assert_eq!(mirror.ids().await.unwrap().len(), 15 + created.len() - 1);
    assert_indexes_match(&w.store, &mirror).await;

    mirror.shutdown().await;
    w.close().await;
    step("close the mirror's session", mirror_coord.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_converges_after_zookeeper_restart() {
    within(CASE_TIMEOUT, "ZooKeeper stop and restart", restart_case("cache-zk-stop", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_converges_after_zookeeper_kill_and_restart() {
    within(CASE_TIMEOUT, "ZooKeeper kill and restart", restart_case("cache-zk-kill", true)).await;
}

// ---------------------------------------------------------------------------------------------
// 5 and 6. The cache file deleted or corrupt

enum Damage {
    DeleteDirectory,
    Garbage,
    Truncate,
}

async fn rebuild_case(case: &str, damage: Damage) {
    init_tracing();
    let server = shared_zk();
    let chroot = unique_chroot(case);
    let w = Writer::connect(server.connect_string(&chroot), "w").await;
    populate(&w, 0, 30).await;
    let root = tempfile::tempdir().expect("a temp dir");
    let dir = root.path().join("cache");

    let (coord, store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
    let mirror = start_mirror(&store, &dir).await;
    wait_converged("first mirror", &store, &mirror).await;
    let before = listing(&mirror).await;
    assert_eq!(before.len(), 30);
    mirror.shutdown().await;
    step("close the first mirror's session", coord.close()).await;

    let data = dir.join("data.mdb");
    assert!(data.is_file(), "no {}", data.display());
    match damage {
        Damage::DeleteDirectory => {
            std::fs::remove_dir_all(&dir).expect("delete the cache directory");
            assert!(!dir.exists());
        }
        Damage::Garbage => {
            std::fs::write(&data, vec![0xAB; 64 << 10]).expect("overwrite data.mdb");
            assert_eq!(std::fs::metadata(&data).unwrap().len(), 64 << 10);
        }
        Damage::Truncate => {
            let file = std::fs::OpenOptions::new().write(true).open(&data).expect("open data.mdb");
            file.set_len(100).expect("truncate data.mdb");
            drop(file);
            assert_eq!(std::fs::metadata(&data).unwrap().len(), 100);
        }
    }

    // A new process: new session, new mirror on the same path.
    let (coord, store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
    let mirror = start_mirror(&store, &dir).await;
    step("wait_synced on the rebuilt cache", mirror.wait_synced()).await;
    assert!(data.is_file(), "the cache file was not recreated");
    let after = listing(&mirror).await;
    assert_eq!(ids_of(&after), ids_of(&before), "task ids listed after the rebuild");
    assert_eq!(after, before, "tasks listed after the rebuild");
    assert!(converged(&store, &mirror).await, "{:?}", differences(&store, &mirror).await);
    assert_indexes_match(&store, &mirror).await;

    // And it keeps following.
    let task = w.create(1_000, None).await;
    wait_converged("after the rebuild", &store, &mirror).await;
    assert_eq!(mirror.get(task.id).await.unwrap(), Some(task));

    mirror.shutdown().await;
    step("close the mirror's session", coord.close()).await;
    w.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_cache_is_rebuilt_with_the_same_contents() {
    within(CASE_TIMEOUT, "deleted cache", rebuild_case("cache-deleted", Damage::DeleteDirectory)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_cache_is_rebuilt() {
    within(CASE_TIMEOUT, "garbage cache", rebuild_case("cache-garbage", Damage::Garbage)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_is_rebuilt() {
    within(CASE_TIMEOUT, "truncated cache", rebuild_case("cache-truncated", Damage::Truncate)).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Session expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_survives_session_expiry() {
    within(CASE_TIMEOUT, "session expiry", async {
        init_tracing();
        let server = shared_zk();
        let chroot = unique_chroot("cache-session-expiry");
        let w = Writer::connect(server.connect_string(&chroot), "w").await;
        let before = populate(&w, 0, 10).await;

        let proxy = Proxy::start(server.port());
        let mut config = ZkConfig::new(proxy.connect_string(&chroot));
        config.session_timeout_ms = 2_000;
        let (mirror_coord, mirror_store) = mirror_store(config).await;
        let mut session = mirror_coord.subscribe();
        assert_eq!(*session.borrow(), SessionStatus { state: SessionState::Connected, generation: 1 });
        step("create the mirror's ephemeral node", mirror_coord.create("/mirror-alive", b"", CreateMode::Ephemeral))
            .await
            .expect("create /mirror-alive");
        let (stat, gone) =
            step("watch /mirror-alive", w.coord.exists_watch("/mirror-alive")).await.expect("exists_watch");
        assert!(stat.is_some());

        let dir = tempfile::tempdir().expect("a temp dir");
        let mirror = start_mirror(&mirror_store, dir.path()).await;
        wait_converged("before the expiry", &w.store, &mirror).await;
        let reloads_before = mirror.subscribe().borrow().reloads;

        proxy.block();
        let event = within(SESSION_TIMEOUT, "the mirror's session expires", gone).await;
        assert_eq!(event, WatchEvent { kind: EventKind::Deleted, path: "/mirror-alive".into() });

        // Writes the expired session cannot see.
        let doomed = before.iter().find(|t| t.state() == TaskState::Pending).expect("a pending task").id;
        w.delete(&doomed).await;
        let created = populate(&w, 100, 10).await;
        for task in &before[5..] {
            w.set_window(&task.id, Some(window((12, 0), (13, 0)))).await;
        }
        assert!(mirror.get(doomed).await.unwrap().is_some(), "the cut-off mirror saw the deletion");

        proxy.unblock();
        let now =
            wait_status(&mut session, SESSION_TIMEOUT, |s| s.state == SessionState::Connected && s.generation >= 2)
                .await;
        assert_eq!(now.generation, 2, "one expiry, one new session");
        let status = wait_converged("after the expiry", &w.store, &mirror).await;
        assert!(status.reloads > reloads_before, "converged without a reload: {status:?}");
        assert_eq!(mirror.get(doomed).await.unwrap(), None, "the deleted task is still in the mirror");
        assert_eq!(mirror.ids().await.unwrap().len(), 10 - 1 + created.len());
        assert_indexes_match(&w.store, &mirror).await;

        // The new session's watch works: a later write arrives.
        let late = w.create(1_000, None).await;
        wait_converged("a write after the expiry", &w.store, &mirror).await;
        assert_eq!(mirror.get(late.id).await.unwrap(), Some(late));

        mirror.shutdown().await;
        step("close the mirror's session", mirror_coord.close()).await;
        w.close().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A task deleted and created again under the same id while the mirror was not looking

/// ZooKeeper is the truth even when a record's version went *down*: a task deleted and created
/// again under the same id (a client retrying a create with its id, after the first copy was
/// deleted) starts again at version 0, and a reload must replace the cached copy, not keep the
/// old records because their versions are higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_task_replaces_its_stale_copy() {
    within(CASE_TIMEOUT, "recreated task", async {
        init_tracing();
        let server = shared_zk();
        let chroot = unique_chroot("cache-recreated");
        let w = Writer::connect(server.connect_string(&chroot), "w").await;
        populate(&w, 0, 5).await;
        let task = w.create(50, None).await;
        let id = task.id;
        w.set_window(&id, Some(window((1, 0), (2, 0)))).await;
        w.set_window(&id, Some(window((3, 0), (4, 0)))).await;
        let mut lock = w.start(&id).await;
        w.progress(&mut lock, 1 << 30).await;
        w.stop(lock, TaskState::Pending).await;

        let root = tempfile::tempdir().expect("a temp dir");
        let dir = root.path().join("cache");
        let (coord, store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
        let mirror = start_mirror(&store, &dir).await;
        wait_converged("first mirror", &store, &mirror).await;
        let old = mirror.get(id).await.unwrap().expect("the task is cached");
        assert_eq!(old.versions.control, 2);
        mirror.shutdown().await;
        step("close the first mirror's session", coord.close()).await;

        // While no mirror runs: the task is deleted, then created again with the same id.
        w.delete(&id).await;
        w.clock.advance_ms(60_000);
        let fresh = step("create again", w.store.create(id, spec(51), None, &w.fence)).await.expect("create again");
        assert_eq!((fresh.versions.control, fresh.versions.status, fresh.versions.progress), (0, 0, 0));
        assert!(fresh.versions.incarnation > old.versions.incarnation, "a new incarnation");
        assert_ne!(fresh.control, old.control);

        let (coord, store) = mirror_store(ZkConfig::new(server.connect_string(&chroot))).await;
        let mirror = start_mirror(&store, &dir).await;
        step("wait_synced", mirror.wait_synced()).await;
        // A reload is a full re-read: right after it the mirror equals ZooKeeper.
        assert_eq!(mirror.get(id).await.unwrap(), Some(fresh.clone()), "the recreated task after a reload");
        let diffs = differences(&store, &mirror).await;
        assert!(diffs.is_empty(), "after a reload the mirror differs from ZooKeeper:\n{}", diffs.join("\n"));
        assert_eq!(listed_states(&mirror, id).await, [TaskState::Pending]);
        assert!(ids_of(&mirror.list_by_created(fresh.control.created_at_ms, i64::MAX, usize::MAX).await.unwrap())
            .contains(&id));

        mirror.shutdown().await;
        step("close the mirror's session", coord.close()).await;
        w.close().await;
    })
    .await;
}
