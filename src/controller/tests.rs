//! Reconciler tests: a scripted mock API server (controller-rs pattern) and the in-memory
//! backend; no external process.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;

use super::Sources;
use super::{RESYNC, reconcile};
use crate::crd::{FINALIZER, GrpcService};
use crate::fixtures::verifier::{
    Scenario, context, context_over, listed, pod_context, slice_context,
};
use crate::fixtures::{PodBuilder, endpoint_slice, service, service_ref};
use crate::registry::memory::MemoryBackend;
use crate::source::pod::{PodSource, candidate};
use crate::source::slice::SliceSource;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::runtime::controller::Action;

fn with_finalizer(mut svc: GrpcService) -> GrpcService {
    svc.metadata.finalizers = Some(vec![FINALIZER.into()]);
    svc
}

fn keys(backend: &MemoryBackend, target: &str) -> Vec<String> {
    backend.entries(target).into_keys().collect()
}

fn backend() -> Arc<MemoryBackend> {
    Arc::new(MemoryBackend::default())
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

#[tokio::test]
async fn a_new_service_is_published_at_once_and_gets_its_finalizer_behind() {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = service("greeter");
    // The registry first: the finalizer patch follows the registry write (a deletion in
    // between is left to the owner-record sweep), then the status.
    let server = api.run(Scenario::FinalizerThenStatus(
        svc.clone(),
        registry.clone(),
        |status| assert_eq!(status["registeredEndpoints"], 1),
    ));
    let uid = svc.metadata.uid.clone().unwrap();
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(keys(&registry, "services/default/greeter").len(), 1);
    // Claimed, recorded and published in one registry write.
    assert_eq!(registry.writes(), 1);
    let record = crate::registry::Backend::publication_record(registry.as_ref(), &uid).await;
    assert!(record.unwrap().is_some(), "the last valid spec is recorded");
}

#[tokio::test]
async fn ready_pods_are_registered_and_status_reports_counts() {
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").not_ready().build(),
        PodBuilder::ready("p3", "10.0.0.3")
            .label("app", "other")
            .build(),
    ];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        assert_eq!(status["target"], "services/default/greeter");
        assert_eq!(status["selectedEndpoints"], 2);
        assert_eq!(status["readyEndpoints"], 1);
        assert_eq!(status["registeredEndpoints"], 1);
        assert_eq!(status["observedGeneration"], 1);
        assert!(status["leaseId"].is_string());
        assert_eq!(condition(status, "Ready")["status"], "True");
        assert_eq!(condition(status, "Conflict")["status"], "False");
    }));
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(
        keys(&registry, "services/default/greeter"),
        ["services/default/greeter/10.0.0.1:50051"]
    );
}

#[tokio::test]
async fn deleted_service_loses_its_keys_and_its_finalizer() {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 1);

    // A fresh verifier for the deletion round.
    let (ctx2, api2) = context(&registry, &[]);
    let mut deleting = svc;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let server = api2.run(Scenario::FinalizerRemoval(deleting.clone()));
    let action = reconcile(Arc::new(deleting), ctx2).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&registry, "services/default/greeter").is_empty());
    assert!(registry.owner("services/default/greeter").is_none());
}

#[tokio::test]
async fn a_cleaned_up_service_leaves_no_state_and_no_selection_behind() {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx.clone()).await.unwrap();
    server.await.unwrap();
    assert_eq!(
        ctx.states.len(),
        1,
        "the reconcile kept its service's state"
    );
    assert!(!ctx.sources.read_nothing(), "and recorded the pod it read");
    svc.cleanup(&ctx).await.unwrap();
    assert_eq!(ctx.states.len(), 0);
    assert!(ctx.sources.read_nothing());
}

#[tokio::test]
async fn invalid_spec_is_reported_as_a_condition_and_writes_nothing() {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let mut svc = with_finalizer(service("greeter"));
    svc.spec.target = Some("services/payments/greeter".into());
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        let invalid = condition(status, "InvalidSpec");
        assert_eq!(invalid["status"], "True");
        assert!(
            invalid["message"]
                .as_str()
                .unwrap()
                .contains("may only publish under"),
            "{invalid}"
        );
        assert_eq!(condition(status, "Ready")["status"], "False");
    }));
    let action = reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(registry.writes(), 0, "nothing claimed or written");
    // Counted as a failure, and on the condition gauge an alert can wait on.
    let page = ctx.metrics.encode();
    for series in [
        "grpc_registrar_reconcile_failures_total{error=\"invalid_spec\"} 1\n",
        "grpc_registrar_service_condition{namespace=\"default\",name=\"greeter\",condition=\"InvalidSpec\"} 1\n",
        "grpc_registrar_service_condition{namespace=\"default\",name=\"greeter\",condition=\"Ready\"} 0\n",
    ] {
        assert!(page.contains(series), "{series} missing:\n{page}");
    }
}

#[tokio::test]
async fn second_service_on_a_claimed_target_gets_conflict_and_writes_nothing() {
    let registry = backend();
    let pods = [PodBuilder::ready("p1", "10.0.0.1").build()];
    let (ctx, api) = context(&registry, &pods);
    let mut first = with_finalizer(service("first"));
    first.spec.target = Some("services/default/shared".into());
    let server = api.run(Scenario::StatusPatch(first.clone(), |_| {}));
    reconcile(Arc::new(first.clone()), ctx).await.unwrap();
    server.await.unwrap();

    let (ctx, api) = context(&registry, &pods);
    let mut second = with_finalizer(service("second"));
    second.spec.target = Some("services/default/shared".into());
    let server = api.run(Scenario::OwnerLookupThenStatus(
        second.clone(),
        first,
        |status| {
            let conflict = condition(status, "Conflict");
            assert_eq!(conflict["status"], "True");
            assert!(
                conflict["message"]
                    .as_str()
                    .unwrap()
                    .contains("default/first"),
                "{conflict}"
            );
            assert_eq!(status["registeredEndpoints"], 0);
        },
    ));
    let action = reconcile(Arc::new(second), ctx.clone()).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::requeue(super::CONFLICT_RECHECK));
    let page = ctx.metrics.encode();
    let series = "grpc_registrar_service_condition{namespace=\"default\",name=\"second\",condition=\"Conflict\"} 1\n";
    assert!(page.contains(series), "{series} missing:\n{page}");
    assert_eq!(
        keys(&registry, "services/default/shared"),
        ["services/default/shared/10.0.0.1:50051"]
    );
}

#[tokio::test]
async fn an_unreachable_registry_is_reported_in_status_and_retried() {
    let registry = backend();
    registry.set_unavailable(true);
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        let down = condition(status, "BackendUnavailable");
        assert_eq!(down["status"], "True");
        assert!(
            // The first registry request of a publish: the record of what was published last.
            down["message"]
                .as_str()
                .unwrap()
                .contains("read publication record"),
            "{down}"
        );
        assert_eq!(condition(status, "Ready")["status"], "False");
    }));
    let err = reconcile(Arc::new(svc), ctx.clone()).await.unwrap_err();
    server.await.unwrap();
    assert_eq!(err.metric_label(), "timeout");
    let action = super::error_policy(Arc::new(service("greeter")), &err, ctx);
    assert_ne!(action, Action::await_change());
}

#[tokio::test]
async fn a_colliding_key_template_is_an_invalid_spec_that_claims_and_publishes_nothing() {
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    let (ctx, api) = context(&registry, &pods);
    let mut svc = with_finalizer(service("greeter"));
    svc.spec.key_template = Some("{target}/{namespace}".into());
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        let invalid = condition(status, "InvalidSpec");
        assert_eq!(invalid["status"], "True");
        assert!(
            invalid["message"]
                .as_str()
                .unwrap()
                .contains("both map to key"),
            "{invalid}"
        );
    }));
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&registry, "services/default/greeter").is_empty());
    assert_eq!(
        registry.owner("services/default/greeter"),
        None,
        "an invalid spec claims nothing"
    );
}

#[tokio::test]
async fn a_key_template_naming_nothing_is_invalid_with_one_ready_pod_and_the_key_stays() {
    // Found by the soak: with one registrable endpoint nothing collides, so such a template was
    // taken as valid: the real key was deleted, `<target>/fixed` published, and that spec
    // recorded as the last valid publication.
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").not_ready().build(),
    ];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let mut fixed = svc.clone();
    fixed.spec.key_template = Some("{target}/fixed".into());
    fixed.metadata.generation = Some(2);
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (fixed.clone(), |status| {
            let invalid = condition(status, "InvalidSpec");
            assert_eq!(invalid["status"], "True");
            assert!(
                invalid["message"]
                    .as_str()
                    .unwrap()
                    .contains("names nothing of the endpoint"),
                "{invalid}"
            );
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    let published = keys(&registry, "services/default/greeter");
    assert_eq!(published, ["services/default/greeter/10.0.0.1:50051"]);
    let action = reconcile(Arc::new(fixed), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(keys(&registry, "services/default/greeter"), published);
}

#[tokio::test]
async fn a_spec_turned_invalid_keeps_what_it_published_across_a_lease_replacement() {
    let registry = backend();
    let pods = [PodBuilder::ready("p1", "10.0.0.1").build()];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let mut invalid = svc.clone();
    invalid.spec.key_template = Some("{target}/{nope}".into());
    invalid.metadata.generation = Some(2);
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (invalid.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    let published = registry.entries("services/default/greeter");
    assert_eq!(published.len(), 1);

    // The spec turns invalid, then the lease is lost (every entry gone) and every service is
    // reconciled: the invalid one re-puts its last valid publication.
    registry.lose_lease();
    assert!(registry.entries("services/default/greeter").is_empty());
    let action = reconcile(Arc::new(invalid), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(registry.entries("services/default/greeter"), published);
}

#[tokio::test]
async fn a_spec_turned_invalid_keeps_following_readiness_in_a_new_process() {
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 2);

    // A new process (nothing in memory) sees the spec turned invalid and p2 unready: it
    // rebuilds the last valid publication from the registry's record and deregisters p2.
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").not_ready().build(),
    ];
    let (restarted, api) = context(&registry, &pods);
    let mut invalid = svc;
    invalid.spec.key_template = Some("{target}/{nope}".into());
    invalid.metadata.generation = Some(2);
    let server = api.run(Scenario::StatusPatch(invalid.clone(), |status| {
        assert_eq!(condition(status, "InvalidSpec")["status"], "True");
    }));
    let action = reconcile(Arc::new(invalid), restarted).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        keys(&registry, "services/default/greeter"),
        ["services/default/greeter/10.0.0.1:50051"]
    );
}

#[tokio::test]
async fn a_spec_turned_invalid_still_deregisters_a_pod_that_turns_unready() {
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    let (ctx, api, source) = pod_context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let mut invalid = svc.clone();
    invalid.spec.key_template = Some("{target}/{nope}".into());
    invalid.metadata.generation = Some(2);
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (invalid.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    reconcile(Arc::new(invalid.clone()), ctx.clone())
        .await
        .unwrap();
    ctx.writer.idle().await;
    assert_eq!(keys(&registry, "services/default/greeter").len(), 2);
    // p2 fails its readiness probe while the spec is still invalid: it leaves the registry
    // on the next reconcile.
    source.candidates.apply(
        "default",
        crate::source::pod::candidate(&PodBuilder::ready("p2", "10.0.0.2").not_ready().object()),
    );
    reconcile(Arc::new(invalid), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(
        keys(&registry, "services/default/greeter"),
        ["services/default/greeter/10.0.0.1:50051"]
    );
}

#[tokio::test]
async fn an_invalid_spec_reconciled_again_with_nothing_changed_queues_no_status() {
    let registry = backend();
    let other = |name: &str, ip: &str| PodBuilder::ready(name, ip).label("app", "other").build();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
        other("o1", "10.0.1.1"),
        other("o2", "10.0.1.2"),
        other("o3", "10.0.1.3"),
    ];
    let (ctx, api, _source) = pod_context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    // Another selector, target and a key template that maps its three pods to one key:
    // invalid once the pods are rendered, so the spec got as far as its own target and counts
    // (3 selected, where the publication kept selects 2).
    let mut invalid = svc.clone();
    invalid.spec.selector = Some(LabelSelector {
        match_labels: Some(std::collections::BTreeMap::from([(
            "app".into(),
            "other".into(),
        )])),
        ..LabelSelector::default()
    });
    invalid.spec.target = Some("services/default/other".into());
    invalid.spec.key_template = Some("{target}/fixed".into());
    invalid.metadata.generation = Some(2);
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (invalid.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
            assert_eq!(
                status["target"], "services/default/greeter",
                "status names the target still published"
            );
            assert_eq!(
                status["selectedEndpoints"], 2,
                "and the counts of what is published"
            );
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    reconcile(Arc::new(invalid.clone()), ctx.clone())
        .await
        .unwrap();
    ctx.writer.idle().await;
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 2);
    reconcile(Arc::new(invalid.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        ctx.writer.pending(&invalid),
        None,
        "nothing changed: nothing to write"
    );
}

#[tokio::test]
async fn a_service_ref_publishes_the_ready_endpoints_of_every_slice_of_the_service() {
    let registry = backend();
    let slices = [
        endpoint_slice("greeter-a", "greeter", &[("10.0.0.1", true, Some("g-0"))]),
        endpoint_slice(
            "greeter-b",
            "greeter",
            &[
                ("10.0.0.2", true, Some("g-1")),
                ("10.0.0.3", false, Some("g-2")),
            ],
        ),
        endpoint_slice("other-a", "other", &[("10.0.0.9", true, Some("o-0"))]),
    ];
    let (ctx, api) = slice_context(&registry, &slices);
    let svc = with_finalizer(service_ref(
        "greeter-grpc",
        "greeter",
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("grpc".into()),
    ));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        assert_eq!(status["selectedEndpoints"], 3);
        assert_eq!(status["readyEndpoints"], 2);
        assert_eq!(status["registeredEndpoints"], 2);
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "True");
        assert_eq!(
            ready["message"],
            "2 of 3 endpoints of Service greeter registered; not registered: 1 not ready"
        );
    }));
    reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(
        keys(&registry, "services/default/greeter-grpc"),
        [
            "services/default/greeter-grpc/10.0.0.1:50051",
            "services/default/greeter-grpc/10.0.0.2:50051"
        ]
    );
}

#[tokio::test]
async fn a_service_ref_with_no_endpoints_is_not_ready_with_reason_no_endpoints() {
    let registry = backend();
    let (ctx, api) = slice_context(&registry, &[]);
    let svc = with_finalizer(service_ref(
        "greeter-grpc",
        "missing",
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051),
    ));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "NoEndpoints");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .starts_with("0 of 0 endpoints of Service missing registered"),
            "{ready}"
        );
    }));
    reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_new_target_with_keys_that_cannot_be_written_releases_nothing_and_status_keeps_the_old_one()
 {
    let registry = backend();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let mut moved = svc.clone();
    moved.spec.target = Some("services/default/greeter-v2".into());
    moved.spec.key_template = Some("{target}/{namespace}".into());
    moved.metadata.generation = Some(2);
    moved.status = Some(crate::crd::GrpcServiceStatus {
        target: Some("services/default/greeter".into()),
        ..Default::default()
    });
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (moved.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
            assert_eq!(
                status["target"], "services/default/greeter",
                "the target still published, so the next valid spec releases it"
            );
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    reconcile(Arc::new(moved), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 2);
    assert!(registry.owner("services/default/greeter").is_some());
    assert_eq!(registry.owner("services/default/greeter-v2"), None);
}

// Paused time: the service ref's reconcile waits out the sources' sync wait.
#[tokio::test(start_paused = true)]
async fn a_selector_service_does_not_wait_for_the_endpointslice_watch_and_a_service_ref_does() {
    let registry = backend();
    let pods = PodSource::default();
    pods.candidates.apply(
        "default",
        candidate(&PodBuilder::ready("p1", "10.0.0.1").object()),
    );
    // The slice watch never lists (e.g. EndpointSlices not readable); the pods are listed.
    let (_slices_tx, slices_rx) = tokio::sync::watch::channel(false);
    let sources = Sources::default()
        .with(pods, listed())
        .with(SliceSource::default(), slices_rx);
    let (ctx, api) = context_over(&registry, sources);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        assert_eq!(status["registeredEndpoints"], 1);
    }));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    server.await.unwrap();
    let by_ref = with_finalizer(service_ref(
        "by-ref",
        "greeter",
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(50051),
    ));
    let action = reconcile(Arc::new(by_ref), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(1)));
    assert_eq!(
        registry.owner("services/default/by-ref"),
        None,
        "nothing claimed"
    );
}

#[tokio::test]
async fn a_service_moved_to_another_backend_is_released_here_and_loses_only_this_backends_finalizer()
 {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 1);

    // Now the spec names another backend: this controller releases what it published and
    // removes its own finalizer, and writes no status (the other backend's controller owns it
    // now).
    let (ctx2, api2) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let mut moved = svc;
    moved.spec.backend = crate::fixtures::another_backend();
    let server = api2.run(Scenario::FinalizerRemoval(moved.clone()));
    let action = reconcile(Arc::new(moved), ctx2).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&registry, "services/default/greeter").is_empty());
    assert!(registry.owner("services/default/greeter").is_none());
}

#[tokio::test]
async fn a_service_of_another_backend_is_left_alone() {
    let registry = backend();
    let (ctx, _api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let mut svc = service("greeter");
    svc.spec.backend = crate::fixtures::another_backend();
    // No API request is answered: any (a finalizer or status patch) would hang the reconcile.
    let action = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        reconcile(Arc::new(svc), ctx),
    )
    .await
    .expect("the reconcile made no API request")
    .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&registry, "services/default/greeter").is_empty());
}

#[tokio::test]
async fn a_burst_of_count_changes_is_one_status_write_with_the_final_counts() {
    let registry = backend();
    let (ctx, api, source) = pod_context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |status| {
            assert_eq!(status["registeredEndpoints"], 1)
        }),
        // Two more pods turn ready within the rate limit: one write, with the final count.
        (svc.clone(), |status| {
            assert_eq!(status["registeredEndpoints"], 3)
        }),
    ]));
    reconcile(Arc::new(svc.clone()), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    for (name, ip) in [("p2", "10.0.0.2"), ("p3", "10.0.0.3")] {
        source.candidates.apply(
            "default",
            crate::source::pod::candidate(&PodBuilder::ready(name, ip).object()),
        );
        // The reconcile returns at once: its status is written behind.
        let started = std::time::Instant::now();
        reconcile(Arc::new(svc.clone()), ctx.clone()).await.unwrap();
        assert!(started.elapsed() < super::STATUS_INTERVAL);
    }
    assert_eq!(keys(&registry, "services/default/greeter").len(), 3);
    server.await.unwrap();
}

#[tokio::test]
async fn after_a_change_of_leadership_the_objects_own_status_is_the_truth_again() {
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx.clone()).await.unwrap();
    server.await.unwrap();
    ctx.writer.idle().await;
    assert!(ctx.writer.latest(&svc).is_some(), "what this process wrote");
    // Another leader wrote since: the object carries its status, which wins once cleared.
    let mut newer = svc.clone();
    newer.status = Some(crate::crd::GrpcServiceStatus {
        target: Some("written/by/another/leader".into()),
        ..Default::default()
    });
    assert_ne!(ctx.writer.latest(&newer), newer.status);
    ctx.writer.clear();
    assert_eq!(ctx.writer.latest(&newer), newer.status);
}

#[tokio::test]
async fn a_replica_leading_again_does_not_report_the_replica_that_led_meanwhile_as_a_second_writer()
{
    // Found by the soak: b leads and sees a's announcement (a led before); b is deposed and a
    // leads, beating on; b leads again and took a's moved-on beat for a live second writer (a
    // Warning on every service and `other_writers` 1) though a had been deposed.
    use crate::leader::Role;
    use crate::registry::Backend;
    use std::time::{Duration, Instant};
    let registry = backend();
    let (ctx, _api) = context(&registry, &[]);
    let (role, elected) = tokio::sync::watch::channel(Role::Leader { term: 1 });
    let ctx = Arc::new(
        Arc::try_unwrap(ctx)
            .unwrap_or_else(|_| panic!("the context is shared"))
            .with_role(elected),
    );
    let far = || Instant::now() + Duration::from_secs(600);
    registry.enable_fencing();
    registry.fence("b", 1, far()).await.unwrap();
    registry.heartbeat("a", 7).await.unwrap();
    // Another instance whose beat never changes, through which the test reads b's beats.
    let beat_of_b = || async {
        registry
            .heartbeat("probe", 0)
            .await
            .unwrap()
            .into_iter()
            .find_map(|(i, beat)| (i == "b").then_some(beat))
            .unwrap_or(0)
    };
    let (store, _writer) = kube::runtime::reflector::store();
    let task = tokio::spawn(super::writers::run(
        ctx.clone(),
        store,
        "b".into(),
        Duration::from_millis(200),
    ));
    while beat_of_b().await < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b is deposed; a leads (term 2) and beats on; b leads again in term 3.
    registry.depose();
    role.send_replace(Role::Follower);
    let before = beat_of_b().await;
    registry.heartbeat("a", 8).await.unwrap();
    registry.heartbeat("a", 9).await.unwrap();
    registry.fence("b", 3, far()).await.unwrap();
    role.send_replace(Role::Leader { term: 3 });
    // Two rounds as the leader again; a report would hold for one round (200 ms), and the
    // gauge is read every 10 ms.
    let mut reported = 0;
    while beat_of_b().await < before + 2 {
        reported = reported.max(ctx.metrics.writers.other_writers.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    assert_eq!(reported, 0, "a was reported as a live second writer");
}

/// The values published under `target`, as strings.
fn values(backend: &MemoryBackend, target: &str) -> Vec<String> {
    backend
        .entries(target)
        .into_values()
        .map(|v| String::from_utf8(v).unwrap())
        .collect()
}

/// A service (generation 1), a valid edit of it (its format, generation 2), and an invalid
/// edit of that (a key template naming an unknown placeholder, generation 3).
fn edited_then_invalid() -> (GrpcService, GrpcService, GrpcService) {
    let svc = with_finalizer(service("greeter"));
    let mut edited = svc.clone();
    edited.spec.format = crate::crd::ValueFormat::Address;
    edited.metadata.generation = Some(2);
    let mut invalid = edited.clone();
    invalid.spec.key_template = Some("{target}/{nope}".into());
    invalid.metadata.generation = Some(3);
    (svc, edited, invalid)
}

#[tokio::test]
async fn a_valid_edit_seen_while_the_registry_is_down_is_what_a_later_invalid_edit_publishes() {
    // Found by the soak: a valid edit (a format change) met an unreachable registry, so it was
    // neither synced nor recorded; the spec then turned invalid, and the controller went on
    // publishing the spec before the edit, not the last valid one.
    let registry = backend();
    let (ctx, api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let (svc, edited, invalid) = edited_then_invalid();
    let server = api.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (edited.clone(), |status| {
            assert_eq!(condition(status, "Ready")["reason"], "BackendUnavailable");
        }),
        (invalid.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
        }),
    ]));
    reconcile(Arc::new(svc), ctx.clone()).await.unwrap();
    ctx.writer.idle().await;
    assert!(values(&registry, "services/default/greeter")[0].contains("\"Addr\""));

    registry.set_unavailable(true);
    assert!(reconcile(Arc::new(edited), ctx.clone()).await.is_err());
    ctx.writer.idle().await;
    registry.set_unavailable(false);

    let action = reconcile(Arc::new(invalid), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        values(&registry, "services/default/greeter"),
        ["10.0.0.1:50051"],
        "the last valid spec (Address) is published"
    );
}

#[tokio::test]
async fn a_replica_leading_again_publishes_the_last_valid_spec_another_leader_recorded_meanwhile() {
    // Found by the soak: a replica kept its cache of the registry's record across a term in
    // which another replica led and recorded a later spec; leading again, it re-published its
    // own older spec for a service turned invalid.
    use crate::leader::Role;
    let registry = backend();
    let pods = [PodBuilder::ready("p1", "10.0.0.1").build()];
    let (a, api_a) = context(&registry, &pods);
    let (role, elected) = tokio::sync::watch::channel(Role::Leader { term: 1 });
    let a = Arc::new(
        Arc::try_unwrap(a)
            .unwrap_or_else(|_| panic!("the context is shared"))
            .with_role(elected),
    );
    let (svc, edited, invalid) = edited_then_invalid();
    let server_a = api_a.run(Scenario::StatusPatches(vec![
        (svc.clone(), |_| {}),
        (invalid.clone(), |status| {
            assert_eq!(condition(status, "InvalidSpec")["status"], "True");
        }),
    ]));
    reconcile(Arc::new(svc), a.clone()).await.unwrap();
    a.writer.idle().await;

    // a is deposed; b leads and publishes the edit.
    role.send_replace(Role::Follower);
    let (b, api_b) = context(&registry, &pods);
    let server_b = api_b.run(Scenario::StatusPatch(edited.clone(), |_| {}));
    reconcile(Arc::new(edited), b).await.unwrap();
    server_b.await.unwrap();
    assert_eq!(
        values(&registry, "services/default/greeter"),
        ["10.0.0.1:50051"]
    );

    // a leads again and sees the spec turned invalid.
    role.send_replace(Role::Leader { term: 3 });
    let action = reconcile(Arc::new(invalid), a).await.unwrap();
    server_a.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        values(&registry, "services/default/greeter"),
        ["10.0.0.1:50051"],
        "the record b wrote is the last valid spec"
    );
}

#[tokio::test]
async fn a_previous_target_the_registry_recorded_is_released_even_when_status_does_not_name_it() {
    // Found by the soak: a leader acting on a stale view published under a service's old target
    // after the service had moved; status named the new target, so the old one was never
    // released. The registry's record of the last publication names it.
    let registry = backend();
    let pods = [PodBuilder::ready("p1", "10.0.0.1").build()];
    let (ctx, api) = context(&registry, &pods);
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&registry, "services/default/greeter").len(), 1);

    // Another process sees the service moved, with a status that names no target.
    let (other, api) = context(&registry, &pods);
    let mut moved = svc;
    moved.spec.target = Some("services/default/greeter-v2".into());
    moved.metadata.generation = Some(2);
    moved.status = None;
    let server = api.run(Scenario::StatusPatch(moved.clone(), |status| {
        assert_eq!(status["target"], "services/default/greeter-v2");
    }));
    reconcile(Arc::new(moved), other).await.unwrap();
    server.await.unwrap();
    assert!(keys(&registry, "services/default/greeter").is_empty());
    assert!(registry.owner("services/default/greeter").is_none());
    assert_eq!(keys(&registry, "services/default/greeter-v2").len(), 1);
}

#[tokio::test]
async fn a_service_seen_deleted_is_not_published_again_from_a_view_that_still_holds_it() {
    let registry = backend();
    let (ctx, _api) = context(&registry, &[PodBuilder::ready("p1", "10.0.0.1").build()]);
    let svc = with_finalizer(service("greeter"));
    // Its deletion reached the sweep (released there); this replica's store still holds it.
    ctx.gone.insert(&svc.metadata.uid.clone().unwrap());
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        registry.owner("services/default/greeter"),
        None,
        "nothing claimed"
    );
    assert!(keys(&registry, "services/default/greeter").is_empty());
}

// Paused time: the second sweep comes SWEEP_AGAIN after the first, long before the periodic one.
#[tokio::test(start_paused = true)]
async fn a_gone_service_published_again_by_a_reconcile_under_way_is_swept_again_shortly_after() {
    use crate::registry::{Backend, Claim, Owner};
    let registry = backend();
    let (ctx, _api) = context(&registry, &[]);
    let (store, _writer) = kube::runtime::reflector::store::<GrpcService>();
    let (_synced_tx, synced) = tokio::sync::watch::channel(true);
    let (gone_tx, gone) = tokio::sync::mpsc::unbounded_channel();
    let target = "services/default/greeter";
    let who = Owner {
        uid: "u1".into(),
        namespace: "default".into(),
        name: "greeter".into(),
    };
    assert_eq!(registry.claim(target, &who).await.unwrap(), Claim::Owned);
    tokio::spawn(super::sweep::sweeper(
        ctx.clone(),
        store,
        super::Scope::default(),
        synced,
        gone,
    ));
    gone_tx.send("u1".to_owned()).unwrap();
    while registry.owner(target).is_some() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // A reconcile that read the object before it went claims its target again.
    assert_eq!(registry.claim(target, &who).await.unwrap(), Claim::Owned);
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert_eq!(registry.owner(target), None, "swept again");
}
