//! Endpoint sources: Kubernetes objects in, source-neutral [`Candidate`]s out.
//!
//! A source is the one place that reads a Pod or an EndpointSlice: readiness, IP, ports, node
//! and zone are decoded here, once per object event. Nothing past this module reads a
//! Kubernetes object; [`crate::desired`] works on candidates only.
//!
//! The seam is [`Source`] (what one source watches, how its events update its index, which
//! GrpcServices an object wakes) and [`Selects`] (how a GrpcService selects candidates from
//! it), with [`feed::Feed`] applying watch events, re-lists buffered, once for every source
//! (as linkerd's `kubert::index` does). A new source is one file implementing both, and one
//! line in [`register`]: the controller then watches it, and [`selection`] reads it from specs.
//!
//! - [`pod`]: pods selected by label, as a Service selects them (`spec.selector`).
//! - [`slice`]: the endpoints of a Service's EndpointSlices (`spec.serviceRef`).
//! - [`index`]: the candidate index (pods by namespace and label), the slice index (endpoints
//!   by Service, merged over its slices), and the indexes of which GrpcServices an event can
//!   concern, fed by watch events so that each event costs what it touches.

pub mod feed;
pub mod index;
pub mod pod;
pub mod slice;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::core::Selector;

use crate::crd::{GrpcService, GrpcServiceSpec};

/// Every source, in the order a spec's selection is read: a new source is one line here.
pub fn register(to: &mut impl Register) {
    to.add::<pod::PodSource>();
    to.add::<slice::SliceSource>();
}

/// What [`register`] hands every source to: the controller's watches, and [`selection`].
pub trait Register {
    /// Takes one source.
    fn add<S: Source>(&mut self);
}

/// A spec's selection cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    /// The label selector does not parse, or selects everything.
    #[error("failed to parse selector: {0}")]
    Selector(String),
    /// Not exactly one source, or a port missing or misplaced for the source.
    #[error("failed to read the source: {0}")]
    Source(&'static str),
}

/// What a spec selects, and the port to publish: exactly one source must be named.
///
/// # Errors
/// [`SelectionError`] when none or several are named, or the one named is not well-formed.
pub fn selection(spec: &GrpcServiceSpec) -> Result<(Selection, IntOrString), SelectionError> {
    /// The selections the sources read from one spec.
    struct Named<'a> {
        spec: &'a GrpcServiceSpec,
        found: Vec<Result<(Selection, IntOrString), SelectionError>>,
    }
    impl Register for Named<'_> {
        fn add<S: Source>(&mut self) {
            self.found.extend(S::selection(self.spec));
        }
    }
    let mut named = Named {
        spec,
        found: Vec::new(),
    };
    register(&mut named);
    match <[_; 1]>::try_from(named.found) {
        Ok([one]) => one,
        Err(_) => Err(SelectionError::Source(
            "set exactly one of selector and serviceRef",
        )),
    }
}

/// One kind of endpoint source, as its watch sees it: the objects it watches, how each decodes
/// (once per event), and how events update its index. [`feed::Feed`] drives it.
pub trait Source: Selects + Clone + Default + 'static {
    /// The Kubernetes object watched.
    type Object: kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    /// What one object decodes into, kept while a re-list is buffered.
    type Decoded: Send + 'static;

    /// Decodes one object.
    fn decode(object: &Self::Object) -> Self::Decoded;

    /// An object was added or changed.
    fn apply(&self, namespace: &str, name: &str, decoded: Self::Decoded);

    /// An object is gone.
    fn delete(&self, namespace: &str, name: &str);

    /// A (re-)list completed: its objects replace everything.
    fn reset(&self, listed: Vec<Listed<Self::Decoded>>);

    /// The GrpcServices in `namespace` (by name) whose selection matches `object` now, read
    /// after the event was applied; those that read it before are known to the reconciler.
    fn selecting(&self, namespace: &str, object: &Self::Object) -> Vec<String>;

    /// What `spec` selects of this source and the port to publish; `None` when the spec names
    /// no selection of this source.
    fn selection(
        spec: &GrpcServiceSpec,
    ) -> Option<Result<(Selection, IntOrString), SelectionError>>;
}

/// One object of a (re-)list, decoded.
#[derive(Debug)]
pub struct Listed<D> {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What it decoded into.
    pub decoded: D,
}

/// One source as a reconcile and the GrpcService watch see it (object safe, so the controller
/// keeps a list of them).
pub trait Selects: Send + Sync {
    /// Its name, in logs.
    fn name(&self) -> &'static str;

    /// Whether a GrpcService with `spec` reads this source (its reconcile waits for this
    /// source's list).
    fn read_by(&self, spec: &GrpcServiceSpec) -> bool;

    /// The candidates `selection` picks in `namespace`, and the objects read; `None` when the
    /// selection is another source's.
    fn select(&self, namespace: &str, selection: &Selection) -> Option<Selected>;

    /// Indexes a GrpcService's selection of this source (one that selects none is forgotten),
    /// so that an object event reaches it.
    fn index_service(&self, svc: &GrpcService);

    /// Forgets a GrpcService.
    fn forget_service(&self, namespace: &str, name: &str);

    /// Keeps only the GrpcServices in `live` (after a re-list), by `(namespace, name)`.
    fn retain_services(&self, live: &HashSet<(String, String)>);

    /// How many candidates it holds.
    fn len(&self) -> usize;

    /// Whether it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a GrpcService selects, from its spec: the source and what to ask of it.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// The pods of the namespace that the (parsed, non-empty) selector matches.
    Pods(Selector),
    /// The endpoints of the named Service's EndpointSlices, in the namespace.
    Service(String),
}

impl Selection {
    /// The Service named, for a `serviceRef` selection.
    #[must_use]
    pub fn service(&self) -> Option<&str> {
        match self {
            Self::Pods(_) => None,
            Self::Service(name) => Some(name),
        }
    }
}

/// What a selection found.
#[derive(Debug, Default)]
pub struct Selected {
    /// One candidate per endpoint, sorted by id.
    pub candidates: Vec<Arc<Candidate>>,
    /// The objects read (in the namespace), so that their later events wake the service even
    /// once they no longer match.
    pub objects: Objects,
    /// Which objects these are, as a token equal between two selections only when both hold
    /// the same objects (`None`: not known, compare the objects).
    pub membership: Option<Membership>,
}

/// Names one kept selection's set of objects: equal tokens, equal sets. A readiness flip
/// changes a candidate, not the set, so the token stays and the objects need no comparing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Membership {
    /// The kept selection (unique in the process).
    pub selection: u64,
    /// Bumped whenever an object joins or leaves it.
    pub version: u64,
}

/// Which objects a selection read.
#[derive(Debug, Default)]
pub enum Objects {
    /// The candidates' own: each candidate's id names the object it came from (a pod).
    #[default]
    Candidates,
    /// These, by name (the EndpointSlices read).
    Named(Vec<String>),
}

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
    /// Whether `other` is the same endpoint in everything an evaluation reads: all but when it
    /// last changed.
    #[must_use]
    pub fn evaluates_as(&self, other: &Self) -> bool {
        self.evaluated() == other.evaluated()
    }

    /// Everything an evaluation reads (every field but when it last changed; a new field must
    /// be placed here or left out on purpose).
    fn evaluated(&self) -> impl PartialEq + '_ {
        let Self {
            id,
            pod,
            ip,
            fqdn,
            ports,
            ports_complete,
            ready,
            serving,
            terminating,
            node,
            zone,
            labels,
            weight,
            changed: _,
            observed: _,
        } = self;
        let states = (ports_complete, ready, serving, terminating);
        (id, pod, ip, fqdn, ports, states, node, zone, labels, weight)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{service, service_ref};

    #[test]
    fn each_registered_source_reads_its_own_field_and_port_and_a_spec_names_exactly_one() {
        let (pods, port) = selection(&service("greeter").spec).unwrap();
        assert!(matches!(pods, Selection::Pods(_)));
        assert_eq!(Some(port), service("greeter").spec.port);
        let by_ref = service_ref("greeter", "greeter-svc", IntOrString::Int(50051));
        let (slices, port) = selection(&by_ref.spec).unwrap();
        assert_eq!(slices.service(), Some("greeter-svc"));
        assert_eq!(port, IntOrString::Int(50051));
        let mut both = by_ref.spec.clone();
        both.selector = service("greeter").spec.selector;
        both.port = service("greeter").spec.port;
        assert_eq!(
            selection(&both).unwrap_err(),
            SelectionError::Source("set exactly one of selector and serviceRef")
        );
    }
}
