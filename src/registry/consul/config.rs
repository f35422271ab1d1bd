//! How to reach Consul and where the controller keeps its records there.

use std::time::Duration;

use super::ConsulTls;

/// Consul's limit on operations in one `/v1/txn` (`maxTxnOps` in `agent/txn_endpoint.go`).
pub const MAX_TXN_OPS: usize = 128;

/// The most JSON bytes in one `/v1/txn` body: well under Consul's default `txn_max_req_len`
/// (raft's suggested 512 KiB), with room for framing.
pub const MAX_TXN_BYTES: usize = 384 * 1024;

/// How to reach Consul and lay out the controller's records.
#[derive(Clone)]
pub struct ConsulConfig {
    /// The HTTP API, e.g. `http://127.0.0.1:8500` (`https://` with [`ConsulConfig::tls`]).
    pub address: String,
    /// ACL token sent as `X-Consul-Token` (the caller reads it from its file); never logged.
    pub token: Option<String>,
    /// The datacenter to write to, when not the agent's own.
    pub datacenter: Option<String>,
    /// TLS, for an `https://` address.
    pub tls: Option<ConsulTls>,
    /// This cluster's name, when several clusters publish into one Consul: each registers its
    /// instances on its own synthetic node (`grpc-registrar-<cluster>`) and keeps its records
    /// under `<kv_root>/clusters/<cluster>/`.
    pub cluster: Option<String>,
    /// KV prefix of the controller's records (`<kv_root>/owners/<service>`, `<kv_root>/leader`).
    pub kv_root: String,
    /// How often the node's check is renewed (every third of it), and the TTL it announces.
    pub default_ttl: Duration,
    /// Bound on every HTTP request.
    pub request_timeout: Duration,
    /// Operations per txn, guards included; at most [`MAX_TXN_OPS`].
    pub max_txn_ops: usize,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("tls", &self.tls)
            .field("cluster", &self.cluster)
            .field("kv_root", &self.kv_root)
            .field("default_ttl", &self.default_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("max_txn_ops", &self.max_txn_ops)
            .finish()
    }
}

impl ConsulConfig {
    /// A config with the defaults for everything but the address.
    #[must_use]
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token: None,
            datacenter: None,
            tls: None,
            cluster: None,
            kv_root: "grpc-registrar".into(),
            default_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            max_txn_ops: MAX_TXN_OPS,
        }
    }

    /// Where this controller's records live: the KV root, or this cluster's part of it.
    #[must_use]
    pub fn records_root(&self) -> String {
        crate::registry::records::root(&self.kv_root, self.cluster.as_deref())
    }

    /// The synthetic node every instance of this controller (or cluster) is registered on.
    #[must_use]
    pub fn node_name(&self) -> String {
        match &self.cluster {
            Some(cluster) => format!("grpc-registrar-{cluster}"),
            None => "grpc-registrar".to_owned(),
        }
    }
}
