//! The fence: with leader election on, every write carries a compare on the leader record
//! `<registrar-root>/leader`, so a deposed leader (paused, partitioned, slow) writes nothing.
//! The state is the shared [`crate::registry::fence`]; this file supplies etcd's leader record
//! and the compare on it.

use std::time::Instant;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tracing::warn;

use super::EtcdRegistry;
use crate::registry::error::timeout;
use crate::registry::{Error, Result};

/// The leader record: `"<term, 10 digits> <holder>"`, so that byte order is term order and a
/// record can only be replaced by a later term.
#[must_use]
pub fn leader_record(term: i64, holder: &str) -> String {
    format!("{:010} {holder}", term.max(0))
}

/// The term in a leader record; 0 when unreadable.
#[must_use]
pub fn leader_term(record: &[u8]) -> i64 {
    std::str::from_utf8(record)
        .ok()
        .and_then(|s| s.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

impl EtcdRegistry {
    /// The key of the leader record that fences writes when leader election is on.
    #[must_use]
    pub fn leader_key(&self) -> String {
        self.inner.records.leader()
    }

    /// Makes this replica the fenced leader for `term`: writes the leader record (only over an
    /// older term), then guards every write on it. The claim cache starts empty, so the new
    /// leader re-claims everything it reconciles.
    ///
    /// # Errors
    /// [`Error::Fenced`] when etcd already holds a later leader record; etcd failures.
    pub async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        // A new term: what this process knew was under any target is another term's.
        self.inner.listings.forget_all();
        let key = self.leader_key();
        let record = leader_record(term, holder);
        let fenced = || Error::Fenced {
            op: "write leader record",
        };
        let mut attempts = 0;
        let revision = loop {
            attempts += 1;
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Less, record.clone())])
                .and_then([TxnOp::put(key.clone(), record.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.txn("write leader record", txn).await?;
            if resp.succeeded() {
                break resp.header().map_or(0, |h| h.revision());
            }
            let current = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            match current {
                Some(kv) if kv.value() == record.as_bytes() => break kv.mod_revision(),
                Some(kv) => {
                    let newer = leader_term(kv.value());
                    warn!(term, newer_term = newer, "etcd holds a later leader record");
                    return Err(fenced());
                }
                None if attempts < 3 => {
                    // No record yet (a value compare on a missing key fails): create it.
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.clone(), record.clone(), None)]);
                    let resp = self.txn("write leader record", txn).await?;
                    if resp.succeeded() {
                        break resp.header().map_or(0, |h| h.revision());
                    }
                }
                None => return Err(fenced()),
            }
        };
        Ok(self.inner.fence.led(revision, holder, term, valid_until))
    }

    /// The term of the leader record in etcd, 0 when there is none.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn leader_term(&self) -> Result<i64> {
        let record = self.leader_record().await?;
        Ok(record.map_or(0, |kv| leader_term(kv.value())))
    }

    async fn leader_record(&self) -> Result<Option<etcd_client::KeyValue>> {
        let mut kv = self.inner.client.kv_client();
        let resp = timeout(
            "read leader record",
            self.inner.config.op_timeout,
            kv.get(self.leader_key(), None),
        )
        .await?;
        Ok(resp.kvs().first().cloned())
    }

    /// Extends the leader's local write permission to `valid_until` (after a Lease renewal).
    pub fn extend_fence(&self, valid_until: Instant) {
        self.inner.fence.extend(valid_until);
    }

    /// Stops writing at once, and forgets claims (the next leader owns them) and what this
    /// process knew was under each target.
    pub fn depose(&self) {
        self.inner.fence.depose();
        self.inner.listings.forget_all();
    }

    /// The compare that fences a write, `None` without leader election.
    pub(super) fn fence_compare(&self) -> Result<Option<Compare>> {
        let guard = self.inner.fence.guard("write to etcd")?;
        Ok(guard
            .map(|revision| Compare::mod_revision(self.leader_key(), CompareOp::Equal, revision)))
    }

    /// A txn under `compares` plus the leader fence. When it fails and the fence no longer
    /// holds (a later leader wrote its record), this replica is deposed and [`Error::Fenced`]
    /// returned, so the caller never mistakes a fenced failure for a lost compare of its own.
    pub(super) async fn guarded(
        &self,
        op: &'static str,
        mut compares: Vec<Compare>,
        then: Vec<TxnOp>,
        otherwise: Vec<TxnOp>,
    ) -> Result<etcd_client::TxnResponse> {
        let fence = self.fence_compare().map_err(|_| Error::Fenced { op })?;
        let fenced = fence.is_some();
        compares.extend(fence);
        let txn = Txn::new().when(compares).and_then(then).or_else(otherwise);
        let resp = self.txn(op, txn).await?;
        if !resp.succeeded() && fenced && !self.fence_holds().await? {
            warn!(op, "a later leader fenced this replica; it stops writing");
            self.depose();
            return Err(Error::Fenced { op });
        }
        Ok(resp)
    }

    /// Whether the leader record is still the one this replica wrote.
    async fn fence_holds(&self) -> Result<bool> {
        let Some(leader) = self.inner.fence.leader() else {
            return Ok(false);
        };
        let record = self.leader_record().await?;
        Ok(record.map(|kv| kv.mod_revision()) == Some(leader.guard))
    }
}
