//! The Consul half of spec validation: service names, tags and the etcd-only settings.

use super::ConsulPlanner;
use super::ConsulService;
use crate::crd::GrpcService;
use crate::desired::{CustomTargets, Policy, SpecError};
use crate::fixtures::service;
use crate::registry::Planner;
use crate::registry::etcd::EtcdPlanner;

/// The Consul service a spec plans to.
fn planned(svc: &GrpcService, policy: &Policy) -> Result<ConsulService, SpecError> {
    Ok(ConsulPlanner
        .plan(svc, policy)?
        .placement
        .as_any()
        .downcast_ref::<ConsulService>()
        .expect("a consul service")
        .clone())
}

/// A Consul controller trusting `default` with flat names.
fn consul_policy() -> Policy {
    Policy {
        backend: crate::crd::Backend::Consul,
        custom_targets: CustomTargets::Namespaces(vec!["default".into()]),
        ..Policy::default()
    }
}

#[test]
fn with_the_consul_backend_the_target_is_the_consul_service_name_with_its_tags() {
    let mut svc = service("greeter");
    svc.spec.backend = crate::crd::Backend::Consul;
    let plan = planned(&svc, &consul_policy()).unwrap();
    assert_eq!((plan.service.as_str(), plan.tags.len()), ("greeter", 0));
    // Untrusted, the same service is qualified with its namespace.
    let untrusted = Policy {
        custom_targets: CustomTargets::None,
        ..consul_policy()
    };
    assert_eq!(
        planned(&svc, &untrusted).unwrap().service,
        "greeter--default"
    );

    svc.spec.consul = Some(crate::crd::ConsulService {
        service: Some("greeter-v2".into()),
        tags: vec!["grpc".into()],
    });
    let plan = planned(&svc, &consul_policy()).unwrap();
    assert_eq!(plan.service, "greeter-v2");
    assert_eq!(plan.tags, ["grpc"]);
}

#[test]
fn with_the_consul_backend_etcd_settings_and_non_dns_names_are_invalid_specs() {
    let mut svc = service("greeter");
    svc.spec.backend = crate::crd::Backend::Consul;
    svc.spec.ttl_seconds = Some(30);
    assert!(matches!(
        planned(&svc, &consul_policy()),
        Err(SpecError::Backend(_))
    ));
    svc.spec.ttl_seconds = None;
    for bad in ["-greeter", "greeter.v2", "grüße", "", "Greeter"] {
        svc.spec.consul = Some(crate::crd::ConsulService {
            service: Some(bad.into()),
            tags: vec![],
        });
        let err = planned(&svc, &consul_policy()).unwrap_err();
        assert!(
            err.to_string().contains("not a Consul service name"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_flat_consul_name_from_before_the_rule_is_offered_only_when_the_rule_gives_another() {
    let mut svc = service("greeter");
    svc.spec.backend = crate::crd::Backend::Consul;
    let untrusted = Policy {
        custom_targets: CustomTargets::None,
        ..consul_policy()
    };
    assert_eq!(
        ConsulPlanner.pre_rule_target(&svc, &untrusted).as_deref(),
        Some("greeter")
    );
    assert_eq!(ConsulPlanner.pre_rule_target(&svc, &consul_policy()), None);
    svc.spec.consul = Some(crate::crd::ConsulService {
        service: Some("payments".into()),
        tags: vec![],
    });
    assert!(matches!(
        planned(&svc, &untrusted),
        Err(SpecError::NameNotAllowed { .. })
    ));
    assert_eq!(
        ConsulPlanner.pre_rule_target(&svc, &untrusted).as_deref(),
        Some("payments")
    );
    let kept = ConsulPlanner
        .keeping(&svc, &untrusted, "payments".into())
        .unwrap();
    assert_eq!(kept.target(), "payments");
    // The etcd backend has no such rule.
    svc.spec.backend = crate::crd::Backend::Etcd;
    svc.spec.consul = None;
    assert_eq!(EtcdPlanner.pre_rule_target(&svc, &Policy::default()), None);
}
