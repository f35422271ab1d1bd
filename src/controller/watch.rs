//! The watches that feed the indexes, and which services a pod or EndpointSlice event wakes.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::Selector;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

use crate::crd::GrpcService;
use crate::source::index::{CandidateIndex, ServicesBySelector, ServicesByRef, SliceIndex};
use crate::source::{Candidate, pod, slice};

/// Which objects (pods, or EndpointSlices) each service's last reconcile read, and the reverse.
///
/// The reconciler records its selection; the mapper reads it, so an object that leaves a
/// service's source (a pod relabelled or deleted, a slice relabelled to another Service or
/// deleted) wakes the service that read it, however its earlier events were ordered against
/// the service's own.
pub struct Selections<K: Resource<DynamicType = ()>>(Arc<Mutex<SelectionIndex<K>>>);

impl<K: Resource<DynamicType = ()>> Clone for Selections<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Resource<DynamicType = ()>> Default for Selections<K> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(SelectionIndex {
            by_object: HashMap::new(),
            by_service: HashMap::new(),
        })))
    }
}

struct SelectionIndex<K: Resource<DynamicType = ()>> {
    by_object: HashMap<ObjectRef<K>, HashSet<ObjectRef<GrpcService>>>,
    by_service: HashMap<ObjectRef<GrpcService>, HashSet<ObjectRef<K>>>,
}

impl<K: Resource<DynamicType = ()>> Selections<K>
where
    ObjectRef<K>: Hash + Eq,
{
    /// Records the objects `service` read in its latest reconcile (none when it is gone).
    pub fn record(
        &self,
        service: ObjectRef<GrpcService>,
        objects: impl IntoIterator<Item = ObjectRef<K>>,
    ) {
        let objects: HashSet<ObjectRef<K>> = objects.into_iter().collect();
        let mut index = self.0.lock().expect("lock");
        let previous = index.by_service.remove(&service).unwrap_or_default();
        for object in previous.difference(&objects) {
            if let Some(services) = index.by_object.get_mut(object) {
                services.remove(&service);
                if services.is_empty() {
                    index.by_object.remove(object);
                }
            }
        }
        for object in objects.difference(&previous) {
            index
                .by_object
                .entry(object.clone())
                .or_default()
                .insert(service.clone());
        }
        if !objects.is_empty() {
            index.by_service.insert(service, objects);
        }
    }

    /// The services whose last reconcile read `object`.
    #[must_use]
    pub fn services_of(&self, object: &ObjectRef<K>) -> Vec<ObjectRef<GrpcService>> {
        self.0
            .lock()
            .expect("lock")
            .by_object
            .get(object)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        let index = self.0.lock().expect("lock");
        index.by_object.is_empty() && index.by_service.is_empty()
    }
}

/// The pod in `namespace` named `id`, as the selections know it.
#[must_use]
pub fn pod_ref(namespace: &str, id: &str) -> ObjectRef<Pod> {
    ObjectRef::new(id).within(namespace)
}

/// The EndpointSlice in `namespace` named `name`, as the selections know it.
#[must_use]
pub fn slice_ref(namespace: &str, name: &str) -> ObjectRef<EndpointSlice> {
    ObjectRef::new(name).within(namespace)
}

/// Maps pod events to the GrpcServices they concern, and only those: the services whose
/// selector matches the pod now (found through the selector index), plus those whose last
/// reconcile selected it.
#[derive(Clone)]
pub struct PodMapper {
    candidates: CandidateIndex,
    selectors: ServicesBySelector,
    selections: Selections<Pod>,
}

impl PodMapper {
    /// A mapper over the indexes and the reconciler's selections.
    #[must_use]
    pub fn new(
        candidates: CandidateIndex,
        selectors: ServicesBySelector,
        selections: Selections<Pod>,
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

/// Maps EndpointSlice events to the GrpcServices they concern: those whose `serviceRef` names
/// the slice's Service, plus those whose last reconcile read the slice (it may have moved to
/// another Service, or be gone).
#[derive(Clone)]
pub struct SliceMapper {
    refs: ServicesByRef,
    selections: Selections<EndpointSlice>,
}

impl SliceMapper {
    /// A mapper over the reference index and the reconciler's selections.
    #[must_use]
    pub fn new(refs: ServicesByRef, selections: Selections<EndpointSlice>) -> Self {
        Self { refs, selections }
    }

    /// The services a slice event concerns.
    pub fn map(&self, slice: &EndpointSlice) -> Vec<ObjectRef<GrpcService>> {
        let namespace = slice.namespace().unwrap_or_default();
        let mut wake: HashSet<ObjectRef<GrpcService>> = self
            .selections
            .services_of(&slice_ref(&namespace, &slice.name_any()))
            .into_iter()
            .collect();
        if let Some(service) = slice::service_name(slice) {
            wake.extend(
                self.refs
                    .referencing(&namespace, service)
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

/// One listed slice: namespace, name, Service, endpoints.
type ListedSlice = (String, String, Option<String>, Vec<Candidate>);

/// Applies EndpointSlice watch events to the slice index, decoding each slice once; a re-list
/// is buffered and swapped in whole at `InitDone`. Returns true on `InitDone`.
pub struct SliceFeed {
    index: SliceIndex,
    relist: Option<Vec<ListedSlice>>,
}

impl SliceFeed {
    /// A feed into `index`.
    #[must_use]
    pub fn new(index: SliceIndex) -> Self {
        Self {
            index,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<EndpointSlice>) -> bool {
        match event {
            Event::Apply(s) => self.index.apply(
                &s.namespace().unwrap_or_default(),
                &s.name_any(),
                slice::service_name(s),
                slice::candidates(s),
            ),
            Event::Delete(s) => self
                .index
                .delete(&s.namespace().unwrap_or_default(), &s.name_any()),
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(s) => self.relist.get_or_insert_default().push((
                s.namespace().unwrap_or_default(),
                s.name_any(),
                slice::service_name(s).map(str::to_owned),
                slice::candidates(s),
            )),
            Event::InitDone => {
                self.index.reset(self.relist.take().unwrap_or_default());
                return true;
            }
        }
        false
    }
}

/// Applies GrpcService watch events to the selector and reference indexes (a re-list drops
/// services not seen again). Returns true on `InitDone`.
pub struct ServiceFeed {
    selectors: ServicesBySelector,
    refs: ServicesByRef,
    relist: Option<HashSet<(String, String)>>,
}

impl ServiceFeed {
    /// A feed into both indexes.
    #[must_use]
    pub fn new(selectors: ServicesBySelector, refs: ServicesByRef) -> Self {
        Self {
            selectors,
            refs,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<GrpcService>) -> bool {
        match event {
            Event::Apply(svc) => self.index_service(svc),
            Event::Delete(svc) => {
                let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
                self.selectors.delete(&namespace, &name);
                self.refs.delete(&namespace, &name);
            }
            Event::Init => self.relist = Some(HashSet::new()),
            Event::InitApply(svc) => {
                self.index_service(svc);
                self.relist
                    .get_or_insert_default()
                    .insert((svc.namespace().unwrap_or_default(), svc.name_any()));
            }
            Event::InitDone => {
                let live = self.relist.take().unwrap_or_default();
                self.selectors.retain(&live);
                self.refs.retain(&live);
                return true;
            }
        }
        false
    }

    fn index_service(&self, svc: &GrpcService) {
        let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        self.selectors.apply(
            &namespace,
            &name,
            (svc.uid(), svc.metadata.generation),
            || {
                Selector::try_from(svc.spec.selector.clone()?)
                    .ok()
                    .filter(|s| !s.selects_all())
            },
        );
        self.refs.apply(
            &namespace,
            &name,
            svc.spec.service_ref.as_ref().map(|r| r.name.as_str()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PodBuilder, service};

    fn mapper(services: &[GrpcService], pods: &[Pod]) -> (PodMapper, Selections<Pod>, PodFeed) {
        let (candidates, selectors) = (CandidateIndex::default(), ServicesBySelector::default());
        let mut svc_feed = ServiceFeed::new(selectors.clone(), ServicesByRef::default());
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
        other.spec.selector.as_mut().unwrap().match_labels =
            Some([("app".to_owned(), "other".to_owned())].into());
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

    fn slice_mapper(services: &[GrpcService]) -> (SliceMapper, Selections<EndpointSlice>) {
        let refs = ServicesByRef::default();
        let mut svc_feed = ServiceFeed::new(ServicesBySelector::default(), refs.clone());
        for s in services {
            svc_feed.apply(&Event::Apply(s.clone()));
        }
        let selections = Selections::default();
        (SliceMapper::new(refs, selections.clone()), selections)
    }

    #[test]
    fn a_slice_event_reaches_only_the_services_naming_its_service() {
        use crate::fixtures::{endpoint_slice, service_ref};
        let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051);
        let (mapper, _) = slice_mapper(&[
            service_ref("greeter-grpc", "greeter", port.clone()),
            service_ref("other-grpc", "other", port),
            service("by-selector"),
        ]);
        let slice = endpoint_slice("greeter-abc", "greeter", &[("10.0.0.1", true, None)]);
        assert_eq!(
            mapper.map(&slice),
            [ObjectRef::new("greeter-grpc").within("default")]
        );
    }

    #[test]
    fn a_slice_relabelled_away_or_deleted_wakes_the_service_that_read_it() {
        use crate::fixtures::{endpoint_slice, service_ref};
        let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051);
        let (mapper, selections) = slice_mapper(&[service_ref("greeter-grpc", "greeter", port)]);
        let greeter = ObjectRef::new("greeter-grpc").within("default");
        selections.record(greeter.clone(), [slice_ref("default", "hand-made")]);
        let moved = endpoint_slice("hand-made", "elsewhere", &[("10.0.0.1", true, None)]);
        assert_eq!(mapper.map(&moved), std::slice::from_ref(&greeter));
        selections.record(greeter, []);
        assert!(mapper.map(&moved).is_empty());
        assert!(selections.is_empty());
    }

    #[test]
    fn a_slice_relist_swaps_the_endpoints_in_whole_at_init_done() {
        use crate::fixtures::endpoint_slice;
        let index = SliceIndex::default();
        let mut feed = SliceFeed::new(index.clone());
        feed.apply(&Event::Apply(endpoint_slice(
            "gone",
            "svc",
            &[("10.0.0.1", true, None)],
        )));
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(endpoint_slice(
            "new",
            "svc",
            &[("10.0.0.2", true, None)],
        )));
        assert_eq!(
            index.select("default", "svc").slices,
            ["gone"],
            "old view until InitDone"
        );
        assert!(feed.apply(&Event::InitDone));
        assert_eq!(index.select("default", "svc").slices, ["new"]);
        feed.apply(&Event::Delete(endpoint_slice("new", "svc", &[])));
        assert!(index.is_empty());
    }
}
