//! The seeded nemesis: SIGKILL, SIGTERM and SIGSTOP/SIGCONT of either replica (and now and then
//! of both past the TTL), one replica cut off from kube-apiserver, etcd SIGKILL and restart with its data, etcd partitions shorter and
//! longer than the TTL, kube-apiserver restarts with its watches expired (410), and
//! readiness-flip bursts. Faults start on their own schedule and heal on their own, so they
//! overlap; each records the outage window it opens for the checker.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use test_support::{ControlPlane, EtcdServer, TcpProxy};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::harness::ControllerProcess;
use crate::rng::Rng;
use crate::timeline::{Outage, Timeline};

/// How long a restarted (or resumed, or reconnected) replica may take to keep the lease alive
/// again: start, list, wait out the old holder's Lease (2 s), elect, fence, adopt. Measured on a
/// loaded 2-core machine; a tighter figure showed expiries no fault window explained.
const SETTLE: f64 = 5.0;
/// How long the leader's lease keeper may take to renew once etcd answers again (its retry
/// pacing and a reconnect).
const ETCD_SETTLE: f64 = 1.5;
/// How long a leader may take to hold its Lease again after kube-apiserver is back.
const API_SETTLE: f64 = 3.0;

/// The fault kinds, as counted in the summary.
pub const KINDS: [&str; 11] = [
    "replica SIGKILL",
    "replica SIGTERM",
    "replica SIGSTOP",
    "both replicas SIGKILL past the TTL",
    "etcd SIGKILL",
    "etcd partition < TTL",
    "etcd partition > TTL",
    "kube-apiserver restart (410)",
    "readiness burst",
    "replica died on its own",
    "replica cut from kube-apiserver",
];

/// Starts replicas of the real binary, each logging (stdout and stderr) to its own file and
/// reaching kube-apiserver through its own proxy, so that one replica can be cut off from it.
pub struct Launcher {
    pub plane: Arc<ControlPlane>,
    pub etcd: String,
    pub ns: String,
    pub ttl: u32,
    pub dir: PathBuf,
    /// Each replica's way to kube-apiserver.
    api: [TcpProxy; 2],
    /// When each replica was last started.
    started: std::sync::Mutex<[Option<std::time::Instant>; 2]>,
}

/// How long a replica is given to start before the nemesis may SIGTERM it.
const STARTING: std::time::Duration = std::time::Duration::from_secs(1);

impl Launcher {
    pub async fn new(
        plane: Arc<ControlPlane>,
        etcd: String,
        ns: &str,
        ttl: u32,
        dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let upstream: std::net::SocketAddr = plane.url().trim_start_matches("https://").parse()?;
        let api = [
            TcpProxy::start(upstream).await,
            TcpProxy::start(upstream).await,
        ];
        let kubeconfig = std::fs::read_to_string(plane.kubeconfig())?;
        for (i, proxy) in api.iter().enumerate() {
            let via = kubeconfig.replace(&plane.url(), &format!("https://{}", proxy.addr()));
            anyhow::ensure!(
                via != kubeconfig,
                "the kubeconfig does not name {}",
                plane.url()
            );
            std::fs::write(dir.join(format!("kubeconfig-{i}")), via)?;
        }
        Ok(Self {
            plane,
            etcd,
            ns: ns.to_owned(),
            ttl,
            dir,
            api,
            started: std::sync::Mutex::new([None, None]),
        })
    }

    /// Waits until replica `i` has had `STARTING` to start (a SIGTERM before the binary has
    /// even been loaded ends it by signal, as it would any process, and proves nothing).
    pub async fn started(&self, i: usize) {
        let since = self.started.lock().expect("lock")[i].map(|t: std::time::Instant| t.elapsed());
        if let Some(left) = since.and_then(|s| STARTING.checked_sub(s)) {
            tokio::time::sleep(left).await;
        }
    }

    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("replica-{i}.log"))
    }

    pub fn start(&self, i: usize) -> ControllerProcess {
        self.started.lock().expect("lock")[i] = Some(std::time::Instant::now());
        ControllerProcess::builder(&self.plane, &self.etcd, &self.ns, self.ttl)
            .replica(["a", "b"][i])
            .env("KUBECONFIG", self.dir.join(format!("kubeconfig-{i}")))
            // Info level, so that a violation's timeline can be read against the replicas' own
            // account (`SOAK_CONTROLLER_LOG` overrides).
            .env(
                "RUST_LOG",
                std::env::var("SOAK_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(&[
                "--custom-target-namespaces",
                &self.ns,
                "--cluster-name",
                "soak",
            ])
            .log_all_to(self.log(i))
            .start()
    }
}

pub struct Nemesis {
    tl: Arc<Timeline>,
    launcher: Arc<Launcher>,
    pub replicas: [Arc<Mutex<ControllerProcess>>; 2],
    etcd: Arc<Mutex<EtcdServer>>,
    proxy: Arc<TcpProxy>,
    partition: Arc<Mutex<()>>,
    apiserver: Arc<Mutex<()>>,
    bursts: Arc<AtomicUsize>,
    rng: Rng,
    ttl: f64,
    tasks: Vec<JoinHandle<()>>,
    /// The largest RSS seen of any replica, in KiB.
    pub max_rss_kib: Arc<AtomicUsize>,
}

impl Nemesis {
    pub fn new(
        tl: Arc<Timeline>,
        launcher: Launcher,
        etcd: EtcdServer,
        proxy: TcpProxy,
        bursts: Arc<AtomicUsize>,
        seed: u64,
    ) -> Self {
        let replicas = [0, 1].map(|i| Arc::new(Mutex::new(launcher.start(i))));
        Self {
            tl,
            ttl: f64::from(launcher.ttl),
            launcher: Arc::new(launcher),
            replicas,
            etcd: Arc::new(Mutex::new(etcd)),
            proxy: Arc::new(proxy),
            partition: Arc::default(),
            apiserver: Arc::default(),
            bursts,
            rng: Rng::new(seed, 2),
            tasks: Vec::new(),
            max_rss_kib: Arc::default(),
        }
    }

    /// Injects faults until `until` (timeline seconds); `api_every` spaces kube-apiserver
    /// restarts (each costs several seconds of CPU).
    pub async fn run(&mut self, until: f64, api_every: f64) {
        let mut last_api = f64::NEG_INFINITY;
        self.tasks.push(tokio::spawn(watch_health(
            self.tl.clone(),
            self.launcher.clone(),
            self.replicas.clone(),
            self.max_rss_kib.clone(),
        )));
        loop {
            let gap = self.rng.secs(0.5, 5.0);
            if self.tl.now() + gap >= until {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            let kind = self.rng.weighted(&[4, 3, 3, 1, 2, 3, 2, 1, 3, 0, 3]);
            let i = self.rng.below(2);
            let ttl = self.ttl;
            let (tl, launcher) = (self.tl.clone(), self.launcher.clone());
            let task = match kind {
                0..=2 => {
                    let held = match kind {
                        0 => self.rng.secs(0.2, 6.0),
                        1 => self.rng.secs(0.2, 6.0),
                        // Often past the leader Lease (2 s) and the checker's view lag (5 s), so
                        // that a resumed, deposed leader's stale view would show.
                        _ => self.rng.secs(1.0, 10.0),
                    };
                    let replica = self.replicas[i].clone();
                    tokio::spawn(replica_fault(tl, launcher, replica, i, kind, held))
                }
                3 => {
                    let held = self.rng.secs(ttl + 1.0, ttl + 4.0);
                    let replicas = self.replicas.clone();
                    tokio::spawn(async move {
                        let (Ok(mut a), Ok(mut b)) =
                            (replicas[0].try_lock(), replicas[1].try_lock())
                        else {
                            return;
                        };
                        tl.event(KINDS[3], format!("for {held:.1}s"));
                        let windows = [tl.open(Outage::Replica(0)), tl.open(Outage::Replica(1))];
                        a.kill();
                        b.kill();
                        tokio::time::sleep(Duration::from_secs_f64(held)).await;
                        *a = launcher.start(0);
                        *b = launcher.start(1);
                        for w in windows {
                            tl.close(w, SETTLE);
                        }
                    })
                }
                4 => {
                    let held = self.rng.secs(0.5, 5.0);
                    let etcd = self.etcd.clone();
                    tokio::spawn(async move {
                        let Ok(mut etcd) = etcd.try_lock() else {
                            return;
                        };
                        tl.event(KINDS[4], format!("down {held:.1}s"));
                        let w = tl.open(Outage::Etcd);
                        etcd.stop();
                        tokio::time::sleep(Duration::from_secs_f64(held)).await;
                        etcd.restart().await;
                        tl.close(w, ETCD_SETTLE);
                    })
                }
                5 | 6 => {
                    let held = if kind == 5 {
                        self.rng.secs(0.3, ttl / 3.0)
                    } else {
                        self.rng.secs(ttl + 1.0, ttl + 4.0)
                    };
                    let (proxy, lock) = (self.proxy.clone(), self.partition.clone());
                    tokio::spawn(async move {
                        let Ok(_held) = lock.try_lock() else { return };
                        tl.event(KINDS[kind], format!("{held:.1}s"));
                        let w = tl.open(Outage::Etcd);
                        proxy.cut().await;
                        tokio::time::sleep(Duration::from_secs_f64(held)).await;
                        proxy.restore();
                        tl.close(w, ETCD_SETTLE);
                    })
                }
                7 if self.tl.now() - last_api >= api_every => {
                    last_api = self.tl.now();
                    let (plane, lock) = (launcher.plane.clone(), self.apiserver.clone());
                    tokio::spawn(async move {
                        let Ok(_held) = lock.try_lock() else { return };
                        let w = tl.open(Outage::ApiServer);
                        expire_watches(&plane).await;
                        let started = tl.now();
                        plane.restart_apiserver().await;
                        tl.event(KINDS[7], format!("ready after {:.1}s", tl.now() - started));
                        tl.close(w, API_SETTLE);
                    })
                }
                8 => {
                    self.bursts.fetch_add(1, Ordering::Relaxed);
                    self.tl.event(KINDS[8], "15 flips");
                    continue;
                }
                10 => {
                    let held = self.rng.secs(2.0, 10.0);
                    let replica = self.replicas[i].clone();
                    tokio::spawn(async move {
                        let Ok(_process) = replica.try_lock() else {
                            return;
                        };
                        tl.event(KINDS[10], format!("replica {i}, {held:.1}s"));
                        // It cannot renew the leader Lease: for the lease it is down. Its view of
                        // the API goes stale, so it must write nothing until it is back.
                        let w = tl.open(Outage::ApiCut(i));
                        launcher.api[i].cut().await;
                        tokio::time::sleep(Duration::from_secs_f64(held)).await;
                        launcher.api[i].restore();
                        tl.close(w, SETTLE);
                    })
                }
                _ => continue,
            };
            self.tasks.push(task);
        }
    }

    /// Waits for every fault to heal, then stops watching health. Every component is up after.
    pub async fn stop(&mut self) {
        let health = self.tasks.remove(0);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        health.abort();
        for (i, replica) in self.replicas.iter().enumerate() {
            let mut replica = replica.lock().await;
            if let Some(status) = replica.try_exit() {
                self.tl.violation(
                    self.tl.now(),
                    format!("replica {i} exited on its own ({status}) at the end"),
                );
                *replica = self.launcher.start(i);
            }
        }
    }

    pub async fn kill_all(&mut self) {
        for replica in &self.replicas {
            replica.lock().await.kill();
        }
    }
}

async fn replica_fault(
    tl: Arc<Timeline>,
    launcher: Arc<Launcher>,
    replica: Arc<Mutex<ControllerProcess>>,
    i: usize,
    kind: usize,
    held: f64,
) {
    let Ok(mut process) = replica.try_lock() else {
        return;
    };
    tl.event(KINDS[kind], format!("replica {i}, {held:.1}s"));
    let w = tl.open(Outage::Replica(i));
    match kind {
        0 => process.kill(),
        1 => {
            launcher.started(i).await;
            process.sigterm();
            let deadline = tl.now() + 15.0;
            let status = loop {
                if let Some(status) = process.try_exit() {
                    break Some(status);
                }
                if tl.now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !status.is_some_and(|s| s.success()) {
                tl.violation(
                    tl.now(),
                    format!("health: replica {i} after SIGTERM: {status:?}"),
                );
                process.kill();
            }
        }
        _ => process.pause(),
    }
    tokio::time::sleep(Duration::from_secs_f64(held)).await;
    if kind == 2 {
        process.resume();
    } else {
        *process = launcher.start(i);
    }
    tl.close(w, SETTLE);
}

/// Compacts kube-apiserver's etcd, so that no watch can resume after the restart (410 Gone).
async fn expire_watches(plane: &ControlPlane) {
    if let Ok(mut etcd) = etcd_client::Client::connect([plane.etcd_url()], None).await
        && let Ok(resp) = etcd.get("/", None).await
        && let Some(header) = resp.header()
    {
        let _ = etcd
            .compact(
                header.revision(),
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await;
    }
}

/// Every second: a replica that exited without the nemesis is a violation (and is restarted, so
/// the soak goes on); the largest RSS is kept.
async fn watch_health(
    tl: Arc<Timeline>,
    launcher: Arc<Launcher>,
    replicas: [Arc<Mutex<ControllerProcess>>; 2],
    max_rss: Arc<AtomicUsize>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (i, replica) in replicas.iter().enumerate() {
            let Ok(mut process) = replica.try_lock() else {
                continue; // a fault holds it
            };
            if let Some(status) = process.try_exit() {
                tl.violation(
                    tl.now(),
                    format!("health: replica {i} exited on its own ({status})"),
                );
                tl.event(KINDS[9], format!("replica {i}: {status}"));
                *process = launcher.start(i);
                continue;
            }
            let rss = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            max_rss.fetch_max(rss, Ordering::Relaxed);
        }
    }
}
