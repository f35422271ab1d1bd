//! Releases what the registry holds for GrpcServices that no longer exist.
//!
//! A new service's finalizer is added behind its first registry write (the registry first), so
//! a service deleted in between is gone without a cleanup. So is one whose controller crashed
//! in that window. The ownership records say what every service claimed: a record whose
//! GrpcService (by uid) no longer exists is released, keys and record alike. Only records of
//! this controller's scope are considered (its registry root or cluster, and the namespace it
//! watches), and only while this replica may write.

use std::collections::HashSet;

use tracing::{info, warn};

use super::Scope;
use crate::registry::{Backend, Owner};

/// Releases every target whose recorded owner is in `scope` and is not `live`, or, with
/// `only`, every target of that uid. Returns how many targets were released.
pub async fn sweep(
    backend: &dyn Backend,
    scope: &Scope,
    live: impl Fn(&Owner) -> bool,
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
            None => in_scope(&owner) && !live(&owner),
        };
        if !orphan || !seen.insert(target.clone()) {
            continue;
        }
        match backend.release(&target, &owner).await {
            Ok(deleted) => {
                released += 1;
                info!(
                    target,
                    deleted,
                    namespace = owner.namespace,
                    name = owner.name,
                    "released the target of a GrpcService that no longer exists"
                );
            }
            Err(e) => {
                warn!(target, error = %e, "failed to release an orphaned target; retried later")
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
    use crate::desired::{KeyTemplate, Layout, LogicalEndpoint};
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
                layout: Layout {
                    target: target.into(),
                    template: KeyTemplate::parse("{target}/{addr}").unwrap(),
                    format: tonic_etcd_resolver::format::ValueFormat::EtcdNaming,
                    namespace: "a".into(),
                    name: "s".into(),
                },
                owner: owner.clone(),
                ttl: Duration::from_secs(30),
                endpoints: Arc::new(vec![endpoint]),
                tags: vec![],
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
        let released = sweep(&backend, &scope, |o| o.uid == "live", None).await;
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

    #[tokio::test]
    async fn one_deleted_uid_releases_exactly_its_targets() {
        let backend = MemoryBackend::default();
        publish(&backend, "services/a/one", &owner("u1", "a")).await;
        publish(&backend, "services/a/two", &owner("u2", "a")).await;
        let released = sweep(&backend, &Scope::default(), |_| true, Some("u1")).await;
        assert_eq!(released, 1);
        assert!(backend.owner("services/a/one").is_none());
        assert!(backend.owner("services/a/two").is_some());
    }
}
