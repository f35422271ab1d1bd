//! The crate as crates.io would serve it: `cargo package`, then the example built from the
//! unpacked package, outside this workspace, with crates.io dependencies only.
//!
//! Its build is cached in `target/package-check/`, so only the first run compiles the
//! dependencies. It needs crates.io (or a warm cargo cache) and protoc, as any user of the
//! crate does; without them it fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(what: &str, command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("failed to start {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// A fresh directory outside the workspace, so the unpacked crate is not taken for a member.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tonic-etcd-resolver-package-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("failed to create a scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_packaged_crate_builds_its_example_with_crates_io_dependencies_only() {
    let cargo = env!("CARGO");
    let name = env!("CARGO_PKG_NAME");
    let version = env!("CARGO_PKG_VERSION");
    let target_dir = workspace().join("target/package-check");

    run(
        "cargo package",
        Command::new(cargo)
            .current_dir(workspace())
            .args(["package", "--allow-dirty", "--no-verify", "-p", name])
            .arg("--target-dir")
            .arg(&target_dir),
    );
    let crate_file = target_dir.join(format!("package/{name}-{version}.crate"));
    assert!(crate_file.is_file(), "no {}", crate_file.display());

    let scratch = Scratch::new();
    run(
        "tar",
        Command::new("tar")
            .arg("-xzf")
            .arg(&crate_file)
            .arg("-C")
            .arg(&scratch.0),
    );
    let unpacked = scratch.0.join(format!("{name}-{version}"));
    for file in ["README.md", "LICENSE", "Cargo.toml", "examples/client.rs"] {
        assert!(unpacked.join(file).is_file(), "the package has no {file}");
    }
    for workspace_only in ["tests", "benches"] {
        assert!(
            !unpacked.join(workspace_only).exists(),
            "the package has {workspace_only}/, which needs workspace-only crates"
        );
    }
    let manifest = std::fs::read_to_string(unpacked.join("Cargo.toml")).unwrap();
    for target in ["[[test]]", "[[bench]]"] {
        assert!(
            !manifest.contains(target),
            "the packaged manifest names a {target} it does not ship:\n{manifest}"
        );
    }
    for workspace_only in ["dependencies.greeter", "dependencies.test-support"] {
        assert!(
            !manifest.contains(workspace_only),
            "the packaged manifest still has {workspace_only}:\n{manifest}"
        );
    }

    run(
        "cargo build --example client (from the package)",
        Command::new(cargo)
            .current_dir(&unpacked)
            .args(["build", "--example", "client"])
            .arg("--target-dir")
            .arg(target_dir.join("build"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS"),
    );
    let example = target_dir.join("build/debug/examples/client");
    assert!(
        example.is_file(),
        "no example binary at {}",
        example.display()
    );
}
