//! Cold start at scale on the real control plane: N pods across N/10 GrpcServices are created
//! through kube-apiserver and marked Ready, then the real controller binary starts. Reports the
//! time until every key is in the registry (from process start, and from the moment its caches
//! had seen the last pod), the time per pod, the etcd txns and leases it used, where reconcile
//! time went, then a restart (SIGKILL, a new process moves every key onto its lease), and peak
//! RSS —
//! for N = 1,000, 10,000, 30,000 and 100,000 at 10 pods per GrpcService, in one run
//! (`SCALE_SIZES=1000,10000` to choose). A bench binary: figures, no assertions.
//! `cargo bench --bench scale` (part of `make bench`).

mod common;

use std::time::{Duration, Instant};

use common::{Controller, count, memory_mib, namespace, plane, ready_pods, service};
use futures::StreamExt;
use test_support::EtcdServer;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("SCALE_SIZES")
        .unwrap_or_else(|_| "1000,10000,30000,100000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SCALE_SIZES: comma-separated pod counts")
        })
        .collect();
    let plane = plane().await;
    let client = plane.client().await;
    let mut rows = Vec::new();
    for n in sizes {
        let ns = format!("scale-{n}");
        let services = (n / 10).max(1);
        namespace(&client, &ns).await;
        futures::stream::iter(0..services)
            .map(|s| {
                let (client, ns) = (client.clone(), ns.clone());
                async move { service(&client, &ns, &format!("svc-{s}"), &format!("svc-{s}")).await }
            })
            .buffer_unordered(32)
            .collect::<()>()
            .await;
        ready_pods(&client, &ns, n, |i| format!("svc-{}", i % services)).await;

        // The registry etcd fsyncs, as in production.
        let etcd = EtcdServer::start().await;
        let mut probe = etcd.client().await;
        let prefix = format!("services/{ns}/");
        let started = Instant::now();
        let mut controller = Controller::start(&plane, &etcd.endpoint(), &ns, 30);
        controller.synced().await;
        let synced = started.elapsed();
        while count(&mut probe, &prefix).await < i64::try_from(n).unwrap() {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "not all keys after 10 min"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all = started.elapsed();
        // Let status writes settle, then read the peak.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss, peak) = memory_mib(controller.pid());
        let txns = controller
            .metric("grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"txn\"}")
            .await;
        let ranges = controller
            .metric("grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"range\"}")
            .await;
        let leases = probe.leases().await.map_or(0, |r| r.leases().len());
        let mean_ms = |sum: f64, count: f64| {
            if count > 0.0 {
                sum / count * 1e3
            } else {
                f64::NAN
            }
        };
        let reconciles = controller
            .metric("grpc_registrar_reconcile_duration_seconds_count")
            .await;
        let reconcile_ms = mean_ms(
            controller
                .metric("grpc_registrar_reconcile_duration_seconds_sum")
                .await,
            reconciles,
        );
        let txn_ms = mean_ms(
            controller
                .metric("grpc_registrar_registry_request_duration_seconds_sum{backend=\"etcd\",op=\"txn\"}")
                .await,
            txns,
        );
        let range_ms = mean_ms(
            controller
                .metric("grpc_registrar_registry_request_duration_seconds_sum{backend=\"etcd\",op=\"range\"}")
                .await,
            ranges,
        );
        let cpu = common::cpu_seconds(controller.pid());
        drop(controller);

        // A restart: finalizers and status are in place, every key is on the killed process's
        // lease; the new process must move every key onto its own lease.
        let old_leases: std::collections::BTreeSet<i64> =
            test_support::registry::dump(&mut probe, &prefix)
                .await
                .into_values()
                .map(|s| s.lease)
                .collect();
        let restarted = Instant::now();
        let mut second = Controller::start(&plane, &etcd.endpoint(), &ns, 30);
        second.synced().await;
        let second_synced = restarted.elapsed();
        loop {
            let keys = test_support::registry::dump(&mut probe, &prefix).await;
            if keys.len() == n && keys.values().all(|s| !old_leases.contains(&s.lease)) {
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(600),
                "keys not moved after 10 min"
            );
            // A dump of 100k keys is ~15 MB: poll large sizes gently.
            tokio::time::sleep(Duration::from_millis(if n > 10_000 { 500 } else { 50 })).await;
        }
        let moved = restarted.elapsed();
        drop(second);
        rows.push((
            format!("{n} pods / {services} GrpcServices: start → all keys"),
            format!("{:.2} s", all.as_secs_f64()),
        ));
        let after_sync = all.saturating_sub(synced);
        rows.push((
            format!("{n} pods: caches synced (saw the last pod) → all keys (target ≤ 2 s at 10k)"),
            format!("{:.2} s", after_sync.as_secs_f64()),
        ));
        rows.push((
            format!("{n} pods: start → all keys, per pod (flat is linear)"),
            format!("{:.1} µs", all.as_secs_f64() * 1e6 / n as f64),
        ));
        rows.push((
            format!("{n} pods: etcd txns / ranges / leases (target 1 lease)"),
            format!("{txns:.0} / {ranges:.0} / {leases}"),
        ));
        rows.push((
            format!("{n} pods: reconciles, mean duration; etcd txn / range mean; controller CPU"),
            format!(
                "{reconciles:.0}, {reconcile_ms:.1} ms; {txn_ms:.1} ms / {range_ms:.1} ms; {cpu:.1} s"
            ),
        ));
        rows.push((
            format!("{n} pods: restart: caches synced → every key on the new lease"),
            format!(
                "{:.2} s ({:.2} s from start)",
                moved.saturating_sub(second_synced).as_secs_f64(),
                moved.as_secs_f64()
            ),
        ));
        rows.push((
            format!("{n} pods: controller RSS peak / after"),
            format!(
                "{peak:.1} MiB / {rss:.1} MiB ({:.1} KiB per pod at peak)",
                peak * 1024.0 / n as f64
            ),
        ));
        for (name, value) in &rows[rows.len() - 7..] {
            eprintln!("{name}: {value}");
        }
    }
    test_support::bench::report("scale", &rows);
}
