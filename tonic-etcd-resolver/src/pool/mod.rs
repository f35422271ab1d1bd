//! Backend connections with health, and the pick: an endpoint whose connection fails is not
//! picked again until it connects again; among the rest, the policies choose.
//!
//! Each endpoint is connected as soon as it is a member, called or not, and is up only while
//! that connection is open. Its socket is watched ([`crate::connector`]): end-of-stream or a
//! read error (the backend died) marks the endpoint down at once, before any RPC has to fail on
//! it. A transport error on an RPC does the same. A per-endpoint task then reconnects with
//! backoff and puts it back when it connects.
//!
//! With subsetting ([`crate::Options::subset`]) only the members of this client's subset are
//! connected: the highest-ranked registered endpoints until enough are usable.
//!
//! # Layout
//! - this module: the per-endpoint state, and the members (every registered endpoint, or the
//!   subset) kept equal to the registry with a task each;
//! - `member`: one endpoint's task (connect, serve, mark down, connect again);
//! - `pick`: the pick, its cached candidates, and outlier ejection;
//! - `ranked`: subsetting's rendezvous order of the registered endpoints.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::policy::default_client_id;
use crate::policy::outlier::OutlierState;
use crate::{Balance, Options};

mod member;
mod pick;
mod ranked;

use member::{FIRST_PROBES, member};
use pick::Cache;
use ranked::Ranked;

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
    /// Smooth weighted round-robin's current weight while the endpoint is not a cached
    /// candidate (the candidate cache holds it meanwhile).
    swrr: AtomicI64,
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
    /// Set once the first connection attempt has finished, either way.
    probed: Arc<AtomicBool>,
    /// The registry's latest word on it; the task reads it when the endpoint comes up.
    meta: Arc<Mutex<Meta>>,
}

/// Every backend the registry lists (or this client's subset of them), and which may be picked.
pub(crate) struct Pool {
    /// The resolved target, for messages.
    target: Arc<str>,
    options: Options,
    members: Mutex<HashMap<String, Member>>,
    /// With subsetting, the registered endpoints ranked; members are a prefix of them.
    ranked: Option<Mutex<Ranked>>,
    /// The endpoints up, sorted by address. Picks read it under the lock, without copying.
    ready: RwLock<Vec<Arc<Ready>>>,
    /// Signalled whenever the ready set changes, a first connection attempt finishes or a health status
    /// changes.
    pub(crate) changed: Notify,
    next: AtomicUsize,
    /// Members whose first connection attempt has not finished: an RPC waits for them rather than failing.
    unprobed: AtomicUsize,
    /// Bounds the first probes in flight at once ([`FIRST_PROBES`]).
    first_probes: Arc<Semaphore>,
    /// Endpoints in the client's zone among the members, for the spill-over threshold.
    registered_local: AtomicUsize,
    /// The candidates of the policies other than plain round-robin, and until when they hold.
    cache: RwLock<Cache>,
    /// Set when something the candidates depend on changed.
    stale: AtomicBool,
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
        let ranked = options.subset.map(|size| {
            let client_id = options.client_id.clone().unwrap_or_else(default_client_id);
            info!(registry_target = target, client_id, size, "subsetting");
            Mutex::new(Ranked::new(size, &client_id))
        });
        Arc::new(Self {
            target: target.into(),
            options,
            members: Mutex::default(),
            ranked,
            ready: RwLock::default(),
            changed: Notify::new(),
            next: AtomicUsize::new(0),
            unprobed: AtomicUsize::new(0),
            first_probes: Arc::new(Semaphore::new(FIRST_PROBES)),
            registered_local: AtomicUsize::new(0),
            cache: RwLock::default(),
            stale: AtomicBool::new(true),
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

    fn ready_set(&self) -> RwLockReadGuard<'_, Vec<Arc<Ready>>> {
        self.ready.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the registered set equal `endpoints` (address to metadata). Without subsetting
    /// every one is a member; with it, the members are this client's subset of them. New
    /// members start connecting, gone ones are dropped from the ready set at once, changed
    /// metadata applies without reconnecting.
    pub(crate) fn set(self: &Arc<Self>, endpoints: &BTreeMap<String, Meta>) {
        let mut members = lock(&self.members);
        let desired = match &self.ranked {
            None => Cow::Borrowed(endpoints),
            Some(ranked) => {
                let mut ranked = lock(ranked);
                ranked.set(endpoints);
                Cow::Owned(self.select(&ranked, &members))
            }
        };
        self.reconcile(&mut members, &desired);
    }

    /// Applies changes to single addresses (their metadata, or `None` when no longer
    /// registered), in time proportional to what changed: a few map operations each, and with
    /// subsetting one walk down the subset.
    pub(crate) fn apply(self: &Arc<Self>, changes: Vec<(String, Option<Meta>)>) {
        let mut members = lock(&self.members);
        if let Some(ranked) = &self.ranked {
            let mut ranked = lock(ranked);
            for (addr, meta) in changes {
                ranked.apply(addr, meta);
            }
            let desired = self.select(&ranked, &members);
            drop(ranked);
            self.reconcile(&mut members, &desired);
            return;
        }
        let mut gone = Vec::new();
        for (addr, meta) in changes {
            match meta {
                Some(meta) => self.upsert(&mut members, &addr, &meta),
                None => gone.push(addr),
            }
        }
        self.remove(&mut members, &gone);
    }

    /// With subsetting, recomputes the members after an endpoint went down, came up, changed
    /// its serving status, or was ejected or let back.
    pub(crate) fn resubset(self: &Arc<Self>) {
        let Some(ranked) = &self.ranked else { return };
        let mut members = lock(&self.members);
        let desired = self.select(&lock(ranked), &members);
        self.reconcile(&mut members, &desired);
    }

    /// The subset: registered endpoints in rank order until `size` of them are usable. A
    /// member is usable while its first connection attempt is pending, or when it is up, serving and not
    /// ejected; an endpoint not yet a member counts as usable (it is about to be tried). The
    /// unusable ones ranked above keep their place (and their probing), so each takes its
    /// place back when it recovers.
    fn select(&self, ranked: &Ranked, members: &HashMap<String, Member>) -> BTreeMap<String, Meta> {
        let ready = self.ready_set();
        let now = self.now();
        let usable = |addr: &str| match members.get(addr) {
            None => true,
            Some(m) if !m.probed.load(Ordering::Acquire) => true,
            Some(_) => ready
                .binary_search_by(|r| (*r.addr).cmp(addr))
                .is_ok_and(|i| pickable(&ready[i], now)),
        };
        let mut out = BTreeMap::new();
        let mut usable_count = 0;
        for (addr, meta) in ranked.ranked() {
            if usable_count == ranked.size() {
                break;
            }
            if usable(addr) {
                usable_count += 1;
            }
            out.insert(addr.clone(), meta.clone());
        }
        out
    }

    /// Makes the members equal `desired`.
    fn reconcile(
        self: &Arc<Self>,
        members: &mut HashMap<String, Member>,
        desired: &BTreeMap<String, Meta>,
    ) {
        let gone: Vec<String> = members
            .keys()
            .filter(|a| !desired.contains_key(*a))
            .cloned()
            .collect();
        self.remove(members, &gone);
        for (addr, meta) in desired {
            self.upsert(members, addr, meta);
        }
    }

    /// Whether `meta` puts an endpoint in the client's zone.
    fn is_local(&self, meta: &Meta) -> bool {
        self.options
            .zone
            .as_ref()
            .is_some_and(|z| meta.zone.as_deref() == Some(z.zone.as_str()))
    }

    /// Stops connecting to `gone`: out of the ready set at once, their tasks aborted.
    fn remove(&self, members: &mut HashMap<String, Member>, gone: &[String]) {
        let gone: Vec<(&String, Member)> = gone
            .iter()
            .filter_map(|a| members.remove(a).map(|m| (a, m)))
            .collect();
        if gone.is_empty() {
            return;
        }
        self.update_ready(|ready| {
            for (addr, member) in &gone {
                member.removed.store(true, Ordering::Release);
                if let Ok(i) = ready.binary_search_by(|r| (*r.addr).cmp(addr.as_str())) {
                    ready.remove(i);
                }
            }
        });
        for (addr, member) in gone {
            info!(addr, "endpoint removed");
            if self.is_local(&lock(&member.meta)) {
                self.registered_local.fetch_sub(1, Ordering::Relaxed);
                self.invalidate();
            }
            member.task.abort();
            self.probed(&member.probed);
        }
    }

    /// Starts connecting to `addr`, or applies its new metadata without reconnecting.
    fn upsert(self: &Arc<Self>, members: &mut HashMap<String, Member>, addr: &str, meta: &Meta) {
        if let Some(member) = members.get(addr) {
            let known = lock(&member.meta).clone();
            if known == *meta {
                return;
            }
            debug!(addr, weight = meta.weight, zone = ?meta.zone, "endpoint metadata changed");
            match (self.is_local(&known), self.is_local(meta)) {
                (false, true) => self.registered_local.fetch_add(1, Ordering::Relaxed),
                (true, false) => self.registered_local.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            self.invalidate();
            // Under the ready set's lock, as the member task reads it, so neither side sees a
            // stale copy.
            self.update_ready(|ready| {
                lock(&member.meta).clone_from(meta);
                if let Ok(i) = ready.binary_search_by(|r| (*r.addr).cmp(addr)) {
                    let mut updated = Ready::clone(&ready[i]);
                    updated.meta.clone_from(meta);
                    ready[i] = Arc::new(updated);
                }
            });
            return;
        }
        info!(addr, weight = meta.weight, zone = ?meta.zone, "endpoint added");
        if self.is_local(meta) {
            self.registered_local.fetch_add(1, Ordering::Relaxed);
            self.invalidate();
        }
        let probed = Arc::new(AtomicBool::new(false));
        let shared_meta = Arc::new(Mutex::new(meta.clone()));
        let removed = Arc::new(AtomicBool::new(false));
        self.unprobed.fetch_add(1, Ordering::AcqRel);
        let task = tokio::spawn(member(
            Arc::downgrade(self),
            addr.to_owned(),
            probed.clone(),
            shared_meta.clone(),
            removed.clone(),
        ));
        members.insert(
            addr.to_owned(),
            Member {
                task,
                removed,
                probed,
                meta: shared_meta,
            },
        );
    }

    /// Whether some endpoint is still on its first connection attempt.
    pub(crate) fn connecting(&self) -> bool {
        self.unprobed.load(Ordering::Acquire) > 0
    }

    /// Records a member's first connection attempt as finished; true the first time.
    fn probed(&self, flag: &AtomicBool) -> bool {
        let first = !flag.swap(true, Ordering::AcqRel);
        if first {
            self.unprobed.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_waiters();
        }
        first
    }

    /// Addresses currently connected, for tests and observability.
    pub(crate) fn ready_addrs(&self) -> Vec<String> {
        self.ready_set()
            .iter()
            .map(|r| r.addr.to_string())
            .collect()
    }

    /// How many endpoints this client holds (the registered ones, or its subset of them) and
    /// how many of those are connected.
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            registered: lock(&self.members).len(),
            connected: self.ready_count(),
        }
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
            .filter(|r| pickable(r, now))
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

    /// Changes the ready set (kept sorted by address) under its write lock, and tells waiters.
    fn update_ready(&self, f: impl FnOnce(&mut Vec<Arc<Ready>>)) {
        {
            let mut guard = self.ready.write().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard);
        }
        self.invalidate();
        self.changed.notify_waiters();
    }

    /// Puts `ready` in the ready set, in address order, replacing any entry for its address.
    fn insert_ready(set: &mut Vec<Arc<Ready>>, ready: Ready) {
        match set.binary_search_by(|r| r.addr.cmp(&ready.addr)) {
            Ok(i) => set[i] = Arc::new(ready),
            Err(i) => set.insert(i, Arc::new(ready)),
        }
    }

    /// Adds `addr` to the ready set as if its member had connected, with a lazy channel that
    /// opens no socket until used: for the pick benchmark ([`crate::internals`]).
    ///
    /// # Errors
    /// When the address does not make a URI.
    pub(crate) fn insert_unconnected(&self, addr: &str, meta: Meta) -> crate::Result<()> {
        let channel = self.options.endpoint(addr)?.connect_lazy();
        self.update_ready(|set| {
            Self::insert_ready(
                set,
                Ready {
                    addr: addr.into(),
                    channel,
                    health: Arc::default(),
                    shared: Arc::new(Shared::new()),
                    meta,
                },
            );
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
            self.invalidate();
        }
    }
}

/// The endpoint counts an `Unavailable` error reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Registered endpoints this client holds (with subsetting, its subset).
    pub(crate) registered: usize,
    /// Of those, the ones connected.
    pub(crate) connected: usize,
}

/// Whether an RPC may go to `r` now: serving and not ejected.
fn pickable(r: &Ready, now: Duration) -> bool {
    r.shared.serving.load(Ordering::Acquire) && !r.shared.ejected(now)
}

impl Drop for Pool {
    fn drop(&mut self) {
        for member in lock(&self.members).values() {
            member.task.abort();
        }
    }
}
