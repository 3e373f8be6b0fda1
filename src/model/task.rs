//! Tasks: what to do (spec), what operators asked (control), how far it got (progress).
//!
//! A task lives in three records with one writer role each (see `ARCHITECTURE.md`):
//! [`TaskControl`] is written only by the dispatcher, [`TaskProgress`] only by the runner that
//! holds the task's lock, and [`TaskStatus`](super::TaskStatus) by either, through the
//! transition table and a version check. [`Task`] is the joined view that readers get.

use serde::{Deserialize, Serialize};

use super::{DesiredState, ModelError, RunWindow, SnapshotId, TaskId, TaskState, TaskStatus, VolumeId};

/// Default extent size: the unit of progress commits (256 MiB, a ZBS extent).
pub const DEFAULT_EXTENT_SIZE_BYTES: u64 = 256 << 20;
/// Default block size: the unit of comparison, skipping, pause and cancel (64 KiB).
pub const DEFAULT_BLOCK_SIZE_BYTES: u32 = 64 << 10;
/// Default number of blocks read or written concurrently by one copy.
pub const DEFAULT_BLOCKS_IN_FLIGHT: u32 = 16;
/// Default checkpoint size: progress is committed at least every this many bytes of the volume
/// walked, inside an extent too (64 MiB).
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Default checkpoint interval: progress is committed at least this often while a copy runs
/// (10 s).
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 10_000;
/// Most hosts a volume endpoint may list.
pub const MAX_HOSTS: usize = 16;

/// What a task does. Externally tagged (`{"copy_volume": {...}}`), which both JSON and the
/// binary wire encoding (postcard, which cannot read internally tagged enums) support.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskSpec {
    /// Copy a source volume's snapshot to a target volume.
    CopyVolume(CopyVolumeSpec),
}

impl TaskSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            TaskSpec::CopyVolume(spec) => spec.validate(),
        }
    }

    /// The kind's name, as printed (`copy_volume`).
    pub fn kind(&self) -> &'static str {
        match self {
            TaskSpec::CopyVolume(_) => "copy_volume",
        }
    }
}

/// Copy the snapshot of a source volume to a target volume, possibly in another cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyVolumeSpec {
    /// The volume to copy from; the copy reads a snapshot taken when the task starts.
    pub source_volume: VolumeId,
    /// The volume to copy to.
    pub target_volume: VolumeId,
    /// Endpoints of the source block service (`host:port` or the backend's own form).
    pub source_hosts: Vec<String>,
    /// Endpoints of the target block service.
    pub target_hosts: Vec<String>,
    /// A snapshot of the source that the target already holds: only blocks that differ from it
    /// are copied (incremental copy). `None` copies everything that is allocated.
    pub base_snapshot: Option<SnapshotId>,
    /// How to copy.
    #[serde(default)]
    pub options: CopyOptions,
}

impl CopyVolumeSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_hosts("source_hosts", &self.source_hosts)?;
        validate_hosts("target_hosts", &self.target_hosts)?;
        if self.source_volume == self.target_volume && self.source_hosts == self.target_hosts {
            return Err(ModelError::invalid(
                "target_volume",
                self.target_volume.as_str(),
                "is the source volume on the same hosts",
            ));
        }
        self.options.validate()
    }
}

fn validate_hosts(field: &'static str, hosts: &[String]) -> Result<(), ModelError> {
    if hosts.is_empty() {
        return Err(ModelError::invalid(field, "", "needs at least one host"));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(ModelError::invalid(field, hosts.join(","), "lists more than 16 hosts"));
    }
    for host in hosts {
        if host.is_empty() || host.len() > 255 || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(ModelError::invalid(
                field,
                host.as_str(),
                "a host is empty, too long, or holds spaces or commas",
            ));
        }
    }
    Ok(())
}

/// Per-extent checksum used to verify a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// BLAKE3, cryptographic.
    Blake3,
    /// XXH3-128, fast, not cryptographic.
    Xxh3,
}

/// How a copy runs. Every field has a default; see the constants of this module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CopyOptions {
    /// Unit of progress commits; a multiple of `block_size_bytes`. Default 256 MiB.
    pub extent_size_bytes: u64,
    /// Unit of comparison and of pause/cancel; a power of two from 4 KiB to 16 MiB. Default 64 KiB.
    pub block_size_bytes: u32,
    /// Blocks read or written concurrently, 1 to 1024. Default 16.
    pub blocks_in_flight: u32,
    /// Bandwidth cap in bytes per second; `None` for no cap.
    pub bandwidth_limit_bytes_per_second: Option<u64>,
    /// Verify each extent on both sides and record a whole-volume digest.
    pub verify: Option<Verify>,
    /// With no base snapshot: read the target and write only blocks that differ.
    pub target_diff: bool,
    /// A step (and so a progress commit) ends at least every this many bytes of the volume
    /// walked, inside an extent too; a multiple of `block_size_bytes`. Default 64 MiB.
    pub checkpoint_bytes: u64,
    /// A step ends at least this often, in milliseconds, 100 to 3,600,000. Default 10 s.
    pub checkpoint_interval_ms: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            extent_size_bytes: DEFAULT_EXTENT_SIZE_BYTES,
            block_size_bytes: DEFAULT_BLOCK_SIZE_BYTES,
            blocks_in_flight: DEFAULT_BLOCKS_IN_FLIGHT,
            bandwidth_limit_bytes_per_second: None,
            verify: None,
            target_diff: false,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            checkpoint_interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
        }
    }
}

impl CopyOptions {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        let block = self.block_size_bytes;
        if !block.is_power_of_two() || !(4096..=16 << 20).contains(&block) {
            return Err(ModelError::invalid(
                "block_size_bytes",
                block.to_string(),
                "must be a power of two from 4096 to 16777216",
            ));
        }
        let extent = self.extent_size_bytes;
        if extent == 0 || extent % u64::from(block) != 0 || extent > 4 << 30 {
            return Err(ModelError::invalid(
                "extent_size_bytes",
                extent.to_string(),
                "must be a non-zero multiple of block_size_bytes, at most 4 GiB",
            ));
        }
        if !(1..=1024).contains(&self.blocks_in_flight) {
            return Err(ModelError::invalid(
                "blocks_in_flight",
                self.blocks_in_flight.to_string(),
                "must be 1 to 1024",
            ));
        }
        let checkpoint = self.checkpoint_bytes;
        if checkpoint == 0 || checkpoint % u64::from(block) != 0 {
            return Err(ModelError::invalid(
                "checkpoint_bytes",
                checkpoint.to_string(),
                "must be a non-zero multiple of block_size_bytes",
            ));
        }
        if !(100..=3_600_000).contains(&self.checkpoint_interval_ms) {
            return Err(ModelError::invalid(
                "checkpoint_interval_ms",
                self.checkpoint_interval_ms.to_string(),
                "must be 100 to 3600000",
            ));
        }
        if self.bandwidth_limit_bytes_per_second == Some(0) {
            return Err(ModelError::invalid(
                "bandwidth_limit_bytes_per_second",
                "0",
                "must be positive; omit it for no limit",
            ));
        }
        Ok(())
    }
}

/// The control record: what the task is and what operators asked of it. Dispatcher-written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskControl {
    /// What to do.
    pub spec: TaskSpec,
    /// When the task was accepted, Unix milliseconds.
    pub created_at_ms: i64,
    /// The daily window in which the task may run; `None` for the cluster default.
    pub run_window: Option<RunWindow>,
    /// What operators asked for.
    pub desired: DesiredState,
    /// When an operator last changed this record, Unix milliseconds.
    pub updated_at_ms: i64,
}

impl TaskControl {
    /// The control record of a task accepted now.
    pub fn new(spec: TaskSpec, run_window: Option<RunWindow>, now_ms: i64) -> Self {
        TaskControl { spec, created_at_ms: now_ms, run_window, desired: DesiredState::Run, updated_at_ms: now_ms }
    }
}

/// Byte counters of a copy; they add up to the cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressCounters {
    /// Bytes read from the source and written to the target.
    pub bytes_copied: u64,
    /// Bytes skipped because the source had a hole there.
    pub bytes_skipped_hole: u64,
    /// Bytes skipped because the source held zeroes there.
    pub bytes_skipped_zero: u64,
    /// Bytes skipped because they equal the base snapshot (or the target, in target-diff mode).
    pub bytes_skipped_unchanged: u64,
}

impl ProgressCounters {
    /// All bytes accounted for.
    pub fn total(&self) -> u64 {
        self.bytes_copied + self.bytes_skipped_hole + self.bytes_skipped_zero + self.bytes_skipped_unchanged
    }
}

/// The progress record: how far the task got. Written only by the runner holding the lock,
/// fenced on that lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Resume cursor: every byte below it is committed on the target (a high-water mark; the
    /// next runner starts here).
    pub cursor_bytes: u64,
    /// Size of the work, once known.
    pub total_bytes: Option<u64>,
    /// What happened to the bytes below the cursor.
    pub counters: ProgressCounters,
    /// The source snapshot the copy reads; fixed at the first start so a resume reads the same
    /// bytes.
    pub source_snapshot: Option<SnapshotId>,
    /// The digest chain of a verified copy over the extents below the cursor (see
    /// `copy::engine`); the whole-volume digest once the copy succeeded.
    pub digest: Option<String>,
    /// How fast the cursor moved over the current run, in bytes of the volume per second (holes
    /// and unchanged blocks included, so a sparse or incremental copy goes far faster than its
    /// payload, and a bandwidth limit caps `bytes_copied`, not this): what an ETA divides by.
    pub rate_bytes_per_second: u64,
    /// When the record was last written, Unix milliseconds.
    pub updated_at_ms: i64,
}

/// Versions of a task's three records, as read; used for compare-and-set writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordVersions {
    /// Which incarnation of the task the versions count in: the transaction id that created its
    /// control record (0 when not known, as in the answer to a create). A task deleted and created
    /// again under the same id starts its versions from 0 in a new incarnation.
    #[serde(default)]
    pub incarnation: i64,
    /// Version of the control record.
    pub control: i32,
    /// Version of the status record.
    pub status: i32,
    /// Version of the progress record.
    pub progress: i32,
}

/// A task as readers see it: the three records joined, with their versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The id.
    pub id: TaskId,
    /// Spec, run window, desired state.
    pub control: TaskControl,
    /// State, runner, reason.
    pub status: TaskStatus,
    /// Cursor and counters.
    pub progress: TaskProgress,
    /// The records' versions when read.
    pub versions: RecordVersions,
}

impl Task {
    /// The task's state.
    pub fn state(&self) -> TaskState {
        self.status.state
    }

    /// The task's own run window, if any.
    pub fn run_window(&self) -> Option<RunWindow> {
        self.control.run_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CopyVolumeSpec {
        CopyVolumeSpec {
            source_volume: VolumeId::new("vol-a").unwrap(),
            target_volume: VolumeId::new("vol-b").unwrap(),
            source_hosts: vec!["198.51.100.1:10201".into()],
            target_hosts: vec!["203.0.113.1:10201".into()],
            base_snapshot: None,
            options: CopyOptions::default(),
        }
    }

    #[test]
    fn defaults_validate() {
        TaskSpec::CopyVolume(spec()).validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Breaker = Box<dyn Fn(&mut CopyVolumeSpec)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("source_hosts", Box::new(|s| s.source_hosts.clear())),
            ("target_hosts", Box::new(|s| s.target_hosts = vec!["a b".into()])),
            ("block_size_bytes", Box::new(|s| s.options.block_size_bytes = 5000)),
            ("extent_size_bytes", Box::new(|s| s.options.extent_size_bytes = 100_000)),
            ("blocks_in_flight", Box::new(|s| s.options.blocks_in_flight = 0)),
            ("bandwidth_limit_bytes_per_second", Box::new(|s| s.options.bandwidth_limit_bytes_per_second = Some(0))),
            (
                "target_volume",
                Box::new(|s| {
                    s.target_volume = s.source_volume.clone();
                    s.target_hosts = s.source_hosts.clone();
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut s = spec();
            break_it(&mut s);
            match s.validate() {
                Err(ModelError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn spec_json_is_tagged_and_options_default() {
        let json = r#"{"copy_volume":{"source_volume":"a","target_volume":"b",
            "source_hosts":["h1"],"target_hosts":["h2"],"base_snapshot":null}}"#;
        let spec: TaskSpec = serde_json::from_str(json).unwrap();
        let TaskSpec::CopyVolume(copy) = &spec;
        assert_eq!(copy.options, CopyOptions::default());
        assert_eq!(spec.kind(), "copy_volume");
    }
}
