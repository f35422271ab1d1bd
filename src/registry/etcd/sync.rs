//! Making the keys under a target equal the desired ones: list, diff, guarded txn batches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp};
use tonic_etcd_resolver::format::watch_prefix;
use tracing::debug;

use super::lease::is_lease_not_found;
use super::{Current, EtcdRegistry, Op, batches, diff};
use crate::registry::error::timeout;
use crate::registry::{Error, Owner, Result, SyncReport};

impl EtcdRegistry {
    /// Lists the keys under `target/` with their values and leases, and the revision read at.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn list(&self, target: &str) -> Result<(BTreeMap<String, Current>, i64)> {
        let started = Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = timeout(
            "list target keys",
            self.inner.config.op_timeout,
            kv.get(watch_prefix(target), Some(GetOptions::new().with_prefix())),
        )
        .await;
        self.inner.metrics.observe_etcd("range", started);
        self.record("range", resp.as_ref().err());
        let resp = resp?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let current = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    Current {
                        value: kv.value().to_vec(),
                        lease: kv.lease(),
                    },
                )
            })
            .collect();
        Ok((current, revision))
    }

    /// Makes the keys under an owned `target` equal `desired`, all on the shared lease for `ttl`.
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
        let lease_id = self.inner.leases.lease(ttl).await?;
        let (current, mut revision) = self.list(target).await?;
        let ops = diff(&current, &desired, lease_id);
        let mut report = SyncReport {
            registered: desired.len(),
            lease_id,
            ..SyncReport::default()
        };
        let guard = Compare::value(self.owner_key(target), CompareOp::Equal, owner.record());
        for batch in batches(&ops, self.inner.config.max_txn_ops, super::MAX_TXN_BYTES) {
            let txn_ops: Vec<TxnOp> = batch
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => TxnOp::put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    ),
                    Op::Delete { key } => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            let write = self.guarded("write registry batch", vec![guard.clone()], txn_ops, vec![]);
            let resp = match write.await {
                Err(Error::Etcd { op, cause }) if is_lease_not_found(&cause) => {
                    // The keeper checks at once and, when the lease is gone, grants a new one
                    // and announces it; the reconcile that follows re-puts everything.
                    self.inner.leases.suspect(ttl).await;
                    return Err(Error::Etcd { op, cause });
                }
                other => other?,
            };
            if !resp.succeeded() {
                self.forget_claim(target);
                return Err(Error::OwnershipLost {
                    target: target.to_owned(),
                });
            }
            report.txns += 1;
            revision = resp.header().map_or(revision, |h| h.revision());
            for op in batch {
                match op {
                    Op::Put { .. } => report.puts += 1,
                    Op::Delete { .. } => report.deletes += 1,
                }
            }
        }
        report.revision = revision;
        if report.puts + report.deletes > 0 {
            debug!(
                target,
                puts = report.puts,
                deletes = report.deletes,
                revision,
                lease_id = %format!("{lease_id:x}"),
                "synced target"
            );
        }
        Ok(report)
    }
}
