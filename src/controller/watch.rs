//! The watches that feed the indexes, and which services a pod event wakes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::Selector;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::crd::GrpcService;
use crate::source::index::{CandidateIndex, SelectorIndex};
use crate::source::{Candidate, pod};

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
        for pod in pods.difference(&previous) {
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

/// The pod in `namespace` named `id`, as the selections know it.
#[must_use]
pub fn pod_ref(namespace: &str, id: &str) -> ObjectRef<Pod> {
    ObjectRef::new(id).within(namespace)
}

/// Maps pod events to the GrpcServices they concern, and only those: the services whose
/// selector matches the pod now (found through the selector index), plus those whose last
/// reconcile selected it.
#[derive(Clone)]
pub struct PodMapper {
    candidates: CandidateIndex,
    selectors: SelectorIndex,
    selections: Selections,
}

impl PodMapper {
    /// A mapper over the indexes and the reconciler's selections.
    #[must_use]
    pub fn new(
        candidates: CandidateIndex,
        selectors: SelectorIndex,
        selections: Selections,
    ) -> Self {
        Self {
            candidates,
            selectors,
            selections,
        }
    }

    /// The services a pod event concerns.
    pub fn map(&self, pod: &Pod) -> Vec<ObjectRef<GrpcService>> {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let mut wake: HashSet<ObjectRef<GrpcService>> = self
            .selections
            .services_of(&pod_ref(&namespace, &name))
            .into_iter()
            .collect();
        if self.candidates.get(&namespace, &name).is_some() {
            wake.extend(
                self.selectors
                    .matching(&namespace, pod.labels())
                    .into_iter()
                    .map(|svc| ObjectRef::new(&svc).within(&namespace)),
            );
        }
        wake.into_iter().collect()
    }
}

/// Applies pod watch events to the candidate index; a re-list is buffered and swapped in whole
/// at `InitDone`, as kube's reflector store does. Returns true on `InitDone`.
pub struct PodFeed {
    index: CandidateIndex,
    relist: Option<Vec<(String, Candidate)>>,
}

impl PodFeed {
    /// A feed into `index`.
    #[must_use]
    pub fn new(index: CandidateIndex) -> Self {
        Self {
            index,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<Pod>) -> bool {
        match event {
            Event::Apply(p) => {
                self.index
                    .apply(&p.namespace().unwrap_or_default(), pod::candidate(p));
            }
            Event::Delete(p) => {
                self.index
                    .delete(&p.namespace().unwrap_or_default(), &p.name_any());
            }
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(p) => self
                .relist
                .get_or_insert_default()
                .push((p.namespace().unwrap_or_default(), pod::candidate(p))),
            Event::InitDone => {
                self.index.reset(self.relist.take().unwrap_or_default());
                return true;
            }
        }
        false
    }
}

/// Applies GrpcService watch events to the selector index (a re-list drops services not seen
/// again). Returns true on `InitDone`.
pub struct ServiceFeed {
    index: SelectorIndex,
    relist: Option<HashSet<(String, String)>>,
}

impl ServiceFeed {
    /// A feed into `index`.
    #[must_use]
    pub fn new(index: SelectorIndex) -> Self {
        Self {
            index,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<GrpcService>) -> bool {
        match event {
            Event::Apply(svc) => self.index_service(svc),
            Event::Delete(svc) => self
                .index
                .delete(&svc.namespace().unwrap_or_default(), &svc.name_any()),
            Event::Init => self.relist = Some(HashSet::new()),
            Event::InitApply(svc) => {
                self.index_service(svc);
                self.relist
                    .get_or_insert_default()
                    .insert((svc.namespace().unwrap_or_default(), svc.name_any()));
            }
            Event::InitDone => {
                self.index.retain(&self.relist.take().unwrap_or_default());
                return true;
            }
        }
        false
    }

    fn index_service(&self, svc: &GrpcService) {
        self.index.apply(
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
            (svc.uid(), svc.metadata.generation),
            || {
                Selector::try_from(svc.spec.selector.clone())
                    .ok()
                    .filter(|s| !s.selects_all())
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PodBuilder, service};

    fn mapper(services: &[GrpcService], pods: &[Pod]) -> (PodMapper, Selections, PodFeed) {
        let (candidates, selectors) = (CandidateIndex::default(), SelectorIndex::default());
        let mut svc_feed = ServiceFeed::new(selectors.clone());
        for s in services {
            svc_feed.apply(&Event::Apply(s.clone()));
        }
        let mut pod_feed = PodFeed::new(candidates.clone());
        for p in pods {
            pod_feed.apply(&Event::Apply(p.clone()));
        }
        let selections = Selections::default();
        (
            PodMapper::new(candidates, selectors, selections.clone()),
            selections,
            pod_feed,
        )
    }

    #[test]
    fn pod_event_reaches_only_the_services_whose_selector_matches() {
        let mut other = service("other");
        other.spec.selector.match_labels = Some([("app".to_owned(), "other".to_owned())].into());
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (mapper, _, _) = mapper(&[service("greeter"), other], std::slice::from_ref(&pod));
        assert_eq!(
            mapper.map(&pod),
            [ObjectRef::new("greeter").within("default")]
        );
    }

    #[test]
    fn pod_relabelled_out_of_a_selector_wakes_the_service_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (mapper, selections, mut feed) =
            mapper(&[service("greeter")], std::slice::from_ref(&pod));
        let greeter = ObjectRef::new("greeter").within("default");
        // The reconciler selected the pod before any pod event was mapped.
        selections.record(greeter.clone(), [ObjectRef::from_obj(&pod)]);
        let moved = PodBuilder::ready("p1", "10.0.0.1")
            .label("app", "elsewhere")
            .build();
        feed.apply(&Event::Apply(moved.clone()));
        assert_eq!(mapper.map(&moved), std::slice::from_ref(&greeter));
        // Its next reconcile no longer selects the pod: later events wake nobody.
        selections.record(greeter, []);
        assert!(mapper.map(&moved).is_empty());
        assert!(selections.is_empty(), "nothing retained");
    }

    #[test]
    fn deleted_pod_wakes_the_services_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").build();
        let (mapper, selections, mut feed) =
            mapper(&[service("greeter")], std::slice::from_ref(&pod));
        selections.record(
            ObjectRef::new("greeter").within("default"),
            [ObjectRef::from_obj(&pod)],
        );
        feed.apply(&Event::Delete(pod.clone()));
        assert_eq!(mapper.map(&pod).len(), 1);
    }

    #[test]
    fn pod_in_another_namespace_wakes_nothing() {
        let pod = PodBuilder::ready("p1", "10.0.0.1")
            .namespace("prod")
            .build();
        let (mapper, _, _) = mapper(&[service("greeter")], std::slice::from_ref(&pod));
        assert!(mapper.map(&pod).is_empty());
    }

    #[test]
    fn a_relist_swaps_the_candidates_in_whole_at_init_done() {
        let (candidates, mut feed) = {
            let index = CandidateIndex::default();
            (index.clone(), PodFeed::new(index))
        };
        feed.apply(&Event::Apply(PodBuilder::ready("gone", "10.0.0.1").build()));
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(
            PodBuilder::ready("new", "10.0.0.2").build(),
        ));
        assert!(
            candidates.get("default", "gone").is_some(),
            "old view until InitDone"
        );
        assert!(feed.apply(&Event::InitDone));
        assert!(candidates.get("default", "gone").is_none());
        assert!(candidates.get("default", "new").is_some());
    }
}
