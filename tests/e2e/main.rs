//! End-to-end: a real kube-apiserver (with its own etcd), a real registry etcd, and the
//! controller in-process. One control plane is shared; each test has its own namespace,
//! registry etcd and controller.
//!
//! This binary uses libtest-mimic (`harness = false`) so that the control plane is started once
//! and stopped when every test has run.

mod chart;
mod consul;
mod consul_tenancy;
mod failover;
mod faults;
mod harness;
mod interop;
mod multicluster;
mod operator;
mod slices;
mod tenancy;
mod weights;

use std::future::Future;
use std::sync::Arc;

use grpc_registrar::desired::Policy;
use harness::{Env, eventually};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;
use test_support::ControlPlane;
use tonic_etcd_resolver::format;

type Plane = Arc<ControlPlane>;

/// Every trial, each named by its function's path so that the two cannot drift, plus a trial
/// that fails when a test function in `tests/e2e/` is in no list.
macro_rules! trials {
    ($runtime:ident, $plane:ident; $($test:path),* $(,)?) => {{
        let names: Vec<String> = vec![$(stringify!($test).replace(' ', "")),*];
        let mut trials = vec![$(trial(&$runtime, &$plane, stringify!($test).replace(' ', ""), $test)),*];
        trials.push(Trial::test("every_e2e_test_function_is_registered", move || {
            let missing = unregistered(&names);
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("add these to the trials in tests/e2e/main.rs: {missing:?}").into())
            }
        }));
        trials
    }};
}

fn main() {
    let args = Arguments::from_args();
    // RUST_LOG=grpc_registrar=debug shows the controller's side of a failing test.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .init();
    }
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("failed to build runtime"),
    );
    let plane: Plane = Arc::new(runtime.block_on(ControlPlane::start()));
    // The node every test pod runs on: kube-controller-manager's endpointslice controller
    // leaves out pods whose Node does not exist, and takes the endpoint's zone from it.
    runtime.block_on(async {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(plane.client().await);
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "node-1",
                    "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))
                .unwrap(),
            )
            .await
            .expect("failed to create node-1");
    });
    // `kubectl apply`, exactly as the README tells users.
    plane.install_crd(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/grpcservice.yaml"
    ));

    let trials = trials!(runtime, plane;
        ready_pods_are_published_with_etcd_naming_values,
        a_pod_that_turns_unready_is_deregistered,
        once_the_controller_has_stopped_nothing_of_it_holds_the_registry,
        a_terminating_pod_is_deregistered_before_it_is_gone,
        a_pod_relabelled_out_of_the_selector_is_deregistered,
        deleting_the_grpcservice_removes_every_key_and_releases_the_finalizer,
        invalid_specs_are_rejected_by_the_api_server_with_a_clear_message,
        status_and_printer_columns_show_target_ready_and_registered,
        consul::a_go_consul_client_calls_every_ready_server_and_follows_readiness_and_deletion,
        consul::sigkill_of_the_consul_leader_fails_over_with_no_instance_ever_leaving,
        consul::an_invalid_consul_specs_last_valid_instances_survive_a_failover_and_a_restart_and_follow_readiness,
        weights::a_weighted_tonic_client_follows_the_weights_the_controller_publishes,
        weights::the_service_weight_and_a_pod_annotation_reach_the_registry_and_a_bad_annotation_is_reported,
        operator::zero_endpoints_is_ready_false_with_a_warning_then_each_change_is_an_event,
        operator::the_binary_logs_flat_json_serves_its_metrics_and_reports_an_etcd_outage_once,
        operator::with_a_min_sync_interval_a_burst_of_flips_is_published_in_one_write_ending_in_its_final_state,
        operator::sigterm_ends_the_process_promptly_when_the_api_server_was_never_reachable,
        operator::the_examples_for_a_real_cluster_are_accepted_by_the_api_server,
        operator::a_grpc_server_that_is_not_etcd_keeps_the_binary_unready_and_is_named_in_the_log,
        operator::two_pods_on_one_ip_are_registered_once_reported_and_the_rest_follow_readiness,
        operator::the_last_status_write_of_a_burst_carries_the_final_counts_and_revision,
        operator::a_numeric_port_no_container_declares_is_registered_with_a_hint_in_status,
        a_second_grpcservice_claiming_a_taken_target_shows_conflict,
        a_named_port_resolving_to_different_numbers_per_pod_works,
        faults::etcd_outage_longer_than_the_ttl_shows_backend_unavailable_then_every_key_comes_back,
        faults::etcd_outage_shorter_than_the_ttl_deletes_nothing,
        faults::controller_sigkill_without_restart_lets_the_keys_expire_after_the_ttl,
        faults::controller_sigkill_and_restart_within_the_ttl_deletes_nothing,
        faults::a_grpcservice_deleted_before_its_finalizer_lands_leaves_no_keys_and_no_owner_record,
        faults::a_restart_with_thousands_of_keys_on_a_short_ttl_writes_nothing,
        faults::pod_churn_during_an_etcd_partition_ends_in_exactly_the_desired_registry,
        faults::a_target_under_another_namespaces_prefix_is_refused_and_writes_nothing,
        faults::etcd_restart_with_data_kept_recovers_within_two_seconds_and_deletes_nothing,
        faults::wiped_etcd_gets_every_key_and_the_ownership_record_back,
        faults::a_port_name_no_pod_has_is_reported_in_the_ready_condition,
        failover::sigkill_of_the_leader_fails_over_with_no_delete_and_the_new_leader_owns_every_key_within_the_ttl,
        failover::a_rolling_restart_hands_over_at_once_with_no_delete,
        failover::an_invalid_specs_last_valid_keys_survive_a_failover_and_a_restart_and_follow_readiness,
        failover::two_writers_of_one_scope_without_leader_election_are_reported,
        failover::a_paused_leader_that_resumes_after_being_deposed_overwrites_nothing,
        faults::apiserver_restart_and_expired_watches_relist_and_apply_the_changes_made_in_the_gap,
        multicluster::two_clusters_publish_one_target_and_neither_ever_deletes_the_others_keys,
        tenancy::the_tenancy_matrix_leaves_every_other_namespace_untouched,
        consul_tenancy::the_consul_tenancy_matrix_leaves_every_other_namespace_untouched,
        consul_tenancy::an_upgrade_keeps_a_flat_consul_name_until_the_spec_changes_it,
        slices::a_service_spanning_several_slices_registers_every_endpoint_with_its_named_port,
        slices::a_rolling_replacement_loses_no_healthy_endpoint_and_leaves_no_stale_one,
        slices::a_hand_made_endpointslice_on_a_selectorless_service_registers_and_deleting_it_deregisters,
        slices::ipv6_endpoints_of_a_service_are_published_bracketed,
        interop::go_etcd_naming_resolver_reaches_servers_published_through_a_service_ref,
        interop::a_kratos_client_calls_every_server_published_with_the_kratos_format,
        chart::helm_install_then_the_charts_service_account_runs_the_whole_flow,
        chart::helm_install_with_backend_consul_passes_the_charts_readiness_probe,
        faults::a_controller_started_after_many_services_exist_registers_them_all_and_turns_ready,
    );
    let conclusion = libtest_mimic::run(&args, trials);
    drop(plane);
    conclusion.exit();
}

/// Test functions in `tests/e2e/` (async, taking the plane and a namespace name) that are not in
/// `registered`, named as their trial would be.
fn unregistered(registered: &[String]) -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("failed to read tests/e2e") {
        let path = entry.expect("failed to read tests/e2e").path();
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        let source: String = std::fs::read_to_string(&path)
            .expect("failed to read an e2e source file")
            .split_whitespace()
            .collect();
        for (_, rest) in source
            .match_indices("asyncfn")
            .map(|(i, _)| source.split_at(i + 7))
        {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            if !args.starts_with("plane:Plane,ns:String") {
                continue;
            }
            let trial = if module == "main" {
                name.to_string()
            } else {
                format!("{module}::{name}")
            };
            if !registered.contains(&trial) {
                missing.push(trial);
            }
        }
    }
    missing.sort();
    missing
}

fn trial<F, Fut>(
    runtime: &Arc<tokio::runtime::Runtime>,
    plane: &Plane,
    name: String,
    test: F,
) -> Trial
where
    F: FnOnce(Plane, String) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (runtime, plane) = (runtime.clone(), plane.clone());
    Trial::test(name.clone(), move || {
        // A namespace per test: a readable prefix plus a hash, within the 63-character limit.
        let ns = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut hasher);
            let readable: String = name
                .replace("::", "-")
                .replace('_', "-")
                .chars()
                .take(40)
                .collect();
            format!(
                "{}-{:08x}",
                readable.trim_end_matches('-'),
                hasher.finish() as u32
            )
        };
        runtime.block_on(test(plane, ns));
        Ok::<(), Failed>(())
    })
}

fn greeter_spec() -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"})
}

async fn ready_pods_are_published_with_etcd_naming_values(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    for (i, name) in ["g-0", "g-1", "g-2"].iter().enumerate() {
        env.pod(name, json!({"app": "greeter"}), 50051).await;
        env.set_ready(name, &format!("10.1.0.{}", i + 1), true)
            .await;
    }
    env.pod("other", json!({"app": "other"}), 50051).await;
    env.set_ready("other", "10.1.0.9", true).await;
    env.expect_keys(
        "three keys",
        &[
            "greeter/10.1.0.1:50051",
            "greeter/10.1.0.2:50051",
            "greeter/10.1.0.3:50051",
        ],
    )
    .await;
    let keys = env.keys().await;
    let value = &keys[&format!("services/{ns}/greeter/10.1.0.2:50051")];
    let endpoint = format::parse(value.as_bytes()).unwrap();
    assert_eq!(endpoint.addr, "10.1.0.2:50051");
    assert_eq!(
        endpoint.metadata.unwrap(),
        // The API server copies the Node's zone label onto pods bound to it.
        json!({"namespace": ns, "node": "node-1", "pod": "g-1", "zone": "zone-a"})
    );
    assert!(
        value.starts_with(r#"{"Op":0,"Addr":"10.1.0.2:50051","#),
        "{value}"
    );
    // Each Ready transition fed the propagation histogram (whole-second resolution).
    let metrics = env.metrics.encode();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("grpc_registrar_propagation_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        count >= 2,
        "propagation histogram count {count}:\n{metrics}"
    );
    env.shutdown().await;
}

async fn a_pod_that_turns_unready_is_deregistered(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.pod("g-1", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.2.0.1", true).await;
    env.set_ready("g-1", "10.2.0.2", true).await;
    env.expect_keys(
        "two keys",
        &["greeter/10.2.0.1:50051", "greeter/10.2.0.2:50051"],
    )
    .await;
    env.set_ready("g-1", "10.2.0.2", false).await;
    env.expect_keys("the unready pod's key gone", &["greeter/10.2.0.1:50051"])
        .await;
    env.set_ready("g-1", "10.2.0.2", true).await;
    env.expect_keys(
        "back when ready again",
        &["greeter/10.2.0.1:50051", "greeter/10.2.0.2:50051"],
    )
    .await;
    env.shutdown().await;
}

/// An embedder (the demo, these tests) drops the registry once `run` returns: nothing of the
/// controller may still hold it, or its lease keeper, writer announcements and sweep would go
/// on writing (and warning about a registry that is gone) after the controller stopped.
async fn once_the_controller_has_stopped_nothing_of_it_holds_the_registry(
    plane: Plane,
    ns: String,
) {
    let registry: Arc<dyn grpc_registrar::registry::Backend> =
        Arc::new(grpc_registrar::registry::memory::MemoryBackend::default());
    let held = registry.clone();
    let env = Env::with_backend(plane, &ns, Policy::default(), registry).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.2.9.1", true).await;
    eventually("registered", || async {
        env.condition_is("greeter", "Ready", "True").await
    })
    .await;
    env.shutdown().await;
    assert_eq!(
        Arc::strong_count(&held),
        1,
        "a task of the stopped controller still holds the registry"
    );
}

async fn a_terminating_pod_is_deregistered_before_it_is_gone(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    // A finalizer holds the pod in Terminating, as a kubelet's grace period would.
    env.pods()
        .patch(
            "g-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["e2e.test/hold"]}})),
        )
        .await
        .unwrap();
    env.set_ready("g-0", "10.3.0.1", true).await;
    env.expect_keys("registered", &["greeter/10.3.0.1:50051"])
        .await;
    env.pods()
        .delete("g-0", &DeleteParams::default())
        .await
        .unwrap();
    env.expect_keys("deregistered while terminating", &[]).await;
    let pod = env.pods().get("g-0").await.expect("the pod still exists");
    assert!(pod.metadata.deletion_timestamp.is_some());
    env.pods()
        .patch(
            "g-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    env.shutdown().await;
}

async fn a_pod_relabelled_out_of_the_selector_is_deregistered(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.4.0.1", true).await;
    env.expect_keys("registered", &["greeter/10.4.0.1:50051"])
        .await;
    env.pods()
        .patch(
            "g-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "moved"}}})),
        )
        .await
        .unwrap();
    env.expect_keys("deregistered after leaving the selector", &[])
        .await;
    env.shutdown().await;
}

async fn deleting_the_grpcservice_removes_every_key_and_releases_the_finalizer(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.5.0.1", true).await;
    env.expect_keys("registered", &["greeter/10.5.0.1:50051"])
        .await;
    // The finalizer is written behind the registry (the registry never waits on the API
    // server), so it may land a moment after the keys.
    eventually("the finalizer added", || async {
        env.finalizers("greeter").await == [grpc_registrar::crd::FINALIZER]
    })
    .await;
    env.services()
        .delete("greeter", &DeleteParams::default())
        .await
        .unwrap();
    env.expect_keys("every key deleted", &[]).await;
    eventually("the GrpcService is gone (finalizer released)", || async {
        env.services().get_opt("greeter").await.unwrap().is_none()
    })
    .await;
    assert_eq!(env.owner_records().await, 0, "ownership record released");
    env.shutdown().await;
}

async fn invalid_specs_are_rejected_by_the_api_server_with_a_clear_message(
    plane: Plane,
    ns: String,
) {
    let client = plane.client().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "grpc-registrar.io",
        "v1alpha1",
        "GrpcService",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let cases = [
        (
            "empty-selector",
            json!({"selector": {}, "port": 50051}),
            "selector must not be empty",
        ),
        (
            "bad-operator",
            json!({"selector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}, "port": 50051}),
            "selector operator must be one of",
        ),
        (
            "missing-port",
            json!({"selector": {"matchLabels": {"app": "x"}}}),
            "port is required with selector",
        ),
        (
            "dot-dot-target",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "target": "services/bad/../victim/hello"}),
            "target must not contain '.' or '..' segments",
        ),
        (
            "too-much-metadata",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051,
                   "metadata": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            "must have at most 32 items",
        ),
        (
            "megabyte-metadata",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051,
                   "metadata": {"blob": "x".repeat(1024 * 1024)}}),
            "Too long",
        ),
        (
            "two-sources",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "serviceRef": {"name": "x", "port": 50051}}),
            "set exactly one source",
        ),
        (
            "no-source",
            json!({"port": 50051}),
            "set exactly one source",
        ),
        (
            "service-ref-port-outside",
            json!({"serviceRef": {"name": "x", "port": "grpc"}, "port": 50051}),
            "set serviceRef.port",
        ),
        (
            "service-ref-bad-name",
            json!({"serviceRef": {"name": "X_y", "port": "grpc"}}),
            "serviceRef.name must be a Service name",
        ),
        (
            "service-ref-labels",
            json!({"serviceRef": {"name": "x", "port": "grpc"}, "metadataFromLabels": ["version"]}),
            "metadataFromLabels copies pod labels",
        ),
        (
            "port-range",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 70000}),
            "port must be a number",
        ),
        (
            "digits-as-port-name",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": "123"}),
            "port must be a number",
        ),
        (
            "bad-target",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "target": "services/a b/*"}),
            "target must be",
        ),
        (
            "negative-ttl",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "ttlSeconds": -1}),
            "spec.ttlSeconds",
        ),
        (
            "bad-template",
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "keyTemplate": "/elsewhere/{addr}"}),
            "keyTemplate must start",
        ),
    ];
    for (name, spec, message) in cases {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        let err = api
            .create(&PostParams::default(), &obj)
            .await
            .expect_err(&format!("{name} should be rejected"));
        assert!(
            err.to_string().contains(message),
            "{name}: expected {message:?} in: {err}"
        );
    }
}

async fn status_and_printer_columns_show_target_ready_and_registered(plane: Plane, ns: String) {
    let env = Env::new(plane.clone(), &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.pod("g-1", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.6.0.1", true).await;
    env.set_ready("g-1", "10.6.0.2", false).await;
    // The counts alone are also true while g-1 is still Pending ("not running"): wait for the
    // status that reflects both pods' last change (at most one coalescing interval later).
    eventually("status counts and message", || async {
        let s = env.status("greeter").await;
        s["registeredEndpoints"] == 1
            && s["readyEndpoints"] == 1
            && s["selectedEndpoints"] == 2
            && env.condition("greeter", "Ready").await["message"]
                == "1 of 2 selected pods registered; not registered: 1 not ready"
    })
    .await;
    let status = env.status("greeter").await;
    assert_eq!(status["target"], format!("services/{ns}/greeter"));
    assert_eq!(status["observedGeneration"], 1);
    assert!(status["leaseId"].is_string());
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True");

    let (ok, out, err) = plane.kubectl(&["get", "grpcsvc", "-n", &ns]);
    assert!(ok, "{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "STATUS",
            "BACKEND",
            "TARGET",
            "ENDPOINTS",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        [
            "greeter",
            "True",
            "Synced",
            "Etcd",
            &format!("services/{ns}/greeter"),
            "1"
        ]
    );
    // -o wide adds the selected count and the Ready message.
    let (ok, out, err) = plane.kubectl(&["get", "grpcsvc", "-n", &ns, "-o", "wide"]);
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "STATUS",
            "BACKEND",
            "TARGET",
            "ENDPOINTS",
            "SELECTED",
            "MESSAGE",
            "AGE"
        ]
    );
    assert!(
        out.contains("1 of 2 selected pods registered; not registered: 1 not ready"),
        "{out}"
    );

    // A service for a backend no controller here serves: its row says which backend it waits
    // for instead of being blank.
    env.service(
        "elsewhere",
        json!({"backend": "Consul", "selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"}),
    )
    .await;
    let (ok, out, err) = plane.kubectl(&["get", "grpcsvc", "elsewhere", "-n", &ns]);
    assert!(ok, "{err}");
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "elsewhere", "{out}");
    assert!(row.contains(&"Consul"), "{out}");
    assert!(!row.contains(&"Synced"), "{out}");
    env.shutdown().await;
}

async fn a_second_grpcservice_claiming_a_taken_target_shows_conflict(plane: Plane, ns: String) {
    let env = Env::new(plane.clone(), &ns).await;
    let target = format!("services/{ns}/shared");
    env.service(
        "first",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc", "target": target}),
    )
    .await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.7.0.1", true).await;
    env.expect_keys("first registers", &["shared/10.7.0.1:50051"])
        .await;
    env.service(
        "second",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc", "target": target}),
    )
    .await;
    eventually("second shows Conflict", || async {
        let s = env.status("second").await;
        s["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Conflict" && c["status"] == "True")
        })
    })
    .await;
    let message = env.condition("second", "Conflict").await["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&format!("{ns}/first")), "{message}");
    assert_eq!(
        env.keys().await.len(),
        1,
        "the second service wrote nothing"
    );
    // The row says why, and which target is contested.
    let (ok, out, err) = plane.kubectl(&["get", "grpcsvc", "second", "-n", &ns, "--no-headers"]);
    assert!(ok, "{err}");
    let row: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["second", "False", "Conflict", "Etcd", target.as_str(), "0"],
        "{out}"
    );
    // Both outcomes are Kubernetes Events on the GrpcServices (what `kubectl describe` shows).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
    eventually(
        "a Warning Conflict event on second, a Normal Synced on first",
        || async {
            let list = events.list(&Default::default()).await.unwrap().items;
            let has = |name: &str, type_: &str, reason: &str| {
                list.iter().any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                        && e.type_.as_deref() == Some(type_)
                        && e.reason.as_deref() == Some(reason)
                })
            };
            has("second", "Warning", "Conflict") && has("first", "Normal", "Synced")
        },
    )
    .await;
    // The owner goes: its release wakes the waiting service at once, not at the periodic
    // re-check (every 15 s).
    let freed = std::time::Instant::now();
    env.services()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually("second takes the freed target over", || async {
        env.condition_is("second", "Ready", "True").await
    })
    .await;
    assert!(
        freed.elapsed() < std::time::Duration::from_secs(10),
        "taken over on the release, not the re-check: {:?}",
        freed.elapsed()
    );
    env.expect_keys("second registers", &["shared/10.7.0.1:50051"])
        .await;
    env.shutdown().await;
}

async fn a_named_port_resolving_to_different_numbers_per_pod_works(plane: Plane, ns: String) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", greeter_spec()).await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.pod("g-1", json!({"app": "greeter"}), 9090).await;
    env.set_ready("g-0", "10.8.0.1", true).await;
    env.set_ready("g-1", "10.8.0.2", true).await;
    env.expect_keys(
        "each pod on its own port",
        &["greeter/10.8.0.1:50051", "greeter/10.8.0.2:9090"],
    )
    .await;
    env.shutdown().await;
}
