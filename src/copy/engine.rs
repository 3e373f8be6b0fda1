//! The copy engine: runs copy-volume tasks over a [`CopyBackend`], extent by extent, copying only
//! what changed. It is the crate's real [`TaskExecutor`].
//!
//! # Algorithm
//!
//! [`CopyEngine::start`](TaskExecutor::start) checks the spec, fixes the **source snapshot** (at
//! the first start it takes snapshot `tc-<task id>` of the source and records it in
//! [`TaskProgress::source_snapshot`]; a resumed run requires it to exist still), opens that
//! snapshot and the target, and checks that their sizes are equal. With a `base_snapshot` the
//! copy is **incremental**: the base must exist on the source (to compare against) and on the
//! target (which must hold the base's bytes: it is the target of the copy that made the base,
//! unchanged since).
//!
//! Each [`TaskRun::step`] works from the cursor to the end of the cursor's **extent** (extents
//! are `extent_size_bytes` long from offset 0; the last may be short; the cursor may sit inside
//! an extent after a stop). It asks once which ranges of that part are allocated on the source
//! (and on the target in full and target-diff mode, on the base in incremental mode, and the
//! backend's `changed_ranges` between base and source snapshot, if it can tell), then walks the
//! part in **blocks** of `block_size_bytes`. Neighbouring blocks that need the same reads (same
//! allocation on each side, same answer from `changed_ranges`) are grouped in **runs** of up to
//! the volumes' [`ReadVolume::preferred_io_bytes`] (at most 16 MiB; one block when a volume has
//! no preference): a run is read with one call per side, decided block by block, and its
//! neighbouring blocks that need the same write (or zeroing) go to the target in one call. Up
//! to `blocks_in_flight` runs are in flight (reads and writes of different runs overlap; buffers
//! are reused). For each block:
//!
//! | source block | full | incremental (base `b`) | target-diff |
//! |---|---|---|---|
//! | outside `changed_ranges` | — | skip, unread: **unchanged** (**hole** if unallocated) | — |
//! | unallocated | zero the target if its map shows data there; **hole** | zero the target if `b` holds non-zero bytes there; **hole** | zero the target if it reads non-zero; **hole** |
//! | all zeroes | as above; **zero** | as above; **zero** | as above; **zero** |
//! | data | write; **copied** | equal to `b`: **unchanged**; else write, **copied** | equal to the target: **unchanged**; else write, **copied** |
//!
//! Full mode is the default; target-diff mode is `options.target_diff` without a base (a base
//! wins over `target_diff`). An extent whose verification failed is redone in target-diff mode
//! by the same run, whatever the task's mode: that compares every block with what the target
//! really holds, so the retry repairs the extent even where an incremental copy would skip.
//!
//! # Counters
//!
//! Every byte below the cursor is counted once, in the bold class of the table: what the source
//! held there and whether **data** went to the target. So [`ProgressCounters::total`] equals the
//! cursor, and `bytes_copied` is the payload sent, which is what the bandwidth limit meters.
//! Zeroing a target range sends no payload (it is a `write_zeroes` or hole punch), so a zeroed
//! block counts as **hole** or **zero** by what the source held; the number of bytes zeroed is
//! logged per step (at `debug`), not counted.
//!
//! # Stops, and what is durable when
//!
//! Before launching each run the step checks its [`StopToken`]. Once it is cancelled no run is
//! launched; those in flight finish (a run is at most `preferred_io_bytes`: 1 MiB for the file
//! backend); the target is flushed; and the cursor moves to the end of
//! the **contiguous** run of finished blocks from where the step began (a high-water mark: a
//! block that finished early never carries the cursor past one that did not). A step that ends
//! its extent flushes the target, verifies it if asked, and moves the cursor to the extent's end.
//! `progress` is changed only at the end of a successful step, after the flush: a step that fails
//! leaves it untouched, so the controller's commit never covers data the target has not made
//! durable. [`TaskRun::finish`] flushes again and takes snapshot `tc-<task id>` of the target, so
//! that the next copy can name it as its base.
//!
//! # Verification and the digest
//!
//! With `options.verify` set, after an extent's copy (and flush) the engine reads the whole
//! extent from the source snapshot and from the target and hashes each. A mismatch fails the step
//! as [`ExecError::Temporary`]: the controller retries from its last commit, and this run redoes
//! the extent in target-diff mode (see above).
//!
//! A verified copy also keeps a whole-volume digest in [`TaskProgress::digest`], updated only
//! when an extent completes, so it is committed with the cursor and survives resumes:
//!
//! - `H` is BLAKE3 (32-byte output) or XXH3-128 (its 128-bit value as 16 big-endian bytes), per
//!   [`Verify`];
//! - `e_i = H(bytes of extent i of the source snapshot)`, extent `i` being
//!   `[i * extent_size_bytes, min((i + 1) * extent_size_bytes, size))`;
//! - `d_0` is the empty string and `d_i = H(d_{i-1} || e_i)`;
//! - after extent `i` completes, `digest` is `d_i` in lowercase hex; the finished copy's is
//!   `d_n` for the volume's `n` extents (and `None` for an empty volume).
//!
//! [`volume_digest`] computes it from bytes, so a checker can recompute it from the source
//! snapshot alone. Only whole extents are hashed: a stop inside an extent leaves the chain as it
//! was, and the resumed run hashes that extent whole once it completes.
//!
//! # Limits and threads
//!
//! The bandwidth limit is a token bucket (GCRA, `governor`) on the bytes written, with a burst of
//! one second's worth; a block's bytes are taken in pieces no larger than the burst. Backends do
//! their own `spawn_blocking`; zero checks and comparisons of one block run inline (they go at
//! memory speed); hashing runs inline for blocks up to [`INLINE_HASH_MAX_BYTES`] and on the
//! blocking pool above.
//!
//! A [`BackendError`] becomes the [`ExecError`] of the same kind, with what was being done
//! prefixed.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::stream::{self, FuturesUnordered, StreamExt};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tracing::debug;

use super::backend::{BackendError, CopyBackend, ReadVolume, VolumeRef, WriteVolume};
use super::zero::is_zero;
use crate::exec::{ExecError, Licence, Step, StopToken, TaskExecutor, TaskRun};
use crate::model::{CopyVolumeSpec, ProgressCounters, SnapshotId, Task, TaskId, TaskProgress, TaskSpec, Verify};

/// Blocks larger than this are hashed on the blocking pool; smaller ones inline (BLAKE3 takes
/// about 60 µs for 256 KiB).
pub const INLINE_HASH_MAX_BYTES: usize = 256 << 10;

/// The largest run the engine reads or writes in one call, whatever a backend prefers: with
/// `blocks_in_flight` runs in flight and two buffers each, it bounds the memory of a copy.
const MAX_RUN_BYTES: u64 = 16 << 20;

/// Zeroes fed to the hashers for the holes of a verified extent.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

impl From<BackendError> for ExecError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Temporary(m) => ExecError::Temporary(m),
            BackendError::Permanent(m) => ExecError::Permanent(m),
            BackendError::Fenced(m) => ExecError::Fenced(m),
            BackendError::Busy(m) => ExecError::Busy(m),
        }
    }
}

/// Maps a backend error to the executor error of the same kind, saying what was being done.
fn failed(what: impl std::fmt::Display) -> impl FnOnce(BackendError) -> ExecError {
    move |e| match e {
        BackendError::Temporary(m) => ExecError::Temporary(format!("{what}: {m}")),
        BackendError::Permanent(m) => ExecError::Permanent(format!("{what}: {m}")),
        BackendError::Fenced(m) => ExecError::Fenced(format!("{what}: {m}")),
        BackendError::Busy(m) => ExecError::Busy(format!("{what}: {m}")),
    }
}

fn permanent(message: impl Into<String>) -> ExecError {
    ExecError::Permanent(message.into())
}

/// Runs copy-volume tasks over a backend. See the module docs.
#[derive(Clone)]
pub struct CopyEngine {
    backend: Arc<dyn CopyBackend>,
}

impl std::fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine").finish_non_exhaustive()
    }
}

impl CopyEngine {
    /// An engine that reads and writes volumes through `backend`.
    pub fn new(backend: Arc<dyn CopyBackend>) -> Self {
        CopyEngine { backend }
    }

    /// The name of the snapshot a task takes of its source when it first starts, and of its
    /// target when it finishes: `tc-<task id>`.
    pub fn snapshot_name(task: &TaskId) -> SnapshotId {
        SnapshotId::new(format!("tc-{task}")).expect("a task id is a valid snapshot name")
    }
}

#[async_trait]
impl TaskExecutor for CopyEngine {
    async fn start(
        &self,
        task: &Task,
        licence: &Licence,
        progress: &mut TaskProgress,
    ) -> Result<Box<dyn TaskRun>, ExecError> {
        Ok(Box::new(CopyRun::open(self.backend.clone(), task, licence, progress).await?))
    }
}

/// How the blocks of one extent are decided (see the table in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Full,
    TargetDiff,
    Incremental,
}

/// The base snapshot of an incremental copy, opened on the source.
struct Base {
    name: SnapshotId,
    reader: Box<dyn ReadVolume>,
}

/// One run of one copy task.
struct CopyRun {
    task: TaskId,
    backend: Arc<dyn CopyBackend>,
    source_ref: VolumeRef,
    target_ref: VolumeRef,
    snapshot: SnapshotId,
    source: Box<dyn ReadVolume>,
    target: Box<dyn WriteVolume>,
    licence: Licence,
    base: Option<Base>,
    target_diff: bool,
    verify: Option<Verify>,
    throttle: Option<Throttle>,
    size_bytes: u64,
    extent_bytes: u64,
    block_bytes: u64,
    /// A step ends after this many bytes of the volume, or ...
    checkpoint_bytes: u64,
    /// ... once this long has passed (no run is launched after it; throttle waits end).
    checkpoint_interval: std::time::Duration,
    /// Most blocks in one run: the backends' preferred I/O size over the block size, at least 1.
    run_blocks: usize,
    blocks_in_flight: usize,
    /// Extents that failed verification in this run: redone in target-diff mode.
    repair: BTreeSet<u64>,
    /// Buffers kept between steps.
    pool: Vec<Vec<u8>>,
    started: Instant,
    processed_bytes: u64,
}

impl CopyRun {
    async fn open(
        backend: Arc<dyn CopyBackend>,
        task: &Task,
        licence: &Licence,
        progress: &mut TaskProgress,
    ) -> Result<Self, ExecError> {
        // One kind of task so far; another kind would be refused here.
        let TaskSpec::CopyVolume(spec) = &task.control.spec;
        spec.validate().map_err(|e| permanent(format!("invalid copy spec: {e}")))?;
        let source_ref = VolumeRef { hosts: spec.source_hosts.clone(), volume: spec.source_volume.clone() };
        let target_ref = VolumeRef { hosts: spec.target_hosts.clone(), volume: spec.target_volume.clone() };
        let snapshot = fix_source_snapshot(backend.as_ref(), task.id, &source_ref, progress).await?;
        let source =
            backend.open_snapshot(&source_ref, &snapshot).await.map_err(failed("opening the source snapshot"))?;
        licence.check()?;
        let target = backend.open_target(&target_ref, licence.lease()).await.map_err(failed("opening the target"))?;
        let size_bytes = source.size();
        if target.size() != size_bytes {
            return Err(permanent(format!(
                "source snapshot {snapshot} of {} is {size_bytes} bytes but target {} is {} bytes",
                source_ref.volume,
                target_ref.volume,
                target.size()
            )));
        }
        let base = match &spec.base_snapshot {
            Some(name) => Some(open_base(backend.as_ref(), &source_ref, &target_ref, name, size_bytes).await?),
            None => None,
        };
        check_progress(spec, progress, size_bytes)?;
        progress.total_bytes = Some(size_bytes);
        let options = &spec.options;
        let run_blocks = run_blocks(&*source, &*target, base.as_ref(), options.block_size_bytes);
        Ok(CopyRun {
            task: task.id,
            backend,
            source_ref,
            target_ref,
            snapshot,
            source,
            target,
            licence: licence.clone(),
            base,
            target_diff: options.target_diff,
            verify: options.verify,
            throttle: options.bandwidth_limit_bytes_per_second.map(Throttle::new),
            size_bytes,
            extent_bytes: options.extent_size_bytes,
            block_bytes: u64::from(options.block_size_bytes),
            checkpoint_bytes: options.checkpoint_bytes,
            checkpoint_interval: std::time::Duration::from_millis(options.checkpoint_interval_ms),
            run_blocks,
            blocks_in_flight: options.blocks_in_flight as usize,
            repair: BTreeSet::new(),
            pool: Vec::new(),
            started: Instant::now(),
            processed_bytes: 0,
        })
    }
}

/// How many blocks a run may hold: the smallest I/O size the volumes prefer (at most
/// [`MAX_RUN_BYTES`]) over the block size; 1 when one of them has no preference.
fn run_blocks(source: &dyn ReadVolume, target: &dyn WriteVolume, base: Option<&Base>, block_bytes: u32) -> usize {
    let base = base.map(|base| base.reader.preferred_io_bytes());
    let preferred = [source.preferred_io_bytes(), target.preferred_io_bytes()].into_iter().chain(base).min();
    (preferred.unwrap_or(0).min(MAX_RUN_BYTES) / u64::from(block_bytes)).max(1) as usize
}

/// Takes the source snapshot at the first start; requires it to exist on a resume.
async fn fix_source_snapshot(
    backend: &dyn CopyBackend,
    task: TaskId,
    source: &VolumeRef,
    progress: &mut TaskProgress,
) -> Result<SnapshotId, ExecError> {
    if let Some(snapshot) = &progress.source_snapshot {
        let exists =
            backend.snapshot_exists(source, snapshot).await.map_err(failed("looking up the source snapshot"))?;
        if !exists {
            return Err(permanent(format!(
                "source snapshot {snapshot} of {} is gone; the copy cannot resume",
                source.volume
            )));
        }
        return Ok(snapshot.clone());
    }
    if progress.cursor_bytes > 0 {
        return Err(permanent("progress has a cursor but no source snapshot; the copy cannot resume"));
    }
    let snapshot = CopyEngine::snapshot_name(&task);
    backend.create_snapshot(source, &snapshot).await.map_err(failed("taking the source snapshot"))?;
    progress.source_snapshot = Some(snapshot.clone());
    Ok(snapshot)
}

/// Checks and opens the base snapshot of an incremental copy.
async fn open_base(
    backend: &dyn CopyBackend,
    source: &VolumeRef,
    target: &VolumeRef,
    name: &SnapshotId,
    size_bytes: u64,
) -> Result<Base, ExecError> {
    let on_source = backend.snapshot_exists(source, name).await.map_err(failed("looking up the base on the source"))?;
    if !on_source {
        return Err(permanent(format!("source {} has no base snapshot {name}; run a full copy", source.volume)));
    }
    let on_target = backend.snapshot_exists(target, name).await.map_err(failed("looking up the base on the target"))?;
    if !on_target {
        return Err(permanent(format!("target does not hold base snapshot {name}; run a full copy")));
    }
    let reader = backend.open_snapshot(source, name).await.map_err(failed("opening the base snapshot"))?;
    if reader.size() != size_bytes {
        return Err(permanent(format!(
            "base snapshot {name} is {} bytes but the source snapshot is {size_bytes}; run a full copy",
            reader.size()
        )));
    }
    Ok(Base { name: name.clone(), reader })
}

/// Checks that a resumed progress fits this copy.
fn check_progress(spec: &CopyVolumeSpec, progress: &TaskProgress, size_bytes: u64) -> Result<(), ExecError> {
    if progress.total_bytes.is_some_and(|t| t != size_bytes) {
        return Err(permanent(format!(
            "progress says the copy is {} bytes but the source snapshot is {size_bytes}",
            progress.total_bytes.unwrap_or_default()
        )));
    }
    let cursor = progress.cursor_bytes;
    let block = u64::from(spec.options.block_size_bytes);
    if cursor > size_bytes || (cursor % block != 0 && cursor != size_bytes) {
        return Err(permanent(format!("progress cursor {cursor} is not a block boundary of this copy")));
    }
    if let Some(algorithm) = spec.options.verify {
        let extent = spec.options.extent_size_bytes;
        let completed = if cursor == size_bytes { cursor.div_ceil(extent) } else { cursor / extent };
        match &progress.digest {
            None if completed > 0 => return Err(permanent("progress of a verified copy has no digest")),
            Some(hex) if decode_hex(hex).is_none_or(|d| d.len() != digest_len(algorithm)) => {
                return Err(permanent(format!("progress digest {hex} is not a {algorithm:?} digest")));
            }
            _ => {}
        }
    }
    Ok(())
}

#[async_trait]
impl TaskRun for CopyRun {
    async fn step(&mut self, progress: &mut TaskProgress, stop: &StopToken) -> Result<Step, ExecError> {
        let cursor = progress.cursor_bytes;
        if cursor >= self.size_bytes {
            return Ok(Step::Done);
        }
        if stop.is_cancelled() {
            return Ok(Step::More);
        }
        let index = cursor / self.extent_bytes;
        let extent = index * self.extent_bytes..((index + 1) * self.extent_bytes).min(self.size_bytes);
        // A checkpoint inside the extent: at most `checkpoint_bytes` from the cursor.
        let end = extent.end.min(cursor.saturating_add(self.checkpoint_bytes));
        let mode = self.mode(index);
        let plan = self.plan(mode, cursor..end).await?;
        let mut pool = std::mem::take(&mut self.pool);
        let deadline = tokio::time::Instant::now() + self.checkpoint_interval;
        let done = self.copy(&plan, cursor..end, stop, deadline, &mut pool).await;
        pool.truncate(2 * self.blocks_in_flight);
        self.pool = pool;
        let done = done?;
        self.licence.check()?;
        self.target.flush().await.map_err(failed("flushing the target"))?;
        let mut digest = progress.digest.clone();
        if done.reached == extent.end {
            if let Some(algorithm) = self.verify {
                let extent_digest = self.verify_extent(index, extent.clone(), algorithm).await?;
                digest = Some(chain(algorithm, digest.as_deref(), &extent_digest)?);
            }
        }
        self.record(progress, &done, digest);
        debug!(
            task = %self.task, extent = index, ?mode, cursor = progress.cursor_bytes, zeroed_bytes = done.zeroed_bytes,
            counters = ?done.counters, stopped = done.reached < end, "copy step"
        );
        Ok(if progress.cursor_bytes == self.size_bytes { Step::Done } else { Step::More })
    }

    async fn finish(&mut self, progress: &mut TaskProgress) -> Result<(), ExecError> {
        if progress.cursor_bytes != self.size_bytes {
            return Err(permanent(format!(
                "finish called at cursor {} of {} bytes",
                progress.cursor_bytes, self.size_bytes
            )));
        }
        self.licence.check()?;
        self.target.flush().await.map_err(failed("flushing the target"))?;
        self.licence.check()?;
        self.target.snapshot(&self.snapshot).await.map_err(failed("snapshotting the target"))
    }
}

/// What the blocks of one step did: the high-water mark and what is below it.
#[derive(Debug, Default)]
struct StepDone {
    reached: u64,
    counters: ProgressCounters,
    zeroed_bytes: u64,
}

/// The maps a step decides its blocks with, fetched once per step.
struct Plan {
    mode: Mode,
    source: Vec<Range<u64>>,
    /// Full and target-diff mode.
    target: Vec<Range<u64>>,
    /// Incremental mode.
    base: Vec<Range<u64>>,
    /// Incremental mode, when the backend can tell.
    changed: Option<Vec<Range<u64>>>,
}

impl CopyRun {
    fn mode(&self, extent_index: u64) -> Mode {
        if self.repair.contains(&extent_index) || (self.base.is_none() && self.target_diff) {
            Mode::TargetDiff
        } else if self.base.is_some() {
            Mode::Incremental
        } else {
            Mode::Full
        }
    }

    async fn plan(&self, mode: Mode, range: Range<u64>) -> Result<Plan, ExecError> {
        let source = async { self.source.allocated(range.clone()).await.map_err(failed("mapping the source")) };
        let target = async {
            if mode == Mode::Incremental {
                return Ok(Vec::new());
            }
            self.target.allocated(range.clone()).await.map_err(failed("mapping the target"))
        };
        let base = async {
            match (&self.base, mode) {
                (Some(base), Mode::Incremental) => {
                    let map = base.reader.allocated(range.clone()).await.map_err(failed("mapping the base"))?;
                    let changed =
                        self.backend.changed_ranges(&self.source_ref, &base.name, &self.snapshot, range.clone());
                    Ok((map, changed.await.map_err(failed("asking what changed since the base"))?))
                }
                _ => Ok((Vec::new(), None)),
            }
        };
        let (source, target, (base, changed)) = futures::try_join!(source, target, base)?;
        Ok(Plan {
            mode,
            source: normalize(source, &range),
            target: normalize(target, &range),
            base: normalize(base, &range),
            changed: changed.map(|c| normalize(c, &range)),
        })
    }

    /// Copies the blocks of `range` (inside one extent), in runs, up to `blocks_in_flight` runs
    /// at a time, until done, stopped or past `deadline` (no run is launched then, and a run
    /// waiting for bandwidth gives up). Returns the high-water mark; on failure, lets the runs
    /// in flight finish and returns the first error.
    async fn copy(
        &self,
        plan: &Plan,
        range: Range<u64>,
        stop: &StopToken,
        deadline: tokio::time::Instant,
        pool: &mut Vec<Vec<u8>>,
    ) -> Result<StepDone, ExecError> {
        // Ends waits for bandwidth: at a stop, or at the checkpoint deadline.
        let interrupt = stop.child_token();
        let blocks = self.blocks(range.clone());
        let runs = self.runs(plan, &blocks);
        let mut mark = HighWater::new(range.start, blocks.len());
        let mut in_flight = FuturesUnordered::new();
        let (mut next, mut failure) = (0, None);
        loop {
            while failure.is_none() && in_flight.len() < self.blocks_in_flight && next < runs.len() {
                if interrupt.is_cancelled() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                let run = runs[next].clone();
                let buffers = [pool.pop().unwrap_or_default(), pool.pop().unwrap_or_default()];
                let run_blocks = &blocks[run.clone()];
                let interrupt = &interrupt;
                in_flight.push(async move { (run.start, self.copy_run(plan, run_blocks, buffers, interrupt).await) });
                next += 1;
            }
            let next_done = tokio::select! {
                next_done = in_flight.next() => next_done,
                _ = tokio::time::sleep_until(deadline), if !interrupt.is_cancelled() => {
                    interrupt.cancel();
                    continue;
                }
            };
            let Some((first, result)) = next_done else { break };
            match result {
                // Interrupted while waiting for bandwidth: not done, the mark stops before it.
                Ok(None) => {}
                Ok(Some((outcomes, buffers))) => {
                    pool.extend(buffers);
                    for (index, outcome) in (first..).zip(outcomes) {
                        mark.complete(index, blocks[index].clone(), outcome);
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(mark.done()),
        }
    }

    /// The blocks of `range`, which starts on a block boundary.
    fn blocks(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let step = self.block_bytes as usize;
        (range.start..range.end).step_by(step).map(|start| start..(start + self.block_bytes).min(range.end)).collect()
    }

    /// Groups consecutive blocks with the same [`Profile`] into runs of at most `run_blocks`.
    fn runs(&self, plan: &Plan, blocks: &[Range<u64>]) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut previous = None;
        for (index, block) in blocks.iter().enumerate() {
            let profile = Profile::of(plan, block);
            match runs.last_mut() {
                Some(run) if previous == Some(profile) && run.len() < self.run_blocks => run.end = index + 1,
                _ => runs.push(index..index + 1),
            }
            previous = Some(profile);
        }
        runs
    }

    /// Reads a run of blocks with one call per side, decides each block (see the table in the
    /// module docs), then zeroes and writes what needs it; hands the buffers back.
    async fn copy_run(
        &self,
        plan: &Plan,
        blocks: &[Range<u64>],
        [data, other]: [Vec<u8>; 2],
        interrupt: &StopToken,
    ) -> Result<Option<(Vec<Outcome>, [Vec<u8>; 2])>, ExecError> {
        let span = blocks[0].start..blocks[blocks.len() - 1].end;
        let profile = Profile::of(plan, &blocks[0]);
        if profile.unchanged {
            let class = if profile.source { Class::Unchanged } else { Class::Hole };
            return Ok(Some((vec![Outcome { class, zeroed: false }; blocks.len()], [data, other])));
        }
        let len = (span.end - span.start) as usize;
        let (data, other) = futures::try_join!(
            self.read_source(profile.source, span.start, data, len),
            self.read_other(plan.mode, profile.other, span.start, other, len),
        )?;
        let outcomes: Vec<Outcome> = blocks
            .iter()
            .map(|block| {
                let at = (block.start - span.start) as usize..(block.end - span.start) as usize;
                let source = profile.source.then(|| &data[at.clone()]);
                decide(plan, block, source, profile.other.then(|| &other[at]))
            })
            .collect();
        let Some(data) = self.apply(blocks, &outcomes, data, interrupt).await? else { return Ok(None) };
        Ok(Some((outcomes, [data, other])))
    }

    /// Zeroes and writes the blocks of a run as decided, neighbours that need the same with one
    /// call; hands the source's buffer back, or `None` if `interrupt` ended a wait for bandwidth
    /// (the run is then not done). Each call checks the licence right before it goes out.
    async fn apply(
        &self,
        blocks: &[Range<u64>],
        outcomes: &[Outcome],
        mut data: Vec<u8>,
        interrupt: &StopToken,
    ) -> Result<Option<Vec<u8>>, ExecError> {
        let start = blocks[0].start;
        let mut i = 0;
        while i < blocks.len() {
            let action = Action::of(outcomes[i]);
            let j = i + outcomes[i..].iter().take_while(|&&o| Action::of(o) == action).count();
            let range = blocks[i].start..blocks[j - 1].end;
            match action {
                Action::None => {}
                Action::Zero => {
                    self.licence.check()?;
                    let zeroed = self.target.zero(range.clone()).await;
                    zeroed.map_err(failed(format_args!("zeroing target {range:?}")))?;
                }
                Action::Write => {
                    if let Some(throttle) = &self.throttle {
                        if !throttle.acquire(range.end - range.start, interrupt).await {
                            return Ok(None);
                        }
                    }
                    self.licence.check()?;
                    // The whole run goes without a copy; a part of it is copied out.
                    let whole = i == 0 && j == blocks.len();
                    let piece = if whole {
                        std::mem::take(&mut data)
                    } else {
                        data[(range.start - start) as usize..(range.end - start) as usize].to_vec()
                    };
                    let written = self.target.write(range.start, piece).await;
                    let piece = written.map_err(failed(format_args!("writing target {range:?}")))?;
                    if whole {
                        data = piece;
                    }
                }
            }
            i = j;
        }
        Ok(Some(data))
    }

    /// Reads the source's block if it is allocated (else hands `buf` back untouched).
    async fn read_source(&self, allocated: bool, offset: u64, buf: Vec<u8>, len: usize) -> Result<Vec<u8>, ExecError> {
        if !allocated {
            return Ok(buf);
        }
        self.source.read(offset, sized(buf, len)).await.map_err(failed(format_args!("reading the source at {offset}")))
    }

    /// Reads what a block is compared with, the target's block or the base's, if it is allocated
    /// (else hands `buf` back untouched).
    async fn read_other(
        &self,
        mode: Mode,
        allocated: bool,
        offset: u64,
        buf: Vec<u8>,
        len: usize,
    ) -> Result<Vec<u8>, ExecError> {
        let buf = if allocated { sized(buf, len) } else { buf };
        match mode {
            _ if !allocated => Ok(buf),
            Mode::Full => Ok(buf),
            Mode::TargetDiff => {
                self.target.read(offset, buf).await.map_err(failed(format_args!("reading the target at {offset}")))
            }
            Mode::Incremental => {
                let base = self.base.as_ref().expect("incremental mode has a base");
                base.reader.read(offset, buf).await.map_err(failed(format_args!("reading the base at {offset}")))
            }
        }
    }

    /// Moves `progress` to the high-water mark of a step.
    fn record(&mut self, progress: &mut TaskProgress, done: &StepDone, digest: Option<String>) {
        let advanced = done.reached - progress.cursor_bytes;
        assert_eq!(done.counters.total(), advanced, "a step counts every byte it passes, once");
        let counters = &mut progress.counters;
        counters.bytes_copied += done.counters.bytes_copied;
        counters.bytes_skipped_hole += done.counters.bytes_skipped_hole;
        counters.bytes_skipped_zero += done.counters.bytes_skipped_zero;
        counters.bytes_skipped_unchanged += done.counters.bytes_skipped_unchanged;
        progress.cursor_bytes = done.reached;
        progress.digest = digest;
        self.processed_bytes += advanced;
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            progress.rate_bytes_per_second = (self.processed_bytes as f64 / seconds) as u64;
        }
    }
}

/// What a block needs before it can be decided: whether the backend says it is unchanged, and
/// whether the source and the other side (the target, or the base) must be read there.
/// Neighbouring blocks with the same profile form a run, read with one call per side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Profile {
    unchanged: bool,
    source: bool,
    other: bool,
}

impl Profile {
    fn of(plan: &Plan, block: &Range<u64>) -> Self {
        let source = overlaps(&plan.source, block);
        let unchanged = plan.changed.as_ref().is_some_and(|changed| !overlaps(changed, block));
        let other = !unchanged
            && match plan.mode {
                Mode::Full => false,
                Mode::TargetDiff => overlaps(&plan.target, block),
                Mode::Incremental => overlaps(&plan.base, block),
            };
        Profile { unchanged, source, other }
    }
}

/// Decides one read block (see the table in the module docs): `source` holds its bytes on the
/// source (`None`: unallocated there), `other` on the target or the base (`None`: unallocated
/// there, or not read in full mode).
fn decide(plan: &Plan, block: &Range<u64>, source: Option<&[u8]>, other: Option<&[u8]>) -> Outcome {
    match source {
        Some(data) if !is_zero(data) => {
            let same = plan.mode != Mode::Full && other == Some(data);
            Outcome { class: if same { Class::Unchanged } else { Class::Copied }, zeroed: false }
        }
        _ => {
            let class = if source.is_some() { Class::Zero } else { Class::Hole };
            let target_may_hold_data = match plan.mode {
                Mode::Full => overlaps(&plan.target, block),
                Mode::TargetDiff | Mode::Incremental => other.is_some_and(|other| !is_zero(other)),
            };
            Outcome { class, zeroed: target_may_hold_data }
        }
    }
}

/// What the target gets for a decided block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    None,
    Zero,
    Write,
}

impl Action {
    fn of(outcome: Outcome) -> Self {
        match outcome {
            Outcome { class: Class::Copied, .. } => Action::Write,
            Outcome { zeroed: true, .. } => Action::Zero,
            _ => Action::None,
        }
    }
}

/// What the source held in a block and whether data went to the target: the counter it goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Hole,
    Zero,
    Unchanged,
    Copied,
}

/// What a block's copy did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    class: Class,
    /// The target was zeroed there.
    zeroed: bool,
}

/// The high-water mark of the blocks of a step, which may complete in any order: the end of the
/// contiguous run of completed blocks from the step's start, and the counters of that run.
struct HighWater {
    /// Outcomes of blocks completed above the mark, by index.
    pending: Vec<Option<(Range<u64>, Outcome)>>,
    /// Index of the first block not yet passed.
    next: usize,
    done: StepDone,
}

impl HighWater {
    fn new(start: u64, blocks: usize) -> Self {
        HighWater { pending: vec![None; blocks], next: 0, done: StepDone { reached: start, ..StepDone::default() } }
    }

    fn complete(&mut self, index: usize, block: Range<u64>, outcome: Outcome) {
        debug_assert!(index >= self.next && self.pending[index].is_none(), "block {index} completed twice");
        self.pending[index] = Some((block, outcome));
        while let Some((block, outcome)) = self.pending.get_mut(self.next).and_then(Option::take) {
            assert_eq!(block.start, self.done.reached, "blocks are contiguous");
            let len = block.end - block.start;
            let counters = &mut self.done.counters;
            match outcome.class {
                Class::Hole => counters.bytes_skipped_hole += len,
                Class::Zero => counters.bytes_skipped_zero += len,
                Class::Unchanged => counters.bytes_skipped_unchanged += len,
                Class::Copied => counters.bytes_copied += len,
            }
            if outcome.zeroed {
                self.done.zeroed_bytes += len;
            }
            self.done.reached = block.end;
            self.next += 1;
        }
    }

    fn done(self) -> StepDone {
        self.done
    }
}

/// Sorts, merges and clips ranges a backend reported (it should already have, but a wrong map
/// would make a wrong copy).
fn normalize(mut ranges: Vec<Range<u64>>, within: &Range<u64>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let r = r.start.max(within.start)..r.end.min(within.end);
        if r.start >= r.end {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether sorted, disjoint `ranges` overlap `block`.
fn overlaps(ranges: &[Range<u64>], block: &Range<u64>) -> bool {
    let first = ranges.partition_point(|r| r.end <= block.start);
    ranges.get(first).is_some_and(|r| r.start < block.end)
}

fn sized(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
    buf.resize(len, 0);
    buf
}

/// A token bucket on bytes written: `governor`'s GCRA with a burst of one second's worth.
struct Throttle {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
    /// Bytes per token: 1 unless the limit exceeds `u32::MAX` bytes per second.
    unit_bytes: u64,
    burst: NonZeroU32,
}

impl Throttle {
    fn new(bytes_per_second: u64) -> Self {
        let unit_bytes = bytes_per_second.div_ceil(u64::from(u32::MAX)).max(1);
        let per_second = u32::try_from(bytes_per_second / unit_bytes).unwrap_or(u32::MAX);
        let burst = NonZeroU32::new(per_second.max(1)).expect("at least 1");
        let clock = DefaultClock::default();
        let limiter = governor::RateLimiter::direct_with_clock(Quota::per_second(burst), clock.clone());
        Throttle { limiter, clock, unit_bytes, burst }
    }

    /// Waits until `bytes` may be written, taking tokens in pieces no larger than the burst;
    /// `false` if `interrupt` was cancelled first (the tokens taken so far are spent).
    async fn acquire(&self, bytes: u64, interrupt: &StopToken) -> bool {
        let mut tokens = bytes.div_ceil(self.unit_bytes);
        while tokens > 0 {
            let piece = NonZeroU32::new(tokens.min(u64::from(self.burst.get())) as u32).expect("tokens > 0");
            loop {
                match self.limiter.check_n(piece) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        let wait = not_until.wait_time_from(self.clock.now());
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = interrupt.cancelled() => return false,
                        }
                    }
                    Err(_) => unreachable!("a piece is never larger than the burst"),
                }
            }
            tokens -= u64::from(piece.get());
        }
        true
    }
}

/// Bytes of a block of a verified extent: read, or known to be zero.
enum Bytes {
    Data(Vec<u8>),
    Zero(usize),
}

impl Bytes {
    fn len(&self) -> usize {
        match self {
            Bytes::Data(d) => d.len(),
            Bytes::Zero(n) => *n,
        }
    }
}

/// An incremental hash, per [`Verify`].
enum Hasher {
    Blake3(Box<blake3::Hasher>),
    Xxh3(Box<xxhash_rust::xxh3::Xxh3Default>),
}

impl Hasher {
    fn new(algorithm: Verify) -> Self {
        match algorithm {
            Verify::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            Verify::Xxh3 => Hasher::Xxh3(Box::new(xxhash_rust::xxh3::Xxh3Default::new())),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
            Hasher::Xxh3(h) => h.update(bytes),
        }
    }

    fn absorb(&mut self, bytes: &Bytes) {
        match bytes {
            Bytes::Data(d) => self.update(d),
            Bytes::Zero(mut n) => {
                while n > 0 {
                    let piece = n.min(ZEROES.len());
                    self.update(&ZEROES[..piece]);
                    n -= piece;
                }
            }
        }
    }

    fn finish(&self) -> Vec<u8> {
        match self {
            Hasher::Blake3(h) => h.finalize().as_bytes().to_vec(),
            Hasher::Xxh3(h) => h.digest128().to_be_bytes().to_vec(),
        }
    }
}

fn digest_len(algorithm: Verify) -> usize {
    match algorithm {
        Verify::Blake3 => 32,
        Verify::Xxh3 => 16,
    }
}

fn hash(algorithm: Verify, bytes: &[u8]) -> Vec<u8> {
    let mut hasher = Hasher::new(algorithm);
    hasher.update(bytes);
    hasher.finish()
}

/// `d_i = H(d_{i-1} || e_i)`, in hex; `previous` is `d_{i-1}` in hex (`None` for `d_0`, empty).
fn chain(algorithm: Verify, previous: Option<&str>, extent_digest: &[u8]) -> Result<String, ExecError> {
    let mut input = match previous {
        Some(hex) => decode_hex(hex).ok_or_else(|| permanent(format!("progress digest {hex} is not hex")))?,
        None => Vec::new(),
    };
    input.extend_from_slice(extent_digest);
    Ok(encode_hex(&hash(algorithm, &input)))
}

/// The digest a verified copy of `volume` records (see the module docs): a checker's reference.
/// `None` for an empty volume.
pub fn volume_digest(algorithm: Verify, extent_size_bytes: u64, volume: &[u8]) -> Option<String> {
    assert!(extent_size_bytes > 0, "extents are not empty");
    let mut digest = VolumeDigest::new(algorithm);
    volume.chunks(extent_size_bytes as usize).for_each(|extent| digest.push_extent(extent));
    digest.finish()
}

/// [`volume_digest`] one extent at a time, for volumes too large to hold in memory: push every
/// extent of the volume in order (the last may be short), then finish.
#[derive(Clone, Debug)]
pub struct VolumeDigest {
    algorithm: Verify,
    chain: Option<String>,
}

impl VolumeDigest {
    /// An empty digest.
    pub fn new(algorithm: Verify) -> Self {
        VolumeDigest { algorithm, chain: None }
    }

    /// Adds the next extent.
    pub fn push_extent(&mut self, extent: &[u8]) {
        let e = hash(self.algorithm, extent);
        self.chain = Some(chain(self.algorithm, self.chain.as_deref(), &e).expect("our own hex decodes"));
    }

    /// The digest; `None` if no extent was pushed.
    pub fn finish(self) -> Option<String> {
        self.chain
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect()
}

impl CopyRun {
    /// Hashes extent `index` on the source snapshot and on the target; returns the source's
    /// digest `e_i`, or a temporary error (and marks the extent for repair) if they differ.
    async fn verify_extent(&mut self, index: u64, extent: Range<u64>, algorithm: Verify) -> Result<Vec<u8>, ExecError> {
        let (source, target) = futures::try_join!(
            async { self.source.allocated(extent.clone()).await.map_err(failed("mapping the source to verify")) },
            async { self.target.allocated(extent.clone()).await.map_err(failed("mapping the target to verify")) },
        )?;
        let (source, target) = (normalize(source, &extent), normalize(target, &extent));
        let this = &*self;
        let mut reads = stream::iter(this.blocks(extent.clone()))
            .map(|block| {
                let (on_source, on_target) = (overlaps(&source, &block), overlaps(&target, &block));
                async move {
                    futures::try_join!(
                        this.read_source_to_verify(on_source, &block),
                        this.read_target_to_verify(on_target, &block),
                    )
                }
            })
            .buffered(this.blocks_in_flight);
        let mut hashers = (Hasher::new(algorithm), Hasher::new(algorithm));
        while let Some(pair) = reads.next().await {
            hashers = absorb(hashers, pair?).await?;
        }
        drop(reads);
        let (on_source, on_target) = (hashers.0.finish(), hashers.1.finish());
        if on_source != on_target {
            self.repair.insert(index);
            return Err(ExecError::Temporary(format!(
                "verification failed: extent {extent:?} of target {} hashes to {} but the source snapshot's to {}; \
                 it will be compared block by block and repaired",
                self.target_ref.volume,
                encode_hex(&on_target),
                encode_hex(&on_source)
            )));
        }
        self.repair.remove(&index);
        Ok(on_source)
    }

    async fn read_source_to_verify(&self, allocated: bool, block: &Range<u64>) -> Result<Bytes, ExecError> {
        let len = (block.end - block.start) as usize;
        if !allocated {
            return Ok(Bytes::Zero(len));
        }
        let what = format!("reading the source at {} to verify", block.start);
        self.source.read(block.start, vec![0; len]).await.map(Bytes::Data).map_err(failed(what))
    }

    async fn read_target_to_verify(&self, allocated: bool, block: &Range<u64>) -> Result<Bytes, ExecError> {
        let len = (block.end - block.start) as usize;
        if !allocated {
            return Ok(Bytes::Zero(len));
        }
        let what = format!("reading the target at {} to verify", block.start);
        self.target.read(block.start, vec![0; len]).await.map(Bytes::Data).map_err(failed(what))
    }
}

/// Feeds one block of each side to its hasher: inline if small, on the blocking pool if not.
async fn absorb(
    mut hashers: (Hasher, Hasher),
    (source, target): (Bytes, Bytes),
) -> Result<(Hasher, Hasher), ExecError> {
    if source.len() <= INLINE_HASH_MAX_BYTES {
        hashers.0.absorb(&source);
        hashers.1.absorb(&target);
        // Blocks that need no I/O (holes) arrive ready: give the node's thread back between
        // blocks, so that a long run of them cannot starve the session and the actors.
        tokio::task::yield_now().await;
        return Ok(hashers);
    }
    let work = tokio::task::spawn_blocking(move || {
        hashers.0.absorb(&source);
        hashers.1.absorb(&target);
        hashers
    });
    match work.await {
        Ok(hashers) => Ok(hashers),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ExecError::Temporary(format!("hashing was cancelled: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    /// A licence for `task` that no session guards.
    fn licence(task: &Task) -> Licence {
        Licence::unlimited(crate::model::WriterLease::new(task.id, 1))
    }

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::copy::{HookAction, MemoryBackend, MemoryCall, MemoryOp};
    use crate::model::{CopyOptions, RecordVersions, TaskControl, TaskStatus, VolumeId};

    const BLOCK: u64 = 4096;
    const EXTENT: u64 = 16 * BLOCK;

    fn vol(host: &str, name: &str) -> VolumeRef {
        VolumeRef { hosts: vec![host.into()], volume: VolumeId::new(name).unwrap() }
    }

    fn options() -> CopyOptions {
        CopyOptions {
            extent_size_bytes: EXTENT,
            block_size_bytes: BLOCK as u32,
            blocks_in_flight: 4,
            ..CopyOptions::default()
        }
    }

    /// Non-zero bytes that differ with `seed`.
    fn pattern(seed: u8, len: u64) -> Vec<u8> {
        (0..len).map(|i| ((i * 31 + u64::from(seed)) % 251) as u8 + 1).collect()
    }

    struct Fixture {
        backend: MemoryBackend,
        engine: CopyEngine,
        task: Task,
        source: VolumeRef,
        target: VolumeRef,
        size: u64,
    }

    impl Fixture {
        fn new(size: u64, options: CopyOptions, base: Option<&str>) -> Self {
            let backend = MemoryBackend::new();
            let (source, target) = (vol("198.51.100.1:10201", "src"), vol("203.0.113.1:10201", "dst"));
            backend.create_volume(&source, size);
            backend.create_volume(&target, size);
            let spec = CopyVolumeSpec {
                source_volume: source.volume.clone(),
                target_volume: target.volume.clone(),
                source_hosts: source.hosts.clone(),
                target_hosts: target.hosts.clone(),
                base_snapshot: base.map(|b| SnapshotId::new(b).unwrap()),
                options,
            };
            let task = Task {
                id: TaskId::generate(),
                control: TaskControl::new(TaskSpec::CopyVolume(spec), None, 0),
                status: TaskStatus::pending(0),
                progress: TaskProgress::default(),
                versions: RecordVersions::default(),
            };
            let engine = CopyEngine::new(Arc::new(backend.clone()));
            Fixture { backend, engine, task, source, target, size }
        }

        fn snapshot(&self) -> SnapshotId {
            CopyEngine::snapshot_name(&self.task.id)
        }

        /// Gives source and target the same base snapshot `name` of the source's current bytes.
        async fn make_base(&self, name: &str) {
            let name = SnapshotId::new(name).unwrap();
            for range in self.backend.allocated_ranges(&self.source) {
                let bytes = self.backend.read_all(&self.source)[range.start as usize..range.end as usize].to_vec();
                self.backend.write_volume(&self.target, range.start, &bytes);
            }
            self.backend.create_snapshot(&self.source, &name).await.unwrap();
            self.backend.create_snapshot(&self.target, &name).await.unwrap();
        }

        /// Runs the task from `progress` to the end, as a controller would without stops.
        async fn run(&self, mut progress: TaskProgress) -> TaskProgress {
            let mut run = self.engine.start(&self.task, &licence(&self.task), &mut progress).await.unwrap();
            let stop = StopToken::new();
            while run.step(&mut progress, &stop).await.unwrap() == Step::More {
                assert!(progress.cursor_bytes % BLOCK == 0);
            }
            run.finish(&mut progress).await.unwrap();
            progress
        }

        fn assert_exact(&self, progress: &TaskProgress) {
            let expected = self.backend.read_snapshot(&self.source, &self.snapshot());
            assert!(self.backend.read_all(&self.target) == expected, "the target differs from the source snapshot");
            assert_eq!(progress.cursor_bytes, self.size);
            assert_eq!(progress.counters.total(), self.size, "{:?}", progress.counters);
            assert_eq!(progress.total_bytes, Some(self.size));
            assert_eq!(self.backend.read_snapshot(&self.target, &self.snapshot()), expected);
        }

        /// Counts the calls that match `which`, through the backend's hook.
        fn count(&self, which: impl Fn(&MemoryCall) -> bool + Send + Sync + 'static) -> Arc<AtomicU64> {
            let counter = Arc::new(AtomicU64::new(0));
            let c = counter.clone();
            self.backend.set_hook(move |call| {
                if which(call) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                HookAction::Proceed
            });
            counter
        }
    }

    fn block(n: u64) -> u64 {
        n * BLOCK
    }

    #[tokio::test]
    async fn full_copy_is_exact_counts_every_byte_and_zeroes_only_where_the_target_has_data() {
        // 3 extents and a short one, ending in a short block.
        let size = 3 * EXTENT + 2 * BLOCK + 904;
        let f = Fixture::new(size, options(), None);
        // Source: data in blocks 0-3, 20, 49 (partly: one page of a block is a hole), 50 and the
        // short tail; allocated zeroes in blocks 8-9 and 30; holes elsewhere.
        f.backend.write_volume(&f.source, 0, &pattern(1, block(4)));
        f.backend.write_volume(&f.source, block(20), &pattern(2, BLOCK));
        f.backend.write_volume(&f.source, block(49) + 100, &pattern(3, 10));
        f.backend.write_volume(&f.source, block(50), &pattern(4, size - block(50)));
        f.backend.write_volume(&f.source, block(8), &vec![0; 2 * BLOCK as usize]);
        f.backend.write_volume(&f.source, block(30), &vec![0; BLOCK as usize]);
        // Target garbage: under data (overwritten), under a hole (block 5), under zeroes
        // (block 9), and allocated zeroes under a hole (block 40: zeroed too, the map says data).
        for b in [2, 5, 9, 40] {
            f.backend.write_volume(&f.target, block(b), &pattern(9, BLOCK));
        }
        f.backend.write_volume(&f.target, block(40), &vec![0; BLOCK as usize]);

        let progress = f.run(TaskProgress::default()).await;
        f.assert_exact(&progress);
        let c = progress.counters;
        let data_bytes = block(4) + 2 * BLOCK + (size - block(50));
        assert_eq!(c.bytes_copied, data_bytes);
        assert_eq!(c.bytes_skipped_zero, 3 * BLOCK);
        assert_eq!(c.bytes_skipped_hole, size - data_bytes - 3 * BLOCK);
        assert_eq!(c.bytes_skipped_unchanged, 0);
        assert_eq!(f.backend.calls(MemoryOp::Zero), 3, "blocks 5, 9 and 40 only");
        assert_eq!(f.backend.calls(MemoryOp::Write), 4 + 1 + 1 + 1);
        // The target stays as sparse as the source.
        assert_eq!(
            f.backend.allocated_ranges(&f.target),
            f.backend.allocated_ranges(&f.source)[..]
                .iter()
                .filter(|r| !(r.start >= block(8) && r.end <= block(10)) && r.start != block(30))
                .cloned()
                .collect::<Vec<_>>()
        );
        // One allocated() on the source and one on the target per step.
        assert_eq!(f.backend.calls(MemoryOp::Allocated), 2 * 4);
        assert_eq!(progress.source_snapshot, Some(f.snapshot()));
        assert!(progress.rate_bytes_per_second > 0);
        assert_eq!(progress.digest, None);
    }

    fn size_of_fixture() -> u64 {
        2 * EXTENT
    }

    /// Source and target share base `b`; then the source changes.
    async fn incremental_fixture(granularity: Option<u64>) -> Fixture {
        let size = size_of_fixture();
        let f = Fixture::new(size, options(), Some("b"));
        f.backend.write_volume(&f.source, 0, &pattern(1, block(12)));
        f.backend.write_volume(&f.source, block(20), &pattern(2, block(4)));
        f.make_base("b").await;
        // Changes: block 1 rewritten, block 3 same bytes again, block 5 zero-filled (allocated),
        // blocks 6-7 punched, block 16 new data, block 21 one byte changed.
        f.backend.write_volume(&f.source, block(1), &pattern(7, BLOCK));
        f.backend.write_volume(&f.source, block(3), &pattern(1, block(4))[block(3) as usize..]);
        f.backend.write_volume(&f.source, block(5), &vec![0; BLOCK as usize]);
        f.backend.zero_volume(&f.source, block(6)..block(8));
        f.backend.write_volume(&f.source, block(16), &pattern(8, BLOCK));
        f.backend.write_volume(&f.source, block(21) + 7, &[0]);
        f.backend.set_changed_ranges(granularity);
        f
    }

    #[tokio::test]
    async fn incremental_copies_only_blocks_that_differ_from_the_base() {
        for granularity in [None, Some(BLOCK), Some(2 * EXTENT)] {
            let f = incremental_fixture(granularity).await;
            let snapshot = f.snapshot();
            let source_reads = f.count(move |c| c.op == MemoryOp::Read && c.snapshot.as_ref() == Some(&snapshot));
            let progress = f.run(TaskProgress::default()).await;
            f.assert_exact(&progress);
            let c = progress.counters;
            assert_eq!(c.bytes_copied, 3 * BLOCK, "{granularity:?}: blocks 1, 16 and 21");
            assert_eq!(f.backend.calls(MemoryOp::Write), 3);
            assert_eq!(f.backend.calls(MemoryOp::Zero), 3, "{granularity:?}: blocks 5, 6 and 7 held base data");
            assert_eq!(f.backend.calls(MemoryOp::Flush), 2 + 1);
            let reads = source_reads.load(Ordering::SeqCst);
            match granularity {
                // Exact: only the changed blocks are even read.
                Some(BLOCK) => {
                    assert_eq!(reads, 4, "blocks 1, 5, 16, 21 (3 holds the same bytes, 6-7 are holes now)");
                }
                _ => {
                    assert_eq!(reads, 12 - 2 + 4 + 1);
                }
            }
            // 15 allocated source blocks: 1, 16, 21 copied, 5 zero, the rest unchanged.
            assert_eq!(c.bytes_skipped_unchanged, block(11), "{granularity:?}");
            assert_eq!(c.bytes_skipped_zero, BLOCK);
            assert_eq!(c.bytes_skipped_hole, size_of_fixture() - block(15));
        }
    }

    #[tokio::test]
    async fn target_diff_writes_only_what_the_target_lacks() {
        let size = 2 * EXTENT;
        let mut opts = options();
        opts.target_diff = true;
        let f = Fixture::new(size, opts, None);
        f.backend.write_volume(&f.source, 0, &pattern(1, block(10)));
        f.backend.write_volume(&f.target, 0, &pattern(1, block(10)));
        // The target lacks block 2 (a hole), differs in block 4, holds data under source holes at
        // 12 and 20, and allocated zeroes under a source hole at 25 (left alone: it reads zero).
        f.backend.zero_volume(&f.target, block(2)..block(3));
        f.backend.write_volume(&f.target, block(4) + 1, &[0xee]);
        f.backend.write_volume(&f.target, block(12), &pattern(5, BLOCK));
        f.backend.write_volume(&f.target, block(20), &pattern(5, BLOCK));
        f.backend.write_volume(&f.target, block(25), &vec![0; BLOCK as usize]);
        let progress = f.run(TaskProgress::default()).await;
        f.assert_exact(&progress);
        let c = progress.counters;
        assert_eq!(c.bytes_copied, 2 * BLOCK);
        assert_eq!(c.bytes_skipped_unchanged, 8 * BLOCK);
        assert_eq!(c.bytes_skipped_hole, size - block(10));
        assert_eq!(f.backend.calls(MemoryOp::Write), 2);
        assert_eq!(f.backend.calls(MemoryOp::Zero), 2);
    }

    #[tokio::test]
    async fn a_stop_ends_the_step_at_a_block_boundary_and_the_run_resumes() {
        let size = 2 * EXTENT;
        let f = Fixture::new(size, options(), None);
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        let stop = StopToken::new();
        let (reads, cancel) = (AtomicU64::new(0), stop.clone());
        f.backend.set_hook(move |c| {
            if c.op == MemoryOp::Read && reads.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                cancel.cancel();
            }
            HookAction::Proceed
        });
        let mut progress = TaskProgress::default();
        let mut run = f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
        let cursor = progress.cursor_bytes;
        assert!(cursor % BLOCK == 0 && (block(5)..EXTENT).contains(&cursor), "cursor {cursor}");
        assert_eq!(progress.counters.total(), cursor);
        assert_eq!(progress.counters.bytes_copied, cursor);
        let target = f.backend.read_all(&f.target);
        assert!(target[..cursor as usize] == pattern(1, size)[..cursor as usize]);
        assert!(target[cursor as usize..].iter().all(|&b| b == 0), "nothing launched past the mark");
        // A step with a cancelled token launches nothing.
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
        assert_eq!(progress.cursor_bytes, cursor);

        f.backend.clear_hook();
        let progress = f.run(progress).await;
        f.assert_exact(&progress);
        assert_eq!(progress.counters.bytes_copied, size);
    }

    #[tokio::test]
    async fn blocks_completing_out_of_order_move_the_mark_only_when_contiguous() {
        let size = EXTENT;
        let mut opts = options();
        opts.blocks_in_flight = 4;
        let f = Fixture::new(size, opts, None);
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        let stop = StopToken::new();
        let cancel = stop.clone();
        let writes = Arc::new(Mutex::new(Vec::new()));
        let order = writes.clone();
        f.backend.set_hook(move |c| match c.op {
            // Stop while the first 4 blocks are in flight; block 0 is the slowest.
            MemoryOp::Read if c.range.start == 0 => {
                cancel.cancel();
                HookAction::Delay(Duration::from_millis(60))
            }
            MemoryOp::Read => HookAction::Delay(Duration::from_millis(10)),
            MemoryOp::Write => {
                order.lock().unwrap().push(c.range.start / BLOCK);
                HookAction::Proceed
            }
            _ => HookAction::Proceed,
        });
        let mut progress = TaskProgress::default();
        let mut run = f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
        let mut writes = writes.lock().unwrap().clone();
        assert_eq!(writes.pop(), Some(0), "block 0 completed last");
        writes.sort();
        assert_eq!(writes, vec![1, 2, 3]);
        assert_eq!(progress.cursor_bytes, block(4), "the mark waited for block 0, then passed 0-3");
        assert_eq!(progress.counters.bytes_copied, block(4));

        // The mark itself: completions 2, 1, 3 leave it at 0 until block 0 completes.
        let copied = Outcome { class: Class::Copied, zeroed: false };
        let hole = Outcome { class: Class::Hole, zeroed: true };
        let mut mark = HighWater::new(block(8), 5);
        for (i, outcome) in [(2, copied), (1, hole), (4, copied)] {
            mark.complete(i, block(8 + i as u64)..block(9 + i as u64), outcome);
            assert_eq!(mark.done.reached, block(8));
        }
        mark.complete(0, block(8)..block(9), copied);
        let done = mark.done();
        assert_eq!(done.reached, block(11), "blocks 0-2 are contiguous, 3 is missing");
        assert_eq!((done.counters.bytes_copied, done.counters.bytes_skipped_hole), (2 * BLOCK, BLOCK));
        assert_eq!(done.zeroed_bytes, BLOCK);
    }

    #[tokio::test]
    async fn a_failed_block_fails_the_step_and_leaves_progress_alone() {
        let size = 2 * EXTENT;
        let f = Fixture::new(size, options(), None);
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        let mut progress = TaskProgress::default();
        let mut run = f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
        let stop = StopToken::new();
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
        let committed = progress.clone();

        f.backend.fail_nth(MemoryOp::Read, 6, BackendError::Temporary("peer unreachable".into()));
        let err = run.step(&mut progress, &stop).await.unwrap_err();
        assert!(
            matches!(&err, ExecError::Temporary(m) if m.contains("reading the source") && m.contains("peer unreachable")),
            "{err:?}"
        );
        assert_eq!(progress, committed);
        // The controller retries the same run from the last commit.
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::Done);

        f.backend.fail_next(MemoryOp::Write, BackendError::Permanent("no space".into()));
        let mut progress = committed.clone();
        let err = run.step(&mut progress, &stop).await.unwrap_err();
        assert!(matches!(&err, ExecError::Permanent(m) if m.contains("no space")), "{err:?}");
        assert_eq!(progress, committed);

        f.backend.fail_next(MemoryOp::OpenTarget, BackendError::Temporary("busy".into()));
        let err = f.engine.start(&f.task, &licence(&f.task), &mut TaskProgress::default()).await.err().unwrap();
        assert!(matches!(err, ExecError::Temporary(_)), "{err:?}");
        f.backend.fail_next(MemoryOp::Flush, BackendError::Temporary("busy".into()));
        let mut progress = committed.clone();
        assert!(matches!(run.step(&mut progress, &stop).await, Err(ExecError::Temporary(_))));
        assert_eq!(progress, committed, "nothing is recorded before the flush succeeds");
        assert_eq!(ExecError::from(BackendError::Permanent("x".into())), ExecError::Permanent("x".into()));
    }

    #[tokio::test]
    async fn sizes_snapshots_and_progress_are_checked_at_start() {
        let f = Fixture::new(EXTENT, options(), None);
        f.backend.create_volume(&f.target, EXTENT + BLOCK);
        let err = f.engine.start(&f.task, &licence(&f.task), &mut TaskProgress::default()).await.err().unwrap();
        let ExecError::Permanent(m) = err else { panic!("{err:?}") };
        assert!(m.contains(&EXTENT.to_string()) && m.contains(&(EXTENT + BLOCK).to_string()), "{m}");

        // A resumed run needs its source snapshot.
        let f = Fixture::new(EXTENT, options(), None);
        let mut progress = TaskProgress::default();
        f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
        assert_eq!(progress.source_snapshot, Some(f.snapshot()));
        f.backend.delete_snapshot(&f.source, &f.snapshot());
        let err = f.engine.start(&f.task, &licence(&f.task), &mut progress.clone()).await.err().unwrap();
        assert!(matches!(&err, ExecError::Permanent(m) if m.contains("is gone")), "{err:?}");

        // Progress that does not fit.
        let f = Fixture::new(EXTENT, options(), None);
        for bad in [
            TaskProgress { cursor_bytes: 100, ..TaskProgress::default() },
            TaskProgress { total_bytes: Some(1), ..TaskProgress::default() },
            TaskProgress { cursor_bytes: 2 * EXTENT, ..TaskProgress::default() },
        ] {
            let mut progress = TaskProgress { source_snapshot: Some(f.snapshot()), ..bad };
            f.backend.create_snapshot(&f.source, &f.snapshot()).await.unwrap();
            assert!(matches!(
                f.engine.start(&f.task, &licence(&f.task), &mut progress).await,
                Err(ExecError::Permanent(_))
            ));
        }
    }

    #[tokio::test]
    async fn an_incremental_copy_needs_the_base_on_both_sides() {
        let f = Fixture::new(EXTENT, options(), Some("b"));
        let err = f.engine.start(&f.task, &licence(&f.task), &mut TaskProgress::default()).await.err().unwrap();
        assert!(matches!(&err, ExecError::Permanent(m) if m.contains("source") && m.contains("run a full copy")));

        f.backend.create_snapshot(&f.source, &SnapshotId::new("b").unwrap()).await.unwrap();
        let err = f.engine.start(&f.task, &licence(&f.task), &mut TaskProgress::default()).await.err().unwrap();
        assert_eq!(err, ExecError::Permanent("target does not hold base snapshot b; run a full copy".into()));
    }

    #[tokio::test]
    async fn verify_keeps_a_digest_chain_across_stops_and_resumes() {
        for algorithm in [Verify::Blake3, Verify::Xxh3] {
            let size = 3 * EXTENT - BLOCK;
            let mut opts = options();
            opts.verify = Some(algorithm);
            let f = Fixture::new(size, opts, None);
            f.backend.write_volume(&f.source, BLOCK, &pattern(3, 2 * EXTENT));
            // Stop in the middle of the second extent, then resume in a new run.
            let stop = StopToken::new();
            let (reads, cancel) = (AtomicU64::new(0), stop.clone());
            let snapshot = f.snapshot();
            f.backend.set_hook(move |c| {
                let copy_read = c.op == MemoryOp::Read && c.snapshot.as_ref() == Some(&snapshot);
                if copy_read && c.range.start >= EXTENT + block(5) && reads.fetch_add(1, Ordering::SeqCst) == 0 {
                    cancel.cancel();
                }
                HookAction::Proceed
            });
            let mut progress = TaskProgress::default();
            let mut run = f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
            assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
            let first = progress.digest.clone().expect("a completed extent is hashed");
            assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
            assert!(progress.cursor_bytes > EXTENT && progress.cursor_bytes < 2 * EXTENT);
            assert_eq!(progress.digest.as_deref(), Some(first.as_str()), "a partial extent is not hashed");
            f.backend.clear_hook();

            let progress = f.run(progress).await;
            f.assert_exact(&progress);
            let source = f.backend.read_snapshot(&f.source, &f.snapshot());
            assert_eq!(progress.digest, volume_digest(algorithm, EXTENT, &source));
            assert_eq!(progress.digest.unwrap().len(), 2 * digest_len(algorithm));
        }
    }

    #[tokio::test]
    async fn a_verify_mismatch_is_temporary_and_the_retry_repairs_the_extent() {
        let mut opts = options();
        opts.verify = Some(Verify::Blake3);
        opts.block_size_bytes = (INLINE_HASH_MAX_BYTES * 2) as u32; // hash on the blocking pool
        opts.extent_size_bytes = 2 * u64::from(opts.block_size_bytes);
        let size = 2 * opts.extent_size_bytes;
        let f = Fixture::new(size, opts, Some("b"));
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        f.make_base("b").await;
        // The target drifted from the base after its snapshot: an incremental copy skips there.
        f.backend.write_volume(&f.target, 100, &[0]);
        let mut progress = TaskProgress::default();
        let mut run = f.engine.start(&f.task, &licence(&f.task), &mut progress).await.unwrap();
        let committed = progress.clone();
        let err = run.step(&mut progress, &StopToken::new()).await.unwrap_err();
        assert!(matches!(&err, ExecError::Temporary(m) if m.contains("verification failed")), "{err:?}");
        assert_eq!(progress, committed);
        // The retry compares that extent with the target and repairs it.
        while run.step(&mut progress, &StopToken::new()).await.unwrap() == Step::More {}
        run.finish(&mut progress).await.unwrap();
        f.assert_exact(&progress);
        assert_eq!(progress.counters.bytes_copied, u64::from(progress_block(&f)));
        assert_eq!(progress.digest, volume_digest(Verify::Blake3, size / 2, &f.backend.read_all(&f.source)));
    }

    fn progress_block(f: &Fixture) -> u32 {
        let TaskSpec::CopyVolume(spec) = &f.task.control.spec;
        spec.options.block_size_bytes
    }

    #[tokio::test]
    async fn the_bandwidth_limit_paces_writes() {
        let mut opts = options();
        opts.bandwidth_limit_bytes_per_second = Some(400 << 10);
        let size = 600 << 10;
        let f = Fixture::new(size, opts, None);
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        let started = Instant::now();
        let progress = f.run(TaskProgress::default()).await;
        f.assert_exact(&progress);
        // A burst of 400 KiB, then 200 KiB at 400 KiB/s.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5), "{elapsed:?}");

        // Limits beyond u32::MAX bytes per second count tokens in larger units.
        let throttle = Throttle::new(10 << 30);
        assert!(throttle.unit_bytes > 1);
        let started = Instant::now();
        assert!(throttle.acquire(1 << 30, &StopToken::new()).await);
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_kill_loses_only_uncommitted_work() {
        let size = 3 * EXTENT;
        let f = Fixture::new(size, options(), None);
        f.backend.track_unflushed(true);
        f.backend.write_volume(&f.source, 0, &pattern(1, size));
        let writes = AtomicU64::new(0);
        // The 20th write hangs: the step is frozen after writing part of extent 1, unflushed.
        f.backend.set_hook(move |c| match c.op {
            MemoryOp::Write if writes.fetch_add(1, Ordering::SeqCst) + 1 == 20 => HookAction::Hang,
            _ => HookAction::Proceed,
        });
        let mut committed = TaskProgress::default();
        let mut run = f.engine.start(&f.task, &licence(&f.task), &mut committed).await.unwrap();
        let stop = StopToken::new();
        let mut progress = committed.clone();
        assert_eq!(run.step(&mut progress, &stop).await.unwrap(), Step::More);
        committed = progress.clone();
        let step = run.step(&mut progress, &stop);
        assert!(tokio::time::timeout(Duration::from_millis(50), step).await.is_err(), "the step hangs");
        drop(run);
        assert!(f.backend.lose_unflushed(&f.target) > 0);
        f.backend.clear_hook();
        let progress = f.run(committed).await;
        f.assert_exact(&progress);
    }

    #[test]
    fn ranges_are_normalized_and_overlap_is_exact() {
        let within = 10..100;
        assert_eq!(normalize(vec![50..60, 0..12, 55..70, 90..200, 120..130], &within), vec![10..12, 50..70, 90..100]);
        let ranges = [10..12, 50..70];
        assert!(overlaps(&ranges, &(11..20)));
        assert!(!overlaps(&ranges, &(12..50)));
        assert!(overlaps(&ranges, &(0..100)));
        assert!(!overlaps(&ranges, &(70..80)));
        assert!(!overlaps(&[], &(0..1)));
    }

    #[test]
    fn the_digest_is_a_chain_of_extent_digests() {
        let volume = pattern(1, 10_000);
        let (e1, e2) = (hash(Verify::Blake3, &volume[..8192]), hash(Verify::Blake3, &volume[8192..]));
        let d1 = blake3::hash(&e1);
        let d2 = blake3::hash(&[d1.as_bytes().as_slice(), &e2].concat());
        assert_eq!(volume_digest(Verify::Blake3, 8192, &volume), Some(d2.to_hex().to_string()));
        assert_eq!(volume_digest(Verify::Xxh3, 8192, &[]), None);
        let x = xxhash_rust::xxh3::xxh3_128(&xxhash_rust::xxh3::xxh3_128(&volume).to_be_bytes());
        assert_eq!(volume_digest(Verify::Xxh3, 1 << 20, &volume), Some(format!("{x:032x}")));
        assert_eq!(decode_hex(&encode_hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[tokio::test]
    async fn a_bandwidth_wait_ends_when_interrupted() {
        let throttle = Throttle::new(1);
        let stop = StopToken::new();
        let later = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            later.cancel();
        });
        let started = Instant::now();
        assert!(!throttle.acquire(64 << 10, &stop).await);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
