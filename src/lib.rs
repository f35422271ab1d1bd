//! grpc-registrar: a Kubernetes controller that publishes ready pods in an etcd gRPC registry.
//!
//! # Layout
//! - [`crd`]: the `GrpcService` custom resource.
//! - [`desired`]: the pure decision logic, a validated spec plus pods in, desired keys out.
//! - [`registry`]: etcd I/O. Ownership claims, the shared lease, and txn-batched diffs.
//! - [`controller`]: the kube-runtime reconciler that joins the two, and the pod cache.
//! - [`leader`]: leader election on a Kubernetes Lease, fenced in etcd.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/healthz` and `/readyz`.

pub mod controller;
pub mod crd;
pub mod desired;
mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod registry;

#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};
