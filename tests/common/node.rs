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
//! The binaries are found next to the test binary: `target/<profile>/deps/<test>` runs, the
//! examples live in `target/<profile>/examples/`. `cargo test --all-targets` builds them;
//! `cargo test --test <name>` alone does not (run `cargo build --examples` first).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::Duration;

/// How long a node may take to print `listening on ADDR` after it was launched.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long [`NodeProcess::terminate`] waits for a graceful exit before it sends SIGKILL.
const TERMINATE_DEADLINE: Duration = Duration::from_secs(30);
/// Lines of a node's stderr printed when a test fails.
const TAIL_LINES: usize = 40;

/// The path of an example binary built next to this test binary; panics with one line saying
/// how to build it if it is missing.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test-binary> -> target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    if !path.is_file() {
        panic!(
            "example binary {} is missing: run `cargo build --examples` (cargo test --all-targets builds it)",
            path.display()
        );
    }
    path
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
        }
    }

    fn args(&self, data_dir: &Path) -> Vec<String> {
        let mut args = vec![
            "--node-id".to_string(),
            self.node_id.clone(),
            "--zookeeper".into(),
            self.zookeeper.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
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
        args
    }
}

/// A `task_server` process. Killed by pid and reaped when dropped.
pub struct NodeProcess {
    node_id: String,
    address: String,
    pid: libc::pid_t,
    /// `None` once reaped.
    child: Option<Child>,
    /// The node's data directory and its stderr log; removed after the node is gone.
    dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Launches a node and waits until it prints `listening on ADDR`. Panics with the tail of its
    /// stderr if it exits first or does not serve within 30 s.
    pub async fn start(config: &NodeConfig) -> NodeProcess {
        let binary = example_binary("task_server");
        let dir = tempfile::Builder::new().prefix(&format!("tc-node-{}-", config.node_id)).tempdir().expect("temp dir");
        let stderr = File::create(dir.path().join("stderr.log")).expect("create the node's stderr log");
        let mut cmd = Command::new(binary);
        cmd.args(config.args(&dir.path().join("data")))
            .env("TASK_CENTER_SECRET", &config.secret)
            .env("RUST_LOG", std::env::var("TC_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The test process died between fork and prctl: do not start an orphan.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = spawn_from_launcher(cmd).unwrap_or_else(|e| panic!("cannot launch task_server: {e}"));
        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        thread::Builder::new()
            .name(format!("node-{}-stdout", config.node_id))
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
        let mut node =
            NodeProcess { node_id: config.node_id.clone(), address: String::new(), pid, child: Some(child), dir };
        match tokio::time::timeout(START_DEADLINE, rx).await {
            Ok(Ok(address)) => node.address = address,
            Ok(Err(_)) => {
                let status = node.child.as_mut().and_then(|c| c.wait().ok());
                panic!(
                    "node {} exited ({status:?}) before serving; stderr tail:\n{}",
                    node.node_id,
                    node.stderr_tail(TAIL_LINES)
                );
            }
            Err(_) => panic!(
                "node {} did not print `listening on` within {START_DEADLINE:?}; stderr tail:\n{}",
                node.node_id,
                node.stderr_tail(TAIL_LINES)
            ),
        }
        node
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Its transport address (`127.0.0.1:PORT`).
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
        match tokio::time::timeout(TERMINATE_DEADLINE, &mut waiter).await {
            Ok(joined) => joined.ok().and_then(|r| r.ok()),
            Err(_) => {
                eprintln!("node {} ignored SIGTERM for {TERMINATE_DEADLINE:?}: killing it", self.node_id);
                // SAFETY: the waiter has not reaped the child (it is still waiting), so the pid is ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                waiter.await.ok().and_then(|r| r.ok())
            }
        }
    }

    /// The last `lines` lines of the node's stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
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
