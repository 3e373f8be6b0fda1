//! # task-center
//!
//! The task center of a distributed storage daemon: a cluster of task servers, one per node,
//! coordinated through ZooKeeper, that runs long storage jobs (resumable, incremental volume
//! copies inside daily run windows) and keeps the cluster's virtual IPs on the elected leader.
//!
//! # Lifecycle
//!
//! A host builds a node with [`TaskCenter::builder()`], starts it, talks to it through the
//! [`TaskCenterHandle`] from any tokio runtime, and shuts it down:
//!
//! ```
//! use std::sync::Arc;
//! use task_center::copy::{FileBackend, VolumeRef};
//! use task_center::model::{CopyOptions, CopyVolumeSpec, TaskSpec, VolumeId};
//! use task_center::TaskCenter;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! // A single node on the embedded defaults: in-process coordination (journaled under the data
//! // directory, so the node restarts with its tasks) and transport, and the file backend.
//! // A cluster sets `.zookeeper(ZkConfig::new("zk1:2181,zk2:2181/task-center"))`,
//! // a `TcpTransport` and its own `CopyBackend` over the daemon's block service.
//! let backend = FileBackend::new(dir.path().join("volumes"));
//! let node = TaskCenter::builder()
//!     .node_id("node-1")
//!     .data_dir(dir.path().join("node-1"))
//!     .copy_backend(Arc::new(backend.clone()))
//!     .time_zone("Asia/Shanghai")
//!     .build()?
//!     .start()
//!     .await?;
//!
//! let (source, target) = (VolumeId::new("vol-a")?, VolumeId::new("vol-a-copy")?);
//! for volume in [&source, &target] {
//!     backend.create_volume(&VolumeRef { hosts: vec!["198.51.100.1:10201".into()], volume: volume.clone() }, 1 << 20).await?;
//! }
//! let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
//!     source_volume: source,
//!     target_volume: target,
//!     source_hosts: vec!["198.51.100.1:10201".into()],
//!     target_hosts: vec!["198.51.100.1:10201".into()],
//!     base_snapshot: None,
//!     options: CopyOptions { extent_size_bytes: 1 << 20, ..CopyOptions::default() },
//! });
//! // Stored in the coordination service before the answer comes back.
//! let task = node.create(spec, Some("22:00-04:00".parse()?)).await?;
//! // Every change is answered with the task as stored after it.
//! let task = node.set_run_window(task.id, None).await?;
//! assert_eq!(task.run_window(), None);
//!
//! // Running tasks checkpoint and go back to pending; returns when the node's thread is gone.
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`center`]: the builder, the node's own actix thread, the handle, graceful shutdown.
//! - [`actors`]: the dispatcher (on the leader), the runner and one task controller per task,
//!   leader election, the VIP server and the ARP syncer.
//! - [`api`]: the typed requests and replies, and [`ApiError`](api::ApiError).
//! - [`transport`]: node-to-node calls: in process, or TCP with a cluster secret.
//! - [`copy`]: the copy-backend trait, the file and memory backends, the copy engine.
//! - [`exec`]: the executor traits the controller drives (the copy engine is one).
//! - [`lease`]: the runner's local lease on its session, by which it fences itself.
//! - [`schedule`]: run-window policy; [`clock`]: injectable time.
//! - [`store`]: the znode layout and the fenced, role-separated task records.
//! - [`cache`]: the LMDB mirror that serves reads.
//! - [`coord`]: the ZooKeeper-shaped coordination trait, over ZooKeeper or embedded.
//! - [`net`]: routes, addresses and announcements for the VIPs.
//! - [`retry`]: the one retry policy (exponential backoff with jitter and a cap).
//! - [`model`]: ids, specs, the lifecycle's transition table, progress, run windows, VIPs.
//!
//! `ARCHITECTURE.md` in the repository shows how the parts fit and who writes what.
#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

pub mod actors;
pub mod api;
pub mod cache;
pub mod center;
pub mod clock;
pub mod coord;
pub mod copy;
pub mod exec;
pub mod lease;
pub mod model;
pub mod net;
pub mod retry;
pub mod schedule;
pub mod store;
pub mod transport;

pub use center::{TaskCenter, TaskCenterBuilder, TaskCenterHandle};
