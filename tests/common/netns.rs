//! Network namespaces for the network tests: a [`Netns`] is a namespace this process created
//! (`ip netns add`) and deletes on drop, even when the test panics; [`Lab`] is a small switched
//! LAN of namespaces; [`AnnouncementCapture`] records the gratuitous ARPs and unsolicited
//! neighbour advertisements that reach one of a namespace's interfaces. Tests never touch the
//! host's own interfaces.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2: without them, [`Netns::new`] fails
//! the test with one line that says so. Addresses come from the documentation ranges only
//! (198.51.100.0/24, 2001:db8::/64 in the lab).
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::run_command;

/// The prefix of every namespace these tests create: `tc-<prefix>-<pid>-<n>`.
const NAME_PREFIX: &str = "tc-";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace created by this test process and deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `tc-<prefix>-<pid>-<n>` and brings its `lo` up. First deletes
    /// namespaces left behind by earlier test processes that were killed (named after a pid that
    /// no longer runs).
    ///
    /// Panics with one clear line when the namespace cannot be created (not root, or iproute2
    /// missing): these tests never pass silently.
    pub fn new(prefix: &str) -> Netns {
        sweep_stale();
        let name = format!("{NAME_PREFIX}{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!(
                "network namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): `ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => panic!("network namespace tests need iproute2 (scripts/test.sh installs it): `ip`: {error}"),
        }
        let netns = Netns { name };
        netns.ip(&["link", "set", "dev", "lo", "up"]);
        netns
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `make()`'s future to completion on a fresh OS thread that first joins this namespace
    /// (`setns(CLONE_NEWNET)`), on a current-thread tokio runtime built there, and returns its
    /// output. Sockets created inside (rtnetlink, packet sockets, and the blocking pool's threads,
    /// which are spawned from it) belong to this namespace. A panic inside is re-raised here.
    pub fn run<F, Fut>(&self, make: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into {path}: {}", std::io::Error::last_os_error());
                }
                drop(file);
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
                runtime.block_on(make())
            });
            match thread.join() {
                Ok(output) => output,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip netns exec <name> <command...>`: the command's stdout. Panics with its stderr if it
    /// fails.
    pub fn exec(&self, command: &[&str]) -> String {
        self.try_exec(command).unwrap_or_else(|error| panic!("{error}"))
    }

    /// `ip netns exec <name> <command...>`: stdout, or a message with the status and stderr.
    pub fn try_exec(&self, command: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        run_command("ip", &args)
    }

    /// `ip -n <name> <args...>` (iproute2 inside this namespace): stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_command("ip", &all).unwrap_or_else(|error| panic!("{error}"))
    }

    /// `ip -j <args...>` inside this namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ip(&all);
        if out.trim().is_empty() {
            return Value::Array(Vec::new());
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("`ip -j {}`: {e}: {out}", args.join(" ")))
    }

    /// Sets a sysctl inside this namespace (`sysctl -w key=value`).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A sysctl's value inside this namespace, or `None` if this kernel lacks it.
    pub fn read_sysctl(&self, key: &str) -> Option<String> {
        self.try_exec(&["sysctl", "-n", key]).ok().map(|value| value.trim().to_string())
    }

    /// Creates a veth pair inside this namespace (`name` and `peer`), both up: an Ethernet-like
    /// interface to put addresses on (this kernel may lack the dummy driver).
    pub fn add_veth(&self, name: &str, peer: &str) {
        self.ip(&["link", "add", "name", name, "type", "veth", "peer", "name", peer]);
        self.ip(&["link", "set", "dev", name, "up"]);
        self.ip(&["link", "set", "dev", peer, "up"]);
    }

    /// Interface `name`'s index.
    pub fn link_index(&self, name: &str) -> u32 {
        let links = self.ip_json(&["link", "show", "dev", name]);
        links[0]["ifindex"].as_u64().unwrap_or_else(|| panic!("no ifindex for {name}: {links}")) as u32
    }

    /// Interface `name`'s MAC address, as `ip` prints it (`02:00:5e:...`).
    pub fn mac(&self, name: &str) -> String {
        let links = self.ip_json(&["link", "show", "dev", name]);
        links[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {name}: {links}")).to_string()
    }

    /// Every (interface, address, prefix length) in this namespace, from `ip -j addr`.
    pub fn addresses(&self) -> Vec<(String, String, u8)> {
        let mut found = Vec::new();
        for link in self.ip_json(&["addr", "show"]).as_array().cloned().unwrap_or_default() {
            let name = link["ifname"].as_str().unwrap_or_default().to_string();
            for info in link["addr_info"].as_array().cloned().unwrap_or_default() {
                let address = info["local"].as_str().unwrap_or_default().to_string();
                found.push((name.clone(), address, info["prefixlen"].as_u64().unwrap_or_default() as u8));
            }
        }
        found
    }

    /// Where `address` is held: (interface, prefix length) for each interface holding it.
    pub fn holders(&self, address: &str) -> Vec<(String, u8)> {
        self.addresses().into_iter().filter(|(_, a, _)| a == address).map(|(name, _, len)| (name, len)).collect()
    }

    /// The neighbour entry for `address` on `device`: (lladdr, states), from `ip -j neigh`.
    pub fn neighbour(&self, device: &str, address: &str) -> Option<(String, Vec<String>)> {
        let entries = self.ip_json(&["neigh", "show", "dev", device]);
        entries.as_array()?.iter().find(|entry| entry["dst"].as_str() == Some(address)).map(|entry| {
            let lladdr = entry["lladdr"].as_str().unwrap_or_default().to_string();
            let states = entry["state"].as_array().cloned().unwrap_or_default();
            (lladdr, states.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        })
    }

    /// Sends one UDP datagram (to the discard port, 9) to `address` from inside this namespace:
    /// the kernel resolves `address`'s neighbour entry on the way, as it would for a ping.
    pub fn send_datagram(&self, address: IpAddr) {
        self.run(|| async move {
            let any: IpAddr =
                if address.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            let socket = std::net::UdpSocket::bind((any, 0)).expect("bind a UDP socket");
            socket.send_to(b"who holds this address?", (address, 9)).expect("send a datagram");
        })
    }

    /// Polls [`Netns::neighbour`] until `address` maps to `lladdr` on `device`, for at most
    /// `limit`; returns the last entry seen.
    pub fn wait_neighbour(&self, device: &str, address: &str, lladdr: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.neighbour(device, address).map(|(mac, _)| mac);
            if seen.as_deref() == Some(lladdr) || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Netns {
    /// Starts recording the announcements (gratuitous ARPs, unsolicited neighbour
    /// advertisements) that arrive on `device` of this namespace; returns once the capture
    /// socket is open. Panics if it cannot be opened.
    pub fn capture_announcements(&self, device: &str) -> AnnouncementCapture {
        AnnouncementCapture::start(&self.name, device)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run_command("ip", &["netns", "del", &self.name]) {
            eprintln!("leaving namespace {} behind: {error}", self.name);
        }
    }
}

/// One host of a [`Lab`]: its namespace, and its port on the switch.
#[derive(Debug)]
pub struct LabHost {
    /// The host's namespace.
    pub netns: Netns,
    /// Its interface to the switch (`eth0`).
    pub interface: String,
    /// Its IPv4 address, in 198.51.100.0/24.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address, in 2001:db8::/64.
    pub ipv6: Ipv6Addr,
}

/// A switched LAN: a "switch" namespace with bridge `br0`, and hosts each joined to it by a veth
/// pair (`p<i>` on the switch, `eth0` in the host). Host `i` has 198.51.100.(10+i)/24 and
/// 2001:db8::(10+i)/64 (IPv6 without duplicate address detection), hence a connected route for
/// each range. Dropping the lab deletes every namespace, and with them the veth pairs.
#[derive(Debug)]
pub struct Lab {
    /// The hosts, in order.
    pub hosts: Vec<LabHost>,
    /// The switch's namespace (dropped last).
    pub switch: Netns,
}

impl Lab {
    /// Builds a lab of `hosts` hosts (at most 200).
    pub fn new(prefix: &str, hosts: usize) -> Lab {
        assert!(hosts <= 200, "a lab of at most 200 hosts");
        let switch = Netns::new(&format!("{prefix}-sw"));
        switch.ip(&["link", "add", "name", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "dev", "br0", "up"]);
        let mut lab = Lab { hosts: Vec::new(), switch };
        for i in 0..hosts {
            let netns = Netns::new(&format!("{prefix}-h{i}"));
            let port = format!("p{i}");
            lab.switch.ip(&[
                "link",
                "add",
                "name",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ]);
            lab.switch.ip(&["link", "set", "dev", &port, "master", "br0"]);
            lab.switch.ip(&["link", "set", "dev", &port, "up"]);
            let (ipv4, ipv6) = (
                Ipv4Addr::new(198, 51, 100, 10 + i as u8),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + i as u16),
            );
            netns.sysctl("net.ipv6.conf.eth0.accept_dad", "0");
            netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
            netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
            netns.ip(&["link", "set", "dev", "eth0", "up"]);
            lab.hosts.push(LabHost { netns, interface: "eth0".into(), ipv4, ipv6 });
        }
        lab
    }
}

/// Deletes `tc-...-<pid>-<n>` namespaces whose pid no longer runs (left by a killed test run).
fn sweep_stale() {
    let Ok(list) = run_command("ip", &["netns", "list"]) else { return };
    for name in list.lines().filter_map(|line| line.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let mut parts = rest.rsplit('-');
        let (Some(n), Some(pid)) = (parts.next(), parts.next()) else { continue };
        let numeric = n.parse::<u64>().is_ok() && pid.parse::<u32>().is_ok();
        if numeric && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_command("ip", &["netns", "del", name]);
        }
    }
}

/// One announcement seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// When the capture read it.
    pub at: SystemTime,
    /// The announced address: a gratuitous ARP's sender (= target) IP, or an unsolicited
    /// neighbour advertisement's target.
    pub address: IpAddr,
    /// The MAC it maps the address to (the ARP sender's, or the frame's source), as `ip` prints
    /// MACs (`02:00:5e:...`).
    pub mac: String,
}

/// The announcements arriving on one interface of a namespace, read from a packet socket by a
/// thread that joined the namespace. The thread stops (within 100 ms) when this is dropped.
pub struct AnnouncementCapture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: tokio::sync::watch::Receiver<Vec<Announcement>>,
}

impl AnnouncementCapture {
    fn start(netns: &str, device: &str) -> AnnouncementCapture {
        let (path, device) = (format!("/run/netns/{netns}"), device.to_string());
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_tx, seen) = tokio::sync::watch::channel(Vec::new());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("capture-{device}"))
            .spawn(move || {
                let socket = match open_capture(&path, &device) {
                    Ok(socket) => {
                        let _ = ready_tx.send(Ok(()));
                        socket
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let mut frame = [0u8; 2048];
                while !thread_stop.load(Ordering::Relaxed) {
                    // SAFETY: a buffer of frame.len() bytes and a zeroed sockaddr_ll of its size.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    let n = unsafe {
                        libc::recvfrom(
                            socket.as_raw_fd(),
                            frame.as_mut_ptr().cast(),
                            frame.len(),
                            0,
                            (&mut from as *mut libc::sockaddr_ll).cast(),
                            &mut from_len,
                        )
                    };
                    // A timeout (to look at the stop flag) or an interrupted call: read again.
                    if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                        continue;
                    }
                    if let Some((address, mac)) = parse_announcement(&frame[..n as usize]) {
                        let seen = Announcement { at: SystemTime::now(), address, mac };
                        seen_tx.send_modify(|all| all.push(seen));
                    }
                }
            })
            .expect("start the capture thread");
        match ready_rx.recv() {
            Ok(Ok(())) => AnnouncementCapture { stop, thread: Some(thread), seen },
            Ok(Err(error)) => panic!("{error}"),
            Err(_) => panic!("the capture thread died before opening its socket"),
        }
    }

    /// Everything seen so far, oldest first.
    pub fn seen(&self) -> Vec<Announcement> {
        self.seen.borrow().clone()
    }

    /// Waits for the first announcement (already seen or to come) that satisfies `pred`, for at
    /// most `limit`. Follows the capture as frames arrive.
    pub async fn wait(&mut self, limit: Duration, mut pred: impl FnMut(&Announcement) -> bool) -> Option<Announcement> {
        let found = tokio::time::timeout(limit, self.seen.wait_for(|all| all.iter().any(&mut pred))).await;
        match found {
            Ok(Ok(all)) => all.iter().find(|a| pred(a)).cloned(),
            _ => None,
        }
    }
}

impl Drop for AnnouncementCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// On the calling thread: joins the namespace at `path`, and opens a packet socket for every
/// protocol, bound to `device`, with a 100 ms receive timeout.
fn open_capture(path: &str, device: &str) -> Result<OwnedFd, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns into {path}: {}", std::io::Error::last_os_error()));
    }
    let name = std::ffi::CString::new(device).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {device} in {path}"));
    }
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as libc::c_int) };
    if fd < 0 {
        return Err(format!("packet socket (needs CAP_NET_RAW): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll with family, protocol and interface set, of its own size.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as i32;
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(format!("bind the packet socket to {device}: {}", std::io::Error::last_os_error()));
    }
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: SO_RCVTIMEO with a timeval of its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(socket)
}

/// The address and MAC an Ethernet frame announces, if it is a gratuitous ARP (sender IP =
/// target IP) or an unsolicited neighbour advertisement (Solicited flag clear).
fn parse_announcement(frame: &[u8]) -> Option<(IpAddr, String)> {
    let mac = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        0x0806 if frame.len() >= 42 => {
            let arp = &frame[14..42];
            // Ethernet/IPv4 ARP only.
            if arp[0..2] != [0, 1] || arp[2..4] != [0x08, 0x00] || arp[4] != 6 || arp[5] != 4 {
                return None;
            }
            let (sender, target) = (&arp[14..18], &arp[24..28]);
            if sender != target {
                return None;
            }
            let ip = Ipv4Addr::new(sender[0], sender[1], sender[2], sender[3]);
            Some((IpAddr::V4(ip), mac(&arp[8..14])))
        }
        0x86dd if frame.len() >= 14 + 40 + 24 => {
            let (ipv6, icmp) = (&frame[14..54], &frame[54..]);
            // Next header ICMPv6, type neighbour advertisement, Solicited flag clear.
            if ipv6[6] != 58 || icmp[0] != 136 || icmp[4] & 0x40 != 0 {
                return None;
            }
            let target: [u8; 16] = icmp[8..24].try_into().ok()?;
            Some((IpAddr::V6(Ipv6Addr::from(target)), mac(&frame[6..12])))
        }
        _ => None,
    }
}
