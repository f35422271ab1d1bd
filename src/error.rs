//! The controller's error type; the registry has its own ([`crate::registry::Error`]).

use crate::desired::SpecError;

/// Everything that can fail in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registry backend request failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
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
    /// A short, stable label of the root cause, for the reconcile failure counter: the finalizer
    /// wrapper is looked through.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Self::Registry(e) => e.metric_label(),
            Self::Kube { .. } => "kube",
            Self::Finalizer(e) => match e.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.metric_label(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "kube",
                F::UnnamedObject | F::InvalidFinalizer => "missing_field",
            },
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingField(_) => "missing_field",
        }
    }

    /// Wraps a Kubernetes error with the operation that failed.
    pub(crate) fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { op, source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{FAILURE_LABELS, Metrics};
    use crate::registry;

    #[test]
    fn every_root_cause_label_is_in_the_bounded_set_and_starts_at_zero() {
        let errors = [
            Error::from(registry::Error::Etcd {
                op: "txn",
                source: etcd_client::Error::InvalidArgs("x".into()),
            }),
            Error::from(registry::Error::Timeout {
                op: "txn",
                after: std::time::Duration::ZERO,
            }),
            Error::from(registry::Error::OwnershipLost { target: "t".into() }),
            Error::from(registry::Error::Fenced { op: "txn" }),
            Error::InvalidSpec(SpecError::PortRange(0)),
            Error::MissingField("metadata.uid"),
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
                Error::from(registry::Error::Fenced { op: "txn" }),
            ))),
        ];
        for error in &errors {
            assert!(
                FAILURE_LABELS.contains(&error.metric_label()),
                "{error}: {}",
                error.metric_label()
            );
        }
        assert_eq!(
            errors[6].metric_label(),
            "fenced",
            "the finalizer is looked through"
        );
        let page = Metrics::default().encode();
        for label in FAILURE_LABELS {
            let series = format!("grpc_registrar_reconcile_failures_total{{error=\"{label}\"}} 0");
            assert!(page.contains(&series), "{series} missing:\n{page}");
        }
    }
}
