//! Conversions between the contracts (`ccm_proto::v1`, "pb") and the domain (`ccm_core`).
//!
//! * **core → proto** is infallible: `*_to_proto(&core) -> pb`.
//! * **proto → core** is fallible: `*_from_proto(&pb, field) -> Result<core, ApiError>`.
//!   `field` is the path of the message in the request (`"definition"`, `"instance"`, or `""`
//!   at the top level); every problem is reported at once as an `INVALID_ARGUMENT` whose field
//!   violations carry full paths such as `definition.resource_requirements.cpu_cores` or
//!   `instance.state_history[3].to`.
//!
//! Enum fields are read from the raw `i32` (prost's getters silently turn unknown numbers into
//! `UNSPECIFIED`): an undefined number is refused, and `*_UNSPECIFIED` is refused wherever the
//! domain has no "unset" value.
//!
//! # What does not survive
//!
//! The domain keeps what its rules need; the contracts carry more. Going core → proto → core is
//! lossless (empty strings and `None` are the same on the wire). Going proto → core → proto keeps
//! the fields the domain has and drops the others (descriptions, conditions, EC2 and CML details
//! beyond the AMI name and CML version, resource versions, …); handlers fill those from their
//! store records. `CmlWorker.state_history` has no proto field: the proto carries only the last
//! transition's reason (`state_reason`), so it comes back empty.
//!
//! Output-only fields of a *definition* (`id`, `lab_yaml_hash`, `status`, `created_at`,
//! `created_by`) are copied when set and otherwise left neutral (empty, `ACTIVE`, the Unix
//! epoch), because a create request legitimately omits them; the create handler overwrites
//! them. An empty definition `version` is [`DEFAULT_DEFINITION_VERSION`] (definition.proto).

use std::collections::{BTreeMap, HashMap};

use ccm_core::defaults::{
    DRAIN_TIMEOUT_HOURS, LEGACY_CPU_CORES, LEGACY_MAX_NODES, LEGACY_MEMORY_GB, LEGACY_STORAGE_GB,
    PERSONAL_LICENSE_MAX_NODES, WORKER_STARTUP_MINUTES,
};
use ccm_core::fleet::PlacementRequest;
use ccm_core::model::{
    Actor, AmiRequirement, Capacity, CmlWorker, CriterionScore, DefinitionStatus, GradingScore,
    InstanceState, LabletDefinition, LabletInstance, LicenseType, PortDefinition, PortRange,
    ResourceRequirements, ServiceStatus, StateTransition, TimeSlot, WorkerState, WorkerTemplate,
    instance_type_has_nested_virt,
};
use ccm_core::version::Version;
use ccm_proto::v1 as pb;
use chrono::{DateTime, Duration, Utc};

use crate::error::ApiError;
use crate::validate::{self, Violations, index_path, join_path};

/// Version of a definition created without one (definition.proto: defaults to "1.0.0").
pub const DEFAULT_DEFINITION_VERSION: Version = Version::new(1, 0, 0);

/// Port protocol name of TCP in the domain model.
pub const PROTOCOL_TCP: &str = "tcp";
/// Port protocol name of UDP in the domain model.
pub const PROTOCOL_UDP: &str = "udp";

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

/// An instant as a protobuf `Timestamp`.
pub fn timestamp_to_proto(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Timestamp` as an instant: `nanos` must be in `0..1e9` and the instant
/// representable.
pub fn timestamp_from_proto(
    ts: &prost_types::Timestamp,
    field: &str,
) -> Result<DateTime<Utc>, ApiError> {
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| {
            ApiError::invalid_argument(
                join_path(field, "nanos"),
                format!("must be in 0..999999999, got {}", ts.nanos),
            )
        })?;
    DateTime::from_timestamp(ts.seconds, nanos).ok_or_else(|| {
        ApiError::invalid_argument(
            join_path(field, "seconds"),
            format!("{} is outside the supported range of instants", ts.seconds),
        )
    })
}

fn opt_timestamp_from_proto(
    v: &mut Violations,
    ts: Option<&prost_types::Timestamp>,
    field: &str,
) -> Option<Option<DateTime<Utc>>> {
    match ts {
        None => Some(None),
        Some(ts) => v.absorb(timestamp_from_proto(ts, field)).map(Some),
    }
}

fn required_timestamp(
    v: &mut Violations,
    ts: Option<&prost_types::Timestamp>,
    field: &str,
) -> Option<DateTime<Utc>> {
    match ts {
        None => {
            v.add(field, "is required");
            None
        }
        Some(ts) => v.absorb(timestamp_from_proto(ts, field)),
    }
}

/// A span as a protobuf `Duration` (seconds and nanos with the same sign).
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    let seconds = d.num_seconds();
    let nanos = (d - Duration::seconds(seconds))
        .num_nanoseconds()
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0);
    prost_types::Duration { seconds, nanos }
}

/// A protobuf `Duration` as a span: `nanos` within ±999 999 999 and of the same sign as
/// `seconds`.
pub fn duration_from_proto(d: &prost_types::Duration, field: &str) -> Result<Duration, ApiError> {
    let sign_ok = (d.seconds >= 0 && d.nanos >= 0) || (d.seconds <= 0 && d.nanos <= 0);
    if d.nanos.unsigned_abs() >= 1_000_000_000 || !sign_ok {
        return Err(ApiError::invalid_argument(
            join_path(field, "nanos"),
            format!(
                "must be within ±999999999 and of the same sign as seconds, got {}",
                d.nanos
            ),
        ));
    }
    Duration::try_seconds(d.seconds)
        .map(|s| s + Duration::nanoseconds(i64::from(d.nanos)))
        .ok_or_else(|| {
            ApiError::invalid_argument(
                join_path(field, "seconds"),
                format!("{} seconds is out of range", d.seconds),
            )
        })
}

/// A protobuf `Duration` that must be a positive whole number of minutes (e.g.
/// `LabletDefinition.max_duration`).
pub fn whole_minutes_from_proto(d: &prost_types::Duration, field: &str) -> Result<u32, ApiError> {
    let span = duration_from_proto(d, field)?;
    if span <= Duration::zero() {
        return Err(ApiError::invalid_argument(field, "must be positive"));
    }
    if d.nanos != 0 || d.seconds % 60 != 0 {
        return Err(ApiError::invalid_argument(
            field,
            format!("must be whole minutes, got {}s", d.seconds),
        ));
    }
    u32::try_from(span.num_minutes()).map_err(|_| {
        ApiError::invalid_argument(field, format!("{} minutes is too long", span.num_minutes()))
    })
}

/// Whole minutes as a protobuf `Duration`.
pub fn minutes_to_proto(minutes: u32) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::from(minutes) * 60,
        nanos: 0,
    }
}

fn whole_hours_from_proto(d: &prost_types::Duration, field: &str) -> Result<u32, ApiError> {
    let minutes = whole_minutes_from_proto(d, field)?;
    if minutes % 60 != 0 {
        return Err(ApiError::invalid_argument(
            field,
            format!("must be whole hours, got {minutes} minutes"),
        ));
    }
    Ok(minutes / 60)
}

fn hours_to_proto(hours: u32) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::from(hours) * 3600,
        nanos: 0,
    }
}

fn u32_to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn none_if_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

/// Generates `to_proto`, `from_proto` and `name` for a domain enum whose every variant has a
/// proto counterpart and whose proto `UNSPECIFIED` has no domain meaning.
macro_rules! enum_mapping {
    (
        $(#[$doc_to:meta])* to: $to:ident,
        $(#[$doc_from:meta])* from: $from:ident,
        $(#[$doc_name:meta])* name: $name:ident,
        $core:ident <=> $pb:ident, $what:literal,
        { $($c:ident <=> $p:ident),+ $(,)? }
    ) => {
        $(#[$doc_to])*
        pub fn $to(value: $core) -> pb::$pb {
            match value {
                $($core::$c => pb::$pb::$p,)+
            }
        }

        $(#[$doc_from])*
        pub fn $from(raw: i32, field: &str) -> Result<$core, ApiError> {
            #[allow(unreachable_patterns)]
            match pb::$pb::try_from(raw) {
                $(Ok(pb::$pb::$p) => Ok($core::$c),)+
                Ok(pb::$pb::Unspecified) => Err(ApiError::invalid_argument(
                    field,
                    concat!("is required: ", $what, " must not be UNSPECIFIED"),
                )),
                Ok(other) => Err(ApiError::invalid_argument(
                    field,
                    format!(concat!($what, " {} is not supported here"), other.as_str_name()),
                )),
                Err(_) => Err(ApiError::invalid_argument(
                    field,
                    format!(concat!("unknown ", $what, " value {}"), raw),
                )),
            }
        }

        $(#[$doc_name])*
        pub fn $name(value: $core) -> &'static str {
            $to(value).as_str_name()
        }
    };
}

enum_mapping! {
    /// An instance state as its proto enum.
    to: instance_state_to_proto,
    /// A proto instance state (raw number) as the domain state; `UNSPECIFIED` and unknown
    /// numbers are refused.
    from: instance_state_from_proto,
    /// The proto enum value name of an instance state, e.g. `INSTANCE_STATE_RUNNING`.
    name: instance_state_name,
    InstanceState <=> InstanceState, "instance state",
    {
        Pending <=> Pending,
        Scheduled <=> Scheduled,
        Instantiating <=> Instantiating,
        Running <=> Running,
        Collecting <=> Collecting,
        Grading <=> Grading,
        Stopping <=> Stopping,
        Stopped <=> Stopped,
        Archived <=> Archived,
        Terminated <=> Terminated,
    }
}

enum_mapping! {
    /// A worker state as its proto enum.
    to: worker_state_to_proto,
    /// A proto worker state (raw number) as the domain state; `UNSPECIFIED` and unknown numbers
    /// are refused.
    from: worker_state_from_proto,
    /// The proto enum value name of a worker state, e.g. `WORKER_STATE_DRAINING`.
    name: worker_state_name,
    WorkerState <=> WorkerState, "worker state",
    {
        Pending <=> Pending,
        Provisioning <=> Provisioning,
        Starting <=> Starting,
        Running <=> Running,
        Draining <=> Draining,
        Stopping <=> Stopping,
        Stopped <=> Stopped,
        ShuttingDown <=> ShuttingDown,
        Terminated <=> Terminated,
        Failed <=> Failed,
        Unknown <=> Unknown,
    }
}

enum_mapping! {
    /// A licence type as its proto enum.
    to: license_type_to_proto,
    /// A proto licence type (raw number) as the domain type; `UNSPECIFIED` and unknown numbers
    /// are refused.
    from: license_type_from_proto,
    /// The proto enum value name of a licence type, e.g. `LICENSE_TYPE_PERSONAL`.
    name: license_type_name,
    LicenseType <=> LicenseType, "licence type",
    {
        Personal <=> Personal,
        Enterprise <=> Enterprise,
        Evaluation <=> Evaluation,
    }
}

enum_mapping! {
    /// A definition status as its proto enum.
    to: definition_status_to_proto,
    /// A proto definition status (raw number) as the domain status; `UNSPECIFIED` and unknown
    /// numbers are refused.
    from: definition_status_from_proto,
    /// The proto enum value name of a definition status.
    name: definition_status_name,
    DefinitionStatus <=> DefinitionStatus, "definition status",
    {
        Active <=> Active,
        Deprecated <=> Deprecated,
        Deleted <=> Deleted,
    }
}

/// A CML service status as its proto enum.
pub fn service_status_to_proto(value: ServiceStatus) -> pb::CmlServiceStatus {
    match value {
        ServiceStatus::Unavailable => pb::CmlServiceStatus::Unavailable,
        ServiceStatus::Starting => pb::CmlServiceStatus::Starting,
        ServiceStatus::Available => pb::CmlServiceStatus::Available,
        ServiceStatus::Error => pb::CmlServiceStatus::Error,
    }
}

/// A proto CML service status as the domain status. `UNSPECIFIED` ("not observed yet") is the
/// domain's default, `Unavailable`; unknown numbers are refused.
pub fn service_status_from_proto(raw: i32, field: &str) -> Result<ServiceStatus, ApiError> {
    match pb::CmlServiceStatus::try_from(raw) {
        Ok(pb::CmlServiceStatus::Unspecified) => Ok(ServiceStatus::default()),
        Ok(pb::CmlServiceStatus::Unavailable) => Ok(ServiceStatus::Unavailable),
        Ok(pb::CmlServiceStatus::Starting) => Ok(ServiceStatus::Starting),
        Ok(pb::CmlServiceStatus::Available) => Ok(ServiceStatus::Available),
        Ok(pb::CmlServiceStatus::Error) => Ok(ServiceStatus::Error),
        Err(_) => Err(ApiError::invalid_argument(
            field,
            format!("unknown CML service status value {raw}"),
        )),
    }
}

/// A domain port protocol (`"tcp"`, `"udp"`, any case) as its proto enum; anything else is
/// `UNSPECIFIED` (which the contract reads as TCP).
pub fn port_protocol_to_proto(protocol: &str) -> pb::PortProtocol {
    if protocol.eq_ignore_ascii_case(PROTOCOL_UDP) {
        pb::PortProtocol::Udp
    } else if protocol.eq_ignore_ascii_case(PROTOCOL_TCP) {
        pb::PortProtocol::Tcp
    } else {
        pb::PortProtocol::Unspecified
    }
}

/// A proto port protocol as the domain's name: `UNSPECIFIED` and `TCP` → `"tcp"`, `UDP` →
/// `"udp"`; unknown numbers are refused.
pub fn port_protocol_from_proto(raw: i32, field: &str) -> Result<&'static str, ApiError> {
    match pb::PortProtocol::try_from(raw) {
        Ok(pb::PortProtocol::Unspecified | pb::PortProtocol::Tcp) => Ok(PROTOCOL_TCP),
        Ok(pb::PortProtocol::Udp) => Ok(PROTOCOL_UDP),
        Err(_) => Err(ApiError::invalid_argument(
            field,
            format!("unknown port protocol value {raw}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Capacity, resources, ports
// ---------------------------------------------------------------------------------------------

/// A capacity as `WorkerCapacity` (`nodes` ↔ `max_nodes`).
pub fn capacity_to_proto(c: &Capacity) -> pb::WorkerCapacity {
    pb::WorkerCapacity {
        cpu_cores: u32_to_i32(c.cpu_cores),
        memory_gb: u32_to_i32(c.memory_gb),
        storage_gb: u32_to_i32(c.storage_gb),
        max_nodes: u32_to_i32(c.nodes),
    }
}

/// A `WorkerCapacity` as a capacity; every dimension must be ≥ 0.
pub fn capacity_from_proto(c: &pb::WorkerCapacity, field: &str) -> Result<Capacity, ApiError> {
    let mut v = Violations::new();
    let cpu = validate::non_negative(&mut v, &join_path(field, "cpu_cores"), c.cpu_cores);
    let mem = validate::non_negative(&mut v, &join_path(field, "memory_gb"), c.memory_gb);
    let disk = validate::non_negative(&mut v, &join_path(field, "storage_gb"), c.storage_gb);
    let nodes = validate::non_negative(&mut v, &join_path(field, "max_nodes"), c.max_nodes);
    let value = (|| Some(Capacity::new(cpu?, mem?, disk?, nodes?)))();
    v.finish_some(value)
}

/// An AMI requirement as its proto message (`min_version` `None` ↔ `""`).
pub fn ami_requirement_to_proto(a: &AmiRequirement) -> pb::AmiRequirement {
    pb::AmiRequirement {
        name_pattern: a.name_pattern.clone(),
        min_version: a.min_version.map(|m| m.to_string()).unwrap_or_default(),
    }
}

/// AMI requirements from their proto messages; `min_version` must be strict semver when set.
pub fn ami_requirements_from_proto(
    list: &[pb::AmiRequirement],
    field: &str,
) -> Result<Vec<AmiRequirement>, ApiError> {
    let mut v = Violations::new();
    let mut out = Vec::with_capacity(list.len());
    for (i, a) in list.iter().enumerate() {
        let path = index_path(field, i);
        if let Some(why) =
            validate::free_text_problem(&a.name_pattern, validate::MAX_NAME_LEN, false)
        {
            v.add(join_path(&path, "name_pattern"), why);
        }
        if let Some(min_version) =
            validate::optional_semver(&mut v, &join_path(&path, "min_version"), &a.min_version)
        {
            out.push(AmiRequirement {
                name_pattern: a.name_pattern.clone(),
                min_version,
            });
        }
    }
    v.finish(out)
}

/// Resource requirements as their proto message.
pub fn resource_requirements_to_proto(r: &ResourceRequirements) -> pb::ResourceRequirements {
    pb::ResourceRequirements {
        cpu_cores: u32_to_i32(r.cpu_cores),
        memory_gb: u32_to_i32(r.memory_gb),
        storage_gb: u32_to_i32(r.storage_gb),
        nested_virt: r.nested_virt,
        ami_requirements: r
            .ami_requirements
            .iter()
            .map(ami_requirement_to_proto)
            .collect(),
    }
}

/// Resource requirements from their proto message: CPU and memory ≥ 1, storage ≥ 0, within
/// the sanity bounds of [`crate::validate`], AMI `min_version`s strict semver.
pub fn resource_requirements_from_proto(
    r: &pb::ResourceRequirements,
    field: &str,
) -> Result<ResourceRequirements, ApiError> {
    let mut v = Violations::new();
    let value = validate::resource_requirements(&mut v, field, Some(r));
    v.finish_some(value)
}

/// A port of a port template as its proto message.
pub fn port_definition_to_proto(p: &PortDefinition) -> pb::PortDefinition {
    pb::PortDefinition {
        name: p.name.clone(),
        protocol: port_protocol_to_proto(&p.protocol) as i32,
    }
}

/// A port template from its proto message (`field` is the `PortTemplate`'s path): each name a
/// valid lower-snake-case port name, no duplicates, known protocol.
pub fn port_template_from_proto(
    t: Option<&pb::PortTemplate>,
    field: &str,
) -> Result<Vec<PortDefinition>, ApiError> {
    let Some(t) = t else {
        return Ok(Vec::new());
    };
    let mut v = Violations::new();
    let ports_field = join_path(field, "ports");
    validate::port_names(
        &mut v,
        &ports_field,
        t.ports.iter().map(|p| p.name.as_str()),
    );
    let mut out = Vec::with_capacity(t.ports.len());
    for (i, p) in t.ports.iter().enumerate() {
        let path = join_path(&index_path(&ports_field, i), "protocol");
        if let Some(protocol) = v.absorb(port_protocol_from_proto(p.protocol, &path)) {
            out.push(PortDefinition {
                name: p.name.clone(),
                protocol: protocol.to_owned(),
            });
        }
    }
    v.finish(out)
}

/// A port template as its proto message.
pub fn port_template_to_proto(ports: &[PortDefinition]) -> pb::PortTemplate {
    pb::PortTemplate {
        ports: ports.iter().map(port_definition_to_proto).collect(),
    }
}

/// A port range as its proto message.
pub fn port_range_to_proto(r: &PortRange) -> pb::PortRange {
    pb::PortRange {
        start: i32::from(r.start),
        end: i32::from(r.end),
    }
}

/// A port range from its proto message: 1 ≤ start ≤ end ≤ 65535. `None` is the default range
/// (2000..=9999).
pub fn port_range_from_proto(
    r: Option<&pb::PortRange>,
    field: &str,
) -> Result<PortRange, ApiError> {
    let Some(r) = r else {
        return Ok(PortRange::default());
    };
    let mut v = Violations::new();
    let start = validate::int_range(
        &mut v,
        &join_path(field, "start"),
        i64::from(r.start),
        1,
        65535,
    );
    let end = validate::int_range(&mut v, &join_path(field, "end"), i64::from(r.end), 1, 65535);
    if let (Some(s), Some(e)) = (start, end)
        && s > e
    {
        v.add(
            join_path(field, "end"),
            format!("must not be below start ({s}), got {e}"),
        );
    }
    let value = (|| {
        Some(PortRange {
            start: u16::try_from(start?).ok()?,
            end: u16::try_from(end?).ok()?,
        })
    })();
    v.finish_some(value)
}

/// Allocated ports (`name → port`) as their proto map.
pub fn ports_to_proto(ports: &BTreeMap<String, u16>) -> HashMap<String, i32> {
    ports
        .iter()
        .map(|(name, port)| (name.clone(), i32::from(*port)))
        .collect()
}

/// Allocated ports from their proto map: every port in 1..=65535.
pub fn ports_from_proto(
    ports: &HashMap<String, i32>,
    field: &str,
) -> Result<BTreeMap<String, u16>, ApiError> {
    let mut v = Violations::new();
    let mut out = BTreeMap::new();
    for (name, port) in ports {
        match u16::try_from(*port) {
            Ok(p) if p > 0 => {
                out.insert(name.clone(), p);
            }
            _ => v.add(
                validate::key_path(field, name),
                format!("port must be in 1..65535, got {port}"),
            ),
        }
    }
    v.finish(out)
}

// ---------------------------------------------------------------------------------------------
// Time slots and history
// ---------------------------------------------------------------------------------------------

/// A time slot as its proto message.
pub fn time_slot_to_proto(s: &TimeSlot) -> pb::TimeSlot {
    pb::TimeSlot {
        start: Some(timestamp_to_proto(s.start)),
        end: Some(timestamp_to_proto(s.end)),
        asap: s.asap,
    }
}

/// A stored time slot from its proto message: start and end required, end ≥ start. (A booking
/// *request* is resolved with [`crate::validate::time_slot`] instead, which applies ASAP, the
/// default end and the maximum duration.)
pub fn time_slot_from_proto(s: Option<&pb::TimeSlot>, field: &str) -> Result<TimeSlot, ApiError> {
    let Some(s) = s else {
        return Err(ApiError::invalid_argument(field, "is required"));
    };
    let mut v = Violations::new();
    let start = required_timestamp(&mut v, s.start.as_ref(), &join_path(field, "start"));
    let end = required_timestamp(&mut v, s.end.as_ref(), &join_path(field, "end"));
    if let (Some(a), Some(b)) = (start, end)
        && b < a
    {
        v.add(join_path(field, "end"), "must not be before start");
    }
    let value = (|| {
        Some(TimeSlot {
            start: start?,
            end: end?,
            asap: s.asap,
        })
    })();
    v.finish_some(value)
}

/// An instance state transition as its proto message (`from` `None` ↔ `UNSPECIFIED`).
pub fn state_transition_to_proto(t: &StateTransition<InstanceState>) -> pb::StateTransition {
    pb::StateTransition {
        from: t
            .from
            .map_or(pb::InstanceState::Unspecified, instance_state_to_proto) as i32,
        to: instance_state_to_proto(t.to) as i32,
        at: Some(timestamp_to_proto(t.at)),
        reason: t.reason.clone(),
        actor: t.actor.0.clone(),
    }
}

/// An instance state transition from its proto message: `from` may be `UNSPECIFIED` (the
/// creation entry), `to` and `at` are required.
pub fn state_transition_from_proto(
    t: &pb::StateTransition,
    field: &str,
) -> Result<StateTransition<InstanceState>, ApiError> {
    let mut v = Violations::new();
    let from = if t.from == pb::InstanceState::Unspecified as i32 {
        Some(None)
    } else {
        v.absorb(instance_state_from_proto(t.from, &join_path(field, "from")))
            .map(Some)
    };
    let to = v.absorb(instance_state_from_proto(t.to, &join_path(field, "to")));
    let at = required_timestamp(&mut v, t.at.as_ref(), &join_path(field, "at"));
    let value = (|| {
        Some(StateTransition {
            from: from?,
            to: to?,
            at: at?,
            reason: t.reason.clone(),
            actor: Actor(t.actor.clone()),
        })
    })();
    v.finish_some(value)
}

// ---------------------------------------------------------------------------------------------
// Grading
// ---------------------------------------------------------------------------------------------

/// A grading score as its proto message.
pub fn grading_score_to_proto(g: &GradingScore) -> pb::GradingScore {
    pb::GradingScore {
        total: g.total,
        max: g.max,
        passed: g.passed,
        breakdown: g
            .breakdown
            .iter()
            .map(|c| pb::GradingCriterion {
                criterion: c.criterion.clone(),
                points: c.points,
                max: c.max,
            })
            .collect(),
    }
}

fn points_ok(v: &mut Violations, path: &str, got: f64, max: f64) -> bool {
    let before = v.len();
    if !got.is_finite() || got < 0.0 {
        v.add(
            format!(
                "{path}.{}",
                if path.ends_with(']') {
                    "points"
                } else {
                    "total"
                }
            ),
            format!("must be a finite number ≥ 0, got {got}"),
        );
    }
    if !max.is_finite() || max < 0.0 {
        v.add(
            format!("{path}.max"),
            format!("must be a finite number ≥ 0, got {max}"),
        );
    } else if got.is_finite() && got > max {
        v.add(
            format!("{path}.max"),
            format!("must not be below the points obtained ({got}), got {max}"),
        );
    }
    v.len() == before
}

/// A grading score from its proto message: finite, non-negative points, `max` ≥ points (for the
/// total and each criterion).
pub fn grading_score_from_proto(
    g: &pb::GradingScore,
    field: &str,
) -> Result<GradingScore, ApiError> {
    let mut v = Violations::new();
    let field = if field.is_empty() {
        "grading_score"
    } else {
        field
    };
    points_ok(&mut v, field, g.total, g.max);
    for (i, c) in g.breakdown.iter().enumerate() {
        let path = index_path(&join_path(field, "breakdown"), i);
        points_ok(&mut v, &path, c.points, c.max);
    }
    v.finish(GradingScore {
        total: g.total,
        max: g.max,
        passed: g.passed,
        breakdown: g
            .breakdown
            .iter()
            .map(|c| CriterionScore {
                criterion: c.criterion.clone(),
                points: c.points,
                max: c.max,
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

/// A definition version as its proto message. Fields the domain does not hold (description,
/// cached YAML, notification config, status reason, `updated_at`, `resource_version`) are left
/// empty for the handler to fill.
pub fn definition_to_proto(d: &LabletDefinition) -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: d.id.clone(),
        version: d.version.to_string(),
        name: d.name.clone(),
        lab_artifact_uri: d.lab_artifact_uri.clone(),
        lab_yaml_hash: d.lab_yaml_hash.clone(),
        resource_requirements: Some(resource_requirements_to_proto(&d.resource_requirements)),
        license_affinity: d
            .license_affinity
            .iter()
            .map(|l| license_type_to_proto(*l) as i32)
            .collect(),
        node_count: u32_to_i32(d.node_count),
        port_template: Some(port_template_to_proto(&d.port_template)),
        grading_rules_uri: d.grading_rules_uri.clone().unwrap_or_default(),
        max_duration: Some(minutes_to_proto(d.max_duration_minutes)),
        status: definition_status_to_proto(d.status) as i32,
        created_at: Some(timestamp_to_proto(d.created_at)),
        created_by: d.created_by.clone(),
        ..Default::default()
    }
}

/// A definition version from its proto message (see the module docs for output-only fields).
///
/// Checked here: `version` strict semver (empty → [`DEFAULT_DEFINITION_VERSION`]),
/// `resource_requirements` required and in range, `license_affinity` non-empty with known,
/// non-`UNSPECIFIED` values, `node_count` in 1..=[`validate::MAX_NODE_COUNT`], the port template,
/// `max_duration` a positive whole number of minutes, known `status`, valid timestamps. Names
/// and URIs are checked by [`definition_input_from_proto`], which create handlers use.
pub fn definition_from_proto(
    d: &pb::LabletDefinition,
    field: &str,
) -> Result<LabletDefinition, ApiError> {
    let mut v = Violations::new();
    let value = definition_parts(&mut v, d, field);
    v.finish_some(value)
}

/// A definition a client submits (create): everything [`definition_from_proto`] checks, plus
/// the name ([`validate::resource_name`]), the description, the artifact and grading URIs
/// (`policy`), and the notification webhook (HTTPS). All problems are reported together.
pub fn definition_input_from_proto(
    d: &pb::LabletDefinition,
    field: &str,
    policy: validate::UriPolicy,
) -> Result<LabletDefinition, ApiError> {
    let mut v = Violations::new();
    validate::resource_name(&mut v, &join_path(field, "name"), &d.name);
    validate::description(&mut v, &join_path(field, "description"), &d.description);
    validate::uri(
        &mut v,
        &join_path(field, "lab_artifact_uri"),
        &d.lab_artifact_uri,
        policy,
    );
    validate::optional_uri(
        &mut v,
        &join_path(field, "grading_rules_uri"),
        &d.grading_rules_uri,
        policy,
    );
    if let Some(n) = &d.owner_notification {
        validate::optional_uri(
            &mut v,
            &join_path(field, "owner_notification.webhook_url"),
            &n.webhook_url,
            validate::UriPolicy::HTTPS_ONLY,
        );
    }
    let value = definition_parts(&mut v, d, field);
    v.finish_some(value)
}

fn definition_parts(
    v: &mut Violations,
    d: &pb::LabletDefinition,
    field: &str,
) -> Option<LabletDefinition> {
    let version = if d.version.is_empty() {
        Some(DEFAULT_DEFINITION_VERSION)
    } else {
        validate::semver(v, &join_path(field, "version"), &d.version)
    };
    let requirements = validate::resource_requirements(
        v,
        &join_path(field, "resource_requirements"),
        d.resource_requirements.as_ref(),
    );
    let affinity_field = join_path(field, "license_affinity");
    if d.license_affinity.is_empty() {
        v.add(&affinity_field, "must list at least one licence type");
    }
    let mut affinity = Vec::with_capacity(d.license_affinity.len());
    for (i, raw) in d.license_affinity.iter().enumerate() {
        if let Some(l) = v.absorb(license_type_from_proto(
            *raw,
            &index_path(&affinity_field, i),
        )) {
            if affinity.contains(&l) {
                v.add(
                    index_path(&affinity_field, i),
                    format!("duplicate licence type {}", license_type_name(l)),
                );
            }
            affinity.push(l);
        }
    }
    let node_count = validate::int_range(
        v,
        &join_path(field, "node_count"),
        i64::from(d.node_count),
        1,
        validate::MAX_NODE_COUNT,
    )
    .and_then(|n| u32::try_from(n).ok());
    if let Some(nodes) = node_count
        && nodes > PERSONAL_LICENSE_MAX_NODES
        && !affinity.is_empty()
        && affinity.iter().all(|l| *l == LicenseType::Personal)
    {
        v.add(
            &affinity_field,
            format!(
                "{nodes} nodes exceed the PERSONAL licence limit of \
                 {PERSONAL_LICENSE_MAX_NODES}; add ENTERPRISE or EVALUATION"
            ),
        );
    }
    let ports = v.absorb(port_template_from_proto(
        d.port_template.as_ref(),
        &join_path(field, "port_template"),
    ));
    let max_duration_field = join_path(field, "max_duration");
    let max_duration = match &d.max_duration {
        None => {
            v.add(&max_duration_field, "is required");
            None
        }
        Some(m) => v.absorb(whole_minutes_from_proto(m, &max_duration_field)),
    };
    let status = if d.status == 0 {
        Some(DefinitionStatus::Active)
    } else {
        v.absorb(definition_status_from_proto(
            d.status,
            &join_path(field, "status"),
        ))
    };
    let created_at = match &d.created_at {
        None => Some(DateTime::<Utc>::UNIX_EPOCH),
        Some(ts) => v.absorb(timestamp_from_proto(ts, &join_path(field, "created_at"))),
    };
    Some(LabletDefinition {
        id: d.id.clone(),
        name: d.name.clone(),
        version: version?,
        lab_artifact_uri: d.lab_artifact_uri.clone(),
        lab_yaml_hash: d.lab_yaml_hash.clone(),
        resource_requirements: requirements?,
        license_affinity: affinity,
        node_count: node_count?,
        port_template: ports?,
        grading_rules_uri: none_if_empty(&d.grading_rules_uri),
        max_duration_minutes: max_duration?,
        status: status?,
        created_at: created_at?,
        created_by: d.created_by.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// A worker template as its proto message (`startup_minutes` → `startup_time`,
/// `drain_timeout_hours` → `drain_timeout`, `min_warm` → `min_workers`). Fields the domain does
/// not hold (id, volume size, cooldowns, timestamps, …) are left empty; `nested_virt` has no
/// proto field (it follows from the instance type).
pub fn template_to_proto(t: &WorkerTemplate) -> pb::WorkerTemplate {
    pb::WorkerTemplate {
        name: t.name.clone(),
        description: t.description.clone(),
        instance_type: t.instance_type.clone(),
        capacity: Some(capacity_to_proto(&t.capacity)),
        license_type: license_type_to_proto(t.license_type) as i32,
        ami_pattern: t.ami_pattern.clone(),
        regions: t.regions.clone(),
        startup_time: Some(minutes_to_proto(t.startup_minutes)),
        port_range: Some(port_range_to_proto(&t.port_range)),
        drain_timeout: Some(hours_to_proto(t.drain_timeout_hours)),
        tags: t.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        min_workers: u32_to_i32(t.min_warm),
        max_workers: u32_to_i32(t.max_workers),
        ..Default::default()
    }
}

/// A worker template from its proto message (`nested_virt`, which the contract does not carry,
/// is derived from the instance type with `instance_type_has_nested_virt`): name ([`validate::template_name`]), instance
/// type, capacity, licence type and AMI pattern required; `startup_time` whole minutes (default
/// [`WORKER_STARTUP_MINUTES`]), `drain_timeout` whole hours (default [`DRAIN_TIMEOUT_HOURS`]),
/// port range valid (default 2000..=9999), tags within the label limits, min/max workers ≥ 0.
pub fn template_from_proto(
    t: &pb::WorkerTemplate,
    field: &str,
) -> Result<WorkerTemplate, ApiError> {
    let mut v = Violations::new();
    validate::template_name(&mut v, &join_path(field, "name"), &t.name);
    validate::description(&mut v, &join_path(field, "description"), &t.description);
    validate::non_empty(&mut v, &join_path(field, "instance_type"), &t.instance_type);
    validate::non_empty(&mut v, &join_path(field, "ami_pattern"), &t.ami_pattern);
    let capacity_field = join_path(field, "capacity");
    let capacity = match &t.capacity {
        None => {
            v.add(&capacity_field, "is required");
            None
        }
        Some(c) => v.absorb(capacity_from_proto(c, &capacity_field)),
    };
    let license = v.absorb(license_type_from_proto(
        t.license_type,
        &join_path(field, "license_type"),
    ));
    for (i, region) in t.regions.iter().enumerate() {
        validate::resource_name(&mut v, &index_path(&join_path(field, "regions"), i), region);
    }
    let startup = match &t.startup_time {
        None => Some(u32::try_from(WORKER_STARTUP_MINUTES).unwrap_or(u32::MAX)),
        Some(d) => v.absorb(whole_minutes_from_proto(
            d,
            &join_path(field, "startup_time"),
        )),
    };
    let drain = match &t.drain_timeout {
        None => Some(u32::try_from(DRAIN_TIMEOUT_HOURS).unwrap_or(u32::MAX)),
        Some(d) => v.absorb(whole_hours_from_proto(
            d,
            &join_path(field, "drain_timeout"),
        )),
    };
    let port_range = v.absorb(port_range_from_proto(
        t.port_range.as_ref(),
        &join_path(field, "port_range"),
    ));
    validate::labels(
        &mut v,
        &join_path(field, "tags"),
        &t.tags,
        validate::LabelLimits::DEFAULT,
    );
    let min_warm = validate::non_negative(&mut v, &join_path(field, "min_workers"), t.min_workers);
    let max_workers =
        validate::non_negative(&mut v, &join_path(field, "max_workers"), t.max_workers);
    let value = (|| {
        Some(WorkerTemplate {
            name: t.name.clone(),
            description: t.description.clone(),
            instance_type: t.instance_type.clone(),
            nested_virt: instance_type_has_nested_virt(&t.instance_type),
            capacity: capacity?,
            license_type: license?,
            ami_pattern: t.ami_pattern.clone(),
            regions: t.regions.clone(),
            startup_minutes: startup?,
            port_range: port_range?,
            drain_timeout_hours: drain?,
            min_warm: min_warm?,
            max_workers: max_workers?,
            tags: t.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    })();
    v.finish_some(value)
}

// ---------------------------------------------------------------------------------------------
// Instances
// ---------------------------------------------------------------------------------------------

/// An instance as its proto message. Fields the domain does not hold (definition name,
/// assessment ids, conditions, pending summary, termination reason, `updated_at`, `created_by`,
/// `resource_version`) are left empty for the handler to fill.
pub fn instance_to_proto(i: &LabletInstance) -> pb::LabletInstance {
    pb::LabletInstance {
        id: i.id.clone(),
        definition_id: i.definition_id.clone(),
        definition_version: i.definition_version.to_string(),
        state: instance_state_to_proto(i.state) as i32,
        state_history: i
            .state_history
            .iter()
            .map(state_transition_to_proto)
            .collect(),
        worker_id: i.worker_id.clone().unwrap_or_default(),
        allocated_ports: ports_to_proto(&i.allocated_ports),
        cml_lab_id: i.cml_lab_id.clone().unwrap_or_default(),
        time_slot: Some(time_slot_to_proto(&i.timeslot)),
        owner_id: i.owner_id.clone(),
        reservation_id: i.reservation_id.clone().unwrap_or_default(),
        grading_score: i.grading_score.as_ref().map(grading_score_to_proto),
        retry_count: u32_to_i32(i.retry_count),
        created_at: Some(timestamp_to_proto(i.created_at)),
        scheduled_at: i.scheduled_at.map(timestamp_to_proto),
        started_at: i.started_at.map(timestamp_to_proto),
        terminated_at: i.terminated_at.map(timestamp_to_proto),
        ..Default::default()
    }
}

/// An instance from its proto message: `definition_version` strict semver, `state` required,
/// every history entry valid, ports in range, time slot with start and end, grading score
/// valid, `retry_count` ≥ 0, `created_at` required.
pub fn instance_from_proto(
    i: &pb::LabletInstance,
    field: &str,
) -> Result<LabletInstance, ApiError> {
    let mut v = Violations::new();
    let version = validate::semver(
        &mut v,
        &join_path(field, "definition_version"),
        &i.definition_version,
    );
    let state = v.absorb(instance_state_from_proto(
        i.state,
        &join_path(field, "state"),
    ));
    let history_field = join_path(field, "state_history");
    let mut history = Vec::with_capacity(i.state_history.len());
    for (n, t) in i.state_history.iter().enumerate() {
        if let Some(t) = v.absorb(state_transition_from_proto(
            t,
            &index_path(&history_field, n),
        )) {
            history.push(t);
        }
    }
    let ports = v.absorb(ports_from_proto(
        &i.allocated_ports,
        &join_path(field, "allocated_ports"),
    ));
    let slot = v.absorb(time_slot_from_proto(
        i.time_slot.as_ref(),
        &join_path(field, "time_slot"),
    ));
    let grading = match &i.grading_score {
        None => Some(None),
        Some(g) => v
            .absorb(grading_score_from_proto(
                g,
                &join_path(field, "grading_score"),
            ))
            .map(Some),
    };
    let retry_count =
        validate::non_negative(&mut v, &join_path(field, "retry_count"), i.retry_count);
    let created_at = required_timestamp(
        &mut v,
        i.created_at.as_ref(),
        &join_path(field, "created_at"),
    );
    let scheduled_at = opt_timestamp_from_proto(
        &mut v,
        i.scheduled_at.as_ref(),
        &join_path(field, "scheduled_at"),
    );
    let started_at = opt_timestamp_from_proto(
        &mut v,
        i.started_at.as_ref(),
        &join_path(field, "started_at"),
    );
    let terminated_at = opt_timestamp_from_proto(
        &mut v,
        i.terminated_at.as_ref(),
        &join_path(field, "terminated_at"),
    );
    let value = (|| {
        Some(LabletInstance {
            id: i.id.clone(),
            definition_id: i.definition_id.clone(),
            definition_version: version?,
            worker_id: none_if_empty(&i.worker_id),
            state: state?,
            state_history: history,
            allocated_ports: ports?,
            cml_lab_id: none_if_empty(&i.cml_lab_id),
            timeslot: slot?,
            owner_id: i.owner_id.clone(),
            reservation_id: none_if_empty(&i.reservation_id),
            grading_score: grading?,
            retry_count: retry_count?,
            created_at: created_at?,
            scheduled_at: scheduled_at?,
            started_at: started_at?,
            terminated_at: terminated_at?,
        })
    })();
    v.finish_some(value)
}

// ---------------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------------

/// The declared capacity of a legacy worker without a template (domain.md §1.3 migration
/// default: 48 / 192 / 500 / 20).
pub const LEGACY_DECLARED_CAPACITY: Capacity = Capacity::new(
    LEGACY_CPU_CORES,
    LEGACY_MEMORY_GB,
    LEGACY_STORAGE_GB,
    LEGACY_MAX_NODES,
);

/// Licence type given to a legacy worker whose proto says `UNSPECIFIED`: legacy workers are
/// never placed on (placement rejects them before the licence filter), and their legacy node
/// limit (20) is PERSONAL's.
pub const LEGACY_LICENSE_TYPE: LicenseType = LicenseType::Personal;

/// A worker as its proto message: state, service status, template, licence, declared capacity,
/// port range, EC2 instance id and AMI name (in `ec2`), CML version (in `cml`), drain start and
/// reason (in `drain`), `state_reason` = the last transition's reason, `created_at`. Observed
/// details the domain does not hold are left empty.
pub fn worker_to_proto(w: &CmlWorker) -> pb::CmlWorker {
    let ec2 = (w.aws_instance_id.is_some() || w.ami_name.is_some()).then(|| pb::Ec2Info {
        instance_id: w.aws_instance_id.clone().unwrap_or_default(),
        ami_name: w.ami_name.clone().unwrap_or_default(),
        ..Default::default()
    });
    let cml = w.cml_version.as_ref().map(|version| pb::CmlInfo {
        version: version.clone(),
        ..Default::default()
    });
    let drain = (w.drain_started_at.is_some() || w.drain_reason.is_some()).then(|| pb::DrainInfo {
        drain_started_at: w.drain_started_at.map(timestamp_to_proto),
        reason: w.drain_reason.clone().unwrap_or_default(),
        ..Default::default()
    });
    pb::CmlWorker {
        id: w.id.clone(),
        name: w.name.clone(),
        state: worker_state_to_proto(w.state) as i32,
        state_reason: w
            .state_history
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default(),
        service_status: service_status_to_proto(w.service_status) as i32,
        template_name: w.template_name.clone().unwrap_or_default(),
        license_type: license_type_to_proto(w.license_type) as i32,
        declared_capacity: Some(capacity_to_proto(&w.declared)),
        port_range: Some(port_range_to_proto(&w.port_range)),
        ec2,
        cml,
        drain,
        created_at: Some(timestamp_to_proto(w.created_at)),
        ..Default::default()
    }
}

/// A worker from its proto message. `state` is required; a managed worker (template set) needs
/// a known licence type and a declared capacity, a legacy one gets [`LEGACY_LICENSE_TYPE`] and
/// [`LEGACY_DECLARED_CAPACITY`] when they are unset; the port range defaults to 2000..=9999;
/// `created_at` is required. `state_history` comes back empty (see the module docs).
pub fn worker_from_proto(w: &pb::CmlWorker, field: &str) -> Result<CmlWorker, ApiError> {
    let mut v = Violations::new();
    let legacy = w.template_name.is_empty();
    let state = v.absorb(worker_state_from_proto(w.state, &join_path(field, "state")));
    let service_status = v.absorb(service_status_from_proto(
        w.service_status,
        &join_path(field, "service_status"),
    ));
    let license = if legacy && w.license_type == pb::LicenseType::Unspecified as i32 {
        Some(LEGACY_LICENSE_TYPE)
    } else {
        v.absorb(license_type_from_proto(
            w.license_type,
            &join_path(field, "license_type"),
        ))
    };
    let capacity_field = join_path(field, "declared_capacity");
    let declared = match &w.declared_capacity {
        None if legacy => Some(LEGACY_DECLARED_CAPACITY),
        None => {
            v.add(&capacity_field, "is required for a worker with a template");
            None
        }
        Some(c) => v.absorb(capacity_from_proto(c, &capacity_field)),
    };
    let port_range = v.absorb(port_range_from_proto(
        w.port_range.as_ref(),
        &join_path(field, "port_range"),
    ));
    let drain_started_at = opt_timestamp_from_proto(
        &mut v,
        w.drain.as_ref().and_then(|d| d.drain_started_at.as_ref()),
        &join_path(field, "drain.drain_started_at"),
    );
    let created_at = required_timestamp(
        &mut v,
        w.created_at.as_ref(),
        &join_path(field, "created_at"),
    );
    let value = (|| {
        Some(CmlWorker {
            id: w.id.clone(),
            name: w.name.clone(),
            template_name: none_if_empty(&w.template_name),
            state: state?,
            state_history: Vec::new(),
            service_status: service_status?,
            license_type: license?,
            declared: declared?,
            port_range: port_range?,
            ami_name: w.ec2.as_ref().and_then(|e| none_if_empty(&e.ami_name)),
            cml_version: w.cml.as_ref().and_then(|c| none_if_empty(&c.version)),
            aws_instance_id: w.ec2.as_ref().and_then(|e| none_if_empty(&e.instance_id)),
            drain_started_at: drain_started_at?,
            drain_reason: w.drain.as_ref().and_then(|d| none_if_empty(&d.reason)),
            created_at: created_at?,
        })
    })();
    v.finish_some(value)
}

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

/// The scheduler's placement request for `instance` of `definition`: the definition's demand,
/// ports, licence affinity and AMI requirements, the instance's slot and booking window
/// (`[start − instantiation_lead, end)`, no lead for ASAP) and creation time.
///
/// Violations are reported under `definition.` and `instance.`; the instance must name the
/// definition's lineage and version.
pub fn placement_request_from_proto(
    definition: &pb::LabletDefinition,
    instance: &pb::LabletInstance,
    instantiation_lead: Duration,
) -> Result<PlacementRequest, ApiError> {
    let mut v = Violations::new();
    let def = v.absorb(definition_from_proto(definition, "definition"));
    let slot = v.absorb(time_slot_from_proto(
        instance.time_slot.as_ref(),
        "instance.time_slot",
    ));
    let created_at =
        required_timestamp(&mut v, instance.created_at.as_ref(), "instance.created_at");
    validate::non_empty(&mut v, "instance.id", &instance.id);
    if instance.definition_id != definition.id {
        v.add(
            "instance.definition_id",
            format!(
                "names definition {:?}, but the definition given is {:?}",
                instance.definition_id, definition.id
            ),
        );
    }
    if let Some(def) = &def
        && instance.definition_version != def.version.to_string()
    {
        v.add(
            "instance.definition_version",
            format!(
                "is {:?}, but the definition given is version {}",
                instance.definition_version, def.version
            ),
        );
    }
    let value = (|| {
        Some(PlacementRequest::for_definition(
            instance.id.clone(),
            &def?,
            slot?,
            instantiation_lead,
            created_at?,
        ))
    })();
    v.finish_some(value)
}
