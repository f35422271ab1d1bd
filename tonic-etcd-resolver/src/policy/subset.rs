//! Subsetting: each client connects to `n` of the endpoints, chosen by rendezvous
//! (highest-random-weight) hashing of its client id with each address.
//!
//! Every client ranks every endpoint by a hash of (client id, address) and keeps the `n` highest.
//! The ranking of two endpoints never depends on a third, so an endpoint joining or leaving
//! changes only the subsets it enters or leaves: about `n / M` of a client's connections move
//! for each endpoint changed, the least any scheme can move.

/// The environment variables [`default_client_id`] reads, in order: the pod's name (from the
/// downward API), then the host name (a pod's name by default).
pub const CLIENT_ID_ENVS: [&str; 2] = ["POD_NAME", "HOSTNAME"];

/// FNV-1a's 64-bit offset basis and prime.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        state ^= u64::from(*b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finaliser: FNV's low bits are weak, and a rendezvous weight needs
/// every bit to depend on every input byte.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// A client's rendezvous ranking: the hash of its id, continued over each address.
///
/// The weights are a fixed function of the bytes (FNV-1a, then MurmurHash3's finaliser), the
/// same in every process and on every platform, so a client that keeps its id keeps its
/// subset across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// FNV-1a state after the client id and a separator byte.
    client: u64,
}

impl Rendezvous {
    /// The ranking of the client `client_id`.
    #[must_use]
    pub fn new(client_id: &str) -> Self {
        // 0xff never occurs in UTF-8, so ("ab", "c") and ("a", "bc") hash apart.
        let client = fnv1a(fnv1a(FNV_OFFSET, client_id.as_bytes()), &[0xff]);
        Self { client }
    }

    /// This client's weight for the endpoint at `addr`; the highest weights make the subset.
    #[must_use]
    pub fn weight(&self, addr: &str) -> u64 {
        mix(fnv1a(self.client, addr.as_bytes()))
    }

    /// The `n` addresses of `addrs` with the highest weights, highest first (all of them, ranked,
    /// when there are no more than `n`).
    ///
    /// ```
    /// use tonic_etcd_resolver::policy::Rendezvous;
    ///
    /// let addrs = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"];
    /// let subset = Rendezvous::new("client-a").subset(addrs, 2);
    /// assert_eq!(subset.len(), 2);
    /// ```
    #[must_use]
    pub fn subset<'a>(&self, addrs: impl IntoIterator<Item = &'a str>, n: usize) -> Vec<&'a str> {
        let mut ranked: Vec<(u64, &str)> = addrs.into_iter().map(|a| (self.weight(a), a)).collect();
        // Highest weight first; the address breaks the (astronomically unlikely) ties.
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked.truncate(n);
        ranked.into_iter().map(|(_, a)| a).collect()
    }
}

/// The client id used when [`crate::Options::client_id`] is not set: `POD_NAME`, else
/// `HOSTNAME` (the first that is set and not empty, [`CLIENT_ID_ENVS`]), else a random id for
/// this process.
///
/// A random id still spreads clients evenly, but a restarted client then gets a new subset.
#[must_use]
pub fn default_client_id() -> String {
    CLIENT_ID_ENVS
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| format!("random-{:016x}", fastrand::u64(..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn addrs(range: std::ops::Range<usize>) -> Vec<String> {
        range
            .map(|i| format!("10.0.{}.{}:50051", i / 256, i % 256))
            .collect()
    }

    fn subset(client: &str, addrs: &[String], n: usize) -> BTreeSet<String> {
        Rendezvous::new(client)
            .subset(addrs.iter().map(String::as_str), n)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_client_gets_n_distinct_endpoints_or_all_of_fewer() {
        let all = addrs(0..50);
        assert_eq!(subset("c", &all, 10).len(), 10);
        assert_eq!(subset("c", &all[..4], 10).len(), 4);
        assert!(subset("c", &all, 0).is_empty());
    }

    #[test]
    fn the_same_client_id_gets_the_same_subset_whatever_the_order_of_endpoints() {
        let all = addrs(0..200);
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(subset("pod-1", &all, 20), subset("pod-1", &reversed, 20));
    }

    #[test]
    fn the_weights_are_a_fixed_function_of_the_bytes() {
        // Pinned: a change here would give every deployed client a new subset on upgrade.
        assert_eq!(
            Rendezvous::new("client-a").weight("10.0.0.1:50051"),
            0x5183_2342_52fb_8344
        );
        assert_eq!(
            Rendezvous::new("").weight(""),
            mix(fnv1a(FNV_OFFSET, &[0xff]))
        );
        assert_eq!(
            fnv1a(FNV_OFFSET, b"a"),
            0xaf63_dc4c_8601_ec8c,
            "FNV-1a 64 of \"a\""
        );
    }

    #[test]
    fn different_clients_get_different_subsets() {
        let all = addrs(0..100);
        let a = subset("pod-a", &all, 10);
        let b = subset("pod-b", &all, 10);
        assert_ne!(a, b);
    }

    #[test]
    fn removing_an_endpoint_outside_the_subset_changes_nothing() {
        let all = addrs(0..100);
        let before = subset("pod-7", &all, 10);
        let outside: Vec<String> = all
            .iter()
            .filter(|a| !before.contains(*a))
            .cloned()
            .collect();
        let mut fewer = all.clone();
        fewer.retain(|a| *a != outside[0] && *a != outside[1]);
        assert_eq!(subset("pod-7", &fewer, 10), before);
    }

    #[test]
    fn removing_a_subset_member_replaces_it_and_keeps_the_rest() {
        let all = addrs(0..100);
        let before = subset("pod-7", &all, 10);
        let gone = before.iter().next().unwrap().clone();
        let fewer: Vec<String> = all.iter().filter(|a| **a != gone).cloned().collect();
        let after = subset("pod-7", &fewer, 10);
        assert_eq!(after.len(), 10);
        assert_eq!(
            before.intersection(&after).count(),
            9,
            "only the gone one moved"
        );
    }

    #[test]
    fn an_endpoint_joining_enters_about_n_over_m_of_the_subsets() {
        let all = addrs(0..200);
        let mut more = all.clone();
        more.push("10.9.9.9:50051".to_owned());
        let (clients, n) = (2_000, 20);
        let mut entered = 0;
        for c in 0..clients {
            let id = format!("client-{c}");
            let (before, after) = (subset(&id, &all, n), subset(&id, &more, n));
            let moved = after.difference(&before).count();
            assert!(
                moved <= 1,
                "a join moves at most one of a client's connections"
            );
            entered += moved;
        }
        // Expected clients * n / (M + 1) = 199; binomial, so within +-30% by a wide margin.
        let expected = clients * n / 201;
        assert!(
            (expected * 7 / 10..=expected * 13 / 10).contains(&entered),
            "{entered} of {clients} subsets, expected about {expected}"
        );
    }

    #[test]
    fn each_endpoint_is_in_about_the_same_number_of_subsets() {
        let all = addrs(0..100);
        let (clients, n) = (1_000, 10);
        let mut load = std::collections::BTreeMap::<String, usize>::new();
        for c in 0..clients {
            for a in subset(&format!("client-{c}"), &all, n) {
                *load.entry(a).or_default() += 1;
            }
        }
        // Mean 100; binomial with sd ~9.5: every endpoint within 50 of it.
        assert_eq!(load.len(), 100, "every endpoint is in some subset");
        assert!(load.values().all(|l| (50..=150).contains(l)), "{load:?}");
    }

    #[test]
    fn the_client_id_defaults_to_the_pod_name_or_a_random_id() {
        let id = default_client_id();
        assert!(!id.is_empty());
        let from_env = CLIENT_ID_ENVS
            .iter()
            .filter_map(|n| std::env::var(n).ok())
            .find(|v| !v.trim().is_empty());
        match from_env {
            Some(v) => assert_eq!(id, v.trim()),
            None => assert!(id.starts_with("random-"), "{id}"),
        }
    }
}
