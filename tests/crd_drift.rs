//! The committed CRD must be exactly what `crdgen` prints.

use grpc_registrar::crd::GrpcService;
use kube::CustomResourceExt;

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = serde_saphyr::to_string(&GrpcService::crd()).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/grpcservice.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        generated == committed,
        "crds/grpcservice.yaml is stale: run `cargo run --bin crdgen > crds/grpcservice.yaml` and commit it"
    );
}

#[test]
fn committed_crd_yaml_parses_back_into_the_same_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/grpcservice.yaml");
    let parsed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(parsed, GrpcService::crd());
}

#[test]
fn the_helm_charts_crd_is_identical_to_the_committed_crd() {
    let root = env!("CARGO_MANIFEST_DIR");
    let committed = std::fs::read_to_string(format!("{root}/crds/grpcservice.yaml")).unwrap();
    let chart = std::fs::read_to_string(format!(
        "{root}/charts/grpc-registrar/files/grpcservice.yaml"
    ))
    .unwrap();
    assert!(
        chart == committed,
        "charts/grpc-registrar/files/grpcservice.yaml differs: run `make crd` and commit both"
    );
}
