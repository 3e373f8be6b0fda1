//! Identifiers: tasks, nodes, volumes, snapshots.
//!
//! Names that end up in znode paths or file names (node ids, volume ids, snapshot ids) are
//! restricted to `[A-Za-z0-9._-]`, 1 to 128 bytes, not `.` or `..`, so that no value can
//! escape its directory or split a path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Identifier of a task: a UUIDv7, so ids sort by creation time.
///
/// Ids are chosen by the client that submits the task (see [`TaskId::generate`]); a client that
/// retries a create after a lost answer sends the same id and gets the stored task back instead
/// of a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    /// A new, time-ordered id.
    pub fn generate() -> Self {
        TaskId(uuid::Uuid::now_v7())
    }

    /// The id's 16 bytes, big-endian: the key under which the cache stores the task.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The id from its 16 bytes (see [`TaskId::as_bytes`]).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        TaskId(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        uuid::Uuid::try_parse(s)
            .map(TaskId)
            .map_err(|_| ModelError::invalid("task id", s, "not a UUID like 0190b6d2-7c3e-7a51-9d3c-2f7e4c1a9b00"))
    }
}

impl TryFrom<String> for TaskId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, ModelError> {
        s.parse()
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.to_string()
    }
}

/// Longest name accepted for node, volume and snapshot ids, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

pub(crate) fn validate_name(field: &'static str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(ModelError::invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(ModelError::invalid(field, value, "longer than 128 bytes"));
    }
    if value == "." || value == ".." {
        return Err(ModelError::invalid(field, value, "must not be . or .."));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return Err(ModelError::invalid(field, value, "only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name (`[A-Za-z0-9._-]`, 1 to 128 bytes).
            pub fn new(value: impl Into<String>) -> Result<Self, ModelError> {
                let value = value.into();
                validate_name($field, &value)?;
                Ok($name(value))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ModelError;
            fn from_str(s: &str) -> Result<Self, ModelError> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ModelError;
            fn try_from(s: String) -> Result<Self, ModelError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

name_type!(
    /// Identifier of a task-server node; also the name of its runner registration znode.
    NodeId,
    "node id"
);
name_type!(
    /// Identifier of a volume in a block service (the copy backend resolves it).
    VolumeId,
    "volume id"
);
name_type!(
    /// Identifier of a snapshot of a volume.
    SnapshotId,
    "snapshot id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_and_sort_by_creation() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert!(a < b, "UUIDv7 ids sort by creation time");
        assert_eq!(a.to_string().parse::<TaskId>().unwrap(), a);
        assert_eq!(TaskId::from_bytes(*a.as_bytes()), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), a);
    }

    #[test]
    fn bad_task_id_names_the_value() {
        let err = "not-a-uuid".parse::<TaskId>().unwrap_err();
        assert!(err.to_string().contains("\"not-a-uuid\""), "{err}");
        assert!(serde_json::from_str::<TaskId>("\"zzz\"").is_err());
    }

    #[test]
    fn names_refuse_path_tricks() {
        for bad in ["", ".", "..", "a/b", "a b", "vol\0", &"x".repeat(129)] {
            let err = VolumeId::new(bad).unwrap_err();
            assert!(matches!(err, ModelError::Invalid { field: "volume id", .. }), "{bad:?}: {err}");
        }
        assert_eq!(NodeId::new("node-1.rack_2").unwrap().as_str(), "node-1.rack_2");
        assert!(serde_json::from_str::<NodeId>("\"../etc\"").is_err());
    }
}
