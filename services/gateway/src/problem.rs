//! RFC 9457 problem documents (`application/problem+json`): every error the gateway answers,
//! whether it comes from a gRPC status of a backend (with its `google.rpc` details decoded) or
//! from the gateway itself (no route, bad JSON, no session…).

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use tonic::Code;
use tonic_types::StatusExt;

/// The media type of problem documents.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The prefix of every problem `type` the gateway emits; the rest is a slug naming the problem
/// (`urn:ccm:problem:not-found`, `urn:ccm:problem:route-not-found`, …).
pub const PROBLEM_TYPE_PREFIX: &str = "urn:ccm:problem:";

/// One field violation of a `google.rpc.BadRequest`, or of a request the gateway could not
/// transcode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldViolation {
    /// The field path, e.g. `definition.name` or `page_size`.
    pub field: String,
    /// What is wrong.
    pub description: String,
    /// A machine-readable reason, when the server gave one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// One violation of a `google.rpc.PreconditionFailure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreconditionViolation {
    /// The kind of precondition, e.g. `STATE`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What it is about.
    pub subject: String,
    /// What failed.
    pub description: String,
}

/// A problem document (boxed, so that `Result<_, Problem>` stays small; its fields are
/// reached through `Deref` to [`ProblemBody`]).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Problem(Box<ProblemBody>);

impl std::ops::Deref for Problem {
    type Target = ProblemBody;

    fn deref(&self) -> &ProblemBody {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemBody {
        &mut self.0
    }
}

/// The content of a [`Problem`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemBody {
    /// `urn:ccm:problem:<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary (the HTTP reason phrase).
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened, for people.
    pub detail: String,
    /// The request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The gRPC status code name of the backend's answer (`NOT_FOUND`), when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// The request id (the backend's `RequestInfo`, or the gateway's `x-request-id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `google.rpc.ErrorInfo.reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `google.rpc.ErrorInfo.domain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `google.rpc.ErrorInfo.metadata`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `google.rpc.BadRequest` field violations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub field_violations: Vec<FieldViolation>,
    /// `google.rpc.PreconditionFailure` violations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub precondition_failures: Vec<PreconditionViolation>,
    /// `google.rpc.RetryInfo` delay, whole seconds rounded up (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// `google.rpc.ResourceInfo` as `type/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The `www-authenticate` challenge of a 401 (sent as a header, not in the body).
    #[serde(skip)]
    pub www_authenticate: Option<String>,
    /// Methods allowed on the path of a 405 (sent as `Allow`).
    #[serde(skip)]
    pub allow: Vec<http::Method>,
}

/// The HTTP status of a gRPC code (the mapping of `google.rpc.Code`).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Problem {
    /// A problem of the gateway itself: `slug` names the type.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemBody {
            kind: format!("{PROBLEM_TYPE_PREFIX}{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            instance: None,
            grpc_status: None,
            request_id: None,
            reason: None,
            domain: None,
            metadata: BTreeMap::new(),
            field_violations: Vec::new(),
            precondition_failures: Vec::new(),
            retry_after_seconds: None,
            resource: None,
            www_authenticate: None,
            allow: Vec::new(),
        }))
    }

    /// 400 for a request the gateway could not turn into a message.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-argument", detail)
    }

    /// 400 with one field violation.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let field = field.into();
        let description = description.into();
        let mut p = Self::bad_request(format!("{field}: {description}"));
        p.field_violations.push(FieldViolation {
            field,
            description,
            reason: String::new(),
        });
        p
    }

    /// The problem of a gRPC status from a backend, with its `google.rpc` details decoded.
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = status.code();
        let http = http_status(code);
        let slug = code_name(code).to_ascii_lowercase().replace('_', "-");
        let mut p = Self::new(http, &slug, status.message());
        p.grpc_status = Some(code_name(code).to_owned());
        let details = status.get_error_details();
        if let Some(bad) = details.bad_request() {
            p.field_violations = bad
                .field_violations
                .iter()
                .map(|v| FieldViolation {
                    field: v.field.clone(),
                    description: v.description.clone(),
                    reason: v.reason.clone(),
                })
                .collect();
        }
        if let Some(info) = details.error_info() {
            p.reason = Some(info.reason.clone()).filter(|r| !r.is_empty());
            p.domain = Some(info.domain.clone()).filter(|d| !d.is_empty());
            p.metadata = info
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        if let Some(pre) = details.precondition_failure() {
            p.precondition_failures = pre
                .violations
                .iter()
                .map(|v| PreconditionViolation {
                    kind: v.r#type.clone(),
                    subject: v.subject.clone(),
                    description: v.description.clone(),
                })
                .collect();
        }
        if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            p.retry_after_seconds = Some(secs.max(1));
        }
        if let Some(req) = details.request_info() {
            p.request_id = Some(req.request_id.clone()).filter(|r| !r.is_empty());
        }
        if let Some(res) = details.resource_info() {
            p.resource = Some(format!("{}/{}", res.resource_type, res.resource_name));
        }
        p.www_authenticate = status
            .metadata()
            .get(ccm_auth::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        p
    }

    /// Sets the request path.
    pub fn with_instance(mut self, path: &str) -> Self {
        self.instance = Some(path.to_owned());
        self
    }

    /// Sets the request id unless the backend already named one.
    pub fn with_request_id(mut self, id: &str) -> Self {
        if self.request_id.is_none() && !id.is_empty() {
            self.request_id = Some(id.to_owned());
        }
        self
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status_code(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after_seconds
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        if let Some(challenge) = &self.www_authenticate
            && let Ok(v) = HeaderValue::from_str(challenge)
        {
            headers.insert(header::WWW_AUTHENTICATE, v);
        }
        if !self.allow.is_empty() {
            let allow = self
                .allow
                .iter()
                .map(http::Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                headers.insert(header::ALLOW, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn status_details_are_decoded() {
        let mut details = ErrorDetails::with_bad_request_violation("page_size", "must be >= 0");
        details.set_error_info("BAD_PAGE", "ccm", [("max".to_owned(), "500".to_owned())]);
        details.set_retry_info(Some(std::time::Duration::from_millis(1500)));
        details.set_request_info("req-1", "");
        details.add_precondition_failure_violation("STATE", "w-1", "worker is draining");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad", details);
        let p = Problem::from_status(&status);
        assert_eq!(p.status, 400);
        assert_eq!(p.kind, "urn:ccm:problem:invalid-argument");
        assert_eq!(p.grpc_status.as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(p.field_violations[0].field, "page_size");
        assert_eq!(p.reason.as_deref(), Some("BAD_PAGE"));
        assert_eq!(p.metadata.get("max").map(String::as_str), Some("500"));
        assert_eq!(p.retry_after_seconds, Some(2));
        assert_eq!(p.request_id.as_deref(), Some("req-1"));
        assert_eq!(p.precondition_failures[0].subject, "w-1");
        let response = p.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            PROBLEM_CONTENT_TYPE
        );
    }

    #[test]
    fn mapping_follows_google_rpc_code() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::Aborted), StatusCode::CONFLICT);
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
    }
}
