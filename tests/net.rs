//! The network layer against the real kernel, in network namespaces these tests create (never the
//! host's own): route lookup, VIP placement and removal, and announcements seen by a neighbour.
//!
//! Needs root; without it every test fails at once with one line saying so.
//!
//! Sysctls set in the receiving namespace, for the announcement tests to see a neighbour entry
//! *created* (an existing entry is updated by an announcement whatever they say, which is the
//! real-world case of a new leader, and is checked too):
//! - `net.ipv4.conf.eth0.arp_accept=1`: Linux creates no entry from a gratuitous ARP otherwise.
//! - `net.ipv6.conf.eth0.accept_untracked_na=1` **and** `net.ipv6.conf.eth0.forwarding=1`: an
//!   unsolicited neighbour advertisement creates an entry only on a router that accepts untracked
//!   advertisements (RFC 9131; checked on Linux 6.18, where a host with
//!   `accept_untracked_na=1` but forwarding off still ignores it).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::netns::{Lab, Netns};
use task_center::net::{self, NetError, Netlink, RouteMatch, VipAction};

/// How long a neighbour may take to process an announcement (it is immediate in practice).
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(3);

/// A MAC address no interface here has, for stale neighbour entries.
const OLD_LEADER_MAC: &str = "02:00:5e:00:53:99";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Interface `a` (198.51.100.1/24, 2001:db8:1::1/64) and `b` (198.51.100.129/25), veth pairs
/// whose peers stay unaddressed.
fn two_interfaces(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.add_veth("a", "ap");
    ns.add_veth("b", "bp");
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "a"]);
    ns.ip(&["addr", "add", "198.51.100.129/25", "dev", "b"]);
    ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "a", "nodad"]);
    ns
}

/// `route_for` for each of `ips`, inside `ns`, as (interface name, prefix length).
fn routes_for(ns: &Netns, ips: &[&str]) -> Vec<Option<(String, u8)>> {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    ns.run(|| async move {
        let netlink = Netlink::new().unwrap();
        let mut found = Vec::new();
        for ip in ips {
            let route: Option<RouteMatch> = netlink.route_for(ip).await.unwrap();
            found.push(route.map(|r| (r.interface_name, r.prefix_len)));
        }
        found
    })
}

fn on(name: &str, prefix_len: u8) -> Option<(String, u8)> {
    Some((name.to_string(), prefix_len))
}

#[test]
fn route_for_finds_the_longest_prefix() {
    let ns = two_interfaces("route");
    ns.ip(&["route", "add", "203.0.113.128/25", "dev", "b"]);
    let found = routes_for(&ns, &["198.51.100.200", "198.51.100.20", "203.0.113.5", "203.0.113.200", "2001:db8:1::10"]);
    assert_eq!(found, vec![on("b", 25), on("a", 24), None, on("b", 25), on("a", 64)]);
    assert_eq!(routes_for(&ns, &["2001:db8:2::1"]), vec![None]);

    // A VIP this node holds, even on the wrong interface, is still matched against the main
    // table (the kernel's own lookup would answer with its `local` host route).
    ns.ip(&["addr", "add", "198.51.100.200/32", "dev", "a"]);
    let kernel = ns.ip(&["route", "get", "fibmatch", "198.51.100.200"]);
    assert!(kernel.starts_with("local 198.51.100.200 dev a"), "the kernel's answer: {kernel}");
    assert_eq!(routes_for(&ns, &["198.51.100.200"]), vec![on("b", 25)]);

    // A default route catches the rest with prefix 0; a rejecting route hides it.
    ns.ip(&["route", "add", "default", "via", "198.51.100.254", "dev", "a"]);
    ns.ip(&["route", "add", "unreachable", "203.0.113.64/26"]);
    ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::fe", "dev", "a"]);
    let found = routes_for(&ns, &["203.0.113.5", "203.0.113.70", "203.0.113.200", "2001:db8:2::1"]);
    assert_eq!(found, vec![on("a", 0), None, on("b", 25), on("a", 0)]);
}

#[test]
fn apply_places_moves_and_removes_vips() {
    let ns = two_interfaces("apply");
    ns.ip(&["addr", "add", "198.51.100.200/24", "dev", "a"]); // wrong place: its route is b's /25
    ns.ip(&["addr", "add", "198.51.100.150/25", "dev", "b"]); // in place
    let (a, b) = (ns.link_index("a"), ns.link_index("b"));
    let routes_before = (ns.ip(&["route", "show"]), ns.ip(&["-6", "route", "show"]));
    let vips: Vec<IpAddr> = ["198.51.100.20", "198.51.100.200", "198.51.100.150", "2001:db8:1::20", "203.0.113.5"]
        .iter()
        .map(|s| ip(s))
        .collect();

    let (plan, announced, replan) = ns.run(|| {
        let vips = vips.clone();
        async move {
            let netlink = Netlink::new().unwrap();
            let plan = netlink.plan(&vips).await.unwrap();
            let (announced, failed) = net::apply(&netlink, &plan).await.unwrap();
            assert!(failed.is_empty(), "{failed:?}");
            (plan, announced, netlink.plan(&vips).await.unwrap())
        }
    });
    let action = |vip: &str| plan.steps.iter().find(|s| s.vip == ip(vip)).unwrap().action.clone();
    assert!(
        matches!(action("198.51.100.20"), VipAction::Add { ref interface, prefix_len: 24 } if interface.index == a)
    );
    assert!(matches!(action("198.51.100.200"), VipAction::Move { ref to, prefix_len: 25, .. } if to.index == b));
    assert!(matches!(action("198.51.100.150"), VipAction::InPlace { ref interface } if interface.index == b));
    assert!(
        matches!(action("2001:db8:1::20"), VipAction::Add { ref interface, prefix_len: 64 } if interface.index == a)
    );
    assert_eq!(action("203.0.113.5"), VipAction::NoRoute);
    assert_eq!(announced, vec![ip("198.51.100.20"), ip("198.51.100.200"), ip("2001:db8:1::20")]);

    assert_eq!(ns.holders("198.51.100.20"), vec![("a".to_string(), 24)]);
    assert_eq!(ns.holders("198.51.100.200"), vec![("b".to_string(), 25)]);
    assert_eq!(ns.holders("198.51.100.150"), vec![("b".to_string(), 25)]);
    assert_eq!(ns.holders("2001:db8:1::20"), vec![("a".to_string(), 64)]);
    assert_eq!(ns.holders("203.0.113.5"), vec![]);
    // noprefixroute: holding VIPs changed no route.
    assert_eq!((ns.ip(&["route", "show"]), ns.ip(&["-6", "route", "show"])), routes_before);
    // Applied once, the plan is settled but for the unroutable VIP.
    assert!(replan.steps.iter().all(|s| matches!(s.action, VipAction::InPlace { .. } | VipAction::NoRoute)));
    assert_eq!(replan.unroutable(), vec![ip("203.0.113.5")]);

    let (removed, again) = ns.run(|| {
        let vips = vips.clone();
        async move {
            let netlink = Netlink::new().unwrap();
            let removed = net::remove_vips(&netlink, &vips).await.unwrap();
            (removed, net::remove_vips(&netlink, &vips).await.unwrap())
        }
    });
    assert_eq!((removed, again), (4, 0));
    for vip in ["198.51.100.20", "198.51.100.200", "198.51.100.150", "2001:db8:1::20"] {
        assert_eq!(ns.holders(vip), vec![], "{vip} is gone");
    }
    assert_eq!(ns.holders("198.51.100.1"), vec![("a".to_string(), 24)], "other addresses stay");
}

#[test]
fn address_changes_are_idempotent_and_errors_are_typed() {
    let ns = two_interfaces("addr");
    let a = ns.link_index("a");
    let mac = ns.mac("a");
    let (added, again, removed, missing, read_mac, listed, no_link) = ns.run(|| async move {
        let netlink = Netlink::new().unwrap();
        let vip = ip("198.51.100.30");
        let added = netlink.add_address(a, vip, 24).await.unwrap();
        let again = netlink.add_address(a, vip, 24).await.unwrap();
        let listed = netlink.addresses().await.unwrap();
        let removed = netlink.remove_address(a, vip, 24).await.unwrap();
        let missing = netlink.remove_address(a, vip, 24).await.unwrap();
        let read_mac = netlink.interface_mac(a).await.unwrap();
        let no_link = netlink.add_address(9999, vip, 24).await.unwrap_err();
        (added, again, removed, missing, read_mac, listed, no_link)
    });
    assert_eq!((added, again, removed, missing), (true, false, true, false));
    let read_mac: Vec<String> = read_mac.iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(read_mac.join(":"), mac);
    let vip = listed.iter().find(|address| address.address == ip("198.51.100.30")).expect("listed");
    assert_eq!((vip.interface_index, vip.interface_name.as_str(), vip.prefix_len), (a, "a", 24));
    assert!(listed.iter().any(|address| address.address == ip("2001:db8:1::1") && address.prefix_len == 64));
    assert!(matches!(no_link, NetError::NoSuchInterface { .. }), "{no_link:?}");
    let too_long = ns.run(|| async move { Netlink::new().unwrap().add_address(a, ip("198.51.100.31"), 33).await });
    assert!(matches!(too_long, Err(NetError::InvalidPrefix { prefix_len: 33, .. })), "{too_long:?}");
}

/// A lab of two hosts: the VIP's new holder `A` and a neighbour `B` that accepts unsolicited
/// announcements. Returns the lab and A's MAC.
fn garp_lab(prefix: &str) -> (Lab, String) {
    let lab = Lab::new(prefix, 2);
    let b = &lab.hosts[1].netns;
    b.sysctl("net.ipv4.conf.eth0.arp_accept", "1");
    assert!(
        b.read_sysctl("net.ipv6.conf.eth0.accept_untracked_na").is_some(),
        "this kernel lacks accept_untracked_na (Linux 5.19+)"
    );
    b.sysctl("net.ipv6.conf.eth0.accept_untracked_na", "1");
    b.sysctl("net.ipv6.conf.eth0.forwarding", "1");
    let mac = lab.hosts[0].netns.mac("eth0");
    (lab, mac)
}

/// In host A: plans `vip` (an `Add` on eth0), applies the plan and announces the VIP from the
/// MAC that netlink reports, as the VIP server does after a leader change.
fn place_and_announce(lab: &Lab, vip: IpAddr) {
    lab.hosts[0].netns.run(|| async move {
        let netlink = Netlink::new().unwrap();
        let plan = netlink.plan(&[vip]).await.unwrap();
        let (announced, failed) = net::apply(&netlink, &plan).await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(announced, vec![vip]);
        let interface = plan.interface_of(vip).unwrap().clone();
        assert_eq!(interface.name, "eth0");
        let mac = netlink.interface_mac(interface.index).await.unwrap();
        net::announce(&interface.name, vip, mac).await.unwrap();
    });
}

/// In host A: announces `vip` again on eth0.
fn announce_again(lab: &Lab, vip: IpAddr) {
    let index = lab.hosts[0].netns.link_index("eth0");
    lab.hosts[0].netns.run(|| async move {
        let netlink = Netlink::new().unwrap();
        let mac = netlink.interface_mac(index).await.unwrap();
        net::announce("eth0", vip, mac).await.unwrap();
    });
}

/// The announcement scenario for `vip`: B learns it from A's first announcement, then, holding a
/// stale entry for the old leader's MAC, is corrected by the next one.
fn check_announcement(prefix: &str, vip: &str) {
    let (lab, a_mac) = garp_lab(prefix);
    let b = &lab.hosts[1].netns;
    place_and_announce_checked(&lab, b, vip, &a_mac);

    // The real-world case: B, a host with default settings, still maps the VIP to the old
    // leader; the announcement fixes it.
    for key in
        ["net.ipv4.conf.eth0.arp_accept", "net.ipv6.conf.eth0.accept_untracked_na", "net.ipv6.conf.eth0.forwarding"]
    {
        b.sysctl(key, "0");
    }
    b.ip(&["neigh", "replace", vip, "lladdr", OLD_LEADER_MAC, "dev", "eth0", "nud", "stale"]);
    assert_eq!(b.neighbour("eth0", vip).map(|(mac, _)| mac).as_deref(), Some(OLD_LEADER_MAC));
    announce_again(&lab, ip(vip));
    let seen = b.wait_neighbour("eth0", vip, &a_mac, NEIGHBOUR_WAIT);
    assert_eq!(seen.as_deref(), Some(a_mac.as_str()), "B maps {vip} to A's MAC after the new announcement");
}

/// B has no entry for `vip`; A places and announces it; B then maps it to `a_mac`.
fn place_and_announce_checked(lab: &Lab, b: &Netns, vip: &str, a_mac: &str) {
    assert_eq!(b.neighbour("eth0", vip), None, "B knows nothing of {vip} before");
    place_and_announce(lab, ip(vip));
    assert_eq!(lab.hosts[0].netns.holders(vip).len(), 1, "A holds {vip}");
    let seen = b.wait_neighbour("eth0", vip, a_mac, NEIGHBOUR_WAIT);
    assert_eq!(seen.as_deref(), Some(a_mac), "B learned {vip} -> A's MAC from the announcement");
}

#[test]
fn a_gratuitous_arp_teaches_the_neighbours() {
    check_announcement("garp4", "198.51.100.200");
}

#[test]
fn an_unsolicited_neighbour_advertisement_teaches_the_neighbours() {
    check_announcement("garp6", "2001:db8::200");
}

#[test]
fn announcing_on_a_missing_interface_is_a_typed_error() {
    let ns = Netns::new("nolink");
    let error = ns.run(|| async { net::announce("nosuch0", ip("198.51.100.9"), [2, 0, 0, 0, 0, 1]).await });
    assert!(matches!(error, Err(NetError::NoSuchInterface { .. })), "{error:?}");
}

/// Clears `CAP_NET_ADMIN` and `CAP_NET_RAW` from the calling thread's effective and permitted
/// sets. Linux capabilities are per thread, and threads spawned afterwards (the blocking pool)
/// inherit the reduced sets: a root test can act as an unprivileged node on one thread.
fn drop_network_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let mut header = Header { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and two data structs, as capget(2) says.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()), 0, "capget");
    }
    let keep = !((1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW));
    data[0].effective &= keep;
    data[0].permitted &= keep;
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()), 0, "capset");
    }
}

#[test]
fn without_capabilities_changes_are_permission_denied() {
    let ns = two_interfaces("nocap");
    let a = ns.link_index("a");
    let (add, remove, announce, listed) = ns.run(|| async move {
        drop_network_capabilities();
        let netlink = Netlink::new().unwrap();
        let add = netlink.add_address(a, ip("198.51.100.40"), 24).await;
        let remove = netlink.remove_address(a, ip("198.51.100.1"), 24).await;
        let announce = net::announce("a", ip("198.51.100.1"), [2, 0, 0x5e, 0, 0x53, 1]).await;
        let listed = netlink.addresses().await.map(|addresses| addresses.len());
        (add, remove, announce, listed)
    });
    let add = add.unwrap_err();
    assert!(add.is_permission_denied(), "{add:?}");
    assert!(add.to_string().contains("CAP_NET_ADMIN"), "{add}");
    assert!(remove.unwrap_err().is_permission_denied());
    let announce = announce.unwrap_err();
    assert!(matches!(announce, NetError::PermissionDenied { capability: "CAP_NET_RAW", .. }), "{announce:?}");
    assert!(listed.unwrap() >= 3, "reading needs no privilege");
    assert_eq!(ns.holders("198.51.100.1"), vec![("a".to_string(), 24)], "nothing changed");
}
