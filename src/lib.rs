//! grpc-registrar: a Kubernetes controller that publishes ready pods in a gRPC service registry.
//!
//! # Layout
//! - [`crd`]: the `GrpcService` custom resource.
//! - [`source`]: endpoint sources (pods) turned into source-neutral candidates, and the indexes
//!   (candidates by namespace and label, selectors by requirement) that keep each event's cost to
//!   what it touches.
//! - [`desired`]: the pure decision logic, a validated spec plus candidates in, logical endpoints
//!   out (the backend-neutral half of spec validation).
//! - [`registry`]: the backend seam ([`registry::Backend`], and its [`registry::Planner`] for
//!   what is backend-specific in a spec) and its implementations, each in its own module, and
//!   an in-memory one (for tests). Nothing outside it names a backend but the flags and the
//!   wiring that picks one (a test checks it).
//! - [`controller`]: the kube-runtime reconciler that joins them, and the watches feeding the
//!   indexes.
//! - [`leader`]: leader election on a Kubernetes Lease, fenced in the registry.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`backoff`]: the one retry pacing, also kube's watch `Backoff`.
//! - [`run`](mod@run): the whole controller process, from its configuration; `main` only parses
//!   flags and listens for signals.
//!
//! Dependencies point one way, each module using only those before it in this order (a test
//! checks it): `crd`, `backoff` → `source` → `desired` → `metrics` → `registry` → `error` →
//! `logging` → `leader` → `http` → `controller` → `run`.

pub mod backoff;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod error;
pub mod http;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod run;
pub mod source;

#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};

#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Every module, after the modules it may use.
    const ORDER: &[&str] = &[
        "crd",
        "backoff",
        "source",
        "desired",
        "metrics",
        "registry",
        "error",
        "logging",
        "leader",
        "http",
        "controller",
        "run",
    ];

    /// The crate modules named by `crate::` paths in `text`, comments left out.
    fn used(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
                    None => vec![rest],
                };
                for name in names {
                    let name: String = name
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    match name.as_str() {
                        "Error" | "Result" => out.insert("error".to_owned()),
                        "" => false,
                        _ => out.insert(name),
                    };
                }
            }
        }
        out
    }

    fn sources(path: &Path, out: &mut String) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                sources(&entry.unwrap().path(), out);
            }
        } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }

    #[test]
    fn each_module_uses_only_the_modules_before_it_in_the_documented_order() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut wrong = Vec::new();
        for (at, module) in ORDER.iter().enumerate() {
            let mut text = String::new();
            sources(&src.join(format!("{module}.rs")), &mut text);
            sources(&src.join(module), &mut text);
            assert!(!text.is_empty(), "no source for module {module}");
            for dependency in used(&text) {
                let allowed = dependency == *module
                    || dependency == "fixtures"
                    || ORDER[..at].contains(&dependency.as_str());
                if !allowed {
                    wrong.push(format!("{module} uses {dependency}"));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "against the layering in lib.rs: {wrong:?}"
        );
    }

    #[test]
    fn the_layering_check_sees_paths_groups_and_the_error_reexports() {
        let found =
            used("use crate::desired::Plan;\nuse crate::{Error, registry};\n// crate::run\n");
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["desired", "error", "registry"]
        );
    }
}
