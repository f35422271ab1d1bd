//! Making this node's instances of a service equal the desired ones: list, diff, guarded txn
//! batches.

use tracing::warn;

use super::api::{Indexed, Instance, NodeServices, TxnOp, TxnResult};
use super::instance::{desired, diff};
use super::{ConsulRegistry, ConsulService, Guarded, version};
use crate::registry::batch::Limits;
use crate::registry::writes::{GuardedWrites, Progress, Scope, Written, sync_batches};
use crate::registry::{Error, Publication, Result, SyncReport};

#[async_trait::async_trait]
impl GuardedWrites for ConsulRegistry {
    type Op = TxnOp;
    /// The `check-index` on the ownership record.
    type Guard = TxnOp;

    async fn write(&self, op: &'static str, guard: &TxnOp, batch: &[TxnOp]) -> Result<Written> {
        Ok(
            match self
                .guarded(op, vec![guard.clone()], batch.to_vec())
                .await?
            {
                Guarded::Committed(results) => Written::Committed(written_index(&results)),
                Guarded::GuardFailed => Written::GuardFailed,
                Guarded::OpFailed(e) => Written::Refused(self.refused(op, &e)),
            },
        )
    }
}

/// The highest index of the instances a txn wrote; `None` when it only deleted (deletes return
/// no index).
fn written_index(results: &[TxnResult]) -> Option<i64> {
    results
        .iter()
        .filter(|r| r.service.is_some())
        .filter_map(TxnResult::entry)
        .map(|e| version(e.modify_index))
        .max()
}

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
    /// Writes for `service` guarded by its ownership record at `index`: at most
    /// [`super::MAX_TXN_OPS`] ops (the configured bound, less the fence and the guard) and
    /// [`super::MAX_TXN_BYTES`] JSON bytes a txn; one op over that can never be written (Consul
    /// refuses the request), so it is refused before anything is sent.
    pub(super) fn scope<'a>(&self, service: &'a str, index: u64) -> Scope<'a, TxnOp> {
        Scope {
            target: service,
            guard: TxnOp::check_index(&self.owner_key(service), index),
            limits: Limits {
                ops: self.max_ops(1),
                bytes: super::MAX_TXN_BYTES,
                op_bytes: Some(super::MAX_TXN_BYTES),
            },
        }
    }

    /// Lists the instances of `service` on this registry's node (and nothing else: other
    /// services on the node and other nodes are never read for a write).
    ///
    /// # Errors
    /// Consul failures.
    pub(super) async fn list(&self, service: &str) -> Result<Listing> {
        let filter = format!("Service == \"{service}\"");
        let read = self.node_services(&filter).await?;
        let body = read.body.unwrap_or_default();
        Ok(Listing {
            node: body.node,
            instances: body.services.unwrap_or_default(),
            index: read.index,
        })
    }

    /// This node's services matching `filter`, and Consul's index.
    async fn node_services(&self, filter: &str) -> Result<super::api::Read<NodeServices>> {
        let started = std::time::Instant::now();
        let read = self
            .inner
            .api
            .get::<NodeServices>(
                "list consul instances",
                &format!("/v1/catalog/node-services/{}", self.inner.node),
                &[("filter", filter)],
            )
            .await;
        self.record("read", started, read.as_ref().err());
        read
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
        let scope = self.scope(service, guard_index);
        let mut progress = Progress::default();
        let mut retried = false;
        loop {
            let seen = self.incarnation();
            let listing = self.list(service).await?;
            progress.revision = progress.revision.max(version(listing.index));
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
            match sync_batches(self, &scope, &ops, &mut progress).await? {
                None => break,
                Some(e) if !retried => {
                    retried = true;
                    warn!(registry_target = service, error = %e, "an instance changed under the sync; listing again");
                }
                Some(e) => return Err(e),
            }
        }
        if progress.unindexed {
            // The last txn only deleted, and deletes return no index: ask for the current one.
            progress.revision = progress.revision.max(version(self.list_index().await?));
        }
        // Consul has no lease (`lease` stays None): entries live on the synthetic node, whose
        // incarnation is logged as `node_index`.
        self.start_keeper();
        Ok(progress.report(service, desired.len(), None))
    }

    /// Consul's current index for this node's services, read without listing any.
    async fn list_index(&self) -> Result<u64> {
        Ok(self.node_services("ID == \"\"").await?.index)
    }
}
