//! Service ownership: `<kv_root>/[clusters/<c>/]owners/<service>` names the GrpcService that
//! may write the service's instances on our node, claimed with a create-only KV CAS. The flows
//! are the shared ones ([`crate::registry::ownership`]); this file supplies Consul's guarded KV
//! writes for them.

use super::api::{KvEntry, TxnOp};
use super::instance::Change;
use super::{ConsulRegistry, Guarded, index, version};
use crate::registry::ownership::{Claims, Created, Held, OwnerRecords};
use crate::registry::writes::release_batches;
use crate::registry::{Error, Owner, Result};

impl ConsulRegistry {
    /// The key of a service's ownership record.
    #[must_use]
    pub fn owner_key(&self, service: &str) -> String {
        self.inner.records.owner(service)
    }

    /// The ownership record of `service` and its index.
    pub(super) async fn read_owner(&self, service: &str) -> Result<Option<KvEntry>> {
        self.read_kv("read ownership record", &self.owner_key(service))
            .await
    }

    /// The KV key of an owner's publication record, `<records-root>/published/<uid>`.
    #[must_use]
    pub fn publication_key(&self, uid: &str) -> String {
        self.inner.records.publication(uid)
    }

    /// The publication record of the owner `uid`.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        let entry = self
            .read_kv("read publication record", &self.publication_key(uid))
            .await?;
        Ok(entry.map(|entry| entry.bytes()))
    }

    /// Every publication record of this controller: the owner uid and the record.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = self.publication_key("");
        self.kv_under("list publication records", &prefix).await
    }

    /// See [`crate::registry::Backend::heartbeat`]: KV `<records-root>/writers/<instance>`.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        let prefix = self.inner.records.writer("");
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
        let key = self.inner.records.writer(instance);
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
        let prefix = self.inner.records.owner("");
        Ok(self
            .kv_under("list ownership records", &prefix)
            .await?
            .into_iter()
            .filter_map(|(service, value)| Some((service, serde_json::from_slice(&value).ok()?)))
            .collect())
    }

    /// The KV entry at `key`, with its index.
    pub(super) async fn read_kv(&self, op: &'static str, key: &str) -> Result<Option<KvEntry>> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<Vec<KvEntry>>(op, &format!("/v1/kv/{key}"), &[])
            .await;
        self.record("read", started, read.as_ref().err());
        Ok(read?.body.and_then(|e| e.into_iter().next()))
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

    /// The index of `owner`'s record for `service`, the guard of every write.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when the record does not name `owner`; Consul failures.
    pub(super) async fn owned_index(&self, service: &str, owner: &Owner) -> Result<u64> {
        if let Some(version) = self.inner.fence.claims().version(service, owner) {
            return Ok(index(version));
        }
        match self.read_owner(service).await? {
            Some(entry) if entry.bytes() == owner.record() => {
                let claims = self.inner.fence.claims();
                claims.remember(service, owner, version(entry.modify_index));
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
        let entry = self.read_owner(service).await?;
        let Some(entry) = entry.filter(|e| e.bytes() == owner.record()) else {
            self.forget_claim(service);
            return Ok(0);
        };
        let listing = self.list(service).await?;
        let entries = listing.instances.len();
        let mut ops: Vec<TxnOp> = listing
            .instances
            .into_iter()
            .map(|i| Change::Delete(i.id).op(&self.inner.node, service))
            .collect();
        let key = self.owner_key(service);
        ops.push(TxnOp::kv_delete(&self.publication_key(&owner.uid)));
        ops.push(TxnOp::kv_delete_cas(&key, entry.modify_index));
        let scope = self.scope(service, entry.modify_index);
        release_batches(self, &scope, &ops, entries).await
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

    pub(super) fn forget_claim(&self, service: &str) {
        self.inner.fence.claims().forget(service);
    }

    /// The index of a committed CAS: its result comes last (the fence's comes first).
    fn cas_index(results: &[super::api::TxnResult]) -> i64 {
        version(
            results
                .last()
                .and_then(|r| r.kv)
                .map_or(0, |kv| kv.modify_index),
        )
    }
}

#[async_trait::async_trait]
impl OwnerRecords for ConsulRegistry {
    fn claims(&self) -> &Claims {
        self.inner.fence.claims()
    }

    /// A create-only CAS; when it fails, the record is read (Consul's service names are flat:
    /// no target nests in another, so only the service's own record can be in the way).
    async fn create(
        &self,
        service: &str,
        owner: &Owner,
        publication: Option<&[u8]>,
    ) -> Result<Created> {
        // The record last: its index is the claim's version (one txn, one index, either way).
        let mut write: Vec<TxnOp> = publication
            .map(|p| TxnOp::kv_set(&self.publication_key(&owner.uid), p))
            .into_iter()
            .collect();
        write.push(TxnOp::kv_cas(&self.owner_key(service), &owner.record(), 0));
        if let Guarded::Committed(results) = self.guarded("claim target", vec![], write).await? {
            return Ok(Created::Owned(Self::cas_index(&results)));
        }
        let entry = self.read_owner(service).await?;
        Ok(Created::Held(entry.map(|entry| Held {
            record: entry.bytes(),
            version: version(entry.modify_index),
            target: service.to_owned(),
        })))
    }

    async fn replace(&self, service: &str, owner: &Owner, version: i64) -> Result<Option<i64>> {
        let key = self.owner_key(service);
        let write = vec![TxnOp::kv_cas(&key, &owner.record(), index(version))];
        match self.guarded("take over target", vec![], write).await? {
            Guarded::Committed(results) => Ok(Some(Self::cas_index(&results))),
            Guarded::GuardFailed | Guarded::OpFailed(_) => Ok(None),
        }
    }

    /// Reads the ownership record first: its index guards the write.
    async fn write_publication(&self, service: &str, owner: &Owner, record: &[u8]) -> Result<bool> {
        let entry = self.read_owner(service).await?;
        let Some(entry) = entry.filter(|e| e.bytes() == owner.record()) else {
            return Ok(false);
        };
        let guard = vec![TxnOp::check_index(
            &self.owner_key(service),
            entry.modify_index,
        )];
        let set = vec![TxnOp::kv_set(&self.publication_key(&owner.uid), record)];
        match self.guarded("record publication", guard, set).await? {
            Guarded::Committed(_) => Ok(true),
            Guarded::GuardFailed => Ok(false),
            Guarded::OpFailed(e) => Err(self.refused("record publication", &e)),
        }
    }

    fn kept_changing(&self, service: &str) -> Error {
        Error::Consul {
            op: "claim target",
            addr: self.inner.api.addr().to_owned(),
            status: None,
            cause: format!("the ownership record of {service} kept changing"),
        }
    }
}
