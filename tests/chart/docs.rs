//! The chart README and the install notes.

#[allow(clippy::wildcard_imports)]
use super::*;

#[test]
fn every_value_is_in_the_readme_table_with_its_default() {
    let readme = read("README.md");
    let table = readme
        .split("\n## Values\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has no `## Values` section");
    let rows: Vec<(String, String)> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let key = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
            Some((key.to_owned(), cells.get(1)?.to_string()))
        })
        .collect();
    let (leaves, _) = value_leaves(&values(), &schema());
    for (path, default) in &leaves {
        let (_, documented) = rows
            .iter()
            .find(|(key, _)| key == path)
            .unwrap_or_else(|| panic!("README.md's values table has no row for `{path}`"));
        // Scalars and empty lists or maps exactly; larger defaults are described in words.
        let exact = match default {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => true,
        };
        if exact {
            assert_eq!(documented, &format!("`{default}`"), "default of `{path}`");
        } else {
            assert!(!documented.is_empty(), "default of `{path}`");
        }
    }
    for (key, _) in &rows {
        assert!(
            leaves.iter().any(|(path, _)| path == key),
            "README.md documents `{key}`, which values.yaml does not have"
        );
    }
}

/// The chart's NOTES.txt rendered for `--set` overrides. `helm template` renders NOTES but does
/// not print them, and the pinned helm's `install --dry-run=client` still needs a cluster, so a
/// copy of the chart gets a manifest that includes them.
fn notes(sets: &[&str]) -> String {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let copied = dir.path().join("grpc-registrar");
    copy(&chart(), &copied);
    std::fs::write(
        copied.join("templates/zz-notes.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  \
         notes: {{ include \"grpc-registrar/templates/NOTES.txt\" . | quote }}\n",
    )
    .unwrap();
    let mut flags = vec!["--show-only", "templates/zz-notes.yaml"];
    flags.extend(set_flags(sets));
    let (ok, out) = template_chart(&copied, &flags);
    assert!(ok, "{out}");
    parse_manifests(&out)[0]["data"]["notes"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_install_notes_say_how_to_check_health_and_warn_about_the_placeholder_etcd() {
    let placeholder = notes(&[]);
    assert!(
        placeholder.starts_with("###") && placeholder.contains("WARNING: etcd.endpoints"),
        "{placeholder}"
    );
    let set = notes(&["etcd.endpoints={https://etcd-0.etcd:2379,https://etcd-1.etcd:2379}"]);
    assert!(!set.contains("WARNING"), "{set}");
    assert!(set.contains("https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"));
    for needle in [
        "kubectl -n registrar rollout status deployment/reg-grpc-registrar",
        "kubectl get grpcsvc -A",
        "READY",
        "STATUS",
        "BACKEND",
        "TARGET",
        "ENDPOINTS",
        "kubectl -n registrar port-forward deployment/reg-grpc-registrar 8080:metrics",
        "/readyz",
        "kubectl -n registrar logs -l app.kubernetes.io/name=grpc-registrar,app.kubernetes.io/instance=reg",
    ] {
        assert!(set.contains(needle), "NOTES lack {needle:?}:\n{set}");
    }
}

#[test]
fn the_install_notes_name_the_backend_and_warn_about_the_placeholder_consul_address() {
    let placeholder = notes(&["backend=consul"]);
    assert!(
        placeholder.starts_with("###")
            && placeholder.contains("WARNING: consul.address is still the chart's placeholder"),
        "{placeholder}"
    );
    // The etcd placeholder is no concern of a Consul release.
    assert!(!placeholder.contains("etcd.endpoints"), "{placeholder}");

    let set = notes(&[
        "backend=consul",
        "consul.address=https://consul.example:8501",
        "consul.datacenter=dc-east",
        "registry.clusterName=east-1",
    ]);
    assert!(!set.contains("WARNING"), "{set}");
    for needle in [
        "backend: consul",
        "Consul's catalog",
        "https://consul.example:8501 (datacenter dc-east)",
        "\"grpc-registrar-east-1\"",
        "spec.backend: Consul",
        "backend: Consul",
        "Consul reachable",
    ] {
        assert!(set.contains(needle), "NOTES lack {needle:?}:\n{set}");
    }
    assert!(!set.contains("etcd"), "{set}");

    let etcd = notes(&["etcd.endpoints={https://etcd-0.etcd:2379}"]);
    assert!(etcd.contains("backend: etcd"), "{etcd}");
    assert!(!etcd.contains("Consul"), "{etcd}");
}

#[test]
fn the_consul_install_notes_say_which_names_a_namespace_publishes_and_warn_about_trusting_all() {
    let base = [
        "backend=consul",
        "consul.address=https://consul.example:8501",
    ];
    let untrusted = notes(&base);
    for needle in [
        "\"greeter--default\"",
        "registry.customTargetNamespaces (none)",
    ] {
        assert!(
            untrusted.contains(needle),
            "NOTES lack {needle:?}:\n{untrusted}"
        );
    }
    assert!(!untrusted.contains("WARNING"), "{untrusted}");
    let some = notes(&[
        base[0],
        base[1],
        "registry.customTargetNamespaces={platform,infra}",
    ]);
    assert!(
        some.contains("registry.customTargetNamespaces (now: platform, infra)"),
        "{some}"
    );
    let all = notes(&[base[0], base[1], "registry.customTargetNamespaces={*}"]);
    assert!(
        all.contains("WARNING: registry.customTargetNamespaces=[\"*\"] lets every namespace"),
        "{all}"
    );
}

#[test]
fn the_install_notes_warn_when_alerts_have_no_scrape_job_to_select() {
    let etcd = "etcd.endpoints={https://etcd-0.etcd:2379}";
    let alone = notes(&[etcd, "prometheusRule.enabled=true"]);
    assert!(
        alone.contains("WARNING: prometheusRule is on but serviceMonitor is off"),
        "{alone}"
    );
    let with_monitor = notes(&[
        etcd,
        "prometheusRule.enabled=true",
        "serviceMonitor.enabled=true",
    ]);
    assert!(!with_monitor.contains("WARNING"), "{with_monitor}");
    let own_job = notes(&[
        etcd,
        "prometheusRule.enabled=true",
        "prometheusRule.selector=job=\"mine\"",
    ]);
    assert!(!own_job.contains("WARNING"), "{own_job}");
}

#[test]
fn the_install_notes_warn_that_an_unnamed_controller_deletes_other_clusters_keys() {
    for backend in ["etcd", "consul"] {
        let set = format!("backend={backend}");
        let unnamed = notes(&[&set]);
        assert!(
            unnamed.contains("registry.clusterName is empty")
                && unnamed.contains("deletes that cluster's")
                && unnamed.contains("its own registry.clusterName"),
            "{backend}: {unnamed}"
        );
        let named = notes(&[&set, "registry.clusterName=east-1"]);
        assert!(!named.contains("is empty"), "{backend}: {named}");
        assert!(
            named.contains(r#"As cluster "east-1""#),
            "{backend}: {named}"
        );
    }
    // And the placeholder warning sees an endpoint given as a string.
    let placeholder = notes(&["etcd.endpoints=http://etcd:2379"]);
    assert!(
        placeholder.contains("WARNING: etcd.endpoints"),
        "{placeholder}"
    );
}
