//! The TCP transport: length-delimited frames, a versioned postcard encoding, one multiplexed
//! connection per peer, mutual authentication with the cluster secret.
//!
//! # What it owns
//!
//! A [`TcpTransport`] owns its outgoing connections (one per peer address, made on the first
//! call, remade after a break with backoff between failed attempts) and the listeners it was
//! asked to start. It knows the request types only to encode them; what they mean is the
//! [`RequestHandler`]'s business.
//!
//! # Wire format
//!
//! Every frame is a 4-byte big-endian length, then that many bytes (at most
//! [`TcpConfig::max_frame_bytes`]): one version byte (`2`), then one postcard-encoded message,
//! then, on every frame after `Welcome`, a 32-byte tag.
//! A client sends `ClientMessage`s, a server `ServerMessage`s (enums, so every frame says what it
//! is). The connection opens with the handshake:
//!
//! ```text
//!  client                                                   server
//!    │── Hello { version: 2, client_nonce } ──────────────────▶│
//!    │◀──────────── Challenge { server_nonce, server_proof } ──│  server_proof = MAC("server" ‖ cn ‖ sn)
//!    │   (wrong server_proof: the client hangs up, `Refused`)  │
//!    │── Proof { MAC("client" ‖ sn ‖ cn) } ───────────────────▶│
//!    │◀────────────────────────── Welcome | Refused { reason } │  (and closes after Refused)
//!    │                                                         │
//!    │── Request { id: 7, body: PeerRequest } ‖ tag ──────────▶│  requests and replies
//!    │── Request { id: 8, body: PeerRequest } ‖ tag ──────────▶│  interleave freely
//!    │◀────────────────── Reply { id: 8, body: PeerReply } ‖ tag │
//!    │◀──────── Failed { id: 7, failure } ‖ tag (no reply to 7) │
//! ```
//!
//! `MAC(m)` is BLAKE3 keyed with `derive_key("task-center transport v1", secret)`. The tag of
//! the n-th frame a side sends after `Welcome` is BLAKE3 keyed with that side's frame key
//! (`MAC("client frames" ‖ cn ‖ sn)` or `MAC("server frames" ‖ cn ‖ sn)`) over `n` (8 bytes,
//! little-endian) and the frame; a frame whose tag is wrong (altered, injected, replayed,
//! reordered, reflected) closes the connection. See the `auth` submodule for why it is built
//! so. Nothing but the handshake is answered before `Welcome`: a peer without the secret never
//! reaches the handler. Frames are not encrypted: run the cluster network on trusted links or
//! under WireGuard if requests and replies must stay private.
//!
//! `Failed` answers a request that has no reply: the reply exceeded the frame limit (the call
//! fails with [`TransportError::TooLarge`]) or the handler panicked (`Unreachable`).
//!
//! # Limits
//!
//! All in [`TcpConfig`]: frame size; connect-and-handshake timeout (both sides: a silent
//! client cannot hold a server slot); calls in flight per client connection; requests running
//! per server connection; connections per listener; reconnect backoff. Every queue is bounded by
//! one of these. A malformed or oversized frame closes its connection only, with a `warn!`
//! naming the peer and the reason.
//!
//! # Errors of a call
//!
//! Nothing listens, the connection broke, or the address backs off after a failed attempt:
//! `Unreachable`. No reply within the call's timeout: `Timeout` (the request may have run). The
//! peer does not know our secret, or we not its: `Refused`, until the configuration is fixed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_util::bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Listener, RequestHandler, Transport, TransportError};
use crate::api::{PeerReply, PeerRequest};

mod auth;
mod client;
mod config;
mod server;
mod wire;

pub use config::{TcpConfig, TcpConfigError};

/// What the client and server sides share: the settings and the key derived from the secret.
struct Settings {
    config: TcpConfig,
    key: auth::ClusterKey,
}

/// Nodes calling each other over TCP. Cheap to clone; clones share connections. See the module
/// docs.
///
/// ```no_run
/// use std::time::Duration;
/// use task_center::api::PeerRequest;
/// use task_center::transport::{TcpConfig, TcpTransport, Transport};
///
/// # async fn demo(secret: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
/// let transport = TcpTransport::new(TcpConfig::new(secret))?;
/// let reply = transport.call("198.51.100.7:10300", PeerRequest::Ping, Duration::from_secs(2)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    dialer: client::Dialer,
    /// Cancelled by [`TcpTransport::shutdown`]: stops every connection and listener.
    shutdown: CancellationToken,
    /// Child of `shutdown`, also cancelled when the last handle is dropped: stops the outgoing
    /// connections (listeners live until their `Listener` closes).
    outgoing: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.outgoing.cancel();
    }
}

impl TcpTransport {
    /// A transport with `config`, after checking it. No socket is opened until the first
    /// [`listen`](Transport::listen) or [`call`](Transport::call), which must run inside a tokio
    /// runtime.
    pub fn new(config: TcpConfig) -> Result<Self, TcpConfigError> {
        config.validate()?;
        let key = auth::ClusterKey::derive(&config.secret);
        let settings = Arc::new(Settings { config, key });
        let shutdown = CancellationToken::new();
        let outgoing = shutdown.child_token();
        let dialer = client::Dialer::new(settings.clone(), outgoing.clone());
        Ok(TcpTransport { inner: Arc::new(Inner { settings, dialer, shutdown, outgoing }) })
    }

    /// The settings this transport was made with.
    pub fn config(&self) -> &TcpConfig {
        &self.inner.settings.config
    }

    /// Closes every connection and listener of this transport (and its clones). Waiting calls,
    /// later calls and later listens fail with [`TransportError::Closed`]. Returns at once; the
    /// sockets close in the background, the listening ones right away.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport").field("config", self.config()).finish_non_exhaustive()
    }
}

#[async_trait]
impl Transport for TcpTransport {
    /// BLAKE3 in key-derivation mode over the cluster secret, in hex: one-way, so it tells a
    /// wrong secret apart without revealing the right one (given a secret of the 16 bytes or more
    /// the configuration requires, drawn at random as it should be).
    fn cluster_verifier(&self) -> Option<String> {
        let secret = &self.inner.settings.config.secret;
        Some(
            blake3::derive_key("task-center 2026 cluster secret verifier", secret)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    async fn listen(&self, address: &str, handler: Arc<dyn RequestHandler>) -> Result<Listener, TransportError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(TransportError::Closed);
        }
        server::listen(self.inner.settings.clone(), address, handler, &self.inner.shutdown).await
    }

    async fn call(&self, address: &str, request: PeerRequest, timeout: Duration) -> Result<PeerReply, TransportError> {
        if self.inner.outgoing.is_cancelled() {
            return Err(TransportError::Closed);
        }
        self.inner.dialer.call(address, request, timeout).await
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The writer of a connection: seals and sends queued frames, batching those already waiting
/// into one flush, until the queue closes or `stop` is cancelled. The one writer of its
/// direction, so frames are sealed in the order they go out.
async fn write_frames<S>(
    mut sink: S,
    mut queue: mpsc::Receiver<Bytes>,
    mut sealer: auth::Sealer,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    S: Sink<Bytes, Error = std::io::Error> + Unpin,
{
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            first = queue.recv() => first,
        };
        let Some(first) = first else { return Ok(()) };
        let batch = async {
            sink.feed(sealer.seal(first)).await?;
            while let Ok(next) = queue.try_recv() {
                sink.feed(sealer.seal(next)).await?;
            }
            sink.flush().await
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            written = batch => written?,
        }
    }
}
