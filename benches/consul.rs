//! The Consul backend beside the etcd backend, in one run (a bench binary; figures, no
//! assertions):
//!
//! - cold registration of 10,000 endpoints in one service, through the same `Backend::sync`;
//! - propagation on the real control plane: pod status patch → the change visible to a client
//!   (an etcd watch; a blocking `Health().Service(passing)` query on Consul), readiness flips
//!   alternating between an etcd-backed and a Consul-backed GrpcService.
//!
//! `cargo bench --bench consul` (part of `make bench`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::crd::Backend as BackendKind;
use grpc_registrar::desired::{LogicalEndpoint, Policy};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulRegistry, ConsulService};
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use grpc_registrar::registry::{Backend, Claim, Owner, Publication};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::EtcdServer;
use test_support::consul::Consul;

mod common;

const ENDPOINTS: usize = 10_000;
const RUNS: usize = 3;
const FLIPS: usize = 100;

fn owner() -> Owner {
    Owner {
        uid: "uid-big".into(),
        namespace: "default".into(),
        name: "big".into(),
    }
}

fn publication(target: &str) -> Publication {
    let endpoints = (0..ENDPOINTS)
        .map(|i| LogicalEndpoint {
            id: format!("big-{i}"),
            ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap(),
            port: 50051,
            node: Some("node-1".into()),
            metadata: BTreeMap::from([
                ("namespace".to_owned(), "default".to_owned()),
                ("pod".to_owned(), format!("big-{i}")),
                ("zone".to_owned(), "zone-a".to_owned()),
            ]),
        })
        .collect();
    // A Consul service with its tags; etcd writes it as the default key layout.
    Publication::new(
        Arc::new(ConsulService::new(target, vec!["grpc".into()])),
        owner(),
        Duration::from_secs(30),
        endpoints,
    )
    .expect("the default layout renders the endpoints")
}

/// One cold registration: claim, then one sync of every endpoint. Returns (ms, write requests).
async fn cold(backend: &dyn Backend, target: &str) -> (f64, usize) {
    let publication = publication(target);
    let started = Instant::now();
    assert_eq!(backend.claim(target, &owner()).await.unwrap(), Claim::Owned);
    let report = backend.sync(&publication).await.unwrap();
    assert_eq!(report.registered, ENDPOINTS);
    (started.elapsed().as_secs_f64() * 1e3, report.txns)
}

fn row(name: &str, mut ms: Vec<f64>, txns: usize) -> (String, String) {
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    (
        name.to_owned(),
        format!(
            "median {median:.0} ms, max {:.0} ms, {txns} write requests, {:.0} endpoints/s",
            ms[ms.len() - 1],
            ENDPOINTS as f64 / (median / 1e3)
        ),
    )
}

fn latency_row(name: &str, mut ms: Vec<f64>) -> (String, String) {
    ms.sort_by(f64::total_cmp);
    (
        name.to_owned(),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            common::percentile(&ms, 0.5),
            common::percentile(&ms, 0.99),
            ms[ms.len() - 1]
        ),
    )
}

/// Passing instances of `service`, by blocking query from `index`: (count, new index).
async fn blocking_passing(consul: &str, service: &str, index: u64) -> (usize, u64) {
    let (addrs, next) =
        test_support::consul::passing(consul, service, index, Duration::from_secs(30)).await;
    (addrs.len(), next)
}

fn status(ready: bool) -> serde_json::Value {
    common::ready_status("10.9.0.1", ready)
}

async fn create_pod_and_service(client: &kube::Client, ns: &str, spec: serde_json::Value) {
    common::namespace(client, ns).await;
    let services: Api<grpc_registrar::crd::GrpcService> = Api::namespaced(client.clone(), ns);
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
                "metadata": {"name": "bench"}, "spec": spec}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
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
}

fn start_controller(client: &kube::Client, ns: &str, backend: Arc<dyn Backend>, kind: BackendKind) {
    tokio::spawn(controller::run(
        client.clone(),
        backend,
        Scope {
            namespace: Some(ns.to_owned()),
        },
        Policy {
            backend: kind,
            ..Policy::default()
        },
        Arc::new(Metrics::default()),
        Arc::new(AtomicBool::new(false)),
        grpc_registrar::leader::always_leader(),
        controller::Tuning::default(),
        std::future::pending(),
    ));
}

/// The Consul name of the bench's GrpcService `bench` in namespace `via-consul`: an untrusted
/// namespace's default, qualified with the namespace.
const CONSUL_NAME: &str = "bench--via-consul";

#[tokio::main]
async fn main() {
    let mut rows = Vec::new();

    // Cold registration, alternating backends so that machine noise hits both alike.
    let (mut etcd_ms, mut consul_ms, mut etcd_txns, mut consul_txns) = (vec![], vec![], 0, 0);
    for run in 0..RUNS {
        let etcd = EtcdServer::start().await;
        let registry = EtcdRegistry::connect(
            EtcdConfig {
                op_timeout: Duration::from_secs(30),
                ..EtcdConfig::new(vec![etcd.endpoint()])
            },
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        let (ms, txns) = cold(&registry, "services/default/big").await;
        etcd_ms.push(ms);
        etcd_txns = txns;
        let consul = Consul::start().await;
        let registry = ConsulRegistry::connect(
            ConsulConfig {
                request_timeout: Duration::from_secs(30),
                ..ConsulConfig::new(consul.http_addr())
            },
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let (ms, txns) = cold(&registry, "big").await;
        consul_ms.push(ms);
        consul_txns = txns;
        eprintln!("cold registration run {} of {RUNS} done", run + 1);
    }
    rows.push(row(
        &format!("etcd: cold registration of {ENDPOINTS} endpoints (claim + sync)"),
        etcd_ms,
        etcd_txns,
    ));
    rows.push(row(
        &format!("consul: cold registration of {ENDPOINTS} endpoints (claim + sync)"),
        consul_ms,
        consul_txns,
    ));

    // Propagation through the real API server and controller, alternating flips.
    let plane = common::plane().await;
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    let client = plane.client().await;
    let etcd = EtcdServer::start().await;
    let consul = Consul::start().await;
    let etcd_registry = EtcdRegistry::connect(
        EtcdConfig::new(vec![etcd.endpoint()]),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let consul_registry = ConsulRegistry::connect(
        ConsulConfig::new(consul.http_addr()),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    start_controller(
        &client,
        "via-etcd",
        Arc::new(etcd_registry),
        BackendKind::Etcd,
    );
    start_controller(
        &client,
        "via-consul",
        Arc::new(consul_registry),
        BackendKind::Consul,
    );
    let selector = json!({"matchLabels": {"app": "bench"}});
    create_pod_and_service(
        &client,
        "via-etcd",
        json!({"selector": selector, "port": 50051}),
    )
    .await;
    create_pod_and_service(
        &client,
        "via-consul",
        json!({"selector": selector, "port": 50051, "backend": "Consul"}),
    )
    .await;
    let etcd_pods: Api<Pod> = Api::namespaced(client.clone(), "via-etcd");
    let consul_pods: Api<Pod> = Api::namespaced(client.clone(), "via-consul");
    let mut watch = etcd
        .client()
        .await
        .watch(
            "services/via-etcd/bench/",
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let consul_addr = consul.http_addr();
    let mut index = 0;
    let (mut via_etcd, mut via_consul) = (Vec::new(), Vec::new());
    for i in 0..=FLIPS * 2 {
        let ready = i % 2 == 0;
        // etcd
        let sent = Instant::now();
        etcd_pods
            .patch_status(
                "bench-0",
                &PatchParams::default(),
                &Patch::Merge(status(ready)),
            )
            .await
            .unwrap();
        let want = if ready {
            EventType::Put
        } else {
            EventType::Delete
        };
        loop {
            let resp = tokio::time::timeout(Duration::from_secs(30), watch.message())
                .await
                .expect("no etcd change within 30 s")
                .unwrap()
                .unwrap();
            if resp.events().iter().any(|e| e.event_type() == want) {
                break;
            }
        }
        if i > 0 {
            via_etcd.push(sent.elapsed().as_secs_f64() * 1e3);
        }
        // Consul: the blocking query is already waiting on the current index when the patch is
        // sent, as a client's would be.
        let (now, at) = blocking_passing(&consul_addr, CONSUL_NAME, 0).await;
        index = index.max(at);
        let want = usize::from(ready);
        let waiting = {
            let consul_addr = consul_addr.clone();
            let mut index = index;
            let mut seen = now;
            tokio::spawn(async move {
                while seen != want {
                    (seen, index) = blocking_passing(&consul_addr, CONSUL_NAME, index).await;
                }
                (Instant::now(), index)
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let sent = Instant::now();
        consul_pods
            .patch_status(
                "bench-0",
                &PatchParams::default(),
                &Patch::Merge(status(ready)),
            )
            .await
            .unwrap();
        let (seen_at, at) = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("no consul change within 30 s")
            .unwrap();
        index = at;
        if i > 0 {
            via_consul.push(seen_at.saturating_duration_since(sent).as_secs_f64() * 1e3);
        }
    }
    rows.push(latency_row(
        &format!(
            "etcd: pod status patch -> etcd watch event ({} flips)",
            via_etcd.len()
        ),
        via_etcd,
    ));
    rows.push(latency_row(
        &format!(
            "consul: pod status patch -> blocking passing-only health query answers ({} flips)",
            via_consul.len()
        ),
        via_consul,
    ));
    test_support::bench::report("consul", &rows);
}
