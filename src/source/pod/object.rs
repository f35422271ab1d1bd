//! A Pod as the pod source reads it: only the fields a [`super::candidate`] needs are decoded
//! from the watch's JSON, the rest (managedFields, most of the spec and status) is skipped
//! without allocating. A full `Pod` costs a few hundred allocations per event; under churn and
//! on a cold start of 100,000 pods that decoding was the largest share of the controller's CPU
//! and of its memory high-water mark.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::crd::WEIGHT_ANNOTATION;

/// A Pod, as much of it as the pod source reads. Its `metadata` holds name, namespace, uid,
/// resourceVersion, labels, deletionTimestamp and, of the annotations, only the weight.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodObject {
    /// The metadata read (see the type's doc).
    #[serde(deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    /// The spec read.
    #[serde(default)]
    pub spec: Option<Spec>,
    /// The status read.
    #[serde(default)]
    pub status: Option<Status>,
}

/// `spec`: the node and the containers' ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `spec.nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `spec.containers`, their ports only.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// A container's ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Container {
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<Port>>,
}

/// A container port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `containerPort`.
    pub container_port: i32,
    /// `protocol` (TCP when absent).
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `status`: the IP, the phase and the conditions.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `status.podIP`.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `status.phase`.
    #[serde(default)]
    pub phase: Option<String>,
    /// `status.conditions`.
    #[serde(default)]
    pub conditions: Option<Vec<Condition>>,
}

/// A pod condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `type`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `status`.
    pub status: String,
    /// `lastTransitionTime`.
    #[serde(default)]
    pub last_transition_time: Option<Time>,
}

impl k8s_openapi::Resource for PodObject {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodObject {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "weight_only")]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
}

fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let m = Metadata::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// Of the annotations, only the weight: others (often large, such as kubectl's
/// last-applied-configuration) are skipped unread.
fn weight_only<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Weight;
    impl<'de> Visitor<'de> for Weight {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of annotations, or null")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == WEIGHT_ANNOTATION {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    deserializer.deserialize_option(Weight)
}

impl From<&Pod> for PodObject {
    /// The fields of `pod` the source reads, as its watch would decode them.
    fn from(pod: &Pod) -> Self {
        let m = &pod.metadata;
        let annotations = m.annotations.as_ref().map(|a| {
            a.iter()
                .filter(|(k, _)| *k == WEIGHT_ANNOTATION)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        Self {
            metadata: ObjectMeta {
                name: m.name.clone(),
                namespace: m.namespace.clone(),
                uid: m.uid.clone(),
                resource_version: m.resource_version.clone(),
                labels: m.labels.clone(),
                annotations,
                deletion_timestamp: m.deletion_timestamp.clone(),
                ..ObjectMeta::default()
            },
            spec: pod.spec.as_ref().map(|s| Spec {
                node_name: s.node_name.clone(),
                containers: s
                    .containers
                    .iter()
                    .map(|c| Container {
                        ports: c.ports.as_ref().map(|ports| {
                            ports
                                .iter()
                                .map(|p| Port {
                                    name: p.name.clone(),
                                    container_port: p.container_port,
                                    protocol: p.protocol.clone(),
                                })
                                .collect()
                        }),
                    })
                    .collect(),
            }),
            status: pod.status.as_ref().map(|s| Status {
                pod_ip: s.pod_ip.clone(),
                phase: s.phase.clone(),
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .map(|c| Condition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                            last_transition_time: c.last_transition_time.clone(),
                        })
                        .collect()
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::PodBuilder;

    #[test]
    fn a_pods_json_decodes_to_what_the_source_reads_of_the_pod() {
        let pod = PodBuilder::ready("p1", "10.0.0.7")
            .annotation(WEIGHT_ANNOTATION, "3")
            .annotation("kubectl.kubernetes.io/last-applied-configuration", "{}")
            .terminating()
            .build();
        let json = serde_json::to_string(&pod).unwrap();
        let decoded: PodObject = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, PodObject::from(&pod));
        assert_eq!(
            decoded.metadata.annotations,
            Some(BTreeMap::from([(
                WEIGHT_ANNOTATION.to_owned(),
                "3".to_owned()
            )]))
        );
        assert!(decoded.metadata.deletion_timestamp.is_some());
    }

    #[test]
    fn managed_fields_and_unread_fields_are_skipped() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "labels": {"app": "x"},
                "annotations": null,
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "ReplicaSet", "name": "r", "uid": "o"}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "grpc", "containerPort": 50051}]}], "volumes": []},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "c", "ready": true}]}
        });
        let pod: PodObject = serde_json::from_value(json).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("7"));
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.owner_references.is_none());
        assert_eq!(pod.metadata.annotations, None);
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.conditions.unwrap()[0].type_, "Ready");
        assert_eq!(
            pod.spec.unwrap().containers[0].ports.as_ref().unwrap()[0].container_port,
            50051
        );
    }
}
