//! The slice of Consul's HTTP API the backend uses: KV reads, catalog reads, and `/v1/txn`.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::config::ConsulConfig;
use crate::registry::{Error, Result};

/// A Consul HTTP client bound to one address, token and datacenter.
#[derive(Clone, Debug)]
pub(in crate::registry) struct Api {
    http: reqwest::Client,
    /// The address without a trailing slash.
    base: String,
    token: Option<String>,
    datacenter: Option<String>,
    timeout: Duration,
}

/// A read's body (`None` on 404) and Consul's `X-Consul-Index`.
pub(in crate::registry) struct Read<T> {
    pub(super) body: Option<T>,
    pub(super) index: u64,
}

/// What a write txn did.
#[derive(Debug)]
pub(in crate::registry) enum TxnOutcome {
    /// Every op applied, with the results Consul returned.
    Committed(Vec<TxnResult>),
    /// Nothing applied: the ops that failed, by index.
    RolledBack(Vec<TxnError>),
}

impl Api {
    pub(super) fn new(config: &ConsulConfig) -> Result<Self> {
        let invalid = |cause: String| Error::Consul {
            op: "configure the consul client",
            addr: config.address.clone(),
            status: None,
            cause,
        };
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .use_rustls_tls();
        if let Some(tls) = &config.tls {
            if let Some(ca) = &tls.ca {
                for cert in reqwest::Certificate::from_pem_bundle(ca)
                    .map_err(|e| invalid(format!("unreadable CA certificate: {e}")))?
                {
                    builder = builder.add_root_certificate(cert);
                }
            }
            if let Some((cert, key)) = &tls.identity {
                let mut pem = cert.clone();
                pem.push(b'\n');
                pem.extend_from_slice(key);
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| invalid(format!("unreadable client certificate or key: {e}")))?;
                builder = builder.identity(identity);
            }
        }
        let http = builder.build().map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            http,
            base: config.address.trim_end_matches('/').to_owned(),
            token: config.token.clone(),
            datacenter: config.datacenter.clone(),
            timeout: config.request_timeout,
        })
    }

    /// The address asked, for messages.
    pub(super) fn addr(&self) -> &str {
        &self.base
    }

    fn error(&self, op: &'static str, status: Option<StatusCode>, cause: String) -> Error {
        Error::Consul {
            op,
            addr: self.base.clone(),
            status: status.map(|s| s.as_u16()),
            cause,
        }
    }

    fn send_error(&self, op: &'static str, e: &reqwest::Error) -> Error {
        if e.is_timeout() {
            return Error::Timeout {
                op,
                after: self.timeout,
            };
        }
        use std::error::Error as _;
        let mut cause = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !cause.contains(&text) {
                cause.push_str(": ");
                cause.push_str(&text);
            }
            source = s.source();
        }
        self.error(op, None, cause)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query);
        if let Some(dc) = &self.datacenter {
            req = req.query(&[("dc", dc)]);
        }
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        req
    }

    /// A GET of `path`: its JSON body (`None` on 404) and index.
    pub(super) async fn get<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Read<T>> {
        let resp = self
            .request(Method::GET, path, query)
            .send()
            .await
            .map_err(|e| self.send_error(op, &e))?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if status == StatusCode::NOT_FOUND {
            return Ok(Read { body: None, index });
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.error(op, Some(status), answered(status, &text)));
        }
        let body = resp
            .json()
            .await
            .map_err(|e| self.error(op, Some(status), format!("unreadable answer: {e}")))?;
        Ok(Read {
            body: Some(body),
            index,
        })
    }

    /// A GET whose body is plain text (e.g. `/v1/status/leader`).
    pub(super) async fn get_text(&self, op: &'static str, path: &str) -> Result<String> {
        let resp = self
            .request(Method::GET, path, &[])
            .send()
            .await
            .map_err(|e| self.send_error(op, &e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.send_error(op, &e))?;
        if !status.is_success() {
            return Err(self.error(op, Some(status), answered(status, &text)));
        }
        Ok(text)
    }

    /// One `/v1/txn`: committed as a whole or rolled back as a whole.
    pub(super) async fn txn(&self, op: &'static str, ops: &[TxnOp]) -> Result<TxnOutcome> {
        let resp = self
            .request(Method::PUT, "/v1/txn", &[])
            .json(ops)
            .send()
            .await
            .map_err(|e| self.send_error(op, &e))?;
        let status = resp.status();
        if status != StatusCode::OK && status != StatusCode::CONFLICT {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.error(op, Some(status), answered(status, &text)));
        }
        let body: TxnResponse = resp
            .json()
            .await
            .map_err(|e| self.error(op, Some(status), format!("unreadable answer: {e}")))?;
        let errors = body.errors.unwrap_or_default();
        if status == StatusCode::CONFLICT || !errors.is_empty() {
            return Ok(TxnOutcome::RolledBack(errors));
        }
        Ok(TxnOutcome::Committed(body.results.unwrap_or_default()))
    }
}

/// Consul's answer to a refused request, as one line.
fn answered(status: StatusCode, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        format!("consul answered {status}")
    } else {
        format!("consul answered {status}: {text}")
    }
}

/// One operation of a `/v1/txn` body, in Consul's API format.
#[derive(Clone, Debug, Serialize)]
pub(in crate::registry) enum TxnOp {
    /// A KV operation.
    #[serde(rename = "KV")]
    Kv(KvOp),
    /// A catalog node operation.
    Node(NodeOp),
    /// A catalog service (instance) operation.
    Service(ServiceOp),
    /// A catalog check operation.
    Check(CheckOp),
}

impl TxnOp {
    /// A KV op: `verb` on `key`, with `value` (base64-encoded here) and `index` where the verb
    /// takes them.
    fn kv(verb: &'static str, key: &str, value: Option<&[u8]>, index: u64) -> Self {
        Self::Kv(KvOp {
            verb,
            key: key.to_owned(),
            value: value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
            index,
        })
    }

    /// A KV `check-index`: the txn fails unless `key` is at `index`.
    pub(super) fn check_index(key: &str, index: u64) -> Self {
        Self::kv("check-index", key, None, index)
    }

    /// A KV `cas`: set `key` only while at `index` (0: only if absent).
    pub(super) fn kv_cas(key: &str, value: &[u8], index: u64) -> Self {
        Self::kv("cas", key, Some(value), index)
    }

    /// A KV `set`: `key` to `value`, unconditionally (guard it with `check-index` ops).
    pub(super) fn kv_set(key: &str, value: &[u8]) -> Self {
        Self::kv("set", key, Some(value), 0)
    }

    /// A KV `delete`: `key`, unconditionally (guard it with `check-index` ops).
    pub(super) fn kv_delete(key: &str) -> Self {
        Self::kv("delete", key, None, 0)
    }

    /// A KV `delete-cas`: delete `key` only while at `index`.
    pub(super) fn kv_delete_cas(key: &str, index: u64) -> Self {
        Self::kv("delete-cas", key, None, index)
    }

    /// Its JSON size, for byte-bounded batches.
    pub(super) fn bytes(&self) -> usize {
        serde_json::to_vec(self).map_or(0, |v| v.len() + 1)
    }
}

/// A KV operation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct KvOp {
    pub(super) verb: &'static str,
    pub(super) key: String,
    /// Base64, as Consul's API wants it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<String>,
    pub(super) index: u64,
}

/// A node operation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct NodeOp {
    pub(super) verb: &'static str,
    pub(super) node: NodeDef,
}

/// A catalog node.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct NodeDef {
    pub(super) node: String,
    pub(super) address: String,
    pub(super) meta: BTreeMap<String, String>,
}

/// A service operation on one node.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct ServiceOp {
    pub(super) verb: &'static str,
    pub(super) node: String,
    pub(super) service: ServiceDef,
}

/// A service instance, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct ServiceDef {
    #[serde(rename = "ID")]
    pub(super) id: String,
    pub(super) service: String,
    pub(super) address: String,
    pub(super) port: u16,
    pub(super) meta: BTreeMap<String, String>,
    pub(super) tags: Vec<String>,
    pub(super) weights: Weights,
    /// For `cas`: the index the instance must be at (0: must not exist).
    pub(super) modify_index: u64,
}

/// DNS SRV weights of an instance, by health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct Weights {
    pub(super) passing: u32,
    pub(super) warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

/// A check operation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct CheckOp {
    pub(super) verb: &'static str,
    pub(super) check: CheckDef,
}

/// A health check, as written.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct CheckDef {
    pub(super) node: String,
    #[serde(rename = "CheckID")]
    pub(super) check_id: String,
    pub(super) name: String,
    pub(super) status: &'static str,
    pub(super) notes: String,
    pub(super) output: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnResponse {
    results: Option<Vec<TxnResult>>,
    errors: Option<Vec<TxnError>>,
}

/// One result of a committed txn; the kind of the op it answers is set.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct TxnResult {
    #[serde(rename = "KV")]
    pub(super) kv: Option<Indexed>,
    pub(super) node: Option<Indexed>,
    pub(super) service: Option<Indexed>,
    pub(super) check: Option<Indexed>,
}

impl TxnResult {
    /// The entry returned, whatever its kind.
    pub(super) fn entry(&self) -> Option<&Indexed> {
        self.kv
            .as_ref()
            .or(self.node.as_ref())
            .or(self.service.as_ref())
            .or(self.check.as_ref())
    }
}

/// The raft indexes of an entry.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct Indexed {
    #[serde(default)]
    pub(super) create_index: u64,
    #[serde(default)]
    pub(super) modify_index: u64,
}

/// Why a txn op failed.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct TxnError {
    pub(super) op_index: usize,
    pub(super) what: String,
}

/// A KV entry as `/v1/kv/<key>` returns it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct KvEntry {
    /// The key.
    #[serde(default)]
    pub(super) key: String,
    /// Base64, or null for an empty value.
    pub(super) value: Option<String>,
    pub(super) modify_index: u64,
}

impl KvEntry {
    /// The value's bytes.
    pub(super) fn bytes(&self) -> Vec<u8> {
        self.value
            .as_deref()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .unwrap_or_default()
    }
}

/// `/v1/catalog/node-services/<node>`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct NodeServices {
    pub(super) node: Option<Indexed>,
    #[serde(default)]
    pub(super) services: Option<Vec<Instance>>,
}

/// An instance as the catalog returns it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::registry) struct Instance {
    #[serde(rename = "ID")]
    pub(super) id: String,
    pub(super) service: String,
    #[serde(default)]
    pub(super) address: String,
    #[serde(default)]
    pub(super) port: u16,
    #[serde(default)]
    pub(super) meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) tags: Option<Vec<String>>,
    #[serde(default)]
    pub(super) weights: Option<Weights>,
    pub(super) modify_index: u64,
}

impl Instance {
    /// Whether it already is `want` (indexes aside).
    pub(super) fn matches(&self, want: &ServiceDef) -> bool {
        self.service == want.service
            && self.address == want.address
            && self.port == want.port
            && self.meta.as_ref().unwrap_or(&BTreeMap::new()) == &want.meta
            && self.tags.as_deref().unwrap_or_default() == want.tags.as_slice()
            && self.weights.unwrap_or_default() == want.weights
    }
}
