//! `taskctl`: the operator's command line. Talks to any node of a cluster over TCP; followers
//! forward to the leader.
//!
//! ```text
//! taskctl --node 127.0.0.1:7401 task create --source-volume vol-a --target-volume vol-b \
//!     --source-hosts 198.51.100.1:10201 --target-hosts 203.0.113.1:10201 --run-window 01:00-05:00
//! taskctl --node 127.0.0.1:7401 task list --state running
//! taskctl --node 127.0.0.1:7401 task watch 0190b6d2-...
//! taskctl --node 127.0.0.1:7401 task set-runtime 0190b6d2-... 01:00 05:00
//! taskctl --node 127.0.0.1:7401 --json runners
//! ```
//!
//! Output is an aligned table for people, or JSON with `--json` for scripts. Errors go to stderr
//! as one line, with exit status 1 for a refused request and 2 for bad usage or no connection.
//!
//! `task watch ID` follows a task until it ends: one line redrawn in place (`\r`) about every
//! 500 ms with a progress bar, the percentage, the bytes copied and skipped, the rate and the
//! time left; then the final state on its own line. With `--json` it prints the task as one JSON
//! line per refresh instead (the schema of `task show --json`). It exits 0 if the task succeeded
//! and 1 if it failed or was canceled (130 on Ctrl-C, which leaves the task alone). Rate and time
//! left come from the progress the runner last committed (once per extent), so they move in
//! steps.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use clap::{Parser, Subcommand};
use task_center::api::{ApiError, ClientReply, ClientRequest, ListFilter, PeerReply, PeerRequest, RunnerLoad};
use task_center::model::{
    CopyOptions, CopyVolumeSpec, RunWindow, SnapshotId, Task, TaskId, TaskSpec, TaskState, TimeOfDay, Verify,
    VipConfig, VolumeId,
};
use task_center::transport::{TcpConfig, TcpTransport, Transport};

#[derive(Parser)]
#[command(about = "Operate a task-center cluster")]
struct Cli {
    /// Address of any node (`host:port`).
    #[arg(long, env = "TASK_CENTER_NODE")]
    node: String,
    /// The cluster secret. Prefer TASK_CENTER_SECRET or --secret-file.
    #[arg(long, env = "TASK_CENTER_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the cluster secret.
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this long (the cluster may be electing a leader).
    #[arg(long, default_value_t = 35_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tasks.
    #[command(subcommand)]
    Task(Box<TaskCommand>),
    /// The live runners and their loads.
    Runners,
    /// Virtual IPs, held by the leader.
    #[command(subcommand)]
    Vip(VipCommand),
}

#[derive(Subcommand)]
enum VipCommand {
    /// Set a service's virtual IPs (IPv4 or IPv6), replacing any it had.
    Set {
        service: String,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Remove a service's virtual IPs.
    Delete { service: String },
    /// Every service's virtual IPs and the node holding them.
    List,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Create a copy-volume task.
    Create {
        #[arg(long)]
        source_volume: String,
        #[arg(long)]
        target_volume: String,
        /// Comma-separated endpoints of the source block service.
        #[arg(long, value_delimiter = ',')]
        source_hosts: Vec<String>,
        /// Comma-separated endpoints of the target block service.
        #[arg(long, value_delimiter = ',')]
        target_hosts: Vec<String>,
        /// Copy only what differs from this snapshot, which the target already holds.
        #[arg(long)]
        base_snapshot: Option<String>,
        /// Daily run window, `HH:MM-HH:MM` in the cluster's time zone.
        #[arg(long)]
        run_window: Option<String>,
        /// Use this id (a retry with the same id is not duplicated).
        #[arg(long)]
        id: Option<String>,
        /// Copy options; each defaults to the library's default.
        #[command(flatten)]
        options: OptionArgs,
    },
    /// One task.
    Show { id: String },
    /// Follow a task until it ends, redrawing its progress in place; exit 0 if it succeeded.
    Watch {
        id: String,
        /// Time between two refreshes.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Tasks, oldest first.
    List {
        /// pending, running, paused, succeeded, failed or canceled.
        #[arg(long)]
        state: Option<String>,
        /// Created at or after, Unix milliseconds.
        #[arg(long)]
        from_ms: Option<i64>,
        /// Created before, Unix milliseconds.
        #[arg(long)]
        to_ms: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Stop a task for good.
    Cancel { id: String },
    /// Delete a finished (succeeded, failed or canceled) task and its records.
    Delete { id: String },
    /// Stop a task at its next block, keeping its progress.
    Pause { id: String },
    /// Let a paused task run again.
    Resume { id: String },
    /// Set a task's run window (`set-runtime ID 01:00 05:00`) or clear it (`--clear`).
    SetRuntime {
        id: String,
        start: Option<String>,
        end: Option<String>,
        #[arg(long, conflicts_with_all = ["start", "end"])]
        clear: bool,
    },
}

/// A failure and its exit status.
struct Failure(i32, String);

impl From<task_center::model::ModelError> for Failure {
    fn from(e: task_center::model::ModelError) -> Self {
        Failure(2, e.to_string())
    }
}

/// Copy options of `task create`.
#[derive(clap::Args, Debug)]
struct OptionArgs {
    /// Cap on bytes written per second.
    #[arg(long)]
    bandwidth_limit_bytes_per_second: Option<u64>,
    /// Unit of resumption and verification, a multiple of the block size.
    #[arg(long)]
    extent_size_bytes: Option<u64>,
    /// Unit of comparison, a power of two from 4096 to 16777216.
    #[arg(long)]
    block_size_bytes: Option<u32>,
    /// Verify every extent on both sides and record a digest: blake3 or xxh3.
    #[arg(long)]
    verify: Option<String>,
    /// Without a base snapshot, read the target and write only the blocks that differ.
    #[arg(long)]
    target_diff: bool,
    /// Commit progress at least every this many bytes of the volume.
    #[arg(long)]
    checkpoint_bytes: Option<u64>,
    /// Commit progress at least this often.
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
}

impl OptionArgs {
    fn options(self) -> Result<CopyOptions, Failure> {
        let defaults = CopyOptions::default();
        let verify = match self.verify.as_deref() {
            None => None,
            Some("blake3") => Some(Verify::Blake3),
            Some("xxh3") => Some(Verify::Xxh3),
            Some(other) => {
                let shown: String = other.chars().take(64).collect();
                let reason = "must be blake3 or xxh3";
                return Err(task_center::model::ModelError::Invalid { field: "verify", value: shown, reason }.into());
            }
        };
        Ok(CopyOptions {
            bandwidth_limit_bytes_per_second: self.bandwidth_limit_bytes_per_second,
            extent_size_bytes: self.extent_size_bytes.unwrap_or(defaults.extent_size_bytes),
            block_size_bytes: self.block_size_bytes.unwrap_or(defaults.block_size_bytes),
            verify,
            target_diff: self.target_diff,
            checkpoint_bytes: self.checkpoint_bytes.unwrap_or(defaults.checkpoint_bytes),
            checkpoint_interval_ms: self.checkpoint_interval_ms.unwrap_or(defaults.checkpoint_interval_ms),
            ..defaults
        })
    }
}

fn request_of(command: TaskCommand) -> Result<ClientRequest, Failure> {
    let id = |s: &str| s.parse::<TaskId>();
    Ok(match command {
        TaskCommand::Create {
            source_volume,
            target_volume,
            source_hosts,
            target_hosts,
            base_snapshot,
            run_window,
            id: given,
            options,
        } => {
            let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
                source_volume: VolumeId::new(source_volume)?,
                target_volume: VolumeId::new(target_volume)?,
                source_hosts,
                target_hosts,
                base_snapshot: base_snapshot.map(SnapshotId::new).transpose()?,
                options: options.options()?,
            });
            spec.validate()?;
            let run_window = run_window.map(|w| w.parse::<RunWindow>()).transpose()?;
            let id = match given {
                Some(given) => id(&given)?,
                None => TaskId::generate(),
            };
            ClientRequest::Create { id, spec, run_window }
        }
        TaskCommand::Show { id: s } | TaskCommand::Watch { id: s, .. } => ClientRequest::Show { id: id(&s)? },
        TaskCommand::List { state, from_ms, to_ms, limit } => ClientRequest::List(ListFilter {
            state: state.map(|s| s.parse::<TaskState>()).transpose()?,
            created_from_ms: from_ms,
            created_to_ms: to_ms,
            limit,
        }),
        TaskCommand::Cancel { id: s } => ClientRequest::Cancel { id: id(&s)? },
        TaskCommand::Delete { id: s } => ClientRequest::Delete { id: id(&s)? },
        TaskCommand::Pause { id: s } => ClientRequest::Pause { id: id(&s)? },
        TaskCommand::Resume { id: s } => ClientRequest::Resume { id: id(&s)? },
        TaskCommand::SetRuntime { id: s, start, end, clear } => {
            let run_window = match (start, end, clear) {
                (_, _, true) => None,
                (Some(start), Some(end), false) => {
                    Some(RunWindow::new(start.parse::<TimeOfDay>()?, end.parse::<TimeOfDay>()?)?)
                }
                _ => return Err(Failure(2, "set-runtime needs START and END (HH:MM HH:MM), or --clear".into())),
            };
            ClientRequest::SetRunWindow { id: id(&s)?, run_window }
        }
    })
}

/// What a command prints last, and its exit status.
struct Done {
    out: String,
    code: i32,
}

impl Done {
    fn ok(out: String) -> Self {
        Done { out, code: 0 }
    }
}

async fn run(cli: Cli) -> Result<Done, Failure> {
    let secret = match (&cli.secret, &cli.secret_file) {
        (Some(secret), _) => secret.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path)
            .map(|b| b.trim_ascii().to_vec())
            .map_err(|e| Failure(2, format!("cannot read {}: {e}", path.display())))?,
        (None, None) => {
            return Err(Failure(2, "a cluster secret is required: TASK_CENTER_SECRET or --secret-file".into()))
        }
    };
    let watch_interval = match &cli.command {
        Command::Task(command) => match command.as_ref() {
            TaskCommand::Watch { interval_ms, .. } => Some(Duration::from_millis(*interval_ms)),
            _ => None,
        },
        _ => None,
    };
    let request = match cli.command {
        Command::Task(command) => request_of(*command)?,
        Command::Runners => ClientRequest::ListRunners,
        Command::Vip(VipCommand::Set { service, addresses }) => {
            let mut parsed = Vec::new();
            for address in addresses {
                let ip = address
                    .parse()
                    .map_err(|_| Failure(2, format!("invalid vip address {address:?}: not an IPv4 or IPv6 address")))?;
                parsed.push(ip);
            }
            ClientRequest::SetVip(VipConfig::new(service, parsed)?)
        }
        Command::Vip(VipCommand::Delete { service }) => ClientRequest::DeleteVip { service },
        Command::Vip(VipCommand::List) => ClientRequest::ListVips,
    };
    let transport = TcpTransport::new(TcpConfig::new(secret)).map_err(|e| Failure(2, e.to_string()))?;
    let timeout = Duration::from_millis(cli.timeout_ms);
    if let Some(interval) = watch_interval {
        return watch(&transport, &cli.node, request, cli.json, interval, timeout).await;
    }
    let set_service = match &request {
        ClientRequest::SetVip(config) => Some(config.service.clone()),
        _ => None,
    };
    let reply = call(&transport, &cli.node, request, timeout).await?;
    if let (Some(service), ClientReply::Vips(vips)) = (set_service, &reply) {
        warn_unroutable(vips, &service);
    }
    Ok(Done::ok(if cli.json { json(&reply) } else { table(&reply) }))
}

/// After `vip set`: warns (on stderr; the configuration is stored) about each address of
/// `service` that no live node's routes cover, since no leader could place it.
fn warn_unroutable(vips: &[task_center::api::VipStatus], service: &str) {
    let addresses = vips.iter().filter(|v| v.config.service == service).flat_map(|v| &v.addresses);
    for address in addresses.filter(|a| a.state == task_center::model::VipState::NoRoute) {
        eprintln!(
            "warning: no live node has a route that covers {}; it is stored, but no leader can place it",
            address.address
        );
    }
}

/// `task watch`: shows the task (`request` is its `Show`) every `interval` until it is terminal.
/// Each refresh redraws one line in place, or prints one JSON line with `json`. Returns the final
/// state's line, with exit status 0 if the task succeeded and 1 otherwise (130 on Ctrl-C, which
/// leaves the task alone).
async fn watch(
    transport: &TcpTransport,
    node: &str,
    request: ClientRequest,
    json: bool,
    interval: Duration,
    timeout: Duration,
) -> Result<Done, Failure> {
    tokio::select! {
        done = follow(transport, node, request, json, interval, timeout) => done,
        _ = tokio::signal::ctrl_c() => {
            // Leave the terminal on a fresh line.
            if !json {
                println!();
            }
            Ok(Done { out: String::new(), code: 130 })
        }
    }
}

/// The refreshes of [`watch`], until the task is terminal.
async fn follow(
    transport: &TcpTransport,
    node: &str,
    request: ClientRequest,
    json: bool,
    interval: Duration,
    timeout: Duration,
) -> Result<Done, Failure> {
    let mut width: usize = 0;
    loop {
        let task = match call(transport, node, request.clone(), timeout).await? {
            ClientReply::Task(task) => task,
            other => return Err(Failure(2, format!("unexpected answer {other:?}"))),
        };
        let mut stdout = std::io::stdout().lock();
        if json {
            let line = serde_json::to_string(&task).expect("tasks serialize");
            let _ = writeln!(stdout, "{line}");
        } else {
            // Spaces over what is left of a longer previous line.
            let line = progress_line(&task);
            let len = line.chars().count();
            let _ = write!(stdout, "\r{line}{}", " ".repeat(width.saturating_sub(len)));
            width = len;
        }
        let _ = stdout.flush();
        drop(stdout);
        if task.state().is_terminal() {
            if !json {
                println!();
            }
            let code = if task.state() == TaskState::Succeeded { 0 } else { 1 };
            return Ok(Done { out: if json { String::new() } else { final_line(&task) }, code });
        }
        tokio::time::sleep(interval).await;
    }
}

/// One line of a task's progress: state, bar, percentage, bytes, rate and time left.
fn progress_line(t: &Task) -> String {
    const BAR: usize = 30;
    let p = &t.progress;
    let filled = match p.total_bytes {
        Some(total) if total > 0 => (p.cursor_bytes.min(total) as u128 * BAR as u128 / total as u128) as usize,
        Some(_) => BAR,
        None => 0,
    };
    let skipped = p.counters.total() - p.counters.bytes_copied;
    format!(
        "{:<9} [{}{}] {:>6}  copied {}, skipped {}  {}  eta {}",
        t.state().to_string(),
        "#".repeat(filled),
        ".".repeat(BAR - filled),
        percent(t),
        bytes(p.counters.bytes_copied),
        bytes(skipped),
        rate(t),
        eta(t)
    )
}

/// The line saying how a watched task ended.
fn final_line(t: &Task) -> String {
    let mut line = format!("task {} {}", t.id, t.state());
    if let Some(reason) = &t.status.reason {
        let _ = write!(line, ": {reason}");
    }
    if t.state() == TaskState::Succeeded {
        let p = &t.progress;
        let skipped = p.counters.total() - p.counters.bytes_copied;
        let _ = write!(line, " ({} copied, {} skipped)", bytes(p.counters.bytes_copied), bytes(skipped));
    }
    line.push('\n');
    line
}

/// Sends the request, retrying while the cluster says "try again" (electing a leader).
async fn call(
    transport: &TcpTransport,
    node: &str,
    request: ClientRequest,
    timeout: Duration,
) -> Result<ClientReply, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delays = task_center::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).delays();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let outcome = transport.call(node, PeerRequest::Client(request.clone()), left).await;
        let retry = match outcome {
            Ok(PeerReply::Client(Ok(reply))) => return Ok(reply),
            Ok(PeerReply::Client(Err(ApiError::CoordinationUnavailable(reason)))) => {
                format!("node {node} is up, but ZooKeeper (the coordination service) is not answering it: {reason}")
            }
            Ok(PeerReply::Client(Err(e))) if e.is_transient() => e.to_string(),
            Ok(PeerReply::Client(Err(e))) => return Err(Failure(1, refusal(&e))),
            Ok(other) => return Err(Failure(2, format!("unexpected answer {other:?}"))),
            Err(e) => e.to_string(),
        };
        let delay = delays.next().unwrap_or_default();
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(Failure(2, format!("no answer from the cluster: {retry}")));
        }
        tokio::time::sleep(delay).await;
    }
}

fn refusal(e: &ApiError) -> String {
    e.to_string()
}

fn json(reply: &ClientReply) -> String {
    match reply {
        ClientReply::Task(task) => serde_json::to_string_pretty(task),
        ClientReply::Tasks(tasks) => serde_json::to_string_pretty(tasks),
        ClientReply::Runners(runners) => serde_json::to_string_pretty(runners),
        ClientReply::Vips(vips) => serde_json::to_string_pretty(vips),
    }
    .expect("replies serialize")
}

fn table(reply: &ClientReply) -> String {
    match reply {
        ClientReply::Task(task) => show(task),
        ClientReply::Tasks(tasks) => {
            let rows: Vec<Vec<String>> = tasks
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.state().to_string(),
                        t.status.runner.as_ref().map_or("-".into(), |r| r.to_string()),
                        percent(t),
                        t.run_window().map_or("-".into(), |w| w.to_string()),
                        spec_summary(&t.control.spec),
                    ]
                })
                .collect();
            aligned(&["ID", "STATE", "RUNNER", "PROGRESS", "WINDOW", "SPEC"], &rows)
        }
        ClientReply::Runners(runners) => {
            let rows: Vec<Vec<String>> = runners.iter().map(runner_row).collect();
            aligned(&["NODE", "ADDRESS", "RUNNING", "CAPACITY", "VERSION"], &rows)
        }
        ClientReply::Vips(vips) => {
            let rows: Vec<Vec<String>> = vips
                .iter()
                .flat_map(|v| {
                    v.addresses.iter().map(move |a| {
                        let holders: Vec<String> = a.holders.iter().map(|h| h.to_string()).collect();
                        vec![
                            v.config.service.clone(),
                            a.address.to_string(),
                            if holders.is_empty() { "-".into() } else { holders.join(",") },
                            a.state.to_string(),
                            if a.notes.is_empty() { "-".into() } else { a.notes.join("; ") },
                        ]
                    })
                })
                .collect();
            aligned(&["SERVICE", "ADDRESS", "HOLDER", "STATE", "NOTES"], &rows)
        }
    }
}

fn runner_row(r: &RunnerLoad) -> Vec<String> {
    vec![
        r.info.node.to_string(),
        r.info.address.clone(),
        r.running.to_string(),
        r.info.capacity.to_string(),
        r.info.version.clone(),
    ]
}

fn show(t: &Task) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<12} {v}");
    };
    line("id", t.id.to_string());
    line("state", t.state().to_string());
    line("desired", format!("{:?}", t.control.desired).to_lowercase());
    line("runner", t.status.runner.as_ref().map_or("-".into(), |r| r.to_string()));
    line("attempts", t.status.attempts.to_string());
    if let Some(reason) = &t.status.reason {
        line("reason", reason.clone());
    }
    if let Some(waiting) = &t.status.waiting {
        line("waiting", waiting.clone());
    }
    line("run window", t.run_window().map_or("any time".into(), |w| w.to_string()));
    line("spec", spec_summary(&t.control.spec));
    let p = &t.progress;
    line(
        "progress",
        format!("{} of {} ({})", bytes(p.cursor_bytes), p.total_bytes.map_or("?".into(), bytes), percent(t)),
    );
    line("extent", extent(t));
    line("rate", rate(t));
    line("eta", eta(t));
    line("copied", bytes(p.counters.bytes_copied));
    line(
        "skipped",
        format!(
            "{} hole, {} zero, {} unchanged",
            bytes(p.counters.bytes_skipped_hole),
            bytes(p.counters.bytes_skipped_zero),
            bytes(p.counters.bytes_skipped_unchanged)
        ),
    );
    if let Some(digest) = &p.digest {
        line("digest", digest.clone());
    }
    if p.updated_at_ms > 0 {
        line("updated", timestamp(p.updated_at_ms));
    }
    line("created", timestamp(t.control.created_at_ms));
    out
}

/// Unix milliseconds as `2024-05-01 12:34:56 UTC`.
fn timestamp(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => at.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Err(_) => format!("{ms} ms since the epoch"),
    }
}

/// The extent the cursor is in, 1-based, of how many: `3 of 16 (32.0 MiB each)`.
fn extent(t: &Task) -> String {
    let TaskSpec::CopyVolume(spec) = &t.control.spec;
    let size = spec.options.extent_size_bytes.max(1);
    let cursor = t.progress.cursor_bytes;
    match t.progress.total_bytes {
        Some(total) => {
            let count = total.div_ceil(size);
            if cursor >= total {
                format!("all {count} done ({} each)", bytes(size))
            } else {
                format!("{} of {count} ({} each)", cursor / size + 1, bytes(size))
            }
        }
        None => format!("{} ({} each)", cursor / size + 1, bytes(size)),
    }
}

/// The rate of the current (or last) run, as the runner last committed it.
fn rate(t: &Task) -> String {
    match t.progress.rate_bytes_per_second {
        0 => "-".into(),
        r => format!("{}/s", bytes(r)),
    }
}

/// Time left at the committed rate: only for a running task whose size and rate are known.
fn eta(t: &Task) -> String {
    let p = &t.progress;
    match (t.state(), p.total_bytes) {
        (s, _) if s.is_terminal() => "-".into(),
        (TaskState::Running, Some(total)) if p.rate_bytes_per_second > 0 => {
            duration(total.saturating_sub(p.cursor_bytes).div_ceil(p.rate_bytes_per_second))
        }
        (TaskState::Running, _) => "?".into(),
        _ => "-".into(),
    }
}

/// Seconds as `45s`, `3m05s`, `1h02m` or `2d03h`.
fn duration(seconds: u64) -> String {
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if d > 0 {
        format!("{d}d{:02}h", h % 24)
    } else if h > 0 {
        format!("{h}h{:02}m", m % 60)
    } else if m > 0 {
        format!("{m}m{:02}s", seconds % 60)
    } else {
        format!("{seconds}s")
    }
}

fn spec_summary(spec: &TaskSpec) -> String {
    match spec {
        TaskSpec::CopyVolume(c) => format!(
            "copy {} -> {}{}",
            c.source_volume,
            c.target_volume,
            c.base_snapshot.as_ref().map_or(String::new(), |b| format!(" (since {b})"))
        ),
    }
}

fn percent(t: &Task) -> String {
    match t.progress.total_bytes {
        Some(total) if total > 0 => format!("{:.1}%", t.progress.cursor_bytes as f64 * 100.0 / total as f64),
        _ => "-".into(),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns, two spaces apart.
fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut emit = |cells: Vec<&str>| {
        let line: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    };
    emit(headers.to_vec());
    for row in rows {
        emit(row.iter().map(String::as_str).collect());
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match run(Cli::parse()).await {
        Ok(Done { out, code }) => {
            print!("{out}");
            if code != 0 {
                let _ = std::io::stdout().flush();
                std::process::exit(code);
            }
        }
        Err(Failure(code, message)) => {
            eprintln!("taskctl: {message}");
            std::process::exit(code);
        }
    }
}
