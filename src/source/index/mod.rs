//! Indexes fed by watch events, in the style of linkerd's policy index: each event costs what it
//! touches, and nothing scans every pod or every service.
//!
//! - [`CandidateIndex`]: candidates by namespace, id and label, so a reconcile reads only the
//!   candidates its selector can match.
//! - [`ServicesBySelector`]: each GrpcService's selector, parsed once per version and posted under one
//!   of its requirements, so a pod event reaches only the services that can match it.
//! - [`SliceIndex`]: EndpointSlice endpoints by Service, merged over its slices.
//! - [`ServicesByRef`]: GrpcServices by the Service their `serviceRef` names, so a slice
//!   event reaches only those.
//!
//! Each takes `apply` / `delete` / `reset` or `retain` (a re-list), and is cheap to clone (one
//! shared lock each).

mod candidates;
mod services_by_ref;
mod services_by_selector;
mod slices;

use std::collections::{HashMap, HashSet};

use kube::core::{Expression, Selector};

pub use candidates::CandidateIndex;
pub use services_by_ref::ServicesByRef;
pub use services_by_selector::ServicesBySelector;
pub use slices::{ServiceSelection, SliceIndex};

type Labels = std::collections::BTreeMap<String, String>;

/// The requirements of a selector that an index can look up, cheapest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Anchor {
    /// `key = value`, or `key in (values)`: a match has one of these pairs.
    Pairs(Vec<(String, String)>),
    /// `key` exists: a match has the key.
    Key(String),
}

/// Every requirement of `selector` an index can use, in selector order.
pub(super) fn anchors(selector: &Selector) -> Vec<Anchor> {
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

/// A per-namespace index of GrpcServices by name, for [`retain_live`].
pub(super) trait ByName {
    /// The GrpcService names indexed.
    fn names(&self) -> Vec<String>;
    /// Forgets one.
    fn forget(&mut self, name: &str);
}

/// Keeps only the GrpcServices in `live` (after a re-list), by `(namespace, name)`, and drops
/// namespaces left empty.
pub(super) fn retain_live<N: ByName>(
    by_ns: &mut HashMap<String, N>,
    live: &HashSet<(String, String)>,
) {
    for (namespace, ns) in by_ns.iter_mut() {
        for name in ns.names() {
            if !live.contains(&(namespace.clone(), name.clone())) {
                ns.forget(&name);
            }
        }
    }
    by_ns.retain(|_, ns| !ns.names().is_empty());
}

/// Label postings: key → value → ids.
#[derive(Debug, Default)]
pub(super) struct Postings(HashMap<String, HashMap<String, HashSet<String>>>);

impl Postings {
    pub(super) fn insert(&mut self, labels: &Labels, id: &str) {
        for (k, v) in labels {
            self.0
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(id.to_owned());
        }
    }

    pub(super) fn remove(&mut self, labels: &Labels, id: &str) {
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
    pub(super) fn lookup(&self, anchor: &Anchor) -> (usize, Vec<&HashSet<String>>) {
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

#[cfg(test)]
/// Builders shared by the two indexes' tests.
mod fixtures {
    use super::*;
    use std::sync::Arc;

    use super::super::Candidate;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    pub(super) fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    pub(super) fn candidate(id: &str, pairs: &[(&str, &str)]) -> Candidate {
        Candidate {
            id: id.into(),
            labels: labels(pairs),
            ..Candidate::default()
        }
    }

    pub(super) fn selector(
        match_labels: &[(&str, &str)],
        exprs: &[(&str, &str, &[&str])],
    ) -> Selector {
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

    pub(super) fn v(generation: i64) -> (Option<String>, Option<i64>) {
        (Some("uid".into()), Some(generation))
    }

    pub(super) fn ids(found: &[Arc<Candidate>]) -> Vec<&str> {
        found.iter().map(|c| c.id.as_str()).collect()
    }
}
