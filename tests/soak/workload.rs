//! The seeded workload: GrpcServices (selector and serviceRef sources, three formats, default
//! and custom targets) and their pods, then a stream of pod churn, readiness flips, spec edits
//! (valid ones, invalid ones and their fixes, target changes) and deletions. API errors (the
//! nemesis restarts kube-apiserver) are counted and the step skipped: the checker reads what
//! the API server really holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::rng::Rng;
use crate::timeline::Timeline;

const FORMATS: [&str; 3] = ["EtcdNaming", "Address", "Kratos"];

/// Two ways a spec the API server accepts can be one the controller refuses.
#[derive(Clone, Copy)]
enum Invalid {
    /// A key template that names nothing of the endpoint.
    Template,
    /// A target under another namespace's default prefix.
    Target,
}

struct PodModel {
    name: String,
    ip: String,
    ready: bool,
}

struct Svc {
    name: String,
    by_ref: bool,
    format: &'static str,
    target: Option<String>,
    rev: u32,
    exists: bool,
    invalid: Option<Invalid>,
    pods: Vec<PodModel>,
    /// When the spec last changed (an invalid edit waits for a valid spec to settle).
    edited: f64,
}

impl Svc {
    /// Its name and the spec's parts an event may change, for the timeline.
    fn describe(&self) -> String {
        let invalid = match self.invalid {
            Some(Invalid::Template) => ", invalid keyTemplate",
            Some(Invalid::Target) => ", invalid target",
            None => "",
        };
        format!(
            "{} (format {}, target {}, rev {}{invalid})",
            self.name,
            self.format,
            self.target.as_deref().unwrap_or("default"),
            self.rev
        )
    }

    fn spec(&self) -> Value {
        let mut spec = if self.by_ref {
            json!({"serviceRef": {"name": self.name, "port": "grpc"}})
        } else {
            json!({"selector": {"matchLabels": {"app": self.name}}, "port": "grpc"})
        };
        spec["format"] = json!(self.format);
        spec["metadata"] = json!({"rev": self.rev.to_string()});
        spec["target"] = json!(self.target);
        spec["keyTemplate"] = Value::Null;
        match self.invalid {
            Some(Invalid::Template) => spec["keyTemplate"] = json!("{target}/fixed"),
            Some(Invalid::Target) => {
                spec["target"] = json!(format!("services/soak-elsewhere/{}", self.name));
            }
            None => {}
        }
        spec
    }
}

pub struct Workload {
    tl: Arc<Timeline>,
    client: kube::Client,
    ns: String,
    rng: Rng,
    services: Vec<Svc>,
    pods_made: u32,
    /// Readiness-flip bursts the nemesis asked for.
    pub bursts: Arc<AtomicUsize>,
}

impl Workload {
    pub fn new(tl: Arc<Timeline>, client: kube::Client, ns: &str, seed: u64, count: usize) -> Self {
        let mut rng = Rng::new(seed, 1);
        let services = (0..count)
            .map(|i| {
                let by_ref = i % 3 == 2;
                let formats = if by_ref { &FORMATS[..2] } else { &FORMATS[..] };
                Svc {
                    name: format!("svc-{i:02}"),
                    by_ref,
                    format: formats[rng.below(formats.len())],
                    target: (i % 4 == 1).then(|| format!("soak-custom/svc-{i:02}")),
                    rev: 0,
                    exists: false,
                    invalid: None,
                    pods: Vec::new(),
                    edited: 0.0,
                }
            })
            .collect();
        Self {
            tl,
            client,
            ns: ns.to_owned(),
            rng,
            services,
            pods_made: 0,
            bursts: Arc::default(),
        }
    }

    fn grpc(&self) -> Api<grpc_registrar::crd::GrpcService> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates every service with three pods (most of them ready), and the Services that the
    /// serviceRef ones point to. Fails on any API error: nothing is injected yet.
    pub async fn setup(&mut self) -> anyhow::Result<()> {
        for i in 0..self.services.len() {
            if self.services[i].by_ref {
                let name = self.services[i].name.clone();
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"clusterIP": "None", "selector": {"app": name},
                             "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]},
                }))?;
                Api::<Service>::namespaced(self.client.clone(), &self.ns)
                    .create(&PostParams::default(), &svc)
                    .await?;
            }
            self.create_service(i).await?;
            for _ in 0..3 {
                let ready = self.rng.chance(0.8);
                self.add_pod(i, ready).await?;
            }
        }
        Ok(())
    }

    async fn create_service(&mut self, i: usize) -> kube::Result<()> {
        let svc = &self.services[i];
        let obj = serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": svc.name}, "spec": svc.spec(),
        }))
        .expect("a GrpcService");
        self.grpc().create(&PostParams::default(), &obj).await?;
        self.services[i].exists = true;
        self.services[i].edited = self.tl.now();
        Ok(())
    }

    async fn add_pod(&mut self, i: usize, ready: bool) -> kube::Result<()> {
        let n = self.pods_made;
        self.pods_made += 1;
        let name = format!("{}-p{n}", self.services[i].name);
        let ip = format!("10.77.{}.{}", n / 250, n % 250 + 1);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": self.services[i].name}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "server", "image": "greeter:soak",
                     "ports": [{"name": "grpc", "containerPort": 50051}]}]},
        }))
        .expect("a pod");
        self.pods().create(&PostParams::default(), &pod).await?;
        self.services[i].pods.push(PodModel {
            name: name.clone(),
            ip: ip.clone(),
            ready: false,
        });
        self.set_ready(i, self.services[i].pods.len() - 1, ready)
            .await
    }

    /// Sets phase Running, the IP and the Ready condition, as a kubelet would.
    async fn set_ready(&mut self, i: usize, p: usize, ready: bool) -> kube::Result<()> {
        let pod = &self.services[i].pods[p];
        let status = json!({"status": {
            "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}],
        }});
        self.pods()
            .patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
        self.services[i].pods[p].ready = ready;
        Ok(())
    }

    async fn patch_spec(&mut self, i: usize) -> kube::Result<()> {
        let spec = self.services[i].spec();
        self.grpc()
            .patch(
                &self.services[i].name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        self.services[i].edited = self.tl.now();
        Ok(())
    }

    /// Runs steps until `until` (timeline seconds).
    pub async fn run(&mut self, until: f64) {
        while self.tl.now() < until {
            let pause = if self.bursts.load(Ordering::Relaxed) > 0 {
                self.bursts.fetch_sub(1, Ordering::Relaxed);
                for _ in 0..15 {
                    self.step_kind(0).await;
                }
                0.2
            } else {
                let kind = self.rng.weighted(&[40, 10, 8, 12, 6, 8, 3, 4]);
                self.step_kind(kind).await;
                self.rng.secs(0.1, 0.4)
            };
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
    }

    async fn step_kind(&mut self, kind: usize) {
        let i = self.rng.below(self.services.len());
        let now = self.tl.now();
        let svc = &self.services[i];
        let (label, result) = match kind {
            0 if !svc.pods.is_empty() => {
                let p = self.rng.below(svc.pods.len());
                let ready = !svc.pods[p].ready;
                ("readiness flip", self.set_ready(i, p, ready).await)
            }
            1 if svc.pods.len() < 6 => {
                let ready = self.rng.chance(0.7);
                ("pod created", self.add_pod(i, ready).await)
            }
            2 if svc.pods.len() > 1 => {
                let p = self.rng.below(svc.pods.len());
                let name = svc.pods[p].name.clone();
                let result = self
                    .pods()
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await
                    .map(|_| ());
                if result.is_ok() {
                    self.services[i].pods.remove(p);
                }
                ("pod deleted", result)
            }
            3 if svc.exists && svc.invalid.is_none() => {
                let label = self.valid_edit(i);
                (label, self.patch_spec(i).await)
            }
            4 if svc.exists && svc.invalid.is_none() && now - svc.edited > 10.0 => {
                let invalid = if self.rng.chance(0.5) {
                    Invalid::Template
                } else {
                    Invalid::Target
                };
                self.services[i].invalid = Some(invalid);
                let result = self.patch_spec(i).await;
                if result.is_err() {
                    self.services[i].invalid = None;
                }
                ("invalid edit", result)
            }
            5 if svc.exists && svc.invalid.is_some() => ("invalid edit fixed", self.fix(i).await),
            6 if svc.exists && svc.invalid.is_none() => {
                let result = self
                    .grpc()
                    .delete(&svc.name, &DeleteParams::default())
                    .await
                    .map(|_| ());
                if result.is_ok() {
                    self.services[i].exists = false;
                }
                ("service deleted", result)
            }
            7 if !svc.exists => ("service recreated", self.create_service(i).await),
            _ => return,
        };
        match result {
            Ok(()) => self.tl.event(label, self.services[i].describe()),
            Err(e) => self
                .tl
                .event("api error (step skipped)", format!("{label}: {e}")),
        }
    }

    /// Changes metadata, the format, or the target; returns the kind of change.
    fn valid_edit(&mut self, i: usize) -> &'static str {
        let svc = &mut self.services[i];
        svc.rev += 1;
        match self.rng.below(4) {
            0 => {
                let formats = if svc.by_ref {
                    &FORMATS[..2]
                } else {
                    &FORMATS[..]
                };
                svc.format = formats[(formats.iter().position(|f| *f == svc.format).unwrap_or(0)
                    + 1)
                    % formats.len()];
                "format change"
            }
            1 => {
                svc.target = match svc.target.as_deref() {
                    None => Some(format!("soak-custom/{}", svc.name)),
                    Some(t) if t.ends_with("-v2") => None,
                    Some(_) => Some(format!("soak-custom/{}-v2", svc.name)),
                };
                "target change"
            }
            _ => "metadata change",
        }
    }

    async fn fix(&mut self, i: usize) -> kube::Result<()> {
        let invalid = self.services[i].invalid.take();
        let result = self.patch_spec(i).await;
        if result.is_err() {
            self.services[i].invalid = invalid;
        }
        result
    }
}
