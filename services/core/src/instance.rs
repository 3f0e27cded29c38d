//! The lablet instance state machine (domain.md §2.1, resolutions §11.1–§11.3 and §11.18).
//!
//! Two layers:
//!
//! * [`check_instance_transition`] is the pure rule: may an instance move from one state to
//!   another, given an [`InstanceTransitionContext`] (a normal move, an instantiation retry
//!   record, or a system/admin force-terminate)? The allowed normal moves are exactly the table of
//!   domain.md §2.1 (the table, not the diagram: §11.1), listed by [`allowed_next_states`].
//! * Methods on [`LabletInstance`] apply one transition, set the fields that go with it
//!   (`worker_id`, `allocated_ports`, `scheduled_at`, `cml_lab_id`, `started_at`, `grading_score`,
//!   `retry_count`, `terminated_at`) and append a [`StateTransition`] with from / to / at / reason /
//!   actor to `state_history`. Every method checks everything before it changes anything, so on
//!   error the instance is left exactly as it was.
//!
//! Time never comes from a system clock: every method takes the instant (`at`) of the change and
//! [`due_actions`] takes `now`, which the services read from their [`crate::clock::Clock`].
//!
//! # Who releases ports and capacity
//!
//! Ports are allocated by the control plane's placement commit (the store transaction that calls
//! [`LabletInstance::schedule`] also takes them from the worker's [`crate::ports::PortAllocator`]).
//! They are released by **the store commit of the transition to TERMINATED**, through the same port
//! allocator, in the same transaction — not by this module. [`LabletInstance::terminate`] and
//! [`LabletInstance::force_terminate`] deliberately keep `worker_id` and `allocated_ports` on the
//! record, so the history and the UI still show what the instance held; anything that counts what a
//! worker holds must filter with [`InstanceState::holds_resources`] (false for TERMINATED), never on
//! "has ports". The same commit releases the capacity booking. After TERMINATED the controller wipes
//! any CML lab still named by `cml_lab_id` (a force-terminated RUNNING instance still has one).
//!
//! # Deleting an instance
//!
//! §11.2: a user DELETE of a live lab (RUNNING, COLLECTING, GRADING) does not terminate at once: it
//! starts the STOPPING → STOPPED → ARCHIVED → TERMINATED chain, marked with the reason
//! [`REASON_DELETE_REQUESTED`] so that [`due_actions`] keeps tearing it down. System and admin
//! actors may force-terminate from any non-terminal state. [`terminate_plan`] says which applies;
//! [`LabletInstance::request_delete`] carries it out.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use crate::defaults::MAX_INSTANTIATION_RETRIES;
use crate::error::{CoreError, CoreResult};
use crate::model::{
    Actor, GradingScore, InstanceState, LabletInstance, StateTransition, TimeSlot, WorkerState,
};

// ---------------------------------------------------------------------------------------------
// Reasons recorded in the state history
// ---------------------------------------------------------------------------------------------

/// PENDING → SCHEDULED: a placement was committed.
pub const REASON_SCHEDULED: &str = "scheduled";
/// SCHEDULED → INSTANTIATING: the instantiation lead was reached (or the booking is ASAP).
pub const REASON_INSTANTIATION_DUE: &str = "instantiation_due";
/// Prefix of the INSTANTIATING → INSTANTIATING retry record (§11.3).
pub const REASON_INSTANTIATION_RETRY: &str = "instantiation_retry";
/// INSTANTIATING → TERMINATED after [`MAX_INSTANTIATION_RETRIES`] failed attempts.
pub const REASON_MAX_RETRIES_EXCEEDED: &str = "max_retries_exceeded";
/// INSTANTIATING → TERMINATED because the worker left RUNNING/DRAINING during the retries (§2.2).
pub const REASON_WORKER_STOPPED_DURING_RETRY: &str = "worker_stopped_during_retry";
/// INSTANTIATING → RUNNING: the CML lab was imported and started.
pub const REASON_LAB_STARTED: &str = "lab_started";
/// The time slot ended (RUNNING → COLLECTING or STOPPING, STOPPED → ARCHIVED).
pub const REASON_TIMESLOT_END: &str = "timeslot_end";
/// A person asked for it (collect or stop through the API).
pub const REASON_MANUAL: &str = "manual";
/// RUNNING → COLLECTING because the assessment platform asked.
pub const REASON_ASSESSMENT_REQUEST: &str = "assessment_request";
/// COLLECTING → GRADING on `assessment.collection.completed`.
pub const REASON_COLLECTION_COMPLETED: &str = "collection_completed";
/// GRADING → STOPPING on `assessment.grading.completed` (score stored).
pub const REASON_GRADING_COMPLETED: &str = "grading_completed";
/// STOPPING → STOPPED: the CML lab stop was confirmed.
pub const REASON_LAB_STOPPED: &str = "lab_stopped";
/// STOPPED → RUNNING through `Start`.
pub const REASON_RESTARTED: &str = "restarted";
/// ARCHIVED → TERMINATED: the controller's cleanup wiped the lab.
pub const REASON_CLEANUP: &str = "cleanup";
/// PENDING or SCHEDULED → TERMINATED: the time slot ended before the lab ever ran.
pub const REASON_EXPIRED: &str = "expired";
/// PENDING, SCHEDULED or INSTANTIATING → TERMINATED by a DELETE before the lab ran.
pub const REASON_CANCELLED: &str = "cancelled";
/// Terminated by a DELETE (after the lab ran, or by a system/admin force-terminate).
pub const REASON_DELETED: &str = "deleted";
/// A user DELETE of a live or stopped lab: STOPPING / ARCHIVED first, then the chain runs on.
pub const REASON_DELETE_REQUESTED: &str = "delete_requested";
/// Force-terminated because its worker is gone (orphan, §6 instance reconciler).
pub const REASON_WORKER_GONE: &str = "worker_gone";
/// Force-terminated because its DRAINING worker hit the drain timeout (§6 FORCE_STOP).
pub const REASON_DRAIN_TIMEOUT: &str = "drain_timeout";

// ---------------------------------------------------------------------------------------------
// The pure rule
// ---------------------------------------------------------------------------------------------

/// What kind of move is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InstanceTransitionKind {
    /// An edge of the §2.1 table.
    #[default]
    Normal,
    /// The INSTANTIATING → INSTANTIATING record of a failed attempt that will be retried (§11.3).
    /// The only self-transition there is.
    Retry,
    /// A system/admin terminate from any non-terminal state (§11.2).
    ForceTerminate,
}

/// The circumstances of a transition that the rule needs besides the two states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InstanceTransitionContext {
    /// Normal edge, retry record or force-terminate.
    pub kind: InstanceTransitionKind,
    /// The actor is the system (scheduler, controller, control plane) or an admin.
    pub privileged: bool,
}

impl InstanceTransitionContext {
    /// A normal edge of the table; who asks does not matter.
    pub const NORMAL: Self = Self {
        kind: InstanceTransitionKind::Normal,
        privileged: false,
    };
    /// The retry record inside INSTANTIATING (always written by the system).
    pub const RETRY: Self = Self {
        kind: InstanceTransitionKind::Retry,
        privileged: true,
    };

    /// A force-terminate; allowed only when `privileged` (system or admin).
    pub const fn force_terminate(privileged: bool) -> Self {
        Self {
            kind: InstanceTransitionKind::ForceTerminate,
            privileged,
        }
    }
}

/// The normal next states of `from`: the table of domain.md §2.1, in lifecycle order.
///
/// Not listed, because they need a context: the INSTANTIATING self-edge of a retry record, and
/// TERMINATED from every non-terminal state by a system/admin force-terminate (§11.2).
pub fn allowed_next_states(from: InstanceState) -> &'static [InstanceState] {
    use InstanceState::*;
    match from {
        Pending => &[Scheduled, Terminated],
        Scheduled => &[Instantiating, Terminated],
        Instantiating => &[Running, Terminated],
        Running => &[Collecting, Stopping],
        Collecting => &[Grading, Stopping],
        Grading => &[Stopping],
        Stopping => &[Stopped],
        Stopped => &[Running, Archived],
        Archived => &[Terminated],
        Terminated => &[],
    }
}

/// May an instance move from `from` to `to` in context `ctx`?
///
/// * TERMINATED is terminal: nothing leaves it.
/// * [`InstanceTransitionKind::Normal`]: exactly the edges of [`allowed_next_states`];
///   self-transitions are refused.
/// * [`InstanceTransitionKind::Retry`]: only INSTANTIATING → INSTANTIATING.
/// * [`InstanceTransitionKind::ForceTerminate`]: any non-terminal state → TERMINATED, when
///   `ctx.privileged`.
///
/// Refusals are [`CoreError::InvalidInstanceTransition`] with the reason in words.
pub fn check_instance_transition(
    from: InstanceState,
    to: InstanceState,
    ctx: &InstanceTransitionContext,
) -> CoreResult<()> {
    if from.is_terminal() {
        return Err(refuse(from, to, "TERMINATED is terminal"));
    }
    match ctx.kind {
        InstanceTransitionKind::Retry => {
            if from == InstanceState::Instantiating && to == InstanceState::Instantiating {
                Ok(())
            } else {
                Err(refuse(
                    from,
                    to,
                    "a retry record stays inside INSTANTIATING",
                ))
            }
        }
        InstanceTransitionKind::ForceTerminate => {
            if !ctx.privileged {
                Err(refuse(
                    from,
                    to,
                    "force-terminate is for system or admin actors",
                ))
            } else if to != InstanceState::Terminated {
                Err(refuse(from, to, "force-terminate only leads to TERMINATED"))
            } else {
                Ok(())
            }
        }
        InstanceTransitionKind::Normal => {
            if from == to {
                Err(refuse(from, to, "self-transitions are refused"))
            } else if allowed_next_states(from).contains(&to) {
                Ok(())
            } else if to == InstanceState::Terminated {
                Err(refuse(
                    from,
                    to,
                    "not a transition of the instance lifecycle: stop the lab first, or force-terminate as \
                     system/admin",
                ))
            } else {
                Err(refuse(
                    from,
                    to,
                    "not a transition of the instance lifecycle",
                ))
            }
        }
    }
}

fn refuse(from: InstanceState, to: InstanceState, why: impl Into<String>) -> CoreError {
    CoreError::InvalidInstanceTransition {
        from,
        to,
        why: why.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// DELETE
// ---------------------------------------------------------------------------------------------

/// What a DELETE of an instance must do, given its state and who asks (domain.md §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminatePlan {
    /// Already TERMINATED: nothing to do (a repeated DELETE is a no-op).
    AlreadyTerminated,
    /// Move to TERMINATED now: [`LabletInstance::terminate`] for a table edge (PENDING,
    /// SCHEDULED, INSTANTIATING, ARCHIVED), [`LabletInstance::force_terminate`] for system/admin.
    TerminateNow,
    /// A lab is live (RUNNING, COLLECTING, GRADING) and a user asks: move to STOPPING with reason
    /// [`REASON_DELETE_REQUESTED`]; the controller then drives STOPPED → ARCHIVED → TERMINATED.
    StopFirst,
    /// STOPPED and a user asks: move to ARCHIVED with reason [`REASON_DELETE_REQUESTED`]; the
    /// controller's cleanup then terminates it.
    ArchiveFirst,
    /// STOPPING and a user asks: the lab is already being stopped and nothing can be recorded
    /// now; the DELETE is refused as "retry once STOPPED" (FAILED_PRECONDITION). A stop that was
    /// itself a delete ([`REASON_DELETE_REQUESTED`]) continues to TERMINATED on its own.
    AwaitStopped,
}

/// What a DELETE of an instance in `state` must do.
///
/// `by_admin_or_system`: the actor is an admin or the system, who may force-terminate from any
/// non-terminal state. A user (the owner) may terminate only along the table's edges and otherwise
/// starts the teardown chain.
pub fn terminate_plan(state: InstanceState, by_admin_or_system: bool) -> TerminatePlan {
    use InstanceState::*;
    match state {
        Terminated => TerminatePlan::AlreadyTerminated,
        _ if by_admin_or_system => TerminatePlan::TerminateNow,
        Pending | Scheduled | Instantiating | Archived => TerminatePlan::TerminateNow,
        Running | Collecting | Grading => TerminatePlan::StopFirst,
        Stopped => TerminatePlan::ArchiveFirst,
        Stopping => TerminatePlan::AwaitStopped,
    }
}

// ---------------------------------------------------------------------------------------------
// Time-driven moves
// ---------------------------------------------------------------------------------------------

/// The state a RUNNING instance moves to when its time slot ends (§11.18): COLLECTING when its
/// definition has grading rules, STOPPING otherwise.
pub fn slot_end_action(def_has_grading_rules: bool) -> InstanceState {
    if def_has_grading_rules {
        InstanceState::Collecting
    } else {
        InstanceState::Stopping
    }
}

/// When a SCHEDULED instance must start instantiating: `timeslot.start − lead`, or the slot start
/// itself for ASAP bookings (they have no lead and are due at once).
pub fn instantiation_due_at(slot: &TimeSlot, instantiation_lead: Duration) -> DateTime<Utc> {
    slot.booking_window(instantiation_lead).start
}

/// A time-driven move that is due for an instance (see [`due_actions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DueAction {
    /// SCHEDULED → INSTANTIATING: the instantiation lead is reached, or the booking is ASAP.
    /// The scheduler moves it (§11.6).
    Instantiate,
    /// RUNNING → COLLECTING at slot end: the definition has grading rules (§11.18).
    Collect,
    /// RUNNING → STOPPING at slot end: no grading rules (§11.18).
    Stop,
    /// PENDING or SCHEDULED → TERMINATED: the slot ended before the lab ran (reason
    /// [`REASON_EXPIRED`]).
    Expire,
    /// STOPPED → ARCHIVED: the slot ended, or a DELETE asked for teardown.
    Archive,
    /// ARCHIVED → TERMINATED: the controller's cleanup, at once.
    Cleanup,
}

impl DueAction {
    /// The state the action leads to.
    pub fn target(self) -> InstanceState {
        match self {
            DueAction::Instantiate => InstanceState::Instantiating,
            DueAction::Collect => InstanceState::Collecting,
            DueAction::Stop => InstanceState::Stopping,
            DueAction::Expire | DueAction::Cleanup => InstanceState::Terminated,
            DueAction::Archive => InstanceState::Archived,
        }
    }
}

/// Which time-driven move, if any, is due for `instance` at `now`.
///
/// * PENDING at/after `timeslot.end` → [`DueAction::Expire`].
/// * SCHEDULED at/after `timeslot.end` → [`DueAction::Expire`]; otherwise at/after
///   [`instantiation_due_at`] (ASAP: at once) → [`DueAction::Instantiate`].
/// * RUNNING at/after `timeslot.end` → [`DueAction::Collect`] if `has_grading`, else
///   [`DueAction::Stop`] ([`slot_end_action`]).
/// * STOPPED at/after `timeslot.end`, or after a user DELETE → [`DueAction::Archive`].
/// * ARCHIVED → [`DueAction::Cleanup`].
/// * Otherwise nothing: INSTANTIATING, COLLECTING, GRADING and STOPPING wait for the controller
///   or the assessment platform (their time-outs are the controller's), TERMINATED is final.
///
/// The slot is half-open `[start, end)`: at exactly `end` the slot is over.
pub fn due_actions(
    instance: &LabletInstance,
    now: DateTime<Utc>,
    instantiation_lead: Duration,
    has_grading: bool,
) -> Option<DueAction> {
    let ended = now >= instance.timeslot.end;
    match instance.state {
        InstanceState::Pending if ended => Some(DueAction::Expire),
        InstanceState::Scheduled if ended => Some(DueAction::Expire),
        InstanceState::Scheduled
            if now >= instantiation_due_at(&instance.timeslot, instantiation_lead) =>
        {
            Some(DueAction::Instantiate)
        }
        InstanceState::Running if ended => Some(match slot_end_action(has_grading) {
            InstanceState::Collecting => DueAction::Collect,
            _ => DueAction::Stop,
        }),
        InstanceState::Stopped if ended || instance.deletion_requested() => {
            Some(DueAction::Archive)
        }
        InstanceState::Archived => Some(DueAction::Cleanup),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// What happens after a failed instantiation attempt (§11.3, §2.2 rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOutcome {
    /// The instance stays INSTANTIATING on the same worker; try again. `attempt` is the number of
    /// the attempt about to be made (2 after the first failure, 1-based).
    Retry {
        /// Number of the next attempt.
        attempt: u32,
    },
    /// The instance was moved to TERMINATED with `reason` ([`REASON_MAX_RETRIES_EXCEEDED`] or
    /// [`REASON_WORKER_STOPPED_DURING_RETRY`]).
    GiveUp {
        /// The reason recorded.
        reason: &'static str,
    },
}

/// Whether a worker in `state` may take another instantiation attempt: RUNNING or DRAINING
/// (a DRAINING worker still retries its own instances, domain.md §2.2).
pub fn worker_can_retry(state: WorkerState) -> bool {
    matches!(state, WorkerState::Running | WorkerState::Draining)
}

// ---------------------------------------------------------------------------------------------
// Applying transitions
// ---------------------------------------------------------------------------------------------

fn require_reason(reason: &str) -> CoreResult<String> {
    let r = reason.trim();
    if r.is_empty() {
        Err(CoreError::invalid("reason", "a transition needs a reason"))
    } else {
        Ok(r.to_owned())
    }
}

impl LabletInstance {
    /// When the instance entered its current state (creation time if never transitioned).
    pub fn state_since(&self) -> DateTime<Utc> {
        self.state_history
            .last()
            .map(|t| t.at)
            .unwrap_or(self.created_at)
    }

    /// `true` once a user DELETE started the teardown chain ([`REASON_DELETE_REQUESTED`]).
    pub fn deletion_requested(&self) -> bool {
        self.state_history
            .iter()
            .any(|t| t.reason == REASON_DELETE_REQUESTED)
    }

    /// Refuses unless the instance is in one of `from`, naming the method's target `to`.
    fn require_from(
        &self,
        from: &[InstanceState],
        to: InstanceState,
        what: &str,
    ) -> CoreResult<()> {
        if from.contains(&self.state) {
            Ok(())
        } else {
            let names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
            Err(refuse(
                self.state,
                to,
                format!("{what} requires {}", names.join(" or ")),
            ))
        }
    }

    /// Checks the rule and, only if it passes, records the transition and sets the state.
    fn apply(
        &mut self,
        to: InstanceState,
        ctx: InstanceTransitionContext,
        reason: String,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        check_instance_transition(self.state, to, &ctx)?;
        self.state_history.push(StateTransition {
            from: Some(self.state),
            to,
            at,
            reason,
            actor: actor.clone(),
        });
        self.state = to;
        Ok(())
    }

    /// PENDING → SCHEDULED: the placement commit. Sets `worker_id`, `allocated_ports` and
    /// `scheduled_at`.
    ///
    /// The ports come from the worker's [`crate::ports::PortAllocator`] in the same store
    /// transaction. `worker_id` must not be empty and no port number may appear twice.
    pub fn schedule(
        &mut self,
        worker_id: impl Into<String>,
        ports: BTreeMap<String, u16>,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let to = InstanceState::Scheduled;
        self.require_from(&[InstanceState::Pending], to, "schedule")?;
        let worker_id = worker_id.into();
        if worker_id.trim().is_empty() {
            return Err(CoreError::invalid("worker_id", "must not be empty"));
        }
        let mut seen = BTreeSet::new();
        for (name, port) in &ports {
            if !seen.insert(*port) {
                return Err(CoreError::invalid(
                    "allocated_ports",
                    format!("port {port} is given twice (again for {name:?})"),
                ));
            }
        }
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_SCHEDULED.into(),
            at,
            actor,
        )?;
        self.worker_id = Some(worker_id);
        self.allocated_ports = ports;
        self.scheduled_at = Some(at);
        Ok(())
    }

    /// SCHEDULED → INSTANTIATING: the instantiation lead is reached ([`due_actions`] says
    /// [`DueAction::Instantiate`]). The scheduler moves it; the controller then does the work.
    pub fn begin_instantiation(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Instantiating;
        self.require_from(&[InstanceState::Scheduled], to, "begin_instantiation")?;
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_INSTANTIATION_DUE.into(),
            at,
            actor,
        )
    }

    /// Records a failed instantiation attempt (§11.3): increments `retry_count`, then either
    /// stays in INSTANTIATING with a retry record ([`RetryOutcome::Retry`]) or moves to
    /// TERMINATED ([`RetryOutcome::GiveUp`], `terminated_at` set).
    ///
    /// It gives up when `retry_count` reaches [`MAX_INSTANTIATION_RETRIES`] (the third failure,
    /// reason [`REASON_MAX_RETRIES_EXCEEDED`]), or at once when the worker can no longer take a
    /// retry ([`worker_can_retry`] is false for `worker_state`; reason
    /// [`REASON_WORKER_STOPPED_DURING_RETRY`]). The retry record's reason is
    /// `instantiation_retry: attempt N/3 failed: <reason>`.
    pub fn record_instantiation_failure(
        &mut self,
        reason: &str,
        worker_state: WorkerState,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<RetryOutcome> {
        self.require_from(
            &[InstanceState::Instantiating],
            InstanceState::Instantiating,
            "an instantiation failure",
        )?;
        let cause = require_reason(reason)?;
        let failures = self.retry_count.saturating_add(1);
        let give_up = if failures >= MAX_INSTANTIATION_RETRIES {
            Some(REASON_MAX_RETRIES_EXCEEDED)
        } else if !worker_can_retry(worker_state) {
            Some(REASON_WORKER_STOPPED_DURING_RETRY)
        } else {
            None
        };
        match give_up {
            Some(why) => {
                self.apply(
                    InstanceState::Terminated,
                    InstanceTransitionContext::NORMAL,
                    why.into(),
                    at,
                    actor,
                )?;
                self.retry_count = failures;
                self.terminated_at = Some(at);
                Ok(RetryOutcome::GiveUp { reason: why })
            }
            None => {
                self.apply(
                    InstanceState::Instantiating,
                    InstanceTransitionContext::RETRY,
                    format!(
                        "{REASON_INSTANTIATION_RETRY}: attempt {failures}/{MAX_INSTANTIATION_RETRIES} \
                         failed: {cause}"
                    ),
                    at,
                    actor,
                )?;
                self.retry_count = failures;
                Ok(RetryOutcome::Retry {
                    attempt: failures + 1,
                })
            }
        }
    }

    /// INSTANTIATING → RUNNING: the lab was imported and started. Sets `cml_lab_id`, and
    /// `started_at` if it was never set. (STOPPED → RUNNING is [`LabletInstance::restart`].)
    pub fn mark_running(
        &mut self,
        cml_lab_id: impl Into<String>,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let to = InstanceState::Running;
        self.require_from(&[InstanceState::Instantiating], to, "mark_running")?;
        let lab = cml_lab_id.into();
        if lab.trim().is_empty() {
            return Err(CoreError::invalid("cml_lab_id", "must not be empty"));
        }
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_LAB_STARTED.into(),
            at,
            actor,
        )?;
        self.cml_lab_id = Some(lab);
        if self.started_at.is_none() {
            self.started_at = Some(at);
        }
        Ok(())
    }

    /// RUNNING → COLLECTING: collection starts. `reason` is [`REASON_MANUAL`],
    /// [`REASON_TIMESLOT_END`] or [`REASON_ASSESSMENT_REQUEST`] (any non-empty text is kept).
    pub fn start_collection(
        &mut self,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let to = InstanceState::Collecting;
        self.require_from(&[InstanceState::Running], to, "start_collection")?;
        let reason = require_reason(reason)?;
        self.apply(to, InstanceTransitionContext::NORMAL, reason, at, actor)
    }

    /// COLLECTING → GRADING on `assessment.collection.completed`.
    pub fn collection_completed(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Grading;
        self.require_from(&[InstanceState::Collecting], to, "collection_completed")?;
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_COLLECTION_COMPLETED.into(),
            at,
            actor,
        )
    }

    /// GRADING → STOPPING on `assessment.grading.completed`: stores `grading_score`.
    /// Refused in every other state (a repeated event finds the instance STOPPING or later).
    pub fn record_grading(
        &mut self,
        score: GradingScore,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let to = InstanceState::Stopping;
        self.require_from(&[InstanceState::Grading], to, "a grading result")?;
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_GRADING_COMPLETED.into(),
            at,
            actor,
        )?;
        self.grading_score = Some(score);
        Ok(())
    }

    /// RUNNING, COLLECTING or GRADING → STOPPING: a stop (user, slot end without grading,
    /// collection failed or timed out, grading timed out, or a user DELETE with reason
    /// [`REASON_DELETE_REQUESTED`]).
    pub fn stop(&mut self, reason: &str, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Stopping;
        self.require_from(
            &[
                InstanceState::Running,
                InstanceState::Collecting,
                InstanceState::Grading,
            ],
            to,
            "stop",
        )?;
        let reason = require_reason(reason)?;
        self.apply(to, InstanceTransitionContext::NORMAL, reason, at, actor)
    }

    /// STOPPING → STOPPED: the controller confirmed the CML lab stop.
    pub fn mark_stopped(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Stopped;
        self.require_from(&[InstanceState::Stopping], to, "mark_stopped")?;
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_LAB_STOPPED.into(),
            at,
            actor,
        )
    }

    /// STOPPED → RUNNING (`Start`): the lab is started again; resources are still held.
    /// `started_at` keeps the first start.
    ///
    /// Refused once the time slot has ended (`at ≥ timeslot.end`) or after a DELETE asked for
    /// teardown: the instance is then due for archive.
    pub fn restart(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Running;
        self.require_from(&[InstanceState::Stopped], to, "restart")?;
        if at >= self.timeslot.end {
            return Err(refuse(
                self.state,
                to,
                format!(
                    "the time slot ended at {}; the instance is due for teardown",
                    self.timeslot.end.to_rfc3339()
                ),
            ));
        }
        if self.deletion_requested() {
            return Err(refuse(
                self.state,
                to,
                "a delete was requested; the instance is being torn down",
            ));
        }
        self.apply(
            to,
            InstanceTransitionContext::NORMAL,
            REASON_RESTARTED.into(),
            at,
            actor,
        )
    }

    /// STOPPED → ARCHIVED: results are stored; the lab is about to be wiped. `reason` is e.g.
    /// [`REASON_TIMESLOT_END`] or [`REASON_DELETE_REQUESTED`].
    pub fn archive(&mut self, reason: &str, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Archived;
        self.require_from(&[InstanceState::Stopped], to, "archive")?;
        let reason = require_reason(reason)?;
        self.apply(to, InstanceTransitionContext::NORMAL, reason, at, actor)
    }

    /// → TERMINATED along an edge of the table: from PENDING (cancelled, expired), SCHEDULED
    /// (cancelled, expired, orphaned), INSTANTIATING (failed, stuck) or ARCHIVED (cleanup).
    /// Sets `terminated_at`.
    ///
    /// From any other state this is refused: users stop first ([`terminate_plan`]); the system
    /// and admins use [`LabletInstance::force_terminate`]. `worker_id` and `allocated_ports` are
    /// kept on the record; the store commit releases the ports and capacity (module docs).
    pub fn terminate(&mut self, reason: &str, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = InstanceState::Terminated;
        let reason = require_reason(reason)?;
        self.apply(to, InstanceTransitionContext::NORMAL, reason, at, actor)?;
        self.terminated_at = Some(at);
        Ok(())
    }

    /// Any non-terminal state → TERMINATED by the system or an admin (§11.2): DELETE by an admin,
    /// drain force-stop ([`REASON_DRAIN_TIMEOUT`]), orphans ([`REASON_WORKER_GONE`]).
    /// `privileged` must be true (the caller checked the actor is system or admin) and `reason`
    /// non-empty. Sets `terminated_at`; ports as in [`LabletInstance::terminate`].
    pub fn force_terminate(
        &mut self,
        reason: &str,
        privileged: bool,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let to = InstanceState::Terminated;
        check_instance_transition(
            self.state,
            to,
            &InstanceTransitionContext::force_terminate(privileged),
        )?;
        let reason = require_reason(reason)?;
        self.apply(
            to,
            InstanceTransitionContext::force_terminate(privileged),
            reason,
            at,
            actor,
        )?;
        self.terminated_at = Some(at);
        Ok(())
    }

    /// Carries out a DELETE according to [`terminate_plan`] and returns the plan it followed.
    ///
    /// * [`TerminatePlan::TerminateNow`]: TERMINATED with [`REASON_CANCELLED`] (before the lab
    ///   ran: PENDING, SCHEDULED, INSTANTIATING) or [`REASON_DELETED`].
    /// * [`TerminatePlan::StopFirst`] / [`TerminatePlan::ArchiveFirst`]: STOPPING / ARCHIVED with
    ///   [`REASON_DELETE_REQUESTED`].
    /// * [`TerminatePlan::AlreadyTerminated`], [`TerminatePlan::AwaitStopped`]: nothing changes.
    pub fn request_delete(
        &mut self,
        by_admin_or_system: bool,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<TerminatePlan> {
        let plan = terminate_plan(self.state, by_admin_or_system);
        match plan {
            TerminatePlan::AlreadyTerminated | TerminatePlan::AwaitStopped => {}
            TerminatePlan::TerminateNow => {
                let reason = match self.state {
                    InstanceState::Pending
                    | InstanceState::Scheduled
                    | InstanceState::Instantiating => REASON_CANCELLED,
                    _ => REASON_DELETED,
                };
                if by_admin_or_system {
                    self.force_terminate(reason, true, at, actor)?;
                } else {
                    self.terminate(reason, at, actor)?;
                }
            }
            TerminatePlan::StopFirst => self.stop(REASON_DELETE_REQUESTED, at, actor)?,
            TerminatePlan::ArchiveFirst => self.archive(REASON_DELETE_REQUESTED, at, actor)?,
        }
        Ok(plan)
    }

    /// Applies a [`DueAction`] returned by [`due_actions`], with its standard reason:
    /// [`REASON_INSTANTIATION_DUE`], [`REASON_TIMESLOT_END`] (collect, stop, archive after the
    /// slot), [`REASON_DELETE_REQUESTED`] (archive after a DELETE), [`REASON_EXPIRED`],
    /// [`REASON_CLEANUP`].
    pub fn apply_due_action(
        &mut self,
        action: DueAction,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        match action {
            DueAction::Instantiate => self.begin_instantiation(at, actor),
            DueAction::Collect => self.start_collection(REASON_TIMESLOT_END, at, actor),
            DueAction::Stop => self.stop(REASON_TIMESLOT_END, at, actor),
            DueAction::Expire => {
                self.require_from(
                    &[InstanceState::Pending, InstanceState::Scheduled],
                    InstanceState::Terminated,
                    "expiry",
                )?;
                self.terminate(REASON_EXPIRED, at, actor)
            }
            DueAction::Archive => {
                let reason = if self.deletion_requested() {
                    REASON_DELETE_REQUESTED
                } else {
                    REASON_TIMESLOT_END
                };
                self.archive(reason, at, actor)
            }
            DueAction::Cleanup => {
                self.require_from(
                    &[InstanceState::Archived],
                    InstanceState::Terminated,
                    "cleanup",
                )?;
                self.terminate(REASON_CLEANUP, at, actor)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Version;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 15, 9, 0, 0)
            .single()
            .expect("valid time")
    }

    fn pending() -> LabletInstance {
        LabletInstance {
            id: "i-1".into(),
            definition_id: "d-1".into(),
            definition_version: Version::new(1, 0, 0),
            worker_id: None,
            state: InstanceState::Pending,
            state_history: Vec::new(),
            allocated_ports: BTreeMap::new(),
            cml_lab_id: None,
            timeslot: TimeSlot {
                start: t0() + Duration::hours(1),
                end: t0() + Duration::hours(3),
                asap: false,
            },
            owner_id: "alice".into(),
            reservation_id: None,
            grading_score: None,
            retry_count: 0,
            created_at: t0(),
            scheduled_at: None,
            started_at: None,
            terminated_at: None,
        }
    }

    #[test]
    fn table_self_edges_refused_and_retry_only_in_instantiating() {
        for s in InstanceState::ALL {
            assert!(check_instance_transition(s, s, &InstanceTransitionContext::NORMAL).is_err());
            let retry = check_instance_transition(s, s, &InstanceTransitionContext::RETRY);
            assert_eq!(retry.is_ok(), s == InstanceState::Instantiating, "{s}");
        }
    }

    #[test]
    fn force_terminate_needs_privilege_and_targets_terminated_only() {
        let ctx = InstanceTransitionContext::force_terminate(true);
        assert!(
            check_instance_transition(InstanceState::Running, InstanceState::Terminated, &ctx)
                .is_ok()
        );
        assert!(
            check_instance_transition(InstanceState::Running, InstanceState::Stopping, &ctx)
                .is_err()
        );
        let user = InstanceTransitionContext::force_terminate(false);
        assert!(matches!(
            check_instance_transition(InstanceState::Running, InstanceState::Terminated, &user),
            Err(CoreError::InvalidInstanceTransition { .. })
        ));
        assert!(
            check_instance_transition(InstanceState::Terminated, InstanceState::Terminated, &ctx)
                .is_err()
        );
    }

    #[test]
    fn schedule_rejects_duplicate_ports_without_change() {
        let mut i = pending();
        let before = i.clone();
        let ports = BTreeMap::from([("a".to_string(), 2000), ("b".to_string(), 2000)]);
        let err = i.schedule("w-1", ports, t0(), &Actor::scheduler());
        assert!(matches!(err, Err(CoreError::Invalid { .. })));
        assert_eq!(i, before);
        assert!(
            i.schedule("  ", BTreeMap::new(), t0(), &Actor::scheduler())
                .is_err()
        );
        assert_eq!(i, before);
    }

    #[test]
    fn empty_reason_is_refused_without_change() {
        let mut i = pending();
        let before = i.clone();
        assert!(matches!(
            i.terminate("  ", t0(), &Actor::control_plane()),
            Err(CoreError::Invalid { .. })
        ));
        assert_eq!(i, before);
    }

    #[test]
    fn terminate_plan_matrix() {
        use InstanceState::*;
        assert_eq!(
            terminate_plan(Terminated, true),
            TerminatePlan::AlreadyTerminated
        );
        assert_eq!(terminate_plan(Running, true), TerminatePlan::TerminateNow);
        assert_eq!(terminate_plan(Running, false), TerminatePlan::StopFirst);
        assert_eq!(terminate_plan(Grading, false), TerminatePlan::StopFirst);
        assert_eq!(terminate_plan(Stopped, false), TerminatePlan::ArchiveFirst);
        assert_eq!(terminate_plan(Stopping, false), TerminatePlan::AwaitStopped);
        assert_eq!(terminate_plan(Pending, false), TerminatePlan::TerminateNow);
        assert_eq!(terminate_plan(Archived, false), TerminatePlan::TerminateNow);
    }

    #[test]
    fn due_target_states() {
        assert_eq!(
            DueAction::Instantiate.target(),
            InstanceState::Instantiating
        );
        assert_eq!(DueAction::Expire.target(), InstanceState::Terminated);
        assert_eq!(DueAction::Archive.target(), InstanceState::Archived);
        assert_eq!(slot_end_action(true), InstanceState::Collecting);
        assert_eq!(slot_end_action(false), InstanceState::Stopping);
    }
}
