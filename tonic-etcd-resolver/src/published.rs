//! The registry content, shared by the watch task (its only writer) and the resolver, and the
//! snapshot behind [`crate::Resolver::endpoints`], copied from it only while someone watches.
//!
//! A copy costs time in proportion to the registry (a few hundred microseconds at 5,000
//! endpoints); making one per change only when a receiver exists keeps a change's cost
//! independent of the registry's size for clients that only use the channel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::format::Endpoint;
use crate::resolver::Snapshot;

/// The registry content and its published snapshot.
pub(crate) struct Published {
    /// Key to endpoint, as the registry has it now.
    content: Mutex<Content>,
    /// The snapshot, current unless `stale`.
    tx: watch::Sender<Snapshot>,
}

struct Content {
    entries: BTreeMap<String, Endpoint>,
    /// The entries changed while nobody held a receiver: copy them before the next subscribe.
    stale: bool,
}

impl Published {
    pub(crate) fn new() -> Self {
        Self {
            content: Mutex::new(Content {
                entries: BTreeMap::new(),
                stale: false,
            }),
            tx: watch::Sender::new(Arc::default()),
        }
    }

    fn content(&self) -> std::sync::MutexGuard<'_, Content> {
        self.content.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` over the registry content.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Endpoint>) -> R) -> R {
        f(&mut self.content().entries)
    }

    /// How many keys the registry has.
    pub(crate) fn len(&self) -> usize {
        self.content().entries.len()
    }

    /// After a change: sends a copy to the receivers, or with none marks the snapshot stale.
    pub(crate) fn publish(&self) {
        let mut content = self.content();
        if self.tx.receiver_count() > 0 {
            self.tx.send_replace(Arc::new(content.entries.clone()));
            content.stale = false;
        } else {
            content.stale = true;
        }
    }

    /// A receiver of the snapshot, brought up to date first if it is stale. Under the same
    /// lock as [`Published::publish`], so no change falls between the copy and the receiver.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Snapshot> {
        let mut content = self.content();
        if content.stale {
            self.tx.send_replace(Arc::new(content.entries.clone()));
            content.stale = false;
        }
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(published: &Published, key: &str) {
        published.with(|e| e.insert(key.to_owned(), Endpoint::new(format!("{key}:1"))));
        published.publish();
    }

    #[test]
    fn changes_made_while_nobody_watches_are_in_the_next_receiver() {
        let published = Published::new();
        put(&published, "a");
        put(&published, "b");
        let rx = published.subscribe();
        assert_eq!(rx.borrow().keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_receiver_sees_every_change_as_it_is_published() {
        let published = Published::new();
        let mut rx = published.subscribe();
        put(&published, "a");
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        drop(rx);
        put(&published, "b");
        let rx = published.subscribe();
        assert_eq!(
            rx.borrow().len(),
            2,
            "stale while unwatched, copied on subscribe"
        );
    }
}
