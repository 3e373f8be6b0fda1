//! The task lifecycle: states, the one transition table, and what an operator asked for.
//!
//! ```text
//!            assign              succeed / fail / cancel
//!  Pending ─────────▶ Running ─────────────────────────▶ Succeeded | Failed | Canceled
//!    ▲  │ ◀───────────  │  │
//!    │  │ runner lost,  │  │ pause (acknowledged at a block boundary)
//!    │  │ released      │  ▼
//!    │  └── pause ───▶ Paused ── cancel ──▶ Canceled
//!    └──── resume ─────┘
//! ```
//!
//! Every state change in the crate goes through [`TaskState::check_transition`]; a change the
//! table does not list is refused with [`ModelError::IllegalTransition`].

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{ModelError, NodeId};

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted and stored, waiting for a runner (or for its run window).
    Pending,
    /// Claimed by a runner, which holds the task's lock.
    Running,
    /// Stopped by an operator; keeps its progress and resumes from it.
    Paused,
    /// Finished; the result is in the progress record.
    Succeeded,
    /// Finished without success; the status carries the reason.
    Failed,
    /// Stopped for good by an operator.
    Canceled,
}

/// The legal transitions, `(from, to)`. The only place that says how a task may move.
pub const TRANSITIONS: &[(TaskState, TaskState)] = {
    use TaskState::*;
    &[
        (Pending, Running),   // a runner claimed the task
        (Pending, Paused),    // paused before it ran
        (Pending, Canceled),  // canceled before it ran
        (Pending, Failed),    // refused before it ran (for instance no backend for its kind)
        (Running, Pending),   // its runner vanished or released it at shutdown
        (Running, Paused),    // the runner stopped at a block boundary after a pause
        (Running, Succeeded), // done
        (Running, Failed),    // a permanent error
        (Running, Canceled),  // the runner stopped after a cancel
        (Paused, Pending),    // resumed
        (Paused, Canceled),   // canceled while paused
    ]
};

impl TaskState {
    /// All states, in lifecycle order.
    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Paused,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Canceled,
    ];

    /// Whether the task is finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Canceled)
    }

    /// Refuses a change that [`TRANSITIONS`] does not list.
    pub fn check_transition(self, to: TaskState) -> Result<(), ModelError> {
        if TRANSITIONS.contains(&(self, to)) {
            Ok(())
        } else {
            Err(ModelError::IllegalTransition { from: self, to })
        }
    }

    /// A small stable number for the state, used as a key prefix in the cache's state index.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The state's lower-case name, as printed and parsed.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Canceled => "canceled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            ModelError::invalid("task state", s, "expected pending, running, paused, succeeded, failed or canceled")
        })
    }
}

/// What an operator asked the task to do. Written only by the dispatcher, in the control record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Run (to completion, inside its window).
    #[default]
    Run,
    /// Stop at the next block boundary and keep the progress.
    Pause,
    /// Stop for good.
    Cancel,
}

/// The observed state of a task, with who runs it and why it is where it is.
///
/// Stored in its own record; every change is a [`TaskStatus::transition`] written with a
/// version check, so two writers can never both win.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The state.
    pub state: TaskState,
    /// The runner that holds (or last held) the task.
    pub runner: Option<NodeId>,
    /// Why the task failed; set exactly when `state` is [`TaskState::Failed`].
    pub reason: Option<String>,
    /// Why a pending or running task is not moving, for people (`waiting for run window, opens
    /// 01:00 Asia/Shanghai`).
    pub waiting: Option<String>,
    /// How many times a runner has claimed the task.
    pub attempts: u32,
    /// When the status last changed, Unix milliseconds.
    pub updated_at_ms: i64,
}

impl TaskStatus {
    /// The status of a task just accepted.
    pub fn pending(now_ms: i64) -> Self {
        TaskStatus {
            state: TaskState::Pending,
            runner: None,
            reason: None,
            waiting: None,
            attempts: 0,
            updated_at_ms: now_ms,
        }
    }

    /// The status after moving to `to`, if the table allows it. Moving to `Running` records the
    /// runner and counts an attempt; moving to `Failed` records the reason; any move clears the
    /// waiting note.
    pub fn transition(&self, to: TaskState, change: Change, now_ms: i64) -> Result<TaskStatus, ModelError> {
        self.state.check_transition(to)?;
        let mut next = TaskStatus { state: to, waiting: None, updated_at_ms: now_ms, ..self.clone() };
        match (to, change) {
            (TaskState::Running, Change::Claimed(runner)) => {
                next.runner = Some(runner);
                next.attempts += 1;
            }
            (TaskState::Running, _) => {
                return Err(ModelError::invalid(
                    "status change",
                    format!("{to}"),
                    "moving to running needs the claiming runner",
                ))
            }
            (TaskState::Failed, Change::Failed(reason)) => next.reason = Some(reason),
            (TaskState::Failed, _) => {
                return Err(ModelError::invalid("status change", format!("{to}"), "moving to failed needs a reason"))
            }
            (_, Change::Plain) => {}
            (_, other) => {
                return Err(ModelError::invalid("status change", format!("{other:?}"), "does not fit the target state"))
            }
        }
        if to != TaskState::Failed {
            next.reason = None;
        }
        Ok(next)
    }
}

/// What comes with a state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing more than the state.
    Plain,
    /// To `Running`: the runner that claimed the task.
    Claimed(NodeId),
    /// To `Failed`: why.
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in [Succeeded, Failed, Canceled] {
            for to in TaskState::ALL {
                assert!(from.check_transition(to).is_err(), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_table_allows_the_lifecycle_and_nothing_else() {
        let legal = |from: TaskState, to| from.check_transition(to).is_ok();
        assert!(legal(Pending, Running) && legal(Running, Succeeded) && legal(Running, Pending));
        assert!(legal(Running, Paused) && legal(Paused, Pending) && legal(Paused, Canceled));
        assert!(!legal(Paused, Running), "a resumed task goes back through pending");
        assert!(!legal(Pending, Succeeded) && !legal(Running, Running));
        let count =
            TaskState::ALL.iter().flat_map(|f| TaskState::ALL.map(|t| (*f, t))).filter(|(f, t)| legal(*f, *t)).count();
        assert_eq!(count, TRANSITIONS.len());
    }

    #[test]
    fn transitions_carry_runner_and_reason() {
        let node = NodeId::new("n1").unwrap();
        let s = TaskStatus::pending(1);
        let running = s.transition(Running, Change::Claimed(node.clone()), 2).unwrap();
        assert_eq!((running.runner.as_ref(), running.attempts), (Some(&node), 1));
        assert!(s.transition(Running, Change::Plain, 2).is_err());
        assert!(running.transition(Failed, Change::Plain, 3).is_err());
        let failed = running.transition(Failed, Change::Failed("disk gone".into()), 3).unwrap();
        assert_eq!(failed.reason.as_deref(), Some("disk gone"));
        let err = failed.transition(Pending, Change::Plain, 4).unwrap_err();
        assert_eq!(err, ModelError::IllegalTransition { from: Failed, to: Pending });
        assert_eq!(err.to_string(), "illegal task state transition failed -> pending");
    }

    #[test]
    fn state_names_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
        assert!("done".parse::<TaskState>().is_err());
    }
}
