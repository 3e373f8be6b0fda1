//! The serving side: an accept loop per listener, and per connection a handshake, a reader that
//! starts each request on its own task, and a writer.
//!
//! Limits: `max_connections_per_listener` connections (more are closed on accept), the connect
//! timeout for the handshake (a silent client loses its slot), `max_concurrent_requests_per_connection`
//! requests running per connection (past it the reader stops reading, and TCP pushes back on the
//! peer), and a reply queue of the same size.
//!
//! A malformed frame, an oversized one, or a message out of turn closes that connection only,
//! with a warning naming the peer and the reason. Requests already running finish; their
//! replies are dropped.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::SplitStream;
use futures::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth;
use super::wire::{self, ClientMessage, Failure, Frame, ServerMessage, WireError};
use super::{write_frames, Settings};
use crate::api::PeerRequest;
use crate::transport::{Listener, RequestHandler, TransportError};

/// Pause after a failed `accept` (out of file descriptors, mostly), so the loop waits for
/// connections to close instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bound socket, shared by the accept loop and the [`Listener`]'s close, which drops it at
/// once: when `close` returns, the port is free to bind again.
type Socket = Arc<Mutex<Option<TcpListener>>>;

/// What every connection of one listener shares.
struct Service {
    settings: Arc<Settings>,
    handler: Arc<dyn RequestHandler>,
}

/// Binds `address` and serves `handler` there until the listener closes or `parent` is cancelled.
pub(super) async fn listen(
    settings: Arc<Settings>,
    address: &str,
    handler: Arc<dyn RequestHandler>,
    parent: &CancellationToken,
) -> Result<Listener, TransportError> {
    let bad = |reason: String| TransportError::BadAddress { address: address.to_string(), reason };
    if address.is_empty() {
        return Err(bad("a TCP address must be host:port".into()));
    }
    let socket = TcpListener::bind(address).await.map_err(|e| bad(format!("cannot bind: {e}")))?;
    let local = socket.local_addr().map_err(|e| bad(format!("no local address: {e}")))?.to_string();
    info!(address = %local, "listening");
    let socket: Socket = Arc::new(Mutex::new(Some(socket)));
    let stop = parent.child_token();
    let connections = Arc::new(Semaphore::new(settings.config.max_connections_per_listener));
    tokio::spawn(accept_loop(socket.clone(), Arc::new(Service { settings, handler }), connections, stop.clone()));
    let closed_address = local.clone();
    Ok(Listener::new(local, move || {
        drop(take(&socket));
        stop.cancel();
        debug!(address = %closed_address, "listener closed");
    }))
}

fn take(socket: &Socket) -> Option<TcpListener> {
    // Poisoning cannot leave the option in a bad state; take it anyway.
    socket.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn poll_accept(socket: &Socket, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<(TcpStream, SocketAddr)>>> {
    match socket.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(listener) => listener.poll_accept(cx).map(Some),
        None => Poll::Ready(None),
    }
}

async fn accept_loop(socket: Socket, service: Arc<Service>, connections: Arc<Semaphore>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = poll_fn(|cx| poll_accept(&socket, cx)) => accepted,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => match connections.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(serve(stream, peer, service.clone(), stop.child_token(), slot));
                }
                Err(_) => {
                    let limit = service.settings.config.max_connections_per_listener;
                    warn!(%peer, reason = %format!("the listener serves its maximum of {limit} connections"), "closing connection");
                }
            },
            Some(Err(e)) => {
                warn!(reason = %e, "accept failed; pausing");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    drop(take(&socket));
}

/// One connection: handshake, then requests until either side closes.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let config = &service.settings.config;
    let mut framed = Framed::new(stream, wire::codec(config.max_frame_bytes));
    let handshake = auth::server_handshake(&mut framed, &service.settings.key, config.max_frame_bytes);
    let outcome = tokio::select! {
        biased;
        _ = stop.cancelled() => return,
        outcome = tokio::time::timeout(config.connect_timeout(), handshake) => outcome,
    };
    let session = match outcome {
        Ok(Ok(session)) => {
            debug!(%peer, "peer authenticated");
            session
        }
        Ok(Err(e)) => {
            warn!(%peer, reason = %e, "closing connection: handshake failed");
            return;
        }
        Err(_) => {
            let reason = format!("no handshake within the connect timeout of {} ms", config.connect_timeout_ms);
            warn!(%peer, %reason, "closing connection: handshake failed");
            return;
        }
    };
    let (sink, frames) = framed.split();
    let (replies, queue) = mpsc::channel(config.max_concurrent_requests_per_connection);
    let writer_stop = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = write_frames(sink, queue, session.sealer, writer_stop.clone()).await {
            warn!(%peer, reason = %e, "closing connection: cannot write");
        }
        writer_stop.cancel();
    });
    read_requests(frames, session.opener, peer, &service, replies, &stop).await;
    stop.cancel();
}

async fn read_requests(
    mut frames: SplitStream<Framed<TcpStream, LengthDelimitedCodec>>,
    mut opener: auth::Opener,
    peer: SocketAddr,
    service: &Arc<Service>,
    replies: mpsc::Sender<Bytes>,
    stop: &CancellationToken,
) {
    let running = Arc::new(Semaphore::new(service.settings.config.max_concurrent_requests_per_connection));
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            frame = frames.next() => frame,
        };
        let mut opened = |bytes: &[u8]| opener.open(bytes).and_then(wire::decode::<ClientMessage>);
        let request = match frame.map(|frame| frame.map(|bytes| opened(&bytes))) {
            None => return debug!(%peer, "the peer closed the connection"),
            Some(Err(e)) => {
                let reason = wire::read_error(&e, service.settings.config.max_frame_bytes);
                return warn!(%peer, %reason, "closing connection: unreadable frame");
            }
            Some(Ok(Err(e))) => return warn!(%peer, reason = %e, "closing connection: malformed frame"),
            Some(Ok(Ok(ClientMessage::Request(request)))) => request,
            Some(Ok(Ok(_))) => {
                return warn!(%peer, reason = "handshake message after the handshake", "closing connection: protocol violation");
            }
        };
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            slot = running.clone().acquire_owned() => slot.expect("the request semaphore is never closed"),
        };
        tokio::spawn(run(service.clone(), request, replies.clone(), slot, peer));
    }
}

/// Runs one request and queues its reply (or why there is none).
async fn run(
    service: Arc<Service>,
    request: Frame<PeerRequest>,
    replies: mpsc::Sender<Bytes>,
    _slot: OwnedSemaphorePermit,
    peer: SocketAddr,
) {
    let Frame { id, body } = request;
    let limit = service.settings.config.max_frame_bytes;
    let message = match AssertUnwindSafe(service.handler.handle(body)).catch_unwind().await {
        Ok(reply) => ServerMessage::Reply(Frame { id, body: reply }),
        Err(_) => {
            warn!(%peer, id, "the request handler panicked");
            ServerMessage::Failed { id, failure: Failure::Internal { reason: "the request handler panicked".into() } }
        }
    };
    let frame = match wire::encode(&message, limit) {
        Ok(frame) => frame,
        Err(e) => {
            warn!(%peer, id, reason = %e, "cannot send a reply");
            let failure = match e {
                WireError::TooLarge { bytes, limit } => Failure::TooLarge { bytes: bytes as u64, limit: limit as u64 },
                other => Failure::Internal { reason: format!("cannot encode the reply: {other}") },
            };
            wire::encode(&ServerMessage::Failed { id, failure }, limit)
                .expect("a failure notice fits in the smallest frame")
        }
    };
    // Fails only if the connection closed meanwhile; the reply has nowhere to go then.
    let _ = replies.send(frame).await;
}
