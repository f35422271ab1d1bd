//! The Consul backend: one catalog service per target, one instance per endpoint, all on a
//! synthetic node per controller (or cluster), written only through guarded `/v1/txn` batches.
//!
//! - The **target** is the Consul service name; the etcd key template and value format do not
//!   apply. Instances carry the endpoint's address, port, metadata (plus
//!   [`instance::OWNER_META`]) and the publication's tags.
//! - **Ownership**: `<kv_root>/[clusters/<c>/]owners/<service>` holds [`Owner::record`],
//!   claimed with a create-only KV CAS; every write for the service is a txn that carries a
//!   KV `check-index` on that record, so a writer that lost it writes nothing.
//! - **Fence**: with leader election on, `<kv_root>/[clusters/<c>/]leader` holds the leader's
//!   term, replaced only by a later term, and every write carries a `check-index` on it.
//! - **Foreign instances** (other nodes, other services on our node) are never read for a
//!   write nor touched: every listing is of one service on our node.
//! - **Liveness**: the node has a check, `grpc-registrar:alive`, that a keeper renews (passing)
//!   every third of the TTL; it notices outages and a node lost with Consul's data, which it
//!   announces as [`Event::Replaced`] so the controller re-syncs every service. Consul servers
//!   run no check on a catalog-registered node, so the check does not turn critical by itself
//!   when the controller is gone (see `keeper`).
//!
//! - [`config`]: address, token, datacenter, TLS, records.
//! - [`plan`]: the Consul half of spec validation (service name and tags); [`name`]: who may
//!   publish which service name.
//! - `api`: the HTTP calls and txn types.
//! - `instance`: endpoints to instances, validation, the pure diff.
//! - `ownership`, `fence`, `sync`: Consul's guarded KV and catalog txns under the shared claim
//!   flows, fence state and batching; `keeper`.

mod api;
pub mod config;
mod fence;
mod instance;
mod keeper;
pub mod name;
mod ownership;
pub mod plan;
mod sync;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

/// TLS material for Consul's HTTPS API (a client certificate for `verify_incoming`).
pub use crate::registry::tls::TlsPem as ConsulTls;
use api::{Api, TxnError, TxnOp, TxnOutcome, TxnResult};
pub use config::{ConsulConfig, MAX_TXN_BYTES, MAX_TXN_OPS};
pub use fence::LeaderRecord;
pub use instance::{OWNER_META, instance_id, validate_service};

use super::fence::Fence;
use super::ownership as shared;
use super::records::Records;
use super::{Backend, Claim, Error, Event, Owner, Planner, Publication, Result, SyncReport};
use crate::metrics::Metrics;
pub use plan::{ConsulPlanner, ConsulService};

/// The id of the node-level check that the keeper keeps passing.
pub const ALIVE_CHECK: &str = "grpc-registrar:alive";

/// The Consul registry: a cheap, cloneable handle over one HTTP client.
#[derive(Clone)]
pub struct ConsulRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The HTTP client.
    api: Api,
    /// Records, node name, limits.
    config: ConsulConfig,
    /// The keys of the controller's records.
    records: Records,
    /// The synthetic node's name.
    node: String,
    /// Whether this replica may write, the leader record's index guarding its writes, and the
    /// services claimed under it with their ownership record's index (the guard).
    fence: Fence<u64>,
    /// Failure counters and the connected gauge.
    metrics: Arc<Metrics>,
    /// Reachability and node-loss announcements.
    events: broadcast::Sender<Event>,
    /// False from the first unanswered renewal of an outage until one is answered.
    reachable: AtomicBool,
    /// The node's `CreateIndex` as last written: its incarnation, reported as the lease id.
    incarnation: AtomicU64,
    /// Serialises node (re-)creation, so a sync and the keeper never race on it.
    node_lock: tokio::sync::Mutex<()>,
    /// Wakes the keeper early (shared with it, which holds the rest only weakly).
    wake: Arc<Notify>,
    /// The keeper task, started by the first sync.
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Instances stay registered (and their check passing until it is renewed no more):
        // a restarted controller finds them unchanged, as etcd keys outlive a restart.
        if let Some(task) = self.keeper.lock().expect("lock").take() {
            task.abort();
        }
    }
}

/// A Consul index as a version or revision (the neutral `i64` of claims and reports).
fn version(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// A version as a Consul index.
fn index(version: i64) -> u64 {
    u64::try_from(version).unwrap_or(0)
}

/// How a guarded txn ended.
enum Guarded {
    /// Every op applied.
    Committed(Vec<TxnResult>),
    /// A guard (ownership record) failed; nothing applied.
    GuardFailed,
    /// Another op failed; nothing applied.
    OpFailed(TxnError),
}

impl ConsulRegistry {
    /// Builds the client. Nothing is sent: this succeeds while Consul is down.
    ///
    /// # Errors
    /// Unreadable TLS material.
    pub fn connect(config: ConsulConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let api = Api::new(&config)?;
        let node = config.node_name();
        Ok(Self {
            inner: Arc::new(Inner {
                api,
                node,
                records: Records::new(config.records_root()),
                config,
                fence: Fence::default(),
                metrics,
                events: broadcast::channel(64).0,
                reachable: AtomicBool::new(true),
                incarnation: AtomicU64::new(0),
                node_lock: tokio::sync::Mutex::new(()),
                wake: Arc::new(Notify::new()),
                keeper: Mutex::new(None),
            }),
        })
    }

    /// The synthetic node this registry registers on.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The config.
    #[must_use]
    pub fn config(&self) -> &ConsulConfig {
        &self.inner.config
    }

    /// Asks Consul for its leader: proves the address answers and the cluster has a leader.
    ///
    /// # Errors
    /// Consul unreachable or without a leader.
    pub async fn check(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let leader = self
            .inner
            .api
            .get_text("read consul leader", "/v1/status/leader")
            .await;
        let leader = leader.and_then(|l| {
            if l.trim().trim_matches('"').is_empty() {
                Err(Error::Consul {
                    op: "read consul leader",
                    addr: self.inner.api.addr().to_owned(),
                    status: Some(500),
                    cause: "the consul cluster has no leader".to_owned(),
                })
            } else {
                Ok(())
            }
        });
        self.record("connect", started, leader.as_ref().err());
        leader
    }

    /// Records a request's latency (from `started`), counts its failure by operation, and
    /// tracks whether Consul answers.
    fn record(&self, op: &'static str, started: std::time::Instant, error: Option<&Error>) {
        self.inner.metrics.observe_request("consul", op, started);
        self.inner.metrics.backend_result(
            "consul",
            op,
            error.is_none(),
            error.is_none_or(Error::reached_backend),
        );
    }

    /// A txn of `ops` behind the leader fence and `guards` (KV `check-index` ops). When the
    /// fence fails, this replica is deposed and [`Error::Fenced`] returned.
    async fn guarded(
        &self,
        op: &'static str,
        guards: Vec<TxnOp>,
        ops: Vec<TxnOp>,
    ) -> Result<Guarded> {
        let mut refenced = false;
        loop {
            let fence = self.fence_op().map_err(|_| Error::Fenced { op })?;
            let fenced = usize::from(fence.is_some());
            let guard_end = fenced + guards.len();
            let all: Vec<TxnOp> = fence
                .into_iter()
                .chain(guards.iter().cloned())
                .chain(ops.iter().cloned())
                .collect();
            let started = std::time::Instant::now();
            let outcome = self.inner.api.txn(op, &all).await;
            self.record("txn", started, outcome.as_ref().err());
            let errors = match outcome? {
                TxnOutcome::Committed(results) => return Ok(Guarded::Committed(results)),
                TxnOutcome::RolledBack(errors) => errors,
            };
            if fenced == 1 && errors.iter().any(|e| e.op_index == 0) {
                if !refenced && self.refence_lost_record().await? {
                    refenced = true;
                    continue;
                }
                tracing::warn!(op, "a later leader fenced this replica; it stops writing");
                self.depose();
                return Err(Error::Fenced { op });
            }
            return Ok(Self::failed(errors, fenced..guard_end));
        }
    }

    /// Which op of a rolled-back txn failed: a guard in `guards`, or another.
    fn failed(errors: Vec<TxnError>, guards: std::ops::Range<usize>) -> Guarded {
        if errors.iter().any(|e| guards.contains(&e.op_index)) {
            return Guarded::GuardFailed;
        }
        Guarded::OpFailed(errors.into_iter().next().unwrap_or(TxnError {
            op_index: 0,
            what: "consul rolled the txn back without saying why".to_owned(),
        }))
    }

    /// An error for a txn op that Consul refused.
    fn refused(&self, op: &'static str, error: &TxnError) -> Error {
        Error::Consul {
            op,
            addr: self.inner.api.addr().to_owned(),
            status: Some(409),
            cause: error.what.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Backend for ConsulRegistry {
    fn reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        "consul"
    }

    fn planner(&self) -> &dyn Planner {
        &ConsulPlanner
    }

    async fn check(&self) -> Result<i64> {
        ConsulRegistry::check(self).await.map(|()| 0)
    }

    fn default_ttl(&self) -> Duration {
        self.inner.config.default_ttl
    }

    async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim> {
        shared::claim(self, target, owner).await
    }

    async fn claim_recording(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<(Claim, bool)> {
        shared::claim_recording(self, target, owner, Some(record)).await
    }

    async fn owner_of(&self, target: &str) -> Result<Option<Owner>> {
        ConsulRegistry::owner_of(self, target).await
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        ConsulRegistry::owners(self).await
    }

    async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        ConsulRegistry::heartbeat(self, instance, beat).await
    }

    async fn forget_writer(&self, instance: &str) -> Result<()> {
        ConsulRegistry::forget_writer(self, instance).await
    }

    async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim> {
        shared::take_over(self, target, owner, version).await
    }

    async fn sync(&self, publication: &Publication) -> Result<SyncReport> {
        ConsulRegistry::sync(self, publication).await
    }

    async fn record_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<()> {
        shared::record_publication(self, target, owner, record).await
    }

    async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        ConsulRegistry::publication_record(self, uid).await
    }

    async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        ConsulRegistry::publication_records(self).await
    }

    async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        ConsulRegistry::release(self, target, owner).await
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn may_write(&self) -> bool {
        self.inner.fence.may_write()
    }

    fn enable_fencing(&self) {
        self.depose();
    }

    async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        ConsulRegistry::fence(self, holder, term, valid_until).await
    }

    fn extend_fence(&self, valid_until: Instant) {
        ConsulRegistry::extend_fence(self, valid_until);
    }

    fn depose(&self) {
        ConsulRegistry::depose(self);
    }

    async fn leader_term(&self) -> Result<i64> {
        ConsulRegistry::leader_term(self).await
    }
}
