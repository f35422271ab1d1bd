//! Shared by the policy tests and the bench: real tonic Greeter servers that can be made slow,
//! failing or `NOT_SERVING`, and registration with metadata in a real etcd.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use greeter::pb::greeter_server::{Greeter, GreeterServer};
use greeter::pb::{HelloReply, HelloRequest};
use test_support::EtcdServer;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The service name health checks ask about.
pub const SERVICE: &str = "helloworld.Greeter";

/// How a server behaves, changeable while it runs.
#[derive(Default)]
struct Behaviour {
    /// Added to every call.
    delay_ms: AtomicU64,
    /// Answer every call with `UNAVAILABLE`.
    failing: AtomicBool,
    /// Calls received.
    calls: AtomicU64,
}

#[derive(Clone)]
struct Named {
    addr: String,
    behaviour: Arc<Behaviour>,
}

#[tonic::async_trait]
impl Greeter for Named {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.behaviour.calls.fetch_add(1, Ordering::Relaxed);
        let delay = self.behaviour.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.behaviour.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("failing on purpose"));
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello {}!", request.into_inner().name),
            server: self.addr.clone(),
        }))
    }
}

/// A Greeter server on a loopback port and a runtime of its own (so killing it resets its
/// connections, as a crash would), with a `grpc.health.v1` service unless built without.
pub struct TestServer {
    addr: SocketAddr,
    behaviour: Arc<Behaviour>,
    health: Option<HealthReporter>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// A server with a health service reporting `SERVING` for [`SERVICE`] and `""`.
    pub async fn start() -> Self {
        Self::serve(true).await
    }

    /// A server with no health service at all.
    pub async fn without_health() -> Self {
        Self::serve(false).await
    }

    async fn serve(with_health: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-server")
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .spawn(async { TcpListener::bind("127.0.0.1:0").await })
            .await
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let behaviour = Arc::new(Behaviour::default());
        let greeter = GreeterServer::new(Named {
            addr: addr.to_string(),
            behaviour: behaviour.clone(),
        });
        let incoming = tokio_stream_from(listener);
        let (health, router) = if with_health {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status(SERVICE, ServingStatus::Serving)
                .await;
            (
                Some(reporter),
                tonic::transport::Server::builder()
                    .add_service(service)
                    .add_service(greeter),
            )
        } else {
            (
                None,
                tonic::transport::Server::builder().add_service(greeter),
            )
        };
        runtime.spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        Self {
            addr,
            behaviour,
            health,
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn calls(&self) -> u64 {
        self.behaviour.calls.load(Ordering::Relaxed)
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap();
        self.behaviour.delay_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_failing(&self, failing: bool) {
        self.behaviour.failing.store(failing, Ordering::Relaxed);
    }

    /// Reports [`SERVICE`] as serving or not.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health
            .as_ref()
            .expect("a server with a health service")
            .set_service_status(SERVICE, status)
            .await;
    }

    /// Kills the server at once: open connections are reset.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tokio_stream_from(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// Registers `addr` under `target` as etcd naming JSON with `metadata`.
pub async fn register(etcd: &EtcdServer, target: &str, addr: &str, metadata: serde_json::Value) {
    let endpoint = Endpoint::new(addr).with_metadata(metadata);
    etcd.client()
        .await
        .put(
            format::endpoint_key(target, addr),
            format::render(ValueFormat::EtcdNaming, &endpoint),
            None,
        )
        .await
        .unwrap();
}
