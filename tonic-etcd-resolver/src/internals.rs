//! Not part of the API: hooks for the crate's own benches, which may change in any release.

use std::sync::Arc;

use crate::pool::{Meta, Pool};
use crate::{Options, Result};

/// A pool whose endpoints are all up, with channels that open no socket, so that the pick
/// alone can be timed.
pub struct PickBench {
    /// The pool picked from.
    pool: Arc<Pool>,
}

impl PickBench {
    /// A pool with `endpoints` (address, zone, weight) up. Call it inside a Tokio runtime (each
    /// lazy channel spawns its buffer task).
    ///
    /// # Errors
    /// When an address does not make a URI.
    pub fn new<'a>(
        options: Options,
        endpoints: impl IntoIterator<Item = (&'a str, Option<&'a str>, u32)>,
    ) -> Result<Self> {
        let pool = Pool::new("bench", options);
        for (addr, zone, weight) in endpoints {
            let meta = Meta {
                zone: zone.map(Arc::from),
                weight,
            };
            pool.insert_unconnected(addr, meta)?;
        }
        pool.set_registered_local_for_bench();
        Ok(Self { pool })
    }

    /// Picks one endpoint as an RPC would, and drops it; false when none was picked.
    #[must_use]
    pub fn pick(&self) -> bool {
        self.pool.pick().is_some()
    }
}

/// How many endpoints `resolver` can pick from now (connected), without copying their
/// addresses as [`crate::Resolver::ready_endpoints`] does: cheap enough to poll in a loop.
#[must_use]
pub fn ready_count(resolver: &crate::Resolver) -> usize {
    resolver.ready_count()
}
