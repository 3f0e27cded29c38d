//! WorkerService: the fleet of CML workers — reads with their booked capacity, admin actions
//! recorded as a desired state (and, where the domain allows the control plane to decide at
//! once, a state transition), and asynchronous operations the controller carries out.
//!
//! The control plane never calls EC2 or CML. Everything that needs them is recorded for the
//! controller: a worker record in PENDING (create) or UNKNOWN (import), a `desired_state`
//! (start / stop / terminate), desired EC2 tags, or a [`pb::WorkerOperation`] in PENDING
//! (licence, refresh, lab control) that the controller claims and completes through
//! `InternalService`.
//!
//! # Derived fields
//!
//! Reads compute a worker's `allocated_capacity`, `available_capacity`, `port_allocations`,
//! `available_ports` and `instance_ids` from the instances placed on it whose state holds
//! resources (`InstanceState::holds_resources`: SCHEDULED … ARCHIVED). An instance's demand is
//! its definition version's CPU / memory / storage and node count; its booking window is
//! `[slot start − instantiation lead, slot end)` (no lead for ASAP). **Allocated now** counts an
//! instance once its booking window has begun, and always once it left SCHEDULED (its lab is on
//! the worker until TERMINATED); future bookings show in GetWorkerCapacity's time line, built
//! with `ccm_core::capacity::CapacityTimeline`.
//!
//! # Actions
//!
//! | RPC | what is recorded |
//! |---|---|
//! | CreateWorker | a PENDING worker from a template: declared capacity (`WorkerTemplate::declared_capacity`, nodes licence-capped), port range, licence type, EC2 instance type / region / AMI override / tags (template tags, then the request's, then `Name`, `ccm:template`, `ccm:managed`, `ManagedBy`). The controller launches it. `request_id` makes it idempotent. |
//! | ImportWorkers | by `aws_instance_id`: a worker in UNKNOWN with that EC2 id (claim [`AWS_INSTANCE_CLAIM_NAMESPACE`] so an instance is adopted once) plus a REFRESH operation; the controller's next observation maps it to its real state and fills the EC2 / CML facts (Name tag, IPs, AMI). By AMI id / name: refused (`FAILED_PRECONDITION`, `UNSUPPORTED`): finding the instances needs an EC2 search only the controller can make, and the contract has no operation kind for it yet. |
//! | StartWorker | `desired_state` RUNNING and `start_initiated_at`; the controller starts EC2 and moves STOPPED → STARTING → RUNNING. Refused for SHUTTING_DOWN / TERMINATED / FAILED. |
//! | StopWorker | refused while instances are active (every state but PENDING / ARCHIVED / TERMINATED) unless `force`, which force-terminates them (reason [`REASON_WORKER_STOPPED`]); then `desired_state` STOPPED, `stop_initiated_at`, and RUNNING / DRAINING / UNKNOWN → STOPPING at once (`begin_stop`, so no placement lands on it meanwhile; the controller stops EC2 and records STOPPED). |
//! | DrainWorker | RUNNING → DRAINING (`drain`), with `DrainInfo` (reason, default [`DEFAULT_DRAIN_REASON`]; deadline = now + the request's timeout, else the template's `drain_timeout`, else 4 h; `requested_by`; active instances at start). Emits `ccm.worker.draining`. |
//! | CancelWorkerDrain | DRAINING → RUNNING (`cancel_drain`, admin only), drain info cleared. Emits `ccm.worker.drain.cancelled`. |
//! | TerminateWorker | refused while instances are active unless `force` (then every instance holding resources is force-terminated, reason [`REASON_WORKER_TERMINATED`]); `forget_only` deletes the record and leaves EC2 alone; otherwise `desired_state` TERMINATED, `terminated_by`, and → SHUTTING_DOWN at once (`begin_terminate`); the controller terminates EC2 and records TERMINATED. |
//! | UpdateWorkerTags | the desired EC2 tag set in `ec2.tags` (replace by default — keys not given are deleted, as in the legacy API — or merge); ccm's own `ccm:` keys and `aws:` keys already there are kept; condition [`TAGS_CONDITION`] FALSE / `TagsUpdated` tells the controller to apply them. |
//! | RegisterWorkerLicense, DeregisterWorkerLicense, RefreshWorker, ControlWorkerLab | a PENDING [`pb::WorkerOperation`]. |
//!
//! Every change is audited (`worker.create`, `worker.import`, `worker.start`, `worker.stop`,
//! `worker.drain`, `worker.cancel_drain`, `worker.terminate`, `worker.forget`, `worker.tags`,
//! `worker_operation.create`) and announced on the change feed; state transitions also emit the
//! catalog's CloudEvent ([`worker_event`]). A non-zero `resource_version` that is not the stored
//! one is `ABORTED`.
//!
//! # Where the licence token lives
//!
//! The token of a REGISTER_LICENSE operation is never part of a public read: it is held as a
//! store **claim** of the operation document, created in the same commit as the operation with
//! `internal::license_token_claim` (namespace `internal::LICENSE_TOKEN_CLAIM`, key
//! `<operation id>/<token>`). `InternalService.ClaimWorkerOperation` reads it with
//! `internal::license_token_of`; `CompleteWorkerOperation` releases it. The token is never
//! logged, audited or echoed in an error. ccm does not encrypt it itself: encryption at rest is
//! the store's (MongoDB / disk) configuration.
//!
//! # Where a worker's labs live
//!
//! The last synced CML labs of a worker are one snapshot document of kind WorkerOperation with
//! id [`labs_snapshot_id`] (`labs:<worker id>`), kind and status UNSPECIFIED and the labs in
//! `result` (written with [`labs_snapshot`], read with [`labs_from_snapshot`]). Its status
//! keeps it out of every operation listing ([`OPERATION_STATUSES`]) and GetWorkerOperation
//! answers `NOT_FOUND` for it. `InternalService.ReportWorker` with `labs_synced` must write it.
//!
//! # Refresh
//!
//! RefreshWorker answers, in this order: NOT_RUNNING (the worker is neither RUNNING nor
//! DRAINING), ALREADY_SCHEDULED (a REFRESH operation is PENDING or RUNNING: it is returned),
//! RATE_LIMITED (a REFRESH was requested less than [`REFRESH_MIN_INTERVAL`] ago; `retry_after`
//! says how long to wait), POLL_IMMINENT (the controller's next poll, `next_refresh_at`, is
//! within [`POLL_IMMINENT_WINDOW`]); otherwise it queues a REFRESH operation. Operations are
//! indexed by their negated creation time (`repo.rs`), so the rate limit is one indexed query.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ccm_cloudevents::catalog::{event_type_for_worker_state, event_type_for_worker_transition};
use ccm_core::capacity::CapacityTimeline;
use ccm_core::defaults::DRAIN_TIMEOUT_HOURS;
use ccm_core::model::{Actor, Capacity, InstanceState, TimeWindow, WorkerState};
use ccm_proto::v1 as pb;
use ccm_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use ccm_store::{Claim, ClaimChange, Filter, IndexField, Kind, Order, Query};
use chrono::{DateTime, Duration, Utc};
use prost_reflect::{DeserializeOptions, DynamicMessage, ReflectMessage};
use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status};

use super::instances::{
    check_version, collect_page, derived_uuid, force_terminate_into, has_role, holding_state_names,
    load_all, rfc3339, struct_of,
};
use super::internal::license_token_claim;
use crate::app::App;
use crate::convert;
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, Mutation, Origin};
use crate::repo::{self, Entity};
use crate::server;
use crate::services::{Scope, caller_of};
use crate::validate::{self, Violations};

/// GetWorkerCapacity's time line when the request gives no end: 24 h from its start.
pub const DEFAULT_CAPACITY_WINDOW: Duration = Duration::hours(24);
/// Longest time line GetWorkerCapacity answers (worker.proto: at most 14 days).
pub const MAX_CAPACITY_WINDOW: Duration = Duration::days(14);
/// Longest drain timeout a DrainWorker request may give.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::days(7);
/// Drain reason when the request gives none (DrainInfo: "admin").
pub const DEFAULT_DRAIN_REASON: &str = "admin";
/// State-history / audit reason of an admin stop.
pub const REASON_ADMIN_STOP: &str = "admin_stop";
/// State-history / audit reason of an admin terminate.
pub const REASON_ADMIN_TERMINATE: &str = "admin_terminate";
/// Reason of a worker created by CreateWorker.
pub const REASON_WORKER_CREATED: &str = "created";
/// Reason of a worker created by ImportWorkers.
pub const REASON_IMPORTED: &str = "imported";
/// Termination reason of the instances a forced StopWorker ends (worker.proto).
pub const REASON_WORKER_STOPPED: &str = "worker_stopped";
/// Termination reason of the instances a forced TerminateWorker ends.
pub const REASON_WORKER_TERMINATED: &str = "worker_terminated";
/// Minimum time between two refreshes of one worker (legacy: 10 s).
pub const REFRESH_MIN_INTERVAL: Duration = Duration::seconds(10);
/// A refresh is skipped when the controller's own poll is due within this span.
pub const POLL_IMMINENT_WINDOW: Duration = Duration::seconds(10);
/// Longest licence token accepted, in bytes of printable ASCII.
pub const MAX_LICENSE_TOKEN_LEN: usize = 512;
/// Longest CML lab id accepted.
pub const MAX_LAB_ID_LEN: usize = 64;
/// Claim namespace of the EC2 instance a worker is (`<instance id>`), so one EC2 instance is
/// never adopted twice.
pub const AWS_INSTANCE_CLAIM_NAMESPACE: &str = "aws_instance";
/// Namespace of the worker ids derived from CreateWorker idempotency keys.
pub const WORKER_IDEMPOTENCY_NAMESPACE: &str = "ccm.v1.WorkerService/CreateWorker";
/// Condition type telling the controller the desired EC2 tags differ from EC2's.
pub const TAGS_CONDITION: &str = "TagsSynced";
/// Prefix of the id of a worker's labs snapshot document.
pub const LABS_SNAPSHOT_PREFIX: &str = "labs:";
/// The EC2 tag ccm writes with the template name.
pub const TAG_TEMPLATE: &str = "ccm:template";
/// The EC2 tag ccm writes on the workers it manages.
pub const TAG_MANAGED: &str = "ccm:managed";
/// The conventional `ManagedBy` tag.
pub const TAG_MANAGED_BY: &str = "ManagedBy";
/// Value of [`TAG_MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "ccm";
/// The EC2 `Name` tag.
pub const TAG_NAME: &str = "Name";

/// The real operation statuses (a labs snapshot has none).
pub const OPERATION_STATUSES: [pb::OperationStatus; 5] = [
    pb::OperationStatus::Pending,
    pb::OperationStatus::Running,
    pb::OperationStatus::Succeeded,
    pb::OperationStatus::Failed,
    pb::OperationStatus::Cancelled,
];

const SERVICE_PATH: &str = "/ccm.v1.WorkerService/";
const TYPE_NAME: &str = <pb::CmlWorker as Entity>::TYPE_NAME;
const OP_TYPE_NAME: &str = <pb::WorkerOperation as Entity>::TYPE_NAME;

/// The WorkerService implementation.
#[derive(Debug, Clone)]
pub struct Workers {
    app: App,
}

/// The tonic server for [`Workers`].
pub fn server(app: App) -> WorkerServiceServer<Workers> {
    WorkerServiceServer::new(Workers { app })
}

// ---------------------------------------------------------------------------------------------
// Public helpers (shared with InternalService / InstanceService)
// ---------------------------------------------------------------------------------------------

/// The host a user or the controller reaches a worker at: its public IP, else the host of its
/// HTTPS endpoint, else its private IP.
pub fn worker_host(worker: &pb::CmlWorker) -> Option<String> {
    let ec2 = worker.ec2.as_ref()?;
    if !ec2.public_ip.is_empty() {
        return Some(ec2.public_ip.clone());
    }
    let endpoint = ec2.https_endpoint.trim();
    if !endpoint.is_empty() {
        let rest = endpoint
            .split_once("://")
            .map_or(endpoint, |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or_default();
        let host = if let Some(bracketed) = authority.strip_prefix('[') {
            bracketed.split(']').next().unwrap_or_default()
        } else {
            authority.split(':').next().unwrap_or_default()
        };
        if !host.is_empty() {
            return Some(host.to_owned());
        }
    }
    (!ec2.private_ip.is_empty()).then(|| ec2.private_ip.clone())
}

/// The claim a worker holds for its EC2 instance.
pub fn aws_instance_claim(aws_instance_id: &str) -> Claim {
    Claim::new(AWS_INSTANCE_CLAIM_NAMESPACE, aws_instance_id)
}

/// The document id of a worker's labs snapshot.
pub fn labs_snapshot_id(worker_id: &str) -> String {
    format!("{LABS_SNAPSHOT_PREFIX}{worker_id}")
}

/// The labs snapshot of a worker as a document to create or update (kind and status
/// UNSPECIFIED; `result` = `{"labs": [CmlLab as canonical JSON…], "last_synced_at": RFC 3339}`;
/// `created_at` = the sync time). Give it the stored `resource_version` to update it.
pub fn labs_snapshot(
    worker_id: &str,
    labs: &[pb::CmlLab],
    synced_at: DateTime<Utc>,
) -> Result<pb::WorkerOperation, ApiError> {
    let mut list = Vec::with_capacity(labs.len());
    for lab in labs {
        list.push(
            serde_json::to_value(lab.transcode_to_dynamic())
                .map_err(|e| ApiError::internal("encoding a CML lab", e))?,
        );
    }
    Ok(pb::WorkerOperation {
        id: labs_snapshot_id(worker_id),
        worker_id: worker_id.to_owned(),
        kind: pb::WorkerOperationKind::Unspecified as i32,
        status: pb::OperationStatus::Unspecified as i32,
        result: Some(struct_of(json!({
            "labs": list,
            "last_synced_at": rfc3339(synced_at),
        }))),
        requested_by: "service:controller".into(),
        created_at: Some(convert::timestamp_to_proto(synced_at)),
        ..Default::default()
    })
}

/// The labs and sync time held by a snapshot written with [`labs_snapshot`].
pub fn labs_from_snapshot(
    snapshot: &pb::WorkerOperation,
) -> Result<(Vec<pb::CmlLab>, Option<prost_types::Timestamp>), ApiError> {
    let Some(result) = &snapshot.result else {
        return Ok((Vec::new(), None));
    };
    let value = struct_to_json(result);
    let mut labs = Vec::new();
    if let Some(items) = value.get("labs").and_then(Value::as_array) {
        for item in items {
            let text = item.to_string();
            let mut de = serde_json::Deserializer::from_str(&text);
            let options = DeserializeOptions::new().deny_unknown_fields(false);
            let dynamic = DynamicMessage::deserialize_with_options(
                pb::CmlLab::default().descriptor(),
                &mut de,
                &options,
            )
            .map_err(|e| ApiError::internal("reading a stored CML lab", e))?;
            labs.push(
                dynamic
                    .transcode_to::<pb::CmlLab>()
                    .map_err(|e| ApiError::internal("reading a stored CML lab", e))?,
            );
        }
    }
    let synced = value
        .get("last_synced_at")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| convert::timestamp_to_proto(t.with_timezone(&Utc)));
    Ok((labs, synced))
}

fn struct_to_json(s: &prost_types::Struct) -> Value {
    fn value(v: &prost_types::Value) -> Value {
        use prost_types::value::Kind as K;
        match &v.kind {
            None | Some(K::NullValue(_)) => Value::Null,
            Some(K::BoolValue(b)) => Value::Bool(*b),
            Some(K::NumberValue(n)) => {
                if n.fract() == 0.0 && n.abs() < 9.0e15 {
                    json!(*n as i64)
                } else {
                    json!(n)
                }
            }
            Some(K::StringValue(s)) => Value::String(s.clone()),
            Some(K::ListValue(l)) => Value::Array(l.values.iter().map(value).collect()),
            Some(K::StructValue(s)) => struct_to_json(s),
        }
    }
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value(v)))
            .collect(),
    )
}

/// The lower-case name of a worker state as CloudEvent payloads carry it (`draining`).
pub fn worker_state_word(state: WorkerState) -> String {
    state.as_str().to_ascii_lowercase()
}

/// The CloudEvent for `worker` having entered its current state from `previous` (`None` for a
/// new record): the catalog's type (`ccm.worker.<state>`, or `ccm.worker.drain.cancelled` for
/// DRAINING → RUNNING), subject the worker id, data `worker_id`, `name`, `template_name`,
/// `license_type`, `previous_state` / `new_state` (lower-case), `desired_state`, `reason`,
/// `actor`, `timestamp`, then `extra`.
pub fn worker_event(
    factory: &ccm_cloudevents::EventFactory,
    worker: &pb::CmlWorker,
    previous: Option<WorkerState>,
    reason: &str,
    actor: &str,
    at: DateTime<Utc>,
    extra: Map<String, Value>,
) -> ccm_cloudevents::CloudEvent {
    let state =
        convert::worker_state_from_proto(worker.state, "state").unwrap_or(WorkerState::Unknown);
    let mut data = Map::new();
    data.insert("worker_id".into(), json!(worker.id));
    data.insert("name".into(), json!(worker.name));
    data.insert("template_name".into(), json!(worker.template_name));
    data.insert(
        "license_type".into(),
        json!(worker.license_type().as_str_name()),
    );
    data.insert(
        "previous_state".into(),
        previous.map_or(Value::Null, |s| Value::String(worker_state_word(s))),
    );
    data.insert("new_state".into(), json!(worker_state_word(state)));
    data.insert(
        "desired_state".into(),
        json!(worker.desired_state().as_str_name()),
    );
    data.insert("reason".into(), json!(reason));
    data.insert("actor".into(), json!(actor));
    data.insert("timestamp".into(), json!(rfc3339(at)));
    data.extend(extra);
    let event_type = match previous {
        Some(from) => event_type_for_worker_transition(from, state),
        None => event_type_for_worker_state(state),
    };
    factory.event(event_type, &worker.id, Value::Object(data), at)
}

/// The domain model of a stored worker (`INTERNAL` if the stored document is not valid).
pub fn worker_to_core(worker: &pb::CmlWorker) -> Result<ccm_core::model::CmlWorker, ApiError> {
    convert::worker_from_proto(worker, "")
        .map_err(|e| ApiError::internal_msg(format!("stored worker {} is invalid: {e}", worker.id)))
}

/// Copies a domain transition back: state, `state_reason` (the last transition's reason) and,
/// leaving DRAINING, the drain info.
fn copy_worker_state(target: &mut pb::CmlWorker, core: &ccm_core::model::CmlWorker) {
    target.state = convert::worker_state_to_proto(core.state) as i32;
    if let Some(last) = core.state_history.last() {
        target.state_reason = last.reason.clone();
    }
    if core.state != WorkerState::Draining {
        target.drain = None;
    }
}

// ---------------------------------------------------------------------------------------------
// Instances on workers
// ---------------------------------------------------------------------------------------------

/// One instance holding resources on a worker, with what it reserves.
#[derive(Debug, Clone)]
struct Held {
    instance: pb::LabletInstance,
    state: InstanceState,
    window: Option<TimeWindow>,
    demand: Capacity,
}

impl Held {
    /// Counts towards "allocated now": its window has begun, or it left SCHEDULED.
    fn allocated_at(&self, now: DateTime<Utc>) -> bool {
        self.state != InstanceState::Scheduled || self.window.is_none_or(|w| w.start <= now)
    }
}

fn demand_of(definition: &pb::LabletDefinition) -> Capacity {
    let r = definition.resource_requirements.clone().unwrap_or_default();
    let u = |n: i32| u32::try_from(n).unwrap_or(0);
    Capacity::new(
        u(r.cpu_cores),
        u(r.memory_gb),
        u(r.storage_gb),
        u(definition.node_count),
    )
}

fn declared_of(worker: &pb::CmlWorker) -> Capacity {
    worker
        .declared_capacity
        .as_ref()
        .and_then(|c| convert::capacity_from_proto(c, "declared_capacity").ok())
        .unwrap_or(convert::LEGACY_DECLARED_CAPACITY)
}

fn port_total(worker: &pb::CmlWorker) -> i32 {
    let range = convert::port_range_from_proto(worker.port_range.as_ref(), "port_range")
        .unwrap_or_default();
    i32::try_from(range.len()).unwrap_or(i32::MAX)
}

impl Workers {
    /// [`held_by_worker`] on this service's app.
    async fn held(&self, worker_id: Option<&str>) -> Result<HashMap<String, Vec<Held>>, ApiError> {
        held_by_worker(&self.app, worker_id).await
    }
}

/// `worker` with its derived fields (`allocated_capacity`, `available_capacity`,
/// `port_allocations`, `available_ports`, `instance_ids`) computed from the instances it holds
/// now, as GetWorker answers it. Used by WatchEvents too, so the feed shows the same worker.
pub(crate) async fn enriched_worker(
    app: &App,
    mut worker: pb::CmlWorker,
) -> Result<pb::CmlWorker, ApiError> {
    let held = held_by_worker(app, Some(&worker.id)).await?;
    let mine = held.get(&worker.id).map(Vec::as_slice).unwrap_or_default();
    enrich(&mut worker, mine, app.now());
    Ok(worker)
}

/// The instances holding resources, by worker (only `worker_id`'s when given), each with its
/// demand and booking window.
async fn held_by_worker(
    app: &App,
    worker_id: Option<&str>,
) -> Result<HashMap<String, Vec<Held>>, ApiError> {
    let mut query = Query::new(Kind::Instance)
        .ordered_by(Order::SortKeyAsc)
        .with_filter(Filter::any_of(IndexField::State, holding_state_names()));
    if let Some(w) = worker_id {
        query = query.with_filter(Filter::eq(IndexField::WorkerId, w));
    }
    let docs = load_all(app, query).await?;
    let mut instances = Vec::with_capacity(docs.len());
    for doc in &docs {
        instances.push(repo::decode::<pb::LabletInstance>(doc)?);
    }
    let ids: BTreeSet<String> = instances
        .iter()
        .map(|i| repo::definition_doc_id(&i.definition_id, &i.definition_version))
        .collect();
    let ids: Vec<String> = ids.into_iter().collect();
    let mut demands = HashMap::new();
    for chunk in ids.chunks(ccm_store::MAX_GET_MANY) {
        for doc in app.store.get_many(Kind::Definition, chunk).await? {
            let def = repo::decode_definition(&doc)?;
            demands.insert(doc.id.clone(), demand_of(&def));
        }
    }
    let lead = app.settings.instantiation_lead;
    let mut out: HashMap<String, Vec<Held>> = HashMap::new();
    for instance in instances {
        if instance.worker_id.is_empty() {
            continue;
        }
        let Ok(state) = convert::instance_state_from_proto(instance.state, "state") else {
            continue;
        };
        let key = repo::definition_doc_id(&instance.definition_id, &instance.definition_version);
        let demand = demands.get(&key).copied().unwrap_or_else(|| {
            tracing::warn!(instance_id = %instance.id, definition = %key,
                    "definition of a placed instance is missing; counting no capacity");
            Capacity::ZERO
        });
        let window = convert::time_slot_from_proto(instance.time_slot.as_ref(), "time_slot")
            .ok()
            .map(|s| s.booking_window(lead));
        out.entry(instance.worker_id.clone())
            .or_default()
            .push(Held {
                instance,
                state,
                window,
                demand,
            });
    }
    Ok(out)
}

/// Fills a worker's derived fields from the instances it holds.
fn enrich(worker: &mut pb::CmlWorker, held: &[Held], now: DateTime<Utc>) {
    let declared = declared_of(worker);
    let allocated = held
        .iter()
        .filter(|h| h.allocated_at(now))
        .fold(Capacity::ZERO, |acc, h| acc + h.demand);
    worker.allocated_capacity = Some(convert::capacity_to_proto(&allocated));
    worker.available_capacity = Some(convert::capacity_to_proto(
        &declared.saturating_sub(&allocated),
    ));
    worker.port_allocations = port_allocations(held);
    let used: usize = held.iter().map(|h| h.instance.allocated_ports.len()).sum();
    worker.available_ports = (port_total(worker) - i32::try_from(used).unwrap_or(i32::MAX)).max(0);
    worker.instance_ids = held.iter().map(|h| h.instance.id.clone()).collect();
}

fn port_allocations(held: &[Held]) -> Vec<pb::PortAllocation> {
    held.iter()
        .filter(|h| !h.instance.allocated_ports.is_empty())
        .map(|h| pb::PortAllocation {
            instance_id: h.instance.id.clone(),
            ports: h.instance.allocated_ports.clone(),
            allocated_at: h.instance.scheduled_at,
        })
        .collect()
}

/// Active instances (keep the worker from stopping: all but PENDING / ARCHIVED / TERMINATED).
fn active(held: &[Held]) -> Vec<&Held> {
    held.iter()
        .filter(|h| h.state.blocks_worker_stop())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------------

/// An EC2 instance id: `i-` and 8 or 17 lower-case hex digits.
pub fn is_aws_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// An AMI id: `ami-` and 8 or 17 lower-case hex digits.
pub fn is_ami_id(s: &str) -> bool {
    s.strip_prefix("ami-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

fn lab_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LAB_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_worker_id(v: &mut Violations, value: &str) {
    validate::id(v, "worker_id", value);
}

fn check_rv(v: &mut Violations, rv: i64) {
    if rv < 0 {
        v.add(
            "resource_version",
            format!("must not be negative, got {rv}"),
        );
    }
}

fn reason_or<'a>(given: &'a str, default: &'a str) -> &'a str {
    if given.trim().is_empty() {
        default
    } else {
        given
    }
}

fn is_reserved_tag(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    lower.starts_with(validate::RESERVED_TAG_PREFIX_AWS)
        || lower.starts_with(validate::RESERVED_TAG_PREFIX_CCM)
}

fn running_like(state: i32) -> bool {
    state == pb::WorkerState::Running as i32 || state == pb::WorkerState::Draining as i32
}

fn not_running(worker: &pb::CmlWorker, what: &str) -> ApiError {
    ApiError::failed_precondition(
        "STATE",
        "worker",
        format!(
            "{what} needs a RUNNING (or DRAINING) worker; worker {} is {}",
            worker.id,
            worker.state().as_str_name()
        ),
    )
    .on_resource(TYPE_NAME, &worker.id)
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

impl Workers {
    fn origin(&self, scope: &Scope, rpc: &str, request_id: Option<&str>) -> Origin {
        scope.origin(&format!("{SERVICE_PATH}{rpc}"), request_id)
    }

    async fn enriched(&self, worker: pb::CmlWorker) -> Result<pb::CmlWorker, ApiError> {
        enriched_worker(&self.app, worker).await
    }

    #[tracing::instrument(name = "WorkerService.ListWorkers", skip_all, fields(returned))]
    async fn list(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, ApiError> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let mut states = Vec::new();
        for (i, raw) in req.states.iter().enumerate() {
            if let Some(s) = validate::enum_value::<pb::WorkerState>(
                &mut v,
                &validate::index_path("states", i),
                *raw,
                true,
            ) {
                states.push(s.as_str_name().to_owned());
            }
        }
        let license = validate::enum_value::<pb::LicenseType>(
            &mut v,
            "license_type",
            req.license_type,
            false,
        );
        if !req.template_name.is_empty() {
            validate::template_name(&mut v, "template_name", &req.template_name);
        }
        validate::free_text(&mut v, "search", &req.search, validate::MAX_NAME_LEN, false);
        let mut fp = req.clone();
        fp.page_size = 0;
        fp.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&fp);
        let page = v.absorb(paging::page_request::<(String, String)>(
            PageKind::Workers,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let (Some(page), Some(license)) = (page, license) else {
            return Err(ApiError::internal_msg("validation produced no value"));
        };
        let mut query = Query::new(Kind::Worker);
        if !states.is_empty() {
            query = query.with_filter(Filter::any_of(IndexField::State, states));
        } else if !req.include_terminated {
            query = query.with_filter(Filter::any_of(
                IndexField::State,
                WorkerState::ALL
                    .into_iter()
                    .filter(|s| *s != WorkerState::Terminated)
                    .map(|s| convert::worker_state_name(s).to_owned()),
            ));
        }
        if !req.template_name.is_empty() {
            query = query.with_filter(Filter::eq(
                IndexField::TemplateName,
                req.template_name.clone(),
            ));
        }
        let needle = req.search.to_lowercase();
        let mut workers = Vec::new();
        for doc in load_all(&self.app, query).await? {
            let w: pb::CmlWorker = repo::decode(&doc)?;
            if license != pb::LicenseType::Unspecified && w.license_type != license as i32 {
                continue;
            }
            if !needle.is_empty() {
                let ec2 = w.ec2.clone().unwrap_or_default();
                let hay = [
                    w.name.as_str(),
                    ec2.instance_id.as_str(),
                    ec2.region.as_str(),
                ];
                if !hay.iter().any(|h| h.to_lowercase().contains(&needle)) {
                    continue;
                }
            }
            workers.push(w);
        }
        workers.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        let total = workers.len();
        let start = match &page.cursor {
            Some((name, id)) => workers.partition_point(|w| (&w.name, &w.id) <= (name, id)),
            None => 0,
        };
        let mut selected: Vec<pb::CmlWorker> = workers
            .into_iter()
            .skip(start)
            .take(page.page_size)
            .collect();
        let last = selected.last().map(|w| (w.name.clone(), w.id.clone()));
        let next = if start + selected.len() < total {
            last.map(|c| paging::encode_page_token(PageKind::Workers, fingerprint, &c))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let held = self.held(None).await?;
        let now = self.app.now();
        for w in &mut selected {
            let mine = held.get(&w.id).map(Vec::as_slice).unwrap_or_default();
            enrich(w, mine, now);
        }
        tracing::Span::current().record("returned", selected.len());
        Ok(Response::new(pb::ListWorkersResponse {
            workers: selected,
            next_page_token: next,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    #[tracing::instrument(name = "WorkerService.GetWorker", skip_all, fields(worker_id))]
    async fn get(
        &self,
        request: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::GetWorkerResponse>, ApiError> {
        let req = request.into_inner();
        tracing::Span::current().record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        v.into_result()?;
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        Ok(Response::new(pb::GetWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.GetWorkerCapacity",
        skip_all,
        fields(worker_id, bookings)
    )]
    async fn capacity(
        &self,
        request: Request<pb::GetWorkerCapacityRequest>,
    ) -> Result<Response<pb::GetWorkerCapacityResponse>, ApiError> {
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let now = self.app.now();
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        let start = match &req.window_start {
            Some(t) => v.absorb(convert::timestamp_from_proto(t, "window_start")),
            None => Some(now),
        };
        let end = match &req.window_end {
            Some(t) => v.absorb(convert::timestamp_from_proto(t, "window_end")),
            None => start.map(|s| s + DEFAULT_CAPACITY_WINDOW),
        };
        if let (Some(s), Some(e)) = (start, end) {
            if e <= s {
                v.add("window_end", format!("must be after window_start ({s})"));
            } else if e - s > MAX_CAPACITY_WINDOW {
                v.add(
                    "window_end",
                    format!(
                        "the window may span at most {} days",
                        MAX_CAPACITY_WINDOW.num_days()
                    ),
                );
            }
        }
        v.into_result()?;
        let (Some(ws), Some(we)) = (start, end) else {
            return Err(ApiError::internal_msg("validation produced no window"));
        };
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        let held_map = self.held(Some(&worker.id)).await?;
        let held = held_map
            .get(&worker.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let declared = declared_of(&worker);
        let window = TimeWindow::new(ws, we);

        let mut timeline = CapacityTimeline::new(declared);
        for h in held {
            if let Some(w) = h.window {
                timeline.insert(h.instance.id.clone(), w, h.demand);
            }
        }
        let by_id: HashMap<&str, &Held> =
            held.iter().map(|h| (h.instance.id.as_str(), h)).collect();
        let mut bookings = Vec::new();
        for b in timeline.overlapping(&window) {
            let Some(h) = by_id.get(b.instance_id.as_str()) else {
                continue;
            };
            bookings.push(pb::WorkerBooking {
                instance_id: h.instance.id.clone(),
                definition_id: h.instance.definition_id.clone(),
                definition_name: h.instance.definition_name.clone(),
                owner_id: h.instance.owner_id.clone(),
                state: h.instance.state,
                reserved_window: Some(pb::TimeSlot {
                    start: Some(convert::timestamp_to_proto(b.window.start)),
                    end: Some(convert::timestamp_to_proto(b.window.end)),
                    asap: h.instance.time_slot.as_ref().is_some_and(|s| s.asap),
                }),
                reserved: Some(convert::capacity_to_proto(&b.usage)),
                ports: h.instance.allocated_ports.clone(),
            });
        }

        // The step function: constant between consecutive booking starts / ends.
        let mut cuts: BTreeSet<DateTime<Utc>> = BTreeSet::from([ws, we]);
        for b in timeline.overlapping(&window) {
            for t in [b.window.start, b.window.end] {
                if t > ws && t < we {
                    cuts.insert(t);
                }
            }
        }
        let cuts: Vec<DateTime<Utc>> = cuts.into_iter().collect();
        let mut steps: Vec<pb::CapacityStep> = Vec::new();
        let mut last: Option<(Capacity, i32)> = None;
        for pair in cuts.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let used = timeline.usage_at(a);
            let count = timeline
                .overlapping(&TimeWindow::new(a, a + Duration::milliseconds(1)))
                .count();
            let count = i32::try_from(count).unwrap_or(i32::MAX);
            if last == Some((used, count))
                && let Some(prev) = steps.last_mut()
            {
                prev.end = Some(convert::timestamp_to_proto(b));
                continue;
            }
            last = Some((used, count));
            steps.push(pb::CapacityStep {
                start: Some(convert::timestamp_to_proto(a)),
                end: Some(convert::timestamp_to_proto(b)),
                allocated: Some(convert::capacity_to_proto(&used)),
                available: Some(convert::capacity_to_proto(&declared.saturating_sub(&used))),
                instance_count: count,
            });
        }

        let allocated = held
            .iter()
            .filter(|h| h.allocated_at(now))
            .fold(Capacity::ZERO, |acc, h| acc + h.demand);
        let total = port_total(&worker);
        let used: usize = held.iter().map(|h| h.instance.allocated_ports.len()).sum();
        let used = i32::try_from(used).unwrap_or(i32::MAX);
        span.record("bookings", bookings.len());
        Ok(Response::new(pb::GetWorkerCapacityResponse {
            worker_id: worker.id.clone(),
            declared: Some(convert::capacity_to_proto(&declared)),
            allocated: Some(convert::capacity_to_proto(&allocated)),
            available: Some(convert::capacity_to_proto(
                &declared.saturating_sub(&allocated),
            )),
            ports: Some(pb::PortUsage {
                range: Some(worker.port_range.unwrap_or(pb::PortRange {
                    start: i32::from(ccm_core::defaults::DEFAULT_PORT_RANGE_START),
                    end: i32::from(ccm_core::defaults::DEFAULT_PORT_RANGE_END),
                })),
                total,
                used,
                free: (total - used).max(0),
                allocations: port_allocations(held),
            }),
            bookings,
            time_line: steps,
            window: Some(pb::TimeSlot {
                start: Some(convert::timestamp_to_proto(ws)),
                end: Some(convert::timestamp_to_proto(we)),
                asap: false,
            }),
        }))
    }

    async fn template(
        &self,
        name: &str,
    ) -> Result<(pb::WorkerTemplate, ccm_core::model::WorkerTemplate), ApiError> {
        let stored: pb::WorkerTemplate = self.app.get(name).await?;
        let core = convert::template_from_proto(&stored, "template").map_err(|e| {
            ApiError::internal_msg(format!("stored template {name} is invalid: {e}"))
        })?;
        Ok((stored, core))
    }

    #[tracing::instrument(
        name = "WorkerService.CreateWorker",
        skip_all,
        fields(worker_id, template, reason)
    )]
    async fn create(
        &self,
        request: Request<pb::CreateWorkerRequest>,
    ) -> Result<Response<pb::CreateWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "CreateWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("template", req.template_name.as_str());
        let mut v = Violations::new();
        validate::template_name(&mut v, "template_name", &req.template_name);
        if !req.name.is_empty() {
            validate::resource_name(&mut v, "name", &req.name);
        }
        if !req.region.is_empty() {
            validate::resource_name(&mut v, "region", &req.region);
        }
        if !req.ami_id.is_empty() && !is_ami_id(&req.ami_id) {
            v.add(
                "ami_id",
                "must be an AMI id: \"ami-\" and 8 or 17 lower-case hex digits",
            );
        }
        validate::ec2_tags(&mut v, "tags", &req.tags);
        let key = validate::idempotency_key(&mut v, "request_id", &req.request_id);
        if !v.is_empty() {
            span.record("reason", "invalid_argument");
        }
        v.into_result()?;
        let key = key.flatten();

        let id = match key {
            Some(k) => derived_uuid(WORKER_IDEMPOTENCY_NAMESPACE, &scope.caller.subject, k),
            None => uuid::Uuid::new_v4().to_string(),
        };
        span.record("worker_id", id.as_str());
        if key.is_some()
            && let Some(existing) = self.app.find::<pb::CmlWorker>(&id).await?
        {
            span.record("reason", "idempotent_retry");
            return Ok(Response::new(pb::CreateWorkerResponse {
                worker: Some(self.enriched(existing).await?),
            }));
        }
        let (_, template) = self.template(&req.template_name).await?;
        let region = if req.region.is_empty() {
            template.regions.first().cloned().unwrap_or_default()
        } else {
            if !template.regions.is_empty() && !template.regions.contains(&req.region) {
                span.record("reason", "invalid_region");
                return Err(ApiError::invalid_argument(
                    "region",
                    format!(
                        "template {} may only be provisioned in {}",
                        template.name,
                        template.regions.join(", ")
                    ),
                ));
            }
            req.region.clone()
        };
        let name = if req.name.is_empty() {
            format!(
                "cml-worker-{}-{}",
                template.name,
                id.get(..8).unwrap_or(&id)
            )
        } else {
            req.name.clone()
        };
        let mut tags: BTreeMap<String, String> = template.tags.clone();
        tags.extend(req.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        tags.insert(TAG_NAME.into(), name.clone());
        tags.insert(TAG_TEMPLATE.into(), template.name.clone());
        tags.insert(TAG_MANAGED.into(), "true".into());
        tags.insert(TAG_MANAGED_BY.into(), MANAGED_BY_VALUE.into());
        let now = self.app.now();
        let mut worker = pb::CmlWorker {
            id: id.clone(),
            name,
            state: pb::WorkerState::Pending as i32,
            state_reason: REASON_WORKER_CREATED.into(),
            template_name: template.name.clone(),
            license_type: convert::license_type_to_proto(template.license_type) as i32,
            declared_capacity: Some(convert::capacity_to_proto(&template.declared_capacity())),
            port_range: Some(convert::port_range_to_proto(&template.port_range)),
            ec2: Some(pb::Ec2Info {
                instance_type: template.instance_type.clone(),
                ami_id: req.ami_id.clone(),
                region,
                tags: tags.into_iter().collect(),
                ..Default::default()
            }),
            created_at: Some(convert::timestamp_to_proto(now)),
            updated_at: Some(convert::timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            ..Default::default()
        };
        let mut m = Mutation::at(now);
        m.create(&mut worker, Vec::new())?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.create".into(),
                from_state: String::new(),
                to_state: pb::WorkerState::Pending.as_str_name().into(),
                reason: REASON_WORKER_CREATED.into(),
                details: Some(struct_of(json!({"template_name": template.name}))),
            },
        );
        m.emit(worker_event(
            &self.app.factory,
            &worker,
            None,
            REASON_WORKER_CREATED,
            &origin.actor,
            now,
            Map::new(),
        ));
        match self.app.commit(m).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { .. }) if key.is_some() => {
                span.record("reason", "idempotent_retry");
                let existing: pb::CmlWorker = self.app.get(&id).await?;
                return Ok(Response::new(pb::CreateWorkerResponse {
                    worker: Some(self.enriched(existing).await?),
                }));
            }
            Err(e) => return Err(e),
        }
        span.record("reason", REASON_WORKER_CREATED);
        tracing::info!(name = %worker.name, "worker record created");
        Ok(Response::new(pb::CreateWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(name = "WorkerService.ImportWorkers", skip_all, fields(reason))]
    async fn import(
        &self,
        request: Request<pb::ImportWorkersRequest>,
    ) -> Result<Response<pb::ImportWorkersResponse>, ApiError> {
        use pb::import_workers_request::Selector;
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "ImportWorkers", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        let mut v = Violations::new();
        match &req.selector {
            None => v.add(
                "selector",
                "one of aws_instance_id, ami_id or ami_name is required",
            ),
            Some(Selector::AwsInstanceId(id)) => {
                if !is_aws_instance_id(id) {
                    v.add(
                        "aws_instance_id",
                        "must be an EC2 instance id: \"i-\" and 8 or 17 lower-case hex digits",
                    );
                }
            }
            Some(Selector::AmiId(id)) => {
                if !is_ami_id(id) {
                    v.add(
                        "ami_id",
                        "must be an AMI id: \"ami-\" and 8 or 17 lower-case hex digits",
                    );
                }
            }
            Some(Selector::AmiName(name)) => {
                validate::non_empty(&mut v, "ami_name", name);
                validate::free_text(&mut v, "ami_name", name, validate::MAX_NAME_LEN, false);
            }
        }
        if !req.name.is_empty() {
            validate::resource_name(&mut v, "name", &req.name);
        }
        if !req.template_name.is_empty() {
            validate::template_name(&mut v, "template_name", &req.template_name);
        }
        if !req.region.is_empty() {
            validate::resource_name(&mut v, "region", &req.region);
        }
        if !v.is_empty() {
            span.record("reason", "invalid_argument");
        }
        v.into_result()?;
        let aws_id = match req.selector {
            Some(Selector::AwsInstanceId(id)) => id,
            _ => {
                span.record("reason", "unsupported_selector");
                return Err(ApiError::failed_precondition(
                    "UNSUPPORTED",
                    "selector",
                    "importing by AMI needs an EC2 search, which only the controller can make \
                     and which has no operation kind in the contract yet; import each instance \
                     by aws_instance_id",
                ));
            }
        };
        let template = if req.template_name.is_empty() {
            None
        } else {
            Some(self.template(&req.template_name).await?.1)
        };
        let claim = aws_instance_claim(&aws_id);
        if let Some(holder) = self.app.store.claim_holder(&claim).await? {
            span.record("reason", "already_registered");
            return Ok(Response::new(pb::ImportWorkersResponse {
                imported: Vec::new(),
                skipped: vec![pb::SkippedImport {
                    aws_instance_id: aws_id,
                    reason: format!("already registered as worker {}", holder.id),
                }],
                total_found: 1,
            }));
        }
        let now = self.app.now();
        let id = uuid::Uuid::new_v4().to_string();
        let region = if !req.region.is_empty() {
            req.region.clone()
        } else {
            template
                .as_ref()
                .and_then(|t| t.regions.first().cloned())
                .unwrap_or_default()
        };
        let name = if req.name.is_empty() {
            format!("worker-{aws_id}")
        } else {
            req.name.clone()
        };
        let mut worker = pb::CmlWorker {
            id: id.clone(),
            name,
            state: pb::WorkerState::Unknown as i32,
            state_reason: REASON_IMPORTED.into(),
            ec2: Some(pb::Ec2Info {
                instance_id: aws_id.clone(),
                region,
                ..Default::default()
            }),
            created_at: Some(convert::timestamp_to_proto(now)),
            updated_at: Some(convert::timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            ..Default::default()
        };
        if let Some(t) = &template {
            worker.template_name = t.name.clone();
            worker.license_type = convert::license_type_to_proto(t.license_type) as i32;
            worker.declared_capacity = Some(convert::capacity_to_proto(&t.declared_capacity()));
            worker.port_range = Some(convert::port_range_to_proto(&t.port_range));
        } else {
            worker.declared_capacity = Some(convert::capacity_to_proto(
                &convert::LEGACY_DECLARED_CAPACITY,
            ));
        }
        let mut refresh = pb::WorkerOperation {
            id: uuid::Uuid::new_v4().to_string(),
            worker_id: id.clone(),
            kind: pb::WorkerOperationKind::Refresh as i32,
            status: pb::OperationStatus::Pending as i32,
            include_labs: true,
            requested_by: origin.actor.clone(),
            created_at: Some(convert::timestamp_to_proto(now)),
            ..Default::default()
        };
        let mut m = Mutation::at(now);
        m.create(&mut worker, vec![claim])?;
        m.create(&mut refresh, Vec::new())?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.import".into(),
                from_state: String::new(),
                to_state: pb::WorkerState::Unknown.as_str_name().into(),
                reason: REASON_IMPORTED.into(),
                details: Some(struct_of(json!({
                    "aws_instance_id": aws_id,
                    "template_name": req.template_name,
                    "refresh_operation_id": refresh.id,
                }))),
            },
        );
        m.emit(worker_event(
            &self.app.factory,
            &worker,
            None,
            REASON_IMPORTED,
            &origin.actor,
            now,
            Map::new(),
        ));
        match self.app.commit(m).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { resource }) => {
                // Lost a race against a concurrent import of the same instance (claim taken).
                span.record("reason", "already_registered");
                return Ok(Response::new(pb::ImportWorkersResponse {
                    imported: Vec::new(),
                    skipped: vec![pb::SkippedImport {
                        aws_instance_id: aws_id,
                        reason: format!("already registered ({})", resource.name),
                    }],
                    total_found: 1,
                }));
            }
            Err(e) => return Err(e),
        }
        span.record("reason", REASON_IMPORTED);
        Ok(Response::new(pb::ImportWorkersResponse {
            imported: vec![self.enriched(worker).await?],
            skipped: Vec::new(),
            total_found: 1,
        }))
    }

    /// The common start of every worker action (start, stop, drain, cancel drain, terminate):
    /// checks the id, the reason and the expected version together (one BadRequest with every
    /// violation), then reads the worker at that version.
    async fn checked_action_target(
        &self,
        id: &str,
        reason: &str,
        rv: i64,
    ) -> Result<pb::CmlWorker, ApiError> {
        let mut v = Violations::new();
        check_worker_id(&mut v, id);
        validate::reason(&mut v, "reason", reason);
        check_rv(&mut v, rv);
        v.into_result()?;
        self.read_for_action(id, rv).await
    }

    /// Reads a worker for an action: validated id, existing, expected version.
    async fn read_for_action(&self, id: &str, rv: i64) -> Result<pb::CmlWorker, ApiError> {
        let worker: pb::CmlWorker = self.app.get(id).await?;
        check_version(TYPE_NAME, id, rv, worker.resource_version)?;
        Ok(worker)
    }

    #[tracing::instrument(
        name = "WorkerService.StartWorker",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn start(
        &self,
        request: Request<pb::StartWorkerRequest>,
    ) -> Result<Response<pb::StartWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "StartWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut worker = self
            .checked_action_target(&req.worker_id, &req.reason, req.resource_version)
            .await?;
        let state = worker.state();
        if matches!(
            state,
            pb::WorkerState::Terminated | pb::WorkerState::ShuttingDown | pb::WorkerState::Failed
        ) {
            span.record("reason", "illegal_transition");
            return Err(ApiError::illegal_transition(
                "worker",
                state.as_str_name(),
                pb::WorkerState::Running.as_str_name(),
                "a terminated, terminating or failed worker cannot be started",
            )
            .on_resource(TYPE_NAME, &worker.id));
        }
        if worker.desired_state() == pb::WorkerDesiredState::Running {
            span.record("reason", "unchanged");
            return Ok(Response::new(pb::StartWorkerResponse {
                worker: Some(self.enriched(worker).await?),
            }));
        }
        let now = self.app.now();
        let before = worker.desired_state();
        worker.desired_state = pb::WorkerDesiredState::Running as i32;
        if state != pb::WorkerState::Running {
            worker.start_initiated_at = Some(convert::timestamp_to_proto(now));
        }
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        let mut m = Mutation::at(now);
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.start".into(),
                from_state: state.as_str_name().into(),
                to_state: state.as_str_name().into(),
                reason: reason_or(&req.reason, "admin_start").into(),
                details: Some(struct_of(json!({
                    "desired_state_before": before.as_str_name(),
                    "desired_state": pb::WorkerDesiredState::Running.as_str_name(),
                }))),
            },
        );
        self.app.commit(m).await?;
        span.record("reason", "desired_running");
        Ok(Response::new(pb::StartWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    /// Force-terminates `instances` into `m` with `reason`; returns their ids.
    fn terminate_instances(
        &self,
        m: &mut Mutation,
        instances: Vec<pb::LabletInstance>,
        reason: &str,
        origin: &Origin,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, ApiError> {
        let mut ids = Vec::with_capacity(instances.len());
        for mut instance in instances {
            force_terminate_into(&self.app, m, &mut instance, reason, origin, now)?;
            ids.push(instance.id.clone());
        }
        Ok(ids)
    }

    #[tracing::instrument(name = "WorkerService.StopWorker", skip_all, fields(worker_id, reason))]
    async fn stop(
        &self,
        request: Request<pb::StopWorkerRequest>,
    ) -> Result<Response<pb::StopWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "StopWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut worker = self
            .checked_action_target(&req.worker_id, &req.reason, req.resource_version)
            .await?;
        let state = worker.state();
        if matches!(
            state,
            pb::WorkerState::Terminated | pb::WorkerState::ShuttingDown
        ) {
            span.record("reason", "illegal_transition");
            return Err(ApiError::illegal_transition(
                "worker",
                state.as_str_name(),
                pb::WorkerState::Stopped.as_str_name(),
                "the worker is terminated or terminating",
            )
            .on_resource(TYPE_NAME, &worker.id));
        }
        let held = self.held(Some(&worker.id)).await?;
        let mine = held.get(&worker.id).map(Vec::as_slice).unwrap_or_default();
        let live: Vec<pb::LabletInstance> = active(mine)
            .into_iter()
            .map(|h| h.instance.clone())
            .collect();
        if !live.is_empty() && !req.force {
            span.record("reason", "in_use");
            return Err(in_use(&worker, &live, "stop"));
        }
        let now = self.app.now();
        let reason = reason_or(&req.reason, REASON_ADMIN_STOP).to_owned();
        let mut m = Mutation::at(now);
        let terminated =
            self.terminate_instances(&mut m, live, REASON_WORKER_STOPPED, &origin, now)?;
        let mut core = worker_to_core(&worker)?;
        let from = core.state;
        let transitioned = if matches!(
            from,
            WorkerState::Running | WorkerState::Draining | WorkerState::Unknown
        ) {
            core.begin_stop(REASON_ADMIN_STOP, now, &Actor(origin.actor.clone()))
                .map_err(|e| ApiError::from(e).on_resource(TYPE_NAME, &worker.id))?;
            copy_worker_state(&mut worker, &core);
            true
        } else {
            false
        };
        let desired_changed = worker.desired_state() != pb::WorkerDesiredState::Stopped;
        if !transitioned && !desired_changed && terminated.is_empty() {
            span.record("reason", "unchanged");
            return Ok(Response::new(pb::StopWorkerResponse {
                worker: Some(self.enriched(worker).await?),
            }));
        }
        worker.desired_state = pb::WorkerDesiredState::Stopped as i32;
        if state != pb::WorkerState::Stopped {
            worker.stop_initiated_at = Some(convert::timestamp_to_proto(now));
        }
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.stop".into(),
                from_state: convert::worker_state_name(from).into(),
                to_state: worker.state().as_str_name().into(),
                reason: reason.clone(),
                details: Some(struct_of(json!({
                    "force": req.force,
                    "terminated_instances": terminated,
                }))),
            },
        );
        if transitioned {
            m.emit(worker_event(
                &self.app.factory,
                &worker,
                Some(from),
                REASON_ADMIN_STOP,
                &origin.actor,
                now,
                Map::new(),
            ));
        }
        self.app.commit(m).await?;
        span.record("reason", reason.as_str());
        Ok(Response::new(pb::StopWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.DrainWorker",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn drain(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "DrainWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        validate::reason(&mut v, "reason", &req.reason);
        check_rv(&mut v, req.resource_version);
        let timeout = match &req.timeout {
            None => Some(None),
            Some(d) => v
                .absorb(convert::duration_from_proto(d, "timeout"))
                .and_then(|d| {
                    if d <= Duration::zero() {
                        v.add("timeout", "must be positive");
                        None
                    } else if d > MAX_DRAIN_TIMEOUT {
                        v.add(
                            "timeout",
                            format!("must be at most {} days", MAX_DRAIN_TIMEOUT.num_days()),
                        );
                        None
                    } else {
                        Some(Some(d))
                    }
                }),
        };
        v.into_result()?;
        let timeout = timeout.flatten();
        let mut worker = self
            .read_for_action(&req.worker_id, req.resource_version)
            .await?;
        let now = self.app.now();
        let reason = reason_or(&req.reason, DEFAULT_DRAIN_REASON).to_owned();
        let mut core = worker_to_core(&worker)?;
        let from = core.state;
        if let Err(e) = core.drain(&reason, now, &Actor(origin.actor.clone())) {
            span.record("reason", "illegal_transition");
            return Err(ApiError::from(e).on_resource(TYPE_NAME, &worker.id));
        }
        let timeout = match timeout {
            Some(t) => t,
            None => {
                let hours = match worker.template_name.as_str() {
                    "" => None,
                    name => self
                        .app
                        .find::<pb::WorkerTemplate>(name)
                        .await?
                        .and_then(|t| convert::template_from_proto(&t, "template").ok())
                        .map(|t| i64::from(t.drain_timeout_hours)),
                };
                Duration::hours(hours.unwrap_or(DRAIN_TIMEOUT_HOURS))
            }
        };
        let deadline = now + timeout;
        let held = self.held(Some(&worker.id)).await?;
        let mine = held.get(&worker.id).map(Vec::as_slice).unwrap_or_default();
        let live = active(mine);
        let latest_end = live
            .iter()
            .filter_map(|h| {
                h.instance
                    .time_slot
                    .as_ref()
                    .and_then(|s| s.end.as_ref())
                    .and_then(|e| convert::timestamp_from_proto(e, "").ok())
            })
            .max();
        let estimated = latest_end.map_or(now, |e| e.min(deadline)).max(now);
        let count = i32::try_from(live.len()).unwrap_or(i32::MAX);
        copy_worker_state(&mut worker, &core);
        worker.drain = Some(pb::DrainInfo {
            drain_started_at: Some(convert::timestamp_to_proto(now)),
            reason: reason.clone(),
            deadline: Some(convert::timestamp_to_proto(deadline)),
            requested_by: origin.actor.clone(),
            instances_at_start: count,
        });
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        let mut m = Mutation::at(now);
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.drain".into(),
                from_state: convert::worker_state_name(from).into(),
                to_state: pb::WorkerState::Draining.as_str_name().into(),
                reason: reason.clone(),
                details: Some(struct_of(json!({
                    "deadline": rfc3339(deadline),
                    "running_instances_count": count,
                }))),
            },
        );
        let mut extra = Map::new();
        extra.insert("running_instances_count".into(), json!(count));
        extra.insert(
            "estimated_drain_completion".into(),
            json!(rfc3339(estimated)),
        );
        extra.insert("deadline".into(), json!(rfc3339(deadline)));
        m.emit(worker_event(
            &self.app.factory,
            &worker,
            Some(from),
            &reason,
            &origin.actor,
            now,
            extra,
        ));
        self.app.commit(m).await?;
        span.record("reason", reason.as_str());
        Ok(Response::new(pb::DrainWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.CancelWorkerDrain",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn cancel_drain(
        &self,
        request: Request<pb::CancelWorkerDrainRequest>,
    ) -> Result<Response<pb::CancelWorkerDrainResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "CancelWorkerDrain", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut worker = self
            .checked_action_target(&req.worker_id, &req.reason, req.resource_version)
            .await?;
        let now = self.app.now();
        let mut core = worker_to_core(&worker)?;
        let from = core.state;
        if let Err(e) = core.cancel_drain(
            now,
            &Actor(origin.actor.clone()),
            has_role(&scope, pb::Role::Admin),
        ) {
            span.record("reason", "illegal_transition");
            return Err(ApiError::from(e).on_resource(TYPE_NAME, &worker.id));
        }
        copy_worker_state(&mut worker, &core);
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        let history_reason = worker.state_reason.clone();
        let mut m = Mutation::at(now);
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.cancel_drain".into(),
                from_state: convert::worker_state_name(from).into(),
                to_state: pb::WorkerState::Running.as_str_name().into(),
                reason: reason_or(&req.reason, &history_reason).into(),
                details: None,
            },
        );
        let mut extra = Map::new();
        extra.insert("cancelled_by".into(), json!(origin.actor));
        extra.insert("note".into(), json!(req.reason));
        m.emit(worker_event(
            &self.app.factory,
            &worker,
            Some(from),
            &history_reason,
            &origin.actor,
            now,
            extra,
        ));
        self.app.commit(m).await?;
        span.record("reason", history_reason.as_str());
        Ok(Response::new(pb::CancelWorkerDrainResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.TerminateWorker",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn terminate(
        &self,
        request: Request<pb::TerminateWorkerRequest>,
    ) -> Result<Response<pb::TerminateWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "TerminateWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut worker = self
            .checked_action_target(&req.worker_id, &req.reason, req.resource_version)
            .await?;
        let held = self.held(Some(&worker.id)).await?;
        let mine = held.get(&worker.id).map(Vec::as_slice).unwrap_or_default();
        let live = active(mine);
        if !live.is_empty() && !req.force {
            span.record("reason", "in_use");
            let live: Vec<pb::LabletInstance> =
                live.into_iter().map(|h| h.instance.clone()).collect();
            return Err(in_use(&worker, &live, "terminate"));
        }
        let now = self.app.now();
        let reason = reason_or(&req.reason, REASON_ADMIN_TERMINATE).to_owned();
        let mut m = Mutation::at(now);
        // Forced: every instance that still holds resources goes, archived ones included.
        let to_end: Vec<pb::LabletInstance> = if req.force {
            mine.iter().map(|h| h.instance.clone()).collect()
        } else {
            Vec::new()
        };
        let terminated =
            self.terminate_instances(&mut m, to_end, REASON_WORKER_TERMINATED, &origin, now)?;
        let from = worker.state();
        if req.forget_only {
            m.delete(&worker);
            m.audit(
                &worker,
                &origin,
                AuditFacts {
                    action: "worker.forget".into(),
                    from_state: from.as_str_name().into(),
                    to_state: String::new(),
                    reason: reason.clone(),
                    details: Some(struct_of(json!({
                        "force": req.force,
                        "terminated_instances": terminated,
                        "aws_instance_id": worker.ec2.as_ref().map(|e| e.instance_id.clone()).unwrap_or_default(),
                    }))),
                },
            );
            self.app.commit(m).await?;
            span.record("reason", "forgotten");
            return Ok(Response::new(pb::TerminateWorkerResponse { worker: None }));
        }
        let mut core = worker_to_core(&worker)?;
        let core_from = core.state;
        let transitioned = !matches!(
            core_from,
            WorkerState::Terminated | WorkerState::ShuttingDown
        );
        if transitioned {
            core.begin_terminate(REASON_ADMIN_TERMINATE, now, &Actor(origin.actor.clone()))
                .map_err(|e| ApiError::from(e).on_resource(TYPE_NAME, &worker.id))?;
            copy_worker_state(&mut worker, &core);
        }
        let desired_changed = worker.desired_state() != pb::WorkerDesiredState::Terminated;
        if !transitioned && !desired_changed && terminated.is_empty() {
            span.record("reason", "unchanged");
            return Ok(Response::new(pb::TerminateWorkerResponse {
                worker: Some(self.enriched(worker).await?),
            }));
        }
        worker.desired_state = pb::WorkerDesiredState::Terminated as i32;
        worker.terminated_by = origin.actor.clone();
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.terminate".into(),
                from_state: from.as_str_name().into(),
                to_state: worker.state().as_str_name().into(),
                reason: reason.clone(),
                details: Some(struct_of(json!({
                    "force": req.force,
                    "terminated_instances": terminated,
                }))),
            },
        );
        if transitioned {
            m.emit(worker_event(
                &self.app.factory,
                &worker,
                Some(core_from),
                REASON_ADMIN_TERMINATE,
                &origin.actor,
                now,
                Map::new(),
            ));
        }
        self.app.commit(m).await?;
        span.record("reason", reason.as_str());
        Ok(Response::new(pb::TerminateWorkerResponse {
            worker: Some(self.enriched(worker).await?),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.UpdateWorkerTags",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn tags(
        &self,
        request: Request<pb::UpdateWorkerTagsRequest>,
    ) -> Result<Response<pb::UpdateWorkerTagsResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "UpdateWorkerTags", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        check_rv(&mut v, req.resource_version);
        if req.tags.is_empty() {
            v.add(
                "tags",
                "must not be empty (replacing with nothing would delete every tag)",
            );
        }
        validate::ec2_tags(&mut v, "tags", &req.tags);
        v.into_result()?;
        let mut worker = self
            .read_for_action(&req.worker_id, req.resource_version)
            .await?;
        let mut ec2 = worker.ec2.clone().unwrap_or_default();
        let before: BTreeMap<String, String> = ec2.tags.clone().into_iter().collect();
        let mut after: BTreeMap<String, String> = if req.merge {
            before.clone()
        } else {
            before
                .iter()
                .filter(|(k, _)| is_reserved_tag(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        after.extend(req.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        let user_tags = after.keys().filter(|k| !is_reserved_tag(k)).count();
        if user_tags > validate::MAX_LABELS {
            return Err(ApiError::invalid_argument(
                "tags",
                format!(
                    "the worker would have {user_tags} tags, at most {} are allowed",
                    validate::MAX_LABELS
                ),
            ));
        }
        if after == before {
            span.record("reason", "unchanged");
            let worker = self.enriched(worker).await?;
            return Ok(Response::new(pb::UpdateWorkerTagsResponse {
                tags: after.into_iter().collect(),
                worker: Some(worker),
            }));
        }
        let now = self.app.now();
        let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        let details = struct_of(json!({
            "merge": req.merge,
            "removed": removed,
            "set": changed,
        }));
        ec2.tags = after.clone().into_iter().collect();
        worker.ec2 = Some(ec2);
        set_condition(
            &mut worker.conditions,
            pb::Condition {
                r#type: TAGS_CONDITION.into(),
                status: pb::ConditionStatus::False as i32,
                reason: "TagsUpdated".into(),
                message: format!(
                    "EC2 tags were changed by {}; the controller applies them to the instance",
                    origin.actor
                ),
                last_transition_at: Some(convert::timestamp_to_proto(now)),
                last_probe_at: Some(convert::timestamp_to_proto(now)),
            },
        );
        worker.updated_at = Some(convert::timestamp_to_proto(now));
        let mut m = Mutation::at(now);
        m.update(&mut worker, ClaimChange::Keep)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.tags".into(),
                reason: if req.merge { "merge" } else { "replace" }.into(),
                details: Some(details),
                ..Default::default()
            },
        );
        self.app.commit(m).await?;
        span.record("reason", if req.merge { "merge" } else { "replace" });
        Ok(Response::new(pb::UpdateWorkerTagsResponse {
            tags: after.into_iter().collect(),
            worker: Some(self.enriched(worker).await?),
        }))
    }

    /// Operations of `worker_id` in `statuses` (all real statuses when empty).
    async fn operations_of(
        &self,
        worker_id: &str,
        statuses: &[pb::OperationStatus],
        created_since: Option<DateTime<Utc>>,
    ) -> Result<Vec<pb::WorkerOperation>, ApiError> {
        let statuses: Vec<&str> = if statuses.is_empty() {
            OPERATION_STATUSES.iter().map(|s| s.as_str_name()).collect()
        } else {
            statuses.iter().map(|s| s.as_str_name()).collect()
        };
        let mut query = Query::new(Kind::WorkerOperation)
            .ordered_by(Order::SortKeyAsc)
            .with_filter(Filter::eq(IndexField::WorkerId, worker_id))
            .with_filter(Filter::any_of(IndexField::State, statuses));
        if let Some(since) = created_since {
            query = query.with_filter(Filter::SortKeyBefore(
                (-since.timestamp_millis()).saturating_add(1),
            ));
        }
        let mut out = Vec::new();
        for doc in load_all(&self.app, query).await? {
            out.push(repo::decode::<pb::WorkerOperation>(&doc)?);
        }
        Ok(out)
    }

    /// Commits a new PENDING operation holding `claims`.
    async fn create_operation(
        &self,
        origin: &Origin,
        op: pb::WorkerOperation,
        claims: Vec<Claim>,
    ) -> Result<pb::WorkerOperation, ApiError> {
        self.create_operation_with_id(origin, op, |_| claims).await
    }

    async fn licence_in_progress(&self, worker: &pb::CmlWorker) -> Result<(), ApiError> {
        let busy = self
            .operations_of(
                &worker.id,
                &[pb::OperationStatus::Pending, pb::OperationStatus::Running],
                None,
            )
            .await?
            .into_iter()
            .find(|op| {
                matches!(
                    op.kind(),
                    pb::WorkerOperationKind::RegisterLicense
                        | pb::WorkerOperationKind::DeregisterLicense
                )
            });
        match busy {
            Some(op) => Err(ApiError::failed_precondition(
                "IN_PROGRESS",
                "worker",
                format!(
                    "licence operation {} ({}) is still {} on worker {}",
                    op.id,
                    op.kind().as_str_name(),
                    op.status().as_str_name(),
                    worker.id
                ),
            )
            .on_resource(TYPE_NAME, &worker.id)),
            None => Ok(()),
        }
    }

    #[tracing::instrument(
        name = "WorkerService.RegisterWorkerLicense",
        skip_all,
        fields(worker_id, operation_id, reason)
    )]
    async fn register_license(
        &self,
        request: Request<pb::RegisterWorkerLicenseRequest>,
    ) -> Result<Response<pb::RegisterWorkerLicenseResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(
            &scope,
            "RegisterWorkerLicense",
            server::request_id(&request),
        );
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        let token = req.license_token.as_str();
        if token.is_empty() {
            v.add("license_token", "is required");
        } else if token.len() > MAX_LICENSE_TOKEN_LEN {
            v.add(
                "license_token",
                format!("must be at most {MAX_LICENSE_TOKEN_LEN} characters"),
            );
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            // The message never echoes the token.
            v.add("license_token", "must be printable ASCII without spaces");
        }
        v.into_result()?;
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        if !running_like(worker.state) {
            span.record("reason", "not_running");
            return Err(not_running(&worker, "registering a licence"));
        }
        let registered = worker
            .license
            .as_ref()
            .is_some_and(|l| l.status == pb::LicenseStatus::Registered as i32);
        if registered && !req.reregister {
            span.record("reason", "already_registered");
            return Err(ApiError::failed_precondition(
                "LICENSE",
                "worker",
                format!(
                    "worker {} is already registered; set reregister to register again",
                    worker.id
                ),
            )
            .on_resource(TYPE_NAME, &worker.id));
        }
        self.licence_in_progress(&worker).await?;
        let op_id = uuid::Uuid::new_v4().to_string();
        let op = pb::WorkerOperation {
            id: op_id.clone(),
            worker_id: worker.id.clone(),
            kind: pb::WorkerOperationKind::RegisterLicense as i32,
            reregister: req.reregister,
            ..Default::default()
        };
        let op = self
            .create_operation_with_id(&origin, op, |id| vec![license_token_claim(id, token)])
            .await?;
        span.record("operation_id", op.id.as_str());
        span.record("reason", "queued");
        Ok(Response::new(pb::RegisterWorkerLicenseResponse {
            operation: Some(op),
        }))
    }

    /// [`Workers::create_operation`] with claims that depend on the operation id.
    async fn create_operation_with_id(
        &self,
        origin: &Origin,
        op: pb::WorkerOperation,
        claims: impl FnOnce(&str) -> Vec<Claim>,
    ) -> Result<pb::WorkerOperation, ApiError> {
        let now = self.app.now();
        let mut op = op;
        if op.id.is_empty() {
            op.id = uuid::Uuid::new_v4().to_string();
        }
        let claims = claims(&op.id);
        op.status = pb::OperationStatus::Pending as i32;
        op.requested_by = origin.actor.clone();
        op.created_at = Some(convert::timestamp_to_proto(now));
        self.commit_operation(origin, op, claims, now).await
    }

    async fn commit_operation(
        &self,
        origin: &Origin,
        mut op: pb::WorkerOperation,
        claims: Vec<Claim>,
        now: DateTime<Utc>,
    ) -> Result<pb::WorkerOperation, ApiError> {
        let kind = op.kind().as_str_name().to_owned();
        let mut m = Mutation::at(now);
        m.create(&mut op, claims)?;
        m.audit(
            &op,
            origin,
            AuditFacts {
                action: "worker_operation.create".into(),
                to_state: pb::OperationStatus::Pending.as_str_name().into(),
                reason: kind.clone(),
                details: Some(struct_of(json!({
                    "worker_id": op.worker_id,
                    "kind": kind,
                    "lab_id": op.lab_id,
                    "lab_action": op.lab_action().as_str_name(),
                    "reregister": op.reregister,
                    "include_labs": op.include_labs,
                }))),
                ..Default::default()
            },
        );
        self.app.commit(m).await?;
        tracing::info!(operation_id = %op.id, kind = %kind, "worker operation queued");
        Ok(op)
    }

    #[tracing::instrument(
        name = "WorkerService.DeregisterWorkerLicense",
        skip_all,
        fields(worker_id, operation_id, reason)
    )]
    async fn deregister_license(
        &self,
        request: Request<pb::DeregisterWorkerLicenseRequest>,
    ) -> Result<Response<pb::DeregisterWorkerLicenseResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(
            &scope,
            "DeregisterWorkerLicense",
            server::request_id(&request),
        );
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        v.into_result()?;
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        if !running_like(worker.state) {
            span.record("reason", "not_running");
            return Err(not_running(&worker, "deregistering a licence"));
        }
        self.licence_in_progress(&worker).await?;
        let op = self
            .create_operation(
                &origin,
                pb::WorkerOperation {
                    worker_id: worker.id.clone(),
                    kind: pb::WorkerOperationKind::DeregisterLicense as i32,
                    ..Default::default()
                },
                Vec::new(),
            )
            .await?;
        span.record("operation_id", op.id.as_str());
        span.record("reason", "queued");
        Ok(Response::new(pb::DeregisterWorkerLicenseResponse {
            operation: Some(op),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.RefreshWorker",
        skip_all,
        fields(worker_id, reason)
    )]
    async fn refresh(
        &self,
        request: Request<pb::RefreshWorkerRequest>,
    ) -> Result<Response<pb::RefreshWorkerResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "RefreshWorker", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        v.into_result()?;
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        let now = self.app.now();
        let skip = |reason: pb::RefreshSkipReason,
                    retry_after: Option<Duration>,
                    op: Option<pb::WorkerOperation>| {
            span.record("reason", reason.as_str_name());
            Ok(Response::new(pb::RefreshWorkerResponse {
                scheduled: false,
                skip_reason: reason as i32,
                retry_after: retry_after.map(convert::duration_to_proto),
                operation: op,
            }))
        };
        if !running_like(worker.state) {
            return skip(pb::RefreshSkipReason::NotRunning, None, None);
        }
        let is_refresh = |op: &pb::WorkerOperation| op.kind() == pb::WorkerOperationKind::Refresh;
        if let Some(queued) = self
            .operations_of(
                &worker.id,
                &[pb::OperationStatus::Pending, pb::OperationStatus::Running],
                None,
            )
            .await?
            .into_iter()
            .find(is_refresh)
        {
            return skip(pb::RefreshSkipReason::AlreadyScheduled, None, Some(queued));
        }
        let latest = self
            .operations_of(&worker.id, &[], Some(now - REFRESH_MIN_INTERVAL))
            .await?
            .into_iter()
            .filter(is_refresh)
            .filter_map(|op| {
                op.created_at
                    .as_ref()
                    .and_then(|t| convert::timestamp_from_proto(t, "").ok())
            })
            .max();
        if let Some(at) = latest {
            let wait = (at + REFRESH_MIN_INTERVAL - now).max(Duration::zero());
            return skip(pb::RefreshSkipReason::RateLimited, Some(wait), None);
        }
        let poll_due = worker
            .next_refresh_at
            .as_ref()
            .and_then(|t| convert::timestamp_from_proto(t, "").ok());
        if let Some(due) = poll_due
            && due >= now
            && due - now <= POLL_IMMINENT_WINDOW
        {
            return skip(pb::RefreshSkipReason::PollImminent, None, None);
        }
        let op = self
            .create_operation(
                &origin,
                pb::WorkerOperation {
                    worker_id: worker.id.clone(),
                    kind: pb::WorkerOperationKind::Refresh as i32,
                    include_labs: req.include_labs,
                    ..Default::default()
                },
                Vec::new(),
            )
            .await?;
        span.record("reason", "queued");
        Ok(Response::new(pb::RefreshWorkerResponse {
            scheduled: true,
            skip_reason: pb::RefreshSkipReason::Unspecified as i32,
            retry_after: None,
            operation: Some(op),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.ListWorkerLabs",
        skip_all,
        fields(worker_id, returned)
    )]
    async fn labs(
        &self,
        request: Request<pb::ListWorkerLabsRequest>,
    ) -> Result<Response<pb::ListWorkerLabsResponse>, ApiError> {
        let req = request.into_inner();
        tracing::Span::current().record("worker_id", req.worker_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        let fingerprint = paging::filter_fingerprint(&pb::ListWorkerLabsRequest {
            worker_id: req.worker_id.clone(),
            ..Default::default()
        });
        let page = v.absorb(paging::page_request::<(String, String)>(
            PageKind::WorkerLabs,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let Some(page) = page else {
            return Err(ApiError::internal_msg("validation produced no page"));
        };
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        let (mut labs, synced) = match self
            .app
            .find::<pb::WorkerOperation>(&labs_snapshot_id(&worker.id))
            .await?
        {
            Some(snapshot) => labs_from_snapshot(&snapshot)?,
            None => (Vec::new(), None),
        };
        labs.sort_by(|a, b| (&a.title, &a.lab_id).cmp(&(&b.title, &b.lab_id)));
        let start = match &page.cursor {
            Some((title, id)) => labs.partition_point(|l| (&l.title, &l.lab_id) <= (title, id)),
            None => 0,
        };
        let total = labs.len();
        let selected: Vec<pb::CmlLab> = labs.into_iter().skip(start).take(page.page_size).collect();
        let next = if start + selected.len() < total {
            selected
                .last()
                .map(|l| {
                    paging::encode_page_token(
                        PageKind::WorkerLabs,
                        fingerprint,
                        &(l.title.clone(), l.lab_id.clone()),
                    )
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        tracing::Span::current().record("returned", selected.len());
        Ok(Response::new(pb::ListWorkerLabsResponse {
            labs: selected,
            next_page_token: next,
            last_synced_at: synced,
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.ControlWorkerLab",
        skip_all,
        fields(worker_id, lab_id, reason)
    )]
    async fn control_lab(
        &self,
        request: Request<pb::ControlWorkerLabRequest>,
    ) -> Result<Response<pb::ControlWorkerLabResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = self.origin(&scope, "ControlWorkerLab", server::request_id(&request));
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("worker_id", req.worker_id.as_str());
        span.record("lab_id", req.lab_id.as_str());
        let mut v = Violations::new();
        check_worker_id(&mut v, &req.worker_id);
        if !lab_id_ok(&req.lab_id) {
            v.add(
                "lab_id",
                format!("must be a CML lab id: 1..{MAX_LAB_ID_LEN} letters, digits, '-' or '_'"),
            );
        }
        let action = validate::enum_value::<pb::LabAction>(&mut v, "action", req.action, true);
        v.into_result()?;
        let Some(action) = action else {
            return Err(ApiError::internal_msg("validation produced no action"));
        };
        let worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        if !running_like(worker.state) {
            span.record("reason", "not_running");
            return Err(not_running(&worker, "controlling a lab"));
        }
        let op = self
            .create_operation(
                &origin,
                pb::WorkerOperation {
                    worker_id: worker.id.clone(),
                    kind: pb::WorkerOperationKind::ControlLab as i32,
                    lab_id: req.lab_id.clone(),
                    lab_action: action as i32,
                    ..Default::default()
                },
                Vec::new(),
            )
            .await?;
        span.record("reason", "queued");
        Ok(Response::new(pb::ControlWorkerLabResponse {
            operation: Some(op),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.GetWorkerOperation",
        skip_all,
        fields(operation_id)
    )]
    async fn get_operation(
        &self,
        request: Request<pb::GetWorkerOperationRequest>,
    ) -> Result<Response<pb::GetWorkerOperationResponse>, ApiError> {
        let req = request.into_inner();
        tracing::Span::current().record("operation_id", req.operation_id.as_str());
        let mut v = Violations::new();
        validate::id(&mut v, "operation_id", &req.operation_id);
        v.into_result()?;
        let op: pb::WorkerOperation = self.app.get(&req.operation_id).await?;
        if op.kind == pb::WorkerOperationKind::Unspecified as i32 {
            return Err(ApiError::not_found(OP_TYPE_NAME, &req.operation_id));
        }
        Ok(Response::new(pb::GetWorkerOperationResponse {
            operation: Some(op),
        }))
    }

    #[tracing::instrument(
        name = "WorkerService.ListWorkerOperations",
        skip_all,
        fields(worker_id, returned)
    )]
    async fn list_operations(
        &self,
        request: Request<pb::ListWorkerOperationsRequest>,
    ) -> Result<Response<pb::ListWorkerOperationsResponse>, ApiError> {
        let req = request.into_inner();
        tracing::Span::current().record("worker_id", req.worker_id.as_str());
        let all = req.worker_id == "-";
        let mut v = Violations::new();
        if !all {
            check_worker_id(&mut v, &req.worker_id);
        }
        let mut statuses = Vec::new();
        for (i, raw) in req.statuses.iter().enumerate() {
            if let Some(s) = validate::enum_value::<pb::OperationStatus>(
                &mut v,
                &validate::index_path("statuses", i),
                *raw,
                true,
            ) {
                statuses.push(s.as_str_name().to_owned());
            }
        }
        let mut fp = req.clone();
        fp.page_size = 0;
        fp.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&fp);
        let page = v.absorb(paging::page_request::<String>(
            PageKind::WorkerOperations,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let Some(page) = page else {
            return Err(ApiError::internal_msg("validation produced no page"));
        };
        if !all {
            self.app.get::<pb::CmlWorker>(&req.worker_id).await?;
        }
        if statuses.is_empty() {
            statuses = OPERATION_STATUSES
                .iter()
                .map(|s| s.as_str_name().to_owned())
                .collect();
        }
        let mut query = Query::new(Kind::WorkerOperation)
            .ordered_by(Order::SortKeyAsc)
            .with_filter(Filter::any_of(IndexField::State, statuses));
        if !all {
            query = query.with_filter(Filter::eq(IndexField::WorkerId, req.worker_id.clone()));
        }
        let (docs, token) =
            collect_page(&self.app, &query, page.page_size, page.cursor, |_| true).await?;
        let mut operations = Vec::with_capacity(docs.len());
        for doc in &docs {
            operations.push(repo::decode::<pb::WorkerOperation>(doc)?);
        }
        tracing::Span::current().record("returned", operations.len());
        Ok(Response::new(pb::ListWorkerOperationsResponse {
            operations,
            next_page_token: token
                .map(|t| paging::encode_page_token(PageKind::WorkerOperations, fingerprint, &t))
                .unwrap_or_default(),
        }))
    }
}

/// Replaces the condition of the same type (or adds it); `last_transition_at` is kept when the
/// status did not change.
fn set_condition(conditions: &mut Vec<pb::Condition>, mut condition: pb::Condition) {
    if let Some(existing) = conditions.iter_mut().find(|c| c.r#type == condition.r#type) {
        if existing.status == condition.status {
            condition.last_transition_at = existing.last_transition_at;
        }
        *existing = condition;
    } else {
        conditions.push(condition);
    }
}

fn in_use(worker: &pb::CmlWorker, live: &[pb::LabletInstance], what: &str) -> ApiError {
    const SHOWN: usize = 10;
    let ids: Vec<&str> = live.iter().take(SHOWN).map(|i| i.id.as_str()).collect();
    ApiError::failed_precondition(
        "IN_USE",
        "worker",
        format!(
            "worker {} has {} active instance(s) ({}{}); {what} it with force to terminate \
             them, or wait until they end",
            worker.id,
            live.len(),
            ids.join(", "),
            if live.len() > SHOWN { ", …" } else { "" }
        ),
    )
    .on_resource(TYPE_NAME, &worker.id)
}

#[tonic::async_trait]
impl WorkerService for Workers {
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.list(request).await.map_err(Status::from)
    }
    async fn get_worker(
        &self,
        request: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::GetWorkerResponse>, Status> {
        self.get(request).await.map_err(Status::from)
    }
    async fn get_worker_capacity(
        &self,
        request: Request<pb::GetWorkerCapacityRequest>,
    ) -> Result<Response<pb::GetWorkerCapacityResponse>, Status> {
        self.capacity(request).await.map_err(Status::from)
    }
    async fn create_worker(
        &self,
        request: Request<pb::CreateWorkerRequest>,
    ) -> Result<Response<pb::CreateWorkerResponse>, Status> {
        self.create(request).await.map_err(Status::from)
    }
    async fn import_workers(
        &self,
        request: Request<pb::ImportWorkersRequest>,
    ) -> Result<Response<pb::ImportWorkersResponse>, Status> {
        self.import(request).await.map_err(Status::from)
    }
    async fn start_worker(
        &self,
        request: Request<pb::StartWorkerRequest>,
    ) -> Result<Response<pb::StartWorkerResponse>, Status> {
        self.start(request).await.map_err(Status::from)
    }
    async fn stop_worker(
        &self,
        request: Request<pb::StopWorkerRequest>,
    ) -> Result<Response<pb::StopWorkerResponse>, Status> {
        self.stop(request).await.map_err(Status::from)
    }
    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        self.drain(request).await.map_err(Status::from)
    }
    async fn cancel_worker_drain(
        &self,
        request: Request<pb::CancelWorkerDrainRequest>,
    ) -> Result<Response<pb::CancelWorkerDrainResponse>, Status> {
        self.cancel_drain(request).await.map_err(Status::from)
    }
    async fn terminate_worker(
        &self,
        request: Request<pb::TerminateWorkerRequest>,
    ) -> Result<Response<pb::TerminateWorkerResponse>, Status> {
        self.terminate(request).await.map_err(Status::from)
    }
    async fn update_worker_tags(
        &self,
        request: Request<pb::UpdateWorkerTagsRequest>,
    ) -> Result<Response<pb::UpdateWorkerTagsResponse>, Status> {
        self.tags(request).await.map_err(Status::from)
    }
    async fn register_worker_license(
        &self,
        request: Request<pb::RegisterWorkerLicenseRequest>,
    ) -> Result<Response<pb::RegisterWorkerLicenseResponse>, Status> {
        self.register_license(request).await.map_err(Status::from)
    }
    async fn deregister_worker_license(
        &self,
        request: Request<pb::DeregisterWorkerLicenseRequest>,
    ) -> Result<Response<pb::DeregisterWorkerLicenseResponse>, Status> {
        self.deregister_license(request).await.map_err(Status::from)
    }
    async fn refresh_worker(
        &self,
        request: Request<pb::RefreshWorkerRequest>,
    ) -> Result<Response<pb::RefreshWorkerResponse>, Status> {
        self.refresh(request).await.map_err(Status::from)
    }
    async fn list_worker_labs(
        &self,
        request: Request<pb::ListWorkerLabsRequest>,
    ) -> Result<Response<pb::ListWorkerLabsResponse>, Status> {
        self.labs(request).await.map_err(Status::from)
    }
    async fn control_worker_lab(
        &self,
        request: Request<pb::ControlWorkerLabRequest>,
    ) -> Result<Response<pb::ControlWorkerLabResponse>, Status> {
        self.control_lab(request).await.map_err(Status::from)
    }
    async fn get_worker_operation(
        &self,
        request: Request<pb::GetWorkerOperationRequest>,
    ) -> Result<Response<pb::GetWorkerOperationResponse>, Status> {
        self.get_operation(request).await.map_err(Status::from)
    }
    async fn list_worker_operations(
        &self,
        request: Request<pb::ListWorkerOperationsRequest>,
    ) -> Result<Response<pb::ListWorkerOperationsResponse>, Status> {
        self.list_operations(request).await.map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_hosts_prefer_public_then_endpoint_then_private() {
        let mut w = pb::CmlWorker::default();
        assert_eq!(worker_host(&w), None);
        w.ec2 = Some(pb::Ec2Info {
            private_ip: "10.0.0.5".into(),
            ..Default::default()
        });
        assert_eq!(worker_host(&w).as_deref(), Some("10.0.0.5"));
        if let Some(e) = w.ec2.as_mut() {
            e.https_endpoint = "https://cml.example.org:8443/api".into();
        }
        assert_eq!(worker_host(&w).as_deref(), Some("cml.example.org"));
        if let Some(e) = w.ec2.as_mut() {
            e.https_endpoint = "https://[2001:db8::7]:443".into();
        }
        assert_eq!(worker_host(&w).as_deref(), Some("2001:db8::7"));
        if let Some(e) = w.ec2.as_mut() {
            e.public_ip = "203.0.113.7".into();
        }
        assert_eq!(worker_host(&w).as_deref(), Some("203.0.113.7"));
    }

    #[test]
    fn ec2_ids_are_checked() {
        assert!(is_aws_instance_id("i-0123456789abcdef0"));
        assert!(is_aws_instance_id("i-0123abcd"));
        assert!(!is_aws_instance_id("i-0123456789ABCDEF0"));
        assert!(!is_aws_instance_id("i-0123"));
        assert!(!is_aws_instance_id("0123456789abcdef0"));
        assert!(is_ami_id("ami-0abcdef1234567890"));
        assert!(!is_ami_id("ami-xyz"));
    }

    #[test]
    fn labs_survive_their_snapshot() {
        let labs = vec![pb::CmlLab {
            lab_id: "a1b2c3".into(),
            worker_id: "w".into(),
            title: "<b>lab</b> \"1\"".into(),
            state: pb::CmlLabState::Started as i32,
            node_count: 12,
            groups: vec!["g1".into()],
            ..Default::default()
        }];
        let at = DateTime::from_timestamp(1_900_000_000, 0).unwrap_or_default();
        let snap = labs_snapshot("w", &labs, at).expect("encodes");
        assert_eq!(snap.id, "labs:w");
        let (back, synced) = labs_from_snapshot(&snap).expect("decodes");
        assert_eq!(back, labs);
        assert_eq!(synced, Some(convert::timestamp_to_proto(at)));
    }

    #[test]
    fn conditions_replace_by_type_and_keep_transition_time() {
        let t = |s| {
            Some(prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            })
        };
        let mut cs = vec![pb::Condition {
            r#type: TAGS_CONDITION.into(),
            status: pb::ConditionStatus::False as i32,
            last_transition_at: t(1),
            ..Default::default()
        }];
        set_condition(
            &mut cs,
            pb::Condition {
                r#type: TAGS_CONDITION.into(),
                status: pb::ConditionStatus::False as i32,
                last_transition_at: t(5),
                ..Default::default()
            },
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_at, t(1));
    }
}
