//! What a reconcile does for one `GrpcService`: apply (publish) and cleanup (deregister), with
//! the outcome written to status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

use super::publication;
use super::status::{LastChange, Outcome, endpoints_event, next_status, transition_events};
use super::watch::{pod_ref, slice_ref};
use super::writer::Submitted;
use super::{CONFLICT_RECHECK, Context, EVENT_INTERVAL, RESYNC};
use crate::crd::GrpcService;
use crate::desired::{Desired, Plan, Source, SpecError, desired};
use crate::registry::{self, Claim, Owner, Planned, Publication};
use crate::source::Candidate;
use crate::{Error, Result};

/// The candidates a plan selects and the desired state they make.
type Evaluated = (Vec<Arc<Candidate>>, Desired);

impl GrpcService {
    fn owner(&self) -> Result<Owner> {
        Ok(Owner {
            uid: self.uid().ok_or(Error::MissingField("metadata.uid"))?,
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
        })
    }

    fn ttl(&self, ctx: &Context) -> Duration {
        self.spec
            .ttl_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or_else(|| ctx.backend.default_ttl(), Duration::from_secs)
    }

    /// Publishes the registrable selected candidates and reports the outcome in status.
    pub(super) async fn apply(&self, ctx: &Context) -> Result<Action> {
        let owner = self.owner()?;
        let plan = match self.plan(ctx, &owner).await {
            Ok(Ok(plan)) => plan,
            Ok(Err(e)) => return self.invalid_spec(ctx, &e).await,
            Err(e) => {
                let published = self.published_target(ctx);
                return self
                    .backend_failed(ctx, published.as_deref().unwrap_or_default(), None, e)
                    .await;
            }
        };
        tracing::Span::current().record("registry_target", plan.target());

        // What the spec asks for, computed before the claim so that status counts are true in
        // every outcome (a conflict too), and the spec is known valid before anything is claimed.
        let (selected, want) = match self.evaluate(ctx, &plan) {
            Ok(evaluated) => evaluated,
            Err(invalid) => {
                let (e, want) = *invalid;
                // Nothing was released or claimed: status keeps naming the target still
                // published (a changed target is shown only once it is taken), so that the next
                // valid spec releases the right one.
                let published = self.published_target(ctx);
                let shown = match published.as_deref() {
                    Some(old) if old != plan.target() => None,
                    _ => Some(plan.target()),
                };
                return self.invalid_spec_for(ctx, &e, shown, Some(&want)).await;
            }
        };
        // The last valid spec, as seen: published again should the spec turn invalid before it
        // is recorded (e.g. while the registry is unreachable).
        ctx.published.saw(
            ctx.term(),
            &owner.uid,
            publication::Record::of(self, plan.target()),
        );
        self.publish(ctx, &owner, &plan, &selected, want, None)
            .await
    }

    /// The candidates `plan` selects and the desired state they make. Two endpoints on one key
    /// are a property of the endpoints: one is registered, the other reported, and the rest
    /// keep following readiness. A template that maps every endpoint to one key, or an entry
    /// too large for any write, is the spec's fault: found here, before anything is released or
    /// claimed (with the counts, for status).
    fn evaluate(
        &self,
        ctx: &Context,
        plan: &Planned,
    ) -> Result<Evaluated, Box<(SpecError, Desired)>> {
        let selected = self.select(ctx, &plan.plan);
        let mut want = desired(&plan.plan, &selected);
        let checked = plan
            .placement
            .dedupe(std::mem::take(&mut want.endpoints))
            .and_then(|(kept, collisions)| {
                want.endpoints = kept;
                want.collisions = collisions;
                plan.placement.render(&want.endpoints).map(|_| ())
            });
        match checked {
            Ok(()) => Ok((selected, want)),
            Err(e) => Err(Box::new((e, want))),
        }
    }

    /// Publishes `want` under `plan` for `owner`: frees a previously published other target,
    /// claims this one, records the spec as the last valid publication (before the sync, so
    /// that the record never lags the keys), and syncs. With `invalid`, `self` carries the last
    /// valid spec of a service whose current spec is invalid: its status already says so, and
    /// only the registry is written.
    async fn publish(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        selected: &[Arc<Candidate>],
        mut want: Desired,
        invalid: Option<&SpecError>,
    ) -> Result<Action> {
        let report_status = invalid.is_none();
        // A changed target: free the old one first, so it never holds stale endpoints. The old
        // one is what status names and what the registry recorded last (a leader acting on a
        // stale view may have published under a target status never named).
        let recorded = match ctx
            .published
            .recorded(ctx.backend.as_ref(), ctx.term(), &owner.uid)
            .await
        {
            Ok(record) => record.map(|record| record.target),
            Err(e) if report_status => {
                return self
                    .backend_failed(ctx, plan.target(), Some(&want), e)
                    .await;
            }
            Err(e) => return Err(e.into()),
        };
        let mut old_targets: Vec<String> = self.published_target(ctx).into_iter().collect();
        old_targets.extend(recorded.filter(|t| !old_targets.contains(t)));
        for old in old_targets.iter().filter(|t| **t != plan.target()) {
            let deleted = ctx.backend.release(old, owner).await?;
            info!(old_target = old, deleted, "released previous target");
            ctx.published.released(ctx.term(), &owner.uid);
            ctx.released(old);
        }

        if !ctx.backend.reachable() {
            let error = registry::Error::Unreachable {
                backend: ctx.backend.name(),
            };
            if !report_status {
                return Err(error.into());
            }
            return self
                .backend_failed(ctx, plan.target(), Some(&want), error)
                .await;
        }
        // Registered before the claim, so that a release landing between a refused claim and
        // the registration still wakes this service.
        ctx.wait_for_release(plan.target(), ObjectRef::from_obj(self));
        match self.claim(ctx, plan.target(), owner).await? {
            Ok(Claim::Owned) => {
                ctx.stop_waiting(&ObjectRef::from_obj(self));
                // Status names the target published, so that the next spec releases it.
                if let Some(error) = invalid
                    && self.published_target(ctx).as_deref() != Some(plan.target())
                {
                    let outcome = Outcome::InvalidSpec {
                        message: error.to_string(),
                        target: Some(plan.target()),
                        desired: None,
                    };
                    self.submit_status(ctx, &outcome);
                }
            }
            Ok(Claim::Conflict {
                owner: other,
                target: held,
                ..
            }) => {
                ctx.wait_for_release(&held, ObjectRef::from_obj(self));
                if report_status {
                    self.conflict(ctx, selected, plan.target(), &other, &held, &want);
                }
                return Ok(Action::requeue(CONFLICT_RECHECK));
            }
            Err(e) => {
                ctx.stop_waiting(&ObjectRef::from_obj(self));
                if !report_status {
                    return Err(e.into());
                }
                return self
                    .backend_failed(ctx, plan.target(), Some(&want), e)
                    .await;
            }
        }
        let publication = Publication {
            placement: plan.placement.clone(),
            owner: owner.clone(),
            ttl: self.ttl(ctx),
            endpoints: Arc::new(std::mem::take(&mut want.endpoints)),
        };
        // Recorded in the registry first, so that any replica can keep publishing it once the
        // spec turns invalid, whatever became of the sync.
        let record = publication::Record::of(self, plan.target());
        let (backend, term) = (ctx.backend.as_ref(), ctx.term());
        let previous = match invalid {
            None => ctx.published.recorded(backend, term, &owner.uid).await?,
            Some(_) => None,
        };
        let synced = match ctx.published.keep(backend, term, owner, &record).await {
            Ok(()) => ctx.backend.sync(&publication).await,
            Err(e) => Err(e),
        };
        let report = match (synced, invalid) {
            (Ok(report), _) => report,
            // The last valid spec cannot render the endpoints as they are now either: the keys
            // stay.
            (Err(registry::Error::Spec(_)), Some(_)) => return Ok(Action::await_change()),
            // The backend refuses the spec (e.g. a name or metadata against its rules): it is
            // not valid after all, so the previous record is the last valid one again.
            (Err(registry::Error::Spec(e)), None) => {
                ctx.published.unsee(term, &owner.uid);
                if let Some(previous) = previous
                    && let Err(restore) = ctx.published.keep(backend, term, owner, &previous).await
                {
                    warn!(error = %restore, "failed to restore the record of the last valid spec");
                }
                return self
                    .invalid_spec_for(ctx, &e, Some(plan.target()), Some(&want))
                    .await;
            }
            (Err(e), Some(_)) => return Err(e.into()),
            (Err(e), None) => {
                return self
                    .backend_failed(ctx, plan.target(), Some(&want), e)
                    .await;
            }
        };
        if report.puts + report.deletes > 0 {
            ctx.last_changes.lock().expect("lock").insert(
                owner.uid.clone(),
                LastChange {
                    revision: report.revision,
                    at: Time(k8s_openapi::jiff::Timestamp::now()),
                },
            );
            log_sync(&report);
        }
        if !report_status {
            return Ok(Action::await_change());
        }
        self.note_transitions(ctx, selected, report.puts + report.deletes > 0);
        ctx.metrics
            .observe_service(&owner.namespace, &owner.name, &want, report.registered);
        let last_change = ctx
            .last_changes
            .lock()
            .expect("lock")
            .get(&owner.uid)
            .cloned();
        let outcome = Outcome::Synced {
            target: plan.target(),
            desired: &want,
            report: &report,
            last_change: last_change.as_ref(),
        };
        // Written behind (coalesced, at most once per STATUS_INTERVAL for counts alone; the
        // last of a burst is never lost), so this reconcile's slot is free at once.
        let write = self.submit_status(ctx, &outcome);
        let event_due = self.announce_endpoints(ctx, &owner.uid, report.registered, &want, write);
        // The count Event at most once per EVENT_INTERVAL: come back for a held-back one.
        Ok(Action::requeue(event_due.unwrap_or(RESYNC)))
    }

    /// Reports that another GrpcService owns `target` (or `held`, which overlaps it).
    fn conflict(
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

    /// The target status names, as this process last wrote or queued it (a status written
    /// behind may not have reached the watch yet), else as the object carries it.
    fn published_target(&self, ctx: &Context) -> Option<String> {
        ctx.writer.latest(self).and_then(|s| s.target)
    }

    /// The validated spec, planned by the backend. A service still published under the target
    /// it had before the backend's current tenancy rule keeps it while the registry's ownership
    /// record names this service, so that an upgrade renames nothing; its spec naming another
    /// target moves it under the rule.
    async fn plan(
        &self,
        ctx: &Context,
        owner: &Owner,
    ) -> Result<Result<Planned, SpecError>, registry::Error> {
        let published = self.published_target(ctx);
        let planner = ctx.backend.planner();
        if let Some(old) = planner.pre_rule_target(self, &ctx.policy)
            && published.as_deref() == Some(old.as_str())
            && ctx
                .backend
                .owner_of(&old)
                .await?
                .is_some_and(|o| o.uid == owner.uid)
        {
            let kept = planner.keeping(self, &ctx.policy, old);
            if let Ok(plan) = &kept {
                debug!(
                    kept_target = plan.target(),
                    "keeps the target it had before the tenancy rule; its spec must name an allowed one to move"
                );
            }
            return Ok(kept);
        }
        Ok(planner.plan(self, &ctx.policy))
    }

    /// Sends an `EndpointsChanged` Event when the registered count moved since the last one
    /// this process announced, at most once per [`EVENT_INTERVAL`]; returns when to come back
    /// when one is held back. A status transition (its own Event) resets the baseline.
    fn announce_endpoints(
        &self,
        ctx: &Context,
        uid: &str,
        registered: usize,
        want: &Desired,
        write: Submitted,
    ) -> Option<Duration> {
        let now = std::time::Instant::now();
        let event = {
            let mut announced = ctx.announced.lock().expect("lock");
            let entry = announced.entry(uid.to_owned()).or_insert((registered, now));
            if write == (Submitted::Queued { transition: true }) {
                *entry = (registered, now);
            }
            let (before, at) = *entry;
            if before == registered {
                return None;
            }
            let since = now.duration_since(at);
            if since < EVENT_INTERVAL {
                return Some(EVENT_INTERVAL - since);
            }
            *entry = (registered, now);
            endpoints_event(before, registered, want)
        };
        ctx.writer.event(self, event);
        None
    }

    /// The candidates `plan`'s source yields now, recording which objects were read so that
    /// their later events (even once they no longer match) wake this service.
    fn select(&self, ctx: &Context, plan: &Plan) -> Vec<Arc<Candidate>> {
        let this = ObjectRef::from_obj(self);
        match &plan.source {
            Source::Pods(selector) => {
                let selected = ctx.candidates.select(&plan.namespace, selector);
                ctx.selections.record(
                    this.clone(),
                    selected.iter().map(|c| pod_ref(&plan.namespace, &c.id)),
                );
                ctx.slice_selections.record(this, []);
                selected
            }
            Source::Service(service) => {
                let selection = ctx.slices.select(&plan.namespace, service);
                ctx.slice_selections.record(
                    this.clone(),
                    selection
                        .slices
                        .iter()
                        .map(|name| slice_ref(&plan.namespace, name)),
                );
                ctx.selections.record(this, []);
                selection.candidates
            }
        }
    }

    /// Notes the selected candidates' last seen changes and, when `wrote` (the sync changed the
    /// registry), observes for each change not noted before the time from seeing it to now
    /// (`propagation_seconds`), and from the pod's own transition time as Kubernetes recorded it
    /// (`transition_to_registry_seconds`, whole-second resolution, from this process's start
    /// on). Changes seen before the service was created are not samples (a pod ready long
    /// before its GrpcService existed), nor are those noted while the service could not
    /// publish (a conflict notes them without measuring).
    fn note_transitions(&self, ctx: &Context, selected: &[Arc<Candidate>], wrote: bool) {
        let now = std::time::Instant::now();
        let wall = k8s_openapi::jiff::Timestamp::now();
        let mut transitions = ctx.transitions.lock().expect("lock");
        let (born, seen) = transitions
            .entry(self.key())
            .or_insert_with(|| (self.created_at(), HashMap::new()));
        let mut current = HashMap::with_capacity(selected.len());
        for candidate in selected {
            let Some(observed) = candidate.observed else {
                continue;
            };
            if wrote && observed >= *born && seen.get(&candidate.id) != Some(&observed) {
                ctx.metrics
                    .propagation
                    .observe(now.duration_since(observed).as_secs_f64());
                if let Some(changed) = candidate.changed.filter(|c| *c >= ctx.started) {
                    let seconds = wall.duration_since(changed).as_secs_f64().max(0.0);
                    // A slice's trigger time has sub-second precision; a pod's condition time
                    // whole seconds.
                    if self.spec.service_ref.is_some() {
                        ctx.metrics.trigger_to_registry.observe(seconds);
                    } else {
                        ctx.metrics.transition_to_registry.observe(seconds);
                    }
                }
            }
            current.insert(candidate.id.clone(), observed);
        }
        *seen = current;
    }

    /// When the object was created, on this process's monotonic clock (Kubernetes keeps whole
    /// seconds, so up to a second early).
    fn created_at(&self) -> std::time::Instant {
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

    /// `<namespace>/<name>`.
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }

    /// Claims the target; takes it over when the recorded owner no longer exists. The inner
    /// result is the backend's; the outer one fails when the owner could not be looked up.
    async fn claim(
        &self,
        ctx: &Context,
        target: &str,
        owner: &Owner,
    ) -> Result<Result<Claim, registry::Error>> {
        let claim = match ctx.backend.claim(target, owner).await {
            Ok(claim) => claim,
            Err(e) => return Ok(Err(e)),
        };
        let Claim::Conflict {
            owner: other,
            version,
            target: held,
        } = &claim
        else {
            return Ok(Ok(claim));
        };
        // Only the target itself is taken over from a stale owner; a nested or containing
        // target stays its owner's until released.
        if other.namespace.is_empty() || held != target {
            return Ok(Ok(claim));
        }
        let api: Api<GrpcService> = Api::namespaced(ctx.client.clone(), &other.namespace);
        let alive = api
            .get_opt(&other.name)
            .await
            .map_err(Error::kube("look up target owner"))?
            .is_some_and(|o| o.uid().as_deref() == Some(other.uid.as_str()));
        if alive {
            return Ok(Ok(claim));
        }
        info!(stale_owner = %format!("{}/{}", other.namespace, other.name), "target owner no longer exists; taking over");
        Ok(ctx.backend.take_over(target, owner, *version).await)
    }

    /// Reports a spec that cannot be applied. The service stays published under its last valid
    /// spec (a typo must not take it down), evaluated against the current pods: readiness is
    /// still followed, and keys are re-put after a lease replacement. The next spec change is
    /// reconciled afresh.
    async fn invalid_spec(&self, ctx: &Context, error: &SpecError) -> Result<Action> {
        self.invalid_spec_for(ctx, error, None, None).await
    }

    /// As [`Self::invalid_spec`], with the target and counts when the spec got that far.
    async fn invalid_spec_for(
        &self,
        ctx: &Context,
        error: &SpecError,
        target: Option<&str>,
        counts: Option<&Desired>,
    ) -> Result<Action> {
        let outcome = Outcome::InvalidSpec {
            message: error.to_string(),
            target,
            desired: counts,
        };
        // Logged when it becomes the condition, not on every re-reconcile of the same spec.
        if self.submit_status(ctx, &outcome).is_transition() {
            // Counted once per turn into InvalidSpec, like a failed reconcile: the spec, not
            // the registry, failed.
            ctx.metrics.reconcile_failed("invalid_spec");
            warn!(error = %error, "invalid spec; keeping what the last valid spec published");
        }
        // The last valid spec (recorded in the registry, so it survives a restart or a
        // failover, or seen since), published against the pods as they are now: readiness is
        // still followed (an unready pod leaves) while the spec is being fixed.
        let owner = self.owner()?;
        let last = ctx
            .published
            .last(ctx.backend.as_ref(), ctx.term(), &owner.uid)
            .await?;
        let Some((old, plan)) = last.and_then(|record| {
            let plan = record.plan(self, &ctx.policy, ctx.backend.planner())?;
            Some((record.service(self), plan))
        }) else {
            return Ok(Action::await_change());
        };
        match old.evaluate(ctx, &plan) {
            // Boxed: a valid spec's publish reaches here when the backend refuses it as a spec.
            Ok((selected, want)) => {
                Box::pin(old.publish(ctx, &owner, &plan, &selected, want, Some(error))).await
            }
            // The old spec cannot render the pods as they are now either: leave the keys.
            Err(_) => Ok(Action::await_change()),
        }
    }

    /// Reports a backend failure in status (best effort) and hands the error to the retry
    /// policy.
    async fn backend_failed(
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

    /// Deletes this service's keys and ownership record; the finalizer is released after.
    pub(super) async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        let owner = self.owner()?;
        let mut targets: Vec<String> = self.published_target(ctx).into_iter().collect();
        // What the spec names now, and what was last published validly (the spec may have
        // moved to another backend or target since), as the registry recorded it.
        let published = ctx
            .published
            .recorded(ctx.backend.as_ref(), ctx.term(), &owner.uid)
            .await?
            .map(|record| record.target);
        let planned = ctx
            .backend
            .planner()
            .plan(self, &ctx.policy)
            .ok()
            .map(|planned| planned.target().to_owned());
        for target in [planned, published].into_iter().flatten() {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        for target in targets {
            let deleted = ctx.backend.release(&target, &owner).await?;
            info!(registry_target = target, deleted, "deregistered service");
            ctx.released(&target);
        }
        ctx.stop_waiting(&ObjectRef::from_obj(self));
        ctx.selections.record(ObjectRef::from_obj(self), []);
        ctx.slice_selections.record(ObjectRef::from_obj(self), []);
        ctx.published.forget(&owner.uid);
        ctx.writer.forget(&owner.uid);
        ctx.transitions
            .lock()
            .expect("lock")
            .remove(&format!("{}/{}", owner.namespace, owner.name));
        ctx.last_changes.lock().expect("lock").remove(&owner.uid);
        ctx.announced.lock().expect("lock").remove(&owner.uid);
        ctx.metrics.forget_service(&owner.namespace, &owner.name);
        Ok(Action::await_change())
    }

    /// Hands the status `outcome` implies to the writer (see [`super::writer`]), with its
    /// transition Events; nothing when it equals the latest this process knows. A replica
    /// deposed mid-reconcile leaves status to the new leader.
    fn submit_status(&self, ctx: &Context, outcome: &Outcome<'_>) -> Submitted {
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

/// Logs a sync that changed the registry.
fn log_sync(report: &registry::SyncReport) {
    if let Some(lease) = report.lease {
        info!(
            puts = report.puts,
            deletes = report.deletes,
            registered = report.registered,
            revision = report.revision,
            lease_id = %format!("{lease:x}"),
            "registry updated"
        );
    } else {
        info!(
            puts = report.puts,
            deletes = report.deletes,
            registered = report.registered,
            revision = report.revision,
            "registry updated"
        );
    }
}
