//! The independent checker: it follows the API server's objects (through its own watches) and
//! every registry event (an etcd watch straight to etcd, from the revision before the soak),
//! and judges each DELETE against the oracle's history and the nemesis's outage windows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::oracle::{Oracle, Want, member};
use crate::timeline::{Outage, Timeline, Window};

/// How long the controller may act on a view of the API older than the oracle's (watch and
/// reconcile lag on a loaded 2-core machine).
const VIEW_LAG: f64 = 5.0;
/// How far the checker's own watch may lag behind the controller's.
const CHECK_LAG: f64 = 3.0;
/// After kube-apiserver is back, the time a controller may still act on what it saw before the
/// restart (its watches re-list with backoff).
const RELIST: f64 = 15.0;
/// How long a leader needs, with nothing failing, to see a spec and record it (view lag and a
/// reconcile).
const CALM: f64 = 8.0;

#[derive(Default)]
struct State {
    /// When each key entered and left the oracle's want.
    history: HashMap<String, Vec<(f64, Option<f64>)>>,
    /// The same for what a writer may put: the wanted keys and the alternatives.
    allowed: HashMap<String, Vec<(f64, Option<f64>)>>,
    /// The same for the parts keys are made of (see [`Want::parts`]).
    parts: HashMap<String, Vec<(f64, Option<f64>)>>,
    want: Want,
    /// The registry's scoped keys as the watch reported them.
    registry: BTreeMap<String, String>,
    /// Events not judged yet: when, the key, and whether it was a PUT.
    pending: Vec<(f64, String, bool)>,
    /// Every scoped key seen in an event.
    seen: BTreeSet<String>,
    puts: usize,
    deletes: usize,
    exempt: usize,
    revision: i64,
}

pub struct Checker {
    tl: Arc<Timeline>,
    ns: String,
    ttl: f64,
    foreign: BTreeSet<String>,
    state: Mutex<State>,
    /// Whether its watches of the API server have listed (the workload starts after).
    synced: std::sync::atomic::AtomicBool,
}

/// What the checker counted, for the summary.
pub struct Tally {
    pub keys: usize,
    pub puts: usize,
    pub deletes: usize,
    pub exempt: usize,
}

impl Checker {
    pub fn new(tl: Arc<Timeline>, ns: &str, ttl: f64, foreign: BTreeSet<String>) -> Arc<Self> {
        Arc::new(Self {
            tl,
            ns: ns.to_owned(),
            ttl,
            foreign,
            state: Mutex::default(),
            synced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("checker lock"))
    }

    /// Keys the controller may write: its namespace's default prefix and the custom prefix.
    fn in_scope(&self, key: &str) -> bool {
        key.starts_with(&format!("services/{}/", self.ns)) || key.starts_with("soak-custom/")
    }

    /// Starts following the API server and the registry (from `revision + 1`).
    pub fn spawn(self: &Arc<Self>, client: kube::Client, etcd: String, revision: i64) {
        self.with(|s| s.revision = revision);
        tokio::spawn(self.clone().follow_api(client));
        tokio::spawn(self.clone().follow_registry(etcd));
        tokio::spawn(self.clone().judge_loop());
    }

    async fn follow_api(self: Arc<Self>, client: kube::Client) {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "grpc-registrar.io",
            "v1alpha1",
            "GrpcService",
        ));
        let svc_writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
        let svc_store = svc_writer.as_reader();
        let (pod_store, pod_writer) = reflector::store();
        let (k8s_store, k8s_writer) = reflector::store();
        let cfg = watcher::Config::default;
        let grpc = reflector(
            svc_writer,
            watcher(
                Api::<DynamicObject>::namespaced_with(client.clone(), &self.ns, &resource),
                cfg(),
            ),
        )
        .default_backoff()
        .map(|e| e.is_ok());
        let pods = reflector(
            pod_writer,
            watcher(Api::<Pod>::namespaced(client.clone(), &self.ns), cfg()),
        )
        .default_backoff()
        .map(|e| e.is_ok());
        let k8s = reflector(
            k8s_writer,
            watcher(Api::<Service>::namespaced(client, &self.ns), cfg()),
        )
        .default_backoff()
        .map(|e| e.is_ok());
        let mut events = std::pin::pin!(futures::stream::select(
            grpc,
            futures::stream::select(pods, k8s),
        ));
        let stores = (svc_store.clone(), pod_store.clone(), k8s_store.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let listed = tokio::join!(
                stores.0.wait_until_ready(),
                stores.1.wait_until_ready(),
                stores.2.wait_until_ready()
            );
            if let (Ok(()), Ok(()), Ok(())) = listed {
                this.synced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        });
        let mut oracle = Oracle::new(&self.ns);
        while events.next().await.is_some() {
            let services: Vec<DynamicObject> =
                svc_store.state().iter().map(|o| (**o).clone()).collect();
            let pods: Vec<Pod> = pod_store.state().iter().map(|o| (**o).clone()).collect();
            let k8s: Vec<Service> = k8s_store.state().iter().map(|o| (**o).clone()).collect();
            let now = self.tl.now();
            let windows = self.tl.windows();
            let want = oracle.compute(&services, &pods, &k8s, now, |from, to| {
                calm(&windows, from, to)
            });
            self.with(|s| {
                let before: BTreeSet<String> = s.want.allowed().cloned().collect();
                let after: BTreeSet<String> = want.allowed().cloned().collect();
                track(&mut s.history, s.want.keys.keys(), want.keys.keys(), now);
                track(&mut s.allowed, before.iter(), after.iter(), now);
                track(&mut s.parts, s.want.parts.iter(), want.parts.iter(), now);
                s.want = want;
            });
        }
    }

    /// Every registry event from the starting revision, re-watching from the last one seen
    /// whenever etcd goes away (it is killed by the nemesis).
    async fn follow_registry(self: Arc<Self>, etcd: String) {
        loop {
            let from = self.with(|s| s.revision) + 1;
            let watch = async {
                let mut client = etcd_client::Client::connect([etcd.as_str()], None).await?;
                let mut stream = client
                    .watch(
                        "",
                        Some(
                            WatchOptions::new()
                                .with_all_keys()
                                .with_start_revision(from),
                        ),
                    )
                    .await?;
                while let Some(resp) = stream.message().await? {
                    for event in resp.events() {
                        if let Some(kv) = event.kv() {
                            self.on_event(
                                event.event_type(),
                                kv.key_str().unwrap_or_default(),
                                kv.value_str().unwrap_or_default(),
                                kv.mod_revision(),
                            );
                        }
                    }
                }
                Ok::<(), etcd_client::Error>(())
            };
            let _ = watch.await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn on_event(&self, kind: EventType, key: &str, value: &str, revision: i64) {
        let now = self.tl.now();
        let verb = if kind == EventType::Put {
            "PUT"
        } else {
            "DELETE"
        };
        if self.foreign.contains(key) {
            self.tl
                .violation(now, format!("isolation: {verb} of foreign key {key}"));
        } else if key.starts_with("grpc-registrar/") {
            // The controller's own records.
        } else if !self.in_scope(key) {
            self.tl.violation(
                now,
                format!("isolation: {verb} outside the controller's scopes: {key}"),
            );
        } else {
            self.with(|s| {
                s.seen.insert(key.to_owned());
                if kind == EventType::Put {
                    s.puts += 1;
                    s.registry.insert(key.to_owned(), value.to_owned());
                } else {
                    s.deletes += 1;
                    s.registry.remove(key);
                }
                s.pending
                    .push((now, key.to_owned(), kind == EventType::Put));
            });
        }
        self.with(|s| s.revision = s.revision.max(revision));
    }

    async fn judge_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.judge(self.tl.now());
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Judges every event whose view ends before `until`: a DELETE of a key wanted throughout
    /// the time the controller may have been looking at, outside a lease-expiry window, and a PUT
    /// of a key wanted at no time in it (a stale or deposed writer), are violations.
    pub fn judge(&self, until: f64) {
        let windows = self.tl.windows();
        let (due, history) = self.with(|s| {
            // Due once the checker has seen the API as it was up to the end of the event's view.
            let (due, rest) = s
                .pending
                .drain(..)
                .partition(|(t, _, _)| view_end(*t, &windows) <= until);
            s.pending = rest;
            (due, (s.history.clone(), s.allowed.clone(), s.parts.clone()))
        });
        let (history, allowed, parts) = history;
        let due: Vec<(f64, String, bool)> = due;
        for (t, key, put) in due {
            let from = view_start(t, &windows);
            let to = view_end(t, &windows);
            if put {
                let during = |h: &Vec<(f64, Option<f64>)>| {
                    h.iter()
                        .any(|(a, b)| *a <= to && b.is_none_or(|b| b >= from))
                };
                let wanted =
                    allowed.get(&key).is_some_and(during) || made_of_parts(&key, &parts, during);
                if !wanted {
                    self.tl.violation(
                        t,
                        format!(
                            "safety: PUT of {key}, wanted at no time from {from:.2}s to {to:.2}s"
                        ),
                    );
                }
                continue;
            }
            let Some(since) = desired_throughout(history.get(&key), from, to) else {
                continue;
            };
            if let Some((a, b)) = expiry_window(t, &windows, self.ttl) {
                self.with(|s| s.exempt += 1);
                self.tl.note(
                    t,
                    format!("lease expiry (exempt): DELETE of {key}, dark from {a:.2}s to {b:.2}s"),
                );
                continue;
            }
            self.tl.violation(
                t,
                format!(
                    "safety: DELETE of {key}, desired continuously since {since:.2}s (checked from {from:.2}s to {to:.2}s), outside any lease-expiry window"
                ),
            );
        }
    }

    /// Waits up to `bound` for the registry to equal the oracle and every status to count what
    /// the oracle does; the time it took, or the differences at the bound.
    pub async fn converge(
        &self,
        client: &kube::Client,
        etcd: &str,
        bound: Duration,
    ) -> Result<Duration, String> {
        let started = std::time::Instant::now();
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "grpc-registrar.io",
            "v1alpha1",
            "GrpcService",
        ));
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &self.ns, &resource);
        loop {
            let diff = self.differences(&api, etcd).await;
            if diff.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > bound {
                return Err(diff.join("\n    "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn differences(&self, api: &Api<DynamicObject>, etcd: &str) -> Vec<String> {
        let mut diff = Vec::new();
        let Ok(mut client) = etcd_client::Client::connect([etcd], None).await else {
            return vec!["etcd unreachable".into()];
        };
        let mut registry = BTreeMap::new();
        for prefix in [format!("services/{}/", self.ns), "soak-custom/".to_owned()] {
            match client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(resp) => registry.extend(resp.kvs().iter().map(|kv| {
                    (
                        kv.key_str().unwrap_or_default().to_owned(),
                        kv.value_str().unwrap_or_default().to_owned(),
                    )
                })),
                Err(e) => return vec![format!("etcd read failed: {e}")],
            }
        }
        registry.retain(|k, _| !self.foreign.contains(k));
        let mut want = self.with(|s| s.want.clone());
        // An invalid service may hold its alternative (the valid spec before its last one)
        // instead.
        for (service, alternative) in std::mem::take(&mut want.alternatives) {
            if alternative.keys().all(|k| registry.contains_key(k))
                && want
                    .keys
                    .iter()
                    .any(|(k, e)| e.service == service && !registry.contains_key(k))
            {
                want.keys.retain(|_, e| e.service != service);
                want.keys.extend(alternative);
            }
        }
        for (key, expect) in &want.keys {
            match registry.get(key) {
                None => diff.push(format!("missing {key} ({})", expect.service)),
                Some(v) if !v.contains(&expect.value_has) => {
                    diff.push(format!("{key}: value {v:?} lacks {:?}", expect.value_has));
                }
                Some(_) => {}
            }
        }
        for key in registry.keys().filter(|k| !want.keys.contains_key(*k)) {
            diff.push(format!("stale {key}"));
        }
        match api.list(&Default::default()).await {
            Ok(list) => {
                for svc in list.items {
                    let name = svc.metadata.name.clone().unwrap_or_default();
                    let status = &svc.data["status"];
                    let want_count = want.counts.get(&name).copied().unwrap_or(0) as i64;
                    // An invalid spec's status counts what that spec would select, if anything.
                    if !want.invalid.contains(&name)
                        && status["registeredEndpoints"].as_i64() != Some(want_count)
                    {
                        diff.push(format!(
                            "status of {name}: registeredEndpoints {} != {want_count}",
                            status["registeredEndpoints"]
                        ));
                    }
                    if status["observedGeneration"].as_i64() != svc.metadata.generation {
                        diff.push(format!(
                            "status of {name}: observedGeneration {} != {:?}",
                            status["observedGeneration"], svc.metadata.generation
                        ));
                    }
                }
            }
            Err(e) => diff.push(format!("list GrpcServices failed: {e}")),
        }
        diff
    }

    /// Foreign keys missing or changed at the end (each seeded key's value is its own name).
    pub async fn foreign_intact(&self, etcd: &str) -> Vec<String> {
        let Ok(mut client) = etcd_client::Client::connect([etcd], None).await else {
            return vec!["etcd unreachable".into()];
        };
        let mut broken = Vec::new();
        for key in &self.foreign {
            let value = client.get(key.as_str(), None).await.ok().and_then(|r| {
                r.kvs()
                    .first()
                    .map(|kv| kv.value_str().unwrap_or_default().to_owned())
            });
            if value.as_deref() != Some(key.as_str()) {
                broken.push(format!("foreign key {key} is {value:?}"));
            }
        }
        broken
    }

    pub fn tally(&self) -> Tally {
        self.with(|s| Tally {
            keys: s.seen.len(),
            puts: s.puts,
            deletes: s.deletes,
            exempt: s.exempt,
        })
    }
}

/// The earliest API state the controller may still be acting on at `t`: `VIEW_LAG` before, or,
/// around a kube-apiserver restart or a replica's cut from it, `VIEW_LAG` before it began (a
/// replica that leads again may act before its watches have re-listed).
fn view_start(t: f64, windows: &[Window]) -> f64 {
    windows
        .iter()
        .filter(|w| matches!(w.outage, Outage::ApiServer | Outage::ApiCut(_)))
        .filter(|w| w.from <= t && w.to.is_none_or(|to| to + RELIST >= t - VIEW_LAG))
        .map(|w| w.from - VIEW_LAG)
        .fold(t - VIEW_LAG, f64::min)
}

/// The latest API state the checker may not have seen yet at `t`: `CHECK_LAG` after, or, when
/// kube-apiserver restarts around then, until the checker's own watches have re-listed.
fn view_end(t: f64, windows: &[Window]) -> f64 {
    windows
        .iter()
        .filter(|w| w.outage == Outage::ApiServer)
        .filter(|w| w.from <= t + CHECK_LAG && w.to.is_none_or(|to| to + RELIST >= t))
        .map(|w| w.to.unwrap_or(f64::INFINITY) + RELIST)
        .fold(t + CHECK_LAG, f64::max)
}

/// When `key` was wanted without a break over `[from, to]`: the start of that stretch.
fn desired_throughout(
    history: Option<&Vec<(f64, Option<f64>)>>,
    from: f64,
    to: f64,
) -> Option<f64> {
    history?
        .iter()
        .find(|(a, b)| *a <= from && b.is_none_or(|b| b >= to))
        .map(|(a, _)| *a)
}

/// Spans in which nothing could keep the lease alive: etcd unreachable, kube-apiserver down (no
/// leader can renew its election Lease), or every replica down at once.
fn dark_spans(windows: &[Window], now: f64) -> Vec<(f64, f64)> {
    let end = |w: &Window| w.to.unwrap_or(now + 1e6);
    let mut points: Vec<f64> = windows.iter().flat_map(|w| [w.from, end(w)]).collect();
    points.sort_by(f64::total_cmp);
    let covered = |outage: Outage, t: f64| {
        windows
            .iter()
            .any(|w| w.outage == outage && w.from <= t && t < end(w))
    };
    let mut spans: Vec<(f64, f64)> = Vec::new();
    for pair in points.windows(2) {
        let mid = f64::midpoint(pair[0], pair[1]);
        let dark = covered(Outage::Etcd, mid)
            || covered(Outage::ApiServer, mid)
            || ((covered(Outage::Replica(0), mid) || covered(Outage::ApiCut(0), mid))
                && (covered(Outage::Replica(1), mid) || covered(Outage::ApiCut(1), mid)));
        if !dark {
            continue;
        }
        match spans.last_mut() {
            Some(last) if last.1 >= pair[0] => last.1 = pair[1],
            _ => spans.push((pair[0], pair[1])),
        }
    }
    spans
}

/// A dark span long enough for the lease to expire (renewed every TTL/3, so at the earliest
/// TTL/2 into it, with slack) that `t` falls in, or just after.
fn expiry_window(t: f64, windows: &[Window], ttl: f64) -> Option<(f64, f64)> {
    dark_spans(windows, t)
        .into_iter()
        .find(|(a, b)| t >= a + ttl / 2.0 && t <= b + 2.0)
}

/// Opens a history span for every key that entered (`after` but not `before`) and closes it for
/// every key that left.
fn track<'a>(
    history: &mut HashMap<String, Vec<(f64, Option<f64>)>>,
    before: impl Iterator<Item = &'a String> + Clone,
    after: impl Iterator<Item = &'a String> + Clone,
    now: f64,
) {
    let was: BTreeSet<&String> = before.collect();
    let is: BTreeSet<&String> = after.collect();
    for key in is.difference(&was) {
        history.entry((*key).clone()).or_default().push((now, None));
    }
    for key in was.difference(&is) {
        if let Some(last) = history.get_mut(*key).and_then(|h| h.last_mut()) {
            last.1 = Some(now);
        }
    }
}

/// Whether `[from, to]` held a stretch of `CALM` seconds with no fault open (no replica, etcd,
/// kube-apiserver or cut window): long enough for a leader to see a spec and record it.
fn calm(windows: &[Window], from: f64, to: f64) -> bool {
    let mut faults: Vec<(f64, f64)> = windows
        .iter()
        .map(|w| (w.from, w.to.unwrap_or(f64::INFINITY)))
        .filter(|(a, b)| *b >= from && *a <= to)
        .collect();
    faults.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut free_from = from;
    for (a, b) in faults {
        if a - free_from >= CALM {
            return true;
        }
        free_from = free_from.max(b);
    }
    to - free_from >= CALM
}

/// Whether `key` is a placement of some service and one of its members, each true at some time
/// `during` the view window (one view per resource, each up to the lag old).
fn made_of_parts(
    key: &str,
    parts: &HashMap<String, Vec<(f64, Option<f64>)>>,
    during: impl Fn(&Vec<(f64, Option<f64>)>) -> bool,
) -> bool {
    parts.iter().any(|(part, history)| {
        let mut fields = part.split('\t');
        let (Some("P"), Some(service), Some(target)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        key.strip_prefix(target)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|suffix| {
                during(history) && parts.get(&member(service, suffix)).is_some_and(&during)
            })
    })
}
