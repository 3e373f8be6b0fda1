//! In-process coordination: a ZooKeeper-shaped tree in memory, shared by the handles of one
//! process.
//!
//! An [`EmbeddedServer`] owns the tree; [`EmbeddedServer::connect`] opens a session on it and
//! returns an [`EmbeddedCoordination`] handle. Several handles (the nodes of one process) share
//! one server's tree, so they see each other's writes, ephemeral nodes and watch events, exactly
//! as clients of one ZooKeeper ensemble do.
//!
//! This module owns the tree, the transaction counter (zxid), sessions and watch delivery. It
//! follows ZooKeeper 3.8 wherever the [`Coordination`] trait lets an observer tell the
//! difference: stat fields, sequential names, error precedence, which events fire which
//! watches, one zxid per multi, and a multi that is all or nothing.
//!
//! Sequential names follow ZooKeeper exactly: the number is how many children were ever created
//! under the parent (ZooKeeper's stored `cversion`), formatted `{:010}`. The `cversion` a client
//! sees counts child creates *and* deletes (ZooKeeper reports `2 * creates - num_children`), so
//! after a delete the next number is below the visible `cversion`.
//!
//! # Test and operations hooks
//!
//! [`EmbeddedCoordination::expire`], [`EmbeddedCoordination::suspend`] and
//! [`EmbeddedCoordination::resume`] simulate what a real ensemble does to a client: a session
//! expiry and a lost connection. While a session is suspended its one-shot watches that fire are
//! held back and delivered on resume (as ZooKeeper re-arms watches on reconnect), and its tree
//! watches miss events and get a [`EventKind::Resync`] on resume.
//!
//! # Limits
//!
//! - No persistence: the tree lives as long as the server value (the last clone of the
//!   [`EmbeddedServer`] and of its handles).
//! - No ACLs, no quotas, no TTL or container nodes, no `/zookeeper` system subtree.
//! - Sessions never time out on their own: a session ends when its handle is closed or dropped,
//!   or through [`EmbeddedCoordination::expire`].
//! - One process only: nothing is reachable over the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::Stream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};

use super::journal::{Entry, Journal, NodeRecord, StatRecord};
use super::{
    check_path, parent, CoordError, Coordination, CreateMode, EventKind, Op, OpResult, Result, SessionState,
    SessionStatus, Stat, TreeWatch, Version, Watch, WatchEvent, MAX_DATA_BYTES,
};

/// Events a tree watch buffers for a slow reader. Past it, events are dropped and the reader
/// gets one [`EventKind::Resync`] instead: a writer never waits for a reader.
const TREE_WATCH_CAPACITY: usize = 1024;

/// What [`Coordination::session_timeout`] says for an embedded session. Embedded sessions end
/// only when closed, dropped or [expired](EmbeddedCoordination::expire) by hand; runners still
/// keep their local lease by it, so a [suspended](EmbeddedCoordination::suspend) handle stops
/// writing after half of it, as it would on ZooKeeper.
pub const EMBEDDED_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The in-process coordination service: one tree, shared by every session opened on it.
///
/// Cheap to clone (the tree is behind an `Arc`); clones are the same server. The tree lives
/// until the last clone of the server and of its handles is dropped.
#[derive(Clone, Default)]
pub struct EmbeddedServer {
    shared: Arc<Shared>,
}

impl EmbeddedServer {
    /// A server holding an empty tree (only the root `/`).
    pub fn new() -> EmbeddedServer {
        EmbeddedServer::default()
    }

    /// A server whose tree is **durable** in `dir`: every committed transaction is journaled and
    /// `fdatasync`ed before its answer, and a server opened again on the directory (after a
    /// restart, or a crash of the process or the machine) has every persistent node, and
    /// transaction ids that go on growing; ephemeral nodes are not kept (their sessions ended
    /// with the process). One process at a time may have the directory open. See
    /// `coord/journal.rs` for the files. A single node on it can promise what one ZooKeeper
    /// server without replicas promises: nothing answered is lost while its disk lives; nothing
    /// survives the loss of that disk.
    pub fn open(dir: impl AsRef<std::path::Path>) -> std::io::Result<EmbeddedServer> {
        let (journal, recovered) = Journal::open(dir.as_ref())?;
        let shared = Shared::default();
        {
            let mut tree = shared.lock();
            tree.zxid = recovered.zxid;
            for (path, record) in recovered.nodes {
                let node = Node {
                    data: record.data,
                    stat: record.stat.stat(0),
                    creates: record.creates,
                    children: BTreeSet::new(),
                };
                tree.nodes.insert(path, node);
            }
            let paths: Vec<String> = tree.nodes.keys().filter(|p| p.as_str() != "/").cloned().collect();
            for path in paths {
                if let Some(parent_node) = tree.nodes.get_mut(parent(&path)) {
                    parent_node.children.insert(name(&path).to_string());
                }
            }
            for node in tree.nodes.values_mut() {
                node.stat.num_children = node.children.len() as i32;
            }
            tree.journal = Some(journal);
        }
        Ok(EmbeddedServer { shared: Arc::new(shared) })
    }

    #[cfg(test)]
    fn compact_after(&self, frames: u64) {
        if let Some(journal) = &mut self.shared.lock().journal {
            journal.set_compact_after(frames);
        }
    }

    /// Opens a new session: the handle starts [`Connected`](SessionState::Connected) at
    /// generation 1.
    pub fn connect(&self) -> EmbeddedCoordination {
        let id = self.shared.lock().open_session();
        let generation = 1;
        let (status, _) = watch::channel(SessionStatus { state: SessionState::Connected, generation });
        let handle = Handle {
            server: Arc::clone(&self.shared),
            status,
            slot: Mutex::new(Slot { session: id, generation, closed: false }),
        };
        EmbeddedCoordination { handle: Arc::new(handle) }
    }
}

impl fmt::Debug for EmbeddedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tree = self.shared.lock();
        f.debug_struct("EmbeddedServer")
            .field("nodes", &tree.nodes.len())
            .field("zxid", &tree.zxid)
            .field("sessions", &tree.sessions.len())
            .finish()
    }
}

/// A session on an [`EmbeddedServer`], implementing [`Coordination`].
///
/// Cheap to clone; clones share the session. Dropping the last clone closes the session, so the
/// ephemeral nodes of a dropped node vanish as they would when a process dies (at once here,
/// after the session timeout on ZooKeeper).
#[derive(Clone)]
pub struct EmbeddedCoordination {
    handle: Arc<Handle>,
}

impl EmbeddedCoordination {
    /// Simulates a session expiry: deletes this session's ephemeral nodes (other sessions'
    /// watches see the deletes), resolves its watches with [`EventKind::SessionLost`], publishes
    /// [`Expired`](SessionState::Expired), then opens a new session on the same server and
    /// publishes [`Connected`](SessionState::Connected) with the next generation. Later calls use
    /// the new session. Clears a suspension. Does nothing on a closed handle.
    pub fn expire(&self) {
        let mut slot = lock(&self.handle.slot);
        if slot.closed {
            return;
        }
        self.handle.server.lock().end_session(slot.session);
        self.handle.publish(SessionState::Expired, slot.generation);
        slot.session = self.handle.server.lock().open_session();
        slot.generation += 1;
        self.handle.publish(SessionState::Connected, slot.generation);
    }

    /// Simulates a lost connection: until [`EmbeddedCoordination::resume`], every call fails
    /// with [`CoordError::ConnectionLoss`] and the status is
    /// [`Suspended`](SessionState::Suspended). The session and its ephemeral nodes stay. Its
    /// one-shot watches that fire meanwhile are delivered on resume; its tree watches miss the
    /// events. Does nothing on a closed or already suspended handle.
    pub fn suspend(&self) {
        let slot = lock(&self.handle.slot);
        if slot.closed {
            return;
        }
        let changed = match self.handle.server.lock().sessions.get_mut(&slot.session) {
            Some(session) if !session.suspended => {
                session.suspended = true;
                true
            }
            _ => false,
        };
        if changed {
            self.handle.publish(SessionState::Suspended, slot.generation);
        }
    }

    /// Ends a simulated connection loss: the status goes back to
    /// [`Connected`](SessionState::Connected) at the same generation, the one-shot watches that
    /// fired meanwhile are delivered, and every live tree watch of this session gets a
    /// [`EventKind::Resync`] (events may have been missed, as after a real reconnect). Does
    /// nothing unless the handle is suspended.
    pub fn resume(&self) {
        let slot = lock(&self.handle.slot);
        if slot.closed {
            return;
        }
        if self.handle.server.lock().resume_session(slot.session) {
            self.handle.publish(SessionState::Connected, slot.generation);
        }
    }

    /// Runs `f` on the tree for the current session, or fails if the handle cannot call now.
    fn call<T>(&self, f: impl FnOnce(&mut Tree, i64) -> Result<T>) -> Result<T> {
        let slot = lock(&self.handle.slot);
        if slot.closed {
            return Err(CoordError::Closed);
        }
        let mut tree = self.handle.server.lock();
        match tree.sessions.get(&slot.session) {
            None => return Err(CoordError::SessionExpired),
            Some(session) if session.suspended => return Err(CoordError::ConnectionLoss),
            Some(_) => {}
        }
        f(&mut tree, slot.session)
    }

    /// Runs a write like [`EmbeddedCoordination::call`]. On a durable server the journal's
    /// `fdatasync` runs on tokio's blocking pool, not on the caller's thread (a node's actor
    /// thread must not wait on a disk). If the caller gives up meanwhile, the write still
    /// completes, as a ZooKeeper write whose reply was lost.
    async fn write_call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tree, i64) -> Result<T> + Send + 'static,
    {
        let durable = self.handle.server.lock().journal.is_some();
        if !durable || tokio::runtime::Handle::try_current().is_err() {
            return self.call(f);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.call(f))
            .await
            .unwrap_or_else(|e| Err(CoordError::Other(format!("embedded coordination: a write failed: {e}"))))
    }
}

impl fmt::Debug for EmbeddedCoordination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = lock(&self.handle.slot);
        f.debug_struct("EmbeddedCoordination")
            .field("session", &format_args!("{:#x}", slot.session))
            .field("generation", &slot.generation)
            .field("closed", &slot.closed)
            .finish()
    }
}

#[async_trait]
impl Coordination for EmbeddedCoordination {
    fn status(&self) -> SessionStatus {
        *self.handle.status.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<SessionStatus> {
        self.handle.status.subscribe()
    }

    fn session_timeout(&self) -> Duration {
        EMBEDDED_SESSION_TIMEOUT
    }

    /// The current session's id; 0 once the handle is closed (as `ZkCoordination`).
    fn session_id(&self) -> i64 {
        let slot = lock(&self.handle.slot);
        if slot.closed {
            0
        } else {
            slot.session
        }
    }

    async fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        check_write(path, data)?;
        let (path, data) = (path.to_string(), data.to_vec());
        self.write_call(move |tree, session| tree.write(session, |txn| txn.create(&path, &data, mode))).await
    }

    async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        check_path(path)?;
        self.call(|tree, _| {
            let node = tree.node(path)?;
            Ok((node.data.clone(), node.stat))
        })
    }

    async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch)> {
        check_path(path)?;
        self.call(|tree, session| {
            let (data, stat) = tree.node(path).map(|node| (node.data.clone(), node.stat))?;
            Ok((data, stat, add_oneshot(&mut tree.data_watches, path, session)))
        })
    }

    async fn exists(&self, path: &str) -> Result<Option<Stat>> {
        check_path(path)?;
        self.call(|tree, _| Ok(tree.nodes.get(path).map(|node| node.stat)))
    }

    async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)> {
        check_path(path)?;
        self.call(|tree, session| {
            let stat = tree.nodes.get(path).map(|node| node.stat);
            Ok((stat, add_oneshot(&mut tree.data_watches, path, session)))
        })
    }

    async fn set(&self, path: &str, data: &[u8], expected: Option<Version>) -> Result<Stat> {
        check_write(path, data)?;
        let (path, data) = (path.to_string(), data.to_vec());
        self.write_call(move |tree, session| tree.write(session, |txn| txn.set(&path, &data, expected))).await
    }

    async fn delete(&self, path: &str, expected: Option<Version>) -> Result<()> {
        check_path(path)?;
        let path = path.to_string();
        self.write_call(move |tree, session| tree.write(session, |txn| txn.delete(&path, expected))).await
    }

    async fn children(&self, path: &str) -> Result<Vec<String>> {
        check_path(path)?;
        self.call(|tree, _| Ok(tree.node(path)?.children.iter().cloned().collect()))
    }

    async fn children_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        check_path(path)?;
        self.call(|tree, session| {
            let names = tree.node(path)?.children.iter().cloned().collect();
            Ok((names, add_oneshot(&mut tree.child_watches, path, session)))
        })
    }

    /// Paths and sizes are checked before anything else and refused as plain `BadPath` or
    /// `TooLarge` errors, as `ZkCoordination` does; every other failure is `OpFailed`.
    async fn multi(&self, ops: Vec<Op>) -> Result<Vec<OpResult>> {
        for op in &ops {
            match op {
                Op::Create { path, data, .. } | Op::Set { path, data, .. } => check_write(path, data)?,
                Op::Delete { path, .. } | Op::Check { path, .. } => check_path(path)?,
            }
        }
        if ops.is_empty() {
            return self.call(|_, _| Ok(Vec::new()));
        }
        self.write_call(move |tree, session| {
            tree.write(session, |txn| {
                let apply = |(index, op)| {
                    txn.apply(op).map_err(|source| CoordError::OpFailed { index, source: Box::new(source) })
                };
                ops.iter().enumerate().map(apply).collect()
            })
        })
        .await
    }

    async fn watch_tree(&self, path: &str) -> Result<TreeWatch> {
        check_path(path)?;
        self.call(|tree, session| {
            let (tx, rx) = mpsc::channel(TREE_WATCH_CAPACITY);
            let flags = Arc::new(Mutex::new(TreeFlags::default()));
            tree.tree_watches.retain(|sub| !sub.tx.is_closed());
            tree.tree_watches.push(TreeSub { session, root: path.to_string(), tx, flags: Arc::clone(&flags) });
            Ok(TreeWatch::new(TreeEvents { rx, flags, done: false }))
        })
    }

    async fn close(&self) {
        self.handle.shutdown();
    }
}

/// The state behind all clones of one [`EmbeddedCoordination`]; closes the session when the
/// last clone goes.
struct Handle {
    server: Arc<Shared>,
    status: watch::Sender<SessionStatus>,
    /// Taken before the tree lock, never after it.
    slot: Mutex<Slot>,
}

/// Which session a handle is on.
struct Slot {
    session: i64,
    generation: u64,
    closed: bool,
}

impl Handle {
    fn publish(&self, state: SessionState, generation: u64) {
        self.status.send_replace(SessionStatus { state, generation });
    }

    fn shutdown(&self) {
        let mut slot = lock(&self.slot);
        if slot.closed {
            return;
        }
        slot.closed = true;
        self.server.lock().end_session(slot.session);
        self.publish(SessionState::Closed, slot.generation);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The server's state, behind one lock.
struct Shared {
    tree: Mutex<Tree>,
}

impl Default for Shared {
    fn default() -> Self {
        let root = Node { data: Vec::new(), stat: zero_stat(), creates: 0, children: BTreeSet::new() };
        let tree = Tree {
            nodes: BTreeMap::from([("/".to_string(), root)]),
            zxid: 0,
            next_session: first_session_id(),
            sessions: HashMap::new(),
            data_watches: HashMap::new(),
            child_watches: HashMap::new(),
            tree_watches: Vec::new(),
            journal: None,
        };
        Shared { tree: Mutex::new(tree) }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tree> {
        lock(&self.tree)
    }
}

/// The nodes, sessions and watches of one server.
struct Tree {
    /// Every node by absolute path; `/` always exists.
    nodes: BTreeMap<String, Node>,
    /// Last committed transaction.
    zxid: i64,
    next_session: i64,
    sessions: HashMap<i64, Session>,
    /// One-shot watches set by `get_watch` and `exists_watch`.
    data_watches: HashMap<String, Vec<OneShot>>,
    /// One-shot watches set by `children_watch`.
    child_watches: HashMap<String, Vec<OneShot>>,
    tree_watches: Vec<TreeSub>,
    /// Where committed transactions go before they are answered, for a durable server.
    journal: Option<Journal>,
}

#[derive(Clone, Debug)]
struct Node {
    data: Vec<u8>,
    /// As clients see it: `num_children` equals `children.len()`, `cversion` counts child creates
    /// and deletes.
    stat: Stat,
    /// Children ever created: the next sequence number (ZooKeeper's stored `cversion`).
    creates: i32,
    children: BTreeSet<String>,
}

#[derive(Default)]
struct Session {
    suspended: bool,
    /// One-shot events that fired while suspended, delivered on resume.
    deferred: Vec<(oneshot::Sender<WatchEvent>, WatchEvent)>,
}

struct OneShot {
    session: i64,
    tx: oneshot::Sender<WatchEvent>,
}

/// The writer's side of one tree watch.
struct TreeSub {
    session: i64,
    root: String,
    tx: mpsc::Sender<WatchEvent>,
    flags: Arc<Mutex<TreeFlags>>,
}

/// Shared by a tree watch's writer and reader side. Every send on the channel happens under
/// this lock, so while `resync` is set nothing new enters the channel.
#[derive(Default)]
struct TreeFlags {
    /// Events were dropped: a `Resync` is owed before any further event.
    resync: bool,
    /// The session ended and its `SessionLost` did not fit: owed after the buffered events.
    lost: bool,
}

impl Tree {
    fn node(&self, path: &str) -> Result<&Node> {
        self.nodes.get(path).ok_or_else(|| CoordError::NoNode { path: path.to_string() })
    }

    fn open_session(&mut self) -> i64 {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(id, Session::default());
        id
    }

    /// Ends a session: its watches resolve with `SessionLost`, then its ephemeral nodes are
    /// deleted in one transaction (firing the watches of the other sessions).
    fn end_session(&mut self, id: i64) {
        if let Some(session) = self.sessions.remove(&id) {
            for (tx, _) in session.deferred {
                let _ = tx.send(marker(EventKind::SessionLost));
            }
        }
        for table in [&mut self.data_watches, &mut self.child_watches] {
            for watches in table.values_mut() {
                let (mine, others): (Vec<OneShot>, Vec<OneShot>) =
                    std::mem::take(watches).into_iter().partition(|w| w.session == id);
                *watches = others;
                for w in mine {
                    let _ = w.tx.send(marker(EventKind::SessionLost));
                }
            }
            table.retain(|_, watches| !watches.is_empty());
        }
        let (mine, others): (Vec<TreeSub>, Vec<TreeSub>) =
            std::mem::take(&mut self.tree_watches).into_iter().partition(|sub| sub.session == id);
        self.tree_watches = others;
        for sub in mine {
            sub.end();
        }
        let ephemerals: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.stat.ephemeral_owner == id)
            .map(|(path, _)| path.clone())
            .collect();
        if !ephemerals.is_empty() {
            let result = self.write(id, |txn| ephemerals.iter().try_for_each(|path| txn.delete(path, None)));
            debug_assert!(result.is_ok(), "ephemeral nodes have no children: {result:?}");
        }
    }

    /// Delivers what a suspended session missed. Returns whether it was suspended.
    fn resume_session(&mut self, id: i64) -> bool {
        let Some(session) = self.sessions.get_mut(&id).filter(|session| session.suspended) else {
            return false;
        };
        session.suspended = false;
        for (tx, event) in std::mem::take(&mut session.deferred) {
            let _ = tx.send(event);
        }
        for sub in self.tree_watches.iter().filter(|sub| sub.session == id) {
            sub.owe_resync();
        }
        true
    }

    /// Runs one transaction: on success commits it under the next zxid and fires its watches;
    /// on failure undoes every change and fires nothing.
    fn write<T>(&mut self, session: i64, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let zxid = self.zxid + 1;
        let mut txn =
            Txn { nodes: &mut self.nodes, zxid, now_ms: now_ms(), session, undo: Vec::new(), changes: Vec::new() };
        match f(&mut txn) {
            Ok(value) => {
                if let Some(journal) = &mut self.journal {
                    let entry = Entry { zxid, nodes: txn.records() };
                    if let Err(e) = journal.append(&entry) {
                        txn.rollback();
                        return Err(CoordError::Other(format!("embedded coordination cannot persist a change: {e}")));
                    }
                }
                let changes = txn.changes;
                self.zxid = zxid;
                self.fire(changes);
                self.compact();
                Ok(value)
            }
            Err(e) => {
                txn.rollback();
                Err(e)
            }
        }
    }

    /// Folds the journal into a snapshot when it has grown long. A failure is logged and retried
    /// at the next transaction: the journal still holds everything.
    fn compact(&mut self) {
        let Some(journal) = &mut self.journal else { return };
        if !journal.wants_compaction() {
            return;
        }
        let nodes = self
            .nodes
            .iter()
            .filter(|(_, node)| node.stat.ephemeral_owner == 0)
            .map(|(path, node)| (path.clone(), record(node)))
            .collect();
        if let Err(e) = journal.compact(self.zxid, nodes) {
            tracing::warn!(error = %e, "embedded coordination: cannot write a snapshot; the journal keeps growing");
        }
    }

    /// Fires the watches of committed changes, in order, like ZooKeeper's `DataTree`.
    fn fire(&mut self, changes: Vec<(EventKind, String)>) {
        for (kind, path) in changes {
            let parent_path = parent(&path);
            match kind {
                EventKind::Created => {
                    self.fire_oneshots(Table::Data, &path, EventKind::Created, &path);
                    self.fire_oneshots(Table::Child, parent_path, EventKind::ChildrenChanged, parent_path);
                }
                EventKind::Deleted => {
                    self.fire_oneshots(Table::Data, &path, EventKind::Deleted, &path);
                    self.fire_oneshots(Table::Child, &path, EventKind::Deleted, &path);
                    self.fire_oneshots(Table::Child, parent_path, EventKind::ChildrenChanged, parent_path);
                }
                _ => self.fire_oneshots(Table::Data, &path, kind, &path),
            }
            let event = WatchEvent { kind, path };
            for sub in self.tree_watches.iter().filter(|sub| covers(&sub.root, &event.path)) {
                // A suspended session misses the event; it gets a `Resync` on resume.
                if !self.sessions.get(&sub.session).is_some_and(|session| session.suspended) {
                    sub.push(event.clone());
                }
            }
        }
        self.tree_watches.retain(|sub| !sub.tx.is_closed());
    }

    fn fire_oneshots(&mut self, table: Table, key: &str, kind: EventKind, path: &str) {
        let table = match table {
            Table::Data => &mut self.data_watches,
            Table::Child => &mut self.child_watches,
        };
        for w in table.remove(key).unwrap_or_default() {
            let event = WatchEvent { kind, path: path.to_string() };
            match self.sessions.get_mut(&w.session) {
                Some(session) if session.suspended => session.deferred.push((w.tx, event)),
                _ => {
                    let _ = w.tx.send(event);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Table {
    Data,
    Child,
}

/// Registers a one-shot watch on `path`.
fn add_oneshot(table: &mut HashMap<String, Vec<OneShot>>, path: &str, session: i64) -> Watch {
    let (tx, rx) = oneshot::channel();
    let watches = table.entry(path.to_string()).or_default();
    // Forget watches whose `Watch` was dropped, so repeated watching cannot grow the table.
    watches.retain(|w| !w.tx.is_closed());
    watches.push(OneShot { session, tx });
    Watch::new(async move { rx.await.unwrap_or_else(|_| marker(EventKind::SessionLost)) })
}

/// A transaction in progress: changes are applied to the tree at once and undone on failure.
struct Txn<'a> {
    nodes: &'a mut BTreeMap<String, Node>,
    zxid: i64,
    now_ms: i64,
    /// Owner of the ephemeral nodes it creates.
    session: i64,
    undo: Vec<Undo>,
    /// What happened, in order, for the watches.
    changes: Vec<(EventKind, String)>,
}

/// How to take back one change of a [`Txn`].
enum Undo {
    Created { path: String, parent_stat: Stat },
    Set { path: String, data: Vec<u8>, stat: Stat },
    Deleted { path: String, node: Node, parent_stat: Stat },
}

impl Txn<'_> {
    fn apply(&mut self, op: &Op) -> Result<OpResult> {
        match op {
            Op::Create { path, data, mode } => self.create(path, data, *mode).map(OpResult::Created),
            Op::Set { path, data, expected } => self.set(path, data, *expected).map(OpResult::Set),
            Op::Delete { path, expected } => self.delete(path, *expected).map(|()| OpResult::Deleted),
            Op::Check { path, version } => self.check(path, *version).map(|()| OpResult::Checked),
        }
    }

    /// Checks in ZooKeeper's order: parent exists, name taken, parent ephemeral.
    fn create(&mut self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        if path == "/" {
            return Err(CoordError::BadPath { path: path.to_string(), reason: "the root always exists" });
        }
        let parent_path = parent(path);
        let Some(parent_node) = self.nodes.get(parent_path) else {
            return Err(CoordError::NoNode { path: path.to_string() });
        };
        let path = if mode.is_sequential() { format!("{path}{:010}", parent_node.creates) } else { path.to_string() };
        if self.nodes.contains_key(&path) {
            return Err(CoordError::NodeExists { path });
        }
        if parent_node.stat.ephemeral_owner != 0 {
            return Err(CoordError::NoChildrenForEphemerals { path });
        }
        let parent_node = self.nodes.get_mut(parent_path).expect("parent checked above");
        let parent_stat = parent_node.stat;
        parent_node.children.insert(name(&path).to_string());
        parent_node.creates = parent_node.creates.wrapping_add(1);
        parent_node.stat.cversion = parent_stat.cversion.wrapping_add(1);
        parent_node.stat.num_children += 1;
        let stat = Stat {
            czxid: self.zxid,
            mzxid: self.zxid,
            ctime_ms: self.now_ms,
            mtime_ms: self.now_ms,
            ephemeral_owner: if mode.is_ephemeral() { self.session } else { 0 },
            ..zero_stat()
        };
        self.nodes.insert(path.clone(), Node { data: data.to_vec(), stat, creates: 0, children: BTreeSet::new() });
        self.undo.push(Undo::Created { path: path.clone(), parent_stat });
        self.changes.push((EventKind::Created, path.clone()));
        Ok(path)
    }

    fn set(&mut self, path: &str, data: &[u8], expected: Option<Version>) -> Result<Stat> {
        let Some(node) = self.nodes.get_mut(path) else {
            return Err(CoordError::NoNode { path: path.to_string() });
        };
        if !version_matches(expected, node.stat.version) {
            return Err(CoordError::BadVersion { path: path.to_string() });
        }
        let old_stat = node.stat;
        let old_data = std::mem::replace(&mut node.data, data.to_vec());
        node.stat.version = old_stat.version.wrapping_add(1);
        node.stat.mzxid = self.zxid;
        node.stat.mtime_ms = self.now_ms;
        let stat = node.stat;
        self.undo.push(Undo::Set { path: path.to_string(), data: old_data, stat: old_stat });
        self.changes.push((EventKind::DataChanged, path.to_string()));
        Ok(stat)
    }

    /// Checks in ZooKeeper's order: exists, version, children. Bumps the parent's visible
    /// `cversion`, not its count of creates (the next sequence number).
    fn delete(&mut self, path: &str, expected: Option<Version>) -> Result<()> {
        if path == "/" {
            return Err(CoordError::BadPath { path: path.to_string(), reason: "the root cannot be deleted" });
        }
        let Some(node) = self.nodes.get(path) else {
            return Err(CoordError::NoNode { path: path.to_string() });
        };
        if !version_matches(expected, node.stat.version) {
            return Err(CoordError::BadVersion { path: path.to_string() });
        }
        if !node.children.is_empty() {
            return Err(CoordError::NotEmpty { path: path.to_string() });
        }
        let node = self.nodes.remove(path).expect("node checked above");
        let parent_node = self.nodes.get_mut(parent(path)).expect("a node's parent exists");
        let parent_stat = parent_node.stat;
        let removed = parent_node.children.remove(name(path));
        debug_assert!(removed, "{path} is listed in its parent");
        parent_node.stat.cversion = parent_stat.cversion.wrapping_add(1);
        parent_node.stat.num_children -= 1;
        self.undo.push(Undo::Deleted { path: path.to_string(), node, parent_stat });
        self.changes.push((EventKind::Deleted, path.to_string()));
        Ok(())
    }

    /// The persistent state, after the transaction, of every node it touched (`None`: gone, or
    /// ephemeral), for the journal.
    fn records(&self) -> Vec<(String, Option<NodeRecord>)> {
        let mut paths: Vec<&str> = Vec::new();
        for undo in &self.undo {
            let (path, parent_too) = match undo {
                Undo::Created { path, .. } | Undo::Deleted { path, .. } => (path.as_str(), true),
                Undo::Set { path, .. } => (path.as_str(), false),
            };
            for p in [Some(path), parent_too.then(|| parent(path))].into_iter().flatten() {
                if !paths.contains(&p) {
                    paths.push(p);
                }
            }
        }
        paths
            .into_iter()
            .map(|path| {
                let node = self.nodes.get(path).filter(|node| node.stat.ephemeral_owner == 0);
                (path.to_string(), node.map(record))
            })
            .collect()
    }

    fn check(&self, path: &str, version: Version) -> Result<()> {
        let Some(node) = self.nodes.get(path) else {
            return Err(CoordError::NoNode { path: path.to_string() });
        };
        if !version_matches(Some(version), node.stat.version) {
            return Err(CoordError::BadVersion { path: path.to_string() });
        }
        Ok(())
    }

    /// Takes back every change, last first, leaving the tree as it was before the transaction.
    fn rollback(self) {
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Created { path, parent_stat } => {
                    self.nodes.remove(&path);
                    let parent_node = self.nodes.get_mut(parent(&path)).expect("parent of a created node");
                    parent_node.children.remove(name(&path));
                    parent_node.creates = parent_node.creates.wrapping_sub(1);
                    parent_node.stat = parent_stat;
                }
                Undo::Set { path, data, stat } => {
                    let node = self.nodes.get_mut(&path).expect("a set node exists");
                    node.data = data;
                    node.stat = stat;
                }
                Undo::Deleted { path, node, parent_stat } => {
                    let parent_node = self.nodes.get_mut(parent(&path)).expect("parent of a deleted node");
                    parent_node.children.insert(name(&path).to_string());
                    parent_node.stat = parent_stat;
                    self.nodes.insert(path, node);
                }
            }
        }
    }
}

impl TreeSub {
    /// Delivers an event without waiting: owes a `Resync` instead if the channel is full.
    fn push(&self, event: WatchEvent) {
        let mut flags = lock(&self.flags);
        if flags.resync {
            // Only when the event fits behind it: otherwise a second `Resync` would be owed at once.
            // Nothing else sends while we hold the flags, so the capacity can only grow.
            if self.tx.capacity() < 2 || self.tx.try_send(marker(EventKind::Resync)).is_err() {
                return;
            }
            flags.resync = false;
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
            flags.resync = true;
        }
    }

    /// Owes the reader a `Resync`, sent now if there is room.
    fn owe_resync(&self) {
        let mut flags = lock(&self.flags);
        flags.resync = self.tx.try_send(marker(EventKind::Resync)).is_err();
    }

    /// Ends the watch: `SessionLost` now, or after the buffered events if the channel is full.
    fn end(self) {
        let mut flags = lock(&self.flags);
        flags.resync = false;
        flags.lost = self.tx.try_send(marker(EventKind::SessionLost)).is_err();
    }
}

/// The reader's side of a tree watch.
struct TreeEvents {
    rx: mpsc::Receiver<WatchEvent>,
    flags: Arc<Mutex<TreeFlags>>,
    done: bool,
}

impl TreeEvents {
    /// The owed `Resync`, once every event buffered before the overflow has been read.
    fn owed_resync(&mut self) -> Option<WatchEvent> {
        let mut flags = lock(&self.flags);
        if flags.resync && self.rx.is_empty() {
            flags.resync = false;
            return Some(marker(EventKind::Resync));
        }
        None
    }
}

impl Stream for TreeEvents {
    type Item = WatchEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(event) = this.owed_resync() {
            return Poll::Ready(Some(event));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                this.done = event.kind == EventKind::SessionLost;
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                this.done = true;
                let lost = std::mem::take(&mut lock(&this.flags).lost);
                Poll::Ready(lost.then(|| marker(EventKind::SessionLost)))
            }
            Poll::Pending => this.owed_resync().map_or(Poll::Pending, |event| Poll::Ready(Some(event))),
        }
    }
}

/// Whether a tree watch on `root` sees events of `path`.
fn covers(root: &str, path: &str) -> bool {
    root == "/" || path == root || (path.starts_with(root) && path.as_bytes()[root.len()] == b'/')
}

/// The last component of a path (not the root).
fn name(path: &str) -> &str {
    &path[path.rfind('/').map_or(0, |i| i + 1)..]
}

/// ZooKeeper's rule: version -1 matches any version.
fn version_matches(expected: Option<Version>, actual: Version) -> bool {
    match expected {
        None | Some(-1) => true,
        Some(expected) => expected == actual,
    }
}

fn check_write(path: &str, data: &[u8]) -> Result<()> {
    check_path(path)?;
    if data.len() > MAX_DATA_BYTES {
        return Err(CoordError::TooLarge { path: path.to_string(), bytes: data.len() });
    }
    Ok(())
}

/// An event about the watch itself (`Resync`, `SessionLost`): no path.
fn marker(kind: EventKind) -> WatchEvent {
    WatchEvent { kind, path: String::new() }
}

fn zero_stat() -> Stat {
    Stat { version: 0, cversion: 0, czxid: 0, mzxid: 0, ctime_ms: 0, mtime_ms: 0, ephemeral_owner: 0, num_children: 0 }
}

/// A persistent node as the journal records it.
fn record(node: &Node) -> NodeRecord {
    NodeRecord { data: node.data.clone(), stat: StatRecord::from(&node.stat), creates: node.creates }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// First session id of a server, shaped like ZooKeeper's (server id 1 in the top byte, time
/// below), so ids differ between servers and are never 0.
fn first_session_id() -> i64 {
    let time_bits = ((now_ms() as u64) << 24) >> 8;
    (time_bits | (1 << 56)) as i64
}

/// Locks, ignoring poisoning: every critical section leaves the state consistent or panics on a
/// bug, and cleanup in `Drop` must not panic again.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_durable_server_keeps_persistent_nodes_and_zxids_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (last_zxid, sequence) = {
            let server = EmbeddedServer::open(dir.path()).unwrap();
            server.compact_after(5);
            let c = server.connect();
            c.create("/a", b"one", CreateMode::Persistent).await.unwrap();
            c.create("/a/b", b"two", CreateMode::Persistent).await.unwrap();
            c.set("/a", b"three", Some(0)).await.unwrap();
            let seq = c.create("/a/s-", b"", CreateMode::PersistentSequential).await.unwrap();
            c.create("/a/e", b"", CreateMode::Ephemeral).await.unwrap();
            c.multi(vec![
                Op::Create { path: "/m".into(), data: b"m".to_vec(), mode: CreateMode::Persistent },
                Op::Delete { path: "/a/b".into(), expected: None },
            ])
            .await
            .unwrap();
            // A failed multi changes nothing, durable or not.
            let failed = c.multi(vec![
                Op::Create { path: "/n".into(), data: vec![], mode: CreateMode::Persistent },
                Op::Check { path: "/a".into(), version: 0 },
            ]);
            assert!(failed.await.is_err());
            for i in 0..7 {
                c.set("/m", format!("m{i}").as_bytes(), None).await.unwrap();
            }
            let (_, stat) = c.get("/m").await.unwrap();
            c.close().await;
            (stat.mzxid, seq)
        };
        assert!(dir.path().join("snapshot").exists(), "the journal was folded into a snapshot");
        let server = EmbeddedServer::open(dir.path()).unwrap();
        let c = server.connect();
        assert_eq!(c.get("/a").await.unwrap().0, b"three");
        assert_eq!(c.get("/a").await.unwrap().1.version, 1);
        assert_eq!(c.get("/m").await.unwrap().0, b"m6");
        assert!(c.exists("/a/b").await.unwrap().is_none());
        assert!(c.exists("/n").await.unwrap().is_none());
        assert!(c.exists("/a/e").await.unwrap().is_none(), "ephemeral nodes end with their session");
        assert_eq!(c.children("/a").await.unwrap(), vec![sequence.rsplit('/').next().unwrap().to_string()]);
        assert_eq!(c.exists("/a").await.unwrap().unwrap().num_children, 1);
        // Transaction ids and sequence numbers go on from where they were.
        let next = c.create("/a/s-", b"", CreateMode::PersistentSequential).await.unwrap();
        assert!(next > sequence, "{next} after {sequence}");
        assert!(c.exists(&next).await.unwrap().unwrap().czxid > last_zxid);
        // One process at a time.
        assert!(EmbeddedServer::open(dir.path()).is_err());
    }

    #[tokio::test]
    async fn a_torn_journal_tail_is_dropped_and_what_was_answered_stays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let server = EmbeddedServer::open(dir.path()).unwrap();
            let c = server.connect();
            c.create("/kept", b"yes", CreateMode::Persistent).await.unwrap();
            c.close().await;
        }
        // A crash in the middle of the next append: half a frame at the end.
        let mut journal = std::fs::OpenOptions::new().append(true).open(dir.path().join("journal")).unwrap();
        std::io::Write::write_all(&mut journal, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(journal);
        let server = EmbeddedServer::open(dir.path()).unwrap();
        let c = server.connect();
        assert_eq!(c.get("/kept").await.unwrap().0, b"yes");
        c.create("/after", b"", CreateMode::Persistent).await.unwrap();
        drop(c);
        drop(server);
        let server = EmbeddedServer::open(dir.path()).unwrap();
        assert!(server.connect().exists("/after").await.unwrap().is_some(), "appends go on after the torn tail");
    }

    use std::time::Duration;

    use futures::{FutureExt, StreamExt};

    use super::*;

    /// Guard against a hang; never a means of synchronisation.
    const GUARD: Duration = Duration::from_secs(5);

    async fn next(stream: &mut TreeWatch) -> Option<WatchEvent> {
        tokio::time::timeout(GUARD, stream.next()).await.expect("tree watch event in time")
    }

    async fn fired(w: Watch) -> WatchEvent {
        tokio::time::timeout(GUARD, w).await.expect("watch fired in time")
    }

    /// Whether a one-shot watch has not fired yet (outside tokio's coop budget).
    fn pending(watch: &mut Watch) -> bool {
        tokio::task::unconstrained(watch).now_or_never().is_none()
    }

    /// Whether the stream has nothing to yield now (outside tokio's coop budget, which would make
    /// a busy stream look idle).
    fn idle(stream: &mut TreeWatch) -> bool {
        tokio::task::unconstrained(stream.next()).now_or_never().is_none()
    }

    fn ev(kind: EventKind, path: &str) -> WatchEvent {
        WatchEvent { kind, path: path.to_string() }
    }

    #[tokio::test]
    async fn sequential_names_count_the_parents_creates() {
        let c = EmbeddedServer::new().connect();
        c.create("/q", b"", CreateMode::Persistent).await.unwrap();
        let first = c.create("/q/n-", b"", CreateMode::PersistentSequential).await.unwrap();
        assert_eq!(first, "/q/n-0000000000");
        c.delete(&first, None).await.unwrap();
        // The delete bumps the visible cversion, but the number counts creates only (ZooKeeper).
        assert_eq!(c.exists("/q").await.unwrap().unwrap().cversion, 2);
        let second = c.create("/q/n-", b"", CreateMode::EphemeralSequential).await.unwrap();
        assert_eq!(second, "/q/n-0000000001");
        c.create("/q/plain", b"", CreateMode::Persistent).await.unwrap();
        let third = c.create("/q/n-", b"", CreateMode::PersistentSequential).await.unwrap();
        assert_eq!(third, "/q/n-0000000003");
        assert_eq!(c.children("/q").await.unwrap(), ["n-0000000001", "n-0000000003", "plain"]);
        let stat = c.exists("/q").await.unwrap().unwrap();
        assert_eq!((stat.cversion, stat.num_children), (5, 3));
    }

    #[tokio::test]
    async fn stats_versions_and_errors_follow_zookeeper() {
        let c = EmbeddedServer::new().connect();
        let path = c.create("/a", b"1", CreateMode::Persistent).await.unwrap();
        let (data, created) = c.get(&path).await.unwrap();
        assert_eq!(data, b"1");
        assert_eq!((created.version, created.czxid, created.mzxid, created.ephemeral_owner), (0, 1, 1, 0));
        assert!(created.ctime_ms > 0 && created.ctime_ms == created.mtime_ms);
        let set = c.set("/a", b"2", Some(0)).await.unwrap();
        assert_eq!((set.version, set.czxid, set.mzxid), (1, 1, 2));
        assert_eq!(c.set("/a", b"3", Some(0)).await, Err(CoordError::BadVersion { path: "/a".into() }));
        assert_eq!(c.set("/a", b"3", Some(-1)).await.unwrap().version, 2);
        c.create("/a/b", b"", CreateMode::Persistent).await.unwrap();
        assert_eq!(c.delete("/a", Some(7)).await, Err(CoordError::BadVersion { path: "/a".into() }));
        assert_eq!(c.delete("/a", None).await, Err(CoordError::NotEmpty { path: "/a".into() }));
        let exists = c.create("/a/b", b"", CreateMode::Persistent).await;
        assert_eq!(exists, Err(CoordError::NodeExists { path: "/a/b".into() }));
        let orphan = c.create("/x/y", b"", CreateMode::Persistent).await;
        assert_eq!(orphan, Err(CoordError::NoNode { path: "/x/y".into() }));
        assert!(matches!(c.create("/", b"", CreateMode::Persistent).await, Err(CoordError::BadPath { .. })));
        assert!(matches!(c.delete("/", None).await, Err(CoordError::BadPath { .. })));
        assert!(matches!(c.get("a").await, Err(CoordError::BadPath { .. })));
        let big = vec![0; MAX_DATA_BYTES + 1];
        assert!(matches!(c.set("/a", &big, None).await, Err(CoordError::TooLarge { .. })));
        c.create("/e", b"", CreateMode::Ephemeral).await.unwrap();
        let child = c.create("/e/c", b"", CreateMode::Persistent).await;
        assert_eq!(child, Err(CoordError::NoChildrenForEphemerals { path: "/e/c".into() }));
        assert_eq!(c.exists("/e").await.unwrap().unwrap().ephemeral_owner, c.session_id());
    }

    #[tokio::test]
    async fn multi_is_all_or_nothing() {
        let server = EmbeddedServer::new();
        let c = server.connect();
        c.create("/a", b"old", CreateMode::Persistent).await.unwrap();
        let root_before = c.exists("/").await.unwrap().unwrap();
        let (_, mut watch) = c.exists_watch("/b").await.unwrap();
        let ops = vec![
            Op::Create { path: "/b".into(), data: vec![], mode: CreateMode::Persistent },
            Op::Set { path: "/a".into(), data: b"new".to_vec(), expected: Some(0) },
            Op::Delete { path: "/a".into(), expected: None },
            Op::Create { path: "/s-".into(), data: vec![], mode: CreateMode::PersistentSequential },
            Op::Create { path: "/b".into(), data: vec![], mode: CreateMode::Persistent },
        ];
        match c.multi(ops).await {
            Err(CoordError::OpFailed { index: 4, source }) => {
                assert_eq!(*source, CoordError::NodeExists { path: "/b".into() })
            }
            other => panic!("expected op 4 to fail, got {other:?}"),
        }
        assert_eq!(c.exists("/b").await.unwrap(), None);
        assert_eq!(c.get("/a").await.unwrap().0, b"old");
        assert_eq!(c.exists("/").await.unwrap().unwrap(), root_before);
        assert!(pending(&mut watch), "a failed multi fires nothing");
        let numbered = c.create("/s-", b"", CreateMode::PersistentSequential).await.unwrap();
        assert_eq!(numbered, "/s-0000000001", "the count of creates was rolled back too");

        let ops = vec![
            Op::Check { path: "/a".into(), version: 0 },
            Op::Create { path: "/b".into(), data: vec![], mode: CreateMode::Persistent },
            Op::Create { path: "/b/s-".into(), data: vec![], mode: CreateMode::PersistentSequential },
            Op::Create { path: "/b/s-".into(), data: vec![], mode: CreateMode::PersistentSequential },
            Op::Set { path: "/a".into(), data: b"new".to_vec(), expected: Some(0) },
        ];
        let results = c.multi(ops).await.unwrap();
        assert_eq!(
            results[..4],
            [
                OpResult::Checked,
                OpResult::Created("/b".into()),
                OpResult::Created("/b/s-0000000000".into()),
                OpResult::Created("/b/s-0000000001".into()),
            ]
        );
        let OpResult::Set(stat) = results[4] else { panic!("{results:?}") };
        assert_eq!(stat.version, 1);
        // One transaction, one zxid.
        assert_eq!(c.exists("/b").await.unwrap().unwrap().czxid, stat.mzxid);
        assert_eq!(fired(watch).await, ev(EventKind::Created, "/b"));
    }

    #[tokio::test]
    async fn one_shot_watches_fire_once() {
        let server = EmbeddedServer::new();
        let c = server.connect();
        assert_eq!(c.get_watch("/w").await.unwrap_err(), CoordError::NoNode { path: "/w".into() });
        assert!(c.children_watch("/w").await.is_err());
        let (none, created) = c.exists_watch("/w").await.unwrap();
        assert_eq!(none, None);
        c.create("/w", b"", CreateMode::Persistent).await.unwrap();
        assert_eq!(fired(created).await, ev(EventKind::Created, "/w"));

        let (_, _, data) = c.get_watch("/w").await.unwrap();
        let (_, children) = c.children_watch("/w").await.unwrap();
        c.set("/w", b"1", None).await.unwrap();
        c.set("/w", b"2", None).await.unwrap();
        c.create("/w/k", b"", CreateMode::Persistent).await.unwrap();
        c.create("/w/l", b"", CreateMode::Persistent).await.unwrap();
        assert_eq!(fired(data).await, ev(EventKind::DataChanged, "/w"));
        assert_eq!(fired(children).await, ev(EventKind::ChildrenChanged, "/w"));
        {
            let tree = server.shared.lock();
            assert!(tree.data_watches.is_empty() && tree.child_watches.is_empty(), "fired watches are gone");
        }

        let (_, _, data) = c.get_watch("/w/k").await.unwrap();
        let (_, own) = c.children_watch("/w/k").await.unwrap();
        let (_, parent) = c.children_watch("/w").await.unwrap();
        c.delete("/w/k", None).await.unwrap();
        assert_eq!(fired(data).await, ev(EventKind::Deleted, "/w/k"));
        assert_eq!(fired(own).await, ev(EventKind::Deleted, "/w/k"));
        assert_eq!(fired(parent).await, ev(EventKind::ChildrenChanged, "/w"));

        let (_, _, lost) = c.get_watch("/w").await.unwrap();
        c.close().await;
        assert_eq!(fired(lost).await, marker(EventKind::SessionLost));
    }

    #[tokio::test]
    async fn tree_watch_sees_the_subtree_in_commit_order() {
        let server = EmbeddedServer::new();
        let (c, other) = (server.connect(), server.connect());
        let mut tree = c.watch_tree("/t").await.unwrap();
        other.create("/t", b"", CreateMode::Persistent).await.unwrap();
        other.create("/tx", b"", CreateMode::Persistent).await.unwrap();
        other.create("/t/a", b"", CreateMode::Persistent).await.unwrap();
        other.set("/t/a", b"1", None).await.unwrap();
        other.delete("/t/a", None).await.unwrap();
        let expected = [
            ev(EventKind::Created, "/t"),
            ev(EventKind::Created, "/t/a"),
            ev(EventKind::DataChanged, "/t/a"),
            ev(EventKind::Deleted, "/t/a"),
        ];
        for want in expected {
            assert_eq!(next(&mut tree).await.unwrap(), want);
        }
        assert!(idle(&mut tree));
        c.close().await;
        assert_eq!(next(&mut tree).await.unwrap(), marker(EventKind::SessionLost));
        assert_eq!(next(&mut tree).await, None);
    }

    #[tokio::test]
    async fn tree_watch_overflow_gives_one_resync_then_continues() {
        let c = EmbeddedServer::new().connect();
        let mut tree = c.watch_tree("/t").await.unwrap();
        c.create("/t", b"", CreateMode::Persistent).await.unwrap();
        let writes = TREE_WATCH_CAPACITY + 10;
        for i in 0..writes {
            // Never blocks although nobody reads.
            c.set("/t", i.to_string().as_bytes(), None).await.unwrap();
        }
        assert_eq!(next(&mut tree).await.unwrap(), ev(EventKind::Created, "/t"));
        for _ in 1..TREE_WATCH_CAPACITY {
            assert_eq!(next(&mut tree).await.unwrap(), ev(EventKind::DataChanged, "/t"));
        }
        assert_eq!(next(&mut tree).await.unwrap(), marker(EventKind::Resync));
        assert!(idle(&mut tree), "a single Resync");
        c.create("/t/after", b"", CreateMode::Persistent).await.unwrap();
        assert_eq!(next(&mut tree).await.unwrap(), ev(EventKind::Created, "/t/after"));

        // Overflow again; this time a write after some reading delivers the Resync.
        for _ in 0..writes {
            c.set("/t", b"x", None).await.unwrap();
        }
        next(&mut tree).await.unwrap();
        c.delete("/t/after", None).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..TREE_WATCH_CAPACITY {
            seen.push(next(&mut tree).await.unwrap().kind);
        }
        assert!(idle(&mut tree), "a single Resync");
        assert_eq!(seen.iter().filter(|kind| **kind == EventKind::Resync).count(), 1, "{seen:?}");
        assert_eq!(seen.last(), Some(&EventKind::Resync));
    }

    #[tokio::test]
    async fn ephemeral_nodes_end_with_close_expire_and_drop() {
        let server = EmbeddedServer::new();
        let observer = server.connect();
        let a = server.connect();
        a.create("/a", b"", CreateMode::Ephemeral).await.unwrap();
        let (_, gone) = observer.exists_watch("/a").await.unwrap();
        a.close().await;
        assert_eq!(fired(gone).await, ev(EventKind::Deleted, "/a"));
        assert_eq!(observer.exists("/a").await.unwrap(), None);
        assert_eq!(a.status(), SessionStatus { state: SessionState::Closed, generation: 1 });
        assert_eq!(a.get("/").await, Err(CoordError::Closed));
        assert_eq!(a.session_id(), 0);

        let b = server.connect();
        b.create("/b", b"", CreateMode::EphemeralSequential).await.unwrap();
        let (_, children) = observer.children_watch("/").await.unwrap();
        b.expire();
        assert_eq!(fired(children).await, ev(EventKind::ChildrenChanged, "/"));
        assert!(observer.children("/").await.unwrap().is_empty());

        let c = server.connect();
        c.create("/c", b"", CreateMode::Ephemeral).await.unwrap();
        let clone = c.clone();
        drop(c);
        assert!(observer.exists("/c").await.unwrap().is_some(), "a clone keeps the session");
        let mut tree = observer.watch_tree("/").await.unwrap();
        drop(clone);
        assert_eq!(next(&mut tree).await.unwrap(), ev(EventKind::Deleted, "/c"));
        assert_eq!(observer.exists("/c").await.unwrap(), None);
    }

    #[tokio::test]
    async fn expire_bumps_the_generation_and_the_session() {
        let server = EmbeddedServer::new();
        let c = server.connect();
        let first = c.session_id();
        assert_ne!(first, 0);
        let mut status = c.subscribe();
        assert_eq!(*status.borrow_and_update(), SessionStatus { state: SessionState::Connected, generation: 1 });
        c.create("/e", b"", CreateMode::Ephemeral).await.unwrap();
        let (_, _, watch) = c.get_watch("/e").await.unwrap();
        let mut tree = c.watch_tree("/").await.unwrap();
        c.expire();
        assert_eq!(fired(watch).await, marker(EventKind::SessionLost), "not Deleted: the session is gone");
        assert_eq!(next(&mut tree).await.unwrap(), marker(EventKind::SessionLost));
        assert_eq!(next(&mut tree).await, None);
        tokio::time::timeout(GUARD, status.changed()).await.unwrap().unwrap();
        assert_eq!(*status.borrow_and_update(), SessionStatus { state: SessionState::Connected, generation: 2 });
        let second = c.session_id();
        assert!(second != first && second != 0);
        assert_eq!(c.exists("/e").await.unwrap(), None);
        c.create("/e", b"", CreateMode::Ephemeral).await.unwrap();
        assert_eq!(c.exists("/e").await.unwrap().unwrap().ephemeral_owner, second);
        assert_ne!(server.connect().session_id(), second);
    }

    #[tokio::test]
    async fn suspend_fails_calls_keeps_the_session_and_resume_resyncs() {
        let server = EmbeddedServer::new();
        let (c, other) = (server.connect(), server.connect());
        c.create("/e", b"", CreateMode::Ephemeral).await.unwrap();
        let mut tree = c.watch_tree("/").await.unwrap();
        let (_, _, mut data) = c.get_watch("/e").await.unwrap();
        let session = c.session_id();

        c.suspend();
        assert_eq!(c.status(), SessionStatus { state: SessionState::Suspended, generation: 1 });
        assert_eq!(c.get("/e").await, Err(CoordError::ConnectionLoss));
        assert_eq!(c.create("/x", b"", CreateMode::Persistent).await, Err(CoordError::ConnectionLoss));
        other.set("/e", b"changed", None).await.unwrap();
        assert!(other.exists("/e").await.unwrap().is_some(), "the session and its ephemeral node stay");
        assert!(pending(&mut data), "no event reaches a suspended session");
        assert!(idle(&mut tree));

        c.resume();
        assert_eq!(c.status(), SessionStatus { state: SessionState::Connected, generation: 1 });
        assert_eq!(c.session_id(), session);
        assert_eq!(fired(data).await, ev(EventKind::DataChanged, "/e"));
        assert_eq!(next(&mut tree).await.unwrap(), marker(EventKind::Resync));
        other.set("/e", b"again", None).await.unwrap();
        assert_eq!(next(&mut tree).await.unwrap(), ev(EventKind::DataChanged, "/e"));
        assert_eq!(c.get("/e").await.unwrap().0, b"again");
    }
}
