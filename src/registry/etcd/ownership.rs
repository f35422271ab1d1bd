//! Target ownership: `<registrar-root>/owners/<target>` names the GrpcService that may write
//! under the target, claimed with a compare-and-swap txn.

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, TxnOp, TxnOpResponse};
use tonic_etcd_resolver::format::watch_prefix;
use tracing::info;

use super::{EtcdRegistry, Op, batches};
use crate::registry::{Claim, Owner, Result, ancestors};

impl EtcdRegistry {
    /// The key of a target's ownership record.
    #[must_use]
    pub fn owner_key(&self, target: &str) -> String {
        format!("{}/owners/{target}", self.inner.config.records_root())
    }

    /// The key of an owner's publication record, `<records-root>/published/<uid>`.
    #[must_use]
    pub fn publication_key(&self, uid: &str) -> String {
        format!("{}/published/{uid}", self.inner.config.records_root())
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
        let guard = Compare::value(self.owner_key(target), CompareOp::Equal, owner.record());
        let put = TxnOp::put(self.publication_key(&owner.uid), record.to_vec(), None);
        let resp = self
            .guarded("record publication", vec![guard], vec![put], vec![])
            .await?;
        if !resp.succeeded() {
            self.forget_claim(target);
            return Err(crate::registry::Error::OwnershipLost {
                target: target.to_owned(),
            });
        }
        Ok(())
    }

    /// The publication record of the owner `uid`.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        let started = std::time::Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = crate::registry::error::timeout(
            "read publication record",
            self.inner.config.op_timeout,
            kv.get(self.publication_key(uid), None),
        )
        .await;
        self.inner.metrics.observe_request("etcd", "range", started);
        self.record("range", resp.as_ref().err());
        Ok(resp?.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// See [`crate::registry::Backend::heartbeat`]: `<records-root>/writers/<instance>`.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        let prefix = format!("{}/writers/", self.inner.config.records_root());
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
        let key = format!("{}/writers/{instance}", self.inner.config.records_root());
        let txn = etcd_client::Txn::new().and_then(vec![TxnOp::delete(key, None)]);
        self.txn("forget writer", txn).await.map(|_| ())
    }

    /// Every ownership record under this controller's records root: target and owner.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        let started = std::time::Instant::now();
        let prefix = format!("{}/owners/", self.inner.config.records_root());
        let mut kv = self.inner.client.kv_client();
        let resp = crate::registry::error::timeout(
            "list ownership records",
            self.inner.config.op_timeout,
            kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        self.inner.metrics.observe_request("etcd", "range", started);
        self.record("range", resp.as_ref().err());
        Ok(resp?
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
        let started = std::time::Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = crate::registry::error::timeout(
            "read ownership record",
            self.inner.config.op_timeout,
            kv.get(self.owner_key(target), None),
        )
        .await;
        self.inner.metrics.observe_request("etcd", "range", started);
        self.record("range", resp.as_ref().err());
        Ok(resp?
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
        if self.inner.claimed.lock().expect("lock").get(target) == Some(owner) {
            return Ok(Claim::Owned);
        }
        let key = self.owner_key(target);
        // The record must not exist, nor any record of a target nested in this one (under
        // `<key>/`) or containing it (an ancestor's key): a sync of the outer target would
        // delete the inner one's keys. All in the one compare-and-swap.
        let children = format!("{key}/");
        let ancestors: Vec<String> = ancestors(target)
            .into_iter()
            .map(|a| self.owner_key(a))
            .collect();
        let mut compares = vec![
            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Compare::create_revision(children.clone(), CompareOp::Equal, 0).with_prefix(),
        ];
        compares.extend(
            ancestors
                .iter()
                .map(|a| Compare::create_revision(a.clone(), CompareOp::Equal, 0)),
        );
        let mut on_failure = vec![
            TxnOp::get(key.clone(), None),
            TxnOp::get(
                children,
                Some(GetOptions::new().with_prefix().with_limit(1)),
            ),
        ];
        on_failure.extend(ancestors.iter().map(|a| TxnOp::get(a.clone(), None)));
        let resp = self
            .guarded(
                "claim target",
                compares,
                vec![TxnOp::put(key.clone(), owner.record(), None)],
                on_failure,
            )
            .await?;
        let claim = if resp.succeeded() {
            info!(registry_target = target, uid = %owner.uid, "claimed target");
            Claim::Owned
        } else {
            // The first record found: the target's own, else a nested or containing one.
            let found = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                })
                .next();
            let Some(kv) = found else {
                // Deleted between compare and get: try again.
                return Box::pin(self.claim(target, owner)).await;
            };
            let records = self.owner_key("");
            let held = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&records))
                .unwrap_or(target)
                .to_owned();
            let version = kv.mod_revision();
            match serde_json::from_slice::<Owner>(kv.value()).ok() {
                Some(current) if current.uid == owner.uid && held == target => {
                    if current != *owner {
                        // Same object, refreshed identity: rewrite under CAS.
                        return self.take_over(target, owner, version).await;
                    }
                    Claim::Owned
                }
                Some(current) => Claim::Conflict {
                    owner: current,
                    version,
                    target: held,
                },
                None => Claim::Conflict {
                    owner: Owner {
                        uid: String::from_utf8_lossy(kv.value()).into_owned(),
                        namespace: String::new(),
                        name: String::new(),
                    },
                    version,
                    target: held,
                },
            }
        };
        if claim == Claim::Owned {
            self.remember_claim(target, owner);
        }
        Ok(claim)
    }

    /// Takes over a target whose recorded owner is gone, guarded on the record's mod revision so
    /// that two claimants cannot both win.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim> {
        let key = self.owner_key(target);
        let mut compares = vec![
            Compare::mod_revision(key.clone(), CompareOp::Equal, version),
            Compare::create_revision(format!("{key}/"), CompareOp::Equal, 0).with_prefix(),
        ];
        compares.extend(
            ancestors(target)
                .into_iter()
                .map(|a| Compare::create_revision(self.owner_key(a), CompareOp::Equal, 0)),
        );
        let resp = self
            .guarded(
                "take over target",
                compares,
                vec![TxnOp::put(key, owner.record(), None)],
                vec![],
            )
            .await?;
        if resp.succeeded() {
            info!(registry_target = target, uid = %owner.uid, "took over target from a stale owner");
            self.remember_claim(target, owner);
            Ok(Claim::Owned)
        } else {
            Box::pin(self.claim(target, owner)).await
        }
    }

    /// Deletes every key under an owned `target` and its ownership record, in one guarded txn.
    ///
    /// Returns the number of keys deleted; 0, touching nothing, when `owner` does not own it.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        if self.inner.config.cluster.is_some() {
            return self.release_own_keys(target, owner).await;
        }
        let key = self.owner_key(target);
        let resp = self
            .guarded(
                "release target",
                vec![Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    owner.record(),
                )],
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
        let key = self.owner_key(target);
        let guard = Compare::value(key.clone(), CompareOp::Equal, owner.record());
        let listing = self.list(target).await?;
        let mut ops: Vec<Op> = listing
            .current
            .into_keys()
            .map(|key| Op::Delete { key })
            .collect();
        let record = self.publication_key(&owner.uid);
        ops.push(Op::Delete {
            key: record.clone(),
        });
        ops.push(Op::Delete { key: key.clone() });
        let mut deleted = 0;
        for batch in batches(&ops, self.inner.config.max_txn_ops, super::MAX_TXN_BYTES) {
            let txn_ops: Vec<TxnOp> = batch
                .iter()
                .map(|op| match op {
                    Op::Delete { key } | Op::Put { key, .. } => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            let resp = self
                .guarded("release target", vec![guard.clone()], txn_ops, vec![])
                .await?;
            if !resp.succeeded() {
                self.forget_claim(target);
                return Ok(deleted);
            }
            deleted += batch
                .iter()
                .filter(|op| !matches!(op, Op::Delete { key: k } if *k == key || *k == record))
                .count();
        }
        self.forget_claim(target);
        info!(
            registry_target = target,
            deleted, "released this cluster's keys under target"
        );
        Ok(deleted)
    }

    fn remember_claim(&self, target: &str, owner: &Owner) {
        self.inner
            .claimed
            .lock()
            .expect("lock")
            .insert(target.to_owned(), owner.clone());
    }

    pub(super) fn forget_claim(&self, target: &str) {
        self.inner.claimed.lock().expect("lock").remove(target);
    }
}
