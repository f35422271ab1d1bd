//! Writes under an owned target, written once: the backend's writes split by the one batching
//! rule ([`super::batch`]), each batch one request guarded by the ownership record (and the
//! leader fence), counted into a report; and the release of a target over the same writes.
//!
//! A backend supplies one primitive ([`GuardedWrites::write`]: a batch as one guarded request)
//! and its limits. How it lists and diffs what it holds stays with it.

use tracing::info;

use super::batch::{Limits, Write, batches};
use super::ownership::Claims;
use super::{Error, Result};

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

/// A backend's guarded writes.
#[async_trait::async_trait]
pub(super) trait GuardedWrites: Send + Sync {
    /// One write.
    type Op: Write + Send + Sync;
    /// What proves ownership in a request.
    type Guard: Send + Sync;

    /// The bounds on one request.
    fn limits(&self) -> Limits;

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

/// Why writing stopped before the last batch.
#[derive(Debug)]
pub(super) enum Stop {
    /// The ownership guard failed.
    GuardFailed,
    /// A write was refused.
    Refused(Error),
}

/// Writes `ops` in order, in batches under `guard`, counting into `progress`. Stops at the
/// first batch that does not commit, saying why.
///
/// # Errors
/// [`super::SpecError::TooLarge`] (as [`Error::Spec`]) before anything is written, for a write
/// over the backend's bound; backend failures; [`Error::Fenced`].
pub(super) async fn write_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    op: &'static str,
    guard: &W::Guard,
    ops: &[W::Op],
    progress: &mut Progress,
) -> Result<Option<Stop>> {
    for batch in batches(ops, writes.limits())? {
        match writes.write(op, guard, batch).await? {
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

/// Writes `ops` for a sync of `target`: a failed ownership guard forgets the claim and is
/// [`Error::OwnershipLost`]. Returns the refusal of a write, for the caller to retry or report.
///
/// # Errors
/// [`Error::OwnershipLost`]; as [`write_batches`].
pub(super) async fn sync_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    claims: &Claims,
    target: &str,
    guard: &W::Guard,
    ops: &[W::Op],
    progress: &mut Progress,
) -> Result<Option<Error>> {
    match write_batches(writes, "write registry batch", guard, ops, progress).await? {
        None => Ok(None),
        Some(Stop::Refused(error)) => Ok(Some(error)),
        Some(Stop::GuardFailed) => {
            claims.forget(target);
            Err(Error::OwnershipLost {
                target: target.to_owned(),
            })
        }
    }
}

/// Deletes what `owner` holds under `target`: `ops` is the deletes of its `entries` entries,
/// then of its records (the ownership record last), in batches under `guard`. When the guard
/// fails (the record names someone else, or is gone), stops there. Returns how many entries were
/// deleted.
///
/// # Errors
/// A refused write; backend failures; [`Error::Fenced`].
pub(super) async fn release_batches<W: GuardedWrites + ?Sized>(
    writes: &W,
    claims: &Claims,
    target: &str,
    guard: &W::Guard,
    ops: &[W::Op],
    entries: usize,
) -> Result<usize> {
    let mut progress = Progress::default();
    let stop = write_batches(writes, "release target", guard, ops, &mut progress).await?;
    if let Some(Stop::Refused(error)) = stop {
        return Err(error);
    }
    claims.forget(target);
    let deleted = (progress.puts + progress.deletes).min(entries);
    if stop.is_none() {
        info!(registry_target = target, deleted, "released target");
    }
    Ok(deleted)
}
