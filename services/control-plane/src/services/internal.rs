//! InternalService: how the leader-elected scheduler and controller write what they decided or
//! observed. The control plane stays the single writer; these handlers check, decide with
//! `ccm-core` and commit.
//!
//! # Fencing
//!
//! Every call first checks its [`pb::LeaderFence`] (`Internals::fence`): the fence must be
//! present and well formed (`INVALID_ARGUMENT`), its role must be allowed to make the call
//! (`PERMISSION_DENIED`; placements are the scheduler's, worker and scaling writes the
//! controller's), its epoch must be the role's current epoch (`FAILED_PRECONDITION`, reason
//! `STALE_LEADER_EPOCH`, a `FENCE` violation) and its holder must be the one that holds that
//! epoch (`PERMISSION_DENIED`). Nothing is read or written before the fence passed. The only
//! read, `ListScalingDecisionHistory`, checks the fence's shape and role but not the epoch
//! (standbys serve reads too, internal.proto).
//!
//! # Placement commit
//!
//! `CommitPlacements` re-validates every placement against the store as it is now — instance
//! PENDING (and at the version the decision was based on), worker RUNNING and managed, ports
//! exactly the definition's port template names inside the worker's range and not held by a
//! live instance, capacity over the instance's booking window against the worker's live bookings
//! plus the placements accepted earlier in the same batch (`ccm_core::capacity`) — and then
//! commits all valid items in ONE store transaction ([`App::commit_each_at_revision`]), each all
//! or nothing: the instance moves PENDING → SCHEDULED through
//! [`ccm_core::model::LabletInstance::schedule`], takes one `port` claim per port
//! (`<worker_id>/<port>`, unique in the store, so two instances can never hold the same port even
//! across replicas), is audited and announces `ccm.lablet.instance.scheduled`. An item whose
//! claim is taken is reported `PORT_CONFLICT` and leaves no trace; the others commit. Batches of
//! one control-plane process are serialised, so capacity checked for one batch cannot be taken
//! by a concurrent batch of the same process (the scheduler leader sends one batch at a time).
//!
//! # Worker operations and licence tokens
//!
//! A `REGISTER_LICENSE` operation carries the Smart Licensing token, which the public API never
//! returns. It is stored as a claim of the operation document:
//! [`license_token_claim`] (namespace [`LICENSE_TOKEN_CLAIM`], key `<operation id>/<token>`),
//! created with the operation by WorkerService. `ClaimWorkerOperation` hands it to the
//! controller ([`license_token_of`]); `CompleteWorkerOperation` releases every claim of the
//! operation, so the token leaves the store once the operation is final.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ccm_core::capacity::CapacityTimeline;
use ccm_core::model::{
    Actor, Capacity, InstanceState as CoreInstanceState, LabletInstance as CoreInstance,
    WorkerState as CoreWorkerState,
};
use ccm_proto::v1 as pb;
use ccm_proto::v1::internal_service_server::{InternalService, InternalServiceServer};
use ccm_store::{
    Claim, ClaimChange, Filter, IndexField, Kind, LogEntry, LogKind, LogQuery, Query, StoreError,
};
use chrono::{DateTime, Duration, Utc};
use prost_reflect::ReflectMessage;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::app::{App, CONTROLLER_ELECTION, SCHEDULER_ELECTION};
use crate::convert::{self, timestamp_from_proto, timestamp_to_proto};
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, Mutation, Origin};
use crate::repo::definition_doc_id;
use crate::server::request_id;
use crate::services::events::{LogPosition, scan_log};
use crate::validate::{self, Violations, index_path, join_path, key_path};

/// Most placements one `CommitPlacements` call may carry (internal.proto).
pub const MAX_PLACEMENTS_PER_BATCH: usize = 1000;
/// Most updates one `SetInstanceConditions` call may carry (internal.proto).
pub const MAX_CONDITION_UPDATES: usize = 1000;
/// Most instance ids one scaling decision may list.
pub const MAX_DECISION_INSTANCE_IDS: usize = 1000;
/// Most labs one worker observation may list.
pub const MAX_OBSERVED_LABS: usize = 10_000;
/// Longest condition type, reason or machine-readable code.
pub const MAX_CODE_LEN: usize = 128;
/// Longest condition message or free-text decision reason.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Longest error message of a worker operation.
pub const MAX_OPERATION_ERROR_LEN: usize = 8192;
/// Longest CML lab id, EC2 instance id or worker name accepted.
pub const MAX_EXTERNAL_ID_LEN: usize = 256;
/// Times a last-writer-wins write (an unconditional `ReportWorker`) is retried after a
/// concurrent update before the call fails with `ABORTED`.
pub const MAX_UNCONDITIONAL_RETRIES: usize = 5;
/// Page size of the store reads that load a worker's live instances.
const LIVE_INSTANCES_PAGE: u32 = 1000;

/// Claim namespace that makes `CreateWorkerRecord` idempotent (key = its `request_id`).
pub const WORKER_REQUEST_CLAIM: &str = "worker.create_request";
/// Claim namespace of a `REGISTER_LICENSE` operation's token (key `<operation id>/<token>`).
pub const LICENSE_TOKEN_CLAIM: &str = "worker_operation.license_token";

/// Condition type the placement commit sets on an instance (TRUE once placed).
pub const CONDITION_SCHEDULED: &str = "Scheduled";
/// Condition reason of a placed instance.
pub const CONDITION_REASON_PLACED: &str = "Placed";
/// Condition type `ReportWorker` sets when EC2 reports a state the worker cannot take.
pub const CONDITION_EC2_IN_SYNC: &str = "Ec2InSync";

/// Reason recorded on a worker created by `CreateWorkerRecord` without one.
pub const REASON_SCALE_UP: &str = "scale_up";
/// Event type of a CANCEL_DRAIN scaling decision (not in the catalog: ccm resolution).
pub const SCALING_CANCEL_DRAIN: &str = "ccm.scaling.drain.cancelled";
/// Event type of a HALT scaling decision.
pub const SCALING_HALTED: &str = "ccm.scaling.halted";
/// Event type of a RESUME scaling decision.
pub const SCALING_RESUMED: &str = "ccm.scaling.resumed";
/// Event type of a NONE scaling decision.
pub const SCALING_NONE: &str = "ccm.scaling.none";
/// Resource kind written on scaling-decision log entries.
pub const SCALING_DECISION_LOG_KIND: &str = "RESOURCE_KIND_SCALING_DECISION";

const SERVICE: &str = "/ccm.v1.InternalService/";
/// Largest magnitude below which every whole `f64` is an exact integer (2^53).
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// The claim that stores the licence token of `REGISTER_LICENSE` operation `operation_id`
/// (create the operation document with it; see the module docs).
pub fn license_token_claim(operation_id: &str, token: &str) -> Claim {
    Claim::new(LICENSE_TOKEN_CLAIM, format!("{operation_id}/{token}"))
}

/// The licence token stored with operation `operation_id`, if any.
pub async fn license_token_of(app: &App, operation_id: &str) -> Result<Option<String>, ApiError> {
    let prefix = format!("{operation_id}/");
    let claims = app
        .store
        .claims_of(Kind::WorkerOperation, operation_id)
        .await?;
    Ok(claims
        .into_iter()
        .find(|c| c.namespace == LICENSE_TOKEN_CLAIM)
        .and_then(|c| c.key.strip_prefix(&prefix).map(str::to_owned)))
}

/// The InternalService implementation.
#[derive(Debug, Clone)]
pub struct Internals {
    app: App,
    /// Serialises placement batches of this process (see the module docs).
    placements: Arc<tokio::sync::Mutex<()>>,
}

/// The tonic server for [`Internals`].
pub fn server(app: App) -> InternalServiceServer<Internals> {
    InternalServiceServer::new(Internals {
        app,
        placements: Arc::new(tokio::sync::Mutex::new(())),
    })
}

/// Which leader may make a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leader {
    Scheduler,
    Controller,
    Either,
}

impl Leader {
    fn allows(self, role: &str) -> bool {
        match self {
            Leader::Scheduler => role == SCHEDULER_ELECTION,
            Leader::Controller => role == CONTROLLER_ELECTION,
            Leader::Either => role == SCHEDULER_ELECTION || role == CONTROLLER_ELECTION,
        }
    }
}

fn method(name: &str) -> String {
    format!("{SERVICE}{name}")
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with EventService
// ---------------------------------------------------------------------------------------------

/// The actor of an origin, for state histories.
pub(crate) fn actor_of(origin: &Origin) -> Actor {
    Actor(origin.actor.clone())
}

/// A stored instance in the domain model. A stored instance the domain cannot read is a broken
/// invariant (`INTERNAL`), not the caller's fault.
pub(crate) fn instance_core(instance: &pb::LabletInstance) -> Result<CoreInstance, ApiError> {
    convert::instance_from_proto(instance, "instance").map_err(|e| {
        ApiError::internal(
            format!(
                "stored instance {} is not readable by the domain",
                instance.id
            ),
            e,
        )
    })
}

/// Copies what a domain transition changed back into the stored instance.
pub(crate) fn write_back_instance(
    stored: &mut pb::LabletInstance,
    core: &CoreInstance,
    now: DateTime<Utc>,
) {
    let fresh = convert::instance_to_proto(core);
    stored.state = fresh.state;
    stored.state_history = fresh.state_history;
    stored.worker_id = fresh.worker_id;
    stored.allocated_ports = fresh.allocated_ports;
    stored.cml_lab_id = fresh.cml_lab_id;
    stored.grading_score = fresh.grading_score;
    stored.retry_count = fresh.retry_count;
    stored.scheduled_at = fresh.scheduled_at;
    stored.started_at = fresh.started_at;
    stored.terminated_at = fresh.terminated_at;
    stored.updated_at = Some(timestamp_to_proto(now));
}

/// `true` while tags set through `UpdateWorkerTags` wait for the controller: the worker's
/// [`super::workers::TAGS_CONDITION`] is FALSE and the observation does not report it TRUE.
fn desired_tags_pending(current: &[pb::Condition], observed: &[pb::Condition]) -> bool {
    let is = |list: &[pb::Condition], status: pb::ConditionStatus| {
        list.iter()
            .any(|c| c.r#type == super::workers::TAGS_CONDITION && c.status == status as i32)
    };
    is(current, pb::ConditionStatus::False) && !is(observed, pb::ConditionStatus::True)
}

/// Sets `condition` in `conditions` (replacing the one of its type). `last_transition_at` moves
/// only when the status changes; `last_probe_at` is `now`. Returns whether status, reason or
/// message changed (or the condition is new).
pub(crate) fn set_condition(
    conditions: &mut Vec<pb::Condition>,
    condition: &pb::Condition,
    now: DateTime<Utc>,
) -> bool {
    let now_ts = Some(timestamp_to_proto(now));
    match conditions.iter_mut().find(|c| c.r#type == condition.r#type) {
        Some(existing) => {
            let changed = existing.status != condition.status
                || existing.reason != condition.reason
                || existing.message != condition.message;
            if existing.status != condition.status {
                existing.last_transition_at = now_ts;
            }
            existing.status = condition.status;
            existing.reason = condition.reason.clone();
            existing.message = condition.message.clone();
            existing.last_probe_at = now_ts;
            changed
        }
        None => {
            let mut c = condition.clone();
            c.last_transition_at = now_ts;
            c.last_probe_at = now_ts;
            conditions.push(c);
            true
        }
    }
}

/// Checks a condition given in a request.
pub(crate) fn check_condition(v: &mut Violations, field: &str, c: &pb::Condition) {
    let ty = join_path(field, "type");
    if c.r#type.trim().is_empty() {
        v.add(&ty, "is required");
    } else if c.r#type.len() > MAX_CODE_LEN
        || !c.r#type.chars().all(|ch| ch.is_ascii_alphanumeric())
    {
        v.add(
            &ty,
            format!("must be 1..={MAX_CODE_LEN} ASCII letters and digits (UpperCamelCase)"),
        );
    }
    validate::enum_value::<pb::ConditionStatus>(v, &join_path(field, "status"), c.status, true);
    validate::free_text(
        v,
        &join_path(field, "reason"),
        &c.reason,
        MAX_CODE_LEN,
        false,
    );
    validate::free_text(
        v,
        &join_path(field, "message"),
        &c.message,
        MAX_MESSAGE_LEN,
        true,
    );
}

fn ts_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

fn ports_json(ports: &HashMap<String, i32>) -> Value {
    let sorted: BTreeMap<&String, &i32> = ports.iter().collect();
    json!(sorted)
}

fn score_json(score: Option<&pb::GradingScore>) -> Value {
    match score {
        None => Value::Null,
        Some(s) => json!({
            "total": s.total,
            "max": s.max,
            "passed": s.passed,
            "breakdown": s.breakdown.iter().map(|c| json!({
                "criterion": c.criterion,
                "points": c.points,
                "max": c.max,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// The payload of the CloudEvent announcing that `instance` entered its current state from
/// `previous` (domain.md §8 catalog fields plus the generic ones: previous and new state,
/// definition, worker, timestamp, reason).
pub(crate) fn instance_event_data(
    instance: &pb::LabletInstance,
    previous: pb::InstanceState,
    reason: &str,
    at: DateTime<Utc>,
) -> Value {
    let state = instance.state();
    let mut data = json!({
        "instance_id": instance.id,
        "previous_state": previous.as_str_name(),
        "new_state": state.as_str_name(),
        "definition_id": instance.definition_id,
        "definition_version": instance.definition_version,
        "worker_id": instance.worker_id,
        "owner_id": instance.owner_id,
        "reason": reason,
        "timestamp": at.to_rfc3339(),
    });
    let extra = match state {
        pb::InstanceState::Scheduled | pb::InstanceState::Instantiating => json!({
            "allocated_ports": ports_json(&instance.allocated_ports),
        }),
        pb::InstanceState::Running => json!({
            "cml_lab_id": instance.cml_lab_id,
            "allocated_ports": ports_json(&instance.allocated_ports),
            "started_at": ts_json(instance.started_at.as_ref()),
        }),
        pb::InstanceState::Collecting => json!({
            "triggered_by": instance.state_history.last().map(|t| t.actor.clone()).unwrap_or_default(),
            "collection_reason": reason,
        }),
        pb::InstanceState::Grading => json!({
            "grading_engine_session_id": instance.assessment_session_id,
        }),
        pb::InstanceState::Terminated => {
            let started = instance
                .started_at
                .as_ref()
                .and_then(|t| DateTime::from_timestamp(t.seconds, 0));
            json!({
                "final_state": previous.as_str_name(),
                "grading_score": score_json(instance.grading_score.as_ref()),
                "duration_minutes": started.map_or(0, |s| (at - s).num_minutes().max(0)),
            })
        }
        _ => json!({}),
    };
    if let (Value::Object(base), Value::Object(more)) = (&mut data, extra) {
        base.extend(more);
    }
    data
}

/// A JSON object as a protobuf `Struct` (audit details, operation results); `None` for any
/// other JSON value.
pub fn to_struct(value: Value) -> Option<prost_types::Struct> {
    let Value::Object(map) = value else {
        return None;
    };
    Some(prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, to_proto_value(v)))
            .collect(),
    })
}

fn to_proto_value(value: Value) -> prost_types::Value {
    use prost_types::value::Kind as V;
    let kind = match value {
        Value::Null => V::NullValue(0),
        Value::Bool(b) => V::BoolValue(b),
        Value::Number(n) => V::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => V::StringValue(s),
        Value::Array(items) => V::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_proto_value).collect(),
        }),
        Value::Object(map) => V::StructValue(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, to_proto_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf `Value` as JSON.
pub(crate) fn from_proto_value(value: &prost_types::Value) -> Value {
    use prost_types::value::Kind as V;
    match &value.kind {
        None | Some(V::NullValue(_)) => Value::Null,
        Some(V::BoolValue(b)) => Value::Bool(*b),
        // Whole numbers read back as integers, as they were most likely sent.
        Some(V::NumberValue(n)) if n.fract() == 0.0 && n.abs() < MAX_EXACT_INTEGER => {
            json!(*n as i64)
        }
        Some(V::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
        }
        Some(V::StringValue(s)) => Value::String(s.clone()),
        Some(V::ListValue(l)) => Value::Array(l.values.iter().map(from_proto_value).collect()),
        Some(V::StructValue(s)) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), from_proto_value(v)))
                .collect(),
        ),
    }
}

fn capacity_of_definition(def: &pb::LabletDefinition) -> Capacity {
    let r = def.resource_requirements.clone().unwrap_or_default();
    let u = |n: i32| u32::try_from(n).unwrap_or(0);
    Capacity::new(
        u(r.cpu_cores),
        u(r.memory_gb),
        u(r.storage_gb),
        u(def.node_count),
    )
}

fn holding_states() -> Vec<&'static str> {
    CoreInstanceState::ALL
        .into_iter()
        .filter(|s| s.holds_resources())
        .map(convert::instance_state_name)
        .collect()
}

fn placement_result(
    instance_id: &str,
    outcome: pb::PlacementOutcome,
    message: impl Into<String>,
) -> pb::PlacementResult {
    pb::PlacementResult {
        instance_id: instance_id.to_owned(),
        outcome: outcome as i32,
        message: message.into(),
        resource_version: 0,
    }
}

/// What one worker holds while a batch is checked.
struct WorkerBook {
    worker: pb::CmlWorker,
    timeline: CapacityTimeline,
    range: (i32, i32),
    ports: HashMap<i32, String>,
}

/// A stored request id as a deterministic UUID: a retried `RecordScalingDecision` appends (and
/// finds) the same log entry.
fn decision_id_for(request_id: &str) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("ccm.scaling_decision/{request_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn decision_to_entry(d: &pb::ScalingDecision, actor: &str) -> Result<LogEntry, ApiError> {
    let text = serde_json::to_string(&d.transcode_to_dynamic())
        .map_err(|e| ApiError::internal("encoding a scaling decision", e))?;
    let body = ccm_store::Body::from_json_text(text)
        .map_err(|e| ApiError::internal("encoding a scaling decision", e))?;
    let id =
        uuid::Uuid::parse_str(&d.id).map_err(|e| ApiError::internal("scaling decision id", e))?;
    let at =
        d.at.as_ref()
            .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
            .unwrap_or_else(Utc::now);
    Ok(LogEntry {
        id,
        at: ccm_store::truncate_to_millis(at),
        resource_kind: SCALING_DECISION_LOG_KIND.to_owned(),
        resource_id: d.id.clone(),
        actor: actor.to_owned(),
        action: d.action().as_str_name().to_owned(),
        body,
    })
}

/// The scaling decision a log entry holds.
pub fn decision_from_entry(entry: &LogEntry) -> Result<pb::ScalingDecision, ApiError> {
    let descriptor = pb::ScalingDecision::default().descriptor();
    let mut de = serde_json::Deserializer::from_str(entry.body.as_str());
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(false);
    prost_reflect::DynamicMessage::deserialize_with_options(descriptor, &mut de, &options)
        .and_then(|d| {
            d.transcode_to::<pb::ScalingDecision>()
                .map_err(serde::de::Error::custom)
        })
        .map_err(|e| ApiError::internal(format!("reading scaling decision {}", entry.id), e))
}

fn scaling_event_type(action: pb::ScalingAction) -> Option<&'static str> {
    use ccm_cloudevents::ScalingPhase::Requested;
    use ccm_core::autoscale::ScalingAction as A;
    let core = match action {
        pb::ScalingAction::ScaleUp => A::ScaleUp,
        pb::ScalingAction::RestartStopped => A::RestartStopped,
        pb::ScalingAction::Drain => A::Drain,
        pb::ScalingAction::Stop => A::Stop,
        pb::ScalingAction::ForceStop => A::ForceStop,
        pb::ScalingAction::Terminate => A::Terminate,
        pb::ScalingAction::Wait => A::Wait,
        pb::ScalingAction::CancelDrain => return Some(SCALING_CANCEL_DRAIN),
        pb::ScalingAction::Halt => return Some(SCALING_HALTED),
        pb::ScalingAction::Resume => return Some(SCALING_RESUMED),
        pb::ScalingAction::None => return Some(SCALING_NONE),
        pb::ScalingAction::Unspecified => return None,
    };
    Some(ccm_cloudevents::catalog::event_type_for_scaling(
        core, Requested,
    ))
}

fn check_reason(v: &mut Violations, field: &str, reason: &str) {
    validate::reason(v, field, reason);
}

fn check_optional_id(v: &mut Violations, field: &str, value: &str) {
    validate::optional_id(v, field, value);
}

fn check_external_id(v: &mut Violations, field: &str, value: &str) {
    validate::free_text(v, field, value, MAX_EXTERNAL_ID_LEN, false);
}

fn opt_timestamp(
    v: &mut Violations,
    field: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Option<DateTime<Utc>> {
    ts.and_then(|t| v.absorb(timestamp_from_proto(t, field)))
}

/// What the placement commit needs of a live instance: its id, definition, worker, ports
/// and slot. Read straight from the stored canonical proto3 JSON (lowerCamelCase names,
/// RFC 3339 timestamps) with a small serde projection, which is several times cheaper than
/// decoding the whole instance; a body the projection cannot read is decoded in full.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LiveBooking {
    #[serde(default)]
    id: String,
    #[serde(default)]
    definition_id: String,
    #[serde(default)]
    definition_version: String,
    #[serde(default)]
    worker_id: String,
    #[serde(default)]
    allocated_ports: HashMap<String, i32>,
    #[serde(default, rename = "timeSlot", deserialize_with = "slot_of")]
    slot: Option<ccm_core::model::TimeSlot>,
}

#[derive(serde::Deserialize)]
struct SlotJson {
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    #[serde(default)]
    asap: bool,
}

fn slot_of<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ccm_core::model::TimeSlot>, D::Error> {
    let raw: Option<SlotJson> = serde::Deserialize::deserialize(d)?;
    Ok(raw.and_then(|s| {
        Some(ccm_core::model::TimeSlot {
            start: s.start?,
            end: s.end?,
            asap: s.asap,
        })
    }))
}

impl LiveBooking {
    fn of(doc: &ccm_store::Document) -> Result<LiveBooking, ApiError> {
        if let Ok(b) = serde_json::from_str::<LiveBooking>(doc.body.as_str())
            && b.id == doc.id
        {
            return Ok(b);
        }
        let i: pb::LabletInstance = crate::repo::decode(doc)?;
        Ok(LiveBooking {
            slot: convert::time_slot_from_proto(i.time_slot.as_ref(), "time_slot").ok(),
            id: i.id,
            definition_id: i.definition_id,
            definition_version: i.definition_version,
            worker_id: i.worker_id,
            allocated_ports: i.allocated_ports,
        })
    }
}

/// A placement that passed every check, waiting to be written.
struct Accepted {
    slot: usize,
    instance: pb::LabletInstance,
    /// The worker at the version the decision named, when it named one.
    guard: Option<pb::CmlWorker>,
    worker_id: String,
    ports: HashMap<String, i32>,
    score: f64,
}

/// The writes, audit record and CloudEvent of one accepted placement, and the instance's new
/// resource version.
fn placement_mutation(
    a: Accepted,
    origin: &Origin,
    factory: &ccm_cloudevents::EventFactory,
    now: DateTime<Utc>,
) -> Result<(i64, Mutation), ApiError> {
    let Accepted {
        mut instance,
        guard,
        worker_id,
        ports,
        score,
        ..
    } = a;
    let mut m = Mutation::at(now);
    if let Some(worker) = &guard {
        m.guard(worker);
    }
    let claims = ports
        .values()
        .map(|port| super::instances::port_claim(&worker_id, *port))
        .collect();
    m.update(&mut instance, ClaimChange::Replace(claims))?;
    m.append(
        LogKind::Audit,
        audit_log_entry(
            origin,
            now,
            "instance.schedule",
            pb::ResourceKind::Instance,
            &instance.id,
            pb::InstanceState::Pending.as_str_name(),
            pb::InstanceState::Scheduled.as_str_name(),
            ccm_core::instance::REASON_SCHEDULED,
            json!({
                "worker_id": worker_id,
                "allocated_ports": ports_json(&ports),
                "score": score,
            }),
        )?,
    );
    m.emit(factory.instance_state(
        &instance.id,
        CoreInstanceState::Scheduled,
        json!({
            "instance_id": instance.id,
            "worker_id": worker_id,
            "allocated_ports": ports_json(&ports),
        }),
        now,
    ));
    Ok((instance.resource_version, m))
}

/// Below this many items the work is done inline rather than spread over threads.
const PARALLEL_MIN_ITEMS: usize = 64;
/// Most threads one batch is spread over.
const PARALLEL_MAX_THREADS: usize = 4;

/// Applies `f` to every item on the blocking pool, in chunks, keeping the order.
async fn map_parallel<T, R, F>(items: Vec<T>, f: F) -> Result<Vec<R>, ApiError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Result<R, ApiError> + Send + Sync + 'static,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(PARALLEL_MAX_THREADS);
    if items.len() < PARALLEL_MIN_ITEMS || threads < 2 {
        return items.into_iter().map(f).collect();
    }
    let f = Arc::new(f);
    let per = items.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    let mut rest = items;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        chunks.push(std::mem::replace(&mut rest, tail));
    }
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let f = f.clone();
            tokio::task::spawn_blocking(move || {
                chunk
                    .into_iter()
                    .map(|t| f(t))
                    .collect::<Result<Vec<R>, ApiError>>()
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.extend(
            task.await
                .map_err(|e| ApiError::internal("a parallel task failed", e))??,
        );
    }
    Ok(out)
}

/// Decodes documents (on the blocking pool for large batches), keeping the order.
async fn decode_all<E: crate::repo::Entity>(
    docs: Vec<ccm_store::Document>,
) -> Result<Vec<E>, ApiError> {
    map_parallel(docs, |d| crate::repo::decode::<E>(&d)).await
}

/// An audit log entry written directly as canonical proto3 JSON of a [`pb::AuditRecord`]
/// (what [`crate::record::audit_from_entry`] reads), without the reflection encoder: the hot
/// path of the placement commit writes a thousand of them per batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn audit_log_entry(
    origin: &Origin,
    at: DateTime<Utc>,
    action: &str,
    kind: pb::ResourceKind,
    resource_id: &str,
    from_state: &str,
    to_state: &str,
    reason: &str,
    details: Value,
) -> Result<LogEntry, ApiError> {
    let at = ccm_store::truncate_to_millis(at);
    let id = uuid::Uuid::new_v4();
    let mut body = serde_json::Map::new();
    let mut put = |key: &str, value: &str| {
        if !value.is_empty() {
            body.insert(key.to_owned(), Value::String(value.to_owned()));
        }
    };
    put("id", &id.to_string());
    put(
        "at",
        &at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    );
    put("actor", &origin.actor);
    put("actorKind", origin.actor_kind.as_str_name());
    put("action", action);
    put("resourceKind", kind.as_str_name());
    put("resourceId", resource_id);
    put("fromState", from_state);
    put("toState", to_state);
    put("reason", reason);
    put("method", &origin.method);
    put("traceId", &origin.request_id);
    if details.is_object() {
        body.insert("details".to_owned(), details);
    }
    let body = ccm_store::Body::from_serialize(&Value::Object(body))
        .map_err(|e| ApiError::internal("encoding an audit record", e))?;
    Ok(LogEntry {
        id,
        at,
        resource_kind: kind.as_str_name().to_owned(),
        resource_id: resource_id.to_owned(),
        actor: origin.actor.clone(),
        action: action.to_owned(),
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

impl Internals {
    /// Checks the fence of a call (module docs) and returns the origin to record.
    async fn fence(
        &self,
        fence: Option<&pb::LeaderFence>,
        allowed: Leader,
        current: bool,
        rpc: &str,
        request_id: Option<&str>,
    ) -> Result<Origin, ApiError> {
        let mut v = Violations::new();
        let Some(f) = fence else {
            return Err(ApiError::invalid_argument(
                "fence",
                "internal calls must carry the leader fence",
            ));
        };
        if f.role != SCHEDULER_ELECTION && f.role != CONTROLLER_ELECTION {
            v.add(
                "fence.role",
                format!(
                    "unknown role {:?}: expected \"scheduler\" or \"controller\"",
                    f.role
                ),
            );
        }
        if f.epoch <= 0 {
            v.add("fence.epoch", "the leader epoch must be positive");
        }
        if f.holder_id.trim().is_empty() {
            v.add("fence.holder_id", "is required");
        } else {
            validate::free_text(
                &mut v,
                "fence.holder_id",
                &f.holder_id,
                MAX_EXTERNAL_ID_LEN,
                false,
            );
        }
        v.into_result()?;
        if !allowed.allows(&f.role) {
            return Err(ApiError::permission_denied(format!(
                "the {} leader may not call {rpc}",
                f.role
            )));
        }
        if current {
            self.app.check_fence(Some(f)).await?;
            match self.app.coord.leader(&f.role).await? {
                Some(l) if l.epoch == f.epoch && l.holder != f.holder_id => {
                    return Err(ApiError::permission_denied(format!(
                        "fence holder {:?} does not hold the {} leadership of epoch {}",
                        f.holder_id, f.role, f.epoch
                    )));
                }
                Some(l) if l.epoch == f.epoch => {}
                other => {
                    return Err(ApiError::stale_fence(
                        &f.role,
                        f.epoch,
                        other.map_or(0, |l| l.epoch),
                    ));
                }
            }
        }
        Ok(Origin::service(&f.role).in_call(&method(rpc), request_id))
    }

    /// The bookings of the live (resource-holding) instances on `worker_ids`, read as a
    /// projection of their stored JSON ([`LiveBooking`]).
    async fn live_bookings(&self, worker_ids: &[String]) -> Result<Vec<LiveBooking>, ApiError> {
        let mut docs = Vec::new();
        for chunk in worker_ids.chunks(ccm_store::MAX_IN_VALUES) {
            let mut token = None;
            loop {
                let page = self
                    .app
                    .store
                    .list(
                        Query::new(Kind::Instance)
                            .with_filter(Filter::any_of(
                                IndexField::WorkerId,
                                chunk.iter().cloned(),
                            ))
                            .with_filter(Filter::any_of(IndexField::State, holding_states()))
                            .with_page_size(LIVE_INSTANCES_PAGE)
                            .after(token),
                    )
                    .await?;
                docs.extend(page.items);
                match page.next_page_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
        }
        map_parallel(docs, |d| LiveBooking::of(&d)).await
    }

    /// How many instances hold resources on `worker_id`.
    async fn live_count(&self, worker_id: &str) -> Result<u64, ApiError> {
        Ok(self
            .app
            .store
            .count(
                Kind::Instance,
                &[
                    Filter::eq(IndexField::WorkerId, worker_id),
                    Filter::any_of(IndexField::State, holding_states()),
                ],
            )
            .await?)
    }

    /// Definitions by document id (`<id>@<version>`), read in bulk.
    async fn definitions(
        &self,
        doc_ids: BTreeSet<String>,
        into: &mut HashMap<String, pb::LabletDefinition>,
    ) -> Result<(), ApiError> {
        let missing: Vec<String> = doc_ids
            .into_iter()
            .filter(|id| !into.contains_key(id))
            .collect();
        for chunk in missing.chunks(ccm_store::MAX_GET_MANY) {
            for doc in self.app.store.get_many(Kind::Definition, chunk).await? {
                let def: pb::LabletDefinition = crate::repo::decode(&doc)?;
                into.insert(doc.id.clone(), def);
            }
        }
        Ok(())
    }

    async fn commit_placements_inner(
        &self,
        request: Request<pb::CommitPlacementsRequest>,
    ) -> Result<pb::CommitPlacementsResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Scheduler,
                true,
                "CommitPlacements",
                rid.as_deref(),
            )
            .await?;

        // Validate everything first.
        if req.placements.len() > MAX_PLACEMENTS_PER_BATCH {
            return Err(ApiError::invalid_argument(
                "placements",
                format!(
                    "at most {MAX_PLACEMENTS_PER_BATCH} placements per call, got {}",
                    req.placements.len()
                ),
            ));
        }
        let mut v = Violations::new();
        let mut seen = HashSet::new();
        for (i, p) in req.placements.iter().enumerate() {
            let field = index_path("placements", i);
            validate::id(&mut v, &join_path(&field, "instance_id"), &p.instance_id);
            validate::id(&mut v, &join_path(&field, "worker_id"), &p.worker_id);
            if !p.instance_id.is_empty() && !seen.insert(p.instance_id.as_str()) {
                v.add(
                    join_path(&field, "instance_id"),
                    "appears more than once in the batch",
                );
            }
            let ports_field = join_path(&field, "allocated_ports");
            for (name, port) in &p.allocated_ports {
                if name.trim().is_empty() {
                    v.add(key_path(&ports_field, name), "port name is required");
                }
                if !(1..=65535).contains(port) {
                    v.add(
                        key_path(&ports_field, name),
                        format!("port must be in 1..65535, got {port}"),
                    );
                }
            }
            if p.instance_resource_version < 0 {
                v.add(
                    join_path(&field, "instance_resource_version"),
                    "must not be negative",
                );
            }
            if p.worker_resource_version < 0 {
                v.add(
                    join_path(&field, "worker_resource_version"),
                    "must not be negative",
                );
            }
            if !p.score.is_finite() {
                v.add(join_path(&field, "score"), "must be a finite number");
            }
        }
        v.into_result()?;
        if req.placements.is_empty() {
            return Ok(pb::CommitPlacementsResponse::default());
        }

        let _batch = self.placements.lock().await;
        let now = self.app.now();
        let lead = self.app.settings.instantiation_lead;

        // Read what the batch touches, in bulk: the instances, and (at the same time) the
        // workers with their current bookings.
        let instance_ids: Vec<String> = req
            .placements
            .iter()
            .map(|p| p.instance_id.clone())
            .collect();
        let worker_ids: Vec<String> = req
            .placements
            .iter()
            .map(|p| p.worker_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let read_instances = async {
            let docs = self
                .app
                .store
                .get_many(Kind::Instance, &instance_ids)
                .await?;
            decode_all::<pb::LabletInstance>(docs).await
        };
        let read_workers = async {
            let mut workers: HashMap<String, pb::CmlWorker> = HashMap::new();
            for doc in self.app.store.get_many(Kind::Worker, &worker_ids).await? {
                workers.insert(doc.id.clone(), crate::repo::decode(&doc)?);
            }
            // Only RUNNING managed workers take placements; their bookings are needed.
            let open: Vec<String> = workers
                .values()
                .filter(|w| w.state() == pb::WorkerState::Running && !w.template_name.is_empty())
                .map(|w| w.id.clone())
                .collect();
            let live = self.live_bookings(&open).await?;
            Ok::<_, ApiError>((workers, open, live))
        };
        let (instances, fleet) = tokio::join!(read_instances, read_workers);
        let instances: HashMap<String, pb::LabletInstance> =
            instances?.into_iter().map(|i| (i.id.clone(), i)).collect();
        let (workers, open, live) = fleet?;
        let mut definitions: HashMap<String, pb::LabletDefinition> = HashMap::new();
        self.definitions(
            instances
                .values()
                .map(|i| definition_doc_id(&i.definition_id, &i.definition_version))
                .chain(
                    live.iter()
                        .map(|i| definition_doc_id(&i.definition_id, &i.definition_version)),
                )
                .collect(),
            &mut definitions,
        )
        .await?;

        // The current bookings of every worker that may take a placement.
        let mut books: HashMap<String, WorkerBook> = HashMap::new();
        for id in &open {
            let Some(worker) = workers.get(id) else {
                continue;
            };
            let declared = worker
                .declared_capacity
                .as_ref()
                .map(|c| convert::capacity_from_proto(c, "declared_capacity"))
                .transpose()
                .map_err(|e| ApiError::internal(format!("worker {id} capacity"), e))?
                .unwrap_or(Capacity::ZERO);
            let nodes = match pb::LicenseType::try_from(worker.license_type).unwrap_or_default() {
                pb::LicenseType::Personal => declared
                    .nodes
                    .min(ccm_core::defaults::PERSONAL_LICENSE_MAX_NODES),
                _ => declared.nodes,
            };
            let range = worker
                .port_range
                .as_ref()
                .map_or((2000, 9999), |r| (r.start, r.end));
            books.insert(
                id.clone(),
                WorkerBook {
                    worker: worker.clone(),
                    timeline: CapacityTimeline::new(Capacity { nodes, ..declared }),
                    range,
                    ports: HashMap::new(),
                },
            );
        }
        for inst in &live {
            let Some(book) = books.get_mut(&inst.worker_id) else {
                continue;
            };
            for port in inst.allocated_ports.values() {
                book.ports.insert(*port, inst.id.clone());
            }
            let usage = definitions
                .get(&definition_doc_id(
                    &inst.definition_id,
                    &inst.definition_version,
                ))
                .map(capacity_of_definition);
            match (usage, inst.slot) {
                (Some(usage), Some(slot)) => {
                    book.timeline
                        .insert(inst.id.clone(), slot.booking_window(lead), usage)
                }
                _ => tracing::warn!(
                    instance = %inst.id,
                    worker = %inst.worker_id,
                    "live instance without a readable definition or slot; its capacity is not counted"
                ),
            }
        }

        // Decide each item, in order; accepted items book their capacity and ports so later
        // items of the batch see them.
        let actor = actor_of(&origin);
        let mut results: Vec<pb::PlacementResult> = Vec::with_capacity(req.placements.len());
        let mut accepted: Vec<Accepted> = Vec::new();
        for p in &req.placements {
            use pb::PlacementOutcome as O;
            let id = p.instance_id.as_str();
            let Some(stored) = instances.get(id) else {
                results.push(placement_result(
                    id,
                    O::NotFound,
                    format!("instance {id} not found"),
                ));
                continue;
            };
            let Some(worker) = workers.get(&p.worker_id) else {
                results.push(placement_result(
                    id,
                    O::NotFound,
                    format!("worker {} not found", p.worker_id),
                ));
                continue;
            };
            if stored.state() == pb::InstanceState::Scheduled
                && stored.worker_id == p.worker_id
                && stored.allocated_ports == p.allocated_ports
            {
                let mut r = placement_result(
                    id,
                    O::AlreadyCommitted,
                    "already SCHEDULED on this worker with these ports",
                );
                r.resource_version = stored.resource_version;
                results.push(r);
                continue;
            }
            if stored.state() != pb::InstanceState::Pending {
                results.push(placement_result(
                    id,
                    O::InvalidState,
                    format!(
                        "instance is {}, not INSTANCE_STATE_PENDING",
                        stored.state().as_str_name()
                    ),
                ));
                continue;
            }
            if p.instance_resource_version != 0
                && p.instance_resource_version != stored.resource_version
            {
                results.push(placement_result(
                    id,
                    O::Stale,
                    format!(
                        "instance is at resource_version {}, the decision was based on {}",
                        stored.resource_version, p.instance_resource_version
                    ),
                ));
                continue;
            }
            if p.worker_resource_version != 0
                && p.worker_resource_version != worker.resource_version
            {
                results.push(placement_result(
                    id,
                    O::Stale,
                    format!(
                        "worker is at resource_version {}, the decision was based on {}",
                        worker.resource_version, p.worker_resource_version
                    ),
                ));
                continue;
            }
            let Some(book) = books.get_mut(&p.worker_id) else {
                let why = if worker.template_name.is_empty() {
                    "worker is a legacy (unmanaged) worker".to_owned()
                } else {
                    format!(
                        "worker is {}, only WORKER_STATE_RUNNING takes placements",
                        worker.state().as_str_name()
                    )
                };
                results.push(placement_result(id, O::WorkerUnavailable, why));
                continue;
            };
            let def_id = definition_doc_id(&stored.definition_id, &stored.definition_version);
            let Some(def) = definitions.get(&def_id) else {
                results.push(placement_result(
                    id,
                    O::NotFound,
                    format!("definition {def_id} not found"),
                ));
                continue;
            };
            // Ports: exactly the template's names, inside the range, free, distinct.
            let wanted: BTreeSet<&str> = def
                .port_template
                .as_ref()
                .map(|t| t.ports.iter().map(|p| p.name.as_str()).collect())
                .unwrap_or_default();
            let given: BTreeSet<&str> = p.allocated_ports.keys().map(String::as_str).collect();
            if wanted != given {
                results.push(placement_result(
                    id,
                    O::PortConflict,
                    format!(
                        "ports must be exactly the port template's names {wanted:?}, got {given:?}"
                    ),
                ));
                continue;
            }
            let mut port_problem = None;
            let mut distinct = HashSet::new();
            for (name, port) in &p.allocated_ports {
                if *port < book.range.0 || *port > book.range.1 {
                    port_problem = Some(format!(
                        "port {name}={port} is outside the worker's range {}-{}",
                        book.range.0, book.range.1
                    ));
                } else if !distinct.insert(*port) {
                    port_problem = Some(format!("port {port} is given twice"));
                } else if let Some(holder) = book.ports.get(port) {
                    port_problem = Some(format!(
                        "port {port} on worker {} is held by instance {holder}",
                        p.worker_id
                    ));
                }
                if port_problem.is_some() {
                    break;
                }
            }
            if let Some(why) = port_problem {
                results.push(placement_result(id, O::PortConflict, why));
                continue;
            }
            // Capacity over the booked window.
            let slot = match convert::time_slot_from_proto(stored.time_slot.as_ref(), "time_slot") {
                Ok(s) => s,
                Err(e) => {
                    results.push(placement_result(
                        id,
                        O::InvalidState,
                        format!("stored time slot unreadable: {e}"),
                    ));
                    continue;
                }
            };
            let window = slot.booking_window(lead);
            let demand = capacity_of_definition(def);
            if let Err(short) = book.timeline.check(&demand, &window) {
                results.push(placement_result(
                    id,
                    O::InsufficientCapacity,
                    format!(
                        "insufficient {}: needs {}, {} free at the busiest moment of {} – {}",
                        short.dimension,
                        short.needed,
                        short.available,
                        window.start.to_rfc3339(),
                        window.end.to_rfc3339()
                    ),
                ));
                continue;
            }
            // The domain moves it.
            let mut core = instance_core(stored)?;
            let ports: BTreeMap<String, u16> = p
                .allocated_ports
                .iter()
                .map(|(n, port)| (n.clone(), u16::try_from(*port).unwrap_or_default()))
                .collect();
            if let Err(e) = core.schedule(p.worker_id.clone(), ports, now, &actor) {
                results.push(placement_result(id, O::InvalidState, e.to_string()));
                continue;
            }
            let mut inst = stored.clone();
            write_back_instance(&mut inst, &core, now);
            inst.pending_summary = None;
            set_condition(
                &mut inst.conditions,
                &pb::Condition {
                    r#type: CONDITION_SCHEDULED.to_owned(),
                    status: pb::ConditionStatus::True as i32,
                    reason: CONDITION_REASON_PLACED.to_owned(),
                    message: format!("placed on worker {}", p.worker_id),
                    ..Default::default()
                },
                now,
            );
            book.timeline.insert(id.to_owned(), window, demand);
            for port in p.allocated_ports.values() {
                book.ports.insert(*port, id.to_owned());
            }
            accepted.push(Accepted {
                slot: results.len(),
                instance: inst,
                guard: (p.worker_resource_version != 0).then(|| book.worker.clone()),
                worker_id: p.worker_id.clone(),
                ports: p.allocated_ports.clone(),
                score: p.score,
            });
            results.push(placement_result(id, O::Committed, ""));
        }

        if accepted.is_empty() {
            return Ok(pb::CommitPlacementsResponse {
                results,
                revision: 0,
            });
        }
        // Build the writes (encoding is the expensive part) on the blocking pool, in order.
        let slots: Vec<usize> = accepted.iter().map(|a| a.slot).collect();
        let factory = self.app.factory.clone();
        let built = map_parallel(accepted, move |a| {
            placement_mutation(a, &origin, &factory, now)
        })
        .await?;
        let (versions, mutations): (Vec<i64>, Vec<Mutation>) = built.into_iter().unzip();
        let (applied, revision) = self.app.commit_each_at_revision(mutations).await?;
        let mut committed = 0usize;
        for ((slot, version), outcome) in slots.into_iter().zip(versions).zip(applied) {
            use pb::PlacementOutcome as O;
            let r = &mut results[slot];
            match outcome {
                Ok(_) => {
                    r.resource_version = version;
                    committed += 1;
                }
                Err(StoreError::ClaimTaken { key, holder_id, .. }) => {
                    r.outcome = O::PortConflict as i32;
                    r.message = format!("port {key} is held by {holder_id}");
                }
                Err(StoreError::Conflict { kind, id, .. }) => {
                    r.outcome = O::Stale as i32;
                    r.message = format!("{kind} {id} changed since it was read; decide again");
                }
                Err(StoreError::NotFound { kind, id }) => {
                    r.outcome = O::NotFound as i32;
                    r.message = format!("{kind} {id} not found");
                }
                Err(other) => {
                    r.outcome = O::Stale as i32;
                    r.message = format!("not committed: {other}");
                }
            }
        }
        tracing::Span::current().record("committed", committed);
        Ok(pb::CommitPlacementsResponse {
            results,
            revision: if committed > 0 {
                revision.map_or(0, |r| i64::try_from(r).unwrap_or(i64::MAX))
            } else {
                0
            },
        })
    }

    async fn transition_instance_inner(
        &self,
        request: Request<pb::TransitionInstanceRequest>,
    ) -> Result<pb::TransitionInstanceResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Either,
                true,
                "TransitionInstance",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::id(&mut v, "instance_id", &req.instance_id);
        let from: Option<pb::InstanceState> = validate::enum_value(&mut v, "from", req.from, true);
        let to: Option<pb::InstanceState> = validate::enum_value(&mut v, "to", req.to, true);
        check_reason(&mut v, "reason", &req.reason);
        if req.resource_version < 0 {
            v.add("resource_version", "must not be negative");
        }
        check_external_id(&mut v, "cml_lab_id", &req.cml_lab_id);
        if let Some(c) = &req.condition {
            check_condition(&mut v, "condition", c);
        }
        if let Some(to) = to {
            if to == pb::InstanceState::Scheduled {
                v.add("to", "placements are committed with CommitPlacements");
            }
            if to == pb::InstanceState::Pending {
                v.add("to", "nothing moves back to PENDING");
            }
            if req.increment_retry_count
                && !matches!(
                    to,
                    pb::InstanceState::Instantiating | pb::InstanceState::Terminated
                )
            {
                v.add(
                    "increment_retry_count",
                    "counts a failed instantiation: `to` must be INSTANTIATING (retry) or \
                     TERMINATED",
                );
            }
        }
        v.into_result()?;
        let (Some(from), Some(to)) = (from, to) else {
            return Err(ApiError::internal_msg("validated states missing"));
        };
        tracing::Span::current().record("reason", req.reason.as_str());

        let now = self.app.now();
        let mut inst: pb::LabletInstance = self.app.get(&req.instance_id).await?;
        if req.resource_version != 0 && req.resource_version != inst.resource_version {
            return Err(ApiError::stale_version(
                "instance",
                &inst.id,
                req.resource_version,
                inst.resource_version,
            ));
        }
        let current = inst.state();
        if current != from {
            return Err(ApiError::illegal_transition(
                "instance",
                current.as_str_name(),
                to.as_str_name(),
                format!(
                    "the instance is {}, not {} as the caller believes",
                    current.as_str_name(),
                    from.as_str_name()
                ),
            )
            .on_resource("instance", &inst.id));
        }
        let actor = actor_of(&origin);
        let mut core = instance_core(&inst)?;
        let reason = req.reason.trim();
        use ccm_core::instance as ci;
        let or = |default: &'static str| {
            if reason.is_empty() {
                default.to_owned()
            } else {
                reason.to_owned()
            }
        };
        let result = if req.increment_retry_count {
            let worker_state = match core.worker_id.as_deref() {
                Some(w) => match self.app.find::<pb::CmlWorker>(w).await? {
                    Some(w) => convert::worker_state_from_proto(w.state, "worker.state")
                        .unwrap_or(CoreWorkerState::Unknown),
                    None => CoreWorkerState::Terminated,
                },
                None => CoreWorkerState::Terminated,
            };
            core.record_instantiation_failure(
                &or("instantiation_failed"),
                worker_state,
                now,
                &actor,
            )
            .and_then(|outcome| match outcome {
                ci::RetryOutcome::Retry { .. } if to == pb::InstanceState::Terminated => {
                    core.force_terminate(&or(ci::REASON_MAX_RETRIES_EXCEEDED), true, now, &actor)
                }
                _ => Ok(()),
            })
        } else {
            match to {
                pb::InstanceState::Instantiating => core.begin_instantiation(now, &actor),
                pb::InstanceState::Running if from == pb::InstanceState::Stopped => {
                    core.restart(now, &actor)
                }
                pb::InstanceState::Running => {
                    core.mark_running(req.cml_lab_id.clone(), now, &actor)
                }
                pb::InstanceState::Collecting => {
                    core.start_collection(&or(ci::REASON_TIMESLOT_END), now, &actor)
                }
                pb::InstanceState::Grading => core.collection_completed(now, &actor),
                pb::InstanceState::Stopping => core.stop(&or(ci::REASON_TIMESLOT_END), now, &actor),
                pb::InstanceState::Stopped => core.mark_stopped(now, &actor),
                pb::InstanceState::Archived => {
                    core.archive(&or(ci::REASON_TIMESLOT_END), now, &actor)
                }
                pb::InstanceState::Terminated => {
                    let r = or(ci::REASON_CLEANUP);
                    let normal = ci::check_instance_transition(
                        core.state,
                        CoreInstanceState::Terminated,
                        &ci::InstanceTransitionContext::NORMAL,
                    );
                    if normal.is_ok() {
                        core.terminate(&r, now, &actor)
                    } else {
                        core.force_terminate(&r, true, now, &actor)
                    }
                }
                pb::InstanceState::Pending
                | pb::InstanceState::Scheduled
                | pb::InstanceState::Unspecified => {
                    return Err(ApiError::invalid_argument(
                        "to",
                        "not a target of this call",
                    ));
                }
            }
        };
        result?;
        write_back_instance(&mut inst, &core, now);
        let new_state = inst.state();
        let recorded_reason = inst
            .state_history
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default();
        if new_state == pb::InstanceState::Terminated {
            inst.termination_reason = recorded_reason.clone();
        }
        if let Some(c) = &req.condition {
            set_condition(&mut inst.conditions, c, now);
        }
        let claims = if new_state == pb::InstanceState::Terminated {
            ClaimChange::Replace(Vec::new())
        } else {
            ClaimChange::Keep
        };
        let mut m = Mutation::at(now);
        m.update(&mut inst, claims)?;
        m.audit(
            &inst,
            &origin,
            AuditFacts {
                action: if req.increment_retry_count && new_state == current {
                    "instance.retry".to_owned()
                } else {
                    "instance.transition".to_owned()
                },
                from_state: current.as_str_name().to_owned(),
                to_state: new_state.as_str_name().to_owned(),
                reason: recorded_reason.clone(),
                details: to_struct(json!({
                    "requested_to": to.as_str_name(),
                    "retry_count": inst.retry_count,
                    "cml_lab_id": inst.cml_lab_id,
                })),
            },
        );
        if new_state != current {
            let mut data = instance_event_data(&inst, current, &recorded_reason, now);
            if new_state == pb::InstanceState::Running
                && let Some(w) = self.app.find::<pb::CmlWorker>(&inst.worker_id).await?
                && let Value::Object(map) = &mut data
            {
                let host = w
                    .ec2
                    .as_ref()
                    .map(|e| {
                        if e.public_ip.is_empty() {
                            e.private_ip.clone()
                        } else {
                            e.public_ip.clone()
                        }
                    })
                    .unwrap_or_default();
                map.insert("worker_hostname".to_owned(), Value::String(host));
            }
            let core_state = convert::instance_state_from_proto(inst.state, "state")
                .map_err(|e| ApiError::internal("instance state", e))?;
            m.emit(
                self.app
                    .factory
                    .instance_state(&inst.id, core_state, data, now),
            );
        }
        self.app.commit(m).await?;
        Ok(pb::TransitionInstanceResponse {
            instance: Some(inst),
        })
    }

    async fn set_instance_conditions_inner(
        &self,
        request: Request<pb::SetInstanceConditionsRequest>,
    ) -> Result<pb::SetInstanceConditionsResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let _origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Either,
                true,
                "SetInstanceConditions",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        if req.updates.len() > MAX_CONDITION_UPDATES {
            return Err(ApiError::invalid_argument(
                "updates",
                format!(
                    "at most {MAX_CONDITION_UPDATES} updates per call, got {}",
                    req.updates.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, u) in req.updates.iter().enumerate() {
            let field = index_path("updates", i);
            validate::id(&mut v, &join_path(&field, "instance_id"), &u.instance_id);
            if !u.instance_id.is_empty() && !seen.insert(u.instance_id.as_str()) {
                v.add(
                    join_path(&field, "instance_id"),
                    "appears more than once in the batch",
                );
            }
            match &u.condition {
                None => v.add(join_path(&field, "condition"), "is required"),
                Some(c) => check_condition(&mut v, &join_path(&field, "condition"), c),
            }
            if let Some(s) = &u.pending_summary {
                validate::free_text(
                    &mut v,
                    &join_path(&field, "pending_summary.message"),
                    &s.message,
                    MAX_MESSAGE_LEN,
                    false,
                );
            }
        }
        v.into_result()?;
        let now = self.app.now();
        let ids: Vec<String> = req.updates.iter().map(|u| u.instance_id.clone()).collect();
        let mut instances: HashMap<String, pb::LabletInstance> = HashMap::new();
        for chunk in ids.chunks(ccm_store::MAX_GET_MANY) {
            for doc in self.app.store.get_many(Kind::Instance, chunk).await? {
                instances.insert(doc.id.clone(), crate::repo::decode(&doc)?);
            }
        }
        let mut results = Vec::with_capacity(req.updates.len());
        let mut mutations = Vec::new();
        let mut slots = Vec::new();
        for u in &req.updates {
            let result = |updated: bool, message: &str| pb::InstanceConditionResult {
                instance_id: u.instance_id.clone(),
                updated,
                message: message.to_owned(),
            };
            let Some(stored) = instances.get(&u.instance_id) else {
                results.push(result(false, "instance not found"));
                continue;
            };
            if stored.state() != pb::InstanceState::Pending {
                results.push(result(
                    false,
                    &format!(
                        "instance is {}, no longer PENDING",
                        stored.state().as_str_name()
                    ),
                ));
                continue;
            }
            let Some(condition) = &u.condition else {
                continue;
            };
            let mut inst = stored.clone();
            let changed = set_condition(&mut inst.conditions, condition, now);
            let summary_changed =
                u.pending_summary.is_some() && inst.pending_summary != u.pending_summary;
            if !changed && !summary_changed {
                results.push(result(true, "unchanged"));
                continue;
            }
            if u.pending_summary.is_some() {
                inst.pending_summary = u.pending_summary.clone();
            }
            inst.updated_at = Some(timestamp_to_proto(now));
            let mut m = Mutation::at(now);
            m.update(&mut inst, ClaimChange::Keep)?;
            slots.push(results.len());
            results.push(result(true, ""));
            mutations.push(m);
        }
        if !mutations.is_empty() {
            let applied = self.app.commit_each(mutations).await?;
            for (slot, outcome) in slots.into_iter().zip(applied) {
                if let Err(e) = outcome {
                    results[slot].updated = false;
                    results[slot].message = match e {
                        StoreError::Conflict { .. } => {
                            "modified concurrently; re-read and retry".to_owned()
                        }
                        other => other.to_string(),
                    };
                }
            }
        }
        Ok(pb::SetInstanceConditionsResponse { results })
    }

    async fn report_worker_inner(
        &self,
        request: Request<pb::ReportWorkerRequest>,
    ) -> Result<pb::ReportWorkerResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "ReportWorker",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::id(&mut v, "worker_id", &req.worker_id);
        if req.resource_version < 0 {
            v.add("resource_version", "must not be negative");
        }
        let Some(obs) = &req.observation else {
            v.add("observation", "is required");
            v.into_result()?;
            return Err(ApiError::internal_msg("unreachable: observation missing"));
        };
        opt_timestamp(&mut v, "observation.observed_at", obs.observed_at.as_ref());
        opt_timestamp(
            &mut v,
            "observation.next_refresh_at",
            obs.next_refresh_at.as_ref(),
        );
        validate::enum_value::<pb::CmlServiceStatus>(
            &mut v,
            "observation.service_status",
            obs.service_status,
            false,
        );
        if let Some(ec2) = &obs.ec2 {
            check_external_id(&mut v, "observation.ec2.instance_id", &ec2.instance_id);
            check_external_id(
                &mut v,
                "observation.ec2.instance_state",
                &ec2.instance_state,
            );
        }
        if let Some(l) = &obs.license {
            validate::enum_value::<pb::LicenseStatus>(
                &mut v,
                "observation.license.status",
                l.status,
                false,
            );
        }
        if let Some(u) = &obs.utilization {
            for (name, value) in [
                ("cpu_percent", u.cpu_percent),
                ("memory_percent", u.memory_percent),
                ("storage_percent", u.storage_percent),
            ] {
                if !value.is_finite() || !(0.0..=100.0).contains(&value) {
                    v.add(
                        format!("observation.utilization.{name}"),
                        format!("must be a percentage 0..100, got {value}"),
                    );
                }
            }
        }
        if obs.labs.len() > MAX_OBSERVED_LABS {
            v.add(
                "observation.labs",
                format!("at most {MAX_OBSERVED_LABS} labs, got {}", obs.labs.len()),
            );
        }
        for (i, lab) in obs.labs.iter().enumerate() {
            let field = index_path("observation.labs", i);
            if lab.lab_id.trim().is_empty() {
                v.add(join_path(&field, "lab_id"), "is required");
            }
        }
        for (i, c) in obs.conditions.iter().enumerate() {
            check_condition(&mut v, &index_path("observation.conditions", i), c);
        }
        v.into_result()?;

        let actor = actor_of(&origin);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let now = self.app.now();
            let mut worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
            if req.resource_version != 0 && req.resource_version != worker.resource_version {
                return Err(ApiError::stale_version(
                    "worker",
                    &worker.id,
                    req.resource_version,
                    worker.resource_version,
                ));
            }
            let before = worker.state();
            if let Some(ec2) = &obs.ec2 {
                let mut e = ec2.clone();
                if let Some(old) = &worker.ec2 {
                    if e.instance_id.is_empty() {
                        e.instance_id = old.instance_id.clone();
                    }
                    // Tags an admin set (UpdateWorkerTags) that the controller has not applied
                    // yet are the desired state: an observation must not revert them. They
                    // become the observed tags once the controller reports them applied.
                    if desired_tags_pending(&worker.conditions, &obs.conditions) {
                        e.tags = old.tags.clone();
                    }
                }
                worker.ec2 = Some(e);
            }
            if let Some(cml) = &obs.cml {
                worker.cml = Some(cml.clone());
            }
            if obs.service_status != pb::CmlServiceStatus::Unspecified as i32 {
                worker.service_status = obs.service_status;
            }
            if let Some(l) = &obs.license {
                let mut l = l.clone();
                if let Some(old) = &worker.license {
                    l.token_set = old.token_set;
                    l.operation_in_progress = l.operation_in_progress || old.operation_in_progress;
                }
                worker.license = Some(l);
            }
            if let Some(u) = &obs.utilization {
                worker.utilization = Some(*u);
            }
            if obs.labs_synced {
                let cml = worker.cml.get_or_insert_with(Default::default);
                cml.labs_count = i32::try_from(obs.labs.len()).unwrap_or(i32::MAX);
            }
            if let Some(idle) = &obs.idle {
                worker.idle = Some(idle.clone());
            }
            for c in &obs.conditions {
                set_condition(&mut worker.conditions, c, now);
            }
            if obs.next_refresh_at.is_some() {
                worker.next_refresh_at = obs.next_refresh_at;
            }
            // The EC2 state drives the worker state where the state machine allows it.
            let mut transition = None;
            if let Some(name) = obs
                .ec2
                .as_ref()
                .map(|e| e.instance_state.as_str())
                .filter(|s| !s.is_empty())
            {
                let mut core = convert::worker_from_proto(&worker, "worker")
                    .map_err(|e| ApiError::internal("stored worker unreadable", e))?;
                match core.observe_ec2_state(name, now, &actor) {
                    ccm_core::worker::Ec2Observation::Transitioned { from, reason, .. } => {
                        write_back_worker(&mut worker, &core, now);
                        worker.state_reason = reason.clone();
                        set_condition(
                            &mut worker.conditions,
                            &pb::Condition {
                                r#type: CONDITION_EC2_IN_SYNC.to_owned(),
                                status: pb::ConditionStatus::True as i32,
                                reason: "InSync".to_owned(),
                                message: String::new(),
                                ..Default::default()
                            },
                            now,
                        );
                        transition = Some((from, reason));
                    }
                    ccm_core::worker::Ec2Observation::Divergence { why, ec2_state, .. } => {
                        tracing::warn!(worker = %worker.id, ec2_state = %ec2_state, why = %why, "EC2 state diverges from the worker state");
                        set_condition(
                            &mut worker.conditions,
                            &pb::Condition {
                                r#type: CONDITION_EC2_IN_SYNC.to_owned(),
                                status: pb::ConditionStatus::False as i32,
                                reason: "Divergence".to_owned(),
                                message: format!("EC2 reports {ec2_state:?}: {why}"),
                                ..Default::default()
                            },
                            now,
                        );
                    }
                    ccm_core::worker::Ec2Observation::InSync
                    | ccm_core::worker::Ec2Observation::Waiting { .. } => {
                        set_condition(
                            &mut worker.conditions,
                            &pb::Condition {
                                r#type: CONDITION_EC2_IN_SYNC.to_owned(),
                                status: pb::ConditionStatus::True as i32,
                                reason: "InSync".to_owned(),
                                message: String::new(),
                                ..Default::default()
                            },
                            now,
                        );
                    }
                }
            }
            worker.updated_at = Some(timestamp_to_proto(now));
            let mut m = Mutation::at(now);
            m.update(&mut worker, ClaimChange::Keep)?;
            if let Some((from, reason)) = &transition {
                m.audit(
                    &worker,
                    &origin,
                    AuditFacts {
                        action: "worker.transition".to_owned(),
                        from_state: before.as_str_name().to_owned(),
                        to_state: worker.state().as_str_name().to_owned(),
                        reason: reason.clone(),
                        details: to_struct(json!({ "observed_ec2_state": obs.ec2.as_ref().map(|e| e.instance_state.clone()) })),
                    },
                );
                m.emit(super::workers::worker_event(
                    &self.app.factory,
                    &worker,
                    Some(*from),
                    reason,
                    &origin.actor,
                    now,
                    serde_json::Map::new(),
                ));
            }
            if obs.labs_synced {
                let mut labs = obs.labs.clone();
                for lab in &mut labs {
                    lab.worker_id = worker.id.clone();
                }
                let mut snapshot = super::workers::labs_snapshot(&worker.id, &labs, now)?;
                match self.app.find::<pb::WorkerOperation>(&snapshot.id).await? {
                    Some(existing) => {
                        snapshot.resource_version = existing.resource_version;
                        m.update(&mut snapshot, ClaimChange::Keep)?;
                    }
                    None => m.create(&mut snapshot, Vec::new())?,
                }
            }
            match self.app.commit(m).await {
                Ok(_) => {
                    return Ok(pb::ReportWorkerResponse {
                        worker: Some(worker),
                    });
                }
                Err(ApiError::Aborted { .. })
                    if req.resource_version == 0 && attempts < MAX_UNCONDITIONAL_RETRIES =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn transition_worker_inner(
        &self,
        request: Request<pb::TransitionWorkerRequest>,
    ) -> Result<pb::TransitionWorkerResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "TransitionWorker",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::id(&mut v, "worker_id", &req.worker_id);
        let from: Option<pb::WorkerState> = validate::enum_value(&mut v, "from", req.from, true);
        let to: Option<pb::WorkerState> = validate::enum_value(&mut v, "to", req.to, true);
        check_reason(&mut v, "reason", &req.reason);
        if req.resource_version < 0 {
            v.add("resource_version", "must not be negative");
        }
        check_external_id(&mut v, "aws_instance_id", &req.aws_instance_id);
        let deadline = opt_timestamp(&mut v, "drain_deadline", req.drain_deadline.as_ref());
        check_optional_id(&mut v, "scaling_decision_id", &req.scaling_decision_id);
        if to == Some(pb::WorkerState::Provisioning) && req.aws_instance_id.trim().is_empty() {
            v.add(
                "aws_instance_id",
                "is required to move a worker to PROVISIONING",
            );
        }
        v.into_result()?;
        let (Some(from), Some(to)) = (from, to) else {
            return Err(ApiError::internal_msg("validated states missing"));
        };
        tracing::Span::current().record("reason", req.reason.as_str());
        let now = self.app.now();
        let mut worker: pb::CmlWorker = self.app.get(&req.worker_id).await?;
        if req.resource_version != 0 && req.resource_version != worker.resource_version {
            return Err(ApiError::stale_version(
                "worker",
                &worker.id,
                req.resource_version,
                worker.resource_version,
            ));
        }
        let current = worker.state();
        if current != from {
            return Err(ApiError::illegal_transition(
                "worker",
                current.as_str_name(),
                to.as_str_name(),
                format!(
                    "the worker is {}, not {} as the caller believes",
                    current.as_str_name(),
                    from.as_str_name()
                ),
            )
            .on_resource("worker", &worker.id));
        }
        let mut core = convert::worker_from_proto(&worker, "worker")
            .map_err(|e| ApiError::internal("stored worker unreadable", e))?;
        let actor = actor_of(&origin);
        let reason = req.reason.trim();
        let or = |d: &str| {
            if reason.is_empty() {
                d.to_owned()
            } else {
                reason.to_owned()
            }
        };
        use ccm_core::worker as cw;
        match to {
            pb::WorkerState::Provisioning => {
                core.begin_provisioning(req.aws_instance_id.trim(), now, &actor)
            }
            pb::WorkerState::Running if current == pb::WorkerState::Draining => {
                core.cancel_drain(now, &actor, false)
            }
            pb::WorkerState::Running => core.mark_running(now, &actor),
            pb::WorkerState::Draining => core.drain(&or(cw::REASON_SCALE_DOWN_IDLE), now, &actor),
            pb::WorkerState::Stopping => core.begin_stop(&or(cw::REASON_DRAINED), now, &actor),
            pb::WorkerState::Stopped => core.mark_stopped(now, &actor),
            pb::WorkerState::Starting => core.begin_start(now, &actor),
            pb::WorkerState::ShuttingDown => core.begin_terminate(&or("terminate"), now, &actor),
            pb::WorkerState::Terminated => {
                core.mark_terminated(&or(cw::REASON_EC2_TERMINATED), now, &actor)
            }
            pb::WorkerState::Failed => core.mark_failed(&or("failed"), now, &actor),
            pb::WorkerState::Pending | pb::WorkerState::Unknown | pb::WorkerState::Unspecified => {
                return Err(ApiError::illegal_transition(
                    "worker",
                    current.as_str_name(),
                    to.as_str_name(),
                    "nothing moves a worker back to PENDING or to UNKNOWN",
                )
                .on_resource("worker", &worker.id));
            }
        }?;
        write_back_worker(&mut worker, &core, now);
        let recorded_reason = core
            .state_history
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default();
        worker.state_reason = recorded_reason.clone();
        let mut instances_on_worker = 0usize;
        match to {
            pb::WorkerState::Draining => {
                instances_on_worker =
                    usize::try_from(self.live_count(&worker.id).await?).unwrap_or(usize::MAX);
                let deadline = match deadline {
                    Some(d) => d,
                    None => {
                        let hours = match self
                            .app
                            .find::<pb::WorkerTemplate>(&worker.template_name)
                            .await?
                            .and_then(|t| t.drain_timeout)
                        {
                            Some(d) => d.seconds / 3600,
                            None => ccm_core::defaults::DRAIN_TIMEOUT_HOURS,
                        };
                        now + Duration::hours(hours.max(0))
                    }
                };
                worker.drain = Some(pb::DrainInfo {
                    drain_started_at: Some(timestamp_to_proto(now)),
                    reason: recorded_reason.clone(),
                    deadline: Some(timestamp_to_proto(deadline)),
                    requested_by: origin.actor.clone(),
                    instances_at_start: i32::try_from(instances_on_worker).unwrap_or(i32::MAX),
                });
            }
            pb::WorkerState::Starting => {
                worker.start_initiated_at = Some(timestamp_to_proto(now));
            }
            pb::WorkerState::Running => {
                worker.start_initiated_at = None;
            }
            pb::WorkerState::Stopping => {
                worker.stop_initiated_at = Some(timestamp_to_proto(now));
            }
            pb::WorkerState::Stopped => {
                worker.stop_initiated_at = None;
            }
            pb::WorkerState::Terminated => {
                worker.terminated_at = Some(timestamp_to_proto(now));
                worker.terminated_by = origin.actor.clone();
            }
            _ => {}
        }
        // A worker holds its EC2 instance id (an instance backs one worker).
        let claims = if to == pb::WorkerState::Provisioning {
            let mut held = self.app.store.claims_of(Kind::Worker, &worker.id).await?;
            held.retain(|c| c.namespace != super::workers::AWS_INSTANCE_CLAIM_NAMESPACE);
            held.push(super::workers::aws_instance_claim(
                req.aws_instance_id.trim(),
            ));
            ClaimChange::Replace(held)
        } else {
            ClaimChange::Keep
        };
        let mut m = Mutation::at(now);
        m.update(&mut worker, claims)?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.transition".to_owned(),
                from_state: current.as_str_name().to_owned(),
                to_state: worker.state().as_str_name().to_owned(),
                reason: recorded_reason.clone(),
                details: to_struct(json!({
                    "scaling_decision_id": req.scaling_decision_id,
                    "aws_instance_id": req.aws_instance_id,
                })),
            },
        );
        let mut extra = serde_json::Map::new();
        extra.insert("scaling_decision_id".into(), json!(req.scaling_decision_id));
        if let (Some(d), pb::WorkerState::Draining) = (worker.drain.as_ref(), to) {
            extra.insert("running_instances_count".into(), json!(instances_on_worker));
            extra.insert(
                "estimated_drain_completion".into(),
                ts_json(d.deadline.as_ref()),
            );
        }
        let core_from = convert::worker_state_from_proto(current as i32, "from")
            .map_err(|e| ApiError::internal("worker state", e))?;
        m.emit(super::workers::worker_event(
            &self.app.factory,
            &worker,
            Some(core_from),
            &recorded_reason,
            &origin.actor,
            now,
            extra,
        ));
        self.app.commit(m).await?;
        Ok(pb::TransitionWorkerResponse {
            worker: Some(worker),
        })
    }

    async fn create_worker_record_inner(
        &self,
        request: Request<pb::CreateWorkerRecordRequest>,
    ) -> Result<pb::CreateWorkerRecordResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "CreateWorkerRecord",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::template_name(&mut v, "template_name", &req.template_name);
        if !req.name.is_empty() {
            validate::free_text(
                &mut v,
                "name",
                &req.name,
                ccm_core::defaults::MAX_NAME_LEN,
                false,
            );
        }
        check_external_id(&mut v, "region", &req.region);
        check_reason(&mut v, "reason", &req.reason);
        check_optional_id(&mut v, "scaling_decision_id", &req.scaling_decision_id);
        if let Some(None) = validate::idempotency_key(&mut v, "request_id", &req.request_id) {
            v.add("request_id", "is required (the idempotency key)");
        }
        v.into_result()?;
        let claim = Claim::new(WORKER_REQUEST_CLAIM, req.request_id.clone());
        if let Some(existing) = self.worker_of_request(&claim).await? {
            return Ok(pb::CreateWorkerRecordResponse {
                worker: Some(existing),
            });
        }
        let template: pb::WorkerTemplate = self.app.get(&req.template_name).await?;
        let region = if req.region.is_empty() {
            template.regions.first().cloned().unwrap_or_default()
        } else {
            if !template.regions.is_empty() && !template.regions.contains(&req.region) {
                return Err(ApiError::failed_precondition(
                    "REGION",
                    "region",
                    format!(
                        "template {} is not provisioned in {} (regions: {})",
                        template.name,
                        req.region,
                        template.regions.join(", ")
                    ),
                ));
            }
            req.region.clone()
        };
        let core_template = convert::template_from_proto(&template, "template").map_err(|e| {
            ApiError::internal(format!("stored template {} is invalid", template.name), e)
        })?;
        let now = self.app.now();
        let id = uuid::Uuid::new_v4().to_string();
        let short: String = id.chars().take(8).collect();
        let reason = if req.reason.trim().is_empty() {
            REASON_SCALE_UP.to_owned()
        } else {
            req.reason.trim().to_owned()
        };
        let name = if req.name.is_empty() {
            format!("cml-worker-{}-{short}", template.name)
        } else {
            req.name.clone()
        };
        use super::workers::{
            MANAGED_BY_VALUE, TAG_MANAGED, TAG_MANAGED_BY, TAG_NAME, TAG_TEMPLATE,
        };
        let mut tags: BTreeMap<String, String> = core_template.tags.clone();
        tags.insert(TAG_NAME.into(), name.clone());
        tags.insert(TAG_TEMPLATE.into(), template.name.clone());
        tags.insert(TAG_MANAGED.into(), "true".into());
        tags.insert(TAG_MANAGED_BY.into(), MANAGED_BY_VALUE.into());
        let mut worker = pb::CmlWorker {
            id: id.clone(),
            name,
            state: pb::WorkerState::Pending as i32,
            state_reason: reason.clone(),
            service_status: pb::CmlServiceStatus::Unavailable as i32,
            template_name: template.name.clone(),
            license_type: convert::license_type_to_proto(core_template.license_type) as i32,
            declared_capacity: Some(convert::capacity_to_proto(
                &core_template.declared_capacity(),
            )),
            port_range: Some(convert::port_range_to_proto(&core_template.port_range)),
            ec2: Some(pb::Ec2Info {
                instance_type: core_template.instance_type.clone(),
                region,
                tags: tags.into_iter().collect(),
                ..Default::default()
            }),
            created_at: Some(timestamp_to_proto(now)),
            updated_at: Some(timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            ..Default::default()
        };
        let mut m = Mutation::at(now);
        m.create(&mut worker, vec![claim.clone()])?;
        m.audit(
            &worker,
            &origin,
            AuditFacts {
                action: "worker.create".to_owned(),
                from_state: String::new(),
                to_state: pb::WorkerState::Pending.as_str_name().to_owned(),
                reason: reason.clone(),
                details: to_struct(json!({
                    "template_name": template.name,
                    "request_id": req.request_id,
                    "scaling_decision_id": req.scaling_decision_id,
                })),
            },
        );
        let mut extra = serde_json::Map::new();
        extra.insert("scaling_decision_id".into(), json!(req.scaling_decision_id));
        m.emit(super::workers::worker_event(
            &self.app.factory,
            &worker,
            None,
            &reason,
            &origin.actor,
            now,
            extra,
        ));
        match self.app.commit(m).await {
            Ok(_) => Ok(pb::CreateWorkerRecordResponse {
                worker: Some(worker),
            }),
            // A concurrent retry with the same request id won.
            Err(ApiError::AlreadyExists { .. }) => match self.worker_of_request(&claim).await? {
                Some(existing) => Ok(pb::CreateWorkerRecordResponse {
                    worker: Some(existing),
                }),
                None => Err(ApiError::already_exists("worker", req.request_id)),
            },
            Err(e) => Err(e),
        }
    }

    async fn worker_of_request(&self, claim: &Claim) -> Result<Option<pb::CmlWorker>, ApiError> {
        match self.app.store.claim_holder(claim).await? {
            Some(holder) if holder.kind == Kind::Worker => self.app.find(&holder.id).await,
            _ => Ok(None),
        }
    }

    async fn stored_decision(&self, id: &str) -> Result<Option<pb::ScalingDecision>, ApiError> {
        let page = self
            .app
            .store
            .list_log(
                LogKind::ScalingDecision,
                LogQuery {
                    resource_kind: Some(SCALING_DECISION_LOG_KIND.to_owned()),
                    resource_id: Some(id.to_owned()),
                    page_size: 1,
                    ..Default::default()
                },
            )
            .await?;
        page.entries.first().map(decision_from_entry).transpose()
    }

    async fn record_scaling_decision_inner(
        &self,
        request: Request<pb::RecordScalingDecisionRequest>,
    ) -> Result<pb::RecordScalingDecisionResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "RecordScalingDecision",
                rid.as_deref(),
            )
            .await?;
        let epoch = req.fence.as_ref().map_or(0, |f| f.epoch);
        let mut v = Violations::new();
        validate::idempotency_key(&mut v, "request_id", &req.request_id);
        let Some(decision) = &req.decision else {
            v.add("decision", "is required");
            v.into_result()?;
            return Err(ApiError::internal_msg("unreachable: decision missing"));
        };
        let action: Option<pb::ScalingAction> =
            validate::enum_value(&mut v, "decision.action", decision.action, true);
        validate::enum_value::<pb::ScalingTrigger>(
            &mut v,
            "decision.triggered_by",
            decision.triggered_by,
            false,
        );
        if !decision.template_name.is_empty() {
            validate::template_name(&mut v, "decision.template_name", &decision.template_name);
        }
        check_optional_id(&mut v, "decision.worker_id", &decision.worker_id);
        if decision.count < 0 {
            v.add("decision.count", "must not be negative");
        }
        validate::free_text(
            &mut v,
            "decision.reason",
            &decision.reason,
            MAX_MESSAGE_LEN,
            true,
        );
        if decision.reason_code.len() > MAX_CODE_LEN
            || !decision
                .reason_code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            v.add(
                "decision.reason_code",
                format!("must be at most {MAX_CODE_LEN} characters of [a-z0-9_]"),
            );
        }
        validate::free_text(
            &mut v,
            "decision.triggered_by_subject",
            &decision.triggered_by_subject,
            MAX_EXTERNAL_ID_LEN,
            false,
        );
        opt_timestamp(&mut v, "decision.at", decision.at.as_ref());
        opt_timestamp(
            &mut v,
            "decision.estimated_ready_at",
            decision.estimated_ready_at.as_ref(),
        );
        if decision.instance_ids.len() > MAX_DECISION_INSTANCE_IDS {
            v.add(
                "decision.instance_ids",
                format!("at most {MAX_DECISION_INSTANCE_IDS} ids"),
            );
        }
        for (i, id) in decision.instance_ids.iter().enumerate() {
            validate::id(&mut v, &index_path("decision.instance_ids", i), id);
        }
        v.into_result()?;
        let Some(action) = action else {
            return Err(ApiError::internal_msg("validated action missing"));
        };
        tracing::Span::current().record("reason", decision.reason_code.as_str());

        let id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4()
        } else {
            decision_id_for(&req.request_id)
        };
        if !req.request_id.is_empty()
            && let Some(existing) = self.stored_decision(&id.to_string()).await?
        {
            return Ok(pb::RecordScalingDecisionResponse {
                decision: Some(existing),
            });
        }
        let now = self.app.now();
        let mut stored = decision.clone();
        stored.id = id.to_string();
        stored.leader_epoch = epoch;
        if stored.at.is_none() {
            stored.at = Some(timestamp_to_proto(now));
        }
        if stored.triggered_by == pb::ScalingTrigger::Unspecified as i32 {
            stored.triggered_by = pb::ScalingTrigger::System as i32;
        }
        let entry = decision_to_entry(&stored, &origin.actor)?;
        let mut m = Mutation::at(now);
        m.append(LogKind::ScalingDecision, entry);
        m.append_audit(pb::AuditRecord {
            id: uuid::Uuid::new_v4().to_string(),
            at: Some(timestamp_to_proto(now)),
            actor: origin.actor.clone(),
            actor_kind: origin.actor_kind as i32,
            action: "scaling.decision".to_owned(),
            resource_kind: pb::ResourceKind::ScalingDecision as i32,
            resource_id: stored.id.clone(),
            from_state: String::new(),
            to_state: String::new(),
            reason: stored.reason.clone(),
            details: to_struct(json!({
                "action": action.as_str_name(),
                "template_name": stored.template_name,
                "worker_id": stored.worker_id,
                "count": stored.count,
                "reason_code": stored.reason_code,
                "leader_epoch": stored.leader_epoch,
                "instance_ids": stored.instance_ids,
            })),
            method: origin.method.clone(),
            trace_id: origin.request_id.clone(),
        });
        if let Some(event_type) = scaling_event_type(action) {
            let subject = if !stored.worker_id.is_empty() {
                stored.worker_id.clone()
            } else if !stored.template_name.is_empty() {
                stored.template_name.clone()
            } else {
                stored.id.clone()
            };
            let context = stored
                .context
                .as_ref()
                .map(|s| {
                    Value::Object(
                        s.fields
                            .iter()
                            .map(|(k, v)| (k.clone(), from_proto_value(v)))
                            .collect(),
                    )
                })
                .unwrap_or(Value::Null);
            m.emit(self.app.factory.event(
                event_type,
                &subject,
                json!({
                    "decision_id": stored.id,
                    "action": action.as_str_name(),
                    "template_name": stored.template_name,
                    "worker_id": stored.worker_id,
                    "count": stored.count,
                    "reason": stored.reason,
                    "reason_code": stored.reason_code,
                    "instance_ids": stored.instance_ids,
                    "estimated_ready_at": ts_json(stored.estimated_ready_at.as_ref()),
                    "leader_epoch": stored.leader_epoch,
                    "context": context,
                }),
                now,
            ));
        }
        m.announce(
            pb::ChangeType::Added,
            pb::ResourceKind::ScalingDecision,
            stored.id.clone(),
            pb::change_event::Resource::ScalingDecision(stored.clone()),
        );
        match self.app.commit(m).await {
            Ok(_) => Ok(pb::RecordScalingDecisionResponse {
                decision: Some(stored),
            }),
            Err(ApiError::AlreadyExists { .. }) if !req.request_id.is_empty() => {
                match self.stored_decision(&stored.id).await? {
                    Some(existing) => Ok(pb::RecordScalingDecisionResponse {
                        decision: Some(existing),
                    }),
                    None => Err(ApiError::already_exists("scaling decision", stored.id)),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn claim_worker_operation_inner(
        &self,
        request: Request<pb::ClaimWorkerOperationRequest>,
    ) -> Result<pb::ClaimWorkerOperationResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "ClaimWorkerOperation",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::id(&mut v, "operation_id", &req.operation_id);
        v.into_result()?;
        let now = self.app.now();
        let mut op: pb::WorkerOperation = self.app.get(&req.operation_id).await?;
        let status = op.status();
        if status != pb::OperationStatus::Pending {
            return Err(ApiError::illegal_transition(
                "worker operation",
                status.as_str_name(),
                pb::OperationStatus::Running.as_str_name(),
                "only a PENDING operation can be claimed",
            )
            .on_resource("worker operation", &op.id));
        }
        let token = if op.kind() == pb::WorkerOperationKind::RegisterLicense {
            license_token_of(&self.app, &op.id)
                .await?
                .unwrap_or_default()
        } else {
            String::new()
        };
        op.status = pb::OperationStatus::Running as i32;
        let mut m = Mutation::at(now);
        m.update(&mut op, ClaimChange::Keep)?;
        m.audit(
            &op,
            &origin,
            AuditFacts {
                action: "worker_operation.claim".to_owned(),
                from_state: status.as_str_name().to_owned(),
                to_state: pb::OperationStatus::Running.as_str_name().to_owned(),
                reason: String::new(),
                details: to_struct(json!({
                    "worker_id": op.worker_id,
                    "kind": op.kind().as_str_name(),
                })),
            },
        );
        self.app.commit(m).await?;
        Ok(pb::ClaimWorkerOperationResponse {
            operation: Some(op),
            license_token: token,
        })
    }

    async fn complete_worker_operation_inner(
        &self,
        request: Request<pb::CompleteWorkerOperationRequest>,
    ) -> Result<pb::CompleteWorkerOperationResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let origin = self
            .fence(
                req.fence.as_ref(),
                Leader::Controller,
                true,
                "CompleteWorkerOperation",
                rid.as_deref(),
            )
            .await?;
        let mut v = Violations::new();
        validate::id(&mut v, "operation_id", &req.operation_id);
        let status: Option<pb::OperationStatus> =
            validate::enum_value(&mut v, "status", req.status, true);
        if let Some(s) = status
            && !matches!(
                s,
                pb::OperationStatus::Succeeded
                    | pb::OperationStatus::Failed
                    | pb::OperationStatus::Cancelled
            )
        {
            v.add("status", "must be SUCCEEDED, FAILED or CANCELLED");
        }
        validate::free_text(&mut v, "error", &req.error, MAX_OPERATION_ERROR_LEN, true);
        v.into_result()?;
        let Some(status) = status else {
            return Err(ApiError::internal_msg("validated status missing"));
        };
        let now = self.app.now();
        let mut op: pb::WorkerOperation = self.app.get(&req.operation_id).await?;
        let before = op.status();
        if before == status {
            // A retried completion: already recorded.
            return Ok(pb::CompleteWorkerOperationResponse {
                operation: Some(op),
            });
        }
        if !matches!(
            before,
            pb::OperationStatus::Pending | pb::OperationStatus::Running
        ) {
            return Err(ApiError::illegal_transition(
                "worker operation",
                before.as_str_name(),
                status.as_str_name(),
                "the operation is already final",
            )
            .on_resource("worker operation", &op.id));
        }
        op.status = status as i32;
        if status == pb::OperationStatus::Succeeded {
            op.result = req.result.clone();
        } else {
            op.error = req.error.clone();
        }
        op.completed_at = Some(timestamp_to_proto(now));
        let mut m = Mutation::at(now);
        // Final: the licence token (if any) leaves the store.
        m.update(&mut op, ClaimChange::Replace(Vec::new()))?;
        m.audit(
            &op,
            &origin,
            AuditFacts {
                action: "worker_operation.complete".to_owned(),
                from_state: before.as_str_name().to_owned(),
                to_state: status.as_str_name().to_owned(),
                reason: req.error.clone(),
                details: to_struct(json!({
                    "worker_id": op.worker_id,
                    "kind": op.kind().as_str_name(),
                })),
            },
        );
        self.app.commit(m).await?;
        Ok(pb::CompleteWorkerOperationResponse {
            operation: Some(op),
        })
    }

    async fn list_scaling_decision_history_inner(
        &self,
        request: Request<pb::ListScalingDecisionHistoryRequest>,
    ) -> Result<pb::ListScalingDecisionHistoryResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        self.fence(
            req.fence.as_ref(),
            Leader::Controller,
            false,
            "ListScalingDecisionHistory",
            rid.as_deref(),
        )
        .await?;
        let mut v = Violations::new();
        let mut actions = HashSet::new();
        for (i, a) in req.actions.iter().enumerate() {
            if let Some(a) = validate::enum_value::<pb::ScalingAction>(
                &mut v,
                &index_path("actions", i),
                *a,
                true,
            ) {
                actions.insert(a.as_str_name().to_owned());
            }
        }
        if !req.template_name.is_empty() {
            validate::template_name(&mut v, "template_name", &req.template_name);
        }
        check_optional_id(&mut v, "worker_id", &req.worker_id);
        let since = opt_timestamp(&mut v, "since", req.since.as_ref());
        let until = opt_timestamp(&mut v, "until", req.until.as_ref());
        if let (Some(s), Some(u)) = (since, until)
            && u < s
        {
            v.add("until", "must not be before since");
        }
        let fingerprint = paging::filter_fingerprint(&pb::ListScalingDecisionHistoryRequest {
            fence: None,
            page_size: 0,
            page_token: String::new(),
            ..req.clone()
        });
        let page = v.absorb(paging::page_request::<LogPosition>(
            PageKind::ScalingDecisions,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let Some(page) = page else {
            return Err(ApiError::internal_msg("validated page missing"));
        };
        let scan = scan_log(
            &self.app,
            LogKind::ScalingDecision,
            LogQuery {
                since,
                until,
                ..Default::default()
            },
            page.cursor,
            page.page_size,
            |entry| {
                if !actions.is_empty() && !actions.contains(&entry.action) {
                    return Ok(None);
                }
                let d = decision_from_entry(entry)?;
                if !req.template_name.is_empty() && d.template_name != req.template_name {
                    return Ok(None);
                }
                if !req.worker_id.is_empty() && d.worker_id != req.worker_id {
                    return Ok(None);
                }
                Ok(Some(d))
            },
        )
        .await?;
        Ok(pb::ListScalingDecisionHistoryResponse {
            decisions: scan.items,
            next_page_token: scan.next.map_or_else(String::new, |pos| {
                paging::encode_page_token(PageKind::ScalingDecisions, fingerprint, &pos)
            }),
        })
    }
}

/// Copies a domain worker transition back into the stored worker.
fn write_back_worker(
    stored: &mut pb::CmlWorker,
    core: &ccm_core::model::CmlWorker,
    now: DateTime<Utc>,
) {
    stored.state = convert::worker_state_to_proto(core.state) as i32;
    if let Some(t) = core.state_history.last() {
        stored.state_reason = t.reason.clone();
    }
    if let Some(id) = &core.aws_instance_id {
        stored.ec2.get_or_insert_with(Default::default).instance_id = id.clone();
    }
    if core.state != CoreWorkerState::Draining {
        stored.drain = None;
    }
    stored.updated_at = Some(timestamp_to_proto(now));
}

#[tonic::async_trait]
impl InternalService for Internals {
    #[tracing::instrument(name = "InternalService.CommitPlacements", skip_all, fields(placements = request.get_ref().placements.len(), committed = tracing::field::Empty))]
    async fn commit_placements(
        &self,
        request: Request<pb::CommitPlacementsRequest>,
    ) -> Result<Response<pb::CommitPlacementsResponse>, Status> {
        self.commit_placements_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.TransitionInstance", skip_all, fields(instance = %request.get_ref().instance_id, reason = tracing::field::Empty))]
    async fn transition_instance(
        &self,
        request: Request<pb::TransitionInstanceRequest>,
    ) -> Result<Response<pb::TransitionInstanceResponse>, Status> {
        self.transition_instance_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.SetInstanceConditions", skip_all, fields(updates = request.get_ref().updates.len()))]
    async fn set_instance_conditions(
        &self,
        request: Request<pb::SetInstanceConditionsRequest>,
    ) -> Result<Response<pb::SetInstanceConditionsResponse>, Status> {
        self.set_instance_conditions_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.ReportWorker", skip_all, fields(worker = %request.get_ref().worker_id))]
    async fn report_worker(
        &self,
        request: Request<pb::ReportWorkerRequest>,
    ) -> Result<Response<pb::ReportWorkerResponse>, Status> {
        self.report_worker_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.TransitionWorker", skip_all, fields(worker = %request.get_ref().worker_id, reason = tracing::field::Empty))]
    async fn transition_worker(
        &self,
        request: Request<pb::TransitionWorkerRequest>,
    ) -> Result<Response<pb::TransitionWorkerResponse>, Status> {
        self.transition_worker_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.CreateWorkerRecord", skip_all, fields(template = %request.get_ref().template_name, reason = %request.get_ref().reason))]
    async fn create_worker_record(
        &self,
        request: Request<pb::CreateWorkerRecordRequest>,
    ) -> Result<Response<pb::CreateWorkerRecordResponse>, Status> {
        self.create_worker_record_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.RecordScalingDecision", skip_all, fields(reason = tracing::field::Empty))]
    async fn record_scaling_decision(
        &self,
        request: Request<pb::RecordScalingDecisionRequest>,
    ) -> Result<Response<pb::RecordScalingDecisionResponse>, Status> {
        self.record_scaling_decision_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.ClaimWorkerOperation", skip_all, fields(operation = %request.get_ref().operation_id))]
    async fn claim_worker_operation(
        &self,
        request: Request<pb::ClaimWorkerOperationRequest>,
    ) -> Result<Response<pb::ClaimWorkerOperationResponse>, Status> {
        self.claim_worker_operation_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.CompleteWorkerOperation", skip_all, fields(operation = %request.get_ref().operation_id))]
    async fn complete_worker_operation(
        &self,
        request: Request<pb::CompleteWorkerOperationRequest>,
    ) -> Result<Response<pb::CompleteWorkerOperationResponse>, Status> {
        self.complete_worker_operation_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "InternalService.ListScalingDecisionHistory", skip_all)]
    async fn list_scaling_decision_history(
        &self,
        request: Request<pb::ListScalingDecisionHistoryRequest>,
    ) -> Result<Response<pb::ListScalingDecisionHistoryResponse>, Status> {
        self.list_scaling_decision_history_inner(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_audit_entries_read_back_like_reflected_ones() {
        let origin = Origin::service("scheduler")
            .in_call("/ccm.v1.InternalService/CommitPlacements", Some("req-1"));
        let at = Utc::now();
        let details = json!({"worker_id": "w-1", "score": 0.5, "allocated_ports": {"vnc_1": 2001}});
        let entry = audit_log_entry(
            &origin,
            at,
            "instance.schedule",
            pb::ResourceKind::Instance,
            "i-1",
            "INSTANCE_STATE_PENDING",
            "INSTANCE_STATE_SCHEDULED",
            "scheduled",
            details.clone(),
        )
        .expect("entry");
        let back = crate::record::audit_from_entry(&entry).expect("decodes");
        let expected = pb::AuditRecord {
            id: entry.id.to_string(),
            at: Some(timestamp_to_proto(ccm_store::truncate_to_millis(at))),
            actor: "service:scheduler".into(),
            actor_kind: pb::ActorKind::Service as i32,
            action: "instance.schedule".into(),
            resource_kind: pb::ResourceKind::Instance as i32,
            resource_id: "i-1".into(),
            from_state: "INSTANCE_STATE_PENDING".into(),
            to_state: "INSTANCE_STATE_SCHEDULED".into(),
            reason: "scheduled".into(),
            details: to_struct(details),
            method: "/ccm.v1.InternalService/CommitPlacements".into(),
            trace_id: "req-1".into(),
        };
        assert_eq!(back, expected);
        let reflected = crate::record::audit_entry(&expected).expect("reflected");
        assert_eq!(
            crate::record::audit_from_entry(&reflected).expect("decodes"),
            back
        );
        assert_eq!(
            (
                entry.resource_kind.as_str(),
                entry.actor.as_str(),
                entry.action.as_str(),
                entry.at
            ),
            (
                reflected.resource_kind.as_str(),
                reflected.actor.as_str(),
                reflected.action.as_str(),
                reflected.at
            )
        );
    }

    #[test]
    fn live_bookings_read_the_same_as_a_full_decode() {
        let start = Utc::now();
        let stored = pb::LabletInstance {
            id: "i-1".into(),
            definition_id: "d-1".into(),
            definition_version: "1.2.3".into(),
            worker_id: "w-1".into(),
            allocated_ports: HashMap::from([("serial_1".to_owned(), 2001), ("vnc_1".into(), 2002)]),
            time_slot: Some(pb::TimeSlot {
                start: Some(timestamp_to_proto(start)),
                end: Some(timestamp_to_proto(start + Duration::hours(2))),
                asap: true,
            }),
            state: pb::InstanceState::Running as i32,
            ..Default::default()
        };
        let data = crate::repo::document(&stored).expect("document");
        let mut doc = ccm_store::Document {
            kind: data.kind,
            id: data.id,
            index: data.index,
            body: data.body,
            resource_version: 3,
            seq: 1,
            created_at: start,
            updated_at: start,
        };
        let b = LiveBooking::of(&doc).expect("projection");
        assert_eq!(
            (
                b.id.as_str(),
                b.definition_id.as_str(),
                b.definition_version.as_str()
            ),
            ("i-1", "d-1", "1.2.3")
        );
        assert_eq!(b.worker_id, "w-1");
        assert_eq!(b.allocated_ports, stored.allocated_ports);
        let slot = b.slot.expect("slot");
        assert_eq!(
            (slot.start, slot.end - slot.start, slot.asap),
            (start, Duration::hours(2), true)
        );
        // Proto3 JSON also allows int32 as strings: the projection refuses, the full decode reads it.
        doc.body = ccm_store::Body::from_json_text(
            r#"{"id":"i-1","workerId":"w-1","allocatedPorts":{"serial_1":"2001"}}"#,
        )
        .expect("json");
        let b = LiveBooking::of(&doc).expect("fallback");
        assert_eq!(b.allocated_ports["serial_1"], 2001);
        assert!(b.slot.is_none());
    }

    #[test]
    fn decision_ids_are_stable_per_request_id() {
        assert_eq!(decision_id_for("d/1"), decision_id_for("d/1"));
        assert_ne!(decision_id_for("d/1"), decision_id_for("d/2"));
    }

    #[test]
    fn conditions_keep_their_transition_time_when_only_the_message_changes() {
        let t0 = Utc::now();
        let t1 = t0 + Duration::seconds(5);
        let mut cs = Vec::new();
        let c = pb::Condition {
            r#type: "Scheduled".into(),
            status: pb::ConditionStatus::False as i32,
            reason: "Unschedulable".into(),
            message: "0/1 workers fit".into(),
            ..Default::default()
        };
        assert!(set_condition(&mut cs, &c, t0));
        assert!(!set_condition(&mut cs, &c, t1), "unchanged");
        let mut c2 = c.clone();
        c2.message = "0/2 workers fit".into();
        assert!(set_condition(&mut cs, &c2, t1));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_at, Some(timestamp_to_proto(t0)));
        assert_eq!(cs[0].last_probe_at, Some(timestamp_to_proto(t1)));
    }

    #[test]
    fn proto_values_round_trip_through_json() {
        let v = json!({"a": 1, "b": [true, "x", 2.5], "c": {"d": null}});
        let s = to_struct(v.clone()).expect("object");
        let back = Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), from_proto_value(v)))
                .collect(),
        );
        assert_eq!(back, v);
    }
}
