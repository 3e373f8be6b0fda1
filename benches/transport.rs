//! The TCP transport on loopback: one call's round trip, 64 calls in flight on one connection,
//! and what the per-frame tag costs by itself (a BLAKE3 keyed hash over the frame, as the
//! sealer and the opener each compute it once per frame).
//!
//! `cargo bench --bench transport`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use task_center::api::{PeerReply, PeerRequest};
use task_center::model::NodeId;
use task_center::transport::{RequestHandler, TcpConfig, TcpTransport, Transport};

const SECRET: &[u8] = b"a cluster secret of 32 bytes....";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Answers every request with a pong.
struct Pong(NodeId);

#[async_trait]
impl RequestHandler for Pong {
    async fn handle(&self, _request: PeerRequest) -> PeerReply {
        PeerReply::Pong { node: self.0.clone() }
    }
}

fn calls(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server, client) =
        (TcpTransport::new(TcpConfig::new(SECRET)).unwrap(), TcpTransport::new(TcpConfig::new(SECRET)).unwrap());
    let (_listener, address) = runtime.block_on(async {
        let listener = server.listen("127.0.0.1:0", Arc::new(Pong(NodeId::new("bench").unwrap()))).await.unwrap();
        let address = listener.address().to_string();
        // Connect and authenticate outside the measurement.
        client.call(&address, PeerRequest::Ping, TIMEOUT).await.unwrap();
        (listener, address)
    });
    let mut group = c.benchmark_group("tcp");
    group.bench_function("ping_round_trip", |bench| {
        bench.to_async(&runtime).iter(|| async { client.call(&address, PeerRequest::Ping, TIMEOUT).await.unwrap() })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_pings_in_flight", |bench| {
        bench.to_async(&runtime).iter(|| async {
            let replies = join_all((0..64).map(|_| client.call(&address, PeerRequest::Ping, TIMEOUT))).await;
            assert!(replies.iter().all(Result::is_ok));
        })
    });
    group.finish();
}

fn frame_tag(c: &mut Criterion) {
    let key = [7u8; 32];
    let mut group = c.benchmark_group("frame_tag");
    for bytes in [64usize, 4 << 10, 1 << 20] {
        let frame = vec![0xA5u8; bytes];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::from_parameter(bytes), &frame, |bench, frame| {
            bench.iter(|| blake3::Hasher::new_keyed(&key).update(&42u64.to_le_bytes()).update(frame).finalize())
        });
    }
    group.finish();
}

criterion_group!(benches, calls, frame_tag);
criterion_main!(benches);
