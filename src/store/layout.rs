//! The znode layout: the one place that knows where things live in ZooKeeper.
//!
//! All paths are relative to the cluster's chroot (see [`ZkConfig`](crate::coord::ZkConfig)).
//!
//! ```text
//! /tasks                                  parent of all tasks
//! /tasks/<task-id>                        control record (TaskControl)     writer: dispatcher
//! /tasks/<task-id>/status                 status record (TaskStatus)       writers: dispatcher, lock holder (CAS)
//! /tasks/<task-id>/progress               progress record (TaskProgress)   writer: lock holder (fenced)
//! /tasks/<task-id>/locks                  parent of claims
//! /tasks/<task-id>/locks/claim-<token>-<seq>   ephemeral-sequential claim; the lowest sequence owns the task
//! /election/candidate-<token>-<seq>       ephemeral-sequential election candidates; the lowest leads
//! /runners/<node-id>                      ephemeral runner registration (RunnerInfo)
//! /vips/<service>                         VIP configuration (VipConfig)    writer: dispatcher
//! /config/schedule                        the cluster's time zone and default run window
//!                                         (ScheduleSettings)               writer: the first node to start
//! /config/secret-verifier                 one-way verifier of the cluster secret (hex)
//!                                                                          writer: the first node to start
//! ```
//!
//! Sequential names carry a random token before the sequence number, so that a session that lost
//! its connection in the middle of a create can find (and delete) the node it made. Order is by
//! the 10-digit sequence suffix, never by the whole name.

use crate::model::TaskId;

/// Parent of all tasks.
pub const TASKS: &str = "/tasks";
/// Parent of leader-election candidates.
pub const ELECTION: &str = "/election";
/// Parent of runner registrations.
pub const RUNNERS: &str = "/runners";
/// Parent of VIP configurations.
pub const VIPS: &str = "/vips";
/// Parent of each node's VIP report (ephemeral): its routes, what it holds, conflicts.
pub const VIP_STATUS: &str = "/vip-status";
/// Parent of cluster-wide settings.
pub const CONFIG: &str = "/config";
/// The cluster's time zone and default run window, which every node must share.
pub const SCHEDULE: &str = "/config/schedule";
/// A one-way verifier of the cluster's transport credential (the TCP cluster secret).
pub const SECRET_VERIFIER: &str = "/config/secret-verifier";
/// The persistent parents, created when a cluster first starts.
pub const ROOTS: [&str; 6] = [TASKS, ELECTION, RUNNERS, VIPS, VIP_STATUS, CONFIG];

/// Name of a task's status record under its control node.
pub const STATUS: &str = "status";
/// Name of a task's progress record under its control node.
pub const PROGRESS: &str = "progress";
/// Name of a task's claim parent under its control node.
pub const LOCKS: &str = "locks";
/// Prefix of claim nodes.
pub const CLAIM_PREFIX: &str = "claim-";
/// Prefix of election candidate nodes.
pub const CANDIDATE_PREFIX: &str = "candidate-";

/// A task's control record.
pub fn task(id: &TaskId) -> String {
    format!("{TASKS}/{id}")
}

/// A task's status record.
pub fn status(id: &TaskId) -> String {
    format!("{TASKS}/{id}/{STATUS}")
}

/// A task's progress record.
pub fn progress(id: &TaskId) -> String {
    format!("{TASKS}/{id}/{PROGRESS}")
}

/// A task's claim parent.
pub fn locks(id: &TaskId) -> String {
    format!("{TASKS}/{id}/{LOCKS}")
}

/// A runner's registration.
pub fn runner(node: &crate::model::NodeId) -> String {
    format!("{RUNNERS}/{node}")
}

/// A node's VIP report.
pub fn vip_status(node: &crate::model::NodeId) -> String {
    format!("{VIP_STATUS}/{node}")
}

/// A VIP service's configuration.
pub fn vip(service: &str) -> String {
    format!("{VIPS}/{service}")
}

/// What a path under [`TASKS`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskPath {
    /// `/tasks` itself.
    Root,
    /// `/tasks/<id>`: the control record.
    Control(TaskId),
    /// `/tasks/<id>/status`.
    Status(TaskId),
    /// `/tasks/<id>/progress`.
    Progress(TaskId),
    /// `/tasks/<id>/locks` or a claim below it.
    Locks(TaskId),
}

/// Classifies a path under [`TASKS`]; `None` for anything else.
pub fn parse_task_path(path: &str) -> Option<TaskPath> {
    let rest = path.strip_prefix(TASKS)?;
    if rest.is_empty() {
        return Some(TaskPath::Root);
    }
    let mut parts = rest.strip_prefix('/')?.split('/');
    let id: TaskId = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(TaskPath::Control(id)),
        (Some(STATUS), None, _) => Some(TaskPath::Status(id)),
        (Some(PROGRESS), None, _) => Some(TaskPath::Progress(id)),
        (Some(LOCKS), _, None) => Some(TaskPath::Locks(id)),
        _ => None,
    }
}

/// The sequence number of a sequential node's name (its last 10 digits).
pub fn sequence(name: &str) -> Option<u64> {
    let digits = name.get(name.len().checked_sub(10)?..)?;
    if digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// Sorts sequential node names by sequence; names without one go last.
pub fn sort_by_sequence(names: &mut [String]) {
    names.sort_by_key(|name| (sequence(name).unwrap_or(u64::MAX), name.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_paths_round_trip() {
        let id = TaskId::generate();
        assert_eq!(parse_task_path(&task(&id)), Some(TaskPath::Control(id)));
        assert_eq!(parse_task_path(&status(&id)), Some(TaskPath::Status(id)));
        assert_eq!(parse_task_path(&progress(&id)), Some(TaskPath::Progress(id)));
        assert_eq!(parse_task_path(&format!("{}/claim-ab-0000000003", locks(&id))), Some(TaskPath::Locks(id)));
        assert_eq!(parse_task_path(TASKS), Some(TaskPath::Root));
        assert_eq!(parse_task_path("/tasks/not-an-id"), None);
        assert_eq!(parse_task_path("/tasksX"), None);
        assert_eq!(parse_task_path(&format!("{}/other", task(&id))), None);
    }

    #[test]
    fn sequence_order_ignores_the_token() {
        let mut names =
            vec!["claim-zz-0000000010".to_string(), "claim-aa-0000000011".into(), "claim-mm-0000000002".into()];
        sort_by_sequence(&mut names);
        assert_eq!(names, ["claim-mm-0000000002", "claim-zz-0000000010", "claim-aa-0000000011"]);
        assert_eq!(sequence("x"), None);
    }
}
