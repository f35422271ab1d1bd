//! The pick alone: nanoseconds per pick for each policy at 3, 100 and 5,000 endpoints, with
//! every endpoint up and no socket opened (lazy channels). Prints a table and writes
//! `target/bench/pick.json`.
//!
//! Each figure is the median of `BATCHES` timed batches on one thread; the last rows time
//! round-robin from two threads at once, where the shared counters' cache lines bounce.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tonic_etcd_resolver::internals::PickBench;
use tonic_etcd_resolver::{Balance, Options, OutlierDetection, ZonePreference};

const SIZES: [usize; 3] = [3, 100, 5_000];
const BATCHES: usize = 9;
/// Time spent per batch, roughly.
const BATCH_TIME: Duration = Duration::from_millis(40);

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn addr(i: usize) -> String {
    format!("10.{}.{}.1:50051", i / 256, i % 256)
}

/// Median nanoseconds per pick over `BATCHES` batches of about `BATCH_TIME` each.
fn time(bench: &PickBench) -> f64 {
    // Size a batch from a short calibration run.
    let started = Instant::now();
    let mut calibration = 0u64;
    while started.elapsed() < Duration::from_millis(5) {
        for _ in 0..64 {
            assert!(black_box(bench.pick()));
        }
        calibration += 64;
    }
    let per_pick = started.elapsed().as_secs_f64() / calibration as f64;
    let n = ((BATCH_TIME.as_secs_f64() / per_pick) as u64).max(64);
    let mut ns: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..n {
                assert!(black_box(bench.pick()));
            }
            started.elapsed().as_secs_f64() * 1e9 / n as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    ns[BATCHES / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let policies: [(&str, Options); 5] = [
        ("round-robin", Options::default()),
        ("weighted", Options::default().balance(Balance::Weighted)),
        (
            "least-loaded p2c",
            Options::default().balance(Balance::LeastLoaded),
        ),
        (
            "round-robin + zone preference",
            Options::default().prefer_zone(ZonePreference::new("a")),
        ),
        (
            "round-robin + outlier ejection",
            Options::default().outlier_detection(OutlierDetection::default()),
        ),
    ];
    // Memory first, before other benches' freed memory can be reused: what an endpoint's
    // `Ready` and lazy tonic Channel cost, without the resolver's member task and probe (the
    // `thousands` bench has the whole).
    let n = SIZES[SIZES.len() - 1];
    let addrs: Vec<String> = (0..n).map(addr).collect();
    let before = rss_kib();
    let bench = PickBench::new(
        Options::default(),
        addrs.iter().map(|a| (a.as_str(), None, 100)),
    )
    .expect("addresses parse");
    let grown = rss_kib().saturating_sub(before);
    drop(bench);
    let memory = (
        format!("RSS of {n} up endpoints on lazy channels (no member tasks)"),
        format!("{:.1} KiB per endpoint", grown as f64 / n as f64),
    );
    let mut rows = Vec::new();
    for (name, options) in &policies {
        let mut figures = Vec::new();
        for n in SIZES {
            let addrs: Vec<String> = (0..n).map(addr).collect();
            // Half the endpoints in the client's zone, weights from 100 to 400.
            let endpoints = addrs.iter().enumerate().map(|(i, a)| {
                let zone = if i % 2 == 0 { "a" } else { "b" };
                (a.as_str(), Some(zone), 100 * (1 + (i % 4) as u32))
            });
            let bench = PickBench::new(options.clone(), endpoints).expect("addresses parse");
            figures.push(format!("{n}: {:.0} ns", time(&bench)));
        }
        rows.push((
            format!("pick, {name} (endpoints: ns per pick)"),
            figures.join(", "),
        ));
    }
    for n in SIZES {
        let addrs: Vec<String> = (0..n).map(addr).collect();
        let bench = std::sync::Arc::new(
            PickBench::new(
                Options::default(),
                addrs.iter().map(|a| (a.as_str(), None, 100)),
            )
            .expect("addresses parse"),
        );
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let bench = bench.clone();
                std::thread::spawn(move || time(&bench))
            })
            .collect();
        let ns: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        rows.push((
            format!("pick, round-robin, {n} endpoints, 2 threads at once"),
            format!("{:.0} ns and {:.0} ns per pick", ns[0], ns[1]),
        ));
    }
    rows.push(memory);
    test_support::bench::report("pick", &rows);
}
