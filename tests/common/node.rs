//! Task-server nodes as separate OS processes: the `task_server` example binary, started with
//! its flags, killed (`SIGKILL`) or stopped (`SIGTERM`) by pid.
//!
//! Every node is forked by one launcher thread that lives as long as the test process, and the
//! child asks the kernel (`PR_SET_PDEATHSIG`) to SIGKILL it when that thread goes away, so no
//! node outlives its test process, even one that aborts (the same scheme as [`super::zk`]).
//! A [`NodeProcess`] that is dropped kills its node by pid and reaps it, also while a test
//! panics; then it prints the tail of the node's stderr (kept in a file of its temporary
//! directory) so the failure comes with the node's side of the story.
//!
//! A node can run inside a network namespace of the tests ([`NodeConfig::netns`]: the binary is
//! started through `ip netns exec`, which execs it in place, so the pid is still the node's) and
//! listen on an address there ([`NodeConfig::listen`]). Its stderr is read line by line as it
//! comes ([`NodeProcess::wait_stderr`] waits for a line), and copied to the log file. A node
//! killed or stopped can be started again with its data directory ([`NodeProcess::restart`]).
//!
//! The binaries are the examples of this crate, built by [`example_binary`] on first use with the
//! cargo that runs the tests, into the same target directory and profile (so `cargo test --test
//! <name>` alone works on a fresh checkout, and a node never runs a binary older than the
//! library under test).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a node may take to print `listening on ADDR` after it was launched.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long [`NodeProcess::terminate`] waits for a graceful exit before it sends SIGKILL.
const TERMINATE_DEADLINE: Duration = Duration::from_secs(30);
/// Lines of a node's stderr printed when a test fails.
const TAIL_LINES: usize = 40;

/// The examples the tests start as processes.
const EXAMPLES: [&str; 2] = ["task_server", "taskctl"];

/// The path of an example binary of this crate, built (once per test process, with every other
/// example the tests start) by the cargo that runs the tests, into the same target directory and
/// profile as this test binary. Panics with cargo's own message if the build fails.
pub fn example_binary(name: &str) -> PathBuf {
    assert!(EXAMPLES.contains(&name), "example {name} is not in tests/common/node.rs EXAMPLES");
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let examples_dir = BUILT.get_or_init(build_examples);
    examples_dir.join(name)
}

/// Runs `cargo build --example ...` for [`EXAMPLES`]; returns the directory they are in.
fn build_examples() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test-binary>: the profile directory and the target directory.
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test binary lives in target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let profile = profile_dir.file_name().and_then(|name| name.to_str()).expect("a UTF-8 profile directory");
    // `cargo test` builds tests with the `dev` profile into `debug/` (and `release` into
    // `release/`, `bench` into `release/` too); any other directory is a custom profile's name.
    let profile = match profile {
        "debug" => "dev",
        "release" => "release",
        other => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--quiet", "--profile", profile, "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for example in EXAMPLES {
        command.args(["--example", example]);
    }
    let status = command.stdin(Stdio::null()).status().unwrap_or_else(|e| panic!("cannot run {cargo:?}: {e}"));
    assert!(status.success(), "building the examples {EXAMPLES:?} failed ({status}); cargo's output is above");
    profile_dir.join("examples")
}

/// How to start one node. Fields map one to one to the flags of `task_server`.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `--node-id`.
    pub node_id: String,
    /// `--zookeeper`: `host:port/chroot`.
    pub zookeeper: String,
    /// The cluster secret, passed as `TASK_CENTER_SECRET` (not on the command line).
    pub secret: String,
    /// `--session-timeout-ms`.
    pub session_timeout_ms: Option<u64>,
    /// `--tasks-per-runner`.
    pub tasks_per_runner: Option<u32>,
    /// `--sweep-interval-ms`.
    pub sweep_interval_ms: Option<u64>,
    /// `--sim-steps`.
    pub sim_steps: Option<u64>,
    /// `--sim-step-ms`.
    pub sim_step_ms: Option<u64>,
    /// `--volumes-root`: the file backend's root, shared by nodes that share a block service.
    /// Without `sim_steps` the node runs the real copy engine over it.
    pub volumes_root: Option<PathBuf>,
    /// Run the node inside this network namespace (`ip netns exec NETNS task_server ...`).
    pub netns: Option<String>,
    /// `--listen`; `127.0.0.1:0` when `None`.
    pub listen: Option<String>,
    /// `--no-vips`.
    pub no_vips: bool,
    /// `--vip-check-interval-ms`.
    pub vip_check_interval_ms: Option<u64>,
    /// `--arp-rounds`.
    pub arp_rounds: Option<u32>,
    /// `--arp-interval-ms`.
    pub arp_interval_ms: Option<u64>,
    /// `--arp-refresh-ms`.
    pub arp_refresh_ms: Option<u64>,
    /// `--arp-burst`.
    pub arp_burst: Option<u32>,
    /// `--vip-conflict-interval-ms`.
    pub vip_conflict_interval_ms: Option<u64>,
}

impl NodeConfig {
    /// A node with the daemon's defaults for everything optional.
    pub fn new(node_id: impl Into<String>, zookeeper: impl Into<String>, secret: impl Into<String>) -> Self {
        NodeConfig {
            node_id: node_id.into(),
            zookeeper: zookeeper.into(),
            secret: secret.into(),
            session_timeout_ms: None,
            tasks_per_runner: None,
            sweep_interval_ms: None,
            sim_steps: None,
            sim_step_ms: None,
            volumes_root: None,
            netns: None,
            listen: None,
            no_vips: false,
            vip_check_interval_ms: None,
            arp_rounds: None,
            arp_interval_ms: None,
            arp_refresh_ms: None,
            arp_burst: None,
            vip_conflict_interval_ms: None,
        }
    }

    pub fn args(&self, data_dir: &Path) -> Vec<String> {
        let mut args = vec![
            "--node-id".to_string(),
            self.node_id.clone(),
            "--zookeeper".into(),
            self.zookeeper.clone(),
            "--listen".into(),
            self.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into()),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                args.push(name.to_string());
                args.push(value);
            }
        };
        flag("--session-timeout-ms", self.session_timeout_ms.map(|v| v.to_string()));
        flag("--tasks-per-runner", self.tasks_per_runner.map(|v| v.to_string()));
        flag("--sweep-interval-ms", self.sweep_interval_ms.map(|v| v.to_string()));
        flag("--sim-steps", self.sim_steps.map(|v| v.to_string()));
        flag("--sim-step-ms", self.sim_step_ms.map(|v| v.to_string()));
        flag("--volumes-root", self.volumes_root.as_ref().map(|v| v.display().to_string()));
        flag("--vip-check-interval-ms", self.vip_check_interval_ms.map(|v| v.to_string()));
        flag("--arp-rounds", self.arp_rounds.map(|v| v.to_string()));
        flag("--arp-interval-ms", self.arp_interval_ms.map(|v| v.to_string()));
        flag("--arp-refresh-ms", self.arp_refresh_ms.map(|v| v.to_string()));
        flag("--arp-burst", self.arp_burst.map(|v| v.to_string()));
        flag("--vip-conflict-interval-ms", self.vip_conflict_interval_ms.map(|v| v.to_string()));
        // A node in the host's own namespace never manages VIPs: tests touch no host interface.
        if self.no_vips || self.netns.is_none() {
            args.push("--no-vips".into());
        }
        args
    }
}

/// A `task_server` process. Killed by pid and reaped when dropped.
pub struct NodeProcess {
    config: NodeConfig,
    node_id: String,
    address: String,
    pid: libc::pid_t,
    /// `None` once reaped.
    child: Option<Child>,
    /// Every line the node wrote to stderr, across restarts (also copied to `stderr.log`).
    stderr: watch::Sender<Vec<String>>,
    /// The thread copying the current process's stderr; it ends when the process does.
    stderr_reader: Option<thread::JoinHandle<()>>,
    /// The node's data directory and its stderr log; removed after the node is gone.
    dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Launches a node and waits until it prints `listening on ADDR`. Panics with the tail of its
    /// stderr if it exits first or does not serve within 30 s.
    pub async fn start(config: &NodeConfig) -> NodeProcess {
        let dir = tempfile::Builder::new().prefix(&format!("tc-node-{}-", config.node_id)).tempdir().expect("temp dir");
        let mut node = NodeProcess {
            config: config.clone(),
            node_id: config.node_id.clone(),
            address: String::new(),
            pid: 0,
            child: None,
            stderr: watch::Sender::new(Vec::new()),
            stderr_reader: None,
            dir,
        };
        node.launch().await;
        node
    }

    /// Starts the node again, with the same configuration and data directory, after it was
    /// killed or stopped; waits until it serves (its address may change). Panics if it runs.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running node {}: kill_9() or terminate() it first", self.node_id);
        self.launch().await;
    }

    async fn launch(&mut self) {
        let binary = example_binary("task_server");
        let mut cmd = match &self.config.netns {
            None => Command::new(binary),
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns.as_str()]).arg(binary);
                cmd
            }
        };
        cmd.args(self.config.args(&self.dir.path().join("data")))
            .env("TASK_CENTER_SECRET", &self.config.secret)
            .env("RUST_LOG", std::env::var("TC_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        super::die_with_parent(&mut cmd);
        let mut child = spawn_from_launcher(cmd).unwrap_or_else(|e| panic!("cannot launch task_server: {e}"));
        self.pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        self.stderr_reader =
            Some(copy_stderr(&self.node_id, stderr, &self.dir.path().join("stderr.log"), &self.stderr));
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        thread::Builder::new()
            .name(format!("node-{}-stdout", self.node_id))
            .spawn(move || {
                let mut tx = Some(tx);
                // Read to the end, so the node never blocks on a full pipe.
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(address) = line.strip_prefix("listening on ") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(address.trim().to_string());
                        }
                    }
                }
            })
            .expect("start the stdout reader");
        match tokio::time::timeout(START_DEADLINE, rx).await {
            Ok(Ok(address)) => self.address = address,
            Ok(Err(_)) => {
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                self.finish_stderr();
                panic!(
                    "node {} exited ({status:?}) before serving; stderr tail:\n{}",
                    self.node_id,
                    self.stderr_tail(TAIL_LINES)
                );
            }
            Err(_) => panic!(
                "node {} did not print `listening on` within {START_DEADLINE:?}; stderr tail:\n{}",
                self.node_id,
                self.stderr_tail(TAIL_LINES)
            ),
        }
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Its transport address (`127.0.0.1:PORT`, or on its `--listen` address).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the node with SIGKILL (by pid) and reaps it: a crash, nothing is checkpointed and
    /// its ZooKeeper session lives on until the server expires it.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The child is not reaped until we wait for it, so its pid cannot have been reused.
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
            self.finish_stderr();
        }
    }

    /// Stops the node with SIGTERM (graceful shutdown) and waits for it to exit; sends SIGKILL
    /// after 30 s. Returns its exit status.
    pub async fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own, not yet reaped, child's pid.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let pid = self.pid;
        let mut waiter = tokio::task::spawn_blocking(move || child.wait());
        let status = match tokio::time::timeout(TERMINATE_DEADLINE, &mut waiter).await {
            Ok(joined) => joined.ok().and_then(|r| r.ok()),
            Err(_) => {
                eprintln!("node {} ignored SIGTERM for {TERMINATE_DEADLINE:?}: killing it", self.node_id);
                // SAFETY: the waiter has not reaped the child (it is still waiting), so the pid is ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                waiter.await.ok().and_then(|r| r.ok())
            }
        };
        self.finish_stderr();
        status
    }

    /// Waits (up to 2 s) for the stderr copier of an exited process to reach the end of its
    /// pipe, so the log holds the process's last words.
    fn finish_stderr(&mut self) {
        let Some(reader) = self.stderr_reader.take() else { return };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }

    /// How many lines the node has written to stderr so far (across restarts): a mark for
    /// [`NodeProcess::wait_stderr`].
    pub fn stderr_mark(&self) -> usize {
        self.stderr.borrow().len()
    }

    /// Every stderr line after `mark` (see [`NodeProcess::stderr_mark`]).
    pub fn stderr_since(&self, mark: usize) -> Vec<String> {
        self.stderr.borrow().iter().skip(mark).cloned().collect()
    }

    /// Waits until the node writes, after `mark`, a stderr line that contains every one of
    /// `needles`, and returns it. Follows the lines as they come (no polling). Panics with the
    /// tail of the log after `limit`.
    pub async fn wait_stderr(&self, mark: usize, needles: &[&str], limit: Duration) -> String {
        let matches = |line: &String| needles.iter().all(|needle| line.contains(needle));
        let mut lines = self.stderr.subscribe();
        let found = tokio::time::timeout(limit, async {
            let lines = lines.wait_for(|lines| lines.iter().skip(mark).any(matches)).await.expect("the sender lives");
            lines.iter().skip(mark).find(|line| matches(line)).cloned().expect("a matching line")
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "node {} wrote no line with {needles:?} within {limit:?}; stderr tail:\n{}",
                self.node_id,
                self.stderr_tail(TAIL_LINES)
            )
        })
    }

    /// The last `lines` lines of the node's stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Copies a node's stderr, line by line as it comes, to `path` (appending) and to `lines`; the
/// thread ends at the end of the pipe, when the process is gone.
fn copy_stderr(
    node_id: &str,
    stderr: ChildStderr,
    path: &Path,
    lines: &watch::Sender<Vec<String>>,
) -> thread::JoinHandle<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path).expect("open the node's stderr log");
    let lines = lines.clone();
    thread::Builder::new()
        .name(format!("node-{node_id}-stderr"))
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                lines.send_modify(|lines| lines.push(line));
            }
        })
        .expect("start the stderr reader")
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill_9();
        if thread::panicking() {
            eprintln!(
                "---- node {} (pid {}, {}): last {TAIL_LINES} lines of stderr ----\n{}\n---- end of node {} ----",
                self.node_id,
                self.pid,
                self.address,
                self.stderr_tail(TAIL_LINES),
                self.node_id
            );
        }
    }
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` from the launcher thread, which lives as long as the process (`PR_SET_PDEATHSIG`
/// fires when the thread that forked exits, so no test or runtime thread may fork a node).
fn spawn_from_launcher(cmd: Command) -> io::Result<Child> {
    static LAUNCHER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("node-launcher".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread) never ends.
                for mut request in rx {
                    let _ = request.reply.send(request.cmd.spawn());
                }
            })
            .expect("start the node launcher thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    launcher.send(SpawnRequest { cmd, reply }).expect("the launcher thread is alive");
    answer.recv().expect("the launcher thread answers")
}
