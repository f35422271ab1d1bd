//! TLS to backends: the resolver dials registered endpoints over TLS with the configured roots.

use std::time::Duration;

use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use test_support::EtcdServer;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::{Options, Resolver};

const TARGET: &str = "services/default/secure";

fn certificate() -> (String, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

#[tokio::test]
async fn endpoints_are_dialled_over_tls_with_the_configured_roots() {
    let etcd = EtcdServer::start().await;
    let (cert, key) = certificate();
    let server = GreeterServer::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        Identity::from_pem(&cert, &key),
    )
    .await
    .unwrap();
    let addr = server.addr().to_string();
    etcd.client()
        .await
        .put(
            format::endpoint_key(TARGET, &addr),
            format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr.clone())),
            None,
        )
        .await
        .unwrap();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert))
        .domain_name("localhost");
    let options = Options::default()
        .tls(tls)
        .connect_timeout(Duration::from_secs(2));
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, options)
        .await
        .unwrap();
    let mut client = GreeterClient::new(resolver.channel());
    let reply = client
        .say_hello(HelloRequest { name: "tls".into() })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server, addr);
}

#[tokio::test]
async fn a_backend_with_an_untrusted_certificate_is_not_used() {
    let etcd = EtcdServer::start().await;
    let (cert, key) = certificate();
    let (other_ca, _) = certificate();
    let server = GreeterServer::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        Identity::from_pem(&cert, &key),
    )
    .await
    .unwrap();
    let addr = server.addr().to_string();
    etcd.client()
        .await
        .put(format::endpoint_key(TARGET, &addr), addr.clone(), None)
        .await
        .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&other_ca))
        .domain_name("localhost");
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, Options::default().tls(tls))
        .await
        .unwrap();
    let mut client = GreeterClient::new(resolver.channel());
    assert!(client.say_hello(HelloRequest::default()).await.is_err());
}
