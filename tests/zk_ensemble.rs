//! Two task-center nodes on a real three-server ZooKeeper ensemble ([`ZkEnsemble`]), whose servers
//! are killed with SIGKILL and restarted while tasks run:
//!
//! - one server at a time (each of the three in turn, so every node's session and the ensemble's
//!   leader are hit): a quorum remains, so requests are answered throughout, the sessions move to
//!   another server and live on, the same node leads, and every task succeeds;
//! - two servers at once, for longer than the session timeout: requests fail with a transient
//!   error meanwhile; once the servers are back, without restarting any node, one node leads
//!   again, each node serves creates again, and every task accepted before, during or after the
//!   outage succeeds.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tasks::{spec, wait_state};
use common::zk::ZkEnsemble;
use task_center::api::ApiError;
use task_center::coord::{Coordination, SessionState, ZkConfig, ZkCoordination};
use task_center::exec::SimulatedExecutor;
use task_center::model::{Task, TaskId, TaskSpec, TaskState};
use task_center::store::layout;
use task_center::transport::InProcessNetwork;
use task_center::{TaskCenter, TaskCenterHandle};

/// The session timeout the nodes ask for.
/// How these tests retry what a client would retry: the crate's policy, jittered and capped.
const CLIENT_RETRY: task_center::retry::Backoff =
    task_center::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
const SESSION_TIMEOUT: Duration = Duration::from_millis(4_000);
/// The nodes' request deadline (default 30 s): short, so that a request during the quorum's
/// outage fails within the test's time rather than after half a minute.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(4_000);
/// One call between nodes (default 5 s, which must not exceed the request deadline).
const CALL_TIMEOUT: Duration = Duration::from_millis(2_000);
/// Steps of a simulated task, and their length: a task runs for 3 s, through the faults.
const STEPS: u64 = 30;
const STEP: Duration = Duration::from_millis(100);
/// A leader, and a node serving writes again, within the session timeout plus this.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);
/// How long the leader's mirror may lag behind ZooKeeper's records.
const MIRROR_LAG: Duration = Duration::from_secs(10);
/// Guard on waits for tasks to finish.
const WAIT: Duration = Duration::from_secs(30);

/// The ensemble and what the nodes share. Tests declare it before their nodes, so that on a
/// failure the nodes are dropped (aborted) before the servers are killed.
struct Cluster {
    zk: ZkEnsemble,
    /// The ensemble's connect string with a chroot of this cluster's own.
    connect: String,
    network: InProcessNetwork,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new(name: &str) -> Self {
        common::init_tracing();
        let zk = ZkEnsemble::start();
        let connect = zk.connect_string(&common::unique_chroot(name));
        Cluster { zk, connect, network: InProcessNetwork::new(), dir: tempfile::tempdir().unwrap() }
    }

    /// A new session on the ensemble.
    async fn session(&self) -> Arc<dyn Coordination> {
        let config =
            ZkConfig { session_timeout_ms: SESSION_TIMEOUT.as_millis() as u64, ..ZkConfig::new(self.connect.clone()) };
        Arc::new(ZkCoordination::connect(config).await.expect("connect to the ZooKeeper ensemble"))
    }

    async fn node(&self, name: &str) -> TaskCenterHandle {
        TaskCenter::builder()
            .node_id(name)
            .coordination(self.session().await)
            .transport(Arc::new(self.network.clone()))
            .data_dir(self.dir.path().join(name))
            .executor(Arc::new(SimulatedExecutor::new(STEPS, STEP, 1 << 20)))
            .sweep_interval_ms(100)
            .request_timeout_ms(REQUEST_TIMEOUT.as_millis() as u64)
            .call_timeout_ms(CALL_TIMEOUT.as_millis() as u64)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap()
    }
}

/// Waits up to `limit` until exactly one of `nodes` is a ready leader, the lowest election
/// candidate is that node's, and every node has exactly one candidate; returns the leader's index.
/// The observer's calls may fail while ZooKeeper recovers: that is "not yet".
async fn one_leader(limit: Duration, observer: &dyn Coordination, nodes: &[&TaskCenterHandle]) -> usize {
    common::within(limit, "exactly one leader", async {
        let mut receivers: Vec<_> = nodes.iter().map(|n| n.leader_status()).collect();
        loop {
            let ready: Vec<usize> = (0..nodes.len()).filter(|&i| receivers[i].borrow_and_update().ready).collect();
            if let [leader] = ready[..] {
                if lowest_candidate(observer)
                    .await
                    .is_some_and(|(count, node)| count == nodes.len() && node == nodes[leader].node_id().as_str())
                {
                    return leader;
                }
            }
            let changes = receivers.iter_mut().map(|r| Box::pin(r.changed()));
            let _ = tokio::time::timeout(Duration::from_millis(200), futures::future::select_all(changes)).await;
        }
    })
    .await
}

/// The number of election candidates and the node of the lowest, if they can be read now.
async fn lowest_candidate(observer: &dyn Coordination) -> Option<(usize, String)> {
    let mut names = observer.children(layout::ELECTION).await.ok()?;
    layout::sort_by_sequence(&mut names);
    let (lowest, _) = observer.get(&format!("{}/{}", layout::ELECTION, names.first()?)).await.ok()?;
    let lowest: serde_json::Value = serde_json::from_slice(&lowest).ok()?;
    Some((names.len(), lowest["node"].as_str()?.to_string()))
}

/// Waits until a finished task holds no claim (an orphan claim would block it if it ran again).
async fn no_claim_left(observer: &dyn Coordination, id: TaskId) {
    common::within(WAIT, "the finished task's claim is released", async {
        let mut delays = CLIENT_RETRY.delays();
        loop {
            match observer.children_watch(&layout::locks(&id)).await {
                Ok((claims, _)) if claims.is_empty() => return,
                Ok((_, watch)) => {
                    watch.await;
                }
                Err(e) if e.is_transient() => delays.wait().await,
                Err(e) => panic!("cannot list the claims of {id}: {e}"),
            }
        }
    })
    .await;
}

/// Creates task `id` through `node`, retrying with the same id (which a create is idempotent on)
/// after transient errors, as a client would, for up to `limit`. Returns the task and how many
/// attempts failed.
async fn create_retrying(node: &TaskCenterHandle, id: TaskId, spec: TaskSpec, limit: Duration) -> (Task, u32) {
    let what = format!("create {id} through {}", node.node_id());
    common::within(limit, &what, async {
        let (mut failures, mut delays) = (0, CLIENT_RETRY.delays());
        loop {
            match node.create_with_id(id, spec.clone(), None).await {
                Ok(task) => return (task, failures),
                Err(e) if e.is_transient() => {
                    failures += 1;
                    tracing::info!(node = %node.node_id(), task = %id, error = %e, "create failed; retrying");
                    delays.wait().await;
                }
                Err(e) => panic!("{what}: final error {e}"),
            }
        }
    })
    .await
}

/// What a user checks at the end: every task succeeded and holds no claim, and both nodes answer
/// for every task.
async fn all_done(observer: &dyn Coordination, nodes: &[&TaskCenterHandle], tasks: &[TaskId]) {
    for &id in tasks {
        wait_state(observer, id, TaskState::Succeeded, WAIT).await;
        no_claim_left(observer, id).await;
        for node in nodes {
            shows(node, id, TaskState::Succeeded).await;
        }
    }
}

/// Waits until `node` answers `show` for task `id` with `state`. The answer comes from the
/// leader's mirror of ZooKeeper, which follows the records a moment after they change: a user
/// asking again soon gets the new state. Panics with the last answer after [`MIRROR_LAG`].
async fn shows(node: &TaskCenterHandle, id: TaskId, state: TaskState) {
    let asked = Instant::now();
    let mut last = None;
    while asked.elapsed() < MIRROR_LAG {
        let shown = common::within(REQUEST_TIMEOUT * 2, "show", node.show(id)).await;
        match shown {
            Ok(task) if task.state() == state => {
                if last.is_some() {
                    tracing::info!(node = %node.node_id(), task = %id, ?last, after_ms = asked.elapsed().as_millis() as u64, "show caught up");
                }
                return;
            }
            Ok(task) => last = Some(Ok(task.state())),
            Err(e) => last = Some(Err(e)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} still shows {id} as {last:?} after {MIRROR_LAG:?}, not {state}", node.node_id());
}

/// Panics unless every node's session is open (a node that stopped would have closed it).
fn assert_live(nodes: &[&TaskCenterHandle]) {
    for node in nodes {
        let status = node.status();
        assert_ne!(status.session.state, SessionState::Closed, "{} stopped: {status:?}", node.node_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_killed_and_restarted() {
    let started = Instant::now();
    let cluster = Cluster::new("zk-ensemble-one-server");
    let observer = cluster.session().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let nodes = [&a, &b];
    let leader = one_leader(RECOVERY_BOUND, observer.as_ref(), &nodes).await;
    let generations: Vec<u64> = nodes.iter().map(|n| n.status().session.generation).collect();

    let mut accepted = Vec::new();
    for n in 0..4 {
        let (task, _) = create_retrying(nodes[n % 2], TaskId::generate(), spec(n), RECOVERY_BOUND).await;
        accepted.push(task.id);
    }

    // Every server in turn, so that the server each node's session is on, and the ensemble's
    // leader, are killed while tasks run.
    let mut retried = 0;
    for victim in 0..ZkEnsemble::SIZE {
        wait_state(observer.as_ref(), accepted[accepted.len() - 1], TaskState::Running, WAIT).await;
        let connections: Vec<usize> = (0..ZkEnsemble::SIZE).map(|i| cluster.zk.connections(i)).collect();
        tracing::info!(victim, zk_leader = ?cluster.zk.leader(), ?connections, "killing a ZooKeeper server");
        cluster.zk.kill(victim);
        assert!(!cluster.zk.is_running(victim));
        // A quorum remains: creates through either node go through (after a retry at most,
        // while sessions move or the ensemble elects a new leader), and the tasks run.
        for node in nodes {
            let n = accepted.len();
            let (task, failures) = create_retrying(node, TaskId::generate(), spec(n), RECOVERY_BOUND).await;
            retried += failures;
            accepted.push(task.id);
        }
        for &id in &accepted[accepted.len() - 2..] {
            wait_state(observer.as_ref(), id, TaskState::Running, WAIT).await;
        }
        assert!(!cluster.zk.is_running(victim), "the killed server came back by itself");
        cluster.zk.restart(victim);
        assert_live(&nodes);
    }
    tracing::info!(retried, "creates retried during the faults");

    all_done(observer.as_ref(), &nodes, &accepted).await;
    // The sessions lived through the faults (they moved to another server), so the same node
    // leads, and no node had to build a new session.
    assert_eq!(one_leader(RECOVERY_BOUND, observer.as_ref(), &nodes).await, leader, "the leader changed");
    let after: Vec<u64> = nodes.iter().map(|n| n.status().session.generation).collect();
    assert_eq!(after, generations, "a node's session expired although a quorum remained");
    assert_live(&nodes);
    for node in nodes {
        assert_eq!(node.status().session.state, SessionState::Connected, "{} is not connected", node.node_id());
    }
    a.shutdown().await;
    b.shutdown().await;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "one_server_killed_and_restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_and_regained() {
    let started = Instant::now();
    let cluster = Cluster::new("zk-ensemble-quorum");
    let observer = cluster.session().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let nodes = [&a, &b];
    one_leader(RECOVERY_BOUND, observer.as_ref(), &nodes).await;

    let mut accepted = Vec::new();
    for n in 0..4 {
        let (task, _) = create_retrying(nodes[n % 2], TaskId::generate(), spec(n), RECOVERY_BOUND).await;
        accepted.push(task.id);
    }
    wait_state(observer.as_ref(), accepted[3], TaskState::Running, WAIT).await;

    // The ensemble's leader and one follower: the survivor cannot serve alone.
    let zk_leader = cluster.zk.leader().expect("the ensemble has a leader");
    let (first, second) = (zk_leader, (zk_leader + 1) % ZkEnsemble::SIZE);
    cluster.zk.kill(first);
    cluster.zk.kill(second);

    // The outage lasts longer than the session timeout, so that the sessions may expire; nothing
    // marks the moment it has lasted long enough (the nodes cannot hear from ZooKeeper), so this
    // is a bounded sleep. Meanwhile a create through each node fails, with a transient error,
    // within its request deadline.
    let outage = SESSION_TIMEOUT + Duration::from_secs(2);
    let during: Vec<(TaskId, TaskSpec)> = (0..2).map(|i| (TaskId::generate(), spec(100 + i))).collect();
    let attempts = nodes.iter().zip(&during).map(|(node, (id, spec))| {
        // The request deadline, plus a ZooKeeper call that may have started just before it.
        let limit = REQUEST_TIMEOUT + Duration::from_secs(6);
        common::within(limit, "a create during the outage", node.create_with_id(*id, spec.clone(), None))
    });
    let attempts = futures::future::join_all(attempts);
    let (outcomes, ()) = tokio::join!(attempts, tokio::time::sleep(outage));
    for (node, outcome) in nodes.iter().zip(&outcomes) {
        match outcome {
            Err(e) if e.is_transient() => {
                tracing::info!(node = %node.node_id(), error = %e, "create refused during the outage")
            }
            Err(e) => panic!("{}: a create during the outage failed with a final error: {e}", node.node_id()),
            Ok(task) => panic!("{}: a create during the outage succeeded without a quorum: {task:?}", node.node_id()),
        }
    }
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Err(ApiError::CoordinationUnavailable(_) | ApiError::Unavailable(_) | ApiError::NotLeader { .. })
        )),
        "unexpected errors during the outage: {outcomes:?}"
    );
    // What an operator needs to read: ZooKeeper, not the node, is the problem.
    assert!(
        outcomes.iter().any(|o| matches!(o, Err(ApiError::CoordinationUnavailable(_)))),
        "no error during the outage names the coordination service: {outcomes:?}"
    );
    assert_live(&nodes);

    cluster.zk.restart(first);
    cluster.zk.restart(second);
    let regained = Instant::now();

    // Without restarting any node: one leader, and each node serves a create again.
    let bound = SESSION_TIMEOUT + RECOVERY_BOUND;
    one_leader(bound, observer.as_ref(), &nodes).await;
    for (i, node) in nodes.iter().enumerate() {
        let limit = bound.saturating_sub(regained.elapsed());
        let (task, _) = create_retrying(node, TaskId::generate(), spec(200 + i), limit).await;
        accepted.push(task.id);
    }
    tracing::info!(after_ms = regained.elapsed().as_millis() as u64, "both nodes serve creates again");
    // The creates refused during the outage, sent again with the same ids, are stored once.
    for (node, (id, spec)) in nodes.iter().zip(&during) {
        let (task, _) = create_retrying(node, *id, spec.clone(), RECOVERY_BOUND).await;
        assert_eq!(task.id, *id);
        accepted.push(task.id);
    }

    all_done(observer.as_ref(), &nodes, &accepted).await;
    one_leader(RECOVERY_BOUND, observer.as_ref(), &nodes).await;
    assert_live(&nodes);
    for node in nodes {
        let status = node.status();
        tracing::info!(node = %node.node_id(), session = ?status.session, "after the outage");
        assert_eq!(status.session.state, SessionState::Connected, "{} is not connected", node.node_id());
    }
    a.shutdown().await;
    b.shutdown().await;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "quorum_lost_and_regained");
}
