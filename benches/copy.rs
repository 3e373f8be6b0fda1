//! Micro-benchmarks of the copy path: zero detection on a 64 KiB block (against the naive
//! `iter().all`, for reference), and one 64 MiB extent copied through the memory backend, in full
//! mode (every block data, every block written) and in incremental mode (1 block in 64 changed
//! since the base: every block read and compared, few written). Figures are in bytes of volume
//! per second, so the copy figures measure the engine's own overhead over `memcpy`.
//!
//! `cargo bench --bench copy`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use task_center::copy::{is_zero, CopyEngine, MemoryBackend, VolumeRef};
use task_center::exec::{Licence, Step, StopToken, TaskExecutor};
use task_center::model::WriterLease;
use task_center::model::{
    CopyOptions, CopyVolumeSpec, RecordVersions, SnapshotId, Task, TaskControl, TaskId, TaskProgress, TaskSpec,
    TaskStatus, VolumeId,
};

const BLOCK: usize = 64 << 10;
const VOLUME: u64 = 64 << 20;

fn zero_detection(c: &mut Criterion) {
    let mut group = c.benchmark_group("zero_64KiB");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let zeroes = vec![0u8; BLOCK];
    let mut last = vec![0u8; BLOCK];
    last[BLOCK - 1] = 1;
    group.bench_function("is_zero/all_zero", |b| b.iter(|| is_zero(black_box(&zeroes))));
    group.bench_function("iter_all/all_zero", |b| b.iter(|| black_box(&zeroes).iter().all(|&x| x == 0)));
    group.bench_function("is_zero/last_byte_set", |b| b.iter(|| is_zero(black_box(&last))));
    group.finish();
}

struct Setup {
    engine: CopyEngine,
    task: Task,
}

fn volume(host: &str, name: &str) -> VolumeRef {
    VolumeRef { hosts: vec![host.into()], volume: VolumeId::new(name).unwrap() }
}

/// A 64 MiB source full of data and an empty target; with `incremental`, both hold a base and
/// the source has 1 block in 64 changed since.
fn setup(runtime: &tokio::runtime::Runtime, incremental: bool) -> Setup {
    let backend = MemoryBackend::new();
    let (source, target) = (volume("198.51.100.1:10201", "src"), volume("203.0.113.1:10201", "dst"));
    backend.create_volume(&source, VOLUME);
    backend.create_volume(&target, VOLUME);
    let data: Vec<u8> = (0..VOLUME).map(|i| (i % 251) as u8 + 1).collect();
    backend.write_volume(&source, 0, &data);
    let base = SnapshotId::new("base").unwrap();
    if incremental {
        backend.write_volume(&target, 0, &data);
        runtime.block_on(async {
            use task_center::copy::CopyBackend;
            backend.create_snapshot(&source, &base).await.unwrap();
            backend.create_snapshot(&target, &base).await.unwrap();
        });
        for block in (0..VOLUME as usize / BLOCK).step_by(64) {
            backend.write_volume(&source, (block * BLOCK) as u64, &[0xAB; 16]);
        }
    }
    let options = CopyOptions { extent_size_bytes: VOLUME, ..CopyOptions::default() };
    let spec = CopyVolumeSpec {
        source_volume: source.volume.clone(),
        target_volume: target.volume.clone(),
        source_hosts: source.hosts.clone(),
        target_hosts: target.hosts.clone(),
        base_snapshot: incremental.then_some(base),
        options,
    };
    let task = Task {
        id: TaskId::generate(),
        control: TaskControl::new(TaskSpec::CopyVolume(spec), None, 0),
        status: TaskStatus::pending(0),
        progress: TaskProgress::default(),
        versions: RecordVersions::default(),
    };
    Setup { engine: CopyEngine::new(Arc::new(backend)), task }
}

/// Copies the one extent from the start (the source snapshot is taken on the first call).
async fn copy_extent(setup: &Setup) {
    let mut progress = TaskProgress::default();
    let mut run = setup
        .engine
        .start(&setup.task, &Licence::unlimited(WriterLease::new(setup.task.id, 1)), &mut progress)
        .await
        .unwrap();
    let step = run.step(&mut progress, &StopToken::new()).await.unwrap();
    assert_eq!(step, Step::Done);
    black_box(progress);
}

fn extent_copy(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("copy_extent_64MiB");
    group.throughput(Throughput::Bytes(VOLUME));
    group.sample_size(10);
    for (name, incremental) in [("full", false), ("incremental", true)] {
        let setup = setup(&runtime, incremental);
        group.bench_function(name, |b| b.to_async(&runtime).iter(|| copy_extent(&setup)));
    }
    group.finish();
}

criterion_group!(benches, zero_detection, extent_copy);
criterion_main!(benches);
