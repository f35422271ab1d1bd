//! What a reconcile reports for one `GrpcService`: its status and Events (written behind, see
//! [`super::writer`]), its metrics, and the propagation of the changes it published.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::{info, warn};

use super::status::{Kept, LastChange, Outcome, endpoints_event, next_status, transition_events};
use super::writer::Submitted;
use super::{Context, EVENT_INTERVAL, RESYNC};
use crate::Result;
use crate::crd::GrpcService;
use crate::desired::{Desired, SpecError};
use crate::registry::{self, Owner, Planned};
use crate::source::Candidate;

/// What a reconcile published: for whom, under which plan, from which candidates, and what its
/// sync did.
pub(super) struct Synced<'a> {
    pub owner: &'a Owner,
    pub plan: &'a Planned,
    pub selected: &'a [Arc<Candidate>],
    pub want: &'a Desired,
    pub report: &'a registry::SyncReport,
}

impl GrpcService {
    /// Reports a sync of a valid spec: metrics, status (written behind) and the count Event;
    /// when to come back.
    pub(super) fn report_synced(&self, ctx: &Context, synced: &Synced<'_>) -> Action {
        let last_change = self.note_sync(ctx, synced);
        let outcome = Outcome::Synced {
            target: synced.plan.target(),
            desired: synced.want,
            report: synced.report,
            last_change: last_change.as_ref(),
        };
        // Written behind (coalesced, at most once per STATUS_INTERVAL for counts alone; the
        // last of a burst is never lost), so this reconcile's slot is free at once.
        let write = self.submit_status(ctx, &outcome);
        let event_due = self.announce(ctx, synced, write);
        // The count Event at most once per EVENT_INTERVAL: come back for a held-back one.
        Action::requeue(event_due.unwrap_or(RESYNC))
    }

    /// Reports a sync of the last valid publication of a service whose spec is `invalid`
    /// (`self` carries that publication's spec): the same metrics and count Event as a valid
    /// spec's, and a status that stays InvalidSpec but follows what is still published.
    /// The next spec change is reconciled afresh; a count Event held back comes back.
    pub(super) fn report_kept(
        &self,
        ctx: &Context,
        synced: &Synced<'_>,
        invalid: &SpecError,
    ) -> Action {
        let last_change = self.note_sync(ctx, synced);
        let outcome = Outcome::InvalidSpec {
            message: invalid.to_string(),
            target: Some(synced.plan.target()),
            desired: None,
            kept: Some(Kept {
                target: synced.plan.target(),
                desired: synced.want,
                report: synced.report,
                last_change: last_change.as_ref(),
            }),
        };
        let write = self.submit_status(ctx, &outcome);
        self.announce(ctx, synced, write)
            .map_or_else(Action::await_change, Action::requeue)
    }

    /// The propagation and service metrics of a sync; the last change it or an earlier sync of
    /// this service made.
    fn note_sync(&self, ctx: &Context, synced: &Synced<'_>) -> Option<LastChange> {
        let Synced {
            owner,
            selected,
            want,
            report,
            ..
        } = synced;
        self.note_transitions(ctx, selected, report.puts + report.deletes > 0);
        ctx.metrics
            .observe_service(&owner.namespace, &owner.name, want, report.registered);
        ctx.states
            .with(&owner.uid, |state| state.last_change.clone())
    }

    /// [`Self::announce_endpoints`] of a sync.
    fn announce(&self, ctx: &Context, synced: &Synced<'_>, write: Submitted) -> Option<Duration> {
        self.announce_endpoints(
            ctx,
            &synced.owner.uid,
            synced.report.registered,
            synced.want,
            write,
        )
    }

    /// Reports that another GrpcService owns `target` (or `held`, which overlaps it).
    pub(super) fn conflict(
        &self,
        ctx: &Context,
        selected: &[Arc<Candidate>],
        target: &str,
        other: &Owner,
        held: &str,
        want: &Desired,
    ) {
        self.note_transitions(ctx, selected, false);
        let mut owner = format!("{}/{}", other.namespace, other.name);
        if held != target {
            owner.push_str(&format!(
                " through target {held}, which overlaps it (a sync of the outer target would delete the inner one's keys)"
            ));
        }
        let outcome = Outcome::Conflict {
            target,
            owner: owner.clone(),
            desired: Some(want),
        };
        if self.submit_status(ctx, &outcome).is_transition() {
            warn!(
                owner,
                "target is owned by another GrpcService; publishing nothing until it is freed"
            );
        }
    }

    /// Sends an `EndpointsChanged` Event when the registered count moved since the last one
    /// this process announced, at most once per [`EVENT_INTERVAL`]; returns when to come back
    /// when one is held back. A status transition (its own Event) resets the baseline.
    pub(super) fn announce_endpoints(
        &self,
        ctx: &Context,
        uid: &str,
        registered: usize,
        want: &Desired,
        write: Submitted,
    ) -> Option<Duration> {
        let now = std::time::Instant::now();
        let event = ctx.states.with(uid, |state| {
            let entry = state.announced.get_or_insert((registered, now));
            if write == (Submitted::Queued { transition: true }) {
                *entry = (registered, now);
            }
            let (before, at) = *entry;
            if before == registered {
                return Err(None);
            }
            let since = now.duration_since(at);
            if since < EVENT_INTERVAL {
                return Err(Some(EVENT_INTERVAL - since));
            }
            *entry = (registered, now);
            Ok(endpoints_event(before, registered, want))
        });
        let event = match event {
            Ok(event) => event,
            Err(due) => return due,
        };
        ctx.writer.event(self, event);
        None
    }

    /// Notes the selected candidates' last seen changes and, when `wrote` (the sync changed the
    /// registry), observes for each change not noted before the time from seeing it to now
    /// (`propagation_seconds`), and from the pod's own transition time as Kubernetes recorded it
    /// (`transition_to_registry_seconds`, whole-second resolution, from this process's start
    /// on). Changes seen before the service was created are not samples (a pod ready long
    /// before its GrpcService existed), nor are those noted while the service could not
    /// publish (a conflict notes them without measuring).
    pub(super) fn note_transitions(&self, ctx: &Context, selected: &[Arc<Candidate>], wrote: bool) {
        let uid = self.uid().unwrap_or_default();
        ctx.states.with(&uid, |state| {
            let (born, seen) = state
                .transitions
                .get_or_insert_with(|| (self.created_at(), Vec::new()));
            self.note_seen(ctx, selected, wrote, *born, seen);
        });
    }

    /// [`Self::note_transitions`] on the state of one service: created at `born`, its
    /// candidates as last noted in `noted`.
    pub(super) fn note_seen(
        &self,
        ctx: &Context,
        selected: &[Arc<Candidate>],
        wrote: bool,
        born: std::time::Instant,
        noted: &mut Vec<Arc<Candidate>>,
    ) {
        let (changed, now_noted) = unnoted(noted, selected);
        *noted = now_noted;
        if !wrote {
            return;
        }
        let now = std::time::Instant::now();
        let wall = k8s_openapi::jiff::Timestamp::now();
        for candidate in changed {
            let Some(observed) = candidate.observed.filter(|o| *o >= born) else {
                continue;
            };
            ctx.metrics
                .to_registry
                .from_watch
                .observe(now.duration_since(observed).as_secs_f64());
            if let Some(changed) = candidate.changed.filter(|c| *c >= ctx.started) {
                let seconds = wall.duration_since(changed).as_secs_f64().max(0.0);
                // A slice's trigger time has sub-second precision; a pod's condition time
                // whole seconds.
                if self.spec.service_ref.is_some() {
                    ctx.metrics.to_registry.from_trigger.observe(seconds);
                } else {
                    ctx.metrics.to_registry.from_transition.observe(seconds);
                }
            }
        }
    }

    /// When the object was created, on this process's monotonic clock (Kubernetes keeps whole
    /// seconds, so up to a second early).
    pub(super) fn created_at(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| {
                let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                now.checked_sub(std::time::Duration::try_from(age).ok()?)
            })
            .unwrap_or(now)
    }

    /// Reports a backend failure in status (best effort) and hands the error to the retry
    /// policy.
    pub(super) async fn backend_failed(
        &self,
        ctx: &Context,
        target: &str,
        want: Option<&Desired>,
        error: registry::Error,
    ) -> Result<Action> {
        if let registry::Error::Fenced { .. } = error {
            // Deposed mid-reconcile: the new leader owns status now.
            info!(error = %error, "not the leader; leaving this service to the leader");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let outcome = Outcome::BackendUnavailable {
            target,
            backend: ctx.backend.name(),
            message: error.to_string(),
            desired: want,
        };
        self.submit_status(ctx, &outcome);
        Err(error.into())
    }

    /// Hands the status `outcome` implies to the writer (see [`super::writer`]), with its
    /// transition Events; nothing when it equals the latest this process knows. A replica
    /// deposed mid-reconcile leaves status to the new leader.
    pub(super) fn submit_status(&self, ctx: &Context, outcome: &Outcome<'_>) -> Submitted {
        if !ctx.backend.may_write() {
            return Submitted::Unchanged;
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let prev = ctx.writer.latest(self);
        let next = next_status(prev.as_ref(), self.metadata.generation, outcome, &now);
        ctx.metrics.observe_conditions(
            self.metadata.namespace.as_deref().unwrap_or_default(),
            &self.name_any(),
            &next.conditions,
        );
        if prev.as_ref() == Some(&next) {
            return Submitted::Unchanged;
        }
        let events = transition_events(prev.as_ref(), &next);
        ctx.writer.submit(self, next, events)
    }
}

/// Of `selected` (sorted by id), the candidates with a change seen that `noted` (the candidates
/// noted last time, sorted by id) does not hold for them (new, or seen changing since), and
/// what to note now: every candidate of `selected` with a change seen, once per id. A merge of
/// the two sorted lists that skips, by pointer, every candidate noted before unchanged.
fn unnoted<'a>(
    noted: &[Arc<Candidate>],
    selected: &'a [Arc<Candidate>],
) -> (Vec<&'a Arc<Candidate>>, Vec<Arc<Candidate>>) {
    let mut changed = Vec::new();
    let mut now_noted: Vec<Arc<Candidate>> = Vec::with_capacity(selected.len());
    let mut before = noted.iter().peekable();
    // Every step consumes what it reads of `noted`, so the next one noted before always has a
    // greater id than the last one noted now (noted ids are unique and sorted): a candidate that
    // is that very one is noted again without reading either id. A flip elsewhere in a 400-pod
    // service compares the ids of the flipped pod only.
    for candidate in selected {
        if before.next_if(|b| Arc::ptr_eq(b, candidate)).is_some() {
            now_noted.push(candidate.clone());
            continue;
        }
        if candidate.observed.is_none() || now_noted.last().is_some_and(|l| l.id == candidate.id) {
            continue;
        }
        while before.next_if(|b| b.id < candidate.id).is_some() {}
        let was = before
            .next_if(|b| b.id == candidate.id)
            .and_then(|b| b.observed);
        if was != candidate.observed {
            changed.push(candidate);
        }
        now_noted.push(candidate.clone());
    }
    (changed, now_noted)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn seen(id: &str, at: Option<Instant>) -> Arc<Candidate> {
        Arc::new(Candidate {
            id: id.into(),
            observed: at,
            ..Candidate::default()
        })
    }

    fn ids(candidates: &[&Arc<Candidate>]) -> Vec<String> {
        candidates.iter().map(|c| c.id.clone()).collect()
    }

    #[test]
    fn a_candidate_is_a_change_to_measure_when_it_is_new_or_seen_changing_since_it_was_noted() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        let noted = vec![
            seen("a", Some(t0)),
            seen("b", Some(t0)),
            seen("gone", Some(t0)),
        ];
        let selected = vec![
            seen("a", Some(t0)),
            seen("b", Some(t1)),
            seen("c", Some(t1)),
            seen("never-seen-changing", None),
        ];
        let (changed, now) = unnoted(&noted, &selected);
        assert_eq!(ids(&changed), ["b", "c"]);
        assert_eq!(
            now.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"],
            "what left is forgotten, and a candidate never seen changing is not noted"
        );
        let (again, _) = unnoted(&now, &selected);
        assert!(again.is_empty(), "a change is measured once");
    }

    /// [`unnoted`] without the pointer shortcut: every id compared.
    fn unnoted_by_id<'a>(
        noted: &[Arc<Candidate>],
        selected: &'a [Arc<Candidate>],
    ) -> (Vec<&'a Arc<Candidate>>, Vec<Arc<Candidate>>) {
        let mut changed = Vec::new();
        let mut now_noted: Vec<Arc<Candidate>> = Vec::new();
        for candidate in selected {
            if candidate.observed.is_none() || now_noted.iter().any(|l| l.id == candidate.id) {
                continue;
            }
            let was = noted
                .iter()
                .find(|b| b.id == candidate.id)
                .and_then(|b| b.observed);
            if was != candidate.observed {
                changed.push(candidate);
            }
            now_noted.push(candidate.clone());
        }
        (changed, now_noted)
    }

    proptest::proptest! {
        /// Selections made of the very candidates noted before (a flip elsewhere), of new ones
        /// under the same ids, of repeated ids and of ids never seen changing.
        #[test]
        fn the_pointer_shortcut_notes_and_measures_exactly_what_comparing_ids_does(
            picks in proptest::collection::vec((0_u8..12, 0_u8..4), 0..24),
        ) {
            let t0 = Instant::now();
            let at = |k: u8| (k > 0).then(|| t0 + Duration::from_millis(u64::from(k)));
            let pool: Vec<Arc<Candidate>> =
                (0..12_u8).map(|i| seen(&format!("c{i:02}"), at(i % 3))).collect();
            let (_, noted) = unnoted(&[], &pool);
            let mut selected: Vec<Arc<Candidate>> = picks
                .iter()
                .map(|&(i, how)| match how {
                    0 | 1 => pool[usize::from(i)].clone(),
                    2 => seen(&format!("c{i:02}"), at(i % 3)),
                    _ => seen(&format!("c{i:02}"), at(i % 3 + 1)),
                })
                .collect();
            selected.sort_by(|a, b| a.id.cmp(&b.id));
            let (changed, now) = unnoted(&noted, &selected);
            let (want_changed, want_now) = unnoted_by_id(&noted, &selected);
            let ptrs = |v: &[&Arc<Candidate>]| v.iter().map(|c| Arc::as_ptr(c)).collect::<Vec<_>>();
            proptest::prop_assert_eq!(ptrs(&changed), ptrs(&want_changed));
            let now: Vec<&Arc<Candidate>> = now.iter().collect();
            let want_now: Vec<&Arc<Candidate>> = want_now.iter().collect();
            proptest::prop_assert_eq!(ptrs(&now), ptrs(&want_now));
        }
    }

    #[test]
    fn an_id_selected_twice_is_noted_and_measured_once() {
        let t0 = Instant::now();
        let selected = vec![seen("a", Some(t0)), seen("a", Some(t0))];
        let (changed, now) = unnoted(&[], &selected);
        assert_eq!((changed.len(), now.len()), (1, 1));
    }
}
