//! Prometheus metrics (prometheus-client), registered once and shared through an `Arc`.
//!
//! Each group of metrics is a small struct with its own `register()` (one file each, named for
//! what it measures), and [`Metrics`] composes them. The page lists families in registration
//! order, and the page is a contract (the chart's alerts and dashboard, the docs), so
//! [`Metrics::for_backend`] registers the groups in the order the page has always had.

mod backend;
mod lease;
mod process;
mod propagation;
mod reconcile;
mod services;
mod writers;

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use backend::{BACKEND_OPS, BackendLabels, BackendOpLabels, OpLabels, Reachability, Requests};
pub use lease::Lease;
pub use propagation::Propagation;
pub use reconcile::{ErrorLabels, FAILURE_LABELS, Reconcile, ReconcileTimer, failure_labels};
pub use services::{ConditionLabels, ServiceLabels, Services};
pub use writers::Writers;

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: &'static str,
    /// The git commit, when the build set `GIT_COMMIT`.
    pub git_commit: &'static str,
}

/// The latency histogram of reconciles and registry requests: 100µs .. ~13s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Registers `build_info`: 1, labelled with the running build.
fn register_build_info(registry: &mut Registry) {
    let build_info = Family::<BuildLabels, Gauge>::default();
    build_info
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            git_commit: option_env!("GIT_COMMIT").unwrap_or("unknown"),
        })
        .set(1);
    registry.register("build_info", "The running build (always 1)", build_info);
}

/// Every metric the controller exports, by group.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles run, failed and their duration.
    pub reconcile: Reconcile,
    /// Registry request latency.
    pub requests: Requests,
    /// Per-service endpoint counts and conditions.
    pub services: Services,
    /// Whether the backend answers, and its failed requests.
    pub reachability: Reachability,
    /// Lease renewals, grants, adoptions, losses and replays.
    pub lease: Lease,
    /// From a change to its registry commit.
    pub to_registry: Propagation,
    /// Leadership, other writers of the scope, failed API server writes.
    pub writers: Writers,
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
    pub fn for_backend(backend: &'static str) -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("grpc_registrar");
        register_build_info(registry);
        let to_registry = Propagation::register(registry);
        let writers = Writers::register(registry);
        let reconcile = Reconcile::register(registry);
        let requests = Requests::register(registry);
        let services = Services::register(registry);
        let reachability = Reachability::register(registry, backend);
        let lease = Lease::register(registry);
        Self {
            registry: root,
            reconcile,
            requests,
            services,
            reachability,
            lease,
            to_registry,
            writers,
        }
    }

    /// Starts a reconcile: counts it and returns a timer that records its duration on drop.
    #[must_use]
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconcile.started()
    }

    /// Counts a failed reconcile by its root cause's label.
    pub fn reconcile_failed(&self, error: &'static str) {
        self.reconcile.failed(error);
    }

    /// Records a request to `backend` that started at `started`.
    pub fn observe_request(&self, backend: &'static str, op: &'static str, started: Instant) {
        self.requests.observe(backend, op, started);
    }

    /// Records a service's counts after a sync.
    pub fn observe_service(
        &self,
        namespace: &str,
        name: &str,
        desired: &crate::desired::Desired,
        registered: usize,
    ) {
        self.services.observe(namespace, name, desired, registered);
    }

    /// Records a service's conditions as its status now has them: 1 for True, 0 otherwise.
    pub fn observe_conditions(&self, namespace: &str, name: &str, conditions: &[Condition]) {
        self.services
            .observe_conditions(namespace, name, conditions);
    }

    /// Drops a deleted service's series.
    pub fn forget_service(&self, namespace: &str, name: &str) {
        self.services.forget(namespace, name);
    }

    /// Records the outcome of a backend request: a failure is counted by operation, and one
    /// that could not reach the backend marks it disconnected; a success marks it connected.
    pub fn backend_result(&self, backend: &'static str, op: &'static str, ok: bool, reached: bool) {
        self.reachability.result(backend, op, ok, reached);
    }

    /// Whether the last request to `backend` reached it.
    #[must_use]
    pub fn backend_up(&self, backend: &'static str) -> bool {
        self.reachability.up(backend)
    }

    /// Records whether this replica leads; a follower drops the service conditions (the new
    /// leader reports them now; a value kept here would go stale).
    pub fn set_leader(&self, leading: bool) {
        self.writers.set_leader(leading);
        if !leading {
            self.services.conditions.clear();
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
    fn a_reconcile_counts_as_running_until_its_timer_drops_however_it_ends() {
        let metrics = Metrics::default();
        let first = metrics.reconcile_started();
        let second = metrics.reconcile_started();
        assert_eq!(metrics.reconcile.running(), 2);
        assert!(
            metrics
                .encode()
                .contains("grpc_registrar_reconciles_in_flight 2")
        );
        drop(first);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _third = metrics.reconcile_started();
            panic!("a reconcile that panics");
        }));
        assert!(unwound.is_err());
        drop(second);
        assert_eq!(metrics.reconcile.running(), 0);
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
        metrics.observe_request(crate::crd::Backend::default().name(), "txn", Instant::now());
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
