//! Weights from `metadata.weight`, and smooth weighted round-robin.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

/// The weight of an endpoint whose metadata has no usable `weight`, as in kratos.
pub const DEFAULT_WEIGHT: u32 = 100;

/// The largest weight read; grpc-registrar writes weights from 1 to this.
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a `metadata.weight` was not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("failed to read weight {0}: expected an integer from 1 to 10000")]
pub struct InvalidWeight(pub String);

/// Reads an endpoint's weight from its metadata's `weight` member.
///
/// The convention is kratos': a string holding an integer (`{"weight":"200"}`); a JSON number
/// is read too. Weights run from 1 to [`MAX_WEIGHT`]. With no metadata or no `weight` member
/// the weight is `Ok(None)`, and the caller uses [`DEFAULT_WEIGHT`].
///
/// # Errors
/// [`InvalidWeight`] for anything else (`"abc"`, `0`, `-3`, `1.5`, `20000`): the resolver then
/// uses [`DEFAULT_WEIGHT`] and logs a warning. `0` is not a way to drain an endpoint: delete its
/// key, or fail its readiness.
pub fn parse_weight(metadata: Option<&serde_json::Value>) -> Result<Option<u32>, InvalidWeight> {
    let Some(value) = metadata.and_then(|m| m.get("weight")) else {
        return Ok(None);
    };
    let parsed = match value {
        serde_json::Value::String(s) => s.trim().parse::<u32>().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match parsed {
        Some(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(Some(w)),
        _ => Err(InvalidWeight(value.to_string())),
    }
}

/// The bad weights already warned about, by key, so each is logged once rather than on every
/// watch event.
#[derive(Debug, Default)]
pub(crate) struct WeightWarnings {
    /// Key to the bad value warned about, for keys still in the registry with it.
    seen: Mutex<BTreeMap<String, String>>,
}

impl WeightWarnings {
    /// Keeps only the pairs in `current` (every bad weight in the latest listing), and returns
    /// those not warned about before.
    pub(crate) fn fresh(&self, current: BTreeSet<(String, String)>) -> Vec<(String, String)> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = current
            .iter()
            .filter(|(k, v)| seen.get(k) != Some(v))
            .cloned()
            .collect();
        *seen = current.into_iter().collect();
        fresh
    }

    /// Records one key's bad weight (`None`: its weight is fine now); returns the value when it
    /// was not warned about before.
    pub(crate) fn note(&self, key: &str, bad: Option<String>) -> Option<String> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match bad {
            None => {
                seen.remove(key);
                None
            }
            Some(value) if seen.get(key) == Some(&value) => None,
            Some(value) => {
                seen.insert(key.to_owned(), value.clone());
                Some(value)
            }
        }
    }
}

/// Smooth weighted round-robin, nginx's algorithm: each pick adds every candidate's weight to
/// its current weight, takes the largest, and subtracts the total from it. `state` holds each
/// candidate's (current weight, weight); returns the chosen index, `None` when it is empty.
///
/// The caller keeps the current weights between picks, so candidates may come and go (zone
/// spill-over, an ejection) and one left out keeps its own until it is offered again.
pub(crate) fn smooth_pick(state: &mut [(i64, u32)]) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, (current, weight)) in state.iter_mut().enumerate() {
        let weight = i64::from(*weight);
        total += weight;
        *current += weight;
        if best.is_none_or(|(_, b)| *current > b) {
            best = Some((i, *current));
        }
    }
    let (i, _) = best?;
    state[i].0 -= total;
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_bad_weight_is_warned_about_once_per_key_and_value() {
        let warnings = WeightWarnings::default();
        let first = pairs(&[("a", "\"abc\""), ("b", "0")]);
        assert_eq!(warnings.fresh(first.clone()).len(), 2);
        assert!(
            warnings.fresh(first).is_empty(),
            "the same again: no warning"
        );
        let changed = pairs(&[("a", "\"abd\""), ("b", "0")]);
        assert_eq!(
            warnings.fresh(changed),
            pairs(&[("a", "\"abd\"")]).into_iter().collect::<Vec<_>>()
        );
        // Fixed, then broken the same way again: warned again.
        assert!(warnings.fresh(pairs(&[("b", "0")])).is_empty());
        assert_eq!(
            warnings.fresh(pairs(&[("a", "\"abd\""), ("b", "0")])).len(),
            1
        );
    }

    #[test]
    fn a_bad_weight_noted_key_by_key_is_warned_about_once_until_fixed() {
        let warnings = WeightWarnings::default();
        assert_eq!(warnings.note("a", Some("0".into())), Some("0".into()));
        assert_eq!(warnings.note("a", Some("0".into())), None, "the same again");
        assert_eq!(warnings.note("a", Some("-1".into())), Some("-1".into()));
        assert_eq!(warnings.note("a", None), None, "fixed");
        assert_eq!(warnings.note("a", Some("-1".into())), Some("-1".into()));
    }

    /// `n` picks over (name, weight), as one string of names.
    fn sequence(weights: &[(&'static str, u32)], n: usize) -> String {
        let mut state: Vec<(i64, u32)> = weights.iter().map(|(_, w)| (0, *w)).collect();
        (0..n)
            .map(|_| weights[smooth_pick(&mut state).unwrap()].0)
            .collect()
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_like_nginx() {
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(sequence(&[("a", 5), ("b", 1), ("c", 1)], 7), "aabacaa");
    }

    #[test]
    fn smooth_weighted_round_robin_gives_calls_in_proportion_to_weight() {
        let seq = sequence(&[("a", 300), ("b", 100), ("c", 200)], 600);
        let count = |c| seq.chars().filter(|x| *x == c).count();
        assert_eq!((count('a'), count('b'), count('c')), (300, 100, 200));
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        assert_eq!(sequence(&[("a", 100), ("b", 100), ("c", 100)], 6), "abcabc");
    }

    #[test]
    fn an_empty_candidate_set_picks_nothing() {
        assert_eq!(smooth_pick(&mut []), None);
    }

    #[test]
    fn current_weights_sum_to_zero_after_every_pick() {
        let mut state = vec![(0, 2), (0, 1), (0, 7)];
        for _ in 0..50 {
            smooth_pick(&mut state);
            assert_eq!(state.iter().map(|(c, _)| c).sum::<i64>(), 0);
        }
    }

    #[test]
    fn weights_are_read_from_strings_and_numbers_and_default_when_absent() {
        assert_eq!(parse_weight(Some(&json!({"weight": "200"}))), Ok(Some(200)));
        assert_eq!(parse_weight(Some(&json!({"weight": 7}))), Ok(Some(7)));
        assert_eq!(parse_weight(Some(&json!({"zone": "a"}))), Ok(None));
        assert_eq!(parse_weight(None), Ok(None));
    }

    #[test]
    fn malformed_zero_and_out_of_range_weights_are_errors() {
        for bad in [
            json!("abc"),
            json!("0"),
            json!(0),
            json!(-3),
            json!(1.5),
            json!("20000"),
            json!(null),
            json!({"w": 1}),
        ] {
            assert!(
                parse_weight(Some(&json!({ "weight": bad }))).is_err(),
                "{bad}"
            );
        }
    }
}
