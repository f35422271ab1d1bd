//! The registry wire contract: keys, and the value formats, each a [`Codec`] that renders and
//! parses.
//!
//! Both the grpc-registrar controller (which writes) and the resolver (which reads) use this
//! module, so the two sides cannot drift apart.
//!
//! - **Keys** are `<target>/<addr>` by default, and resolvers watch `<target>/` *with* the
//!   trailing slash, so that target `foo` never sees `foo_bar/...` keys (etcd-io/etcd#15022).
//! - **[`ValueFormat::EtcdNaming`]** values are byte-compatible with Go's
//!   `go.etcd.io/etcd/client/v3/naming/endpoints`: `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}`.
//! - **[`ValueFormat::Address`]** values are the bare `host:port`, as older self-registering Go
//!   services (and go-zero) write them.
//! - **[`ValueFormat::Kratos`]** values are go-kratos' etcd registry `ServiceInstance` JSON,
//!   `{"id":..,"name":..,"version":..,"metadata":{..},"endpoints":["grpc://ip:port"]}`, under
//!   kratos' `/microservices/<name>/<id>` keys.
//!
//! [`parse`] detects the format of each value; [`ValueFormat::codec`] reads one format only.

mod kratos;
mod naming;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use kratos::Kratos;
pub use naming::EtcdNaming;

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
    /// go-kratos' etcd registry `ServiceInstance` JSON, with a `grpc://ip:port` endpoint.
    ///
    /// Pair it with kratos' key layout: target `/microservices/<name>`, keys `{target}/{id}`.
    Kratos,
}

impl ValueFormat {
    /// Every format, in documentation order.
    pub const ALL: [Self; 3] = [Self::EtcdNaming, Self::Address, Self::Kratos];

    /// The codec of this format.
    #[must_use]
    pub fn codec(self) -> &'static dyn Codec {
        match self {
            Self::EtcdNaming => &EtcdNaming,
            Self::Address => &Address,
            Self::Kratos => &Kratos,
        }
    }
}

impl fmt::Display for ValueFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EtcdNaming => "EtcdNaming",
            Self::Address => "Address",
            Self::Kratos => "Kratos",
        })
    }
}

/// One endpoint as stored in the registry: an address, and what the richer formats carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The address clients dial, `host:port` (IPv6 hosts in brackets).
    pub addr: String,
    /// The instance id ([`ValueFormat::Kratos`] `id`); the address stands in when `None`.
    pub id: Option<String>,
    /// The service name ([`ValueFormat::Kratos`] `name`).
    pub service: Option<String>,
    /// Free-form metadata. [`ValueFormat::EtcdNaming`] carries any JSON;
    /// [`ValueFormat::Kratos`] a map of strings (other values are written as their JSON text);
    /// [`ValueFormat::Address`] none.
    pub metadata: Option<serde_json::Value>,
}

impl Endpoint {
    /// An endpoint with an address and nothing else.
    #[must_use]
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            ..Self::default()
        }
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sets the instance id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the service name.
    #[must_use]
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// A metadata value as a string, when it is one.
    #[must_use]
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }
}

/// An endpoint as a writer holds it, borrowed, with metadata of strings:
/// [`Codec::render_parts`] writes it without building an [`Endpoint`] (no copy of its metadata).
#[derive(Clone, Copy, Debug)]
pub struct EndpointParts<'a> {
    /// The address clients dial, `host:port`.
    pub addr: &'a str,
    /// The instance id.
    pub id: &'a str,
    /// The service name.
    pub service: &'a str,
    /// The metadata.
    pub metadata: &'a BTreeMap<String, String>,
}

impl EndpointParts<'_> {
    /// The same endpoint, owned: the one [`Codec::render_parts`] renders as [`Codec::render`]
    /// would.
    #[must_use]
    pub fn to_endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr)
            .with_id(self.id)
            .with_service(self.service)
            .with_metadata(serde_json::Value::Object(
                self.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            ))
    }
}

/// Why a registry value could not be read as an endpoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The value looked like JSON of a format but did not parse.
    #[error("failed to parse {format} value: {message}")]
    Json {
        /// The format it was read as.
        format: ValueFormat,
        /// The parser's message.
        message: String,
    },
    /// The value parsed, but its address is empty or is not `host:port`.
    #[error("failed to parse endpoint address {0:?}: expected host:port")]
    Address(String),
    /// A kratos instance with no `grpc://` endpoint.
    #[error("failed to parse kratos value: no grpc:// endpoint in {0:?}")]
    NoGrpcEndpoint(Vec<String>),
    /// The value is not UTF-8.
    #[error("failed to parse value: not utf-8")]
    NotUtf8,
}

/// One value format: how an [`Endpoint`] becomes value bytes, and back.
pub trait Codec: fmt::Debug + Send + Sync {
    /// The format this codec implements.
    fn format(&self) -> ValueFormat;

    /// Renders an endpoint as value bytes.
    fn render(&self, endpoint: &Endpoint) -> Vec<u8>;

    /// Renders borrowed parts as value bytes: the same bytes as [`Codec::render`] of
    /// [`EndpointParts::to_endpoint`], without building it (a writer renders every endpoint of a
    /// service on each change).
    fn render_parts(&self, parts: &EndpointParts<'_>) -> Vec<u8> {
        self.render(&parts.to_endpoint())
    }

    /// Parses value bytes written in this format.
    ///
    /// # Errors
    /// A malformed value is an error, never a panic. Callers skip it with a warning.
    fn parse(&self, value: &[u8]) -> Result<Endpoint, FormatError>;
}

/// The bare `host:port` format.
#[derive(Clone, Copy, Debug, Default)]
pub struct Address;

impl Codec for Address {
    fn format(&self) -> ValueFormat {
        ValueFormat::Address
    }

    fn render(&self, endpoint: &Endpoint) -> Vec<u8> {
        endpoint.addr.clone().into_bytes()
    }

    fn render_parts(&self, parts: &EndpointParts<'_>) -> Vec<u8> {
        parts.addr.as_bytes().to_vec()
    }

    fn parse(&self, value: &[u8]) -> Result<Endpoint, FormatError> {
        let text = utf8(value)?.trim();
        validate_addr(text)?;
        Ok(Endpoint::new(text))
    }
}

/// Renders an endpoint as the value bytes for `format`.
///
/// [`ValueFormat::EtcdNaming`] output matches Go's `json.Marshal` byte for byte, including its
/// escaping of `<`, `>`, `&`, U+2028 and U+2029, so values written by Go and by us compare equal.
#[must_use]
pub fn render(format: ValueFormat, endpoint: &Endpoint) -> Vec<u8> {
    format.codec().render(endpoint)
}

/// The format a value is written in, by its shape: a JSON object with an `endpoints` array is
/// kratos, any other object etcd naming JSON, anything else a bare address.
#[must_use]
pub fn detect(value: &[u8]) -> ValueFormat {
    let text = value.trim_ascii_start();
    if !text.starts_with(b"{") {
        return ValueFormat::Address;
    }
    if kratos::looks_like(text) {
        ValueFormat::Kratos
    } else {
        ValueFormat::EtcdNaming
    }
}

/// Parses a registry value written in any format, detected per value ([`detect`]).
///
/// So a resolver reads registries written by grpc-registrar, Go's `endpoints.Manager`, seed-era
/// servers and kratos without configuration. Unknown JSON fields are ignored and etcd naming's
/// `Op` is not interpreted, exactly as Go's resolver does.
///
/// # Errors
/// A malformed value is an error, never a panic. Callers skip it with a warning.
pub fn parse(value: &[u8]) -> Result<Endpoint, FormatError> {
    detect(value).codec().parse(value)
}

fn utf8(value: &[u8]) -> Result<&str, FormatError> {
    std::str::from_utf8(value).map_err(|_| FormatError::NotUtf8)
}

/// Go `encoding/json`'s HTML-safe escaping applied to serialized JSON.
///
/// These characters can only occur inside JSON strings, so replacing them in the whole document
/// is exact.
fn go_html_escape(json: String) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json;
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
    match ip {
        // Written digit by digit: `SocketAddr`'s `Display` goes through the formatting
        // machinery (padding support, a buffer), and a reconcile renders one per endpoint.
        IpAddr::V4(v4) => {
            let mut out = String::with_capacity(21);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(&mut out, u32::from(octet));
            }
            out.push(':');
            push_decimal(&mut out, u32::from(port));
            out
        }
        IpAddr::V6(_) => std::net::SocketAddr::new(ip, port).to_string(),
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    loop {
        start -= 1;
        // `n % 10` is below 10.
        digits[start] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[start..].iter().map(|&d| char::from(d)));
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
    fn every_format_round_trips_through_detection() {
        for format in ValueFormat::ALL {
            let ep = Endpoint::new("[fd00::7]:50051");
            let value = render(format, &ep);
            assert_eq!(detect(&value), format, "{format}");
            assert_eq!(parse(&value).unwrap().addr, ep.addr, "{format}");
            assert_eq!(
                format.codec().parse(&value).unwrap().addr,
                ep.addr,
                "{format}"
            );
        }
    }

    #[test]
    fn a_codec_reads_only_its_own_format() {
        let naming = render(ValueFormat::EtcdNaming, &Endpoint::new("1.2.3.4:5"));
        assert!(Address.parse(&naming).is_err());
        assert!(Kratos.parse(&naming).is_err());
        let bare = render(ValueFormat::Address, &Endpoint::new("1.2.3.4:5"));
        assert!(EtcdNaming.parse(&bare).is_err());
        assert!(Kratos.parse(&bare).is_err());
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
