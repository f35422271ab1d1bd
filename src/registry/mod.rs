//! The registry seam: what reconcile needs of a backend, and the backends.
//!
//! A [`Backend`] claims a target for one GrpcService ([`Owner`]), makes what is published under
//! it equal a [`Publication`], releases it, reports lease and reachability [`Event`]s, and fences
//! its writes so that only the elected leader's reach the registry.
//!
//! Written once for every backend (external-dns's Registry over Provider): the fence state
//! (`fence`), the batching rule (`batch`), the minimal diff (`diff`), the claim, take-over and
//! publication-record flows and the claim cache (`ownership`), writing batches under the
//! ownership guard for a sync or a release (`writes`), where the controller's records live
//! (`records`) and TLS material ([`tls`]). A backend supplies its primitives: its leader
//! record's write and the guard on it, its ownership records' guarded compare-and-swaps
//! (`ownership::OwnerRecords`), one guarded write request (`writes::GuardedWrites`) and its
//! limits, its listing and its diff.
//!
//! A backend also owns what is backend-specific in a spec: its [`Planner`] turns a validated
//! [`Plan`] into a [`Placement`] (the target, and how endpoints become its entries), checked by
//! the backend's own rules.
//!
//! - [`etcd`]: etcd, with one shared lease per TTL, guarded txn batches and an etcd fence; its
//!   key layout, key template and value formats.
//! - [`consul`]: Consul's catalog and KV through guarded txns; its service names and tags.
//! - [`memory`]: an in-memory backend for reconciler tests; no external process.

mod batch;
pub mod consul;
mod diff;
mod error;
pub mod etcd;
mod fence;
pub mod memory;
mod ownership;
mod records;
pub mod tls;
mod writes;

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::crd::GrpcService;
use crate::desired::{Collision, LogicalEndpoint, Plan, Policy, SpecError};
pub use error::{Error, Result};

/// Where and how one backend publishes a service, planned from its spec by that backend's
/// [`Planner`]; opaque to the controller, which only reads the target and asks for the checks.
pub trait Placement: std::fmt::Debug + Send + Sync + 'static {
    /// The target: what is claimed and owned, and what status names.
    fn target(&self) -> &str;

    /// Lays `endpoints` out as entries, rendering each key and value once: one endpoint per
    /// entry (a later endpoint mapping to an entry an earlier one, in candidate order, already
    /// has is left out and returned as a [`Collision`]), and every entry by key, each checked
    /// to fit in one registry write. The entries are what a reconcile hands the sync in its
    /// [`Publication`], so that nothing is rendered twice.
    fn render(&self, endpoints: Vec<LogicalEndpoint>) -> Rendering;

    /// The entry of one endpoint, its key and value, exactly as [`Placement::render`] renders
    /// it and checked to fit in one registry write (else [`SpecError::TooLarge`]): for a
    /// reconcile that renders only the endpoints that changed since its last rendering.
    ///
    /// # Errors
    /// [`SpecError::TooLarge`].
    fn entry(
        &self,
        endpoint: &LogicalEndpoint,
    ) -> std::result::Result<(String, Vec<u8>), SpecError>;

    /// The key of one endpoint's entry, as [`Placement::entry`] renders it.
    fn key(&self, endpoint: &LogicalEndpoint) -> String;

    /// Whether `other` is the same placement: the same target, and every endpoint rendered
    /// alike.
    fn same_as(&self, other: &dyn Placement) -> bool;

    /// For the backend that planned it, to read its own details back.
    fn as_any(&self) -> &dyn Any;
}

/// Endpoints laid out by a [`Placement`]: the ones kept (one per entry), the ones left out, and
/// the entries, or why the spec cannot publish them.
#[derive(Debug)]
pub struct Rendering {
    /// One endpoint per entry, in candidate order (none when the spec maps every endpoint to
    /// one entry).
    pub endpoints: Vec<LogicalEndpoint>,
    /// The endpoints left out, each on an entry an earlier one has.
    pub collisions: Vec<Collision>,
    /// Every entry's key and value, or the [`SpecError`] naming the entry at fault: the spec
    /// maps every endpoint to one entry, or an entry is too large for any write.
    pub entries: std::result::Result<BTreeMap<String, Vec<u8>>, SpecError>,
}

/// A spec validated and planned for a backend: the backend-neutral [`Plan`] and the backend's
/// [`Placement`].
#[derive(Clone, Debug)]
pub struct Planned {
    /// What is published, from where.
    pub plan: Plan,
    /// Where and how it is published.
    pub placement: Arc<dyn Placement>,
}

impl Planned {
    /// The target published under.
    #[must_use]
    pub fn target(&self) -> &str {
        self.placement.target()
    }
}

/// Plans specs for one backend: the backend-specific half of spec validation (the target and
/// its tenancy rule, and how entries are laid out). The backend-neutral half is [`Plan::new`].
pub trait Planner: Send + Sync {
    /// Where and how `svc`, validated as `plan`, is published: under the target the backend's
    /// rules give it, or under `keep` (from [`Planner::pre_rule_target`], or a recorded
    /// publication) when given.
    ///
    /// # Errors
    /// [`SpecError`] for a setting the backend refuses.
    fn place(
        &self,
        svc: &GrpcService,
        plan: &Plan,
        policy: &Policy,
        keep: Option<String>,
    ) -> std::result::Result<Arc<dyn Placement>, SpecError>;

    /// The target this service was published under before the backend's current tenancy rule,
    /// when the rule now gives it another: a service whose ownership record still holds it
    /// keeps publishing there (see [`Planner::keeping`]) until its spec names another. `None`
    /// for a backend whose rule never changed.
    fn pre_rule_target(&self, _svc: &GrpcService, _policy: &Policy) -> Option<String> {
        None
    }

    /// Validates a spec against the controller's policy and plans it for this backend.
    ///
    /// # Errors
    /// [`SpecError`] for anything the API server's schema could not catch.
    fn plan(&self, svc: &GrpcService, policy: &Policy) -> std::result::Result<Planned, SpecError> {
        let plan = Plan::new(svc, policy)?;
        let placement = self.place(svc, &plan, policy, None)?;
        Ok(Planned { plan, placement })
    }

    /// As [`Planner::plan`], publishing under `target` instead of the one the tenancy rule
    /// gives; every other rule still applies.
    ///
    /// # Errors
    /// As [`Planner::plan`], but for the name rule.
    fn keeping(
        &self,
        svc: &GrpcService,
        policy: &Policy,
        target: String,
    ) -> std::result::Result<Planned, SpecError> {
        let plan = Plan::new(svc, policy)?;
        let placement = self.place(svc, &plan, policy, Some(target))?;
        Ok(Planned { plan, placement })
    }
}

/// Every backend's planner, for tests that must hold whatever the backend (without naming one
/// outside the registry).
#[cfg(test)]
pub(crate) fn planners() -> Vec<(crate::crd::Backend, &'static dyn Planner)> {
    use crate::crd::Backend;
    Backend::ALL
        .into_iter()
        .map(|backend| {
            let planner: &'static dyn Planner = match backend {
                Backend::Etcd => &etcd::EtcdPlanner,
                Backend::Consul => &consul::ConsulPlanner,
            };
            (backend, planner)
        })
        .collect()
}

/// Who owns a target: the GrpcService's identity, stored as the ownership record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The GrpcService uid; the identity that counts.
    pub uid: String,
    /// Its namespace, so a conflict can name it.
    pub namespace: String,
    /// Its name, so a conflict can name it.
    pub name: String,
}

impl Owner {
    /// The ownership record's bytes.
    #[must_use]
    pub fn record(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A registry lease id as status and logs print it: 16 hex digits, zero-padded, as etcdctl
/// prints it (`etcdctl lease list`), so that one greps for the other.
#[must_use]
pub fn lease_text(id: i64) -> String {
    format!("{id:016x}")
}

/// Whether two different targets nest, one inside the other (`a/b` and `a/b/c`, not `a/b` and
/// `a/bc`): a sync of the outer one would delete the inner one's keys.
#[must_use]
pub fn nested(a: &str, b: &str) -> bool {
    a != b && (b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/")))
}

/// Every proper ancestor of a target, `a` and `a/b` for `a/b/c` (a leading `/` kept).
#[must_use]
pub fn ancestors(target: &str) -> Vec<&str> {
    target
        .match_indices('/')
        .map(|(i, _)| &target[..i])
        .filter(|a| !a.is_empty())
        .collect()
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the target.
    Owned,
    /// Someone else owns it, or a target nested in it or containing it (whose sync would
    /// delete the other's keys).
    Conflict {
        /// The current owner (an empty namespace when the record is not ours to read).
        owner: Owner,
        /// The record's version, for a guarded takeover of a stale owner.
        version: i64,
        /// The target that owner holds: the one claimed, or one nested in it or containing it
        /// (only the first may be taken over).
        target: String,
    },
}

/// What one service publishes: where and how (its [`Placement`]), for whom, for how long, and
/// what.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The target and how endpoints become its entries, as the backend planned them.
    pub placement: Arc<dyn Placement>,
    /// The GrpcService that owns the target.
    pub owner: Owner,
    /// The lease TTL the entries live by.
    pub ttl: Duration,
    /// The endpoints, one per entry.
    pub endpoints: Arc<Vec<LogicalEndpoint>>,
    /// The entries `placement` renders of `endpoints`, by key: rendered once, where the spec
    /// was checked, and written as they are (a backend that names entries its own way, like
    /// Consul, builds its own from `endpoints`).
    pub entries: Arc<BTreeMap<String, Vec<u8>>>,
}

impl Publication {
    /// Publishes `endpoints` under `placement`, rendering the entries.
    ///
    /// # Errors
    /// [`SpecError::KeyCollision`] naming both endpoints when two map to one entry;
    /// [`SpecError`] as [`Placement::render`] finds it.
    pub fn new(
        placement: Arc<dyn Placement>,
        owner: Owner,
        ttl: Duration,
        endpoints: Vec<LogicalEndpoint>,
    ) -> std::result::Result<Self, SpecError> {
        let given = endpoints.len();
        let rendering = placement.render(endpoints);
        let entries = rendering.entries?;
        if let Some(collision) = rendering.collisions.first() {
            return Err(SpecError::KeyCollision {
                key: collision.key.clone(),
                first: collision.kept.clone(),
                second: collision.left_out.clone(),
            });
        }
        debug_assert_eq!(given, rendering.endpoints.len());
        Ok(Self {
            placement,
            owner,
            ttl,
            endpoints: Arc::new(rendering.endpoints),
            entries: Arc::new(entries),
        })
    }

    /// The target published under.
    #[must_use]
    pub fn target(&self) -> &str {
        self.placement.target()
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries written (new, changed, or moved onto the live lease).
    pub puts: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Write requests used (txns for etcd).
    pub txns: usize,
    /// Entries now under the target.
    pub registered: usize,
    /// The registry revision after the sync.
    pub revision: i64,
    /// The lease the entries are on, with a backend that has leases.
    pub lease: Option<i64>,
}

/// What the backend saw happen to its lease or its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The lease was lost (expired, revoked, or the registry lost its data) and replaced; every
    /// entry on it must be written again, which a reconcile of every service does.
    Replaced {
        /// The TTL of the lease.
        ttl: Duration,
        /// The lost lease.
        old: i64,
        /// Its replacement, already granted.
        new: i64,
    },
    /// The registry stopped answering; sent once per outage.
    Unreachable {
        /// The TTL of the lease.
        ttl: Duration,
        /// The lease being kept.
        lease: i64,
    },
    /// The registry answers again after an outage, on the same lease.
    Restored {
        /// The TTL of the lease.
        ttl: Duration,
        /// The lease being kept.
        lease: i64,
    },
}

/// A registry backend: everything reconcile and leader election need of it.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// False while the backend is known not to answer (e.g. lease renewals go unanswered), so
    /// that a reconcile reports the outage at once instead of waiting out a request timeout.
    fn reachable(&self) -> bool {
        true
    }

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// How this backend plans specs.
    fn planner(&self) -> &dyn Planner;

    /// Asks the registry for something cheap that proves it answers and that the credentials
    /// may read: the start-up check and the reachability probe behind `/readyz`. Returns the
    /// registry's current revision (or index).
    ///
    /// # Errors
    /// The registry unreachable, or the read refused.
    async fn check(&self) -> Result<i64>;

    /// The TTL used when a service sets none.
    fn default_ttl(&self) -> Duration;

    /// Claims `target` for `owner` with a compare-and-swap, refused while another owner holds
    /// it or a target nested in it or containing it. Idempotent for the same uid.
    ///
    /// # Errors
    /// Backend failures.
    async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim>;

    /// As [`Backend::claim`]; when the claim creates the target's ownership record (nobody
    /// owned it), `record` is written as `owner`'s publication record (see
    /// [`Backend::record_publication`]) in the same request, so that a first start spends one
    /// write on both. Returns the claim and whether `record` was written.
    ///
    /// # Errors
    /// Backend failures.
    async fn claim_recording(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<(Claim, bool)>;

    /// The owner recorded for `target`, read from the registry (not from this process's
    /// memory); `None` when nobody owns it or the record is not ours to read.
    ///
    /// # Errors
    /// Backend failures.
    async fn owner_of(&self, target: &str) -> Result<Option<Owner>>;

    /// Every ownership record of this controller (its cluster's, with a cluster name): the
    /// target and its owner. For the sweep that releases what deleted GrpcServices left.
    ///
    /// # Errors
    /// Backend failures.
    async fn owners(&self) -> Result<Vec<(String, Owner)>>;

    /// Announces this process as a live writer of its scope (`instance`, its `beat`-th
    /// announcement) and returns the other writers' last announcements, by instance. Two
    /// writers of one scope without leader election fight over every key; comparing beats
    /// between calls tells a live one from one that stopped.
    ///
    /// # Errors
    /// Backend failures.
    async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>>;

    /// Removes the announcement of a writer that stopped beating.
    ///
    /// # Errors
    /// Backend failures.
    async fn forget_writer(&self, instance: &str) -> Result<()>;

    /// Takes over a target whose recorded owner is gone, guarded on the record's `version`, so
    /// two claimants cannot both win.
    ///
    /// # Errors
    /// Backend failures.
    async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim>;

    /// Makes what is published under an owned target equal `publication`, on the shared lease.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when the record no longer names the owner; [`Error::Spec`] when
    /// the layout cannot render the endpoints; backend failures.
    async fn sync(&self, publication: &Publication) -> Result<SyncReport>;

    /// Publishes a service that nobody has published under its target yet in one request:
    /// claims the target, writes `record` as its publication record (see
    /// [`Backend::record_publication`]) and every entry, only while the target has no
    /// ownership record, none nests with it, nothing is under it, and the owner has no
    /// publication record. `None`, writing nothing,
    /// when anything is in the way, when the entries need more than one request, or when the
    /// backend cannot: the caller then claims and syncs as usual. A first start of a cluster is
    /// so one write per service.
    ///
    /// # Errors
    /// Backend failures.
    async fn publish_first(
        &self,
        _publication: &Publication,
        _record: &[u8],
    ) -> Result<Option<SyncReport>> {
        Ok(None)
    }

    /// Records what `owner` last published validly (opaque bytes, the controller's), guarded on
    /// its ownership of `target` and on the leader fence, so that any replica can publish it
    /// again after a restart or a failover while the spec is invalid. One record per owner
    /// uid; [`Backend::release`] deletes it.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when `target`'s record no longer names `owner`; backend
    /// failures.
    async fn record_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<()>;

    /// The record [`Backend::record_publication`] last wrote for the owner `uid`.
    ///
    /// # Errors
    /// Backend failures.
    async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>>;

    /// Every record [`Backend::record_publication`] wrote in this controller's scope: the
    /// owner uid and the record (read once per leadership term, so that a cold start or a
    /// takeover does not read them one service at a time).
    ///
    /// # Errors
    /// Backend failures.
    async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>>;

    /// Deletes everything under an owned target and its ownership record (and the owner's
    /// publication record). Returns how many entries were deleted; 0, touching nothing, when
    /// `owner` does not own it.
    ///
    /// # Errors
    /// Backend failures.
    async fn release(&self, target: &str, owner: &Owner) -> Result<usize>;

    /// Lease and reachability events.
    fn events(&self) -> broadcast::Receiver<Event>;

    /// Whether a write would be attempted now (not whether the registry would accept it).
    fn may_write(&self) -> bool;

    /// Turns fencing on: from now on this replica writes only while it is the fenced leader.
    fn enable_fencing(&self);

    /// Makes this replica the fenced leader for `term` until `valid_until` (the local bound of
    /// its Kubernetes Lease): writes a leader record (only over an older term), then guards
    /// every write on it. Returns the record's version.
    ///
    /// # Errors
    /// [`Error::Fenced`] when the registry already holds a later term; backend failures.
    async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64>;

    /// Extends the leader's local write permission to `valid_until` (after a Lease renewal).
    fn extend_fence(&self, valid_until: Instant);

    /// Stops writing at once.
    fn depose(&self);

    /// The term of the leader record in the registry, 0 when there is none.
    ///
    /// # Errors
    /// Backend failures.
    async fn leader_term(&self) -> Result<i64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_id_is_printed_as_etcdctl_prints_it() {
        assert_eq!(lease_text(0x0365_a24d_0113_e90d), "0365a24d0113e90d");
        assert_eq!(lease_text(0x309d_a24c_ffad_430c), "309da24cffad430c");
    }

    #[test]
    fn targets_nest_by_whole_segments_only() {
        assert!(nested("a/b", "a/b/c") && nested("a/b/c", "a/b"));
        assert!(!nested("a/b", "a/bc") && !nested("a/b", "a/b"));
        assert!(
            !nested("/a/b", "a/b/c"),
            "a leading slash is another key space"
        );
        assert_eq!(ancestors("a/b/c"), ["a", "a/b"]);
        assert_eq!(ancestors("/micro/hello"), ["/micro"]);
        assert!(ancestors("a").is_empty());
    }
}
