//! What a reconcile does for one `GrpcService`: apply (publish) and cleanup (deregister), with
//! the outcome written to status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::status::{LastChange, Outcome, endpoints_event, next_status, transition_events};
use super::watch::{pod_ref, slice_ref};
use super::{CONFLICT_RECHECK, Context, EVENT_INTERVAL, FIELD_MANAGER, RESYNC, STATUS_INTERVAL};
use crate::crd::GrpcService;
use crate::desired::{Desired, Plan, Source, SpecError, desired};
use crate::registry::{self, Claim, Owner, Publication};
use crate::source::Candidate;
use crate::{Error, Result};

/// What [`GrpcService::patch_status`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusWrite {
    /// Written; `transition` when the write carried a transition Event (Ready, lease, target).
    Written {
        transition: bool,
    },
    Unchanged,
    Deferred,
}

impl StatusWrite {
    fn is_transition(self) -> bool {
        self == Self::Written { transition: true }
    }
}

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
        let plan = match Plan::new(self, &ctx.policy) {
            Ok(plan) => plan,
            Err(e) => return self.invalid_spec(ctx, &e).await,
        };
        tracing::Span::current().record("target", plan.target.as_str());

        // What the spec asks for, computed before the claim so that status counts are true in
        // every outcome (a conflict too), and the spec is known valid before anything is claimed.
        let selected = self.select(ctx, &plan);
        let mut want = desired(&plan, &selected);
        // A spec whose keys cannot be written (two endpoints on one key, an entry too large for
        // any write) is invalid: found here, before anything is released or claimed.
        if let Err(e) = plan.layout().render(&want.endpoints) {
            // Nothing was released or claimed: status keeps naming the target still published
            // (a changed target is shown only once it is taken), so that the next valid spec
            // releases the right one.
            let published = self.status.as_ref().and_then(|s| s.target.as_deref());
            let shown = match published {
                Some(old) if old != plan.target => None,
                _ => Some(plan.target.as_str()),
            };
            return self.invalid_spec_for(ctx, &e, shown, Some(&want)).await;
        }

        // A changed target: free the old one first, so it never holds stale endpoints.
        if let Some(old) = self.status.as_ref().and_then(|s| s.target.as_deref())
            && old != plan.target
        {
            let deleted = ctx.backend.release(old, &owner).await?;
            info!(old_target = old, deleted, "released previous target");
            ctx.released(old);
        }

        if !ctx.backend.reachable() {
            let error = registry::Error::Unreachable {
                backend: ctx.backend.name(),
            };
            return self
                .backend_failed(ctx, &plan.target, Some(&want), error)
                .await;
        }
        // Registered before the claim, so that a release landing between a refused claim and
        // the registration still wakes this service.
        ctx.wait_for_release(&plan.target, ObjectRef::from_obj(self));
        match self.claim(ctx, &plan.target, &owner).await? {
            Ok(Claim::Owned) => ctx.stop_waiting(&ObjectRef::from_obj(self)),
            Ok(Claim::Conflict {
                owner: other,
                target: held,
                ..
            }) => {
                self.note_transitions(ctx, &selected, false);
                ctx.wait_for_release(&held, ObjectRef::from_obj(self));
                let mut owner = format!("{}/{}", other.namespace, other.name);
                if held != plan.target {
                    owner.push_str(&format!(
                        " through target {held}, which overlaps it (a sync of the outer target would delete the inner one's keys)"
                    ));
                }
                let outcome = Outcome::Conflict {
                    target: &plan.target,
                    owner: owner.clone(),
                    desired: Some(&want),
                };
                if self.patch_status(ctx, &outcome).await?.is_transition() {
                    warn!(
                        owner,
                        "target is owned by another GrpcService; publishing nothing until it is freed"
                    );
                }
                return Ok(Action::requeue(CONFLICT_RECHECK));
            }
            Err(e) => {
                ctx.stop_waiting(&ObjectRef::from_obj(self));
                return self.backend_failed(ctx, &plan.target, Some(&want), e).await;
            }
        }
        let ttl = self.ttl(ctx);
        let publication = Publication {
            layout: plan.layout(),
            owner: owner.clone(),
            ttl,
            endpoints: Arc::new(std::mem::take(&mut want.endpoints)),
            tags: plan.tags.clone(),
        };
        let report = match ctx.backend.sync(&publication).await {
            Ok(report) => {
                ctx.published
                    .lock()
                    .expect("lock")
                    .insert(owner.uid.clone(), (plan.clone(), ttl));
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
                    .invalid_spec_for(ctx, &e, Some(&plan.target), Some(&want))
                    .await;
            }
            Err(e) => {
                return self.backend_failed(ctx, &plan.target, Some(&want), e).await;
            }
        };
        self.note_transitions(ctx, &selected, report.puts + report.deletes > 0);
        if report.puts + report.deletes > 0 {
            // A backend without leases (Consul) reports lease 0: no lease_id field.
            if report.lease_id == 0 {
                info!(
                    puts = report.puts,
                    deletes = report.deletes,
                    registered = report.registered,
                    revision = report.revision,
                    "registry updated"
                );
            } else {
                info!(
                    puts = report.puts,
                    deletes = report.deletes,
                    registered = report.registered,
                    revision = report.revision,
                    lease_id = %format!("{:x}", report.lease_id),
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
            target: &plan.target,
            desired: &want,
            report: &report,
            last_change: last_change.as_ref(),
        };
        let write = self.patch_status(ctx, &outcome).await?;
        let event_due = self
            .announce_endpoints(ctx, &owner.uid, report.registered, &want, write)
            .await;
        // Counts only: the status is written on the requeue, at most once per STATUS_INTERVAL,
        // and the count Event at most once per EVENT_INTERVAL; the last of a burst is never lost.
        let next = match (write, event_due) {
            (StatusWrite::Deferred, _) => STATUS_INTERVAL,
            (_, Some(due)) => due,
            _ => RESYNC,
        };
        Ok(Action::requeue(next))
    }

    /// Sends an `EndpointsChanged` Event when the registered count moved since the last one
    /// this process announced, at most once per [`EVENT_INTERVAL`]; returns when to come back
    /// when one is held back. A status transition (its own Event) resets the baseline.
    async fn announce_endpoints(
        &self,
        ctx: &Context,
        uid: &str,
        registered: usize,
        want: &Desired,
        write: StatusWrite,
    ) -> Option<Duration> {
        let now = std::time::Instant::now();
        let event = {
            let mut announced = ctx.announced.lock().expect("lock");
            let entry = announced.entry(uid.to_owned()).or_insert((registered, now));
            if matches!(write, StatusWrite::Written { transition: true }) {
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
        self.publish(ctx, &[event]).await;
        None
    }

    /// Publishes Events on this object, best effort: an Event that cannot be written must not
    /// fail the reconcile.
    async fn publish(&self, ctx: &Context, events: &[kube::runtime::events::Event]) {
        let Some(reporter) = &ctx.events else {
            return;
        };
        for event in events {
            // A recorder per Event: kube's recorder folds an Event into an earlier one with the
            // same reason and keeps the earlier note, so "3 not ready" would be shown as the
            // earlier "3 not running". Our own rules already bound the volume (transitions
            // only, and counts at most once per EVENT_INTERVAL).
            let recorder =
                kube::runtime::events::Recorder::new(ctx.client.clone(), reporter.clone());
            if let Err(e) = recorder.publish(event, &self.object_ref(&())).await {
                warn!(error = %crate::error::chain(&e), reason = %event.reason, "failed to publish event");
            }
        }
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
                    ctx.metrics.transition_to_registry.observe(seconds);
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
        if self.patch_status(ctx, &outcome).await?.is_transition() {
            warn!(error = %error, "invalid spec; keeping what the last valid spec published");
        }
        let last = ctx
            .published
            .lock()
            .expect("lock")
            .get(&self.uid().unwrap_or_default())
            .cloned();
        if let Some((plan, ttl)) = last {
            // The last valid spec, evaluated against the pods as they are now: readiness is
            // still followed (an unready pod leaves) while the spec is being fixed.
            let selected = self.select(ctx, &plan);
            let publication = Publication {
                layout: plan.layout(),
                owner: self.owner()?,
                ttl,
                endpoints: Arc::new(desired(&plan, &selected).endpoints),
                tags: plan.tags.clone(),
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
        if let Err(e) = self.patch_status(ctx, &outcome).await {
            warn!(error = %crate::error::chain(&e), "failed to report the registry failure in status");
        }
        Err(error.into())
    }

    /// Deletes this service's keys and ownership record; the finalizer is released after.
    pub(super) async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        let owner = self.owner()?;
        let mut targets: Vec<String> = self
            .status
            .as_ref()
            .and_then(|s| s.target.clone())
            .into_iter()
            .collect();
        // What the spec names now, and what this process last published (the spec may have
        // moved to another backend or target since).
        let published = ctx
            .published
            .lock()
            .expect("lock")
            .get(&owner.uid)
            .map(|(plan, _)| plan.target.clone());
        let planned = Plan::new(self, &ctx.policy).ok().map(|plan| plan.target);
        for target in [planned, published].into_iter().flatten() {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        for target in targets {
            let deleted = ctx.backend.release(&target, &owner).await?;
            info!(target, deleted, "deregistered service");
            ctx.released(&target);
        }
        ctx.stop_waiting(&ObjectRef::from_obj(self));
        ctx.selections.record(ObjectRef::from_obj(self), []);
        ctx.slice_selections.record(ObjectRef::from_obj(self), []);
        ctx.published.lock().expect("lock").remove(&owner.uid);
        ctx.transitions
            .lock()
            .expect("lock")
            .remove(&format!("{}/{}", owner.namespace, owner.name));
        ctx.last_changes.lock().expect("lock").remove(&owner.uid);
        ctx.announced.lock().expect("lock").remove(&owner.uid);
        ctx.metrics.forget_service(&owner.namespace, &owner.name);
        Ok(Action::await_change())
    }

    /// Writes status with server-side apply, only when it changed. A change of counts only (the
    /// Ready condition's status and reason unchanged) within [`STATUS_INTERVAL`] of this
    /// service's last write is deferred: under churn, a status write per readiness flip would
    /// load the API server and hold up the next reconcile of the service.
    async fn patch_status(&self, ctx: &Context, outcome: &Outcome<'_>) -> Result<StatusWrite> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let next = next_status(
            self.status.as_ref(),
            self.metadata.generation,
            outcome,
            &now,
        );
        // A replica deposed mid-reconcile leaves status to the new leader.
        if self.status.as_ref() == Some(&next) || !ctx.backend.may_write() {
            return Ok(StatusWrite::Unchanged);
        }
        let uid = self.uid().unwrap_or_default();
        let events = transition_events(self.status.as_ref(), &next);
        let counts_only = matches!(outcome, Outcome::Synced { .. }) && events.is_empty();
        if counts_only
            && ctx
                .status_writes
                .lock()
                .expect("lock")
                .get(&uid)
                .is_some_and(|at| at.elapsed() < STATUS_INTERVAL)
        {
            return Ok(StatusWrite::Deferred);
        }
        let api: Api<GrpcService> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "grpc-registrar.io/v1alpha1",
            "kind": "GrpcService",
            "status": next,
        });
        api.patch_status(
            &self.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(Error::kube("patch status"))?;
        ctx.status_writes
            .lock()
            .expect("lock")
            .insert(uid, std::time::Instant::now());
        self.publish(ctx, &events).await;
        Ok(StatusWrite::Written {
            transition: !events.is_empty(),
        })
    }
}
