//! The crate's one error type.

/// What can fail while resolving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target is not a key prefix (nor an `etcd:///` target naming one).
    #[error("failed to resolve target {target:?}: {reason}")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An etcd request failed; `op` names it.
    #[error("failed to {op} for target {target:?}: {source}")]
    Etcd {
        /// The failed operation.
        op: &'static str,
        /// The target being resolved.
        target: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request did not answer in time.
    #[error("failed to {op} for target {target:?}: timed out")]
    Timeout {
        /// The failed operation.
        op: &'static str,
        /// The target being resolved.
        target: String,
    },
    /// A registry address does not make a valid endpoint URI.
    #[error("failed to build endpoint for {addr:?}: {source}")]
    InvalidEndpoint {
        /// The address.
        addr: String,
        /// The tonic error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl Error {
    /// A short, stable label for a failure counter.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidTarget { .. } => "invalid_target",
            Self::Etcd { .. } => "etcd",
            Self::Timeout { .. } => "timeout",
            Self::InvalidEndpoint { .. } => "invalid_endpoint",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
