//! Writer metrics: whether this replica leads, who else writes its registry scope, and its
//! writes to the API server.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `other_writers`, `status_write_failures`, `leader` and `leader_transitions`.
pub struct Writers {
    /// Other live controllers writing this registry scope (should be 0: two writers of one
    /// scope without leader election rewrite each other's keys).
    pub other_writers: Gauge,
    /// Status, finalizer or Event writes that failed (retried with backoff; the registry is
    /// not affected).
    pub status_write_failures: Counter,
    /// 1 while this replica is the leader (or runs without leader election), else 0.
    pub leader: Gauge,
    /// Leadership changes seen by this replica.
    pub leader_transitions: Counter,
}

impl Writers {
    /// Creates the group, leading until told otherwise, and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            other_writers: Gauge::default(),
            status_write_failures: Counter::default(),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
        };
        group.leader.set(1);
        registry.register(
            "other_writers",
            "Other live controllers writing this registry scope (the same cluster name) besides this one; should be 0",
            group.other_writers.clone(),
        );
        registry.register(
            "status_write_failures",
            "Status, finalizer or Event writes to the API server that failed and are retried (the registry is not affected)",
            group.status_write_failures.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader, else 0",
            group.leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Leadership changes seen by this replica",
            group.leader_transitions.clone(),
        );
        group
    }

    /// Records whether this replica leads, counting a change.
    pub fn set_leader(&self, leading: bool) {
        let value = i64::from(leading);
        if self.leader.set(value) != value {
            self.leader_transitions.inc();
        }
    }
}
