//! Role-based access control for tonic servers, as a tower layer.
//!
//! For every request the [`AuthService`] takes the gRPC path (`/ccm.v1.InstanceService/GetInstance`),
//! and
//!
//! 1. lets paths under [`PUBLIC_METHOD_PREFIXES`] (health, reflection) through untouched;
//! 2. authenticates the bearer token ([`Authenticator`]) → `UNAUTHENTICATED` with a
//!    `www-authenticate` challenge (or `UNAVAILABLE` when the issuer cannot be reached);
//! 3. looks up the method's `(ccm.v1.authz)` rule in the contracts ([`RbacTable`]) — a method
//!    without a rule is denied (fail closed) — and applies [`ccm_proto::authorize`]:
//!    `Denied` → `PERMISSION_DENIED` "requires one of roles: admin, manager"; `Allowed` /
//!    `OwnResourcesOnly` → the request goes on with the [`Caller`] and an [`Access`] in its
//!    extensions (read them with [`caller_from_request`] / [`access_from_request`]).
//!
//! Rejections are ordinary gRPC responses (HTTP 200, trailers-only with `grpc-status`) carrying
//! `google.rpc` details like every other ccm error: `ErrorInfo` (domain [`ERROR_DOMAIN`], reason
//! `UNAUTHENTICATED`, `PERMISSION_DENIED`, `UNAVAILABLE` or `INTERNAL`, metadata `method` and,
//! for token errors, `cause`), `RequestInfo` with the call's `x-request-id` when the request has
//! one, and `RetryInfo` when the identity provider is unavailable ([`with_error_details`]).
//!
//! [`AuthLayer::disabled`] (for `ccm dev --insecure-no-auth`) skips step 2 and gives every
//! request [`Caller::anonymous_admin`], logging a loud warning once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use ccm_proto::v1::{AuthzRule, Role};
use ccm_proto::{AuthzDecision, authorize};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::authenticator::{Authenticator, Caller};
use crate::error::AuthError;

/// `ErrorInfo.domain` of the layer's rejections (the domain of every ccm error).
pub const ERROR_DOMAIN: &str = "ccm";
/// Header carrying the request id (set by the server middleware before this layer runs).
const REQUEST_ID_HEADER: &str = "x-request-id";
/// `RetryInfo.retry_delay` of an `UNAVAILABLE` rejection (the identity provider is down).
pub const UNAVAILABLE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// `status` with `google.rpc` details: `ErrorInfo` (reason from the code, domain
/// [`ERROR_DOMAIN`], metadata `method` = `path` and `cause` if given), `RequestInfo` with
/// `request_id`, and `RetryInfo` for `UNAVAILABLE`. The code, message and metadata (the
/// `www-authenticate` challenge) are kept.
pub fn with_error_details(
    status: &tonic::Status,
    path: &str,
    cause: Option<&str>,
    request_id: Option<&str>,
) -> tonic::Status {
    let reason = match status.code() {
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::Internal => "INTERNAL",
        _ => "UNKNOWN",
    };
    let mut metadata = HashMap::from([("method".to_owned(), path.to_owned())]);
    if let Some(cause) = cause {
        metadata.insert("cause".to_owned(), cause.to_owned());
    }
    let mut details = tonic_types::ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    if let Some(id) = request_id {
        details.set_request_info(id, "");
    }
    if status.code() == tonic::Code::Unavailable {
        details.set_retry_info(Some(UNAVAILABLE_RETRY_DELAY));
    }
    <tonic::Status as tonic_types::StatusExt>::with_error_details_and_metadata(
        status.code(),
        status.message(),
        details,
        status.metadata().clone(),
    )
}

/// gRPC path prefixes served without authentication: health checking and server reflection
/// (both versions). Everything else needs a token and a rule.
pub const PUBLIC_METHOD_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What an authorized caller may touch, per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// True when the RPC is owner-scoped and the caller holds none of admin, manager, service:
    /// the handler must act only on resources with `owner_id == caller.subject` (lists filtered,
    /// other resources answer `NOT_FOUND`).
    pub own_only: bool,
}

impl Access {
    /// Access to every resource.
    pub const ALL: Self = Self { own_only: false };

    /// Whether `caller` may act on a resource owned by `owner_id` under this access.
    pub fn permits(&self, caller: &Caller, owner_id: &str) -> bool {
        !self.own_only || caller.subject == owner_id
    }
}

/// The `(ccm.v1.authz)` rule of every RPC of the contracts, by gRPC path.
#[derive(Debug, Clone, Default)]
pub struct RbacTable {
    rules: HashMap<String, AuthzRule>,
}

impl RbacTable {
    /// The table of every `ccm.v1` RPC, read from [`ccm_proto::descriptor_pool`].
    pub fn from_descriptors() -> Self {
        Self::from_rules(ccm_proto::all_method_authz())
    }

    /// A table of the given `(gRPC path, rule)` pairs.
    pub fn from_rules(rules: impl IntoIterator<Item = (String, AuthzRule)>) -> Self {
        Self {
            rules: rules.into_iter().collect(),
        }
    }

    /// The rule of the method at `path`, if it has one.
    pub fn rule(&self, path: &str) -> Option<&AuthzRule> {
        self.rules.get(path)
    }

    /// Number of methods with a rule.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when no method has a rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The decision for a caller holding `roles` calling `path`; `Denied` when the method has
    /// no rule.
    pub fn decide(&self, path: &str, roles: &[Role]) -> AuthzDecision {
        self.rule(path)
            .map_or(AuthzDecision::Denied, |rule| authorize(rule, roles))
    }
}

/// The `PERMISSION_DENIED` message for `rule`: "requires one of roles: admin, manager".
pub fn denied_message(rule: &AuthzRule) -> String {
    let names: Vec<&str> = rule
        .roles()
        .filter(|r| *r != Role::Unspecified)
        .map(Role::claim)
        .collect();
    format!("requires one of roles: {}", names.join(", "))
}

/// The outcome of admitting a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A public path: no authentication, nothing in the extensions.
    Public,
    /// An authenticated, authorized caller.
    Granted {
        /// Who calls.
        caller: Caller,
        /// What it may touch.
        access: Access,
    },
}

enum Mode {
    Enforce(Authenticator),
    Disabled { warned: AtomicBool },
}

struct Shared {
    mode: Mode,
    table: RbacTable,
    public_prefixes: Vec<String>,
}

/// The tower layer producing [`AuthService`]s; cheap to clone.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("disabled", &self.is_disabled())
            .field("rules", &self.shared.table.len())
            .field("public_prefixes", &self.shared.public_prefixes)
            .finish()
    }
}

impl AuthLayer {
    /// Enforces tokens validated by `authenticator` and the contracts' rules.
    pub fn new(authenticator: Authenticator) -> Self {
        Self::build(Mode::Enforce(authenticator), RbacTable::from_descriptors())
    }

    /// No authentication: every request is [`Caller::anonymous_admin`] (rules still apply, so
    /// unknown methods stay denied). Only for `ccm dev` bound to loopback.
    pub fn disabled() -> Self {
        Self::build(
            Mode::Disabled {
                warned: AtomicBool::new(false),
            },
            RbacTable::from_descriptors(),
        )
    }

    fn build(mode: Mode, table: RbacTable) -> Self {
        Self {
            shared: Arc::new(Shared {
                mode,
                table,
                public_prefixes: PUBLIC_METHOD_PREFIXES
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
            }),
        }
    }

    /// The same layer with `table` instead of the contracts' rules (tests, other contracts).
    pub fn with_table(self, table: RbacTable) -> Self {
        self.rebuild(|shared| shared.table = table)
    }

    /// The same layer with `prefixes` as the public allow-list instead of
    /// [`PUBLIC_METHOD_PREFIXES`].
    pub fn with_public_prefixes<I, P>(self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let prefixes: Vec<String> = prefixes.into_iter().map(Into::into).collect();
        self.rebuild(|shared| shared.public_prefixes = prefixes)
    }

    fn rebuild(self, change: impl FnOnce(&mut Shared)) -> Self {
        let Shared {
            mode,
            table,
            public_prefixes,
        } = match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared,
            Err(shared) => Shared {
                mode: match &shared.mode {
                    Mode::Enforce(a) => Mode::Enforce(a.clone()),
                    Mode::Disabled { .. } => Mode::Disabled {
                        warned: AtomicBool::new(false),
                    },
                },
                table: shared.table.clone(),
                public_prefixes: shared.public_prefixes.clone(),
            },
        };
        let mut shared = Shared {
            mode,
            table,
            public_prefixes,
        };
        change(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// True in the `disabled` mode.
    pub fn is_disabled(&self) -> bool {
        matches!(self.shared.mode, Mode::Disabled { .. })
    }

    /// The rules enforced.
    pub fn table(&self) -> &RbacTable {
        &self.shared.table
    }

    /// True when `path` is on the public allow-list.
    pub fn is_public(&self, path: &str) -> bool {
        self.shared
            .public_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }

    /// Admits a call of gRPC `path` with `authorization` (the header value, `None` when absent).
    /// Also usable by an HTTP gateway that maps its routes to gRPC paths.
    pub async fn admit(
        &self,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<Admission, tonic::Status> {
        if self.is_public(path) {
            return Ok(Admission::Public);
        }
        let caller = match &self.shared.mode {
            Mode::Enforce(authenticator) => match authenticator.authenticate(authorization).await {
                Ok(caller) => caller,
                Err(err) => {
                    if matches!(err, AuthError::IssuerUnavailable(_)) {
                        tracing::warn!(error = %err, "cannot authenticate: issuer unavailable");
                    } else {
                        tracing::debug!(error = %err, "unauthenticated");
                    }
                    return Err(err.to_status());
                }
            },
            Mode::Disabled { warned } => {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "AUTHENTICATION IS DISABLED (--insecure-no-auth): every request runs as \
                         an anonymous admin. Never expose this server beyond loopback."
                    );
                }
                Caller::anonymous_admin()
            }
        };
        let Some(rule) = self.shared.table.rule(path) else {
            tracing::info!(subject = %caller.subject, "denied: method has no authorization rule");
            return Err(tonic::Status::permission_denied(format!(
                "method {path} has no authorization rule"
            )));
        };
        match authorize(rule, &caller.roles) {
            AuthzDecision::Denied => {
                tracing::debug!(subject = %caller.subject, roles = ?caller.roles, "denied by role");
                Err(tonic::Status::permission_denied(denied_message(rule)))
            }
            decision => {
                let access = Access {
                    own_only: decision == AuthzDecision::OwnResourcesOnly,
                };
                tracing::debug!(subject = %caller.subject, own_only = access.own_only, "granted");
                Ok(Admission::Granted { caller, access })
            }
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of an [`AuthLayer`], in front of a tonic server's routes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> std::fmt::Debug for AuthService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

/// A trailers-only gRPC response carrying `status`.
pub fn status_response<B: Default>(status: &tonic::Status) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if status.add_header(response.headers_mut()).is_err() {
        // Only a message that cannot be encoded gets here; answer with the bare code.
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    response
}

impl<S, B, ResBody> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; keep the ready one for this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let path = request.uri().path().to_owned();
        let span = tracing::debug_span!("auth", path = %path);
        Box::pin(
            async move {
                let authorization = match request.headers().get(http::header::AUTHORIZATION) {
                    None => Ok(None),
                    Some(value) => value.to_str().map(Some).map_err(|_| {
                        AuthError::Malformed("authorization is not visible ASCII".into())
                    }),
                };
                let admission = match authorization {
                    Ok(authorization) => layer.admit(&path, authorization).await,
                    Err(err) => Err(err.to_status()),
                };
                let request_id = request
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                match admission {
                    Ok(Admission::Public) => inner.call(request).await,
                    Ok(Admission::Granted { caller, access }) => {
                        request.extensions_mut().insert(caller);
                        request.extensions_mut().insert(access);
                        inner.call(request).await
                    }
                    Err(status) => {
                        let cause = (status.code() == tonic::Code::Unauthenticated)
                            .then(|| token_error_cause(&status));
                        Ok(status_response(&with_error_details(
                            &status,
                            &path,
                            cause.as_deref(),
                            request_id.as_deref(),
                        )))
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// The RFC 6750 `error_description` of an `UNAUTHENTICATED` status's challenge ("token
/// expired", …), or its message.
fn token_error_cause(status: &tonic::Status) -> String {
    let message = status.message();
    message
        .split("error_description=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or(message)
        .to_owned()
}

/// The authenticated caller of a request that went through an [`AuthLayer`].
pub fn caller_from_request<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

/// The [`Access`] of a request that went through an [`AuthLayer`].
pub fn access_from_request<T>(request: &tonic::Request<T>) -> Option<Access> {
    request.extensions().get::<Access>().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_and_denial_messages() {
        let mut caller = Caller::anonymous_admin();
        caller.subject = "u-1".into();
        assert!(Access::ALL.permits(&caller, "someone-else"));
        let own = Access { own_only: true };
        assert!(own.permits(&caller, "u-1"));
        assert!(!own.permits(&caller, "u-2"));
        let rule = AuthzRule {
            roles: vec![
                Role::Admin as i32,
                Role::Unspecified as i32,
                Role::Manager as i32,
            ],
            owner_scoped: false,
        };
        assert_eq!(
            denied_message(&rule),
            "requires one of roles: admin, manager"
        );
    }

    #[test]
    fn public_prefixes_are_configurable() {
        let layer = AuthLayer::disabled();
        assert!(layer.is_public("/grpc.health.v1.Health/Check"));
        assert!(layer.is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!layer.is_public("/grpc.health.v1.HealthX/Check"));
        assert!(!layer.is_public("/ccm.v1.TemplateService/GetTemplate"));
        let layer = layer.with_public_prefixes(["/ccm.v1.TemplateService/"]);
        assert!(layer.is_public("/ccm.v1.TemplateService/GetTemplate"));
        assert!(!layer.is_public("/grpc.health.v1.Health/Check"));
        assert!(layer.is_disabled());
        let empty = layer.with_table(RbacTable::default());
        assert!(empty.table().is_empty());
        assert_eq!(
            empty
                .table()
                .decide("/ccm.v1.TemplateService/GetTemplate", &[Role::Admin]),
            AuthzDecision::Denied
        );
    }
}
