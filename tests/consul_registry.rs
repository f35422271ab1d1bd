//! The Consul backend against a real Consul: ownership, guarded txn batches, foreign instances,
//! clusters, the fence, restarts and data loss, DNS.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_registrar::desired::LogicalEndpoint;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{
    ALIVE_CHECK, ConsulConfig, ConsulRegistry, ConsulService, OWNER_META, instance_id,
};
use grpc_registrar::registry::{Backend, Claim, Error, Event, Owner, Publication};
use serde_json::Value;
use test_support::consul::Consul;
use test_support::eventually;

const TTL: Duration = Duration::from_secs(3);

fn registry(consul: &Consul, cluster: Option<&str>) -> ConsulRegistry {
    let config = ConsulConfig {
        cluster: cluster.map(str::to_owned),
        default_ttl: TTL,
        request_timeout: Duration::from_secs(2),
        ..ConsulConfig::new(consul.http_addr())
    };
    ConsulRegistry::connect(config, Arc::new(Metrics::default())).unwrap()
}

fn owner(name: &str) -> Owner {
    Owner {
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        name: name.into(),
    }
}

fn endpoint(i: usize) -> LogicalEndpoint {
    LogicalEndpoint {
        id: format!("pod-{i}"),
        ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
            .parse()
            .unwrap(),
        port: 50051,
        node: Some("node-a".into()),
        metadata: BTreeMap::from([
            ("pod".to_owned(), format!("pod-{i}")),
            ("namespace".to_owned(), "default".to_owned()),
            ("zone".to_owned(), "zone-a".to_owned()),
        ]),
    }
}

fn publication(service: &str, who: &Owner, endpoints: Vec<LogicalEndpoint>) -> Publication {
    Publication::new(
        Arc::new(ConsulService::new(
            service,
            vec!["grpc".into(), "v1".into()],
        )),
        who.clone(),
        TTL,
        endpoints,
    )
    .expect("the service's layout renders the endpoints")
}

fn first(n: usize) -> Vec<LogicalEndpoint> {
    (0..n).map(endpoint).collect()
}

async fn claim_and_sync(
    reg: &ConsulRegistry,
    service: &str,
    who: &Owner,
    eps: Vec<LogicalEndpoint>,
) {
    assert_eq!(reg.claim(service, who).await.unwrap(), Claim::Owned);
    reg.sync(&publication(service, who, eps)).await.unwrap();
}

/// A GET on Consul's HTTP API, as JSON.
async fn get(consul: &Consul, path: &str) -> Value {
    let resp = reqwest::get(format!("{}{path}", consul.http_addr()))
        .await
        .expect("consul answered");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

/// A PUT on Consul's HTTP API (for foreign registrations a test makes behind our back).
async fn put(consul: &Consul, path: &str, body: &Value) {
    let resp = reqwest::Client::new()
        .put(format!("{}{path}", consul.http_addr()))
        .json(body)
        .send()
        .await
        .expect("consul answered");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
}

/// Instance id -> the catalog's entry, for `service` on every node.
async fn catalog(consul: &Consul, service: &str) -> BTreeMap<(String, String), Value> {
    get(consul, &format!("/v1/catalog/service/{service}"))
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let key = (
                e["Node"].as_str().unwrap().to_owned(),
                e["ServiceID"].as_str().unwrap().to_owned(),
            );
            (key, e)
        })
        .collect()
}

/// The ids of the passing instances of `service`, as a passing-only client sees them.
async fn passing(consul: &Consul, service: &str) -> Vec<String> {
    let mut ids: Vec<String> = get(
        consul,
        &format!("/v1/health/service/{service}?passing=true"),
    )
    .await
    .as_array()
    .cloned()
    .unwrap_or_default()
    .iter()
    .map(|e| e["Service"]["ID"].as_str().unwrap().to_owned())
    .collect();
    ids.sort();
    ids
}

fn ids(service: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let mut ids: Vec<String> = range
        .map(|i| instance_id(service, &format!("pod-{i}"), 50051))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn instances_are_registered_on_the_synthetic_node_with_meta_tags_and_a_passing_check() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    claim_and_sync(&reg, "greeter", &owner("greeter"), first(3)).await;

    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..3));
    let entries = catalog(&consul, "greeter").await;
    let (_, e) = entries.iter().next().unwrap();
    assert_eq!(e["Node"], "grpc-registrar");
    assert_eq!(e["NodeMeta"]["external-node"], "true");
    assert_eq!(e["ServiceAddress"], "10.0.0.0");
    assert_eq!(e["ServicePort"], 50051);
    assert_eq!(e["ServiceTags"], serde_json::json!(["grpc", "v1"]));
    assert_eq!(e["ServiceMeta"]["pod"], "pod-0");
    assert_eq!(e["ServiceMeta"]["zone"], "zone-a");
    assert_eq!(e["ServiceMeta"][OWNER_META], "default/greeter");
    let checks = get(&consul, "/v1/health/node/grpc-registrar").await;
    assert_eq!(checks[0]["CheckID"], ALIVE_CHECK);
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(
        checks[0]["ServiceID"], "",
        "a node-level check covers every instance"
    );
    assert_eq!(reg.name(), "consul");
}

#[tokio::test]
async fn a_second_claimant_gets_conflict_and_writes_nothing_until_it_takes_over() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    claim_and_sync(&reg, "greeter", &owner("first"), first(1)).await;

    let claim = reg.claim("greeter", &owner("second")).await.unwrap();
    let Claim::Conflict {
        owner: holder,
        version,
        target,
    } = claim
    else {
        panic!("expected a conflict, got {claim:?}");
    };
    assert_eq!((holder, target.as_str()), (owner("first"), "greeter"));

    let err = reg
        .sync(&publication("greeter", &owner("second"), first(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OwnershipLost { .. }), "{err}");
    assert_eq!(reg.release("greeter", &owner("second")).await.unwrap(), 0);
    assert_eq!(
        passing(&consul, "greeter").await,
        ids("greeter", 0..1),
        "nothing written"
    );

    // A stale version loses; the current one wins, and the first owner's writes stop.
    assert!(matches!(
        reg.take_over("greeter", &owner("second"), version - 1)
            .await
            .unwrap(),
        Claim::Conflict { .. }
    ));
    assert_eq!(
        reg.take_over("greeter", &owner("second"), version)
            .await
            .unwrap(),
        Claim::Owned
    );
    let stale = registry(&consul, None);
    let err = stale
        .sync(&publication("greeter", &owner("first"), first(2)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OwnershipLost { .. }), "{err}");
    reg.sync(&publication("greeter", &owner("second"), first(4)))
        .await
        .unwrap();
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..4));
}

#[tokio::test]
async fn a_sync_writes_only_the_changes_and_unchanged_instances_keep_their_modify_index() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("greeter");
    claim_and_sync(&reg, "greeter", &who, first(4)).await;
    let before = catalog(&consul, "greeter").await;

    let again = reg
        .sync(&publication("greeter", &who, first(4)))
        .await
        .unwrap();
    assert_eq!(
        (again.puts, again.deletes, again.txns),
        (0, 0, 0),
        "no write at all"
    );

    let mut eps = first(3); // pod-3 goes
    eps[1].metadata.insert("zone".into(), "zone-b".into()); // pod-1 changes
    eps.push(endpoint(9)); // pod-9 comes
    let report = reg.sync(&publication("greeter", &who, eps)).await.unwrap();
    assert_eq!(
        (report.puts, report.deletes, report.txns, report.registered),
        (2, 1, 1, 4)
    );
    let after = catalog(&consul, "greeter").await;
    let index = |m: &BTreeMap<(String, String), Value>, pod: usize| {
        let id = instance_id("greeter", &format!("pod-{pod}"), 50051);
        m[&("grpc-registrar".to_owned(), id)]["ModifyIndex"].as_u64()
    };
    assert_eq!(index(&after, 0), index(&before, 0), "untouched");
    assert_eq!(index(&after, 2), index(&before, 2), "untouched");
    assert_ne!(index(&after, 1), index(&before, 1));
    assert_eq!(
        u64::try_from(report.revision).unwrap(),
        index(&after, 1).unwrap(),
        "the revision is the write's index"
    );
    assert_eq!(after.len(), 4);

    let deletes_only = reg
        .sync(&publication("greeter", &who, first(1)))
        .await
        .unwrap();
    assert_eq!((deletes_only.puts, deletes_only.deletes), (0, 3));
    assert!(deletes_only.revision > report.revision);
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..1));
}

#[tokio::test]
async fn more_than_128_endpoints_are_written_in_several_guarded_txns() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("wide");
    assert_eq!(reg.claim("wide", &who).await.unwrap(), Claim::Owned);
    let report = reg
        .sync(&publication("wide", &who, first(300)))
        .await
        .unwrap();
    // 127 instances per txn beside the ownership guard.
    assert_eq!((report.puts, report.txns, report.registered), (300, 3, 300));
    assert_eq!(passing(&consul, "wide").await, ids("wide", 0..300));
}

#[tokio::test]
async fn a_cold_registration_of_2000_endpoints_completes_and_is_all_passing() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("big");
    let started = Instant::now();
    assert_eq!(reg.claim("big", &who).await.unwrap(), Claim::Owned);
    let report = reg
        .sync(&publication("big", &who, first(2000)))
        .await
        .unwrap();
    let took = started.elapsed();
    println!(
        "consul cold registration: {} endpoints in {} txns, {took:?}",
        report.puts, report.txns
    );
    assert_eq!((report.puts, report.txns), (2000, 16));
    assert_eq!(passing(&consul, "big").await.len(), 2000);
}

/// Registers, behind the backend's back, `service` on `node`.
async fn foreign(consul: &Consul, node: &str, service: &str, id: &str) {
    put(
        consul,
        "/v1/catalog/register",
        &serde_json::json!({
            "Node": node, "Address": "192.0.2.1", "SkipNodeUpdate": true,
            "Service": {"ID": id, "Service": service, "Address": "192.0.2.9", "Port": 7},
        }),
    )
    .await;
}

#[tokio::test]
async fn foreign_instances_are_never_touched_by_sync_or_release() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("greeter");
    claim_and_sync(&reg, "greeter", &who, first(3)).await;
    // The same service on another node, and another service on our node.
    foreign(&consul, "vm-1", "greeter", "greeter-vm").await;
    foreign(&consul, "grpc-registrar", "billing", "billing-1").await;
    let theirs = |m: &BTreeMap<(String, String), Value>, node: &str, id: &str| {
        m[&(node.to_owned(), id.to_owned())]["ModifyIndex"].clone()
    };
    let vm = theirs(&catalog(&consul, "greeter").await, "vm-1", "greeter-vm");
    let billing = theirs(
        &catalog(&consul, "billing").await,
        "grpc-registrar",
        "billing-1",
    );

    let report = reg
        .sync(&publication("greeter", &who, first(1)))
        .await
        .unwrap();
    assert_eq!(report.deletes, 2, "only our own instances were candidates");
    assert_eq!(reg.release("greeter", &who).await.unwrap(), 1);

    let greeter = catalog(&consul, "greeter").await;
    assert_eq!(greeter.len(), 1, "{greeter:?}");
    assert_eq!(theirs(&greeter, "vm-1", "greeter-vm"), vm);
    assert_eq!(
        theirs(
            &catalog(&consul, "billing").await,
            "grpc-registrar",
            "billing-1"
        ),
        billing
    );
    assert_eq!(
        reg.claim("greeter", &owner("next")).await.unwrap(),
        Claim::Owned,
        "record gone"
    );
}

#[tokio::test]
async fn two_clusters_share_one_consul_and_each_syncs_and_releases_only_its_own_instances() {
    let consul = Consul::start().await;
    let east = registry(&consul, Some("east"));
    let west = registry(&consul, Some("west"));
    claim_and_sync(&east, "greeter", &owner("greeter"), first(2)).await;
    claim_and_sync(
        &west,
        "greeter",
        &owner("greeter-w"),
        (2..5).map(endpoint).collect(),
    )
    .await;

    let entries = catalog(&consul, "greeter").await;
    let nodes: Vec<&str> = entries.keys().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        nodes
            .iter()
            .filter(|n| **n == "grpc-registrar-east")
            .count(),
        2
    );
    assert_eq!(
        nodes
            .iter()
            .filter(|n| **n == "grpc-registrar-west")
            .count(),
        3
    );
    assert_eq!(
        passing(&consul, "greeter").await,
        ids("greeter", 0..5),
        "clients see the union"
    );

    // East now wants nothing: west's instances stay; then east releases.
    let report = east
        .sync(&publication("greeter", &owner("greeter"), vec![]))
        .await
        .unwrap();
    assert_eq!(report.deletes, 2);
    assert_eq!(east.release("greeter", &owner("greeter")).await.unwrap(), 0);
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 2..5));
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

#[tokio::test]
async fn a_deposed_leader_is_refused_by_the_consul_fence_and_writes_nothing() {
    let consul = Consul::start().await;
    let old = registry(&consul, None);
    let new = registry(&consul, None);
    old.enable_fencing();
    new.enable_fencing();
    assert!(!old.may_write(), "a follower writes nothing");
    assert!(matches!(
        old.claim("greeter", &owner("greeter")).await.unwrap_err(),
        Error::Fenced { .. }
    ));
    old.fence("old", 1, far()).await.unwrap();
    claim_and_sync(&old, "greeter", &owner("greeter"), first(2)).await;

    new.fence("new", 2, far()).await.unwrap();
    assert_eq!(old.leader_term().await.unwrap(), 2);
    let err = old
        .sync(&publication("greeter", &owner("greeter"), first(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    assert!(!old.may_write(), "deposed by the failed write");
    assert_eq!(
        passing(&consul, "greeter").await,
        ids("greeter", 0..2),
        "nothing written"
    );
    assert!(
        matches!(
            old.fence("old", 1, far()).await.unwrap_err(),
            Error::Fenced { .. }
        ),
        "an earlier term cannot replace a later record"
    );

    claim_and_sync(&new, "greeter", &owner("greeter"), first(3)).await;
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..3));

    let expired = registry(&consul, None);
    expired.enable_fencing();
    expired.fence("new", 2, Instant::now()).await.unwrap();
    assert!(
        !expired.may_write(),
        "a leader past its Lease bound writes nothing"
    );
}

#[tokio::test]
async fn metadata_consul_would_refuse_is_a_spec_error_and_nothing_is_written() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("greeter");
    claim_and_sync(&reg, "greeter", &who, first(1)).await;
    let mut bad = first(3);
    bad[2]
        .metadata
        .insert("app.kubernetes.io/name".into(), "x".into());
    let err = reg
        .sync(&publication("greeter", &who, bad))
        .await
        .unwrap_err();
    let Error::Spec(spec) = &err else {
        panic!("expected a spec error, got {err}");
    };
    assert!(
        spec.to_string().contains("app.kubernetes.io/name"),
        "{spec}"
    );
    let mut long = first(3);
    long[0].metadata.insert("note".into(), "x".repeat(513));
    assert!(matches!(
        reg.sync(&publication("greeter", &who, long)).await,
        Err(Error::Spec(_))
    ));
    assert!(matches!(
        reg.sync(&publication("not.a.label", &who, first(1))).await,
        Err(Error::Spec(_))
    ));
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..1));
}

// --- DNS, by hand: a query over TCP (no truncation) and the SRV answer with its addresses.

fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 33, 0, 1]); // SRV, IN
    q
}

fn dns_name(msg: &[u8], mut pos: usize) -> (String, usize) {
    let mut labels = Vec::new();
    let mut end = None;
    loop {
        let len = usize::from(msg[pos]);
        if len == 0 {
            pos += 1;
            break;
        }
        if len & 0xc0 == 0xc0 {
            end.get_or_insert(pos + 2);
            pos = (len & 0x3f) << 8 | usize::from(msg[pos + 1]);
            continue;
        }
        labels.push(String::from_utf8_lossy(&msg[pos + 1..pos + 1 + len]).into_owned());
        pos += 1 + len;
    }
    (labels.join("."), end.unwrap_or(pos))
}

/// SRV answers of `name`: (port, address of its target from the additional section).
async fn srv(consul: &Consul, name: &str) -> Vec<(u16, IpAddr)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let query = dns_query(name);
    let mut stream = tokio::net::TcpStream::connect(consul.dns_addr())
        .await
        .unwrap();
    stream
        .write_all(&u16::try_from(query.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&query).await.unwrap();
    let len = usize::from(stream.read_u16().await.unwrap());
    let mut msg = vec![0; len];
    stream.read_exact(&mut msg).await.unwrap();
    let count = |at: usize| usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]));
    let (answers, authority, additional) = (count(6), count(8), count(10));
    let mut pos = dns_name(&msg, 12).1 + 4;
    let mut records = Vec::new();
    for _ in 0..answers + authority + additional {
        let (owner, at) = dns_name(&msg, pos);
        let kind = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let rdlen = usize::from(u16::from_be_bytes([msg[at + 8], msg[at + 9]]));
        let rdata = at + 10;
        records.push((owner, kind, rdata, rdlen));
        pos = rdata + rdlen;
    }
    let address = |target: &str| {
        records
            .iter()
            .find_map(|(owner, kind, at, len)| match (kind, len) {
                (1, 4) if owner == target => Some(IpAddr::from(
                    <[u8; 4]>::try_from(&msg[*at..at + 4]).unwrap(),
                )),
                (28, 16) if owner == target => Some(IpAddr::from(
                    <[u8; 16]>::try_from(&msg[*at..at + 16]).unwrap(),
                )),
                _ => None,
            })
    };
    let mut out: Vec<(u16, IpAddr)> = records[..answers]
        .iter()
        .filter(|(_, kind, _, _)| *kind == 33)
        .map(|(_, _, at, _)| {
            let port = u16::from_be_bytes([msg[at + 4], msg[at + 5]]);
            let target = dns_name(&msg, at + 6).0;
            (
                port,
                address(&target).expect("an address for every SRV target"),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn consul_dns_answers_srv_with_the_registered_endpoints() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    claim_and_sync(&reg, "greeter", &owner("greeter"), first(3)).await;
    let want: Vec<(u16, IpAddr)> = first(3).iter().map(|e| (e.port, e.ip)).collect();
    eventually(
        "DNS to answer the three endpoints",
        Duration::from_secs(10),
        || async { srv(&consul, "greeter.service.consul").await == want },
    )
    .await;
}

#[tokio::test]
async fn ipv6_endpoints_are_registered_with_their_address_and_answered_as_aaaa() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let mut eps = first(1);
    eps[0].ip = "fd00::7".parse().unwrap();
    claim_and_sync(&reg, "greeter6", &owner("greeter6"), eps.clone()).await;
    let entries = catalog(&consul, "greeter6").await;
    let (_, e) = entries.iter().next().unwrap();
    assert_eq!(e["ServiceAddress"], "fd00::7");
    eventually("an AAAA answer", Duration::from_secs(10), || async {
        srv(&consul, "greeter6.service.consul").await == [(50051, eps[0].ip)]
    })
    .await;
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<Event>, what: &str) -> Event {
    tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} event within 30 s"))
        .unwrap()
}

#[tokio::test]
async fn a_consul_restart_is_an_outage_announced_once_and_the_registry_is_intact_after() {
    let mut consul = Consul::start().await;
    let reg = registry(&consul, None);
    claim_and_sync(&reg, "greeter", &owner("greeter"), first(3)).await;
    let mut events = reg.events();

    consul.stop();
    let down = next_event(&mut events, "unreachable").await;
    assert!(matches!(down, Event::Unreachable { .. }), "{down:?}");
    assert!(!reg.reachable());
    consul.restart().await;
    let up = next_event(&mut events, "restored").await;
    assert!(matches!(up, Event::Restored { .. }), "{up:?}");
    assert!(reg.reachable());
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..3));
    let report = reg
        .sync(&publication("greeter", &owner("greeter"), first(3)))
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes), (0, 0), "nothing was lost");
}

#[tokio::test]
async fn consul_losing_its_data_is_announced_as_replaced_and_a_resync_restores_every_service() {
    let mut consul = Consul::start().await;
    let reg = registry(&consul, None);
    reg.enable_fencing();
    reg.fence("me", 1, far()).await.unwrap();
    claim_and_sync(&reg, "a", &owner("a"), first(2)).await;
    claim_and_sync(&reg, "b", &owner("b"), first(130)).await;
    let mut events = reg.events();
    let old = reg.incarnation();

    consul.wipe_and_restart().await;
    let replaced = loop {
        match next_event(&mut events, "replaced").await {
            Event::Replaced { old: lost, new, .. } => break (lost, new),
            Event::Unreachable { .. } | Event::Restored { .. } => {}
        }
    };
    assert_eq!(replaced.0, i64::try_from(old).unwrap());
    // What the controller does on that event: reconcile (claim and sync) every service.
    claim_and_sync(&reg, "a", &owner("a"), first(2)).await;
    claim_and_sync(&reg, "b", &owner("b"), first(130)).await;
    assert_eq!(passing(&consul, "a").await, ids("a", 0..2));
    assert_eq!(passing(&consul, "b").await, ids("b", 0..130));
    assert_eq!(
        reg.leader_term().await.unwrap(),
        1,
        "the fence was written again"
    );
}

#[tokio::test]
async fn without_the_controller_consul_leaves_the_synthetic_nodes_check_passing() {
    // Evidence for the documented gap: Consul servers run no check registered through the
    // catalog, so a controller gone for good leaves its instances passing.
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    claim_and_sync(&reg, "greeter", &owner("greeter"), first(2)).await;
    drop(reg);
    put(
        &consul,
        "/v1/catalog/register",
        &serde_json::json!({
            "Node": "grpc-registrar", "Address": "127.0.0.1", "SkipNodeUpdate": true,
            "Check": {"CheckID": "ttl-probe", "Name": "ttl", "Status": "passing",
                      "Definition": {"TTL": "1s"}},
        }),
    )
    .await;
    tokio::time::sleep(TTL * 2).await;
    let checks = get(&consul, "/v1/health/node/grpc-registrar").await;
    let statuses: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["passing", "passing"], "{checks}");
    assert_eq!(passing(&consul, "greeter").await, ids("greeter", 0..2));
}

/// A request to the plain HTTP port with the management token (ACLs on). Retried for a while:
/// right after start, a loaded machine's Consul may refuse the token until its ACL system has
/// caught up with the leader.
async fn admin(consul: &Consul, method: reqwest::Method, path: &str, body: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = reqwest::Client::new()
            .request(method.clone(), format!("{}{path}", consul.http_addr()))
            .header("X-Consul-Token", test_support::consul::MANAGEMENT_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("consul answered");
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.unwrap_or(Value::Null);
        }
        let text = resp.text().await.unwrap_or_default();
        assert!(Instant::now() < deadline, "{path}: {status} {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn over_https_with_a_scoped_acl_token_instances_are_registered_and_without_it_the_refusal_is_clear()
 {
    let ca = test_support::pki::TestCa::new("consul-ca");
    let consul = Consul::start_secured(&ca).await;
    // The rules the README and chart document: the node, the services, the records' prefix.
    admin(
        &consul,
        reqwest::Method::PUT,
        "/v1/acl/policy",
        serde_json::json!({"Name": "grpc-registrar", "Rules":
            "node \"grpc-registrar\" { policy = \"write\" }\nservice_prefix \"\" { policy = \"write\" }\nkey_prefix \"grpc-registrar/\" { policy = \"write\" }\nnode_prefix \"\" { policy = \"read\" }"}),
    )
    .await;
    let token = admin(
        &consul,
        reqwest::Method::PUT,
        "/v1/acl/token",
        serde_json::json!({"Policies": [{"Name": "grpc-registrar"}]}),
    )
    .await["SecretID"]
        .as_str()
        .unwrap()
        .to_owned();
    let https = consul.https_addr().unwrap();
    let secured = |token: Option<String>, ca_pem: Option<Vec<u8>>| {
        ConsulRegistry::connect(
            ConsulConfig {
                token,
                tls: Some(grpc_registrar::registry::consul::ConsulTls {
                    ca: ca_pem,
                    identity: None,
                }),
                request_timeout: Duration::from_secs(3),
                default_ttl: TTL,
                ..ConsulConfig::new(https.clone())
            },
            Arc::new(Metrics::default()),
        )
        .unwrap()
    };

    let reg = secured(Some(token), Some(ca.ca_pem().as_bytes().to_vec()));
    reg.check().await.unwrap();
    claim_and_sync(&reg, "greeter", &owner("greeter"), first(3)).await;
    let listed = admin(
        &consul,
        reqwest::Method::GET,
        "/v1/health/service/greeter?passing=true",
        Value::Null,
    )
    .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");

    // No token: refused by the ACLs, and the error says what was refused where.
    let anonymous = secured(None, Some(ca.ca_pem().as_bytes().to_vec()));
    let err = anonymous
        .claim("other", &owner("other"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&https)
            && (err.contains("403") || err.to_lowercase().contains("permission denied")),
        "{err}"
    );
    // A CA that did not sign Consul's certificate: a TLS error, not a hang.
    let stranger = test_support::pki::TestCa::new("other-ca");
    let untrusted = secured(None, Some(stranger.ca_pem().as_bytes().to_vec()));
    let err = untrusted.check().await.unwrap_err().to_string();
    assert!(err.contains(&https), "{err}");
}

#[tokio::test]
async fn a_publication_record_is_written_only_by_the_owner_and_released_with_its_service() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("greeter");
    claim_and_sync(&reg, "greeter", &who, first(2)).await;
    reg.record_publication("greeter", &who, b"spec v1")
        .await
        .unwrap();
    // A new process reads what the registry holds.
    let again = registry(&consul, None);
    assert_eq!(
        again.publication_record(&who.uid).await.unwrap().as_deref(),
        Some(&b"spec v1"[..])
    );
    assert!(matches!(
        again
            .record_publication("greeter", &owner("intruder"), b"x")
            .await,
        Err(grpc_registrar::registry::Error::OwnershipLost { .. })
    ));
    assert_eq!(
        again.publication_records().await.unwrap(),
        vec![(who.uid.clone(), b"spec v1".to_vec())],
        "listed with every record"
    );
    assert_eq!(again.release("greeter", &who).await.unwrap(), 2);
    assert_eq!(again.publication_record(&who.uid).await.unwrap(), None);
    assert!(again.publication_records().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_claim_that_creates_the_ownership_record_writes_the_publication_record_with_it() {
    let consul = Consul::start().await;
    let reg = registry(&consul, None);
    let who = owner("greeter");
    assert_eq!(
        reg.claim_recording("greeter", &who, b"spec").await.unwrap(),
        (Claim::Owned, true)
    );
    // A new process claims what it already owns: the record is left to the reconcile.
    let again = registry(&consul, None);
    assert_eq!(
        again
            .claim_recording("greeter", &who, b"other")
            .await
            .unwrap(),
        (Claim::Owned, false)
    );
    assert_eq!(
        again.publication_record(&who.uid).await.unwrap().as_deref(),
        Some(&b"spec"[..])
    );
    // Anyone else's claim is a conflict and records nothing.
    let intruder = owner("intruder");
    let (claim, recorded) = again
        .claim_recording("greeter", &intruder, b"x")
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Conflict { .. }), "{claim:?}");
    assert!(!recorded);
    assert_eq!(again.publication_record(&intruder.uid).await.unwrap(), None);
    // Released: the publication record goes with it.
    assert_eq!(reg.release("greeter", &who).await.unwrap(), 0);
    assert_eq!(again.publication_record(&who.uid).await.unwrap(), None);
}
