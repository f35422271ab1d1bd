//! How to reach etcd and lay out the controller's records.

use std::time::Duration;

use super::EtcdTls;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// The most key and value bytes in one write txn: well under etcd's default 1.5 MiB request
/// limit (`--max-request-bytes`), with room for the guards and framing.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// An etcd user and password; the password never reaches a log.
#[derive(Clone)]
pub struct EtcdUser {
    /// The user name.
    pub name: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to reach etcd and lay out the controller's records.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// etcd client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of the controller's own records (`<root>/owners/...`, `<root>/leader`).
    pub registrar_root: String,
    /// This cluster's name, when several clusters publish into one registry: a write scope is
    /// then (target, cluster). Records live under `<root>/clusters/<name>/`, every lease is
    /// marked under `<root>/leases/<name>/`, and keys on another cluster's lease are never
    /// rewritten or deleted.
    pub cluster: Option<String>,
    /// TTL of the shared lease when a service sets none.
    pub default_ttl: Duration,
    /// Operations per txn; at most etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// Bound on every etcd request.
    pub op_timeout: Duration,
    /// TLS, for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// Username and password auth. The token is refreshed when etcd refuses it as expired.
    pub user: Option<EtcdUser>,
}

impl EtcdConfig {
    /// Where this controller's records live: the registrar root, or this cluster's part of it.
    #[must_use]
    pub fn records_root(&self) -> String {
        crate::registry::records::root(&self.registrar_root, self.cluster.as_deref())
    }

    /// A config with the defaults for everything but the endpoints.
    #[must_use]
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            registrar_root: "grpc-registrar".into(),
            cluster: None,
            default_ttl: Duration::from_secs(30),
            max_txn_ops: MAX_TXN_OPS,
            op_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
        }
    }
}
