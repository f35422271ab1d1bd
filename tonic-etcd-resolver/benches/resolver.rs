//! Resolver figures against a real etcd and real tonic servers; prints a table and writes
//! `target/bench/resolver.json`.
//!
//! - propagation: etcd DELETE / PUT of a key → the channel routing accordingly, p50 and p99;
//! - throughput: unary RPCs through the resolver's channel against a direct tonic `Channel` to
//!   the same server, interleaved in one run, as a ratio.

use std::time::{Duration, Instant};

use futures::StreamExt;
use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use test_support::EtcdServer;
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::{Options, Resolver};

const TARGET: &str = "services/default/bench";
const FLIPS: usize = 200;
const CALLS: usize = 20_000;
const IN_FLIGHT: usize = 32;
const ROUNDS: usize = 5;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn until(mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "routing never changed");
        tokio::task::yield_now().await;
    }
}

async fn throughput<T>(client: GreeterClient<T>) -> f64
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let started = Instant::now();
    let ok = futures::stream::iter(0..CALLS)
        .map(|_| {
            let mut client = client.clone();
            async move {
                client
                    .say_hello(HelloRequest { name: "b".into() })
                    .await
                    .is_ok()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, CALLS);
    CALLS as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let etcd = EtcdServer::start().await;
    let mut kv = etcd.client().await;
    let a = GreeterServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let b = GreeterServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let value = |addr: &str| format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr));
    kv.put(format::endpoint_key(TARGET, &a_addr), value(&a_addr), None)
        .await
        .unwrap();
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, Options::default())
        .await
        .unwrap();
    until(|| resolver.ready_endpoints() == [a_addr.clone()]).await;

    // Propagation.
    let b_key = format::endpoint_key(TARGET, &b_addr);
    let (mut put_ms, mut del_ms) = (Vec::new(), Vec::new());
    for _ in 0..FLIPS {
        let started = Instant::now();
        kv.put(b_key.as_str(), value(&b_addr), None).await.unwrap();
        until(|| resolver.ready_endpoints().len() == 2).await;
        put_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        kv.delete(b_key.as_str(), None).await.unwrap();
        until(|| resolver.ready_endpoints().len() == 1).await;
        del_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    put_ms.sort_by(f64::total_cmp);
    del_ms.sort_by(f64::total_cmp);

    // Throughput, interleaved so both sides see the same machine noise.
    let direct = tonic::transport::Endpoint::from_shared(format!("http://{a_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (mut via_resolver, mut via_direct) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        via_direct.push(throughput(GreeterClient::new(direct.clone())).await);
        via_resolver.push(throughput(GreeterClient::new(resolver.channel())).await);
    }
    via_resolver.sort_by(f64::total_cmp);
    via_direct.sort_by(f64::total_cmp);
    let (r, d) = (via_resolver[ROUNDS / 2], via_direct[ROUNDS / 2]);

    let rows = [
        (
            format!("etcd PUT -> endpoint routed ({FLIPS} flips)"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(&put_ms, 0.5),
                percentile(&put_ms, 0.99)
            ),
        ),
        (
            format!("etcd DELETE -> endpoint unrouted ({FLIPS} flips)"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(&del_ms, 0.5),
                percentile(&del_ms, 0.99)
            ),
        ),
        (
            format!(
                "unary RPC/s, direct Channel ({CALLS} calls x {ROUNDS}, {IN_FLIGHT} in flight)"
            ),
            format!("median {d:.0}"),
        ),
        (
            "unary RPC/s, resolver LbChannel (same run, interleaved)".to_owned(),
            format!("median {r:.0}"),
        ),
        (
            "throughput ratio resolver / direct".to_owned(),
            format!("{:.3}", r / d),
        ),
    ];
    test_support::bench::report("resolver", &rows);
    drop(b);
}
