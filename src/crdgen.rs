//! Prints the GrpcService CRD as YAML: `cargo run --bin crdgen > crds/grpcservice.yaml`.

use grpc_registrar::crd::GrpcService;
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    print!("{}", serde_saphyr::to_string(&GrpcService::crd())?);
    Ok(())
}
