//! The autoscaler: `ccm_core::autoscale::plan` over the pass's snapshot, and carrying out what
//! it decided. Every decision is recorded through `RecordScalingDecision` (with its reason,
//! code, inputs and the instances concerned) **before** it is acted on, and each action names
//! the decision (`scaling_decision_id`).
//!
//! | decision | what the controller does |
//! |---|---|
//! | SCALE_UP (`scale_up_demand`, `scale_up_min_warm`) | `CreateWorkerRecord` × count (idempotent per `<decision id>/<n>`); the worker reconciler launches them |
//! | RESTART_STOPPED | STOPPED → STARTING and cloud `start` |
//! | DRAIN (`scale_down_idle`) | RUNNING → DRAINING (never a worker with live instances: the plan refuses, and the control plane counts them) |
//! | STOP (`drain_complete`) | DRAINING → STOPPING and cloud `stop` (stop before terminate) |
//! | FORCE_STOP (`drain_timeout`) | its instances → TERMINATED (`drain_timeout`), then DRAINING → STOPPING and `stop` |
//! | TERMINATE (`stopped_retention`) | STOPPED → SHUTTING_DOWN and cloud `terminate` |
//! | WAIT | recorded when it changes (same template, worker, code and instances are not repeated every pass) |
//! | HALT / RESUME | recorded when scaling halts because too many workers are unready, and when it resumes |
//!
//! Admin wishes win: a worker an admin wants RUNNING (`desired_state`) is never drained, one
//! an admin wants STOPPED or TERMINATED is never restarted. The scale-up cooldown survives a
//! leader change: a new leader reads the SCALE_UP decisions of the last hours.

use std::collections::{BTreeMap, HashSet};

use ccm_control_plane::convert;
use ccm_core::autoscale::{self as core_as, AutoscaleInput, AutoscalePolicy, ScalingAction};
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot};
use ccm_proto::v1 as pb;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::controller::{Controller, Snapshot, short_reason};
use crate::error::{ControllerError, Result};
use crate::plane::Fence;
use crate::status::ts;
use crate::workers::json_struct;

/// How far back a new leader looks for SCALE_UP decisions (cooldowns).
pub const COOLDOWN_LOOKBACK: chrono::Duration = chrono::Duration::hours(6);

/// The autoscaler's inputs, converted from the snapshot.
pub(crate) struct Inputs {
    pub fleet: FleetSnapshot,
    pub demand: Vec<PlacementRequest>,
    pub templates: Vec<ccm_core::model::WorkerTemplate>,
}

fn holds_resources(s: pb::InstanceState) -> bool {
    use pb::InstanceState as S;
    matches!(
        s,
        S::Scheduled
            | S::Instantiating
            | S::Running
            | S::Collecting
            | S::Grading
            | S::Stopping
            | S::Stopped
            | S::Archived
    )
}

/// Converts the snapshot into the core's autoscaling inputs. Unreadable records are skipped
/// with a warning (they cannot be reasoned about, and must not stop the fleet from scaling).
pub(crate) fn inputs(snap: &Snapshot, policy: &AutoscalePolicy) -> Inputs {
    let templates: Vec<ccm_core::model::WorkerTemplate> = snap
        .templates
        .iter()
        .filter_map(|t| match convert::template_from_proto(t, "template") {
            Ok(mut core) => {
                // template.proto: max_workers 0 means "no limit"; the core reads it literally.
                if t.max_workers == 0 {
                    core.max_workers = u32::MAX;
                }
                Some(core)
            }
            Err(e) => {
                tracing::warn!(template = %t.name, error = %e, "template unreadable");
                None
            }
        })
        .collect();
    let nested: BTreeMap<&str, bool> = templates
        .iter()
        .map(|t| (t.name.as_str(), t.nested_virt))
        .collect();
    let mut workers = Vec::new();
    let mut index = BTreeMap::new();
    for w in &snap.workers {
        // A STOPPED worker an admin wants stopped (or gone) is not capacity to restart.
        if w.state() == pb::WorkerState::Stopped
            && matches!(
                w.desired_state(),
                pb::WorkerDesiredState::Stopped | pb::WorkerDesiredState::Terminated
            )
        {
            continue;
        }
        let core = match convert::worker_from_proto(w, "worker") {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %w.id, error = %e, "worker unreadable");
                continue;
            }
        };
        let nv = nested
            .get(w.template_name.as_str())
            .copied()
            .unwrap_or(false);
        match WorkerSnapshot::from_worker(&core, nv) {
            Ok(s) => {
                index.insert(w.id.clone(), workers.len());
                workers.push(s);
            }
            Err(e) => tracing::warn!(worker = %w.id, error = %e, "worker snapshot failed"),
        }
    }
    let mut demand = Vec::new();
    for inst in &snap.instances {
        let Some(def) = snap.definition(inst) else {
            continue;
        };
        let state = inst.state();
        if state != pb::InstanceState::Pending && !holds_resources(state) {
            continue;
        }
        let req = match convert::placement_request_from_proto(def, inst, policy.instantiation_lead)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(instance = %inst.id, error = %e, "instance unreadable");
                continue;
            }
        };
        if state == pb::InstanceState::Pending {
            demand.push(req);
            continue;
        }
        let Some(&i) = index.get(&inst.worker_id) else {
            continue;
        };
        let mut ports = BTreeMap::new();
        for (k, v) in &inst.allocated_ports {
            if let Ok(p) = u16::try_from(*v) {
                ports.insert(k.clone(), p);
            }
        }
        if let Err(e) = workers[i].add_booking(&inst.id, req.window, req.demand, &ports) {
            tracing::warn!(instance = %inst.id, error = %e, "booking does not fit its worker snapshot");
        }
    }
    Inputs {
        fleet: FleetSnapshot::new(workers),
        demand,
        templates,
    }
}

/// The fleet at a glance (GetControllerStatus).
pub(crate) fn fleet_summary(snap: &Snapshot, policy: &AutoscalePolicy) -> pb::FleetSummary {
    let mut workers: BTreeMap<i32, i32> = BTreeMap::new();
    let mut declared = pb::WorkerCapacity::default();
    let mut allocated = pb::WorkerCapacity::default();
    let mut booting = 0;
    let mut unready = 0;
    for w in &snap.workers {
        *workers.entry(w.state).or_default() += 1;
        use pb::WorkerState as S;
        match w.state() {
            S::Running | S::Draining => {
                add(&mut declared, w.declared_capacity.as_ref());
                add(&mut allocated, w.allocated_capacity.as_ref());
                if w.state() == S::Running && w.service_status() != pb::CmlServiceStatus::Available
                {
                    unready += 1;
                }
            }
            S::Pending | S::Provisioning | S::Starting => booting += 1,
            S::Failed | S::Unknown => unready += 1,
            _ => {}
        }
    }
    let mut instances: BTreeMap<i32, i32> = BTreeMap::new();
    let horizon = snap.now + policy.lookahead;
    let mut pending = 0;
    for i in &snap.instances {
        *instances.entry(i.state).or_default() += 1;
        if i.state() == pb::InstanceState::Pending {
            let slot = i.time_slot.as_ref();
            let asap = slot.is_some_and(|s| s.asap);
            let start = slot
                .and_then(|s| s.start.as_ref())
                .and_then(|t| DateTime::from_timestamp(t.seconds, 0));
            if asap || start.is_none_or(|s| s <= horizon) {
                pending += 1;
            }
        }
    }
    pb::FleetSummary {
        workers: workers
            .into_iter()
            .map(|(state, count)| pb::WorkerStateCount { state, count })
            .collect(),
        instances: instances
            .into_iter()
            .map(|(state, count)| pb::InstanceStateCount { state, count })
            .collect(),
        declared: Some(declared),
        allocated: Some(allocated),
        workers_booting: booting,
        pending_demand: pending,
        workers_unready: unready,
        scaling_halted: false,
        halt_reason: String::new(),
    }
}

fn add(total: &mut pb::WorkerCapacity, c: Option<&pb::WorkerCapacity>) {
    if let Some(c) = c {
        total.cpu_cores += c.cpu_cores;
        total.memory_gb += c.memory_gb;
        total.storage_gb += c.storage_gb;
        total.max_nodes += c.max_nodes;
    }
}

fn action_proto(a: ScalingAction) -> pb::ScalingAction {
    match a {
        ScalingAction::ScaleUp => pb::ScalingAction::ScaleUp,
        ScalingAction::RestartStopped => pb::ScalingAction::RestartStopped,
        ScalingAction::Drain => pb::ScalingAction::Drain,
        ScalingAction::Stop => pb::ScalingAction::Stop,
        ScalingAction::ForceStop => pb::ScalingAction::ForceStop,
        ScalingAction::Terminate => pb::ScalingAction::Terminate,
        ScalingAction::Wait => pb::ScalingAction::Wait,
    }
}

impl Controller {
    /// One autoscaler run; returns the decisions recorded.
    pub(crate) async fn autoscale(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        why: &str,
    ) -> Result<usize> {
        let policy = self.inner.settings.policy.clone();
        self.load_cooldowns(fence, snap.now).await;
        let inputs = inputs(snap, &policy);
        let last_scale_up = self.memory().last_scale_up.clone();
        let plan = core_as::plan(
            &AutoscaleInput {
                fleet: &inputs.fleet,
                demand: &inputs.demand,
                templates: &inputs.templates,
                now: snap.now,
                last_scale_up: &last_scale_up,
            },
            &policy,
        );
        let trigger = if why.starts_with("manual") {
            pb::ScalingTrigger::Api
        } else {
            pb::ScalingTrigger::System
        };
        let context = json!({
            "pending_demand": inputs.demand.len(),
            "workers": inputs.fleet.len(),
            "templates": inputs.templates.len(),
            "lookahead_minutes": policy.lookahead.num_minutes(),
            "max_concurrent_drains": policy.max_concurrent_drains,
            "min_warm_workers": policy.min_warm_workers,
            "max_workers": policy.max_workers,
            "run_reason": why,
        });
        let mut recorded = 0;
        // Halt / resume.
        let previous = self.memory().halted.clone();
        match (&plan.halted, &previous) {
            (Some(reason), prev) if prev.as_deref() != Some(reason.as_str()) => {
                self.record_decision(
                    fence,
                    snap.now,
                    pb::ScalingAction::Halt,
                    "",
                    "",
                    0,
                    reason,
                    "unready_workers",
                    trigger,
                    &context,
                    &[],
                    None,
                )
                .await?;
                recorded += 1;
                self.memory().halted = Some(reason.clone());
            }
            (None, Some(_)) => {
                self.record_decision(
                    fence,
                    snap.now,
                    pb::ScalingAction::Resume,
                    "",
                    "",
                    0,
                    "enough workers are ready again",
                    "workers_ready",
                    trigger,
                    &context,
                    &[],
                    None,
                )
                .await?;
                recorded += 1;
                self.memory().halted = None;
            }
            _ => {}
        }
        let mut waits_seen = HashSet::new();
        for d in &plan.decisions {
            let template = d.template.clone().unwrap_or_default();
            let worker_id = d.worker_id.clone().unwrap_or_default();
            let worker = snap.worker(&worker_id);
            if d.action == ScalingAction::Drain
                && worker.is_some_and(|w| w.desired_state() == pb::WorkerDesiredState::Running)
            {
                continue;
            }
            if d.action == ScalingAction::Wait {
                let key = format!("{template}/{worker_id}/{}", d.code);
                let print = format!("{} {:?}", d.count, d.instances);
                waits_seen.insert(key.clone());
                if self.memory().recorded_waits.get(&key) == Some(&print) {
                    continue;
                }
                self.record_decision(
                    fence,
                    snap.now,
                    pb::ScalingAction::Wait,
                    &template,
                    &worker_id,
                    d.count,
                    &d.reason,
                    d.code,
                    trigger,
                    &context,
                    &d.instances,
                    None,
                )
                .await?;
                self.memory().recorded_waits.insert(key, print);
                recorded += 1;
                continue;
            }
            let ready_at = match d.action {
                ScalingAction::ScaleUp => inputs
                    .templates
                    .iter()
                    .find(|t| t.name == template)
                    .map(|t| snap.now + chrono::Duration::minutes(i64::from(t.startup_minutes))),
                ScalingAction::RestartStopped => Some(
                    snap.now
                        + chrono::Duration::minutes(ccm_core::defaults::WORKER_RESTART_MINUTES),
                ),
                _ => None,
            };
            let decision = self
                .record_decision(
                    fence,
                    snap.now,
                    action_proto(d.action),
                    &template,
                    &worker_id,
                    d.count,
                    &d.reason,
                    d.code,
                    trigger,
                    &context,
                    &d.instances,
                    ready_at,
                )
                .await?;
            recorded += 1;
            if let Err(e) = self.carry_out(fence, snap, d, &decision, worker).await {
                if matches!(e, ControllerError::NotLeader(_)) {
                    return Err(e);
                }
                tracing::warn!(action = %d.action, worker = %worker_id, template = %template, error = %e, "scaling action failed; the next run decides again");
            }
        }
        self.memory()
            .recorded_waits
            .retain(|k, _| waits_seen.contains(k));
        Ok(recorded)
    }

    async fn load_cooldowns(&self, fence: &Fence, now: DateTime<Utc>) {
        if self.memory().scale_ups_loaded {
            return;
        }
        let history = self
            .inner
            .plane
            .decision_history(
                fence,
                pb::ListScalingDecisionHistoryRequest {
                    page_size: 1000,
                    actions: vec![pb::ScalingAction::ScaleUp as i32],
                    since: Some(ts(now - COOLDOWN_LOOKBACK)),
                    ..Default::default()
                },
            )
            .await;
        match history {
            Ok(h) => {
                let mut m = self.memory();
                for d in h.decisions {
                    let Some(at) = d.at.and_then(|t| DateTime::from_timestamp(t.seconds, 0)) else {
                        continue;
                    };
                    let e = m.last_scale_up.entry(d.template_name).or_insert(at);
                    if at > *e {
                        *e = at;
                    }
                }
                m.scale_ups_loaded = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read past scale-ups; cooldowns start empty")
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_decision(
        &self,
        fence: &Fence,
        now: DateTime<Utc>,
        action: pb::ScalingAction,
        template: &str,
        worker_id: &str,
        count: u32,
        reason: &str,
        code: &str,
        trigger: pb::ScalingTrigger,
        context: &serde_json::Value,
        instances: &[String],
        ready_at: Option<DateTime<Utc>>,
    ) -> Result<pb::ScalingDecision> {
        tracing::info!(
            action = action.as_str_name(),
            template,
            worker = worker_id,
            count,
            code,
            reason,
            "scaling decision"
        );
        let decision = pb::ScalingDecision {
            at: Some(ts(now)),
            action: action as i32,
            template_name: template.to_owned(),
            worker_id: worker_id.to_owned(),
            count: i32::try_from(count).unwrap_or(i32::MAX),
            reason: short_reason(reason),
            reason_code: code.to_owned(),
            triggered_by: trigger as i32,
            context: json_struct(context),
            estimated_ready_at: ready_at.map(ts),
            instance_ids: instances.iter().take(1000).cloned().collect(),
            ..Default::default()
        };
        self.inner
            .plane
            .record_decision(fence, decision, uuid::Uuid::new_v4().simple().to_string())
            .await
    }

    async fn carry_out(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        d: &core_as::ScalingDecision,
        decision: &pb::ScalingDecision,
        worker: Option<&pb::CmlWorker>,
    ) -> Result<()> {
        use pb::WorkerState as S;
        let cloud = self.inner.deps.cloud.clone();
        let transition = |w: &pb::CmlWorker, to: S, reason: &str| {
            let req = pb::TransitionWorkerRequest {
                worker_id: w.id.clone(),
                from: w.state,
                to: to as i32,
                reason: reason.to_owned(),
                scaling_decision_id: decision.id.clone(),
                ..Default::default()
            };
            let plane = self.inner.plane.clone();
            async move { plane.transition_worker(fence, req).await }
        };
        let aws = |w: &pb::CmlWorker| {
            w.ec2
                .as_ref()
                .map(|e| e.instance_id.clone())
                .filter(|s| !s.is_empty())
        };
        match d.action {
            ScalingAction::ScaleUp => {
                let template = d.template.clone().unwrap_or_default();
                for n in 0..d.count {
                    self.inner
                        .plane
                        .create_worker_record(
                            fence,
                            pb::CreateWorkerRecordRequest {
                                template_name: template.clone(),
                                reason: d.code.to_owned(),
                                scaling_decision_id: decision.id.clone(),
                                request_id: format!("{}/{n}", decision.id),
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                self.memory().last_scale_up.insert(template, snap.now);
            }
            ScalingAction::RestartStopped
            | ScalingAction::Drain
            | ScalingAction::Stop
            | ScalingAction::ForceStop
            | ScalingAction::Terminate => {
                let w = worker.ok_or_else(|| missing(d))?;
                if d.action == ScalingAction::ForceStop {
                    for id in &d.instances {
                        let Some(inst) = snap.instances.iter().find(|i| &i.id == id) else {
                            continue;
                        };
                        self.inner
                            .plane
                            .transition_instance(
                                fence,
                                pb::TransitionInstanceRequest {
                                    instance_id: inst.id.clone(),
                                    from: inst.state,
                                    to: pb::InstanceState::Terminated as i32,
                                    reason: ccm_core::instance::REASON_DRAIN_TIMEOUT.to_owned(),
                                    ..Default::default()
                                },
                            )
                            .await?;
                    }
                }
                let to = match d.action {
                    ScalingAction::RestartStopped => S::Starting,
                    ScalingAction::Drain => S::Draining,
                    ScalingAction::Terminate => S::ShuttingDown,
                    _ => S::Stopping,
                };
                transition(w, to, d.code).await?;
                if let Some(id) = aws(w) {
                    match d.action {
                        ScalingAction::RestartStopped => cloud.start(&id).await?,
                        ScalingAction::Stop | ScalingAction::ForceStop => cloud.stop(&id).await?,
                        ScalingAction::Terminate => cloud.terminate(&id).await?,
                        _ => {}
                    }
                }
            }
            ScalingAction::Wait => {}
        }
        Ok(())
    }
}

fn missing(d: &core_as::ScalingDecision) -> ControllerError {
    ControllerError::Domain(format!(
        "{} names worker {:?}, which is not in the snapshot",
        d.action,
        d.worker_id.as_deref().unwrap_or("")
    ))
}
