//! Building a `GrpcServiceStatus` from the outcome of a reconcile, purely.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::GrpcServiceStatus;
use crate::desired::{Desired, Skip};
use crate::registry::SyncReport;

/// Condition types.
pub mod condition {
    /// The registry holds what the spec asks for.
    pub const READY: &str = "Ready";
    /// Another GrpcService owns the target.
    pub const CONFLICT: &str = "Conflict";
    /// The spec cannot be applied.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The registry could not be reached or refused the write.
    pub const ETCD_UNAVAILABLE: &str = "EtcdUnavailable";
}

/// Condition reasons.
pub mod reason {
    /// The registry equals the desired state.
    pub const SYNCED: &str = "Synced";
    /// The selector matches nothing.
    pub const NO_PODS_SELECTED: &str = "NoPodsSelected";
    /// A selected pod has no port with the requested name.
    pub const PORT_NOT_FOUND: &str = "PortNotFound";
    /// A condition that is False as expected.
    pub const AS_EXPECTED: &str = "AsExpected";
}

/// The condition types the controller maintains, in status order.
pub const CONDITIONS: [&str; 4] = [
    condition::READY,
    condition::CONFLICT,
    condition::INVALID_SPEC,
    condition::ETCD_UNAVAILABLE,
];

/// What a reconcile found.
#[derive(Clone, Debug)]
pub enum Outcome<'a> {
    /// The registry matches the desired state.
    Synced {
        /// The target written.
        target: &'a str,
        /// The desired state and its counts.
        desired: &'a Desired,
        /// What the sync did.
        report: &'a SyncReport,
    },
    /// The spec cannot be applied.
    InvalidSpec {
        /// The reason, from [`crate::desired::SpecError`].
        message: String,
    },
    /// Another GrpcService owns the target.
    Conflict {
        /// The contested target.
        target: &'a str,
        /// `namespace/name` of the owner.
        owner: String,
    },
    /// etcd could not be reached or refused the write.
    EtcdUnavailable {
        /// The target the write was for.
        target: &'a str,
        /// The error.
        message: String,
        /// Counts, when the pods were evaluated before the failure.
        desired: Option<&'a Desired>,
    },
}

/// The next status, keeping `lastTransitionTime` of conditions whose status did not change and
/// `lastSyncTime` unless the registry changed, so an unchanged outcome yields an equal status and
/// no write.
#[must_use]
pub fn next_status(
    prev: Option<&GrpcServiceStatus>,
    generation: Option<i64>,
    outcome: &Outcome<'_>,
    now: &Time,
) -> GrpcServiceStatus {
    let mut status = prev.cloned().unwrap_or_default();
    status.observed_generation = generation;
    // (type, status, reason, message) for each maintained condition.
    let mut set =
        |ready: bool, conflict: bool, invalid: bool, etcd: bool, reason: &str, message: &str| {
            let flags = [ready, conflict, invalid, etcd];
            let conditions = CONDITIONS
                .iter()
                .zip(flags)
                .map(|(type_, on)| {
                    let value = if on { "True" } else { "False" };
                    let old = prev.and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_));
                    let (reason, message) = if on || *type_ == condition::READY {
                        (reason.to_owned(), message.to_owned())
                    } else {
                        (reason::AS_EXPECTED.to_owned(), String::new())
                    };
                    Condition {
                        type_: (*type_).to_owned(),
                        status: value.to_owned(),
                        reason,
                        message,
                        observed_generation: generation,
                        last_transition_time: old
                            .filter(|o| o.status == value)
                            .map_or_else(|| now.clone(), |o| o.last_transition_time.clone()),
                    }
                })
                .collect();
            status.conditions = conditions;
        };
    match outcome {
        Outcome::Synced {
            target,
            desired,
            report,
        } => {
            set(
                true,
                false,
                false,
                false,
                if desired.selected == 0 {
                    reason::NO_PODS_SELECTED
                } else if desired.skipped.values().any(|s| *s == Skip::PortNotFound) {
                    reason::PORT_NOT_FOUND
                } else {
                    reason::SYNCED
                },
                &synced_message(report.registered, desired),
            );
            status.target = Some((*target).to_owned());
            counts(&mut status, Some(desired));
            status.registered_endpoints = i32::try_from(report.registered).unwrap_or(i32::MAX);
            status.lease_id = Some(format!("{:x}", report.lease_id));
            if report.puts + report.deletes > 0 || status.etcd_revision.is_none() {
                status.etcd_revision = Some(report.revision);
                status.last_sync_time = Some(now.clone());
            }
        }
        Outcome::InvalidSpec { message } => {
            set(false, false, true, false, condition::INVALID_SPEC, message);
        }
        Outcome::Conflict { target, owner } => {
            set(
                false,
                true,
                false,
                false,
                condition::CONFLICT,
                &format!("target {target:?} is owned by GrpcService {owner}"),
            );
            status.target = None;
            status.registered_endpoints = 0;
            status.lease_id = None;
        }
        Outcome::EtcdUnavailable {
            target,
            message,
            desired,
        } => {
            set(
                false,
                false,
                false,
                true,
                condition::ETCD_UNAVAILABLE,
                message,
            );
            status.target = Some((*target).to_owned());
            counts(&mut status, *desired);
        }
    }
    status
}

/// "2 of 3 selected pods registered; not registered: 1 not ready", naming each reason.
fn synced_message(registered: usize, desired: &Desired) -> String {
    let mut message = format!(
        "{registered} of {} selected pods registered",
        desired.selected
    );
    if desired.selected == 0 {
        message.push_str(" (the selector matches no pod in this namespace)");
        return message;
    }
    let mut reasons: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for skip in desired.skipped.values() {
        let reason = match skip {
            Skip::NotRunning => "not running",
            Skip::NotReady => "not ready",
            Skip::NoPodIp => "no pod IP",
            Skip::Terminating => "terminating",
            Skip::PortNotFound => "no container port with the requested name",
        };
        *reasons.entry(reason).or_insert(0) += 1;
    }
    if !reasons.is_empty() {
        let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        message.push_str("; not registered: ");
        message.push_str(&parts.join(", "));
    }
    message
}

fn counts(status: &mut GrpcServiceStatus, desired: Option<&Desired>) {
    if let Some(d) = desired {
        status.selected_pods = i32::try_from(d.selected).unwrap_or(i32::MAX);
        status.ready_pods = i32::try_from(d.ready).unwrap_or(i32::MAX);
    }
}

/// The Kubernetes Event a status change deserves: one per change of the Ready condition's
/// status or reason (so a steady state, or counts moving under churn, emit nothing). Normal while Ready, Warning
/// otherwise; the reason is the condition's.
#[must_use]
pub fn event_for(
    prev: Option<&GrpcServiceStatus>,
    next: &GrpcServiceStatus,
) -> Option<kube::runtime::events::Event> {
    use kube::runtime::events::{Event, EventType};
    let ready = |s: &GrpcServiceStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .cloned()
    };
    let after = ready(next)?;
    let before = prev.and_then(ready);
    if before
        .as_ref()
        .is_some_and(|b| b.status == after.status && b.reason == after.reason)
    {
        return None;
    }
    Some(Event {
        type_: if after.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: after.reason,
        note: Some(after.message).filter(|m| !m.is_empty()),
        action: "Reconcile".to_owned(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn synced(puts: usize) -> GrpcServiceStatus {
        let desired = Desired {
            selected: 3,
            ready: 2,
            ..Desired::default()
        };
        let report = SyncReport {
            puts,
            registered: 2,
            revision: 42,
            lease_id: 255,
            ..SyncReport::default()
        };
        next_status(
            None,
            Some(1),
            &Outcome::Synced {
                target: "services/default/greeter",
                desired: &desired,
                report: &report,
            },
            &t(10),
        )
    }

    #[test]
    fn events_follow_changes_of_the_ready_condition_only() {
        use kube::runtime::events::EventType;
        let first = synced(2);
        let event = event_for(None, &first).expect("a first status is an event");
        assert_eq!(event.type_, EventType::Normal);
        assert_eq!(event.reason, "Synced");
        assert_eq!(
            event.note.as_deref(),
            Some("2 of 3 selected pods registered")
        );
        // Same condition (only the revision moved): no event.
        let mut again = first.clone();
        again.etcd_revision = Some(99);
        assert!(event_for(Some(&first), &again).is_none());
        let conflict = next_status(
            Some(&first),
            Some(1),
            &Outcome::Conflict {
                target: "services/default/greeter",
                owner: "other/greeter".into(),
            },
            &t(20),
        );
        let event = event_for(Some(&first), &conflict).unwrap();
        assert_eq!(
            (event.type_, event.reason.as_str()),
            (EventType::Warning, "Conflict")
        );
    }

    #[test]
    fn synced_status_reports_counts_lease_and_ready_condition() {
        let s = synced(2);
        assert_eq!(s.target.as_deref(), Some("services/default/greeter"));
        assert_eq!(
            (s.selected_pods, s.ready_pods, s.registered_endpoints),
            (3, 2, 2)
        );
        assert_eq!(s.lease_id.as_deref(), Some("ff"));
        assert_eq!(s.etcd_revision, Some(42));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(s.conditions.len(), 4);
    }

    #[test]
    fn unchanged_outcome_yields_an_equal_status_so_nothing_is_written() {
        let first = synced(2);
        let desired = Desired {
            selected: 3,
            ready: 2,
            ..Desired::default()
        };
        let report = SyncReport {
            registered: 2,
            revision: 99,
            lease_id: 255,
            ..SyncReport::default()
        };
        let again = next_status(
            Some(&first),
            Some(1),
            &Outcome::Synced {
                target: "services/default/greeter",
                desired: &desired,
                report: &report,
            },
            &t(500),
        );
        assert_eq!(again, first);
    }

    #[test]
    fn ready_message_names_why_selected_pods_are_not_registered() {
        let desired = Desired {
            selected: 3,
            ready: 2,
            skipped: [
                ("a".to_owned(), Skip::PortNotFound),
                ("b".to_owned(), Skip::NotReady),
            ]
            .into(),
            ..Desired::default()
        };
        let report = SyncReport {
            registered: 1,
            ..SyncReport::default()
        };
        let s = next_status(
            None,
            Some(1),
            &Outcome::Synced {
                target: "t",
                desired: &desired,
                report: &report,
            },
            &t(1),
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "PortNotFound");
        assert_eq!(
            ready.message,
            "1 of 3 selected pods registered; not registered: 1 no container port with the requested name, 1 not ready"
        );
    }

    #[test]
    fn a_selector_matching_nothing_says_so() {
        let report = SyncReport::default();
        let s = next_status(
            None,
            Some(1),
            &Outcome::Synced {
                target: "t",
                desired: &Desired::default(),
                report: &report,
            },
            &t(1),
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "NoPodsSelected");
        assert!(
            ready.message.contains("matches no pod"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn conflict_sets_conflict_true_and_ready_false_with_a_fresh_transition_time() {
        let first = synced(1);
        let s = next_status(
            Some(&first),
            Some(2),
            &Outcome::Conflict {
                target: "t",
                owner: "other/svc".into(),
            },
            &t(20),
        );
        let conflict = s.conditions.iter().find(|c| c.type_ == "Conflict").unwrap();
        assert_eq!(conflict.status, "True");
        assert!(conflict.message.contains("other/svc"));
        assert_eq!(conflict.last_transition_time, t(20));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(s.registered_endpoints, 0);
    }
}
