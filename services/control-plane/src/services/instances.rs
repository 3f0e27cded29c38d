//! InstanceService: books lablet instances (reservations) and carries out the user actions on
//! them — start, stop, collect, terminate — plus the reads (get, list, access).
//!
//! # Rules
//!
//! * **Every transition goes through `ccm-core`.** A handler reads the stored instance, converts
//!   it to the domain model ([`convert::instance_from_proto`]), applies the domain method
//!   (`restart`, `stop`, `start_collection`, `request_delete`), and copies the domain-held fields
//!   back ([`copy_domain_fields`]). A refusal of the state machine is `FAILED_PRECONDITION` with
//!   reason `INVALID_STATE_TRANSITION` ([`ApiError::illegal_transition`]).
//! * **One commit per action**: the document (conditional on the version read), one audit record,
//!   the CloudEvent of the new state and the change-feed entry ([`crate::record::Mutation`]). A
//!   non-zero `resource_version` in the request that is not the stored one is `ABORTED` before
//!   anything is decided.
//! * **Owner scoping**: an owner-scoped caller (a user without admin / manager / service) sees and
//!   acts on its own instances only; anyone else's answers `NOT_FOUND` ([`Scope::check`]). Lists
//!   force the owner filter to the caller.
//!
//! # CreateInstance (a reservation)
//!
//! * `definition_id` is a lineage id; `definition_version` pins a version, empty books the
//!   latest ACTIVE one. Unknown lineage or version → `NOT_FOUND`; a DELETED version, or a
//!   DEPRECATED one (unless an admin pins it explicitly, definition.proto), or a lineage without
//!   an ACTIVE version → `FAILED_PRECONDITION`.
//! * The slot is resolved with [`validate::time_slot`] against the definition's `max_duration`
//!   (ASAP: start = now; end defaults to start + max_duration; end > start; length ≤ max) and
//!   its end must lie in the future.
//! * `owner_id` empty = the caller; another owner only for admins and managers
//!   (`PERMISSION_DENIED` otherwise).
//! * `reservation_id`, `assessment_session_id`, `assessment_part_id`: single-line free text of
//!   at most [`MAX_EXTERNAL_REF_LEN`] characters, stored inert.
//! * `request_id` (idempotency key): the instance id is derived from (caller subject, key)
//!   ([`idempotent_instance_id`]), so a retry finds the instance the first call created (or loses
//!   the create race with `ALREADY_EXISTS` from the store) and returns it unchanged, with no
//!   second event.
//! * Stored PENDING with the creation entry in `state_history` (`from` UNSPECIFIED, reason
//!   [`REASON_CREATED`], actor = the caller's origin), `definition_name` denormalised,
//!   `created_at` / `updated_at` from the app clock, `created_by` = the caller's actor
//!   (`user:<sub>` or `service:<sub>`, as in the audit record). Emits
//!   `ccm.lablet.instance.pending`; audit action `instance.create`.
//!
//! # User actions
//!
//! | RPC | from | to | state-history reason |
//! |---|---|---|---|
//! | StartInstance | STOPPED (slot not ended, no delete requested) | RUNNING | `restarted` |
//! | StopInstance | RUNNING, COLLECTING (the RPC's contract; GRADING waits for its grade) | STOPPING | `manual` |
//! | CollectInstance | RUNNING | COLLECTING | `manual` |
//! | TerminateInstance | see below | | |
//!
//! StartInstance records RUNNING at once (the domain's `restart`); the controller sees a
//! RUNNING instance whose CML lab is stopped and starts it. The request's free-text `reason`
//! goes to the audit record; the state history keeps the machine-friendly reason.
//!
//! TerminateInstance follows `ccm_core::instance::terminate_plan` (domain.md §11.2):
//! PENDING / SCHEDULED / INSTANTIATING / ARCHIVED → TERMINATED at once; RUNNING / COLLECTING /
//! GRADING → STOPPING (reason `delete_requested`, so the controller carries the teardown on);
//! STOPPED → ARCHIVED (`delete_requested`); STOPPING → refused (`FAILED_PRECONDITION`: terminate
//! again once STOPPED) unless the stop was itself a delete request (then it is a no-op);
//! TERMINATED → no-op (idempotent). `force` (admins only, `PERMISSION_DENIED` otherwise)
//! terminates from any non-terminal state at once. Entering TERMINATED releases the instance's
//! claims (its ports, `port` / `<worker_id>/<port>`) with `ClaimChange::Replace(vec![])` in the
//! same commit, and sets `termination_reason` (the request's reason, else the history reason).
//!
//! # CloudEvents
//!
//! Every event is built by [`instance_event`]: the type is the catalog's for the new state
//! (`ccm_cloudevents::catalog::event_type_for_instance_state`), the subject the instance id, and
//! the JSON data the fields of domain.md §8 on top of a common base (see [`instance_event`]).

use std::collections::{BTreeMap, HashMap};

use ccm_core::instance::{REASON_MANUAL, TerminatePlan};
use ccm_core::model::{Actor, InstanceState};
use ccm_proto::v1 as pb;
use ccm_proto::v1::instance_service_server::{InstanceService, InstanceServiceServer};
use ccm_store::{ClaimChange, Document, Filter, IndexField, Kind, Order, Query};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::convert;
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, Mutation, Origin};
use crate::repo::{self, Entity};
use crate::server;
use crate::services::{Scope, caller_of};
use crate::validate::{self, Violations};

/// Longest external reference (`reservation_id`, `assessment_session_id`,
/// `assessment_part_id`), in characters.
pub const MAX_EXTERNAL_REF_LEN: usize = 256;
/// Longest `owner_id` (a JWT `sub`), in characters.
pub const MAX_OWNER_ID_LEN: usize = 256;
/// State-history reason of the creation entry.
pub const REASON_CREATED: &str = "created";
/// Namespace mixed into the id derived from an idempotency key, so the same key used for
/// another kind of resource never yields the same id.
pub const IDEMPOTENCY_NAMESPACE: &str = "ccm.v1.InstanceService/CreateInstance";
/// Claim namespace of a worker port held by an instance: key `<worker_id>/<port>`.
pub const PORT_CLAIM_NAMESPACE: &str = "port";
/// Most store pages one list call reads while it filters in memory (filters the store cannot
/// index); a page that is still short after that many is returned short with a token.
pub const MAX_STORE_PAGES_PER_LIST: usize = 20;

const SERVICE_PATH: &str = "/ccm.v1.InstanceService/";
const TYPE_NAME: &str = <pb::LabletInstance as Entity>::TYPE_NAME;

/// The InstanceService implementation.
#[derive(Debug, Clone)]
pub struct Instances {
    app: App,
}

/// The tonic server for [`Instances`].
pub fn server(app: App) -> InstanceServiceServer<Instances> {
    InstanceServiceServer::new(Instances { app })
}

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by the WorkerService)
// ---------------------------------------------------------------------------------------------

/// The port claim an instance holds for `port` on `worker_id` (the convention of the whole
/// control plane: CommitPlacements acquires these, termination releases them).
pub fn port_claim(worker_id: &str, port: impl std::fmt::Display) -> ccm_store::Claim {
    ccm_store::Claim::new(PORT_CLAIM_NAMESPACE, format!("{worker_id}/{port}"))
}

/// The instance id a CreateInstance with idempotency key `key` by `subject` gets: a UUID
/// (version 8, custom) from SHA-256 over [`IDEMPOTENCY_NAMESPACE`], the subject and the key.
pub fn idempotent_instance_id(subject: &str, key: &str) -> String {
    derived_uuid(IDEMPOTENCY_NAMESPACE, subject, key)
}

/// A UUID (version 8) derived from a namespace and two strings.
pub(crate) fn derived_uuid(namespace: &str, a: &str, b: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [namespace, a, b] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The lower-case name of an instance state as CloudEvent payloads carry it (`pending`).
pub fn state_word(state: InstanceState) -> String {
    state.as_str().to_ascii_lowercase()
}

/// An instant as CloudEvent payloads carry it (RFC 3339, milliseconds, `Z`).
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn ts_text(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn opt_text(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_owned())
    }
}

/// The CloudEvent for `instance` having entered its current state from `previous` (`None` for
/// the creation), because of `reason`, by `actor`, at `at`.
///
/// The type is the catalog's for the new state; the subject is the instance id. The data always
/// has `instance_id`, `definition_id`, `definition_version`, `definition_name`, `owner_id`,
/// `reservation_id`, `worker_id`, `allocated_ports`, `previous_state` / `new_state` (lower-case,
/// `previous_state` null for the creation), `reason`, `actor` and `timestamp` (RFC 3339), plus
/// per state (domain.md §8):
///
/// * PENDING: `timeslot_start`, `timeslot_end`, `asap`, `created_at`;
/// * RUNNING: `cml_lab_id`, `started_at` (and `worker_hostname` when the caller puts it in
///   `extra`);
/// * COLLECTING: `triggered_by` (the actor), `collection_reason` (the reason);
/// * TERMINATED: `final_state` (the state it was terminated from), `termination_reason`,
///   `grading_score` (or null), `duration_minutes` (from `started_at`, 0 if it never ran).
///
/// `extra` is merged last (it may add or override fields).
pub fn instance_event(
    factory: &ccm_cloudevents::EventFactory,
    instance: &pb::LabletInstance,
    previous: Option<InstanceState>,
    reason: &str,
    actor: &str,
    at: DateTime<Utc>,
    extra: Map<String, Value>,
) -> ccm_cloudevents::CloudEvent {
    let state = convert::instance_state_from_proto(instance.state, "state")
        .unwrap_or(InstanceState::Pending);
    let ports: Map<String, Value> = instance
        .allocated_ports
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    let mut data = Map::new();
    data.insert("instance_id".into(), json!(instance.id));
    data.insert("definition_id".into(), json!(instance.definition_id));
    data.insert(
        "definition_version".into(),
        json!(instance.definition_version),
    );
    data.insert("definition_name".into(), json!(instance.definition_name));
    data.insert("owner_id".into(), json!(instance.owner_id));
    data.insert("reservation_id".into(), opt_text(&instance.reservation_id));
    data.insert("worker_id".into(), opt_text(&instance.worker_id));
    data.insert("allocated_ports".into(), Value::Object(ports));
    data.insert(
        "previous_state".into(),
        previous.map_or(Value::Null, |s| Value::String(state_word(s))),
    );
    data.insert("new_state".into(), json!(state_word(state)));
    data.insert("reason".into(), json!(reason));
    data.insert("actor".into(), json!(actor));
    data.insert("timestamp".into(), json!(rfc3339(at)));
    let slot = instance.time_slot.unwrap_or_default();
    match state {
        InstanceState::Pending => {
            data.insert("timeslot_start".into(), ts_text(slot.start.as_ref()));
            data.insert("timeslot_end".into(), ts_text(slot.end.as_ref()));
            data.insert("asap".into(), json!(slot.asap));
            data.insert("created_at".into(), ts_text(instance.created_at.as_ref()));
        }
        InstanceState::Running => {
            data.insert("cml_lab_id".into(), opt_text(&instance.cml_lab_id));
            data.insert("started_at".into(), ts_text(instance.started_at.as_ref()));
        }
        InstanceState::Collecting => {
            data.insert("triggered_by".into(), json!(actor));
            data.insert("collection_reason".into(), json!(reason));
        }
        InstanceState::Terminated => {
            data.insert(
                "final_state".into(),
                previous.map_or(Value::Null, |s| Value::String(state_word(s))),
            );
            data.insert(
                "termination_reason".into(),
                json!(instance.termination_reason),
            );
            let score = instance.grading_score.as_ref().map_or(Value::Null, |g| {
                json!({
                    "total": g.total,
                    "max": g.max,
                    "passed": g.passed,
                    "breakdown": g.breakdown.iter().map(|c| json!({
                        "criterion": c.criterion, "points": c.points, "max": c.max,
                    })).collect::<Vec<_>>(),
                })
            });
            data.insert("grading_score".into(), score);
            let minutes = instance
                .started_at
                .as_ref()
                .and_then(|t| DateTime::from_timestamp(t.seconds, 0))
                .map_or(0, |started| (at - started).num_minutes().max(0));
            data.insert("duration_minutes".into(), json!(minutes));
        }
        _ => {}
    }
    data.extend(extra);
    factory.instance_state(&instance.id, state, Value::Object(data), at)
}

/// The domain model of a stored instance; a stored document the domain refuses is a bug
/// (`INTERNAL`).
pub fn to_core(instance: &pb::LabletInstance) -> Result<ccm_core::model::LabletInstance, ApiError> {
    convert::instance_from_proto(instance, "").map_err(|e| {
        ApiError::internal_msg(format!("stored instance {} is invalid: {e}", instance.id))
    })
}

/// Copies the fields the domain model holds (state, history, placement, ports, lab id, slot,
/// score, retries, timestamps) from `core` onto the stored proto, keeping the proto-only ones
/// (definition name, assessment ids, conditions, pending summary, termination reason,
/// created_by, resource_version).
pub fn copy_domain_fields(target: &mut pb::LabletInstance, core: &ccm_core::model::LabletInstance) {
    let fresh = convert::instance_to_proto(core);
    target.state = fresh.state;
    target.state_history = fresh.state_history;
    target.worker_id = fresh.worker_id;
    target.allocated_ports = fresh.allocated_ports;
    target.cml_lab_id = fresh.cml_lab_id;
    target.time_slot = fresh.time_slot;
    target.grading_score = fresh.grading_score;
    target.retry_count = fresh.retry_count;
    target.created_at = fresh.created_at;
    target.scheduled_at = fresh.scheduled_at;
    target.started_at = fresh.started_at;
    target.terminated_at = fresh.terminated_at;
}

/// Whether `caller` holds `role`.
pub(crate) fn has_role(scope: &Scope, role: pb::Role) -> bool {
    scope.caller.roles.contains(&role)
}

/// Checks a request's expected `resource_version` (0 = unconditional) against the stored one.
pub(crate) fn check_version(
    resource_type: &str,
    id: &str,
    expected: i64,
    current: i64,
) -> Result<(), ApiError> {
    if expected < 0 {
        return Err(ApiError::invalid_argument(
            "resource_version",
            format!("must not be negative, got {expected}"),
        ));
    }
    if expected != 0 && expected != current {
        return Err(ApiError::stale_version(
            resource_type,
            id,
            expected,
            current,
        ));
    }
    Ok(())
}

/// Reads every document a query matches, page by page.
pub(crate) async fn load_all(app: &App, query: Query) -> Result<Vec<Document>, ApiError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = app
            .store
            .list(
                query
                    .clone()
                    .with_page_size(ccm_store::MAX_PAGE_SIZE)
                    .after(token.take()),
            )
            .await?;
        out.extend(page.items);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// One page of a query with an extra in-memory filter: reads store pages (each exactly the size
/// still missing, so the store's token always points after the last document looked at) until
/// `page_size` documents passed `keep`, the listing ends, or [`MAX_STORE_PAGES_PER_LIST`] pages
/// were read. Returns the documents and the store token to resume after them.
pub(crate) async fn collect_page(
    app: &App,
    query: &Query,
    page_size: usize,
    start: Option<String>,
    keep: impl Fn(&Document) -> bool,
) -> Result<(Vec<Document>, Option<String>), ApiError> {
    let mut out = Vec::new();
    let mut token = start;
    for _ in 0..MAX_STORE_PAGES_PER_LIST {
        let want = u32::try_from(page_size.saturating_sub(out.len()).max(1)).unwrap_or(u32::MAX);
        let page = app
            .store
            .list(query.clone().with_page_size(want).after(token.take()))
            .await?;
        out.extend(page.items.into_iter().filter(|d| keep(d)));
        token = page.next_page_token;
        if out.len() >= page_size || token.is_none() {
            break;
        }
    }
    Ok((out, token))
}

/// The proto enum value names of the instance states that hold a worker's resources
/// (`InstanceState::holds_resources`).
pub(crate) fn holding_state_names() -> Vec<String> {
    InstanceState::ALL
        .into_iter()
        .filter(|s| s.holds_resources())
        .map(|s| convert::instance_state_name(s).to_owned())
        .collect()
}

/// Force-terminates `instance` (which must be read from the store) as part of a worker action:
/// the domain's `force_terminate` with `reason`, claims released, `termination_reason` set,
/// audited and its `terminated` event queued on `m`.
pub(crate) fn force_terminate_into(
    app: &App,
    m: &mut Mutation,
    instance: &mut pb::LabletInstance,
    reason: &str,
    origin: &Origin,
    at: DateTime<Utc>,
) -> Result<(), ApiError> {
    let mut core = to_core(instance)?;
    let from = core.state;
    core.force_terminate(reason, true, at, &Actor(origin.actor.clone()))?;
    copy_domain_fields(instance, &core);
    instance.termination_reason = reason.to_owned();
    instance.updated_at = Some(convert::timestamp_to_proto(at));
    m.update(instance, ClaimChange::Replace(Vec::new()))?;
    m.audit(
        instance,
        origin,
        AuditFacts {
            action: "instance.terminate".into(),
            from_state: convert::instance_state_name(from).into(),
            to_state: convert::instance_state_name(core.state).into(),
            reason: reason.to_owned(),
            details: None,
        },
    );
    m.emit(instance_event(
        &app.factory,
        instance,
        Some(from),
        reason,
        &origin.actor,
        at,
        Map::new(),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// The instance if the caller may see it, else `NOT_FOUND`.
fn scoped(scope: &Scope, instance: pb::LabletInstance) -> Result<pb::LabletInstance, ApiError> {
    let owner = instance.owner_id.clone();
    let id = instance.id.clone();
    scope.check(&owner, TYPE_NAME, &id, instance)
}

fn free_ref(v: &mut Violations, field: &str, value: &str) {
    validate::free_text(v, field, value, MAX_EXTERNAL_REF_LEN, false);
}

/// The user action an instance RPC asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Collect,
    Terminate { force: bool },
}

impl Action {
    fn rpc(self) -> &'static str {
        match self {
            Action::Start => "StartInstance",
            Action::Stop => "StopInstance",
            Action::Collect => "CollectInstance",
            Action::Terminate { .. } => "TerminateInstance",
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            Action::Start => "instance.start",
            Action::Stop => "instance.stop",
            Action::Collect => "instance.collect",
            Action::Terminate { .. } => "instance.terminate",
        }
    }
}

/// An action request, its fields in one shape.
struct ActionRequest {
    instance_id: String,
    resource_version: i64,
    reason: String,
    action: Action,
}

impl Instances {
    async fn read_scoped(&self, scope: &Scope, id: &str) -> Result<pb::LabletInstance, ApiError> {
        let instance: pb::LabletInstance = self.app.get(id).await?;
        scoped(scope, instance)
    }

    /// The definition version a booking resolves to (see the module docs).
    async fn resolve_definition(
        &self,
        scope: &Scope,
        lineage: &str,
        version: Option<&ccm_core::version::Version>,
    ) -> Result<pb::LabletDefinition, ApiError> {
        let definition = match version {
            Some(version) => {
                let doc_id = repo::definition_doc_id(lineage, &version.to_string());
                let Some(doc) = self.app.store.get(Kind::Definition, &doc_id).await? else {
                    return Err(ApiError::not_found("definition", doc_id));
                };
                let definition = repo::decode_definition(&doc)?;
                match pb::DefinitionStatus::try_from(definition.status) {
                    Ok(pb::DefinitionStatus::Active) => {}
                    Ok(pb::DefinitionStatus::Deprecated) if has_role(scope, pb::Role::Admin) => {}
                    Ok(pb::DefinitionStatus::Deprecated) => {
                        return Err(definition_refused(
                            &doc_id,
                            "is DEPRECATED: new bookings are refused (an admin may pin it \
                             explicitly)",
                        ));
                    }
                    Ok(pb::DefinitionStatus::Deleted) => {
                        return Err(definition_refused(
                            &doc_id,
                            "is DELETED: new bookings are refused",
                        ));
                    }
                    _ => {
                        return Err(definition_refused(&doc_id, "has no valid status"));
                    }
                }
                definition
            }
            None => {
                let page = self
                    .app
                    .store
                    .list(
                        Query::new(Kind::Definition)
                            .with_filter(Filter::eq(IndexField::DefinitionId, lineage))
                            .with_filter(Filter::eq(
                                IndexField::State,
                                pb::DefinitionStatus::Active.as_str_name(),
                            ))
                            .ordered_by(Order::VersionDesc)
                            .with_page_size(1),
                    )
                    .await?;
                match page.items.first() {
                    Some(doc) => repo::decode_definition(doc)?,
                    None => {
                        let versions = self
                            .app
                            .store
                            .count(
                                Kind::Definition,
                                &[Filter::eq(IndexField::DefinitionId, lineage)],
                            )
                            .await?;
                        if versions == 0 {
                            return Err(ApiError::not_found("definition", lineage));
                        }
                        return Err(definition_refused(
                            lineage,
                            "has no ACTIVE version (all are DEPRECATED or DELETED); pin a \
                             version explicitly or register a new one",
                        ));
                    }
                }
            }
        };
        Ok(definition)
    }

    #[tracing::instrument(
        name = "InstanceService.CreateInstance",
        skip_all,
        fields(instance_id, definition_id, reason)
    )]
    async fn create(
        &self,
        request: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::CreateInstanceResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let origin = scope.origin(
            &format!("{SERVICE_PATH}CreateInstance"),
            server::request_id(&request),
        );
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("definition_id", req.definition_id.as_str());
        let now = self.app.now();

        // 1. Everything that does not need the definition.
        let mut v = Violations::new();
        let lineage = validate::id(&mut v, "definition_id", &req.definition_id);
        let version =
            validate::optional_semver(&mut v, "definition_version", &req.definition_version);
        if !req.owner_id.is_empty() {
            validate::free_text(&mut v, "owner_id", &req.owner_id, MAX_OWNER_ID_LEN, false);
            v.check(
                !req.owner_id.trim().is_empty(),
                "owner_id",
                "must not be only whitespace",
            );
        }
        free_ref(&mut v, "reservation_id", &req.reservation_id);
        free_ref(&mut v, "assessment_session_id", &req.assessment_session_id);
        free_ref(&mut v, "assessment_part_id", &req.assessment_part_id);
        let key = validate::idempotency_key(&mut v, "request_id", &req.request_id);
        if !v.is_empty() {
            // Report the slot's own problems too (against the longest bookable span, since the
            // definition's maximum is not known).
            validate::time_slot(
                &mut v,
                "time_slot",
                req.time_slot.as_ref(),
                now,
                validate::MAX_BOOKING_HORIZON,
            );
            span.record("reason", "invalid_argument");
            v.into_result()?;
        }
        let (Some(lineage), Some(version), Some(key)) = (lineage, version, key) else {
            return Err(ApiError::internal_msg("validation produced no value"));
        };

        // 2. Who may book for whom.
        let subject = scope.caller.subject.clone();
        let owner = if req.owner_id.is_empty() {
            subject.clone()
        } else {
            req.owner_id.clone()
        };
        if owner != subject
            && !(has_role(&scope, pb::Role::Admin) || has_role(&scope, pb::Role::Manager))
        {
            span.record("reason", "permission_denied");
            return Err(ApiError::permission_denied(
                "only admins and managers may book an instance for another owner",
            ));
        }

        // 3. Idempotency: a retry returns what the first call created.
        let id = match key {
            Some(key) => idempotent_instance_id(&subject, key),
            None => uuid::Uuid::new_v4().to_string(),
        };
        span.record("instance_id", id.as_str());
        if key.is_some()
            && let Some(existing) = self.app.find::<pb::LabletInstance>(&id).await?
        {
            span.record("reason", "idempotent_retry");
            let existing = scoped(&scope, existing)?;
            return Ok(Response::new(pb::CreateInstanceResponse {
                instance: Some(existing),
            }));
        }

        // 4. The definition and the slot.
        let definition = self
            .resolve_definition(&scope, lineage, version.as_ref())
            .await
            .inspect_err(|_| {
                span.record("reason", "definition_refused");
            })?;
        let max_duration = definition
            .max_duration
            .as_ref()
            .map(|d| convert::duration_from_proto(d, "max_duration"))
            .transpose()
            .ok()
            .flatten()
            .filter(|d| *d > chrono::Duration::zero())
            .ok_or_else(|| {
                ApiError::internal_msg(format!(
                    "definition {}@{} has no valid max_duration",
                    definition.id, definition.version
                ))
            })?;
        let mut v = Violations::new();
        let slot = validate::time_slot(
            &mut v,
            "time_slot",
            req.time_slot.as_ref(),
            now,
            max_duration,
        );
        if let Some(slot) = &slot
            && slot.end <= now
        {
            v.add(
                "time_slot.end",
                format!(
                    "is in the past ({}); the slot must end in the future",
                    slot.end
                ),
            );
        }
        if !v.is_empty() {
            span.record("reason", "invalid_time_slot");
        }
        let slot = v.finish_some(slot)?;

        // 5. The booking.
        let mut instance = pb::LabletInstance {
            id: id.clone(),
            definition_id: definition.id.clone(),
            definition_version: definition.version.clone(),
            definition_name: definition.name.clone(),
            state: pb::InstanceState::Pending as i32,
            state_history: vec![pb::StateTransition {
                from: pb::InstanceState::Unspecified as i32,
                to: pb::InstanceState::Pending as i32,
                at: Some(convert::timestamp_to_proto(now)),
                reason: REASON_CREATED.into(),
                actor: origin.actor.clone(),
            }],
            time_slot: Some(convert::time_slot_to_proto(&slot)),
            owner_id: owner.clone(),
            reservation_id: req.reservation_id.clone(),
            assessment_session_id: req.assessment_session_id.clone(),
            assessment_part_id: req.assessment_part_id.clone(),
            created_at: Some(convert::timestamp_to_proto(now)),
            updated_at: Some(convert::timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            ..Default::default()
        };
        let mut m = Mutation::at(now);
        m.create(&mut instance, Vec::new())?;
        m.audit(
            &instance,
            &origin,
            AuditFacts {
                action: "instance.create".into(),
                from_state: String::new(),
                to_state: pb::InstanceState::Pending.as_str_name().into(),
                reason: REASON_CREATED.into(),
                details: Some(struct_of(json!({
                    "definition_id": definition.id,
                    "definition_version": definition.version,
                    "owner_id": owner,
                    "timeslot_start": rfc3339(slot.start),
                    "timeslot_end": rfc3339(slot.end),
                    "asap": slot.asap,
                }))),
            },
        );
        m.emit(instance_event(
            &self.app.factory,
            &instance,
            None,
            REASON_CREATED,
            &origin.actor,
            now,
            Map::new(),
        ));
        match self.app.commit(m).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { .. }) if key.is_some() => {
                // Lost the race against a concurrent retry with the same key.
                span.record("reason", "idempotent_retry");
                let existing: pb::LabletInstance = self.app.get(&id).await?;
                let existing = scoped(&scope, existing)?;
                return Ok(Response::new(pb::CreateInstanceResponse {
                    instance: Some(existing),
                }));
            }
            Err(e) => return Err(e),
        }
        span.record("reason", REASON_CREATED);
        tracing::info!(owner = %owner, "instance booked");
        Ok(Response::new(pb::CreateInstanceResponse {
            instance: Some(instance),
        }))
    }

    #[tracing::instrument(name = "InstanceService.GetInstance", skip_all, fields(instance_id))]
    async fn get(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::GetInstanceResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("instance_id", req.instance_id.as_str());
        let mut v = Violations::new();
        validate::id(&mut v, "instance_id", &req.instance_id);
        v.into_result()?;
        let instance = self.read_scoped(&scope, &req.instance_id).await?;
        Ok(Response::new(pb::GetInstanceResponse {
            instance: Some(instance),
        }))
    }

    #[tracing::instrument(name = "InstanceService.ListInstances", skip_all, fields(returned))]
    async fn list(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let mut req = request.into_inner();
        if scope.own_only {
            req.owner_id = scope.caller.subject.clone();
        }
        let mut v = Violations::new();
        let mut states = Vec::new();
        for (i, raw) in req.states.iter().enumerate() {
            if let Some(s) = validate::enum_value::<pb::InstanceState>(
                &mut v,
                &validate::index_path("states", i),
                *raw,
                true,
            ) {
                states.push(s.as_str_name().to_owned());
            }
        }
        if !req.worker_id.is_empty() {
            validate::id(&mut v, "worker_id", &req.worker_id);
        }
        if !req.owner_id.is_empty() {
            validate::free_text(&mut v, "owner_id", &req.owner_id, MAX_OWNER_ID_LEN, false);
        }
        if !req.definition_id.is_empty() {
            validate::id(&mut v, "definition_id", &req.definition_id);
        }
        free_ref(&mut v, "reservation_id", &req.reservation_id);
        let end_after = req
            .slot_end_after
            .as_ref()
            .and_then(|t| v.absorb(convert::timestamp_from_proto(t, "slot_end_after")));
        let start_before = req
            .slot_start_before
            .as_ref()
            .and_then(|t| v.absorb(convert::timestamp_from_proto(t, "slot_start_before")));
        let mut fingerprint_of = req.clone();
        fingerprint_of.page_size = 0;
        fingerprint_of.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&fingerprint_of);
        let page = v.absorb(paging::page_request::<String>(
            PageKind::Instances,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let Some(page) = page else {
            return Err(ApiError::internal_msg("validation produced no page"));
        };

        let mut query = Query::new(Kind::Instance).ordered_by(Order::SortKeyAsc);
        let mut filters = Vec::new();
        if !states.is_empty() {
            filters.push(Filter::any_of(IndexField::State, states));
        }
        if !req.worker_id.is_empty() {
            filters.push(Filter::eq(IndexField::WorkerId, req.worker_id.clone()));
        }
        if !req.owner_id.is_empty() {
            filters.push(Filter::eq(IndexField::OwnerId, req.owner_id.clone()));
        }
        if !req.definition_id.is_empty() {
            filters.push(Filter::eq(
                IndexField::DefinitionId,
                req.definition_id.clone(),
            ));
        }
        if let Some(t) = start_before {
            filters.push(Filter::SortKeyBefore(t.timestamp_millis()));
        }
        for f in &filters {
            query = query.with_filter(f.clone());
        }
        let in_memory = !req.reservation_id.is_empty() || end_after.is_some();
        let reservation = req.reservation_id.clone();
        let (docs, token) = collect_page(&self.app, &query, page.page_size, page.cursor, |doc| {
            if !in_memory {
                return true;
            }
            match repo::decode::<pb::LabletInstance>(doc) {
                Ok(i) => {
                    (reservation.is_empty() || i.reservation_id == reservation)
                        && end_after.is_none_or(|after| {
                            i.time_slot
                                .as_ref()
                                .and_then(|s| s.end.as_ref())
                                .and_then(|e| convert::timestamp_from_proto(e, "").ok())
                                .is_some_and(|end| end > after)
                        })
                }
                Err(_) => true,
            }
        })
        .await?;
        let mut instances = Vec::with_capacity(docs.len());
        for doc in &docs {
            instances.push(repo::decode::<pb::LabletInstance>(doc)?);
        }
        let total_size = if in_memory {
            0
        } else {
            i32::try_from(self.app.store.count(Kind::Instance, &filters).await?).unwrap_or(i32::MAX)
        };
        tracing::Span::current().record("returned", instances.len());
        Ok(Response::new(pb::ListInstancesResponse {
            instances,
            next_page_token: token
                .map(|t| paging::encode_page_token(PageKind::Instances, fingerprint, &t))
                .unwrap_or_default(),
            total_size,
        }))
    }

    /// The common path of Start/Stop/Collect/Terminate: the caller and request id of `request`,
    /// then [`Instances::act`] on the action `parts` builds from its message.
    async fn act_on<R>(
        &self,
        request: Request<R>,
        parts: impl FnOnce(R) -> ActionRequest,
    ) -> Result<pb::LabletInstance, Status> {
        let scope = caller_of(&request).map_err(Status::from)?;
        let request_id = server::request_id(&request).map(str::to_owned);
        self.act(scope, request_id, parts(request.into_inner()))
            .await
            .map_err(Status::from)
    }

    /// Start, stop, collect and terminate: read, check, apply the domain method, commit.
    #[tracing::instrument(name = "InstanceService.action", skip_all, fields(rpc = action.action.rpc(), instance_id = action.instance_id.as_str(), from, to, reason))]
    async fn act(
        &self,
        scope: Scope,
        request_id: Option<String>,
        action: ActionRequest,
    ) -> Result<pb::LabletInstance, ApiError> {
        let span = tracing::Span::current();
        let origin = scope.origin(
            &format!("{SERVICE_PATH}{}", action.action.rpc()),
            request_id.as_deref(),
        );
        let mut v = Violations::new();
        validate::id(&mut v, "instance_id", &action.instance_id);
        validate::reason(&mut v, "reason", &action.reason);
        if action.resource_version < 0 {
            v.add(
                "resource_version",
                format!("must not be negative, got {}", action.resource_version),
            );
        }
        v.into_result()?;
        if let Action::Terminate { force: true } = action.action
            && !has_role(&scope, pb::Role::Admin)
        {
            span.record("reason", "permission_denied");
            return Err(ApiError::permission_denied(
                "force-terminate is for admins; terminate without force to run the normal \
                 teardown",
            ));
        }
        let mut instance = self.read_scoped(&scope, &action.instance_id).await?;
        check_version(
            TYPE_NAME,
            &instance.id,
            action.resource_version,
            instance.resource_version,
        )?;
        let now = self.app.now();
        let actor = Actor(origin.actor.clone());
        let mut core = to_core(&instance)?;
        let from = core.state;
        span.record("from", from.as_str());
        let history_before = core.state_history.len();

        let applied = match action.action {
            Action::Start => core.restart(now, &actor).map(|()| None),
            Action::Stop => {
                if matches!(from, InstanceState::Running | InstanceState::Collecting) {
                    core.stop(REASON_MANUAL, now, &actor).map(|()| None)
                } else {
                    Err(ccm_core::CoreError::InvalidInstanceTransition {
                        from,
                        to: InstanceState::Stopping,
                        why: "stop requires RUNNING or COLLECTING (a GRADING instance stops \
                              when its grade arrives)"
                            .into(),
                    })
                }
            }
            Action::Collect => core
                .start_collection(REASON_MANUAL, now, &actor)
                .map(|()| None),
            Action::Terminate { force } => core.request_delete(force, now, &actor).map(Some),
        };
        let plan = match applied {
            Ok(plan) => plan,
            Err(e) => {
                span.record("reason", "illegal_transition");
                return Err(ApiError::from(e).on_resource(TYPE_NAME, &instance.id));
            }
        };
        match plan {
            Some(TerminatePlan::AlreadyTerminated) => {
                span.record("reason", "already_terminated");
                return Ok(instance);
            }
            Some(TerminatePlan::AwaitStopped) => {
                if core.deletion_requested() {
                    span.record("reason", "teardown_in_progress");
                    return Ok(instance);
                }
                span.record("reason", "illegal_transition");
                return Err(ApiError::illegal_transition(
                    "instance",
                    convert::instance_state_name(from),
                    convert::instance_state_name(InstanceState::Terminated),
                    "the instance is STOPPING; terminate it again once it is STOPPED, or \
                     force-terminate as an admin",
                )
                .on_resource(TYPE_NAME, &instance.id));
            }
            _ => {}
        }
        if core.state_history.len() == history_before {
            return Ok(instance);
        }
        let to = core.state;
        span.record("to", to.as_str());
        let history_reason = core
            .state_history
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default();
        copy_domain_fields(&mut instance, &core);
        instance.updated_at = Some(convert::timestamp_to_proto(now));
        let claims = if to == InstanceState::Terminated {
            instance.termination_reason = if action.reason.trim().is_empty() {
                history_reason.clone()
            } else {
                action.reason.clone()
            };
            ClaimChange::Replace(Vec::new())
        } else {
            ClaimChange::Keep
        };
        let mut extra = Map::new();
        if to == InstanceState::Running
            && !instance.worker_id.is_empty()
            && let Some(worker) = self.app.find::<pb::CmlWorker>(&instance.worker_id).await?
        {
            extra.insert(
                "worker_hostname".into(),
                super::workers::worker_host(&worker).map_or(Value::Null, Value::String),
            );
        }
        let mut m = Mutation::at(now);
        m.update(&mut instance, claims)?;
        m.audit(
            &instance,
            &origin,
            AuditFacts {
                action: action.action.audit_action().into(),
                from_state: convert::instance_state_name(from).into(),
                to_state: convert::instance_state_name(to).into(),
                reason: if action.reason.trim().is_empty() {
                    history_reason.clone()
                } else {
                    action.reason.clone()
                },
                details: Some(struct_of(json!({
                    "history_reason": history_reason,
                    "force": matches!(action.action, Action::Terminate { force: true }),
                }))),
            },
        );
        m.emit(instance_event(
            &self.app.factory,
            &instance,
            Some(from),
            &history_reason,
            &origin.actor,
            now,
            extra,
        ));
        self.app.commit(m).await?;
        span.record("reason", history_reason.as_str());
        tracing::info!(
            from = from.as_str(),
            to = to.as_str(),
            "instance transition"
        );
        Ok(instance)
    }

    #[tracing::instrument(
        name = "InstanceService.GetInstanceAccess",
        skip_all,
        fields(instance_id, reason)
    )]
    async fn access(
        &self,
        request: Request<pb::GetInstanceAccessRequest>,
    ) -> Result<Response<pb::GetInstanceAccessResponse>, ApiError> {
        let scope = caller_of(&request)?;
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("instance_id", req.instance_id.as_str());
        let mut v = Violations::new();
        validate::id(&mut v, "instance_id", &req.instance_id);
        v.into_result()?;
        let instance = self.read_scoped(&scope, &req.instance_id).await?;
        let not_accessible = |why: String| {
            span.record("reason", "not_accessible");
            ApiError::failed_precondition("ACCESS", "instance", why)
                .on_resource(TYPE_NAME, &instance.id)
        };
        if instance.state != pb::InstanceState::Running as i32 {
            return Err(not_accessible(format!(
                "access is only available while the instance is RUNNING; it is {}",
                instance.state().as_str_name()
            )));
        }
        if instance.worker_id.is_empty() || instance.allocated_ports.is_empty() {
            return Err(not_accessible(
                "the instance holds no ports on a worker".to_owned(),
            ));
        }
        let worker = self
            .app
            .find::<pb::CmlWorker>(&instance.worker_id)
            .await?
            .ok_or_else(|| {
                not_accessible(format!(
                    "its worker {} no longer exists",
                    instance.worker_id
                ))
            })?;
        let host = super::workers::worker_host(&worker).ok_or_else(|| {
            not_accessible(format!(
                "worker {} has no known address (no public IP, endpoint or private IP) yet",
                worker.id
            ))
        })?;
        let protocols: HashMap<String, i32> = match self
            .app
            .find::<pb::LabletDefinition>(&repo::definition_doc_id(
                &instance.definition_id,
                &instance.definition_version,
            ))
            .await?
        {
            Some(def) => def
                .port_template
                .map(|t| t.ports)
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.name, p.protocol))
                .collect(),
            None => HashMap::new(),
        };
        let mut ports: Vec<pb::AccessPort> = instance
            .allocated_ports
            .iter()
            .map(|(name, port)| {
                let protocol = protocols
                    .get(name)
                    .copied()
                    .unwrap_or(pb::PortProtocol::Tcp as i32);
                let protocol = if protocol == pb::PortProtocol::Unspecified as i32 {
                    pb::PortProtocol::Tcp as i32
                } else {
                    protocol
                };
                pb::AccessPort {
                    name: name.clone(),
                    protocol,
                    port: *port,
                    uri: access_uri(name, protocol, &host, *port),
                }
            })
            .collect();
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        span.record("reason", "granted");
        Ok(Response::new(pb::GetInstanceAccessResponse {
            access: Some(pb::InstanceAccess {
                host,
                ports,
                cml_lab_id: instance.cml_lab_id.clone(),
                valid_until: instance.time_slot.as_ref().and_then(|s| s.end),
            }),
        }))
    }
}

/// A ready-made URI for a port, by the port name's convention (domain.md §1.5: `serial_*` is a
/// console reached over telnet, `vnc_*` VNC, `ssh_*` SSH); empty for anything else and for UDP.
pub fn access_uri(name: &str, protocol: i32, host: &str, port: i32) -> String {
    if protocol == pb::PortProtocol::Udp as i32 {
        return String::new();
    }
    let lower = name.to_ascii_lowercase();
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let scheme = if ["serial", "console", "telnet"]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        "telnet"
    } else if lower.starts_with("vnc") {
        "vnc"
    } else if lower.starts_with("ssh") {
        "ssh"
    } else {
        return String::new();
    };
    format!("{scheme}://{host}:{port}")
}

fn definition_refused(name: &str, why: &str) -> ApiError {
    ApiError::failed_precondition(
        "DEFINITION_STATUS",
        "definition",
        format!("definition {name} {why}"),
    )
    .on_resource("definition", name)
}

/// A JSON object as a protobuf `Struct` (audit details).
pub(crate) fn struct_of(value: Value) -> prost_types::Struct {
    fn to_value(v: Value) -> prost_types::Value {
        use prost_types::value::Kind as K;
        let kind = match v {
            Value::Null => K::NullValue(0),
            Value::Bool(b) => K::BoolValue(b),
            Value::Number(n) => K::NumberValue(n.as_f64().unwrap_or(0.0)),
            Value::String(s) => K::StringValue(s),
            Value::Array(a) => K::ListValue(prost_types::ListValue {
                values: a.into_iter().map(to_value).collect(),
            }),
            Value::Object(o) => K::StructValue(prost_types::Struct {
                fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match value {
        Value::Object(o) => prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        },
        _ => prost_types::Struct::default(),
    }
}

#[tonic::async_trait]
impl InstanceService for Instances {
    async fn create_instance(
        &self,
        request: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::CreateInstanceResponse>, Status> {
        self.create(request).await.map_err(Status::from)
    }

    async fn get_instance(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::GetInstanceResponse>, Status> {
        self.get(request).await.map_err(Status::from)
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        self.list(request).await.map_err(Status::from)
    }

    async fn start_instance(
        &self,
        request: Request<pb::StartInstanceRequest>,
    ) -> Result<Response<pb::StartInstanceResponse>, Status> {
        let instance = self
            .act_on(request, |r| ActionRequest {
                instance_id: r.instance_id,
                resource_version: r.resource_version,
                reason: r.reason,
                action: Action::Start,
            })
            .await?;
        Ok(Response::new(pb::StartInstanceResponse {
            instance: Some(instance),
        }))
    }

    async fn stop_instance(
        &self,
        request: Request<pb::StopInstanceRequest>,
    ) -> Result<Response<pb::StopInstanceResponse>, Status> {
        let instance = self
            .act_on(request, |r| ActionRequest {
                instance_id: r.instance_id,
                resource_version: r.resource_version,
                reason: r.reason,
                action: Action::Stop,
            })
            .await?;
        Ok(Response::new(pb::StopInstanceResponse {
            instance: Some(instance),
        }))
    }

    async fn collect_instance(
        &self,
        request: Request<pb::CollectInstanceRequest>,
    ) -> Result<Response<pb::CollectInstanceResponse>, Status> {
        let instance = self
            .act_on(request, |r| ActionRequest {
                instance_id: r.instance_id,
                resource_version: r.resource_version,
                reason: r.reason,
                action: Action::Collect,
            })
            .await?;
        Ok(Response::new(pb::CollectInstanceResponse {
            instance: Some(instance),
        }))
    }

    async fn terminate_instance(
        &self,
        request: Request<pb::TerminateInstanceRequest>,
    ) -> Result<Response<pb::TerminateInstanceResponse>, Status> {
        let instance = self
            .act_on(request, |r| ActionRequest {
                instance_id: r.instance_id,
                resource_version: r.resource_version,
                reason: r.reason,
                action: Action::Terminate { force: r.force },
            })
            .await?;
        Ok(Response::new(pb::TerminateInstanceResponse {
            instance: Some(instance),
        }))
    }

    async fn get_instance_access(
        &self,
        request: Request<pb::GetInstanceAccessRequest>,
    ) -> Result<Response<pb::GetInstanceAccessResponse>, Status> {
        self.access(request).await.map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_uuids_per_subject_and_key() {
        let a = idempotent_instance_id("alice", "k1");
        assert!(validate::is_uuid(&a));
        assert_eq!(a, idempotent_instance_id("alice", "k1"));
        assert_ne!(a, idempotent_instance_id("bob", "k1"));
        assert_ne!(a, idempotent_instance_id("alice", "k2"));
        // Length-prefixed: moving a character between the parts changes the id.
        assert_ne!(derived_uuid("n", "ab", "c"), derived_uuid("n", "a", "bc"));
    }

    #[test]
    fn access_uris_follow_port_name_conventions() {
        let tcp = pb::PortProtocol::Tcp as i32;
        assert_eq!(
            access_uri("serial_1", tcp, "203.0.113.7", 5041),
            "telnet://203.0.113.7:5041"
        );
        assert_eq!(
            access_uri("vnc_1", tcp, "203.0.113.7", 5044),
            "vnc://203.0.113.7:5044"
        );
        assert_eq!(
            access_uri("ssh", tcp, "2001:db8::1", 22),
            "ssh://[2001:db8::1]:22"
        );
        assert_eq!(access_uri("http_api", tcp, "h", 80), "");
        assert_eq!(
            access_uri("serial_1", pb::PortProtocol::Udp as i32, "h", 1),
            ""
        );
    }

    #[test]
    fn struct_of_keeps_nested_values() {
        let s = struct_of(json!({"a": 1, "b": [true, null], "c": {"d": "x"}}));
        assert_eq!(s.fields.len(), 3);
        assert!(struct_of(json!("not an object")).fields.is_empty());
    }
}
