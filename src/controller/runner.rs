//! The controller process: the watches, what reconciles every service at once, and the tasks
//! beside the reconciler (the status writer, the owner-record sweep, the writer check).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt, future};
use kube::api::Api;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use super::pacing::Pacing;
use super::sources::{Sources, Watches};
use super::watch::ServiceFeed;
use super::{
    Context, FIELD_MANAGER, Scope, Tuning, api, error_policy, reconcile, sweep, vanished, writers,
};
use crate::backoff::Backoff;
use crate::crd::GrpcService;
use crate::desired::Policy;
use crate::leader::Role;
use crate::metrics::Metrics;
use crate::registry::Backend;

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
    tuning: Tuning,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // A re-list of any source after a watch gap reconciles every service.
    let relists = tokio::sync::watch::Sender::new(0_u64);
    let watches = Watches::new(client.clone(), scope.clone(), relists.clone());
    let services_synced = tokio::sync::watch::Sender::new(false);
    let services = watch_services(
        &client,
        &scope,
        &policy,
        watches.sources(),
        &services_synced,
    );
    let reconcile_all = reconcile_all(backend.as_ref(), &metrics, &role, &relists);
    let (freed_tx, freed_rx) = tokio::sync::mpsc::unbounded_channel();
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(
        Context::new(client, backend, watches.sources().clone(), policy, metrics)
            .with_freed(freed_tx)
            .with_role(role)
            .with_events(reporter),
    );
    let store = services.store.clone();
    report_ready(&ready, &ctx.sources, &store, services_synced.subscribe());
    let (writer_stop, writer) = spawn_writer(&ctx);
    let beside = spawn_beside(
        &ctx,
        &store,
        &scope,
        services_synced.subscribe(),
        services.gone,
    );
    // kube holds the runner until the service store is ready, and a held runner never sees the
    // graceful shutdown: with the API server unreachable from the start, shutdown would wait
    // forever. Until the caches are synced nothing has been reconciled, so stopping at once
    // then is safe; once synced, shutdown is graceful (in-flight reconciles finish).
    let shutdown = shutdown.shared();
    let stop_unsynced = stop_unsynced(shutdown.clone(), ready);
    // A release wakes the services waiting in Conflict for that target.
    let freed = futures::stream::unfold(freed_rx, |mut rx| async move {
        rx.recv().await.map(|service| (service, rx))
    });
    let controller = Controller::for_stream(services.events, store.clone())
        .with_config(Config::default().concurrency(tuning.concurrency))
        .trigger_backoff(Backoff::watch());
    let (pacing, released) = Pacing::new(tuning.min_sync_interval);
    // A service deleted while its trigger was held is not reconciled for it.
    let known = store.clone();
    let released = released.filter(move |service| future::ready(known.get(service).is_some()));
    let run = watches
        .attach(controller, &pacing)
        .reconcile_on(released)
        .reconcile_all_on(reconcile_all)
        .reconcile_on(freed)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(log_controller_errors())
        .instrument(info_span!("controller"));
    tokio::select! {
        () = run => {}
        () = stop_unsynced => info!("stopped before the caches synced; nothing was reconciled"),
    }
    let _ = writer_stop.send(());
    let _ = writer.await;
    // Nothing of this controller outlives it: an embedder that drops the registry after
    // `run` returns stops its lease keeper, and no announcement or sweep writes after.
    for task in beside {
        task.abort();
        let _ = task.await;
    }
    info!("controller stopped");
}

/// The GrpcService watch: the store the controller reconciles from, the events that wake a
/// reconcile, and the uids of services of ours deleted without our finalizer.
struct ServiceWatch<S> {
    store: reflector::Store<GrpcService>,
    events: S,
    gone: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Watches the GrpcServices of `scope`, feeding every source's service index and setting
/// `synced` once listed.
fn watch_services(
    client: &Client,
    scope: &Scope,
    policy: &Policy,
    sources: &Sources,
    synced: &tokio::sync::watch::Sender<bool>,
) -> ServiceWatch<impl Stream<Item = Result<GrpcService, watcher::Error>> + Send + 'static> {
    let api: Api<GrpcService> = api(client, scope);
    let (store, writer) = reflector::store();
    let mut feed = ServiceFeed::new(sources.indexes());
    let done = synced.clone();
    // A service of ours deleted without our finalizer (deleted before the finalizer written
    // behind its first registry write landed) is released by the sweep.
    let (gone_tx, gone) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (ours, finalizer) = (policy.backend, policy.backend.finalizer());
    let mut vanished = vanished::Vanished::default();
    let events = watcher(api, watcher::Config::default().streaming_lists())
        .backoff(Backoff::watch())
        .reflect(writer)
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
                && feed.apply(event)
            {
                done.send_replace(true);
            }
        })
        .applied_objects()
        // Only what a reconcile acts on wakes it: a new generation (the spec) or a
        // deletion. The status, finalizer and Event writes of its own reconciles do not.
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
    ServiceWatch {
        store,
        events,
        gone,
    }
}

/// What reconciles every service at once: a backend event (a replaced lease re-puts every key
/// on the new one; the registry lost or back), taking over leadership (every key re-put under
/// this replica's lease before the previous leader's can expire), and a source's re-list.
fn reconcile_all(
    backend: &dyn Backend,
    metrics: &Arc<Metrics>,
    role: &tokio::sync::watch::Receiver<Role>,
    relists: &tokio::sync::watch::Sender<u64>,
) -> impl Stream<Item = ()> + Send + 'static {
    let replays = metrics.clone();
    let backend_events = futures::stream::unfold(backend.events(), move |mut rx| {
        let replays = replays.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        if matches!(event, crate::registry::Event::Replaced { .. }) {
                            // Every service is reconciled, which re-puts its keys on the new lease.
                            replays.lease.replays.inc();
                        }
                        return Some(((), rx));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
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
    futures::stream::select(futures::stream::select(backend_events, elected), relisted)
}

/// Sets `ready` once every source and the GrpcServices are listed.
fn report_ready(
    ready: &Arc<AtomicBool>,
    sources: &Sources,
    store: &reflector::Store<GrpcService>,
    mut services: tokio::sync::watch::Receiver<bool>,
) {
    let (ready, sources, store) = (ready.clone(), sources.clone(), store.clone());
    tokio::spawn(async move {
        for mut synced in sources.synced() {
            if synced.wait_for(|s| *s).await.is_err() {
                return;
            }
        }
        if services.wait_for(|s| *s).await.is_ok() {
            for (source, candidates) in sources.sizes() {
                info!(source, candidates, "source listed");
            }
            info!(services = store.len(), "caches synced");
            ready.store(true, Ordering::Relaxed);
        }
    });
}

/// Spawns the status writer: status, finalizers and Events are written behind, and the writer
/// flushes once the last reconcile has handed it its work (when the sender returned is used or
/// dropped).
fn spawn_writer(
    ctx: &Context,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(
        ctx.writer
            .clone()
            .run(async move {
                let _ = stopped.await;
            })
            .instrument(info_span!("status_writer")),
    );
    (stop, writer)
}

/// Spawns the tasks beside the reconciler: the owner-record sweep, and the one-writer-per-scope
/// announcements (every third of the default TTL, 1 to 10 s). They run until aborted.
fn spawn_beside(
    ctx: &Arc<Context>,
    store: &reflector::Store<GrpcService>,
    scope: &Scope,
    services_synced: tokio::sync::watch::Receiver<bool>,
    gone: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let sweep = tokio::spawn(
        sweep::sweeper(
            ctx.clone(),
            store.clone(),
            scope.clone(),
            services_synced,
            gone,
        )
        .instrument(info_span!("sweep")),
    );
    let writers = tokio::spawn(
        writers::run(
            ctx.clone(),
            store.clone(),
            writers::instance(),
            (ctx.backend.default_ttl() / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)),
        )
        .instrument(info_span!("writers")),
    );
    [sweep, writers]
}

/// Resolves on `shutdown` while the caches are not synced yet (see [`run`]); never once they
/// are, when shutdown is graceful instead.
async fn stop_unsynced(shutdown: impl Future<Output = ()>, synced: Arc<AtomicBool>) {
    shutdown.await;
    if synced.load(Ordering::Relaxed) {
        future::pending::<()>().await;
    }
}

/// Logs the controller's own errors (e.g. a watch that cannot start): a failed reconcile was
/// logged once, by `error_policy`. The same failure repeats while the API server is
/// unreachable: said once at warn level, the repeats at debug until something succeeds.
fn log_controller_errors() -> impl FnMut(
    Result<Reconciled, kube::runtime::controller::Error<crate::Error, watcher::Error>>,
) -> future::Ready<()> {
    let mut last_error: Option<String> = None;
    move |result| {
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
    }
}

/// A reconcile's result: the service and what comes next.
type Reconciled = (ObjectRef<GrpcService>, kube::runtime::controller::Action);
