//! A real ZooKeeper server, from Debian's `zookeeper` package, launched by the tests themselves on
//! a free loopback port with its own temporary data directory, or ([`ZkServer::start_in_netns`])
//! inside a network namespace of the tests, listening on an address there (`ip netns exec`); or
//! a three-server ensemble on loopback ([`ZkEnsemble`]), whose servers are killed and restarted
//! one by one.
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
    /// Standalone, or one member of a [`ZkEnsemble`]: how it is launched and when it serves.
    role: Role,
    child: Mutex<Option<Child>>,
}

/// What a server is, which decides its main class and what "serving" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `ZooKeeperServerMain`; serves once it answers `ruok`.
    Standalone,
    /// `QuorumPeerMain` of an ensemble; serves once `srvr` says it leads or follows (`ruok`
    /// answers as soon as the process listens, in a quorum or not).
    Member,
}

impl Role {
    fn main_class(self) -> &'static str {
        match self {
            Role::Standalone => "org.apache.zookeeper.server.ZooKeeperServerMain",
            Role::Member => "org.apache.zookeeper.server.quorum.QuorumPeerMain",
        }
    }
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
        let server =
            ZkServer { address, netns, dir, _tempdir: tempdir, role: Role::Standalone, child: Mutex::new(None) };
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
        let child = launch_java(self.netns.as_deref(), &self.dir, self.role.main_class());
        *self.child() = Some(child);
    }

    /// Whether the server serves clients now: it answers `ruok` with `imok` (standalone), or
    /// `srvr` says it leads or follows (ensemble member).
    fn serving(&self) -> bool {
        match self.role {
            Role::Standalone => ruok_in(self.netns.as_deref(), self.address),
            Role::Member => quorum_mode_at(self.address).is_some(),
        }
    }

    /// Waits until the server serves ([`ZkServer::serving`]). On failure, the message to panic
    /// with.
    fn wait_serving(&self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut backoff = Duration::from_millis(10);
        let what = match self.role {
            Role::Standalone => "answer ruok",
            Role::Member => "lead or follow in a quorum",
        };
        loop {
            if self.serving() {
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
                    "ZooKeeper on {}{} did not {what} within {START_DEADLINE:?}; log tail:\n{}",
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

/// Ticks of an ensemble's servers (ms). The followers must connect to a new leader and sync
/// within `initLimit` ticks, and answer it within `syncLimit`: with these the ensemble forms,
/// and forms again after a member's death or a lost quorum, within a few seconds.
const ENSEMBLE_TICK_MS: u32 = 500;
const ENSEMBLE_INIT_LIMIT: u32 = 10;
const ENSEMBLE_SYNC_LIMIT: u32 = 5;
/// How long [`ZkEnsemble::start`] waits for a real client's write to go through.
const ENSEMBLE_WRITE_DEADLINE: Duration = Duration::from_secs(20);

/// A three-server ZooKeeper ensemble on 127.0.0.1: each server has its own temporary directory
/// (data with `myid`, `zoo.cfg`, `zookeeper.log`), client port, quorum port and election port.
/// Servers are numbered 0, 1, 2 here (their `myid` is 1, 2, 3). Every server is killed, by its
/// pid, and its data removed when the ensemble is dropped (each server's own `Drop`).
pub struct ZkEnsemble {
    servers: Vec<ZkServer>,
}

impl ZkEnsemble {
    /// How many servers an ensemble has.
    pub const SIZE: usize = 3;

    /// Launches the three servers and waits until every one of them leads or follows (`srvr`)
    /// and a real client's write through the ensemble is acknowledged.
    ///
    /// Panics with [`NOT_INSTALLED`] when ZooKeeper or Java is missing, and with the tail of the
    /// server's log when a server does not serve within 30 s.
    pub fn start() -> ZkEnsemble {
        ensure_installed();
        let mut attempt = 0;
        let ensemble = loop {
            attempt += 1;
            match Self::try_start() {
                Ok(ensemble) => break ensemble,
                // Another process took one of the ports between our probe and a server's bind.
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        };
        ensemble.wait_write(ENSEMBLE_WRITE_DEADLINE);
        ensemble
    }

    fn try_start() -> Result<ZkEnsemble, String> {
        // Nine distinct ports: a client, a quorum and an election port per server.
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 * Self::SIZE {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let peers: String = (0..Self::SIZE)
            .map(|i| format!("server.{}=127.0.0.1:{}:{}\n", i + 1, ports[3 * i + 1], ports[3 * i + 2]))
            .collect();
        let extra = format!("initLimit={ENSEMBLE_INIT_LIMIT}\nsyncLimit={ENSEMBLE_SYNC_LIMIT}\n{peers}");
        let mut servers = Vec::new();
        for i in 0..Self::SIZE {
            let tempdir = tempfile::Builder::new()
                .prefix(&format!("tc-zookeeper-ensemble-{}-", i + 1))
                .tempdir()
                .expect("create a temp dir");
            let dir = tempdir.path().to_path_buf();
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[3 * i]));
            write_config_with(&dir, address, ENSEMBLE_TICK_MS, &extra);
            fs::write(dir.join("data").join("myid"), format!("{}\n", i + 1)).expect("write myid");
            servers.push(ZkServer {
                address,
                netns: None,
                dir,
                _tempdir: tempdir,
                role: Role::Member,
                child: Mutex::new(None),
            });
        }
        for server in &servers {
            server.launch();
        }
        // Each waits until it leads or follows; the others are launched meanwhile, so the first
        // wait covers the election. On failure the servers are killed as they are dropped.
        for server in &servers {
            server.wait_serving()?;
        }
        Ok(ZkEnsemble { servers })
    }

    /// Waits until a real client's write (an ephemeral node, on a session of its own) through
    /// the ensemble's connect string is acknowledged, which needs a quorum. Panics after
    /// `limit` with every server's mode and log tail.
    pub fn wait_write(&self, limit: Duration) {
        use task_center::coord::{Coordination, CreateMode, ZkConfig, ZkCoordination};
        let connect = self.connect_string("");
        let path = format!("/tc-ensemble-probe-{}", std::process::id());
        // The test's own runtime may be the caller's: use a runtime of its own on a thread of its
        // own (a runtime cannot block inside another).
        let outcome = thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                    runtime.block_on(async {
                        let deadline = tokio::time::Instant::now() + limit;
                        let mut last = String::from("no attempt");
                        while tokio::time::Instant::now() < deadline {
                            let config = ZkConfig { session_timeout_ms: 4_000, ..ZkConfig::new(connect.clone()) };
                            match ZkCoordination::connect(config).await {
                                Ok(client) => {
                                    let created = client.create(&path, b"probe", CreateMode::Ephemeral).await;
                                    client.close().await;
                                    match created {
                                        Ok(_) => return None,
                                        Err(e) => last = format!("create {path}: {e}"),
                                    }
                                }
                                Err(e) => last = format!("connect {connect}: {e}"),
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some(last)
                    })
                })
                .join()
                .unwrap_or_else(|_| Some("the probe thread panicked".into()))
        });
        if let Some(last) = outcome {
            panic!("the ensemble did not acknowledge a write within {limit:?} ({last}); {}", self.describe(40));
        }
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/chroot` (`chroot` may be empty or `/` for none).
    pub fn connect_string(&self, chroot: &str) -> String {
        let hosts: Vec<String> = self.servers.iter().map(|s| s.address.to_string()).collect();
        format!("{}{}", hosts.join(","), chroot_suffix(chroot))
    }

    /// Server `i` (0, 1 or 2).
    pub fn server(&self, i: usize) -> &ZkServer {
        &self.servers[i]
    }

    /// Kills server `i` (SIGKILL to its pid) and waits for it to exit. Its data stays, for
    /// [`ZkEnsemble::restart`].
    pub fn kill(&self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again on the same ports and data, and waits until it leads or follows,
    /// which needs a quorum of running servers (itself included). Panics if it is running, or
    /// with its log tail if it does not serve within 30 s.
    pub fn restart(&self, i: usize) {
        assert!(!self.is_running(i), "restart({i}) of a running ZooKeeper server: kill({i}) it first");
        self.servers[i].launch();
        if let Err(log) = self.servers[i].wait_serving() {
            panic!("{log}\n{}", self.describe(20));
        }
    }

    /// Whether server `i`'s process is alive.
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].is_running()
    }

    /// `leader` or `follower` if server `i` serves in a quorum now, `None` otherwise.
    pub fn mode(&self, i: usize) -> Option<String> {
        quorum_mode_at(self.servers[i].address)
    }

    /// The server that leads the quorum now, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..Self::SIZE).find(|&i| self.mode(i).as_deref() == Some("leader"))
    }

    /// How many client connections server `i` has now (`srvr`), 0 if it cannot be asked. The
    /// count includes the connection asking.
    pub fn connections(&self, i: usize) -> usize {
        four_letter_at(self.servers[i].address, "srvr")
            .and_then(|answer| {
                answer.lines().find_map(|line| line.strip_prefix("Connections: ")).and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The last `lines` lines of server `i`'s output.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.servers[i].log_tail(lines)
    }

    /// Every server's state and the last `lines` lines of its log, for a failure message.
    pub fn describe(&self, lines: usize) -> String {
        (0..Self::SIZE)
            .map(|i| {
                format!(
                    "--- ZooKeeper server {i} ({}, running: {}, mode: {:?}) ---\n{}",
                    self.servers[i].address,
                    self.is_running(i),
                    self.mode(i),
                    self.log_tail(i, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `127.0.0.1:PORT/chroot` (`chroot` may be empty or `/` for no chroot).
pub fn connect_string(port: u16, chroot: &str) -> String {
    connect_string_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), chroot)
}

/// `ADDRESS:PORT/chroot` (`chroot` may be empty or `/` for no chroot).
pub fn connect_string_at(address: SocketAddr, chroot: &str) -> String {
    format!("{address}{}", chroot_suffix(chroot))
}

/// What follows the hosts in a connect string for `chroot`: empty, or `/chroot`.
fn chroot_suffix(chroot: &str) -> String {
    let chroot = chroot.trim_end_matches('/');
    if chroot.is_empty() || chroot.starts_with('/') {
        chroot.to_string()
    } else {
        format!("/{chroot}")
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
    write_config_with(dir, address, TICK_MS, "");
}

/// Writes `dir/zoo.cfg` for a server with its data in `dir/data`, clients on `address`, ticks of
/// `tick_ms`, and `extra` lines (an ensemble's) at the end.
fn write_config_with(dir: &Path, address: SocketAddr, tick_ms: u32, extra: &str) {
    let (host, port) = (address.ip(), address.port());
    let data = dir.join("data");
    fs::create_dir_all(&data).expect("create the ZooKeeper data dir");
    let config = format!(
        "tickTime={tick_ms}\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress={host}\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=*\n\
         minSessionTimeout={}\n\
         maxSessionTimeout=60000\n\
         extendedTypesEnabled=true\n\
         {extra}",
        data.display(),
        2 * tick_ms,
    );
    let mut file = File::create(dir.join("zoo.cfg")).expect("create zoo.cfg");
    file.write_all(config.as_bytes()).expect("write zoo.cfg");
}

/// Launches `java ... MAIN_CLASS dir/zoo.cfg` (inside `netns` if given) from the launcher thread,
/// its output appended to `dir/zookeeper.log`, SIGKILLed by the kernel if the launcher goes away.
fn launch_java(netns: Option<&str>, dir: &Path, main_class: &str) -> Child {
    let log =
        OpenOptions::new().create(true).append(true).open(dir.join("zookeeper.log")).expect("open the ZooKeeper log");
    let mut cmd = match netns {
        None => Command::new("java"),
        // `ip netns exec` execs java in place: the child's pid is the JVM's.
        Some(netns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns, "java"]);
            cmd
        }
    };
    cmd.arg("-Xmx256m")
        .arg("-Dzookeeper.admin.enableServer=false")
        .arg("-cp")
        .arg(format!("{ZOOKEEPER_JAR}:{ZOOKEEPER_CONF_DIR}"))
        .arg(main_class)
        .arg(dir.join("zoo.cfg"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file handle"))
        .stderr(log);
    super::die_with_parent(&mut cmd);
    spawn_from_launcher(cmd).unwrap_or_else(|e| panic!("cannot launch java for ZooKeeper: {e}"))
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
    four_letter_at(addr, "ruok").as_deref() == Some("imok")
}

/// The answer of the server at `addr` to the four-letter word `word` (`ruok`, `srvr`, `cons`,
/// ...), or `None` if it cannot be reached or asked.
pub fn four_letter_at(addr: SocketAddr, word: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    stream.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    Some(answer)
}

/// `leader`, `follower` (or `observer`) if the ensemble member at `addr` serves in a quorum,
/// `None` if it cannot be reached or is not serving (it answers `srvr` with "This ZooKeeper
/// instance is not currently serving requests" then).
pub fn quorum_mode_at(addr: SocketAddr) -> Option<String> {
    let answer = four_letter_at(addr, "srvr")?;
    let mode = answer.lines().find_map(|line| line.strip_prefix("Mode: "))?.trim();
    matches!(mode, "leader" | "follower" | "observer").then(|| mode.to_string())
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
