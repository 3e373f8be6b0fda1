//! Coordination: a small ZooKeeper-shaped interface, over real ZooKeeper or in process.
//!
//! Everything above this module (the task store, the cache, election, runners, VIPs) talks to
//! coordination only through [`Coordination`]. Two implementations pass one conformance suite
//! (`tests/coordination.rs`):
//!
//! - [`ZkCoordination`]: a real ZooKeeper ensemble through `zookeeper-client`, under a chroot.
//! - [`EmbeddedServer`] / [`EmbeddedCoordination`]: an in-process tree with the same semantics
//!   (versions, sequential names, ephemeral nodes, one-shot and tree watches), for single-process
//!   hosts, the quickstart and fast tests.
//! - [`FaultyCoordination`]: wraps either and, by a seeded plan, loses replies after the call took
//!   effect and delays calls: how the recipes are tested against lost replies.
//!
//! # Sessions
//!
//! A [`Coordination`] handle owns one session at a time. Its [`SessionStatus`] says whether the
//! session is [`Connected`](SessionState::Connected), [`Suspended`](SessionState::Suspended)
//! (connection lost, the session may still live: ephemeral nodes may or may not exist, writes may
//! or may not have landed), [`Expired`](SessionState::Expired) or [`Closed`](SessionState::Closed).
//! After an expiry the handle builds a new session by itself and bumps
//! [`SessionStatus::generation`]: an owner that sees the generation change knows that every
//! ephemeral node and every watch of the old session is gone, and re-creates what it needs.
//!
//! # Paths
//!
//! Absolute, `/`-separated, no trailing slash, no empty, `.` or `..` component. The root `/` is
//! the chroot of the handle.
//!
//! This module may not know about tasks, runners or any other part of the crate.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use tokio::sync::watch;

mod embedded;
mod error;
mod faulty;
mod journal;
mod zk;

pub use embedded::{EmbeddedCoordination, EmbeddedServer, EMBEDDED_SESSION_TIMEOUT};
pub use error::CoordError;
pub use faulty::{CallKind, Expirer, Faults, FaultyCoordination, LoseNext};
pub use zk::{ZkConfig, ZkCoordination};

/// Result of a coordination call.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// A znode's data version, as used for compare-and-set (`expected` arguments).
pub type Version = i32;

/// Most bytes one node may hold. ZooKeeper refuses more (its `jute.maxbuffer` is about 1 MiB);
/// the embedded implementation refuses the same, so code that works embedded works on ZooKeeper.
pub const MAX_DATA_BYTES: usize = 1_000_000;

/// Kind of node to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CreateMode {
    /// Lives until deleted.
    Persistent,
    /// Persistent, with a 10-digit sequence number appended to the name.
    PersistentSequential,
    /// Deleted when the creating session ends (closed or expired). Cannot have children.
    Ephemeral,
    /// Ephemeral, with a 10-digit sequence number appended to the name.
    EphemeralSequential,
}

impl CreateMode {
    /// Whether the name gets a sequence number.
    pub fn is_sequential(self) -> bool {
        matches!(self, CreateMode::PersistentSequential | CreateMode::EphemeralSequential)
    }

    /// Whether the node ends with its session.
    pub fn is_ephemeral(self) -> bool {
        matches!(self, CreateMode::Ephemeral | CreateMode::EphemeralSequential)
    }
}

/// Metadata of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Data version: bumped by every set.
    pub version: Version,
    /// Children version: bumped by every child create and delete.
    pub cversion: Version,
    /// Transaction id that created the node (tells a re-created node from the old one).
    pub czxid: i64,
    /// Transaction id of the last data change.
    pub mzxid: i64,
    /// Creation time, Unix milliseconds.
    pub ctime_ms: i64,
    /// Last data change, Unix milliseconds.
    pub mtime_ms: i64,
    /// Session that owns the node if ephemeral, 0 otherwise.
    pub ephemeral_owner: i64,
    /// Number of children.
    pub num_children: i32,
}

/// One operation of an atomic [`Coordination::multi`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create a node.
    Create {
        /// Path (for sequential modes, the prefix).
        path: String,
        /// Data.
        data: Vec<u8>,
        /// Kind.
        mode: CreateMode,
    },
    /// Replace a node's data.
    Set {
        /// Path.
        path: String,
        /// New data.
        data: Vec<u8>,
        /// Fail with `BadVersion` unless the node is at this version.
        expected: Option<Version>,
    },
    /// Delete a node (it must have no children).
    Delete {
        /// Path.
        path: String,
        /// Fail with `BadVersion` unless the node is at this version.
        expected: Option<Version>,
    },
    /// Fail unless the node exists at this version. Writes nothing.
    Check {
        /// Path.
        path: String,
        /// Required version.
        version: Version,
    },
}

/// Result of one operation of a successful [`Coordination::multi`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// The node was created at this path (with its sequence number, if sequential).
    Created(String),
    /// The data was replaced; the node's new stat.
    Set(Stat),
    /// The node was deleted.
    Deleted,
    /// The check held.
    Checked,
}

/// Health of a handle's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Connected; ephemeral nodes and watches of this session are in place.
    Connected,
    /// Connection lost; the session may still be alive. Nothing can be confirmed.
    Suspended,
    /// The session ended: its ephemeral nodes are gone. A new session follows by itself.
    Expired,
    /// The handle was closed. Terminal.
    Closed,
}

/// A session's state and the generation of the session it is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionStatus {
    /// The state.
    pub state: SessionState,
    /// Counts sessions of this handle from 1; a change means the ephemeral nodes of the previous
    /// session are gone.
    pub generation: u64,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The node was created.
    Created,
    /// The node was deleted.
    Deleted,
    /// The node's data changed.
    DataChanged,
    /// A child was created or deleted (one-shot child watches only).
    ChildrenChanged,
    /// Events may have been missed (a reconnect, or a slow reader): re-read what you follow.
    Resync,
    /// The session that held the watch ended: no more events will come. Re-read and watch again.
    SessionLost,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// What happened.
    pub kind: EventKind,
    /// The node it happened to (empty for `Resync` and `SessionLost`).
    pub path: String,
}

/// A one-shot watch: resolves once, at the first change of what it watches, or with
/// [`EventKind::SessionLost`] when its session ends.
pub struct Watch(BoxFuture<'static, WatchEvent>);

impl Watch {
    /// Wraps a future that resolves to the event.
    pub fn new(future: impl std::future::Future<Output = WatchEvent> + Send + 'static) -> Self {
        Watch(Box::pin(future))
    }
}

impl std::future::Future for Watch {
    type Output = WatchEvent;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WatchEvent> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Watch")
    }
}

/// A persistent, recursive watch: every create, delete and data change of a node and its
/// descendants, in order. It ends after a [`EventKind::SessionLost`] event. A
/// [`EventKind::Resync`] event means some events may be missing: re-read the subtree.
pub struct TreeWatch(BoxStream<'static, WatchEvent>);

impl TreeWatch {
    /// Wraps a stream of events.
    pub fn new(stream: impl Stream<Item = WatchEvent> + Send + 'static) -> Self {
        TreeWatch(Box::pin(stream))
    }
}

impl Stream for TreeWatch {
    type Item = WatchEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.0.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for TreeWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TreeWatch")
    }
}

/// A handle on a coordination service, holding one session at a time. See the module docs.
///
/// All calls are cancel-safe in the sense that dropping the future never corrupts the handle;
/// a dropped write may or may not have been applied, exactly as after
/// [`CoordError::ConnectionLoss`].
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// The current session's state and generation.
    fn status(&self) -> SessionStatus;

    /// Follows [`Coordination::status`]. The receiver always holds the latest value, so a slow
    /// owner may skip intermediate states but never misses a generation change.
    fn subscribe(&self) -> watch::Receiver<SessionStatus>;

    /// The current session's id (changes with the generation).
    fn session_id(&self) -> i64;

    /// The session timeout the service granted: after this long without hearing from the
    /// session, the service may expire it. Runners derive their local lease from it (see
    /// [`crate::lease`]).
    fn session_timeout(&self) -> Duration;

    /// Creates a node; returns its path (with the sequence number for sequential modes).
    /// `NodeExists`, `NoNode` (parent missing), `NoChildrenForEphemerals`.
    async fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String>;

    /// A node's data and stat. `NoNode`.
    async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)>;

    /// Like [`Coordination::get`], and a watch that fires at the node's next data change or
    /// deletion. `NoNode` (no watch is left behind).
    async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch)>;

    /// The node's stat, or `None` if it does not exist.
    async fn exists(&self, path: &str) -> Result<Option<Stat>>;

    /// Like [`Coordination::exists`], and a watch that fires at the node's next creation, data
    /// change or deletion.
    async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)>;

    /// Replaces a node's data, if it is at `expected` (any version if `None`). Returns the new
    /// stat. `NoNode`, `BadVersion`.
    async fn set(&self, path: &str, data: &[u8], expected: Option<Version>) -> Result<Stat>;

    /// Deletes a childless node, if it is at `expected`. `NoNode`, `BadVersion`, `NotEmpty`.
    async fn delete(&self, path: &str, expected: Option<Version>) -> Result<()>;

    /// The names (not paths) of a node's children, sorted. `NoNode`.
    async fn children(&self, path: &str) -> Result<Vec<String>>;

    /// Like [`Coordination::children`], and a watch that fires at the next child create or
    /// delete (`ChildrenChanged`) or the node's deletion. `NoNode`.
    async fn children_watch(&self, path: &str) -> Result<(Vec<String>, Watch)>;

    /// Applies all operations atomically, or none. On failure the error is
    /// [`CoordError::OpFailed`] with the index of the first failing operation.
    async fn multi(&self, ops: Vec<Op>) -> Result<Vec<OpResult>>;

    /// A persistent recursive watch on `path` and its descendants (the node need not exist).
    async fn watch_tree(&self, path: &str) -> Result<TreeWatch>;

    /// Ends the session (its ephemeral nodes go at once) and the handle. Later calls fail with
    /// [`CoordError::Closed`].
    async fn close(&self);
}

/// Creates `path` and its missing ancestors as empty persistent nodes (like `mkdir -p`).
pub async fn ensure_path(coord: &dyn Coordination, path: &str) -> Result<()> {
    check_path(path)?;
    if path == "/" {
        return Ok(());
    }
    if coord.exists(path).await?.is_some() {
        return Ok(());
    }
    let mut prefix = String::new();
    for part in path.split('/').skip(1) {
        prefix.push('/');
        prefix.push_str(part);
        match coord.create(&prefix, b"", CreateMode::Persistent).await {
            Ok(_) | Err(CoordError::NodeExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Joins a parent path and a child name.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The parent of a path (`/` for a top-level node).
pub fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Refuses paths that are not absolute, have empty, `.` or `..` components, or end in `/`.
pub fn check_path(path: &str) -> Result<()> {
    let bad = |reason| Err(CoordError::BadPath { path: path.to_string(), reason });
    if !path.starts_with('/') {
        return bad("must start with /");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return bad("must not end with /");
    }
    for part in path.split('/').skip(1) {
        if part.is_empty() || part == "." || part == ".." {
            return bad("has an empty, . or .. component");
        }
        if part.chars().any(|c| c.is_control()) {
            return bad("has a control character");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        for bad in ["", "a", "/a/", "//a", "/a/../b", "/a/./b", "/a\u{1}"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        check_path("/a/b-1.x").unwrap();
    }
}
