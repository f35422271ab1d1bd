//! go-kratos' etcd registry format: a `ServiceInstance` JSON per key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Codec, Endpoint, EndpointParts, FormatError, ValueFormat, go_html_escape, utf8, validate_addr,
};

/// `{"id":..,"name":..,"version":..,"metadata":{..},"endpoints":["grpc://ip:port"]}`, as
/// `github.com/go-kratos/kratos/contrib/registry/etcd` writes and reads it.
///
/// Rendering takes `id` and `name` from the endpoint (the address stands in for a missing id)
/// and `version` from its `version` metadata; metadata values that are not strings are written
/// as their JSON text, since kratos' metadata is a map of strings. Parsing picks the first
/// `grpc://` endpoint, the one kratos' gRPC resolver dials over plaintext.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kratos;

/// kratos' `registry.ServiceInstance`, fields in its declaration order.
#[derive(Serialize, Deserialize)]
struct ServiceInstance {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    endpoints: Vec<String>,
}

/// [`ServiceInstance`] as written from [`EndpointParts`], borrowed.
#[derive(Serialize)]
struct InstanceOut<'a> {
    id: &'a str,
    name: &'a str,
    version: &'a str,
    metadata: Option<&'a BTreeMap<String, String>>,
    endpoints: [String; 1],
}

/// The scheme kratos' gRPC transport registers (`grpcs` with TLS).
const GRPC_SCHEME: &str = "grpc://";

/// Whether a JSON object reads as a kratos instance: it has an `endpoints` member.
pub(super) fn looks_like(text: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        endpoints: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(text).is_ok_and(|p| p.endpoints.is_some())
}

impl Codec for Kratos {
    fn format(&self) -> ValueFormat {
        ValueFormat::Kratos
    }

    fn render(&self, endpoint: &Endpoint) -> Vec<u8> {
        let metadata = endpoint
            .metadata
            .as_ref()
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        (k.clone(), v)
                    })
                    .collect::<BTreeMap<_, _>>()
            });
        let instance = ServiceInstance {
            id: endpoint.id.clone().unwrap_or_else(|| endpoint.addr.clone()),
            name: endpoint.service.clone().unwrap_or_default(),
            version: endpoint
                .metadata_str("version")
                .unwrap_or_default()
                .to_owned(),
            metadata,
            endpoints: vec![format!("{GRPC_SCHEME}{}", endpoint.addr)],
        };
        go_html_escape(serde_json::to_string(&instance).unwrap_or_default()).into_bytes()
    }

    fn render_parts(&self, parts: &EndpointParts<'_>) -> Vec<u8> {
        let instance = InstanceOut {
            id: parts.id,
            name: parts.service,
            version: parts.metadata.get("version").map_or("", String::as_str),
            metadata: Some(parts.metadata),
            endpoints: [format!("{GRPC_SCHEME}{}", parts.addr)],
        };
        go_html_escape(serde_json::to_string(&instance).unwrap_or_default()).into_bytes()
    }

    fn parse(&self, value: &[u8]) -> Result<Endpoint, FormatError> {
        let instance: ServiceInstance =
            serde_json::from_str(utf8(value)?.trim()).map_err(|e| FormatError::Json {
                format: ValueFormat::Kratos,
                message: e.to_string(),
            })?;
        let addr = instance
            .endpoints
            .iter()
            .find_map(|e| e.strip_prefix(GRPC_SCHEME))
            // `grpc://host:port?isSecure=false` in kratos before v2.4.
            .map(|rest| rest.split(['?', '/']).next().unwrap_or_default().to_owned())
            .ok_or_else(|| FormatError::NoGrpcEndpoint(instance.endpoints.clone()))?;
        validate_addr(&addr)?;
        let mut metadata: serde_json::Map<String, serde_json::Value> = instance
            .metadata
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        if !instance.version.is_empty() {
            metadata
                .entry("version")
                .or_insert_with(|| serde_json::Value::String(instance.version));
        }
        Ok(Endpoint {
            addr,
            id: Some(instance.id).filter(|i| !i.is_empty()),
            service: Some(instance.name).filter(|n| !n.is_empty()),
            metadata: (!metadata.is_empty()).then_some(serde_json::Value::Object(metadata)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kratos_value_has_the_service_instance_fields_in_go_order() {
        let ep = Endpoint::new("10.0.0.7:9000")
            .with_id("greeter-0")
            .with_service("greeter")
            .with_metadata(json!({"version": "v1", "zone": "a"}));
        assert_eq!(
            String::from_utf8(Kratos.render(&ep)).unwrap(),
            r#"{"id":"greeter-0","name":"greeter","version":"v1","metadata":{"version":"v1","zone":"a"},"endpoints":["grpc://10.0.0.7:9000"]}"#
        );
        assert_eq!(Kratos.parse(&Kratos.render(&ep)).unwrap(), ep);
    }

    #[test]
    fn kratos_instances_written_by_go_parse_including_the_old_is_secure_query() {
        let ep = Kratos
            .parse(br#"{"id":"x","name":"helloworld","version":"","metadata":null,"endpoints":["http://10.0.0.1:8000?isSecure=false","grpc://10.0.0.1:9000?isSecure=false"]}"#)
            .unwrap();
        assert_eq!(ep.addr, "10.0.0.1:9000");
        assert_eq!(ep.service.as_deref(), Some("helloworld"));
        assert_eq!(ep.metadata, None);
    }

    #[test]
    fn a_kratos_instance_without_a_grpc_endpoint_is_an_error() {
        let err = Kratos
            .parse(br#"{"id":"x","name":"n","endpoints":["http://10.0.0.1:8000"]}"#)
            .unwrap_err();
        assert!(matches!(err, FormatError::NoGrpcEndpoint(_)), "{err}");
    }

    #[test]
    fn non_string_metadata_is_written_as_json_text() {
        let ep = Endpoint::new("1.2.3.4:5").with_metadata(json!({"weight": 3}));
        let parsed = Kratos.parse(&Kratos.render(&ep)).unwrap();
        assert_eq!(parsed.metadata, Some(json!({"weight": "3"})));
        assert_eq!(parsed.id.as_deref(), Some("1.2.3.4:5"));
    }
}
