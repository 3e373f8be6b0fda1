//! A cluster of task servers in one process: embedded coordination, in-process transport,
//! simulated executor. The fast proof of scheduling, forwarding, pause, cancel and failover;
//! `tests/cluster.rs` proves the same against real ZooKeeper and separate processes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tasks::{wait_state, wait_task};
use task_center::api::ApiError;
use task_center::clock::SystemClock;
use task_center::coord::{Coordination, EmbeddedServer};
use task_center::exec::SimulatedExecutor;
use task_center::model::{DesiredState, TaskState};
use task_center::store::TaskStore;
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterBuilder, TaskCenterHandle};

const WAIT: Duration = Duration::from_secs(30);

use common::tasks::spec;

struct Cluster {
    server: EmbeddedServer,
    network: InProcessNetwork,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        common::init_tracing();
        Cluster { server: EmbeddedServer::new(), network: InProcessNetwork::new(), dir: tempfile::tempdir().unwrap() }
    }

    async fn node(&self, name: &str, executor: SimulatedExecutor) -> TaskCenterHandle {
        self.node_with(name, executor, |builder| builder).await
    }

    /// A node with two task slots and a 200 ms sweep, then `adjust`'s settings.
    async fn node_with(
        &self,
        name: &str,
        executor: SimulatedExecutor,
        adjust: impl FnOnce(TaskCenterBuilder) -> TaskCenterBuilder,
    ) -> TaskCenterHandle {
        let builder = TaskCenter::builder()
            .node_id(name)
            .embedded(self.server.clone())
            .transport(Arc::new(self.network.clone()))
            .data_dir(self.dir.path().join(name))
            .executor(Arc::new(executor))
            .tasks_per_runner(2)
            .sweep_interval_ms(200);
        adjust(builder).build().unwrap().start().await.unwrap()
    }

    fn observer(&self) -> Arc<dyn Coordination> {
        Arc::new(self.server.connect())
    }
}

async fn wait_leader(nodes: &[&TaskCenterHandle]) -> usize {
    let mut receivers: Vec<_> = nodes.iter().map(|n| n.leader_status()).collect();
    common::step("a leader is ready", async {
        loop {
            if let Some(i) = receivers.iter_mut().position(|r| r.borrow_and_update().ready) {
                return i;
            }
            let changes = receivers.iter_mut().map(|r| Box::pin(r.changed()));
            let _ = futures::future::select_all(changes).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_created_on_a_follower_run_to_success_across_runners() {
    let cluster = Cluster::new();
    let sim = SimulatedExecutor::new(5, Duration::from_millis(20), 1 << 20);
    let a = cluster.node("a", sim.clone()).await;
    let b = cluster.node("b", sim.clone()).await;
    let c = cluster.node("c", sim).await;
    let nodes = [&a, &b, &c];
    let leader = wait_leader(&nodes).await;
    let follower = nodes[(leader + 1) % 3];
    let observer = cluster.observer();
    let store = TaskStore::new(observer.clone(), Arc::new(SystemClock));

    let mut ids = Vec::new();
    for n in 0..12 {
        let task = follower.create(spec(n), None).await.unwrap();
        assert_eq!(task.state(), TaskState::Pending);
        ids.push(task.id);
    }
    let mut runners = std::collections::BTreeSet::new();
    for id in &ids {
        let status = wait_state(observer.as_ref(), *id, TaskState::Succeeded, WAIT).await;
        runners.insert(status.runner.unwrap());
        let task = store.get(id).await.unwrap();
        assert_eq!(task.progress.cursor_bytes, 5 << 20, "every step committed");
        assert_eq!(task.progress.counters.bytes_copied, 5 << 20);
    }
    assert!(runners.len() >= 2, "work spread over runners: {runners:?}");
    let listed = follower.runners().await.unwrap();
    assert_eq!(listed.len(), 3);
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_cancel_answer_the_stored_task() {
    let cluster = Cluster::new();
    let slow = SimulatedExecutor::new(200, Duration::from_millis(20), 1 << 20);
    let a = cluster.node("a", slow.clone()).await;
    let b = cluster.node("b", slow).await;
    wait_leader(&[&a, &b]).await;
    let observer = cluster.observer();

    let task = a.create(spec(1), None).await.unwrap();
    wait_state(observer.as_ref(), task.id, TaskState::Running, WAIT).await;
    let paused = b.pause(task.id).await.unwrap();
    assert_eq!(paused.control.desired, DesiredState::Pause, "the answer carries the change");
    let status = wait_state(observer.as_ref(), task.id, TaskState::Paused, WAIT).await;
    assert!(status.runner.is_some());
    let stopped_at = a.show(task.id).await.unwrap().progress.cursor_bytes;
    assert!(stopped_at < 200 << 20, "paused before the end");

    let resumed = a.resume(task.id).await.unwrap();
    assert_eq!(resumed.control.desired, DesiredState::Run);
    assert_eq!(resumed.state(), TaskState::Pending);
    wait_task(observer.as_ref(), task.id, WAIT, |s| s.state == TaskState::Running && s.attempts == 2).await;
    let canceled = b.cancel(task.id).await.unwrap();
    assert_eq!(canceled.control.desired, DesiredState::Cancel);
    wait_state(observer.as_ref(), task.id, TaskState::Canceled, WAIT).await;
    let after = a.show(task.id).await.unwrap();
    assert!(after.progress.cursor_bytes >= stopped_at, "resumed from its progress, never behind it");

    match a.pause(task.id).await {
        Err(ApiError::WrongState { state: TaskState::Canceled, .. }) => {}
        other => panic!("pausing a canceled task: {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_an_aborted_runner_resume_elsewhere_from_their_progress() {
    let cluster = Cluster::new();
    let slow = SimulatedExecutor::new(100, Duration::from_millis(20), 1 << 20);
    let a = cluster.node("a", slow.clone()).await;
    let b = cluster.node("b", slow).await;
    let leader = wait_leader(&[&a, &b]).await;
    let (keep, victim) = if leader == 0 { (a, b) } else { (b, a) };
    let observer = cluster.observer();

    // Fill both runners, then kill the follower's runner.
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(keep.create(spec(n), None).await.unwrap().id);
    }
    for id in &ids {
        wait_state(observer.as_ref(), *id, TaskState::Running, WAIT).await;
    }
    let held = victim.holding().await;
    assert!(!held.is_empty(), "the victim runs something");
    victim.abort().await;
    for id in &held {
        let status =
            wait_task(observer.as_ref(), *id, WAIT, |s| s.state == TaskState::Running && s.attempts >= 2).await;
        assert_eq!(status.runner.as_ref(), Some(keep.node_id()));
    }
    for id in &ids {
        wait_state(observer.as_ref(), *id, TaskState::Succeeded, Duration::from_secs(60)).await;
    }
    keep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_cannot_be_called_is_left_out_and_tasks_run_elsewhere() {
    let cluster = Cluster::new();
    let sim = SimulatedExecutor::new(3, Duration::from_millis(10), 1 << 20);
    let a = cluster.node("a", sim.clone()).await;
    let b = cluster.node("b", sim).await;
    let nodes = [&a, &b];
    let leader = wait_leader(&nodes).await;
    let (leader, other) = (nodes[leader], nodes[1 - leader]);
    // The other node stays registered (its session is fine) but nobody can call it.
    cluster.network.isolate(other.address());
    let observer = cluster.observer();
    let mut tasks = Vec::new();
    for n in 0..4 {
        tasks.push(leader.create(spec(n), None).await.unwrap());
    }
    for task in &tasks {
        let done = wait_state(observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
        assert_eq!(done.runner.as_ref(), Some(leader.node_id()), "{done:?}");
    }
    cluster.network.rejoin(other.address());
    a.shutdown().await;
    b.shutdown().await;
}

/// A task that can run is found however many pending tasks wait ahead of it: passes rotate
/// through the pending tasks a page at a time (a page of 4 here, 10 000 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runnable_task_behind_many_waiting_ones_runs() {
    let cluster = Cluster::new();
    let executor = SimulatedExecutor::new(1, Duration::from_millis(10), 1 << 20);
    let node = cluster.node_with("paged", executor, |b| b.tasks_per_runner(1).pass_page_size(4)).await;
    wait_leader(&[&node]).await;
    let window = closed_window();
    let mut waiting = Vec::new();
    for n in 0..14 {
        waiting.push(node.create(spec(n), Some(window)).await.unwrap().id);
    }
    let runnable = node.create(spec(100), None).await.unwrap();
    let observer = cluster.observer();
    wait_state(observer.as_ref(), runnable.id, TaskState::Succeeded, WAIT).await;
    for id in waiting {
        assert_eq!(node.show(id).await.unwrap().state(), TaskState::Pending, "a task ran outside its window");
    }
    node.shutdown().await;
}

/// A finished task can be deleted, with its records; a task that has not finished cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_can_be_deleted_and_unfinished_ones_cannot() {
    let cluster = Cluster::new();
    let node = cluster.node("del", SimulatedExecutor::new(1, Duration::from_millis(10), 1 << 20)).await;
    wait_leader(&[&node]).await;
    let observer = cluster.observer();
    let done = node.create(spec(1), None).await.unwrap();
    wait_state(observer.as_ref(), done.id, TaskState::Succeeded, WAIT).await;
    let deleted = node.delete(done.id).await.unwrap();
    assert_eq!((deleted.id, deleted.state()), (done.id, TaskState::Succeeded));
    let path = task_center::store::layout::task(&done.id);
    assert_eq!(observer.exists(&path).await.unwrap(), None, "the task's records are gone");
    // The leader reads its own delete at once.
    assert!(matches!(node.show(done.id).await, Err(ApiError::NotFound { .. })));
    assert!(matches!(node.delete(done.id).await, Err(ApiError::NotFound { .. })));

    let paused = node.create(spec(2), None).await.unwrap();
    let _ = node.pause(paused.id).await.unwrap();
    match node.delete(paused.id).await {
        Err(ApiError::WrongState { id, .. }) => assert_eq!(id, paused.id),
        other => panic!("deleting an unfinished task: {other:?}"),
    }
    assert!(observer.exists(&task_center::store::layout::task(&paused.id)).await.unwrap().is_some());
    node.shutdown().await;
}

/// Beyond the retention count, the leader deletes the oldest finished tasks by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_finished_tasks() {
    let cluster = Cluster::new();
    let executor = SimulatedExecutor::new(1, Duration::from_millis(5), 1 << 20);
    let node =
        cluster.node_with("keep", executor, |b| b.tasks_per_runner(1).sweep_interval_ms(100).retention_count(2)).await;
    wait_leader(&[&node]).await;
    let observer = cluster.observer();
    let mut ids = Vec::new();
    for n in 0..5 {
        let task = node.create(spec(n), None).await.unwrap();
        // One after the other, so that they finish in creation order.
        wait_state(observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
        ids.push(task.id);
    }
    let left = common::within(WAIT, "retention deletes all but the two newest", async {
        loop {
            let (children, watch) = observer.children_watch(task_center::store::layout::TASKS).await.unwrap();
            if children.len() <= 2 {
                return children;
            }
            watch.await;
        }
    })
    .await;
    let mut newest: Vec<String> = ids[3..].iter().map(|id| id.to_string()).collect();
    let mut left = left;
    newest.sort();
    left.sort();
    assert_eq!(left, newest, "the two newest finished tasks are kept");
    node.shutdown().await;
}

/// Two runnable tasks on one target behind more than a page of waiting tasks: the younger one
/// stays queued behind the older one while it runs, across paged passes. (The narrower race, a
/// pass that sees the younger one but not the older one in the moment between its assignment and
/// its claim, is closed by the dispatcher's `held` tasks; in process that moment is too short for
/// this test to hit it reliably.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_passes_keep_one_task_per_target() {
    let cluster = Cluster::new();
    let executor = SimulatedExecutor::new(20, Duration::from_millis(50), 1 << 20);
    let node = cluster.node_with("one-target", executor, |b| b.tasks_per_runner(4).pass_page_size(2)).await;
    wait_leader(&[&node]).await;
    let window = closed_window();
    for n in 0..5 {
        node.create(spec(n), Some(window)).await.unwrap();
    }
    let older = node.create(spec(50), None).await.unwrap();
    let younger = node.create(spec(50), None).await.unwrap();
    let observer = cluster.observer();
    let queued = wait_task(observer.as_ref(), younger.id, WAIT, |s| {
        s.waiting.as_deref().is_some_and(|w| w.contains(&older.id.to_string()))
    })
    .await;
    assert_eq!(queued.state, TaskState::Pending, "{queued:?}");
    let first = wait_state(observer.as_ref(), older.id, TaskState::Succeeded, WAIT).await;
    let second = wait_state(observer.as_ref(), younger.id, TaskState::Succeeded, WAIT).await;
    assert!(first.updated_at_ms <= second.updated_at_ms);
    node.shutdown().await;
}

/// A UTC run window that opens in two hours: closed now, whatever the time of day.
fn closed_window() -> task_center::model::RunWindow {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let later = |hours| now.checked_add(jiff::SignedDuration::from_hours(hours)).unwrap();
    let (opens, closes) = (later(2), later(3));
    format!("{:02}:{:02}-{:02}:{:02}", opens.hour(), opens.minute(), closes.hour(), closes.minute()).parse().unwrap()
}
