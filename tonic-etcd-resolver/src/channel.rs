//! [`LbChannel`]: a load-balanced, failure-aware channel usable by any tonic client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tower::{BoxError, ServiceExt};

use crate::pool::{Pool, Ready};
use crate::resolver::Guard;

/// A channel that round-robins RPCs over the endpoints that are up.
///
/// Pass it to a generated client (`GreeterClient::new(channel)`); clone it freely, clones share
/// connections. An endpoint whose connection fails is skipped until it answers again, even while
/// it is still registered. With no endpoint up, an RPC fails at once with `Unavailable`, unless
/// [`crate::Options::wait_for_endpoints`] was set.
///
/// The resolver keeps running while the [`crate::Resolver`] or any channel from it is alive.
#[derive(Clone)]
pub struct LbChannel {
    pub(crate) pool: Arc<Pool>,
    pub(crate) _guard: Arc<Guard>,
}

impl LbChannel {
    async fn pick(pool: &Pool) -> Result<Ready, BoxError> {
        if let Some(ready) = pool.pick() {
            return Ok(ready);
        }
        let Some(max) = pool.options().wait_for_endpoints else {
            return Err(unavailable().into());
        };
        let wait = async {
            loop {
                let changed = pool.changed.notified();
                if let Some(ready) = pool.pick() {
                    return ready;
                }
                changed.await;
            }
        };
        tokio::time::timeout(max, wait)
            .await
            .map_err(|_| -> BoxError { unavailable().into() })
    }
}

fn unavailable() -> tonic::Status {
    tonic::Status::unavailable("no endpoint is registered and reachable")
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
            match ready.channel.oneshot(request).await {
                Ok(response) => Ok(response),
                Err(e) => {
                    // Transport-level failure (gRPC errors arrive as Ok responses).
                    ready.health.mark_down();
                    Err(e.into())
                }
            }
        })
    }
}
