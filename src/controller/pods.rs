//! The pod cache: what is kept of each pod, and which services a pod event wakes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::crd::GrpcService;

/// Strips a pod down to what reconciling reads, before it enters the reflector store.
///
/// Kept: name, namespace, labels, deletionTimestamp; node name and named container ports; phase,
/// podIP and the Ready condition. Everything else, managedFields first, is dropped.
pub fn strip_pod(pod: &mut Pod) {
    let md = &mut pod.metadata;
    md.managed_fields = None;
    md.annotations = None;
    md.owner_references = None;
    md.finalizers = None;
    md.generate_name = None;
    md.creation_timestamp = None;
    md.generation = None;
    md.self_link = None;
    md.deletion_grace_period_seconds = None;
    md.uid = None;

    let spec = pod.spec.take().unwrap_or_default();
    let containers = spec
        .containers
        .into_iter()
        .filter_map(|c| {
            let ports: Vec<ContainerPort> = c
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.name.is_some())
                .map(|p| ContainerPort {
                    name: p.name,
                    container_port: p.container_port,
                    protocol: p.protocol.filter(|proto| proto != "TCP"),
                    ..ContainerPort::default()
                })
                .collect();
            (!ports.is_empty()).then(|| Container {
                ports: Some(ports),
                ..Container::default()
            })
        })
        .collect();
    pod.spec = Some(PodSpec {
        containers,
        node_name: spec.node_name,
        ..PodSpec::default()
    });

    let status = pod.status.take().unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == "Ready")
        .map(|c| PodCondition {
            type_: c.type_,
            status: c.status,
            last_transition_time: c.last_transition_time,
            ..PodCondition::default()
        })
        .collect();
    pod.status = Some(PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        conditions: Some(ready),
        ..PodStatus::default()
    });
}

/// pod -> the services it matched at its last event.
type Matched = Arc<Mutex<HashMap<ObjectRef<Pod>, HashSet<ObjectRef<GrpcService>>>>>;
/// service -> (generation, parsed selector).
type Selectors = Arc<Mutex<HashMap<ObjectRef<GrpcService>, (Option<i64>, Option<Selector>)>>>;

/// Maps pod events to the GrpcServices they concern, and only those.
///
/// A pod whose labels changed must wake the services it *left* as well as those it joined, so
/// the mapper remembers which services each pod last matched.
#[derive(Clone)]
pub struct PodMapper {
    services: Store<GrpcService>,
    pods: Store<Pod>,
    /// pod -> services it matched at its last event.
    matched: Matched,
    /// Parsed selectors, by service and generation, so a pod event parses none.
    selectors: Selectors,
}

impl PodMapper {
    /// A mapper over the service and pod stores.
    #[must_use]
    pub fn new(services: Store<GrpcService>, pods: Store<Pod>) -> Self {
        Self {
            services,
            pods,
            matched: Arc::default(),
            selectors: Arc::default(),
        }
    }

    /// The services a pod event concerns: those it matches now, plus those it matched before.
    pub fn map(&self, pod: &Pod) -> Vec<ObjectRef<GrpcService>> {
        let pod_ref = ObjectRef::from_obj(pod);
        let namespace = pod.namespace();
        let gone = self.pods.get(&pod_ref).is_none();
        let now: HashSet<ObjectRef<GrpcService>> = if gone {
            HashSet::new()
        } else {
            let mut selectors = self.selectors.lock().expect("lock");
            self.services
                .state()
                .iter()
                .filter(|svc| svc.namespace() == namespace)
                .filter(|svc| {
                    let key = ObjectRef::from_obj(svc.as_ref());
                    let generation = svc.metadata.generation;
                    let entry = selectors.entry(key).or_insert((None, None));
                    if entry.0 != generation || entry.1.is_none() {
                        *entry = (
                            generation,
                            Selector::try_from(svc.spec.selector.clone()).ok(),
                        );
                    }
                    entry.1.as_ref().is_some_and(|s| s.matches(pod.labels()))
                })
                .map(|svc| ObjectRef::from_obj(svc.as_ref()))
                .collect()
        };
        let mut matched = self.matched.lock().expect("lock");
        let before = if now.is_empty() {
            matched.remove(&pod_ref)
        } else {
            matched.insert(pod_ref, now.clone())
        };
        let mut all = now;
        all.extend(before.into_iter().flatten());
        all.into_iter().collect()
    }

    /// Forgets parsed selectors of services no longer in the store.
    pub fn prune(&self) {
        let live: HashSet<ObjectRef<GrpcService>> = self
            .services
            .state()
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect();
        self.selectors
            .lock()
            .expect("lock")
            .retain(|k, _| live.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PodBuilder, service};
    use kube::runtime::reflector::store;
    use kube::runtime::watcher::Event;

    #[test]
    fn stripped_pod_keeps_what_reconciling_reads_and_still_registers() {
        let mut pod = PodBuilder::ready("p1", "10.0.0.7").build();
        pod.metadata.annotations = Some([("big".to_owned(), "x".repeat(4096))].into());
        pod.metadata.managed_fields = Some(vec![Default::default()]);
        let plan = crate::desired::Plan::new(&service("greeter"), &Default::default()).unwrap();
        let before = crate::desired::desired(&plan, std::slice::from_ref(&pod)).unwrap();
        strip_pod(&mut pod);
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert_eq!(crate::desired::desired(&plan, &[pod]).unwrap(), before);
    }

    fn stores(
        services: &[GrpcService],
        pods: &[Pod],
    ) -> (
        Store<GrpcService>,
        Store<Pod>,
        kube::runtime::reflector::store::Writer<Pod>,
    ) {
        let (svc_reader, mut svc_writer) = store();
        for s in services {
            svc_writer.apply_watcher_event(&Event::Apply(s.clone()));
        }
        let (pod_reader, mut pod_writer) = store();
        for p in pods {
            pod_writer.apply_watcher_event(&Event::Apply(p.clone()));
        }
        (svc_reader, pod_reader, pod_writer)
    }

    #[test]
    fn pod_event_reaches_only_the_services_whose_selector_matches() {
        let mut other = service("other");
        other.spec.selector.match_labels = Some([("app".to_owned(), "other".to_owned())].into());
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (svcs, pods, _w) = stores(&[service("greeter"), other], std::slice::from_ref(&pod));
        let mapper = PodMapper::new(svcs, pods);
        assert_eq!(
            mapper.map(&pod),
            [ObjectRef::new("greeter").within("default")]
        );
    }

    #[test]
    fn pod_relabelled_out_of_a_selector_still_wakes_the_service_it_left() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (svcs, pods, mut writer) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        let mapper = PodMapper::new(svcs, pods);
        assert_eq!(mapper.map(&pod).len(), 1);
        let moved = PodBuilder::ready("p1", "10.0.0.1")
            .label("app", "elsewhere")
            .build();
        writer.apply_watcher_event(&Event::Apply(moved.clone()));
        assert_eq!(
            mapper.map(&moved),
            [ObjectRef::new("greeter").within("default")]
        );
        assert!(mapper.map(&moved).is_empty(), "woken once, then forgotten");
    }

    #[test]
    fn deleted_pod_wakes_its_services_and_is_forgotten() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (svcs, pods, mut writer) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        let mapper = PodMapper::new(svcs, pods);
        mapper.map(&pod);
        writer.apply_watcher_event(&Event::Delete(pod.clone()));
        assert_eq!(mapper.map(&pod).len(), 1);
        assert!(mapper.matched.lock().unwrap().is_empty());
    }

    #[test]
    fn pod_in_another_namespace_wakes_nothing() {
        let pod = PodBuilder::ready("p1", "10.0.0.1")
            .namespace("prod")
            .build();
        let (svcs, pods, _w) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        assert!(PodMapper::new(svcs, pods).map(&pod).is_empty());
    }
}
