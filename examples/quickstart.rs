//! The task center in one process, on its embedded defaults: three nodes, embedded coordination,
//! the in-process transport, and the file backend in a temporary directory.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! It makes a sparse 2 GiB source volume with scattered data, copies it with live progress,
//! changes a few blocks and copies again incrementally, kills the node running a third copy
//! half-way to show the task resuming elsewhere from its last extent, and checks every copy
//! against its source snapshot by digest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use task_center::coord::EmbeddedServer;
use task_center::copy::{CopyEngine, FileBackend, VolumeDigest, VolumeRef};
use task_center::model::{CopyOptions, CopyVolumeSpec, SnapshotId, Task, TaskSpec, TaskState, Verify, VolumeId};
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterHandle};

const VOLUME_BYTES: u64 = 1 << 30;
const EXTENT_BYTES: u64 = 64 << 20;
const HOST: &str = "198.51.100.10:10201";
const REMOTE: &str = "203.0.113.10:10201";

type Error = Box<dyn std::error::Error>;

/// A small deterministic generator, so every run writes the same data.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn volume(host: &str, name: &str) -> VolumeRef {
    VolumeRef { hosts: vec![host.to_string()], volume: VolumeId::new(name).expect("a valid name") }
}

/// Writes `runs` runs of 1 MiB of pseudo-random data at scattered offsets of a volume file.
fn scatter(path: &std::path::Path, seed: u64, runs: u64, run_bytes: usize) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = XorShift(seed);
    let mut buf = vec![0u8; run_bytes];
    for _ in 0..runs {
        let slots = VOLUME_BYTES / run_bytes as u64;
        let offset = (rng.next() % slots) * run_bytes as u64;
        rng.fill(&mut buf);
        file.write_all_at(&buf, offset)?;
    }
    file.sync_all()
}

/// The copy digest of an image file, read extent by extent.
fn digest_of(path: &std::path::Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut digest = VolumeDigest::new(Verify::Xxh3);
    let mut extent = vec![0u8; EXTENT_BYTES as usize];
    for offset in (0..VOLUME_BYTES).step_by(EXTENT_BYTES as usize) {
        file.read_exact_at(&mut extent, offset)?;
        digest.push_extent(&extent);
    }
    Ok(digest.finish())
}

fn copy_spec(source: &VolumeRef, target: &VolumeRef, base: Option<SnapshotId>, limit: Option<u64>) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: base,
        options: CopyOptions {
            extent_size_bytes: EXTENT_BYTES,
            verify: Some(Verify::Xxh3),
            bandwidth_limit_bytes_per_second: limit,
            ..CopyOptions::default()
        },
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// One line of progress, redrawn in place.
fn draw(task: &Task) {
    let p = &task.progress;
    let total = p.total_bytes.unwrap_or(VOLUME_BYTES).max(1);
    let done = (p.cursor_bytes * 30 / total) as usize;
    eprint!(
        "\r  [{}{}] {:>5.1}%  copied {}, skipped {} hole / {} zero / {} unchanged, walking {}/s   ",
        "#".repeat(done),
        ".".repeat(30 - done),
        p.cursor_bytes as f64 * 100.0 / total as f64,
        mib(p.counters.bytes_copied),
        mib(p.counters.bytes_skipped_hole),
        mib(p.counters.bytes_skipped_zero),
        mib(p.counters.bytes_skipped_unchanged),
        mib(p.rate_bytes_per_second),
    );
}

/// Shows progress until the task ends (a display refresh, not a synchronisation).
async fn follow(node: &TaskCenterHandle, task: &Task) -> Result<Task, Error> {
    loop {
        let now = node.show(task.id).await?;
        draw(&now);
        if now.state().is_terminal() {
            eprintln!();
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn check(backend: &FileBackend, source: &VolumeRef, task: &Task, target: &VolumeRef) -> Result<(), Error> {
    let snapshot = CopyEngine::snapshot_name(&task.id);
    let expected = digest_of(&backend.snapshot_path(source, &snapshot))?;
    let actual = digest_of(&backend.volume_path(target))?;
    let recorded = task.progress.digest.clone();
    let ok = expected == actual && actual == recorded;
    println!(
        "  digest  source snapshot {}  target {}  recorded {}  {}",
        short(&expected),
        short(&actual),
        short(&recorded),
        if ok { "EQUAL" } else { "DIFFERENT" }
    );
    if !ok {
        return Err("the copy does not match its source".into());
    }
    Ok(())
}

/// The last node still running.
fn any_node(nodes: &[Option<TaskCenterHandle>]) -> &TaskCenterHandle {
    nodes.iter().flatten().last().expect("a node is up")
}

fn short(digest: &Option<String>) -> String {
    digest.as_deref().map_or("-".into(), |d| d[..12].to_string())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let backend = FileBackend::new(dir.path().join("volumes"));
    let server = EmbeddedServer::new();
    let network = InProcessNetwork::new();

    println!(
        "Starting three nodes (embedded coordination, in-process transport, file backend in {})",
        dir.path().display()
    );
    let mut nodes = Vec::new();
    for name in ["node-1", "node-2", "node-3"] {
        let node = TaskCenter::builder()
            .node_id(name)
            .embedded(server.clone())
            .transport(Arc::new(network.clone()))
            .data_dir(dir.path().join(name))
            .copy_backend(Arc::new(backend.clone()))
            .build()?
            .start()
            .await?;
        nodes.push(Some(node));
    }
    let mut leader = nodes[0].as_ref().expect("started").leader_status();
    leader.wait_for(|s| s.ready).await.ok();

    let source = volume(HOST, "vm-disk-1");
    let target = volume(REMOTE, "vm-disk-1-backup");
    backend.create_volume(&source, VOLUME_BYTES).await?;
    backend.create_volume(&target, VOLUME_BYTES).await?;
    scatter(&backend.volume_path(&source), 7, 96, 1 << 20)?;
    println!("\n1. Full copy of a sparse {} volume holding 96 MiB of data in scattered 1 MiB runs", mib(VOLUME_BYTES));
    let node = any_node(&nodes);
    let first = node.create(copy_spec(&source, &target, None, None), None).await?;
    let first = follow(node, &first).await?;
    check(&backend, &source, &first, &target)?;

    println!("\n2. Change 16 MiB of the source, then copy incrementally against the first copy's snapshot");
    scatter(&backend.volume_path(&source), 99, 16, 1 << 20)?;
    let base = CopyEngine::snapshot_name(&first.id);
    let second = node.create(copy_spec(&source, &target, Some(base.clone()), None), None).await?;
    let second = follow(node, &second).await?;
    check(&backend, &source, &second, &target)?;

    println!("\n3. A copy to a second site, throttled to 64 MiB/s; its node is killed half-way");
    let other = volume("203.0.113.20:10201", "vm-disk-1-dr");
    backend.create_volume(&other, VOLUME_BYTES).await?;
    let third = node.create(copy_spec(&source, &other, None, Some(64 << 20)), None).await?;
    let (victim, at) = loop {
        let now = node.show(third.id).await?;
        draw(&now);
        if now.state() == TaskState::Running && now.progress.cursor_bytes >= VOLUME_BYTES / 2 {
            break (now.status.runner.clone().expect("a running task has a runner"), now.progress.cursor_bytes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!();
    println!("  killing {victim}, which runs it at {}", mib(at));
    let index = nodes.iter().position(|n| n.as_ref().is_some_and(|n| *n.node_id() == victim)).expect("victim is up");
    nodes[index].take().expect("up").abort().await;
    let node = any_node(&nodes);
    let third = follow(node, &third).await?;
    println!(
        "  resumed on {} (attempt {}), from its last committed extent",
        third.status.runner.as_ref().map_or("?".into(), |r| r.to_string()),
        third.status.attempts
    );
    check(&backend, &source, &third, &other)?;

    for node in nodes.into_iter().flatten() {
        node.shutdown().await;
    }
    println!("\nDone in {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
