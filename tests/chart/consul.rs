//! The Consul backend: its env vars, its Secrets mounted as files, and its values schema.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The container's env var names.
fn env_names(docs: &[Value]) -> Vec<String> {
    names(&container(docs)["env"])
}

/// The path each of the container's volumes is mounted at, by volume name.
fn mount_path(docs: &[Value], volume: &str) -> String {
    container(docs)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume)
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_else(|| panic!("no mount of {volume}"))
        .to_owned()
}

/// The pod volume named `name`.
fn volume<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    pod_spec(docs)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn the_consul_backend_gets_consuls_env_and_mounts_and_nothing_of_etcd() {
    let docs = render(&[
        "backend=consul",
        "consul.address=https://consul.example:8501",
        "consul.datacenter=dc-east",
        "consul.tls.secretName=consul-tls",
        "consul.tls.clientCert=true",
        "consul.token.secretName=consul-acl",
        "registry.registrarRoot=reg-root",
        "registry.clusterName=east-1",
        "etcd.leaseTTL=45",
        // Settings of the other backend are ignored, Secrets included.
        "etcd.tls.secretName=etcd-tls",
        "etcd.auth.secretName=etcd-auth",
    ]);
    let env = |name| env_value(&docs, name);
    assert_eq!(env("BACKEND").as_deref(), Some("consul"));
    assert_eq!(
        env("CONSUL_HTTP_ADDR").as_deref(),
        Some("https://consul.example:8501")
    );
    assert_eq!(env("CONSUL_DATACENTER").as_deref(), Some("dc-east"));
    // The node check's TTL, the KV prefix and the node's cluster.
    assert_eq!(env("LEASE_TTL").as_deref(), Some("45"));
    assert_eq!(env("REGISTRAR_ROOT").as_deref(), Some("reg-root"));
    assert_eq!(env("CLUSTER_NAME").as_deref(), Some("east-1"));

    let tls = mount_path(&docs, "consul-tls");
    assert_eq!(env("CONSUL_CACERT"), Some(format!("{tls}/ca.crt")));
    assert_eq!(env("CONSUL_CLIENT_CERT"), Some(format!("{tls}/tls.crt")));
    assert_eq!(env("CONSUL_CLIENT_KEY"), Some(format!("{tls}/tls.key")));
    assert_eq!(
        volume(&docs, "consul-tls")["secret"]["secretName"],
        "consul-tls"
    );
    assert_eq!(
        names(&pod_spec(&docs)["volumes"]),
        ["consul-tls", "consul-token"]
    );
    assert_eq!(
        names(&container(&docs)["volumeMounts"]),
        ["consul-tls", "consul-token"]
    );

    let set = env_names(&docs);
    assert!(!set.iter().any(|n| n == "KEY_PREFIX"), "{set:?}");
    assert!(!set.iter().any(|n| n.starts_with("ETCD_")), "{set:?}");
}

#[test]
fn namespaces_trusted_with_flat_consul_names_reach_a_consul_controller() {
    // Untrusted by default: every namespace publishes `<name>--<namespace>`.
    let docs = render(&["backend=consul"]);
    assert_eq!(
        env_value(&docs, "CUSTOM_TARGET_NAMESPACES").as_deref(),
        Some("")
    );
    let docs = render(&[
        "backend=consul",
        "registry.customTargetNamespaces={platform,payments}",
    ]);
    assert_eq!(
        env_value(&docs, "CUSTOM_TARGET_NAMESPACES").as_deref(),
        Some("platform,payments")
    );
}

#[test]
fn a_consul_client_certificate_and_datacenter_are_passed_only_when_set() {
    let docs = render(&["backend=consul", "consul.tls.secretName=consul-ca"]);
    let set = env_names(&docs);
    assert!(set.contains(&"CONSUL_CACERT".to_owned()), "{set:?}");
    for unset in [
        "CONSUL_CLIENT_CERT",
        "CONSUL_CLIENT_KEY",
        "CONSUL_DATACENTER",
        "CONSUL_HTTP_TOKEN_FILE",
    ] {
        assert!(!set.iter().any(|n| n == unset), "{unset}: {set:?}");
    }
    assert_eq!(volume_secrets(&docs), ["consul-ca"]);

    // Nothing to mount without Secrets.
    let plain = render(&["backend=consul"]);
    assert!(container(&plain)["volumeMounts"].is_null());
    assert!(pod_spec(&plain)["volumes"].is_null());
    assert_eq!(
        env_value(&plain, "CONSUL_HTTP_ADDR").as_deref(),
        Some("http://consul-server:8500")
    );
}

/// The Secrets the pod's volumes come from.
fn volume_secrets(docs: &[Value]) -> Vec<String> {
    pod_spec(docs)["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_consul_token_reaches_the_controller_only_as_a_file_from_its_secret() {
    let docs = render(&[
        "backend=consul",
        "consul.token.secretName=consul-acl",
        "consul.token.key=acl-token",
    ]);
    let token = volume(&docs, "consul-token");
    assert_eq!(token["secret"]["secretName"], "consul-acl");
    assert_eq!(
        token["secret"]["items"],
        serde_json::json!([{"key": "acl-token", "path": "token"}]),
        "only the token's key is projected"
    );
    let dir = mount_path(&docs, "consul-token");
    assert_eq!(
        env_value(&docs, "CONSUL_HTTP_TOKEN_FILE"),
        Some(format!("{dir}/token"))
    );
    let c = container(&docs);
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "consul-token")
        .unwrap();
    assert_eq!(mount["readOnly"], true);
    // Never an env value: no CONSUL_HTTP_TOKEN, nothing read from a Secret into env.
    assert_eq!(env_value(&docs, "CONSUL_HTTP_TOKEN"), None);
    for var in c["env"].as_array().unwrap() {
        assert!(var["valueFrom"]["secretKeyRef"].is_null(), "{var}");
        assert_ne!(var["name"], "CONSUL_HTTP_TOKEN", "{var}");
    }
    assert!(c["envFrom"].is_null());
}

#[test]
fn the_etcd_backend_renders_no_consul_settings() {
    let docs = render(&[
        "consul.address=https://consul.example:8501",
        "consul.datacenter=dc-east",
        "consul.tls.secretName=consul-tls",
        "consul.token.secretName=consul-acl",
    ]);
    assert_eq!(env_value(&docs, "BACKEND").as_deref(), Some("etcd"));
    assert_eq!(
        env_value(&docs, "ETCD_ENDPOINTS").as_deref(),
        Some("http://etcd:2379")
    );
    let set = env_names(&docs);
    assert!(!set.iter().any(|n| n.starts_with("CONSUL_")), "{set:?}");
    assert!(set.contains(&"KEY_PREFIX".to_owned()), "{set:?}");
    assert!(pod_spec(&docs)["volumes"].is_null());
}

#[test]
fn an_unknown_backend_and_unknown_consul_keys_are_refused_by_the_schema() {
    for backend in ["backend=zookeeper", "backend=CONSUL", "backend="] {
        let out = refused(&[backend]);
        assert!(out.contains("/backend"), "{backend}: {out}");
    }
    let out = refused(&["backend=consul", "consul.addr=http://consul:8500"]);
    assert!(
        out.contains("/consul") && out.contains("'addr' not allowed"),
        "{out}"
    );
    for typo in [
        "consul.tls.secret=consul-tls",
        "consul.token.name=consul-acl",
        "consul.token.value=s3cr3t",
    ] {
        let out = refused(&[typo]);
        assert!(out.contains("not allowed"), "{typo}: {out}");
    }
    // A URL with its scheme, a Consul datacenter name, a Secret key.
    for bad in [
        "consul.address=consul:8500",
        "consul.datacenter=DC 1",
        "consul.token.key=a/b",
    ] {
        let out = refused(&[bad]);
        let path = format!("/{}", bad.split('=').next().unwrap().replace('.', "/"));
        assert!(out.contains(&path), "{bad}: {out}");
    }
}
