//! Targets: a key prefix, or grpc-go's `etcd:///<prefix>` form of it.

use crate::Error;

/// The scheme grpc-go's etcd resolver registers; its targets are `etcd:///<prefix>`.
const ETCD_SCHEME: &str = "etcd:";

/// The key prefix a target names.
///
/// `services/default/greeter` names itself; `etcd:///services/default/greeter`, the form Go
/// clients dial, names the same prefix (grpc-go drops the path's leading slash, so
/// `etcd:////microservices/x` is `/microservices/x`). Every other `etcd:` form is read as
/// grpc-go reads it, whose endpoint is the URL's path without its leading slash, or else its
/// opaque part: `etcd:/services/x` and `etcd:services/x` both name `services/x`.
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
        Some(rest) => match rest.strip_prefix("//") {
            // etcd://<authority>/<path>: the authority must be empty.
            Some(after) => after.strip_prefix('/').ok_or_else(|| {
                invalid("an etcd:// target names no authority; write etcd:///<key prefix>")
            })?,
            // etcd:/<path>, or grpc-go's opaque etcd:<path>.
            None => rest.strip_prefix('/').unwrap_or(rest),
        },
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
    fn an_opaque_etcd_target_names_its_opaque_part_like_grpc_go() {
        assert_eq!(key_prefix("etcd:services/x").unwrap(), "services/x");
        assert_eq!(key_prefix("etcd:/services/x").unwrap(), "services/x");
        let authority = key_prefix("etcd://services/x").unwrap_err().to_string();
        assert!(authority.contains("\"etcd://services/x\""), "{authority}");
    }

    #[test]
    fn bad_targets_are_rejected_with_an_error_naming_them() {
        for bad in [
            "",
            "/",
            "etcd:///",
            "etcd:",
            "etcd:/",
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
