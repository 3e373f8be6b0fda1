//! Errors of the task store.

use crate::coord::CoordError;
use crate::model::{ModelError, NodeId, TaskId, TaskState};

/// Why a task-store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No task with this id. Final.
    #[error("task {id} not found")]
    NotFound {
        /// The id asked for.
        id: TaskId,
    },
    /// A different task is stored under this id. Final: choose another id.
    #[error("task {id} already exists with a different spec")]
    AlreadyExists {
        /// The id asked for.
        id: TaskId,
    },
    /// Another runner holds the task. Final for this runner; the dispatcher may reassign later.
    #[error("task {id} is claimed by {}", holder.as_ref().map_or("another runner", |h| h.as_str()))]
    Claimed {
        /// The task.
        id: TaskId,
        /// Who holds it, if known.
        holder: Option<NodeId>,
    },
    /// The write was refused because the writer's fence node is gone: it lost the lock or the
    /// leadership it wrote under. Final: the writer must stop acting in that role.
    #[error("write refused: fence {fence} is gone (lock or leadership lost)")]
    Fenced {
        /// The fence node's path.
        fence: String,
    },
    /// Concurrent writers kept changing the record; retries ran out. Transient.
    #[error("task {id}: {record} record kept changing under concurrent writes")]
    Conflict {
        /// The task.
        id: TaskId,
        /// `control` or `status`.
        record: &'static str,
    },
    /// Only a finished (succeeded, failed or canceled) task can be deleted. Final.
    #[error("task {id} is {state}: only a succeeded, failed or canceled task can be deleted")]
    NotFinished {
        /// The task.
        id: TaskId,
        /// Its state.
        state: TaskState,
    },
    /// A claim is still held under the finished task (its runner has not let go yet).
    /// Transient.
    #[error("task {id} still holds a claim; try again")]
    StillClaimed {
        /// The task.
        id: TaskId,
    },
    /// A stored record cannot be decoded. Final until someone repairs it.
    #[error("record {path} is corrupt: {reason}")]
    Corrupt {
        /// The record's path.
        path: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The change is not valid for the task (an illegal transition, a bad field).
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// The coordination service failed; see [`CoordError::is_transient`].
    #[error(transparent)]
    Coord(#[from] CoordError),
}

impl StoreError {
    /// Whether retrying later (with backoff) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Conflict { .. } | StoreError::StillClaimed { .. } => true,
            StoreError::Coord(e) => e.is_transient(),
            _ => false,
        }
    }
}
