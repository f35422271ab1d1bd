//! What a reconcile does for one `GrpcService`: apply (publish) and cleanup (deregister), with
//! the outcome written to status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

use super::evaluation::{self, Evaluation, Invalid};
use super::publication;
use super::report::Synced;
use super::status::{LastChange, Outcome};
use super::{CONFLICT_RECHECK, Context};
use crate::crd::GrpcService;
use crate::desired::{Desired, Plan, SpecError};
use crate::registry::{self, Claim, Owner, Planned, Publication};
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
        let evaluation = match self.evaluate(ctx, &owner, &plan) {
            Ok(evaluation) => evaluation,
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
        self.publish(ctx, &owner, &plan, &evaluation, None).await
    }

    /// The candidates `plan` selects and the desired state they make. Two endpoints on one key
    /// are a property of the endpoints: one is registered, the other reported, and the rest
    /// keep following readiness. A template that maps every endpoint to one key, or an entry
    /// too large for any write, is the spec's fault: found here, before anything is released or
    /// claimed (with the counts, for status). Each key and value is rendered once, here, and
    /// only where a candidate changed since this service's last evaluation (see
    /// [`evaluation`]).
    fn evaluate(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
    ) -> Result<Evaluation, Invalid> {
        let selected = self.select(ctx, &plan.plan);
        let last = ctx.evaluations.take(&owner.uid, plan);
        let evaluation = evaluation::reevaluate(plan, selected, last)?;
        ctx.evaluations.keep(&owner.uid, &evaluation);
        Ok(evaluation)
    }

    /// Publishes `evaluation` under `plan` for `owner`: frees a previously published other
    /// target, claims this one, records the spec as the last valid publication (before the
    /// sync, so that the record never lags the keys), and syncs. With `invalid`, `self` carries
    /// the last valid spec of a service whose current spec is invalid: its status already says
    /// so, and only the registry is written.
    async fn publish(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        evaluation: &Evaluation,
        invalid: Option<&SpecError>,
    ) -> Result<Action> {
        let (selected, want) = (&evaluation.selected[..], evaluation.want.as_ref());
        if let Err(e) = self.free_previous(ctx, owner, plan).await {
            return self.failed(ctx, plan, want, e, invalid).await;
        }
        let first = match invalid {
            None => self.publish_first(ctx, owner, plan, evaluation).await,
            Some(_) => Ok(None),
        };
        let report = match first {
            Ok(Some(report)) => report,
            Ok(None) => {
                if let Some(stop) = self.take(ctx, owner, plan, selected, want, invalid).await? {
                    return Ok(stop);
                }
                match self.write(ctx, owner, plan, evaluation, invalid).await? {
                    Ok(report) => report,
                    Err(stop) => return Ok(stop),
                }
            }
            Err(e) => return self.failed(ctx, plan, want, e, invalid).await,
        };
        if report.puts + report.deletes > 0 {
            ctx.states.with(&owner.uid, |state| {
                state.last_change = Some(LastChange {
                    revision: report.revision,
                    at: Time(k8s_openapi::jiff::Timestamp::now()),
                });
            });
            log_sync(&report);
        }
        let synced = Synced {
            owner,
            plan,
            selected,
            want,
            report: &report,
        };
        Ok(match invalid {
            Some(error) => self.report_kept(ctx, &synced, error),
            None => self.report_synced(ctx, &synced),
        })
    }

    /// Frees the targets this service published before under another name than `plan`'s:
    /// what status names and what the registry recorded last (a leader acting on a stale view
    /// may have published under a target status never named), so that none holds stale
    /// endpoints.
    async fn free_previous(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
    ) -> Result<(), registry::Error> {
        let recorded = ctx
            .published
            .recorded(ctx.backend.as_ref(), ctx.term(), &owner.uid)
            .await?
            .map(|record| record.target);
        let mut old_targets: Vec<String> = self.published_target(ctx).into_iter().collect();
        old_targets.extend(recorded.filter(|t| !old_targets.contains(t)));
        for old in old_targets.iter().filter(|t| **t != plan.target()) {
            let deleted = ctx.backend.release(old, owner).await?;
            info!(old_target = old, deleted, "released previous target");
            ctx.published.released(ctx.term(), &owner.uid);
            ctx.waiting.released(old);
        }
        Ok(())
    }

    /// A valid spec's service that the registry holds nothing of yet (no publication record,
    /// nobody under its target), published in one request: the claim, the record and the
    /// entries. `None` when anything is in the way: it is then claimed and synced as usual.
    async fn publish_first(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        evaluation: &Evaluation,
    ) -> Result<Option<registry::SyncReport>, registry::Error> {
        let (backend, term) = (ctx.backend.as_ref(), ctx.term());
        // A service in conflict rechecks its claim alone (its target is someone else's until
        // released, which wakes it no longer waiting).
        let waiting = ctx.waiting.is_waiting(&ObjectRef::from_obj(self));
        if waiting || !backend.reachable() || ctx.published.holds(backend, term, &owner.uid).await?
        {
            return Ok(None);
        }
        let publication = self.publication(ctx, owner, plan, evaluation);
        let record = publication::Record::of(self, plan.target());
        let published = ctx
            .published
            .publish_first(backend, term, &publication, &record)
            .await?;
        if published.is_some() {
            // It may have waited for the target's release after a conflict.
            ctx.waiting.stop_waiting(&ObjectRef::from_obj(self));
        }
        Ok(published)
    }

    /// What `evaluation` publishes under `plan` for `owner`.
    fn publication(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        evaluation: &Evaluation,
    ) -> Publication {
        Publication {
            placement: plan.placement.clone(),
            owner: owner.clone(),
            ttl: self.ttl(ctx),
            endpoints: evaluation.endpoints.clone(),
            entries: evaluation.entries.clone(),
        }
    }

    /// Claims `plan`'s target; `Some` with what to return when the reconcile stops here (a
    /// conflict, or a registry failure).
    async fn take(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        selected: &[Arc<Candidate>],
        want: &Desired,
        invalid: Option<&SpecError>,
    ) -> Result<Option<Action>> {
        if !ctx.backend.reachable() {
            let error = registry::Error::Unreachable {
                backend: ctx.backend.name(),
            };
            return self.failed(ctx, plan, want, error, invalid).await.map(Some);
        }
        // Registered before the claim, so that a release landing between a refused claim and
        // the registration still wakes this service.
        ctx.waiting
            .wait_for_release(plan.target(), ObjectRef::from_obj(self));
        match self.claim(ctx, plan.target(), owner).await? {
            Ok(Claim::Owned) => {
                ctx.waiting.stop_waiting(&ObjectRef::from_obj(self));
                // Status names the target published, so that the next spec releases it.
                if let Some(error) = invalid
                    && self.published_target(ctx).as_deref() != Some(plan.target())
                {
                    let outcome = Outcome::InvalidSpec {
                        message: error.to_string(),
                        target: Some(plan.target()),
                        desired: None,
                        kept: None,
                    };
                    self.submit_status(ctx, &outcome);
                }
                Ok(None)
            }
            Ok(Claim::Conflict {
                owner: other,
                target: held,
                ..
            }) => {
                ctx.waiting
                    .wait_for_release(&held, ObjectRef::from_obj(self));
                if invalid.is_none() {
                    self.conflict(ctx, selected, plan.target(), &other, &held, want);
                }
                Ok(Some(Action::requeue(CONFLICT_RECHECK)))
            }
            Err(e) => {
                ctx.waiting.stop_waiting(&ObjectRef::from_obj(self));
                self.failed(ctx, plan, want, e, invalid).await.map(Some)
            }
        }
    }

    /// Records the spec as the last valid publication, then syncs `want` as `entries`; `Err`
    /// with what to return when the reconcile stops here.
    async fn write(
        &self,
        ctx: &Context,
        owner: &Owner,
        plan: &Planned,
        evaluation: &Evaluation,
        invalid: Option<&SpecError>,
    ) -> Result<Result<registry::SyncReport, Action>> {
        let want = evaluation.want.as_ref();
        let publication = self.publication(ctx, owner, plan, evaluation);
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
        let stop = match (synced, invalid) {
            (Ok(report), _) => return Ok(Ok(report)),
            // The last valid spec cannot render the endpoints as they are now either: the keys
            // stay.
            (Err(registry::Error::Spec(_)), Some(_)) => Action::await_change(),
            // The backend refuses the spec (e.g. a name or metadata against its rules): it is
            // not valid after all, so the previous record is the last valid one again.
            (Err(registry::Error::Spec(e)), None) => {
                ctx.published.unsee(term, &owner.uid);
                if let Some(previous) = previous
                    && let Err(restore) = ctx.published.keep(backend, term, owner, &previous).await
                {
                    warn!(error = %restore, "failed to restore the record of the last valid spec");
                }
                self.invalid_spec_for(ctx, &e, Some(plan.target()), Some(want))
                    .await?
            }
            (Err(e), invalid) => self.failed(ctx, plan, want, e, invalid).await?,
        };
        Ok(Err(stop))
    }

    /// A registry failure: reported in status for a valid spec (an invalid one's status says
    /// so already), and handed to the retry policy.
    async fn failed(
        &self,
        ctx: &Context,
        plan: &Planned,
        want: &Desired,
        error: registry::Error,
        invalid: Option<&SpecError>,
    ) -> Result<Action> {
        match invalid {
            None => {
                self.backend_failed(ctx, plan.target(), Some(want), error)
                    .await
            }
            Some(_) => Err(error.into()),
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

    /// The candidates `plan`'s source yields now, recording which objects were read so that
    /// their later events (even once they no longer match) wake this service.
    fn select(&self, ctx: &Context, plan: &Plan) -> Vec<Arc<Candidate>> {
        ctx.sources
            .select(&ObjectRef::from_obj(self), &plan.namespace, &plan.selection)
    }

    /// Claims the target; takes it over when the recorded owner no longer exists. The inner
    /// result is the backend's; the outer one fails when the owner could not be looked up.
    async fn claim(
        &self,
        ctx: &Context,
        target: &str,
        owner: &Owner,
    ) -> Result<Result<Claim, registry::Error>> {
        let record = || publication::Record::of(self, target);
        let claimed = ctx
            .published
            .claim(ctx.backend.as_ref(), ctx.term(), target, owner, record)
            .await;
        let claim = match claimed {
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
        // The last valid spec (recorded in the registry, so it survives a restart or a
        // failover, or seen since), published against the pods as they are now: readiness is
        // still followed (an unready pod leaves) while the spec is being fixed.
        let owner = self.owner()?;
        let last = ctx
            .published
            .last(ctx.backend.as_ref(), ctx.term(), &owner.uid)
            .await;
        let kept = match &last {
            Ok(Some(record)) => record
                .plan(self, &ctx.policy, ctx.backend.planner())
                .map(|plan| (record.service(self), plan)),
            _ => None,
        };
        // While a publication is kept, status names its target and counts (its sync reports
        // them), not the invalid spec's: the two would alternate, reconcile after reconcile.
        let outcome = Outcome::InvalidSpec {
            message: error.to_string(),
            target: target.filter(|_| kept.is_none()),
            desired: counts.filter(|_| kept.is_none()),
            kept: None,
        };
        // Logged when it becomes the condition, not on every re-reconcile of the same spec.
        if self.submit_status(ctx, &outcome).is_transition() {
            // Counted once per turn into InvalidSpec, like a failed reconcile: the spec, not
            // the registry, failed.
            ctx.metrics.reconcile_failed("invalid_spec");
            warn!(error = %error, "invalid spec; keeping what the last valid spec published");
        }
        last?;
        let Some((old, plan)) = kept else {
            return Ok(Action::await_change());
        };
        match old.evaluate(ctx, &owner, &plan) {
            // Boxed: a valid spec's publish reaches here when the backend refuses it as a spec.
            Ok(evaluation) => {
                Box::pin(old.publish(ctx, &owner, &plan, &evaluation, Some(error))).await
            }
            // The old spec cannot render the pods as they are now either: leave the keys.
            Err(_) => Ok(Action::await_change()),
        }
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
            ctx.waiting.released(&target);
        }
        ctx.forget_service(&owner.uid, Some(&ObjectRef::from_obj(self)));
        ctx.metrics.forget_service(&owner.namespace, &owner.name);
        Ok(Action::await_change())
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
            lease_id = %registry::lease_text(lease),
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
