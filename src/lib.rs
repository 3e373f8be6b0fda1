//! # task-center
//!
//! The task center of a distributed storage daemon: a cluster of task servers, one per node,
//! coordinated through ZooKeeper, that runs long storage jobs (resumable, incremental volume
//! copies inside daily run windows) and keeps the cluster's virtual IPs on the elected leader.
//!
//! This release holds the foundation that the cluster is built on: the domain model, the
//! coordination layer (real ZooKeeper, or embedded in process), the task store with its fenced,
//! role-separated records, and the LMDB mirror that serves reads.
//!
//! ```
//! use std::sync::Arc;
//! use task_center::clock::SystemClock;
//! use task_center::coord::{Coordination, CreateMode, EmbeddedServer};
//! use task_center::model::{CopyOptions, CopyVolumeSpec, TaskId, TaskSpec, TaskState, VolumeId};
//! use task_center::store::{Fence, TaskStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Coordination: embedded here; `ZkCoordination::connect(ZkConfig::new("zk1:2181/tc"))` for a
//! // real ensemble. Both implement the same trait.
//! let coord: Arc<dyn Coordination> = Arc::new(EmbeddedServer::new().connect());
//! let store = TaskStore::new(coord.clone(), Arc::new(SystemClock));
//! store.init().await?;
//!
//! // Writes are fenced on an ephemeral node that proves the writer's role.
//! let fence = Fence::new(coord.create("/election/candidate-demo", b"", CreateMode::Ephemeral).await?);
//! let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
//!     source_volume: VolumeId::new("vol-a")?,
//!     target_volume: VolumeId::new("vol-a-copy")?,
//!     source_hosts: vec!["198.51.100.1:10201".into()],
//!     target_hosts: vec!["203.0.113.1:10201".into()],
//!     base_snapshot: None,
//!     options: CopyOptions::default(),
//! });
//! let task = store.create(TaskId::generate(), spec, Some("22:00-04:00".parse()?), &fence).await?;
//! assert_eq!(task.state(), TaskState::Pending);
//!
//! // The answer to a change is the task as stored after it.
//! let task = store.update_control(&task.id, &fence, |c| { c.run_window = Some("01:00-05:00".parse()?); Ok(()) }).await?;
//! assert_eq!(task.run_window().unwrap().to_string(), "01:00-05:00");
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`model`]: ids, task specs, the lifecycle's transition table, progress, run windows, runners,
//!   VIPs. Pure data and validation.
//! - [`coord`]: the ZooKeeper-shaped [`Coordination`](coord::Coordination) trait and its two
//!   implementations, [`ZkCoordination`](coord::ZkCoordination) and
//!   [`EmbeddedServer`](coord::EmbeddedServer).
//! - [`store`]: the znode layout and the [`TaskStore`](store::TaskStore): control, status and
//!   progress records, each with its writer role, fenced and compare-and-set.
//! - [`cache`]: the [`TaskMirror`](cache::TaskMirror), an LMDB copy of the tasks that follows
//!   ZooKeeper and serves reads through secondary indexes.
//! - [`clock`]: injectable time.
//! - `actors`: the dispatcher, runner, task controller, VIP server and ARP syncer (coming).
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
pub mod model;
pub mod net;
pub mod schedule;
pub mod store;
pub mod transport;

pub use center::{TaskCenter, TaskCenterBuilder, TaskCenterHandle};
