use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use super::*;
use crate::desired::Policy;
use crate::fixtures::service;

/// `greeter`'s plan by the `nth` backend's planner (wrapping around), copying label `version`;
/// with `by_pod`, under a key template naming `{pod}` where the backend has key templates (so
/// that two pods on one address are two keys, not a collision).
fn planned(nth: usize, by_pod: bool) -> Planned {
    let planners = crate::registry::planners();
    let (backend, planner) = planners[nth % planners.len()];
    let mut svc = service("greeter");
    svc.spec.port = Some(IntOrString::Int(50051));
    svc.spec.metadata_from_labels = vec!["version".into()];
    svc.spec.backend = backend;
    let policy = Policy {
        backend,
        ..Policy::default()
    };
    let plain = planner.plan(&svc, &policy).expect("a valid spec");
    svc.spec.key_template = Some("{target}/{pod}".into());
    match planner.plan(&svc, &policy) {
        Ok(templated) if by_pod => templated,
        _ => plain,
    }
}

/// A ready, running candidate `pod-<i>` at `10.0.0.<i>`.
fn candidate(i: u8) -> Candidate {
    Candidate {
        id: format!("pod-{i:03}"),
        pod: Some(format!("pod-{i:03}")),
        ip: Some(format!("10.0.0.{i}").parse().unwrap()),
        ready: true,
        serving: true,
        node: Some(format!("node-{}", i % 3)),
        zone: Some(format!("zone-{}", i % 2)),
        labels: BTreeMap::from([("version".to_owned(), "v1".to_owned())]),
        ..Candidate::default()
    }
}

/// `n` candidates, sorted by id.
fn candidates(n: u8) -> Vec<Arc<Candidate>> {
    (0..n).map(|i| Arc::new(candidate(i))).collect()
}

/// What an evaluation publishes and reports (or why it cannot), for comparing two.
type Outcome = Result<(Desired, BTreeMap<String, Vec<u8>>), Invalid>;

fn outcome(evaluated: Result<Evaluation, Invalid>) -> Outcome {
    evaluated.map(|e| {
        let mut want = e.want.as_ref().clone();
        want.endpoints = e.endpoints.as_ref().clone();
        (want, e.entries.as_ref().clone())
    })
}

#[test]
fn a_readiness_flip_is_evaluated_from_the_last_evaluation_with_the_rest_shared() {
    let planned = planned(0, false);
    let mut now = candidates(100);
    let last = evaluate(&planned, now.clone()).unwrap();
    let entries_at = Arc::as_ptr(&last.entries);
    let endpoints_at = Arc::as_ptr(&last.endpoints);
    let mut flipped = candidate(7);
    flipped.ready = false;
    now[7] = Arc::new(flipped);

    let next = reevaluate(&planned, now.clone(), Some(last)).unwrap();

    // Patched where it was: nothing rebuilt, one entry fewer.
    assert_eq!(Arc::as_ptr(&next.entries), entries_at);
    assert_eq!(Arc::as_ptr(&next.endpoints), endpoints_at);
    assert_eq!((next.entries.len(), next.want.ready), (99, 99));
    assert_eq!(
        next.want.skipped.get("pod-007"),
        Some(&desired::Skip::NotReady)
    );
    assert_eq!(outcome(Ok(next)), outcome(evaluate(&planned, now)));
}

#[test]
fn a_changed_plan_is_evaluated_in_full() {
    let (by_addr, by_pod) = (planned(0, false), planned(0, true));
    let now = candidates(40);
    let last = evaluate(&by_addr, now.clone()).unwrap();
    let entries_at = Arc::as_ptr(&last.entries);

    let next = reevaluate(&by_pod, now.clone(), Some(last)).unwrap();

    assert_ne!(Arc::as_ptr(&next.entries), entries_at);
    assert_eq!(outcome(Ok(next)), outcome(evaluate(&by_pod, now)));
}

#[test]
fn a_candidate_moving_onto_anothers_address_collides_as_in_a_full_evaluation() {
    let planned = planned(0, false);
    let mut now = candidates(50);
    let last = evaluate(&planned, now.clone()).unwrap();
    let mut moved = candidate(9);
    moved.ip = now[3].ip;
    now[9] = Arc::new(moved);

    let next = reevaluate(&planned, now.clone(), Some(last)).unwrap();

    assert_eq!(next.want.collisions.len(), 1);
    assert_eq!(outcome(Ok(next)), outcome(evaluate(&planned, now)));
}

#[test]
fn only_large_services_are_kept_and_the_least_recently_evaluated_go_first_past_the_budget() {
    let planned = planned(0, false);
    let small = evaluate(&planned, candidates(MIN_KEPT as u8 - 1)).unwrap();
    let large = evaluate(&planned, candidates(200)).unwrap();
    let kept = Evaluations::default();
    kept.keep("small", &small);
    assert!(
        kept.take("small", &planned).is_none(),
        "a small service is evaluated in full"
    );

    let per = BUDGET / 200;
    for i in 0..=per {
        kept.keep(&format!("svc-{i}"), &large);
    }
    assert_eq!(kept.held(), (per * 200, per));
    assert!(
        kept.take("svc-0", &planned).is_none(),
        "the oldest went first"
    );
    assert!(kept.take(&format!("svc-{per}"), &planned).is_some());
    kept.forget("svc-1");
    assert_eq!(kept.held(), ((per - 2) * 200, per - 2));
}

#[test]
fn an_evaluation_under_another_plan_leaves_the_kept_one_for_the_next_under_its_plan() {
    let (valid, other) = (planned(0, false), planned(0, true));
    let kept = Evaluations::default();
    kept.keep("svc", &evaluate(&valid, candidates(64)).unwrap());

    assert!(
        kept.take("svc", &other).is_none(),
        "another plan starts afresh"
    );
    assert!(
        kept.take("svc", &valid).is_some(),
        "the last valid spec's evaluation is still there"
    );
}

/// One change to a service's candidates.
#[derive(Clone, Debug)]
enum Change {
    Flip(u8),
    Leave(u8),
    Come(u8),
    Terminate(u8),
    /// Onto the address of another candidate.
    Move(u8, u8),
    Relabel(u8),
    Weigh(u8, &'static str),
    NoAddress(u8),
    /// Declares the spec's port, or another one.
    Declare(u8, u16),
    /// The same candidate again, as a new object (a re-list).
    Renew(u8),
    /// A second candidate with the same id beside it (an endpoint in two EndpointSlices).
    Repeat(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => any::<u8>().prop_map(|i| Change::Flip(i % 60)),
        2 => any::<u8>().prop_map(|i| Change::Leave(i % 60)),
        2 => any::<u8>().prop_map(|i| Change::Come(i % 60)),
        1 => any::<u8>().prop_map(|i| Change::Terminate(i % 60)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(i, j)| Change::Move(i % 60, j % 60)),
        1 => any::<u8>().prop_map(|i| Change::Relabel(i % 60)),
        1 => (any::<u8>(), prop_oneof![Just("5"), Just("0"), Just("heavy")])
            .prop_map(|(i, w)| Change::Weigh(i % 60, w)),
        1 => any::<u8>().prop_map(|i| Change::NoAddress(i % 60)),
        1 => any::<u8>().prop_map(|i| Change::Renew(i % 60)),
        1 => any::<u8>().prop_map(|i| Change::Repeat(i % 60)),
        1 => (any::<u8>(), prop_oneof![Just(50051_u16), Just(9090)])
            .prop_map(|(i, port)| Change::Declare(i % 60, port)),
    ]
}

/// `now` with `change` made (kept sorted by id).
fn changed(now: &[Arc<Candidate>], change: &Change) -> Vec<Arc<Candidate>> {
    let mut by_id: BTreeMap<String, Arc<Candidate>> =
        now.iter().map(|c| (c.id.clone(), c.clone())).collect();
    let edit = |by_id: &mut BTreeMap<String, Arc<Candidate>>, i: u8, f: &dyn Fn(&mut Candidate)| {
        if let Some(c) = by_id.get_mut(&candidate(i).id) {
            let mut next = c.as_ref().clone();
            f(&mut next);
            *c = Arc::new(next);
        }
    };
    match change {
        Change::Flip(i) => edit(&mut by_id, *i, &|c| c.ready = !c.ready),
        Change::Leave(i) => {
            by_id.remove(&candidate(*i).id);
        }
        Change::Come(i) => {
            by_id
                .entry(candidate(*i).id)
                .or_insert_with(|| Arc::new(candidate(*i)));
        }
        Change::Terminate(i) => edit(&mut by_id, *i, &|c| c.terminating = true),
        Change::Move(i, j) => {
            let ip = candidate(*j).ip;
            edit(&mut by_id, *i, &|c| c.ip = ip);
        }
        Change::Relabel(i) => edit(&mut by_id, *i, &|c| {
            c.labels.insert("version".into(), "v2".into());
        }),
        Change::Weigh(i, w) => edit(&mut by_id, *i, &|c| c.weight = Some((*w).to_owned())),
        Change::NoAddress(i) => edit(&mut by_id, *i, &|c| c.ip = None),
        Change::Renew(i) => edit(&mut by_id, *i, &|_| {}),
        Change::Declare(i, port) => {
            edit(&mut by_id, *i, &|c| c.ports = vec![("grpc".into(), *port)])
        }
        Change::Repeat(i) => {
            let mut list: Vec<Arc<Candidate>> = by_id.into_values().collect();
            if let Some(at) = list.iter().position(|c| c.id == candidate(*i).id) {
                let twin = Arc::new(list[at].as_ref().clone());
                list.insert(at + 1, twin);
            }
            // (The next change collapses the twins again: the later one stays.)
            return list;
        }
    }
    by_id.into_values().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever changes, one at a time or several between two reconciles, an evaluation from
    /// the last one is the full evaluation.
    #[test]
    fn an_evaluation_from_the_last_one_equals_a_full_evaluation(
        steps in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..30),
        backend in 0..crate::registry::planners().len(),
        by_pod in any::<bool>(),
    ) {
        let planned = planned(backend, by_pod);
        let mut now = candidates(50);
        let mut last = reevaluate(&planned, now.clone(), None).ok();
        for step in &steps {
            for change in step {
                now = changed(&now, change);
            }
            let next = reevaluate(&planned, now.clone(), last.take());
            let full = evaluate(&planned, now.clone());
            let kept = next.as_ref().ok().cloned();
            prop_assert_eq!(outcome(next), outcome(full));
            last = kept;
        }
    }
}
