//! The control plane computes real EndpointSlices: a Service's slice follows its pods' readiness,
//! as set by a test playing the kubelet.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::{ControlPlane, eventually};

/// How long the endpointslice controller may take to reflect a pod change.
const SLICE_DEADLINE: Duration = Duration::from_secs(30);

const SERVICE: &str = "greeter";
const POD: &str = "greeter-0";
const POD_IP: &str = "10.244.0.7";

fn object<T: k8s_openapi::serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("valid object")
}

/// Creates the namespace, a Node in `zone-a`, a Service selecting `app=greeter` on the named
/// port `grpc`, and a pod bound to the node with that named container port.
async fn greeter(client: &kube::Client, ns: &str, node: &str) {
    let create = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(&create, &object(json!({"metadata": {"name": ns}})))
        .await
        .expect("failed to create namespace");
    Api::<Node>::all(client.clone())
        .create(
            &create,
            &object(json!({"metadata": {
                "name": node,
                "labels": {"topology.kubernetes.io/zone": "zone-a"},
            }})),
        )
        .await
        .expect("failed to create node");
    Api::<Service>::namespaced(client.clone(), ns)
        .create(
            &create,
            &object(json!({
                "metadata": {"name": SERVICE},
                "spec": {
                    "selector": {"app": "greeter"},
                    "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}],
                },
            })),
        )
        .await
        .expect("failed to create service");
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(
            &create,
            &object(json!({
                "metadata": {"name": POD, "labels": {"app": "greeter"}},
                "spec": {
                    "nodeName": node,
                    "containers": [{
                        "name": "greeter",
                        "image": "greeter:test",
                        "ports": [{"name": "grpc", "containerPort": 50051}],
                    }],
                },
            })),
        )
        .await
        .expect("failed to create pod");
}

/// Patches the pod's status as a kubelet does once its container runs: phase, IPs and the
/// conditions, with `ContainersReady` and `Ready` set to `ready`.
async fn set_ready(client: &kube::Client, ns: &str, ready: bool) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = if ready { "True" } else { "False" };
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastTransitionTime": now});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(
            POD,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running",
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "hostIP": "192.168.0.10",
                "startTime": now,
                "conditions": [
                    condition("PodScheduled", "True"),
                    condition("Initialized", "True"),
                    condition("ContainersReady", status),
                    condition("Ready", status),
                ],
            }})),
        )
        .await
        .expect("failed to patch pod status");
}

/// The pod's endpoint in the Service's EndpointSlices, if any.
async fn endpoint(client: &kube::Client, ns: &str) -> Option<(EndpointSlice, Endpoint)> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={SERVICE}")))
        .await
        .ok()?;
    slices.items.into_iter().find_map(|slice| {
        let endpoint = slice
            .endpoints
            .iter()
            .flatten()
            .find(|e| e.addresses.iter().any(|a| a == POD_IP))?
            .clone();
        Some((slice, endpoint))
    })
}

async fn endpoint_ready(client: &kube::Client, ns: &str) -> Option<bool> {
    let (_, endpoint) = endpoint(client, ns).await?;
    endpoint.conditions?.ready
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_endpointslice_follows_pod_readiness() {
    let plane = ControlPlane::start().await;
    let client = plane.client().await;
    let (ns, node) = ("slice-readiness", "node-readiness");
    greeter(&client, ns, node).await;

    set_ready(&client, ns, true).await;
    eventually("the pod's endpoint to be ready", SLICE_DEADLINE, || async {
        endpoint_ready(&client, ns).await == Some(true)
    })
    .await;
    let (slice, endpoint) = endpoint(&client, ns).await.expect("the endpoint");
    assert_eq!(slice.address_type, "IPv4");
    let port = slice.ports.as_deref().unwrap_or_default();
    assert_eq!(port.len(), 1, "{port:?}");
    assert_eq!(port[0].name.as_deref(), Some("grpc"));
    assert_eq!(port[0].port, Some(50051));
    assert_eq!(endpoint.zone.as_deref(), Some("zone-a"));
    assert_eq!(endpoint.node_name.as_deref(), Some(node));
    let target = endpoint.target_ref.expect("a target ref");
    assert_eq!(target.kind.as_deref(), Some("Pod"));
    assert_eq!(target.name.as_deref(), Some(POD));
    assert_eq!(target.namespace.as_deref(), Some(ns));

    set_ready(&client, ns, false).await;
    eventually(
        "the pod's endpoint to be unready",
        SLICE_DEADLINE,
        || async { endpoint_ready(&client, ns).await == Some(false) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn endpointslices_keep_following_pods_after_an_api_server_restart() {
    let plane = ControlPlane::start().await;
    let client = plane.client().await;
    let (ns, node) = ("slice-restart", "node-restart");
    greeter(&client, ns, node).await;
    set_ready(&client, ns, true).await;
    eventually("the pod's endpoint to be ready", SLICE_DEADLINE, || async {
        endpoint_ready(&client, ns).await == Some(true)
    })
    .await;

    plane.restart_apiserver().await;
    let client = plane.client().await;
    set_ready(&client, ns, false).await;
    eventually(
        "the pod's endpoint to be unready after the restart",
        SLICE_DEADLINE,
        || async { endpoint_ready(&client, ns).await == Some(false) },
    )
    .await;
}
