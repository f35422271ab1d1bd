//! Leader failover on the real control plane with two real `grpc-registrar` processes: 20
//! SIGKILLs of the leader and 20 graceful stops (SIGTERM, a rolling restart), each followed by a
//! fresh replica. Reports the leaderless gap, the time until the new leader owns every key, and
//! the DELETEs a client watching the registry saw (a bench binary: figures, no assertions).
//!
//! `cargo bench --bench failover` (part of `make bench`). Election timings are the chart's
//! defaults scaled down 5× (lease 3 s, renew deadline 2 s, retry 400 ms; etcd TTL 10 s) so the
//! run takes minutes, not a quarter of an hour.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::{ControlPlane, EtcdServer};

const ROUNDS: usize = 20;
const PODS: usize = 20;
const NS: &str = "default";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn replica(plane: &ControlPlane, etcd: &str, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_grpc-registrar"))
        .env("KUBECONFIG", plane.kubeconfig())
        .env("RUST_LOG", "error")
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", NS)
        .args(["--etcd-endpoints", etcd, "--namespace", NS])
        .args(["--metrics-addr", "127.0.0.1:0", "--lease-ttl", "10"])
        .args(["--leader-elect", "true", "--leader-lease-duration", "3s"])
        .args([
            "--leader-renew-deadline",
            "2s",
            "--leader-retry-period",
            "400ms",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("failed to start grpc-registrar")
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    let lease = leases.get_opt("grpc-registrar").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

async fn key_leases(etcd: &mut etcd_client::Client) -> (usize, BTreeSet<i64>) {
    let keys = test_support::registry::dump(etcd, "services/").await;
    (keys.len(), keys.into_values().map(|s| s.lease).collect())
}

async fn until<F, Fut>(mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let plane = ControlPlane::start_without_controller_manager().await;
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    let etcd = EtcdServer::start().await;
    let client = plane.client().await;
    let services: Api<grpc_registrar::crd::GrpcService> = Api::namespaced(client.clone(), NS);
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
                "metadata": {"name": "greeter"},
                "spec": {"selector": {"matchLabels": {"app": "greeter"}}, "port": 50051}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for i in 0..PODS {
        let name = format!("g-{i}");
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"app": "greeter"}},
                "spec": {"containers": [{"name": "app", "image": "greeter"}]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        let ip = format!("10.60.0.{}", i + 1);
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .await
        .unwrap();
    }

    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let mut watcher = etcd.client().await;
    let mut registry = etcd.client().await;
    let mut next = 0usize;
    let mut spawn = |plane: &ControlPlane| {
        next += 1;
        let name = format!("r{next}");
        (name.clone(), replica(plane, &etcd.endpoint(), &name))
    };
    let mut replicas = vec![spawn(&plane)];
    until(|| async { holder(&leases).await.is_some() }).await;
    replicas.push(spawn(&plane));
    until(|| async { key_leases(&mut registry.clone()).await.0 == PODS }).await;
    // Let the follower's caches warm up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut stream = watcher
        .watch("services/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut rows = Vec::new();
    for (mode, signal) in [("SIGKILL", "KILL"), ("SIGTERM", "TERM")] {
        let (mut gaps, mut owned) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let leader = holder(&leases).await.expect("a leader");
            let index = replicas
                .iter()
                .position(|(name, _)| leader.starts_with(&format!("{name}_")))
                .expect("the leader is one of ours");
            let (_, mut child) = replicas.remove(index);
            let (_, old) = key_leases(&mut registry).await;
            let stopped = Instant::now();
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
            let _ = child.wait();
            let gap = until(|| async { holder(&leases).await.is_some_and(|h| h != leader) }).await;
            until(|| {
                let (mut probe, old) = (registry.clone(), old.clone());
                async move {
                    let (n, now) = key_leases(&mut probe).await;
                    n == PODS && now.len() == 1 && now.is_disjoint(&old)
                }
            })
            .await;
            gaps.push(gap.as_secs_f64() * 1000.0);
            owned.push(stopped.elapsed().as_secs_f64() * 1000.0);
            // The replacement joins as a follower and warms up.
            replicas.push(spawn(&plane));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        gaps.sort_by(f64::total_cmp);
        owned.sort_by(f64::total_cmp);
        rows.push((
            format!("{mode}: leaderless gap ({ROUNDS} failovers)"),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                percentile(&gaps, 0.5),
                percentile(&gaps, 0.99),
                gaps[gaps.len() - 1]
            ),
        ));
        rows.push((
            format!("{mode}: stop → new leader owns all {PODS} keys"),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (etcd TTL 10 s)",
                percentile(&owned, 0.5),
                percentile(&owned, 0.99),
                owned[owned.len() - 1]
            ),
        ));
    }
    let deletes =
        test_support::registry::deletes_seen(&mut stream, Duration::from_millis(500)).await;
    rows.push((
        format!(
            "DELETEs seen by a registry watcher across {} failovers",
            2 * ROUNDS
        ),
        deletes.to_string(),
    ));
    for (_, mut child) in replicas {
        let _ = child.kill();
        let _ = child.wait();
    }
    test_support::bench::report("failover", &rows);
}
