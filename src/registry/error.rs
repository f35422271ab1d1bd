//! The registry's error type, separate from the controller's.

use std::time::Duration;

use crate::desired::SpecError;

/// Everything a registry backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed; `op` names it. The client error is described in the message
    /// (its own Display prints gRPC causes in Debug form), so it is not a `source`.
    #[error("failed to {op}: {}", describe(cause))]
    Etcd {
        /// The failed operation, e.g. `grant lease`.
        op: &'static str,
        /// The client error.
        cause: etcd_client::Error,
    },
    /// A Consul HTTP request failed or was refused; `op` names it, `addr` the agent asked.
    #[error("failed to {op} at {addr}: {cause}")]
    Consul {
        /// The failed operation, e.g. `write registry batch`.
        op: &'static str,
        /// The Consul address asked.
        addr: String,
        /// The HTTP status, when Consul answered.
        status: Option<u16>,
        /// What went wrong, in words.
        cause: String,
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
    /// The backend is known not to answer (its lease renewals go unanswered); nothing was sent.
    #[error(
        "{backend} is not answering (lease renewals unanswered); waiting for it to answer again"
    )]
    Unreachable {
        /// The backend's name.
        backend: &'static str,
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
            Self::Consul { .. } => "consul",
            Self::Timeout { .. } => "timeout",
            Self::OwnershipLost { .. } => "ownership_lost",
            Self::Fenced { .. } => "fenced",
            Self::Spec(_) => "invalid_spec",
            Self::Unreachable { .. } => "unreachable",
        }
    }

    /// Whether the backend answered (false when it could not be reached or did not answer in
    /// time), for the `backend_connected` gauge.
    #[must_use]
    pub fn reached_backend(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } => false,
            // A 5xx is Consul up but unable to serve (no leader, an RPC to the servers failed).
            Self::Consul { status, .. } => status.is_some_and(|s| s < 500),
            Self::Etcd { cause, .. } => match cause {
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => false,
                // Unimplemented: a gRPC server answered that is not etcd (`unknown service
                // etcdserverpb.KV`), so the registry itself was not reached.
                etcd_client::Error::GRpcStatus(s) => !matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Unimplemented
                ),
                _ => true,
            },
            _ => true,
        }
    }

    /// Wraps an etcd error with the operation that failed.
    pub(crate) fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |cause| Self::Etcd { op, cause }
    }
}

/// An etcd client error as one readable line: a gRPC status as its code and message followed by
/// its causes (`unavailable: tcp connect error: Connection refused (os error 111)`), other
/// errors in their own words.
#[must_use]
pub fn describe(error: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut out, mut source) = match error {
        etcd_client::Error::GRpcStatus(status) => {
            let code = match status.code() {
                tonic::Code::Unavailable => "etcd unavailable".to_owned(),
                tonic::Code::DeadlineExceeded => "deadline exceeded".to_owned(),
                tonic::Code::PermissionDenied => "permission denied".to_owned(),
                tonic::Code::Unauthenticated => "authentication failed".to_owned(),
                tonic::Code::Unimplemented => {
                    "the endpoint answered gRPC but is not etcd (check --etcd-endpoints)".to_owned()
                }
                code => format!("etcd answered {}", code.description()),
            };
            let mut out = code;
            if !status.message().is_empty() {
                out.push_str(": ");
                out.push_str(status.message());
            }
            (out, status.source())
        }
        etcd_client::Error::TransportError(e) => ("transport error".to_owned(), e.source()),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let text = cause.to_string();
        // tonic's transport error says only "transport error"; its cause says what happened.
        if !text.is_empty() && text != "transport error" && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn every_error() -> Vec<Error> {
        vec![
            Error::Etcd {
                op: "txn",
                cause: etcd_client::Error::InvalidArgs("x".into()),
            },
            Error::Consul {
                op: "read",
                addr: "http://consul:8500".into(),
                status: Some(500),
                cause: "no leader".into(),
            },
            Error::Timeout {
                op: "txn",
                after: Duration::from_secs(1),
            },
            Error::OwnershipLost { target: "t".into() },
            Error::Fenced { op: "txn" },
            Error::Unreachable { backend: "etcd" },
            Error::Spec(SpecError::PortRange(0)),
        ]
    }

    #[test]
    fn every_failure_label_is_a_zero_initialised_series() {
        for error in every_error() {
            assert!(
                crate::metrics::failure_labels().any(|label| label == error.metric_label()),
                "{} is not in failure_labels()",
                error.metric_label()
            );
        }
    }

    #[test]
    fn a_grpc_server_that_is_not_etcd_does_not_count_as_the_registry_answering() {
        let error = Error::Etcd {
            op: "read from etcd",
            cause: etcd_client::Error::GRpcStatus(tonic::Status::unimplemented(
                "unknown service etcdserverpb.KV",
            )),
        };
        assert!(!error.reached_backend());
        assert!(error.to_string().contains("is not etcd"), "{error}");
        let refused = Error::Etcd {
            op: "read from etcd",
            cause: etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("no")),
        };
        assert!(refused.reached_backend(), "etcd answered, and refused");
    }
}
