//! Per-service metrics: endpoint counts and conditions, by GrpcService.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::crd::CONDITIONS;

/// Labels of per-service gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The GrpcService namespace.
    pub namespace: String,
    /// The GrpcService name.
    pub name: String,
}

/// Labels of the per-service condition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// The GrpcService namespace.
    pub namespace: String,
    /// The GrpcService name.
    pub name: String,
    /// The condition type: one of [`crate::crd::CONDITIONS`].
    pub condition: &'static str,
}

/// `registered_endpoints`, `selected_endpoints`, `ready_endpoints` and `service_condition`.
pub struct Services {
    /// Keys registered per service.
    pub registered_endpoints: Family<ServiceLabels, Gauge>,
    /// Endpoints the source yields per service (selected pods, or the Service's endpoints).
    pub selected_endpoints: Family<ServiceLabels, Gauge>,
    /// Of those, the ones whose readiness signal is on, per service.
    pub ready_endpoints: Family<ServiceLabels, Gauge>,
    /// 1 while the service's condition is True, else 0, per service and condition type, as the
    /// leader last computed it (a follower exports none, so no stale value outlives a failover).
    pub conditions: Family<ConditionLabels, Gauge>,
}

impl Services {
    /// Creates the group and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let group = Self {
            registered_endpoints: Family::default(),
            selected_endpoints: Family::default(),
            ready_endpoints: Family::default(),
            conditions: Family::default(),
        };
        registry.register(
            "registered_endpoints",
            "Keys registered per GrpcService",
            group.registered_endpoints.clone(),
        );
        registry.register(
            "selected_endpoints",
            "Endpoints the source yields (pods the selector matches, or the endpoints of the Service serviceRef names), per GrpcService",
            group.selected_endpoints.clone(),
        );
        registry.register(
            "ready_endpoints",
            "Endpoints from the source whose readiness signal is on (Ready pods, ready EndpointSlice endpoints), per GrpcService",
            group.ready_endpoints.clone(),
        );
        registry.register(
            "service_condition",
            "1 while a GrpcService's condition (Ready, Conflict, InvalidSpec, BackendUnavailable) is True, else 0, as the leader last set it",
            group.conditions.clone(),
        );
        group
    }

    /// Records a service's counts after a sync.
    pub fn observe(
        &self,
        namespace: &str,
        name: &str,
        desired: &crate::desired::Desired,
        registered: usize,
    ) {
        let labels = ServiceLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.registered_endpoints
            .get_or_create(&labels)
            .set(n(registered));
        self.selected_endpoints
            .get_or_create(&labels)
            .set(n(desired.selected));
        self.ready_endpoints
            .get_or_create(&labels)
            .set(n(desired.ready));
    }

    /// Records a service's conditions as its status now has them: 1 for True, 0 otherwise.
    pub fn observe_conditions(&self, namespace: &str, name: &str, conditions: &[Condition]) {
        for condition in CONDITIONS {
            let on = conditions
                .iter()
                .any(|c| c.type_ == condition && c.status == "True");
            self.conditions
                .get_or_create(&ConditionLabels {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    condition,
                })
                .set(i64::from(on));
        }
    }

    /// Drops a deleted service's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let labels = ServiceLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.registered_endpoints.remove(&labels);
        self.selected_endpoints.remove(&labels);
        self.ready_endpoints.remove(&labels);
        for condition in CONDITIONS {
            self.conditions.remove(&ConditionLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                condition,
            });
        }
    }
}
