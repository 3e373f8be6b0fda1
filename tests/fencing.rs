//! Stops preempt everything, panics are caught, and one task runs per target: task servers in
//! one process (embedded coordination, in-process transport) running the real copy engine over
//! the memory backend, whose hooks make a backend hang, panic or go slowly on demand.
//!
//! The partitioned writer, against real ZooKeeper and real processes, is in `tests/cluster.rs`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::tasks::{wait_state, wait_task};
use common::within;
use task_center::coord::{Coordination, EmbeddedServer};
use task_center::copy::{CopyEngine, HookAction, MemoryBackend, MemoryOp, VolumeRef};
use task_center::model::{CopyOptions, CopyVolumeSpec, SnapshotId, TaskSpec, TaskState, VolumeId};
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterHandle};

const WAIT: Duration = Duration::from_secs(30);
/// The node's stop timeout: a step that has not stopped this long after a stop was asked is
/// abandoned.
const STOP_TIMEOUT_MS: u64 = 500;
/// The bound a stop must meet: the stop timeout, one progress commit, and slack for a loaded
/// machine. A guard on a stated bound, not a speed measurement.
const STOP_BOUND: Duration = Duration::from_secs(5);
const VOLUME_BYTES: u64 = 4 << 20;
const SOURCE_HOST: &str = "198.51.100.1:10201";
const TARGET_HOST: &str = "203.0.113.1:10201";

struct Node {
    server: EmbeddedServer,
    backend: MemoryBackend,
    handle: TaskCenterHandle,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        common::init_tracing();
        let (server, backend, dir) = (EmbeddedServer::new(), MemoryBackend::new(), tempfile::tempdir().unwrap());
        let handle = TaskCenter::builder()
            .node_id("n1")
            .embedded(server.clone())
            .transport(Arc::new(InProcessNetwork::new()))
            .data_dir(dir.path())
            .executor(Arc::new(CopyEngine::new(Arc::new(backend.clone()))))
            .sweep_interval_ms(100)
            .stop_timeout_ms(STOP_TIMEOUT_MS)
            .temporary_failure_limit(2)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        Node { server, backend, handle, _dir: dir }
    }

    fn observer(&self) -> Arc<dyn Coordination> {
        Arc::new(self.server.connect())
    }

    /// A source volume full of data.
    fn source(&self, name: &str, seed: u8) -> VolumeRef {
        let source = volume(SOURCE_HOST, name);
        self.backend.create_volume(&source, VOLUME_BYTES);
        let data: Vec<u8> = (0..VOLUME_BYTES).map(|i| ((i % 251) as u8 ^ seed) | 1).collect();
        self.backend.write_volume(&source, 0, &data);
        source
    }

    /// An empty target volume.
    fn target(&self, name: &str) -> VolumeRef {
        let target = volume(TARGET_HOST, name);
        self.backend.create_volume(&target, VOLUME_BYTES);
        target
    }

    /// A source full of data and an empty target.
    fn volumes(&self, source: &str, target: &str, seed: u8) -> (VolumeRef, VolumeRef) {
        (self.source(source, seed), self.target(target))
    }
}

fn volume(host: &str, name: &str) -> VolumeRef {
    VolumeRef { hosts: vec![host.to_string()], volume: VolumeId::new(name).unwrap() }
}

fn copy(source: &VolumeRef, target: &VolumeRef, options: CopyOptions) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: None,
        options: CopyOptions { extent_size_bytes: 1 << 20, blocks_in_flight: 1, ..options },
    })
}

/// Resolves once the backend's hook has seen a write to `target` (the step is inside it).
fn write_seen(backend: &MemoryBackend, target: &VolumeRef, then: HookAction) -> Arc<tokio::sync::Notify> {
    let seen = Arc::new(tokio::sync::Notify::new());
    let (notify, target) = (seen.clone(), target.volume.clone());
    backend.set_hook(move |call| {
        if call.op == MemoryOp::Write && call.volume == target {
            notify.notify_one();
            return then;
        }
        HookAction::Proceed
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_takes_effect_inside_a_1_byte_per_second_bandwidth_wait() {
    let node = Node::start().await;
    let observer = node.observer();
    let (source, target) = node.volumes("src", "dst", 1);
    let options = CopyOptions { bandwidth_limit_bytes_per_second: Some(1), ..CopyOptions::default() };
    let task = node.handle.create(copy(&source, &target, options), None).await.unwrap();
    wait_state(observer.as_ref(), task.id, TaskState::Running, WAIT).await;
    // At 1 B/s the first run of 64 KiB waits about 18 hours for its bandwidth.
    node.handle.cancel(task.id).await.unwrap();
    let status = within(STOP_BOUND, "cancel ends a bandwidth wait", async {
        wait_state(observer.as_ref(), task.id, TaskState::Canceled, WAIT).await
    })
    .await;
    assert_eq!(status.state, TaskState::Canceled);
    assert_eq!(node.backend.calls(MemoryOp::Write), 0, "nothing was written at 1 B/s");
    let shown = node.handle.show(task.id).await.unwrap();
    assert_eq!(shown.progress.cursor_bytes, 0);
    within(STOP_BOUND, "shutdown", node.handle.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_shutdown_take_effect_while_a_backend_call_hangs() {
    let node = Node::start().await;
    let observer = node.observer();
    let (source, target) = node.volumes("src", "dst", 2);
    let hung = write_seen(&node.backend, &target, HookAction::Hang);
    let task = node.handle.create(copy(&source, &target, CopyOptions::default()), None).await.unwrap();
    within(WAIT, "a write to the target hangs", hung.notified()).await;
    node.handle.cancel(task.id).await.unwrap();
    within(STOP_BOUND, "cancel ends a hung step", async {
        wait_state(observer.as_ref(), task.id, TaskState::Canceled, WAIT).await
    })
    .await;

    // The same with a pause, then a shutdown while the resumed copy hangs again.
    let second = node.handle.create(copy(&source, &target, CopyOptions::default()), None).await.unwrap();
    within(WAIT, "the second task's write hangs", hung.notified()).await;
    node.handle.pause(second.id).await.unwrap();
    within(STOP_BOUND, "pause ends a hung step", async {
        wait_state(observer.as_ref(), second.id, TaskState::Paused, WAIT).await
    })
    .await;
    node.handle.resume(second.id).await.unwrap();
    within(WAIT, "the resumed task's write hangs", hung.notified()).await;
    within(STOP_BOUND, "a graceful shutdown with a hung step", node.handle.shutdown()).await;
    let after = wait_state(observer.as_ref(), second.id, TaskState::Pending, WAIT).await;
    assert_eq!(after.state, TaskState::Pending, "a shutdown hands the task back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backend_fails_the_task_with_the_panic_message() {
    let node = Node::start().await;
    let observer = node.observer();
    let (source, target) = node.volumes("src", "dst", 3);
    let volume = target.volume.clone();
    node.backend.set_hook(move |call| {
        if call.op == MemoryOp::Write && call.volume == volume {
            panic!("the disk controller exploded at {:?}", call.range);
        }
        HookAction::Proceed
    });
    let task = node.handle.create(copy(&source, &target, CopyOptions::default()), None).await.unwrap();
    let failed = wait_state(observer.as_ref(), task.id, TaskState::Failed, WAIT).await;
    let reason = failed.reason.expect("a failed task has a reason");
    assert!(reason.contains("panicked") && reason.contains("the disk controller exploded"), "{reason}");
    // Retried (the limit is 2 in a row) before it failed: three attempts to write.
    assert_eq!(node.backend.calls(MemoryOp::Write), 3, "{reason}");
    // The node survived its backend's panics and still serves.
    node.backend.clear_hook();
    let again = node.handle.create(copy(&source, &target, CopyOptions::default()), None).await.unwrap();
    wait_state(observer.as_ref(), again.id, TaskState::Succeeded, WAIT).await;
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tasks_to_one_target_run_one_after_the_other_and_both_end_exact() {
    let node = Node::start().await;
    let observer = node.observer();
    let (first_source, target) = node.volumes("vol-a", "vol-d", 4);
    let second_source = node.source("vol-c", 5);
    // The first copy goes slowly until the second one is seen queued behind it.
    let slow = Arc::new(AtomicBool::new(true));
    let (flag, volume) = (slow.clone(), target.volume.clone());
    node.backend.set_hook(move |call| {
        if call.op == MemoryOp::Write && call.volume == volume && flag.load(Ordering::SeqCst) {
            return HookAction::Delay(Duration::from_millis(50));
        }
        HookAction::Proceed
    });
    let first = node.handle.create(copy(&first_source, &target, CopyOptions::default()), None).await.unwrap();
    wait_state(observer.as_ref(), first.id, TaskState::Running, WAIT).await;
    let second = node.handle.create(copy(&second_source, &target, CopyOptions::default()), None).await.unwrap();
    let queued = wait_task(observer.as_ref(), second.id, WAIT, |s| {
        s.waiting.as_deref().is_some_and(|note| note.contains(&first.id.to_string()))
    })
    .await;
    assert_eq!(queued.state, TaskState::Pending, "{queued:?}");
    let note = queued.waiting.unwrap();
    assert!(note.contains("vol-d"), "{note}");
    let running = node.handle.show(first.id).await.unwrap();
    assert_eq!(running.state(), TaskState::Running, "the first task still runs while the second waits");
    slow.store(false, Ordering::SeqCst);

    wait_state(observer.as_ref(), first.id, TaskState::Succeeded, WAIT).await;
    wait_state(observer.as_ref(), second.id, TaskState::Succeeded, WAIT).await;
    // Each target snapshot is its own source's snapshot, byte for byte.
    for (task, source) in [(&first, &first_source), (&second, &second_source)] {
        let name: SnapshotId = CopyEngine::snapshot_name(&task.id);
        let copied = node.backend.read_snapshot(&target, &name);
        assert!(copied == node.backend.read_snapshot(source, &name), "task {}: the target snapshot differs", task.id);
    }
    let (a, b) = (node.handle.show(first.id).await.unwrap(), node.handle.show(second.id).await.unwrap());
    assert!(a.status.updated_at_ms <= b.progress.updated_at_ms, "the second ran after the first ended");
    assert_eq!(node.backend.fenced_calls(), 0, "the dispatcher kept them apart; the backend never had to");
    node.handle.shutdown().await;
}
