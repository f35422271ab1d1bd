//! `serviceRef`: the endpoints of a Service's EndpointSlices, computed by the real
//! kube-controller-manager from pods made ready through the API, or made by hand.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use tonic_etcd_resolver::format;

use crate::Plane;
use crate::harness::{Env, eventually};

/// Creates `n` pods labelled `app` with IPs `10.<subnet>.<i/250>.<i%250+1>`, all made ready, a
/// few at a time.
async fn ready_pods(env: &Env, app: &str, subnet: u8, n: usize) -> Vec<(String, String)> {
    let pods: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("{app}-{i}"),
                format!("10.{subnet}.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    futures::stream::iter(pods.clone())
        .for_each_concurrent(16, |(name, ip)| async move {
            env.pod(&name, json!({"app": app}), 50051).await;
            env.set_ready(&name, &ip, true).await;
        })
        .await;
    pods
}

fn addrs(env: &Env, target: &str, keys: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let prefix = format!("services/{}/{target}/", env.ns);
    keys.into_iter()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// A Service with 150 ready pods spans several EndpointSlices; every endpoint is registered
/// (peers that replace the address set on each slice event keep only one slice's worth), with
/// its pod, node and zone, and a pod turning unready flows pod → slice → etcd.
pub async fn a_service_spanning_several_slices_registers_every_endpoint_with_its_named_port(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.k8s_service("big", Some(json!({"app": "big"}))).await;
    env.service(
        "big-grpc",
        json!({"serviceRef": {"name": "big", "port": "grpc"}}),
    )
    .await;
    let pods = ready_pods(&env, "big", 61, 150).await;
    let want: BTreeSet<String> = pods.iter().map(|(_, ip)| format!("{ip}:50051")).collect();
    eventually("150 endpoints registered", || async {
        addrs(&env, "big-grpc", env.keys().await.into_keys()) == want
    })
    .await;
    let slices = env.slices_of("big").await;
    assert!(
        slices.len() >= 2,
        "150 endpoints span several slices, got {}",
        slices.len()
    );
    let keys = env.keys().await;
    let value = &keys[&format!("services/{ns}/big-grpc/10.61.0.1:50051")];
    let endpoint = format::parse(value.as_bytes()).unwrap();
    assert_eq!(
        endpoint.metadata.unwrap(),
        json!({"namespace": ns, "node": "node-1", "pod": "big-0", "zone": "zone-a"})
    );
    eventually("status counts endpoints", || async {
        let s = env.status("big-grpc").await;
        s["selectedEndpoints"] == 150 && s["readyEndpoints"] == 150
    })
    .await;

    env.set_ready("big-7", "10.61.0.8", false).await;
    eventually("the unready pod's endpoint leaves", || async {
        !env.keys()
            .await
            .contains_key(&format!("services/{ns}/big-grpc/10.61.0.8:50051"))
    })
    .await;
    let ready = env.condition("big-grpc", "Ready").await;
    eventually("the message says why", || async {
        let ready = env.condition("big-grpc", "Ready").await;
        ready["message"]
            == "149 of 150 endpoints of Service big registered; not registered: 1 not ready"
    })
    .await;
    assert_eq!(ready["status"], "True");
    assert_eq!(env.keys().await.len(), 149);
    env.shutdown().await;
}

/// A rolling replacement (a new pod made ready, then an old one deleted with a grace period, as
/// a Deployment does) never deletes a healthy endpoint: the only keys ever deleted are the old
/// pods', each as soon as its pod is terminating, while the pod still exists.
pub async fn a_rolling_replacement_loses_no_healthy_endpoint_and_leaves_no_stale_one(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.k8s_service("roll", Some(json!({"app": "roll"}))).await;
    env.service(
        "roll-grpc",
        json!({"serviceRef": {"name": "roll", "port": "grpc"}}),
    )
    .await;
    let old = ready_pods(&env, "roll", 62, 3).await;
    let key = |ip: &str| format!("services/{ns}/roll-grpc/{ip}:50051");
    env.expect_keys(
        "three v1 endpoints",
        &[
            "roll-grpc/10.62.0.1:50051",
            "roll-grpc/10.62.0.2:50051",
            "roll-grpc/10.62.0.3:50051",
        ],
    )
    .await;
    let mut watch = env.watch_registry().await;
    for (i, (old_name, old_ip)) in old.iter().enumerate() {
        let (name, ip) = (format!("roll-v2-{i}"), format!("10.62.1.{}", i + 1));
        env.pod(&name, json!({"app": "roll"}), 50051).await;
        env.set_ready(&name, &ip, true).await;
        eventually("the new endpoint is registered", || async {
            env.keys().await.contains_key(&key(&ip))
        })
        .await;
        // Deleted with a grace period: no kubelet runs, so the pod stays terminating.
        env.pods()
            .delete(old_name, &DeleteParams::default().grace_period(30))
            .await
            .unwrap();
        eventually("the terminating pod's endpoint leaves", || async {
            !env.keys().await.contains_key(&key(old_ip))
        })
        .await;
        let pod = env.pods().get(old_name).await.unwrap();
        assert!(
            pod.metadata.deletion_timestamp.is_some(),
            "it left while its pod was still terminating"
        );
        env.pods()
            .delete(old_name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
    env.expect_keys(
        "exactly the three v2 endpoints",
        &[
            "roll-grpc/10.62.1.1:50051",
            "roll-grpc/10.62.1.2:50051",
            "roll-grpc/10.62.1.3:50051",
        ],
    )
    .await;
    let deleted =
        test_support::registry::deleted_keys(&mut watch, Duration::from_millis(500)).await;
    let old_keys: BTreeSet<String> = old.iter().map(|(_, ip)| key(ip)).collect();
    assert_eq!(
        deleted, old_keys,
        "only the replaced pods' keys were ever deleted"
    );
    env.shutdown().await;
}

/// A Service without a selector, whose EndpointSlices are made by hand (VMs, endpoints outside
/// the cluster): its ready endpoints register under a numeric port, an FQDN slice is reported
/// and never registered, and deleting the slices deregisters everything.
pub async fn a_hand_made_endpointslice_on_a_selectorless_service_registers_and_deleting_it_deregisters(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.k8s_service("vms", None).await;
    env.service(
        "vms-grpc",
        json!({"serviceRef": {"name": "vms", "port": 50051}}),
    )
    .await;
    env.put_slice(
        "vms-1",
        "vms",
        "IPv4",
        &[("192.168.10.1", true), ("192.168.10.2", false)],
    )
    .await;
    env.expect_keys("the ready VM", &["vms-grpc/192.168.10.1:50051"])
        .await;
    let keys = env.keys().await;
    let endpoint =
        format::parse(keys[&format!("services/{ns}/vms-grpc/192.168.10.1:50051")].as_bytes())
            .unwrap();
    assert_eq!(
        endpoint.metadata.unwrap(),
        json!({"namespace": ns}),
        "no pod behind a hand-made endpoint"
    );
    // The second VM turns ready: an update of the slice.
    env.put_slice(
        "vms-1",
        "vms",
        "IPv4",
        &[("192.168.10.1", true), ("192.168.10.2", true)],
    )
    .await;
    env.expect_keys(
        "both VMs",
        &["vms-grpc/192.168.10.1:50051", "vms-grpc/192.168.10.2:50051"],
    )
    .await;
    env.put_slice("vms-dns", "vms", "FQDN", &[("grpc.example.com", true)])
        .await;
    eventually("the FQDN endpoint is reported", || async {
        env.condition("vms-grpc", "Ready").await["message"]
            == "2 of 3 endpoints of Service vms registered; not registered: 1 an FQDN address (registries hold IP addresses)"
    })
    .await;
    env.slices()
        .delete("vms-1", &DeleteParams::default())
        .await
        .unwrap();
    env.expect_keys("nothing once the slice is gone", &[]).await;
    eventually("not ready: only the FQDN endpoint is left", || async {
        let ready = env.condition("vms-grpc", "Ready").await;
        ready["status"] == "False" && ready["reason"] == "NoReadyEndpoints"
    })
    .await;
    env.slices()
        .delete("vms-dns", &DeleteParams::default())
        .await
        .unwrap();
    eventually("no endpoints at all", || async {
        let ready = env.condition("vms-grpc", "Ready").await;
        ready["status"] == "False" && ready["reason"] == "NoEndpoints"
    })
    .await;
    env.shutdown().await;
}

/// IPv6 endpoints are published, bracketed as gRPC clients parse them.
pub async fn ipv6_endpoints_of_a_service_are_published_bracketed(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service(
        "v6-grpc",
        json!({"serviceRef": {"name": "v6", "port": "grpc"}}),
    )
    .await;
    env.put_slice(
        "v6-1",
        "v6",
        "IPv6",
        &[("fd00::7", true), ("fd00::8", true)],
    )
    .await;
    env.expect_keys(
        "two IPv6 endpoints",
        &["v6-grpc/[fd00::7]:50051", "v6-grpc/[fd00::8]:50051"],
    )
    .await;
    let keys = env.keys().await;
    let endpoint =
        format::parse(keys[&format!("services/{ns}/v6-grpc/[fd00::7]:50051")].as_bytes()).unwrap();
    assert_eq!(endpoint.addr, "[fd00::7]:50051");
    // A slice relabelled to another Service takes its endpoints with it.
    env.slices()
        .patch(
            "v6-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"kubernetes.io/service-name": "elsewhere"}}}),
            ),
        )
        .await
        .unwrap();
    env.expect_keys("nothing once the slice moved away", &[])
        .await;
    env.shutdown().await;
}
