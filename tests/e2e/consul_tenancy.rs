//! The Consul tenancy matrix (DESIGN §4, README "Consul"): through the real API server and a
//! real Consul, a namespace trusted with flat names and one that is not, against every name
//! shape, next to a victim namespace whose services hold a flat name and its own qualified
//! name. Each case asserts status, what was written, and that the victim's instances and
//! records are untouched.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use grpc_registrar::crd::Backend;
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulRegistry};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use test_support::consul::Consul;

use crate::Plane;
use crate::harness::{Env, eventually};

/// What a case must end in.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Published under this name, with an ownership record.
    Published(String),
    /// `InvalidSpec`: nothing written.
    Invalid,
    /// `Conflict`: nothing written.
    Conflict,
    /// Refused by the API server's schema: the object never exists.
    Rejected,
}

use Outcome::{Conflict, Invalid, Published, Rejected};

/// A controller publishing `ns` into `consul`, trusting `trusted` with flat names.
async fn env_on(plane: Plane, ns: &str, consul: &Consul, trusted: CustomTargets) -> Env {
    let registry = ConsulRegistry::connect(
        ConsulConfig {
            default_ttl: Duration::from_secs(10),
            ..ConsulConfig::new(consul.http_addr())
        },
        Arc::new(Metrics::for_backend("consul")),
    )
    .expect("failed to build the consul client");
    let policy = Policy {
        backend: Backend::Consul,
        custom_targets: trusted,
        ..Policy::default()
    };
    Env::with_backend(plane, ns, policy, Arc::new(registry)).await
}

/// What Consul holds that a write could change: every KV entry (key → modify index) and every
/// instance on the controller's node (id → (service, modify index)).
async fn everything(consul: &Consul) -> BTreeMap<String, (String, u64)> {
    let get = |path: String| async move {
        reqwest::get(format!("{}{path}", consul.http_addr()))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap_or(json!(null))
    };
    let mut out = BTreeMap::new();
    for entry in get("/v1/kv/?recurse".to_owned())
        .await
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = entry["Key"].as_str().unwrap().to_owned();
        // The controllers' liveness announcements change on every beat, by design.
        if key.starts_with("grpc-registrar/writers/") {
            continue;
        }
        out.insert(
            format!("kv:{key}"),
            (String::new(), entry["ModifyIndex"].as_u64().unwrap()),
        );
    }
    let node = get("/v1/catalog/node-services/grpc-registrar".to_owned()).await;
    for svc in node["Services"].as_array().into_iter().flatten() {
        out.insert(
            format!("instance:{}", svc["ID"].as_str().unwrap()),
            (
                svc["Service"].as_str().unwrap().to_owned(),
                svc["ModifyIndex"].as_u64().unwrap(),
            ),
        );
    }
    out
}

/// The namespace of each passing instance of `service`.
async fn instance_namespaces(consul: &Consul, service: &str) -> Vec<String> {
    let url = format!(
        "{}/v1/health/service/{service}?passing=true",
        consul.http_addr()
    );
    let entries: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    entries
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            e["Service"]["Meta"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The victim: namespace `victim_ns`, trusted with flat names by its own controller, whose
/// GrpcServices hold the flat name `payments` and its qualified `hello--<victim_ns>`. Its
/// controller is stopped afterwards (gracefully: the instances stay), so that nothing but the
/// matrix's controllers writes during the matrix.
async fn seed_victim(plane: &Plane, consul: &Consul, victim_ns: &str) {
    let victim = env_on(
        plane.clone(),
        victim_ns,
        consul,
        CustomTargets::Namespaces(vec![victim_ns.to_owned()]),
    )
    .await;
    victim.pod("v-0", json!({"app": "v"}), 50051).await;
    victim.set_ready("v-0", "10.99.0.1", true).await;
    let hello = format!("hello--{victim_ns}");
    for (name, service) in [("pay", "payments"), ("hello", hello.as_str())] {
        victim
            .service(
                name,
                json!({"selector": {"matchLabels": {"app": "v"}}, "port": 50051,
                       "backend": "Consul", "consul": {"service": service}}),
            )
            .await;
        eventually(&format!("the victim publishes {service}"), || async {
            instance_namespaces(consul, service).await == [victim_ns]
        })
        .await;
    }
    victim.shutdown().await;
}

/// Runs every name shape in `env` (trusted with flat names or not) and checks each outcome.
async fn matrix(env: &Env, consul: &Consul, victim_ns: &str, trusted: bool) {
    let ns = env.ns.clone();
    let flat = |yes: Outcome| if trusted { yes } else { Invalid };
    let own = |base: &str| format!("{base}--{ns}");
    let long = "a".repeat(55);
    // (GrpcService name, consul.service, outcome)
    let cases: Vec<(&str, Option<String>, Outcome)> = vec![
        // The default name: qualified, or flat where trusted.
        (
            "t0",
            None,
            Published(if trusted { "t0".into() } else { own("t0") }),
        ),
        // The namespace's own qualified name.
        ("t1", Some(own("mine")), Published(own("mine"))),
        // A flat name nobody holds.
        ("t2", Some("fresh".into()), flat(Published("fresh".into()))),
        // A flat name the victim holds.
        ("t3", Some("payments".into()), flat(Conflict)),
        // Named after the victim's flat name, with no consul.service.
        (
            "payments",
            None,
            if trusted {
                Conflict
            } else {
                Published(own("payments"))
            },
        ),
        // The victim's qualified name, and another name derived from the victim's namespace.
        ("t5", Some(format!("hello--{victim_ns}")), Invalid),
        ("t6", Some(format!("other--{victim_ns}")), Invalid),
        // A GrpcService named like the victim's qualified name.
        ("hello--victim", None, Invalid),
        // The controller's and Consul's own names.
        ("t8", Some("consul".into()), Invalid),
        ("t9", Some("grpc-registrar".into()), Invalid),
        ("t10", Some("grpc-registrar-east".into()), Invalid),
        // Over 63 characters once qualified (fine flat).
        ("t11", Some(long.clone()), flat(Published(long))),
        // Not a DNS label: the schema refuses it.
        ("t12", Some("Payments".into()), Rejected),
    ];
    env.pod("x-0", json!({"app": "x"}), 50051).await;
    env.set_ready("x-0", "10.70.0.1", true).await;
    let before = everything(consul).await;
    let mut published = Vec::new();
    for (name, service, want) in &cases {
        let mut spec =
            json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051, "backend": "Consul"});
        if let Some(service) = service {
            spec["consul"] = json!({ "service": service });
        }
        let object: grpc_registrar::crd::GrpcService = serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap();
        let created = env.services().create(&PostParams::default(), &object).await;
        let case = format!("{name} with consul.service {service:?} (trusted: {trusted})");
        if *want == Rejected {
            assert!(
                created.is_err(),
                "{case} should be refused by the API server"
            );
            continue;
        }
        created.unwrap_or_else(|e| panic!("{case}: {e}"));
        let condition = match want {
            Invalid => "InvalidSpec",
            Conflict => "Conflict",
            _ => "Ready",
        };
        eventually(&format!("{case} ends in {want:?}"), || async {
            env.condition_is(name, condition, "True").await
        })
        .await;
        let status = env.status(name).await;
        match want {
            Published(as_name) => {
                assert_eq!(status["target"], as_name.as_str(), "{case}: {status}");
                assert_eq!(
                    instance_namespaces(consul, as_name).await,
                    [ns.as_str()],
                    "{case}"
                );
                published.push(as_name.clone());
            }
            Invalid => {
                let message = env.condition(name, "InvalidSpec").await["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(
                    message.contains("--custom-target-namespaces")
                        || message.contains("reserved")
                        || message.contains("namespace-qualified")
                        || message.contains("63 characters"),
                    "{case}: the message names the rule: {message}"
                );
            }
            _ => {}
        }
    }
    // The victim's services still have exactly the victim's instance.
    for service in ["payments".to_owned(), format!("hello--{victim_ns}")] {
        assert_eq!(
            instance_namespaces(consul, &service).await,
            [victim_ns],
            "the victim's {service} (trusted: {trusted})"
        );
    }
    // Whatever was refused wrote nothing: Consul holds the victim's records and instances,
    // unchanged, and exactly the published cases' ownership records and instances.
    let after = everything(consul).await;
    for (key, value) in &before {
        assert_eq!(after.get(key), Some(value), "{key} is untouched");
    }
    let mut new: Vec<String> = after
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(k, (service, _))| {
            if let Some(s) = k.strip_prefix("kv:grpc-registrar/owners/") {
                format!("owner of {s}")
            } else if k.starts_with("kv:grpc-registrar/published/") {
                "a publication record".to_owned()
            } else {
                format!("instance of {service}")
            }
        })
        .collect();
    new.sort();
    let mut want: Vec<String> = published
        .iter()
        .flat_map(|s| {
            [
                format!("owner of {s}"),
                format!("instance of {s}"),
                "a publication record".to_owned(),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(new, want, "trusted: {trusted}");
}

pub async fn the_consul_tenancy_matrix_leaves_every_other_namespace_untouched(
    plane: Plane,
    ns: String,
) {
    let consul = Consul::start().await;
    let short = &ns[..ns.len().min(50)];
    let victim_ns = format!("{short}-v");
    seed_victim(&plane, &consul, &victim_ns).await;

    let trusted_ns = format!("{short}-t");
    let trusted = env_on(
        plane.clone(),
        &trusted_ns,
        &consul,
        CustomTargets::Namespaces(vec![trusted_ns.clone()]),
    )
    .await;
    matrix(&trusted, &consul, &victim_ns, true).await;
    trusted.shutdown().await;

    let untrusted = env_on(plane.clone(), &ns, &consul, CustomTargets::None).await;
    matrix(&untrusted, &consul, &victim_ns, false).await;
    untrusted.shutdown().await;
}

/// An upgrade renames nothing: a service published under a flat name by a controller without
/// the rule (`--custom-target-namespaces='*'`) keeps it under the rule, across the restart, with
/// no instance leaving; a new service cannot take a flat name; and once its owner names an
/// allowed name, the old one is released.
pub async fn an_upgrade_keeps_a_flat_consul_name_until_the_spec_changes_it(
    plane: Plane,
    ns: String,
) {
    let consul = Consul::start().await;
    let before = env_on(plane.clone(), &ns, &consul, CustomTargets::All).await;
    before.pod("p-0", json!({"app": "p"}), 50051).await;
    before.set_ready("p-0", "10.71.0.1", true).await;
    let spec = json!({"selector": {"matchLabels": {"app": "p"}}, "port": 50051,
                      "backend": "Consul", "consul": {"service": "payments"}});
    before.service("pay", spec.clone()).await;
    eventually("published flat before the upgrade", || async {
        instance_namespaces(&consul, "payments").await == [ns.as_str()]
            && before.condition_is("pay", "Ready", "True").await
    })
    .await;
    let index = everything(&consul).await;
    before.shutdown().await;

    // The upgraded controller: nothing trusted. The service keeps its name and instance.
    let after = env_on(plane.clone(), &ns, &consul, CustomTargets::None).await;
    // A readiness change makes the new controller reconcile and write.
    after.pod("p-1", json!({"app": "p"}), 50051).await;
    after.set_ready("p-1", "10.71.0.2", true).await;
    eventually("the kept name follows readiness", || async {
        instance_namespaces(&consul, "payments").await.len() == 2
    })
    .await;
    let now = everything(&consul).await;
    for (key, value) in &index {
        if key.starts_with("instance:") {
            assert_eq!(now.get(key), Some(value), "{key} was not rewritten");
        }
    }
    assert_eq!(after.status("pay").await["target"], "payments");
    assert!(after.condition_is("pay", "Ready", "True").await);

    // A new service cannot take a flat name.
    after
        .service(
            "pay2",
            json!({"selector": {"matchLabels": {"app": "p"}}, "port": 50051,
                   "backend": "Consul", "consul": {"service": "refunds"}}),
        )
        .await;
    eventually("a new flat name is refused", || async {
        after.condition_is("pay2", "InvalidSpec", "True").await
    })
    .await;
    assert!(instance_namespaces(&consul, "refunds").await.is_empty());

    // Its owner moves it to an allowed name: the flat name is released.
    let mut moved = spec;
    moved["consul"]["service"] = json!(format!("payments--{ns}"));
    after
        .services()
        .patch(
            "pay",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": moved })),
        )
        .await
        .unwrap();
    let qualified = format!("payments--{ns}");
    eventually("moved to the qualified name", || async {
        instance_namespaces(&consul, &qualified).await.len() == 2
            && instance_namespaces(&consul, "payments").await.is_empty()
            && after.status("pay").await["target"] == qualified.as_str()
    })
    .await;
    after.shutdown().await;
}
