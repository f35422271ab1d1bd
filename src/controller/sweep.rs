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

use std::collections::{HashMap, HashSet};

use tracing::{info, warn};

use super::Scope;
use crate::registry::{Backend, Owner};

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
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
            .sync(&Publication {
                placement: MemoryBackend::placement(target),
                owner: owner.clone(),
                ttl: Duration::from_secs(30),
                endpoints: Arc::new(vec![endpoint]),
            })
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
