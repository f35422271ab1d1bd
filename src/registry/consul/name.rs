//! Consul service names and who may use them: the tenancy rule of DESIGN §4 for a flat name
//! space.
//!
//! etcd targets are paths, so a namespace is confined to its own prefix. Consul service names
//! are flat, so a namespace is confined to its own *suffix* instead:
//!
//! - A name with `--` in it is namespace-qualified, `<base>--<namespace>`, split at the first
//!   `--`: only that namespace may publish it. A namespace's default name is
//!   `<GrpcService name>--<namespace>`. Since a base never contains `--` and a namespace never
//!   starts with `-`, no two namespaces can produce the same qualified name.
//! - A flat name (no `--`: `payments`, or the bare GrpcService name) is published only by
//!   namespaces trusted with custom names (`--custom-target-namespaces`); trusted namespaces
//!   share the flat names, first come first served, through the ownership record.
//! - Names the controller or Consul use for themselves are never published: `consul` (Consul's
//!   own service), `grpc-registrar` and `grpc-registrar-*` (the controller's nodes), and the
//!   first segment of the registrar root (its KV records).

use crate::desired::{CustomTargets, SpecError};

/// What separates a namespace-qualified name's base from its namespace.
pub const SEPARATOR: &str = "--";

/// Consul's longest service name that is also a DNS label (`<name>.service.consul`).
const MAX_LEN: usize = 63;

/// The prefix of the controller's synthetic node names (`grpc-registrar`,
/// `grpc-registrar-<cluster>`).
const NODE_PREFIX: &str = "grpc-registrar";

/// A namespace-qualified name: `<base>--<namespace>`.
#[must_use]
pub fn qualified(base: &str, namespace: &str) -> String {
    format!("{base}{SEPARATOR}{namespace}")
}

/// Whether `name` is a DNS label Consul serves as `<name>.service.consul`: lowercase letters,
/// digits and `-`, at most 63, not starting or ending with `-`.
#[must_use]
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The name the controller or Consul itself uses, when `name` is one.
fn reserved(name: &str, registrar_root: &str) -> bool {
    let root = registrar_root
        .trim_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    if name.contains(SEPARATOR) {
        return false;
    }
    name == "consul"
        || name == NODE_PREFIX
        || name.starts_with(&format!("{NODE_PREFIX}-"))
        || (!root.is_empty() && name.eq_ignore_ascii_case(root))
}

/// The Consul name a GrpcService named `name` in `namespace` publishes under, asking for
/// `requested` (`consul.service`, `None` for the default).
///
/// # Errors
/// [`SpecError::Target`] for a name that is not a DNS label; [`SpecError::NameNotAllowed`] for one
/// the namespace may not publish, naming the rule and the flag.
pub fn resolve(
    requested: Option<&str>,
    namespace: &str,
    name: &str,
    custom_targets: &CustomTargets,
    registrar_root: &str,
) -> Result<String, SpecError> {
    let asked = requested.unwrap_or(name);
    if !is_dns_label(asked) {
        return Err(SpecError::Target(
            asked.to_owned(),
            "not a Consul service name: lowercase letters, digits and '-', at most 63, not starting or ending with '-' (Consul matches names case-insensitively)",
        ));
    }
    let refuse = |service: String, reason: String| SpecError::NameNotAllowed {
        kind: "consul service",
        service,
        namespace: namespace.to_owned(),
        reason,
    };
    let trusted = custom_targets.allows(namespace);
    let published = match asked.split_once(SEPARATOR) {
        // Already qualified: only by its own namespace.
        Some((_, owner)) if owner == namespace => asked.to_owned(),
        Some((_, owner)) => {
            return Err(refuse(
                asked.to_owned(),
                format!(
                    "a name with {SEPARATOR:?} is namespace-qualified (<base>{SEPARATOR}<namespace>) and this one belongs to namespace {owner:?}"
                ),
            ));
        }
        None if trusted => asked.to_owned(),
        // The default name: qualified with the namespace.
        None if requested.is_none() => qualified(asked, namespace),
        None => {
            return Err(refuse(
                asked.to_owned(),
                format!(
                    "namespace {namespace:?} may publish only names ending in \"{SEPARATOR}{namespace}\" (here {:?}); flat names are for namespaces listed in --custom-target-namespaces",
                    qualified(asked, namespace)
                ),
            ));
        }
    };
    if published.len() > MAX_LEN {
        return Err(refuse(
            published,
            format!(
                "over Consul's {MAX_LEN} characters for a DNS label once qualified with the namespace; choose a shorter consul.service"
            ),
        ));
    }
    if reserved(&published, registrar_root) {
        return Err(refuse(
            published,
            "reserved: consul, grpc-registrar and grpc-registrar-* (the controller's nodes) and the registrar root name are never published".to_owned(),
        ));
    }
    Ok(published)
}

/// The name this GrpcService was published under before the namespace rule (its flat
/// `consul.service`, or its name), when that differs from what the rule gives it now: a
/// service that still holds it keeps it until its spec names another.
#[must_use]
pub fn pre_rule(requested: Option<&str>, name: &str, registrar_root: &str) -> Option<String> {
    let asked = requested.unwrap_or(name);
    (is_dns_label(asked) && !asked.contains(SEPARATOR) && !reserved(asked, registrar_root))
        .then(|| asked.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_in(
        requested: Option<&str>,
        namespace: &str,
        trusted: bool,
    ) -> Result<String, SpecError> {
        let custom = if trusted {
            CustomTargets::Namespaces(vec![namespace.to_owned()])
        } else {
            CustomTargets::None
        };
        resolve(requested, namespace, "greeter", &custom, "grpc-registrar")
    }

    #[test]
    fn an_untrusted_namespace_publishes_its_default_name_qualified_with_the_namespace() {
        assert_eq!(
            resolve_in(None, "team-a", false).unwrap(),
            "greeter--team-a"
        );
        assert_eq!(
            resolve_in(Some("payments--team-a"), "team-a", false).unwrap(),
            "payments--team-a"
        );
    }

    #[test]
    fn an_untrusted_namespace_cannot_publish_a_flat_name_and_is_told_the_flag() {
        let err = resolve_in(Some("payments"), "team-a", false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--custom-target-namespaces"), "{text}");
        assert!(text.contains("payments--team-a"), "{text}");
    }

    #[test]
    fn no_namespace_can_publish_another_namespaces_qualified_name() {
        for trusted in [false, true] {
            let err = resolve_in(Some("payments--team-b"), "team-a", trusted).unwrap_err();
            assert!(matches!(err, SpecError::NameNotAllowed { .. }), "{err}");
            assert!(err.to_string().contains("team-b"), "{err}");
        }
    }

    #[test]
    fn a_trusted_namespace_publishes_flat_names() {
        assert_eq!(resolve_in(None, "platform", true).unwrap(), "greeter");
        assert_eq!(
            resolve_in(Some("payments"), "platform", true).unwrap(),
            "payments"
        );
        let all = CustomTargets::All;
        assert_eq!(
            resolve(Some("payments"), "x", "g", &all, "grpc-registrar").unwrap(),
            "payments"
        );
    }

    #[test]
    fn the_controllers_and_consuls_own_names_are_never_published() {
        for name in ["consul", "grpc-registrar", "grpc-registrar-east"] {
            let err = resolve_in(Some(name), "team-a", true).unwrap_err();
            assert!(err.to_string().contains("reserved"), "{name}: {err}");
            let err = resolve_in(Some(name), "team-a", false).unwrap_err();
            assert!(
                matches!(err, SpecError::NameNotAllowed { .. }),
                "{name}: {err}"
            );
        }
        let err = resolve(
            Some("acme"),
            "ns",
            "g",
            &CustomTargets::All,
            "acme/registrar",
        )
        .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // Qualified with a namespace, the same bases name nothing of ours.
        assert_eq!(
            resolve_in(Some("consul--team-a"), "team-a", false).unwrap(),
            "consul--team-a"
        );
    }

    #[test]
    fn a_qualified_name_over_63_characters_is_refused() {
        let ns = "n".repeat(60);
        let err = resolve_in(None, &ns, false).unwrap_err();
        assert!(err.to_string().contains("63"), "{err}");
    }

    #[test]
    fn names_that_are_not_dns_labels_are_refused_as_before() {
        for bad in ["Greeter", "-a", "a-", "a.b", ""] {
            assert!(
                matches!(
                    resolve_in(Some(bad), "team-a", true),
                    Err(SpecError::Target(..))
                ),
                "{bad}"
            );
        }
    }

    /// The rule's point: whatever two different namespaces ask for, the names they may publish
    /// (trusted or not) differ, except flat names, which only trusted namespaces share.
    #[test]
    fn two_namespaces_never_publish_the_same_qualified_name() {
        let bases = ["a", "a-b", "b", "a--b", "b-c", "c"];
        let namespaces = ["b", "c", "b-c", "c--d", "a-b"];
        let mut seen: std::collections::HashMap<String, &str> = Default::default();
        for ns in namespaces {
            for base in bases {
                for requested in [None, Some(base), Some(&*qualified(base, ns))] {
                    if let Ok(name) =
                        resolve(requested, ns, base, &CustomTargets::None, "grpc-registrar")
                        && let Some(other) = seen.insert(name.clone(), ns)
                    {
                        assert_eq!(other, ns, "{name} published by {other} and {ns}");
                    }
                }
            }
        }
        assert!(seen.len() > 10, "the cases publish something: {seen:?}");
    }

    #[test]
    fn the_pre_rule_name_is_the_flat_name_a_service_had() {
        assert_eq!(
            pre_rule(Some("payments"), "g", "grpc-registrar").as_deref(),
            Some("payments")
        );
        assert_eq!(
            pre_rule(None, "greeter", "grpc-registrar").as_deref(),
            Some("greeter")
        );
        assert_eq!(pre_rule(Some("p--ns"), "g", "grpc-registrar"), None);
        assert_eq!(pre_rule(Some("consul"), "g", "grpc-registrar"), None);
    }
}
