//! The Helm chart, rendered by the pinned helm: lint, the values schema and render-time checks,
//! least-privilege RBAC, the Pod Security "restricted" profile, that every setting it passes is
//! one the binary reads, the CRD, the monitoring objects, the install notes and the README.
//! (`helm install` into a real API server, run under the chart's ServiceAccount, is in the e2e
//! suite.)
//!
//! - `deployment`: lint, rendering, Pod Security, RBAC, replicas and the binary's env vars;
//! - `consul`: the Consul backend's env vars, Secret mounts and values;
//! - `values`: the values schema, render-time checks and every override;
//! - `common`: the values most installs touch (backend and endpoint spellings, common labels and
//!   annotations, the NetworkPolicy, probes, Secret key names, sizing);
//! - `monitoring`: the PrometheusRule, the Grafana dashboard and the metrics they use;
//! - `docs`: the chart README and the install notes.

mod common;
mod consul;
mod deployment;
mod docs;
mod monitoring;
mod values;

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
    metrics.observe_conditions("ns", "svc", &[]);
    metrics.observe_request("etcd", "range", Instant::now());
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
