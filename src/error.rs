//! The crate's one error type.

use crate::desired::SpecError;

/// Everything that can fail in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed; `op` names it.
    #[error("failed to {op}: {source}")]
    Etcd {
        /// The failed operation, e.g. `grant lease`.
        op: &'static str,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// Another writer changed the ownership record under us between claim and write.
    #[error("failed to write {target}: ownership was lost")]
    OwnershipLost {
        /// The target whose owner record no longer names us.
        target: String,
    },
    /// This replica is not (or no longer) the leader; the write was refused, locally or by the
    /// etcd fence.
    #[error("failed to {op}: this replica is not the leader")]
    Fenced {
        /// The refused operation.
        op: &'static str,
    },
    /// A Kubernetes API request failed.
    #[error("failed to {op}: {source}")]
    Kube {
        /// The failed operation, e.g. `patch status`.
        op: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer helper failed in apply or cleanup.
    #[error("failed to run finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The spec cannot be applied; reported as the `InvalidSpec` condition.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// The object lacks a field the API server always sets.
    #[error("failed to read object: missing {0}")]
    MissingField(&'static str),
}

impl Error {
    /// A short, stable label for the reconcile failure counter.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Etcd { .. } => "etcd",
            Self::OwnershipLost { .. } => "ownership_lost",
            Self::Fenced { .. } => "fenced",
            Self::Kube { .. } => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingField(_) => "missing_field",
        }
    }

    /// Wraps an etcd error with the operation that failed.
    pub(crate) fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Etcd { op, source }
    }

    /// Wraps a Kubernetes error with the operation that failed.
    pub(crate) fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { op, source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
