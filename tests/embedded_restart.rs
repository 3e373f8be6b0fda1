//! A single node on the embedded default (no ZooKeeper) restarts with its tasks: the embedded
//! service journals every change in the data directory before it answers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tasks::spec;
use task_center::exec::SimulatedExecutor;
use task_center::model::{DesiredState, RunWindow, TaskState};
use task_center::{TaskCenter, TaskCenterHandle};

async fn start(dir: &std::path::Path) -> TaskCenterHandle {
    TaskCenter::builder()
        .node_id("solo")
        .data_dir(dir)
        .executor(Arc::new(SimulatedExecutor::new(3, Duration::from_millis(10), 1 << 20)))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_on_the_embedded_default_restarts_with_its_tasks() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A window that is closed now: these tasks stay where the answers leave them.
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let (from, to) = ((now.hour() as i32 + 2) % 24, (now.hour() as i32 + 3) % 24);
    let window: RunWindow = format!("{from:02}:00-{to:02}:00").parse().unwrap();

    let node = start(dir.path()).await;
    let waiting = node.create(spec(1), Some(window)).await.unwrap();
    let paused = node.create(spec(2), Some(window)).await.unwrap();
    let paused = node.pause(paused.id).await.unwrap();
    let canceled = node.create(spec(3), Some(window)).await.unwrap();
    let canceled = node.cancel(canceled.id).await.unwrap();
    assert_eq!(paused.state(), TaskState::Paused);
    assert_eq!(canceled.state(), TaskState::Canceled);
    node.shutdown().await;

    // A new process would see the same directory: the node starts again from it.
    let node = start(dir.path()).await;
    let listed = node.list(Default::default()).await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let again = node.show(waiting.id).await.unwrap();
    assert_eq!((again.state(), again.run_window()), (TaskState::Pending, Some(window)));
    assert_eq!(again.control, waiting.control);
    assert_eq!(node.show(paused.id).await.unwrap().state(), TaskState::Paused);
    let gone = node.show(canceled.id).await.unwrap();
    assert_eq!((gone.state(), gone.control.desired), (TaskState::Canceled, DesiredState::Cancel));
    // And it goes on: a change is stored and answered.
    let resumed = node.resume(paused.id).await.unwrap();
    assert_eq!(resumed.control.desired, DesiredState::Run);
    node.shutdown().await;
}
