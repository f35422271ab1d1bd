//! etcd's gRPC naming JSON, as Go's `endpoints.Manager` writes it.

use serde::{Deserialize, Serialize};

use super::{
    Codec, Endpoint, EndpointParts, FormatError, ValueFormat, go_html_escape, utf8, validate_addr,
};

/// `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{...}}`, byte-compatible with
/// `go.etcd.io/etcd/client/v3/naming/endpoints`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdNaming;

/// The JSON record written by Go's `endpoints.Manager` (`internal.Update`), as read.
#[derive(Deserialize)]
struct NamingRecord<'a> {
    /// `0` is Add. Go's resolver ignores it on read, and so do we; it is still decoded, so
    /// that a value Go would refuse (an `Op` that is not a small number) is refused here too.
    #[serde(rename = "Op", default)]
    #[expect(dead_code, reason = "decoded for its type check only")]
    op: u8,
    #[serde(rename = "Addr", default, borrow)]
    addr: std::borrow::Cow<'a, str>,
    #[serde(rename = "Metadata", default)]
    metadata: Option<serde_json::Value>,
}

/// [`NamingRecord`] as written, borrowed (an endpoint's metadata is not copied to be rendered).
///
/// Field order matters: Go's `encoding/json` writes struct fields in declaration order.
#[derive(Serialize)]
struct NamingOut<'a, M> {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: &'a str,
    #[serde(rename = "Metadata")]
    metadata: Option<&'a M>,
}

impl<M: Serialize> NamingOut<'_, M> {
    fn render(&self) -> Vec<u8> {
        // Serializing a struct of strings and JSON values cannot fail.
        go_html_escape(serde_json::to_string(self).unwrap_or_default()).into_bytes()
    }
}

impl Codec for EtcdNaming {
    fn format(&self) -> ValueFormat {
        ValueFormat::EtcdNaming
    }

    fn render(&self, endpoint: &Endpoint) -> Vec<u8> {
        NamingOut {
            op: 0,
            addr: &endpoint.addr,
            metadata: endpoint.metadata.as_ref(),
        }
        .render()
    }

    fn render_parts(&self, parts: &EndpointParts<'_>) -> Vec<u8> {
        NamingOut {
            op: 0,
            addr: parts.addr,
            metadata: Some(parts.metadata),
        }
        .render()
    }

    fn parse(&self, value: &[u8]) -> Result<Endpoint, FormatError> {
        let record: NamingRecord<'_> =
            serde_json::from_str(utf8(value)?.trim()).map_err(|e| FormatError::Json {
                format: ValueFormat::EtcdNaming,
                message: e.to_string(),
            })?;
        validate_addr(&record.addr)?;
        Ok(Endpoint {
            addr: record.addr.into_owned(),
            metadata: record.metadata.filter(|m| !m.is_null()),
            ..Endpoint::default()
        })
    }
}
