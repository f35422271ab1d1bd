//! Indexes fed by watch events, in the style of linkerd's policy index: each event costs what it
//! touches, and nothing scans every pod or every service.
//!
//! - [`CandidateIndex`]: candidates by namespace, id and label, so a reconcile reads only the
//!   candidates its selector can match.
//! - [`SelectorIndex`]: each service's selector, parsed once per generation and posted under one
//!   of its requirements, so a pod event reaches only the services that can match it.
//!
//! Both take `apply` / `delete` / `reset` (a re-list), and are cheap to clone (one shared
//! lock each).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::core::{Expression, Selector, SelectorExt};

use super::Candidate;

type Labels = std::collections::BTreeMap<String, String>;

/// The requirements of a selector that an index can look up, cheapest first.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Anchor {
    /// `key = value`, or `key in (values)`: a match has one of these pairs.
    Pairs(Vec<(String, String)>),
    /// `key` exists: a match has the key.
    Key(String),
}

/// Every requirement of `selector` an index can use, in selector order.
fn anchors(selector: &Selector) -> Vec<Anchor> {
    selector
        .clone()
        .into_iter()
        .filter_map(|e| match e {
            Expression::Equal(k, v) => Some(Anchor::Pairs(vec![(k, v)])),
            Expression::In(k, values) => Some(Anchor::Pairs(
                values.into_iter().map(|v| (k.clone(), v)).collect(),
            )),
            Expression::Exists(k) => Some(Anchor::Key(k)),
            _ => None,
        })
        .collect()
}

/// Label postings: key → value → ids.
#[derive(Debug, Default)]
struct Postings(HashMap<String, HashMap<String, HashSet<String>>>);

impl Postings {
    fn insert(&mut self, labels: &Labels, id: &str) {
        for (k, v) in labels {
            self.0
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(id.to_owned());
        }
    }

    fn remove(&mut self, labels: &Labels, id: &str) {
        for (k, v) in labels {
            let Some(values) = self.0.get_mut(k) else {
                continue;
            };
            if let Some(ids) = values.get_mut(v) {
                ids.remove(id);
                if ids.is_empty() {
                    values.remove(v);
                }
            }
            if values.is_empty() {
                self.0.remove(k);
            }
        }
    }

    /// The ids under an anchor, and how many there are.
    fn lookup(&self, anchor: &Anchor) -> (usize, Vec<&HashSet<String>>) {
        let sets: Vec<&HashSet<String>> = match anchor {
            Anchor::Pairs(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| self.0.get(k)?.get(v))
                .collect(),
            Anchor::Key(k) => self
                .0
                .get(k)
                .map(|vs| vs.values().collect())
                .unwrap_or_default(),
        };
        (sets.iter().map(|s| s.len()).sum(), sets)
    }
}

/// The candidates of one namespace.
#[derive(Debug, Default)]
struct NamespaceCandidates {
    by_id: HashMap<String, Arc<Candidate>>,
    labels: Postings,
}

/// Candidates by namespace, id and label.
#[derive(Clone, Debug, Default)]
pub struct CandidateIndex(Arc<RwLock<HashMap<String, NamespaceCandidates>>>);

impl CandidateIndex {
    /// Adds or replaces a candidate.
    pub fn apply(&self, namespace: &str, candidate: Candidate) {
        let mut by_ns = self.0.write().expect("lock");
        let ns = by_ns.entry(namespace.to_owned()).or_default();
        insert(ns, candidate);
    }

    /// Removes a candidate.
    pub fn delete(&self, namespace: &str, id: &str) {
        let mut by_ns = self.0.write().expect("lock");
        if let Some(ns) = by_ns.get_mut(namespace) {
            if let Some(old) = ns.by_id.remove(id) {
                ns.labels.remove(&old.labels, id);
            }
            if ns.by_id.is_empty() {
                by_ns.remove(namespace);
            }
        }
    }

    /// Replaces everything with a fresh listing (a watch re-list).
    pub fn reset(&self, candidates: impl IntoIterator<Item = (String, Candidate)>) {
        let mut fresh: HashMap<String, NamespaceCandidates> = HashMap::new();
        for (namespace, candidate) in candidates {
            insert(fresh.entry(namespace).or_default(), candidate);
        }
        *self.0.write().expect("lock") = fresh;
    }

    /// One candidate.
    #[must_use]
    pub fn get(&self, namespace: &str, id: &str) -> Option<Arc<Candidate>> {
        self.0
            .read()
            .expect("lock")
            .get(namespace)?
            .by_id
            .get(id)
            .cloned()
    }

    /// The candidates in `namespace` that `selector` matches, read through the smallest
    /// posting list among its requirements (the whole namespace only when it has none an index
    /// can use, e.g. only `NotIn`). Sorted by id, so results are stable.
    #[must_use]
    pub fn select(&self, namespace: &str, selector: &Selector) -> Vec<Arc<Candidate>> {
        let by_ns = self.0.read().expect("lock");
        let Some(ns) = by_ns.get(namespace) else {
            return Vec::new();
        };
        let best = anchors(selector)
            .iter()
            .map(|a| ns.labels.lookup(a))
            .min_by_key(|(n, _)| *n);
        let mut out: Vec<Arc<Candidate>> = match best {
            Some((_, sets)) => sets
                .into_iter()
                .flatten()
                .filter_map(|id| ns.by_id.get(id))
                .filter(|c| selector.matches(&c.labels))
                .cloned()
                .collect(),
            None => ns
                .by_id
                .values()
                .filter(|c| selector.matches(&c.labels))
                .cloned()
                .collect(),
        };
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        out
    }

    /// How many candidates there are in all namespaces.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0
            .read()
            .expect("lock")
            .values()
            .map(|ns| ns.by_id.len())
            .sum()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn insert(ns: &mut NamespaceCandidates, candidate: Candidate) {
    if let Some(old) = ns.by_id.get(&candidate.id) {
        if old.labels == candidate.labels {
            ns.by_id.insert(candidate.id.clone(), Arc::new(candidate));
            return;
        }
        let old = old.clone();
        ns.labels.remove(&old.labels, &old.id);
    }
    ns.labels.insert(&candidate.labels, &candidate.id);
    ns.by_id.insert(candidate.id.clone(), Arc::new(candidate));
}

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

/// Each service's selector, parsed once per generation, posted under its most selective
/// requirement (an equality over an `In`, over an `Exists`).
#[derive(Clone, Debug, Default)]
pub struct SelectorIndex(Arc<RwLock<HashMap<String, NamespaceSelectors>>>);

impl SelectorIndex {
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
        let mut by_ns = self.0.write().expect("lock");
        for (namespace, ns) in by_ns.iter_mut() {
            let gone: Vec<String> = ns
                .services
                .keys()
                .filter(|name| !live.contains(&(namespace.clone(), (*name).clone())))
                .cloned()
                .collect();
            for name in gone {
                ns.remove(&name);
            }
        }
        by_ns.retain(|_, ns| !ns.services.is_empty());
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
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn candidate(id: &str, pairs: &[(&str, &str)]) -> Candidate {
        Candidate {
            id: id.into(),
            labels: labels(pairs),
            ..Candidate::default()
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> Selector {
        Selector::try_from(LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then(|| {
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: (*k).into(),
                        operator: (*op).into(),
                        values: (!vs.is_empty())
                            .then(|| vs.iter().map(|v| (*v).to_owned()).collect()),
                    })
                    .collect()
            }),
        })
        .unwrap()
    }

    fn v(generation: i64) -> (Option<String>, Option<i64>) {
        (Some("uid".into()), Some(generation))
    }

    fn ids(found: &[Arc<Candidate>]) -> Vec<&str> {
        found.iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn select_reads_only_the_namespace_and_labels_the_selector_names() {
        let index = CandidateIndex::default();
        index.apply("a", candidate("p1", &[("app", "greeter"), ("tier", "be")]));
        index.apply("a", candidate("p2", &[("app", "greeter")]));
        index.apply("a", candidate("p3", &[("app", "other")]));
        index.apply("b", candidate("p4", &[("app", "greeter")]));
        let sel = selector(&[("app", "greeter")], &[]);
        assert_eq!(ids(&index.select("a", &sel)), ["p1", "p2"]);
        let both = selector(&[("app", "greeter"), ("tier", "be")], &[]);
        assert_eq!(ids(&index.select("a", &both)), ["p1"]);
        let exists = selector(&[], &[("tier", "Exists", &[])]);
        assert_eq!(ids(&index.select("a", &exists)), ["p1"]);
        let any_of = selector(&[], &[("app", "In", &["greeter", "other"])]);
        assert_eq!(ids(&index.select("a", &any_of)), ["p1", "p2", "p3"]);
        let not_in = selector(&[], &[("app", "NotIn", &["other"])]);
        assert_eq!(ids(&index.select("a", &not_in)), ["p1", "p2"]);
        assert!(index.select("c", &sel).is_empty());
    }

    #[test]
    fn a_relabelled_candidate_moves_between_postings_and_a_deleted_one_leaves() {
        let index = CandidateIndex::default();
        index.apply("a", candidate("p1", &[("app", "greeter")]));
        index.apply("a", candidate("p1", &[("app", "other")]));
        assert!(
            index
                .select("a", &selector(&[("app", "greeter")], &[]))
                .is_empty()
        );
        assert_eq!(
            ids(&index.select("a", &selector(&[("app", "other")], &[]))),
            ["p1"]
        );
        index.delete("a", "p1");
        assert!(index.is_empty());
        assert!(
            index.0.read().unwrap().is_empty(),
            "no empty namespace kept"
        );
    }

    #[test]
    fn reset_replaces_everything() {
        let index = CandidateIndex::default();
        index.apply("a", candidate("gone", &[("app", "greeter")]));
        index.reset([("a".to_owned(), candidate("new", &[("app", "greeter")]))]);
        assert_eq!(
            ids(&index.select("a", &selector(&[("app", "greeter")], &[]))),
            ["new"]
        );
        assert!(index.get("a", "gone").is_none());
    }

    #[test]
    fn a_pod_reaches_only_the_services_posted_under_its_labels() {
        let index = SelectorIndex::default();
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
        let index = SelectorIndex::default();
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
        let index = SelectorIndex::default();
        index.apply("a", "svc", v(1), || Some(selector(&[("app", "old")], &[])));
        index.apply("a", "svc", (Some("new-uid".into()), Some(1)), || {
            Some(selector(&[("app", "new")], &[]))
        });
        assert_eq!(index.matching("a", &labels(&[("app", "new")])), ["svc"]);
    }

    #[test]
    fn retain_drops_services_gone_in_a_relist() {
        let index = SelectorIndex::default();
        index.apply("a", "kept", v(1), || Some(selector(&[("app", "x")], &[])));
        index.apply("a", "gone", v(1), || Some(selector(&[("app", "x")], &[])));
        index.retain(&HashSet::from([("a".to_owned(), "kept".to_owned())]));
        assert_eq!(index.matching("a", &labels(&[("app", "x")])), ["kept"]);
    }
}
