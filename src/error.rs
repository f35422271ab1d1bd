//! The controller's error type; the registry has its own ([`crate::registry::Error`]).

use crate::desired::SpecError;

/// Everything that can fail in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registry backend request failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    /// A Kubernetes API request failed.
    #[error("failed to {op}")]
    Kube {
        /// The failed operation, e.g. `patch status`.
        op: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The spec cannot be applied; reported as the `InvalidSpec` condition.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// The object lacks a field the API server always sets.
    #[error("failed to read object: missing {0}")]
    MissingField(&'static str),
}

impl Error {
    /// A short, stable label of the root cause, for the reconcile failure counter.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Registry(e) => e.metric_label(),
            Self::Kube { .. } => "kube",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingField(_) => "missing_field",
        }
    }

    /// Wraps a Kubernetes error with the operation that failed.
    pub(crate) fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { op, source }
    }
}

/// An error and its causes as one line, `outer: cause: root`, in each one's own words (Display,
/// never Debug); a cause whose text its parent already includes is not repeated.
#[must_use]
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, failure_labels};
    use crate::registry;

    #[test]
    fn every_root_cause_label_is_in_the_bounded_set_and_starts_at_zero() {
        let errors = [
            Error::from(registry::Error::Timeout {
                op: "txn",
                after: std::time::Duration::ZERO,
            }),
            Error::from(registry::Error::OwnershipLost { target: "t".into() }),
            Error::from(registry::Error::Fenced { op: "txn" }),
            Error::from(registry::Error::Unreachable { backend: "memory" }),
            Error::InvalidSpec(SpecError::PortRange(0)),
            Error::MissingField("metadata.uid"),
        ];
        for error in &errors {
            assert!(
                failure_labels().any(|label| label == error.metric_label()),
                "{error}: {}",
                error.metric_label()
            );
        }
        let page = Metrics::default().encode();
        for label in failure_labels() {
            let series = format!("grpc_registrar_reconcile_failures_total{{error=\"{label}\"}} 0");
            assert!(page.contains(&series), "{series} missing:\n{page}");
        }
    }
}
