//! The endpoint sources the controller reads (those [`crate::source::register`] lists): their
//! watches, and what a reconcile asks of them (wait for the list, select, forget a service).

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Client;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};

use super::pacing::Pacing;
use super::watch::{Mapper, Selections};
use super::{Scope, api};
use crate::backoff::Backoff;
use crate::crd::{GrpcService, GrpcServiceSpec};
use crate::source::feed::Feed;
use crate::source::{Candidate, Objects, Register, Selection, Selects, Source};

/// One registered source, as a reconcile sees it.
#[derive(Clone)]
struct Registered {
    /// Its index, behind the object-safe half of the seam.
    source: Arc<dyn Selects>,
    /// Which of its objects each service last read; read by its mapper.
    selections: Selections,
    /// True once its index has completed its initial list.
    synced: tokio::sync::watch::Receiver<bool>,
    /// True while its index holds a completed list and no re-list is under way: after a watch
    /// gap the index is the view from before the gap until the re-list completes, and a
    /// reconcile must not publish from it (a pod turned unready in the gap would be put back).
    current: tokio::sync::watch::Receiver<bool>,
}

/// The sources a reconcile reads, each with its selections and its list state.
#[derive(Clone, Default)]
pub struct Sources(Vec<Registered>);

impl Sources {
    /// The same sources and `source`, whose list is complete when `synced` says so.
    #[must_use]
    pub fn with(
        mut self,
        source: impl Selects + 'static,
        synced: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        self.0.push(Registered {
            source: Arc::new(source),
            selections: Selections::default(),
            current: synced.clone(),
            synced,
        });
        self
    }

    /// Waits, at most `wait` each, for the lists of the sources `spec` reads (all of them when
    /// it names none), so that desired state is never computed from a half-filled index nor
    /// from the view before a watch gap while its re-list is under way; false when one is not
    /// complete in time.
    pub async fn wait_synced(&self, spec: &GrpcServiceSpec, wait: Duration) -> bool {
        let read = self.0.iter().filter(|r| r.source.read_by(spec)).count();
        for registered in &self.0 {
            if read > 0 && !registered.source.read_by(spec) {
                continue;
            }
            let mut current = registered.current.clone();
            match tokio::time::timeout(wait, current.wait_for(|current| *current)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
        true
    }

    /// The candidates `selection` yields now, recording which objects `service` read (and
    /// that it read none of the other sources), so that their later events (even once they
    /// no longer match) wake it.
    pub fn select(
        &self,
        service: &ObjectRef<GrpcService>,
        namespace: &str,
        selection: &Selection,
    ) -> Vec<Arc<Candidate>> {
        let mut candidates = Vec::new();
        for registered in &self.0 {
            match registered.source.select(namespace, selection) {
                Some(selected) => {
                    let selections = &registered.selections;
                    match &selected.objects {
                        Objects::Candidates => selections.record_selected(
                            service.clone(),
                            namespace,
                            selected.membership,
                            || {
                                selected
                                    .candidates
                                    .iter()
                                    .map(|c| c.id.as_str())
                                    .collect::<Vec<_>>()
                            },
                        ),
                        Objects::Named(names) => {
                            selections.record(service.clone(), namespace, names);
                        }
                    }
                    candidates = selected.candidates;
                }
                None => registered.selections.forget(service.clone()),
            }
        }
        candidates
    }

    /// Forgets what `service` read, in every source.
    pub fn forget(&self, service: &ObjectRef<GrpcService>) {
        for registered in &self.0 {
            registered.selections.forget(service.clone());
        }
    }

    /// Whether no service's read of any source is recorded.
    #[cfg(test)]
    pub(super) fn read_nothing(&self) -> bool {
        self.0.iter().all(|r| r.selections.is_empty())
    }

    /// Each source's name and how many candidates it holds, for logs.
    #[must_use]
    pub fn sizes(&self) -> Vec<(&'static str, usize)> {
        self.0
            .iter()
            .map(|r| (r.source.name(), r.source.len()))
            .collect()
    }

    /// The sources, for the GrpcService feed.
    pub(super) fn indexes(&self) -> Vec<Arc<dyn Selects>> {
        self.0.iter().map(|r| r.source.clone()).collect()
    }

    /// Each source's list state.
    pub(super) fn synced(&self) -> Vec<tokio::sync::watch::Receiver<bool>> {
        self.0.iter().map(|r| r.synced.clone()).collect()
    }
}

/// Hooks one source's watch stream into the controller.
type Attach = Box<dyn FnOnce(Controller<GrpcService>, Pacing) -> Controller<GrpcService> + Send>;

/// The registered sources with their watches, before the controller is built.
pub(super) struct Watches {
    client: Client,
    scope: Scope,
    /// Bumped on every re-list after the first, which reconciles every service.
    relists: tokio::sync::watch::Sender<u64>,
    sources: Sources,
    attach: Vec<Attach>,
}

impl Watches {
    /// Every registered source, each fed by its own watch in `scope`; a re-list after the
    /// first bumps `relists`.
    pub(super) fn new(
        client: Client,
        scope: Scope,
        relists: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        let mut watches = Self {
            client,
            scope,
            relists,
            sources: Sources::default(),
            attach: Vec::new(),
        };
        crate::source::register(&mut watches);
        watches
    }

    /// The watch of one source, applied to its index (re-lists buffered) before the mapper
    /// reads the object. Readiness is observed on the event stream (InitDone, after the index
    /// applied it), not with `Store::wait_until_ready`: that future is backed by a oneshot
    /// that keeps only the last waker, so with several concurrent waiters all but one can wait
    /// forever. Streaming lists: the initial objects arrive as watch events from the API
    /// server's cache, not as one list response (at 100k pods, a 100k-object response took
    /// minutes to build and decode, and held it all in memory at once).
    fn events<S: Source>(
        &self,
        source: S,
        synced: tokio::sync::watch::Sender<bool>,
        current: tokio::sync::watch::Sender<bool>,
    ) -> impl Stream<Item = Result<S::Object, watcher::Error>> + Send + 'static {
        let mut feed = Feed::new(source);
        let relists = self.relists.clone();
        // A re-list after a watch gap (410 Gone, an API server restart) swaps the whole index
        // in: objects deleted in the gap produce no event, so every service is reconciled then.
        watcher(
            api::<S::Object>(&self.client, &self.scope),
            watcher::Config::default().streaming_lists(),
        )
        .backoff(Backoff::watch())
        .inspect(move |event| {
            if let Ok(event) = event {
                track(event, &mut feed, &synced, &current, &relists);
            }
        })
        .touched_objects()
    }

    /// The sources, for the reconciler and the GrpcService feed.
    pub(super) fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Hooks every source's watch into `controller`, its triggers paced by `pacing`.
    pub(super) fn attach(
        self,
        controller: Controller<GrpcService>,
        pacing: &Pacing,
    ) -> Controller<GrpcService> {
        self.attach
            .into_iter()
            .fold(controller, |controller, attach| {
                attach(controller, pacing.clone())
            })
    }
}

/// Applies one watch event of a source to its index, and says when the index is listed
/// (`synced`, from the first list on), current (`current`: listed, no re-list under way) and
/// re-listed (`relists` bumped after every list but the first).
fn track<S: Source>(
    event: &watcher::Event<S::Object>,
    feed: &mut Feed<S>,
    synced: &tokio::sync::watch::Sender<bool>,
    current: &tokio::sync::watch::Sender<bool>,
    relists: &tokio::sync::watch::Sender<u64>,
) {
    if let watcher::Event::Init = event {
        current.send_replace(false);
    }
    if feed.apply(event) {
        current.send_replace(true);
        if synced.send_replace(true) {
            relists.send_modify(|n| *n += 1);
        }
    }
}

impl Register for Watches {
    /// Registers a source: its watch feeds its index, and its events wake the services they
    /// concern.
    fn add<S: Source>(&mut self) {
        let source = S::default();
        let (synced, current, selections) = (
            tokio::sync::watch::Sender::new(false),
            tokio::sync::watch::Sender::new(false),
            Selections::default(),
        );
        self.sources.0.push(Registered {
            source: Arc::new(source.clone()),
            selections: selections.clone(),
            synced: synced.subscribe(),
            current: current.subscribe(),
        });
        let events = self.events(source.clone(), synced, current);
        let mapper = Mapper::new(source, selections);
        self.attach.push(Box::new(move |controller, pacing| {
            controller.watches_stream(events, move |object| pacing.pass(mapper.map(&object)))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::PodBuilder;
    use crate::source::pod::PodSource;
    use tokio::sync::watch::Sender;

    #[test]
    fn an_index_being_relisted_after_a_watch_gap_is_not_current_until_the_relist_completes() {
        let mut feed = Feed::new(PodSource::default());
        let (synced, current, relists) = (Sender::new(false), Sender::new(false), Sender::new(0));
        let mut apply = |event: watcher::Event<_>| {
            track(&event, &mut feed, &synced, &current, &relists);
            (*synced.borrow(), *current.borrow(), *relists.borrow())
        };
        assert_eq!(apply(watcher::Event::Init), (false, false, 0));
        let pod = || PodBuilder::ready("p1", "10.0.0.1").object();
        assert_eq!(apply(watcher::Event::InitApply(pod())), (false, false, 0));
        assert_eq!(apply(watcher::Event::InitDone), (true, true, 0), "listed");
        assert_eq!(apply(watcher::Event::Apply(pod())), (true, true, 0));
        // A watch gap: the index is the old view until the re-list is swapped in.
        assert_eq!(apply(watcher::Event::Init), (true, false, 0), "re-listing");
        assert_eq!(apply(watcher::Event::InitApply(pod())), (true, false, 0));
        assert_eq!(
            apply(watcher::Event::InitDone),
            (true, true, 1),
            "re-listed"
        );
    }
}
