//! The registry side: a prefix Get, then a Watch from the next revision, re-listing after any
//! compaction or broken stream, and never emptying the endpoint set because etcd is unreachable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use futures::Stream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tower::discover::Change;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::format::{Endpoint, watch_prefix};
use crate::policy::weighted::WeightWarnings;
use crate::policy::{Balance, DEFAULT_WEIGHT, InvalidWeight, parse_weight};
use crate::pool::{Meta, Pool};
use crate::published::Published;
use crate::{Error, LbChannel, Options, Result};

/// The current registry content: key to endpoint.
pub type Snapshot = Arc<BTreeMap<String, Endpoint>>;

/// Stops the background task when the last handle goes.
pub(crate) struct Guard(JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counters a user may want to export.
#[derive(Debug, Default)]
pub struct Stats {
    malformed: AtomicU64,
    relists: AtomicU64,
}

impl Stats {
    /// Registry values skipped because they did not parse.
    #[must_use]
    pub fn malformed_values(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Full re-lists after a compaction, a cancelled watch or a broken stream.
    #[must_use]
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }
}

/// Resolves one target from etcd and load-balances over it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tonic_etcd_resolver::{Options, Resolver};
///
/// let resolver = Resolver::connect(["http://127.0.0.1:2379"], "services/default/greeter", Options::default()).await?;
/// let channel = resolver.channel(); // pass to any generated client
/// let endpoints = resolver.endpoints(); // watch::Receiver of the current snapshot
/// # drop((channel, endpoints));
/// # Ok(()) }
/// ```
pub struct Resolver {
    target: String,
    pool: Arc<Pool>,
    /// The registry content and the snapshot behind [`Resolver::endpoints`].
    published: Arc<Published>,
    stats: Arc<Stats>,
    guard: Arc<Guard>,
}

impl Resolver {
    /// Connects to etcd and resolves `target`.
    ///
    /// `target` is a key prefix (`services/default/greeter`: keys `services/default/greeter/*`)
    /// or grpc-go's `etcd:///services/default/greeter` form of it.
    ///
    /// The etcd client is created with `require_leader` and HTTP/2 keep-alive, so a watch on a
    /// partitioned member fails instead of hanging.
    ///
    /// # Errors
    /// [`Error::InvalidTarget`] for a target that names no key prefix (empty, another scheme,
    /// an `etcd://` authority); [`Error::Etcd`] or [`Error::Timeout`] when etcd cannot be
    /// reached for the first listing. Each names the target.
    pub async fn connect<E: AsRef<str>, S: AsRef<[E]>>(
        etcd_endpoints: S,
        target: impl Into<String>,
        options: Options,
    ) -> Result<Self> {
        let target = target.into();
        crate::target::key_prefix(&target)?;
        let connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(etcd_endpoints, Some(connect))
            .await
            .map_err(|source| Error::Etcd {
                op: "connect to etcd",
                target: target.clone(),
                source,
            })?;
        Self::new(client, target, options).await
    }

    /// Resolves `target` with an existing client. Give the client `with_require_leader(true)`.
    ///
    /// Returns after the first listing, so [`Resolver::endpoints`] is populated at once.
    ///
    /// # Errors
    /// [`Error::InvalidTarget`] as in [`Resolver::connect`], or when the first listing fails.
    pub async fn new(client: Client, target: impl Into<String>, options: Options) -> Result<Self> {
        let target = target.into();
        let prefix = crate::target::key_prefix(&target)?;
        let stats = Arc::new(Stats::default());
        let pool = Pool::new(&target, options.clone());
        let published = Arc::new(Published::new());
        let mut state = Registry {
            client,
            target: target.clone(),
            prefix: watch_prefix(&prefix),
            entries: published.clone(),
            keys_by_addr: HashMap::new(),
            stats: stats.clone(),
            timeout: options.connect_timeout.max(Duration::from_secs(1)),
            options: options.clone(),
        };
        let revision = state.list().await?;
        let warnings = Arc::new(WeightWarnings::default());
        pool.set(&state.entries.with(|e| members(e, &options, &warnings)));
        published.publish();
        info!(
            registry_target = target,
            endpoints = state.entries.len(),
            revision,
            "resolved"
        );
        let task = tokio::spawn(
            run(state, revision, pool.clone(), options, warnings)
                .instrument(info_span!("resolver", registry_target = %target)),
        );
        Ok(Self {
            target,
            pool,
            published,
            stats,
            guard: Arc::new(Guard(task)),
        })
    }

    /// The resolved target.
    #[must_use]
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A load-balanced channel over the endpoints that are up. See [`LbChannel`].
    #[must_use]
    pub fn channel(&self) -> LbChannel {
        LbChannel {
            pool: self.pool.clone(),
            _guard: self.guard.clone(),
        }
    }

    /// A plain tonic [`Channel`] from `Channel::balance_channel`, fed by [`Resolver::discover`].
    ///
    /// Prefer [`Resolver::channel`]: tonic's balancer keeps routing to a registered backend whose
    /// connection has failed (tonic#2839). This exists for APIs that insist on a `Channel`.
    #[must_use]
    pub fn balance_channel(&self) -> Channel {
        let (channel, tx) = Channel::balance_channel::<String>(64);
        let changes = self.discover();
        let guard = self.guard.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let _guard = guard;
            let mut changes = std::pin::pin!(changes);
            while let Some(Ok(change)) = changes.next().await {
                let change = match change {
                    Change::Insert(k, v) => tonic::transport::channel::Change::Insert(k, v),
                    Change::Remove(k) => tonic::transport::channel::Change::Remove(k),
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        });
        channel
    }

    /// The current endpoints, updated as the registry changes.
    #[must_use]
    pub fn endpoints(&self) -> watch::Receiver<Snapshot> {
        self.published.subscribe()
    }

    /// Addresses registered and reachable (connected): with [`Options::subset`], this client's
    /// subset (and any stand-ins for members that are down).
    #[must_use]
    pub fn ready_endpoints(&self) -> Vec<String> {
        self.pool.ready_addrs()
    }

    /// How many endpoints are connected (the length of [`Resolver::ready_endpoints`]).
    pub(crate) fn ready_count(&self) -> usize {
        self.pool.ready_count()
    }

    /// Addresses an RPC may go to now: connected, not reporting `NOT_SERVING` to a
    /// [`crate::HealthCheck`] and not ejected by [`crate::OutlierDetection`] (before any
    /// zone preference narrows them).
    #[must_use]
    pub fn pickable_endpoints(&self) -> Vec<String> {
        self.pool.pickable_addrs()
    }

    /// RPCs in flight per connected address, as [`Balance::LeastLoaded`] sees them.
    ///
    /// Counted only when a policy needs it ([`Balance::LeastLoaded`] or
    /// [`crate::OutlierDetection`]); zero otherwise. An RPC counts until its response body
    /// ends or is dropped.
    #[must_use]
    pub fn in_flight(&self) -> BTreeMap<String, usize> {
        self.pool.in_flight()
    }

    /// Skipped values and re-lists.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Discovery changes keyed by address, for a tower balancer of your own: inserts for the
    /// current set first, then each change. It implements `tower::discover::Discover`.
    pub fn discover(
        &self,
    ) -> impl Stream<Item = Result<Change<String, TonicEndpoint>, Infallible>> + Send + use<> {
        let options = self.pool.options().clone();
        let rx = self.endpoints();
        let state = (
            rx,
            BTreeSet::<String>::new(),
            std::collections::VecDeque::new(),
            true,
        );
        futures::stream::unfold(state, move |(mut rx, mut known, mut pending, mut first)| {
            let options = options.clone();
            async move {
                loop {
                    if let Some(change) = pending.pop_front() {
                        return Some((Ok(change), (rx, known, pending, first)));
                    }
                    if !first && rx.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let now = addrs(&rx.borrow_and_update());
                    for gone in known.difference(&now) {
                        pending.push_back(Change::Remove(gone.clone()));
                    }
                    for new in now.difference(&known) {
                        match options.endpoint(new) {
                            Ok(endpoint) => {
                                pending.push_back(Change::Insert(new.clone(), endpoint))
                            }
                            Err(e) => warn!(addr = new, error = %e, "skipping endpoint"),
                        }
                    }
                    known = now;
                }
            }
        })
    }
}

fn addrs(entries: &BTreeMap<String, Endpoint>) -> BTreeSet<String> {
    entries.values().map(|e| e.addr.clone()).collect()
}

/// What the policies read from an endpoint's metadata, and the weight that could not be read.
fn meta(endpoint: &Endpoint) -> (Meta, Option<String>) {
    let (weight, bad) = match parse_weight(endpoint.metadata.as_ref()) {
        Ok(weight) => (weight.unwrap_or(DEFAULT_WEIGHT), None),
        Err(e) => (DEFAULT_WEIGHT, Some(e.0)),
    };
    let meta = Meta {
        zone: endpoint.metadata_str("zone").map(Arc::from),
        weight,
    };
    (meta, bad)
}

fn warn_weight(options: &Options, key: &str, value: String) {
    if options.balance != Balance::RoundRobin {
        warn!(key, error = %InvalidWeight(value), default = DEFAULT_WEIGHT, "using the default weight");
    }
}

/// Each registered address with what the policies read from its metadata (the first key's,
/// when two keys name one address).
fn members(
    entries: &BTreeMap<String, Endpoint>,
    options: &Options,
    warnings: &WeightWarnings,
) -> BTreeMap<String, Meta> {
    let mut out = BTreeMap::new();
    let mut bad = BTreeSet::new();
    for (key, endpoint) in entries {
        if out.contains_key(&endpoint.addr) {
            continue;
        }
        let (meta, invalid) = meta(endpoint);
        if let Some(value) = invalid {
            bad.insert((key.clone(), value));
        }
        out.insert(endpoint.addr.clone(), meta);
    }
    // Once per key and value, not on every watch event.
    for (key, value) in warnings.fresh(bad) {
        warn_weight(options, &key, value);
    }
    out
}

/// The resolver's view of the registry.
struct Registry {
    client: Client,
    /// The target as given, for errors.
    target: String,
    prefix: String,
    /// Key to endpoint, shared with the resolver for its snapshot.
    entries: Arc<Published>,
    /// The keys naming each address (usually one): the first one's metadata is the address's.
    keys_by_addr: HashMap<String, BTreeSet<String>>,
    stats: Arc<Stats>,
    timeout: Duration,
    /// How values are parsed.
    options: Options,
}

impl Registry {
    /// Replaces `entries` with a fresh listing and returns its revision.
    async fn list(&mut self) -> Result<i64> {
        let mut kv = self.client.kv_client();
        let resp = tokio::time::timeout(
            self.timeout,
            kv.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| Error::Timeout {
            op: "list endpoints",
            target: self.target.clone(),
        })?
        .map_err(|source| Error::Etcd {
            op: "list endpoints",
            target: self.target.clone(),
            source,
        })?;
        let mut entries = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(endpoint) = self.parse(&key, kv.value()) {
                entries.insert(key, endpoint);
            }
        }
        self.keys_by_addr.clear();
        for (key, endpoint) in &entries {
            self.keys_by_addr
                .entry(endpoint.addr.clone())
                .or_default()
                .insert(key.clone());
        }
        self.entries.with(|e| *e = entries);
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    fn parse(&self, key: &str, value: &[u8]) -> Option<Endpoint> {
        match self.options.parse(value) {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                warn!(key, error = %e, "skipping malformed registry value");
                None
            }
        }
    }

    /// Applies one watch event, adding the addresses whose endpoint changed to `touched`;
    /// returns whether the registry changed. Costs a few map operations, whatever the size.
    fn apply(&mut self, event: &etcd_client::Event, touched: &mut BTreeSet<String>) -> bool {
        let Some(kv) = event.kv() else { return false };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let new = match event.event_type() {
            EventType::Put => self.parse(&key, kv.value()),
            EventType::Delete => None,
        };
        let keys_by_addr = &mut self.keys_by_addr;
        self.entries.with(|entries| {
            if entries.get(&key) == new.as_ref() {
                return false;
            }
            let old = match new {
                Some(endpoint) => {
                    let addr = endpoint.addr.clone();
                    let old = entries.insert(key.clone(), endpoint);
                    keys_by_addr
                        .entry(addr.clone())
                        .or_default()
                        .insert(key.clone());
                    touched.insert(addr);
                    old
                }
                // Deleted, or no longer a usable endpoint.
                None => entries.remove(&key),
            };
            if let Some(old) = old {
                if old.addr != entries.get(&key).map_or("", |e| e.addr.as_str())
                    && let Some(keys) = keys_by_addr.get_mut(&old.addr)
                {
                    keys.remove(&key);
                    if keys.is_empty() {
                        keys_by_addr.remove(&old.addr);
                    }
                }
                touched.insert(old.addr);
            }
            true
        })
    }

    /// What the pool must learn about each address in `touched`: its metadata (from the first
    /// key naming it), or `None` when no key names it any more.
    fn changes(
        &self,
        touched: BTreeSet<String>,
        warnings: &WeightWarnings,
    ) -> Vec<(String, Option<Meta>)> {
        self.entries.with(|entries| {
            touched
                .into_iter()
                .map(|addr| {
                    let first = self
                        .keys_by_addr
                        .get(&addr)
                        .and_then(|keys| keys.first())
                        .and_then(|key| entries.get(key).map(|e| (key, e)));
                    let Some((key, endpoint)) = first else {
                        return (addr, None);
                    };
                    let (meta, bad) = meta(endpoint);
                    if let Some(value) = warnings.note(key, bad) {
                        warn_weight(&self.options, key, value);
                    }
                    (addr, Some(meta))
                })
                .collect()
        })
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The revision was compacted; re-list.
    Compacted(i64),
    /// The stream broke or was cancelled; re-list.
    Broken(String),
}

/// Watches from `revision + 1` forever, re-listing with backoff after any interruption.
async fn run(
    mut registry: Registry,
    mut revision: i64,
    pool: Arc<Pool>,
    options: Options,
    warnings: Arc<WeightWarnings>,
) {
    // The pool first: its update costs what changed; the snapshot is a copy of the registry
    // (made only while someone watches it).
    let publish = |registry: &Registry, touched: Option<BTreeSet<String>>| {
        match touched {
            Some(touched) => pool.apply(registry.changes(touched, &warnings)),
            None => pool.set(&registry.entries.with(|e| members(e, &options, &warnings))),
        }
        registry.entries.publish();
    };
    let mut delays = options.backoff();
    loop {
        let end = watch_from(
            &mut registry,
            &mut revision,
            &publish,
            &mut delays,
            &options,
        )
        .await;
        match end {
            WatchEnd::Compacted(at) => warn!(
                revision,
                compact_revision = at,
                "watch revision compacted; re-listing"
            ),
            WatchEnd::Broken(error) => warn!(revision, error, "registry watch ended; re-listing"),
        }
        // Re-list until it succeeds; the last known endpoints stay in use meanwhile.
        loop {
            let delay = delays.next().unwrap_or(options.retry_max);
            tokio::time::sleep(delay).await;
            match registry.list().await {
                Ok(rev) => {
                    registry.stats.relists.fetch_add(1, Ordering::Relaxed);
                    revision = rev;
                    publish(&registry, None);
                    info!(
                        revision,
                        endpoints = registry.entries.len(),
                        "re-listed registry"
                    );
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "failed to re-list registry; keeping the last known endpoints")
                }
            }
        }
    }
}

async fn watch_from(
    registry: &mut Registry,
    revision: &mut i64,
    publish: &impl Fn(&Registry, Option<BTreeSet<String>>),
    delays: &mut Box<dyn Iterator<Item = Duration> + Send>,
    options: &Options,
) -> WatchEnd {
    let watch_options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1)
        .with_progress_notify();
    let opened = tokio::time::timeout(
        registry.timeout,
        registry
            .client
            .watch(registry.prefix.as_str(), Some(watch_options)),
    )
    .await;
    let mut stream = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return WatchEnd::Broken(e.to_string()),
        Err(_) => return WatchEnd::Broken("timed out opening watch".into()),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return WatchEnd::Broken("stream closed".into()),
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        if resp.canceled() {
            return if resp.compact_revision() > 0 {
                WatchEnd::Compacted(resp.compact_revision())
            } else {
                WatchEnd::Broken(format!("watch cancelled: {}", resp.cancel_reason()))
            };
        }
        // A healthy message: later failures start their backoff afresh.
        *delays = options.backoff();
        let mut changed = false;
        let mut touched = BTreeSet::new();
        for event in resp.events() {
            changed |= registry.apply(event, &mut touched);
            if let Some(kv) = event.kv() {
                *revision = (*revision).max(kv.mod_revision());
            }
        }
        if resp.events().is_empty()
            && let Some(header) = resp.header()
        {
            // Progress notification: everything up to here has been seen.
            *revision = (*revision).max(header.revision());
        }
        if changed {
            debug!(
                revision = *revision,
                endpoints = registry.entries.len(),
                "registry changed"
            );
            publish(registry, Some(touched));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::EtcdServer;

    #[tokio::test]
    async fn compacted_watch_revision_leads_to_a_relist_with_no_lost_update() {
        let etcd = EtcdServer::start().await;
        let mut client = etcd.client().await;
        let target = "services/default/compact";
        let put = |i: u16| crate::format::endpoint_key(target, &format!("10.0.0.{i}:50051"));
        for i in 1..=3 {
            let addr = format!("10.0.0.{i}:50051");
            client
                .put(
                    put(i),
                    crate::format::render(
                        crate::format::ValueFormat::Address,
                        &Endpoint::new(addr),
                    ),
                    None,
                )
                .await
                .unwrap();
        }
        client.delete(put(1), None).await.unwrap();
        let head = client
            .get("x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        client.compact(head, None).await.unwrap();

        // A resolver whose last seen revision (1) is now compacted away.
        let options =
            Options::default().retry(Duration::from_millis(10), Duration::from_millis(50));
        let stats = Arc::new(Stats::default());
        let registry = Registry {
            client,
            target: target.to_owned(),
            prefix: watch_prefix(target),
            entries: Arc::new(Published::new()),
            keys_by_addr: HashMap::new(),
            stats: stats.clone(),
            timeout: Duration::from_secs(2),
            options: options.clone(),
        };
        let mut rx = registry.entries.subscribe();
        let pool = Pool::new(target, options.clone());
        let task = tokio::spawn(run(registry, 1, pool, options, Arc::default()));
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.len() == 2))
            .await
            .expect("re-listed after compaction")
            .unwrap();
        assert!(stats.relists() >= 1);
        let keys: Vec<String> = rx.borrow().keys().cloned().collect();
        assert_eq!(
            keys,
            [put(2), put(3)],
            "the delete before compaction is not lost"
        );
        task.abort();
    }
}
