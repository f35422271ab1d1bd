//! Subsetting simulated: many clients and endpoints in one process, no sockets. Prints a table
//! and writes `target/bench/subset.json`.
//!
//! For each size: the connections per client, the connections per endpoint (max / mean, and
//! the standard deviation beside the binomial one that any choice made by each client on its
//! own has), the share of all connections that move when 10% of the endpoints are replaced, and
//! the time one client takes to rank the endpoints.
//!
//! The resolver's scheme is rendezvous hashing ([`Rendezvous`]). For comparison, the same
//! figures for Google's deterministic subsetting (SRE book, chapter 20), which needs what a
//! Kubernetes client does not have: a dense index per client (0, 1, 2, ...); and for a variant
//! of it whose slots are hashed, so that it moves little on a change but gives clients subsets
//! of uneven size.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use tonic_etcd_resolver::policy::Rendezvous;

/// (clients, endpoints, subset size).
const SIZES: [(usize, usize, usize); 3] = [(300, 1_000, 20), (500, 2_000, 25), (100, 5_000, 20)];
/// The share of endpoints replaced in the churn figure.
const REPLACED: f64 = 0.10;

fn endpoint(i: usize) -> String {
    format!("10.{}.{}.{}:50051", i / 65_536, (i / 256) % 256, i % 256)
}

fn client(i: usize) -> String {
    // Pod names as a Deployment makes them: a random suffix, not an index.
    format!(
        "checkout-7d9f8b6c5-{:05x}",
        (i as u64).wrapping_mul(0x9e37_79b9) % 0xf_ffff
    )
}

/// One subsetting scheme: the subset of client `c` (by index) among `endpoints`.
type Scheme = dyn Fn(usize, &[String], usize) -> Vec<String>;

fn rendezvous(c: usize, endpoints: &[String], n: usize) -> Vec<String> {
    Rendezvous::new(&client(c))
        .subset(endpoints.iter().map(String::as_str), n)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Google's deterministic subsetting: client `c` is in round `c / k` (k = M / n subsets per
/// round); each round shuffles the endpoints with its own seed and cuts them into k subsets;
/// the client takes subset `c % k`.
fn deterministic(c: usize, endpoints: &[String], n: usize) -> Vec<String> {
    let per_round = (endpoints.len() / n).max(1);
    let (round, slot) = (c / per_round, c % per_round);
    let mut shuffled = endpoints.to_vec();
    shuffled.sort();
    fastrand::Rng::with_seed(round as u64).shuffle(&mut shuffled);
    shuffled.into_iter().skip(slot * n).take(n).collect()
}

/// A variant with stable slots: as [`deterministic`], but an endpoint's slot in a round is a hash
/// of the round and its address, so a change moves only that endpoint. Slots (and so subsets)
/// vary in size around `n`. Like [`deterministic`] it needs dense client indices.
fn hashed_slots(c: usize, endpoints: &[String], n: usize) -> Vec<String> {
    let per_round = (endpoints.len() / n).max(1);
    let (round, slot) = (c / per_round, c % per_round);
    let ranking = Rendezvous::new(&format!("round-{round}"));
    endpoints
        .iter()
        .filter(|e| ranking.weight(e) % per_round as u64 == slot as u64)
        .cloned()
        .collect()
}

struct Figures {
    per_client: (usize, usize),
    max_over_mean: f64,
    sd: f64,
    binomial_sd: f64,
    moved: f64,
    rank_us: f64,
}

fn simulate(scheme: &Scheme, clients: usize, m: usize, n: usize) -> Figures {
    let endpoints: Vec<String> = (0..m).map(endpoint).collect();
    let started = Instant::now();
    let before: Vec<BTreeSet<String>> = (0..clients)
        .map(|c| scheme(c, &endpoints, n).into_iter().collect())
        .collect();
    let rank_us = started.elapsed().as_secs_f64() * 1e6 / clients as f64;

    let mut load: BTreeMap<&str, usize> = endpoints.iter().map(|e| (e.as_str(), 0)).collect();
    for subset in &before {
        for e in subset {
            *load.get_mut(e.as_str()).expect("a registered endpoint") += 1;
        }
    }
    let total: usize = before.iter().map(BTreeSet::len).sum();
    let mean = total as f64 / m as f64;
    let max = *load.values().max().unwrap_or(&0);
    let variance = load
        .values()
        .map(|l| (*l as f64 - mean).powi(2))
        .sum::<f64>()
        / m as f64;
    let p = n as f64 / m as f64;

    // Replace every tenth endpoint by a new one.
    let replaced = (m as f64 * REPLACED).round() as usize;
    let step = m / replaced;
    let mut after_endpoints = endpoints.clone();
    for k in 0..replaced {
        after_endpoints[k * step] = endpoint(m + k);
    }
    let moved: usize = (0..clients)
        .map(|c| {
            let after: BTreeSet<String> = scheme(c, &after_endpoints, n).into_iter().collect();
            after.difference(&before[c]).count()
        })
        .sum();
    let sizes = before.iter().map(BTreeSet::len);
    Figures {
        per_client: (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0)),
        max_over_mean: max as f64 / mean,
        sd: variance.sqrt(),
        binomial_sd: (clients as f64 * p * (1.0 - p)).sqrt(),
        moved: moved as f64 / total as f64,
        rank_us,
    }
}

fn main() {
    let schemes: [(&str, &Scheme); 3] = [
        ("rendezvous (the resolver's)", &rendezvous),
        (
            "deterministic, dense client indices (comparison)",
            &deterministic,
        ),
        (
            "hashed slots, dense client indices (comparison)",
            &hashed_slots,
        ),
    ];
    let mut rows = Vec::new();
    for (clients, m, n) in SIZES {
        for (name, scheme) in schemes {
            let f = simulate(scheme, clients, m, n);
            rows.push((
                format!("{clients} clients x {m} endpoints, n = {n}, {name}"),
                format!(
                    "{}..{} conns/client; per endpoint max/mean {:.2} (sd {:.2}, binomial {:.2}); \
                     {:.1}% of conns moved when {:.0}% of endpoints replaced; {:.0} us to rank",
                    f.per_client.0,
                    f.per_client.1,
                    f.max_over_mean,
                    f.sd,
                    f.binomial_sd,
                    f.moved * 100.0,
                    REPLACED * 100.0,
                    f.rank_us
                ),
            ));
        }
    }
    test_support::bench::report("subset", &rows);
}
