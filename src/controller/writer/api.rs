//! The writes to the API server: a job's finalizer, status and Events.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::Shared;
use super::queue::{Done, Job};
use crate::controller::FIELD_MANAGER;
use crate::crd::GrpcService;

/// Performs one job: the finalizer, then the status, then the Events.
pub(super) async fn write(shared: &Shared, job: &Job) -> Done {
    let namespace = job.svc.namespace().unwrap_or_default();
    let api: Api<GrpcService> = Api::namespaced(shared.client.clone(), &namespace);
    let name = job.svc.name_any();
    if let Some(finalizer) = job.finalizer {
        match add_finalizer(&api, &job.svc, finalizer).await {
            Ok(true) => {}
            Ok(false) => return Done::Gone,
            Err(e) => return Done::Failed("add finalizer", describe(&e)),
        }
    }
    if let Some(status) = &job.status {
        let patch = json!({
            "apiVersion": "grpc-registrar.io/v1alpha1",
            "kind": "GrpcService",
            "status": status,
        });
        match api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Done::Gone,
            Err(e) => return Done::Failed("write status", describe(&e)),
        }
    }
    if let Some(reporter) = &shared.reporter {
        let reference = job.svc.object_ref(&());
        for event in &job.events {
            // A recorder per Event: kube's recorder folds an Event into an earlier one with the
            // same reason and keeps the earlier note. Our own rules bound the volume.
            let recorder = Recorder::new(shared.client.clone(), reporter.clone());
            if let Err(e) = recorder.publish(event, &reference).await {
                warn!(namespace, name, error = %crate::error::chain(&e), reason = %event.reason, "failed to publish event");
            }
        }
    }
    Done::Written
}

/// A Kubernetes error in words: the API server's own message and code, not its Debug form.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => crate::error::chain(other),
    }
}

/// Adds `finalizer` to `svc` with a guarded JSON patch (test the list, then add), re-reading
/// the object once when the list changed meanwhile. `Ok(false)` when the object is gone or
/// being deleted (nothing to add it to).
async fn add_finalizer(
    api: &Api<GrpcService>,
    svc: &GrpcService,
    finalizer: &str,
) -> Result<bool, kube::Error> {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{AddOperation, PatchOperation, TestOperation};
    let mut current = svc.clone();
    for attempt in 0..2 {
        if current.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        if current.finalizers().iter().any(|f| f == finalizer) {
            return Ok(true);
        }
        let (test, path, value) = if current.finalizers().is_empty() {
            (
                serde_json::Value::Null,
                "/metadata/finalizers",
                json!([finalizer]),
            )
        } else {
            (
                json!(current.finalizers()),
                "/metadata/finalizers/-",
                json!(finalizer),
            )
        };
        let patch = json_patch::Patch(vec![
            PatchOperation::Test(TestOperation {
                path: PointerBuf::parse("/metadata/finalizers").expect("a valid pointer"),
                value: test,
            }),
            PatchOperation::Add(AddOperation {
                path: PointerBuf::parse(path).expect("a valid pointer"),
                value,
            }),
        ]);
        match api
            .patch(
                &current.name_any(),
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            // The list changed under us (the test failed): read it again, once.
            Err(kube::Error::Api(e)) if e.code == 422 && attempt == 0 => {
                match api.get_opt(&current.name_any()).await? {
                    Some(fresh) if fresh.uid() == svc.uid() => current = fresh,
                    _ => return Ok(false),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
