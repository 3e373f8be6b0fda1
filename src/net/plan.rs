//! Where each VIP belongs, and getting it there: the pure [`plan`], then [`apply`] (leader) or
//! [`remove_vips`] (follower).

use std::collections::HashSet;
use std::net::IpAddr;

use super::{Interface, InterfaceAddress, Netlink, Result, RouteMatch};

/// What to do with one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VipAction {
    /// Held on the interface its route picks, and on no other: nothing to do. The prefix length
    /// it is held with is not judged (a VIP that works is never taken down to change it).
    InPlace {
        /// The interface that holds it.
        interface: Interface,
    },
    /// Held nowhere: add it on `interface` with `prefix_len`, then announce it.
    Add {
        /// The interface its route picks.
        interface: Interface,
        /// The route's prefix length.
        prefix_len: u8,
    },
    /// Held on interfaces its route does not pick (`from`, each with the prefix length it is
    /// held with): add it on `to` (nothing to add if `to` holds it already), remove it from
    /// every `from`, then announce it.
    Move {
        /// The wrong places, never empty.
        from: Vec<InterfaceAddress>,
        /// The interface its route picks.
        to: Interface,
        /// The prefix length on `to`: the route's, or the one it is already held with there.
        prefix_len: u8,
    },
    /// No route covers it (no matching route and no default route, or a rejecting route):
    /// an error the caller reports (the leader gives up leadership so another node can try).
    /// Nothing is changed for it, wherever it is held.
    NoRoute,
}

/// One VIP and what to do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipStep {
    /// The VIP.
    pub vip: IpAddr,
    /// What to do with it.
    pub action: VipAction,
}

/// What to do with each configured VIP, in the configured order (a VIP listed twice is planned
/// once). Built by [`plan`], carried out by [`apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipPlan {
    /// One step per distinct VIP.
    pub steps: Vec<VipStep>,
}

impl VipPlan {
    /// The VIPs that no route covers ([`VipAction::NoRoute`]), to report.
    pub fn unroutable(&self) -> Vec<IpAddr> {
        self.steps.iter().filter(|step| step.action == VipAction::NoRoute).map(|step| step.vip).collect()
    }

    /// True when every VIP is [`VipAction::InPlace`]: applying the plan would change nothing.
    pub fn is_settled(&self) -> bool {
        self.steps.iter().all(|step| matches!(step.action, VipAction::InPlace { .. }))
    }

    /// The interface that holds `vip` once the plan is applied: `None` for a VIP not in the plan
    /// or without a route.
    pub fn interface_of(&self, vip: IpAddr) -> Option<&Interface> {
        self.steps.iter().find(|step| step.vip == vip).and_then(|step| step.target())
    }

    /// Every routable VIP with the interface that holds it once the plan is applied: what the
    /// ARP syncer announces each round.
    pub fn placements(&self) -> impl Iterator<Item = (IpAddr, &Interface)> + '_ {
        self.steps.iter().filter_map(|step| step.target().map(|interface| (step.vip, interface)))
    }
}

impl VipStep {
    /// The interface that holds the VIP once the step is done (`None` for [`VipAction::NoRoute`]).
    pub fn target(&self) -> Option<&Interface> {
        match &self.action {
            VipAction::InPlace { interface } | VipAction::Add { interface, .. } => Some(interface),
            VipAction::Move { to, .. } => Some(to),
            VipAction::NoRoute => None,
        }
    }
}

/// Decides, for each VIP, where it belongs and what to change: `routes` gives the route for a VIP
/// (e.g. [`RoutingTable::lookup`](super::RoutingTable::lookup)), `current` every address on
/// the node's interfaces ([`Netlink::addresses`]). Pure: changes nothing.
///
/// A VIP goes on its route's interface with [`RouteMatch::vip_prefix_len`]: the route's prefix
/// for an on-link route, a host prefix otherwise. Held there and nowhere
/// else: [`VipAction::InPlace`]. Held nowhere: [`VipAction::Add`]. Held anywhere else (whether
/// or not also in the right place): [`VipAction::Move`]. No route: [`VipAction::NoRoute`].
pub fn plan(vips: &[IpAddr], routes: impl Fn(IpAddr) -> Option<RouteMatch>, current: &[InterfaceAddress]) -> VipPlan {
    let mut seen = HashSet::new();
    let steps = vips
        .iter()
        .filter(|vip| seen.insert(**vip))
        .map(|&vip| VipStep { vip, action: plan_one(vip, routes(vip), current) })
        .collect();
    VipPlan { steps }
}

/// The action for one VIP, given its route and the node's addresses.
fn plan_one(vip: IpAddr, route: Option<RouteMatch>, current: &[InterfaceAddress]) -> VipAction {
    let Some(route) = route else {
        return VipAction::NoRoute;
    };
    let held: Vec<&InterfaceAddress> = current.iter().filter(|address| address.address == vip).collect();
    let in_place = held.iter().find(|address| address.interface_index == route.interface_index);
    let from: Vec<InterfaceAddress> =
        held.iter().filter(|address| address.interface_index != route.interface_index).map(|a| (*a).clone()).collect();
    match (in_place, from.is_empty()) {
        (Some(_), true) => VipAction::InPlace { interface: route.interface() },
        (None, true) => VipAction::Add { interface: route.interface(), prefix_len: route.vip_prefix_len(vip) },
        (in_place, false) => VipAction::Move {
            from,
            to: route.interface(),
            prefix_len: in_place.map_or(route.vip_prefix_len(vip), |address| address.prefix_len),
        },
    }
}

/// Carries out `plan` on this node: adds missing VIPs and moves misplaced ones (added on the
/// right interface first, then removed from the wrong ones, so the node never stops holding a
/// VIP it held). Returns the VIPs that were added or moved, in plan order, to announce on
/// [`VipPlan::interface_of`]. [`VipAction::InPlace`] and [`VipAction::NoRoute`] steps change
/// nothing; the caller reports [`VipPlan::unroutable`].
///
/// A VIP that fails does not hold back the others: its error is returned beside the VIPs that
/// were placed (the caller reports it and re-plans next round). Stops at once on
/// [`NetError::PermissionDenied`](super::NetError::PermissionDenied), which no other VIP would
/// escape either.
pub async fn apply(netlink: &Netlink, plan: &VipPlan) -> Result<(Vec<IpAddr>, Vec<(IpAddr, super::NetError)>)> {
    let mut to_announce = Vec::new();
    let mut failed = Vec::new();
    for step in &plan.steps {
        let done = match &step.action {
            VipAction::InPlace { .. } | VipAction::NoRoute => continue,
            VipAction::Add { interface, prefix_len } => {
                netlink.add_address(interface.index, step.vip, *prefix_len).await.map(|_| ())
            }
            VipAction::Move { from, to, prefix_len } => {
                let mut done = netlink.add_address(to.index, step.vip, *prefix_len).await.map(|_| ());
                for wrong in from {
                    if done.is_err() {
                        break;
                    }
                    done = netlink
                        .remove_address(wrong.interface_index, wrong.address, wrong.prefix_len)
                        .await
                        .map(|_| ());
                }
                done
            }
        };
        match done {
            Ok(()) => {
                tracing::info!(vip = %step.vip, action = ?step.action, "vip placed");
                to_announce.push(step.vip);
            }
            Err(e) if e.is_permission_denied() => return Err(e),
            Err(e) => failed.push((step.vip, e)),
        }
    }
    Ok((to_announce, failed))
}

/// Removes every one of `vips` from every interface of this node (a follower's duty, invariant
/// 7). Returns how many addresses were removed (a VIP held on two interfaces counts twice);
/// 0 when none was held.
pub async fn remove_vips(netlink: &Netlink, vips: &[IpAddr]) -> Result<usize> {
    let vips: HashSet<IpAddr> = vips.iter().copied().collect();
    let mut removed = 0;
    for held in netlink.addresses().await?.into_iter().filter(|address| vips.contains(&address.address)) {
        if netlink.remove_address(held.interface_index, held.address, held.prefix_len).await? {
            tracing::info!(vip = %held.address, interface = %held.interface_name, "vip removed");
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn interface(index: u32) -> Interface {
        Interface { index, name: format!("eth{index}") }
    }

    fn route(index: u32, prefix_len: u8) -> RouteMatch {
        RouteMatch { interface_index: index, interface_name: format!("eth{index}"), prefix_len, on_link: true }
    }

    fn held(index: u32, address: &str, prefix_len: u8) -> InterfaceAddress {
        InterfaceAddress {
            interface_index: index,
            interface_name: format!("eth{index}"),
            address: ip(address),
            prefix_len,
        }
    }

    /// A fake routing table: VIP -> route.
    fn routes(table: &[(&str, RouteMatch)]) -> impl Fn(IpAddr) -> Option<RouteMatch> {
        let table: HashMap<IpAddr, RouteMatch> = table.iter().map(|(vip, route)| (ip(vip), route.clone())).collect();
        move |vip| table.get(&vip).cloned()
    }

    fn action(plan: &VipPlan, vip: &str) -> VipAction {
        plan.steps.iter().find(|step| step.vip == ip(vip)).unwrap().action.clone()
    }

    #[test]
    fn a_missing_vip_is_added_with_the_route_prefix() {
        let current = [held(2, "198.51.100.1", 24)];
        let plan = plan(&[ip("198.51.100.20")], routes(&[("198.51.100.20", route(2, 24))]), &current);
        assert_eq!(action(&plan, "198.51.100.20"), VipAction::Add { interface: interface(2), prefix_len: 24 });
        assert!(!plan.is_settled());
        assert_eq!(plan.interface_of(ip("198.51.100.20")), Some(&interface(2)));
    }

    #[test]
    fn a_vip_routed_through_a_gateway_or_a_default_route_gets_a_host_prefix() {
        let via = |prefix_len| RouteMatch { on_link: false, ..route(3, prefix_len) };
        let vips = [ip("203.0.113.7"), ip("2001:db8:5::7"), ip("198.51.100.7")];
        let table = [("203.0.113.7", via(0)), ("2001:db8:5::7", via(48)), ("198.51.100.7", route(2, 0))];
        let plan = plan(&vips, routes(&table), &[]);
        assert_eq!(action(&plan, "203.0.113.7"), VipAction::Add { interface: interface(3), prefix_len: 32 });
        assert_eq!(action(&plan, "2001:db8:5::7"), VipAction::Add { interface: interface(3), prefix_len: 128 });
        // An on-link default route (a point-to-point link) is no subnet either.
        assert_eq!(action(&plan, "198.51.100.7"), VipAction::Add { interface: interface(2), prefix_len: 32 });
    }

    #[test]
    fn a_vip_on_its_route_interface_is_in_place_whatever_its_prefix() {
        for prefix_len in [24, 32] {
            let current = [held(2, "198.51.100.1", 24), held(2, "198.51.100.20", prefix_len)];
            let plan = plan(&[ip("198.51.100.20")], routes(&[("198.51.100.20", route(2, 24))]), &current);
            assert_eq!(action(&plan, "198.51.100.20"), VipAction::InPlace { interface: interface(2) });
            assert!(plan.is_settled());
        }
    }

    #[test]
    fn a_vip_on_a_wrong_interface_is_moved() {
        let current = [held(2, "198.51.100.200", 24), held(3, "198.51.100.129", 25)];
        let plan = plan(&[ip("198.51.100.200")], routes(&[("198.51.100.200", route(3, 25))]), &current);
        assert_eq!(
            action(&plan, "198.51.100.200"),
            VipAction::Move { from: vec![held(2, "198.51.100.200", 24)], to: interface(3), prefix_len: 25 }
        );
        assert_eq!(plan.interface_of(ip("198.51.100.200")), Some(&interface(3)));
    }

    #[test]
    fn a_vip_held_in_two_wrong_places_is_removed_from_both() {
        let current = [held(2, "2001:db8::10", 64), held(4, "2001:db8::10", 128)];
        let plan = plan(&[ip("2001:db8::10")], routes(&[("2001:db8::10", route(3, 64))]), &current);
        assert_eq!(
            action(&plan, "2001:db8::10"),
            VipAction::Move {
                from: vec![held(2, "2001:db8::10", 64), held(4, "2001:db8::10", 128)],
                to: interface(3),
                prefix_len: 64,
            }
        );
    }

    #[test]
    fn a_vip_in_place_and_also_elsewhere_keeps_its_prefix_where_it_belongs() {
        let current = [held(2, "198.51.100.20", 32), held(3, "198.51.100.20", 24)];
        let plan = plan(&[ip("198.51.100.20")], routes(&[("198.51.100.20", route(2, 24))]), &current);
        assert_eq!(
            action(&plan, "198.51.100.20"),
            VipAction::Move { from: vec![held(3, "198.51.100.20", 24)], to: interface(2), prefix_len: 32 }
        );
    }

    #[test]
    fn a_vip_without_route_is_reported_and_left_alone() {
        let current = [held(2, "203.0.113.5", 24)];
        let plan = plan(&[ip("203.0.113.5"), ip("203.0.113.6")], routes(&[]), &current);
        assert_eq!(action(&plan, "203.0.113.5"), VipAction::NoRoute);
        assert_eq!(action(&plan, "203.0.113.6"), VipAction::NoRoute);
        assert_eq!(plan.unroutable(), vec![ip("203.0.113.5"), ip("203.0.113.6")]);
        assert!(!plan.is_settled());
        assert_eq!(plan.interface_of(ip("203.0.113.5")), None);
        assert_eq!(plan.placements().count(), 0);
    }

    #[test]
    fn other_addresses_never_count_as_the_vip() {
        // The same address bits in the other family, a neighbour address, a containing subnet.
        let current = [held(2, "::ffff:198.51.100.20", 128), held(2, "198.51.100.21", 24), held(3, "198.51.100.0", 24)];
        let plan = plan(&[ip("198.51.100.20")], routes(&[("198.51.100.20", route(3, 24))]), &current);
        assert_eq!(action(&plan, "198.51.100.20"), VipAction::Add { interface: interface(3), prefix_len: 24 });
    }

    #[test]
    fn steps_follow_the_configured_order_once_per_vip() {
        let vips = [ip("198.51.100.30"), ip("2001:db8::30"), ip("198.51.100.30"), ip("198.51.100.10")];
        let table =
            routes(&[("198.51.100.30", route(2, 24)), ("2001:db8::30", route(2, 64)), ("198.51.100.10", route(2, 24))]);
        let plan = plan(&vips, table, &[held(2, "198.51.100.10", 24)]);
        let order: Vec<IpAddr> = plan.steps.iter().map(|step| step.vip).collect();
        assert_eq!(order, vec![ip("198.51.100.30"), ip("2001:db8::30"), ip("198.51.100.10")]);
        let placements: Vec<(IpAddr, u32)> = plan.placements().map(|(vip, i)| (vip, i.index)).collect();
        assert_eq!(placements, vec![(ip("198.51.100.30"), 2), (ip("2001:db8::30"), 2), (ip("198.51.100.10"), 2)]);
    }

    #[test]
    fn an_empty_configuration_is_settled() {
        let plan = plan(&[], routes(&[]), &[held(2, "198.51.100.1", 24)]);
        assert!(plan.steps.is_empty());
        assert!(plan.is_settled());
        assert!(plan.unroutable().is_empty());
    }

    #[test]
    fn a_mixed_configuration_plans_each_vip_on_its_own() {
        let current = [
            held(2, "198.51.100.1", 24),
            held(3, "198.51.100.129", 25),
            held(2, "198.51.100.200", 24),
            held(3, "198.51.100.150", 25),
        ];
        let table = routes(&[
            ("198.51.100.20", route(2, 24)),
            ("198.51.100.200", route(3, 25)),
            ("198.51.100.150", route(3, 25)),
            ("2001:db8:1::20", route(2, 64)),
        ]);
        let vips = ["198.51.100.20", "198.51.100.200", "198.51.100.150", "2001:db8:1::20", "203.0.113.5"];
        let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
        let plan = plan(&vips, table, &current);
        assert_eq!(action(&plan, "198.51.100.20"), VipAction::Add { interface: interface(2), prefix_len: 24 });
        assert!(matches!(action(&plan, "198.51.100.200"), VipAction::Move { prefix_len: 25, .. }));
        assert_eq!(action(&plan, "198.51.100.150"), VipAction::InPlace { interface: interface(3) });
        assert_eq!(action(&plan, "2001:db8:1::20"), VipAction::Add { interface: interface(2), prefix_len: 64 });
        assert_eq!(action(&plan, "203.0.113.5"), VipAction::NoRoute);
        assert_eq!(plan.unroutable(), vec![ip("203.0.113.5")]);
    }
}
