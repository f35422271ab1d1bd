//! Subsetting against a real etcd and real tonic servers over loopback: a client connects to and
//! calls only its subset, and the subset refills when a member dies, stops serving or is ejected.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{SERVICE, TestServer, register};
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use serde_json::json;
use test_support::EtcdServer;
use tonic_etcd_resolver::policy::Rendezvous;
use tonic_etcd_resolver::{HealthCheck, LbChannel, Options, OutlierDetection, Resolver};

const TARGET: &str = "services/default/subset";
const CLIENT: &str = "subset-test-client";
const SERVERS: usize = 6;
const SUBSET: usize = 2;

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    test_support::eventually(
        what,
        Duration::from_secs(15),
        || std::future::ready(check()),
    )
    .await;
}

fn options() -> Options {
    Options::default()
        .connect_timeout(Duration::from_millis(500))
        .retry(Duration::from_millis(20), Duration::from_millis(200))
        .subset(SUBSET)
        .client_id(CLIENT)
}

/// `SERVERS` servers registered under `TARGET`, and their addresses in this client's rank order.
async fn registered(etcd: &EtcdServer) -> (Vec<TestServer>, Vec<String>) {
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        let server = TestServer::start().await;
        register(etcd, TARGET, &server.addr(), json!({})).await;
        servers.push(server);
    }
    let addrs: Vec<String> = servers.iter().map(TestServer::addr).collect();
    let ranked = Rendezvous::new(CLIENT)
        .subset(addrs.iter().map(String::as_str), SERVERS)
        .into_iter()
        .map(str::to_owned)
        .collect();
    (servers, ranked)
}

fn set(addrs: &[&String]) -> BTreeSet<String> {
    addrs.iter().map(|a| (*a).clone()).collect()
}

fn connected(resolver: &Resolver) -> BTreeSet<String> {
    resolver.ready_endpoints().into_iter().collect()
}

/// `n` sequential calls: the servers that answered; panics on a failed call.
async fn answering(channel: &LbChannel, n: usize) -> BTreeSet<String> {
    let mut client = GreeterClient::new(channel.clone());
    let mut servers = BTreeSet::new();
    for _ in 0..n {
        let reply = client.say_hello(HelloRequest::default()).await.unwrap();
        servers.insert(reply.into_inner().server);
    }
    servers
}

fn server<'a>(servers: &'a mut [TestServer], addr: &str) -> &'a mut TestServer {
    servers
        .iter_mut()
        .find(|s| s.addr() == addr)
        .expect("a started server")
}

#[tokio::test]
async fn a_subset_client_connects_to_and_calls_only_its_subset_and_refills_when_a_member_dies() {
    let etcd = EtcdServer::start().await;
    let (mut servers, ranked) = registered(&etcd).await;
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, options())
        .await
        .unwrap();
    let subset = set(&[&ranked[0], &ranked[1]]);
    eventually("the subset connected", || connected(&resolver) == subset).await;

    assert_eq!(answering(&resolver.channel(), 40).await, subset);
    assert_eq!(connected(&resolver), subset, "no other endpoint connected");

    server(&mut servers, &ranked[0]).kill();
    let refilled = set(&[&ranked[1], &ranked[2]]);
    eventually("the next-ranked endpoint stood in", || {
        connected(&resolver) == refilled
    })
    .await;
    assert_eq!(answering(&resolver.channel(), 40).await, refilled);
    for other in &ranked[3..] {
        assert_eq!(
            server(&mut servers, other).calls(),
            0,
            "{other} is outside the subset"
        );
    }
}

#[tokio::test]
async fn a_not_serving_subset_member_is_stood_in_for_until_it_serves_again() {
    let etcd = EtcdServer::start().await;
    let (mut servers, ranked) = registered(&etcd).await;
    let options = options().health_check(HealthCheck::watch(SERVICE));
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, options)
        .await
        .unwrap();
    let subset = set(&[&ranked[0], &ranked[1]]);
    eventually("the subset connected", || connected(&resolver) == subset).await;

    server(&mut servers, &ranked[1]).set_serving(false).await;
    let with_stand_in = set(&[&ranked[0], &ranked[1], &ranked[2]]);
    eventually("the next-ranked endpoint stood in", || {
        connected(&resolver) == with_stand_in
    })
    .await;
    assert_eq!(
        answering(&resolver.channel(), 40).await,
        set(&[&ranked[0], &ranked[2]]),
        "the member that is not serving gets no call"
    );

    server(&mut servers, &ranked[1]).set_serving(true).await;
    eventually("the stand-in gave its place back", || {
        connected(&resolver) == subset
    })
    .await;
    assert_eq!(answering(&resolver.channel(), 40).await, subset);
}

#[tokio::test]
async fn a_registered_endpoint_ranked_above_the_subset_joins_it_and_the_lowest_leaves() {
    let etcd = EtcdServer::start().await;
    let (_servers, ranked) = registered(&etcd).await;
    // Start with the top one unregistered: the subset is the next two.
    let mut kv = etcd.client().await;
    kv.delete(
        tonic_etcd_resolver::format::endpoint_key(TARGET, &ranked[0]),
        None,
    )
    .await
    .unwrap();
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, options())
        .await
        .unwrap();
    let without_top = set(&[&ranked[1], &ranked[2]]);
    eventually("the subset connected", || {
        connected(&resolver) == without_top
    })
    .await;

    register(&etcd, TARGET, &ranked[0], json!({})).await;
    let subset = set(&[&ranked[0], &ranked[1]]);
    eventually("the new top endpoint joined", || {
        connected(&resolver) == subset
    })
    .await;
    assert_eq!(answering(&resolver.channel(), 40).await, subset);
}

#[tokio::test]
async fn an_ejected_subset_member_is_stood_in_for_by_the_next_ranked() {
    let etcd = EtcdServer::start().await;
    let (mut servers, ranked) = registered(&etcd).await;
    let options = options().outlier_detection(OutlierDetection::default());
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, options)
        .await
        .unwrap();
    let subset = set(&[&ranked[0], &ranked[1]]);
    eventually("the subset connected", || connected(&resolver) == subset).await;

    server(&mut servers, &ranked[0]).set_failing(true);
    let client = GreeterClient::new(resolver.channel());
    let with_stand_in = set(&[&ranked[0], &ranked[1], &ranked[2]]);
    test_support::eventually(
        "the failing member ejected and stood in for",
        Duration::from_secs(15),
        || async {
            // Failures to the failing member trip the ejection.
            let _ = client.clone().say_hello(HelloRequest::default()).await;
            connected(&resolver) == with_stand_in
        },
    )
    .await;
    let pickable: BTreeSet<String> = resolver.pickable_endpoints().into_iter().collect();
    assert_eq!(pickable, set(&[&ranked[1], &ranked[2]]));
    assert_eq!(
        answering(&resolver.channel(), 40).await,
        set(&[&ranked[1], &ranked[2]])
    );
}
