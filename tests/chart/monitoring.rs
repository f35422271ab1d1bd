//! The optional PrometheusRule and Grafana dashboard, and the metrics they use.

#[allow(clippy::wildcard_imports)]
use super::*;

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
        ("GrpcRegistrarMultipleWriters", "critical", Some("2m")),
        ("GrpcRegistrarReconcileFailures", "warning", Some("15m")),
        ("GrpcRegistrarServiceNotRegistered", "critical", Some("10m")),
        (
            "GrpcRegistrarServiceHasNoReadyEndpoints",
            "warning",
            Some("10m"),
        ),
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
    assert!(broken.contains("grpc_registrar_ready_endpoints") && broken.contains("== 0"));
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
                .contains(r#"{job="registrar""#)
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
fn services_stuck_in_invalid_spec_conflict_or_with_no_endpoint_alert_after_stuck_for() {
    let docs = render(&["prometheusRule.enabled=true", "prometheusRule.stuckFor=20m"]);
    let rules = alert_rules(&docs);
    let alert = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
            .clone()
    };
    for (name, needle) in [
        (
            "GrpcRegistrarServiceInvalidSpec",
            r#"grpc_registrar_service_condition{job="reg-grpc-registrar-metrics",condition="InvalidSpec"}) == 1"#,
        ),
        (
            "GrpcRegistrarServiceConflict",
            r#"grpc_registrar_service_condition{job="reg-grpc-registrar-metrics",condition="Conflict"}) == 1"#,
        ),
        (
            "GrpcRegistrarServiceHasNoEndpoints",
            r#"grpc_registrar_selected_endpoints{job="reg-grpc-registrar-metrics"}) == 0"#,
        ),
    ] {
        let a = alert(name);
        let expr = a["expr"].as_str().unwrap();
        assert!(expr.contains(needle), "{name}: {expr}");
        assert!(expr.contains("max by (namespace, name)"), "{name}: {expr}");
        assert_eq!(a["for"], "20m", "{name}");
        assert_eq!(a["labels"]["severity"], "warning", "{name}");
        let description = a["annotations"]["description"].as_str().unwrap();
        assert!(
            description.contains("{{ $labels.namespace }}/{{ $labels.name }}")
                && description.contains("20m"),
            "{name}: {description}"
        );
    }
    refused(&["prometheusRule.enabled=true", "prometheusRule.stuckFor=15"]);
}
