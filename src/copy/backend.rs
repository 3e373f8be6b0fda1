//! The copy backend: what a storage daemon implements over its own block service so that the
//! copy engine can read a source volume's snapshot and write a target volume, possibly in another
//! cluster.
//!
//! # Contract
//!
//! - Offsets and lengths are bytes. Every range is half-open, `[start, end)`, and lies inside
//!   the volume (`end <= size`). The engine only asks for ranges aligned to its block size,
//!   except the last block of a volume whose size is not a multiple of it.
//! - Errors say whether retrying can help: [`BackendError::Temporary`] (a peer unreachable, a
//!   volume busy, a timeout) makes the engine retry the step with backoff from its last
//!   committed progress; [`BackendError::Permanent`] (no such volume, sizes that do not match, no
//!   space) fails the task with the message as its reason. When unsure, say `Temporary`: the
//!   engine gives up after a bounded number of attempts anyway.
//! - Calls may run concurrently (the engine keeps several blocks in flight); implementations
//!   must be safe for that. Nothing here may block an async thread: use async I/O or
//!   `spawn_blocking`.
//! - Snapshots are immutable once created. Creating a snapshot that exists already succeeds and
//!   changes nothing (a resumed task asks again).
//! - `write` and `zero` need not be durable until `flush` returns; the engine flushes before it
//!   commits progress past the data.
//!
//! # Fencing: one writer per target volume
//!
//! A target is written only under a [`WriterLease`]: the task and the epoch of the claim it runs
//! under, which grows with every claim of any task (see [`WriterLease`]). The backend is the
//! last line of the rule "a runner that lost its claim never writes again":
//!
//! - [`CopyBackend::open_target`] **admits** the lease for that volume: it records it as the
//!   volume's newest, unless the volume has seen a newer one, in which case it fails with
//!   [`BackendError::Fenced`]. Opening again under the newest lease (the same claim) is allowed.
//! - Every [`WriteVolume::write`], [`WriteVolume::zero`], [`WriteVolume::flush`] and
//!   [`WriteVolume::snapshot`] made through a handle whose lease is older than the volume's
//!   newest fails with [`BackendError::Fenced`] and changes nothing. The check and the write are
//!   atomic with respect to admitting a newer lease: **a stale writer's write never lands after
//!   a newer owner's first write.**
//! - A backend may, instead of admitting a newer lease while an older handle can still write
//!   (a process that holds it is alive), refuse the newer one with [`BackendError::Temporary`]
//!   ([`BackendError::Busy`]) until the older handle is gone; that gives the same guarantee with
//!   at most one writer open at any instant. [`FileBackend`](super::FileBackend) does that.
//! - `Fenced` is final for the handle and its lease: the engine stops the task's run at once
//!   and never retries the write (another runner owns the task now).
//!
//! The target's snapshot at the end of a copy is taken through the handle
//! ([`WriteVolume::snapshot`]), fenced like a write; [`CopyBackend::create_snapshot`] is for
//! sources (and for setting volumes up), which the task center never writes.
//!
//! The crate ships [`FileBackend`](super::FileBackend) (sparse image files) and
//! [`MemoryBackend`](super::MemoryBackend) (in memory, for tests). This module names no
//! implementation.

use std::ops::Range;

use async_trait::async_trait;

use crate::model::{SnapshotId, VolumeId, WriterLease};

/// Why a backend call failed, and whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Retrying later may succeed.
    #[error("temporary: {0}")]
    Temporary(String),
    /// Retrying cannot help; the task fails with this reason.
    #[error("{0}")]
    Permanent(String),
    /// The write's lease is older than the newest lease the volume has admitted: another runner
    /// owns the volume now. Final for this lease; the run stops without retrying.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Another writer still holds the volume (a backend that admits one writer at a time): the
    /// engine retries with backoff, without counting it as a failure, until the holder lets go.
    #[error("busy: {0}")]
    Busy(String),
}

/// Result of a backend call.
pub type BackendResult<T> = Result<T, BackendError>;

/// Where a volume lives: the block service's endpoints and the volume's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    /// Endpoints of the block service (the task's `source_hosts` or `target_hosts`).
    pub hosts: Vec<String>,
    /// The volume.
    pub volume: VolumeId,
}

/// Opens volumes and snapshots, and takes snapshots.
#[async_trait]
pub trait CopyBackend: Send + Sync + 'static {
    /// Takes snapshot `snapshot` of the volume (no-op if it exists), unfenced. The engine uses it
    /// for the source, before a copy starts; the target's snapshot, after a copy succeeds, is
    /// taken through its handle under the writer's lease ([`WriteVolume::snapshot`]).
    async fn create_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<()>;

    /// Whether the snapshot exists.
    async fn snapshot_exists(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<bool>;

    /// Opens a snapshot of a volume for reading.
    async fn open_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<Box<dyn ReadVolume>>;

    /// Opens a volume for writing (and reading, for the target-diff mode) under `lease`, which it
    /// admits as the volume's newest (see the module's fencing rules):
    /// [`BackendError::Fenced`] if the volume has admitted a newer lease.
    async fn open_target(&self, volume: &VolumeRef, lease: &WriterLease) -> BackendResult<Box<dyn WriteVolume>>;

    /// The ranges of `range` in which snapshot `to` may differ from snapshot `from` of the same
    /// volume (like `rbd diff --from-snap`), sorted and disjoint; `Ok(None)` if the backend cannot
    /// tell, in which case the engine compares the blocks itself. Reporting more than what
    /// changed is allowed; reporting less is not.
    async fn changed_ranges(
        &self,
        volume: &VolumeRef,
        from: &SnapshotId,
        to: &SnapshotId,
        range: Range<u64>,
    ) -> BackendResult<Option<Vec<Range<u64>>>> {
        let _ = (volume, from, to, range);
        Ok(None)
    }
}

/// A readable volume or snapshot.
#[async_trait]
pub trait ReadVolume: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The allocated ranges within `range`, sorted and disjoint. Bytes outside them read as
    /// zero. Reporting more than what is allocated is allowed (the engine still skips zeroes).
    async fn allocated(&self, range: Range<u64>) -> BackendResult<Vec<Range<u64>>>;

    /// Fills `buf` with the `buf.len()` bytes at `offset` and hands it back (so the engine can
    /// reuse its buffers).
    async fn read(&self, offset: u64, buf: Vec<u8>) -> BackendResult<Vec<u8>>;

    /// The size of the reads and writes this volume serves best, in bytes; 0 (the default) for
    /// no preference. The engine then reads neighbouring blocks that need the same reads with one
    /// call of up to this many bytes, and writes (or zeroes) neighbours that need it with one
    /// call, while it still decides block by block. A hint: calls of any size must work.
    fn preferred_io_bytes(&self) -> u64 {
        0
    }
}

/// A writable volume.
#[async_trait]
pub trait WriteVolume: ReadVolume {
    /// Writes `data` at `offset` and hands the buffer back.
    async fn write(&self, offset: u64, data: Vec<u8>) -> BackendResult<Vec<u8>>;

    /// Makes `range` read as zeroes, deallocating it where the backend can (punching a hole).
    async fn zero(&self, range: Range<u64>) -> BackendResult<()>;

    /// Makes every write so far durable.
    async fn flush(&self) -> BackendResult<()>;

    /// Flushes, then takes snapshot `snapshot` of this volume (no-op if it exists), under the
    /// handle's lease: refused with [`BackendError::Fenced`] like a write.
    async fn snapshot(&self, snapshot: &SnapshotId) -> BackendResult<()>;

    /// The lease this handle writes under.
    fn lease(&self) -> &WriterLease;
}
