//! A host on a multi-threaded tokio runtime starts, uses and shuts down a task center without
//! panics or leaked threads (actix runs on threads of the task center's own).

mod common;

use std::time::Duration;

use common::tasks::wait_state;
use task_center::coord::EmbeddedServer;
use task_center::model::{CopyOptions, CopyVolumeSpec, TaskSpec, TaskState, VolumeId};
use task_center::TaskCenter;

/// Names of this process's threads.
fn threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn host() {
    let before = threads().len();
    let server = EmbeddedServer::new();
    let dir = tempfile::tempdir().unwrap();
    let node = TaskCenter::builder()
        .node_id("host-node")
        .embedded(server.clone())
        .data_dir(dir.path())
        .executor(std::sync::Arc::new(task_center::exec::SimulatedExecutor::default()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(threads().iter().any(|t| t.starts_with("task-center")), "the node runs on its own thread");

    // Used from several host worker threads at once.
    let node = std::sync::Arc::new(node);
    let mut creates = Vec::new();
    for n in 0..8 {
        let node = node.clone();
        creates.push(tokio::spawn(async move {
            let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
                source_volume: VolumeId::new(format!("v{n}")).unwrap(),
                target_volume: VolumeId::new(format!("w{n}")).unwrap(),
                source_hosts: vec!["198.51.100.1:1".into()],
                target_hosts: vec!["198.51.100.2:1".into()],
                base_snapshot: None,
                options: CopyOptions::default(),
            });
            node.create(spec, None).await.unwrap()
        }));
    }
    let observer = server.connect();
    for create in creates {
        let task = create.await.unwrap();
        wait_state(&observer, task.id, TaskState::Succeeded, Duration::from_secs(30)).await;
    }
    let node = std::sync::Arc::into_inner(node).expect("no other handle");
    node.shutdown().await;
    drop(observer);

    let names = threads();
    assert!(!names.iter().any(|t| t.starts_with("task-center")), "node thread joined: {names:?}");
    assert!(names.len() <= before, "no thread leaked: {before} before, {names:?} after");
}

#[test]
fn a_multithreaded_host_starts_uses_and_shuts_down_a_task_center() {
    host();
}
