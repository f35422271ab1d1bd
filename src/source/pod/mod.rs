//! The pod source: a Pod becomes a [`Candidate`], with readiness decoded once, here.

mod object;

pub use object::PodObject;

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::core::Selector;

use super::index::{CandidateIndex, ServicesBySelector};
use super::{Candidate, Listed, Objects, Selected, Selection, SelectionError, Selects, Source};
use crate::crd::{GrpcService, GrpcServiceSpec};

/// Pods selected by label (`spec.selector`): the candidates by namespace and label, and the
/// GrpcServices by their selectors.
#[derive(Clone, Debug, Default)]
pub struct PodSource {
    /// Pod candidates by namespace and label.
    pub candidates: CandidateIndex,
    /// GrpcServices by selector, so that a pod event reaches only those that can match it.
    pub selectors: ServicesBySelector,
}

impl Source for PodSource {
    type Object = PodObject;
    type Decoded = Candidate;

    fn decode(pod: &PodObject) -> Candidate {
        candidate(pod)
    }

    fn apply(&self, namespace: &str, _name: &str, candidate: Candidate) {
        self.candidates.apply(namespace, candidate);
    }

    fn delete(&self, namespace: &str, name: &str) {
        self.candidates.delete(namespace, name);
    }

    fn reset(&self, listed: Vec<Listed<Candidate>>) {
        self.candidates
            .reset(listed.into_iter().map(|l| (l.namespace, l.decoded)));
    }

    /// `spec.selector`, parsed and not empty, with `spec.port`.
    fn selection(
        spec: &GrpcServiceSpec,
    ) -> Option<Result<(Selection, IntOrString), SelectionError>> {
        let selector = spec.selector.as_ref()?;
        let Some(port) = &spec.port else {
            return Some(Err(SelectionError::Source(
                "port is required with selector",
            )));
        };
        Some(
            Selector::try_from(selector.clone())
                .map_err(|e| SelectionError::Selector(e.to_string()))
                .and_then(|selector| {
                    if selector.selects_all() {
                        return Err(SelectionError::Selector(
                            "selector must not be empty".into(),
                        ));
                    }
                    Ok((Selection::Pods(selector), port.clone()))
                }),
        )
    }

    /// A pod still listed wakes the services whose selector matches its labels.
    fn selecting(&self, namespace: &str, pod: &PodObject) -> Vec<String> {
        if self.candidates.get(namespace, &pod.name_any()).is_none() {
            return Vec::new();
        }
        self.selectors.matching(namespace, pod.labels())
    }
}

impl Selects for PodSource {
    fn name(&self) -> &'static str {
        "pods"
    }

    fn read_by(&self, spec: &GrpcServiceSpec) -> bool {
        spec.selector.is_some()
    }

    fn select(&self, namespace: &str, selection: &Selection) -> Option<Selected> {
        let Selection::Pods(selector) = selection else {
            return None;
        };
        let (candidates, membership) = self.candidates.select_kept(namespace, selector);
        Some(Selected {
            candidates,
            objects: Objects::Candidates,
            membership,
        })
    }

    fn index_service(&self, svc: &GrpcService) {
        self.selectors.apply(
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
            (svc.uid(), svc.metadata.generation),
            || {
                Selector::try_from(svc.spec.selector.clone()?)
                    .ok()
                    .filter(|s| !s.selects_all())
            },
        );
    }

    fn forget_service(&self, namespace: &str, name: &str) {
        self.selectors.delete(namespace, name);
    }

    fn retain_services(&self, live: &HashSet<(String, String)>) {
        self.selectors.retain(live);
    }

    fn len(&self) -> usize {
        self.candidates.len()
    }
}

/// Pod label that carries the topology zone, copied into endpoint metadata when present.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The candidate a pod makes.
///
/// - ready: the Ready condition is True (readiness gates are folded into it by the kubelet);
/// - serving: phase Running;
/// - terminating: a deletionTimestamp is set;
/// - ports: named container ports whose protocol is TCP (the default);
/// - changed: the Ready condition's `lastTransitionTime`, or the deletionTimestamp.
#[must_use]
pub fn candidate(pod: &PodObject) -> Candidate {
    let status = pod.status.as_ref();
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let deletion = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0);
    let spec = pod.spec.as_ref();
    let ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect();
    let labels = pod.labels().clone();
    Candidate {
        id: pod.name_any(),
        pod: Some(pod.name_any()),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok()),
        ports,
        ready: ready_condition.is_some_and(|c| c.status == "True"),
        serving: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
        terminating: deletion.is_some(),
        node: spec.and_then(|s| s.node_name.clone()),
        zone: labels.get(ZONE_LABEL).cloned(),
        changed: deletion.or_else(|| {
            ready_condition
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0)
        }),
        labels,
        weight: pod
            .annotations()
            .get(crate::crd::WEIGHT_ANNOTATION)
            .cloned(),
        ..Candidate::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::PodBuilder;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn a_running_ready_pod_is_a_ready_serving_candidate_with_its_named_ports() {
        let c = candidate(&PodBuilder::ready("p1", "10.0.0.7").object());
        assert_eq!(c.id, "p1");
        assert_eq!(c.ip, Some("10.0.0.7".parse().unwrap()));
        assert!(c.ready && c.serving && !c.terminating);
        assert_eq!(c.port(&IntOrString::String("grpc".into())), Some(50051));
        assert_eq!(c.port(&IntOrString::Int(9000)), Some(9000));
        assert_eq!(c.node.as_deref(), Some("node-1"));
    }

    #[test]
    fn readiness_phase_deletion_and_ip_are_decoded_once_here() {
        let c = candidate(&PodBuilder::ready("p", "10.0.0.1").not_ready().object());
        assert!(!c.ready && c.serving);
        let c = candidate(&PodBuilder::ready("p", "10.0.0.1").phase("Pending").object());
        assert!(c.ready && !c.serving);
        let c = candidate(&PodBuilder::ready("p", "10.0.0.1").terminating().object());
        assert!(c.terminating && c.changed.is_some());
        let c = candidate(&PodBuilder::ready("p", "10.0.0.1").no_ip().object());
        assert_eq!(c.ip, None);
    }

    #[test]
    fn udp_ports_do_not_resolve_a_port_name() {
        let mut pod = PodBuilder::ready("p", "10.0.0.1").object();
        pod.spec.as_mut().unwrap().containers[0]
            .ports
            .as_mut()
            .unwrap()[0]
            .protocol = Some("UDP".into());
        assert_eq!(
            candidate(&pod).port(&IntOrString::String("grpc".into())),
            None
        );
    }

    #[test]
    fn the_zone_label_is_the_candidates_zone() {
        let pod = PodBuilder::ready("p", "10.0.0.1")
            .label(ZONE_LABEL, "zone-a")
            .object();
        assert_eq!(candidate(&pod).zone.as_deref(), Some("zone-a"));
    }
}
