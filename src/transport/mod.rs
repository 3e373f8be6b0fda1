//! Transport: how nodes call each other.
//!
//! A [`Transport`] carries typed [`PeerRequest`]s to a peer's address and brings back its
//! [`PeerReply`]. Two built-ins:
//!
//! - [`InProcessNetwork`]: nodes of one process call each other directly (the quickstart, the
//!   embedded defaults, fast tests). It can refuse calls between chosen nodes, to test
//!   partitions.
//! - [`TcpTransport`]: tokio TCP, length-delimited frames, a versioned binary encoding (postcard),
//!   a maximum frame size, per-call timeouts, reconnects with backoff, and mutual
//!   challenge-response authentication with a shared cluster secret, then a tag on every frame
//!   (keyed per connection and direction, counted), so nothing can be altered, injected or
//!   replayed on an open connection either. A peer without the secret gets nothing but a
//!   refusal; a malformed, oversized or forged frame closes that connection, with the reason
//!   logged, and hurts nothing else. Frames are not encrypted.
//!
//! A host may plug in its own transport (its RPC framework) by implementing the trait.
//!
//! This module knows the request types but not what they mean: it hands requests to the
//! [`RequestHandler`] the node registered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::api::{PeerReply, PeerRequest};

mod inproc;
mod tcp;

pub use inproc::InProcessNetwork;
pub use tcp::{TcpConfig, TcpConfigError, TcpTransport};

/// Serves the requests that reach a node.
#[async_trait]
pub trait RequestHandler: Send + Sync + 'static {
    /// Answers one request. Called concurrently; must not block.
    async fn handle(&self, request: PeerRequest) -> PeerReply;
}

/// Why a call failed. Every variant is transient from the caller's point of view (the peer may
/// come back, or another peer may answer) except [`TransportError::Refused`] for a bad secret
/// and [`TransportError::BadAddress`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Nothing listens at the address, or the connection broke. Transient.
    #[error("peer {address} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        address: String,
        /// What happened.
        reason: String,
    },
    /// No answer within the call's timeout. Transient; the request may or may not have been
    /// handled.
    #[error("peer {address} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The peer's address.
        address: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The peer refused us (wrong cluster secret, or a protocol version it does not speak).
    /// Final until the configuration is fixed.
    #[error("peer {address} refused the connection: {reason}")]
    Refused {
        /// The peer's address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The address cannot be parsed or bound. Final.
    #[error("bad address {address:?}: {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// Why.
        reason: String,
    },
    /// The request or reply does not fit in a frame. Final for that request.
    #[error("message of {bytes} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded message.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The transport was shut down.
    #[error("transport closed")]
    Closed,
}

/// A node's listening endpoint; dropping it (or calling [`Listener::close`]) stops serving.
pub struct Listener {
    address: String,
    close: Option<Box<dyn FnOnce() + Send>>,
}

impl Listener {
    /// A listener at `address` that runs `close` when closed or dropped.
    pub fn new(address: String, close: impl FnOnce() + Send + 'static) -> Self {
        Listener { address, close: Some(Box::new(close)) }
    }

    /// The address peers use to reach this node.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops serving: new calls to this address fail with `Unreachable`.
    pub fn close(mut self) {
        if let Some(close) = self.close.take() {
            close();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(close) = self.close.take() {
            close();
        }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("address", &self.address).finish()
    }
}

/// How nodes call each other. See the module docs.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Starts serving `handler` at `address` (for TCP `host:port`, port 0 for any; for the
    /// in-process network any unique name). Returns the listener, whose
    /// [`address`](Listener::address) is what peers dial.
    async fn listen(&self, address: &str, handler: Arc<dyn RequestHandler>) -> Result<Listener, TransportError>;

    /// Sends one request to the node at `address` and waits for its reply, at most `timeout`.
    async fn call(&self, address: &str, request: PeerRequest, timeout: Duration) -> Result<PeerReply, TransportError>;

    /// A public, one-way verifier of the credential nodes authenticate each other with (for
    /// TCP, derived from the cluster secret), if the transport has one. The first node of a
    /// cluster stores it in the coordination service and every later node compares its own, so a
    /// node with another secret refuses to start with a clear error instead of joining a cluster
    /// whose nodes cannot call it. It must not reveal the credential. `None` (the default): no
    /// check.
    fn cluster_verifier(&self) -> Option<String> {
        None
    }
}
