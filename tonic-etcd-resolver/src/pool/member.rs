//! One endpoint's member task: connect until reachable, serve until the connection ends, repeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Health, Meta, Pool, Ready, Shared, lock};
use crate::connector::WatchedConnector;

/// First connections in flight at once. Started all together, 5,000 connections delay the
/// first answer (and the first RPC) by the time it takes to start them all (~200 ms); a bound
/// lets the first endpoints come up at once. Later connections (after a failure) are not
/// bounded, so endpoints that time out cannot hold up the others' recovery.
pub(super) const FIRST_PROBES: usize = 128;

/// Aborts a task when dropped, so a member's helpers end with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps one endpoint's connection: connect until reachable, serve until it ends, repeat.
pub(super) async fn member(
    pool: Weak<Pool>,
    addr: String,
    probed: Arc<AtomicBool>,
    meta: Arc<Mutex<Meta>>,
    removed: Arc<AtomicBool>,
) {
    let Some(strong) = pool.upgrade() else { return };
    let options = strong.options.clone();
    drop(strong);
    let endpoint = match options.endpoint(&addr) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            warn!(addr, error = %e, "skipping endpoint");
            if let Some(pool) = pool.upgrade()
                && pool.probed(&probed)
            {
                pool.resubset();
            }
            return;
        }
    };
    let shared = Arc::new(Shared::new());
    let name: Arc<str> = addr.as_str().into();
    loop {
        let mut delays = options.backoff();
        let (channel, health) = loop {
            // A first connection waits for a permit: with thousands of endpoints registered at
            // once, a few connect (and the first RPC goes) before all are started.
            // The pool is not held while waiting, so dropping it ends this task.
            let first_probes = match pool.upgrade() {
                Some(pool) => (!probed.load(Ordering::Acquire)).then(|| pool.first_probes.clone()),
                None => return,
            };
            let permit = match first_probes {
                Some(semaphore) => semaphore.acquire_owned().await.ok(),
                None => None,
            };
            // The connection is the probe: an endpoint is up only while this channel's own
            // connection is open, so its end is seen whether or not an RPC was sent (a server
            // shutting down still accepts until its listener closes). Each attempt has its own
            // health, so a connection of an earlier attempt cannot mark a later one down.
            let health = Arc::new(Health::default());
            let connector = WatchedConnector {
                health: Arc::downgrade(&health),
                nodelay: options.tcp_nodelay,
            };
            let connected = tokio::time::timeout(
                options.connect_timeout,
                endpoint.connect_with_connector(connector),
            )
            .await;
            drop(permit);
            if let Ok(Ok(channel)) = connected {
                break (channel, health);
            }
            if let Some(pool) = pool.upgrade()
                && pool.probed(&probed)
            {
                // Never reachable so far: with subsetting, the next-ranked endpoint stands in.
                pool.resubset();
            }
            let delay = delays.next().unwrap_or(options.retry_max);
            debug!(addr, ?delay, "endpoint unreachable; connecting again");
            tokio::time::sleep(delay).await;
        };
        // Health is checked on this connection, and the checker ends with it. A new connection
        // starts out serving, as the first one did: a NOT_SERVING of the last one (a server
        // draining before it stopped) says nothing of the process answering now.
        // (The endpoint is not in the ready set now; putting it back below invalidates picks.)
        shared.serving.store(true, Ordering::Release);
        let _checker = options.health_check.clone().map(|config| {
            let pool = pool.clone();
            AbortOnDrop(tokio::spawn(crate::policy::health::run(
                config,
                name.clone(),
                channel.clone(),
                shared.serving.clone(),
                move || {
                    if let Some(pool) = pool.upgrade() {
                        pool.invalidate();
                        pool.changed.notify_waiters();
                        pool.resubset();
                    }
                },
            )))
        });
        let Some(strong) = pool.upgrade() else { return };
        strong.update_ready(|set| {
            if removed.load(Ordering::Acquire) {
                return;
            }
            Pool::insert_ready(
                set,
                Ready {
                    addr: name.clone(),
                    channel: channel.clone(),
                    health: health.clone(),
                    shared: shared.clone(),
                    meta: lock(&meta).clone(),
                },
            );
        });
        strong.probed(&probed);
        // Back up: a stand-in, if any, gives its place back.
        strong.resubset();
        drop(strong);
        debug!(addr, "endpoint up");
        while !health.down.load(Ordering::Acquire) {
            health.wake.notified().await;
        }
        let Some(strong) = pool.upgrade() else { return };
        strong.update_ready(|set| {
            if !removed.load(Ordering::Acquire)
                && let Ok(i) = set.binary_search_by(|r| r.addr.cmp(&name))
            {
                set.remove(i);
            }
        });
        strong.resubset();
        drop(strong);
        warn!(
            addr,
            "endpoint connection ended; not picked until it connects again"
        );
    }
}
