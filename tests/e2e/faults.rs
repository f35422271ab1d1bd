//! Fault scenarios on the real control plane: what was injected, and that the registry and the
//! status recover with no key of a healthy pod lost.

use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use serde_json::json;

use crate::Plane;
use crate::harness::{Env, eventually};

fn spec(ttl: u32) -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc", "ttlSeconds": ttl})
}

async fn two_ready_pods(env: &Env, subnet: u8) {
    for (i, name) in ["g-0", "g-1"].iter().enumerate() {
        env.pod(name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(name, &format!("10.{subnet}.0.{}", i + 1), true)
            .await;
    }
}

pub async fn etcd_outage_longer_than_the_ttl_shows_etcd_unavailable_then_every_key_comes_back(
    plane: Plane,
    ns: String,
) {
    let env = Env::partitionable(plane, &ns).await;
    env.service("greeter", spec(5)).await;
    two_ready_pods(&env, 20).await;
    let keys = ["greeter/10.20.0.1:50051", "greeter/10.20.0.2:50051"];
    env.expect_keys("registered", &keys).await;
    let proxy = env.proxy.as_ref().unwrap();

    proxy.cut().await;
    eventually("status shows EtcdUnavailable", || {
        env.condition_is("greeter", "EtcdUnavailable", "True")
    })
    .await;
    env.expect_keys("the lease expired without keep-alives", &[])
        .await;

    proxy.restore();
    let healed = Instant::now();
    env.expect_keys("every key re-put on a new lease", &keys)
        .await;
    let recovered = healed.elapsed();
    eventually("status back to Ready", || {
        env.condition_is("greeter", "Ready", "True")
    })
    .await;
    assert!(
        env.condition_is("greeter", "EtcdUnavailable", "False")
            .await
    );
    eprintln!(
        "outage > ttl: keys back {} ms after the partition healed",
        recovered.as_millis()
    );
    env.shutdown().await;
}

pub async fn etcd_outage_shorter_than_the_ttl_deletes_nothing(plane: Plane, ns: String) {
    let env = Env::partitionable(plane, &ns).await;
    env.service("greeter", spec(30)).await;
    two_ready_pods(&env, 21).await;
    let keys = ["greeter/10.21.0.1:50051", "greeter/10.21.0.2:50051"];
    env.expect_keys("registered", &keys).await;
    // A client watching the registry directly, not through the partition.
    let mut watch = env
        .etcd
        .client()
        .await
        .watch(
            format!("services/{ns}/"),
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let proxy = env.proxy.as_ref().unwrap();

    proxy.cut().await;
    eventually("status shows EtcdUnavailable", || {
        env.condition_is("greeter", "EtcdUnavailable", "True")
    })
    .await;
    proxy.restore();
    let healed = Instant::now();
    eventually("status back to Ready", || {
        env.condition_is("greeter", "Ready", "True")
    })
    .await;
    eprintln!(
        "outage < ttl: Ready again {} ms after the partition healed",
        healed.elapsed().as_millis()
    );
    env.expect_keys("keys intact", &keys).await;

    let mut deletes = 0;
    while let Ok(Some(resp)) = tokio::time::timeout(Duration::from_millis(500), watch.message())
        .await
        .map(Result::unwrap)
    {
        deletes += resp
            .events()
            .iter()
            .filter(|e| e.event_type() == EventType::Delete)
            .count();
    }
    assert_eq!(deletes, 0, "a watching client saw DELETEs for healthy pods");
    env.shutdown().await;
}
