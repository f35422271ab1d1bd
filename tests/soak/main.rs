//! The nemesis soak: a seeded workload and seeded faults against the real binaries (two
//! leader-elected `grpc-registrar` replicas, kube-apiserver and kube-controller-manager, the
//! registry etcd behind a proxy that partitions it), judged by an independent checker.
//!
//! `SOAK_SECS` (default 100: the variant `make test` runs) and `SOAK_SEED` (default: random,
//! printed first) replay any run's schedule; `make soak` runs it for 600 s.

mod checker;
#[allow(dead_code, unused_imports)]
#[path = "../e2e/harness.rs"]
mod harness;
mod nemesis;
mod oracle;
mod rng;
mod timeline;
mod workload;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;
use test_support::{ControlPlane, EtcdServer, TcpProxy};

use checker::Checker;
use nemesis::{KINDS, Launcher, Nemesis};
use timeline::Timeline;
use workload::Workload;

const NS: &str = "soak";
/// The etcd lease TTL the replicas run with: partitions are drawn shorter and longer than it.
const TTL: u32 = 6;
const SERVICES: usize = 24;
/// How long after the faults stop the registry and every status must equal the oracle.
const CONVERGENCE: Duration = Duration::from_secs(20);

fn main() {
    let args = Arguments::from_args();
    let trial = Trial::test(
        "soak::seeded_faults_and_churn_never_delete_a_healthy_key_and_the_registry_converges",
        || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Failed::from(e.to_string()))?;
            runtime
                .block_on(soak())
                .map_err(|e| Failed::from(format!("{e:#}")))
        },
    );
    libtest_mimic::run(&args, vec![trial]).exit();
}

fn settings() -> anyhow::Result<(u64, u64)> {
    let secs = match std::env::var("SOAK_SECS") {
        Ok(s) => s.parse().context("SOAK_SECS must be a number of seconds")?,
        Err(_) => 100,
    };
    let seed = match std::env::var("SOAK_SEED") {
        Ok(s) if !s.is_empty() => s.parse().context("SOAK_SEED must be a u64")?,
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos();
            (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
        }
    };
    Ok((secs, seed))
}

async fn soak() -> anyhow::Result<()> {
    let (secs, seed) = settings()?;
    eprintln!("soak: seed {seed}, {secs} s (replay: SOAK_SEED={seed} SOAK_SECS={secs})");
    let plane = Arc::new(ControlPlane::start().await);
    let client = plane.client().await;
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-1",
                "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))?,
        )
        .await?;
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let proxy = TcpProxy::start(endpoint.trim_start_matches("http://").parse()?).await;
    let (foreign, revision) = seed_foreign_keys(&endpoint).await?;

    let tl = Arc::new(Timeline::new());
    let checker = Checker::new(tl.clone(), NS, f64::from(TTL), foreign);
    checker.spawn(client.clone(), endpoint.clone(), revision);
    let dir = test_support::workspace_root().join(format!("target/soak/{seed}"));
    // A replay starts with fresh logs (each replica appends across its restarts).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut workload = Workload::new(tl.clone(), client.clone(), NS, seed, SERVICES);
    let launcher = Launcher::new(plane.clone(), proxy.url(), NS, TTL, dir.clone()).await?;
    let mut nemesis = Nemesis::new(
        tl.clone(),
        launcher,
        etcd,
        proxy,
        workload.bursts.clone(),
        seed,
    );
    test_support::eventually(
        "the checker's watches have listed",
        Duration::from_secs(60),
        || async { checker.synced() },
    )
    .await;
    workload
        .setup()
        .await
        .context("failed to set up the workload")?;
    let started = tl.now();
    let until = started + secs as f64;
    eprintln!("soak: {SERVICES} services set up in {started:.1}s; faults and churn for {secs} s");

    // kube-apiserver restarts are expensive on 2 cores: about one per 100 s.
    tokio::join!(workload.run(until), nemesis.run(until, 100.0));
    nemesis.stop().await;
    let converged = checker.converge(&client, &endpoint, CONVERGENCE).await;
    checker.judge(f64::INFINITY);
    let foreign = checker.foreign_intact(&endpoint).await;
    for broken in &foreign {
        tl.violation(tl.now(), format!("isolation: {broken}"));
    }
    nemesis.kill_all().await;
    for i in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("replica-{i}.log"))).unwrap_or_default();
        // A panic, or a leader-elected replica reporting a second live writer (there is one
        // writer at a time; a deposed one is fenced).
        for line in log
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("another live controller writes"))
        {
            tl.violation(tl.now(), format!("health: replica {i} log: {line}"));
        }
    }
    let max_rss_mib = nemesis
        .max_rss_kib
        .load(std::sync::atomic::Ordering::Relaxed)
        / 1024;
    if max_rss_mib > 256 {
        tl.violation(
            tl.now(),
            format!("health: a replica's RSS reached {max_rss_mib} MiB"),
        );
    }
    if let Err(diff) = &converged {
        tl.violation(
            tl.now(),
            format!("convergence: not within {CONVERGENCE:?} of the faults stopping:\n    {diff}"),
        );
    }

    let counts = tl.counts();
    let tally = checker.tally();
    let violations = tl.violations();
    let mut table = format!(
        "\nsoak summary (seed {seed}, {secs} s of faults, TTL {TTL} s, {SERVICES} services)\n"
    );
    table.push_str("| what | count |\n| --- | --- |\n");
    for (kind, n) in counts.iter().filter(|(k, _)| KINDS.contains(&k.as_str())) {
        table.push_str(&format!("| fault: {kind} | {n} |\n"));
    }
    for (kind, n) in counts.iter().filter(|(k, _)| !KINDS.contains(&k.as_str())) {
        table.push_str(&format!("| workload: {kind} | {n} |\n"));
    }
    table.push_str(&format!(
        "| registry keys checked (distinct) | {} |\n| PUTs judged | {} |\n| DELETEs judged | {} |\n| DELETEs by lease expiry in a dark window | {} |\n| converged after the faults stopped | {} |\n| largest replica RSS | {max_rss_mib} MiB |\n| violations | {} |\n",
        tally.keys,
        tally.puts,
        tally.deletes,
        tally.exempt,
        converged.as_ref().map_or_else(|_| "no".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        violations.len(),
    ));
    eprintln!("{table}");
    if violations.is_empty() {
        if std::env::var_os("SOAK_VERBOSE").is_some() {
            eprintln!("timeline of faults:\n{}", tl.render(&KINDS));
        }
        return Ok(());
    }
    anyhow::bail!(
        "{} violations (seed {seed}; replay: SOAK_SEED={seed} SOAK_SECS={secs}; replica logs in {})\ntimeline of faults and violations:\n{}",
        violations.len(),
        dir.display(),
        tl.render(&KINDS)
    )
}

/// Keys the controller must never write or delete: another namespace's, ones beside its
/// scopes, and another cluster's keys inside its targets (on a lease marked as that cluster's).
/// Each value is the key itself. Returns them and the revision after seeding.
async fn seed_foreign_keys(endpoint: &str) -> anyhow::Result<(BTreeSet<String>, i64)> {
    let mut etcd = etcd_client::Client::connect([endpoint], None).await?;
    let lease = etcd.lease_grant(3600, None).await?.id();
    etcd.put(
        format!("grpc-registrar/leases/other/{lease:x}"),
        "other",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let mut foreign = BTreeSet::new();
    for (key, on_lease) in [
        (
            "services/soak-elsewhere/app/10.250.9.1:50051".to_owned(),
            false,
        ),
        ("soak-customer/svc-01/10.250.9.2:50051".to_owned(), false),
        ("unrelated/config".to_owned(), false),
        (format!("services/{NS}/svc-00/10.250.1.1:50051"), true),
        (format!("services/{NS}/svc-04/10.250.1.2:50051"), true),
        ("soak-custom/svc-01/10.250.1.3:50051".to_owned(), true),
    ] {
        let options = on_lease.then(|| etcd_client::PutOptions::new().with_lease(lease));
        let resp = etcd.put(key.as_str(), key.as_str(), options).await?;
        let _ = resp;
        foreign.insert(key);
    }
    let revision = etcd
        .get("unrelated/config", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    Ok((foreign, revision))
}
