//! The example Greeter service, and a real tonic server for it that names itself in every reply.
//!
//! # Layout
//! - [`pb`]: generated code for `proto/helloworld.proto`.
//! - [`GreeterServer`]: a running server on a loopback address, stopped on drop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Generated messages, client and server.
#[allow(missing_docs, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("helloworld");
}

use pb::greeter_server::{Greeter, GreeterServer as Service};
use pb::{HelloReply, HelloRequest};

/// Replies with the server's own address and counts calls.
#[derive(Clone)]
struct Named {
    addr: String,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Greeter for Named {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(HelloReply {
            message: format!("Hello {}!", request.into_inner().name),
            server: self.addr.clone(),
        }))
    }
}

/// A Greeter server running in-process on a runtime of its own, so that killing it drops every
/// connection at once, as a crashed process would. It stops when dropped.
pub struct GreeterServer {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GreeterServer {
    /// Serves on `addr` (use port 0 for a free port).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::serve(addr, tonic::transport::Server::builder()).await
    }

    /// Serves over TLS with `identity` (PEM certificate and key).
    ///
    /// # Errors
    /// When the address cannot be bound or the identity is unusable.
    #[cfg(feature = "tls")]
    pub async fn start_tls(
        addr: SocketAddr,
        identity: tonic::transport::Identity,
    ) -> std::io::Result<Self> {
        let builder = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(std::io::Error::other)?;
        Self::serve(addr, builder).await
    }

    async fn serve(
        addr: SocketAddr,
        mut builder: tonic::transport::Server,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("greeter")
            .enable_all()
            .build()?;
        let listener = runtime
            .spawn(async move { TcpListener::bind(addr).await })
            .await
            .map_err(std::io::Error::other)??;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let service = Service::new(Named {
            addr: addr.to_string(),
            calls: calls.clone(),
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        runtime.spawn(async move {
            let _ = builder
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            addr,
            calls,
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls served so far.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Kills the server at once, as a crashed process would: open connections are reset.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for GreeterServer {
    fn drop(&mut self) {
        self.kill();
    }
}
