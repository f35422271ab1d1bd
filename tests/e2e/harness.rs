//! Per-test environment on the shared control plane: a namespace, a registry etcd, and the
//! controller running in-process against both.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use etcd_client::GetOptions;
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::crd::GrpcService;
use grpc_registrar::desired::Policy;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::{ControlPlane, EtcdServer, TcpProxy};
use tokio::sync::watch;

/// Waits for `check` with the e2e deadline; no sleeps as synchronisation.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    test_support::eventually(what, Duration::from_secs(30), check).await;
}

/// The control plane's client configuration, for a controller client the test adjusts.
async fn client_config(plane: &ControlPlane) -> kube::Config {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig()).unwrap();
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap()
}

/// One test's world.
pub struct Env {
    pub client: kube::Client,
    pub ns: String,
    pub etcd: EtcdServer,
    /// Between the controller and `etcd`, when partitionable.
    pub proxy: Option<TcpProxy>,
    /// The in-process controller's metrics.
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    controller: tokio::task::JoinHandle<()>,
}

impl Env {
    /// Creates namespace `ns`, a registry etcd, and starts the controller watching `ns` only.
    pub async fn new(plane: Arc<ControlPlane>, ns: &str) -> Self {
        Self::build(plane, ns, false, None, Policy::default(), true, None).await
    }

    /// As [`Env::new`], with the controller checking targets against `policy`.
    pub async fn with_policy(plane: Arc<ControlPlane>, ns: &str, policy: Policy) -> Self {
        Self::build(plane, ns, false, None, policy, true, None).await
    }

    /// As [`Env::new`], with the controller reaching the API server through a proxy the test can
    /// cut (every watch breaks; the test's own client goes direct).
    pub async fn behind_api_proxy(plane: Arc<ControlPlane>, ns: &str) -> (Self, TcpProxy) {
        let upstream = plane.url().trim_start_matches("https://").parse().unwrap();
        let proxy = TcpProxy::start(upstream).await;
        let mut config = client_config(&plane).await;
        config.cluster_url = format!("https://{}", proxy.addr()).parse().unwrap();
        let client = kube::Client::try_from(config).unwrap();
        (
            Self::build(
                plane,
                ns,
                false,
                Some(client),
                Policy::default(),
                true,
                None,
            )
            .await,
            proxy,
        )
    }

    /// As [`Env::new`], with the controller acting as the user `user` (impersonated), whose
    /// permissions the test grants itself.
    pub async fn as_user(plane: Arc<ControlPlane>, ns: &str, user: &str) -> Self {
        let mut config = client_config(&plane).await;
        config.auth_info.impersonate = Some(user.to_owned());
        let client = kube::Client::try_from(config).unwrap();
        Self::build(
            plane,
            ns,
            false,
            Some(client),
            Policy::default(),
            true,
            None,
        )
        .await
    }

    /// As [`Env::new`], with the controller reaching etcd through a proxy the test can cut.
    pub async fn partitionable(plane: Arc<ControlPlane>, ns: &str) -> Self {
        Self::build(plane, ns, true, None, Policy::default(), true, None).await
    }

    /// A namespace and a registry etcd only; the test runs the controller itself.
    pub async fn without_controller(plane: Arc<ControlPlane>, ns: &str) -> Self {
        Self::build(plane, ns, false, None, Policy::default(), false, None).await
    }

    /// As [`Env::with_policy`], with the controller publishing into `backend` (e.g. Consul)
    /// instead of the registry etcd (which is still started, unused).
    pub async fn with_backend(
        plane: Arc<ControlPlane>,
        ns: &str,
        policy: Policy,
        backend: Arc<dyn grpc_registrar::registry::Backend>,
    ) -> Self {
        Self::build(plane, ns, false, None, policy, true, Some(backend)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        plane: Arc<ControlPlane>,
        ns: &str,
        proxied: bool,
        controller_client: Option<kube::Client>,
        policy: Policy,
        start: bool,
        backend: Option<Arc<dyn grpc_registrar::registry::Backend>>,
    ) -> Self {
        let client = plane.client().await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        // A namespace that exists already is a test's second controller on it (an upgrade).
        match namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            created => {
                created.expect("failed to create namespace");
            }
        }
        let etcd = EtcdServer::start().await;
        let proxy = if proxied {
            let upstream = etcd
                .endpoint()
                .trim_start_matches("http://")
                .parse()
                .unwrap();
            Some(TcpProxy::start(upstream).await)
        } else {
            None
        };
        let endpoint = proxy
            .as_ref()
            .map_or_else(|| etcd.endpoint(), TcpProxy::url);
        let metrics = Arc::new(Metrics::default());
        let config = EtcdConfig {
            default_ttl: Duration::from_secs(10),
            op_timeout: Duration::from_secs(2),
            ..EtcdConfig::new(vec![endpoint])
        };
        let registry: Arc<dyn grpc_registrar::registry::Backend> = match backend {
            Some(backend) => backend,
            None => Arc::new(
                EtcdRegistry::connect(config, metrics.clone())
                    .await
                    .unwrap(),
            ),
        };
        let (stop, mut stopped) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(false));
        let controller = tokio::spawn(controller::run(
            controller_client.unwrap_or_else(|| client.clone()),
            registry,
            Scope {
                namespace: Some(ns.to_owned()),
            },
            policy,
            metrics.clone(),
            ready.clone(),
            grpc_registrar::leader::always_leader(),
            grpc_registrar::controller::Tuning::default(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        // The test's objects are changes the controller sees through its watches, as in a
        // running cluster: it has listed before the first one is made.
        if start {
            eventually("the controller's caches have synced", || async {
                ready.load(std::sync::atomic::Ordering::Relaxed)
            })
            .await;
        } else {
            let _ = stop.send(true);
        }
        Self {
            client,
            ns: ns.to_owned(),
            etcd,
            proxy,
            metrics,
            stop,
            controller,
        }
    }

    pub fn services(&self) -> Api<GrpcService> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a GrpcService from a JSON spec.
    pub async fn service(&self, name: &str, spec: serde_json::Value) -> GrpcService {
        let svc: GrpcService = serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1",
            "kind": "GrpcService",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        }))
        .unwrap();
        self.services()
            .create(&PostParams::default(), &svc)
            .await
            .expect("failed to create GrpcService")
    }

    /// Creates a pod labelled `labels` with a container port `grpc` = `port`. No kubelet runs, so
    /// it stays Pending until [`Env::set_ready`] patches its status.
    pub async fn pod(&self, name: &str, labels: serde_json::Value, port: u16) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": self.ns, "labels": labels},
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "server", "image": "greeter:e2e", "ports": [{"name": "grpc", "containerPort": port}]}]
            }
        }))
        .unwrap();
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("failed to create pod")
    }

    /// Sets phase Running, the pod IP and the Ready condition through the status subresource.
    pub async fn set_ready(&self, name: &str, ip: &str, ready: bool) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}]
        }});
        self.pods()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .expect("failed to patch pod status");
    }

    /// Creates a headless Service `name` with one port `grpc` (50051, targetPort `grpc`), selecting
    /// `selector` when given (kube-controller-manager then computes its EndpointSlices from the
    /// pods), or none (its slices are made by hand, as for VMs).
    pub async fn k8s_service(&self, name: &str, selector: Option<serde_json::Value>) {
        let mut spec = json!({
            "clusterIP": "None",
            "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"}],
        });
        if let Some(selector) = selector {
            spec["selector"] = selector;
        }
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &svc)
            .await
            .expect("failed to create Service");
    }

    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates or replaces a hand-made EndpointSlice `name` of Service `service`: `address_type`
    /// IPv4, IPv6 or FQDN, port `grpc` = 50051, one endpoint per `(address, ready)`.
    pub async fn put_slice(
        &self,
        name: &str,
        service: &str,
        address_type: &str,
        endpoints: &[(&str, bool)],
    ) {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": self.ns,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "e2e.grpc-registrar.io"}},
            "addressType": address_type,
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
            "endpoints": endpoints.iter().map(|(address, ready)| json!({
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
            })).collect::<Vec<_>>(),
        });
        self.slices()
            .patch(
                name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(slice),
            )
            .await
            .expect("failed to apply EndpointSlice");
    }

    /// The EndpointSlices of `service`.
    pub async fn slices_of(&self, service: &str) -> Vec<EndpointSlice> {
        self.slices()
            .list(
                &kube::api::ListParams::default()
                    .labels(&format!("kubernetes.io/service-name={service}")),
            )
            .await
            .expect("failed to list EndpointSlices")
            .items
    }

    /// Key -> value under `prefix` in the registry etcd.
    pub async fn keys_under(&self, prefix: &str) -> BTreeMap<String, String> {
        test_support::registry::dump(&mut self.etcd.client().await, prefix)
            .await
            .into_iter()
            .map(|(k, stored)| (k, stored.text()))
            .collect()
    }

    /// Key -> value under `services/<ns>/` in the registry etcd.
    pub async fn keys(&self) -> BTreeMap<String, String> {
        self.keys_under(&format!("services/{}/", self.ns)).await
    }

    /// The ownership records in this test's registry etcd.
    pub async fn owner_records(&self) -> usize {
        self.etcd
            .client()
            .await
            .get(
                "grpc-registrar/owners/",
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap()
            .kvs()
            .len()
    }

    /// Waits until the registry holds exactly these keys (relative to `services/<ns>/`).
    pub async fn expect_keys(&self, what: &str, want: &[&str]) {
        let want: Vec<String> = want
            .iter()
            .map(|k| format!("services/{}/{k}", self.ns))
            .collect();
        eventually(what, || async {
            self.keys().await.into_keys().collect::<Vec<_>>() == want
        })
        .await;
    }

    /// The current status of a GrpcService.
    pub async fn status(&self, name: &str) -> serde_json::Value {
        let svc = self.services().get(name).await.unwrap();
        serde_json::to_value(svc.status).unwrap()
    }

    /// The finalizers of a GrpcService (none: empty).
    pub async fn finalizers(&self, name: &str) -> Vec<String> {
        let svc = self.services().get(name).await.unwrap();
        svc.metadata.finalizers.unwrap_or_default()
    }

    /// Condition `type_` of a GrpcService (null when absent).
    pub async fn condition(&self, name: &str, type_: &str) -> serde_json::Value {
        self.status(name).await["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or_default()
    }

    /// Whether condition `type_` of a GrpcService has status `value`.
    pub async fn condition_is(&self, name: &str, type_: &str, value: &str) -> bool {
        self.condition(name, type_).await["status"] == value
    }

    /// A watch on this test's registry prefix, straight to etcd (not through any partition).
    pub async fn watch_registry(&self) -> etcd_client::WatchStream {
        self.etcd
            .client()
            .await
            .watch(
                format!("services/{}/", self.ns),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap()
    }

    /// Stops the controller, as a graceful shutdown would.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.controller).await;
    }
}

/// DELETE events a watching client has received, reading until the watch is quiet for 500 ms.
pub async fn deletes_seen(watch: &mut etcd_client::WatchStream) -> usize {
    test_support::registry::deletes_seen(watch, Duration::from_millis(500)).await
}

/// The leases the keys under this test's registry prefix are attached to.
pub async fn key_leases(env: &Env) -> std::collections::BTreeSet<i64> {
    test_support::registry::dump(
        &mut env.etcd.client().await,
        &format!("services/{}/", env.ns),
    )
    .await
    .into_values()
    .map(|stored| stored.lease)
    .collect()
}

/// How to run the real `grpc-registrar` binary against the test's control plane.
pub struct ControllerBuilder {
    command: std::process::Command,
    log: Option<std::path::PathBuf>,
    metrics_port: u16,
}

impl ControllerBuilder {
    /// One replica of a leader-elected pair, identified as `identity` in the Lease (plus a random
    /// suffix), with short election timings: lease 2 s, renew deadline 1.5 s, retry 250 ms.
    pub fn replica(mut self, identity: &str) -> Self {
        self.command
            .env("POD_NAME", identity)
            .args(["--leader-elect", "true"])
            .args(["--leader-lease-duration", "2s"])
            .args(["--leader-renew-deadline", "1500ms"])
            .args(["--leader-retry-period", "250ms"]);
        self
    }

    /// Keeps the process's log (warnings and up; the binary logs to stdout) in `path`.
    pub fn log_to(mut self, path: std::path::PathBuf) -> Self {
        self.log = Some(path);
        self
    }

    /// Appends the process's whole output (its log on stdout, and stderr, where a panic goes)
    /// to `path`, so that the log survives a restart of the process. (Used by the soak, which
    /// shares this file.)
    #[allow(dead_code)]
    pub fn log_all_to(mut self, path: std::path::PathBuf) -> Self {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)
            .expect("failed to open the controller log");
        self.command
            .stderr(file.try_clone().expect("failed to clone the log handle"))
            .stdout(file);
        self
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Adds command-line arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.command.args(args);
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on this loopback port (default: any).
    pub fn metrics_port(mut self, port: u16) -> Self {
        self.metrics_port = port;
        self
    }

    pub fn start(mut self) -> ControllerProcess {
        self.command.args([
            "--metrics-addr",
            &format!("127.0.0.1:{}", self.metrics_port),
        ]);
        if let Some(path) = &self.log {
            let file = std::fs::File::create(path).expect("failed to create the controller log");
            self.command.stdout(file);
        }
        let child = self
            .command
            .spawn()
            .expect("failed to start the grpc-registrar binary");
        ControllerProcess(child)
    }
}

/// The real `grpc-registrar` binary as its own process; SIGKILLed on drop.
pub struct ControllerProcess(std::process::Child);

impl ControllerProcess {
    /// The binary watching `ns`, writing to `etcd` with lease TTL `ttl` seconds.
    pub fn builder(plane: &ControlPlane, etcd: &str, ns: &str, ttl: u32) -> ControllerBuilder {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_grpc-registrar"));
        command
            .env("KUBECONFIG", plane.kubeconfig())
            .env("RUST_LOG", "warn")
            .env("POD_NAMESPACE", ns)
            .args(["--etcd-endpoints", etcd, "--namespace", ns])
            .args(["--lease-ttl", &ttl.to_string()])
            .stdout(std::process::Stdio::null());
        ControllerBuilder {
            command,
            log: None,
            metrics_port: 0,
        }
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, and wait for the graceful exit.
    pub fn terminate(&mut self) {
        assert!(self.signal("TERM"), "failed to send SIGTERM");
        let _ = self.0.wait();
    }

    /// SIGTERM without waiting.
    pub fn sigterm(&self) {
        assert!(self.signal("TERM"), "failed to send SIGTERM");
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// The exit status if the process has exited, without waiting. (Used by the soak.)
    #[allow(dead_code)]
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    /// The process id. (Used by the soak.)
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGSTOP: the process freezes mid-flight, as under a long GC pause or a stalled node.
    pub fn pause(&self) {
        assert!(self.signal("STOP"), "failed to send SIGSTOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        assert!(self.signal("CONT"), "failed to send SIGCONT");
    }

    fn signal(&self, signal: &str) -> bool {
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// The holder of the default leader-election Lease in `ns`, without the random suffix.
pub async fn leader(client: &kube::Client, ns: &str) -> Option<String> {
    leader_of(client, ns, "grpc-registrar").await
}

/// The holder of Lease `name` in `ns`, without the random suffix.
pub async fn leader_of(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), ns);
    let lease = leases.get_opt(name).await.ok()??;
    let holder = lease.spec?.holder_identity?;
    Some(
        holder
            .rsplit_once('_')
            .map_or(holder.clone(), |(base, _)| base.to_owned()),
    )
}

/// (type, reason, note) of every Event on GrpcService `name`, oldest first.
pub async fn events_of(env: &Env, name: &str) -> Vec<(String, String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let mut list = api.list(&Default::default()).await.unwrap().items;
    list.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    list.into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

pub async fn has_event(env: &Env, name: &str, type_: &str, reason: &str, note: &str) -> bool {
    events_of(env, name)
        .await
        .iter()
        .any(|(t, r, n)| t == type_ && r == reason && n.contains(note))
}

pub use test_support::http_get;
