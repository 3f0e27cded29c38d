//! The crate's error type and how each error answers a caller (gRPC status, HTTP status, RFC 6750
//! `WWW-Authenticate` challenge).

use tonic::metadata::MetadataValue;

/// The `realm` parameter of every `WWW-Authenticate: Bearer` challenge.
pub const CHALLENGE_REALM: &str = "ccm";

/// The metadata key (gRPC) / header (HTTP) that carries the challenge.
pub const WWW_AUTHENTICATE: &str = "www-authenticate";

/// Why a caller could not be authenticated, or a token could not be obtained.
///
/// Token problems answer gRPC `UNAUTHENTICATED` / HTTP 401 with an RFC 6750 challenge
/// (`Bearer realm="ccm", error="invalid_token", error_description="token expired"`); an identity
/// provider that cannot be reached answers `UNAVAILABLE` / 503 (the token may be fine: the
/// caller should retry, not log in again). The `String` details are for logs; the challenge
/// carries only fixed descriptions, never text taken from the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header / metadata entry.
    #[error("missing bearer token")]
    Missing,
    /// Not a `Bearer` credential, or not a well-formed JWT (shape, base64, JSON, required claims).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not verify with the issuer's key named by `kid`.
    #[error("invalid token signature")]
    InvalidSignature,
    /// The header's `alg` is not RS256 (`none`, HS256, …).
    #[error("token algorithm {0:?} is not accepted (RS256 only)")]
    DisallowedAlgorithm(String),
    /// The header's `kid` is not in the issuer's JWKS, even after a refresh.
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    /// `iss` is missing or is not the configured issuer.
    #[error("token issuer is not the configured issuer")]
    WrongIssuer,
    /// `aud` is missing or names none of the configured audiences.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// The issuer's discovery document or JWKS could not be fetched.
    #[error("identity provider unavailable: {0}")]
    IssuerUnavailable(String),
    /// The token endpoint refused a client-credentials request.
    #[error("token request rejected: {0}")]
    TokenRequestRejected(String),
    /// The configuration is unusable (no audience, bad URL, …).
    #[error("invalid auth configuration: {0}")]
    Config(String),
}

impl AuthError {
    /// The fixed, caller-facing description of this error (RFC 6750 `error_description`).
    pub fn description(&self) -> &'static str {
        match self {
            Self::Missing => "missing bearer token",
            Self::Malformed(_) => "malformed token",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::InvalidSignature => "invalid token signature",
            Self::DisallowedAlgorithm(_) => "token algorithm not accepted",
            Self::UnknownKey(_) => "unknown signing key",
            Self::WrongIssuer => "wrong token issuer",
            Self::WrongAudience => "wrong token audience",
            Self::IssuerUnavailable(_) => "cannot verify token: identity provider unavailable",
            Self::TokenRequestRejected(_) => "service token request rejected",
            Self::Config(_) => "authentication is misconfigured",
        }
    }

    /// True for errors that are the token's (or its absence's) fault: these answer
    /// `UNAUTHENTICATED` / 401 with a challenge.
    pub fn is_token_error(&self) -> bool {
        !matches!(
            self,
            Self::IssuerUnavailable(_) | Self::TokenRequestRejected(_) | Self::Config(_)
        )
    }

    /// The RFC 6750 `WWW-Authenticate` challenge for token errors; `None` otherwise.
    ///
    /// A missing token gets no `error` code (RFC 6750 §3.1), only the realm and a description.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            Self::Missing => Some(format!(
                "Bearer realm=\"{CHALLENGE_REALM}\", error_description=\"{}\"",
                self.description()
            )),
            _ if self.is_token_error() => Some(format!(
                "Bearer realm=\"{CHALLENGE_REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                self.description()
            )),
            _ => None,
        }
    }

    /// The gRPC status code: `UNAUTHENTICATED` for token errors, `UNAVAILABLE` when the identity
    /// provider cannot be reached, `INTERNAL` for configuration errors.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::IssuerUnavailable(_) => tonic::Code::Unavailable,
            Self::Config(_) => tonic::Code::Internal,
            _ => tonic::Code::Unauthenticated,
        }
    }

    /// The HTTP status for the gateway: 401, 503 or 500, matching [`AuthError::code`].
    pub fn http_status(&self) -> http::StatusCode {
        match self.code() {
            tonic::Code::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// The gRPC status answering this error: [`AuthError::code`], the challenge (or the
    /// description when there is none) as message, and the challenge again as `www-authenticate`
    /// metadata.
    pub fn to_status(&self) -> tonic::Status {
        let challenge = self.www_authenticate();
        let message = challenge
            .clone()
            .unwrap_or_else(|| self.description().to_owned());
        let mut status = tonic::Status::new(self.code(), message);
        if let Some(value) = challenge.and_then(|c| MetadataValue::try_from(c.as_str()).ok()) {
            status.metadata_mut().insert(WWW_AUTHENTICATE, value);
        }
        status
    }
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        err.to_status()
    }
}

impl From<&AuthError> for tonic::Status {
    fn from(err: &AuthError) -> Self {
        err.to_status()
    }
}
