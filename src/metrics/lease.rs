//! Lease metrics: renewals, grants, adoptions, losses and the replays a loss causes.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// `lease_keepalives`, `lease_keepalive_failures`, `lease_grants`, `lease_adoptions`,
/// `lease_losses` and `lease_replays`.
pub struct Lease {
    /// Successful lease renewals.
    pub keepalives: Counter,
    /// Failed or broken lease renewals.
    pub keepalive_failures: Counter,
    /// Leases granted.
    pub grants: Counter,
    /// Live leases adopted from the registry's record (a restart or a new leader), not granted.
    pub adoptions: Counter,
    /// Leases found lost (expired or revoked) and replaced.
    pub losses: Counter,
    /// Reconciles of every service after a lease loss (each re-puts its keys on the new lease).
    pub replays: Counter,
}

impl Lease {
    /// Creates the group and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            keepalives: Counter::default(),
            keepalive_failures: Counter::default(),
            grants: Counter::default(),
            adoptions: Counter::default(),
            losses: Counter::default(),
            replays: Counter::default(),
        };
        registry.register(
            "lease_keepalives",
            "Successful lease renewals",
            group.keepalives.clone(),
        );
        registry.register(
            "lease_keepalive_failures",
            "Failed or broken lease renewals",
            group.keepalive_failures.clone(),
        );
        registry.register("lease_grants", "Leases granted", group.grants.clone());
        registry.register(
            "lease_adoptions",
            "Live leases adopted from the registry's record (after a restart or a failover) instead of granted",
            group.adoptions.clone(),
        );
        registry.register(
            "lease_losses",
            "Leases lost and replaced",
            group.losses.clone(),
        );
        registry.register(
            "lease_replays",
            "Reconciles of every service after a lease loss (which re-put every owned key)",
            group.replays.clone(),
        );
        group
    }
}
