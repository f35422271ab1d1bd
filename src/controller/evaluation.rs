//! What a service's spec makes of its selected candidates (the desired endpoints, laid out as
//! entries by the backend's placement), evaluated from the last evaluation when only a few
//! candidates changed.
//!
//! A readiness flip changes one candidate of a service, and a full evaluation costs what the
//! whole service costs (each endpoint's metadata, key and value). So a service keeps its last
//! evaluation, and the next one under the same plan takes back out the candidates that changed
//! or left and adds the ones that changed or came: the unchanged endpoints and entries are
//! shared rather than rebuilt, and only the changed ones are rendered (what stays O(service
//! size) is a merge of the two selections by id, a pointer comparison per unchanged
//! candidate). Anything the shortcut does not model (two endpoints on
//! one key, a port offered, an entry too large, many changes) is evaluated in
//! full, and a property test holds the shortcut equal to the full evaluation.
//!
//! Pure, apart from the cache: a service's evaluation is a function of its plan and its
//! candidates, so a kept one is never stale, only replaced.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::desired::{self, Desired, LogicalEndpoint, SpecError};
use crate::registry::Planned;
use crate::source::Candidate;

/// Entries by key, as a placement rendered them.
pub(super) type Entries = Arc<BTreeMap<String, Vec<u8>>>;

/// A service's selected candidates, and what its plan makes of them.
#[derive(Clone, Debug)]
pub(super) struct Evaluation {
    /// The plan evaluated.
    planned: Planned,
    /// The candidates selected (sorted by id).
    pub selected: Vec<Arc<Candidate>>,
    /// What they make, but the endpoints (in `endpoints`).
    pub want: Arc<Desired>,
    /// The endpoints published, one per entry, in candidate order.
    pub endpoints: Arc<Vec<LogicalEndpoint>>,
    /// Their entries by key.
    pub entries: Entries,
    /// Whether no id repeats in `selected`: only then does the next evaluation start from
    /// this one (its merge reads no id of a candidate selected again unchanged).
    unique: bool,
}

/// Why an evaluation cannot be published: the spec's error, with the counts for status.
pub(super) type Invalid = Box<(SpecError, Desired)>;

impl Evaluation {
    /// Whether the next evaluation may start from this one: the same plan, and nothing in it
    /// the shortcut does not model.
    fn continues(&self, planned: &Planned) -> bool {
        let want = &self.want;
        self.unique
            && want.collisions.is_empty()
            && want.ports_offered.is_empty()
            && self.planned.plan == planned.plan
            && self.planned.placement.same_as(planned.placement.as_ref())
    }

    /// The candidates kept selected (by reference), how many were.
    fn size(&self) -> usize {
        self.selected.len()
    }
}

/// Evaluates `planned` against `selected` (sorted by id) in full.
///
/// # Errors
/// The spec maps every endpoint to one entry, or an entry is too large: with the counts.
pub(super) fn evaluate(
    planned: &Planned,
    selected: Vec<Arc<Candidate>>,
) -> Result<Evaluation, Invalid> {
    let unique = selected.windows(2).all(|pair| pair[0].id != pair[1].id);
    let mut want = desired::desired(&planned.plan, &selected);
    let rendering = planned
        .placement
        .render(std::mem::take(&mut want.endpoints));
    want.collisions = rendering.collisions;
    match rendering.entries {
        Ok(entries) => Ok(Evaluation {
            planned: planned.clone(),
            selected,
            want: Arc::new(want),
            endpoints: Arc::new(rendering.endpoints),
            entries: Arc::new(entries),
            unique,
        }),
        Err(e) => {
            want.endpoints = rendering.endpoints;
            Err(Box::new((e, want)))
        }
    }
}

/// Evaluates `planned` against `selected` (sorted by id), from `last` when it was evaluated
/// under the same plan and few candidates changed since; in full otherwise. Equal to
/// [`evaluate`] in every case.
///
/// # Errors
/// As [`evaluate`].
pub(super) fn reevaluate(
    planned: &Planned,
    selected: Vec<Arc<Candidate>>,
    last: Option<Evaluation>,
) -> Result<Evaluation, Invalid> {
    let patched = last
        .filter(|last| last.continues(planned))
        .and_then(|mut last| {
            let kept = std::mem::take(&mut last.selected);
            let (gone, came) = changes(&kept, &selected)?;
            apply(last, &selected, &gone, &came)
        });
    match patched {
        Some(mut evaluation) => {
            // `changes` found no id repeated.
            evaluation.selected = selected;
            evaluation.unique = true;
            Ok(evaluation)
        }
        None => evaluate(planned, selected),
    }
}

/// The fewest changes worth a full evaluation instead: past this many (or an eighth of the
/// service), rebuilding costs about what patching does.
const MAX_CHANGES: usize = 16;

/// Of two selections sorted by id (`last` with no id repeated), the candidates of `last` that
/// changed or left, and those of `now` that changed or came; `None` when they are too many to
/// patch, or an id repeats in `now`.
fn changes<'a>(
    last: &'a [Arc<Candidate>],
    now: &'a [Arc<Candidate>],
) -> Option<(Vec<&'a Candidate>, Vec<&'a Candidate>)> {
    let limit = MAX_CHANGES.max(now.len() / 8);
    let (mut gone, mut came) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < last.len() || j < now.len() {
        let (old, new) = (last.get(i), now.get(j));
        // The very candidate selected last time (most of them, on a readiness flip): one id
        // on both sides, read from neither. `last` repeats no id, and the merge has passed
        // every id below this one on both sides, so `now` does not repeat it either.
        if let (Some(old), Some(new)) = (old, new)
            && Arc::ptr_eq(old, new)
        {
            i += 1;
            j += 1;
            continue;
        }
        let repeats = |list: &[Arc<Candidate>], k: usize| {
            k > 0 && list.get(k).is_some_and(|c| c.id == list[k - 1].id)
        };
        if repeats(last, i) || repeats(now, j) {
            return None;
        }
        match (old, new) {
            (Some(old), Some(new)) if old.id == new.id => {
                if !Arc::ptr_eq(old, new) && !old.evaluates_as(new) {
                    gone.push(old.as_ref());
                    came.push(new.as_ref());
                }
                i += 1;
                j += 1;
            }
            (Some(old), Some(new)) if old.id < new.id => {
                gone.push(old.as_ref());
                i += 1;
            }
            (Some(old), None) => {
                gone.push(old.as_ref());
                i += 1;
            }
            (_, Some(new)) => {
                came.push(new.as_ref());
                j += 1;
            }
            (None, None) => break,
        }
        if gone.len() + came.len() > limit {
            return None;
        }
    }
    Some((gone, came))
}

/// `last` with the candidates `gone` taken out and `came` added (`selected` is all of them
/// now); `None` where the shortcut does not model the outcome, for a full evaluation.
fn apply(
    mut last: Evaluation,
    selected: &[Arc<Candidate>],
    gone: &[&Candidate],
    came: &[&Candidate],
) -> Option<Evaluation> {
    let plan = &last.planned.plan;
    let placement = last.planned.placement.clone();
    let want = Arc::make_mut(&mut last.want);
    let endpoints = Arc::make_mut(&mut last.endpoints);
    let entries = Arc::make_mut(&mut last.entries);
    for candidate in gone {
        if candidate.ready {
            want.ready = want.ready.checked_sub(1)?;
        }
        if want.skipped.remove(&candidate.id).is_some() {
            continue;
        }
        // Registered (a candidate is skipped or registered, and nothing collided).
        let at = endpoints
            .binary_search_by(|e| e.id.as_str().cmp(&candidate.id))
            .ok()?;
        let endpoint = endpoints.remove(at);
        entries.remove(&placement.key(&endpoint))?;
        want.invalid_weights.remove(&candidate.id);
        if desired::undeclared(plan, candidate, endpoint.port) {
            let (_, count) = want.undeclared_port.as_mut()?;
            *count = count.checked_sub(1)?;
            if *count == 0 {
                want.undeclared_port = None;
            }
        }
    }
    let mut added = Desired::default();
    for candidate in came {
        desired::add(plan, candidate, &mut added);
    }
    if !added.ports_offered.is_empty() {
        return None;
    }
    if let Some((port, count)) = added.undeclared_port {
        want.undeclared_port.get_or_insert((port, 0)).1 += count;
    }
    for endpoint in added.endpoints {
        let (key, value) = placement.entry(&endpoint).ok()?;
        if entries.contains_key(&key) {
            return None;
        }
        let at = endpoints
            .binary_search_by(|e| e.id.as_str().cmp(&endpoint.id))
            .err()?;
        entries.insert(key, value);
        endpoints.insert(at, endpoint);
    }
    want.ready += added.ready;
    want.skipped.append(&mut added.skipped);
    want.invalid_weights.append(&mut added.invalid_weights);
    want.selected = selected.len();
    Some(last)
}

/// The last evaluation of each large service, by uid, within a budget of candidates (least
/// recently evaluated dropped first). A small service is evaluated in full: its evaluation
/// costs little, and keeping it would cost memory at every scale.
#[derive(Debug, Default)]
pub(super) struct Evaluations(Mutex<Kept>);

/// The kept evaluations and their bookkeeping.
#[derive(Debug, Default)]
struct Kept {
    /// By uid: the evaluation and its use stamp.
    by_uid: HashMap<String, (Evaluation, u64)>,
    /// Uids by use stamp, oldest first.
    by_use: BTreeMap<u64, String>,
    /// The candidates the kept evaluations select, in all.
    candidates: usize,
    /// The next use stamp.
    clock: u64,
}

/// Services selecting fewer candidates are evaluated in full every time.
pub(super) const MIN_KEPT: usize = 32;

/// The most candidates the kept evaluations may select in all (a few tens of MiB).
pub(super) const BUDGET: usize = 50_000;

impl Evaluations {
    /// Takes the last evaluation of the service `uid` when it was under `planned` (the next
    /// evaluation starts from it); one under another plan stays kept (a spec turned invalid
    /// evaluates its new plan, then the last valid one, which starts from it).
    pub(super) fn take(&self, uid: &str, planned: &Planned) -> Option<Evaluation> {
        let mut kept = self.0.lock().expect("lock");
        let continues = kept
            .by_uid
            .get(uid)
            .is_some_and(|(last, _)| last.continues(planned));
        if continues { kept.remove(uid) } else { None }
    }

    /// Keeps `evaluation` as the service `uid`'s last, when it is large enough and fits the
    /// budget (dropping the least recently evaluated others to fit it).
    pub(super) fn keep(&self, uid: &str, evaluation: &Evaluation) {
        if evaluation.size() < MIN_KEPT || evaluation.size() > BUDGET {
            return;
        }
        let mut kept = self.0.lock().expect("lock");
        kept.remove(uid);
        while kept.candidates + evaluation.size() > BUDGET {
            let Some((_, oldest)) = kept.by_use.pop_first() else {
                break;
            };
            if let Some((dropped, _)) = kept.by_uid.remove(&oldest) {
                kept.candidates -= dropped.size();
            }
        }
        kept.clock += 1;
        let stamp = kept.clock;
        kept.candidates += evaluation.size();
        kept.by_use.insert(stamp, uid.to_owned());
        kept.by_uid
            .insert(uid.to_owned(), (evaluation.clone(), stamp));
    }

    /// Drops the service `uid`'s evaluation (it is gone).
    pub(super) fn forget(&self, uid: &str) {
        self.0.lock().expect("lock").remove(uid);
    }

    /// How many candidates the kept evaluations select, and how many services they are.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let kept = self.0.lock().expect("lock");
        (kept.candidates, kept.by_uid.len())
    }
}

impl Kept {
    fn remove(&mut self, uid: &str) -> Option<Evaluation> {
        let (evaluation, stamp) = self.by_uid.remove(uid)?;
        self.by_use.remove(&stamp);
        self.candidates -= evaluation.size();
        Some(evaluation)
    }
}

#[cfg(test)]
mod tests;
