//! The values most installs touch: the spellings of `backend` and `etcd.endpoints`, common
//! labels and annotations, the NetworkPolicy, probes, history, Secret key names and sizing.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Every object the chart renders with the optional ones turned on.
fn everything(extra: &[&str]) -> Vec<Value> {
    let mut sets = vec![
        "serviceMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "grafanaDashboard.enabled=true",
        "networkPolicy.enabled=true",
    ];
    sets.extend(extra);
    render(&sets)
}

#[test]
fn etcd_endpoints_take_a_list_or_a_comma_separated_string() {
    let one = render(&["etcd.endpoints=http://etcd.registry:2379"]);
    assert_eq!(
        env_value(&one, "ETCD_ENDPOINTS").as_deref(),
        Some("http://etcd.registry:2379")
    );
    let several = render(&[r"etcd.endpoints=https://a:2379\, https://b:2379"]);
    assert_eq!(
        env_value(&several, "ETCD_ENDPOINTS").as_deref(),
        Some("https://a:2379,https://b:2379")
    );
    let list = render(&["etcd.endpoints={https://a:2379,https://b:2379}"]);
    assert_eq!(
        env_value(&list, "ETCD_ENDPOINTS").as_deref(),
        Some("https://a:2379,https://b:2379")
    );
    for bad in [
        "etcd.endpoints=",
        "etcd.endpoints=http://a:2379 http://b:2379",
    ] {
        let out = refused(&[bad]);
        assert!(out.contains("/etcd/endpoints"), "{bad}: {out}");
    }
}

#[test]
fn the_backend_is_accepted_as_the_crd_spells_it() {
    let consul = render(&["backend=Consul", "consul.address=http://consul:8500"]);
    assert_eq!(env_value(&consul, "BACKEND").as_deref(), Some("consul"));
    assert_eq!(
        env_value(&consul, "CONSUL_HTTP_ADDR").as_deref(),
        Some("http://consul:8500")
    );
    assert_eq!(env_value(&consul, "ETCD_ENDPOINTS"), None);
    let etcd = render(&["backend=Etcd"]);
    assert_eq!(env_value(&etcd, "BACKEND").as_deref(), Some("etcd"));
    assert!(env_value(&etcd, "ETCD_ENDPOINTS").is_some());
}

#[test]
fn common_labels_and_annotations_reach_every_object_and_the_pods() {
    let docs = everything(&[
        "commonLabels.team=platform",
        "commonAnnotations.owner=platform@example.com",
        "serviceAccount.annotations.role=registrar",
        "service.annotations.scrape=yes",
        "podAnnotations.pod=yes",
        "podLabels.tier=control",
    ]);
    assert!(docs.len() >= 12, "{} objects", docs.len());
    for doc in &docs {
        let meta = &doc["metadata"];
        let what = format!("{} {}", doc["kind"], meta["name"]);
        assert_eq!(meta["labels"]["team"], "platform", "{what}");
        assert_eq!(
            meta["annotations"]["owner"], "platform@example.com",
            "{what}"
        );
    }
    // An object's own annotations stay beside them.
    assert_eq!(
        one(&docs, "ServiceAccount")["metadata"]["annotations"]["role"],
        "registrar"
    );
    assert_eq!(
        one(&docs, "Service")["metadata"]["annotations"]["scrape"],
        "yes"
    );
    let crd = one(&docs, "CustomResourceDefinition");
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let pod = &one(&docs, "Deployment")["spec"]["template"]["metadata"];
    assert_eq!(pod["labels"]["team"], "platform");
    assert_eq!(pod["labels"]["tier"], "control");
    assert_eq!(pod["annotations"]["owner"], "platform@example.com");
    assert_eq!(pod["annotations"]["pod"], "yes");
    // The selector stays the release's own.
    let selector = &one(&docs, "Deployment")["spec"]["selector"]["matchLabels"];
    assert!(selector["team"].is_null(), "{selector}");

    // None set: no empty annotations anywhere.
    for doc in everything(&[]) {
        assert!(
            doc["metadata"]["annotations"].is_null()
                || doc["metadata"]["annotations"]
                    .as_object()
                    .is_some_and(|a| !a.is_empty()),
            "{}",
            doc["metadata"]
        );
    }
}

#[test]
fn the_network_policy_is_off_by_default_and_admits_only_the_metrics_port() {
    assert!(kind(&render(&[]), "NetworkPolicy").is_empty());
    let docs = render(&["networkPolicy.enabled=true"]);
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(strings(&policy["spec"]["policyTypes"]), ["Ingress"]);
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0]["ports"][0]["port"], "metrics");
    assert!(ingress[0]["from"].is_null(), "any source by default");

    let docs = render_flags(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
        "--set-json",
        r#"networkPolicy.egress=[{"ports":[{"port":2379},{"port":53,"protocol":"UDP"}]}]"#,
    ]);
    let spec = &one(&docs, "NetworkPolicy")["spec"];
    assert_eq!(strings(&spec["policyTypes"]), ["Ingress", "Egress"]);
    assert_eq!(
        spec["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(spec["egress"][0]["ports"][0]["port"], 2379);
}

#[test]
fn revision_history_and_the_startup_probe_are_set_and_configurable() {
    let docs = render(&[]);
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["revisionHistoryLimit"], 10);
    let probe = &container(&docs)["startupProbe"];
    assert_eq!(probe["httpGet"]["path"], "/healthz");
    assert_eq!(probe["httpGet"]["port"], "metrics");
    let docs = render(&["revisionHistoryLimit=3", "startupProbe.failureThreshold=90"]);
    assert_eq!(one(&docs, "Deployment")["spec"]["revisionHistoryLimit"], 3);
    assert_eq!(container(&docs)["startupProbe"]["failureThreshold"], 90);
    let docs = render(&["startupProbe=null"]);
    assert!(container(&docs)["startupProbe"].is_null());
    refused(&["revisionHistoryLimit=-1"]);
}

#[test]
fn the_etcd_auth_secret_key_names_are_configurable() {
    let docs = render(&[
        "etcd.auth.secretName=etcd-auth",
        "etcd.auth.usernameKey=user",
        "etcd.auth.passwordKey=etcd-password",
    ]);
    let username = container(&docs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ETCD_USERNAME")
        .expect("no ETCD_USERNAME")
        .clone();
    assert_eq!(username["valueFrom"]["secretKeyRef"]["name"], "etcd-auth");
    assert_eq!(username["valueFrom"]["secretKeyRef"]["key"], "user");
    let volume = pod_spec(&docs)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "etcd-auth")
        .expect("no etcd-auth volume")
        .clone();
    assert_eq!(volume["secret"]["items"][0]["key"], "etcd-password");
    assert_eq!(volume["secret"]["items"][0]["path"], "password");
    assert_eq!(
        env_value(&docs, "ETCD_PASSWORD_FILE").as_deref(),
        Some("/etc/grpc-registrar/etcd-auth/password")
    );
    // The defaults are the keys `kubectl create secret --from-literal=username=…` makes.
    let docs = render(&["etcd.auth.secretName=etcd-auth"]);
    let text = serde_json::to_string(pod_spec(&docs)).unwrap();
    assert!(text.contains(r#""key":"username""#) && text.contains(r#""key":"password""#));
    refused(&["etcd.auth.usernameKey=a/b"]);
}

/// Mebibytes of a Kubernetes memory quantity (`512Mi`, `1536Mi`, `1Gi`).
fn mebibytes(quantity: &str) -> f64 {
    match (quantity.strip_suffix("Mi"), quantity.strip_suffix("Gi")) {
        (Some(n), _) => n.parse().unwrap(),
        (_, Some(n)) => n.parse::<f64>().unwrap() * 1024.0,
        _ => panic!("unexpected quantity {quantity}"),
    }
}

#[test]
fn the_memory_limits_of_the_sizing_table_and_the_default_leave_room_over_the_peak() {
    let readme = read("README.md");
    // | Watched | Peak memory | CPU, cold start | limits.memory | requests.memory |
    let rows: Vec<(String, f64, f64)> = readme
        .split("\n## Sizing\n")
        .nth(1)
        .expect("README.md has no `## Sizing` section")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // "93-121 MiB": the higher figure.
            let peak = cells.get(2)?.strip_suffix(" MiB")?.rsplit('-').next()?;
            let limit = cells.get(4)?.split('`').nth(1)?;
            Some((cells[1].to_owned(), peak.parse().ok()?, mebibytes(limit)))
        })
        .collect();
    assert!(rows.len() >= 4, "{rows:?}");
    for (watched, peak, limit) in &rows {
        assert!(
            *limit >= 1.5 * peak,
            "{watched}: limit {limit} MiB, peak {peak} MiB"
        );
    }
    let (_, peak_30k, _) = rows
        .iter()
        .find(|(watched, ..)| watched == "30,000 pods")
        .expect("no 30,000 pods row");
    let docs = render(&[]);
    let limit = mebibytes(
        container(&docs)["resources"]["limits"]["memory"]
            .as_str()
            .unwrap(),
    );
    assert!(
        limit >= 1.5 * peak_30k,
        "default limit {limit} MiB, 30k peak {peak_30k} MiB"
    );
}
