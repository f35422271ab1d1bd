//! The reconciler: a `GrpcService` and its candidates in the sources → the registry → status.
//!
//! - `runner`: [`run`], the controller process: the watches, what reconciles everything, and
//!   the tasks beside the reconciler.
//! - `sources`: the registered endpoint sources ([`crate::source::Source`]) and their watches;
//!   `watch`: which services an object event wakes, and the GrpcService feed.
//! - `service`: `impl GrpcService { apply, cleanup }` and status writes.
//! - `state`: what is kept per service between reconciles; `release`: the services waiting in
//!   `Conflict` for a target.
//! - [`status`]: the next status and its Event, purely.

mod evaluation;
mod pacing;
pub mod publication;
mod release;
mod report;
mod runner;
mod service;
mod sources;
mod state;
pub mod status;
pub mod sweep;
mod vanished;
mod watch;
pub mod writer;
pub mod writers;

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tracing::{field, instrument, warn};

pub use runner::run;
pub use sources::Sources;
pub use watch::{Mapper, Selections, ServiceFeed};

use crate::backoff::Backoff;
use crate::crd::GrpcService;
use crate::desired::Policy;
use crate::leader::Role;
use crate::metrics::Metrics;
use crate::registry::Backend;
use crate::{Error, Result};

/// The field manager for status writes (server-side apply).
pub const FIELD_MANAGER: &str = "grpc-registrar";

/// How often a healthy service is re-synced even without events, to repair out-of-band edits.
pub const RESYNC: Duration = Duration::from_secs(300);

/// The least time between two counts-only status writes of one service.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// The least time between two `EndpointsChanged` Events of one service: under churn, one Event
/// sums up the counts instead of one per pod.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// How long a reconcile waits for the source indexes' initial lists before it requeues. Long
/// enough for a cold start's list (about 15 s for 100,000 pods), so that a service is
/// reconciled once when its source has listed instead of requeued every few seconds meanwhile;
/// a source that never lists holds a reconcile slot this long at a time.
const SOURCES_SYNC_WAIT: Duration = Duration::from_secs(30);

/// How often a service in conflict re-checks whether the target was freed.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(15);

/// Reconciles run at once by default (`--reconcile-concurrency`). Unbounded, a cold start of
/// 10,000 services put every reconcile in flight at once: registry requests queued past their
/// timeout and were retried, and each held its memory at once (796 MiB at 100k pods, 438 MiB
/// bounded). Bounded low (64), a cold start waits on the registry's latency instead of its
/// throughput: it commits concurrent writes together, so more in flight is faster up to its
/// limit.
pub const CONCURRENCY: u16 = 1024;

/// How the controller trades latency, throughput and CPU: the reconciles run at once, and how
/// often one service's source changes may reconcile it (see [`pacing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Most services reconciled at once (`--reconcile-concurrency`).
    pub concurrency: u16,
    /// Least time between two source-triggered reconciles of one service
    /// (`--min-sync-interval`); zero reconciles on every change.
    pub min_sync_interval: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            concurrency: CONCURRENCY,
            min_sync_interval: Duration::ZERO,
        }
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The registry backend.
    pub backend: Arc<dyn Backend>,
    /// The endpoint sources, each with what each service last read of it and whether its list
    /// is complete.
    pub sources: Sources,
    /// Target policy.
    pub policy: Policy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// This replica's role; only the leader writes.
    pub role: tokio::sync::watch::Receiver<Role>,
    /// Writes status, finalizers and Events behind the registry (see [`writer`]).
    pub writer: writer::ApiWriter,
    /// When this process started: older transitions are not propagation samples.
    started: k8s_openapi::jiff::Timestamp,
    /// What this process keeps per service between reconciles (see [`state`]).
    states: state::ServiceStates,
    /// The last evaluation of each large service, to evaluate only what changed since (see
    /// [`evaluation`]).
    evaluations: evaluation::Evaluations,
    /// The last valid publication of each service, as recorded in the registry (this is a
    /// cache of the registry's records): a spec turned invalid keeps publishing under it,
    /// following readiness, across a lease replacement, a restart and a failover.
    published: publication::Records,
    /// The services waiting in `Conflict` for a target, woken when it is released.
    waiting: release::Waiting,
    /// The uids of services seen deleted without our finalizer (or left out of a re-list),
    /// with when: never published again, whatever a stale view still holds.
    gone: sweep::Gone,
}

impl Context {
    /// A context reading `sources` (see [`Sources::with`]).
    #[must_use]
    pub fn new(
        client: Client,
        backend: Arc<dyn Backend>,
        sources: Sources,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let writer = writer::ApiWriter::new(client.clone(), None, backend.clone(), metrics.clone());
        Self {
            client,
            backend,
            sources,
            policy,
            metrics,
            role: crate::leader::always_leader(),
            writer,
            // Whole seconds, as Kubernetes stores transition times.
            started: k8s_openapi::jiff::Timestamp::from_second(
                k8s_openapi::jiff::Timestamp::now().as_second(),
            )
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
            states: state::ServiceStates::default(),
            evaluations: evaluation::Evaluations::default(),
            published: publication::Records::default(),
            waiting: release::Waiting::new(tokio::sync::mpsc::unbounded_channel().0),
            gone: sweep::Gone::default(),
        }
    }

    /// The same context, sending the services a release frees to `freed`.
    #[must_use]
    pub fn with_freed(
        self,
        freed: tokio::sync::mpsc::UnboundedSender<ObjectRef<GrpcService>>,
    ) -> Self {
        Self {
            waiting: release::Waiting::new(freed),
            ..self
        }
    }

    /// The same context, publishing Events on GrpcServices as `reporter`.
    #[must_use]
    pub fn with_events(self, reporter: Reporter) -> Self {
        let writer = writer::ApiWriter::new(
            self.client.clone(),
            Some(reporter),
            self.backend.clone(),
            self.metrics.clone(),
        );
        Self { writer, ..self }
    }

    /// The same context, writing only while `role` says leader.
    #[must_use]
    pub fn with_role(self, role: tokio::sync::watch::Receiver<Role>) -> Self {
        Self { role, ..self }
    }

    /// The leadership term this replica writes in (0 without leader election); the caches of
    /// what the registry holds belong to one term.
    fn term(&self) -> i64 {
        match *self.role.borrow() {
            Role::Leader { term } => term,
            Role::Follower => -1,
        }
    }

    /// Forgets everything this process kept for the service `uid` (`service`, when known, is
    /// also forgotten by the sources and the conflict waits): it is gone.
    fn forget_service(&self, uid: &str, service: Option<&ObjectRef<GrpcService>>) {
        self.states.forget(uid);
        self.evaluations.forget(uid);
        self.published.forget(uid);
        self.writer.forget(uid);
        if let Some(service) = service {
            self.waiting.stop_waiting(service);
            self.sources.forget(service);
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

/// Reconciles one `GrpcService`: finalizer, then apply or cleanup.
///
/// # Errors
/// Retried by [`error_policy`] with backoff.
#[instrument(skip_all, fields(namespace = field::Empty, name = %svc.name_any(), registry_target = field::Empty))]
pub async fn reconcile(svc: Arc<GrpcService>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.backend.may_write() {
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
    // Never compute desired state from a half-filled index: that would delete live keys. Only
    // the spec's own source is waited for (a selector's pods, a serviceRef's slices; every
    // source when the spec names none), so that one watch failing (e.g. EndpointSlices not
    // readable) holds up only the services that read it. The wait is bounded, so that shutdown
    // (which waits for running reconciles) is too when the API server never answers.
    if !ctx.sources.wait_synced(&svc.spec, SOURCES_SYNC_WAIT).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let api: Api<GrpcService> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = svc.uid().unwrap_or_default();
    // Seen deleted: a view that still holds it (a leader's store behind its watch) must not
    // publish it again after the sweep released it.
    if ctx.gone.contains(&uid) {
        return Ok(Action::await_change());
    }
    let finalizer = ctx.policy.backend.finalizer();
    // A service published into another backend is that backend's controller's; one that moved
    // there is released here first (our finalizer says we published it).
    let ours = svc.spec.backend == ctx.policy.backend;
    let action = if svc.metadata.deletion_timestamp.is_some() || !ours {
        let Some(index) = svc.finalizers().iter().position(|f| f == finalizer) else {
            return Ok(Action::await_change());
        };
        let action = svc.cleanup(&ctx).await?;
        remove_finalizer(&api, &svc, index, finalizer).await?;
        action
    } else {
        // The registry first: the finalizer is added behind the first registry write (a
        // service deleted before it lands is released by the owner-record sweep).
        let action = svc.apply(&ctx).await?;
        if !svc.finalizers().iter().any(|f| f == finalizer) {
            ctx.writer.add_finalizer(&svc, finalizer);
        }
        action
    };
    ctx.states.succeeded(&uid);
    Ok(action)
}

/// Removes the finalizer at `index` once cleanup is done, guarded by a test so that a
/// concurrent change of the list fails (and is retried) instead of removing another entry.
async fn remove_finalizer(
    api: &Api<GrpcService>,
    svc: &GrpcService,
    index: usize,
    finalizer: &str,
) -> Result<()> {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{PatchOperation, RemoveOperation, TestOperation};
    let path = PointerBuf::parse(format!("/metadata/finalizers/{index}"))
        .map_err(|_| Error::MissingField("finalizers"))?;
    let patch = json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: path.clone(),
            value: finalizer.into(),
        }),
        PatchOperation::Remove(RemoveOperation { path }),
    ]);
    match api
        .patch(
            &svc.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await
    {
        // Already gone: nothing left to release.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        result => result.map(|_| ()).map_err(Error::kube("remove finalizer")),
    }
}

/// Requeues a failed reconcile with per-service exponential backoff (200 ms doubling to 60 s).
pub fn error_policy(svc: Arc<GrpcService>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.metric_label());
    let text = crate::error::chain(error);
    let (delay, repeated) = ctx.states.with(&svc.uid().unwrap_or_default(), |state| {
        let (backoff, last) = state
            .failure
            .get_or_insert_with(|| (Backoff::reconcile(), String::new()));
        let repeated = *last == text;
        last.clone_from(&text);
        (backoff.next().unwrap_or(Duration::from_secs(60)), repeated)
    });
    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    // The first failure of a streak (or a different one) at warn level; the same failure again
    // at debug, so an outage is one line per service, not one per retry.
    if repeated {
        tracing::debug!(namespace, name, error = %text, retry_in_ms, "reconcile failed again");
    } else {
        warn!(namespace, name, error = %text, retry_in_ms, "reconcile failed; retrying with backoff");
    }
    Action::requeue(delay)
}

#[cfg(test)]
mod tests;
