//! Releases what the registry holds for GrpcServices that no longer exist.
//!
//! A new service's finalizer is added behind its first registry write (the registry first), so
//! a service deleted in between is gone without a cleanup. The ownership records say what every
//! service claimed: the records of a GrpcService seen deleted without its finalizer are
//! released, keys and record alike, and so are records whose namespace and name now belong to
//! another GrpcService (a uid recreated under the same name). A record naming a GrpcService this
//! cluster does not know is left alone: it may be another cluster's (two unnamed controllers
//! sharing a registry, which the one-writer-per-scope check reports), and releasing it would
//! delete that cluster's keys. Only records of this controller's scope are considered (its
//! registry root or cluster, and the namespace it watches), and only while this replica may
//! write.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector;
use tracing::{info, warn};

use super::{Context, RESYNC, Scope};
use crate::crd::GrpcService;
use crate::leader::Role;
use crate::registry::{Backend, Owner};

/// How long a service seen deleted is remembered (and its records swept again).
const GONE_FOR: Duration = Duration::from_secs(3600);

/// When a gone service's records are swept a second time: after any reconcile of it that was
/// under way when it went (one that read the object before the deletion) has ended.
const SWEEP_AGAIN: Duration = Duration::from_secs(10);

/// The uids of services seen deleted without our finalizer, with when they were seen gone.
#[derive(Debug, Default)]
pub struct Gone(Mutex<HashMap<String, Instant>>);

impl Gone {
    /// Notes `uid` as gone.
    pub fn insert(&self, uid: &str) {
        self.0
            .lock()
            .expect("lock")
            .insert(uid.to_owned(), Instant::now());
    }

    /// Whether `uid` was seen gone.
    #[must_use]
    pub fn contains(&self, uid: &str) -> bool {
        self.0.lock().expect("lock").contains_key(uid)
    }

    /// Forgets what went longer than [`GONE_FOR`] ago, and returns the rest.
    fn recent(&self) -> HashMap<String, Instant> {
        let mut gone = self.0.lock().expect("lock");
        gone.retain(|_, at| at.elapsed() < GONE_FOR);
        gone.clone()
    }
}

/// Whether a record's `owner` is an orphan: a GrpcService seen `deleted`, or one whose namespace
/// and name now belong to another uid in `live` (namespace and name → uid). An owner this
/// cluster does not know at all is not: it may be another cluster's.
#[must_use]
pub fn orphaned<T>(
    owner: &Owner,
    deleted: &HashMap<String, T>,
    live: &HashMap<(String, String), String>,
) -> bool {
    deleted.contains_key(&owner.uid)
        || live
            .get(&(owner.namespace.clone(), owner.name.clone()))
            .is_some_and(|uid| *uid != owner.uid)
}

/// Releases every target whose recorded owner is in `scope` and an `orphan`, or, with `only`,
/// every target of that uid. Returns how many targets were released.
pub async fn sweep(
    backend: &dyn Backend,
    scope: &Scope,
    orphan: impl Fn(&Owner) -> bool,
    only: Option<&str>,
) -> usize {
    if !backend.may_write() {
        return 0;
    }
    let owners = match backend.owners().await {
        Ok(owners) => owners,
        Err(e) => {
            warn!(error = %e, "failed to list ownership records for the sweep; retried later");
            return 0;
        }
    };
    let in_scope = |owner: &Owner| {
        !owner.uid.is_empty()
            && scope
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == owner.namespace)
    };
    let mut released = 0;
    let mut seen = HashSet::new();
    for (target, owner) in owners {
        let orphan = match only {
            Some(uid) => owner.uid == uid,
            None => in_scope(&owner) && orphan(&owner),
        };
        if !orphan || !seen.insert(target.clone()) {
            continue;
        }
        match backend.release(&target, &owner).await {
            Ok(deleted) => {
                released += 1;
                info!(
                    registry_target = target,
                    deleted,
                    namespace = owner.namespace,
                    name = owner.name,
                    "released the target of a GrpcService that no longer exists"
                );
            }
            Err(e) => {
                warn!(registry_target = target, error = %e, "failed to release an orphaned target; retried later")
            }
        }
    }
    released
}

/// Runs the owner-record sweep (see the module): for each service deleted without our finalizer
/// as it goes, and over every record once the caches are synced, on becoming the leader, and
/// every [`RESYNC`].
pub(super) async fn sweeper(
    ctx: Arc<Context>,
    store: reflector::Store<GrpcService>,
    scope: Scope,
    mut synced: tokio::sync::watch::Receiver<bool>,
    mut gone: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut role = ctx.role.clone();
    // Without leader election the role never changes (its sender is gone).
    let mut elected = true;
    let mut every = tokio::time::interval(RESYNC);
    // Services seen deleted without our finalizer are swept at once, again after SWEEP_AGAIN
    // (a reconcile that read the object before it went may have published it meanwhile), and
    // by the periodic sweep for GONE_FOR.
    let mut again: VecDeque<(tokio::time::Instant, String)> = VecDeque::new();
    loop {
        let next_again = again.front().map(|(at, _)| *at);
        tokio::select! {
            uid = gone.recv() => {
                let Some(uid) = uid else { return };
                ctx.gone.insert(&uid);
                ctx.forget_service(&uid, None);
                sweep(ctx.backend.as_ref(), &scope, |_| false, Some(&uid)).await;
                again.push_back((tokio::time::Instant::now() + SWEEP_AGAIN, uid));
            }
            () = tokio::time::sleep_until(next_again.unwrap_or_else(tokio::time::Instant::now)), if next_again.is_some() => {
                if let Some((_, uid)) = again.pop_front() {
                    sweep(ctx.backend.as_ref(), &scope, |_| false, Some(&uid)).await;
                }
            }
            changed = role.changed(), if elected => {
                if changed.is_err() {
                    elected = false;
                    continue;
                }
                // Another leader may have written status meanwhile: the objects' own statuses
                // are the truth again.
                ctx.writer.clear();
                if matches!(*role.borrow_and_update(), Role::Leader { .. }) {
                    sweep_all(&ctx, &store, &scope, &ctx.gone.recent()).await;
                }
            }
            _ = every.tick() => {
                sweep_all(&ctx, &store, &scope, &ctx.gone.recent()).await;
            }
        }
    }
}

/// Sweeps every record of this controller's scope: those of services seen `deleted`, and those
/// whose namespace and name now belong to another GrpcService.
async fn sweep_all(
    ctx: &Context,
    store: &reflector::Store<GrpcService>,
    scope: &Scope,
    deleted: &HashMap<String, Instant>,
) {
    // The records first, then the live set: a record written for a service the store did not
    // yet hold cannot exist (reconciles are driven from the store).
    let names = std::sync::OnceLock::new();
    let orphan = |owner: &Owner| {
        let live = names.get_or_init(|| {
            store
                .state()
                .iter()
                .filter_map(|svc| Some(((svc.namespace()?, svc.name_any()), svc.uid()?)))
                .collect::<HashMap<(String, String), String>>()
        });
        orphaned(owner, deleted, live)
    };
    let released = sweep(ctx.backend.as_ref(), scope, orphan, None).await;
    if released > 0 {
        info!(
            released,
            "released the targets of GrpcServices that no longer exist"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::desired::LogicalEndpoint;
    use crate::registry::Publication;
    use crate::registry::memory::MemoryBackend;

    fn owner(uid: &str, namespace: &str) -> Owner {
        Owner {
            uid: uid.into(),
            namespace: namespace.into(),
            name: uid.into(),
        }
    }

    async fn publish(backend: &MemoryBackend, target: &str, owner: &Owner) {
        backend.claim(target, owner).await.unwrap();
        let endpoint = LogicalEndpoint {
            id: "p".into(),
            ip: "10.0.0.1".parse().unwrap(),
            port: 50051,
            node: None,
            metadata: BTreeMap::new(),
        };
        backend
            .sync(
                &Publication::new(
                    MemoryBackend::placement(target),
                    owner.clone(),
                    Duration::from_secs(30),
                    vec![endpoint],
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn only_records_of_deleted_services_in_scope_are_released() {
        let backend = MemoryBackend::default();
        let live = owner("live", "a");
        let gone = owner("gone", "a");
        let elsewhere = owner("other-ns", "b");
        publish(&backend, "services/a/live", &live).await;
        publish(&backend, "services/a/gone", &gone).await;
        publish(&backend, "services/b/x", &elsewhere).await;
        let scope = Scope {
            namespace: Some("a".into()),
        };
        let released = sweep(&backend, &scope, |o| o.uid != "live", None).await;
        assert_eq!(released, 1);
        assert!(backend.owner("services/a/gone").is_none());
        assert!(backend.entries("services/a/gone").is_empty());
        assert_eq!(backend.owner("services/a/live"), Some(live));
        assert_eq!(
            backend.owner("services/b/x"),
            Some(elsewhere),
            "another namespace's record is not this controller's to judge"
        );
    }

    #[test]
    fn only_deleted_or_replaced_owners_are_orphans_and_unknown_ones_are_left_to_their_cluster() {
        let deleted: HashMap<String, ()> = HashMap::from([("gone".to_owned(), ())]);
        let live = HashMap::from([
            (("a".to_owned(), "kept".to_owned()), "kept".to_owned()),
            (
                ("a".to_owned(), "recreated".to_owned()),
                "new-uid".to_owned(),
            ),
        ]);
        let mut who = owner("gone", "a");
        assert!(orphaned(&who, &deleted, &live), "seen deleted");
        who = owner("kept", "a");
        assert!(!orphaned(&who, &deleted, &live), "alive");
        who = Owner {
            uid: "old-uid".into(),
            namespace: "a".into(),
            name: "recreated".into(),
        };
        assert!(
            orphaned(&who, &deleted, &live),
            "its name is another uid's now"
        );
        who = owner("elsewhere", "a");
        assert!(
            !orphaned(&who, &deleted, &live),
            "unknown here: perhaps another cluster's"
        );
    }

    #[tokio::test]
    async fn one_deleted_uid_releases_exactly_its_targets() {
        let backend = MemoryBackend::default();
        publish(&backend, "services/a/one", &owner("u1", "a")).await;
        publish(&backend, "services/a/two", &owner("u2", "a")).await;
        let released = sweep(&backend, &Scope::default(), |_| false, Some("u1")).await;
        assert_eq!(released, 1);
        assert!(backend.owner("services/a/one").is_none());
        assert!(backend.owner("services/a/two").is_some());
    }
}
