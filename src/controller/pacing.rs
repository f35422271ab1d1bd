//! A floor on how often one service's source changes reconcile it (`--min-sync-interval`), as
//! kube-proxy's `--iptables-min-sync-period` bounds its syncs.
//!
//! A change to a service that has not synced for the interval reconciles it at once, so a
//! quiet service's first change is as fast as without pacing. A change that comes sooner waits
//! until the interval since the last sync has passed, and every change in between folds into
//! that one reconcile: one registry write for a burst of readiness flips instead of one each.
//! Nothing is dropped: the held reconcile reads the caches when it runs, so it writes the
//! burst's final state. The interval counts from when a trigger is let through or released.
//! Only source events are paced: a spec edit, a deletion, a re-list, a takeover, error retries
//! and a reconcile's own requeues run as without pacing, and do not restart the interval.
//! Zero (the default) paces nothing.
//!
//! [`Pacer`] decides (no I/O, no clock of its own); [`Pacing`] applies it to the mapped
//! triggers of every source and releases the held ones on time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use kube::runtime::reflector::ObjectRef;
use tokio::time::Instant;

use crate::crd::GrpcService;

type Service = ObjectRef<GrpcService>;

/// What to do with one service's trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Reconcile it now.
    Now,
    /// Hold it until then: the service synced less than the interval ago.
    At(Instant),
    /// Drop it: a held trigger for the service already covers it.
    Covered,
}

/// Per service: when it last synced, and whether a trigger is held for it.
#[derive(Debug)]
pub(super) struct Pacer {
    interval: Duration,
    last: HashMap<Service, Instant>,
    held: HashSet<Service>,
    /// `last` is pruned of services quiet for the interval when it grows past this.
    prune_at: usize,
}

/// Smallest `last` that is ever pruned.
const PRUNE_FLOOR: usize = 1024;

impl Pacer {
    /// A pacer of `interval`; zero holds nothing.
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
            held: HashSet::new(),
            prune_at: PRUNE_FLOOR,
        }
    }

    /// Decides a trigger of `service` at `now`; [`Admit::Now`] counts as its sync.
    pub(super) fn admit(&mut self, service: &Service, now: Instant) -> Admit {
        if self.interval.is_zero() {
            return Admit::Now;
        }
        if self.held.contains(service) {
            return Admit::Covered;
        }
        match self
            .last
            .get(service)
            .and_then(|last| last.checked_add(self.interval))
        {
            Some(due) if now < due => {
                self.held.insert(service.clone());
                Admit::At(due)
            }
            _ => {
                self.synced(service.clone(), now);
                Admit::Now
            }
        }
    }

    /// A held trigger of `service` is released at `now`: that is its sync.
    pub(super) fn release(&mut self, service: &Service, now: Instant) {
        self.held.remove(service);
        self.synced(service.clone(), now);
    }

    fn synced(&mut self, service: Service, now: Instant) {
        self.last.insert(service, now);
        if self.last.len() > self.prune_at {
            let interval = self.interval;
            self.last
                .retain(|_, last| now.saturating_duration_since(*last) < interval);
            self.prune_at = (self.last.len() * 2).max(PRUNE_FLOOR);
        }
    }

    /// How many services the pacer remembers (synced within about the interval).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.last.len()
    }
}

/// The pacer applied to live triggers: [`Pacing::pass`] filters what a source's mapper
/// returns, and [`Pacing::released`] yields the held triggers when they are due.
#[derive(Clone)]
pub(super) struct Pacing {
    /// Zero: every trigger passes untouched, with no lock and no clock read.
    off: bool,
    pacer: Arc<Mutex<Pacer>>,
    held: tokio::sync::mpsc::UnboundedSender<(Service, Instant)>,
}

impl Pacing {
    /// A pacing of `interval`, and the stream of its held triggers, due in time.
    pub(super) fn new(interval: Duration) -> (Self, impl Stream<Item = Service> + Send + 'static) {
        let pacer = Arc::new(Mutex::new(Pacer::new(interval)));
        let (held, rx) = tokio::sync::mpsc::unbounded_channel();
        let released = released(pacer.clone(), rx);
        (
            Self {
                off: interval.is_zero(),
                pacer,
                held,
            },
            released,
        )
    }

    /// The triggers of `services` to run now; the others are held or already covered.
    pub(super) fn pass(&self, services: Vec<Service>) -> Vec<Service> {
        if self.off {
            return services;
        }
        let now = Instant::now();
        let mut pacer = self.pacer.lock().expect("pacer lock");
        services
            .into_iter()
            .filter(|service| match pacer.admit(service, now) {
                Admit::Now => true,
                Admit::At(due) => {
                    // The stream outlives every sender but with the controller gone.
                    let _ = self.held.send((service.clone(), due));
                    false
                }
                Admit::Covered => false,
            })
            .collect()
    }
}

/// Each held trigger, at its due time, marked as synced.
fn released(
    pacer: Arc<Mutex<Pacer>>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(Service, Instant)>,
) -> impl Stream<Item = Service> + Send + 'static {
    let waiting = FuturesUnordered::new();
    futures::stream::unfold(
        (rx, waiting, pacer, false),
        |(mut rx, mut waiting, pacer, mut closed)| async move {
            loop {
                tokio::select! {
                    held = rx.recv(), if !closed => match held {
                        Some((service, due)) => waiting.push(async move {
                            tokio::time::sleep_until(due).await;
                            service
                        }),
                        None => closed = true,
                    },
                    Some(service) = waiting.next(), if !waiting.is_empty() => {
                        pacer.lock().expect("pacer lock").release(&service, Instant::now());
                        return Some((service, (rx, waiting, pacer, closed)));
                    }
                    else => return None,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Service {
        ObjectRef::new(name).within("ns")
    }

    const INTERVAL: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn a_quiet_services_first_change_syncs_at_once() {
        let mut pacer = Pacer::new(INTERVAL);
        let now = Instant::now();
        assert_eq!(pacer.admit(&svc("a"), now), Admit::Now);
        assert_eq!(pacer.admit(&svc("b"), now), Admit::Now);
        assert_eq!(pacer.admit(&svc("a"), now + INTERVAL), Admit::Now);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_interval_fold_into_one_sync_when_it_has_passed() {
        let mut pacer = Pacer::new(INTERVAL);
        let t0 = Instant::now();
        assert_eq!(pacer.admit(&svc("a"), t0), Admit::Now);
        let due = t0 + INTERVAL;
        assert_eq!(
            pacer.admit(&svc("a"), t0 + Duration::from_millis(20)),
            Admit::At(due)
        );
        assert_eq!(
            pacer.admit(&svc("a"), t0 + Duration::from_millis(40)),
            Admit::Covered
        );
        // Another service is paced on its own.
        assert_eq!(
            pacer.admit(&svc("b"), t0 + Duration::from_millis(40)),
            Admit::Now
        );
        pacer.release(&svc("a"), due);
        // The release was a sync: the next change waits a whole interval from it.
        assert_eq!(
            pacer.admit(&svc("a"), due + Duration::from_millis(10)),
            Admit::At(due + INTERVAL)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_holds_nothing() {
        let mut pacer = Pacer::new(Duration::ZERO);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(pacer.admit(&svc("a"), now), Admit::Now);
        }
        assert_eq!(pacer.remembered(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn services_quiet_for_the_interval_are_forgotten_and_recent_ones_kept() {
        let mut pacer = Pacer::new(INTERVAL);
        let t0 = Instant::now();
        for i in 0..PRUNE_FLOOR {
            pacer.admit(&svc(&format!("s{i}")), t0);
        }
        assert_eq!(pacer.remembered(), PRUNE_FLOOR);
        let later = t0 + INTERVAL;
        // Synced just before the prune: still within its interval when it runs.
        pacer.release(&svc("s1"), later - Duration::from_millis(1));
        pacer.admit(&svc("new"), later);
        assert_eq!(pacer.remembered(), 2);
        // Kept: its next change still waits for its interval.
        assert_eq!(
            pacer.admit(&svc("s1"), later),
            Admit::At(later - Duration::from_millis(1) + INTERVAL)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_interval_too_large_to_add_to_the_clock_holds_nothing_rather_than_panic() {
        let mut pacer = Pacer::new(Duration::MAX);
        let now = Instant::now();
        assert_eq!(pacer.admit(&svc("a"), now), Admit::Now);
        assert_eq!(pacer.admit(&svc("a"), now), Admit::Now);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_trigger_is_released_when_due_and_never_before() {
        let (pacing, released) = Pacing::new(INTERVAL);
        let mut released = Box::pin(released);
        let start = Instant::now();
        assert_eq!(pacing.pass(vec![svc("a")]), vec![svc("a")]);
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(pacing.pass(vec![svc("a"), svc("b")]), vec![svc("b")]);
        assert!(pacing.pass(vec![svc("a")]).is_empty());
        let next = released.next().await;
        assert_eq!(next, Some(svc("a")));
        assert_eq!(Instant::now() - start, INTERVAL);
        // Released counts as synced: a change right after is held a whole interval again.
        assert!(pacing.pass(vec![svc("a")]).is_empty());
        assert_eq!(released.next().await, Some(svc("a")));
        assert_eq!(Instant::now() - start, INTERVAL * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_released_stream_ends_once_nothing_can_be_held_any_more() {
        let (pacing, released) = Pacing::new(INTERVAL);
        let mut released = Box::pin(released);
        pacing.pass(vec![svc("a")]);
        assert!(pacing.pass(vec![svc("a")]).is_empty());
        drop(pacing);
        assert_eq!(released.next().await, Some(svc("a")));
        assert_eq!(released.next().await, None);
    }
}
