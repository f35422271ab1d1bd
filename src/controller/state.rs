//! What this process keeps per GrpcService between its reconciles, in one place with one
//! lifecycle: created on first use, dropped when the service is cleaned up or seen gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::status::LastChange;
use crate::backoff::Backoff;
use crate::source::Candidate;

/// One service's state: a cache, never the record (that lives in the registry and the API
/// server), so losing it costs at most a metric sample or an Event held back.
#[derive(Debug, Default)]
pub(super) struct ServiceState {
    /// When the service was created (on the monotonic clock), and the last change seen of each
    /// candidate it selected, for the propagation metrics.
    pub transitions: Option<Transitions>,
    /// The last registry change, whose revision and time status carries.
    pub last_change: Option<LastChange>,
    /// The registered count last announced in an Event, and when.
    pub announced: Option<(usize, Instant)>,
    /// Retry pacing while its reconciles fail, and the last failure said.
    pub failure: Option<(Backoff, String)>,
}

/// When a service was created (on the monotonic clock), and the candidates it selected with a
/// change seen, as last noted (sorted by id; shared with the index, so about a pointer each).
pub(super) type Transitions = (Instant, Vec<Arc<Candidate>>);

/// Every service's state, by uid.
#[derive(Debug, Default)]
pub(super) struct ServiceStates(Mutex<HashMap<String, ServiceState>>);

impl ServiceStates {
    /// Runs `f` on the state of the service `uid`, created on first use.
    pub(super) fn with<T>(&self, uid: &str, f: impl FnOnce(&mut ServiceState) -> T) -> T {
        let mut states = self.0.lock().expect("lock");
        match states.get_mut(uid) {
            Some(state) => f(state),
            None => f(states.entry(uid.to_owned()).or_default()),
        }
    }

    /// The service `uid` reconciled: its failure streak, if any, is over.
    pub(super) fn succeeded(&self, uid: &str) {
        if let Some(state) = self.0.lock().expect("lock").get_mut(uid) {
            state.failure = None;
        }
    }

    /// Drops the state of the service `uid` (it is gone).
    pub(super) fn forget(&self, uid: &str) {
        self.0.lock().expect("lock").remove(uid);
    }

    /// How many services have state.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}
