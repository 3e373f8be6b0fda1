//! A task-server node daemon: one per machine, coordinated through ZooKeeper, reachable over TCP.
//!
//! ```text
//! cargo run --example task_server -- --node-id n1 --zookeeper 127.0.0.1:2181/task-center \
//!     --listen 127.0.0.1:7401 --data-dir /var/lib/task-center/n1 --secret-file /etc/task-center/secret
//! ```
//!
//! Every flag can also come from a TOML file (`--config node.toml`, keys as the long flags with
//! `_` for `-`); flags win over the file. It prints `listening on ADDR` once it serves, stops
//! gracefully on SIGTERM or Ctrl-C (running tasks checkpoint and go back to pending), and exits
//! non-zero with one line naming the problem if it cannot start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use task_center::actors::VipSettings;
use task_center::coord::ZkConfig;
use task_center::copy::FileBackend;
use task_center::exec::SimulatedExecutor;
use task_center::transport::{TcpConfig, TcpTransport};
use task_center::TaskCenter;

#[derive(Parser, Debug, Default, Deserialize)]
#[command(about = "A task-center node: runs tasks, takes part in the election, serves requests over TCP")]
#[serde(default, deny_unknown_fields)]
struct Args {
    /// TOML file with any of these settings.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// This node's id, unique in the cluster.
    #[arg(long)]
    node_id: Option<String>,
    /// ZooKeeper connect string with chroot, e.g. `zk1:2181,zk2:2181/task-center/prod`.
    #[arg(long)]
    zookeeper: Option<String>,
    /// ZooKeeper session timeout.
    #[arg(long)]
    session_timeout_ms: Option<u64>,
    /// TCP address to listen on (`host:port`; port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Directory for the node's files (the LMDB cache).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The cluster secret (at least 16 bytes). Prefer --secret-file or TASK_CENTER_SECRET.
    #[arg(long, env = "TASK_CENTER_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the cluster secret.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Tasks this node runs at once.
    #[arg(long)]
    tasks_per_runner: Option<u32>,
    /// Period of the leader's scheduling sweep.
    #[arg(long)]
    sweep_interval_ms: Option<u64>,
    /// Do not manage virtual IPs on this node.
    #[arg(long)]
    no_vips: bool,
    /// Period of the leader's VIP re-check.
    #[arg(long)]
    vip_check_interval_ms: Option<u64>,
    /// Announcement frames per burst (default 5).
    #[arg(long)]
    arp_burst: Option<u32>,
    /// Announcement bursts after a leader change or a newly placed VIP (default 2).
    #[arg(long)]
    arp_rounds: Option<u32>,
    /// Pause between announcement bursts (default 5000).
    #[arg(long)]
    arp_interval_ms: Option<u64>,
    /// Keep announcing at this period after the bursts (default 60000; 0 turns it off).
    #[arg(long)]
    arp_refresh_ms: Option<u64>,
    /// Announcement period of a VIP another host answers for (default 1000).
    #[arg(long)]
    vip_conflict_interval_ms: Option<u64>,
    /// How long a probe for another host answering for a VIP listens (default 200).
    #[arg(long)]
    vip_probe_window_ms: Option<u64>,
    /// IANA time zone of run windows (default UTC); every node of a cluster must use the same.
    #[arg(long)]
    time_zone: Option<String>,
    /// Root of the file backend's volumes (sparse image files, a directory per host). Default:
    /// `volumes/` in the data directory.
    #[arg(long)]
    volumes_root: Option<PathBuf>,
    /// Run tasks with a simulated executor of this many steps instead of copying volumes (for
    /// tests of scheduling).
    #[arg(long)]
    sim_steps: Option<u64>,
    /// Simulated work: duration of one step.
    #[arg(long)]
    sim_step_ms: Option<u64>,
    /// Threads of the data-plane runtime that copies run on (default 2).
    #[arg(long)]
    data_threads: Option<usize>,
    /// Deadline of one executor call (start, step, finish); past it the call is abandoned as a
    /// temporary failure (default 900000).
    #[arg(long)]
    step_timeout_ms: Option<u64>,
    /// How long a copy may take to stop after pause, cancel, shutdown or its window's end before
    /// its step is abandoned (default 2000).
    #[arg(long)]
    stop_timeout_ms: Option<u64>,
    /// Temporary failures in a row after which a task fails (default 10).
    #[arg(long)]
    temporary_failure_limit: Option<u32>,
    /// How long a finished task is kept before the leader deletes it (default 30 days).
    #[arg(long)]
    retention_age_ms: Option<u64>,
    /// How many finished tasks are kept at most; the oldest go first (default 10000).
    #[arg(long)]
    retention_count: Option<usize>,
    /// How long a leader cut off from ZooKeeper keeps leading (and its VIPs), at most until its
    /// local lease lapses (default 1000; 0 lets go at once).
    #[arg(long)]
    leader_suspend_grace_ms: Option<u64>,
}

impl Args {
    /// Flags over file values.
    fn merged(self) -> Result<Args, String> {
        let Some(path) = &self.config else { return Ok(self) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: Args = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Args {
            config: self.config,
            node_id: self.node_id.or(file.node_id),
            zookeeper: self.zookeeper.or(file.zookeeper),
            session_timeout_ms: self.session_timeout_ms.or(file.session_timeout_ms),
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            secret: self.secret.or(file.secret),
            secret_file: self.secret_file.or(file.secret_file),
            tasks_per_runner: self.tasks_per_runner.or(file.tasks_per_runner),
            sweep_interval_ms: self.sweep_interval_ms.or(file.sweep_interval_ms),
            no_vips: self.no_vips || file.no_vips,
            vip_check_interval_ms: self.vip_check_interval_ms.or(file.vip_check_interval_ms),
            data_threads: self.data_threads.or(file.data_threads),
            step_timeout_ms: self.step_timeout_ms.or(file.step_timeout_ms),
            stop_timeout_ms: self.stop_timeout_ms.or(file.stop_timeout_ms),
            temporary_failure_limit: self.temporary_failure_limit.or(file.temporary_failure_limit),
            leader_suspend_grace_ms: self.leader_suspend_grace_ms.or(file.leader_suspend_grace_ms),
            retention_age_ms: self.retention_age_ms.or(file.retention_age_ms),
            retention_count: self.retention_count.or(file.retention_count),
            arp_burst: self.arp_burst.or(file.arp_burst),
            arp_rounds: self.arp_rounds.or(file.arp_rounds),
            vip_conflict_interval_ms: self.vip_conflict_interval_ms.or(file.vip_conflict_interval_ms),
            vip_probe_window_ms: self.vip_probe_window_ms.or(file.vip_probe_window_ms),
            arp_interval_ms: self.arp_interval_ms.or(file.arp_interval_ms),
            arp_refresh_ms: self.arp_refresh_ms.or(file.arp_refresh_ms),
            time_zone: self.time_zone.or(file.time_zone),
            volumes_root: self.volumes_root.or(file.volumes_root),
            sim_steps: self.sim_steps.or(file.sim_steps),
            sim_step_ms: self.sim_step_ms.or(file.sim_step_ms),
        })
    }

    fn secret(&self) -> Result<Vec<u8>, String> {
        match (&self.secret, &self.secret_file) {
            (Some(secret), _) => Ok(secret.clone().into_bytes()),
            (None, Some(path)) => std::fs::read(path)
                .map(|bytes| bytes.trim_ascii().to_vec())
                .map_err(|e| format!("cannot read the secret file {}: {e}", path.display())),
            (None, None) => Err("a cluster secret is required: --secret-file, --secret or TASK_CENTER_SECRET".into()),
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let args = args.merged()?;
    let node_id = args.node_id.clone().ok_or("--node-id is required")?;
    let zookeeper = args.zookeeper.clone().ok_or("--zookeeper is required")?;
    let transport = TcpTransport::new(TcpConfig::new(args.secret()?)).map_err(|e| e.to_string())?;
    let mut zk = ZkConfig::new(zookeeper);
    if let Some(timeout) = args.session_timeout_ms {
        zk.session_timeout_ms = timeout;
    }
    let mut builder = TaskCenter::builder()
        .node_id(node_id)
        .zookeeper(zk)
        .listen(args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into()))
        .transport(Arc::new(transport));
    if let Some(dir) = args.data_dir.clone() {
        builder = builder.data_dir(dir);
    }
    if let Some(tasks) = args.tasks_per_runner {
        builder = builder.tasks_per_runner(tasks);
    }
    if let Some(interval) = args.sweep_interval_ms {
        builder = builder.sweep_interval_ms(interval);
    }
    if let Some(threads) = args.data_threads {
        builder = builder.data_threads(threads);
    }
    if let Some(timeout) = args.step_timeout_ms {
        builder = builder.step_timeout_ms(timeout);
    }
    if let Some(timeout) = args.stop_timeout_ms {
        builder = builder.stop_timeout_ms(timeout);
    }
    if let Some(limit) = args.temporary_failure_limit {
        builder = builder.temporary_failure_limit(limit);
    }
    if let Some(grace) = args.leader_suspend_grace_ms {
        builder = builder.leader_suspend_grace_ms(grace);
    }
    if let Some(age) = args.retention_age_ms {
        builder = builder.retention_age_ms(age);
    }
    if let Some(count) = args.retention_count {
        builder = builder.retention_count(count);
    }
    let mut vips = VipSettings { enabled: !args.no_vips, ..VipSettings::default() };
    if let Some(ms) = args.vip_check_interval_ms {
        vips.check_interval = Duration::from_millis(ms);
    }
    if let Some(burst) = args.arp_burst {
        vips.arp_burst = burst;
    }
    if let Some(rounds) = args.arp_rounds {
        vips.arp_rounds = rounds;
    }
    if let Some(ms) = args.arp_interval_ms {
        vips.arp_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.arp_refresh_ms {
        vips.arp_refresh = (ms > 0).then(|| Duration::from_millis(ms));
    }
    if let Some(ms) = args.vip_conflict_interval_ms {
        vips.conflict_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.vip_probe_window_ms {
        vips.probe_window = Duration::from_millis(ms);
    }
    builder = builder.vips(vips);
    if let Some(zone) = args.time_zone.clone() {
        builder = builder.time_zone(zone);
    }
    if let Some(steps) = args.sim_steps {
        let step = Duration::from_millis(args.sim_step_ms.unwrap_or(100));
        builder = builder.executor(Arc::new(SimulatedExecutor::new(steps, step, 1 << 20)));
    } else if let Some(root) = args.volumes_root {
        builder = builder.copy_backend(Arc::new(FileBackend::new(root)));
    }

    let node = builder.build().map_err(|e| e.to_string())?.start().await.map_err(|e| e.to_string())?;
    println!("listening on {}", node.address());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("stopping: running tasks checkpoint and go back to pending");
    node.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("task_server: {e}");
        std::process::exit(2);
    }
}
