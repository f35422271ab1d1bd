//! Steady churn on the real control plane: readiness flips of 400 pods (one GrpcService) at
//! 50, 200 and 1,000 flips/s for 60 s each (`CHURN_RATES`, `CHURN_SECS`), sent by concurrent
//! status patches to kube-apiserver while the real controller binary runs. Each flip's latency
//! is from the API server's acknowledgement of the patch to the key's change on an etcd watch of
//! the registry, and the controller's CPU time per flip. At the end the registry must equal the
//! ready pods (reported as a mismatch count). A bench binary: figures, no assertions.
//!
//! Every rate runs once per `--min-sync-interval` in `CHURN_INTERVALS` (default `0s,50ms`),
//! each on a fresh controller process: publishing every flip at once against folding the
//! flips that follow within the interval into one write. Beside them, the floor: the CPU of
//! one bare etcd-client txn per flip at the same rates, in a process that does nothing else.
//! `cargo bench --bench churn`.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Controller, count, ip, namespace, percentile, plane, ready_pods, ready_status};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use test_support::EtcdServer;

const PODS: usize = 400;

/// One flip: pod index, the state it was set to, when the patch was sent and acknowledged.
struct Flip {
    pod: usize,
    ready: bool,
    sent: Instant,
    acked: Instant,
}

/// Set in the floor probe's child process: `<etcd endpoint>;<rates>;<seconds>`.
const FLOOR: &str = "CHURN_FLOOR";

#[tokio::main]
async fn main() {
    if let Ok(spec) = std::env::var(FLOOR) {
        floor_probe(&spec).await;
        return;
    }
    let rates: Vec<u32> = std::env::var("CHURN_RATES")
        .unwrap_or_else(|_| "50,200,1000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("CHURN_RATES: flips per second"))
        .collect();
    let secs: u64 = std::env::var("CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let intervals: Vec<String> = std::env::var("CHURN_INTERVALS")
        .unwrap_or_else(|_| "0s,50ms".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    let plane = plane().await;
    let client = plane.client().await;
    let ns = "churn";
    namespace(&client, ns).await;
    common::service(&client, ns, "greeter", "greeter").await;
    ready_pods(&client, ns, PODS, |_| "greeter".to_owned()).await;
    let etcd = EtcdServer::start().await;
    let prefix = format!("services/{ns}/greeter/");
    let mut probe = etcd.client().await;
    let mut rows = Vec::new();
    let floor = {
        let (endpoint, rates) = (etcd.endpoint(), rates.clone());
        tokio::task::spawn_blocking(move || floor(&endpoint, &rates, secs.min(20)))
            .await
            .unwrap()
    };
    for (rate, ms) in rates.iter().zip(floor) {
        rows.push((
            format!("{rate} flips/s: floor: one bare etcd-client txn per flip, alone"),
            format!("{ms:.3} ms CPU per txn"),
        ));
    }

    // Key changes as a client sees them: (pod index, put?, when).
    let index: HashMap<String, usize> = (0..PODS)
        .map(|i| (format!("{prefix}{}:50051", ip(i)), i))
        .collect();
    let seen: Arc<Mutex<Vec<(usize, bool, Instant)>>> = Arc::default();
    {
        let mut watcher = etcd.client().await;
        let mut stream = watcher
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                let mut seen = seen.lock().unwrap();
                for event in resp.events() {
                    let key = event
                        .kv()
                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
                    if let Some(&pod) = key.as_ref().and_then(|k| index.get(k)) {
                        seen.push((pod, event.event_type() == EventType::Put, now));
                    }
                }
            }
        });
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut state = vec![true; PODS];
    let mut next = 0usize;
    for interval in &intervals {
        let mut controller = Controller::start_with(
            &plane,
            &etcd.endpoint(),
            ns,
            30,
            &[("MIN_SYNC_INTERVAL", interval)],
        );
        controller.synced().await;
        // The keys of the run before stay on the lease this controller adopts. The clock starts
        // once the registry holds the ready pods and the controller has reconciled, finished,
        // and started nothing for a second.
        let ready = state.iter().filter(|r| **r).count() as i64;
        let settled = async {
            let (mut last, mut since) = (f64::NAN, Instant::now());
            loop {
                let started = controller
                    .metric("grpc_registrar_reconciliations_total")
                    .await;
                let running = controller
                    .metric("grpc_registrar_reconciles_in_flight")
                    .await;
                let idle =
                    started >= 1.0 && running == 0.0 && count(&mut probe, &prefix).await == ready;
                if !idle || started != last {
                    (last, since) = (started, Instant::now());
                } else if since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), settled)
            .await
            .expect("the controller never settled on the ready pods");
        for &rate in &rates {
            let label = format!("{rate} flips/s, min sync {interval}");
            seen.lock().unwrap().clear();
            let flips: Arc<Mutex<Vec<Flip>>> = Arc::default();
            let limit = Arc::new(tokio::sync::Semaphore::new(256));
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let cpu_before = common::cpu_seconds(controller.pid());
            let ops_before = operations(&controller).await;
            let started = Instant::now();
            let mut tasks = Vec::new();
            while started.elapsed() < Duration::from_secs(secs) {
                ticker.tick().await;
                let pod = next % PODS;
                next += 1;
                state[pod] = !state[pod];
                let (ready, pods, flips) = (state[pod], pods.clone(), flips.clone());
                let permit = limit.clone().acquire_owned().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    pods.patch_status(
                        &format!("p-{pod}"),
                        &PatchParams::default(),
                        &Patch::Merge(ready_status(&ip(pod), ready)),
                    )
                    .await
                    .unwrap();
                    let acked = Instant::now();
                    drop(permit);
                    flips.lock().unwrap().push(Flip {
                        pod,
                        ready,
                        sent,
                        acked,
                    });
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let elapsed = started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // The controller's CPU over the run and the settling after it, per flip sent.
            let cpu = common::cpu_seconds(controller.pid()) - cpu_before;
            let ops: Vec<f64> = operations(&controller)
                .await
                .iter()
                .zip(&ops_before)
                .map(|(after, before)| after - before)
                .collect();

            // Match each flip to the first change of its key to that state after the ack.
            let seen = seen.lock().unwrap().clone();
            let flips = std::mem::take(&mut *flips.lock().unwrap());
            let (mut from_ack, mut from_send, mut unmatched) = (Vec::new(), Vec::new(), 0usize);
            for flip in &flips {
                let hit = seen.iter().find(|(pod, put, at)| {
                    *pod == flip.pod && *put == flip.ready && *at >= flip.sent
                });
                match hit {
                    Some((_, _, at)) => {
                        from_ack
                            .push(at.saturating_duration_since(flip.acked).as_secs_f64() * 1000.0);
                        from_send.push(at.duration_since(flip.sent).as_secs_f64() * 1000.0);
                    }
                    // A later flip of the same pod can supersede one before it is applied.
                    None => unmatched += 1,
                }
            }
            from_ack.sort_by(f64::total_cmp);
            from_send.sort_by(f64::total_cmp);
            let registered: BTreeSet<String> = probe
                .get(
                    prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .unwrap()
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect();
            let desired: BTreeSet<String> = (0..PODS)
                .filter(|&i| state[i])
                .map(|i| format!("{prefix}{}:50051", ip(i)))
                .collect();
            let mismatched = registered.symmetric_difference(&desired).count();
            rows.push((
                format!("{label}: achieved rate"),
                format!(
                    "{:.0} flips/s ({} flips in {elapsed:.1} s)",
                    flips.len() as f64 / elapsed,
                    flips.len()
                ),
            ));
            rows.push((
                format!("{label}: patch acked → key change on etcd watch"),
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms (target at 200/s: p50 < 10, p99 < 50)",
                    percentile(&from_ack, 0.5),
                    percentile(&from_ack, 0.99)
                ),
            ));
            rows.push((
                format!("{label}: patch sent → key change"),
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    percentile(&from_send, 0.5),
                    percentile(&from_send, 0.99)
                ),
            ));
            rows.push((
                format!("{label}: controller CPU per flip (target ≤ 0.5 ms)"),
                format!(
                    "{:.3} ms ({cpu:.2} s for {} flips)",
                    cpu * 1e3 / flips.len().max(1) as f64,
                    flips.len()
                ),
            ));
            let per_flip = |n: f64| n / flips.len().max(1) as f64;
            rows.push((
                format!("{label}: per flip: reconciles, registry ranges, txns"),
                format!(
                    "{:.2}, {:.2}, {:.2}",
                    per_flip(ops[0]),
                    per_flip(ops[1]),
                    per_flip(ops[2])
                ),
            ));
            rows.push((
                format!("{label}: superseded flips / final registry ≠ desired keys"),
                format!("{unmatched} / {mismatched}"),
            ));
            eprintln!("{label}: done");
        }
    }
    test_support::bench::report("churn", &rows);
}

/// The controller's reconciles, registry ranges and registry txns so far.
async fn operations(controller: &Controller) -> [f64; 3] {
    [
        controller
            .metric("grpc_registrar_reconciliations_total")
            .await,
        controller
            .metric("grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"range\"")
            .await,
        controller
            .metric("grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"txn\"")
            .await,
    ]
}

/// The floor: the CPU of one bare etcd-client txn per flip (a compare and a put on a lease or a
/// delete, as the controller sends for one flip) at each rate for `secs`, measured in a child process
/// that does nothing else. Milliseconds of CPU per txn, per rate.
fn floor(endpoint: &str, rates: &[u32], secs: u64) -> Vec<f64> {
    let rates_text: Vec<String> = rates.iter().map(u32::to_string).collect();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env(FLOOR, format!("{endpoint};{};{secs}", rates_text.join(",")))
        .output()
        .expect("failed to run the floor probe");
    assert!(
        output.status.success(),
        "the floor probe failed: {output:?}"
    );
    let figures: Vec<f64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("floor ")?.parse().ok())
        .collect();
    assert_eq!(
        figures.len(),
        rates.len(),
        "one figure per rate: {output:?}"
    );
    figures
}

/// The child's side of [`floor`]: prints `floor <ms per txn>` per rate.
async fn floor_probe(spec: &str) {
    let mut parts = spec.split(';');
    let (endpoint, rates, secs) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse::<u64>().unwrap(),
    );
    let mut client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let lease = client.lease_grant(3600, None).await.unwrap().id();
    client.put("floor/fence", "1", None).await.unwrap();
    let me = std::process::id();
    for rate in rates.split(',').map(|r| r.parse::<u32>().unwrap()) {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        let txns = u64::from(rate) * secs;
        let before = common::cpu_seconds(me);
        for i in 0..txns {
            ticker.tick().await;
            let i = usize::try_from(i).unwrap();
            let key = format!("floor/{}:50051", ip(i % PODS));
            // Each pod's key put, then deleted on its next turn, as flips alternate.
            let op = if (i / PODS).is_multiple_of(2) {
                TxnOp::put(
                    key,
                    r#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#,
                    Some(PutOptions::new().with_lease(lease)),
                )
            } else {
                TxnOp::delete(key, None)
            };
            let txn = Txn::new()
                .when([Compare::version("floor/fence", CompareOp::Greater, 0)])
                .and_then([op]);
            client.txn(txn).await.unwrap();
        }
        let cpu = common::cpu_seconds(me) - before;
        println!("floor {:.4}", cpu * 1e3 / txns as f64);
    }
}
