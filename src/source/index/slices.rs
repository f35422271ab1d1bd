//! Endpoints by Service, merged over its EndpointSlices.
//!
//! kuberesolver and go-zero replace the whole address set on each slice event, so a Service
//! spanning several slices keeps only the last slice's endpoints. Here each slice's endpoints
//! are kept apart and merged per endpoint id: a slice event changes what it lists and nothing
//! else, an endpoint listed by two slices during a rebalance counts once (its better copy), and
//! a Service whose last slice goes away has no endpoints (never stale ones).

use std::collections::HashMap;
#[cfg(test)]
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::source::{Candidate, slice};

/// One endpoint's copies: the slices listing it, each with its candidate.
type Copies = Vec<(String, Arc<Candidate>)>;

/// The endpoints of one Service.
#[derive(Debug, Default)]
struct ServiceEndpoints {
    /// The ids each slice lists.
    slices: HashMap<String, Vec<String>>,
    /// Each id's copies, one per slice listing it (one, except during a rebalance).
    copies: HashMap<String, Copies>,
}

impl ServiceEndpoints {
    /// The copy that stands for an id: registrable over ready over neither, then IPv4 over
    /// IPv6 (a dual-stack Service lists each pod in a slice per family: one family is
    /// published, the same one every time), then the first slice by name, so that the choice is
    /// stable.
    fn best(copies: &Copies) -> Option<&Arc<Candidate>> {
        let v4 = |c: &Candidate| c.ip.is_some_and(|ip| ip.is_ipv4());
        copies
            .iter()
            .reduce(|best, next| {
                let tie = !slice::better(&next.1, &best.1) && !slice::better(&best.1, &next.1);
                let next_wins = slice::better(&next.1, &best.1)
                    || (tie && (v4(&next.1), &best.0) > (v4(&best.1), &next.0));
                if next_wins { next } else { best }
            })
            .map(|(_, c)| c)
    }

    /// Replaces what `slice_name` lists with `candidates`. Each new copy is stamped `observed`
    /// as the endpoint it stands for was before: kept when its registrable state is unchanged,
    /// `now` when it changed, and `fresh` for an id not known before.
    fn set(
        &mut self,
        slice_name: &str,
        candidates: Vec<Candidate>,
        before: &dyn Fn(&str) -> Option<Arc<Candidate>>,
        now: Instant,
        fresh: Option<Instant>,
    ) {
        self.remove(slice_name);
        // One copy per id within a slice too (an address listed twice).
        let mut own: HashMap<String, Candidate> = HashMap::with_capacity(candidates.len());
        for candidate in candidates {
            match own.get(&candidate.id) {
                Some(kept) if !slice::better(&candidate, kept) => {}
                _ => {
                    own.insert(candidate.id.clone(), candidate);
                }
            }
        }
        let mut ids = Vec::with_capacity(own.len());
        for (id, mut candidate) in own {
            // An unchanged endpoint keeps when it was seen and triggered to change; a changed one
            // is seen now, triggered when its slice says.
            (candidate.observed, candidate.changed) = match before(&id) {
                Some(old) if old.same_registrable_state(&candidate) => (old.observed, old.changed),
                Some(_) => (Some(now), candidate.changed),
                None => (fresh, fresh.and(candidate.changed)),
            };
            self.copies
                .entry(id.clone())
                .or_default()
                .push((slice_name.to_owned(), Arc::new(candidate)));
            ids.push(id);
        }
        if !ids.is_empty() {
            self.slices.insert(slice_name.to_owned(), ids);
        }
    }

    /// Forgets what `slice_name` lists.
    fn remove(&mut self, slice_name: &str) {
        for id in self.slices.remove(slice_name).unwrap_or_default() {
            if let Some(copies) = self.copies.get_mut(&id) {
                copies.retain(|(s, _)| s != slice_name);
                if copies.is_empty() {
                    self.copies.remove(&id);
                }
            }
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Candidate>> {
        Self::best(self.copies.get(id)?).cloned()
    }

    fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
}

/// The slices of one namespace, by Service.
#[derive(Debug, Default)]
struct NamespaceSlices {
    services: HashMap<String, ServiceEndpoints>,
    /// The Service each slice was last seen to belong to.
    owner: HashMap<String, String>,
}

impl NamespaceSlices {
    fn remove(&mut self, slice_name: &str) {
        if let Some(service) = self.owner.remove(slice_name)
            && let Some(endpoints) = self.services.get_mut(&service)
        {
            endpoints.remove(slice_name);
            if endpoints.is_empty() {
                self.services.remove(&service);
            }
        }
    }
}

/// What a Service's slices list, merged.
#[derive(Debug, Default)]
pub struct ServiceSelection {
    /// One candidate per endpoint, sorted by id.
    pub candidates: Vec<Arc<Candidate>>,
    /// The slices read, so that a slice that later leaves the Service still wakes it.
    pub slices: Vec<String>,
}

/// Endpoints by namespace and Service, merged over the Service's slices.
#[derive(Clone, Debug, Default)]
pub struct SliceIndex(Arc<RwLock<HashMap<String, NamespaceSlices>>>);

impl SliceIndex {
    /// Adds or replaces a slice from a watch event: `service` is its
    /// `kubernetes.io/service-name` (a slice without one lists nothing). Endpoints whose
    /// registrable state changed (or that are new) are stamped as seen now.
    pub fn apply(
        &self,
        namespace: &str,
        slice_name: &str,
        service: Option<&str>,
        candidates: Vec<Candidate>,
    ) {
        let now = Instant::now();
        let mut by_ns = self.0.write().expect("lock");
        let ns = by_ns.entry(namespace.to_owned()).or_default();
        // Compare against the merged state before this slice changed, whatever Service it
        // belonged to.
        let before: HashMap<String, Arc<Candidate>> = service
            .and_then(|s| ns.services.get(s))
            .map(|endpoints| {
                candidates
                    .iter()
                    .filter_map(|c| Some((c.id.clone(), endpoints.get(&c.id)?)))
                    .collect()
            })
            .unwrap_or_default();
        ns.remove(slice_name);
        if let Some(service) = service {
            ns.owner.insert(slice_name.to_owned(), service.to_owned());
            ns.services.entry(service.to_owned()).or_default().set(
                slice_name,
                candidates,
                &|id| before.get(id).cloned(),
                now,
                Some(now),
            );
        }
        if ns.services.is_empty() && ns.owner.is_empty() {
            by_ns.remove(namespace);
        }
    }

    /// Removes a slice.
    pub fn delete(&self, namespace: &str, slice_name: &str) {
        let mut by_ns = self.0.write().expect("lock");
        if let Some(ns) = by_ns.get_mut(namespace) {
            ns.remove(slice_name);
            if ns.services.is_empty() && ns.owner.is_empty() {
                by_ns.remove(namespace);
            }
        }
    }

    /// Replaces everything with a fresh listing of `(namespace, slice, service, candidates)`
    /// (a watch re-list). An endpoint whose state changed since the previous listing is stamped
    /// as seen now; one not known before is not (a list is not a transition).
    pub fn reset(
        &self,
        slices: impl IntoIterator<Item = (String, String, Option<String>, Vec<Candidate>)>,
    ) {
        let now = Instant::now();
        let mut by_ns = self.0.write().expect("lock");
        let mut fresh: HashMap<String, NamespaceSlices> = HashMap::new();
        for (namespace, slice_name, service, candidates) in slices {
            let Some(service) = service else { continue };
            let old = by_ns
                .get(&namespace)
                .and_then(|ns| ns.services.get(&service));
            let ns = fresh.entry(namespace).or_default();
            ns.owner.insert(slice_name.clone(), service.clone());
            ns.services.entry(service).or_default().set(
                &slice_name,
                candidates,
                &|id| old.and_then(|o| o.get(id)),
                now,
                None,
            );
        }
        *by_ns = fresh;
    }

    /// The endpoints of `service` in `namespace`, one per id, and the slices they came from.
    #[must_use]
    pub fn select(&self, namespace: &str, service: &str) -> ServiceSelection {
        let by_ns = self.0.read().expect("lock");
        let Some(endpoints) = by_ns.get(namespace).and_then(|ns| ns.services.get(service)) else {
            return ServiceSelection::default();
        };
        let mut candidates: Vec<Arc<Candidate>> = endpoints
            .copies
            .values()
            .filter_map(|copies| ServiceEndpoints::best(copies).cloned())
            .collect();
        candidates.sort_by(|a, b| a.id.cmp(&b.id));
        let mut slices: Vec<String> = endpoints.slices.keys().cloned().collect();
        slices.sort();
        ServiceSelection { candidates, slices }
    }

    /// The Service a slice was last seen to belong to.
    #[must_use]
    pub fn service_of(&self, namespace: &str, slice_name: &str) -> Option<String> {
        self.0
            .read()
            .expect("lock")
            .get(namespace)?
            .owner
            .get(slice_name)
            .cloned()
    }

    /// How many endpoints there are, in all namespaces and Services.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0
            .read()
            .expect("lock")
            .values()
            .flat_map(|ns| ns.services.values())
            .map(|endpoints| endpoints.copies.len())
            .sum()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Services (by namespace) that have endpoints, for tests.
    #[cfg(test)]
    fn services(&self) -> HashSet<(String, String)> {
        self.0
            .read()
            .expect("lock")
            .iter()
            .flat_map(|(ns, slices)| slices.services.keys().map(|s| (ns.clone(), s.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, ready: bool) -> Candidate {
        Candidate {
            id: id.into(),
            ip: Some("10.0.0.1".parse().unwrap()),
            ready,
            serving: ready,
            ..Candidate::default()
        }
    }

    fn ids(index: &SliceIndex, service: &str) -> Vec<(String, bool)> {
        index
            .select("ns", service)
            .candidates
            .iter()
            .map(|c| (c.id.clone(), c.ready))
            .collect()
    }

    fn pairs(list: &[(&str, bool)]) -> Vec<(String, bool)> {
        list.iter().map(|(id, r)| ((*id).to_owned(), *r)).collect()
    }

    #[test]
    fn a_services_endpoints_are_merged_over_all_its_slices() {
        let index = SliceIndex::default();
        index.apply("ns", "svc-a", Some("svc"), vec![endpoint("p1", true)]);
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p2", true)]);
        index.apply("ns", "other-a", Some("other"), vec![endpoint("p9", true)]);
        assert_eq!(ids(&index, "svc"), pairs(&[("p1", true), ("p2", true)]));
        assert_eq!(index.select("ns", "svc").slices, ["svc-a", "svc-b"]);
        // An update of one slice changes only what it lists.
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p2", false)]);
        assert_eq!(ids(&index, "svc"), pairs(&[("p1", true), ("p2", false)]));
    }

    #[test]
    fn an_endpoint_listed_by_two_slices_counts_once_as_its_better_copy() {
        let index = SliceIndex::default();
        index.apply("ns", "svc-a", Some("svc"), vec![endpoint("p1", false)]);
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p1", true)]);
        assert_eq!(ids(&index, "svc"), pairs(&[("p1", true)]));
        // The rebalance completes: the old slice drops it.
        index.apply("ns", "svc-a", Some("svc"), vec![]);
        assert_eq!(ids(&index, "svc"), pairs(&[("p1", true)]));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn a_dual_stack_pod_is_published_in_one_family_whatever_the_slice_names() {
        let family = |v6_slice: &str, v4_slice: &str| {
            let index = SliceIndex::default();
            let mut v6 = endpoint("p1", true);
            v6.ip = Some("fd00::1".parse().unwrap());
            index.apply("ns", v6_slice, Some("svc"), vec![v6]);
            index.apply("ns", v4_slice, Some("svc"), vec![endpoint("p1", true)]);
            index.select("ns", "svc").candidates[0].ip
        };
        let v4 = Some("10.0.0.1".parse().unwrap());
        assert_eq!(family("svc-a", "svc-b"), v4);
        assert_eq!(family("svc-b", "svc-a"), v4);
    }

    #[test]
    fn deleting_the_last_slice_leaves_no_endpoint_and_no_empty_entries() {
        let index = SliceIndex::default();
        index.apply("ns", "svc-a", Some("svc"), vec![endpoint("p1", true)]);
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p2", true)]);
        index.delete("ns", "svc-a");
        assert_eq!(ids(&index, "svc"), pairs(&[("p2", true)]));
        index.delete("ns", "svc-b");
        assert!(ids(&index, "svc").is_empty());
        assert!(
            index.0.read().unwrap().is_empty(),
            "no empty namespace kept"
        );
    }

    #[test]
    fn a_slice_relabelled_to_another_service_moves_with_its_endpoints() {
        let index = SliceIndex::default();
        index.apply(
            "ns",
            "hand-made",
            Some("old"),
            vec![endpoint("10.0.0.1", true)],
        );
        index.apply(
            "ns",
            "hand-made",
            Some("new"),
            vec![endpoint("10.0.0.1", true)],
        );
        assert!(ids(&index, "old").is_empty());
        assert_eq!(ids(&index, "new"), pairs(&[("10.0.0.1", true)]));
        assert_eq!(index.service_of("ns", "hand-made").as_deref(), Some("new"));
        index.apply("ns", "hand-made", None, vec![endpoint("10.0.0.1", true)]);
        assert!(index.is_empty());
        assert!(index.services().is_empty());
    }

    #[test]
    fn endpoints_are_stamped_when_their_state_changes_not_when_they_move_or_are_listed() {
        let index = SliceIndex::default();
        index.reset([(
            "ns".into(),
            "svc-a".into(),
            Some("svc".into()),
            vec![endpoint("p1", false)],
        )]);
        let observed = |index: &SliceIndex| index.select("ns", "svc").candidates[0].observed;
        assert_eq!(observed(&index), None, "a list is no transition");
        index.apply("ns", "svc-a", Some("svc"), vec![endpoint("p1", true)]);
        let stamped = observed(&index);
        assert!(stamped.is_some());
        // A rebalance moves it to another slice unchanged: the stamp stays.
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p1", true)]);
        index.apply("ns", "svc-a", Some("svc"), vec![]);
        assert_eq!(observed(&index), stamped);
        index.reset([(
            "ns".into(),
            "svc-b".into(),
            Some("svc".into()),
            vec![endpoint("p1", true)],
        )]);
        assert_eq!(observed(&index), stamped, "a re-list of the same state");
        index.apply("ns", "svc-b", Some("svc"), vec![endpoint("p2", true)]);
        assert!(
            index.select("ns", "svc").candidates[0].observed.is_some(),
            "a new endpoint seen in a watch event is a change"
        );
    }

    #[test]
    fn reset_replaces_everything() {
        let index = SliceIndex::default();
        index.apply("ns", "gone", Some("svc"), vec![endpoint("p1", true)]);
        index.reset([(
            "ns".into(),
            "new".into(),
            Some("svc".into()),
            vec![endpoint("p2", true)],
        )]);
        assert_eq!(ids(&index, "svc"), pairs(&[("p2", true)]));
        assert_eq!(index.service_of("ns", "gone"), None);
    }
}
