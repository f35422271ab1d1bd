//! Propagation latency on the real control plane: pod status patch → key change on an etcd
//! watch of the registry, over 200 readiness flips (a bench binary; figures, no assertions).
//!
//! `cargo bench --bench propagation` (part of `make bench`). Two clocks per flip: from sending
//! the patch, and from the API server's acknowledgement of it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::desired::Policy;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::{ControlPlane, EtcdServer};

const FLIPS: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn status(ready: bool) -> serde_json::Value {
    json!({"status": {"phase": "Running", "podIP": "10.9.0.1", "podIPs": [{"ip": "10.9.0.1"}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]}})
}

#[tokio::main]
async fn main() {
    let plane = ControlPlane::start_without_controller_manager().await;
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    // The registry etcd fsyncs, as in production.
    let etcd = EtcdServer::start().await;
    let client = plane.client().await;
    let registry = EtcdRegistry::connect(
        EtcdConfig::new(vec![etcd.endpoint()]),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    tokio::spawn(controller::run(
        client.clone(),
        Arc::new(registry),
        Scope::default(),
        Policy::default(),
        Arc::new(Metrics::default()),
        Arc::new(AtomicBool::new(false)),
        grpc_registrar::leader::always_leader(),
        controller::Tuning::default(),
        std::future::pending(),
    ));

    let services: Api<grpc_registrar::crd::GrpcService> =
        Api::namespaced(client.clone(), "default");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
                "metadata": {"name": "bench"}, "spec": {"selector": {"matchLabels": {"app": "bench"}}, "port": 50051}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "bench-0", "labels": {"app": "bench"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i"}]}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();

    let mut watch = etcd
        .client()
        .await
        .watch(
            "services/default/bench/",
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let (mut from_send, mut from_ack) = (Vec::new(), Vec::new());
    for i in 0..=FLIPS * 2 {
        let ready = i % 2 == 0;
        let sent = Instant::now();
        pods.patch_status(
            "bench-0",
            &PatchParams::default(),
            &Patch::Merge(status(ready)),
        )
        .await
        .unwrap();
        let acked = Instant::now();
        let want = if ready {
            EventType::Put
        } else {
            EventType::Delete
        };
        'seen: loop {
            let resp = tokio::time::timeout(Duration::from_secs(30), watch.message())
                .await
                .expect("no registry change within 30 s")
                .unwrap()
                .unwrap();
            if resp.events().iter().any(|e| e.event_type() == want) {
                break 'seen;
            }
        }
        if i > 0 {
            // The first registration includes the lease grant and ownership claim; skip it.
            from_send.push(sent.elapsed().as_secs_f64() * 1e3);
            from_ack.push(acked.elapsed().as_secs_f64() * 1e3);
        }
    }
    from_send.sort_by(f64::total_cmp);
    from_ack.sort_by(f64::total_cmp);
    let rows = [
        (
            format!(
                "pod status patch sent -> etcd watch event ({} flips)",
                from_send.len()
            ),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(&from_send, 0.5),
                percentile(&from_send, 0.99),
                from_send[from_send.len() - 1]
            ),
        ),
        (
            "pod status patch acknowledged -> etcd watch event".to_owned(),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(&from_ack, 0.5),
                percentile(&from_ack, 0.99),
                from_ack[from_ack.len() - 1]
            ),
        ),
    ];
    test_support::bench::report("propagation", &rows);
}
