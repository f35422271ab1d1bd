//! Status, finalizers and Events, written behind the registry (DESIGN §5: the registry first).
//!
//! A reconcile does its registry work, computes the next status and its Events (purely), hands
//! them here and returns: its slot is free again at once, whatever the API server's write rate.
//! Per service, this writer keeps only the latest status (coalesced), writes one carrying a
//! transition (an Event) at once and a counts-only change at most once per
//! [`STATUS_INTERVAL`], never writes a status equal to the one last written, retries failures
//! with backoff, and flushes what is pending on shutdown: the final state of a burst is never
//! lost. The finalizer a new service needs is added here too, after its first registry write;
//! a service deleted before it lands is released by the owner-record sweep
//! (see [`super::sweep`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{FIELD_MANAGER, STATUS_INTERVAL};
use crate::backoff::Backoff;
use crate::crd::{GrpcService, GrpcServiceStatus};
use crate::metrics::Metrics;
use crate::registry::Backend;

/// Writes in flight at once: enough to keep up with thousands of services, bounded so that a
/// cold start does not open a connection per service.
const IN_FLIGHT: usize = 32;

/// How long a graceful shutdown waits for pending writes.
const FLUSH: Duration = Duration::from_secs(5);

/// What is waiting to be written for one service.
struct Entry {
    /// The object, as last submitted (namespace, name, its finalizers and object reference).
    svc: Arc<GrpcService>,
    /// The finalizer to add, when the object lacks it.
    finalizer: Option<&'static str>,
    /// The latest status not yet written.
    status: Option<GrpcServiceStatus>,
    /// The status this process last wrote.
    written: Option<GrpcServiceStatus>,
    /// Events to publish once the status is written.
    events: Vec<Event>,
    /// When this process last wrote the status.
    last_write: Option<Instant>,
    /// Not before this (after a failure).
    retry_at: Option<Instant>,
    /// Pacing of retries.
    backoff: Backoff,
    /// A write of this entry is under way.
    in_flight: bool,
    /// The last failure, so that its repeats are logged at debug level.
    last_error: Option<String>,
}

impl Entry {
    fn new(svc: Arc<GrpcService>) -> Self {
        Self {
            svc,
            finalizer: None,
            status: None,
            written: None,
            events: Vec::new(),
            last_write: None,
            retry_at: None,
            backoff: Backoff::reconcile(),
            in_flight: false,
            last_error: None,
        }
    }

    /// When this entry should be written (`now` at the soonest), if it has anything to write.
    fn due(&self, now: Instant) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        let due = if self.finalizer.is_some() || !self.events.is_empty() {
            now
        } else if self.status.is_some() {
            self.last_write.map_or(now, |at| at + STATUS_INTERVAL)
        } else {
            return None;
        };
        Some(self.retry_at.map_or(due, |at| at.max(due)))
    }
}

/// One write's work, taken out of its entry.
struct Job {
    uid: String,
    svc: Arc<GrpcService>,
    finalizer: Option<&'static str>,
    status: Option<GrpcServiceStatus>,
    events: Vec<Event>,
}

/// How a job ended.
enum Done {
    /// Everything written.
    Written,
    /// The object is gone: nothing more to write for it.
    Gone,
    /// The API server refused or did not answer (the failed write, and why); retried.
    Failed(&'static str, String),
}

struct Shared {
    client: Client,
    reporter: Option<Reporter>,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
}

/// The writer's handle: reconciles submit here; [`ApiWriter::run`] writes.
#[derive(Clone)]
pub struct ApiWriter {
    shared: Arc<Shared>,
}

/// What [`ApiWriter::submit`] did with a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Equal to the latest written or pending: nothing to write.
    Unchanged,
    /// Queued; `transition` when it carries a transition Event.
    Queued {
        /// Whether it carries a transition Event (Ready, lease, target).
        transition: bool,
    },
}

impl Submitted {
    /// Whether the status carries a transition Event.
    #[must_use]
    pub fn is_transition(self) -> bool {
        self == Self::Queued { transition: true }
    }
}

impl ApiWriter {
    /// A writer over `client`, publishing Events as `reporter` when set; it writes only while
    /// `backend` says this replica may write (a deposed leader leaves status to the new one).
    #[must_use]
    pub fn new(
        client: Client,
        reporter: Option<Reporter>,
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                reporter,
                backend,
                metrics,
                entries: Mutex::default(),
                wake: Notify::new(),
            }),
        }
    }

    /// The latest status of `svc` as this process knows it: pending, or last written, or the
    /// object's own (a reconcile computes the next status from it, so that a status written
    /// behind and not yet seen by the watch is not reverted, nor its transition announced
    /// twice).
    #[must_use]
    pub fn latest(&self, svc: &GrpcService) -> Option<GrpcServiceStatus> {
        let uid = svc.uid().unwrap_or_default();
        let entries = self.shared.entries.lock().expect("lock");
        entries
            .get(&uid)
            .and_then(|e| e.status.clone().or_else(|| e.written.clone()))
            .or_else(|| svc.status.clone())
    }

    /// Queues `status` for `svc` (replacing any pending one) with its transition `events`.
    pub fn submit(
        &self,
        svc: &GrpcService,
        status: GrpcServiceStatus,
        events: Vec<Event>,
    ) -> Submitted {
        if Some(&status) == self.latest(svc).as_ref() && events.is_empty() {
            return Submitted::Unchanged;
        }
        let transition = !events.is_empty();
        self.entry(svc, |entry| {
            entry.status = Some(status);
            entry.events.extend(events);
        });
        Submitted::Queued { transition }
    }

    /// Queues an Event on `svc`.
    pub fn event(&self, svc: &GrpcService, event: Event) {
        self.entry(svc, |entry| entry.events.push(event));
    }

    /// Queues the addition of `finalizer` to `svc`, which lacks it.
    pub fn add_finalizer(&self, svc: &GrpcService, finalizer: &'static str) {
        self.entry(svc, |entry| entry.finalizer = Some(finalizer));
    }

    /// Whether the finalizer of `svc` is queued and not yet written.
    #[must_use]
    pub fn finalizer_pending(&self, svc: &GrpcService) -> bool {
        let uid = svc.uid().unwrap_or_default();
        self.shared
            .entries
            .lock()
            .expect("lock")
            .get(&uid)
            .is_some_and(|e| e.finalizer.is_some())
    }

    /// Waits until nothing is pending or under way (tests: a reconcile's status is written
    /// before the next one).
    #[cfg(test)]
    pub(crate) async fn idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let busy = {
                let now = Instant::now();
                let entries = self.shared.entries.lock().expect("lock");
                entries
                    .values()
                    .any(|e| e.in_flight || e.due(now).is_some())
            };
            if !busy {
                return;
            }
            assert!(Instant::now() < deadline, "the writer never went idle");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Forgets every status this process wrote or queued, on a change of leadership: another
    /// leader may have written since, so the objects' own statuses are the truth again.
    pub fn clear(&self) {
        self.shared
            .entries
            .lock()
            .expect("lock")
            .retain(|_, e| e.in_flight);
    }

    /// Drops everything pending for the service `uid` (it is deleted).
    pub fn forget(&self, uid: &str) {
        self.shared.entries.lock().expect("lock").remove(uid);
    }

    fn entry(&self, svc: &GrpcService, update: impl FnOnce(&mut Entry)) {
        let uid = svc.uid().unwrap_or_default();
        let svc = Arc::new(svc.clone());
        {
            let mut entries = self.shared.entries.lock().expect("lock");
            let entry = entries
                .entry(uid)
                .or_insert_with(|| Entry::new(svc.clone()));
            entry.svc = svc;
            update(entry);
        }
        self.shared.wake.notify_one();
    }

    /// Jobs due now, taken out of their entries (at most `room`), and when the next one is due.
    fn take_due(&self, room: usize) -> (Vec<Job>, Option<Instant>) {
        let now = Instant::now();
        let may_write = self.shared.backend.may_write();
        let mut jobs = Vec::new();
        let mut next: Option<Instant> = None;
        let mut entries = self.shared.entries.lock().expect("lock");
        for (uid, entry) in entries.iter_mut() {
            let Some(due) = entry.due(now) else { continue };
            if !may_write {
                // Not the leader (or no longer): the leader owns status and Events.
                entry.status = None;
                entry.events.clear();
                entry.finalizer = None;
                continue;
            }
            if due > now || jobs.len() >= room {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            entry.in_flight = true;
            jobs.push(Job {
                uid: uid.clone(),
                svc: entry.svc.clone(),
                finalizer: entry.finalizer,
                status: entry.status.take(),
                events: std::mem::take(&mut entry.events),
            });
        }
        entries.retain(|_, e| {
            e.in_flight || e.due(now).is_some() || e.written.is_some() || e.last_write.is_some()
        });
        (jobs, next)
    }

    /// Records how `job` ended: what was written is remembered, what failed is put back (under
    /// anything submitted since) and retried with backoff.
    fn finish(&self, job: Job, done: Done) {
        let mut entries = self.shared.entries.lock().expect("lock");
        let Some(entry) = entries.get_mut(&job.uid) else {
            return;
        };
        entry.in_flight = false;
        match done {
            Done::Written => {
                if job.finalizer.is_some() {
                    entry.finalizer = None;
                }
                if let Some(status) = job.status {
                    entry.written = Some(status);
                    entry.last_write = Some(Instant::now());
                }
                entry.retry_at = None;
                entry.backoff = Backoff::reconcile();
                entry.last_error = None;
            }
            Done::Gone => {
                entries.remove(&job.uid);
            }
            Done::Failed(op, error) => {
                if entry.status.is_none() {
                    entry.status = job.status;
                }
                let mut events = job.events;
                events.append(&mut entry.events);
                entry.events = events;
                let delay = entry.backoff.next().unwrap_or(Duration::from_secs(60));
                entry.retry_at = Some(Instant::now() + delay);
                self.shared.metrics.status_write_failures.inc();
                let (namespace, name) =
                    (job.svc.namespace().unwrap_or_default(), job.svc.name_any());
                let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                // The first failure of a streak (or a different one) at warn level, repeats at
                // debug: an API server outage is one line per service, not one per retry.
                if entry.last_error.as_deref() == Some(error.as_str()) {
                    debug!(
                        namespace,
                        name, op, error, retry_ms, "failed again; retrying"
                    );
                } else {
                    warn!(
                        namespace,
                        name,
                        op,
                        error,
                        retry_ms,
                        "failed to write to the API server; retrying (the registry is not affected)"
                    );
                    entry.last_error = Some(error);
                }
            }
        }
    }

    /// Writes until `shutdown` resolves, then flushes what is pending (bounded).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut running = FuturesUnordered::new();
        loop {
            let (jobs, next) = self.take_due(IN_FLIGHT.saturating_sub(running.len()));
            for job in jobs {
                let shared = self.shared.clone();
                running.push(async move {
                    let done = write(&shared, &job).await;
                    (job, done)
                });
            }
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                Some((job, done)) = running.next(), if !running.is_empty() => self.finish(job, done),
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = &mut shutdown => break,
            }
        }
        // Flush: finish what is under way and write what is pending, once, without waiting out
        // the rate limit.
        let flush = async {
            while let Some((job, done)) = running.next().await {
                self.finish(job, done);
            }
            let jobs: Vec<Job> = {
                let mut entries = self.shared.entries.lock().expect("lock");
                entries
                    .iter_mut()
                    .filter(|(_, e)| e.status.is_some() || !e.events.is_empty())
                    .map(|(uid, e)| Job {
                        uid: uid.clone(),
                        svc: e.svc.clone(),
                        finalizer: e.finalizer,
                        status: e.status.take(),
                        events: std::mem::take(&mut e.events),
                    })
                    .collect()
            };
            if self.shared.backend.may_write() {
                futures::stream::iter(jobs)
                    .for_each_concurrent(IN_FLIGHT, |job| {
                        let shared = self.shared.clone();
                        async move {
                            let _ = write(&shared, &job).await;
                        }
                    })
                    .await;
            }
        };
        if tokio::time::timeout(FLUSH, flush).await.is_err() {
            debug!("status writes still pending at shutdown were dropped");
        }
    }
}

/// Performs one job: the finalizer, then the status, then the Events.
async fn write(shared: &Shared, job: &Job) -> Done {
    let namespace = job.svc.namespace().unwrap_or_default();
    let api: Api<GrpcService> = Api::namespaced(shared.client.clone(), &namespace);
    let name = job.svc.name_any();
    if let Some(finalizer) = job.finalizer {
        match add_finalizer(&api, &job.svc, finalizer).await {
            Ok(true) => {}
            Ok(false) => return Done::Gone,
            Err(e) => return Done::Failed("add finalizer", describe(&e)),
        }
    }
    if let Some(status) = &job.status {
        let patch = json!({
            "apiVersion": "grpc-registrar.io/v1alpha1",
            "kind": "GrpcService",
            "status": status,
        });
        match api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Done::Gone,
            Err(e) => return Done::Failed("write status", describe(&e)),
        }
    }
    if let Some(reporter) = &shared.reporter {
        let reference = job.svc.object_ref(&());
        for event in &job.events {
            // A recorder per Event: kube's recorder folds an Event into an earlier one with the
            // same reason and keeps the earlier note. Our own rules bound the volume.
            let recorder = Recorder::new(shared.client.clone(), reporter.clone());
            if let Err(e) = recorder.publish(event, &reference).await {
                warn!(namespace, name, error = %crate::error::chain(&e), reason = %event.reason, "failed to publish event");
            }
        }
    }
    Done::Written
}

/// A Kubernetes error in words: the API server's own message and code, not its Debug form.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => crate::error::chain(other),
    }
}

/// Adds `finalizer` to `svc` with a guarded JSON patch (test the list, then add), re-reading
/// the object once when the list changed meanwhile. `Ok(false)` when the object is gone or
/// being deleted (nothing to add it to).
async fn add_finalizer(
    api: &Api<GrpcService>,
    svc: &GrpcService,
    finalizer: &str,
) -> Result<bool, kube::Error> {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{AddOperation, PatchOperation, TestOperation};
    let mut current = svc.clone();
    for attempt in 0..2 {
        if current.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        if current.finalizers().iter().any(|f| f == finalizer) {
            return Ok(true);
        }
        let (test, path, value) = if current.finalizers().is_empty() {
            (
                serde_json::Value::Null,
                "/metadata/finalizers",
                json!([finalizer]),
            )
        } else {
            (
                json!(current.finalizers()),
                "/metadata/finalizers/-",
                json!(finalizer),
            )
        };
        let patch = json_patch::Patch(vec![
            PatchOperation::Test(TestOperation {
                path: PointerBuf::parse("/metadata/finalizers").expect("a valid pointer"),
                value: test,
            }),
            PatchOperation::Add(AddOperation {
                path: PointerBuf::parse(path).expect("a valid pointer"),
                value,
            }),
        ]);
        match api
            .patch(
                &current.name_any(),
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            // The list changed under us (the test failed): read it again, once.
            Err(kube::Error::Api(e)) if e.code == 422 && attempt == 0 => {
                match api.get_opt(&current.name_any()).await? {
                    Some(fresh) if fresh.uid() == svc.uid() => current = fresh,
                    _ => return Ok(false),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
