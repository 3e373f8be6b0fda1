//! Validation errors of the domain model.

use super::TaskState;

/// Why a value of the domain model was refused.
///
/// Every variant names the field and the value that was wrong, so a person reading the error at
/// 3 a.m. knows what to fix. None of these errors can be cured by retrying the same input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A field held a value that is not valid for it.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field, as a user names it (`task id`, `source_volume`, `run window`, ...).
        field: &'static str,
        /// The value that was refused, as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A task state change that the transition table does not allow.
    #[error("illegal task state transition {from} -> {to}")]
    IllegalTransition {
        /// The state the task is in.
        from: TaskState,
        /// The state that was asked for.
        to: TaskState,
    },
}

impl ModelError {
    pub(crate) fn invalid(field: &'static str, value: impl Into<String>, reason: &'static str) -> Self {
        ModelError::Invalid { field, value: value.into(), reason }
    }
}
