//! The controller's one retry pacing: exponential with jitter, on backon, usable as kube's
//! [`Backoff`](kube::runtime::utils::Backoff) for watches and as a plain iterator elsewhere.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential delays from `min` doubling to `max`, jittered so replicas do not retry in
/// lockstep, never ending, and never longer than `max`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays from `min` doubling to `max`.
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = Self::builder(min, max);
        Self {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// A failed watch: 250 ms doubling to 4 s. kube's default climbs to 30 s, which after an API
    /// server outage can leave the registry stale for half a minute; this controller is on the
    /// RPC path, so it re-lists sooner (a watch error is rare, so the extra load is small).
    #[must_use]
    pub fn watch() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(4))
    }

    /// A failed reconcile: 200 ms doubling to 60 s, per service.
    #[must_use]
    pub fn reconcile() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(60))
    }

    /// The backon builder behind [`Backoff::new`], for `backon::Retryable`.
    #[must_use]
    pub fn builder(min: Duration, max: Duration) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // backon's jitter adds up to the delay again; the cap holds regardless.
        Some(self.current.next().unwrap_or(self.max).min(self.max))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff as _;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next().unwrap();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(250));
        let later: Vec<Duration> = b.by_ref().take(20).collect();
        assert!(
            later.iter().all(|d| *d <= Duration::from_secs(2)),
            "{later:?}"
        );
        assert!(later.last().unwrap() >= &Duration::from_secs(1));
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(250));
    }
}
