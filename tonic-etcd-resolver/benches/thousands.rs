//! Thousands of endpoints in a real etcd: the resolver's memory per endpoint, how long a PUT or
//! DELETE takes to change the pick set at 100 and at 5,000 endpoints, and the time from
//! `Resolver::connect` to the first successful call. Prints a table and writes
//! `target/bench/thousands.json`.
//!
//! Every endpoint is one real tonic server, reached on a different loopback address
//! (127.0.x.y, all of 127/8 is loopback on Linux), so each is a distinct endpoint that answers
//! connections and calls without thousands of processes. Every endpoint is connected at once,
//! called or not, and the server runs in this process: the memory figure holds the resolver's
//! bookkeeping per endpoint (its member task, channel and entries) and both ends of an HTTP/2
//! connection.

use std::time::{Duration, Instant};

use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use test_support::EtcdServer;
use tonic_etcd_resolver::etcd_client::{Client, Txn, TxnOp};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::internals::ready_count;
use tonic_etcd_resolver::{Options, Resolver};

const SIZES: [usize; 2] = [100, 5_000];
const FLIPS: usize = 100;
/// etcd's default `--max-txn-ops`.
const TXN_OPS: usize = 128;

fn addr(port: u16, i: usize) -> String {
    format!("127.0.{}.{}:{port}", 1 + i / 250, 1 + i % 250)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn value(addr: &str) -> Vec<u8> {
    format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr))
}

async fn register_all(kv: &mut Client, target: &str, addrs: &[String]) {
    for chunk in addrs.chunks(TXN_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|a| TxnOp::put(format::endpoint_key(target, a), value(a), None))
            .collect();
        kv.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Waits (yielding, with a bound) until the pick set has `n` endpoints.
async fn until_ready(resolver: &Resolver, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready_count(resolver) != n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} endpoints ready",
            ready_count(resolver)
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::main]
async fn main() {
    let etcd = EtcdServer::start().await;
    let mut kv = etcd.client().await;
    let server = GreeterServer::start("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    let port = server.addr().port();
    let options =
        || Options::default().retry(Duration::from_millis(20), Duration::from_millis(500));
    let mut rows = Vec::new();
    for n in SIZES {
        let target = format!("services/default/thousands-{n}");
        let addrs: Vec<String> = (0..n).map(|i| addr(port, i)).collect();
        register_all(&mut kv, &target, &addrs).await;

        let rss_before = rss_kib();
        let started = Instant::now();
        let resolver = Resolver::connect([etcd.endpoint()], target.as_str(), options())
            .await
            .unwrap();
        let listed = started.elapsed();
        let mut client = GreeterClient::new(resolver.channel());
        client
            .say_hello(HelloRequest { name: "t".into() })
            .await
            .unwrap();
        let first_call = started.elapsed();
        until_ready(&resolver, n).await;
        let all_up = started.elapsed();
        let rss = rss_kib().saturating_sub(rss_before);

        // A key outside the set, flipped: PUT adds an endpoint, DELETE removes it.
        let extra = addr(port, n);
        let key = format::endpoint_key(&target, &extra);
        let (mut put_ms, mut del_ms) = (Vec::new(), Vec::new());
        for _ in 0..FLIPS {
            let started = Instant::now();
            kv.put(key.as_str(), value(&extra), None).await.unwrap();
            until_ready(&resolver, n + 1).await;
            put_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            kv.delete(key.as_str(), None).await.unwrap();
            until_ready(&resolver, n).await;
            del_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        put_ms.sort_by(f64::total_cmp);
        del_ms.sort_by(f64::total_cmp);
        rows.push((
            format!("{n} endpoints: Resolver::connect -> first successful call"),
            format!(
                "{:.1} ms ({:.1} ms to connect and list; every endpoint up after {:.1} ms)",
                first_call.as_secs_f64() * 1e3,
                listed.as_secs_f64() * 1e3,
                all_up.as_secs_f64() * 1e3
            ),
        ));
        rows.push((
            format!("{n} endpoints: resolver RSS"),
            format!(
                "{:.1} MiB, {:.1} KiB per endpoint",
                rss as f64 / 1024.0,
                rss as f64 / n as f64
            ),
        ));
        rows.push((
            format!("{n} endpoints: etcd PUT -> in the pick set ({FLIPS} flips)"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(&put_ms, 0.5),
                percentile(&put_ms, 0.99)
            ),
        ));
        rows.push((
            format!("{n} endpoints: etcd DELETE -> out of the pick set ({FLIPS} flips)"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(&del_ms, 0.5),
                percentile(&del_ms, 0.99)
            ),
        ));
        drop(client);
        drop(resolver);
    }
    test_support::bench::report("thousands", &rows);
}
