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
use crate::registry::{self, Claim, Owner, Placement, Publication};
use crate::source::Candidate;
use crate::{Error, Result};

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
        let (plan, placement) = match self.plan(ctx, &owner).await {
            Ok(Ok(planned)) => planned,
            Ok(Err(e)) => return self.invalid_spec(ctx, &e).await,
            Err(e) => {
                let published = self.published_target(ctx);
                return self
                    .backend_failed(ctx, published.as_deref().unwrap_or_default(), None, e)
                    .await;
            }
        };
        let target = placement.target();
        tracing::Span::current().record("registry_target", target);

        // What the spec asks for, computed before the claim so that status counts are true in
        // every outcome (a conflict too), and the spec is known valid before anything is claimed.
        let selected = self.select(ctx, &plan);
        let mut want = desired(&plan, &selected);
        // Two endpoints on one key are a property of the endpoints: one is registered, the other
        // reported, and the rest keep following readiness. A template that maps every endpoint
        // to one key, or an entry too large for any write, is the spec's fault: found here,
        // before anything is released or claimed.
        let checked = placement
            .dedupe(std::mem::take(&mut want.endpoints))
            .and_then(|(kept, collisions)| {
                want.endpoints = kept;
                want.collisions = collisions;
                placement.render(&want.endpoints).map(|_| ())
            });
        if let Err(e) = checked {
            // Nothing was released or claimed: status keeps naming the target still published
            // (a changed target is shown only once it is taken), so that the next valid spec
            // releases the right one.
            let published = self.published_target(ctx);
            let shown = match published.as_deref() {
                Some(old) if old != target => None,
                _ => Some(target),
            };
            return self.invalid_spec_for(ctx, &e, shown, Some(&want)).await;
        }

        // A changed target: free the old one first, so it never holds stale endpoints.
        if let Some(old) = self.published_target(ctx).as_deref()
            && old != target
        {
            let deleted = ctx.backend.release(old, &owner).await?;
            info!(old_target = old, deleted, "released previous target");
            ctx.released(old);
        }

        if !ctx.backend.reachable() {
            let error = registry::Error::Unreachable {
                backend: ctx.backend.name(),
            };
            return self.backend_failed(ctx, target, Some(&want), error).await;
        }
        // Registered before the claim, so that a release landing between a refused claim and
        // the registration still wakes this service.
        ctx.wait_for_release(target, ObjectRef::from_obj(self));
        match self.claim(ctx, target, &owner).await? {
            Ok(Claim::Owned) => ctx.stop_waiting(&ObjectRef::from_obj(self)),
            Ok(Claim::Conflict {
                owner: other,
                target: held,
                ..
            }) => {
                self.note_transitions(ctx, &selected, false);
                ctx.wait_for_release(&held, ObjectRef::from_obj(self));
                let mut owner = format!("{}/{}", other.namespace, other.name);
                if held != target {
                    owner.push_str(&format!(
                        " through target {held}, which overlaps it (a sync of the outer target would delete the inner one's keys)"
                    ));
                }
                let outcome = Outcome::Conflict {
                    target,
                    owner: owner.clone(),
                    desired: Some(&want),
                };
                if self.submit_status(ctx, &outcome).is_transition() {
                    warn!(
                        owner,
                        "target is owned by another GrpcService; publishing nothing until it is freed"
                    );
                }
                return Ok(Action::requeue(CONFLICT_RECHECK));
            }
            Err(e) => {
                ctx.stop_waiting(&ObjectRef::from_obj(self));
                return self.backend_failed(ctx, target, Some(&want), e).await;
            }
        }
        let ttl = self.ttl(ctx);
        let publication = Publication {
            placement: placement.clone(),
            owner: owner.clone(),
            ttl,
            endpoints: Arc::new(std::mem::take(&mut want.endpoints)),
        };
        let synced = match ctx.backend.sync(&publication).await {
            // Recorded in the registry, so that any replica can keep publishing it once the
            // spec turns invalid.
            Ok(report) => ctx
                .published
                .keep(
                    ctx.backend.as_ref(),
                    &owner,
                    &publication::Record::of(self, target),
                )
                .await
                .map(|()| report),
            Err(e) => Err(e),
        };
        let report = match synced {
            Ok(report) => {
                if report.puts + report.deletes > 0 {
                    ctx.last_changes.lock().expect("lock").insert(
                        owner.uid.clone(),
                        LastChange {
                            revision: report.revision,
                            at: Time(k8s_openapi::jiff::Timestamp::now()),
                        },
                    );
                }
                report
            }
            Err(registry::Error::Spec(e)) => {
                return self
                    .invalid_spec_for(ctx, &e, Some(target), Some(&want))
                    .await;
            }
            Err(e) => {
                return self.backend_failed(ctx, target, Some(&want), e).await;
            }
        };
        self.note_transitions(ctx, &selected, report.puts + report.deletes > 0);
        if report.puts + report.deletes > 0 {
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
        ctx.metrics
            .observe_service(&owner.namespace, &owner.name, &want, report.registered);
        let last_change = ctx
            .last_changes
            .lock()
            .expect("lock")
            .get(&owner.uid)
            .cloned();
        let outcome = Outcome::Synced {
            target,
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
    ) -> Result<Result<(Plan, Arc<dyn Placement>), SpecError>, registry::Error> {
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
            if let Ok((_, placement)) = &kept {
                debug!(
                    kept_target = placement.target(),
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
        // The last valid publication, recorded in the registry (so it survives a restart or a
        // failover), evaluated against the pods as they are now: readiness is still followed
        // (an unready pod leaves) while the spec is being fixed.
        let owner = self.owner()?;
        let last = ctx.published.last(ctx.backend.as_ref(), &owner.uid).await?;
        if let Some((record, (plan, placement))) = last.and_then(|r| {
            r.plan(self, &ctx.policy, ctx.backend.planner())
                .map(|planned| (r, planned))
        }) {
            let selected = self.select(ctx, &plan);
            // Colliding endpoints are left out here too (the first of each key stays).
            let endpoints = desired(&plan, &selected).endpoints;
            let endpoints = match placement.dedupe(endpoints.clone()) {
                Ok((kept, _)) => kept,
                Err(_) => endpoints,
            };
            let publication = Publication {
                placement,
                owner,
                ttl: record.service(self).ttl(ctx),
                endpoints: Arc::new(endpoints),
            };
            match ctx.backend.sync(&publication).await {
                // The old spec cannot render the pods as they are now either: leave the keys.
                Ok(_) | Err(registry::Error::Spec(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Action::await_change())
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
            .last(ctx.backend.as_ref(), &owner.uid)
            .await?
            .map(|record| record.target);
        let planned = ctx
            .backend
            .planner()
            .plan(self, &ctx.policy)
            .ok()
            .map(|(_, placement)| placement.target().to_owned());
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
