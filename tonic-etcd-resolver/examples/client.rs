//! Resolve `services/default/greeter` from etcd and call `helloworld.Greeter/SayHello` on it, as
//! grpc-registrar's demo registers it.
//!
//! `cargo run --example client -- http://127.0.0.1:2379 services/default/greeter`
//!
//! It needs only crates.io dependencies, so it builds from the published crate. The two
//! messages are written out by hand to keep it self-contained; a real client generates them
//! and the client stub from the `.proto` with `tonic-prost-build` (see the README's quick
//! start).

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic_etcd_resolver::{
    Balance, LbChannel, Options, OutlierDetection, Resolver, ZonePreference,
};

/// `helloworld.HelloRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

/// `helloworld.HelloReply`: the greeting and the server that answered.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(string, tag = "2")]
    server: String,
}

/// What the generated `GreeterClient::say_hello` does.
async fn say_hello(
    channel: LbChannel,
    name: String,
) -> Result<HelloReply, Box<dyn std::error::Error>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::from_static("/helloworld.Greeter/SayHello");
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let reply = grpc
        .unary(tonic::Request::new(HelloRequest { name }), path, codec)
        .await?;
    Ok(reply.into_inner())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let etcd = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let target = args
        .next()
        .unwrap_or_else(|| "services/default/greeter".into());

    // Least loaded, failing backends ejected, and this zone first when GRPC_CLIENT_ZONE is set.
    let mut options = Options::default()
        .timeout(Duration::from_secs(5))
        .balance(Balance::LeastLoaded)
        .outlier_detection(OutlierDetection::default());
    if let Some(zone) = ZonePreference::from_env() {
        options = options.prefer_zone(zone);
    }
    let resolver = Resolver::connect([etcd], target, options).await?;
    for i in 0..6 {
        let reply = say_hello(resolver.channel(), format!("call {i}")).await?;
        println!("{} answered by {}", reply.message, reply.server);
    }
    Ok(())
}
