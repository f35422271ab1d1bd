//! The last valid publication of each service, recorded in the registry so that it outlives a
//! process (DESIGN §5: nothing that must survive a restart lives only in memory).
//!
//! Once a valid spec's target is claimed, and before its endpoints are synced, the registry
//! holds a record of that spec and its target (written ahead, so that the record never lags the
//! keys). When the spec later turns invalid, any replica (this one after a restart, or a new
//! leader) rebuilds the plan from the record and keeps following readiness under it until the
//! spec is fixed.
//!
//! This process also remembers the last valid spec it saw of each service, which may not be
//! recorded yet (the registry was unreachable when it was seen): of the two, the later
//! generation is the last valid spec. Both are caches of one leadership term: another replica
//! may have recorded a later spec while this one was not leading, so a new term starts empty
//! and reads the registry again.
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::crd::{GrpcService, GrpcServiceSpec};
use crate::desired::Policy;
use crate::registry::{self, Backend, Owner, Planned, Planner};

/// What the registry records of a service's last valid publication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The target published under (what the spec resolved to then).
    pub target: String,
    /// The valid spec.
    pub spec: GrpcServiceSpec,
    /// The object's `metadata.generation` with that spec (absent in records written before it
    /// was kept), so that of two records the later spec wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

impl Record {
    /// The record of `svc`'s current spec, published under `target`.
    #[must_use]
    pub fn of(svc: &GrpcService, target: &str) -> Self {
        Self {
            target: target.to_owned(),
            spec: svc.spec.clone(),
            generation: svc.metadata.generation,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The plan this record publishes for `svc` (its identity, the recorded spec), under the
    /// recorded target, as `planner` plans it; `None` when the controller's policy no longer
    /// allows it.
    #[must_use]
    pub fn plan(
        &self,
        svc: &GrpcService,
        policy: &Policy,
        planner: &dyn Planner,
    ) -> Option<Planned> {
        let mut old = svc.clone();
        old.spec = self.spec.clone();
        let planned = planner.keeping(&old, policy, self.target.clone()).ok()?;
        (planned.target() == self.target).then_some(planned)
    }

    /// The spec recorded, as a service with `svc`'s identity (for its TTL and the like).
    #[must_use]
    pub fn service(&self, svc: &GrpcService) -> GrpcService {
        let mut old = svc.clone();
        old.spec = self.spec.clone();
        old
    }
}

/// This leadership term's caches, by owner uid.
#[derive(Default)]
struct Term {
    /// The term they belong to.
    term: i64,
    /// The record bytes this process knows the registry holds (`None`: known to hold none, so
    /// that a new service's reconcile reads the registry for it once, not at every step).
    recorded: HashMap<String, Option<Vec<u8>>>,
    /// Every record was listed in this term: a uid neither in `recorded` nor in `unsure` has
    /// no record.
    listed: bool,
    /// When listing every record last failed in this term (reads go one by one meanwhile).
    list_failed: Option<Instant>,
    /// Uids whose record is unknown even after the listing (a release that may have left it).
    unsure: HashSet<String>,
    /// While a listing is under way, the uids whose record changed here since it started: the
    /// listing may predate them.
    touched: Option<HashSet<String>>,
    /// The last valid spec this process saw, recorded or not.
    seen: HashMap<String, Record>,
}

impl Term {
    /// What is known of `uid`'s record: `Some(None)` when it is known to have none.
    fn known(&self, uid: &str) -> Option<Option<Vec<u8>>> {
        match self.recorded.get(uid) {
            Some(known) => Some(known.clone()),
            None if self.listed && !self.unsure.contains(uid) => Some(None),
            None => None,
        }
    }

    /// Whether the registry holds a record of `uid`, as far as is known (no copy of it).
    fn holds(&self, uid: &str) -> Option<bool> {
        match self.recorded.get(uid) {
            Some(known) => Some(known.is_some()),
            None if self.listed && !self.unsure.contains(uid) => Some(false),
            None => None,
        }
    }

    /// Notes what the registry holds for `uid` now.
    fn learn(&mut self, uid: &str, bytes: Option<Vec<u8>>) {
        self.recorded.insert(uid.to_owned(), bytes);
        self.unsure.remove(uid);
        self.touch(uid);
    }

    /// Notes that `uid`'s record changed here, for a listing under way.
    fn touch(&mut self, uid: &str) {
        if let Some(touched) = &mut self.touched {
            touched.insert(uid.to_owned());
        }
    }
}

/// How long after a failed listing of every record a term tries again.
const LIST_RETRY: Duration = Duration::from_secs(30);

/// What this process knows of the registry's records and of the valid specs it saw, for one
/// leadership term at a time. The first record asked for in a term lists them all, once:
/// a cold start or a takeover of 10,000 services then reads the records in a few ranges
/// instead of one per service.
#[derive(Default)]
pub struct Records {
    state: Mutex<Term>,
    /// Held while every record is being listed, so that one listing serves every reconcile.
    listing: tokio::sync::Mutex<()>,
}

impl Records {
    /// Runs `f` on the caches of `term`, emptied first when they belong to an earlier one.
    fn with<T>(&self, term: i64, f: impl FnOnce(&mut Term) -> T) -> T {
        let mut state = self.state.lock().expect("lock");
        if state.term != term {
            *state = Term {
                term,
                ..Term::default()
            };
        }
        f(&mut state)
    }

    /// Lists every record once in `term` (unless a listing failed less than [`LIST_RETRY`]
    /// ago); what this term learnt meanwhile is kept over the listing.
    async fn list_once(&self, backend: &dyn Backend, term: i64) {
        let _listing = self.listing.lock().await;
        let due = self.with(term, |t| {
            let due = !t.listed && t.list_failed.is_none_or(|at| at.elapsed() >= LIST_RETRY);
            if due {
                t.touched = Some(HashSet::new());
            }
            due
        });
        if !due {
            return;
        }
        match backend.publication_records().await {
            // A term that started over meanwhile has no listing under way: nothing is applied.
            Ok(all) => self.with(term, |t| {
                let Some(touched) = t.touched.take() else {
                    return;
                };
                for (uid, bytes) in all {
                    if !touched.contains(&uid) {
                        t.recorded.entry(uid).or_insert(Some(bytes));
                    }
                }
                t.listed = true;
            }),
            Err(e) => {
                debug!(error = %e, "failed to list publication records; reading them one by one");
                self.with(term, |t| {
                    t.touched = None;
                    t.list_failed = Some(Instant::now());
                });
            }
        }
    }

    /// What the registry holds for `uid` (known in `term`, listed, or read).
    async fn stored(
        &self,
        backend: &dyn Backend,
        term: i64,
        uid: &str,
    ) -> Result<Option<Vec<u8>>, registry::Error> {
        if let Some(known) = self.with(term, |t| t.known(uid)) {
            return Ok(known);
        }
        self.list_once(backend, term).await;
        if let Some(known) = self.with(term, |t| t.known(uid)) {
            return Ok(known);
        }
        backend.publication_record(uid).await
    }

    /// Whether the registry holds a record of the owner `uid` (known in `term`, listed, or
    /// read).
    ///
    /// # Errors
    /// Registry failures.
    pub async fn holds(
        &self,
        backend: &dyn Backend,
        term: i64,
        uid: &str,
    ) -> Result<bool, registry::Error> {
        if let Some(held) = self.with(term, |t| t.holds(uid)) {
            return Ok(held);
        }
        Ok(self.stored(backend, term, uid).await?.is_some())
    }

    /// Notes `record` as the last valid spec seen of the owner `uid` in `term`.
    pub fn saw(&self, term: i64, uid: &str, record: Record) {
        self.with(term, |t| t.seen.insert(uid.to_owned(), record));
    }

    /// Publishes `publication` in one request when the registry holds no record of its owner
    /// (known here in this `term`, or read) and nobody has published under its target: see
    /// [`Backend::publish_first`]. `None` when it did not, writing nothing.
    ///
    /// # Errors
    /// Registry failures.
    pub async fn publish_first(
        &self,
        backend: &dyn Backend,
        term: i64,
        publication: &registry::Publication,
        record: &Record,
    ) -> Result<Option<registry::SyncReport>, registry::Error> {
        let uid = &publication.owner.uid;
        if self.holds(backend, term, uid).await? {
            return Ok(None);
        }
        let bytes = record.bytes();
        let published = backend.publish_first(publication, &bytes).await?;
        if published.is_some() {
            self.with(term, |t| t.learn(uid, Some(bytes)));
        }
        Ok(published)
    }

    /// Claims `target` for `owner`. When the registry holds no record of `owner` (known here
    /// in this `term`, or read) and the claim creates the target's ownership record, `record`
    /// (made only then) is written with it in one request: a first start records each service's spec without a
    /// write of its own, and [`Self::keep`] then finds it recorded.
    ///
    /// # Errors
    /// Registry failures.
    pub async fn claim(
        &self,
        backend: &dyn Backend,
        term: i64,
        target: &str,
        owner: &Owner,
        record: impl FnOnce() -> Record + Send,
    ) -> Result<registry::Claim, registry::Error> {
        if self.holds(backend, term, &owner.uid).await? {
            return backend.claim(target, owner).await;
        }
        let bytes = record().bytes();
        let (claim, recorded) = backend.claim_recording(target, owner, &bytes).await?;
        if recorded {
            self.with(term, |t| t.learn(&owner.uid, Some(bytes)));
        }
        Ok(claim)
    }

    /// Makes the registry's record of `owner` equal `record`: nothing when it already is (known
    /// here in this `term`, or read from the registry), else one guarded write.
    ///
    /// # Errors
    /// Registry failures; [`registry::Error::OwnershipLost`].
    pub async fn keep(
        &self,
        backend: &dyn Backend,
        term: i64,
        owner: &Owner,
        record: &Record,
    ) -> Result<(), registry::Error> {
        let bytes = record.bytes();
        let stored = self.stored(backend, term, &owner.uid).await?;
        if stored.as_deref() != Some(bytes.as_slice()) {
            backend
                .record_publication(&record.target, owner, &bytes)
                .await?;
        }
        self.with(term, |t| t.learn(&owner.uid, Some(bytes)));
        Ok(())
    }

    /// The last valid spec of the owner `uid`: of the one seen in `term` and the one the
    /// registry records (known here, or read), the later generation.
    ///
    /// # Errors
    /// Registry failures.
    pub async fn last(
        &self,
        backend: &dyn Backend,
        term: i64,
        uid: &str,
    ) -> Result<Option<Record>, registry::Error> {
        let recorded = self.recorded(backend, term, uid).await?;
        let seen = self.with(term, |t| t.seen.get(uid).cloned());
        Ok(match (seen, recorded) {
            (Some(seen), Some(recorded)) if recorded.generation > seen.generation => Some(recorded),
            (Some(seen), _) => Some(seen),
            (None, recorded) => recorded,
        })
    }

    /// The record the registry holds for the owner `uid` (known here in `term`, or read).
    ///
    /// # Errors
    /// Registry failures.
    pub async fn recorded(
        &self,
        backend: &dyn Backend,
        term: i64,
        uid: &str,
    ) -> Result<Option<Record>, registry::Error> {
        let Some(bytes) = self.stored(backend, term, uid).await? else {
            self.with(term, |t| t.learn(uid, None));
            return Ok(None);
        };
        let record = serde_json::from_slice::<Record>(&bytes).ok();
        if record.is_some() {
            self.with(term, |t| t.learn(uid, Some(bytes)));
        }
        Ok(record)
    }

    /// Forgets the spec seen of `uid` (the registry refused it: it was not valid after all).
    pub fn unsee(&self, term: i64, uid: &str) {
        self.with(term, |t| t.seen.remove(uid));
    }

    /// Forgets the record of `uid` (a release deleted it with its target, unless another
    /// owner held the target: read again); what was seen stays.
    pub fn released(&self, term: i64, uid: &str) {
        self.with(term, |t| {
            t.recorded.remove(uid);
            t.unsure.insert(uid.to_owned());
            t.touch(uid);
        });
    }

    /// Forgets `uid` (its service was deleted and released, which deleted the record too).
    pub fn forget(&self, uid: &str) {
        let mut state = self.state.lock().expect("lock");
        state.recorded.remove(uid);
        state.seen.remove(uid);
        state.touch(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::MemoryBackend;
    use crate::registry::{Backend, Claim};

    fn owner() -> Owner {
        Owner {
            uid: "uid-1".into(),
            namespace: "default".into(),
            name: "greeter".into(),
        }
    }

    /// A registry holding a record for each of `names` (uid `uid-<name>`), written by another
    /// process.
    async fn recorded_by_another(names: &[&str]) -> MemoryBackend {
        let backend = MemoryBackend::default();
        for name in names {
            let owner = Owner {
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                name: (*name).into(),
            };
            let target = format!("services/default/{name}");
            backend.claim(&target, &owner).await.unwrap();
            let record = Record::of(&crate::fixtures::service(name), &target);
            backend
                .record_publication(&target, &owner, &record.bytes())
                .await
                .unwrap();
        }
        backend
    }

    #[tokio::test]
    async fn a_first_claim_records_the_spec_in_its_own_write_and_keeping_it_then_writes_nothing() {
        let backend = MemoryBackend::default();
        let records = Records::default();
        let (owner, target) = (owner(), "services/default/greeter");
        let record = Record::of(&crate::fixtures::service("greeter"), target);
        let claim = records
            .claim(&backend, 1, target, &owner, || record.clone())
            .await;
        assert_eq!(claim.unwrap(), Claim::Owned);
        assert_eq!(
            backend.writes(),
            1,
            "the ownership and publication records, together"
        );
        assert_eq!(
            backend.publication_record(&owner.uid).await.unwrap(),
            Some(record.bytes())
        );
        records.keep(&backend, 1, &owner, &record).await.unwrap();
        assert_eq!(backend.writes(), 1, "known recorded: nothing to write");

        // A later spec is recorded by keeping it; the claim (already held) writes nothing.
        let mut later = record.clone();
        later.generation = Some(2);
        let claim = records
            .claim(&backend, 1, target, &owner, || later.clone())
            .await;
        assert_eq!(claim.unwrap(), Claim::Owned);
        records.keep(&backend, 1, &owner, &later).await.unwrap();
        assert_eq!(backend.writes(), 2);
        assert_eq!(
            backend.publication_record(&owner.uid).await.unwrap(),
            Some(later.bytes())
        );
    }

    #[tokio::test]
    async fn a_claim_of_a_service_the_registry_holds_a_record_of_leaves_that_record_to_keep() {
        let backend = MemoryBackend::default();
        let records = Records::default();
        let owner = Owner {
            uid: "uid-b".into(),
            namespace: "default".into(),
            name: "b".into(),
        };
        let old = Record::of(&crate::fixtures::service("b"), "services/default/old");
        backend.claim("services/default/old", &owner).await.unwrap();
        backend
            .record_publication("services/default/old", &owner, &old.bytes())
            .await
            .unwrap();
        // The service moves to a new target: its claim creates that target's record, but the
        // registry's record of the old spec is not overwritten by it.
        let new = Record::of(&crate::fixtures::service("b"), "services/default/b");
        let claim = records
            .claim(&backend, 1, "services/default/b", &owner, || new.clone())
            .await;
        assert_eq!(claim.unwrap(), Claim::Owned);
        assert_eq!(
            backend.publication_record(&owner.uid).await.unwrap(),
            Some(old.bytes())
        );
    }

    #[tokio::test]
    async fn a_term_lists_every_record_once_instead_of_reading_one_per_service() {
        let backend = recorded_by_another(&["a", "b", "c"]).await;
        let records = Records::default();
        for name in ["a", "b", "c"] {
            let record = records.recorded(&backend, 1, &format!("uid-{name}")).await;
            assert_eq!(
                record.unwrap().unwrap().target,
                format!("services/default/{name}")
            );
        }
        assert_eq!(
            records.recorded(&backend, 1, "uid-new").await.unwrap(),
            None,
            "a uid the listing did not name has no record"
        );
        assert_eq!(backend.record_reads(), 1, "one listing");
    }

    #[tokio::test]
    async fn a_record_released_in_the_term_is_read_again_not_taken_from_the_listing() {
        let backend = recorded_by_another(&["a"]).await;
        let records = Records::default();
        let has_record = || async {
            records
                .recorded(&backend, 1, "uid-a")
                .await
                .unwrap()
                .is_some()
        };
        assert!(has_record().await);
        records.released(1, "uid-a");
        // The release was refused (another owner held the target): the record is still there.
        assert!(has_record().await);
        assert_eq!(backend.record_reads(), 2, "the listing, then one read");
    }

    #[tokio::test]
    async fn a_failed_listing_falls_back_to_reading_records_one_by_one() {
        let backend = recorded_by_another(&["a"]).await;
        let records = Records::default();
        backend.set_unavailable(true);
        assert!(records.recorded(&backend, 1, "uid-a").await.is_err());
        backend.set_unavailable(false);
        assert!(
            records
                .recorded(&backend, 1, "uid-a")
                .await
                .unwrap()
                .is_some()
        );
        // The failed listing, the read that failed after it, and one read: no second listing
        // within the retry interval.
        assert_eq!(backend.record_reads(), 3);
    }

    #[tokio::test]
    async fn a_new_services_missing_record_is_read_from_the_registry_once_per_term() {
        let backend = MemoryBackend::default();
        let records = Records::default();
        let owner = owner();
        let svc = crate::fixtures::service("greeter");
        assert!(matches!(
            backend.claim("services/default/greeter", &owner).await,
            Ok(Claim::Owned)
        ));
        // A first reconcile asks three times (the previous target, the record before the
        // write, the write itself): the registry is read once (listed).
        for _ in 0..2 {
            assert_eq!(
                records.recorded(&backend, 1, &owner.uid).await.unwrap(),
                None
            );
        }
        let record = Record::of(&svc, "services/default/greeter");
        records.keep(&backend, 1, &owner, &record).await.unwrap();
        assert_eq!(backend.record_reads(), 1);
        assert_eq!(
            records.recorded(&backend, 1, &owner.uid).await.unwrap(),
            Some(record)
        );
        assert_eq!(backend.record_reads(), 1);
        // A new term trusts nothing it knew: another leader may have written meanwhile.
        records.recorded(&backend, 2, &owner.uid).await.unwrap();
        assert_eq!(backend.record_reads(), 2);
    }
}
