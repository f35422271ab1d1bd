//! The Helm chart, rendered by the pinned helm: lint, the values schema and render-time checks,
//! least-privilege RBAC, the Pod Security "restricted" profile, that every setting it passes is
//! one the binary reads, the CRD, the monitoring objects, the install notes and the README.
//! (`helm install` into a real API server, run under the chart's ServiceAccount, is in the e2e
//! suite.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use grpc_registrar::desired::Desired;
use grpc_registrar::leader::ElectionConfig;
use grpc_registrar::metrics::Metrics;
use serde_json::Value;
use test_support::{helm_bin, workspace_root};

fn chart() -> PathBuf {
    workspace_root().join("charts/grpc-registrar")
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm_bin())
        .args(args)
        .output()
        .expect("failed to run helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `helm template` of `chart` in namespace `registrar` with extra flags (`--set`, `--set-json`).
fn template_chart(chart: &Path, flags: &[&str]) -> (bool, String) {
    let mut args = vec![
        "template",
        "reg",
        chart.to_str().unwrap(),
        "--namespace",
        "registrar",
        "--kube-version",
        "1.36.0",
    ];
    args.extend(flags);
    helm(&args)
}

fn set_flags<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    sets.iter().flat_map(|set| ["--set", set]).collect()
}

/// The rendered manifests for these flags.
fn render_flags(flags: &[&str]) -> Vec<Value> {
    let (ok, out) = template_chart(&chart(), flags);
    assert!(ok, "helm template failed:\n{out}");
    parse_manifests(&out)
}

/// The rendered manifests for `--set` overrides.
fn render(sets: &[&str]) -> Vec<Value> {
    render_flags(&set_flags(sets))
}

/// The error helm prints when these `--set` overrides must be refused.
fn refused(sets: &[&str]) -> String {
    let (ok, out) = template_chart(&chart(), &set_flags(sets));
    assert!(!ok, "{sets:?} rendered but should be refused:\n{out}");
    out
}

fn parse_manifests(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm template printed invalid YAML")
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "expected one {k}, found {}", found.len());
    found[0]
}

fn pod_spec(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]
}

fn container(docs: &[Value]) -> &Value {
    &pod_spec(docs)["containers"][0]
}

/// The literal value of the container's env var `name`.
fn env_value(docs: &[Value], name: &str) -> Option<String> {
    container(docs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["name"].as_str().map(str::to_owned))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn read(relative: &str) -> String {
    let path = chart().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values() -> Value {
    serde_saphyr::from_str(&read("values.yaml")).expect("values.yaml is invalid YAML")
}

fn schema() -> Value {
    serde_json::from_str(&read("values.schema.json")).expect("values.schema.json is invalid JSON")
}

/// The leaves of values.yaml, as dotted paths with their defaults: a key whose schema declares
/// `properties` is the chart's own object and is walked into; anything else (a scalar, a list,
/// a free-form map such as `resources`) is a leaf. A key the schema does not declare is
/// returned in the second list.
fn value_leaves(values: &Value, schema: &Value) -> (Vec<(String, Value)>, Vec<String>) {
    fn walk(
        value: &Value,
        schema: &Value,
        path: &str,
        leaves: &mut Vec<(String, Value)>,
        unknown: &mut Vec<String>,
    ) {
        for (key, value) in value.as_object().unwrap() {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let sub = &schema["properties"][key];
            if sub.is_null() {
                unknown.push(path);
            } else if sub["properties"].is_object() && value.is_object() {
                walk(value, sub, &path, leaves, unknown);
            } else {
                leaves.push((path, value.clone()));
            }
        }
    }
    let (mut leaves, mut unknown) = (Vec::new(), Vec::new());
    walk(values, schema, "", &mut leaves, &mut unknown);
    (leaves, unknown)
}

/// A duration as the binary parses it (`1500ms`, `15s`, `1m`, bare seconds).
fn duration(s: &str) -> Duration {
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.');
    let (number, unit) = split.map_or((s, "s"), |i| s.split_at(i));
    let number: f64 = number.parse().unwrap();
    Duration::from_secs_f64(match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => panic!("unit of {s}"),
    })
}

/// Every number as an f64, so `86400.0` (crdgen) equals `86400` (after fromYaml/toYaml).
fn numbers_as_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::from(n.as_f64().unwrap()),
        Value::Array(items) => items.iter().map(numbers_as_floats).collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
            .collect(),
        other => other.clone(),
    }
}

/// The metric names in a PromQL expression: `grpc_registrar_*` and `process_*`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["grpc_registrar_", "process_"] {
        for (at, _) in expr.match_indices(prefix) {
            let before = expr[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

/// The series names the binary exports (counters with `_total`; histograms as their base name).
fn exported_metrics() -> BTreeSet<String> {
    let metrics = Metrics::default();
    // A labelled family is on the page once it has a series.
    metrics.observe_service("ns", "svc", &Desired::default(), 0);
    metrics.observe_etcd("range", Instant::now());
    metrics.reconcile_failed("etcd");
    metrics
        .encode()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|line| {
            let mut words = line.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

/// A series name without its histogram suffix.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// Every string under a JSON key named `key`, anywhere in `v`.
fn strings_under(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(v, key, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/grpc-registrar.json"))
        .expect("dashboards/grpc-registrar.json is invalid JSON")
}

/// The PromQL of every dashboard panel and template variable.
fn dashboard_exprs() -> Vec<String> {
    let dashboard = dashboard();
    let mut exprs = Vec::new();
    strings_under(&dashboard["panels"], "expr", &mut exprs);
    strings_under(&dashboard["templating"], "query", &mut exprs);
    exprs
}

fn alert_rules(docs: &[Value]) -> Vec<Value> {
    one(docs, "PrometheusRule")["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn helm_lint_passes_in_strict_mode() {
    let chart = chart();
    let (ok, out) = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn plain_helm_template_without_a_kube_version_renders() {
    // The pinned helm is stamped with the Kubernetes version of its client-go, as release builds
    // are; unstamped it assumes v1.20.0, below the chart's kubeVersion.
    let chart = chart();
    let (ok, out) = helm(&["template", "reg", chart.to_str().unwrap()]);
    assert!(ok, "{out}");
    let docs = parse_manifests(&out);
    one(&docs, "Deployment");
    one(&docs, "CustomResourceDefinition");
}

#[test]
fn the_deployment_meets_the_restricted_pod_security_profile() {
    let docs = render(&[
        "etcd.tls.secretName=etcd-tls",
        "etcd.auth.secretName=etcd-auth",
    ]);
    let spec = pod_spec(&docs);
    let pod = &spec["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    assert_ne!(pod["runAsUser"], 0);
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(spec[field].is_null() || spec[field] == false, "{field}");
    }
    for volume in spec["volumes"].as_array().unwrap() {
        assert!(volume["hostPath"].is_null(), "hostPath volume {volume}");
        assert!(
            volume["secret"].is_object(),
            "only Secret volumes: {volume}"
        );
    }
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert!(sc["capabilities"]["add"].is_null());
        assert!(sc["privileged"].is_null() || sc["privileged"] == false);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert!(
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["hostPort"].is_null())
        );
        // Probes on the controller's endpoints, and resources set.
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert!(c["resources"]["limits"]["memory"].is_string());
    }
}

#[test]
fn rbac_is_least_privilege_with_no_wildcards() {
    let docs = render(&[]);
    for role in kind(&docs, "ClusterRole")
        .into_iter()
        .chain(kind(&docs, "Role"))
    {
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "wildcard in {field} of {rule}"
                );
            }
        }
    }
    let rules: Vec<(String, Vec<String>)> = one(&docs, "ClusterRole")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| {
            let verbs = strings(&rule["verbs"]);
            strings(&rule["resources"])
                .into_iter()
                .map(move |r| (r, verbs.clone()))
        })
        .collect();
    let expect = |resource: &str, verbs: &[&str]| {
        let got = rules
            .iter()
            .find(|(r, _)| r == resource)
            .unwrap_or_else(|| panic!("no rule for {resource}"));
        assert_eq!(got.1, verbs, "verbs on {resource}");
    };
    expect("pods", &["get", "list", "watch"]);
    expect("grpcservices", &["get", "list", "watch", "patch"]);
    expect("grpcservices/status", &["patch", "update"]);
    expect("grpcservices/finalizers", &["patch", "update"]);
    expect("events", &["create", "patch"]);
    assert_eq!(rules.len(), 5, "nothing else: {rules:?}");
    // Secrets, in particular, are never readable.
    assert!(!rules.iter().any(|(r, _)| r == "secrets"));

    // The leader-election Lease: namespaced, and get/update only on the one Lease.
    let lease_role = one(&docs, "Role");
    assert_eq!(lease_role["metadata"]["namespace"], "registrar");
    let rules = lease_role["rules"].as_array().unwrap();
    assert!(rules.iter().all(|r| strings(&r["resources"]) == ["leases"]));
    assert!(
        rules
            .iter()
            .any(|r| strings(&r["verbs"]) == ["get", "update"]
                && strings(&r["resourceNames"]) == ["reg-grpc-registrar"])
    );
}

#[test]
fn a_watched_namespace_gets_a_role_there_instead_of_a_cluster_role() {
    let docs = render(&["watchNamespace=apps"]);
    assert!(kind(&docs, "ClusterRole").is_empty());
    assert!(kind(&docs, "ClusterRoleBinding").is_empty());
    let roles = kind(&docs, "Role");
    assert!(roles.iter().any(|r| r["metadata"]["namespace"] == "apps"));
}

#[test]
fn two_replicas_with_leader_election_a_pdb_and_a_metrics_service_by_default() {
    let docs = render(&[]);
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"], 1);
    assert_eq!(one(&docs, "Service")["spec"]["ports"][0]["name"], "metrics");
    // Monitoring objects need the Prometheus Operator or Grafana: off unless asked for.
    for monitoring in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(kind(&docs, monitoring).is_empty(), "{monitoring}");
    }
    assert_eq!(env_value(&docs, "LEADER_ELECT").as_deref(), Some("true"));

    let single = render(&["replicaCount=1"]);
    assert!(kind(&single, "PodDisruptionBudget").is_empty());
    let monitored = render(&["serviceMonitor.enabled=true"]);
    assert_eq!(
        one(&monitored, "ServiceMonitor")["spec"]["endpoints"][0]["path"],
        "/metrics"
    );
}

#[test]
fn replicas_without_leader_election_are_refused() {
    let out = refused(&["leaderElection.enabled=false"]);
    assert!(out.contains("needs leaderElection.enabled"), "{out}");
}

#[test]
fn every_setting_the_chart_passes_is_an_env_var_the_binary_reads() {
    let help = Command::new(env!("CARGO_BIN_EXE_grpc-registrar"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let docs = render(&[
        "etcd.tls.secretName=etcd-tls",
        "etcd.auth.secretName=etcd-auth",
    ]);
    for var in container(&docs)["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        if name == "RUST_LOG" {
            continue; // read by the log filter, not a flag
        }
        assert!(
            help.contains(&format!("[env: {name}")),
            "the chart sets {name}, which the binary does not read"
        );
    }
}

#[test]
fn a_non_integer_replica_count_is_refused_by_the_schema() {
    let out = refused(&["replicaCount=two"]);
    assert!(out.contains("/replicaCount"), "{out}");
}

#[test]
fn a_typo_in_values_is_refused_by_the_schema() {
    let out = refused(&["etcd.endpoint=http://x:2379"]);
    assert!(
        out.contains("/etcd") && out.contains("'endpoint' not allowed"),
        "{out}"
    );
    // Also at the top level and inside the chart's nested objects.
    refused(&["replicas=3"]);
    refused(&["etcd.tls.secret=etcd-tls"]);
}

#[test]
fn a_lease_ttl_outside_5_to_86400_seconds_is_refused_by_the_schema() {
    for ttl in [
        "etcd.leaseTTL=4",
        "etcd.leaseTTL=86401",
        "etcd.leaseTTL=30s",
    ] {
        let out = refused(&[ttl]);
        assert!(out.contains("/etcd/leaseTTL"), "{ttl}: {out}");
    }
    render(&["etcd.leaseTTL=86400"]);
    render(&[
        "etcd.leaseTTL=5",
        "leaderElection.leaseDuration=4s",
        "leaderElection.renewDeadline=3s",
        "leaderElection.retryPeriod=1s",
    ]);
}

#[test]
fn a_log_format_other_than_plain_or_json_is_refused_by_the_schema() {
    let out = refused(&["logging.format=text"]);
    assert!(out.contains("/logging/format"), "{out}");
    let docs = render(&["logging.format=plain"]);
    assert_eq!(env_value(&docs, "LOG_FORMAT").as_deref(), Some("plain"));
}

#[test]
fn every_value_has_a_schema_and_the_charts_own_objects_refuse_unknown_keys() {
    let schema = schema();
    let (_, unknown) = value_leaves(&values(), &schema);
    assert!(unknown.is_empty(), "values without a schema: {unknown:?}");
    // An object whose properties the chart declares is closed; free-form maps (resources,
    // affinity, security-context and probe overrides, annotations) declare none.
    fn closed(schema: &Value, path: &str) {
        if let Some(properties) = schema["properties"].as_object() {
            assert_eq!(
                schema["additionalProperties"], false,
                "{path} accepts unknown keys"
            );
            for (key, sub) in properties {
                closed(sub, &format!("{path}.{key}"));
            }
        }
    }
    closed(&schema, "(values)");
}

#[test]
fn the_chart_refuses_exactly_the_election_timings_the_binary_refuses() {
    // (etcd.leaseTTL, leaseDuration, renewDeadline, retryPeriod)
    let cases = [
        ("30", "15s", "10s", "2s"),
        ("15", "15s", "10s", "2s"),
        ("16", "15s", "10s", "2s"),
        ("10", "9500ms", "9s", "1s"),
        ("10", "10000ms", "9s", "1s"),
        ("10", "0.2m", "9s", "1s"),
        ("60", "1m", "30s", "5s"),
        ("61", "1m", "30s", "5s"),
        ("30", "15s", "15s", "2s"),
        ("30", "15s", "10s", "10s"),
        ("30", "15s", "10s", "0s"),
        ("30", "15s", "10s", "9.5"),
        ("30", "15s", "10s", "500ms"),
    ];
    for (ttl, lease, renew, retry) in cases {
        let binary = ElectionConfig {
            namespace: "registrar".into(),
            name: "reg".into(),
            identity: "reg-0".into(),
            lease_duration: duration(lease),
            renew_deadline: duration(renew),
            retry_period: duration(retry),
        }
        .validate(Duration::from_secs(ttl.parse().unwrap()));
        let sets = [
            format!("etcd.leaseTTL={ttl}"),
            format!("leaderElection.leaseDuration={lease}"),
            format!("leaderElection.renewDeadline={renew}"),
            format!("leaderElection.retryPeriod={retry}"),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let (ok, out) = template_chart(&chart(), &set_flags(&sets));
        assert_eq!(
            ok,
            binary.is_ok(),
            "{sets:?}: binary says {binary:?}, chart says:\n{out}"
        );
        if !ok {
            assert!(
                out.contains("must be") && out.contains("leaderElection."),
                "{out}"
            );
        }
    }
}

#[test]
fn a_lease_ttl_shorter_than_the_leader_lease_fails_saying_what_to_change() {
    let out = refused(&["etcd.leaseTTL=10"]);
    assert!(
        out.contains("leaderElection.leaseDuration (15s) must be shorter than etcd.leaseTTL (10s)"),
        "{out}"
    );
    assert!(
        out.contains("raise etcd.leaseTTL above 15s or lower leaderElection.leaseDuration"),
        "{out}"
    );
    // Without leader election the binary does not check the timings, and neither does the chart.
    render(&[
        "etcd.leaseTTL=10",
        "leaderElection.enabled=false",
        "replicaCount=1",
    ]);
}

#[test]
fn the_shutdown_timeout_reaches_the_binary_and_stays_below_the_grace_period() {
    assert_eq!(
        env_value(&render(&[]), "SHUTDOWN_TIMEOUT").as_deref(),
        Some("20s")
    );
    let out = refused(&["shutdownTimeout=30s"]);
    assert!(
        out.contains(
            "shutdownTimeout (30s) must be shorter than terminationGracePeriodSeconds (30)"
        ),
        "{out}"
    );
    let docs = render(&["shutdownTimeout=45s", "terminationGracePeriodSeconds=60"]);
    assert_eq!(env_value(&docs, "SHUTDOWN_TIMEOUT").as_deref(), Some("45s"));
    assert_eq!(pod_spec(&docs)["terminationGracePeriodSeconds"], 60);
}

#[test]
fn extra_args_env_sources_volumes_and_mounts_reach_the_container() {
    let docs = render_flags(&[
        "--set",
        "etcd.tls.secretName=etcd-tls",
        "--set-json",
        r#"extraArgs=["--log-format=plain"]"#,
        "--set-json",
        r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"},{"name":"FROM_SECRET","valueFrom":{"secretKeyRef":{"name":"s","key":"k"}}}]"#,
        "--set-json",
        r#"envFrom=[{"configMapRef":{"name":"registrar-env"}}]"#,
        "--set-json",
        r#"extraVolumes=[{"name":"scratch","emptyDir":{}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"scratch","mountPath":"/scratch"}]"#,
    ]);
    let c = container(&docs);
    assert_eq!(strings(&c["args"]), ["--log-format=plain"]);
    let env = names(&c["env"]);
    assert!(env.contains(&"ETCD_ENDPOINTS".to_owned()), "{env:?}");
    assert!(env.ends_with(&["HTTPS_PROXY".to_owned(), "FROM_SECRET".to_owned()]));
    assert_eq!(c["envFrom"][0]["configMapRef"]["name"], "registrar-env");
    assert_eq!(names(&pod_spec(&docs)["volumes"]), ["etcd-tls", "scratch"]);
    assert_eq!(names(&c["volumeMounts"]), ["etcd-tls", "scratch"]);

    // None of them is rendered when unset.
    let plain = render(&[]);
    for field in ["args", "envFrom", "volumeMounts"] {
        assert!(container(&plain)[field].is_null(), "{field}");
    }
    assert!(pod_spec(&plain)["volumes"].is_null());
}

#[test]
fn security_contexts_and_probes_are_overridable_over_the_restricted_defaults() {
    let docs = render(&[
        "podSecurityContext.fsGroup=65532",
        "securityContext.runAsUser=1000",
        "livenessProbe.periodSeconds=30",
        "readinessProbe.initialDelaySeconds=5",
    ]);
    let pod = &pod_spec(&docs)["securityContext"];
    assert_eq!(pod["fsGroup"], 65532);
    assert_eq!(pod["runAsNonRoot"], true);
    let c = container(&docs);
    assert_eq!(c["securityContext"]["runAsUser"], 1000);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["livenessProbe"]["periodSeconds"], 30);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["initialDelaySeconds"], 5);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

    // A probe on another path replaces the default's.
    let docs = render(&["readinessProbe.httpGet.path=/healthz"]);
    assert_eq!(
        container(&docs)["readinessProbe"]["httpGet"]["path"],
        "/healthz"
    );
}

#[test]
fn topology_spread_constraints_select_the_release_pods_unless_given_a_selector() {
    let docs = render_flags(&[
        "--set-json",
        r#"topologySpreadConstraints=[
            {"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"},
            {"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"DoNotSchedule",
             "labelSelector":{"matchLabels":{"tier":"control"}}}]"#,
    ]);
    let constraints = pod_spec(&docs)["topologySpreadConstraints"]
        .as_array()
        .unwrap();
    assert_eq!(constraints.len(), 2);
    let labels = &constraints[0]["labelSelector"]["matchLabels"];
    assert_eq!(labels["app.kubernetes.io/name"], "grpc-registrar");
    assert_eq!(labels["app.kubernetes.io/instance"], "reg");
    assert_eq!(constraints[0]["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(
        constraints[1]["labelSelector"]["matchLabels"],
        serde_json::json!({"tier": "control"})
    );
    assert!(pod_spec(&render(&[]))["topologySpreadConstraints"].is_null());
}

#[test]
fn an_image_digest_takes_precedence_over_the_tag() {
    let image = |sets: &[&str]| {
        container(&render(sets))["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let chart_yaml: Value = serde_saphyr::from_str(&read("Chart.yaml")).unwrap();
    let app_version = chart_yaml["appVersion"].as_str().unwrap();
    let repo = "ghcr.io/grpc-registrar/grpc-registrar";
    assert_eq!(image(&[]), format!("{repo}:{app_version}"));
    assert_eq!(image(&["image.tag=1.2.3"]), format!("{repo}:1.2.3"));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let set = format!("image.digest={digest}");
    assert_eq!(
        image(&["image.tag=1.2.3", &set]),
        format!("{repo}@{digest}")
    );
    let out = refused(&["image.digest=latest"]);
    assert!(out.contains("/image/digest"), "{out}");
}

#[test]
fn the_service_monitor_takes_its_namespace_interval_timeout_and_relabelings() {
    let docs = render_flags(&[
        "--set",
        "serviceMonitor.enabled=true,serviceMonitor.namespace=monitoring",
        "--set",
        "serviceMonitor.interval=15s,serviceMonitor.scrapeTimeout=10s",
        "--set-json",
        r#"serviceMonitor.relabelings=[{"sourceLabels":["__meta_kubernetes_pod_node_name"],"targetLabel":"node"}]"#,
        "--set-json",
        r#"serviceMonitor.metricRelabelings=[{"sourceLabels":["__name__"],"regex":"process_virtual.*","action":"drop"}]"#,
    ]);
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "monitoring");
    // From another namespace it still selects the release's Service.
    assert_eq!(
        strings(&monitor["spec"]["namespaceSelector"]["matchNames"]),
        ["registrar"]
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["interval"], "15s");
    assert_eq!(endpoint["scrapeTimeout"], "10s");
    assert_eq!(endpoint["honorLabels"], true);
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "node");
    assert_eq!(endpoint["metricRelabelings"][0]["action"], "drop");

    let docs = render(&["serviceMonitor.enabled=true"]);
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "registrar");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["interval"], "30s");
    for unset in ["scrapeTimeout", "relabelings", "metricRelabelings"] {
        assert!(endpoint[unset].is_null(), "{unset}");
    }
    refused(&["serviceMonitor.interval=often"]);
}

#[test]
fn the_crd_is_the_generated_file_kept_on_uninstall_and_can_be_left_out() {
    // Nothing in crds/, which Helm installs whatever the values say and never upgrades.
    assert!(!chart().join("crds").exists());
    let generated: Value = serde_saphyr::from_str(&read("files/grpcservice.yaml")).unwrap();
    let docs = render(&[]);
    let crd = one(&docs, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], generated["metadata"]["name"]);
    assert_eq!(
        numbers_as_floats(&crd["spec"]),
        numbers_as_floats(&generated["spec"]),
        "the rendered CRD differs from files/grpcservice.yaml"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        crd["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );

    let docs = render(&["crds.keep=false"]);
    let crd = one(&docs, "CustomResourceDefinition");
    assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());

    let docs = render(&["crds.install=false"]);
    assert!(kind(&docs, "CustomResourceDefinition").is_empty());
    one(&docs, "Deployment");
}

#[test]
fn the_prometheus_rule_alerts_on_the_failures_that_matter_and_is_configurable() {
    let docs = render_flags(&[
        "--set",
        "prometheusRule.enabled=true,prometheusRule.namespace=monitoring",
        "--set",
        "prometheusRule.labels.release=kube-prometheus,prometheusRule.alertLabels.team=platform",
        "--set-json",
        r#"prometheusRule.extraRules=[{"alert":"Custom","expr":"vector(1)"}]"#,
    ]);
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["namespace"], "monitoring");
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus");
    let rules = alert_rules(&docs);
    let alert = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    for (name, severity, wait) in [
        ("GrpcRegistrarNoLeader", "critical", Some("5m")),
        ("GrpcRegistrarBackendDisconnected", "critical", Some("2m")),
        ("GrpcRegistrarReconcileFailures", "warning", Some("15m")),
        ("GrpcRegistrarServiceNotRegistered", "critical", Some("10m")),
        ("GrpcRegistrarServiceHasNoReadyPods", "warning", Some("10m")),
        ("GrpcRegistrarLeaseLost", "warning", None),
        ("GrpcRegistrarSlowPropagation", "warning", Some("15m")),
    ] {
        let a = alert(name);
        assert_eq!(a["labels"]["severity"], severity, "{name}");
        assert_eq!(a["labels"]["team"], "platform", "{name}");
        assert_eq!(a["for"].as_str(), wait, "{name}");
        assert!(a["annotations"]["summary"].is_string(), "{name}");
        assert!(a["annotations"]["description"].is_string(), "{name}");
        // Scoped to this release's series.
        let expr = a["expr"].as_str().unwrap();
        assert!(
            expr.contains(r#"{job="reg-grpc-registrar-metrics"}"#),
            "{name}: {expr}"
        );
    }
    let no_leader = alert("GrpcRegistrarNoLeader")["expr"].as_str().unwrap();
    assert!(no_leader.contains("sum(grpc_registrar_leader") && no_leader.contains("absent("));
    let broken = alert("GrpcRegistrarServiceNotRegistered")["expr"]
        .as_str()
        .unwrap();
    assert!(broken.contains("grpc_registrar_ready_pods") && broken.contains("== 0"));
    let slow = alert("GrpcRegistrarSlowPropagation")["expr"]
        .as_str()
        .unwrap();
    assert!(slow.contains("histogram_quantile(0.99") && slow.trim_end().ends_with("> 1"));
    assert_eq!(rules.last().unwrap()["alert"], "Custom");

    // Another scrape job.
    let docs = render(&[
        "prometheusRule.enabled=true",
        r#"prometheusRule.selector=job="registrar""#,
    ]);
    for rule in alert_rules(&docs) {
        assert!(
            rule["expr"]
                .as_str()
                .unwrap()
                .contains(r#"{job="registrar"}"#)
        );
    }
}

#[test]
fn the_grafana_dashboard_is_valid_json_in_a_config_map_the_sidecar_loads() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "grpc-registrar");
    assert!(!dashboard["panels"].as_array().unwrap().is_empty());
    assert!(!dashboard_exprs().is_empty());

    let docs = render(&[
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.namespace=grafana",
        "grafanaDashboard.annotations.grafana_folder=Platform",
    ]);
    let map = one(&docs, "ConfigMap");
    assert_eq!(map["metadata"]["namespace"], "grafana");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "Platform");
    let shipped: Value = serde_json::from_str(
        map["data"]["grpc-registrar.json"]
            .as_str()
            .expect("no dashboard in the ConfigMap"),
    )
    .expect("the ConfigMap holds invalid JSON");
    assert_eq!(shipped, dashboard);

    let docs = render(&[
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.labels.dashboards=grpc",
    ]);
    let labels = &one(&docs, "ConfigMap")["metadata"]["labels"];
    assert_eq!(labels["dashboards"], "grpc");
}

#[test]
fn alerts_and_dashboard_use_only_metrics_the_binary_exports() {
    let exported = exported_metrics();
    assert!(exported.contains("grpc_registrar_leader"), "{exported:?}");
    let docs = render(&["prometheusRule.enabled=true"]);
    let rules = alert_rules(&docs);
    let rule_exprs = rules.iter().map(|r| r["expr"].as_str().unwrap().to_owned());
    let mut used = BTreeSet::new();
    for expr in rule_exprs.chain(dashboard_exprs()) {
        for name in metric_names(&expr) {
            assert!(
                exported.contains(family(&name)),
                "{name} (in `{expr}`) is not exported; the binary exports {exported:?}"
            );
            used.insert(family(&name).to_owned());
        }
    }
    // And the dashboard charts every one of them.
    let charted: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| family(&n).to_owned())
        .collect();
    let missing: Vec<_> = exported.difference(&charted).collect();
    assert!(
        missing.is_empty(),
        "metrics on no dashboard panel: {missing:?}"
    );
}

#[test]
fn every_value_is_in_the_readme_table_with_its_default() {
    let readme = read("README.md");
    let table = readme
        .split("\n## Values\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has no `## Values` section");
    let rows: Vec<(String, String)> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let key = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
            Some((key.to_owned(), cells.get(1)?.to_string()))
        })
        .collect();
    let (leaves, _) = value_leaves(&values(), &schema());
    for (path, default) in &leaves {
        let (_, documented) = rows
            .iter()
            .find(|(key, _)| key == path)
            .unwrap_or_else(|| panic!("README.md's values table has no row for `{path}`"));
        // Scalars and empty lists or maps exactly; larger defaults are described in words.
        let exact = match default {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => true,
        };
        if exact {
            assert_eq!(documented, &format!("`{default}`"), "default of `{path}`");
        } else {
            assert!(!documented.is_empty(), "default of `{path}`");
        }
    }
    for (key, _) in &rows {
        assert!(
            leaves.iter().any(|(path, _)| path == key),
            "README.md documents `{key}`, which values.yaml does not have"
        );
    }
}

/// The chart's NOTES.txt rendered for `--set` overrides. `helm template` renders NOTES but does
/// not print them, and the pinned helm's `install --dry-run=client` still needs a cluster, so a
/// copy of the chart gets a manifest that includes them.
fn notes(sets: &[&str]) -> String {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let copied = dir.path().join("grpc-registrar");
    copy(&chart(), &copied);
    std::fs::write(
        copied.join("templates/zz-notes.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  \
         notes: {{ include \"grpc-registrar/templates/NOTES.txt\" . | quote }}\n",
    )
    .unwrap();
    let mut flags = vec!["--show-only", "templates/zz-notes.yaml"];
    flags.extend(set_flags(sets));
    let (ok, out) = template_chart(&copied, &flags);
    assert!(ok, "{out}");
    parse_manifests(&out)[0]["data"]["notes"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_install_notes_say_how_to_check_health_and_warn_about_the_placeholder_etcd() {
    let placeholder = notes(&[]);
    assert!(
        placeholder.starts_with("###") && placeholder.contains("WARNING: etcd.endpoints"),
        "{placeholder}"
    );
    let set = notes(&["etcd.endpoints={https://etcd-0.etcd:2379,https://etcd-1.etcd:2379}"]);
    assert!(!set.contains("WARNING"), "{set}");
    assert!(set.contains("https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"));
    for needle in [
        "kubectl -n registrar rollout status deployment/reg-grpc-registrar",
        "kubectl get grpcsvc -A",
        "READY",
        "STATUS",
        "TARGET",
        "ENDPOINTS",
        "kubectl -n registrar port-forward deployment/reg-grpc-registrar 8080:metrics",
        "/readyz",
        "kubectl -n registrar logs -l app.kubernetes.io/name=grpc-registrar,app.kubernetes.io/instance=reg",
    ] {
        assert!(set.contains(needle), "NOTES lack {needle:?}:\n{set}");
    }
}
