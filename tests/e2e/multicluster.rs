//! Several clusters, one registry: two real control planes (two kube-apiservers, each with its
//! own etcd) and one shared registry etcd, each cluster with its own controller binary
//! (`--cluster-name`). Both publish `services/<ns>/greeter`; clients see the union; whatever
//! happens to one cluster never deletes the other's keys.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use test_support::ControlPlane;
use tonic_etcd_resolver::{Options, Resolver, format};

use crate::Plane;
use crate::harness::{ControllerProcess, Env, eventually, leader};

const TTL: u32 = 5;

fn greeter_spec() -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"})
}

pub async fn two_clusters_publish_one_target_and_neither_ever_deletes_the_others_keys(
    plane: Plane,
    ns: String,
) {
    let west_plane = std::sync::Arc::new(ControlPlane::start_without_controller_manager().await);
    west_plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    let east = Env::without_controller(plane.clone(), &ns).await;
    let west = Env::without_controller(west_plane.clone(), &ns).await;
    // The shared registry is east's etcd; west's own is unused.
    let registry = east.etcd.endpoint();
    let replica = |plane: &ControlPlane, cluster: &str, identity: &str| {
        ControllerProcess::builder(plane, &registry, &ns, TTL)
            .replica(identity)
            .args(&["--cluster-name", cluster])
            .start()
    };
    let mut east_a = replica(&plane, "east", "east-a");
    let mut east_b = replica(&plane, "east", "east-b");
    let _west = replica(&west_plane, "west", "west-a");

    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(
            greeter::GreeterServer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    for (env, prefix, pair) in [(&east, "e", &servers[..2]), (&west, "w", &servers[2..])] {
        env.service("greeter", greeter_spec()).await;
        for (i, server) in pair.iter().enumerate() {
            let pod = format!("{prefix}-{i}");
            env.pod(&pod, json!({"app": "greeter"}), server.addr().port())
                .await;
            env.set_ready(&pod, "127.0.0.1", true).await;
        }
    }
    let target = format!("services/{ns}/greeter");
    let key = |server: &greeter::GreeterServer| format!("{target}/{}", server.addr());
    let all: BTreeSet<String> = servers.iter().map(key).collect();
    let west_keys: BTreeSet<String> = servers[2..].iter().map(key).collect();
    eventually("both clusters' endpoints under one target", || async {
        east.keys_under(&format!("{target}/"))
            .await
            .into_keys()
            .collect::<BTreeSet<_>>()
            == all
    })
    .await;
    let keys = east.keys_under(&format!("{target}/")).await;
    let metadata = |k: &str| format::parse(keys[k].as_bytes()).unwrap().metadata.unwrap();
    assert_eq!(metadata(&key(&servers[0]))["cluster"], "east");
    assert_eq!(metadata(&key(&servers[3]))["cluster"], "west");

    // Clients see the union with no change: Go's etcd naming resolver and tonic's.
    let result = crate::interop::go_client(&[
        "call", "-etcd", &registry, "-target", &target, "-n", "80", "-expect", "4",
    ])
    .await;
    crate::interop::every_server_answered(&result, &servers);
    let resolver = Resolver::connect([registry.clone()], &target, Options::default())
        .await
        .unwrap();
    eventually("the tonic client sees four endpoints", || async {
        resolver.ready_endpoints().len() == 4
    })
    .await;
    let mut client = GreeterClient::new(resolver.channel());
    let mut answered = BTreeMap::new();
    for i in 0..40 {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("call {i}"),
            })
            .await
            .unwrap()
            .into_inner();
        *answered.entry(reply.server).or_insert(0) += 1;
    }
    assert_eq!(
        answered.len(),
        4,
        "tonic reaches both clusters: {answered:?}"
    );

    // From here on, no DELETE may touch west's keys, whatever happens to east.
    let mut watch = east
        .etcd
        .client()
        .await
        .watch(
            format!("{target}/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let east_keys = |live: &[usize]| -> BTreeSet<String> {
        live.iter()
            .map(|i| key(&servers[*i]))
            .collect::<BTreeSet<_>>()
    };
    let expect = |want: BTreeSet<String>, what: &'static str| {
        let east = &east;
        let target = &target;
        async move {
            eventually(what, || async {
                east.keys_under(&format!("{target}/"))
                    .await
                    .into_keys()
                    .collect::<BTreeSet<_>>()
                    == want
            })
            .await;
        }
    };
    let with_west = |mut east: BTreeSet<String>| {
        east.extend(west_keys.iter().cloned());
        east
    };

    // An east pod turns unready.
    east.set_ready("e-1", "127.0.0.1", false).await;
    expect(with_west(east_keys(&[0])), "east's unready pod leaves").await;

    // East's leader is SIGKILLed: the other replica takes over and writes east's change.
    let client = plane.client().await;
    let old = leader(&client, &ns).await.expect("an east leader");
    if old == "east-a" {
        east_a.kill();
    } else {
        east_b.kill();
    }
    eventually("the other east replica leads", || async {
        leader(&client, &ns).await.is_some_and(|l| l != old)
    })
    .await;
    east.set_ready("e-1", "127.0.0.1", true).await;
    expect(
        with_west(east_keys(&[0, 1])),
        "the new east leader publishes",
    )
    .await;

    // East's GrpcService is deleted: its finalizer removes east's keys only.
    east.services()
        .delete("greeter", &DeleteParams::default())
        .await
        .unwrap();
    expect(west_keys.clone(), "only west's keys are left").await;
    // The keys go before the finalizer does: re-created only once the old object is gone.
    eventually("east's GrpcService is gone", || async {
        east.services().get_opt("greeter").await.unwrap().is_none()
    })
    .await;
    east.services()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
                "metadata": {"name": "greeter", "namespace": ns}, "spec": greeter_spec(),
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    expect(all.clone(), "east publishes again").await;

    // East's controller is killed for good: its keys go at their lease's expiry, west's stay.
    east_a.kill();
    east_b.kill();
    tokio::time::sleep(Duration::from_secs(u64::from(TTL))).await;
    expect(west_keys.clone(), "east's keys expired with its lease").await;

    let deleted =
        test_support::registry::deleted_keys(&mut watch, Duration::from_millis(500)).await;
    assert!(
        deleted.is_disjoint(&west_keys),
        "no DELETE of west's keys: {deleted:?}"
    );
    assert!(
        !deleted.is_empty(),
        "east's keys were deleted as it changed"
    );
}
