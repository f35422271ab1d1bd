//! Registry backend metrics: request latency, failed requests and whether the backend answers.
//!
//! Two groups, because the page lists the latency before the per-service gauges and the
//! reachability after them (the page's order is part of its contract).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::latency_histogram;

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

/// `registry_request_duration_seconds`.
pub struct Requests {
    /// Registry request latency in seconds, by backend and operation.
    pub duration: Family<OpLabels, Histogram>,
}

impl Requests {
    /// Creates the group and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        registry.register(
            "registry_request_duration_seconds",
            "Registry request latency, by backend and operation",
            group.duration.clone(),
        );
        group
    }

    /// Records a request to `backend` that started at `started`.
    pub fn observe(&self, backend: &'static str, op: &'static str, started: Instant) {
        self.duration
            .get_or_create(&OpLabels { backend, op })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// `backend_connected` and `backend_errors`, with the series of one backend only.
pub struct Reachability {
    /// 1 while the backend answers, 0 after a request or the lease keep-alive failed to reach it.
    pub connected: Family<BackendLabels, Gauge>,
    /// Backend requests that failed, by operation.
    pub errors: Family<BackendOpLabels, Counter>,
}

impl Reachability {
    /// Creates the group for `backend` (its name), whose series start at 0, and registers it in
    /// `registry`. No other backend's series exist: an alert on `backend_connected == 0` must
    /// not fire for a backend not in use.
    pub fn register(registry: &mut Registry, backend: &'static str) -> Self {
        let group = Self {
            connected: Family::default(),
            errors: Family::default(),
        };
        for op in BACKEND_OPS {
            drop(group.errors.get_or_create(&BackendOpLabels { backend, op }));
        }
        drop(group.connected.get_or_create(&BackendLabels { backend }));
        registry.register(
            "backend_connected",
            "1 while the registry backend answers, 0 after a request to it failed to connect",
            group.connected.clone(),
        );
        registry.register(
            "backend_errors",
            "Registry backend requests that failed, by operation",
            group.errors.clone(),
        );
        group
    }

    /// Records the outcome of a backend request: a failure is counted by operation, and one
    /// that could not reach the backend marks it disconnected; a success marks it connected.
    pub fn result(&self, backend: &'static str, op: &'static str, ok: bool, reached: bool) {
        if !ok {
            self.errors
                .get_or_create(&BackendOpLabels { backend, op })
                .inc();
        }
        self.connected
            .get_or_create(&BackendLabels { backend })
            .set(i64::from(reached));
    }

    /// Whether the last request to `backend` reached it.
    #[must_use]
    pub fn up(&self, backend: &'static str) -> bool {
        self.connected
            .get_or_create(&BackendLabels { backend })
            .get()
            == 1
    }
}
