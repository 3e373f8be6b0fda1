//! `TaskCenter::builder()`: every setting of a node, with its default, validated before start.

use std::path::PathBuf;
use std::sync::Arc;

use crate::actors::VipSettings;
use crate::clock::{Clock, SystemClock};
use crate::coord::{EmbeddedServer, ZkConfig};
use crate::copy::{CopyBackend, CopyEngine, FileBackend};
use crate::exec::TaskExecutor;
use crate::model::{time_zone, NodeId, RunWindow};
use crate::schedule::Schedule;
use crate::transport::{InProcessNetwork, Transport};

use super::TaskCenter;

/// Why a configuration was refused. Names the field and what was wrong; nothing was started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing.
    #[error("{field} is required")]
    Missing {
        /// The builder method that sets it.
        field: &'static str,
    },
    /// A setting has a value it cannot have.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The builder method that sets it.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// Which coordination service the node uses.
#[derive(Clone)]
pub enum CoordinationConfig {
    /// A real ZooKeeper ensemble.
    ZooKeeper(ZkConfig),
    /// An in-process service; nodes of one process share it by sharing the server value.
    Embedded(EmbeddedServer),
    /// An in-process service of this node alone, durable in this directory (see
    /// [`EmbeddedServer::open`]): the default, under the data directory.
    Durable(PathBuf),
    /// A handle the host made itself: its own [`Coordination`](crate::coord::Coordination) implementation, or one of the
    /// crate's wrapped (for instance in a [`FaultyCoordination`](crate::coord::FaultyCoordination)
    /// to test under lost replies). The node closes it at shutdown.
    Custom(Arc<dyn crate::coord::Coordination>),
}

/// Builds a [`TaskCenter`]. Every setter documents its default; [`TaskCenterBuilder::build`]
/// validates them all and names the first bad one.
#[must_use]
pub struct TaskCenterBuilder {
    pub(super) node_id: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) coordination: Option<CoordinationConfig>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) transport: Option<Arc<dyn Transport>>,
    pub(super) executor: Option<Arc<dyn TaskExecutor>>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) time_zone: String,
    pub(super) default_run_window: Option<RunWindow>,
    pub(super) vips: VipSettings,
    pub(super) tasks_per_runner: u32,
    pub(super) mailbox_capacity: usize,
    pub(super) sweep_interval_ms: u64,
    pub(super) request_timeout_ms: u64,
    pub(super) call_timeout_ms: u64,
    pub(super) shutdown_timeout_ms: u64,
    pub(super) data_threads: usize,
    pub(super) step_timeout_ms: u64,
    pub(super) stop_timeout_ms: u64,
    pub(super) leader_suspend_grace_ms: u64,
    pub(super) pass_page: usize,
    pub(super) retention_age_ms: u64,
    pub(super) retention_count: usize,
    pub(super) temporary_failure_limit: u32,
}

/// Default number of tasks one runner runs at once.
pub const DEFAULT_TASKS_PER_RUNNER: u32 = 4;
/// Default capacity of each actor's mailbox; senders wait when it is full.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 256;
/// Default period of the dispatcher's scheduling sweep, which catches what events missed.
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 2_000;
/// Default deadline for a request, including forwarding it across a leader change. Longer than a
/// ZooKeeper session timeout, so that a request outlives a leader's death.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default timeout of one call between nodes.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5_000;
/// Default time a graceful shutdown waits for tasks to checkpoint before it drops them.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// Default number of threads of the data-plane runtime, on which copies run (apart from the
/// thread of the ZooKeeper session and the actors).
pub const DEFAULT_DATA_THREADS: usize = 2;
/// Default deadline of one executor call (start, step, finish): past it the call is abandoned
/// as a temporary failure (a hung backend). Steps end at every checkpoint (10 s by default).
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 900_000;
/// Default time an executor call may take to stop after a pause, cancel, shutdown or window end
/// before it is abandoned; a stop takes effect within it plus one progress commit.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 2_000;
/// Default [`TaskCenterBuilder::retention_age_ms`]: 30 days.
pub const DEFAULT_RETENTION_AGE_MS: u64 = 30 * 86_400_000;
/// Default [`TaskCenterBuilder::retention_count`].
pub const DEFAULT_RETENTION_COUNT: usize = 10_000;
/// Default [`TaskCenterBuilder::leader_suspend_grace_ms`].
pub const DEFAULT_LEADER_SUSPEND_GRACE_MS: u64 = 1_000;

impl Default for TaskCenterBuilder {
    fn default() -> Self {
        TaskCenterBuilder {
            node_id: None,
            listen: None,
            coordination: None,
            data_dir: None,
            transport: None,
            executor: None,
            clock: Arc::new(SystemClock),
            time_zone: "UTC".into(),
            default_run_window: None,
            vips: VipSettings::default(),
            tasks_per_runner: DEFAULT_TASKS_PER_RUNNER,
            mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
            sweep_interval_ms: DEFAULT_SWEEP_INTERVAL_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            call_timeout_ms: DEFAULT_CALL_TIMEOUT_MS,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            data_threads: DEFAULT_DATA_THREADS,
            step_timeout_ms: DEFAULT_STEP_TIMEOUT_MS,
            stop_timeout_ms: DEFAULT_STOP_TIMEOUT_MS,
            leader_suspend_grace_ms: DEFAULT_LEADER_SUSPEND_GRACE_MS,
            pass_page: crate::actors::dispatcher::MAX_PASS_TASKS,
            retention_age_ms: DEFAULT_RETENTION_AGE_MS,
            retention_count: DEFAULT_RETENTION_COUNT,
            temporary_failure_limit: crate::actors::controller::MAX_TEMPORARY_FAILURES,
        }
    }
}

impl TaskCenterBuilder {
    /// This node's id (`[A-Za-z0-9._-]`, unique in the cluster). Required.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = Some(node_id.into());
        self
    }

    /// Where the transport listens: `host:port` for TCP (port 0 picks one), any unique name for
    /// the in-process network. Default: the node id, which suits the in-process network; set it
    /// for TCP.
    pub fn listen(mut self, address: impl Into<String>) -> Self {
        self.listen = Some(address.into());
        self
    }

    /// Coordinate through a real ZooKeeper ensemble (connect string with chroot, session
    /// timeout). Default: an embedded in-process service of this node alone.
    pub fn zookeeper(mut self, config: ZkConfig) -> Self {
        self.coordination = Some(CoordinationConfig::ZooKeeper(config));
        self
    }

    /// Coordinate through an embedded in-process service shared with the other nodes of this
    /// process (in memory from [`EmbeddedServer::new`], or durable from [`EmbeddedServer::open`]).
    /// Default: an embedded service of this node alone, durable under the data directory
    /// (`<data-dir>/coordination`), so a single node keeps its tasks across restarts when its
    /// data directory is stable.
    pub fn embedded(mut self, server: EmbeddedServer) -> Self {
        self.coordination = Some(CoordinationConfig::Embedded(server));
        self
    }

    /// Coordinate through a handle the host made (see [`CoordinationConfig::Custom`]).
    pub fn coordination(mut self, coordination: Arc<dyn crate::coord::Coordination>) -> Self {
        self.coordination = Some(CoordinationConfig::Custom(coordination));
        self
    }

    /// Directory for the node's files (the LMDB task cache under `cache/`, and the default
    /// embedded coordination's journal under `coordination/`). Default: a directory under the
    /// system's temporary directory named after the node and the process, so a restarted
    /// process starts empty: set it for anything that must outlive the process.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// How nodes call each other. Default: a new [`InProcessNetwork`] of this node alone; share
    /// one network value between the nodes of one process, or use
    /// [`TcpTransport`](crate::transport::TcpTransport) between processes.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The block service the copy engine reads and writes volumes through. Default: a
    /// [`FileBackend`] of sparse image files under `volumes/` in the data directory.
    pub fn copy_backend(mut self, backend: Arc<dyn CopyBackend>) -> Self {
        self.executor = Some(Arc::new(CopyEngine::new(backend)));
        self
    }

    /// What does the tasks' work, replacing the copy engine altogether (for instance a
    /// [`SimulatedExecutor`](crate::exec::SimulatedExecutor) in tests of scheduling). Default:
    /// the copy engine over the copy backend.
    pub fn executor(mut self, executor: Arc<dyn TaskExecutor>) -> Self {
        self.executor = Some(executor);
        self
    }

    /// The clock for timestamps and run windows (tests pass a
    /// [`ManualClock`](crate::clock::ManualClock) and move it). Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The IANA time zone in which run windows are read (`Asia/Shanghai`). The same on every
    /// node of a cluster: the first node to start stores it in ZooKeeper, and a node started
    /// with another one is refused ([`StartError::ScheduleMismatch`](super::StartError)).
    /// Default: `UTC`.
    pub fn time_zone(mut self, name: impl Into<String>) -> Self {
        self.time_zone = name.into();
        self
    }

    /// The run window of tasks that have none of their own. The same on every node of a cluster,
    /// checked at start like [`time_zone`](Self::time_zone). Default: none (such tasks run at
    /// any time).
    pub fn default_run_window(mut self, window: Option<RunWindow>) -> Self {
        self.default_run_window = window;
        self
    }

    /// How this node keeps the cluster's virtual IPs when it leads: re-check period (default
    /// 3 s), announcement rounds after a leader change (default 6) and their interval (default
    /// 10 s), an optional refresh after them (default none). `enabled: false` turns VIPs off on
    /// this node. Adding addresses needs `CAP_NET_ADMIN` and announcing them `CAP_NET_RAW`;
    /// without them the node says once that VIPs are disabled, and runs tasks all the same.
    pub fn vips(mut self, settings: VipSettings) -> Self {
        self.vips = settings;
        self
    }

    /// Tasks this node's runner runs at once, 1 to 1024. Default 4.
    pub fn tasks_per_runner(mut self, tasks: u32) -> Self {
        self.tasks_per_runner = tasks;
        self
    }

    /// Capacity of each actor's mailbox, 16 to 65 536. Default 256.
    pub fn mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity;
        self
    }

    /// Period of the dispatcher's scheduling sweep, at least 50 ms. Default 2 000 ms.
    pub fn sweep_interval_ms(mut self, interval_ms: u64) -> Self {
        self.sweep_interval_ms = interval_ms;
        self
    }

    /// Deadline of a request, forwarding and leader changes included, at least 100 ms.
    /// Default 30 000 ms.
    pub fn request_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.request_timeout_ms = timeout_ms;
        self
    }

    /// Timeout of one call between nodes, at least 10 ms and at most the request timeout.
    /// Default 5 000 ms.
    pub fn call_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.call_timeout_ms = timeout_ms;
        self
    }

    /// How long a graceful shutdown waits for tasks to checkpoint. Default 30 000 ms.
    pub fn shutdown_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.shutdown_timeout_ms = timeout_ms;
        self
    }

    /// Threads of the data-plane runtime on which copies run, 1 to 64. Default 2.
    pub fn data_threads(mut self, threads: usize) -> Self {
        self.data_threads = threads;
        self
    }

    /// Deadline of one executor call (start, step or finish), 1 000 ms to 24 h; a call past it
    /// is abandoned and counts as a temporary failure. Default 900 000 ms.
    pub fn step_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.step_timeout_ms = timeout_ms;
        self
    }

    /// How long an executor call may take to stop after a pause, cancel, shutdown or the end of
    /// its run window before it is abandoned, 10 ms to 600 000 ms. Default 2 000 ms.
    pub fn stop_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.stop_timeout_ms = timeout_ms;
        self
    }

    /// How long a leader whose ZooKeeper connection is lost (the session suspended, not
    /// expired) keeps leading, and so keeps the VIPs, before it lets go, 0 to 600 000 ms.
    /// Default 1 000 ms. It is always cut short by the node's local lease (half the session
    /// timeout after the last answered heartbeat), so no other node can lead before this one
    /// let go, whatever the value: a larger value only rides out longer ZooKeeper stalls
    /// without moving the VIPs, up to that bound. 0 lets go at once.
    pub fn leader_suspend_grace_ms(mut self, grace_ms: u64) -> Self {
        self.leader_suspend_grace_ms = grace_ms;
        self
    }

    /// How long a finished (succeeded, failed, canceled) task is kept after it finished before
    /// the leader deletes it, 1 000 ms to 10 years. Default 30 days.
    pub fn retention_age_ms(mut self, age_ms: u64) -> Self {
        self.retention_age_ms = age_ms;
        self
    }

    /// How many finished tasks are kept at most; beyond it the leader deletes the oldest, 1 to
    /// 10 000 000. Default 10 000.
    pub fn retention_count(mut self, count: usize) -> Self {
        self.retention_count = count;
        self
    }

    /// Pending tasks a scheduling pass reads per page, 1 to 100 000 (default
    /// [`MAX_PASS_TASKS`](crate::actors::dispatcher::MAX_PASS_TASKS)). Passes rotate through
    /// every pending task a page at a time; tests use a small page to exercise that.
    #[doc(hidden)]
    pub fn pass_page_size(mut self, page: usize) -> Self {
        self.pass_page = page;
        self
    }

    /// Temporary failures of a task's run in a row (a backend unreachable, a panic, a call past
    /// its deadline) after which the task fails with the last one's reason, 1 to 1 000; each is
    /// retried with backoff (100 ms doubling to 10 s) from the last checkpoint. Default 10.
    pub fn temporary_failure_limit(mut self, limit: u32) -> Self {
        self.temporary_failure_limit = limit;
        self
    }

    /// Validates every setting and returns the node, ready to [`start`](TaskCenter::start).
    pub fn build(self) -> Result<TaskCenter, ConfigError> {
        let node_id = self.node_id.clone().ok_or(ConfigError::Missing { field: "node_id" })?;
        let node = NodeId::new(node_id.clone()).map_err(|e| invalid("node_id", &node_id, e.to_string()))?;
        let range = |field: &'static str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(invalid(field, &value.to_string(), format!("must be {min} to {max}")))
            }
        };
        range("tasks_per_runner", u64::from(self.tasks_per_runner), 1, 1024)?;
        range("mailbox_capacity", self.mailbox_capacity as u64, 16, 65_536)?;
        range("sweep_interval_ms", self.sweep_interval_ms, 50, 3_600_000)?;
        range("request_timeout_ms", self.request_timeout_ms, 100, 3_600_000)?;
        range("call_timeout_ms", self.call_timeout_ms, 10, self.request_timeout_ms)?;
        range("shutdown_timeout_ms", self.shutdown_timeout_ms, 0, 3_600_000)?;
        range("data_threads", self.data_threads as u64, 1, 64)?;
        range("step_timeout_ms", self.step_timeout_ms, 1_000, 86_400_000)?;
        range("stop_timeout_ms", self.stop_timeout_ms, 10, 600_000)?;
        range("leader_suspend_grace_ms", self.leader_suspend_grace_ms, 0, 600_000)?;
        range("pass_page_size", self.pass_page as u64, 1, 100_000)?;
        range("retention_age_ms", self.retention_age_ms, 1_000, 10 * 365 * 86_400_000)?;
        range("retention_count", self.retention_count as u64, 1, 10_000_000)?;
        range("temporary_failure_limit", u64::from(self.temporary_failure_limit), 1, 1_000)?;
        range("vips check_interval", self.vips.check_interval.as_millis() as u64, 10, 3_600_000)?;
        range("vips arp_burst", u64::from(self.vips.arp_burst), 1, 100)?;
        range("vips arp_rounds", u64::from(self.vips.arp_rounds), 1, 1_000)?;
        range("vips conflict_interval", self.vips.conflict_interval.as_millis() as u64, 100, 3_600_000)?;
        range("vips probe_window", self.vips.probe_window.as_millis() as u64, 10, 10_000)?;
        range("vips arp_interval", self.vips.arp_interval.as_millis() as u64, 10, 3_600_000)?;
        if let Some(refresh) = self.vips.arp_refresh {
            range("vips arp_refresh", refresh.as_millis() as u64, 100, 86_400_000)?;
        }
        if let Some(CoordinationConfig::ZooKeeper(zk)) = &self.coordination {
            if zk.connect.trim().is_empty() || zk.connect.starts_with('/') {
                return Err(invalid("zookeeper", &zk.connect, "the connect string names no host".into()));
            }
            range("zookeeper session_timeout_ms", zk.session_timeout_ms, 1_000, 600_000)?;
            range("zookeeper operation_timeout_ms", zk.operation_timeout_ms, 100, 600_000)?;
        }
        let zone = time_zone(&self.time_zone).map_err(|e| invalid("time_zone", &self.time_zone, e.to_string()))?;
        let schedule = Schedule::new(zone, &self.time_zone, self.default_run_window, self.clock.clone());
        let listen = self.listen.clone().unwrap_or_else(|| node.to_string());
        if listen.trim().is_empty() {
            return Err(invalid("listen", &listen, "is empty".into()));
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("task-center").join(format!("{node}-{}", std::process::id())));
        Ok(TaskCenter {
            node,
            listen,
            coordination: self
                .coordination
                .unwrap_or_else(|| CoordinationConfig::Durable(data_dir.join("coordination"))),
            data_dir: data_dir.clone(),
            transport: self.transport.unwrap_or_else(|| Arc::new(InProcessNetwork::new())),
            executor: self
                .executor
                .unwrap_or_else(|| Arc::new(CopyEngine::new(Arc::new(FileBackend::new(data_dir.join("volumes")))))),
            clock: self.clock,
            schedule,
            vips: self.vips,
            tasks_per_runner: self.tasks_per_runner,
            mailbox_capacity: self.mailbox_capacity,
            sweep_interval_ms: self.sweep_interval_ms,
            request_timeout_ms: self.request_timeout_ms,
            call_timeout_ms: self.call_timeout_ms,
            shutdown_timeout_ms: self.shutdown_timeout_ms,
            data_threads: self.data_threads,
            step_timeout_ms: self.step_timeout_ms,
            stop_timeout_ms: self.stop_timeout_ms,
            leader_suspend_grace_ms: self.leader_suspend_grace_ms,
            pass_page: self.pass_page,
            retention_age_ms: self.retention_age_ms,
            retention_count: self.retention_count,
            temporary_failure_limit: self.temporary_failure_limit,
        })
    }
}

fn invalid(field: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, value: value.to_string(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::center::TaskCenter;

    fn field_of(result: Result<TaskCenter, ConfigError>) -> &'static str {
        match result {
            Err(ConfigError::Invalid { field, .. } | ConfigError::Missing { field }) => field,
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn build_names_the_first_bad_setting() {
        assert_eq!(field_of(TaskCenter::builder().build()), "node_id");
        let node = || TaskCenter::builder().node_id("n1");
        assert_eq!(field_of(TaskCenter::builder().node_id("a/b").build()), "node_id");
        assert_eq!(field_of(node().tasks_per_runner(0).build()), "tasks_per_runner");
        assert_eq!(field_of(node().mailbox_capacity(1).build()), "mailbox_capacity");
        assert_eq!(field_of(node().data_threads(0).build()), "data_threads");
        assert_eq!(field_of(node().step_timeout_ms(10).build()), "step_timeout_ms");
        assert_eq!(field_of(node().stop_timeout_ms(0).build()), "stop_timeout_ms");
        assert_eq!(field_of(node().sweep_interval_ms(1).build()), "sweep_interval_ms");
        assert_eq!(field_of(node().request_timeout_ms(1_000).call_timeout_ms(5_000).build()), "call_timeout_ms");
        assert_eq!(field_of(node().time_zone("Nowhere/Land").build()), "time_zone");
        assert_eq!(field_of(node().zookeeper(ZkConfig::new("/chroot-only")).build()), "zookeeper");
        assert_eq!(field_of(node().listen(" ").build()), "listen");
        let vips = VipSettings { arp_interval: std::time::Duration::ZERO, ..VipSettings::default() };
        assert_eq!(field_of(node().vips(vips).build()), "vips arp_interval");
        let error = node().tasks_per_runner(5000).build().err().unwrap();
        assert_eq!(error.to_string(), "invalid tasks_per_runner \"5000\": must be 1 to 1024");
        assert!(node().build().is_ok(), "the defaults are valid");
    }
}
