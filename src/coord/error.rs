//! Errors of coordination calls.

/// Why a coordination call failed.
///
/// `ConnectionLoss` and `SessionExpired` are transient: retry with backoff (after an expiry the
/// handle builds a new session by itself). For writes, `ConnectionLoss` leaves the outcome
/// unknown: read back before retrying a non-idempotent write. The rest are answers about the
/// data and a retry of the same call gives the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// The node does not exist (or, for create, its parent does not).
    #[error("no node {path}")]
    NoNode {
        /// The path asked for.
        path: String,
    },
    /// The node already exists.
    #[error("node {path} exists already")]
    NodeExists {
        /// The path asked for.
        path: String,
    },
    /// The node is not at the expected version: someone else wrote it first.
    #[error("node {path} is not at the expected version")]
    BadVersion {
        /// The path asked for.
        path: String,
    },
    /// The node has children and cannot be deleted.
    #[error("node {path} has children")]
    NotEmpty {
        /// The path asked for.
        path: String,
    },
    /// Ephemeral nodes cannot have children.
    #[error("node {path} is ephemeral and cannot have children")]
    NoChildrenForEphemerals {
        /// The path asked for.
        path: String,
    },
    /// The path is not a valid path.
    #[error("bad path {path:?}: {reason}")]
    BadPath {
        /// The path given.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The data is larger than [`MAX_DATA_BYTES`](super::MAX_DATA_BYTES).
    #[error("data for {path} is {bytes} bytes, more than a node holds")]
    TooLarge {
        /// The path asked for.
        path: String,
        /// Size of the data.
        bytes: usize,
    },
    /// Operation `index` of an atomic multi failed; nothing was applied.
    #[error("operation {index} of multi failed: {source}")]
    OpFailed {
        /// Index of the first failing operation.
        index: usize,
        /// Why it failed.
        #[source]
        source: Box<CoordError>,
    },
    /// No connection to the service right now. Transient; a write's outcome is unknown.
    #[error("connection to the coordination service lost")]
    ConnectionLoss,
    /// The session expired. Transient: the handle builds a new one.
    #[error("coordination session expired")]
    SessionExpired,
    /// No session could be established within the timeout. Transient.
    #[error("coordination service did not answer in time: {0}")]
    Timeout(String),
    /// The handle was closed. Final.
    #[error("coordination handle closed")]
    Closed,
    /// Anything else the service reported. Final.
    #[error("coordination service error: {0}")]
    Other(String),
}

impl CoordError {
    /// Whether retrying later (with backoff) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CoordError::ConnectionLoss | CoordError::SessionExpired | CoordError::Timeout(_) => true,
            CoordError::OpFailed { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// The error of the failing operation for a failed multi, the error itself otherwise.
    pub fn root(&self) -> &CoordError {
        match self {
            CoordError::OpFailed { source, .. } => source.root(),
            other => other,
        }
    }
}
