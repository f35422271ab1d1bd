//! The Consul half of spec validation: the target is a Consul service name under the tenancy
//! rule of [`super::name`], with the spec's `consul.tags`; the etcd-only settings are refused.

use std::any::Any;
use std::sync::Arc;

use kube::ResourceExt;

use super::name;
use crate::crd::GrpcService;
use crate::desired::{LogicalEndpoint, Plan, Policy, SpecError};
use crate::registry::etcd::Layout;
use crate::registry::{Placement, Planner, Rendering};

/// Plans specs as Consul services.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsulPlanner;

/// Where a Consul controller publishes one service: the Consul service name, and the tags of
/// every instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulService {
    /// The Consul service name.
    pub service: String,
    /// Tags for every instance.
    pub tags: Vec<String>,
    /// Which endpoints collide and which are too large is decided as the format's default key
    /// layout decides it under the service name: the rule Consul services have always had
    /// (two endpoints on one address are one instance's worth: the first is registered, the
    /// other reported).
    checks: Layout,
}

impl ConsulService {
    /// Publishes as `service`, each instance with `tags`.
    #[must_use]
    pub fn new(service: &str, tags: Vec<String>) -> Self {
        Self::with_format(service, tags, tonic_etcd_resolver::ValueFormat::default())
    }

    fn with_format(
        service: &str,
        tags: Vec<String>,
        format: tonic_etcd_resolver::ValueFormat,
    ) -> Self {
        Self {
            service: service.to_owned(),
            tags,
            checks: Layout::default_for(service, format),
        }
    }
}

impl Placement for ConsulService {
    fn target(&self) -> &str {
        &self.service
    }

    fn render(&self, endpoints: Vec<LogicalEndpoint>) -> Rendering {
        self.checks.lay_out(endpoints)
    }

    fn entry(&self, endpoint: &LogicalEndpoint) -> Result<(String, Vec<u8>), SpecError> {
        self.checks.entry(endpoint)
    }

    fn key(&self, endpoint: &LogicalEndpoint) -> String {
        self.checks.key(endpoint)
    }

    fn same_as(&self, other: &dyn Placement) -> bool {
        other.as_any().downcast_ref::<Self>() == Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Planner for ConsulPlanner {
    /// The Consul service name and tags a spec asks for: `consul.service`, or the
    /// GrpcService's name, under the namespace rule of [`super::name`] (unless `keep` names a
    /// pre-rule name the service still holds). Checked as the schema does, so that an object
    /// stored before the rule still gets a clear error.
    fn place(
        &self,
        svc: &GrpcService,
        plan: &Plan,
        policy: &Policy,
        keep: Option<String>,
    ) -> Result<Arc<dyn Placement>, SpecError> {
        let spec = &svc.spec;
        let consul = spec.consul.clone().unwrap_or_default();
        if spec.target.is_some() || spec.key_template.is_some() || spec.ttl_seconds.is_some() {
            return Err(SpecError::Backend(
                "target, keyTemplate and ttlSeconds are etcd settings: with backend Consul, name the service in consul.service",
            ));
        }
        let service = match keep {
            Some(kept) => kept,
            None => name::resolve(
                consul.service.as_deref(),
                &plan.namespace,
                &plan.name,
                &policy.custom_targets,
                &policy.registrar_root,
            )?,
        };
        Ok(Arc::new(ConsulService::with_format(
            &service,
            consul.tags,
            spec.format,
        )))
    }

    /// A Consul name from before namespace-qualified names.
    fn pre_rule_target(&self, svc: &GrpcService, policy: &Policy) -> Option<String> {
        let consul = svc.spec.consul.as_ref();
        let old = name::pre_rule(
            consul.and_then(|c| c.service.as_deref()),
            &svc.name_any(),
            &policy.registrar_root,
        )?;
        let now = self
            .plan(svc, policy)
            .ok()
            .map(|planned| planned.target().to_owned());
        (now.as_deref() != Some(old.as_str())).then_some(old)
    }
}

#[cfg(test)]
mod tests;
