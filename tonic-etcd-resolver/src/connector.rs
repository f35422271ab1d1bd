//! The backend connector: TCP sockets that report their end (EOF, a read/write error, or the
//! connection closing the socket) to the endpoint's health, so a dead backend is noticed before
//! an RPC has to fail on it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pool::Health;

/// Connects backends over TCP and marks the endpoint down when the socket ends.
#[derive(Clone)]
pub(crate) struct WatchedConnector {
    /// The endpoint told when the socket ends.
    pub(crate) health: Weak<Health>,
    /// `TCP_NODELAY` on the socket.
    pub(crate) nodelay: bool,
}

impl tower::Service<http::Uri> for WatchedConnector {
    type Response = TokioIo<WatchedStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "uri has no authority")
            })?;
            let stream = match TcpStream::connect(authority.as_str()).await {
                Ok(stream) => stream,
                Err(e) => {
                    if let Some(health) = this.health.upgrade() {
                        health.mark_down();
                    }
                    return Err(e);
                }
            };
            stream.set_nodelay(this.nodelay)?;
            Ok(TokioIo::new(WatchedStream {
                inner: stream,
                health: this.health,
            }))
        })
    }
}

/// A TCP stream that reports its end (EOF, an error, or being dropped) to the endpoint's health.
pub(crate) struct WatchedStream {
    inner: TcpStream,
    health: Weak<Health>,
}

/// The HTTP/2 connection drops its socket when it ends without reading EOF or an error: a
/// keep-alive ping unanswered in time, or a `GOAWAY` with no stream open. The endpoint is down
/// then too (each connection attempt has its own health, so a socket of an earlier attempt,
/// dropped late, marks only that attempt's).
impl Drop for WatchedStream {
    fn drop(&mut self) {
        self.ended();
    }
}

impl WatchedStream {
    fn ended(&self) {
        if let Some(health) = self.health.upgrade() {
            health.mark_down();
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => self.ended(),
            Poll::Ready(Err(_)) => self.ended(),
            _ => {}
        }
        result
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(_)) = &result {
            self.ended();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
