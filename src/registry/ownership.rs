//! Ownership written once: the claim, take-over and publication-record flows over any backend's
//! guarded record writes, the pure verdict on a record found in the way, and the claim cache.
//!
//! A backend supplies its primitives ([`OwnerRecords`]): create its ownership record where none
//! is in the way, replace it at a version, write the publication record under it. Everything
//! else (when a claim is idempotent, a refreshed identity, a conflict, retrying a record that
//! vanished, the cache) is here, so etcd and Consul cannot drift apart.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use tracing::info;

use super::{Claim, Error, Owner, Result};

/// How many times a claim tries again when the record in its way vanished before it was read.
const CLAIM_ATTEMPTS: usize = 3;

/// The targets this process has claimed, with their ownership record's version, so that a
/// claim costs no round trip in steady state. Cleared when this replica leads anew or is
/// deposed (the next leader owns the claims), and when the entries were lost.
#[derive(Clone, Debug, Default)]
pub(super) struct Claims(Arc<Mutex<HashMap<String, Claimed>>>);

/// One claim this process holds.
#[derive(Debug)]
struct Claimed {
    owner: Owner,
    /// The ownership record's version.
    version: i64,
    /// This process created the record and has not synced the target since: nobody owned it
    /// before, so nothing of ours is under it (see [`Claims::take_fresh`]).
    fresh: bool,
}

impl Claims {
    /// The version of `owner`'s record for `target`, when this process claimed it.
    pub(super) fn version(&self, target: &str, owner: &Owner) -> Option<i64> {
        self.0
            .lock()
            .expect("lock")
            .get(target)
            .filter(|c| c.owner == *owner)
            .map(|c| c.version)
    }

    /// Notes `target` as claimed by `owner` at `version`.
    pub(super) fn remember(&self, target: &str, owner: &Owner, version: i64) {
        self.note(target, owner, version, false);
    }

    /// Notes `target` as claimed by `owner` at `version` with a record this process created.
    fn created(&self, target: &str, owner: &Owner, version: i64) {
        self.note(target, owner, version, true);
    }

    fn note(&self, target: &str, owner: &Owner, version: i64, fresh: bool) {
        let claimed = Claimed {
            owner: owner.clone(),
            version,
            fresh,
        };
        self.0
            .lock()
            .expect("lock")
            .insert(target.to_owned(), claimed);
    }

    /// Whether `owner`'s claim of `target` created its record and this is the first time
    /// asked since: a backend's first sync of a target that had no owner may then expect it
    /// empty of its own entries (and must still check, in the same request, that it is).
    pub(super) fn take_fresh(&self, target: &str, owner: &Owner) -> bool {
        let mut claims = self.0.lock().expect("lock");
        claims
            .get_mut(target)
            .filter(|c| c.owner == *owner)
            .is_some_and(|c| std::mem::take(&mut c.fresh))
    }

    /// Forgets the claim of `target`: the next write reads the record again.
    pub(super) fn forget(&self, target: &str) {
        self.0.lock().expect("lock").remove(target);
    }

    /// Forgets every claim.
    pub(super) fn clear(&self) {
        self.0.lock().expect("lock").clear();
    }

    /// A handle that clears the claims while they exist (for a task that outlives no registry).
    pub(super) fn clearer(&self) -> impl Fn() + Send + Sync + 'static {
        let weak: Weak<_> = Arc::downgrade(&self.0);
        move || {
            if let Some(claims) = weak.upgrade() {
                claims.lock().expect("lock").clear();
            }
        }
    }
}

/// What creating an ownership record found.
#[derive(Debug)]
pub(super) enum Created {
    /// The record was written at this version.
    Owned(i64),
    /// A record was in the way (the target's own, or a nested or containing target's); `None`
    /// when it vanished before it could be read.
    Held(Option<Held>),
}

/// An ownership record in the way of a claim.
#[derive(Debug)]
pub(super) struct Held {
    /// Its bytes ([`Owner::record`], or anything someone else wrote).
    pub(super) record: Vec<u8>,
    /// Its version, for a guarded take-over.
    pub(super) version: i64,
    /// The target it is for.
    pub(super) target: String,
}

/// What a claim does about a record in its way.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The record is the claimant's own: owned.
    Ours,
    /// The record is the claimant's uid with an older identity: rewrite it at its version.
    Refresh,
    /// Someone else holds it.
    Conflict(Claim),
}

/// The pure decision on a record found in the way of `owner`'s claim of `target`.
#[must_use]
pub(super) fn verdict(held: &Held, target: &str, owner: &Owner) -> Verdict {
    let current = serde_json::from_slice::<Owner>(&held.record).ok();
    match current {
        Some(current) if current.uid == owner.uid && held.target == target => {
            if current == *owner {
                Verdict::Ours
            } else {
                Verdict::Refresh
            }
        }
        current => Verdict::Conflict(Claim::Conflict {
            // An unreadable record names its bytes, so that a conflict still says something.
            owner: current.unwrap_or_else(|| Owner {
                uid: String::from_utf8_lossy(&held.record).into_owned(),
                namespace: String::new(),
                name: String::new(),
            }),
            version: held.version,
            target: held.target.clone(),
        }),
    }
}

/// The primitives a backend supplies for ownership: guarded writes of its records. Every write
/// goes behind the leader fence.
#[async_trait::async_trait]
pub(super) trait OwnerRecords: Send + Sync {
    /// The claim cache.
    fn claims(&self) -> &Claims;

    /// Writes `owner`'s record for `target` when there is none, nor one for a target nested
    /// in it or containing it (a sync of the outer one would delete the inner one's entries);
    /// with `publication`, writes it as `owner`'s publication record in the same request.
    ///
    /// # Errors
    /// Backend failures; [`Error::Fenced`].
    async fn create(
        &self,
        target: &str,
        owner: &Owner,
        publication: Option<&[u8]>,
    ) -> Result<Created>;

    /// Rewrites `target`'s record for `owner` only while it is at `version` (and still nothing
    /// nests in it). Returns the new version, `None` when the record moved on.
    ///
    /// # Errors
    /// Backend failures; [`Error::Fenced`].
    async fn replace(&self, target: &str, owner: &Owner, version: i64) -> Result<Option<i64>>;

    /// Writes `owner`'s publication record, guarded on its record for `target`. Returns false,
    /// writing nothing, when that record does not name `owner`.
    ///
    /// # Errors
    /// Backend failures; [`Error::Fenced`].
    async fn write_publication(&self, target: &str, owner: &Owner, record: &[u8]) -> Result<bool>;

    /// The error when a record kept vanishing between a failed create and its read.
    fn kept_changing(&self, target: &str) -> Error;
}

/// Claims `target` for `owner`: idempotent for the same uid, a refreshed identity of the same
/// uid rewritten at its version, anyone else's record a [`Claim::Conflict`].
///
/// # Errors
/// Backend failures; [`Error::Fenced`].
pub(super) async fn claim<R: OwnerRecords + ?Sized>(
    records: &R,
    target: &str,
    owner: &Owner,
) -> Result<Claim> {
    Ok(claim_recording(records, target, owner, None).await?.0)
}

/// As [`claim`]; when the claim creates the target's ownership record, `publication` (if any)
/// is written as `owner`'s publication record in the same request. Returns whether it was.
///
/// # Errors
/// Backend failures; [`Error::Fenced`].
pub(super) async fn claim_recording<R: OwnerRecords + ?Sized>(
    records: &R,
    target: &str,
    owner: &Owner,
    publication: Option<&[u8]>,
) -> Result<(Claim, bool)> {
    if records.claims().version(target, owner).is_some() {
        return Ok((Claim::Owned, false));
    }
    for _ in 0..CLAIM_ATTEMPTS {
        let held = match records.create(target, owner, publication).await? {
            Created::Owned(version) => {
                info!(registry_target = target, uid = %owner.uid, revision = version, "claimed target");
                records.claims().created(target, owner, version);
                return Ok((Claim::Owned, publication.is_some()));
            }
            // Released between the failed create and the read: try again.
            Created::Held(None) => continue,
            Created::Held(Some(held)) => held,
        };
        let claim = match verdict(&held, target, owner) {
            Verdict::Ours => {
                records.claims().remember(target, owner, held.version);
                Claim::Owned
            }
            Verdict::Refresh => take_over(records, target, owner, held.version).await?,
            Verdict::Conflict(conflict) => conflict,
        };
        return Ok((claim, false));
    }
    Err(records.kept_changing(target))
}

/// Takes over a target whose recorded owner is gone, guarded on the record's `version` so that
/// two claimants cannot both win; when the record moved on, claims it afresh.
///
/// # Errors
/// Backend failures; [`Error::Fenced`].
pub(super) fn take_over<'a, R: OwnerRecords + ?Sized>(
    records: &'a R,
    target: &'a str,
    owner: &'a Owner,
    version: i64,
) -> Pin<Box<dyn Future<Output = Result<Claim>> + Send + 'a>> {
    Box::pin(async move {
        match records.replace(target, owner, version).await? {
            Some(version) => {
                info!(registry_target = target, uid = %owner.uid, revision = version, "took over target from a stale owner");
                records.claims().remember(target, owner, version);
                Ok(Claim::Owned)
            }
            None => claim(records, target, owner).await,
        }
    })
}

/// Records what `owner` last published validly, guarded on its ownership of `target`.
///
/// # Errors
/// [`Error::OwnershipLost`] when `target`'s record does not name `owner`; backend failures.
pub(super) async fn record_publication<R: OwnerRecords + ?Sized>(
    records: &R,
    target: &str,
    owner: &Owner,
    record: &[u8],
) -> Result<()> {
    if records.write_publication(target, owner, record).await? {
        return Ok(());
    }
    records.claims().forget(target);
    Err(Error::OwnershipLost {
        target: target.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn owner(uid: &str, name: &str) -> Owner {
        Owner {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn held(record: &[u8], target: &str) -> Held {
        Held {
            record: record.to_vec(),
            version: 4,
            target: target.into(),
        }
    }

    #[test]
    fn a_record_of_the_same_identity_is_ours_and_a_refreshed_identity_is_rewritten() {
        let me = owner("u", "a");
        assert_eq!(verdict(&held(&me.record(), "t"), "t", &me), Verdict::Ours);
        let renamed = owner("u", "b");
        assert_eq!(
            verdict(&held(&renamed.record(), "t"), "t", &me),
            Verdict::Refresh
        );
    }

    #[test]
    fn anyone_elses_record_or_our_own_on_a_nesting_target_is_a_conflict_naming_it() {
        let me = owner("u", "a");
        let other = owner("v", "b");
        assert_eq!(
            verdict(&held(&other.record(), "t"), "t", &me),
            Verdict::Conflict(Claim::Conflict {
                owner: other,
                version: 4,
                target: "t".into()
            })
        );
        assert!(matches!(
            verdict(&held(&me.record(), "t/inner"), "t", &me),
            Verdict::Conflict(Claim::Conflict { target, .. }) if target == "t/inner"
        ));
        let Verdict::Conflict(Claim::Conflict { owner, .. }) =
            verdict(&held(b"junk", "t"), "t", &me)
        else {
            panic!("an unreadable record is a conflict");
        };
        assert_eq!((owner.uid.as_str(), owner.name.as_str()), ("junk", ""));
    }

    #[test]
    fn claims_are_kept_per_owner_and_cleared_through_a_handle() {
        let claims = Claims::default();
        let me = owner("u", "a");
        claims.remember("t", &me, 3);
        assert_eq!(claims.version("t", &me), Some(3));
        assert_eq!(claims.version("t", &owner("v", "b")), None);
        claims.clearer()();
        assert_eq!(claims.version("t", &me), None);
    }

    /// Records whose create always finds `held` in the way; a replace always succeeds.
    struct Fake {
        claims: Claims,
        held: Option<Vec<u8>>,
        creates: Mutex<usize>,
    }

    #[async_trait::async_trait]
    impl OwnerRecords for Fake {
        fn claims(&self) -> &Claims {
            &self.claims
        }
        async fn create(&self, target: &str, _: &Owner, _: Option<&[u8]>) -> Result<Created> {
            *self.creates.lock().expect("lock") += 1;
            Ok(Created::Held(self.held.clone().map(|record| Held {
                record,
                version: 4,
                target: target.to_owned(),
            })))
        }
        async fn replace(&self, _: &str, _: &Owner, version: i64) -> Result<Option<i64>> {
            Ok(Some(version + 1))
        }
        async fn write_publication(&self, _: &str, _: &Owner, _: &[u8]) -> Result<bool> {
            Ok(false)
        }
        fn kept_changing(&self, _: &str) -> Error {
            Error::Fenced {
                op: "kept changing",
            }
        }
    }

    fn fake(held: Option<Vec<u8>>) -> Fake {
        Fake {
            claims: Claims::default(),
            held,
            creates: Mutex::new(0),
        }
    }

    #[tokio::test]
    async fn a_claim_whose_record_keeps_vanishing_gives_up_after_three_attempts() {
        let records = fake(None);
        let err = claim(&records, "t", &owner("u", "a")).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Fenced {
                    op: "kept changing"
                }
            ),
            "{err}"
        );
        assert_eq!(*records.creates.lock().unwrap(), CLAIM_ATTEMPTS);
    }

    #[tokio::test]
    async fn a_refreshed_identity_is_taken_over_at_its_version_and_then_claimed_from_the_cache() {
        let records = fake(Some(owner("u", "old").record()));
        let me = owner("u", "new");
        assert_eq!(claim(&records, "t", &me).await.unwrap(), Claim::Owned);
        assert_eq!(records.claims.version("t", &me), Some(5));
        assert_eq!(claim(&records, "t", &me).await.unwrap(), Claim::Owned);
        assert_eq!(
            *records.creates.lock().unwrap(),
            1,
            "the second claim is cached"
        );
    }

    #[tokio::test]
    async fn a_publication_record_refused_by_the_guard_forgets_the_claim_and_is_ownership_lost() {
        let records = fake(None);
        let me = owner("u", "a");
        records.claims.remember("t", &me, 1);
        let err = record_publication(&records, "t", &me, b"x")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::OwnershipLost { .. }), "{err}");
        assert_eq!(records.claims.version("t", &me), None);
    }
}
