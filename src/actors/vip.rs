//! The VIP server (ZBS-13104): the cluster's virtual IPs live on the leader's node only, and every
//! leader change is announced on the wire by the [ARP syncer](super::arp).
//!
//! **VipServer**, on every node. It follows the VIP configuration in ZooKeeper (`/vips`) and keeps
//! the last one it saw in the LMDB cache. Every netlink change of the node goes through its one
//! serialized **pass**; a pass reads the wanted state when it runs (not when it was asked for),
//! so a pass that started with an older configuration can never re-add a VIP a later
//! configuration dropped.
//! - At start-up, before leadership is known, and whenever this node is not the leader, a pass
//!   removes every configured VIP from the local interfaces.
//! - On becoming leader it places each VIP on the interface of the longest-prefix route that
//!   covers it ([`crate::net::plan`]): in place, nothing to do; on a wrong interface, moved;
//!   missing, added, and the ARP syncer announces it. It re-checks every `check_interval` (an
//!   address removed by hand comes back) and on every configuration change. A VIP dropped from
//!   the configuration is removed by the next pass.
//! - On losing leadership, or when the session is suspended and leadership cannot be confirmed
//!   (the election tells it `Lost` after its short grace, never past the node's local lease), it removes the VIPs **from the configuration it
//!   last saw**, without waiting for ZooKeeper.
//! - Each node publishes a report (`/vip-status/<node>`, ephemeral): its route prefixes, the
//!   VIPs its interfaces actually hold, conflicts and errors. `vip list` is built from these.
//! - A VIP that no route covers is an error: logged and reported. It never holds back the VIPs
//!   that can be placed. The leader hands leadership over only when another live node's routes
//!   cover more of the configured VIPs than its own, and never more often than a capped backoff
//!   allows (30 s doubling to 10 min between hand-overs), so one unroutable VIP cannot make
//!   leadership rotate.
//! - Without `CAP_NET_ADMIN` it says once, clearly, that VIPs are disabled and why; tasks run on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::arp::{format_mac, ArpSyncer, Ensure, Placed, Placement, Synced};
use super::election::{Leadership, Resign};
use crate::cache::TaskMirror;
use crate::coord::{Coordination, EventKind};
use crate::exec::StopToken;
use crate::model::{NodeId, VipConfig, VipNodeStatus};
use crate::net::{self, NetError, Netlink};
use crate::retry::Backoff;
use crate::store::{layout, TaskStore};

/// Default period of the leader's VIP re-check.
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 3_000;
/// Default frames per announcement burst (keepalived's `garp_master_repeat`).
pub const DEFAULT_ARP_BURST: u32 = 5;
/// Default number of bursts after a leader change or a new VIP.
pub const DEFAULT_ARP_ROUNDS: u32 = 2;
/// Default pause between bursts (keepalived's `garp_master_delay`).
pub const DEFAULT_ARP_INTERVAL_MS: u64 = 5_000;
/// Default period of the announcements after the bursts.
pub const DEFAULT_ARP_REFRESH_MS: u64 = 60_000;
/// Default period of the announcements of a VIP in conflict.
pub const DEFAULT_CONFLICT_INTERVAL_MS: u64 = 1_000;
/// Default time a probe listens for another host answering for a VIP.
pub const DEFAULT_PROBE_WINDOW_MS: u64 = 200;
/// How long a leader that hands leadership over stays out of the election.
const RESIGN_PAUSE: Duration = Duration::from_secs(10);
/// Least time between two hand-overs of one node, doubling per hand-over up to the cap.
const HANDOVER: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));
/// A node that has not handed over for this long starts its backoff again.
const HANDOVER_RESET: Duration = Duration::from_secs(1_800);
/// Longest a hand-over decision (a few ZooKeeper reads) may take before it is left for later.
const HANDOVER_DECISION_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a node that loses leadership waits for its VIPs to be removed before it goes on
/// (withdrawing its election candidate, on shutdown).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// VIP settings of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSettings {
    /// Manage VIPs at all. Default true.
    pub enabled: bool,
    /// Period of the leader's re-check.
    pub check_interval: Duration,
    /// Frames per burst. Default 5.
    pub arp_burst: u32,
    /// Bursts after each leader change and each VIP placed while leading. Default 2.
    pub arp_rounds: u32,
    /// Pause between bursts. Default 5 s.
    pub arp_interval: Duration,
    /// After the bursts, one announcement at this period (`None`: stop). Default 60 s.
    pub arp_refresh: Option<Duration>,
    /// While another host answers for a VIP, one announcement at this period. Default 1 s.
    pub conflict_interval: Duration,
    /// How long each probe listens for another host answering for a VIP. Default 200 ms.
    pub probe_window: Duration,
}

impl Default for VipSettings {
    fn default() -> Self {
        VipSettings {
            enabled: true,
            check_interval: Duration::from_millis(DEFAULT_CHECK_INTERVAL_MS),
            arp_burst: DEFAULT_ARP_BURST,
            arp_rounds: DEFAULT_ARP_ROUNDS,
            arp_interval: Duration::from_millis(DEFAULT_ARP_INTERVAL_MS),
            arp_refresh: Some(Duration::from_millis(DEFAULT_ARP_REFRESH_MS)),
            conflict_interval: Duration::from_millis(DEFAULT_CONFLICT_INTERVAL_MS),
            probe_window: Duration::from_millis(DEFAULT_PROBE_WINDOW_MS),
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
    /// The configured VIPs this node's interfaces hold, by the last pass.
    pub held: Vec<IpAddr>,
    /// VIPs that could not be placed, with why, and failed netlink calls.
    pub errors: Vec<String>,
    /// VIPs another host answers for, with the hardware addresses that answered.
    pub conflicts: BTreeMap<IpAddr, Vec<String>>,
    /// Announcement frames sent since the last leader change.
    pub announced: u64,
    /// When the first announcement after the last leader change went out.
    pub first_announcement: Option<Instant>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Configured(Vec<VipConfig>);

/// What the VIP server needs.
pub(crate) struct VipServerConfig {
    pub node: NodeId,
    pub store: TaskStore,
    pub mirror: Arc<TaskMirror>,
    pub settings: VipSettings,
    pub resign: Resign,
    pub report: watch::Sender<VipReport>,
}

/// What the passes must bring about, read by each pass when it runs.
#[derive(Debug, Default)]
struct Wanted {
    /// The configured VIPs.
    vips: Vec<IpAddr>,
    /// VIPs dropped from the configuration and not yet removed from the interfaces.
    dropped: BTreeSet<IpAddr>,
    /// Whether this node leads.
    leading: bool,
}

/// The hand-overs of this node, for their backoff.
#[derive(Debug, Default)]
struct Handovers {
    count: u32,
    last: Option<Instant>,
    /// The earliest next hand-over, drawn once per hand-over.
    next_allowed: Option<Instant>,
}

impl Handovers {
    /// Whether a hand-over is allowed at `now`; if so, counts it and sets when the next one may
    /// come.
    fn allow(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|last| now.duration_since(last) > HANDOVER_RESET) {
            self.count = 0;
        }
        if self.next_allowed.is_some_and(|next| now < next) {
            return false;
        }
        self.count += 1;
        self.last = Some(now);
        self.next_allowed = Some(now + HANDOVER.delay(self.count));
        true
    }
}

/// The parts a pass runs with (cloned into its task).
#[derive(Clone)]
struct PassContext {
    node: NodeId,
    netlink: Netlink,
    wanted: Arc<Mutex<Wanted>>,
    passes: Arc<tokio::sync::Mutex<()>>,
    report: watch::Sender<VipReport>,
    status: watch::Sender<Option<VipNodeStatus>>,
    store: TaskStore,
    resign: Resign,
    handovers: Arc<Mutex<Handovers>>,
    syncer: Recipient<Placed>,
    failed: Recipient<NetFailed>,
    /// Unroutable VIPs already logged, so that each is logged once until it changes.
    logged: Arc<Mutex<BTreeSet<IpAddr>>>,
}

/// The VIP server actor. See the module docs.
pub struct VipServer {
    config: VipServerConfig,
    netlink: Option<Netlink>,
    vips: Vec<VipConfig>,
    leading: bool,
    wanted: Arc<Mutex<Wanted>>,
    /// One netlink pass at a time.
    passes: Arc<tokio::sync::Mutex<()>>,
    /// A background pass is queued behind the running one.
    queued: Arc<AtomicBool>,
    addr: Option<Addr<VipServer>>,
    handovers: Arc<Mutex<Handovers>>,
    logged: Arc<Mutex<BTreeSet<IpAddr>>>,
    syncer: Recipient<Placed>,
    /// This node's report, as the publisher should write it.
    status: watch::Sender<Option<VipNodeStatus>>,
    stop: StopToken,
}

impl VipServer {
    /// Starts the VIP server and its ARP syncer; the election must tell both of leadership.
    pub(crate) fn start_pair(config: VipServerConfig) -> (Addr<VipServer>, Addr<ArpSyncer>) {
        let settings = config.settings.clone();
        let mut syncer_addr = None;
        let server = VipServer::create(|ctx| {
            let me = ctx.address();
            let syncer = ArpSyncer::new(settings, me.clone().recipient(), me.recipient()).start();
            syncer_addr = Some(syncer.clone());
            VipServer::new(config, syncer.recipient())
        });
        (server, syncer_addr.expect("the syncer was started"))
    }

    fn new(config: VipServerConfig, syncer: Recipient<Placed>) -> Self {
        VipServer {
            config,
            netlink: None,
            vips: Vec::new(),
            leading: false,
            wanted: Arc::default(),
            passes: Arc::default(),
            queued: Arc::default(),
            addr: None,
            handovers: Arc::default(),
            logged: Arc::default(),
            syncer,
            status: watch::Sender::new(None),
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
        self.config.report.send_modify(|r| r.disabled = Some(why.clone()));
        self.status.send_modify(|s| {
            let status = s.get_or_insert_with(VipNodeStatus::default);
            status.disabled = Some(why);
            status.holds.clear();
        });
    }

    fn pass_context(&self) -> Option<PassContext> {
        Some(PassContext {
            node: self.config.node.clone(),
            netlink: self.netlink.clone()?,
            wanted: self.wanted.clone(),
            passes: self.passes.clone(),
            report: self.config.report.clone(),
            status: self.status.clone(),
            store: self.config.store.clone(),
            resign: self.config.resign.clone(),
            handovers: self.handovers.clone(),
            syncer: self.syncer.clone(),
            failed: self.addr.clone()?.recipient(),
            logged: self.logged.clone(),
        })
    }

    /// Runs a pass in the background (see [`pass`]). Passes coalesce: while one is queued
    /// behind the running one, another request adds nothing (the queued pass reads the wanted
    /// state when it starts, so it covers every request made before).
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let Some(cx) = self.pass_context() else { return };
        if self.queued.swap(true, Ordering::SeqCst) {
            return;
        }
        let queued = self.queued.clone();
        // Owned by the actor: a pass ends with the VIP server (passes are idempotent, and the
        // release on leadership loss is awaited by the election, not one of these).
        let pass = async move {
            let _ = run_pass(&cx, false, Some(&queued)).await;
        };
        ctx.spawn(pass.into_actor(self));
    }
}

/// Runs [`pass`], reports its failure, and hands leadership over if it says so (outside the
/// pass: ZooKeeper reads never hold up a netlink change).
async fn run_pass(cx: &PassContext, ensure: bool, queued: Option<&AtomicBool>) -> Option<Vec<Placement>> {
    match pass(cx, ensure, queued).await {
        Ok(outcome) => {
            if outcome.unroutable {
                let handover = hand_over_if_better(cx);
                if tokio::time::timeout(HANDOVER_DECISION_TIMEOUT, handover).await.is_err() {
                    debug!(node = %cx.node, "no hand-over decision in time; trying at the next check");
                }
            }
            outcome.placements
        }
        Err(e) => {
            let _ = cx.failed.send(NetFailed(e)).await;
            None
        }
    }
}

/// What a pass found.
struct PassOutcome {
    /// Where each VIP is held, for an ensuring pass of a node that still leads.
    placements: Option<Vec<Placement>>,
    /// Some VIP has no route on this (leading) node.
    unroutable: bool,
}

/// One serialized pass: puts the node's interfaces in line with what is wanted **now** (the VIPs
/// if leading, none otherwise, and never a dropped VIP), then reports. With `ensure`, answers
/// where each VIP is held (for the ARP syncer's round). A follower removes first and reads
/// routes afterwards, best effort: nothing else can hold up a removal.
async fn pass(cx: &PassContext, ensure: bool, queued: Option<&AtomicBool>) -> Result<PassOutcome, NetError> {
    let _pass = cx.passes.lock().await;
    if let Some(queued) = queued {
        queued.store(false, Ordering::SeqCst);
    }
    let (vips, dropped, leading) = {
        let wanted = cx.wanted.lock().unwrap_or_else(|p| p.into_inner());
        (wanted.vips.clone(), wanted.dropped.iter().copied().collect::<Vec<_>>(), wanted.leading)
    };
    let node = &cx.node;
    if !dropped.is_empty() {
        match net::remove_vips(&cx.netlink, &dropped).await {
            Ok(removed) => {
                if removed > 0 {
                    info!(%node, ?dropped, "removed VIPs dropped from the configuration");
                }
                let mut wanted = cx.wanted.lock().unwrap_or_else(|p| p.into_inner());
                for vip in &dropped {
                    wanted.dropped.remove(vip);
                }
            }
            Err(e) if e.is_permission_denied() => return Err(e),
            Err(e) => warn!(%node, error = %e, "cannot remove VIPs dropped from the configuration yet"),
        }
    }
    if !leading {
        let removed = net::remove_vips(&cx.netlink, &vips).await?;
        if removed > 0 {
            info!(%node, removed, "removed VIPs: this node does not lead");
        }
        let routes = cx.netlink.routing_table().await.map(|t| t.prefixes()).unwrap_or_default();
        let holds = held(&cx.netlink, &vips).await.unwrap_or_default();
        cx.report.send_modify(|r| {
            r.held = holds.clone();
            r.errors.clear();
            r.conflicts.clear();
        });
        publish(cx, false, routes, holds, Vec::new());
        cx.logged.lock().unwrap_or_else(|p| p.into_inner()).clear();
        return Ok(PassOutcome { placements: None, unroutable: false });
    }
    let table = cx.netlink.routing_table().await?;
    let routes = table.prefixes();
    let current = cx.netlink.addresses().await?;
    let plan = net::plan(&vips, |ip| table.lookup(ip), &current);
    let (added, failed) = net::apply(&cx.netlink, &plan).await?;
    if !added.is_empty() {
        info!(%node, ?added, "VIPs placed");
        super::tell(&cx.syncer, Placed(added));
    }
    let unroutable = plan.unroutable();
    let mut errors: Vec<String> =
        unroutable.iter().map(|ip| format!("no route covers VIP {ip} on this node")).collect();
    for (ip, e) in &failed {
        warn!(%node, vip = %ip, error = %e, "cannot place a VIP; the others are placed");
        errors.push(format!("cannot place VIP {ip}: {e}"));
    }
    {
        let mut logged = cx.logged.lock().unwrap_or_else(|p| p.into_inner());
        for ip in unroutable.iter().filter(|ip| !logged.contains(ip)) {
            error!(%node, "no route covers VIP {ip} on this node; the other VIPs are placed");
        }
        *logged = unroutable.iter().copied().collect();
    }
    let failed: BTreeSet<IpAddr> = failed.iter().map(|(ip, _)| *ip).collect();
    let holds: Vec<IpAddr> = plan.placements().map(|(ip, _)| ip).filter(|ip| !failed.contains(ip)).collect();
    cx.report.send_modify(|r| {
        r.held = holds.clone();
        r.errors = errors.clone();
    });
    publish(cx, true, routes, holds, errors);
    let unroutable = !unroutable.is_empty();
    // Leadership may have gone while this pass ran: then nothing is to be announced.
    if !ensure || !cx.wanted.lock().unwrap_or_else(|p| p.into_inner()).leading {
        return Ok(PassOutcome { placements: None, unroutable });
    }
    let mut placements = Vec::new();
    for (vip, interface) in plan.placements().filter(|(ip, _)| !failed.contains(ip)) {
        match cx.netlink.interface_mac(interface.index).await {
            Ok(mac) => {
                let link_local = current.iter().find_map(|a| match a.address {
                    IpAddr::V6(v6) if a.interface_index == interface.index && v6.segments()[0] & 0xffc0 == 0xfe80 => {
                        Some(v6)
                    }
                    _ => None,
                });
                placements.push(Placement { vip, interface: interface.name.clone(), mac, link_local });
            }
            Err(e) => warn!(%vip, interface = %interface.name, error = %e, "no MAC for the VIP's interface"),
        }
    }
    Ok(PassOutcome { placements: Some(placements), unroutable })
}

/// The configured VIPs this node's interfaces hold.
async fn held(netlink: &Netlink, vips: &[IpAddr]) -> Result<Vec<IpAddr>, NetError> {
    let addresses = netlink.addresses().await?;
    let held: BTreeSet<IpAddr> = addresses.iter().map(|a| a.address).filter(|a| vips.contains(a)).collect();
    Ok(held.into_iter().collect())
}

/// Updates the report the publisher writes (the conflicts are the ARP syncer's).
fn publish(
    cx: &PassContext,
    leading: bool,
    routes: Vec<crate::model::RoutePrefix>,
    holds: Vec<IpAddr>,
    errors: Vec<String>,
) {
    cx.status.send_if_modified(|status| {
        let old = status.get_or_insert_with(VipNodeStatus::default);
        let conflicts = if leading { old.conflicts.clone() } else { Vec::new() };
        let new = VipNodeStatus { leading, disabled: None, routes, holds, conflicts, errors };
        if *old == new {
            return false;
        }
        *old = new;
        true
    });
}

/// The leader cannot place some VIPs: hands leadership over if the node next in line in the
/// election has routes that cover more of them than this node's, within the hand-over backoff.
/// (Resigning hands leadership to the next candidate, so only that one is considered.)
async fn hand_over_if_better(cx: &PassContext) {
    let vips = cx.wanted.lock().unwrap_or_else(|p| p.into_inner()).vips.clone();
    let Some(mine) = cx.status.borrow().as_ref().map(|s| vips.iter().filter(|ip| s.covers(**ip)).count()) else {
        return;
    };
    let next = match crate::actors::election::next_in_line(cx.store.coordination().as_ref()).await {
        Ok(Some(next)) => next,
        Ok(None) => return,
        Err(e) => {
            debug!(error = %e, "cannot read the election");
            return;
        }
    };
    let status = match cx.store.vip_statuses().await {
        Ok(statuses) => statuses.into_iter().find(|(node, _)| *node == next).map(|(_, status)| status),
        Err(e) => {
            debug!(error = %e, "cannot read the other nodes' VIP reports");
            return;
        }
    };
    let covered = status.map_or(0, |status| vips.iter().filter(|ip| status.covers(**ip)).count());
    if covered <= mine {
        debug!(node = %cx.node, %next, covered, mine, "the next node in line cannot place more of the VIPs; keeping leadership");
        return;
    }
    if !cx.handovers.lock().unwrap_or_else(|p| p.into_inner()).allow(Instant::now()) {
        debug!(node = %cx.node, %next, "a hand-over is due but the backoff holds it back");
        return;
    }
    warn!(node = %cx.node, %next, covered, mine, "giving up leadership so that a node whose routes cover more of the VIPs can place them");
    cx.resign.resign(RESIGN_PAUSE);
}

/// Writes this node's report to `/vip-status/<node>` whenever it changes or the session is new.
async fn publish_status(store: TaskStore, node: NodeId, mut status: watch::Receiver<Option<VipNodeStatus>>) {
    let coord: Arc<dyn Coordination> = store.coordination().clone();
    let mut session = coord.subscribe();
    let mut written: Option<(u64, VipNodeStatus)> = None;
    let mut delays = crate::retry::COORDINATION.delays();
    loop {
        let current = status.borrow_and_update().clone();
        let generation = coord.status().generation;
        let connected = coord.status().state == crate::coord::SessionState::Connected;
        if let (Some(current), true) = (current, connected) {
            if written.as_ref() != Some(&(generation, current.clone())) {
                match store.put_vip_status(&node, &current).await {
                    Ok(()) => {
                        delays.reset();
                        written = Some((generation, current));
                    }
                    Err(e) => {
                        debug!(%node, error = %e, "cannot publish the VIP report; retrying");
                        delays.wait().await;
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            changed = session.changed() => if changed.is_err() { return },
        }
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
        self.addr = Some(ctx.address());
        let (store, node, status, stop) =
            (self.config.store.clone(), self.config.node.clone(), self.status.subscribe(), self.stop.clone());
        actix::spawn(async move {
            tokio::select! {
                _ = publish_status(store, node, status) => {}
                _ = stop.cancelled() => {}
            }
        });
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
            let before: BTreeSet<IpAddr> = self.addresses().into_iter().collect();
            self.vips = vips;
            let after = self.addresses();
            let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            // A VIP dropped from the configuration must go from the interfaces too: the next
            // pass removes it (unless it is configured again by then).
            wanted.dropped.extend(before.iter().filter(|ip| !after.contains(ip)));
            wanted.dropped.retain(|ip| !after.contains(ip));
            wanted.vips = after;
        }
        self.reconcile(ctx);
    }
}

impl Handler<Leadership> for VipServer {
    /// Leadership lost: answered once the VIPs are off the interfaces (or after
    /// `RELEASE_TIMEOUT`), so that the election withdraws its candidate, and another node can
    /// take them, only then.
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) -> Self::Result {
        let leading = matches!(msg, Leadership::Gained(_));
        if leading == self.leading {
            return Box::pin(async {});
        }
        self.leading = leading;
        self.wanted.lock().unwrap_or_else(|p| p.into_inner()).leading = leading;
        self.config.report.send_modify(|r| {
            r.leading = leading;
            r.announced = 0;
            r.first_announcement = None;
            r.conflicts.clear();
        });
        if leading {
            self.reconcile(ctx);
            return Box::pin(async {});
        }
        let Some(cx) = self.pass_context() else { return Box::pin(async {}) };
        Box::pin(async move {
            if tokio::time::timeout(RELEASE_TIMEOUT, run_pass(&cx, false, None)).await.is_err() {
                warn!(node = %cx.node, "the VIPs were not removed in time after leadership was lost; still trying");
            }
        })
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
    type Result = ResponseFuture<Option<Vec<Placement>>>;

    fn handle(&mut self, _: Ensure, _ctx: &mut Context<Self>) -> Self::Result {
        let pass_context = self.pass_context();
        Box::pin(async move { run_pass(&pass_context?, true, None).await })
    }
}

impl Handler<Synced> for VipServer {
    type Result = ();

    fn handle(&mut self, synced: Synced, _ctx: &mut Context<Self>) {
        if !self.leading {
            return;
        }
        let conflicts: BTreeMap<IpAddr, Vec<String>> =
            synced.conflicts.iter().map(|(ip, macs)| (*ip, macs.iter().map(|m| format_mac(*m)).collect())).collect();
        for error in &synced.errors {
            debug!(node = %self.config.node, %error, "announcement round");
        }
        self.config.report.send_modify(|r| {
            r.errors.retain(|e| !e.starts_with("announcing ") && !e.starts_with("probing "));
            r.errors.extend(synced.errors.iter().cloned());
            r.announced += synced.announced;
            if synced.announced > 0 {
                r.first_announcement.get_or_insert_with(Instant::now);
            }
            r.conflicts = conflicts.clone();
        });
        self.status.send_if_modified(|status| {
            let Some(status) = status.as_mut() else { return false };
            let new: Vec<(IpAddr, Vec<String>)> = conflicts.into_iter().collect();
            if status.conflicts == new {
                return false;
            }
            status.conflicts = new;
            true
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
