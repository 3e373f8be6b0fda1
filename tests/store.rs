//! Integration tests of [`TaskStore`]: every case is written once, generic over a [`Backend`], and
//! runs against a real ZooKeeper server (the shared one of this test binary, each case under its
//! own chroot) and against the in-process [`EmbeddedServer`], so both backends are shown to agree.
//!
//! What they prove (DESIGN.md): one owner per task, with fenced progress writes (invariant 1);
//! control and progress are separate records with one writer each, so progress commits never
//! lose a run-window change (invariant 2, the seeds' bug); answers are the task as stored after
//! the change (invariant 3); bad input is refused with a typed error and changes nothing
//! (invariant 8).
//!
//! Timeouts here are guards against hangs only; every wait is on an event (a watch, a session
//! status change, a call's answer, a channel).

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use task_center::clock::{Clock, ManualClock, SystemClock};
use task_center::coord::{
    Coordination, CreateMode, EmbeddedCoordination, EmbeddedServer, EventKind, SessionState, ZkConfig, ZkCoordination,
};
use task_center::model::{
    Change, CopyOptions, CopyVolumeSpec, ModelError, NodeId, ProgressCounters, RunWindow, SnapshotId, Task, TaskId,
    TaskProgress, TaskSpec, TaskState, VolumeId,
};
use task_center::store::{layout, Fence, StoreError, TaskLock, TaskStore};
use tokio::sync::watch;

use common::{init_tracing, shared_zk, step, unique_chroot, wait_status, within, Proxy, STEP_TIMEOUT};

/// Guard for a whole case.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Session timeout of a handle whose session a case makes expire (ZooKeeper: through a proxy).
const EXPIRY_SESSION_TIMEOUT_MS: u64 = 2_000;
/// Guard for a ZooKeeper session expiry to be noticed (a few session timeouts).
const EXPIRY_GUARD: Duration = Duration::from_secs(30);
/// Progress is counted in MiB extents.
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Backends

/// A coordination service under test. All handles of one backend value see the same tree.
enum Backend {
    /// The shared ZooKeeper server of this test binary, under a chroot of the case's own.
    Zookeeper { chroot: String },
    /// An in-process server.
    Embedded(EmbeddedServer),
}

/// How a case makes one handle's session expire from outside.
enum CutOff {
    /// Embedded: `expire()`, at once.
    Embedded(EmbeddedCoordination),
    /// ZooKeeper: the handle talks through this proxy; blocking it lets the server expire the
    /// session after its timeout.
    Proxy(Proxy),
}

impl CutOff {
    /// Cuts the handle off; its session ends (at once embedded, after the timeout on ZooKeeper).
    fn cut(&self) {
        match self {
            CutOff::Embedded(coord) => coord.expire(),
            CutOff::Proxy(proxy) => proxy.block(),
        }
    }

    /// Lets the handle reach the service again (it then builds a new session).
    fn restore(&self) {
        if let CutOff::Proxy(proxy) = self {
            proxy.unblock();
        }
    }
}

impl Backend {
    fn zookeeper(case: &str) -> Backend {
        init_tracing();
        Backend::Zookeeper { chroot: unique_chroot(case) }
    }

    fn embedded() -> Backend {
        init_tracing();
        Backend::Embedded(EmbeddedServer::new())
    }

    /// A new session with default settings.
    async fn connect(&self) -> Arc<dyn Coordination> {
        match self {
            Backend::Zookeeper { chroot } => {
                Arc::new(zk_connect(ZkConfig::new(shared_zk().connect_string(chroot))).await)
            }
            Backend::Embedded(server) => Arc::new(server.connect()),
        }
    }

    /// A new session that [`CutOff::cut`] can end.
    async fn connect_expirable(&self) -> (Arc<dyn Coordination>, CutOff) {
        match self {
            Backend::Zookeeper { chroot } => {
                let proxy = Proxy::start(shared_zk().port());
                let mut config = ZkConfig::new(proxy.connect_string(chroot));
                config.session_timeout_ms = EXPIRY_SESSION_TIMEOUT_MS;
                (Arc::new(zk_connect(config).await), CutOff::Proxy(proxy))
            }
            Backend::Embedded(server) => {
                let coord = server.connect();
                (Arc::new(coord.clone()), CutOff::Embedded(coord))
            }
        }
    }
}

async fn zk_connect(config: ZkConfig) -> ZkCoordination {
    let what = format!("connect to ZooKeeper at {}", config.connect);
    match step(&what, ZkCoordination::connect(config)).await {
        Ok(coord) => coord,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Instantiates each case for both backends, as `<case>::zookeeper` and `<case>::embedded`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zookeeper() {
                let backend = Backend::zookeeper(stringify!($case));
                within(CASE_TIMEOUT, concat!("zookeeper ", stringify!($case)), super::$case(backend)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                within(CASE_TIMEOUT, concat!("embedded ", stringify!($case)), super::$case(Backend::embedded())).await;
            }
        }
    )*};
}

on_both_backends! {
    create_is_idempotent_and_refuses_a_different_spec,
    progress_writes_never_lose_a_run_window_change,
    claims_are_exclusive,
    concurrent_claims_have_one_winner,
    expired_runner_cannot_write_progress,
    deposed_dispatcher_cannot_write_control,
    illegal_transitions_change_nothing,
    concurrent_transitions_have_one_winner,
    commit_with_transition_is_atomic,
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// One node of the cluster: a session and a task store over it.
struct Node {
    coord: Arc<dyn Coordination>,
    store: TaskStore,
}

impl Node {
    /// A node on a session of its own, with the layout's parents in place.
    async fn join(backend: &Backend, clock: Arc<dyn Clock>) -> Node {
        Node::over(backend.connect().await, clock).await
    }

    async fn over(coord: Arc<dyn Coordination>, clock: Arc<dyn Clock>) -> Node {
        let store = TaskStore::new(coord.clone(), clock);
        ok("init the layout", step("init", store.init()).await);
        Node { coord, store }
    }

    /// A dispatcher's fence: an election candidate node of this node's session.
    async fn candidate(&self) -> Fence {
        let prefix = format!("{}/{}", layout::ELECTION, layout::CANDIDATE_PREFIX);
        let path = step("create a candidate", self.coord.create(&prefix, b"", CreateMode::EphemeralSequential)).await;
        Fence::new(path.unwrap_or_else(|e| panic!("create an election candidate: {e:?}")))
    }
}

fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn window(text: &str) -> RunWindow {
    text.parse().unwrap_or_else(|e| panic!("window {text:?}: {e}"))
}

/// A valid copy spec; `n` makes specs differ.
fn copy_spec(n: u32) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: VolumeId::new(format!("vol-src-{n}")).unwrap(),
        target_volume: VolumeId::new(format!("vol-dst-{n}")).unwrap(),
        source_hosts: vec!["198.51.100.1:10201".into()],
        target_hosts: vec!["198.51.100.2:10201".into()],
        base_snapshot: None,
        options: CopyOptions::default(),
    })
}

/// Progress after `extents` MiB extents of `total`.
fn progress(extents: u64, total: u64) -> TaskProgress {
    TaskProgress {
        cursor_bytes: extents * MIB,
        total_bytes: Some(total * MIB),
        counters: ProgressCounters { bytes_copied: extents * MIB, ..ProgressCounters::default() },
        source_snapshot: Some(SnapshotId::new("snap-1").unwrap()),
        digest: None,
        rate_bytes_per_second: MIB,
        updated_at_ms: extents as i64,
    }
}

/// Holds its first `parties` callers until all of them have arrived (or a hang guard passed).
/// For closures the store calls synchronously between its read and its write.
struct Rendezvous {
    arrived: Mutex<usize>,
    all_here: Condvar,
    parties: usize,
}

impl Rendezvous {
    fn new(parties: usize) -> Self {
        Rendezvous { arrived: Mutex::new(0), all_here: Condvar::new(), parties }
    }

    /// Blocks this thread (telling the runtime so) until every party has arrived. If one never
    /// comes (its call failed before reaching here), gives up after the hang guard; the callers'
    /// results tell why.
    fn arrive(&self) {
        tokio::task::block_in_place(|| {
            let mut arrived = self.arrived.lock().unwrap();
            *arrived += 1;
            if *arrived >= self.parties {
                self.all_here.notify_all();
                return;
            }
            let waited = self.all_here.wait_timeout_while(arrived, STEP_TIMEOUT, |arrived| *arrived < self.parties);
            drop(waited.unwrap());
        });
    }
}

/// The value of a call that must succeed.
#[track_caller]
fn ok<T>(what: &str, result: Result<T, StoreError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

/// The error of a call that must fail.
#[track_caller]
fn err<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) -> StoreError {
    match result {
        Ok(value) => panic!("{what}: succeeded with {value:?}, expected an error"),
        Err(e) => e,
    }
}

/// Asserts that `error` is `Fenced` on `fence`.
#[track_caller]
fn assert_fenced(what: &str, error: StoreError, fence: &Fence) {
    assert_eq!(error, StoreError::Fenced { fence: fence.path().to_string() }, "{what}");
}

async fn get(store: &TaskStore, id: &TaskId) -> Task {
    ok("get", step("get", store.get(id)).await)
}

async fn create(store: &TaskStore, id: TaskId, spec: TaskSpec, run_window: Option<RunWindow>, fence: &Fence) -> Task {
    ok("create", step("create", store.create(id, spec, run_window, fence)).await)
}

async fn claim(store: &TaskStore, id: &TaskId, runner: &NodeId) -> TaskLock {
    ok("claim", step("claim", store.claim(id, runner)).await)
}

/// Moves a task to `to` unconditionally (the table still applies).
async fn move_to(store: &TaskStore, id: &TaskId, fence: &Fence, to: TaskState, change: Change) -> Task {
    let call = store.transition(id, fence, |_| Ok(Some((to, change.clone()))));
    ok(&format!("transition to {to}"), step("transition", call).await)
}

// ---------------------------------------------------------------------------------------------
// Cases

/// 1. A client retrying a create gets the stored task; the same id with another spec is refused;
///    an invalid spec is refused by name and stores nothing.
async fn create_is_idempotent_and_refuses_a_different_spec(backend: Backend) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let dispatcher = Node::join(&backend, clock.clone()).await;
    let fence = dispatcher.candidate().await;
    let store = &dispatcher.store;

    let id = TaskId::generate();
    let night = window("22:00-04:00");
    let created = create(store, id, copy_spec(1), Some(night), &fence).await;
    assert_eq!(created.id, id);
    assert_eq!(created.state(), TaskState::Pending);
    assert_eq!(created.control.spec, copy_spec(1));
    assert_eq!(created.run_window(), Some(night));
    assert_eq!(created.control.created_at_ms, 1_700_000_000_000);
    assert_eq!(created.progress, TaskProgress::default());
    assert_eq!(get(store, &id).await, created, "the answer is the task as stored");

    // A retry (the answer was lost) later: the stored task comes back, not a new one.
    clock.advance_ms(60_000);
    let again = create(store, id, copy_spec(1), Some(night), &fence).await;
    assert_eq!(again, created, "a retried create returns the stored task, created_at_ms included");

    let refused = err("create with another spec", store.create(id, copy_spec(2), Some(night), &fence).await);
    assert_eq!(refused, StoreError::AlreadyExists { id });
    assert_eq!(get(store, &id).await, created, "the refused create changed nothing");

    let mut bad = copy_spec(3);
    let TaskSpec::CopyVolume(copy) = &mut bad;
    copy.source_hosts.clear();
    let bad_id = TaskId::generate();
    let refused = err("create an invalid spec", store.create(bad_id, bad, None, &fence).await);
    assert!(
        matches!(refused, StoreError::Invalid(ModelError::Invalid { field: "source_hosts", .. })),
        "the error names the bad field: {refused:?}"
    );
    assert_eq!(err("get the refused task", store.get(&bad_id).await), StoreError::NotFound { id: bad_id });
    assert_eq!(ok("list_ids", store.list_ids().await), vec![id], "only the valid task is stored");
}

/// 2. The seeds' bug: a runner committing progress must never reset a run window the dispatcher
///    set meanwhile. The runner commits 200 times while the dispatcher changes the window 50
///    times; the two are kept in step loosely (neither waits for a particular write of the
///    other) so that their writes really interleave for the whole run.
async fn progress_writes_never_lose_a_run_window_change(backend: Backend) {
    const COMMITS: u64 = 200;
    const WINDOWS: usize = 50;
    const RATIO: u64 = COMMITS / WINDOWS as u64;

    let dispatcher = Node::join(&backend, system_clock()).await;
    let runner = Node::join(&backend, system_clock()).await;
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(1), Some(window("00:00-06:00")), &fence).await;
    let mut lock = claim(&runner.store, &id, &node("runner-1")).await;

    // Every window differs from every other, alternating plain and past-midnight ones.
    let windows: Vec<RunWindow> = (0..WINDOWS)
        .map(|j| if j % 2 == 0 { window(&format!("01:{j:02}-05:00")) } else { window(&format!("22:{j:02}-04:00")) })
        .collect();

    let (committed_tx, mut committed_rx) = watch::channel(0u64);
    let (updated_tx, mut updated_rx) = watch::channel(0usize);

    let runner_store = runner.store.clone();
    let runner_task = tokio::spawn(async move {
        for i in 1..=COMMITS {
            // Stay at most a few commits ahead of the dispatcher; the last commit comes after the
            // last window change, so a stale window written back would be the final state.
            let need = if i == COMMITS { WINDOWS } else { (i / RATIO).saturating_sub(2) as usize };
            if updated_rx.wait_for(|done| *done >= need).await.is_err() {
                return Err(format!("the dispatcher stopped before commit {i}"));
            }
            if let Err(e) = runner_store.commit_progress(&mut lock, &progress(i, COMMITS)).await {
                return Err(format!("commit_progress {i} failed: {e:?}"));
            }
            committed_tx.send_replace(i);
        }
        Ok(lock)
    });

    let dispatcher_store = dispatcher.store.clone();
    let dispatcher_fence = fence.clone();
    let dispatcher_windows = windows.clone();
    let dispatcher_task = tokio::spawn(async move {
        let mut answers = Vec::new();
        for (j, w) in dispatcher_windows.into_iter().enumerate() {
            // Wait until the runner is under way, so this change races its commits.
            if committed_rx.wait_for(|done| *done >= RATIO * j as u64).await.is_err() {
                break;
            }
            let set = |control: &mut task_center::model::TaskControl| {
                control.run_window = Some(w);
                Ok(())
            };
            answers.push(dispatcher_store.update_control(&id, &dispatcher_fence, set).await);
            updated_tx.send_replace(j + 1);
        }
        answers
    });

    let runner_result = runner_task.await.expect("the runner task panicked");
    let answers = dispatcher_task.await.expect("the dispatcher task panicked");
    let lock = runner_result.unwrap_or_else(|e| panic!("runner: {e}"));

    assert_eq!(answers.len(), WINDOWS, "every window change was made");
    for (j, (answer, w)) in answers.into_iter().zip(&windows).enumerate() {
        let task = ok(&format!("update_control {j} to {w}"), answer);
        assert_eq!(task.run_window(), Some(*w), "update {j}: the answer shows the window just set");
        assert_eq!(task.versions.control, j as i32 + 1, "update {j}: only the dispatcher writes control");
        assert!(
            task.progress.cursor_bytes >= RATIO * j as u64 * MIB,
            "update {j}: the answer shows the progress committed before the call, got cursor {}",
            task.progress.cursor_bytes
        );
    }

    let stored = get(&dispatcher.store, &id).await;
    assert_eq!(stored.run_window(), windows.last().copied(), "the last window set survives all progress commits");
    assert_eq!(stored.progress, progress(COMMITS, COMMITS), "the last progress committed survives all window changes");
    assert_eq!(stored.versions.control, WINDOWS as i32, "progress commits never wrote the control record");
    assert_eq!(stored.versions.progress, COMMITS as i32, "window changes never wrote the progress record");
    assert_eq!((stored.state(), stored.versions.status), (TaskState::Pending, 0), "nobody touched the status");
    assert_eq!(ok("claim_holder", runner.store.claim_holder(&id).await), Some(node("runner-1")));
    ok("release", runner.store.release(lock).await);
}

/// 3. At most one runner holds a task; a released claim writes nothing more.
async fn claims_are_exclusive(backend: Backend) {
    let dispatcher = Node::join(&backend, system_clock()).await;
    let a = Node::join(&backend, system_clock()).await;
    let b = Node::join(&backend, system_clock()).await;
    let (runner_a, runner_b) = (node("runner-a"), node("runner-b"));
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(1), None, &fence).await;

    let missing = TaskId::generate();
    assert_eq!(
        err("claim a missing task", a.store.claim(&missing, &runner_a).await),
        StoreError::NotFound { id: missing }
    );
    assert_eq!(ok("claim_holder before any claim", dispatcher.store.claim_holder(&id).await), None);

    let mut lock_a = claim(&a.store, &id, &runner_a).await;
    assert_eq!((lock_a.task_id(), lock_a.runner()), (id, &runner_a));
    let refused = err("B claims A's task", b.store.claim(&id, &runner_b).await);
    assert_eq!(refused, StoreError::Claimed { id, holder: Some(runner_a.clone()) });
    assert_eq!(ok("claim_holder", dispatcher.store.claim_holder(&id).await), Some(runner_a.clone()));
    let locks = ok("children of locks", dispatcher.coord.children(&layout::locks(&id)).await.map_err(Into::into));
    assert_eq!(locks.len(), 1, "the refused claim left nothing behind: {locks:?}");

    ok("A commits", a.store.commit_progress(&mut lock_a, &progress(1, 10)).await);
    let mut stale = lock_a.clone();
    ok("A releases", a.store.release(lock_a).await);
    assert_eq!(ok("claim_holder after release", dispatcher.store.claim_holder(&id).await), None);

    let mut lock_b = claim(&b.store, &id, &runner_b).await;
    assert_eq!(ok("claim_holder", dispatcher.store.claim_holder(&id).await), Some(runner_b.clone()));
    assert_ne!(lock_b.fence(), stale.fence(), "a new claim is a new fence");
    let refused = err("A claims B's task", a.store.claim(&id, &runner_a).await);
    assert_eq!(refused, StoreError::Claimed { id, holder: Some(runner_b.clone()) });

    let refused =
        err("A commits under its released claim", a.store.commit_progress(&mut stale, &progress(2, 10)).await);
    assert_fenced("A's stale lock", refused, stale.fence());
    let stored = get(&dispatcher.store, &id).await;
    assert_eq!((stored.progress, stored.versions.progress), (progress(1, 10), 1), "A's refused commit wrote nothing");

    // Releasing a claim already gone is not an error, and does not free B's claim.
    ok("A releases its stale lock", a.store.release(stale).await);
    assert_eq!(ok("claim_holder", dispatcher.store.claim_holder(&id).await), Some(runner_b.clone()));

    ok("B commits", b.store.commit_progress(&mut lock_b, &progress(3, 10)).await);
    let stored = get(&dispatcher.store, &id).await;
    assert_eq!((stored.progress, stored.versions.progress), (progress(3, 10), 2), "B resumed where A stopped");
}

/// 3b. Runners on separate sessions claim one task at once: one wins, the others are told who.
async fn concurrent_claims_have_one_winner(backend: Backend) {
    const RUNNERS: usize = 8;
    let dispatcher = Node::join(&backend, system_clock()).await;
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(1), None, &fence).await;

    let mut runners = Vec::new();
    for i in 0..RUNNERS {
        runners.push((node(&format!("runner-{i}")), Node::join(&backend, system_clock()).await));
    }
    let claims = runners.iter().map(|(name, runner)| runner.store.claim(&id, name));
    let results = step("concurrent claims", futures::future::join_all(claims)).await;

    let winners: Vec<&NodeId> =
        results.iter().filter_map(|result| result.as_ref().ok().map(|lock| lock.runner())).collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins: {results:?}");
    let winner = winners[0].clone();
    for result in &results {
        match result {
            Ok(lock) => assert_eq!(lock.task_id(), id),
            Err(e) => assert_eq!(e, &StoreError::Claimed { id, holder: Some(winner.clone()) }, "a losing claim"),
        }
    }
    assert_eq!(ok("claim_holder", dispatcher.store.claim_holder(&id).await), Some(winner));
    let locks = ok("children of locks", dispatcher.coord.children(&layout::locks(&id)).await.map_err(Into::into));
    assert_eq!(locks.len(), 1, "the losing claims left nothing behind: {locks:?}");
}

/// 4. A runner whose session expired is fenced off even though its handle lives on (with a new
///    session); another runner takes the task over.
async fn expired_runner_cannot_write_progress(backend: Backend) {
    let dispatcher = Node::join(&backend, system_clock()).await;
    let (a_coord, cut_off) = backend.connect_expirable().await;
    let a = Node::over(a_coord, system_clock()).await;
    let b = Node::join(&backend, system_clock()).await;
    let (runner_a, runner_b) = (node("runner-a"), node("runner-b"));
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(1), None, &fence).await;

    let mut status = a.coord.subscribe();
    assert_eq!((status.borrow().state, status.borrow().generation), (SessionState::Connected, 1));
    let mut lock_a = claim(&a.store, &id, &runner_a).await;
    ok("A commits", a.store.commit_progress(&mut lock_a, &progress(1, 10)).await);

    let claim_path = lock_a.fence().path().to_string();
    let (stat, gone) = step("B watches A's claim", b.coord.exists_watch(&claim_path)).await.expect("exists_watch");
    assert_eq!(stat.expect("A's claim node exists").ephemeral_owner, a.coord.session_id());

    cut_off.cut();
    let event = within(EXPIRY_GUARD, "A's claim vanishes with its session", gone).await;
    assert_eq!((event.kind, event.path.as_str()), (EventKind::Deleted, claim_path.as_str()));
    cut_off.restore();
    let now = wait_status(&mut status, EXPIRY_GUARD, |s| s.state == SessionState::Connected && s.generation >= 2).await;
    assert_eq!(now.generation, 2, "one expiry, one new session");

    let refused =
        err("A commits after its session expired", a.store.commit_progress(&mut lock_a, &progress(2, 10)).await);
    assert_fenced("A's lock from the expired session", refused, lock_a.fence());
    let stored = get(&b.store, &id).await;
    assert_eq!((stored.progress, stored.versions.progress), (progress(1, 10), 1), "still A's last commit");
    assert_eq!(ok("claim_holder", b.store.claim_holder(&id).await), None);

    let mut lock_b = claim(&b.store, &id, &runner_b).await;
    assert_eq!(ok("claim_holder", dispatcher.store.claim_holder(&id).await), Some(runner_b));
    ok("B commits", b.store.commit_progress(&mut lock_b, &progress(2, 10)).await);
    let refused = err("A commits again", a.store.commit_progress(&mut lock_a, &progress(3, 10)).await);
    assert_fenced("A's lock after B took over", refused, lock_a.fence());
    let stored = get(&dispatcher.store, &id).await;
    assert_eq!((stored.progress, stored.versions.progress), (progress(2, 10), 2), "B's commit, not A's");
}

/// 5. A dispatcher that lost its fence (candidate deleted, or its session closed) cannot write
///    control, status or new tasks.
async fn deposed_dispatcher_cannot_write_control(backend: Backend) {
    let dispatcher = Node::join(&backend, system_clock()).await;
    let store = &dispatcher.store;
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    let night = window("22:00-04:00");
    let day = window("01:00-05:00");
    let before = create(store, id, copy_spec(1), Some(night), &fence).await;

    // The candidate node is deleted (leadership given up, or removed by an operator).
    step("delete the candidate", dispatcher.coord.delete(fence.path(), None)).await.expect("delete the candidate");
    let set_day = |control: &mut task_center::model::TaskControl| {
        control.run_window = Some(day);
        Ok(())
    };
    assert_fenced("update_control", err("update_control", store.update_control(&id, &fence, set_day).await), &fence);
    let cancel = store.transition(&id, &fence, |_| Ok(Some((TaskState::Canceled, Change::Plain))));
    assert_fenced("transition", err("transition", cancel.await), &fence);
    let other = TaskId::generate();
    assert_fenced("create", err("create", store.create(other, copy_spec(2), None, &fence).await), &fence);
    assert_eq!(get(store, &id).await, before, "the fenced writes changed nothing");
    assert_eq!(err("get the fenced create", store.get(&other).await), StoreError::NotFound { id: other });

    // The candidate belonged to a session that has ended since.
    let old = Node::join(&backend, system_clock()).await;
    let old_fence = old.candidate().await;
    step("close the old dispatcher's session", old.coord.close()).await;
    let update = store.update_control(&id, &old_fence, set_day);
    assert_fenced("update_control under a closed session's fence", err("update_control", update.await), &old_fence);
    assert_eq!(get(store, &id).await, before, "the fenced write changed nothing");

    // The same write under a live fence goes through: the refusals were about the fence.
    let live = dispatcher.candidate().await;
    let after = ok("update_control under a live fence", store.update_control(&id, &live, set_day).await);
    assert_eq!((after.run_window(), after.versions.control), (Some(day), 1));
}

/// 6. A transition the table refuses, or one without what it needs, changes nothing; legal ones
///    record the runner and the reason; a terminal task stays where it is.
async fn illegal_transitions_change_nothing(backend: Backend) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let dispatcher = Node::join(&backend, clock.clone()).await;
    let store = &dispatcher.store;
    let fence = dispatcher.candidate().await;
    let id = TaskId::generate();
    let created = create(store, id, copy_spec(1), None, &fence).await;
    assert_eq!(created.state(), TaskState::Pending);

    let to =
        |state: TaskState, change: Change| store.transition(&id, &fence, move |_| Ok(Some((state, change.clone()))));

    clock.advance_ms(1_000);
    let refused = err("pending -> succeeded", to(TaskState::Succeeded, Change::Plain).await);
    assert_eq!(
        refused,
        StoreError::Invalid(ModelError::IllegalTransition { from: TaskState::Pending, to: TaskState::Succeeded })
    );
    assert_eq!(get(store, &id).await, created, "a refused transition changes nothing");

    let refused = err("pending -> running without a runner", to(TaskState::Running, Change::Plain).await);
    assert!(matches!(refused, StoreError::Invalid(ModelError::Invalid { .. })), "{refused:?}");
    assert_eq!(get(store, &id).await, created, "a transition missing its runner changes nothing");

    clock.advance_ms(1_000);
    let running = ok("pending -> running", to(TaskState::Running, Change::Claimed(node("runner-1"))).await);
    assert_eq!(running.state(), TaskState::Running);
    assert_eq!((running.status.runner.clone(), running.status.attempts), (Some(node("runner-1")), 1));
    assert_eq!((running.versions.status, running.status.updated_at_ms), (1, 1_700_000_002_000));
    assert_eq!(get(store, &id).await, running, "the answer is the task as stored");

    let refused = err("running -> failed without a reason", to(TaskState::Failed, Change::Plain).await);
    assert!(matches!(refused, StoreError::Invalid(ModelError::Invalid { .. })), "{refused:?}");
    assert_eq!(get(store, &id).await, running);

    clock.advance_ms(1_000);
    let failed = ok("running -> failed", to(TaskState::Failed, Change::Failed("disk gone".into())).await);
    assert_eq!((failed.state(), failed.status.reason.as_deref()), (TaskState::Failed, Some("disk gone")));
    assert_eq!(failed.status.runner, Some(node("runner-1")), "the runner that held it is kept");
    assert_eq!(failed.versions.status, 2);
    assert_eq!(get(store, &id).await, failed);

    for target in TaskState::ALL {
        let change = match target {
            TaskState::Running => Change::Claimed(node("runner-2")),
            TaskState::Failed => Change::Failed("again".into()),
            _ => Change::Plain,
        };
        let refused = err(&format!("failed -> {target}"), to(target, change).await);
        assert_eq!(refused, StoreError::Invalid(ModelError::IllegalTransition { from: TaskState::Failed, to: target }));
    }
    assert_eq!(get(store, &id).await, failed, "a terminal task does not move");
}

/// 7. Two dispatchers race to cancel and to pause one pending task, 8 calls each: one call wins,
///    every answer shows the winner's state, and the status was written exactly once.
async fn concurrent_transitions_have_one_winner(backend: Backend) {
    const RACERS: usize = 8;
    let canceler = Node::join(&backend, system_clock()).await;
    let pauser = Node::join(&backend, system_clock()).await;
    let cancel_fence = canceler.candidate().await;
    let pause_fence = pauser.candidate().await;
    let id = TaskId::generate();
    create(&canceler.store, id, copy_spec(1), None, &cancel_fence).await;

    // Every racer reads the task before any writes: a real conflict on every backend, even where
    // calls barely interleave by themselves.
    let read_together = Arc::new(Rendezvous::new(2 * RACERS));
    let mut racers = Vec::new();
    for i in 0..2 * RACERS {
        let (store, fence, target) = if i % 2 == 0 {
            (canceler.store.clone(), cancel_fence.clone(), TaskState::Canceled)
        } else {
            (pauser.store.clone(), pause_fence.clone(), TaskState::Paused)
        };
        let read_together = read_together.clone();
        racers.push(tokio::spawn(async move {
            // Whether the last decision of the call was to write: if so and the call succeeded,
            // that write is the one that landed (a lost race re-reads and decides again).
            let mut wrote = false;
            let mut first = true;
            let result = store
                .transition(&id, &fence, |task| {
                    if first {
                        read_together.arrive();
                    }
                    first = false;
                    wrote = task.state() == TaskState::Pending;
                    Ok(wrote.then_some((target, Change::Plain)))
                })
                .await;
            (target, wrote, result)
        }));
    }

    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.expect("a racer panicked"));
    }
    let stored = get(&canceler.store, &id).await;
    assert!(matches!(stored.state(), TaskState::Canceled | TaskState::Paused), "final state {}", stored.state());
    let winners: Vec<TaskState> =
        outcomes.iter().filter(|(_, wrote, _)| *wrote).map(|(target, _, _)| *target).collect();
    assert_eq!(winners, vec![stored.state()], "exactly one call changed the task, to the stored state");
    assert_eq!(stored.versions.status, winners.len() as i32, "the status was written once per successful change");
    for (target, _, result) in outcomes {
        let task = ok(&format!("transition to {target}"), result);
        assert_eq!(task.status, stored.status, "every answer shows the stored state");
        assert_eq!(task.versions.status, stored.versions.status);
    }
}

/// 8. A runner's final commit writes progress and status together, or neither.
async fn commit_with_transition_is_atomic(backend: Backend) {
    let dispatcher = Node::join(&backend, system_clock()).await;
    let runner = Node::join(&backend, system_clock()).await;
    let runner_id = node("runner-1");
    let fence = dispatcher.candidate().await;

    // Finishing: final progress and Succeeded in one write.
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(1), None, &fence).await;
    let mut lock = claim(&runner.store, &id, &runner_id).await;
    move_to(&runner.store, &id, lock.fence(), TaskState::Running, Change::Claimed(runner_id.clone())).await;
    ok("commit", runner.store.commit_progress(&mut lock, &progress(5, 10)).await);
    let last = TaskProgress { digest: Some("blake3:00ff".into()), ..progress(10, 10) };
    let done = ok(
        "commit_with_transition",
        runner.store.commit_with_transition(&mut lock, &last, TaskState::Succeeded, Change::Plain).await,
    );
    assert_eq!((done.state(), &done.progress), (TaskState::Succeeded, &last));
    let stored = get(&dispatcher.store, &id).await;
    assert_eq!(stored, done, "the answer is the task as stored");
    assert_eq!((stored.versions.progress, stored.versions.status), (2, 2));
    ok("release", runner.store.release(lock).await);

    // A lost claim: neither record is written.
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(2), None, &fence).await;
    let mut lock = claim(&runner.store, &id, &runner_id).await;
    move_to(&runner.store, &id, lock.fence(), TaskState::Running, Change::Claimed(runner_id.clone())).await;
    ok("commit", runner.store.commit_progress(&mut lock, &progress(5, 10)).await);
    let before = get(&dispatcher.store, &id).await;
    let mut stale = lock.clone();
    ok("release", runner.store.release(lock).await);
    let refused = err(
        "commit_with_transition under a released claim",
        runner.store.commit_with_transition(&mut stale, &last, TaskState::Succeeded, Change::Plain).await,
    );
    assert_fenced("released claim", refused, stale.fence());
    assert_eq!(get(&dispatcher.store, &id).await, before, "neither progress nor status was written");

    // The status part is refused (the task was canceled meanwhile): the progress is not written.
    let id = TaskId::generate();
    create(&dispatcher.store, id, copy_spec(3), None, &fence).await;
    let mut lock = claim(&runner.store, &id, &runner_id).await;
    move_to(&runner.store, &id, lock.fence(), TaskState::Running, Change::Claimed(runner_id.clone())).await;
    ok("commit", runner.store.commit_progress(&mut lock, &progress(5, 10)).await);
    move_to(&dispatcher.store, &id, &fence, TaskState::Canceled, Change::Plain).await;
    let before = get(&dispatcher.store, &id).await;
    let refused = err(
        "commit_with_transition on a canceled task",
        runner.store.commit_with_transition(&mut lock, &last, TaskState::Succeeded, Change::Plain).await,
    );
    assert_eq!(
        refused,
        StoreError::Invalid(ModelError::IllegalTransition { from: TaskState::Canceled, to: TaskState::Succeeded })
    );
    assert_eq!(get(&dispatcher.store, &id).await, before, "neither progress nor status was written");
}
