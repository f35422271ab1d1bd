//! `make demo`: the product end to end on one machine, with nothing faked.
//!
//! A real kube-apiserver (and its etcd) with kube-controller-manager's endpointslice controller,
//! a registry etcd, the controller, real tonic Greeter servers standing in for the pods'
//! containers, and a tonic client resolving through tonic-etcd-resolver. Both sources are shown:
//! `greeter` publishes the pods its selector matches, `hello` the endpoints of a Service's
//! EndpointSlices. There is no kubelet, so the demo plays its part: it patches each pod's status
//! (IP and readiness) as a kubelet would.

mod consul;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::desired::Policy;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use test_support::{ControlPlane, EtcdServer};
use tokio::sync::watch;
use tonic_etcd_resolver::{LbChannel, Options, Resolver};

const TARGET: &str = "services/default/greeter";
const HELLO_TARGET: &str = "services/default/hello";
pub(crate) const PODS: [(&str, &str); 3] = [
    ("greeter-0", "127.0.0.11"),
    ("greeter-1", "127.0.0.12"),
    ("greeter-2", "127.0.0.13"),
];

pub(crate) fn step(text: &str) {
    println!("\n==> {text}");
}

/// A command's output, indented under its step.
pub(crate) fn show(output: &str) {
    println!("    {}", output.trim_end().replace('\n', "\n    "));
}

pub(crate) fn kubectl(plane: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = plane.kubectl(args);
    ensure!(ok, "kubectl {} failed: {err}", args.join(" "));
    Ok(out)
}

/// `kubectl delete grpcsvc <name>`, waiting for the finalizer to have removed every key.
pub(crate) fn delete_grpcsvc(plane: &ControlPlane, name: &str) -> anyhow::Result<()> {
    kubectl(
        plane,
        &[
            "delete",
            "grpcsvc",
            name,
            "-n",
            "default",
            "--wait=true",
            "--timeout=30s",
        ],
    )?;
    Ok(())
}

pub(crate) async fn set_ready(
    pods: &Api<Pod>,
    name: &str,
    ip: &str,
    ready: bool,
) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    // As a kubelet reports it, the container's readiness too (`kubectl get pods` reads it).
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
        "containerStatuses": [{
            "name": "server", "image": "greeter:demo", "imageID": "", "ready": ready,
            "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}}
        }]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("failed to patch status of {name}"))?;
    Ok(())
}

async fn wait_ready(resolver: &Resolver, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while resolver.ready_endpoints().len() != n {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the client never saw {n} endpoints");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

/// How many keys the registry holds under `target/`, read from the registry itself (not from a
/// client's view of it).
async fn keys_under(registry: &EtcdServer, target: &str) -> anyhow::Result<i64> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let response = registry
        .client()
        .await
        .get(format!("{target}/"), Some(options))
        .await
        .context("reading the registry")?;
    Ok(response.count())
}

async fn calls(channel: &LbChannel, n: usize) -> anyhow::Result<()> {
    calls_to(channel, n, &PODS).await
}

/// `n` calls, each printed with the pod whose IP (or `ip:port`) answered.
async fn calls_to(channel: &LbChannel, n: usize, pods: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut client = GreeterClient::new(channel.clone());
    let mut spread = BTreeMap::new();
    for i in 0..n {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("call {i}"),
            })
            .await
            .context("call failed")?
            .into_inner();
        let who = pods
            .iter()
            .find(|(_, ip)| reply.server.starts_with(ip))
            .map_or("?", |(pod, _)| pod);
        println!("    call {i:>2} answered by {} ({who})", reply.server);
        *spread.entry(who).or_insert(0) += 1;
    }
    println!("    spread: {spread:?}");
    Ok(())
}

/// `kubectl apply -f crds/grpcservice.yaml`, waiting until the API serves it.
pub(crate) fn install_crd(plane: &ControlPlane) -> anyhow::Result<()> {
    step("kubectl apply -f crds/grpcservice.yaml");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    show(&kubectl(
        plane,
        &["apply", "-f", &format!("{root}/crds/grpcservice.yaml")],
    )?);
    kubectl(
        plane,
        &[
            "wait",
            "--for=condition=established",
            "crd/grpcservices.grpc-registrar.io",
            "--timeout=60s",
        ],
    )?;
    Ok(())
}

/// The second source: a Service's EndpointSlices, computed from its pods by the real
/// kube-controller-manager (pod → EndpointSlice → controller → etcd).
async fn hello(plane: &ControlPlane, pods: &Api<Pod>, registry: &EtcdServer) -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    step("kubectl apply -f demo/hello.yaml   (a Service, a GrpcService with serviceRef, two pods)");
    show(&kubectl(
        plane,
        &["apply", "-f", &format!("{root}/demo/hello.yaml")],
    )?);
    // EndpointSlice addresses cannot be loopback: the servers listen on this host's address.
    let host = test_support::host_ip().to_string();
    let addrs = [format!("{host}:50061"), format!("{host}:50062")];
    let names = [
        ("hello-0", addrs[0].as_str()),
        ("hello-1", addrs[1].as_str()),
    ];
    step("Two real Greeter servers on this host's address, and the pods marked Ready");
    let mut servers = Vec::new();
    for (name, addr) in names {
        let server = GreeterServer::start(addr.parse()?).await?;
        println!("    {name}: serving on {}", server.addr());
        servers.push(server);
        set_ready(pods, name, &host, true).await?;
    }
    let resolver =
        Resolver::connect([registry.endpoint()], HELLO_TARGET, Options::default()).await?;
    let took = wait_ready(&resolver, 2).await?;
    println!(
        "    the client sees 2 endpoints of services/default/hello ({} ms after it started watching)",
        took.as_millis()
    );
    calls_to(&resolver.channel(), 4, &names).await?;

    step(
        "kubectl get endpointslices -l kubernetes.io/service-name=hello   (two ports, two slices)",
    );
    show(&kubectl(
        plane,
        &[
            "get",
            "endpointslices",
            "-n",
            "default",
            "-l",
            "kubernetes.io/service-name=hello",
        ],
    )?);
    step("kubectl get grpcsvc -o wide   (hello registered from its EndpointSlices)");
    kubectl(
        plane,
        &[
            "wait",
            "grpcsvc/hello",
            "-n",
            "default",
            "--for=jsonpath={.status.registeredEndpoints}=2",
            "--timeout=10s",
        ],
    )?;
    show(&kubectl(
        plane,
        &["get", "grpcsvc", "-n", "default", "-o", "wide"],
    )?);

    step("hello-1 turns unready: pod → its EndpointSlice → the registry");
    let flipped = Instant::now();
    set_ready(pods, "hello-1", &host, false).await?;
    wait_ready(&resolver, 1).await?;
    println!(
        "    out of the client's rotation in {} ms",
        flipped.elapsed().as_millis()
    );
    calls_to(&resolver.channel(), 2, &names).await?;

    step("kubectl delete grpcsvc hello: the finalizer removes its keys");
    delete_grpcsvc(plane, "hello")?;
    wait_ready(&resolver, 0).await?;
    println!(
        "    keys left under {HELLO_TARGET}/: {}; the client has no endpoints",
        keys_under(registry, HELLO_TARGET).await?
    );
    drop(servers);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into()),
        )
        .init();
    match std::env::var("BACKEND").as_deref() {
        Ok("consul") => return consul::run().await,
        Ok("etcd") | Err(_) => {}
        Ok(other) => bail!("BACKEND must be etcd or consul, not {other:?}"),
    }

    step(
        "Starting a real control plane (kube-apiserver + etcd, kube-controller-manager's endpointslice controller) and a registry etcd",
    );
    let plane = ControlPlane::start().await;
    let registry_etcd = EtcdServer::start().await;
    println!(
        "    kube-apiserver {}   kubeconfig {}",
        plane.url(),
        plane.kubeconfig().display()
    );
    println!("    registry etcd  {}", registry_etcd.endpoint());

    install_crd(&plane)?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

    step("Starting the grpc-registrar controller");
    let client = plane.client().await;
    let metrics = Arc::new(Metrics::default());
    let config = EtcdConfig {
        default_ttl: Duration::from_secs(10),
        ..EtcdConfig::new(vec![registry_etcd.endpoint()])
    };
    let registry = EtcdRegistry::connect(config, metrics.clone()).await?;
    let (stop, mut stopped) = watch::channel(false);
    let controller = tokio::spawn(controller::run(
        client.clone(),
        Arc::new(registry),
        Scope::default(),
        Policy::default(),
        metrics,
        Arc::new(AtomicBool::new(false)),
        grpc_registrar::leader::always_leader(),
        grpc_registrar::controller::Tuning::default(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    step("kubectl apply -f demo/greeter.yaml   (a GrpcService and three pods)");
    show(&kubectl(
        &plane,
        &["apply", "-f", &format!("{root}/demo/greeter.yaml")],
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

    step("A tonic client resolving services/default/greeter through tonic-etcd-resolver");
    let resolver =
        Resolver::connect([registry_etcd.endpoint()], TARGET, Options::default()).await?;
    let took = wait_ready(&resolver, 3).await?;
    println!(
        "    the client sees 3 endpoints ({} ms after it started watching)",
        took.as_millis()
    );
    calls(&resolver.channel(), 6).await?;

    step("kubectl get grpcsvc   (status is written at most once a second per service under churn)");
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

    step("greeter-1 fails its readiness probe (Ready=False): traffic leaves it");
    let flipped = Instant::now();
    set_ready(&pods, "greeter-1", "127.0.0.12", false).await?;
    wait_ready(&resolver, 2).await?;
    println!(
        "    deregistered and out of the client's rotation in {} ms",
        flipped.elapsed().as_millis()
    );
    calls(&resolver.channel(), 6).await?;

    step("greeter-1 is Ready again: traffic returns");
    let flipped = Instant::now();
    set_ready(&pods, "greeter-1", "127.0.0.12", true).await?;
    wait_ready(&resolver, 3).await?;
    println!(
        "    back in rotation in {} ms",
        flipped.elapsed().as_millis()
    );
    calls(&resolver.channel(), 6).await?;

    hello(&plane, &pods, &registry_etcd).await?;

    step("kubectl delete grpcsvc greeter: the finalizer removes every key");
    delete_grpcsvc(&plane, "greeter")?;
    wait_ready(&resolver, 0).await?;
    println!(
        "    keys left under {TARGET}/: {}; the client has no endpoints",
        keys_under(&registry_etcd, TARGET).await?
    );

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    drop(servers);
    step("Done: everything was real, and everything is stopped");
    Ok(())
}
