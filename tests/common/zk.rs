//! A real ZooKeeper server, from Debian's `zookeeper` package, launched by the tests themselves on
//! a free loopback port with its own temporary data directory, or ([`ZkServer::start_in_netns`])
//! inside a network namespace of the tests, listening on an address there (`ip netns exec`).
//!
//! Every server is forked by one launcher thread that lives as long as the test process, and the
//! child asks the kernel (`PR_SET_PDEATHSIG`) to SIGKILL it when that thread goes away, so no
//! server outlives its test process, even one that aborts. (`PR_SET_PDEATHSIG` fires when the
//! *thread* that forked exits, which is why no test thread or runtime thread forks.) Servers are
//! only ever signalled by their own pid.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The jar of Debian's `zookeeper` package.
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// The configuration directory of Debian's `zookeeper` package (for its logging configuration).
pub const ZOOKEEPER_CONF_DIR: &str = "/etc/zookeeper/conf";
/// The one line a test run without ZooKeeper dies with.
pub const NOT_INSTALLED: &str = "ZooKeeper is not installed: run ./scripts/test.sh (it installs Debian's zookeeper) \
     or apt-get install -y zookeeper";

/// How long a server may take to answer `ruok` after it was launched.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long `stop()` waits for the JVM to exit after SIGTERM before it sends SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// Ticks of the server (ms): sessions time out in multiples of it, so keep it short.
const TICK_MS: u32 = 200;

/// A ZooKeeper server process. Killed (by pid) and its data removed when dropped.
pub struct ZkServer {
    /// The client address: `127.0.0.1:PORT`, or an address inside `netns`.
    address: SocketAddr,
    /// The network namespace the server runs in (`ip netns exec`), or `None` for the host's.
    netns: Option<String>,
    dir: PathBuf,
    /// Removes the directory when the server is dropped (statics are cleaned at exit instead).
    _tempdir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl ZkServer {
    /// Launches a server on a free loopback port and waits until it answers `ruok`.
    ///
    /// Panics with [`NOT_INSTALLED`] when ZooKeeper or Java is missing, and with the tail of the
    /// server's log when it does not serve within 30 s.
    pub fn start() -> ZkServer {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            match Self::try_start(None, address) {
                Ok(server) => return server,
                // Another process took the port between our probe and the server's bind: retry.
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// Launches a server inside network namespace `netns` (`ip netns exec NETNS java ...`),
    /// listening on `address` (which must already be on one of the namespace's interfaces), and
    /// waits until it answers `ruok` there. Clients in the namespace's reach connect to
    /// [`ZkServer::connect_string`]; the test process itself (in the host's namespace) cannot.
    ///
    /// Panics as [`ZkServer::start`] does.
    pub fn start_in_netns(netns: &str, address: SocketAddr) -> ZkServer {
        Self::try_start(Some(netns.to_string()), address).unwrap_or_else(|log| panic!("{log}"))
    }

    fn try_start(netns: Option<String>, address: SocketAddr) -> Result<ZkServer, String> {
        ensure_installed();
        let tempdir = tempfile::Builder::new().prefix("tc-zookeeper-").tempdir().expect("create a temp dir");
        let dir = tempdir.path().to_path_buf();
        write_config(&dir, address);
        let server = ZkServer { address, netns, dir, _tempdir: tempdir, child: Mutex::new(None) };
        server.launch();
        server.wait_serving().map(|()| server)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The client address (`127.0.0.1:PORT` unless started in a namespace).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The network namespace the server runs in, if not the host's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// `ADDRESS:PORT/chroot` (`chroot` may be empty or `/` for no chroot).
    pub fn connect_string(&self, chroot: &str) -> String {
        connect_string_at(self.address, chroot)
    }

    /// The server's temporary directory (configuration, data, `zookeeper.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        match self.child().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server gracefully (SIGTERM to its pid) and waits for it to exit. Its data stays,
    /// for [`ZkServer::restart`].
    pub fn stop(&self) {
        let Some(mut child) = self.child().take() else { return };
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("ZooKeeper pid {} ignored SIGTERM for {STOP_DEADLINE:?}: killing it", child.id());
                    signal(&child, libc::SIGKILL);
                    let _ = child.wait();
                    return;
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Kills the server (SIGKILL to its pid) and waits for it to exit. Its data stays, for
    /// [`ZkServer::restart`].
    pub fn kill(&self) {
        Self::kill_child(&mut self.child());
    }

    /// Starts the server again on the same port and data directory, and waits until it serves.
    /// Panics if it is still running.
    pub fn restart(&self) {
        assert!(!self.is_running(), "restart() of a running ZooKeeper: stop() or kill() it first");
        self.launch();
        if let Err(log) = self.wait_serving() {
            panic!("{log}");
        }
    }

    /// The last `lines` lines of the server's output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("zookeeper.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn kill_child(slot: &mut Option<Child>) {
        if let Some(mut child) = slot.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    fn launch(&self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("zookeeper.log"))
            .expect("open the ZooKeeper log");
        let mut cmd = match &self.netns {
            None => Command::new("java"),
            // `ip netns exec` execs java in place: the child's pid is the JVM's.
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns.as_str(), "java"]);
                cmd
            }
        };
        cmd.arg("-Xmx256m")
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-cp")
            .arg(format!("{ZOOKEEPER_JAR}:{ZOOKEEPER_CONF_DIR}"))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir.join("zoo.cfg"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log);
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
        let child = spawn_from_launcher(cmd).unwrap_or_else(|e| panic!("cannot launch java for ZooKeeper: {e}"));
        *self.child() = Some(child);
    }

    /// Waits until the server answers `ruok` with `imok`. On failure, the message to panic with.
    fn wait_serving(&self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut backoff = Duration::from_millis(10);
        loop {
            if ruok_in(self.netns.as_deref(), self.address) {
                return Ok(());
            }
            let exited = match self.child().as_mut() {
                Some(child) => child.try_wait().ok().flatten().map(|s| s.to_string()),
                None => Some("never launched".to_string()),
            };
            if let Some(status) = exited {
                return Err(format!(
                    "ZooKeeper on {}{} exited ({status}) before serving; log tail:\n{}",
                    self.address,
                    self.netns.as_ref().map_or(String::new(), |ns| format!(" in namespace {ns}")),
                    self.log_tail(40)
                ));
            }
            if Instant::now() >= deadline {
                Self::kill_child(&mut self.child());
                return Err(format!(
                    "ZooKeeper on {}{} did not answer ruok within {START_DEADLINE:?}; log tail:\n{}",
                    self.address,
                    self.netns.as_ref().map_or(String::new(), |ns| format!(" in namespace {ns}")),
                    self.log_tail(40)
                ));
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        Self::kill_child(&mut self.child());
        // The TempDir field removes the directory after this.
    }
}

/// `127.0.0.1:PORT/chroot` (`chroot` may be empty or `/` for no chroot).
pub fn connect_string(port: u16, chroot: &str) -> String {
    connect_string_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), chroot)
}

/// `ADDRESS:PORT/chroot` (`chroot` may be empty or `/` for no chroot).
pub fn connect_string_at(address: SocketAddr, chroot: &str) -> String {
    let chroot = chroot.trim_end_matches('/');
    if chroot.is_empty() {
        format!("{address}")
    } else if chroot.starts_with('/') {
        format!("{address}{chroot}")
    } else {
        format!("{address}/{chroot}")
    }
}

static SHARED: OnceLock<ZkServer> = OnceLock::new();

/// The server shared by all tests of this test binary, started at the first call. Tests that
/// stop, kill or restart ZooKeeper must use their own [`ZkServer::start`] instead. Give each test
/// its own [`unique_chroot`].
pub fn shared_zk() -> &'static ZkServer {
    SHARED.get_or_init(|| {
        let server = ZkServer::start();
        // Statics are never dropped: kill it and remove its data when the test binary exits.
        // (If the process dies without exiting, PR_SET_PDEATHSIG still kills the server.)
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_shared_at_exit);
        }
        server
    })
}

extern "C" fn stop_shared_at_exit() {
    if let Some(server) = SHARED.get() {
        if let Ok(mut child) = server.child.try_lock() {
            ZkServer::kill_child(&mut child);
        }
        let _ = fs::remove_dir_all(&server.dir);
    }
}

/// A chroot no other test of any process shares: `/tc-test/<name>-<counter>-<pid>`.
pub fn unique_chroot(test_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name: String =
        test_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/tc-test/{name}-{n}-{}", std::process::id())
}

/// Panics with [`NOT_INSTALLED`] unless the ZooKeeper jar and `java` are there.
pub fn ensure_installed() {
    if !Path::new(ZOOKEEPER_JAR).is_file() || find_in_path("java").is_none() {
        panic!("{NOT_INSTALLED}");
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

fn write_config(dir: &Path, address: SocketAddr) {
    let (host, port) = (address.ip(), address.port());
    let data = dir.join("data");
    fs::create_dir_all(&data).expect("create the ZooKeeper data dir");
    let config = format!(
        "tickTime={TICK_MS}\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress={host}\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=*\n\
         minSessionTimeout={}\n\
         maxSessionTimeout=60000\n\
         extendedTypesEnabled=true\n",
        data.display(),
        2 * TICK_MS,
    );
    let mut file = File::create(dir.join("zoo.cfg")).expect("create zoo.cfg");
    file.write_all(config.as_bytes()).expect("write zoo.cfg");
}

/// Whether a server answers the four-letter word `ruok` with `imok` on 127.0.0.1:`port`.
pub fn ruok(port: u16) -> bool {
    ruok_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// [`ruok_at`] from inside network namespace `netns` (`None`: the host's): on a short-lived
/// thread that joins the namespace first (`setns` changes only the calling thread's).
pub fn ruok_in(netns: Option<&str>, addr: SocketAddr) -> bool {
    let Some(netns) = netns else { return ruok_at(addr) };
    let path = format!("/run/netns/{netns}");
    thread::scope(|scope| {
        scope
            .spawn(move || {
                let Ok(file) = File::open(&path) else { return false };
                // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return false;
                }
                ruok_at(addr)
            })
            .join()
            .unwrap_or(false)
    })
}

/// Whether a server answers the four-letter word `ruok` with `imok` at `addr`.
pub fn ruok_at(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"ruok").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer == "imok"
}

fn signal(child: &Child, sig: libc::c_int) {
    // The child is not reaped until we wait for it, so its pid cannot have been reused.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` from the launcher thread, which lives as long as the process.
fn spawn_from_launcher(cmd: Command) -> io::Result<Child> {
    static LAUNCHER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("zk-launcher".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread) never ends.
                for mut request in rx {
                    let _ = request.reply.send(request.cmd.spawn());
                }
            })
            .expect("start the ZooKeeper launcher thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    launcher.send(SpawnRequest { cmd, reply }).expect("the launcher thread is alive");
    answer.recv().expect("the launcher thread answers")
}
