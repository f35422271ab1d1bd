//! The etcd half of spec validation: a target is a key prefix under the namespace's own
//! (the tenancy rule of DESIGN §4 for paths), and its keys and values follow the spec's
//! `keyTemplate` and `format` ([`Layout`]).

use std::sync::Arc;

use super::layout::Layout;
use super::template::{self, KeyTemplate};
use crate::crd::GrpcService;
use crate::desired::{Plan, Policy, SpecError};
use crate::registry::{Placement, Planner};

/// Plans specs as etcd key layouts.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdPlanner;

impl Planner for EtcdPlanner {
    /// The tenancy rule for paths never changed, so a target to keep is checked like any other
    /// (a caller keeping a recorded target compares it with the one planned).
    fn place(
        &self,
        svc: &GrpcService,
        plan: &Plan,
        policy: &Policy,
        _keep: Option<String>,
    ) -> Result<Arc<dyn Placement>, SpecError> {
        Ok(Arc::new(layout(svc, plan, policy)?))
    }
}

/// The key layout a spec asks for: its target (checked against the tenancy rules), its
/// `keyTemplate` (or the format's default) and its value format.
///
/// # Errors
/// [`SpecError`] for a target the namespace may not use, or a template that does not parse.
pub fn layout(svc: &GrpcService, plan: &Plan, policy: &Policy) -> Result<Layout, SpecError> {
    let spec = &svc.spec;
    let target = resolve_target(spec.target.as_deref(), &plan.namespace, &plan.name, policy)?;
    let template = KeyTemplate::parse(
        spec.key_template
            .as_deref()
            .unwrap_or_else(|| template::default_for(spec.format)),
    )?;
    Ok(Layout {
        target,
        format: spec.format,
        template,
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
    })
}

/// The default target of a service, `<key-prefix>/<namespace>/<name>`.
#[must_use]
pub fn default_target(key_prefix: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", key_prefix.trim_end_matches('/'))
}

/// The target a spec asks for, checked against the tenancy rules (DESIGN §4):
///
/// - normalised: `/`-separated segments of letters, digits, `.`, `_` and `-`, none empty, `.`
///   or `..`, no trailing `/` (a leading `/` is kept: it is part of the key clients watch);
/// - never the registrar root, inside it, or above it;
/// - never another namespace's default prefix, inside it, or above every namespace's (the key
///   prefix itself or a parent of it), whatever the custom-target policy: a sync of a target
///   deletes what it does not publish under it, so a target above another's would delete its
///   keys, and one inside another namespace's prefix would take its clients' traffic;
/// - inside the namespace's own prefix (`<key-prefix>/<namespace>/…`, strictly below it), or,
///   in namespaces the policy allows, anywhere else.
fn resolve_target(
    requested: Option<&str>,
    namespace: &str,
    name: &str,
    policy: &Policy,
) -> Result<String, SpecError> {
    let Some(target) = requested else {
        return Ok(default_target(&policy.key_prefix, namespace, name));
    };
    let path = target.strip_prefix('/').unwrap_or(target);
    let malformed = path.is_empty()
        || path.split('/').any(|s| {
            s.is_empty()
                || s == "."
                || s == ".."
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if malformed {
        return Err(SpecError::Target(
            target.into(),
            "malformed: empty, '.' or '..' segments are not allowed",
        ));
    }
    let nests = |prefix: &str| {
        let prefix = prefix.trim_matches('/');
        path == prefix
            || path.starts_with(&format!("{prefix}/"))
            || prefix.starts_with(&format!("{path}/"))
    };
    if nests(&policy.registrar_root) {
        return Err(SpecError::Target(
            target.into(),
            "inside or above the controller's own records",
        ));
    }
    let key_prefix = policy.key_prefix.trim_matches('/');
    let own = format!("{key_prefix}/{namespace}");
    if path.starts_with(&format!("{own}/")) {
        return Ok(target.to_owned());
    }
    if nests(key_prefix) {
        // The key prefix itself, a parent of it, or another namespace's default prefix (or its
        // own, without a name): no policy allows these.
        let allowed = if policy.custom_targets.allows(namespace) {
            format!("{own}/, or outside {key_prefix}/")
        } else {
            format!("{own}/")
        };
        return Err(SpecError::TargetNotAllowed {
            target: target.into(),
            namespace: namespace.into(),
            allowed,
        });
    }
    if policy.custom_targets.allows(namespace) {
        Ok(target.to_owned())
    } else {
        Err(SpecError::TargetNotAllowed {
            target: target.into(),
            namespace: namespace.into(),
            allowed: format!("{own}/"),
        })
    }
}

#[cfg(test)]
mod tests;
