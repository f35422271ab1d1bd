//! The registry's error type, separate from the controller's.

use std::time::Duration;

use crate::desired::SpecError;

/// Everything a registry backend can fail with.
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
    /// A request got no answer in time.
    #[error("failed to {op}: no answer within {after:?}")]
    Timeout {
        /// The failed operation.
        op: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// Another writer changed the ownership record under us between claim and write.
    #[error("failed to write {target}: ownership was lost")]
    OwnershipLost {
        /// The target whose owner record no longer names us.
        target: String,
    },
    /// This replica is not (or no longer) the leader; the write was refused, locally or by the
    /// registry's fence.
    #[error("failed to {op}: this replica is not the leader")]
    Fenced {
        /// The refused operation.
        op: &'static str,
    },
    /// The publication cannot be written as asked (e.g. a key template collision).
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl Error {
    /// A short, stable label for failure counters.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Etcd { .. } => "etcd",
            Self::Timeout { .. } => "timeout",
            Self::OwnershipLost { .. } => "ownership_lost",
            Self::Fenced { .. } => "fenced",
            Self::Spec(_) => "invalid_spec",
        }
    }

    /// Wraps an etcd error with the operation that failed.
    pub(crate) fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Etcd { op, source }
    }
}

/// The registry's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bounds `fut` by `after`, naming `op` when it runs out.
///
/// # Errors
/// [`Error::Timeout`], or the future's own error.
pub async fn timeout<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| Error::Timeout { op, after })?
        .map_err(Error::etcd(op))
}
