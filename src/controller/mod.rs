//! The reconciler: a `GrpcService` and its candidates in the index → the registry → status.
//!
//! - `watch`: the watch streams that feed the indexes (pods, EndpointSlices, GrpcServices'
//!   selectors and references), and the mappers that wake only the services a pod or slice
//!   event concerns.
//! - `service`: `impl GrpcService { apply, cleanup }` and status writes.
//! - [`status`]: the next status and its Event, purely.

pub mod publication;
mod service;
pub mod status;
pub mod sweep;
mod vanished;
mod watch;
pub mod writer;
pub mod writers;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, field, info, info_span, instrument, warn};

pub use watch::{PodFeed, PodMapper, Selections, ServiceFeed, SliceFeed, SliceMapper};

use crate::backoff::Backoff;
use crate::crd::GrpcService;
use crate::desired::Policy;
use crate::leader::Role;
use crate::metrics::Metrics;
use crate::registry::Backend;
use crate::source::index::{CandidateIndex, SelectorIndex, ServiceRefIndex, SliceIndex};
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

/// How long a reconcile waits for the source indexes' initial lists before it requeues.
const SOURCES_SYNC_WAIT: Duration = Duration::from_secs(2);

/// How often a service in conflict re-checks whether the target was freed.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(15);

/// Reconciles run at once. Unbounded, a cold start of thousands of services opened one
/// HTTP/1.1 + TLS connection to the API server per in-flight request, and the handshakes (on
/// both sides) dominated; bounded, the client's connection pool is reused.
pub const CONCURRENCY: u16 = 64;

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The registry backend.
    pub backend: Arc<dyn Backend>,
    /// Pod candidates by namespace and label.
    pub candidates: CandidateIndex,
    /// EndpointSlice candidates by namespace and Service.
    pub slices: SliceIndex,
    /// Target policy.
    pub policy: Policy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Which pods each service last selected; read by the pod mapper.
    pub selections: Selections<Pod>,
    /// Which EndpointSlices each service last read; read by the slice mapper.
    pub slice_selections: Selections<EndpointSlice>,
    /// This replica's role; only the leader writes.
    pub role: tokio::sync::watch::Receiver<Role>,
    /// Writes status, finalizers and Events behind the registry (see [`writer`]).
    pub writer: writer::ApiWriter,
    /// True once the pod index has completed its initial list.
    pub pods_synced: tokio::sync::watch::Receiver<bool>,
    /// True once the EndpointSlice index has completed its initial list.
    pub slices_synced: tokio::sync::watch::Receiver<bool>,
    /// When this process started: older transitions are not propagation samples.
    started: k8s_openapi::jiff::Timestamp,
    /// The last readiness transition observed, per service (`<namespace>/<name>`) and
    /// candidate id: a reconcile reads and prunes only its own service's entries.
    /// With when the service was created.
    transitions: Mutex<HashMap<String, Transitions>>,
    /// The last registry change per service uid, whose revision and time status carries.
    last_changes: Mutex<HashMap<String, status::LastChange>>,
    /// The registered count last announced in an Event, and when, per service uid.
    announced: Mutex<HashMap<String, (usize, std::time::Instant)>>,
    /// Retry pacing per failing service uid.
    failures: Mutex<HashMap<String, (Backoff, String)>>,
    /// The last valid publication of each service, as recorded in the registry (this is a
    /// cache of the registry's records): a spec turned invalid keeps publishing under it,
    /// following readiness, across a lease replacement, a restart and a failover.
    published: publication::Records,
    /// The services waiting in `Conflict`, by the target holding them off: releasing that
    /// target wakes them at once (the periodic re-check covers releases made elsewhere).
    waiting: Mutex<HashMap<String, HashSet<ObjectRef<GrpcService>>>>,
    /// Where woken services go: the controller reconciles them.
    freed: tokio::sync::mpsc::UnboundedSender<ObjectRef<GrpcService>>,
}

impl Context {
    /// A context over a pod candidate index (and no EndpointSlices, see
    /// [`Context::with_slices`]), assumed complete (see [`Context::with_sources_synced`]).
    #[must_use]
    pub fn new(
        client: Client,
        backend: Arc<dyn Backend>,
        candidates: CandidateIndex,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let writer = writer::ApiWriter::new(client.clone(), None, backend.clone(), metrics.clone());
        Self {
            client,
            backend,
            candidates,
            slices: SliceIndex::default(),
            policy,
            metrics,
            selections: Selections::default(),
            slice_selections: Selections::default(),
            role: crate::leader::always_leader(),
            writer,
            pods_synced: tokio::sync::watch::channel(true).1,
            slices_synced: tokio::sync::watch::channel(true).1,
            // Whole seconds, as Kubernetes stores transition times.
            started: k8s_openapi::jiff::Timestamp::from_second(
                k8s_openapi::jiff::Timestamp::now().as_second(),
            )
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
            transitions: Mutex::default(),
            last_changes: Mutex::default(),
            announced: Mutex::default(),
            failures: Mutex::default(),
            published: publication::Records::default(),
            waiting: Mutex::default(),
            freed: tokio::sync::mpsc::unbounded_channel().0,
        }
    }

    /// The same context, sending the services a release frees to `freed`.
    #[must_use]
    pub fn with_freed(
        self,
        freed: tokio::sync::mpsc::UnboundedSender<ObjectRef<GrpcService>>,
    ) -> Self {
        Self { freed, ..self }
    }

    /// Notes that `service` waits for `target` to be released.
    fn wait_for_release(&self, target: &str, service: ObjectRef<GrpcService>) {
        self.waiting
            .lock()
            .expect("lock")
            .entry(target.to_owned())
            .or_default()
            .insert(service);
    }

    /// Forgets whatever `service` waited for (it owns its target now, or is gone).
    fn stop_waiting(&self, service: &ObjectRef<GrpcService>) {
        let mut waiting = self.waiting.lock().expect("lock");
        for services in waiting.values_mut() {
            services.remove(service);
        }
        waiting.retain(|_, services| !services.is_empty());
    }

    /// The leadership term this replica writes in (0 without leader election); the caches of
    /// what the registry holds belong to one term.
    fn term(&self) -> i64 {
        match *self.role.borrow() {
            Role::Leader { term } => term,
            Role::Follower => -1,
        }
    }

    /// `target` was released: the services waiting for it are reconciled now.
    fn released(&self, target: &str) {
        let woken = self.waiting.lock().expect("lock").remove(target);
        for service in woken.into_iter().flatten() {
            let _ = self.freed.send(service);
        }
    }

    /// The same context, reconciling a service only once its source's index is complete
    /// (`pods` and `slices` say so).
    #[must_use]
    pub fn with_sources_synced(
        self,
        pods: tokio::sync::watch::Receiver<bool>,
        slices: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            pods_synced: pods,
            slices_synced: slices,
            ..self
        }
    }

    /// The same context, reading `serviceRef` endpoints from `slices`.
    #[must_use]
    pub fn with_slices(self, slices: SliceIndex) -> Self {
        Self { slices, ..self }
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
}

/// When a service was created (on the monotonic clock), and the last change seen of each of
/// its candidates.
type Transitions = (std::time::Instant, HashMap<String, std::time::Instant>);

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
/// (see [`crate::leader`]), and on becoming the leader it reconciles every service at once, as
/// it does on every backend event (a replaced lease, the registry lost or back).
/// Graceful shutdown finishes in-flight reconciles and does not revoke the lease.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    backend: Arc<dyn Backend>,
    scope: Scope,
    policy: Policy,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    role: tokio::sync::watch::Receiver<Role>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let services: Api<GrpcService> = api(&client, &scope);
    let pods_api: Api<Pod> = api(&client, &scope);
    let slices_api: Api<EndpointSlice> = api(&client, &scope);

    // Readiness of each index is observed on its event stream (InitDone, after the index
    // applied it), not with `Store::wait_until_ready`: that future is backed by a oneshot that
    // keeps only the last waker, so with several concurrent waiters all but one can wait
    // forever.
    let pods_synced = tokio::sync::watch::Sender::new(false);
    let slices_synced = tokio::sync::watch::Sender::new(false);
    let services_synced = tokio::sync::watch::Sender::new(false);
    let candidates = CandidateIndex::default();
    let slices = SliceIndex::default();
    let selectors = SelectorIndex::default();
    let refs = ServiceRefIndex::default();

    let mut pod_feed = PodFeed::new(candidates.clone());
    let pods_done = pods_synced.clone();
    // A re-list after a watch gap (410 Gone, an API server restart) swaps the whole index in:
    // pods deleted in the gap produce no event, so every service is reconciled then.
    let relists = tokio::sync::watch::Sender::new(0_u64);
    let relisted = relists.clone();
    let slices_relisted = relists.clone();
    // Streaming lists: the initial pods arrive as watch events from the API server's cache, not
    // as one list response (at 100k pods, a 100k-object response took minutes to build and
    // decode, and held it all in memory at once).
    let pod_events = watcher(pods_api, watcher::Config::default().streaming_lists())
        .backoff(Backoff::watch())
        .inspect(move |event| {
            if let Ok(event) = event
                && pod_feed.apply(event)
                && pods_done.send_replace(true)
            {
                relisted.send_modify(|n| *n += 1);
            }
        })
        .touched_objects();
    // The same for EndpointSlices: each slice is decoded into candidates once, here, and the
    // object itself is dropped after the mapper has read its name and Service label.
    let mut slice_feed = SliceFeed::new(slices.clone());
    let slices_done = slices_synced.clone();
    let slice_events = watcher(slices_api, watcher::Config::default().streaming_lists())
        .backoff(Backoff::watch())
        .inspect(move |event| {
            if let Ok(event) = event
                && slice_feed.apply(event)
                && slices_done.send_replace(true)
            {
                slices_relisted.send_modify(|n| *n += 1);
            }
        })
        .touched_objects();
    let (svc_store, svc_writer) = reflector::store();
    let mut svc_feed = ServiceFeed::new(selectors.clone(), refs.clone());
    let services_done = services_synced.clone();
    // A service of ours deleted without our finalizer (deleted before the finalizer written
    // behind its first registry write landed) is released by the sweep.
    let (gone_tx, gone_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (ours, finalizer) = (policy.backend, policy.backend.finalizer());
    let mut vanished = vanished::Vanished::default();
    let svc_events = watcher(services, watcher::Config::default().streaming_lists())
        .backoff(Backoff::watch())
        .reflect(svc_writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::Delete(svc)) = event
                && svc.spec.backend == ours
                && !svc.finalizers().iter().any(|f| f == finalizer)
            {
                let _ = gone_tx.send(svc.uid().unwrap_or_default());
            }
            // Deleted while this replica's watch was broken: only a re-list tells.
            if let Ok(event) = event {
                for uid in vanished.apply(event, |svc| svc.spec.backend == ours) {
                    let _ = gone_tx.send(uid);
                }
            }
            if let Ok(event) = event
                && svc_feed.apply(event)
            {
                services_done.send_replace(true);
            }
        })
        .applied_objects()
        // Only what a reconcile acts on wakes it: a new generation (the spec) or a deletion.
        // The status, finalizer and Event writes of its own reconciles do not.
        .predicate_filter(
            |svc: &GrpcService| {
                use std::hash::{Hash, Hasher};
                let mut hash = std::collections::hash_map::DefaultHasher::new();
                (
                    svc.uid(),
                    svc.metadata.generation,
                    svc.metadata.deletion_timestamp.is_some(),
                )
                    .hash(&mut hash);
                Some(hash.finish())
            },
            kube::runtime::PredicateConfig::default(),
        );

    let replays = metrics.clone();
    let backend_events = futures::stream::unfold(backend.events(), move |mut rx| {
        let replays = replays.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        if matches!(event, crate::registry::Event::Replaced { .. }) {
                            // Every service is reconciled, which re-puts its keys on the new lease.
                            replays.lease_replays.inc();
                        }
                        return Some(((), rx));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
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
    let relisted = futures::stream::unfold(relists.subscribe(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let reconcile_all =
        futures::stream::select(futures::stream::select(backend_events, elected), relisted);

    let controller =
        Controller::for_stream(svc_events, svc_store.clone()).trigger_backoff(Backoff::watch());
    // A release wakes the services waiting in Conflict for that target.
    let (freed_tx, freed_rx) = tokio::sync::mpsc::unbounded_channel();
    let freed = futures::stream::unfold(freed_rx, |mut rx| async move {
        rx.recv().await.map(|service| (service, rx))
    });
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(
        Context::new(client, backend, candidates.clone(), policy, metrics)
            .with_freed(freed_tx)
            .with_slices(slices.clone())
            .with_role(role)
            .with_events(reporter)
            .with_sources_synced(pods_synced.subscribe(), slices_synced.subscribe()),
    );
    let mapper = PodMapper::new(candidates.clone(), selectors, ctx.selections.clone());
    let slice_mapper = SliceMapper::new(refs, ctx.slice_selections.clone());
    {
        let ready = ready.clone();
        let svc_store = svc_store.clone();
        let (mut pods, mut slices_listed, mut services) = (
            pods_synced.subscribe(),
            slices_synced.subscribe(),
            services_synced.subscribe(),
        );
        tokio::spawn(async move {
            if pods.wait_for(|s| *s).await.is_ok()
                && slices_listed.wait_for(|s| *s).await.is_ok()
                && services.wait_for(|s| *s).await.is_ok()
            {
                info!(
                    candidates = candidates.len(),
                    endpoints = slices.len(),
                    services = svc_store.len(),
                    "caches synced"
                );
                ready.store(true, Ordering::Relaxed);
            }
        });
    }
    // kube holds the runner until the service store is ready, and a held runner never sees the
    // graceful shutdown: with the API server unreachable from the start, shutdown would wait
    // forever. Until the caches are synced nothing has been reconciled, so stopping at once
    // then is safe; once synced, shutdown is graceful (in-flight reconciles finish).
    let shutdown = shutdown.shared();
    // Status, finalizers and Events are written behind; the writer flushes once the last
    // reconcile has handed it its work.
    let (writer_stop, writer_stopped) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(
        ctx.writer
            .clone()
            .run(async move {
                let _ = writer_stopped.await;
            })
            .instrument(info_span!("status_writer")),
    );
    tokio::spawn(
        sweeper(
            ctx.clone(),
            svc_store.clone(),
            scope.clone(),
            services_synced.subscribe(),
            gone_rx,
        )
        .instrument(info_span!("sweep")),
    );
    // One writer per scope: announced every third of the default TTL (1 to 10 s).
    tokio::spawn(
        writers::run(
            ctx.clone(),
            svc_store.clone(),
            writers::instance(),
            (ctx.backend.default_ttl() / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)),
        )
        .instrument(info_span!("writers")),
    );
    let synced_flag = ready.clone();
    let stop_unsynced = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            if synced_flag.load(Ordering::Relaxed) {
                future::pending::<()>().await;
            }
        }
    };
    // The same failure repeats while the API server is unreachable: said once at warn level,
    // the repeats at debug until something succeeds.
    let mut last_error: Option<String> = None;
    let run = controller
        .watches_stream(pod_events, move |pod| mapper.map(&pod))
        .watches_stream(slice_events, move |slice| slice_mapper.map(&slice))
        .reconcile_all_on(reconcile_all)
        .reconcile_on(freed)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(move |result| {
            // A failed reconcile was logged once, by `error_policy`; only the controller's own
            // errors (e.g. a watch that cannot start) are logged here.
            match result {
                Ok(_) => last_error = None,
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => {
                    let text = crate::error::chain(&e);
                    if last_error.as_ref() == Some(&text) {
                        tracing::debug!(error = %text, "controller error (repeated)");
                    } else {
                        warn!(error = %text, "controller error; retrying with backoff");
                        last_error = Some(text);
                    }
                }
            }
            future::ready(())
        })
        .instrument(info_span!("controller"));
    tokio::select! {
        () = run => {}
        () = stop_unsynced => info!("stopped before the caches synced; nothing was reconciled"),
    }
    let _ = writer_stop.send(());
    let _ = writer.await;
    info!("controller stopped");
}

/// Runs the owner-record sweep (see [`sweep`]): for each service deleted without our finalizer
/// as it goes, and over every record once the caches are synced, on becoming the leader, and
/// every [`RESYNC`].
async fn sweeper(
    ctx: Arc<Context>,
    store: reflector::Store<GrpcService>,
    scope: Scope,
    mut synced: tokio::sync::watch::Receiver<bool>,
    mut gone: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut role = ctx.role.clone();
    // Without leader election the role never changes (its sender is gone).
    let mut elected = true;
    let mut every = tokio::time::interval(RESYNC);
    // Services seen deleted without our finalizer, retried by the periodic sweep for an hour.
    let mut deleted: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            uid = gone.recv() => {
                let Some(uid) = uid else { return };
                ctx.writer.forget(&uid);
                sweep::sweep(ctx.backend.as_ref(), &scope, |_| false, Some(&uid)).await;
                deleted.insert(uid, std::time::Instant::now());
            }
            changed = role.changed(), if elected => {
                if changed.is_err() {
                    elected = false;
                    continue;
                }
                // Another leader may have written status meanwhile: the objects' own statuses
                // are the truth again.
                ctx.writer.clear();
                if matches!(*role.borrow_and_update(), Role::Leader { .. }) {
                    sweep_all(&ctx, &store, &scope, &deleted).await;
                }
            }
            _ = every.tick() => {
                deleted.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
                sweep_all(&ctx, &store, &scope, &deleted).await;
            }
        }
    }
}

/// Sweeps every record of this controller's scope: those of services seen `deleted`, and those
/// whose namespace and name now belong to another GrpcService.
async fn sweep_all(
    ctx: &Context,
    store: &reflector::Store<GrpcService>,
    scope: &Scope,
    deleted: &HashMap<String, std::time::Instant>,
) {
    // The records first, then the live set: a record written for a service the store did not
    // yet hold cannot exist (reconciles are driven from the store).
    let names = std::sync::OnceLock::new();
    let orphan = |owner: &crate::registry::Owner| {
        let live = names.get_or_init(|| {
            store
                .state()
                .iter()
                .filter_map(|svc| Some(((svc.namespace()?, svc.name_any()), svc.uid()?)))
                .collect::<HashMap<(String, String), String>>()
        });
        sweep::orphaned(owner, deleted, live)
    };
    let released = sweep::sweep(ctx.backend.as_ref(), scope, orphan, None).await;
    if released > 0 {
        info!(
            released,
            "released the targets of GrpcServices that no longer exist"
        );
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
    // the spec's own source is waited for (a selector's pods, a serviceRef's slices; both when
    // the spec names neither or both), so that one watch failing (e.g. EndpointSlices not
    // readable) holds up only the services that read it. The wait is bounded, so that shutdown
    // (which waits for running reconciles) is too when the API server never answers.
    let (pods, slices) = (svc.spec.selector.is_some(), svc.spec.service_ref.is_some());
    let waits = [
        (pods || !slices).then(|| ctx.pods_synced.clone()),
        (slices || !pods).then(|| ctx.slices_synced.clone()),
    ];
    for mut synced in waits.into_iter().flatten() {
        match tokio::time::timeout(SOURCES_SYNC_WAIT, synced.wait_for(|synced| *synced)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Ok(Action::requeue(Duration::from_secs(1))),
        }
    }
    let api: Api<GrpcService> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = svc.uid().unwrap_or_default();
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
    ctx.failures.lock().expect("lock").remove(&uid);
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
    let (delay, repeated) = {
        let mut failures = ctx.failures.lock().expect("lock");
        let (backoff, last) = failures
            .entry(svc.uid().unwrap_or_default())
            .or_insert_with(|| (Backoff::reconcile(), String::new()));
        let repeated = *last == text;
        last.clone_from(&text);
        (backoff.next().unwrap_or(Duration::from_secs(60)), repeated)
    };
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
