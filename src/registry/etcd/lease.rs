//! Shared etcd leases: one per distinct TTL, each kept alive by its own task.
//!
//! etcd-client's keep-alive is a bare stream with no timer and no reconnect, so the keeper here
//! drives `keep_alive()` at TTL/3 itself, rebuilds the keeper and stream after any stream error,
//! and, when the lease is gone (TTL 0 or "lease not found"), grants a new one and announces it
//! so that every key on the old lease is put again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::Backoff;
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
}

/// A hook run on lease replacement.
pub(crate) type OnReplaced = Arc<dyn Fn() + Send + Sync>;

impl LeasePool {
    pub(crate) fn new(
        client: Client,
        op_timeout: Duration,
        metrics: Arc<Metrics>,
        on_replaced: OnReplaced,
    ) -> Self {
        Self {
            client,
            slots: Mutex::default(),
            events: broadcast::channel(64).0,
            op_timeout,
            metrics,
            on_replaced,
        }
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
        let id = grant(&self.client, secs, self.op_timeout).await?;
        self.metrics.lease_grants.inc();
        info!(lease_id = %hex(id), ttl = secs, "granted shared lease");
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
        Ok(id)
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

async fn grant(client: &Client, ttl_secs: u64, op_timeout: Duration) -> Result<i64> {
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    let mut lease = client.lease_client();
    let resp = timeout("grant lease", op_timeout, lease.grant(ttl, None)).await?;
    Ok(resp.id())
}

/// A lease id as etcdctl and status print it.
pub(crate) fn hex(id: i64) -> String {
    format!("{id:x}")
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

struct Keeper {
    client: Client,
    ttl: Duration,
    id: watch::Sender<i64>,
    suspect: Arc<Notify>,
    events: broadcast::Sender<LeaseEvent>,
    op_timeout: Duration,
    metrics: Arc<Metrics>,
    on_replaced: OnReplaced,
}

enum StreamEnd {
    /// The stream broke; rebuild it for the same lease.
    Broken,
    /// etcd says the lease is gone.
    Lost,
}

impl Keeper {
    async fn run(self) {
        let interval = (self.ttl / 3).max(Duration::from_millis(500));
        let mut last_ok = Instant::now();
        let mut unreachable = false;
        loop {
            let id = *self.id.borrow();
            let opened = timeout(
                "open lease keep-alive stream",
                self.op_timeout,
                self.client.lease_client().keep_alive(id),
            )
            .await;
            let end = match opened {
                Ok((keeper, stream)) => {
                    last_ok = Instant::now();
                    if std::mem::take(&mut unreachable) {
                        info!(lease_id = %hex(id), "etcd reachable again; lease kept");
                        let _ = self.events.send(LeaseEvent::Restored {
                            ttl: self.ttl,
                            lease: id,
                        });
                    }
                    self.metrics.lease_keepalives.inc();
                    self.drive(keeper, stream, interval, &mut last_ok).await
                }
                Err(Error::Etcd { source, .. }) if is_lease_not_found(&source) => StreamEnd::Lost,
                Err(e) => {
                    self.metrics.lease_keepalive_failures.inc();
                    warn!(lease_id = %hex(id), error = %e, "lease keep-alive failed; retrying");
                    StreamEnd::Broken
                }
            };
            match end {
                StreamEnd::Lost => {
                    unreachable = false;
                    self.replace(id).await;
                }
                StreamEnd::Broken => {
                    if !std::mem::replace(&mut unreachable, true) {
                        let _ = self.events.send(LeaseEvent::Unreachable {
                            ttl: self.ttl,
                            lease: id,
                        });
                    }
                    if last_ok.elapsed() > self.ttl {
                        debug!(
                            lease_id = %hex(id),
                            "no renewal for longer than the ttl; the lease is probably gone"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(interval.min(Duration::from_millis(250))) => {}
                        () = self.suspect.notified() => {}
                    }
                }
            }
        }
    }

    /// Renews at `interval` until the stream breaks or the lease is gone.
    async fn drive(
        &self,
        mut keeper: etcd_client::LeaseKeeper,
        mut stream: etcd_client::LeaseKeepAliveStream,
        interval: Duration,
        last_ok: &mut Instant,
    ) -> StreamEnd {
        let id = keeper.id();
        loop {
            // Between renewals, watch the stream too: etcd going away ends it at once, so the
            // outage is announced (and its end noticed) without waiting for the next renewal.
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.suspect.notified() => {}
                message = stream.message() => match message {
                    Ok(Some(resp)) if resp.ttl() > 0 => {
                        *last_ok = Instant::now();
                        continue;
                    }
                    Ok(Some(_)) => return StreamEnd::Lost,
                    Err(e) if is_lease_not_found(&e) => return StreamEnd::Lost,
                    Ok(None) | Err(_) => {
                        self.metrics.lease_keepalive_failures.inc();
                        warn!(lease_id = %hex(id), "lease keep-alive stream ended; rebuilding it");
                        return StreamEnd::Broken;
                    }
                },
            }
            if let Err(e) = keeper.keep_alive().await {
                self.metrics.lease_keepalive_failures.inc();
                warn!(lease_id = %hex(id), error = %e, "failed to send lease keep-alive");
                return StreamEnd::Broken;
            }
            match tokio::time::timeout(interval, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    *last_ok = Instant::now();
                    self.metrics.lease_keepalives.inc();
                }
                Ok(Ok(Some(_))) => return StreamEnd::Lost,
                Ok(Err(e)) if is_lease_not_found(&e) => return StreamEnd::Lost,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    self.metrics.lease_keepalive_failures.inc();
                    warn!(
                        lease_id = %hex(id),
                        "lease keep-alive stream broke; rebuilding it"
                    );
                    return StreamEnd::Broken;
                }
            }
        }
    }

    /// Grants a replacement for a lost lease, retrying with backoff, and announces it.
    async fn replace(&self, old: i64) {
        self.metrics.lease_losses.inc();
        warn!(
            lease_id = %hex(old),
            "lease lost; granting a new one and re-putting its keys"
        );
        let mut delays = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let new = loop {
            match grant(&self.client, self.ttl.as_secs(), self.op_timeout).await {
                Ok(id) => break id,
                Err(e) => {
                    let delay = delays.next().unwrap_or_default();
                    warn!(error = %e, ?delay, "failed to grant replacement lease; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        self.metrics.lease_grants.inc();
        info!(
            lease_id = %hex(new),
            old_lease_id = %hex(old),
            "granted replacement lease"
        );
        self.id.send_replace(new);
        (self.on_replaced)();
        // Nobody listening is fine: then nothing was put on the old lease either.
        let _ = self.events.send(LeaseEvent::Replaced {
            ttl: self.ttl,
            old,
            new,
        });
    }
}
