//! Each policy against a real etcd and real tonic servers over loopback.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use common::{SERVICE, TestServer, register};
use futures::StreamExt;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use serde_json::json;
use test_support::EtcdServer;
use tonic_etcd_resolver::{
    Balance, Error, HealthCheck, LbChannel, Options, OutlierDetection, Resolver, ZonePreference,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TARGET: &str = "services/default/policies";

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    test_support::eventually(what, Duration::from_secs(15), check).await;
}

fn options() -> Options {
    Options::default()
        .connect_timeout(Duration::from_millis(500))
        .retry(Duration::from_millis(20), Duration::from_millis(200))
}

async fn resolver(etcd: &EtcdServer, options: Options) -> Resolver {
    Resolver::connect([etcd.endpoint()], TARGET, options)
        .await
        .unwrap()
}

async fn servers(n: usize) -> Vec<TestServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::start().await);
    }
    out
}

async fn all_ready(resolver: &Resolver, n: usize) {
    eventually("every endpoint connected", || async {
        resolver.ready_endpoints().len() == n
    })
    .await;
}

/// `n` sequential calls: successes per answering server, and failures.
async fn calls(channel: &LbChannel, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut client = GreeterClient::new(channel.clone());
    let mut by_server = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match client.say_hello(HelloRequest::default()).await {
            Ok(reply) => *by_server.entry(reply.into_inner().server).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by_server, failed)
}

/// `n` calls, `concurrency` at a time: successes per answering server.
async fn concurrent_calls(
    channel: &LbChannel,
    n: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let client = GreeterClient::new(channel.clone());
    let replies: Vec<_> = futures::stream::iter(0..n)
        .map(|_| {
            let mut client = client.clone();
            async move { client.say_hello(HelloRequest::default()).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut by_server = BTreeMap::new();
    for reply in replies {
        *by_server
            .entry(reply.unwrap().into_inner().server)
            .or_insert(0) += 1;
    }
    by_server
}

#[tokio::test]
async fn weighted_round_robin_sends_calls_in_proportion_to_metadata_weight() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    // The controller writes weights as strings, as kratos does; a JSON number is read too.
    for (server, weight) in s.iter().zip([json!("300"), json!("100"), json!(200)]) {
        register(&etcd, TARGET, &server.addr(), json!({ "weight": weight })).await;
    }
    let resolver = resolver(&etcd, options().balance(Balance::Weighted)).await;
    all_ready(&resolver, 3).await;
    let (by_server, failed) = calls(&resolver.channel(), 600).await;
    assert_eq!(failed, 0);
    let got: Vec<usize> = s.iter().map(|x| by_server[&x.addr()]).collect();
    assert_eq!(got, [300, 100, 200], "{by_server:?}");
}

#[tokio::test]
async fn a_weight_change_in_etcd_applies_without_reconnecting() {
    let etcd = EtcdServer::start().await;
    let s = servers(2).await;
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({ "weight": "100" })).await;
    }
    let resolver = resolver(&etcd, options().balance(Balance::Weighted)).await;
    all_ready(&resolver, 2).await;
    register(&etcd, TARGET, &s[0].addr(), json!({ "weight": "300" })).await;
    eventually("the new weight applies", || async {
        let (by_server, _) = calls(&resolver.channel(), 40).await;
        by_server.get(&s[0].addr()) == Some(&30)
    })
    .await;
}

#[tokio::test]
async fn malformed_zero_and_absent_weights_count_as_the_default_weight() {
    let etcd = EtcdServer::start().await;
    let s = servers(4).await;
    let weights = [
        json!({"weight": "abc"}),
        json!({"weight": 0}),
        json!({}),
        json!({"weight": "100"}),
    ];
    for (server, metadata) in s.iter().zip(weights) {
        register(&etcd, TARGET, &server.addr(), metadata).await;
    }
    let resolver = resolver(&etcd, options().balance(Balance::Weighted)).await;
    all_ready(&resolver, 4).await;
    let (by_server, failed) = calls(&resolver.channel(), 400).await;
    assert_eq!(failed, 0);
    assert!(by_server.values().all(|n| *n == 100), "{by_server:?}");
}

#[tokio::test]
async fn least_loaded_sends_few_calls_to_a_slow_server() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    // Slow enough that the fast servers stay far faster even when the other tests in this
    // binary starve their one-thread runtimes of CPU (at 50 ms the slow one got 453 of 3000).
    s[0].set_delay(Duration::from_millis(250));
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let resolver = resolver(&etcd, options().balance(Balance::LeastLoaded)).await;
    all_ready(&resolver, 3).await;
    let by_server = concurrent_calls(&resolver.channel(), 1500, 16).await;
    let slow = by_server.get(&s[0].addr()).copied().unwrap_or(0);
    // Round-robin would send it 500.
    assert!(
        slow < 150,
        "the slow server got {slow} of 1500: {by_server:?}"
    );
}

#[tokio::test]
async fn an_open_server_stream_counts_as_in_flight_until_it_is_dropped() {
    let etcd = EtcdServer::start().await;
    let s = servers(2).await;
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let resolver = resolver(&etcd, options().balance(Balance::LeastLoaded)).await;
    all_ready(&resolver, 2).await;
    // A health Watch is a server stream; open it through the channel.
    let mut health = HealthClient::new(resolver.channel());
    let mut stream = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let in_flight = resolver.in_flight();
    let (busy, _) = in_flight
        .iter()
        .find(|(_, n)| **n == 1)
        .expect("one stream in flight");
    let busy = busy.clone();
    let idle = s.iter().map(TestServer::addr).find(|a| *a != busy).unwrap();

    // With two endpoints p2c compares both: every unary call avoids the open stream.
    let (by_server, failed) = calls(&resolver.channel(), 20).await;
    assert_eq!(
        (failed, by_server.get(&idle)),
        (0, Some(&20)),
        "{by_server:?}"
    );

    drop(stream);
    eventually("the dropped stream leaves the count", || async {
        resolver.in_flight().values().all(|n| *n == 0)
    })
    .await;
}

fn ejecting(base: Duration) -> Options {
    options().outlier_detection(
        OutlierDetection::default()
            .consecutive_failures(3)
            .failure_rate(None, 1)
            .base_ejection(base),
    )
}

#[tokio::test]
async fn consecutive_failures_eject_a_failing_server_until_its_ejection_ends() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    s[0].set_failing(true);
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let resolver = resolver(&etcd, ejecting(Duration::from_secs(2))).await;
    all_ready(&resolver, 3).await;
    let (_, failed) = calls(&resolver.channel(), 30).await;
    assert_eq!(failed, 3, "three failures eject it");
    assert!(!resolver.pickable_endpoints().contains(&s[0].addr()));
    let before = s[0].calls();
    let (by_server, failed) = calls(&resolver.channel(), 50).await;
    assert_eq!((failed, s[0].calls()), (0, before), "{by_server:?}");

    s[0].set_failing(false);
    eventually("the ejection ends", || async {
        resolver.pickable_endpoints().contains(&s[0].addr())
    })
    .await;
    let (by_server, failed) = calls(&resolver.channel(), 30).await;
    assert_eq!((failed, by_server.get(&s[0].addr())), (0, Some(&10)));
}

#[tokio::test]
async fn the_ejection_cap_keeps_some_failing_servers_in_rotation() {
    let etcd = EtcdServer::start().await;
    let s = servers(4).await;
    for server in &s {
        server.set_failing(true);
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let resolver = resolver(&etcd, ejecting(Duration::from_secs(60))).await;
    all_ready(&resolver, 4).await;
    let (_, failed) = calls(&resolver.channel(), 200).await;
    assert_eq!(failed, 200);
    // max_ejection_percent 50 of 4: two ejected, two kept.
    assert_eq!(resolver.pickable_endpoints().len(), 2);
}

#[tokio::test]
async fn a_single_failing_endpoint_is_never_ejected() {
    let etcd = EtcdServer::start().await;
    let s = TestServer::start().await;
    s.set_failing(true);
    register(&etcd, TARGET, &s.addr(), json!({})).await;
    let resolver = resolver(&etcd, ejecting(Duration::from_secs(60))).await;
    all_ready(&resolver, 1).await;
    let (_, failed) = calls(&resolver.channel(), 20).await;
    assert_eq!(failed, 20);
    assert_eq!(resolver.pickable_endpoints(), [s.addr()]);
    assert_eq!(s.calls(), 20, "every call still reached it");
}

#[tokio::test]
async fn a_slow_server_past_the_deadline_is_ejected_and_its_connection_kept() {
    let etcd = EtcdServer::start().await;
    let s = servers(2).await;
    s[0].set_delay(Duration::from_millis(300));
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let options = ejecting(Duration::from_secs(60)).timeout(Duration::from_millis(100));
    let resolver = resolver(&etcd, options).await;
    all_ready(&resolver, 2).await;
    let (_, failed) = calls(&resolver.channel(), 12).await;
    assert_eq!(failed, 3, "three deadlines eject it");
    assert_eq!(resolver.pickable_endpoints(), [s[1].addr()]);
    assert_eq!(resolver.ready_endpoints().len(), 2, "still connected");
}

fn checked(check: HealthCheck) -> Options {
    options().health_check(check)
}

#[tokio::test]
async fn a_not_serving_server_gets_no_calls_until_it_serves_again() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let resolver = resolver(&etcd, checked(HealthCheck::watch(SERVICE))).await;
    all_ready(&resolver, 3).await;
    s[1].set_serving(false).await;
    eventually("the NOT_SERVING server is skipped", || async {
        !resolver.pickable_endpoints().contains(&s[1].addr())
    })
    .await;
    let before = s[1].calls();
    let (_, failed) = calls(&resolver.channel(), 60).await;
    assert_eq!((failed, s[1].calls()), (0, before));

    s[1].set_serving(true).await;
    eventually("it is picked again", || async {
        resolver.pickable_endpoints().len() == 3
    })
    .await;
    let (by_server, _) = calls(&resolver.channel(), 30).await;
    assert_eq!(by_server.get(&s[1].addr()), Some(&10));
}

#[tokio::test]
async fn a_polled_not_serving_server_is_skipped_within_one_interval() {
    let etcd = EtcdServer::start().await;
    let s = servers(2).await;
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let interval = Duration::from_millis(300);
    let resolver = resolver(&etcd, checked(HealthCheck::poll(SERVICE, interval))).await;
    all_ready(&resolver, 2).await;
    s[0].set_serving(false).await;
    let started = Instant::now();
    eventually("the NOT_SERVING server is skipped", || async {
        resolver.pickable_endpoints() == [s[1].addr()]
    })
    .await;
    // One interval, and the 20 ms the wait polls at.
    assert!(
        started.elapsed() < interval + Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_without_a_health_service_is_treated_as_serving() {
    let etcd = EtcdServer::start().await;
    let s = TestServer::without_health().await;
    register(&etcd, TARGET, &s.addr(), json!({})).await;
    let resolver = resolver(
        &etcd,
        checked(HealthCheck::poll(SERVICE, Duration::from_millis(50))),
    )
    .await;
    all_ready(&resolver, 1).await;
    let (_, failed) = calls(&resolver.channel(), 10).await;
    assert_eq!(failed, 0);
    assert_eq!(resolver.pickable_endpoints(), [s.addr()]);
}

#[tokio::test]
async fn with_every_server_not_serving_calls_fail_fast_naming_the_target() {
    let etcd = EtcdServer::start().await;
    let s = TestServer::start().await;
    register(&etcd, TARGET, &s.addr(), json!({})).await;
    let resolver = resolver(&etcd, checked(HealthCheck::watch(SERVICE))).await;
    all_ready(&resolver, 1).await;
    s.set_serving(false).await;
    eventually("nothing pickable", || async {
        resolver.pickable_endpoints().is_empty()
    })
    .await;
    let err = GreeterClient::new(resolver.channel())
        .say_hello(HelloRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains(TARGET), "{err}");
    assert!(
        err.message()
            .contains("is serving: 1 endpoint registered, 1 connected, none serving"),
        "{err}"
    );
}

async fn zoned(etcd: &EtcdServer, zones: &[&str]) -> Vec<TestServer> {
    let s = servers(zones.len()).await;
    for (server, zone) in s.iter().zip(zones) {
        register(etcd, TARGET, &server.addr(), json!({ "zone": zone })).await;
    }
    s
}

#[tokio::test]
async fn calls_stay_in_the_client_zone_while_enough_local_servers_are_up() {
    let etcd = EtcdServer::start().await;
    let s = zoned(&etcd, &["a", "a", "b", "b"]).await;
    let resolver = resolver(&etcd, options().prefer_zone(ZonePreference::new("a"))).await;
    all_ready(&resolver, 4).await;
    let (by_server, failed) = calls(&resolver.channel(), 100).await;
    assert_eq!(failed, 0);
    assert_eq!(by_server.get(&s[0].addr()), Some(&50), "{by_server:?}");
    assert_eq!(by_server.get(&s[1].addr()), Some(&50), "{by_server:?}");
}

#[tokio::test]
async fn calls_spill_over_to_other_zones_when_local_servers_die() {
    let etcd = EtcdServer::start().await;
    let mut s = zoned(&etcd, &["a", "a", "a", "b", "b"]).await;
    let resolver = resolver(&etcd, options().prefer_zone(ZonePreference::new("a"))).await;
    all_ready(&resolver, 5).await;
    let (by_server, _) = calls(&resolver.channel(), 30).await;
    assert_eq!(by_server.len(), 3, "local only: {by_server:?}");
    // Two of three local servers die: one is up, fewer than half.
    s[0].kill();
    s[1].kill();
    eventually("the dead servers are skipped", || async {
        resolver.ready_endpoints().len() == 3
    })
    .await;
    let (by_server, failed) = calls(&resolver.channel(), 90).await;
    assert_eq!(failed, 0);
    for survivor in &s[2..] {
        assert_eq!(by_server.get(&survivor.addr()), Some(&30), "{by_server:?}");
    }
}

#[tokio::test]
async fn a_server_that_dies_before_any_call_reaches_it_is_no_longer_ready() {
    let etcd = EtcdServer::start().await;
    let mut s = zoned(&etcd, &["a", "b"]).await;
    let resolver = resolver(&etcd, options().prefer_zone(ZonePreference::new("a"))).await;
    all_ready(&resolver, 2).await;
    // Calls stay in zone a: zone b's server is connected but never called.
    let (by_server, failed) = calls(&resolver.channel(), 10).await;
    assert_eq!((by_server.len(), failed), (1, 0), "{by_server:?}");
    s[1].kill();
    eventually("the uncalled dead server is no longer ready", || async {
        resolver.ready_endpoints() == [s[0].addr()]
    })
    .await;
}

#[tokio::test]
async fn a_backend_that_accepts_but_never_answers_keep_alive_pings_is_reconnected_in_the_background()
 {
    let etcd = EtcdServer::start().await;
    // Accepts connections and holds them, never speaking HTTP/2 (a hung process).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let hung = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.push(socket);
        }
    });
    register(&etcd, TARGET, &addr, json!({})).await;
    let ping = Duration::from_millis(100);
    let options = options()
        .keep_alive(Some((ping, ping)))
        .keep_alive_while_idle(true);
    let _resolver = resolver(&etcd, options).await;
    // Each unanswered ping ends the connection; the endpoint is down and connects again, with
    // no RPC sent.
    eventually(
        "three connections, each ended by its keep-alive",
        || async { accepted.load(std::sync::atomic::Ordering::Relaxed) >= 3 },
    )
    .await;
    hung.abort();
}

#[tokio::test]
async fn the_zone_preference_composes_with_weights() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    let metadata = [
        json!({"zone": "a", "weight": "300"}),
        json!({"zone": "a", "weight": "100"}),
        json!({"zone": "b", "weight": "10000"}),
    ];
    for (server, metadata) in s.iter().zip(metadata) {
        register(&etcd, TARGET, &server.addr(), metadata).await;
    }
    let options = options()
        .balance(Balance::Weighted)
        .prefer_zone(ZonePreference::new("a"));
    let resolver = resolver(&etcd, options).await;
    all_ready(&resolver, 3).await;
    let (by_server, _) = calls(&resolver.channel(), 400).await;
    let got: Vec<Option<&usize>> = s.iter().map(|x| by_server.get(&x.addr())).collect();
    assert_eq!(got, [Some(&300), Some(&100), None]);
}

#[tokio::test]
async fn an_unknown_client_zone_spreads_calls_over_every_zone() {
    let etcd = EtcdServer::start().await;
    let s = zoned(&etcd, &["a", "b"]).await;
    let resolver = resolver(&etcd, options().prefer_zone(ZonePreference::new("nowhere"))).await;
    all_ready(&resolver, 2).await;
    let (by_server, failed) = calls(&resolver.channel(), 20).await;
    assert_eq!(failed, 0);
    assert!(
        s.iter().all(|x| by_server.get(&x.addr()) == Some(&10)),
        "{by_server:?}"
    );
}

#[tokio::test]
async fn an_empty_registry_fails_fast_under_every_policy() {
    let etcd = EtcdServer::start().await;
    let options = options()
        .balance(Balance::LeastLoaded)
        .prefer_zone(ZonePreference::new("a"))
        .outlier_detection(OutlierDetection::default())
        .health_check(HealthCheck::watch(SERVICE));
    let resolver = resolver(&etcd, options).await;
    let started = Instant::now();
    let err = GreeterClient::new(resolver.channel())
        .say_hello(HelloRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains(TARGET), "{err}");
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn a_go_style_etcd_target_resolves_the_same_keys() {
    let etcd = EtcdServer::start().await;
    let s = TestServer::start().await;
    register(&etcd, TARGET, &s.addr(), json!({})).await;
    let resolver = Resolver::connect([etcd.endpoint()], format!("etcd:///{TARGET}"), options())
        .await
        .unwrap();
    all_ready(&resolver, 1).await;
    assert_eq!(calls(&resolver.channel(), 3).await.1, 0);
}

#[tokio::test]
async fn a_target_with_another_scheme_is_rejected_naming_it() {
    let etcd = EtcdServer::start().await;
    let target = "dns:///greeter.default.svc:50051";
    let Err(err) = Resolver::connect([etcd.endpoint()], target, options()).await else {
        panic!("accepted {target}");
    };
    assert!(matches!(err, Error::InvalidTarget { .. }), "{err}");
    assert!(err.to_string().contains(target), "{err}");
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_error_naming_the_target() {
    let port = test_support::free_port();
    let result = Resolver::connect(
        [format!("http://127.0.0.1:{port}")],
        TARGET,
        options().connect_timeout(Duration::from_millis(300)),
    )
    .await;
    let Err(err) = result else {
        panic!("resolved with no etcd")
    };
    assert!(err.to_string().contains(TARGET), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_to_one_endpoint_eject_it_once_for_the_base_length() {
    let etcd = EtcdServer::start().await;
    let s = servers(3).await;
    // Slow enough that every call is in flight before the first one fails.
    s[0].set_delay(Duration::from_millis(100));
    s[0].set_failing(true);
    for server in &s {
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let base = Duration::from_secs(1);
    let resolver = resolver(&etcd, ejecting(base)).await;
    all_ready(&resolver, 3).await;
    let client = GreeterClient::new(resolver.channel());
    let started = Instant::now();
    let _: Vec<_> = futures::stream::iter(0..96)
        .map(|_| {
            let mut client = client.clone();
            async move { client.say_hello(HelloRequest::default()).await }
        })
        .buffer_unordered(96)
        .collect()
        .await;
    assert!(!resolver.pickable_endpoints().contains(&s[0].addr()));
    // Two of three endpoints are never ejected together (50% of 3 rounds down to 1).
    assert_eq!(resolver.pickable_endpoints().len(), 2);
    s[0].set_failing(false);
    eventually("the ejection ends", || async {
        resolver.pickable_endpoints().contains(&s[0].addr())
    })
    .await;
    // One ejection of the base length, not one per concurrent failure (2 s, 3 s, ...).
    assert!(
        started.elapsed() < base * 2,
        "ejected for {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_that_does_not_know_the_checked_service_is_not_picked() {
    for check in [
        HealthCheck::watch("not.registered.Service"),
        HealthCheck::poll("not.registered.Service", Duration::from_millis(50)),
    ] {
        let etcd = EtcdServer::start().await;
        let s = TestServer::start().await;
        register(&etcd, TARGET, &s.addr(), json!({})).await;
        let resolver = resolver(&etcd, checked(check.clone())).await;
        all_ready(&resolver, 1).await;
        eventually("the endpoint is not serving", || async {
            resolver.pickable_endpoints().is_empty()
        })
        .await;
        let err = GreeterClient::new(resolver.channel())
            .say_hello(HelloRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{check:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removed_while_connecting_never_becomes_pickable() {
    let etcd = EtcdServer::start().await;
    let mut client = etcd.client().await;
    let gone = TestServer::start().await;
    let kept = TestServer::start().await;
    let resolver = resolver(&etcd, options()).await;
    let key = tonic_etcd_resolver::format::endpoint_key(TARGET, &gone.addr());
    for _ in 0..20 {
        // Removed, re-added and removed again, each while its member may be connecting.
        register(&etcd, TARGET, &gone.addr(), json!({})).await;
        client.delete(key.as_str(), None).await.unwrap();
        register(&etcd, TARGET, &gone.addr(), json!({})).await;
        client.delete(key.as_str(), None).await.unwrap();
    }
    // A later change, once connected, shows the resolver has caught up with the deletes.
    register(&etcd, TARGET, &kept.addr(), json!({})).await;
    eventually("the kept endpoint connects", || async {
        resolver.ready_endpoints() == [kept.addr()]
    })
    .await;
    let (by_server, failed) = calls(&resolver.channel(), 20).await;
    assert_eq!((failed, by_server.get(&kept.addr())), (0, Some(&20)));
    assert_eq!(gone.calls(), 0);
    // Re-added for good: connected once.
    register(&etcd, TARGET, &gone.addr(), json!({})).await;
    all_ready(&resolver, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_returns_to_zero_after_timeouts_transport_errors_and_cancelled_calls() {
    let etcd = EtcdServer::start().await;
    let mut s = servers(3).await;
    for server in &s {
        server.set_delay(Duration::from_millis(300));
        register(&etcd, TARGET, &server.addr(), json!({})).await;
    }
    let options = options()
        .balance(Balance::LeastLoaded)
        .timeout(Duration::from_millis(100));
    let resolver = resolver(&etcd, options).await;
    all_ready(&resolver, 3).await;
    let channel = resolver.channel();
    let in_flight_total = || resolver.in_flight().values().sum::<usize>();

    // Timeouts: every call outlives the channel's deadline.
    let (_, failed) = calls(&channel, 6).await;
    assert_eq!(failed, 6);

    // Cancelled: the client gives up first (or, on a starved machine, the call has already
    // ended; either way nothing may stay counted).
    for _ in 0..6 {
        let mut client = GreeterClient::new(channel.clone());
        let call = client.say_hello(HelloRequest::default());
        let _ = tokio::time::timeout(Duration::from_millis(20), call).await;
    }

    eventually("nothing is in flight", || async { in_flight_total() == 0 }).await;

    // Transport errors: a server dies with calls in flight (no deadline this time).
    let resolver = self::resolver(&etcd, self::options().balance(Balance::LeastLoaded)).await;
    all_ready(&resolver, 3).await;
    let in_flight_total = || resolver.in_flight().values().sum::<usize>();
    // Every call stays in flight until the kill; p2c's split of the six is random, so the
    // calls that must fail are those on the dying server when it dies. The others last long
    // enough (6 s) for all six to be seen in flight on a starved machine (CI once took over
    // 2 s to start them).
    s[0].set_delay(Duration::from_secs(10));
    s[1].set_delay(Duration::from_secs(6));
    s[2].set_delay(Duration::from_secs(6));
    let pending: Vec<_> = (0..6)
        .map(|_| {
            let mut client = GreeterClient::new(resolver.channel());
            tokio::spawn(async move { client.say_hello(HelloRequest::default()).await })
        })
        .collect();
    eventually(
        "six calls in flight, some on the server that dies",
        || async {
            in_flight_total() == 6
                && resolver.in_flight().get(&s[0].addr()).copied().unwrap_or(0) >= 1
        },
    )
    .await;
    let doomed = resolver.in_flight()[&s[0].addr()];
    s[0].kill();
    let mut errors = Vec::new();
    for call in pending {
        if let Err(status) = call.await.unwrap() {
            errors.push(status);
        }
    }
    // At least the calls on the killed server fail. (CI once saw one more fail than were
    // counted on it, cause not found; what this test guards is the count going back to zero.)
    assert!(
        errors.len() >= doomed,
        "{doomed} calls were on the killed server, {} failed: {errors:?}",
        errors.len()
    );

    eventually("nothing is in flight", || async { in_flight_total() == 0 }).await;
    // The killed server leaves; the slow ones may have missed a health check meanwhile.
    eventually("the two live servers are ready", || async {
        resolver.ready_endpoints().len() == 2
    })
    .await;
}
