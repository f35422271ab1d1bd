//! Propagation metrics: how long a change takes to reach the registry, from three starting
//! points.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `propagation_seconds`, `transition_to_registry_seconds` and `trigger_to_registry_seconds`.
pub struct Propagation {
    /// Seconds from this process seeing a selected pod's registrable state change (a watch
    /// event) to the registry commit that reflected it.
    pub from_watch: Histogram,
    /// Seconds from a selected pod's Ready transition (or deletion) as Kubernetes recorded it to
    /// the commit: end to end, including the API server and watch delay, but with whole-second
    /// resolution (condition times have no fraction), so it over-reads by up to 1 s.
    pub from_transition: Histogram,
    /// Seconds from an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` (when
    /// kube-controller-manager saw the pod change, as kube-proxy measures it) to the registry
    /// commit: end to end for `serviceRef` services, sub-second precision.
    pub from_trigger: Histogram,
}

impl Propagation {
    /// Creates the group and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            // 1ms .. ~33s
            from_watch: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 250ms .. ~128s
            from_transition: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            from_trigger: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        registry.register(
            "propagation_seconds",
            "From this controller seeing a readiness change (a pod or EndpointSlice watch event) to the registry commit reflecting it",
            group.from_watch.clone(),
        );
        registry.register(
            "transition_to_registry_seconds",
            "From a pod's Ready transition time as Kubernetes recorded it (whole seconds) to the registry commit",
            group.from_transition.clone(),
        );
        registry.register(
            "trigger_to_registry_seconds",
            "From an EndpointSlice's last-change-trigger-time (kube-controller-manager saw the pod change) to the registry commit",
            group.from_trigger.clone(),
        );
        group
    }
}
