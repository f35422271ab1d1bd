//! `make dev`: a local control plane that stays up, with the real controller binary, for trying
//! your own GrpcServices with kubectl. Started in the background by `scripts/dev.sh up` and
//! stopped by `scripts/dev.sh down` (SIGTERM), which is what this process waits for.
//!
//! Usage: `devloop STATE_DIR CONTROLLER_BINARY`. Writes `STATE_DIR/env` (shell exports: the
//! kubeconfig, the registry etcd endpoint, the metrics address) once everything is ready, and
//! the controller's log to `STATE_DIR/controller.log`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use test_support::{ControlPlane, EtcdServer, free_port};

/// The controller process, stopped with SIGTERM (as a kubelet would) when dropped.
struct Controller(Child);

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

    let metrics = free_port();
    let log = std::fs::File::create(state.join("controller.log"))
        .context("failed to create the controller log")?;
    let controller = Controller(
        Command::new(&binary)
            .env("KUBECONFIG", plane.kubeconfig())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(["--etcd-endpoints", &registry.endpoint()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--lease-ttl", "10"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?,
    );

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

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(state.join("env"));
    // Controller first (it finishes in-flight work), then the registry and the control plane.
    drop(controller);
    drop(registry);
    drop(plane);
    Ok(())
}
