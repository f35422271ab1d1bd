//! grpc-registrar side by side with the self-registration pattern of the Go seeds.
//!
//! For N = 100, 1,000 and 5,000 endpoints (`SEED_SIZES` to choose), each on its own real etcd
//! (fsync on), steady state measured over the same window (`SEED_WINDOW_SECS`, default 30):
//! - seed: N simulated servers in one Go process (`tests/interop seed`), each with its own
//!   etcd client, lease (TTL 10 s), KeepAlive and `endpoints.Manager` put, as the seeds do;
//! - grpc-registrar: N ready pods in the real kube-apiserver selected by one GrpcService, the
//!   real controller binary with `--lease-ttl 10`.
//!
//! Reported: etcd leases, LeaseKeepAlive messages per second (etcd's own gRPC metrics), etcd CPU
//! time per second, the registering side's resident memory, and the ratios; then how long a
//! crashed server stays registered: seed, SIGKILL to key gone; grpc-registrar, the Ready=False
//! status patch to key gone (a kubelet adds its probe period, or ~1 s for a container exit).
//! A bench binary: figures, no assertions. `cargo bench --bench seed` (part of `make bench`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Controller, count, cpu_seconds, memory_mib, metric, namespace, plane, ready_pods};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use test_support::{EtcdServer, interop_bin};

/// etcd's LeaseKeepAlive messages received so far, from its `/metrics`.
async fn keepalives(etcd: &EtcdServer) -> f64 {
    let port: u16 = etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let page = common::http_get(port, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    metric(
        &page,
        "grpc_server_msg_received_total{grpc_method=\"LeaseKeepAlive\"",
    )
}

struct Steady {
    leases: usize,
    keepalives_per_s: f64,
    etcd_cpu_ms_per_s: f64,
    rss_mib: f64,
}

/// Measures etcd and the registering process `pid` over `window`.
async fn steady(etcd: &EtcdServer, pid: u32, window: Duration) -> Steady {
    // Settle first: registration itself is not steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let etcd_pid = etcd.pid().unwrap();
    let (cpu0, ka0) = (cpu_seconds(etcd_pid), keepalives(etcd).await);
    tokio::time::sleep(window).await;
    let (cpu1, ka1) = (cpu_seconds(etcd_pid), keepalives(etcd).await);
    let secs = window.as_secs_f64();
    let leases = etcd
        .client()
        .await
        .leases()
        .await
        .map_or(0, |r| r.leases().len());
    Steady {
        leases,
        keepalives_per_s: (ka1 - ka0) / secs,
        etcd_cpu_ms_per_s: (cpu1 - cpu0) * 1000.0 / secs,
        rss_mib: memory_mib(pid).0,
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.0}×", a / b)
    } else {
        "∞".into()
    }
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("SEED_SIZES")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SEED_SIZES: comma-separated counts")
        })
        .collect();
    let window = Duration::from_secs(
        std::env::var("SEED_WINDOW_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let plane = plane().await;
    let client = plane.client().await;
    let mut rows = Vec::new();
    let mut crash = None;
    for n in sizes {
        // The seed pattern.
        let etcd = EtcdServer::start().await;
        let mut seed = Command::new(interop_bin())
            .args([
                "seed",
                "-etcd",
                &etcd.endpoint(),
                "-target",
                "services/seed/greeter",
            ])
            .args(["-n", &n.to_string(), "-ttl", "10"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("failed to start the Go seed simulator");
        let mut line = String::new();
        BufReader::new(seed.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the seed simulator failed");
        let seeds = steady(&etcd, seed.id(), window).await;
        if crash.is_none() {
            // A crashed server: no more keep-alives; its key stays until the lease expires.
            let mut probe = etcd.client().await;
            let killed = Instant::now();
            let _ = seed.kill();
            let _ = seed.wait();
            while count(&mut probe, "services/seed/greeter/").await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            crash = Some(killed.elapsed());
        } else {
            let _ = seed.kill();
            let _ = seed.wait();
        }
        drop(etcd);

        // The same endpoints through grpc-registrar.
        let etcd = EtcdServer::start().await;
        let ns = format!("seed-{n}");
        namespace(&client, &ns).await;
        common::service(&client, &ns, "greeter", "greeter").await;
        ready_pods(&client, &ns, n, |_| "greeter".to_owned()).await;
        let mut controller = Controller::start(&plane, &etcd.endpoint(), &ns, 10);
        controller.synced().await;
        let mut probe = etcd.client().await;
        let prefix = format!("services/{ns}/greeter/");
        while count(&mut probe, &prefix).await < i64::try_from(n).unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ours = steady(&etcd, controller.pid(), window).await;

        rows.push((
            format!("N={n}: etcd leases, seed / grpc-registrar"),
            format!(
                "{} / {} ({})",
                seeds.leases,
                ours.leases,
                ratio(seeds.leases as f64, ours.leases as f64)
            ),
        ));
        rows.push((
            format!("N={n}: LeaseKeepAlive msgs/s, seed / grpc-registrar"),
            format!(
                "{:.1} / {:.2} ({})",
                seeds.keepalives_per_s,
                ours.keepalives_per_s,
                ratio(seeds.keepalives_per_s, ours.keepalives_per_s)
            ),
        ));
        rows.push((
            format!("N={n}: etcd CPU ms/s, seed / grpc-registrar"),
            format!(
                "{:.1} / {:.1} ({})",
                seeds.etcd_cpu_ms_per_s,
                ours.etcd_cpu_ms_per_s,
                ratio(seeds.etcd_cpu_ms_per_s, ours.etcd_cpu_ms_per_s)
            ),
        ));
        rows.push((
            format!("N={n}: registering side RSS, seed (all {n} servers' registry code) / grpc-registrar"),
            format!(
                "{:.1} MiB / {:.1} MiB ({})",
                seeds.rss_mib,
                ours.rss_mib,
                ratio(seeds.rss_mib, ours.rss_mib)
            ),
        ));

        if n == 100 {
            // Readiness lost → key gone, 20 times.
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let mut samples = Vec::new();
            for i in 0..20 {
                let name = format!("p-{i}");
                let key = format!("{prefix}{}:50051", common::ip(i));
                pods.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(common::ready_status(&common::ip(i), false)),
                )
                .await
                .unwrap();
                let acked = Instant::now();
                while count(&mut probe, &key).await > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                samples.push(acked.elapsed().as_secs_f64() * 1000.0);
            }
            samples.sort_by(f64::total_cmp);
            rows.push((
                "crashed server stays registered: seed (SIGKILL → key gone, TTL 10 s)".into(),
                format!("{:.2} s", crash.unwrap_or_default().as_secs_f64()),
            ));
            rows.push((
                "crashed server stays registered: grpc-registrar (Ready=False acked → key gone, 20 pods)"
                    .into(),
                format!(
                    "p50 {:.1} ms, max {:.1} ms (+ kubelet detection: ~1 s for a container exit, probe period × failureThreshold for a hang)",
                    common::percentile(&samples, 0.5),
                    samples[samples.len() - 1]
                ),
            ));
        }
        drop(controller);
        eprintln!("N={n}: done");
    }
    test_support::bench::report("seed", &rows);
}
