//! The built-in transports: real TCP on loopback (round trips, multiplexing, authentication,
//! hostile peers, timeouts, reconnects) and the in-process network (round trips, partitions,
//! timeouts).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use task_center::api::{ApiError, ClientRequest, ListFilter, PeerReply, PeerRequest};
use task_center::model::{CopyOptions, CopyVolumeSpec, NodeId, TaskId, TaskSpec, VolumeId};
use task_center::transport::{
    InProcessNetwork, Listener, RequestHandler, TcpConfig, TcpTransport, Transport, TransportError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use common::{init_tracing, step};

const SECRET: &[u8] = b"a cluster secret of 32 bytes...!";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers every request recognisably and counts the requests it was handed.
struct Echo {
    node: NodeId,
    calls: AtomicUsize,
}

impl Echo {
    fn new(node: &str) -> Arc<Echo> {
        Arc::new(Echo { node: NodeId::new(node).unwrap(), calls: AtomicUsize::new(0) })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl RequestHandler for Echo {
    async fn handle(&self, request: PeerRequest) -> PeerReply {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match request {
            PeerRequest::Ping => PeerReply::Pong { node: self.node.clone() },
            PeerRequest::Client(ClientRequest::Show { id }) => PeerReply::Client(Err(ApiError::NotFound { id })),
            // A reply far larger than a small frame limit.
            PeerRequest::Client(ClientRequest::Pause { .. }) => {
                PeerReply::Client(Err(ApiError::Internal("x".repeat(64 * 1024))))
            }
            PeerRequest::Client(ClientRequest::List(filter)) => {
                PeerReply::Client(Err(ApiError::Unavailable(format!("list of {}", filter.limit))))
            }
            PeerRequest::Client(other) => PeerReply::Client(Err(ApiError::Internal(format!("{other:?}")))),
            PeerRequest::Forwarded(other) => {
                PeerReply::Client(Err(ApiError::NotLeader { leader: Some(format!("{other:?}")) }))
            }
            PeerRequest::Assign { id } => PeerReply::Assign(Err(ApiError::Refused(id.to_string()))),
            PeerRequest::ControlChanged { .. } => PeerReply::Ack,
        }
    }
}

/// Sleeps `delay` before answering, then records that it finished.
struct Slow {
    delay: Duration,
    finished: AtomicUsize,
    done: Notify,
}

#[async_trait]
impl RequestHandler for Slow {
    async fn handle(&self, _request: PeerRequest) -> PeerReply {
        tokio::time::sleep(self.delay).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.done.notify_one();
        PeerReply::Ack
    }
}

fn slow(delay: Duration) -> Arc<Slow> {
    Arc::new(Slow { delay, finished: AtomicUsize::new(0), done: Notify::new() })
}

fn tcp(config: TcpConfig) -> TcpTransport {
    TcpTransport::new(config).expect("valid config")
}

fn tcp_default() -> TcpTransport {
    tcp(TcpConfig::new(SECRET))
}

async fn serve(transport: &TcpTransport, handler: Arc<dyn RequestHandler>) -> Listener {
    transport.listen("127.0.0.1:0", handler).await.expect("listen on loopback")
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn copy_spec(hosts: usize) -> TaskSpec {
    TaskSpec::CopyVolume(CopyVolumeSpec {
        source_volume: VolumeId::new("vol-a").unwrap(),
        target_volume: VolumeId::new("vol-b").unwrap(),
        source_hosts: (0..hosts).map(|i| format!("198.51.100.{}:10201", i % 250)).collect(),
        target_hosts: vec!["203.0.113.1:10201".into()],
        base_snapshot: None,
        options: CopyOptions::default(),
    })
}

/// One request of each kind, with the reply [`Echo`] gives to it.
fn each_request() -> Vec<(PeerRequest, PeerReply)> {
    let id = TaskId::generate();
    vec![
        (PeerRequest::Ping, PeerReply::Pong { node: node("server-1") }),
        (PeerRequest::Client(ClientRequest::Show { id }), PeerReply::Client(Err(ApiError::NotFound { id }))),
        (
            PeerRequest::Client(ClientRequest::List(ListFilter { limit: 17, ..ListFilter::default() })),
            PeerReply::Client(Err(ApiError::Unavailable("list of 17".into()))),
        ),
        (
            PeerRequest::Client(ClientRequest::Create { id, spec: copy_spec(2), run_window: None }),
            PeerReply::Client(Err(ApiError::Internal(format!(
                "{:?}",
                ClientRequest::Create { id, spec: copy_spec(2), run_window: None }
            )))),
        ),
        (
            PeerRequest::Forwarded(ClientRequest::Cancel { id }),
            PeerReply::Client(Err(ApiError::NotLeader { leader: Some(format!("{:?}", ClientRequest::Cancel { id })) })),
        ),
        (PeerRequest::Assign { id }, PeerReply::Assign(Err(ApiError::Refused(id.to_string())))),
        (PeerRequest::ControlChanged { id }, PeerReply::Ack),
    ]
}

// ---------------------------------------------------------------------------------------------
// TCP: the ordinary path

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trip_for_each_request_kind() {
    init_tracing();
    let server = tcp_default();
    let echo = Echo::new("server-1");
    let listener = serve(&server, echo.clone()).await;
    let client = tcp_default();
    for (request, expected) in each_request() {
        let reply = step("call", client.call(listener.address(), request.clone(), CALL_TIMEOUT)).await;
        assert_eq!(reply, Ok(expected), "reply to {request:?}");
    }
    assert_eq!(echo.calls(), each_request().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_concurrent_calls_each_get_their_own_reply_over_one_connection() {
    init_tracing();
    let server = tcp_default();
    let echo = Echo::new("server-1");
    let listener = serve(&server, echo.clone()).await;
    let relay = CountingRelay::start(listener.address()).await;
    let client = tcp_default();
    const TASKS: usize = 8;
    const CALLS_PER_TASK: usize = 63;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let client = client.clone();
        let address = relay.address.clone();
        tasks.push(tokio::spawn(async move {
            let calls = (0..CALLS_PER_TASK).map(|_| {
                let client = client.clone();
                let address = address.clone();
                async move {
                    let id = TaskId::generate();
                    let request = PeerRequest::Client(ClientRequest::Show { id });
                    (id, client.call(&address, request, CALL_TIMEOUT).await)
                }
            });
            futures::future::join_all(calls).await
        }));
    }
    let mut answered = 0;
    for task in tasks {
        for (id, reply) in step("concurrent calls", task).await.expect("caller task") {
            assert_eq!(reply, Ok(PeerReply::Client(Err(ApiError::NotFound { id }))));
            answered += 1;
        }
    }
    assert_eq!(answered, TASKS * CALLS_PER_TASK);
    assert_eq!(echo.calls(), TASKS * CALLS_PER_TASK);
    assert_eq!(relay.connections(), 1, "all calls share one connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_messages_over_the_frame_limit_fail_with_too_large_and_the_connection_survives() {
    init_tracing();
    let config = TcpConfig { max_frame_bytes: TcpConfig::MIN_MAX_FRAME_BYTES, ..TcpConfig::new(SECRET) };
    let server = tcp(config.clone());
    let echo = Echo::new("server-1");
    let listener = serve(&server, echo.clone()).await;
    let client = tcp(config);
    let address = listener.address();

    let big_request =
        PeerRequest::Client(ClientRequest::Create { id: TaskId::generate(), spec: copy_spec(1000), run_window: None });
    let refused = step("big request", client.call(address, big_request, CALL_TIMEOUT)).await;
    assert!(matches!(refused, Err(TransportError::TooLarge { limit: 4096, .. })), "{refused:?}");
    assert_eq!(echo.calls(), 0, "a request that does not fit is never sent");

    let big_reply = PeerRequest::Client(ClientRequest::Pause { id: TaskId::generate() });
    let refused = step("big reply", client.call(address, big_reply, CALL_TIMEOUT)).await;
    assert!(matches!(refused, Err(TransportError::TooLarge { limit: 4096, .. })), "{refused:?}");

    let reply = step("after", client.call(address, PeerRequest::Ping, CALL_TIMEOUT)).await;
    assert_eq!(reply, Ok(PeerReply::Pong { node: node("server-1") }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_config_errors_name_the_field() {
    let error = TcpTransport::new(TcpConfig::new(&b"too short"[..])).unwrap_err();
    assert_eq!(error.field, "secret");
    let error = TcpTransport::new(TcpConfig { reconnect_backoff_max_ms: 1, ..TcpConfig::new(SECRET) }).unwrap_err();
    assert_eq!(error.field, "reconnect_backoff_max_ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bad_listen_addresses_and_shutdown() {
    init_tracing();
    let transport = tcp_default();
    for address in ["", "not an address", "127.0.0.1:99999"] {
        let result = transport.listen(address, Echo::new("n")).await;
        assert!(matches!(result, Err(TransportError::BadAddress { .. })), "{address:?}: {result:?}");
    }
    let taken = serve(&transport, Echo::new("n")).await;
    let again = transport.listen(taken.address(), Echo::new("n")).await;
    assert!(matches!(again, Err(TransportError::BadAddress { .. })), "{again:?}");

    assert!(step("call", transport.call(taken.address(), PeerRequest::Ping, CALL_TIMEOUT)).await.is_ok());
    transport.shutdown();
    let after = step("call after shutdown", transport.call(taken.address(), PeerRequest::Ping, CALL_TIMEOUT)).await;
    assert_eq!(after, Err(TransportError::Closed));
    assert!(matches!(transport.listen("127.0.0.1:0", Echo::new("n")).await, Err(TransportError::Closed)));
    // The shut-down transport's listener is closed too.
    let other = tcp_default();
    let result = step("call the closed listener", other.call(taken.address(), PeerRequest::Ping, CALL_TIMEOUT)).await;
    assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// TCP: authentication and hostile peers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_client_with_the_wrong_secret_is_refused_and_never_reaches_the_handler() {
    init_tracing();
    let server = tcp_default();
    let echo = Echo::new("server-1");
    let listener = serve(&server, echo.clone()).await;
    let intruder = tcp(TcpConfig::new(&b"another secret of 32 bytes.....!"[..]));
    for request in [PeerRequest::Ping, PeerRequest::Assign { id: TaskId::generate() }] {
        // The second call falls in the reconnect backoff and gets the same answer.
        let result = step("intruder call", intruder.call(listener.address(), request, CALL_TIMEOUT)).await;
        assert!(matches!(result, Err(TransportError::Refused { .. })), "{result:?}");
    }

    // A raw client that sends a wrong proof is told why, then disconnected.
    let mut raw = RawClient::connect(listener.address()).await;
    let key = blake3::derive_key("task-center transport v1", b"another secret of 32 bytes.....!");
    let answer = step("raw handshake", raw.handshake(&key)).await;
    assert!(matches!(&answer, wire::ServerMessage::Refused { reason } if reason.contains("secret")), "{answer:?}");
    step("disconnected", raw.expect_disconnected()).await;

    // A request before the handshake is not served either.
    let mut raw = RawClient::connect(listener.address()).await;
    raw.send(&wire::ClientMessage::Request(wire::Frame { id: 1, body: PeerRequest::Ping })).await;
    step("disconnected", raw.expect_disconnected()).await;

    assert_eq!(echo.calls(), 0, "no request of an unauthenticated peer reaches the handler");
    let friend = tcp_default();
    assert!(step("friend call", friend.call(listener.address(), PeerRequest::Ping, CALL_TIMEOUT)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_raw_client_speaking_the_documented_protocol_is_served() {
    init_tracing();
    let server = tcp_default();
    let listener = serve(&server, Echo::new("server-1")).await;
    let mut raw = RawClient::connect(listener.address()).await;
    let key = blake3::derive_key("task-center transport v1", SECRET);
    assert_eq!(step("handshake", raw.handshake(&key)).await, wire::ServerMessage::Welcome);
    let id = TaskId::generate();
    raw.send(&wire::ClientMessage::Request(wire::Frame { id: 41, body: PeerRequest::Ping })).await;
    raw.send(&wire::ClientMessage::Request(wire::Frame {
        id: 42,
        body: PeerRequest::Client(ClientRequest::Show { id }),
    }))
    .await;
    let mut replies = vec![step("reply", raw.receive()).await, step("reply", raw.receive()).await];
    replies.sort_by_key(|reply| match reply {
        wire::ServerMessage::Reply(frame) => frame.id,
        _ => 0,
    });
    assert_eq!(
        replies,
        [
            wire::ServerMessage::Reply(wire::Frame { id: 41, body: PeerReply::Pong { node: node("server-1") } }),
            wire::ServerMessage::Reply(wire::Frame { id: 42, body: PeerReply::Client(Err(ApiError::NotFound { id })) }),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_garbage_and_oversized_frames_close_only_their_connection() {
    init_tracing();
    let server = tcp_default();
    let echo = Echo::new("server-1");
    let listener = serve(&server, echo.clone()).await;
    let address = listener.address().to_string();
    let client = tcp_default();
    assert!(step("before", client.call(&address, PeerRequest::Ping, CALL_TIMEOUT)).await.is_ok());
    let key = blake3::derive_key("task-center transport v1", SECRET);

    // Calls keep flowing on the good connection while the hostile ones are dealt with.
    let good = {
        let client = client.clone();
        let address = address.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let id = TaskId::generate();
                let reply = client.call(&address, PeerRequest::Client(ClientRequest::Show { id }), CALL_TIMEOUT).await;
                assert_eq!(reply, Ok(PeerReply::Client(Err(ApiError::NotFound { id }))));
            }
        })
    };

    let hostile = async {
        // Not a frame at all: "GET " read as a length is far over the limit.
        let mut raw = RawClient::connect(&address).await;
        raw.write_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        raw.expect_disconnected().await;

        // A frame with an unknown version instead of the hello: refused, then closed. (Version 1,
        // which had no frame tags, is one of them.)
        let mut raw = RawClient::connect(&address).await;
        raw.write_frame(Bytes::from_static(&[1, 0, 1, 2, 3])).await;
        let answer = raw.receive().await;
        assert!(matches!(&answer, wire::ServerMessage::Refused { reason } if reason.contains("version")), "{answer:?}");
        raw.expect_disconnected().await;

        // After a good handshake: a frame with a good tag that does not decode.
        let mut raw = RawClient::connect(&address).await;
        assert_eq!(raw.handshake(&key).await, wire::ServerMessage::Welcome);
        raw.send_sealed(&[VERSION, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).await;
        raw.expect_disconnected().await;

        // After a good handshake: a good request without its tag (what an injector without the
        // secret can send), then one with a tag altered on the way.
        for alter in [false, true] {
            let mut raw = RawClient::connect(&address).await;
            assert_eq!(raw.handshake(&key).await, wire::ServerMessage::Welcome);
            let ping = postcard::to_extend(&wire::ClientMessage::Request(ping(1)), vec![VERSION]).unwrap();
            let frame = if alter {
                let mut sealed = raw.seal(&ping).to_vec();
                *sealed.last_mut().unwrap() ^= 1;
                Bytes::from(sealed)
            } else {
                Bytes::from(ping)
            };
            raw.write_frame(frame).await;
            raw.expect_disconnected().await;
        }

        // After a good handshake: a good request, answered, then the same frame replayed.
        let mut raw = RawClient::connect(&address).await;
        assert_eq!(raw.handshake(&key).await, wire::ServerMessage::Welcome);
        let ping = postcard::to_extend(&wire::ClientMessage::Request(ping(2)), vec![VERSION]).unwrap();
        let sealed = raw.seal(&ping);
        raw.write_frame(sealed.clone()).await;
        assert!(matches!(raw.receive().await, wire::ServerMessage::Reply(wire::Frame { id: 2, .. })));
        raw.write_frame(sealed).await;
        raw.expect_disconnected().await;

        // After a good handshake: a frame declaring 4 GiB.
        let mut raw = RawClient::connect(&address).await;
        assert_eq!(raw.handshake(&key).await, wire::ServerMessage::Welcome);
        raw.write_raw(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3]).await;
        raw.expect_disconnected().await;

        // After a good handshake: a second hello.
        let mut raw = RawClient::connect(&address).await;
        assert_eq!(raw.handshake(&key).await, wire::ServerMessage::Welcome);
        raw.send(&wire::ClientMessage::Hello { version: VERSION, client_nonce: [0; 32] }).await;
        raw.expect_disconnected().await;
    };
    step("hostile clients", hostile).await;
    step("good calls", good).await.expect("good caller");
    assert!(step("after", client.call(&address, PeerRequest::Ping, CALL_TIMEOUT)).await.is_ok());
    // 200 good calls, the one before and the one after, and the replayed ping's first run: no
    // forged or replayed frame reached the handler.
    assert_eq!(echo.calls(), 203);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_silent_client_loses_its_connection_after_the_handshake_deadline() {
    init_tracing();
    let server = tcp(TcpConfig { connect_timeout_ms: 200, ..TcpConfig::new(SECRET) });
    let listener = serve(&server, Echo::new("server-1")).await;
    let mut raw = RawClient::connect(listener.address()).await;
    let started = Instant::now();
    step("disconnected", raw.expect_disconnected()).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(3), "{waited:?}");
}

// ---------------------------------------------------------------------------------------------
// TCP: timeouts and reconnects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_server_that_never_answers_makes_calls_time_out() {
    init_tracing();
    // Accepts and holds connections, never writes a byte.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = mute.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = mute.accept().await {
            held.push(stream);
        }
    });
    let client = tcp_default();
    let timeout = Duration::from_millis(300);
    for _ in 0..2 {
        let started = Instant::now();
        let result = step("call", client.call(&address, PeerRequest::Ping, timeout)).await;
        let waited = started.elapsed();
        assert_eq!(result, Err(TransportError::Timeout { address: address.clone(), timeout_ms: 300 }));
        assert!(waited >= timeout && waited < timeout + Duration::from_secs(1), "{waited:?}");
    }
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_slow_handler_makes_the_call_time_out_but_runs_to_the_end() {
    init_tracing();
    let server = tcp_default();
    let handler = slow(Duration::from_millis(600));
    let listener = serve(&server, handler.clone()).await;
    let client = tcp_default();
    let finished = handler.done.notified();
    let result = step("call", client.call(listener.address(), PeerRequest::Ping, Duration::from_millis(100))).await;
    assert!(matches!(result, Err(TransportError::Timeout { timeout_ms: 100, .. })), "{result:?}");
    step("the handler finishes", finished).await;
    assert_eq!(handler.finished.load(Ordering::SeqCst), 1);
    // The next call is served, on a new connection if the silent one was dropped.
    let result = step("next call", client.call(listener.address(), PeerRequest::Ping, CALL_TIMEOUT)).await;
    assert_eq!(result, Ok(PeerReply::Ack));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reconnects_after_the_listener_returns_with_backoff_between_attempts() {
    init_tracing();
    let config = TcpConfig { reconnect_backoff_min_ms: 20, reconnect_backoff_max_ms: 80, ..TcpConfig::new(SECRET) };
    let server = tcp(config.clone());
    let client = tcp(config);
    let listener = serve(&server, Echo::new("server-1")).await;
    let address = listener.address().to_string();
    assert!(step("first call", client.call(&address, PeerRequest::Ping, CALL_TIMEOUT)).await.is_ok());

    listener.close();
    let result = step("call after close", client.call(&address, PeerRequest::Ping, CALL_TIMEOUT)).await;
    assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");

    // Something listens on the port again but hangs up at once: every connection attempt fails.
    // Hammer it with calls; the backoff keeps the attempts few.
    let (hang_up, attempts) = HangUp::start(&address).await;
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(400) {
        let result = step("hammering call", client.call(&address, PeerRequest::Ping, CALL_TIMEOUT)).await;
        assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
        calls += 1;
        tokio::task::yield_now().await;
    }
    let attempts = attempts.load(Ordering::SeqCst);
    // Waits of 20, 40, 80, 80, ... ms: about 7 attempts in 400 ms, whatever the number of calls.
    assert!((2..=12).contains(&attempts), "{attempts} connection attempts for {calls} calls");
    assert!(calls > 10 * attempts, "calls during the backoff fail at once ({calls} calls, {attempts} attempts)");
    hang_up.abort();
    let _ = hang_up.await;

    let listener = step("listen again", server.listen(&address, Echo::new("server-2"))).await.expect("same port");
    let served = async {
        loop {
            match client.call(&address, PeerRequest::Ping, CALL_TIMEOUT).await {
                Ok(reply) => return reply,
                Err(TransportError::Unreachable { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(other) => panic!("{other:?}"),
            }
        }
    };
    let started = Instant::now();
    assert_eq!(step("reconnect", served).await, PeerReply::Pong { node: node("server-2") });
    assert!(started.elapsed() < Duration::from_secs(1), "reconnected within the longest backoff");
    drop(listener);
}

// ---------------------------------------------------------------------------------------------
// In-process network

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_round_trip_and_unknown_addresses() {
    let network = InProcessNetwork::new();
    let echo = Echo::new("server-1");
    let listener = network.listen("server-1", echo.clone()).await.unwrap();
    assert_eq!(listener.address(), "server-1");
    for (request, expected) in each_request() {
        assert_eq!(network.call("server-1", request, CALL_TIMEOUT).await, Ok(expected));
    }
    assert_eq!(echo.calls(), each_request().len());

    let missing = network.call("nobody", PeerRequest::Ping, CALL_TIMEOUT).await;
    assert!(matches!(missing, Err(TransportError::Unreachable { address, .. }) if address == "nobody"));
    for taken in ["", "server-1"] {
        let result = network.listen(taken, Echo::new("x")).await;
        assert!(matches!(result, Err(TransportError::BadAddress { .. })), "{taken:?}: {result:?}");
    }

    listener.close();
    let closed = network.call("server-1", PeerRequest::Ping, CALL_TIMEOUT).await;
    assert!(matches!(closed, Err(TransportError::Unreachable { .. })), "{closed:?}");
    let _again = network.listen("server-1", echo.clone()).await.expect("the address is free again");
    assert!(network.call("server-1", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_refusal_cuts_one_direction_until_healed() {
    let network = InProcessNetwork::new();
    let _dispatcher = network.listen("dispatcher", Echo::new("dispatcher")).await.unwrap();
    let _runner = network.listen("runner", Echo::new("runner")).await.unwrap();
    let from_dispatcher = network.endpoint("dispatcher");
    let from_runner = network.endpoint("runner");
    assert_eq!(from_dispatcher.local_address(), Some("dispatcher"));
    assert!(from_dispatcher.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());

    network.refuse("dispatcher", "runner");
    let cut = from_dispatcher.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await;
    assert!(matches!(cut, Err(TransportError::Unreachable { .. })), "{cut:?}");
    // The other direction, and callers without an address, still get through.
    assert_eq!(
        from_runner.call("dispatcher", PeerRequest::Ping, CALL_TIMEOUT).await,
        Ok(PeerReply::Pong { node: node("dispatcher") })
    );
    assert!(network.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());

    network.heal("dispatcher", "runner");
    assert!(from_dispatcher.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());

    network.isolate("runner");
    for result in [
        from_dispatcher.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await,
        from_runner.call("dispatcher", PeerRequest::Ping, CALL_TIMEOUT).await,
        network.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await,
    ] {
        assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
    }
    network.refuse("runner", "dispatcher");
    network.heal_all();
    assert!(from_dispatcher.call("runner", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());
    assert!(from_runner.call("dispatcher", PeerRequest::Ping, CALL_TIMEOUT).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_a_slow_handler_times_out_the_call_but_runs_to_the_end() {
    let network = InProcessNetwork::new();
    let handler = slow(Duration::from_millis(300));
    let _listener = network.listen("slow", handler.clone()).await.unwrap();
    let finished = handler.done.notified();
    let started = Instant::now();
    let result = network.call("slow", PeerRequest::Ping, Duration::from_millis(50)).await;
    assert_eq!(result, Err(TransportError::Timeout { address: "slow".into(), timeout_ms: 50 }));
    assert!(started.elapsed() < Duration::from_millis(300), "the caller stopped waiting at its timeout");
    step("the handler finishes", finished).await;
    assert_eq!(handler.finished.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The wire messages as documented in `transport::tcp`, mirrored here so that the tests pin the
/// format: a change of it that would break older peers breaks these tests.
mod wire {
    use serde::{Deserialize, Serialize};
    use task_center::api::{PeerReply, PeerRequest};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub struct Frame<T> {
        pub id: u64,
        pub body: T,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub enum ClientMessage {
        Hello { version: u8, client_nonce: [u8; 32] },
        Proof { proof: [u8; 32] },
        Request(Frame<PeerRequest>),
    }

    #[allow(clippy::large_enum_variant)]
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub enum ServerMessage {
        Challenge { server_nonce: [u8; 32], server_proof: [u8; 32] },
        Welcome,
        Refused { reason: String },
        Reply(Frame<PeerReply>),
        Failed { id: u64, failure: Failure },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub enum Failure {
        TooLarge { bytes: u64, limit: u64 },
        Internal { reason: String },
    }
}

/// The protocol version this client speaks: the first byte of every frame.
const VERSION: u8 = 3;

/// A request frame for `Ping`.
fn ping(id: u64) -> wire::Frame<PeerRequest> {
    wire::Frame { id, body: PeerRequest::Ping }
}

/// A hand-driven client of the TCP protocol, written from its documentation (module docs of
/// `transport::tcp` and `auth`), not from its code.
struct RawClient {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    /// After `Welcome`: the frame keys and counts.
    session: Option<RawSession>,
}

struct RawSession {
    send_key: [u8; 32],
    sent: u64,
    receive_key: [u8; 32],
    received: u64,
}

/// `BLAKE3-keyed(key, n as 8 bytes little-endian || frame)`.
fn frame_tag(key: &[u8; 32], n: u64, frame: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new_keyed(key).update(&n.to_le_bytes()).update(frame).finalize().as_bytes()
}

impl RawClient {
    async fn connect(address: &str) -> RawClient {
        let stream = TcpStream::connect(address).await.expect("connect");
        RawClient { framed: Framed::new(stream, LengthDelimitedCodec::new()), session: None }
    }

    /// Sends `message`, with its tag once the handshake is done.
    async fn send(&mut self, message: &wire::ClientMessage) {
        let bytes = postcard::to_extend(message, vec![VERSION]).unwrap();
        if self.session.is_some() {
            self.send_sealed(&bytes).await;
        } else {
            self.write_frame(Bytes::from(bytes)).await;
        }
    }

    /// Sends `frame` followed by the tag it must carry.
    async fn send_sealed(&mut self, frame: &[u8]) {
        let sealed = self.seal(frame);
        self.write_frame(sealed).await;
    }

    /// `frame` followed by the tag it must carry (and counts it as sent).
    fn seal(&mut self, frame: &[u8]) -> Bytes {
        let session = self.session.as_mut().expect("sealing needs a finished handshake");
        let mut sealed = frame.to_vec();
        sealed.extend(frame_tag(&session.send_key, session.sent, frame));
        session.sent += 1;
        Bytes::from(sealed)
    }

    async fn write_frame(&mut self, frame: Bytes) {
        self.framed.send(frame).await.expect("send a frame");
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        self.framed.get_mut().write_all(bytes).await.expect("write raw bytes");
    }

    /// Receives one message; once the handshake is done, checks and strips its tag.
    async fn receive(&mut self) -> wire::ServerMessage {
        let mut frame = self.framed.next().await.expect("a frame, not the end").expect("a readable frame").to_vec();
        if let Some(session) = &mut self.session {
            let tag = frame.split_off(frame.len() - 32);
            assert_eq!(tag, frame_tag(&session.receive_key, session.received, &frame), "the server's tag");
            session.received += 1;
        }
        assert_eq!(frame[0], VERSION, "version byte");
        postcard::from_bytes(&frame[1..]).expect("a server message")
    }

    /// Runs the client's side of the handshake with `key`; returns the server's last word.
    async fn handshake(&mut self, key: &[u8; 32]) -> wire::ServerMessage {
        let client_nonce = [7u8; 32];
        self.send(&wire::ClientMessage::Hello { version: VERSION, client_nonce }).await;
        let server_nonce = match self.receive().await {
            wire::ServerMessage::Challenge { server_nonce, .. } => server_nonce,
            other => return other,
        };
        let mac = |label: &[u8], first: &[u8; 32], second: &[u8; 32]| {
            *blake3::Hasher::new_keyed(key).update(label).update(first).update(second).finalize().as_bytes()
        };
        self.send(&wire::ClientMessage::Proof { proof: mac(b"client", &server_nonce, &client_nonce) }).await;
        let answer = self.receive().await;
        if answer == wire::ServerMessage::Welcome {
            self.session = Some(RawSession {
                send_key: mac(b"client frames", &client_nonce, &server_nonce),
                sent: 0,
                receive_key: mac(b"server frames", &client_nonce, &server_nonce),
                received: 0,
            });
        }
        answer
    }

    /// Reads until the server closes the connection (end of stream or reset).
    async fn expect_disconnected(&mut self) {
        let stream = self.framed.get_mut();
        let mut buffer = [0u8; 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

/// A loopback relay to a target address that counts the connections made through it.
struct CountingRelay {
    address: String,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingRelay {
    async fn start(target: &str) -> CountingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let target = target.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        CountingRelay { address, connections, task }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that accepts connections and closes them at once, counting them.
struct HangUp;

impl HangUp {
    async fn start(address: &str) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind(address).await.expect("the closed listener's port is free");
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        (task, attempts)
    }
}
