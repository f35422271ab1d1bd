//! Registry and cache figures against a real etcd (no `--unsafe-no-fsync`): prints a table.
//!
//! - cold registration of 10,000 endpoints: one target (txn batches of 128), and 1,000 targets
//!   of 10 (claim + sync each, 32 in flight);
//! - bytes per cached pod: a candidate in the index, against the whole pod in a reflector store;
//! - what a reconcile computes for one 400-pod service, whatever changed (the desired endpoints,
//!   then every key and value rendered): time and heap allocations.
//!
//! Run with `make bench` (or `cargo bench --bench registry`). Medians and p99/max over runs.

use std::alloc::System;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use grpc_registrar::registry::{Claim, Owner};
use grpc_registrar::source::index::CandidateIndex;
use grpc_registrar::source::pod::{PodObject, candidate};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use test_support::EtcdServer;
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const RUNS: usize = 5;

fn entries(target: &str, base: usize, n: usize) -> Arc<BTreeMap<String, Vec<u8>>> {
    Arc::new(
        (base..base + n)
            .map(|i| {
                let addr = format!("10.{}.{}.{}:50051", i / 65536, (i / 256) % 256, i % 256);
                let md = serde_json::json!({"namespace": "default", "node": "node-1", "pod": format!("greeter-{i}")});
                let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr.clone()).with_metadata(md));
                (format::endpoint_key(target, &addr), value)
            })
            .collect(),
    )
}

fn owner(i: usize) -> Owner {
    Owner {
        uid: format!("uid-{i}"),
        namespace: "default".into(),
        name: format!("svc-{i}"),
    }
}

async fn fresh_registry(etcd: &EtcdServer) -> EtcdRegistry {
    let config = EtcdConfig {
        op_timeout: Duration::from_secs(30),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    };
    EtcdRegistry::connect(config, Arc::new(Metrics::default()))
        .await
        .unwrap()
}

async fn one_target(n: usize) -> (Duration, usize) {
    let etcd = EtcdServer::start().await;
    let reg = fresh_registry(&etcd).await;
    let target = "services/default/big";
    let data = entries(target, 0, n);
    let started = Instant::now();
    assert_eq!(reg.claim(target, &owner(0)).await.unwrap(), Claim::Owned);
    let report = reg
        .sync_entries(target, &owner(0), Duration::from_secs(30), data)
        .await
        .unwrap();
    (started.elapsed(), report.txns + 1)
}

async fn many_targets(services: usize, per: usize) -> (Duration, usize) {
    let etcd = EtcdServer::start().await;
    let reg = fresh_registry(&etcd).await;
    let work: Vec<_> = (0..services)
        .map(|i| (format!("services/default/svc-{i}"), owner(i), i))
        .map(|(t, o, i)| {
            let data = entries(&t, i * per, per);
            (t, o, data)
        })
        .collect();
    let started = Instant::now();
    let txns: usize = futures::stream::iter(work)
        .map(|(target, who, data)| {
            let reg = reg.clone();
            async move {
                assert_eq!(reg.claim(&target, &who).await.unwrap(), Claim::Owned);
                reg.sync_entries(&target, &who, Duration::from_secs(30), data)
                    .await
                    .unwrap()
                    .txns
                    + 1
            }
        })
        .buffer_unordered(32)
        .fold(0, |a, b| async move { a + b })
        .await;
    (started.elapsed(), txns)
}

/// A pod as the API server sends it for a typical Deployment replica, managedFields included.
fn realistic_pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("greeter-7d9f8c6b5-{i:05}"), "namespace": "default",
            "generateName": "greeter-7d9f8c6b5-", "uid": format!("6f1c2a1e-0000-4000-8000-{i:012}"),
            "resourceVersion": "123456", "creationTimestamp": "2026-11-21T10:00:00Z",
            "labels": {"app": "greeter", "pod-template-hash": "7d9f8c6b5", "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-21T10:00:00Z", "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "greeter-7d9f8c6b5", "uid": "aaaa", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-21T10:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}}, "f:ownerReferences": {}},
                              "f:spec": {"f:containers": {"k:{\"name\":\"server\"}": {".": {}, "f:image": {}, "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-21T10:00:05Z", "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "nodeName": "node-1", "serviceAccountName": "default", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "containers": [{
                "name": "server", "image": "registry.example.com/greeter:v1.2.3", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "RUST_LOG", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 5},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "podIP": format!("10.1.{}.{}", i / 256, i % 256), "podIPs": [{"ip": format!("10.1.{}.{}", i / 256, i % 256)}],
            "hostIP": "192.0.2.10", "startTime": "2026-11-21T10:00:01Z", "qosClass": "Burstable",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2026-11-21T10:00:02Z"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-21T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-21T10:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-21T10:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-21T10:00:00Z"}
            ],
            "containerStatuses": [{"name": "server", "ready": true, "restartCount": 0, "started": true, "image": "registry.example.com/greeter:v1.2.3",
                "imageID": "registry.example.com/greeter@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "state": {"running": {"startedAt": "2026-11-21T10:00:02Z"}}, "lastState": {}}]
        }
    }))
    .unwrap()
}

/// Heap bytes per pod held by the candidate index of `n` pods (each pod decoded and dropped, as
/// the watch feed does).
fn bytes_per_indexed_candidate(n: usize) -> f64 {
    let region = Region::new(GLOBAL);
    let index = CandidateIndex::default();
    for i in 0..n {
        let pod = PodObject::from(&realistic_pod(i));
        index.apply("default", candidate(&pod));
    }
    let stats = region.change();
    assert_eq!(index.len(), n);
    let held = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    drop(index);
    held / n as f64
}

/// Heap bytes per pod held by a reflector store of `n` whole pods (the baseline a controller
/// caching pods pays).
fn bytes_per_cached_pod(n: usize) -> f64 {
    // Net heap growth over building the pods as the watcher would and filing them in the store.
    let region = Region::new(GLOBAL);
    let pods: Vec<Pod> = (0..n).map(realistic_pod).collect();
    let (store, mut writer) = reflector::store::<Pod>();
    writer.apply_watcher_event(&Event::Init);
    for p in pods {
        writer.apply_watcher_event(&Event::InitApply(p));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let stats = region.change();
    assert_eq!(store.len(), n);
    let held = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    drop(store);
    drop(writer);
    held / n as f64
}

/// Decoding one pod's watch JSON as `T`, `n` times: nanoseconds and heap allocations per pod.
fn decode_cost<T: serde::de::DeserializeOwned>(n: usize) -> (f64, f64) {
    let json: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&realistic_pod(i)).unwrap())
        .collect();
    let region = Region::new(GLOBAL);
    let started = std::time::Instant::now();
    for bytes in &json {
        std::hint::black_box(serde_json::from_slice::<T>(bytes).unwrap());
    }
    let took = started.elapsed();
    let allocations = region.change().allocations as f64;
    (took.as_nanos() as f64 / n as f64, allocations / n as f64)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs a cold registration of 10,000 endpoints `RUNS` times and formats its row.
async fn registration_row<F, Fut>(name: &str, txn_note: &str, run: F) -> (String, String)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Duration, usize)>,
{
    let mut millis = Vec::new();
    let mut txns = 0;
    for _ in 0..RUNS {
        let (took, used) = run().await;
        millis.push(took.as_secs_f64() * 1e3);
        txns = used;
    }
    let max = millis.iter().copied().fold(0.0, f64::max);
    let med = median(millis);
    (
        name.into(),
        format!(
            "median {med:.0} ms, max {max:.0} ms, {txns} txns{txn_note}, {:.0} endpoints/s",
            10_000.0 / (med / 1e3)
        ),
    )
}

#[tokio::main]
async fn main() {
    let mut rows: Vec<(String, String)> = Vec::new();

    rows.push(
        registration_row("register 10,000 endpoints, 1 target, cold", "", || {
            one_target(10_000)
        })
        .await,
    );
    rows.push(
        registration_row(
            "register 10,000 endpoints, 1,000 targets x 10, cold",
            " (claim + batch)",
            || many_targets(1_000, 10),
        )
        .await,
    );

    let indexed = median(
        (0..3)
            .map(|_| bytes_per_indexed_candidate(10_000))
            .collect(),
    );
    let full = median((0..3).map(|_| bytes_per_cached_pod(10_000)).collect());
    rows.push((
        "bytes per pod in the candidate index".into(),
        format!("{indexed:.0} B"),
    ));
    rows.push((
        "bytes per pod in a reflector store, whole pods (baseline)".into(),
        format!("{full:.0} B ({:.1}x)", full / indexed),
    ));

    // The pod watch decodes every event: the whole Pod, or only what the source reads.
    let (mut full_ns, mut full_allocs, mut read_ns, mut read_allocs) = (vec![], 0.0, vec![], 0.0);
    for _ in 0..5 {
        let (ns, allocs) = decode_cost::<Pod>(10_000);
        full_ns.push(ns);
        full_allocs = allocs;
        let (ns, allocs) = decode_cost::<PodObject>(10_000);
        read_ns.push(ns);
        read_allocs = allocs;
    }
    let (full_ns, read_ns) = (median(full_ns), median(read_ns));
    rows.push((
        "decode a pod's watch JSON: the fields read (PodObject)".into(),
        format!("{read_ns:.0} ns, {read_allocs:.0} allocations"),
    ));
    rows.push((
        "decode a pod's watch JSON: the whole Pod (before)".into(),
        format!(
            "{full_ns:.0} ns, {full_allocs:.0} allocations ({:.1}x the time)",
            full_ns / read_ns
        ),
    ));

    // A readiness flip re-evaluates the whole service: its cost per pod, and per flip.
    let (mut eval_us, mut eval_allocs) = (vec![], 0.0);
    for _ in 0..5 {
        let (us, allocs) = evaluate_cost(400, 200);
        eval_us.push(us);
        eval_allocs = allocs;
    }
    rows.push((
        "evaluate a 400-pod service (desired endpoints, then keys and values)".into(),
        format!(
            "{:.0} µs, {eval_allocs:.0} allocations ({:.1} per pod)",
            median(eval_us),
            eval_allocs / 400.0
        ),
    ));

    test_support::bench::report("registry", &rows);
}

/// Evaluating one service of `pods` ready pods as a reconcile does (`desired`, then the etcd
/// layout's keys and values), `n` times: microseconds and heap allocations per evaluation.
fn evaluate_cost(pods: usize, n: usize) -> (f64, f64) {
    use grpc_registrar::crd::GrpcService;
    use grpc_registrar::desired::{Plan, Policy, desired};
    use grpc_registrar::registry::etcd::Layout;
    use grpc_registrar::source::Candidate;

    let svc: GrpcService = serde_json::from_value(serde_json::json!({
        "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
        "metadata": {"name": "greeter", "namespace": "default", "uid": "u"},
        "spec": {"selector": {"matchLabels": {"app": "greeter"}}, "port": 50051,
                 "metadataFromLabels": ["version"]}
    }))
    .unwrap();
    let plan = Plan::new(&svc, &Policy::default()).unwrap();
    let layout = Layout {
        namespace: "default".into(),
        name: "greeter".into(),
        ..Layout::default_for("services/default/greeter", ValueFormat::EtcdNaming)
    };
    let candidates: Vec<Arc<Candidate>> = (0..pods)
        .map(|i| {
            let name = format!("greeter-{i}");
            Arc::new(Candidate {
                id: name.clone(),
                pod: Some(name),
                ip: Some(format!("10.1.{}.{}", i / 250, 1 + i % 250).parse().unwrap()),
                ready: true,
                serving: true,
                node: Some(format!("node-{}", i % 20)),
                zone: Some(format!("zone-{}", i % 3)),
                labels: [("app", "greeter"), ("version", "v1")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ..Candidate::default()
            })
        })
        .collect();
    let region = Region::new(GLOBAL);
    let started = Instant::now();
    for _ in 0..n {
        let want = desired(&plan, &candidates);
        let rendering = layout.lay_out(want.endpoints);
        assert_eq!(rendering.entries.map(|e| e.len()).unwrap_or(0), pods);
    }
    let took = started.elapsed();
    let allocations = region.change().allocations as f64;
    (took.as_secs_f64() * 1e6 / n as f64, allocations / n as f64)
}
