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
    let devloop = PathBuf::from(env!("CARGO_BIN_EXE_devloop"));
    let controller = devloop.with_file_name("grpc-registrar");
    assert!(
        controller.is_file(),
        "{} is missing: build the workspace first (make test does)",
        controller.display()
    );
    let out = Command::new(root().join("scripts/dev.sh"))
        .arg(verb)
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
        "apiVersion: grpc-registrar.io/v1alpha1\nkind: GrpcService\nmetadata: {name: greeter, namespace: default}\nspec:\n  selector: {matchLabels: {app: greeter}}\n  port: grpc\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: greeter-0, namespace: default, labels: {app: greeter}}\nspec:\n  nodeName: dev-node\n  containers: [{name: server, image: greeter:dev, ports: [{name: grpc, containerPort: 50051}]}]\n",
    )
    .unwrap();
    let (ok, out) = run(
        &env,
        "kubectl",
        &["apply", "-f", manifest.to_str().unwrap()],
    );
    assert!(ok, "kubectl apply: {out}");
    let (ok, out) = run(
        &env,
        "kubectl",
        &[
            "patch",
            "pod",
            "greeter-0",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running","podIP":"10.1.0.1","conditions":[{"type":"Ready","status":"True"}]}}"#,
        ],
    );
    assert!(ok, "kubectl patch: {out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, keys) = run(
            &env,
            "etcdctl",
            &["get", "--prefix", "--keys-only", "services/"],
        );
        let (_, ready) = run(
            &env,
            "kubectl",
            &[
                "get",
                "grpcsvc",
                "greeter",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        );
        if keys.contains("services/default/greeter/10.1.0.1:50051") && ready.trim() == "True" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never registered: etcdctl said {keys:?}, Ready {ready:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
