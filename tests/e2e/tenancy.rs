//! The tenancy matrix (DESIGN §4) through the real API server: a namespace allowed custom
//! targets and one that is not, against every target shape, next to a victim namespace whose
//! GrpcService owns its default target and a custom one. Each case asserts what was written,
//! what status says, and that the victim's keys and records are untouched.

use std::collections::BTreeMap;

use etcd_client::GetOptions;
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::registry::Owner;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::Plane;
use crate::harness::{Env, eventually};

/// What a case must end in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Published under the target, with an ownership record.
    Published,
    /// `InvalidSpec`: nothing written.
    Invalid,
    /// `Conflict`: nothing written.
    Conflict,
    /// Refused by the API server's schema: the object never exists.
    Rejected,
}

use Outcome::{Conflict, Invalid, Published, Rejected};

/// Everything in a registry etcd: key → (value, mod revision).
async fn everything(env: &Env) -> BTreeMap<String, (String, i64)> {
    env.etcd
        .client()
        .await
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap()
        .kvs()
        .iter()
        // The controllers' liveness announcements change on every beat, by design.
        .filter(|kv| !kv.key_str().unwrap().starts_with("grpc-registrar/writers/"))
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                (kv.value_str().unwrap().to_owned(), kv.mod_revision()),
            )
        })
        .collect()
}

/// The victim: a namespace with a live GrpcService (no controller of this test watches it), whose
/// uid owns its default target and the custom target `shared/hello` in `env`'s registry.
async fn seed_victim(env: &Env, victim: &Api<grpc_registrar::crd::GrpcService>, ns: &str) {
    let svc = victim.get("hello").await.unwrap();
    let owner = Owner {
        uid: svc.uid().unwrap(),
        namespace: ns.to_owned(),
        name: "hello".into(),
    };
    let mut etcd = env.etcd.client().await;
    for target in [format!("services/{ns}/hello"), "shared/hello".to_owned()] {
        etcd.put(
            format!("grpc-registrar/owners/{target}"),
            owner.record(),
            None,
        )
        .await
        .unwrap();
        etcd.put(
            format!("{target}/10.99.0.1:50051"),
            r#"{"Op":0,"Addr":"10.99.0.1:50051"}"#,
            None,
        )
        .await
        .unwrap();
    }
}

/// Runs every target shape in `env` (allowed custom targets or not) and checks each outcome.
async fn matrix(env: &Env, victim_ns: &str, allowed: bool) {
    let ns = env.ns.clone();
    let custom = |yes: Outcome| if allowed { yes } else { Invalid };
    let cases: Vec<(Option<String>, Outcome)> = vec![
        (None, Published),
        (Some(format!("services/{ns}/t1/custom")), Published),
        (Some(format!("/services/{ns}/t2")), Published),
        (Some(format!("services/{victim_ns}/hello")), Invalid),
        (Some(format!("/services/{victim_ns}/hello")), Invalid),
        (Some(format!("services/{victim_ns}/hello/v2")), Invalid),
        (Some(format!("services/{victim_ns}")), Invalid),
        (Some("services".into()), Invalid),
        (Some(format!("services/{ns}")), Invalid),
        (
            Some(format!("services/{ns}/../{victim_ns}/hello")),
            Rejected,
        ),
        (Some("grpc-registrar/owners/x".into()), Invalid),
        (Some("grpc-registrar".into()), Invalid),
        (Some("shared/hello".into()), custom(Conflict)),
        (Some("shared".into()), custom(Conflict)),
        (Some("shared/hello/v2".into()), custom(Conflict)),
        (Some("other/hello".into()), custom(Published)),
    ];
    env.pod("x-0", json!({"app": "x"}), 50051).await;
    env.set_ready("x-0", "10.70.0.1", true).await;
    let before = everything(env).await;
    let mut published = Vec::new();
    for (i, (target, want)) in cases.iter().enumerate() {
        let name = format!("t{i}");
        let mut spec = json!({"selector": {"matchLabels": {"app": "x"}}, "port": 50051});
        if let Some(t) = target {
            spec["target"] = json!(t);
        }
        let object: grpc_registrar::crd::GrpcService = serde_json::from_value(json!({
            "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap();
        let created = env.services().create(&PostParams::default(), &object).await;
        let case = format!("{target:?} (custom targets allowed: {allowed})");
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
            env.condition_is(&name, condition, "True").await
        })
        .await;
        if *want == Published {
            let t = target
                .clone()
                .unwrap_or_else(|| format!("services/{ns}/{name}"));
            let uid = env.services().get(&name).await.unwrap().uid().unwrap();
            published.push((t, uid));
        }
    }
    // Whatever was refused wrote nothing: the registry holds the victim's seeds, unchanged, and
    // exactly the published cases' keys and ownership records.
    let after = everything(env).await;
    for (key, value) in &before {
        assert_eq!(
            after.get(key),
            Some(value),
            "the victim's {key} is untouched"
        );
    }
    let mut new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    // The controller's own records of its lease and leadership are not the cases' doing.
    new.retain(|k| {
        !k.starts_with("grpc-registrar/leader") && !k.starts_with("grpc-registrar/lease/")
    });
    let mut want: Vec<String> = published
        .iter()
        .flat_map(|(t, uid)| {
            [
                format!("grpc-registrar/owners/{t}"),
                format!("grpc-registrar/published/{uid}"),
                format!("{t}/10.70.0.1:50051"),
            ]
        })
        .collect();
    want.sort();
    let mut new: Vec<String> = new.into_iter().cloned().collect();
    new.sort();
    assert_eq!(new, want, "custom targets allowed: {allowed}");
}

pub async fn the_tenancy_matrix_leaves_every_other_namespace_untouched(plane: Plane, ns: String) {
    let client = plane.client().await;
    let victim_ns = format!("{}-v", &ns[..ns.len().min(58)]);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": victim_ns}})).unwrap(),
        )
        .await
        .unwrap();
    let victim: Api<grpc_registrar::crd::GrpcService> = Api::namespaced(client, &victim_ns);
    victim
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "grpc-registrar.io/v1alpha1", "kind": "GrpcService",
                "metadata": {"name": "hello"},
                "spec": {"selector": {"matchLabels": {"app": "hello"}}, "port": 50051},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let allowed_ns = format!("{}-a", &ns[..ns.len().min(58)]);
    let policy = Policy {
        custom_targets: CustomTargets::Namespaces(vec![allowed_ns.clone()]),
        ..Policy::default()
    };
    let allowed = Env::with_policy(plane.clone(), &allowed_ns, policy).await;
    seed_victim(&allowed, &victim, &victim_ns).await;
    matrix(&allowed, &victim_ns, true).await;
    allowed.shutdown().await;

    let plain = Env::new(plane, &ns).await;
    seed_victim(&plain, &victim, &victim_ns).await;
    matrix(&plain, &victim_ns, false).await;
    plain.shutdown().await;
}
