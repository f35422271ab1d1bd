//! Writes under an owned target, written once: the backend's writes split by the one batching
//! rule ([`super::batch`]), each batch one request guarded by the ownership record (and the
//! leader fence), counted into a report; and the release of a target over the same writes.
//!
//! A backend supplies one primitive ([`GuardedWrites::write`]: a batch as one guarded request)
//! and its limits ([`Scope`]). How it lists and diffs what it holds stays with it.

use tracing::{debug, info};

use super::batch::{Limits, Write, batches};
use super::ownership::OwnerRecords;
use super::{Error, Result, SyncReport};

/// How a guarded request ended.
#[derive(Debug)]
pub(super) enum Written {
    /// Every write applied; the registry's revision (index) after it, when it said.
    Committed(Option<i64>),
    /// The ownership guard failed: nothing applied.
    GuardFailed,
    /// A write of the batch was refused (e.g. a compare-and-swap on an entry that changed under
    /// us): nothing applied.
    Refused(Error),
}

/// A backend's guarded writes (over its ownership records, whose claims a failed guard forgets).
#[async_trait::async_trait]
pub(super) trait GuardedWrites: OwnerRecords {
    /// One write.
    type Op: Write + Send + Sync;
    /// What proves ownership in a request.
    type Guard: Send + Sync;

    /// Writes `batch` in one request under `guard` and the leader fence, named `op`.
    ///
    /// # Errors
    /// Backend failures; [`Error::Fenced`].
    async fn write(
        &self,
        op: &'static str,
        guard: &Self::Guard,
        batch: &[Self::Op],
    ) -> Result<Written>;
}

/// What every request of one sync or release carries, and what bounds it.
#[derive(Debug)]
pub(super) struct Scope<'a, G> {
    /// The target written under.
    pub(super) target: &'a str,
    /// What proves ownership of it in a request.
    pub(super) guard: G,
    /// The backend's bounds on one request.
    pub(super) limits: Limits,
}

/// What the batches written so far did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Progress {
    /// Puts applied.
    pub(super) puts: usize,
    /// Deletes applied.
    pub(super) deletes: usize,
    /// Requests committed.
    pub(super) txns: usize,
    /// The highest revision seen (start it at the listing's).
    pub(super) revision: i64,
    /// Whether the last request committed said no revision (deletes alone, in Consul).
    pub(super) unindexed: bool,
}

impl Progress {
    /// The report of a sync of `target` that wrote these batches: `registered` entries are now
    /// under it, on `lease` where the backend has leases. Logged when anything was written.
    pub(super) fn report(self, target: &str, registered: usize, lease: Option<i64>) -> SyncReport {
        if self.puts + self.deletes > 0 {
            debug!(
                registry_target = target,
                puts = self.puts,
                deletes = self.deletes,
                txns = self.txns,
                revision = self.revision,
                lease_id = lease.map(super::lease_text),
                "synced target"
            );
        }
        SyncReport {
            puts: self.puts,
            deletes: self.deletes,
            txns: self.txns,
            registered,
            revision: self.revision,
            lease,
        }
    }
}

/// Why writing stopped before the last batch.
#[derive(Debug)]
enum Stop {
    /// The ownership guard failed.
    GuardFailed,
    /// A write was refused.
    Refused(Error),
}

/// Writes `ops` in order, in batches within `scope`, counting into `progress`. Stops at the
/// first batch that does not commit, saying why.
///
/// # Errors
/// [`super::SpecError::TooLarge`] (as [`Error::Spec`]) before anything is written, for a write
/// over the backend's bound; backend failures; [`Error::Fenced`].
async fn write_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    op: &'static str,
    scope: &Scope<'_, W::Guard>,
    ops: &[W::Op],
    progress: &mut Progress,
) -> Result<Option<Stop>> {
    for batch in batches(ops, scope.limits)? {
        match writes.write(op, &scope.guard, batch).await? {
            Written::Committed(revision) => {
                progress.txns += 1;
                let deletes = batch.iter().filter(|op| op.deletes()).count();
                progress.deletes += deletes;
                progress.puts += batch.len() - deletes;
                progress.unindexed = revision.is_none();
                progress.revision = progress.revision.max(revision.unwrap_or(0));
            }
            Written::GuardFailed => return Ok(Some(Stop::GuardFailed)),
            Written::Refused(error) => return Ok(Some(Stop::Refused(error))),
        }
    }
    Ok(None)
}

/// Writes `ops` for a sync: a failed ownership guard forgets the claim and is
/// [`Error::OwnershipLost`]. Returns the refusal of a write, for the caller to retry or report.
///
/// # Errors
/// [`Error::OwnershipLost`]; as [`write_batches`].
pub(super) async fn sync_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    scope: &Scope<'_, W::Guard>,
    ops: &[W::Op],
    progress: &mut Progress,
) -> Result<Option<Error>> {
    let stop = write_batches(writes, "write registry batch", scope, ops, progress).await?;
    match stop {
        None => Ok(None),
        Some(Stop::Refused(error)) => Ok(Some(error)),
        Some(Stop::GuardFailed) => {
            writes.claims().forget(scope.target);
            Err(Error::OwnershipLost {
                target: scope.target.to_owned(),
            })
        }
    }
}

/// Deletes what an owner holds under the scope's target: `ops` is the deletes of its `entries`
/// entries, then of its records (the ownership record last). When the guard fails (the record
/// names someone else, or is gone), stops there. Returns how many entries were deleted.
///
/// # Errors
/// A refused write; backend failures; [`Error::Fenced`].
pub(super) async fn release_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    scope: &Scope<'_, W::Guard>,
    ops: &[W::Op],
    entries: usize,
) -> Result<usize> {
    let mut progress = Progress::default();
    let stop = write_batches(writes, "release target", scope, ops, &mut progress).await?;
    if let Some(Stop::Refused(error)) = stop {
        return Err(error);
    }
    writes.claims().forget(scope.target);
    let deleted = (progress.puts + progress.deletes).min(entries);
    if stop.is_none() {
        info!(registry_target = scope.target, deleted, "released target");
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::registry::Owner;
    use crate::registry::ownership::{Claims, Created};

    /// A put (`false`) or a delete (`true`) of one byte.
    #[derive(Clone, Debug)]
    struct Op(bool);

    impl Write for Op {
        fn bytes(&self) -> usize {
            1
        }
        fn key(&self) -> String {
            "k".to_owned()
        }
        fn deletes(&self) -> bool {
            self.0
        }
    }

    /// Commits batches until `fail_at` (by batch number), then answers `failure`.
    struct Fake {
        claims: Claims,
        batches: Mutex<usize>,
        fail_at: usize,
        refuse: bool,
    }

    #[async_trait::async_trait]
    impl OwnerRecords for Fake {
        fn claims(&self) -> &Claims {
            &self.claims
        }
        async fn create(&self, _: &str, _: &Owner, _: Option<&[u8]>) -> Result<Created> {
            unreachable!("no claim here")
        }
        async fn replace(&self, _: &str, _: &Owner, _: i64) -> Result<Option<i64>> {
            unreachable!("no claim here")
        }
        async fn write_publication(&self, _: &str, _: &Owner, _: &[u8]) -> Result<bool> {
            unreachable!("no claim here")
        }
        fn kept_changing(&self, target: &str) -> Error {
            Error::OwnershipLost {
                target: target.to_owned(),
            }
        }
    }

    #[async_trait::async_trait]
    impl GuardedWrites for Fake {
        type Op = Op;
        type Guard = ();

        async fn write(&self, _: &'static str, (): &(), _: &[Op]) -> Result<Written> {
            let mut batches = self.batches.lock().expect("lock");
            *batches += 1;
            Ok(match *batches {
                n if n < self.fail_at => Written::Committed(i64::try_from(n).ok()),
                _ if self.refuse => Written::Refused(Error::Fenced { op: "refused" }),
                _ => Written::GuardFailed,
            })
        }
    }

    fn fake(fail_at: usize, refuse: bool) -> Fake {
        let claims = Claims::default();
        claims.remember("t", &owner(), 1);
        Fake {
            claims,
            batches: Mutex::new(0),
            fail_at,
            refuse,
        }
    }

    fn owner() -> Owner {
        Owner {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "n".into(),
        }
    }

    fn scope() -> Scope<'static, ()> {
        Scope {
            target: "t",
            guard: (),
            limits: Limits {
                ops: 2,
                bytes: 100,
                op_bytes: None,
            },
        }
    }

    #[tokio::test]
    async fn a_sync_counts_what_each_committed_batch_wrote() {
        let writes = fake(usize::MAX, false);
        let ops = [Op(false), Op(false), Op(true)];
        let mut progress = Progress::default();
        let refused = sync_batches(&writes, &scope(), &ops, &mut progress).await;
        assert!(refused.unwrap().is_none());
        let report = progress.report("t", 2, None);
        assert_eq!((report.puts, report.deletes, report.txns), (2, 1, 2));
        assert_eq!(report.revision, 2, "the highest revision a batch said");
    }

    #[tokio::test]
    async fn a_failed_ownership_guard_stops_a_sync_forgets_the_claim_and_is_ownership_lost() {
        let writes = fake(2, false);
        let ops = [Op(false), Op(false), Op(false)];
        let mut progress = Progress::default();
        let lost = sync_batches(&writes, &scope(), &ops, &mut progress).await;
        assert!(matches!(lost, Err(Error::OwnershipLost { target }) if target == "t"));
        assert_eq!(progress.puts, 2, "the first batch stands");
        assert_eq!(writes.claims.version("t", &owner()), None);
    }

    #[tokio::test]
    async fn a_refused_write_is_handed_back_to_the_sync_and_the_claim_kept() {
        let writes = fake(1, true);
        let mut progress = Progress::default();
        let refused = sync_batches(&writes, &scope(), &[Op(false)], &mut progress).await;
        assert!(matches!(refused, Ok(Some(Error::Fenced { .. }))));
        assert_eq!(writes.claims.version("t", &owner()), Some(1));
    }

    #[tokio::test]
    async fn a_release_counts_entries_not_records_and_stops_where_the_guard_fails() {
        let ops = [Op(true), Op(true), Op(true), Op(true)];
        let all = release_batches(&fake(usize::MAX, false), &scope(), &ops, 2).await;
        assert_eq!(all.unwrap(), 2, "two entries, then two records");
        let writes = fake(2, false);
        let partial = release_batches(&writes, &scope(), &ops, 3).await;
        assert_eq!(
            partial.unwrap(),
            2,
            "one batch of two entries, then the guard failed"
        );
        assert_eq!(writes.claims.version("t", &owner()), None);
    }
}
