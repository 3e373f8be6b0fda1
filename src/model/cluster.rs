//! Runners and virtual IPs.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{id::validate_name, ModelError, NodeId};

/// Most addresses one VIP service may hold.
pub const MAX_VIPS_PER_SERVICE: usize = 64;

/// What a runner registers about itself (ephemeral, gone with its session).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// The node the runner belongs to.
    pub node: NodeId,
    /// Where its transport listens (`host:port` for TCP, the node id in process).
    pub address: String,
    /// How many tasks it runs at once.
    pub capacity: u32,
    /// When it started, Unix milliseconds.
    pub started_at_ms: i64,
    /// The crate version it runs.
    pub version: String,
}

/// The virtual IPs of one service (`iscsi`, `console`, ...), held by the leader's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipConfig {
    /// The service's name (`[A-Za-z0-9._-]`).
    pub service: String,
    /// The addresses, IPv4 or IPv6, at least one.
    pub addresses: Vec<IpAddr>,
}

impl VipConfig {
    /// A validated configuration; the error names the bad field and value.
    pub fn new(service: impl Into<String>, addresses: Vec<IpAddr>) -> Result<Self, ModelError> {
        let config = VipConfig { service: service.into(), addresses };
        config.validate()?;
        Ok(config)
    }

    /// Checks the service name and every address.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_service_name(&self.service)?;
        if self.addresses.is_empty() {
            return Err(ModelError::invalid("vip addresses", "", "need at least one address"));
        }
        if self.addresses.len() > MAX_VIPS_PER_SERVICE {
            return Err(ModelError::invalid(
                "vip addresses",
                self.addresses.len().to_string(),
                "more than 64 addresses",
            ));
        }
        let mut seen = BTreeSet::new();
        for address in &self.addresses {
            if !seen.insert(address) {
                return Err(ModelError::invalid("vip address", address.to_string(), "listed twice"));
            }
            check_vip_address(address)?;
        }
        Ok(())
    }
}

/// Refuses a VIP service name that is not `[A-Za-z0-9._-]`, 1 to 128 bytes.
pub fn check_service_name(service: &str) -> Result<(), ModelError> {
    validate_name("vip service", service)
}

/// Refuses addresses that cannot serve as a virtual IP.
pub fn check_vip_address(address: &IpAddr) -> Result<(), ModelError> {
    let reason = match address {
        a if a.is_unspecified() => Some("is the unspecified address"),
        a if a.is_loopback() => Some("is a loopback address"),
        a if a.is_multicast() => Some("is a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("is a link-local address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("is a link-local address"),
        _ => None,
    };
    match reason {
        Some(reason) => Err(ModelError::invalid("vip address", address.to_string(), reason)),
        None => Ok(()),
    }
}

/// A route prefix a node publishes, so that any node can tell whether that node could place an
/// address: `network/prefix_len` of its main table, and whether the route rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoutePrefix {
    /// The network address (unspecified for a default route).
    pub network: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
    /// An `unreachable`, `blackhole`, `prohibit` or `throw` route: it covers nothing.
    pub reject: bool,
    /// The route's metric: among routes of equal prefix, the lowest wins.
    #[serde(default)]
    pub metric: u32,
}

impl RoutePrefix {
    /// Whether this prefix contains `ip` (same family, same leading bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32u8, 4),
            IpAddr::V6(v6) => (u128::from(v6), 128u8, 6),
        };
        let ((net, max, family), (addr, _, other)) = (bits(self.network), bits(ip));
        if family != other || self.prefix_len > max {
            return false;
        }
        self.prefix_len == 0 || (net ^ addr) >> (128 - u32::from(self.prefix_len)) == 0
    }
}

/// Whether the longest of `routes` that contains `ip` (the lowest metric among equals) exists
/// and does not reject: a node with these routes can place `ip` (the rule of the VIP server's
/// placement).
pub fn routes_cover(routes: &[RoutePrefix], ip: IpAddr) -> bool {
    routes
        .iter()
        .filter(|r| r.contains(ip))
        .min_by_key(|r| (std::cmp::Reverse(r.prefix_len), r.metric))
        .is_some_and(|r| !r.reject)
}

/// What a node's VIP server reports about itself (ephemeral, gone with its session), for
/// `vip list` and for the leader's decision to hand over a VIP it cannot place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipNodeStatus {
    /// Whether this node leads (and should hold the VIPs).
    pub leading: bool,
    /// Why VIPs are not managed on this node, if they are not.
    pub disabled: Option<String>,
    /// Its main routing table's prefixes.
    pub routes: Vec<RoutePrefix>,
    /// The configured VIPs its interfaces hold now.
    pub holds: Vec<IpAddr>,
    /// VIPs another host answers for, with the hardware addresses that answered.
    pub conflicts: Vec<(IpAddr, Vec<String>)>,
    /// Current errors (a VIP without a route, a failed netlink call).
    pub errors: Vec<String>,
}

impl VipNodeStatus {
    /// Whether this node could place `ip`: VIPs enabled, and a route covers it.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.disabled.is_none() && routes_cover(&self.routes, ip)
    }
}

/// Where one VIP stands, as `vip list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VipState {
    /// Held by exactly one node, and no other host answers for it.
    Placed,
    /// Held, but another host also answers for it (or two nodes hold it).
    Conflict,
    /// No live node with VIPs enabled has a route that covers it.
    NoRoute,
    /// No live node manages VIPs.
    Disabled,
    /// Held by no node yet (no leader, or it is being placed).
    Unplaced,
}

impl std::fmt::Display for VipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VipState::Placed => "placed",
            VipState::Conflict => "conflict",
            VipState::NoRoute => "no-route",
            VipState::Disabled => "disabled",
            VipState::Unplaced => "unplaced",
        })
    }
}

/// One VIP's holders and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAddressStatus {
    /// The VIP.
    pub address: IpAddr,
    /// The nodes whose interfaces hold it (one when all is well).
    pub holders: Vec<NodeId>,
    /// Where it stands.
    pub state: VipState,
    /// Other hardware addresses that answer for it, and errors about it.
    pub notes: Vec<String>,
}

/// Where each address of `config` stands, from the live nodes' reports. Pure.
pub fn vip_address_states(config: &VipConfig, nodes: &[(NodeId, VipNodeStatus)]) -> Vec<VipAddressStatus> {
    config
        .addresses
        .iter()
        .map(|&address| {
            let holders: Vec<NodeId> =
                nodes.iter().filter(|(_, s)| s.holds.contains(&address)).map(|(n, _)| n.clone()).collect();
            let mut notes: Vec<String> = nodes
                .iter()
                .flat_map(|(node, s)| {
                    let conflicts = s.conflicts.iter().filter(|(ip, _)| *ip == address);
                    conflicts.map(move |(_, macs)| format!("{node} sees another host answer: {}", macs.join(", ")))
                })
                .collect();
            let text = address.to_string();
            notes.extend(nodes.iter().flat_map(|(node, s)| {
                s.errors.iter().filter(|e| e.contains(&text)).map(move |e| format!("{node}: {e}"))
            }));
            // No report at all (the nodes are starting): nothing is known to be disabled.
            let managed = nodes.is_empty() || nodes.iter().any(|(_, s)| s.disabled.is_none());
            let state = if holders.len() > 1
                || (!holders.is_empty() && nodes.iter().any(|(_, s)| s.conflicts.iter().any(|(ip, _)| *ip == address)))
            {
                VipState::Conflict
            } else if !managed {
                VipState::Disabled
            } else if !nodes.is_empty() && !nodes.iter().any(|(_, s)| s.covers(address)) {
                VipState::NoRoute
            } else if holders.len() == 1 {
                VipState::Placed
            } else {
                VipState::Unplaced
            };
            VipAddressStatus { address, holders, state, notes }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documentation_addresses() {
        let v =
            VipConfig::new("iscsi", vec!["198.51.100.10".parse().unwrap(), "2001:db8::10".parse().unwrap()]).unwrap();
        assert_eq!(v.addresses.len(), 2);
    }

    #[test]
    fn refuses_addresses_that_cannot_be_vips() {
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "169.254.1.1", "::1", "fe80::1", "ff02::1"]
        {
            let err = VipConfig::new("iscsi", vec![bad.parse().unwrap()]).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        assert!(VipConfig::new("iscsi", vec![]).is_err());
        assert!(VipConfig::new("a/b", vec!["198.51.100.1".parse().unwrap()]).is_err());
        let dup: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(VipConfig::new("iscsi", vec![dup, dup]).is_err());
    }

    fn prefix(network: &str, prefix_len: u8, reject: bool) -> RoutePrefix {
        RoutePrefix { network: network.parse().unwrap(), prefix_len, reject, metric: 0 }
    }

    #[test]
    fn route_cover_follows_the_longest_prefix() {
        let routes =
            [prefix("198.51.100.0", 24, false), prefix("198.51.100.128", 25, true), prefix("2001:db8::", 32, false)];
        assert!(routes_cover(&routes, "198.51.100.9".parse().unwrap()));
        assert!(!routes_cover(&routes, "198.51.100.200".parse().unwrap()), "a more specific reject route wins");
        assert!(!routes_cover(&routes, "203.0.113.9".parse().unwrap()));
        assert!(routes_cover(&routes, "2001:db8::9".parse().unwrap()));
        assert!(!routes_cover(&routes, "2001:db9::9".parse().unwrap()));
        assert!(routes_cover(&[prefix("0.0.0.0", 0, false)], "203.0.113.9".parse().unwrap()));
        assert!(!routes_cover(&[prefix("0.0.0.0", 0, false)], "2001:db8::9".parse().unwrap()), "families do not mix");
        // Equal prefixes: the lowest metric wins, as in the placement's lookup.
        let blackhole_first = [
            RoutePrefix { metric: 10, ..prefix("203.0.113.0", 24, true) },
            RoutePrefix { metric: 100, ..prefix("203.0.113.0", 24, false) },
        ];
        assert!(!routes_cover(&blackhole_first, "203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn vip_states_come_from_what_the_nodes_hold_and_cover() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let config = VipConfig::new(
            "iscsi",
            vec![ip("198.51.100.200"), ip("203.0.113.9"), ip("198.51.100.201"), ip("198.51.100.202")],
        )
        .unwrap();
        let lan = vec![prefix("198.51.100.0", 24, false)];
        let a = VipNodeStatus {
            leading: true,
            routes: lan.clone(),
            holds: vec![ip("198.51.100.200"), ip("198.51.100.202")],
            conflicts: vec![(ip("198.51.100.202"), vec!["02:00:00:00:00:99".into()])],
            ..VipNodeStatus::default()
        };
        let b = VipNodeStatus { routes: lan, ..VipNodeStatus::default() };
        let nodes = [(NodeId::new("a").unwrap(), a), (NodeId::new("b").unwrap(), b)];
        let states: Vec<VipState> = vip_address_states(&config, &nodes).iter().map(|s| s.state).collect();
        assert_eq!(states, [VipState::Placed, VipState::NoRoute, VipState::Unplaced, VipState::Conflict]);
        let disabled: Vec<(NodeId, VipNodeStatus)> = nodes
            .iter()
            .map(|(n, s)| (n.clone(), VipNodeStatus { disabled: Some("off".into()), holds: vec![], ..s.clone() }))
            .collect();
        assert!(vip_address_states(&config, &disabled)
            .iter()
            .all(|s| s.state == VipState::Disabled && s.holders.is_empty()));
    }
}
