//! Reconcile metrics: how many ran, how many are running, why they failed, how long they took.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::latency_histogram;

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

/// `reconciliations`, `reconciles_in_flight`, `reconcile_failures` and
/// `reconcile_duration_seconds`.
pub struct Reconcile {
    /// Reconciles run.
    pub reconciliations: Counter,
    /// Reconciles running now.
    pub in_flight: Gauge,
    /// Reconciles failed, by error kind, every known kind starting at 0.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
}

impl Reconcile {
    /// Creates the group and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            reconciliations: Counter::default(),
            in_flight: Gauge::default(),
            failures: Family::default(),
            duration: latency_histogram(),
        };
        for error in failure_labels() {
            drop(group.failures.get_or_create(&ErrorLabels { error }));
        }
        registry.register(
            "reconciliations",
            "Reconciles run",
            group.reconciliations.clone(),
        );
        registry.register(
            "reconciles_in_flight",
            "Reconciles running now",
            group.in_flight.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles failed, by root cause",
            group.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            group.duration.clone(),
        );
        group
    }

    /// Starts a reconcile: counts it and returns a timer that records its duration and ends
    /// it on drop.
    #[must_use]
    pub fn started(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        self.in_flight.inc();
        ReconcileTimer {
            started: Instant::now(),
            histogram: &self.duration,
            in_flight: &self.in_flight,
        }
    }

    /// How many reconciles are running now.
    #[must_use]
    pub fn running(&self) -> usize {
        usize::try_from(self.in_flight.get()).unwrap_or(0)
    }

    /// Counts a failed reconcile by its root cause's label.
    pub fn failed(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }
}

/// Records a reconcile's duration and ends it when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer<'a> {
    started: Instant,
    histogram: &'a Histogram,
    in_flight: &'a Gauge,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
        self.in_flight.dec();
    }
}
