//! The `GrpcService` custom resource: which pods serve, on which port, published where.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
pub use tonic_etcd_resolver::ValueFormat;

/// The finalizer that deletes a service's keys and ownership record before it goes away
/// (the etcd backend's; see [`Backend::finalizer`]).
pub const FINALIZER: &str = "grpc-registrar.io/cleanup";

/// The condition types of a GrpcService's status.
pub mod condition {
    /// The registry holds what the spec asks for, and at least one endpoint is registered.
    pub const READY: &str = "Ready";
    /// Another GrpcService owns the target.
    pub const CONFLICT: &str = "Conflict";
    /// The spec cannot be applied.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The registry backend could not be reached or refused the write.
    pub const BACKEND_UNAVAILABLE: &str = "BackendUnavailable";
}

/// The condition types the controller maintains, in status order.
pub const CONDITIONS: [&str; 4] = [
    condition::READY,
    condition::CONFLICT,
    condition::INVALID_SPEC,
    condition::BACKEND_UNAVAILABLE,
];

/// The pod annotation that sets one pod's weight, overriding `spec.weight`.
pub const WEIGHT_ANNOTATION: &str = "grpc-registrar.io/weight";

/// The registry a GrpcService is published into. Each controller serves one backend
/// (`--backend`) and acts only on the GrpcServices that name it, so one controller per backend
/// may run side by side.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Backend {
    /// etcd: keys under a target prefix on a shared lease (the default).
    #[default]
    Etcd,
    /// Consul's catalog: one Consul service with an instance per endpoint.
    Consul,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Self; 2] = [Self::Etcd, Self::Consul];

    /// The finalizer of this backend's controller: each releases only what it published, so a
    /// service moved to another backend is cleaned up by the one it leaves.
    #[must_use]
    pub const fn finalizer(self) -> &'static str {
        match self {
            Self::Etcd => FINALIZER,
            Self::Consul => "grpc-registrar.io/consul-cleanup",
        }
    }

    /// The name used in flags, logs and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Consul => "consul",
        }
    }
}

/// How a GrpcService appears in Consul's catalog.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConsulService {
    /// The Consul service name (what clients ask the catalog, and `<name>.service.consul` in
    /// DNS). Defaults to the GrpcService's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')")
            .message("consul.service must be lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS label; Consul matches names case-insensitively)")
    )]
    pub service: Option<String>,
    /// Tags on every instance, e.g. `grpc` or `v2`, for clients that filter by tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("self.all(t, size(t) >= 1 && size(t) <= 255)")
            .message("consul.tags must each be 1 to 255 characters")
    )]
    pub tags: Vec<String>,
}

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

/// Publishes a workload's ready endpoints as gRPC endpoints in etcd: the pods `selector` matches,
/// or the endpoints of the Service `serviceRef` names (its EndpointSlices).
///
/// Each registrable endpoint becomes one leased key, `<target>/<ip>:<port>` by default, holding
/// etcd's gRPC naming JSON so that Go's `etcd:///` resolver and tonic-etcd-resolver both read it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "grpc-registrar.io",
    version = "v1alpha1",
    kind = "GrpcService",
    namespaced,
    shortname = "grpcsvc",
    status = "GrpcServiceStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"The Ready condition: True when the registry holds what the spec asks for, with at least one endpoint"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Why Ready is what it is: Synced, EndpointCollision, NoReadyEndpoints, NoPodsSelected, NoEndpoints, PortNotFound, Conflict, InvalidSpec or BackendUnavailable"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".spec.backend","description":"The registry it publishes into (Etcd or Consul): only a controller serving that backend acts on it, so a row with no Ready and Status means none runs"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.target","description":"The registry prefix clients dial"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.registeredEndpoints","description":"Endpoints registered"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selectedEndpoints","priority":1,"description":"Endpoints the source yields: pods the selector matches, or the Service's endpoints"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1,"description":"The Ready condition's message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[cfg_attr(test, x_kube(cel))]
#[x_kube(
    validation = Rule::new("has(self.selector) != has(self.serviceRef)")
        .message("set exactly one source: selector (pods) or serviceRef (a Service's EndpointSlices)"),
    validation = Rule::new("!has(self.selector) || has(self.port)")
        .message("port is required with selector"),
    validation = Rule::new("!has(self.serviceRef) || !has(self.port)")
        .message("port does not apply with serviceRef: set serviceRef.port"),
    validation = Rule::new("!has(self.serviceRef) || !has(self.metadataFromLabels) || size(self.metadataFromLabels) == 0")
        .message("metadataFromLabels copies pod labels, which EndpointSlices do not carry: use it with selector"),
    validation = Rule::new("!has(self.consul) || (has(self.backend) && self.backend == 'Consul')")
        .message("consul applies only with backend: Consul"),
    validation = Rule::new("!has(self.backend) || self.backend != 'Consul' || (!has(self.target) && !has(self.keyTemplate) && !has(self.ttlSeconds))")
        .message("target, keyTemplate and ttlSeconds are etcd settings: with backend Consul, name the service in consul.service"),
)]
#[serde(rename_all = "camelCase")]
pub struct GrpcServiceSpec {
    /// Selects the pods that serve this service, like a Deployment's selector. Must not be empty.
    /// Exactly one of `selector` and `serviceRef` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)")
            .message("selector must not be empty: set matchLabels or matchExpressions"),
        validation = Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])")
            .message("selector operator must be one of In, NotIn, Exists, DoesNotExist"),
        validation = Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, !(e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist']) || (e.operator == 'In' || e.operator == 'NotIn') == (has(e.values) && size(e.values) > 0))")
            .message("selector operators In and NotIn need values; Exists and DoesNotExist take none"),
    )]
    pub selector: Option<LabelSelector>,

    /// The container port to publish with `selector`: a number (1-65535) or a container port
    /// name, resolved per pod like a Service's targetPort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(PORT_RULE).message(PORT_MESSAGE)
    )]
    pub port: Option<IntOrString>,

    /// The registry to publish into: `Etcd` (default) or `Consul`. Only the controller serving
    /// that backend acts on this GrpcService.
    #[serde(default)]
    pub backend: Backend,

    /// Consul's catalog naming and tags (with `backend: Consul`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulService>,

    /// Publishes the endpoints of a Service in this namespace, merged over all its
    /// EndpointSlices: those the endpointslice controller computes from the Service's
    /// selector, or those managed by hand for a Service without one (VMs, endpoints outside the
    /// cluster). Exactly one of `selector` and `serviceRef` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ref: Option<ServiceRef>,

    /// The registry prefix clients dial. Defaults to `<key-prefix>/<namespace>/<name>`.
    ///
    /// A target outside the namespace's own prefix is allowed only in namespaces the controller
    /// permits (`--custom-target-namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("self.matches('^/?[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$')")
            .message("target must be '/'-separated segments of letters, digits, '.', '_' and '-', with no empty segment and no trailing slash"),
        validation = Rule::new("!self.matches('(^|/)[.][.]?(/|$)')")
            .message("target must not contain '.' or '..' segments"),
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
    ///
    /// At most 32 entries, keys of at most 63 characters and values of at most 1024 (about
    /// 35 KB in all), so that a value always fits in an etcd request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 1024}))]
    #[x_kube(
        validation = Rule::new("self.all(k, !(k in ['pod', 'namespace', 'node', 'zone', 'cluster', 'weight']))")
            .message("metadata keys pod, namespace, node, zone, cluster and weight are reserved for the controller (set spec.weight for a weight)"),
        validation = Rule::new("self.all(k, size(k) >= 1 && size(k) <= 63)")
            .message("metadata keys must be 1 to 63 characters"),
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

    /// A weight for weighted clients, written as `metadata.weight` (kratos' convention, read by
    /// tonic-etcd-resolver's weighted policy). A pod's `grpc-registrar.io/weight` annotation
    /// (an integer from 1 to 10000) overrides it for that pod. Unset: no weight is written, and
    /// clients use their default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub weight: Option<u32>,

    /// The etcd lease TTL for this service's keys, overriding the controller's `--lease-ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 86400))]
    pub ttl_seconds: Option<i64>,
}

/// A Service whose EndpointSlices are the source of endpoints.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// The Service's name, in the GrpcService's namespace.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
            .message("serviceRef.name must be a Service name: lowercase letters, digits and '-', starting with a letter")
    )]
    pub name: String,
    /// The port to publish: the name of one of the Service's ports (as its EndpointSlices name
    /// them), or a number, matched against the endpoints' port numbers (the target port, which
    /// is what clients dial).
    #[x_kube(
        validation = Rule::new(PORT_RULE).message(PORT_MESSAGE)
    )]
    pub port: IntOrString,
}

/// A port: 1-65535, or a name (at most 15 lowercase letters, digits and '-', with a letter).
const PORT_RULE: &str = "string(self) == self ? (size(self) <= 15 && self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$') && self.matches('[a-z]') && !self.contains('--')) : (int(string(self)) >= 1 && int(string(self)) <= 65535)";
const PORT_MESSAGE: &str = "port must be a number from 1 to 65535 or a port name (at most 15 lowercase letters, digits and '-')";

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
    /// Endpoints from the source whose readiness signal is on (selected pods that are Ready,
    /// or the Service's endpoints that are ready).
    #[serde(default)]
    pub ready_endpoints: i32,
    /// Endpoints the source yields: pods the selector matches, or the endpoints listed in the
    /// Service's EndpointSlices.
    #[serde(default)]
    pub selected_endpoints: i32,
    /// Entries in the registry for this service: etcd keys, or Consul instances.
    #[serde(default)]
    pub registered_endpoints: i32,
    /// The registry's revision of the last change (etcd's revision, Consul's index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_revision: Option<i64>,
    /// Deprecated: the same value as `registryRevision`, under its name from before Consul.
    /// Written for one more release for readers of the old name, then removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_revision: Option<i64>,
    /// The etcd lease holding the keys, in hex as etcdctl prints it (none with Consul).
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
                "Backend",
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
        rejects(json!({"metadata": {"weight": "5"}}), "set spec.weight");
    }

    #[test]
    fn consul_settings_need_backend_consul_and_etcd_settings_are_refused_there() {
        rejects(
            json!({"consul": {"service": "greeter"}}),
            "consul applies only with backend: Consul",
        );
        rejects(
            json!({"backend": "Consul", "target": "a/b"}),
            "are etcd settings",
        );
        rejects(
            json!({"backend": "Consul", "ttlSeconds": 30}),
            "are etcd settings",
        );
        rejects(
            json!({"backend": "Consul", "consul": {"service": "-bad"}}),
            "consul.service must be",
        );
        rejects(
            json!({"backend": "Consul", "consul": {"service": "Greeter"}}),
            "consul.service must be lowercase",
        );
        rejects(
            json!({"backend": "Consul", "consul": {"tags": [""]}}),
            "consul.tags must each",
        );
        accepts(
            json!({"backend": "Consul", "consul": {"service": "greeter-v2", "tags": ["grpc"]}}),
        );
        accepts(json!({"backend": "Consul"}));
    }

    fn service_ref(extra: serde_json::Value) -> Result<(), String> {
        let mut base = json!({"serviceRef": {"name": "greeter", "port": "grpc"}});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        GrpcServiceSpec::validate_cel(&base, None).map_err(|e| e.to_string())
    }

    #[test]
    fn a_service_ref_alone_is_a_valid_source() {
        service_ref(json!({})).unwrap();
        service_ref(json!({"serviceRef": {"name": "greeter", "port": 50051}})).unwrap();
        service_ref(json!({"publishNotReadyAddresses": true, "format": "Kratos"})).unwrap();
    }

    #[test]
    fn exactly_one_source_is_required_with_the_port_where_it_belongs() {
        let both = service_ref(json!({"selector": {"matchLabels": {"app": "g"}}, "port": "grpc"}));
        assert!(both.unwrap_err().contains("set exactly one source"));
        let neither = GrpcServiceSpec::validate_cel(&json!({"port": "grpc"}), None)
            .unwrap_err()
            .to_string();
        assert!(neither.contains("set exactly one source"), "{neither}");
        rejects_whole(
            json!({"selector": {"matchLabels": {"app": "g"}}}),
            "port is required with selector",
        );
        let port_twice = service_ref(json!({"port": 50051})).unwrap_err();
        assert!(port_twice.contains("set serviceRef.port"), "{port_twice}");
    }

    #[test]
    fn metadata_from_labels_needs_pods() {
        let err = service_ref(json!({"metadataFromLabels": ["version"]})).unwrap_err();
        assert!(
            err.contains("metadataFromLabels copies pod labels"),
            "{err}"
        );
        service_ref(json!({"metadataFromLabels": []})).unwrap();
    }

    #[test]
    fn a_service_ref_needs_a_service_name_and_a_valid_port() {
        for (name, port) in [
            (json!("Greeter"), json!("grpc")),
            (json!("greeter.svc"), json!("grpc")),
            (json!("greeter"), json!(0)),
            (json!("greeter"), json!("GRPC")),
        ] {
            let err = service_ref(json!({"serviceRef": {"name": name, "port": port}}))
                .expect_err(&format!("{name} {port} should be rejected"));
            assert!(
                err.contains("serviceRef.name must be") || err.contains("port must be"),
                "{err}"
            );
        }
    }

    fn rejects_whole(value: serde_json::Value, needle: &str) {
        let err = GrpcServiceSpec::validate_cel(&value, None)
            .expect_err(&format!("{value} should be rejected"))
            .to_string();
        assert!(err.contains(needle), "{value}: {err}");
    }
}
