//! The values schema, the render-time checks, and every override reaching the manifests.

#[allow(clippy::wildcard_imports)]
use super::*;

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
    // The binary checks the election against LEASE_TTL (the etcd lease's, or Consul's node
    // check's) with either backend.
    for ((ttl, lease, renew, retry), backend) in cases
        .into_iter()
        .flat_map(|case| [(case, "etcd"), (case, "consul")])
    {
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
            format!("backend={backend}"),
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
    // The same rule with Consul, whose node check takes its TTL from etcd.leaseTTL.
    let out = refused(&["backend=consul", "etcd.leaseTTL=10"]);
    assert!(
        out.contains("leaderElection.leaseDuration (15s) must be shorter than etcd.leaseTTL (10s)")
            && out.contains("Consul node check"),
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
fn a_cluster_name_reaches_the_controller_only_when_set_and_must_be_a_dns_label() {
    assert_eq!(env_value(&render(&[]), "CLUSTER_NAME"), None);
    let docs = render(&["registry.clusterName=east-1"]);
    assert_eq!(env_value(&docs, "CLUSTER_NAME").as_deref(), Some("east-1"));
    let out = refused(&["registry.clusterName=East_1"]);
    assert!(out.contains("/registry/clusterName"), "{out}");
}
