//! Test harness shared by the integration tests: a real ZooKeeper server ([`ZkServer`], one
//! shared per test binary through [`shared_zk`]), a TCP [`Proxy`] to partition one client from
//! it, task-server nodes as separate processes ([`node::NodeProcess`]), network namespaces
//! ([`netns`]: both of the latter can run inside one), a loop-mounted XFS with reflinks
//! ([`reflinkfs`]), tracing setup and bounded waits.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod netns;
pub mod node;
pub mod proxy;
pub mod reflinkfs;
pub mod tasks;
pub mod writers;
pub mod zk;

use std::future::Future;
use std::time::Duration;

use task_center::coord::SessionStatus;
use tokio::sync::watch;

pub use proxy::Proxy;
pub use zk::{connect_string, ensure_installed, shared_zk, unique_chroot, ZkServer, NOT_INSTALLED};

/// Runs `program` with `args` and returns its stdout, or an error naming the command, its exit
/// status and its stderr. The program is looked up in `PATH`, then in `/usr/sbin` and `/sbin`
/// (where `ip` and `mkfs.xfs` live, and which a non-login `PATH` may lack).
pub fn run_command(program: &str, args: &[&str]) -> Result<String, String> {
    let found = std::iter::once(std::path::PathBuf::from(program))
        .chain(["/usr/sbin", "/sbin"].map(|dir| std::path::Path::new(dir).join(program)))
        .find_map(|path| std::process::Command::new(&path).args(args).output().ok());
    let output = found.ok_or_else(|| format!("`{program}`: not found in PATH, /usr/sbin or /sbin"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The hang guard for one step of a test: long enough never to fire on a slow machine.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Sets up tracing once per process: filter from `RUST_LOG` (errors only by default), output
/// captured by the test harness.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Awaits `future`, panicking with `what` if it takes longer than `limit`. A guard against
/// hangs, never a way to wait for something.
pub async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Awaits `future` under the [`STEP_TIMEOUT`] guard.
pub async fn step<F: Future>(what: &str, future: F) -> F::Output {
    within(STEP_TIMEOUT, what, future).await
}

/// Waits until the followed session status satisfies `pred` (checking the current value first),
/// and returns that status. Panics with the last status seen after `timeout`.
pub async fn wait_status(
    rx: &mut watch::Receiver<SessionStatus>,
    timeout: Duration,
    mut pred: impl FnMut(&SessionStatus) -> bool,
) -> SessionStatus {
    let outcome = tokio::time::timeout(timeout, async { rx.wait_for(|s| pred(s)).await.map(|s| *s) }).await;
    match outcome {
        Ok(Ok(status)) => status,
        Ok(Err(_)) => panic!("the session status sender is gone; last status {:?}", *rx.borrow()),
        Err(_) => panic!("session status did not reach the expected state within {timeout:?}; last {:?}", *rx.borrow()),
    }
}

/// Makes the process `cmd` starts die with the test process (`PR_SET_PDEATHSIG`), so that a
/// failed or killed test leaves no ZooKeeper or node behind.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process died between fork and prctl: do not start an orphan.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
