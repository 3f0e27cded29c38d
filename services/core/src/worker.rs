//! The CML worker state machine (domain.md §2.2, resolutions §11.4 and §11.5).
//!
//! The states are the union of the documents' enums ([`WorkerState`]). The edges:
//!
//! | from | to |
//! |---|---|
//! | PENDING | PROVISIONING (EC2 instance created) |
//! | PROVISIONING, STARTING | RUNNING (EC2 running ∧ CML AVAILABLE) |
//! | RUNNING | DRAINING, STOPPING |
//! | DRAINING | RUNNING (admin cancel-drain only), STOPPING (never straight to STOPPED, §11.4) |
//! | STOPPING | STOPPED |
//! | STOPPED | STARTING (restart; the way back to RUNNING) |
//! | UNKNOWN (only ever an initial state, e.g. an imported worker) | STARTING, RUNNING, STOPPING, STOPPED |
//! | any non-terminal | SHUTTING_DOWN, FAILED, TERMINATED (provisioning failed, EC2 vanished, terminate) |
//!
//! TERMINATED is terminal, no state moves to itself, and nothing moves *to* UNKNOWN: an EC2 state
//! ccm does not know is reported as a [`Ec2Observation::Divergence`] rather than recorded.
//! A stopped worker comes back through STARTING (EC2 `pending` while STARTING is in sync), never
//! through PENDING, which is kept for "record created, no EC2 instance yet".
//!
//! Only RUNNING accepts placements ([`accepts_placements`]). DRAINING keeps its instances running;
//! the retry rule for instances on a DRAINING worker is [`crate::instance::worker_can_retry`].
//! Methods on [`CmlWorker`] check before they change anything, record every transition in
//! `state_history` with from / to / at / reason / actor, and keep `drain_started_at` /
//! `drain_reason` set exactly while the worker is DRAINING.

use chrono::{DateTime, Duration, Utc};

use crate::error::{CoreError, CoreResult};
use crate::model::{Actor, CmlWorker, ServiceStatus, StateTransition, WorkerState};

// ---------------------------------------------------------------------------------------------
// Reasons recorded in the state history
// ---------------------------------------------------------------------------------------------

/// PENDING → PROVISIONING: the cloud created the EC2 instance.
pub const REASON_PROVISIONING_STARTED: &str = "provisioning_started";
/// → RUNNING: EC2 runs and CML answers.
pub const REASON_CML_AVAILABLE: &str = "cml_available";
/// DRAINING → RUNNING by an admin (`WorkerDrainCancelled{reason: "admin_action"}`).
pub const REASON_ADMIN_ACTION: &str = "admin_action";
/// RUNNING → DRAINING by the autoscaler: no running or scheduled instances (§6).
pub const REASON_SCALE_DOWN_IDLE: &str = "scale_down_idle";
/// DRAINING → STOPPING: no active instances are left.
pub const REASON_DRAINED: &str = "drained";
/// DRAINING → STOPPING after `drain_timeout_hours` (FORCE_STOP; its instances are terminated).
pub const REASON_DRAIN_TIMEOUT: &str = "drain_timeout";
/// STOPPING → STOPPED: EC2 reports `stopped`.
pub const REASON_EC2_STOPPED: &str = "ec2_stopped";
/// STOPPED → STARTING: a restart was requested (scale-up reuse or admin start).
pub const REASON_RESTART_REQUESTED: &str = "restart_requested";
/// → TERMINATED: EC2 reports `terminated` for a worker that was not being terminated.
pub const REASON_EC2_INSTANCE_VANISHED: &str = "ec2_instance_vanished";
/// SHUTTING_DOWN → TERMINATED: EC2 confirmed the termination.
pub const REASON_EC2_TERMINATED: &str = "ec2_terminated";
/// Prefix of reasons of transitions taken because EC2 reported a state (`ec2_<state>`).
pub const REASON_EC2_PREFIX: &str = "ec2_";

// ---------------------------------------------------------------------------------------------
// The pure rule
// ---------------------------------------------------------------------------------------------

/// The circumstances of a worker transition that the rule needs besides the two states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WorkerTransitionContext {
    /// The actor is an admin. Only an admin may cancel a drain (DRAINING → RUNNING); the
    /// scheduler and the controller cannot.
    pub is_admin: bool,
}

impl WorkerTransitionContext {
    /// The scheduler, the controller or the control plane acting on their own.
    pub const SYSTEM: Self = Self { is_admin: false };
    /// An admin.
    pub const ADMIN: Self = Self { is_admin: true };
}

/// Only a RUNNING worker accepts new placements (domain.md §2.2 rules).
pub fn accepts_placements(state: WorkerState) -> bool {
    state == WorkerState::Running
}

/// The next states of `from` (see the module table), in [`WorkerState::ALL`] order.
///
/// DRAINING → RUNNING is listed but needs an admin ([`WorkerTransitionContext::is_admin`]).
pub fn allowed_next_states(from: WorkerState) -> &'static [WorkerState] {
    use WorkerState::*;
    match from {
        Pending => &[Provisioning, ShuttingDown, Terminated, Failed],
        Provisioning => &[Running, ShuttingDown, Terminated, Failed],
        Starting => &[Running, ShuttingDown, Terminated, Failed],
        Running => &[Draining, Stopping, ShuttingDown, Terminated, Failed],
        Draining => &[Running, Stopping, ShuttingDown, Terminated, Failed],
        Stopping => &[Stopped, ShuttingDown, Terminated, Failed],
        Stopped => &[Starting, ShuttingDown, Terminated, Failed],
        ShuttingDown => &[Terminated, Failed],
        Terminated => &[],
        Failed => &[ShuttingDown, Terminated],
        Unknown => &[
            Starting,
            Running,
            Stopping,
            Stopped,
            ShuttingDown,
            Terminated,
            Failed,
        ],
    }
}

/// May a worker move from `from` to `to` in context `ctx`?
///
/// Exactly the edges of [`allowed_next_states`]; DRAINING → RUNNING additionally needs
/// `ctx.is_admin`. Refusals are [`CoreError::InvalidWorkerTransition`] with the reason in words.
pub fn check_worker_transition(
    from: WorkerState,
    to: WorkerState,
    ctx: &WorkerTransitionContext,
) -> CoreResult<()> {
    if from.is_terminal() {
        return Err(refuse(from, to, "TERMINATED is terminal"));
    }
    if from == to {
        return Err(refuse(from, to, "self-transitions are refused"));
    }
    if to == WorkerState::Unknown {
        return Err(refuse(
            from,
            to,
            "UNKNOWN is only an initial state; an unknown EC2 state is a divergence",
        ));
    }
    if !allowed_next_states(from).contains(&to) {
        let why = match (from, to) {
            (WorkerState::Draining, WorkerState::Stopped) => {
                "a DRAINING worker always goes through STOPPING"
            }
            _ => "not a transition of the worker lifecycle",
        };
        return Err(refuse(from, to, why));
    }
    if from == WorkerState::Draining && to == WorkerState::Running && !ctx.is_admin {
        return Err(refuse(from, to, "only an admin can cancel a drain"));
    }
    Ok(())
}

fn refuse(from: WorkerState, to: WorkerState, why: impl Into<String>) -> CoreError {
    CoreError::InvalidWorkerTransition {
        from,
        to,
        why: why.into(),
    }
}

fn require_reason(reason: &str) -> CoreResult<String> {
    let r = reason.trim();
    if r.is_empty() {
        Err(CoreError::invalid("reason", "a transition needs a reason"))
    } else {
        Ok(r.to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// EC2 observations
// ---------------------------------------------------------------------------------------------

/// What [`CmlWorker::observe_ec2_state`] made of an EC2 state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Observation {
    /// EC2 agrees with the worker's state; nothing recorded.
    InSync,
    /// A legal transition was applied and recorded.
    Transitioned {
        /// State before.
        from: WorkerState,
        /// State after.
        to: WorkerState,
        /// Reason recorded.
        reason: String,
    },
    /// EC2 has not caught up with a request ccm made (stop, start, terminate), or EC2 runs but
    /// CML is not AVAILABLE yet. Nothing recorded; look again later.
    Waiting {
        /// What is awaited.
        why: String,
    },
    /// EC2 says something the state machine cannot reach directly from the current state (e.g.
    /// `stopped` while RUNNING: stopped outside ccm, instances may be lost). Nothing recorded;
    /// the controller decides (e.g. stop through STOPPING, mark FAILED, terminate instances) and
    /// raises an alert.
    Divergence {
        /// The worker's state.
        current: WorkerState,
        /// What EC2's state maps to ([`WorkerState::from_ec2_state`]).
        observed: WorkerState,
        /// The EC2 state name as reported.
        ec2_state: String,
        /// Why it cannot be applied.
        why: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Applying transitions
// ---------------------------------------------------------------------------------------------

impl CmlWorker {
    /// `true` when the worker is RUNNING: the only state that accepts placements.
    pub fn accepts_placements(&self) -> bool {
        accepts_placements(self.state)
    }

    /// Checks the rule and, only if it passes, records the transition, sets the state and keeps
    /// the drain fields consistent (set entering DRAINING, cleared leaving it).
    fn apply(
        &mut self,
        to: WorkerState,
        ctx: WorkerTransitionContext,
        reason: String,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        check_worker_transition(self.state, to, &ctx)?;
        if to == WorkerState::Draining {
            self.drain_started_at = Some(at);
            self.drain_reason = Some(reason.clone());
        } else if self.state == WorkerState::Draining {
            self.drain_started_at = None;
            self.drain_reason = None;
        }
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

    /// PENDING → PROVISIONING: the cloud created EC2 instance `aws_instance_id` (must not be
    /// empty), which is stored.
    pub fn begin_provisioning(
        &mut self,
        aws_instance_id: impl Into<String>,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let id = aws_instance_id.into();
        check_worker_transition(
            self.state,
            WorkerState::Provisioning,
            &WorkerTransitionContext::SYSTEM,
        )?;
        if id.trim().is_empty() {
            return Err(CoreError::invalid("aws_instance_id", "must not be empty"));
        }
        self.apply(
            WorkerState::Provisioning,
            WorkerTransitionContext::SYSTEM,
            REASON_PROVISIONING_STARTED.into(),
            at,
            actor,
        )?;
        self.aws_instance_id = Some(id);
        Ok(())
    }

    /// PROVISIONING, STARTING or UNKNOWN → RUNNING: EC2 runs and CML answers. Refused unless
    /// `service_status` is AVAILABLE (the controller updates it from CML health first).
    /// DRAINING → RUNNING is [`CmlWorker::cancel_drain`].
    pub fn mark_running(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let to = WorkerState::Running;
        if self.state == WorkerState::Draining {
            return Err(refuse(
                self.state,
                to,
                "a drain ends only by an admin cancel-drain",
            ));
        }
        check_worker_transition(self.state, to, &WorkerTransitionContext::SYSTEM)?;
        if self.service_status != ServiceStatus::Available {
            return Err(refuse(
                self.state,
                to,
                "the CML service is not AVAILABLE yet",
            ));
        }
        self.apply(
            to,
            WorkerTransitionContext::SYSTEM,
            REASON_CML_AVAILABLE.into(),
            at,
            actor,
        )
    }

    /// RUNNING → DRAINING: no new placements; existing labs keep running. Sets `drain_started_at`
    /// to `at` and `drain_reason` to `reason` (e.g. [`REASON_SCALE_DOWN_IDLE`]).
    pub fn drain(&mut self, reason: &str, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let reason = require_reason(reason)?;
        self.apply(
            WorkerState::Draining,
            WorkerTransitionContext::SYSTEM,
            reason,
            at,
            actor,
        )
    }

    /// DRAINING → RUNNING: an admin cancels the drain (reason [`REASON_ADMIN_ACTION`]); clears
    /// the drain fields. Refused when `is_admin` is false.
    pub fn cancel_drain(
        &mut self,
        at: DateTime<Utc>,
        actor: &Actor,
        is_admin: bool,
    ) -> CoreResult<()> {
        let to = WorkerState::Running;
        if self.state != WorkerState::Draining {
            return Err(refuse(self.state, to, "cancel-drain requires DRAINING"));
        }
        self.apply(
            to,
            WorkerTransitionContext { is_admin },
            REASON_ADMIN_ACTION.into(),
            at,
            actor,
        )
    }

    /// RUNNING, DRAINING or UNKNOWN → STOPPING: EC2 stop requested (drained, drain timeout,
    /// admin stop). Leaving DRAINING clears the drain fields.
    pub fn begin_stop(&mut self, reason: &str, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        let reason = require_reason(reason)?;
        self.apply(
            WorkerState::Stopping,
            WorkerTransitionContext::SYSTEM,
            reason,
            at,
            actor,
        )
    }

    /// STOPPING or UNKNOWN → STOPPED: EC2 reports `stopped`.
    pub fn mark_stopped(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        self.apply(
            WorkerState::Stopped,
            WorkerTransitionContext::SYSTEM,
            REASON_EC2_STOPPED.into(),
            at,
            actor,
        )
    }

    /// STOPPED or UNKNOWN → STARTING: EC2 start requested (scale-up reuse, admin start).
    /// [`CmlWorker::mark_running`] follows once CML answers.
    pub fn begin_start(&mut self, at: DateTime<Utc>, actor: &Actor) -> CoreResult<()> {
        self.apply(
            WorkerState::Starting,
            WorkerTransitionContext::SYSTEM,
            REASON_RESTART_REQUESTED.into(),
            at,
            actor,
        )
    }

    /// Any non-terminal state → SHUTTING_DOWN: EC2 termination requested (retention of STOPPED
    /// workers, a failed or unwanted worker). Whether a worker with instances may be terminated
    /// is the caller's policy (the autoscaler never does; §6).
    pub fn begin_terminate(
        &mut self,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let reason = require_reason(reason)?;
        self.apply(
            WorkerState::ShuttingDown,
            WorkerTransitionContext::SYSTEM,
            reason,
            at,
            actor,
        )
    }

    /// Any non-terminal state → TERMINATED: EC2 reports `terminated` ([`REASON_EC2_TERMINATED`]
    /// after SHUTTING_DOWN, [`REASON_EC2_INSTANCE_VANISHED`] otherwise), or the record is given up.
    pub fn mark_terminated(
        &mut self,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let reason = require_reason(reason)?;
        self.apply(
            WorkerState::Terminated,
            WorkerTransitionContext::SYSTEM,
            reason,
            at,
            actor,
        )
    }

    /// Any non-terminal state → FAILED: provisioning failed or the worker is broken.
    pub fn mark_failed(
        &mut self,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> CoreResult<()> {
        let reason = require_reason(reason)?;
        self.apply(
            WorkerState::Failed,
            WorkerTransitionContext::SYSTEM,
            reason,
            at,
            actor,
        )
    }

    /// Reconciles the worker with the EC2 `State.Name` the cloud reported (`running`, `stopped`,
    /// `pending`, `stopping`, `shutting-down`, `terminated`), mapped by
    /// [`WorkerState::from_ec2_state`]:
    ///
    /// * the state EC2 implies is already the worker's (also: `running` while DRAINING, `pending`
    ///   while PENDING / PROVISIONING / STARTING) → [`Ec2Observation::InSync`];
    /// * `terminated` → TERMINATED from any state ([`REASON_EC2_TERMINATED`] after
    ///   SHUTTING_DOWN, else [`REASON_EC2_INSTANCE_VANISHED`]); `shutting-down` → SHUTTING_DOWN;
    /// * `running` while PROVISIONING / STARTING / UNKNOWN → RUNNING if CML is AVAILABLE, else
    ///   [`Ec2Observation::Waiting`]; `running` or `pending` while STOPPED → STARTING (started
    ///   outside ccm; the next observation promotes it); `pending` while UNKNOWN → STARTING;
    /// * EC2 behind a request (STOPPING and `running`, STARTING and `stopped`, SHUTTING_DOWN and
    ///   anything but `terminated`) → [`Ec2Observation::Waiting`];
    /// * otherwise the mapped state if the edge is legal (e.g. RUNNING and `stopping` →
    ///   STOPPING), else [`Ec2Observation::Divergence`] (e.g. RUNNING and `stopped`, any unknown
    ///   name, anything but `terminated` for a TERMINATED worker).
    ///
    /// Transitions are recorded with `at` and `actor` and reason `ec2_<state>` unless named above.
    pub fn observe_ec2_state(
        &mut self,
        ec2_state_name: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> Ec2Observation {
        use WorkerState::*;
        let observed = WorkerState::from_ec2_state(ec2_state_name);
        let current = self.state;
        let divergence = |why: &str| Ec2Observation::Divergence {
            current,
            observed,
            ec2_state: ec2_state_name.to_owned(),
            why: why.to_owned(),
        };
        let waiting = |why: &str| Ec2Observation::Waiting {
            why: why.to_owned(),
        };
        let ec2_reason = format!("{REASON_EC2_PREFIX}{}", ec2_state_name.replace('-', "_"));

        let (to, reason) = match (current, observed) {
            (_, Unknown) => return divergence("EC2 reported a state ccm does not know"),
            (Terminated, Terminated) => return Ec2Observation::InSync,
            (Terminated, _) => return divergence("the worker is TERMINATED; EC2 cannot revive it"),
            (c, o) if c == o => return Ec2Observation::InSync,
            (Draining, Running) => return Ec2Observation::InSync,
            (Pending | Provisioning | Starting, Pending) => return Ec2Observation::InSync,
            (ShuttingDown, _) if observed != Terminated => {
                return waiting("termination requested; EC2 has not caught up");
            }
            (Stopping, Running) => return waiting("stop requested; EC2 has not begun stopping"),
            (Starting, Stopped) => return waiting("start requested; EC2 has not begun starting"),
            (ShuttingDown, Terminated) => (Terminated, REASON_EC2_TERMINATED.to_owned()),
            (_, Terminated) => (Terminated, REASON_EC2_INSTANCE_VANISHED.to_owned()),
            (Provisioning | Starting | Unknown, Running) => {
                if self.service_status != ServiceStatus::Available {
                    return waiting("EC2 runs; the CML service is not AVAILABLE yet");
                }
                (Running, REASON_CML_AVAILABLE.to_owned())
            }
            (Stopped | Unknown, Running | Pending) => (Starting, ec2_reason),
            (_, o) => (o, ec2_reason),
        };
        if let Err(e) = check_worker_transition(current, to, &WorkerTransitionContext::SYSTEM) {
            let why = match e {
                CoreError::InvalidWorkerTransition { why, .. } => why,
                other => other.to_string(),
            };
            return divergence(&why);
        }
        match self.apply(
            to,
            WorkerTransitionContext::SYSTEM,
            reason.clone(),
            at,
            actor,
        ) {
            Ok(()) => Ec2Observation::Transitioned {
                from: current,
                to,
                reason,
            },
            Err(e) => divergence(&e.to_string()),
        }
    }

    /// When a DRAINING worker's drain times out: `drain_started_at + drain_timeout_hours` (the
    /// template's value, default [`crate::defaults::DRAIN_TIMEOUT_HOURS`]). `None` unless DRAINING.
    pub fn drain_deadline(&self, template_drain_timeout_hours: u32) -> Option<DateTime<Utc>> {
        if self.state != WorkerState::Draining {
            return None;
        }
        self.drain_started_at
            .map(|s| s + Duration::hours(i64::from(template_drain_timeout_hours)))
    }

    /// `true` when the worker has been DRAINING for at least `template_drain_timeout_hours` at
    /// `now`: the controller force-stops it (terminates its remaining instances with
    /// [`crate::instance::REASON_DRAIN_TIMEOUT`], then [`CmlWorker::begin_stop`]).
    pub fn drain_timed_out(&self, now: DateTime<Utc>, template_drain_timeout_hours: u32) -> bool {
        self.drain_deadline(template_drain_timeout_hours)
            .is_some_and(|deadline| now >= deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_accepts_placements() {
        for s in WorkerState::ALL {
            assert_eq!(accepts_placements(s), s == WorkerState::Running, "{s}");
        }
    }

    #[test]
    fn cancel_drain_needs_admin() {
        use WorkerState::*;
        assert!(
            check_worker_transition(Draining, Running, &WorkerTransitionContext::SYSTEM).is_err()
        );
        assert!(
            check_worker_transition(Draining, Running, &WorkerTransitionContext::ADMIN).is_ok()
        );
    }

    #[test]
    fn draining_never_straight_to_stopped() {
        let err = check_worker_transition(
            WorkerState::Draining,
            WorkerState::Stopped,
            &WorkerTransitionContext::ADMIN,
        );
        assert!(matches!(
            err,
            Err(CoreError::InvalidWorkerTransition { why, .. }) if why.contains("STOPPING")
        ));
    }

    #[test]
    fn nothing_enters_unknown_and_terminated_is_final() {
        for s in WorkerState::ALL {
            assert!(
                check_worker_transition(s, WorkerState::Unknown, &WorkerTransitionContext::ADMIN)
                    .is_err()
            );
            assert!(
                check_worker_transition(
                    WorkerState::Terminated,
                    s,
                    &WorkerTransitionContext::ADMIN
                )
                .is_err()
            );
        }
    }
}
