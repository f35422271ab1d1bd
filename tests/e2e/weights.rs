//! Weights (issue 15's controller side): `spec.weight` and a pod's `grpc-registrar.io/weight`
//! annotation reach the registry as `metadata.weight`, through the real API server.

use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::Plane;
use crate::harness::{Env, eventually};

fn weight_of(keys: &std::collections::BTreeMap<String, String>, key: &str) -> Option<String> {
    let value = keys.get(key)?;
    let endpoint = tonic_etcd_resolver::format::parse(value.as_bytes()).ok()?;
    endpoint
        .metadata?
        .get("weight")?
        .as_str()
        .map(str::to_owned)
}

pub async fn the_service_weight_and_a_pod_annotation_reach_the_registry_and_a_bad_annotation_is_reported(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc", "weight": 5}),
    )
    .await;
    for (i, name) in ["w-0", "w-1"].iter().enumerate() {
        env.pod(name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(name, &format!("10.7.0.{}", i + 1), true)
            .await;
    }
    let annotate = |value: &'static str| {
        let pods = env.pods();
        async move {
            pods.patch(
                "w-1",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"grpc-registrar.io/weight": value}}}),
                ),
            )
            .await
            .expect("failed to annotate the pod");
        }
    };
    annotate("20").await;
    let key = |ip: &str| format!("services/{ns}/greeter/{ip}:50051");
    eventually(
        "the service weight on w-0 and the annotation's on w-1",
        || async {
            let keys = env.keys().await;
            weight_of(&keys, &key("10.7.0.1")).as_deref() == Some("5")
                && weight_of(&keys, &key("10.7.0.2")).as_deref() == Some("20")
        },
    )
    .await;

    // Not a weight: the pod stays registered with the service's weight, and status names it.
    annotate("heavy").await;
    eventually("w-1 back on the service weight, named in the Ready message", || async {
        let keys = env.keys().await;
        let message = env.condition("greeter", "Ready").await["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        weight_of(&keys, &key("10.7.0.2")).as_deref() == Some("5")
            && message.contains("1 with a grpc-registrar.io/weight annotation that is not an integer from 1 to 10000")
            && message.contains("(w-1)")
    })
    .await;
    assert!(env.condition_is("greeter", "Ready", "True").await);
    env.shutdown().await;
}

/// The controller's half of the weight contract meets the resolver's: pods annotated 300 and
/// 100 get about three calls in four and one in four from a weighted tonic client.
pub async fn a_weighted_tonic_client_follows_the_weights_the_controller_publishes(
    plane: Plane,
    ns: String,
) {
    use greeter::pb::HelloRequest;
    use greeter::pb::greeter_client::GreeterClient;
    use tonic_etcd_resolver::{Balance, Options, Resolver};

    let env = Env::new(plane, &ns).await;
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(
            greeter::GreeterServer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    env.service(
        "hello",
        json!({"selector": {"matchLabels": {"app": "hello"}}, "port": "grpc"}),
    )
    .await;
    for (i, (server, weight)) in servers.iter().zip(["300", "100"]).enumerate() {
        let name = format!("hello-{i}");
        env.pod(&name, json!({"app": "hello"}), server.addr().port())
            .await;
        env.pods()
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"grpc-registrar.io/weight": weight}}}),
                ),
            )
            .await
            .unwrap();
        env.set_ready(&name, "127.0.0.1", true).await;
    }
    let target = format!("services/{ns}/hello");
    let resolver = Resolver::connect(
        [env.etcd.endpoint()],
        &target,
        Options::default().balance(Balance::Weighted),
    )
    .await
    .unwrap();
    eventually("both weighted endpoints seen", || async {
        let endpoints = resolver.endpoints().borrow().clone();
        endpoints.len() == 2
            && endpoints
                .iter()
                .all(|(_, e)| e.metadata.as_ref().and_then(|m| m.get("weight")).is_some())
    })
    .await;
    eventually("both endpoints connected", || async {
        resolver.ready_endpoints().len() == 2
    })
    .await;
    let mut client = GreeterClient::new(resolver.channel());
    let mut answered = std::collections::BTreeMap::new();
    for i in 0..400 {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("call {i}"),
            })
            .await
            .unwrap()
            .into_inner();
        *answered.entry(reply.server).or_insert(0u32) += 1;
    }
    let heavy = answered
        .get(&servers[0].addr().to_string())
        .copied()
        .unwrap_or(0);
    // Smooth weighted round-robin is deterministic: 3 of every 4 calls, give or take the
    // moment the second endpoint joined.
    assert!(
        (290..=310).contains(&heavy),
        "weight 300 of 400 should take ~300 of 400 calls: {answered:?}"
    );
    env.shutdown().await;
}
