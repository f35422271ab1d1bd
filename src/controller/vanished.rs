//! GrpcServices that vanished in a re-list: deleted while this replica's watch was broken, so
//! it never saw their deletion.
//!
//! A replica cut off from kube-apiserver keeps a stale view; should it lead before its watches
//! have re-listed, it may publish for a service deleted meanwhile (claiming its target again,
//! with an ownership record naming a uid that no longer exists). No event ever names that
//! service again: the re-list simply leaves it out. The uids a re-list leaves out are handed to
//! the owner-record sweep, which releases whatever the registry still holds for them.

use std::collections::{HashMap, HashSet};

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::crd::GrpcService;

/// The uids of the services of one backend this replica knows, and those a re-list in progress
/// has listed.
#[derive(Default)]
pub struct Vanished {
    /// Every known service's uid: whether it is published by this controller's backend.
    known: HashMap<String, bool>,
    /// The uids listed so far by a re-list in progress.
    relisted: Option<HashSet<String>>,
}

impl Vanished {
    /// Follows one event of the GrpcService watch; on the end of a re-list, the uids of this
    /// backend's services it left out (deleted unseen).
    pub fn apply(
        &mut self,
        event: &Event<GrpcService>,
        ours: impl Fn(&GrpcService) -> bool,
    ) -> Vec<String> {
        match event {
            Event::Apply(svc) => {
                if let Some(uid) = svc.uid() {
                    self.known.insert(uid, ours(svc));
                }
            }
            Event::Delete(svc) => {
                if let Some(uid) = svc.uid() {
                    self.known.remove(&uid);
                }
            }
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(svc) => {
                if let Some(uid) = svc.uid() {
                    self.known.insert(uid.clone(), ours(svc));
                    self.relisted.get_or_insert_default().insert(uid);
                }
            }
            Event::InitDone => {
                let listed = self.relisted.take().unwrap_or_default();
                let mut gone = Vec::new();
                self.known.retain(|uid, ours| {
                    let kept = listed.contains(uid);
                    if !kept && *ours {
                        gone.push(uid.clone());
                    }
                    kept
                });
                return gone;
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::service;

    fn with_uid(name: &str, uid: &str) -> GrpcService {
        let mut svc = service(name);
        svc.metadata.uid = Some(uid.into());
        svc
    }

    #[test]
    fn a_relist_names_the_services_of_this_backend_it_left_out() {
        let mut vanished = Vanished::default();
        let ours = |svc: &GrpcService| svc.name_any() != "theirs";
        let mut feed = |events: Vec<Event<GrpcService>>| {
            events
                .iter()
                .flat_map(|event| vanished.apply(event, ours))
                .collect::<Vec<_>>()
        };
        let listed = feed(vec![
            Event::Init,
            Event::InitApply(with_uid("a", "1")),
            Event::InitApply(with_uid("b", "2")),
            Event::InitApply(with_uid("theirs", "3")),
            Event::InitDone,
            Event::Apply(with_uid("c", "4")),
            Event::Delete(with_uid("a", "1")),
        ]);
        assert!(listed.is_empty(), "{listed:?}");
        // c was deleted while the watch was broken (theirs too, but it is not this backend's;
        // a's deletion was seen).
        let relisted = feed(vec![
            Event::Init,
            Event::InitApply(with_uid("b", "2")),
            Event::InitDone,
        ]);
        assert_eq!(relisted, ["4"]);
    }
}
