//! One writer per scope, or a loud error.
//!
//! Two controllers of one registry scope (the same `--cluster-name`, or none) without leader
//! election rewrite each other's keys endlessly. Every replica that writes announces itself in
//! the registry on each beat; another announcement that keeps changing is another live writer.
//! It is said in the log (once per episode), in `grpc_registrar_other_writers`, by `/readyz`,
//! and in a Warning Event on every service. An announcement that stops changing is a writer that
//! stopped (a restart, a deposed leader) and is removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector;
use tracing::{info, warn};

use super::Context;
use crate::crd::GrpcService;

/// Beats an announcement may stay unchanged before its writer counts as stopped.
const STOPPED_AFTER: u32 = 5;

/// What this replica knows of the others' announcements.
#[derive(Debug, Default)]
pub struct Detector {
    /// Each other instance's last beat, and for how many rounds it has not changed.
    seen: HashMap<String, (u64, u32)>,
}

/// What one round found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Other writers whose announcement changed since the last round: alive.
    pub live: Vec<String>,
    /// Other writers whose announcement stopped changing long enough: gone.
    pub stopped: Vec<String>,
}

impl Detector {
    /// Forgets every announcement, when this replica leads in a new term: beats seen in an
    /// earlier term say nothing of who writes now (meanwhile another replica led, and its
    /// announcement moved on while it did).
    pub fn forget(&mut self) {
        self.seen.clear();
    }

    /// Compares `others` (instance, beat) with the last round.
    pub fn round(&mut self, others: &[(String, u64)]) -> Round {
        let mut round = Round::default();
        let mut next = HashMap::with_capacity(others.len());
        for (instance, beat) in others {
            let unchanged = match self.seen.get(instance) {
                Some((last, rounds)) if last == beat => rounds + 1,
                // New to this replica: not yet known to be alive or stopped.
                None => 1,
                Some(_) => {
                    round.live.push(instance.clone());
                    0
                }
            };
            if unchanged >= STOPPED_AFTER {
                round.stopped.push(instance.clone());
            } else {
                next.insert(instance.clone(), (*beat, unchanged));
            }
        }
        round.live.sort();
        round.stopped.sort();
        self.seen = next;
        round
    }
}

/// This process's name among writers: the pod's name (stable across a container restart, so a
/// restarted replica takes its own announcement over), else the host's, with the process id.
#[must_use]
pub fn instance() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "grpc-registrar".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Beats every `interval` while this replica may write, and reports other live writers.
pub async fn run(
    ctx: Arc<Context>,
    store: reflector::Store<GrpcService>,
    instance: String,
    interval: Duration,
) {
    let mut detector = Detector::default();
    let mut beat = 0_u64;
    let mut reported: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(interval);
    // The leader term the detector's memory is from.
    let mut seen_in = None;
    loop {
        tick.tick().await;
        if !ctx.backend.may_write() {
            continue;
        }
        let term = match *ctx.role.borrow() {
            crate::leader::Role::Leader { term } => Some(term),
            crate::leader::Role::Follower => None,
        };
        if term != seen_in {
            // Leading in a new term: another replica may have led meanwhile.
            detector.forget();
            seen_in = term;
        }
        beat += 1;
        let others = match ctx.backend.heartbeat(&instance, beat).await {
            Ok(others) => others,
            Err(e) => {
                tracing::debug!(error = %e, "failed to announce this writer; retried next beat");
                continue;
            }
        };
        let round = detector.round(&others);
        for stopped in &round.stopped {
            let _ = ctx.backend.forget_writer(stopped).await;
        }
        let live = round.live;
        let count = i64::try_from(live.len()).unwrap_or(i64::MAX);
        if !live.is_empty() && live != reported {
            ctx.metrics.writers.other_writers.set(count);
            let others = live.join(", ");
            warn!(
                instance,
                others,
                "another live controller writes this registry scope (the same --cluster-name, no leader election): the two rewrite each other's keys; run one, or enable --leader-elect"
            );
            let note = format!(
                "Another live controller ({others}) writes this registry scope besides {instance}: the two rewrite each other's keys. Run one controller per cluster name, or enable leader election."
            );
            for svc in store.state() {
                ctx.writer.event(
                    &svc,
                    Event {
                        type_: EventType::Warning,
                        reason: "MultipleWriters".into(),
                        note: Some(note.clone()),
                        action: "Detect".into(),
                        secondary: None,
                    },
                );
            }
            reported = live;
        } else if live.is_empty() && !reported.is_empty() {
            ctx.metrics.writers.other_writers.set(0);
            info!(
                instance,
                "no other live writer of this registry scope any more"
            );
            reported.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn others(beats: &[(&str, u64)]) -> Vec<(String, u64)> {
        beats.iter().map(|(i, b)| ((*i).to_owned(), *b)).collect()
    }

    #[test]
    fn a_changing_announcement_is_a_live_writer_and_a_still_one_is_not() {
        let mut d = Detector::default();
        assert_eq!(d.round(&others(&[("b", 1), ("old", 7)])), Round::default());
        let round = d.round(&others(&[("b", 2), ("old", 7)]));
        assert_eq!(round.live, ["b"]);
        assert!(round.stopped.is_empty());
    }

    #[test]
    fn an_announcement_unchanged_for_five_beats_is_a_stopped_writer() {
        let mut d = Detector::default();
        let mut stopped = Vec::new();
        for _ in 0..STOPPED_AFTER {
            let round = d.round(&others(&[("old", 7)]));
            assert!(round.live.is_empty());
            stopped = round.stopped;
        }
        assert_eq!(stopped, ["old"]);
    }
}
