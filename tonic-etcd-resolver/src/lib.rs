//! Resolve and load-balance [tonic] channels from an etcd service registry.
//!
//! The registry layout is etcd's gRPC naming contract: keys under `<target>/` whose values are
//! etcd naming JSON, a bare address or a kratos instance, as written by grpc-registrar, Go's
//! `go.etcd.io/etcd/client/v3/naming/endpoints`, seed-era servers or go-kratos.
//!
//! ```no_run
//! use tonic_etcd_resolver::{Options, Resolver};
//! # mod pb { pub mod greeter_client { pub struct GreeterClient<T>(T);
//! #   impl<T> GreeterClient<T> { pub fn new(t: T) -> Self { Self(t) } } } }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let resolver = Resolver::connect(
//!     ["http://etcd:2379"],
//!     "services/default/greeter",
//!     Options::default(),
//! )
//! .await?;
//! let client = pb::greeter_client::GreeterClient::new(resolver.channel());
//! # drop(client);
//! # Ok(()) }
//! ```
//!
//! What it does, and why it differs from the alternatives:
//! - **No lost updates.** A prefix Get, then a Watch from the next revision on `<target>/` (with
//!   the trailing slash, so `foo` never sees `foo_bar/...`).
//! - **Never gives up.** A compaction, cancelled watch or broken stream leads to a re-list, a
//!   diff and a new watch, with backoff. While etcd is unreachable the last known endpoints stay.
//! - **Applies changes while idle.** The endpoint set is updated by a background task, not when
//!   the next RPC happens to poll a discovery stream.
//! - **Skips dead backends.** Every endpoint holds a connection, called or not; one whose
//!   connection ends is not picked until it connects again, even while its key is still
//!   registered.
//! - **Fails fast when empty.** With no endpoint up an RPC fails with `Unavailable` at once, as
//!   grpc-go does; [`Options::wait_for_endpoints`] waits instead. The message says whether no
//!   endpoint is registered, none is reachable, or none is serving.
//!
//! - **Policies beyond round-robin.** Zone preference with spill-over, smooth weighted
//!   round-robin from `metadata.weight`, least-loaded power-of-two-choices on the RPCs it
//!   counts in flight itself, outlier ejection, and `grpc.health.v1` health checks; see
//!   [`Options`] and grpc-registrar's docs/resolver-policies.md.
//! - **Subsetting.** With [`Options::subset`], a client connects to `n` endpoints chosen by
//!   rendezvous hashing of its id, refilled from the rest when one is down, not serving or
//!   ejected, instead of to every endpoint.
//!
//! Targets are key prefixes (`services/default/greeter`); grpc-go's `etcd:///<prefix>` form is
//! accepted too. The crate re-exports [`etcd_client`], so [`Resolver::new`] callers need not
//! match its version by hand.
//!
//! # Layout
//! - [`format`](mod@format): the wire contract: keys, and one [`format::Codec`] per value format (etcd naming
//!   JSON, bare address, kratos); grpc-registrar writes with it.
//! - [`Resolver`]: the registry watch, snapshots, discovery stream.
//! - [`LbChannel`]: the load-balanced, failure-aware channel.
//! - [`Options`]: per-endpoint connection settings, policies and retry pacing.
//! - [`policy`]: the policies' settings ([`Balance`], [`ZonePreference`],
//!   [`OutlierDetection`], [`HealthCheck`]) and pure decision functions.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod call;
mod channel;
mod connector;
mod error;
pub mod format;
#[doc(hidden)]
pub mod internals;
mod options;
pub mod policy;
mod pool;
mod published;
mod resolver;
mod target;

pub use channel::LbChannel;
pub use error::{Error, Result};
pub use etcd_client;
pub use format::{Codec, Endpoint, FormatError, ValueFormat};
pub use options::Options;
pub use policy::{Balance, HealthCheck, HealthCheckMode, OutlierDetection, ZonePreference};
pub use resolver::{Resolver, Snapshot, Stats};
