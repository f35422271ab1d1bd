//! Zone preference: endpoints in the client's zone first, the others when too few are up.

/// The environment variable [`ZonePreference::from_env`] reads the client's zone from.
pub const ZONE_ENV: &str = "GRPC_CLIENT_ZONE";

/// The unit [`ZonePreference::min_local_ratio`] is kept in.
const PER_MILLION: u64 = 1_000_000;

/// Prefer endpoints whose metadata `zone` is the client's zone.
///
/// grpc-registrar writes each endpoint's `metadata.zone` from its node's
/// `topology.kubernetes.io/zone` label (or its EndpointSlice's zone).
///
/// **Spill-over.** Local endpoints alone are candidates while enough of them are *up*
/// (connected, serving, not ejected): at least [`ZonePreference::min_local`] (default 1) and at
/// least [`ZonePreference::min_local_ratio`] (default 0.5) of the local endpoints registered.
/// Below that, every up endpoint of any zone is a candidate, local ones included, so the load a
/// lost zone leaves is spread instead of piled onto its survivors. An unknown zone (no endpoint
/// registered in it) therefore means no preference.
///
/// It composes with every [`crate::Balance`]: it narrows the candidates, then the balance picks.
///
/// ```
/// use tonic_etcd_resolver::{Options, ZonePreference};
///
/// let options = Options::default().prefer_zone(ZonePreference::new("eu-west-1a").min_local(2));
/// // Or from GRPC_CLIENT_ZONE, when it is set:
/// let options = match ZonePreference::from_env() {
///     Some(zone) => options.prefer_zone(zone),
///     None => options,
/// };
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct ZonePreference {
    /// The client's zone.
    pub(crate) zone: String,
    /// Fewest local endpoints up before spilling over.
    pub(crate) min_local: usize,
    /// Least share of the registered local endpoints up before spilling over, in parts per
    /// million: integers, so 0.28 of 25 is exactly 7, where `ceil(0.28 * 25.0)` is 8.
    pub(crate) min_local_per_million: u64,
}

impl ZonePreference {
    /// Prefers endpoints in `zone`.
    pub fn new(zone: impl Into<String>) -> Self {
        Self {
            zone: zone.into(),
            min_local: 1,
            min_local_per_million: PER_MILLION / 2,
        }
    }

    /// The client's zone from `GRPC_CLIENT_ZONE` ([`ZONE_ENV`]); `None` when it is unset or
    /// empty.
    #[must_use]
    pub fn from_env() -> Option<Self> {
        let zone = std::env::var(ZONE_ENV).ok()?;
        let zone = zone.trim();
        (!zone.is_empty()).then(|| Self::new(zone))
    }

    /// Spill over when fewer than `n` local endpoints are up (default 1; 0 counts as 1).
    pub fn min_local(mut self, n: usize) -> Self {
        self.min_local = n.max(1);
        self
    }

    /// Spill over when fewer than `ratio` of the registered local endpoints are up (default
    /// 0.5, clamped to 0..=1, kept to six decimal places).
    pub fn min_local_ratio(mut self, ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let per_million = (ratio * 1e6).round() as u64;
        self.min_local_per_million = per_million;
        self
    }

    /// The client's zone.
    #[must_use]
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// How many local endpoints must be up for local ones alone to be candidates.
    pub(crate) fn needed(&self, registered_local: usize) -> usize {
        let registered = u64::try_from(registered_local).unwrap_or(u64::MAX);
        let by_ratio = self
            .min_local_per_million
            .saturating_mul(registered)
            .div_ceil(PER_MILLION);
        self.min_local
            .max(usize::try_from(by_ratio).unwrap_or(usize::MAX))
    }

    /// Whether only local endpoints are candidates, with `local_up` of them up.
    pub(crate) fn keep_local(&self, local_up: usize, registered_local: usize) -> bool {
        local_up >= self.needed(registered_local)
    }

    /// Narrows `candidates` (all up) to local ones, unless too few are up.
    #[cfg(test)]
    fn filter<T>(
        &self,
        candidates: Vec<T>,
        is_local: impl Fn(&T) -> bool,
        registered_local: usize,
    ) -> Vec<T> {
        let local_up = candidates.iter().filter(|c| is_local(c)).count();
        if self.keep_local(local_up, registered_local) {
            candidates.into_iter().filter(|c| is_local(c)).collect()
        } else {
            candidates
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Candidates as (name, zone).
    fn filter(
        pref: &ZonePreference,
        up: &[(&'static str, &str)],
        registered_local: usize,
    ) -> Vec<&'static str> {
        pref.filter(up.to_vec(), |(_, z)| *z == pref.zone, registered_local)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn only_local_endpoints_are_candidates_while_enough_are_up() {
        let pref = ZonePreference::new("a");
        let up = [("a1", "a"), ("a2", "a"), ("b1", "b")];
        assert_eq!(filter(&pref, &up, 2), ["a1", "a2"]);
    }

    #[test]
    fn fewer_than_half_the_local_endpoints_up_spills_over_to_every_zone() {
        let pref = ZonePreference::new("a");
        let up = [("a1", "a"), ("b1", "b"), ("b2", "b")];
        // 1 of 3 registered local endpoints is up: below 0.5.
        assert_eq!(filter(&pref, &up, 3), ["a1", "b1", "b2"]);
        // 1 of 2 is up: exactly the ratio, so it stays local.
        assert_eq!(filter(&pref, &up, 2), ["a1"]);
    }

    #[test]
    fn min_local_spills_over_below_a_count() {
        let pref = ZonePreference::new("a").min_local(2).min_local_ratio(0.0);
        let up = [("a1", "a"), ("b1", "b")];
        assert_eq!(filter(&pref, &up, 1), ["a1", "b1"]);
    }

    #[test]
    fn the_spill_over_threshold_is_an_exact_ceiling_of_the_ratio() {
        // In f64, 0.28 * 25 is 7.000000000000001, whose ceiling is 8.
        for (ratio, registered, needed) in [
            (0.28, 25, 7),
            (0.28, 26, 8),
            (0.5, 3, 2),
            (0.5, 4, 2),
            (0.7, 10, 7),
            (0.07, 100, 7),
            (1.0, 9, 9),
            (0.0, 9, 1),
        ] {
            let pref = ZonePreference::new("a").min_local_ratio(ratio);
            assert_eq!(pref.needed(registered), needed, "{ratio} of {registered}");
        }
    }

    #[test]
    fn an_unknown_zone_means_no_preference() {
        let pref = ZonePreference::new("nowhere");
        let up = [("a1", "a"), ("b1", "b")];
        assert_eq!(filter(&pref, &up, 0), ["a1", "b1"]);
    }

    #[test]
    fn no_local_endpoint_up_spills_over_even_with_a_zero_ratio() {
        let pref = ZonePreference::new("a").min_local(0).min_local_ratio(0.0);
        assert_eq!(filter(&pref, &[("b1", "b")], 2), ["b1"]);
    }
}
