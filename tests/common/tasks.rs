//! Waiting for tasks without polling: one-shot watches on their status and progress records.

use std::time::Duration;

use task_center::coord::Coordination;
use task_center::model::{
    CopyOptions, CopyVolumeSpec, TaskId, TaskProgress, TaskSpec, TaskState, TaskStatus, VolumeId,
};
use task_center::store::layout;

/// Waits until task `id`'s status record satisfies `pred`, watching the record (no polling), and
/// returns it. Panics with the last status seen after `timeout`.
pub async fn wait_task(
    coord: &dyn Coordination,
    id: TaskId,
    timeout: Duration,
    pred: impl Fn(&TaskStatus) -> bool,
) -> TaskStatus {
    wait_record(coord, &layout::status(&id), timeout, pred).await
}

/// Waits until task `id`'s progress record satisfies `pred`, as [`wait_task`] does.
pub async fn wait_progress(
    coord: &dyn Coordination,
    id: TaskId,
    timeout: Duration,
    pred: impl Fn(&TaskProgress) -> bool,
) -> TaskProgress {
    wait_record(coord, &layout::progress(&id), timeout, pred).await
}

/// Waits until the JSON record at `path` satisfies `pred`, watching it (no polling), and returns
/// it. Panics with the last value seen after `timeout`.
async fn wait_record<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    coord: &dyn Coordination,
    path: &str,
    timeout: Duration,
    pred: impl Fn(&T) -> bool,
) -> T {
    let mut last = None;
    let waited = tokio::time::timeout(timeout, async {
        loop {
            match coord.exists_watch(path).await {
                Ok((Some(_), watch)) => {
                    let (data, _) = coord.get(path).await.expect("read the record");
                    let value: T = serde_json::from_slice(&data).expect("decode the record");
                    if pred(&value) {
                        return value;
                    }
                    last = Some(value);
                    watch.await;
                }
                Ok((None, watch)) => {
                    watch.await;
                }
                Err(e) if e.is_transient() => {
                    let mut session = coord.subscribe();
                    let _ = session.changed().await;
                }
                Err(e) => panic!("cannot watch {path}: {e}"),
            }
        }
    })
    .await;
    match waited {
        Ok(value) => value,
        Err(_) => panic!("{path} did not reach the expected value within {timeout:?}; last {last:?}"),
    }
}

/// Waits until task `id` is in `state`.
pub async fn wait_state(coord: &dyn Coordination, id: TaskId, state: TaskState, timeout: Duration) -> TaskStatus {
    wait_task(coord, id, timeout, |s| s.state == state).await
}

/// A copy-volume spec numbered `n` (volumes `src-n` -> `dst-n`), for tests whose executor does
/// not touch volumes.
pub fn spec(n: usize) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: VolumeId::new(format!("src-{n}")).unwrap(),
        target_volume: VolumeId::new(format!("dst-{n}")).unwrap(),
        source_hosts: vec!["198.51.100.1:10201".into()],
        target_hosts: vec!["203.0.113.1:10201".into()],
        base_snapshot: None,
        options: CopyOptions::default(),
    })
}
