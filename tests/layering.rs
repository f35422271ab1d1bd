//! Backend knowledge stays in the backends: no source file outside `src/registry/` names etcd or
//! Consul (case-insensitive, comments included), but for configuration and the wiring that picks
//! a backend, listed below with the reason each is allowed.

use std::path::{Path, PathBuf};

/// Files that may name a backend anywhere: configuration and wiring only.
const FILES: &[(&str, &str)] = &[
    // The flags: `--backend`, `--etcd-*`, `--consul-*`, and their help.
    ("src/main.rs", "flags"),
    // Picks the backend from the configuration, connects it, and names what to check when it
    // does not answer.
    ("src/run.rs", "wiring"),
    // The user's API: the `backend` enum, the `consul` settings, the value format names
    // (`EtcdNaming`) and the schema's messages.
    ("src/crd.rs", "API"),
];

/// Words that may appear in any file, each a name of the API or of another crate, not backend
/// knowledge.
const WORDS: &[(&str, &str)] = &[
    // The resolver crate, whose `format` module is the one implementation of the value formats.
    ("tonic_etcd_resolver", "crate name"),
    // The deprecated status field, still written for readers of the old name (v1alpha1).
    ("etcd_revision", "API"),
];

/// Words that may appear in one file only.
const WORDS_IN: &[(&str, &str, &str)] = &[
    // Test-only builders of the CRD, whose spec has one settings field per backend.
    ("src/fixtures/mod.rs", "consul: none", "API"),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `(file, line number, line)` outside `src/registry/` naming a backend, with the
/// allowlists applied, and every allowlist entry that allowed nothing.
fn check(root: &Path) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    files.sort();
    let mut named = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for path in files {
        let file = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if file.starts_with("src/registry/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let names = |line: &str| line.contains("etcd") || line.contains("consul");
        if FILES.iter().any(|(f, _)| *f == file) {
            if text.lines().any(|l| names(&l.to_lowercase())) {
                used.insert(file.clone());
            }
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let mut line = line.to_lowercase();
            for (word, _) in WORDS {
                if line.contains(word) {
                    used.insert((*word).to_owned());
                    line = line.replace(word, "");
                }
            }
            for (f, word, _) in WORDS_IN {
                if *f == file && line.contains(word) {
                    used.insert(format!("{f}: {word}"));
                    line = line.replace(word, "");
                }
            }
            if names(&line) {
                named.push(format!("{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    let unused = FILES
        .iter()
        .map(|(f, _)| (*f).to_owned())
        .chain(WORDS.iter().map(|(w, _)| (*w).to_owned()))
        .chain(WORDS_IN.iter().map(|(f, w, _)| format!("{f}: {w}")))
        .filter(|entry| !used.contains(entry))
        .collect();
    (named, unused)
}

#[test]
fn no_file_outside_the_registry_names_a_backend_but_configuration_and_wiring() {
    let (named, _) = check(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(
        named.is_empty(),
        "backend knowledge outside src/registry/ (move it into the backend, or, for configuration \
         and wiring only, allow it in tests/layering.rs):\n{}",
        named.join("\n")
    );
}

#[test]
fn every_allowlist_entry_is_still_needed() {
    let (_, unused) = check(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(
        unused.is_empty(),
        "allowlist entries that allow nothing any more (remove them): {unused:?}"
    );
}
