//! The domain model: ids, task specs, the task lifecycle, progress, run windows, runners and
//! VIPs.
//!
//! Pure data and validation: nothing here does I/O or knows about ZooKeeper. Every type is a
//! serde type whose JSON form is what operators see in ZooKeeper and in `taskctl --json`.
//! Constructors and `validate` methods refuse bad values with a [`ModelError`] that names the
//! field and the value.

mod cluster;
mod error;
mod id;
mod lease;
mod state;
mod task;
mod window;

pub use cluster::{
    check_service_name, check_vip_address, routes_cover, vip_address_states, RoutePrefix, RunnerInfo, VipAddressStatus,
    VipConfig, VipNodeStatus, VipState, MAX_VIPS_PER_SERVICE,
};
pub use error::ModelError;
pub use id::{NodeId, SnapshotId, TaskId, VolumeId, MAX_NAME_BYTES};
pub use lease::WriterLease;
pub use state::{Change, DesiredState, TaskState, TaskStatus, TRANSITIONS};
pub use task::{
    CopyOptions, CopyVolumeSpec, ProgressCounters, RecordVersions, Task, TaskControl, TaskProgress, TaskSpec, Verify,
    DEFAULT_BLOCKS_IN_FLIGHT, DEFAULT_BLOCK_SIZE_BYTES, DEFAULT_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_INTERVAL_MS,
    DEFAULT_EXTENT_SIZE_BYTES, MAX_HOSTS,
};
pub use window::{time_zone, RunWindow, TimeOfDay};
