//! The `GrpcService` custom resource: which pods serve, on which port, published where.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
pub use tonic_etcd_resolver::ValueFormat;

/// The finalizer that deletes a service's keys and ownership record before it goes away.
pub const FINALIZER: &str = "grpc-registrar.io/cleanup";

/// Placeholders a `keyTemplate` may use.
pub const TEMPLATE_PLACEHOLDERS: &[&str] = &[
    "target",
    "addr",
    "ip",
    "port",
    "pod",
    "namespace",
    "name",
    "node",
    "id",
];

/// Publishes the ready pods selected by `selector` as gRPC endpoints in etcd.
///
/// Each registrable pod becomes one leased key, `<target>/<ip>:<port>` by default, holding etcd's
/// gRPC naming JSON so that Go's `etcd:///` resolver and tonic-etcd-resolver both read it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "grpc-registrar.io",
    version = "v1alpha1",
    kind = "GrpcService",
    namespaced,
    shortname = "grpcsvc",
    status = "GrpcServiceStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"The Ready condition: True when the registry holds what the spec asks for, with at least one endpoint"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Why Ready is what it is: Synced, NoReadyEndpoints, NoPodsSelected, PortNotFound, Conflict, InvalidSpec or BackendUnavailable"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.target","description":"The registry prefix clients dial"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.registeredEndpoints","description":"Endpoints registered"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selectedPods","priority":1,"description":"Pods the selector matches"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1,"description":"The Ready condition's message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[cfg_attr(test, x_kube(cel))]
#[serde(rename_all = "camelCase")]
pub struct GrpcServiceSpec {
    /// Selects the pods that serve this service, like a Deployment's selector. Must not be empty.
    #[x_kube(
        validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)")
            .message("selector must not be empty: set matchLabels or matchExpressions"),
        validation = Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])")
            .message("selector operator must be one of In, NotIn, Exists, DoesNotExist"),
        validation = Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, !(e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist']) || (e.operator == 'In' || e.operator == 'NotIn') == (has(e.values) && size(e.values) > 0))")
            .message("selector operators In and NotIn need values; Exists and DoesNotExist take none"),
    )]
    pub selector: LabelSelector,

    /// The container port to publish: a number (1-65535) or a container port name, resolved per
    /// pod like a Service's targetPort.
    #[x_kube(
        validation = Rule::new("string(self) == self ? (size(self) <= 15 && self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$') && self.matches('[a-z]') && !self.contains('--')) : (int(string(self)) >= 1 && int(string(self)) <= 65535)")
            .message("port must be a number from 1 to 65535 or a container port name (at most 15 lowercase letters, digits and '-')")
    )]
    pub port: IntOrString,

    /// The registry prefix clients dial. Defaults to `<key-prefix>/<namespace>/<name>`.
    ///
    /// A target outside the namespace's own prefix is allowed only in namespaces the controller
    /// permits (`--custom-target-namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("self.matches('^/?[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$')")
            .message("target must be '/'-separated segments of letters, digits, '.', '_' and '-', with no empty segment and no trailing slash")
    )]
    pub target: Option<String>,

    /// How values are encoded: `EtcdNaming` JSON (default, read by Go's etcd resolver), a bare
    /// `Address` (seed-era Go clients, go-zero), or `Kratos` (go-kratos' etcd registry; pair it
    /// with target `/microservices/<name>`, and the key template defaults to `{target}/{id}`).
    #[serde(default)]
    pub format: ValueFormat,

    /// Reproduces an existing key layout. Must start with `{target}/`; may use `{addr}`, `{ip}`,
    /// `{port}`, `{pod}`, `{namespace}`, `{name}`, `{node}` and `{id}` (the pod name). Defaults to
    /// `{target}/{addr}` (`{target}/{id}` for `Kratos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 10, max = 253))]
    #[x_kube(
        validation = Rule::new("self.matches('^[{]target[}]/([^{}]|[{](addr|ip|port|pod|namespace|name|node|id)[}])+$')")
            .message("keyTemplate must start with '{target}/' and use only the placeholders {addr}, {ip}, {port}, {pod}, {namespace}, {name}, {node} and {id}")
    )]
    pub key_template: Option<String>,

    /// Static metadata merged into every endpoint's metadata (`EtcdNaming` and `Kratos`;
    /// `version` is also kratos' instance version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(
        validation = Rule::new("self.all(k, !(k in ['pod', 'namespace', 'node', 'zone']))")
            .message("metadata keys pod, namespace, node and zone are reserved for the controller")
    )]
    pub metadata: BTreeMap<String, String>,

    /// Pod labels copied into each endpoint's metadata (`EtcdNaming` and `Kratos`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub metadata_from_labels: Vec<String>,

    /// Registers pods that are Running but not Ready, as `publishNotReadyAddresses` does on a
    /// Service.
    #[serde(default)]
    pub publish_not_ready_addresses: bool,

    /// The etcd lease TTL for this service's keys, overriding the controller's `--lease-ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 86400))]
    pub ttl_seconds: Option<i64>,
}

/// What the controller last did for a `GrpcService`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcServiceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The registry prefix the endpoints are published under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Selected pods that are Ready.
    #[serde(default)]
    pub ready_pods: i32,
    /// Pods matching the selector.
    #[serde(default)]
    pub selected_pods: i32,
    /// Keys in etcd for this service.
    #[serde(default)]
    pub registered_endpoints: i32,
    /// The etcd revision of the last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_revision: Option<i64>,
    /// The etcd lease holding the keys, in hex as etcdctl prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// When the registry last changed for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// `Ready` (True only when the registry holds what the spec asks for and at least one
    /// endpoint is registered), `Conflict`, `InvalidSpec` and `BackendUnavailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> serde_json::Value {
        let mut base = json!({
            "selector": {"matchLabels": {"app": "greeter"}},
            "port": "grpc",
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    }

    fn rejects(extra: serde_json::Value, needle: &str) {
        let err = GrpcServiceSpec::validate_cel(&spec(extra.clone()), None)
            .expect_err(&format!("{extra} should be rejected"))
            .to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }

    fn accepts(extra: serde_json::Value) {
        GrpcServiceSpec::validate_cel(&spec(extra.clone()), None)
            .unwrap_or_else(|e| panic!("{extra} should be accepted: {e}"));
    }

    #[test]
    fn crd_has_short_name_status_and_printer_columns() {
        let crd = serde_json::to_value(GrpcService::crd()).unwrap();
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["grpcsvc"]));
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], json!({}));
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Status",
                "Target",
                "Endpoints",
                "Selected",
                "Message",
                "Age"
            ]
        );
    }

    #[test]
    fn valid_specs_pass_the_cel_rules() {
        accepts(json!({}));
        accepts(json!({"port": 50051}));
        accepts(json!({"target": "/etcdv3_resolver/greeter"}));
        accepts(json!({"keyTemplate": "{target}/{ip}-{port}"}));
        accepts(json!({"metadata": {"version": "v2"}}));
        accepts(json!({"selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}));
    }

    #[test]
    fn empty_selector_is_rejected() {
        rejects(json!({"selector": {}}), "selector must not be empty");
    }

    #[test]
    fn unknown_selector_operator_is_rejected() {
        rejects(
            json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Maybe", "values": ["x"]}]}}),
            "selector operator must be one of",
        );
    }

    #[test]
    fn an_unknown_operator_gets_one_message_not_a_second_about_values() {
        let err = GrpcServiceSpec::validate_cel(
            &spec(json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Bogus", "values": ["x"]}]}})),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("selector operator must be one of"), "{err}");
        assert!(!err.contains("need values"), "{err}");
    }

    #[test]
    fn in_operator_without_values_is_rejected() {
        rejects(
            json!({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "need values",
        );
    }

    #[test]
    fn out_of_range_and_malformed_ports_are_rejected() {
        for port in [
            json!(0),
            json!(70000),
            json!("GRPC"),
            json!("-grpc"),
            json!("70000"),
            json!("123"),
            json!("grpc--web"),
            json!("a-very-long-port-name"),
        ] {
            rejects(json!({ "port": port }), "port must be a number");
        }
    }

    #[test]
    fn target_with_illegal_characters_is_rejected() {
        for target in [
            "services/a b",
            "services//x",
            "services/x/",
            "a/*",
            "ns/ünï",
        ] {
            rejects(json!({ "target": target }), "target must be");
        }
    }

    #[test]
    fn key_template_must_start_with_target_and_use_known_placeholders() {
        rejects(
            json!({"keyTemplate": "/other/{addr}"}),
            "keyTemplate must start",
        );
        rejects(
            json!({"keyTemplate": "{target}/{hostname}"}),
            "keyTemplate must start",
        );
    }

    #[test]
    fn reserved_metadata_keys_are_rejected() {
        rejects(json!({"metadata": {"pod": "x"}}), "reserved");
    }
}
