//! The etcd side: target ownership, the shared lease, and txn-batched diffs.
//!
//! Every target is owned by exactly one `GrpcService`, recorded at
//! `<registrar-root>/owners/<target>` and claimed with a compare-and-swap txn. Every write under a
//! target is a txn guarded by that record, so a writer that lost ownership writes nothing.

mod diff;
mod lease;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tonic_etcd_resolver::format::watch_prefix;
use tracing::{Instrument, debug, info, info_span, warn};

pub use diff::{Current, Op, diff};
pub use lease::LeaseEvent;
use lease::{LeasePool, is_lease_not_found, timeout_error};

use crate::metrics::Metrics;
use crate::{Error, Result};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// TLS material for etcd, PEM: the CA that signed etcd's serving certificate, and an optional
/// client certificate and key (mTLS; under etcd's `--client-cert-auth` with auth enabled, the
/// certificate's common name is the etcd user, so no password is needed).
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// CA certificate(s), PEM.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and private key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// An etcd user and password; the password never reaches a log.
#[derive(Clone)]
pub struct EtcdUser {
    /// The user name.
    pub name: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to reach etcd and lay out the controller's records.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// etcd client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of the controller's own records (`<root>/owners/...`).
    pub registrar_root: String,
    /// TTL of the shared lease when a service sets none.
    pub default_ttl: Duration,
    /// Operations per txn; at most etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// Bound on every etcd request.
    pub op_timeout: Duration,
    /// TLS, for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// Username and password auth. The token is refreshed when etcd refuses it as expired.
    pub user: Option<EtcdUser>,
}

impl RegistryConfig {
    /// A config with the defaults for everything but the endpoints.
    #[must_use]
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            registrar_root: "grpc-registrar".into(),
            default_ttl: Duration::from_secs(30),
            max_txn_ops: MAX_TXN_OPS,
            op_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
        }
    }
}

/// Who owns a target: the GrpcService's identity, stored as the ownership record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The GrpcService uid; the identity that counts.
    pub uid: String,
    /// Its namespace, so a conflict can name it.
    pub namespace: String,
    /// Its name, so a conflict can name it.
    pub name: String,
}

impl Owner {
    fn record(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the target.
    Owned,
    /// Someone else does.
    Conflict {
        /// The current owner.
        owner: Owner,
        /// The record's mod revision, for a guarded takeover of a stale owner.
        mod_revision: i64,
    },
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Keys written (new, changed, or moved onto the live lease).
    pub puts: usize,
    /// Keys deleted.
    pub deletes: usize,
    /// Txns used.
    pub txns: usize,
    /// Keys now under the target.
    pub registered: usize,
    /// The etcd revision after the sync.
    pub revision: i64,
    /// The lease the keys are on.
    pub lease_id: i64,
}

/// Desired keys and values of one target, shared between a sync and the replay record.
pub type Entries = Arc<BTreeMap<String, Vec<u8>>>;

/// What was last applied to a target, kept to re-put everything after a lease loss.
struct Applied {
    owner: Owner,
    ttl: Duration,
    entries: Arc<BTreeMap<String, Vec<u8>>>,
}

/// The registry: a cheap, cloneable handle over one etcd client.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The etcd client (a balanced channel, shared by all clones).
    client: Client,
    /// Layout and limits.
    config: RegistryConfig,
    /// The shared leases.
    leases: LeasePool,
    /// Targets this process has claimed, so a claim costs no round trip in steady state.
    claimed: Mutex<HashMap<String, Owner>>,
    /// Last applied content per target, for re-puts after a lease loss.
    applied: Mutex<HashMap<String, Applied>>,
    /// etcd latency and lease counters.
    metrics: Arc<Metrics>,
    /// Whether this replica may write, and the fencing record guarding its writes.
    fence: Mutex<Fence>,
}

/// The write permission of this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fence {
    /// No leader election: always write, unguarded (a single replica).
    Off,
    /// Not the leader: write nothing.
    Follower,
    /// The leader: write until `valid_until` (the local bound of the Kubernetes Lease), guarded on
    /// the leader record still being at `revision`.
    Leader { revision: i64, valid_until: Instant },
}

/// The leader record at `<registrar-root>/leader`: `"<term, 10 digits> <holder>"`, so that byte
/// order is term order and a record can only be replaced by a later term.
#[must_use]
pub fn leader_record(term: i64, holder: &str) -> String {
    format!("{:010} {holder}", term.max(0))
}

/// The term in a leader record; 0 when unreadable.
#[must_use]
pub fn leader_term(record: &[u8]) -> i64 {
    std::str::from_utf8(record)
        .ok()
        .and_then(|s| s.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

impl Registry {
    /// Connects to etcd. The connection is lazy: this succeeds while etcd is down, and requests
    /// fail (and are retried by the caller) until it is back.
    ///
    /// # Errors
    /// Malformed endpoints.
    pub async fn connect(config: RegistryConfig, metrics: Arc<Metrics>) -> Result<Self> {
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
        Ok(Self::from_client(client, config, metrics))
    }

    /// Wraps an existing client.
    #[must_use]
    pub fn from_client(client: Client, config: RegistryConfig, metrics: Arc<Metrics>) -> Self {
        let leases = LeasePool::new(client.clone(), config.op_timeout, metrics.clone());
        let events = leases.subscribe();
        let inner = Arc::new(Inner {
            client,
            config,
            leases,
            claimed: Mutex::default(),
            applied: Mutex::default(),
            metrics,
            fence: Mutex::new(Fence::Off),
        });
        tokio::spawn(replay(Arc::downgrade(&inner), events).instrument(info_span!("lease_replay")));
        Self { inner }
    }

    /// The underlying etcd client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The TTL used when a service sets none.
    #[must_use]
    pub fn default_ttl(&self) -> Duration {
        self.inner.config.default_ttl
    }

    /// Lease announcements: replacements (after the new lease was granted), and etcd becoming
    /// unreachable or reachable again, so that status can follow.
    #[must_use]
    pub fn lease_events(&self) -> broadcast::Receiver<LeaseEvent> {
        self.inner.leases.subscribe()
    }

    /// The ids of the live shared leases.
    pub async fn lease_ids(&self) -> Vec<i64> {
        self.inner.leases.ids().await
    }

    /// The key of a target's ownership record.
    #[must_use]
    pub fn owner_key(&self, target: &str) -> String {
        format!("{}/owners/{target}", self.inner.config.registrar_root)
    }

    /// Claims `target` for `owner` with a compare-and-swap txn.
    ///
    /// Idempotent: claiming a target the same uid already owns succeeds.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim> {
        if self.inner.claimed.lock().expect("lock").get(target) == Some(owner) {
            return Ok(Claim::Owned);
        }
        let key = self.owner_key(target);
        let resp = self
            .guarded(
                "claim target",
                vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                vec![TxnOp::put(key.clone(), owner.record(), None)],
                vec![TxnOp::get(key.clone(), None)],
            )
            .await?;
        let claim = if resp.succeeded() {
            info!(target, uid = %owner.uid, "claimed target");
            Claim::Owned
        } else {
            let kv = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            match kv {
                Some(kv) => {
                    let current: Option<Owner> = serde_json::from_slice(kv.value()).ok();
                    match current {
                        Some(cur) if cur.uid == owner.uid => {
                            if cur != *owner {
                                // Same object, refreshed identity: rewrite under CAS.
                                return self.take_over(target, owner, kv.mod_revision()).await;
                            }
                            Claim::Owned
                        }
                        Some(cur) => Claim::Conflict {
                            owner: cur,
                            mod_revision: kv.mod_revision(),
                        },
                        None => Claim::Conflict {
                            owner: Owner {
                                uid: String::from_utf8_lossy(kv.value()).into_owned(),
                                namespace: String::new(),
                                name: String::new(),
                            },
                            mod_revision: kv.mod_revision(),
                        },
                    }
                }
                // Deleted between compare and get: try again.
                None => return Box::pin(self.claim(target, owner)).await,
            }
        };
        if claim == Claim::Owned {
            self.inner
                .claimed
                .lock()
                .expect("lock")
                .insert(target.to_owned(), owner.clone());
        }
        Ok(claim)
    }

    /// Takes over a target whose recorded owner is gone, guarded on the record's mod revision so
    /// that two claimants cannot both win.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn take_over(&self, target: &str, owner: &Owner, mod_revision: i64) -> Result<Claim> {
        let key = self.owner_key(target);
        let resp = self
            .guarded(
                "take over target",
                vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )],
                vec![TxnOp::put(key, owner.record(), None)],
                vec![],
            )
            .await?;
        if resp.succeeded() {
            info!(target, uid = %owner.uid, "took over target from a stale owner");
            self.inner
                .claimed
                .lock()
                .expect("lock")
                .insert(target.to_owned(), owner.clone());
            Ok(Claim::Owned)
        } else {
            Box::pin(self.claim(target, owner)).await
        }
    }

    /// Lists the keys under `target/` with their values and leases.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn list(&self, target: &str) -> Result<(BTreeMap<String, Current>, i64)> {
        let started = Instant::now();
        let mut kv = self.inner.client.kv_client();
        let fut = kv.get(watch_prefix(target), Some(GetOptions::new().with_prefix()));
        let resp = tokio::time::timeout(self.inner.config.op_timeout, fut)
            .await
            .map_err(|_| timeout_error("list target keys"))?
            .map_err(Error::etcd("list target keys"))?;
        self.inner.metrics.observe_etcd("range", started);
        let revision = resp.header().map_or(0, |h| h.revision());
        let current = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    Current {
                        value: kv.value().to_vec(),
                        lease: kv.lease(),
                    },
                )
            })
            .collect();
        Ok((current, revision))
    }

    /// Makes the keys under an owned `target` equal `desired`, all on the shared lease for `ttl`.
    ///
    /// Writes go in txns of at most `max_txn_ops` operations, each guarded by the ownership
    /// record, so nothing is written once ownership is lost.
    ///
    /// # Errors
    /// [`Error::OwnershipLost`] when the record no longer names `owner`; etcd failures.
    pub async fn sync(
        &self,
        target: &str,
        owner: &Owner,
        ttl: Duration,
        desired: Arc<BTreeMap<String, Vec<u8>>>,
    ) -> Result<SyncReport> {
        let lease_id = self.inner.leases.lease(ttl).await?;
        let (current, mut revision) = self.list(target).await?;
        let ops = diff(&current, &desired, lease_id);
        let mut report = SyncReport {
            registered: desired.len(),
            lease_id,
            ..SyncReport::default()
        };
        let guard = Compare::value(self.owner_key(target), CompareOp::Equal, owner.record());
        for batch in ops.chunks(self.inner.config.max_txn_ops.max(1)) {
            let txn_ops: Vec<TxnOp> = batch
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => TxnOp::put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    ),
                    Op::Delete { key } => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            let write = self.guarded("write registry batch", vec![guard.clone()], txn_ops, vec![]);
            let resp = match write.await {
                Err(Error::Etcd { source, .. }) if is_lease_not_found(&source) => {
                    self.inner.leases.suspect(ttl).await;
                    return Err(Error::Etcd {
                        op: "write registry batch",
                        source,
                    });
                }
                other => other?,
            };
            if !resp.succeeded() {
                self.forget_claim(target);
                return Err(Error::OwnershipLost {
                    target: target.to_owned(),
                });
            }
            report.txns += 1;
            revision = resp.header().map_or(revision, |h| h.revision());
            for op in batch {
                match op {
                    Op::Put { .. } => report.puts += 1,
                    Op::Delete { .. } => report.deletes += 1,
                }
            }
        }
        report.revision = revision;
        self.inner.applied.lock().expect("lock").insert(
            target.to_owned(),
            Applied {
                owner: owner.clone(),
                ttl,
                entries: desired,
            },
        );
        if report.puts + report.deletes > 0 {
            debug!(
                target,
                puts = report.puts,
                deletes = report.deletes,
                revision,
                lease_id,
                "synced target"
            );
        }
        Ok(report)
    }

    /// Deletes every key under an owned `target` and its ownership record, in one guarded txn.
    ///
    /// Returns the number of keys deleted; 0, touching nothing, when `owner` does not own it.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        let key = self.owner_key(target);
        let resp = self
            .guarded(
                "release target",
                vec![Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    owner.record(),
                )],
                vec![
                    TxnOp::delete(
                        watch_prefix(target),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                    TxnOp::delete(key, None),
                ],
                vec![],
            )
            .await?;
        self.forget_claim(target);
        self.inner.applied.lock().expect("lock").remove(target);
        if !resp.succeeded() {
            return Ok(0);
        }
        let deleted = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Delete(d) => Some(usize::try_from(d.deleted()).unwrap_or(0)),
                _ => None,
            })
            .unwrap_or(0);
        info!(target, deleted, "released target");
        Ok(deleted)
    }

    /// The key of the leader record that fences writes when leader election is on.
    #[must_use]
    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.inner.config.registrar_root)
    }

    /// Turns fencing on: from now on this replica writes only while it is the fenced leader.
    pub fn enable_fencing(&self) {
        self.depose();
    }

    /// Whether a write would be attempted now (not whether etcd would accept it).
    #[must_use]
    pub fn may_write(&self) -> bool {
        self.fence_compare().is_ok()
    }

    /// Makes this replica the fenced leader for `term`: writes the leader record (only over an
    /// older term), then guards every write on it. The claim and replay caches start empty, so
    /// the new leader re-claims and re-puts everything it reconciles.
    ///
    /// # Errors
    /// [`Error::Fenced`] with the newer term when etcd already holds a later leader record; etcd
    /// failures.
    pub async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        let key = self.leader_key();
        let record = leader_record(term, holder);
        let mut attempts = 0;
        let revision = loop {
            attempts += 1;
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Less, record.clone())])
                .and_then([TxnOp::put(key.clone(), record.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.txn("write leader record", txn).await?;
            if resp.succeeded() {
                break resp.header().map_or(0, |h| h.revision());
            }
            let current = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            match current {
                Some(kv) if kv.value() == record.as_bytes() => break kv.mod_revision(),
                Some(kv) => {
                    let newer = leader_term(kv.value());
                    warn!(term, newer_term = newer, "etcd holds a later leader record");
                    return Err(Error::Fenced {
                        op: "write leader record",
                    });
                }
                None if attempts < 3 => {
                    // No record yet (a value compare on a missing key fails): create it.
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.clone(), record.clone(), None)]);
                    let resp = self.txn("write leader record", txn).await?;
                    if resp.succeeded() {
                        break resp.header().map_or(0, |h| h.revision());
                    }
                }
                None => {
                    return Err(Error::Fenced {
                        op: "write leader record",
                    });
                }
            }
        };
        self.forget_all();
        *self.inner.fence.lock().expect("lock") = Fence::Leader {
            revision,
            valid_until,
        };
        info!(term, revision, holder, "fenced registry writes as leader");
        Ok(revision)
    }

    /// The term of the leader record in etcd, 0 when there is none.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn leader_term(&self) -> Result<i64> {
        let record = self.leader_record().await?;
        Ok(record.map_or(0, |kv| leader_term(kv.value())))
    }

    async fn leader_record(&self) -> Result<Option<etcd_client::KeyValue>> {
        let mut kv = self.inner.client.kv_client();
        let resp = tokio::time::timeout(
            self.inner.config.op_timeout,
            kv.get(self.leader_key(), None),
        )
        .await
        .map_err(|_| timeout_error("read leader record"))?
        .map_err(Error::etcd("read leader record"))?;
        Ok(resp.kvs().first().cloned())
    }

    /// Extends the leader's local write permission to `valid_until` (after a Lease renewal).
    pub fn extend_fence(&self, valid_until: Instant) {
        if let Fence::Leader { valid_until: v, .. } = &mut *self.inner.fence.lock().expect("lock") {
            *v = valid_until;
        }
    }

    /// Stops writing at once, and forgets claims and applied content (the next leader owns them).
    pub fn depose(&self) {
        *self.inner.fence.lock().expect("lock") = Fence::Follower;
        self.forget_all();
    }

    fn forget_all(&self) {
        self.inner.claimed.lock().expect("lock").clear();
        self.inner.applied.lock().expect("lock").clear();
    }

    /// The compare that fences a write, `None` without leader election.
    fn fence_compare(&self) -> Result<Option<Compare>, Error> {
        match *self.inner.fence.lock().expect("lock") {
            Fence::Off => Ok(None),
            Fence::Leader {
                revision,
                valid_until,
            } if Instant::now() < valid_until => Ok(Some(Compare::mod_revision(
                self.leader_key(),
                CompareOp::Equal,
                revision,
            ))),
            Fence::Leader { .. } | Fence::Follower => Err(Error::Fenced {
                op: "write to etcd",
            }),
        }
    }

    /// A txn under `compares` plus the leader fence. When it fails and the fence no longer
    /// holds (a later leader wrote its record), this replica is deposed and [`Error::Fenced`]
    /// returned, so the caller never mistakes a fenced failure for a lost compare of its own.
    async fn guarded(
        &self,
        op: &'static str,
        mut compares: Vec<Compare>,
        then: Vec<TxnOp>,
        otherwise: Vec<TxnOp>,
    ) -> Result<etcd_client::TxnResponse> {
        let fence = self.fence_compare().map_err(|_| Error::Fenced { op })?;
        let fenced = fence.is_some();
        compares.extend(fence);
        let txn = Txn::new().when(compares).and_then(then).or_else(otherwise);
        let resp = self.txn(op, txn).await?;
        if !resp.succeeded() && fenced && !self.fence_holds().await? {
            warn!(op, "a later leader fenced this replica; it stops writing");
            self.depose();
            return Err(Error::Fenced { op });
        }
        Ok(resp)
    }

    /// Whether the leader record is still the one this replica wrote.
    async fn fence_holds(&self) -> Result<bool> {
        let Fence::Leader { revision, .. } = *self.inner.fence.lock().expect("lock") else {
            return Ok(false);
        };
        let record = self.leader_record().await?;
        Ok(record.map(|kv| kv.mod_revision()) == Some(revision))
    }

    fn forget_claim(&self, target: &str) {
        self.inner.claimed.lock().expect("lock").remove(target);
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let started = Instant::now();
        let mut kv = self.inner.client.kv_client();
        let resp = tokio::time::timeout(self.inner.config.op_timeout, kv.txn(txn))
            .await
            .map_err(|_| timeout_error(op))?
            .map_err(Error::etcd(op))?;
        self.inner.metrics.observe_etcd("txn", started);
        Ok(resp)
    }
}

/// Re-puts every applied target on a replaced lease, retrying until each succeeds or is
/// released.
async fn replay(inner: Weak<Inner>, mut events: broadcast::Receiver<LeaseEvent>) {
    loop {
        let (ttl, old, new) = match events.recv().await {
            Ok(LeaseEvent::Replaced { ttl, old, new }) => (ttl, old, new),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        let registry = Registry { inner };
        let pending: Vec<(String, Owner, Entries)> = registry
            .inner
            .applied
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, a)| a.ttl.as_secs().max(1) == ttl.as_secs().max(1))
            .map(|(t, a)| (t.clone(), a.owner.clone(), a.entries.clone()))
            .collect();
        info!(
            lease_id = new,
            old_lease_id = old,
            targets = pending.len(),
            "re-putting keys on the new lease"
        );
        for (target, owner, entries) in pending {
            let mut delay = Duration::from_millis(100);
            loop {
                if !registry
                    .inner
                    .applied
                    .lock()
                    .expect("lock")
                    .contains_key(&target)
                {
                    break;
                }
                registry.forget_claim(&target);
                let result = match registry.claim(&target, &owner).await {
                    Ok(Claim::Owned) => registry
                        .sync(&target, &owner, ttl, entries.clone())
                        .await
                        .map(|_| ()),
                    Ok(Claim::Conflict { .. }) => break,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(target, error = %e, "failed to re-put keys after lease loss; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        registry.inner.metrics.lease_replays.inc();
    }
}
