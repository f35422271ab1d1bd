//! Reading a registry etcd the way the tests and benches check it: what is under a prefix, and
//! how many DELETEs a watching client saw.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchStream};

/// One key as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The value bytes.
    pub value: Vec<u8>,
    /// The lease it is attached to (0 for none).
    pub lease: i64,
}

impl Stored {
    /// The value as text (lossy).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// Keys read per request: one response stays well under gRPC's 4 MiB default message limit.
const PAGE: i64 = 2_000;

/// Every key under `prefix` with its value and lease, read in pages at one revision.
///
/// # Panics
/// When etcd does not answer: a test cannot go on without it.
pub async fn dump(client: &mut Client, prefix: &str) -> BTreeMap<String, Stored> {
    let end = prefix_end(prefix.as_bytes());
    let mut out = BTreeMap::new();
    // The empty prefix means every key: etcd spells that range from "\0" to "\0".
    let mut from = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    };
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = client
            .get(from.clone(), Some(options))
            .await
            .expect("failed to read the registry");
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            out.insert(
                String::from_utf8_lossy(kv.key()).into_owned(),
                Stored {
                    value: kv.value().to_vec(),
                    lease: kv.lease(),
                },
            );
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return out,
        }
    }
}

/// The end of the range of keys starting with `prefix`, as etcd's `WithPrefix` computes it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How many keys are under `prefix` (-1 when etcd does not answer, so polls can go on).
pub async fn count(client: &mut Client, prefix: &str) -> i64 {
    client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map_or(-1, |r| r.count())
}

/// DELETE events a watching client has received, reading until the watch is quiet for `quiet`.
///
/// # Panics
/// When the watch breaks.
pub async fn deletes_seen(watch: &mut WatchStream, quiet: Duration) -> usize {
    let mut deletes = 0;
    while let Ok(Some(resp)) = tokio::time::timeout(quiet, watch.message())
        .await
        .map(|r| r.expect("the registry watch broke"))
    {
        deletes += resp
            .events()
            .iter()
            .filter(|e| e.event_type() == EventType::Delete)
            .count();
    }
    deletes
}

/// The keys a watching client has seen deleted (each once), reading until the watch is quiet
/// for `quiet`.
///
/// # Panics
/// When the watch breaks.
pub async fn deleted_keys(
    watch: &mut WatchStream,
    quiet: Duration,
) -> std::collections::BTreeSet<String> {
    let mut deleted = std::collections::BTreeSet::new();
    while let Ok(Some(resp)) = tokio::time::timeout(quiet, watch.message())
        .await
        .map(|r| r.expect("the registry watch broke"))
    {
        deleted.extend(
            resp.events()
                .iter()
                .filter(|e| e.event_type() == EventType::Delete)
                .filter_map(|e| e.kv()?.key_str().ok().map(str::to_owned)),
        );
    }
    deleted
}
