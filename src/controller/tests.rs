//! Reconciler tests: a scripted mock API server (controller-rs pattern) and a real etcd.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;
use test_support::EtcdServer;

use super::{RESYNC, reconcile};
use crate::crd::{FINALIZER, GrpcService};
use crate::fixtures::verifier::{Scenario, context};
use crate::fixtures::{PodBuilder, service};
use kube::runtime::controller::Action;

fn with_finalizer(mut svc: GrpcService) -> GrpcService {
    svc.metadata.finalizers = Some(vec![FINALIZER.into()]);
    svc
}

async fn keys(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    let resp = etcd
        .client()
        .await
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
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
async fn new_service_gets_the_finalizer_before_anything_is_written() {
    let etcd = EtcdServer::start().await;
    let (ctx, api) = context(&etcd, &[PodBuilder::ready("p1", "10.0.0.1").build()]).await;
    let svc = service("greeter");
    let server = api.run(Scenario::FinalizerCreation(svc.clone()));
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&etcd, "services/").await.is_empty());
}

#[tokio::test]
async fn ready_pods_are_registered_and_status_reports_counts() {
    let etcd = EtcdServer::start().await;
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").not_ready().build(),
        PodBuilder::ready("p3", "10.0.0.3")
            .label("app", "other")
            .build(),
    ];
    let (ctx, api) = context(&etcd, &pods).await;
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |status| {
        assert_eq!(status["target"], "services/default/greeter");
        assert_eq!(status["selectedPods"], 2);
        assert_eq!(status["readyPods"], 1);
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
        keys(&etcd, "services/").await,
        ["services/default/greeter/10.0.0.1:50051"]
    );
}

#[tokio::test]
async fn deleted_service_loses_its_keys_and_its_finalizer() {
    let etcd = EtcdServer::start().await;
    let (ctx, api) = context(&etcd, &[PodBuilder::ready("p1", "10.0.0.1").build()]).await;
    let svc = with_finalizer(service("greeter"));
    let server = api.run(Scenario::StatusPatch(svc.clone(), |_| {}));
    reconcile(Arc::new(svc.clone()), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(keys(&etcd, "services/").await.len(), 1);

    // A fresh verifier for the deletion round.
    let (ctx2, api2) = context(&etcd, &[]).await;
    let mut deleting = svc;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let server = api2.run(Scenario::FinalizerRemoval(deleting.clone()));
    let action = reconcile(Arc::new(deleting), ctx2).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&etcd, "services/").await.is_empty());
    assert!(keys(&etcd, "grpc-registrar/owners/").await.is_empty());
}

#[tokio::test]
async fn invalid_spec_is_reported_as_a_condition_and_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let (ctx, api) = context(&etcd, &[PodBuilder::ready("p1", "10.0.0.1").build()]).await;
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
    let action = reconcile(Arc::new(svc), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(keys(&etcd, "").await.is_empty());
}

#[tokio::test]
async fn second_service_on_a_claimed_target_gets_conflict_and_writes_nothing() {
    let etcd = EtcdServer::start().await;
    let pods = [PodBuilder::ready("p1", "10.0.0.1").build()];
    let (ctx, api) = context(&etcd, &pods).await;
    let mut first = with_finalizer(service("first"));
    first.spec.target = Some("services/default/shared".into());
    let server = api.run(Scenario::StatusPatch(first.clone(), |_| {}));
    reconcile(Arc::new(first.clone()), ctx).await.unwrap();
    server.await.unwrap();

    let (ctx, api) = context(&etcd, &pods).await;
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
    let action = reconcile(Arc::new(second), ctx).await.unwrap();
    server.await.unwrap();
    assert_eq!(action, Action::requeue(super::CONFLICT_RECHECK));
    assert_eq!(
        keys(&etcd, "services/").await,
        ["services/default/shared/10.0.0.1:50051"]
    );
}

#[test]
fn watch_backoff_doubles_to_four_seconds_with_jitter_and_resets() {
    use kube::runtime::utils::Backoff as _;
    let mut backoff = super::WatchBackoff::default();
    let delays: Vec<Duration> = backoff.by_ref().take(8).collect();
    for (delay, base) in delays
        .iter()
        .zip([250u64, 500, 1000, 2000, 4000, 4000, 4000, 4000])
    {
        let base = Duration::from_millis(base);
        assert!(
            *delay >= base.mul_f64(0.75) && *delay < base.mul_f64(1.25),
            "{delay:?} vs {base:?}"
        );
    }
    backoff.reset();
    assert!(backoff.next().unwrap() < Duration::from_millis(313));
}
