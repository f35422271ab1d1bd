//! Leader election on a `coordination.k8s.io/v1` Lease, fenced in the registry.
//!
//! Every replica runs the reflectors and the reconciler, so a follower's caches are warm; only
//! the leader writes. The elector holds the Lease the way client-go does (create, renew with the
//! resource version as a precondition, take over a record that has not changed for its lease
//! duration on the local clock). On taking over, the leader writes a leader record in the
//! registry ([`Backend::fence`]) and every registry write is guarded on that record, so a deposed
//! leader (paused, partitioned, slow) that resumes writes nothing: locally because its Lease
//! bound has passed, and in the registry because the record moved on.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::registry::{Backend, Error};

/// How the elector holds the Lease.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (unique per process).
    pub identity: String,
    /// How long a Lease that is not renewed stays held; shorter than the registry lease TTL.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops writing; shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// Checks the timing invariants against the registry lease TTL.
    ///
    /// # Errors
    /// A description of the violated invariant.
    pub fn validate(&self, registry_ttl: Duration) -> Result<(), String> {
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(
                "the retry period must be positive and shorter than the renew deadline".into(),
            );
        }
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the leader lease duration".into());
        }
        if self.lease_duration >= registry_ttl {
            return Err(format!(
                "the leader lease duration ({}s) must be shorter than the registry lease TTL ({}s), so a new leader re-puts every key before the old lease expires",
                self.lease_duration.as_secs(),
                registry_ttl.as_secs()
            ));
        }
        Ok(())
    }
}

/// A unique identity for this process: `<base>_<random hex>`.
#[must_use]
pub fn unique_identity(base: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{base}_{:08x}", hasher.finish() as u32)
}

/// The role of a replica that runs without leader election: always the leader.
#[must_use]
pub fn always_leader() -> watch::Receiver<Role> {
    watch::channel(Role::Leader { term: 0 }).1
}

/// This replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Caches warm, writing nothing.
    Follower,
    /// Holding the Lease and the registry fence for `term`.
    Leader {
        /// The Lease's `leaseTransitions` when this replica took over.
        term: i64,
    },
}

impl Role {
    /// `leader` or `follower`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Follower => "follower",
            Self::Leader { .. } => "leader",
        }
    }
}

/// The parts of the Lease the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `spec.holderIdentity`; `None` or empty when released.
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Option<Duration>,
    /// `spec.leaseTransitions`.
    pub transitions: i64,
    /// `metadata.resourceVersion`: any write changes it.
    pub resource_version: Option<String>,
}

impl From<&Lease> for Record {
    fn from(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            transitions: spec.and_then(|s| s.lease_transitions).map_or(0, i64::from),
            resource_version: lease.resource_version(),
        }
    }
}

/// What to do with the Lease on one tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// There is none: create it, holding it.
    Create,
    /// This replica holds it: renew.
    Renew,
    /// Released or expired: take it over (one more transition).
    Acquire,
    /// Someone else holds it.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// The decision, given the Lease (if any), how long this replica has seen it unchanged, and the
/// configured duration (used when the record names none).
#[must_use]
pub fn decide(
    record: Option<&Record>,
    me: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Step {
    let Some(record) = record else {
        return Step::Create;
    };
    match &record.holder {
        None => Step::Acquire,
        Some(holder) if holder == me => Step::Renew,
        Some(_) if unchanged_for >= record.duration.unwrap_or(lease_duration) => Step::Acquire,
        Some(holder) => Step::Follow {
            holder: holder.clone(),
        },
    }
}

/// Runs the election; the role is published on the returned channel.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    registry: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    role: watch::Sender<Role>,
    /// The last record seen and when it was first seen unchanged.
    observed: Option<(Record, Instant)>,
    /// Holding the Lease: the term, and when the last successful write was sent.
    holding: Option<(i64, Instant)>,
    /// The term to use on the next takeover when the registry showed a later one.
    min_term: i64,
}

impl Elector {
    /// An elector for `config` that publishes this replica's role on `role` (set to follower
    /// now); the registry is switched to fenced writes at once.
    #[must_use]
    pub fn new(
        client: Client,
        config: ElectionConfig,
        registry: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
        role: watch::Sender<Role>,
    ) -> Self {
        registry.enable_fencing();
        role.send_replace(Role::Follower);
        metrics.set_leader(false);
        let api = Api::namespaced(client, &config.namespace);
        Self {
            api,
            config,
            registry,
            metrics,
            role,
            observed: None,
            holding: None,
            min_term: 0,
        }
    }

    /// Campaigns and renews until `shutdown`, then releases the Lease if held (after fencing
    /// itself off), so a successor takes over at once.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        info!(identity = %self.config.identity, lease = %self.config.name, lease_namespace = %self.config.namespace, "leader election started");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            self.tick().await;
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        self.release().await;
    }

    fn leading(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
    }

    async fn tick(&mut self) {
        if let Some((_, renewed)) = self.holding
            && renewed.elapsed() > self.config.renew_deadline
        {
            self.step_down("the Lease was not renewed within the renew deadline");
        }
        let lease = match self.api.get_opt(&self.config.name).await {
            Ok(lease) => lease,
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "failed to read the leader Lease");
                return;
            }
        };
        let record = lease.as_ref().map(Record::from);
        let now = Instant::now();
        if self.observed.as_ref().map(|(r, _)| r) != record.as_ref() {
            self.observed = record.clone().map(|r| (r, now));
        }
        let unchanged_for = self
            .observed
            .as_ref()
            .map_or(Duration::ZERO, |(_, at)| now.duration_since(*at));
        let step = decide(
            record.as_ref(),
            &self.config.identity,
            unchanged_for,
            self.config.lease_duration,
        );
        match step {
            Step::Create => self.write(None, self.min_term, true).await,
            Step::Renew => {
                let term = self
                    .holding
                    .map_or(record.as_ref().map_or(0, |r| r.transitions), |(t, _)| t)
                    .max(self.min_term);
                self.write(lease, term, false).await;
            }
            Step::Acquire => {
                let term = (record.as_ref().map_or(0, |r| r.transitions) + 1).max(self.min_term);
                self.write(lease, term, true).await;
            }
            Step::Follow { holder } => {
                if self.holding.is_some() {
                    self.step_down("another replica holds the Lease");
                }
                debug!(holder, "following");
            }
        }
    }

    /// Creates or replaces the Lease as held by this replica for `term`; on success, fences the
    /// registry (once per term) and announces the role.
    async fn write(&mut self, current: Option<Lease>, term: i64, acquire: bool) {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let previous = current
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                resource_version: current.as_ref().and_then(ResourceExt::resource_version),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(duration_secs(self.config.lease_duration)),
                acquire_time: if acquire {
                    Some(now.clone())
                } else {
                    previous.acquire_time
                },
                renew_time: Some(now),
                lease_transitions: Some(i32::try_from(term).unwrap_or(i32::MAX)),
                ..LeaseSpec::default()
            }),
        };
        let sent = Instant::now();
        let written = if current.is_some() {
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
        } else {
            self.api.create(&PostParams::default(), &lease).await
        };
        let written = match written {
            Ok(written) => written,
            Err(e) => {
                // A conflict means another replica wrote first; the next tick reads it.
                debug!(error = %crate::error::chain(&e), "failed to write the leader Lease");
                return;
            }
        };
        self.observed = Some((Record::from(&written), sent));
        let valid_until = sent + self.config.renew_deadline;
        let fenced_term = self.holding.map(|(t, _)| t);
        self.holding = Some((term, sent));
        if self.leading() && fenced_term == Some(term) {
            self.registry.extend_fence(valid_until);
            return;
        }
        match self
            .registry
            .fence(&self.config.identity, term, valid_until)
            .await
        {
            Ok(revision) => {
                info!(term, revision, identity = %self.config.identity, "became the leader");
                self.metrics.set_leader(true);
                self.role.send_replace(Role::Leader { term });
            }
            Err(Error::Fenced { .. }) => {
                // The registry has a later term (the Lease was recreated): renew with a later one.
                if let Ok(later) = self.registry.leader_term().await {
                    self.min_term = later + 1;
                }
                self.holding = Some((self.min_term, sent));
                warn!(
                    term,
                    next_term = self.min_term,
                    "the registry holds a later leader term; retrying with a later one"
                );
            }
            Err(e) => {
                warn!(term, error = %crate::error::chain(&e), "failed to fence registry writes; retrying")
            }
        }
    }

    fn step_down(&mut self, why: &str) {
        self.registry.depose();
        self.holding = None;
        if self.leading() {
            warn!(why, identity = %self.config.identity, "stepped down; no longer writing");
        }
        self.metrics.set_leader(false);
        self.role.send_replace(Role::Follower);
    }

    async fn release(&mut self) {
        if self.holding.is_none() {
            return;
        }
        self.step_down("shutting down");
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the leader Lease"),
            Err(e) => warn!(error = %crate::error::chain(&e), "failed to release the leader Lease"),
        }
    }
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, duration: u64) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            duration: Some(Duration::from_secs(duration)),
            transitions: 3,
            resource_version: Some("1".into()),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "me", Duration::ZERO, D), Step::Create);
    }

    #[test]
    fn own_lease_is_renewed() {
        let r = held_by(Some("me"), 15);
        assert_eq!(
            decide(Some(&r), "me", Duration::from_secs(99), D),
            Step::Renew
        );
    }

    #[test]
    fn released_lease_is_acquired_at_once() {
        let r = held_by(None, 1);
        assert_eq!(decide(Some(&r), "me", Duration::ZERO, D), Step::Acquire);
    }

    #[test]
    fn a_live_lease_of_another_holder_is_followed() {
        let r = held_by(Some("other"), 15);
        assert_eq!(
            decide(Some(&r), "me", Duration::from_secs(14), D),
            Step::Follow {
                holder: "other".into()
            }
        );
    }

    #[test]
    fn a_lease_unchanged_for_its_duration_is_taken_over() {
        let r = held_by(Some("other"), 15);
        assert_eq!(
            decide(Some(&r), "me", Duration::from_secs(15), D),
            Step::Acquire
        );
    }

    #[test]
    fn the_records_own_duration_wins_over_the_configured_one() {
        let r = held_by(Some("other"), 2);
        assert_eq!(
            decide(Some(&r), "me", Duration::from_secs(3), D),
            Step::Acquire
        );
    }

    #[test]
    fn timing_must_nest_inside_the_registry_lease_ttl() {
        let config = ElectionConfig {
            namespace: "ns".into(),
            name: "grpc-registrar".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert!(config.validate(Duration::from_secs(30)).is_ok());
        assert!(config.validate(Duration::from_secs(15)).is_err());
        let slow_retry = ElectionConfig {
            retry_period: Duration::from_secs(10),
            ..config.clone()
        };
        assert!(slow_retry.validate(Duration::from_secs(30)).is_err());
        let late_deadline = ElectionConfig {
            renew_deadline: Duration::from_secs(15),
            ..config
        };
        assert!(late_deadline.validate(Duration::from_secs(30)).is_err());
    }

    #[test]
    fn identities_are_unique_per_call() {
        let a = unique_identity("pod");
        assert!(a.starts_with("pod_"));
        assert_ne!(a, unique_identity("pod"));
    }
}
