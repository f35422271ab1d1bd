//! grpc-registrar: a Kubernetes controller that publishes ready pods in a gRPC service registry.
//!
//! # Layout
//! - [`crd`]: the `GrpcService` custom resource.
//! - [`source`]: endpoint sources (pods) turned into source-neutral candidates, and the indexes
//!   (candidates by namespace and label, selectors by requirement) that keep each event's cost to
//!   what it touches.
//! - [`desired`]: the pure decision logic, a validated spec plus candidates in, logical endpoints
//!   out; [`desired::layout`] renders them as etcd keys and values.
//! - [`registry`]: the backend seam ([`registry::Backend`]) and its implementations: etcd
//!   (ownership, the shared lease, txn-batched diffs, the fence) and in-memory (for tests).
//! - [`controller`]: the kube-runtime reconciler that joins them, and the watches feeding the
//!   indexes.
//! - [`leader`]: leader election on a Kubernetes Lease, fenced in the registry.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`backoff`]: the one retry pacing, also kube's watch `Backoff`.
//! - [`run`](mod@run): the whole controller process, from its configuration; `main` only parses
//!   flags and listens for signals.
//!
//! Dependencies point one way: `controller` → `leader` → `registry` → `desired` → `source`;
//! `metrics` and `backoff` depend on nothing here.

pub mod backoff;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod error;
pub mod http;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod run;
pub mod source;

#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};
