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
//!
//! A controller can only keep a valid spec it saw, or one a replica recorded: when the last valid
//! spec's whole life fell in faults (no calm stretch in which a leader could have seen and
//! recorded it), the spec before it is an allowed alternative for as long as the spec stays
//! invalid.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    pub invalid: BTreeSet<String>,
    /// For an invalid service whose last valid spec may never have been seen or recorded, the
    /// keys of the valid spec before it: allowed instead of its `keys`.
    pub alternatives: BTreeMap<String, BTreeMap<String, Expect>>,
    /// The parts keys are made of, each true now: a service's placement (`P`, service, target)
    /// and its registrable members (`M`, service, address or pod name). A controller's view
    /// is one view per resource, each up to some lag old: a key whose parts were each true at
    /// some time in that lag may be written even if the whole key never was wanted (a pod
    /// that turned unready, then the service moved).
    pub parts: BTreeSet<String>,
}

/// The part naming `service`'s placement under `target`.
pub fn placement(service: &str, target: &str) -> String {
    format!("P\t{service}\t{target}")
}

/// The part naming `suffix` (an address or a pod name) a registrable member of `service`.
pub fn member(service: &str, suffix: &str) -> String {
    format!("M\t{service}\t{suffix}")
}

impl Want {
    /// Every key a writer may put now: the wanted ones and the alternatives.
    pub fn allowed(&self) -> impl Iterator<Item = &String> {
        self.keys
            .keys()
            .chain(self.alternatives.values().flat_map(BTreeMap::keys))
    }
}

/// A valid spec and the span it was the last valid one: from when it was first seen, to when
/// the spec turned invalid (`None`: still current or still the last valid one).
#[derive(Clone)]
struct Valid {
    spec: Value,
    since: f64,
    until: Option<f64>,
}

pub struct Oracle {
    ns: String,
    /// The last spec of each GrpcService (by uid) that these rules call valid.
    last_valid: HashMap<String, Valid>,
    /// The valid spec before it.
    previous: HashMap<String, Valid>,
}

impl Oracle {
    pub fn new(ns: &str) -> Self {
        Self {
            ns: ns.to_owned(),
            last_valid: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// Notes `spec` of `uid` seen at `now`.
    fn observe(&mut self, uid: &str, spec: &Value, now: f64) -> bool {
        if !self.valid(spec) {
            if let Some(last) = self.last_valid.get_mut(uid) {
                last.until.get_or_insert(now);
            }
            return false;
        }
        match self.last_valid.get_mut(uid) {
            Some(last) if last.spec == *spec => last.until = None,
            _ => {
                let next = Valid {
                    spec: spec.clone(),
                    since: now,
                    until: None,
                };
                if let Some(last) = self.last_valid.insert(uid.to_owned(), next) {
                    self.previous.insert(uid.to_owned(), last);
                }
            }
        }
        true
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

    /// What the registry must hold now (`now` on the soak's clock); `calm(from, to)` says
    /// whether a leader could have seen and recorded a spec that was current from `from` to
    /// `to`.
    pub fn compute(
        &mut self,
        services: &[DynamicObject],
        pods: &[Pod],
        k8s: &[Service],
        now: f64,
        calm: impl Fn(f64, f64) -> bool,
    ) -> Want {
        let mut want = Want::default();
        for svc in services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let uid = svc.metadata.uid.clone().unwrap_or_default();
            if !self.observe(&uid, &svc.data["spec"], now) {
                want.invalid.insert(name.clone());
            }
            if svc.metadata.deletion_timestamp.is_some() {
                continue; // being deleted: its keys may go
            }
            let Some(last) = self.last_valid.get(&uid) else {
                continue; // never valid: publishes nothing
            };
            if let (Some(until), Some(previous)) = (last.until, self.previous.get(&uid))
                && !calm(last.since, until)
            {
                let (keys, _) = self.keys(&name, &previous.spec, pods, k8s, &mut want.parts);
                want.alternatives.insert(name.clone(), keys);
            }
            let (keys, count) = self.keys(&name, &last.spec, pods, k8s, &mut want.parts);
            want.keys.extend(keys);
            if let Some(count) = count {
                want.counts.insert(name, count);
            }
        }
        want
    }

    /// The keys `spec` of service `name` publishes for `pods`, and how many (`None`: its source
    /// names nothing); adds their `parts`.
    fn keys(
        &self,
        name: &str,
        spec: &Value,
        pods: &[Pod],
        k8s: &[Service],
        parts: &mut BTreeSet<String>,
    ) -> (BTreeMap<String, Expect>, Option<usize>) {
        let mut keys = BTreeMap::new();
        let target = spec["target"]
            .as_str()
            .map_or_else(|| format!("services/{}/{name}", self.ns), str::to_owned);
        parts.insert(placement(name, &target));
        let selector = match spec["serviceRef"]["name"].as_str() {
            Some(service) => k8s
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(service))
                .and_then(|s| s.spec.as_ref()?.selector.clone()),
            None => serde_json::from_value(spec["selector"]["matchLabels"].clone()).ok(),
        };
        let Some(selector) = selector else {
            return (keys, None);
        };
        let format = spec["format"].as_str().unwrap_or("EtcdNaming");
        let mut count = 0;
        for pod in pods.iter().filter(|p| selects(&selector, p)) {
            let Some(addr) = registrable(pod) else {
                continue;
            };
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            parts.insert(member(name, &addr));
            parts.insert(member(name, &pod_name));
            let (key, value_has) = match format {
                "Kratos" => (format!("{target}/{pod_name}"), format!("\"grpc://{addr}\"")),
                "Address" => (format!("{target}/{addr}"), addr.clone()),
                _ => (format!("{target}/{addr}"), format!("\"Addr\":\"{addr}\"")),
            };
            count += 1;
            keys.insert(
                key,
                Expect {
                    service: name.to_owned(),
                    value_has,
                },
            );
        }
        (keys, Some(count))
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
