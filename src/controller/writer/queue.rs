//! What is waiting to be written, per service: the latest status (coalesced), its Events, a
//! finalizer to add, and when each is due. No I/O: the writer takes due jobs out and hands
//! back how each ended.
//!
//! Entries stay after their writes (what was written is compared with the next status), so
//! the queue holds every service; the ones with work are also in a schedule ordered by when
//! they are due, so that taking the due jobs costs what is taken, not a scan of every service
//! (at 10,000 services a scan per job was half of a cold start's CPU).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::events::Event;

use crate::backoff::Backoff;
use crate::controller::STATUS_INTERVAL;
use crate::crd::{GrpcService, GrpcServiceStatus};

/// What is waiting to be written for one service.
pub(super) struct Entry {
    /// The object, as last submitted (namespace, name, its finalizers and object reference).
    pub(super) svc: Arc<GrpcService>,
    /// The finalizer to add, when the object lacks it.
    pub(super) finalizer: Option<&'static str>,
    /// The latest status not yet written.
    pub(super) status: Option<GrpcServiceStatus>,
    /// The status this process last wrote.
    pub(super) written: Option<GrpcServiceStatus>,
    /// Events to publish once the status is written.
    pub(super) events: Vec<Event>,
    /// When this process last wrote the status.
    last_write: Option<Instant>,
    /// Not before this (after a failure).
    retry_at: Option<Instant>,
    /// Pacing of retries.
    backoff: Backoff,
    /// A write of this entry is under way.
    pub(super) in_flight: bool,
    /// The last failure, so that its repeats are logged at debug level.
    last_error: Option<String>,
    /// When work was last added: the due time of work due at once, which orders it first come
    /// first served.
    touched: Instant,
    /// Where it is in the schedule, if anywhere.
    scheduled: Option<Instant>,
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
            touched: Instant::now(),
            scheduled: None,
        }
    }

    /// When this entry should be written, if it has anything to write: work due at once is due
    /// from when it was added.
    fn due_at(&self) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        let due = if self.finalizer.is_some() || !self.events.is_empty() {
            self.touched
        } else if self.status.is_some() {
            self.last_write
                .map_or(self.touched, |at| at + STATUS_INTERVAL)
        } else {
            return None;
        };
        Some(self.retry_at.map_or(due, |at| at.max(due)))
    }

    /// Whether the entry can go: nothing to write, nothing under way, nothing written to
    /// compare with.
    fn idle_and_unwritten(&self) -> bool {
        !self.in_flight
            && self.due_at().is_none()
            && self.written.is_none()
            && self.last_write.is_none()
    }

    /// This entry's pending work, taken out of it.
    fn take_job(&mut self, uid: &str) -> Job {
        Job {
            uid: uid.to_owned(),
            svc: self.svc.clone(),
            finalizer: self.finalizer,
            status: self.status.take(),
            events: std::mem::take(&mut self.events),
        }
    }
}

/// One write's work, taken out of its entry.
pub(super) struct Job {
    pub(super) uid: String,
    pub(super) svc: Arc<GrpcService>,
    pub(super) finalizer: Option<&'static str>,
    pub(super) status: Option<GrpcServiceStatus>,
    pub(super) events: Vec<Event>,
}

/// How a job ended.
pub(super) enum Done {
    /// Everything written.
    Written,
    /// The object is gone: nothing more to write for it.
    Gone,
    /// The API server refused or did not answer (the failed write, and why); retried.
    Failed(&'static str, String),
}

/// A failed job put back for a retry.
pub(super) struct Retry {
    /// The failed write.
    pub(super) op: &'static str,
    /// Why it failed.
    pub(super) error: String,
    /// When it is tried again.
    pub(super) delay: Duration,
    /// The same failure as the entry's last one (logged at debug level).
    pub(super) repeated: bool,
}

/// The pending writes of every service, by uid.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) entries: HashMap<String, Entry>,
    /// The entries with work to write, by when it is due.
    schedule: BTreeSet<(Instant, String)>,
    /// When the writer wakes next on its own, as it last planned (`None`: only when woken), so
    /// that new work due later than that does not wake it.
    planned: Option<Instant>,
}

impl Queue {
    /// Puts `uid`'s entry where its due time says in the schedule (out of it with nothing to
    /// write), and drops the entry when it can go.
    fn reschedule(&mut self, uid: &str) {
        let Some(entry) = self.entries.get_mut(uid) else {
            return;
        };
        let at = entry.due_at();
        if entry.scheduled != at {
            if let Some(old) = entry.scheduled.take() {
                self.schedule.remove(&(old, uid.to_owned()));
            }
            if let Some(at) = at {
                self.schedule.insert((at, uid.to_owned()));
            }
            entry.scheduled = at;
        }
        if entry.idle_and_unwritten() {
            self.entries.remove(uid);
        }
    }

    /// The entry of `svc` (created if new, its object replaced by `svc`), updated by `update`.
    pub(super) fn update(
        &mut self,
        uid: String,
        svc: Arc<GrpcService>,
        update: impl FnOnce(&mut Entry),
    ) {
        let entry = self
            .entries
            .entry(uid.clone())
            .or_insert_with(|| Entry::new(svc.clone()));
        entry.svc = svc;
        if entry.due_at().is_none() {
            entry.touched = Instant::now();
        }
        update(entry);
        self.reschedule(&uid);
    }

    /// Jobs due at `now`, taken out of their entries (at most `room`), and when the next one is
    /// due. When this replica may not write, pending work is dropped instead: the leader owns
    /// status and Events.
    pub(super) fn take_due(
        &mut self,
        now: Instant,
        may_write: bool,
        room: usize,
    ) -> (Vec<Job>, Option<Instant>) {
        if !may_write {
            for (_, uid) in std::mem::take(&mut self.schedule) {
                if let Some(entry) = self.entries.get_mut(&uid) {
                    entry.scheduled = None;
                    entry.status = None;
                    entry.events.clear();
                    entry.finalizer = None;
                }
                self.reschedule(&uid);
            }
            self.planned = None;
            return (Vec::new(), None);
        }
        let mut jobs = Vec::new();
        while jobs.len() < room {
            let Some((at, uid)) = self.schedule.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.schedule.pop_first();
            if let Some(entry) = self.entries.get_mut(&uid) {
                entry.scheduled = None;
                entry.in_flight = true;
                jobs.push(entry.take_job(&uid));
            }
        }
        let next = self.schedule.first().map(|(at, _)| (*at).max(now));
        self.planned = next;
        (jobs, next)
    }

    /// Whether work is due before the writer wakes on its own.
    pub(super) fn due_before_planned(&self) -> bool {
        self.schedule
            .first()
            .is_some_and(|(at, _)| self.planned.is_none_or(|planned| *at < planned))
    }

    /// Every entry's pending status and Events, taken out (the flush on shutdown).
    pub(super) fn take_pending(&mut self) -> Vec<Job> {
        let jobs: Vec<Job> = self
            .entries
            .iter_mut()
            .filter(|(_, e)| e.status.is_some() || !e.events.is_empty())
            .map(|(uid, e)| e.take_job(uid))
            .collect();
        for job in &jobs {
            self.reschedule(&job.uid);
        }
        jobs
    }

    /// Forgets everything but the entries being written (a change of leadership).
    pub(super) fn keep_in_flight(&mut self) {
        self.entries.retain(|_, e| e.in_flight);
        let entries = &self.entries;
        self.schedule.retain(|(_, uid)| entries.contains_key(uid));
    }

    /// Whether anything is due or being written.
    #[cfg(test)]
    pub(super) fn busy(&self) -> bool {
        !self.schedule.is_empty() || self.entries.values().any(|e| e.in_flight)
    }

    /// Forgets `uid`'s entry (its service is deleted).
    pub(super) fn remove(&mut self, uid: &str) {
        if let Some(entry) = self.entries.remove(uid)
            && let Some(at) = entry.scheduled
        {
            self.schedule.remove(&(at, uid.to_owned()));
        }
    }

    /// Records how `job` ended: what was written is remembered, what failed is put back (under
    /// anything submitted since) to be retried with backoff, and returned.
    pub(super) fn finish(&mut self, job: Job, done: Done) -> Option<Retry> {
        let uid = job.uid.clone();
        let retry = self.finish_entry(job, done);
        self.reschedule(&uid);
        retry
    }

    fn finish_entry(&mut self, job: Job, done: Done) -> Option<Retry> {
        let entry = self.entries.get_mut(&job.uid)?;
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
                None
            }
            Done::Gone => {
                self.remove(&job.uid);
                None
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
                let repeated = entry.last_error.as_deref() == Some(error.as_str());
                if !repeated {
                    entry.last_error = Some(error.clone());
                }
                Some(Retry {
                    op,
                    error,
                    delay,
                    repeated,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Arc<GrpcService> {
        Arc::new(crate::fixtures::service(name))
    }

    fn status(n: i32) -> GrpcServiceStatus {
        GrpcServiceStatus {
            registered_endpoints: n,
            ..GrpcServiceStatus::default()
        }
    }

    fn uids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.uid.as_str()).collect()
    }

    #[test]
    fn due_jobs_come_out_first_come_first_served_at_most_room_at_a_time() {
        let mut queue = Queue::default();
        for name in ["a", "b", "c"] {
            queue.update(name.into(), svc(name), |e| e.status = Some(status(1)));
        }
        let now = Instant::now();
        let (jobs, next) = queue.take_due(now, true, 2);
        assert_eq!(uids(&jobs), ["a", "b"]);
        assert_eq!(next, Some(now), "c is due and waits for room");
        let (jobs, next) = queue.take_due(now, true, 2);
        assert_eq!(uids(&jobs), ["c"]);
        assert_eq!(next, None);
        // A job under way is not taken again, even with new work queued.
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(2)));
        assert!(queue.take_due(Instant::now(), true, 8).0.is_empty());
    }

    #[test]
    fn a_written_status_is_due_again_only_after_the_status_interval_and_events_at_once() {
        let mut queue = Queue::default();
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(1)));
        let (mut jobs, _) = queue.take_due(Instant::now(), true, 8);
        assert!(queue.finish(jobs.remove(0), Done::Written).is_none());
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(2)));
        let now = Instant::now();
        let (jobs, next) = queue.take_due(now, true, 8);
        assert!(jobs.is_empty(), "coalesced for the interval");
        assert!(next.is_some_and(|at| at > now && at <= now + STATUS_INTERVAL));
        assert_eq!(
            uids(&queue.take_due(now + STATUS_INTERVAL, true, 8).0),
            ["a"]
        );
    }

    #[test]
    fn only_work_due_before_the_writer_wakes_on_its_own_wakes_it() {
        let mut queue = Queue::default();
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(1)));
        assert!(queue.due_before_planned(), "the writer planned nothing yet");
        let (mut jobs, _) = queue.take_due(Instant::now(), true, 8);
        queue.finish(jobs.remove(0), Done::Written);
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(2)));
        let (_, planned) = queue.take_due(Instant::now(), true, 8);
        assert!(planned.is_some(), "the coalesced status is planned for");
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(3)));
        assert!(
            !queue.due_before_planned(),
            "a newer status held back by the rate limit does not wake the writer"
        );
        queue.update("b".into(), svc("b"), |e| e.finalizer = Some("f"));
        assert!(queue.due_before_planned(), "a finalizer is due at once");
    }

    #[test]
    fn a_failed_job_is_retried_after_its_backoff_with_what_was_queued_since() {
        let mut queue = Queue::default();
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(1)));
        let (mut jobs, _) = queue.take_due(Instant::now(), true, 8);
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(2)));
        let retry = queue
            .finish(
                jobs.remove(0),
                Done::Failed("patch status", "refused".into()),
            )
            .expect("retried");
        let now = Instant::now();
        assert!(queue.take_due(now, true, 8).0.is_empty(), "backing off");
        let (jobs, _) = queue.take_due(now + retry.delay + STATUS_INTERVAL, true, 8);
        assert_eq!(jobs[0].status, Some(status(2)), "the newer status wins");
    }

    #[test]
    fn a_replica_that_may_not_write_drops_pending_work_and_keeps_what_it_wrote() {
        let mut queue = Queue::default();
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(1)));
        let (mut jobs, _) = queue.take_due(Instant::now(), true, 8);
        queue.finish(jobs.remove(0), Done::Written);
        queue.update("a".into(), svc("a"), |e| e.status = Some(status(2)));
        queue.update("b".into(), svc("b"), |e| e.finalizer = Some("f"));
        let (jobs, next) = queue.take_due(Instant::now(), false, 8);
        assert!(jobs.is_empty() && next.is_none());
        assert!(!queue.busy());
        assert_eq!(queue.entries["a"].written, Some(status(1)));
        assert!(!queue.entries.contains_key("b"), "nothing written: gone");
    }
}
