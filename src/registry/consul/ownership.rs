//! Service ownership: `<kv_root>/[clusters/<c>/]owners/<service>` names the GrpcService that
//! may write the service's instances on our node, claimed with a create-only KV CAS.

use tracing::info;

use super::api::{KvEntry, TxnOp};
use super::instance::batches;
use super::{ConsulRegistry, Guarded};
use crate::registry::{Claim, Error, Owner, Result};

impl ConsulRegistry {
    /// The key of a service's ownership record.
    #[must_use]
    pub fn owner_key(&self, service: &str) -> String {
        format!("{}/owners/{service}", self.inner.config.records_root())
    }

    /// The ownership record of `service` and its index.
    pub(super) async fn read_owner(&self, service: &str) -> Result<Option<KvEntry>> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<Vec<KvEntry>>(
                "read ownership record",
                &format!("/v1/kv/{}", self.owner_key(service)),
                &[],
            )
            .await;
        self.record("read", started, read.as_ref().err());
        Ok(read?.body.and_then(|e| e.into_iter().next()))
    }

    /// The KV key of an owner's publication record, `<records-root>/published/<uid>`.
    #[must_use]
    pub fn publication_key(&self, uid: &str) -> String {
        format!("{}/published/{uid}", self.inner.config.records_root())
    }

    /// Writes `owner`'s publication record, guarded on its ownership of `service`.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`]; Consul failures.
    pub async fn record_publication(
        &self,
        service: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<()> {
        let lost = || Error::OwnershipLost {
            target: service.to_owned(),
        };
        let entry = self.read_owner(service).await?.ok_or_else(lost)?;
        if entry.bytes() != owner.record() {
            self.forget_claim(service);
            return Err(lost());
        }
        let guard = vec![TxnOp::check_index(
            &self.owner_key(service),
            entry.modify_index,
        )];
        let set = vec![TxnOp::kv_set(&self.publication_key(&owner.uid), record)];
        match self.guarded("record publication", guard, set).await? {
            Guarded::Committed(_) => Ok(()),
            Guarded::GuardFailed => {
                self.forget_claim(service);
                Err(lost())
            }
            Guarded::OpFailed(e) => Err(self.refused("record publication", &e)),
        }
    }

    /// The publication record of the owner `uid`.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<Vec<KvEntry>>(
                "read publication record",
                &format!("/v1/kv/{}", self.publication_key(uid)),
                &[],
            )
            .await;
        self.record("read", started, read.as_ref().err());
        Ok(read?
            .body
            .and_then(|e| e.into_iter().next())
            .map(|entry| entry.bytes()))
    }

    /// See [`crate::registry::Backend::heartbeat`]: KV `<records-root>/writers/<instance>`.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        let prefix = format!("{}/writers/", self.inner.config.records_root());
        let started = std::time::Instant::now();
        let set = vec![TxnOp::kv_set(
            &format!("{prefix}{instance}"),
            beat.to_string().as_bytes(),
        )];
        let outcome = self.inner.api.txn("announce writer", &set).await;
        self.record("txn", started, outcome.as_ref().err());
        outcome?;
        Ok(self
            .kv_under("read writers", &prefix)
            .await?
            .into_iter()
            .filter_map(|(other, value)| {
                let beat = String::from_utf8(value).ok()?.parse().ok()?;
                (other != instance).then_some((other, beat))
            })
            .collect())
    }

    /// See [`crate::registry::Backend::forget_writer`].
    ///
    /// # Errors
    /// Consul failures.
    pub async fn forget_writer(&self, instance: &str) -> Result<()> {
        let key = format!("{}/writers/{instance}", self.inner.config.records_root());
        let started = std::time::Instant::now();
        let outcome = self
            .inner
            .api
            .txn("forget writer", &[TxnOp::kv_delete(&key)])
            .await;
        self.record("txn", started, outcome.as_ref().err());
        outcome.map(|_| ())
    }

    /// Every ownership record under this controller's records root: service and owner.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        let prefix = format!("{}/owners/", self.inner.config.records_root());
        Ok(self
            .kv_under("list ownership records", &prefix)
            .await?
            .into_iter()
            .filter_map(|(service, value)| Some((service, serde_json::from_slice(&value).ok()?)))
            .collect())
    }

    /// Every KV entry under `prefix`: the rest of its key, and its value.
    async fn kv_under(&self, op: &'static str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<Vec<KvEntry>>(op, &format!("/v1/kv/{prefix}"), &[("recurse", "true")])
            .await;
        self.record("read", started, read.as_ref().err());
        Ok(read?
            .body
            .unwrap_or_default()
            .into_iter()
            .filter_map(|entry| Some((entry.key.strip_prefix(prefix)?.to_owned(), entry.bytes())))
            .collect())
    }

    /// The owner recorded for `service` in Consul's KV store.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn owner_of(&self, service: &str) -> Result<Option<Owner>> {
        Ok(self
            .read_owner(service)
            .await?
            .and_then(|entry| serde_json::from_slice(&entry.bytes()).ok()))
    }

    /// Claims `service` for `owner` with a create-only CAS (behind the fence). Idempotent for
    /// the same uid; a refreshed identity of the same uid is rewritten under CAS.
    ///
    /// # Errors
    /// Consul failures; [`Error::Fenced`].
    pub async fn claim(&self, service: &str, owner: &Owner) -> Result<Claim> {
        if self
            .inner
            .claimed
            .lock()
            .expect("lock")
            .get(service)
            .is_some_and(|(o, _)| o == owner)
        {
            return Ok(Claim::Owned);
        }
        let key = self.owner_key(service);
        for _ in 0..3 {
            let write = vec![TxnOp::kv_cas(&key, &owner.record(), 0)];
            if let Guarded::Committed(results) = self.guarded("claim target", vec![], write).await?
            {
                // The last result answers the CAS (the fence's comes first).
                let index = results
                    .last()
                    .and_then(|r| r.kv)
                    .map_or(0, |kv| kv.modify_index);
                info!(registry_target = service, uid = %owner.uid, revision = index, "claimed consul service");
                self.remember_claim(service, owner, index);
                return Ok(Claim::Owned);
            }
            let Some(entry) = self.read_owner(service).await? else {
                // Released between the CAS and the read: try again.
                continue;
            };
            let version = i64::try_from(entry.modify_index).unwrap_or(i64::MAX);
            let bytes = entry.bytes();
            return match serde_json::from_slice::<Owner>(&bytes).ok() {
                Some(current) if current.uid == owner.uid => {
                    if current != *owner {
                        return self.take_over(service, owner, version).await;
                    }
                    self.remember_claim(service, owner, entry.modify_index);
                    Ok(Claim::Owned)
                }
                Some(current) => Ok(Claim::Conflict {
                    owner: current,
                    version,
                    target: service.to_owned(),
                }),
                None => Ok(Claim::Conflict {
                    owner: Owner {
                        uid: String::from_utf8_lossy(&bytes).into_owned(),
                        namespace: String::new(),
                        name: String::new(),
                    },
                    version,
                    target: service.to_owned(),
                }),
            };
        }
        Err(Error::Consul {
            op: "claim target",
            addr: self.inner.api.addr().to_owned(),
            status: None,
            cause: format!("the ownership record of {service} kept changing"),
        })
    }

    /// Takes over a service whose recorded owner is gone, by CAS on the record's `version`, so
    /// two claimants cannot both win.
    ///
    /// # Errors
    /// Consul failures; [`Error::Fenced`].
    pub async fn take_over(&self, service: &str, owner: &Owner, version: i64) -> Result<Claim> {
        let key = self.owner_key(service);
        let index = u64::try_from(version).unwrap_or(0);
        let write = vec![TxnOp::kv_cas(&key, &owner.record(), index)];
        match self.guarded("take over target", vec![], write).await? {
            Guarded::Committed(results) => {
                // The last result answers the CAS (the fence's comes first).
                let index = results
                    .last()
                    .and_then(|r| r.kv)
                    .map_or(0, |kv| kv.modify_index);
                info!(registry_target = service, uid = %owner.uid, revision = index, "took over consul service from a stale owner");
                self.remember_claim(service, owner, index);
                Ok(Claim::Owned)
            }
            Guarded::GuardFailed | Guarded::OpFailed(_) => {
                Box::pin(self.claim(service, owner)).await
            }
        }
    }

    /// The index of `owner`'s record for `service`, the guard of every write.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when the record does not name `owner`; Consul failures.
    pub(super) async fn owned_index(&self, service: &str, owner: &Owner) -> Result<u64> {
        if let Some((o, index)) = self.inner.claimed.lock().expect("lock").get(service)
            && o == owner
        {
            return Ok(*index);
        }
        match self.read_owner(service).await? {
            Some(entry) if entry.bytes() == owner.record() => {
                self.remember_claim(service, owner, entry.modify_index);
                Ok(entry.modify_index)
            }
            _ => Err(Error::OwnershipLost {
                target: service.to_owned(),
            }),
        }
    }

    /// Deletes this node's instances of an owned `service` and its ownership record, in txns
    /// guarded by that record. Returns how many instances were deleted; 0, touching nothing,
    /// when `owner` does not own it.
    ///
    /// # Errors
    /// Consul failures; [`Error::Fenced`].
    pub async fn release(&self, service: &str, owner: &Owner) -> Result<usize> {
        let key = self.owner_key(service);
        let Some(entry) = self.read_owner(service).await? else {
            self.forget_claim(service);
            return Ok(0);
        };
        if entry.bytes() != owner.record() {
            self.forget_claim(service);
            return Ok(0);
        }
        let index = entry.modify_index;
        let listing = self.list(service).await?;
        let mut ops: Vec<TxnOp> = listing
            .instances
            .iter()
            .map(|i| super::instance::Change::Delete(i.id.clone()).op(&self.inner.node, service))
            .collect();
        ops.push(TxnOp::kv_delete(&self.publication_key(&owner.uid)));
        ops.push(TxnOp::kv_delete_cas(&key, index));
        let mut deleted = 0;
        for batch in batches(ops, self.max_ops(1), super::MAX_TXN_BYTES)? {
            let instances = batch
                .iter()
                .filter(|op| matches!(op, TxnOp::Service(_)))
                .count();
            let guard = vec![TxnOp::check_index(&key, index)];
            match self.guarded("release target", guard, batch).await? {
                Guarded::Committed(_) => deleted += instances,
                Guarded::GuardFailed => {
                    self.forget_claim(service);
                    return Ok(deleted);
                }
                Guarded::OpFailed(e) => return Err(self.refused("release target", &e)),
            }
        }
        self.forget_claim(service);
        info!(
            registry_target = service,
            deleted, "released consul service"
        );
        Ok(deleted)
    }

    /// Ops a write batch may carry besides the fence and `guards` guards.
    pub(super) fn max_ops(&self, guards: usize) -> usize {
        let fence = usize::from(self.fence_op().ok().flatten().is_some());
        self.inner
            .config
            .max_txn_ops
            .min(super::MAX_TXN_OPS)
            .saturating_sub(guards + fence)
            .max(1)
    }

    fn remember_claim(&self, service: &str, owner: &Owner, index: u64) {
        self.inner
            .claimed
            .lock()
            .expect("lock")
            .insert(service.to_owned(), (owner.clone(), index));
    }

    pub(super) fn forget_claim(&self, service: &str) {
        self.inner.claimed.lock().expect("lock").remove(service);
    }
}
