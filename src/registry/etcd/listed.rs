//! What this process last listed or wrote under each target, so that a sync of a target whose
//! keys it knows needs no range.
//!
//! DESIGN: any replica reconstructs everything from the registry; this is only an optimisation
//! within one leadership term, never a record. A listing is trusted only while this process is
//! certain to be the sole writer under the target, and only as long as nothing happened that
//! could have changed the keys behind its back:
//!
//! - no cluster name (with one, other clusters write under the same targets: every sync lists);
//! - the same shared lease, the same leader fence (its record's version: a new term, or the
//!   record written again, is another) and the same claim of the target (its ownership
//!   record's version; a failed guard, a release or a take-over forgets the claim);
//! - no lease or reachability event since it was kept (a lease replaced, the registry lost or
//!   restored, an outage or a reconnect);
//! - no error in the sync that would keep it (it is taken out for the sync and kept again only
//!   when every write committed);
//! - younger than a bounded age, counted from the range it was read by: a key deleted by hand
//!   is still put back by a later reconcile, as when every sync listed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::{self, error::TryRecvError};

use super::Current;
use crate::registry::Event;

/// How long a listing is trusted by default, from the range it was read by.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// What a listing was read or written under: it is trusted only under the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Basis {
    /// The shared lease the keys were put on.
    pub(super) lease: i64,
    /// The leader fence's guard (its record's version), `None` without leader election.
    pub(super) fence: Option<i64>,
    /// The version of the target's ownership record this process claimed.
    pub(super) claim: i64,
}

/// The keys under one target as this process last listed or left them.
#[derive(Clone, Debug)]
pub(super) struct Listed {
    /// Key → value and lease.
    pub(super) keys: BTreeMap<String, Current>,
    /// The revision of the range, or of the last write since.
    pub(super) revision: i64,
    /// When the range that read them was sent: the age counts from there, whatever was
    /// written since.
    pub(super) read_at: Instant,
}

/// A listing taken for one sync: what may be kept again when it ends well.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    /// The cache's generation when the sync started: anything forgotten since voids it.
    generation: u64,
}

struct State {
    /// Lease and reachability events: any of them drops every listing.
    events: broadcast::Receiver<Event>,
    /// Bumped by every forget: a sync that started before keeps nothing.
    generation: u64,
    /// By target.
    targets: HashMap<String, (Basis, Listed)>,
    /// How long a listing is trusted.
    max_age: Duration,
}

/// The listings this process trusts, by target.
pub(super) struct Listings {
    state: Mutex<State>,
}

impl Listings {
    /// No listing yet; dropped on every event of `events`.
    pub(super) fn new(events: broadcast::Receiver<Event>) -> Self {
        Self {
            state: Mutex::new(State {
                events,
                generation: 0,
                targets: HashMap::new(),
                max_age: MAX_AGE,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().expect("lock");
        // Any event since the last look (or events missed) drops everything.
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = state.events.try_recv() {
            state.forget_all();
        }
        state
    }

    /// Trusts a listing for `age` from now on (zero: every sync lists).
    pub(super) fn set_max_age(&self, age: Duration) {
        self.lock().max_age = age;
    }

    /// Takes `target`'s listing out for a sync under `basis` at `now`: `Some` when it was kept
    /// under the same basis and is young enough. Either way none is left behind, and the
    /// ticket says whether the sync may keep one again.
    /// `None` for `basis`: none is trusted now (e.g. with a cluster name).
    pub(super) fn take(
        &self,
        target: &str,
        basis: Option<Basis>,
        now: Instant,
    ) -> (Option<Listed>, Ticket) {
        let mut state = self.lock();
        let ticket = Ticket {
            generation: state.generation,
        };
        let max_age = state.max_age;
        let listed = state
            .targets
            .remove(target)
            .filter(|(kept, listed)| {
                Some(*kept) == basis && now.saturating_duration_since(listed.read_at) < max_age
            })
            .map(|(_, listed)| listed);
        (listed, ticket)
    }

    /// Keeps `listed` as what is under `target` now, under `basis`, unless anything was
    /// forgotten since `ticket` was taken.
    pub(super) fn keep(&self, target: &str, basis: Basis, listed: Listed, ticket: Ticket) {
        let mut state = self.lock();
        if state.generation == ticket.generation {
            state.targets.insert(target.to_owned(), (basis, listed));
        }
    }

    /// Forgets `target`'s listing (released, taken over), and voids every sync in flight.
    pub(super) fn forget(&self, target: &str) {
        let mut state = self.lock();
        state.generation += 1;
        state.targets.remove(target);
    }

    /// Forgets every listing, and voids every sync in flight.
    pub(super) fn forget_all(&self) {
        self.lock().forget_all();
    }

    /// How many targets have a listing kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().targets.len()
    }
}

impl State {
    fn forget_all(&mut self) {
        self.generation += 1;
        self.targets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIS: Basis = Basis {
        lease: 7,
        fence: Some(3),
        claim: 11,
    };

    fn listed(read_at: Instant) -> Listed {
        Listed {
            keys: BTreeMap::from([(
                "t/10.0.0.1:50051".to_owned(),
                Current {
                    value: b"v".to_vec(),
                    lease: 7,
                },
            )]),
            revision: 5,
            read_at,
        }
    }

    fn listings() -> (Listings, broadcast::Sender<Event>) {
        let (events, receiver) = broadcast::channel(4);
        (Listings::new(receiver), events)
    }

    /// Keeps a listing read at `read_at` for `t` under `BASIS`.
    fn kept(listings: &Listings, read_at: Instant) {
        let (_, ticket) = listings.take("t", Some(BASIS), read_at);
        listings.keep("t", BASIS, listed(read_at), ticket);
    }

    #[test]
    fn a_listing_kept_under_the_same_basis_is_taken_once_and_not_left_behind() {
        let (listings, _events) = listings();
        let now = Instant::now();
        kept(&listings, now);
        let (taken, _) = listings.take("t", Some(BASIS), now);
        assert_eq!(taken.unwrap().revision, 5);
        assert!(
            listings.take("t", Some(BASIS), now).0.is_none(),
            "taken out"
        );
    }

    #[test]
    fn a_listing_is_dropped_under_another_lease_fence_or_claim() {
        let (listings, _events) = listings();
        let now = Instant::now();
        for other in [
            Basis { lease: 8, ..BASIS },
            Basis {
                fence: Some(4),
                ..BASIS
            },
            Basis {
                fence: None,
                ..BASIS
            },
            Basis { claim: 12, ..BASIS },
        ] {
            kept(&listings, now);
            assert!(
                listings.take("t", Some(other), now).0.is_none(),
                "{other:?}"
            );
            assert_eq!(listings.len(), 0, "dropped, not kept for later");
        }
    }

    #[test]
    fn a_listing_older_than_the_bound_is_dropped_so_that_a_key_deleted_by_hand_heals() {
        let (listings, _events) = listings();
        let read = Instant::now();
        kept(&listings, read);
        assert!(
            listings
                .take("t", Some(BASIS), read + MAX_AGE - Duration::from_millis(1))
                .0
                .is_some()
        );
        kept(&listings, read);
        assert!(listings.take("t", Some(BASIS), read + MAX_AGE).0.is_none());
        listings.set_max_age(Duration::ZERO);
        kept(&listings, read);
        assert!(
            listings.take("t", Some(BASIS), read).0.is_none(),
            "zero: never"
        );
    }

    #[test]
    fn any_lease_or_reachability_event_drops_every_listing() {
        let (listings, events) = listings();
        let now = Instant::now();
        for event in [
            Event::Replaced {
                ttl: MAX_AGE,
                old: 7,
                new: 8,
            },
            Event::Unreachable {
                ttl: MAX_AGE,
                lease: 7,
            },
            Event::Restored {
                ttl: MAX_AGE,
                lease: 7,
            },
        ] {
            kept(&listings, now);
            events.send(event).unwrap();
            assert!(
                listings.take("t", Some(BASIS), now).0.is_none(),
                "{event:?}"
            );
        }
    }

    #[test]
    fn a_sync_in_flight_when_a_target_is_forgotten_keeps_nothing() {
        let (listings, events) = listings();
        let now = Instant::now();
        let (_, ticket) = listings.take("t", Some(BASIS), now);
        listings.forget("t");
        listings.keep("t", BASIS, listed(now), ticket);
        assert_eq!(listings.len(), 0);
        let (_, ticket) = listings.take("t", Some(BASIS), now);
        events
            .send(Event::Unreachable {
                ttl: MAX_AGE,
                lease: 7,
            })
            .unwrap();
        listings.keep("t", BASIS, listed(now), ticket);
        assert_eq!(listings.len(), 0, "an event in flight voids it too");
        let (_, ticket) = listings.take("t", Some(BASIS), now);
        listings.forget_all();
        listings.keep("t", BASIS, listed(now), ticket);
        assert_eq!(listings.len(), 0);
    }
}
