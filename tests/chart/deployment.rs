//! Lint, rendering, the restricted Pod Security profile, RBAC, replicas, and the env vars the binary reads.

#[allow(clippy::wildcard_imports)]
use super::*;

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
    expect("endpointslices", &["get", "list", "watch"]);
    expect("grpcservices", &["get", "list", "watch", "patch"]);
    expect("grpcservices/status", &["patch", "update"]);
    expect("grpcservices/finalizers", &["patch", "update"]);
    expect("events", &["create", "patch"]);
    assert_eq!(rules.len(), 6, "nothing else: {rules:?}");
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
    let etcd = render(&[
        "etcd.tls.secretName=etcd-tls",
        "etcd.auth.secretName=etcd-auth",
        "registry.clusterName=east-1",
    ]);
    let consul = render(&[
        "backend=consul",
        "consul.datacenter=dc1",
        "consul.tls.secretName=consul-tls",
        "consul.tls.clientCert=true",
        "consul.token.secretName=consul-acl",
        "registry.clusterName=east-1",
    ]);
    for docs in [etcd, consul] {
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
    // The backends the schema allows are the binary's own (`--backend` is its only enum with
    // these values), which it takes in any case (`Consul` as spec.backend spells it).
    let mut backends: Vec<String> = Vec::new();
    for backend in strings(&schema()["properties"]["backend"]["enum"]) {
        let backend = backend.to_lowercase();
        if !backends.contains(&backend) {
            backends.push(backend);
        }
    }
    let possible = format!("[possible values: {}]", backends.join(", "));
    assert!(help.contains(&possible), "{possible} not in:\n{help}");
}
