//! The rtnetlink connection: routes, addresses and link addresses of this node's namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{AddressMessageBuilder, RouteMessageBuilder};

use super::{max_prefix_len, InterfaceAddress, NetError, Result, RouteMatch, VipPlan};

/// The kernel's id of the main routing table (`RT_TABLE_MAIN`).
const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// One connection to the kernel's routing netlink (rtnetlink), in the network namespace of the
/// thread that created it.
///
/// Cheap to clone: clones share the connection, whose task ends when the last clone is dropped.
/// Requests are answered by the kernel synchronously and never block the calling thread.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a connection and spawns its task on the current tokio runtime.
    ///
    /// The socket belongs to the network namespace of the **calling thread**: call this on a
    /// thread in the namespace whose routes and addresses are wanted (in production, any thread
    /// of a process that never called `setns`).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns the connection task, as `tokio::spawn` does).
    pub fn new() -> Result<Netlink> {
        let (connection, handle, _unsolicited) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The kernel's longest-prefix match for `ip` in the main routing table (like
    /// `ip route get fibmatch`, but over a dump of the table: see [`RoutingTable`] for why and
    /// for the rules). `None` when no route covers it, or when the best route rejects it
    /// (`unreachable`, `blackhole`, `prohibit`, `throw`).
    ///
    /// This dumps the whole table and the links; to place several VIPs, take one
    /// [`Netlink::routing_table`] and look each up in it.
    pub async fn route_for(&self, ip: IpAddr) -> Result<Option<RouteMatch>> {
        Ok(self.routing_table().await?.lookup(ip))
    }

    /// A snapshot of the main routing table (IPv4 and IPv6), for [`RoutingTable::lookup`].
    pub async fn routing_table(&self) -> Result<RoutingTable> {
        let names = self.interface_names().await?;
        let mut messages = self.dump_routes(RouteMessageBuilder::<Ipv4Addr>::new().build(), "IPv4").await?;
        messages.extend(self.dump_routes(RouteMessageBuilder::<Ipv6Addr>::new().build(), "IPv6").await?);
        Ok(RoutingTable::from_messages(&messages, &names))
    }

    /// Every address on every interface of this namespace, IPv4 and IPv6 (`ip addr show`).
    pub async fn addresses(&self) -> Result<Vec<InterfaceAddress>> {
        let names = self.interface_names().await?;
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| netlink_error("dumping the addresses".into(), source))?;
        Ok(messages.iter().filter_map(|message| interface_address(message, &names)).collect())
    }

    /// Adds `ip`/`prefix_len` on interface `interface_index`, with `noprefixroute` (and `nodad`
    /// for IPv6; see the [module docs](super)). Idempotent: `Ok(false)` when the interface
    /// already holds that address (with the same prefix length, for IPv4), `Ok(true)` when it
    /// was added.
    pub async fn add_address(&self, interface_index: u32, ip: IpAddr, prefix_len: u8) -> Result<bool> {
        check_prefix(ip, prefix_len)?;
        let operation = format!("adding {ip}/{prefix_len} on interface index {interface_index}");
        let mut request = self.handle.address().add(interface_index, ip, prefix_len);
        let flags = match ip {
            IpAddr::V4(_) => AddressFlags::Noprefixroute,
            IpAddr::V6(_) => AddressFlags::Noprefixroute | AddressFlags::Nodad,
        };
        request.message_mut().attributes.push(AddressAttribute::Flags(flags));
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(error) if errno(&error) == Some(libc::EEXIST) => Ok(false),
            Err(error) => Err(refused(operation, interface_index, error)),
        }
    }

    /// Removes `ip`/`prefix_len` from interface `interface_index` (the prefix length must be the
    /// one it is held with: see [`Netlink::addresses`]). Idempotent: `Ok(false)` when the
    /// interface does not hold it, `Ok(true)` when it was removed.
    pub async fn remove_address(&self, interface_index: u32, ip: IpAddr, prefix_len: u8) -> Result<bool> {
        check_prefix(ip, prefix_len)?;
        let operation = format!("removing {ip}/{prefix_len} from interface index {interface_index}");
        let message = match ip {
            IpAddr::V4(v4) => {
                AddressMessageBuilder::<Ipv4Addr>::new().index(interface_index).address(v4, prefix_len).build()
            }
            IpAddr::V6(v6) => {
                AddressMessageBuilder::<Ipv6Addr>::new().index(interface_index).address(v6, prefix_len).build()
            }
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(true),
            Err(error) if errno(&error) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(error) => Err(refused(operation, interface_index, error)),
        }
    }

    /// The Ethernet (MAC) address of interface `interface_index`.
    pub async fn interface_mac(&self, interface_index: u32) -> Result<[u8; 6]> {
        let operation = format!("reading the link of interface index {interface_index}");
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(interface_index)
            .execute()
            .try_collect()
            .await
            .map_err(|error| refused(operation, interface_index, error))?;
        let link = links.first().ok_or_else(|| no_such_interface(interface_index))?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| NetError::NoMac { interface: format!("index {interface_index}") })
    }

    /// Plans the placement of `vips` from fresh routes and addresses: [`super::plan`] over
    /// [`Netlink::routing_table`] and [`Netlink::addresses`].
    pub async fn plan(&self, vips: &[IpAddr]) -> Result<VipPlan> {
        let table = self.routing_table().await?;
        let current = self.addresses().await?;
        Ok(super::plan(vips, |ip| table.lookup(ip), &current))
    }

    /// Interface index -> name, for every link of this namespace.
    async fn interface_names(&self) -> Result<HashMap<u32, String>> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| netlink_error("dumping the links".into(), source))?;
        Ok(links
            .iter()
            .filter_map(|link| {
                link.attributes.iter().find_map(|attribute| match attribute {
                    LinkAttribute::IfName(name) => Some((link.header.index, name.clone())),
                    _ => None,
                })
            })
            .collect())
    }

    /// Every route of one family, all tables (without strict checking, the kernel ignores the
    /// request's table; [`RoutingTable`] keeps the main one).
    async fn dump_routes(&self, request: RouteMessage, family: &str) -> Result<Vec<RouteMessage>> {
        self.handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(|source| netlink_error(format!("dumping the {family} routes"), source))
    }
}

/// A snapshot of the main routing table, for longest-prefix matches.
///
/// Why not the kernel's own lookup (`RTM_GETROUTE` with `RTM_F_FIB_MATCH`, as
/// `ip route get fibmatch` does)? The kernel consults the `local` table first, so for an address
/// this node holds it answers with that address's host route (`local 198.51.100.200 dev a`, a
/// /32 or /128 on whichever interface holds it): the VIP server could then never tell a VIP in
/// the right place from one on a wrong interface, nor learn the prefix length to use. The
/// lookup here is the same longest-prefix match, restricted to the main table.
///
/// The rules of [`RoutingTable::lookup`]:
/// - only main-table routes of the address's family, without source prefix (IPv6 source
///   routing) or TOS selector, take part;
/// - the longest prefix wins; among equal prefixes, the lowest metric; then the kernel's order;
/// - a winning `unicast` route gives its output interface (the first next hop of a multipath
///   route), its prefix length, and matches even through a gateway (a default route gives
///   prefix length 0);
/// - a winning `unreachable`, `blackhole`, `prohibit` or `throw` route gives `None`, as does no
///   covering route at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingTable {
    routes: Vec<TableRoute>,
}

/// One main-table route, reduced to what the match needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TableRoute {
    /// The network address (unspecified for a default route).
    destination: IpAddr,
    /// The prefix length.
    prefix_len: u8,
    /// The route's metric (`RTA_PRIORITY`, 0 when absent).
    metric: u32,
    /// Where it sends: an interface, or nowhere.
    target: RouteTarget,
    /// No gateway: the network is on the interface's link.
    on_link: bool,
}

/// Where a route sends matching packets.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RouteTarget {
    /// Out of this interface (index, name).
    Interface(u32, String),
    /// Nowhere: `unreachable`, `blackhole`, `prohibit`, `throw`.
    Reject,
}

impl RoutingTable {
    /// The route chosen for `ip`, by the rules in the [type docs](RoutingTable).
    pub fn lookup(&self, ip: IpAddr) -> Option<RouteMatch> {
        let best = self
            .routes
            .iter()
            .filter(|route| covers(route.destination, route.prefix_len, ip))
            .min_by_key(|route| (std::cmp::Reverse(route.prefix_len), route.metric))?;
        match &best.target {
            RouteTarget::Interface(index, name) => Some(RouteMatch {
                interface_index: *index,
                interface_name: name.clone(),
                prefix_len: best.prefix_len,
                on_link: best.on_link,
            }),
            RouteTarget::Reject => None,
        }
    }

    /// The prefixes of the routes that take part in lookups, for a node's VIP report
    /// ([`routes_cover`](crate::model::routes_cover) over them agrees with
    /// [`RoutingTable::lookup`] on whether an address is covered).
    pub fn prefixes(&self) -> Vec<crate::model::RoutePrefix> {
        let mut prefixes: Vec<crate::model::RoutePrefix> = self
            .routes
            .iter()
            .map(|route| crate::model::RoutePrefix {
                network: route.destination,
                prefix_len: route.prefix_len,
                reject: route.target == RouteTarget::Reject,
                metric: route.metric,
            })
            .collect();
        prefixes.sort_by_key(|p| (p.network, p.prefix_len, p.metric, p.reject));
        prefixes.dedup();
        prefixes
    }

    /// How many routes take part in lookups.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route takes part in lookups (every lookup is `None`).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Keeps the main-table routes of `messages` that can take part (see the type docs);
    /// `names` maps interface indexes to names (a route through an interface missing from it,
    /// removed between the two dumps, is left out).
    fn from_messages(messages: &[RouteMessage], names: &HashMap<u32, String>) -> RoutingTable {
        RoutingTable { routes: messages.iter().filter_map(|message| table_route(message, names)).collect() }
    }
}

/// Reduces one dumped route to a [`TableRoute`], or `None` if it takes no part.
fn table_route(message: &RouteMessage, names: &HashMap<u32, String>) -> Option<TableRoute> {
    let header = &message.header;
    let unspecified = match header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let (mut table, mut destination, mut oif, mut metric) = (u32::from(header.table), unspecified, None, 0);
    let mut on_link = true;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => destination = IpAddr::V4(*v4),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => destination = IpAddr::V6(*v6),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::MultiPath(hops) if oif.is_none() => {
                oif = hops.first().map(|hop| hop.interface_index);
                let via = |a: &RouteAttribute| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_));
                on_link &= !hops.first().is_some_and(|hop| hop.attributes.iter().any(via));
            }
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => on_link = false,
            RouteAttribute::Priority(priority) => metric = *priority,
            _ => {}
        }
    }
    let selective = header.source_prefix_length != 0 || header.tos != 0;
    if table != MAIN_TABLE || selective || header.destination_prefix_length > max_prefix_len(unspecified) {
        return None;
    }
    let target = match header.kind {
        RouteType::Unicast => {
            let index = oif?;
            RouteTarget::Interface(index, names.get(&index)?.clone())
        }
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw => RouteTarget::Reject,
        _ => return None,
    };
    Some(TableRoute { destination, prefix_len: header.destination_prefix_length, metric, target, on_link })
}

/// True when `network`/`prefix_len` covers `ip` (same family, same leading `prefix_len` bits).
fn covers(network: IpAddr, prefix_len: u8, ip: IpAddr) -> bool {
    fn same_prefix(a: u128, b: u128, prefix_len: u8, bits: u8) -> bool {
        prefix_len == 0 || (prefix_len <= bits && (a ^ b) >> (bits - prefix_len) == 0)
    }
    match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(u32::from(n).into(), u32::from(a).into(), prefix_len, 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(n.into(), a.into(), prefix_len, 128),
        _ => false,
    }
}

/// Reduces one dumped address to an [`InterfaceAddress`] (`IFA_LOCAL` when present, which is the
/// local side of a point-to-point address; `IFA_ADDRESS` otherwise).
fn interface_address(message: &AddressMessage, names: &HashMap<u32, String>) -> Option<InterfaceAddress> {
    let (mut local, mut address) = (None, None);
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let index = message.header.index;
    Some(InterfaceAddress {
        interface_index: index,
        interface_name: names.get(&index).cloned().unwrap_or_else(|| format!("index {index}")),
        address: local.or(address)?,
        prefix_len: message.header.prefix_len,
    })
}

/// Refuses a prefix length longer than the address.
fn check_prefix(address: IpAddr, prefix_len: u8) -> Result<()> {
    if prefix_len > max_prefix_len(address) {
        return Err(NetError::InvalidPrefix { address, prefix_len });
    }
    Ok(())
}

/// The kernel's errno in a refused request (positive: `libc::EEXIST`, ...).
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()).filter(|code| *code != 0),
        _ => None,
    }
}

/// A failed request on one interface: lack of privilege and a missing interface get their own
/// variants.
fn refused(operation: String, interface_index: u32, error: rtnetlink::Error) -> NetError {
    match errno(&error) {
        Some(libc::ENODEV) => no_such_interface(interface_index),
        _ => netlink_error(operation, error),
    }
}

/// A failed request: lack of privilege gets its own variant.
fn netlink_error(operation: String, source: rtnetlink::Error) -> NetError {
    match errno(&source) {
        Some(libc::EPERM | libc::EACCES) => NetError::PermissionDenied { operation, capability: "CAP_NET_ADMIN" },
        _ => NetError::Netlink { operation, source },
    }
}

fn no_such_interface(interface_index: u32) -> NetError {
    NetError::NoSuchInterface { interface: format!("index {interface_index}") }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::route::RouteNextHop;

    use super::*;

    fn names() -> HashMap<u32, String> {
        [(2, "a"), (3, "b"), (4, "c")].into_iter().map(|(i, n)| (i, n.to_string())).collect()
    }

    /// A dumped main-table route: `destination`/`prefix_len` out of `oif`.
    fn message(destination: &str, prefix_len: u8, oif: u32) -> RouteMessage {
        let destination: IpAddr = destination.parse().unwrap();
        let mut message = RouteMessage::default();
        message.header.address_family = if destination.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        message.header.destination_prefix_length = prefix_len;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.kind = RouteType::Unicast;
        if prefix_len > 0 {
            message.attributes.push(RouteAttribute::Destination(destination.into()));
        }
        message.attributes.push(RouteAttribute::Oif(oif));
        message
    }

    fn lookup(table: &RoutingTable, ip: &str) -> Option<(String, u8)> {
        table.lookup(ip.parse().unwrap()).map(|found| (found.interface_name, found.prefix_len))
    }

    fn found(name: &str, prefix_len: u8) -> Option<(String, u8)> {
        Some((name.to_string(), prefix_len))
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_order() {
        let mut messages = vec![message("198.51.100.0", 24, 2), message("198.51.100.128", 25, 3)];
        for _ in 0..2 {
            let table = RoutingTable::from_messages(&messages, &names());
            assert_eq!(lookup(&table, "198.51.100.200"), found("b", 25));
            assert_eq!(lookup(&table, "198.51.100.20"), found("a", 24));
            assert_eq!(lookup(&table, "198.51.101.1"), None);
            assert_eq!(lookup(&table, "203.0.113.5"), None);
            messages.reverse();
        }
    }

    #[test]
    fn a_default_route_matches_with_prefix_zero() {
        let table = RoutingTable::from_messages(
            &[message("0.0.0.0", 0, 4), message("198.51.100.0", 24, 2), message("::", 0, 3)],
            &names(),
        );
        assert_eq!(lookup(&table, "203.0.113.5"), found("c", 0));
        assert_eq!(lookup(&table, "198.51.100.9"), found("a", 24));
        assert_eq!(lookup(&table, "2001:db8::1"), found("b", 0));
    }

    #[test]
    fn a_route_through_a_gateway_is_not_on_link() {
        let mut via = message("0.0.0.0", 0, 4);
        via.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet("198.51.100.1".parse().unwrap())));
        let table = RoutingTable::from_messages(&[via, message("198.51.100.0", 24, 2)], &names());
        let default = table.lookup("203.0.113.5".parse().unwrap()).unwrap();
        assert!(!default.on_link);
        assert_eq!(default.vip_prefix_len("203.0.113.5".parse().unwrap()), 32);
        let connected = table.lookup("198.51.100.9".parse().unwrap()).unwrap();
        assert!(connected.on_link);
        assert_eq!(connected.vip_prefix_len("198.51.100.9".parse().unwrap()), 24);
    }

    #[test]
    fn families_do_not_mix() {
        let table = RoutingTable::from_messages(&[message("::", 0, 3)], &names());
        assert_eq!(lookup(&table, "198.51.100.1"), None);
        let table = RoutingTable::from_messages(&[message("0.0.0.0", 0, 3)], &names());
        assert_eq!(lookup(&table, "2001:db8::1"), None);
    }

    #[test]
    fn ipv6_prefixes_match_bit_by_bit() {
        let table = RoutingTable::from_messages(
            &[message("2001:db8:1::", 64, 2), message("2001:db8::", 32, 3), message("2001:db8:1::8", 125, 4)],
            &names(),
        );
        assert_eq!(lookup(&table, "2001:db8:1::10"), found("a", 64));
        assert_eq!(lookup(&table, "2001:db8:1::9"), found("c", 125));
        assert_eq!(lookup(&table, "2001:db8:2::1"), found("b", 32));
        assert_eq!(lookup(&table, "2001:db9::1"), None);
    }

    #[test]
    fn host_routes_match_only_their_address() {
        let table = RoutingTable::from_messages(&[message("203.0.113.7", 32, 2)], &names());
        assert_eq!(lookup(&table, "203.0.113.7"), found("a", 32));
        assert_eq!(lookup(&table, "203.0.113.6"), None);
    }

    #[test]
    fn the_lowest_metric_wins_among_equal_prefixes() {
        let mut high = message("198.51.100.0", 24, 2);
        high.attributes.push(RouteAttribute::Priority(200));
        let mut low = message("198.51.100.0", 24, 3);
        low.attributes.push(RouteAttribute::Priority(100));
        let table = RoutingTable::from_messages(&[high, low], &names());
        assert_eq!(lookup(&table, "198.51.100.1"), found("b", 24));
    }

    #[test]
    fn a_rejecting_route_hides_shorter_ones() {
        let mut unreachable = message("203.0.113.64", 26, 0);
        unreachable.header.kind = RouteType::Unreachable;
        unreachable.attributes.retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        let table = RoutingTable::from_messages(&[message("0.0.0.0", 0, 2), unreachable], &names());
        assert_eq!(lookup(&table, "203.0.113.70"), None);
        assert_eq!(lookup(&table, "203.0.113.5"), found("a", 0));
    }

    #[test]
    fn only_main_table_unicast_routes_take_part() {
        let mut local = message("198.51.100.200", 32, 3);
        local.header.table = 255;
        local.header.kind = RouteType::Local;
        let mut other_table = message("198.51.100.0", 25, 4);
        other_table.header.table = 252;
        other_table.attributes.push(RouteAttribute::Table(1000));
        let mut big_main = message("198.51.100.0", 26, 4);
        big_main.header.table = 252;
        big_main.attributes.push(RouteAttribute::Table(MAIN_TABLE));
        let mut source_routed = message("198.51.100.0", 27, 4);
        source_routed.header.source_prefix_length = 64;
        let mut tos = message("198.51.100.0", 28, 4);
        tos.header.tos = 0x10;
        let routes = [message("198.51.100.0", 24, 2), local, other_table, source_routed, tos];
        let table = RoutingTable::from_messages(&routes, &names());
        assert_eq!(table.len(), 1);
        assert_eq!(lookup(&table, "198.51.100.200"), found("a", 24));
        // A main-table route announced through RTA_TABLE counts.
        let table = RoutingTable::from_messages(&[message("198.51.100.0", 24, 2), big_main], &names());
        assert_eq!(lookup(&table, "198.51.100.1"), found("c", 26));
    }

    #[test]
    fn multipath_routes_use_their_first_hop_and_unknown_interfaces_are_skipped() {
        let mut multipath = message("198.51.100.0", 24, 0);
        multipath.attributes.retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        let mut hop = RouteNextHop::default();
        hop.interface_index = 3;
        multipath.attributes.push(RouteAttribute::MultiPath(vec![hop]));
        let gone = message("198.51.100.0", 25, 99);
        let table = RoutingTable::from_messages(&[multipath, gone], &names());
        assert_eq!(table.len(), 1);
        assert_eq!(lookup(&table, "198.51.100.1"), found("b", 24));
    }

    #[test]
    fn covers_handles_the_edges() {
        let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert!(covers(v4("0.0.0.0"), 0, v4("255.255.255.255")));
        assert!(covers(v4("198.51.100.128"), 25, v4("198.51.100.255")));
        assert!(!covers(v4("198.51.100.128"), 25, v4("198.51.100.127")));
        assert!(!covers(v4("198.51.100.1"), 33, v4("198.51.100.1")));
        assert!(covers(v4("2001:db8::"), 128, v4("2001:db8::")));
        assert!(!covers(v4("2001:db8::"), 128, v4("2001:db8::1")));
    }

    #[test]
    fn addresses_prefer_the_local_attribute() {
        let mut message = AddressMessage::default();
        message.header.index = 2;
        message.header.prefix_len = 32;
        message.attributes.push(AddressAttribute::Address("203.0.113.1".parse().unwrap()));
        message.attributes.push(AddressAttribute::Local("198.51.100.1".parse().unwrap()));
        let address = interface_address(&message, &names()).unwrap();
        assert_eq!(address.address, "198.51.100.1".parse::<IpAddr>().unwrap());
        assert_eq!((address.interface_name.as_str(), address.prefix_len), ("a", 32));
        message.attributes.remove(1);
        assert_eq!(interface_address(&message, &names()).unwrap().address, "203.0.113.1".parse::<IpAddr>().unwrap());
    }
}
