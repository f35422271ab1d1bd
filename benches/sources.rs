//! The two endpoint sources side by side on the real control plane, in one run: pods read by
//! the controller (`spec.selector`) and a Service's EndpointSlices (`spec.serviceRef`). A bench
//! binary: figures, no assertions. `cargo bench --bench sources` (part of `make bench`).
//!
//! 1. **Propagation.** A pod's readiness flips, alternating between a pod selected by a
//!    `selector` GrpcService and a pod behind a Service that a `serviceRef` GrpcService names
//!    (pod → EndpointSlice by kube-controller-manager → controller → etcd). Each flip is timed
//!    from just before its status patch to the key's PUT or DELETE on an etcd watch of the
//!    registry; watches on the pods and on the slice split that time into hops.
//!    `SOURCES_FLIPS` flips each way per source (default 200), paced under
//!    kube-controller-manager's client rate limit (20 requests/s, burst 30); then 200
//!    serviceRef flips back to back, to show that limit.
//! 2. **Footprint.** The real controller binary started over N registrable endpoints behind
//!    100 GrpcServices: N ready pods (selector), or N endpoints in hand-made EndpointSlices of
//!    100 endpoints each, of selector-less headless Services (serviceRef; made by hand so that
//!    kube-controller-manager's own cost at 100k is not part of the figure; the controller
//!    reads only the slices, the Services are there because a cluster would have them). Time
//!    from start to every key, RSS and CPU. `SOURCES_SIZES` (default `10000,100000`; empty: part 1 only).

mod common;

use std::time::{Duration, Instant};

use common::{
    Controller, arrival, count, cpu_seconds, each, endpoint_slice, kube_service, memory_mib,
    namespace, node, percentile, plane_with_endpoint_slices, pod_on, ready_pods, ready_status,
    service, service_ref, stamped_watch,
};
use etcd_client::{EventType, WatchOptions};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use test_support::{ControlPlane, EtcdServer};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// GrpcServices (and, for slices, Services) per size, the same for both sources.
const SERVICES: usize = 100;
/// Part 1 starts a pair of flips (one per source) at most this often: 10 slice writes/s for
/// kube-controller-manager, under its client's default 20 requests/s.
const PACE: Duration = Duration::from_millis(100);
/// Part 1's back-to-back serviceRef flips, beyond the rate limiter's burst of 30.
const BURST: usize = 200;
/// Endpoints per hand-made EndpointSlice (the endpointslice controller's default maximum).
const PER_SLICE: usize = 100;

type Rows = Vec<(String, String)>;

#[tokio::main]
async fn main() {
    let run = Instant::now();
    let flips: usize = std::env::var("SOURCES_FLIPS").map_or(200, |s| {
        s.trim()
            .parse()
            .expect("SOURCES_FLIPS: flips per direction")
    });
    let sizes: Vec<usize> = std::env::var("SOURCES_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .expect("SOURCES_SIZES: comma-separated endpoint counts")
        })
        .collect();
    let plane = plane_with_endpoint_slices().await;
    let client = plane.client().await;
    node(&client, "node-1", "zone-a").await;

    let mut rows = Rows::new();
    let baseline = propagation(&plane, &client, flips, &mut rows).await;
    let mut fed = Vec::new();
    for &n in &sizes {
        for source in [Source::Pods, Source::Slices] {
            let f = footprint(&plane, &client, source, n).await;
            f.rows(baseline, &mut rows);
            fed.push(f);
        }
    }
    // The marginal cost per endpoint between the smallest and the largest size: the
    // controller's fixed cost cancels out.
    if let (Some(&small), Some(&large)) = (sizes.iter().min(), sizes.iter().max())
        && large > small
    {
        for source in [Source::Pods, Source::Slices] {
            let at = |n: usize| fed.iter().find(|f| f.source == source && f.n == n);
            let (Some(a), Some(b)) = (at(small), at(large)) else {
                continue;
            };
            rows.push((
                format!(
                    "{}: RSS per endpoint added, {small} → {large}",
                    source.label()
                ),
                format!(
                    "{:.0} B held (+2 s); {:.0} B at peak",
                    (b.rss - a.rss) * 1_048_576.0 / (large - small) as f64,
                    (b.peak - a.peak) * 1_048_576.0 / (large - small) as f64
                ),
            ));
        }
    }
    rows.push((
        "whole run".to_owned(),
        format!("{:.0} s", run.elapsed().as_secs_f64()),
    ));
    test_support::bench::report("sources", &rows);
}

/// The namespace of the propagation part.
const NS: &str = "flips";
/// The pod a `selector` GrpcService selects, and its IP.
const DIRECT: (&str, &str) = ("direct-0", "10.9.0.1");
/// The pod behind the Service `greeter` that a `serviceRef` GrpcService names, and its IP.
const SLICED: (&str, &str) = ("sliced-0", "10.9.0.2");

/// Each flip's clocks, all read as the events arrived.
struct Flip {
    ready: bool,
    sent: Instant,
    /// The pod's new readiness on a pod watch.
    pod: Instant,
    /// Its endpoint's new readiness on an EndpointSlice watch (the serviceRef path).
    slice: Option<Instant>,
    /// The key's PUT or DELETE on an etcd watch of the registry.
    key: Instant,
}

/// Part 1: readiness flips through both sources, interleaved. Returns the controller's RSS
/// (MiB) after them: a controller holding next to nothing, the baseline for part 2.
async fn propagation(
    plane: &ControlPlane,
    client: &kube::Client,
    flips: usize,
    rows: &mut Rows,
) -> f64 {
    namespace(client, NS).await;
    kube_service(client, NS, "greeter", Some("greeter")).await;
    service(client, NS, "by-pods", "direct").await;
    service_ref(client, NS, "by-slices", "greeter").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for (name, ip, app) in [
        (DIRECT.0, DIRECT.1, "direct"),
        (SLICED.0, SLICED.1, "greeter"),
    ] {
        pod_on(client, NS, name, app, "node-1").await;
        patch(&pods, name, ip, true).await;
    }

    // The registry etcd fsyncs, as in production.
    let etcd = EtcdServer::start().await;
    let mut controller = Controller::start(plane, &etcd.endpoint(), NS, 30);
    controller.synced().await;
    let mut probe = etcd.client().await;
    let started = Instant::now();
    for prefix in [prefix("by-pods"), prefix("by-slices")] {
        while count(&mut probe, &prefix).await != 1 {
            assert!(
                started.elapsed() < common::WATCH_PATIENCE,
                "no key under {prefix}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Watches from now on, each stamping events as they arrive.
    let (pod_tx, pod_rx) = unbounded_channel();
    let (slice_tx, slice_rx) = unbounded_channel();
    let (key_tx, key_rx) = unbounded_channel();
    let _pods = stamped_watch(
        pods.clone(),
        watcher::Config::default(),
        pod_tx,
        |p: &Pod| {
            let ready = p
                .status
                .as_ref()?
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Some((p.metadata.name.clone()?, ready))
        },
    )
    .await;
    let _slices = stamped_watch(
        Api::<EndpointSlice>::namespaced(client.clone(), NS),
        watcher::Config::default().labels("kubernetes.io/service-name=greeter"),
        slice_tx,
        |s: &EndpointSlice| {
            s.endpoints
                .iter()
                .flatten()
                .find(|e| e.addresses.iter().any(|a| a == SLICED.1))
                .map(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        },
    )
    .await;
    let mut watch = probe
        .watch(
            format!("services/{NS}/"),
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let _keys = common::AbortOnDrop(tokio::spawn(async move {
        while let Ok(Some(resp)) = watch.message().await {
            let at = Instant::now();
            for e in resp.events() {
                if let Some(kv) = e.kv() {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let _ = key_tx.send((at, (key, e.event_type() == EventType::Put)));
                }
            }
        }
    }));

    let mut watches = Watches {
        pods: pod_rx,
        slices: slice_rx,
        keys: key_rx,
    };
    let (mut direct, mut sliced) = (Vec::new(), Vec::new());
    // Both pods are ready: the first flip of each is to not ready. Paced: kube-controller-
    // manager's client allows 20 requests/s (burst 30), and back to back the slice writes
    // would queue behind its rate limiter (measured apart below).
    for i in 0..2 * flips {
        let ready = i % 2 == 1;
        let paced = tokio::time::sleep(PACE);
        direct.push(watches.flip(&pods, DIRECT, "by-pods", ready).await);
        sliced.push(watches.flip(&pods, SLICED, "by-slices", ready).await);
        paced.await;
    }
    // The serviceRef path back to back, each flip sent once the last one's key changed.
    let burst_started = Instant::now();
    let mut burst = Vec::new();
    for i in 0..BURST {
        burst.push(watches.flip(&pods, SLICED, "by-slices", i % 2 == 1).await);
    }
    let burst_rate = BURST as f64 / burst_started.elapsed().as_secs_f64();
    let (rss, _) = memory_mib(controller.pid());
    drop(controller);

    let ms = |from: Instant, to: Instant| {
        // Two watches may deliver one change in either order: a negative hop is kept as such.
        if to >= from {
            to.duration_since(from).as_secs_f64() * 1e3
        } else {
            -(from.duration_since(to).as_secs_f64() * 1e3)
        }
    };
    let hop = |flips: &[Flip], ready: Option<bool>, f: &dyn Fn(&Flip) -> f64| -> Vec<f64> {
        flips
            .iter()
            .filter(|x| ready.is_none_or(|r| x.ready == r))
            .map(f)
            .collect()
    };
    for (label, flips) in [("selector", &direct), ("serviceRef", &sliced)] {
        rows.push((
            format!("{label}: Ready patch sent → key PUT (etcd watch)"),
            summary(hop(flips, Some(true), &|x| ms(x.sent, x.key))),
        ));
        rows.push((
            format!("{label}: Ready=false patch sent → key DELETE"),
            summary(hop(flips, Some(false), &|x| ms(x.sent, x.key))),
        ));
    }
    let mut both: Vec<f64> = hop(&direct, None, &|x| ms(x.sent, x.pod));
    both.extend(hop(&sliced, None, &|x| ms(x.sent, x.pod)));
    rows.push((
        "  hop, both: patch sent → pod change on a watch (API server)".to_owned(),
        summary(both),
    ));
    rows.push((
        "  hop, selector: pod change → key change (controller)".to_owned(),
        summary(hop(&direct, None, &|x| ms(x.pod, x.key))),
    ));
    let slice = |x: &Flip| x.slice.expect("a serviceRef flip has a slice time");
    rows.push((
        "  hop, serviceRef: pod change → slice change on a watch (kcm)".to_owned(),
        summary(hop(&sliced, None, &|x| ms(x.pod, slice(x)))),
    ));
    rows.push((
        "  hop, serviceRef: slice change → key change (controller)".to_owned(),
        summary(hop(&sliced, None, &|x| ms(slice(x), x.key))),
    ));
    rows.push((
        format!(
            "serviceRef, back to back ({:.0} flips/s): patch sent → key change",
            burst_rate
        ),
        summary(hop(&burst, None, &|x| ms(x.sent, x.key))),
    ));
    rows.push((
        "  hop, back to back: pod change → slice change (kcm, rate-limited)".to_owned(),
        summary(hop(&burst, None, &|x| ms(x.pod, slice(x)))),
    ));
    rows.push((
        "controller RSS with 2 endpoints, after the flips (the baseline)".to_owned(),
        format!("{rss:.1} MiB"),
    ));
    for (name, value) in rows.iter() {
        eprintln!("{name}: {value}");
    }
    rss
}

fn prefix(target: &str) -> String {
    format!("services/{NS}/{target}/")
}

/// The bench's watches on the pods, the slice and the registry, each event stamped on arrival.
struct Watches {
    /// (pod name, Ready).
    pods: UnboundedReceiver<(Instant, (String, bool))>,
    /// The `SLICED` endpoint's `ready`.
    slices: UnboundedReceiver<(Instant, bool)>,
    /// (key, PUT rather than DELETE).
    keys: UnboundedReceiver<(Instant, (String, bool))>,
}

impl Watches {
    /// Patches `pod`'s readiness and waits for the change on every watch on its path.
    async fn flip(
        &mut self,
        pods: &Api<Pod>,
        (name, ip): (&str, &str),
        target: &str,
        ready: bool,
    ) -> Flip {
        let sent = Instant::now();
        patch(pods, name, ip, ready).await;
        let pod = arrival(&mut self.pods, sent, |(n, r)| n == name && *r == ready).await;
        let key = arrival(&mut self.keys, sent, |(k, put)| {
            k.starts_with(&prefix(target)) && *put == ready
        })
        .await;
        let slice = if name == SLICED.0 {
            Some(arrival(&mut self.slices, sent, |r| *r == ready).await)
        } else {
            None
        };
        Flip {
            ready,
            sent,
            pod,
            slice,
            key,
        }
    }
}

async fn patch(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(ready_status(ip, ready)),
    )
    .await
    .unwrap();
}

/// `p50 / p99 / max` in ms, and the sample count.
fn summary(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} flips)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or(f64::NAN),
        samples.len()
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Pods,
    Slices,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Self::Pods => "selector",
            Self::Slices => "serviceRef",
        }
    }

    fn namespace(self, n: usize) -> String {
        match self {
            Self::Pods => format!("pods-{n}"),
            Self::Slices => format!("slices-{n}"),
        }
    }
}

/// One controller start over one source at one size.
struct Footprint {
    source: Source,
    n: usize,
    /// Creating the objects through the API (and, for pods, readying them).
    setup: Duration,
    /// Process start → `/readyz` (caches synced).
    synced: Duration,
    /// Process start → every key in the registry.
    all: Duration,
    /// RSS (MiB) when the last key was seen, 2 s later, and the high-water mark then.
    rss_at_keys: f64,
    rss: f64,
    peak: f64,
    cpu: f64,
    /// Reconciles run, and failed.
    reconciles: f64,
    failures: f64,
    /// etcd txns (the key writes, in batches).
    txns: f64,
}

/// Part 2: N endpoints of one source behind [`SERVICES`] GrpcServices, then the controller.
async fn footprint(
    plane: &ControlPlane,
    client: &kube::Client,
    source: Source,
    n: usize,
) -> Footprint {
    let ns = source.namespace(n);
    namespace(client, &ns).await;
    let setup = Instant::now();
    match source {
        Source::Pods => {
            each(SERVICES, |s| {
                let (client, ns) = (client.clone(), ns.clone());
                async move { service(&client, &ns, &format!("svc-{s}"), &format!("svc-{s}")).await }
            })
            .await;
            ready_pods(client, &ns, n, |i| format!("svc-{}", i % SERVICES)).await;
        }
        Source::Slices => {
            each(SERVICES, |s| {
                let (client, ns) = (client.clone(), ns.clone());
                async move {
                    let name = format!("svc-{s}");
                    kube_service(&client, &ns, &name, None).await;
                    service_ref(&client, &ns, &name, &name).await;
                }
            })
            .await;
            // Slice j belongs to Service j % SERVICES and lists endpoints j*100 .. j*100+99.
            each(n.div_ceil(PER_SLICE), |j| {
                let (client, ns) = (client.clone(), ns.clone());
                async move {
                    let ips: Vec<String> = (j * PER_SLICE..((j + 1) * PER_SLICE).min(n))
                        .map(common::ip)
                        .collect();
                    let (service, part) = (j % SERVICES, j / SERVICES);
                    let name = format!("svc-{service}");
                    endpoint_slice(&client, &ns, &format!("{name}-{part}"), &name, &ips).await;
                }
            })
            .await;
        }
    }
    let setup = setup.elapsed();
    eprintln!(
        "{}: {n} endpoints set up in {:.1} s",
        source.label(),
        setup.as_secs_f64()
    );

    // The registry etcd fsyncs, as in production.
    let etcd = EtcdServer::start().await;
    let mut probe = etcd.client().await;
    let prefix = format!("services/{ns}/");
    let started = Instant::now();
    let mut controller = Controller::start(plane, &etcd.endpoint(), &ns, 30);
    controller.synced().await;
    let synced = started.elapsed();
    while count(&mut probe, &prefix).await < i64::try_from(n).unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all keys after 10 min"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = started.elapsed();
    let (rss_at_keys, _) = memory_mib(controller.pid());
    // Let status writes settle, then read what is held and the peak.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, peak) = memory_mib(controller.pid());
    let f = Footprint {
        source,
        n,
        setup,
        synced,
        all,
        rss_at_keys,
        rss,
        peak,
        cpu: cpu_seconds(controller.pid()),
        reconciles: controller
            .metric("grpc_registrar_reconcile_duration_seconds_count")
            .await,
        failures: controller
            .metric("grpc_registrar_reconcile_failures_total")
            .await,
        txns: controller
            .metric("grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"txn\"}")
            .await,
    };
    eprintln!(
        "{}: {n} endpoints: all keys {:.2} s after start, RSS {:.1} MiB",
        source.label(),
        f.all.as_secs_f64(),
        f.rss
    );
    f
}

impl Footprint {
    fn rows(&self, baseline: f64, rows: &mut Rows) {
        let (n, label) = (self.n, self.source.label());
        let what = match self.source {
            Source::Pods => format!("{n} pods created and readied"),
            Source::Slices => format!(
                "{} slices × {PER_SLICE} made by hand, not by kcm",
                n.div_ceil(PER_SLICE)
            ),
        };
        rows.push((
            format!("{label}, {n} endpoints / {SERVICES} GrpcServices: setup: {what}"),
            format!("{:.1} s", self.setup.as_secs_f64()),
        ));
        rows.push((
            format!("{label}, {n}: controller start → synced / all keys"),
            format!(
                "{:.2} s / {:.2} s ({:.0} µs per endpoint)",
                self.synced.as_secs_f64(),
                self.all.as_secs_f64(),
                self.all.as_secs_f64() * 1e6 / n as f64
            ),
        ));
        rows.push((
            format!("{label}, {n}: controller CPU (to all keys + 2 s); reconciles; etcd txns"),
            format!(
                "{:.1} s; {:.0} ({:.0} failed); {:.0}",
                self.cpu, self.reconciles, self.failures, self.txns
            ),
        ));
        rows.push((
            format!("{label}, {n}: controller RSS at all keys / +2 s / peak"),
            format!(
                "{:.1} / {:.1} / {:.1} MiB; {:.0} B per endpoint over the baseline",
                self.rss_at_keys,
                self.rss,
                self.peak,
                (self.rss - baseline) * 1_048_576.0 / n as f64
            ),
        ));
    }
}
