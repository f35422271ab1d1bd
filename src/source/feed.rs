//! The one feed from a watch into a source's index, re-lists buffered, for every source.

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::{Listed, Source};

/// Applies a source's watch events to its index. A re-list (`Init`, `InitApply`...,
/// `InitDone`) is buffered and swapped in whole at `InitDone`, as kube's reflector store does,
/// so that a reconcile never reads a half-listed index.
pub struct Feed<S: Source> {
    /// The source fed.
    source: S,
    /// The re-list under way, decoded.
    relist: Option<Vec<Listed<S::Decoded>>>,
}

impl<S: Source> Feed<S> {
    /// A feed into `source`.
    #[must_use]
    pub fn new(source: S) -> Self {
        Self {
            source,
            relist: None,
        }
    }

    /// Applies one event; true when a (re-)list completed.
    pub fn apply(&mut self, event: &Event<S::Object>) -> bool {
        match event {
            Event::Apply(object) => self.source.apply(
                &object.namespace().unwrap_or_default(),
                &object.name_any(),
                S::decode(object),
            ),
            Event::Delete(object) => self
                .source
                .delete(&object.namespace().unwrap_or_default(), &object.name_any()),
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(object) => self.relist.get_or_insert_default().push(Listed {
                namespace: object.namespace().unwrap_or_default(),
                name: object.name_any(),
                decoded: S::decode(object),
            }),
            Event::InitDone => {
                self.source.reset(self.relist.take().unwrap_or_default());
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PodBuilder, endpoint_slice};
    use crate::source::pod::PodSource;
    use crate::source::slice::SliceSource;

    #[test]
    fn a_pod_relist_swaps_the_candidates_in_whole_at_init_done() {
        let source = PodSource::default();
        let mut feed = Feed::new(source.clone());
        feed.apply(&Event::Apply(
            PodBuilder::ready("gone", "10.0.0.1").object(),
        ));
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(
            PodBuilder::ready("new", "10.0.0.2").object(),
        ));
        assert!(
            source.candidates.get("default", "gone").is_some(),
            "old view until InitDone"
        );
        assert!(feed.apply(&Event::InitDone));
        assert!(source.candidates.get("default", "gone").is_none());
        assert!(source.candidates.get("default", "new").is_some());
    }

    #[test]
    fn a_slice_relist_swaps_the_endpoints_in_whole_at_init_done() {
        let source = SliceSource::default();
        let mut feed = Feed::new(source.clone());
        feed.apply(&Event::Apply(endpoint_slice(
            "gone",
            "svc",
            &[("10.0.0.1", true, None)],
        )));
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(endpoint_slice(
            "new",
            "svc",
            &[("10.0.0.2", true, None)],
        )));
        assert_eq!(
            source.slices.select("default", "svc").slices,
            ["gone"],
            "old view until InitDone"
        );
        assert!(feed.apply(&Event::InitDone));
        assert_eq!(source.slices.select("default", "svc").slices, ["new"]);
        feed.apply(&Event::Delete(endpoint_slice("new", "svc", &[])));
        assert!(source.slices.is_empty());
    }
}
