//! What an operator sees: the Ready condition, Events and status freshness, on the real API
//! server.

use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde_json::json;

use crate::Plane;
use crate::harness::{ControllerProcess, Env, events_of, eventually, has_event, http_get};

fn spec() -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": "grpc"})
}

/// GrpcService `greeter` and pods g-0..g-2 at `10.<subnet>.0.1-3`, Running but not Ready.
async fn greeter_with_three_unready_pods(env: &Env, subnet: u8) {
    env.service("greeter", spec()).await;
    for (i, pod) in ["g-0", "g-1", "g-2"].iter().enumerate() {
        env.pod(pod, json!({"app": "greeter"}), 50051).await;
        env.set_ready(pod, &format!("10.{subnet}.0.{}", i + 1), false)
            .await;
    }
}

pub async fn zero_endpoints_is_ready_false_with_a_warning_then_each_change_is_an_event(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    greeter_with_three_unready_pods(&env, 31).await;
    // Every pod unready: Ready is False, so `kubectl wait --for=condition=Ready` does not pass.
    eventually("Ready=False NoReadyEndpoints", || async {
        let c = env.condition("greeter", "Ready").await;
        c["status"] == "False"
            && c["reason"] == "NoReadyEndpoints"
            && c["message"] == "0 of 3 selected pods registered; not registered: 3 not ready"
    })
    .await;
    eventually("a Warning NoReadyEndpoints event", || {
        has_event(&env, "greeter", "Warning", "NoReadyEndpoints", "0 of ")
    })
    .await;
    env.set_ready("g-0", "10.31.0.1", true).await;
    eventually("Ready=True Synced and its Normal event", || async {
        env.condition_is("greeter", "Ready", "True").await
            && has_event(&env, "greeter", "Normal", "Synced", "1 of 3").await
    })
    .await;
    env.set_ready("g-1", "10.31.0.2", true).await;
    env.set_ready("g-2", "10.31.0.3", true).await;
    // Count changes are summed up in one Event per interval, never one per pod.
    eventually("an EndpointsChanged event", || {
        has_event(
            &env,
            "greeter",
            "Normal",
            "EndpointsChanged",
            "3 endpoints registered (was 1)",
        )
    })
    .await;
    let changed = events_of(&env, "greeter")
        .await
        .iter()
        .filter(|(_, r, _)| r == "EndpointsChanged")
        .count();
    assert_eq!(changed, 1, "{:?}", events_of(&env, "greeter").await);
    // The same reason again, with what is true now (not the first Event's note).
    for (i, pod) in ["g-0", "g-1", "g-2"].iter().enumerate() {
        env.set_ready(pod, &format!("10.31.0.{}", i + 1), false)
            .await;
    }
    eventually("a second NoReadyEndpoints event saying 3 not ready", || {
        has_event(
            &env,
            "greeter",
            "Warning",
            "NoReadyEndpoints",
            "0 of 3 selected pods registered; not registered: 3 not ready",
        )
    })
    .await;
    // A selector that matches nothing is not Ready either.
    env.service(
        "nobody",
        json!({"selector": {"matchLabels": {"app": "nobody"}}, "port": "grpc"}),
    )
    .await;
    eventually("Ready=False NoPodsSelected with a Warning", || async {
        let c = env.condition("nobody", "Ready").await;
        c["status"] == "False"
            && c["reason"] == "NoPodsSelected"
            && has_event(
                &env,
                "nobody",
                "Warning",
                "NoPodsSelected",
                "matches no pod",
            )
            .await
    })
    .await;
    env.shutdown().await;
}

pub async fn the_last_status_write_of_a_burst_carries_the_final_counts_and_revision(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    greeter_with_three_unready_pods(&env, 32).await;
    eventually("status written", || async {
        env.condition("greeter", "Ready").await["reason"] == "NoReadyEndpoints"
    })
    .await;
    // Three quick readiness changes: the first write is immediate (Ready turns True), the
    // rest are coalesced, and the coalesced write must still say what the registry holds.
    for (i, pod) in ["g-0", "g-1", "g-2"].iter().enumerate() {
        env.set_ready(pod, &format!("10.32.0.{}", i + 1), true)
            .await;
    }
    let prefix = format!("services/{ns}/greeter/");
    let newest = || async {
        let mut etcd = env.etcd.client().await;
        let resp = etcd
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        (
            resp.kvs().len(),
            resp.kvs()
                .iter()
                .map(|kv| kv.mod_revision())
                .max()
                .unwrap_or(0),
        )
    };
    eventually("three keys", || async { newest().await.0 == 3 }).await;
    let (_, revision) = newest().await;
    eventually(
        "status carries the final counts and the final revision",
        || async {
            let s = env.status("greeter").await;
            s["readyEndpoints"] == 3
                && s["registeredEndpoints"] == 3
                && s["registryRevision"]
                    .as_i64()
                    .is_some_and(|r| r >= revision)
                && s["etcdRevision"] == s["registryRevision"]
        },
    )
    .await;
    let s = env.status("greeter").await;
    let synced = s["lastSyncTime"]
        .as_str()
        .unwrap()
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap();
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(synced);
    assert!(age.as_secs() < 30, "lastSyncTime is stale: {s}");
    env.shutdown().await;
}

pub async fn with_a_min_sync_interval_a_burst_of_flips_is_published_in_one_write_ending_in_its_final_state(
    plane: Plane,
    ns: String,
) {
    const INTERVAL: Duration = Duration::from_secs(2);
    let env = Env::without_controller(plane.clone(), &ns).await;
    let port = test_support::free_port();
    let _controller = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 10)
        .args(&["--min-sync-interval", "2s"])
        .metrics_port(port)
        .start();
    greeter_with_three_unready_pods(&env, 37).await;
    eventually("the service is reconciled with no ready pods", || async {
        env.condition("greeter", "Ready").await["reason"] == "NoReadyEndpoints"
    })
    .await;
    let reconciles = || async {
        let page = http_get(port, "/metrics").await.expect("metrics scrape").1;
        page.lines()
            .find_map(|l| l.strip_prefix("grpc_registrar_reconciliations_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("grpc_registrar_reconciliations_total")
    };
    // The pods' creation queued changes too (some held): wait until no reconcile has started
    // for two intervals, so that the service's next change finds it quiet.
    let settled = async {
        let (mut last, mut since) = (reconciles().await, Instant::now());
        while since.elapsed() < INTERVAL * 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = reconciles().await;
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    };
    let before = tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .expect("the controller kept reconciling");
    let prefix = format!("services/{ns}/greeter/");
    let mut client = env.etcd.client().await;
    let mut watch = client
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    // The next write's changes (the watch's creation notice carries none).
    let mut next_write = async || {
        let resp = loop {
            let resp = tokio::time::timeout(Duration::from_secs(20), watch.message())
                .await
                .expect("no registry write within 20 s")
                .unwrap()
                .expect("the watch ended");
            if !resp.events().is_empty() {
                break resp;
            }
        };
        let mut events: Vec<(String, bool, i64)> = resp
            .events()
            .iter()
            .map(|e| {
                let kv = e.kv().unwrap();
                (
                    String::from_utf8_lossy(kv.key())
                        .trim_start_matches(&prefix)
                        .to_owned(),
                    e.event_type() == EventType::Put,
                    kv.mod_revision(),
                )
            })
            .collect();
        events.sort();
        (events, Instant::now())
    };

    // A change to a quiet service is published at once.
    let sent = Instant::now();
    env.set_ready("g-0", "10.37.0.1", true).await;
    let (first, first_at) = next_write().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!((first[0].0.as_str(), first[0].1), ("10.37.0.1:50051", true));
    assert!(
        first_at - sent < INTERVAL / 2,
        "the first change took {:?}: it was held",
        first_at - sent
    );
    // Three more within the interval: held until it has passed, then published together, in
    // one write, in their final state (nothing in between ever visible).
    env.set_ready("g-1", "10.37.0.2", true).await;
    env.set_ready("g-2", "10.37.0.3", true).await;
    env.set_ready("g-0", "10.37.0.1", false).await;
    let (burst, burst_at) = next_write().await;
    let changes: Vec<(&str, bool)> = burst.iter().map(|(k, put, _)| (k.as_str(), *put)).collect();
    assert_eq!(
        changes,
        [
            ("10.37.0.1:50051", false),
            ("10.37.0.2:50051", true),
            ("10.37.0.3:50051", true)
        ],
        "the burst in one write: {burst:?}"
    );
    assert!(
        burst.iter().all(|(_, _, rev)| *rev == burst[0].2),
        "one revision: {burst:?}"
    );
    assert!(
        burst_at - first_at >= INTERVAL - Duration::from_millis(100),
        "the burst was published {:?} after the first change, inside the interval",
        burst_at - first_at
    );
    env.expect_keys(
        "the burst's final state",
        &["greeter/10.37.0.2:50051", "greeter/10.37.0.3:50051"],
    )
    .await;
    let spent = reconciles().await - before;
    assert!(
        spent <= 2.0,
        "four flips took {spent} reconciles; the three within the interval should fold into one"
    );
    env.shutdown().await;
}

pub async fn the_binary_logs_flat_json_serves_its_metrics_and_reports_an_etcd_outage_once(
    plane: Plane,
    ns: String,
) {
    let mut env = Env::without_controller(plane.clone(), &ns).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = test_support::free_port();
    let mut controller = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 10)
        .env("RUST_LOG", "info")
        .args(&["--log-format", "json"])
        .metrics_port(port)
        .log_to(log.path().to_owned())
        .start();
    // Pods made ready before the controller's initial list are not propagation samples (it
    // never saw them change), so the pods change only once its caches have synced.
    eventually("/readyz is 200 once caches have synced", || async {
        http_get(port, "/readyz")
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await;
    env.service("greeter", spec()).await;
    for (i, pod) in ["g-0", "g-1"].iter().enumerate() {
        env.pod(pod, json!({"app": "greeter"}), 50051).await;
        env.set_ready(pod, &format!("10.33.0.{}", i + 1), true)
            .await;
    }
    env.expect_keys(
        "registered",
        &["greeter/10.33.0.1:50051", "greeter/10.33.0.2:50051"],
    )
    .await;
    let metrics = || async {
        http_get(port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let service = format!("namespace=\"{ns}\",name=\"greeter\"");
    eventually("per-service gauges", || async {
        let page = metrics().await;
        page.contains(&format!(
            "grpc_registrar_registered_endpoints{{{service}}} 2"
        )) && page.contains(&format!("grpc_registrar_selected_endpoints{{{service}}} 2"))
            && page.contains(&format!("grpc_registrar_ready_endpoints{{{service}}} 2"))
    })
    .await;
    let page = metrics().await;
    for needle in [
        "grpc_registrar_build_info{version=\"",
        "grpc_registrar_backend_connected{backend=\"etcd\"} 1",
        "grpc_registrar_backend_errors_total{backend=\"etcd\",op=\"txn\"} 0",
        "grpc_registrar_reconcile_failures_total{error=\"etcd\"} 0",
        "grpc_registrar_propagation_seconds_count ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(
            page.contains(needle),
            "{needle} missing from /metrics:\n{page}"
        );
    }
    assert!(
        !page.contains("grpc_registrar_propagation_seconds_count 0"),
        "readiness changes seen by the watch were measured:\n{page}"
    );

    // etcd goes away: /readyz says so, the gauge drops, errors are counted by operation, and
    // the log says it once rather than once per retry.
    env.etcd.stop();
    eventually("/readyz is 503 naming the registry, etcd", || async {
        http_get(port, "/readyz").await.is_some_and(|(code, body)| {
            code == 503 && body.contains("registry: unreachable, see the log (etcd)")
        })
    })
    .await;
    assert!(
        metrics()
            .await
            .contains("grpc_registrar_backend_connected{backend=\"etcd\"} 0")
    );
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    env.etcd.restart().await;
    eventually("/readyz is 200 again", || async {
        http_get(port, "/readyz")
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await;
    controller.terminate();

    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a log file");
    assert!(
        !text.contains("failed to run finalizer") && !text.contains("reconcile loop reported"),
        "errors are wrapped or logged twice:\n{text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let updated = lines
        .iter()
        .find(|l| l["message"] == "registry updated")
        .unwrap_or_else(|| panic!("no 'registry updated' line in:\n{text}"));
    assert_eq!(updated["name"], "greeter", "{updated}");
    assert_eq!(updated["namespace"], ns.as_str());
    assert_eq!(updated["span"], "reconcile");
    assert!(
        updated["lease_id"].is_string() && updated["revision"].is_i64(),
        "{updated}"
    );
    // One meaning and one type per field: `target` is always tracing's module, the registry
    // prefix is `registry_target`, and `endpoints` is always a count.
    assert_eq!(
        updated["registry_target"],
        format!("services/{ns}/greeter"),
        "{updated}"
    );
    for line in &lines {
        let module = line["target"].as_str().unwrap_or_default();
        assert!(
            !module.is_empty() && !module.contains('/'),
            "target is a module path: {line}"
        );
        assert!(
            line.get("endpoints").is_none_or(serde_json::Value::is_u64),
            "endpoints is a count: {line}"
        );
    }
    let reachable = lines
        .iter()
        .find(|l| l["message"] == "registry reachable")
        .unwrap_or_else(|| panic!("no 'registry reachable' line in:\n{text}"));
    assert!(reachable["registry_address"].is_string(), "{reachable}");
    let outage: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
        .collect();
    assert!(
        (1..=4).contains(&outage.len()),
        "a 3 s etcd outage should be a few warnings, not one per retry: {outage:#?}"
    );
    for line in &outage {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(
            !error.contains("Os {") && !error.contains("ConnectError("),
            "debug structures in {line}"
        );
    }
}

pub async fn sigterm_ends_the_process_promptly_when_the_api_server_was_never_reachable(
    plane: Plane,
    ns: String,
) {
    let env = Env::without_controller(plane.clone(), &ns).await;
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    let unreachable = std::fs::read_to_string(plane.kubeconfig())
        .unwrap()
        .replace(&plane.url(), "https://127.0.0.1:1");
    std::fs::write(kubeconfig.path(), unreachable).unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut controller = ControllerProcess::builder(&plane, &env.etcd.endpoint(), &ns, 10)
        .env("KUBECONFIG", kubeconfig.path())
        .log_to(log.path().to_path_buf())
        .start();
    // In its retry loop: a watch has failed to reach the API server.
    eventually(
        "the controller retries the unreachable API server",
        || async {
            std::fs::read_to_string(log.path()).is_ok_and(|l| {
                l.contains("controller error; retrying") && l.contains("Connection refused")
            })
        },
    )
    .await;
    controller.sigterm();
    let status = controller.wait_exit(std::time::Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "still running (or failed) 5 s after SIGTERM: {status:?}"
    );
}

pub async fn the_examples_for_a_real_cluster_are_accepted_by_the_api_server(
    plane: Plane,
    ns: String,
) {
    let env = Env::without_controller(plane.clone(), &ns).await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/grpc-health.yaml");
    let (ok, out, err) = plane.kubectl(&["apply", "--dry-run=server", "-n", &env.ns, "-f", path]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("deployment.apps/grpc-health created (server dry run)"),
        "{out}"
    );
    assert!(
        out.contains("grpcservice.grpc-registrar.io/grpc-health created (server dry run)"),
        "{out}"
    );
}

/// `--etcd-endpoints` pointed at a gRPC server that is not etcd (a Greeter): the answer
/// (`unknown service etcdserverpb.KV`) is not etcd's, so `/readyz` says the registry is
/// unreachable and the log says what is wrong, instead of "reachable", 200.
pub async fn a_grpc_server_that_is_not_etcd_keeps_the_binary_unready_and_is_named_in_the_log(
    plane: Plane,
    ns: String,
) {
    let env = Env::without_controller(plane.clone(), &ns).await;
    let greeter = greeter::GreeterServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = test_support::free_port();
    let endpoint = format!("http://{}", greeter.addr());
    let mut controller = ControllerProcess::builder(&plane, &endpoint, &ns, 10)
        .env("RUST_LOG", "info")
        .metrics_port(port)
        .log_to(log.path().to_owned())
        .start();
    eventually("the start-up check says etcd is not there", || async {
        std::fs::read_to_string(log.path()).is_ok_and(|l| l.contains("is not etcd"))
    })
    .await;
    // Caches sync (the API server is fine); the registry stays unreachable.
    eventually("/readyz is 503, naming the registry", || async {
        http_get(port, "/readyz").await.is_some_and(|(code, body)| {
            code == 503
                && body.contains("caches: synced")
                && body.contains("registry: unreachable, see the log (etcd)")
        })
    })
    .await;
    let metrics = http_get(port, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("grpc_registrar_backend_connected{backend=\"etcd\"} 0"),
        "{metrics}"
    );
    controller.terminate();
    drop(env);
}

/// Two pods reporting one IP (IP reuse, hostNetwork, a copied status) collide on one key: the
/// key is registered once, status and a Warning Event name the pod left out, and the service
/// keeps publishing and following readiness (it used to turn InvalidSpec and freeze).
pub async fn two_pods_on_one_ip_are_registered_once_reported_and_the_rest_follow_readiness(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    env.service("greeter", spec()).await;
    for (pod, ip) in [
        ("g-0", "10.34.0.1"),
        ("g-1", "10.34.0.2"),
        ("g-2", "10.34.0.1"),
    ] {
        env.pod(pod, json!({"app": "greeter"}), 50051).await;
        env.set_ready(pod, ip, true).await;
    }
    env.expect_keys(
        "one key per address",
        &["greeter/10.34.0.1:50051", "greeter/10.34.0.2:50051"],
    )
    .await;
    eventually("Ready, with the collision named", || async {
        let ready = env.condition("greeter", "Ready").await;
        ready["status"] == "True"
            && ready["reason"] == "EndpointCollision"
            && ready["message"]
                .as_str()
                .is_some_and(|m| m.contains("g-2 left out") && m.contains("which g-0 holds"))
    })
    .await;
    eventually("a Warning Event naming the pods", || {
        has_event(
            &env,
            "greeter",
            "Warning",
            "EndpointCollision",
            "g-2 left out",
        )
    })
    .await;
    // The rest keep following readiness.
    env.set_ready("g-1", "10.34.0.2", false).await;
    env.expect_keys("an unready pod leaves", &["greeter/10.34.0.1:50051"])
        .await;
    env.pod("g-3", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-3", "10.34.0.3", true).await;
    env.expect_keys(
        "a new ready pod joins",
        &["greeter/10.34.0.1:50051", "greeter/10.34.0.3:50051"],
    )
    .await;
    assert!(env.condition_is("greeter", "InvalidSpec", "False").await);
    env.shutdown().await;
}

pub async fn a_numeric_port_no_container_declares_is_registered_with_a_hint_in_status(
    plane: Plane,
    ns: String,
) {
    let env = Env::new(plane, &ns).await;
    // The pods declare 50051 (named grpc); the spec asks for 50052.
    env.service(
        "greeter",
        json!({"selector": {"matchLabels": {"app": "greeter"}}, "port": 50052}),
    )
    .await;
    env.pod("g-0", json!({"app": "greeter"}), 50051).await;
    env.set_ready("g-0", "10.36.0.1", true).await;
    eventually("Synced, registered, with the hint", || async {
        let c = env.condition("greeter", "Ready").await;
        let message = c["message"].as_str().unwrap_or_default().to_owned();
        c["status"] == "True"
            && c["reason"] == "Synced"
            && message.contains("port 50052 is declared by no container of 1 pod registered")
            && message.contains("check spec.port")
            && message.contains("(ports offered: grpc=50051)")
    })
    .await;
    assert_eq!(env.status("greeter").await["registeredEndpoints"], 1);
    env.shutdown().await;
}
