//! Errors: [`ApiError`], the one place where domain, store, coordination and auth failures become
//! gRPC statuses, and [`ControlPlaneError`], the crate's own error (configuration, serving).
//!
//! # ApiError → gRPC
//!
//! Every handler returns `Result<_, ApiError>` and converts at the edge with `?` / `.into()`
//! (`impl From<ApiError> for tonic::Status`). Each variant becomes one status code with
//! `google.rpc` details a client decodes with `tonic_types::StatusExt::get_error_details`:
//!
//! | variant | code | details |
//! |---|---|---|
//! | [`ApiError::InvalidArgument`] | `INVALID_ARGUMENT` | `BadRequest` (every field violation), `ErrorInfo` |
//! | [`ApiError::NotFound`] | `NOT_FOUND` | `ResourceInfo`, `ErrorInfo` |
//! | [`ApiError::AlreadyExists`] | `ALREADY_EXISTS` | `ResourceInfo`, `ErrorInfo` |
//! | [`ApiError::Aborted`] | `ABORTED` | `ErrorInfo` (reason `STALE_RESOURCE_VERSION`, metadata `current_resource_version`, `expected_resource_version`), `ResourceInfo` |
//! | [`ApiError::FailedPrecondition`] | `FAILED_PRECONDITION` | `PreconditionFailure` (type `STATE` for an illegal transition, `FENCE` for a stale leader epoch, …), `ErrorInfo`, `ResourceInfo` if known |
//! | [`ApiError::ResourceExhausted`] | `RESOURCE_EXHAUSTED` | `QuotaFailure`, `ErrorInfo` |
//! | [`ApiError::PermissionDenied`] | `PERMISSION_DENIED` | `ErrorInfo` |
//! | [`ApiError::Unauthenticated`] | `UNAUTHENTICATED` | `ErrorInfo`; `www-authenticate` metadata when given |
//! | [`ApiError::Unavailable`] | `UNAVAILABLE` | `RetryInfo`, `ErrorInfo` |
//! | [`ApiError::Internal`] | `INTERNAL` | `ErrorInfo`; the message is generic, the cause is logged |
//!
//! Every status also carries `RequestInfo` with the call's request id when the error is
//! converted inside a call served by [`crate::server`] (the id is in a task-local set by the
//! request-id middleware), so a user can quote it and an operator can find the log line.
//! `ErrorInfo.domain` is always [`ERROR_DOMAIN`]; `ErrorInfo.reason` is a stable
//! `UPPER_SNAKE_CASE` code (the `REASON_*` constants) that clients may switch on.
//!
//! # Adding a mapping (wave 2)
//!
//! This file is the only place that maps errors of other crates. [`CoreError`] is mapped here
//! (`impl From<CoreError> for ApiError`, every variant). The store, coordination and auth
//! crates add their mapping **in this file**, following the same pattern: one `impl From<X> for
//! ApiError` with an exhaustive `match` (no `_ =>` arm, so a new variant is a compile error
//! here), using the constructors below (`ApiError::not_found`, `ApiError::stale_version`,
//! `ApiError::stale_fence`, `ApiError::not_leader`, `ApiError::internal`, …) rather than building
//! variants by hand, and a test in `tests/errors.rs` that decodes the details on a real client.
//! Expected mappings: `StoreError::NotFound` → `not_found`, `Conflict`/version mismatch →
//! `stale_version`, unique-key violation → `already_exists`, backend down → `unavailable`;
//! `CoordError::NotLeader` → `not_leader`, stale epoch → `stale_fence`; `AuthError` missing or
//! expired token → `unauthenticated` (with the RFC 6750 challenge), wrong role →
//! `permission_denied`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use ccm_core::CoreError;
use tonic::Code;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic_types::{
    ErrorDetails, FieldViolation as PbFieldViolation, PreconditionViolation as PbPrecondition,
    QuotaViolation as PbQuotaViolation, StatusExt,
};

use crate::convert;

/// `ErrorInfo.domain` of every ccm error.
pub const ERROR_DOMAIN: &str = "ccm";

/// `ErrorInfo.reason` of [`ApiError::InvalidArgument`].
pub const REASON_INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
/// `ErrorInfo.reason` of [`ApiError::NotFound`].
pub const REASON_NOT_FOUND: &str = "NOT_FOUND";
/// `ErrorInfo.reason` of [`ApiError::AlreadyExists`].
pub const REASON_ALREADY_EXISTS: &str = "ALREADY_EXISTS";
/// `ErrorInfo.reason` of [`ApiError::Aborted`]: the request's `resource_version` is stale.
pub const REASON_STALE_RESOURCE_VERSION: &str = "STALE_RESOURCE_VERSION";
/// `ErrorInfo.reason` of an illegal state transition ([`ApiError::illegal_transition`]).
pub const REASON_INVALID_STATE_TRANSITION: &str = "INVALID_STATE_TRANSITION";
/// `ErrorInfo.reason` of a stale leader fence ([`ApiError::stale_fence`]); internal.proto
/// promises this exact string.
pub const REASON_STALE_LEADER_EPOCH: &str = "STALE_LEADER_EPOCH";
/// `ErrorInfo.reason` of a generic [`ApiError::FailedPrecondition`].
pub const REASON_FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
/// `ErrorInfo.reason` of [`ApiError::ports_exhausted`].
pub const REASON_PORTS_EXHAUSTED: &str = "PORTS_EXHAUSTED";
/// `ErrorInfo.reason` of a generic [`ApiError::ResourceExhausted`].
pub const REASON_RESOURCE_EXHAUSTED: &str = "RESOURCE_EXHAUSTED";
/// `ErrorInfo.reason` of [`ApiError::PermissionDenied`].
pub const REASON_PERMISSION_DENIED: &str = "PERMISSION_DENIED";
/// `ErrorInfo.reason` of [`ApiError::Unauthenticated`].
pub const REASON_UNAUTHENTICATED: &str = "UNAUTHENTICATED";
/// `ErrorInfo.reason` of [`ApiError::not_leader`].
pub const REASON_NOT_LEADER: &str = "NOT_LEADER";
/// `ErrorInfo.reason` of a generic [`ApiError::Unavailable`] (backend down, shutting down).
pub const REASON_UNAVAILABLE: &str = "UNAVAILABLE";
/// `ErrorInfo.reason` of [`ApiError::Internal`].
pub const REASON_INTERNAL: &str = "INTERNAL";

/// `PreconditionFailure` violation type of an illegal state transition.
pub const PRECONDITION_STATE: &str = "STATE";
/// `PreconditionFailure` violation type of a stale or unknown leader fence.
pub const PRECONDITION_FENCE: &str = "FENCE";

/// Retry delay suggested by [`ApiError::not_leader`] when the caller gives none.
pub const DEFAULT_NOT_LEADER_RETRY: Duration = Duration::from_secs(1);

/// Message sent for every [`ApiError::Internal`]; the real cause only goes to the log.
pub const INTERNAL_MESSAGE: &str = "internal error";

/// Metadata key carrying an RFC 6750 challenge on `UNAUTHENTICATED` statuses; the gateway copies
/// it to the HTTP `WWW-Authenticate` header.
pub const WWW_AUTHENTICATE_METADATA: &str = "www-authenticate";

/// Boxed error source of [`ApiError::Internal`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One bad field of a request (`google.rpc.BadRequest.FieldViolation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, e.g. `definition.resource_requirements.cpu_cores` or
    /// `port_template.ports[2].name`.
    pub field: String,
    /// What is wrong, for a human.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.description)
        } else {
            write!(f, "{}: {}", self.field, self.description)
        }
    }
}

/// One failed precondition (`google.rpc.PreconditionFailure.Violation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreconditionViolation {
    /// Kind of precondition: [`PRECONDITION_STATE`], [`PRECONDITION_FENCE`], or another
    /// upper-case word (e.g. `IN_USE`, `DEFINITION_STATUS`).
    pub kind: String,
    /// What failed, relative to the kind, e.g. `instance` or `scheduler`.
    pub subject: String,
    /// How it failed, for a human.
    pub description: String,
}

/// One exceeded quota (`google.rpc.QuotaFailure.Violation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaViolation {
    /// What ran out, e.g. `worker:<id>/ports`.
    pub subject: String,
    /// How, for a human.
    pub description: String,
}

/// A resource named in an error (`google.rpc.ResourceInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    /// Resource type, e.g. `ccm.v1.LabletInstance` or simply `instance`.
    pub resource_type: String,
    /// Its id or name.
    pub name: String,
}

impl ResourceRef {
    /// A reference to `name` of `resource_type`.
    pub fn new(resource_type: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceRef {
            resource_type: resource_type.into(),
            name: name.into(),
        }
    }
}

/// An API failure, ready to become a gRPC status (see the module docs for the mapping).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: one or more fields are invalid. `INVALID_ARGUMENT`.
    #[error("invalid argument: {}", join_violations(.violations))]
    InvalidArgument {
        /// Every bad field (never empty when built by the constructors).
        violations: Vec<FieldViolation>,
    },
    /// The addressed resource does not exist (or the caller may not see it). `NOT_FOUND`.
    #[error("{} {:?} not found", .resource.resource_type, .resource.name)]
    NotFound {
        /// What was looked for.
        resource: ResourceRef,
    },
    /// A resource with this identity exists already. `ALREADY_EXISTS`.
    #[error("{} {:?} already exists", .resource.resource_type, .resource.name)]
    AlreadyExists {
        /// The existing resource.
        resource: ResourceRef,
    },
    /// Optimistic concurrency failed: the request's `resource_version` is not the stored one.
    /// `ABORTED`; re-read and retry.
    #[error(
        "{} {:?} was modified concurrently: expected resource_version {expected}, current is {current}",
        .resource.resource_type, .resource.name
    )]
    Aborted {
        /// The resource.
        resource: ResourceRef,
        /// The version the request carried.
        expected: i64,
        /// The stored version.
        current: i64,
    },
    /// The system is not in a state that allows the request (illegal state transition, stale
    /// leader fence, resource in use, …). `FAILED_PRECONDITION`.
    #[error("{message}")]
    FailedPrecondition {
        /// Summary for the status message.
        message: String,
        /// `ErrorInfo.reason`, e.g. [`REASON_INVALID_STATE_TRANSITION`].
        reason: String,
        /// The failed preconditions.
        violations: Vec<PreconditionViolation>,
        /// Extra `ErrorInfo` metadata pairs (e.g. `from`, `to`, `current_epoch`).
        metadata: Vec<(String, String)>,
        /// The resource concerned, when known.
        resource: Option<Box<ResourceRef>>,
    },
    /// A quota ran out (ports of a worker, …). `RESOURCE_EXHAUSTED`.
    #[error("{message}")]
    ResourceExhausted {
        /// Summary for the status message.
        message: String,
        /// `ErrorInfo.reason`, e.g. [`REASON_PORTS_EXHAUSTED`].
        reason: String,
        /// The exceeded quotas.
        violations: Vec<QuotaViolation>,
        /// Extra `ErrorInfo` metadata pairs (e.g. `requested`, `free`).
        metadata: Vec<(String, String)>,
    },
    /// The caller is authenticated but not allowed. `PERMISSION_DENIED`.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// Why, e.g. "requires one of roles: admin".
        message: String,
    },
    /// The caller is not authenticated (no, malformed or expired token). `UNAUTHENTICATED`.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// Why.
        message: String,
        /// RFC 6750 challenge for the `WWW-Authenticate` header, e.g.
        /// `Bearer error="invalid_token", error_description="expired"`.
        www_authenticate: Option<String>,
    },
    /// Try again later: not the leader, backend down, shutting down. `UNAVAILABLE`.
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why.
        message: String,
        /// `ErrorInfo.reason`, e.g. [`REASON_NOT_LEADER`].
        reason: String,
        /// Suggested delay before retrying (`RetryInfo`).
        retry_after: Option<Duration>,
        /// Extra `ErrorInfo` metadata pairs (e.g. `role`, `leader`).
        metadata: Vec<(String, String)>,
    },
    /// A bug or an unexpected failure. `INTERNAL` with a generic message; `context` and `source`
    /// are logged (with the request id), never sent.
    #[error("internal error: {context}")]
    Internal {
        /// What was being done, for the log.
        context: String,
        /// The cause, for the log.
        #[source]
        source: Option<BoxError>,
    },
}

fn join_violations(violations: &[FieldViolation]) -> String {
    let mut out = String::new();
    for (i, v) in violations.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&v.to_string());
    }
    out
}

impl ApiError {
    // ---------------------------------------------------------------------------------------
    // Constructors
    // ---------------------------------------------------------------------------------------

    /// `INVALID_ARGUMENT` with one field violation.
    pub fn invalid_argument(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            violations: vec![FieldViolation::new(field, description)],
        }
    }

    /// `INVALID_ARGUMENT` with several field violations (see also
    /// [`crate::validate::Violations`]).
    pub fn invalid_arguments(violations: Vec<FieldViolation>) -> Self {
        ApiError::InvalidArgument { violations }
    }

    /// `NOT_FOUND` for `name` of `resource_type` (e.g. `("instance", id)`).
    pub fn not_found(resource_type: impl Into<String>, name: impl Into<String>) -> Self {
        ApiError::NotFound {
            resource: ResourceRef::new(resource_type, name),
        }
    }

    /// `ALREADY_EXISTS` for `name` of `resource_type`.
    pub fn already_exists(resource_type: impl Into<String>, name: impl Into<String>) -> Self {
        ApiError::AlreadyExists {
            resource: ResourceRef::new(resource_type, name),
        }
    }

    /// `ABORTED`: the request carried `expected` but the stored version is `current`. The
    /// current version is in `ErrorInfo.metadata["current_resource_version"]`.
    pub fn stale_version(
        resource_type: impl Into<String>,
        name: impl Into<String>,
        expected: i64,
        current: i64,
    ) -> Self {
        ApiError::Aborted {
            resource: ResourceRef::new(resource_type, name),
            expected,
            current,
        }
    }

    /// `FAILED_PRECONDITION` for an illegal state transition of `subject` (`"instance"`,
    /// `"worker"`) from state `from` to state `to` (proto enum value names, e.g.
    /// `INSTANCE_STATE_RUNNING`): a `STATE` violation, `ErrorInfo` reason
    /// [`REASON_INVALID_STATE_TRANSITION`] with metadata `from` / `to`.
    pub fn illegal_transition(
        subject: impl Into<String>,
        from: impl Into<String>,
        to: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        let (subject, from, to, why) = (subject.into(), from.into(), to.into(), why.into());
        let description = format!("{subject} cannot move from {from} to {to}: {why}");
        ApiError::FailedPrecondition {
            message: description.clone(),
            reason: REASON_INVALID_STATE_TRANSITION.to_owned(),
            violations: vec![PreconditionViolation {
                kind: PRECONDITION_STATE.to_owned(),
                subject: subject.clone(),
                description,
            }],
            metadata: vec![
                ("from".to_owned(), from),
                ("to".to_owned(), to),
                ("subject".to_owned(), subject),
            ],
            resource: None,
        }
    }

    /// `FAILED_PRECONDITION` for a stale leader fence: `role`'s caller presented `presented` but
    /// the current epoch is `current`. A `FENCE` violation, `ErrorInfo` reason
    /// [`REASON_STALE_LEADER_EPOCH`] with metadata `role`, `presented_epoch`, `current_epoch`.
    pub fn stale_fence(role: impl Into<String>, presented: i64, current: i64) -> Self {
        let role = role.into();
        let description = if current <= 0 {
            format!(
                "leader epoch {presented} of {role} is stale: no {role} leader has been elected \
                 (current epoch 0); win the {role} election before calling"
            )
        } else {
            format!(
                "leader epoch {presented} of {role} is stale (current epoch {current}); \
                 this replica is no longer the leader"
            )
        };
        ApiError::FailedPrecondition {
            message: description.clone(),
            reason: REASON_STALE_LEADER_EPOCH.to_owned(),
            violations: vec![PreconditionViolation {
                kind: PRECONDITION_FENCE.to_owned(),
                subject: role.clone(),
                description,
            }],
            metadata: vec![
                ("role".to_owned(), role),
                ("presented_epoch".to_owned(), presented.to_string()),
                ("current_epoch".to_owned(), current.to_string()),
            ],
            resource: None,
        }
    }

    /// A generic `FAILED_PRECONDITION` with one violation of `kind` (upper-case word, e.g.
    /// `IN_USE`) on `subject`.
    pub fn failed_precondition(
        kind: impl Into<String>,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        let description = description.into();
        ApiError::FailedPrecondition {
            message: description.clone(),
            reason: REASON_FAILED_PRECONDITION.to_owned(),
            violations: vec![PreconditionViolation {
                kind: kind.into(),
                subject: subject.into(),
                description,
            }],
            metadata: Vec::new(),
            resource: None,
        }
    }

    /// `RESOURCE_EXHAUSTED`: a port range ran out. `subject` names the worker or range.
    pub fn ports_exhausted(subject: impl Into<String>, requested: usize, free: usize) -> Self {
        let subject = subject.into();
        let description = format!("{requested} ports requested, {free} free");
        ApiError::ResourceExhausted {
            message: format!("ports exhausted on {subject}: {description}"),
            reason: REASON_PORTS_EXHAUSTED.to_owned(),
            violations: vec![QuotaViolation {
                subject,
                description,
            }],
            metadata: vec![
                ("requested".to_owned(), requested.to_string()),
                ("free".to_owned(), free.to_string()),
            ],
        }
    }

    /// A generic `RESOURCE_EXHAUSTED` with one quota violation.
    pub fn resource_exhausted(subject: impl Into<String>, description: impl Into<String>) -> Self {
        let description = description.into();
        ApiError::ResourceExhausted {
            message: description.clone(),
            reason: REASON_RESOURCE_EXHAUSTED.to_owned(),
            violations: vec![QuotaViolation {
                subject: subject.into(),
                description,
            }],
            metadata: Vec::new(),
        }
    }

    /// `PERMISSION_DENIED`.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        ApiError::PermissionDenied {
            message: message.into(),
        }
    }

    /// `UNAUTHENTICATED`, optionally with an RFC 6750 challenge.
    pub fn unauthenticated(message: impl Into<String>, www_authenticate: Option<String>) -> Self {
        ApiError::Unauthenticated {
            message: message.into(),
            www_authenticate,
        }
    }

    /// `UNAVAILABLE` (backend down, shutting down), suggesting a retry after `retry_after`.
    pub fn unavailable(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        ApiError::Unavailable {
            message: message.into(),
            reason: REASON_UNAVAILABLE.to_owned(),
            retry_after,
            metadata: Vec::new(),
        }
    }

    /// `UNAVAILABLE` because this replica is not the leader of `role`; `leader` is the current
    /// leader's id when known (in `ErrorInfo.metadata["leader"]`).
    pub fn not_leader(
        role: impl Into<String>,
        leader: Option<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let role = role.into();
        let mut metadata = vec![("role".to_owned(), role.clone())];
        if let Some(leader) = leader {
            metadata.push(("leader".to_owned(), leader));
        }
        ApiError::Unavailable {
            message: format!("not the {role} leader"),
            reason: REASON_NOT_LEADER.to_owned(),
            retry_after: Some(retry_after.unwrap_or(DEFAULT_NOT_LEADER_RETRY)),
            metadata,
        }
    }

    /// `INTERNAL`: `context` says what was being done; `source` is the cause. Both are logged
    /// when the error becomes a status, neither is sent.
    pub fn internal(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// `INTERNAL` without an underlying error (a broken invariant).
    pub fn internal_msg(context: impl Into<String>) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: None,
        }
    }

    /// Names the resource an error is about (sets `ResourceInfo` on `FAILED_PRECONDITION`; other
    /// variants that already carry a resource keep theirs).
    #[must_use]
    pub fn on_resource(
        mut self,
        resource_type: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        if let ApiError::FailedPrecondition { resource, .. } = &mut self {
            *resource = Some(Box::new(ResourceRef::new(resource_type, name)));
        }
        self
    }

    /// Prefixes every field path of an `INVALID_ARGUMENT` with `prefix` (e.g. a nested message's
    /// path in its request); other variants are returned unchanged.
    #[must_use]
    pub fn under(mut self, prefix: &str) -> Self {
        if let ApiError::InvalidArgument { violations } = &mut self {
            for v in violations {
                v.field = crate::validate::join_path(prefix, &v.field);
            }
        }
        self
    }

    // ---------------------------------------------------------------------------------------
    // Inspection
    // ---------------------------------------------------------------------------------------

    /// The gRPC code this error becomes.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::Aborted { .. } => Code::Aborted,
            ApiError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ApiError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ApiError::PermissionDenied { .. } => Code::PermissionDenied,
            ApiError::Unauthenticated { .. } => Code::Unauthenticated,
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::Internal { .. } => Code::Internal,
        }
    }

    /// The field violations of an `INVALID_ARGUMENT` (empty for other variants).
    pub fn field_violations(&self) -> &[FieldViolation] {
        match self {
            ApiError::InvalidArgument { violations } => violations,
            _ => &[],
        }
    }

    /// The `ErrorInfo.reason` this error carries.
    pub fn reason(&self) -> &str {
        match self {
            ApiError::InvalidArgument { .. } => REASON_INVALID_ARGUMENT,
            ApiError::NotFound { .. } => REASON_NOT_FOUND,
            ApiError::AlreadyExists { .. } => REASON_ALREADY_EXISTS,
            ApiError::Aborted { .. } => REASON_STALE_RESOURCE_VERSION,
            ApiError::FailedPrecondition { reason, .. }
            | ApiError::ResourceExhausted { reason, .. }
            | ApiError::Unavailable { reason, .. } => reason,
            ApiError::PermissionDenied { .. } => REASON_PERMISSION_DENIED,
            ApiError::Unauthenticated { .. } => REASON_UNAUTHENTICATED,
            ApiError::Internal { .. } => REASON_INTERNAL,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Conversion
    // ---------------------------------------------------------------------------------------

    /// The gRPC status of this error, with `google.rpc` details. An `INTERNAL` error is logged
    /// here (at error level, inside the call's span, with the request id).
    pub fn into_status(self) -> tonic::Status {
        let request_id = crate::server::current_request_id();
        let code = self.code();
        let mut details = ErrorDetails::new();
        let mut metadata = MetadataMap::new();
        let mut info: HashMap<String, String> = HashMap::new();
        let reason = self.reason().to_owned();

        let message = match self {
            ApiError::InvalidArgument { violations } => {
                let message = format!("invalid argument: {}", join_violations(&violations));
                details.set_bad_request(
                    violations
                        .into_iter()
                        .map(|v| PbFieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                message
            }
            ApiError::NotFound { resource } => {
                let message = format!("{} {:?} not found", resource.resource_type, resource.name);
                details.set_resource_info(resource.resource_type, resource.name, "", "not found");
                message
            }
            ApiError::AlreadyExists { resource } => {
                let message = format!(
                    "{} {:?} already exists",
                    resource.resource_type, resource.name
                );
                details.set_resource_info(
                    resource.resource_type,
                    resource.name,
                    "",
                    "already exists",
                );
                message
            }
            ApiError::Aborted {
                resource,
                expected,
                current,
            } => {
                let message = format!(
                    "{} {:?} was modified concurrently: expected resource_version {expected}, \
                     current is {current}; re-read and retry",
                    resource.resource_type, resource.name
                );
                info.insert("current_resource_version".into(), current.to_string());
                info.insert("expected_resource_version".into(), expected.to_string());
                details.set_resource_info(
                    resource.resource_type,
                    resource.name,
                    "",
                    format!("current resource_version is {current}"),
                );
                message
            }
            ApiError::FailedPrecondition {
                message,
                reason: _,
                violations,
                metadata: extra,
                resource,
            } => {
                details.set_precondition_failure(
                    violations
                        .into_iter()
                        .map(|v| PbPrecondition::new(v.kind, v.subject, v.description))
                        .collect::<Vec<_>>(),
                );
                info.extend(extra);
                if let Some(resource) = resource {
                    let ResourceRef {
                        resource_type,
                        name,
                    } = *resource;
                    details.set_resource_info(resource_type, name, "", "");
                }
                message
            }
            ApiError::ResourceExhausted {
                message,
                reason: _,
                violations,
                metadata: extra,
            } => {
                details.set_quota_failure(
                    violations
                        .into_iter()
                        .map(|v| PbQuotaViolation::new(v.subject, v.description))
                        .collect::<Vec<_>>(),
                );
                info.extend(extra);
                message
            }
            ApiError::PermissionDenied { message } => message,
            ApiError::Unauthenticated {
                message,
                www_authenticate,
            } => {
                if let Some(challenge) = www_authenticate {
                    match MetadataValue::try_from(challenge.as_str()) {
                        Ok(value) => {
                            metadata.insert(WWW_AUTHENTICATE_METADATA, value);
                        }
                        Err(_) => tracing::warn!(
                            challenge = %challenge,
                            "WWW-Authenticate challenge is not a valid header value; dropped"
                        ),
                    }
                }
                message
            }
            ApiError::Unavailable {
                message,
                reason: _,
                retry_after,
                metadata: extra,
            } => {
                details.set_retry_info(retry_after);
                info.extend(extra);
                message
            }
            ApiError::Internal { context, source } => {
                let cause = source
                    .as_ref()
                    .map(|s| error_chain(s.as_ref()))
                    .unwrap_or_default();
                tracing::error!(
                    request_id = request_id.as_deref().unwrap_or(""),
                    context = %context,
                    cause = %cause,
                    "internal error"
                );
                match &request_id {
                    Some(id) => format!("{INTERNAL_MESSAGE} (request id {id})"),
                    None => INTERNAL_MESSAGE.to_owned(),
                }
            }
        };

        details.set_error_info(reason, ERROR_DOMAIN, info);
        if let Some(id) = request_id {
            details.set_request_info(id, "");
        }
        tonic::Status::with_error_details_and_metadata(code, message, details, metadata)
    }
}

/// `error: cause: cause …` for the log.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        err.into_status()
    }
}

/// Every domain refusal of `ccm-core`, mapped as its variant documents.
impl From<CoreError> for ApiError {
    fn from(err: CoreError) -> Self {
        match err {
            CoreError::InvalidInstanceTransition { from, to, why } => ApiError::illegal_transition(
                "instance",
                convert::instance_state_name(from),
                convert::instance_state_name(to),
                why,
            ),
            CoreError::InvalidWorkerTransition { from, to, why } => ApiError::illegal_transition(
                "worker",
                convert::worker_state_name(from),
                convert::worker_state_name(to),
                why,
            ),
            CoreError::PortsExhausted {
                range_start,
                range_end,
                requested,
                free,
            } => ApiError::ports_exhausted(
                format!("port range {range_start}-{range_end}"),
                requested,
                free,
            ),
            CoreError::InvalidPortRange { start, end, why } => ApiError::invalid_argument(
                "port_range",
                format!("invalid port range {start}-{end}: {why}"),
            ),
            CoreError::InvalidLabYaml(message) => {
                ApiError::invalid_argument("lab_yaml", format!("invalid lab YAML: {message}"))
            }
            CoreError::UnknownPlaceholder {
                placeholder,
                location,
            } => ApiError::invalid_argument(
                "lab_yaml",
                format!(
                    "unknown port placeholder {placeholder} at {location}: no port of the port \
                     template has this name"
                ),
            ),
            CoreError::PortWithoutPlaceholder { port_name } => ApiError::invalid_argument(
                "port_template.ports",
                format!(
                    "port {port_name:?} is not referenced by any placeholder in the lab YAML \
                     (expected {})",
                    ccm_core::labyaml::placeholder_for(&port_name)
                ),
            ),
            CoreError::PortNotAllocated { port_name } => ApiError::invalid_argument(
                "allocated_ports",
                format!("port {port_name:?} of the port template has no allocated port"),
            ),
            CoreError::InvalidVersion { input, why } => {
                ApiError::invalid_argument("version", format!("invalid version {input:?}: {why}"))
            }
            CoreError::Invalid { field, message } => ApiError::invalid_argument(field, message),
        }
    }
}

/// The crate's own error: configuration and serving failures (not API errors; those are
/// [`ApiError`]). Configuration errors name the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    ConfigRead {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    ConfigSyntax {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The configuration file has keys ccm does not know (all of them are listed).
    #[error("configuration file {path} has unknown keys: {}", .keys.join(", "))]
    UnknownConfigKeys {
        /// The file.
        path: std::path::PathBuf,
        /// Every unknown key, dotted (`store.sqlite_pth`).
        keys: Vec<String>,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration value for `{key}` (from {source_name}): {message}")]
    InvalidConfig {
        /// The dotted key, e.g. `request_timeout`.
        key: String,
        /// Where the value came from: `default`, `file <path>`, `environment CCM_…`, `flag --…`.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// Configuration values that are fine alone but not together, or a required value missing.
    #[error("invalid configuration: {message}")]
    ConfigConflict {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Building the application state failed (store, coordinator, sink, fetcher).
    #[error("setting up the control plane: {0}")]
    Setup(String),
    /// The gRPC server could not be set up or failed.
    #[error(transparent)]
    Server(#[from] ccm_runtime::RuntimeError),
}

impl From<ccm_store::StoreError> for ApiError {
    fn from(e: ccm_store::StoreError) -> Self {
        use ccm_store::StoreError as S;
        match e {
            S::NotFound { kind, id } => ApiError::not_found(kind, id),
            S::AlreadyExists { kind, id } => ApiError::already_exists(kind, id),
            S::Conflict {
                kind,
                id,
                expected,
                actual,
            } => ApiError::stale_version(kind.as_str(), id, expected, actual),
            // The claim names what is taken (a definition's name@version, a worker's port…);
            // callers that know better (ports → FAILED_PRECONDITION) map it themselves.
            S::ClaimTaken {
                namespace,
                key,
                holder_kind,
                holder_id,
            } => ApiError::already_exists(
                namespace,
                format!("{key} (held by {holder_kind} {holder_id})"),
            ),
            S::GuardFailed { kind, id } => ApiError::failed_precondition(
                "IN_USE",
                kind.as_str(),
                format!("{kind} {id} still depends on it"),
            ),
            S::InvalidQuery(message) => ApiError::invalid_argument("page_token", message),
            S::InvalidInput(message) => {
                ApiError::internal_msg(format!("store refused input: {message}"))
            }
            S::Unavailable(message) => ApiError::unavailable(
                format!("the store is unavailable: {message}"),
                Some(STORE_RETRY_AFTER),
            ),
            S::Backend(message) => ApiError::internal_msg(format!("store: {message}")),
        }
    }
}

impl ControlPlaneError {
    /// `true` when the error is about the configuration (the process should exit with a
    /// configuration error code rather than a software failure).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ControlPlaneError::ConfigRead { .. }
                | ControlPlaneError::ConfigSyntax { .. }
                | ControlPlaneError::UnknownConfigKeys { .. }
                | ControlPlaneError::InvalidConfig { .. }
                | ControlPlaneError::ConfigConflict { .. }
        )
    }
}

/// Retry hint when the store is unavailable.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Retry hint when the coordinator is unavailable.
pub const COORD_RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<ccm_coord::CoordError> for ApiError {
    fn from(e: ccm_coord::CoordError) -> Self {
        use ccm_coord::CoordError as C;
        match e {
            C::Unavailable(message) => ApiError::unavailable(
                format!("coordination is unavailable: {message}"),
                Some(COORD_RETRY_AFTER),
            ),
            C::InvalidArgument(message) => ApiError::invalid_argument("", message),
            C::Internal(message) => ApiError::internal_msg(format!("coordination: {message}")),
        }
    }
}

impl From<ccm_auth::AuthError> for ApiError {
    fn from(e: ccm_auth::AuthError) -> Self {
        use ccm_auth::AuthError as A;
        match e {
            A::IssuerUnavailable(_) => {
                ApiError::unavailable(e.description(), Some(COORD_RETRY_AFTER))
            }
            A::Config(message) => ApiError::internal_msg(format!("auth configuration: {message}")),
            A::Missing
            | A::Malformed(_)
            | A::Expired
            | A::NotYetValid
            | A::InvalidSignature
            | A::DisallowedAlgorithm(_)
            | A::UnknownKey(_)
            | A::WrongIssuer
            | A::WrongAudience
            | A::TokenRequestRejected(_) => {
                ApiError::unauthenticated(e.description(), e.www_authenticate())
            }
        }
    }
}

impl From<ccm_artifacts::ArtifactError> for ApiError {
    fn from(e: ccm_artifacts::ArtifactError) -> Self {
        use ccm_artifacts::ArtifactError as A;
        let message = e.to_string();
        match e {
            A::InvalidUri { .. } => ApiError::invalid_argument("lab_artifact_uri", message),
            A::NotFound { .. } => {
                ApiError::failed_precondition("ARTIFACT", "lab_artifact_uri", message)
            }
            A::Denied { .. } => {
                ApiError::failed_precondition("ARTIFACT", "lab_artifact_uri", message)
            }
            A::TooLarge { .. } => ApiError::resource_exhausted("lab_artifact_uri", message),
            A::Unavailable { .. } => ApiError::unavailable(message, Some(STORE_RETRY_AFTER)),
            A::Failed { .. } => {
                ApiError::failed_precondition("ARTIFACT", "lab_artifact_uri", message)
            }
            A::Config(_) => ApiError::internal_msg(message),
        }
    }
}
