//! How the resolver connects to backends, which policies pick among them, and how it behaves
//! with no endpoints.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tonic::transport::Endpoint as TonicEndpoint;

use crate::format::ValueFormat;
use crate::{Balance, Error, HealthCheck, OutlierDetection, ZonePreference};

type Configure = Arc<dyn Fn(TonicEndpoint) -> TonicEndpoint + Send + Sync>;

/// Settings applied to every backend connection, the load-balancing policies, and the
/// resolver's retry pacing.
///
/// The policies compose: health checks and outlier ejection take endpoints out, a zone
/// preference narrows the rest to the client's zone, and the [`Balance`] picks one.
///
/// ```
/// use std::time::Duration;
/// use tonic_etcd_resolver::Options;
///
/// let options = Options::default()
///     .connect_timeout(Duration::from_secs(1))
///     .timeout(Duration::from_secs(3))
///     .configure(|endpoint| endpoint.user_agent("my-app").unwrap());
///
/// // Least loaded, local zone first, failing backends ejected, NOT_SERVING ones skipped.
/// use tonic_etcd_resolver::{Balance, HealthCheck, OutlierDetection, ZonePreference};
/// let options = Options::default()
///     .balance(Balance::LeastLoaded)
///     .prefer_zone(ZonePreference::new("eu-west-1a"))
///     .outlier_detection(OutlierDetection::default())
///     .health_check(HealthCheck::watch("helloworld.Greeter"));
/// ```
#[derive(Clone)]
pub struct Options {
    /// Bound on establishing one backend connection (each endpoint is connected eagerly).
    pub(crate) connect_timeout: Duration,
    /// Per-request deadline, if any.
    pub(crate) timeout: Option<Duration>,
    /// HTTP/2 keep-alive ping interval and timeout, so a silently dead backend is noticed.
    pub(crate) keep_alive: Option<(Duration, Duration)>,
    /// Keep-alive pings on a connection with no RPC open too.
    pub(crate) keep_alive_while_idle: bool,
    /// Disable Nagle on backend sockets.
    pub(crate) tcp_nodelay: bool,
    /// TLS to backends.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<tonic::transport::ClientTlsConfig>,
    /// A final hook over each backend's `Endpoint`.
    pub(crate) configure: Option<Configure>,
    /// `None`: fail fast with `Unavailable` when no endpoint is up. `Some(d)`: wait up to `d`.
    pub(crate) wait_for_endpoints: Option<Duration>,
    /// First retry delay after an etcd or backend failure.
    pub(crate) retry_min: Duration,
    /// Largest retry delay.
    pub(crate) retry_max: Duration,
    /// `None`: detect each value's format. `Some(f)`: read only `f`, skipping other values.
    pub(crate) format: Option<ValueFormat>,
    /// How an endpoint is picked among the candidates.
    pub(crate) balance: Balance,
    /// Prefer endpoints in the client's zone.
    pub(crate) zone: Option<ZonePreference>,
    /// Eject endpoints that keep failing.
    pub(crate) outlier: Option<OutlierDetection>,
    /// Skip endpoints that report `NOT_SERVING`.
    pub(crate) health_check: Option<HealthCheck>,
    /// Connect to this many endpoints only (subsetting); `None` connects to all.
    pub(crate) subset: Option<usize>,
    /// The id that decides this client's subset; `None`: [`crate::policy::default_client_id`].
    pub(crate) client_id: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: None,
            keep_alive: Some((Duration::from_secs(300), Duration::from_secs(20))),
            keep_alive_while_idle: false,
            tcp_nodelay: true,
            #[cfg(feature = "tls")]
            tls: None,
            configure: None,
            wait_for_endpoints: None,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            format: None,
            balance: Balance::RoundRobin,
            zone: None,
            outlier: None,
            health_check: None,
            subset: None,
            client_id: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("keep_alive", &self.keep_alive)
            .field("keep_alive_while_idle", &self.keep_alive_while_idle)
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("configure", &self.configure.is_some())
            .field("wait_for_endpoints", &self.wait_for_endpoints)
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .field("format", &self.format)
            .field("balance", &self.balance)
            .field("zone", &self.zone)
            .field("outlier", &self.outlier)
            .field("health_check", &self.health_check)
            .field("subset", &self.subset)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// Bound on connecting to one backend (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline for each request (default none).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// HTTP/2 keep-alive: ping every `interval` while an RPC is open, drop the connection after
    /// `timeout` without an answer (default 300 s / 20 s). `None` disables it.
    ///
    /// The default keeps to what a grpc-go server accepts by default (its
    /// `keepalive.EnforcementPolicy`: at most one ping per 5 minutes, none while no RPC is open;
    /// more earns `GOAWAY too_many_pings` and a dropped connection, see gRPC's A8 proposal). A
    /// backend that vanishes without closing its connections leaves the registry as its pod
    /// does; set a shorter interval only for servers that permit it.
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: Option<(Duration, Duration)>) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Keep-alive pings on connections with no RPC open too (default false: grpc-go servers
    /// refuse them unless their enforcement policy sets `PermitWithoutStream`).
    #[must_use]
    pub fn keep_alive_while_idle(mut self, while_idle: bool) -> Self {
        self.keep_alive_while_idle = while_idle;
        self
    }

    /// Whether to set `TCP_NODELAY` on backend sockets (default true).
    #[must_use]
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.tcp_nodelay = enabled;
        self
    }

    /// TLS to every backend; endpoints are then dialled as `https://`.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[must_use]
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A hook applied last to each backend's [`tonic::transport::Endpoint`], for any setting
    /// not covered here.
    #[must_use]
    pub fn configure(
        mut self,
        f: impl Fn(TonicEndpoint) -> TonicEndpoint + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// With no endpoint up, wait up to `max` for one instead of failing fast.
    ///
    /// The default fails an RPC at once with `Unavailable`, as grpc-go does, so callers can
    /// retry or degrade. Waiting suits batch jobs started before their backends.
    #[must_use]
    pub fn wait_for_endpoints(mut self, max: Duration) -> Self {
        self.wait_for_endpoints = Some(max);
        self
    }

    /// Retry pacing after etcd or backend failures: exponential from `min` to `max`, jittered.
    #[must_use]
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// Reads every value as `format` only, turning format detection off.
    ///
    /// By default each value's format is detected from its shape ([`crate::format::detect`]),
    /// so one resolver reads grpc-registrar's, Go's `endpoints.Manager`'s, seed-era bare
    /// addresses and kratos' values alike. With a format set, values of any other shape count
    /// as malformed and are skipped with a warning.
    #[must_use]
    pub fn format(mut self, format: ValueFormat) -> Self {
        self.format = Some(format);
        self
    }

    /// How an RPC's endpoint is picked among the candidates (default [`Balance::RoundRobin`]).
    #[must_use]
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// Prefers endpoints whose `metadata.zone` is the client's, spilling over to other zones
    /// when too few are up (see [`ZonePreference`]).
    #[must_use]
    pub fn prefer_zone(mut self, zone: ZonePreference) -> Self {
        self.zone = Some(zone);
        self
    }

    /// Ejects endpoints whose RPCs keep failing, for a growing interval (see
    /// [`OutlierDetection`]).
    #[must_use]
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = Some(outlier);
        self
    }

    /// Asks each endpoint's `grpc.health.v1.Health` service and skips endpoints that report
    /// `NOT_SERVING` (see [`HealthCheck`]).
    #[must_use]
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health_check = Some(check);
        self
    }

    /// Connects to `n` of the registered endpoints only, not to all of them (default: all).
    ///
    /// With many clients and many servers, every client connecting to every server costs
    /// `clients × servers` HTTP/2 connections (2,000 pods and 500 clients: a million), each with
    /// its keep-alive pings and buffers. A subset caps a client at `n`. Turn it on when a
    /// client sees hundreds of endpoints or more; with a few dozen, connecting to all spreads
    /// load best and costs little.
    ///
    /// The subset is chosen by rendezvous hashing of [`Options::client_id`] with each address
    /// ([`crate::policy::Rendezvous`]): the same client id always gets the same subset, and an
    /// endpoint joining or leaving moves about `n / M` of a client's connections (`M`
    /// endpoints). The policies then apply within the subset; a zone preference counts the
    /// subset's local members for its spill-over threshold. It applies to
    /// [`crate::Resolver::channel`]: [`crate::Resolver::discover`] and
    /// [`crate::Resolver::balance_channel`] still list every endpoint.
    ///
    /// An endpoint that is down (its connection failed), reports `NOT_SERVING` or is ejected
    /// does not count: the subset refills from the next-ranked endpoints until `n` are usable,
    /// while the ones out keep being reconnected and take their place back when they recover. (So
    /// with most endpoints down, a client tries every registered one until `n` connect.)
    ///
    /// Clients choose independently (none knows the others), so the connections per endpoint
    /// vary as a binomial does: with 300 clients, 1,000 endpoints and `n = 20` (6 per endpoint
    /// on average), the busiest endpoint has about 2.3 times the average (the crate's `subset`
    /// bench). Whatever the scheme, when each client chooses alone the count per endpoint has
    /// the binomial's variance; schemes that balance exactly need a dense index per client
    /// (0, 1, 2, ...), which a Deployment's pods lack.
    /// The spread shrinks relative to the mean as `clients × n / endpoints` grows: size `n`
    /// accordingly, and balance by load ([`crate::Balance::LeastLoaded`]) within each subset.
    ///
    /// ```
    /// use tonic_etcd_resolver::Options;
    ///
    /// let options = Options::default().subset(20).client_id("checkout-7d9f8-x2x7q");
    /// ```
    #[must_use]
    pub fn subset(mut self, n: usize) -> Self {
        self.subset = Some(n.max(1));
        self
    }

    /// The id that decides this client's subset (see [`Options::subset`]).
    ///
    /// Default: `POD_NAME`, else `HOSTNAME`, else a random id
    /// ([`crate::policy::default_client_id`]). Give every client its own stable id: two
    /// clients with one id have one subset.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Parses one registry value as configured.
    pub(crate) fn parse(&self, value: &[u8]) -> Result<crate::Endpoint, crate::FormatError> {
        match self.format {
            Some(format) => format.codec().parse(value),
            None => crate::format::parse(value),
        }
    }

    pub(crate) fn backoff(&self) -> Box<dyn Iterator<Item = Duration> + Send> {
        let max = self.retry_max;
        let delays = ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
            .chain(std::iter::repeat(max));
        Box::new(delays)
    }

    pub(crate) fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "https";
        }
        "http"
    }

    /// The tonic endpoint for one backend address.
    ///
    /// # Errors
    /// [`Error::InvalidEndpoint`] when the address does not make a URI.
    pub fn endpoint(&self, addr: &str) -> Result<TonicEndpoint, Error> {
        let invalid = |source| Error::InvalidEndpoint {
            addr: addr.to_owned(),
            source,
        };
        let mut endpoint = TonicEndpoint::from_shared(format!("{}://{addr}", self.scheme()))
            .map_err(invalid)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(self.tcp_nodelay);
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some((interval, timeout)) = self.keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(self.keep_alive_while_idle);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(invalid)?;
        }
        if let Some(configure) = &self.configure {
            endpoint = configure(endpoint);
        }
        Ok(endpoint)
    }
}
