//! The registry wire contract: keys, and the two value formats, parsed and rendered in one place.
//!
//! Both the grpc-registrar controller (which writes) and the resolver (which reads) use this
//! module, so the two sides cannot drift apart.
//!
//! - **Keys** are `<target>/<addr>`, and resolvers watch `<target>/` *with* the trailing slash,
//!   so that target `foo` never sees `foo_bar/...` keys (etcd-io/etcd#15022).
//! - **[`ValueFormat::EtcdNaming`]** values are byte-compatible with Go's
//!   `go.etcd.io/etcd/client/v3/naming/endpoints`: `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}`.
//! - **[`ValueFormat::Address`]** values are the bare `host:port`, as older self-registering Go
//!   services write them.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// How endpoint values are encoded in etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum ValueFormat {
    /// etcd's gRPC naming JSON, `{"Op":0,"Addr":"ip:port","Metadata":...}`.
    ///
    /// This is what `go.etcd.io/etcd/client/v3/naming/resolver` reads.
    #[default]
    EtcdNaming,
    /// The bare address, `ip:port`.
    Address,
}

impl fmt::Display for ValueFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EtcdNaming => "EtcdNaming",
            Self::Address => "Address",
        })
    }
}

/// One endpoint as stored in the registry: an address and optional metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The address clients dial, `host:port` (IPv6 hosts in brackets).
    pub addr: String,
    /// Free-form metadata, carried only by [`ValueFormat::EtcdNaming`] values.
    pub metadata: Option<serde_json::Value>,
}

impl Endpoint {
    /// An endpoint with an address and no metadata.
    #[must_use]
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            metadata: None,
        }
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// Why a registry value could not be read as an endpoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The value looked like naming JSON but did not parse.
    #[error("failed to parse naming json value: {0}")]
    Json(String),
    /// The value parsed, but its address is empty or is not `host:port`.
    #[error("failed to parse endpoint address {0:?}: expected host:port")]
    Address(String),
    /// The value is not UTF-8.
    #[error("failed to parse value: not utf-8")]
    NotUtf8,
}

/// The JSON record written by Go's `endpoints.Manager` (`internal.Update`).
///
/// Field order matters: Go's `encoding/json` writes struct fields in declaration order.
#[derive(Serialize, Deserialize)]
struct NamingRecord<'a> {
    /// `0` is Add. Go's resolver ignores it on read, and so do we.
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr", default, borrow)]
    addr: std::borrow::Cow<'a, str>,
    #[serde(rename = "Metadata", default)]
    metadata: Option<serde_json::Value>,
}

/// Renders an endpoint as the value bytes for `format`.
///
/// [`ValueFormat::EtcdNaming`] output matches Go's `json.Marshal` byte for byte, including its
/// escaping of `<`, `>`, `&`, U+2028 and U+2029, so values written by Go and by us compare equal.
#[must_use]
pub fn render(format: ValueFormat, endpoint: &Endpoint) -> Vec<u8> {
    match format {
        ValueFormat::Address => endpoint.addr.clone().into_bytes(),
        ValueFormat::EtcdNaming => {
            let record = NamingRecord {
                op: 0,
                addr: std::borrow::Cow::Borrowed(&endpoint.addr),
                metadata: endpoint.metadata.clone(),
            };
            // Serializing a struct of strings and JSON values cannot fail.
            let json = serde_json::to_string(&record).unwrap_or_default();
            go_html_escape(&json).into_bytes()
        }
    }
}

/// Applies Go `encoding/json`'s HTML-safe escaping to serialized JSON.
///
/// These characters can only occur inside JSON strings, so replacing them in the whole document
/// is exact.
fn go_html_escape(json: &str) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Parses a registry value written in either format.
///
/// A value that starts with `{` is read as naming JSON, anything else as a bare address, so a
/// resolver reads registries written by either side without configuration. Unknown JSON fields
/// are ignored and `Op` is not interpreted, exactly as Go's resolver does.
///
/// # Errors
/// A malformed value is an error, never a panic. Callers skip it with a warning.
pub fn parse(value: &[u8]) -> Result<Endpoint, FormatError> {
    let text = std::str::from_utf8(value).map_err(|_| FormatError::NotUtf8)?;
    let trimmed = text.trim();
    let endpoint = if trimmed.starts_with('{') {
        let record: NamingRecord<'_> =
            serde_json::from_str(trimmed).map_err(|e| FormatError::Json(e.to_string()))?;
        Endpoint {
            addr: record.addr.into_owned(),
            metadata: record.metadata.filter(|m| !m.is_null()),
        }
    } else {
        Endpoint::new(trimmed)
    };
    validate_addr(&endpoint.addr)?;
    Ok(endpoint)
}

/// Checks that `addr` is `host:port` with a non-empty host and a numeric port.
///
/// IPv6 hosts must be bracketed (`[::1]:50051`).
///
/// # Errors
/// [`FormatError::Address`] when it is not.
pub fn validate_addr(addr: &str) -> Result<(), FormatError> {
    let bad = || FormatError::Address(addr.to_owned());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if port.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains([':', '/', ' ', '[', ']'])
    };
    if host_ok { Ok(()) } else { Err(bad()) }
}

/// Formats an IP and port as an address, bracketing IPv6 (`[fd00::7]:50051`).
#[must_use]
pub fn socket_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The key of one endpoint: `<target>/<addr>`.
#[must_use]
pub fn endpoint_key(target: &str, addr: &str) -> String {
    format!("{target}/{addr}")
}

/// The prefix a resolver watches for `target`: `<target>/`, with the trailing slash.
#[must_use]
pub fn watch_prefix(target: &str) -> String {
    format!("{}/", target.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn naming_value_matches_go_endpoints_manager_bytes() {
        let v = render(ValueFormat::EtcdNaming, &Endpoint::new("10.0.0.7:50051"));
        assert_eq!(v, br#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}"#);
    }

    #[test]
    fn naming_value_carries_metadata_with_sorted_keys() {
        let ep = Endpoint::new("10.0.0.7:50051").with_metadata(json!({"zone":"a","pod":"p-1"}));
        let v = render(ValueFormat::EtcdNaming, &ep);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"pod":"p-1","zone":"a"}}"#
        );
    }

    #[test]
    fn naming_value_escapes_html_characters_like_go() {
        let ep = Endpoint::new("10.0.0.7:1").with_metadata(json!({"a":"<b>&\u{2028}"}));
        let v = String::from_utf8(render(ValueFormat::EtcdNaming, &ep)).unwrap();
        assert_eq!(
            v,
            r#"{"Op":0,"Addr":"10.0.0.7:1","Metadata":{"a":"\u003cb\u003e\u0026\u2028"}}"#
        );
        assert_eq!(parse(v.as_bytes()).unwrap(), ep);
    }

    #[test]
    fn address_value_is_the_bare_address() {
        assert_eq!(
            render(ValueFormat::Address, &Endpoint::new("10.0.0.7:50051")),
            b"10.0.0.7:50051"
        );
    }

    #[test]
    fn both_formats_round_trip() {
        for format in [ValueFormat::EtcdNaming, ValueFormat::Address] {
            let ep = Endpoint::new("[fd00::7]:50051");
            assert_eq!(parse(&render(format, &ep)).unwrap(), ep, "{format}");
        }
    }

    #[test]
    fn go_written_value_without_op_or_metadata_parses() {
        let ep = parse(br#"{"Addr":"1.2.3.4:5","Extra":true}"#).unwrap();
        assert_eq!(ep, Endpoint::new("1.2.3.4:5"));
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        for bad in [
            &b"{"[..],
            b"{\"Addr\":\"\"}",
            b"{\"Addr\":5}",
            b"",
            b"no-port",
            b"host:notaport",
            b"host:70000",
            b":80",
            b"fd00::7:50051",
            b"[zz]:1",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn hostnames_are_valid_addresses() {
        assert!(validate_addr("greeter-0.greeter.default.svc:50051").is_ok());
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let ip: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(socket_addr(ip, 50051), "[fd00::7]:50051");
        assert_eq!(socket_addr("10.0.0.7".parse().unwrap(), 1), "10.0.0.7:1");
    }

    #[test]
    fn watch_prefix_has_exactly_one_trailing_slash() {
        assert_eq!(watch_prefix("services/ns/foo"), "services/ns/foo/");
        assert_eq!(watch_prefix("services/ns/foo/"), "services/ns/foo/");
        assert_eq!(
            endpoint_key("services/ns/foo", "1.2.3.4:5"),
            "services/ns/foo/1.2.3.4:5"
        );
    }
}
