//! Making the keys under a target equal the desired ones: list, diff, guarded txn batches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tonic_etcd_resolver::format::watch_prefix;
use tracing::{info, warn};

use super::lease::is_lease_not_found;
use super::listed::{Basis, Listed, Ticket};
use super::{Current, EtcdRegistry, Op, diff};
use crate::registry::batch::{Limits, batches};
use crate::registry::error::timeout;
use crate::registry::writes::{GuardedWrites, Progress, Scope, Written, sync_batches};
use crate::registry::{Error, Owner, Publication, Result, SyncReport};

/// What a write txn is guarded by, and the lease its puts go on.
pub(in crate::registry) struct Guard {
    /// The compare on the target's ownership record.
    pub(super) owner: Compare,
    /// The shared lease (unused by deletes).
    pub(super) lease: i64,
}

#[async_trait::async_trait]
impl GuardedWrites for EtcdRegistry {
    type Op = Op;
    type Guard = Guard;

    async fn write(&self, op: &'static str, guard: &Guard, batch: &[Op]) -> Result<Written> {
        let resp = self
            .guarded(
                op,
                vec![guard.owner.clone()],
                txn_ops(batch, guard.lease),
                vec![],
            )
            .await?;
        if !resp.succeeded() {
            return Ok(Written::GuardFailed);
        }
        Ok(Written::Committed(resp.header().map(|h| h.revision())))
    }
}

/// `batch` as txn ops, its puts on `lease`.
fn txn_ops(batch: &[Op], lease: i64) -> Vec<TxnOp> {
    let on_lease = || Some(PutOptions::new().with_lease(lease));
    batch
        .iter()
        .map(|op| match op {
            Op::Put { key, value } => TxnOp::put(key.as_str(), value.clone(), on_lease()),
            Op::Delete { key } => TxnOp::delete(key.as_str(), None),
        })
        .collect()
}

/// The compare that nothing is under `target`.
fn nothing_under(target: &str) -> Compare {
    Compare::create_revision(watch_prefix(target), CompareOp::Equal, 0).with_prefix()
}

impl EtcdRegistry {
    /// Writes under `target` guarded by `owner`'s record, their puts on `lease`: at most
    /// `max_txn_ops` ops and [`super::MAX_TXN_BYTES`] bytes a txn; a single larger key is sent
    /// alone and left to etcd's own request limit (the layout already refuses an entry over
    /// [`crate::desired::MAX_ENTRY_BYTES`]).
    pub(super) fn scope<'a>(&self, target: &'a str, owner: &Owner, lease: i64) -> Scope<'a, Guard> {
        let limits = Limits {
            ops: self.inner.config.max_txn_ops,
            bytes: super::MAX_TXN_BYTES,
            op_bytes: None,
        };
        let owner = self.owned_by(target, owner);
        Scope {
            target,
            guard: Guard { owner, lease },
            limits,
        }
    }
}

/// The keys under a target, as [`EtcdRegistry::list`] reads them.
#[derive(Debug, Default)]
pub struct Listing {
    /// This controller's keys (every key, without a cluster name).
    pub current: BTreeMap<String, Current>,
    /// Keys on other clusters' leases, never touched.
    pub foreign: BTreeSet<String>,
    /// With a cluster name, keys on a lease no cluster marked: re-put on this cluster's lease
    /// when desired (adopted), never deleted.
    pub unmarked: BTreeMap<String, Current>,
    /// The revision read at.
    pub revision: i64,
}

impl EtcdRegistry {
    /// Lists the keys under `target/` with their values and leases, and the revision read at.
    ///
    /// With a cluster name, only this cluster's keys (those on a lease marked as its own) are
    /// listed as current; other clusters' are returned apart, never to be rewritten or deleted,
    /// and unmarked ones apart too. One round trip either way: the markers are read in the same
    /// txn.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn list(&self, target: &str) -> Result<Listing> {
        let started = Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = timeout(
            "list target keys",
            self.inner.config.op_timeout,
            kv.txn(Txn::new().and_then(self.listing_reads(target))),
        )
        .await;
        self.inner.metrics.observe_request("etcd", "range", started);
        self.record("range", resp.as_ref().err());
        let resp = resp?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(self.listing_of(revision, resp.op_responses()))
    }

    /// The reads of a listing of `target`: its keys, and with a cluster name every cluster's
    /// lease markers.
    fn listing_reads(&self, target: &str) -> Vec<TxnOp> {
        let prefix = GetOptions::new().with_prefix();
        let mut reads = vec![TxnOp::get(watch_prefix(target), Some(prefix.clone()))];
        if self.inner.config.cluster.is_some() {
            reads.push(TxnOp::get(
                self.lease_marker(None),
                Some(prefix.with_keys_only()),
            ));
        }
        reads
    }

    /// The listing that the responses to [`Self::listing_reads`] read at `revision` make.
    fn listing_of(&self, revision: i64, responses: Vec<TxnOpResponse>) -> Listing {
        let mut ranges = responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let keys = ranges.next().map(|g| g.kvs().to_vec()).unwrap_or_default();
        // With a cluster name: which cluster marked each lease.
        let owners: Option<HashMap<i64, bool>> = ranges.next().map(|markers| {
            let cluster = self.inner.config.cluster.as_deref().unwrap_or_default();
            let mut owners: HashMap<i64, bool> = markers
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let key = kv.key_str().ok()?;
                    let (marker_cluster, id) = key.rsplit_once('/')?;
                    let ours = marker_cluster.rsplit('/').next()? == cluster;
                    Some((i64::from_str_radix(id, 16).ok()?, ours))
                })
                .collect();
            owners.extend(
                self.inner
                    .marked
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|id| (*id, true)),
            );
            owners
        });
        let mut listing = Listing {
            revision,
            ..Listing::default()
        };
        for kv in keys {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let current = Current {
                value: kv.value().to_vec(),
                lease: kv.lease(),
            };
            match owners.as_ref().map(|o| o.get(&kv.lease())) {
                // One cluster, or this cluster's lease.
                None | Some(Some(true)) => {
                    listing.current.insert(key, current);
                }
                Some(Some(false)) => {
                    listing.foreign.insert(key);
                }
                // A lease no cluster marked (none, or written before clusters were named): such
                // a key may be adopted when desired, never deleted.
                Some(None) => {
                    listing.unmarked.insert(key, current);
                }
            }
        }
        listing
    }

    /// The first sync of a target this process's claim just created (nobody owned it): every
    /// desired key put in one txn guarded by the ownership record and by nothing being under
    /// the target, instead of a listing and then the writes. When something is under it after
    /// all (keys its servers registered themselves, or another cluster's), the same txn reads
    /// the listing instead, and the sync goes on from it as usual. `None` when the puts need
    /// more than one txn: the sync lists first.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] (and the claim forgotten) when the record names another owner;
    /// etcd failures; [`Error::Fenced`].
    async fn write_first(&self, scope: &Scope<'_, Guard>, ops: &[Op]) -> Result<Option<First>> {
        if batches(ops, scope.limits).map_or(true, |b| b.len() != 1) {
            return Ok(None);
        }
        let compares = vec![scope.guard.owner.clone(), nothing_under(scope.target)];
        let resp = self
            .guarded(
                "write registry batch",
                compares,
                txn_ops(ops, scope.guard.lease),
                self.listing_reads(scope.target),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(Some(First::Written(revision)));
        }
        let listing = self.listing_of(revision, resp.op_responses());
        if listing.current.is_empty() && listing.foreign.is_empty() && listing.unmarked.is_empty() {
            // Nothing under the target at that revision: it was the ownership record that
            // failed.
            self.forget_claim(scope.target);
            return Err(Error::OwnershipLost {
                target: scope.target.to_owned(),
            });
        }
        Ok(Some(First::Listed(listing)))
    }

    /// See [`crate::registry::Backend::publish_first`]: one txn creates the ownership record,
    /// writes the publication record and puts every key, guarded by the target having no
    /// record, nothing nesting with it, nothing under it, the owner having no publication
    /// record (and the leader fence).
    ///
    /// # Errors
    /// etcd failures; [`Error::Fenced`].
    pub async fn publish_first(
        &self,
        publication: &Publication,
        record: &[u8],
    ) -> Result<Option<SyncReport>> {
        let (target, owner, ttl) = (publication.target(), &publication.owner, publication.ttl);
        if self.inner.fence.claims().version(target, owner).is_some() {
            // Claimed already: the usual sync knows more.
            return Ok(None);
        }
        let lease_id = self.inner.leases.lease(ttl).await?;
        self.mark(lease_id, ttl).await?;
        let key = self.owner_key(target);
        let records = vec![
            Op::Put {
                key: key.clone(),
                value: owner.record(),
            },
            Op::Put {
                key: self.publication_key(&owner.uid),
                value: record.to_vec(),
            },
        ];
        let mut ops = diff(&BTreeMap::new(), &publication.entries, lease_id);
        let entries = ops.len();
        ops.splice(0..0, records);
        let scope = self.scope(target, owner, lease_id);
        if batches(&ops, scope.limits).map_or(true, |b| b.len() != 1) {
            return Ok(None);
        }
        let (_, ticket) = self.inner.listings.take(target, None, Instant::now());
        let read_at = Instant::now();
        let keys = ops.split_off(2);
        // The two records live past the lease; the keys on it.
        let mut writes: Vec<TxnOp> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { key, value } => Some(TxnOp::put(key.as_str(), value.clone(), None)),
                Op::Delete { .. } => None,
            })
            .collect();
        writes.extend(txn_ops(&keys, lease_id));
        let mut compares = vec![
            Compare::create_revision(key, CompareOp::Equal, 0),
            Compare::create_revision(self.publication_key(&owner.uid), CompareOp::Equal, 0),
        ];
        compares.extend(self.no_nesting(target));
        compares.push(nothing_under(target));
        let resp = self
            .guarded("publish target", compares, writes, vec![])
            .await;
        let resp = self.lease_checked(ttl, resp).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        info!(registry_target = target, uid = %owner.uid, revision, "claimed target");
        self.inner.fence.claims().remember(target, owner, revision);
        let progress = Progress {
            puts: entries,
            txns: 1,
            revision,
            ..Progress::default()
        };
        let wrote = Wrote {
            current: BTreeMap::new(),
            ops: keys,
            read_at,
            progress,
        };
        let basis = self.listing_basis(target, owner, lease_id);
        Ok(Some(self.settle(&scope, basis, ticket, wrote, entries)))
    }

    /// The key marking a lease as this cluster's, `<root>/leases/<cluster>/<lease-id>` (`None`:
    /// the prefix of every cluster's markers, read in one range).
    fn lease_marker(&self, lease: Option<i64>) -> String {
        let root = &self.inner.config.registrar_root;
        let cluster = self.inner.config.cluster.as_deref().unwrap_or_default();
        lease.map_or_else(
            || format!("{root}/leases/"),
            |id| format!("{root}/leases/{cluster}/{id:x}"),
        )
    }

    /// Records `lease` as the live lease for `ttl`, on the lease itself (the record goes when the
    /// lease does), so that the next process or leader adopts it; with a cluster name, also
    /// marks it as this cluster's. Once per lease and process, behind the leader fence (a
    /// deposed leader must not point the record at its own lease).
    async fn mark(&self, lease: i64, ttl: Duration) -> Result<()> {
        let marked = || self.inner.marked.lock().expect("lock").contains(&lease);
        if marked() {
            return Ok(());
        }
        let _marking = self.inner.marking.lock().await;
        if marked() {
            return Ok(());
        }
        let on_lease = || Some(PutOptions::new().with_lease(lease));
        let mut puts = vec![TxnOp::put(
            self.inner.leases.record_key(ttl.as_secs().max(1)),
            format!("{lease:x}"),
            on_lease(),
        )];
        if let Some(cluster) = &self.inner.config.cluster {
            puts.push(TxnOp::put(
                self.lease_marker(Some(lease)),
                cluster.as_str(),
                on_lease(),
            ));
        }
        match self.guarded("record lease", vec![], puts, vec![]).await {
            Err(Error::Etcd { op, cause }) if is_lease_not_found(&cause) => {
                // As for a write: the keeper checks at once and announces a new lease.
                self.inner.leases.suspect(ttl).await;
                Err(Error::Etcd { op, cause })
            }
            other => {
                other?;
                self.inner.marked.lock().expect("lock").insert(lease);
                Ok(())
            }
        }
    }

    /// Makes the keys under an owned `target` equal `desired`, all on the shared lease for `ttl`.
    ///
    /// What is under the target is listed, or, while this process is certain to be its only
    /// writer, taken from what it last listed or wrote there (see [`super::listed`]): a sync of
    /// an unchanged service then reads nothing from etcd. Any error drops that listing.
    ///
    /// Writes go in txns of at most `max_txn_ops` operations and [`super::MAX_TXN_BYTES`]
    /// bytes, each guarded by the ownership
    /// record (and the leader fence), so nothing is written once ownership is lost.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when the record no longer names `owner`; etcd failures.
    pub async fn sync_entries(
        &self,
        target: &str,
        owner: &Owner,
        ttl: Duration,
        desired: Arc<BTreeMap<String, Vec<u8>>>,
    ) -> Result<SyncReport> {
        let synced = self.sync_listed(target, owner, ttl, desired).await;
        if synced.is_err() {
            self.inner.listings.forget(target);
        }
        synced
    }

    /// What a listing of `target` may be trusted under now, for `owner` on `lease`: `None`
    /// with a cluster name (other clusters write there), when this replica may not write, or
    /// when it holds no claim of the target.
    fn listing_basis(&self, target: &str, owner: &Owner, lease: i64) -> Option<Basis> {
        if self.inner.config.cluster.is_some() {
            return None;
        }
        let fence = self.inner.fence.guard("sync").ok()?;
        let claim = self.inner.fence.claims().version(target, owner)?;
        Some(Basis {
            lease,
            fence,
            claim,
        })
    }

    /// Sends `scope`'s guards (the ownership record and the leader fence) in a txn that writes
    /// nothing.
    ///
    /// # Errors
    /// [`Error::Fenced`] (and this replica deposed) when a later leader fenced it;
    /// [`Error::OwnershipLost`] (and the claim forgotten) when the record names another owner;
    /// etcd failures.
    async fn check_guards(&self, scope: &Scope<'_, Guard>, progress: &mut Progress) -> Result<()> {
        match self
            .write("check registry guards", &scope.guard, &[])
            .await?
        {
            Written::Committed(revision) => {
                progress.revision = progress.revision.max(revision.unwrap_or(0));
                Ok(())
            }
            Written::GuardFailed => {
                self.forget_claim(scope.target);
                Err(Error::OwnershipLost {
                    target: scope.target.to_owned(),
                })
            }
            Written::Refused(error) => Err(error),
        }
    }

    /// [`Self::sync_entries`], leaving the listing to forget on an error to the caller.
    async fn sync_listed(
        &self,
        target: &str,
        owner: &Owner,
        ttl: Duration,
        desired: Arc<BTreeMap<String, Vec<u8>>>,
    ) -> Result<SyncReport> {
        let lease_id = self.inner.leases.lease(ttl).await?;
        self.mark(lease_id, ttl).await?;
        let basis = self.listing_basis(target, owner, lease_id);
        let (known, ticket) = self.inner.listings.take(target, basis, Instant::now());
        let trusted = known.is_some();
        let scope = self.scope(target, owner, lease_id);
        let read_at = Instant::now();
        let (current, desired, revision, read_at) = match known {
            Some(listed) => (listed.keys, desired, listed.revision, listed.read_at),
            None => {
                // Taken whatever is desired, so that it never outlives the first sync.
                let fresh =
                    self.inner.fence.claims().take_fresh(target, owner) && !desired.is_empty();
                let first = if fresh {
                    let ops = diff(&BTreeMap::new(), &desired, lease_id);
                    match self
                        .lease_checked(ttl, self.write_first(&scope, &ops).await)
                        .await?
                    {
                        Some(First::Written(revision)) => {
                            let progress = Progress {
                                puts: ops.len(),
                                txns: 1,
                                revision,
                                ..Progress::default()
                            };
                            let wrote = Wrote {
                                current: BTreeMap::new(),
                                ops,
                                read_at,
                                progress,
                            };
                            return Ok(self.settle(&scope, basis, ticket, wrote, desired.len()));
                        }
                        Some(First::Listed(listing)) => Some(listing),
                        None => None,
                    }
                } else {
                    None
                };
                let listing = match first {
                    Some(listing) => listing,
                    None => self.list(target).await?,
                };
                let desired = left_to_others(target, desired, &listing.foreign);
                let mut current = listing.current;
                current.extend(
                    listing
                        .unmarked
                        .into_iter()
                        .filter(|(key, _)| desired.contains_key(key)),
                );
                (current, desired, listing.revision, read_at)
            }
        };
        let ops = diff(&current, &desired, lease_id);
        let mut progress = Progress {
            revision,
            ..Progress::default()
        };
        if trusted && ops.is_empty() && basis.is_some_and(|b| b.fence.is_some()) {
            // Nothing to write, and no listing that would show another leader's writes: a
            // leader checks its guards in an empty txn, so that a deposed one still finds out.
            self.check_guards(&scope, &mut progress).await?;
        }
        let synced = sync_batches(self, &scope, &ops, &mut progress).await;
        // etcd refuses no write of a batch on its own: its puts and deletes are unconditional
        // under the guard.
        if let Some(error) = self.lease_checked(ttl, synced).await? {
            return Err(error);
        }
        let wrote = Wrote {
            current,
            ops,
            read_at,
            progress,
        };
        Ok(self.settle(&scope, basis, ticket, wrote, desired.len()))
    }

    /// `result` of a write; when etcd said the lease is not found, the keeper checks at once
    /// and, when the lease is gone, grants a new one and announces it (the reconcile that
    /// follows re-puts everything).
    async fn lease_checked<T>(&self, ttl: Duration, result: Result<T>) -> Result<T> {
        match result {
            Err(Error::Etcd { op, cause }) if is_lease_not_found(&cause) => {
                self.inner.leases.suspect(ttl).await;
                Err(Error::Etcd { op, cause })
            }
            other => other,
        }
    }

    /// The report of a sync whose every write committed; with a `basis`, what is under the
    /// target now (`wrote`'s keys with its ops applied) is kept as known.
    fn settle(
        &self,
        scope: &Scope<'_, Guard>,
        basis: Option<Basis>,
        ticket: Ticket,
        wrote: Wrote,
        registered: usize,
    ) -> SyncReport {
        let Wrote {
            mut current,
            ops,
            read_at,
            progress,
        } = wrote;
        let lease = scope.guard.lease;
        if let Some(basis) = basis {
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        current.insert(key, Current { value, lease });
                    }
                    Op::Delete { key } => {
                        current.remove(&key);
                    }
                }
            }
            let listed = Listed {
                keys: current,
                revision: progress.revision,
                read_at,
            };
            self.inner
                .listings
                .keep(scope.target, basis, listed, ticket);
        }
        progress.report(scope.target, registered, Some(lease))
    }
}

/// What a sync found under its target and wrote there, every write committed.
struct Wrote {
    /// What was under the target, as listed or known.
    current: BTreeMap<String, Current>,
    /// The writes, in order.
    ops: Vec<Op>,
    /// When `current` was read.
    read_at: Instant,
    /// What the writes did.
    progress: Progress,
}

/// How [`EtcdRegistry::write_first`] ended.
enum First {
    /// Every key was put, at this revision.
    Written(i64),
    /// Something was under the target after all: what, instead.
    Listed(Listing),
}

/// `desired` without the keys another cluster's controller holds: another cluster's key is
/// never overwritten, so a desired key it already holds (the same address in two clusters) is
/// left to it, and said.
fn left_to_others(
    target: &str,
    desired: Arc<BTreeMap<String, Vec<u8>>>,
    foreign: &BTreeSet<String>,
) -> Arc<BTreeMap<String, Vec<u8>>> {
    if foreign.is_empty() || !desired.keys().any(|k| foreign.contains(k)) {
        return desired;
    }
    let (kept, taken): (BTreeMap<_, _>, BTreeMap<_, _>) = desired
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| !foreign.contains(k));
    warn!(
        registry_target = target,
        keys = ?taken.keys().collect::<Vec<_>>(),
        "keys held by another cluster's controller are left to it"
    );
    Arc::new(kept)
}
