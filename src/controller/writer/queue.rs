//! What is waiting to be written, per service: the latest status (coalesced), its Events, a
//! finalizer to add, and when each is due. No I/O: the writer takes due jobs out and hands
//! back how each ended.

use std::collections::HashMap;
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
    pub(super) fn due(&self, now: Instant) -> Option<Instant> {
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
}

impl Queue {
    /// The entry of `svc` (created if new, its object replaced by `svc`), updated by `update`.
    pub(super) fn update(
        &mut self,
        uid: String,
        svc: Arc<GrpcService>,
        update: impl FnOnce(&mut Entry),
    ) {
        let entry = self
            .entries
            .entry(uid)
            .or_insert_with(|| Entry::new(svc.clone()));
        entry.svc = svc;
        update(entry);
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
        let mut jobs = Vec::new();
        let mut next: Option<Instant> = None;
        for (uid, entry) in &mut self.entries {
            let Some(due) = entry.due(now) else { continue };
            if !may_write {
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
            jobs.push(entry.take_job(uid));
        }
        self.entries.retain(|_, e| {
            e.in_flight || e.due(now).is_some() || e.written.is_some() || e.last_write.is_some()
        });
        (jobs, next)
    }

    /// Every entry's pending status and Events, taken out (the flush on shutdown).
    pub(super) fn take_pending(&mut self) -> Vec<Job> {
        self.entries
            .iter_mut()
            .filter(|(_, e)| e.status.is_some() || !e.events.is_empty())
            .map(|(uid, e)| e.take_job(uid))
            .collect()
    }

    /// Records how `job` ended: what was written is remembered, what failed is put back (under
    /// anything submitted since) to be retried with backoff, and returned.
    pub(super) fn finish(&mut self, job: Job, done: Done) -> Option<Retry> {
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
                self.entries.remove(&job.uid);
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
