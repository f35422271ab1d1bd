//! A real Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager, driven like
//! envtest.
//!
//! Serving and client certificates are generated per start (rcgen), the admin identity is a
//! client certificate in `system:masters`, authorization is RBAC, and a kubeconfig is written to
//! the temp dir so that kubectl, kube-rs and the controller manager all use it.
//!
//! The controller manager runs only the endpointslice controller, so a Service with a selector
//! gets real EndpointSlices. There is no kubelet and no scheduler: a test creates the Node, binds
//! the pod to it with `spec.nodeName`, and patches the pod's status (`podIP`, phase, the `Ready`
//! condition) as a kubelet would. The controller leaves out a pod whose Node does not exist.

mod controller_manager;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::{controlplane_bin, free_ports, tail};

/// How long kube-apiserver may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(90);

/// How long kube-controller-manager may take, once the API server is ready, to run its
/// endpointslice controller.
const CONTROLLER_MANAGER_DEADLINE: Duration = Duration::from_secs(60);

/// Files written for one control plane.
struct Pki {
    ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    admin_cert: String,
    admin_key: String,
    ca_pem: String,
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("failed to write pki file");
        path
    };
    let ca_key = KeyPair::generate().expect("failed to generate ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "grpc-registrar test ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .expect("failed to self-sign ca");
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().expect("failed to generate serving key");
    let mut serving = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("serving params");
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving
        .signed_by(&serving_key, &issuer)
        .expect("failed to sign serving cert");

    let admin_key = KeyPair::generate().expect("failed to generate admin key");
    let mut admin = CertificateParams::new(Vec::<String>::new()).expect("admin params");
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin
        .signed_by(&admin_key, &issuer)
        .expect("failed to sign admin cert");

    let sa_key = KeyPair::generate().expect("failed to generate service account key");
    Pki {
        ca: write("ca.crt", &ca_cert.pem()),
        serving_cert: write("apiserver.crt", &serving_cert.pem()),
        serving_key: write("apiserver.key", &serving_key.serialize_pem()),
        sa_key: write("sa.key", &sa_key.serialize_pem()),
        sa_pub: write("sa.pub", &sa_key.public_key_pem()),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        ca_pem: ca_cert.pem(),
    }
}

/// A running etcd, kube-apiserver and kube-controller-manager on free loopback ports, killed on
/// drop.
pub struct ControlPlane {
    etcd: Option<Child>,
    apiserver: Mutex<Option<Child>>,
    /// Computes EndpointSlices; it outlives API server restarts and reconnects by itself.
    controller_manager: Option<Child>,
    /// How kube-apiserver is started, for restarts.
    apiserver_args: Vec<String>,
    etcd_url: String,
    dir: TempDir,
    port: u16,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver, waits until `/readyz` answers, then starts
    /// kube-controller-manager and waits until its endpointslice controller runs.
    ///
    /// # Panics
    /// When a binary is missing, a process exits, or either server is not ready within its
    /// deadline.
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// As [`ControlPlane::start`], without kube-controller-manager: for benches of the pod
    /// source alone, where its pod informer would compete for the CPU with the controller
    /// measured.
    ///
    /// # Panics
    /// As [`ControlPlane::start`].
    pub async fn start_without_controller_manager() -> Self {
        Self::start_with(false).await
    }

    async fn start_with(controller_manager: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("controlplane-")
            .tempdir()
            .expect("failed to create control plane temp dir");
        let pki = pki(dir.path());
        let [etcd_client, etcd_peer, port] = free_ports();

        let log = |name: &str| File::create(dir.path().join(name)).expect("failed to create log");
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd = Command::new(controlplane_bin("etcd", "ETCD_BIN"))
            .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log("etcd.log"))
            .stderr(log("etcd.log"))
            .spawn()
            .expect("failed to spawn control plane etcd");

        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", dir.path().join("certs").display()),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            format!("--client-ca-file={}", pki.ca.display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--service-account-key-file={}", pki.sa_pub.display()),
            format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ),
            "--service-account-issuer=https://127.0.0.1".to_owned(),
            "--enable-priority-and-fairness=false".to_owned(),
            "--v=1".to_owned(),
        ];
        let apiserver = spawn_apiserver(dir.path(), &apiserver_args);

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(port, &pki))
            .expect("failed to write kubeconfig");
        let mut plane = Self {
            etcd: Some(etcd),
            apiserver: Mutex::new(Some(apiserver)),
            controller_manager: None,
            apiserver_args,
            etcd_url,
            dir,
            port,
            kubeconfig,
        };
        plane.wait_ready().await;
        if controller_manager {
            // Started once the API server is ready: it gives the API server only 10s to be
            // healthy.
            let (child, port) = controller_manager::spawn(
                plane.dir.path(),
                &plane.kubeconfig,
                (&pki.serving_cert, &pki.serving_key),
            );
            plane.controller_manager = Some(child);
            plane.wait_controller_manager(port).await;
        }
        plane
    }

    /// The kubeconfig path, for kubectl and for clients.
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A fresh admin client (one per runtime: kube clients are bound to the runtime they run on).
    ///
    /// # Panics
    /// When the kubeconfig cannot be read.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .expect("failed to read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("failed to load kubeconfig");
        kube::Client::try_from(config).expect("failed to build kube client")
    }

    /// Runs kubectl against this control plane; returns (success, stdout, stderr).
    ///
    /// # Panics
    /// When kubectl cannot be run at all.
    #[must_use]
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(crate::controlplane_bin("kubectl", "KUBECTL_BIN"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("failed to run kubectl (built by scripts/controlplane.sh)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply`s the CRD at `path` (as the README tells users) and waits until it is
    /// established.
    ///
    /// # Panics
    /// When kubectl fails.
    pub fn install_crd(&self, path: &str) {
        let (ok, out, err) = self.kubectl(&["apply", "-f", path]);
        assert!(ok, "kubectl apply of {path} failed:\n{out}\n{err}");
        let (ok, out, err) = self.kubectl(&[
            "wait",
            "--for=condition=established",
            "-f",
            path,
            "--timeout=60s",
        ]);
        assert!(ok, "CRD {path} not established:\n{out}\n{err}");
    }

    /// The URL of the etcd under the API server (for tests that compact it).
    #[must_use]
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// Kills kube-apiserver and starts it again with the same flags and data, waiting until it
    /// is ready. Every watch is broken; clients reconnect to the same address, and so does
    /// kube-controller-manager, which keeps running.
    ///
    /// # Panics
    /// When it is not ready again within the deadline.
    pub async fn restart_apiserver(&self) {
        {
            let mut apiserver = self.apiserver.lock().expect("lock");
            if let Some(mut child) = apiserver.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            *apiserver = Some(spawn_apiserver(self.dir.path(), &self.apiserver_args));
        }
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_DEADLINE;
        let client = self.client().await;
        loop {
            let exited = self
                .apiserver
                .lock()
                .expect("lock")
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "control plane process exited during start ({status}):\n{}",
                    self.logs()
                );
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("readyz request");
            if let Ok(Ok(body)) =
                tokio::time::timeout(Duration::from_secs(2), client.request_text(request)).await
                && body.trim() == "ok"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within {READY_DEADLINE:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the controller manager on `port` runs its endpointslice controller.
    async fn wait_controller_manager(&mut self, port: u16) {
        let deadline = Instant::now() + CONTROLLER_MANAGER_DEADLINE;
        let client = controller_manager::health_client(port, &self.kubeconfig).await;
        loop {
            let exited = self
                .controller_manager
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "kube-controller-manager exited during start ({status}):\n{}",
                    self.logs()
                );
            }
            if controller_manager::controller_healthy(&client).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-controller-manager not healthy within {CONTROLLER_MANAGER_DEADLINE:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last part of every log.
    #[must_use]
    pub fn logs(&self) -> String {
        format!(
            "--- etcd ---\n{}\n--- kube-apiserver ---\n{}\n--- kube-controller-manager ---\n{}",
            tail(&self.dir.path().join("etcd.log"), 4096),
            tail(&self.dir.path().join("kube-apiserver.log"), 12288),
            tail(&self.dir.path().join(controller_manager::LOG), 8192)
        )
    }
}

fn spawn_apiserver(dir: &Path, args: &[String]) -> Child {
    let log = || {
        File::options()
            .create(true)
            .append(true)
            .open(dir.join("kube-apiserver.log"))
            .expect("failed to open the kube-apiserver log")
    };
    Command::new(controlplane_bin("kube-apiserver", "KUBE_APISERVER_BIN"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log())
        .stderr(log())
        .spawn()
        .expect("failed to spawn kube-apiserver")
}

fn kubeconfig_yaml(port: u16, pki: &Pki) -> String {
    use std::fmt::Write as _;
    let b64 = |s: &str| base64_encode(s.as_bytes());
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
        b64(&pki.ca_pem),
        b64(&pki.admin_cert),
        b64(&pki.admin_key),
    );
    out
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The controller manager first, so it does not log the API server going away.
        let apiserver = self.apiserver.get_mut().map_or(None, Option::take);
        let children = [self.controller_manager.take(), apiserver, self.etcd.take()];
        for child in children.into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
