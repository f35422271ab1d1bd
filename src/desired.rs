//! The decision logic, pure: a validated spec and its candidates in, logical endpoints out.
//!
//! Nothing here does I/O, so every rule of DESIGN §1–§2 is unit tested. This is the
//! backend-neutral half of spec validation (sources, selectors, ports, tenancy policy); where an
//! endpoint is published and what it looks like on the wire is the backend's business (its
//! [`crate::registry::Planner`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tonic_etcd_resolver::format;

use crate::crd::GrpcService;
use crate::source::{Candidate, Selection, SelectionError};

/// The most bytes one entry (key and value) may take: one entry alone always fits in one
/// registry write (each backend bounds its write batches by at least this much).
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// Two endpoints that map to one registry entry: the first is registered, the other left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collision {
    /// The shared key.
    pub key: String,
    /// The endpoint registered under it (the first in candidate order).
    pub kept: String,
    /// The endpoint left out.
    pub left_out: String,
}

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

    /// Whether `namespace` may publish outside its own default target.
    #[must_use]
    pub fn allows(&self, namespace: &str) -> bool {
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
    /// The backend this controller publishes into (the GrpcServices it serves name it); what a
    /// target is depends on it.
    pub backend: crate::crd::Backend,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            key_prefix: "services".into(),
            registrar_root: "grpc-registrar".into(),
            custom_targets: CustomTargets::None,
            cluster: None,
            backend: crate::crd::Backend::default(),
        }
    }
}

/// A spec that cannot be applied. Reported as the `InvalidSpec` condition, never retried hot.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The label selector does not parse.
    #[error("failed to parse selector: {0}")]
    Selector(String),
    /// Metadata the backend would refuse (its rules for keys and values), naming what.
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
    /// A registry name the namespace may not publish, by the backend's tenancy rule for names.
    #[error("failed to authorize {kind} {service:?} for namespace {namespace:?}: {reason}")]
    NameNotAllowed {
        /// What kind of name, as the message says it.
        kind: &'static str,
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
        max = MAX_ENTRY_BYTES
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
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The service's namespace; only pods in it are selected.
    pub namespace: String,
    /// The service's name, for `{name}` in templates and for logs.
    pub name: String,
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
    /// `spec.weight`, written as `metadata.weight` unless a pod's annotation overrides it.
    pub weight: Option<u32>,
}

impl Plan {
    /// Validates the backend-neutral half of a spec (its source, selector and port) against the
    /// controller's policy; the backend's [`crate::registry::Planner`] plans the rest.
    ///
    /// # Errors
    /// [`SpecError`] for anything the API server's schema could not catch.
    pub fn new(svc: &GrpcService, policy: &Policy) -> Result<Self, SpecError> {
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
        Ok(Self {
            namespace,
            name,
            port: port.clone(),
            selection,
            static_metadata: spec.metadata.clone(),
            metadata_labels: spec.metadata_from_labels.clone(),
            publish_not_ready: spec.publish_not_ready_addresses,
            ttl_seconds: spec.ttl_seconds,
            cluster: policy.cluster.clone(),
            weight: spec.weight,
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
        add(plan, candidate, &mut out);
    }
    out
}

/// Adds one selected candidate to `out` (all but its `selected` count): its endpoint, or why it
/// is left out, and what it counts towards.
pub fn add(plan: &Plan, candidate: &Candidate, out: &mut Desired) {
    if candidate.ready {
        out.ready += 1;
    }
    match registrable(plan, candidate) {
        Ok((ip, port)) => {
            if undeclared(plan, candidate, port) {
                out.undeclared_port.get_or_insert((port, 0)).1 += 1;
                offer_ports(out, candidate);
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
                offer_ports(out, candidate);
            }
            out.skipped.insert(candidate.id.clone(), skip);
        }
    }
}

/// Whether `port`, the spec's number, is one that `candidate` lists no port for, though it may
/// list some (a pod: its containers' ports; an EndpointSlice lists every port, so a number
/// missing there is `PortNotFound` instead).
#[must_use]
pub fn undeclared(plan: &Plan, candidate: &Candidate, port: u16) -> bool {
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
