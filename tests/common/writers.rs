//! "At most one writer per target volume at any instant", observed from outside: a thread that
//! samples which processes hold a volume's image file open for writing (`/proc/<pid>/fd` links
//! and the access mode in `/proc/<pid>/fdinfo`), as an operator's checker would.
//!
//! A sample every [`SAMPLE_PERIOD`]: an overlap shorter than that can be missed, a longer one
//! cannot; the file backend's writer lock makes any overlap impossible, which is what the tests
//! assert.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time between two samples.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(5);

/// A sample in which several processes held one volume open for writing.
#[derive(Clone, Debug)]
pub struct Overlap {
    /// When, from the start of the watch.
    pub at: Duration,
    /// The volume's image.
    pub volume: PathBuf,
    /// The processes.
    pub pids: BTreeSet<u32>,
}

/// Samples until dropped. See the module docs.
pub struct WriterWatch {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<WatchState>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    samples: u64,
    overlaps: Vec<Overlap>,
    /// Processes seen writing each volume, over the whole watch.
    writers: Vec<(PathBuf, BTreeSet<u32>)>,
}

impl WriterWatch {
    /// Watches `pids` writing any of `volumes` (image paths).
    pub fn start(pids: Vec<u32>, volumes: Vec<PathBuf>) -> WriterWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(WatchState {
            writers: volumes.iter().map(|v| (v.clone(), BTreeSet::new())).collect(),
            ..WatchState::default()
        }));
        let (flag, shared) = (stop.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                let mut state = shared.lock().unwrap();
                state.samples += 1;
                for (i, volume) in volumes.iter().enumerate() {
                    let holders: BTreeSet<u32> = pids.iter().copied().filter(|&pid| writes(pid, volume)).collect();
                    state.writers[i].1.extend(holders.iter().copied());
                    if holders.len() > 1 {
                        state.overlaps.push(Overlap { at: started.elapsed(), volume: volume.clone(), pids: holders });
                    }
                }
                drop(state);
                std::thread::sleep(SAMPLE_PERIOD);
            }
        });
        WriterWatch { stop, state, thread: Some(thread) }
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.state.lock().unwrap().samples
    }

    /// Every sample with two writers or more.
    pub fn overlaps(&self) -> Vec<Overlap> {
        self.state.lock().unwrap().overlaps.clone()
    }

    /// The processes ever seen writing `volume`.
    pub fn writers(&self, volume: &Path) -> BTreeSet<u32> {
        let state = self.state.lock().unwrap();
        state.writers.iter().find(|(v, _)| v == volume).map(|(_, w)| w.clone()).unwrap_or_default()
    }
}

impl Drop for WriterWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether process `pid` holds `volume` open with write access.
fn writes(pid: u32, volume: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target == volume) && {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
            info.ok()
                .and_then(|info| info.lines().find_map(|l| l.strip_prefix("flags:").map(|f| f.trim().to_string())))
                .and_then(|flags| u32::from_str_radix(&flags, 8).ok())
                .is_some_and(|flags| flags & 0o3 != 0)
        }
    })
}
