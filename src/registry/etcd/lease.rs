//! Shared etcd leases: one per distinct TTL, each kept alive by its own task.
//!
//! The lease belongs to the registry, not to a process (DESIGN §3): its id is recorded at
//! `<records-root>/lease/<ttl>`, on the lease itself, so a new process or a new leader *adopts*
//! the live lease (and its keys stay where they are) instead of granting a new one. Only a lease
//! that is really gone (expired, revoked, lost with etcd's data) is replaced.
//!
//! etcd-client's keep-alive is a bare stream with no timer and no reconnect, so the keeper here
//! drives `keep_alive()` at TTL/3 itself, rebuilds the keeper and stream after any stream error,
//! and, when the lease is gone (TTL 0 or "lease not found"), grants a new one and announces it
//! so that every key on the old lease is put again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span};

use super::keepalive::Keeper;
use crate::metrics::Metrics;
use crate::registry::error::timeout;
use crate::registry::{Error, Event as LeaseEvent, Result};

struct Slot {
    /// The current lease id; replaced in place when the lease is lost.
    id: watch::Receiver<i64>,
    /// Wakes the keeper early, to check a lease a write reported missing.
    suspect: Arc<Notify>,
    /// The keep-alive task, aborted when the pool is dropped.
    task: JoinHandle<()>,
}

/// The pool of shared leases, keyed by TTL in seconds.
pub(crate) struct LeasePool {
    /// The etcd client, cloned into each keeper.
    client: Client,
    /// One slot per distinct TTL.
    slots: Mutex<HashMap<u64, Slot>>,
    /// Lease loss and reachability announcements, consumed by the controller.
    events: broadcast::Sender<LeaseEvent>,
    /// Bound on each etcd call.
    op_timeout: Duration,
    /// Keep-alive and grant counters.
    metrics: Arc<Metrics>,
    /// Run when a lease is replaced, before the event is announced (the registry forgets its
    /// claims then, since a lost lease often means lost records too).
    on_replaced: OnReplaced,
    /// Keepers currently in an outage (renewals unanswered).
    outages: Arc<std::sync::atomic::AtomicUsize>,
    /// Where the live lease of each TTL is recorded, `<records-root>/lease/` (the TTL follows).
    records: String,
}

/// A hook run on lease replacement.
pub(crate) type OnReplaced = Arc<dyn Fn() + Send + Sync>;

impl LeasePool {
    pub(crate) fn new(
        client: Client,
        op_timeout: Duration,
        metrics: Arc<Metrics>,
        on_replaced: OnReplaced,
        records: String,
    ) -> Self {
        Self {
            client,
            slots: Mutex::default(),
            events: broadcast::channel(64).0,
            op_timeout,
            metrics,
            on_replaced,
            outages: Arc::default(),
            records,
        }
    }

    /// The key recording the live lease for `ttl_secs`.
    pub(crate) fn record_key(&self, ttl_secs: u64) -> String {
        format!("{}{ttl_secs}", self.records)
    }

    /// The lease recorded for `ttl_secs`, when etcd still has it: a previous process's or
    /// leader's, to be kept alive instead of replaced. An unreadable record is `None`; a failed
    /// read is an error (a passing fault must not move every key to a new lease).
    async fn recorded(&self, ttl_secs: u64) -> Result<Option<i64>> {
        let mut kv = self.client.kv_client();
        let resp = timeout(
            "read lease record",
            self.op_timeout,
            kv.get(self.record_key(ttl_secs), None),
        )
        .await?;
        let Some(id) = resp
            .kvs()
            .first()
            .and_then(|kv| i64::from_str_radix(kv.value_str().ok()?, 16).ok())
        else {
            return Ok(None);
        };
        let mut lease = self.client.lease_client();
        match timeout("read lease", self.op_timeout, lease.time_to_live(id, None)).await {
            Ok(resp) if resp.ttl() > 0 => Ok(Some(id)),
            Ok(_) => Ok(None),
            Err(Error::Etcd { cause, .. }) if is_lease_not_found(&cause) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether every lease's renewals are being answered (false from the first unanswered
    /// renewal of an outage until the first answered one).
    pub(crate) fn renewing(&self) -> bool {
        self.outages.load(std::sync::atomic::Ordering::Relaxed) == 0
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LeaseEvent> {
        self.events.subscribe()
    }

    /// The live lease for `ttl`, granted on first use.
    pub(crate) async fn lease(&self, ttl: Duration) -> Result<i64> {
        let secs = ttl.as_secs().max(1);
        let mut slots = self.slots.lock().await;
        if let Some(slot) = slots.get(&secs) {
            return Ok(*slot.id.borrow());
        }
        let id = if let Some(id) = self.recorded(secs).await? {
            self.metrics.lease.adoptions.inc();
            info!(lease_id = %hex(id), ttl = secs, "adopted the live shared lease; its keys stay where they are");
            id
        } else {
            let id = grant(&self.client, secs, self.op_timeout).await?;
            self.metrics.lease.grants.inc();
            info!(lease_id = %hex(id), ttl = secs, "granted shared lease");
            id
        };
        self.keep(&mut slots, secs, id);
        Ok(id)
    }

    /// Adopts every live lease recorded for this scope and keeps it alive, without waiting for
    /// a write to need it: run at start and on becoming the leader, so that the keys of a
    /// process that died stay while this one's caches fill (a first reconcile may be seconds
    /// away, e.g. after a re-list). A lease recorded but gone is left to the first write.
    ///
    /// # Errors
    /// etcd failures.
    pub(crate) async fn adopt_recorded(&self) -> Result<usize> {
        let mut kv = self.client.kv_client();
        let resp = timeout(
            "read lease records",
            self.op_timeout,
            kv.get(
                self.records.as_str(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            ),
        )
        .await?;
        let ttls: Vec<u64> = resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&self.records)?.parse().ok())
            .collect();
        let mut adopted = 0;
        for secs in ttls {
            let mut slots = self.slots.lock().await;
            if slots.contains_key(&secs) {
                continue;
            }
            if let Some(id) = self.recorded(secs).await? {
                self.metrics.lease.adoptions.inc();
                info!(lease_id = %hex(id), ttl = secs, "adopted the live shared lease; its keys stay where they are");
                self.keep(&mut slots, secs, id);
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Starts the keeper of lease `id` for `secs` in its slot.
    fn keep(&self, slots: &mut HashMap<u64, Slot>, secs: u64, id: i64) {
        let (tx, rx) = watch::channel(id);
        let suspect = Arc::new(Notify::new());
        let keeper = Keeper {
            client: self.client.clone(),
            ttl: Duration::from_secs(secs),
            id: tx,
            suspect: suspect.clone(),
            events: self.events.clone(),
            op_timeout: self.op_timeout,
            metrics: self.metrics.clone(),
            on_replaced: self.on_replaced.clone(),
            outages: self.outages.clone(),
        };
        let task = tokio::spawn(
            keeper
                .run()
                .instrument(info_span!(parent: None, "lease_keeper", ttl = secs)),
        );
        slots.insert(
            secs,
            Slot {
                id: rx,
                suspect,
                task,
            },
        );
    }

    /// Reports that a write found `id` missing, so the keeper checks it at once.
    pub(crate) async fn suspect(&self, ttl: Duration) {
        if let Some(slot) = self.slots.lock().await.get(&ttl.as_secs().max(1)) {
            slot.suspect.notify_one();
        }
    }

    /// Every live lease id, for status and tests.
    pub(crate) async fn ids(&self) -> Vec<i64> {
        self.slots
            .lock()
            .await
            .values()
            .map(|s| *s.id.borrow())
            .collect()
    }
}

impl Drop for LeasePool {
    fn drop(&mut self) {
        // Graceful shutdown deliberately does not revoke: keys stay until the TTL runs out, so a
        // rolling upgrade causes no client-visible deletes.
        if let Ok(slots) = self.slots.try_lock() {
            for slot in slots.values() {
                slot.task.abort();
            }
        }
    }
}

pub(super) async fn grant(client: &Client, ttl_secs: u64, op_timeout: Duration) -> Result<i64> {
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    let mut lease = client.lease_client();
    let resp = timeout("grant lease", op_timeout, lease.grant(ttl, None)).await?;
    Ok(resp.id())
}

/// A lease id as etcdctl and status print it.
pub(crate) fn hex(id: i64) -> String {
    crate::registry::lease_text(id)
}

/// Whether an etcd error says the lease no longer exists.
pub(crate) fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        _ => false,
    }
}
