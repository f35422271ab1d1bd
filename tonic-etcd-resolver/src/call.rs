//! Call tracking for the policies that need it: RPCs in flight per endpoint (least-loaded) and
//! each RPC's outcome (outlier ejection).
//!
//! An RPC counts as in flight from the moment it is sent until its response body reaches its
//! end or is dropped, so a server stream or a slow body counts for as long as it is open, not
//! only until the headers arrive. Its outcome is the `grpc-status` of its trailers (or of its
//! headers, for a trailers-only response); a transport error, a non-200 HTTP status or a body
//! that ends without a status is a failure; a body dropped before its end counts neither way.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use tonic::Code;
use tonic::body::Body;

use crate::pool::{Pool, Ready};

/// One RPC in flight to one endpoint.
pub(crate) struct Call {
    /// Weak, so an open stream does not keep the pool (and its member, health and probe tasks)
    /// alive after the resolver and its channels are gone.
    pool: Weak<Pool>,
    ready: Arc<Ready>,
    /// The in-flight count was given back (the body ended).
    released: bool,
    /// The outcome was recorded.
    recorded: bool,
}

impl Call {
    /// Counts an RPC to `ready` as in flight.
    pub(crate) fn start(pool: &Arc<Pool>, ready: Arc<Ready>) -> Self {
        ready.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            pool: Arc::downgrade(pool),
            ready,
            released: false,
            recorded: false,
        }
    }

    /// Records the outcome, once (nowhere, when the pool is gone).
    pub(crate) fn finish(&mut self, failed: bool) {
        if !self.recorded {
            self.recorded = true;
            if let Some(pool) = self.pool.upgrade() {
                pool.record(&self.ready, failed);
            }
        }
    }

    fn finish_with(&mut self, headers: &HeaderMap) {
        let Some(pool) = self.pool.upgrade() else {
            self.recorded = true;
            return;
        };
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i32>().ok())
            .map(Code::from_i32);
        let failed = match (code, &pool.options().outlier) {
            (None, _) => true,
            (Some(code), Some(config)) => config.is_failure(code),
            (Some(_), None) => false,
        };
        drop(pool);
        self.finish(failed);
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            self.ready.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wraps a response so the call ends with its body.
    pub(crate) fn response(mut self, response: http::Response<Body>) -> http::Response<Body> {
        if response.status() != http::StatusCode::OK {
            self.finish(true);
        } else if response.headers().contains_key("grpc-status") {
            // Trailers-only: the status is already here.
            self.finish_with(response.headers());
        }
        response.map(|inner| Body::new(Tracked { inner, call: self }))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.release();
    }
}

/// A response body that ends its [`Call`].
struct Tracked {
    inner: Body,
    call: Call,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_frame(cx);
        match &result {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call.finish_with(trailers);
                    this.call.release();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.call.finish(true);
                this.call.release();
            }
            Poll::Ready(None) => {
                // The end, with no status seen: a protocol failure.
                this.call.finish(true);
                this.call.release();
            }
            Poll::Pending => {}
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
