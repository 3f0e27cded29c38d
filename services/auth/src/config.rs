//! What the [`Authenticator`](crate::Authenticator) checks, and its defaults.

use std::time::Duration;

/// Clock skew tolerated on `exp` and `nbf`: a token is accepted up to 30 s after `exp` and from
/// 30 s before `nbf`. Keycloak access tokens live minutes (25 min in the legacy realm), so this
/// is small against a lifetime, yet covers hosts whose clocks drift a little.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Minimum time between two JWKS fetches triggered by tokens with an unknown `kid` (or retried
/// after a failed fetch). Within it, unknown `kid`s are rejected without contacting the issuer,
/// so a flood of tokens with made-up `kid`s costs the issuer at most one request per interval.
/// A genuine key rotation is picked up by the first token after the interval.
pub const MIN_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// How long a fetched JWKS is used before it is fetched again on the next token (the legacy
/// service cached it for an hour). If that fetch fails, the cached keys keep working.
pub const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// Timeout of one HTTP request to the issuer (discovery, JWKS, token endpoint).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest bearer token accepted, in bytes. Keycloak tokens are 1–3 KiB; anything far larger is
/// rejected as malformed before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The path of the OIDC discovery document under the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Settings of an [`Authenticator`](crate::Authenticator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The issuer URL, compared verbatim with `iss` (Keycloak:
    /// `https://HOST/realms/REALM`). The discovery document is
    /// `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// Accepted audiences: a token is accepted when its `aud` names at least one. Must not be
    /// empty. With Keycloak, an audience mapper puts the API's client id in `aud`.
    pub audiences: Vec<String>,
    /// The JWKS URL; `None` = the `jwks_uri` of the discovery document.
    pub jwks_url: Option<String>,
    /// Also take roles from `resource_access.<client>.roles` for this client id (Keycloak client
    /// roles); `None` = realm roles (`realm_access.roles`) only.
    pub client_roles_of: Option<String>,
    /// Clock skew tolerated on `exp` / `nbf` (whole seconds). Default [`DEFAULT_LEEWAY`].
    pub leeway: Duration,
    /// Default [`MIN_JWKS_REFRESH_INTERVAL`].
    pub min_jwks_refresh_interval: Duration,
    /// Default [`DEFAULT_JWKS_MAX_AGE`].
    pub jwks_max_age: Duration,
    /// Default [`DEFAULT_HTTP_TIMEOUT`].
    pub http_timeout: Duration,
}

impl AuthConfig {
    /// A configuration for `issuer` accepting `audiences`, with every other setting at its
    /// default.
    pub fn new<I, A>(issuer: impl Into<String>, audiences: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        Self {
            issuer: issuer.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            jwks_url: None,
            client_roles_of: None,
            leeway: DEFAULT_LEEWAY,
            min_jwks_refresh_interval: MIN_JWKS_REFRESH_INTERVAL,
            jwks_max_age: DEFAULT_JWKS_MAX_AGE,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }

    /// The discovery document URL.
    pub fn discovery_url(&self) -> String {
        format!("{}{DISCOVERY_PATH}", self.issuer.trim_end_matches('/'))
    }
}
