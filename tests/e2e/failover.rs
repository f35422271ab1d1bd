//! Leader election with two real controller processes: failover by SIGKILL, a rolling restart
//! by SIGTERM, and a paused (SIGSTOP) leader that resumes after being deposed.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Plane;
use crate::harness::{ControllerProcess, Env, deletes_seen, eventually, key_leases, leader};

const TTL: u32 = 10;

async fn world(plane: &Plane, ns: &str, subnet: u8) -> (Env, Vec<String>) {
    let env = Env::without_controller(plane.clone(), ns).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"}),
    )
    .await;
    let mut keys = Vec::new();
    for i in 1..=3u8 {
        let name = format!("g-{i}");
        env.pod(&name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(&name, &format!("10.{subnet}.0.{i}"), true)
            .await;
        keys.push(format!("greeter/10.{subnet}.0.{i}:50051"));
    }
    (env, keys)
}

fn start_b(plane: &Plane, env: &Env) -> ControllerProcess {
    ControllerProcess::builder(plane, &env.etcd.endpoint(), &env.ns, TTL)
        .replica("b")
        .start()
}

/// Waits until `who` holds the Lease; returns how long that took.
async fn until_leader(env: &Env, who: &str) -> Duration {
    let started = Instant::now();
    eventually(&format!("{who} leads"), || async {
        leader(&env.client, &env.ns).await.as_deref() == Some(who)
    })
    .await;
    started.elapsed()
}

async fn moved_off(env: &Env, old: &std::collections::BTreeSet<i64>) {
    eventually("every key re-put under the new leader's lease", || async {
        let now = key_leases(env).await;
        now.len() == 1 && now.is_disjoint(old)
    })
    .await;
}

pub async fn sigkill_of_the_leader_fails_over_with_no_delete_and_the_new_leader_owns_every_key_within_the_ttl(
    plane: Plane,
    ns: String,
) {
    let (env, keys) = world(&plane, &ns, 40).await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let etcd = env.etcd.endpoint();
    let mut a = ControllerProcess::builder(&plane, &etcd, &ns, TTL)
        .replica("a")
        .start();
    until_leader(&env, "a").await;
    let _b = start_b(&plane, &env);
    env.expect_keys("registered by the leader", &keys).await;
    let old = key_leases(&env).await;
    let mut watch = env.watch_registry().await;

    a.kill();
    let killed = Instant::now();
    let gap = until_leader(&env, "b").await;
    moved_off(&env, &old).await;
    let owned = killed.elapsed();
    eprintln!(
        "failover (sigkill): b leads {} ms after the kill, owns every key after {} ms (lease 2 s, ttl {TTL} s)",
        gap.as_millis(),
        owned.as_millis()
    );
    assert!(owned < Duration::from_secs(u64::from(TTL)), "{owned:?}");
    // Past the killed leader's etcd lease: nothing was left on it.
    tokio::time::sleep(Duration::from_secs(u64::from(TTL))).await;
    env.expect_keys("every key still there", &keys).await;
    assert_eq!(
        deletes_seen(&mut watch).await,
        0,
        "a client saw DELETEs across the failover"
    );
}

pub async fn a_rolling_restart_hands_over_at_once_with_no_delete(plane: Plane, ns: String) {
    let (env, keys) = world(&plane, &ns, 41).await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut a = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, TTL)
        .replica("a")
        .start();
    until_leader(&env, "a").await;
    let _b = start_b(&plane, &env);
    env.expect_keys("registered by the leader", &keys).await;
    let old = key_leases(&env).await;
    let mut watch = env.watch_registry().await;

    let stopping = Instant::now();
    a.terminate();
    let gap = until_leader(&env, "b").await;
    moved_off(&env, &old).await;
    eprintln!(
        "rolling restart (sigterm): b leads {} ms after the stop began (the Lease is released)",
        gap.max(stopping.elapsed()).as_millis()
    );
    // The replacement pod joins as a follower; changes still flow through the leader.
    let _a2 = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, TTL)
        .replica("a2")
        .start();
    env.set_ready("g-3", "10.41.0.3", false).await;
    env.expect_keys("the leader still reconciles", &keys[..2])
        .await;
    assert_eq!(leader(&env.client, &ns).await.as_deref(), Some("b"));
    assert_eq!(
        deletes_seen(&mut watch).await,
        1,
        "only the unready pod's DELETE"
    );
}

pub async fn a_paused_leader_that_resumes_after_being_deposed_overwrites_nothing(
    plane: Plane,
    ns: String,
) {
    let (env, keys) = world(&plane, &ns, 42).await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let log = tempfile::NamedTempFile::new().unwrap();
    let etcd = env.etcd.endpoint();
    let a = ControllerProcess::builder(&plane, &etcd, &ns, TTL)
        .replica("a")
        .log_to(log.path().to_owned())
        .start();
    until_leader(&env, "a").await;
    let _b = start_b(&plane, &env);
    env.expect_keys("registered by a", &keys).await;
    let old = key_leases(&env).await;

    a.pause();
    until_leader(&env, "b").await;
    moved_off(&env, &old).await;
    // While a is frozen, the desired state changes and the new leader applies it.
    env.set_ready("g-3", "10.42.0.3", false).await;
    env.expect_keys("b applied the change", &keys[..2]).await;
    let new = key_leases(&env).await;
    let fence_before = fence_record(&env).await;
    let mut watch = env.watch_registry().await;

    a.resume();
    // a resumes with its pre-pause view (g-3 ready, its own lease): it must write none of it.
    eventually("a noticed it was deposed", || async {
        std::fs::read_to_string(log.path()).is_ok_and(|l| l.contains("stepped down"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut events = 0;
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        events += resp.events().len();
    }
    assert_eq!(events, 0, "the resumed leader wrote to the registry");
    env.expect_keys("still b's registry", &keys[..2]).await;
    assert_eq!(key_leases(&env).await, new);
    assert_eq!(fence_record(&env).await, fence_before);
    assert_eq!(leader(&env.client, &ns).await.as_deref(), Some("b"));
}

async fn fence_record(env: &Env) -> (Vec<u8>, i64) {
    let resp = env
        .etcd
        .client()
        .await
        .get("grpc-registrar/leader", None)
        .await
        .unwrap();
    let kv = resp.kvs().first().expect("a leader record");
    (kv.value().to_vec(), kv.mod_revision())
}
