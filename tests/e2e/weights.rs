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
