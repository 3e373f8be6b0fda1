//! Copying volumes: the backend trait a block service implements, the crate's file and memory
//! backends, and the copy engine that runs copy-volume tasks.
//!
//! - [`CopyBackend`] (with [`ReadVolume`] and [`WriteVolume`]): the contract a storage daemon
//!   implements over its block service; ranges `[start, end)`, temporary vs permanent errors.
//! - [`FileBackend`]: sparse image files, holes found with `SEEK_DATA`/`SEEK_HOLE`, punched with
//!   `fallocate`, snapshots by reflink or sparse copy. Backs the examples and the benchmarks.
//! - [`MemoryBackend`]: the reference implementation in memory, with fault injection, for tests.
//! - [`CopyEngine`]: the [`TaskExecutor`](crate::exec::TaskExecutor) of copy-volume tasks: extents
//!   and blocks, holes and zeroes skipped, incremental against a base snapshot, blocks in flight,
//!   a contiguous high-water mark committed after each extent, optional bandwidth limit and
//!   verification with a whole-volume digest ([`volume_digest`]).
//!
//! Writes to a target are fenced: each handle writes under a [`WriterLease`] and a backend refuses
//! writes under a lease older than the newest it has admitted (see the backend module's
//! contract).
//!
//! The backend trait names no implementation; the engine knows only the trait.

mod backend;
mod engine;
mod fiemap;
mod file;
mod memory;
mod zero;

pub use backend::{BackendError, BackendResult, CopyBackend, ReadVolume, VolumeRef, WriteVolume};
pub use engine::{volume_digest, CopyEngine, VolumeDigest, INLINE_HASH_MAX_BYTES};
pub use file::{FileBackend, SnapshotMethod, WRITER_LOCK_WAIT};
pub use memory::{HookAction, MemoryBackend, MemoryCall, MemoryOp, PAGE_BYTES};
pub use zero::is_zero;

pub use crate::model::WriterLease;
