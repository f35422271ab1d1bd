//! GrpcServices by their selectors, each posted under one of its requirements.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::core::{Selector, SelectorExt};

use super::{Anchor, ByName, Labels, anchors, retain_live};

/// One service's parsed selector.
#[derive(Debug)]
struct Indexed {
    /// The object (uid) and generation it was parsed from; either changing re-parses, so a
    /// service deleted and recreated under the same name is indexed afresh.
    version: (Option<String>, Option<i64>),
    /// The parsed selector.
    selector: Selector,
    /// Where it is posted.
    anchor: Option<Anchor>,
}

/// The services of one namespace, posted by one requirement each.
#[derive(Debug, Default)]
struct NamespaceSelectors {
    services: HashMap<String, Indexed>,
    by_pair: HashMap<(String, String), HashSet<String>>,
    by_key: HashMap<String, HashSet<String>>,
    /// Services whose selectors have no requirement an index can use.
    unanchored: HashSet<String>,
}

impl NamespaceSelectors {
    fn post(&mut self, name: &str, anchor: Option<&Anchor>, add: bool) {
        let edit = |set: &mut HashSet<String>| {
            if add {
                set.insert(name.to_owned());
            } else {
                set.remove(name);
            }
        };
        match anchor {
            Some(Anchor::Pairs(pairs)) => {
                for pair in pairs {
                    edit(self.by_pair.entry(pair.clone()).or_default());
                    if self.by_pair.get(pair).is_some_and(HashSet::is_empty) {
                        self.by_pair.remove(pair);
                    }
                }
            }
            Some(Anchor::Key(key)) => {
                edit(self.by_key.entry(key.clone()).or_default());
                if self.by_key.get(key).is_some_and(HashSet::is_empty) {
                    self.by_key.remove(key);
                }
            }
            None => edit(&mut self.unanchored),
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.services.remove(name) {
            self.post(name, old.anchor.as_ref(), false);
        }
    }
}

impl ByName for NamespaceSelectors {
    fn names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    fn forget(&mut self, name: &str) {
        self.remove(name);
    }
}

/// Each service's selector, parsed once per generation, posted under its most selective
/// requirement (an equality over an `In`, over an `Exists`).
#[derive(Clone, Debug, Default)]
pub struct ServicesBySelector(Arc<RwLock<HashMap<String, NamespaceSelectors>>>);

impl ServicesBySelector {
    /// Indexes `name`'s selector at `version` (the object's uid and generation); `None` (no
    /// selector, or one that does not parse) removes it. Cheap when the version is unchanged.
    pub fn apply(
        &self,
        namespace: &str,
        name: &str,
        version: (Option<String>, Option<i64>),
        selector: impl FnOnce() -> Option<Selector>,
    ) {
        let mut by_ns = self.0.write().expect("lock");
        let ns = by_ns.entry(namespace.to_owned()).or_default();
        if let Some(old) = ns.services.get(name)
            && old.version == version
            && version.1.is_some()
        {
            return;
        }
        ns.remove(name);
        if let Some(selector) = selector() {
            let mut candidates = anchors(&selector);
            // Single pairs first (the most selective), then `In` sets, then keys.
            candidates.sort_by_key(|a| match a {
                Anchor::Pairs(p) => p.len(),
                Anchor::Key(_) => usize::MAX,
            });
            let anchor = candidates.into_iter().next();
            ns.post(name, anchor.as_ref(), true);
            ns.services.insert(
                name.to_owned(),
                Indexed {
                    version,
                    selector,
                    anchor,
                },
            );
        }
        if ns.services.is_empty() {
            by_ns.remove(namespace);
        }
    }

    /// Forgets a service.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut by_ns = self.0.write().expect("lock");
        if let Some(ns) = by_ns.get_mut(namespace) {
            ns.remove(name);
            if ns.services.is_empty() {
                by_ns.remove(namespace);
            }
        }
    }

    /// Keeps only the services in `live` (after a re-list), by `(namespace, name)`.
    pub fn retain(&self, live: &HashSet<(String, String)>) {
        retain_live(&mut self.0.write().expect("lock"), live);
    }

    /// The services in `namespace` whose selector matches `labels`: only those posted under one
    /// of the labels (or with no usable requirement) are tested.
    #[must_use]
    pub fn matching(&self, namespace: &str, labels: &Labels) -> Vec<String> {
        let by_ns = self.0.read().expect("lock");
        let Some(ns) = by_ns.get(namespace) else {
            return Vec::new();
        };
        let mut names: HashSet<&String> = ns.unanchored.iter().collect();
        for (k, v) in labels {
            if let Some(set) = ns.by_pair.get(&(k.clone(), v.clone())) {
                names.extend(set);
            }
            if let Some(set) = ns.by_key.get(k) {
                names.extend(set);
            }
        }
        names
            .into_iter()
            .filter(|name| {
                ns.services
                    .get(*name)
                    .is_some_and(|s| s.selector.matches(labels))
            })
            .cloned()
            .collect()
    }

    /// How many services are indexed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0
            .read()
            .expect("lock")
            .values()
            .map(|ns| ns.services.len())
            .sum()
    }

    /// Whether none are.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn a_pod_reaches_only_the_services_posted_under_its_labels() {
        let index = ServicesBySelector::default();
        index.apply("a", "greeter", v(1), || {
            Some(selector(&[("app", "greeter")], &[]))
        });
        index.apply("a", "other", v(1), || {
            Some(selector(&[("app", "other")], &[]))
        });
        index.apply("a", "tiered", v(1), || {
            Some(selector(&[], &[("tier", "Exists", &[])]))
        });
        index.apply("a", "not-other", v(1), || {
            Some(selector(&[], &[("app", "NotIn", &["other"])]))
        });
        index.apply("b", "greeter", v(1), || {
            Some(selector(&[("app", "greeter")], &[]))
        });
        let mut found = index.matching("a", &labels(&[("app", "greeter"), ("tier", "be")]));
        found.sort();
        assert_eq!(found, ["greeter", "not-other", "tiered"]);
        assert!(
            index
                .matching("c", &labels(&[("app", "greeter")]))
                .is_empty()
        );
    }

    #[test]
    fn a_new_generation_reindexes_and_the_same_one_parses_nothing() {
        let index = ServicesBySelector::default();
        index.apply("a", "svc", v(1), || Some(selector(&[("app", "v1")], &[])));
        index.apply("a", "svc", v(1), || panic!("same generation parsed again"));
        index.apply("a", "svc", v(2), || Some(selector(&[("app", "v2")], &[])));
        assert!(index.matching("a", &labels(&[("app", "v1")])).is_empty());
        assert_eq!(index.matching("a", &labels(&[("app", "v2")])), ["svc"]);
        index.apply("a", "svc", v(3), || None);
        assert!(index.is_empty());
    }

    #[test]
    fn a_service_recreated_under_the_same_name_and_generation_is_indexed_afresh() {
        let index = ServicesBySelector::default();
        index.apply("a", "svc", v(1), || Some(selector(&[("app", "old")], &[])));
        index.apply("a", "svc", (Some("new-uid".into()), Some(1)), || {
            Some(selector(&[("app", "new")], &[]))
        });
        assert_eq!(index.matching("a", &labels(&[("app", "new")])), ["svc"]);
    }

    #[test]
    fn retain_drops_services_gone_in_a_relist() {
        let index = ServicesBySelector::default();
        index.apply("a", "kept", v(1), || Some(selector(&[("app", "x")], &[])));
        index.apply("a", "gone", v(1), || Some(selector(&[("app", "x")], &[])));
        index.retain(&HashSet::from([("a".to_owned(), "kept".to_owned())]));
        assert_eq!(index.matching("a", &labels(&[("app", "x")])), ["kept"]);
    }
}
