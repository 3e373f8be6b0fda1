//! One task per target: which pending tasks must wait because another task holds their target.
//!
//! Two copies writing one volume leave it a mix of both sources, and neither target snapshot
//! equal to its source. So the dispatcher runs at most one task per target volume, and the rule
//! is a **queue**: among the tasks that are not finished (pending, running or paused) and name
//! the same target volume on overlapping target hosts (two host lists that share a host reach the
//! same block service), a task that is already running or paused holds the target whatever its
//! age; otherwise the **oldest** may run. The others stay pending, with a note that names the
//! task they wait for, and start in creation order as each one ahead finishes, fails or is
//! canceled. A paused task keeps its place: its half-written target is its own until it ends.
//! Age is the creation transaction (the record's incarnation; an unknown one, 0, counts as the
//! youngest), then the creation time and the id, so every node that mirrored the same history
//! picks the same holder.
//!
//! This is the dispatcher's rule; the storage's writer leases are the second line (see
//! [`crate::copy`]).
//!
//! A pure function: tasks in, decisions out.

use std::collections::HashMap;

use crate::model::{Task, TaskId, TaskSpec, TaskState, VolumeId};

/// The target of a task: its volume and the hosts that serve it.
fn target(task: &Task) -> (&VolumeId, &[String]) {
    let TaskSpec::CopyVolume(spec) = &task.control.spec;
    (&spec.target_volume, &spec.target_hosts)
}

/// Whether two tasks write the same target: the same volume on host lists that share a host (or
/// both empty).
pub fn same_target(a: &Task, b: &Task) -> bool {
    let ((va, ha), (vb, hb)) = (target(a), target(b));
    va == vb && ((ha.is_empty() && hb.is_empty()) || ha.iter().any(|h| hb.contains(h)))
}

/// Order of precedence: tasks that hold their target already (running, paused) first, then by
/// age; an unknown incarnation (0) counts as the youngest.
fn age(task: &Task) -> (bool, i64, i64, TaskId) {
    let holds = matches!(task.state(), TaskState::Running | TaskState::Paused);
    let incarnation = if task.versions.incarnation == 0 { i64::MAX } else { task.versions.incarnation };
    (!holds, incarnation, task.control.created_at_ms, task.id)
}

/// For each task of `unfinished` (every pending, running and paused task) that must wait, the
/// older unfinished task with the same target it waits for (the oldest such).
pub fn blocked(unfinished: &[&Task]) -> HashMap<TaskId, TaskId> {
    let mut by_volume: HashMap<&VolumeId, Vec<&Task>> = HashMap::new();
    for task in unfinished {
        by_volume.entry(target(task).0).or_default().push(task);
    }
    let mut waits = HashMap::new();
    for tasks in by_volume.values_mut() {
        if tasks.len() < 2 {
            continue;
        }
        tasks.sort_by_key(|task| age(task));
        for (i, task) in tasks.iter().enumerate() {
            if let Some(holder) = tasks[..i].iter().find(|older| same_target(older, task)) {
                waits.insert(task.id, holder.id);
            }
        }
    }
    waits
}

/// The note on a task that waits for `holder`.
pub fn waiting_note(task: &Task, holder: &TaskId) -> String {
    let (volume, hosts) = target(task);
    format!("queued behind task {holder}, which holds target volume {volume} on {}", hosts.join(","))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{CopyOptions, CopyVolumeSpec, RecordVersions, TaskControl, TaskProgress, TaskStatus};

    fn task(incarnation: i64, volume: &str, hosts: &[&str]) -> Task {
        let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
            source_volume: VolumeId::new("src").unwrap(),
            target_volume: VolumeId::new(volume).unwrap(),
            source_hosts: vec!["198.51.100.1:1".into()],
            target_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            base_snapshot: None,
            options: CopyOptions::default(),
        });
        Task {
            id: TaskId::generate(),
            control: TaskControl::new(spec, None, 0),
            status: TaskStatus::pending(0),
            progress: TaskProgress::default(),
            versions: RecordVersions { incarnation, ..RecordVersions::default() },
        }
    }

    #[test]
    fn a_running_task_holds_its_target_whatever_its_age_and_unknown_ages_come_last() {
        let mut running = task(30, "vol-d", &["h1"]);
        running.status.state = TaskState::Running;
        let older = task(10, "vol-d", &["h1"]);
        let unknown = task(0, "vol-d", &["h1"]);
        let waits = blocked(&[&older, &running, &unknown]);
        assert_eq!(waits.get(&older.id), Some(&running.id));
        assert_eq!(waits.get(&unknown.id), Some(&running.id));
        assert!(!waits.contains_key(&running.id));
        let waits = blocked(&[&unknown, &older]);
        assert_eq!(waits.get(&unknown.id), Some(&older.id), "an unknown age is the youngest");
    }

    #[test]
    fn the_oldest_holds_the_target_and_others_queue_behind_it() {
        let a = task(10, "vol-d", &["h1"]);
        let b = task(20, "vol-d", &["h2", "h1"]);
        let c = task(5, "vol-d", &["h3"]);
        let d = task(1, "vol-e", &["h1"]);
        let waits = blocked(&[&b, &a, &c, &d]);
        assert_eq!(waits.len(), 1, "{waits:?}");
        assert_eq!(waits[&b.id], a.id);
        assert!(waiting_note(&b, &a.id).contains(&a.id.to_string()));
    }

    proptest! {
        /// Whatever the tasks, no two tasks that share a target are both free to run, a task waits
        /// only for an older one with its target, and a task with no older one is free (so the
        /// queue always moves).
        #[test]
        fn never_two_free_tasks_on_one_target(specs in proptest::collection::vec((0i64..50, 0usize..3, proptest::collection::vec(0usize..4, 0..3)), 0..24)) {
            let volumes = ["v0", "v1", "v2"];
            let hosts = ["h0", "h1", "h2", "h3"];
            let tasks: Vec<Task> = specs
                .iter()
                .map(|(inc, v, hs)| task(*inc, volumes[*v], &hs.iter().map(|h| hosts[*h]).collect::<Vec<_>>()))
                .collect();
            let refs: Vec<&Task> = tasks.iter().collect();
            let waits = blocked(&refs);
            let free: Vec<&Task> = tasks.iter().filter(|t| !waits.contains_key(&t.id)).collect();
            for (i, a) in free.iter().enumerate() {
                for b in &free[i + 1..] {
                    prop_assert!(!same_target(a, b), "two free tasks share a target");
                }
            }
            for t in &tasks {
                if let Some(holder) = waits.get(&t.id) {
                    let holder = tasks.iter().find(|h| h.id == *holder).unwrap();
                    prop_assert!(age(holder) < age(t) && same_target(holder, t));
                }
                let first = !tasks.iter().any(|o| o.id != t.id && same_target(o, t) && age(o) < age(t));
                prop_assert_eq!(first, !waits.contains_key(&t.id));
            }
        }
    }
}
