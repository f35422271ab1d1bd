//! The binary's command line: what an operator sees when the configuration is wrong.

use std::process::Command;

/// Runs the controller with `args` and `RUST_BACKTRACE=1` (common in containers); returns its
/// exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grpc-registrar"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("ETCD_PASSWORD")
        .output()
        .expect("failed to run grpc-registrar");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_configuration_error_exits_with_one_line_and_no_backtrace() {
    for (args, says) in [
        (
            &["--etcd-username", "registrar"][..],
            "--etcd-username needs --etcd-password or --etcd-password-file",
        ),
        (
            &["--etcd-ca-file", "/nonexistent/ca.crt"][..],
            "failed to read /nonexistent/ca.crt: No such file or directory",
        ),
        (
            &[
                "--backend",
                "consul",
                "--consul-token-file",
                "/nonexistent/token",
            ][..],
            "failed to read /nonexistent/token",
        ),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got:\n{stderr}"
        );
        assert!(
            stderr.starts_with("grpc-registrar: ") && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("acktrace"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_min_sync_interval_over_a_minute_is_refused_with_the_reason() {
    let (code, stderr) = run(&["--min-sync-interval", "5m"]);
    assert_eq!(code, Some(2), "clap's usage error: {stderr}");
    assert!(
        stderr.contains("--min-sync-interval")
            && stderr.contains("longer than 60s: a change would wait that long to be published"),
        "{stderr}"
    );
}
