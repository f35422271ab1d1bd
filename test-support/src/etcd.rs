//! A real etcd server per test.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{controlplane_bin, free_ports, tail};

/// How long a start may take before the test fails.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// A running etcd on free loopback ports with its own data dir.
pub struct EtcdServer {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    starts: u32,
    extra_args: Vec<String>,
    access: EtcdAccess,
}

/// How a client reaches a test etcd: TLS material and credentials, when it requires them.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    /// CA, client certificate and key, PEM, when etcd serves TLS with client-cert auth.
    pub tls: Option<(String, String, String)>,
    /// User and password, once auth is enabled.
    pub user: Option<(String, String)>,
}

impl EtcdAccess {
    /// Connect options carrying this access.
    #[must_use]
    pub fn options(&self) -> etcd_client::ConnectOptions {
        let mut options = etcd_client::ConnectOptions::new().with_auto_token_refresh(true);
        if let Some((ca, cert, key)) = &self.tls {
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca))
                    .identity(etcd_client::Identity::from_pem(cert, key)),
            );
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user, password);
        }
        options
    }
}

impl EtcdServer {
    /// Starts etcd and waits until it serves requests.
    ///
    /// # Panics
    /// When the binary is missing or etcd is not ready within the deadline.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags (e.g. `--auth-token-ttl=5`).
    ///
    /// # Panics
    /// As [`EtcdServer::start`].
    pub async fn start_with(extra_args: &[&str]) -> Self {
        Self::start_inner(extra_args, EtcdAccess::default()).await
    }

    /// Starts etcd serving TLS on its client URL and requiring client certificates signed by
    /// `ca` (`--client-cert-auth`). The harness's own client uses a certificate for `root`.
    ///
    /// # Panics
    /// As [`EtcdServer::start`].
    pub async fn start_tls(ca: &crate::TestCa) -> Self {
        let server = ca.server("etcd");
        let root = ca.client("root");
        let args = [
            format!("--cert-file={}", server.cert.display()),
            format!("--key-file={}", server.key.display()),
            format!("--trusted-ca-file={}", ca.ca_file().display()),
            "--client-cert-auth".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let access = EtcdAccess {
            tls: Some((ca.ca_pem().to_owned(), root.cert_pem, root.key_pem)),
            user: None,
        };
        Self::start_inner(&args, access).await
    }

    /// Turns on etcd auth with a `root` user (password `root_password`); the harness's client
    /// authenticates as root from then on.
    ///
    /// # Panics
    /// When etcd refuses.
    pub async fn enable_auth(&mut self, root_password: &str) {
        let mut client = self.client().await;
        client
            .user_add("root", root_password, None)
            .await
            .expect("failed to add root");
        client
            .user_grant_role("root", "root")
            .await
            .expect("failed to grant root");
        client.auth_enable().await.expect("failed to enable auth");
        self.access.user = Some(("root".to_owned(), root_password.to_owned()));
    }

    /// The etcd process id, while it runs (for CPU and memory readings in benches).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How clients reach this etcd.
    #[must_use]
    pub fn access(&self) -> &EtcdAccess {
        &self.access
    }

    async fn start_inner(extra_args: &[&str], access: EtcdAccess) -> Self {
        let [client_port, peer_port] = free_ports();
        let mut server = Self {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("etcd-test-")
                .tempdir()
                .expect("failed to create etcd temp dir"),
            client_port,
            peer_port,
            starts: 0,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            access,
        };
        // Free ports are found by binding port 0 and letting go, so a parallel test can take the
        // same port first; then etcd says so and we retry on fresh ports.
        let mut attempt = 1;
        loop {
            server.spawn();
            match server.try_ready().await {
                Ok(()) => return server,
                Err(log) if log.contains("address already in use") && attempt < 5 => {
                    attempt += 1;
                    server.stop();
                    [server.client_port, server.peer_port] = free_ports();
                    let _ = std::fs::remove_dir_all(server.data_dir());
                }
                Err(log) => panic!("etcd failed to start:\n{log}"),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https` when serving TLS).
    #[must_use]
    pub fn endpoint(&self) -> String {
        let scheme = if self.access.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// A connected client (as root, once auth is on).
    ///
    /// # Panics
    /// When the connection cannot be set up.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], Some(self.access.options()))
            .await
            .expect("failed to connect to test etcd")
    }

    /// Kills etcd (SIGKILL), keeping its data dir and ports.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir, and waits until it is ready.
    ///
    /// # Panics
    /// As [`EtcdServer::start`].
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready().await;
    }

    /// Stops etcd, deletes its data, and starts an empty etcd on the same address.
    ///
    /// # Panics
    /// As [`EtcdServer::start`].
    pub async fn wipe_and_restart(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.data_dir()).expect("failed to wipe etcd data dir");
        self.spawn();
        self.wait_ready().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let bin = controlplane_bin("etcd", "ETCD_BIN");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("failed to open etcd log");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(bin)
            .arg(format!("--name=test-{}", self.client_port))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!(
                "--initial-cluster=test-{}={peer}",
                self.client_port
            ))
            .arg("--log-level=warn")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("failed to clone log handle"))
            .stderr(log)
            .spawn()
            .expect("failed to spawn etcd");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        if let Err(log) = self.try_ready().await {
            panic!("etcd failed to start:\n{log}");
        }
    }

    /// Waits until etcd serves requests; on an exit or the deadline, returns its log.
    async fn try_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "etcd exited during start ({status}):\n{}",
                    self.log_tail()
                ));
            }
            let probe = async {
                let mut client =
                    etcd_client::Client::connect([self.endpoint()], Some(self.access.options()))
                        .await?;
                client.status().await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd not ready within {READY_DEADLINE:?}:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last part of etcd's log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 8192)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- etcd log ({} starts) ---\n{}\n--- end etcd log ---",
                self.starts,
                self.log_tail()
            );
        }
    }
}
