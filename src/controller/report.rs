//! What a reconcile reports for one `GrpcService`: its status and Events (written behind, see
//! [`super::writer`]), its metrics, and the propagation of the changes it published.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::{info, warn};

use super::status::{Outcome, endpoints_event, next_status, transition_events};
use super::writer::Submitted;
use super::{Context, EVENT_INTERVAL, RESYNC};
use crate::Result;
use crate::crd::GrpcService;
use crate::desired::Desired;
use crate::registry::{self, Owner, Planned};
use crate::source::Candidate;

impl GrpcService {
    /// Reports a sync of a valid spec: metrics, status (written behind) and the count Event;
    /// when to come back.
    pub(super) fn report_synced(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        selected: &[Arc<Candidate>],
        want: &Desired,
        report: &registry::SyncReport,
    ) -> Action {
        self.note_transitions(ctx, selected, report.puts + report.deletes > 0);
        ctx.metrics
            .observe_service(&owner.namespace, &owner.name, want, report.registered);
        let last_change = ctx
            .states
            .with(&owner.uid, |state| state.last_change.clone());
        let outcome = Outcome::Synced {
            target: plan.target(),
            desired: want,
            report,
            last_change: last_change.as_ref(),
        };
        // Written behind (coalesced, at most once per STATUS_INTERVAL for counts alone; the
        // last of a burst is never lost), so this reconcile's slot is free at once.
        let write = self.submit_status(ctx, &outcome);
        let event_due = self.announce_endpoints(ctx, &owner.uid, report.registered, want, write);
        // The count Event at most once per EVENT_INTERVAL: come back for a held-back one.
        Action::requeue(event_due.unwrap_or(RESYNC))
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
                .get_or_insert_with(|| (self.created_at(), HashMap::new()));
            self.note_seen(ctx, selected, wrote, *born, seen);
        });
    }

    /// [`Self::note_transitions`] on the state of one service: created at `born`, its
    /// candidates last seen changed at `seen`.
    pub(super) fn note_seen(
        &self,
        ctx: &Context,
        selected: &[Arc<Candidate>],
        wrote: bool,
        born: std::time::Instant,
        seen: &mut HashMap<String, std::time::Instant>,
    ) {
        let now = std::time::Instant::now();
        let wall = k8s_openapi::jiff::Timestamp::now();
        // Updated in place (a reconcile of an unchanged service allocates nothing here).
        let mut noted = 0;
        for candidate in selected {
            let Some(observed) = candidate.observed else {
                continue;
            };
            noted += 1;
            let before = match seen.get_mut(&candidate.id) {
                Some(at) => Some(std::mem::replace(at, observed)),
                None => {
                    seen.insert(candidate.id.clone(), observed);
                    None
                }
            };
            if wrote && observed >= born && before != Some(observed) {
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
        // `seen` now holds every id noted: exactly those unless some left (or one came twice).
        if seen.len() != noted {
            let current: HashSet<&str> = selected
                .iter()
                .filter(|c| c.observed.is_some())
                .map(|c| c.id.as_str())
                .collect();
            seen.retain(|id, _| current.contains(id.as_str()));
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
