//! The registry against a real etcd: leases, batching, lease loss, ownership, cleanup.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_registrar::desired::LogicalEndpoint;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry, Layout};
use grpc_registrar::registry::{Backend, Claim, Owner, Publication};
use test_support::{EtcdServer, eventually};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};

const TTL: Duration = Duration::from_secs(5);

async fn registry(etcd: &EtcdServer) -> (EtcdRegistry, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let config = EtcdConfig {
        default_ttl: TTL,
        op_timeout: Duration::from_secs(2),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    };
    (
        EtcdRegistry::connect(config, metrics.clone())
            .await
            .unwrap(),
        metrics,
    )
}

fn owner(name: &str) -> Owner {
    Owner {
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        name: name.into(),
    }
}

fn entries(target: &str, n: usize) -> Arc<BTreeMap<String, Vec<u8>>> {
    Arc::new(
        (0..n)
            .map(|i| {
                let addr = format!("10.{}.{}.{}:50051", i / 65536, (i / 256) % 256, i % 256);
                let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr.clone()));
                (format::endpoint_key(target, &addr), value)
            })
            .collect(),
    )
}

/// Key -> (value, lease) under a prefix.
async fn dump(etcd: &EtcdServer, prefix: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    test_support::registry::dump(&mut etcd.client().await, prefix)
        .await
        .into_iter()
        .map(|(k, s)| (k, (s.value, s.lease)))
        .collect()
}

async fn claim_and_sync(reg: &EtcdRegistry, target: &str, who: &Owner, n: usize) {
    assert_eq!(reg.claim(target, who).await.unwrap(), Claim::Owned);
    reg.sync_entries(target, who, TTL, entries(target, n))
        .await
        .unwrap();
}

#[tokio::test]
async fn keys_appear_on_one_shared_lease_in_etcd_naming_format() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    claim_and_sync(&reg, "services/default/a", &owner("a"), 3).await;
    claim_and_sync(&reg, "services/default/b", &owner("b"), 2).await;

    let leases = reg.lease_ids().await;
    assert_eq!(leases.len(), 1, "one lease per controller and TTL");
    let keys = dump(&etcd, "services/").await;
    assert_eq!(keys.len(), 5);
    for (key, (value, lease)) in &keys {
        assert_eq!(*lease, leases[0], "{key}");
        let ep = format::parse(value).unwrap();
        assert!(key.ends_with(&format!("/{}", ep.addr)));
        assert!(
            std::str::from_utf8(value)
                .unwrap()
                .starts_with(r#"{"Op":0,"Addr":"#)
        );
    }
}

#[tokio::test]
async fn a_key_that_is_no_longer_desired_is_deleted_and_unchanged_keys_are_not_rewritten() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/greeter";
    claim_and_sync(&reg, target, &owner("greeter"), 2).await;
    let before = dump(&etcd, "services/").await;

    let mut one = (*entries(target, 2)).clone();
    let dropped = one.keys().last().unwrap().clone();
    one.remove(&dropped);
    let report = reg
        .sync_entries(target, &owner("greeter"), TTL, Arc::new(one))
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes), (0, 1));
    let after = dump(&etcd, "services/").await;
    assert!(!after.contains_key(&dropped));
    assert_eq!(after.len(), 1);
    assert_eq!(
        after.iter().next(),
        before.iter().find(|(k, _)| **k != dropped)
    );
}

#[tokio::test]
async fn a_new_process_adopts_the_live_lease_and_rewrites_nothing() {
    let etcd = EtcdServer::start().await;
    let target = "services/default/greeter";
    let (first, _) = registry(&etcd).await;
    claim_and_sync(&first, target, &owner("greeter"), 50).await;
    let lease = first.lease_ids().await[0];
    let before = dump(&etcd, "services/").await;
    // The process dies (its keeper stops; the lease lives on until its TTL).
    drop(first);

    let (second, metrics) = registry(&etcd).await;
    assert_eq!(
        second.claim(target, &owner("greeter")).await.unwrap(),
        Claim::Owned
    );
    let report = second
        .sync_entries(target, &owner("greeter"), TTL, entries(target, 50))
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes, report.txns), (0, 0, 0));
    assert_eq!(report.lease, Some(lease), "the live lease was adopted");
    assert_eq!(metrics.lease.adoptions.get(), 1);
    assert_eq!(metrics.lease.grants.get(), 0);
    // Past the TTL: the adopted lease is kept alive and every key is where it was.
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    assert_eq!(dump(&etcd, "services/").await, before);
}

#[tokio::test]
async fn a_new_process_keeps_the_live_lease_alive_from_its_start_before_any_write() {
    // Found by the soak: a new leader adopted the lease only at its first write, which waited
    // for its caches to re-list after a kube-apiserver restart; the dead leader's lease expired
    // meanwhile and every key was deleted and put again.
    let etcd = EtcdServer::start().await;
    let target = "services/default/greeter";
    let (first, _) = registry(&etcd).await;
    claim_and_sync(&first, target, &owner("greeter"), 5).await;
    let lease = first.lease_ids().await[0];
    let before = dump(&etcd, "services/").await;
    drop(first);

    let (second, metrics) = registry(&etcd).await;
    assert_eq!(second.lease_ids().await, [lease], "adopted at start");
    assert_eq!(metrics.lease.adoptions.get(), 1);
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    assert_eq!(
        dump(&etcd, "services/").await,
        before,
        "no write, no expiry"
    );
}

#[tokio::test]
async fn a_new_leader_adopts_a_lease_granted_after_it_started_once_it_is_fenced() {
    let etcd = EtcdServer::start().await;
    let target = "services/default/greeter";
    let far = || Instant::now() + Duration::from_secs(600);
    // b starts first: there is no lease to adopt yet.
    let (b, _) = registry(&etcd).await;
    b.enable_fencing();
    assert!(b.lease_ids().await.is_empty());
    let (a, _) = registry(&etcd).await;
    a.enable_fencing();
    a.fence("a", 1, far()).await.unwrap();
    claim_and_sync(&a, target, &owner("greeter"), 5).await;
    let lease = a.lease_ids().await[0];
    let before = dump(&etcd, "services/").await;
    // a dies; b is elected and fenced, and writes nothing yet.
    drop(a);
    Backend::fence(&b, "b", 2, far()).await.unwrap();
    assert_eq!(
        b.lease_ids().await,
        [lease],
        "adopted on becoming the leader"
    );
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    assert_eq!(dump(&etcd, "services/").await, before);
}

#[tokio::test]
async fn a_lease_that_is_gone_is_not_adopted_and_every_key_is_put_again() {
    let etcd = EtcdServer::start().await;
    let target = "services/default/greeter";
    let (first, _) = registry(&etcd).await;
    claim_and_sync(&first, target, &owner("greeter"), 5).await;
    let lease = first.lease_ids().await[0];
    drop(first);
    etcd.client().await.lease_revoke(lease).await.unwrap();

    let (second, metrics) = registry(&etcd).await;
    claim_and_sync(&second, target, &owner("greeter"), 5).await;
    let new = second.lease_ids().await[0];
    assert_ne!(new, lease);
    assert_eq!(
        (metrics.lease.adoptions.get(), metrics.lease.grants.get()),
        (0, 1)
    );
    let keys = dump(&etcd, "services/").await;
    assert_eq!(keys.len(), 5);
    assert!(keys.values().all(|(_, l)| *l == new));
}

#[tokio::test]
async fn lease_loss_is_announced_with_a_new_lease_and_the_next_sync_re_puts_everything() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    claim_and_sync(&reg, "services/default/a", &owner("a"), 3).await;
    claim_and_sync(&reg, "services/default/b", &owner("b"), 200).await;
    let old = reg.lease_ids().await[0];
    let mut events = reg.events();

    etcd.client().await.lease_revoke(old).await.unwrap();
    assert!(
        dump(&etcd, "services/").await.is_empty(),
        "revoking drops the keys"
    );
    let new = replaced(&mut events).await;
    assert_eq!(new.0, old);
    // What the controller does on that event: reconcile (re-sync) every service.
    claim_and_sync(&reg, "services/default/a", &owner("a"), 3).await;
    claim_and_sync(&reg, "services/default/b", &owner("b"), 200).await;
    let keys = dump(&etcd, "services/").await;
    assert_eq!(keys.len(), 203);
    assert!(
        keys.values().all(|(_, lease)| *lease == new.1),
        "all on the new lease"
    );
    assert_eq!(reg.lease_ids().await, [new.1]);
    assert_eq!(metrics.lease.losses.get(), 1);
}

/// Waits for the registry to announce a replaced lease; (old, new).
async fn replaced(
    events: &mut tokio::sync::broadcast::Receiver<grpc_registrar::registry::Event>,
) -> (i64, i64) {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(grpc_registrar::registry::Event::Replaced { old, new, .. }) =
                events.recv().await
            {
                return (old, new);
            }
        }
    })
    .await
    .expect("no lease replacement announced within 15 s")
}

#[tokio::test]
async fn a_second_claimant_gets_conflict_and_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/greeter";
    claim_and_sync(&reg, target, &owner("first"), 1).await;

    let claim = reg.claim(target, &owner("second")).await.unwrap();
    let Claim::Conflict { owner: holder, .. } = claim else {
        panic!("expected a conflict, got {claim:?}");
    };
    assert_eq!(holder, owner("first"));

    let err = reg
        .sync_entries(target, &owner("second"), TTL, entries(target, 5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, grpc_registrar::registry::Error::OwnershipLost { .. }),
        "{err}"
    );
    assert_eq!(
        dump(&etcd, "services/").await.len(),
        1,
        "the guarded txn wrote nothing"
    );
    assert_eq!(
        reg.claim(target, &owner("first")).await.unwrap(),
        Claim::Owned
    );
}

#[tokio::test]
async fn a_target_nested_in_or_containing_an_owned_one_is_a_conflict_naming_it() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    claim_and_sync(&reg, "shared/hello", &owner("victim"), 2).await;
    for outer_or_inner in ["shared", "shared/hello/v2", "shared/hello/v2/x"] {
        let claim = reg.claim(outer_or_inner, &owner("attacker")).await.unwrap();
        let Claim::Conflict {
            owner: holder,
            target,
            version,
        } = claim
        else {
            panic!("{outer_or_inner}: expected a conflict, got {claim:?}");
        };
        assert_eq!((holder, target.as_str()), (owner("victim"), "shared/hello"));
        // Not even a takeover (the owner looked stale) gets past the nesting check.
        assert!(matches!(
            reg.take_over(outer_or_inner, &owner("attacker"), version)
                .await
                .unwrap(),
            Claim::Conflict { .. }
        ));
    }
    // A sibling that only shares a string prefix is not nested.
    assert_eq!(
        reg.claim("shared/hellox", &owner("other")).await.unwrap(),
        Claim::Owned
    );
    assert_eq!(
        dump(&etcd, "shared/hello/").await.len(),
        2,
        "the victim's keys are untouched"
    );
}

#[tokio::test]
async fn a_thousand_endpoints_apply_in_txns_of_at_most_128_ops() {
    let etcd = EtcdServer::start_with(&["--max-txn-ops=128"]).await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/big";
    assert_eq!(
        reg.claim(target, &owner("big")).await.unwrap(),
        Claim::Owned
    );
    let report = reg
        .sync_entries(target, &owner("big"), TTL, entries(target, 1000))
        .await
        .unwrap();
    assert_eq!(report.puts, 1000);
    assert_eq!(report.txns, 8, "ceil(1000 / 128)");
    assert_eq!(dump(&etcd, "services/").await.len(), 1000);
}

#[tokio::test]
async fn large_values_are_written_in_txns_bounded_by_bytes_under_etcds_request_limit() {
    // etcd's default request limit (1.5 MiB): three 600 KB values in one txn would be refused
    // with "etcdserver: request is too large".
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/fat";
    assert_eq!(
        reg.claim(target, &owner("fat")).await.unwrap(),
        Claim::Owned
    );
    let big: BTreeMap<String, Vec<u8>> = (0..3)
        .map(|i| (format!("{target}/10.0.0.{i}:50051"), vec![b'x'; 600 * 1024]))
        .collect();
    let report = reg
        .sync_entries(target, &owner("fat"), TTL, Arc::new(big))
        .await
        .unwrap();
    assert_eq!(
        (report.puts, report.txns),
        (3, 3),
        "one 600 KB value per txn"
    );
    assert_eq!(dump(&etcd, "services/").await.len(), 3);
}

#[tokio::test]
async fn release_removes_exactly_the_owned_keys_and_leaves_foreign_keys_alone() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/foo";
    claim_and_sync(&reg, target, &owner("foo"), 4).await;
    let mut client = etcd.client().await;
    for foreign in [
        "services/default/foo_bar/1.2.3.4:5",
        "/etcdv3_resolver/foo/1.2.3.4:5",
        "services/default/foo",
    ] {
        client.put(foreign, "1.2.3.4:5", None).await.unwrap();
    }

    assert_eq!(
        reg.release(target, &owner("intruder")).await.unwrap(),
        0,
        "not the owner: no-op"
    );
    assert_eq!(dump(&etcd, "services/default/foo/").await.len(), 4);

    assert_eq!(reg.release(target, &owner("foo")).await.unwrap(), 4);
    assert!(dump(&etcd, "services/default/foo/").await.is_empty());
    assert!(dump(&etcd, &reg.owner_key(target)).await.is_empty());
    let left: Vec<String> = dump(&etcd, "").await.into_keys().collect();
    assert_eq!(
        left,
        [
            "/etcdv3_resolver/foo/1.2.3.4:5",
            // The controller's record of its live lease (on that lease), for the next process.
            "grpc-registrar/lease/5",
            "services/default/foo",
            "services/default/foo_bar/1.2.3.4:5"
        ]
    );
}

#[tokio::test]
async fn keep_alive_rebuilds_its_stream_across_an_etcd_restart_and_the_lease_survives() {
    let mut etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    claim_and_sync(&reg, "services/default/a", &owner("a"), 3).await;
    let lease = reg.lease_ids().await[0];

    etcd.restart().await;
    let restarted = Instant::now();
    let renewed = metrics.lease.keepalives.get();
    // Past a full TTL after the restart, renewals must have resumed on the same lease.
    eventually(
        "keep-alives resumed for longer than the ttl",
        TTL * 4,
        || async {
            metrics.lease.keepalives.get() >= renewed + 2
                && restarted.elapsed() > TTL + Duration::from_secs(1)
        },
    )
    .await;
    let keys = dump(&etcd, "services/").await;
    assert_eq!(keys.len(), 3);
    assert!(
        keys.values().all(|(_, l)| *l == lease),
        "same lease, never lost"
    );
    assert_eq!(metrics.lease.losses.get(), 0);
}

#[tokio::test]
async fn wiped_etcd_announces_a_new_lease_and_the_next_sync_restores_records_and_keys() {
    let mut etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/a";
    claim_and_sync(&reg, target, &owner("a"), 3).await;
    let mut events = reg.events();

    etcd.wipe_and_restart().await;
    replaced(&mut events).await;
    // The claim cache was cleared with the lease, so the re-sync claims the target afresh.
    claim_and_sync(&reg, target, &owner("a"), 3).await;
    assert_eq!(dump(&etcd, "services/").await.len(), 3);
    assert_eq!(dump(&etcd, &reg.owner_key(target)).await.len(), 1);
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

#[tokio::test]
async fn a_deposed_leader_is_refused_by_the_etcd_fence_and_the_new_leaders_keys_survive() {
    let etcd = EtcdServer::start().await;
    let (old, _) = registry(&etcd).await;
    let (new, _) = registry(&etcd).await;
    let (target, who) = ("services/default/a", owner("a"));
    old.enable_fencing();
    new.enable_fencing();

    old.fence("old", 1, far()).await.unwrap();
    claim_and_sync(&old, target, &who, 3).await;
    // The new leader takes over (its Lease term is later) and re-puts under its own lease.
    new.fence("new", 2, far()).await.unwrap();
    claim_and_sync(&new, target, &who, 2).await;
    let after_takeover = dump(&etcd, "services/").await;

    // The old leader still believes its local Lease bound: only etcd can stop it.
    assert!(old.may_write());
    let err = old
        .sync_entries(target, &who, TTL, entries(target, 3))
        .await
        .unwrap_err();
    assert!(
        matches!(err, grpc_registrar::registry::Error::Fenced { .. }),
        "{err}"
    );
    assert!(
        !old.may_write(),
        "a fenced leader must stop writing at once"
    );
    assert!(matches!(
        old.release(target, &who).await,
        Err(grpc_registrar::registry::Error::Fenced { .. })
    ));
    assert_eq!(dump(&etcd, "services/").await, after_takeover);
    assert_eq!(after_takeover.len(), 2);
}

#[tokio::test]
async fn an_earlier_term_cannot_replace_a_later_leader_record() {
    let etcd = EtcdServer::start().await;
    let (a, _) = registry(&etcd).await;
    let (b, _) = registry(&etcd).await;
    a.enable_fencing();
    b.enable_fencing();
    b.fence("b", 5, far()).await.unwrap();
    assert!(matches!(
        a.fence("a", 4, far()).await,
        Err(grpc_registrar::registry::Error::Fenced { .. })
    ));
    assert_eq!(a.leader_term().await.unwrap(), 5);
    // Re-fencing the same term by the same holder is idempotent.
    b.fence("b", 5, far()).await.unwrap();
    a.fence("a", 6, far()).await.unwrap();
    assert_eq!(b.leader_term().await.unwrap(), 6);
}

#[tokio::test]
async fn a_follower_and_a_leader_past_its_lease_bound_write_nothing() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let (target, who) = ("services/default/a", owner("a"));
    reg.enable_fencing();
    assert!(!reg.may_write());
    assert!(matches!(
        reg.claim(target, &who).await,
        Err(grpc_registrar::registry::Error::Fenced { .. })
    ));
    reg.fence("me", 1, Instant::now()).await.unwrap();
    assert!(!reg.may_write());
    assert!(matches!(
        reg.sync_entries(target, &who, TTL, entries(target, 1))
            .await,
        Err(grpc_registrar::registry::Error::Fenced { .. })
    ));
    reg.extend_fence(far());
    claim_and_sync(&reg, target, &who, 1).await;
    assert_eq!(dump(&etcd, "services/").await.len(), 1);
    reg.depose();
    assert!(!reg.may_write());
}

async fn cluster_registry(etcd: &EtcdServer, cluster: &str) -> EtcdRegistry {
    let config = EtcdConfig {
        default_ttl: TTL,
        op_timeout: Duration::from_secs(2),
        cluster: Some(cluster.into()),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    };
    EtcdRegistry::connect(config, Arc::new(Metrics::default()))
        .await
        .unwrap()
}

fn keyed(target: &str, addrs: &[&str]) -> Arc<BTreeMap<String, Vec<u8>>> {
    Arc::new(
        addrs
            .iter()
            .map(|addr| {
                let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(*addr));
                (format::endpoint_key(target, addr), value)
            })
            .collect(),
    )
}

#[tokio::test]
async fn two_clusters_share_a_target_and_each_syncs_and_releases_only_its_own_keys() {
    let etcd = EtcdServer::start().await;
    let east = cluster_registry(&etcd, "east").await;
    let west = cluster_registry(&etcd, "west").await;
    let target = "services/default/greeter";
    // The same GrpcService (same namespace and name, another uid) in each cluster.
    let (e, w) = (
        owner("greeter"),
        Owner {
            uid: "uid-west".into(),
            ..owner("greeter")
        },
    );
    assert_eq!(east.claim(target, &e).await.unwrap(), Claim::Owned);
    assert_eq!(
        west.claim(target, &w).await.unwrap(),
        Claim::Owned,
        "a scope per cluster"
    );
    east.sync_entries(
        target,
        &e,
        TTL,
        keyed(target, &["10.1.0.1:50051", "10.1.0.2:50051"]),
    )
    .await
    .unwrap();
    west.sync_entries(target, &w, TTL, keyed(target, &["10.2.0.1:50051"]))
        .await
        .unwrap();
    let west_key = format!("{target}/10.2.0.1:50051");
    let before = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(before.len(), 3, "clients see the union");

    // East's pod leaves: only east's key goes.
    let report = east
        .sync_entries(target, &e, TTL, keyed(target, &["10.1.0.1:50051"]))
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes), (0, 1));
    // A desired key another cluster holds (an address both report) is left to it.
    let report = east
        .sync_entries(
            target,
            &e,
            TTL,
            keyed(target, &["10.1.0.1:50051", "10.2.0.1:50051"]),
        )
        .await
        .unwrap();
    assert_eq!((report.puts, report.registered), (0, 1));
    let after = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(
        after.get(&west_key),
        before.get(&west_key),
        "west's key untouched"
    );

    // East deletes its GrpcService: only its keys and its record go.
    assert_eq!(east.release(target, &e).await.unwrap(), 1);
    let left = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(left.keys().collect::<Vec<_>>(), [&west_key]);
    assert_eq!(left.get(&west_key), before.get(&west_key));
    assert_eq!(west.claim(target, &w).await.unwrap(), Claim::Owned);
    assert_ne!(east.leader_key(), west.leader_key(), "a fence per cluster");
    assert_ne!(east.owner_key(target), west.owner_key(target));
}

#[tokio::test]
async fn naming_the_cluster_later_adopts_the_keys_it_still_wants_and_deletes_no_unmarked_one() {
    let etcd = EtcdServer::start().await;
    let target = "services/default/greeter";
    // Published before clusters were named: keys on an unmarked lease.
    let (before, _) = registry(&etcd).await;
    claim_and_sync(&before, target, &owner("greeter"), 2).await;
    let keys: Vec<String> = dump(&etcd, &format!("{target}/"))
        .await
        .into_keys()
        .collect();
    let east = cluster_registry(&etcd, "east").await;
    assert_eq!(
        east.claim(target, &owner("greeter")).await.unwrap(),
        Claim::Owned
    );
    let wanted = Arc::new(
        entries(target, 2)
            .iter()
            .take(1)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    );
    let report = east
        .sync_entries(target, &owner("greeter"), TTL, wanted)
        .await
        .unwrap();
    assert_eq!(
        (report.puts, report.deletes),
        (1, 0),
        "adopted, nothing deleted"
    );
    let after = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        keys.iter().collect::<Vec<_>>()
    );
    assert_eq!(Some(after[&keys[0]].1), report.lease, "on east's lease now");
}

#[tokio::test]
async fn a_publication_record_is_written_only_by_the_owner_and_released_with_its_target() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let target = "services/default/greeter";
    let who = owner("greeter");
    claim_and_sync(&reg, target, &who, 2).await;
    reg.record_publication(target, &who, b"spec v1")
        .await
        .unwrap();
    // A new process reads what the registry holds.
    let (again, _) = registry(&etcd).await;
    assert_eq!(
        again.publication_record(&who.uid).await.unwrap().as_deref(),
        Some(&b"spec v1"[..])
    );
    assert!(matches!(
        again
            .record_publication(target, &owner("intruder"), b"x")
            .await,
        Err(grpc_registrar::registry::Error::OwnershipLost { .. })
    ));
    assert_eq!(again.release(target, &who).await.unwrap(), 2);
    assert_eq!(again.publication_record(&who.uid).await.unwrap(), None);
}

// --- What this process knows is under a target: no range while it is the only writer.

/// How many ranges of target keys the registry has sent, as its request metric counts them.
fn ranges(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find(|line| {
            line.starts_with("grpc_registrar_registry_request_duration_seconds_count{")
                && line.contains(r#"backend="etcd""#)
                && line.contains(r#"op="range""#)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// How many txns the registry has sent, as its request metric counts them.
fn txns(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "grpc_registrar_registry_request_duration_seconds_count{backend=\"etcd\",op=\"txn\"} ",
            )?
            .parse()
            .ok()
        })
        .unwrap_or(0)
}

async fn sync(reg: &EtcdRegistry, target: &str, who: &Owner, n: usize) -> (usize, usize) {
    let report = reg
        .sync_entries(target, who, TTL, entries(target, n))
        .await
        .unwrap();
    (report.puts, report.deletes)
}

#[tokio::test]
async fn a_second_sync_of_an_unchanged_target_sends_no_range_and_a_change_is_diffed_against_what_was_written()
 {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    claim_and_sync(&reg, target, &who, 50).await;
    let listed = ranges(&metrics);
    assert_eq!(
        listed, 0,
        "a target its own claim created is written without a range"
    );

    assert_eq!(sync(&reg, target, &who, 50).await, (0, 0));
    assert_eq!(ranges(&metrics), listed, "nothing changed: no range");
    assert_eq!(sync(&reg, target, &who, 49).await, (0, 1));
    assert_eq!(sync(&reg, target, &who, 51).await, (2, 0));
    assert_eq!(ranges(&metrics), listed, "the writes are known: no range");
    assert_eq!(dump(&etcd, &format!("{target}/")).await.len(), 51);
}

#[tokio::test]
async fn a_key_deleted_by_hand_is_put_back_by_the_first_sync_once_the_known_listing_expired() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    claim_and_sync(&reg, target, &who, 3).await;
    let gone = entries(target, 3).keys().next().unwrap().clone();
    etcd.client()
        .await
        .delete(gone.as_str(), None)
        .await
        .unwrap();

    // Within the bound, the listing this process wrote is trusted.
    assert_eq!(sync(&reg, target, &who, 3).await, (0, 0));
    // Past it (here: a bound of zero), the next sync lists and heals.
    reg.trust_listings_for(Duration::ZERO);
    assert_eq!(sync(&reg, target, &who, 3).await, (1, 0));
    assert_eq!(ranges(&metrics), 1, "only the sync past the bound lists");
    assert!(dump(&etcd, &format!("{target}/")).await.contains_key(&gone));
}

#[tokio::test]
async fn with_a_cluster_name_every_sync_lists_the_target() {
    let etcd = EtcdServer::start().await;
    let metrics = Arc::new(Metrics::default());
    let config = EtcdConfig {
        default_ttl: TTL,
        op_timeout: Duration::from_secs(2),
        cluster: Some("east".into()),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    };
    let reg = EtcdRegistry::connect(config, metrics.clone())
        .await
        .unwrap();
    let (target, who) = ("services/default/greeter", owner("greeter"));
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(sync(&reg, target, &who, 3).await, (0, 0));
    assert_eq!(sync(&reg, target, &who, 3).await, (0, 0));
    assert_eq!(
        ranges(&metrics),
        2,
        "other clusters write there too: every sync after the first (written in one txn) lists"
    );
}

#[tokio::test]
async fn a_failed_ownership_guard_drops_the_known_listing_and_the_next_sync_lists_again() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    claim_and_sync(&reg, target, &who, 3).await;
    let mut client = etcd.client().await;
    intruder_takes_the_record_and_the_next_sync_is_refused(&etcd, &reg, target, &who).await;
    // The intruder writes under the target, then hands it back.
    let intruded = format!("{target}/10.9.9.9:50051");
    client.put(intruded.as_str(), "x", None).await.unwrap();
    client
        .put(reg.owner_key(target), who.record(), None)
        .await
        .unwrap();
    let before = ranges(&metrics);
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(ranges(&metrics), before + 1, "listed again");
    let keys = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(keys.len(), 3);
    assert!(
        !keys.contains_key(&intruded),
        "what it did not know is seen"
    );
}

#[tokio::test]
async fn a_new_term_or_a_replaced_lease_lists_the_target_again_and_a_released_one_is_checked_empty()
{
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    reg.enable_fencing();
    reg.fence("me", 1, far()).await.unwrap();
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(sync(&reg, target, &who, 3).await, (0, 0));
    assert_eq!(
        ranges(&metrics),
        0,
        "a claim it created: written in one txn"
    );

    // A later term (another leader may have written in between).
    reg.fence("me", 2, far()).await.unwrap();
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(ranges(&metrics), 1, "a new term lists");
    assert_eq!(sync(&reg, target, &who, 3).await, (0, 0));
    assert_eq!(ranges(&metrics), 1);

    // The lease is lost, with every key on it.
    let mut events = reg.events();
    let old = reg.lease_ids().await[0];
    etcd.client().await.lease_revoke(old).await.unwrap();
    replaced(&mut events).await;
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(ranges(&metrics), 2, "a replaced lease lists");
    assert_eq!(dump(&etcd, &format!("{target}/")).await.len(), 3);

    // Released; a server then registers itself there; then the target is published again.
    reg.release(target, &who).await.unwrap();
    let registered = format!("{target}/10.9.9.9:50051");
    etcd.client()
        .await
        .put(registered.as_str(), "self", None)
        .await
        .unwrap();
    claim_and_sync(&reg, target, &who, 3).await;
    assert_eq!(
        ranges(&metrics),
        2,
        "the first write's own txn found the key, and read the target"
    );
    let keys = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(
        !keys.contains_key(&registered),
        "nothing it knew is trusted"
    );
}

#[tokio::test]
async fn every_publication_record_of_this_cluster_is_listed_across_pages_and_no_other_clusters() {
    use futures::StreamExt;
    let etcd = EtcdServer::start().await;
    let east = cluster_registry(&etcd, "east").await;
    let west = cluster_registry(&etcd, "west").await;
    // More than one page of records (a page is 1,000).
    let n = 1_100;
    futures::stream::iter(0..n)
        .map(|i| {
            let east = &east;
            async move {
                let (target, who) = (format!("services/default/s{i}"), owner(&format!("s{i}")));
                assert_eq!(east.claim(&target, &who).await.unwrap(), Claim::Owned);
                east.record_publication(&target, &who, format!("spec {i}").as_bytes())
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    let west_owner = owner("w");
    assert_eq!(
        west.claim("services/default/w", &west_owner).await.unwrap(),
        Claim::Owned
    );
    west.record_publication("services/default/w", &west_owner, b"west")
        .await
        .unwrap();

    let listed: BTreeMap<String, Vec<u8>> = east
        .publication_records()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(listed.len(), n);
    assert_eq!(listed[&owner("s7").uid], b"spec 7");
    assert!(
        !listed.contains_key(&west_owner.uid),
        "west's record is not east's"
    );
    let west_listed = west.publication_records().await.unwrap();
    assert_eq!(
        west_listed,
        vec![(west_owner.uid.clone(), b"west".to_vec())]
    );
}

#[tokio::test]
async fn concurrent_first_syncs_record_the_lease_once() {
    use futures::StreamExt;
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let n: u32 = 64;
    futures::stream::iter(0..n)
        .map(|i| {
            let reg = &reg;
            async move {
                claim_and_sync(
                    reg,
                    &format!("services/default/s{i}"),
                    &owner(&format!("s{i}")),
                    1,
                )
                .await;
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    // A claim and a sync per target, and one txn recording the lease.
    assert_eq!(txns(&metrics), u64::from(2 * n + 1));
}

// --- A first start: one txn claims and records, one writes the keys.

#[tokio::test]
async fn a_claim_that_creates_the_ownership_record_writes_the_publication_record_in_the_same_txn() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    let before = txns(&metrics);
    assert_eq!(
        reg.claim_recording(target, &who, b"spec").await.unwrap(),
        (Claim::Owned, true)
    );
    assert_eq!(txns(&metrics), before + 1, "one txn for both records");
    assert_eq!(
        reg.publication_record(&who.uid).await.unwrap(),
        Some(b"spec".to_vec())
    );

    // A new process claims what it already owns: the record is left to the reconcile.
    let (again, _) = registry(&etcd).await;
    assert_eq!(
        again.claim_recording(target, &who, b"other").await.unwrap(),
        (Claim::Owned, false)
    );
    assert_eq!(
        again.publication_record(&who.uid).await.unwrap(),
        Some(b"spec".to_vec())
    );

    // Anyone else's claim is a conflict and records nothing.
    let intruder = owner("intruder");
    let (claim, recorded) = again
        .claim_recording(target, &intruder, b"x")
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Conflict { .. }), "{claim:?}");
    assert!(!recorded);
    assert_eq!(again.publication_record(&intruder.uid).await.unwrap(), None);
}

#[tokio::test]
async fn the_first_sync_of_a_target_its_claim_created_puts_every_key_in_one_txn_and_reads_nothing()
{
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    assert_eq!(reg.claim(target, &who).await.unwrap(), Claim::Owned);
    let report = reg
        .sync_entries(target, &who, TTL, entries(target, 50))
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes, report.txns), (50, 0, 1));
    assert_eq!(ranges(&metrics), 0);
    let keys = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(keys.len(), 50);
    let leases: std::collections::BTreeSet<i64> = keys.values().map(|(_, l)| *l).collect();
    assert_eq!(leases.len(), 1, "every key on the shared lease");

    // Known from then on: a change is diffed against what was written.
    assert_eq!(sync(&reg, target, &who, 49).await, (0, 1));
    assert_eq!(ranges(&metrics), 0);
}

#[tokio::test]
async fn a_first_sync_that_finds_keys_under_a_target_it_just_claimed_syncs_from_what_it_read() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    // Servers registered themselves there before the controller took the target over: one
    // at an address the controller also publishes, one at an address it does not.
    let wanted = entries(target, 3);
    let kept = wanted.keys().next().unwrap().clone();
    let stray = format!("{target}/10.9.9.9:50051");
    let mut client = etcd.client().await;
    client.put(kept.as_str(), "self", None).await.unwrap();
    client.put(stray.as_str(), "self", None).await.unwrap();

    assert_eq!(reg.claim(target, &who).await.unwrap(), Claim::Owned);
    let report = reg
        .sync_entries(target, &who, TTL, wanted.clone())
        .await
        .unwrap();
    assert_eq!((report.puts, report.deletes), (3, 1), "{report:?}");
    assert_eq!(
        ranges(&metrics),
        0,
        "the listing came back with the refused write"
    );
    let keys = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(
        keys.keys().collect::<Vec<_>>(),
        wanted.keys().collect::<Vec<_>>()
    );
    assert_eq!(keys[&kept].0, wanted[&kept], "rewritten on the lease");
}

#[tokio::test]
async fn a_first_sync_whose_ownership_record_was_taken_meanwhile_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    assert_eq!(reg.claim(target, &who).await.unwrap(), Claim::Owned);
    intruder_takes_the_record_and_the_next_sync_is_refused(&etcd, &reg, target, &who).await;
    assert!(dump(&etcd, &format!("{target}/")).await.is_empty());
}

/// Another owner's record replaces `who`'s by hand: `who`'s next sync is ownership lost.
async fn intruder_takes_the_record_and_the_next_sync_is_refused(
    etcd: &EtcdServer,
    reg: &EtcdRegistry,
    target: &str,
    who: &Owner,
) {
    etcd.client()
        .await
        .put(reg.owner_key(target), owner("intruder").record(), None)
        .await
        .unwrap();
    let err = reg
        .sync_entries(target, who, TTL, entries(target, 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, grpc_registrar::registry::Error::OwnershipLost { .. }),
        "{err}"
    );
}

fn first_publication(target: &str, who: &Owner, n: usize) -> Publication {
    let endpoints = (0..n)
        .map(|i| LogicalEndpoint {
            id: format!("pod-{i}"),
            ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap(),
            port: 50051,
            node: None,
            metadata: BTreeMap::new(),
        })
        .collect();
    Publication::new(
        Arc::new(Layout::default_for(target, ValueFormat::EtcdNaming)),
        who.clone(),
        TTL,
        endpoints,
    )
    .unwrap()
}

/// Tries a first publication of `n` endpoints that something in the way must refuse, and
/// checks that it wrote no ownership record.
async fn refused_first_publication(reg: &EtcdRegistry, target: &str, who: &Owner, n: usize) {
    let published = reg
        .publish_first(&first_publication(target, who, n), b"spec")
        .await
        .unwrap();
    assert!(published.is_none(), "{n} endpoints under {target}: refused");
    assert_eq!(reg.owner_of(target).await.unwrap(), None);
}

#[tokio::test]
async fn a_first_publication_is_one_txn_and_what_it_wrote_is_known_to_the_next_sync() {
    let etcd = EtcdServer::start().await;
    let (reg, metrics) = registry(&etcd).await;
    // The lease record is written once, by the first write of the process.
    claim_and_sync(&reg, "services/default/other", &owner("other"), 1).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    let before = txns(&metrics);
    let publication = first_publication(target, &who, 50);
    let report = reg
        .publish_first(&publication, b"spec")
        .await
        .unwrap()
        .expect("a free target is published");
    assert_eq!((report.puts, report.txns, report.registered), (50, 1, 50));
    assert_eq!(txns(&metrics), before + 1);
    assert_eq!(reg.owner_of(target).await.unwrap(), Some(who.clone()));
    assert_eq!(
        reg.publication_record(&who.uid).await.unwrap(),
        Some(b"spec".to_vec())
    );
    let keys = dump(&etcd, &format!("{target}/")).await;
    assert_eq!(keys.len(), 50);
    assert!(keys.values().all(|(_, lease)| *lease != 0), "on the lease");

    let ranges_before = ranges(&metrics);
    assert_eq!(reg.claim(target, &who).await.unwrap(), Claim::Owned);
    let again = reg
        .sync_entries(target, &who, TTL, publication.entries.clone())
        .await
        .unwrap();
    assert_eq!((again.puts, again.deletes), (0, 0));
    assert_eq!(ranges(&metrics), ranges_before, "known: no range");
}

#[tokio::test]
async fn a_first_publication_over_self_registered_keys_or_too_many_for_one_txn_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    let registered = format!("{target}/10.9.9.9:50051");
    etcd.client()
        .await
        .put(registered.as_str(), "self", None)
        .await
        .unwrap();
    refused_first_publication(&reg, target, &who, 3).await;
    assert_eq!(reg.publication_record(&who.uid).await.unwrap(), None);
    assert_eq!(dump(&etcd, &format!("{target}/")).await.len(), 1);

    // 200 keys need two txns of 128.
    refused_first_publication(&reg, "services/default/big", &who, 200).await;
}

#[tokio::test]
async fn a_first_publication_of_an_owner_the_registry_holds_a_record_of_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let (reg, _) = registry(&etcd).await;
    let (target, who) = ("services/default/greeter", owner("greeter"));
    etcd.client()
        .await
        .put(reg.publication_key(&who.uid), "an older spec", None)
        .await
        .unwrap();
    refused_first_publication(&reg, target, &who, 3).await;
    assert_eq!(
        reg.publication_record(&who.uid).await.unwrap(),
        Some(b"an older spec".to_vec())
    );
    assert!(dump(&etcd, &format!("{target}/")).await.is_empty());
}

#[tokio::test]
async fn a_deposed_leaders_first_publication_is_refused_by_the_fence() {
    let etcd = EtcdServer::start().await;
    let (old, _) = registry(&etcd).await;
    let (new, _) = registry(&etcd).await;
    old.enable_fencing();
    new.enable_fencing();
    old.fence("old", 1, far()).await.unwrap();
    new.fence("new", 2, far()).await.unwrap();
    let (target, who) = ("services/default/greeter", owner("greeter"));
    assert!(old.may_write(), "only etcd can stop it");
    let err = old
        .publish_first(&first_publication(target, &who, 3), b"spec")
        .await
        .unwrap_err();
    assert!(
        matches!(err, grpc_registrar::registry::Error::Fenced { .. }),
        "{err}"
    );
    assert!(!old.may_write());
    assert_eq!(old.owner_of(target).await.unwrap(), None);
    assert_eq!(old.publication_record(&who.uid).await.unwrap(), None);
    assert!(dump(&etcd, "services/").await.is_empty());
}
