//! Run windows on a cluster with real ZooKeeper and a manual clock (ZBS-10973): tasks run only
//! inside their daily window, stop at their next block when it closes, wait visibly, and resume
//! by themselves when it opens; a window change is answered with the task as stored after it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tasks::{wait_progress, wait_state, wait_task};
use task_center::center::StartError;
use task_center::clock::ManualClock;
use task_center::coord::{Coordination, ZkConfig, ZkCoordination};
use task_center::copy::{CopyBackend, FileBackend, VolumeRef};
use task_center::exec::SimulatedExecutor;
use task_center::model::{CopyOptions, CopyVolumeSpec, RunWindow, TaskSpec, TaskState, VolumeId};
use task_center::schedule::ScheduleSettings;
use task_center::store::TaskStore;
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterBuilder, TaskCenterHandle};

const WAIT: Duration = Duration::from_secs(30);
const ZONE: &str = "Asia/Shanghai";

use common::tasks::spec;

fn window(s: &str) -> RunWindow {
    s.parse().unwrap()
}

/// Shanghai wall-clock time on 2026-11-21 (UTC+8, no DST) as a Unix millisecond.
fn shanghai(hh_mm: &str) -> i64 {
    let at: jiff::Timestamp = format!("2026-11-21T{hh_mm}:00+08:00").parse().unwrap();
    at.as_millisecond()
}

struct Cluster {
    connect: String,
    network: InProcessNetwork,
    clock: ManualClock,
    dir: tempfile::TempDir,
    observer: Arc<dyn Coordination>,
    store: TaskStore,
}

impl Cluster {
    async fn new(case: &str, now: &str) -> Self {
        common::init_tracing();
        let connect = common::shared_zk().connect_string(&common::unique_chroot(case));
        let observer: Arc<dyn Coordination> = Arc::new(ZkCoordination::connect(ZkConfig::new(&connect)).await.unwrap());
        let clock = ManualClock::new(shanghai(now));
        let store = TaskStore::new(observer.clone(), Arc::new(clock.clone()));
        Cluster { connect, network: InProcessNetwork::new(), clock, dir: tempfile::tempdir().unwrap(), observer, store }
    }

    async fn node(&self, name: &str, steps: u64) -> TaskCenterHandle {
        self.builder(name, steps).build().unwrap().start().await.unwrap()
    }

    /// A node of this cluster in [`ZONE`] without a default window, not built yet.
    fn builder(&self, name: &str, steps: u64) -> TaskCenterBuilder {
        TaskCenter::builder()
            .node_id(name)
            .zookeeper(ZkConfig::new(&self.connect))
            .transport(Arc::new(self.network.endpoint(name)))
            .listen(name)
            .data_dir(self.dir.path().join(name))
            .clock(Arc::new(self.clock.clone()))
            .time_zone(ZONE)
            .executor(Arc::new(SimulatedExecutor::new(steps, Duration::from_millis(20), 1 << 20)))
            .sweep_interval_ms(200)
    }
}

/// Waits until one of the nodes leads and is ready; returns its index.
async fn leader_of(nodes: &[&TaskCenterHandle]) -> usize {
    let mut receivers: Vec<_> = nodes.iter().map(|n| n.leader_status()).collect();
    common::step("a leader is ready", async {
        loop {
            if let Some(i) = receivers.iter_mut().position(|r| r.borrow_and_update().ready) {
                return i;
            }
            let _ = futures::future::select_all(receivers.iter_mut().map(|r| Box::pin(r.changed()))).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_wrapping_midnight_holds_a_task_until_it_opens() {
    let cluster = Cluster::new("window-wrap", "12:00").await;
    let node = cluster.node("a", 3).await;
    leader_of(&[&node]).await;

    let task = node.create(spec(1), Some(window("22:00-04:00"))).await.unwrap();
    assert_eq!(task.run_window(), Some(window("22:00-04:00")));
    let status = wait_task(cluster.observer.as_ref(), task.id, WAIT, |s| s.waiting.is_some()).await;
    assert_eq!(status.state, TaskState::Pending, "not started outside its window");
    let note = status.waiting.unwrap();
    assert!(note.contains("opens 22:00 Asia/Shanghai"), "{note}");

    cluster.clock.set_ms(shanghai("23:30"));
    let status = wait_state(cluster.observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
    assert_eq!(status.waiting, None, "the note is gone once it ran");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_change_stops_a_running_task_at_its_next_step_and_it_resumes_at_the_opening() {
    let cluster = Cluster::new("window-change", "10:00").await;
    let a = cluster.node("a", 400).await;
    let b = cluster.node("b", 400).await;
    let leader = leader_of(&[&a, &b]).await;
    let follower = [&a, &b][1 - leader];

    let task = follower.create(spec(1), None).await.unwrap();
    wait_task(cluster.observer.as_ref(), task.id, WAIT, |s| s.state == TaskState::Running).await;

    // Closed now (it is 10:00): the answer carries the new window, and the task stops.
    let changed = follower.set_run_window(task.id, Some(window("01:00-05:00"))).await.unwrap();
    assert_eq!(changed.run_window(), Some(window("01:00-05:00")), "the answer is the task as stored after");
    let status = wait_task(cluster.observer.as_ref(), task.id, WAIT, |s| s.waiting.is_some()).await;
    assert_eq!(status.state, TaskState::Running, "it keeps its claim while it waits");
    let note = status.waiting.unwrap();
    assert!(note.contains("waiting for run window 01:00-05:00, opens 01:00 Asia/Shanghai"), "{note}");
    let stored = cluster.store.get(&task.id).await.unwrap();
    assert_eq!(stored.run_window(), Some(window("01:00-05:00")));
    let stopped_at = stored.progress.cursor_bytes;
    assert!(stopped_at < 400 << 20, "stopped before the end");

    // Waiting means no progress: a later read shows the same cursor.
    let again = cluster.store.get(&task.id).await.unwrap();
    assert_eq!(again.progress.cursor_bytes, stopped_at);

    // The window opens (next night): it resumes by itself, from its progress, on the same runner.
    cluster.clock.set_ms(shanghai("23:59") + 2 * 60_000); // 00:01 on the 22nd
    cluster.clock.advance_ms(60 * 60_000); // 01:01
    let done = wait_state(cluster.observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
    assert_eq!(done.runner, status.runner, "the same runner, still alive, continued");
    assert_eq!(done.attempts, 1, "never handed back");
    let finished = cluster.store.get(&task.id).await.unwrap();
    assert_eq!(finished.progress.cursor_bytes, 400 << 20);
    assert_eq!(finished.progress.counters.bytes_copied, 400 << 20, "each step counted once");
    a.shutdown().await;
    b.shutdown().await;
}

/// The same with the real copy engine over real files: a throttled copy is stopped by a window
/// change at its next block, waits with its claim, resumes by itself at the opening, and ends
/// exact: the target equals the source snapshot byte for byte, and no byte was sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_change_stops_a_running_copy_and_the_copy_ends_exact() {
    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 48 * MIB;
    let cluster = Cluster::new("window-copy", "10:00").await;
    let backend = Arc::new(FileBackend::new(cluster.dir.path().join("volumes")));
    let source = VolumeRef { hosts: vec!["198.51.100.1:10201".into()], volume: VolumeId::new("src").unwrap() };
    let target = VolumeRef { hosts: vec!["203.0.113.1:10201".into()], volume: VolumeId::new("dst").unwrap() };
    backend.create_volume(&source, SIZE).await.unwrap();
    backend.create_volume(&target, SIZE).await.unwrap();
    let data: Vec<u8> = (0..SIZE).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1).collect();
    let volume = backend.open_target(&source, &setup_lease()).await.unwrap();
    volume.write(0, data.clone()).await.unwrap();
    volume.flush().await.unwrap();

    let node = cluster.builder("a", 1).copy_backend(backend.clone()).build().unwrap().start().await.unwrap();
    leader_of(&[&node]).await;
    // 12 extents of 4 MiB at 8 MiB/s (after a one-second burst): about five seconds of copying.
    let options = CopyOptions {
        extent_size_bytes: 4 * MIB,
        bandwidth_limit_bytes_per_second: Some(8 * MIB),
        ..CopyOptions::default()
    };
    let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: None,
        options,
    });
    let task = node.create(spec, None).await.unwrap();
    wait_progress(cluster.observer.as_ref(), task.id, WAIT, |p| p.cursor_bytes > 0).await;

    let changed = node.set_run_window(task.id, Some(window("01:00-05:00"))).await.unwrap();
    assert_eq!(changed.run_window(), Some(window("01:00-05:00")));
    let status = wait_task(cluster.observer.as_ref(), task.id, WAIT, |s| s.waiting.is_some()).await;
    assert_eq!(status.state, TaskState::Running, "it keeps its claim while it waits");
    let stopped = cluster.store.get(&task.id).await.unwrap().progress;
    assert!(stopped.cursor_bytes < SIZE, "stopped before the end: {stopped:?}");
    assert_eq!(stopped.counters.total(), stopped.cursor_bytes, "every byte below the cursor counted once");

    cluster.clock.set_ms(shanghai("23:59") + 2 * 60_000); // 00:01 on the 22nd
    cluster.clock.advance_ms(60 * 60_000); // 01:01: open
    let done = wait_state(cluster.observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
    assert_eq!(done.attempts, 1, "the same run continued");
    let finished = cluster.store.get(&task.id).await.unwrap().progress;
    assert_eq!(finished.cursor_bytes, SIZE);
    assert_eq!(finished.counters.bytes_copied, SIZE, "no byte sent twice across the stop");
    let snapshot = finished.source_snapshot.expect("the source snapshot is recorded");
    let read_all = |path: std::path::PathBuf| std::fs::read(path).unwrap();
    let expected = read_all(backend.snapshot_path(&source, &snapshot));
    assert_eq!(expected, data, "the source snapshot holds the source's bytes");
    assert!(read_all(backend.volume_path(&target)) == expected, "the target equals the source snapshot");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_cut_off_from_the_dispatcher_still_obeys_the_window() {
    let cluster = Cluster::new("window-partition", "10:00").await;
    let a = cluster.node("a", 400).await;
    let b = cluster.node("b", 400).await;
    let leader = leader_of(&[&a, &b]).await;
    let (leader, other) = if leader == 0 { (&a, &b) } else { (&b, &a) };

    // Fill both runners so that one task runs on the non-leader.
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(leader.create(spec(n), None).await.unwrap().id);
    }
    // Four tasks per runner: with eight running, the follower's runner holds four.
    for id in &ids {
        wait_state(cluster.observer.as_ref(), *id, TaskState::Running, WAIT).await;
    }
    let victim = *other.holding().await.first().expect("the follower's runner holds tasks");

    // The dispatcher can no longer call that runner; ZooKeeper still reaches it.
    cluster.network.refuse(leader.address(), other.address());
    let changed = leader.set_run_window(victim, Some(window("01:00-05:00"))).await.unwrap();
    assert_eq!(changed.run_window(), Some(window("01:00-05:00")));
    let status = wait_task(cluster.observer.as_ref(), victim, WAIT, |s| s.waiting.is_some()).await;
    assert_eq!(status.runner.as_ref(), Some(other.node_id()), "its own watch told the cut-off runner");
    cluster.network.heal_all();
    for id in ids {
        let _ = leader.cancel(id).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_change_is_answered_current_while_progress_is_committed() {
    let cluster = Cluster::new("window-race", "10:00").await;
    let node = cluster.node("a", 2_000).await;
    leader_of(&[&node]).await;
    let task = node.create(spec(1), Some(window("09:00-23:00"))).await.unwrap();
    wait_state(cluster.observer.as_ref(), task.id, TaskState::Running, WAIT).await;

    // The runner commits progress every 20 ms while windows change; every answer and every
    // read-back carries the window just set, never one a progress write brought back.
    let windows = ["08:00-22:00", "07:00-23:30", "09:30-21:00", "06:00-23:59", "00:00-23:00"];
    for round in 0..20 {
        let w = window(windows[round % windows.len()]);
        let answer = node.set_run_window(task.id, Some(w)).await.unwrap();
        assert_eq!(answer.run_window(), Some(w), "round {round}: the answer");
        let stored = cluster.store.get(&task.id).await.unwrap();
        assert_eq!(stored.run_window(), Some(w), "round {round}: ZooKeeper");
    }
    let before = cluster.store.get(&task.id).await.unwrap();
    assert!(before.versions.progress > 0, "progress was committed meanwhile");
    let cleared = node.set_run_window(task.id, None).await.unwrap();
    assert_eq!(cleared.run_window(), None, "clearing is answered too");
    node.cancel(task.id).await.unwrap();
    wait_state(cluster.observer.as_ref(), task.id, TaskState::Canceled, WAIT).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_pause_outlasts_a_window_opening() {
    let cluster = Cluster::new("window-pause", "10:00").await;
    let node = cluster.node("a", 3).await;
    leader_of(&[&node]).await;
    let task = node.create(spec(1), Some(window("22:00-04:00"))).await.unwrap();
    let witness = node.create(spec(2), Some(window("22:00-04:00"))).await.unwrap();
    wait_task(cluster.observer.as_ref(), task.id, WAIT, |s| s.waiting.is_some()).await;
    let paused = node.pause(task.id).await.unwrap();
    assert_eq!(paused.state(), TaskState::Paused);

    // The window opens: the witness, waiting for the same window, runs to the end; the paused
    // task does not move.
    cluster.clock.set_ms(shanghai("22:30"));
    wait_state(cluster.observer.as_ref(), witness.id, TaskState::Succeeded, WAIT).await;
    let still = cluster.store.get(&task.id).await.unwrap();
    assert_eq!(still.state(), TaskState::Paused, "a manual pause outlasts the opening");
    assert_eq!(still.status.attempts, 0, "never started");
    let resumed = node.resume(task.id).await.unwrap();
    assert_eq!(resumed.state(), TaskState::Pending);
    wait_state(cluster.observer.as_ref(), task.id, TaskState::Succeeded, WAIT).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_window_applies_to_tasks_without_one() {
    common::init_tracing();
    let bad = TaskCenter::builder().node_id("x").time_zone("Mars/Olympus").build();
    match bad {
        Err(task_center::center::ConfigError::Invalid { field: "time_zone", value, .. }) => {
            assert_eq!(value, "Mars/Olympus")
        }
        other => panic!("an unknown zone must be refused: {:?}", other.err()),
    }
    let cluster = Cluster::new("window-default", "12:00").await;
    let node = TaskCenter::builder()
        .node_id("a")
        .zookeeper(ZkConfig::new(&cluster.connect))
        .transport(Arc::new(cluster.network.endpoint("a")))
        .listen("a")
        .data_dir(cluster.dir.path().join("a"))
        .clock(Arc::new(cluster.clock.clone()))
        .time_zone(ZONE)
        .default_run_window(Some(window("01:00-05:00")))
        .executor(Arc::new(SimulatedExecutor::new(2, Duration::from_millis(10), 1)))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    leader_of(&[&node]).await;
    let own = node.create(spec(1), Some(window("11:00-13:00"))).await.unwrap();
    let default = node.create(spec(2), None).await.unwrap();
    wait_state(cluster.observer.as_ref(), own.id, TaskState::Succeeded, WAIT).await;
    let status = wait_task(cluster.observer.as_ref(), default.id, WAIT, |s| s.waiting.is_some()).await;
    assert!(status.waiting.unwrap().contains("01:00-05:00"));
    node.shutdown().await;
}

/// Every node must read windows alike. The cluster's first node stores its time zone and default
/// window; a node started with another zone or another default window is refused, naming both,
/// and changes nothing; a node with the cluster's settings (and the first one, restarted) starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_would_read_windows_differently_is_refused_at_start() {
    let cluster = Cluster::new("window-agree", "12:00").await;
    let first = cluster.node("a", 1).await;
    let stored = || async {
        let (data, _) = cluster.observer.get("/config/schedule").await.unwrap();
        serde_json::from_slice::<ScheduleSettings>(&data).unwrap()
    };
    let ours = ScheduleSettings { time_zone: ZONE.into(), default_run_window: None };
    assert_eq!(stored().await, ours);

    let other_zone = cluster.builder("b", 1).time_zone("UTC").build().unwrap();
    let other_window = cluster.builder("c", 1).default_run_window(Some(window("01:00-05:00"))).build().unwrap();
    for (refused, theirs) in [
        (other_zone, ScheduleSettings { time_zone: "UTC".into(), default_run_window: None }),
        (other_window, ScheduleSettings { time_zone: ZONE.into(), default_run_window: Some(window("01:00-05:00")) }),
    ] {
        match refused.start().await {
            Err(StartError::ScheduleMismatch { node, cluster }) => {
                assert_eq!((node, cluster), (theirs, ours.clone()));
            }
            Err(other) => panic!("expected a schedule mismatch, got {other}"),
            Ok(_) => panic!("a node with {theirs} must not start in a cluster with {ours}"),
        }
    }
    assert_eq!(stored().await, ours, "a refused node changes nothing");

    let second = cluster.node("b", 1).await;
    first.shutdown().await;
    let first = cluster.node("a", 1).await;
    leader_of(&[&first, &second]).await;
    first.shutdown().await;
    second.shutdown().await;
}

/// The writer lease tests write volumes under, outside any task.
fn setup_lease() -> task_center::model::WriterLease {
    task_center::model::WriterLease::new(task_center::model::TaskId::from_bytes([0; 16]), 1)
}
