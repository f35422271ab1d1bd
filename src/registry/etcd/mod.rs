//! The etcd backend: target ownership, the shared lease, txn-batched diffs, and the fence.
//!
//! Every target is owned by exactly one `GrpcService`, recorded at
//! `<registrar-root>/owners/<target>` and claimed with a compare-and-swap txn. Every write under a
//! target is a txn guarded by that record (and, with leader election, by the leader record), so a
//! writer that lost ownership or leadership writes nothing.
//!
//! - [`config`]: endpoints, TLS, auth, limits.
//! - [`plan`]: the etcd half of spec validation (targets as key prefixes); [`layout`]: keys from
//!   the `keyTemplate` ([`KeyTemplate`]), values through the format's codec.
//! - `ownership`: the guarded txns of the shared claim and take-over flows; release.
//! - `sync`: list, diff ([`diff`]), the guarded txn each shared batch is written as.
//! - `listed`: what this process last listed or wrote under each target, trusted instead of a
//!   range while it is certain to be the only writer there (an optimisation within one term:
//!   any replica reconstructs from the registry).
//! - `fence`: the leader record and the compare every write carries (the state is shared).
//! - `lease`: one shared lease per TTL, adopted when recorded; `keepalive`: its keeper, which
//!   renews it and replaces it when lost.

pub mod config;
mod diff;
mod fence;
mod keepalive;
pub mod layout;
mod lease;
mod listed;
mod ownership;
pub mod plan;
mod sync;
mod template;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, Txn};
use tokio::sync::broadcast;

/// TLS material for etcd (under etcd's `--client-cert-auth` with auth enabled, the client
/// certificate's common name is the etcd user, so no password is needed).
pub use crate::registry::tls::TlsPem as EtcdTls;
pub use config::{EtcdConfig, EtcdUser, MAX_TXN_BYTES, MAX_TXN_OPS};
pub use diff::{Current, Op, diff};
pub use fence::{leader_record, leader_term};
pub use layout::Layout;
use lease::LeasePool;
pub use plan::EtcdPlanner;
pub use template::KeyTemplate;

use super::fence::Fence;
use super::records::Records;
use super::{Backend, Claim, Error, Event, Owner, Planner, Publication, Result, SyncReport};
use crate::metrics::Metrics;

/// The etcd registry: a cheap, cloneable handle over one etcd client.
#[derive(Clone)]
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The etcd client (a balanced channel, shared by all clones).
    client: Client,
    /// Layout and limits.
    config: EtcdConfig,
    /// The keys of the controller's records.
    records: Records,
    /// The shared leases.
    leases: LeasePool,
    /// etcd latency and lease counters.
    metrics: Arc<Metrics>,
    /// Whether this replica may write, the fencing record guarding its writes, and the
    /// targets claimed under it (so a claim costs no round trip in steady state; cleared by
    /// the lease keeper when a lease is replaced).
    fence: Fence<i64>,
    /// The leases this process has recorded for adoption (with a cluster name, also marked as
    /// its cluster's).
    marked: Mutex<std::collections::HashSet<i64>>,
    /// What this process last listed or wrote under each target, trusted while it is certain
    /// to be the only writer there (an optimisation within one term, never a record).
    listings: listed::Listings,
    /// Held while a lease is being recorded, so that the syncs of a cold start (a thousand at
    /// once) record it once, not each their own time.
    marking: tokio::sync::Mutex<()>,
}

impl EtcdRegistry {
    /// Connects to etcd. The connection is lazy: this succeeds while etcd is down, and requests
    /// fail (and are retried by the caller) until it is back.
    ///
    /// # Errors
    /// Malformed endpoints; with auth, etcd refusing (or not answering) the authentication.
    pub async fn connect(config: EtcdConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.op_timeout)
            .with_keep_alive(Duration::from_secs(10), config.op_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true)
            // On an expired or invalid token (etcd's --auth-token-ttl, or a restart with simple
            // tokens), authenticate again and retry the call once; streams are re-opened by
            // the lease keeper through the same path.
            .with_auto_token_refresh(true);
        if let Some(tls) = &config.tls {
            let mut tls_options = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca {
                tls_options = tls_options.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                tls_options = tls_options.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls_options);
        }
        if let Some(user) = &config.user {
            options = options.with_user(user.name.clone(), user.password.clone());
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(Error::etcd("connect to etcd"))?;
        let registry = Self::from_client(client, config, metrics);
        // A restarted process keeps its predecessor's lease alive from the start, not from its
        // first write after its caches have filled (seconds at scale).
        registry.adopt_leases().await;
        Ok(registry)
    }

    /// Adopts every live lease recorded for this scope (see [`LeasePool::adopt_recorded`]); a
    /// failure is logged, and the first write adopts or replaces the lease as before.
    async fn adopt_leases(&self) {
        if let Err(e) = self.inner.leases.adopt_recorded().await {
            tracing::warn!(error = %e, "failed to adopt the recorded leases; the first write will");
        }
    }

    /// Wraps an existing client.
    #[must_use]
    pub fn from_client(client: Client, config: EtcdConfig, metrics: Arc<Metrics>) -> Self {
        let fence = Fence::default();
        let leases = LeasePool::new(
            client.clone(),
            config.op_timeout,
            metrics.clone(),
            // A replaced lease took every key with it: claims are made again.
            Arc::new(fence.claims().clearer()),
            format!("{}/lease/", config.records_root()),
        );
        let listings = listed::Listings::new(leases.subscribe());
        Self {
            inner: Arc::new(Inner {
                listings,
                client,
                records: Records::new(config.records_root()),
                config,
                leases,
                metrics,
                fence,
                marked: Mutex::default(),
                marking: tokio::sync::Mutex::default(),
            }),
        }
    }

    /// The underlying etcd client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Asks etcd for the controller's root with a count-only range: proves the endpoints answer
    /// and the credentials may read. Returns etcd's current revision.
    ///
    /// # Errors
    /// etcd unreachable, or the read refused.
    pub async fn check(&self) -> Result<i64> {
        let mut kv = self.inner.client.kv_client();
        let resp = super::error::timeout(
            "read from etcd",
            self.inner.config.op_timeout,
            kv.get(
                self.inner.config.registrar_root.as_str(),
                Some(etcd_client::GetOptions::new().with_count_only()),
            ),
        )
        .await;
        self.record("connect", resp.as_ref().err());
        Ok(resp?.header().map_or(0, |h| h.revision()))
    }

    /// Trusts what this process last listed or wrote under a target for `age` from the range
    /// that read it ([`listed::MAX_AGE`] by default): a sync within it reads nothing from etcd
    /// while this process is certain to be the target's only writer; a key deleted by hand is
    /// put back by the first sync after it. Zero lists on every sync.
    pub fn trust_listings_for(&self, age: Duration) {
        self.inner.listings.set_max_age(age);
    }

    /// The ids of the live shared leases.
    pub async fn lease_ids(&self) -> Vec<i64> {
        self.inner.leases.ids().await
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let started = Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = super::error::timeout(op, self.inner.config.op_timeout, kv.txn(txn)).await;
        self.inner.metrics.observe_request("etcd", "txn", started);
        self.record("txn", resp.as_ref().err());
        resp
    }

    /// Counts a request's failure by operation and tracks whether etcd answers.
    pub(crate) fn record(&self, op: &'static str, error: Option<&super::Error>) {
        self.inner.metrics.backend_result(
            "etcd",
            op,
            error.is_none(),
            error.is_none_or(super::Error::reached_backend),
        );
    }
}

#[async_trait::async_trait]
impl Backend for EtcdRegistry {
    fn reachable(&self) -> bool {
        self.inner.leases.renewing()
    }

    fn name(&self) -> &'static str {
        "etcd"
    }

    fn planner(&self) -> &dyn Planner {
        &EtcdPlanner
    }

    async fn check(&self) -> Result<i64> {
        EtcdRegistry::check(self).await
    }

    fn default_ttl(&self) -> Duration {
        self.inner.config.default_ttl
    }

    async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim> {
        EtcdRegistry::claim(self, target, owner).await
    }

    async fn claim_recording(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<(Claim, bool)> {
        EtcdRegistry::claim_recording(self, target, owner, record).await
    }

    async fn owner_of(&self, target: &str) -> Result<Option<Owner>> {
        EtcdRegistry::owner_of(self, target).await
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        EtcdRegistry::owners(self).await
    }

    async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        EtcdRegistry::heartbeat(self, instance, beat).await
    }

    async fn forget_writer(&self, instance: &str) -> Result<()> {
        EtcdRegistry::forget_writer(self, instance).await
    }

    async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim> {
        EtcdRegistry::take_over(self, target, owner, version).await
    }

    async fn sync(&self, publication: &Publication) -> Result<SyncReport> {
        // The entries as the reconcile rendered them when it checked the spec: not again.
        self.sync_entries(
            publication.target(),
            &publication.owner,
            publication.ttl,
            publication.entries.clone(),
        )
        .await
    }

    async fn publish_first(
        &self,
        publication: &Publication,
        record: &[u8],
    ) -> Result<Option<SyncReport>> {
        EtcdRegistry::publish_first(self, publication, record).await
    }

    async fn record_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<()> {
        EtcdRegistry::record_publication(self, target, owner, record).await
    }

    async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        EtcdRegistry::publication_record(self, uid).await
    }

    async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        EtcdRegistry::publication_records(self).await
    }

    async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        EtcdRegistry::release(self, target, owner).await
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.leases.subscribe()
    }

    fn may_write(&self) -> bool {
        self.inner.fence.may_write()
    }

    fn enable_fencing(&self) {
        self.depose();
    }

    async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        let revision = EtcdRegistry::fence(self, holder, term, valid_until).await?;
        // The lease the previous leader kept (it may have died) is kept alive from now, not
        // from this leader's first write, which may wait for its caches to re-list.
        self.adopt_leases().await;
        Ok(revision)
    }

    fn extend_fence(&self, valid_until: Instant) {
        EtcdRegistry::extend_fence(self, valid_until);
    }

    fn depose(&self) {
        EtcdRegistry::depose(self);
    }

    async fn leader_term(&self) -> Result<i64> {
        EtcdRegistry::leader_term(self).await
    }
}
