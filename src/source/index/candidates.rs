//! Candidates by namespace, id and label.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kube::core::{Selector, SelectorExt};

use super::{Postings, anchors};
use crate::source::{Candidate, Membership};

/// How many selectors' matches a namespace keeps up to date (a new one evicts the oldest when
/// full): each costs one label match per candidate event in the namespace.
const KEPT_SELECTIONS: usize = 16;

/// The candidates of one namespace.
#[derive(Debug, Default)]
struct NamespaceCandidates {
    by_id: HashMap<String, Arc<Candidate>>,
    labels: Postings,
    /// What selectors used before match, oldest first, kept up to date by every apply and
    /// delete: a reconcile of the same service matches no label again.
    selections: Mutex<Vec<Selection>>,
}

/// The candidates one selector matches, sorted by id.
#[derive(Debug)]
struct Selection {
    selector: Selector,
    matches: Vec<Arc<Candidate>>,
    /// This selection among all kept ones, and how often a candidate joined or left it.
    membership: Membership,
}

/// Numbers the kept selections of the process: a token never names two.
static SELECTIONS: AtomicU64 = AtomicU64::new(0);

impl Selection {
    /// Follows the candidate `id` (its new state, or `None`: deleted) in the matches.
    fn follow(&mut self, id: &str, candidate: Option<&Arc<Candidate>>) {
        let found = self.matches.binary_search_by(|c| c.id.as_str().cmp(id));
        match (
            found,
            candidate.filter(|c| self.selector.matches(&c.labels)),
        ) {
            (Ok(at), Some(c)) => self.matches[at] = c.clone(),
            (Ok(at), None) => {
                self.matches.remove(at);
                self.membership.version += 1;
            }
            (Err(at), Some(c)) => {
                self.matches.insert(at, c.clone());
                self.membership.version += 1;
            }
            (Err(_), None) => {}
        }
    }
}

impl NamespaceCandidates {
    /// Brings every kept selection up to date with the candidate `id`.
    fn follow(&mut self, id: &str) {
        let candidate = self.by_id.get(id);
        for selection in self.selections.get_mut().expect("lock") {
            selection.follow(id, candidate);
        }
    }
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
        let id = candidate.id.clone();
        insert(ns, candidate);
        ns.follow(&id);
    }

    /// Removes a candidate.
    pub fn delete(&self, namespace: &str, id: &str) {
        let mut by_ns = self.0.write().expect("lock");
        if let Some(ns) = by_ns.get_mut(namespace) {
            if let Some(old) = ns.by_id.remove(id) {
                ns.labels.remove(&old.labels, id);
                ns.follow(id);
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

    /// The candidates in `namespace` that `selector` matches. Sorted by id, so results are
    /// stable. What up to [`KEPT_SELECTIONS`] selectors used before match is kept up to date as
    /// candidates change, so that selecting again matches no label; else it is read through the smallest
    /// posting list among the selector's requirements (the whole namespace only when it has
    /// none an index can use, e.g. only `NotIn`).
    #[must_use]
    pub fn select(&self, namespace: &str, selector: &Selector) -> Vec<Arc<Candidate>> {
        self.select_kept(namespace, selector).0
    }

    /// [`Self::select`], with the kept selection's [`Membership`] (`None` when it was not kept).
    #[must_use]
    pub fn select_kept(
        &self,
        namespace: &str,
        selector: &Selector,
    ) -> (Vec<Arc<Candidate>>, Option<Membership>) {
        let by_ns = self.0.read().expect("lock");
        let Some(ns) = by_ns.get(namespace) else {
            return (Vec::new(), None);
        };
        let kept = |selections: &[Selection]| {
            selections
                .iter()
                .find(|kept| kept.selector == *selector)
                .map(|kept| (kept.matches.clone(), Some(kept.membership)))
        };
        if let Some(found) = kept(&ns.selections.lock().expect("lock")) {
            return found;
        }
        // Matched outside the selections' lock: the candidates cannot change while the
        // namespaces are read-locked, so another select of the same selector finds the same.
        let matches = matching(ns, selector);
        let mut selections = ns.selections.lock().expect("lock");
        if selections.iter().any(|kept| kept.selector == *selector) {
            return (matches, None);
        }
        if selections.len() >= KEPT_SELECTIONS {
            selections.remove(0);
        }
        let membership = Membership {
            selection: SELECTIONS.fetch_add(1, Ordering::Relaxed),
            version: 0,
        };
        selections.push(Selection {
            selector: selector.clone(),
            matches: matches.clone(),
            membership,
        });
        (matches, Some(membership))
    }

    /// How many selections `namespace` keeps up to date (for tests).
    #[cfg(test)]
    fn kept_selections(&self, namespace: &str) -> usize {
        self.0
            .read()
            .expect("lock")
            .get(namespace)
            .map_or(0, |ns| ns.selections.lock().expect("lock").len())
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

/// The candidates of `ns` that `selector` matches, read through the smallest posting list among
/// its requirements (every candidate only when it has none an index can use). Sorted by id.
fn matching(ns: &NamespaceCandidates, selector: &Selector) -> Vec<Arc<Candidate>> {
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

    #[test]
    fn a_kept_selection_follows_applies_relabels_and_deletes_as_a_fresh_one_would() {
        let index = CandidateIndex::default();
        let sel = selector(&[("app", "greeter")], &[]);
        index.apply("a", candidate("p2", &[("app", "greeter")]));
        assert_eq!(ids(&index.select("a", &sel)), ["p2"]);
        assert_eq!(index.kept_selections("a"), 1);
        index.apply("a", candidate("p1", &[("app", "greeter")]));
        index.apply("a", candidate("p3", &[("app", "other")]));
        assert_eq!(ids(&index.select("a", &sel)), ["p1", "p2"]);
        let mut ready = candidate("p2", &[("app", "greeter")]);
        ready.ready = true;
        index.apply("a", ready);
        assert!(
            index.select("a", &sel)[1].ready,
            "the new state, not the kept one"
        );
        index.apply("a", candidate("p3", &[("app", "greeter")]));
        index.apply("a", candidate("p1", &[("app", "other")]));
        assert_eq!(ids(&index.select("a", &sel)), ["p2", "p3"]);
        index.delete("a", "p2");
        assert_eq!(ids(&index.select("a", &sel)), ["p3"]);
        index.reset([("a".to_owned(), candidate("p4", &[("app", "greeter")]))]);
        assert_eq!(ids(&index.select("a", &sel)), ["p4"]);
    }

    #[test]
    fn a_kept_selections_token_changes_exactly_when_a_candidate_joins_or_leaves_it() {
        let index = CandidateIndex::default();
        let sel = selector(&[("app", "greeter")], &[]);
        index.apply("a", candidate("p1", &[("app", "greeter")]));
        let token = |index: &CandidateIndex| index.select_kept("a", &sel).1.expect("kept");
        let first = token(&index);
        let mut ready = candidate("p1", &[("app", "greeter")]);
        ready.ready = true;
        index.apply("a", ready);
        index.apply("a", candidate("elsewhere", &[("app", "other")]));
        assert_eq!(token(&index), first, "a flip and a non-member keep the set");
        let mut steps = vec![first];
        index.apply("a", candidate("p2", &[("app", "greeter")]));
        steps.push(token(&index));
        index.apply("a", candidate("p2", &[("app", "other")]));
        steps.push(token(&index));
        index.apply("a", candidate("elsewhere", &[("app", "greeter")]));
        steps.push(token(&index));
        index.delete("a", "p1");
        steps.push(token(&index));
        index.reset([(
            "a".to_owned(),
            candidate("elsewhere", &[("app", "greeter")]),
        )]);
        steps.push(token(&index));
        let distinct: std::collections::HashSet<_> = steps.iter().collect();
        assert_eq!(
            distinct.len(),
            steps.len(),
            "a join, a relabel out, a relabel in, a delete and a re-list each change it: {steps:?}"
        );
    }

    #[test]
    fn a_bounded_number_of_selections_is_kept_up_to_date_and_an_evicted_one_is_selected_afresh() {
        let index = CandidateIndex::default();
        index.apply("a", candidate("p1", &[("app", "x0")]));
        for i in 0..KEPT_SELECTIONS + 4 {
            let app = format!("x{i}");
            let _ = index.select("a", &selector(&[("app", app.as_str())], &[]));
        }
        assert_eq!(index.kept_selections("a"), KEPT_SELECTIONS);
        assert_eq!(
            ids(&index.select("a", &selector(&[("app", "x0")], &[]))),
            ["p1"]
        );
    }
}
