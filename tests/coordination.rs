//! The conformance suite of [`Coordination`]: every case is written once, generic over a
//! [`Backend`], and runs against both implementations: the in-process [`EmbeddedServer`] (in memory, and
//! durable in a journal) and a
//! real ZooKeeper server (one shared per test binary, each case under its own chroot).
//!
//! Cases that stop or kill ZooKeeper use a private server; cases about the embedded test hooks
//! (`suspend`/`resume`) run on the embedded backend only.
//!
//! Timeouts here are guards against hangs only; every wait is on an event (a watch, a status
//! change, a call's answer).

mod common;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use task_center::coord::{
    CoordError, Coordination, CreateMode, EmbeddedCoordination, EmbeddedServer, EventKind, Op, OpResult, SessionState,
    SessionStatus, TreeWatch, Watch, WatchEvent, ZkConfig, ZkCoordination, MAX_DATA_BYTES,
};

use common::{init_tracing, shared_zk, step, unique_chroot, wait_status, within, Proxy, ZkServer};

/// Guard for a whole case.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Session timeout of handles whose session a case makes expire (ZooKeeper: through a proxy).
const EXPIRY_SESSION_TIMEOUT_MS: u64 = 2_000;

// ---------------------------------------------------------------------------------------------
// Backends

/// One session on the backend under test, and the hooks to break it.
struct Handle {
    coord: Arc<dyn Coordination>,
    faults: Faults,
}

enum Faults {
    Embedded(EmbeddedCoordination),
    Zk { proxy: Option<Proxy> },
}

impl std::ops::Deref for Handle {
    type Target = dyn Coordination;
    fn deref(&self) -> &(dyn Coordination + 'static) {
        &*self.coord
    }
}

impl Handle {
    /// Makes the session end from outside. Embedded: `expire()`, at once. ZooKeeper: the
    /// handle's proxy cuts it off, and the server expires the session after its timeout; call
    /// [`Handle::reconnect`] once that is seen (the ephemeral nodes are gone).
    fn cut_off(&self) {
        match &self.faults {
            Faults::Embedded(coord) => coord.expire(),
            Faults::Zk { proxy: Some(proxy) } => proxy.block(),
            Faults::Zk { proxy: None } => panic!("this handle was not connected with connect_expirable()"),
        }
    }

    /// Breaks the handle's connection without ending its session (embedded: `suspend()`;
    /// ZooKeeper: the proxy drops the connection). Needs a handle from `connect_flaky()`.
    fn disconnect(&self) {
        match &self.faults {
            Faults::Embedded(coord) => coord.suspend(),
            Faults::Zk { proxy: Some(proxy) } => proxy.block(),
            Faults::Zk { proxy: None } => panic!("this handle was not connected with connect_flaky()"),
        }
    }

    /// Ends a [`Handle::disconnect`].
    fn restore(&self) {
        match &self.faults {
            Faults::Embedded(coord) => coord.resume(),
            Faults::Zk { proxy: Some(proxy) } => proxy.unblock(),
            Faults::Zk { proxy: None } => panic!("this handle was not connected with connect_flaky()"),
        }
    }

    /// Lets a handle cut off by [`Handle::cut_off`] reach the service again.
    fn reconnect(&self) {
        if let Faults::Zk { proxy: Some(proxy) } = &self.faults {
            proxy.unblock();
        }
    }
}

/// A coordination service under test. All handles of one backend value see the same tree.
trait Backend {
    /// A new handle with default settings.
    async fn connect(&self) -> Handle;
    /// A new handle whose session [`Handle::cut_off`] can end.
    async fn connect_expirable(&self) -> Handle;
    /// A new handle whose connection [`Handle::disconnect`] can break while its session lives.
    async fn connect_flaky(&self) -> Handle;
}

struct Embedded {
    server: EmbeddedServer,
    /// The journal's directory, for the durable server.
    _dir: Option<tempfile::TempDir>,
}

impl Embedded {
    fn new() -> Self {
        init_tracing();
        Embedded { server: EmbeddedServer::new(), _dir: None }
    }

    /// A durable server (`EmbeddedServer::open`), journaling in a temporary directory.
    fn durable() -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        Embedded { server: EmbeddedServer::open(dir.path()).expect("open the journal"), _dir: Some(dir) }
    }
}

impl Backend for Embedded {
    async fn connect(&self) -> Handle {
        let coord = self.server.connect();
        Handle { coord: Arc::new(coord.clone()), faults: Faults::Embedded(coord) }
    }

    async fn connect_expirable(&self) -> Handle {
        self.connect().await
    }

    async fn connect_flaky(&self) -> Handle {
        self.connect().await
    }
}

struct Zookeeper {
    server: &'static ZkServer,
    chroot: String,
}

impl Zookeeper {
    fn new(case: &str) -> Self {
        init_tracing();
        Zookeeper { server: shared_zk(), chroot: unique_chroot(case) }
    }
}

async fn zk_connect(config: ZkConfig) -> ZkCoordination {
    let what = format!("connect to ZooKeeper at {}", config.connect);
    match step(&what, ZkCoordination::connect(config)).await {
        Ok(coord) => coord,
        Err(e) => panic!("{what}: {e}"),
    }
}

impl Backend for Zookeeper {
    async fn connect(&self) -> Handle {
        let coord = zk_connect(ZkConfig::new(self.server.connect_string(&self.chroot))).await;
        Handle { coord: Arc::new(coord), faults: Faults::Zk { proxy: None } }
    }

    async fn connect_expirable(&self) -> Handle {
        let proxy = Proxy::start(self.server.port());
        let mut config = ZkConfig::new(proxy.connect_string(&self.chroot));
        config.session_timeout_ms = EXPIRY_SESSION_TIMEOUT_MS;
        let coord = zk_connect(config).await;
        Handle { coord: Arc::new(coord), faults: Faults::Zk { proxy: Some(proxy) } }
    }

    async fn connect_flaky(&self) -> Handle {
        let proxy = Proxy::start(self.server.port());
        let mut config = ZkConfig::new(proxy.connect_string(&self.chroot));
        config.session_timeout_ms = 20_000;
        let coord = zk_connect(config).await;
        Handle { coord: Arc::new(coord), faults: Faults::Zk { proxy: Some(proxy) } }
    }
}

/// Instantiates each case for both backends (the embedded one in memory and durable).
macro_rules! conformance {
    ($($case:ident => $embedded:ident, $zookeeper:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            within(CASE_TIMEOUT, concat!("embedded ", stringify!($case)), $case(Embedded::new())).await;
            within(CASE_TIMEOUT, concat!("durable embedded ", stringify!($case)), $case(Embedded::durable())).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $zookeeper() {
            let backend = Zookeeper::new(stringify!($case));
            within(CASE_TIMEOUT, concat!("zookeeper ", stringify!($case)), $case(backend)).await;
        }
    )*};
}

conformance! {
    basics => embedded_basics, zookeeper_basics;
    errors => embedded_errors, zookeeper_errors;
    bad_paths => embedded_bad_paths, zookeeper_bad_paths;
    multi_failure_applies_nothing => embedded_multi_failure_applies_nothing, zookeeper_multi_failure_applies_nothing;
    multi_success => embedded_multi_success, zookeeper_multi_success;
    sequential_ordering => embedded_sequential_ordering, zookeeper_sequential_ordering;
    ephemeral_cleanup_on_close => embedded_ephemeral_cleanup_on_close, zookeeper_ephemeral_cleanup_on_close;
    ephemeral_cleanup_on_expiry => embedded_ephemeral_cleanup_on_expiry, zookeeper_ephemeral_cleanup_on_expiry;
    watches_fire_once => embedded_watches_fire_once, zookeeper_watches_fire_once;
    watches_see_other_sessions => embedded_watches_see_other_sessions, zookeeper_watches_see_other_sessions;
    tree_watch_in_order => embedded_tree_watch_in_order, zookeeper_tree_watch_in_order;
    tree_watch_survives_a_reconnect => embedded_tree_watch_survives_a_reconnect,
        zookeeper_tree_watch_survives_a_reconnect;
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn persistent() -> CreateMode {
    CreateMode::Persistent
}

fn event(kind: EventKind, path: &str) -> WatchEvent {
    WatchEvent { kind, path: path.to_string() }
}

/// The value of a call that must succeed.
#[track_caller]
fn ok<T>(what: &str, result: Result<T, CoordError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

/// The error of a call that must fail.
#[track_caller]
fn err<T: Debug>(what: &str, result: Result<T, CoordError>) -> CoordError {
    match result {
        Ok(value) => panic!("{what}: succeeded with {value:?}, expected an error"),
        Err(e) => e,
    }
}

async fn wait_event(what: &str, watch: Watch) -> WatchEvent {
    step(what, watch).await
}

async fn next_event(what: &str, tree: &mut TreeWatch) -> WatchEvent {
    match step(what, tree.next()).await {
        Some(event) => event,
        None => panic!("{what}: the tree watch ended"),
    }
}

async fn data_of(coord: &dyn Coordination, path: &str) -> Vec<u8> {
    ok(&format!("get {path}"), coord.get(path).await).0
}

/// Whether `name` ends in a 10-digit sequence number after `prefix`; returns the number.
#[track_caller]
fn sequence_number(path: &str, prefix: &str) -> u64 {
    let suffix = path.strip_prefix(prefix).unwrap_or_else(|| panic!("{path} does not start with {prefix}"));
    assert!(
        suffix.len() == 10 && suffix.bytes().all(|b| b.is_ascii_digit()),
        "{path}: sequence suffix {suffix:?} is not 10 digits"
    );
    suffix.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Cases

/// create, get, exists, set, children, delete: the values and the stats.
async fn basics(backend: impl Backend) {
    let c = backend.connect().await;
    assert_eq!(c.status(), SessionStatus { state: SessionState::Connected, generation: 1 });

    assert_eq!(ok("create /a", c.create("/a", b"one", persistent()).await), "/a");
    let (data, stat) = ok("get /a", c.get("/a").await);
    assert_eq!(data, b"one");
    assert_eq!((stat.version, stat.cversion, stat.num_children, stat.ephemeral_owner), (0, 0, 0, 0));
    assert_eq!(stat.czxid, stat.mzxid);
    assert!(stat.ctime_ms > 1_600_000_000_000, "ctime_ms {} is not Unix milliseconds", stat.ctime_ms);
    assert_eq!(ok("exists /a", c.exists("/a").await), Some(stat));
    assert_eq!(ok("exists /nothing", c.exists("/nothing").await), None);

    let set1 = ok("set /a", c.set("/a", b"two", None).await);
    assert_eq!(set1.version, 1);
    assert_eq!(set1.czxid, stat.czxid);
    assert!(set1.mzxid > stat.mzxid, "mzxid did not advance: {set1:?} after {stat:?}");
    let set2 = ok("set /a at version 1", c.set("/a", b"three", Some(1)).await);
    assert_eq!(set2.version, 2);
    assert_eq!(ok("get /a", c.get("/a").await), (b"three".to_vec(), set2));

    // Empty data, children listed by name and sorted, stats of the parent follow.
    ok("create /a/y", c.create("/a/y", b"", persistent()).await);
    ok("create /a/x", c.create("/a/x", b"x", persistent()).await);
    assert_eq!(data_of(&*c, "/a/y").await, b"");
    assert_eq!(ok("children /a", c.children("/a").await), ["x", "y"]);
    let parent = ok("get /a", c.get("/a").await).1;
    assert_eq!((parent.num_children, parent.cversion, parent.version), (2, 2, 2));

    ok("delete /a/x", c.delete("/a/x", None).await);
    ok("delete /a/y at version 0", c.delete("/a/y", Some(0)).await);
    assert_eq!(ok("children /a", c.children("/a").await), Vec::<String>::new());
    let parent = ok("get /a", c.get("/a").await).1;
    assert_eq!((parent.num_children, parent.cversion), (0, 4));
    ok("delete /a at version 2", c.delete("/a", Some(2)).await);
    assert_eq!(ok("exists /a", c.exists("/a").await), None);

    // A re-created node is a new node: versions restart, czxid tells them apart.
    ok("create /a again", c.create("/a", b"new", persistent()).await);
    let again = ok("get /a", c.get("/a").await).1;
    assert_eq!(again.version, 0);
    assert!(again.czxid > set2.mzxid, "czxid of the re-created node {again:?} is not newer than {set2:?}");

    // The largest node allowed is accepted, one byte more is refused and writes nothing.
    let big = vec![7u8; MAX_DATA_BYTES];
    ok("create /big", c.create("/big", &big, persistent()).await);
    assert_eq!(data_of(&*c, "/big").await.len(), MAX_DATA_BYTES);
    let too_big = vec![7u8; MAX_DATA_BYTES + 1];
    let e = err("set /big too large", c.set("/big", &too_big, None).await);
    assert!(
        matches!(e, CoordError::TooLarge { ref path, bytes } if path == "/big" && bytes == MAX_DATA_BYTES + 1),
        "{e:?}"
    );
    let e = err("create /huge", c.create("/huge", &too_big, persistent()).await);
    assert!(matches!(e, CoordError::TooLarge { .. }), "{e:?}");
    assert_eq!(ok("exists /huge", c.exists("/huge").await), None);
}

/// BadVersion (nothing written), NodeExists, NoNode, NotEmpty, NoChildrenForEphemerals.
async fn errors(backend: impl Backend) {
    let c = backend.connect().await;
    ok("create /v", c.create("/v", b"a", persistent()).await);
    ok("set /v at version 0", c.set("/v", b"b", Some(0)).await);

    let e = err("set /v at stale version 0", c.set("/v", b"c", Some(0)).await);
    assert_eq!(e, CoordError::BadVersion { path: "/v".into() });
    assert!(!e.is_transient());
    let (data, stat) = ok("get /v", c.get("/v").await);
    assert_eq!((data.as_slice(), stat.version), (&b"b"[..], 1), "a failed set changed the node");

    let e = err("delete /v at stale version 0", c.delete("/v", Some(0)).await);
    assert_eq!(e, CoordError::BadVersion { path: "/v".into() });
    assert_eq!(ok("get /v", c.get("/v").await), (b"b".to_vec(), stat), "a failed delete changed the node");

    let e = err("create /v twice", c.create("/v", b"z", persistent()).await);
    assert_eq!(e, CoordError::NodeExists { path: "/v".into() });
    assert_eq!(ok("get /v", c.get("/v").await), (b"b".to_vec(), stat), "a failed create changed the node");

    // NoNode: a missing parent for create, a missing node for everything else.
    let e = err("create /missing/child", c.create("/missing/child", b"", persistent()).await);
    assert_eq!(e, CoordError::NoNode { path: "/missing/child".into() });
    assert_eq!(ok("exists /missing", c.exists("/missing").await), None, "a failed create left a parent behind");
    let no_node = CoordError::NoNode { path: "/missing".into() };
    assert_eq!(err("get /missing", c.get("/missing").await), no_node);
    assert_eq!(err("get_watch /missing", c.get_watch("/missing").await.map(|(d, s, _)| (d, s))), no_node);
    assert_eq!(err("set /missing", c.set("/missing", b"", None).await), no_node);
    assert_eq!(err("delete /missing", c.delete("/missing", None).await), no_node);
    assert_eq!(err("children /missing", c.children("/missing").await), no_node);
    assert_eq!(err("children_watch /missing", c.children_watch("/missing").await.map(|(k, _)| k)), no_node);

    // NotEmpty.
    ok("create /v/child", c.create("/v/child", b"", persistent()).await);
    let e = err("delete /v with a child", c.delete("/v", None).await);
    assert_eq!(e, CoordError::NotEmpty { path: "/v".into() });
    assert_eq!(ok("children /v", c.children("/v").await), ["child"]);

    // NoChildrenForEphemerals, for plain and sequential children.
    ok("create ephemeral /e", c.create("/e", b"", CreateMode::Ephemeral).await);
    for mode in [CreateMode::Persistent, CreateMode::Ephemeral, CreateMode::PersistentSequential] {
        let e = err("create a child of an ephemeral", c.create("/e/child", b"", mode).await);
        assert!(matches!(e, CoordError::NoChildrenForEphemerals { .. }), "{mode:?}: {e:?}");
    }
    assert_eq!(ok("children /e", c.children("/e").await), Vec::<String>::new());
}

/// Malformed paths are refused by every call, before anything is written.
async fn bad_paths(backend: impl Backend) {
    let c = backend.connect().await;
    for path in ["", "a", "a/b", "/a/", "//a", "/a//b", "/a/../b", "/a/./b", "/.", "/a\u{1}"] {
        let is_bad = |e: CoordError| matches!(e, CoordError::BadPath { path: ref p, .. } if p == path);
        let what = |call: &str| format!("{call} {path:?}");
        assert!(is_bad(err(&what("create"), c.create(path, b"", persistent()).await)), "{}", what("create"));
        assert!(is_bad(err(&what("get"), c.get(path).await)), "{}", what("get"));
        assert!(is_bad(err(&what("exists"), c.exists(path).await)), "{}", what("exists"));
        assert!(is_bad(err(&what("set"), c.set(path, b"", None).await)), "{}", what("set"));
        assert!(is_bad(err(&what("delete"), c.delete(path, None).await)), "{}", what("delete"));
        assert!(is_bad(err(&what("children"), c.children(path).await)), "{}", what("children"));
        assert!(is_bad(err(&what("watch_tree"), c.watch_tree(path).await.map(|_| ()))), "{}", what("watch_tree"));
    }
    assert_eq!(ok("children /", c.children("/").await), Vec::<String>::new(), "a bad path created something");
}

/// A multi whose third operation fails applies nothing and names the failing index.
async fn multi_failure_applies_nothing(backend: impl Backend) {
    let c = backend.connect().await;
    ok("create /m", c.create("/m", b"", persistent()).await);
    ok("create /m/c", c.create("/m/c", b"c", persistent()).await);

    let ops = vec![
        Op::Create { path: "/m/a".into(), data: b"a".to_vec(), mode: persistent() },
        Op::Create { path: "/m/b".into(), data: b"b".to_vec(), mode: CreateMode::Ephemeral },
        Op::Check { path: "/m/c".into(), version: 5 },
        Op::Set { path: "/m/c".into(), data: b"x".to_vec(), expected: None },
    ];
    let e = err("multi failing at op 2", c.multi(ops).await);
    let CoordError::OpFailed { index, ref source } = e else { panic!("expected OpFailed, got {e:?}") };
    assert_eq!(index, 2, "{e:?}");
    assert_eq!(**source, CoordError::BadVersion { path: "/m/c".into() }, "{e:?}");
    assert_eq!(e.root(), &CoordError::BadVersion { path: "/m/c".into() });
    assert!(!e.is_transient());
    assert_eq!(ok("exists /m/a", c.exists("/m/a").await), None, "op 0 of a failed multi was applied");
    assert_eq!(ok("exists /m/b", c.exists("/m/b").await), None, "op 1 of a failed multi was applied");
    assert_eq!(ok("children /m", c.children("/m").await), ["c"]);
    let (data, stat) = ok("get /m/c", c.get("/m/c").await);
    assert_eq!((data.as_slice(), stat.version), (&b"c"[..], 0));

    // A write that precedes the failing op is rolled back too.
    let ops = vec![
        Op::Set { path: "/m/c".into(), data: b"y".to_vec(), expected: Some(0) },
        Op::Delete { path: "/m/c".into(), expected: None },
        Op::Create { path: "/m/c/under-deleted".into(), data: vec![], mode: persistent() },
    ];
    let e = err("multi failing at op 2 after a set and a delete", c.multi(ops).await);
    assert!(matches!(e, CoordError::OpFailed { index: 2, .. }), "{e:?}");
    assert!(matches!(e.root(), CoordError::NoNode { .. }), "{e:?}");
    assert_eq!(ok("get /m/c", c.get("/m/c").await), (b"c".to_vec(), stat), "a failed multi changed /m/c");

    let ops = vec![
        Op::Set { path: "/m/c".into(), data: b"y".to_vec(), expected: None },
        Op::Create { path: "/m/c".into(), data: vec![], mode: persistent() },
    ];
    let e = err("multi failing at op 1", c.multi(ops).await);
    assert!(matches!(e, CoordError::OpFailed { index: 1, .. }), "{e:?}");
    assert_eq!(e.root(), &CoordError::NodeExists { path: "/m/c".into() });
    assert_eq!(ok("get /m/c", c.get("/m/c").await), (b"c".to_vec(), stat), "a failed multi changed /m/c");
}

/// A successful multi returns one result per op, in order; later ops see earlier ones.
async fn multi_success(backend: impl Backend) {
    let c = backend.connect().await;
    ok("create /m", c.create("/m", b"", persistent()).await);
    ok("create /m/c", c.create("/m/c", b"c", persistent()).await);
    ok("create /m/d", c.create("/m/d", b"d", persistent()).await);

    let ops = vec![
        Op::Create { path: "/m/a".into(), data: b"a".to_vec(), mode: persistent() },
        Op::Create { path: "/m/s-".into(), data: b"s".to_vec(), mode: CreateMode::PersistentSequential },
        Op::Set { path: "/m/c".into(), data: b"x".to_vec(), expected: Some(0) },
        Op::Delete { path: "/m/d".into(), expected: Some(0) },
        Op::Check { path: "/m/c".into(), version: 1 },
        Op::Create { path: "/m/a/inner".into(), data: b"i".to_vec(), mode: persistent() },
    ];
    let results = ok("multi", c.multi(ops).await);
    assert_eq!(results.len(), 6, "{results:?}");
    assert_eq!(results[0], OpResult::Created("/m/a".into()));
    let OpResult::Created(ref sequential) = results[1] else { panic!("result 1: {results:?}") };
    sequence_number(sequential, "/m/s-");
    let OpResult::Set(set_stat) = results[2] else { panic!("result 2: {results:?}") };
    assert_eq!(set_stat.version, 1);
    assert_eq!(results[3], OpResult::Deleted);
    assert_eq!(results[4], OpResult::Checked);
    assert_eq!(results[5], OpResult::Created("/m/a/inner".into()));

    assert_eq!(ok("get /m/c", c.get("/m/c").await), (b"x".to_vec(), set_stat));
    assert_eq!(ok("exists /m/d", c.exists("/m/d").await), None);
    assert_eq!(data_of(&*c, sequential).await, b"s");
    assert_eq!(data_of(&*c, "/m/a/inner").await, b"i");
    let name = sequential.strip_prefix("/m/").unwrap().to_string();
    assert_eq!(ok("children /m", c.children("/m").await), vec!["a".to_string(), "c".into(), name]);
    assert_eq!(ok("empty multi", c.multi(vec![]).await), Vec::<OpResult>::new());
}

/// Concurrent sequential creates from two sessions get distinct 10-digit numbers, in the order
/// the service created them.
async fn sequential_ordering(backend: impl Backend) {
    let a = backend.connect().await;
    let b = backend.connect().await;
    ok("create /q", a.create("/q", b"", persistent()).await);

    let payloads: Vec<Vec<u8>> = (0..20).map(|i: i32| i.to_string().into_bytes()).collect();
    let creates = payloads.iter().enumerate().map(|(i, data)| {
        let handle = if i % 2 == 0 { &a } else { &b };
        handle.create("/q/n-", data, CreateMode::EphemeralSequential)
    });
    let paths: Vec<String> =
        step("20 concurrent creates", join_all(creates)).await.into_iter().map(|r| ok("create /q/n-", r)).collect();

    let numbers: BTreeSet<u64> = paths.iter().map(|p| sequence_number(p, "/q/n-")).collect();
    assert_eq!(numbers, (0..20).collect::<BTreeSet<u64>>(), "sequence numbers of a fresh parent: {paths:?}");

    let mut sorted = paths.clone();
    sorted.sort();
    let names: Vec<String> = sorted.iter().map(|p| p.strip_prefix("/q/").unwrap().to_string()).collect();
    assert_eq!(ok("children /q", b.children("/q").await), names);

    // Name order is creation order (czxid), and each node belongs to the session that made it.
    let mut last_czxid = i64::MIN;
    for path in &sorted {
        let (data, stat) = ok("get", a.get(path).await);
        assert!(stat.czxid > last_czxid, "{path} was created before the node named before it");
        last_czxid = stat.czxid;
        let index: usize = String::from_utf8(data).unwrap().parse().unwrap();
        assert_eq!(paths[index], *path);
        let owner = if index % 2 == 0 { a.session_id() } else { b.session_id() };
        assert_eq!(stat.ephemeral_owner, owner, "{path}");
    }

    // Numbers count creates, not deletes, and are never reused; cversion counts both.
    ok("delete the last", a.delete(&sorted[19], None).await);
    ok("delete the first", b.delete(&sorted[0], None).await);
    let next = ok("create /q/n- after deletes", a.create("/q/n-", b"", CreateMode::PersistentSequential).await);
    assert_eq!(sequence_number(&next, "/q/n-"), 20, "{next}");
    let parent = ok("exists /q", a.exists("/q").await).expect("/q exists");
    assert_eq!((parent.cversion, parent.num_children), (23, 19));
}

/// Closing a handle deletes its ephemeral nodes at once and ends the handle.
async fn ephemeral_cleanup_on_close(backend: impl Backend) {
    let a = backend.connect().await;
    let b = backend.connect().await;
    assert_ne!(a.session_id(), b.session_id());
    ok("create /e", a.create("/e", b"mine", CreateMode::Ephemeral).await);
    ok("create /p", a.create("/p", b"", persistent()).await);
    let sequential = ok("create /p/s-", a.create("/p/s-", b"", CreateMode::EphemeralSequential).await);
    let (stat, deleted) = ok("exists_watch /e", b.exists_watch("/e").await);
    assert_eq!(stat.expect("/e exists").ephemeral_owner, a.session_id());
    let (_, children_changed) = ok("children_watch /p", b.children_watch("/p").await);

    step("close", a.close()).await;
    assert_eq!(wait_event("B's watch on /e", deleted).await, event(EventKind::Deleted, "/e"));
    assert_eq!(wait_event("B's watch on /p", children_changed).await, event(EventKind::ChildrenChanged, "/p"));
    assert_eq!(ok("exists /e", b.exists("/e").await), None);
    assert_eq!(ok("exists sequential", b.exists(&sequential).await), None);
    assert!(ok("exists /p", b.exists("/p").await).is_some(), "a persistent node went with its session");

    assert_eq!(a.status().state, SessionState::Closed);
    assert_eq!(err("get after close", a.get("/p").await), CoordError::Closed);
    assert_eq!(err("create after close", a.create("/x", b"", persistent()).await), CoordError::Closed);
    assert_eq!(err("set after close", a.set("/p", b"", None).await), CoordError::Closed);
    assert_eq!(err("exists_watch after close", a.exists_watch("/p").await.map(|(s, _)| s)), CoordError::Closed);
    assert!(!CoordError::Closed.is_transient());
    step("close twice", a.close()).await;
}

/// An expired session loses its ephemeral nodes and watches; the handle builds a new session.
async fn ephemeral_cleanup_on_expiry(backend: impl Backend) {
    let a = backend.connect_expirable().await;
    let b = backend.connect().await;
    let mut status = a.subscribe();
    assert_eq!(*status.borrow(), SessionStatus { state: SessionState::Connected, generation: 1 });
    let first_session = a.session_id();

    ok("create /e", a.create("/e", b"", CreateMode::Ephemeral).await);
    ok("create /w", a.create("/w", b"", persistent()).await);
    let (_, _, data_watch) = ok("get_watch /w", a.get_watch("/w").await);
    let (_, absent_watch) = ok("exists_watch /absent", a.exists_watch("/absent").await);
    let (_, children_watch) = ok("children_watch /w", a.children_watch("/w").await);
    let (stat, deleted) = ok("B's exists_watch /e", b.exists_watch("/e").await);
    assert_eq!(stat.expect("/e exists").ephemeral_owner, first_session);

    a.cut_off();
    assert_eq!(
        within(Duration::from_secs(30), "B sees A's ephemeral go", deleted).await,
        event(EventKind::Deleted, "/e")
    );
    a.reconnect();
    let now =
        wait_status(&mut status, Duration::from_secs(30), |s| s.state == SessionState::Connected && s.generation >= 2)
            .await;
    assert_eq!(now.generation, 2, "one expiry, one new session");
    assert_ne!(a.session_id(), first_session, "the new session has a new id");

    let lost = event(EventKind::SessionLost, "");
    assert_eq!(wait_event("A's data watch", data_watch).await, lost);
    assert_eq!(wait_event("A's exists watch", absent_watch).await, lost);
    assert_eq!(wait_event("A's children watch", children_watch).await, lost);

    assert_eq!(ok("exists /e", a.exists("/e").await), None);
    ok("create /e again", a.create("/e", b"", CreateMode::Ephemeral).await);
    let stat = ok("B's exists /e", b.exists("/e").await).expect("/e exists again");
    assert_eq!(stat.ephemeral_owner, a.session_id());
}

/// One-shot watches resolve once, at the first change; a second change needs a new watch.
async fn watches_fire_once(backend: impl Backend) {
    let c = backend.connect().await;
    ok("create /w", c.create("/w", b"0", persistent()).await);

    let (data, _, first) = ok("get_watch /w", c.get_watch("/w").await);
    assert_eq!(data, b"0");
    let (_, _, twin) = ok("second get_watch /w", c.get_watch("/w").await);
    ok("set /w 1", c.set("/w", b"1", None).await);
    ok("set /w 2", c.set("/w", b"2", None).await);
    assert_eq!(wait_event("data watch", first).await, event(EventKind::DataChanged, "/w"));
    assert_eq!(wait_event("second data watch", twin).await, event(EventKind::DataChanged, "/w"));

    // A new watch, set after both writes, has seen nothing of them: after a later event of the
    // same session has arrived, it is still pending.
    let (data, _, second) = ok("get_watch /w again", c.get_watch("/w").await);
    assert_eq!(data, b"2");
    let mut second = Box::pin(second);
    let (_, barrier) = ok("exists_watch /barrier", c.exists_watch("/barrier").await);
    ok("create /barrier", c.create("/barrier", b"", persistent()).await);
    assert_eq!(wait_event("barrier", barrier).await, event(EventKind::Created, "/barrier"));
    assert_eq!((&mut second).now_or_never(), None, "a watch set after two writes fired without a change");
    ok("set /w 3", c.set("/w", b"3", None).await);
    assert_eq!(step("second data watch", &mut second).await, event(EventKind::DataChanged, "/w"));

    // exists_watch on an existing node fires on data change; get_watch on deletion.
    let (_, on_data) = ok("exists_watch /w", c.exists_watch("/w").await);
    ok("set /w 4", c.set("/w", b"4", None).await);
    assert_eq!(wait_event("exists watch on data", on_data).await, event(EventKind::DataChanged, "/w"));
    let (_, _, on_delete) = ok("get_watch /w", c.get_watch("/w").await);
    ok("delete /w", c.delete("/w", None).await);
    assert_eq!(wait_event("data watch on delete", on_delete).await, event(EventKind::Deleted, "/w"));

    // Children watches: a create fires ChildrenChanged once; data changes of a child do not.
    ok("create /p", c.create("/p", b"", persistent()).await);
    let (kids, children) = ok("children_watch /p", c.children_watch("/p").await);
    assert!(kids.is_empty());
    ok("create /p/k", c.create("/p/k", b"", persistent()).await);
    assert_eq!(wait_event("children watch", children).await, event(EventKind::ChildrenChanged, "/p"));
    let (kids, children) = ok("children_watch /p", c.children_watch("/p").await);
    assert_eq!(kids, ["k"]);
    let mut children = Box::pin(children);
    ok("set /p/k", c.set("/p/k", b"data", None).await);
    ok("set /p", c.set("/p", b"data", None).await);
    let (_, barrier) = ok("exists_watch /barrier", c.exists_watch("/barrier").await);
    ok("delete /barrier", c.delete("/barrier", None).await);
    assert_eq!(wait_event("barrier", barrier).await, event(EventKind::Deleted, "/barrier"));
    assert_eq!((&mut children).now_or_never(), None, "a children watch fired on a data change");
    ok("delete /p/k", c.delete("/p/k", None).await);
    assert_eq!(step("children watch on delete", &mut children).await, event(EventKind::ChildrenChanged, "/p"));

    // exists_watch on a missing node fires at its creation.
    let (stat, created) = ok("exists_watch /x", c.exists_watch("/x").await);
    assert_eq!(stat, None);
    ok("create /x", c.create("/x", b"", persistent()).await);
    assert_eq!(wait_event("exists watch", created).await, event(EventKind::Created, "/x"));
}

/// Watches fire on changes made by other sessions.
async fn watches_see_other_sessions(backend: impl Backend) {
    let c = backend.connect().await;
    let other = backend.connect().await;
    ok("create /p", other.create("/p", b"", persistent()).await);

    let (stat, created) = ok("exists_watch /p/x", c.exists_watch("/p/x").await);
    assert_eq!(stat, None);
    let (_, children) = ok("children_watch /p", c.children_watch("/p").await);
    ok("other creates /p/x", other.create("/p/x", b"1", persistent()).await);
    assert_eq!(wait_event("exists watch", created).await, event(EventKind::Created, "/p/x"));
    assert_eq!(wait_event("children watch", children).await, event(EventKind::ChildrenChanged, "/p"));

    let (_, _, changed) = ok("get_watch /p/x", c.get_watch("/p/x").await);
    ok("other sets /p/x", other.set("/p/x", b"2", None).await);
    assert_eq!(wait_event("data watch", changed).await, event(EventKind::DataChanged, "/p/x"));
    assert_eq!(data_of(&*c, "/p/x").await, b"2");

    let (_, _, deleted) = ok("get_watch /p/x", c.get_watch("/p/x").await);
    let (_, parent_deleted) = ok("children_watch /p/x", c.children_watch("/p/x").await);
    ok("other deletes /p/x", other.delete("/p/x", None).await);
    assert_eq!(wait_event("data watch", deleted).await, event(EventKind::Deleted, "/p/x"));
    assert_eq!(
        wait_event("children watch of the deleted node", parent_deleted).await,
        event(EventKind::Deleted, "/p/x")
    );
}

/// A tree watch sees every create, data change and delete below its path, in order, and
/// nothing outside it.
async fn tree_watch_in_order(backend: impl Backend) {
    let c = backend.connect().await;
    let other = backend.connect().await;
    let mut tree = ok("watch_tree /t", c.watch_tree("/t").await);

    ok("create /t", other.create("/t", b"", persistent()).await);
    ok("create /tt (outside /t)", other.create("/tt", b"", persistent()).await);
    ok("create /t/a", other.create("/t/a", b"1", persistent()).await);
    ok("set /t/a", other.set("/t/a", b"2", None).await);
    ok("set /tt (outside /t)", other.set("/tt", b"2", None).await);
    ok("create /t/a/b", other.create("/t/a/b", b"", persistent()).await);
    ok("delete /t/a/b", other.delete("/t/a/b", None).await);
    ok("set /t/a by the watcher", c.set("/t/a", b"3", None).await);
    ok("delete /t/a", other.delete("/t/a", None).await);
    ok("delete /t", other.delete("/t", None).await);

    let expected = [
        event(EventKind::Created, "/t"),
        event(EventKind::Created, "/t/a"),
        event(EventKind::DataChanged, "/t/a"),
        event(EventKind::Created, "/t/a/b"),
        event(EventKind::Deleted, "/t/a/b"),
        event(EventKind::DataChanged, "/t/a"),
        event(EventKind::Deleted, "/t/a"),
        event(EventKind::Deleted, "/t"),
    ];
    let mut seen = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        let got = next_event(&format!("tree event {i}"), &mut tree).await;
        seen.push(got.clone());
        assert_eq!(&got, want, "tree events so far: {seen:?}");
    }
    // Nothing else was queued: the next event is the one for the next write.
    ok("create /t again", other.create("/t", b"", persistent()).await);
    assert_eq!(next_event("tree event after", &mut tree).await, event(EventKind::Created, "/t"));
}

/// A connection lost and restored within the session: the tree watch says `Resync` (events may
/// have been missed) and then goes on delivering events of the same session.
async fn tree_watch_survives_a_reconnect(backend: impl Backend) {
    let c = backend.connect_flaky().await;
    let other = backend.connect().await;
    let mut tree = ok("watch_tree /t", c.watch_tree("/t").await);
    ok("create /t", other.create("/t", b"", persistent()).await);
    assert_eq!(next_event("before", &mut tree).await, event(EventKind::Created, "/t"));
    let mut status = c.subscribe();
    let generation = c.status().generation;

    c.disconnect();
    wait_status(&mut status, Duration::from_secs(20), |s| s.state == SessionState::Suspended).await;
    ok("create /t/missed while cut off", other.create("/t/missed", b"", persistent()).await);
    c.restore();
    wait_status(&mut status, Duration::from_secs(20), |s| s.state == SessionState::Connected).await;
    assert_eq!(c.status().generation, generation, "the same session");

    // Whatever the reconnect delivers, a Resync is among it before the next live event.
    let mut resynced = false;
    ok("create /t/after", other.create("/t/after", b"", persistent()).await);
    loop {
        let got = next_event("after the reconnect", &mut tree).await;
        match got.kind {
            EventKind::Resync => resynced = true,
            EventKind::Created if got.path == "/t/after" => break,
            EventKind::Created if got.path == "/t/missed" => {}
            _ => panic!("unexpected event {got:?}"),
        }
    }
    assert!(resynced, "a reconnect is announced as Resync");
    ok("set /t/after", other.set("/t/after", b"x", None).await);
    assert_eq!(next_event("still following", &mut tree).await, event(EventKind::DataChanged, "/t/after"));
}

// ---------------------------------------------------------------------------------------------
// ZooKeeper only: the server goes away and comes back within the session timeout.

async fn zookeeper_outage(case: &str, kill: bool) {
    init_tracing();
    let server = ZkServer::start();
    let mut config = ZkConfig::new(server.connect_string(&unique_chroot(case)));
    config.session_timeout_ms = 10_000;
    config.operation_timeout_ms = 2_000;
    let operation_timeout = Duration::from_millis(config.operation_timeout_ms);
    let c = zk_connect(config).await;
    let mut status = c.subscribe();
    let before = c.status();
    assert_eq!(before.state, SessionState::Connected);
    let session = c.session_id();
    ok("create /data", c.create("/data", b"kept", persistent()).await);
    ok("create /eph", c.create("/eph", b"", CreateMode::Ephemeral).await);

    if kill {
        server.kill();
    } else {
        server.stop();
    }
    wait_status(&mut status, Duration::from_secs(20), |s| s.state == SessionState::Suspended).await;
    let started = Instant::now();
    let e = err("get while ZooKeeper is down", step("get /data", c.get("/data")).await);
    let took = started.elapsed();
    assert!(e.is_transient(), "not transient: {e:?}");
    assert!(
        took <= operation_timeout + Duration::from_secs(1),
        "failed after {took:?}, more than the operation timeout"
    );
    assert_eq!(c.status().generation, before.generation);

    server.restart();
    let after = wait_status(&mut status, Duration::from_secs(20), |s| s.state != SessionState::Suspended).await;
    assert_eq!(after, SessionStatus { state: SessionState::Connected, generation: before.generation });
    assert_eq!(c.session_id(), session, "the session survived");
    assert_eq!(data_of(&c, "/data").await, b"kept");
    let eph = ok("exists /eph", c.exists("/eph").await).expect("the session's ephemeral node survived");
    assert_eq!(eph.ephemeral_owner, session);
    step("close", c.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_server_stop_and_restart() {
    within(CASE_TIMEOUT, "server stop and restart", zookeeper_outage("server-stop", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_server_kill_and_restart() {
    within(CASE_TIMEOUT, "server kill and restart", zookeeper_outage("server-kill", true)).await;
}

// ---------------------------------------------------------------------------------------------
// Embedded only: the suspend/resume test hooks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_suspend_and_resume() {
    init_tracing();
    let server = EmbeddedServer::new();
    let a = server.connect();
    let other = server.connect();
    ok("create /r", a.create("/r", b"", persistent()).await);
    let mut tree = ok("watch_tree /r", a.watch_tree("/r").await);
    let mut status = a.subscribe();
    let before = a.status();
    let session = a.session_id();

    a.suspend();
    assert_eq!(a.status(), SessionStatus { state: SessionState::Suspended, generation: before.generation });
    wait_status(&mut status, Duration::from_secs(5), |s| s.state == SessionState::Suspended).await;
    assert_eq!(err("get while suspended", a.get("/r").await), CoordError::ConnectionLoss);
    assert_eq!(err("create while suspended", a.create("/r/mine", b"", persistent()).await), CoordError::ConnectionLoss);
    ok("other creates /r/x meanwhile", other.create("/r/x", b"", persistent()).await);

    a.resume();
    let after = wait_status(&mut status, Duration::from_secs(5), |s| s.state != SessionState::Suspended).await;
    assert_eq!(after, SessionStatus { state: SessionState::Connected, generation: before.generation });
    assert_eq!(a.session_id(), session);
    loop {
        let got = next_event("tree watch after resume", &mut tree).await;
        match got.kind {
            EventKind::Resync => break,
            EventKind::SessionLost => panic!("the tree watch lost its session over a suspend"),
            _ => {}
        }
    }
    assert!(ok("exists /r/x", a.exists("/r/x").await).is_some());
    assert_eq!(ok("exists /r/mine", a.exists("/r/mine").await), None, "a write refused while suspended landed");
}

// ---------------------------------------------------------------------------------------------
// The harness itself.

#[test]
fn harness_zookeeper_lifecycle() {
    use common::zk::ruok;
    let server = ZkServer::start();
    assert!(server.is_running() && ruok(server.port()));
    server.stop();
    assert!(!server.is_running() && !ruok(server.port()));
    server.restart();
    assert!(server.is_running() && ruok(server.port()));
    server.kill();
    assert!(!server.is_running() && !ruok(server.port()));
    server.restart();
    assert!(ruok(server.port()));
    assert_eq!(server.connect_string("/tc/x"), format!("127.0.0.1:{}/tc/x", server.port()));
    let dir = server.dir().to_path_buf();
    drop(server);
    assert!(!dir.exists(), "the server's temp dir outlived it");
}

#[test]
fn harness_proxy_blocks_and_unblocks() {
    use common::zk::ruok;
    let server = shared_zk();
    let proxy = Proxy::start(server.port());
    assert!(ruok(proxy.port()));
    // An open connection is closed by block(): the peer reads end of stream.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    proxy.block();
    let mut buf = [0u8; 8];
    let read = std::io::Read::read(&mut open, &mut buf);
    let closed = match &read {
        Ok(n) => *n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "a blocked proxy kept a connection open: {read:?}");
    proxy.unblock();
    assert!(ruok(proxy.port()));
    proxy.block();
    assert!(!ruok(proxy.port()));
    proxy.unblock();
    assert!(ruok(proxy.port()));
    assert_ne!(unique_chroot("x"), unique_chroot("x"));
}
