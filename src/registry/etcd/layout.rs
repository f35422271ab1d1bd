//! How a service's logical endpoints are written to etcd: a key from the `keyTemplate`, a value
//! from the format's [`Codec`](tonic_etcd_resolver::Codec). Pure; the etcd backend's
//! [`Placement`].

use std::any::Any;
use std::collections::{BTreeMap, HashMap};

use tonic_etcd_resolver::format::{EndpointParts, ValueFormat};

use super::template::{self, KeyTemplate};
pub use crate::desired::MAX_ENTRY_BYTES;
use crate::desired::{Collision, LogicalEndpoint, SpecError};
use crate::registry::{Placement, Rendering};

// etcd refuses requests over 1.5 MiB; its txn batches are bounded by
// [`super::MAX_TXN_BYTES`], at least [`MAX_ENTRY_BYTES`].

/// The wire layout of one service: where its keys go and how values are encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The target every key lives under.
    pub target: String,
    /// The value format.
    pub format: ValueFormat,
    /// The compiled key template.
    pub template: KeyTemplate,
    /// The GrpcService's namespace, for `{namespace}`.
    pub namespace: String,
    /// The GrpcService's name, for `{name}`.
    pub name: String,
}

impl Placement for Layout {
    fn target(&self) -> &str {
        &self.target
    }

    fn render(&self, endpoints: Vec<LogicalEndpoint>) -> Rendering {
        self.lay_out(endpoints)
    }

    fn entry(&self, endpoint: &LogicalEndpoint) -> Result<(String, Vec<u8>), SpecError> {
        let addr = endpoint.addr();
        let key = self.key_at(endpoint, &addr);
        let value = self.value_at(endpoint, &addr);
        match too_large(&key, &value) {
            Some(error) => Err(error),
            None => Ok((key, value)),
        }
    }

    fn key(&self, endpoint: &LogicalEndpoint) -> String {
        Layout::key(self, endpoint)
    }

    fn same_as(&self, other: &dyn Placement) -> bool {
        other.as_any().downcast_ref::<Self>() == Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Layout {
    /// A layout with the default key template of `format`, under `target`.
    ///
    /// # Panics
    /// Never: the default templates parse.
    #[must_use]
    pub fn default_for(target: &str, format: ValueFormat) -> Self {
        Self {
            target: target.to_owned(),
            format,
            template: KeyTemplate::parse(template::default_for(format))
                .expect("the default templates parse"),
            namespace: String::new(),
            name: String::new(),
        }
    }

    /// The service name a kratos client dials: the target's last segment.
    #[must_use]
    pub fn service_name(&self) -> &str {
        self.target.rsplit('/').next().unwrap_or(&self.target)
    }

    /// The key of one endpoint.
    #[must_use]
    pub fn key(&self, endpoint: &LogicalEndpoint) -> String {
        self.key_at(endpoint, &endpoint.addr())
    }

    /// The key of one endpoint whose address is `addr`.
    fn key_at(&self, endpoint: &LogicalEndpoint, addr: &str) -> String {
        self.template.render(&template::Vars {
            target: &self.target,
            addr,
            ip: endpoint.ip,
            port: endpoint.port,
            pod: &endpoint.id,
            namespace: &self.namespace,
            name: &self.name,
            node: endpoint.node.as_deref().unwrap_or(""),
            id: &endpoint.id,
        })
    }

    /// The value bytes of one endpoint.
    #[must_use]
    pub fn value(&self, endpoint: &LogicalEndpoint) -> Vec<u8> {
        self.value_at(endpoint, &endpoint.addr())
    }

    /// The value bytes of one endpoint whose address is `addr`.
    fn value_at(&self, endpoint: &LogicalEndpoint, addr: &str) -> Vec<u8> {
        self.format.codec().render_parts(&EndpointParts {
            addr,
            id: &endpoint.id,
            service: self.service_name(),
            metadata: &endpoint.metadata,
        })
    }

    /// The endpoints kept (one per key, see [`Layout::keep`]), the collisions, and the entries
    /// of the kept ones, each key and value rendered once; the entries are an error when the
    /// template names nothing of the endpoint (invalid whatever the endpoints: nothing is kept)
    /// or an entry does not fit in one registry write.
    #[must_use]
    pub fn lay_out(&self, endpoints: Vec<LogicalEndpoint>) -> Rendering {
        if !self.template.names_the_endpoint() {
            let keys = self.keep(endpoints, false);
            return Rendering {
                endpoints: Vec::new(),
                collisions: Vec::new(),
                entries: Err(unnamed(&keys.collisions)),
            };
        }
        self.keep(endpoints, true)
    }

    /// Keeps one endpoint per key: a later endpoint rendering to a key an earlier one (in
    /// candidate order) already has is left out and returned as a [`Collision`], so that two
    /// pods reporting one IP (IP reuse, hostNetwork) do not take the whole service down: the key
    /// is registered once and the rest keep following readiness. With `values`, also the
    /// entries of the kept endpoints ([`SpecError::TooLarge`] for the first over
    /// [`MAX_ENTRY_BYTES`]); without, an empty map.
    fn keep(&self, endpoints: Vec<LogicalEndpoint>, values: bool) -> Rendering {
        let mut kept: Vec<LogicalEndpoint> = Vec::with_capacity(endpoints.len());
        let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        // The kept endpoint of each key, by its index in `kept`.
        let mut first: HashMap<String, usize> = HashMap::with_capacity(endpoints.len());
        let mut collisions = Vec::new();
        let mut first_too_large: Option<SpecError> = None;
        for endpoint in endpoints {
            // The address once, for the key and the value.
            let addr = endpoint.addr();
            let key = self.key_at(&endpoint, &addr);
            if let Some(&index) = first.get(&key) {
                collisions.push(Collision {
                    key,
                    kept: kept[index].id.clone(),
                    left_out: endpoint.id.clone(),
                });
                continue;
            }
            if values && first_too_large.is_none() {
                let value = self.value_at(&endpoint, &addr);
                first_too_large = too_large(&key, &value);
                if first_too_large.is_none() {
                    entries.insert(key.clone(), value);
                }
            }
            first.insert(key, kept.len());
            kept.push(endpoint);
        }
        Rendering {
            endpoints: kept,
            collisions,
            entries: first_too_large.map_or(Ok(entries), Err),
        }
    }

    /// [`Layout::keep`] without the entries, for tests.
    ///
    /// # Errors
    /// As [`Layout::lay_out`]'s for a template naming nothing of the endpoint.
    #[cfg(test)]
    pub fn dedupe(
        &self,
        endpoints: Vec<LogicalEndpoint>,
    ) -> Result<(Vec<LogicalEndpoint>, Vec<Collision>), SpecError> {
        let keys = self.keep(endpoints, false);
        if !self.template.names_the_endpoint() {
            return Err(unnamed(&keys.collisions));
        }
        Ok((keys.endpoints, keys.collisions))
    }

    /// The oracle [`Layout::lay_out`] is checked against: every key and value, written
    /// independently of it, refusing two endpoints on one key and an entry over
    /// [`MAX_ENTRY_BYTES`].
    ///
    /// # Errors
    /// [`SpecError::KeyCollision`] naming both endpoints; [`SpecError::TooLarge`].
    #[cfg(test)]
    pub fn render(
        &self,
        endpoints: &[LogicalEndpoint],
    ) -> Result<BTreeMap<String, Vec<u8>>, SpecError> {
        let mut out = BTreeMap::new();
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for endpoint in endpoints {
            let key = self.key(endpoint);
            if let Some(first) = owners.insert(key.clone(), &endpoint.id) {
                return Err(SpecError::KeyCollision {
                    key,
                    first: first.to_owned(),
                    second: endpoint.id.clone(),
                });
            }
            let value = self.value(endpoint);
            let bytes = key.len() + value.len();
            if bytes > MAX_ENTRY_BYTES {
                return Err(SpecError::TooLarge { key, bytes });
            }
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// [`SpecError::TooLarge`] for an entry over [`MAX_ENTRY_BYTES`].
fn too_large(key: &str, value: &[u8]) -> Option<SpecError> {
    let bytes = key.len() + value.len();
    (bytes > MAX_ENTRY_BYTES).then(|| SpecError::TooLarge {
        key: key.to_owned(),
        bytes,
    })
}

/// Why a key template naming nothing of the endpoint is invalid whatever the endpoints: it maps
/// every endpoint (two or more: [`SpecError::KeyCollision`], the first `collisions` names) to
/// one key; with fewer than two it would publish, and record as the last valid publication,
/// one key standing for the whole service ([`SpecError::Template`]).
fn unnamed(collisions: &[Collision]) -> SpecError {
    collisions.first().map_or_else(
        || {
            SpecError::Template(
                "it names nothing of the endpoint ({addr}, {ip}, {pod} or {id}), so every endpoint would map to one key".into(),
            )
        },
        |collision| SpecError::KeyCollision {
            key: collision.key.clone(),
            first: collision.kept.clone(),
            second: collision.left_out.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tonic_etcd_resolver::format::ValueFormat;

    use super::*;

    fn endpoint(id: &str, ip: &str) -> LogicalEndpoint {
        LogicalEndpoint {
            id: id.into(),
            ip: ip.parse().unwrap(),
            port: 50051,
            node: None,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn laying_out_keeps_the_first_endpoint_of_each_key_and_renders_what_dedupe_then_render_would() {
        let layout = Layout::default_for("services/ns/greeter", ValueFormat::EtcdNaming);
        let endpoints = vec![
            endpoint("a", "10.0.0.1"),
            endpoint("b", "10.0.0.2"),
            endpoint("c", "10.0.0.1"),
        ];
        let (kept, collisions) = layout.dedupe(endpoints.clone()).unwrap();
        let rendering = layout.lay_out(endpoints);
        assert_eq!(rendering.endpoints, kept);
        assert_eq!(rendering.collisions, collisions);
        assert_eq!(rendering.collisions[0].kept, "a");
        assert_eq!(rendering.entries.unwrap(), layout.render(&kept).unwrap());
    }

    #[test]
    fn laying_out_an_entry_too_large_keeps_the_counts_and_names_the_entry() {
        let layout = Layout::default_for("services/ns/greeter", ValueFormat::EtcdNaming);
        let mut big = endpoint("big", "10.0.0.2");
        big.metadata
            .insert("note".into(), "x".repeat(MAX_ENTRY_BYTES));
        let rendering = layout.lay_out(vec![
            endpoint("a", "10.0.0.1"),
            big,
            endpoint("c", "10.0.0.1"),
        ]);
        assert_eq!(
            (rendering.endpoints.len(), rendering.collisions.len()),
            (2, 1)
        );
        assert!(matches!(
            rendering.entries,
            Err(SpecError::TooLarge { key, .. }) if key.ends_with("10.0.0.2:50051")
        ));
    }

    #[test]
    fn laying_out_with_a_template_that_names_no_endpoint_keeps_nothing() {
        let mut layout = Layout::default_for("services/ns/greeter", ValueFormat::EtcdNaming);
        layout.template = KeyTemplate::parse("{target}/{name}").unwrap();
        let rendering = layout.lay_out(vec![endpoint("a", "10.0.0.1")]);
        assert!(rendering.endpoints.is_empty());
        assert!(matches!(rendering.entries, Err(SpecError::Template(_))));
    }
}
