//! Outlier ejection: an endpoint that keeps failing is taken out of rotation for a while, for
//! longer each time, with a cap on how many are out at once.

use std::time::Duration;

use tonic::Code;

/// Ejects endpoints whose RPCs fail, as Envoy's outlier detection does.
///
/// **What fails.** A transport error (connection refused or reset, the channel's deadline from
/// `Options::timeout` or a request's `grpc-timeout`), a non-200 HTTP status, a response with no
/// `grpc-status`, and by default the gRPC codes `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`,
/// `UNKNOWN` and `DATA_LOSS`: codes that say the server, not the request, is at fault
/// ([`OutlierDetection::failure_codes`] changes them). Every other code is a success. An RPC
/// cancelled by the client (its response dropped before the end) counts neither way.
///
/// **When.** `consecutive_failures` (default 5) in a row, or, with at least
/// `min_requests` (default 20) RPCs in the current `interval` (default 10 s), a failure share of
/// `failure_rate` (default 0.5) or more.
///
/// **For how long.** `base_ejection` (default 30 s) times the number of times it has been
/// ejected, capped at `max_ejection` (default 300 s). The count goes down by one for each
/// `interval` the endpoint then serves without ejection.
///
/// **Never too many.** At most `max_ejection_percent` (default 50) of the connected endpoints
/// are ejected at once, rounded down but at least one, and never the last one: with one
/// endpoint nothing is ejected. If the endpoints not ejected all go down, the ejected ones are
/// used rather than failing.
///
/// ```
/// use std::time::Duration;
/// use tonic_etcd_resolver::{OutlierDetection, Options};
///
/// let options = Options::default().outlier_detection(
///     OutlierDetection::default()
///         .consecutive_failures(3)
///         .base_ejection(Duration::from_secs(10)),
/// );
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct OutlierDetection {
    /// Failures in a row that eject.
    pub(crate) consecutive_failures: u32,
    /// Failure share that ejects, with enough requests in the window; `None` disables it.
    pub(crate) failure_rate: Option<f64>,
    /// Requests needed in the window before the rate counts.
    pub(crate) min_requests: u32,
    /// The failure-rate window, and the ejection count's decay period.
    pub(crate) interval: Duration,
    /// First ejection's length; the n-th lasts n times this.
    pub(crate) base_ejection: Duration,
    /// Longest ejection.
    pub(crate) max_ejection: Duration,
    /// Largest share of endpoints ejected at once, in percent.
    pub(crate) max_ejection_percent: u8,
    /// gRPC codes counted as failures.
    pub(crate) failure_codes: Vec<Code>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: Some(0.5),
            min_requests: 20,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            failure_codes: vec![
                Code::Unavailable,
                Code::DeadlineExceeded,
                Code::Internal,
                Code::Unknown,
                Code::DataLoss,
            ],
        }
    }
}

impl OutlierDetection {
    /// Eject after `n` failures in a row (default 5; 0 counts as 1).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n.max(1);
        self
    }

    /// Eject when at least `rate` of the RPCs in the window failed, once it holds
    /// `min_requests` (default 0.5 and 20). `None` turns the rate check off.
    pub fn failure_rate(mut self, rate: Option<f64>, min_requests: u32) -> Self {
        self.failure_rate = rate.filter(|r| !r.is_nan()).map(|r| r.clamp(0.0, 1.0));
        self.min_requests = min_requests.max(1);
        self
    }

    /// The failure-rate window and ejection-count decay period (default 10 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The first ejection's length (default 30 s); the n-th lasts n times this.
    pub fn base_ejection(mut self, base: Duration) -> Self {
        self.base_ejection = base;
        self
    }

    /// The longest ejection (default 300 s).
    pub fn max_ejection(mut self, max: Duration) -> Self {
        self.max_ejection = max;
        self
    }

    /// The largest share of endpoints ejected at once, in percent (default 50, at most 100).
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent.min(100);
        self
    }

    /// The gRPC codes counted as failures (transport errors always are).
    pub fn failure_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.failure_codes = codes.into_iter().collect();
        self
    }

    /// Whether an RPC that ended with `code` failed.
    pub(crate) fn is_failure(&self, code: Code) -> bool {
        self.failure_codes.contains(&code)
    }
}

/// The length of an endpoint's `n`-th ejection: `base * n`, capped at `max`.
pub(crate) fn ejection_duration(base: Duration, max: Duration, n: u32) -> Duration {
    base.saturating_mul(n.max(1)).min(max)
}

/// How many of `n` endpoints may be ejected at once: `percent` of them rounded down, at least
/// one, and never all of them.
pub(crate) fn max_ejected(percent: u8, n: usize) -> usize {
    let by_percent = n * usize::from(percent) / 100;
    by_percent.max(1).min(n.saturating_sub(1))
}

/// One endpoint's failure record. Times are offsets from the pool's start.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    /// Failures since the last success.
    consecutive: u32,
    /// When the current window started.
    window_start: Duration,
    /// RPCs ended in the window.
    requests: u32,
    /// Failed RPCs ended in the window.
    failures: u32,
    /// Ejections so far, decayed by one per interval served without ejection.
    pub(crate) ejections: u32,
    /// The end of the current ejection, if any.
    pub(crate) ejected_until: Option<Duration>,
    /// Where the interval now running towards the next decay began: the last ejection's end,
    /// or the last decay.
    decay_from: Duration,
}

impl OutlierState {
    /// Takes one off the ejection count for each whole `interval` served without ejection
    /// since the last ejection ended (or the last decay), as Envoy's interval timer does.
    fn decay(&mut self, config: &OutlierDetection, now: Duration) {
        if self.ejected_until.is_some_and(|until| until > now) {
            return;
        }
        let start = self.decay_from.max(self.ejected_until.unwrap_or_default());
        let whole = now.saturating_sub(start).as_nanos() / config.interval.as_nanos().max(1);
        let whole = u32::try_from(whole).unwrap_or(u32::MAX);
        self.ejections = self.ejections.saturating_sub(whole);
        self.decay_from = start + config.interval.saturating_mul(whole);
    }

    /// Records one RPC outcome at `now`; returns whether the endpoint should now be ejected.
    pub(crate) fn record(
        &mut self,
        config: &OutlierDetection,
        now: Duration,
        failed: bool,
    ) -> bool {
        self.decay(config, now);
        if now.saturating_sub(self.window_start) >= config.interval {
            self.window_start = now;
            self.requests = 0;
            self.failures = 0;
        }
        if self.ejected(now) {
            // A late answer from an ejected endpoint changes nothing.
            return false;
        }
        self.requests += 1;
        if failed {
            self.failures += 1;
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        let by_streak = self.consecutive >= config.consecutive_failures;
        let by_rate = config.failure_rate.is_some_and(|rate| {
            self.requests >= config.min_requests
                && f64::from(self.failures) >= rate * f64::from(self.requests)
        });
        failed && (by_streak || by_rate)
    }

    /// Whether an ejection is running at `now`.
    pub(crate) fn ejected(&self, now: Duration) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// Ejects the endpoint at `now` and returns for how long; `None`, changing nothing, while
    /// an ejection is already running (concurrent failures eject once).
    pub(crate) fn eject(&mut self, config: &OutlierDetection, now: Duration) -> Option<Duration> {
        if self.ejected(now) {
            return None;
        }
        self.decay(config, now);
        self.ejections = self.ejections.saturating_add(1);
        let length = ejection_duration(config.base_ejection, config.max_ejection, self.ejections);
        self.ejected_until = Some(now + length);
        self.decay_from = now + length;
        self.consecutive = 0;
        self.window_start = now;
        self.requests = 0;
        self.failures = 0;
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn each_ejection_lasts_longer_up_to_the_cap() {
        let lengths: Vec<u64> = (1..=5)
            .map(|n| ejection_duration(30 * S, 100 * S, n).as_secs())
            .collect();
        assert_eq!(lengths, [30, 60, 90, 100, 100]);
    }

    #[test]
    fn the_ejection_cap_allows_a_share_but_at_least_one_and_never_all() {
        assert_eq!(max_ejected(50, 10), 5);
        assert_eq!(max_ejected(10, 3), 1, "at least one");
        assert_eq!(max_ejected(100, 3), 2, "never all");
        assert_eq!(max_ejected(100, 1), 0, "never the last");
        assert_eq!(max_ejected(50, 0), 0);
    }

    #[test]
    fn consecutive_failures_trip_ejection_and_a_success_resets_the_streak() {
        let config = OutlierDetection::default()
            .consecutive_failures(3)
            .failure_rate(None, 1);
        let mut state = OutlierState::default();
        assert!(!state.record(&config, S, true));
        assert!(!state.record(&config, S, true));
        assert!(!state.record(&config, S, false), "a success resets");
        assert!(!state.record(&config, S, true));
        assert!(!state.record(&config, S, true));
        assert!(state.record(&config, S, true));
    }

    #[test]
    fn a_failure_rate_over_the_window_trips_ejection_once_enough_requests_are_seen() {
        let config = OutlierDetection::default()
            .consecutive_failures(100)
            .failure_rate(Some(0.5), 10);
        let mut state = OutlierState::default();
        for i in 0..10 {
            // Alternate: never two failures in a row, but half of them fail. Nine requests are
            // too few, and the tenth is a success, which never ejects.
            assert!(!state.record(&config, S, i % 2 == 0), "too early at {i}");
        }
        assert!(state.record(&config, S, true));
    }

    #[test]
    fn the_window_resets_so_old_failures_are_forgotten() {
        let config = OutlierDetection::default()
            .consecutive_failures(100)
            .failure_rate(Some(0.5), 4)
            .interval(10 * S);
        let mut state = OutlierState::default();
        for _ in 0..3 {
            state.record(&config, S, true);
        }
        // A new window: one failure among successes is below the rate.
        for _ in 0..3 {
            assert!(!state.record(&config, 12 * S, false));
        }
        assert!(!state.record(&config, 12 * S, true));
    }

    #[test]
    fn an_ejected_endpoint_ignores_late_answers_and_its_ejections_grow_then_decay() {
        let config = OutlierDetection::default()
            .consecutive_failures(1)
            .base_ejection(10 * S)
            .interval(20 * S);
        let mut state = OutlierState::default();
        assert!(state.record(&config, S, true));
        assert_eq!(state.eject(&config, S), Some(10 * S));
        assert!(!state.record(&config, 2 * S, true), "ejected: ignored");
        assert!(state.record(&config, 12 * S, true));
        assert_eq!(state.eject(&config, 12 * S), Some(20 * S));
        // Back at 32 s; a clean interval after it takes one ejection off.
        assert!(!state.record(&config, 33 * S, false));
        assert!(!state.record(&config, 60 * S, false));
        assert_eq!(state.ejections, 1);
    }

    #[test]
    fn ejecting_an_endpoint_already_ejected_changes_nothing() {
        let config = OutlierDetection::default().base_ejection(10 * S);
        let mut state = OutlierState::default();
        assert_eq!(state.eject(&config, S), Some(10 * S));
        for _ in 0..5 {
            assert_eq!(state.eject(&config, 2 * S), None);
        }
        assert_eq!((state.ejections, state.ejected_until), (1, Some(11 * S)));
    }

    #[test]
    fn the_ejection_count_drops_by_one_per_interval_served_without_ejection() {
        let config = OutlierDetection::default()
            .base_ejection(10 * S)
            .max_ejection(1000 * S)
            .interval(10 * S);
        let mut state = OutlierState::default();
        for n in 1..=4u32 {
            // Back to back: each ejection starts as the last one ends.
            let now = state.ejected_until.unwrap_or(S);
            assert_eq!(state.eject(&config, now), Some(10 * S * n));
        }
        // The fourth ends at 101 s. Failures do not stop the decay, only ejections do; three
        // whole intervals later (and no request in between) three are gone.
        assert!(!state.record(&config, 131 * S, true));
        assert_eq!(state.ejections, 1);
        // Part of an interval counts towards the next one.
        assert!(!state.record(&config, 135 * S, false));
        assert_eq!(state.ejections, 1);
        assert!(!state.record(&config, 141 * S, false));
        assert_eq!(state.ejections, 0);
        assert_eq!(state.eject(&config, 500 * S), Some(10 * S), "fully decayed");
    }
}
