//! What the registry must hold, computed from the API server's objects by the soak's own simple
//! rules, not by the controller's `desired()` or its renderers.
//!
//! The rules cover only what the workload creates: `matchLabels` selectors and `serviceRef`s
//! to Services with a `matchLabels`-style selector, a container port named `grpc`, formats
//! `EtcdNaming`, `Address` and `Kratos` with their default key layouts, default or custom
//! targets (the soak namespace may use custom targets), and two kinds of invalid edit: a
//! `keyTemplate` (the workload only writes one that names nothing of the endpoint) and a target
//! under another namespace's default prefix. An invalid service keeps publishing its last valid
//! spec, evaluated against the pods as they are now.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::DynamicObject;
use serde_json::Value;

/// One key the registry must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The GrpcService it belongs to.
    pub service: String,
    /// What its value must contain (the address in the format's own shape).
    pub value_has: String,
}

/// The registry as the oracle wants it: key -> expectation; and how many keys each service
/// should report as registered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub keys: BTreeMap<String, Expect>,
    pub counts: BTreeMap<String, usize>,
    /// Services whose current spec is invalid (they publish their last valid one).
    pub invalid: std::collections::BTreeSet<String>,
}

pub struct Oracle {
    ns: String,
    /// The last spec of each GrpcService (by uid) that these rules call valid.
    last_valid: HashMap<String, Value>,
}

impl Oracle {
    pub fn new(ns: &str) -> Self {
        Self {
            ns: ns.to_owned(),
            last_valid: HashMap::new(),
        }
    }

    /// Whether the soak's rules accept `spec` (see the module's doc for the two invalid kinds).
    fn valid(&self, spec: &Value) -> bool {
        if !spec["keyTemplate"].is_null() {
            return false;
        }
        match spec["target"].as_str() {
            None => true,
            Some(t) => {
                t.starts_with(&format!("services/{}/", self.ns))
                    || !(t == "services"
                        || t.starts_with("services/")
                        || t.starts_with("grpc-registrar"))
            }
        }
    }

    pub fn compute(&mut self, services: &[DynamicObject], pods: &[Pod], k8s: &[Service]) -> Want {
        let mut want = Want::default();
        for svc in services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let uid = svc.metadata.uid.clone().unwrap_or_default();
            let spec = &svc.data["spec"];
            if self.valid(spec) {
                self.last_valid.insert(uid.clone(), spec.clone());
            } else {
                want.invalid.insert(name.clone());
            }
            if svc.metadata.deletion_timestamp.is_some() {
                continue; // being deleted: its keys may go
            }
            let Some(spec) = self.last_valid.get(&uid) else {
                continue; // never valid: publishes nothing
            };
            let target = spec["target"]
                .as_str()
                .map_or_else(|| format!("services/{}/{name}", self.ns), str::to_owned);
            let selector = match spec["serviceRef"]["name"].as_str() {
                Some(service) => k8s
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(service))
                    .and_then(|s| s.spec.as_ref()?.selector.clone()),
                None => serde_json::from_value(spec["selector"]["matchLabels"].clone()).ok(),
            };
            let Some(selector) = selector else { continue };
            let format = spec["format"].as_str().unwrap_or("EtcdNaming");
            let mut count = 0;
            for pod in pods.iter().filter(|p| selects(&selector, p)) {
                let Some(addr) = registrable(pod) else {
                    continue;
                };
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let (key, value_has) = match format {
                    "Kratos" => (format!("{target}/{pod_name}"), format!("\"grpc://{addr}\"")),
                    "Address" => (format!("{target}/{addr}"), addr.clone()),
                    _ => (format!("{target}/{addr}"), format!("\"Addr\":\"{addr}\"")),
                };
                count += 1;
                want.keys.insert(
                    key,
                    Expect {
                        service: name.clone(),
                        value_has,
                    },
                );
            }
            want.counts.insert(name, count);
        }
        want
    }
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `ip:port` of a pod a registry must list: Running, Ready, an IP, a `grpc` port, not deleted.
fn registrable(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if status.phase.as_deref() != Some("Running") || !ready {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))?
        .container_port;
    Some(format!("{ip}:{port}"))
}
