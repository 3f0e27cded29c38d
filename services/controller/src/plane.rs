//! The controller's view of the control plane: paged reads of the fleet and fenced writes.
//!
//! Every write carries the leader fence of the leadership the pass runs under ([`Fence`]); a
//! refused fence surfaces as [`ControllerError::NotLeader`] and ends the pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;

use crate::error::{ControllerError, Result};

/// Page size of the list reads (the API's maximum).
pub const LIST_PAGE_SIZE: i32 = 1000;
/// Page size of template reads (the API's maximum).
pub const TEMPLATE_PAGE_SIZE: i32 = 500;
/// Page size of operation reads (the API's maximum).
pub const OPERATION_PAGE_SIZE: i32 = 500;
/// Definition versions kept in the cache (a version is immutable, so entries never go stale).
pub const DEFINITION_CACHE_CAPACITY: usize = 4096;

/// The leader fence of the leadership a pass runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Fencing epoch.
    pub epoch: i64,
    /// Replica id.
    pub holder: String,
}

impl Fence {
    /// The proto fence.
    pub fn proto(&self) -> pb::LeaderFence {
        ccm_runtime::client::fence(crate::config::ELECTION, self.epoch, &self.holder)
    }
}

/// Definition versions by (lineage id, version).
type DefinitionCache = HashMap<(String, String), Arc<pb::LabletDefinition>>;

/// A connection to the control plane plus a cache of definition versions.
#[derive(Debug, Clone)]
pub struct Plane {
    client: PlaneClient,
    definitions: Arc<Mutex<DefinitionCache>>,
}

impl Plane {
    /// Wraps a client.
    pub fn new(client: PlaneClient) -> Self {
        Plane {
            client,
            definitions: Arc::default(),
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &PlaneClient {
        &self.client
    }

    /// Every worker that is not TERMINATED.
    pub async fn workers(&self) -> Result<Vec<pb::CmlWorker>> {
        let client = &self.client;
        all_pages(|token| {
            let req = pb::ListWorkersRequest {
                page_size: LIST_PAGE_SIZE,
                page_token: token,
                ..Default::default()
            };
            async move {
                let page = client
                    .workers()
                    .list_workers(req)
                    .await
                    .map_err(|s| ControllerError::plane("ListWorkers", s))?
                    .into_inner();
                Ok((page.workers, page.next_page_token))
            }
        })
        .await
    }

    /// Every instance that is not TERMINATED.
    pub async fn live_instances(&self) -> Result<Vec<pb::LabletInstance>> {
        use pb::InstanceState as S;
        let states = [
            S::Pending,
            S::Scheduled,
            S::Instantiating,
            S::Running,
            S::Collecting,
            S::Grading,
            S::Stopping,
            S::Stopped,
            S::Archived,
        ]
        .map(|s| s as i32)
        .to_vec();
        let client = &self.client;
        all_pages(|token| {
            let req = pb::ListInstancesRequest {
                page_size: LIST_PAGE_SIZE,
                page_token: token,
                states: states.clone(),
                ..Default::default()
            };
            async move {
                let page = client
                    .instances()
                    .list_instances(req)
                    .await
                    .map_err(|s| ControllerError::plane("ListInstances", s))?
                    .into_inner();
                Ok((page.instances, page.next_page_token))
            }
        })
        .await
    }

    /// One instance.
    pub async fn instance(&self, id: &str) -> Result<pb::LabletInstance> {
        self.client
            .instances()
            .get_instance(pb::GetInstanceRequest {
                instance_id: id.to_owned(),
            })
            .await
            .map_err(|s| ControllerError::plane("GetInstance", s))?
            .into_inner()
            .instance
            .present(|| format!("instance {id}"))
    }

    /// Every worker template.
    pub async fn templates(&self) -> Result<Vec<pb::WorkerTemplate>> {
        let client = &self.client;
        all_pages(|token| {
            let req = pb::ListTemplatesRequest {
                page_size: TEMPLATE_PAGE_SIZE,
                page_token: token,
                ..Default::default()
            };
            async move {
                let page = client
                    .templates()
                    .list_templates(req)
                    .await
                    .map_err(|s| ControllerError::plane("ListTemplates", s))?
                    .into_inner();
                Ok((page.templates, page.next_page_token))
            }
        })
        .await
    }

    /// One definition version, with its cached lab YAML (cached here: versions are immutable).
    pub async fn definition(&self, id: &str, version: &str) -> Result<Arc<pb::LabletDefinition>> {
        let key = (id.to_owned(), version.to_owned());
        if let Some(d) = self.cache().get(&key) {
            return Ok(d.clone());
        }
        let def = self
            .client
            .definitions()
            .get_definition(pb::GetDefinitionRequest {
                definition_id: id.to_owned(),
                version: version.to_owned(),
                include_lab_yaml: true,
            })
            .await
            .map_err(|s| ControllerError::plane("GetDefinition", s))?
            .into_inner()
            .definition
            .present(|| format!("definition {id}@{version}"))?;
        let def = Arc::new(def);
        let mut cache = self.cache();
        if cache.len() >= DEFINITION_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, def.clone());
        Ok(def)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DefinitionCache> {
        self.definitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Worker operations waiting for the controller (PENDING), every worker.
    pub async fn pending_operations(&self) -> Result<Vec<pb::WorkerOperation>> {
        let client = &self.client;
        all_pages(|token| {
            let req = pb::ListWorkerOperationsRequest {
                worker_id: "-".into(),
                page_size: OPERATION_PAGE_SIZE,
                page_token: token,
                statuses: vec![pb::OperationStatus::Pending as i32],
            };
            async move {
                let page = client
                    .workers()
                    .list_worker_operations(req)
                    .await
                    .map_err(|s| ControllerError::plane("ListWorkerOperations", s))?
                    .into_inner();
                Ok((page.operations, page.next_page_token))
            }
        })
        .await
    }

    /// InternalService.TransitionInstance.
    pub async fn transition_instance(
        &self,
        fence: &Fence,
        mut req: pb::TransitionInstanceRequest,
    ) -> Result<pb::LabletInstance> {
        req.fence = Some(fence.proto());
        let id = req.instance_id.clone();
        self.client
            .internal()
            .transition_instance(req)
            .await
            .map_err(|s| ControllerError::plane("TransitionInstance", s))?
            .into_inner()
            .instance
            .present(|| format!("instance {id}"))
    }

    /// InternalService.ReportWorker.
    pub async fn report_worker(
        &self,
        fence: &Fence,
        worker_id: &str,
        observation: pb::WorkerObservation,
    ) -> Result<pb::CmlWorker> {
        self.client
            .internal()
            .report_worker(pb::ReportWorkerRequest {
                fence: Some(fence.proto()),
                worker_id: worker_id.to_owned(),
                observation: Some(observation),
                resource_version: 0,
            })
            .await
            .map_err(|s| ControllerError::plane("ReportWorker", s))?
            .into_inner()
            .worker
            .present(|| format!("worker {worker_id}"))
    }

    /// InternalService.TransitionWorker.
    pub async fn transition_worker(
        &self,
        fence: &Fence,
        mut req: pb::TransitionWorkerRequest,
    ) -> Result<pb::CmlWorker> {
        req.fence = Some(fence.proto());
        let id = req.worker_id.clone();
        self.client
            .internal()
            .transition_worker(req)
            .await
            .map_err(|s| ControllerError::plane("TransitionWorker", s))?
            .into_inner()
            .worker
            .present(|| format!("worker {id}"))
    }

    /// InternalService.CreateWorkerRecord.
    pub async fn create_worker_record(
        &self,
        fence: &Fence,
        mut req: pb::CreateWorkerRecordRequest,
    ) -> Result<pb::CmlWorker> {
        req.fence = Some(fence.proto());
        self.client
            .internal()
            .create_worker_record(req)
            .await
            .map_err(|s| ControllerError::plane("CreateWorkerRecord", s))?
            .into_inner()
            .worker
            .present(|| "created worker".to_owned())
    }

    /// InternalService.RecordScalingDecision.
    pub async fn record_decision(
        &self,
        fence: &Fence,
        decision: pb::ScalingDecision,
        request_id: String,
    ) -> Result<pb::ScalingDecision> {
        self.client
            .internal()
            .record_scaling_decision(pb::RecordScalingDecisionRequest {
                fence: Some(fence.proto()),
                decision: Some(decision),
                request_id,
            })
            .await
            .map_err(|s| ControllerError::plane("RecordScalingDecision", s))?
            .into_inner()
            .decision
            .present(|| "recorded decision".to_owned())
    }

    /// InternalService.ClaimWorkerOperation.
    pub async fn claim_operation(
        &self,
        fence: &Fence,
        operation_id: &str,
    ) -> Result<pb::ClaimWorkerOperationResponse> {
        Ok(self
            .client
            .internal()
            .claim_worker_operation(pb::ClaimWorkerOperationRequest {
                fence: Some(fence.proto()),
                operation_id: operation_id.to_owned(),
            })
            .await
            .map_err(|s| ControllerError::plane("ClaimWorkerOperation", s))?
            .into_inner())
    }

    /// InternalService.CompleteWorkerOperation.
    pub async fn complete_operation(
        &self,
        fence: &Fence,
        operation_id: &str,
        status: pb::OperationStatus,
        result: Option<prost_types::Struct>,
        error: String,
    ) -> Result<()> {
        self.client
            .internal()
            .complete_worker_operation(pb::CompleteWorkerOperationRequest {
                fence: Some(fence.proto()),
                operation_id: operation_id.to_owned(),
                status: status as i32,
                result,
                error,
            })
            .await
            .map_err(|s| ControllerError::plane("CompleteWorkerOperation", s))?;
        Ok(())
    }

    /// InternalService.ListScalingDecisionHistory (a read: the fence's epoch need not be
    /// current).
    pub async fn decision_history(
        &self,
        fence: &Fence,
        mut req: pb::ListScalingDecisionHistoryRequest,
    ) -> std::result::Result<pb::ListScalingDecisionHistoryResponse, tonic::Status> {
        req.fence = Some(fence.proto());
        Ok(self
            .client
            .internal()
            .list_scaling_decision_history(req)
            .await?
            .into_inner())
    }
}

/// Reads every page of a paged list: `fetch` gets a page token and returns that page's items and
/// the next page token (empty on the last page).
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = fetch(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

/// A resource a response must carry.
trait Present<T> {
    /// The resource, or [`ControllerError::Domain`] "`what` came back empty".
    fn present(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Present<T> for Option<T> {
    fn present(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| ControllerError::Domain(format!("{} came back empty", what())))
    }
}
