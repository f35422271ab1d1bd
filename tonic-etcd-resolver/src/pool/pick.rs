//! The pick: round-robin straight from the ready set, the other policies from candidates cached
//! until something they depend on changes; and outlier ejection, which changes them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{debug, warn};

use super::{Pool, Ready, lock};
use crate::Balance;
use crate::policy::outlier::max_ejected;
use crate::policy::p2c::{self, Load};
use crate::policy::weighted;

/// The endpoints the policies may pick from, computed once per change rather than per pick.
#[derive(Default)]
pub(super) struct Cache {
    /// Up, serving, not ejected and (with a zone preference that holds) local.
    candidates: Vec<Arc<Ready>>,
    /// When the first ejection among the ready set ends (pool clock): stale from then.
    until: Option<Duration>,
    /// Weighted: each candidate's (current weight, weight), side by side so that a pick, which
    /// visits every candidate, reads one array. Handed back to the endpoints on a rebuild.
    swrr: Mutex<Vec<(i64, u32)>>,
}

impl Pool {
    /// The endpoint for the next RPC: among those up, serving and not ejected, local ones
    /// first with a zone preference, then by the balance policy.
    ///
    /// Round-robin alone reads the ready set under its read lock: an atomic counter, an index,
    /// and the one `Arc` it returns. The other policies pick from the cached candidates, which
    /// are rebuilt only after something they depend on changed (the ready set, a health
    /// status, an ejection or its end, the zone counts): a pick is then O(1), except
    /// weighted's, which visits every candidate.
    pub(crate) fn pick(&self) -> Option<Arc<Ready>> {
        if self.simple {
            let ready = self.ready_set();
            if ready.is_empty() {
                return None;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
            return Some(ready[i].clone());
        }
        loop {
            {
                let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
                let fresh = !self.stale.load(Ordering::Acquire)
                    && cache.until.is_none_or(|until| self.now() < until);
                if fresh {
                    return self.choose(&cache);
                }
            }
            self.rebuild();
        }
    }

    /// Marks the cached candidates stale: the next pick rebuilds them.
    pub(crate) fn invalidate(&self) {
        self.stale.store(true, Ordering::Release);
    }

    /// Rebuilds the candidates from the ready set.
    fn rebuild(&self) {
        let mut guard = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let cache = &mut *guard;
        let weighted = self.options.balance == Balance::Weighted;
        let swrr = cache.swrr.get_mut().unwrap_or_else(PoisonError::into_inner);
        if weighted {
            // Back to their endpoints, so one left out of the new candidates keeps its own.
            for (r, (current, _)) in cache.candidates.iter().zip(swrr.iter()) {
                r.shared.swrr.store(*current, Ordering::Relaxed);
            }
        }
        // Before reading: a change from here on marks the new cache stale again.
        self.stale.store(false, Ordering::Release);
        let ready = self.ready_set();
        let now = self.now();
        let outlier = self.options.outlier.is_some();
        let serving = |r: &Ready| r.shared.serving.load(Ordering::Acquire);
        let kept = |r: &Ready| serving(r) && !(outlier && r.shared.ejected(now));
        // Never eject the last endpoints: if only ejected ones are left, use them.
        let skip_ejected = outlier && ready.iter().any(|r| kept(r));
        let up = |r: &Ready| if skip_ejected { kept(r) } else { serving(r) };
        let local_only = self.options.zone.as_ref().is_some_and(|z| {
            let local_up = ready
                .iter()
                .filter(|r| up(r) && self.is_local(&r.meta))
                .count();
            z.keep_local(local_up, self.registered_local.load(Ordering::Relaxed))
        });
        cache.candidates = ready
            .iter()
            .filter(|r| up(r) && (!local_only || self.is_local(&r.meta)))
            .cloned()
            .collect();
        if weighted {
            *swrr = cache
                .candidates
                .iter()
                .map(|r| (r.shared.swrr.load(Ordering::Relaxed), r.meta.weight))
                .collect();
        }
        // The first ejection to end changes the candidates then.
        cache.until = ready
            .iter()
            .filter_map(|r| {
                let until = r.shared.ejected_until.load(Ordering::Acquire);
                (outlier && r.shared.ejected(now)).then(|| Duration::from_nanos(until))
            })
            .min();
    }

    /// The balance policy's choice among the cached candidates.
    fn choose(&self, cache: &Cache) -> Option<Arc<Ready>> {
        let candidates = &cache.candidates;
        let i = match self.options.balance {
            Balance::RoundRobin => (!candidates.is_empty())
                .then(|| self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()),
            Balance::Weighted => weighted::smooth_pick(&mut lock(&cache.swrr)),
            Balance::LeastLoaded => p2c::choose(
                candidates.len(),
                |i| Load {
                    in_flight: candidates[i].shared.in_flight.load(Ordering::Relaxed),
                    weight: candidates[i].meta.weight,
                },
                |k| fastrand::usize(..k),
            ),
        }?;
        Some(candidates[i].clone())
    }

    /// Records one RPC outcome for outlier detection, ejecting the endpoint when it trips and
    /// the cap allows.
    pub(crate) fn record(self: &Arc<Self>, ready: &Ready, failed: bool) {
        let Some(config) = &self.options.outlier else {
            return;
        };
        let now = self.now();
        if !lock(&ready.shared.outlier).record(config, now, failed) {
            return;
        }
        let serial = lock(&self.ejecting);
        if ready.shared.ejected(now) {
            // Another failing call got here first: one ejection, of its length.
            return;
        }
        let (ejected, allowed) = {
            let all = self.ready_set();
            let ejected = all.iter().filter(|r| r.shared.ejected(now)).count();
            (ejected, max_ejected(config.max_ejection_percent, all.len()))
        };
        if ejected >= allowed {
            debug!(
                addr = &*ready.addr,
                ejected, allowed, "outlier not ejected: the ejection cap is reached"
            );
            return;
        }
        let Some(length) = lock(&ready.shared.outlier).eject(config, now) else {
            return;
        };
        let until = u64::try_from((now + length).as_nanos()).unwrap_or(u64::MAX);
        ready.shared.ejected_until.store(until, Ordering::Release);
        self.invalidate();
        drop(serial);
        warn!(
            addr = &*ready.addr,
            ejection = ?length,
            ejected = ejected + 1,
            "endpoint ejected as an outlier"
        );
        if self.ranked.is_some() {
            // The subset refills now, and gives the filler back when the ejection ends.
            self.resubset();
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(length).await;
                if let Some(pool) = pool.upgrade() {
                    pool.resubset();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Options;
    use crate::pool::Meta;

    fn meta(weight: u32) -> Meta {
        Meta { zone: None, weight }
    }

    fn pick(pool: &Pool) -> String {
        pool.pick().expect("a candidate").addr.to_string()
    }

    fn set_serving(pool: &Pool, addr: &str, serving: bool) {
        let ready = pool.ready_set();
        let r = ready.iter().find(|r| &*r.addr == addr).expect("ready");
        r.shared.serving.store(serving, Ordering::Release);
        drop(ready);
        pool.invalidate();
    }

    #[tokio::test]
    async fn a_weighted_candidate_left_out_keeps_its_current_weight() {
        let pool = Pool::new("t", Options::default().balance(Balance::Weighted));
        let (a, b) = ("10.0.0.1:1", "10.0.0.2:1");
        pool.insert_unconnected(a, meta(2)).unwrap();
        pool.insert_unconnected(b, meta(1)).unwrap();
        // a (current 2 -> -1; b 1): b now leads.
        assert_eq!(pick(&pool), a);
        set_serving(&pool, b, false);
        for _ in 0..3 {
            assert_eq!(pick(&pool), a, "b is out");
        }
        set_serving(&pool, b, true);
        // b kept its 1 (a is back to -1): b 2 beats a 1. Reset to 0, b would tie and lose.
        assert_eq!(pick(&pool), b);
    }

    #[tokio::test]
    async fn candidates_are_rebuilt_when_marked_stale_and_not_before() {
        let pool = Pool::new("t", Options::default().balance(Balance::LeastLoaded));
        let (a, b) = ("10.0.0.1:1", "10.0.0.2:1");
        pool.insert_unconnected(a, meta(1)).unwrap();
        pool.insert_unconnected(b, meta(1)).unwrap();
        pool.pick();
        let ready = pool.ready_set();
        let r = ready.iter().find(|r| &*r.addr == b).unwrap();
        r.shared.serving.store(false, Ordering::Release);
        drop(ready);
        // Not yet invalidated: the cached candidates still hold b.
        assert_eq!(pool.cache.read().unwrap().candidates.len(), 2);
        pool.invalidate();
        for _ in 0..20 {
            assert_eq!(pick(&pool), a);
        }
    }
}
