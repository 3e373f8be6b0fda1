//! The actors of a task server: [`Dispatcher`], [`Runner`], [`TaskController`].
//!
//! ```text
//!   host handle ──Client──▶ Dispatcher ──(follower: forward over transport)──▶ leader's Dispatcher
//!                              │  Leadership ◀── election campaign (ZooKeeper)
//!                              │  Assign / ControlChanged (over transport, even to itself)
//!                              ▼
//!                           Runner ──starts──▶ TaskController (one per task) ──▶ TaskRun steps
//!                              ▲                      │ commits progress, fenced on its claim
//!                              └──ControllerFinished──┘
//! ```
//!
//! All actors of a node live on the node's own actix system thread (see [`crate::center`]); the
//! host talks to them only through the handle. Every message is a typed message with its reply
//! type; blocking work (LMDB, file I/O) runs on the blocking pool, never on the actor thread.
//!
//! This module decides; it writes to ZooKeeper only through [`crate::store`].

pub mod arp;
pub mod controller;
pub mod dispatcher;
pub mod election;
mod requests;
pub mod runner;
pub mod targets;
pub mod vip;

pub use arp::ArpSyncer;
pub use controller::TaskController;
pub use dispatcher::{Dispatcher, LeaderStatus};
pub use election::{current_leader, LeaderInfo, Leadership};
pub use runner::Runner;
pub use vip::{VipReport, VipServer, VipSettings};

/// Sends `message` to `to` within its mailbox's capacity, from code that cannot wait (a handler):
/// at once when there is room, otherwise from a task that waits for room. Unlike `do_send`, it
/// never grows a mailbox past the capacity the builder set. A stopped recipient is ignored.
pub(crate) fn tell<M>(to: &actix::Recipient<M>, message: M)
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
{
    match to.try_send(message) {
        Ok(()) | Err(actix::prelude::SendError::Closed(_)) => {}
        Err(actix::prelude::SendError::Full(message)) => {
            let to = to.clone();
            actix::spawn(async move {
                let _ = to.send(message).await;
            });
        }
    }
}
