//! `make demo BACKEND=consul`: the same product with Consul's catalog as the registry, resolved
//! by the Go client Consul users run (blocking passing-only `Health().Service` queries feeding
//! grpc-go's round_robin), and Consul's own HTTP API and DNS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use greeter::GreeterServer;
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::crd::Backend;
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulRegistry};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use test_support::ControlPlane;
use test_support::consul::Consul;
use tokio::sync::watch;

use crate::{PODS, delete_grpcsvc, install_crd, kubectl, set_ready, show, step};

/// Passing instances of `service` by blocking query from `index`: (addresses, next index).
async fn passing(consul: &str, service: &str, index: u64) -> (Vec<String>, u64) {
    test_support::consul::passing(consul, service, index, Duration::from_secs(10)).await
}

/// Waits (blocking queries, as a client would) until `n` instances pass; returns how long.
async fn wait_passing(consul: &str, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut index = 0;
    loop {
        let (addrs, next) = passing(consul, "greeter", index).await;
        if addrs.len() == n {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("consul never listed {n} passing instances (last: {addrs:?})");
        }
        index = next;
    }
}

/// `n` calls from the Go Consul client, printed with the pods that answered.
fn go_calls(consul: &str, n: usize) -> anyhow::Result<()> {
    let out = std::process::Command::new(test_support::interop_bin())
        .args([
            "consul",
            "-consul",
            consul.trim_start_matches("http://"),
            "-name",
            "greeter",
            "-tag",
            "grpc",
            "-n",
            &n.to_string(),
        ])
        .output()
        .context("failed to run the Go consul client (scripts/interop.sh builds it)")?;
    if !out.status.success() {
        bail!(
            "the Go consul client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut spread = BTreeMap::new();
    for (addr, count) in result["servers"].as_object().into_iter().flatten() {
        let who = PODS
            .iter()
            .find(|(_, ip)| addr.starts_with(ip))
            .map_or("?", |(pod, _)| pod);
        spread.insert(who, count.as_u64().unwrap_or(0));
    }
    println!(
        "    {n} calls from Go (consul:///greeter, round_robin), failed: {}; spread: {spread:?}",
        result["failed"]
    );
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    step(
        "Starting a real control plane (kube-apiserver + etcd) and a real Consul server (v1.20.2)",
    );
    let plane = ControlPlane::start_without_controller_manager().await;
    let consul = Consul::start().await;
    let addr = consul.http_addr();
    println!(
        "    kube-apiserver {}   kubeconfig {}",
        plane.url(),
        plane.kubeconfig().display()
    );
    println!("    consul         {addr}   dns {}", consul.dns_addr());
    install_crd(&plane)?;

    step(
        "Starting the grpc-registrar controller with --backend consul --custom-target-namespaces=default",
    );
    let client = plane.client().await;
    let metrics = Arc::new(Metrics::default());
    let config = ConsulConfig {
        default_ttl: Duration::from_secs(10),
        ..ConsulConfig::new(addr.clone())
    };
    let registry = ConsulRegistry::connect(config, metrics.clone())?;
    let (stop, mut stopped) = watch::channel(false);
    let controller = tokio::spawn(controller::run(
        client.clone(),
        Arc::new(registry),
        Scope::default(),
        // The demo's namespace is the platform's: trusted with flat Consul names, so the
        // GrpcService publishes as `greeter` (elsewhere it would be `greeter--<namespace>`).
        Policy {
            backend: Backend::Consul,
            custom_targets: CustomTargets::Namespaces(vec!["default".to_owned()]),
            ..Policy::default()
        },
        metrics,
        Arc::new(AtomicBool::new(false)),
        grpc_registrar::leader::always_leader(),
        grpc_registrar::controller::Tuning::default(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    step("kubectl apply -f demo/greeter-consul.yaml   (backend: Consul, three pods)");
    show(&kubectl(
        &plane,
        &["apply", "-f", &format!("{root}/demo/greeter-consul.yaml")],
    )?);

    step("Starting three real tonic Greeter servers, one per pod IP, and marking the pods Ready");
    let mut servers = Vec::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, ip) in PODS {
        let server = GreeterServer::start(format!("{ip}:50051").parse()?).await?;
        println!("    {name}: serving on {}", server.addr());
        servers.push(server);
        set_ready(&pods, name, ip, true).await?;
    }
    let took = wait_passing(&addr, 3).await?;
    println!(
        "    3 passing instances of greeter in Consul's catalog ({} ms)",
        took.as_millis()
    );

    step("What Consul users see: the catalog, and a Go client on blocking health queries");
    let (instances, _) = passing(&addr, "greeter", 0).await;
    println!("    GET /v1/health/service/greeter?passing=true -> {instances:?}");
    go_calls(&addr, 6)?;

    step("kubectl get grpcsvc");
    kubectl(
        &plane,
        &[
            "wait",
            "grpcsvc/greeter",
            "-n",
            "default",
            "--for=jsonpath={.status.registeredEndpoints}=3",
            "--timeout=10s",
        ],
    )?;
    show(&kubectl(&plane, &["get", "grpcsvc", "-n", "default"])?);

    step("greeter-1 fails its readiness probe (Ready=False): it leaves the passing set");
    let flipped = Instant::now();
    set_ready(&pods, "greeter-1", "127.0.0.12", false).await?;
    wait_passing(&addr, 2).await?;
    println!(
        "    deregistered and gone from a blocking passing-only query in {} ms",
        flipped.elapsed().as_millis()
    );
    go_calls(&addr, 6)?;

    step("kubectl delete grpcsvc greeter: the finalizer deregisters every instance");
    delete_grpcsvc(&plane, "greeter")?;
    let (left, _) = passing(&addr, "greeter", 0).await;
    println!(
        "    passing instances of greeter left in Consul: {}",
        left.len()
    );

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    drop(servers);
    step("Done: everything was real, and everything is stopped");
    Ok(())
}
