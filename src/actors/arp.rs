//! The ARP syncer: an actor that announces the leader's VIPs on the wire and watches for
//! another host answering for them.
//!
//! It follows leadership (the election tells it, as it tells the VIP server) and runs rounds on
//! its own timer. A round:
//! 1. asks the VIP server to make sure every VIP is in place ([`Ensure`], through a
//!    [`Recipient`]); the VIP server does that in its one serialized netlink pass and answers
//!    where each VIP is held (interface, MAC);
//! 2. for each VIP that is due by the [`Schedule`], sends its announcements
//!    ([`net::announce_times`]: gratuitous ARP, or unsolicited neighbour advertisements with the
//!    override flag), then probes who else answers for it ([`net::probe`]: an ARP probe, or a
//!    duplicate-address-detection solicitation);
//! 3. reports what it sent and which VIPs are in conflict to the VIP server ([`Synced`]).
//!
//! The timing is decided by the pure [`Schedule`] (state and time in, what is due out), like
//! keepalived's: a burst of [`VipSettings::arp_burst`] frames at takeover, repeated
//! [`VipSettings::arp_rounds`] times [`VipSettings::arp_interval`] apart; the same for a VIP
//! placed while leading (newly configured, or re-added after it went missing); then one frame
//! every [`VipSettings::arp_refresh`] (on by default). While another host answers for a VIP (an
//! orphan left by a killed daemon whose kernel still holds it, or a misconfigured host), the VIP
//! is a **conflict**: logged, reported in `vip list` and the VIP report, and announced every
//! [`VipSettings::conflict_interval`] until no other host answers, when the clearing is logged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{debug, info, warn};

use super::election::Leadership;
use super::vip::VipSettings;
use crate::net;

/// Probes in a row that must hear no other host before a conflict is declared cleared.
pub const CLEAR_AFTER_QUIET_PROBES: u32 = 3;

/// Makes sure every VIP is in place now; answers where each placed VIP is held, or `None` if
/// the pass failed or this node no longer leads (the schedule is then left as it is).
#[derive(Message)]
#[rtype(result = "Option<Vec<Placement>>")]
pub struct Ensure;

/// A VIP held by this node: the interface's name and MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The VIP.
    pub vip: IpAddr,
    /// The interface that holds it.
    pub interface: String,
    /// That interface's MAC.
    pub mac: [u8; 6],
    /// That interface's IPv6 link-local address, if it has one (the source of IPv6 probes).
    pub link_local: Option<std::net::Ipv6Addr>,
}

/// VIPs the VIP server just placed while leading: they get a takeover burst of their own.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Placed(pub Vec<IpAddr>);

/// What a round did, for the VIP server's report.
#[derive(Message, Clone, Debug, Default, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct Synced {
    /// Frames sent this round.
    pub announced: u64,
    /// Every VIP another host answers for, with the hardware addresses that answered.
    pub conflicts: BTreeMap<IpAddr, Vec<[u8; 6]>>,
    /// Announcements or probes that failed this round.
    pub errors: Vec<String>,
}

/// One VIP due now: how many frames to send, and whether to probe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    /// The VIP.
    pub vip: IpAddr,
    /// Frames to send back to back (a probe follows them).
    pub frames: u32,
}

/// When each VIP is announced next. Pure: the actor feeds it events and the time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    clocks: BTreeMap<IpAddr, Clock>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Clock {
    next: Instant,
    /// Burst rounds still to send (the first one included while it has not gone out).
    bursts_left: u32,
    conflict: bool,
}

impl Schedule {
    /// Starts a takeover burst for each of `vips` at `now` (again, for one already scheduled).
    pub fn burst(&mut self, vips: impl IntoIterator<Item = IpAddr>, now: Instant, settings: &VipSettings) {
        for vip in vips {
            let conflict = self.clocks.get(&vip).is_some_and(|c| c.conflict);
            self.clocks.insert(vip, Clock { next: now, bursts_left: settings.arp_rounds.max(1), conflict });
        }
    }

    /// Keeps exactly the VIPs in `held`: a held VIP without a clock starts a burst (it was
    /// placed since the last round), a scheduled VIP no longer held is forgotten.
    pub fn follow(&mut self, held: &BTreeSet<IpAddr>, now: Instant, settings: &VipSettings) {
        self.clocks.retain(|vip, _| held.contains(vip));
        let new: Vec<IpAddr> = held.iter().filter(|vip| !self.clocks.contains_key(vip)).copied().collect();
        self.burst(new, now, settings);
    }

    /// Forgets everything (leadership lost).
    pub fn clear(&mut self) {
        self.clocks.clear();
    }

    /// Marks `vip` in conflict (another host answers for it) or clear. A new conflict makes it
    /// due after [`VipSettings::conflict_interval`] at the latest.
    pub fn set_conflict(&mut self, vip: IpAddr, conflict: bool, now: Instant, settings: &VipSettings) {
        if let Some(clock) = self.clocks.get_mut(&vip) {
            if conflict && !clock.conflict {
                clock.next = clock.next.min(now + settings.conflict_interval);
            }
            clock.conflict = conflict;
        }
    }

    /// Whether `vip` is in conflict.
    pub fn in_conflict(&self, vip: IpAddr) -> bool {
        self.clocks.get(&vip).is_some_and(|c| c.conflict)
    }

    /// The VIPs due at `now`, with their frames; moves their clocks on. A VIP with no more
    /// rounds, no refresh and no conflict is not due again until [`Schedule::burst`].
    pub fn due(&mut self, now: Instant, settings: &VipSettings) -> Vec<Due> {
        let mut due = Vec::new();
        for (vip, clock) in self.clocks.iter_mut().filter(|(_, c)| c.next <= now) {
            let frames = if clock.bursts_left > 0 {
                clock.bursts_left -= 1;
                settings.arp_burst.max(1)
            } else {
                1
            };
            due.push(Due { vip: *vip, frames });
            let regular = if clock.bursts_left > 0 { Some(settings.arp_interval) } else { settings.arp_refresh };
            let period = match (regular, clock.conflict) {
                (Some(regular), true) => regular.min(settings.conflict_interval),
                (None, true) => settings.conflict_interval,
                (Some(regular), false) => regular,
                // Never again by itself; kept so that `follow` does not burst it anew.
                (None, false) => Duration::from_secs(100 * 365 * 86_400),
            };
            clock.next = now + period;
        }
        due
    }

    /// When the next VIP is due, if any is scheduled.
    pub fn next_due(&self) -> Option<Instant> {
        self.clocks.values().map(|c| c.next).min()
    }
}

/// The ARP syncer actor. See the module docs.
pub struct ArpSyncer {
    settings: VipSettings,
    ensure: Recipient<Ensure>,
    report: Recipient<Synced>,
    schedule: Schedule,
    leading: bool,
    /// Bumped on every leadership change: a round of an earlier term reports nothing.
    term: u64,
    /// A round is running (rounds never overlap).
    busy: bool,
    /// Another round is wanted as soon as the running one ends.
    again: bool,
    timer: Option<SpawnHandle>,
    /// The VIPs in conflict, with the other hardware addresses their last probe heard.
    conflicts: BTreeMap<IpAddr, Vec<[u8; 6]>>,
    /// Probes in a row that heard no other host, per VIP in conflict.
    quiet: BTreeMap<IpAddr, u32>,
    /// The current term while leading, 0 otherwise: a round in flight checks it before it
    /// announces, so that no frame goes out after leadership was lost.
    live: Arc<AtomicU64>,
}

impl ArpSyncer {
    /// A syncer that asks `ensure` to place the VIPs and tells `report` what it did.
    pub fn new(settings: VipSettings, ensure: Recipient<Ensure>, report: Recipient<Synced>) -> Self {
        ArpSyncer {
            settings,
            ensure,
            report,
            schedule: Schedule::default(),
            leading: false,
            term: 0,
            busy: false,
            again: false,
            timer: None,
            conflicts: BTreeMap::new(),
            quiet: BTreeMap::new(),
            live: Arc::default(),
        }
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        if !self.leading {
            return;
        }
        if let Some(next) = self.schedule.next_due() {
            let wait = next.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(wait, |act, ctx| {
                act.timer = None;
                act.round(ctx);
            }));
        }
    }

    /// Runs one round (see the module docs), unless one is running: then once more after it.
    fn round(&mut self, ctx: &mut Context<Self>) {
        if !self.leading {
            return;
        }
        if self.busy {
            self.again = true;
            return;
        }
        self.busy = true;
        let term = self.term;
        let placed = self.ensure.send(Ensure);
        let work = async move { placed.await.ok().flatten() }.into_actor(self).then(move |placements, act, _| {
            let now = Instant::now();
            let current = act.term == term && act.leading;
            // A failed pass keeps the schedule: the next round tries again.
            let placements = placements.filter(|_| current).unwrap_or_default();
            let held: BTreeSet<IpAddr> = placements.iter().map(|p| p.vip).collect();
            let due = if placements.is_empty() {
                Vec::new()
            } else {
                act.schedule.follow(&held, now, &act.settings);
                act.schedule.due(now, &act.settings)
            };
            let live = act.live.clone();
            let window = act.settings.probe_window;
            let jobs = due.into_iter().filter_map(move |due| {
                let placement = placements.iter().find(|p| p.vip == due.vip)?.clone();
                Some(sync_one(placement, due.frames, window, live.clone(), term))
            });
            futures::future::join_all(jobs.collect::<Vec<_>>()).into_actor(act)
        });
        ctx.spawn(work.map(move |results, act, ctx| {
            act.busy = false;
            if act.term == term && act.leading {
                act.finish(results);
            }
            if std::mem::take(&mut act.again) {
                act.round(ctx);
            } else {
                act.arm(ctx);
            }
        }));
    }

    /// Folds a round's results into the conflicts and reports them.
    fn finish(&mut self, results: Vec<Outcome>) {
        let now = Instant::now();
        let mut synced = Synced::default();
        for outcome in results {
            synced.announced += u64::from(outcome.sent);
            synced.errors.extend(outcome.errors);
            let Some(others) = outcome.others else { continue };
            let was = self.schedule.in_conflict(outcome.vip);
            let heard = !others.is_empty();
            // A conflict clears only after several quiet probes in a row: one answer lost on a
            // busy link must not stop the fast announcements while the other host still holds it.
            let quiet = if heard { 0 } else { self.quiet.get(&outcome.vip).copied().unwrap_or(0) + 1 };
            self.quiet.insert(outcome.vip, quiet);
            let is = heard || (was && quiet < CLEAR_AFTER_QUIET_PROBES);
            if is && !was {
                let macs: Vec<String> = others.iter().map(|m| format_mac(*m)).collect();
                warn!(vip = %outcome.vip, answered_by = ?macs, "VIP conflict: another host answers for this VIP; announcing it every {:?} until it stops", self.settings.conflict_interval);
            } else if was && !is {
                info!(vip = %outcome.vip, "VIP conflict cleared: no other host answers for it");
            }
            self.schedule.set_conflict(outcome.vip, is, now, &self.settings);
            if heard {
                self.conflicts.insert(outcome.vip, others);
            } else if !is {
                self.conflicts.remove(&outcome.vip);
            }
        }
        // Conflicts of VIPs not probed this round still stand; those of VIPs no longer held go.
        let schedule = &self.schedule;
        self.conflicts.retain(|vip, _| schedule.in_conflict(*vip));
        self.quiet.retain(|vip, _| schedule.in_conflict(*vip));
        synced.conflicts = self.conflicts.clone();
        super::tell(&self.report, synced);
    }
}

/// What one VIP's turn of a round did.
struct Outcome {
    vip: IpAddr,
    sent: u32,
    /// Other hardware addresses that answered the probe (`None`: the probe failed).
    others: Option<Vec<[u8; 6]>>,
    errors: Vec<String>,
}

/// Announces, then probes, one VIP, unless leadership of `term` was lost meanwhile.
async fn sync_one(placement: Placement, frames: u32, window: Duration, live: Arc<AtomicU64>, term: u64) -> Outcome {
    let Placement { vip, interface, mac, link_local } = placement;
    let mut errors = Vec::new();
    if live.load(Ordering::SeqCst) != term {
        return Outcome { vip, sent: 0, others: None, errors };
    }
    // Announce first: at a takeover every millisecond counts. The probe follows at once; a
    // host that answers it is a conflict, announced over every conflict interval.
    let sent = match net::announce_times(&interface, vip, mac, frames).await {
        Ok(()) => frames,
        Err(e) => {
            warn!(%vip, %interface, error = %e, "announcement failed");
            errors.push(format!("announcing {vip} on {interface}: {e}"));
            0
        }
    };
    let others = match net::probe(&interface, vip, mac, link_local, window).await {
        Ok(others) => Some(others),
        Err(e) => {
            debug!(%vip, %interface, error = %e, "cannot probe the VIP");
            errors.push(format!("probing {vip} on {interface}: {e}"));
            None
        }
    };
    debug!(%vip, %interface, sent, "VIP announced");
    Outcome { vip, sent, others, errors }
}

/// `02:00:5e:10:00:01`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Actor for ArpSyncer {
    type Context = Context<Self>;
}

impl Handler<Leadership> for ArpSyncer {
    type Result = ();

    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        let leading = matches!(msg, Leadership::Gained(_));
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        self.term += 1;
        self.live.store(if leading { self.term } else { 0 }, Ordering::SeqCst);
        self.schedule.clear();
        self.conflicts.clear();
        self.quiet.clear();
        if leading {
            // Every VIP the first round finds held gets the takeover burst.
            self.round(ctx);
        } else {
            self.arm(ctx);
        }
    }
}

impl Handler<Placed> for ArpSyncer {
    type Result = ();

    fn handle(&mut self, Placed(vips): Placed, ctx: &mut Context<Self>) {
        if !self.leading || vips.is_empty() {
            return;
        }
        self.schedule.burst(vips, Instant::now(), &self.settings);
        self.round(ctx);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn settings() -> VipSettings {
        VipSettings {
            arp_burst: 5,
            arp_rounds: 2,
            arp_interval: Duration::from_secs(5),
            arp_refresh: Some(Duration::from_secs(60)),
            conflict_interval: Duration::from_secs(1),
            ..VipSettings::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Runs the schedule from `start` to `start + horizon`, waking when it says; returns each
    /// send as (seconds since start, vip, frames).
    fn run(schedule: &mut Schedule, start: Instant, horizon: Duration, s: &VipSettings) -> Vec<(u64, IpAddr, u32)> {
        let mut sent = Vec::new();
        let mut now = start;
        while let Some(next) = schedule.next_due().filter(|n| *n <= start + horizon) {
            now = now.max(next);
            for due in schedule.due(now, s) {
                sent.push(((now - start).as_millis() as u64 / 1000, due.vip, due.frames));
            }
        }
        sent
    }

    #[test]
    fn a_takeover_is_a_burst_then_a_second_burst_then_the_refresh() {
        let (s, start) = (settings(), Instant::now());
        let mut schedule = Schedule::default();
        let vip = ip("198.51.100.200");
        schedule.follow(&[vip].into(), start, &s);
        let sent = run(&mut schedule, start, Duration::from_secs(130), &s);
        assert_eq!(sent, vec![(0, vip, 5), (5, vip, 5), (65, vip, 1), (125, vip, 1)]);
    }

    #[test]
    fn a_vip_placed_while_leading_gets_its_own_burst_and_the_others_keep_their_pace() {
        let (s, start) = (settings(), Instant::now());
        let mut schedule = Schedule::default();
        let (a, b) = (ip("198.51.100.200"), ip("2001:db8::200"));
        schedule.follow(&[a].into(), start, &s);
        schedule.due(start, &s);
        schedule.follow(&[a, b].into(), start + Duration::from_secs(2), &s);
        let sent = run(&mut schedule, start + Duration::from_secs(2), Duration::from_secs(10), &s);
        assert_eq!(sent, vec![(0, b, 5), (3, a, 5), (5, b, 5)]);
    }

    #[test]
    fn a_conflict_is_announced_every_conflict_interval_until_it_clears() {
        let (s, start) = (settings(), Instant::now());
        let mut schedule = Schedule::default();
        let vip = ip("198.51.100.200");
        schedule.follow(&[vip].into(), start, &s);
        schedule.due(start, &s);
        schedule.set_conflict(vip, true, start, &s);
        let sent = run(&mut schedule, start, Duration::from_secs(4), &s);
        assert_eq!(sent.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        schedule.set_conflict(vip, false, start + Duration::from_secs(4), &s);
        let next = schedule.next_due().unwrap() - start;
        assert!(next >= Duration::from_secs(5), "back to the regular pace, not {next:?}");
    }

    #[test]
    fn without_refresh_a_vip_goes_quiet_after_its_rounds_and_a_dropped_vip_is_forgotten() {
        let s = VipSettings { arp_refresh: None, ..settings() };
        let start = Instant::now();
        let mut schedule = Schedule::default();
        let (a, b) = (ip("198.51.100.200"), ip("198.51.100.201"));
        schedule.follow(&[a, b].into(), start, &s);
        let sent = run(&mut schedule, start, Duration::from_secs(3600), &s);
        assert_eq!(sent.len(), 4, "{sent:?}");
        schedule.follow(&[a].into(), start + Duration::from_secs(10), &s);
        assert!(!schedule.clocks.contains_key(&b));
        schedule.clear();
        assert_eq!(schedule.next_due(), None);
    }

    proptest! {
        /// Whatever happens, every scheduled VIP is due again within its period, bursts come
        /// first, and no VIP is sent more than a burst at once.
        #[test]
        fn the_schedule_never_starves_a_vip(
            events in proptest::collection::vec((0u8..4, 0usize..3, 0u64..20_000), 1..60),
        ) {
            let s = settings();
            let vips = [ip("198.51.100.1"), ip("198.51.100.2"), ip("2001:db8::3")];
            let start = Instant::now();
            let mut schedule = Schedule::default();
            let mut now = start;
            for (kind, which, advance) in events {
                now += Duration::from_millis(advance);
                let vip = vips[which];
                match kind {
                    0 => schedule.burst([vip], now, &s),
                    1 => schedule.set_conflict(vip, true, now, &s),
                    2 => schedule.set_conflict(vip, false, now, &s),
                    _ => {
                        for due in schedule.due(now, &s) {
                            prop_assert!(due.frames == 1 || due.frames == s.arp_burst);
                        }
                    }
                }
                for (vip, clock) in &schedule.clocks {
                    let bound = if clock.conflict { s.conflict_interval.max(s.arp_interval) } else { s.arp_refresh.unwrap().max(s.arp_interval) };
                    prop_assert!(clock.next <= now + bound, "{vip} due at {:?}, beyond {bound:?}", clock.next - start);
                }
            }
        }
    }
}
