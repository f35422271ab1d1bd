//! Fault scenarios on the real control plane: what was injected, and that the registry and the
//! status recover with no key of a healthy pod lost.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Plane;
use crate::harness::{ControllerProcess, Env, deletes_seen, eventually, has_event, http_get};

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

pub async fn etcd_outage_longer_than_the_ttl_shows_backend_unavailable_then_every_key_comes_back(
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
    eventually("status shows BackendUnavailable", || {
        env.condition_is("greeter", "BackendUnavailable", "True")
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
        env.condition_is("greeter", "BackendUnavailable", "False")
            .await
    );
    // `kubectl describe` tells the story: the outage, the lost lease, the recovery.
    eventually(
        "Warning BackendUnavailable, Warning LeaseReplaced, Normal BackendRestored",
        || async {
            has_event(
                &env,
                "greeter",
                "Warning",
                "BackendUnavailable",
                "etcd unavailable",
            )
            .await
                && has_event(
                    &env,
                    "greeter",
                    "Warning",
                    "LeaseReplaced",
                    "2 endpoints registered again",
                )
                .await
                && has_event(&env, "greeter", "Normal", "BackendRestored", "2 of 2").await
        },
    )
    .await;
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
    let mut watch = env.watch_registry().await;
    let proxy = env.proxy.as_ref().unwrap();

    proxy.cut().await;
    eventually("status shows BackendUnavailable", || {
        env.condition_is("greeter", "BackendUnavailable", "True")
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

    let deletes = deletes_seen(&mut watch).await;
    assert_eq!(deletes, 0, "a watching client saw DELETEs for healthy pods");
    env.shutdown().await;
}

/// A namespace, pods and a registry etcd, with no in-process controller.
async fn world(plane: &Plane, ns: &str) -> Env {
    let env = Env::without_controller(plane.clone(), ns).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"}),
    )
    .await;
    two_ready_pods(&env, 22).await;
    env
}

pub async fn controller_sigkill_without_restart_lets_the_keys_expire_after_the_ttl(
    plane: Plane,
    ns: String,
) {
    let env = world(&plane, &ns).await;
    let mut controller = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 5).start();
    env.expect_keys(
        "registered by the binary",
        &["greeter/10.22.0.1:50051", "greeter/10.22.0.2:50051"],
    )
    .await;
    controller.kill();
    let killed = Instant::now();
    assert_eq!(env.keys().await.len(), 2, "the keys outlive the process");
    env.expect_keys("expired with the lease", &[]).await;
    let expired = killed.elapsed();
    eprintln!(
        "sigkill, no restart: keys expired {} ms after the kill (ttl 5 s)",
        expired.as_millis()
    );
    assert!(
        expired <= Duration::from_secs(7),
        "expired after {expired:?}, ttl is 5 s"
    );
}

pub async fn controller_sigkill_and_restart_within_the_ttl_deletes_nothing(
    plane: Plane,
    ns: String,
) {
    let env = world(&plane, &ns).await;
    let keys = ["greeter/10.22.0.1:50051", "greeter/10.22.0.2:50051"];
    let mut first = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 10).start();
    env.expect_keys("registered by the first process", &keys)
        .await;
    let mut watch = env.watch_registry().await;
    let leases = |env: &Env| {
        let env_etcd = env.etcd.endpoint();
        let prefix = format!("services/{ns}/");
        async move {
            let mut client = etcd_client::Client::connect([env_etcd], None)
                .await
                .unwrap();
            let resp = client
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .unwrap();
            resp.kvs()
                .iter()
                .map(|kv| kv.lease())
                .collect::<std::collections::BTreeSet<_>>()
        }
    };
    let old = leases(&env).await;
    first.kill();
    let killed = std::time::Instant::now();
    let mut second = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 10).start();
    // A change the second process must apply: it adopted the first one's lease and reconciles.
    env.set_ready("g-0", "10.22.0.1", false).await;
    env.expect_keys("the second process applies a change", &keys[1..])
        .await;
    env.set_ready("g-0", "10.22.0.1", true).await;
    env.expect_keys("and the change back", &keys).await;
    // Past the killed process's TTL: its lease is still alive (the second process adopted it)
    // and the keys never left it.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(killed.elapsed())).await;
    assert_eq!(leases(&env).await, old, "the keys moved to another lease");
    let old_lease = *old.iter().next().unwrap();
    let left = env
        .etcd
        .client()
        .await
        .lease_time_to_live(old_lease, None)
        .await
        .unwrap()
        .ttl();
    assert!(left > 0, "the adopted lease is kept alive ({left})");
    env.expect_keys("keys intact", &keys).await;
    let deletes = deletes_seen(&mut watch).await;
    assert_eq!(
        deletes, 1,
        "a watching client saw only the unready pod's DELETE across the restart"
    );
    second.kill();
}

pub async fn pod_churn_during_an_etcd_partition_ends_in_exactly_the_desired_registry(
    plane: Plane,
    ns: String,
) {
    let env = Env::partitionable(plane, &ns).await;
    env.service("greeter", spec(30)).await;
    two_ready_pods(&env, 23).await;
    env.expect_keys(
        "registered",
        &["greeter/10.23.0.1:50051", "greeter/10.23.0.2:50051"],
    )
    .await;
    let proxy = env.proxy.as_ref().unwrap();
    proxy.cut().await;
    env.set_ready("g-0", "10.23.0.1", false).await;
    env.pods().delete("g-1", &Default::default()).await.unwrap();
    env.pod("g-2", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-2", "10.23.0.3", true).await;
    eventually("status shows BackendUnavailable", || {
        env.condition_is("greeter", "BackendUnavailable", "True")
    })
    .await;
    proxy.restore();
    env.expect_keys("only g-2 after recovery", &["greeter/10.23.0.3:50051"])
        .await;
    eventually("Ready again", || {
        env.condition_is("greeter", "Ready", "True")
    })
    .await;
    env.shutdown().await;
}

pub async fn a_target_under_another_namespaces_prefix_is_refused_and_writes_nothing(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.service(
        "hijack",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc", "target": "services/payments/api"}),
    )
    .await;
    two_ready_pods(&env, 24).await;
    eventually("InvalidSpec", || {
        env.condition_is("hijack", "InvalidSpec", "True")
    })
    .await;
    let message = env.condition("hijack", "InvalidSpec").await["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("may only publish under"), "{message}");
    let all = env
        .etcd
        .client()
        .await
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    // Only the controller's own liveness announcement (one writer per scope) is there.
    let written: Vec<&str> = all
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok())
        .filter(|key| !key.starts_with("grpc-registrar/writers/"))
        .collect();
    assert!(written.is_empty(), "nothing written anywhere: {written:?}");
    env.shutdown().await;
}

pub async fn etcd_restart_with_data_kept_recovers_within_two_seconds_and_deletes_nothing(
    plane: Plane,
    ns: String,
) {
    let mut env = Env::new(plane, &ns).await;
    env.service("greeter", spec(30)).await;
    two_ready_pods(&env, 25).await;
    let keys = ["greeter/10.25.0.1:50051", "greeter/10.25.0.2:50051"];
    env.expect_keys("registered", &keys).await;
    let created: Vec<i64> = created_revisions(&env, &ns).await;

    env.etcd.stop();
    // A change the controller cannot write while etcd is down.
    env.set_ready("g-1", "10.25.0.2", false).await;
    env.etcd.restart().await;
    let back = Instant::now();
    env.expect_keys("registry correct again", &keys[..1]).await;
    let took = back.elapsed();
    eprintln!(
        "etcd restart: registry correct {} ms after etcd was back",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    // The healthy pod's key was never deleted and re-created.
    assert_eq!(created_revisions(&env, &ns).await, created[..1]);
    env.shutdown().await;
}

pub async fn wiped_etcd_gets_every_key_and_the_ownership_record_back(plane: Plane, ns: String) {
    let mut env = Env::new(plane, &ns).await;
    env.service("greeter", spec(5)).await;
    two_ready_pods(&env, 26).await;
    let keys = ["greeter/10.26.0.1:50051", "greeter/10.26.0.2:50051"];
    env.expect_keys("registered", &keys).await;
    env.etcd.wipe_and_restart().await;
    let back = Instant::now();
    env.expect_keys("full resync", &keys).await;
    eprintln!(
        "etcd wiped: keys back {} ms after the empty etcd started",
        back.elapsed().as_millis()
    );
    assert_eq!(env.owner_records().await, 1, "ownership record restored");
    env.shutdown().await;
}

pub async fn a_port_name_no_pod_has_is_reported_in_the_ready_condition(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc-web"}),
    )
    .await;
    two_ready_pods(&env, 27).await;
    eventually("Ready reports the missing port", || async {
        let status = env.status("greeter").await;
        status["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Ready"
                    && c["status"] == "False"
                    && c["reason"] == "PortNotFound"
                    && c["message"] == "0 of 2 selected pods registered; not registered: 2 no container port with the requested name (ports offered: grpc=50051)"
            })
        })
    })
    .await;
    assert!(env.keys().await.is_empty());
    env.shutdown().await;
}

async fn created_revisions(env: &Env, ns: &str) -> Vec<i64> {
    let resp = env
        .etcd
        .client()
        .await
        .get(
            format!("services/{ns}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs().iter().map(|kv| kv.create_revision()).collect()
}

/// A control plane of its own (it is restarted), with the CRD installed.
async fn private_plane() -> Plane {
    let plane = std::sync::Arc::new(test_support::ControlPlane::start().await);
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));
    plane
}

pub async fn apiserver_restart_and_expired_watches_relist_and_apply_the_changes_made_in_the_gap(
    _shared: Plane,
    ns: String,
) {
    let plane = private_plane().await;
    let (env, api) = Env::behind_api_proxy(plane.clone(), &ns).await;
    env.service("greeter", spec(30)).await;
    two_ready_pods(&env, 27).await;
    env.expect_keys(
        "registered",
        &["greeter/10.27.0.1:50051", "greeter/10.27.0.2:50051"],
    )
    .await;

    // The controller loses the API server; meanwhile the cluster changes.
    api.cut().await;
    env.set_ready("g-0", "10.27.0.1", false).await;
    env.pod("g-2", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-2", "10.27.0.3", true).await;
    // Compact the API server's etcd past every resource version the controller has seen, so its
    // watches cannot resume (410 Gone) and the reflectors must re-list.
    let mut etcd = etcd_client::Client::connect([plane.etcd_url()], None)
        .await
        .unwrap();
    let revision = etcd
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    etcd.compact(
        revision,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    let restarted = Instant::now();
    plane.restart_apiserver().await;
    eprintln!(
        "kube-apiserver restart: ready again after {} ms",
        restarted.elapsed().as_millis()
    );
    api.restore();
    let healed = Instant::now();
    env.expect_keys(
        "the gap's changes applied after the re-list",
        &["greeter/10.27.0.2:50051", "greeter/10.27.0.3:50051"],
    )
    .await;
    eprintln!(
        "watch expiry: registry correct {} ms after the API server was reachable again",
        healed.elapsed().as_millis()
    );
    // And the controller keeps following changes on the new watches.
    env.set_ready("g-1", "10.27.0.2", false).await;
    env.expect_keys("watches live again", &["greeter/10.27.0.3:50051"])
        .await;
    env.shutdown().await;
}

pub async fn a_controller_started_after_many_services_exist_registers_them_all_and_turns_ready(
    plane: Plane,
    ns: String,
) {
    // Regression: with several services waiting on the pod cache at start-up, all but one
    // waited forever (a single-waker readiness future in kube-runtime's Store).
    let env = Env::without_controller(plane.clone(), &ns).await;
    let mut want = Vec::new();
    for s in 0..12u8 {
        env.service(
            &format!("svc-{s}"),
            json!({"selector": {"matchLabels": {"app": format!("svc-{s}")}}, "port": "grpc"}),
        )
        .await;
        for p in 0..2u8 {
            let name = format!("svc-{s}-{p}");
            env.pod(&name, json!({"app": format!("svc-{s}")}), 50051)
                .await;
            env.set_ready(&name, &format!("10.28.{s}.{p}"), true).await;
            want.push(format!("svc-{s}/10.28.{s}.{p}:50051"));
        }
    }
    let port = test_support::free_port();
    let _controller = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 30)
        .metrics_port(port)
        .start();
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    env.expect_keys("every service registered", &want).await;
    eventually("/readyz is 200 and names the role", || async {
        http_get(port, "/readyz")
            .await
            .is_some_and(|(code, body)| code == 200 && body.contains("role: leader"))
    })
    .await;
}

/// The registry first: a new service's finalizer is written behind its first registry write.
/// A service deleted in that window (here, for good: the controller may not patch GrpcServices,
/// only their status) has no finalizer to run its cleanup, and is released by the owner-record
/// sweep: no key and no ownership record are left.
pub async fn a_grpcservice_deleted_before_its_finalizer_lands_leaves_no_keys_and_no_owner_record(
    plane: Plane,
    ns: String,
) {
    let admin = plane.client().await;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(admin.clone());
    namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let user = "no-finalizer";
    let rbac = |kind: &str, body: serde_json::Value| {
        let mut object = body;
        object["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
        object["kind"] = json!(kind);
        object["metadata"] = json!({"name": user, "namespace": ns});
        object
    };
    let roles: kube::Api<k8s_openapi::api::rbac::v1::Role> =
        kube::Api::namespaced(admin.clone(), &ns);
    roles
        .create(
            &Default::default(),
            &serde_json::from_value(rbac(
                "Role",
                json!({"rules": [
                    {"apiGroups": ["grpc-registrar.io"], "resources": ["grpcservices"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["grpc-registrar.io"], "resources": ["grpcservices/status"], "verbs": ["get", "patch", "update"]},
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
                ]}),
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let bindings: kube::Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        kube::Api::namespaced(admin.clone(), &ns);
    bindings
        .create(
            &Default::default(),
            &serde_json::from_value(rbac(
                "RoleBinding",
                json!({
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
                }),
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let env = Env::as_user(plane, &ns, user).await;
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"}),
    )
    .await;
    two_ready_pods(&env, 24).await;
    let keys = ["greeter/10.24.0.1:50051", "greeter/10.24.0.2:50051"];
    env.expect_keys("published before any finalizer", &keys)
        .await;
    assert_eq!(env.owner_records().await, 1);
    assert!(
        env.finalizers("greeter").await.is_empty(),
        "the finalizer could not be written"
    );

    env.services()
        .delete("greeter", &Default::default())
        .await
        .unwrap();
    eventually(
        "the sweep released the keys and the ownership record",
        || async { env.keys().await.is_empty() && env.owner_records().await == 0 },
    )
    .await;
    env.shutdown().await;
}

/// A restart at scale moves no key: 2,000 keys on a 5 s TTL, the controller SIGKILLed and a new
/// one started at once. The new process adopts the live lease, so a watching client sees no
/// DELETE and no PUT at all until past the TTL (before the lease handover, every key was put
/// again onto the new process's lease, racing the old lease's expiry).
pub async fn a_restart_with_thousands_of_keys_on_a_short_ttl_writes_nothing(
    plane: Plane,
    ns: String,
) {
    use futures::StreamExt;
    const SERVICES: usize = 20;
    const PER_SERVICE: usize = 100;
    let env = Env::without_controller(plane.clone(), &ns).await;
    for s in 0..SERVICES {
        env.service(
            &format!("svc-{s}"),
            json!({"selector": {"matchLabels": {"app": format!("svc-{s}")}}, "port": "grpc"}),
        )
        .await;
    }
    futures::stream::iter(0..SERVICES * PER_SERVICE)
        .for_each_concurrent(32, |i| {
            let env = &env;
            async move {
                let name = format!("p-{i}");
                env.pod(
                    &name,
                    json!({"app": format!("svc-{}", i % SERVICES)}),
                    50051,
                )
                .await;
                env.set_ready(&name, &format!("10.25.{}.{}", i / 256, i % 256), true)
                    .await;
            }
        })
        .await;
    let mut first = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 5).start();
    eventually("2,000 keys registered", || async {
        env.keys().await.len() == SERVICES * PER_SERVICE
    })
    .await;
    let mut watch = env.watch_registry().await;
    first.kill();
    let killed = std::time::Instant::now();
    let _second = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 5).start();
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(killed.elapsed())).await;
    let mut events = 0;
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        events += resp.events().len();
    }
    assert_eq!(
        events, 0,
        "a watching client saw PUTs or DELETEs across the restart"
    );
    assert_eq!(env.keys().await.len(), SERVICES * PER_SERVICE);
}
