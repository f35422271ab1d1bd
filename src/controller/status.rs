//! Building a `GrpcServiceStatus` from the outcome of a reconcile, and the Events a status
//! change deserves, purely.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::{Event, EventType};

use crate::crd::GrpcServiceStatus;
use crate::desired::{Desired, Skip};
use crate::registry::SyncReport;

/// Condition types.
pub use crate::crd::condition;

/// Condition and Event reasons.
pub mod reason {
    /// Ready: the registry equals the desired state, with at least one endpoint.
    pub const SYNCED: &str = "Synced";
    /// Ready is False: the selector matches no pod.
    pub const NO_PODS_SELECTED: &str = "NoPodsSelected";
    /// Ready is False: the Service's EndpointSlices list no endpoint (or there are none).
    pub const NO_ENDPOINTS: &str = "NoEndpoints";
    /// No selected pod has a port with the requested name (Ready False when none is
    /// registered because of it; True, with this reason, when only some pods lack it).
    pub const PORT_NOT_FOUND: &str = "PortNotFound";
    /// Ready stays True: two endpoints render to one key (two pods reporting one IP); the key is
    /// registered once, the other endpoint left out, and the rest follow readiness.
    pub const ENDPOINT_COLLISION: &str = "EndpointCollision";
    /// Ready is False: pods are selected, but none is registrable (not ready, not running, …).
    pub const NO_READY_ENDPOINTS: &str = "NoReadyEndpoints";
    /// Ready is False: another GrpcService owns the target.
    pub const CONFLICT: &str = "Conflict";
    /// Ready is False: the spec cannot be applied.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Ready is False: the registry backend could not be reached or refused the write.
    pub const BACKEND_UNAVAILABLE: &str = "BackendUnavailable";
    /// A condition that is False as expected.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Event: the backend is back and the registry was synced.
    pub const BACKEND_RESTORED: &str = "BackendRestored";
    /// Event: the number of registered endpoints changed.
    pub const ENDPOINTS_CHANGED: &str = "EndpointsChanged";
    /// Event: the lease holding the keys was lost and the keys were put on a new one.
    pub const LEASE_REPLACED: &str = "LeaseReplaced";
    /// Event: the service now publishes under another target.
    pub const TARGET_CHANGED: &str = "TargetChanged";
}

pub use crate::crd::CONDITIONS;

/// The last registry change made for a service: status carries its revision and time, also
/// when a later status write (a coalesced one) comes from a sync that wrote nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct LastChange {
    /// The revision of the write.
    pub revision: i64,
    /// When it was made.
    pub at: Time,
}

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
        /// The last sync of this service that changed the registry, if this process made one.
        last_change: Option<&'a LastChange>,
    },
    /// The spec cannot be applied.
    InvalidSpec {
        /// The reason, from [`crate::desired::SpecError`].
        message: String,
        /// The target, when the spec got as far as naming a valid one.
        target: Option<&'a str>,
        /// Counts, when the pods were evaluated.
        desired: Option<&'a Desired>,
        /// The last valid publication, as this reconcile synced it against the pods as they
        /// are now: status follows it (counts, registered endpoints, lease, revision) as it
        /// follows a valid spec's.
        kept: Option<Kept<'a>>,
    },
    /// Another GrpcService owns the target.
    Conflict {
        /// The contested target.
        target: &'a str,
        /// `namespace/name` of the owner.
        owner: String,
        /// Counts of what this service selects.
        desired: Option<&'a Desired>,
    },
    /// The backend could not be reached or refused the write.
    BackendUnavailable {
        /// The target the write was for.
        target: &'a str,
        /// The backend's name.
        backend: &'a str,
        /// The error, as a sentence.
        message: String,
        /// Counts, when the pods were evaluated before the failure.
        desired: Option<&'a Desired>,
    },
}

/// A sync of the last valid publication of a service whose spec is invalid.
#[derive(Clone, Copy, Debug)]
pub struct Kept<'a> {
    /// Its target.
    pub target: &'a str,
    /// Its desired state (the last valid spec against the pods as they are now).
    pub desired: &'a Desired,
    /// What the sync did.
    pub report: &'a SyncReport,
    /// The last sync of this service that changed the registry, if this process made one.
    pub last_change: Option<&'a LastChange>,
}

/// The next status, keeping `lastTransitionTime` of conditions whose status did not change and
/// the revision and sync time of the last registry change, so an unchanged outcome yields an
/// equal status and no write.
#[must_use]
pub fn next_status(
    prev: Option<&GrpcServiceStatus>,
    generation: Option<i64>,
    outcome: &Outcome<'_>,
    now: &Time,
) -> GrpcServiceStatus {
    let mut status = prev.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let (on, ready_reason, message) = match outcome {
        Outcome::Synced {
            target,
            desired,
            report,
            last_change,
        } => synced(&mut status, target, desired, report, *last_change, now),
        Outcome::InvalidSpec {
            message,
            target,
            desired,
            kept,
        } => {
            if let Some(kept) = kept {
                synced(
                    &mut status,
                    kept.target,
                    kept.desired,
                    kept.report,
                    kept.last_change,
                    now,
                );
            }
            let desired = if kept.is_some() { None } else { *desired };
            invalid_spec(&mut status, message, *target, desired)
        }
        Outcome::Conflict {
            target,
            owner,
            desired,
        } => {
            counts(&mut status, *desired);
            // The contested target stays visible (release is guarded by ownership, so a later
            // target change cannot free someone else's keys).
            status.target = Some((*target).to_owned());
            status.registered_endpoints = 0;
            status.lease_id = None;
            (
                Some(condition::CONFLICT),
                reason::CONFLICT,
                format!(
                    "target {target:?} is owned by GrpcService {owner}; nothing is published until it is freed (re-checked every 15 s) or the target changes"
                ),
            )
        }
        Outcome::BackendUnavailable {
            target,
            backend,
            message,
            desired,
        } => {
            status.target = Some((*target).to_owned());
            counts(&mut status, *desired);
            (
                Some(condition::BACKEND_UNAVAILABLE),
                reason::BACKEND_UNAVAILABLE,
                format!(
                    "{backend} unavailable: {message}; retrying with backoff, and the registered keys stay until their lease expires"
                ),
            )
        }
    };
    let ready = on.is_none()
        && ![reason::NO_PODS_SELECTED, reason::NO_ENDPOINTS].contains(&ready_reason)
        && status.registered_endpoints > 0;
    status.conditions = conditions(prev, generation, (on, ready), ready_reason, &message, now);
    status
}

/// What one outcome makes of a status: the condition it turns on (none: Ready's own), Ready's
/// reason, and the message.
type Verdict = (Option<&'static str>, &'static str, String);

/// A sync: target, counts, lease and the revision of the last change.
fn synced(
    status: &mut GrpcServiceStatus,
    target: &str,
    desired: &Desired,
    report: &SyncReport,
    last_change: Option<&LastChange>,
    now: &Time,
) -> Verdict {
    status.target = Some(target.to_owned());
    counts(status, Some(desired));
    status.registered_endpoints = clamp(report.registered);
    status.lease_id = report.lease.map(crate::registry::lease_text);
    // A status written before the rename has only the old name.
    let known = status.registry_revision.or(status.etcd_revision);
    let revision = match last_change {
        Some(change) => {
            status.last_sync_time = Some(change.at.clone());
            Some(change.revision)
        }
        None if known.is_none() => {
            status.last_sync_time = Some(now.clone());
            Some(report.revision)
        }
        None => known,
    };
    status.registry_revision = revision;
    status.etcd_revision = revision;
    let reason = synced_reason(report.registered, desired);
    (None, reason, synced_message(report.registered, desired))
}

/// An invalid spec: the counts when the pods were evaluated, and what stays published.
fn invalid_spec(
    status: &mut GrpcServiceStatus,
    message: &str,
    target: Option<&str>,
    desired: Option<&Desired>,
) -> Verdict {
    if let Some(target) = target {
        status.target = Some(target.to_owned());
    }
    counts(status, desired);
    let kept = match status.registered_endpoints {
        0 => String::new(),
        n => format!(
            "; the last valid spec stays published ({} registered, still following readiness) until it is fixed",
            endpoints(usize::try_from(n).unwrap_or(0))
        ),
    };
    (
        Some(condition::INVALID_SPEC),
        reason::INVALID_SPEC,
        format!("{message}{kept}"),
    )
}

/// Every condition: Ready (`ready`), the one turned on (`on`) with Ready's reason and the
/// message, the others False as expected; `lastTransitionTime` kept where the value did not
/// change.
fn conditions(
    prev: Option<&GrpcServiceStatus>,
    generation: Option<i64>,
    (on, ready): (Option<&str>, bool),
    ready_reason: &str,
    message: &str,
    now: &Time,
) -> Vec<Condition> {
    CONDITIONS
        .iter()
        .map(|type_| {
            let (value, reason, message) = if *type_ == condition::READY {
                (ready, ready_reason, message)
            } else if on == Some(*type_) {
                (true, ready_reason, message)
            } else {
                (false, reason::AS_EXPECTED, "")
            };
            let value = if value { "True" } else { "False" };
            let old = prev.and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_));
            Condition {
                type_: (*type_).to_owned(),
                status: value.to_owned(),
                reason: reason.to_owned(),
                message: message.to_owned(),
                observed_generation: generation,
                last_transition_time: old
                    .filter(|o| o.status == value)
                    .map_or_else(|| now.clone(), |o| o.last_transition_time.clone()),
            }
        })
        .collect()
}

fn clamp(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The Ready reason of a sync: `Synced` with endpoints (or `PortNotFound` when some selected
/// pods lack the port), else why there are none.
fn synced_reason(registered: usize, desired: &Desired) -> &'static str {
    let port_not_found = desired.skipped.values().any(|s| *s == Skip::PortNotFound);
    if desired.selected == 0 {
        if desired.service.is_some() {
            reason::NO_ENDPOINTS
        } else {
            reason::NO_PODS_SELECTED
        }
    } else if port_not_found {
        reason::PORT_NOT_FOUND
    } else if registered == 0 {
        reason::NO_READY_ENDPOINTS
    } else if !desired.collisions.is_empty() {
        reason::ENDPOINT_COLLISION
    } else {
        reason::SYNCED
    }
}

/// "2 of 3 selected pods registered; not registered: 1 not ready", naming each reason ("2 of 3
/// endpoints of Service greeter registered; …" for a `serviceRef`).
fn synced_message(registered: usize, desired: &Desired) -> String {
    let service = desired.service.as_deref();
    let mut message = match service {
        None => format!(
            "{registered} of {} selected pods registered",
            desired.selected
        ),
        Some(name) => format!(
            "{registered} of {} endpoints of Service {name} registered",
            desired.selected
        ),
    };
    if desired.selected == 0 {
        message.push_str(match service {
            None => " (the selector matches no pod in this namespace)",
            Some(_) => {
                " (its EndpointSlices list no endpoint: the Service has no ready or unready pods, \
                 has no selector and no hand-made slice, or does not exist in this namespace)"
            }
        });
        return message;
    }
    message.push_str(&not_registered(desired, service));
    message.push_str(&collisions(desired));
    message.push_str(&invalid_weights(desired));
    if let Some((port, n)) = desired.undeclared_port {
        message.push_str(&format!(
            "; port {port} is declared by no container of {} registered (registered anyway, as a Service's targetPort would be: check spec.port if that is a typo)",
            pods(n)
        ));
    }
    message.push_str(&ports_offered(desired, service));
    message
}

/// "; not registered: 1 not ready, 2 terminating", or nothing.
fn not_registered(desired: &Desired, service: Option<&str>) -> String {
    let mut reasons: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for skip in desired.skipped.values() {
        let reason = match (skip, service) {
            (Skip::NotRunning, None) => "not running",
            (Skip::NotRunning, Some(_)) => "not serving",
            (Skip::NotReady, _) => "not ready",
            (Skip::NoPodIp, None) => "no pod IP",
            (Skip::NoPodIp, Some(_)) => "no IP address",
            (Skip::Terminating, _) => "terminating",
            (Skip::PortNotFound, None) => "no container port with the requested name",
            (Skip::PortNotFound, Some(_)) => {
                "no EndpointSlice port with the requested name or number"
            }
            (Skip::Fqdn, _) => "an FQDN address (registries hold IP addresses)",
        };
        *reasons.entry(reason).or_insert(0) += 1;
    }
    if reasons.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("; not registered: {}", parts.join(", "))
}

/// The endpoints left out for colliding with another on one key (the first three named), or
/// nothing.
fn collisions(desired: &Desired) -> String {
    if desired.collisions.is_empty() {
        return String::new();
    }
    let n = desired.collisions.len();
    let some: Vec<String> = desired
        .collisions
        .iter()
        .take(3)
        .map(|c| {
            format!(
                "{} left out: it renders to {}, which {} holds",
                c.left_out, c.key, c.kept
            )
        })
        .collect();
    format!(
        "; {n} colliding with another endpoint ({}{}): two endpoints report one address (IP reuse, hostNetwork, a copied pod status)",
        some.join("; "),
        if n > 3 { "; …" } else { "" }
    )
}

/// The endpoints whose weight annotation is not a weight (the first three named), or nothing.
fn invalid_weights(desired: &Desired) -> String {
    if desired.invalid_weights.is_empty() {
        return String::new();
    }
    let n = desired.invalid_weights.len();
    let some: Vec<&str> = desired
        .invalid_weights
        .iter()
        .take(3)
        .map(String::as_str)
        .collect();
    format!(
        "; {n} with a {} annotation that is not an integer from 1 to 10000, published with the service's weight ({}{})",
        crate::desired::WEIGHT_ANNOTATION,
        some.join(", "),
        if n > 3 { ", …" } else { "" }
    )
}

/// " (ports offered: grpc=50051, 8080)" when the requested port was found nowhere, or nothing.
fn ports_offered(desired: &Desired, service: Option<&str>) -> String {
    if desired.ports_offered.is_empty() {
        return String::new();
    }
    let offered: Vec<String> = desired
        .ports_offered
        .iter()
        .map(|(name, number)| {
            if name.is_empty() {
                number.to_string()
            } else {
                format!("{name}={number}")
            }
        })
        .collect();
    let end = match service {
        None => ")",
        Some(_) => "; a number names the endpoints' port, not the Service's own)",
    };
    format!(" (ports offered: {}{end}", offered.join(", "))
}

fn counts(status: &mut GrpcServiceStatus, desired: Option<&Desired>) {
    if let Some(d) = desired {
        status.selected_endpoints = clamp(d.selected);
        status.ready_endpoints = clamp(d.ready);
    }
}

fn ready_condition(status: &GrpcServiceStatus) -> Option<&Condition> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
}

/// "1 endpoint", "3 endpoints".
fn endpoints(n: usize) -> String {
    format!("{n} endpoint{}", if n == 1 { "" } else { "s" })
}

/// "1 pod", "3 pods".
fn pods(n: usize) -> String {
    format!("{n} pod{}", if n == 1 { "" } else { "s" })
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note).filter(|n| !n.is_empty()),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}

/// The Events a status change deserves, apart from endpoint counts (see [`endpoints_event`]):
/// the Ready condition changing status or reason (Warning unless it is `Synced`; back from a
/// backend outage it is `BackendRestored`), the target changing, and the lease being replaced.
/// A status written again with the same condition emits nothing, so a steady state is silent.
#[must_use]
pub fn transition_events(prev: Option<&GrpcServiceStatus>, next: &GrpcServiceStatus) -> Vec<Event> {
    let mut events = Vec::new();
    let before = prev.and_then(ready_condition);
    if let Some(after) = ready_condition(next)
        && before.is_none_or(|b| b.status != after.status || b.reason != after.reason)
    {
        let restored = before.is_some_and(|b| b.reason == reason::BACKEND_UNAVAILABLE);
        if restored {
            events.push(event(
                EventType::Normal,
                reason::BACKEND_RESTORED,
                format!("registry reachable again; {}", after.message),
            ));
        }
        match (after.status.as_str(), after.reason.as_str()) {
            // Back to healthy after an outage: the restored Event said it.
            ("True", reason::SYNCED) if restored => {}
            ("True", reason::SYNCED) => {
                events.push(event(
                    EventType::Normal,
                    reason::SYNCED,
                    after.message.clone(),
                ));
            }
            (_, reason) => events.push(event(EventType::Warning, reason, after.message.clone())),
        }
    }
    let (Some(prev), Some(target)) = (prev, next.target.as_deref()) else {
        return events;
    };
    if let Some(old) = prev.target.as_deref()
        && old != target
    {
        events.push(event(
            EventType::Normal,
            reason::TARGET_CHANGED,
            format!(
                "target changed from {old:?} to {target:?}; the keys under {old:?} were deleted"
            ),
        ));
    }
    // Only where something was put again: a service with nothing registered lost nothing.
    if let (Some(old), Some(new)) = (prev.lease_id.as_deref(), next.lease_id.as_deref())
        && !same_lease(old, new)
        && next.registered_endpoints > 0
    {
        events.push(event(
            EventType::Warning,
            reason::LEASE_REPLACED,
            format!(
                "registry lease {old} was lost (expired or revoked, e.g. after a long registry outage); {} registered again under lease {new}",
                endpoints(usize::try_from(next.registered_endpoints).unwrap_or(0))
            ),
        ));
    }
    events
}

/// Whether two printed lease ids name one lease (a status written before ids were zero-padded
/// to 16 hex digits names the same lease without its leading zeros).
fn same_lease(a: &str, b: &str) -> bool {
    match (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The Event for registered endpoints moving from `before` to `after` while Ready stayed as it
/// was; the caller bounds how often it is sent.
#[must_use]
pub fn endpoints_event(before: usize, after: usize, desired: &Desired) -> Event {
    event(
        EventType::Normal,
        reason::ENDPOINTS_CHANGED,
        format!(
            "{} registered (was {before}); {} selected, {} ready",
            endpoints(after),
            match desired.service {
                None => pods(desired.selected),
                Some(_) => endpoints(desired.selected),
            },
            desired.ready
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn desired(selected: usize, ready: usize, skipped: &[(&str, Skip)]) -> Desired {
        Desired {
            selected,
            ready,
            skipped: skipped
                .iter()
                .map(|(id, s)| ((*id).to_owned(), *s))
                .collect(),
            ..Desired::default()
        }
    }

    fn report(registered: usize, lease_id: i64) -> SyncReport {
        SyncReport {
            registered,
            revision: 42,
            lease: Some(lease_id),
            ..SyncReport::default()
        }
    }

    fn synced_with(
        prev: Option<&GrpcServiceStatus>,
        desired: &Desired,
        report: &SyncReport,
        last_change: Option<&LastChange>,
        now: i64,
    ) -> GrpcServiceStatus {
        next_status(
            prev,
            Some(1),
            &Outcome::Synced {
                target: "services/default/greeter",
                desired,
                report,
                last_change,
            },
            &t(now),
        )
    }

    fn synced(registered: usize) -> GrpcServiceStatus {
        let change = LastChange {
            revision: 42,
            at: t(10),
        };
        synced_with(
            None,
            &desired(3, 2, &[("c", Skip::NotReady)]),
            &report(registered, 255),
            Some(&change),
            10,
        )
    }

    fn ready(s: &GrpcServiceStatus) -> &Condition {
        ready_condition(s).expect("a Ready condition")
    }

    #[test]
    fn synced_status_reports_counts_lease_revision_and_ready_true() {
        let s = synced(2);
        assert_eq!(s.target.as_deref(), Some("services/default/greeter"));
        assert_eq!(
            (
                s.selected_endpoints,
                s.ready_endpoints,
                s.registered_endpoints
            ),
            (3, 2, 2)
        );
        assert_eq!(s.lease_id.as_deref(), Some("00000000000000ff"));
        assert_eq!(s.registry_revision, Some(42));
        assert_eq!(s.etcd_revision, Some(42), "the deprecated name mirrors it");
        assert_eq!(s.last_sync_time, Some(t(10)));
        assert_eq!(
            (ready(&s).status.as_str(), ready(&s).reason.as_str()),
            ("True", "Synced")
        );
        assert_eq!(
            ready(&s).message,
            "2 of 3 selected pods registered; not registered: 1 not ready"
        );
        assert_eq!(s.conditions.len(), 4);
    }

    #[test]
    fn zero_registered_endpoints_is_ready_false_with_the_reason() {
        let cases = [
            (desired(0, 0, &[]), "NoPodsSelected", "matches no pod"),
            (
                desired(
                    3,
                    0,
                    &[
                        ("a", Skip::NotReady),
                        ("b", Skip::NotReady),
                        ("c", Skip::NotRunning),
                    ],
                ),
                "NoReadyEndpoints",
                "0 of 3 selected pods registered; not registered: 2 not ready, 1 not running",
            ),
            (
                desired(
                    2,
                    2,
                    &[("a", Skip::PortNotFound), ("b", Skip::PortNotFound)],
                ),
                "PortNotFound",
                "2 no container port with the requested name",
            ),
        ];
        for (want, reason, message) in cases {
            let s = synced_with(None, &want, &report(0, 1), None, 1);
            let c = ready(&s);
            assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason));
            assert!(c.message.contains(message), "{}", c.message);
            let events = transition_events(None, &s);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].type_, EventType::Warning);
            assert_eq!(events[0].reason, reason);
        }
    }

    #[test]
    fn some_pods_lacking_the_port_keep_ready_true_with_a_warning_reason() {
        let want = desired(2, 2, &[("a", Skip::PortNotFound)]);
        let s = synced_with(None, &want, &report(1, 1), None, 1);
        assert_eq!(
            (ready(&s).status.as_str(), ready(&s).reason.as_str()),
            ("True", "PortNotFound")
        );
        assert_eq!(transition_events(None, &s)[0].type_, EventType::Warning);
    }

    #[test]
    fn a_numeric_port_no_container_declares_stays_synced_with_a_hint_naming_the_declared_ports() {
        let mut want = desired(2, 2, &[]);
        want.undeclared_port = Some((50051, 2));
        want.ports_offered = [("grpc".to_owned(), 50061)].into();
        let s = synced_with(None, &want, &report(2, 1), None, 1);
        let c = ready(&s);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Synced"));
        assert_eq!(
            c.message,
            "2 of 2 selected pods registered; port 50051 is declared by no container of 2 pods registered (registered anyway, as a Service's targetPort would be: check spec.port if that is a typo) (ports offered: grpc=50061)"
        );
    }

    #[test]
    fn unchanged_outcome_yields_an_equal_status_so_nothing_is_written() {
        let first = synced(2);
        let mut again_report = report(2, 255);
        again_report.revision = 99;
        let again = synced_with(
            Some(&first),
            &desired(3, 2, &[("c", Skip::NotReady)]),
            &again_report,
            None,
            500,
        );
        assert_eq!(again, first);
        assert!(transition_events(Some(&first), &again).is_empty());
    }

    #[test]
    fn a_coalesced_write_carries_the_revision_and_time_of_the_last_registry_change() {
        let first = synced(2);
        // A burst: the registry changed at revision 50 (its status write deferred), and the
        // write that follows comes from a sync that changed nothing.
        let change = LastChange {
            revision: 50,
            at: t(11),
        };
        let later = synced_with(
            Some(&first),
            &desired(3, 3, &[]),
            &report(3, 255),
            Some(&change),
            12,
        );
        assert_eq!(later.registry_revision, Some(50));
        assert_eq!(later.last_sync_time, Some(t(11)));
        assert_eq!((later.ready_endpoints, later.registered_endpoints), (3, 3));
    }

    #[test]
    fn a_status_written_before_the_rename_keeps_its_revision_under_both_names() {
        let mut old = synced(2);
        old.registry_revision = None;
        old.etcd_revision = Some(7);
        let next = synced_with(Some(&old), &desired(2, 2, &[]), &report(2, 99), None, 12);
        assert_eq!(
            (next.registry_revision, next.etcd_revision),
            (Some(7), Some(7))
        );
    }

    #[test]
    fn conflict_keeps_the_contested_target_visible_and_ready_false() {
        let first = synced(1);
        let s = next_status(
            Some(&first),
            Some(2),
            &Outcome::Conflict {
                target: "services/default/greeter",
                owner: "other/svc".into(),
                desired: Some(&desired(3, 3, &[])),
            },
            &t(20),
        );
        let conflict = s.conditions.iter().find(|c| c.type_ == "Conflict").unwrap();
        assert_eq!(conflict.status, "True");
        assert!(conflict.message.contains("other/svc"));
        assert_eq!(conflict.last_transition_time, t(20));
        assert_eq!(
            (ready(&s).status.as_str(), ready(&s).reason.as_str()),
            ("False", "Conflict")
        );
        assert_eq!(s.target.as_deref(), Some("services/default/greeter"));
        assert_eq!(s.registered_endpoints, 0);
        assert_eq!(
            (s.selected_endpoints, s.ready_endpoints),
            (3, 3),
            "counts stay true"
        );
        let events = transition_events(Some(&first), &s);
        assert_eq!(
            (events[0].type_, events[0].reason.as_str()),
            (EventType::Warning, "Conflict")
        );
    }

    #[test]
    fn an_invalid_spec_says_what_stays_published() {
        let first = synced(2);
        let s = next_status(
            Some(&first),
            Some(2),
            &Outcome::InvalidSpec {
                message: "port \"grpc\" is not a valid port name".into(),
                target: None,
                desired: None,
                kept: None,
            },
            &t(20),
        );
        assert_eq!(ready(&s).reason, "InvalidSpec");
        assert!(
            ready(&s).message.ends_with(
                "the last valid spec stays published (2 endpoints registered, still following readiness) until it is fixed"
            ),
            "{}",
            ready(&s).message
        );
    }

    #[test]
    fn while_a_spec_is_invalid_status_follows_what_the_last_valid_spec_still_publishes() {
        let first = synced(2);
        let invalid = |kept: Option<Kept<'_>>| {
            next_status(
                Some(&first),
                Some(2),
                &Outcome::InvalidSpec {
                    message: "target is outside the namespace's prefix".into(),
                    target: Some("services/default/greeter"),
                    desired: None,
                    kept,
                },
                &t(20),
            )
        };
        let before = invalid(None);
        // A pod turns unready: the last valid spec's sync deletes its key.
        let change = LastChange {
            revision: 57,
            at: t(25),
        };
        let now = desired(3, 1, &[("b", Skip::NotReady), ("c", Skip::NotReady)]);
        let after = invalid(Some(Kept {
            target: "services/default/greeter",
            desired: &now,
            report: &SyncReport {
                registered: 1,
                revision: 57,
                lease: Some(255),
                deletes: 1,
                ..SyncReport::default()
            },
            last_change: Some(&change),
        }));
        assert_eq!(
            (after.registered_endpoints, after.ready_endpoints),
            (1, 1),
            "the counts follow the registry"
        );
        assert_eq!(after.registry_revision, Some(57));
        assert_eq!(after.last_sync_time, Some(t(25)));
        assert_eq!(ready(&after).reason, "InvalidSpec");
        assert!(
            ready(&after).message.contains("(1 endpoint registered"),
            "{}",
            ready(&after).message
        );
        assert!(
            transition_events(Some(&before), &after).is_empty(),
            "a count change while invalid is no transition"
        );
    }

    #[test]
    fn a_backend_outage_warns_and_its_end_is_reported_as_restored() {
        let first = synced(2);
        let down = next_status(
            Some(&first),
            Some(1),
            &Outcome::BackendUnavailable {
                target: "services/default/greeter",
                backend: "memory",
                message: "connection refused".into(),
                desired: None,
            },
            &t(20),
        );
        let c = down
            .conditions
            .iter()
            .find(|c| c.type_ == "BackendUnavailable")
            .unwrap();
        assert_eq!(c.status, "True");
        assert!(
            c.message
                .starts_with("memory unavailable: connection refused; retrying")
        );
        let events = transition_events(Some(&first), &down);
        assert_eq!(events[0].reason, "BackendUnavailable");
        let up = synced_with(
            Some(&down),
            &desired(3, 2, &[("c", Skip::NotReady)]),
            &report(2, 255),
            None,
            30,
        );
        let events = transition_events(Some(&down), &up);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].type_, events[0].reason.as_str()),
            (EventType::Normal, "BackendRestored")
        );
        // Back, but to a problem: restored, and the problem as a Warning.
        let empty = synced_with(Some(&down), &desired(0, 0, &[]), &report(0, 255), None, 30);
        let reasons: Vec<_> = transition_events(Some(&down), &empty)
            .into_iter()
            .map(|e| (e.type_, e.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (EventType::Normal, "BackendRestored".to_owned()),
                (EventType::Warning, "NoPodsSelected".to_owned())
            ]
        );
    }

    #[test]
    fn a_lease_id_printed_before_it_was_zero_padded_is_the_same_lease() {
        let first = synced(2);
        let mut before = first.clone();
        before.lease_id = Some("ff".into());
        assert!(transition_events(Some(&before), &first).is_empty());
        let mut other = first.clone();
        other.lease_id = Some("fe".into());
        assert_eq!(transition_events(Some(&other), &first).len(), 1);
    }

    #[test]
    fn a_replaced_lease_and_a_changed_target_are_events() {
        let first = synced(2);
        let mut replaced = first.clone();
        replaced.lease_id = Some("abc".into());
        replaced.target = Some("services/default/other".into());
        let events = transition_events(Some(&first), &replaced);
        let reasons: Vec<_> = events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["TargetChanged", "LeaseReplaced"]);
        assert!(
            events[1]
                .note
                .as_deref()
                .unwrap()
                .contains("lease 00000000000000ff was lost")
        );
        assert_eq!(events[1].type_, EventType::Warning);
    }

    #[test]
    fn endpoint_count_events_say_what_changed() {
        let e = endpoints_event(2, 3, &desired(3, 3, &[]));
        assert_eq!(e.reason, "EndpointsChanged");
        assert_eq!(
            e.note.as_deref(),
            Some("3 endpoints registered (was 2); 3 pods selected, 3 ready")
        );
        assert_eq!(
            endpoints_event(2, 1, &desired(1, 1, &[])).note.as_deref(),
            Some("1 endpoint registered (was 2); 1 pod selected, 1 ready")
        );
    }

    #[test]
    fn a_port_not_found_says_which_ports_are_offered_and_what_a_service_number_means() {
        let mut want = desired(
            2,
            2,
            &[("a", Skip::PortNotFound), ("b", Skip::PortNotFound)],
        );
        want.service = Some("hello".into());
        want.ports_offered = [("grpc".to_owned(), 50061), (String::new(), 8080)].into();
        let s = synced_with(None, &want, &report(0, 1), None, 1);
        assert_eq!(
            ready(&s).message,
            "0 of 2 endpoints of Service hello registered; not registered: 2 no EndpointSlice port \
             with the requested name or number (ports offered: 8080, grpc=50061; a number names \
             the endpoints' port, not the Service's own)"
        );
    }

    #[test]
    fn pods_with_a_weight_annotation_that_is_not_a_weight_are_named_in_the_ready_message() {
        let mut want = desired(5, 5, &[]);
        want.invalid_weights = ["a", "b", "c", "d"].map(String::from).into();
        let s = synced_with(None, &want, &report(5, 1), None, 5);
        assert_eq!(
            ready(&s).message,
            "5 of 5 selected pods registered; 4 with a grpc-registrar.io/weight annotation that \
             is not an integer from 1 to 10000, published with the service's weight (a, b, c, …)"
        );
    }
}
