//! The node: [`TaskCenter::builder`], [`TaskCenter::start`], and the [`TaskCenterHandle`] a host
//! holds.
//!
//! actix cannot run on a host's tokio worker threads (`spawn_local` outside a `LocalSet` and a
//! runtime inside a runtime both panic), so each node runs its actor system on an OS thread of
//! its own: the ZooKeeper session, the LMDB mirror's follower, the transport listener and every
//! actor live there. The host holds only the handle, whose futures are `Send` and work from any
//! tokio runtime (multi-threaded or not). Shutting down stops that thread and joins it; no
//! thread outlives the handle.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::actors::controller::DriveSettings;
use crate::actors::dispatcher::{Client, DispatcherConfig};
use crate::actors::election::{campaign, LeaderHold, LeaderInfo, Resign};
use crate::actors::runner::{Assign, ControlChanged, Holding, RunnerConfig, StopRunner};
use crate::actors::vip::VipServerConfig;
use crate::actors::{Dispatcher, LeaderStatus, Runner, VipReport, VipServer, VipSettings};
use crate::api::{ApiError, ClientReply, ClientRequest, ListFilter, PeerReply, PeerRequest, RunnerLoad};
use crate::cache::{CacheError, TaskMirror};
use crate::clock::Clock;
use crate::coord::{CoordError, Coordination, EmbeddedServer, SessionStatus, ZkCoordination};
use crate::exec::{StopToken, TaskExecutor};
use crate::model::{NodeId, RunWindow, Task, TaskId, TaskSpec};
use crate::schedule::{Schedule, ScheduleSettings};
use crate::store::{StoreError, TaskStore};
use crate::transport::{Listener, RequestHandler, Transport, TransportError};

mod builder;

pub use builder::{
    ConfigError, CoordinationConfig, TaskCenterBuilder, DEFAULT_CALL_TIMEOUT_MS, DEFAULT_DATA_THREADS,
    DEFAULT_LEADER_SUSPEND_GRACE_MS, DEFAULT_MAILBOX_CAPACITY, DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_RETENTION_AGE_MS,
    DEFAULT_RETENTION_COUNT, DEFAULT_SHUTDOWN_TIMEOUT_MS, DEFAULT_STEP_TIMEOUT_MS, DEFAULT_STOP_TIMEOUT_MS,
    DEFAULT_SWEEP_INTERVAL_MS, DEFAULT_TASKS_PER_RUNNER,
};

/// Why a node could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The coordination service could not be reached or initialised. Usually transient.
    #[error("coordination: {0}")]
    Coordination(#[from] CoordError),
    /// The task store could not be initialised.
    #[error("task store: {0}")]
    Store(#[from] StoreError),
    /// The LMDB cache could not be opened.
    #[error("task cache: {0}")]
    Cache(#[from] CacheError),
    /// The transport could not listen.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The node's thread could not be started or died while starting.
    #[error("node thread: {0}")]
    Thread(String),
    /// This node would read run windows differently from the cluster: its time zone or default
    /// run window differs from the ones the cluster's first node stored in ZooKeeper
    /// (`/config/schedule`). Start it with the cluster's settings. To change them for the whole
    /// cluster, stop every node, delete `/config/schedule` under the cluster's chroot, and start
    /// the nodes with the new settings.
    #[error(
        "this node's schedule settings ({node}) differ from the cluster's ({cluster}, stored in ZooKeeper at \
         /config/schedule); start it with the cluster's settings, or stop every node and delete /config/schedule \
         to change them"
    )]
    ScheduleMismatch {
        /// This node's settings.
        node: ScheduleSettings,
        /// The cluster's.
        cluster: ScheduleSettings,
    },
    /// This node's cluster secret is not the cluster's (its verifier differs from the one the
    /// first node stored in `/config/secret-verifier`): its peers could not call it. Final.
    #[error(
        "this node's cluster secret is not the cluster's (the verifier in /config/secret-verifier differs); start it \
         with the secret the other nodes use"
    )]
    WrongSecret,
    /// Another live process runs with this node's id: its runner registration belongs to a
    /// session that did not expire within the wait (a crashed earlier run of this node would
    /// have). Final: give each node its own id.
    #[error(
        "node id {node} is registered by another live session ({session:#x}): another task server runs with this \
         node id; give each node its own"
    )]
    DuplicateNode {
        /// The id.
        node: NodeId,
        /// The session that holds the registration.
        session: i64,
    },
}

/// A validated node configuration; [`TaskCenter::start`] runs it.
pub struct TaskCenter {
    node: NodeId,
    listen: String,
    coordination: CoordinationConfig,
    data_dir: PathBuf,
    transport: Arc<dyn Transport>,
    executor: Arc<dyn TaskExecutor>,
    clock: Arc<dyn Clock>,
    schedule: Schedule,
    vips: VipSettings,
    tasks_per_runner: u32,
    mailbox_capacity: usize,
    sweep_interval_ms: u64,
    request_timeout_ms: u64,
    call_timeout_ms: u64,
    shutdown_timeout_ms: u64,
    data_threads: usize,
    step_timeout_ms: u64,
    stop_timeout_ms: u64,
    leader_suspend_grace_ms: u64,
    temporary_failure_limit: u32,
    pass_page: usize,
    retention_age_ms: u64,
    retention_count: usize,
}

/// Where a node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Its transport address.
    pub address: String,
    /// Its leadership.
    pub leader: LeaderStatus,
    /// Its coordination session.
    pub session: SessionStatus,
}

/// Everything the node's thread hands back to the host.
struct Parts {
    address: String,
    dispatcher: Addr<Dispatcher>,
    runner: Addr<Runner>,
    leader: watch::Receiver<LeaderStatus>,
    session: watch::Receiver<SessionStatus>,
    vip_report: watch::Receiver<VipReport>,
    stop: oneshot::Sender<bool>,
}

impl TaskCenter {
    /// A builder with every default; see [`TaskCenterBuilder`].
    pub fn builder() -> TaskCenterBuilder {
        TaskCenterBuilder::default()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// Starts the node on a thread of its own: connects to the coordination service, opens the
    /// cache, listens, registers the runner and enters the election. Returns when all of that is
    /// done (the node may not lead yet).
    pub async fn start(self) -> Result<TaskCenterHandle, StartError> {
        let node = self.node.clone();
        let (started_tx, started) = oneshot::channel();
        let (exited_tx, exited) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("task-center-{node}"))
            .spawn(move || {
                // Copies run here, never on this thread (the session's and the actors').
                let data = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(self.data_threads)
                    .thread_name(format!("task-center-data-{}", self.node))
                    .enable_all()
                    .build();
                let data = match data {
                    Ok(data) => data,
                    Err(e) => {
                        let _ = started_tx.send(Err(StartError::Thread(format!("data-plane runtime: {e}"))));
                        let _ = exited_tx.send(());
                        return;
                    }
                };
                let system = actix_rt::System::new();
                match system.block_on(boot(self, data.handle().clone())) {
                    Ok((parts, run)) => {
                        let _ = started_tx.send(Ok(parts));
                        system.block_on(run);
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
                drop(system);
                // Calls still running were abandoned by their controllers; a backend call stuck
                // in the kernel is left behind rather than block the host's shutdown.
                data.shutdown_timeout(Duration::from_secs(1));
                let _ = exited_tx.send(());
            })
            .map_err(|e| StartError::Thread(e.to_string()))?;
        let parts = match started.await {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                let _ = exited.await;
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(StartError::Thread("the node thread died while starting".into())),
        };
        info!(%node, address = %parts.address, "task center started");
        Ok(TaskCenterHandle {
            node,
            address: parts.address,
            dispatcher: parts.dispatcher,
            runner: parts.runner,
            leader: parts.leader,
            session: parts.session,
            vip_report: parts.vip_report,
            stop: Some(parts.stop),
            exited: Some(exited),
            thread: Some(thread),
        })
    }
}

/// Serves peers' requests by handing them to this node's actors.
struct NodeHandler {
    node: NodeId,
    actors: OnceLock<(Addr<Dispatcher>, Addr<Runner>)>,
}

#[async_trait]
impl RequestHandler for NodeHandler {
    async fn handle(&self, request: PeerRequest) -> PeerReply {
        let Some((dispatcher, runner)) = self.actors.get() else {
            return match request {
                PeerRequest::Client(_) | PeerRequest::Forwarded(_) => PeerReply::Client(Err(ApiError::ShuttingDown)),
                PeerRequest::Assign { .. } => PeerReply::Assign(Err(ApiError::ShuttingDown)),
                PeerRequest::ControlChanged { .. } => PeerReply::Ack,
                PeerRequest::Ping => PeerReply::Pong { node: self.node.clone() },
            };
        };
        match request {
            PeerRequest::Client(request) => PeerReply::Client(
                dispatcher.send(Client { request, forwarded: false }).await.unwrap_or(Err(ApiError::ShuttingDown)),
            ),
            PeerRequest::Forwarded(request) => PeerReply::Client(
                dispatcher.send(Client { request, forwarded: true }).await.unwrap_or(Err(ApiError::ShuttingDown)),
            ),
            PeerRequest::Assign { id } => {
                PeerReply::Assign(runner.send(Assign { id }).await.unwrap_or(Err(ApiError::ShuttingDown)))
            }
            PeerRequest::ControlChanged { id } => {
                let _ = runner.send(ControlChanged { id }).await;
                PeerReply::Ack
            }
            PeerRequest::Ping => PeerReply::Pong { node: self.node.clone() },
        }
    }
}

/// Connects to ZooKeeper, trying again with backoff (and saying where it tries) while no server
/// answers: a node started before its ensemble, or during an outage, waits for it instead of
/// exiting. A connect string that cannot work (no host, a bad chroot) is refused at once.
async fn connect_zookeeper(node: &NodeId, config: crate::coord::ZkConfig) -> Result<ZkCoordination, StartError> {
    let mut delays = crate::retry::COORDINATION.delays();
    let mut attempts = 0u32;
    loop {
        match ZkCoordination::connect(config.clone()).await {
            Ok(coord) => {
                if attempts > 0 {
                    info!(%node, zookeeper = %config.connect, "reached ZooKeeper");
                }
                return Ok(coord);
            }
            Err(e) if e.is_transient() => {
                attempts += 1;
                warn!(%node, zookeeper = %config.connect, error = %e, attempts, "cannot reach ZooKeeper yet; retrying");
                delays.wait().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Refuses to start while another live session holds this node's runner registration. A
/// registration of an earlier run of this node that crashed vanishes when that session expires,
/// so it waits up to twice this session's timeout for that before it refuses.
async fn check_identity(coord: &dyn Coordination, node: &NodeId) -> Result<(), StartError> {
    let path = crate::store::layout::runner(node);
    let deadline = tokio::time::Instant::now() + coord.session_timeout() * 2;
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        let (stat, watch) = match coord.exists_watch(&path).await {
            Ok(found) => found,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                delays.wait().await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match stat {
            None => return Ok(()),
            Some(stat) if stat.ephemeral_owner == coord.session_id() => return Ok(()),
            Some(stat) if tokio::time::Instant::now() >= deadline => {
                return Err(StartError::DuplicateNode { node: node.clone(), session: stat.ephemeral_owner });
            }
            Some(stat) => {
                info!(
                    %node, session = format_args!("{:#x}", stat.ephemeral_owner),
                    "this node id is registered by another session; waiting for it to expire (an earlier run that \
                     crashed) before refusing to start"
                );
                let _ = tokio::time::timeout_at(deadline, watch).await;
            }
        }
    }
}

/// Starts everything on the node's thread; returns the parts for the handle and the future that
/// runs until shutdown.
async fn boot(
    config: TaskCenter,
    data: tokio::runtime::Handle,
) -> Result<(Parts, impl std::future::Future<Output = ()>), StartError> {
    // Before ZooKeeper answers (it may not): this node does not lead, so it holds no VIP.
    crate::actors::vip::drop_cached_vips(config.data_dir.join("cache"), &config.vips).await;
    let coord: Arc<dyn Coordination> = match config.coordination {
        CoordinationConfig::ZooKeeper(zk) => Arc::new(connect_zookeeper(&config.node, zk).await?),
        CoordinationConfig::Embedded(server) => Arc::new(server.connect()),
        CoordinationConfig::Custom(coordination) => coordination,
        CoordinationConfig::Durable(dir) => {
            let opened = tokio::task::spawn_blocking(move || EmbeddedServer::open(dir)).await;
            let server = opened
                .map_err(|e| StartError::Thread(e.to_string()))?
                .map_err(|e| StartError::Coordination(CoordError::Other(format!("embedded coordination: {e}"))))?;
            Arc::new(server.connect())
        }
    };
    let store = TaskStore::new(coord.clone(), config.clock.clone());
    let ours = config.schedule.settings();
    let agreed = async {
        // A reply lost or late while the node starts is no reason to exit: try again.
        let mut delays = crate::retry::COORDINATION.delays();
        let cluster = loop {
            let attempt = async {
                store.init().await?;
                let verifier = match config.transport.cluster_verifier() {
                    Some(ours) => Some((store.agree_verifier(&ours).await?, ours)),
                    None => None,
                };
                Ok::<_, StoreError>((store.agree_schedule(&ours).await?, verifier))
            };
            match attempt.await {
                Ok((cluster, verifier)) => {
                    if verifier.is_some_and(|(cluster, ours)| cluster != ours) {
                        return Err(StartError::WrongSecret);
                    }
                    break cluster;
                }
                Err(e) if e.is_transient() => {
                    warn!(node = %config.node, error = %e, "the coordination service did not answer while starting; retrying");
                    delays.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if cluster != ours {
            return Err(StartError::ScheduleMismatch { node: ours.clone(), cluster });
        }
        check_identity(coord.as_ref(), &config.node).await
    };
    if let Err(e) = agreed.await {
        coord.close().await;
        return Err(e);
    }
    let mirror = match TaskMirror::start(store.clone(), &config.data_dir.join("cache")).await {
        Ok(mirror) => Arc::new(mirror),
        Err(e) => {
            coord.close().await;
            return Err(e.into());
        }
    };
    let handler = Arc::new(NodeHandler { node: config.node.clone(), actors: OnceLock::new() });
    let listener = match config.transport.listen(&config.listen, handler.clone()).await {
        Ok(listener) => listener,
        Err(e) => {
            coord.close().await;
            return Err(e.into());
        }
    };
    let address = listener.address().to_string();
    let (leader_tx, leader) = watch::channel(LeaderStatus::default());
    let lease = crate::lease::start(coord.clone());
    let runner = Runner::new(RunnerConfig {
        node: config.node.clone(),
        address: address.clone(),
        capacity: config.tasks_per_runner,
        store: store.clone(),
        executor: config.executor.clone(),
        clock: config.clock.clone(),
        schedule: config.schedule.clone(),
        mailbox_capacity: config.mailbox_capacity,
        lease: lease.clone(),
        drive: DriveSettings {
            data,
            step_timeout: Duration::from_millis(config.step_timeout_ms),
            stop_timeout: Duration::from_millis(config.stop_timeout_ms),
            failure_limit: config.temporary_failure_limit,
        },
    })
    .start();
    let dispatcher = Dispatcher::new(DispatcherConfig {
        node: config.node.clone(),
        store: store.clone(),
        mirror: mirror.clone(),
        transport: config.transport.clone(),
        schedule: config.schedule.clone(),
        sweep_interval: Duration::from_millis(config.sweep_interval_ms),
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        call_timeout: Duration::from_millis(config.call_timeout_ms),
        mailbox_capacity: config.mailbox_capacity,
        status: leader_tx,
        pass_page: config.pass_page,
        retention: crate::actors::dispatcher::Retention {
            max_age: Duration::from_millis(config.retention_age_ms),
            max_count: config.retention_count,
        },
    })
    .start();
    let _ = handler.actors.set((dispatcher.clone(), runner.clone()));
    let election_stop = StopToken::new();
    let me = LeaderInfo { node: config.node.clone(), address: address.clone() };
    let (resign, resigns) = Resign::channel();
    let (vip_report_tx, vip_report) = watch::channel(VipReport::default());
    let (vip_server, arp_syncer) = VipServer::start_pair(VipServerConfig {
        node: config.node.clone(),
        store: store.clone(),
        mirror: mirror.clone(),
        settings: config.vips.clone(),
        resign,
        report: vip_report_tx,
    });
    let recipients = vec![dispatcher.clone().recipient(), vip_server.clone().recipient(), arp_syncer.recipient()];
    let hold = LeaderHold { lease, grace: Duration::from_millis(config.leader_suspend_grace_ms) };
    let election = actix::spawn(campaign(coord.clone(), me, hold, recipients, resigns, election_stop.clone()));

    let (stop, stopped) = oneshot::channel::<bool>();
    let session = coord.subscribe();
    let (node, shutdown_timeout) = (config.node.clone(), Duration::from_millis(config.shutdown_timeout_ms));
    let runner_for_stop = runner.clone();
    let run = async move {
        // Resolves on shutdown or abort, or when the handle is dropped (taken as an abort).
        let graceful = stopped.await.unwrap_or(false);
        teardown(TeardownParts {
            node,
            graceful,
            shutdown_timeout,
            runner: runner_for_stop,
            election_stop,
            election,
            listener,
            mirror,
            coord,
        })
        .await;
    };
    let parts = Parts { address, dispatcher, runner, leader, session, vip_report, stop };
    Ok((parts, run))
}

struct TeardownParts {
    node: NodeId,
    graceful: bool,
    shutdown_timeout: Duration,
    runner: Addr<Runner>,
    election_stop: StopToken,
    election: tokio::task::JoinHandle<()>,
    listener: Listener,
    mirror: Arc<TaskMirror>,
    coord: Arc<dyn Coordination>,
}

/// Stops the node's parts in order: tasks first (checkpointed if graceful), then the election
/// (so the next leader takes over at once), the listener, the mirror and the session.
async fn teardown(parts: TeardownParts) {
    let TeardownParts { node, graceful, shutdown_timeout, runner, election_stop, election, listener, mirror, coord } =
        parts;
    info!(%node, graceful, "task center stopping");
    if graceful {
        if tokio::time::timeout(shutdown_timeout, runner.send(StopRunner { graceful: true })).await.is_err() {
            warn!(%node, "tasks did not checkpoint within the shutdown timeout; dropping them");
            let _ = runner.send(StopRunner { graceful: false }).await;
        }
    } else {
        let _ = runner.send(StopRunner { graceful: false }).await;
    }
    election_stop.cancel();
    let _ = election.await;
    listener.close();
    // Still referenced by the dispatcher, the mirror closes when the system stops instead.
    if let Ok(mirror) = Arc::try_unwrap(mirror) {
        mirror.shutdown().await;
    }
    coord.close().await;
    System::current().stop();
}

/// A running node, as the host holds it. Cheap to use from any tokio runtime.
///
/// Dropping the handle without [`shutdown`](TaskCenterHandle::shutdown) aborts the node (no
/// checkpoint) and joins its thread.
pub struct TaskCenterHandle {
    node: NodeId,
    address: String,
    dispatcher: Addr<Dispatcher>,
    runner: Addr<Runner>,
    leader: watch::Receiver<LeaderStatus>,
    session: watch::Receiver<SessionStatus>,
    vip_report: watch::Receiver<VipReport>,
    stop: Option<oneshot::Sender<bool>>,
    exited: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TaskCenterHandle {
    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// This node's transport address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Where the node stands now.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            address: self.address.clone(),
            leader: *self.leader.borrow(),
            session: *self.session.borrow(),
        }
    }

    /// Follows this node's leadership.
    pub fn leader_status(&self) -> watch::Receiver<LeaderStatus> {
        self.leader.clone()
    }

    /// Follows this node's VIP server: whether VIPs are disabled here and why, which it holds,
    /// which it cannot place, and the announcements since the last leader change.
    pub fn vip_report(&self) -> watch::Receiver<VipReport> {
        self.vip_report.clone()
    }

    /// Follows this node's coordination session.
    pub fn session_status(&self) -> watch::Receiver<SessionStatus> {
        self.session.clone()
    }

    /// Sends any request; followers forward it to the leader.
    pub async fn request(&self, request: ClientRequest) -> Result<ClientReply, ApiError> {
        self.dispatcher.send(Client { request, forwarded: false }).await.unwrap_or(Err(ApiError::ShuttingDown))
    }

    /// Creates a task with a new id; returns it as stored.
    pub async fn create(&self, spec: TaskSpec, run_window: Option<RunWindow>) -> Result<Task, ApiError> {
        self.create_with_id(TaskId::generate(), spec, run_window).await
    }

    /// Creates a task with the given id; a retry with the same id and spec returns the stored task.
    pub async fn create_with_id(
        &self,
        id: TaskId,
        spec: TaskSpec,
        run_window: Option<RunWindow>,
    ) -> Result<Task, ApiError> {
        spec.validate()?;
        task(self.request(ClientRequest::Create { id, spec, run_window }).await?)
    }

    /// One task.
    pub async fn show(&self, id: TaskId) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::Show { id }).await?)
    }

    /// Tasks matching `filter`, oldest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<Task>, ApiError> {
        match self.request(ClientRequest::List(filter)).await? {
            ClientReply::Tasks(tasks) => Ok(tasks),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels a task; returns it as stored after the change.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::Cancel { id }).await?)
    }

    /// Deletes a finished task (succeeded, failed or canceled) and its records; returns it as it
    /// was. A task that is not finished is refused with [`ApiError::WrongState`].
    pub async fn delete(&self, id: TaskId) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::Delete { id }).await?)
    }

    /// Pauses a task; returns it as stored after the change.
    pub async fn pause(&self, id: TaskId) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::Pause { id }).await?)
    }

    /// Resumes a paused task; returns it as stored after the change.
    pub async fn resume(&self, id: TaskId) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::Resume { id }).await?)
    }

    /// Sets (or with `None` clears) a task's run window; returns it as stored after the change.
    pub async fn set_run_window(&self, id: TaskId, run_window: Option<RunWindow>) -> Result<Task, ApiError> {
        task(self.request(ClientRequest::SetRunWindow { id, run_window }).await?)
    }

    /// The live runners and their loads.
    pub async fn runners(&self) -> Result<Vec<RunnerLoad>, ApiError> {
        match self.request(ClientRequest::ListRunners).await? {
            ClientReply::Runners(runners) => Ok(runners),
            other => Err(unexpected(other)),
        }
    }

    /// The tasks this node's runner holds now.
    pub async fn holding(&self) -> Vec<TaskId> {
        self.runner.send(Holding).await.unwrap_or_default()
    }

    /// Stops gracefully: running tasks checkpoint and go back to pending (another node picks them
    /// up), the node leaves the election, and its session closes. Returns when the node's thread
    /// has ended.
    pub async fn shutdown(mut self) {
        self.stop_and_join(true).await;
    }

    /// Stops at once, as a crash would, but in-process: tasks are dropped without a checkpoint
    /// (they resume elsewhere from their last committed progress). The session is closed, so the
    /// node's claims vanish at once rather than after the session timeout.
    pub async fn abort(mut self) {
        self.stop_and_join(false).await;
    }

    async fn stop_and_join(&mut self, graceful: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(graceful);
        }
        if let Some(exited) = self.exited.take() {
            let _ = exited.await;
        }
        if let Some(thread) = self.thread.take() {
            // The thread has sent its last message; joining returns at once.
            let _ = thread.join();
        }
    }
}

impl Drop for TaskCenterHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(false);
        }
        if let Some(thread) = self.thread.take() {
            if thread.is_finished() {
                let _ = thread.join();
            }
            // Otherwise the thread ends by itself once it has torn the node down.
        }
    }
}

fn task(reply: ClientReply) -> Result<Task, ApiError> {
    match reply {
        ClientReply::Task(task) => Ok(task),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: ClientReply) -> ApiError {
    ApiError::Internal(format!("unexpected reply {reply:?}"))
}
