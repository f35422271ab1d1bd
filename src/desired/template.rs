//! `keyTemplate`: compiled once per spec, rendered once per pod.

use std::net::IpAddr;

use super::SpecError;
use crate::crd::TEMPLATE_PLACEHOLDERS;

/// The layout used when a spec sets no `keyTemplate`: `<target>/<ip>:<port>`.
pub const DEFAULT: &str = "{target}/{addr}";

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
}

impl KeyTemplate {
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
        if segments.len() < 3 {
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
        other => {
            return Err(SpecError::Template(format!(
                "{text:?} uses unknown placeholder {{{other}}}; known: {}",
                TEMPLATE_PLACEHOLDERS.join(", ")
            )));
        }
    })
}
