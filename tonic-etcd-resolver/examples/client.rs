//! The Greeter client from the README: resolve `services/default/greeter` from etcd and call it.
//!
//! `cargo run -p tonic-etcd-resolver --example client -- http://127.0.0.1:2379 services/default/greeter`

use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use tonic_etcd_resolver::{Options, Resolver};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let etcd = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let target = args
        .next()
        .unwrap_or_else(|| "services/default/greeter".into());

    let resolver = Resolver::connect([etcd], target, Options::default()).await?;
    let mut client = GreeterClient::new(resolver.channel());
    for i in 0..6 {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("call {i}"),
            })
            .await?;
        println!(
            "{} answered by {}",
            reply.get_ref().message,
            reply.get_ref().server
        );
    }
    Ok(())
}
