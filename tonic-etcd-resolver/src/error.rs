//! The crate's one error type.

/// What can fail while resolving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed; `op` names it.
    #[error("failed to {op}: {source}")]
    Etcd {
        /// The failed operation.
        op: &'static str,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request did not answer in time.
    #[error("failed to {op}: timed out")]
    Timeout {
        /// The failed operation.
        op: &'static str,
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

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
