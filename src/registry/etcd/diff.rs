//! The pure diff between what is in etcd under a target and what should be (the shared rule,
//! [`crate::registry::diff`], over etcd keys on the live lease).

use std::collections::BTreeMap;

/// One key as found in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// The stored value.
    pub value: Vec<u8>,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
}

/// One write to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Put `value` at `key` on the current lease.
    Put {
        /// The key.
        key: String,
        /// The value bytes.
        value: Vec<u8>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// The writes that turn `current` into `desired`, with every key on `lease`.
///
/// A key is re-put when its value differs or when it sits on another lease (a previous
/// controller's, or one that was lost), so that the keys always follow the live lease. Puts come
/// before deletes, so a client never sees a set emptied in passing.
#[must_use]
pub fn diff(
    current: &BTreeMap<String, Current>,
    desired: &BTreeMap<String, Vec<u8>>,
    lease: i64,
) -> Vec<Op> {
    crate::registry::diff::diff_sorted(
        current,
        desired,
        |key, value, current| {
            let unchanged = current.is_some_and(|c| &c.value == value && c.lease == lease);
            (!unchanged).then(|| Op::Put {
                key: key.to_owned(),
                value: value.clone(),
            })
        },
        |key| Op::Delete {
            key: key.to_owned(),
        },
    )
}

impl Op {
    /// The bytes it carries (key and value).
    #[must_use]
    pub fn bytes(&self) -> usize {
        match self {
            Self::Put { key, value } => key.len() + value.len(),
            Self::Delete { key } => key.len(),
        }
    }
}

impl crate::registry::batch::Write for Op {
    fn bytes(&self) -> usize {
        Op::bytes(self)
    }

    fn key(&self) -> String {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key.clone(),
        }
    }

    fn deletes(&self) -> bool {
        matches!(self, Self::Delete { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(value: &str, lease: i64) -> Current {
        Current {
            value: value.into(),
            lease,
        }
    }

    #[test]
    fn unchanged_keys_on_the_live_lease_produce_no_writes() {
        let current = BTreeMap::from([("a".to_owned(), cur("1", 7))]);
        let desired = BTreeMap::from([("a".to_owned(), b"1".to_vec())]);
        assert!(diff(&current, &desired, 7).is_empty());
    }

    #[test]
    fn changed_value_or_foreign_lease_is_re_put() {
        let current =
            BTreeMap::from([("a".to_owned(), cur("1", 7)), ("b".to_owned(), cur("2", 6))]);
        let desired = BTreeMap::from([
            ("a".to_owned(), b"x".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        let ops = diff(&current, &desired, 7);
        assert_eq!(ops.len(), 2);
        assert!(ops.iter().all(|op| matches!(op, Op::Put { .. })));
    }

    #[test]
    fn missing_keys_are_put_and_stale_keys_deleted_puts_first() {
        let current = BTreeMap::from([("old".to_owned(), cur("1", 7))]);
        let desired = BTreeMap::from([("new".to_owned(), b"1".to_vec())]);
        assert_eq!(
            diff(&current, &desired, 7),
            [
                Op::Put {
                    key: "new".into(),
                    value: b"1".to_vec()
                },
                Op::Delete { key: "old".into() }
            ]
        );
    }
}
