//! Resolver figures against a real etcd and real tonic servers; prints a table and writes
//! `target/bench/resolver.json`.
//!
//! - propagation: etcd DELETE / PUT of a key → the channel routing accordingly, p50 and p99;
//! - throughput: unary RPCs through the resolver's channel against a direct tonic `Channel` to
//!   the same server, interleaved in one run, as a ratio (round-robin must not regress);
//! - a slow backend: one of three servers adds 50 ms per call; round-robin, least-loaded p2c and
//!   outlier ejection (with a 25 ms deadline) side by side on p50, p99, throughput and errors;
//! - zones: two zones, the client in one: the share of calls that stay local, then the
//!   spill-over when two of three local servers die;
//! - health: a server turning `NOT_SERVING` under load: how long until it gets no more calls,
//!   with a `Watch` and with a 500 ms `Check` poll.

use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{SERVICE, TestServer, register};
use futures::StreamExt;
use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use test_support::EtcdServer;
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::{
    Balance, HealthCheck, LbChannel, Options, OutlierDetection, Resolver, ZonePreference,
};

const TARGET: &str = "services/default/bench";
const FLIPS: usize = 200;
const IN_FLIGHT: usize = 32;
/// Interleaved throughput rounds (direct, resolver, a second direct); the ratios reported are
/// medians over rounds. Many short rounds, the sides' order rotating, so that a shared
/// machine's drifting load falls on every side alike.
const ROUNDS: usize = 15;
/// Calls per side of a throughput pair.
const PAIR_CALLS: usize = 8_000;
const SLOW_CALLS: usize = 4_000;
const ZONE_CALLS: usize = 3_000;
const HEALTH_POLL: Duration = Duration::from_millis(500);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Waits (yielding, up to 10 s) until `check`; on timeout panics naming `what` and the
/// resolver's state, so a failed run says which wait failed.
async fn until(what: &str, resolver: &Resolver, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: connected {:?}, pickable {:?}",
            resolver.ready_endpoints(),
            resolver.pickable_endpoints()
        );
        tokio::task::yield_now().await;
    }
}

async fn throughput<T>(client: GreeterClient<T>, calls: usize) -> f64
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let started = Instant::now();
    let ok = futures::stream::iter(0..calls)
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
    assert_eq!(ok, calls);
    calls as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let etcd = EtcdServer::start().await;
    let mut rows = baseline(&etcd).await;
    rows.extend(slow_backend(&etcd).await);
    rows.extend(zones(&etcd).await);
    rows.extend(health(&etcd).await);
    test_support::bench::report("resolver", &rows);
}

/// Propagation and the round-robin throughput ratio against a direct channel.
async fn baseline(etcd: &EtcdServer) -> Vec<(String, String)> {
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
    until("the first endpoint", &resolver, || {
        resolver.ready_endpoints() == [a_addr.clone()]
    })
    .await;

    // Propagation.
    let b_key = format::endpoint_key(TARGET, &b_addr);
    let (mut put_ms, mut del_ms) = (Vec::new(), Vec::new());
    for _ in 0..FLIPS {
        let started = Instant::now();
        kv.put(b_key.as_str(), value(&b_addr), None).await.unwrap();
        until("a PUT to route", &resolver, || {
            resolver.ready_endpoints().len() == 2
        })
        .await;
        put_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        kv.delete(b_key.as_str(), None).await.unwrap();
        until("a DELETE to unroute", &resolver, || {
            resolver.ready_endpoints().len() == 1
        })
        .await;
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
    // A second direct channel: direct against direct is the method's own noise (an A/A test).
    let direct_again = tonic::transport::Endpoint::from_shared(format!("http://{a_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (mut via_resolver, mut via_direct) = (Vec::new(), Vec::new());
    let (mut ratios, mut noise) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Each side first, second and third in turn.
        let mut rates = [0.0; 3];
        for k in 0..3 {
            let side = (round + k) % 3;
            rates[side] = match side {
                0 => throughput(GreeterClient::new(direct.clone()), PAIR_CALLS).await,
                1 => throughput(GreeterClient::new(resolver.channel()), PAIR_CALLS).await,
                _ => throughput(GreeterClient::new(direct_again.clone()), PAIR_CALLS).await,
            };
        }
        let [d, r, d2] = rates;
        via_direct.push(d);
        via_resolver.push(r);
        ratios.push(r / d);
        noise.push(d2 / d);
    }
    for v in [&mut via_resolver, &mut via_direct, &mut ratios, &mut noise] {
        v.sort_by(f64::total_cmp);
    }
    let (r, d) = (via_resolver[ROUNDS / 2], via_direct[ROUNDS / 2]);
    let spread = |v: &[f64]| {
        format!(
            "median {:.3} (quartiles {:.3} to {:.3}, all {:.3} to {:.3})",
            v[ROUNDS / 2],
            v[ROUNDS / 4],
            v[ROUNDS * 3 / 4],
            v[0],
            v[ROUNDS - 1]
        )
    };

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
                "unary RPC/s, direct Channel ({PAIR_CALLS} calls x {ROUNDS}, {IN_FLIGHT} in flight)"
            ),
            format!("median {d:.0}"),
        ),
        (
            "unary RPC/s, resolver LbChannel (same run, interleaved)".to_owned(),
            format!("median {r:.0}"),
        ),
        (
            format!("throughput ratio resolver / direct ({ROUNDS} interleaved rounds)"),
            spread(&ratios),
        ),
        (
            "throughput ratio direct / another direct (the noise, same rounds)".to_owned(),
            spread(&noise),
        ),
    ];
    drop(b);
    rows.to_vec()
}

/// `n` calls with `IN_FLIGHT` at a time: (latencies of successes in ms, sorted), failures,
/// calls per second, successes per server.
async fn load(
    channel: &LbChannel,
    n: usize,
    deadline: Option<Duration>,
) -> (
    Vec<f64>,
    usize,
    f64,
    std::collections::BTreeMap<String, usize>,
) {
    let client = GreeterClient::new(channel.clone());
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(HelloRequest { name: "b".into() });
                if let Some(deadline) = deadline {
                    request.set_timeout(deadline);
                }
                let started = Instant::now();
                let reply = client.say_hello(request).await;
                (reply, started.elapsed().as_secs_f64() * 1e3)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut by_server = std::collections::BTreeMap::new();
    let mut failed = 0;
    for (reply, ms) in results {
        match reply {
            Ok(reply) => {
                latencies.push(ms);
                *by_server.entry(reply.into_inner().server).or_insert(0) += 1;
            }
            Err(_) => failed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, failed, rate, by_server)
}

async fn ready(resolver: &Resolver, n: usize) {
    until(&format!("{n} endpoints connected"), resolver, || {
        resolver.ready_endpoints().len() == n
    })
    .await;
}

/// One of three servers adds 50 ms per call.
async fn slow_backend(etcd: &EtcdServer) -> Vec<(String, String)> {
    const SLOW_TARGET: &str = "services/default/bench-slow";
    let servers = [
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
    ];
    servers[0].set_delay(Duration::from_millis(50));
    for s in &servers {
        register(etcd, SLOW_TARGET, &s.addr(), serde_json::json!({})).await;
    }
    let deadline = Duration::from_millis(25);
    let policies = [
        ("round-robin", Options::default(), None),
        (
            "least-loaded p2c",
            Options::default().balance(Balance::LeastLoaded),
            None,
        ),
        (
            "round-robin + outlier ejection (25 ms deadline)",
            Options::default().outlier_detection(OutlierDetection::default()),
            Some(deadline),
        ),
    ];
    let mut rows = Vec::new();
    for (name, options, deadline) in policies {
        let resolver = Resolver::connect([etcd.endpoint()], SLOW_TARGET, options)
            .await
            .unwrap();
        ready(&resolver, 3).await;
        let before = servers[0].calls();
        let (latencies, failed, rate, _) = load(&resolver.channel(), SLOW_CALLS, deadline).await;
        let slow_share = (servers[0].calls() - before) as f64 / SLOW_CALLS as f64;
        rows.push((
            format!("slow backend (1 of 3 +50 ms), {name}, {SLOW_CALLS} calls"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, {rate:.0} RPC/s, {failed} errors, {:.1}% to the slow one",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                slow_share * 100.0
            ),
        ));
    }
    rows
}

/// Two zones, the client in zone a: the local share, then the spill-over.
async fn zones(etcd: &EtcdServer) -> Vec<(String, String)> {
    const ZONE_TARGET: &str = "services/default/bench-zones";
    let mut servers = Vec::new();
    for zone in ["a", "a", "a", "b", "b", "b"] {
        let s = TestServer::start().await;
        register(
            etcd,
            ZONE_TARGET,
            &s.addr(),
            serde_json::json!({ "zone": zone }),
        )
        .await;
        servers.push(s);
    }
    let local: Vec<String> = servers[..3].iter().map(TestServer::addr).collect();
    let options = Options::default().prefer_zone(ZonePreference::new("a"));
    let resolver = Resolver::connect([etcd.endpoint()], ZONE_TARGET, options)
        .await
        .unwrap();
    ready(&resolver, 6).await;
    let share = |by_server: &std::collections::BTreeMap<String, usize>| {
        let total: usize = by_server.values().sum();
        let here: usize = local.iter().filter_map(|a| by_server.get(a)).sum();
        here as f64 * 100.0 / total.max(1) as f64
    };
    let (_, failed, _, by_server) = load(&resolver.channel(), ZONE_CALLS, None).await;
    let before = (share(&by_server), failed);

    servers[0].kill();
    servers[1].kill();
    let killed = Instant::now();
    // With calls going, as a client has them.
    let deadline = killed + Duration::from_secs(10);
    let mut client = GreeterClient::new(resolver.channel());
    while resolver.ready_endpoints().len() != 4 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for 2 killed servers noticed: connected {:?}",
            resolver.ready_endpoints()
        );
        let _ = client.say_hello(HelloRequest::default()).await;
    }
    let noticed = killed.elapsed();
    let (_, failed, _, by_server) = load(&resolver.channel(), ZONE_CALLS, None).await;
    vec![
        (
            format!("zones: client in a, 3 servers in a and 3 in b, {ZONE_CALLS} calls"),
            format!("{:.1}% stayed local, {} errors", before.0, before.1),
        ),
        (
            "zones: 2 of 3 local servers killed (calls going) -> spill-over".to_owned(),
            format!(
                "noticed in {:.2} ms; then {:.1}% local (1 of 4 up), {failed} errors",
                noticed.as_secs_f64() * 1e3,
                share(&by_server)
            ),
        ),
    ]
}

/// A server turns NOT_SERVING under load: time until its last call.
async fn health(etcd: &EtcdServer) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for (name, check) in [
        ("Watch", HealthCheck::watch(SERVICE)),
        (
            "Check every 500 ms",
            HealthCheck::poll(SERVICE, HEALTH_POLL),
        ),
    ] {
        let target = format!("services/default/bench-health-{}", rows.len());
        let servers = [TestServer::start().await, TestServer::start().await];
        for s in &servers {
            register(etcd, &target, &s.addr(), serde_json::json!({})).await;
        }
        let options = Options::default().health_check(check);
        let resolver = Resolver::connect([etcd.endpoint()], target.as_str(), options)
            .await
            .unwrap();
        ready(&resolver, 2).await;
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = tokio::spawn({
            let channel = resolver.channel();
            let stop = stop.clone();
            async move {
                let mut client = GreeterClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let _ = client.say_hello(HelloRequest::default()).await;
                }
            }
        });
        // Let traffic reach both servers first.
        let warm = servers[0].calls();
        until("traffic to reach the first server", &resolver, || {
            servers[0].calls() > warm + 10
        })
        .await;
        servers[0].set_serving(false).await;
        let flipped = Instant::now();
        let at_flip = servers[0].calls();
        let (mut last, mut last_at) = (at_flip, flipped);
        while flipped.elapsed() < HEALTH_POLL * 3 {
            let now = servers[0].calls();
            if now != last {
                (last, last_at) = (now, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        traffic.await.unwrap();
        let after = last_at.duration_since(flipped);
        // A poll applies a change within one interval and the check's round trip, and this
        // loop samples every millisecond or so: a bound of exactly one interval failed by
        // 0.2 to 1 ms in 2 of 8 runs.
        let bound = HEALTH_POLL + Duration::from_millis(25);
        assert!(
            after <= bound,
            "a NOT_SERVING server still got calls {after:?} later ({name})"
        );
        rows.push((
            format!("health ({name}): NOT_SERVING -> its last call"),
            format!(
                "{:.1} ms later ({} calls after the flip, sequential traffic)",
                after.as_secs_f64() * 1e3,
                last - at_flip
            ),
        ));
    }
    rows
}
