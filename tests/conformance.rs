//! One set of behaviours that every backend must have, run against the in-memory backend, a real
//! etcd and a real Consul through the `Backend` trait alone: claims and conflicts, the minimal
//! diff, writes by a non-owner, release and the publication record, fencing, and (for the
//! backends with a server other replicas share) a restart and a deposed leader.
//!
//! A backend's own behaviours (leases, txn batching, Consul's node and checks, nesting of etcd
//! prefixes) stay in `tests/registry.rs` and `tests/consul_registry.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_registrar::desired::LogicalEndpoint;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulRegistry};
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry, Layout};
use grpc_registrar::registry::memory::MemoryBackend;
use grpc_registrar::registry::{Backend, Claim, Error, Owner, Publication};
use test_support::EtcdServer;
use test_support::consul::Consul;
use tonic_etcd_resolver::format::ValueFormat;

const TTL: Duration = Duration::from_secs(10);

/// A connection to a registry, as a new replica makes one.
type Connecting = std::pin::Pin<Box<dyn Future<Output = Arc<dyn Backend>>>>;

/// A backend under test, and how to start another replica on the same registry (none for the
/// in-memory backend, whose state is its own).
struct Subject {
    name: &'static str,
    backend: Arc<dyn Backend>,
    replica: Option<Box<dyn Fn() -> Connecting>>,
    /// The servers, stopped when the subject is dropped.
    _servers: Box<dyn std::any::Any>,
    /// Where a service named `name` is published: an etcd prefix or a Consul service name.
    target: fn(&str) -> String,
}

fn etcd_target(name: &str) -> String {
    format!("services/default/{name}")
}

fn consul_target(name: &str) -> String {
    name.to_owned()
}

async fn memory() -> Subject {
    Subject {
        name: "memory",
        backend: Arc::new(MemoryBackend::default()),
        replica: None,
        _servers: Box::new(()),
        target: etcd_target,
    }
}

async fn etcd() -> Subject {
    let server = EtcdServer::start().await;
    let endpoint = server.endpoint();
    let connect = move || {
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let config = EtcdConfig {
                default_ttl: TTL,
                op_timeout: Duration::from_secs(2),
                ..EtcdConfig::new(vec![endpoint])
            };
            Arc::new(
                EtcdRegistry::connect(config, Arc::new(Metrics::default()))
                    .await
                    .expect("failed to connect to etcd"),
            ) as Arc<dyn Backend>
        }) as Connecting
    };
    Subject {
        name: "etcd",
        backend: connect().await,
        replica: Some(Box::new(connect)),
        _servers: Box::new(server),
        target: etcd_target,
    }
}

async fn consul() -> Subject {
    let server = Consul::start().await;
    let addr = server.http_addr();
    let connect = move || {
        let addr = addr.clone();
        Box::pin(async move {
            let config = ConsulConfig {
                default_ttl: TTL,
                request_timeout: Duration::from_secs(2),
                ..ConsulConfig::new(addr)
            };
            Arc::new(
                ConsulRegistry::connect(config, Arc::new(Metrics::default()))
                    .expect("failed to configure the Consul client"),
            ) as Arc<dyn Backend>
        }) as Connecting
    };
    Subject {
        name: "consul",
        backend: connect().await,
        replica: Some(Box::new(connect)),
        _servers: Box::new(server),
        target: consul_target,
    }
}

/// Every subject, one after another.
async fn each(check: impl AsyncFn(&Subject)) {
    for subject in [memory().await, etcd().await, consul().await] {
        check(&subject).await;
    }
}

fn owner(name: &str) -> Owner {
    Owner {
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        name: name.into(),
    }
}

fn endpoint(i: usize, version: &str) -> LogicalEndpoint {
    LogicalEndpoint {
        id: format!("pod-{i}"),
        ip: format!("10.0.0.{}", i + 1).parse().unwrap(),
        port: 50051,
        node: Some("node-a".into()),
        metadata: BTreeMap::from([
            ("pod".to_owned(), format!("pod-{i}")),
            ("version".to_owned(), version.to_owned()),
        ]),
    }
}

fn publication(target: &str, who: &Owner, endpoints: Vec<LogicalEndpoint>) -> Publication {
    // The default key layout: every backend here takes any placement's target and entries.
    Publication::new(
        Arc::new(Layout::default_for(target, ValueFormat::EtcdNaming)),
        who.clone(),
        TTL,
        endpoints,
    )
    .expect("the default layout renders the endpoints")
}

fn endpoints(n: usize, version: &str) -> Vec<LogicalEndpoint> {
    (0..n).map(|i| endpoint(i, version)).collect()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn a_claimed_target_is_refused_to_another_owner_and_kept_by_its_own() {
    each(async |s: &Subject| {
        let target = (s.target)("greeter");
        let (a, b) = (owner("a"), owner("b"));
        assert_eq!(
            s.backend.claim(&target, &a).await.unwrap(),
            Claim::Owned,
            "{}",
            s.name
        );
        match s.backend.claim(&target, &b).await.unwrap() {
            Claim::Conflict {
                owner,
                target: held,
                ..
            } => {
                assert_eq!(
                    (owner.uid.as_str(), held.as_str()),
                    ("uid-a", target.as_str()),
                    "{}",
                    s.name
                );
            }
            Claim::Owned => panic!("{}: a second owner was given a claimed target", s.name),
        }
        assert_eq!(
            s.backend.claim(&target, &a).await.unwrap(),
            Claim::Owned,
            "{}",
            s.name
        );
        assert_eq!(
            s.backend.owner_of(&target).await.unwrap(),
            Some(a),
            "{}",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn a_sync_writes_only_what_changed() {
    each(async |s: &Subject| {
        let target = (s.target)("greeter");
        let a = owner("a");
        s.backend.claim(&target, &a).await.unwrap();
        let first = s
            .backend
            .sync(&publication(&target, &a, endpoints(3, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (first.puts, first.deletes, first.registered),
            (3, 0, 3),
            "{}",
            s.name
        );
        let again = s
            .backend
            .sync(&publication(&target, &a, endpoints(3, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (again.puts, again.deletes, again.registered),
            (0, 0, 3),
            "{}: nothing changed",
            s.name
        );
        let shrunk = s
            .backend
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (shrunk.puts, shrunk.deletes, shrunk.registered),
            (0, 1, 2),
            "{}",
            s.name
        );
        let mut changed = endpoints(2, "v1");
        changed[1] = endpoint(1, "v2");
        let one = s
            .backend
            .sync(&publication(&target, &a, changed))
            .await
            .unwrap();
        assert_eq!(
            (one.puts, one.deletes, one.registered),
            (1, 0, 2),
            "{}",
            s.name
        );
        assert!(
            one.revision >= first.revision,
            "{}: the revision went back",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn an_owner_that_is_not_the_claimant_can_neither_sync_nor_release() {
    each(async |s: &Subject| {
        let target = (s.target)("greeter");
        let (a, b) = (owner("a"), owner("b"));
        s.backend.claim(&target, &a).await.unwrap();
        s.backend
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        let err = s
            .backend
            .sync(&publication(&target, &b, endpoints(1, "v1")))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::OwnershipLost { .. }),
            "{}: {err}",
            s.name
        );
        assert_eq!(
            s.backend.release(&target, &b).await.unwrap(),
            0,
            "{}",
            s.name
        );
        let still = s
            .backend
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (still.puts, still.deletes, still.registered),
            (0, 0, 2),
            "{}: the owner's entries moved",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn a_release_frees_the_target_and_forgets_the_publication_record() {
    each(async |s: &Subject| {
        let target = (s.target)("greeter");
        let (a, b) = (owner("a"), owner("b"));
        s.backend.claim(&target, &a).await.unwrap();
        s.backend
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        s.backend
            .record_publication(&target, &a, b"the last valid plan")
            .await
            .unwrap();
        assert_eq!(
            s.backend
                .publication_record("uid-a")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"the last valid plan"[..]),
            "{}",
            s.name
        );
        assert!(
            s.backend
                .owners()
                .await
                .unwrap()
                .iter()
                .any(|(t, o)| *t == target && *o == a),
            "{}: owners() does not list the claim",
            s.name
        );
        assert_eq!(
            s.backend.release(&target, &a).await.unwrap(),
            2,
            "{}",
            s.name
        );
        assert_eq!(
            s.backend.owner_of(&target).await.unwrap(),
            None,
            "{}",
            s.name
        );
        assert_eq!(
            s.backend.publication_record("uid-a").await.unwrap(),
            None,
            "{}",
            s.name
        );
        assert_eq!(
            s.backend.claim(&target, &b).await.unwrap(),
            Claim::Owned,
            "{}",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn with_fencing_on_only_a_fenced_leader_writes() {
    each(async |s: &Subject| {
        let target = (s.target)("greeter");
        let a = owner("a");
        s.backend.enable_fencing();
        assert!(!s.backend.may_write(), "{}", s.name);
        let err = s.backend.claim(&target, &a).await.unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{}: {err}", s.name);
        s.backend.fence("leader", 1, far()).await.unwrap();
        assert!(s.backend.may_write(), "{}", s.name);
        assert_eq!(
            s.backend.claim(&target, &a).await.unwrap(),
            Claim::Owned,
            "{}",
            s.name
        );
        s.backend
            .sync(&publication(&target, &a, endpoints(1, "v1")))
            .await
            .unwrap();
        assert_eq!(s.backend.leader_term().await.unwrap(), 1, "{}", s.name);
        s.backend.depose();
        assert!(!s.backend.may_write(), "{}", s.name);
        let err = s
            .backend
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{}: {err}", s.name);
    })
    .await;
}

#[tokio::test]
async fn a_new_replica_reads_owners_and_publication_records_back_and_writes_nothing_new() {
    each(async |s: &Subject| {
        let Some(replica) = &s.replica else {
            // The in-memory backend has no server for a second replica to share.
            assert_eq!(s.name, "memory");
            return;
        };
        let target = (s.target)("greeter");
        let a = owner("a");
        s.backend.claim(&target, &a).await.unwrap();
        s.backend
            .sync(&publication(&target, &a, endpoints(3, "v1")))
            .await
            .unwrap();
        s.backend
            .record_publication(&target, &a, b"plan")
            .await
            .unwrap();

        let restarted = replica().await;
        assert_eq!(
            restarted.owner_of(&target).await.unwrap(),
            Some(a.clone()),
            "{}",
            s.name
        );
        assert_eq!(
            restarted
                .publication_record("uid-a")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"plan"[..]),
            "{}",
            s.name
        );
        assert_eq!(
            restarted.claim(&target, &a).await.unwrap(),
            Claim::Owned,
            "{}",
            s.name
        );
        let report = restarted
            .sync(&publication(&target, &a, endpoints(3, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (report.deletes, report.registered),
            (0, 3),
            "{}: a restart deleted entries",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn a_deposed_leader_writes_nothing_and_the_new_leaders_entries_stay() {
    each(async |s: &Subject| {
        let Some(replica) = &s.replica else {
            assert_eq!(s.name, "memory");
            return;
        };
        let target = (s.target)("greeter");
        let a = owner("a");
        let new = replica().await;
        s.backend.enable_fencing();
        new.enable_fencing();
        s.backend.fence("old", 1, far()).await.unwrap();
        s.backend.claim(&target, &a).await.unwrap();
        s.backend
            .sync(&publication(&target, &a, endpoints(3, "v1")))
            .await
            .unwrap();

        new.fence("new", 2, far()).await.unwrap();
        new.claim(&target, &a).await.unwrap();
        new.sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        // The old leader's local bound has not run out; only the registry can stop it. For
        // Consul, the check keeper's renewal is itself a fenced write, so on a slow machine it
        // may be the write that finds out first: either way the registry deposed it.
        assert!(
            s.backend.may_write() || s.name == "consul",
            "{}: deposed without the registry saying so",
            s.name
        );
        let err = s
            .backend
            .sync(&publication(&target, &a, endpoints(3, "v2")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{}: {err}", s.name);
        assert!(
            !s.backend.may_write(),
            "{}: a fenced leader must stop at once",
            s.name
        );
        let err = s.backend.release(&target, &a).await.unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{}: {err}", s.name);
        let kept = new
            .sync(&publication(&target, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        assert_eq!(
            (kept.puts, kept.deletes, kept.registered),
            (0, 0, 2),
            "{}: the deposed leader changed entries",
            s.name
        );
    })
    .await;
}

#[tokio::test]
async fn a_first_publication_writes_claim_record_and_entries_together_or_nothing_over_anything_in_the_way()
 {
    each(async |s: &Subject| {
        let (held, nested, free) = (
            (s.target)("held"),
            (s.target)("free/inner"),
            (s.target)("free"),
        );
        let (a, b, c) = (owner("a"), owner("b"), owner("c"));

        // Another owner's target: nothing is written.
        s.backend.claim(&held, &b).await.unwrap();
        let refused = s
            .backend
            .publish_first(&publication(&held, &a, endpoints(3, "v1")), b"a's spec")
            .await
            .unwrap();
        assert!(refused.is_none(), "{}", s.name);
        assert_eq!(
            s.backend.owner_of(&held).await.unwrap(),
            Some(b.clone()),
            "{}",
            s.name
        );
        assert_eq!(
            s.backend.publication_record(&a.uid).await.unwrap(),
            None,
            "{}",
            s.name
        );

        // A free target: the claim, the record and every entry, or (a backend that cannot) none.
        let first = s
            .backend
            .publish_first(&publication(&free, &a, endpoints(3, "v1")), b"a's spec")
            .await
            .unwrap();
        match (&first, s.name) {
            (None, "consul") => {
                assert_eq!(s.backend.owner_of(&free).await.unwrap(), None);
                assert_eq!(s.backend.claim(&free, &a).await.unwrap(), Claim::Owned);
            }
            (Some(report), _) => {
                assert_eq!(
                    (report.puts, report.deletes, report.registered, report.txns),
                    (3, 0, 3, 1),
                    "{}",
                    s.name
                );
                assert_eq!(
                    s.backend.owner_of(&free).await.unwrap(),
                    Some(a.clone()),
                    "{}",
                    s.name
                );
                assert_eq!(
                    s.backend
                        .publication_record(&a.uid)
                        .await
                        .unwrap()
                        .as_deref(),
                    Some(&b"a's spec"[..]),
                    "{}",
                    s.name
                );
                assert_eq!(
                    s.backend.claim(&free, &a).await.unwrap(),
                    Claim::Owned,
                    "{}",
                    s.name
                );
            }
            (None, name) => panic!("{name}: a free target was not published in one request"),
        }
        // The entries are there as a sync finds them: it changes only what changed.
        let shrunk = s
            .backend
            .sync(&publication(&free, &a, endpoints(2, "v1")))
            .await
            .unwrap();
        let expected = if first.is_some() { (0, 1) } else { (2, 0) };
        assert_eq!((shrunk.puts, shrunk.deletes), expected, "{}", s.name);

        // Once it is published, a second first publication is nothing, and nothing nests in it.
        let again = s
            .backend
            .publish_first(&publication(&free, &a, endpoints(3, "v1")), b"again")
            .await
            .unwrap();
        assert!(again.is_none(), "{}", s.name);
        let inner = s
            .backend
            .publish_first(&publication(&nested, &c, endpoints(1, "v1")), b"c's spec")
            .await
            .unwrap();
        assert!(inner.is_none(), "{}", s.name);
        assert_eq!(
            s.backend.publication_record(&c.uid).await.unwrap(),
            None,
            "{}",
            s.name
        );
    })
    .await;
}
