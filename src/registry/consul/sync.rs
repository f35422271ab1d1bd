//! Making this node's instances of a service equal the desired ones: list, diff, guarded txn
//! batches.

use tracing::{debug, warn};

use super::api::{Indexed, Instance, NodeServices, TxnOp};
use super::instance::{batches, desired, diff};
use super::{ConsulRegistry, ConsulService, Guarded};
use crate::registry::{Error, Publication, Result, SyncReport};

/// This node's instances of one service, as [`ConsulRegistry::list`] reads them.
#[derive(Debug, Default)]
pub struct Listing {
    /// The node, when it is registered.
    pub(super) node: Option<Indexed>,
    /// The service's instances on it.
    pub(super) instances: Vec<Instance>,
    /// Consul's index at the read.
    pub(super) index: u64,
}

impl ConsulRegistry {
    /// Lists the instances of `service` on this registry's node (and nothing else: other
    /// services on the node and other nodes are never read for a write).
    ///
    /// # Errors
    /// Consul failures.
    pub(super) async fn list(&self, service: &str) -> Result<Listing> {
        let filter = format!("Service == \"{service}\"");
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<NodeServices>(
                "list consul instances",
                &format!("/v1/catalog/node-services/{}", self.inner.node),
                &[("filter", filter.as_str())],
            )
            .await;
        self.record("read", started, read.as_ref().err());
        let read = read?;
        let body = read.body.unwrap_or_default();
        Ok(Listing {
            node: body.node,
            instances: body.services.unwrap_or_default(),
            index: read.index,
        })
    }

    /// The ids of this node's instances of `service`, for tests and status.
    ///
    /// # Errors
    /// Consul failures.
    pub async fn instance_ids(&self, service: &str) -> Result<Vec<String>> {
        Ok(self
            .list(service)
            .await?
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect())
    }

    /// Makes this node's instances of an owned service equal `publication`'s endpoints.
    ///
    /// New and changed instances are put by CAS on what was read, gone ones deleted, unchanged
    /// ones left alone, in txns of at most [`super::MAX_TXN_OPS`] ops and
    /// [`super::MAX_TXN_BYTES`] bytes, each guarded by the ownership record (and the fence).
    /// The node and its check are registered first when missing. A txn refused because an
    /// instance changed under us is retried once on a fresh listing.
    ///
    /// # Errors
    /// [`Error::Spec`] for names or meta Consul would refuse (nothing written);
    /// [`Error::OwnershipLost`]; [`Error::Fenced`]; Consul failures.
    pub async fn sync(&self, publication: &Publication) -> Result<SyncReport> {
        let service = publication.target();
        let desired = desired(
            service,
            &publication.owner,
            &publication.endpoints,
            publication
                .placement
                .as_any()
                .downcast_ref::<ConsulService>()
                .map_or(&[][..], |s| s.tags.as_slice()),
        )?;
        let guard_index = self.owned_index(service, &publication.owner).await?;
        self.fence_op().map_err(|_| Error::Fenced {
            op: "write registry batch",
        })?;
        let key = self.owner_key(service);
        let mut report = SyncReport {
            registered: desired.len(),
            ..SyncReport::default()
        };
        let mut retried = false;
        let mut revision;
        let mut unindexed = false;
        'sync: loop {
            let seen = self.incarnation();
            let listing = self.list(service).await?;
            revision = listing.index;
            match listing.node {
                Some(node) => self.saw_node(node.create_index),
                None => {
                    self.register_node(seen).await?;
                }
            }
            let ops: Vec<TxnOp> = diff(&listing.instances, &desired)
                .iter()
                .map(|c| c.op(&self.inner.node, service))
                .collect();
            for batch in batches(ops, self.max_ops(1), super::MAX_TXN_BYTES)? {
                let puts = batch
                    .iter()
                    .filter(|op| matches!(op, TxnOp::Service(s) if s.verb != "delete"))
                    .count();
                let deletes = batch.len() - puts;
                let guard = vec![TxnOp::check_index(&key, guard_index)];
                match self.guarded("write registry batch", guard, batch).await? {
                    Guarded::Committed(results) => {
                        report.txns += 1;
                        report.puts += puts;
                        report.deletes += deletes;
                        let written = results
                            .iter()
                            .filter(|r| r.service.is_some())
                            .filter_map(super::api::TxnResult::entry)
                            .map(|e| e.modify_index)
                            .max();
                        unindexed = written.is_none();
                        revision = revision.max(written.unwrap_or(0));
                    }
                    Guarded::GuardFailed => {
                        self.forget_claim(service);
                        return Err(Error::OwnershipLost {
                            target: service.to_owned(),
                        });
                    }
                    Guarded::OpFailed(e) if !retried => {
                        retried = true;
                        warn!(registry_target = service, error = %e.what, "an instance changed under the sync; listing again");
                        continue 'sync;
                    }
                    Guarded::OpFailed(e) => return Err(self.refused("write registry batch", &e)),
                }
            }
            break;
        }
        if unindexed {
            // The last txn only deleted, and deletes return no index: ask for the current one.
            revision = revision.max(self.list_index().await?);
        }
        report.revision = i64::try_from(revision).unwrap_or(i64::MAX);
        // Consul has no lease (`lease` stays None): entries live on the synthetic node, whose
        // incarnation is logged as `node_index`.
        self.start_keeper();
        if report.puts + report.deletes > 0 {
            debug!(
                registry_target = service,
                puts = report.puts,
                deletes = report.deletes,
                txns = report.txns,
                revision = report.revision,
                "synced consul service"
            );
        }
        Ok(report)
    }

    /// Consul's current index for this node's services, read without listing any.
    async fn list_index(&self) -> Result<u64> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<NodeServices>(
                "list consul instances",
                &format!("/v1/catalog/node-services/{}", self.inner.node),
                &[("filter", "ID == \"\"")],
            )
            .await;
        self.record("read", started, read.as_ref().err());
        Ok(read?.index)
    }
}
