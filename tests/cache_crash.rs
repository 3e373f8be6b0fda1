//! A cache file that crashes LMDB when it is mapped (a real `SIGBUS`/`SIGSEGV`, not an error LMDB
//! returns) must not crash the node again at its next start. The crash happens in a child
//! process: this test binary run again with [`CHILD_ENV`] set, which opens the cache and nothing
//! else.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use task_center::cache::{CacheChange, TaskCache};
use task_center::model::{RecordVersions, Task, TaskControl, TaskId, TaskProgress, TaskStatus};

/// Set in a child process: the cache directory it opens.
const CHILD_ENV: &str = "TASK_CENTER_CACHE_CRASH_CHILD";
/// LMDB's page size on this platform (the two meta pages come first).
const PAGE: u64 = 4096;

/// The child's side: opens the cache named by [`CHILD_ENV`], prints how many tasks it holds and
/// exits. In a normal test run (no [`CHILD_ENV`]) it checks nothing and returns at once.
#[test]
fn child_opens_the_cache() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    let cache = TaskCache::open(Path::new(&dir)).expect("the cache opens");
    println!("child opened the cache: {} tasks", cache.ids().expect("ids").len());
    std::process::exit(0);
}

fn open_in_child(dir: &Path) -> Output {
    let exe = std::env::current_exe().expect("the test binary");
    Command::new(exe)
        .args(["--exact", "child_opens_the_cache", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the child")
}

fn task(n: usize) -> Task {
    let control = TaskControl::new(common::tasks::spec(n), None, 1_700_000_000_000 + n as i64);
    Task {
        id: TaskId::generate(),
        control,
        status: TaskStatus::pending(1_700_000_000_000),
        progress: TaskProgress::default(),
        versions: RecordVersions::default(),
    }
}

#[test]
fn a_cache_file_that_crashes_lmdb_is_wiped_at_the_next_start() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    // A real cache, big enough that its trees live beyond the two meta pages.
    let cache = TaskCache::open(&dir).unwrap();
    let changes: Vec<CacheChange> = (0..200).map(|n| CacheChange::Upsert(task(n))).collect();
    cache.apply(&changes).unwrap();
    assert_eq!(cache.ids().unwrap().len(), 200);
    cache.close();

    // Keep the meta pages, cut everything they point to: LMDB maps the file and touches a page
    // past its end.
    let data = dir.join("data.mdb");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    assert!(file.metadata().unwrap().len() > 4 * PAGE, "the trees live past the meta pages");
    file.set_len(2 * PAGE).unwrap();
    drop(file);

    let crashed = open_in_child(&dir);
    let signal = crashed.status.signal();
    assert!(
        matches!(signal, Some(libc::SIGBUS | libc::SIGSEGV)),
        "opening the damaged file should crash inside LMDB, not {:?}: {}",
        crashed.status,
        String::from_utf8_lossy(&crashed.stderr)
    );
    assert!(dir.join("opening").exists(), "the crashed opening left its marker");

    // The next start wipes the file before LMDB maps it, says so, and runs.
    let next = open_in_child(&dir);
    let (stdout, stderr) = (String::from_utf8_lossy(&next.stdout), String::from_utf8_lossy(&next.stderr));
    assert!(next.status.success(), "the next start crashed again: {:?}: {stderr}", next.status);
    assert!(stdout.contains("child opened the cache: 0 tasks"), "{stdout}");
    assert!(stderr.contains("the last opening of the task cache did not finish"), "{stderr}");
    assert!(!dir.join("opening").exists(), "a finished opening leaves no marker");

    // And the start after that keeps the (refilled, here empty) cache as it is.
    let again = open_in_child(&dir);
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("did not finish"));
}
