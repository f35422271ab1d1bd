//! Backend connections with health, and the pick: an endpoint whose connection fails is not
//! picked again until it answers a reachability probe; among the rest, the policies choose.
//!
//! Each connection's socket is watched ([`crate::connector`]): end-of-stream or a read error
//! (the backend died) marks the endpoint down at once, before any RPC has to fail on it. A
//! transport error on an RPC does the same. A per-endpoint task then probes with backoff and
//! puts it back when it answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::connector::WatchedConnector;
use crate::policy::outlier::{OutlierState, max_ejected};
use crate::policy::p2c::{self, Load};
use crate::policy::weighted::Swrr;
use crate::{Balance, Options};

/// One endpoint's connection up/down flag.
#[derive(Default)]
pub(crate) struct Health {
    down: AtomicBool,
    wake: Notify,
}

impl Health {
    /// Marks the endpoint down and wakes its task; idempotent.
    pub(crate) fn mark_down(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }
}

/// What the registry says about an endpoint, beyond its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// `metadata.zone`.
    pub(crate) zone: Option<Arc<str>>,
    /// `metadata.weight`, or the default.
    pub(crate) weight: u32,
}

/// Per-endpoint state shared by the pick, the calls in flight and the health checker.
#[derive(Default)]
pub(crate) struct Shared {
    /// RPCs sent and not yet finished (response body ended or dropped).
    pub(crate) in_flight: AtomicUsize,
    /// False while an active health check says `NOT_SERVING`.
    pub(crate) serving: Arc<AtomicBool>,
    /// End of the current ejection, in nanoseconds from the pool's start; 0 when none.
    ejected_until: AtomicU64,
    /// Failure record for outlier detection.
    outlier: Mutex<OutlierState>,
}

impl Shared {
    fn new() -> Self {
        Self {
            serving: Arc::new(AtomicBool::new(true)),
            ..Self::default()
        }
    }

    fn ejected(&self, now: Duration) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && u128::from(until) > now.as_nanos()
    }
}

/// An endpoint that may be picked.
#[derive(Clone)]
pub(crate) struct Ready {
    pub(crate) addr: Arc<str>,
    pub(crate) channel: Channel,
    pub(crate) health: Arc<Health>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) meta: Meta,
}

struct Member {
    task: JoinHandle<()>,
    /// Set, under the ready set's lock, when the registry drops it: its task, which may still
    /// be running when aborted, then never touches the ready set again (a re-added address
    /// gets a new member).
    removed: Arc<AtomicBool>,
    /// Set once the first reachability probe has finished, either way.
    probed: Arc<AtomicBool>,
    /// The registry's latest word on it; the task reads it when the endpoint comes up.
    meta: Arc<Mutex<Meta>>,
}

/// Aborts a task when dropped, so a member's helpers end with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every backend the registry lists, and the subset that may be picked.
pub(crate) struct Pool {
    /// The resolved target, for messages.
    target: Arc<str>,
    options: Options,
    members: Mutex<HashMap<String, Member>>,
    ready: RwLock<Arc<Vec<Ready>>>,
    /// Signalled whenever the ready set changes, a first probe finishes or a health status
    /// changes.
    pub(crate) changed: Notify,
    next: AtomicUsize,
    /// Members whose first probe has not finished: an RPC waits for them rather than failing.
    unprobed: AtomicUsize,
    /// Registered endpoints in the client's zone, for the spill-over threshold.
    registered_local: AtomicUsize,
    /// Smooth weighted round-robin state.
    swrr: Mutex<Swrr<Arc<str>>>,
    /// Serializes ejections, so the cap holds.
    ejecting: Mutex<()>,
    /// The clock's origin for ejection times.
    epoch: Instant,
    /// Round-robin with nothing to filter: the pick takes the fast path.
    simple: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    pub(crate) fn new(target: &str, options: Options) -> Arc<Self> {
        let simple = options.balance == Balance::RoundRobin
            && options.zone.is_none()
            && options.outlier.is_none()
            && options.health_check.is_none();
        Arc::new(Self {
            target: target.into(),
            options,
            members: Mutex::default(),
            ready: RwLock::default(),
            changed: Notify::new(),
            next: AtomicUsize::new(0),
            unprobed: AtomicUsize::new(0),
            registered_local: AtomicUsize::new(0),
            swrr: Mutex::default(),
            ejecting: Mutex::new(()),
            epoch: Instant::now(),
            simple,
        })
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Whether calls must be tracked: in flight for least-loaded, outcomes for ejection.
    pub(crate) fn tracks_calls(&self) -> bool {
        self.options.balance == Balance::LeastLoaded || self.options.outlier.is_some()
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn ready_set(&self) -> Arc<Vec<Ready>> {
        self.ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the member set equal `endpoints` (address to metadata): new addresses start
    /// connecting, gone ones are dropped from the ready set at once, changed metadata applies
    /// without reconnecting.
    pub(crate) fn set(self: &Arc<Self>, endpoints: &BTreeMap<String, Meta>) {
        let mut members = lock(&self.members);
        let gone: Vec<String> = members
            .keys()
            .filter(|a| !endpoints.contains_key(*a))
            .cloned()
            .collect();
        for addr in &gone {
            info!(addr, "endpoint removed");
        }
        if !gone.is_empty() {
            let gone: Vec<Member> = gone.iter().filter_map(|a| members.remove(a)).collect();
            self.update_ready(|ready| {
                for member in &gone {
                    member.removed.store(true, Ordering::Release);
                }
                ready.retain(|r| endpoints.contains_key(&*r.addr));
            });
            for member in gone {
                member.task.abort();
                self.probed(&member.probed);
            }
            lock(&self.swrr).retain(|k| endpoints.contains_key(&**k));
        }
        for (addr, meta) in endpoints {
            if let Some(member) = members.get(addr) {
                if *lock(&member.meta) != *meta {
                    debug!(addr, weight = meta.weight, zone = ?meta.zone, "endpoint metadata changed");
                    // Under the ready set's lock, as the member task reads it, so neither
                    // side sees a stale copy.
                    self.update_ready(|ready| {
                        lock(&member.meta).clone_from(meta);
                        for r in ready.iter_mut().filter(|r| *r.addr == **addr) {
                            r.meta.clone_from(meta);
                        }
                    });
                }
                continue;
            }
            info!(addr, weight = meta.weight, zone = ?meta.zone, "endpoint added");
            let probed = Arc::new(AtomicBool::new(false));
            let shared_meta = Arc::new(Mutex::new(meta.clone()));
            let removed = Arc::new(AtomicBool::new(false));
            self.unprobed.fetch_add(1, Ordering::AcqRel);
            let task = tokio::spawn(member(
                Arc::downgrade(self),
                addr.clone(),
                probed.clone(),
                shared_meta.clone(),
                removed.clone(),
            ));
            members.insert(
                addr.clone(),
                Member {
                    task,
                    removed,
                    probed,
                    meta: shared_meta,
                },
            );
        }
        if let Some(zone) = &self.options.zone {
            let local = endpoints
                .values()
                .filter(|m| m.zone.as_deref() == Some(zone.zone.as_str()))
                .count();
            self.registered_local.store(local, Ordering::Relaxed);
        }
    }

    /// The endpoint for the next RPC: among those up, serving and not ejected, local ones
    /// first with a zone preference, then by the balance policy.
    pub(crate) fn pick(&self) -> Option<Ready> {
        let ready = self.ready_set();
        if ready.is_empty() {
            return None;
        }
        if self.simple {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
            return Some(ready[i].clone());
        }
        let mut candidates: Vec<&Ready> = ready
            .iter()
            .filter(|r| r.shared.serving.load(Ordering::Acquire))
            .collect();
        if self.options.outlier.is_some() {
            let now = self.now();
            let kept: Vec<&Ready> = candidates
                .iter()
                .copied()
                .filter(|r| !r.shared.ejected(now))
                .collect();
            // Never eject the last endpoints: if only ejected ones are left, use them.
            if !kept.is_empty() {
                candidates = kept;
            }
        }
        if let Some(zone) = &self.options.zone {
            candidates = zone.filter(
                candidates,
                |r| r.meta.zone.as_deref() == Some(zone.zone.as_str()),
                self.registered_local.load(Ordering::Relaxed),
            );
        }
        let i = match self.options.balance {
            Balance::RoundRobin => (!candidates.is_empty())
                .then(|| self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()),
            Balance::Weighted => {
                let keyed: Vec<(Arc<str>, u32)> = candidates
                    .iter()
                    .map(|r| (r.addr.clone(), r.meta.weight))
                    .collect();
                lock(&self.swrr).pick(&keyed)
            }
            Balance::LeastLoaded => p2c::choose(
                candidates.len(),
                |i| Load {
                    in_flight: candidates[i].shared.in_flight.load(Ordering::Relaxed),
                    weight: candidates[i].meta.weight,
                },
                |k| fastrand::usize(..k),
            ),
        }?;
        Some(candidates[i].clone())
    }

    /// Records one RPC outcome for outlier detection, ejecting the endpoint when it trips and
    /// the cap allows.
    pub(crate) fn record(&self, ready: &Ready, failed: bool) {
        let Some(config) = &self.options.outlier else {
            return;
        };
        let now = self.now();
        if !lock(&ready.shared.outlier).record(config, now, failed) {
            return;
        }
        let _serial = lock(&self.ejecting);
        if ready.shared.ejected(now) {
            // Another failing call got here first: one ejection, of its length.
            return;
        }
        let all = self.ready_set();
        let ejected = all.iter().filter(|r| r.shared.ejected(now)).count();
        let allowed = max_ejected(config.max_ejection_percent, all.len());
        if ejected >= allowed {
            debug!(
                addr = &*ready.addr,
                ejected, allowed, "outlier not ejected: the ejection cap is reached"
            );
            return;
        }
        let Some(length) = lock(&ready.shared.outlier).eject(config, now) else {
            return;
        };
        let until = u64::try_from((now + length).as_nanos()).unwrap_or(u64::MAX);
        ready.shared.ejected_until.store(until, Ordering::Release);
        warn!(
            addr = &*ready.addr,
            ejection = ?length,
            ejected = ejected + 1,
            "endpoint ejected as an outlier"
        );
    }

    /// Whether some endpoint is still on its first connection attempt.
    pub(crate) fn connecting(&self) -> bool {
        self.unprobed.load(Ordering::Acquire) > 0
    }

    /// Records a member's first probe as finished (once).
    fn probed(&self, flag: &AtomicBool) {
        if !flag.swap(true, Ordering::AcqRel) {
            self.unprobed.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_waiters();
        }
    }

    /// Addresses currently connected, for tests and observability.
    pub(crate) fn ready_addrs(&self) -> Vec<String> {
        self.ready_set()
            .iter()
            .map(|r| r.addr.to_string())
            .collect()
    }

    /// How many endpoints are connected.
    pub(crate) fn ready_count(&self) -> usize {
        self.ready_set().len()
    }

    /// Addresses an RPC may currently go to: connected, serving and not ejected.
    pub(crate) fn pickable_addrs(&self) -> Vec<String> {
        let now = self.now();
        self.ready_set()
            .iter()
            .filter(|r| r.shared.serving.load(Ordering::Acquire) && !r.shared.ejected(now))
            .map(|r| r.addr.to_string())
            .collect()
    }

    /// RPCs in flight per connected address (counted when calls are tracked).
    pub(crate) fn in_flight(&self) -> BTreeMap<String, usize> {
        self.ready_set()
            .iter()
            .map(|r| {
                (
                    r.addr.to_string(),
                    r.shared.in_flight.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Adds `addr` to the ready set as if its member had connected, with a lazy channel that
    /// opens no socket until used: for the pick benchmark ([`crate::internals`]).
    ///
    /// # Errors
    /// When the address does not make a URI.
    pub(crate) fn insert_unconnected(&self, addr: &str, meta: Meta) -> crate::Result<()> {
        let channel = self.options.endpoint(addr)?.connect_lazy();
        self.update_ready(|set| {
            set.push(Ready {
                addr: addr.into(),
                channel,
                health: Arc::default(),
                shared: Arc::new(Shared::new()),
                meta,
            });
        });
        Ok(())
    }

    /// Counts the ready set's local endpoints as the registered ones, as [`Pool::set`] does
    /// from the registry: for the pick benchmark.
    pub(crate) fn set_registered_local_for_bench(&self) {
        if let Some(zone) = &self.options.zone {
            let local = self
                .ready_set()
                .iter()
                .filter(|r| r.meta.zone.as_deref() == Some(zone.zone.as_str()))
                .count();
            self.registered_local.store(local, Ordering::Relaxed);
        }
    }

    fn update_ready(&self, f: impl FnOnce(&mut Vec<Ready>)) {
        {
            let mut guard = self.ready.write().unwrap_or_else(PoisonError::into_inner);
            let mut next = guard.as_ref().clone();
            f(&mut next);
            next.sort_by(|a, b| a.addr.cmp(&b.addr));
            *guard = Arc::new(next);
        }
        self.changed.notify_waiters();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for member in lock(&self.members).values() {
            member.task.abort();
        }
    }
}

/// Keeps one endpoint's connection: probe until reachable, serve until it fails, repeat.
async fn member(
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
            if let Some(pool) = pool.upgrade() {
                pool.probed(&probed);
            }
            return;
        }
    };
    let health = Arc::new(Health::default());
    let shared = Arc::new(Shared::new());
    let connector = WatchedConnector {
        health: Arc::downgrade(&health),
        nodelay: options.tcp_nodelay,
    };
    let channel = endpoint.connect_with_connector_lazy(connector);
    let name: Arc<str> = addr.as_str().into();
    let _checker = options.health_check.clone().map(|config| {
        let pool = pool.clone();
        AbortOnDrop(tokio::spawn(crate::policy::health::run(
            config,
            name.clone(),
            channel.clone(),
            shared.serving.clone(),
            move || {
                if let Some(pool) = pool.upgrade() {
                    pool.changed.notify_waiters();
                }
            },
        )))
    });
    loop {
        let mut delays = options.backoff();
        loop {
            let probe =
                tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr.as_str()))
                    .await;
            if matches!(probe, Ok(Ok(_))) {
                break;
            }
            if let Some(pool) = pool.upgrade() {
                pool.probed(&probed);
            }
            let delay = delays.next().unwrap_or(options.retry_max);
            debug!(addr, ?delay, "endpoint unreachable; probing again");
            tokio::time::sleep(delay).await;
        }
        health.down.store(false, Ordering::Release);
        let Some(strong) = pool.upgrade() else { return };
        strong.update_ready(|set| {
            if removed.load(Ordering::Acquire) {
                return;
            }
            set.retain(|r| r.addr != name);
            set.push(Ready {
                addr: name.clone(),
                channel: channel.clone(),
                health: health.clone(),
                shared: shared.clone(),
                meta: lock(&meta).clone(),
            });
        });
        strong.probed(&probed);
        drop(strong);
        debug!(addr, "endpoint up");
        while !health.down.load(Ordering::Acquire) {
            health.wake.notified().await;
        }
        let Some(strong) = pool.upgrade() else { return };
        strong.update_ready(|set| {
            if !removed.load(Ordering::Acquire) {
                set.retain(|r| r.addr != name);
            }
        });
        drop(strong);
        warn!(
            addr,
            "endpoint connection failed; not picked until it answers again"
        );
    }
}
