//! The spec rules through the etcd wire format: a spec and its pods in, keys and values out
//! (the backend-neutral rules of [`crate::desired`] and the etcd planning and layout together).

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use super::super::layout::Layout;
use super::super::template::KeyTemplate;
use super::EtcdPlanner;
use crate::desired::*;
use crate::fixtures::{PodBuilder, endpoint_slice, service, service_ref};
use crate::registry::Planner;
use crate::source::Candidate;
use crate::source::Selection;
use crate::source::index::CandidateIndex;
use crate::source::pod::{PodObject, ZONE_LABEL, candidate};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::json;
use tonic_etcd_resolver::ValueFormat;

/// A spec planned for etcd: the neutral plan, its target and its key layout.
#[derive(Debug)]
struct Planned {
    plan: Plan,
    target: String,
    layout: Layout,
}

impl Deref for Planned {
    type Target = Plan;

    fn deref(&self) -> &Plan {
        &self.plan
    }
}

impl Planned {
    fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// Validates and plans a spec as the etcd backend does.
fn planned(svc: &crate::crd::GrpcService, policy: &Policy) -> Result<Planned, SpecError> {
    let crate::registry::Planned { plan, placement } = EtcdPlanner.plan(svc, policy)?;
    let layout = placement
        .as_any()
        .downcast_ref::<Layout>()
        .expect("an etcd layout")
        .clone();
    Ok(Planned {
        plan,
        target: layout.target.clone(),
        layout,
    })
}

fn plan() -> Planned {
    planned(&service("greeter"), &Policy::default()).unwrap()
}

/// What a service's pods become on the wire: the pod source, `desired`, then the etcd layout.
#[derive(Debug)]
struct Rendered {
    entries: BTreeMap<String, Vec<u8>>,
    selected: usize,
    ready: usize,
    skipped: BTreeMap<String, Skip>,
}

fn desired(plan: &Planned, pods: &[Pod]) -> Result<Rendered, SpecError> {
    let candidates: Vec<Arc<Candidate>> = pods
        .iter()
        .map(|p| Arc::new(candidate(&PodObject::from(p))))
        .collect();
    let d = crate::desired::desired(plan, &candidates);
    Ok(Rendered {
        entries: plan.layout().render(&d.endpoints)?,
        selected: d.selected,
        ready: d.ready,
        skipped: d.skipped,
    })
}

/// The logical endpoints `pods` give under `plan`, before any key is rendered.
fn desired_endpoints(plan: &Planned, pods: &[Pod]) -> Vec<LogicalEndpoint> {
    let candidates: Vec<Arc<Candidate>> = pods
        .iter()
        .map(|p| Arc::new(candidate(&PodObject::from(p))))
        .collect();
    crate::desired::desired(plan, &candidates).endpoints
}

fn keys(d: &Rendered) -> Vec<&str> {
    d.entries.keys().map(String::as_str).collect()
}

#[test]
fn ready_running_pod_is_registered_under_the_default_target() {
    let d = desired(&plan(), &[PodBuilder::ready("p1", "10.0.0.7").build()]).unwrap();
    assert_eq!(keys(&d), ["services/default/greeter/10.0.0.7:50051"]);
    assert_eq!((d.selected, d.ready), (1, 1));
}

#[test]
fn value_is_etcd_naming_json_with_pod_metadata() {
    let pod = PodBuilder::ready("p1", "10.0.0.7")
        .label(ZONE_LABEL, "zone-a")
        .build();
    let d = desired(&plan(), &[pod]).unwrap();
    let value = String::from_utf8(d.entries.values().next().unwrap().clone()).unwrap();
    assert_eq!(
        value,
        r#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"namespace":"default","node":"node-1","pod":"p1","zone":"zone-a"}}"#
    );
}

#[test]
fn static_metadata_and_selected_labels_are_merged_but_cannot_override_reserved_keys() {
    let mut svc = service("greeter");
    svc.spec.metadata = BTreeMap::from([("version".into(), "v2".into())]);
    svc.spec.metadata_from_labels = vec!["track".into(), "absent".into(), "pod".into()];
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pod = PodBuilder::ready("p1", "10.0.0.7")
        .label("track", "canary")
        .label("pod", "spoofed")
        .build();
    let d = desired(&plan, &[pod]).unwrap();
    let ep = tonic_etcd_resolver::format::parse(d.entries.values().next().unwrap()).unwrap();
    assert_eq!(
        ep.metadata.unwrap(),
        json!({"namespace":"default","node":"node-1","pod":"p1","track":"canary","version":"v2"})
    );
}

#[test]
fn address_format_value_is_the_bare_address() {
    let mut svc = service("greeter");
    svc.spec.format = ValueFormat::Address;
    let plan = planned(&svc, &Policy::default()).unwrap();
    let d = desired(&plan, &[PodBuilder::ready("p1", "10.0.0.7").build()]).unwrap();
    assert_eq!(d.entries.values().next().unwrap(), b"10.0.0.7:50051");
}

#[test]
fn unready_pod_is_not_registered_but_counted_as_selected() {
    let d = desired(
        &plan(),
        &[PodBuilder::ready("p1", "10.0.0.7").not_ready().build()],
    )
    .unwrap();
    assert!(d.entries.is_empty());
    assert_eq!((d.selected, d.ready), (1, 0));
    assert_eq!(d.skipped["p1"], Skip::NotReady);
}

#[test]
fn publish_not_ready_addresses_registers_running_unready_pods() {
    let mut svc = service("greeter");
    svc.spec.publish_not_ready_addresses = true;
    let plan = planned(&svc, &Policy::default()).unwrap();
    let d = desired(
        &plan,
        &[PodBuilder::ready("p1", "10.0.0.7").not_ready().build()],
    )
    .unwrap();
    assert_eq!(d.entries.len(), 1);
    assert_eq!(d.ready, 0);
}

#[test]
fn publish_not_ready_addresses_still_requires_running() {
    let mut svc = service("greeter");
    svc.spec.publish_not_ready_addresses = true;
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pod = PodBuilder::ready("p1", "10.0.0.7")
        .not_ready()
        .phase("Pending")
        .build();
    assert_eq!(
        desired(&plan, &[pod]).unwrap().skipped["p1"],
        Skip::NotRunning
    );
}

#[test]
fn pod_that_is_not_running_is_not_registered() {
    for phase in ["Pending", "Succeeded", "Failed", "Unknown"] {
        let d = desired(
            &plan(),
            &[PodBuilder::ready("p1", "10.0.0.7").phase(phase).build()],
        )
        .unwrap();
        assert_eq!(d.skipped["p1"], Skip::NotRunning, "{phase}");
    }
}

#[test]
fn pod_without_ip_is_not_registered() {
    let d = desired(
        &plan(),
        &[PodBuilder::ready("p1", "10.0.0.7").no_ip().build()],
    )
    .unwrap();
    assert_eq!(d.skipped["p1"], Skip::NoPodIp);
}

#[test]
fn terminating_pod_is_deregistered_before_exit_even_when_still_ready() {
    let d = desired(
        &plan(),
        &[PodBuilder::ready("p1", "10.0.0.7").terminating().build()],
    )
    .unwrap();
    assert_eq!(d.skipped["p1"], Skip::Terminating);
    assert!(d.entries.is_empty());
}

#[test]
fn ready_condition_false_blocks_registration_so_readiness_gates_count() {
    // The kubelet folds readiness gates into the Ready condition: Ready=False with all containers
    // ready is exactly an unmet gate.
    let d = desired(
        &plan(),
        &[PodBuilder::ready("p1", "10.0.0.7").not_ready().build()],
    )
    .unwrap();
    assert_eq!(d.skipped["p1"], Skip::NotReady);
}

#[test]
fn named_port_resolves_per_pod() {
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1")
            .port("grpc", 50051)
            .build(),
        PodBuilder::ready("p2", "10.0.0.2")
            .port("grpc", 9090)
            .build(),
    ];
    let d = desired(&plan(), &pods).unwrap();
    assert_eq!(
        keys(&d),
        [
            "services/default/greeter/10.0.0.1:50051",
            "services/default/greeter/10.0.0.2:9090"
        ]
    );
}

#[test]
fn pod_without_the_named_port_is_skipped() {
    let d = desired(
        &plan(),
        &[PodBuilder::ready("p1", "10.0.0.7")
            .port("http", 8080)
            .build()],
    )
    .unwrap();
    assert_eq!(d.skipped["p1"], Skip::PortNotFound);
}

#[test]
fn numeric_port_is_used_as_is() {
    let mut svc = service("greeter");
    svc.spec.port = Some(IntOrString::Int(7000));
    let plan = planned(&svc, &Policy::default()).unwrap();
    let d = desired(&plan, &[PodBuilder::ready("p1", "10.0.0.7").build()]).unwrap();
    assert_eq!(keys(&d), ["services/default/greeter/10.0.0.7:7000"]);
}

#[test]
fn a_numeric_port_no_container_declares_is_registered_and_reported() {
    let mut svc = service("greeter");
    svc.spec.port = Some(IntOrString::Int(50051));
    let numeric = planned(&svc, &Policy::default()).unwrap();
    let pods = [
        PodBuilder::ready("declares", "10.0.0.1")
            .port("grpc", 50051)
            .build(),
        PodBuilder::ready("typo", "10.0.0.2")
            .port("grpc", 50061)
            .build(),
    ];
    let candidates: Vec<Arc<Candidate>> = pods
        .iter()
        .map(|p| Arc::new(candidate(&PodObject::from(p))))
        .collect();
    let d = crate::desired::desired(&numeric, &candidates);
    assert_eq!(
        d.endpoints.len(),
        2,
        "both are registered, as a targetPort would be"
    );
    assert_eq!(d.undeclared_port, Some((50051, 1)));
    assert!(d.ports_offered.contains(&("grpc".to_owned(), 50061)));
    // A named port, or a number every pod declares, raises nothing.
    let d = crate::desired::desired(&numeric, &candidates[..1]);
    assert_eq!(d.undeclared_port, None);
    let d = crate::desired::desired(&plan(), &candidates);
    assert_eq!(d.undeclared_port, None);
}

#[test]
fn ipv6_pod_address_is_bracketed_in_key_and_value() {
    let d = desired(&plan(), &[PodBuilder::ready("p1", "fd00::7").build()]).unwrap();
    assert_eq!(keys(&d), ["services/default/greeter/[fd00::7]:50051"]);
    let ep = tonic_etcd_resolver::format::parse(d.entries.values().next().unwrap()).unwrap();
    assert_eq!(ep.addr, "[fd00::7]:50051");
}

#[test]
fn selector_selects_only_matching_pods_in_the_same_namespace() {
    let plan = plan();
    let index = CandidateIndex::default();
    for pod in [
        PodBuilder::ready("p", "10.0.0.1").build(),
        PodBuilder::ready("other-app", "10.0.0.2")
            .label("app", "other")
            .build(),
        PodBuilder::ready("elsewhere", "10.0.0.3")
            .namespace("other")
            .build(),
    ] {
        index.apply(&pod.namespace().unwrap(), candidate(&PodObject::from(&pod)));
    }
    let Selection::Pods(selector) = &plan.selection else {
        panic!("a selector spec reads pods")
    };
    let selected = index.select(&plan.namespace, selector);
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0].id, "p");
}

#[test]
fn kratos_format_writes_service_instances_under_kratos_key_layout() {
    let mut svc = service("greeter");
    svc.spec.format = ValueFormat::Kratos;
    svc.spec.target = Some("/microservices/greeter".into());
    svc.spec.metadata = BTreeMap::from([("version".into(), "v1".into())]);
    let policy = Policy {
        custom_targets: CustomTargets::All,
        ..Policy::default()
    };
    let plan = planned(&svc, &policy).unwrap();
    let d = desired(&plan, &[PodBuilder::ready("p1", "10.0.0.7").build()]).unwrap();
    assert_eq!(keys(&d), ["/microservices/greeter/p1"]);
    assert_eq!(
        String::from_utf8(d.entries.values().next().unwrap().clone()).unwrap(),
        r#"{"id":"p1","name":"greeter","version":"v1","metadata":{"namespace":"default","node":"node-1","pod":"p1","version":"v1"},"endpoints":["grpc://10.0.0.7:50051"]}"#
    );
}

#[test]
fn key_template_reproduces_seed_layouts() {
    let mut svc = service("greeter");
    svc.spec.target = Some("services/default/greeter".into());
    svc.spec.key_template = Some("{target}/{pod}.{namespace}/{ip}-{port}".into());
    let plan = planned(&svc, &Policy::default()).unwrap();
    let d = desired(&plan, &[PodBuilder::ready("p1", "10.0.0.7").build()]).unwrap();
    assert_eq!(
        keys(&d),
        ["services/default/greeter/p1.default/10.0.0.7-50051"]
    );
}

#[test]
fn key_template_that_collides_is_an_error_naming_both_pods() {
    let mut svc = service("greeter");
    svc.spec.key_template = Some("{target}/{namespace}".into());
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    let err = desired(&plan, &pods).unwrap_err();
    assert!(
        matches!(err, SpecError::KeyCollision { ref first, ref second, .. } if first == "p1" && second == "p2")
    );
}

#[test]
fn key_template_with_unknown_placeholder_or_foreign_prefix_is_rejected() {
    for bad in [
        "{target}/{host}",
        "/elsewhere/{addr}",
        "{target}/{addr",
        "{target}/",
        "{target}/x}",
    ] {
        assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn custom_target_under_own_namespace_prefix_is_allowed() {
    let mut svc = service("greeter");
    svc.spec.target = Some("services/default/greeter-v2".into());
    assert_eq!(
        planned(&svc, &Policy::default()).unwrap().target,
        "services/default/greeter-v2"
    );
}

#[test]
fn custom_target_in_another_namespace_prefix_is_refused_even_where_custom_targets_are_allowed() {
    let mut svc = service("greeter");
    svc.spec.target = Some("services/payments/greeter".into());
    let err = planned(&svc, &Policy::default()).unwrap_err();
    assert!(matches!(err, SpecError::TargetNotAllowed { .. }), "{err}");
    let policy = Policy {
        custom_targets: CustomTargets::All,
        ..Policy::default()
    };
    let err = planned(&svc, &policy).unwrap_err();
    assert!(matches!(err, SpecError::TargetNotAllowed { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("may only publish under \"services/default/, or outside services/\""),
        "{err}"
    );
}

#[test]
fn the_tenancy_rules_hold_for_every_target_shape_with_and_without_custom_targets() {
    use CustomTargets::{All, None as NoCustom};
    // (target, custom targets allowed, Ok(normalised) or the error kind)
    let cases: &[(&str, CustomTargets, Result<&str, &str>)] = &[
        ("services/default/a", NoCustom, Ok("services/default/a")),
        ("services/default/a/b", NoCustom, Ok("services/default/a/b")),
        ("/services/default/a", NoCustom, Ok("/services/default/a")),
        ("services/default", NoCustom, Err("not allowed")),
        ("services/default", All, Err("not allowed")),
        ("services/victim/hello", NoCustom, Err("not allowed")),
        ("services/victim/hello", All, Err("not allowed")),
        ("/services/victim/hello", All, Err("not allowed")),
        ("services/victim", All, Err("not allowed")),
        ("services", All, Err("not allowed")),
        ("/services", All, Err("not allowed")),
        (
            "services/default/../victim/hello",
            NoCustom,
            Err("malformed"),
        ),
        ("services/bad/../victim/hello", All, Err("malformed")),
        ("services/default/./a", NoCustom, Err("malformed")),
        ("services/default/a/..", All, Err("malformed")),
        ("services//default/a", All, Err("malformed")),
        ("services/default/a/", All, Err("malformed")),
        ("/", All, Err("malformed")),
        ("grpc-registrar/owners/x", All, Err("records")),
        ("grpc-registrar", All, Err("records")),
        ("/grpc-registrar/x", All, Err("records")),
        ("etcdv3_resolver/greeter", NoCustom, Err("not allowed")),
        (
            "etcdv3_resolver/greeter",
            All,
            Ok("etcdv3_resolver/greeter"),
        ),
        ("/microservices/hello", All, Ok("/microservices/hello")),
        ("servicesx/victim/hello", All, Ok("servicesx/victim/hello")),
    ];
    for (target, custom, want) in cases {
        let mut svc = service("greeter");
        svc.spec.target = Some((*target).into());
        let policy = Policy {
            custom_targets: custom.clone(),
            ..Policy::default()
        };
        let got = planned(&svc, &policy).map(|p| p.target);
        let kind = match &got {
            Ok(t) => Ok(t.as_str()),
            Err(SpecError::TargetNotAllowed { .. }) => Err("not allowed"),
            Err(SpecError::Target(_, m)) if m.starts_with("malformed") => Err("malformed"),
            Err(SpecError::Target(_, m)) if m.contains("records") => Err("records"),
            Err(e) => panic!("{target}: unexpected {e}"),
        };
        assert_eq!(&kind, want, "{target} with {custom:?}: {got:?}");
    }
}

#[test]
fn target_inside_the_registrar_records_is_refused_even_when_custom_targets_are_allowed() {
    let mut svc = service("greeter");
    svc.spec.target = Some("grpc-registrar/owners".into());
    let policy = Policy {
        custom_targets: CustomTargets::All,
        ..Policy::default()
    };
    assert!(matches!(planned(&svc, &policy), Err(SpecError::Target(..))));
}

#[test]
fn malformed_targets_are_refused() {
    for bad in ["", "a//b", "a/b/", "a b"] {
        let mut svc = service("greeter");
        svc.spec.target = Some(bad.into());
        let policy = Policy {
            custom_targets: CustomTargets::All,
            ..Policy::default()
        };
        assert!(
            matches!(planned(&svc, &policy), Err(SpecError::Target(..))),
            "{bad:?}"
        );
    }
}

#[test]
fn empty_selector_is_an_invalid_spec() {
    let mut svc = service("greeter");
    svc.spec.selector = Some(Default::default());
    assert!(matches!(
        planned(&svc, &Policy::default()),
        Err(SpecError::Selector(_))
    ));
}

#[test]
fn out_of_range_numeric_port_is_an_invalid_spec() {
    let mut svc = service("greeter");
    svc.spec.port = Some(IntOrString::Int(0));
    assert_eq!(
        planned(&svc, &Policy::default()).unwrap_err(),
        SpecError::PortRange(0)
    );
}

#[test]
fn custom_targets_flag_parses_none_list_and_star() {
    assert_eq!(CustomTargets::parse(""), CustomTargets::None);
    assert_eq!(CustomTargets::parse("*"), CustomTargets::All);
    assert_eq!(
        CustomTargets::parse("a,b"),
        CustomTargets::Namespaces(vec!["a".into(), "b".into()])
    );
}

#[test]
fn digit_only_port_name_is_an_invalid_spec() {
    let mut svc = service("greeter");
    svc.spec.port = Some(IntOrString::String("1234".into()));
    assert!(matches!(
        planned(&svc, &Policy::default()),
        Err(SpecError::PortName(_))
    ));
}

#[test]
fn a_spec_needs_exactly_one_source_and_the_port_where_that_source_takes_it() {
    let plan = planned(
        &service_ref("greeter", "greeter-svc", IntOrString::String("grpc".into())),
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(plan.selection.service(), Some("greeter-svc"));
    assert_eq!(plan.port, IntOrString::String("grpc".into()));
    let mut both = service_ref("greeter", "greeter-svc", IntOrString::Int(50051));
    both.spec.selector = service("greeter").spec.selector;
    let mut neither = service("greeter");
    neither.spec.selector = None;
    let mut no_port = service("greeter");
    no_port.spec.port = None;
    let mut port_twice = service_ref("greeter", "greeter-svc", IntOrString::Int(50051));
    port_twice.spec.port = Some(IntOrString::Int(50051));
    for (svc, needle) in [
        (both, "exactly one"),
        (neither, "exactly one"),
        (no_port, "port is required"),
        (port_twice, "set serviceRef.port"),
    ] {
        let err = planned(&svc, &Policy::default()).unwrap_err();
        assert!(matches!(err, SpecError::Source(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let bad_port = service_ref("greeter", "greeter-svc", IntOrString::Int(0));
    assert_eq!(
        planned(&bad_port, &Policy::default()).unwrap_err(),
        SpecError::PortRange(0)
    );
}

#[test]
fn a_services_endpoints_publish_with_pod_node_and_zone_and_hand_made_ones_without_a_pod() {
    let plan = planned(
        &service_ref("greeter", "greeter-svc", IntOrString::String("grpc".into())),
        &Policy::default(),
    )
    .unwrap();
    let slice = endpoint_slice(
        "greeter-svc-abc",
        "greeter-svc",
        &[
            ("10.0.0.1", true, Some("greeter-0")),
            ("10.0.0.2", false, Some("greeter-1")),
            ("192.168.7.7", true, None),
        ],
    );
    let candidates: Vec<Arc<Candidate>> = crate::source::slice::candidates(&slice)
        .into_iter()
        .map(Arc::new)
        .collect();
    let d = crate::desired::desired(&plan, &candidates);
    assert_eq!((d.selected, d.ready), (3, 2));
    assert_eq!(d.service.as_deref(), Some("greeter-svc"));
    assert_eq!(d.skipped.get("greeter-1"), Some(&Skip::NotReady));
    let addrs: Vec<String> = d.endpoints.iter().map(LogicalEndpoint::addr).collect();
    assert_eq!(addrs, ["10.0.0.1:50051", "192.168.7.7:50051"]);
    let pod_backed = &d.endpoints[0].metadata;
    assert_eq!(pod_backed.get("pod").map(String::as_str), Some("greeter-0"));
    assert_eq!(pod_backed.get("zone").map(String::as_str), Some("zone-a"));
    assert_eq!(pod_backed.get("node").map(String::as_str), Some("node-1"));
    assert!(
        !d.endpoints[1].metadata.contains_key("pod"),
        "a hand-made endpoint has no pod: {:?}",
        d.endpoints[1].metadata
    );
}

#[test]
fn a_numeric_service_port_must_be_listed_and_fqdn_endpoints_are_skipped_with_a_reason() {
    let slice = endpoint_slice("s", "svc", &[("10.0.0.1", true, None)]);
    let candidates: Vec<Arc<Candidate>> = crate::source::slice::candidates(&slice)
        .into_iter()
        .map(Arc::new)
        .collect();
    let listed = planned(
        &service_ref("g", "svc", IntOrString::Int(50051)),
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(
        crate::desired::desired(&listed, &candidates)
            .endpoints
            .len(),
        1
    );
    let unlisted = planned(
        &service_ref("g", "svc", IntOrString::Int(80)),
        &Policy::default(),
    )
    .unwrap();
    let d = crate::desired::desired(&unlisted, &candidates);
    assert!(d.endpoints.is_empty());
    assert_eq!(d.skipped.get("10.0.0.1"), Some(&Skip::PortNotFound));
    let fqdn = Candidate {
        id: "grpc.example.com".into(),
        fqdn: Some("grpc.example.com".into()),
        ports: vec![("grpc".into(), 50051)],
        ports_complete: true,
        ready: true,
        serving: true,
        ..Candidate::default()
    };
    let d = crate::desired::desired(&listed, &[Arc::new(fqdn)]);
    assert_eq!(d.skipped.get("grpc.example.com"), Some(&Skip::Fqdn));
}

#[test]
fn with_a_cluster_name_every_endpoint_says_which_cluster_it_is_in() {
    let policy = Policy {
        cluster: Some("east".into()),
        ..Policy::default()
    };
    let plan = planned(&service("greeter"), &policy).unwrap();
    let pods = [Arc::new(candidate(
        &PodBuilder::ready("p1", "10.0.0.1").object(),
    ))];
    let d = crate::desired::desired(&plan, &pods);
    assert_eq!(
        d.endpoints[0].metadata.get("cluster").map(String::as_str),
        Some("east")
    );
    let plain = crate::desired::desired(
        &planned(&service("greeter"), &Policy::default()).unwrap(),
        &pods,
    );
    assert!(!plain.endpoints[0].metadata.contains_key("cluster"));
}

#[test]
fn an_entry_too_large_for_any_registry_write_is_an_invalid_spec_not_a_backend_error() {
    // The CRD bounds metadata far below this; a controller fed an unbounded spec still refuses.
    let mut svc = service("greeter");
    svc.spec.metadata = BTreeMap::from([("blob".to_owned(), "x".repeat(MAX_ENTRY_BYTES))]);
    let err = desired(
        &planned(&svc, &Policy::default()).unwrap(),
        &[PodBuilder::ready("p1", "10.0.0.1").build()],
    )
    .unwrap_err();
    assert!(matches!(err, SpecError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("shrink metadata"), "{err}");
}

fn weights(plan: &Planned, pods: &[Pod]) -> (Vec<Option<String>>, Vec<String>) {
    let candidates: Vec<Arc<Candidate>> = pods
        .iter()
        .map(|p| Arc::new(candidate(&PodObject::from(p))))
        .collect();
    let d = crate::desired::desired(plan, &candidates);
    (
        d.endpoints
            .iter()
            .map(|e| e.metadata.get("weight").cloned())
            .collect(),
        d.invalid_weights.into_iter().collect(),
    )
}

#[test]
fn spec_weight_is_written_as_metadata_weight_and_a_pod_annotation_overrides_it() {
    let mut svc = service("greeter");
    svc.spec.weight = Some(20);
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2")
            .annotation(WEIGHT_ANNOTATION, "100")
            .build(),
    ];
    assert_eq!(
        weights(&plan, &pods),
        (vec![Some("20".into()), Some("100".into())], vec![])
    );
    let d = desired(&plan, &pods).unwrap();
    let value = String::from_utf8(d.entries.values().next().unwrap().clone()).unwrap();
    assert!(value.contains(r#""weight":"20""#), "{value}");
}

#[test]
fn no_weight_is_written_unless_the_spec_or_the_pod_asks() {
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2")
            .annotation(WEIGHT_ANNOTATION, " 7 ")
            .build(),
    ];
    assert_eq!(
        weights(&plan(), &pods),
        (vec![None, Some("7".into())], vec![])
    );
}

#[test]
fn an_annotation_that_is_not_a_weight_falls_back_to_the_service_weight_and_is_reported() {
    let mut svc = service("greeter");
    svc.spec.weight = Some(3);
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pods: Vec<Pod> = ["0", "10001", "-1", "heavy", "1.5", ""]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            PodBuilder::ready(&format!("p{i}"), &format!("10.0.0.{}", i + 1))
                .annotation(WEIGHT_ANNOTATION, w)
                .build()
        })
        .collect();
    let (got, invalid) = weights(&plan, &pods);
    assert_eq!(got, vec![Some("3".to_owned()); 6]);
    assert_eq!(invalid, ["p0", "p1", "p2", "p3", "p4", "p5"]);
}

#[test]
fn a_key_template_naming_nothing_of_the_endpoint_is_invalid_whatever_the_endpoints() {
    let mut svc = service("greeter");
    svc.spec.key_template = Some("{target}/fixed".into());
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
    ];
    for ready in 0..=1 {
        assert!(
            matches!(
                plan.layout().dedupe(desired_endpoints(&plan, &pods[..ready])),
                Err(SpecError::Template(ref m)) if m.contains("names nothing of the endpoint")
            ),
            "{ready} endpoints"
        );
    }
}

#[test]
fn two_endpoints_on_one_key_register_the_first_and_report_the_other() {
    let svc = service("greeter");
    let plan = planned(&svc, &Policy::default()).unwrap();
    let pods = [
        PodBuilder::ready("p1", "10.0.0.1").build(),
        PodBuilder::ready("p2", "10.0.0.2").build(),
        // p3 reports p1's IP (IP reuse, hostNetwork): one key, two endpoints.
        PodBuilder::ready("p3", "10.0.0.1").build(),
    ];
    let (kept, collisions) = plan
        .layout()
        .dedupe(desired_endpoints(&plan, &pods))
        .unwrap();
    let ids: Vec<&str> = kept.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["p1", "p2"]);
    assert_eq!(
        collisions,
        [Collision {
            key: "services/default/greeter/10.0.0.1:50051".into(),
            kept: "p1".into(),
            left_out: "p3".into(),
        }]
    );
    // A template that maps every endpoint to one key is the spec's fault.
    let mut svc = service("greeter");
    svc.spec.key_template = Some("{target}/fixed".into());
    let plan = planned(&svc, &Policy::default()).unwrap();
    assert!(matches!(
        plan.layout().dedupe(desired_endpoints(&plan, &pods[..2])),
        Err(SpecError::KeyCollision { .. })
    ));
}
