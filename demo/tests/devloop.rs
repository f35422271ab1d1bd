//! `scripts/dev.sh up` / `down`, as a user runs them: the control plane stays up with the real
//! controller, kubectl and etcdctl from the printed environment work against it, and `down`
//! stops everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The exports of the env file, with `$PATH` expanded.
fn exports(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.replace("$PATH", &std::env::var("PATH").unwrap_or_default());
            (k.to_owned(), v)
        })
        .collect()
}

fn run(env: &BTreeMap<String, String>, program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .envs(env)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn dev(dir: &Path, verb: &str) -> (bool, String) {
    dev_with(dir, &[verb])
}

fn dev_with(dir: &Path, args: &[&str]) -> (bool, String) {
    let devloop = PathBuf::from(env!("CARGO_BIN_EXE_devloop"));
    let controller = devloop.with_file_name("grpc-registrar");
    assert!(
        controller.is_file(),
        "{} is missing: build the workspace first (make test does)",
        controller.display()
    );
    let out = Command::new(root().join("scripts/dev.sh"))
        .args(args)
        .env("DEV_DIR", dir)
        .env("DEV_SKIP_BUILD", "1")
        .env("DEVLOOP_BIN", &devloop)
        .env("GRPC_REGISTRAR_BIN", &controller)
        .output()
        .expect("failed to run scripts/dev.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Stops the dev loop even when an assertion fails.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = dev(self.0, "down");
    }
}

/// Polls `check` for up to 30 s.
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dev_up_runs_the_real_controller_until_dev_down_and_kubectl_and_etcdctl_work_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = dev(dir.path(), "up");
    let _down = Down(dir.path());
    assert!(ok, "dev.sh up failed:\n{out}");
    assert!(
        out.contains("export KUBECONFIG=") && out.contains("ETCDCTL_ENDPOINTS="),
        "{out}"
    );
    let env = exports(&std::fs::read_to_string(dir.path().join("env")).unwrap());

    let manifest = dir.path().join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: grpc-registrar.io/v1alpha1\nkind: GrpcService\nmetadata: {name: greeter, namespace: default}\nspec:\n  selector: {matchLabels: {app: greeter}}\n  port: grpc\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: greeter-0, namespace: default, labels: {app: greeter}}\nspec:\n  nodeName: demo-node\n  containers: [{name: server, image: greeter:dev, ports: [{name: grpc, containerPort: 50051}]}]\n",
    )
    .unwrap();
    let (ok, out) = run(
        &env,
        "kubectl",
        &["apply", "-f", manifest.to_str().unwrap()],
    );
    assert!(ok, "kubectl apply: {out}");
    let (ok, out) = dev_with(dir.path(), &["ready", "greeter-0", "10.1.0.1"]);
    assert!(ok, "dev.sh ready: {out}");
    let registered = |key: &str| {
        run(
            &env,
            "etcdctl",
            &["get", "--prefix", "--keys-only", "services/"],
        )
        .1
        .lines()
        .any(|l| l == key)
    };
    let ready = || {
        run(
            &env,
            "kubectl",
            &[
                "get",
                "grpcsvc",
                "greeter",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        )
        .1
        .trim()
            == "True"
    };
    wait_for("greeter-0 registered and Ready", || {
        registered("services/default/greeter/10.1.0.1:50051") && ready()
    });

    // A Service's EndpointSlices: kube-controller-manager needs the pod's node, demo-node.
    let service = dir.path().join("hello.yaml");
    std::fs::write(
        &service,
        "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: default}\nspec:\n  selector: {app: greeter}\n  ports: [{name: grpc, port: 50051, targetPort: grpc}]\n---\napiVersion: grpc-registrar.io/v1alpha1\nkind: GrpcService\nmetadata: {name: hello, namespace: default}\nspec:\n  serviceRef: {name: hello, port: grpc}\n",
    )
    .unwrap();
    let (ok, out) = run(&env, "kubectl", &["apply", "-f", service.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {out}");
    wait_for("the serviceRef endpoint registered", || {
        registered("services/default/hello/10.1.0.1:50051")
    });

    // The controller alone: restarted on request, and reported when it dies.
    let (ok, out) = dev(dir.path(), "status");
    assert!(ok && out.contains("controller running"), "{out}");
    let (ok, out) = dev(dir.path(), "restart");
    assert!(ok && out.contains("controller restarted"), "{out}");
    let controller: u32 = std::fs::read_to_string(dir.path().join("controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &controller.to_string()])
        .status()
        .unwrap();
    wait_for("dev.sh status reports the dead controller", || {
        let (ok, out) = dev(dir.path(), "status");
        !ok && out.contains("controller NOT running")
    });
    let (ok, out) = dev(dir.path(), "restart");
    assert!(ok && out.contains("controller restarted"), "{out}");
    assert!(registered("services/default/greeter/10.1.0.1:50051"));

    // Readiness and deletion through the helpers, followed by the restarted controller.
    let (ok, out) = dev_with(dir.path(), &["unready", "greeter-0"]);
    assert!(ok, "dev.sh unready: {out}");
    wait_for("greeter-0 deregistered", || {
        !registered("services/default/greeter/10.1.0.1:50051")
    });
    let (ok, out) = dev_with(dir.path(), &["ready", "greeter-0"]);
    assert!(ok, "dev.sh ready: {out}");
    wait_for("greeter-0 registered again, with its IP kept", || {
        registered("services/default/greeter/10.1.0.1:50051")
    });
    let (ok, out) = dev_with(dir.path(), &["delete", "default/greeter-0"]);
    assert!(ok, "dev.sh delete: {out}");
    wait_for("the deleted pod deregistered", || {
        !registered("services/default/greeter/10.1.0.1:50051")
    });

    let pid: u32 = std::fs::read_to_string(dir.path().join("devloop.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (ok, out) = dev(dir.path(), "down");
    assert!(ok && out.contains("dev loop stopped"), "{out}");
    let alive = Command::new("kill")
        .args(["-0", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(!alive, "the dev loop (pid {pid}) still runs after down");
    assert!(
        !dir.path().join("env").exists(),
        "the env file outlived the dev loop"
    );
}
