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

/// Every key under `prefix` with its value and lease.
///
/// # Panics
/// When etcd does not answer: a test cannot go on without it.
pub async fn dump(client: &mut Client, prefix: &str) -> BTreeMap<String, Stored> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("failed to read the registry");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                Stored {
                    value: kv.value().to_vec(),
                    lease: kv.lease(),
                },
            )
        })
        .collect()
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
