//! Prometheus metrics (prometheus-client), registered once and shared through an `Arc`.

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::CONDITIONS;

/// Every root-cause label a reconcile failure can carry (`metric_label()` of the controller's
/// and the registry's errors) besides the backends' own (a backend's failures carry its name):
/// with those, see [`failure_labels`], initialised to 0 so that rates and alerts see the series
/// at once.
pub const FAILURE_LABELS: [&str; 7] = [
    "timeout",
    "unreachable",
    "ownership_lost",
    "fenced",
    "invalid_spec",
    "kube",
    "missing_field",
];

/// Every root-cause label a reconcile failure can carry: each backend's name, then
/// [`FAILURE_LABELS`].
pub fn failure_labels() -> impl Iterator<Item = &'static str> {
    crate::crd::Backend::ALL
        .into_iter()
        .map(crate::crd::Backend::name)
        .chain(FAILURE_LABELS)
}

/// Labels of the reconcile failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The root cause's `metric_label()`.
    pub error: &'static str,
}

/// Labels of the backend error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendOpLabels {
    /// The backend's name.
    pub backend: &'static str,
    /// The failed operation, e.g. `txn`, `range`, `keepalive`, `grant`.
    pub op: &'static str,
}

/// Labels of the reachability gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The backend's name.
    pub backend: &'static str,
}

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: &'static str,
    /// The git commit, when the build set `GIT_COMMIT`.
    pub git_commit: &'static str,
}

/// The backend operations whose errors are counted, initialised to 0.
pub const BACKEND_OPS: [&str; 8] = [
    "read",
    "range",
    "txn",
    "put",
    "grant",
    "keepalive",
    "watch",
    "connect",
];

/// Labels of the registry request latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The backend's name.
    pub backend: &'static str,
    /// The request: `range`, `txn` or `read`.
    pub op: &'static str,
}

/// Labels of per-service gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The GrpcService namespace.
    pub namespace: String,
    /// The GrpcService name.
    pub name: String,
}

/// Labels of the per-service condition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// The GrpcService namespace.
    pub namespace: String,
    /// The GrpcService name.
    pub name: String,
    /// The condition type: one of [`crate::crd::CONDITIONS`].
    pub condition: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100µs .. ~13s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric the controller exports.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles run.
    pub reconciliations: Counter,
    /// Reconciles failed, by error kind.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub reconcile_duration: Histogram,
    /// Registry request latency in seconds, by backend and operation.
    pub request_duration: Family<OpLabels, Histogram>,
    /// Keys registered per service.
    pub registered_endpoints: Family<ServiceLabels, Gauge>,
    /// Endpoints the source yields per service (selected pods, or the Service's endpoints).
    pub selected_endpoints: Family<ServiceLabels, Gauge>,
    /// Of those, the ones whose readiness signal is on, per service.
    pub ready_endpoints: Family<ServiceLabels, Gauge>,
    /// 1 while the service's condition is True, else 0, per service and condition type, as the
    /// leader last computed it (a follower exports none, so no stale value outlives a failover).
    pub service_conditions: Family<ConditionLabels, Gauge>,
    /// 1 while the backend answers, 0 after a request or the lease keep-alive failed to reach it.
    pub backend_connected: Family<BackendLabels, Gauge>,
    /// Backend requests that failed, by operation.
    pub backend_errors: Family<BackendOpLabels, Counter>,
    /// Successful lease renewals.
    pub lease_keepalives: Counter,
    /// Failed or broken lease renewals.
    pub lease_keepalive_failures: Counter,
    /// Leases granted.
    pub lease_grants: Counter,
    /// Live leases adopted from the registry's record (a restart or a new leader), not granted.
    pub lease_adoptions: Counter,
    /// Leases found lost (expired or revoked) and replaced.
    pub lease_losses: Counter,
    /// Reconciles of every service after a lease loss (each re-puts its keys on the new lease).
    pub lease_replays: Counter,
    /// Seconds from this process seeing a selected pod's registrable state change (a watch
    /// event) to the registry commit that reflected it.
    pub propagation: Histogram,
    /// Seconds from a selected pod's Ready transition (or deletion) as Kubernetes recorded it to
    /// the commit: end to end, including the API server and watch delay, but with whole-second
    /// resolution (condition times have no fraction), so it over-reads by up to 1 s.
    pub transition_to_registry: Histogram,
    /// Status, finalizer or Event writes that failed (retried with backoff; the registry is
    /// not affected).
    pub status_write_failures: Counter,
    /// Seconds from an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` (when
    /// kube-controller-manager saw the pod change, as kube-proxy measures it) to the registry
    /// commit: end to end for `serviceRef` services, sub-second precision.
    pub trigger_to_registry: Histogram,
    /// Other live controllers writing this registry scope (should be 0: two writers of one
    /// scope without leader election rewrite each other's keys).
    pub other_writers: Gauge,
    /// 1 while this replica is the leader (or runs without leader election), else 0.
    pub leader: Gauge,
    /// Leadership changes seen by this replica.
    pub leader_transitions: Counter,
}

impl Default for Metrics {
    /// The metrics of a controller of the default backend.
    fn default() -> Self {
        Self::for_backend(crate::crd::Backend::default().name())
    }
}

impl Metrics {
    /// The metrics of a controller publishing into `backend` (its name): its
    /// backend series start at 0, and no other backend's series exist (an alert on
    /// `backend_connected == 0` must not fire for a backend not in use).
    #[must_use]
    #[allow(clippy::too_many_lines)]
    pub fn for_backend(backend: &'static str) -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("grpc_registrar");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                git_commit: option_env!("GIT_COMMIT").unwrap_or("unknown"),
            })
            .set(1);
        registry.register("build_info", "The running build (always 1)", build_info);
        let reconciliations = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        for error in failure_labels() {
            drop(failures.get_or_create(&ErrorLabels { error }));
        }
        let reconcile_duration = latency_histogram();
        let request_duration = Family::<OpLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let registered_endpoints = Family::<ServiceLabels, Gauge>::default();
        let selected_endpoints = Family::<ServiceLabels, Gauge>::default();
        let ready_endpoints = Family::<ServiceLabels, Gauge>::default();
        let service_conditions = Family::<ConditionLabels, Gauge>::default();
        let backend_connected = Family::<BackendLabels, Gauge>::default();
        let backend_errors = Family::<BackendOpLabels, Counter>::default();
        for op in BACKEND_OPS {
            drop(backend_errors.get_or_create(&BackendOpLabels { backend, op }));
        }
        drop(backend_connected.get_or_create(&BackendLabels { backend }));
        let lease_keepalives = Counter::default();
        let lease_keepalive_failures = Counter::default();
        let lease_grants = Counter::default();
        let lease_adoptions = Counter::default();
        let lease_losses = Counter::default();
        let lease_replays = Counter::default();
        let propagation = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let transition_to_registry = Histogram::new(exponential_buckets(0.25, 2.0, 10));
        registry.register(
            "propagation_seconds",
            "From this controller seeing a readiness change (a pod or EndpointSlice watch event) to the registry commit reflecting it",
            propagation.clone(),
        );
        registry.register(
            "transition_to_registry_seconds",
            "From a pod's Ready transition time as Kubernetes recorded it (whole seconds) to the registry commit",
            transition_to_registry.clone(),
        );
        let trigger_to_registry = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "trigger_to_registry_seconds",
            "From an EndpointSlice's last-change-trigger-time (kube-controller-manager saw the pod change) to the registry commit",
            trigger_to_registry.clone(),
        );
        let other_writers = Gauge::default();
        registry.register(
            "other_writers",
            "Other live controllers writing this registry scope (the same cluster name) besides this one; should be 0",
            other_writers.clone(),
        );
        let status_write_failures = Counter::default();
        registry.register(
            "status_write_failures",
            "Status, finalizer or Event writes to the API server that failed and are retried (the registry is not affected)",
            status_write_failures.clone(),
        );
        let leader = Gauge::default();
        leader.set(1);
        let leader_transitions = Counter::default();
        registry.register(
            "leader",
            "1 while this replica is the leader, else 0",
            leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Leadership changes seen by this replica",
            leader_transitions.clone(),
        );
        registry.register("reconciliations", "Reconciles run", reconciliations.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles failed, by root cause",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_duration.clone(),
        );
        registry.register(
            "registry_request_duration_seconds",
            "Registry request latency, by backend and operation",
            request_duration.clone(),
        );
        registry.register(
            "registered_endpoints",
            "Keys registered per GrpcService",
            registered_endpoints.clone(),
        );
        registry.register(
            "selected_endpoints",
            "Endpoints the source yields (pods the selector matches, or the endpoints of the Service serviceRef names), per GrpcService",
            selected_endpoints.clone(),
        );
        registry.register(
            "ready_endpoints",
            "Endpoints from the source whose readiness signal is on (Ready pods, ready EndpointSlice endpoints), per GrpcService",
            ready_endpoints.clone(),
        );
        registry.register(
            "service_condition",
            "1 while a GrpcService's condition (Ready, Conflict, InvalidSpec, BackendUnavailable) is True, else 0, as the leader last set it",
            service_conditions.clone(),
        );
        registry.register(
            "backend_connected",
            "1 while the registry backend answers, 0 after a request to it failed to connect",
            backend_connected.clone(),
        );
        registry.register(
            "backend_errors",
            "Registry backend requests that failed, by operation",
            backend_errors.clone(),
        );
        registry.register(
            "lease_keepalives",
            "Successful lease renewals",
            lease_keepalives.clone(),
        );
        registry.register(
            "lease_keepalive_failures",
            "Failed or broken lease renewals",
            lease_keepalive_failures.clone(),
        );
        registry.register("lease_grants", "Leases granted", lease_grants.clone());
        registry.register(
            "lease_adoptions",
            "Live leases adopted from the registry's record (after a restart or a failover) instead of granted",
            lease_adoptions.clone(),
        );
        registry.register(
            "lease_losses",
            "Leases lost and replaced",
            lease_losses.clone(),
        );
        registry.register(
            "lease_replays",
            "Reconciles of every service after a lease loss (which re-put every owned key)",
            lease_replays.clone(),
        );
        Self {
            registry: root,
            reconciliations,
            failures,
            reconcile_duration,
            request_duration,
            registered_endpoints,
            selected_endpoints,
            ready_endpoints,
            service_conditions,
            backend_connected,
            backend_errors,
            lease_keepalives,
            lease_keepalive_failures,
            lease_grants,
            lease_adoptions,
            lease_losses,
            lease_replays,
            propagation,
            transition_to_registry,
            status_write_failures,
            trigger_to_registry,
            other_writers,
            leader,
            leader_transitions,
        }
    }
}

impl Metrics {
    /// Starts a reconcile: counts it and returns a timer that records its duration on drop.
    #[must_use]
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            started: Instant::now(),
            histogram: &self.reconcile_duration,
        }
    }

    /// Counts a failed reconcile by its root cause's label.
    pub fn reconcile_failed(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }

    /// Records a request to `backend` that started at `started`.
    pub fn observe_request(&self, backend: &'static str, op: &'static str, started: Instant) {
        self.request_duration
            .get_or_create(&OpLabels { backend, op })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records a service's counts after a sync.
    pub fn observe_service(
        &self,
        namespace: &str,
        name: &str,
        desired: &crate::desired::Desired,
        registered: usize,
    ) {
        let labels = ServiceLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.registered_endpoints
            .get_or_create(&labels)
            .set(n(registered));
        self.selected_endpoints
            .get_or_create(&labels)
            .set(n(desired.selected));
        self.ready_endpoints
            .get_or_create(&labels)
            .set(n(desired.ready));
    }

    /// Records a service's conditions as its status now has them: 1 for True, 0 otherwise.
    pub fn observe_conditions(&self, namespace: &str, name: &str, conditions: &[Condition]) {
        for condition in CONDITIONS {
            let on = conditions
                .iter()
                .any(|c| c.type_ == condition && c.status == "True");
            self.service_conditions
                .get_or_create(&ConditionLabels {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    condition,
                })
                .set(i64::from(on));
        }
    }

    /// Drops a deleted service's series.
    pub fn forget_service(&self, namespace: &str, name: &str) {
        let labels = ServiceLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.registered_endpoints.remove(&labels);
        self.selected_endpoints.remove(&labels);
        self.ready_endpoints.remove(&labels);
        for condition in CONDITIONS {
            self.service_conditions.remove(&ConditionLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                condition,
            });
        }
    }

    /// Records the outcome of a backend request: a failure is counted by operation, and one
    /// that could not reach the backend marks it disconnected; a success marks it connected.
    pub fn backend_result(&self, backend: &'static str, op: &'static str, ok: bool, reached: bool) {
        if !ok {
            self.backend_errors
                .get_or_create(&BackendOpLabels { backend, op })
                .inc();
        }
        self.backend_connected
            .get_or_create(&BackendLabels { backend })
            .set(i64::from(reached));
    }

    /// Whether the last request to `backend` reached it.
    #[must_use]
    pub fn backend_up(&self, backend: &'static str) -> bool {
        self.backend_connected
            .get_or_create(&BackendLabels { backend })
            .get()
            == 1
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        let value = i64::from(leading);
        if self.leader.set(value) != value {
            self.leader_transitions.inc();
        }
        if !leading {
            // The new leader reports conditions now; a value kept here would go stale.
            self.service_conditions.clear();
        }
    }

    /// Encodes every metric in the text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer<'a> {
    started: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`), read from `/proc/self` on each scrape; nothing on other
/// systems.
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    /// (cpu seconds, virtual bytes, start time in seconds since the epoch) from `/proc`.
    fn stat() -> Option<(f64, f64, f64)> {
        // The kernel reports times in USER_HZ, which is 100 on every Linux ABI.
        const TICKS: f64 = 100.0;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command (which may contain spaces), from field 3 (state) on.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
        let cpu = (ticks(11)? + ticks(12)?) / TICKS;
        let start_ticks = ticks(19)?;
        let vsize = ticks(20)?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        Some((cpu, vsize, boot + start_ticks / TICKS))
    }

    fn rss_bytes() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<f64>()
            .ok()?;
        Some(kb * 1024.0)
    }

    fn fds() -> Option<(f64, f64)> {
        #[allow(clippy::cast_precision_loss)]
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse::<f64>()
            .ok()?;
        Some((open, max))
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut gauge = |name: &str, help: &str, value: f64| {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)
        };
        if let Some((_, vsize, start)) = Self::stat() {
            gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize,
            )?;
            gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start,
            )?;
        }
        if let Some(rss) = Self::rss_bytes() {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss,
            )?;
        }
        if let Some((open, max)) = Self::fds() {
            gauge("process_open_fds", "Number of open file descriptors", open)?;
            gauge(
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        if let Some((cpu, _, _)) = Self::stat() {
            let counter = ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_build_info_process_metrics_and_zeroed_backend_series() {
        let page = Metrics::default().encode();
        let backend = crate::crd::Backend::default().name();
        for needle in [
            "grpc_registrar_build_info{version=\"".to_owned(),
            "process_cpu_seconds_total ".to_owned(),
            "process_resident_memory_bytes ".to_owned(),
            "process_open_fds ".to_owned(),
            "process_start_time_seconds ".to_owned(),
            format!("grpc_registrar_backend_connected{{backend=\"{backend}\"}} 0"),
            format!("grpc_registrar_backend_errors_total{{backend=\"{backend}\",op=\"txn\"}} 0"),
        ] {
            assert!(page.contains(&needle), "{needle} missing:\n{page}");
        }
    }

    #[test]
    fn each_backends_controller_has_only_its_backend_series_so_no_other_alert_fires() {
        for backend in crate::crd::Backend::ALL.map(crate::crd::Backend::name) {
            let page = Metrics::for_backend(backend).encode();
            assert!(
                page.contains(&format!(
                    "grpc_registrar_backend_connected{{backend=\"{backend}\"}} 0"
                )),
                "{page}"
            );
            for other in crate::crd::Backend::ALL.map(crate::crd::Backend::name) {
                assert!(
                    other == backend || !page.contains(&format!("backend=\"{other}\"")),
                    "{page}"
                );
            }
        }
    }

    /// Every `grpc_registrar_*` name in the files under `dir` (recursively).
    fn names_used_in(dir: &std::path::Path, names: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                names_used_in(&path, names);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (at, _) in text.match_indices("grpc_registrar_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.ends_with('_') {
                    names.insert(name);
                }
            }
        }
    }

    #[test]
    fn the_page_lists_every_family_the_chart_and_the_docs_use() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut names = std::collections::BTreeSet::new();
        names_used_in(&root.join("charts"), &mut names);
        names_used_in(&root.join("docs"), &mut names);
        assert!(names.len() > 10, "found only {names:?}");
        // A family without series is not on the page at all: give each one a series.
        let metrics = Metrics::default();
        metrics.observe_service("ns", "svc", &crate::desired::Desired::default(), 1);
        metrics.observe_conditions("ns", "svc", &[]);
        metrics.observe_request("etcd", "txn", Instant::now());
        let page = metrics.encode();
        for name in names {
            let family = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                page.contains(&format!("# TYPE {family} ")),
                "{name} is used by the chart or the docs but {family} is not on the page:\n{page}"
            );
        }
    }

    /// Prints the page without the process metrics' values (they change), to compare two
    /// builds: `cargo test --lib print_the_page -- --ignored --nocapture`.
    #[test]
    #[ignore = "a tool, not a check"]
    fn print_the_page() {
        for line in Metrics::default().encode().lines() {
            if !line.starts_with("process_") {
                println!("PAGE {line}");
            }
        }
    }

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: "Why".to_owned(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    #[test]
    fn a_service_stuck_in_invalid_spec_shows_on_the_condition_gauge_until_a_follower_takes_over() {
        let m = Metrics::default();
        m.observe_conditions(
            "ns",
            "svc",
            &[
                condition("Ready", "False"),
                condition("InvalidSpec", "True"),
            ],
        );
        let page = m.encode();
        for (condition, value) in [
            ("Ready", 0),
            ("Conflict", 0),
            ("InvalidSpec", 1),
            ("BackendUnavailable", 0),
        ] {
            let series = format!(
                "grpc_registrar_service_condition{{namespace=\"ns\",name=\"svc\",condition=\"{condition}\"}} {value}\n"
            );
            assert!(page.contains(&series), "{series} missing:\n{page}");
        }
        m.set_leader(false);
        assert!(
            !m.encode().contains("name=\"svc\""),
            "a follower exports no conditions"
        );
    }

    #[test]
    fn a_deleted_service_leaves_no_series() {
        let m = Metrics::default();
        m.observe_service("ns", "svc", &crate::desired::Desired::default(), 2);
        m.observe_conditions("ns", "svc", &[condition("Ready", "True")]);
        assert!(
            m.encode()
                .contains("grpc_registrar_registered_endpoints{namespace=\"ns\",name=\"svc\"} 2")
        );
        m.forget_service("ns", "svc");
        assert!(!m.encode().contains("name=\"svc\""));
    }
}
