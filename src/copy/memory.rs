//! The memory backend: volumes and snapshots held in memory, the crate's reference
//! implementation of [`CopyBackend`] (as raft-rs ships `MemStorage`), for tests, examples and
//! benchmarks.
//!
//! # Model
//!
//! - A volume is found by its **first host** and its id ([`VolumeRef`]); the other hosts are
//!   ignored. [`MemoryBackend::create_volume`] makes one, all holes.
//! - Each volume has its bytes and an **allocation map** at [`PAGE_BYTES`] granularity: a write
//!   allocates every page it touches; [`WriteVolume::zero`] deallocates the pages wholly inside
//!   its range and fills the partial ones at its edges with zeroes (they stay allocated), like
//!   `fallocate(PUNCH_HOLE)` on a file system with 4 KiB blocks. [`ReadVolume::allocated`]
//!   reports runs of allocated pages, clipped to the range asked.
//! - A snapshot is an immutable copy of the volume (bytes and map) behind an `Arc`, keyed by name;
//!   readers of a snapshot take no lock.
//! - **Fencing**: each volume remembers the newest [`WriterLease`] that
//!   [`CopyBackend::open_target`] admitted. Opening under an older lease, and every write, zero,
//!   flush or snapshot through a handle whose lease is no longer the newest, fail with
//!   [`BackendError::Fenced`] and change nothing; the check and the change happen under the one
//!   lock that admitting a lease takes, so a stale write never lands after a newer owner's first.
//!   Unlike the file backend it admits a newer lease at once, while older handles live:
//!   [`MemoryBackend::fenced_calls`] counts the calls it refused.
//! - [`CopyBackend::changed_ranges`] answers `None` unless turned on with
//!   [`MemoryBackend::set_changed_ranges`], which also sets how coarse the answer is (reporting
//!   more than what changed is allowed), so that the engine's use of it can be tested both ways.
//!
//! # For tests
//!
//! - **Faults**: [`MemoryBackend::fail_nth`] makes the n-th next call of an operation fail with a
//!   given error, once.
//! - **Counters**: [`MemoryBackend::calls`] and [`MemoryBackend::bytes`] per [`MemoryOp`].
//! - **Hooks**: [`MemoryBackend::set_hook`] sees every call before it runs and may delay it or
//!   hang it forever (to make blocks complete out of order, or to freeze a step while a test
//!   "kills" it); a hook may also cancel a stop token after so many reads.
//! - **Lost writes**: with [`MemoryBackend::track_unflushed`] on, every write and zero since the
//!   last [`WriteVolume::flush`] of a volume is journaled, and [`MemoryBackend::lose_unflushed`]
//!   undoes them, as a crash of the block service would; a test that kills a copy can so check
//!   that the engine never counted unflushed data as done.
//!
//! # Concurrency
//!
//! One `std::sync::Mutex` guards the volumes and one the test controls; each is held only for a
//! lookup or a `memcpy`, never across an `.await`. Calls do not use `spawn_blocking`: copying a
//! block of memory is as cheap as handing it to another thread.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::backend::{BackendError, BackendResult, CopyBackend, ReadVolume, VolumeRef, WriteVolume};
use crate::model::{SnapshotId, VolumeId, WriterLease};

/// Granularity of the allocation map, bytes.
pub const PAGE_BYTES: u64 = 4096;

/// An operation of the memory backend, for counters, faults and hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryOp {
    /// [`CopyBackend::create_snapshot`].
    CreateSnapshot,
    /// [`CopyBackend::snapshot_exists`].
    SnapshotExists,
    /// [`CopyBackend::open_snapshot`].
    OpenSnapshot,
    /// [`CopyBackend::open_target`].
    OpenTarget,
    /// [`CopyBackend::changed_ranges`] (counted only while turned on).
    ChangedRanges,
    /// [`ReadVolume::allocated`], on a snapshot or a target.
    Allocated,
    /// [`ReadVolume::read`], on a snapshot or a target.
    Read,
    /// [`WriteVolume::write`].
    Write,
    /// [`WriteVolume::zero`].
    Zero,
    /// [`WriteVolume::flush`].
    Flush,
    /// [`WriteVolume::snapshot`].
    TargetSnapshot,
}

const OPS: usize = 11;

impl MemoryOp {
    fn index(self) -> usize {
        self as usize
    }
}

/// One call, as a hook sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryCall {
    /// What is being done.
    pub op: MemoryOp,
    /// The volume.
    pub volume: VolumeId,
    /// The snapshot, for calls on a snapshot (and the `to` snapshot of `changed_ranges`).
    pub snapshot: Option<SnapshotId>,
    /// The byte range of a data call (`allocated`, `read`, `write`, `zero`); empty otherwise.
    pub range: Range<u64>,
}

/// What a hook wants done with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// Run it now.
    Proceed,
    /// Wait this long (tokio time), then run it.
    Delay(Duration),
    /// Never complete: the call's future stays pending until dropped.
    Hang,
}

type Hook = Arc<dyn Fn(&MemoryCall) -> HookAction + Send + Sync>;

/// Volumes and snapshots in memory. Cheap to clone: clones share the volumes. See the module docs.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let volumes = self.inner.volumes().len();
        f.debug_struct("MemoryBackend").field("volumes", &volumes).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    volumes: Mutex<HashMap<Key, Volume>>,
    control: Mutex<Control>,
}

#[derive(Default)]
struct Control {
    calls: [u64; OPS],
    bytes: [u64; OPS],
    faults: Vec<Fault>,
    hook: Option<Hook>,
    changed_granularity_bytes: Option<u64>,
    track_unflushed: bool,
    fenced: u64,
}

struct Fault {
    op: MemoryOp,
    countdown: u64,
    error: BackendError,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    host: String,
    volume: VolumeId,
}

impl Key {
    fn of(volume: &VolumeRef) -> Key {
        Key { host: volume.hosts.first().cloned().unwrap_or_default(), volume: volume.volume.clone() }
    }
}

struct Volume {
    image: Image,
    snapshots: HashMap<SnapshotId, Arc<Image>>,
    /// Undo records of the writes since the last flush (only while tracking is on), oldest first.
    journal: Vec<Undo>,
    /// The newest writer lease admitted.
    newest: Option<WriterLease>,
}

/// Bytes plus allocation map.
#[derive(Clone)]
struct Image {
    data: Vec<u8>,
    pages: Vec<bool>,
}

/// What a write or zero overwrote.
struct Undo {
    offset: u64,
    data: Vec<u8>,
    first_page: usize,
    pages: Vec<bool>,
}

impl Image {
    fn new(size: u64) -> Image {
        let size = usize::try_from(size).expect("a memory volume fits in memory");
        Image { data: vec![0; size], pages: vec![false; size.div_ceil(PAGE_BYTES as usize)] }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn check(&self, range: &Range<u64>) -> BackendResult<()> {
        if range.start > range.end || range.end > self.size() {
            return Err(BackendError::Permanent(format!(
                "range {}..{} is outside a volume of {} bytes",
                range.start,
                range.end,
                self.size()
            )));
        }
        Ok(())
    }

    fn pages_touching(range: &Range<u64>) -> Range<usize> {
        (range.start / PAGE_BYTES) as usize..range.end.div_ceil(PAGE_BYTES) as usize
    }

    fn allocated(&self, range: &Range<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for page in Image::pages_touching(range) {
            if !self.pages[page] {
                continue;
            }
            let start = (page as u64 * PAGE_BYTES).max(range.start);
            let end = ((page as u64 + 1) * PAGE_BYTES).min(range.end);
            match runs.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => runs.push(start..end),
            }
        }
        runs
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
    }

    fn undo_record(&self, range: &Range<u64>) -> Undo {
        let pages = Image::pages_touching(range);
        Undo {
            offset: range.start,
            data: self.data[range.start as usize..range.end as usize].to_vec(),
            first_page: pages.start,
            pages: self.pages[pages].to_vec(),
        }
    }

    fn undo(&mut self, undo: Undo) {
        let start = undo.offset as usize;
        self.data[start..start + undo.data.len()].copy_from_slice(&undo.data);
        self.pages[undo.first_page..undo.first_page + undo.pages.len()].copy_from_slice(&undo.pages);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        self.data[start..start + data.len()].copy_from_slice(data);
        let range = offset..offset + data.len() as u64;
        self.pages[Image::pages_touching(&range)].fill(true);
    }

    fn zero(&mut self, range: &Range<u64>) {
        self.data[range.start as usize..range.end as usize].fill(0);
        let size = self.size();
        for page in Image::pages_touching(range) {
            let (start, end) = (page as u64 * PAGE_BYTES, ((page as u64 + 1) * PAGE_BYTES).min(size));
            if range.start <= start && end <= range.end {
                self.pages[page] = false;
            }
        }
    }

    /// Whether the granule `range` differs between two images of the same size, by bytes or map.
    fn differs(&self, other: &Image, range: &Range<u64>) -> bool {
        let pages = Image::pages_touching(range);
        self.pages[pages.clone()] != other.pages[pages]
            || self.data[range.start as usize..range.end as usize]
                != other.data[range.start as usize..range.end as usize]
    }
}

impl Inner {
    fn volumes(&self) -> MutexGuard<'_, HashMap<Key, Volume>> {
        self.volumes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts the call, injects a planned fault, and lets the hook delay or hang it.
    async fn enter(&self, call: MemoryCall) -> BackendResult<()> {
        let (fault, hook) = {
            let mut control = self.control();
            control.calls[call.op.index()] += 1;
            control.bytes[call.op.index()] += call.range.end - call.range.start;
            let mut fault = None;
            for f in control.faults.iter_mut().filter(|f| f.op == call.op) {
                f.countdown -= 1;
                if f.countdown == 0 && fault.is_none() {
                    fault = Some(f.error.clone());
                }
            }
            control.faults.retain(|f| f.countdown > 0);
            (fault, control.hook.clone())
        };
        if let Some(hook) = hook {
            match hook(&call) {
                HookAction::Proceed => {}
                HookAction::Delay(delay) => tokio::time::sleep(delay).await,
                HookAction::Hang => std::future::pending::<()>().await,
            }
        }
        fault.map_or(Ok(()), Err)
    }

    /// Counts a [`BackendError::Fenced`] answer.
    fn count_fenced<T>(&self, result: BackendResult<T>) -> BackendResult<T> {
        if matches!(result, Err(BackendError::Fenced(_))) {
            self.control().fenced += 1;
        }
        result
    }

    /// Runs `f` on the live volume, or fails permanently if there is none.
    fn with_volume<T>(&self, key: &Key, f: impl FnOnce(&mut Volume) -> BackendResult<T>) -> BackendResult<T> {
        let mut volumes = self.volumes();
        let volume = volumes.get_mut(key).ok_or_else(|| no_volume(key))?;
        f(volume)
    }

    fn snapshot(&self, key: &Key, snapshot: &SnapshotId) -> BackendResult<Arc<Image>> {
        self.with_volume(key, |v| {
            v.snapshots.get(snapshot).cloned().ok_or_else(|| {
                BackendError::Permanent(format!("volume {} on {} has no snapshot {snapshot}", key.volume, key.host))
            })
        })
    }
}

fn no_volume(key: &Key) -> BackendError {
    BackendError::Permanent(format!("no volume {} on {}", key.volume, key.host))
}

fn call(op: MemoryOp, volume: &VolumeId, snapshot: Option<&SnapshotId>, range: Range<u64>) -> MemoryCall {
    MemoryCall { op, volume: volume.clone(), snapshot: snapshot.cloned(), range }
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        MemoryBackend::default()
    }

    /// Creates (or replaces, dropping its snapshots) a volume of `size_bytes`, all holes.
    pub fn create_volume(&self, volume: &VolumeRef, size_bytes: u64) {
        let fresh =
            Volume { image: Image::new(size_bytes), snapshots: HashMap::new(), journal: Vec::new(), newest: None };
        self.inner.volumes().insert(Key::of(volume), fresh);
    }

    /// Writes `data` at `offset` of a volume, allocating the pages it touches (test setup; not
    /// journaled, not counted).
    ///
    /// # Panics
    /// If the volume does not exist or the range is outside it.
    pub fn write_volume(&self, volume: &VolumeRef, offset: u64, data: &[u8]) {
        self.edit(volume, |image| {
            image.check(&(offset..offset + data.len() as u64)).expect("write_volume inside the volume");
            image.write(offset, data);
        });
    }

    /// Makes `range` of a volume read as zeroes, deallocating the pages wholly inside it (test
    /// setup; not journaled, not counted).
    ///
    /// # Panics
    /// If the volume does not exist or the range is outside it.
    pub fn zero_volume(&self, volume: &VolumeRef, range: Range<u64>) {
        self.edit(volume, |image| {
            image.check(&range).expect("zero_volume inside the volume");
            image.zero(&range);
        });
    }

    fn edit(&self, volume: &VolumeRef, f: impl FnOnce(&mut Image)) {
        let mut volumes = self.inner.volumes();
        let v = volumes.get_mut(&Key::of(volume)).unwrap_or_else(|| panic!("no volume {}", volume.volume));
        f(&mut v.image);
    }

    /// The bytes of a volume.
    ///
    /// # Panics
    /// If the volume does not exist.
    pub fn read_all(&self, volume: &VolumeRef) -> Vec<u8> {
        let volumes = self.inner.volumes();
        volumes.get(&Key::of(volume)).unwrap_or_else(|| panic!("no volume {}", volume.volume)).image.data.clone()
    }

    /// The bytes of a snapshot of a volume.
    ///
    /// # Panics
    /// If the volume or the snapshot does not exist.
    pub fn read_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> Vec<u8> {
        let image = self.inner.snapshot(&Key::of(volume), snapshot).unwrap_or_else(|e| panic!("{e}"));
        image.data.clone()
    }

    /// The allocated ranges of a volume, at page granularity, sorted and coalesced.
    ///
    /// # Panics
    /// If the volume does not exist.
    pub fn allocated_ranges(&self, volume: &VolumeRef) -> Vec<Range<u64>> {
        let volumes = self.inner.volumes();
        let image = &volumes.get(&Key::of(volume)).unwrap_or_else(|| panic!("no volume {}", volume.volume)).image;
        image.allocated(&(0..image.size()))
    }

    /// Deletes a snapshot; whether it existed.
    pub fn delete_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> bool {
        let mut volumes = self.inner.volumes();
        volumes.get_mut(&Key::of(volume)).is_some_and(|v| v.snapshots.remove(snapshot).is_some())
    }

    /// Turns [`CopyBackend::changed_ranges`] on, answering at `granularity_bytes` (rounded out to
    /// whole granules, so a coarse granularity over-reports), or off with `None` (the default).
    pub fn set_changed_ranges(&self, granularity_bytes: Option<u64>) {
        assert!(granularity_bytes != Some(0), "a granularity of 0 bytes");
        self.inner.control().changed_granularity_bytes = granularity_bytes;
    }

    /// Makes the `n`-th call of `op` from now (1 for the next one) fail with `error`, once.
    pub fn fail_nth(&self, op: MemoryOp, n: u64, error: BackendError) {
        assert!(n > 0, "calls are counted from 1");
        self.inner.control().faults.push(Fault { op, countdown: n, error });
    }

    /// Makes the next call of `op` fail with `error`, once.
    pub fn fail_next(&self, op: MemoryOp, error: BackendError) {
        self.fail_nth(op, 1, error);
    }

    /// Calls of `op` so far (including failed ones).
    pub fn calls(&self, op: MemoryOp) -> u64 {
        self.inner.control().calls[op.index()]
    }

    /// Calls refused with [`BackendError::Fenced`] so far (opens under an older lease, and
    /// writes, zeroes, flushes and snapshots through a superseded handle).
    pub fn fenced_calls(&self) -> u64 {
        self.inner.control().fenced
    }

    /// The newest writer lease a volume admitted.
    ///
    /// # Panics
    /// If the volume does not exist.
    pub fn newest_lease(&self, volume: &VolumeRef) -> Option<WriterLease> {
        let volumes = self.inner.volumes();
        volumes.get(&Key::of(volume)).unwrap_or_else(|| panic!("no volume {}", volume.volume)).newest
    }

    /// Bytes in the ranges of the calls of `op` so far (reads, writes, zeroes, allocated queries).
    pub fn bytes(&self, op: MemoryOp) -> u64 {
        self.inner.control().bytes[op.index()]
    }

    /// Sets the counters of [`MemoryBackend::calls`] and [`MemoryBackend::bytes`] back to zero.
    pub fn reset_counters(&self) {
        let mut control = self.inner.control();
        control.calls = [0; OPS];
        control.bytes = [0; OPS];
    }

    /// Calls `hook` before every call (after counting it and choosing a fault); see [`HookAction`].
    pub fn set_hook(&self, hook: impl Fn(&MemoryCall) -> HookAction + Send + Sync + 'static) {
        self.inner.control().hook = Some(Arc::new(hook));
    }

    /// Removes the hook.
    pub fn clear_hook(&self) {
        self.inner.control().hook = None;
    }

    /// Journals writes and zeroes until the next flush, so that [`MemoryBackend::lose_unflushed`]
    /// can undo them. Off by default: it copies every byte that a write overwrites.
    pub fn track_unflushed(&self, on: bool) {
        self.inner.control().track_unflushed = on;
        if !on {
            self.inner.volumes().values_mut().for_each(|v| v.journal.clear());
        }
    }

    /// Undoes every write and zero of the volume since its last flush (as a crash would), newest
    /// first; how many were undone. Needs [`MemoryBackend::track_unflushed`].
    pub fn lose_unflushed(&self, volume: &VolumeRef) -> usize {
        let mut volumes = self.inner.volumes();
        let Some(v) = volumes.get_mut(&Key::of(volume)) else { return 0 };
        let undone = v.journal.len();
        while let Some(undo) = v.journal.pop() {
            v.image.undo(undo);
        }
        undone
    }

    fn changed(&self, key: &Key, from: &SnapshotId, to: &SnapshotId, range: Range<u64>, granule: u64) -> ChangedResult {
        let (old, new) = (self.inner.snapshot(key, from)?, self.inner.snapshot(key, to)?);
        new.check(&range)?;
        if old.size() != new.size() {
            return Ok(Some(vec![range]));
        }
        let mut changed: Vec<Range<u64>> = Vec::new();
        let mut start = range.start - range.start % granule;
        while start < range.end {
            let end = (start + granule).min(new.size());
            if new.differs(&old, &(start..end)) {
                let clipped = start.max(range.start)..end.min(range.end);
                match changed.last_mut() {
                    Some(last) if last.end == clipped.start => last.end = clipped.end,
                    _ => changed.push(clipped),
                }
            }
            start = end;
        }
        Ok(Some(changed))
    }
}

type ChangedResult = BackendResult<Option<Vec<Range<u64>>>>;

#[async_trait]
impl CopyBackend for MemoryBackend {
    async fn create_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<()> {
        self.inner.enter(call(MemoryOp::CreateSnapshot, &volume.volume, Some(snapshot), 0..0)).await?;
        self.inner.with_volume(&Key::of(volume), |v| {
            if !v.snapshots.contains_key(snapshot) {
                v.snapshots.insert(snapshot.clone(), Arc::new(v.image.clone()));
            }
            Ok(())
        })
    }

    async fn snapshot_exists(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<bool> {
        self.inner.enter(call(MemoryOp::SnapshotExists, &volume.volume, Some(snapshot), 0..0)).await?;
        self.inner.with_volume(&Key::of(volume), |v| Ok(v.snapshots.contains_key(snapshot)))
    }

    async fn open_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<Box<dyn ReadVolume>> {
        self.inner.enter(call(MemoryOp::OpenSnapshot, &volume.volume, Some(snapshot), 0..0)).await?;
        let image = self.inner.snapshot(&Key::of(volume), snapshot)?;
        Ok(Box::new(MemorySnapshot {
            inner: self.inner.clone(),
            volume: volume.volume.clone(),
            snapshot: snapshot.clone(),
            image,
        }))
    }

    async fn open_target(&self, volume: &VolumeRef, lease: &WriterLease) -> BackendResult<Box<dyn WriteVolume>> {
        self.inner.enter(call(MemoryOp::OpenTarget, &volume.volume, None, 0..0)).await?;
        let key = Key::of(volume);
        let size = self.inner.with_volume(&key, |v| {
            if !lease.admits_after(v.newest.as_ref()) {
                return Err(stale(&key, lease, v.newest.as_ref()));
            }
            v.newest = Some(*lease);
            Ok(v.image.size())
        });
        let size = self.inner.count_fenced(size)?;
        Ok(Box::new(MemoryTarget { inner: self.inner.clone(), key, size, lease: *lease }))
    }

    async fn changed_ranges(
        &self,
        volume: &VolumeRef,
        from: &SnapshotId,
        to: &SnapshotId,
        range: Range<u64>,
    ) -> BackendResult<Option<Vec<Range<u64>>>> {
        let Some(granule) = self.inner.control().changed_granularity_bytes else { return Ok(None) };
        self.inner.enter(call(MemoryOp::ChangedRanges, &volume.volume, Some(to), range.clone())).await?;
        self.changed(&Key::of(volume), from, to, range, granule)
    }
}

/// A snapshot opened for reading: holds the immutable image, takes no lock to read it.
struct MemorySnapshot {
    inner: Arc<Inner>,
    volume: VolumeId,
    snapshot: SnapshotId,
    image: Arc<Image>,
}

#[async_trait]
impl ReadVolume for MemorySnapshot {
    fn size(&self) -> u64 {
        self.image.size()
    }

    async fn allocated(&self, range: Range<u64>) -> BackendResult<Vec<Range<u64>>> {
        self.inner.enter(call(MemoryOp::Allocated, &self.volume, Some(&self.snapshot), range.clone())).await?;
        self.image.check(&range)?;
        Ok(self.image.allocated(&range))
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> BackendResult<Vec<u8>> {
        let range = offset..offset + buf.len() as u64;
        self.inner.enter(call(MemoryOp::Read, &self.volume, Some(&self.snapshot), range.clone())).await?;
        self.image.check(&range)?;
        self.image.read(offset, &mut buf);
        Ok(buf)
    }
}

/// A live volume opened for writing; every call looks the volume up again (it may be replaced).
struct MemoryTarget {
    inner: Arc<Inner>,
    key: Key,
    size: u64,
    lease: WriterLease,
}

/// The error for a call under `lease` on a volume whose newest lease is `newest`.
fn stale(key: &Key, lease: &WriterLease, newest: Option<&WriterLease>) -> BackendError {
    let newest = newest.map_or("none".to_string(), ToString::to_string);
    BackendError::Fenced(format!(
        "volume {} on {} admitted writer lease {newest}; {lease} may not write",
        key.volume, key.host
    ))
}

impl MemoryTarget {
    /// Runs `f` on the volume if this handle's lease is still the newest, under the same lock.
    fn fenced<T>(&self, f: impl FnOnce(&mut Volume) -> BackendResult<T>) -> BackendResult<T> {
        let result = self.inner.with_volume(&self.key, |v| {
            if v.newest != Some(self.lease) {
                return Err(stale(&self.key, &self.lease, v.newest.as_ref()));
            }
            f(v)
        });
        self.inner.count_fenced(result)
    }

    /// Applies a write or a zero, journaling it first while tracking is on.
    fn change(&self, range: &Range<u64>, f: impl FnOnce(&mut Image)) -> BackendResult<()> {
        let track = self.inner.control().track_unflushed;
        self.fenced(|v| {
            v.image.check(range)?;
            if track {
                let undo = v.image.undo_record(range);
                v.journal.push(undo);
            }
            f(&mut v.image);
            Ok(())
        })
    }
}

#[async_trait]
impl ReadVolume for MemoryTarget {
    fn size(&self) -> u64 {
        self.size
    }

    async fn allocated(&self, range: Range<u64>) -> BackendResult<Vec<Range<u64>>> {
        self.inner.enter(call(MemoryOp::Allocated, &self.key.volume, None, range.clone())).await?;
        self.inner.with_volume(&self.key, |v| {
            v.image.check(&range)?;
            Ok(v.image.allocated(&range))
        })
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> BackendResult<Vec<u8>> {
        let range = offset..offset + buf.len() as u64;
        self.inner.enter(call(MemoryOp::Read, &self.key.volume, None, range.clone())).await?;
        self.inner.with_volume(&self.key, |v| {
            v.image.check(&range)?;
            v.image.read(offset, &mut buf);
            Ok(())
        })?;
        Ok(buf)
    }
}

#[async_trait]
impl WriteVolume for MemoryTarget {
    async fn write(&self, offset: u64, data: Vec<u8>) -> BackendResult<Vec<u8>> {
        let range = offset..offset + data.len() as u64;
        self.inner.enter(call(MemoryOp::Write, &self.key.volume, None, range.clone())).await?;
        self.change(&range, |image| image.write(offset, &data))?;
        Ok(data)
    }

    async fn zero(&self, range: Range<u64>) -> BackendResult<()> {
        self.inner.enter(call(MemoryOp::Zero, &self.key.volume, None, range.clone())).await?;
        self.change(&range, |image| image.zero(&range))
    }

    async fn flush(&self) -> BackendResult<()> {
        self.inner.enter(call(MemoryOp::Flush, &self.key.volume, None, 0..0)).await?;
        self.fenced(|v| {
            v.journal.clear();
            Ok(())
        })
    }

    async fn snapshot(&self, snapshot: &SnapshotId) -> BackendResult<()> {
        self.inner.enter(call(MemoryOp::TargetSnapshot, &self.key.volume, Some(snapshot), 0..0)).await?;
        self.fenced(|v| {
            v.journal.clear();
            if !v.snapshots.contains_key(snapshot) {
                v.snapshots.insert(snapshot.clone(), Arc::new(v.image.clone()));
            }
            Ok(())
        })
    }

    fn lease(&self) -> &WriterLease {
        &self.lease
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str) -> VolumeRef {
        VolumeRef { hosts: vec!["198.51.100.1:10201".into()], volume: VolumeId::new(name).unwrap() }
    }

    fn snap(name: &str) -> SnapshotId {
        SnapshotId::new(name).unwrap()
    }

    /// A lease of one fixed task at `epoch`.
    fn lease(epoch: u64) -> WriterLease {
        WriterLease::new(crate::model::TaskId::from_bytes([7; 16]), epoch)
    }

    #[tokio::test]
    async fn a_newer_lease_fences_every_write_of_an_older_handle() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 4 * PAGE_BYTES);
        let old = backend.open_target(&v, &lease(5)).await.unwrap();
        old.write(0, vec![1; 10]).await.unwrap();
        let new = backend.open_target(&v, &WriterLease::new(crate::model::TaskId::generate(), 6)).await.unwrap();
        new.write(0, vec![2; 10]).await.unwrap();
        assert!(matches!(old.write(0, vec![3; 10]).await, Err(BackendError::Fenced(_))));
        assert!(matches!(old.zero(0..PAGE_BYTES).await, Err(BackendError::Fenced(_))));
        assert!(matches!(old.flush().await, Err(BackendError::Fenced(_))));
        assert!(matches!(old.snapshot(&snap("s")).await, Err(BackendError::Fenced(_))));
        assert!(matches!(backend.open_target(&v, &lease(5)).await, Err(BackendError::Fenced(_))));
        assert_eq!(backend.read_all(&v)[..10], [2; 10], "no stale write landed");
        assert!(!backend.snapshot_exists(&v, &snap("s")).await.unwrap());
        assert_eq!(backend.fenced_calls(), 5);
        new.snapshot(&snap("s")).await.unwrap();
        assert_eq!(backend.read_snapshot(&v, &snap("s"))[..10], [2; 10]);
        // The newest owner may open again (a retried open of the same claim).
        assert!(backend.open_target(&v, new.lease()).await.is_ok());
    }

    #[tokio::test]
    async fn writes_allocate_pages_and_zero_punches_whole_ones() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 10 * PAGE_BYTES + 100);
        assert!(backend.allocated_ranges(&v).is_empty());
        backend.write_volume(&v, PAGE_BYTES + 10, &[1; 10]);
        assert_eq!(backend.allocated_ranges(&v), vec![PAGE_BYTES..2 * PAGE_BYTES]);

        let target = backend.open_target(&v, &lease(1)).await.unwrap();
        target.write(3 * PAGE_BYTES - 1, vec![7; 2 * PAGE_BYTES as usize + 2]).await.unwrap();
        assert_eq!(target.allocated(0..target.size()).await.unwrap(), vec![PAGE_BYTES..6 * PAGE_BYTES]);
        // Clipped to the range asked.
        assert_eq!(target.allocated(100..PAGE_BYTES + 5).await.unwrap(), vec![PAGE_BYTES..PAGE_BYTES + 5]);

        // Zero 3 pages from the middle of page 2: pages 3 and 4 go, pages 2 and 5 stay.
        target.write(PAGE_BYTES, vec![7; 5 * PAGE_BYTES as usize]).await.unwrap();
        target.zero(2 * PAGE_BYTES + 100..5 * PAGE_BYTES + 100).await.unwrap();
        assert_eq!(
            target.allocated(0..target.size()).await.unwrap(),
            vec![PAGE_BYTES..3 * PAGE_BYTES, 5 * PAGE_BYTES..6 * PAGE_BYTES]
        );
        let data = backend.read_all(&v);
        assert!(data[2 * PAGE_BYTES as usize + 100..5 * PAGE_BYTES as usize + 100].iter().all(|&b| b == 0));
        assert_eq!(data[2 * PAGE_BYTES as usize + 99], 7);
        assert_eq!(data[5 * PAGE_BYTES as usize + 100], 7);

        // The short last page is "whole" when the range reaches the end of the volume.
        target.write(10 * PAGE_BYTES, vec![1; 100]).await.unwrap();
        target.zero(10 * PAGE_BYTES..10 * PAGE_BYTES + 100).await.unwrap();
        assert_eq!(target.allocated(9 * PAGE_BYTES..target.size()).await.unwrap(), vec![]);
        assert!(target.write(10 * PAGE_BYTES, vec![1; 101]).await.is_err());
    }

    #[tokio::test]
    async fn snapshots_are_immutable_and_creating_twice_changes_nothing() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 4 * PAGE_BYTES);
        backend.write_volume(&v, 0, &[1; 10]);
        backend.create_snapshot(&v, &snap("s1")).await.unwrap();
        backend.write_volume(&v, 0, &[2; 10]);
        backend.create_snapshot(&v, &snap("s1")).await.unwrap();
        assert_eq!(backend.read_snapshot(&v, &snap("s1"))[..10], [1; 10]);
        assert!(backend.snapshot_exists(&v, &snap("s1")).await.unwrap());
        assert!(!backend.snapshot_exists(&v, &snap("s2")).await.unwrap());

        let reader = backend.open_snapshot(&v, &snap("s1")).await.unwrap();
        backend.write_volume(&v, 0, &[3; 10]);
        assert_eq!(reader.read(0, vec![0; 10]).await.unwrap(), vec![1; 10]);
        assert_eq!(reader.allocated(0..4 * PAGE_BYTES).await.unwrap(), vec![0..PAGE_BYTES]);
        assert!(matches!(backend.open_snapshot(&v, &snap("nope")).await, Err(BackendError::Permanent(_))));
        assert!(matches!(backend.open_target(&vol("nope"), &lease(1)).await, Err(BackendError::Permanent(_))));
        assert!(backend.delete_snapshot(&v, &snap("s1")));
        assert!(!backend.snapshot_exists(&v, &snap("s1")).await.unwrap());
    }

    #[tokio::test]
    async fn volumes_are_keyed_by_first_host() {
        let backend = MemoryBackend::new();
        let a = vol("a");
        let mut elsewhere = a.clone();
        elsewhere.hosts = vec!["203.0.113.1:10201".into()];
        backend.create_volume(&a, PAGE_BYTES);
        assert!(backend.open_target(&elsewhere, &lease(1)).await.is_err());
        let mut more_hosts = a.clone();
        more_hosts.hosts.push("203.0.113.1:10201".into());
        assert!(backend.open_target(&more_hosts, &lease(1)).await.is_ok());
    }

    #[tokio::test]
    async fn changed_ranges_follow_the_flag_and_granularity() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 64 * PAGE_BYTES);
        backend.write_volume(&v, 0, &[1; 100]);
        backend.create_snapshot(&v, &snap("old")).await.unwrap();
        backend.write_volume(&v, 5 * PAGE_BYTES, &[2; 100]);
        backend.zero_volume(&v, 0..PAGE_BYTES);
        backend.create_snapshot(&v, &snap("new")).await.unwrap();
        let (old, new, all) = (snap("old"), snap("new"), 0..64 * PAGE_BYTES);
        assert_eq!(backend.changed_ranges(&v, &old, &new, all.clone()).await.unwrap(), None);

        backend.set_changed_ranges(Some(PAGE_BYTES));
        let exact = backend.changed_ranges(&v, &old, &new, all.clone()).await.unwrap().unwrap();
        assert_eq!(exact, vec![0..PAGE_BYTES, 5 * PAGE_BYTES..6 * PAGE_BYTES]);
        let clipped = backend.changed_ranges(&v, &old, &new, 100..5 * PAGE_BYTES + 1).await.unwrap().unwrap();
        assert_eq!(clipped, vec![100..PAGE_BYTES, 5 * PAGE_BYTES..5 * PAGE_BYTES + 1]);

        backend.set_changed_ranges(Some(16 * PAGE_BYTES));
        let coarse = backend.changed_ranges(&v, &old, &new, all).await.unwrap().unwrap();
        assert_eq!(coarse, vec![0..16 * PAGE_BYTES]);
        assert_eq!(backend.calls(MemoryOp::ChangedRanges), 3);
    }

    #[tokio::test]
    async fn faults_fire_once_on_the_nth_call_and_calls_are_counted() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 4 * PAGE_BYTES);
        let target = backend.open_target(&v, &lease(1)).await.unwrap();
        backend.fail_nth(MemoryOp::Read, 2, BackendError::Temporary("busy".into()));
        assert!(target.read(0, vec![0; 10]).await.is_ok());
        assert_eq!(target.read(0, vec![0; 10]).await, Err(BackendError::Temporary("busy".into())));
        assert!(target.read(0, vec![0; 10]).await.is_ok());
        assert_eq!(backend.calls(MemoryOp::Read), 3);
        assert_eq!(backend.bytes(MemoryOp::Read), 30);
        backend.reset_counters();
        assert_eq!(backend.calls(MemoryOp::Read), 0);
    }

    #[tokio::test]
    async fn hooks_see_calls_and_can_hang_them() {
        let backend = MemoryBackend::new();
        let v = vol("a");
        backend.create_volume(&v, 4 * PAGE_BYTES);
        let target = backend.open_target(&v, &lease(1)).await.unwrap();
        backend.set_hook(|c| if c.op == MemoryOp::Write { HookAction::Hang } else { HookAction::Proceed });
        assert!(target.read(0, vec![0; 10]).await.is_ok());
        let write = target.write(0, vec![1; 10]);
        assert!(tokio::time::timeout(Duration::from_millis(20), write).await.is_err());
        backend.clear_hook();
        assert!(target.write(0, vec![1; 10]).await.is_ok());
    }

    #[tokio::test]
    async fn unflushed_writes_are_lost_in_a_crash() {
        let backend = MemoryBackend::new();
        backend.track_unflushed(true);
        let v = vol("a");
        backend.create_volume(&v, 4 * PAGE_BYTES);
        let target = backend.open_target(&v, &lease(1)).await.unwrap();
        target.write(0, vec![1; 10]).await.unwrap();
        target.flush().await.unwrap();
        target.write(5, vec![2; 10]).await.unwrap();
        target.zero(0..4 * PAGE_BYTES).await.unwrap();
        target.write(3 * PAGE_BYTES, vec![3; 10]).await.unwrap();
        assert_eq!(backend.lose_unflushed(&v), 3);
        let data = backend.read_all(&v);
        assert_eq!(data[..10], [1; 10]);
        assert!(data[10..].iter().all(|&b| b == 0));
        assert_eq!(backend.allocated_ranges(&v), vec![0..PAGE_BYTES]);
    }
}
