//! Targets: a key prefix, or grpc-go's `etcd:///<prefix>` form of it.

use crate::Error;

/// The scheme grpc-go's etcd resolver registers; its targets are `etcd:///<prefix>`.
const ETCD_SCHEME: &str = "etcd://";

/// The key prefix a target names.
///
/// `services/default/greeter` names itself; `etcd:///services/default/greeter`, the form Go
/// clients dial, names the same prefix (grpc-go drops the path's leading slash, so
/// `etcd:////microservices/x` is `/microservices/x`).
///
/// # Errors
/// [`Error::InvalidTarget`] for an empty prefix, an `etcd://` target with an authority, any
/// other `scheme://` target, or surrounding whitespace.
pub(crate) fn key_prefix(target: &str) -> Result<String, Error> {
    let invalid = |reason| Error::InvalidTarget {
        target: target.to_owned(),
        reason,
    };
    if target.trim() != target {
        return Err(invalid("a target has no surrounding whitespace"));
    }
    let prefix = match target.strip_prefix(ETCD_SCHEME) {
        Some(rest) => rest.strip_prefix('/').ok_or_else(|| {
            invalid("an etcd:// target names no authority; write etcd:///<key prefix>")
        })?,
        None if target.contains("://") => {
            return Err(invalid(
                "expected a key prefix (services/<namespace>/<name>) or etcd:///<key prefix>",
            ));
        }
        None => target,
    };
    if prefix.trim_matches('/').is_empty() {
        return Err(invalid(
            "the key prefix is empty, which would resolve every key in etcd",
        ));
    }
    Ok(prefix.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_key_prefix_names_itself() {
        assert_eq!(
            key_prefix("services/default/greeter").unwrap(),
            "services/default/greeter"
        );
        assert_eq!(
            key_prefix("/microservices/helloworld").unwrap(),
            "/microservices/helloworld"
        );
    }

    #[test]
    fn a_go_style_etcd_target_names_its_path_like_grpc_go() {
        assert_eq!(
            key_prefix("etcd:///services/default/greeter").unwrap(),
            "services/default/greeter"
        );
        assert_eq!(
            key_prefix("etcd:////microservices/x").unwrap(),
            "/microservices/x"
        );
    }

    #[test]
    fn bad_targets_are_rejected_with_an_error_naming_them() {
        for bad in [
            "",
            "/",
            "etcd:///",
            "etcd://host:2379/services/a",
            "dns:///greeter:50051",
            "http://127.0.0.1:2379",
            " services/a",
        ] {
            let err = key_prefix(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad:?}: {err}"
            );
        }
    }
}
