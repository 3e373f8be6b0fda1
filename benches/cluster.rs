//! Create-and-assign throughput against a local ZooKeeper: how many tasks per second a two-node
//! cluster accepts (each stored in ZooKeeper before the answer) and hands to a runner (the task
//! claimed and moved to running). The executor finishes a task in one instant step, so the figure
//! measures coordination, not work.
//!
//! `cargo bench --bench cluster` (needs Debian's zookeeper package, like the tests).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use task_center::coord::{Coordination, ZkConfig, ZkCoordination};
use task_center::exec::SimulatedExecutor;
use task_center::model::{CopyOptions, CopyVolumeSpec, TaskSpec, TaskState, VolumeId};
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterHandle};

/// Tasks created per measured iteration.
const BATCH: usize = 50;

fn spec(n: usize) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: VolumeId::new(format!("bench-src-{n}")).unwrap(),
        target_volume: VolumeId::new(format!("bench-dst-{n}")).unwrap(),
        source_hosts: vec!["198.51.100.1:10201".into()],
        target_hosts: vec!["203.0.113.1:10201".into()],
        base_snapshot: None,
        options: CopyOptions::default(),
    })
}

async fn node(name: &str, zk: &str, network: &InProcessNetwork, dir: &std::path::Path) -> TaskCenterHandle {
    TaskCenter::builder()
        .node_id(name)
        .zookeeper(ZkConfig::new(zk))
        .transport(Arc::new(network.clone()))
        .data_dir(dir.join(name))
        .executor(Arc::new(SimulatedExecutor::new(1, Duration::ZERO, 1)))
        .tasks_per_runner(64)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap()
}

fn create_and_assign(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = common::shared_zk();
    let chroot = common::unique_chroot("bench-cluster");
    let connect = server.connect_string(&chroot);
    let dir = tempfile::tempdir().unwrap();
    let network = InProcessNetwork::new();
    let (a, b, observer) = runtime.block_on(async {
        let a = node("bench-a", &connect, &network, dir.path()).await;
        let b = node("bench-b", &connect, &network, dir.path()).await;
        let (mut ra, mut rb) = (a.leader_status(), b.leader_status());
        while !ra.borrow_and_update().ready && !rb.borrow_and_update().ready {
            let _ = futures::future::select(Box::pin(ra.changed()), Box::pin(rb.changed())).await;
        }
        let observer: Arc<dyn Coordination> = Arc::new(ZkCoordination::connect(ZkConfig::new(&connect)).await.unwrap());
        (a, b, observer)
    });
    let follower = if a.status().leader.ready { &b } else { &a };

    let mut group = c.benchmark_group("cluster");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.bench_function("create_and_assign_50_tasks_via_follower", |bench| {
        bench.to_async(&runtime).iter_custom(|iterations| {
            let observer = observer.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let start = Instant::now();
                    let creates = (0..BATCH).map(|n| follower.create(spec(n), None));
                    let tasks = futures::future::try_join_all(creates).await.unwrap();
                    for task in &tasks {
                        common::tasks::wait_task(observer.as_ref(), task.id, Duration::from_secs(60), |s| {
                            s.state != TaskState::Pending
                        })
                        .await;
                    }
                    total += start.elapsed();
                }
                total
            }
        });
    });
    group.finish();
    runtime.block_on(async move {
        a.shutdown().await;
        b.shutdown().await;
        observer.close().await;
    });
}

criterion_group!(benches, create_and_assign);
criterion_main!(benches);
