//! A real Consul server per test: one server agent (its own datacenter, raft data in a temp
//! dir, so a restart keeps the registry and [`Consul::wipe_and_restart`] loses it) on free
//! loopback ports, killed on drop, its log printed when the test fails.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{built_bin, free_port, http_get, tail};

/// How long a start (to an elected leader) may take before the test fails.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The pinned Consul binary (built by `scripts/consul.sh`; `CONSUL_BIN` overrides).
///
/// # Panics
/// When it is missing: tests that need it fail, never skip.
#[must_use]
pub fn consul_bin() -> PathBuf {
    built_bin(
        "target/consul/bin",
        "consul",
        "CONSUL_BIN",
        "scripts/consul.sh",
    )
}

/// A running single-server Consul on free loopback ports with its own data dir.
pub struct Consul {
    child: Option<Child>,
    dir: TempDir,
    ports: Ports,
    starts: u32,
    /// Extra `-hcl` settings (ACLs, TLS), and the HTTPS port when TLS is on.
    hcl: Vec<String>,
    https: Option<u16>,
}

/// The management token of a Consul started by [`Consul::start_secured`].
pub const MANAGEMENT_TOKEN: &str = "6b1fd0b8-8b4e-4a4e-9f3c-3f0c2a9e1d01";

#[derive(Clone, Copy, Debug)]
struct Ports {
    http: u16,
    dns: u16,
    server: u16,
    serf_lan: u16,
    serf_wan: u16,
}

impl Ports {
    /// Five different free ports (five separate `free_port` calls once gave Serf's LAN and
    /// WAN the same one, and Consul refused to start).
    fn free() -> Self {
        let [http, dns, server, serf_lan, serf_wan] = crate::free_ports();
        Self {
            http,
            dns,
            server,
            serf_lan,
            serf_wan,
        }
    }
}

impl Consul {
    /// Starts a Consul server and waits until it has elected itself leader.
    ///
    /// # Panics
    /// When the binary is missing or Consul has no leader within the deadline.
    pub async fn start() -> Self {
        Self::start_with(Vec::new(), None).await
    }

    /// As [`Consul::start`], with ACLs on (default deny, [`MANAGEMENT_TOKEN`]) and the HTTPS API
    /// served with a certificate from `ca` (the plain HTTP port stays, for readiness checks).
    ///
    /// # Panics
    /// As [`Consul::start`].
    pub async fn start_secured(ca: &crate::pki::TestCa) -> Self {
        let server = ca.server("consul");
        let https = free_port();
        let hcl = vec![
            format!(
                "acl {{ enabled = true\n default_policy = \"deny\"\n tokens {{ initial_management = \"{MANAGEMENT_TOKEN}\" }} }}"
            ),
            format!(
                "tls {{ defaults {{ ca_file = \"{}\"\n cert_file = \"{}\"\n key_file = \"{}\"\n verify_incoming = false }} }}",
                ca.ca_file().display(),
                server.cert.display(),
                server.key.display()
            ),
            format!("ports {{ https = {https} }}"),
        ];
        Self::start_with(hcl, Some(https)).await
    }

    async fn start_with(hcl: Vec<String>, https: Option<u16>) -> Self {
        let mut consul = Self {
            hcl,
            https,
            child: None,
            dir: tempfile::Builder::new()
                .prefix("consul-test-")
                .tempdir()
                .expect("failed to create consul temp dir"),
            ports: Ports::free(),
            starts: 0,
        };
        // Free ports are found by binding port 0 and letting go, so a parallel test may take
        // one first; then Consul says so and we retry on fresh ports.
        let mut attempt = 1;
        loop {
            consul.spawn();
            match consul.try_ready().await {
                Ok(()) => return consul,
                Err(log) if log.contains("address already in use") && attempt < 5 => {
                    attempt += 1;
                    consul.stop();
                    consul.ports = Ports::free();
                    let _ = std::fs::remove_dir_all(consul.data_dir());
                }
                Err(log) => panic!("consul failed to start:\n{log}"),
            }
        }
    }

    /// The HTTPS API address, `https://127.0.0.1:<port>`, of a [`Consul::start_secured`].
    #[must_use]
    pub fn https_addr(&self) -> Option<String> {
        self.https.map(|port| format!("https://127.0.0.1:{port}"))
    }

    /// The HTTP API address, `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn http_addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// The HTTP API port.
    #[must_use]
    pub fn http_port(&self) -> u16 {
        self.ports.http
    }

    /// The DNS interface (UDP and TCP).
    #[must_use]
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.dns))
    }

    /// The Consul process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills Consul (SIGKILL), keeping its data dir and ports.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Consul again on the same ports and data (the registry survives), and waits for
    /// a leader.
    ///
    /// # Panics
    /// As [`Consul::start`].
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready().await;
    }

    /// Stops Consul, deletes its data, and starts an empty one on the same address: the
    /// catalog and KV are gone, as after losing a dev agent or a whole cluster's data.
    ///
    /// # Panics
    /// As [`Consul::start`].
    pub async fn wipe_and_restart(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.data_dir()).expect("failed to wipe consul data dir");
        self.spawn();
        self.wait_ready().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("consul.log")
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("failed to open consul log");
        let p = self.ports;
        let child = Command::new(consul_bin())
            .args(["agent", "-server", "-bootstrap-expect=1", "-ui=false"])
            .arg(format!("-node=consul-test-{}", p.http))
            .arg(format!("-data-dir={}", self.data_dir().display()))
            .args([
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                "-advertise=127.0.0.1",
            ])
            .arg(format!("-http-port={}", p.http))
            .arg(format!("-dns-port={}", p.dns))
            .arg(format!("-server-port={}", p.server))
            .arg(format!("-serf-lan-port={}", p.serf_lan))
            .arg(format!("-serf-wan-port={}", p.serf_wan))
            .args(["-grpc-port=-1", "-grpc-tls-port=-1", "-log-level=info"])
            // Raft timings as in dev mode, so a start or restart elects a leader in a second.
            .args(["-hcl", "performance { raft_multiplier = 1 }"])
            .args(["-hcl", "disable_update_check = true"])
            .args(self.hcl.iter().flat_map(|h| ["-hcl", h.as_str()]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("failed to clone log handle"))
            .stderr(log)
            .spawn()
            .expect("failed to spawn consul");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        if let Err(log) = self.try_ready().await {
            panic!("consul failed to start:\n{log}");
        }
    }

    /// Waits until Consul has a leader; on an exit or the deadline, returns its log.
    async fn try_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "consul exited during start ({status}):\n{}",
                    self.log_tail()
                ));
            }
            // A leader, and the catalog answering through it.
            if let Some((200, leader)) = http_get(self.ports.http, "/v1/status/leader").await
                && leader.trim().trim_matches('"').contains(':')
                && matches!(
                    http_get(self.ports.http, "/v1/catalog/nodes").await,
                    Some((200, _))
                )
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "consul has no leader within {READY_DEADLINE:?}:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last part of Consul's log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 8192)
    }

    /// The temp dir holding the data and the log.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- consul log ({} starts) ---\n{}\n--- end consul log ---",
                self.starts,
                self.log_tail()
            );
        }
    }
}

/// What a passing-only client sees of `service`: a blocking `Health().Service(passing)` query
/// from `index` (0 answers at once, as does a query that waits out `wait`), as sorted
/// `address:port` strings, and the index to block on next. Empty when Consul does not answer.
pub async fn passing(
    http_addr: &str,
    service: &str,
    index: u64,
    wait: Duration,
) -> (Vec<String>, u64) {
    let url = format!(
        "{http_addr}/v1/health/service/{service}?passing=true&index={index}&wait={}ms",
        wait.as_millis()
    );
    let Ok(resp) = reqwest::get(url).await else {
        return (Vec::new(), index);
    };
    let next = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(index);
    let entries: serde_json::Value = resp.json().await.unwrap_or_default();
    let mut addrs: Vec<String> = entries
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{}:{}",
                e["Service"]["Address"].as_str().unwrap_or_default(),
                e["Service"]["Port"]
            )
        })
        .collect();
    addrs.sort();
    (addrs, next)
}
