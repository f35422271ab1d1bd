//! Status, finalizers and Events, written behind the registry (DESIGN §5: the registry first).
//!
//! A reconcile does its registry work, computes the next status and its Events (purely), hands
//! them here and returns: its slot is free again at once, whatever the API server's write rate.
//! Per service, this writer keeps only the latest status (coalesced), writes one carrying a
//! transition (an Event) at once and a counts-only change at most once per
//! [`STATUS_INTERVAL`](super::STATUS_INTERVAL), never writes a status equal to the one last
//! written, retries failures with backoff, and flushes what is pending on shutdown: the final
//! state of a burst is never lost. The finalizer a new service needs is added here too, after
//! its first registry write; a service deleted before it lands is released by the owner-record
//! sweep (see [`super::sweep`]).
//!
//! `queue` holds what is pending per service and decides what is due (no I/O); `api` performs
//! the writes; this file is the handle reconciles submit to and the loop that writes.

mod api;
mod queue;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::runtime::events::{Event, Reporter};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::crd::{GrpcService, GrpcServiceStatus};
use crate::metrics::Metrics;
use crate::registry::Backend;
use queue::{Done, Entry, Job, Queue};

/// Writes in flight at once: enough to keep up with thousands of services, bounded so that a
/// cold start does not open a connection per service.
const IN_FLIGHT: usize = 32;

/// Reconciles running at once that make a burst of registry work (a cold start, a re-list):
/// more than a readiness flip or an edit ever runs.
const BURST: usize = 64;

/// Writes in flight at once during a burst of registry work. A cold start of 10,000 services
/// queues 30,000 API writes (finalizers, statuses, Events); written 32 at a time they took the
/// API server's and the machine's CPU from the registry writes (an API server holding 100,000
/// pods spends much of a write on garbage collection), and the keys came later the larger the
/// cluster. A few at a time, the registry fills first and the statuses follow.
const IN_FLIGHT_IN_BURST: usize = 4;

/// How many writes may be in flight while `reconciles` reconciles run.
fn room(reconciles: usize) -> usize {
    if reconciles > BURST {
        IN_FLIGHT_IN_BURST
    } else {
        IN_FLIGHT
    }
}

/// How long a graceful shutdown waits for pending writes.
const FLUSH: Duration = Duration::from_secs(5);

struct Shared {
    client: Client,
    reporter: Option<Reporter>,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    queue: Mutex<Queue>,
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
                queue: Mutex::default(),
                wake: Notify::new(),
            }),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().expect("lock")
    }

    /// The latest status of `svc` as this process knows it: pending, or last written, or the
    /// object's own (a reconcile computes the next status from it, so that a status written
    /// behind and not yet seen by the watch is not reverted, nor its transition announced
    /// twice).
    #[must_use]
    pub fn latest(&self, svc: &GrpcService) -> Option<GrpcServiceStatus> {
        let uid = svc.uid().unwrap_or_default();
        self.queue()
            .entries
            .get(&uid)
            .and_then(|e| e.status.clone().or_else(|| e.written.clone()))
            .or_else(|| svc.status.clone())
    }

    /// The status queued for `svc` and not yet written (tests).
    #[cfg(test)]
    pub(crate) fn pending(&self, svc: &GrpcService) -> Option<GrpcServiceStatus> {
        let uid = svc.uid().unwrap_or_default();
        self.queue()
            .entries
            .get(&uid)
            .and_then(|e| e.status.clone())
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
        self.queue()
            .entries
            .get(&uid)
            .is_some_and(|e| e.finalizer.is_some())
    }

    /// Waits until nothing is pending or under way (tests: a reconcile's status is written
    /// before the next one).
    #[cfg(test)]
    pub(crate) async fn idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let busy = self.queue().busy();
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
        self.queue().keep_in_flight();
    }

    /// Drops everything pending for the service `uid` (it is deleted).
    pub fn forget(&self, uid: &str) {
        self.queue().remove(uid);
    }

    fn entry(&self, svc: &GrpcService, update: impl FnOnce(&mut Entry)) {
        let uid = svc.uid().unwrap_or_default();
        let mut queue = self.queue();
        // The object queued already when it is this version of it: copied only once changed.
        let version = svc.metadata.resource_version.as_ref();
        let queued = queue
            .entries
            .get(&uid)
            .map(|entry| entry.svc.clone())
            .filter(|queued| {
                version.is_some() && queued.metadata.resource_version.as_ref() == version
            });
        let svc = queued.unwrap_or_else(|| Arc::new(svc.clone()));
        queue.update(uid, svc, update);
        // Woken only for work due before it wakes anyway (a status held back by the rate
        // limit is not: a readiness flip costs no hand-off to the writer).
        let wake = queue.due_before_planned();
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Jobs due now, taken out of their entries (at most `room`), and when the next one is due.
    fn take_due(&self, room: usize) -> (Vec<Job>, Option<Instant>) {
        let may_write = self.shared.backend.may_write();
        self.queue().take_due(Instant::now(), may_write, room)
    }

    /// Records how `job` ended; a failure is counted and logged, and retried with backoff.
    fn finish(&self, job: Job, done: Done) {
        let svc = job.svc.clone();
        let Some(retry) = self.queue().finish(job, done) else {
            return;
        };
        self.shared.metrics.writers.status_write_failures.inc();
        let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        let retry_ms = u64::try_from(retry.delay.as_millis()).unwrap_or(u64::MAX);
        let (op, error) = (retry.op, retry.error);
        // The first failure of a streak (or a different one) at warn level, repeats at
        // debug: an API server outage is one line per service, not one per retry.
        if retry.repeated {
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
        }
    }

    /// Writes until `shutdown` resolves, then flushes what is pending (bounded).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut running = FuturesUnordered::new();
        loop {
            let limit = room(self.shared.metrics.reconcile.running());
            let (jobs, next) = self.take_due(limit.saturating_sub(running.len()));
            for job in jobs {
                let shared = self.shared.clone();
                running.push(async move {
                    let done = api::write(&shared, &job).await;
                    (job, done)
                });
            }
            // With every slot busy, due work waits for a write to finish, not for its time
            // (which may be now: the loop would spin at the timer's resolution).
            let sleep = next
                .filter(|_| running.len() < limit)
                .map_or(Duration::from_secs(3600), |at| {
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
            let jobs = self.queue().take_pending();
            if self.shared.backend.may_write() {
                futures::stream::iter(jobs)
                    .for_each_concurrent(IN_FLIGHT, |job| {
                        let shared = self.shared.clone();
                        async move {
                            let _ = api::write(&shared, &job).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_registry_work_keeps_api_writes_to_a_few_at_a_time() {
        assert_eq!(room(0), IN_FLIGHT);
        assert_eq!(room(BURST), IN_FLIGHT);
        assert_eq!(room(BURST + 1), IN_FLIGHT_IN_BURST);
        assert_eq!(room(1024), IN_FLIGHT_IN_BURST);
        // Even then a few are written: statuses are late, never stalled.
        const { assert!(IN_FLIGHT_IN_BURST > 0 && IN_FLIGHT_IN_BURST < IN_FLIGHT) };
    }
}
