//! An in-memory [`Backend`] for reconciler tests: the same claims, planning and entry rendering
//! (the etcd layout's), fencing (the shared fence state) and events as the etcd backend, with no
//! external process. Failures can be switched on to test
//! how reconcile reports them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::etcd::EtcdPlanner;
use super::fence::{Fence, Leader};
use super::ownership::{self, Claims, Created, Held, OwnerRecords};
use super::{Backend, Claim, Error, Event, Owner, Planner, Publication, Result, SyncReport};

/// One claimed target.
#[derive(Clone, Debug)]
struct Target {
    owner: Owner,
    /// Its record's version.
    version: i64,
    /// Rendered keys and values.
    entries: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    targets: HashMap<String, Target>,
    revision: i64,
    writes: usize,
    unavailable: bool,
    leader_term: i64,
    /// Publication records by owner uid.
    records: HashMap<String, Vec<u8>>,
    /// Reads of publication records so far.
    record_reads: usize,
    /// Writers' announcements, by instance.
    writers: HashMap<String, u64>,
}

/// The in-memory registry.
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    fence: Fence<i64>,
    events: broadcast::Sender<Event>,
    ttl: Duration,
    lease_id: i64,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            fence: Fence::default(),
            events: broadcast::channel(16).0,
            ttl: Duration::from_secs(30),
            lease_id: 0x7e57,
        }
    }
}

impl MemoryBackend {
    /// A placement under `target` with the default key layout and value format, for tests
    /// that publish without a spec.
    #[must_use]
    pub fn placement(target: &str) -> std::sync::Arc<dyn super::Placement> {
        std::sync::Arc::new(super::etcd::Layout::default_for(
            target,
            tonic_etcd_resolver::ValueFormat::default(),
        ))
    }

    /// The keys and values under `target`, as the publications' placements render them.
    #[must_use]
    pub fn entries(&self, target: &str) -> BTreeMap<String, Vec<u8>> {
        self.lock()
            .targets
            .get(target)
            .map(|t| t.entries.clone())
            .unwrap_or_default()
    }

    /// The owner of `target`.
    #[must_use]
    pub fn owner(&self, target: &str) -> Option<Owner> {
        self.lock().targets.get(target).map(|t| t.owner.clone())
    }

    /// Writes made so far (claims, syncs that changed something, releases).
    #[must_use]
    pub fn writes(&self) -> usize {
        self.lock().writes
    }

    /// The state for a read of publication records (`op`), counted; a timeout while
    /// unavailable.
    fn read_records(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut state = self.lock();
        state.record_reads += 1;
        if state.unavailable {
            return Err(Error::Timeout {
                op,
                after: Duration::ZERO,
            });
        }
        Ok(state)
    }

    /// Reads of publication records made so far.
    #[must_use]
    pub fn record_reads(&self) -> usize {
        self.lock().record_reads
    }

    /// Makes every request fail as an unreachable registry would, or work again.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// Announces an event, as the etcd lease keeper would.
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Loses the lease: every published entry is gone (ownership records stay, as they are not
    /// on the lease), and [`Event::Replaced`] is announced.
    pub fn lose_lease(&self) {
        for target in self.lock().targets.values_mut() {
            target.entries.clear();
        }
        self.emit(Event::Replaced {
            ttl: self.ttl,
            old: self.lease_id,
            new: self.lease_id,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lock")
    }

    /// The state, when a write may go ahead.
    fn writable(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let state = self.lock();
        if state.unavailable {
            return Err(Error::Timeout {
                op,
                after: Duration::ZERO,
            });
        }
        self.fence.guard(op)?;
        Ok(state)
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn planner(&self) -> &dyn Planner {
        &EtcdPlanner
    }

    async fn check(&self) -> Result<i64> {
        let state = self.lock();
        if state.unavailable {
            return Err(Error::Timeout {
                op: "read registry",
                after: Duration::ZERO,
            });
        }
        Ok(state.revision)
    }

    fn default_ttl(&self) -> Duration {
        self.ttl
    }

    async fn claim(&self, target: &str, owner: &Owner) -> Result<Claim> {
        ownership::claim(self, target, owner).await
    }

    async fn claim_recording(
        &self,
        target: &str,
        owner: &Owner,
        record: &[u8],
    ) -> Result<(Claim, bool)> {
        ownership::claim_recording(self, target, owner, Some(record)).await
    }

    async fn heartbeat(&self, instance: &str, beat: u64) -> Result<Vec<(String, u64)>> {
        let mut state = self.lock();
        state.writers.insert(instance.to_owned(), beat);
        Ok(state
            .writers
            .iter()
            .filter(|(i, _)| *i != instance)
            .map(|(i, b)| (i.clone(), *b))
            .collect())
    }

    async fn forget_writer(&self, instance: &str) -> Result<()> {
        self.lock().writers.remove(instance);
        Ok(())
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        Ok(self
            .lock()
            .targets
            .iter()
            .map(|(target, t)| (target.clone(), t.owner.clone()))
            .collect())
    }

    async fn owner_of(&self, target: &str) -> Result<Option<Owner>> {
        if self.lock().unavailable {
            return Err(Error::Timeout {
                op: "read ownership record",
                after: Duration::ZERO,
            });
        }
        Ok(self.owner(target))
    }

    async fn take_over(&self, target: &str, owner: &Owner, version: i64) -> Result<Claim> {
        ownership::take_over(self, target, owner, version).await
    }

    async fn publish_first(
        &self,
        publication: &Publication,
        record: &[u8],
    ) -> Result<Option<SyncReport>> {
        let (target, owner) = (publication.target(), &publication.owner);
        if self.fence.claims().version(target, owner).is_some() {
            return Ok(None);
        }
        let mut guard = self.writable("publish target")?;
        let state = &mut *guard;
        let taken = state.records.contains_key(&owner.uid)
            || state
                .targets
                .keys()
                .any(|other| other == target || crate::registry::nested(target, other));
        if taken {
            return Ok(None);
        }
        state.revision += 1;
        state.writes += 1;
        let entries = publication.entries.as_ref().clone();
        let registered = entries.len();
        let version = state.revision;
        state.targets.insert(
            target.to_owned(),
            Target {
                owner: owner.clone(),
                version,
                entries,
            },
        );
        state.records.insert(owner.uid.clone(), record.to_vec());
        self.fence.claims().remember(target, owner, version);
        Ok(Some(SyncReport {
            puts: registered,
            deletes: 0,
            txns: 1,
            registered,
            revision: version,
            lease: Some(self.lease_id),
        }))
    }

    async fn sync(&self, publication: &Publication) -> Result<SyncReport> {
        let entries = publication.entries.as_ref().clone();
        let mut state = self.writable("write registry batch")?;
        let target = publication.target();
        let Some(current) = state.targets.get(target) else {
            return Err(Error::OwnershipLost {
                target: target.to_owned(),
            });
        };
        if current.owner != publication.owner {
            return Err(Error::OwnershipLost {
                target: target.to_owned(),
            });
        }
        let puts = entries
            .iter()
            .filter(|(k, v)| current.entries.get(*k) != Some(*v))
            .count();
        let deletes = current
            .entries
            .keys()
            .filter(|k| !entries.contains_key(*k))
            .count();
        let registered = entries.len();
        if puts + deletes > 0 {
            state.revision += 1;
            state.writes += 1;
        }
        let revision = state.revision;
        if let Some(t) = state.targets.get_mut(target) {
            t.entries = entries;
        }
        Ok(SyncReport {
            puts,
            deletes,
            txns: usize::from(puts + deletes > 0),
            registered,
            revision,
            lease: Some(self.lease_id),
        })
    }

    async fn record_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<()> {
        ownership::record_publication(self, target, owner, record).await
    }

    async fn publication_record(&self, uid: &str) -> Result<Option<Vec<u8>>> {
        let state = self.read_records("read publication record")?;
        Ok(state.records.get(uid).cloned())
    }

    async fn publication_records(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let state = self.read_records("list publication records")?;
        Ok(state
            .records
            .iter()
            .map(|(uid, record)| (uid.clone(), record.clone()))
            .collect())
    }

    async fn release(&self, target: &str, owner: &Owner) -> Result<usize> {
        let mut state = self.writable("release target")?;
        match state.targets.get(target) {
            Some(t) if t.owner == *owner => {
                let deleted = t.entries.len();
                self.fence.claims().forget(target);
                state.targets.remove(target);
                state.records.remove(&owner.uid);
                state.revision += 1;
                state.writes += 1;
                Ok(deleted)
            }
            _ => Ok(0),
        }
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn may_write(&self) -> bool {
        self.fence.may_write()
    }

    fn enable_fencing(&self) {
        self.depose();
    }

    async fn fence(&self, holder: &str, term: i64, valid_until: Instant) -> Result<i64> {
        let mut state = self.lock();
        if state.leader_term > term {
            return Err(Error::Fenced {
                op: "write leader record",
            });
        }
        state.leader_term = term;
        state.revision += 1;
        self.fence.lead(Leader {
            guard: state.revision,
            valid_until,
            holder: holder.into(),
            term,
        });
        Ok(state.revision)
    }

    fn extend_fence(&self, valid_until: Instant) {
        self.fence.extend(valid_until);
    }

    fn depose(&self) {
        self.fence.depose();
    }

    async fn leader_term(&self) -> Result<i64> {
        Ok(self.lock().leader_term)
    }
}

/// The claim flows are the shared ones, over records kept in memory.
#[async_trait::async_trait]
impl OwnerRecords for MemoryBackend {
    fn claims(&self) -> &Claims {
        self.fence.claims()
    }

    async fn create(
        &self,
        target: &str,
        owner: &Owner,
        publication: Option<&[u8]>,
    ) -> Result<Created> {
        let mut guard = self.writable("claim target")?;
        let state = &mut *guard;
        state.revision += 1;
        let held = state.targets.get_key_value(target).or_else(|| {
            state
                .targets
                .iter()
                .find(|(other, _)| crate::registry::nested(target, other))
        });
        if let Some((held, t)) = held {
            return Ok(Created::Held(Some(Held {
                record: t.owner.record(),
                version: t.version,
                target: held.clone(),
            })));
        }
        state.writes += 1;
        let record = Target {
            owner: owner.clone(),
            version: state.revision,
            entries: BTreeMap::new(),
        };
        state.targets.insert(target.to_owned(), record);
        if let Some(publication) = publication {
            state
                .records
                .insert(owner.uid.clone(), publication.to_vec());
        }
        Ok(Created::Owned(state.revision))
    }

    async fn replace(&self, target: &str, owner: &Owner, version: i64) -> Result<Option<i64>> {
        let mut guard = self.writable("take over target")?;
        let state = &mut *guard;
        state.revision += 1;
        match state.targets.get_mut(target) {
            Some(t) if t.version == version => {
                t.owner = owner.clone();
                t.version = state.revision;
                state.writes += 1;
                Ok(Some(state.revision))
            }
            _ => Ok(None),
        }
    }

    async fn write_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<bool> {
        let mut state = self.writable("record publication")?;
        if state.targets.get(target).is_none_or(|t| t.owner != *owner) {
            return Ok(false);
        }
        state.records.insert(owner.uid.clone(), record.to_vec());
        state.writes += 1;
        Ok(true)
    }

    /// Unreachable: the records are read and written under one lock.
    fn kept_changing(&self, target: &str) -> Error {
        Error::OwnershipLost {
            target: target.to_owned(),
        }
    }
}
