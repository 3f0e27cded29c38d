//! What the reconcilers did last: the counters behind `GetControllerStatus`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ccm_proto::v1 as pb;
use chrono::{DateTime, Utc};

/// Reconciler name: instances.
pub const INSTANCES: &str = "instances";
/// Reconciler name: workers.
pub const WORKERS: &str = "workers";
/// Reconciler name: worker operations (licence, refresh, lab control).
pub const OPERATIONS: &str = "operations";
/// Reconciler name: the autoscaler.
pub const AUTOSCALER: &str = "autoscaler";
/// Every reconciler, in report order.
pub const RECONCILERS: [&str; 4] = [INSTANCES, WORKERS, OPERATIONS, AUTOSCALER];

/// Outcome of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do.
    Noop,
    /// Acted.
    Acted,
    /// Failed.
    Error,
    /// Skipped.
    Skipped,
}

impl Outcome {
    fn proto(self) -> pb::ReconcileOutcome {
        match self {
            Outcome::Noop => pb::ReconcileOutcome::Noop,
            Outcome::Acted => pb::ReconcileOutcome::Acted,
            Outcome::Error => pb::ReconcileOutcome::Error,
            Outcome::Skipped => pb::ReconcileOutcome::Skipped,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Entry {
    last_run_at: Option<DateTime<Utc>>,
    last_reason: String,
    last_target_id: String,
    last_outcome: Option<Outcome>,
    last_duration: Duration,
    last_error: String,
    next_run_at: Option<DateTime<Utc>>,
    runs_total: i64,
    errors_total: i64,
    queue_depth: i32,
}

/// The fleet summary and halt state the last passes computed.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// The summary.
    pub summary: pb::FleetSummary,
}

/// Shared status of every reconciler. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BoardInner>>,
}

#[derive(Debug, Default)]
struct BoardInner {
    entries: BTreeMap<&'static str, Entry>,
    fleet: FleetView,
}

/// One finished run, as recorded.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    /// Reconciler name.
    pub name: &'static str,
    /// Why it ran.
    pub reason: &'a str,
    /// Target id, if the run was about one object.
    pub target: &'a str,
    /// When it started.
    pub at: DateTime<Utc>,
    /// How long it took.
    pub took: Duration,
    /// Outcome.
    pub outcome: Outcome,
    /// Error message, when it failed.
    pub error: Option<String>,
    /// Objects it looked at.
    pub queue_depth: usize,
    /// When it runs next at the latest.
    pub next_run_at: Option<DateTime<Utc>>,
}

impl StatusBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoardInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a finished run.
    pub fn record(&self, run: Run<'_>) {
        let mut inner = self.lock();
        let e = inner.entries.entry(run.name).or_default();
        e.last_run_at = Some(run.at);
        e.last_reason = run.reason.to_owned();
        e.last_target_id = run.target.to_owned();
        e.last_outcome = Some(run.outcome);
        e.last_duration = run.took;
        e.runs_total += 1;
        if let Some(err) = run.error {
            e.errors_total += 1;
            e.last_error = err;
        }
        e.queue_depth = i32::try_from(run.queue_depth).unwrap_or(i32::MAX);
        e.next_run_at = run.next_run_at;
    }

    /// Forgets the counters (a new leadership term starts from zero).
    pub fn reset(&self) {
        self.lock().entries.clear();
    }

    /// Stores the fleet summary of the last pass.
    pub fn set_fleet(&self, summary: pb::FleetSummary) {
        self.lock().fleet = FleetView { summary };
    }

    /// The fleet summary of the last pass.
    pub fn fleet(&self) -> pb::FleetSummary {
        self.lock().fleet.summary.clone()
    }

    /// Runs (total, errors) of one reconciler.
    pub fn counts(&self, name: &str) -> (i64, i64) {
        self.lock()
            .entries
            .get(name)
            .map_or((0, 0), |e| (e.runs_total, e.errors_total))
    }

    /// Every reconciler's status, in [`RECONCILERS`] order.
    pub fn reconcilers(&self) -> Vec<pb::ReconcilerStatus> {
        let inner = self.lock();
        RECONCILERS
            .iter()
            .map(|name| {
                let e = inner.entries.get(name).cloned().unwrap_or_default();
                pb::ReconcilerStatus {
                    name: (*name).to_owned(),
                    last_run_at: e.last_run_at.map(ts),
                    last_reason: e.last_reason,
                    last_target_id: e.last_target_id,
                    last_outcome: e.last_outcome.map_or(0, |o| o.proto() as i32),
                    last_duration: Some(prost_types::Duration {
                        seconds: i64::try_from(e.last_duration.as_secs()).unwrap_or(i64::MAX),
                        nanos: i32::try_from(e.last_duration.subsec_nanos()).unwrap_or(0),
                    }),
                    last_error: e.last_error,
                    next_run_at: e.next_run_at.map(ts),
                    runs_total: e.runs_total,
                    errors_total: e.errors_total,
                    queue_depth: e.queue_depth,
                }
            })
            .collect()
    }
}

/// A timestamp as proto.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    ccm_control_plane::convert::timestamp_to_proto(t)
}
