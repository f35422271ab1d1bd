//! Load-balancing policies, chosen in [`crate::Options`]: which endpoints are candidates (health,
//! outlier ejection, zone) and which candidate an RPC goes to (round-robin, weighted, least
//! loaded).
//!
//! Each step is a pure function over plain data, unit-tested here; [`crate::LbChannel`] wires
//! them to live endpoints.
//!
//! # Layout
//! - `weighted`: weights from metadata ([`parse_weight`]) and smooth weighted round-robin.
//! - `p2c`: least-loaded power-of-two-choices.
//! - `zone`: [`ZonePreference`], with spill-over.
//! - `outlier`: [`OutlierDetection`], by consecutive failures or failure rate.
//! - `health`: [`HealthCheck`], active `grpc.health.v1` checks.
//! - `subset`: subsetting by rendezvous hashing ([`Rendezvous`]), for [`crate::Options::subset`].

pub(crate) mod health;
pub(crate) mod outlier;
pub(crate) mod p2c;
pub(crate) mod subset;
pub(crate) mod weighted;
pub(crate) mod zone;

pub use health::{HealthCheck, HealthCheckMode};
pub use outlier::OutlierDetection;
pub use subset::{CLIENT_ID_ENVS, Rendezvous, default_client_id};
pub use weighted::{DEFAULT_WEIGHT, InvalidWeight, MAX_WEIGHT, parse_weight};
pub use zone::{ZONE_ENV, ZonePreference};

/// How an RPC's endpoint is chosen among the candidates.
///
/// Candidates are the endpoints that are connected, not marked `NOT_SERVING` by a
/// [`HealthCheck`], not ejected by [`OutlierDetection`] and, with a [`ZonePreference`], in the
/// client's zone unless it spills over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Balance {
    /// Each candidate in turn (the default). Cheapest; even when backends are alike.
    #[default]
    RoundRobin,
    /// Smooth weighted round-robin (nginx's algorithm) by each endpoint's `metadata.weight`
    /// ([`parse_weight`]): an endpoint of weight 200 gets twice the calls of one of weight 100,
    /// interleaved rather than in bursts.
    Weighted,
    /// Least loaded of two random candidates (power of two choices), by the RPCs the channel
    /// has in flight to each, divided by its weight.
    ///
    /// The channel counts in-flight RPCs itself (tonic reports no load): an RPC counts from
    /// the moment it is sent until its response body ends or is dropped, so a server stream
    /// counts while it is open.
    LeastLoaded,
}
