//! Prometheus metrics (prometheus-client), registered once and shared through an `Arc`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every root-cause label a reconcile failure can carry (`metric_label()` of the controller's
/// and the registry's errors), initialised to 0 so that rates and alerts see the series at once.
pub const FAILURE_LABELS: [&str; 7] = [
    "etcd",
    "timeout",
    "ownership_lost",
    "fenced",
    "invalid_spec",
    "kube",
    "missing_field",
];

/// Labels of the reconcile failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The root cause's `metric_label()`.
    pub error: &'static str,
}

/// Labels of the etcd latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `range` or `txn`.
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
    /// etcd request latency in seconds, by operation.
    pub etcd_duration: Family<OpLabels, Histogram>,
    /// Keys registered per service.
    pub registered_endpoints: Family<ServiceLabels, Gauge>,
    /// Successful lease renewals.
    pub lease_keepalives: Counter,
    /// Failed or broken lease renewals.
    pub lease_keepalive_failures: Counter,
    /// Leases granted.
    pub lease_grants: Counter,
    /// Leases found lost (expired or revoked) and replaced.
    pub lease_losses: Counter,
    /// Reconciles of every service after a lease loss (each re-puts its keys on the new lease).
    pub lease_replays: Counter,
    /// Seconds from a selected pod's Ready transition (or deletion) to the etcd commit that
    /// reflected it. Kubernetes stores condition times in whole seconds, so this over-reads by
    /// up to 1 s; the benches measure the same path with millisecond clocks.
    pub propagation: Histogram,
    /// 1 while this replica is the leader (or runs without leader election), else 0.
    pub leader: Gauge,
    /// Leadership changes seen by this replica.
    pub leader_transitions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("grpc_registrar");
        let reconciliations = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        for error in FAILURE_LABELS {
            drop(failures.get_or_create(&ErrorLabels { error }));
        }
        let reconcile_duration = latency_histogram();
        let etcd_duration = Family::<OpLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let registered_endpoints = Family::<ServiceLabels, Gauge>::default();
        let lease_keepalives = Counter::default();
        let lease_keepalive_failures = Counter::default();
        let lease_grants = Counter::default();
        let lease_losses = Counter::default();
        let lease_replays = Counter::default();
        let propagation = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "propagation_seconds",
            "From a pod's Ready transition (or deletion) to the etcd commit reflecting it",
            propagation.clone(),
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
            "Reconciles failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_duration.clone(),
        );
        registry.register(
            "etcd_request_duration_seconds",
            "etcd request latency",
            etcd_duration.clone(),
        );
        registry.register(
            "registered_endpoints",
            "Keys registered per GrpcService",
            registered_endpoints.clone(),
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
            registry,
            reconciliations,
            failures,
            reconcile_duration,
            etcd_duration,
            registered_endpoints,
            lease_keepalives,
            lease_keepalive_failures,
            lease_grants,
            lease_losses,
            lease_replays,
            propagation,
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

    /// Records an etcd request that started at `started`.
    pub fn observe_etcd(&self, op: &'static str, started: Instant) {
        self.etcd_duration
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        let value = i64::from(leading);
        if self.leader.set(value) != value {
            self.leader_transitions.inc();
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
