//! The fence state every backend shares: whether this replica may write, and the guard its
//! writes carry while it leads. A backend supplies only its primitive, the compare (etcd) or
//! check (Consul) on its leader record at the version this state holds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::info;

use super::ownership::Claims;
use super::{Error, Result};

/// The write permission of this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum State<G> {
    /// No leader election: always write, unguarded (a single replica).
    Off,
    /// Not the leader: write nothing.
    Follower,
    /// The leader: write until `valid_until`, guarded on the leader record still being at
    /// `guard`.
    Leader(Leader<G>),
}

/// What a leader holds: its record's version, how long it may write, and whose record it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Leader<G> {
    /// The leader record's version (etcd's mod revision, Consul's modify index): every write
    /// is guarded on it.
    pub(super) guard: G,
    /// The local bound of the Kubernetes Lease; no write after it.
    pub(super) valid_until: Instant,
    /// The replica holding the Lease, kept to write the record again for the same term.
    pub(super) holder: Arc<str>,
    /// Its term (the Lease's transitions).
    pub(super) term: i64,
}

/// The fence: one state machine (off, follower, leader until a deadline) for every backend,
/// and the claims made under the current permission (a new leader, or a deposed one, starts
/// with none: the leader re-claims everything it reconciles).
#[derive(Debug)]
pub(super) struct Fence<G> {
    state: Mutex<State<G>>,
    claims: Claims,
}

impl<G> Default for Fence<G> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::Off),
            claims: Claims::default(),
        }
    }
}

impl<G: Clone> Fence<G> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<G>> {
        self.state.lock().expect("lock")
    }

    /// The guard a write must carry now: `None` without leader election, the leader record's
    /// version while leading.
    ///
    /// # Errors
    /// [`Error::Fenced`] naming `op` when this replica is not (or no longer) the leader.
    pub(super) fn guard(&self, op: &'static str) -> Result<Option<G>> {
        match &*self.lock() {
            State::Off => Ok(None),
            State::Leader(leader) if Instant::now() < leader.valid_until => {
                Ok(Some(leader.guard.clone()))
            }
            State::Leader(_) | State::Follower => Err(Error::Fenced { op }),
        }
    }

    /// The claims made under the current permission.
    pub(super) fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Whether a write would be attempted now.
    pub(super) fn may_write(&self) -> bool {
        self.guard("write").is_ok()
    }

    /// Leads from now on, guarding every write on `leader`'s record version, with no claim.
    pub(super) fn lead(&self, leader: Leader<G>) {
        self.claims.clear();
        *self.lock() = State::Leader(leader);
    }

    /// Leads for `term` until `valid_until`, once the backend wrote `holder`'s leader record at
    /// `guard` (its primitive). Returns the record's version.
    pub(super) fn led(&self, guard: G, holder: &str, term: i64, valid_until: Instant) -> i64
    where
        G: TryInto<i64> + std::fmt::Display,
    {
        info!(term, revision = %guard, holder, "fenced registry writes as leader");
        self.lead(Leader {
            guard: guard.clone(),
            valid_until,
            holder: holder.into(),
            term,
        });
        guard.try_into().unwrap_or(i64::MAX)
    }

    /// Extends the leader's write permission to `valid_until` (after a Lease renewal).
    pub(super) fn extend(&self, valid_until: Instant) {
        if let State::Leader(leader) = &mut *self.lock() {
            leader.valid_until = valid_until;
        }
    }

    /// Stops writing at once, and forgets claims (the next leader owns them).
    pub(super) fn depose(&self) {
        *self.lock() = State::Follower;
        self.claims.clear();
    }

    /// The leader this replica is, if it is one (whether or not its permission ran out).
    pub(super) fn leader(&self) -> Option<Leader<G>> {
        match &*self.lock() {
            State::Leader(leader) => Some(leader.clone()),
            State::Off | State::Follower => None,
        }
    }

    /// Guards on `guard` from now on, when this replica still leads for `term` (its own record
    /// was written again at a new version). Returns whether it does.
    pub(super) fn reguard(&self, term: i64, guard: G) -> bool {
        match &mut *self.lock() {
            State::Leader(leader) if leader.term == term => {
                leader.guard = guard;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn leader(valid_until: Instant) -> Leader<i64> {
        Leader {
            guard: 7,
            valid_until,
            holder: "a".into(),
            term: 3,
        }
    }

    #[test]
    fn without_leader_election_every_write_goes_unguarded() {
        let fence = Fence::<i64>::default();
        assert_eq!(fence.guard("write").unwrap(), None);
        assert!(fence.may_write());
    }

    #[test]
    fn a_leader_guards_on_its_record_until_its_lease_runs_out_and_a_deposed_one_writes_nothing() {
        let fence = Fence::default();
        fence.lead(leader(Instant::now() + Duration::from_secs(60)));
        assert_eq!(fence.guard("write").unwrap(), Some(7));
        fence.extend(Instant::now() - Duration::from_secs(1));
        assert!(matches!(
            fence.guard("write to etcd"),
            Err(Error::Fenced {
                op: "write to etcd"
            })
        ));
        fence.depose();
        assert!(!fence.may_write());
        assert_eq!(fence.leader(), None);
    }

    #[test]
    fn a_record_written_again_is_guarded_on_only_for_the_same_term() {
        let fence = Fence::default();
        fence.lead(leader(Instant::now() + Duration::from_secs(60)));
        assert!(!fence.reguard(4, 9));
        assert!(fence.reguard(3, 9));
        assert_eq!(fence.guard("write").unwrap(), Some(9));
    }
}
