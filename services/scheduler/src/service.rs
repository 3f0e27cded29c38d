//! `SchedulerService`: the scheduler's status and the what-if planner.
//!
//! Every replica serves it. `GetSchedulerStatus` reports this replica's own view (leader or
//! standby, queue, last cycle) plus the election's current holder read from the coordinator.
//! `Plan` lists the fleet and bookings afresh from the control plane (so standbys answer too)
//! and runs [`ccm_core::placement::plan`] on it: nothing is reserved or written.

use std::collections::HashSet;

use ccm_control_plane::convert::{
    capacity_to_proto, definition_from_proto, duration_to_proto, time_slot_from_proto,
    timestamp_from_proto, timestamp_to_proto,
};
use ccm_control_plane::error::{ApiError, FieldViolation};
use ccm_core::fleet::PlacementRequest;
use ccm_core::model::TimeSlot;
use ccm_core::placement::plan;
use ccm_proto::v1 as pb;
use ccm_proto::v1::scheduler_service_server::{SchedulerService, SchedulerServiceServer};
use tonic::{Request, Response, Status};

use crate::error::SchedulerError;
use crate::scheduler::{Scheduler, pending_summary, rejection_code};
use crate::world::World;

/// Candidates `Plan` returns when the request says 0.
pub const DEFAULT_MAX_CANDIDATES: usize = 10;
/// Most candidates `Plan` returns.
pub const MAX_CANDIDATES: i32 = 1000;
/// Most worker ids a `Plan` request may name.
pub const MAX_PLAN_WORKER_IDS: usize = 1000;

/// The gRPC server of a scheduler replica.
pub fn server(scheduler: Scheduler) -> SchedulerServiceServer<SchedulerApi> {
    SchedulerServiceServer::new(SchedulerApi { scheduler })
}

/// The `SchedulerService` implementation.
#[derive(Debug, Clone)]
pub struct SchedulerApi {
    scheduler: Scheduler,
}

fn u2i(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl SchedulerApi {
    async fn status(&self) -> Result<pb::GetSchedulerStatusResponse, ApiError> {
        let s = self.scheduler.status();
        let settings = self.scheduler.settings();
        let current = match self
            .scheduler
            .coordinator()
            .leader(&settings.election)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "coordinator cannot say who leads");
                None
            }
        };
        let leader = pb::LeaderInfo {
            is_leader: s.is_leader,
            replica_id: settings.replica_id.clone(),
            holder_id: current
                .as_ref()
                .map(|l| l.holder.clone())
                .unwrap_or_default(),
            epoch: current.as_ref().map_or(s.epoch, |l| l.epoch),
            acquired_at: s
                .acquired_at
                .filter(|_| s.is_leader)
                .map(timestamp_to_proto),
            lease_expires_at: None,
        };
        let last_cycle = s.last_cycle.as_ref().map(|c| pb::SchedulingCycleStats {
            started_at: Some(timestamp_to_proto(c.started_at)),
            duration: Some(std_duration(c.duration)),
            decide_duration: Some(std_duration(c.decide_duration)),
            commit_duration: Some(std_duration(c.commit_duration)),
            instances_considered: u2i(c.considered),
            workers_considered: u2i(c.workers),
            placed: u2i(c.placed),
            unschedulable: u2i(c.unschedulable),
            commit_conflicts: u2i(c.commit_conflicts),
            commit_batches: u2i(c.commit_batches),
            trigger: c.trigger.as_str().to_owned(),
        });
        Ok(pb::GetSchedulerStatusResponse {
            leader: Some(leader),
            queue_depth: u2i(s.queue_depth),
            queue_due: u2i(s.queue_due),
            last_cycle,
            cycles_total: i64::try_from(s.cycles_total).unwrap_or(i64::MAX),
            placements_total: i64::try_from(s.placements_total).unwrap_or(i64::MAX),
            score_policy: settings.score_policy.as_str().to_owned(),
            watch_revision: s.watch_revision,
        })
    }

    async fn plan(&self, req: pb::PlanRequest) -> Result<pb::PlanResponse, ApiError> {
        let mut violations = Vec::new();
        if req.max_candidates < 0 || req.max_candidates > MAX_CANDIDATES {
            violations.push(FieldViolation::new(
                "max_candidates",
                format!(
                    "must be in 0..={MAX_CANDIDATES}, got {}",
                    req.max_candidates
                ),
            ));
        }
        if req.worker_ids.len() > MAX_PLAN_WORKER_IDS {
            violations.push(FieldViolation::new(
                "worker_ids",
                format!("at most {MAX_PLAN_WORKER_IDS} ids"),
            ));
        }
        for (i, id) in req.worker_ids.iter().enumerate() {
            if id.trim().is_empty() {
                violations.push(FieldViolation::new(
                    format!("worker_ids[{i}]"),
                    "must not be empty",
                ));
            }
        }
        match &req.target {
            None => violations.push(FieldViolation::new(
                "target",
                "one of definition_id or instance_id is required",
            )),
            Some(pb::plan_request::Target::DefinitionId(id)) => {
                if id.trim().is_empty() {
                    violations.push(FieldViolation::new("definition_id", "must not be empty"));
                }
                if req.time_slot.is_none() {
                    violations.push(FieldViolation::new(
                        "time_slot",
                        "is required when planning for a definition",
                    ));
                }
            }
            Some(pb::plan_request::Target::InstanceId(id)) => {
                if id.trim().is_empty() {
                    violations.push(FieldViolation::new("instance_id", "must not be empty"));
                }
                if !req.definition_version.is_empty() {
                    violations.push(FieldViolation::new(
                        "definition_version",
                        "applies to a definition target only",
                    ));
                }
                if req.time_slot.is_some() {
                    violations.push(FieldViolation::new(
                        "time_slot",
                        "applies to a definition target only (an instance has its own)",
                    ));
                }
            }
        }
        if !violations.is_empty() {
            return Err(ApiError::invalid_arguments(violations));
        }
        let settings = self.scheduler.settings();
        let plane = self.scheduler.plane();
        let lead = settings.instantiation_lead;
        let now = self.scheduler.clock().now();
        let mut world = World::list(plane).await.map_err(unavailable)?;

        let request: PlacementRequest = match &req.target {
            Some(pb::plan_request::Target::InstanceId(id)) => {
                let inst = plane
                    .instances()
                    .get_instance(pb::GetInstanceRequest {
                        instance_id: id.clone(),
                    })
                    .await
                    .map_err(|s| passthrough(s, "instance", id))?
                    .into_inner()
                    .instance
                    .ok_or_else(|| ApiError::not_found("instance", id.clone()))?;
                // The instance must not compete with its own booking.
                world.instances.remove(&inst.id);
                world.instances.insert(
                    inst.id.clone(),
                    pb::LabletInstance {
                        state: pb::InstanceState::Pending as i32,
                        worker_id: String::new(),
                        allocated_ports: Default::default(),
                        ..inst.clone()
                    },
                );
                world.fetch_definitions(plane).await.map_err(unavailable)?;
                let pending = world.instances.remove(&inst.id).unwrap_or(inst);
                world.request_for(&pending, lead).map_err(|why| {
                    ApiError::failed_precondition("PLACEMENT_REQUEST", id.clone(), why)
                })?
            }
            Some(pb::plan_request::Target::DefinitionId(id)) => {
                let def = plane
                    .definitions()
                    .get_definition(pb::GetDefinitionRequest {
                        definition_id: id.clone(),
                        version: req.definition_version.clone(),
                        include_lab_yaml: false,
                    })
                    .await
                    .map_err(|s| passthrough(s, "definition", id))?
                    .into_inner()
                    .definition
                    .ok_or_else(|| ApiError::not_found("definition", id.clone()))?;
                let core = definition_from_proto(&def, "definition")
                    .map_err(|e| ApiError::internal("stored definition unreadable", e))?;
                let slot = plan_slot(req.time_slot.as_ref(), now, core.max_duration_minutes)?;
                PlacementRequest::for_definition("plan", &core, slot, lead, now)
            }
            None => return Err(ApiError::internal_msg("validated target missing")),
        };

        if !req.worker_ids.is_empty() {
            let wanted: HashSet<&str> = req.worker_ids.iter().map(String::as_str).collect();
            let unknown: Vec<FieldViolation> = req
                .worker_ids
                .iter()
                .enumerate()
                .filter(|(_, id)| !world.workers.contains_key(id.as_str()))
                .map(|(i, id)| {
                    FieldViolation::new(format!("worker_ids[{i}]"), format!("no worker {id:?}"))
                })
                .collect();
            if !unknown.is_empty() {
                return Err(ApiError::invalid_arguments(unknown));
            }
            world.workers.retain(|id, _| wanted.contains(id.as_str()));
        }

        let fleet = world.fleet(lead);
        let p = plan(&fleet, &request, settings.score_policy.scorer());
        let max = match req.max_candidates {
            0 => DEFAULT_MAX_CANDIDATES,
            n => usize::try_from(n).unwrap_or(DEFAULT_MAX_CANDIDATES),
        };
        let name_of = |id: &str| {
            world
                .workers
                .get(id)
                .map(|w| w.name.clone())
                .unwrap_or_default()
        };
        let ports_needed = request.port_names.len();
        let candidates = p
            .candidates
            .iter()
            .take(max)
            .enumerate()
            .map(|(i, c)| {
                let declared = fleet.workers()[c.worker_index].declared();
                pb::PlacementCandidate {
                    worker_id: c.worker_id.clone(),
                    worker_name: name_of(&c.worker_id),
                    score: c.score,
                    rank: u2i(i + 1),
                    available_after: Some(capacity_to_proto(
                        &declared.saturating_sub(&c.peak_after),
                    )),
                    free_ports_after: u2i(c.free_ports.saturating_sub(ports_needed)),
                }
            })
            .collect();
        let rejections = p
            .rejected
            .iter()
            .map(|r| pb::WorkerRejection {
                worker_id: r.worker_id.clone(),
                worker_name: name_of(&r.worker_id),
                reasons: vec![pb::Rejection {
                    code: rejection_code(r.reason) as i32,
                    message: r.detail.clone(),
                }],
            })
            .collect();
        let mut summary = match p.why_pending() {
            Some(u) => pending_summary(&u),
            None => pb::PendingSummary {
                total_workers: u2i(p.total_workers),
                rejections: pending_summary(&ccm_core::placement::Unschedulable {
                    total_workers: p.total_workers,
                    reasons: p.rejection_counts(),
                })
                .rejections,
                ..Default::default()
            },
        };
        summary.feasible_workers = u2i(p.candidates.len());
        summary.message = p.summary();
        Ok(pb::PlanResponse {
            feasible: !p.candidates.is_empty(),
            candidates,
            rejections,
            summary: Some(summary),
            evaluated_at: Some(timestamp_to_proto(now)),
            reserved_window: Some(pb::TimeSlot {
                start: Some(timestamp_to_proto(request.window.start)),
                end: Some(timestamp_to_proto(request.window.end)),
                asap: request.slot.asap,
            }),
        })
    }
}

/// The slot of a definition plan: an ASAP slot starts now and lasts as given (or the
/// definition's maximum duration); a fixed slot needs start and end.
fn plan_slot(
    slot: Option<&pb::TimeSlot>,
    now: chrono::DateTime<chrono::Utc>,
    max_duration_minutes: u32,
) -> Result<TimeSlot, ApiError> {
    match slot {
        Some(s) if s.asap => {
            let end = match &s.end {
                Some(e) => timestamp_from_proto(e, "time_slot.end")?,
                None => now + chrono::Duration::minutes(i64::from(max_duration_minutes.max(1))),
            };
            if end <= now {
                return Err(ApiError::invalid_argument(
                    "time_slot.end",
                    "must be after now for an ASAP slot",
                ));
            }
            Ok(TimeSlot {
                start: now,
                end,
                asap: true,
            })
        }
        other => time_slot_from_proto(other, "time_slot"),
    }
}

fn std_duration(d: std::time::Duration) -> prost_types::Duration {
    duration_to_proto(chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
}

fn unavailable(e: SchedulerError) -> ApiError {
    ApiError::unavailable(e.to_string(), None)
}

/// A control-plane answer passed on: NOT_FOUND and INVALID_ARGUMENT keep their meaning, the rest
/// is UNAVAILABLE (the scheduler could not plan).
fn passthrough(s: Status, kind: &str, id: &str) -> ApiError {
    match s.code() {
        tonic::Code::NotFound => ApiError::not_found(kind, id.to_owned()),
        tonic::Code::InvalidArgument => ApiError::invalid_argument(
            if kind == "instance" {
                "instance_id"
            } else {
                "definition_id"
            },
            s.message().to_owned(),
        ),
        _ => ApiError::unavailable(format!("control plane: {}", s.message()), None),
    }
}

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
    #[tracing::instrument(name = "SchedulerService.GetSchedulerStatus", skip_all)]
    async fn get_scheduler_status(
        &self,
        _request: Request<pb::GetSchedulerStatusRequest>,
    ) -> Result<Response<pb::GetSchedulerStatusResponse>, Status> {
        self.status()
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "SchedulerService.Plan", skip_all)]
    async fn plan(
        &self,
        request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        self.plan(request.into_inner())
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }
}
