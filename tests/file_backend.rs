//! The file backend against real sparse files in a temporary directory: allocation maps, holes,
//! punching, snapshots (independent, sparse, idempotent), errors that name the path, concurrent
//! positioned I/O.
//!
//! Offsets are 1 MiB-aligned so that the filesystem's block granularity (4 KiB on ext4) cannot
//! blur what "allocated" means.
//!
//! Change tracking needs a filesystem with reflinks: those tests run on a loop-mounted XFS
//! ([`common::reflinkfs`]; root required).

mod common;

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use common::reflinkfs::ReflinkFs;

use task_center::copy::{BackendError, CopyBackend, FileBackend, SnapshotMethod, VolumeRef, WriteVolume};
use task_center::model::{SnapshotId, VolumeId};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn volume(name: &str) -> VolumeRef {
    VolumeRef {
        hosts: vec!["198.51.100.1:10201".into(), "198.51.100.2:10201".into()],
        volume: VolumeId::new(name).unwrap(),
    }
}

fn snap(name: &str) -> SnapshotId {
    SnapshotId::new(name).unwrap()
}

/// A backend in a fresh directory, with a volume of `size` bytes opened for writing.
async fn setup(size: u64) -> (tempfile::TempDir, FileBackend, VolumeRef, Box<dyn WriteVolume>) {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::new(dir.path());
    let vol = volume("vol-a");
    backend.create_volume(&vol, size).await.unwrap();
    let target = backend.open_target(&vol, &setup_lease()).await.unwrap();
    (dir, backend, vol, target)
}

/// 512-byte blocks the file at `path` holds on disk.
fn blocks(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

fn permanent(err: BackendError) -> String {
    match err {
        BackendError::Permanent(message) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocated_ranges_match_writes_and_holes_read_zero() {
    let (_dir, backend, vol, target) = setup(64 * MIB).await;
    assert_eq!(target.size(), 64 * MIB);
    assert_eq!(target.allocated(0..64 * MIB).await.unwrap(), Vec::<Range<u64>>::new(), "a new volume is a hole");
    assert!(blocks(&backend.volume_path(&vol)) == 0);

    target.write(MIB, pattern(1, 2 * MIB)).await.unwrap();
    target.write(10 * MIB, pattern(2, 4096)).await.unwrap();
    target.write(63 * MIB, pattern(3, MIB)).await.unwrap();
    let want = vec![MIB..3 * MIB, 10 * MIB..10 * MIB + 4096, 63 * MIB..64 * MIB];
    assert_eq!(target.allocated(0..64 * MIB).await.unwrap(), want);

    // Clipped to the range asked for.
    assert_eq!(
        target.allocated(2 * MIB..10 * MIB + 100).await.unwrap(),
        vec![2 * MIB..3 * MIB, 10 * MIB..10 * MIB + 100]
    );
    assert_eq!(target.allocated(4 * MIB..10 * MIB).await.unwrap(), Vec::<Range<u64>>::new());
    assert_eq!(target.allocated(5 * MIB..5 * MIB).await.unwrap(), Vec::<Range<u64>>::new());

    // Data reads back; holes read as zeroes, also into a dirty buffer.
    assert_eq!(target.read(MIB, vec![0; 2 * MIB as usize]).await.unwrap(), pattern(1, 2 * MIB));
    assert_eq!(target.read(10 * MIB, vec![0; 4096]).await.unwrap(), pattern(2, 4096));
    let hole = target.read(20 * MIB, vec![0xAA; MIB as usize]).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    // A read straddling data and hole.
    let mixed = target.read(3 * MIB - 4096, vec![0xAA; 8192]).await.unwrap();
    assert_eq!(&mixed[..4096], &pattern(1, 2 * MIB)[2 * MIB as usize - 4096..]);
    assert!(mixed[4096..].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_punches_a_hole_that_reads_zero() {
    let (_dir, backend, vol, target) = setup(64 * MIB).await;
    target.write(0, pattern(9, 8 * MIB)).await.unwrap();
    target.flush().await.unwrap();
    let path = backend.volume_path(&vol);
    let before = blocks(&path);
    assert!(before >= 8 * MIB / 512, "{before} blocks for 8 MiB");

    target.zero(2 * MIB..6 * MIB).await.unwrap();
    target.flush().await.unwrap();
    let after = blocks(&path);
    assert!(after <= before - 4 * MIB / 512, "punching 4 MiB freed too little: {before} -> {after} blocks");
    assert_eq!(target.allocated(0..64 * MIB).await.unwrap(), vec![0..2 * MIB, 6 * MIB..8 * MIB]);
    assert!(target.read(2 * MIB, vec![1; 4 * MIB as usize]).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(target.read(MIB, vec![0; MIB as usize]).await.unwrap(), pattern(9, 2 * MIB)[MIB as usize..]);
    assert_eq!(target.size(), 64 * MIB, "zeroing keeps the size");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * MIB);
    target.zero(MIB..MIB).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_an_independent_copy() {
    let (_dir, backend, vol, target) = setup(16 * MIB).await;
    target.write(MIB, pattern(1, MIB)).await.unwrap();
    let s1 = snap("s1");
    assert!(!backend.snapshot_exists(&vol, &s1).await.unwrap());
    backend.create_snapshot(&vol, &s1).await.unwrap();
    assert!(backend.snapshot_exists(&vol, &s1).await.unwrap());

    target.write(MIB, pattern(2, MIB)).await.unwrap();
    target.write(5 * MIB, pattern(3, MIB)).await.unwrap();
    target.zero(MIB..MIB + 4096).await.unwrap();

    let snapshot = backend.open_snapshot(&vol, &s1).await.unwrap();
    assert_eq!(snapshot.size(), 16 * MIB);
    assert_eq!(snapshot.read(MIB, vec![0; MIB as usize]).await.unwrap(), pattern(1, MIB));
    assert!(snapshot.read(5 * MIB, vec![1; MIB as usize]).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(snapshot.allocated(0..16 * MIB).await.unwrap(), vec![MIB..2 * MIB]);
    assert_eq!(backend.changed_ranges(&vol, &s1, &s1, 0..16 * MIB).await.unwrap(), None);

    // No temporary file is left behind.
    let dir = backend.snapshot_path(&vol, &s1).parent().unwrap().to_owned();
    let names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("s1.img")]);
}

/// The sparse copy, forced (it is also what ext4 and tmpfs get): a 1 GiB volume with 3 MiB of
/// data makes a snapshot of about 3 MiB on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_copy_keeps_holes() {
    let (_dir, backend, vol, target) = setup(GIB).await;
    let backend = backend.with_reflink(false);
    for (i, offset) in [0, 500 * MIB, GIB - MIB].into_iter().enumerate() {
        target.write(offset, pattern(i as u8, MIB)).await.unwrap();
    }
    target.flush().await.unwrap();

    let s1 = snap("sparse");
    assert_eq!(backend.take_snapshot(&vol, &s1).await.unwrap(), SnapshotMethod::SparseCopy);
    assert_eq!(backend.take_snapshot(&vol, &s1).await.unwrap(), SnapshotMethod::Existed);
    let (source_blocks, snapshot_blocks) =
        (blocks(&backend.volume_path(&vol)), blocks(&backend.snapshot_path(&vol, &s1)));
    assert!(
        snapshot_blocks <= source_blocks + 256, // + 128 KiB of metadata slack
        "snapshot holds {snapshot_blocks} blocks, its volume {source_blocks}"
    );
    assert!(snapshot_blocks >= 3 * MIB / 512, "{snapshot_blocks} blocks cannot hold 3 MiB");

    let snapshot = backend.open_snapshot(&vol, &s1).await.unwrap();
    assert_eq!(snapshot.size(), GIB);
    assert_eq!(snapshot.allocated(0..GIB).await.unwrap(), vec![0..MIB, 500 * MIB..501 * MIB, GIB - MIB..GIB]);
    assert_eq!(snapshot.read(500 * MIB, vec![0; MIB as usize]).await.unwrap(), pattern(1, MIB));
    assert_eq!(snapshot.read(GIB - MIB, vec![0; MIB as usize]).await.unwrap(), pattern(2, MIB));
}

/// Whatever this filesystem offers (reflink or not), a default snapshot is correct and sparse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_snapshot_method_is_chosen_at_run_time() {
    let (dir, backend, vol, target) = setup(GIB).await;
    target.write(100 * MIB, pattern(7, 3 * MIB)).await.unwrap();
    let method = backend.take_snapshot(&vol, &snap("s")).await.unwrap();
    println!("snapshot method on the filesystem of {}: {method:?}", dir.path().display());
    assert!(matches!(method, SnapshotMethod::Reflink | SnapshotMethod::SparseCopy), "{method:?}");
    assert!(blocks(&backend.snapshot_path(&vol, &snap("s"))) < 8 * MIB / 512);
    let snapshot = backend.open_snapshot(&vol, &snap("s")).await.unwrap();
    assert_eq!(snapshot.read(100 * MIB, vec![0; 3 * MIB as usize]).await.unwrap(), pattern(7, 3 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshot_twice_changes_nothing() {
    let (_dir, backend, vol, target) = setup(8 * MIB).await;
    target.write(0, pattern(1, MIB)).await.unwrap();
    let s = snap("s");
    backend.create_snapshot(&vol, &s).await.unwrap();
    target.write(0, pattern(2, MIB)).await.unwrap();
    backend.create_snapshot(&vol, &s).await.unwrap();
    let snapshot = backend.open_snapshot(&vol, &s).await.unwrap();
    assert_eq!(snapshot.read(0, vec![0; MIB as usize]).await.unwrap(), pattern(1, MIB), "the second call copied again");

    backend.delete_snapshot(&vol, &s).await.unwrap();
    assert!(!backend.snapshot_exists(&vol, &s).await.unwrap());
    backend.delete_snapshot(&vol, &s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_files_are_permanent_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::new(dir.path());
    let vol = volume("missing");
    let s = snap("s1");
    let volume_path = backend.volume_path(&vol).display().to_string();
    let snapshot_path = backend.snapshot_path(&vol, &s).display().to_string();

    let message = permanent(backend.open_target(&vol, &setup_lease()).await.err().unwrap());
    assert!(message.contains(&volume_path), "{message}");
    let message = permanent(backend.open_snapshot(&vol, &s).await.err().unwrap());
    assert!(message.contains(&snapshot_path), "{message}");
    let message = permanent(backend.create_snapshot(&vol, &s).await.unwrap_err());
    assert!(message.contains(&volume_path), "{message}");
    assert!(!backend.snapshot_exists(&vol, &s).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_for_one_size() {
    let (_dir, backend, vol, target) = setup(8 * MIB).await;
    target.write(0, pattern(1, 4096)).await.unwrap();
    backend.create_volume(&vol, 8 * MIB).await.unwrap();
    assert_eq!(target.read(0, vec![0; 4096]).await.unwrap(), pattern(1, 4096), "recreating kept the data");
    let message = permanent(backend.create_volume(&vol, 16 * MIB).await.unwrap_err());
    assert!(
        message.contains(&backend.volume_path(&vol).display().to_string()) && message.contains("8388608"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_past_the_end_is_refused() {
    let (_dir, backend, vol, target) = setup(4 * MIB).await;
    for err in [
        target.write(4 * MIB - 4096, vec![1; 8192]).await.unwrap_err(),
        target.read(4 * MIB, vec![0; 1]).await.unwrap_err(),
        target.zero(0..5 * MIB).await.unwrap_err(),
        target.allocated(0..u64::MAX).await.unwrap_err(),
    ] {
        let message = permanent(err);
        assert!(message.contains("past its end"), "{message}");
    }
    assert_eq!(std::fs::metadata(backend.volume_path(&vol)).unwrap().len(), 4 * MIB, "the volume did not grow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_and_reads_all_land() {
    let (_dir, _backend, _vol, target) = setup(64 * MIB).await;
    let target: Arc<dyn WriteVolume> = Arc::from(target);
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let target = target.clone();
            tokio::spawn(async move {
                let offset = u64::from(i) * 4 * MIB;
                let data = pattern(i, MIB);
                let back = target.write(offset, data.clone()).await.unwrap();
                assert_eq!(back, data, "the buffer comes back");
                assert_eq!(target.read(offset, vec![0; MIB as usize]).await.unwrap(), data);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    target.flush().await.unwrap();
    let want: Vec<_> = (0..16).map(|i| i * 4 * MIB..i * 4 * MIB + MIB).collect();
    assert_eq!(target.allocated(0..64 * MIB).await.unwrap(), want);
    for i in 0..16u8 {
        let offset = u64::from(i) * 4 * MIB;
        assert_eq!(target.read(offset, vec![0; MIB as usize]).await.unwrap(), pattern(i, MIB), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_survives_reopening() {
    let (_dir, backend, vol, target) = setup(4 * MIB).await;
    target.write(2 * MIB, pattern(4, 4096)).await.unwrap();
    target.flush().await.unwrap();
    drop(target);
    let again = backend.open_target(&vol, &setup_lease()).await.unwrap();
    assert_eq!(again.read(2 * MIB, vec![0; 4096]).await.unwrap(), pattern(4, 4096));
}

#[test]
fn the_first_host_names_one_directory_under_the_root() {
    let backend = FileBackend::new("/srv/images");
    let at = |host: &str| {
        let vol = VolumeRef { hosts: vec![host.into(), "other".into()], volume: VolumeId::new("v").unwrap() };
        backend.volume_path(&vol)
    };
    assert_eq!(at("198.51.100.1:10201"), std::path::Path::new("/srv/images/198.51.100.1_10201/volumes/v.img"));
    assert_eq!(at("[2001:db8::1]:10201"), std::path::Path::new("/srv/images/_2001_db8__1__10201/volumes/v.img"));
    for (host, dir) in [("..", "_."), (".", "_"), ("../../etc", "_._.._etc"), ("a/b", "a_b"), ("", "_"), ("é", "__")] {
        let path = at(host);
        assert_eq!(path, std::path::Path::new("/srv/images").join(dir).join("volumes/v.img"), "{host:?}");
        assert_eq!(path.components().count(), 6, "{host:?} splits the path: {path:?}");
    }
    let none = VolumeRef { hosts: vec![], volume: VolumeId::new("v").unwrap() };
    assert_eq!(backend.snapshot_path(&none, &snap("s")), std::path::Path::new("/srv/images/_/snapshots/v/s.img"));
}

/// A backend in `dir` with volume `vol-a` of `size` bytes holding `data` (offset, seed, length),
/// flushed.
async fn volume_with(dir: &std::path::Path, size: u64, data: &[(u64, u8, u64)]) -> (FileBackend, VolumeRef) {
    let backend = FileBackend::new(dir);
    let vol = volume("vol-a");
    backend.create_volume(&vol, size).await.unwrap();
    let target = backend.open_target(&vol, &setup_lease()).await.unwrap();
    for &(offset, seed, len) in data {
        target.write(offset, pattern(seed, len)).await.unwrap();
    }
    target.flush().await.unwrap();
    (backend, vol)
}

/// On a filesystem with reflinks, two snapshots of one volume share every block that was not
/// written in between, and `changed_ranges` reports exactly the blocks that were: rewritten
/// data, a punched hole, new data in a former hole. Nothing else is reported, and nothing at all
/// between a snapshot and itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflink_snapshots_report_exactly_what_was_written_between_them() {
    let Some(fs) = ReflinkFs::new() else { return };
    let dir = fs.subdir();
    let (backend, vol) = volume_with(dir.path(), 64 * MIB, &[(0, 1, 8 * MIB), (16 * MIB, 2, 8 * MIB)]).await;
    assert_eq!(backend.take_snapshot(&vol, &snap("s1")).await.unwrap(), SnapshotMethod::Reflink);

    let written = [MIB + 8192..MIB + 12288, 5 * MIB..5 * MIB + 65536, 40 * MIB..40 * MIB + 4096];
    let punched = 17 * MIB..18 * MIB;
    let target = backend.open_target(&vol, &setup_lease()).await.unwrap();
    for (seed, range) in (10..).zip(&written) {
        target.write(range.start, pattern(seed, range.end - range.start)).await.unwrap();
    }
    target.zero(punched.clone()).await.unwrap();
    target.flush().await.unwrap();
    assert_eq!(backend.take_snapshot(&vol, &snap("s2")).await.unwrap(), SnapshotMethod::Reflink);

    let whole = 0..64 * MIB;
    let changed = backend.changed_ranges(&vol, &snap("s1"), &snap("s2"), whole.clone()).await.unwrap();
    let want = vec![written[0].clone(), written[1].clone(), punched, written[2].clone()];
    assert_eq!(changed, Some(want));
    // Clipped to the range asked for; a snapshot against itself: nothing changed.
    let part = backend.changed_ranges(&vol, &snap("s1"), &snap("s2"), 0..MIB + 10_000).await.unwrap();
    let want = std::iter::once(MIB + 8192..MIB + 10_000).collect::<Vec<_>>();
    assert_eq!(part, Some(want));
    let same = backend.changed_ranges(&vol, &snap("s2"), &snap("s2"), whole.clone()).await.unwrap();
    assert_eq!(same, Some(vec![]));

    // A volume punched whole after its only snapshot: the two snapshots share no block (the
    // first one alone holds its data now), and the second is all holes, so the maps still tell:
    // the changes are exactly the first one's data.
    let other = volume("vol-b");
    backend.create_volume(&other, 64 * MIB).await.unwrap();
    let target = backend.open_target(&other, &setup_lease()).await.unwrap();
    target.write(3 * MIB, pattern(4, 2 * MIB)).await.unwrap();
    target.flush().await.unwrap();
    backend.take_snapshot(&other, &snap("full")).await.unwrap();
    target.zero(whole.clone()).await.unwrap();
    target.flush().await.unwrap();
    backend.take_snapshot(&other, &snap("empty")).await.unwrap();
    let emptied = backend.changed_ranges(&other, &snap("full"), &snap("empty"), whole).await.unwrap();
    assert_eq!(emptied, Some(std::iter::once(3 * MIB..5 * MIB).collect()));
}

/// Snapshots made by copying share no block, so their maps say nothing: `None`, and the engine
/// compares the bytes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_made_by_copying_report_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, vol) = volume_with(dir.path(), 16 * MIB, &[(0, 1, 4 * MIB)]).await;
    let backend = backend.with_reflink(false);
    assert_eq!(backend.take_snapshot(&vol, &snap("s1")).await.unwrap(), SnapshotMethod::SparseCopy);
    let target = backend.open_target(&vol, &setup_lease()).await.unwrap();
    target.write(MIB, pattern(9, 4096)).await.unwrap();
    target.flush().await.unwrap();
    assert_eq!(backend.take_snapshot(&vol, &snap("s2")).await.unwrap(), SnapshotMethod::SparseCopy);
    let changed = backend.changed_ranges(&vol, &snap("s1"), &snap("s2"), 0..16 * MIB).await.unwrap();
    assert_eq!(changed, None);
}

/// A missing snapshot is a permanent error that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_ranges_of_a_missing_snapshot_is_a_permanent_error() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, vol) = volume_with(dir.path(), 16 * MIB, &[]).await;
    backend.take_snapshot(&vol, &snap("s1")).await.unwrap();
    let err = backend.changed_ranges(&vol, &snap("s1"), &snap("nope"), 0..16 * MIB).await.unwrap_err();
    let message = permanent(err);
    assert!(message.contains("nope.img"), "{message}");
}

/// The writer lease tests write volumes under, outside any task.
fn setup_lease() -> task_center::model::WriterLease {
    task_center::model::WriterLease::new(task_center::model::TaskId::from_bytes([0; 16]), 1)
}

fn lease(epoch: u64) -> task_center::model::WriterLease {
    task_center::model::WriterLease::new(task_center::model::TaskId::generate(), epoch)
}

#[tokio::test]
async fn one_writer_at_a_time_and_an_older_lease_is_refused_even_after_the_newer_let_go() {
    let dir = tempfile::tempdir().unwrap();
    // Two backends on one directory stand for two processes of one host (flock locks conflict
    // between open files, in one process too).
    let (first, second) = (FileBackend::new(dir.path()), FileBackend::new(dir.path()));
    let vol = volume("vol-a");
    first.create_volume(&vol, MIB).await.unwrap();
    let (old, new) = (lease(10), lease(11));
    let writer = first.open_target(&vol, &old).await.unwrap();
    writer.write(0, vec![1; 4096]).await.unwrap();

    // A newer owner waits for the writer lock, then hears who holds it.
    let busy = second.open_target(&vol, &new).await.err().expect("the volume is held");
    let BackendError::Busy(message) = busy else { panic!("expected busy, got {busy:?}") };
    assert!(message.contains(&format!("pid {}", std::process::id())) && message.contains("epoch 10"), "{message}");

    // Once the older writer lets go (its calls ended), the newer one is admitted, and from then
    // on the older lease is refused, though nobody holds the volume.
    drop(writer);
    let writer = second.open_target(&vol, &new).await.unwrap();
    writer.write(0, vec![2; 4096]).await.unwrap();
    writer.flush().await.unwrap();
    drop(writer);
    let stale = first.open_target(&vol, &old).await.err().expect("an older lease");
    assert!(matches!(stale, BackendError::Fenced(ref m) if m.contains("epoch 11")), "{stale:?}");
    assert_eq!(first.newest_lease(&vol).await.unwrap(), Some(new));
    assert_eq!(std::fs::read(first.volume_path(&vol)).unwrap()[..4096], [2; 4096]);
    // The same claim may open again.
    assert!(second.open_target(&vol, &new).await.is_ok());
}

/// A process holding a volume's writer lock; killed (SIGKILL, by pid) when dropped.
struct LockHolder(std::process::Child);

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_writer_lock_dies_with_its_process() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::new(dir.path());
    let vol = volume("vol-a");
    backend.create_volume(&vol, MIB).await.unwrap();
    // Another process takes the lock, as a writer would, and says so once it holds it.
    let take = "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)";
    let child = std::process::Command::new("python3")
        .args(["-c", take])
        .arg(backend.lock_path(&vol))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let mut holder = LockHolder(child);
    let stdout = holder.0.stdout.take().unwrap();
    let said = tokio::task::spawn_blocking(move || std::io::BufReader::new(stdout).lines().next());
    let said = common::within(std::time::Duration::from_secs(30), "the other process takes the lock", said).await;
    assert_eq!(said.unwrap().unwrap().unwrap(), "locked");
    assert!(matches!(backend.open_target(&vol, &lease(5)).await, Err(BackendError::Busy(_))));
    // kill -9: the kernel drops its lock.
    drop(holder);
    let writer = backend.open_target(&vol, &lease(5)).await.expect("a dead holder's lock is gone");
    writer.write(0, vec![3; 4096]).await.unwrap();
}
