//! The network layer under the VIP server and the ARP syncer: the node's routes and addresses
//! through rtnetlink, the placement of virtual IPs, and their announcement on the wire.
//!
//! - [`Netlink`]: one rtnetlink connection. It reads the main routing table
//!   ([`Netlink::routing_table`], [`Netlink::route_for`]) and the interface addresses
//!   ([`Netlink::addresses`]), adds and removes addresses (idempotently) and reads an
//!   interface's MAC address.
//! - [`plan`]: the pure decision, per VIP, of what to do ([`VipAction`]): leave it in place, add
//!   it, move it from a wrong interface, or report that no route covers it. [`apply`] carries a
//!   [`VipPlan`] out and returns the VIPs to announce; [`remove_vips`] is the follower's side
//!   (invariant 7: the VIP lives only on the leader).
//! - [`announce`]: one gratuitous ARP (IPv4) or one unsolicited neighbour advertisement (IPv6)
//!   for a VIP, built by hand ([`gratuitous_arp_frame`], [`unsolicited_na_frame`]) and sent on a
//!   packet socket from a blocking thread; [`announce_times`] sends a burst.
//! - [`probe`]: asks who holds a VIP (an ARP probe, or a duplicate-address-detection
//!   solicitation) and returns the other hardware addresses that answered: a conflict.
//!
//! # Placement rules
//!
//! A VIP goes on the interface of the longest-prefix route that covers it in the **main** routing
//! table. Its prefix length is the route's for an on-link (connected) route, and a host prefix
//! (`/32`, `/128`) for a route through a gateway or a default route
//! ([`RouteMatch::vip_prefix_len`]). The lookup is done here over a dump of the table, not
//! by the kernel (`ip route get fibmatch`): once a VIP is held by this node, the kernel answers
//! with the `local` table's host route for it (`local 198.51.100.200 dev a`, a /32 on whichever
//! interface holds it, right or wrong), which is exactly the case the periodic re-check must
//! judge. See [`RoutingTable`] for the matching rules. Policy routing rules (`ip rule`) are not
//! consulted, as in the original service.
//!
//! VIPs are added with `noprefixroute`, so holding a VIP never changes the routing table (the
//! route that chose the interface already covers it), and IPv6 VIPs with `nodad`: the old leader
//! may still answer for the address for a moment, and duplicate address detection would then
//! leave the new leader's copy unusable ("dadfailed").
//!
//! # Namespaces and privileges
//!
//! Netlink and packet sockets belong to the network namespace of the thread that creates them.
//! [`Netlink::new`] must run on a thread in the wanted namespace, and [`announce`] opens its
//! packet socket on a blocking-pool thread of the current runtime, which must be in the same
//! namespace (true for a process that never calls `setns`, and for a runtime built on a thread
//! that did before it spawned any thread).
//!
//! Reading routes and addresses needs no privilege. Adding or removing addresses needs
//! `CAP_NET_ADMIN`, announcing needs `CAP_NET_RAW`; without them the calls fail with
//! [`NetError::PermissionDenied`], which the caller reports once ("VIPs disabled: no
//! CAP_NET_ADMIN") instead of retrying.
//!
//! This module knows nothing about leadership, ZooKeeper or actors: the VIP server and the ARP
//! syncer decide when to call it.

use std::io;
use std::net::IpAddr;

mod announce;
mod netlink;
mod plan;

pub use announce::{
    announce, announce_times, announcement_frame, arp_probe_frame, claimant, dad_solicitation_frame,
    gratuitous_arp_frame, neighbour_solicitation_frame, probe, probe_frame, unsolicited_na_frame, DAD_NS_FRAME_LEN,
    GARP_FRAME_LEN, NS_FRAME_LEN, SEND_TIMEOUT, UNSOLICITED_NA_FRAME_LEN,
};
pub use netlink::{Netlink, RoutingTable};
pub use plan::{apply, plan, remove_vips, VipAction, VipPlan, VipStep};

/// The result of a network operation.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The kernel refused for lack of privilege (`EPERM`/`EACCES`): `capability` names what is
    /// missing (`CAP_NET_ADMIN` for addresses, `CAP_NET_RAW` for announcements). Retrying does
    /// not help: the node runs without VIPs until it is given the capability.
    #[error("{operation}: permission denied (needs {capability})")]
    PermissionDenied {
        /// What was attempted, e.g. `adding 198.51.100.200/24 on interface 3`.
        operation: String,
        /// The missing capability.
        capability: &'static str,
    },
    /// The rtnetlink socket could not be opened (out of file descriptors or memory). A later
    /// retry may succeed.
    #[error("opening the rtnetlink socket failed")]
    Connect(#[source] io::Error),
    /// A netlink request failed for another reason than the ones named by the other variants
    /// (the kernel's error is the source). Whether a retry helps depends on the source.
    #[error("{operation} failed")]
    Netlink {
        /// What was attempted, e.g. `dumping the IPv4 routes`.
        operation: String,
        /// rtnetlink's error, holding the kernel's errno for a refused request.
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface with this index or name exists in this namespace: it was removed (or
    /// renamed) since it was looked up. Re-plan from fresh routes and addresses.
    #[error("no interface {interface}")]
    NoSuchInterface {
        /// The interface, as `index 3` or by name.
        interface: String,
    },
    /// The interface has no 6-byte Ethernet address (a tunnel or a point-to-point link), so a
    /// VIP on it cannot be announced. Retrying does not help.
    #[error("interface {interface} has no Ethernet address")]
    NoMac {
        /// The interface, as `index 3` or by name.
        interface: String,
    },
    /// A prefix length longer than the address (over 32 for IPv4, 128 for IPv6). A caller bug;
    /// nothing was changed.
    #[error("prefix length {prefix_len} is too long for {address}")]
    InvalidPrefix {
        /// The address.
        address: IpAddr,
        /// The refused prefix length.
        prefix_len: u8,
    },
    /// The packet socket on `interface` could not be opened or bound (other than for lack of
    /// privilege). A retry may succeed if the interface comes back.
    #[error("opening a packet socket on {interface} failed")]
    Channel {
        /// The interface name.
        interface: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The datalink channel on `interface` is not an Ethernet channel. Retrying does not help.
    #[error("interface {interface} does not carry Ethernet frames")]
    NotEthernet {
        /// The interface name.
        interface: String,
    },
    /// Sending the announcement on `interface` failed (the link is down, or the send timed out
    /// after [`SEND_TIMEOUT`]). The next round may succeed.
    #[error("sending an announcement on {interface} failed")]
    Send {
        /// The interface name.
        interface: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The blocking task that sends an announcement panicked or was cancelled (the runtime is
    /// shutting down).
    #[error("the announcement task did not finish")]
    Blocking(#[source] tokio::task::JoinError),
}

impl NetError {
    /// True for [`NetError::PermissionDenied`]: the node lacks `CAP_NET_ADMIN` or `CAP_NET_RAW`,
    /// and VIPs are disabled on it until it gets them.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, NetError::PermissionDenied { .. })
    }
}

/// An interface of this node, by index and by name (names can change; the index is what the
/// kernel acts on).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Interface {
    /// The kernel's interface index.
    pub index: u32,
    /// The interface name (`eth0`), used for packet sockets and messages.
    pub name: String,
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (index {})", self.name, self.index)
    }
}

/// The route chosen for an address: the longest prefix in the main table that covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// The index of the route's output interface.
    pub interface_index: u32,
    /// The name of that interface.
    pub interface_name: String,
    /// The route's prefix length (24 for `198.51.100.0/24`, 0 for a default route).
    pub prefix_len: u8,
    /// True for an on-link (connected) route: no gateway, the network is on the interface's
    /// link.
    pub on_link: bool,
}

impl RouteMatch {
    /// The route's output interface.
    pub fn interface(&self) -> Interface {
        Interface { index: self.interface_index, name: self.interface_name.clone() }
    }

    /// The prefix length a VIP placed by this route is held with: the route's own for an
    /// on-link route (the VIP is one more address of that subnet), a host prefix (`/32`,
    /// `/128`) for a route through a gateway or a default route, so that holding the VIP never
    /// claims a subnet that is not on the link (a default route would otherwise give `/0`).
    pub fn vip_prefix_len(&self, vip: IpAddr) -> u8 {
        if self.on_link && self.prefix_len > 0 {
            self.prefix_len
        } else {
            max_prefix_len(vip)
        }
    }
}

/// One address held by an interface of this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceAddress {
    /// The index of the interface that holds it.
    pub interface_index: u32,
    /// The name of that interface.
    pub interface_name: String,
    /// The address itself (the local address, for a point-to-point link).
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

impl InterfaceAddress {
    /// The interface that holds the address.
    pub fn interface(&self) -> Interface {
        Interface { index: self.interface_index, name: self.interface_name.clone() }
    }
}

/// The longest prefix length of `address`'s family: 32 for IPv4, 128 for IPv6.
pub(crate) fn max_prefix_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_handles_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<NetError>();
        send_sync::<Netlink>();
        send_sync::<VipPlan>();
        let denied =
            NetError::PermissionDenied { operation: "adding 198.51.100.9/24".into(), capability: "CAP_NET_ADMIN" };
        assert!(denied.is_permission_denied());
        assert_eq!(denied.to_string(), "adding 198.51.100.9/24: permission denied (needs CAP_NET_ADMIN)");
        assert!(!NetError::NoMac { interface: "tun0".into() }.is_permission_denied());
    }
}
