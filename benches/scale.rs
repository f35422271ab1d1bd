//! Cold start at scale on the real control plane: N pods across N/10 GrpcServices are created
//! through kube-apiserver and marked Ready, then the real controller binary starts. Reports the
//! time until every key is in the registry (from process start, and from the moment its caches
//! had seen the last pod), the time per pod, the etcd txns and leases it used, where reconcile
//! time went and how many reconciles per service; then a restart (SIGKILL, a new process adopts
//! the live lease) and a leader failover (two replicas, SIGKILL of the leader), each with the
//! DELETEs and PUTs an etcd watch saw from the kill until past the TTL, the time until every
//! service was verified, and the API writes it made; and peak RSS —
//! for N = 1,000, 10,000, 30,000 and 100,000 at 10 pods per GrpcService, in one run
//! (`SCALE_SIZES=1000,10000` to choose). A bench binary: figures, no assertions.
//! `cargo bench --bench scale` (part of `make bench`).

mod common;

use std::time::{Duration, Instant};

use common::{Controller, count, memory_mib, namespace, plane, ready_pods, service};
use futures::StreamExt;
use kube::ResourceExt;
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
        let mut controller = Controller::start(&plane, &etcd.endpoint(), &ns, TTL);
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
        let per_service = reconciles / services as f64;

        // A restart (SIGKILL, then a new process) and a leader failover (two replicas, SIGKILL
        // of the leader), each watched from the kill until past the TTL.
        let restart = handover(
            &plane,
            &client,
            &etcd,
            &ns,
            services,
            controller,
            Handover::Restart,
        )
        .await;
        let (leader, standby) = leader_first(
            Controller::replica(&plane, &etcd.endpoint(), &ns, TTL, "a"),
            Controller::replica(&plane, &etcd.endpoint(), &ns, TTL, "b"),
            services,
        )
        .await;
        let failover = handover(
            &plane,
            &client,
            &etcd,
            &ns,
            services,
            leader,
            Handover::Failover(standby),
        )
        .await;
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
            format!("{n} pods: first start: reconciles per service (target about 1)"),
            format!("{per_service:.2}"),
        ));
        for (what, h) in [
            ("restart (SIGKILL, new process)", &restart),
            ("leader failover (SIGKILL of the leader)", &failover),
        ] {
            rows.push((
                format!("{n} pods: {what}: DELETEs / PUTs on an etcd watch, kill → TTL + 2 s (target 0 DELETEs)"),
                format!("{} / {}", h.deletes, h.puts),
            ));
            rows.push((
                format!("{n} pods: {what}: new process start → every service verified"),
                format!("{:.2} s", h.verified.as_secs_f64()),
            ));
            rows.push((
                format!("{n} pods: {what}: API writes per service (target 0)"),
                format!(
                    "{:.3} ({} GrpcServices changed)",
                    h.api_writes as f64 / services as f64,
                    h.api_writes
                ),
            ));
        }
        rows.push((
            format!("{n} pods: controller RSS peak / after"),
            format!(
                "{peak:.1} MiB / {rss:.1} MiB ({:.1} KiB per pod at peak)",
                peak * 1024.0 / n as f64
            ),
        ));
        for (name, value) in &rows[rows.len() - 13..] {
            eprintln!("{name}: {value}");
        }
    }
    test_support::bench::report("scale", &rows);
}

/// The default lease TTL, as a real install runs.
const TTL: u32 = 30;

/// Which handover to measure.
enum Handover {
    /// SIGKILL of the only process, then a new one.
    Restart,
    /// SIGKILL of the leader of two replicas (the first given); the standby takes over.
    Failover(Controller),
}

/// What a handover cost.
struct Cost {
    deletes: usize,
    puts: usize,
    verified: Duration,
    api_writes: usize,
}

/// Kills `first` once it has verified every service, lets the next process (a new one, or the
/// standby) take over, and measures from the kill until past the TTL.
async fn handover(
    plane: &test_support::ControlPlane,
    client: &kube::Client,
    etcd: &EtcdServer,
    ns: &str,
    services: usize,
    mut first: Controller,
    kind: Handover,
) -> Cost {
    // Reconciles this process finished (each service once at least, once all are verified).
    let reconciled = |port: u16| async move {
        common::metric(
            &common::http_get(port, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default(),
            "grpc_registrar_reconcile_duration_seconds_count",
        )
    };
    first.synced().await;
    while reconciled(first.port).await < services as f64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefix = format!("services/{ns}/");
    let mut client_etcd = etcd.client().await;
    let mut watch = client_etcd
        .watch(
            prefix.as_str(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let versions = |client: kube::Client| async move {
        let api: kube::Api<grpc_registrar::crd::GrpcService> = kube::Api::namespaced(client, ns);
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    // The baseline once the first process's writes behind (finalizers, status) have settled:
    // no GrpcService changed for 2 s.
    let mut before = versions(client.clone()).await;
    let settling = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = versions(client.clone()).await;
        if now == before || settling.elapsed() > Duration::from_secs(300) {
            break;
        }
        before = now;
    }
    let killed = Instant::now();
    drop(first);
    let next = match kind {
        Handover::Restart => Controller::start(plane, &etcd.endpoint(), ns, TTL),
        Handover::Failover(standby) => standby,
    };
    let started = Instant::now();
    // The standby's reconciles count from when it became the leader: wait for a count that
    // covers every service after the kill.
    let base = reconciled(next.port).await;
    loop {
        let now = reconciled(next.port).await;
        if now - base >= services as f64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not every service verified after 15 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verified = started.elapsed();
    // Past the killed process's TTL, counting what a watching client saw.
    let (mut deletes, mut puts) = (0, 0);
    let until = killed + Duration::from_secs(u64::from(TTL) + 2);
    while let Ok(Ok(Some(resp))) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        watch.message(),
    )
    .await
    {
        for event in resp.events() {
            match event.event_type() {
                etcd_client::EventType::Delete => deletes += 1,
                etcd_client::EventType::Put => puts += 1,
            }
        }
    }
    let after = versions(client.clone()).await;
    let api_writes = after
        .iter()
        .filter(|(name, rv)| before.get(*name) != Some(rv))
        .count();
    drop(next);
    Cost {
        deletes,
        puts,
        verified,
        api_writes,
    }
}

/// The pair, the leader first, once one leads and has reconciled every service (with a Lease
/// of 2 s on a loaded machine, the first replica to lead may lose the Lease to the other
/// before it reconciled anything).
async fn leader_first(a: Controller, b: Controller, services: usize) -> (Controller, Controller) {
    let settled = |c: &Controller| {
        let port = c.port;
        async move {
            let page = common::http_get(port, "/metrics")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default();
            common::metric(&page, "grpc_registrar_leader ") == 1.0
                && common::metric(&page, "grpc_registrar_reconcile_duration_seconds_count")
                    >= services as f64
        }
    };
    let started = Instant::now();
    loop {
        if settled(&a).await {
            return (a, b);
        }
        if settled(&b).await {
            return (b, a);
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "no replica led and reconciled every service in 15 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
