//! Candidates by namespace, id and label.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::core::{Selector, SelectorExt};

use super::{Postings, anchors};
use crate::source::Candidate;

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
    /// Adds or replaces a candidate from a watch event, stamping when its registrable state
    /// was seen to change (the start of the propagation the metrics measure).
    pub fn apply(&self, namespace: &str, mut candidate: Candidate) {
        let mut by_ns = self.0.write().expect("lock");
        let ns = by_ns.entry(namespace.to_owned()).or_default();
        candidate.observed = match ns.by_id.get(&candidate.id) {
            Some(old) if old.same_registrable_state(&candidate) => old.observed,
            _ => Some(std::time::Instant::now()),
        };
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

    /// Replaces everything with a fresh listing (a watch re-list). A candidate whose state
    /// changed since the previous listing is stamped as seen now; one not known before is not
    /// (a list is not a transition).
    pub fn reset(&self, candidates: impl IntoIterator<Item = (String, Candidate)>) {
        let now = std::time::Instant::now();
        let mut by_ns = self.0.write().expect("lock");
        let mut fresh: HashMap<String, NamespaceCandidates> = HashMap::new();
        for (namespace, mut candidate) in candidates {
            candidate.observed = by_ns
                .get(&namespace)
                .and_then(|ns| ns.by_id.get(&candidate.id))
                .and_then(|old| {
                    if old.same_registrable_state(&candidate) {
                        old.observed
                    } else {
                        Some(now)
                    }
                });
            insert(fresh.entry(namespace).or_default(), candidate);
        }
        *by_ns = fresh;
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn a_candidate_is_stamped_when_its_registrable_state_changes_not_on_relabels_or_lists() {
        let index = CandidateIndex::default();
        index.reset([("a".to_owned(), candidate("p1", &[("app", "x")]))]);
        assert_eq!(
            index.get("a", "p1").unwrap().observed,
            None,
            "a list is no transition"
        );
        let mut c = candidate("p1", &[("app", "x")]);
        c.ready = !index.get("a", "p1").unwrap().ready;
        index.apply("a", c.clone());
        let stamped = index.get("a", "p1").unwrap().observed;
        assert!(stamped.is_some());
        c.labels.insert("tier".into(), "be".into());
        index.apply("a", c.clone());
        assert_eq!(
            index.get("a", "p1").unwrap().observed,
            stamped,
            "labels are not readiness"
        );
        index.reset([("a".to_owned(), c)]);
        assert_eq!(index.get("a", "p1").unwrap().observed, stamped);
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
}
