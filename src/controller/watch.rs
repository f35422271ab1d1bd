//! Which services an object event wakes: the reconciler's record of what each service read,
//! the one mapper for every source, and the GrpcService feed into the sources' service indexes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::crd::GrpcService;
use crate::source::{Membership, Selects, Source};

/// An object of one source: its namespace and name.
type ObjectKey = (String, String);

/// Which objects of one source each service's last reconcile read, and the reverse.
///
/// The reconciler records its selection; the mapper reads it, so an object that leaves a
/// service's source (a pod relabelled or deleted, a slice relabelled to another Service or
/// deleted) wakes the service that read it, however its earlier events were ordered against
/// the service's own.
#[derive(Clone, Default)]
pub struct Selections(Arc<Mutex<SelectionIndex>>);

#[derive(Default)]
struct SelectionIndex {
    by_object: HashMap<ObjectKey, HashSet<ObjectRef<GrpcService>>>,
    by_service: HashMap<ObjectRef<GrpcService>, Read>,
}

/// The objects one service read: all in one namespace.
#[derive(Default)]
struct Read {
    namespace: String,
    names: HashSet<String>,
    /// The token of the selection they were read from, when the source gave one.
    membership: Option<Membership>,
}

impl Selections {
    /// Records the objects (by name, in `namespace`) `service` read in its latest reconcile
    /// (none when it is gone).
    pub fn record<S: AsRef<str>>(
        &self,
        service: ObjectRef<GrpcService>,
        namespace: &str,
        objects: &[S],
    ) {
        self.record_selected(service, namespace, None, || objects);
    }

    /// [`Self::record`] of the objects of a selection whose token is `membership`: the same
    /// token as last time (a readiness flip) reads no object name at all; else `objects` is
    /// called for them.
    pub fn record_selected<S: AsRef<str>, O: AsRef<[S]>>(
        &self,
        service: ObjectRef<GrpcService>,
        namespace: &str,
        membership: Option<Membership>,
        objects: impl FnOnce() -> O,
    ) {
        let mut index = self.0.lock().expect("lock");
        if membership.is_some()
            && let Some(read) = index.by_service.get(&service)
            && read.membership == membership
            && read.namespace == namespace
        {
            return;
        }
        let objects = objects();
        let objects = objects.as_ref();
        // The same objects as last time: nothing to change, nothing copied.
        if let Some(read) = index.by_service.get_mut(&service)
            && read.namespace == namespace
            && read.names.len() == objects.len()
            && objects
                .iter()
                .all(|name| read.names.contains(name.as_ref()))
        {
            read.membership = membership;
            return;
        }
        let names: HashSet<String> = objects
            .iter()
            .map(|name| name.as_ref().to_owned())
            .collect();
        let previous = index.by_service.remove(&service).unwrap_or_default();
        let same_namespace = previous.namespace == namespace;
        for name in &previous.names {
            if same_namespace && names.contains(name) {
                continue;
            }
            let object = (previous.namespace.clone(), name.clone());
            if let Some(services) = index.by_object.get_mut(&object) {
                services.remove(&service);
                if services.is_empty() {
                    index.by_object.remove(&object);
                }
            }
        }
        for name in &names {
            if same_namespace && previous.names.contains(name) {
                continue;
            }
            index
                .by_object
                .entry((namespace.to_owned(), name.clone()))
                .or_default()
                .insert(service.clone());
        }
        if !names.is_empty() {
            let read = Read {
                namespace: namespace.to_owned(),
                names,
                membership,
            };
            index.by_service.insert(service, read);
        }
    }

    /// Forgets what `service` read.
    pub fn forget(&self, service: ObjectRef<GrpcService>) {
        self.record::<&str>(service, "", &[]);
    }

    /// The services whose last reconcile read the object `name` in `namespace`.
    #[must_use]
    pub fn services_of(&self, namespace: &str, name: &str) -> Vec<ObjectRef<GrpcService>> {
        self.0
            .lock()
            .expect("lock")
            .by_object
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether nothing is recorded.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        let index = self.0.lock().expect("lock");
        index.by_object.is_empty() && index.by_service.is_empty()
    }
}

/// Maps one source's object events to the GrpcServices they concern, and only those: the
/// services whose selection matches the object now (found through the source's service
/// index), plus those whose last reconcile read it (it may have moved out, or be gone).
#[derive(Clone)]
pub struct Mapper<S> {
    source: S,
    selections: Selections,
}

impl<S: Source> Mapper<S> {
    /// A mapper over the source's indexes and the reconciler's selections of it.
    #[must_use]
    pub fn new(source: S, selections: Selections) -> Self {
        Self { source, selections }
    }

    /// The services an event of `object` concerns.
    pub fn map(&self, object: &S::Object) -> Vec<ObjectRef<GrpcService>> {
        let namespace = object.namespace().unwrap_or_default();
        let mut wake: HashSet<ObjectRef<GrpcService>> = self
            .selections
            .services_of(&namespace, &object.name_any())
            .into_iter()
            .collect();
        wake.extend(
            self.source
                .selecting(&namespace, object)
                .into_iter()
                .map(|svc| ObjectRef::new(&svc).within(&namespace)),
        );
        wake.into_iter().collect()
    }
}

/// Applies GrpcService watch events to every source's service index (a re-list drops
/// services not seen again). Returns true on `InitDone`.
pub struct ServiceFeed {
    sources: Vec<Arc<dyn Selects>>,
    relist: Option<HashSet<(String, String)>>,
}

impl ServiceFeed {
    /// A feed into the sources' service indexes.
    #[must_use]
    pub fn new(sources: Vec<Arc<dyn Selects>>) -> Self {
        Self {
            sources,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<GrpcService>) -> bool {
        match event {
            Event::Apply(svc) => self.index_service(svc),
            Event::Delete(svc) => {
                let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
                for source in &self.sources {
                    source.forget_service(&namespace, &name);
                }
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
                for source in &self.sources {
                    source.retain_services(&live);
                }
                return true;
            }
        }
        false
    }

    fn index_service(&self, svc: &GrpcService) {
        for source in &self.sources {
            source.index_service(svc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PodBuilder, service};
    use crate::source::feed::Feed;
    use crate::source::pod::PodObject;
    use crate::source::pod::PodSource;
    use crate::source::slice::SliceSource;

    fn feed_services<S: Source>(source: &S, services: &[GrpcService]) {
        let mut svc_feed = ServiceFeed::new(vec![Arc::new(source.clone())]);
        for s in services {
            svc_feed.apply(&Event::Apply(s.clone()));
        }
    }

    fn mapper(
        services: &[GrpcService],
        pods: &[PodObject],
    ) -> (Mapper<PodSource>, Selections, Feed<PodSource>) {
        let source = PodSource::default();
        feed_services(&source, services);
        let mut pod_feed = Feed::new(source.clone());
        for p in pods {
            pod_feed.apply(&Event::Apply(p.clone()));
        }
        let selections = Selections::default();
        (
            Mapper::new(source, selections.clone()),
            selections,
            pod_feed,
        )
    }

    #[test]
    fn a_selection_with_the_same_token_reads_no_object_and_another_token_reads_them_all() {
        let selections = Selections::default();
        let svc = ObjectRef::<GrpcService>::new("greeter").within("a");
        let token = |version| {
            Some(Membership {
                selection: 7,
                version,
            })
        };
        let read = std::cell::Cell::new(0);
        let record = |ns: &str, membership, names: &[&str]| {
            selections.record_selected(svc.clone(), ns, membership, || {
                read.set(read.get() + 1);
                names.to_vec()
            });
        };
        record("a", token(0), &["p1", "p2"]);
        record("a", token(0), &["p1", "p2"]);
        assert_eq!(read.get(), 1, "the same token: no name read");
        record("a", token(1), &["p1", "p3"]);
        assert_eq!(read.get(), 2);
        assert_eq!(selections.services_of("a", "p2").len(), 0);
        assert_eq!(selections.services_of("a", "p3").len(), 1);
        record("b", token(1), &["p1"]);
        assert_eq!(
            read.get(),
            3,
            "another namespace under the same token is read"
        );
        assert_eq!(selections.services_of("b", "p1").len(), 1);
        selections.forget(svc.clone());
        record("b", token(1), &["p1"]);
        assert_eq!(read.get(), 4, "a forgotten service is read afresh");
        record("b", None, &["p1"]);
        record("b", None, &["p1"]);
        assert_eq!(read.get(), 6, "no token: always read");
    }

    #[test]
    fn a_services_record_follows_what_it_read_last_in_any_namespace() {
        let selections = Selections::default();
        let svc = ObjectRef::<GrpcService>::new("greeter").within("a");
        let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let reads = |ns: &str, name: &str| selections.services_of(ns, name).len();
        selections.record(svc.clone(), "a", &names(&["p1", "p2"]));
        selections.record(svc.clone(), "a", &names(&["p2", "p1"]));
        assert_eq!((reads("a", "p1"), reads("a", "p2")), (1, 1), "a repeat");
        selections.record(svc.clone(), "a", &names(&["p2", "p3"]));
        assert_eq!(
            (reads("a", "p1"), reads("a", "p2"), reads("a", "p3")),
            (0, 1, 1)
        );
        selections.record(svc.clone(), "b", &names(&["p2"]));
        assert_eq!(
            (reads("a", "p2"), reads("a", "p3"), reads("b", "p2")),
            (0, 0, 1)
        );
        selections.forget(svc);
        assert!(selections.is_empty());
    }

    #[test]
    fn pod_event_reaches_only_the_services_whose_selector_matches() {
        let mut other = service("other");
        other.spec.selector.as_mut().unwrap().match_labels =
            Some([("app".to_owned(), "other".to_owned())].into());
        let pod = PodBuilder::ready("p1", "10.0.0.1").object();
        let (mapper, _, _) = mapper(&[service("greeter"), other], std::slice::from_ref(&pod));
        assert_eq!(
            mapper.map(&pod),
            [ObjectRef::new("greeter").within("default")]
        );
    }

    #[test]
    fn pod_relabelled_out_of_a_selector_wakes_the_service_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").object();
        let (mapper, selections, mut feed) =
            mapper(&[service("greeter")], std::slice::from_ref(&pod));
        let greeter = ObjectRef::new("greeter").within("default");
        // The reconciler selected the pod before any pod event was mapped.
        selections.record(greeter.clone(), "default", &[pod.name_any()]);
        let moved = PodBuilder::ready("p1", "10.0.0.1")
            .label("app", "elsewhere")
            .object();
        feed.apply(&Event::Apply(moved.clone()));
        assert_eq!(mapper.map(&moved), std::slice::from_ref(&greeter));
        // Its next reconcile no longer selects the pod: later events wake nobody.
        selections.record::<&str>(greeter, "default", &[]);
        assert!(mapper.map(&moved).is_empty());
        assert!(selections.is_empty(), "nothing retained");
    }

    #[test]
    fn deleted_pod_wakes_the_services_that_selected_it() {
        let pod = PodBuilder::ready("p1", "10.0.0.1").object();
        let (mapper, selections, mut feed) =
            mapper(&[service("greeter")], std::slice::from_ref(&pod));
        selections.record(
            ObjectRef::new("greeter").within("default"),
            "default",
            &[pod.name_any()],
        );
        feed.apply(&Event::Delete(pod.clone()));
        assert_eq!(mapper.map(&pod).len(), 1);
    }

    #[test]
    fn pod_in_another_namespace_wakes_nothing() {
        let pod = PodBuilder::ready("p1", "10.0.0.1")
            .namespace("prod")
            .object();
        let (mapper, _, _) = mapper(&[service("greeter")], std::slice::from_ref(&pod));
        assert!(mapper.map(&pod).is_empty());
    }

    fn slice_mapper(services: &[GrpcService]) -> (Mapper<SliceSource>, Selections) {
        let source = SliceSource::default();
        feed_services(&source, services);
        let selections = Selections::default();
        (Mapper::new(source, selections.clone()), selections)
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
        selections.record(greeter.clone(), "default", &["hand-made"]);
        let moved = endpoint_slice("hand-made", "elsewhere", &[("10.0.0.1", true, None)]);
        assert_eq!(mapper.map(&moved), std::slice::from_ref(&greeter));
        selections.record::<&str>(greeter, "default", &[]);
        assert!(mapper.map(&moved).is_empty());
        assert!(selections.is_empty());
    }

    #[test]
    fn a_grpcservice_relist_drops_from_every_source_the_services_not_listed_again() {
        let (pods, slices) = (PodSource::default(), SliceSource::default());
        let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051);
        let mut feed = ServiceFeed::new(vec![Arc::new(pods.clone()), Arc::new(slices.clone())]);
        feed.apply(&Event::Apply(service("gone")));
        feed.apply(&Event::Apply(crate::fixtures::service_ref(
            "gone-ref", "greeter", port,
        )));
        feed.apply(&Event::Init);
        assert!(feed.apply(&Event::InitDone));
        let labels = PodBuilder::ready("p1", "10.0.0.1")
            .object()
            .labels()
            .clone();
        assert!(pods.selectors.matching("default", &labels).is_empty());
        assert!(slices.refs.referencing("default", "greeter").is_empty());
    }
}
