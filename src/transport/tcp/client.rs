//! The calling side: one multiplexed connection per peer address, re-established on demand with
//! backoff.
//!
//! Each address has a [`Peer`] slot that is idle, connecting, connected or backing off. The
//! first call that finds no usable connection starts one connection attempt on its own task;
//! every call arriving meanwhile waits for that attempt (within its own timeout) instead of
//! dialing again. A failed attempt starts a backoff (`min * 2^(failures - 1)`, jittered, capped); calls
//! during it fail at once. A connection that breaks fails its waiting calls and is replaced by
//! the next call, immediately; only failed attempts back off.
//!
//! A [`Connection`] has a writer task (a bounded queue of encoded frames, written in batches)
//! and a reader task that hands each reply to the call waiting under its id. At most
//! `max_in_flight_per_connection` calls wait at once; the pending map cannot outgrow that.
//!
//! A peer whose host vanished sends no FIN: its connection would look alive until TCP gives up,
//! many minutes later. So a call that times out while not a single frame arrived on its
//! connection since the call was sent closes the connection; the next call dials afresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::stream::SplitStream;
use futures::{FutureExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::auth::{self, HandshakeError};
use super::wire::{self, ClientMessage, Failure, Frame, ServerMessage, WireError};
use super::{millis, write_frames, Settings};
use crate::api::{PeerReply, PeerRequest};
use crate::transport::TransportError;

type Attempt = Shared<BoxFuture<'static, Result<Arc<Connection>, TransportError>>>;
type Reply = Result<PeerReply, TransportError>;

/// The connections of one transport, by peer address.
pub(super) struct Dialer {
    settings: Arc<Settings>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Parent of every connection's token: cancelled when the transport shuts down or is dropped.
    closed: CancellationToken,
}

impl Dialer {
    pub(super) fn new(settings: Arc<Settings>, closed: CancellationToken) -> Self {
        Dialer { settings, peers: Mutex::new(HashMap::new()), closed }
    }

    /// Sends `request` to `address` and waits for the reply at most `timeout`, connecting first
    /// if needed.
    pub(super) async fn call(&self, address: &str, request: PeerRequest, timeout: Duration) -> Reply {
        let deadline = Instant::now() + timeout;
        let timed_out = || TransportError::Timeout { address: address.to_string(), timeout_ms: millis(timeout) };
        let peer = self.peer(address);
        let connection = match tokio::time::timeout_at(deadline, self.connection(&peer)).await {
            Ok(connection) => connection?,
            Err(_) => return Err(timed_out()),
        };
        connection.call(request, deadline).await.map_err(|e| e.unwrap_or_else(timed_out))
    }

    fn peer(&self, address: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().expect("peer map lock poisoned");
        peers.entry(address.to_string()).or_insert_with(|| Arc::new(Peer::new(address))).clone()
    }

    /// The peer's usable connection, after waiting for a connection attempt if needed.
    async fn connection(&self, peer: &Arc<Peer>) -> Result<Arc<Connection>, TransportError> {
        let attempt = {
            let mut state = peer.state();
            match &state.link {
                Link::Connected(connection) if !connection.is_closed() => return Ok(connection.clone()),
                // `peek` is set only if the attempt's task died without settling (runtime shutdown).
                Link::Connecting(attempt) if attempt.peek().is_none() => attempt.clone(),
                Link::BackingOff { until, error } if Instant::now() < *until => {
                    return Err(backing_off(&peer.address, error, *until - Instant::now()));
                }
                _ => {
                    let attempt = self.start_attempt(peer.clone());
                    state.link = Link::Connecting(attempt.clone());
                    attempt
                }
            }
        };
        attempt.await
    }

    /// Starts connecting on a task of its own, so that no caller's timeout can cut the attempt
    /// short: it ends within the connect timeout and settles the peer's state.
    fn start_attempt(&self, peer: Arc<Peer>) -> Attempt {
        let settings = self.settings.clone();
        let closed = self.closed.child_token();
        let address = peer.address.clone();
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                biased;
                _ = closed.cancelled() => Err(TransportError::Closed),
                result = connect(&peer.address, &settings, closed.clone()) => result,
            };
            peer.settle(&result, &settings);
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(TransportError::Unreachable { address, reason: format!("connection attempt died: {e}") })
            })
        }
        .boxed()
        .shared()
    }
}

/// What a call gets while the peer's address backs off: the last failure, with the wait left.
fn backing_off(address: &str, error: &TransportError, left: Duration) -> TransportError {
    match error {
        TransportError::Refused { .. } | TransportError::BadAddress { .. } | TransportError::Closed => error.clone(),
        TransportError::Unreachable { reason, .. } => TransportError::Unreachable {
            address: address.to_string(),
            reason: format!("{reason}; next connection attempt in {} ms", millis(left)),
        },
        other => TransportError::Unreachable {
            address: address.to_string(),
            reason: format!("{other}; next connection attempt in {} ms", millis(left)),
        },
    }
}

/// One peer address and the state of our link to it.
struct Peer {
    address: String,
    state: Mutex<PeerState>,
}

struct PeerState {
    link: Link,
    /// Connection attempts that failed in a row.
    failures: u32,
}

enum Link {
    Idle,
    Connecting(Attempt),
    Connected(Arc<Connection>),
    BackingOff { until: Instant, error: TransportError },
}

impl Peer {
    fn new(address: &str) -> Self {
        Peer { address: address.to_string(), state: Mutex::new(PeerState { link: Link::Idle, failures: 0 }) }
    }

    fn state(&self) -> MutexGuard<'_, PeerState> {
        // Never held across an await; poisoning would be a bug here.
        self.state.lock().expect("peer state lock poisoned")
    }

    /// Records the outcome of a connection attempt.
    fn settle(&self, result: &Result<Arc<Connection>, TransportError>, settings: &Settings) {
        let mut state = self.state();
        match result {
            Ok(connection) => {
                debug!(peer = %self.address, "connected");
                state.failures = 0;
                state.link = Link::Connected(connection.clone());
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let wait = settings.config.reconnect_backoff(state.failures);
                debug!(peer = %self.address, %error, failures = state.failures, wait_ms = millis(wait), "connection attempt failed");
                state.link = Link::BackingOff { until: Instant::now() + wait, error: error.clone() };
            }
        }
    }
}

/// Opens and authenticates a connection, within the connect timeout.
async fn connect(
    address: &str,
    settings: &Settings,
    closed: CancellationToken,
) -> Result<Arc<Connection>, TransportError> {
    let limit = settings.config.connect_timeout_ms;
    match tokio::time::timeout(settings.config.connect_timeout(), open(address, settings)).await {
        Ok(opened) => {
            let (framed, session) = opened?;
            Ok(Connection::start(address, framed, session, settings, closed))
        }
        Err(_) => Err(TransportError::Unreachable {
            address: address.to_string(),
            reason: format!("not connected and authenticated within the connect timeout of {limit} ms"),
        }),
    }
}

async fn open(
    address: &str,
    settings: &Settings,
) -> Result<(Framed<TcpStream, LengthDelimitedCodec>, auth::Session), TransportError> {
    let stream = TcpStream::connect(address).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => {
            TransportError::BadAddress { address: address.to_string(), reason: e.to_string() }
        }
        _ => TransportError::Unreachable { address: address.to_string(), reason: format!("cannot connect: {e}") },
    })?;
    // Frames are small and each one is flushed on purpose: do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let max_frame_bytes = settings.config.max_frame_bytes;
    let mut framed = Framed::new(stream, wire::codec(max_frame_bytes));
    let session = auth::client_handshake(&mut framed, &settings.key, max_frame_bytes).await.map_err(|e| match e {
        HandshakeError::BadProof | HandshakeError::Refused(_) | HandshakeError::Wire(WireError::Version(_)) => {
            TransportError::Refused { address: address.to_string(), reason: e.to_string() }
        }
        other => TransportError::Unreachable { address: address.to_string(), reason: format!("handshake: {other}") },
    })?;
    Ok((framed, session))
}

/// An authenticated connection carrying many calls at once.
pub(super) struct Connection {
    address: String,
    /// Encoded request frames, to the writer task.
    outgoing: mpsc::Sender<Bytes>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    in_flight: Semaphore,
    /// Frames received so far: a call that times out with this unchanged since it was sent
    /// found the peer silent.
    frames_received: AtomicU64,
    max_frame_bytes: usize,
    /// Cancelled when the connection closes, for whatever reason.
    closed: CancellationToken,
}

struct Pending {
    calls: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the connection closed; calls registered after that fail at once.
    closed: Option<TransportError>,
}

impl Connection {
    fn start(
        address: &str,
        framed: Framed<TcpStream, LengthDelimitedCodec>,
        session: auth::Session,
        settings: &Settings,
        closed: CancellationToken,
    ) -> Arc<Connection> {
        let capacity = settings.config.max_in_flight_per_connection;
        let (outgoing, queue) = mpsc::channel(capacity);
        let connection = Arc::new(Connection {
            address: address.to_string(),
            outgoing,
            pending: Mutex::new(Pending { calls: HashMap::new(), closed: None }),
            next_id: AtomicU64::new(1),
            in_flight: Semaphore::new(capacity),
            frames_received: AtomicU64::new(0),
            max_frame_bytes: settings.config.max_frame_bytes,
            closed,
        });
        let (sink, stream) = framed.split();
        let writer = connection.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(sink, queue, session.sealer, writer.closed.clone()).await {
                writer.close(writer.unreachable(format!("cannot write: {e}")));
            }
        });
        tokio::spawn(read_replies(connection.clone(), stream, session.opener));
        connection
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().expect("pending calls lock poisoned")
    }

    fn unreachable(&self, reason: String) -> TransportError {
        TransportError::Unreachable { address: self.address.clone(), reason }
    }

    /// One call. `Err(None)` means the deadline passed.
    async fn call(&self, request: PeerRequest, deadline: Instant) -> Result<PeerReply, Option<TransportError>> {
        let _slot = match tokio::time::timeout_at(deadline, self.in_flight.acquire()).await {
            Ok(slot) => slot.expect("the in-flight semaphore is never closed"),
            Err(_) => return Err(None),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame =
            wire::encode(&ClientMessage::Request(Frame { id, body: request }), self.max_frame_bytes).map_err(|e| {
                match e {
                    WireError::TooLarge { bytes, limit } => TransportError::TooLarge { bytes, limit },
                    other => self.unreachable(format!("cannot encode the request: {other}")),
                }
            })?;
        let (reply, answer) = oneshot::channel();
        let _registered = self.register(id, reply)?;
        let frames_before = self.frames_received.load(Ordering::Acquire);
        match tokio::time::timeout_at(deadline, self.outgoing.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Some(self.lost())),
            Err(_) => return Err(None),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(reply)) => reply.map_err(Some),
            Ok(Err(_)) => Err(Some(self.lost())),
            Err(_) => {
                if self.frames_received.load(Ordering::Acquire) == frames_before {
                    self.close(self.unreachable("the peer sent nothing for a whole call timeout".into()));
                }
                Err(None)
            }
        }
    }

    /// The error of a call on a connection that closed under it.
    fn lost(&self) -> TransportError {
        self.pending().closed.clone().unwrap_or_else(|| self.unreachable("connection closed".into()))
    }

    fn register(&self, id: u64, reply: oneshot::Sender<Reply>) -> Result<Registered<'_>, TransportError> {
        let mut pending = self.pending();
        if let Some(error) = &pending.closed {
            return Err(error.clone());
        }
        pending.calls.insert(id, reply);
        Ok(Registered { connection: self, id })
    }

    /// Hands a reply to the call waiting for it; a late reply (its call gave up) is dropped.
    fn answer(&self, id: u64, reply: Reply) {
        match self.pending().calls.remove(&id) {
            Some(waiting) => {
                let _ = waiting.send(reply);
            }
            None => debug!(peer = %self.address, id, "dropping a reply nobody waits for"),
        }
    }

    /// Closes the connection: the tasks stop, the socket closes, waiting calls fail with `error`.
    fn close(&self, error: TransportError) {
        let calls = {
            let mut pending = self.pending();
            if pending.closed.is_some() {
                return;
            }
            debug!(peer = %self.address, %error, "connection closed");
            pending.closed = Some(error.clone());
            std::mem::take(&mut pending.calls)
        };
        self.closed.cancel();
        for (_, waiting) in calls {
            let _ = waiting.send(Err(error.clone()));
        }
    }
}

/// A call's entry in the pending map, removed when the call ends however it ends.
struct Registered<'a> {
    connection: &'a Connection,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.connection.pending().calls.remove(&self.id);
    }
}

async fn read_replies(
    connection: Arc<Connection>,
    mut frames: SplitStream<Framed<TcpStream, LengthDelimitedCodec>>,
    mut opener: auth::Opener,
) {
    let peer = connection.address.clone();
    let error = loop {
        let frame = tokio::select! {
            biased;
            _ = connection.closed.cancelled() => break TransportError::Closed,
            frame = frames.next() => frame,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let reason = wire::read_error(&e, connection.max_frame_bytes);
                warn!(%peer, %reason, "closing connection: unreadable frame");
                break connection.unreachable(format!("unreadable frame: {reason}"));
            }
            None => break connection.unreachable("the peer closed the connection".into()),
        };
        let frame = match opener.open(&frame) {
            Ok(frame) => frame,
            Err(e) => {
                warn!(%peer, reason = %e, "closing connection: forged frame");
                break connection.unreachable(format!("forged frame: {e}"));
            }
        };
        connection.frames_received.fetch_add(1, Ordering::Release);
        match wire::decode::<ServerMessage>(frame) {
            Ok(ServerMessage::Reply(Frame { id, body })) => connection.answer(id, Ok(body)),
            Ok(ServerMessage::Failed { id, failure }) => connection.answer(id, Err(failure_error(&peer, failure))),
            Ok(_) => {
                warn!(%peer, reason = "handshake message after the handshake", "closing connection: protocol violation");
                break connection.unreachable("protocol violation by the peer".into());
            }
            Err(e) => {
                warn!(%peer, reason = %e, "closing connection: malformed frame");
                break connection.unreachable(format!("malformed frame: {e}"));
            }
        }
    };
    // If the token was cancelled by `close`, this does nothing; if by the transport's shutdown,
    // the waiting calls learn that.
    connection.close(error);
}

fn failure_error(address: &str, failure: Failure) -> TransportError {
    match failure {
        Failure::TooLarge { bytes, limit } => TransportError::TooLarge {
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        },
        Failure::Internal { reason } => {
            TransportError::Unreachable { address: address.to_string(), reason: format!("the peer failed: {reason}") }
        }
    }
}
