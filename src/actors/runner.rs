//! The runner: one per node. Registers the node, takes assignments, and keeps a task controller
//! per task it holds.
//!
//! On [`Assign`] it claims the task in ZooKeeper (refusing it if another runner holds it, or if
//! it is full), moves it to `Running` under that claim, and starts a [`TaskController`]. When its
//! session expires, its claims are gone with it: it abandons every controller at once (their
//! writes would be refused anyway) and registers again on the new session. On a graceful
//! shutdown every controller checkpoints and hands its task back to `Pending`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::controller::{Abandon, Checkpoint, DriveSettings, Refresh, TaskController};
use crate::api::ApiError;
use crate::clock::Clock;
use crate::coord::{CoordError, CreateMode, SessionState, SessionStatus};
use crate::exec::{Licence, TaskExecutor};
use crate::lease::LocalLease;
use crate::model::{Change, DesiredState, ModelError, NodeId, RunnerInfo, TaskId, TaskState};
use crate::schedule::Schedule;
use crate::store::{encode, layout, StoreError, TaskStore};

/// Claim and run a task. `Ok` once this runner holds it.
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Assign {
    /// The task.
    pub id: TaskId,
}

/// A task's control record changed; tell its controller.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ControlChanged {
    /// The task.
    pub id: TaskId,
}

/// How a controller ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The task moved to this state and the claim was released.
    Moved(TaskState),
    /// The controller stopped without a state change, for this reason.
    Dropped(String),
}

/// A controller ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ControllerFinished {
    /// The task.
    pub id: TaskId,
    /// How.
    pub outcome: Outcome,
}

/// Stop taking tasks; checkpoint every running task (graceful) or drop them (forced); answer
/// when every controller has ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopRunner {
    /// Checkpoint and hand tasks back, rather than dropping them.
    pub graceful: bool,
}

/// The tasks this runner holds.
#[derive(Message)]
#[rtype(result = "Vec<TaskId>")]
pub struct Holding;

#[derive(Message)]
#[rtype(result = "()")]
struct Session(SessionStatus);

#[derive(Message)]
#[rtype(result = "()")]
struct Registered(u64);

/// What a runner needs.
pub(crate) struct RunnerConfig {
    pub node: NodeId,
    pub address: String,
    pub capacity: u32,
    pub store: TaskStore,
    pub executor: Arc<dyn TaskExecutor>,
    pub clock: Arc<dyn Clock>,
    pub schedule: Schedule,
    pub mailbox_capacity: usize,
    /// The node's local lease on its session.
    pub lease: LocalLease,
    /// How controllers bound the executor's calls.
    pub drive: DriveSettings,
}

/// The runner actor. See the module docs.
pub struct Runner {
    config: RunnerConfig,
    controllers: HashMap<TaskId, Addr<TaskController>>,
    claiming: HashSet<TaskId>,
    generation: u64,
    registered: Option<u64>,
    stopping: bool,
    stopped: Vec<oneshot::Sender<()>>,
}

impl Runner {
    pub(crate) fn new(config: RunnerConfig) -> Self {
        Runner {
            config,
            controllers: HashMap::new(),
            claiming: HashSet::new(),
            generation: 0,
            registered: None,
            stopping: false,
            stopped: Vec::new(),
        }
    }

    fn load(&self) -> usize {
        self.controllers.len() + self.claiming.len()
    }

    fn register(&mut self, ctx: &mut Context<Self>) {
        let info = RunnerInfo {
            node: self.config.node.clone(),
            address: self.config.address.clone(),
            capacity: self.config.capacity,
            started_at_ms: self.config.clock.now_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let (store, generation, addr) = (self.config.store.clone(), self.generation, ctx.address());
        actix::spawn(async move {
            let mut delays = crate::retry::COORDINATION.delays();
            loop {
                match register(&store, &info).await {
                    Ok(()) => {
                        let _ = addr.send(Registered(generation)).await;
                        return;
                    }
                    Err(e) if store.coordination().status().generation != generation => {
                        let _ = e;
                        return;
                    }
                    Err(e) => {
                        warn!(node = %info.node, error = %e, "cannot register the runner; retrying");
                        delays.wait().await;
                    }
                }
            }
        });
    }

    fn check_stopped(&mut self) {
        if self.stopping && self.controllers.is_empty() && self.claiming.is_empty() {
            for done in self.stopped.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Creates the registration node. One held by another session (a duplicate node id, or an
/// earlier session of this node not yet expired) is left alone: `NodeExists`, and the caller
/// retries.
async fn register(store: &TaskStore, info: &RunnerInfo) -> Result<(), CoordError> {
    let coord = store.coordination();
    let path = layout::runner(&info.node);
    loop {
        match coord.create(&path, &encode(info), CreateMode::Ephemeral).await {
            Ok(_) => return Ok(()),
            Err(CoordError::NodeExists { .. }) => match coord.exists(&path).await? {
                Some(stat) if stat.ephemeral_owner == coord.session_id() => return Ok(()),
                Some(stat) => {
                    // Never displace another session's registration: a live node with this id
                    // keeps it; an earlier session's vanishes when it expires, and the caller
                    // retries until then.
                    return Err(CoordError::NodeExists {
                        path: format!("{path} (registered by session {:#x}, not this one)", stat.ephemeral_owner),
                    });
                }
                None => continue,
            },
            Err(e) => return Err(e),
        }
    }
}

impl Actor for Runner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        let mut session = self.config.store.coordination().subscribe();
        let addr = ctx.address();
        actix::spawn(async move {
            loop {
                let status = *session.borrow_and_update();
                if addr.send(Session(status)).await.is_err() {
                    return;
                }
                if status.state == SessionState::Closed || session.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

impl Handler<Session> for Runner {
    type Result = ();

    fn handle(&mut self, Session(status): Session, ctx: &mut Context<Self>) {
        if status.generation != self.generation && !self.controllers.is_empty() {
            warn!(node = %self.config.node, tasks = self.controllers.len(), "session expired: claims are gone; dropping every task");
            for controller in self.controllers.values() {
                super::tell(&controller.clone().recipient(), Abandon);
            }
        }
        if status.state == SessionState::Connected && status.generation != self.generation && !self.stopping {
            self.generation = status.generation;
            self.register(ctx);
        }
        if status.state == SessionState::Expired {
            self.registered = None;
        }
    }
}

impl Handler<Registered> for Runner {
    type Result = ();

    fn handle(&mut self, Registered(generation): Registered, _ctx: &mut Context<Self>) {
        if generation == self.generation {
            info!(node = %self.config.node, address = %self.config.address, "runner registered");
            self.registered = Some(generation);
        }
    }
}

impl Handler<Assign> for Runner {
    type Result = ResponseActFuture<Self, Result<(), ApiError>>;

    fn handle(&mut self, Assign { id }: Assign, _ctx: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Box::pin(fut::ready(Err(ApiError::ShuttingDown)));
        }
        if self.controllers.contains_key(&id) || self.claiming.contains(&id) {
            return Box::pin(fut::ready(Ok(())));
        }
        if self.load() >= self.config.capacity as usize {
            return Box::pin(fut::ready(Err(ApiError::Refused(format!("runner {} is full", self.config.node)))));
        }
        self.claiming.insert(id);
        let (store, node) = (self.config.store.clone(), self.config.node.clone());
        // The session the claim is made on (read before it: a licence never names a later one).
        let generation = store.coordination().status().generation;
        let claim = async move {
            let lock = store.claim(&id, &node).await?;
            if store.coordination().status().generation != generation {
                // Claimed on a later session than the licence would name: let it go, refuse.
                let _ = store.release(lock).await;
                return Err(StoreError::Coord(CoordError::SessionExpired));
            }
            let moved = store
                .transition(&id, lock.fence(), |task| match (task.state(), task.control.desired) {
                    (TaskState::Pending, DesiredState::Run) => {
                        Ok(Some((TaskState::Running, Change::Claimed(node.clone()))))
                    }
                    (from, _) => {
                        Err(StoreError::Invalid(ModelError::IllegalTransition { from, to: TaskState::Running }))
                    }
                })
                .await;
            match moved {
                Ok(task) => Ok((lock, task)),
                Err(e) => {
                    let _ = store.release(lock).await;
                    Err(e)
                }
            }
        };
        Box::pin(claim.into_actor(self).map(move |claimed, act, ctx| {
            act.claiming.remove(&id);
            let result = match claimed {
                Ok((lock, task)) if act.stopping => {
                    // Shut down while claiming: hand it straight back.
                    let store = act.config.store.clone();
                    actix::spawn(async move {
                        let fence = lock.fence().clone();
                        let _ =
                            store.transition(&task.id, &fence, |_| Ok(Some((TaskState::Pending, Change::Plain)))).await;
                        let _ = store.release(lock).await;
                    });
                    Err(ApiError::ShuttingDown)
                }
                Ok((lock, task)) => {
                    info!(task = %id, node = %act.config.node, epoch = lock.epoch(), "task claimed");
                    let licence = Licence::new(lock.lease(), act.config.lease.clone(), generation);
                    let controller = TaskController::new(
                        task,
                        lock,
                        licence,
                        act.config.store.clone(),
                        act.config.executor.clone(),
                        act.config.schedule.clone(),
                        act.config.drive.clone(),
                        ctx.address(),
                    );
                    act.controllers.insert(id, controller.start());
                    Ok(())
                }
                Err(StoreError::Claimed { holder, .. }) => Err(ApiError::Refused(format!(
                    "task {id} is claimed by {}",
                    holder.map_or("another runner".to_string(), |h| h.to_string())
                ))),
                Err(e) => Err(e.into()),
            };
            act.check_stopped();
            result
        }))
    }
}

impl Handler<ControlChanged> for Runner {
    type Result = ();

    fn handle(&mut self, ControlChanged { id }: ControlChanged, _ctx: &mut Context<Self>) {
        if let Some(controller) = self.controllers.get(&id) {
            super::tell(&controller.clone().recipient(), Refresh);
        }
    }
}

impl Handler<ControllerFinished> for Runner {
    type Result = ();

    fn handle(&mut self, ControllerFinished { id, outcome }: ControllerFinished, _ctx: &mut Context<Self>) {
        if let Some(controller) = self.controllers.remove(&id) {
            super::tell(&controller.clone().recipient(), Abandon);
        }
        info!(task = %id, ?outcome, node = %self.config.node, "controller finished");
        self.check_stopped();
    }
}

impl Handler<Holding> for Runner {
    type Result = MessageResult<Holding>;

    fn handle(&mut self, _: Holding, _ctx: &mut Context<Self>) -> Self::Result {
        let mut ids: Vec<TaskId> = self.controllers.keys().copied().collect();
        ids.sort();
        MessageResult(ids)
    }
}

impl Handler<StopRunner> for Runner {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, StopRunner { graceful }: StopRunner, _ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        for controller in self.controllers.values() {
            if graceful {
                super::tell(&controller.clone().recipient(), Checkpoint);
            } else {
                super::tell(&controller.clone().recipient(), Abandon);
            }
        }
        if !graceful {
            self.controllers.clear();
        }
        let (done, wait) = oneshot::channel();
        self.stopped.push(done);
        self.check_stopped();
        let (store, node) = (self.config.store.clone(), self.config.node.clone());
        Box::pin(async move {
            let _ = wait.await;
            if graceful {
                let _ = store.coordination().delete(&layout::runner(&node), None).await;
            }
        })
    }
}
