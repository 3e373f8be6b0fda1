//! How long a running task takes to stop after its run window is changed to one that is closed:
//! from the `set_run_window` call until the runner has stopped at its next step, committed its
//! progress and written its waiting note to ZooKeeper. A two-node cluster on a local ZooKeeper,
//! tasks of 20 ms steps (the copy engine's blocks are far shorter; a step bounds the wait).
//!
//! `cargo bench --bench window`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use task_center::clock::ManualClock;
use task_center::coord::{Coordination, ZkConfig, ZkCoordination};
use task_center::exec::SimulatedExecutor;
use task_center::model::{CopyOptions, CopyVolumeSpec, RunWindow, TaskSpec, TaskState, VolumeId};
use task_center::transport::InProcessNetwork;
use task_center::TaskCenter;

fn window_stop(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let connect = common::shared_zk().connect_string(&common::unique_chroot("bench-window"));
    let dir = tempfile::tempdir().unwrap();
    // 12:00 in UTC: a 01:00-05:00 window is closed, 09:00-23:00 is open.
    let clock = ManualClock::at("2026-11-21T12:00:00Z".parse().unwrap());
    let (closed, open): (RunWindow, RunWindow) = ("01:00-05:00".parse().unwrap(), "09:00-23:00".parse().unwrap());
    let (node, observer, id) = runtime.block_on(async {
        let node = TaskCenter::builder()
            .node_id("bench-w")
            .zookeeper(ZkConfig::new(&connect))
            .transport(Arc::new(InProcessNetwork::new()))
            .data_dir(dir.path())
            .clock(Arc::new(clock.clone()))
            .executor(Arc::new(SimulatedExecutor::new(u64::MAX / 2, Duration::from_millis(20), 1)))
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let mut ready = node.leader_status();
        let _ = ready.wait_for(|s| s.ready).await;
        let observer: Arc<dyn Coordination> = Arc::new(ZkCoordination::connect(ZkConfig::new(&connect)).await.unwrap());
        let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
            source_volume: VolumeId::new("bench-src").unwrap(),
            target_volume: VolumeId::new("bench-dst").unwrap(),
            source_hosts: vec!["198.51.100.1:1".into()],
            target_hosts: vec!["198.51.100.2:1".into()],
            base_snapshot: None,
            options: CopyOptions::default(),
        });
        let task = node.create(spec, Some(open)).await.unwrap();
        (node, observer, task.id)
    });

    let mut group = c.benchmark_group("run_window");
    group.sample_size(20);
    group.bench_function("window_change_to_task_stop", |bench| {
        bench.to_async(&runtime).iter_custom(|iterations| {
            let (node, observer) = (&node, observer.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    node.set_run_window(id, Some(open)).await.unwrap();
                    common::tasks::wait_task(observer.as_ref(), id, Duration::from_secs(30), |s| {
                        s.state == TaskState::Running && s.waiting.is_none()
                    })
                    .await;
                    let start = Instant::now();
                    node.set_run_window(id, Some(closed)).await.unwrap();
                    common::tasks::wait_task(observer.as_ref(), id, Duration::from_secs(30), |s| s.waiting.is_some())
                        .await;
                    total += start.elapsed();
                }
                total
            }
        });
    });
    group.finish();
    runtime.block_on(async move {
        node.shutdown().await;
        observer.close().await;
    });
}

criterion_group!(benches, window_stop);
criterion_main!(benches);
