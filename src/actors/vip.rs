//! The VIP server and the ARP syncer (ZBS-13104): the cluster's virtual IPs live on the leader's
//! node only, and every leader change is announced on the wire, several times.
//!
//! **VipServer**, on every node. It follows the VIP configuration in ZooKeeper (`/vips`) and keeps
//! the last one it saw in the LMDB cache.
//! - At start-up, before leadership is known, and whenever this node is not the leader, it
//!   removes every configured VIP from the local interfaces.
//! - On becoming leader it places each VIP on the interface of the longest-prefix route that
//!   covers it ([`crate::net::plan`]): in place, nothing to do; on a wrong interface, moved;
//!   missing, added and announced. It re-checks every `check_interval` (an address removed by
//!   hand comes back) and on every configuration change.
//! - On losing leadership, or when the session is suspended and leadership cannot be confirmed
//!   (the election tells it `Lost` at once), it removes the VIPs **from the configuration it
//!   last saw**, without waiting for ZooKeeper.
//! - A VIP that no route covers is an error: logged, shown in [`VipReport`], and, if another
//!   candidate exists, this node resigns leadership for a while so that another node can try
//!   (the original exited the process; we don't).
//! - Without `CAP_NET_ADMIN` it says once, clearly, that VIPs are disabled and why; tasks run on.
//!
//! **ArpSyncer**, on every node, active on the leader: each time the node becomes leader, `rounds`
//! rounds `interval` apart; each round asks the VIP server to make sure every VIP is configured
//! (re-adding a missing one) and sends one gratuitous ARP per IPv4 VIP and one unsolicited
//! neighbour advertisement per IPv6 VIP. An optional refresh keeps announcing afterwards (some
//! routers cache ARP for hours). It stops at once when leadership is lost.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::election::{Leadership, Resign};
use crate::cache::TaskMirror;
use crate::coord::{Coordination, EventKind};
use crate::exec::StopToken;
use crate::model::{NodeId, VipConfig};
use crate::net::{self, NetError, Netlink};
use crate::store::{layout, TaskStore};

/// Default period of the leader's VIP re-check.
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 3_000;
/// Default number of announcement rounds after a leader change.
pub const DEFAULT_ARP_ROUNDS: u32 = 6;
/// Default pause between announcement rounds.
pub const DEFAULT_ARP_INTERVAL_MS: u64 = 10_000;
/// How long a leader that cannot place a VIP stays out of the election.
const RESIGN_PAUSE: Duration = Duration::from_secs(10);

/// VIP settings of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSettings {
    /// Manage VIPs at all. Default true.
    pub enabled: bool,
    /// Period of the leader's re-check.
    pub check_interval: Duration,
    /// Announcement rounds after each leader change.
    pub arp_rounds: u32,
    /// Pause between rounds.
    pub arp_interval: Duration,
    /// After the rounds, keep announcing at this period (`None`: stop).
    pub arp_refresh: Option<Duration>,
}

impl Default for VipSettings {
    fn default() -> Self {
        VipSettings {
            enabled: true,
            check_interval: Duration::from_millis(DEFAULT_CHECK_INTERVAL_MS),
            arp_rounds: DEFAULT_ARP_ROUNDS,
            arp_interval: Duration::from_millis(DEFAULT_ARP_INTERVAL_MS),
            arp_refresh: None,
        }
    }
}

/// What the VIP server of a node reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipReport {
    /// Why VIPs are not managed on this node, if they are not.
    pub disabled: Option<String>,
    /// Whether this node holds the VIPs (it leads).
    pub leading: bool,
    /// The VIPs placed on this node's interfaces, by the last check.
    pub held: Vec<IpAddr>,
    /// VIPs that could not be placed, with why.
    pub errors: Vec<String>,
    /// Announcements sent since the last leader change.
    pub announced: u64,
    /// When the first announcement after the last leader change went out.
    pub first_announcement: Option<Instant>,
}

/// Make sure every VIP is in place now; answers the placements to announce.
#[derive(Message)]
#[rtype(result = "Vec<(IpAddr, String, [u8; 6])>")]
struct Ensure;

#[derive(Message)]
#[rtype(result = "()")]
struct Configured(Vec<VipConfig>);

#[derive(Message)]
#[rtype(result = "()")]
struct Announced {
    term: u64,
    count: u64,
}

/// What the VIP server needs.
pub(crate) struct VipServerConfig {
    pub node: NodeId,
    pub store: TaskStore,
    pub mirror: Arc<TaskMirror>,
    pub settings: VipSettings,
    pub resign: Resign,
    pub report: watch::Sender<VipReport>,
}

/// The VIP server actor. See the module docs.
pub struct VipServer {
    config: VipServerConfig,
    netlink: Option<Netlink>,
    vips: Vec<VipConfig>,
    leading: bool,
    /// `leading`, for passes in flight: a pass decides by the role at the time it runs, not at
    /// the time it was started.
    leading_now: Arc<AtomicBool>,
    /// One netlink pass at a time, so a leading pass cannot add a VIP after a follower's pass
    /// removed it.
    passes: Arc<tokio::sync::Mutex<()>>,
    term: u64,
    syncer: Option<StopToken>,
    stop: StopToken,
}

impl VipServer {
    pub(crate) fn new(config: VipServerConfig) -> Self {
        VipServer {
            config,
            netlink: None,
            vips: Vec::new(),
            leading: false,
            leading_now: Arc::new(AtomicBool::new(false)),
            passes: Arc::new(tokio::sync::Mutex::new(())),
            term: 0,
            syncer: None,
            stop: StopToken::new(),
        }
    }

    fn addresses(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self.vips.iter().flat_map(|v| v.addresses.iter().copied()).collect();
        set.into_iter().collect()
    }

    /// Disables VIP management for good, saying why once.
    fn disable(&mut self, why: String) {
        if self.config.report.borrow().disabled.is_none() {
            error!(node = %self.config.node, reason = %why, "VIPs disabled on this node; tasks run on");
        }
        self.netlink = None;
        self.config.report.send_modify(|r| r.disabled = Some(why));
    }

    /// Puts the node's interfaces in line with its role: the VIPs if leading, none otherwise.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let Some(netlink) = self.netlink.clone() else { return };
        let (vips, leading_now, passes, addr) =
            (self.addresses(), self.leading_now.clone(), self.passes.clone(), ctx.address());
        let (report, resign, coord, node) = (
            self.config.report.clone(),
            self.config.resign.clone(),
            self.config.store.coordination().clone(),
            self.config.node.clone(),
        );
        let done = async move {
            let _pass = passes.lock().await;
            if !leading_now.load(Ordering::SeqCst) {
                return match net::remove_vips(&netlink, &vips).await {
                    Ok(removed) => {
                        if removed > 0 {
                            info!(%node, removed, "removed VIPs: this node does not lead");
                        }
                        report.send_modify(|r| r.held.clear());
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
            }
            let plan = netlink.plan(&vips).await?;
            let added = net::apply(&netlink, &plan).await?;
            let errors: Vec<String> =
                plan.unroutable().iter().map(|ip| format!("no route covers VIP {ip} on this node")).collect();
            let held: Vec<IpAddr> = plan.placements().map(|(ip, _)| ip).collect();
            if !added.is_empty() {
                info!(%node, ?added, "VIPs placed");
                let placements = placements(&netlink, &plan).await;
                for (ip, interface, mac) in placements.into_iter().filter(|(ip, _, _)| added.contains(ip)) {
                    if let Err(e) = net::announce(&interface, ip, mac).await {
                        warn!(%ip, %interface, error = %e, "cannot announce a VIP");
                    }
                }
            }
            if !errors.is_empty() {
                for e in &errors {
                    error!(%node, "{e}");
                }
                let others = coord.children(layout::ELECTION).await.map(|c| c.len() > 1).unwrap_or(false);
                if others {
                    warn!(%node, "giving up leadership so that another node can place the VIPs");
                    resign.resign(RESIGN_PAUSE);
                }
            }
            report.send_modify(|r| {
                r.held = held;
                r.errors = errors;
            });
            Ok(())
        };
        actix::spawn(async move {
            if let Err(e) = done.await {
                let _ = addr.send(NetFailed(e)).await;
            }
        });
    }

    fn start_syncer(&mut self, ctx: &mut Context<Self>) {
        if let Some(old) = self.syncer.take() {
            old.cancel();
        }
        let stop = StopToken::new();
        self.syncer = Some(stop.clone());
        self.config.report.send_modify(|r| {
            r.announced = 0;
            r.first_announcement = None;
        });
        let (settings, addr, term) = (self.config.settings.clone(), ctx.address(), self.term);
        actix::spawn(async move {
            tokio::select! {
                _ = sync_arp(settings, addr, term) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The interface name and MAC of each placed VIP.
async fn placements(netlink: &Netlink, plan: &net::VipPlan) -> Vec<(IpAddr, String, [u8; 6])> {
    let mut out = Vec::new();
    for (ip, interface) in plan.placements() {
        match netlink.interface_mac(interface.index).await {
            Ok(mac) => out.push((ip, interface.name.clone(), mac)),
            Err(e) => warn!(%ip, interface = %interface.name, error = %e, "no MAC for the VIP's interface"),
        }
    }
    out
}

/// The announcement rounds after a leader change (the ARP syncer).
async fn sync_arp(settings: VipSettings, server: Addr<VipServer>, term: u64) {
    let mut round = 0;
    loop {
        let Ok(placements) = server.send(Ensure).await else { return };
        let mut count = 0;
        for (ip, interface, mac) in placements {
            match net::announce(&interface, ip, mac).await {
                Ok(()) => count += 1,
                Err(e) => warn!(%ip, %interface, error = %e, "announcement failed"),
            }
        }
        debug!(round, count, "VIPs announced");
        let _ = server.send(Announced { term, count }).await;
        round += 1;
        let pause = if round < settings.arp_rounds {
            settings.arp_interval
        } else {
            match settings.arp_refresh {
                Some(refresh) => refresh,
                None => return,
            }
        };
        tokio::time::sleep(pause).await;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NetFailed(NetError);

#[derive(Message)]
#[rtype(result = "()")]
struct Check;

impl Actor for VipServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if !self.config.settings.enabled {
            self.disable("VIP management is turned off in the configuration".into());
            return;
        }
        match Netlink::new() {
            Ok(netlink) => self.netlink = Some(netlink),
            Err(e) => {
                self.disable(format!("cannot open netlink: {e}"));
                return;
            }
        }
        // Not leader yet: remove what the last known configuration holds, before ZooKeeper
        // answers (it may not).
        let (mirror, addr) = (self.config.mirror.clone(), ctx.address());
        actix::spawn(async move {
            match mirror.vips().await {
                Ok(vips) => {
                    let _ = addr.send(Configured(vips)).await;
                }
                Err(e) => warn!(error = %e, "cannot read the cached VIP configuration"),
            }
        });
        let (store, mirror, addr, stop) =
            (self.config.store.clone(), self.config.mirror.clone(), ctx.address(), self.stop.clone());
        actix::spawn(async move {
            tokio::select! {
                _ = follow_vips(store, mirror, addr) => {}
                _ = stop.cancelled() => {}
            }
        });
        ctx.run_interval(self.config.settings.check_interval, |_, ctx| ctx.notify(Check));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.stop.cancel();
        if let Some(syncer) = self.syncer.take() {
            syncer.cancel();
        }
    }
}

/// Follows `/vips`: reads every configuration on each change, caches it, and reports it.
async fn follow_vips(store: TaskStore, mirror: Arc<TaskMirror>, addr: Addr<VipServer>) {
    let coord: Arc<dyn Coordination> = store.coordination().clone();
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        let mut session = coord.subscribe();
        let _ = session.wait_for(|s| s.state == crate::coord::SessionState::Connected).await;
        let mut tree = match coord.watch_tree(layout::VIPS).await {
            Ok(tree) => tree,
            Err(e) => {
                debug!(error = %e, "cannot watch the VIP configuration; retrying");
                delays.wait().await;
                continue;
            }
        };
        loop {
            match store.vips().await {
                Ok(vips) => {
                    delays.reset();
                    let _ = mirror.put_vips(vips.clone()).await;
                    if addr.send(Configured(vips)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "cannot read the VIP configuration; retrying");
                    delays.wait().await;
                    break;
                }
            }
            match futures::StreamExt::next(&mut tree).await {
                None => break,
                Some(event) if event.kind == EventKind::SessionLost => break,
                Some(_) => {}
            }
        }
    }
}

impl Handler<Configured> for VipServer {
    type Result = ();

    fn handle(&mut self, Configured(mut vips): Configured, ctx: &mut Context<Self>) {
        vips.sort_by(|a, b| a.service.cmp(&b.service));
        if vips != self.vips {
            // A VIP dropped from the configuration must go from the interfaces too.
            let before: BTreeSet<IpAddr> = self.addresses().into_iter().collect();
            self.vips = vips;
            let after: BTreeSet<IpAddr> = self.addresses().into_iter().collect();
            let dropped: Vec<IpAddr> = before.difference(&after).copied().collect();
            if let (Some(netlink), false) = (self.netlink.clone(), dropped.is_empty()) {
                actix::spawn(async move {
                    if let Err(e) = net::remove_vips(&netlink, &dropped).await {
                        warn!(error = %e, "cannot remove VIPs dropped from the configuration");
                    }
                });
            }
        }
        self.reconcile(ctx);
    }
}

impl Handler<Leadership> for VipServer {
    type Result = ();

    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        let leading = matches!(msg, Leadership::Gained(_));
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        self.leading_now.store(leading, Ordering::SeqCst);
        self.term += 1;
        self.config.report.send_modify(|r| r.leading = leading);
        if !leading {
            if let Some(syncer) = self.syncer.take() {
                syncer.cancel();
            }
        }
        self.reconcile(ctx);
        if leading && self.netlink.is_some() {
            self.start_syncer(ctx);
        }
    }
}

impl Handler<Check> for VipServer {
    type Result = ();

    fn handle(&mut self, _: Check, ctx: &mut Context<Self>) {
        self.reconcile(ctx);
    }
}

impl Handler<NetFailed> for VipServer {
    type Result = ();

    fn handle(&mut self, NetFailed(e): NetFailed, _ctx: &mut Context<Self>) {
        if e.is_permission_denied() {
            self.disable(format!("{e}"));
        } else {
            warn!(node = %self.config.node, error = %e, "VIP check failed; retrying at the next check");
            self.config.report.send_modify(|r| r.errors = vec![e.to_string()]);
        }
    }
}

impl Handler<Ensure> for VipServer {
    type Result = ResponseFuture<Vec<(IpAddr, String, [u8; 6])>>;

    fn handle(&mut self, _: Ensure, _ctx: &mut Context<Self>) -> Self::Result {
        let (netlink, vips, leading_now, passes) =
            (self.netlink.clone(), self.addresses(), self.leading_now.clone(), self.passes.clone());
        Box::pin(async move {
            let _pass = passes.lock().await;
            let Some(netlink) = netlink.filter(|_| leading_now.load(Ordering::SeqCst)) else { return Vec::new() };
            let Ok(plan) = netlink.plan(&vips).await else { return Vec::new() };
            if let Err(e) = net::apply(&netlink, &plan).await {
                warn!(error = %e, "cannot re-place the VIPs before announcing them");
            }
            placements(&netlink, &plan).await
        })
    }
}

impl Handler<Announced> for VipServer {
    type Result = ();

    fn handle(&mut self, Announced { term, count }: Announced, _ctx: &mut Context<Self>) {
        if term != self.term || count == 0 {
            return;
        }
        self.config.report.send_modify(|r| {
            r.announced += count;
            r.first_announcement.get_or_insert_with(Instant::now);
        });
    }
}

/// Removes the VIPs of the configuration cached in `cache_dir`, before anything else starts: a
/// node restarted while ZooKeeper is unreachable must not keep VIPs it held as leader.
pub(crate) async fn drop_cached_vips(cache_dir: std::path::PathBuf, settings: &VipSettings) {
    if !settings.enabled {
        return;
    }
    let cached = tokio::task::spawn_blocking(move || {
        let cache = crate::cache::TaskCache::open(&cache_dir)?;
        let vips = cache.vips();
        // One environment per directory per process: close it before the mirror opens it.
        let closing = cache.env().clone().prepare_for_closing();
        drop(cache);
        closing.wait();
        vips
    })
    .await;
    let vips: Vec<IpAddr> = match cached {
        Ok(Ok(configs)) => configs.iter().flat_map(|c| c.addresses.iter().copied()).collect(),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read the cached VIP configuration at start-up");
            return;
        }
        Err(_) => return,
    };
    if vips.is_empty() {
        return;
    }
    match Netlink::new() {
        Ok(netlink) => match net::remove_vips(&netlink, &vips).await {
            Ok(removed) if removed > 0 => info!(removed, "removed VIPs held before this start"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot remove cached VIPs at start-up"),
        },
        Err(e) => warn!(error = %e, "cannot open netlink to remove cached VIPs at start-up"),
    }
}
