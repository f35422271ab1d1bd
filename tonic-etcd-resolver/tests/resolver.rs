//! The resolver against a real etcd and real tonic Greeter servers over loopback.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use test_support::EtcdServer;

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    test_support::eventually(what, Duration::from_secs(15), check).await;
}
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::{LbChannel, Options, Resolver};

const TARGET: &str = "services/default/greeter";

async fn server() -> GreeterServer {
    GreeterServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn register(etcd: &EtcdServer, target: &str, addr: &str) {
    let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr));
    etcd.client()
        .await
        .put(format::endpoint_key(target, addr), value, None)
        .await
        .unwrap();
}

async fn deregister(etcd: &EtcdServer, target: &str, addr: &str) {
    etcd.client()
        .await
        .delete(format::endpoint_key(target, addr), None)
        .await
        .unwrap();
}

fn options() -> Options {
    Options::default()
        .connect_timeout(Duration::from_millis(500))
        .retry(Duration::from_millis(20), Duration::from_millis(200))
}

async fn resolver(etcd: &EtcdServer, target: &str) -> Resolver {
    Resolver::connect([etcd.endpoint()], target, options())
        .await
        .unwrap()
}

/// Makes `n` calls; returns successes per answering server and the failure count.
async fn calls(channel: &LbChannel, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut client = GreeterClient::new(channel.clone());
    let mut by_server = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match client
            .say_hello(HelloRequest {
                name: "test".into(),
            })
            .await
        {
            Ok(reply) => *by_server.entry(reply.into_inner().server).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by_server, failed)
}

async fn ready_count(resolver: &Resolver, n: usize) -> bool {
    resolver.ready_endpoints().len() == n
}

#[tokio::test]
async fn calls_spread_evenly_across_three_registered_servers() {
    let etcd = EtcdServer::start().await;
    let servers = [server().await, server().await, server().await];
    for s in &servers {
        register(&etcd, TARGET, &s.addr().to_string()).await;
    }
    let resolver = resolver(&etcd, TARGET).await;
    eventually("three endpoints up", || ready_count(&resolver, 3)).await;
    let (by_server, failed) = calls(&resolver.channel(), 300).await;
    assert_eq!(failed, 0);
    assert_eq!(by_server.len(), 3, "{by_server:?}");
    assert!(
        by_server.values().all(|n| *n == 100),
        "round robin: {by_server:?}"
    );
}

#[tokio::test]
async fn a_deleted_key_gets_no_new_calls_and_a_re_added_one_gets_calls_again() {
    let etcd = EtcdServer::start().await;
    let servers = [server().await, server().await, server().await];
    for s in &servers {
        register(&etcd, TARGET, &s.addr().to_string()).await;
    }
    let resolver = resolver(&etcd, TARGET).await;
    eventually("three endpoints up", || ready_count(&resolver, 3)).await;
    let gone = servers[0].addr().to_string();

    deregister(&etcd, TARGET, &gone).await;
    eventually("the deleted endpoint leaves", || ready_count(&resolver, 2)).await;
    let before = servers[0].calls();
    let (by_server, failed) = calls(&resolver.channel(), 100).await;
    assert_eq!(failed, 0);
    assert_eq!(
        servers[0].calls(),
        before,
        "no new calls after deletion: {by_server:?}"
    );

    register(&etcd, TARGET, &gone).await;
    eventually("the endpoint is back", || ready_count(&resolver, 3)).await;
    let (by_server, _) = calls(&resolver.channel(), 90).await;
    assert_eq!(by_server.get(&gone), Some(&30), "{by_server:?}");
}

#[tokio::test]
async fn an_idle_channel_applies_registry_changes_without_traffic() {
    let etcd = EtcdServer::start().await;
    let a = server().await;
    register(&etcd, TARGET, &a.addr().to_string()).await;
    let resolver = resolver(&etcd, TARGET).await;
    let _channel = resolver.channel();
    eventually("one endpoint up", || ready_count(&resolver, 1)).await;
    deregister(&etcd, TARGET, &a.addr().to_string()).await;
    eventually("no endpoint, with no RPC in flight", || {
        ready_count(&resolver, 0)
    })
    .await;
    assert!(resolver.endpoints().borrow().is_empty());
}

#[tokio::test]
async fn a_killed_server_whose_key_stays_is_skipped_so_calls_keep_succeeding() {
    let etcd = EtcdServer::start().await;
    let mut servers = [server().await, server().await, server().await];
    for s in &servers {
        register(&etcd, TARGET, &s.addr().to_string()).await;
    }
    let resolver = resolver(&etcd, TARGET).await;
    eventually("three endpoints up", || ready_count(&resolver, 3)).await;
    let (_, failed) = calls(&resolver.channel(), 30).await;
    assert_eq!(failed, 0);

    servers[1].kill();
    let (by_server, failed) = calls(&resolver.channel(), 2000).await;
    let succeeded: usize = by_server.values().sum();
    eprintln!("after the kill: {succeeded} of 2000 calls succeeded, {failed} failed");
    assert!(
        succeeded * 1000 >= 2000 * 999,
        "{succeeded} of 2000 succeeded ({failed} failed), need 99.9%: {by_server:?}"
    );
    assert!(!by_server.contains_key(&servers[1].addr().to_string()));
    assert_eq!(
        resolver.endpoints().borrow().len(),
        3,
        "the key is still registered"
    );
}

#[tokio::test]
async fn calls_keep_succeeding_while_etcd_is_down_and_later_changes_are_picked_up() {
    let mut etcd = EtcdServer::start().await;
    let servers = [server().await, server().await];
    for s in &servers {
        register(&etcd, TARGET, &s.addr().to_string()).await;
    }
    let resolver = resolver(&etcd, TARGET).await;
    eventually("two endpoints up", || ready_count(&resolver, 2)).await;

    etcd.stop();
    let (by_server, failed) = calls(&resolver.channel(), 100).await;
    assert_eq!(
        (failed, by_server.len()),
        (0, 2),
        "last known endpoints stay in use"
    );
    assert_eq!(resolver.endpoints().borrow().len(), 2);

    etcd.restart().await;
    let third = server().await;
    register(&etcd, TARGET, &third.addr().to_string()).await;
    deregister(&etcd, TARGET, &servers[0].addr().to_string()).await;
    eventually("changes after the outage applied", || async {
        let mut ready = resolver.ready_endpoints();
        ready.sort();
        let mut want = vec![servers[1].addr().to_string(), third.addr().to_string()];
        want.sort();
        ready == want
    })
    .await;
}

#[tokio::test]
async fn malformed_values_are_skipped_and_counted() {
    let etcd = EtcdServer::start().await;
    let good = server().await;
    register(&etcd, TARGET, &good.addr().to_string()).await;
    let mut client = etcd.client().await;
    client
        .put(format!("{TARGET}/bad-1"), "{not json", None)
        .await
        .unwrap();
    let resolver = resolver(&etcd, TARGET).await;
    client
        .put(format!("{TARGET}/bad-2"), "no-port", None)
        .await
        .unwrap();
    eventually("both malformed values counted", || async {
        resolver.stats().malformed_values() == 2
    })
    .await;
    assert_eq!(resolver.endpoints().borrow().len(), 1);
    let (_, failed) = calls(&resolver.channel(), 10).await;
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn every_format_is_read_by_default_and_a_fixed_format_skips_the_others() {
    let etcd = EtcdServer::start().await;
    let servers = [server().await, server().await, server().await];
    let mut client = etcd.client().await;
    for (format, s) in ValueFormat::ALL.into_iter().zip(&servers) {
        let addr = s.addr().to_string();
        let endpoint = Endpoint::new(&addr)
            .with_id(format.to_string())
            .with_service("greeter");
        client
            .put(
                format!("{TARGET}/{format}"),
                format::render(format, &endpoint),
                None,
            )
            .await
            .unwrap();
    }
    let detecting = resolver(&etcd, TARGET).await;
    assert_eq!(detecting.endpoints().borrow().len(), 3);
    assert_eq!(detecting.stats().malformed_values(), 0);

    let kratos_only = Resolver::connect(
        [etcd.endpoint()],
        TARGET,
        options().format(ValueFormat::Kratos),
    )
    .await
    .unwrap();
    let found: Vec<String> = kratos_only
        .endpoints()
        .borrow()
        .values()
        .map(|e| e.addr.clone())
        .collect();
    assert_eq!(found, [servers[2].addr().to_string()]);
    assert_eq!(kratos_only.stats().malformed_values(), 2);
}

#[tokio::test]
async fn target_foo_never_sees_keys_of_foo_bar() {
    let etcd = EtcdServer::start().await;
    let foo = server().await;
    let foo_bar = server().await;
    register(&etcd, "services/default/foo", &foo.addr().to_string()).await;
    register(
        &etcd,
        "services/default/foo_bar",
        &foo_bar.addr().to_string(),
    )
    .await;
    let resolver = resolver(&etcd, "services/default/foo").await;
    register(&etcd, "services/default/foo_bar", "127.0.0.1:1").await;
    let (by_server, _) = calls(&resolver.channel(), 20).await;
    assert_eq!(
        by_server.keys().collect::<Vec<_>>(),
        [&foo.addr().to_string()]
    );
    assert_eq!(resolver.endpoints().borrow().len(), 1);
}

#[tokio::test]
async fn address_format_values_written_by_seed_services_are_read() {
    let etcd = EtcdServer::start().await;
    let s = server().await;
    etcd.client()
        .await
        .put(
            format!("/etcdv3_resolver/greeter/{}", s.addr()),
            s.addr().to_string(),
            None,
        )
        .await
        .unwrap();
    let resolver = resolver(&etcd, "/etcdv3_resolver/greeter").await;
    eventually("endpoint up", || ready_count(&resolver, 1)).await;
    assert_eq!(calls(&resolver.channel(), 5).await.1, 0);
}

#[tokio::test]
async fn with_no_endpoints_calls_fail_fast_with_unavailable() {
    let etcd = EtcdServer::start().await;
    let resolver = resolver(&etcd, TARGET).await;
    let mut client = GreeterClient::new(resolver.channel());
    let started = Instant::now();
    let err = client.say_hello(HelloRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(
        err.message().contains("is registered: 0 endpoints under"),
        "says nothing is registered: {err}"
    );
}

#[tokio::test]
async fn with_every_registered_endpoint_refusing_calls_fail_saying_none_is_reachable() {
    let etcd = EtcdServer::start().await;
    // A port that was just free: nothing listens there, so connections are refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    register(&etcd, TARGET, &closed).await;
    let resolver = resolver(&etcd, TARGET).await;
    let mut client = GreeterClient::new(resolver.channel());
    let err = client.say_hello(HelloRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        err.message()
            .contains("is reachable: 1 endpoint registered, all refusing or timing out"),
        "says the registered endpoint refuses: {err}"
    );
}

#[tokio::test]
async fn wait_for_endpoints_holds_a_call_until_a_server_registers() {
    let etcd = EtcdServer::start().await;
    let resolver = Resolver::connect(
        [etcd.endpoint()],
        TARGET,
        options().wait_for_endpoints(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let mut client = GreeterClient::new(resolver.channel());
    let call = tokio::spawn(async move { client.say_hello(HelloRequest::default()).await });
    let s = server().await;
    register(&etcd, TARGET, &s.addr().to_string()).await;
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.into_inner().server, s.addr().to_string());
}

#[tokio::test]
async fn the_discovery_stream_reports_inserts_and_removals() {
    use futures::StreamExt;
    use tower::discover::Change;
    let etcd = EtcdServer::start().await;
    register(&etcd, TARGET, "127.0.0.1:7001").await;
    let resolver = resolver(&etcd, TARGET).await;
    let mut changes = Box::pin(resolver.discover());
    let first = changes.next().await.unwrap().unwrap();
    assert!(matches!(first, Change::Insert(ref k, _) if k == "127.0.0.1:7001"));
    deregister(&etcd, TARGET, "127.0.0.1:7001").await;
    let next = tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(next, Change::Remove(ref k) if k == "127.0.0.1:7001"));
}

#[tokio::test]
async fn dropping_the_resolver_and_its_channels_stops_the_background_watch() {
    let etcd = EtcdServer::start().await;
    let resolver = resolver(&etcd, TARGET).await;
    let mut endpoints = resolver.endpoints();
    let channel = resolver.channel();
    drop(resolver);
    drop(channel);
    // The watch task owned the sender: once it is stopped the receiver sees the channel closed.
    tokio::time::timeout(Duration::from_secs(5), async {
        while endpoints.changed().await.is_ok() {}
    })
    .await
    .expect("background task still running");
}
