//! The fence: with leader election on, every write carries a KV `check-index` on the leader
//! record `<kv_root>/[clusters/<c>/]leader`, so a deposed leader (paused, partitioned, slow)
//! writes nothing. The state is the shared [`crate::registry::fence`]; this file supplies
//! Consul's leader record and the check on it.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::ConsulRegistry;
use super::api::{TxnOp, TxnOutcome};
use crate::registry::fence::Leader;
use crate::registry::{Error, Result};

/// The leader record's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The replica holding the Kubernetes Lease.
    pub holder: String,
    /// Its term (the Lease's transitions); a record is replaced only by a later term.
    pub term: i64,
}

impl ConsulRegistry {
    /// The key of the leader record that fences writes when leader election is on.
    fn leader_key(&self) -> String {
        self.inner.records.leader()
    }

    /// Makes this replica the fenced leader for `term`: writes the leader record (by CAS, only
    /// over an older term), then guards every write on its index. The claim cache starts
    /// empty, so the new leader re-claims everything it reconciles.
    ///
    /// # Errors
    /// [`Error::Fenced`] when Consul holds a later term (or this term for another holder);
    /// Consul failures.
    pub async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        let key = self.leader_key();
        let ours = LeaderRecord {
            holder: holder.to_owned(),
            term,
        };
        let value = serde_json::to_vec(&ours).unwrap_or_default();
        let fenced = || Error::Fenced {
            op: "write leader record",
        };
        let mut index = None;
        for _ in 0..3 {
            let (current, at) = self.read_leader().await?;
            match current {
                Some(current) if current == ours => {
                    index = Some(at);
                    break;
                }
                Some(current) if current.term >= term => {
                    warn!(
                        term,
                        newer_term = current.term,
                        "consul holds a later leader record"
                    );
                    return Err(fenced());
                }
                _ => {}
            }
            let started = std::time::Instant::now();
            let outcome = self
                .inner
                .api
                .txn("write leader record", &[TxnOp::kv_cas(&key, &value, at)])
                .await;
            self.record("txn", started, outcome.as_ref().err());
            if let TxnOutcome::Committed(results) = outcome? {
                index = results.first().and_then(|r| r.kv).map(|kv| kv.modify_index);
                break;
            }
            // Changed between the read and the CAS: read again.
        }
        let Some(index) = index else {
            return Err(fenced());
        };
        Ok(self.inner.fence.led(index, holder, term, valid_until))
    }

    /// The leader record and its index (0 when there is none).
    async fn read_leader(&self) -> Result<(Option<LeaderRecord>, u64)> {
        let entry = self
            .read_kv("read leader record", &self.leader_key())
            .await?;
        Ok(entry.map_or((None, 0), |e| {
            // An unreadable record is term 0: any leader may replace it.
            let record = serde_json::from_slice(&e.bytes()).unwrap_or(LeaderRecord {
                holder: String::new(),
                term: 0,
            });
            (Some(record), e.modify_index)
        }))
    }

    /// The term of the leader record in Consul, 0 when there is none.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn leader_term(&self) -> Result<i64> {
        Ok(self.read_leader().await?.0.map_or(0, |r| r.term))
    }

    /// Extends the leader's local write permission to `valid_until` (after a Lease renewal).
    pub fn extend_fence(&self, valid_until: Instant) {
        self.inner.fence.extend(valid_until);
    }

    /// Stops writing at once, and forgets claims (the next leader owns them).
    pub fn depose(&self) {
        self.inner.fence.depose();
    }

    /// After a fenced txn failed on a leader record that no longer exists (Consul lost its
    /// data, or it was deleted: no later leader wrote one), writes it again for this replica's
    /// term; when another of this replica's writers already did, guards on that record's index.
    /// Returns whether the write may be retried; a later leader's record still wins by term.
    ///
    /// etcd has no such step (a write on a lost etcd leader record fails its fence and deposes
    /// the replica), which is why this stays with Consul rather than in the shared fence.
    pub(super) async fn refence_lost_record(&self) -> Result<bool> {
        let Some(Leader {
            valid_until,
            holder,
            term,
            ..
        }) = self.inner.fence.leader()
        else {
            return Ok(false);
        };
        match self.read_leader().await? {
            (None, _) => {}
            (Some(record), at) if *record.holder == *holder && record.term == term => {
                // Our own record, rewritten by another of this replica's writers after the
                // loss (the keeper or another reconcile): guard on its new index and go on.
                return Ok(self.inner.fence.reguard(term, at));
            }
            (Some(_), _) => return Ok(false),
        }
        warn!(
            term,
            "the consul leader record is gone; writing it again for this term"
        );
        self.fence(&holder, term, valid_until).await?;
        Ok(true)
    }

    /// The `check-index` op that fences a write, `None` without leader election.
    pub(super) fn fence_op(&self) -> Result<Option<TxnOp>> {
        let guard = self.inner.fence.guard("write to consul")?;
        Ok(guard.map(|index| TxnOp::check_index(&self.leader_key(), index)))
    }
}
