//! Target ownership: `<registrar-root>/owners/<target>` names the GrpcService that may write
//! under the target, claimed with a compare-and-swap txn. The flows are the shared ones
//! ([`crate::registry::ownership`]); this file supplies etcd's guarded txns for them.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, KeyValue, TxnOp, TxnOpResponse,
};
use tonic_etcd_resolver::format::watch_prefix;
use tracing::info;

use super::{EtcdRegistry, Op};

/// Publication records read per range when listing them all (each is a spec, about 0.5 KB).
const RECORDS_PAGE: i64 = 1000;
use crate::registry::ownership::{self, Claims, Created, Held, OwnerRecords};
use crate::registry::writes::release_batches;
use crate::registry::{Claim, Error, Owner, Result, ancestors};

impl EtcdRegistry {
    /// The key of a target's ownership record.
    #[must_use]
    pub fn owner_key(&self, target: &str) -> String {
        self.inner.records.owner(target)
    }

    /// The key of an owner's publication record, `<records-root>/published/<uid>`.
    #[must_use]
    pub fn publication_key(&self, uid: &str) -> String {
        self.inner.records.publication(uid)
    }

    /// One read of `key` (with `options`), timed and counted.
    async fn range(
        &self,
        op: &'static str,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse> {
        let started = std::time::Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp =
            crate::registry::error::timeout(op, self.inner.config.op_timeout, kv.get(key, options))
                .await;
        self.inner.metrics.observe_request("etcd", "range", started);
        self.record("range", resp.as_ref().err());
        resp
    }

    /// The publication record of the owner `uid`.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        let resp = self
            .range("read publication record", &self.publication_key(uid), None)
            .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Every publication record of this controller (its cluster's, with a cluster name): the
    /// owner uid and the record, read in pages of [`RECORDS_PAGE`] keys.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = self.publication_key("");
        // The end of the prefix's range: its last byte (the '/') plus one.
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut from = prefix.clone().into_bytes();
        let mut records = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RECORDS_PAGE);
            let key = String::from_utf8_lossy(&from).into_owned();
            let resp = self
                .range("list publication records", &key, Some(options))
                .await?;
            for kv in resp.kvs() {
                if let Some(uid) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) {
                    records.push((uid.to_owned(), kv.value().to_vec()));
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(records),
            }
        }
    }

    /// See [`crate::registry::Backend::heartbeat`]: `<records-root>/writers/<instance>`.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        let prefix = self.inner.records.writer("");
        let txn = etcd_client::Txn::new().and_then(vec![
            TxnOp::put(format!("{prefix}{instance}"), beat.to_string(), None),
            TxnOp::get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.txn("announce writer", txn).await?;
        Ok(resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .flat_map(|g| g.kvs().to_vec())
            .filter_map(|kv| {
                let other = kv.key_str().ok()?.strip_prefix(&prefix)?.to_owned();
                let beat = kv.value_str().ok()?.parse().ok()?;
                (other != instance).then_some((other, beat))
            })
            .collect())
    }

    /// See [`crate::registry::Backend::forget_writer`].
    ///
    /// # Errors
    /// etcd failures.
    pub async fn forget_writer(&self, instance: &str) -> Result<()> {
        let key = self.inner.records.writer(instance);
        let txn = etcd_client::Txn::new().and_then(vec![TxnOp::delete(key, None)]);
        self.txn("forget writer", txn).await.map(|_| ())
    }

    /// Every ownership record under this controller's records root: target and owner.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        let prefix = self.inner.records.owner("");
        let options = GetOptions::new().with_prefix();
        let resp = self
            .range("list ownership records", &prefix, Some(options))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let target = kv.key_str().ok()?.strip_prefix(&prefix)?.to_owned();
                let owner = serde_json::from_slice(kv.value()).ok()?;
                Some((target, owner))
            })
            .collect())
    }

    /// The owner recorded for `target` in etcd.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn owner_of(&self, target: &str) -> Result<Option<Owner>> {
        let resp = self
            .range("read ownership record", &self.owner_key(target), None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Claims `target` for `owner` with a compare-and-swap txn.
    ///
    /// Idempotent: claiming a target the same uid already owns succeeds.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim> {
        ownership::claim(self, target, owner).await
    }

    /// As [`Self::claim`]; when the claim creates the ownership record, `record` is written as
    /// `owner`'s publication record in the same txn. Returns whether it was.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn claim_recording(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<(Claim, bool)> {
        ownership::claim_recording(self, target, owner, Some(record)).await
    }

    /// Takes over a target whose recorded owner is gone, guarded on the record's mod revision so
    /// that two claimants cannot both win.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim> {
        // Another owner wrote there: what this process knew of it is not to be trusted.
        self.inner.listings.forget(target);
        ownership::take_over(self, target, owner, version).await
    }

    /// Writes `owner`'s publication record, guarded on its ownership of `target`.
    ///
    /// # Errors
    /// [`crate::registry::Error::OwnershipLost`]; etcd failures.
    pub async fn record_publication(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<()> {
        ownership::record_publication(self, target, owner, record).await
    }

    /// The compares that keep `target` free of nesting: no record of a target nested in it
    /// (under `<key>/`) nor containing it (an ancestor's key), whose sync would delete the
    /// other's keys.
    pub(super) fn no_nesting(&self, target: &str) -> Vec<Compare> {
        let children = format!("{}/", self.owner_key(target));
        let mut compares =
            vec![Compare::create_revision(children, CompareOp::Equal, 0).with_prefix()];
        compares.extend(
            ancestors(target)
                .into_iter()
                .map(|a| Compare::create_revision(self.owner_key(a), CompareOp::Equal, 0)),
        );
        compares
    }

    /// The ownership record of `target` as the guard of a write.
    pub(super) fn owned_by(&self, target: &str, owner: &Owner) -> Compare {
        Compare::value(self.owner_key(target), CompareOp::Equal, owner.record())
    }

    /// Deletes every key under an owned `target` and its ownership record, in one guarded txn.
    ///
    /// Returns the number of keys deleted; 0, touching nothing, when `owner` does not own it.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        // Whatever becomes of the release, what this process knew was under it is stale.
        self.inner.listings.forget(target);
        if self.inner.config.cluster.is_some() {
            return self.release_own_keys(target, owner).await;
        }
        // Without a cluster name every key under the target is this controller's: one txn
        // deletes them by prefix with the records, atomically, with no listing and no batches
        // (which is why this is not the shared `release_batches`).
        let key = self.owner_key(target);
        let resp = self
            .guarded(
                "release target",
                vec![self.owned_by(target, owner)],
                vec![
                    TxnOp::delete(
                        watch_prefix(target),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                    TxnOp::delete(key, None),
                    TxnOp::delete(self.publication_key(&owner.uid), None),
                ],
                vec![],
            )
            .await?;
        self.forget_claim(target);
        if !resp.succeeded() {
            return Ok(0);
        }
        let deleted = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Delete(d) => Some(usize::try_from(d.deleted()).unwrap_or(0)),
                _ => None,
            })
            .unwrap_or(0);
        info!(registry_target = target, deleted, "released target");
        Ok(deleted)
    }

    /// With a cluster name: deletes only this cluster's keys under `target` (other clusters
    /// publish there too), then the ownership record, in txns guarded by that record.
    async fn release_own_keys(&self, target: &str, owner: &Owner) -> Result<usize> {
        let listing = self.list(target).await?;
        let entries = listing.current.len();
        let mut ops: Vec<Op> = listing
            .current
            .into_keys()
            .map(|key| Op::Delete { key })
            .collect();
        ops.push(Op::Delete {
            key: self.publication_key(&owner.uid),
        });
        ops.push(Op::Delete {
            key: self.owner_key(target),
        });
        let scope = self.scope(target, owner, 0);
        release_batches(self, &scope, &ops, entries).await
    }

    /// Forgets the claim of a released `target`, and what this process knew was under it.
    pub(super) fn forget_claim(&self, target: &str) {
        self.inner.fence.claims().forget(target);
        self.inner.listings.forget(target);
    }
}

#[async_trait::async_trait]
impl OwnerRecords for EtcdRegistry {
    fn claims(&self) -> &Claims {
        self.inner.fence.claims()
    }

    /// One txn: the record must not exist, nor any nesting one; when it fails, the records in
    /// the way are read in the same txn (the target's own first).
    async fn create(
        &self,
        target: &str,
        owner: &Owner,
        publication: Option<&[u8]>,
    ) -> Result<Created> {
        let key = self.owner_key(target);
        let mut compares = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)];
        compares.extend(self.no_nesting(target));
        let mut on_failure = vec![
            TxnOp::get(key.clone(), None),
            TxnOp::get(
                format!("{key}/"),
                Some(GetOptions::new().with_prefix().with_limit(1)),
            ),
        ];
        on_failure.extend(
            ancestors(target)
                .into_iter()
                .map(|a| TxnOp::get(self.owner_key(a), None)),
        );
        let mut put = vec![TxnOp::put(key, owner.record(), None)];
        put.extend(
            publication.map(|p| TxnOp::put(self.publication_key(&owner.uid), p.to_vec(), None)),
        );
        let resp = self
            .guarded("claim target", compares, put, on_failure)
            .await?;
        if resp.succeeded() {
            return Ok(Created::Owned(resp.header().map_or(0, |h| h.revision())));
        }
        let found: Option<KeyValue> = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let records = self.owner_key("");
        Ok(Created::Held(found.map(|kv| {
            Held {
                target: kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(&records))
                    .unwrap_or(target)
                    .to_owned(),
                record: kv.value().to_vec(),
                version: kv.mod_revision(),
            }
        })))
    }

    async fn replace(&self, target: &str, owner: &Owner, version: i64) -> Result<Option<i64>> {
        let key = self.owner_key(target);
        let mut compares = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            version,
        )];
        compares.extend(self.no_nesting(target));
        let put = vec![TxnOp::put(key, owner.record(), None)];
        let resp = self
            .guarded("take over target", compares, put, vec![])
            .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    async fn write_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<bool> {
        let put = TxnOp::put(self.publication_key(&owner.uid), record.to_vec(), None);
        let guard = vec![self.owned_by(target, owner)];
        let resp = self
            .guarded("record publication", guard, vec![put], vec![])
            .await?;
        Ok(resp.succeeded())
    }

    /// Unreachable in practice: the failed compare and the reads of the records in the way
    /// are one txn at one revision, so a record is always found.
    fn kept_changing(&self, target: &str) -> Error {
        Error::OwnershipLost {
            target: target.to_owned(),
        }
    }
}
