//! The decision logic, pure: a validated spec and the selected pods in, desired registry keys out.
//!
//! Nothing here does I/O, so every rule of DESIGN §1–§2 is unit tested below.

mod template;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use serde_json::Value;
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};

use crate::crd::GrpcService;
pub use template::KeyTemplate;

/// Pod label that carries the topology zone, copied into endpoint metadata when present.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            key_prefix: "services".into(),
            registrar_root: "grpc-registrar".into(),
            custom_targets: CustomTargets::None,
        }
    }
}

/// A spec that cannot be applied. Reported as the `InvalidSpec` condition, never retried hot.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The label selector does not parse.
    #[error("failed to parse selector: {0}")]
    Selector(String),
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
        "failed to authorize target {target:?}: namespace {namespace:?} may only publish under {allowed:?}"
    )]
    TargetNotAllowed {
        /// The requested target.
        target: String,
        /// The GrpcService's namespace.
        namespace: String,
        /// The prefix it may use.
        allowed: String,
    },
    /// The target is malformed or inside the controller's own records.
    #[error("failed to validate target {0:?}: {1}")]
    Target(String, &'static str),
    /// The key template does not parse.
    #[error("failed to parse keyTemplate: {0}")]
    Template(String),
    /// Two pods render to the same key, so one would silently hide the other.
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
    /// The port, resolved per pod.
    pub port: IntOrString,
    /// The parsed selector.
    pub selector: Selector,
    /// Static metadata merged into every endpoint.
    pub static_metadata: BTreeMap<String, String>,
    /// Pod labels copied into metadata.
    pub metadata_labels: Vec<String>,
    /// Relaxes the Ready rule.
    pub publish_not_ready: bool,
    /// Lease TTL override.
    pub ttl_seconds: Option<i64>,
}

impl Plan {
    /// Validates a spec against the controller's policy.
    ///
    /// # Errors
    /// [`SpecError`] for anything the API server's schema could not catch.
    pub fn new(svc: &GrpcService, policy: &Policy) -> Result<Self, SpecError> {
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let spec = &svc.spec;
        let selector = Selector::try_from(spec.selector.clone())
            .map_err(|e| SpecError::Selector(e.to_string()))?;
        if selector.selects_all() {
            return Err(SpecError::Selector("selector must not be empty".into()));
        }
        if let IntOrString::Int(port) = spec.port
            && !(1..=65535).contains(&port)
        {
            return Err(SpecError::PortRange(port));
        }
        if let IntOrString::String(name) = &spec.port
            && !name.bytes().any(|b| b.is_ascii_lowercase())
        {
            return Err(SpecError::PortName(name.clone()));
        }
        let target = resolve_target(spec.target.as_deref(), &namespace, &name, policy)?;
        let template =
            KeyTemplate::parse(spec.key_template.as_deref().unwrap_or(template::DEFAULT))?;
        Ok(Self {
            namespace,
            name,
            target,
            format: spec.format,
            template,
            port: spec.port.clone(),
            selector,
            static_metadata: spec.metadata.clone(),
            metadata_labels: spec.metadata_from_labels.clone(),
            publish_not_ready: spec.publish_not_ready_addresses,
            ttl_seconds: spec.ttl_seconds,
        })
    }

    /// Whether `pod` is selected by this service: same namespace, labels match.
    #[must_use]
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.metadata.namespace.as_deref() == Some(self.namespace.as_str())
            && self.selector.matches(pod.labels())
    }
}

/// The default target of a service, `<key-prefix>/<namespace>/<name>`.
#[must_use]
pub fn default_target(key_prefix: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", key_prefix.trim_end_matches('/'))
}

fn resolve_target(
    requested: Option<&str>,
    namespace: &str,
    name: &str,
    policy: &Policy,
) -> Result<String, SpecError> {
    let Some(target) = requested else {
        return Ok(default_target(&policy.key_prefix, namespace, name));
    };
    let malformed = target.is_empty()
        || target.ends_with('/')
        || target.trim_start_matches('/').split('/').any(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if malformed {
        return Err(SpecError::Target(target.into(), "malformed"));
    }
    let root = policy.registrar_root.trim_end_matches('/');
    if target == root || target.starts_with(&format!("{root}/")) {
        return Err(SpecError::Target(
            target.into(),
            "inside the controller's own records",
        ));
    }
    let own = format!("{}/{namespace}", policy.key_prefix.trim_end_matches('/'));
    if target.starts_with(&format!("{own}/")) || policy.custom_targets.allows(namespace) {
        Ok(target.to_owned())
    } else {
        Err(SpecError::TargetNotAllowed {
            target: target.into(),
            namespace: namespace.into(),
            allowed: format!("{own}/"),
        })
    }
}

/// Why a selected pod is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Phase is not Running.
    NotRunning,
    /// The Ready condition is not True.
    NotReady,
    /// No podIP yet, or an unparsable one.
    NoPodIp,
    /// It has a deletionTimestamp: it leaves the registry before the process exits.
    Terminating,
    /// No container port has the requested name.
    PortNotFound,
}

/// The keys a service should have in etcd, and what was counted on the way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// Key to value bytes.
    pub entries: BTreeMap<String, Vec<u8>>,
    /// Pods given in (already selected).
    pub selected: usize,
    /// Selected pods whose Ready condition is True.
    pub ready: usize,
    /// Selected pods left out, by pod name.
    pub skipped: BTreeMap<String, Skip>,
}

/// Whether a pod's Ready condition is True.
#[must_use]
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Resolves the service port on one pod, like a Service's targetPort.
#[must_use]
pub fn resolve_port(port: &IntOrString, pod: &Pod) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n > 0),
        IntOrString::String(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().is_none_or(|proto| proto == "TCP")
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Checks the registrable rules of DESIGN §1 in order and returns the pod's IP and port.
///
/// # Errors
/// The first rule the pod fails.
pub fn registrable(plan: &Plan, pod: &Pod) -> Result<(IpAddr, u16), Skip> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Skip::Terminating);
    }
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()) != Some("Running") {
        return Err(Skip::NotRunning);
    }
    if !plan.publish_not_ready && !is_ready(pod) {
        return Err(Skip::NotReady);
    }
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .ok_or(Skip::NoPodIp)?;
    let port = resolve_port(&plan.port, pod).ok_or(Skip::PortNotFound)?;
    Ok((ip, port))
}

fn metadata(plan: &Plan, pod: &Pod) -> Value {
    let mut md = plan.static_metadata.clone();
    let labels = pod.labels();
    for label in &plan.metadata_labels {
        if let Some(value) = labels.get(label) {
            md.insert(label.clone(), value.clone());
        }
    }
    md.insert("pod".into(), pod.name_any());
    md.insert("namespace".into(), plan.namespace.clone());
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        md.insert("node".into(), node);
    }
    if let Some(zone) = labels.get(ZONE_LABEL) {
        md.insert("zone".into(), zone.clone());
    }
    serde_json::to_value(md).unwrap_or(Value::Null)
}

/// Computes the desired registry content of one service from its selected pods.
///
/// # Errors
/// [`SpecError::KeyCollision`] when the key template maps two pods to one key.
pub fn desired<P: Borrow<Pod>>(plan: &Plan, pods: &[P]) -> Result<Desired, SpecError> {
    let mut out = Desired {
        selected: pods.len(),
        ..Desired::default()
    };
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for pod in pods.iter().map(Borrow::borrow) {
        if is_ready(pod) {
            out.ready += 1;
        }
        let pod_name = pod.name_any();
        let (ip, port) = match registrable(plan, pod) {
            Ok(found) => found,
            Err(skip) => {
                out.skipped.insert(pod_name, skip);
                continue;
            }
        };
        let addr = format::socket_addr(ip, port);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let key = plan.template.render(&template::Vars {
            target: &plan.target,
            addr: &addr,
            ip,
            port,
            pod: &pod_name,
            namespace: &plan.namespace,
            name: &plan.name,
            node: node.unwrap_or(""),
        });
        if let Some(first) = owners.insert(key.clone(), pod_name.clone()) {
            return Err(SpecError::KeyCollision {
                key,
                first,
                second: pod_name,
            });
        }
        let mut endpoint = Endpoint::new(addr);
        if plan.format == ValueFormat::EtcdNaming {
            endpoint = endpoint.with_metadata(metadata(plan, pod));
        }
        out.entries
            .insert(key, format::render(plan.format, &endpoint));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
