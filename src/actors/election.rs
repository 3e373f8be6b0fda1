//! Leader election over the coordination service, without herd effect.
//!
//! Each node's candidate is an ephemeral-sequential node `/election/candidate-<token>-<seq>` that
//! holds its [`LeaderInfo`]. The candidate with the lowest sequence leads; every other candidate
//! watches only its immediate predecessor, so a leader's death wakes one node, not all of them
//! (the recipe of Curator's `LeaderLatch`).
//!
//! The campaign tells its recipients (the dispatcher, the VIP server, the ARP syncer, in that
//! order; `Lost` in the reverse order, each awaited) [`Leadership::Gained`] with the candidate
//! node as the fence for its writes, and [`Leadership::Lost`] when it can no longer confirm that
//! it leads: at once when the session expired or its candidate node is gone, and after at most
//! the leader's suspend grace (cut short by the local lease) when the connection is lost. After a
//! reconnect within the same session it checks again and may regain leadership; after an expiry
//! it enters a new candidate.
//!
//! The recipe is **protected** (Curator's protected mode, ZOOKEEPER-1262): a session's candidates
//! carry one token per session generation, and before it creates a candidate the campaign looks
//! for one with its token. A create whose reply was lost (the server applied it, the answer never
//! came), or a listing that failed right after it, therefore never leaves an orphan candidate of
//! the live session ahead of the node's real one: the retry finds and adopts it, and removes any
//! extra one, so the lowest candidate always belongs to a campaign that knows it leads.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::coord::{join, CoordError, Coordination, CreateMode, SessionState, SessionStatus};
use crate::exec::StopToken;
use crate::model::NodeId;
use crate::store::{decode, encode, layout, Fence};

/// What a candidate publishes: who it is and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The node.
    pub node: NodeId,
    /// Its transport address.
    pub address: String,
}

/// A change of this node's leadership.
#[derive(Message, Clone, Debug, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Leadership {
    /// This node leads; its writes are fenced on this candidate node.
    Gained(Fence),
    /// This node no longer leads, or cannot confirm it.
    Lost,
}

/// The node whose candidate comes right after the lowest: the one that leads if the leader
/// resigns.
pub async fn next_in_line(coord: &dyn Coordination) -> Result<Option<NodeId>, CoordError> {
    let mut names = coord.children(layout::ELECTION).await?;
    layout::sort_by_sequence(&mut names);
    for name in names.iter().skip(1) {
        match coord.get(&join(layout::ELECTION, name)).await {
            Ok((data, _)) => {
                if let Ok(info) = decode::<LeaderInfo>(name, &data) {
                    return Ok(Some(info.node));
                }
            }
            Err(CoordError::NoNode { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The current leader, as the election says: the lowest candidate's info.
pub async fn current_leader(coord: &dyn Coordination) -> Result<Option<LeaderInfo>, CoordError> {
    let mut names = coord.children(layout::ELECTION).await?;
    layout::sort_by_sequence(&mut names);
    for name in names {
        match coord.get(&join(layout::ELECTION, &name)).await {
            Ok((data, _)) => return Ok(decode(&name, &data).ok()),
            Err(CoordError::NoNode { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Asks a leading campaign to step down for a while so that another node can try (the VIP
/// server does when no route covers a VIP here).
#[derive(Clone, Debug)]
pub struct Resign {
    sender: tokio::sync::mpsc::Sender<Duration>,
}

impl Resign {
    /// A resign handle and the receiver the campaign listens on.
    pub(crate) fn channel() -> (Resign, tokio::sync::mpsc::Receiver<Duration>) {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        (Resign { sender }, receiver)
    }

    /// Steps down (if leading) and stays out of the election for `pause`.
    pub fn resign(&self, pause: Duration) {
        let _ = self.sender.try_send(pause);
    }
}

/// Runs this node's campaign until `stop` is cancelled; then withdraws the candidate. Every
/// leadership change is told to each of `to`.
pub(crate) async fn campaign(
    coord: Arc<dyn Coordination>,
    me: LeaderInfo,
    hold: LeaderHold,
    to: Vec<Recipient<Leadership>>,
    resign: tokio::sync::mpsc::Receiver<Duration>,
    stop: StopToken,
) {
    let mut campaign = Campaign {
        coord,
        me,
        hold,
        to,
        resign,
        session: None,
        leading: false,
        candidate: None,
        token: (0, String::new()),
    };
    tokio::select! {
        _ = campaign.run() => {}
        _ = stop.cancelled() => {}
    }
    campaign.tell(false, None).await;
    if let Some(path) = campaign.candidate.take() {
        // Resign: the next candidate's watch fires at once instead of after our session ends.
        let _ = campaign.coord.delete(&path, None).await;
    }
}

/// How long a leader whose session is suspended keeps leading: at most `grace`, and never past
/// the node's local lease (see [`crate::lease`]), which lapses well before the session can
/// expire on the server and another node can win.
#[derive(Clone)]
pub(crate) struct LeaderHold {
    pub lease: crate::lease::LocalLease,
    pub grace: Duration,
}

struct Campaign {
    coord: Arc<dyn Coordination>,
    me: LeaderInfo,
    hold: LeaderHold,
    to: Vec<Recipient<Leadership>>,
    resign: tokio::sync::mpsc::Receiver<Duration>,
    session: Option<watch::Receiver<SessionStatus>>,
    leading: bool,
    candidate: Option<String>,
    /// The token of this session generation's candidates.
    token: (u64, String),
}

impl Campaign {
    async fn run(&mut self) {
        let mut session = self.coord.subscribe();
        self.session = Some(session.clone());
        let mut delays = crate::retry::COORDINATION.delays();
        loop {
            let Ok(status) = session.wait_for(|s| s.state == SessionState::Connected).await.map(|s| *s) else {
                return;
            };
            match self.stand(status.generation).await {
                Ok(()) => delays.reset(),
                Err(e) => {
                    debug!(node = %self.me.node, error = %e, "election interrupted; standing again");
                    delays.wait().await;
                }
            }
            if session.borrow().state == SessionState::Closed {
                return;
            }
        }
    }

    /// Enters a candidate for this session generation and follows it until the session changes.
    async fn stand(&mut self, generation: u64) -> Result<(), CoordError> {
        if self.token.0 != generation {
            self.token = (generation, token());
        }
        let ours = format!("{}{}-", layout::CANDIDATE_PREFIX, self.token.1);
        let path = match self.find(&ours).await? {
            Some(path) => path,
            // If the answer to this create is lost, the next stand finds the node by its token.
            None => {
                let prefix = join(layout::ELECTION, &ours);
                self.coord.create(&prefix, &encode(&self.me), CreateMode::EphemeralSequential).await?
            }
        };
        self.candidate = Some(path.clone());
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        let mut session = self.session.clone().expect("session receiver is set in run");
        loop {
            let status = *session.borrow_and_update();
            if status.generation != generation || status.state != SessionState::Connected {
                if self.leading && status.generation == generation && status.state == SessionState::Suspended {
                    if self.ride_out(&mut session, generation).await {
                        continue;
                    }
                    warn!(node = %self.me.node, "ZooKeeper unreachable beyond the leader's grace; letting go of leadership");
                }
                self.tell(false, None).await;
                // The ride-out may have consumed a newer status (the session expired meanwhile).
                let status = *session.borrow_and_update();
                if status.state == SessionState::Connected && status.generation == generation {
                    continue;
                }
                if status.generation != generation || status.state == SessionState::Closed {
                    self.candidate = None;
                    return Ok(());
                }
                // Suspended: wait for the connection to come back (or the session to end).
                if session.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            let mut names = self.coord.children(layout::ELECTION).await?;
            layout::sort_by_sequence(&mut names);
            let Some(position) = names.iter().position(|n| *n == name) else {
                warn!(node = %self.me.node, "election candidate vanished; standing again");
                self.tell(false, None).await;
                self.candidate = None;
                return Ok(());
            };
            // Watch ourselves when leading (to notice our node's loss), else our predecessor.
            let watched = if position == 0 { path.clone() } else { join(layout::ELECTION, &names[position - 1]) };
            let (exists, watch) = self.coord.exists_watch(&watched).await?;
            if position == 0 {
                self.tell(true, Some(&path)).await;
            } else if exists.is_some() {
                self.tell(false, None).await;
            } else {
                continue;
            }
            tokio::select! {
                _ = watch => {}
                changed = session.changed() => if changed.is_err() { return Ok(()) },
                Some(pause) = self.resign.recv() => {
                    if !self.leading {
                        continue;
                    }
                    warn!(node = %self.me.node, pause_ms = pause.as_millis() as u64, "resigning leadership");
                    self.tell(false, None).await;
                    let _ = self.coord.delete(&path, None).await;
                    self.candidate = None;
                    tokio::time::sleep(pause).await;
                    return Ok(());
                }
            }
        }
    }

    /// A leader's session is suspended: waits for it to come back within the grace, cut short
    /// by the local lease. True if it did (the node still leads).
    async fn ride_out(&self, session: &mut watch::Receiver<SessionStatus>, generation: u64) -> bool {
        let now = tokio::time::Instant::now();
        let Some(until) = self.hold.lease.valid_until(generation).map(|lease| lease.min(now + self.hold.grace)) else {
            return false;
        };
        if until <= now {
            return false;
        }
        debug!(node = %self.me.node, grace_ms = (until - now).as_millis() as u64, "ZooKeeper connection lost; still leading for now");
        let back = session.wait_for(|s| s.generation != generation || s.state != SessionState::Suspended);
        let _ = tokio::time::timeout_at(until, back).await;
        let status = *session.borrow();
        let kept = status.generation == generation && status.state == SessionState::Connected;
        if kept {
            info!(node = %self.me.node, "ZooKeeper connection back within the grace; still leading");
        }
        kept
    }

    /// This session's candidate, found by its name prefix `ours` (a create whose answer was
    /// lost); extra ones are removed, the lowest kept.
    async fn find(&self, ours: &str) -> Result<Option<String>, CoordError> {
        let mut names: Vec<String> =
            self.coord.children(layout::ELECTION).await?.into_iter().filter(|n| n.starts_with(ours)).collect();
        layout::sort_by_sequence(&mut names);
        for extra in names.iter().skip(1) {
            warn!(node = %self.me.node, candidate = %extra, "removing an extra election candidate of this session");
            match self.coord.delete(&join(layout::ELECTION, extra), None).await {
                Ok(()) | Err(CoordError::NoNode { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(name) = names.first() {
            info!(node = %self.me.node, candidate = %name, "found this session's election candidate again");
        }
        Ok(names.first().map(|name| join(layout::ELECTION, name)))
    }

    /// Tells every recipient, in order and within their mailboxes' capacity (never reordered).
    async fn tell(&mut self, leading: bool, fence: Option<&str>) {
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        let message = match fence {
            Some(path) if leading => {
                info!(node = %self.me.node, "won the election");
                Leadership::Gained(Fence::new(path))
            }
            _ => {
                info!(node = %self.me.node, "no longer leads");
                Leadership::Lost
            }
        };
        // Gained in the given order; Lost in reverse, so that the last to learn of leadership
        // (the ARP syncer, after the VIP server) is the first to stop acting on it.
        let order: Vec<&Recipient<Leadership>> =
            if leading { self.to.iter().collect() } else { self.to.iter().rev().collect() };
        for to in order {
            let _ = to.send(message.clone()).await;
        }
    }
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
