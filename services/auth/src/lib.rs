//! # ccm-auth — who is calling, and may they
//!
//! - [`Authenticator`]: validates OIDC bearer tokens (Keycloak in production): RS256 only,
//!   signature by a key of the issuer's JWKS (found by OIDC discovery or configured, cached,
//!   refreshed on an unknown `kid` at most once per [`MIN_JWKS_REFRESH_INTERVAL`]), `iss`,
//!   `aud`, `exp`/`nbf` with [`DEFAULT_LEEWAY`]; roles from `realm_access.roles` (optionally
//!   `resource_access.<client>.roles`) → [`Caller`].
//! - [`AuthLayer`] / [`AuthService`]: a tower layer for tonic servers enforcing the
//!   `(ccm.v1.authz)` rules of the contracts ([`RbacTable`], [`ccm_proto::authorize`]); handlers
//!   read [`caller_from_request`] and [`access_from_request`] (owner scoping).
//! - [`ServiceTokenSource`] / [`ServiceTokenInterceptor`]: client-credentials tokens for the
//!   scheduler and controller, cached, refreshed before expiry, added to outgoing calls.
//!
//! Errors ([`AuthError`]) map to gRPC `UNAUTHENTICATED` with an RFC 6750 `www-authenticate`
//! challenge, except an unreachable identity provider, which is `UNAVAILABLE` (retry later; the
//! token may well be valid). A caller without a suitable role gets `PERMISSION_DENIED`
//! "requires one of roles: …".

#![warn(missing_docs)]

mod authenticator;
mod client;
mod config;
mod error;
mod jwks;
mod layer;

pub use authenticator::{
    ACCEPTED_ALGORITHM, ANONYMOUS_SUBJECT, Authenticator, Caller, bearer_token,
};
pub use client::{
    ClientCredentials, DEFAULT_TOKEN_LIFETIME, MAX_REFRESH_RETRY_DELAY, REFRESH_RETRY_DELAY,
    RefreshTask, ServiceTokenInterceptor, ServiceTokenSource, TOKEN_REFRESH_MARGIN,
};
pub use config::{
    AuthConfig, DEFAULT_HTTP_TIMEOUT, DEFAULT_JWKS_MAX_AGE, DEFAULT_LEEWAY, DISCOVERY_PATH,
    MAX_TOKEN_BYTES, MIN_JWKS_REFRESH_INTERVAL,
};
pub use error::{AuthError, CHALLENGE_REALM, WWW_AUTHENTICATE};
pub use layer::{
    Access, Admission, AuthLayer, AuthService, ERROR_DOMAIN, PUBLIC_METHOD_PREFIXES, RbacTable,
    UNAVAILABLE_RETRY_DELAY, access_from_request, caller_from_request, denied_message,
    status_response, with_error_details,
};
