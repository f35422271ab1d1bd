//! Subsetting's ranking: every registered endpoint, in this client's rendezvous order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Meta;
use crate::policy::Rendezvous;

/// Subsetting: every registered endpoint, ranked by this client's rendezvous weights.
pub(super) struct Ranked {
    /// How many usable endpoints to connect to.
    size: usize,
    /// This client's weights.
    rendezvous: Rendezvous,
    /// Every registered endpoint: its weight and metadata.
    registered: HashMap<String, (u64, Meta)>,
    /// The same addresses, highest weight first.
    order: BTreeSet<(Reverse<u64>, String)>,
}

impl Ranked {
    /// No endpoint yet, ranked for `client_id`, keeping `size` usable.
    pub(super) fn new(size: usize, client_id: &str) -> Self {
        Self {
            size,
            rendezvous: Rendezvous::new(client_id),
            registered: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    /// How many usable endpoints the subset holds.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Every registered endpoint with its metadata, highest rank first.
    pub(super) fn ranked(&self) -> impl Iterator<Item = (&String, &Meta)> {
        self.order
            .iter()
            .filter_map(|(_, addr)| self.registered.get(addr).map(|(_, meta)| (addr, meta)))
    }

    /// Registers `addr` with `meta`, or with `None` unregisters it.
    pub(super) fn apply(&mut self, addr: String, meta: Option<Meta>) {
        match meta {
            Some(meta) => match self.registered.get_mut(&addr) {
                Some((_, known)) => *known = meta,
                None => {
                    let weight = self.rendezvous.weight(&addr);
                    self.order.insert((Reverse(weight), addr.clone()));
                    self.registered.insert(addr, (weight, meta));
                }
            },
            None => {
                if let Some((weight, _)) = self.registered.remove(&addr) {
                    self.order.remove(&(Reverse(weight), addr));
                }
            }
        }
    }

    /// Makes the registered set equal `endpoints`, in time proportional to what changed plus
    /// one pass to find what did.
    pub(super) fn set(&mut self, endpoints: &BTreeMap<String, Meta>) {
        let order = &mut self.order;
        self.registered.retain(|addr, (weight, _)| {
            let keep = endpoints.contains_key(addr);
            if !keep {
                order.remove(&(Reverse(*weight), addr.clone()));
            }
            keep
        });
        for (addr, meta) in endpoints {
            match self.registered.get_mut(addr) {
                Some((_, known)) => known.clone_from(meta),
                None => {
                    let weight = self.rendezvous.weight(addr);
                    self.order.insert((Reverse(weight), addr.clone()));
                    self.registered.insert(addr.clone(), (weight, meta.clone()));
                }
            }
        }
    }
}
