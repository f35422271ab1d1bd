//! Endpoint sources: Kubernetes objects in, source-neutral [`Candidate`]s out.
//!
//! A source is the one place that reads a Pod or an EndpointSlice: readiness, IP, ports, node
//! and zone are decoded here, once per object event. Nothing past this module reads a
//! Kubernetes object; [`crate::desired`] works on candidates only.
//!
//! - [`pod`]: pods selected by label, as a Service selects them (`spec.selector`).
//! - [`slice`]: the endpoints of a Service's EndpointSlices (`spec.serviceRef`).
//! - [`index`]: the candidate index (pods by namespace and label), the slice index (endpoints
//!   by Service, merged over its slices), and the indexes of which GrpcServices an event can
//!   concern, fed by watch events so that each event costs what it touches.

pub mod index;
pub mod pod;
pub mod slice;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

/// One endpoint candidate, whatever its source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Unique within its namespace and source: the pod name (an EndpointSlice endpoint that is
    /// not a pod's: its address).
    pub id: String,
    /// The pod behind it, when there is one.
    pub pod: Option<String>,
    /// The address to publish; `None` until one is assigned.
    pub ip: Option<IpAddr>,
    /// A DNS name in place of an IP (an `FQDN` EndpointSlice): never registered, reported.
    pub fqdn: Option<String>,
    /// Named TCP ports, for a spec that names its port.
    pub ports: Vec<(String, u16)>,
    /// Whether `ports` lists every port (an EndpointSlice does; a pod may serve a port it does
    /// not declare), so that a numeric spec port resolves only when listed.
    pub ports_complete: bool,
    /// The readiness signal is on (a pod's Ready condition is True).
    pub ready: bool,
    /// The workload is up, ready or not (a pod is Running). `publishNotReadyAddresses`
    /// publishes serving candidates that are not ready.
    pub serving: bool,
    /// Being deleted: leaves the registry before the process exits.
    pub terminating: bool,
    /// The node it runs on.
    pub node: Option<String>,
    /// Its topology zone.
    pub zone: Option<String>,
    /// Labels, for selectors and `metadataFromLabels`.
    pub labels: BTreeMap<String, String>,
    /// The pod's `grpc-registrar.io/weight` annotation, unparsed (`desired` checks it).
    pub weight: Option<String>,
    /// When readiness last changed (a pod's Ready transition, or its deletion), as Kubernetes
    /// records it: whole seconds, set by the kubelet.
    pub changed: Option<Timestamp>,
    /// When this process saw its registrable state (ready, serving, terminating, address) last
    /// change: set by the index from watch events, `None` for candidates first seen in a list.
    pub observed: Option<std::time::Instant>,
}

impl Candidate {
    /// Whether `other` differs in anything that decides registration.
    #[must_use]
    pub fn same_registrable_state(&self, other: &Self) -> bool {
        (
            self.ready,
            self.serving,
            self.terminating,
            self.ip,
            &self.ports,
        ) == (
            other.ready,
            other.serving,
            other.terminating,
            other.ip,
            &other.ports,
        )
    }

    /// Resolves the spec's port on this candidate, like a Service's targetPort.
    #[must_use]
    pub fn port(&self, port: &IntOrString) -> Option<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .filter(|n| !self.ports_complete || self.ports.iter().any(|(_, p)| p == n)),
            IntOrString::String(name) => self
                .ports
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, number)| *number),
        }
    }
}
