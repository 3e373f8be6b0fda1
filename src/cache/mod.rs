//! The LMDB mirror: a local, read-optimised copy of the tasks in ZooKeeper.
//!
//! [`TaskMirror`] loads every task from the coordination service into a [`TaskCache`] (an LMDB
//! file, see [`lmdb`]), then follows changes through one recursive watch on `/tasks`. Reads (by
//! id, by state, by creation time) are served from the file through secondary indexes, so a list
//! never scans everything.
//!
//! ZooKeeper is the truth. The mirror reloads everything (and drops what vanished) whenever it may
//! have missed events: at start, after a reconnect (watch events can be lost across one,
//! ZOOKEEPER-4698), after a new session, and when its event queue overflows. Delete or corrupt
//! the file and it is recreated and refilled at the next start.
//!
//! Every LMDB transaction runs on tokio's blocking pool (`spawn_blocking`), never on an async
//! worker or an actor thread. Fetches from ZooKeeper are pipelined, at most
//! [`FETCH_CONCURRENCY`] at once.
//!
//! This module reads the task store; it never writes to ZooKeeper.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::coord::{CoordError, EventKind, SessionState, TreeWatch};
use crate::model::{Task, TaskId, TaskState, VipConfig};
use crate::store::{layout, StoreError, TaskStore};

pub mod lmdb;

pub use lmdb::{CacheChange, TaskCache};

/// Task fetches from ZooKeeper in flight at once during a reload.
pub const FETCH_CONCURRENCY: usize = 32;
/// Most events folded into one batch (one LMDB transaction).
pub const MAX_BATCH_EVENTS: usize = 256;

/// Why the cache failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// LMDB refused an operation (for instance the map is full). Retrying rarely helps.
    #[error("LMDB error in {path}: {reason}")]
    Lmdb {
        /// The cache directory.
        path: PathBuf,
        /// LMDB's message.
        reason: String,
    },
    /// The file holds something undecodable. It is wiped and refilled at the next open.
    #[error("task cache {path} is corrupt: {reason}")]
    Corrupt {
        /// The cache directory.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The cache directory cannot be created or cleaned.
    #[error("task cache {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The mirror was shut down.
    #[error("task mirror is shut down")]
    Closed,
}

/// Where the mirror stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// Whether the cache holds everything ZooKeeper held at the last reload, plus the changes
    /// since. False until the first reload ends, and again while a reload is due.
    pub synced: bool,
    /// Completed reloads.
    pub reloads: u64,
    /// Batches of changes applied; grows with every change the mirror takes in.
    pub batches: u64,
    /// Batches that changed more than progress (a task created, deleted, or its control or
    /// status record changed): what scheduling depends on. Progress-only batches leave it.
    pub state_batches: u64,
}

/// Follows `/tasks` into an LMDB file and answers reads. See the module docs.
pub struct TaskMirror {
    cache: Arc<TaskCache>,
    status: watch::Receiver<MirrorStatus>,
    reload: tokio::sync::mpsc::Sender<()>,
    follower: JoinHandle<()>,
}

impl TaskMirror {
    /// Opens (or recreates) the cache in `dir` and starts following `store`'s tasks. Returns at
    /// once; see [`TaskMirror::wait_synced`].
    pub async fn start(store: TaskStore, dir: &Path) -> Result<TaskMirror, CacheError> {
        let dir = dir.to_path_buf();
        let cache = blocking(move || TaskCache::open(&dir)).await?;
        let cache = Arc::new(cache);
        let (tx, status) = watch::channel(MirrorStatus::default());
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let follower = tokio::spawn(Follower { store, cache: cache.clone(), status: tx, reloads }.run());
        Ok(TaskMirror { cache, status, reload, follower })
    }

    /// Reloads everything from ZooKeeper and waits until the reload is done (a new leader does
    /// this before it acts, so that its view is current).
    pub async fn reload(&self) {
        let mut status = self.status.clone();
        let done = status.borrow_and_update().reloads + 1;
        // A full queue means a reload is already due; it counts.
        let _ = self.reload.try_send(());
        let _ = status.wait_for(|s| s.reloads >= done && s.synced).await;
    }

    /// Removes a task just deleted from ZooKeeper from the cache at once, so that the deleter
    /// reads its own delete (the event follows and changes nothing more).
    pub async fn remove(&self, id: TaskId) -> Result<(), CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.apply(&[CacheChange::Remove(id)])).await
    }

    /// Tasks in `state` that come strictly after `(created_ms, id)` in the state's order (oldest
    /// first), at most `limit`: the next page after a task already seen.
    pub async fn list_by_state_after(
        &self,
        state: TaskState,
        after: (i64, TaskId),
        limit: usize,
    ) -> Result<Vec<Task>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.list_by_state_after(state, after, limit)).await
    }

    /// Writes a task read from (or just written to) ZooKeeper into the cache at once, so that the
    /// writer reads its own write. Merged by version like every other change.
    pub async fn upsert(&self, task: Task) -> Result<(), CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.apply(&[CacheChange::Upsert(task)])).await
    }

    /// Follows the mirror's status.
    pub fn subscribe(&self) -> watch::Receiver<MirrorStatus> {
        self.status.clone()
    }

    /// Waits until the mirror is synced with ZooKeeper.
    pub async fn wait_synced(&self) {
        let mut status = self.status.clone();
        // The sender lives as long as the follower; if it stopped, there is nothing to wait for.
        let _ = status.wait_for(|s| s.synced).await;
    }

    /// A task by id.
    pub async fn get(&self, id: TaskId) -> Result<Option<Task>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.get(&id)).await
    }

    /// Tasks in `state` created at or after `from_ms`, oldest first, at most `limit`.
    pub async fn list_by_state(&self, state: TaskState, from_ms: i64, limit: usize) -> Result<Vec<Task>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.list_by_state(state, from_ms, limit)).await
    }

    /// How many tasks are in `state`.
    pub async fn count_by_state(&self, state: TaskState) -> Result<usize, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.count_by_state(state)).await
    }

    /// Tasks created in `[from_ms, to_ms)`, oldest first, at most `limit`.
    pub async fn list_by_created(&self, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<Task>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.list_by_created(from_ms, to_ms, limit)).await
    }

    /// Stores the VIP configuration last seen (see [`TaskCache::put_vips`]).
    pub async fn put_vips(&self, vips: Vec<VipConfig>) -> Result<(), CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.put_vips(&vips)).await
    }

    /// The VIP configuration last stored.
    pub async fn vips(&self) -> Result<Vec<VipConfig>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.vips()).await
    }

    /// Every cached task id.
    pub async fn ids(&self) -> Result<Vec<TaskId>, CacheError> {
        let cache = self.cache.clone();
        blocking(move || cache.ids()).await
    }

    /// Stops following and closes the LMDB environment; returns when it is closed, so the
    /// directory may be opened again.
    pub async fn shutdown(self) {
        self.follower.abort();
        let _ = self.follower.await;
        let closing = self.cache.env().clone().prepare_for_closing();
        drop(self.cache);
        // Readers still in the blocking pool hold the environment until they finish.
        let _ = tokio::task::spawn_blocking(move || closing.wait()).await;
    }
}

/// Runs blocking cache work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| CacheError::Closed)?
}

struct Follower {
    store: TaskStore,
    cache: Arc<TaskCache>,
    status: watch::Sender<MirrorStatus>,
    reloads: tokio::sync::mpsc::Receiver<()>,
}

/// Why the follow loop stopped following.
enum Restart {
    /// Events may be missing: reload, keep the watch.
    Reload,
    /// The watch is gone (session lost, or an error): watch again, then reload.
    Rewatch,
}

impl Follower {
    async fn run(mut self) {
        let mut delays = crate::retry::COORDINATION.delays();
        loop {
            self.set_synced(false);
            match self.follow().await {
                Ok(()) => delays.reset(),
                Err(StoreError::Coord(CoordError::Closed)) => {
                    debug!("coordination handle closed; the task mirror stops following");
                    return;
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or_default();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "task mirror lost ZooKeeper; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Watches, reloads and follows until the watch is lost.
    async fn follow(&mut self) -> Result<(), StoreError> {
        self.wait_connected().await;
        let mut watch = self.store.coordination().watch_tree(layout::TASKS).await?;
        loop {
            self.reload().await?;
            match self.follow_events(&mut watch).await? {
                Restart::Reload => continue,
                Restart::Rewatch => return Ok(()),
            }
        }
    }

    async fn wait_connected(&self) {
        let mut session = self.store.coordination().subscribe();
        let _ = session.wait_for(|s| s.state == SessionState::Connected).await;
    }

    /// Loads every task from ZooKeeper and drops cached tasks that are gone.
    async fn reload(&self) -> Result<(), StoreError> {
        crate::coord::ensure_path(self.store.coordination().as_ref(), layout::TASKS).await?;
        let ids = self.store.list_ids().await?;
        let fetched: Vec<CacheChange> = futures::stream::iter(ids.iter().copied())
            .map(|id| self.fetch(id))
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        let live: BTreeSet<TaskId> = ids.into_iter().collect();
        let cache = self.cache.clone();
        let count = fetched.len();
        blocking(move || {
            let mut changes = fetched;
            changes.extend(cache.ids()?.into_iter().filter(|id| !live.contains(id)).map(CacheChange::Remove));
            cache.apply(&changes)
        })
        .await
        .map_err(cache_failure)?;
        self.status.send_modify(|s| {
            s.synced = true;
            s.reloads += 1;
            s.batches += 1;
            s.state_batches += 1;
        });
        info!(tasks = count, "task mirror reloaded from ZooKeeper");
        Ok(())
    }

    /// Applies events in batches until events may have been missed or the watch ends.
    async fn follow_events(&mut self, watch: &mut TreeWatch) -> Result<Restart, StoreError> {
        loop {
            let first = tokio::select! {
                event = watch.next() => event,
                Some(()) = self.reloads.recv() => return Ok(Restart::Reload),
            };
            let Some(first) = first else { return Ok(Restart::Rewatch) };
            let mut events = vec![first];
            while events.len() < MAX_BATCH_EVENTS {
                match futures::FutureExt::now_or_never(watch.next()) {
                    Some(Some(event)) => events.push(event),
                    _ => break,
                }
            }
            let mut dirty = BTreeSet::new();
            let mut state_changed = false;
            for event in &events {
                match event.kind {
                    EventKind::SessionLost => return Ok(Restart::Rewatch),
                    EventKind::Resync => {
                        debug!("task mirror may have missed events; reloading");
                        self.set_synced(false);
                        return Ok(Restart::Reload);
                    }
                    _ => {
                        use layout::TaskPath::{Control, Progress, Status};
                        match layout::parse_task_path(&event.path) {
                            Some(Progress(id)) if event.kind == EventKind::DataChanged => {
                                dirty.insert(id);
                            }
                            Some(Control(id) | Status(id) | Progress(id)) => {
                                state_changed = true;
                                dirty.insert(id);
                            }
                            _ => {}
                        }
                    }
                }
            }
            if dirty.is_empty() {
                continue;
            }
            let changes: Vec<CacheChange> = futures::stream::iter(dirty)
                .map(|id| self.fetch(id))
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect()
                .await?;
            let cache = self.cache.clone();
            blocking(move || cache.apply(&changes)).await.map_err(cache_failure)?;
            self.status.send_modify(|s| {
                s.batches += 1;
                s.state_batches += u64::from(state_changed);
            });
        }
    }

    async fn fetch(&self, id: TaskId) -> Result<CacheChange, StoreError> {
        match self.store.get(&id).await {
            Ok(task) => Ok(CacheChange::Upsert(task)),
            Err(StoreError::NotFound { .. }) => Ok(CacheChange::Remove(id)),
            Err(StoreError::Corrupt { path, reason }) => {
                // One bad record must not stop the mirror; the task is left out until repaired.
                warn!(%path, %reason, "task record is corrupt; leaving the task out of the cache");
                Ok(CacheChange::Remove(id))
            }
            Err(e) => Err(e),
        }
    }

    fn set_synced(&self, synced: bool) {
        self.status.send_if_modified(|s| std::mem::replace(&mut s.synced, synced) != synced);
    }
}

/// A cache failure while following: reported like a coordination failure, so the loop backs off
/// and reloads.
fn cache_failure(e: CacheError) -> StoreError {
    StoreError::Coord(CoordError::Other(format!("task cache: {e}")))
}
