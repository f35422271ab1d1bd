//! `helm install` of the chart into the real API server, then the controller binary run with
//! exactly the Deployment's environment and the chart ServiceAccount's identity (a token from
//! the TokenRequest API): the registration flow completes, so the chart's RBAC is sufficient,
//! and the identity cannot do what the controller never needs.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use test_support::{helm_bin, workspace_root};

use crate::Plane;
use crate::harness::{Env, eventually, leader_of};

const RELEASE: &str = "reg";
const FULLNAME: &str = "reg-grpc-registrar";

fn helm(plane: &Plane, args: &[&str]) -> String {
    let out = Command::new(helm_bin())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .args(args)
        .output()
        .expect("failed to run helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm {args:?} failed:\n{text}");
    text
}

/// A kubeconfig for the chart's ServiceAccount, with a token from the TokenRequest API.
fn service_account_kubeconfig(
    plane: &Plane,
    ns: &str,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let (ok, token, err) = plane.kubectl(&["create", "token", FULLNAME, "-n", ns, "--duration=1h"]);
    assert!(ok, "kubectl create token failed: {err}");
    let mut config = kube::config::Kubeconfig::read_from(plane.kubeconfig()).unwrap();
    for named in &mut config.auth_infos {
        named.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.trim().to_owned().into()),
            ..Default::default()
        });
    }
    let path = dir.join("service-account.kubeconfig");
    std::fs::write(&path, serde_saphyr::to_string(&config).unwrap()).unwrap();
    path
}

async fn client_from(path: &std::path::Path) -> kube::Client {
    let config = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The controller container's environment as the Deployment defines it, with the downward API
/// resolved as the kubelet would, and the metrics port moved off the shared 8080.
fn container_env(deployment: &Deployment, ns: &str) -> BTreeMap<String, String> {
    let container = &deployment.spec.template.spec.as_ref().unwrap().containers[0];
    container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => "reg-controller-0".to_owned(),
                        Some("metadata.namespace") => ns.to_owned(),
                        other => panic!("unexpected env source {other:?} for {}", var.name),
                    }
                }
                (None, None) => String::new(),
            };
            let value = if var.name == "METRICS_ADDR" {
                "127.0.0.1:0".to_owned()
            } else {
                value
            };
            (var.name.clone(), value)
        })
        .collect()
}

/// The common `helm install` settings of these tests: the shared control plane's CRD was
/// applied with kubectl (as the README's kubectl path does), so the chart leaves it alone; short
/// leader-election timings.
const COMMON_SETS: [&str; 5] = [
    "crds.install=false",
    "etcd.leaseTTL=10",
    "leaderElection.leaseDuration=3s",
    "leaderElection.renewDeadline=2s",
    "leaderElection.retryPeriod=500ms",
];

/// The chart installed, and the controller binary running as its Deployment would: the
/// container's environment, the ServiceAccount's token, metrics on `metrics_port`. The
/// controller is killed (its log printed on a failure) when this is dropped.
struct Installed {
    kubeconfig: std::path::PathBuf,
    log: std::path::PathBuf,
    deployment: Deployment,
    _dir: tempfile::TempDir,
    _stop: Box<dyn std::any::Any + Send>,
}

impl Installed {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Deployment's readiness probe: its path, and whether it targets the metrics port.
    fn readiness_path(&self) -> String {
        let container = &self
            .deployment
            .spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("the chart's Deployment has an HTTP readiness probe");
        let port = &probe.port;
        let metrics_port = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("the container names its metrics port");
        assert!(
            *port
                == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                    "metrics".into()
                )
                || *port
                    == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                        metrics_port.container_port
                    ),
            "the readiness probe targets the metrics port: {port:?}"
        );
        probe.path.clone().expect("a probe path")
    }
}

/// `helm install`s the chart into `ns` with `sets` (beside [`COMMON_SETS`]), then runs the
/// controller binary with exactly the Deployment's environment and the chart ServiceAccount's
/// identity, serving its metrics on `metrics_port`.
async fn install_and_run(
    plane: &Plane,
    env: &Env,
    sets: &[String],
    metrics_port: u16,
) -> Installed {
    let ns = env.ns.as_str();
    let chart = workspace_root().join("charts/grpc-registrar");
    let mut args: Vec<String> = [
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        ns,
    ]
    .map(str::to_owned)
    .to_vec();
    let watch = format!("watchNamespace={ns}");
    for set in sets
        .iter()
        .map(String::as_str)
        .chain([watch.as_str()])
        .chain(COMMON_SETS)
    {
        args.push("--set".to_owned());
        args.push(set.to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm(plane, &args);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let list = helm(plane, &["list", "--namespace", ns]);
    assert!(list.contains(RELEASE), "{list}");

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let deployment = deployments
        .get(FULLNAME)
        .await
        .expect("the chart's Deployment");
    let mut container_env = container_env(&deployment, ns);
    container_env.insert("METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(plane, ns, dir.path());
    let log = dir.path().join("controller.log");
    let mut controller = Command::new(env!("CARGO_BIN_EXE_grpc-registrar"))
        .env_clear()
        .envs(&container_env)
        .env("KUBECONFIG", &kubeconfig)
        .env("LOG_FORMAT", "plain")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let shown = log.clone();
    let stop = scopeguard(move || {
        let _ = controller.kill();
        let _ = controller.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log ---\n{}",
                std::fs::read_to_string(&shown).unwrap_or_default()
            );
        }
    });
    Installed {
        kubeconfig,
        log,
        deployment,
        _dir: dir,
        _stop: Box::new(stop),
    }
}

pub async fn helm_install_then_the_charts_service_account_runs_the_whole_flow(
    plane: Plane,
    ns: String,
) {
    let env = Env::without_controller(plane.clone(), &ns).await;
    let endpoints = format!("etcd.endpoints={{{}}}", env.etcd.endpoint());
    let installed = install_and_run(&plane, &env, &[endpoints], 0).await;
    let kubeconfig = installed.kubeconfig.clone();

    // The registration flow, done by the ServiceAccount identity.
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"}),
    )
    .await;
    for (i, name) in ["g-0", "g-1"].iter().enumerate() {
        env.pod(name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(name, &format!("10.50.0.{}", i + 1), true)
            .await;
    }
    let logs = || installed.log();
    let keys = ["greeter/10.50.0.1:50051", "greeter/10.50.0.2:50051"];
    env.expect_keys("registered under the chart's identity", &keys)
        .await;
    assert_eq!(
        leader_of(&env.client, &ns, FULLNAME).await.as_deref(),
        Some("reg-controller-0"),
        "the chart's leader-election Role lets it hold the Lease"
    );
    eventually("status Ready", || {
        env.condition_is("greeter", "Ready", "True")
    })
    .await;
    env.set_ready("g-1", "10.50.0.2", false).await;
    env.expect_keys("deregistered", &keys[..1]).await;
    env.services()
        .delete("greeter", &DeleteParams::default())
        .await
        .unwrap();
    eventually("finalizer released and keys gone", || async {
        env.services().get_opt("greeter").await.unwrap().is_none() && env.keys().await.is_empty()
    })
    .await;
    assert!(
        !logs().to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{}",
        logs()
    );

    // What the identity must not do.
    let sa = client_from(&kubeconfig).await;
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &ns);
    let err = secrets.list(&Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    let all_pods: Api<Pod> = Api::all(sa);
    let err = all_pods.list(&Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );

    helm(&plane, &["uninstall", RELEASE, "--namespace", &ns]);
}

/// Runs `f` on drop.
fn scopeguard(f: impl FnOnce() + Send + 'static) -> impl Drop + Send + 'static {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The first hour of a Consul install: the chart with `backend: consul` against a real Consul.
/// The controller, run as the Deployment defines it, passes the chart's own readiness probe
/// (it used to answer 503 "etcd: unreachable" forever), exports only Consul's backend series,
/// publishes a passing instance, and says so when Consul goes away.
pub async fn helm_install_with_backend_consul_passes_the_charts_readiness_probe(
    plane: Plane,
    ns: String,
) {
    let env = Env::without_controller(plane.clone(), &ns).await;
    let mut consul = test_support::consul::Consul::start().await;
    let port = test_support::free_port();
    let installed = install_and_run(
        &plane,
        &env,
        &[
            "backend=consul".to_owned(),
            format!("consul.address={}", consul.http_addr()),
        ],
        port,
    )
    .await;
    let probe = installed.readiness_path();
    eventually("the chart's readiness probe passes", || async {
        test_support::http_get(port, &probe)
            .await
            .is_some_and(|(code, body)| {
                code == 200 && body.contains("registry: reachable (consul)")
            })
    })
    .await;
    let metrics = test_support::http_get(port, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("grpc_registrar_backend_connected{backend=\"consul\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("backend=\"etcd\""),
        "no etcd series: {metrics}"
    );
    assert!(
        metrics.contains("grpc_registrar_reconcile_failures_total{error=\"consul\"} 0")
            && metrics
                .contains("grpc_registrar_backend_errors_total{backend=\"consul\",op=\"read\"} 0"),
        "Consul's failure series start at 0: {metrics}"
    );

    // The controller does its job under the chart's identity, under the namespace's own name
    // (no namespace is trusted with flat names by default).
    let service = format!("greeter--{ns}");
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc",
               "backend": "Consul"}),
    )
    .await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.51.0.1", true).await;
    eventually("a passing instance", || async {
        test_support::consul::passing(&consul.http_addr(), &service, 0, std::time::Duration::ZERO)
            .await
            .0
            == ["10.51.0.1:50051"]
    })
    .await;
    eventually("status Ready", || {
        env.condition_is("greeter", "Ready", "True")
    })
    .await;
    assert!(
        test_support::http_get(port, "/metrics")
            .await
            .unwrap()
            .1
            .contains("grpc_registrar_registry_request_duration_seconds_count{backend=\"consul\",op=\"txn\"}"),
        "Consul requests are timed"
    );

    // Consul goes away: the probe says so, naming the registry in use.
    consul.stop();
    eventually("the readiness probe fails, naming consul", || async {
        test_support::http_get(port, &probe)
            .await
            .is_some_and(|(code, body)| {
                code == 503 && body.contains("registry: unreachable, see the log (consul)")
            })
    })
    .await;
    consul.restart().await;
    eventually("the readiness probe passes again", || async {
        test_support::http_get(port, &probe)
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await;
    assert!(
        !installed.log().to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{}",
        installed.log()
    );
    drop(installed);
    helm(&plane, &["uninstall", RELEASE, "--namespace", &ns]);
}
