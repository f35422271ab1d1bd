//! The synthetic node and its liveness check, and the keeper that renews the check.
//!
//! The keeper renews `grpc-registrar:alive` (passing, node-level, so it covers every instance
//! on the node) every third of the TTL, in a txn behind the fence that also reads the node: a
//! node missing (Consul lost its data, or someone deregistered it) is registered again and
//! announced as [`Event::Replaced`], so the controller re-syncs every service. Renewals that go
//! unanswered are announced once as [`Event::Unreachable`], their return as
//! [`Event::Restored`].
//!
//! Consul servers never run a check registered through the catalog (only agents run checks,
//! and only those registered with them, for their own node), so when the controller is gone
//! for good this check stays as last written: nothing in Consul turns it critical.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{Instrument, debug, info, info_span, warn};

use super::api::{CheckDef, CheckOp, NodeDef, NodeOp, TxnOp};
use super::{ALIVE_CHECK, ConsulRegistry, Guarded, Inner};
use crate::registry::{Error, Event, Result};

/// Node meta marking the node as not run by an agent (as consul-esm and consul-k8s do).
const EXTERNAL_NODE_META: &str = "external-node";
/// Node meta naming the controller's cluster.
const CLUSTER_META: &str = "grpc-registrar-cluster";

impl ConsulRegistry {
    fn node_op(&self, verb: &'static str) -> TxnOp {
        let mut meta = BTreeMap::from([(EXTERNAL_NODE_META.to_owned(), "true".to_owned())]);
        meta.insert(
            CLUSTER_META.to_owned(),
            self.inner.config.cluster.clone().unwrap_or_default(),
        );
        TxnOp::Node(NodeOp {
            verb,
            node: NodeDef {
                node: self.inner.node.clone(),
                // No agent runs here; instances always carry their own address.
                address: "127.0.0.1".to_owned(),
                meta,
            },
        })
    }

    fn alive_op(&self) -> TxnOp {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ttl = self.inner.config.default_ttl.as_secs();
        TxnOp::Check(CheckOp {
            verb: "set",
            check: CheckDef {
                node: self.inner.node.clone(),
                check_id: ALIVE_CHECK.to_owned(),
                name: "grpc-registrar controller alive".to_owned(),
                status: "passing",
                notes: format!(
                    "renewed by grpc-registrar every {}s (ttl {ttl}s); Consul does not run this check",
                    (ttl / 3).max(1)
                ),
                output: format!("renewed at unix time {now}"),
            },
        })
    }

    /// The node's incarnation (its `CreateIndex` when this process last saw it written), the
    /// "lease id" of the Consul backend; 0 before the first sync.
    #[must_use]
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation.load(Ordering::Relaxed)
    }

    /// Registers the synthetic node and its passing check. When this process had seen the
    /// node before, it was lost with its instances: [`Event::Replaced`] is announced and
    /// claims forgotten, so the controller re-syncs (and re-claims) every service.
    ///
    /// `seen` is the incarnation the caller knew when it found the node missing: when another
    /// writer registered the node since (several syncs find it missing at once), nothing is
    /// registered or announced again.
    pub(super) async fn register_node(&self, seen: u64) -> Result<u64> {
        let _one = self.inner.node_lock.lock().await;
        let now = self.incarnation();
        if now != seen {
            return Ok(now);
        }
        let ops = vec![self.node_op("set"), self.alive_op()];
        let results = match self.guarded("register consul node", vec![], ops).await? {
            Guarded::Committed(results) => results,
            Guarded::GuardFailed | Guarded::OpFailed(_) => {
                return Err(Error::Consul {
                    op: "register consul node",
                    addr: self.inner.api.addr().to_owned(),
                    status: Some(409),
                    cause: "consul refused the node registration".to_owned(),
                });
            }
        };
        let new = results
            .iter()
            .find_map(|r| r.node)
            .map_or(0, |n| n.create_index);
        let old = self.inner.incarnation.swap(new, Ordering::Relaxed);
        if old != 0 {
            self.inner.fence.claims().clear();
            warn!(
                node = %self.inner.node,
                node_index = new,
                old_node_index = old,
                "the consul node was lost with its instances; registered it again, every service is re-synced"
            );
            let _ = self.inner.events.send(Event::Replaced {
                ttl: self.inner.config.default_ttl,
                old: super::version(old),
                new: super::version(new),
            });
        } else {
            info!(node = %self.inner.node, node_index = new, "registered consul node");
        }
        Ok(new)
    }

    /// Notes the node as found by a listing (its incarnation), the first time.
    pub(super) fn saw_node(&self, create_index: u64) {
        let _ = self.inner.incarnation.compare_exchange(
            0,
            create_index,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Starts the keeper, once.
    pub(super) fn start_keeper(&self) {
        let mut keeper = self.inner.keeper.lock().expect("lock");
        if keeper.is_some() {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        let ttl = self.inner.config.default_ttl;
        *keeper = Some(tokio::spawn(keep(weak, ttl).instrument(
            info_span!(parent: None, "consul_keeper", node = %self.inner.node),
        )));
    }

    /// One renewal: reads the node and sets the check passing, in one fenced txn. A follower
    /// only asks whether Consul answers. Returns whether the node was there.
    async fn renew(&self) -> Result<bool> {
        if self.fence_op().is_err() {
            self.check().await?;
            return Ok(true);
        }
        let ops = vec![self.node_op("get"), self.alive_op()];
        match self.guarded("renew consul check", vec![], ops).await? {
            Guarded::Committed(_) => Ok(true),
            Guarded::OpFailed(e) if e.what.contains("doesn't exist") => Ok(false),
            Guarded::GuardFailed | Guarded::OpFailed(_) => Ok(true),
        }
    }
}

/// Renews the check every `ttl / 3` until the registry is dropped.
async fn keep(inner: Weak<Inner>, ttl: Duration) {
    let interval = (ttl / 3).max(Duration::from_millis(500));
    let retry = interval.min(Duration::from_millis(250));
    let mut outage: Option<(std::time::Instant, u32)> = None;
    loop {
        let Some(registry) = inner.upgrade().map(|inner| ConsulRegistry { inner }) else {
            return;
        };
        let seen = registry.incarnation();
        let renewed = match registry.renew().await {
            Ok(true) => Ok(()),
            Ok(false) => registry.register_node(seen).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let wait = match renewed {
            Ok(()) => {
                if let Some((since, attempts)) = outage.take() {
                    registry.inner.reachable.store(true, Ordering::Relaxed);
                    info!(
                        outage_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        attempts, "consul reachable again"
                    );
                    let _ = registry.inner.events.send(Event::Restored {
                        ttl,
                        lease: super::version(registry.incarnation()),
                    });
                }
                interval
            }
            Err(Error::Fenced { .. }) => interval,
            Err(e) if !e.reached_backend() => {
                match &mut outage {
                    None => {
                        warn!(error = %e, retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                            "consul unreachable: cannot renew the node's check; retrying (instances stay registered)");
                        outage = Some((std::time::Instant::now(), 1));
                        registry.inner.reachable.store(false, Ordering::Relaxed);
                        let _ = registry.inner.events.send(Event::Unreachable {
                            ttl,
                            lease: super::version(registry.incarnation()),
                        });
                    }
                    Some((_, attempts)) => {
                        *attempts += 1;
                        debug!(error = %e, attempts = *attempts, "consul check renewal still failing");
                    }
                }
                retry
            }
            Err(e) => {
                warn!(error = %e, "failed to renew the consul node's check");
                retry.max(Duration::from_secs(1))
            }
        };
        let wake = registry.inner.wake.clone();
        drop(registry);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}
