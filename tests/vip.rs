//! The VIPs of a real cluster (invariant 7 and ZBS-13104), in network namespaces these tests
//! create and always remove (never the host's own): task servers as separate processes, each in
//! its own namespace, and a real ZooKeeper, all joined by a bridge.
//!
//! The site: a [`Lab`] of three hosts, `n1` and `n2` (task servers listening on
//! 198.51.100.10:7400 and 198.51.100.11:7400) and `obs`, an observer (198.51.100.12); ZooKeeper
//! runs in the switch namespace and listens on 198.51.100.2:2181, an address on the bridge. The
//! test talks to the cluster with the `taskctl` binary run inside `obs`, reads addresses with
//! `ip -j addr` in the nodes' namespaces and neighbour entries with `ip -j neigh` in `obs`, and
//! records the announcements reaching `obs` on a packet socket ([`AnnouncementCapture`]).
//!
//! The observer learns a VIP by sending it a datagram (the kernel resolves the address as it
//! would for a ping; `ping` itself is not installed on the test machines), so it holds an entry
//! that a new leader's announcement must *update*: that needs no sysctl (see `tests/net.rs`).
//!
//! Waits follow events where there are some: a node's stderr lines as it writes them (it says
//! when it wins the election, places, moves or cannot place a VIP) and the frames the capture
//! reads. The kernel's address and neighbour tables give the test no event, so they are polled
//! (every 100 ms for addresses, 20 ms for neighbours), always under a time limit.
//!
//! Timing figures are printed (`cargo test --test vip -- --nocapture` shows them): the time from
//! the leader's SIGKILL to the new leadership and to the new leader's first gratuitous ARP, and
//! from the new leadership to the observer's updated entry.
//!
//! Needs root, iproute2, Java and Debian's `zookeeper` (`scripts/test.sh` installs them), and the
//! example binaries (`cargo build --examples`).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::netns::{AnnouncementCapture, Lab, Netns};
use common::node::{example_binary, NodeConfig, NodeProcess};
use common::ZkServer;
use serde_json::Value;

/// The cluster secret every node and `taskctl` share.
const SECRET: &str = "vip-test-secret-0123456789abcdef";
/// ZooKeeper's address, on the bridge of the switch namespace.
const ZK_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const ZK_PORT: u16 = 2181;
/// The port every node listens on, on its host's address.
const NODE_PORT: u16 = 7400;
/// Lab host indices.
const N1: usize = 0;
const N2: usize = 1;
const OBS: usize = 2;

/// The service of scenarios 1 to 4, one address of each family.
const SERVICE: &str = "web";
const VIP4: &str = "198.51.100.100";
const VIP6: &str = "2001:db8::100";
/// A VIP that only an interface of n2 (`x0`, 203.0.113.1/24) can hold.
const EDGE_VIP: &str = "203.0.113.77";

/// The nodes' settings: short, so that the scenarios are quick.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const ARP_ROUNDS: u32 = 6;
const ARP_INTERVAL: Duration = Duration::from_millis(1_000);
const SESSION_MS: u64 = 4_000;

/// Allowance for scheduling on a loaded machine, on top of a bound the design sets.
const SLACK: Duration = Duration::from_millis(1_000);
/// Hang guard of one wait (an election after a session expiry is well within it).
const WAIT: Duration = Duration::from_secs(20);
/// How often the kernel's address table is read while waiting on it.
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The site

/// The lab and its ZooKeeper. Fields drop in order: ZooKeeper is killed before the namespaces
/// go. (Nodes are the tests' locals, declared after the site, so they are killed first.)
struct Site {
    zk: ZkServer,
    lab: Lab,
}

impl Site {
    /// Builds the lab (`prefix` names its namespaces) and starts ZooKeeper in the switch.
    fn new(prefix: &str) -> Site {
        tokio::task::block_in_place(|| {
            let lab = Lab::new(prefix, 3);
            lab.switch.ip(&["addr", "add", &format!("{ZK_HOST}/24"), "dev", "br0"]);
            let zk = ZkServer::start_in_netns(lab.switch.name(), SocketAddr::from((ZK_HOST, ZK_PORT)));
            Site { zk, lab }
        })
    }

    fn host(&self, i: usize) -> &Netns {
        &self.lab.hosts[i].netns
    }

    /// How node `id` runs on host `i`.
    fn node_config(&self, i: usize, id: &str) -> NodeConfig {
        NodeConfig {
            netns: Some(self.host(i).name().to_string()),
            listen: Some(format!("{}:{NODE_PORT}", self.lab.hosts[i].ipv4)),
            session_timeout_ms: Some(SESSION_MS),
            sim_steps: Some(1),
            vip_check_interval_ms: Some(CHECK_INTERVAL.as_millis() as u64),
            arp_rounds: Some(ARP_ROUNDS),
            arp_interval_ms: Some(ARP_INTERVAL.as_millis() as u64),
            ..NodeConfig::new(id, self.zk.connect_string("/vip-test"), SECRET)
        }
    }

    /// Starts node `id` on host `i` and waits until it serves.
    async fn start_node(&self, i: usize, id: &str) -> NodeProcess {
        NodeProcess::start(&self.node_config(i, id)).await
    }

    /// `taskctl --node NODE ARGS...` run inside the observer's namespace.
    fn run_taskctl(&self, node: &NodeProcess, args: &[&str]) -> std::process::Output {
        let binary = example_binary("taskctl");
        tokio::task::block_in_place(|| {
            Command::new("ip")
                .args(["netns", "exec", self.host(OBS).name()])
                .arg(&binary)
                .args(["--node", node.address(), "--timeout-ms", "20000"])
                .args(args)
                .env("TASK_CENTER_SECRET", SECRET)
                .output()
                .expect("run taskctl")
        })
    }

    /// `taskctl ARGS...` through `node`: its stdout, or its exit status and stderr.
    fn taskctl(&self, node: &NodeProcess, args: &[&str]) -> Result<String, String> {
        let output = self.run_taskctl(node, args);
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!("taskctl {args:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// `taskctl ARGS...` through `node`, with its stdout and stderr; panics if it fails.
    fn taskctl_both(&self, node: &NodeProcess, args: &[&str]) -> (String, String) {
        let output = self.run_taskctl(node, args);
        let (out, err) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(output.status.success(), "taskctl {args:?} failed ({}): {err}", output.status);
        (out, err)
    }

    /// `vip`'s entry in `taskctl --json vip list` (through `node`): its holders and state.
    fn vip_state(&self, node: &NodeProcess, vip: &str) -> (Vec<String>, String, Vec<String>) {
        let out = self.taskctl(node, &["--json", "vip", "list"]).unwrap_or_else(|e| panic!("{e}"));
        let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("vip list --json: {e}: {out}"));
        let entry = list
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|service| service["addresses"].as_array().cloned().unwrap_or_default())
            .find(|a| a["address"] == vip)
            .unwrap_or_else(|| panic!("{vip} is not listed: {out}"));
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
        };
        (strings(&entry["holders"]), entry["state"].as_str().unwrap_or_default().to_string(), strings(&entry["notes"]))
    }

    /// Polls `vip list` until `vip`'s state is `state`.
    async fn await_vip_state(&self, node: &NodeProcess, vip: &str, state: &str, limit: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let (holders, seen, notes) = self.vip_state(node, vip);
            if seen == state {
                return notes;
            }
            assert!(
                start.elapsed() < limit,
                "{vip}: state {seen:?} (holders {holders:?}), not {state:?}, after {limit:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// n1 started alone (so it leads), then n2; the service's IPv4 VIP placed on n1's eth0.
    async fn leader_and_follower(&self) -> (NodeProcess, NodeProcess) {
        let n1 = self.start_node(N1, "n1").await;
        n1.wait_stderr(0, &["won the election"], WAIT).await;
        let n2 = self.start_node(N2, "n2").await;
        self.set_vip(&n1, SERVICE, &[VIP4]);
        await_holders(self.host(N1), VIP4, &on_eth0(24), WAIT).await;
        (n1, n2)
    }

    /// `taskctl vip set SERVICE ADDRESSES...` through `node`.
    fn set_vip(&self, node: &NodeProcess, service: &str, addresses: &[&str]) {
        let mut args = vec!["vip", "set", service];
        args.extend_from_slice(addresses);
        self.taskctl(node, &args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The holder of `service`'s VIPs as `taskctl --json vip list` (asked through `node`) shows
    /// it, with the service's addresses.
    fn vip_holder(&self, node: &NodeProcess, service: &str) -> (Option<String>, Vec<String>) {
        let out = self.taskctl(node, &["--json", "vip", "list"]).unwrap_or_else(|e| panic!("{e}"));
        let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("vip list --json: {e}: {out}"));
        let entry = list
            .as_array()
            .and_then(|all| all.iter().find(|v| v["config"]["service"] == service))
            .unwrap_or_else(|| panic!("service {service} is not listed: {out}"));
        let addresses = entry["config"]["addresses"].as_array().cloned().unwrap_or_default();
        (
            entry["holder"].as_str().map(str::to_string),
            addresses.iter().filter_map(|a| a.as_str().map(str::to_string)).collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Observing the kernel and the logs

/// Where host `ns` holds `vip`: (interface, prefix length) per holding interface.
fn holders(ns: &Netns, vip: &str) -> Vec<(String, u8)> {
    tokio::task::block_in_place(|| ns.holders(vip))
}

/// `vip` held on eth0 with `prefix_len`, and nowhere else.
fn on_eth0(prefix_len: u8) -> Vec<(String, u8)> {
    vec![("eth0".to_string(), prefix_len)]
}

/// Polls `ip -j addr` in `ns` every [`POLL`] until `vip`'s holders are `expected`; returns how
/// long that took. The kernel's address table gives the test no event to wait on (the nodes'
/// logs do, but they would only repeat what the node believes), so this reads the truth as a
/// neighbour would see it, under the time limit `limit`.
async fn await_holders(ns: &Netns, vip: &str, expected: &[(String, u8)], limit: Duration) -> Duration {
    poll_holders(ns, vip, expected, limit).await.unwrap_or_else(|error| panic!("{error}"))
}

/// [`await_holders`], with the failure as an error.
async fn poll_holders(ns: &Netns, vip: &str, expected: &[(String, u8)], limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let seen = holders(ns, vip);
        if seen == expected {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(format!("{vip} in {}: expected on {expected:?} within {limit:?}, seen on {seen:?}", ns.name()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Makes the observer resolve `vip` (one datagram) and checks that its entry maps it to `mac`.
fn learn(obs: &Netns, vip: &str, mac: &str) {
    tokio::task::block_in_place(|| {
        obs.send_datagram(vip.parse().expect("an address"));
        let seen = obs.wait_neighbour("eth0", vip, mac, Duration::from_secs(3));
        assert_eq!(seen.as_deref(), Some(mac), "the observer resolved {vip} to the holder's MAC");
    });
}

/// Polls the observer's neighbour table (every 20 ms: no event either) until `vip` maps to `mac`;
/// returns when it saw that, or panics after `limit` with the entry it saw.
fn await_neighbour(obs: &Netns, vip: &str, mac: &str, limit: Duration) -> SystemTime {
    let seen = tokio::task::block_in_place(|| obs.wait_neighbour("eth0", vip, mac, limit));
    assert_eq!(seen.as_deref(), Some(mac), "the observer's entry for {vip} within {limit:?}");
    SystemTime::now()
}

/// The time a node's log line was written: its leading RFC 3339 timestamp (tracing's format),
/// or now if it has none.
fn logged_at(line: &str) -> SystemTime {
    line.split_whitespace()
        .next()
        .and_then(|stamp| stamp.parse::<jiff::Timestamp>().ok())
        .map_or_else(SystemTime::now, SystemTime::from)
}

/// Milliseconds from `from` to `to` (negative if `to` is earlier).
fn ms(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Waits for the first announcement of `vip` from `mac` read at or after `since`.
async fn await_announcement(
    capture: &mut AnnouncementCapture,
    vip: &str,
    mac: &str,
    since: SystemTime,
    limit: Duration,
) -> SystemTime {
    let vip: IpAddr = vip.parse().expect("an address");
    let seen = capture.wait(limit, |a| a.address == vip && a.mac == mac && a.at >= since).await;
    match seen {
        Some(announcement) => announcement.at,
        None => panic!("no announcement of {vip} from {mac} within {limit:?}; seen: {:#?}", capture.seen()),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Scenarios 1 to 4 of the issue, and a graceful hand-over, on one cluster of two nodes:
/// 1. the VIP (one IPv4 and one IPv6 address) is on the leader only, `taskctl vip list` shows the
///    leader as holder, and the observer maps the VIP to the leader's MAC;
/// 2. the leader is SIGKILLed: the other node leads and holds the VIP, announces it, and the
///    observer's entry follows within one ARP interval of the new leadership; the killed node,
///    restarted with its data, comes back as a follower and removes the VIP it still held;
/// 3. the VIP deleted by hand on the leader is back within the check interval;
/// 4. the VIP put on a wrong interface of the leader is moved back to eth0 within the check
///    interval;
/// and then the leader stopped with SIGTERM removes the VIP on its way out, and the other node
/// takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vip_follows_the_leader_and_the_neighbours_follow_the_vip() {
    let started = Instant::now();
    let site = Site::new("vip");
    let (n1_ns, n2_ns, obs) = (site.host(N1), site.host(N2), site.host(OBS));
    let (n1_mac, n2_mac) = (n1_ns.mac("eth0"), n2_ns.mac("eth0"));

    // 1. The VIP on the leader only. n1 starts alone, so it leads.
    let mut n1 = site.start_node(N1, "n1").await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let mut n2 = site.start_node(N2, "n2").await;
    // Through the follower: it forwards to the leader.
    site.set_vip(&n2, SERVICE, &[VIP4, VIP6]);
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n1_ns, VIP6, &on_eth0(64), WAIT).await;
    assert_eq!(
        site.vip_holder(&n2, SERVICE),
        (Some("n1".to_string()), vec![VIP4.to_string(), VIP6.to_string()]),
        "vip list shows the leader as the holder"
    );
    learn(obs, VIP4, &n1_mac);
    learn(obs, VIP6, &n1_mac);
    // Two checks later, still on the leader only.
    tokio::time::sleep(2 * CHECK_INTERVAL).await;
    for vip in [VIP4, VIP6] {
        assert_eq!(holders(n2_ns, vip), vec![], "the follower never holds {vip}");
    }
    assert_eq!(holders(n1_ns, VIP4), on_eth0(24));

    // 2. SIGKILL the leader.
    let mut capture = obs.capture_announcements("eth0");
    let n2_mark = n2.stderr_mark();
    let killed = SystemTime::now();
    n1.kill_9();
    let won = logged_at(&n2.wait_stderr(n2_mark, &["won the election"], WAIT).await);
    let garp = await_announcement(&mut capture, VIP4, &n2_mac, killed, ARP_INTERVAL + SLACK).await;
    let na = await_announcement(&mut capture, VIP6, &n2_mac, killed, ARP_INTERVAL + SLACK).await;
    let neighbour4 = await_neighbour(obs, VIP4, &n2_mac, ARP_INTERVAL + SLACK);
    let neighbour6 = await_neighbour(obs, VIP6, &n2_mac, ARP_INTERVAL + SLACK);
    println!(
        "leader SIGKILL -> n2 leads: {} ms (session timeout {SESSION_MS} ms); \
         n2 leads -> first gratuitous ARP {} ms, first unsolicited NA {} ms; \
         leader SIGKILL -> first gratuitous ARP {} ms; \
         n2 leads -> observer's entry at n2's MAC: IPv4 {} ms, IPv6 {} ms",
        ms(killed, won),
        ms(won, garp),
        ms(won, na),
        ms(killed, garp),
        ms(won, neighbour4),
        ms(won, neighbour6),
    );
    for (what, at) in [("IPv4", neighbour4), ("IPv6", neighbour6)] {
        assert!(
            ms(won, at) <= (ARP_INTERVAL + SLACK).as_millis() as i64,
            "the observer's {what} entry followed {} ms after the new leadership (ARP interval {ARP_INTERVAL:?})",
            ms(won, at)
        );
    }
    await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n2_ns, VIP6, &on_eth0(64), WAIT).await;
    assert_eq!(site.vip_holder(&n2, SERVICE).0.as_deref(), Some("n2"));

    // The killed node's kernel still holds the VIP (nobody removed it); restarted with its data
    // directory, the node removes it at start-up and follows.
    assert_eq!(holders(n1_ns, VIP4), on_eth0(24), "a SIGKILLed node leaves its addresses behind");
    let n1_mark = n1.stderr_mark();
    n1.restart().await;
    n1.wait_stderr(n1_mark, &["removed VIPs held before this start", "removed=2"], WAIT).await;
    for vip in [VIP4, VIP6] {
        assert_eq!(holders(n1_ns, vip), vec![], "the restarted follower holds no {vip}");
    }
    assert_eq!(site.vip_holder(&n1, SERVICE).0.as_deref(), Some("n2"), "n1 came back as a follower");

    // 3. Deleted by hand on the leader: back within the check interval, and announced.
    let deleted = SystemTime::now();
    n2_ns.ip(&["addr", "del", &format!("{VIP4}/24"), "dev", "eth0"]);
    n2_ns.ip(&["addr", "del", &format!("{VIP6}/64"), "dev", "eth0"]);
    let back4 = await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    let back6 = await_holders(n2_ns, VIP6, &on_eth0(64), WAIT).await;
    println!("VIP deleted by hand -> back: IPv4 {} ms, IPv6 <= {} ms", back4.as_millis(), (back4 + back6).as_millis());
    assert!(back4 <= CHECK_INTERVAL + SLACK, "back after {back4:?} (check interval {CHECK_INTERVAL:?})");
    assert!(back4 + back6 <= CHECK_INTERVAL + SLACK, "IPv6 back after {:?}", back4 + back6);
    await_announcement(&mut capture, VIP4, &n2_mac, deleted, ARP_INTERVAL + SLACK).await;

    // 4. On a wrong interface of the leader: moved back to eth0 within the check interval.
    n2_ns.add_veth("x0", "x0p");
    n2_ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "x0"]);
    let n2_mark = n2.stderr_mark();
    n2_ns.ip(&["addr", "del", &format!("{VIP4}/24"), "dev", "eth0"]);
    n2_ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "x0"]);
    let moved = await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    println!("VIP on a wrong interface -> back on eth0: {} ms", moved.as_millis());
    assert!(moved <= CHECK_INTERVAL + SLACK, "moved after {moved:?} (check interval {CHECK_INTERVAL:?})");
    n2.wait_stderr(n2_mark, &["vip placed", VIP4, "Move"], WAIT).await;
    assert_eq!(holders(n1_ns, VIP4), vec![], "the follower still holds nothing");

    // The graceful hand-over: SIGTERM the leader. It removes the VIP on its way out; n1 takes
    // over at once (n2's candidate is withdrawn, no session has to expire) and the observer
    // follows.
    let n1_mark = n1.stderr_mark();
    let stopped = SystemTime::now();
    n2.terminate().await.expect("n2 exits");
    for vip in [VIP4, VIP6] {
        assert_eq!(holders(n2_ns, vip), vec![], "n2 stopped gracefully still holds {vip}");
    }
    let won = logged_at(&n1.wait_stderr(n1_mark, &["won the election"], WAIT).await);
    let garp = await_announcement(&mut capture, VIP4, &n1_mac, stopped, ARP_INTERVAL + SLACK).await;
    let neighbour = await_neighbour(obs, VIP4, &n1_mac, ARP_INTERVAL + SLACK);
    println!(
        "leader SIGTERM -> n1 leads: {} ms; n1 leads -> first gratuitous ARP {} ms, observer's entry {} ms",
        ms(stopped, won),
        ms(won, garp),
        ms(won, neighbour)
    );
    assert!(ms(stopped, won) < SESSION_MS as i64, "a graceful hand-over waits for no session expiry");
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n1_ns, VIP6, &on_eth0(64), WAIT).await;
    println!("scenarios 1-4 and the graceful hand-over took {:?}", started.elapsed());
}

/// Scenario 5 of the issue: a VIP that no route on the leader covers is reported as an error in
/// the leader's log, and the leader hands leadership over; the other node, which has a route
/// (`x0`, 203.0.113.0/24), leads and holds the VIP there, and the old leader holds no VIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_without_route_makes_the_leader_hand_over() {
    let started = Instant::now();
    let site = Site::new("viprt");
    let (n1_ns, n2_ns) = (site.host(N1), site.host(N2));
    n2_ns.add_veth("x0", "x0p");
    n2_ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "x0"]);

    let (n1, n2) = site.leader_and_follower().await;

    let (n1_mark, n2_mark) = (n1.stderr_mark(), n2.stderr_mark());
    let set = Instant::now();
    site.set_vip(&n2, "edge", &[EDGE_VIP]);
    let error = n1.wait_stderr(n1_mark, &["no route covers VIP", EDGE_VIP], WAIT).await;
    assert!(error.contains("ERROR"), "the error is logged as one: {error}");
    n1.wait_stderr(n1_mark, &["resigning leadership"], WAIT).await;
    n2.wait_stderr(n2_mark, &["won the election"], WAIT).await;
    await_holders(n2_ns, EDGE_VIP, &[("x0".to_string(), 24)], WAIT).await;
    let handed_over = set.elapsed();
    await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n1_ns, VIP4, &[], WAIT).await;
    assert_eq!(holders(n1_ns, EDGE_VIP), vec![], "n1 never held the unroutable VIP");
    assert_eq!(site.vip_holder(&n1, "edge").0.as_deref(), Some("n2"));
    assert!(
        n2.stderr_since(n2_mark).iter().all(|line| !line.contains("no route covers")),
        "the new leader places every VIP"
    );
    println!(
        "unroutable VIP set -> n2 holds it: {} ms; scenario took {:?}",
        handed_over.as_millis(),
        started.elapsed()
    );
}

/// Invariant 7 while ZooKeeper is unreachable: the leader cut off from ZooKeeper (a `prohibit`
/// route to it in its namespace; the rest of the LAN still reaches it) cannot confirm that it
/// leads and removes the VIP, before the other node's election (after the session expires) puts
/// it there. Healed, the old leader comes back as a follower without the VIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_zookeeper_drops_the_vip_before_another_takes_it() {
    let site = Site::new("vipcut");
    let (n1_ns, n2_ns, obs) = (site.host(N1), site.host(N2), site.host(OBS));
    let n2_mac = n2_ns.mac("eth0");
    let n1 = site.start_node(N1, "n1").await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let n2 = site.start_node(N2, "n2").await;
    site.set_vip(&n2, SERVICE, &[VIP4]);
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
    learn(obs, VIP4, &n1_ns.mac("eth0"));

    let (n1_mark, n2_mark) = (n1.stderr_mark(), n2.stderr_mark());
    let cut = SystemTime::now();
    n1_ns.ip(&["route", "add", "prohibit", &format!("{ZK_HOST}/32")]);
    let removed = logged_at(&n1.wait_stderr(n1_mark, &["removed VIPs: this node does not lead"], WAIT).await);
    assert_eq!(holders(n1_ns, VIP4), vec![], "the cut-off leader removed the VIP");
    let won = logged_at(&n2.wait_stderr(n2_mark, &["won the election"], WAIT).await);
    await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    let neighbour = await_neighbour(obs, VIP4, &n2_mac, ARP_INTERVAL + SLACK);
    println!(
        "leader cut off from ZooKeeper -> it removes the VIP: {} ms; -> n2 leads: {} ms; \
         n2 leads -> observer's entry at n2's MAC: {} ms",
        ms(cut, removed),
        ms(cut, won),
        ms(won, neighbour)
    );
    assert!(ms(removed, won) > 0, "the old leader let go of the VIP before the new one took it");

    let n1_mark = n1.stderr_mark();
    n1_ns.ip(&["route", "del", "prohibit", &format!("{ZK_HOST}/32")]);
    n1.wait_stderr(n1_mark, &["session established"], WAIT).await;
    assert_eq!(site.vip_holder(&n1, SERVICE).0.as_deref(), Some("n2"), "n1 is back as a follower");
    tokio::time::sleep(2 * CHECK_INTERVAL).await;
    assert_eq!(holders(n1_ns, VIP4), vec![], "the healed follower holds no VIP");
    assert!(n1.stderr_since(n1_mark).iter().all(|line| !line.contains("won the election")));
}

/// Invariant 7 at start-up while ZooKeeper is unreachable: a leader killed with SIGKILL leaves
/// its VIPs on the interfaces; restarted while it cannot reach ZooKeeper, it should remove them
/// from the configuration it cached, as it does when ZooKeeper answers.
///
/// It does not: `TaskCenter::start` (`boot` in `src/center/mod.rs`) connects to ZooKeeper before
/// it opens the cache and starts the VIP server, and waits for the session for as long as it
/// takes, so the VIP stays on a node that does not lead, while the other node holds it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_without_zookeeper_removes_the_vips_it_cached() {
    let site = Site::new("vipboot");
    let n1_ns = site.host(N1);
    let mut n1 = site.start_node(N1, "n1").await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let _n2 = site.start_node(N2, "n2").await;
    site.set_vip(&n1, SERVICE, &[VIP4]);
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
    n1.kill_9();
    n1_ns.ip(&["route", "add", "prohibit", &format!("{ZK_HOST}/32")]);
    // The node cannot serve without ZooKeeper, so its restart never returns: run it aside and
    // drop it (which kills the node by pid) once the VIP is judged.
    let restart = tokio::spawn(async move {
        n1.restart().await;
        n1
    });
    let outcome = poll_holders(n1_ns, VIP4, &[], Duration::from_secs(5)).await;
    restart.abort();
    let _ = restart.await;
    if let Err(error) = outcome {
        panic!("the restarted node, cut off from ZooKeeper, kept the VIP: {error}");
    }
}

/// An orphan: the leader's daemon SIGKILLed while its host stays up, so its kernel keeps
/// answering for the VIPs. The new leader's probes find the other MAC: a conflict, logged and
/// shown by `vip list`, announced every conflict interval, so the observer's IPv4 and IPv6
/// entries follow the new leader within 2 s, and again within 2 s after the observer asked
/// afresh (both hosts answer it). Removing the orphan clears the conflict, which is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_vip_is_a_conflict_and_the_neighbours_stay_with_the_new_leader() {
    let site = Site::new("vipor");
    let (n1_ns, n2_ns, obs) = (site.host(N1), site.host(N2), site.host(OBS));
    let (n1_mac, n2_mac) = (n1_ns.mac("eth0"), n2_ns.mac("eth0"));
    const CONVERGE: Duration = Duration::from_secs(2);
    let config = |i, id| NodeConfig { vip_conflict_interval_ms: Some(500), ..site.node_config(i, id) };
    let mut n1 = NodeProcess::start(&config(N1, "n1")).await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let n2 = NodeProcess::start(&config(N2, "n2")).await;
    site.set_vip(&n1, SERVICE, &[VIP4, VIP6]);
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n1_ns, VIP6, &on_eth0(64), WAIT).await;
    learn(obs, VIP4, &n1_mac);
    learn(obs, VIP6, &n1_mac);

    let n2_mark = n2.stderr_mark();
    n1.kill_9();
    let won = logged_at(&n2.wait_stderr(n2_mark, &["won the election"], WAIT).await);
    let neighbour4 = await_neighbour(obs, VIP4, &n2_mac, CONVERGE + SLACK);
    let neighbour6 = await_neighbour(obs, VIP6, &n2_mac, CONVERGE + SLACK);
    assert_eq!(holders(n1_ns, VIP4), on_eth0(24), "the killed daemon's kernel still holds the VIP: an orphan");
    for vip in [VIP4, VIP6] {
        let line = n2.wait_stderr(n2_mark, &["VIP conflict: another host answers", vip], WAIT).await;
        assert!(line.contains(&n1_mac), "the conflict names the orphan's MAC: {line}");
        let notes = site.await_vip_state(&n2, vip, "conflict", WAIT).await;
        assert!(notes.iter().any(|n| n.contains(&n1_mac)), "vip list names the orphan's MAC: {notes:?}");
    }
    // The observer asks afresh: both kernels answer, and whoever answered last, the conflict
    // announcements bring it back to the new leader.
    let asked = SystemTime::now();
    for vip in [VIP4, VIP6] {
        obs.ip(&["neigh", "flush", "to", vip, "dev", "eth0"]);
        tokio::task::block_in_place(|| obs.send_datagram(vip.parse().unwrap()));
    }
    let again4 = await_neighbour(obs, VIP4, &n2_mac, CONVERGE);
    let again6 = await_neighbour(obs, VIP6, &n2_mac, CONVERGE);
    println!(
        "orphan: n2 leads -> observer at n2: IPv4 {} ms, IPv6 {} ms; observer asked afresh -> at n2: IPv4 {} ms, IPv6 {} ms",
        ms(won, neighbour4),
        ms(won, neighbour6),
        ms(asked, again4),
        ms(asked, again6)
    );
    assert!(ms(won, neighbour4) <= CONVERGE.as_millis() as i64 && ms(won, neighbour6) <= CONVERGE.as_millis() as i64);

    // The operator removes the orphan: the conflict clears, and says so.
    let cleared_mark = n2.stderr_mark();
    n1_ns.ip(&["addr", "del", &format!("{VIP4}/24"), "dev", "eth0"]);
    n1_ns.ip(&["addr", "del", &format!("{VIP6}/64"), "dev", "eth0"]);
    for vip in [VIP4, VIP6] {
        n2.wait_stderr(cleared_mark, &["VIP conflict cleared", vip], WAIT).await;
        site.await_vip_state(&n2, vip, "placed", WAIT).await;
    }
}

/// A VIP no node can place never moves leadership, the others stay put, and `vip set` warns.
/// Once another node gets a route for it, the leader hands over (that node covers more), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplaceable_vip_never_moves_leadership_until_a_node_can_place_it() {
    let site = Site::new("vipun");
    let (n1_ns, n2_ns) = (site.host(N1), site.host(N2));
    let (n1, n2) = site.leader_and_follower().await;

    let (n1_mark, n2_mark) = (n1.stderr_mark(), n2.stderr_mark());
    let (_, warning) = site.taskctl_both(&n2, &["vip", "set", "edge", EDGE_VIP]);
    assert!(
        warning.contains("warning: no live node has a route that covers") && warning.contains(EDGE_VIP),
        "{warning}"
    );
    n1.wait_stderr(n1_mark, &["no route covers VIP", EDGE_VIP], WAIT).await;
    assert_eq!(site.vip_state(&n1, EDGE_VIP).1, "no-route");
    // Many checks later: nobody resigned or won, the placeable VIP never left n1.
    let watch_until = Instant::now() + 10 * CHECK_INTERVAL;
    while Instant::now() < watch_until {
        assert_eq!(holders(n1_ns, VIP4), on_eth0(24), "the placeable VIP stays on the leader");
        tokio::time::sleep(POLL).await;
    }
    let moves = |lines: Vec<String>, needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(moves(n1.stderr_since(n1_mark), "resigning leadership"), 0);
    assert_eq!(moves(n2.stderr_since(n2_mark), "won the election"), 0);
    assert_eq!(
        moves(n1.stderr_since(n1_mark), "no route covers VIP"),
        1,
        "the unroutable VIP is logged once, not at every check"
    );

    // n2 gets a route for it: it covers both VIPs, n1 one, so n1 hands over, once.
    n2_ns.add_veth("x0", "x0p");
    n2_ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "x0"]);
    n2.wait_stderr(n2_mark, &["won the election"], WAIT).await;
    await_holders(n2_ns, EDGE_VIP, &[("x0".to_string(), 24)], WAIT).await;
    await_holders(n2_ns, VIP4, &on_eth0(24), WAIT).await;
    await_holders(n1_ns, VIP4, &[], WAIT).await;
    tokio::time::sleep(4 * CHECK_INTERVAL).await;
    assert_eq!(moves(n2.stderr_since(n2_mark), "resigning leadership"), 0, "no hand-over back");
    assert_eq!(site.vip_state(&n1, EDGE_VIP), (vec!["n2".to_string()], "placed".to_string(), vec![]));
}

/// A VIP that only a route through a gateway (here the default route) covers is held as a host
/// address (`/32`, `/128`), never as the route's `/0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_covered_only_by_the_default_route_is_a_host_address() {
    let site = Site::new("vipdf");
    let n1_ns = site.host(N1);
    n1_ns.ip(&["route", "add", "default", "via", "198.51.100.1", "dev", "eth0"]);
    n1_ns.ip(&["-6", "route", "add", "default", "via", "2001:db8::1", "dev", "eth0"]);
    let n1 = site.start_node(N1, "n1").await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let (far4, far6) = ("203.0.113.50", "2001:db8:ff::50");
    site.set_vip(&n1, "far", &[far4, far6, VIP4]);
    await_holders(n1_ns, far4, &on_eth0(32), WAIT).await;
    await_holders(n1_ns, far6, &on_eth0(128), WAIT).await;
    await_holders(n1_ns, VIP4, &on_eth0(24), WAIT).await;
}

/// The announcements on the wire, as keepalived sends them: a burst at takeover, a second burst
/// one interval later, then the refresh, one frame at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_come_in_bursts_then_as_a_refresh() {
    let site = Site::new("vipan");
    let (n1_ns, obs) = (site.host(N1), site.host(OBS));
    let n1_mac = n1_ns.mac("eth0");
    let (burst, interval, refresh) = (4u32, Duration::from_millis(1_000), Duration::from_millis(1_500));
    let config = NodeConfig {
        arp_burst: Some(burst),
        arp_rounds: Some(2),
        arp_interval_ms: Some(interval.as_millis() as u64),
        arp_refresh_ms: Some(refresh.as_millis() as u64),
        ..site.node_config(N1, "n1")
    };
    let n1 = NodeProcess::start(&config).await;
    n1.wait_stderr(0, &["won the election"], WAIT).await;
    let mut capture = obs.capture_announcements("eth0");
    let set = SystemTime::now();
    site.set_vip(&n1, SERVICE, &[VIP4]);
    let vip: IpAddr = VIP4.parse().unwrap();
    let mine = |a: &common::netns::Announcement| a.address == vip && a.mac == n1_mac;
    // Until the second refresh: a frame of ours late enough to be it.
    let second_refresh = set + interval + 2 * refresh - Duration::from_millis(400);
    let last = capture.wait(interval + 2 * refresh + 2 * SLACK, |a| mine(a) && a.at >= second_refresh).await;
    assert!(last.is_some(), "no second refresh; seen: {:#?}", capture.seen());
    let frames: Vec<SystemTime> = capture.seen().into_iter().filter(mine).map(|a| a.at).collect();
    // Frames less than 200 ms apart belong to one burst.
    let mut groups: Vec<(SystemTime, usize)> = Vec::new();
    for at in &frames {
        match groups.last_mut() {
            Some((start, n)) if ms(*start, *at) < 200 => *n += 1,
            _ => groups.push((*at, 1)),
        }
    }
    let sizes: Vec<usize> = groups.iter().map(|g| g.1).collect();
    let gaps: Vec<i64> = groups.windows(2).map(|w| ms(w[0].0, w[1].0)).collect();
    println!("announcements of {VIP4}: groups {sizes:?}, gaps {gaps:?} ms");
    assert!(sizes.len() >= 4, "two bursts and two refreshes: {sizes:?}");
    assert_eq!(&sizes[..4], &[burst as usize, burst as usize, 1, 1], "burst, burst, refresh, refresh");
    let near = |gap: i64, want: Duration| (gap - want.as_millis() as i64).abs() < 500;
    assert!(near(gaps[0], interval) && near(gaps[1], refresh) && near(gaps[2], refresh), "gaps {gaps:?}");
}
