//! The ControllerService gRPC API, served by every replica: status and decisions from any
//! replica, `Reconcile` only from the leader (standbys answer `UNAVAILABLE`).

use ccm_proto::v1 as pb;
use ccm_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::config::ELECTION;
use crate::controller::{Controller, ManualRequest};
use crate::error::ControllerError;
use crate::plane::Fence;

/// Longest reason a Reconcile request may carry.
pub const MAX_RECONCILE_REASON_LEN: usize = 256;
/// Largest page of ListScalingDecisions.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// The ControllerService implementation over a [`Controller`].
#[derive(Debug, Clone)]
pub struct ControllerApi {
    controller: Controller,
}

/// The tonic server for `controller`.
pub fn server(controller: Controller) -> ControllerServiceServer<ControllerApi> {
    ControllerServiceServer::new(ControllerApi { controller })
}

fn bad_request(field: &str, why: &str) -> Status {
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {why}"),
        ErrorDetails::with_bad_request_violation(field, why),
    )
}

#[tonic::async_trait]
impl ControllerService for ControllerApi {
    async fn get_controller_status(
        &self,
        _request: Request<pb::GetControllerStatusRequest>,
    ) -> Result<Response<pb::GetControllerStatusResponse>, Status> {
        let c = &self.controller;
        let leader = match c.inner.deps.coordinator.leader(ELECTION).await {
            Ok(Some(l)) => Some(pb::LeaderInfo {
                is_leader: l.holder == c.settings().replica_id && c.is_leader(),
                replica_id: c.settings().replica_id.clone(),
                holder_id: l.holder.clone(),
                epoch: l.epoch,
                ..Default::default()
            }),
            Ok(None) => Some(pb::LeaderInfo {
                replica_id: c.settings().replica_id.clone(),
                ..Default::default()
            }),
            Err(e) => return Err(Status::unavailable(format!("coordination: {e}"))),
        };
        Ok(Response::new(pb::GetControllerStatusResponse {
            leader,
            reconcilers: c.status().reconcilers(),
            fleet: Some(c.status().fleet()),
            cloud_provider: c.inner.deps.cloud.kind().to_owned(),
        }))
    }

    async fn list_scaling_decisions(
        &self,
        request: Request<pb::ListScalingDecisionsRequest>,
    ) -> Result<Response<pb::ListScalingDecisionsResponse>, Status> {
        let req = request.into_inner();
        if !(0..=MAX_PAGE_SIZE).contains(&req.page_size) {
            return Err(bad_request(
                "page_size",
                &format!("must be 0..{MAX_PAGE_SIZE}, got {}", req.page_size),
            ));
        }
        let c = &self.controller;
        // Reads need the controller's identity, not a current epoch: a standby uses the
        // current leader's epoch (or 1 before anyone led).
        let fence = match c.leader_fence() {
            Some(f) => f,
            None => {
                let epoch = match c.inner.deps.coordinator.leader(ELECTION).await {
                    Ok(Some(l)) => l.epoch,
                    _ => 1,
                };
                Fence {
                    epoch,
                    holder: c.settings().replica_id.clone(),
                }
            }
        };
        let out = c
            .inner
            .plane
            .decision_history(
                &fence,
                pb::ListScalingDecisionHistoryRequest {
                    fence: None,
                    page_size: req.page_size,
                    page_token: req.page_token,
                    actions: req.actions,
                    template_name: req.template_name,
                    worker_id: req.worker_id,
                    since: req.since,
                    until: req.until,
                },
            )
            .await?;
        Ok(Response::new(pb::ListScalingDecisionsResponse {
            decisions: out.decisions,
            next_page_token: out.next_page_token,
        }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let req = request.into_inner();
        let scope = pb::ReconcileScope::try_from(req.scope)
            .map_err(|_| bad_request("scope", &format!("unknown scope {}", req.scope)))?;
        if !req.target_id.is_empty()
            && !matches!(
                scope,
                pb::ReconcileScope::Instances | pb::ReconcileScope::Workers
            )
        {
            return Err(bad_request(
                "target_id",
                "only INSTANCES and WORKERS reconciles take a target",
            ));
        }
        if req.target_id.len() > 128 || req.target_id.chars().any(char::is_control) {
            return Err(bad_request(
                "target_id",
                "must be an id of at most 128 characters",
            ));
        }
        if req.reason.chars().count() > MAX_RECONCILE_REASON_LEN
            || req.reason.chars().any(char::is_control)
        {
            return Err(bad_request(
                "reason",
                &format!("must be one line of at most {MAX_RECONCILE_REASON_LEN} characters"),
            ));
        }
        let reconcilers: Vec<String> = match scope {
            pb::ReconcileScope::Instances => vec![crate::status::INSTANCES.into()],
            pb::ReconcileScope::Workers => vec![
                crate::status::WORKERS.into(),
                crate::status::OPERATIONS.into(),
            ],
            pb::ReconcileScope::Autoscaler => vec![crate::status::AUTOSCALER.into()],
            pb::ReconcileScope::Unspecified => crate::status::RECONCILERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        };
        let reason = if req.reason.trim().is_empty() {
            "requested".to_owned()
        } else {
            req.reason.trim().to_owned()
        };
        match self.controller.request_reconcile(ManualRequest {
            scope,
            target_id: req.target_id,
            reason,
        }) {
            Ok(()) => Ok(Response::new(pb::ReconcileResponse {
                accepted: true,
                reconcilers,
            })),
            Err(ControllerError::NotLeader(why)) => Err(Status::unavailable(why)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}
