//! The EndpointSlice source: each endpoint of a Service's slices becomes a [`Candidate`], with
//! readiness decoded once, here (KEP-1672 conditions).

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::index::{ServicesByRef, SliceIndex};
use super::{Candidate, Listed, Objects, Selected, Selection, SelectionError, Selects, Source};
use crate::crd::{GrpcService, GrpcServiceSpec};

/// A Service's EndpointSlices (`spec.serviceRef`): endpoints by Service, merged over its
/// slices, and the GrpcServices by the Service they name.
#[derive(Clone, Debug, Default)]
pub struct SliceSource {
    /// Endpoints by namespace and Service.
    pub slices: SliceIndex,
    /// GrpcServices by the Service their `serviceRef` names.
    pub refs: ServicesByRef,
}

impl Source for SliceSource {
    type Object = EndpointSlice;
    /// The slice's Service and its endpoints: each slice is decoded once, and the object
    /// dropped.
    type Decoded = (Option<String>, Vec<Candidate>);

    fn decode(slice: &EndpointSlice) -> Self::Decoded {
        (service_name(slice).map(str::to_owned), candidates(slice))
    }

    fn apply(&self, namespace: &str, name: &str, (service, candidates): Self::Decoded) {
        self.slices
            .apply(namespace, name, service.as_deref(), candidates);
    }

    fn delete(&self, namespace: &str, name: &str) {
        self.slices.delete(namespace, name);
    }

    fn reset(&self, listed: Vec<Listed<Self::Decoded>>) {
        self.slices.reset(
            listed
                .into_iter()
                .map(|l| (l.namespace, l.name, l.decoded.0, l.decoded.1)),
        );
    }

    /// `spec.serviceRef`, with its own port (`spec.port` does not apply).
    fn selection(
        spec: &GrpcServiceSpec,
    ) -> Option<Result<(Selection, IntOrString), SelectionError>> {
        let service = spec.service_ref.as_ref()?;
        if spec.port.is_some() {
            return Some(Err(SelectionError::Source(
                "port does not apply with serviceRef: set serviceRef.port",
            )));
        }
        Some(Ok((
            Selection::Service(service.name.clone()),
            service.port.clone(),
        )))
    }

    /// A slice wakes the GrpcServices naming its Service.
    fn selecting(&self, namespace: &str, slice: &EndpointSlice) -> Vec<String> {
        service_name(slice)
            .map(|service| self.refs.referencing(namespace, service))
            .unwrap_or_default()
    }
}

impl Selects for SliceSource {
    fn name(&self) -> &'static str {
        "endpointslices"
    }

    fn read_by(&self, spec: &GrpcServiceSpec) -> bool {
        spec.service_ref.is_some()
    }

    fn select(&self, namespace: &str, selection: &Selection) -> Option<Selected> {
        let Selection::Service(service) = selection else {
            return None;
        };
        let found = self.slices.select(namespace, service);
        Some(Selected {
            candidates: found.candidates,
            objects: Objects::Named(found.slices),
            membership: None,
        })
    }

    fn index_service(&self, svc: &GrpcService) {
        self.refs.apply(
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
            svc.spec.service_ref.as_ref().map(|r| r.name.as_str()),
        );
    }

    fn forget_service(&self, namespace: &str, name: &str) {
        self.refs.delete(namespace, name);
    }

    fn retain_services(&self, live: &HashSet<(String, String)>) {
        self.refs.retain(live);
    }

    fn len(&self) -> usize {
        self.slices.len()
    }
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service an EndpointSlice belongs to, from its `kubernetes.io/service-name` label.
#[must_use]
pub fn service_name(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
        .filter(|name| !name.is_empty())
}

/// The candidates a slice makes, one per endpoint.
///
/// - id: the target pod's name when the endpoint points at a Pod, else its address (a
///   hand-made slice for a VM or an outside endpoint), so one pod listed in two slices during
///   a rebalance is one candidate;
/// - ready: `conditions.ready`, unknown read as ready (as the API documents);
/// - terminating: `conditions.terminating`, unknown read as false;
/// - serving ("up, ready or not", what `publishNotReadyAddresses` publishes): true while not
///   terminating (a slice lists an endpoint from the moment it has an address until it is
///   gone); while terminating, `conditions.serving`, unknown read as `ready`;
/// - ports: the slice's TCP ports by name (an unnamed port has the empty name), and only those:
///   a numeric spec port must be listed to resolve;
/// - an `FQDN` slice's endpoints have no IP: they are reported, never registered.
#[must_use]
pub fn candidates(slice: &EndpointSlice) -> Vec<Candidate> {
    let ports: Vec<(String, u16)> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let number = u16::try_from(p.port?).ok().filter(|n| *n > 0)?;
            Some((p.name.clone().unwrap_or_default(), number))
        })
        .collect();
    let fqdn = slice.address_type == "FQDN";
    // When kube-controller-manager saw the pod change that this version of the slice reflects
    // (as kube-proxy measures it): the start of propagation for the endpoints that changed.
    let triggered = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|endpoint| candidate(endpoint, &ports, fqdn))
        .map(|candidate| Candidate {
            changed: triggered,
            ..candidate
        })
        .collect()
}

/// The annotation kube-controller-manager sets on an EndpointSlice to the time of the change
/// (a pod's, or the Service's) that produced it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn candidate(endpoint: &Endpoint, ports: &[(String, u16)], fqdn: bool) -> Option<Candidate> {
    let address = endpoint.addresses.first()?;
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    let pod = endpoint
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| r.name.clone());
    Some(Candidate {
        id: pod.clone().unwrap_or_else(|| address.clone()),
        pod,
        ip: if fqdn {
            None
        } else {
            address.parse::<IpAddr>().ok()
        },
        fqdn: fqdn.then(|| address.clone()),
        ports: ports.to_vec(),
        ports_complete: true,
        ready,
        serving: !terminating || conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating,
        node: endpoint.node_name.clone(),
        zone: endpoint.zone.clone(),
        ..Candidate::default()
    })
}

/// Whether `a` is a better copy of one endpoint than `b`, when a rebalance lists it in two
/// slices: a registrable copy wins, then a ready one (as kube-proxy merges them).
#[must_use]
pub fn better(a: &Candidate, b: &Candidate) -> bool {
    let rank = |c: &Candidate| (c.ready && c.serving && !c.terminating, c.ready);
    rank(a) > rank(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use serde_json::json;

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    fn greeter(endpoints: serde_json::Value) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": "greeter-abc", "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: "greeter"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
    }

    #[test]
    fn a_pod_backed_endpoint_is_a_candidate_named_after_its_pod_with_node_and_zone() {
        let s = greeter(json!([{
            "addresses": ["10.0.0.7"],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-1", "zone": "zone-a",
            "targetRef": {"kind": "Pod", "name": "greeter-0", "namespace": "ns"},
        }]));
        assert_eq!(service_name(&s), Some("greeter"));
        let c = &candidates(&s)[0];
        assert_eq!(
            (c.id.as_str(), c.pod.as_deref()),
            ("greeter-0", Some("greeter-0"))
        );
        assert_eq!(c.ip, Some("10.0.0.7".parse().unwrap()));
        assert!(c.ready && c.serving && !c.terminating);
        assert_eq!(
            (c.node.as_deref(), c.zone.as_deref()),
            (Some("node-1"), Some("zone-a"))
        );
        assert_eq!(c.port(&IntOrString::String("grpc".into())), Some(50051));
        assert_eq!(
            c.port(&IntOrString::String("dns".into())),
            None,
            "UDP is not a gRPC port"
        );
    }

    #[test]
    fn unknown_conditions_read_as_ready_and_serving_and_not_terminating() {
        let c = &candidates(&greeter(json!([{"addresses": ["10.0.0.1"]}])))[0];
        assert!(c.ready && c.serving && !c.terminating);
        let c = &candidates(&greeter(json!([{
            "addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": false},
        }])))[0];
        assert!(
            !c.ready && c.serving,
            "listed and not terminating: up, not ready"
        );
        let c = &candidates(&greeter(json!([{
            "addresses": ["10.0.0.1"], "conditions": {"ready": false, "terminating": true},
        }])))[0];
        assert!(!c.serving, "terminating: serving defers to ready");
        let c = &candidates(&greeter(json!([{
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": false, "serving": true, "terminating": true},
        }])))[0];
        assert!(!c.ready && c.serving && c.terminating);
    }

    #[test]
    fn a_hand_made_endpoint_is_named_by_its_address_and_a_numeric_port_must_be_listed() {
        let c = &candidates(&greeter(json!([{"addresses": ["192.168.1.20"]}])))[0];
        assert_eq!((c.id.as_str(), c.pod.as_deref()), ("192.168.1.20", None));
        assert_eq!(c.port(&IntOrString::Int(50051)), Some(50051));
        assert_eq!(c.port(&IntOrString::Int(8080)), None);
    }

    #[test]
    fn ipv6_addresses_parse_and_fqdn_endpoints_have_no_ip() {
        let v6 = slice(json!({
            "metadata": {"name": "v6"}, "addressType": "IPv6",
            "ports": [{"port": 50051}],
            "endpoints": [{"addresses": ["fd00::7"]}],
        }));
        let c = &candidates(&v6)[0];
        assert_eq!(c.ip, Some("fd00::7".parse().unwrap()));
        assert_eq!(
            c.port(&IntOrString::Int(50051)),
            Some(50051),
            "an unnamed port"
        );
        let fqdn = slice(json!({
            "metadata": {"name": "ext"}, "addressType": "FQDN",
            "ports": [{"port": 50051}],
            "endpoints": [{"addresses": ["grpc.example.com"]}],
        }));
        let c = &candidates(&fqdn)[0];
        assert_eq!((c.ip, c.fqdn.as_deref()), (None, Some("grpc.example.com")));
    }

    #[test]
    fn an_endpoint_without_an_address_or_a_slice_without_endpoints_makes_no_candidate() {
        assert!(candidates(&greeter(json!([{"addresses": []}]))).is_empty());
        assert!(candidates(&greeter(json!(null))).is_empty());
    }

    #[test]
    fn a_registrable_copy_is_better_than_a_ready_one_better_than_neither() {
        let c = |ready, terminating| Candidate {
            ready,
            serving: ready,
            terminating,
            ..Candidate::default()
        };
        assert!(better(&c(true, false), &c(true, true)));
        assert!(better(&c(true, true), &c(false, false)));
        assert!(!better(&c(false, false), &c(false, false)));
    }
}
