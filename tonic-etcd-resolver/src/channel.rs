//! [`LbChannel`]: a load-balanced, failure-aware channel usable by any tonic client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tower::{BoxError, ServiceExt};

use crate::call::Call;
use crate::pool::{Pool, Ready};

use crate::resolver::Guard;

/// A channel that balances RPCs over the endpoints that are up, by the policies chosen in
/// [`crate::Options`] (round-robin by default).
///
/// Pass it to a generated client (`GreeterClient::new(channel)`); clone it freely, clones share
/// connections. An endpoint whose connection fails is skipped until it connects again, even while
/// it is still registered. With no endpoint up, an RPC fails at once with `Unavailable`, unless
/// [`crate::Options::wait_for_endpoints`] was set.
///
/// A transport error on an RPC marks its endpoint down until it connects again; a deadline
/// (`Options::timeout` or a request's `grpc-timeout`) does not, since the connection is fine,
/// but counts as a failure for [`crate::OutlierDetection`].
///
/// The resolver keeps running while the [`crate::Resolver`] or any channel from it is alive.
#[derive(Clone)]
pub struct LbChannel {
    pub(crate) pool: Arc<Pool>,
    pub(crate) _guard: Arc<Guard>,
}

impl LbChannel {
    /// The next endpoint that is up. With none up, waits while some endpoint is still on its
    /// first connection attempt (bounded by the connect timeout), then fails fast with
    /// `Unavailable` unless `wait_for_endpoints` allows a longer wait.
    async fn pick(pool: &Pool) -> Result<Arc<Ready>, BoxError> {
        if let Some(ready) = pool.pick() {
            return Ok(ready);
        }
        let options = pool.options();
        let max = options
            .wait_for_endpoints
            .unwrap_or_default()
            .max(if pool.connecting() {
                options.connect_timeout
            } else {
                Duration::ZERO
            });
        let waiting_allowed = options.wait_for_endpoints.is_some();
        let wait = async {
            loop {
                let changed = pool.changed.notified();
                if let Some(ready) = pool.pick() {
                    return Some(ready);
                }
                if !waiting_allowed && !pool.connecting() {
                    return None;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(max, wait).await {
            Ok(Some(ready)) => Ok(ready),
            Ok(None) | Err(_) => Err(unavailable(pool.target(), pool.counts()).into()),
        }
    }
}

/// `Unavailable`, saying which of registered, reachable and serving failed.
fn unavailable(target: &str, counts: crate::pool::Counts) -> tonic::Status {
    tonic::Status::unavailable(no_endpoint_message(target, counts))
}

/// Why no endpoint can take an RPC: none registered (the servers, or the registrar, never
/// published one under the target, or the target is misspelt), none reachable (registered, but
/// connections are refused or time out), or none serving (connected, but health checks say
/// not serving, or every one is ejected as an outlier).
fn no_endpoint_message(target: &str, counts: crate::pool::Counts) -> String {
    let crate::pool::Counts {
        registered,
        connected,
    } = counts;
    let endpoints = |n: usize| format!("{n} endpoint{}", if n == 1 { "" } else { "s" });
    if registered == 0 {
        format!(
            "no endpoint of target {target:?} is registered: 0 endpoints under {target:?} in the registry (check the target name, and that its servers are published)"
        )
    } else if connected == 0 {
        format!(
            "no endpoint of target {target:?} is reachable: {} registered, all refusing or timing out connections",
            endpoints(registered)
        )
    } else {
        format!(
            "no endpoint of target {target:?} is serving: {} registered, {connected} connected, none serving (health checks failing, or ejected as outliers)",
            endpoints(registered)
        )
    }
}

/// Whether a channel error is a deadline (the backend is slow, its connection is fine).
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl tower::Service<http::Request<Body>> for LbChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call, when an endpoint is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move {
            let ready = Self::pick(&pool).await?;
            let mut call = pool
                .tracks_calls()
                .then(|| Call::start(&pool, ready.clone()));
            match ready.channel.clone().oneshot(request).await {
                Ok(response) => Ok(match call {
                    Some(call) => call.response(response),
                    None => response,
                }),
                Err(e) => {
                    // Transport-level failure (gRPC errors arrive as Ok responses). A deadline
                    // says the backend is slow, not that its connection is gone.
                    if !is_timeout(&e) {
                        ready.health.mark_down();
                    }
                    if let Some(call) = &mut call {
                        call.finish(true);
                    }
                    Err(e.into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Counts;

    #[test]
    fn the_unavailable_message_says_whether_nothing_is_registered_reachable_or_serving() {
        let message = |registered, connected| {
            no_endpoint_message(
                "services/shop/greeter",
                Counts {
                    registered,
                    connected,
                },
            )
        };
        let none = message(0, 0);
        assert!(
            none.contains("is registered: 0 endpoints under \"services/shop/greeter\""),
            "{none}"
        );
        let refusing = message(3, 0);
        assert!(
            refusing.contains("is reachable: 3 endpoints registered, all refusing"),
            "{refusing}"
        );
        assert!(message(1, 0).contains("1 endpoint registered"));
        let unhealthy = message(3, 2);
        assert!(
            unhealthy.contains("is serving: 3 endpoints registered, 2 connected, none serving"),
            "{unhealthy}"
        );
    }
}
