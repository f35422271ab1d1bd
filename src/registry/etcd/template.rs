//! `keyTemplate`: compiled once per spec, rendered once per endpoint.

use std::net::IpAddr;

use tonic_etcd_resolver::ValueFormat;

use crate::crd::TEMPLATE_PLACEHOLDERS;
use crate::desired::SpecError;

/// The layout used when a spec sets no `keyTemplate`: `<target>/<ip>:<port>`.
pub const DEFAULT: &str = "{target}/{addr}";

/// kratos' layout, `/microservices/<name>/<id>` with target `/microservices/<name>`.
pub const KRATOS: &str = "{target}/{id}";

/// The template a spec without `keyTemplate` gets: kratos' layout for [`ValueFormat::Kratos`],
/// else [`DEFAULT`].
#[must_use]
pub fn default_for(format: ValueFormat) -> &'static str {
    match format {
        ValueFormat::Kratos => KRATOS,
        ValueFormat::EtcdNaming | ValueFormat::Address => DEFAULT,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    Target,
    Addr,
    Ip,
    Port,
    Pod,
    Namespace,
    Name,
    Node,
    Id,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(Var),
}

/// A parsed key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate(Vec<Segment>);

/// The values a template is rendered with.
pub(crate) struct Vars<'a> {
    pub target: &'a str,
    pub addr: &'a str,
    pub ip: IpAddr,
    pub port: u16,
    pub pod: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub id: &'a str,
}

impl KeyTemplate {
    /// Whether keys differ per endpoint: the template names the endpoint (`{addr}`, `{ip}`,
    /// `{pod}` or `{id}`). One that does not maps every endpoint to one key.
    #[must_use]
    pub fn names_the_endpoint(&self) -> bool {
        self.0
            .iter()
            .any(|s| matches!(s, Segment::Var(Var::Addr | Var::Ip | Var::Pod | Var::Id)))
    }

    /// Parses a template. It must start with `{target}/`, so every key stays under the target
    /// the service owns, and may only use the documented placeholders.
    ///
    /// # Errors
    /// [`SpecError::Template`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        if !text.starts_with("{target}/") {
            return Err(SpecError::Template(format!(
                "{text:?} must start with {{target}}/"
            )));
        }
        let mut segments = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(0) if rest.starts_with('{') => {
                    let end = rest.find('}').ok_or_else(|| {
                        SpecError::Template(format!("{text:?} has an unclosed '{{'"))
                    })?;
                    segments.push(Segment::Var(var(&rest[1..end], text)?));
                    rest = &rest[end + 1..];
                }
                Some(0) => {
                    return Err(SpecError::Template(format!("{text:?} has a stray '}}'")));
                }
                Some(i) => {
                    segments.push(Segment::Literal(rest[..i].to_owned()));
                    rest = &rest[i..];
                }
                None => {
                    segments.push(Segment::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if text.len() <= "{target}/".len() {
            return Err(SpecError::Template(format!(
                "{text:?} names nothing after {{target}}/"
            )));
        }
        Ok(Self(segments))
    }

    pub(crate) fn render(&self, vars: &Vars<'_>) -> String {
        let mut out = String::with_capacity(vars.target.len() + 32);
        for segment in &self.0 {
            match segment {
                Segment::Literal(s) => out.push_str(s),
                Segment::Var(Var::Target) => out.push_str(vars.target),
                Segment::Var(Var::Addr) => out.push_str(vars.addr),
                Segment::Var(Var::Ip) => out.push_str(&vars.ip.to_string()),
                Segment::Var(Var::Port) => out.push_str(&vars.port.to_string()),
                Segment::Var(Var::Pod) => out.push_str(vars.pod),
                Segment::Var(Var::Namespace) => out.push_str(vars.namespace),
                Segment::Var(Var::Name) => out.push_str(vars.name),
                Segment::Var(Var::Node) => out.push_str(vars.node),
                Segment::Var(Var::Id) => out.push_str(vars.id),
            }
        }
        out
    }
}

fn var(name: &str, text: &str) -> Result<Var, SpecError> {
    Ok(match name {
        "target" => Var::Target,
        "addr" => Var::Addr,
        "ip" => Var::Ip,
        "port" => Var::Port,
        "pod" => Var::Pod,
        "namespace" => Var::Namespace,
        "name" => Var::Name,
        "node" => Var::Node,
        "id" => Var::Id,
        other => {
            return Err(SpecError::Template(format!(
                "{text:?} uses unknown placeholder {{{other}}}; known: {}",
                TEMPLATE_PLACEHOLDERS.join(", ")
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(20_000)
    }

    fn vars() -> Vars<'static> {
        Vars {
            target: "services/ns/svc",
            addr: "10.0.0.7:50051",
            ip: "10.0.0.7".parse().unwrap(),
            port: 50051,
            pod: "pod-0",
            namespace: "ns",
            name: "svc",
            node: "node-1",
            id: "pod-0",
        }
    }

    fn value(name: &str) -> &'static str {
        match name {
            "target" => "services/ns/svc",
            "addr" => "10.0.0.7:50051",
            "ip" => "10.0.0.7",
            "port" => "50051",
            "pod" => "pod-0",
            "namespace" => "ns",
            "name" => "svc",
            "id" => "pod-0",
            _ => "node-1",
        }
    }

    /// A valid template as parts: literals without braces, and known placeholders.
    fn parts() -> impl Strategy<Value = Vec<(bool, String)>> {
        prop::collection::vec(
            prop_oneof![
                "[^{}]{1,6}".prop_map(|s| (false, s)),
                prop::sample::select(TEMPLATE_PLACEHOLDERS.to_vec())
                    .prop_map(|n| (true, n.to_owned())),
            ],
            1..8,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn any_text_parses_or_errors_without_panicking(text in ".{0,40}", prefixed in any::<bool>()) {
            let text = if prefixed { format!("{{target}}/{text}") } else { text };
            if let Ok(template) = KeyTemplate::parse(&text) {
                prop_assert!(template.render(&vars()).starts_with("services/ns/svc/"));
            }
        }

        #[test]
        fn valid_templates_render_each_placeholder_and_keep_literals(parts in parts()) {
            let text: String = std::iter::once("{target}/".to_owned())
                .chain(parts.iter().map(|(var, s)| if *var { format!("{{{s}}}") } else { s.clone() }))
                .collect();
            let want: String = std::iter::once("services/ns/svc/".to_owned())
                .chain(parts.iter().map(|(var, s)| if *var { value(s).to_owned() } else { s.clone() }))
                .collect();
            let template = KeyTemplate::parse(&text).unwrap();
            prop_assert_eq!(template.render(&vars()), want);
        }
    }
}
