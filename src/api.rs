//! What a task center is asked, what it answers, and its errors: the typed vocabulary shared by
//! the host handle, the actors and the transport.
//!
//! [`ClientRequest`] is what a host or `taskctl` asks any node; [`PeerRequest`] is what nodes ask
//! each other (a follower forwarding a client request to the leader, the dispatcher assigning a
//! task to a runner). All of them cross the wire, so every type here is serde, with no
//! internally tagged enums (the binary encoding cannot read them).

use serde::{Deserialize, Serialize};

use crate::model::{ModelError, NodeId, RunWindow, RunnerInfo, Task, TaskId, TaskSpec, TaskState, VipConfig};

/// Most tasks one list answer carries.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Which tasks to list. Served from the LMDB mirror through its indexes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks created at or after this time, Unix milliseconds.
    pub created_from_ms: Option<i64>,
    /// Only tasks created before this time, Unix milliseconds.
    pub created_to_ms: Option<i64>,
    /// At most this many tasks, oldest first; capped at [`MAX_LIST_LIMIT`].
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter { state: None, created_from_ms: None, created_to_ms: None, limit: 1000 }
    }
}

/// A request any node accepts; followers forward it to the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Store a new task. `id` is chosen by the client so a retried create is not duplicated.
    Create {
        /// The new task's id.
        id: TaskId,
        /// What to do.
        spec: TaskSpec,
        /// Its daily run window, if any.
        run_window: Option<RunWindow>,
    },
    /// One task.
    Show {
        /// The task.
        id: TaskId,
    },
    /// Tasks matching a filter.
    List(ListFilter),
    /// Stop a task for good.
    Cancel {
        /// The task.
        id: TaskId,
    },
    /// Stop a task at its next block boundary, keeping its progress.
    Pause {
        /// The task.
        id: TaskId,
    },
    /// Let a paused task run again.
    Resume {
        /// The task.
        id: TaskId,
    },
    /// Set or clear a task's run window.
    SetRunWindow {
        /// The task.
        id: TaskId,
        /// The new window; `None` clears it.
        run_window: Option<RunWindow>,
    },
    /// The live runners.
    ListRunners,
    /// Set (create or replace) the virtual IPs of a service.
    SetVip(VipConfig),
    /// Remove a service's virtual IPs.
    DeleteVip {
        /// The service.
        service: String,
    },
    /// Every service's virtual IPs, and who holds them.
    ListVips,
    /// Delete a finished (succeeded, failed or canceled) task and its records.
    Delete {
        /// The task.
        id: TaskId,
    },
}

impl ClientRequest {
    /// Whether the request changes something (and so must reach the leader).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            ClientRequest::Show { .. } | ClientRequest::List(_) | ClientRequest::ListRunners | ClientRequest::ListVips
        )
    }
}

/// The answer to a [`ClientRequest`].
// Replies are moved once, from the leader to the caller; boxing the task would cost an allocation
// per answer for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    /// One task, as stored (after the change, for a change).
    Task(Task),
    /// Tasks, oldest first.
    Tasks(Vec<Task>),
    /// Live runners with the number of tasks each runs.
    Runners(Vec<RunnerLoad>),
    /// VIP configurations, by service.
    Vips(Vec<VipStatus>),
}

/// A service's virtual IPs and where they live, from what each live node reports its
/// interfaces hold (not from who should hold them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    /// The configuration.
    pub config: VipConfig,
    /// The node whose interfaces hold every address of the service, if exactly one does.
    pub holder: Option<NodeId>,
    /// Each address: its holders, its state (placed, conflict, no route, disabled, unplaced)
    /// and notes (conflicting hardware addresses, errors).
    pub addresses: Vec<crate::model::VipAddressStatus>,
}

/// A runner and its load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerLoad {
    /// What the runner registered.
    pub info: RunnerInfo,
    /// Tasks it runs now.
    pub running: u32,
}

/// A request between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// A client request from outside the cluster (`taskctl`, a host's other processes): a
    /// follower forwards it to the leader.
    Client(ClientRequest),
    /// A client request a follower forwarded: served by the leader, never forwarded again.
    Forwarded(ClientRequest),
    /// The dispatcher asks a runner to claim and run a task.
    Assign {
        /// The task.
        id: TaskId,
    },
    /// The dispatcher tells a runner that a task's control record changed (pause, cancel, run
    /// window); the runner re-reads it. The runner also watches the record itself.
    ControlChanged {
        /// The task.
        id: TaskId,
    },
    /// Liveness and identity check.
    Ping,
}

/// The answer to a [`PeerRequest`].
#[allow(clippy::large_enum_variant)] // see ClientReply
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerReply {
    /// Answer to [`PeerRequest::Client`] and [`PeerRequest::Forwarded`].
    Client(Result<ClientReply, ApiError>),
    /// Answer to [`PeerRequest::Assign`]: `Ok` once the runner holds the task's claim.
    Assign(Result<(), ApiError>),
    /// Answer to [`PeerRequest::ControlChanged`].
    Ack,
    /// Answer to [`PeerRequest::Ping`].
    Pong {
        /// The answering node.
        node: NodeId,
    },
}

/// Why a request failed. Says what was wrong, and whether retrying can help
/// ([`ApiError::is_transient`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// Bad input; nothing was changed. Final.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The task is in a state from which the change is not possible. Nothing was changed. Final.
    #[error("task {id} is {state}: cannot {action}")]
    WrongState {
        /// The task.
        id: TaskId,
        /// Its state.
        state: TaskState,
        /// What was asked.
        action: String,
    },
    /// No such task. Final.
    #[error("task {id} not found")]
    NotFound {
        /// The id asked for.
        id: TaskId,
    },
    /// No VIP configuration for this service. Final.
    #[error("no virtual IPs configured for service {service:?}")]
    NoSuchVip {
        /// The service asked for.
        service: String,
    },
    /// Another task is stored under this id. Final.
    #[error("task {id} already exists with a different spec")]
    AlreadyExists {
        /// The id.
        id: TaskId,
    },
    /// This node does not lead; ask the leader. Transient (followers retry for you).
    #[error("not the leader{}", leader.as_ref().map(|l| format!(" (leader is at {l})")).unwrap_or_default())]
    NotLeader {
        /// The leader's address, if known.
        leader: Option<String>,
    },
    /// The runner will not take the task (claimed elsewhere, full, shutting down). Transient
    /// for the dispatcher, which assigns again later.
    #[error("runner refused: {0}")]
    Refused(String),
    /// The cluster cannot serve now (no leader, coordination unreachable, peer unreachable).
    /// Transient.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The node is shutting down. Transient: ask another node.
    #[error("node is shutting down")]
    ShuttingDown,
    /// Something that should not happen; the message says what. Final.
    #[error("internal error: {0}")]
    Internal(String),
    /// The node is up but the coordination service (ZooKeeper) did not answer it, or its session
    /// is being re-established. Transient: retry; the problem is ZooKeeper, not the node.
    #[error("coordination service (ZooKeeper) unavailable, retry: {0}")]
    CoordinationUnavailable(String),
}

impl ApiError {
    /// Whether retrying later (elsewhere, or after a leader change) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::NotLeader { .. }
                | ApiError::Refused(_)
                | ApiError::Unavailable(_)
                | ApiError::ShuttingDown
                | ApiError::CoordinationUnavailable(_)
        )
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid { field, value, reason } => {
                ApiError::Invalid { field: field.to_string(), value, reason: reason.to_string() }
            }
            ModelError::IllegalTransition { from, to } => ApiError::Invalid {
                field: "state".into(),
                value: to.to_string(),
                reason: format!("a {from} task cannot become {to}"),
            },
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::NotFound { id } => ApiError::NotFound { id },
            StoreError::AlreadyExists { id } => ApiError::AlreadyExists { id },
            StoreError::Invalid(e) => e.into(),
            StoreError::Fenced { .. } => ApiError::NotLeader { leader: None },
            // Transient, but the coordination service is fine: the task is busy.
            e @ (StoreError::Conflict { .. } | StoreError::StillClaimed { .. }) => ApiError::Unavailable(e.to_string()),
            StoreError::NotFinished { id, state } => {
                ApiError::WrongState { id, state, action: "delete (only a finished task can be)".into() }
            }
            e if e.is_transient() => ApiError::CoordinationUnavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}
