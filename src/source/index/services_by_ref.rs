//! GrpcServices by the Service their `spec.serviceRef` names.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use super::{ByName, retain_live};

/// The references of one namespace.
#[derive(Debug, Default)]
struct NamespaceRefs {
    /// GrpcService → the Service it names.
    refs: HashMap<String, String>,
    /// Service → the GrpcServices naming it.
    by_service: HashMap<String, HashSet<String>>,
}

impl NamespaceRefs {
    fn remove(&mut self, name: &str) {
        if let Some(service) = self.refs.remove(name)
            && let Some(names) = self.by_service.get_mut(&service)
        {
            names.remove(name);
            if names.is_empty() {
                self.by_service.remove(&service);
            }
        }
    }
}

impl ByName for NamespaceRefs {
    fn names(&self) -> Vec<String> {
        self.refs.keys().cloned().collect()
    }

    fn forget(&mut self, name: &str) {
        self.remove(name);
    }
}

/// GrpcServices by the Service their `serviceRef` names, so that an EndpointSlice event
/// reaches only those.
#[derive(Clone, Debug, Default)]
pub struct ServicesByRef(Arc<RwLock<HashMap<String, NamespaceRefs>>>);

impl ServicesByRef {
    /// Records that GrpcService `name` names `service` (`None`: it names none).
    pub fn apply(&self, namespace: &str, name: &str, service: Option<&str>) {
        let mut by_ns = self.0.write().expect("lock");
        let ns = by_ns.entry(namespace.to_owned()).or_default();
        if ns.refs.get(name).map(String::as_str) == service {
            return;
        }
        ns.remove(name);
        if let Some(service) = service {
            ns.refs.insert(name.to_owned(), service.to_owned());
            ns.by_service
                .entry(service.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
        if ns.refs.is_empty() {
            by_ns.remove(namespace);
        }
    }

    /// Forgets a GrpcService.
    pub fn delete(&self, namespace: &str, name: &str) {
        self.apply(namespace, name, None);
    }

    /// Keeps only the GrpcServices in `live` (after a re-list), by `(namespace, name)`.
    pub fn retain(&self, live: &HashSet<(String, String)>) {
        retain_live(&mut self.0.write().expect("lock"), live);
    }

    /// The GrpcServices in `namespace` that name `service`.
    #[must_use]
    pub fn referencing(&self, namespace: &str, service: &str) -> Vec<String> {
        self.0
            .read()
            .expect("lock")
            .get(namespace)
            .and_then(|ns| ns.by_service.get(service))
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_event_reaches_the_grpcservices_naming_its_service_in_its_namespace() {
        let index = ServicesByRef::default();
        index.apply("a", "greeter-grpc", Some("greeter"));
        index.apply("a", "greeter-canary", Some("greeter"));
        index.apply("b", "greeter-grpc", Some("greeter"));
        let mut found = index.referencing("a", "greeter");
        found.sort();
        assert_eq!(found, ["greeter-canary", "greeter-grpc"]);
        assert!(index.referencing("a", "other").is_empty());
        assert!(index.referencing("c", "greeter").is_empty());
    }

    #[test]
    fn a_changed_or_removed_reference_moves_or_leaves() {
        let index = ServicesByRef::default();
        index.apply("a", "svc", Some("old"));
        index.apply("a", "svc", Some("new"));
        assert!(index.referencing("a", "old").is_empty());
        assert_eq!(index.referencing("a", "new"), ["svc"]);
        index.apply("a", "svc", None);
        assert!(index.0.read().unwrap().is_empty());
        index.apply("a", "kept", Some("x"));
        index.apply("a", "gone", Some("x"));
        index.retain(&HashSet::from([("a".to_owned(), "kept".to_owned())]));
        assert_eq!(index.referencing("a", "x"), ["kept"]);
        index.delete("a", "kept");
        assert!(index.0.read().unwrap().is_empty());
    }
}
