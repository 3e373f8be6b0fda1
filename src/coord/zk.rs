//! Coordination over a real ZooKeeper ensemble, through `zookeeper-client`.
//!
//! One [`ZkCoordination`] holds one ZooKeeper session at a time, under a chroot taken from the
//! connect string (`host1:2181,host2:2181/task-center/prod`), so that several clusters and test
//! runs share one ensemble without seeing each other. The chroot node is created on connect.
//!
//! A supervisor task follows the session's state: a lost connection is published as
//! [`SessionState::Suspended`], a restored one as `Connected`. When the server declares the session
//! expired, the supervisor publishes `Expired`, then connects a new session with backoff and
//! publishes `Connected` with the next generation; owners re-create their ephemeral nodes. Every
//! call carries [`ZkConfig::operation_timeout_ms`], so nothing waits forever on a dead ensemble.
//!
//! The session task of `zookeeper-client` and the supervisor run on the tokio runtime that called
//! [`ZkCoordination::connect`]; that runtime must outlive the handle.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::{
    check_path, CoordError, CreateMode, EventKind, Op, OpResult, Result, SessionState, SessionStatus, Stat, TreeWatch,
    Version, Watch, WatchEvent, MAX_DATA_BYTES,
};

/// Settings of a ZooKeeper connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZkConfig {
    /// Connect string with optional chroot: `127.0.0.1:2181,127.0.0.2:2181/task-center/prod`.
    pub connect: String,
    /// Session timeout asked of the server (it clamps it to its own bounds). Ephemeral nodes of a
    /// node that died vanish this long after its death. Default 10 000 ms.
    pub session_timeout_ms: u64,
    /// Longest wait for any one call; past it the call fails with `ConnectionLoss`. Default
    /// 5 000 ms.
    pub operation_timeout_ms: u64,
}

impl ZkConfig {
    /// Settings with the defaults for everything but the connect string.
    pub fn new(connect: impl Into<String>) -> Self {
        ZkConfig { connect: connect.into(), session_timeout_ms: 10_000, operation_timeout_ms: 5_000 }
    }

    /// Splits the connect string into hosts and chroot (`/` when none).
    fn split(&self) -> Result<(String, String)> {
        let (hosts, chroot) = match self.connect.find('/') {
            Some(i) => (&self.connect[..i], &self.connect[i..]),
            None => (self.connect.as_str(), "/"),
        };
        if hosts.is_empty() {
            return Err(CoordError::Other(format!("connect string {:?} names no host", self.connect)));
        }
        check_path(chroot)?;
        Ok((hosts.to_string(), chroot.to_string()))
    }
}

/// A [`Coordination`](super::Coordination) handle over ZooKeeper. Cheap to clone; clones share the
/// session.
#[derive(Clone)]
pub struct ZkCoordination {
    inner: Arc<Inner>,
}

struct Inner {
    config: ZkConfig,
    hosts: String,
    chroot: String,
    /// The current session's client; `None` once closed.
    client: Mutex<Option<zk::Client>>,
    status: watch::Sender<SessionStatus>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.supervisor.get_mut().ok().and_then(|s| s.take()) {
            task.abort();
        }
    }
}

impl ZkCoordination {
    /// Connects a session (creating the chroot node if missing) and starts following it.
    /// Fails with `Timeout` if no server answers within the session timeout.
    pub async fn connect(config: ZkConfig) -> Result<ZkCoordination> {
        let (hosts, chroot) = config.split()?;
        let client = new_session(&config, &hosts, &chroot).await?;
        let (status, _) = watch::channel(SessionStatus { state: SessionState::Connected, generation: 1 });
        let inner = Arc::new(Inner {
            config,
            hosts,
            chroot,
            client: Mutex::new(Some(client.clone())),
            status,
            supervisor: Mutex::new(None),
        });
        let task = tokio::spawn(supervise(Arc::downgrade(&inner), client.state_watcher(), client.session_id()));
        drop(client);
        *inner.supervisor.lock().expect("supervisor lock") = Some(task);
        Ok(ZkCoordination { inner })
    }

    /// The settings this handle was made with.
    pub fn config(&self) -> &ZkConfig {
        &self.inner.config
    }

    /// Ends the current session from outside, as the server does when it expires a session: a
    /// second connection takes the session over (by its id and password) and closes it. This
    /// handle then sees the session end, publishes [`Expired`](SessionState::Expired) and builds
    /// a new one, exactly as after a real expiry. Returns once the expiry is published, or after
    /// twice the session timeout. For fault tests.
    pub async fn expire_session(&self) -> Result<()> {
        let client = self.client()?;
        let generation = self.inner.status.borrow().generation;
        let mut status = self.inner.status.subscribe();
        let timeout = client.session_timeout();
        let hosts = self.inner.hosts.clone();
        let thief = zk::Client::connector().with_session(client.session().clone()).with_session_timeout(timeout);
        drop(client);
        let thief = tokio::time::timeout(timeout, thief.connect(&hosts))
            .await
            .map_err(|_| CoordError::Timeout(format!("no second connection to {hosts}")))?
            .map_err(|e| map_error(e, "/"))?;
        // Dropping the only handle of the taken-over session closes it on the server.
        drop(thief);
        let ended = status.wait_for(|s| s.generation > generation || s.state == SessionState::Expired);
        let _ = tokio::time::timeout(timeout * 2, ended).await;
        Ok(())
    }

    fn client(&self) -> Result<zk::Client> {
        self.inner.client.lock().expect("client lock").clone().ok_or(CoordError::Closed)
    }

    /// Runs one call on the current session with the operation timeout.
    async fn call<T, F, Fut>(&self, path: &str, f: F) -> Result<T>
    where
        F: FnOnce(zk::Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, zk::Error>>,
    {
        check_path(path)?;
        let client = self.client()?;
        let timeout = Duration::from_millis(self.inner.config.operation_timeout_ms);
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(result) => result.map_err(|e| self.map_err(e, path)),
            Err(_) => Err(CoordError::ConnectionLoss),
        }
    }

    async fn add_tree_watch(&self, path: &str) -> Result<zk::PersistentWatcher> {
        self.call(path, |c| async move { c.watch(path, zk::AddWatchMode::PersistentRecursive).await }).await
    }

    fn map_err(&self, e: zk::Error, path: &str) -> CoordError {
        if matches!(e, zk::Error::ClientClosed) && self.client().is_err() {
            return CoordError::Closed;
        }
        map_error(e, path)
    }
}

async fn new_session(config: &ZkConfig, hosts: &str, chroot: &str) -> Result<zk::Client> {
    let session_timeout = Duration::from_millis(config.session_timeout_ms);
    let connect = zk::Client::connector().with_session_timeout(session_timeout).connect(hosts);
    let client = match tokio::time::timeout(session_timeout + Duration::from_secs(1), connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(map_error(e, "/")),
        Err(_) => return Err(CoordError::Timeout(format!("no ZooKeeper session with {hosts}"))),
    };
    if chroot == "/" {
        return Ok(client);
    }
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    match client.mkdir(chroot, &options).await {
        Ok(()) | Err(zk::Error::NodeExists) => {}
        Err(e) => return Err(map_error(e, chroot)),
    }
    client
        .chroot(chroot.to_string())
        .map_err(|_| CoordError::BadPath { path: chroot.to_string(), reason: "bad chroot" })
}

/// Follows the session's state; builds a new session after an expiry. Holds no client itself, so
/// that dropping the handle's client closes the session.
async fn supervise(inner: std::sync::Weak<Inner>, mut states: zk::StateWatcher, mut session: zk::SessionId) {
    let mut generation = 1;
    loop {
        let state = states.changed().await;
        let Some(owner) = inner.upgrade() else { return };
        let publish = |state| owner.status.send_replace(SessionStatus { state, generation });
        match state {
            zk::SessionState::Disconnected => {
                debug!(chroot = %owner.chroot, "ZooKeeper connection lost; session suspended");
                publish(SessionState::Suspended);
            }
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                debug!(chroot = %owner.chroot, "ZooKeeper connection restored");
                publish(SessionState::Connected);
            }
            zk::SessionState::Closed if owner.client.lock().expect("client lock").is_none() => {
                publish(SessionState::Closed);
                return;
            }
            zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed => {
                warn!(chroot = %owner.chroot, %session, ?state, "ZooKeeper session ended; building a new one");
                publish(SessionState::Expired);
                drop(owner);
                let Some(client) = reconnect(&inner).await else { return };
                (states, session) = (client.state_watcher(), client.session_id());
                drop(client);
                generation += 1;
                let Some(owner) = inner.upgrade() else { return };
                info!(chroot = %owner.chroot, %session, generation, "new ZooKeeper session");
                owner.status.send_replace(SessionStatus { state: SessionState::Connected, generation });
            }
        }
    }
}

/// Connects a new session with capped exponential backoff; installs it as the current client.
/// Returns `None` if the handle was dropped or closed meanwhile.
async fn reconnect(inner: &std::sync::Weak<Inner>) -> Option<zk::Client> {
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        let owner = inner.upgrade()?;
        if owner.client.lock().expect("client lock").is_none() {
            return None;
        }
        let (config, hosts, chroot) = (owner.config.clone(), owner.hosts.clone(), owner.chroot.clone());
        drop(owner);
        match new_session(&config, &hosts, &chroot).await {
            Ok(client) => {
                let owner = inner.upgrade()?;
                let mut slot = owner.client.lock().expect("client lock");
                slot.as_ref()?;
                *slot = Some(client.clone());
                return Some(client);
            }
            Err(e) => {
                let delay = delays.next().unwrap_or_default();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot build a new ZooKeeper session");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn map_error(e: zk::Error, path: &str) -> CoordError {
    let path = path.to_string();
    match e {
        zk::Error::NoNode => CoordError::NoNode { path },
        zk::Error::NodeExists => CoordError::NodeExists { path },
        zk::Error::BadVersion => CoordError::BadVersion { path },
        zk::Error::NotEmpty => CoordError::NotEmpty { path },
        zk::Error::NoChildrenForEphemerals => CoordError::NoChildrenForEphemerals { path },
        // Connection-level trouble: the session may live on, the call may or may not have been
        // applied. Transient, like a lost connection.
        zk::Error::ConnectionLoss | zk::Error::SessionMoved | zk::Error::NotReadOnly | zk::Error::Throttled => {
            CoordError::ConnectionLoss
        }
        zk::Error::SessionExpired | zk::Error::ClientClosed => CoordError::SessionExpired,
        zk::Error::Timeout | zk::Error::NoHosts => CoordError::Timeout(format!("ZooKeeper call on {path}: {e}")),
        // The client's own reply deadline ("no response from connection in N ms"): a reply lost
        // or late, not an answer about the data.
        zk::Error::Custom(custom) if custom.to_string().contains("no response from connection") => {
            CoordError::Timeout(format!("ZooKeeper call on {path}: {custom}"))
        }
        zk::Error::BadArguments(reason) => CoordError::BadPath { path, reason },
        // The client's own failures (a call in flight when the connection broke fails with the
        // I/O error, e.g. "Connection reset by peer"): the connection is lost, the session may
        // well live on. Answers about the data always come as the server's error codes above,
        // never as these. (The I/O error sits behind an `Arc` in `CustomError`, so it cannot be
        // told apart by type.)
        zk::Error::Custom(_) => CoordError::ConnectionLoss,
        other => CoordError::Other(other.to_string()),
    }
}

fn map_stat(s: &zk::Stat) -> Stat {
    Stat {
        version: s.version,
        cversion: s.cversion,
        czxid: s.czxid,
        mzxid: s.mzxid,
        ctime_ms: s.ctime,
        mtime_ms: s.mtime,
        ephemeral_owner: s.ephemeral_owner,
        num_children: s.num_children,
    }
}

fn map_mode(mode: CreateMode) -> zk::CreateMode {
    match mode {
        CreateMode::Persistent => zk::CreateMode::Persistent,
        CreateMode::PersistentSequential => zk::CreateMode::PersistentSequential,
        CreateMode::Ephemeral => zk::CreateMode::Ephemeral,
        CreateMode::EphemeralSequential => zk::CreateMode::EphemeralSequential,
    }
}

/// Maps a node event; `None` for session events that need no action (connection changes).
fn map_event(event: zk::WatchedEvent) -> Option<WatchEvent> {
    let kind = match event.event_type {
        zk::EventType::NodeCreated => EventKind::Created,
        zk::EventType::NodeDeleted => EventKind::Deleted,
        zk::EventType::NodeDataChanged => EventKind::DataChanged,
        zk::EventType::NodeChildrenChanged => EventKind::ChildrenChanged,
        zk::EventType::Session => match event.session_state {
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => EventKind::Resync,
            zk::SessionState::Disconnected => return None,
            _ => EventKind::SessionLost,
        },
    };
    let path = if matches!(kind, EventKind::Resync | EventKind::SessionLost) { String::new() } else { event.path };
    Some(WatchEvent { kind, path })
}

fn oneshot(watcher: zk::OneshotWatcher) -> Watch {
    Watch::new(async move {
        let event = watcher.changed().await;
        map_event(event).unwrap_or(WatchEvent { kind: EventKind::SessionLost, path: String::new() })
    })
}

fn check_size(path: &str, data: &[u8]) -> Result<()> {
    if data.len() > MAX_DATA_BYTES {
        return Err(CoordError::TooLarge { path: path.to_string(), bytes: data.len() });
    }
    Ok(())
}

#[async_trait]
impl super::Coordination for ZkCoordination {
    fn status(&self) -> SessionStatus {
        *self.inner.status.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<SessionStatus> {
        self.inner.status.subscribe()
    }

    fn session_id(&self) -> i64 {
        self.client().map(|c| c.session_id().0).unwrap_or(0)
    }

    /// The negotiated timeout of the current session (the configured one once closed).
    fn session_timeout(&self) -> Duration {
        self.client().map_or(Duration::from_millis(self.inner.config.session_timeout_ms), |c| c.session_timeout())
    }

    async fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        check_size(path, data)?;
        let (path_owned, data) = (path.to_string(), data.to_vec());
        let (_, sequence) = self
            .call(path, |c| async move {
                let options = map_mode(mode).with_acls(zk::Acls::anyone_all());
                c.create(&path_owned, &data, &options).await
            })
            .await?;
        Ok(if mode.is_sequential() { format!("{path}{sequence}") } else { path.to_string() })
    }

    async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        let (data, stat) = self.call(path, |c| async move { c.get_data(path).await }).await?;
        Ok((data, map_stat(&stat)))
    }

    async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch)> {
        let (data, stat, watcher) = self.call(path, |c| async move { c.get_and_watch_data(path).await }).await?;
        Ok((data, map_stat(&stat), oneshot(watcher)))
    }

    async fn exists(&self, path: &str) -> Result<Option<Stat>> {
        let stat = self.call(path, |c| async move { c.check_stat(path).await }).await?;
        Ok(stat.as_ref().map(map_stat))
    }

    async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)> {
        let (stat, watcher) = self.call(path, |c| async move { c.check_and_watch_stat(path).await }).await?;
        Ok((stat.as_ref().map(map_stat), oneshot(watcher)))
    }

    async fn set(&self, path: &str, data: &[u8], expected: Option<Version>) -> Result<Stat> {
        check_size(path, data)?;
        let stat = self.call(path, |c| async move { c.set_data(path, data, expected).await }).await?;
        Ok(map_stat(&stat))
    }

    async fn delete(&self, path: &str, expected: Option<Version>) -> Result<()> {
        self.call(path, |c| async move { c.delete(path, expected).await }).await
    }

    async fn children(&self, path: &str) -> Result<Vec<String>> {
        let mut names = self.call(path, |c| async move { c.list_children(path).await }).await?;
        names.sort();
        Ok(names)
    }

    async fn children_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        let (mut names, watcher) = self.call(path, |c| async move { c.list_and_watch_children(path).await }).await?;
        names.sort();
        Ok((names, oneshot(watcher)))
    }

    async fn multi(&self, ops: Vec<Op>) -> Result<Vec<OpResult>> {
        for op in &ops {
            let path = match op {
                Op::Create { path, data, .. } | Op::Set { path, data, .. } => {
                    check_size(path, data)?;
                    path
                }
                Op::Delete { path, .. } | Op::Check { path, .. } => path,
            };
            check_path(path)?;
        }
        let client = self.client()?;
        let timeout = Duration::from_millis(self.inner.config.operation_timeout_ms);
        let commit = async {
            let mut writer = client.new_multi_writer();
            for op in &ops {
                let added = match op {
                    Op::Create { path, data, mode } => {
                        writer.add_create(path, data, &map_mode(*mode).with_acls(zk::Acls::anyone_all()))
                    }
                    Op::Set { path, data, expected } => writer.add_set_data(path, data, *expected),
                    Op::Delete { path, expected } => writer.add_delete(path, *expected),
                    Op::Check { path, version } => writer.add_check_version(path, *version),
                };
                added.map_err(zk::MultiWriteError::from)?;
            }
            writer.commit().await
        };
        let results = match tokio::time::timeout(timeout, commit).await {
            Err(_) => return Err(CoordError::ConnectionLoss),
            Ok(Ok(results)) => results,
            Ok(Err(zk::MultiWriteError::OperationFailed { index, source })) => {
                let path = ops.get(index).map(op_path).unwrap_or("/");
                return Err(CoordError::OpFailed { index, source: Box::new(self.map_err(source, path)) });
            }
            Ok(Err(zk::MultiWriteError::RequestFailed { source })) => return Err(self.map_err(source, "/")),
        };
        results
            .into_iter()
            .map(|r| match r {
                zk::MultiWriteResult::Check => Ok(OpResult::Checked),
                zk::MultiWriteResult::Delete => Ok(OpResult::Deleted),
                zk::MultiWriteResult::Create { path, .. } => Ok(OpResult::Created(path)),
                zk::MultiWriteResult::SetData { stat } => Ok(OpResult::Set(map_stat(&stat))),
                other => Err(CoordError::Other(format!("unexpected multi result {other:?}"))),
            })
            .collect()
    }

    async fn watch_tree(&self, path: &str) -> Result<TreeWatch> {
        let watcher = self.add_tree_watch(path).await?;
        // `PersistentWatcher::changed` panics if polled after a terminal session event, so the
        // stream ends right after it yields `SessionLost`. A reconnect within the session keeps
        // the watch (the client re-registers it; see vendor/zookeeper-client/PATCHED.md) and is
        // reported as `Resync`, because events during the disconnection may be lost
        // (ZOOKEEPER-4698).
        let stream = futures::stream::unfold(Some(watcher), |watcher| async move {
            let mut watcher = watcher?;
            loop {
                if let Some(event) = map_event(watcher.changed().await) {
                    let next = (event.kind != EventKind::SessionLost).then_some(watcher);
                    return Some((event, next));
                }
            }
        });
        Ok(TreeWatch::new(stream.boxed()))
    }

    async fn close(&self) {
        let Some(client) = self.inner.client.lock().expect("client lock").take() else { return };
        let mut states = client.state_watcher();
        let session = client.session_id();
        // Dropping the last client of a session makes `zookeeper-client` send CloseSession, which
        // deletes the session's ephemeral nodes at once.
        drop(client);
        let closed = async {
            loop {
                if matches!(states.changed().await, zk::SessionState::Closed | zk::SessionState::Expired) {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_millis(self.inner.config.operation_timeout_ms), closed).await.is_err() {
            warn!(%session, "ZooKeeper session did not confirm its close in time");
        }
        let generation = self.inner.status.borrow().generation;
        self.inner.status.send_replace(SessionStatus { state: SessionState::Closed, generation });
    }
}

fn op_path(op: &Op) -> &str {
    match op {
        Op::Create { path, .. } | Op::Set { path, .. } | Op::Delete { path, .. } | Op::Check { path, .. } => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_string_splits_into_hosts_and_chroot() {
        let split = |s: &str| ZkConfig::new(s).split();
        assert_eq!(split("127.0.0.1:2181").unwrap(), ("127.0.0.1:2181".into(), "/".into()));
        assert_eq!(split("a:1,b:2/tc/prod").unwrap(), ("a:1,b:2".into(), "/tc/prod".into()));
        assert!(split("/tc").is_err());
        assert!(split("a:1/tc/").is_err());
    }
}
