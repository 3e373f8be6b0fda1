//! How the leading dispatcher serves client requests, and how followers forward them.
//!
//! Writes go to ZooKeeper first (fenced on the leader's candidate node) and the answer is the
//! task as stored after the change; the result is written through to the local mirror so that
//! the next read on this node sees it. Reads come from the mirror. Operations on one task are
//! idempotent where a retry after a lost answer could repeat them (create with the same id,
//! pause a paused task, cancel a canceled one, resume a running one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use super::election::current_leader;
use crate::api::{
    ApiError, ClientReply, ClientRequest, ListFilter, PeerReply, PeerRequest, RunnerLoad, VipStatus, MAX_LIST_LIMIT,
};
use crate::cache::TaskMirror;
use crate::model::{Change, DesiredState, RunWindow, RunnerInfo, Task, TaskId, TaskState};
use crate::store::{Fence, TaskStore};
use crate::transport::Transport;

/// What the leader serves requests with; a snapshot taken per request.
#[derive(Clone)]
pub(crate) struct Leader {
    pub store: TaskStore,
    pub fence: Fence,
    pub mirror: Arc<TaskMirror>,
    pub transport: Arc<dyn Transport>,
    pub runners: Arc<Vec<RunnerInfo>>,
    pub call_timeout: Duration,
}

impl Leader {
    /// Serves one request as the leader.
    pub(crate) async fn serve(&self, request: ClientRequest) -> Result<ClientReply, ApiError> {
        match request {
            ClientRequest::Create { id, spec, run_window } => {
                let task = self.store.create(id, spec, run_window, &self.fence).await?;
                self.written(task).await
            }
            ClientRequest::Show { id } => match self.mirror.get(id).await.map_err(internal)? {
                Some(task) => Ok(ClientReply::Task(task)),
                // Not mirrored yet (just created elsewhere?): ask ZooKeeper.
                None => Ok(ClientReply::Task(self.store.get(&id).await?)),
            },
            ClientRequest::List(filter) => self.list(filter).await,
            ClientRequest::Cancel { id } => self.cancel(id).await,
            ClientRequest::Pause { id } => self.pause(id).await,
            ClientRequest::Resume { id } => self.resume(id).await,
            ClientRequest::SetRunWindow { id, run_window } => self.set_run_window(id, run_window).await,
            ClientRequest::ListRunners => self.list_runners().await,
            ClientRequest::SetVip(config) => {
                self.store.set_vip(&config, &self.fence).await?;
                self.list_vips().await
            }
            ClientRequest::DeleteVip { service } => {
                if !self.store.delete_vip(&service, &self.fence).await? {
                    return Err(ApiError::NoSuchVip { service });
                }
                self.list_vips().await
            }
            ClientRequest::ListVips => self.list_vips().await,
            ClientRequest::Delete { id } => {
                let task = self.store.delete_finished(&id, &self.fence).await?;
                // Read your own delete: the mirror's event may still be on its way.
                let _ = self.mirror.remove(id).await;
                tracing::info!(task = %id, state = %task.state(), "task deleted on request");
                Ok(ClientReply::Task(task))
            }
        }
    }

    /// Every service's VIPs with where they really are, from the nodes' VIP reports.
    async fn list_vips(&self) -> Result<ClientReply, ApiError> {
        let mut configs = self.store.vips().await?;
        configs.sort_by(|a, b| a.service.cmp(&b.service));
        // The reports are best effort: without them the configuration is still listed.
        let nodes = self.store.vip_statuses().await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the nodes' VIP reports");
            Vec::new()
        });
        let statuses = configs
            .into_iter()
            .map(|config| {
                let addresses = crate::model::vip_address_states(&config, &nodes);
                let holder = match addresses.first().map(|a| &a.holders[..]) {
                    Some([one]) if addresses.iter().all(|a| a.holders[..] == [one.clone()]) => Some(one.clone()),
                    _ => None,
                };
                VipStatus { config, holder, addresses }
            })
            .collect();
        Ok(ClientReply::Vips(statuses))
    }

    async fn list(&self, filter: ListFilter) -> Result<ClientReply, ApiError> {
        if filter.limit == 0 || filter.limit > MAX_LIST_LIMIT {
            return Err(ApiError::Invalid {
                field: "limit".into(),
                value: filter.limit.to_string(),
                reason: format!("must be 1 to {MAX_LIST_LIMIT}"),
            });
        }
        let from = filter.created_from_ms.unwrap_or(i64::MIN);
        let to = filter.created_to_ms.unwrap_or(i64::MAX);
        if from > to {
            return Err(ApiError::Invalid {
                field: "created_from_ms".into(),
                value: from.to_string(),
                reason: "is after created_to_ms".into(),
            });
        }
        let tasks = match filter.state {
            Some(state) => {
                let mut tasks = self.mirror.list_by_state(state, from, filter.limit).await.map_err(internal)?;
                tasks.retain(|t| t.control.created_at_ms < to);
                tasks
            }
            None => self.mirror.list_by_created(from, to, filter.limit).await.map_err(internal)?,
        };
        Ok(ClientReply::Tasks(tasks))
    }

    async fn list_runners(&self) -> Result<ClientReply, ApiError> {
        let running =
            self.mirror.list_by_state(TaskState::Running, i64::MIN, MAX_LIST_LIMIT).await.map_err(internal)?;
        let runners = self
            .runners
            .iter()
            .map(|info| RunnerLoad {
                info: info.clone(),
                running: running.iter().filter(|t| t.status.runner.as_ref() == Some(&info.node)).count() as u32,
            })
            .collect();
        Ok(ClientReply::Runners(runners))
    }

    async fn cancel(&self, id: TaskId) -> Result<ClientReply, ApiError> {
        let task = self.store.get(&id).await?;
        match task.state() {
            TaskState::Canceled => return Ok(ClientReply::Task(task)),
            s if s.is_terminal() => return Err(wrong_state(&task, "cancel")),
            _ => {}
        }
        self.set_desired(&id, DesiredState::Cancel).await?;
        let task = self
            .store
            .transition(&id, &self.fence, |t| match (t.state(), t.control.desired) {
                (TaskState::Pending | TaskState::Paused, DesiredState::Cancel) => {
                    Ok(Some((TaskState::Canceled, Change::Plain)))
                }
                _ => Ok(None),
            })
            .await?;
        self.notify_runner(&task).await;
        self.written(task).await
    }

    async fn pause(&self, id: TaskId) -> Result<ClientReply, ApiError> {
        let task = self.store.get(&id).await?;
        if task.state().is_terminal() {
            return Err(wrong_state(&task, "pause"));
        }
        if task.state() == TaskState::Paused {
            return Ok(ClientReply::Task(task));
        }
        self.set_desired(&id, DesiredState::Pause).await?;
        let task = self
            .store
            .transition(&id, &self.fence, |t| match (t.state(), t.control.desired) {
                (TaskState::Pending, DesiredState::Pause) => Ok(Some((TaskState::Paused, Change::Plain))),
                _ => Ok(None),
            })
            .await?;
        self.notify_runner(&task).await;
        self.written(task).await
    }

    async fn resume(&self, id: TaskId) -> Result<ClientReply, ApiError> {
        let task = self.store.get(&id).await?;
        if task.state().is_terminal() || task.control.desired == DesiredState::Cancel {
            return Err(wrong_state(&task, "resume"));
        }
        if task.control.desired == DesiredState::Run {
            return Ok(ClientReply::Task(task));
        }
        self.set_desired(&id, DesiredState::Run).await?;
        let task = self
            .store
            .transition(&id, &self.fence, |t| match (t.state(), t.control.desired) {
                (TaskState::Paused, DesiredState::Run) => Ok(Some((TaskState::Pending, Change::Plain))),
                _ => Ok(None),
            })
            .await?;
        self.notify_runner(&task).await;
        self.written(task).await
    }

    async fn set_run_window(&self, id: TaskId, run_window: Option<RunWindow>) -> Result<ClientReply, ApiError> {
        let task = self
            .store
            .update_control(&id, &self.fence, |control| {
                control.run_window = run_window;
                Ok(())
            })
            .await?;
        self.notify_runner(&task).await;
        self.written(task).await
    }

    /// Sets the desired state unless the task went terminal meanwhile.
    async fn set_desired(&self, id: &TaskId, desired: DesiredState) -> Result<Task, ApiError> {
        Ok(self
            .store
            .update_control(id, &self.fence, |control| {
                control.desired = desired;
                Ok(())
            })
            .await?)
    }

    /// Tells the task's runner that its control record changed. Best effort: the runner also
    /// watches the record in ZooKeeper.
    async fn notify_runner(&self, task: &Task) {
        if task.state() != TaskState::Running {
            return;
        }
        let Some(runner) = task.status.runner.as_ref() else { return };
        let Some(info) = self.runners.iter().find(|r| &r.node == runner) else { return };
        let request = PeerRequest::ControlChanged { id: task.id };
        if let Err(e) = self.transport.call(&info.address, request, self.call_timeout).await {
            debug!(task = %task.id, %runner, error = %e, "runner not told of a control change; its watch will tell it");
        }
    }

    /// Writes an answer through to the mirror and returns it.
    async fn written(&self, task: Task) -> Result<ClientReply, ApiError> {
        let _ = self.mirror.upsert(task.clone()).await;
        Ok(ClientReply::Task(task))
    }
}

fn wrong_state(task: &Task, action: &str) -> ApiError {
    ApiError::WrongState { id: task.id, state: task.state(), action: action.to_string() }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Sends a request to the current leader, following leader changes until `deadline`.
pub(crate) async fn forward(
    store: &TaskStore,
    transport: &dyn Transport,
    request: ClientRequest,
    deadline: Instant,
    call_timeout: Duration,
) -> Result<ClientReply, ApiError> {
    let mut delays = crate::retry::FORWARD.delays();
    loop {
        let last;
        match current_leader(store.coordination().as_ref()).await {
            Ok(Some(leader)) => {
                let timeout = call_timeout.min(deadline.saturating_duration_since(Instant::now()));
                match transport.call(&leader.address, PeerRequest::Forwarded(request.clone()), timeout).await {
                    Ok(PeerReply::Client(Err(e))) if e.is_transient() => last = e,
                    Ok(PeerReply::Client(result)) => return result,
                    Ok(other) => return Err(ApiError::Internal(format!("leader answered {other:?}"))),
                    Err(e) => last = ApiError::Unavailable(format!("leader {}: {e}", leader.node)),
                }
            }
            Ok(None) => last = ApiError::Unavailable("no leader elected".into()),
            Err(e) => last = ApiError::CoordinationUnavailable(e.to_string()),
        }
        let delay = delays.next().unwrap_or_default();
        if Instant::now() + delay >= deadline {
            return Err(last);
        }
        tokio::time::sleep(delay).await;
    }
}
