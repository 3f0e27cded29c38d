//! Bearer-token validation: RS256 JWTs from the configured OIDC issuer → [`Caller`].

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ccm_proto::v1::Role;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{AuthConfig, MAX_TOKEN_BYTES};
use crate::error::AuthError;
use crate::jwks::JwksCache;

/// The only signature algorithm accepted.
pub const ACCEPTED_ALGORITHM: &str = "RS256";

/// The `sub` of the caller every request gets when auth is disabled (`--insecure-no-auth`).
pub const ANONYMOUS_SUBJECT: &str = "anonymous";

/// Who is calling, from a validated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The token's `sub`: the stable user (or service account) id, compared with `owner_id`.
    pub subject: String,
    /// The token's `preferred_username`, when present.
    pub username: Option<String>,
    /// The ccm roles among the token's roles, sorted, without duplicates; role names ccm does
    /// not know (Keycloak's `offline_access`, `uma_authorization`, …) are ignored.
    pub roles: Vec<Role>,
    /// Every claim of the token, as sent.
    pub claims: Map<String, Value>,
}

impl Caller {
    /// True when the caller holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// A name for logs and audit records: the username, or the subject.
    pub fn display_name(&self) -> &str {
        self.username.as_deref().unwrap_or(&self.subject)
    }

    /// The caller of every request when auth is disabled: subject [`ANONYMOUS_SUBJECT`] with the
    /// admin role, and the service role so that the in-process scheduler and controller reach
    /// `InternalService` too.
    pub fn anonymous_admin() -> Self {
        Self {
            subject: ANONYMOUS_SUBJECT.to_owned(),
            username: Some(ANONYMOUS_SUBJECT.to_owned()),
            roles: vec![Role::Admin, Role::Service],
            claims: Map::new(),
        }
    }
}

/// The token of an `authorization` value `Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            let token = token.trim();
            if token.is_empty() {
                Err(AuthError::Malformed("empty bearer token".into()))
            } else {
                Ok(token)
            }
        }
        _ => Err(AuthError::Malformed(
            "authorization is not a Bearer credential".into(),
        )),
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

/// Reads the header without trusting it: `alg` must be RS256 and a `kid` must name the key.
fn read_header(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("not a three-part JWS".into()));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| AuthError::Malformed(format!("header is not base64url: {e}")))?;
    let header: RawHeader = serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(format!("header is not a JSON object: {e}")))?;
    let alg = header.alg.unwrap_or_default();
    if alg != ACCEPTED_ALGORITHM {
        return Err(AuthError::DisallowedAlgorithm(alg));
    }
    if header.crit.is_some() {
        return Err(AuthError::Malformed("critical header extensions".into()));
    }
    header
        .kid
        .filter(|k| !k.is_empty())
        .ok_or_else(|| AuthError::Malformed("header has no kid".into()))
}

/// Reads `iss` without verifying anything, so that tokens of another issuer are turned away
/// before they can cause a JWKS fetch.
fn unverified_issuer(token: &str) -> Result<Option<String>, AuthError> {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| AuthError::Malformed(format!("payload is not base64url: {e}")))?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(format!("payload is not a JSON object: {e}")))?;
    Ok(claims.get("iss").and_then(Value::as_str).map(str::to_owned))
}

/// The strings of the array at `path` in `claims` (empty when absent or not an array).
fn role_names<'a>(claims: &'a Map<String, Value>, path: &[&str]) -> Vec<&'a str> {
    let Some((first, rest)) = path.split_first() else {
        return Vec::new();
    };
    let mut node = claims.get(*first);
    for step in rest {
        node = node.and_then(|n| n.get(*step));
    }
    node.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn map_jwt_error(err: &jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm => AuthError::DisallowedAlgorithm("?".into()),
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Malformed(format!("missing claim {claim}"))
        }
        ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => AuthError::InvalidSignature,
        _ => AuthError::Malformed(err.to_string()),
    }
}

struct Inner {
    config: AuthConfig,
    jwks: JwksCache,
    validation: Validation,
}

/// Validates bearer tokens of one OIDC issuer. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.inner.config.issuer)
            .field("audiences", &self.inner.config.audiences)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `config`. Contacts nobody: the JWKS is fetched with the first token
    /// (or by [`Authenticator::refresh_keys`]).
    pub fn new(config: AuthConfig) -> Result<Self, AuthError> {
        if config.issuer.trim().is_empty() {
            return Err(AuthError::Config("issuer is empty".into()));
        }
        if config.audiences.iter().all(|a| a.trim().is_empty()) {
            return Err(AuthError::Config(
                "at least one accepted audience is required".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(config.http_timeout)
            .build()
            .map_err(|e| AuthError::Config(format!("HTTP client: {e}")))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(Self {
            inner: Arc::new(Inner {
                jwks: JwksCache::new(http, config.clone()),
                config,
                validation,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AuthConfig {
        &self.inner.config
    }

    /// Fetches the issuer's JWKS now; returns how many signing keys it holds.
    pub async fn refresh_keys(&self) -> Result<usize, AuthError> {
        self.inner.jwks.refresh().await
    }

    /// Authenticates an `authorization` value (`Bearer <token>`; `None` when absent).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer_token(authorization)?;
        self.validate(token).await
    }

    /// Validates a token: RS256 signature by a key of the issuer's JWKS, `iss`, `aud`, `exp`,
    /// `nbf` (with the leeway), `sub`; then reads the roles.
    #[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
    pub async fn validate(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed(format!(
                "token longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let kid = read_header(token)?;
        if unverified_issuer(token)?.as_deref() != Some(self.inner.config.issuer.as_str()) {
            return Err(AuthError::WrongIssuer);
        }
        let key = self.inner.jwks.key(&kid).await?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.inner.validation)
            .map_err(|e| map_jwt_error(&e))?;
        let caller = self.caller_from_claims(data.claims)?;
        tracing::debug!(subject = %caller.subject, roles = ?caller.roles, "token accepted");
        Ok(caller)
    }

    fn caller_from_claims(&self, claims: Map<String, Value>) -> Result<Caller, AuthError> {
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Malformed("sub is not a non-empty string".into()))?
            .to_owned();
        let username = claims
            .get("preferred_username")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut names = role_names(&claims, &["realm_access", "roles"]);
        if let Some(client) = &self.inner.config.client_roles_of {
            names.extend(role_names(
                &claims,
                &["resource_access", client.as_str(), "roles"],
            ));
        }
        let roles: HashSet<Role> = names.into_iter().filter_map(Role::from_claim).collect();
        let mut roles: Vec<Role> = roles.into_iter().collect();
        roles.sort();
        Ok(Caller {
            subject,
            username,
            roles,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(None), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("  ")), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Ok("abc"));
        assert!(matches!(
            bearer_token(Some("Basic dXNlcjpwdw==")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            bearer_token(Some("Bearer ")),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            bearer_token(Some("abc")),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn header_checks() {
        let enc = |v: &str| URL_SAFE_NO_PAD.encode(v);
        let tok = |h: &str| format!("{}.{}.sig", enc(h), enc("{}"));
        assert_eq!(
            read_header(&tok(r#"{"alg":"RS256","kid":"k1"}"#)),
            Ok("k1".into())
        );
        assert_eq!(
            read_header(&tok(r#"{"alg":"none","kid":"k1"}"#)),
            Err(AuthError::DisallowedAlgorithm("none".into()))
        );
        assert_eq!(
            read_header(&tok(r#"{"alg":"HS256","kid":"k1"}"#)),
            Err(AuthError::DisallowedAlgorithm("HS256".into()))
        );
        assert_eq!(
            read_header(&tok(r#"{"kid":"k1"}"#)),
            Err(AuthError::DisallowedAlgorithm(String::new()))
        );
        assert!(matches!(
            read_header(&tok(r#"{"alg":"RS256"}"#)),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            read_header(&tok(r#"{"alg":"RS256","kid":"k","crit":["x"]}"#)),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(read_header("a.b"), Err(AuthError::Malformed(_))));
        assert!(matches!(
            read_header("a.b.c.d"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            read_header("!!!.b.c"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn config_is_checked() {
        assert!(matches!(
            Authenticator::new(AuthConfig::new("", ["a"])),
            Err(AuthError::Config(_))
        ));
        assert!(matches!(
            Authenticator::new(AuthConfig::new("http://i", Vec::<String>::new())),
            Err(AuthError::Config(_))
        ));
        assert!(Authenticator::new(AuthConfig::new("http://i", ["a"])).is_ok());
    }
}
