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
pub(crate) async fn until_leader(env: &Env, who: &str) -> Duration {
    let started = Instant::now();
    eventually(&format!("{who} leads"), || async {
        leader(&env.client, &env.ns).await.as_deref() == Some(who)
    })
    .await;
    started.elapsed()
}

/// The keys stay on `old`, the lease they were on before the handover: the new leader adopted
/// it (keeps it alive) instead of moving every key to a lease of its own. Checked past the TTL
/// counted from `since`, when a lease nobody kept alive would have expired.
async fn stay_on_the_adopted_lease(
    env: &Env,
    old: &std::collections::BTreeSet<i64>,
    since: Instant,
) {
    let past_ttl = Duration::from_secs(u64::from(TTL) + 2).saturating_sub(since.elapsed());
    tokio::time::sleep(past_ttl).await;
    assert_eq!(
        &key_leases(env).await,
        old,
        "the keys moved to another lease"
    );
    let lease = *old.iter().next().unwrap();
    let left = env
        .etcd
        .client()
        .await
        .lease_time_to_live(lease, None)
        .await
        .unwrap()
        .ttl();
    assert!(
        left > 0,
        "the adopted lease is kept alive past the TTL ({left})"
    );
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
    eprintln!(
        "failover (sigkill): b leads {} ms after the kill (lease 2 s, ttl {TTL} s)",
        gap.as_millis(),
    );
    // Past the killed leader's TTL: b adopted its registry lease, so every key is where it was.
    stay_on_the_adopted_lease(&env, &old, killed).await;
    env.expect_keys("every key still there", &keys).await;
    assert_eq!(
        events_seen(&mut watch).await,
        0,
        "a client saw the registry change across the failover (a PUT or a DELETE)"
    );
}

/// Every event (PUT or DELETE) a watching client has received, reading until the watch is
/// quiet for 500 ms.
async fn events_seen(watch: &mut etcd_client::WatchStream) -> usize {
    let mut events = 0;
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        events += resp.events().len();
    }
    events
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
    let handover = gap.max(stopping.elapsed());
    stay_on_the_adopted_lease(&env, &old, stopping).await;
    eprintln!(
        "rolling restart (sigterm): b leads {} ms after the stop began (the Lease is released)",
        handover.as_millis()
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
    let paused = Instant::now();
    until_leader(&env, "b").await;
    stay_on_the_adopted_lease(&env, &old, paused).await;
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
    assert_eq!(
        events_seen(&mut watch).await,
        0,
        "the resumed leader wrote to the registry"
    );
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

/// The README's promise that an invalid edit keeps "the last valid spec published (still
/// following readiness) until it is fixed", across a leader failover and a SIGKILL and restart,
/// each past the TTL: the last valid publication is recorded in the registry, not in one
/// process's memory.
pub async fn an_invalid_specs_last_valid_keys_survive_a_failover_and_a_restart_and_follow_readiness(
    plane: Plane,
    ns: String,
) {
    let (env, keys) = world(&plane, &ns, 43).await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let etcd = env.etcd.endpoint();
    let mut a = ControllerProcess::builder(&plane, &etcd, &ns, TTL)
        .replica("a")
        .start();
    until_leader(&env, "a").await;
    let mut b = start_b(&plane, &env);
    env.expect_keys("registered by the leader", &keys).await;

    // An invalid edit: the keys stay, published under the last valid spec.
    env.services()
        .patch(
            "greeter",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"target": "services/elsewhere/greeter"}})),
        )
        .await
        .unwrap();
    eventually("InvalidSpec", || async {
        env.condition_is("greeter", "InvalidSpec", "True").await
    })
    .await;
    let mut watch = env.watch_registry().await;

    // Failover past the TTL: the new leader keeps the keys and follows readiness.
    a.kill();
    let killed = Instant::now();
    until_leader(&env, "b").await;
    tokio::time::sleep(Duration::from_secs(u64::from(TTL) + 2).saturating_sub(killed.elapsed()))
        .await;
    env.expect_keys("kept across the failover", &keys).await;
    env.set_ready("g-3", "10.43.0.3", false).await;
    env.expect_keys("the new leader deregisters an unready pod", &keys[..2])
        .await;
    registered_in_status(&env, 2).await;

    // SIGKILL and restart past the TTL: the same.
    b.kill();
    let killed = Instant::now();
    let _c = ControllerProcess::builder(&plane, &etcd, &ns, TTL)
        .replica("c")
        .start();
    until_leader(&env, "c").await;
    tokio::time::sleep(Duration::from_secs(u64::from(TTL) + 2).saturating_sub(killed.elapsed()))
        .await;
    env.expect_keys("kept across the restart", &keys[..2]).await;
    env.set_ready("g-2", "10.43.0.2", false).await;
    env.expect_keys(
        "the restarted process deregisters an unready pod",
        &keys[..1],
    )
    .await;
    registered_in_status(&env, 1).await;
    assert_eq!(
        deletes_seen(&mut watch).await,
        2,
        "only the two unready pods' keys were deleted"
    );
    assert!(env.condition_is("greeter", "InvalidSpec", "True").await);
}

/// Status says what the registry holds while the spec is invalid: `n` registered and ready,
/// and the Ready message counts them, still InvalidSpec (for the GrpcService `greeter`).
pub(crate) async fn registered_in_status(env: &Env, n: i64) {
    eventually(
        "status follows the registry while the spec is invalid",
        || async {
            let status = env.status("greeter").await;
            let message = env.condition("greeter", "Ready").await["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            status["registeredEndpoints"] == n
                && status["readyEndpoints"] == n
                && message.contains(&format!("({n} endpoint"))
                && env.condition_is("greeter", "InvalidSpec", "True").await
        },
    )
    .await;
}

/// Two controllers of one registry scope without leader election (the same cluster name, here
/// none) would rewrite each other's keys forever: each reports the other, in its log, its
/// metrics, `/readyz` and a Warning Event on the services.
pub async fn two_writers_of_one_scope_without_leader_election_are_reported(
    plane: Plane,
    ns: String,
) {
    let (env, keys) = world(&plane, &ns, 44).await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let etcd = env.etcd.endpoint();
    let ports = [test_support::free_port(), test_support::free_port()];
    let logs = [
        tempfile::NamedTempFile::new().unwrap(),
        tempfile::NamedTempFile::new().unwrap(),
    ];
    let _writers: Vec<ControllerProcess> = (0..2)
        .map(|i| {
            ControllerProcess::builder(&plane, &etcd, &ns, 5)
                .env("POD_NAME", format!("writer-{i}"))
                .metrics_port(ports[i])
                .log_to(logs[i].path().to_owned())
                .start()
        })
        .collect();
    env.expect_keys("registered", &keys).await;
    for (port, log) in ports.iter().zip(&logs) {
        eventually("each reports the other", || async {
            let readyz = test_support::http_get(*port, "/readyz").await;
            let metrics = test_support::http_get(*port, "/metrics").await;
            readyz.is_some_and(|(code, body)| {
                code == 200 && body.contains("writers: 1 other live controller(s)")
            }) && metrics.is_some_and(|(_, body)| body.contains("grpc_registrar_other_writers 1"))
                && std::fs::read_to_string(log.path())
                    .is_ok_and(|l| l.contains("another live controller writes this registry scope"))
        })
        .await;
    }
    eventually("a Warning Event on the service", || {
        crate::harness::has_event(&env, "greeter", "Warning", "MultipleWriters", "writer-")
    })
    .await;
}
