//! The file backend: volumes and snapshots as sparse image files under one root directory.
//!
//! Real enough to back the examples, the benchmarks and a single-machine deployment; a storage
//! daemon implements [`CopyBackend`] over its own block service instead. Linux only (it uses
//! `SEEK_DATA`/`SEEK_HOLE`, `fallocate` and `FICLONE`).
//!
//! # Layout
//!
//! ```text
//! <root>/<host>/volumes/<volume>.img                  a volume
//! <root>/<host>/volumes/<volume>.lock                 its writer lock (flock), and who holds it
//! <root>/<host>/volumes/<volume>.lease                the newest writer lease it admitted
//! <root>/<host>/snapshots/<volume>/<snapshot>.img     a snapshot of it
//! <root>/<host>/snapshots/<volume>/.<snapshot>.img.<pid>.<n>.tmp   a snapshot being written
//! ```
//!
//! `<host>` is the **first** entry of [`VolumeRef::hosts`], with every byte outside
//! `[A-Za-z0-9._-]` replaced by `_` and a leading `.` replaced by `_` (so `..` or `/` cannot
//! climb out of the root), or `_` if there is no host. A volume is found through its first host
//! only: the other hosts of the list are ignored, and listing the hosts in another order names
//! another directory. Volume and snapshot names are [`VolumeId`](crate::model::VolumeId) and
//! [`SnapshotId`] values, which admit only `[A-Za-z0-9._-]` and never `.` or `..`. A host is at
//! most 255 bytes once validated ([`CopyVolumeSpec`](crate::model::CopyVolumeSpec)), which is
//! the longest file name Linux takes.
//!
//! # What is atomic
//!
//! - **Creating a snapshot** ([`CopyBackend::create_snapshot`]) writes a temporary file next to
//!   the snapshot, `fsync`s it, then hard-links it under the real name and `fsync`s the
//!   directory. The link appears whole or not at all, so a crash never leaves a half snapshot
//!   under the real name, and it never replaces a snapshot that exists (two creators racing: the
//!   first one wins, the second returns `Ok` and changes nothing, as the contract asks).
//! - **Creating a volume** ([`FileBackend::create_volume`]) goes the same way, so a volume file
//!   always has its full size.
//! - Directories created on the way are `fsync`ed into their parents.
//! - Writes are not atomic and not durable until [`WriteVolume::flush`] (`fdatasync`) returns.
//!
//! # Fencing: one writer per volume
//!
//! [`CopyBackend::open_target`] takes the volume's **writer lock**, an exclusive `flock` on
//! `<volume>.lock`, before it opens the image for writing, and holds it until the handle and every
//! call in flight on it are gone (the lock's descriptor closes after the image's). While one
//! process (or one handle in this process) holds it, another `open_target` of the volume waits up
//! to [`WRITER_LOCK_WAIT`] and then fails with [`BackendError::Busy`] naming the holder (its
//! pid and lease, written into the lock file): the engine retries with backoff. So at most one
//! handle can write a volume at any instant, on this host, and the kernel drops the lock when its
//! process dies, however it dies (`kill -9` included): a dead writer never blocks a volume.
//!
//! Under the lock, `open_target` compares the caller's [`WriterLease`] with the volume's newest,
//! in `<volume>.lease` (JSON, replaced atomically: a temporary file, `fsync`, `rename`, `fsync` of
//! the directory, before the handle is returned). An older lease is refused with
//! [`BackendError::Fenced`]; a newer one becomes the newest. A runner that lost its claim and
//! tries to reopen the target is refused, even after every newer writer closed it.
//!
//! What it protects: processes on **one host** (or one kernel) writing through this backend. What
//! it does not: writers on other hosts of a shared filesystem (NFS locks are advisory and lease-
//! based), or anything that writes the image without the backend. A writer frozen (`SIGSTOP`, a
//! disk that never answers) keeps the lock: the volume waits for it to run again or die, rather
//! than risk two writers; a frozen runner that runs again finds its local lease lapsed and closes
//! the volume without writing (see [`crate::lease`]).
//!
//! # How a snapshot is copied
//!
//! 1. **Reflink** (`ioctl(FICLONE)`) where the filesystem shares extents (btrfs, XFS with
//!    reflink, bcachefs): instant, takes no space until the volume is written, and is a
//!    point-in-time copy even while the volume is written.
//! 2. Otherwise (ext4, tmpfs, or across filesystems) a **sparse copy**: the temporary file gets
//!    the volume's length, then only the data ranges found with `SEEK_DATA`/`SEEK_HOLE` are
//!    copied, 1 MiB at a time, skipping chunks that are all zeroes, so holes stay holes. It is a
//!    point-in-time copy only if nothing writes the volume meanwhile (the copy engine writes
//!    targets only, and snapshots its source before it starts).
//!
//! The choice is made at run time, per snapshot: the reflink is tried first and an
//! "unsupported" answer falls back to the sparse copy. [`FileBackend::take_snapshot`] says which
//! path was taken (and a `debug` event records it); [`FileBackend::with_reflink`] turns the
//! reflink off.
//!
//! # Concurrency and I/O
//!
//! Every file operation runs on tokio's blocking pool (`spawn_blocking`), never on an async
//! thread. `open_snapshot` and `open_target` open the file once and share it (`Arc<File>`);
//! reads and writes are positioned (`pread`/`pwrite`, looped until the whole buffer is done), so
//! concurrent calls need no lock. [`ReadVolume::allocated`] moves the shared descriptor's file
//! offset with `lseek`, which positioned I/O ignores.
//!
//! # Limits
//!
//! - Change tracking only where snapshots are reflinks: [`CopyBackend::changed_ranges`]
//!   compares the two snapshot files' extent maps (`FIEMAP`): a range that both map to the
//!   same physical blocks is unchanged (see `fiemap.rs` for why that holds and what counts as
//!   changed). Where the two files share no extent (ext4, tmpfs, snapshots made by copying) it
//!   returns `Ok(None)` and the engine compares blocks itself.
//! - [`ReadVolume::allocated`] reports what the filesystem reports, at its block granularity
//!   (4 KiB on ext4), possibly more than was written (allowed by the contract).
//! - [`WriteVolume::zero`] punches a hole (`FALLOC_FL_PUNCH_HOLE`); on a filesystem that
//!   cannot, it writes zeroes, 1 MiB at a time.
//! - A crash while a snapshot or volume is being created can leave a `.*.tmp` file in its
//!   directory; it is never read and can be deleted when no snapshot is being taken.
//! - Reads and writes past the volume's size are refused ([`BackendError::Permanent`]), so a
//!   volume never grows.
//!
//! # Errors
//!
//! I/O errors that retrying can cure (interrupted, would block, timed out, busy) are
//! [`BackendError::Temporary`]; all others (not found, invalid input, no space, permissions, ...)
//! are [`BackendError::Permanent`]. Every message names the operation, the path and the OS
//! message.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tracing::debug;

use super::backend::{BackendError, BackendResult, CopyBackend, ReadVolume, VolumeRef, WriteVolume};
use super::fiemap;
use crate::model::{SnapshotId, WriterLease};

/// How long [`CopyBackend::open_target`] waits for a volume's writer lock held by another handle
/// before it answers [`BackendError::Busy`] (the engine retries with backoff).
pub const WRITER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes moved per read or write when copying a snapshot or writing zeroes: large enough to
/// stream, small enough that the buffer does not matter.
const CHUNK_BYTES: usize = 1 << 20;

/// What [`ReadVolume::preferred_io_bytes`] says: each read or write is a trip through tokio's
/// blocking pool (two thread hand-offs), which costs as much as copying tens of KiB from the page
/// cache, so larger calls go faster; past 1 MiB they gain little and hold more memory.
const PREFERRED_IO_BYTES: u64 = 1 << 20;

/// Reads up to this many bytes are first tried on the calling (async) thread from the page
/// cache; larger ones go to the blocking pool, where several copy at once on several cores and
/// the hand-off costs little next to the copy.
const INLINE_READ_MAX_BYTES: usize = 256 << 10;

/// Bytes written to an open volume between two starts of write-back
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk writes while the copy goes on, instead of
/// all at the next `fdatasync`, and the dirty pages never pile up to the kernel's own threshold.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Numbers temporary files within this process (with the pid, their names are unique).
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// How [`FileBackend::take_snapshot`] made a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// The snapshot existed already; nothing was done.
    Existed,
    /// Cloned by reflink (`FICLONE`): shared extents, no data copied.
    Reflink,
    /// Copied: only the volume's data ranges, so holes stay holes.
    SparseCopy,
}

/// A [`CopyBackend`] over sparse image files under a root directory (Linux only).
///
/// A volume is `<root>/<host>/volumes/<volume>.img` and its snapshots are
/// `<root>/<host>/snapshots/<volume>/<snapshot>.img`, where `<host>` is the volume's **first**
/// host with bytes outside `[A-Za-z0-9._-]` replaced by `_`: the other hosts are ignored.
/// Snapshots appear atomically (a temporary file, `fsync`ed, then linked under its name) and are
/// cloned by reflink where the filesystem can, else copied sparsely (data ranges only); see
/// [`FileBackend::take_snapshot`]. Every call runs its file I/O on tokio's blocking pool; reads
/// and writes are positioned, so concurrent calls on one open volume need no lock. The backend
/// keeps no change log ([`CopyBackend::changed_ranges`] is `Ok(None)`). `src/copy/file.rs`
/// documents the design and its limits in full.
///
/// ```
/// use task_center::copy::{BackendError, CopyBackend, FileBackend, VolumeRef, WriterLease};
/// use task_center::model::{SnapshotId, TaskId, VolumeId};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let backend = FileBackend::new(dir.path());
/// let volume = VolumeRef { hosts: vec!["198.51.100.1:10201".into()], volume: VolumeId::new("vol-a")? };
/// backend.create_volume(&volume, 64 << 20).await?; // 64 MiB, sparse
///
/// // Written under a writer lease: a task and the epoch of its claim.
/// let lease = WriterLease::new(TaskId::generate(), 7);
/// let target = backend.open_target(&volume, &lease).await?;
/// target.write(1 << 20, vec![7; 4096]).await?;
/// target.flush().await?;
/// assert_eq!(target.allocated(0..64 << 20).await?, vec![(1 << 20)..(1 << 20) + 4096]);
/// target.snapshot(&SnapshotId::new("s1")?).await?;
/// assert!(backend.snapshot_path(&volume, &SnapshotId::new("s1")?).ends_with("snapshots/vol-a/s1.img"));
/// drop(target); // lets the writer lock go
///
/// // A writer under an older lease is refused, even once the newer one has let go.
/// let stale = WriterLease::new(TaskId::generate(), 6);
/// assert!(matches!(backend.open_target(&volume, &stale).await, Err(BackendError::Fenced(_))));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FileBackend {
    root: PathBuf,
    reflink: bool,
}

impl FileBackend {
    /// A backend keeping its files under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileBackend { root: root.into(), reflink: true }
    }

    /// Whether snapshots try a reflink before the sparse copy. Default `true`; turn it off to
    /// exercise the sparse copy, or to keep snapshots from sharing extents with their volume.
    pub fn with_reflink(mut self, enabled: bool) -> Self {
        self.reflink = enabled;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image file of a volume: `<root>/<host>/volumes/<volume>.img`.
    pub fn volume_path(&self, volume: &VolumeRef) -> PathBuf {
        self.host_dir(volume).join("volumes").join(format!("{}.img", volume.volume))
    }

    /// The writer lock of a volume: `<root>/<host>/volumes/<volume>.lock`.
    pub fn lock_path(&self, volume: &VolumeRef) -> PathBuf {
        self.host_dir(volume).join("volumes").join(format!("{}.lock", volume.volume))
    }

    /// The newest writer lease a volume admitted: `<root>/<host>/volumes/<volume>.lease`.
    pub fn lease_path(&self, volume: &VolumeRef) -> PathBuf {
        self.host_dir(volume).join("volumes").join(format!("{}.lease", volume.volume))
    }

    /// The newest writer lease `volume` has admitted, if any.
    pub async fn newest_lease(&self, volume: &VolumeRef) -> BackendResult<Option<WriterLease>> {
        let path = self.lease_path(volume);
        blocking(move || read_lease(&path)).await
    }

    /// The image file of a snapshot: `<root>/<host>/snapshots/<volume>/<snapshot>.img`.
    pub fn snapshot_path(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> PathBuf {
        self.host_dir(volume).join("snapshots").join(volume.volume.as_str()).join(format!("{snapshot}.img"))
    }

    /// Creates a volume of `size_bytes` bytes, all a hole (sparse). Succeeds if it exists with
    /// that size already; [`BackendError::Permanent`] if it exists with another size.
    pub async fn create_volume(&self, volume: &VolumeRef, size_bytes: u64) -> BackendResult<()> {
        let path = self.volume_path(volume);
        blocking(move || create_volume_blocking(&path, size_bytes)).await
    }

    /// Deletes a snapshot. Succeeds if it does not exist.
    pub async fn delete_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<()> {
        let path = self.snapshot_path(volume, snapshot);
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(io_error("delete snapshot", &path, err)),
            }
            let dir = parent(&path);
            sync_dir(dir).map_err(|err| io_error("fsync directory", dir, err))
        })
        .await
    }

    /// [`CopyBackend::create_snapshot`], saying how the snapshot was made.
    ///
    /// Nothing is done if the snapshot exists ([`SnapshotMethod::Existed`]). Otherwise the volume
    /// goes into a temporary file next to the snapshot, which is `fsync`ed and then linked under
    /// the snapshot's name (never replacing one), and the directory is `fsync`ed: a crash leaves
    /// no half snapshot under the real name. The copy is a reflink (`FICLONE`: shared extents,
    /// instant, point-in-time) where the filesystem supports it, otherwise, decided at run time,
    /// a sparse copy of the data ranges only (`SEEK_DATA`/`SEEK_HOLE`), so holes stay holes; the
    /// sparse copy is point-in-time only if nothing writes the volume meanwhile.
    pub async fn take_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<SnapshotMethod> {
        let source = self.volume_path(volume);
        let target = self.snapshot_path(volume, snapshot);
        let reflink = self.reflink;
        let method = blocking(move || snapshot_blocking(&source, &target, reflink)).await?;
        debug!(volume = %volume.volume, %snapshot, ?method, "file backend: snapshot");
        Ok(method)
    }

    /// `<root>/<host>`, from the first host (see the module docs).
    fn host_dir(&self, volume: &VolumeRef) -> PathBuf {
        let host = host_dir_name(volume.hosts.first().map(String::as_str).unwrap_or(""));
        debug_assert!(matches!(
            Path::new(&host).components().collect::<Vec<_>>().as_slice(),
            [std::path::Component::Normal(_)]
        ));
        self.root.join(host)
    }
}

/// A host as one file name: bytes outside `[A-Za-z0-9._-]` and a leading `.` become `_`.
fn host_dir_name(host: &str) -> String {
    let mut name: String = host
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' { char::from(b) } else { '_' })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        name.replace_range(..name.len().min(1), "_");
    }
    name
}

#[async_trait]
impl CopyBackend for FileBackend {
    async fn create_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<()> {
        self.take_snapshot(volume, snapshot).await.map(drop)
    }

    async fn snapshot_exists(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<bool> {
        let path = self.snapshot_path(volume, snapshot);
        blocking(move || path.try_exists().map_err(|err| io_error("look for snapshot", &path, err))).await
    }

    async fn open_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<Box<dyn ReadVolume>> {
        let path = self.snapshot_path(volume, snapshot);
        Ok(Box::new(ImageFile::open(path, false, "open snapshot").await?))
    }

    /// Takes the volume's writer lock, admits `lease` (see [Fencing](crate::copy::FileBackend)),
    /// then opens the image.
    async fn open_target(&self, volume: &VolumeRef, lease: &WriterLease) -> BackendResult<Box<dyn WriteVolume>> {
        let path = self.volume_path(volume);
        let (lock_path, lease_path) = (self.lock_path(volume), self.lease_path(volume));
        let snapshots = parent(&self.snapshot_path(volume, &SnapshotId::new("x").expect("a valid name"))).to_path_buf();
        let (lease, reflink, name) = (*lease, self.reflink, volume.volume.to_string());
        blocking(move || {
            existing_len(&path)?.ok_or_else(|| io_error("open volume", &path, ErrorKind::NotFound.into()))?;
            let lock = lock_writer(&lock_path, &lease)?;
            let newest = read_lease(&lease_path)?;
            if !lease.admits_after(newest.as_ref()) {
                let newest = newest.expect("a lease refuses only after a newer one");
                return Err(BackendError::Fenced(format!(
                    "volume {name} admitted writer lease {newest}; {lease} is older and may not write it"
                )));
            }
            if newest != Some(lease) {
                write_lease(&lease_path, &lease)?;
            }
            let image = ImageFile::open_blocking(path, true, "open volume", Some(lock))?;
            Ok(Box::new(TargetFile { image, lease, snapshots, reflink }) as Box<dyn WriteVolume>)
        })
        .await
    }

    /// From the extent maps of the two snapshot files (see the module's limits): `Ok(None)`
    /// when they are on different filesystems, the filesystem has no `FIEMAP`, or the files
    /// share no extent in `range` though both hold data there (no reflinks: nothing to learn
    /// from the maps).
    async fn changed_ranges(
        &self,
        volume: &VolumeRef,
        from: &SnapshotId,
        to: &SnapshotId,
        range: Range<u64>,
    ) -> BackendResult<Option<Vec<Range<u64>>>> {
        let (from, to) = (self.snapshot_path(volume, from), self.snapshot_path(volume, to));
        blocking(move || {
            let open = |path: &Path| File::open(path).map_err(|err| io_error("open snapshot", path, err));
            let (a, b) = (open(&from)?, open(&to)?);
            let device = |file: &File, path: &Path| {
                file.metadata().map(|meta| meta.dev()).map_err(|err| io_error("stat", path, err))
            };
            if device(&a, &from)? != device(&b, &to)? {
                return Ok(None);
            }
            let map = |file: &File, path: &Path| {
                fiemap::mappings(file, range.clone()).map_err(|err| io_error("map extents of", path, err))
            };
            let (Some(a), Some(b)) = (map(&a, &from)?, map(&b, &to)?) else { return Ok(None) };
            // With data on both sides but no block shared, the maps cannot tell equal bytes from
            // different ones (no reflinks here). Where one side is all holes they can: its
            // holes against the other's data are the changes.
            let both_hold_data = !a.is_empty() && !b.is_empty();
            if both_hold_data && !a.iter().chain(&b).any(|mapping| mapping.shared) {
                return Ok(None);
            }
            Ok(Some(fiemap::differing(&a, &b, range)))
        })
        .await
    }
}

/// An open image, and the writer lock it was opened under (closed after the image).
struct Opened {
    file: File,
    _lock: Option<File>,
}

impl std::ops::Deref for Opened {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

/// An open volume or snapshot file, shared by every call on it.
struct ImageFile {
    file: Arc<Opened>,
    path: Arc<Path>,
    size: u64,
    /// Bytes written through this handle; write-back starts each time it passes a multiple of
    /// [`WRITEBACK_BYTES`].
    written: Arc<AtomicU64>,
}

impl ImageFile {
    async fn open(path: PathBuf, writable: bool, what: &'static str) -> BackendResult<Self> {
        blocking(move || ImageFile::open_blocking(path, writable, what, None)).await
    }

    fn open_blocking(path: PathBuf, writable: bool, what: &'static str, lock: Option<File>) -> BackendResult<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(&path);
        let file = file.map_err(|err| io_error(what, &path, err))?;
        let size = file.metadata().map_err(|err| io_error("stat", &path, err))?.len();
        let file = Arc::new(Opened { file, _lock: lock });
        Ok(ImageFile { file, path: path.into(), size, written: Arc::default() })
    }

    /// Refuses `len` bytes at `offset` unless they lie inside the file.
    fn check_range(&self, what: &str, offset: u64, len: u64) -> BackendResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::Permanent(format!(
                "{what} {len} bytes at {offset} of {}: past its end ({} bytes)",
                self.path.display(),
                self.size
            ))),
        }
    }

    /// Runs `f` on the blocking pool with the file, mapping its error with the path.
    async fn run<T: Send + 'static>(
        &self,
        what: impl fmt::Display + Send + 'static,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> BackendResult<T> {
        let (file, path) = (self.file.clone(), self.path.clone());
        blocking(move || f(&file).map_err(|err| io_error(what, &path, err))).await
    }
}

#[async_trait]
impl ReadVolume for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn preferred_io_bytes(&self) -> u64 {
        PREFERRED_IO_BYTES
    }

    async fn allocated(&self, range: Range<u64>) -> BackendResult<Vec<Range<u64>>> {
        self.check_range("look up", range.start, range.end.saturating_sub(range.start))?;
        let what = format!("look up data in {range:?} of");
        self.run(what, move |file| {
            let mut ranges = Vec::new();
            let mut pos = range.start;
            while let Some(data) = next_data(file, pos, range.end)? {
                pos = data.end;
                ranges.push(data);
            }
            Ok(ranges)
        })
        .await
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> BackendResult<Vec<u8>> {
        self.check_range("read", offset, buf.len() as u64)?;
        let cached = if buf.len() <= INLINE_READ_MAX_BYTES { read_cached(&self.file, &mut buf, offset) } else { 0 };
        if cached == buf.len() {
            return Ok(buf);
        }
        let what = format!("read {} bytes at {offset} from", buf.len());
        self.run(what, move |file| file.read_exact_at(&mut buf[cached..], offset + cached as u64).map(|()| buf)).await
    }
}

/// A volume opened for writing under its writer lock and a lease.
struct TargetFile {
    image: ImageFile,
    lease: WriterLease,
    /// `<root>/<host>/snapshots/<volume>`.
    snapshots: PathBuf,
    reflink: bool,
}

#[async_trait]
impl ReadVolume for TargetFile {
    fn size(&self) -> u64 {
        self.image.size
    }

    fn preferred_io_bytes(&self) -> u64 {
        PREFERRED_IO_BYTES
    }

    async fn allocated(&self, range: Range<u64>) -> BackendResult<Vec<Range<u64>>> {
        self.image.allocated(range).await
    }

    async fn read(&self, offset: u64, buf: Vec<u8>) -> BackendResult<Vec<u8>> {
        self.image.read(offset, buf).await
    }
}

#[async_trait]
impl WriteVolume for TargetFile {
    async fn write(&self, offset: u64, data: Vec<u8>) -> BackendResult<Vec<u8>> {
        let image = &self.image;
        image.check_range("write", offset, data.len() as u64)?;
        let what = format!("write {} bytes at {offset} to", data.len());
        let written = image.written.clone();
        image
            .run(what, move |file| {
                file.write_all_at(&data, offset)?;
                let len = data.len() as u64;
                let before = written.fetch_add(len, Ordering::Relaxed);
                if (before + len) / WRITEBACK_BYTES != before / WRITEBACK_BYTES {
                    start_writeback(file)?;
                }
                Ok(data)
            })
            .await
    }

    async fn zero(&self, range: Range<u64>) -> BackendResult<()> {
        self.image.check_range("zero", range.start, range.end.saturating_sub(range.start))?;
        let what = format!("zero {range:?} of");
        self.image.run(what, move |file| zero_range(file, range)).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.image.run("fdatasync", File::sync_data).await
    }

    async fn snapshot(&self, snapshot: &SnapshotId) -> BackendResult<()> {
        self.flush().await?;
        let target = self.snapshots.join(format!("{snapshot}.img"));
        let (file, path, reflink) = (self.image.file.clone(), self.image.path.clone(), self.reflink);
        let method = blocking(move || snapshot_of(&file, &path, &target, reflink)).await?;
        debug!(volume = %self.image.path.display(), %snapshot, ?method, "file backend: target snapshot");
        Ok(())
    }

    fn lease(&self) -> &WriterLease {
        &self.lease
    }
}

/// Runs blocking file work on tokio's blocking pool. A panic in it is resumed here.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> BackendResult<T> + Send + 'static) -> BackendResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(BackendError::Temporary(format!("file backend: blocking task did not run: {err}"))),
    }
}

/// `what path: OS message`, [`BackendError::Temporary`] only where retrying can cure it.
fn io_error(what: impl fmt::Display, path: &Path, err: io::Error) -> BackendError {
    let message = format!("{what} {}: {err}", path.display());
    match err.kind() {
        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::ResourceBusy => {
            BackendError::Temporary(message)
        }
        // NotFound, InvalidInput, StorageFull (and EDQUOT), PermissionDenied, UnexpectedEof, ...
        _ => BackendError::Permanent(message),
    }
}

/// The first data range at or after `pos`, clipped to `end`; `None` if there is no more data
/// before `end`.
fn next_data(file: &File, pos: u64, end: u64) -> io::Result<Option<Range<u64>>> {
    if pos >= end {
        return Ok(None);
    }
    let Some(data) = seek(file, pos, libc::SEEK_DATA)? else { return Ok(None) };
    if data >= end {
        return Ok(None);
    }
    // There is always a hole at the end of the file, so SEEK_HOLE finds one; ENXIO here means the
    // file shrank meanwhile.
    let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end);
    // A hole punched between the two calls can make `hole == data`: report a byte rather than
    // loop forever (reporting more than allocated is allowed).
    Ok(Some(data..hole.clamp(data + 1, end)))
}

/// `lseek(fd, offset, whence)`; `None` on ENXIO (no data, or no hole, at or after `offset`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor that `file` keeps open; it touches no memory.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

/// Reads the start of `buf` at `offset` from the page cache only (`preadv2(RWF_NOWAIT)`: it
/// returns at once rather than wait for the disk or a lock, so it may run on an async thread).
/// Returns how many bytes it read: all of `buf` when it was cached, fewer (often none) when
/// not, or on any error (the blocking read that follows reports it).
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let Ok(at) = libc::off_t::try_from(offset + done as u64) else { break };
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        // SAFETY: `iov` points into `buf`, which outlives the call and is not otherwise
        // borrowed; the descriptor is kept open by `file`.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n <= 0 {
            break; // EAGAIN (not cached), EOPNOTSUPP, end of file, or an error
        }
        done += n as usize;
    }
    done
}

/// Starts writing back every dirty page of `file` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); durability still takes `fdatasync`.
fn start_writeback(file: &File) -> io::Result<()> {
    // SAFETY: sync_file_range on a descriptor that `file` keeps open; it touches no memory.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Not supported here (a filesystem without it): the next fdatasync writes everything.
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE | libc::EINTR) => Ok(()),
        _ => Err(err),
    }
}

/// Makes `range` read as zeroes: punches a hole, or writes zeroes where the filesystem cannot.
fn zero_range(file: &File, range: Range<u64>) -> io::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let too_big = || io::Error::from(ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(range.start).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(range.end - range.start).map_err(|_| too_big())?;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let err = loop {
        // SAFETY: fallocate on a descriptor that `file` keeps open; it touches no memory.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            break err;
        }
    };
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeroes = vec![0; CHUNK_BYTES.min((range.end - range.start) as usize)];
    let mut pos = range.start;
    while pos < range.end {
        let n = zeroes.len().min((range.end - pos) as usize);
        file.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn create_volume_blocking(path: &Path, size_bytes: u64) -> BackendResult<()> {
    if let Some(existing) = existing_len(path)? {
        return check_volume_size(path, existing, size_bytes);
    }
    let temp = TempFile::create(path)?;
    temp.file.set_len(size_bytes).map_err(|err| io_error("set length of", &temp.path, err))?;
    if temp.publish(path)? {
        return Ok(());
    }
    // Created by someone else meanwhile.
    check_volume_size(path, existing_len(path)?.unwrap_or(size_bytes), size_bytes)
}

fn check_volume_size(path: &Path, existing: u64, size_bytes: u64) -> BackendResult<()> {
    if existing == size_bytes {
        return Ok(());
    }
    Err(BackendError::Permanent(format!(
        "create volume {}: exists with {existing} bytes, not {size_bytes}",
        path.display()
    )))
}

/// The length of the file at `path`, `None` if there is none.
fn existing_len(path: &Path) -> BackendResult<Option<u64>> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.len())),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error("stat", path, err)),
    }
}

fn snapshot_blocking(source: &Path, target: &Path, reflink: bool) -> BackendResult<SnapshotMethod> {
    if target.try_exists().map_err(|err| io_error("look for snapshot", target, err))? {
        return Ok(SnapshotMethod::Existed);
    }
    let volume = File::open(source).map_err(|err| io_error("open volume", source, err))?;
    snapshot_of(&volume, source, target, reflink)
}

/// Snapshots the open `volume` as `target` (see [`FileBackend::take_snapshot`]).
fn snapshot_of(volume: &File, source: &Path, target: &Path, reflink: bool) -> BackendResult<SnapshotMethod> {
    if target.try_exists().map_err(|err| io_error("look for snapshot", target, err))? {
        return Ok(SnapshotMethod::Existed);
    }
    let temp = TempFile::create(target)?;
    let reflinked = reflink && try_reflink(volume, &temp.file).map_err(|err| io_error("reflink", source, err))?;
    let method = if reflinked {
        SnapshotMethod::Reflink
    } else {
        sparse_copy(volume, &temp.file).map_err(|err| io_error("copy volume", source, err))?;
        SnapshotMethod::SparseCopy
    };
    // Lost a race with another creator: theirs is the snapshot.
    Ok(if temp.publish(target)? { method } else { SnapshotMethod::Existed })
}

/// Clones `source` into `target` by reflink; `false` if the filesystem cannot.
fn try_reflink(source: &File, target: &File) -> io::Result<bool> {
    loop {
        // SAFETY: FICLONE takes the source descriptor as its argument; both files stay open.
        if unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // No reflink on this filesystem (or between two filesystems).
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Copies `source` into the empty `target`: same length, only the data ranges, skipping chunks
/// of zeroes, so holes stay holes.
fn sparse_copy(source: &File, target: &File) -> io::Result<()> {
    let size = source.metadata()?.len();
    target.set_len(size)?;
    let mut buf = vec![0; CHUNK_BYTES];
    let mut pos = 0;
    while let Some(data) = next_data(source, pos, size)? {
        pos = data.start;
        while pos < data.end {
            let chunk = &mut buf[..CHUNK_BYTES.min((data.end - pos) as usize)];
            source.read_exact_at(chunk, pos)?;
            if chunk.iter().any(|&b| b != 0) {
                target.write_all_at(chunk, pos)?;
            }
            pos += chunk.len() as u64;
        }
    }
    Ok(())
}

/// A file being written next to its final name; removed when dropped (after it is published
/// under the final name, or on an error).
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    /// Creates `.<name>.<pid>.<n>.tmp` next to `target`, and the directories to it.
    fn create(target: &Path) -> BackendResult<Self> {
        let dir = parent(target);
        create_dir_durable(dir).map_err(|err| io_error("create directory", dir, err))?;
        let name = target.file_name().expect("image paths end in a file name").to_string_lossy();
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path);
        let file = file.map_err(|err| io_error("create", &path, err))?;
        Ok(TempFile { path, file })
    }

    /// Makes the file durable and links it as `target`, unless `target` exists (then `false`,
    /// and nothing changes). Either way the temporary name is gone once this returns.
    fn publish(self, target: &Path) -> BackendResult<bool> {
        self.file.sync_all().map_err(|err| io_error("fsync", &self.path, err))?;
        let linked = match fs::hard_link(&self.path, target) {
            Ok(()) => true,
            Err(err) if err.kind() == ErrorKind::AlreadyExists => false,
            Err(err) => return Err(io_error(format!("link {} as", self.path.display()), target, err)),
        };
        drop(self);
        let dir = parent(target);
        sync_dir(dir).map_err(|err| io_error("fsync directory", dir, err))?;
        Ok(linked)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The directory of an image path (they all have one: they are built under the root).
fn parent(path: &Path) -> &Path {
    path.parent().expect("image paths are built under the root")
}

/// `mkdir -p`, `fsync`ing each directory it creates into its parent.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new(""));
    create_dir_durable(parent)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }),
        Err(err) if err.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err),
    }
}

/// `fsync`s a directory, making the names created or removed in it durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes the writer lock at `path` (creating the file), waiting up to [`WRITER_LOCK_WAIT`]; then
/// records in it who holds it. [`BackendError::Busy`] naming the holder if it stays taken.
fn lock_writer(path: &Path, lease: &WriterLease) -> BackendResult<File> {
    let dir = parent(path);
    create_dir_durable(dir).map_err(|err| io_error("create directory", dir, err))?;
    let lock = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
    let lock = lock.map_err(|err| io_error("open writer lock", path, err))?;
    let deadline = std::time::Instant::now() + WRITER_LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor that `lock` keeps open; it touches no memory.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) && err.kind() != ErrorKind::Interrupted {
            return Err(io_error("take writer lock", path, err));
        }
        if std::time::Instant::now() >= deadline {
            let holder = fs::read_to_string(path).unwrap_or_default();
            let holder = holder.trim();
            let holder = if holder.is_empty() { "another handle" } else { holder };
            return Err(BackendError::Busy(format!(
                "volume is being written by {holder} (writer lock {} held for more than {} ms)",
                path.display(),
                WRITER_LOCK_WAIT.as_millis()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let holder = format!("pid {} under {lease}\n", std::process::id());
    let record = lock.set_len(0).and_then(|()| lock.write_all_at(holder.as_bytes(), 0));
    record.map_err(|err| io_error("record the holder in", path, err))?;
    Ok(lock)
}

/// The lease recorded at `path`; `None` if there is none.
fn read_lease(path: &Path) -> BackendResult<Option<WriterLease>> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|err| {
            BackendError::Permanent(format!("writer lease record {} is damaged: {err}", path.display()))
        }),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error("read writer lease", path, err)),
    }
}

/// Replaces the lease record at `path` atomically and durably.
fn write_lease(path: &Path, lease: &WriterLease) -> BackendResult<()> {
    let dir = parent(path);
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().expect("lease paths end in a file name").to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let data = serde_json::to_vec(lease).expect("a lease serializes");
    let written = (|| {
        let file = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        file.write_all_at(&data, 0)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map_err(|err| io_error("write writer lease", path, err))
}
