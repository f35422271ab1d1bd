//! The last valid publication of each service, recorded in the registry so that it outlives a
//! process (DESIGN §5: nothing that must survive a restart lives only in memory).
//!
//! After every successful sync of a valid spec the registry holds a record of that spec and the
//! target it was published under. When the spec later turns invalid, any replica (this one
//! after a restart, or a new leader) rebuilds the plan from the record and keeps following
//! readiness under it until the spec is fixed. The record is written only when it changes; the
//! copy kept here is a cache of what the registry holds, filled from it after a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::crd::{GrpcService, GrpcServiceSpec};
use crate::desired::{Plan, Policy};
use crate::registry::{self, Backend, Owner, Placement, Planner};

/// What the registry records of a service's last valid publication.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The target published under (what the spec resolved to then).
    pub target: String,
    /// The valid spec.
    pub spec: GrpcServiceSpec,
}

impl Record {
    /// The record of `svc`'s current spec, published under `target`.
    #[must_use]
    pub fn of(svc: &GrpcService, target: &str) -> Self {
        Self {
            target: target.to_owned(),
            spec: svc.spec.clone(),
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
    ) -> Option<(Plan, Arc<dyn Placement>)> {
        let mut old = svc.clone();
        old.spec = self.spec.clone();
        let (plan, placement) = planner.keeping(&old, policy, self.target.clone()).ok()?;
        (placement.target() == self.target).then_some((plan, placement))
    }

    /// The spec recorded, as a service with `svc`'s identity (for its TTL and the like).
    #[must_use]
    pub fn service(&self, svc: &GrpcService) -> GrpcService {
        let mut old = svc.clone();
        old.spec = self.spec.clone();
        old
    }
}

/// The records this process knows the registry holds, by owner uid.
#[derive(Default)]
pub struct Records {
    known: Mutex<HashMap<String, Vec<u8>>>,
}

impl Records {
    /// Makes the registry's record of `owner` equal `record`: nothing when it already is (known
    /// here, or read from the registry after a restart), else one guarded write.
    ///
    /// # Errors
    /// Registry failures; [`registry::Error::OwnershipLost`].
    pub async fn keep(
        &self,
        backend: &dyn Backend,
        owner: &Owner,
        record: &Record,
    ) -> Result<(), registry::Error> {
        let bytes = record.bytes();
        let known = self.known.lock().expect("lock").get(&owner.uid).cloned();
        let stored = match known {
            Some(known) => Some(known),
            None => backend.publication_record(&owner.uid).await?,
        };
        if stored.as_deref() != Some(bytes.as_slice()) {
            backend
                .record_publication(&record.target, owner, &bytes)
                .await?;
        }
        self.known
            .lock()
            .expect("lock")
            .insert(owner.uid.clone(), bytes);
        Ok(())
    }

    /// The last valid publication of the owner `uid`: known here, or read from the registry.
    ///
    /// # Errors
    /// Registry failures.
    pub async fn last(
        &self,
        backend: &dyn Backend,
        uid: &str,
    ) -> Result<Option<Record>, registry::Error> {
        let known = self.known.lock().expect("lock").get(uid).cloned();
        let bytes = match known {
            Some(bytes) => Some(bytes),
            None => backend.publication_record(uid).await?,
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record = serde_json::from_slice::<Record>(&bytes).ok();
        if record.is_some() {
            self.known
                .lock()
                .expect("lock")
                .insert(uid.to_owned(), bytes);
        }
        Ok(record)
    }

    /// Forgets `uid` (its service was deleted and released, which deleted the record too).
    pub fn forget(&self, uid: &str) {
        self.known.lock().expect("lock").remove(uid);
    }
}
