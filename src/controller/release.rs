//! The services waiting in `Conflict` for a target, woken as soon as it is released.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;

use crate::crd::GrpcService;

/// The services waiting in `Conflict`, by the target holding them off: releasing that target
/// wakes them at once (the periodic re-check covers releases made elsewhere).
#[derive(Debug)]
pub(super) struct Waiting {
    /// Target → the services waiting for it.
    by_target: Mutex<HashMap<String, HashSet<ObjectRef<GrpcService>>>>,
    /// Where woken services go: the controller reconciles them.
    freed: tokio::sync::mpsc::UnboundedSender<ObjectRef<GrpcService>>,
}

impl Waiting {
    /// Nobody waiting; woken services are sent to `freed`.
    pub(super) fn new(freed: tokio::sync::mpsc::UnboundedSender<ObjectRef<GrpcService>>) -> Self {
        Self {
            by_target: Mutex::default(),
            freed,
        }
    }

    /// Notes that `service` waits for `target` to be released.
    pub(super) fn wait_for_release(&self, target: &str, service: ObjectRef<GrpcService>) {
        self.by_target
            .lock()
            .expect("lock")
            .entry(target.to_owned())
            .or_default()
            .insert(service);
    }

    /// Forgets whatever `service` waited for (it owns its target now, or is gone).
    pub(super) fn stop_waiting(&self, service: &ObjectRef<GrpcService>) {
        let mut waiting = self.by_target.lock().expect("lock");
        for services in waiting.values_mut() {
            services.remove(service);
        }
        waiting.retain(|_, services| !services.is_empty());
    }

    /// Whether `service` waits for a target to be released (it met a conflict).
    pub(super) fn is_waiting(&self, service: &ObjectRef<GrpcService>) -> bool {
        let waiting = self.by_target.lock().expect("lock");
        waiting.values().any(|services| services.contains(service))
    }

    /// `target` was released: the services waiting for it are reconciled now.
    pub(super) fn released(&self, target: &str) {
        let woken = self.by_target.lock().expect("lock").remove(target);
        for service in woken.into_iter().flatten() {
            let _ = self.freed.send(service);
        }
    }
}
