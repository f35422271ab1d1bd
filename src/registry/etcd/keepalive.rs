//! The keeper of one shared lease: renews it at TTL/3 over etcd-client's bare keep-alive stream,
//! rebuilds the stream after any error, reports an outage once when it starts and once when it
//! ends, and replaces a lease that is gone (announcing it, so every key on it is put again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::{Notify, broadcast, watch};
use tracing::{debug, info, warn};

use super::lease::{OnReplaced, grant, hex, is_lease_not_found};
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::registry::error::timeout;
use crate::registry::{Error, Event as LeaseEvent};

/// One lease's keep-alive task.
pub(super) struct Keeper {
    /// The etcd client.
    pub(super) client: Client,
    /// The lease's TTL.
    pub(super) ttl: Duration,
    /// The current lease id, replaced in place when the lease is lost.
    pub(super) id: watch::Sender<i64>,
    /// Wakes the keeper early, to check a lease a write reported missing.
    pub(super) suspect: Arc<Notify>,
    /// Outage, restore and replacement announcements.
    pub(super) events: broadcast::Sender<LeaseEvent>,
    /// Bound on opening a keep-alive stream and on granting.
    pub(super) op_timeout: Duration,
    /// Keep-alive, loss and grant counters.
    pub(super) metrics: Arc<Metrics>,
    /// Called when the lease was replaced (the claims are made again).
    pub(super) on_replaced: OnReplaced,
    /// Keepers currently in an outage, shared with the pool.
    pub(super) outages: Arc<std::sync::atomic::AtomicUsize>,
}

enum StreamEnd {
    /// The stream broke (why, in words); rebuild it for the same lease.
    Broken(String),
    /// etcd says the lease is gone.
    Lost,
}

impl Keeper {
    /// Keeps the lease alive. An outage is logged once when it starts (with the error, and what
    /// happens next) and once when it ends; the retries in between log at debug level only.
    pub(super) async fn run(self) {
        let interval = (self.ttl / 3).max(Duration::from_millis(500));
        let retry = interval.min(Duration::from_millis(250));
        let mut last_ok = Instant::now();
        // When the outage began, and how many attempts failed since.
        let mut outage: Option<(Instant, u32)> = None;
        loop {
            let id = *self.id.borrow();
            let end = match self.open(id, interval).await {
                Ok((keeper, stream)) => {
                    last_ok = Instant::now();
                    self.answered(id, &mut outage);
                    self.drive(keeper, stream, interval, &mut last_ok).await
                }
                Err(end) => end,
            };
            match end {
                StreamEnd::Lost => {
                    if outage.take().is_some() {
                        self.outages
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.replace(id).await;
                }
                StreamEnd::Broken(error) => {
                    self.unanswered(id, error, last_ok, retry, &mut outage);
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = self.suspect.notified() => {}
                    }
                }
            }
        }
    }

    /// Opens a keep-alive stream for the lease `id` and renews it once. Opening a stream proves
    /// little (it may succeed while etcd is still away): an outage ends with the first answered
    /// renewal.
    async fn open(
        &self,
        id: i64,
        interval: Duration,
    ) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), StreamEnd> {
        let opened = timeout(
            "open lease keep-alive stream",
            self.op_timeout,
            self.client.lease_client().keep_alive(id),
        )
        .await;
        match opened {
            Ok((mut keeper, mut stream)) => self
                .renew(&mut keeper, &mut stream, interval)
                .await
                .map(|()| (keeper, stream)),
            Err(Error::Etcd { cause, .. }) if is_lease_not_found(&cause) => Err(StreamEnd::Lost),
            Err(e) => {
                self.metrics.lease.keepalive_failures.inc();
                Err(StreamEnd::Broken(e.to_string()))
            }
        }
    }

    /// A renewal of `id` was answered: an outage ends, said once.
    fn answered(&self, id: i64, outage: &mut Option<(Instant, u32)>) {
        self.metrics.backend_result("etcd", "keepalive", true, true);
        if let Some((since, attempts)) = outage.take() {
            self.outages
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            info!(
                lease_id = %hex(id),
                outage_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                attempts,
                "etcd reachable again; lease kept"
            );
            let _ = self.events.send(LeaseEvent::Restored {
                ttl: self.ttl,
                lease: id,
            });
        }
        self.metrics.lease.keepalives.inc();
    }

    /// A renewal of `id` went unanswered (`error`): an outage starts, said once, or goes on.
    fn unanswered(
        &self,
        id: i64,
        error: String,
        last_ok: Instant,
        retry: Duration,
        outage: &mut Option<(Instant, u32)>,
    ) {
        self.metrics
            .backend_result("etcd", "keepalive", false, false);
        match outage {
            None => {
                let left = self.ttl.saturating_sub(last_ok.elapsed());
                warn!(
                    lease_id = %hex(id),
                    error,
                    retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                    lease_left_s = left.as_secs(),
                    "etcd unreachable: cannot renew the lease; retrying (registered keys stay until the lease expires, then are put again on a new lease)"
                );
                *outage = Some((Instant::now(), 1));
                self.outages
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = self.events.send(LeaseEvent::Unreachable {
                    ttl: self.ttl,
                    lease: id,
                });
            }
            Some((_, attempts)) => {
                *attempts += 1;
                debug!(lease_id = %hex(id), error, attempts = *attempts, "lease keep-alive still failing");
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
                    Ok(None) => {
                        self.metrics.lease.keepalive_failures.inc();
                        return StreamEnd::Broken("the keep-alive stream ended".to_owned());
                    }
                    Err(e) => {
                        self.metrics.lease.keepalive_failures.inc();
                        return StreamEnd::Broken(crate::registry::error::describe(&e));
                    }
                },
            }
            if let Err(end) = self.renew(&mut keeper, &mut stream, interval).await {
                return end;
            }
            *last_ok = Instant::now();
            self.metrics.lease.keepalives.inc();
        }
    }

    /// One renewal: sends a keep-alive and waits (up to `interval`) for etcd's answer.
    async fn renew(
        &self,
        keeper: &mut etcd_client::LeaseKeeper,
        stream: &mut etcd_client::LeaseKeepAliveStream,
        interval: Duration,
    ) -> Result<(), StreamEnd> {
        let broken = |reason: String| {
            self.metrics.lease.keepalive_failures.inc();
            StreamEnd::Broken(reason)
        };
        if let Err(e) = keeper.keep_alive().await {
            return Err(broken(crate::registry::error::describe(&e)));
        }
        match tokio::time::timeout(interval, stream.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
            Ok(Ok(Some(_))) => Err(StreamEnd::Lost),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StreamEnd::Lost),
            Ok(Ok(None)) => Err(broken("the keep-alive stream ended".to_owned())),
            Ok(Err(e)) => Err(broken(crate::registry::error::describe(&e))),
            Err(_) => Err(broken(format!(
                "no keep-alive answer within {} ms",
                interval.as_millis()
            ))),
        }
    }

    /// Grants a replacement for a lost lease, retrying with backoff, and announces it.
    async fn replace(&self, old: i64) {
        self.metrics.lease.losses.inc();
        warn!(
            lease_id = %hex(old),
            "lease lost; granting a new one and re-putting its keys"
        );
        let mut delays = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0_u32;
        let new = loop {
            match grant(&self.client, self.ttl.as_secs(), self.op_timeout).await {
                Ok(id) => break id,
                Err(e) => {
                    self.metrics
                        .backend_result("etcd", "grant", false, e.reached_backend());
                    let delay = delays.next().unwrap_or_default();
                    let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    failures += 1;
                    if failures == 1 {
                        warn!(error = %e, retry_ms, "failed to grant a replacement lease; retrying with backoff");
                    } else {
                        debug!(error = %e, retry_ms, failures, "failed to grant a replacement lease");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        };
        self.metrics.lease.grants.inc();
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
