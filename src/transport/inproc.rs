//! The in-process transport: nodes of one process calling each other's handlers directly.
//!
//! One [`InProcessNetwork`] value is the whole network; clones share it. `listen` registers a
//! handler under a name (any non-empty string nobody else holds), `call` looks the name up and
//! runs the handler. Nothing is serialized: requests and replies move as values.
//!
//! # Calls
//!
//! Each call runs the handler on its own `tokio::spawn`ed task and waits for it at most the
//! call's timeout. A caller that gives up (timeout, or its future dropped) stops waiting; the
//! handler still runs to the end, as it would on a remote node, so a handler is never cancelled
//! half-way. A handler that panics makes the call fail with `Unreachable`, as a peer that crashed
//! mid-call would.
//!
//! # Partitions
//!
//! For tests, the network can refuse calls; a refused call fails at once with
//! [`TransportError::Unreachable`]. Refusal is checked when a call starts and covers the whole
//! call (request and reply); calls already running are not disturbed.
//!
//! - [`isolate`](InProcessNetwork::isolate) an address: every call to it fails, and so does every
//!   call made from an [`endpoint`](InProcessNetwork::endpoint) with that address.
//! - [`refuse`](InProcessNetwork::refuse) one direction, `from -> to`: calls made from the
//!   endpoint `from` to `to` fail, while `to -> from` still works. This is how a test cuts the
//!   dispatcher -> runner direction while everything else (the runner's ZooKeeper session, which
//!   is not on this network at all; calls in the other direction) keeps working.
//!
//! A call knows its source only when it is made through an endpoint: `network.endpoint("node-1")`
//! returns a handle on the same network whose calls come from `"node-1"`. Calls made through the
//! plain network value have no source: only isolation of their destination applies to them.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use task_center::api::{PeerReply, PeerRequest};
//! use task_center::model::NodeId;
//! use task_center::transport::{InProcessNetwork, RequestHandler, Transport, TransportError};
//!
//! struct Pong;
//! #[async_trait]
//! impl RequestHandler for Pong {
//!     async fn handle(&self, _request: PeerRequest) -> PeerReply {
//!         PeerReply::Pong { node: NodeId::new("runner-1").unwrap() }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), TransportError> {
//! let network = InProcessNetwork::new();
//! let _runner = network.listen("runner-1", Arc::new(Pong)).await?;
//! let dispatcher = network.endpoint("dispatcher-1");
//! let timeout = Duration::from_secs(1);
//! assert!(dispatcher.call("runner-1", PeerRequest::Ping, timeout).await.is_ok());
//!
//! network.refuse("dispatcher-1", "runner-1");
//! let cut = dispatcher.call("runner-1", PeerRequest::Ping, timeout).await;
//! assert!(matches!(cut, Err(TransportError::Unreachable { .. })));
//!
//! network.heal("dispatcher-1", "runner-1");
//! assert!(dispatcher.call("runner-1", PeerRequest::Ping, timeout).await.is_ok());
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{Listener, RequestHandler, Transport, TransportError};
use crate::api::{PeerReply, PeerRequest};

/// Nodes of one process calling each other directly. Cheap to clone; clones share the network.
/// See the module docs.
#[derive(Clone, Default)]
pub struct InProcessNetwork {
    network: Arc<Network>,
    /// The address calls are made from, for an [`endpoint`](InProcessNetwork::endpoint).
    local_address: Option<Arc<str>>,
}

#[derive(Default)]
struct Network {
    state: Mutex<State>,
    /// Source of registration numbers, so that closing an old listener cannot remove a newer
    /// registration of the same address.
    next_registration: AtomicU64,
}

#[derive(Default)]
struct State {
    handlers: HashMap<String, Registration>,
    /// Addresses cut off in both directions.
    isolated: HashSet<String>,
    /// Refused directions, `(from, to)`.
    refused: HashSet<(String, String)>,
}

struct Registration {
    number: u64,
    handler: Arc<dyn RequestHandler>,
}

impl InProcessNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the same network whose calls come from `local_address`, so that
    /// [`refuse`](Self::refuse) and [`isolate`](Self::isolate) can apply to them. The address
    /// need not be listening.
    pub fn endpoint(&self, local_address: &str) -> InProcessNetwork {
        InProcessNetwork { network: self.network.clone(), local_address: Some(local_address.into()) }
    }

    /// The address calls through this handle come from; `None` for the plain network value.
    pub fn local_address(&self) -> Option<&str> {
        self.local_address.as_deref()
    }

    /// Makes calls from the endpoint `from` to `to` fail with `Unreachable` until
    /// [`heal`](Self::heal)ed. The other direction is not affected.
    pub fn refuse(&self, from: &str, to: &str) {
        self.network.state().refused.insert((from.to_string(), to.to_string()));
    }

    /// Undoes [`refuse`](Self::refuse) for the direction `from -> to`.
    pub fn heal(&self, from: &str, to: &str) {
        self.network.state().refused.remove(&(from.to_string(), to.to_string()));
    }

    /// Cuts `address` off: calls to it, and calls from an endpoint with that address, fail with
    /// `Unreachable` until it [`rejoin`](Self::rejoin)s.
    pub fn isolate(&self, address: &str) {
        self.network.state().isolated.insert(address.to_string());
    }

    /// Undoes [`isolate`](Self::isolate) for `address`.
    pub fn rejoin(&self, address: &str) {
        self.network.state().isolated.remove(address);
    }

    /// Undoes every refusal and isolation.
    pub fn heal_all(&self) {
        let mut state = self.network.state();
        state.isolated.clear();
        state.refused.clear();
    }

    /// The handler for a call from this handle to `to`, or why the call cannot be made.
    fn route(&self, to: &str) -> Result<Arc<dyn RequestHandler>, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { address: to.to_string(), reason };
        let state = self.network.state();
        if state.isolated.contains(to) {
            return Err(unreachable("the address is isolated from the network".into()));
        }
        if let Some(from) = self.local_address.as_deref() {
            if state.isolated.contains(from) {
                return Err(unreachable(format!("the caller {from:?} is isolated from the network")));
            }
            if state.refused.contains(&(from.to_string(), to.to_string())) {
                return Err(unreachable(format!("calls from {from:?} to this address are refused")));
            }
        }
        match state.handlers.get(to) {
            Some(registration) => Ok(registration.handler.clone()),
            None => Err(unreachable("nothing listens at this address".into())),
        }
    }
}

impl Network {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await or a call out, so poisoning means a bug here.
        self.state.lock().expect("in-process network state lock poisoned")
    }
}

impl std::fmt::Debug for InProcessNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessNetwork").field("local_address", &self.local_address).finish_non_exhaustive()
    }
}

#[async_trait]
impl Transport for InProcessNetwork {
    async fn listen(&self, address: &str, handler: Arc<dyn RequestHandler>) -> Result<Listener, TransportError> {
        let bad =
            |reason: &str| TransportError::BadAddress { address: address.to_string(), reason: reason.to_string() };
        if address.is_empty() {
            return Err(bad("an in-process address must not be empty"));
        }
        let number = self.network.next_registration.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.network.state();
            if state.handlers.contains_key(address) {
                return Err(bad("another node already listens at this address"));
            }
            state.handlers.insert(address.to_string(), Registration { number, handler });
        }
        let network = Arc::downgrade(&self.network);
        let registered = address.to_string();
        Ok(Listener::new(address.to_string(), move || {
            if let Some(network) = network.upgrade() {
                let mut state = network.state();
                if state.handlers.get(&registered).is_some_and(|r| r.number == number) {
                    state.handlers.remove(&registered);
                }
            }
        }))
    }

    async fn call(&self, address: &str, request: PeerRequest, timeout: Duration) -> Result<PeerReply, TransportError> {
        let handler = self.route(address)?;
        // The handler runs on its own task: a caller that stops waiting does not cancel it.
        let running = tokio::spawn(async move { handler.handle(request).await });
        match tokio::time::timeout(timeout, running).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(failure)) => Err(TransportError::Unreachable {
                address: address.to_string(),
                reason: format!("the handler failed: {failure}"),
            }),
            Err(_) => Err(TransportError::Timeout { address: address.to_string(), timeout_ms: millis(timeout) }),
        }
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeId;

    struct Named(&'static str);

    #[async_trait]
    impl RequestHandler for Named {
        async fn handle(&self, _request: PeerRequest) -> PeerReply {
            PeerReply::Pong { node: NodeId::new(self.0).unwrap() }
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn closing_an_old_listener_keeps_the_new_registration() {
        let network = InProcessNetwork::new();
        let old = network.listen("a", Arc::new(Named("old"))).await.unwrap();
        // Taken while the old one listens.
        assert!(matches!(network.listen("a", Arc::new(Named("x"))).await, Err(TransportError::BadAddress { .. })));
        // Simulate a re-registration racing the old listener's close: remove, register anew,
        // then run the old close.
        network.network.state().handlers.remove("a");
        let _new = network.listen("a", Arc::new(Named("new"))).await.unwrap();
        old.close();
        let reply = network.call("a", PeerRequest::Ping, TIMEOUT).await.unwrap();
        assert_eq!(reply, PeerReply::Pong { node: NodeId::new("new").unwrap() });
    }

    #[tokio::test]
    async fn isolation_applies_to_both_directions_and_rejoin_undoes_it() {
        let network = InProcessNetwork::new();
        let _a = network.listen("a", Arc::new(Named("a"))).await.unwrap();
        let _b = network.listen("b", Arc::new(Named("b"))).await.unwrap();
        let from_a = network.endpoint("a");
        let from_b = network.endpoint("b");
        network.isolate("a");
        assert!(matches!(from_a.call("b", PeerRequest::Ping, TIMEOUT).await, Err(TransportError::Unreachable { .. })));
        assert!(matches!(from_b.call("a", PeerRequest::Ping, TIMEOUT).await, Err(TransportError::Unreachable { .. })));
        assert!(matches!(network.call("a", PeerRequest::Ping, TIMEOUT).await, Err(TransportError::Unreachable { .. })));
        network.rejoin("a");
        assert!(from_a.call("b", PeerRequest::Ping, TIMEOUT).await.is_ok());
        assert!(from_b.call("a", PeerRequest::Ping, TIMEOUT).await.is_ok());
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_the_call_as_unreachable() {
        struct Panics;
        #[async_trait]
        impl RequestHandler for Panics {
            async fn handle(&self, _request: PeerRequest) -> PeerReply {
                panic!("handler bug")
            }
        }
        let network = InProcessNetwork::new();
        let _l = network.listen("p", Arc::new(Panics)).await.unwrap();
        let result = network.call("p", PeerRequest::Ping, TIMEOUT).await;
        assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
    }
}
