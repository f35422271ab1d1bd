//! Resolve and load-balance [tonic] channels from an etcd service registry.
//!
//! The registry layout is etcd's gRPC naming contract, `<target>/<addr>` keys whose values are
//! either etcd naming JSON or a bare address, as written by grpc-registrar or by Go's
//! `go.etcd.io/etcd/client/v3/naming/endpoints`.
//!
//! # Layout
//! - [`format`]: the wire contract. Keys, prefixes, and the parsing and rendering of both value
//!   formats. grpc-registrar writes with it, and the resolver reads with it.
#![warn(missing_docs)]

pub mod format;

pub use format::{Endpoint, FormatError, ValueFormat};
