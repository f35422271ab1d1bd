//! The Consul backend end to end: the real API server, the controller publishing into a real
//! Consul agent, real tonic servers, and the Go client Consul users run (blocking
//! `Health().Service(name, passing)` queries feeding grpc-go's round_robin).

use std::sync::Arc;
use std::time::Duration;

use grpc_registrar::crd::Backend;
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulRegistry};
use kube::api::DeleteParams;
use serde_json::json;
use test_support::consul::Consul;

use crate::Plane;
use crate::harness::{Env, eventually};
use crate::interop::{every_server_answered, go_client};

async fn env_with_consul(plane: Plane, ns: &str, consul: &Consul) -> Env {
    let config = ConsulConfig {
        default_ttl: Duration::from_secs(10),
        ..ConsulConfig::new(consul.http_addr())
    };
    let registry = ConsulRegistry::connect(config, Arc::new(Metrics::default()))
        .expect("failed to build the consul client");
    // The test's namespace is trusted with flat Consul names (each test has its own Consul).
    let policy = Policy {
        backend: Backend::Consul,
        custom_targets: CustomTargets::Namespaces(vec![ns.to_owned()]),
        ..Policy::default()
    };
    Env::with_backend(plane, ns, policy, Arc::new(registry)).await
}

/// A GET on Consul's HTTP API, as JSON (`[]` when it does not answer).
async fn get(consul: &Consul, path: &str) -> serde_json::Value {
    match reqwest::get(format!("{}{path}", consul.http_addr())).await {
        Ok(resp) if resp.status().is_success() => resp.json().await.unwrap_or(json!([])),
        _ => json!([]),
    }
}

/// Addresses of the passing instances of `service`, as a passing-only client sees them.
async fn passing(consul: &Consul, service: &str) -> Vec<String> {
    test_support::consul::passing(&consul.http_addr(), service, 0, Duration::ZERO)
        .await
        .0
}

pub async fn a_go_consul_client_calls_every_ready_server_and_follows_readiness_and_deletion(
    plane: Plane,
    ns: String,
) {
    let consul = Consul::start().await;
    let env = env_with_consul(plane, &ns, &consul).await;
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            greeter::GreeterServer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let service = format!("hello-{}", &ns[ns.len() - 8..]);
    env.service(
        "hello",
        json!({"selector": {"matchLabels": {"app": "hello"}}, "port": "grpc",
               "backend": "Consul", "consul": {"service": service, "tags": ["grpc"]}}),
    )
    .await;
    for (i, server) in servers.iter().enumerate() {
        let name = format!("hello-{i}");
        env.pod(&name, json!({"app": "hello"}), server.addr().port())
            .await;
        env.set_ready(&name, "127.0.0.1", true).await;
    }
    eventually("three passing instances", || async {
        passing(&consul, &service).await.len() == 3
    })
    .await;
    // Status counts are written at most once a second per service: wait for the last write.
    eventually(
        "status: 3 registered under the Consul service name, Ready",
        || async {
            let status = env.status("hello").await;
            status["target"] == service.as_str()
                && status["registeredEndpoints"] == 3
                && env.condition_is("hello", "Ready", "True").await
        },
    )
    .await;

    let addr = consul.http_addr();
    let result = go_client(&[
        "consul", "-consul", &addr, "-name", &service, "-tag", "grpc", "-n", "60",
    ])
    .await;
    every_server_answered(&result, &servers);

    // Unready: out of the passing set, and the Go client's calls no longer reach it.
    env.set_ready("hello-1", "127.0.0.1", false).await;
    let gone = servers[1].addr().to_string();
    eventually("hello-1 no longer passing", || async {
        let now = passing(&consul, &service).await;
        now.len() == 2 && !now.contains(&gone)
    })
    .await;
    let result = go_client(&["consul", "-consul", &addr, "-name", &service, "-n", "30"]).await;
    assert_eq!(result["failed"], 0, "{result}");
    assert!(result["servers"].get(&gone).is_none(), "{result}");

    // Deleting the GrpcService deregisters every instance before its finalizer is released.
    env.services()
        .delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the GrpcService gone", || async {
        env.services().get_opt("hello").await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        get(&consul, &format!("/v1/catalog/service/{service}")).await,
        json!([]),
        "instances left after deletion"
    );
    env.shutdown().await;
}

/// A Go `consul-watch` client (blocking passing-only health queries): every change of the
/// instance set it sees, as JSON lines, until dropped.
struct ConsulWatch {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl ConsulWatch {
    fn start(consul: &Consul, service: &str) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(test_support::interop_bin())
            .args([
                "consul-watch",
                "-consul",
                &consul.http_addr(),
                "-name",
                service,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("failed to start the Go consul-watch client");
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { child, lines }
    }

    /// The instance sets seen so far.
    fn seen(&self) -> Vec<usize> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["addrs"].as_array().map_or(0, Vec::len))
            .collect()
    }
}

impl Drop for ConsulWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two real controller processes on Consul: SIGKILL of the leader. The standby takes over and
/// keeps the node's check passing; a passing-only client never sees an instance leave, and
/// nothing is deregistered.
pub async fn sigkill_of_the_consul_leader_fails_over_with_no_instance_ever_leaving(
    plane: Plane,
    ns: String,
) {
    use crate::failover::until_leader;

    let (consul, env, service) = greeters_on_consul(&plane, &ns, 44).await;
    let replica = |name: &str| consul_replica(&plane, &env, &consul, name);
    let mut a = replica("a");
    until_leader(&env, "a").await;
    let _b = replica("b");
    eventually("three passing instances", || async {
        passing(&consul, &service).await.len() == 3
    })
    .await;
    let watch = ConsulWatch::start(&consul, &service);
    eventually("the Go client sees three instances", || async {
        watch.seen().last() == Some(&3)
    })
    .await;
    let alive = || async {
        get(&consul, "/v1/health/node/grpc-registrar").await[0]["Output"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let renewed_by_a = alive().await;

    a.kill();
    until_leader(&env, "b").await;
    // b renews the node's check (its output changes) and serves changes.
    eventually("b renews the node's check", || async {
        alive().await != renewed_by_a
    })
    .await;
    env.set_ready("g-3", "10.44.0.3", false).await;
    eventually("b deregisters an unready pod", || async {
        passing(&consul, &service).await.len() == 2
    })
    .await;
    env.set_ready("g-3", "10.44.0.3", true).await;
    eventually("and registers it again", || async {
        passing(&consul, &service).await.len() == 3
    })
    .await;
    // Across the failover, the only change a passing-only client saw was the one we made.
    eventually("the client saw the pod come back", || async {
        watch.seen().last() == Some(&3) && watch.seen().len() >= 3
    })
    .await;
    assert_eq!(
        watch.seen(),
        [3, 2, 3],
        "a passing-only client saw instances leave across the failover"
    );
}

/// The README's promise for an invalid edit, on Consul: the last valid spec stays published
/// (still following readiness) until it is fixed, across a leader failover and a SIGKILL and
/// restart, each past the TTL. A passing-only client sees only the pods made unready leave, and
/// status counts what Consul holds while it says InvalidSpec.
pub async fn an_invalid_consul_specs_last_valid_instances_survive_a_failover_and_a_restart_and_follow_readiness(
    plane: Plane,
    ns: String,
) {
    use crate::failover::until_leader;
    const TTL: u64 = 10;

    let (consul, env, service) = greeters_on_consul(&plane, &ns, 45).await;
    let replica = |name: &str| consul_replica(&plane, &env, &consul, name);
    let mut a = replica("a");
    until_leader(&env, "a").await;
    let mut b = replica("b");
    eventually("three passing instances", || async {
        passing(&consul, &service).await.len() == 3
    })
    .await;

    // An invalid edit (a flat name this namespace is not trusted with): the instances stay.
    env.services()
        .patch(
            "greeter",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"consul": {"service": "refunds"}}})),
        )
        .await
        .unwrap();
    eventually("InvalidSpec", || async {
        env.condition_is("greeter", "InvalidSpec", "True").await
    })
    .await;
    let watch = ConsulWatch::start(&consul, &service);
    eventually("the Go client sees three instances", || async {
        watch.seen().last() == Some(&3)
    })
    .await;

    // Failover past the TTL: the new leader keeps the instances and follows readiness.
    a.kill();
    let killed = std::time::Instant::now();
    until_leader(&env, "b").await;
    tokio::time::sleep(Duration::from_secs(TTL + 2).saturating_sub(killed.elapsed())).await;
    assert_eq!(
        passing(&consul, &service).await.len(),
        3,
        "kept across the failover"
    );
    env.set_ready("g-3", "10.45.0.3", false).await;
    eventually("the new leader deregisters an unready pod", || async {
        passing(&consul, &service).await.len() == 2
    })
    .await;
    crate::failover::registered_in_status(&env, 2).await;

    // SIGKILL and restart past the TTL: the same.
    b.kill();
    let killed = std::time::Instant::now();
    let _c = replica("c");
    until_leader(&env, "c").await;
    tokio::time::sleep(Duration::from_secs(TTL + 2).saturating_sub(killed.elapsed())).await;
    assert_eq!(
        passing(&consul, &service).await.len(),
        2,
        "kept across the restart"
    );
    env.set_ready("g-2", "10.45.0.2", false).await;
    eventually(
        "the restarted process deregisters an unready pod",
        || async { passing(&consul, &service).await.len() == 1 },
    )
    .await;
    crate::failover::registered_in_status(&env, 1).await;
    eventually("the client saw the last change", || async {
        watch.seen().last() == Some(&1)
    })
    .await;
    assert_eq!(
        watch.seen(),
        [3, 2, 1],
        "a passing-only client saw more than the two unready pods leave"
    );
    assert!(
        passing(&consul, "refunds").await.is_empty(),
        "the invalid name was published"
    );
    assert!(env.condition_is("greeter", "InvalidSpec", "True").await);
}

/// A Consul server and a namespace with no controller, where the GrpcService `greeter` selects
/// three ready pods (`10.<subnet>.0.1-3`); no namespace is trusted with flat names, so its
/// Consul service is `greeter--<namespace>` (returned).
async fn greeters_on_consul(plane: &Plane, ns: &str, subnet: u8) -> (Consul, Env, String) {
    let consul = Consul::start().await;
    let env = Env::without_controller(plane.clone(), ns).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc",
               "backend": "Consul"}),
    )
    .await;
    for i in 1..=3u8 {
        let name = format!("g-{i}");
        env.pod(&name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(&name, &format!("10.{subnet}.0.{i}"), true)
            .await;
    }
    (consul, env, format!("greeter--{ns}"))
}

/// A controller process of `env`'s namespace publishing into `consul` (TTL 10 s), replica `name`.
fn consul_replica(
    plane: &Plane,
    env: &Env,
    consul: &Consul,
    name: &str,
) -> crate::harness::ControllerProcess {
    crate::harness::ControllerProcess::builder(plane, &env.etcd.endpoint(), &env.ns, 10)
        .env("BACKEND", "consul")
        .env("CONSUL_HTTP_ADDR", consul.http_addr())
        .replica(name)
        .start()
}
