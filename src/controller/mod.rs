//! The reconciler: `GrpcService` + selected pods in the cache → keys in etcd → status.

mod pods;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, field, info, info_span, instrument, warn};

pub use pods::{PodMapper, Selections, strip_pod};
use status::{Outcome, event_for, next_status};

use crate::crd::{FINALIZER, GrpcService};
use crate::desired::{Plan, Policy, SpecError, desired};
use crate::leader::Role;
use crate::metrics::{Metrics, ServiceLabels};
use crate::registry::{Claim, Owner, Registry};
use crate::{Error, Result};

/// The field manager for status writes (server-side apply).
pub const FIELD_MANAGER: &str = "grpc-registrar";

/// How often a healthy service is re-synced even without events, to repair out-of-band edits.
pub const RESYNC: Duration = Duration::from_secs(300);

/// The least time between two counts-only status writes of one service.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What [`GrpcService::patch_status`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusWrite {
    Written,
    Unchanged,
    Deferred,
}

/// How often a service in conflict re-checks whether the target was freed.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(15);

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The etcd registry.
    pub registry: Registry,
    /// The stripped pod cache.
    pub pods: Store<Pod>,
    /// Target policy.
    pub policy: Policy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Which pods each service last selected; read by the pod mapper.
    pub selections: Selections,
    /// This replica's role; only the leader writes.
    pub role: tokio::sync::watch::Receiver<Role>,
    /// Publishes Kubernetes Events on GrpcServices, when set.
    pub events: Option<Recorder>,
    /// True once the pod cache has completed its initial list.
    pub pods_synced: tokio::sync::watch::Receiver<bool>,
    /// When this process started: older pod transitions are not propagation samples.
    started: k8s_openapi::jiff::Timestamp,
    /// When each service's status was last written, by uid.
    status_writes: Mutex<HashMap<String, std::time::Instant>>,
    /// The last pod transition observed per `<namespace>/<service>/<pod>`.
    transitions: Mutex<HashMap<String, k8s_openapi::jiff::Timestamp>>,
    /// Consecutive failures per service uid, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context over a pod store.
    #[must_use]
    pub fn new(
        client: Client,
        registry: Registry,
        pods: Store<Pod>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            registry,
            pods,
            policy,
            metrics,
            selections: Selections::default(),
            role: crate::leader::always_leader(),
            events: None,
            pods_synced: tokio::sync::watch::channel(true).1,
            // Whole seconds, as Kubernetes stores transition times.
            started: k8s_openapi::jiff::Timestamp::from_second(
                k8s_openapi::jiff::Timestamp::now().as_second(),
            )
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
            transitions: Mutex::default(),
            status_writes: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// The same context, reconciling only once `synced` says the pod cache is complete (without
    /// this, [`Context::new`] assumes the store it was given is complete).
    #[must_use]
    pub fn with_pods_synced(self, synced: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            pods_synced: synced,
            ..self
        }
    }

    /// The same context, publishing Events on GrpcServices through `recorder`.
    #[must_use]
    pub fn with_events(self, recorder: Recorder) -> Self {
        Self {
            events: Some(recorder),
            ..self
        }
    }

    /// The same context, writing only while `role` says leader.
    #[must_use]
    pub fn with_role(self, role: tokio::sync::watch::Receiver<Role>) -> Self {
        Self { role, ..self }
    }
}

/// Whether each reflector has completed its initial list (set again after every re-list).
#[derive(Clone)]
struct Caches {
    pods: tokio::sync::watch::Sender<bool>,
    services: tokio::sync::watch::Sender<bool>,
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            pods: tokio::sync::watch::Sender::new(false),
            services: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Where the controller watches.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// One namespace, or all when `None`.
    pub namespace: Option<String>,
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves, setting `ready` once the caches are synced.
///
/// Every replica keeps its caches warm; only while `role` is [`Role::Leader`] does it write
/// (see [`crate::leader`]), and on becoming the leader it reconciles every service at once.
/// Graceful shutdown finishes in-flight reconciles and does not revoke the etcd lease.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    registry: Registry,
    scope: Scope,
    policy: Policy,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    role: tokio::sync::watch::Receiver<Role>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let services: Api<GrpcService> = api(&client, &scope);
    let pods_api: Api<Pod> = api(&client, &scope);

    // Cache readiness is observed on the event streams (InitDone, after the store applied it),
    // not with `Store::wait_until_ready`: that future is backed by a oneshot that keeps only the
    // last waker, so with several concurrent waiters (every reconcile, and kube's own applier)
    // all but one can wait forever. Found by the scale bench; see `Caches`.
    let caches = Caches::default();
    let (pod_store, pod_writer) = reflector::store();
    let pods_synced = caches.pods.clone();
    let pod_events = watcher(pods_api, watcher::Config::default().any_semantic())
        .backoff(WatchBackoff::default())
        .modify(strip_pod)
        .reflect(pod_writer)
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                pods_synced.send_replace(true);
            }
        })
        .touched_objects();
    let (svc_store, svc_writer) = reflector::store();
    let services_synced = caches.services.clone();
    let svc_events = watcher(services, watcher::Config::default().any_semantic())
        .backoff(WatchBackoff::default())
        .reflect(svc_writer)
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                services_synced.send_replace(true);
            }
        })
        .applied_objects();

    let lease_events = futures::stream::unfold(registry.lease_events(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(_) => return Some(((), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });

    // Taking over leadership reconciles everything, re-putting every key under this replica's
    // lease before the previous leader's can expire.
    let elected = futures::stream::unfold(role.clone(), |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if matches!(*rx.borrow_and_update(), Role::Leader { .. }) {
                return Some(((), rx));
            }
        }
    });
    let lease_events = futures::stream::select(lease_events, elected);

    let controller = Controller::for_stream(svc_events, svc_store.clone())
        .trigger_backoff(WatchBackoff::default());
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(
        Context::new(client, registry, pod_store.clone(), policy, metrics)
            .with_role(role)
            .with_events(recorder)
            .with_pods_synced(caches.pods.subscribe()),
    );
    let mapper = PodMapper::new(
        controller.store(),
        pod_store.clone(),
        ctx.selections.clone(),
    );
    {
        let (pods, services, ready) = (pod_store.clone(), svc_store.clone(), ready.clone());
        let (mut pods_synced, mut services_synced) =
            (caches.pods.subscribe(), caches.services.subscribe());
        tokio::spawn(async move {
            if pods_synced.wait_for(|s| *s).await.is_ok()
                && services_synced.wait_for(|s| *s).await.is_ok()
            {
                info!(
                    pods = pods.len(),
                    services = services.len(),
                    "caches synced"
                );
                ready.store(true, Ordering::Relaxed);
            }
        });
    }
    let prune = mapper.clone();
    controller
        .watches_stream(pod_events, move |pod| mapper.map(&pod))
        .reconcile_all_on(lease_events.inspect(move |()| prune.prune()))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                warn!(error = %e, "reconcile loop reported an error");
            }
            future::ready(())
        })
        .instrument(info_span!("controller"))
        .await;
    info!("controller stopped");
}

/// The retry delay of a failed watch: 250 ms doubling to 4 s, with ±25% jitter, reset once the
/// watch works again. kube's default climbs to 30 s, which after an API server outage can leave
/// the registry stale for half a minute; this controller is on the RPC path, so it re-lists
/// sooner (a watch error is rare, so the extra load is small).
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    seed: std::collections::hash_map::RandomState,
    attempt: u64,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            seed: std::collections::hash_map::RandomState::new(),
            attempt: 0,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::BuildHasher;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.attempt += 1;
        // A jitter factor in [0.75, 1.25), so replicas do not retry in lockstep.
        let unit = (self.seed.hash_one(self.attempt) % 1000) as f64 / 1000.0;
        Some(base.mul_f64(0.75 + unit / 2.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Reconciles one `GrpcService`: finalizer, then apply or cleanup.
///
/// # Errors
/// Retried by [`error_policy`] with backoff.
#[instrument(skip_all, fields(namespace = field::Empty, name = %svc.name_any(), target = field::Empty))]
pub async fn reconcile(svc: Arc<GrpcService>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.registry.may_write() {
        // A follower writes nothing (it reconciles everything on taking over); a leader whose
        // Lease renewal is late retries shortly.
        return Ok(match *ctx.role.borrow() {
            Role::Follower => Action::await_change(),
            Role::Leader { .. } => Action::requeue(Duration::from_secs(1)),
        });
    }
    let _timer = ctx.metrics.reconcile_started();
    let namespace = svc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    tracing::Span::current().record("namespace", namespace.as_str());
    // Never compute desired state from a half-filled cache: that would delete live keys.
    ctx.pods_synced
        .clone()
        .wait_for(|synced| *synced)
        .await
        .map_err(|_| Error::MissingField("pod cache"))?;
    let api: Api<GrpcService> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = svc.uid().unwrap_or_default();
    let action = finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            Finalizer::Apply(svc) => svc.apply(&ctx).await,
            Finalizer::Cleanup(svc) => svc.cleanup(&ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures.lock().expect("lock").remove(&uid);
    Ok(action)
}

/// Requeues a failed reconcile with per-service exponential backoff (200 ms doubling to 60 s).
pub fn error_policy(svc: Arc<GrpcService>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    let attempts = {
        let mut failures = ctx.failures.lock().expect("lock");
        let n = failures.entry(svc.uid().unwrap_or_default()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_millis(200)
        .saturating_mul(1 << attempts.min(9))
        .min(Duration::from_secs(60));
    warn!(namespace = svc.namespace().unwrap_or_default(), name = %svc.name_any(), error = %error, attempts, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

impl GrpcService {
    fn owner(&self) -> Result<Owner> {
        Ok(Owner {
            uid: self.uid().ok_or(Error::MissingField("metadata.uid"))?,
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
        })
    }

    fn ttl(&self, ctx: &Context) -> Duration {
        self.spec
            .ttl_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or_else(|| ctx.registry.default_ttl(), Duration::from_secs)
    }

    /// Publishes the ready selected pods and reports the outcome in status.
    async fn apply(&self, ctx: &Context) -> Result<Action> {
        let owner = self.owner()?;
        let plan = match Plan::new(self, &ctx.policy) {
            Ok(plan) => plan,
            Err(e) => return self.invalid_spec(ctx, &e).await,
        };
        tracing::Span::current().record("target", plan.target.as_str());

        // A changed target: free the old one first, so it never holds stale endpoints.
        if let Some(old) = self.status.as_ref().and_then(|s| s.target.as_deref())
            && old != plan.target
        {
            let deleted = ctx.registry.release(old, &owner).await?;
            info!(old_target = old, deleted, "released previous target");
        }

        match self.claim(ctx, &plan.target, &owner).await {
            Ok(Claim::Owned) => {}
            Ok(Claim::Conflict { owner: other, .. }) => {
                let outcome = Outcome::Conflict {
                    target: &plan.target,
                    owner: format!("{}/{}", other.namespace, other.name),
                };
                self.patch_status(ctx, &outcome).await?;
                return Ok(Action::requeue(CONFLICT_RECHECK));
            }
            Err(e) => return self.etcd_failed(ctx, &plan.target, None, e).await,
        }

        let selected = ctx.pods.state_filter(|pod| plan.selects(pod));
        ctx.selections.record(
            ObjectRef::from_obj(self),
            selected.iter().map(|pod| ObjectRef::from_obj(pod.as_ref())),
        );
        let mut want = match desired(&plan, &selected) {
            Ok(want) => want,
            Err(e) => return self.invalid_spec(ctx, &e).await,
        };
        let entries = Arc::new(std::mem::take(&mut want.entries));
        let report = match ctx
            .registry
            .sync(&plan.target, &owner, self.ttl(ctx), entries)
            .await
        {
            Ok(report) => report,
            Err(e) => return self.etcd_failed(ctx, &plan.target, Some(&want), e).await,
        };
        if report.puts + report.deletes > 0 {
            self.observe_propagation(ctx, &selected);
            info!(
                puts = report.puts,
                deletes = report.deletes,
                registered = report.registered,
                revision = report.revision,
                lease_id = report.lease_id,
                "registry updated"
            );
        }
        ctx.metrics
            .registered_endpoints
            .get_or_create(&ServiceLabels {
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
            })
            .set(i64::try_from(report.registered).unwrap_or(i64::MAX));
        let outcome = Outcome::Synced {
            target: &plan.target,
            desired: &want,
            report: &report,
        };
        if self.patch_status(ctx, &outcome).await? == StatusWrite::Deferred {
            // Counts only: written on the requeue, at most once per STATUS_INTERVAL.
            return Ok(Action::requeue(STATUS_INTERVAL));
        }
        Ok(Action::requeue(RESYNC))
    }

    /// Observes, for each selected pod whose Ready condition changed (or that began terminating)
    /// since this process started and that was not observed yet, the time from that change to
    /// this commit. Kubernetes keeps whole seconds, so "since" is compared per pod, not by time.
    fn observe_propagation(&self, ctx: &Context, selected: &[Arc<Pod>]) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let service = format!(
            "{}/{}/",
            self.namespace().unwrap_or_default(),
            self.name_any()
        );
        let mut seen = ctx.transitions.lock().expect("lock");
        let mut current = HashSet::new();
        for pod in selected {
            let ready_changed = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0);
            let changed = pod
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| t.0)
                .or(ready_changed);
            let Some(changed) = changed else { continue };
            let key = format!("{service}{}", pod.name_any());
            if changed >= ctx.started && seen.get(&key) != Some(&changed) {
                let seconds = now.duration_since(changed).as_secs_f64().max(0.0);
                ctx.metrics.propagation.observe(seconds);
            }
            seen.insert(key.clone(), changed);
            current.insert(key);
        }
        seen.retain(|key, _| !key.starts_with(&service) || current.contains(key));
    }

    /// Claims the target; takes it over when the recorded owner no longer exists.
    async fn claim(&self, ctx: &Context, target: &str, owner: &Owner) -> Result<Claim> {
        let claim = ctx.registry.claim(target, owner).await?;
        let Claim::Conflict {
            owner: other,
            mod_revision,
        } = &claim
        else {
            return Ok(claim);
        };
        if other.namespace.is_empty() {
            return Ok(claim);
        }
        let api: Api<GrpcService> = Api::namespaced(ctx.client.clone(), &other.namespace);
        let alive = api
            .get_opt(&other.name)
            .await
            .map_err(Error::kube("look up target owner"))?
            .is_some_and(|o| o.uid().as_deref() == Some(other.uid.as_str()));
        if alive {
            Ok(claim)
        } else {
            info!(stale_owner = %format!("{}/{}", other.namespace, other.name), "target owner no longer exists; taking over");
            ctx.registry.take_over(target, owner, *mod_revision).await
        }
    }

    /// Reports a spec that cannot be applied. What is already published stays (a typo must not
    /// take a service down); the next spec or pod change is reconciled afresh.
    async fn invalid_spec(&self, ctx: &Context, error: &SpecError) -> Result<Action> {
        warn!(error = %error, "invalid spec");
        let outcome = Outcome::InvalidSpec {
            message: error.to_string(),
        };
        self.patch_status(ctx, &outcome).await?;
        Ok(Action::await_change())
    }

    /// Reports an etcd failure in status (best effort) and hands the error to the retry policy.
    async fn etcd_failed(
        &self,
        ctx: &Context,
        target: &str,
        want: Option<&crate::desired::Desired>,
        error: Error,
    ) -> Result<Action> {
        if let Error::Fenced { .. } = error {
            // Deposed mid-reconcile: the new leader owns status now.
            info!(error = %error, "not the leader; leaving this service to the leader");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let outcome = Outcome::EtcdUnavailable {
            target,
            message: error.to_string(),
            desired: want,
        };
        if let Err(e) = self.patch_status(ctx, &outcome).await {
            warn!(error = %e, "failed to report etcd failure in status");
        }
        Err(error)
    }

    /// Deletes this service's keys and ownership record; the finalizer is released after.
    async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        let owner = self.owner()?;
        let mut targets: Vec<String> = self
            .status
            .as_ref()
            .and_then(|s| s.target.clone())
            .into_iter()
            .collect();
        if let Ok(plan) = Plan::new(self, &ctx.policy)
            && !targets.contains(&plan.target)
        {
            targets.push(plan.target);
        }
        for target in targets {
            let deleted = ctx.registry.release(&target, &owner).await?;
            info!(target, deleted, "deregistered service");
        }
        ctx.selections.record(ObjectRef::from_obj(self), []);
        ctx.metrics.registered_endpoints.remove(&ServiceLabels {
            namespace: owner.namespace,
            name: owner.name,
        });
        Ok(Action::await_change())
    }

    /// Writes status with server-side apply, only when it changed. A change of counts only (the
    /// Ready condition's status and reason unchanged) within [`STATUS_INTERVAL`] of this
    /// service's last write is deferred: under churn, a status write per readiness flip would
    /// load the API server and hold up the next reconcile of the service.
    async fn patch_status(&self, ctx: &Context, outcome: &Outcome<'_>) -> Result<StatusWrite> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let next = next_status(
            self.status.as_ref(),
            self.metadata.generation,
            outcome,
            &now,
        );
        // A replica deposed mid-reconcile leaves status to the new leader.
        if self.status.as_ref() == Some(&next) || !ctx.registry.may_write() {
            return Ok(StatusWrite::Unchanged);
        }
        let uid = self.uid().unwrap_or_default();
        let counts_only = matches!(outcome, Outcome::Synced { .. })
            && event_for(self.status.as_ref(), &next).is_none();
        if counts_only
            && ctx
                .status_writes
                .lock()
                .expect("lock")
                .get(&uid)
                .is_some_and(|at| at.elapsed() < STATUS_INTERVAL)
        {
            return Ok(StatusWrite::Deferred);
        }
        let api: Api<GrpcService> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "grpc-registrar.io/v1alpha1",
            "kind": "GrpcService",
            "status": next,
        });
        api.patch_status(
            &self.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(Error::kube("patch status"))?;
        ctx.status_writes
            .lock()
            .expect("lock")
            .insert(uid, std::time::Instant::now());
        if let (Some(recorder), Some(event)) = (&ctx.events, event_for(self.status.as_ref(), &next))
        {
            // Best effort: an Event that cannot be written must not fail the reconcile.
            if let Err(e) = recorder.publish(&event, &self.object_ref(&())).await {
                warn!(error = %e, "failed to publish event");
            }
        }
        Ok(StatusWrite::Written)
    }
}

#[cfg(test)]
mod tests;
