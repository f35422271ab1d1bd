//! Active health checking with `grpc.health.v1`: a backend that reports `NOT_SERVING` gets no
//! RPCs until it reports `SERVING` again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

/// How each endpoint's health is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthCheckMode {
    /// A `Watch` stream per endpoint: changes apply as soon as the server sends them. A broken
    /// stream is reopened after the interval.
    Watch,
    /// A `Check` every interval (the period runs from one check's start to the next, so a slow
    /// answer does not stretch it), each bounded by the interval: a change applies within one
    /// interval and the check's round trip.
    Poll,
}

/// Active health checking with the `grpc.health.v1.Health` service (tonic-health on the
/// server side).
///
/// An endpoint whose status for `service` is `NOT_SERVING` (or `SERVICE_UNKNOWN`, which is
/// also what a `NOT_FOUND` error means: tonic-health's answer for a service it does not know,
/// logged once per endpoint) is not picked until it reports `SERVING`. An endpoint starts out serving, so the first RPCs do not
/// wait for the first answer. A server with no health service (`UNIMPLEMENTED`) is treated as
/// serving and not asked again, as grpc-go does; any other failed check leaves the last known
/// status, since a dead connection is already noticed and skipped. If no endpoint is serving,
/// an RPC fails with `Unavailable` (or waits, with [`crate::Options::wait_for_endpoints`]).
///
/// ```
/// use std::time::Duration;
/// use tonic_etcd_resolver::{HealthCheck, Options};
///
/// let watch = Options::default().health_check(HealthCheck::watch("helloworld.Greeter"));
/// let poll = Options::default()
///     .health_check(HealthCheck::poll("", Duration::from_secs(2))); // "": the whole server
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct HealthCheck {
    /// The service name asked about; empty for the server as a whole.
    pub(crate) service: String,
    /// Watch or poll.
    pub(crate) mode: HealthCheckMode,
    /// Poll period, and the delay before reopening a broken watch.
    pub(crate) interval: Duration,
}

impl HealthCheck {
    /// Watches `service`'s status on each endpoint (reopening a broken stream after 1 s).
    pub fn watch(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            mode: HealthCheckMode::Watch,
            interval: Duration::from_secs(1),
        }
    }

    /// Checks `service`'s status on each endpoint every `interval`.
    pub fn poll(service: impl Into<String>, interval: Duration) -> Self {
        Self {
            service: service.into(),
            mode: HealthCheckMode::Poll,
            interval: interval.max(Duration::from_millis(10)),
        }
    }

    /// The poll period, or the delay before reopening a broken watch.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }
}

/// Whether a health answer means the endpoint may be picked.
pub(crate) fn serving(status: i32) -> bool {
    status == ServingStatus::Serving as i32
}

/// What one answer or failure means.
enum Answer {
    Status(bool),
    /// No health service: serving, and stop asking.
    Unimplemented,
    /// The server does not know the service (`NOT_FOUND`): `SERVICE_UNKNOWN`, not serving.
    UnknownService,
    /// Keep the last status and ask again later.
    Failed(String),
}

fn answer(result: Result<i32, tonic::Status>) -> Answer {
    match result {
        Ok(status) => Answer::Status(serving(status)),
        Err(status) if status.code() == Code::Unimplemented => Answer::Unimplemented,
        Err(status) if status.code() == Code::NotFound => Answer::UnknownService,
        Err(status) => Answer::Failed(status.to_string()),
    }
}

/// Keeps `flag` equal to whether the endpoint at `addr` is serving, calling `changed` on each
/// change. Runs until aborted (or the server turns out to have no health service).
pub(crate) async fn run(
    config: HealthCheck,
    addr: Arc<str>,
    channel: Channel,
    flag: Arc<AtomicBool>,
    changed: impl Fn(),
) {
    let addr = &*addr;
    let mut client = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: config.service.clone(),
    };
    let set = |serving: bool| {
        if flag.swap(serving, Ordering::AcqRel) != serving {
            if serving {
                info!(addr, service = config.service, "endpoint serving again");
            } else {
                warn!(
                    addr,
                    service = config.service,
                    "endpoint not serving; not picked"
                );
            }
            changed();
        }
    };
    let warned_unknown = AtomicBool::new(false);
    let unknown = || {
        if !warned_unknown.swap(true, Ordering::Relaxed) {
            warn!(
                addr,
                service = config.service,
                "endpoint does not know the health-checked service; not picked"
            );
        }
        set(false);
    };
    // Periods run from one check's start to the next; a late one delays the rest rather than
    // bunching them up.
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if config.mode == HealthCheckMode::Poll {
            ticker.tick().await;
        }
        let failure = match config.mode {
            HealthCheckMode::Poll => {
                let check = tokio::time::timeout(config.interval, client.check(request())).await;
                match check {
                    Ok(result) => match answer(result.map(|r| r.into_inner().status)) {
                        Answer::Status(serving) => {
                            set(serving);
                            None
                        }
                        Answer::Unimplemented => break,
                        Answer::UnknownService => {
                            unknown();
                            None
                        }
                        Answer::Failed(error) => Some(error),
                    },
                    Err(_) => Some("health check timed out".to_owned()),
                }
            }
            HealthCheckMode::Watch => match client.watch(request()).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(message)) => set(serving(message.status)),
                            Ok(None) => break Some("health watch ended".to_owned()),
                            Err(status) => match answer(Err(status)) {
                                Answer::Unimplemented => return set_unimplemented(addr, &set),
                                Answer::UnknownService => {
                                    unknown();
                                    break None;
                                }
                                Answer::Failed(error) => break Some(error),
                                Answer::Status(_) => break None,
                            },
                        }
                    }
                }
                Err(status) => match answer(Err(status)) {
                    Answer::Unimplemented => break,
                    Answer::UnknownService => {
                        unknown();
                        None
                    }
                    Answer::Failed(error) => Some(error),
                    Answer::Status(_) => None,
                },
            },
        };
        if let Some(error) = failure {
            debug!(addr, error, "health check failed; keeping the last status");
        }
        if config.mode == HealthCheckMode::Watch {
            tokio::time::sleep(config.interval).await;
        }
    }
    set_unimplemented(addr, &set);
}

fn set_unimplemented(addr: &str, set: &impl Fn(bool)) {
    info!(addr, "endpoint has no health service; treated as serving");
    set(true);
}
