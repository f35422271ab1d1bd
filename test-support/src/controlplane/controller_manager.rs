//! kube-controller-manager running only the endpointslice controller, so that a Service with a
//! selector gets the EndpointSlices a cluster would compute from its pods.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{controlplane_bin, free_port};

/// The one controller it runs, by its v1.36 name (`endpointslice` is an alias). Its health
/// check carries the same name.
const CONTROLLER: &str = "endpointslice-controller";

/// The log file, in the control plane's temp dir.
pub(super) const LOG: &str = "kube-controller-manager.log";

/// Starts kube-controller-manager against the API server behind `kubeconfig`; returns the child
/// and its secure port (which serves `/healthz`).
///
/// # Panics
/// When the binary is missing or cannot be spawned.
pub(super) fn spawn(dir: &Path, kubeconfig: &Path, serving: (&Path, &Path)) -> (Child, u16) {
    let port = free_port();
    let log = || {
        File::options()
            .create(true)
            .append(true)
            .open(dir.join(LOG))
            .expect("failed to open the kube-controller-manager log")
    };
    let child = Command::new(controlplane_bin(
        "kube-controller-manager",
        "KUBE_CONTROLLER_MANAGER_BIN",
    ))
    .arg(format!("--kubeconfig={}", kubeconfig.display()))
    .arg(format!("--controllers={CONTROLLER}"))
    // One instance per plane: no lease to take, nothing to lose when the API server restarts.
    .arg("--leader-elect=false")
    // The admin client for the controller, rather than a service-account token it would
    // need the (disabled) token controller and a signing key for.
    .arg("--use-service-account-credentials=false")
    // Port 0 turns secure serving (and so /healthz) off, hence a free port. It serves the API
    // server's certificate (issued for 127.0.0.1 by the plane's CA), so that its health is
    // checked with verification on. /healthz is on the default always-allow paths, so no
    // delegated authentication or authorization is configured.
    .arg("--bind-address=127.0.0.1")
    .arg(format!("--secure-port={port}"))
    .arg(format!("--tls-cert-file={}", serving.0.display()))
    .arg(format!("--tls-private-key-file={}", serving.1.display()))
    // A pod change is synced at once rather than batched (0 is also the default).
    .arg("--endpointslice-updates-batch-period=0s")
    .arg("--v=1")
    // Without a kubeconfig for delegated authentication it would look for an in-cluster
    // config: never the cluster a test happens to run in.
    .env_remove("KUBERNETES_SERVICE_HOST")
    .env_remove("KUBERNETES_SERVICE_PORT")
    .stdin(Stdio::null())
    .stdout(log())
    .stderr(log())
    .spawn()
    .expect("failed to spawn kube-controller-manager");
    (child, port)
}

/// A client for its secure port: the plane's admin kubeconfig (its CA verifies the serving
/// certificate), pointed at `port`.
///
/// # Panics
/// When the kubeconfig cannot be read or the client built.
pub(super) async fn health_client(port: u16, kubeconfig: &Path) -> kube::Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(kubeconfig).expect("failed to read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("failed to load kubeconfig");
    config.cluster_url = format!("https://127.0.0.1:{port}")
        .parse()
        .expect("controller manager url");
    kube::Client::try_from(config).expect("failed to build the controller manager client")
}

/// Whether it serves `/healthz` with the endpointslice controller's check passing (the check is
/// registered once the controller is built, just before its informers start).
pub(super) async fn controller_healthy(client: &kube::Client) -> bool {
    let request = http::Request::get("/healthz?verbose")
        .body(Vec::new())
        .expect("healthz request");
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.request_text(request)).await,
        Ok(Ok(body)) if body.contains(&format!("[+]{CONTROLLER} ok"))
    )
}
