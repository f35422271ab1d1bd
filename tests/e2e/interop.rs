//! Go clients against what the controller publishes: go-kratos' own discovery.

use std::process::Command;

use grpc_registrar::desired::{CustomTargets, Policy};
use serde_json::json;
use test_support::interop_bin;

use crate::Plane;
use crate::harness::Env;

/// Runs the Go interop client with `args` and returns its JSON report, failing on a non-zero
/// exit.
pub async fn go_client(args: &[&str]) -> serde_json::Value {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(interop_bin())
            .args(&args)
            .output()
            .expect("failed to run the Go interop client")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the Go interop client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// No call failed and the client's balancer reached every server (pass the Go client
/// `-expect <servers>`: a balancer picks only connections already up, and on a loaded machine
/// the last one may come up after the first calls).
pub fn every_server_answered(result: &serde_json::Value, servers: &[greeter::GreeterServer]) {
    assert_eq!(result["failed"], 0, "{result}");
    for server in servers {
        assert!(
            result["servers"][server.addr().to_string()]
                .as_u64()
                .is_some_and(|n| n > 0),
            "the balancer reaches every server: {result}"
        );
    }
}

/// A GrpcService with `format: Kratos` publishes each ready pod as a kratos `ServiceInstance`
/// under `/microservices/<name>/<pod>`; a real kratos client (its etcd registry and
/// `discovery:///` dialer) finds the real tonic servers behind them and spreads calls over all.
pub async fn a_kratos_client_calls_every_server_published_with_the_kratos_format(
    plane: Plane,
    ns: String,
) {
    let policy = Policy {
        custom_targets: CustomTargets::Namespaces(vec![ns.clone()]),
        ..Policy::default()
    };
    let env = Env::with_policy(plane, &ns, policy).await;
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            greeter::GreeterServer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    env.service(
        "hello",
        json!({"selector": {"matchLabels": {"app": "hello"}}, "port": "grpc",
               "format": "Kratos", "target": "/microservices/hello",
               "metadata": {"version": "v1"}}),
    )
    .await;
    for (i, server) in servers.iter().enumerate() {
        let name = format!("hello-{i}");
        env.pod(&name, json!({"app": "hello"}), server.addr().port())
            .await;
        env.set_ready(&name, "127.0.0.1", true).await;
    }
    crate::harness::eventually("three kratos instances", || async {
        env.keys_under("/microservices/hello/").await.len() == 3
    })
    .await;
    let value = &env.keys_under("/microservices/hello/").await["/microservices/hello/hello-0"];
    assert_eq!(
        value,
        &format!(
            r#"{{"id":"hello-0","name":"hello","version":"v1","metadata":{{"namespace":"{ns}","node":"node-1","pod":"hello-0","version":"v1","zone":"zone-a"}},"endpoints":["grpc://{}"]}}"#,
            servers[0].addr()
        )
    );

    let endpoint = env.etcd.endpoint();
    let result = go_client(&[
        "kratos", "-etcd", &endpoint, "-name", "hello", "-n", "60", "-wait", "10s", "-expect", "3",
    ])
    .await;
    every_server_answered(&result, &servers);
    env.shutdown().await;
}

/// Servers published through `serviceRef` (pod → EndpointSlice computed by the real
/// kube-controller-manager → controller → etcd) are reached by Go's own etcd naming resolver
/// with round_robin, with no code from us. Endpoint addresses cannot be loopback, so the
/// servers listen on this host's address.
pub async fn go_etcd_naming_resolver_reaches_servers_published_through_a_service_ref(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    let host = test_support::host_ip();
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            greeter::GreeterServer::start(std::net::SocketAddr::new(host, 0))
                .await
                .unwrap(),
        );
    }
    env.k8s_service("hello", Some(json!({"app": "hello"})))
        .await;
    env.service(
        "hello-grpc",
        json!({"serviceRef": {"name": "hello", "port": "grpc"}}),
    )
    .await;
    for (i, server) in servers.iter().enumerate() {
        let name = format!("hello-{i}");
        env.pod(&name, json!({"app": "hello"}), server.addr().port())
            .await;
        env.set_ready(&name, &host.to_string(), true).await;
    }
    let target = format!("services/{ns}/hello-grpc");
    crate::harness::eventually("three endpoints, one per server port", || async {
        env.keys_under(&format!("{target}/")).await.len() == 3
    })
    .await;

    let endpoint = env.etcd.endpoint();
    let result = go_client(&[
        "call", "-etcd", &endpoint, "-target", &target, "-n", "60", "-expect", "3",
    ])
    .await;
    every_server_answered(&result, &servers);
    env.shutdown().await;
}
