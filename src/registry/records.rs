//! Where the controller keeps its own records in a registry (etcd keys, Consul KV keys): one
//! layout for every backend, under the registrar root or its cluster's part of it.

/// The records root: `root`, or `<root>/clusters/<cluster>` with a cluster name.
#[must_use]
pub fn root(root: &str, cluster: Option<&str>) -> String {
    match cluster {
        Some(cluster) => format!("{root}/clusters/{cluster}"),
        None => root.to_owned(),
    }
}

/// The keys of the controller's records under one records root.
#[derive(Clone, Debug)]
pub(super) struct Records {
    root: String,
}

impl Records {
    /// The records under `root` (a records root, see [`root`]).
    pub(super) fn new(root: String) -> Self {
        Self { root }
    }

    /// A target's ownership record, `<root>/owners/<target>`.
    pub(super) fn owner(&self, target: &str) -> String {
        format!("{}/owners/{target}", self.root)
    }

    /// An owner's publication record, `<root>/published/<uid>`.
    pub(super) fn publication(&self, uid: &str) -> String {
        format!("{}/published/{uid}", self.root)
    }

    /// The leader record that fences writes, `<root>/leader`.
    pub(super) fn leader(&self) -> String {
        format!("{}/leader", self.root)
    }

    /// A writer's announcement, `<root>/writers/<instance>` (`""`: the prefix of them all).
    pub(super) fn writer(&self, instance: &str) -> String {
        format!("{}/writers/{instance}", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clusters_records_live_in_its_own_part_of_the_root() {
        assert_eq!(root("r", None), "r");
        let records = Records::new(root("r", Some("east")));
        assert_eq!(records.owner("a/b"), "r/clusters/east/owners/a/b");
        assert_eq!(records.owner(""), "r/clusters/east/owners/");
        assert_eq!(records.publication("u"), "r/clusters/east/published/u");
        assert_eq!(records.leader(), "r/clusters/east/leader");
        assert_eq!(records.writer(""), "r/clusters/east/writers/");
    }
}
