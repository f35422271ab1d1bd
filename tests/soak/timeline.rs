//! The soak's clock and its record: faults with the windows they open, workload events by kind,
//! and violations, so that a failure prints what happened around it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// What a fault takes away while its window is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Replica `n` cannot act (killed, terminated or stopped, until restarted and settled).
    Replica(usize),
    /// The registry etcd is unreachable from the replicas (killed or partitioned).
    Etcd,
    /// kube-apiserver is down (restarting).
    ApiServer,
    /// Replica `n` is cut off from kube-apiserver: it cannot lead, and its view goes stale.
    ApiCut(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub outage: Outage,
    pub from: f64,
    /// `None` while still open.
    pub to: Option<f64>,
}

#[derive(Default)]
struct Record {
    entries: Vec<(f64, String)>,
    windows: Vec<Window>,
    counts: BTreeMap<String, usize>,
    violations: Vec<(f64, String)>,
}

/// Shared by the workload, the nemesis and the checker.
pub struct Timeline {
    start: Instant,
    record: Mutex<Record>,
}

impl Timeline {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            record: Mutex::default(),
        }
    }

    /// Seconds since the soak started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.record.lock().expect("timeline lock"))
    }

    /// Counts one event of `kind` and keeps it in the timeline.
    pub fn event(&self, kind: &str, detail: impl Into<String>) {
        let at = self.now();
        let detail = detail.into();
        self.with(|r| {
            *r.counts.entry(kind.to_owned()).or_default() += 1;
            r.entries.push((at, format!("{kind}: {detail}")));
        });
    }

    /// Keeps a line in the timeline without counting it.
    pub fn note(&self, at: f64, detail: String) {
        self.with(|r| r.entries.push((at, detail)));
    }

    /// Opens an outage window now; returns its handle for [`Timeline::close`].
    pub fn open(&self, outage: Outage) -> usize {
        let from = self.now();
        self.with(|r| {
            r.windows.push(Window {
                outage,
                from,
                to: None,
            });
            r.windows.len() - 1
        })
    }

    /// Closes a window `settle` seconds from now (the time the component needs to act again).
    pub fn close(&self, id: usize, settle: f64) {
        let to = self.now() + settle;
        self.with(|r| r.windows[id].to = Some(to));
    }

    pub fn windows(&self) -> Vec<Window> {
        self.with(|r| r.windows.clone())
    }

    pub fn violation(&self, at: f64, what: String) {
        eprintln!("[{at:8.2}s] VIOLATION {what}");
        self.with(|r| r.violations.push((at, what)));
    }

    pub fn violations(&self) -> Vec<(f64, String)> {
        self.with(|r| r.violations.clone())
    }

    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.with(|r| r.counts.clone())
    }

    /// Every fault and violation, in order, with the workload events of the services a
    /// violation names (the others are counted, not listed: there are thousands).
    pub fn render(&self, fault_kinds: &[&str]) -> String {
        self.with(|r| {
            let implicated: Vec<String> = r
                .violations
                .iter()
                .flat_map(|(_, v)| services_named(v))
                .collect();
            let mut lines: Vec<(f64, String)> = r
                .entries
                .iter()
                .filter(|(_, e)| {
                    e.starts_with("lease expiry")
                        || fault_kinds.iter().any(|k| e.starts_with(k))
                        || implicated.iter().any(|s| {
                            e.split(": ").nth(1).and_then(|d| d.split(' ').next())
                                == Some(s.as_str())
                        })
                })
                .cloned()
                .chain(
                    r.violations
                        .iter()
                        .map(|(t, v)| (*t, format!("VIOLATION {v}"))),
                )
                .collect();
            lines.sort_by(|a, b| a.0.total_cmp(&b.0));
            lines
                .iter()
                .map(|(t, e)| format!("  [{t:8.2}s] {e}\n"))
                .collect()
        })
    }
}

/// The workload's service names (`svc-NN`) in a violation's text.
fn services_named(text: &str) -> Vec<String> {
    text.match_indices("svc-")
        .filter_map(|(i, _)| {
            let digits = text.get(i + 4..i + 6)?;
            digits
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| format!("svc-{digits}"))
        })
        .collect()
}
