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

/// service -> (generation, parsed selector).
type Selectors = Arc<Mutex<HashMap<ObjectRef<GrpcService>, (Option<i64>, Option<Selector>)>>>;

/// Which pods each service's last reconcile selected, and the reverse.
///
/// The reconciler records its selection; the pod mapper reads it, so a pod that leaves a
/// selector (relabelled or deleted) wakes the service that registered it, however its earlier
/// events were ordered against the service's own.
#[derive(Clone, Default)]
pub struct Selections(Arc<Mutex<SelectionIndex>>);

#[derive(Default)]
struct SelectionIndex {
    by_pod: HashMap<ObjectRef<Pod>, HashSet<ObjectRef<GrpcService>>>,
    by_service: HashMap<ObjectRef<GrpcService>, HashSet<ObjectRef<Pod>>>,
}

impl Selections {
    /// Records the pods `service` selected in its latest reconcile (empty when it is gone).
    pub fn record(
        &self,
        service: ObjectRef<GrpcService>,
        pods: impl IntoIterator<Item = ObjectRef<Pod>>,
    ) {
        let pods: HashSet<ObjectRef<Pod>> = pods.into_iter().collect();
        let mut index = self.0.lock().expect("lock");
        let previous = index.by_service.remove(&service).unwrap_or_default();
        for pod in previous.difference(&pods) {
            if let Some(services) = index.by_pod.get_mut(pod) {
                services.remove(&service);
                if services.is_empty() {
                    index.by_pod.remove(pod);
                }
            }
        }
        for pod in &pods {
            index
                .by_pod
                .entry(pod.clone())
                .or_default()
                .insert(service.clone());
        }
        if !pods.is_empty() {
            index.by_service.insert(service, pods);
        }
    }

    /// The services whose last reconcile selected `pod`.
    #[must_use]
    pub fn services_of(&self, pod: &ObjectRef<Pod>) -> Vec<ObjectRef<GrpcService>> {
        self.0
            .lock()
            .expect("lock")
            .by_pod
            .get(pod)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        let index = self.0.lock().expect("lock");
        index.by_pod.is_empty() && index.by_service.is_empty()
    }
}

/// Maps pod events to the GrpcServices they concern, and only those: the services whose
/// selector matches the pod now, plus those whose last reconcile selected it.
#[derive(Clone)]
pub struct PodMapper {
    services: Store<GrpcService>,
    pods: Store<Pod>,
    selections: Selections,
    /// Parsed selectors, by service and generation, so a pod event parses none.
    selectors: Selectors,
}

impl PodMapper {
    /// A mapper over the service and pod stores and the reconciler's selections.
    #[must_use]
    pub fn new(services: Store<GrpcService>, pods: Store<Pod>, selections: Selections) -> Self {
        Self {
            services,
            pods,
            selections,
            selectors: Arc::default(),
        }
    }

    /// The services a pod event concerns.
    pub fn map(&self, pod: &Pod) -> Vec<ObjectRef<GrpcService>> {
        let pod_ref = ObjectRef::from_obj(pod);
        let namespace = pod.namespace();
        let mut wake: HashSet<ObjectRef<GrpcService>> =
            self.selections.services_of(&pod_ref).into_iter().collect();
        if self.pods.get(&pod_ref).is_some() {
            let mut selectors = self.selectors.lock().expect("lock");
            wake.extend(
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
                    .map(|svc| ObjectRef::from_obj(svc.as_ref())),
            );
        }
        wake.into_iter().collect()
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
        let mapper = PodMapper::new(svcs, pods, Selections::default());
        assert_eq!(
            mapper.map(&pod),
            [ObjectRef::new("greeter").within("default")]
        );
    }

    #[test]
    fn pod_relabelled_out_of_a_selector_wakes_the_service_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (svcs, pods, mut writer) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        let selections = Selections::default();
        let mapper = PodMapper::new(svcs, pods, selections.clone());
        let greeter = ObjectRef::new("greeter").within("default");
        // The reconciler selected the pod before any pod event was mapped.
        selections.record(greeter.clone(), [ObjectRef::from_obj(&pod)]);
        let moved = PodBuilder::ready("p1", "10.0.0.1")
            .label("app", "elsewhere")
            .build();
        writer.apply_watcher_event(&Event::Apply(moved.clone()));
        assert_eq!(mapper.map(&moved), std::slice::from_ref(&greeter));
        // Its next reconcile no longer selects the pod: later events wake nobody.
        selections.record(greeter, []);
        assert!(mapper.map(&moved).is_empty());
        assert!(selections.is_empty(), "nothing retained");
    }

    #[test]
    fn deleted_pod_wakes_the_services_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (svcs, pods, mut writer) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        let selections = Selections::default();
        let mapper = PodMapper::new(svcs, pods, selections.clone());
        selections.record(
            ObjectRef::new("greeter").within("default"),
            [ObjectRef::from_obj(&pod)],
        );
        writer.apply_watcher_event(&Event::Delete(pod.clone()));
        assert_eq!(mapper.map(&pod).len(), 1);
    }

    #[test]
    fn pod_in_another_namespace_wakes_nothing() {
        let pod = PodBuilder::ready("p1", "10.0.0.1")
            .namespace("prod")
            .build();
        let (svcs, pods, _w) = stores(&[service("greeter")], std::slice::from_ref(&pod));
        assert!(
            PodMapper::new(svcs, pods, Selections::default())
                .map(&pod)
                .is_empty()
        );
    }
}
