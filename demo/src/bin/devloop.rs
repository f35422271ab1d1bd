//! `make dev`: a local control plane that stays up, with the real controller binary, for trying
//! your own GrpcServices with kubectl. Started in the background by `scripts/dev.sh up` and
//! stopped by `scripts/dev.sh down` (SIGTERM), which is what this process waits for.
//!
//! Usage: `devloop STATE_DIR CONTROLLER_BINARY`. Writes `STATE_DIR/env` (shell exports: the
//! kubeconfig, the registry etcd endpoint, the metrics address) once everything is ready, the
//! controller's log to `STATE_DIR/controller.log` and its pid to `STATE_DIR/controller.pid`.
//!
//! SIGHUP restarts the controller alone (`scripts/dev.sh restart`, after a rebuild); a
//! controller that exits on its own is reported here and its pid file removed, so
//! `scripts/dev.sh status` can say so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use test_support::{ControlPlane, EtcdServer, free_port};

const DEV_NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: demo-node\n  labels: {topology.kubernetes.io/zone: demo-zone-a}\n";

/// How to start the controller, again on each restart.
struct Start {
    binary: PathBuf,
    kubeconfig: PathBuf,
    etcd: String,
    metrics: u16,
    state: PathBuf,
}

impl Start {
    /// Starts the controller, appending to its log, and records its pid.
    fn spawn(&self) -> anyhow::Result<Controller> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("controller.log"))
            .context("failed to open the controller log")?;
        let child = Command::new(&self.binary)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(["--etcd-endpoints", &self.etcd])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.metrics)])
            .args(["--lease-ttl", "10"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {}", self.binary.display()))?;
        std::fs::write(self.state.join("controller.pid"), child.id().to_string())
            .context("failed to write the controller's pid")?;
        Ok(Controller(child))
    }
}

/// The controller process, stopped with SIGTERM (as a kubelet would) when dropped.
struct Controller(Child);

impl Controller {
    /// How it ended, once it has.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(state), Some(binary)) = (args.next(), args.next()) else {
        bail!("usage: devloop STATE_DIR CONTROLLER_BINARY");
    };
    let (state, binary) = (PathBuf::from(state), PathBuf::from(binary));
    std::fs::create_dir_all(&state).context("failed to create the state directory")?;
    ensure!(
        binary.is_file(),
        "no controller binary at {}",
        binary.display()
    );

    let plane = ControlPlane::start().await;
    let registry = EtcdServer::start().await;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    plane.install_crd(&format!("{root}/crds/grpcservice.yaml"));

    // The node pods run on (`nodeName: demo-node`): kube-controller-manager's endpointslice
    // controller leaves out pods whose Node does not exist, so `serviceRef` needs it.
    let node = state.join("demo-node.yaml");
    std::fs::write(&node, DEV_NODE).context("failed to write the node manifest")?;
    let (ok, out, err) = plane.kubectl(&["apply", "-f", &node.to_string_lossy()]);
    ensure!(ok, "failed to create the node demo-node: {out}{err}");

    let metrics = free_port();
    let start = Start {
        binary,
        kubeconfig: plane.kubeconfig().to_path_buf(),
        etcd: registry.endpoint(),
        metrics,
        state: state.clone(),
    };
    let mut controller = Some(start.spawn()?);

    let bin = test_support::controlplane_bin("kubectl", "KUBECTL_BIN");
    let bin_dir = bin.parent().context("kubectl has no directory")?;
    let env = format!(
        "# grpc-registrar dev loop (pid {pid}); `scripts/dev.sh down` stops it.\n\
         export KUBECONFIG={kubeconfig}\n\
         export ETCD_ENDPOINTS={etcd}\n\
         export ETCDCTL_ENDPOINTS={etcd}\n\
         export GRPC_REGISTRAR_METRICS=http://127.0.0.1:{metrics}/metrics\n\
         export GRPC_REGISTRAR_LOG={log}\n\
         export PATH={bin_dir}:$PATH\n",
        pid = std::process::id(),
        kubeconfig = plane.kubeconfig().display(),
        etcd = registry.endpoint(),
        log = state.join("controller.log").display(),
        bin_dir = bin_dir.display(),
    );
    let tmp = state.join("env.tmp");
    std::fs::write(&tmp, env).context("failed to write the env file")?;
    std::fs::rename(&tmp, state.join("env")).context("failed to write the env file")?;

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                drop(controller.take());
                controller = Some(start.spawn()?);
                println!("controller restarted");
            }
            _ = check.tick() => {
                if let Some(status) = controller.as_mut().and_then(Controller::exited) {
                    controller = None;
                    let _ = std::fs::remove_file(state.join("controller.pid"));
                    println!(
                        "controller exited ({status}); see {}; `scripts/dev.sh restart` starts it again",
                        state.join("controller.log").display()
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(state.join("env"));
    // Controller first (it finishes in-flight work), then the registry and the control plane.
    drop(controller);
    drop(registry);
    drop(plane);
    Ok(())
}
