//! The copy engine over the [`FileBackend`] against the tools people copy image files with, on
//! the same files, in one run: a table of median times and ratios (engine time / tool time;
//! below 1.0 the engine is faster), printed and written to `target/peers.json`.
//!
//! ```text
//! cargo bench --bench peers
//! ```
//!
//! # Cases
//!
//! 1. **dense**: a 4 GiB volume full of pseudo-random (incompressible) data.
//! 2. **sparse**: a 4 GiB volume with 10% of it in scattered 1 MiB runs of pseudo-random data,
//!    the rest holes.
//! 3. **incremental**: the target holds a copy of the dense volume of case 1 (the base), then 1%
//!    of the source's 64 KiB blocks are rewritten with new pseudo-random data. The engine copies
//!    incrementally against snapshot `base`, which exists on the source (the old bytes) and on
//!    the target, both made with [`FileBackend::take_snapshot`]. The dense base is the harder
//!    case for the engine: it reads and compares the whole 4 GiB of source and base, where a
//!    sparse base would let it skip the holes.
//!
//! # Tools
//!
//! - the engine: [`CopyEngine`] over [`FileBackend`], driven as the task controller does
//!   (`start`, `step` until `Done`, `finish`), with the default [`CopyOptions`];
//! - `cp --sparse=always SRC DST` (cases 1-2);
//! - `qemu-img convert -t writeback -O raw SRC DST` (cases 1-2);
//! - `rsync --inplace --no-whole-file --ignore-times --sparse SRC DST` (cases 1-2: no basis, so the
//!   whole file goes through rsync's pipeline), and `rsync --inplace --no-whole-file --ignore-times
//!   SRC DST` (case 3).
//!
//! A tool that is not installed is skipped with a message.
//!
//! # Method
//!
//! - Every file lives on one filesystem, in `target/peers-work` (or `PEERS_WORK_DIR`), which is
//!   removed at the start, between cases and at the end.
//! - The page cache cannot be dropped without privileges, so every tool runs once to warm up,
//!   then `PEERS_RUNS` (3) more times, the tools alternating (round `r` starts with tool `r`);
//!   the median is reported.
//! - Before each run, outside the timed region: the target is deleted (cases 1-2; for the engine
//!   it is then created as a sparse file of the volume's size, as a block service would hand it
//!   over), or restored to the base by a sparse copy and `fdatasync`ed (case 3); then `syncfs`,
//!   so no tool pays for an earlier one's dirty pages.
//! - Durability inside the timed region: the engine `fdatasync`s the target after every extent;
//!   every tool's run is followed by `fdatasync(DST)` (what `sync -d DST` does), and `qemu-img`
//!   also flushes itself (`-t writeback`).
//! - The engine's **source snapshot** (`tc-<task id>`, taken at a task's first start) is made
//!   before timing as a hard link to the source image: what a reflink filesystem gives in no
//!   time. On ext4 [`FileBackend`] would make it by a sparse copy; that cost is printed apart
//!   (it is the time `take_snapshot` took for the base of case 3).
//! - The engine's `finish` snapshots the target (`tc-<task id>`, the base of the next copy),
//!   which no tool does; on a filesystem without reflink that is a sparse copy. It is timed
//!   apart: the `engine` row is `start` + steps, the `engine+finish` row adds `finish`.
//! - On a filesystem with reflinks (`PEERS_WORK_DIR` on XFS or btrfs) the snapshots are
//!   reflinks and, in case 3, the plain `engine` gets `changed_ranges` from [`FileBackend`]
//!   itself (from the snapshots' extent maps), as `engine-tracked` gets it from the bench.
//! - After each run, outside the timed region, the target is hashed (XXH3-128) and compared with
//!   the source: every run of every tool is verified.
//!
//! # Environment
//!
//! `PEERS_VOLUME_MIB` (4096), `PEERS_RUNS` (3), `PEERS_WORK_DIR`, `PEERS_CASES` (`1,2,3`),
//! `PEERS_TOOLS` (`engine,cp,qemu-img,rsync`), and for tuning the engine `PEERS_BLOCK_KIB` and
//! `PEERS_IN_FLIGHT` (the defaults of [`CopyOptions`]).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use serde_json::json;
use task_center::copy::{BackendResult, CopyBackend, CopyEngine, FileBackend, ReadVolume, VolumeRef, WriteVolume};
use task_center::exec::{Licence, Step, StopToken, TaskExecutor};
use task_center::model::WriterLease;
use task_center::model::{
    CopyOptions, CopyVolumeSpec, ProgressCounters, RecordVersions, SnapshotId, Task, TaskControl, TaskId, TaskProgress,
    TaskSpec, TaskStatus, VolumeId,
};
use tokio::runtime::Runtime;

type Error = Box<dyn std::error::Error>;

const MIB: u64 = 1 << 20;
/// Bytes generated and written at a time when making a volume.
const FILL_BYTES: usize = 1 << 20;
/// Case 2: percent of the volume allocated, in runs of this many bytes.
const SPARSE_PERCENT: u64 = 10;
const SPARSE_RUN_BYTES: u64 = 1 << 20;
/// Case 3: percent of the blocks of this many bytes rewritten after the base.
const CHANGED_PERCENT: u64 = 1;
const CHANGED_BLOCK_BYTES: u64 = 64 << 10;
/// Targets of the issue: full and sparse copies at least as fast as `qemu-img convert`, and an
/// incremental copy at least 30 times as fast as rsync.
const TARGET_VS_QEMU: f64 = 1.0;
const TARGET_VS_RSYNC: f64 = 1.0 / 30.0;
const SOURCE_HOST: &str = "198.51.100.1:10201";
const TARGET_HOST: &str = "203.0.113.1:10201";

/// A copy tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Engine,
    /// Case 3 only: the engine over a backend that answers `changed_ranges` (see [`Tracked`]).
    EngineTracked,
    Cp,
    QemuImg,
    Rsync,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Engine => "engine",
            Tool::EngineTracked => "engine-tracked",
            Tool::Cp => "cp",
            Tool::QemuImg => "qemu-img",
            Tool::Rsync => "rsync",
        }
    }

    /// The program and its arguments (before `SRC DST`); `None` for the engine.
    fn command(self, incremental: bool) -> Option<(&'static str, Vec<&'static str>)> {
        match self {
            Tool::Engine | Tool::EngineTracked => None,
            Tool::Cp => Some(("cp", vec!["--sparse=always"])),
            Tool::QemuImg => Some(("qemu-img", vec!["convert", "-t", "writeback", "-O", "raw"])),
            // --ignore-times: never skip a file on size and mtime (a fast run can leave both
            // equal); the delta algorithm still decides what to send.
            Tool::Rsync if incremental => Some(("rsync", vec!["--inplace", "--no-whole-file", "--ignore-times"])),
            Tool::Rsync => Some(("rsync", vec!["--inplace", "--no-whole-file", "--ignore-times", "--sparse"])),
        }
    }

    /// How the run is described in the table's legend.
    fn describe(self, incremental: bool, options: &CopyOptions) -> String {
        match self.command(incremental) {
            Some((program, args)) => format!("{program} {} SRC DST; fdatasync(DST)", args.join(" ")),
            None if self == Tool::EngineTracked => format!(
                "{}, the backend answering changed_ranges with the changed blocks, as a block service with \
                 change tracking would (FileBackend answers from the snapshots' extent maps on a reflink \
                 filesystem, and None elsewhere)",
                Tool::Engine.describe(incremental, options)
            ),
            None => format!(
                "CopyEngine<FileBackend>: start, step until Done ({} MiB extents, {} KiB blocks, {} in flight{})",
                options.extent_size_bytes / MIB,
                options.block_size_bytes >> 10,
                options.blocks_in_flight,
                if incremental { ", base_snapshot \"base\"" } else { "" }
            ),
        }
    }

    fn is_engine(self) -> bool {
        matches!(self, Tool::Engine | Tool::EngineTracked)
    }

    fn installed(self) -> bool {
        let Some((program, _)) = self.command(false) else { return true };
        let probe = Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        probe.is_ok_and(|status| status.success())
    }
}

/// What the bench is told by its environment.
struct Config {
    volume_bytes: u64,
    runs: usize,
    work: PathBuf,
    json: PathBuf,
    options: CopyOptions,
    /// The cases to run (1 to 3).
    cases: Vec<u32>,
    /// The tools to run, by name; `None` for all.
    tools: Option<Vec<String>>,
}

impl Config {
    fn from_env() -> Result<Self, Error> {
        let number = |name: &str, default: u64| -> Result<u64, Error> {
            match std::env::var(name) {
                Ok(value) => Ok(value.parse().map_err(|e| format!("{name}={value}: {e}"))?),
                Err(_) => Ok(default),
            }
        };
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let work = std::env::var_os("PEERS_WORK_DIR").map(PathBuf::from).unwrap_or_else(|| target.join("peers-work"));
        let defaults = CopyOptions::default();
        let options = CopyOptions {
            block_size_bytes: (number("PEERS_BLOCK_KIB", u64::from(defaults.block_size_bytes >> 10))? << 10) as u32,
            blocks_in_flight: number("PEERS_IN_FLIGHT", u64::from(defaults.blocks_in_flight))? as u32,
            ..defaults
        };
        options.validate()?;
        let volume_bytes = number("PEERS_VOLUME_MIB", 4096)? * MIB;
        if volume_bytes == 0 {
            return Err("PEERS_VOLUME_MIB must be positive".into());
        }
        let runs = number("PEERS_RUNS", 3)?.max(1) as usize;
        let list = |name: &str| std::env::var(name).ok().map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>());
        let cases = match list("PEERS_CASES") {
            Some(cases) => cases.iter().map(|c| c.parse()).collect::<Result<_, _>>()?,
            None => vec![1, 2, 3],
        };
        let tools = list("PEERS_TOOLS");
        Ok(Config { volume_bytes, runs, work, json: target.join("peers.json"), options, cases, tools })
    }
}

fn main() -> Result<(), Error> {
    let mut config = Config::from_env()?;
    if !std::env::args().any(|arg| arg == "--bench") {
        // `cargo test --all-targets` runs benches without `--bench`: a smoke run on small
        // volumes proves the harness works, without the 4 GiB cases or their figures.
        config.volume_bytes = 64 * MIB;
        config.runs = 1;
        config.work = config.work.with_file_name("peers-smoke-work");
        config.json = config.json.with_file_name("peers-smoke.json");
        println!("peers: smoke run on 64 MiB volumes (cargo bench --bench peers measures 4 GiB)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tools: Vec<Tool> = [Tool::Engine, Tool::Cp, Tool::QemuImg, Tool::Rsync]
        .into_iter()
        .filter(|tool| config.tools.as_ref().is_none_or(|names| names.iter().any(|n| n == tool.name())))
        .filter(|tool| {
            let installed = tool.installed();
            if !installed {
                println!("skipping {}: not installed", tool.name());
            }
            installed
        })
        .collect();
    reset_dir(&config.work)?;
    check_free_space(&config)?;
    let bench = Bench { backend: FileBackend::new(&config.work), runtime, config };
    let result = bench.run_all(&tools);
    let _ = fs::remove_dir_all(&bench.config.work);
    let cases = result?;
    report(&bench.config, &cases)?;
    Ok(())
}

/// Removes `dir` and everything in it, then creates it empty.
fn reset_dir(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir_all(dir)
}

/// Case 3 holds four volume-sized files at once: source, its base, target, the target's base.
fn check_free_space(config: &Config) -> Result<(), Error> {
    let output = Command::new("df").args(["-B1", "--output=avail"]).arg(&config.work).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let available: u64 = text.lines().nth(1).and_then(|l| l.trim().parse().ok()).ok_or("cannot parse df")?;
    let needed = 4 * config.volume_bytes + config.volume_bytes / 2 + (1 << 30);
    println!("work directory {} ({} GiB free, {} GiB needed)", config.work.display(), available >> 30, needed >> 30);
    if available < needed {
        return Err(format!("not enough free space in {}", config.work.display()).into());
    }
    Ok(())
}

/// The files and the engine of one bench run.
struct Bench {
    config: Config,
    backend: FileBackend,
    runtime: Runtime,
}

/// One case, ready to run.
struct Case {
    name: &'static str,
    title: String,
    source: VolumeRef,
    target: VolumeRef,
    task: Task,
    tools: Vec<Tool>,
    /// XXH3-128 of the source's bytes.
    source_hash: u128,
    /// Case 3: the image the target is restored from before each run (the source's base snapshot,
    /// the same bytes as the target's, so one file fewer competes for the page cache), and the
    /// offsets of the blocks the source changed since (to check the restore).
    base: Option<(PathBuf, Vec<u64>)>,
}

/// The measured runs of one tool in one case.
#[derive(Default)]
struct Runs {
    seconds: Vec<f64>,
    cpu_seconds: Vec<f64>,
    /// Engine only: the time of `finish` (the target snapshot).
    finish_seconds: Vec<f64>,
    allocated_bytes: u64,
    counters: Option<ProgressCounters>,
}

/// What one timed run gave.
struct Sample {
    seconds: f64,
    /// CPU time (user + system) of the timed region: this process's for the engine, the
    /// tool's for a tool.
    cpu_seconds: f64,
    finish_seconds: Option<f64>,
    counters: Option<ProgressCounters>,
}

struct CaseResult {
    name: &'static str,
    title: String,
    results: Vec<(Tool, Runs)>,
    incremental: bool,
}

impl Bench {
    fn run_all(&self, tools: &[Tool]) -> Result<Vec<CaseResult>, Error> {
        let cases = &self.config.cases;
        let dense = volume(SOURCE_HOST, "dense");
        if cases.contains(&1) || cases.contains(&3) {
            let started = Instant::now();
            self.write_dense(&dense, 1)?;
            println!("generated dense source: {:.1} s", started.elapsed().as_secs_f64());
        }
        let mut results = Vec::new();
        if cases.contains(&1) {
            let title = format!("1. dense {}, pseudo-random", size_name(self.config.volume_bytes));
            let case = self.full_case("dense", title, &dense, tools)?;
            results.push(self.run_case(&case)?);
            self.clean(&case)?;
        }
        if cases.contains(&2) {
            let sparse = volume(SOURCE_HOST, "sparse");
            self.write_sparse(&sparse, 2)?;
            let title = format!("2. sparse {}, 10% data in 1 MiB runs", size_name(self.config.volume_bytes));
            let case = self.full_case("sparse", title, &sparse, tools)?;
            results.push(self.run_case(&case)?);
            self.clean(&case)?;
            fs::remove_file(self.backend.volume_path(&sparse))?;
        }
        if cases.contains(&3) {
            let mut incremental: Vec<Tool> =
                tools.iter().copied().filter(|t| matches!(t, Tool::Engine | Tool::Rsync)).collect();
            let tracked = self.config.tools.as_ref().is_none_or(|names| names.iter().any(|n| n == "engine-tracked"));
            incremental.extend(tracked.then_some(Tool::EngineTracked));
            let case = self.incremental_case(&dense, &incremental)?;
            results.push(self.run_case(&case)?);
            self.clean(&case)?;
        }
        Ok(results)
    }

    /// Cases 1-2: `source` to a fresh target.
    fn full_case(&self, name: &'static str, title: String, source: &VolumeRef, tools: &[Tool]) -> Result<Case, Error> {
        let target = volume(TARGET_HOST, "copy");
        let task = copy_task(source, &target, None, &self.config.options);
        link_snapshot(&self.backend, source, &CopyEngine::snapshot_name(&task.id))?;
        let source_hash = hash_file(&self.backend.volume_path(source))?;
        Ok(Case { name, title, source: source.clone(), target, task, tools: tools.to_vec(), source_hash, base: None })
    }

    /// Case 3: snapshot `base` of `source` on both sides, then 1% of the source's blocks change.
    fn incremental_case(&self, source: &VolumeRef, tools: &[Tool]) -> Result<Case, Error> {
        let base = SnapshotId::new("base")?;
        let target = volume(TARGET_HOST, "mirror");
        let started = Instant::now();
        let method = self.runtime.block_on(self.backend.take_snapshot(source, &base))?;
        let snapshot_seconds = started.elapsed().as_secs_f64();
        println!(
            "FileBackend::take_snapshot of the {} dense source: {snapshot_seconds:.2} s ({method:?}); \
             the engine's source snapshot costs this much on this filesystem (not in the timed runs)",
            size_name(self.config.volume_bytes)
        );
        let base_image = self.backend.snapshot_path(source, &base);
        self.runtime.block_on(self.backend.create_volume(&target, self.config.volume_bytes))?;
        restore(&base_image, &self.backend.volume_path(&target))?;
        self.runtime.block_on(self.backend.take_snapshot(&target, &base))?;
        let changed = self.change_blocks(source, 3)?;
        let task = copy_task(source, &target, Some(base.clone()), &self.config.options);
        link_snapshot(&self.backend, source, &CopyEngine::snapshot_name(&task.id))?;
        let source_hash = hash_file(&self.backend.volume_path(source))?;
        let title = format!(
            "3. incremental, {} dense base, {}% of {} KiB blocks",
            size_name(self.config.volume_bytes),
            CHANGED_PERCENT,
            CHANGED_BLOCK_BYTES >> 10
        );
        Ok(Case {
            name: "incremental",
            title,
            source: source.clone(),
            target: target.clone(),
            task,
            tools: tools.to_vec(),
            source_hash,
            base: Some((base_image, changed)),
        })
    }

    /// Removes a case's target, its snapshots and the engine's source snapshot.
    fn clean(&self, case: &Case) -> Result<(), Error> {
        let snapshot = CopyEngine::snapshot_name(&case.task.id);
        self.runtime.block_on(self.backend.delete_snapshot(&case.source, &snapshot))?;
        remove_if_exists(&self.backend.volume_path(&case.target))?;
        for volume in [&case.source, &case.target] {
            let dir = self.backend.snapshot_path(volume, &snapshot);
            let dir = dir.parent().expect("snapshots are in a directory");
            if dir.exists() {
                fs::remove_dir_all(dir)?;
            }
        }
        syncfs(&self.config.work)?;
        Ok(())
    }

    /// Warms every tool once, then `runs` rounds of every tool, alternating.
    fn run_case(&self, case: &Case) -> Result<CaseResult, Error> {
        println!("\n{}", case.title);
        for &tool in &case.tools {
            let sample = self.run_once(case, tool)?;
            println!("  warm-up {:<8} {:>7.2} s", tool.name(), sample.seconds);
        }
        let mut runs: Vec<Runs> = case.tools.iter().map(|_| Runs::default()).collect();
        for round in 0..self.config.runs {
            for i in 0..case.tools.len() {
                let index = (round + i) % case.tools.len();
                let tool = case.tools[index];
                let sample = self.run_once(case, tool)?;
                let target = self.backend.volume_path(&case.target);
                let runs = &mut runs[index];
                runs.seconds.push(sample.seconds);
                runs.cpu_seconds.push(sample.cpu_seconds);
                runs.finish_seconds.extend(sample.finish_seconds);
                runs.allocated_bytes = fs::metadata(&target)?.blocks() * 512;
                runs.counters = sample.counters;
                println!("  round {} {:<8} {:>7.2} s", round + 1, tool.name(), sample.seconds);
            }
        }
        let results = case.tools.iter().copied().zip(runs).collect();
        Ok(CaseResult { name: case.name, title: case.title.clone(), results, incremental: case.base.is_some() })
    }

    /// Prepares the target, runs `tool` timed, and verifies the target (untimed).
    fn run_once(&self, case: &Case, tool: Tool) -> Result<Sample, Error> {
        let target = self.backend.volume_path(&case.target);
        let snapshot = CopyEngine::snapshot_name(&case.task.id);
        self.runtime.block_on(self.backend.delete_snapshot(&case.target, &snapshot))?;
        match &case.base {
            Some((base, changed)) => {
                restore(base, &target)?;
                check_restored(base, &target, changed)?;
            }
            None => {
                remove_if_exists(&target)?;
                if tool.is_engine() {
                    self.runtime.block_on(self.backend.create_volume(&case.target, self.config.volume_bytes))?;
                }
            }
        }
        syncfs(&self.config.work)?;
        let sample = match tool {
            Tool::Engine => self.runtime.block_on(run_engine(Arc::new(self.backend.clone()), &case.task))?,
            Tool::EngineTracked => {
                let changed = case.base.as_ref().map(|(_, changed)| changed.clone()).unwrap_or_default();
                let backend = Tracked { inner: self.backend.clone(), changed };
                self.runtime.block_on(run_engine(Arc::new(backend), &case.task))?
            }
            _ => run_tool(tool, case.base.is_some(), &self.backend.volume_path(&case.source), &target)?,
        };
        let hash = hash_file(&target)?;
        if hash != case.source_hash {
            return Err(format!("{}: {} left a target that differs from the source", case.name, tool.name()).into());
        }
        Ok(sample)
    }

    /// Writes a volume full of pseudo-random bytes.
    fn write_dense(&self, volume: &VolumeRef, seed: u64) -> Result<(), Error> {
        self.runtime.block_on(self.backend.create_volume(volume, self.config.volume_bytes))?;
        let mut file = OpenOptions::new().write(true).open(self.backend.volume_path(volume))?;
        let mut rng = XorShift::new(seed);
        let mut buf = vec![0u8; FILL_BYTES];
        for _ in 0..self.config.volume_bytes / FILL_BYTES as u64 {
            rng.fill(&mut buf);
            file.write_all(&buf)?;
        }
        file.sync_all()?;
        Ok(())
    }

    /// Writes a volume with `SPARSE_PERCENT` of it in runs at distinct pseudo-random offsets.
    fn write_sparse(&self, volume: &VolumeRef, seed: u64) -> Result<(), Error> {
        self.runtime.block_on(self.backend.create_volume(volume, self.config.volume_bytes))?;
        let file = OpenOptions::new().write(true).open(self.backend.volume_path(volume))?;
        let slots = self.config.volume_bytes / SPARSE_RUN_BYTES;
        let mut rng = XorShift::new(seed);
        let mut buf = vec![0u8; SPARSE_RUN_BYTES as usize];
        for slot in distinct(&mut rng, slots, slots * SPARSE_PERCENT / 100) {
            rng.fill(&mut buf);
            file.write_all_at(&buf, slot * SPARSE_RUN_BYTES)?;
        }
        file.sync_all()?;
        Ok(())
    }

    /// Rewrites `CHANGED_PERCENT` of the volume's blocks with new bytes; returns their offsets.
    fn change_blocks(&self, volume: &VolumeRef, seed: u64) -> Result<Vec<u64>, Error> {
        let file = OpenOptions::new().write(true).open(self.backend.volume_path(volume))?;
        let blocks = self.config.volume_bytes / CHANGED_BLOCK_BYTES;
        let mut rng = XorShift::new(seed);
        let mut buf = vec![0u8; CHANGED_BLOCK_BYTES as usize];
        let mut offsets = Vec::new();
        for block in distinct(&mut rng, blocks, blocks * CHANGED_PERCENT / 100) {
            rng.fill(&mut buf);
            file.write_all_at(&buf, block * CHANGED_BLOCK_BYTES)?;
            offsets.push(block * CHANGED_BLOCK_BYTES);
        }
        file.sync_all()?;
        Ok(offsets)
    }
}

/// Runs a copy task from its first start to its end; times `start` + steps, and `finish` apart.
async fn run_engine(backend: Arc<dyn CopyBackend>, task: &Task) -> Result<Sample, Error> {
    let engine = CopyEngine::new(backend);
    let snapshot = CopyEngine::snapshot_name(&task.id);
    let (started, cpu) = (Instant::now(), cpu_seconds(libc::RUSAGE_SELF));
    // The source snapshot exists already (a hard link, see the module docs).
    let mut progress = TaskProgress { source_snapshot: Some(snapshot), ..TaskProgress::default() };
    let mut run =
        engine.start(task, &Licence::unlimited(WriterLease::new(task.id, next_epoch())), &mut progress).await?;
    let stop = StopToken::new();
    while run.step(&mut progress, &stop).await? == Step::More {}
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds(libc::RUSAGE_SELF) - cpu;
    let finishing = Instant::now();
    run.finish(&mut progress).await?;
    let finish_seconds = Some(finishing.elapsed().as_secs_f64());
    Ok(Sample { seconds, cpu_seconds, finish_seconds, counters: Some(progress.counters) })
}

/// Runs a tool from `source` to `target`, then `fdatasync`s the target, timed.
fn run_tool(tool: Tool, incremental: bool, source: &Path, target: &Path) -> Result<Sample, Error> {
    let (program, args) = tool.command(incremental).expect("a tool has a command");
    let mut args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
    args.extend([source.as_os_str().to_owned(), target.as_os_str().to_owned()]);
    let (started, cpu) = (Instant::now(), cpu_seconds(libc::RUSAGE_CHILDREN));
    let status = Command::new(program).args(&args).status()?;
    if !status.success() {
        return Err(format!("{program} {args:?}: {status}").into());
    }
    File::open(target)?.sync_data()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds(libc::RUSAGE_CHILDREN) - cpu;
    Ok(Sample { seconds, cpu_seconds, finish_seconds: None, counters: None })
}

/// [`FileBackend`] answering [`CopyBackend::changed_ranges`] with the blocks the bench changed
/// since the base: what a block service that tracks changes (as `rbd diff` does) tells the
/// engine, so that it reads only those blocks.
struct Tracked {
    inner: FileBackend,
    /// Offsets of the changed blocks, `CHANGED_BLOCK_BYTES` each.
    changed: Vec<u64>,
}

#[async_trait]
impl CopyBackend for Tracked {
    async fn create_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<()> {
        self.inner.create_snapshot(volume, snapshot).await
    }

    async fn snapshot_exists(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<bool> {
        self.inner.snapshot_exists(volume, snapshot).await
    }

    async fn open_snapshot(&self, volume: &VolumeRef, snapshot: &SnapshotId) -> BackendResult<Box<dyn ReadVolume>> {
        self.inner.open_snapshot(volume, snapshot).await
    }

    async fn open_target(&self, volume: &VolumeRef, lease: &WriterLease) -> BackendResult<Box<dyn WriteVolume>> {
        self.inner.open_target(volume, lease).await
    }

    async fn changed_ranges(
        &self,
        _volume: &VolumeRef,
        _from: &SnapshotId,
        _to: &SnapshotId,
        range: Range<u64>,
    ) -> BackendResult<Option<Vec<Range<u64>>>> {
        let mut ranges: Vec<Range<u64>> = self
            .changed
            .iter()
            .map(|&offset| offset..offset + CHANGED_BLOCK_BYTES)
            .filter(|r| r.start < range.end && range.start < r.end)
            .collect();
        ranges.sort_by_key(|r| r.start);
        Ok(Some(ranges))
    }
}

fn volume(host: &str, name: &str) -> VolumeRef {
    VolumeRef { hosts: vec![host.into()], volume: VolumeId::new(name).expect("a valid volume name") }
}

fn copy_task(source: &VolumeRef, target: &VolumeRef, base: Option<SnapshotId>, options: &CopyOptions) -> Task {
    let spec = CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: base,
        options: options.clone(),
    };
    Task {
        id: TaskId::generate(),
        control: TaskControl::new(TaskSpec::CopyVolume(spec), None, 0),
        status: TaskStatus::pending(0),
        progress: TaskProgress::default(),
        versions: RecordVersions::default(),
    }
}

/// Makes snapshot `snapshot` of `volume` a hard link to the volume's image: a point-in-time
/// image as long as nothing writes the volume, which nothing does while the bench runs.
fn link_snapshot(backend: &FileBackend, volume: &VolumeRef, snapshot: &SnapshotId) -> io::Result<()> {
    let path = backend.snapshot_path(volume, snapshot);
    fs::create_dir_all(path.parent().expect("snapshots are in a directory"))?;
    fs::hard_link(backend.volume_path(volume), path)
}

/// Makes `target` a sparse copy of `source` (1 MiB chunks of zeroes stay holes), durably.
fn restore(source: &Path, target: &Path) -> io::Result<()> {
    let from = File::open(source)?;
    let to = OpenOptions::new().write(true).truncate(true).open(target)?;
    let size = from.metadata()?.len();
    to.set_len(size)?;
    let mut buf = vec![0u8; FILL_BYTES];
    let mut offset = 0;
    while offset < size {
        let chunk = &mut buf[..FILL_BYTES.min((size - offset) as usize)];
        from.read_exact_at(chunk, offset)?;
        if chunk.iter().any(|&b| b != 0) {
            to.write_all_at(chunk, offset)?;
        }
        offset += chunk.len() as u64;
    }
    to.sync_data()
}

/// Checks that the first changed block of a restored target holds the base's bytes again.
fn check_restored(base: &Path, target: &Path, changed: &[u64]) -> Result<(), Error> {
    let Some(&offset) = changed.first() else { return Ok(()) };
    let (mut expected, mut found) = (vec![0u8; CHANGED_BLOCK_BYTES as usize], vec![0u8; CHANGED_BLOCK_BYTES as usize]);
    File::open(base)?.read_exact_at(&mut expected, offset)?;
    File::open(target)?.read_exact_at(&mut found, offset)?;
    if expected != found {
        return Err(format!("{} was not restored to the base at {offset}", target.display()).into());
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or of its waited-for children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and keeps no pointer to it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// `syncfs` on the filesystem holding `dir`: writes back every dirty page of it.
fn syncfs(dir: &Path) -> io::Result<()> {
    let dir = File::open(dir)?;
    // SAFETY: syncfs on a descriptor that `dir` keeps open; it touches no memory.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// XXH3-128 of a file's bytes.
fn hash_file(path: &Path) -> io::Result<u128> {
    let mut file = File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.digest128());
        }
        hasher.update(&buf[..n]);
    }
}

/// `count` distinct numbers below `below`, in the order drawn.
fn distinct(rng: &mut XorShift, below: u64, count: u64) -> Vec<u64> {
    assert!(count <= below);
    let mut taken = vec![false; below as usize];
    let mut out = Vec::with_capacity(count as usize);
    while (out.len() as u64) < count {
        let n = rng.next() % below;
        if !std::mem::replace(&mut taken[n as usize], true) {
            out.push(n);
        }
    }
    out
}

/// A small deterministic generator (xorshift64): incompressible enough, and fast.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

fn size_name(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Prints the table and writes it as JSON.
fn report(config: &Config, cases: &[CaseResult]) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "\nmedian of {} runs after one warm-up run per tool, tools alternating; page cache warm",
        config.runs
    )?;
    writeln!(
        out,
        "{:<56} {:<21} {:>9} {:>22} {:>7} {:>7} {:>10} {:>12}",
        "case", "tool", "median s", "runs s", "cpu s", "GiB/s", "alloc MiB", "engine/tool"
    )?;
    let mut json_cases = Vec::new();
    for case in cases {
        let engine = case.results.iter().find(|(t, _)| *t == Tool::Engine).map(|(_, r)| median(&r.seconds));
        let mut rows = Vec::new();
        for (tool, runs) in &case.results {
            rows.extend(rows_of(config, case, *tool, runs, engine));
        }
        for (i, row) in rows.iter().enumerate() {
            let title = if i == 0 { case.title.as_str() } else { "" };
            writeln!(out, "{title:<56} {}", row.line)?;
        }
        for (tool, runs) in &case.results {
            if let Some(counters) = &runs.counters {
                writeln!(out, "{:<56} {} counters: {counters:?}", "", tool.name())?;
            }
        }
        json_cases.push(json!({
            "case": case.name,
            "title": case.title,
            "rows": rows.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
            "target": targets(case, engine),
        }));
        if let Some(line) = verdict(case, engine) {
            writeln!(out, "{:<56} {line}", "")?;
        }
    }
    legend(&mut out, config)?;
    let document = json!({
        "volume_bytes": config.volume_bytes,
        "runs": config.runs,
        "method": METHOD,
        "options": config.options,
        "cases": json_cases,
    });
    fs::write(&config.json, serde_json::to_string_pretty(&document)?)?;
    writeln!(out, "wrote {}", config.json.display())?;
    Ok(())
}

const METHOD: &str = "one warm-up run per tool, then the median of N runs, tools alternating; page cache not dropped \
    (needs privileges). Targets deleted (the engine's recreated sparse) or restored to the base, fdatasync'ed and \
    syncfs'ed before each run, untimed. Timed: the engine's start + steps (it fdatasyncs each extent); each tool's \
    command + fdatasync(DST) (qemu-img with -t writeback). engine+finish adds the target snapshot. Every target is \
    hashed (XXH3-128) against the source after every run, untimed.";

/// A printed line and its JSON.
struct Row {
    line: String,
    json: serde_json::Value,
}

/// The row of a tool (two for the engine: without and with `finish`).
fn rows_of(config: &Config, case: &CaseResult, tool: Tool, runs: &Runs, engine: Option<f64>) -> Vec<Row> {
    let cpu = Some(median(&runs.cpu_seconds));
    let mut series = vec![(tool.name().to_string(), runs.seconds.clone(), cpu)];
    if tool.is_engine() && !runs.finish_seconds.is_empty() {
        let with_finish = runs.seconds.iter().zip(&runs.finish_seconds).map(|(a, b)| a + b).collect();
        series.push((format!("{}+finish", tool.name()), with_finish, None));
    }
    series
        .into_iter()
        .map(|(name, seconds, cpu)| {
            let m = median(&seconds);
            let cpu_text = cpu.map_or("-".to_string(), |c| format!("{c:.2}"));
            let ratio = engine.filter(|_| !tool.is_engine()).map(|e| e / m);
            let gib_per_s = config.volume_bytes as f64 / (1u64 << 30) as f64 / m;
            let list = seconds.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(" ");
            let ratio_text = ratio.map_or("-".to_string(), |r| format!("{r:.3}"));
            let line = format!(
                "{name:<21} {m:>9.2} {list:>22} {cpu_text:>7} {gib_per_s:>7.2} {:>10} {ratio_text:>12}",
                runs.allocated_bytes / MIB
            );
            let json = json!({
                "tool": name,
                "command": tool.describe(case.incremental, &config.options),
                "median_seconds": m,
                "runs_seconds": seconds,
                "median_cpu_seconds": cpu,
                "gib_per_second": gib_per_s,
                "target_allocated_bytes": runs.allocated_bytes,
                "engine_over_tool": ratio,
                "counters": runs.counters.as_ref().filter(|_| !name.ends_with("+finish")),
            });
            Row { line, json }
        })
        .collect()
}

/// The issue's target for a case: the ratio to meet and against which tool.
fn target_of(case: &CaseResult) -> (Tool, f64) {
    if case.incremental {
        (Tool::Rsync, TARGET_VS_RSYNC)
    } else {
        (Tool::QemuImg, TARGET_VS_QEMU)
    }
}

fn targets(case: &CaseResult, engine: Option<f64>) -> serde_json::Value {
    let (tool, limit) = target_of(case);
    let ratio = ratio_to(case, engine, tool);
    json!({ "tool": tool.name(), "max_engine_over_tool": limit, "ratio": ratio, "met": ratio.map(|r| r <= limit) })
}

fn ratio_to(case: &CaseResult, engine: Option<f64>, tool: Tool) -> Option<f64> {
    let peer = case.results.iter().find(|(t, _)| *t == tool).map(|(_, r)| median(&r.seconds))?;
    Some(engine? / peer)
}

fn verdict(case: &CaseResult, engine: Option<f64>) -> Option<String> {
    let (tool, limit) = target_of(case);
    let ratio = ratio_to(case, engine, tool)?;
    let met = if ratio <= limit { "met" } else { "MISSED" };
    let mut line = format!("target engine/{} <= {limit:.3}: {ratio:.3}, {met}", tool.name());
    let tracked = case.results.iter().find(|(t, _)| *t == Tool::EngineTracked).map(|(_, r)| median(&r.seconds));
    if let Some(tracked_ratio) = ratio_to(case, tracked, tool) {
        let met = if tracked_ratio <= limit { "met" } else { "missed" };
        line += &format!("; engine-tracked/{}: {tracked_ratio:.3}, {met}", tool.name());
    }
    Some(line)
}

fn legend(out: &mut impl Write, config: &Config) -> io::Result<()> {
    writeln!(out, "\ntools (SRC: the source image; DST: the target image, on the same filesystem):")?;
    for tool in [Tool::Engine, Tool::Cp, Tool::QemuImg] {
        writeln!(out, "  {:<15} {}", tool.name(), tool.describe(false, &config.options))?;
    }
    writeln!(out, "  {:<15} {} (cases 1-2)", "rsync", Tool::Rsync.describe(false, &config.options))?;
    writeln!(out, "  {:<15} {} (case 3)", "rsync", Tool::Rsync.describe(true, &config.options))?;
    writeln!(out, "  {:<15} {} (case 3)", "engine-tracked", Tool::EngineTracked.describe(true, &config.options))?;
    writeln!(
        out,
        "  {:<15} engine, then finish (fdatasync + FileBackend target snapshot: a reflink where the filesystem \
         has them, else a sparse copy)",
        "engine+finish"
    )?;
    writeln!(out, "\nmethod: {METHOD}")?;
    writeln!(
        out,
        "the engine's source snapshot is a hard link made before timing (what a reflink filesystem gives for free)"
    )
}

/// Each copy's writer lease is newer than the one before, in this run and in earlier runs on the
/// same work directory (the time in nanoseconds, at least one more than the last): the same
/// target volume is written by one task after another, as a cluster's claims would.
fn next_epoch() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static EPOCH: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let previous = EPOCH.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)));
    now.max(previous.unwrap_or(0) + 1)
}
