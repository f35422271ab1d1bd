//! The decision logic, pure: a validated spec and its candidates in, logical endpoints out.
//!
//! Nothing here does I/O, so every rule of DESIGN §1–§2 is unit tested below. What an endpoint
//! looks like on the wire (keys, value bytes) is [`layout`]'s business, used by the etcd backend.

pub mod consul_name;
pub mod layout;
mod template;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tonic_etcd_resolver::format::{self, ValueFormat};

use crate::crd::GrpcService;
use crate::source::{Candidate, Selection, SelectionError};
pub use layout::{Collision, Layout};
pub use template::KeyTemplate;

/// Which namespaces may publish under a target outside their own default prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CustomTargets {
    /// Only the default prefix `<key-prefix>/<namespace>/...` (the default).
    #[default]
    None,
    /// These namespaces may use any target.
    Namespaces(Vec<String>),
    /// Every namespace may use any target.
    All,
}

impl CustomTargets {
    /// Parses the flag value: empty for none, `*` for all, or a comma-separated list.
    #[must_use]
    pub fn parse(flag: &str) -> Self {
        let names: Vec<String> = flag
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if names.iter().any(|n| n == "*") {
            Self::All
        } else if names.is_empty() {
            Self::None
        } else {
            Self::Namespaces(names)
        }
    }

    fn allows(&self, namespace: &str) -> bool {
        match self {
            Self::None => false,
            Self::Namespaces(names) => names.iter().any(|n| n == namespace),
            Self::All => true,
        }
    }
}

/// Controller-wide rules that a spec is checked against.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Prefix of default targets, `services` gives `services/<namespace>/<name>`.
    pub key_prefix: String,
    /// Where the controller keeps its own records (ownership); no target may live under it.
    pub registrar_root: String,
    /// Namespaces allowed targets outside their own prefix.
    pub custom_targets: CustomTargets,
    /// This cluster's name when several publish into one registry; endpoint metadata carries
    /// it as `cluster`.
    pub cluster: Option<String>,
    /// The backend this controller publishes into: the target is an etcd prefix, or a Consul
    /// service name.
    pub backend: crate::crd::Backend,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            key_prefix: "services".into(),
            registrar_root: "grpc-registrar".into(),
            custom_targets: CustomTargets::None,
            cluster: None,
            backend: crate::crd::Backend::Etcd,
        }
    }
}

/// A spec that cannot be applied. Reported as the `InvalidSpec` condition, never retried hot.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The label selector does not parse.
    #[error("failed to parse selector: {0}")]
    Selector(String),
    /// Metadata the backend would refuse (Consul's rules for keys and values), naming what.
    #[error("failed to publish metadata {what}: {reason}")]
    Metadata {
        /// The key, or the count, at fault.
        what: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A setting of another backend than the one the spec names.
    #[error("failed to apply the backend's settings: {0}")]
    Backend(&'static str),
    /// Not exactly one source, or a port missing or misplaced for the source.
    #[error("failed to read the source: {0}")]
    Source(&'static str),
    /// A numeric port outside 1..=65535.
    #[error("failed to resolve port {0}: not in 1..=65535")]
    PortRange(i32),
    /// A port name that is not an IANA service name (it has no letter).
    #[error(
        "failed to resolve port {0:?}: a port name needs a letter; use a number for a numeric port"
    )]
    PortName(String),
    /// A custom target outside the namespace's prefix, in a namespace not allowed one.
    #[error(
        "failed to authorize target {target:?}: namespace {namespace:?} may only publish under {allowed:?} (targets outside it need the namespace listed in --custom-target-namespaces, and are never in or above another namespace's prefix)"
    )]
    TargetNotAllowed {
        /// The requested target.
        target: String,
        /// The GrpcService's namespace.
        namespace: String,
        /// The prefix it may use.
        allowed: String,
    },
    /// A Consul service name the namespace may not publish (see [`consul_name`]).
    #[error("failed to authorize consul service {service:?} for namespace {namespace:?}: {reason}")]
    ConsulName {
        /// The name asked for, or the one it would become.
        service: String,
        /// The GrpcService's namespace.
        namespace: String,
        /// The rule it breaks, and what to do.
        reason: String,
    },
    /// The target is malformed or inside the controller's own records.
    #[error("failed to validate target {0:?}: {1}")]
    Target(String, &'static str),
    /// The key template does not parse.
    #[error("failed to parse keyTemplate: {0}")]
    Template(String),
    /// An entry too large for any registry write.
    #[error(
        "failed to render key {key:?}: {bytes} bytes, over the {max} a registry write can carry; shrink metadata",
        max = layout::MAX_ENTRY_BYTES
    )]
    TooLarge {
        /// The key.
        key: String,
        /// Its key and value bytes.
        bytes: usize,
    },
    /// Two endpoints render to the same key, so one would silently hide the other.
    #[error("failed to render keys: pods {first:?} and {second:?} both map to key {key:?}")]
    KeyCollision {
        /// The shared key.
        key: String,
        /// One pod.
        first: String,
        /// The other.
        second: String,
    },
}

/// A validated `GrpcService` spec, ready to be evaluated against pods.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The service's namespace; only pods in it are selected.
    pub namespace: String,
    /// The service's name, for `{name}` in templates and for logs.
    pub name: String,
    /// Where keys are published.
    pub target: String,
    /// How values are encoded.
    pub format: ValueFormat,
    /// Compiled `keyTemplate`.
    pub template: KeyTemplate,
    /// The port, resolved per candidate.
    pub port: IntOrString,
    /// Which source the candidates come from, and what is asked of it.
    pub selection: Selection,
    /// Static metadata merged into every endpoint.
    pub static_metadata: BTreeMap<String, String>,
    /// Candidate labels copied into metadata.
    pub metadata_labels: Vec<String>,
    /// Relaxes the Ready rule.
    pub publish_not_ready: bool,
    /// Lease TTL override.
    pub ttl_seconds: Option<i64>,
    /// The controller's cluster name, for metadata.
    pub cluster: Option<String>,
    /// Instance tags, where the backend has tags (Consul).
    pub tags: Vec<String>,
    /// `spec.weight`, written as `metadata.weight` unless a pod's annotation overrides it.
    pub weight: Option<u32>,
}

impl Plan {
    /// Validates a spec against the controller's policy.
    ///
    /// # Errors
    /// [`SpecError`] for anything the API server's schema could not catch.
    pub fn new(svc: &GrpcService, policy: &Policy) -> Result<Self, SpecError> {
        Self::build(svc, policy, None)
    }

    /// The target this service was published under before the current tenancy rule, when the
    /// rule now gives it another (a Consul name from before namespace-qualified names): a
    /// service whose ownership record still holds it keeps publishing there (see
    /// [`Plan::keeping`]) until its spec names another.
    #[must_use]
    pub fn pre_rule_target(svc: &GrpcService, policy: &Policy) -> Option<String> {
        if policy.backend != crate::crd::Backend::Consul {
            return None;
        }
        let consul = svc.spec.consul.as_ref();
        let old = consul_name::pre_rule(
            consul.and_then(|c| c.service.as_deref()),
            &svc.name_any(),
            &policy.registrar_root,
        )?;
        let now = Self::new(svc, policy).ok().map(|plan| plan.target);
        (now.as_deref() != Some(old.as_str())).then_some(old)
    }

    /// As [`Plan::new`], publishing under `target` (from [`Plan::pre_rule_target`]) instead of
    /// the one the tenancy rule gives; every other rule still applies.
    ///
    /// # Errors
    /// As [`Plan::new`], but for the name rule.
    pub fn keeping(svc: &GrpcService, policy: &Policy, target: String) -> Result<Self, SpecError> {
        Self::build(svc, policy, Some(target))
    }

    fn build(
        svc: &GrpcService,
        policy: &Policy,
        keep_target: Option<String>,
    ) -> Result<Self, SpecError> {
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let spec = &svc.spec;
        let (selection, port) = crate::source::selection(spec).map_err(|e| match e {
            SelectionError::Selector(message) => SpecError::Selector(message),
            SelectionError::Source(message) => SpecError::Source(message),
        })?;
        let port = &port;
        if let IntOrString::Int(port) = *port
            && !(1..=65535).contains(&port)
        {
            return Err(SpecError::PortRange(port));
        }
        if let IntOrString::String(name) = port
            && !name.bytes().any(|b| b.is_ascii_lowercase())
        {
            return Err(SpecError::PortName(name.clone()));
        }
        let (target, tags) = match policy.backend {
            crate::crd::Backend::Etcd => (
                resolve_target(spec.target.as_deref(), &namespace, &name, policy)?,
                Vec::new(),
            ),
            crate::crd::Backend::Consul => {
                consul_service(spec, &namespace, &name, policy, keep_target)?
            }
        };
        let template = KeyTemplate::parse(
            spec.key_template
                .as_deref()
                .unwrap_or_else(|| template::default_for(spec.format)),
        )?;
        Ok(Self {
            namespace,
            name,
            target,
            format: spec.format,
            template,
            port: port.clone(),
            selection,
            static_metadata: spec.metadata.clone(),
            metadata_labels: spec.metadata_from_labels.clone(),
            publish_not_ready: spec.publish_not_ready_addresses,
            ttl_seconds: spec.ttl_seconds,
            cluster: policy.cluster.clone(),
            tags,
            weight: spec.weight,
        })
    }

    /// How this service's endpoints are written as etcd keys and values.
    #[must_use]
    pub fn layout(&self) -> Layout {
        Layout::new(self)
    }
}

/// The Consul service name and tags a spec asks for: `consul.service`, or the GrpcService's
/// name, under the namespace rule of [`consul_name`] (unless `keep` names a pre-rule name the
/// service still holds). Checked as the schema does, so that an object stored before the rule
/// still gets a clear error.
fn consul_service(
    spec: &crate::crd::GrpcServiceSpec,
    namespace: &str,
    name: &str,
    policy: &Policy,
    keep: Option<String>,
) -> Result<(String, Vec<String>), SpecError> {
    let consul = spec.consul.clone().unwrap_or_default();
    if spec.target.is_some() || spec.key_template.is_some() || spec.ttl_seconds.is_some() {
        return Err(SpecError::Backend(
            "target, keyTemplate and ttlSeconds are etcd settings: with backend Consul, name the service in consul.service",
        ));
    }
    let service = match keep {
        Some(kept) => kept,
        None => consul_name::resolve(
            consul.service.as_deref(),
            namespace,
            name,
            &policy.custom_targets,
            &policy.registrar_root,
        )?,
    };
    Ok((service, consul.tags))
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

/// Why a selected candidate is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not serving: a pod whose phase is not Running (an endpoint whose `serving` is false).
    NotRunning,
    /// The readiness signal is off (a pod's Ready condition is not True).
    NotReady,
    /// No IP yet, or an unparsable one.
    NoPodIp,
    /// Being deleted: it leaves the registry before the process exits.
    Terminating,
    /// No port has the requested name (or, where every port is listed, number).
    PortNotFound,
    /// A DNS name, not an IP (an `FQDN` EndpointSlice): registries hold addresses.
    Fqdn,
}

/// One endpoint to publish, before any wire format: where it is and what describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalEndpoint {
    /// The candidate's id (the pod name), unique within the service.
    pub id: String,
    /// The address.
    pub ip: IpAddr,
    /// The resolved port.
    pub port: u16,
    /// The node, when known (for `{node}` in key templates).
    pub node: Option<String>,
    /// Metadata: the spec's static metadata, copied labels, and the reserved `pod`,
    /// `namespace`, `node` and `zone`.
    pub metadata: BTreeMap<String, String>,
}

impl LogicalEndpoint {
    /// `ip:port`, IPv6 bracketed.
    #[must_use]
    pub fn addr(&self) -> String {
        format::socket_addr(self.ip, self.port)
    }
}

/// What a service should publish, and what was counted on the way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// The registrable endpoints, in candidate id order.
    pub endpoints: Vec<LogicalEndpoint>,
    /// Candidates given in (already selected).
    pub selected: usize,
    /// Selected candidates whose readiness signal is on.
    pub ready: usize,
    /// Selected candidates left out, by id.
    pub skipped: BTreeMap<String, Skip>,
    /// The Service whose endpoints these are (`serviceRef`); `None` for selected pods.
    pub service: Option<String>,
    /// The named ports the candidates left out for `PortNotFound` do offer (a few), so that a
    /// message can say what would have matched.
    pub ports_offered: std::collections::BTreeSet<(String, u16)>,
    /// Registered candidates whose weight annotation is not a weight (1 to 10000), by id: they
    /// are published with the service's weight, and status says so.
    pub invalid_weights: std::collections::BTreeSet<String>,
    /// Registrable candidates left out because an earlier one renders to the same key (two
    /// pods reporting one IP): the key is registered once, and status names them.
    pub collisions: Vec<Collision>,
    /// A numeric spec port that no container of some registered pods declares, and how many:
    /// they are registered (a pod may serve a port it does not list, as a Service's targetPort
    /// allows), but a typo in the port looks the same, so status hints at it.
    pub undeclared_port: Option<(u16, usize)>,
}

/// How many offered ports a `PortNotFound` message lists at most.
const PORTS_OFFERED: usize = 6;

/// Checks the registrable rules of DESIGN §1 in order and returns the candidate's IP and port.
///
/// # Errors
/// The first rule the candidate fails.
pub fn registrable(plan: &Plan, candidate: &Candidate) -> Result<(IpAddr, u16), Skip> {
    if candidate.terminating {
        return Err(Skip::Terminating);
    }
    if !candidate.serving {
        return Err(Skip::NotRunning);
    }
    if !plan.publish_not_ready && !candidate.ready {
        return Err(Skip::NotReady);
    }
    if candidate.fqdn.is_some() {
        return Err(Skip::Fqdn);
    }
    let ip = candidate.ip.ok_or(Skip::NoPodIp)?;
    let port = candidate.port(&plan.port).ok_or(Skip::PortNotFound)?;
    Ok((ip, port))
}

pub use crate::crd::WEIGHT_ANNOTATION;

/// The weights a client may be given: 1 to 10000 (0 would take an endpoint out of rotation,
/// which readiness does).
pub const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// A candidate's weight: its annotation when that is a weight, else the service's; `Err` with
/// the service's when the annotation is not a weight.
fn weight(plan: &Plan, candidate: &Candidate) -> Result<Option<u32>, Option<u32>> {
    match candidate.weight.as_deref().map(str::trim) {
        None => Ok(plan.weight),
        Some(raw) => match raw.parse::<u32>() {
            Ok(w) if WEIGHTS.contains(&w) => Ok(Some(w)),
            _ => Err(plan.weight),
        },
    }
}

fn metadata(plan: &Plan, candidate: &Candidate, weight: Option<u32>) -> BTreeMap<String, String> {
    let mut md = plan.static_metadata.clone();
    if let Some(weight) = weight {
        md.insert("weight".into(), weight.to_string());
    }
    for label in &plan.metadata_labels {
        if let Some(value) = candidate.labels.get(label) {
            md.insert(label.clone(), value.clone());
        }
    }
    if let Some(pod) = &candidate.pod {
        md.insert("pod".into(), pod.clone());
    }
    md.insert("namespace".into(), plan.namespace.clone());
    if let Some(cluster) = &plan.cluster {
        md.insert("cluster".into(), cluster.clone());
    }
    if let Some(node) = &candidate.node {
        md.insert("node".into(), node.clone());
    }
    if let Some(zone) = &candidate.zone {
        md.insert("zone".into(), zone.clone());
    }
    md
}

/// Computes the endpoints one service should publish from its selected candidates.
#[must_use]
pub fn desired(plan: &Plan, candidates: &[Arc<Candidate>]) -> Desired {
    let mut out = Desired {
        selected: candidates.len(),
        service: plan.selection.service().map(str::to_owned),
        ..Desired::default()
    };
    for candidate in candidates {
        if candidate.ready {
            out.ready += 1;
        }
        match registrable(plan, candidate) {
            Ok((ip, port)) => {
                if undeclared(plan, candidate, port) {
                    out.undeclared_port.get_or_insert((port, 0)).1 += 1;
                    offer_ports(&mut out, candidate);
                }
                let weight = weight(plan, candidate).unwrap_or_else(|fallback| {
                    out.invalid_weights.insert(candidate.id.clone());
                    fallback
                });
                out.endpoints.push(LogicalEndpoint {
                    id: candidate.id.clone(),
                    ip,
                    port,
                    node: candidate.node.clone(),
                    metadata: metadata(plan, candidate, weight),
                });
            }
            Err(skip) => {
                if skip == Skip::PortNotFound {
                    offer_ports(&mut out, candidate);
                }
                out.skipped.insert(candidate.id.clone(), skip);
            }
        }
    }
    out
}

/// Whether `port`, the spec's number, is one that `candidate` lists no port for, though it may
/// list some (a pod: its containers' ports; an EndpointSlice lists every port, so a number
/// missing there is `PortNotFound` instead).
fn undeclared(plan: &Plan, candidate: &Candidate, port: u16) -> bool {
    matches!(plan.port, IntOrString::Int(_))
        && !candidate.ports_complete
        && !candidate.ports.iter().any(|(_, p)| *p == port)
}

/// Adds a few of the ports `candidate` does list to those a message offers.
fn offer_ports(out: &mut Desired, candidate: &Candidate) {
    let room = PORTS_OFFERED.saturating_sub(out.ports_offered.len());
    out.ports_offered
        .extend(candidate.ports.iter().take(room).cloned());
}

#[cfg(test)]
mod tests;
