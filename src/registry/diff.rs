//! The minimal diff, one rule for every backend: what to write so that what a target holds
//! becomes what is desired, touching nothing that is already right.

use std::collections::BTreeMap;

/// The writes that turn `current` (key and entry, in the backend's order) into `desired`: a
/// put for each desired entry that `put` finds missing or different (in key order), then a
/// delete for each current entry no longer desired (in `current`'s order). Puts come first, so
/// a client never sees the set emptied in passing; an entry `put` finds unchanged is not
/// written.
///
/// `put` gets the desired entry and the current one under its key, if any, and returns the
/// write (`None` when the entry is already right).
pub(super) fn diff<'a, C, D, W>(
    current: impl IntoIterator<Item = (&'a str, &'a C)>,
    desired: &'a BTreeMap<String, D>,
    put: impl Fn(&'a str, &'a D, Option<&'a C>) -> Option<W>,
    delete: impl Fn(&'a str) -> W,
) -> Vec<W>
where
    C: 'a,
{
    let current: Vec<(&str, &C)> = current.into_iter().collect();
    let by_key: BTreeMap<&str, &C> = current.iter().copied().collect();
    let puts = desired
        .iter()
        .filter_map(|(key, want)| put(key, want, by_key.get(key.as_str()).copied()));
    let deletes = current
        .iter()
        .filter(|(key, _)| !desired.contains_key(*key))
        .map(|(key, _)| delete(key));
    puts.chain(deletes).collect()
}

/// [`diff`] of a `current` sorted by key, as a map holds it: one merge of the two maps, where
/// [`diff`] looks every key up (the same writes, in the same order).
pub(super) fn diff_sorted<'a, C, D, W>(
    current: &'a BTreeMap<String, C>,
    desired: &'a BTreeMap<String, D>,
    put: impl Fn(&'a str, &'a D, Option<&'a C>) -> Option<W>,
    delete: impl Fn(&'a str) -> W,
) -> Vec<W> {
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    let mut have = current.iter().peekable();
    for (key, want) in desired {
        let mut found = None;
        while let Some((k, c)) = have.peek() {
            match k.as_str().cmp(key) {
                std::cmp::Ordering::Less => deletes.push(delete(k)),
                std::cmp::Ordering::Equal => found = Some(*c),
                std::cmp::Ordering::Greater => break,
            }
            have.next();
            if found.is_some() {
                break;
            }
        }
        puts.extend(put(key, want, found));
    }
    deletes.extend(have.map(|(k, _)| delete(k)));
    puts.append(&mut deletes);
    puts
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The merge and the lookups write alike, whatever the two maps hold.
        #[test]
        fn a_merge_of_sorted_maps_writes_what_the_lookups_write(
            current in prop::collection::btree_map("[a-e]{1,3}", 0..4_u8, 0..24),
            desired in prop::collection::btree_map("[a-e]{1,3}", 0..4_u8, 0..24),
        ) {
            let put = |k: &str, want: &u8, have: Option<&u8>| {
                (have != Some(want)).then(|| format!("put {k}"))
            };
            let delete = |k: &str| format!("delete {k}");
            let looked_up = diff(current.iter().map(|(k, c)| (k.as_str(), c)), &desired, put, delete);
            prop_assert_eq!(diff_sorted(&current, &desired, put, delete), looked_up);
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum W {
        Put(&'static str),
        Delete(&'static str),
    }

    #[test]
    fn new_and_changed_entries_are_put_first_and_gone_ones_deleted_in_the_current_order() {
        let current = [
            ("z-gone", &1),
            ("same", &2),
            ("changed", &3),
            ("a-gone", &4),
        ];
        let desired = BTreeMap::from([
            ("changed".to_owned(), 30),
            ("new".to_owned(), 5),
            ("same".to_owned(), 2),
        ]);
        let names = ["z-gone", "same", "changed", "a-gone", "new"];
        let name = |k: &str| *names.iter().find(|n| **n == k).unwrap();
        let writes = diff(
            current,
            &desired,
            |k, want, have| (have != Some(want)).then(|| W::Put(name(k))),
            |k| W::Delete(name(k)),
        );
        assert_eq!(
            writes,
            [
                W::Put("changed"),
                W::Put("new"),
                W::Delete("z-gone"),
                W::Delete("a-gone")
            ]
        );
    }
}
