//! ccm's event catalog (domain.md §8 "CloudEvents emitted" and "Consumed") and a factory that
//! stamps ccm's events with id, source, subject, time and `application/json`.
//!
//! The catalog names come from the design documents; where they are silent this crate
//! resolves (marked "ccm resolution" below):
//!
//! - An instance entering INSTANTIATING emits `ccm.lablet.instance.provisioning.started` (the
//!   documents' name for it), COLLECTING emits `.collecting.started`, GRADING
//!   `.grading.started`.
//! - Worker states the catalog does not name get `ccm.worker.<state in snake case>`:
//!   `starting`, `shutting_down`, `failed`, `unknown` (ccm resolution); DRAINING → RUNNING is
//!   `ccm.worker.drain.cancelled` (domain.md §8 resolution).
//! - Scaling: ScaleUp and RestartStopped are "up", Drain, Stop, ForceStop and Terminate are
//!   "down", each `requested` when decided and `completed` when done; a Wait decision is
//!   `ccm.scaling.wait` (ccm resolution: every decision produces an event, acceptance 17).

use chrono::{DateTime, Utc};
use serde_json::Value;

use ccm_core::autoscale::ScalingAction;
use ccm_core::model::{InstanceState, WorkerState};

use crate::{CloudEvent, JSON_CONTENT_TYPE};

/// Default `source` of the events ccm emits.
pub const DEFAULT_SOURCE: &str = "ccm/control-plane";

/// `ccm.lablet.definition.created{definition_id,name,version}`
pub const DEFINITION_CREATED: &str = "ccm.lablet.definition.created";
/// `ccm.lablet.definition.version.created{definition_id,old_version,new_version}`
pub const DEFINITION_VERSION_CREATED: &str = "ccm.lablet.definition.version.created";
/// `ccm.lablet.definition.deprecated`
pub const DEFINITION_DEPRECATED: &str = "ccm.lablet.definition.deprecated";

/// Instance entered PENDING.
pub const INSTANCE_PENDING: &str = "ccm.lablet.instance.pending";
/// Instance entered SCHEDULED.
pub const INSTANCE_SCHEDULED: &str = "ccm.lablet.instance.scheduled";
/// Instance entered INSTANTIATING.
pub const INSTANCE_PROVISIONING_STARTED: &str = "ccm.lablet.instance.provisioning.started";
/// Instance entered RUNNING.
pub const INSTANCE_RUNNING: &str = "ccm.lablet.instance.running";
/// Instance entered COLLECTING.
pub const INSTANCE_COLLECTING_STARTED: &str = "ccm.lablet.instance.collecting.started";
/// Instance entered GRADING.
pub const INSTANCE_GRADING_STARTED: &str = "ccm.lablet.instance.grading.started";
/// A grading result was recorded (not a state of its own).
pub const INSTANCE_GRADING_COMPLETED: &str = "ccm.lablet.instance.grading.completed";
/// Instance entered STOPPING.
pub const INSTANCE_STOPPING: &str = "ccm.lablet.instance.stopping";
/// Instance entered STOPPED.
pub const INSTANCE_STOPPED: &str = "ccm.lablet.instance.stopped";
/// Instance entered ARCHIVED.
pub const INSTANCE_ARCHIVED: &str = "ccm.lablet.instance.archived";
/// Instance entered TERMINATED.
pub const INSTANCE_TERMINATED: &str = "ccm.lablet.instance.terminated";

/// Worker entered PENDING.
pub const WORKER_PENDING: &str = "ccm.worker.pending";
/// Worker entered PROVISIONING.
pub const WORKER_PROVISIONING_STARTED: &str = "ccm.worker.provisioning.started";
/// Worker entered STARTING (ccm resolution).
pub const WORKER_STARTING: &str = "ccm.worker.starting";
/// Worker entered RUNNING.
pub const WORKER_RUNNING: &str = "ccm.worker.running";
/// Worker entered DRAINING.
pub const WORKER_DRAINING: &str = "ccm.worker.draining";
/// Worker went from DRAINING back to RUNNING.
pub const WORKER_DRAIN_CANCELLED: &str = "ccm.worker.drain.cancelled";
/// Worker entered STOPPING.
pub const WORKER_STOPPING: &str = "ccm.worker.stopping";
/// Worker entered STOPPED.
pub const WORKER_STOPPED: &str = "ccm.worker.stopped";
/// Worker entered SHUTTING_DOWN (ccm resolution).
pub const WORKER_SHUTTING_DOWN: &str = "ccm.worker.shutting_down";
/// Worker entered TERMINATED.
pub const WORKER_TERMINATED: &str = "ccm.worker.terminated";
/// Worker entered FAILED (ccm resolution).
pub const WORKER_FAILED: &str = "ccm.worker.failed";
/// Worker entered UNKNOWN (ccm resolution).
pub const WORKER_UNKNOWN: &str = "ccm.worker.unknown";

/// A scale-up was decided.
pub const SCALING_UP_REQUESTED: &str = "ccm.scaling.up.requested";
/// A scale-up finished (the worker is RUNNING).
pub const SCALING_UP_COMPLETED: &str = "ccm.scaling.up.completed";
/// A scale-down was decided.
pub const SCALING_DOWN_REQUESTED: &str = "ccm.scaling.down.requested";
/// A scale-down finished.
pub const SCALING_DOWN_COMPLETED: &str = "ccm.scaling.down.completed";
/// Demand waits (ccm resolution).
pub const SCALING_WAIT: &str = "ccm.scaling.wait";

/// Consumed: the assessment platform collected results → GRADING.
pub const ASSESSMENT_COLLECTION_COMPLETED: &str = "assessment.collection.completed";
/// Consumed: the grading engine graded → store the score, then STOPPING.
pub const ASSESSMENT_GRADING_COMPLETED: &str = "assessment.grading.completed";

/// The event type emitted when an instance enters `state`.
pub fn event_type_for_instance_state(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Pending => INSTANCE_PENDING,
        InstanceState::Scheduled => INSTANCE_SCHEDULED,
        InstanceState::Instantiating => INSTANCE_PROVISIONING_STARTED,
        InstanceState::Running => INSTANCE_RUNNING,
        InstanceState::Collecting => INSTANCE_COLLECTING_STARTED,
        InstanceState::Grading => INSTANCE_GRADING_STARTED,
        InstanceState::Stopping => INSTANCE_STOPPING,
        InstanceState::Stopped => INSTANCE_STOPPED,
        InstanceState::Archived => INSTANCE_ARCHIVED,
        InstanceState::Terminated => INSTANCE_TERMINATED,
    }
}

/// The event type emitted when a worker enters `state`.
pub fn event_type_for_worker_state(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Pending => WORKER_PENDING,
        WorkerState::Provisioning => WORKER_PROVISIONING_STARTED,
        WorkerState::Starting => WORKER_STARTING,
        WorkerState::Running => WORKER_RUNNING,
        WorkerState::Draining => WORKER_DRAINING,
        WorkerState::Stopping => WORKER_STOPPING,
        WorkerState::Stopped => WORKER_STOPPED,
        WorkerState::ShuttingDown => WORKER_SHUTTING_DOWN,
        WorkerState::Terminated => WORKER_TERMINATED,
        WorkerState::Failed => WORKER_FAILED,
        WorkerState::Unknown => WORKER_UNKNOWN,
    }
}

/// The event type of a worker transition: [`WORKER_DRAIN_CANCELLED`] for DRAINING → RUNNING,
/// otherwise that of the new state.
pub fn event_type_for_worker_transition(from: WorkerState, to: WorkerState) -> &'static str {
    if from == WorkerState::Draining && to == WorkerState::Running {
        WORKER_DRAIN_CANCELLED
    } else {
        event_type_for_worker_state(to)
    }
}

/// Whether a scaling action was decided or is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScalingPhase {
    /// The autoscaler decided it.
    Requested,
    /// The controller finished it.
    Completed,
}

/// The event type of a scaling decision in `phase` (a Wait is [`SCALING_WAIT`] in either).
pub fn event_type_for_scaling(action: ScalingAction, phase: ScalingPhase) -> &'static str {
    match (action, phase) {
        (ScalingAction::Wait, _) => SCALING_WAIT,
        (ScalingAction::ScaleUp | ScalingAction::RestartStopped, ScalingPhase::Requested) => {
            SCALING_UP_REQUESTED
        }
        (ScalingAction::ScaleUp | ScalingAction::RestartStopped, ScalingPhase::Completed) => {
            SCALING_UP_COMPLETED
        }
        (
            ScalingAction::Drain
            | ScalingAction::Stop
            | ScalingAction::ForceStop
            | ScalingAction::Terminate,
            ScalingPhase::Requested,
        ) => SCALING_DOWN_REQUESTED,
        (
            ScalingAction::Drain
            | ScalingAction::Stop
            | ScalingAction::ForceStop
            | ScalingAction::Terminate,
            ScalingPhase::Completed,
        ) => SCALING_DOWN_COMPLETED,
    }
}

/// Builds ccm's events: a fresh UUID v4 id, the configured `source`, `subject` = the resource
/// id, the given time (from the service's clock, so simulations stay on virtual time) and a
/// JSON payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFactory {
    source: String,
}

impl Default for EventFactory {
    fn default() -> Self {
        EventFactory::new(DEFAULT_SOURCE)
    }
}

impl EventFactory {
    /// A factory for events from `source` (e.g. [`DEFAULT_SOURCE`], `ccm/controller`).
    pub fn new(source: impl Into<String>) -> EventFactory {
        EventFactory {
            source: source.into(),
        }
    }

    /// The configured source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// An event of `event_type` about `subject` at `at` with a JSON payload.
    pub fn event(
        &self,
        event_type: &str,
        subject: &str,
        data: Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        let mut event =
            CloudEvent::new(uuid::Uuid::new_v4().to_string(), &*self.source, event_type)
                .with_subject(subject)
                .with_time(at);
        event.datacontenttype = Some(JSON_CONTENT_TYPE.to_owned());
        event.data = Some(crate::Data::Json(data));
        event
    }

    /// The event for instance `instance_id` entering `state`.
    pub fn instance_state(
        &self,
        instance_id: &str,
        state: InstanceState,
        data: Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        self.event(event_type_for_instance_state(state), instance_id, data, at)
    }

    /// The event for worker `worker_id` moving from `from` to `to`.
    pub fn worker_transition(
        &self,
        worker_id: &str,
        from: WorkerState,
        to: WorkerState,
        data: Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        self.event(
            event_type_for_worker_transition(from, to),
            worker_id,
            data,
            at,
        )
    }

    /// The event for a scaling decision about `subject` (the worker id, or the template name
    /// for a scale-up) in `phase`.
    pub fn scaling(
        &self,
        subject: &str,
        action: ScalingAction,
        phase: ScalingPhase,
        data: Value,
        at: DateTime<Utc>,
    ) -> CloudEvent {
        self.event(event_type_for_scaling(action, phase), subject, data, at)
    }
}
