//! Shared by the cluster benches: the control plane with the CRD, the real controller binary as
//! a process (its `/metrics` and `/readyz` read over HTTP), pods created and made ready through
//! the API, Nodes, Services and hand-made EndpointSlices, watches whose events are stamped on
//! arrival, and process CPU and memory from `/proc`.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use test_support::{ControlPlane, free_port};

/// A control plane with the GrpcService CRD established, without kube-controller-manager: the
/// pod-source benches measure the controller alone, with no other pod informer on the CPU.
pub async fn plane() -> ControlPlane {
    with_crd(ControlPlane::start_without_controller_manager().await)
}

/// As [`plane`], with kube-controller-manager computing EndpointSlices.
#[allow(dead_code)]
pub async fn plane_with_endpoint_slices() -> ControlPlane {
    with_crd(ControlPlane::start().await)
}

fn with_crd(plane: ControlPlane) -> ControlPlane {
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    plane
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn namespace(client: &kube::Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .unwrap();
}

/// Creates `name` selecting `app=<app>` on port 50051.
pub async fn service(client: &kube::Client, ns: &str, name: &str, app: &str) {
    let api: Api<grpc_registrar::crd::GrpcService> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": app}}, "port": 50051}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// A unique pod IP for pod `i`.
pub fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

pub fn ready_status(ip: &str, ready: bool) -> serde_json::Value {
    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]}})
}

/// Creates pods `p-0..n` labelled `app=<app(i)>` and marks them Ready, 32 requests in flight.
pub async fn ready_pods(client: &kube::Client, ns: &str, n: usize, app: impl Fn(usize) -> String) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, app) = (api.clone(), app(i));
            async move {
                let name = format!("p-{i}");
                let pod = json!({"metadata": {"name": name, "labels": {"app": app}},
                    "spec": {"containers": [{"name": "app", "image": "greeter"}]}});
                api.create(
                    &PostParams::default(),
                    &serde_json::from_value(pod).unwrap(),
                )
                .await
                .unwrap();
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(ready_status(&ip(i), true)),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
    eprintln!(
        "created and readied {n} pods in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The real controller binary watching `ns`.
pub struct Controller {
    pub child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Controller {
    pub fn start(plane: &ControlPlane, etcd: &str, ns: &str, ttl: u32) -> Self {
        Self::start_with(plane, etcd, ns, ttl, &[])
    }

    /// One replica of a leader-elected pair named `identity` (Lease 2 s in the release
    /// namespace `ns`).
    pub fn replica(plane: &ControlPlane, etcd: &str, ns: &str, ttl: u32, identity: &str) -> Self {
        Self::start_with(
            plane,
            etcd,
            ns,
            ttl,
            &[
                ("POD_NAME", identity),
                ("POD_NAMESPACE", ns),
                ("LEADER_ELECT", "true"),
                ("LEADER_LEASE_DURATION", "2s"),
                ("LEADER_RENEW_DEADLINE", "1500ms"),
                ("LEADER_RETRY_PERIOD", "250ms"),
            ],
        )
    }

    /// A controller with extra environment (flags by their env names).
    pub fn start_with(
        plane: &ControlPlane,
        etcd: &str,
        ns: &str,
        ttl: u32,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        // BENCH_CONTROLLER_BIN runs another build of the controller (a baseline, side by side).
        let binary = std::env::var("BENCH_CONTROLLER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_grpc-registrar").to_owned());
        let mut command = Command::new(binary);
        // As the image runs it (Dockerfile), unless the bench's own environment says otherwise.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            command.env("MALLOC_ARENA_MAX", "2");
        }
        let child = command
            .envs(env.iter().copied())
            .env("KUBECONFIG", plane.kubeconfig())
            .env(
                "RUST_LOG",
                std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args(["--etcd-endpoints", etcd, "--namespace", ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--lease-ttl", &ttl.to_string()])
            .stdout(log.reopen().unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start grpc-registrar");
        Self { child, port, log }
    }

    /// Waits until `/readyz` answers 200 (caches synced).
    pub async fn synced(&mut self) {
        let started = Instant::now();
        while http_get(self.port, "/readyz")
            .await
            .is_none_or(|(code, _)| code != 200)
        {
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(600),
                "the controller never became ready ({exited:?}, /readyz: {:?}):\n{}",
                http_get(self.port, "/readyz").await,
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A counter or gauge from `/metrics` (the first sample whose line starts with `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        metric(
            &http_get(self.port, "/metrics")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default(),
            prefix,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first sample line starting with `prefix` in a Prometheus text page.
pub fn metric(page: &str, prefix: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub use test_support::http_get;

/// (VmRSS, VmHWM) of a process in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User plus system CPU seconds a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the ')'. CLK_TCK is 100.
    (ticks(11) + ticks(12)) / 100.0
}

/// Keys under `prefix`.
pub async fn count(etcd: &mut etcd_client::Client, prefix: &str) -> i64 {
    test_support::registry::count(etcd, prefix).await
}

/// Creates Node `name` in `zone`: the endpointslice controller skips pods whose `nodeName`
/// names a Node it cannot find, and takes an endpoint's zone from its Node.
pub async fn node(client: &kube::Client, name: &str, zone: &str) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"topology.kubernetes.io/zone": zone}}}))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// Creates pod `name` labelled `app=<app>` on `node`, with container port `grpc` 50051; it is
/// not ready until its status is patched (see [`ready_status`]).
pub async fn pod_on(client: &kube::Client, ns: &str, name: &str, app: &str, node: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "greeter",
                "ports": [{"name": "grpc", "containerPort": 50051}]}]}}))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// Creates the Kubernetes Service `name` with port `grpc` 50051 (targetPort `grpc`): selecting
/// `app=<app>` (kube-controller-manager computes its EndpointSlices), or with `None` without a
/// selector and headless (its slices are made by hand; headless, so that hundreds of them do
/// not exhaust the plane's /24 of cluster IPs).
pub async fn kube_service(client: &kube::Client, ns: &str, name: &str, app: Option<&str>) {
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({"ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]});
    match app {
        Some(app) => spec["selector"] = json!({"app": app}),
        None => spec["clusterIP"] = json!("None"),
    }
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap(),
    )
    .await
    .unwrap();
}

/// Creates the GrpcService `name` publishing the EndpointSlices of the Service `service` on
/// its port `grpc`.
pub async fn service_ref(client: &kube::Client, ns: &str, name: &str, service: &str) {
    let api: Api<grpc_registrar::crd::GrpcService> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": name},
            "spec": {"serviceRef": {"name": service, "port": "grpc"}}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// Creates a hand-made EndpointSlice `name` of the Service `service` (port `grpc` 50051)
/// listing `ips`, each ready, on `node-1` in `zone-a`, as a selector-less Service's owner
/// would (no `targetRef`: the endpoints are not pods).
pub async fn endpoint_slice(
    client: &kube::Client,
    ns: &str,
    name: &str,
    service: &str,
    ips: &[String],
) {
    let api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| {
            json!({"addresses": [ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-1", "zone": "zone-a"})
        })
        .collect();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// How long a change may take to show on a bench watch before the run fails.
pub const WATCH_PATIENCE: Duration = Duration::from_secs(30);

/// Watches `api`, sending what `pick` reads from each changed object, stamped on arrival (for
/// latency figures split into hops).
/// Returns the watching task (to abort before the control plane goes) once its initial
/// listing is done.
pub async fn stamped_watch<K, T>(
    api: Api<K>,
    config: kube::runtime::watcher::Config,
    tx: tokio::sync::mpsc::UnboundedSender<(Instant, T)>,
    pick: impl Fn(&K) -> Option<T> + Send + 'static,
) -> AbortOnDrop
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    T: Send + 'static,
{
    let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listed = Some(listed_tx);
        let mut events = watcher(api, config).boxed();
        while let Some(event) = events.try_next().await.expect("a bench watch failed") {
            let at = Instant::now();
            match event {
                watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                    if let Some(value) = pick(&obj) {
                        let _ = tx.send((at, value));
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(listed) = listed.take() {
                        let _ = listed.send(());
                    }
                }
                watcher::Event::Init | watcher::Event::Delete(_) => {}
            }
        }
    });
    tokio::time::timeout(WATCH_PATIENCE, listed_rx)
        .await
        .expect("a bench watch did not list within 30 s")
        .expect("a bench watch ended before listing");
    AbortOnDrop(task)
}

/// A spawned task, aborted when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When the first event at or after `after` that satisfies `wanted` arrived.
pub async fn arrival<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, T)>,
    after: Instant,
    wanted: impl Fn(&T) -> bool,
) -> Instant {
    loop {
        let (at, value) = tokio::time::timeout(WATCH_PATIENCE, rx.recv())
            .await
            .expect("no change within 30 s")
            .expect("a bench watch ended");
        if at >= after && wanted(&value) {
            return at;
        }
    }
}

/// Runs `make(0..n)`, 32 at a time.
pub async fn each<F, Fut>(n: usize, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(0..n)
        .map(make)
        .buffer_unordered(32)
        .collect::<()>()
        .await;
}
