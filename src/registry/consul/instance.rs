//! From logical endpoints to Consul instances, and the pure diff against what the catalog holds.

use std::collections::BTreeMap;

use super::api::{Instance, ServiceDef, TxnOp, Weights};
use crate::desired::{LogicalEndpoint, SpecError};
use crate::registry::Owner;

/// Consul's meta limits (`agent/structs/structs.go`).
const META_MAX_PAIRS: usize = 64;
const META_KEY_MAX: usize = 128;
const META_VALUE_MAX: usize = 512;
const META_RESERVED_PREFIX: &str = "consul-";

/// The instance meta naming the GrpcService that published it (`<namespace>/<name>`).
pub const OWNER_META: &str = "grpc-registrar-owner";

/// Checks that `service` can name a Consul service and prefix instance ids: a DNS label
/// (letters, digits, `-`), so that `<service>.service.consul` resolves and ids of two services
/// never collide.
///
/// # Errors
/// [`SpecError::Target`] naming what is wrong.
pub fn validate_service(service: &str) -> Result<(), SpecError> {
    let reason = if service.is_empty() {
        Some("a Consul service name must not be empty")
    } else if service.len() > 63 {
        Some("a Consul service name is a DNS label: at most 63 characters")
    } else if !service
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || service.starts_with('-')
        || service.ends_with('-')
    {
        // Lower case only: Consul matches service names case-insensitively, so `Greeter` and
        // `greeter` would be two owners of one service.
        Some(
            "a Consul service name is a lowercase DNS label: lowercase letters, digits and '-' inside",
        )
    } else {
        None
    };
    reason.map_or(Ok(()), |r| Err(SpecError::Target(service.to_owned(), r)))
}

/// The instance id of an endpoint: `<service>:<endpoint id>:<port>`, the id's characters
/// outside `[A-Za-z0-9._-]` replaced by `_`. The service name has no `:`, so two services'
/// ids never collide.
#[must_use]
pub fn instance_id(service: &str, endpoint_id: &str, port: u16) -> String {
    let id: String = endpoint_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{service}:{id}:{port}")
}

/// Checks meta against Consul's limits, so that a write is never refused for it.
fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let bad = |what: String, reason: &'static str| Err(SpecError::Metadata { what, reason });
    if meta.len() > META_MAX_PAIRS {
        return bad(
            format!("({} pairs)", meta.len()),
            "Consul allows at most 64 metadata pairs per instance",
        );
    }
    for (key, value) in meta {
        if key.is_empty()
            || key.len() > META_KEY_MAX
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad(
                format!("key {key:?}"),
                "a Consul metadata key is 1 to 128 letters, digits, '_' or '-' (metadataFromLabels copies label names such as app.kubernetes.io/name, which Consul refuses)",
            );
        }
        if key.starts_with(META_RESERVED_PREFIX) {
            return bad(
                format!("key {key:?}"),
                "Consul reserves metadata keys starting with consul- for itself",
            );
        }
        if value.len() > META_VALUE_MAX {
            return bad(
                format!("key {key:?}"),
                "a Consul metadata value is at most 512 characters",
            );
        }
    }
    Ok(())
}

/// The instances that publish `endpoints` as `service`, by id.
///
/// Meta is the endpoint's metadata plus [`OWNER_META`]; `metadata.weight` also sets the
/// instance's DNS SRV weight when passing.
///
/// # Errors
/// [`SpecError`] when a name or meta breaks Consul's rules, or two endpoints map to one id.
pub(super) fn desired(
    service: &str,
    owner: &Owner,
    endpoints: &[LogicalEndpoint],
    tags: &[String],
) -> Result<BTreeMap<String, ServiceDef>, SpecError> {
    validate_service(service)?;
    let mut out: BTreeMap<String, (ServiceDef, &str)> = BTreeMap::new();
    for ep in endpoints {
        let mut meta = ep.metadata.clone();
        meta.insert(
            OWNER_META.to_owned(),
            format!("{}/{}", owner.namespace, owner.name),
        );
        validate_meta(&meta)?;
        let passing = meta
            .get("weight")
            .and_then(|w| w.parse::<u32>().ok())
            .filter(|w| (1..=65535).contains(w))
            .unwrap_or(1);
        let id = instance_id(service, &ep.id, ep.port);
        let def = ServiceDef {
            id: id.clone(),
            service: service.to_owned(),
            address: ep.ip.to_string(),
            port: ep.port,
            meta,
            tags: tags.to_vec(),
            weights: Weights {
                passing,
                warning: 1,
            },
            modify_index: 0,
        };
        if let Some((_, first)) = out.get(&id) {
            return Err(SpecError::KeyCollision {
                key: id,
                first: (*first).to_owned(),
                second: ep.id.clone(),
            });
        }
        out.insert(id, (def, &ep.id));
    }
    Ok(out.into_iter().map(|(id, (def, _))| (id, def)).collect())
}

/// One change to the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// Create (`modify_index` 0) or update (at `modify_index`) an instance, by CAS.
    Put(Box<ServiceDef>),
    /// Delete an instance.
    Delete(String),
}

/// The changes that turn `current` (this service's instances on our node) into `desired`:
/// new and changed instances put by CAS on what was read, gone ones deleted, unchanged ones
/// left alone. Puts come first, so a client never sees the set emptied in passing.
#[must_use]
pub(super) fn diff(current: &[Instance], desired: &BTreeMap<String, ServiceDef>) -> Vec<Change> {
    let current = current.iter().map(|i| (i.id.as_str(), i));
    crate::registry::diff::diff(
        current,
        desired,
        |_, want, have| match have {
            Some(have) if have.matches(want) => None,
            Some(have) => Some(Change::Put(Box::new(ServiceDef {
                modify_index: have.modify_index,
                ..want.clone()
            }))),
            None => Some(Change::Put(Box::new(want.clone()))),
        },
        |id| Change::Delete(id.to_owned()),
    )
}

impl Change {
    /// The txn op for this change on `node`.
    pub(super) fn op(&self, node: &str, service: &str) -> TxnOp {
        use super::api::ServiceOp;
        match self {
            Self::Put(def) => TxnOp::Service(ServiceOp {
                verb: "cas",
                node: node.to_owned(),
                service: (**def).clone(),
            }),
            Self::Delete(id) => TxnOp::Service(ServiceOp {
                verb: "delete",
                node: node.to_owned(),
                service: ServiceDef {
                    id: id.clone(),
                    service: service.to_owned(),
                    address: String::new(),
                    port: 0,
                    meta: BTreeMap::new(),
                    tags: Vec::new(),
                    weights: Weights::default(),
                    modify_index: 0,
                },
            }),
        }
    }
}

impl crate::registry::batch::Write for TxnOp {
    fn bytes(&self) -> usize {
        TxnOp::bytes(self)
    }

    fn key(&self) -> String {
        match self {
            Self::Service(s) => s.service.id.clone(),
            Self::Kv(kv) => kv.key.clone(),
            Self::Node(n) => n.node.node.clone(),
            Self::Check(c) => c.check.check_id.clone(),
        }
    }

    fn deletes(&self) -> bool {
        match self {
            Self::Service(s) => s.verb == "delete",
            Self::Kv(kv) => kv.verb.starts_with("delete"),
            Self::Node(n) => n.verb == "delete",
            Self::Check(c) => c.verb == "delete",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "greeter".into(),
        }
    }

    fn ep(id: &str, ip: &str, meta: &[(&str, &str)]) -> LogicalEndpoint {
        LogicalEndpoint {
            id: id.into(),
            ip: ip.parse().unwrap(),
            port: 50051,
            node: None,
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn have(def: &ServiceDef, index: u64) -> Instance {
        Instance {
            id: def.id.clone(),
            service: def.service.clone(),
            address: def.address.clone(),
            port: def.port,
            meta: Some(def.meta.clone()),
            tags: Some(def.tags.clone()),
            weights: Some(def.weights),
            modify_index: index,
        }
    }

    #[test]
    fn instance_ids_are_prefixed_by_the_service_and_carry_only_safe_characters() {
        assert_eq!(
            instance_id("greeter", "pod-0", 50051),
            "greeter:pod-0:50051"
        );
        assert_eq!(instance_id("a", "10.0.0.1:80/x", 1), "a:10.0.0.1_80_x:1");
        assert_ne!(instance_id("a-b", "c", 1), instance_id("a", "b-c", 1));
    }

    #[test]
    fn invalid_service_names_and_meta_are_spec_errors_naming_the_culprit() {
        for bad in ["", "a.b", "a_b", "-a", "Greeter", &"x".repeat(64)] {
            assert!(validate_service(bad).is_err(), "{bad:?}");
        }
        let tags = [];
        let err = desired(
            "g",
            &owner(),
            &[ep("p", "10.0.0.1", &[("a.b", "x")])],
            &tags,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(r#"failed to publish metadata key "a.b""#),
            "{err}"
        );
        let long = "v".repeat(513);
        let err = desired(
            "g",
            &owner(),
            &[ep("p", "10.0.0.1", &[("k", &long)])],
            &tags,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("512"), "{err}");
        let many: Vec<(String, String)> = (0..64).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let err = desired("g", &owner(), &[ep("p", "10.0.0.1", &many)], &tags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata (65 pairs)"), "{err}");
        assert!(
            desired(
                "g",
                &owner(),
                &[ep("p", "10.0.0.1", &[("consul-x", "1")])],
                &tags
            )
            .is_err()
        );
    }

    #[test]
    fn two_endpoints_with_one_instance_id_are_a_collision() {
        let err = desired(
            "g",
            &owner(),
            &[ep("a/b", "10.0.0.1", &[]), ep("a_b", "10.0.0.2", &[])],
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, SpecError::KeyCollision { .. }), "{err}");
    }

    #[test]
    fn the_diff_puts_new_and_changed_instances_by_cas_and_deletes_gone_ones() {
        let tags = ["grpc".to_owned()];
        let want = desired(
            "g",
            &owner(),
            &[
                ep("a", "10.0.0.1", &[("weight", "7")]),
                ep("b", "10.0.0.2", &[]),
                ep("c", "fd00::3", &[]),
            ],
            &tags,
        )
        .unwrap();
        assert_eq!(want["g:a:50051"].weights.passing, 7);
        assert_eq!(want["g:c:50051"].address, "fd00::3");
        let mut changed = have(&want["g:b:50051"], 11);
        changed.address = "10.9.9.9".into();
        let mut gone = have(&want["g:a:50051"], 12);
        gone.id = "g:old:50051".into();
        let current = vec![have(&want["g:a:50051"], 10), changed, gone];
        let changes = diff(&current, &want);
        let mut expected_b = want["g:b:50051"].clone();
        expected_b.modify_index = 11;
        assert_eq!(
            changes,
            vec![
                Change::Put(Box::new(expected_b)),
                Change::Put(Box::new(want["g:c:50051"].clone())),
                Change::Delete("g:old:50051".into()),
            ]
        );
    }

    #[test]
    fn batches_are_bounded_by_ops_and_bytes_and_an_oversized_op_is_a_spec_error() {
        use crate::registry::batch::{Limits, batches};
        let op = |n: usize| TxnOp::kv_cas("k", &vec![b'x'; n], 0);
        let limits = |ops, bytes| Limits {
            ops,
            bytes,
            op_bytes: Some(bytes),
        };
        let sizes = |b: Vec<&[TxnOp]>| b.iter().map(|b| b.len()).collect::<Vec<_>>();
        let ops: Vec<TxnOp> = (0..5).map(|_| op(10)).collect();
        assert_eq!(sizes(batches(&ops, limits(2, 100_000)).unwrap()), [2, 2, 1]);
        let one = op(10).bytes();
        assert_eq!(
            sizes(batches(&ops, limits(128, one * 2)).unwrap()),
            [2, 2, 1]
        );
        assert!(matches!(
            batches(&[op(10_000)], limits(128, 1000)),
            Err(SpecError::TooLarge { key, .. }) if key == "k"
        ));
    }
}
