//! Browser login with OIDC: authorization code + PKCE (S256), state and nonce checked, tokens
//! kept server-side in a [`crate::session`], RP-initiated logout at the issuer.
//!
//! - `GET /auth/login?return_to=/path` → 303 to the issuer's authorize endpoint.
//! - `GET /auth/callback?code&state` → code exchange (with the PKCE verifier), the access token
//!   and id token validated (signature, issuer, audience, expiry; the id token's nonce), a
//!   session created, its cookie set, 303 to `return_to`.
//! - `GET|POST /auth/logout` → session deleted, cookie cleared, 303 to the issuer's
//!   end-session endpoint (`id_token_hint`, `post_logout_redirect_uri`), or to `/`.
//! - `GET /auth/session` → who is logged in: subject, username, roles, expiries; 401 without.

use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ccm_auth::{AuthConfig, Authenticator, Caller};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::OidcSettings;
use crate::error::GatewayError;
use crate::problem::Problem;
use crate::server::SharedState;
use crate::session::{
    self, LOGIN_STATE_TTL, PendingLogin, Session, now_secs, random_token, session_cookie,
    unauthenticated,
};

/// Timeout of one request to the issuer (discovery, token endpoint).
pub const ISSUER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `return_to` accepted.
pub const MAX_RETURN_TO: usize = 2048;

/// The parts of the discovery document the login uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    /// `authorization_endpoint`.
    pub authorization_endpoint: String,
    /// `token_endpoint`.
    pub token_endpoint: String,
    /// `end_session_endpoint` (RP-initiated logout), when the issuer has one.
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The OIDC client of the gateway.
pub struct Login {
    settings: OidcSettings,
    http: reqwest::Client,
    discovery: OnceCell<Discovery>,
    access: Authenticator,
    id: Authenticator,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("issuer", &self.settings.issuer_url)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// The PKCE S256 challenge of `verifier`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl Login {
    /// A client for `settings` (the issuer is contacted on first use).
    pub fn new(settings: OidcSettings) -> Result<Self, GatewayError> {
        let auth = |aud: &str| {
            Authenticator::new(AuthConfig::new(settings.issuer_url.clone(), [aud]))
                .map_err(|e| GatewayError::Config(format!("OIDC: {e}")))
        };
        let access = auth(&settings.audience)?;
        let id = auth(&settings.client_id)?;
        let http = reqwest::Client::builder()
            .timeout(ISSUER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GatewayError::Oidc(format!("HTTP client: {e}")))?;
        Ok(Self {
            settings,
            http,
            discovery: OnceCell::new(),
            access,
            id,
        })
    }

    /// The issuer's discovery document (fetched once).
    pub async fn discovery(&self) -> Result<&Discovery, GatewayError> {
        self.discovery
            .get_or_try_init(|| async {
                let url = format!("{}{}", self.settings.issuer_url, ccm_auth::DISCOVERY_PATH);
                let response = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| GatewayError::Oidc(format!("discovery {url}: {e}")))?;
                if !response.status().is_success() {
                    return Err(GatewayError::Oidc(format!(
                        "discovery {url}: HTTP {}",
                        response.status()
                    )));
                }
                response
                    .json::<Discovery>()
                    .await
                    .map_err(|e| GatewayError::Oidc(format!("discovery {url}: {e}")))
            })
            .await
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<TokenResponse, GatewayError> {
        let discovery = self.discovery().await?;
        let mut form: Vec<(&str, &str)> = form.to_vec();
        let mut request = self.http.post(&discovery.token_endpoint);
        match &self.settings.client_secret {
            Some(secret) => {
                request = request.basic_auth(&self.settings.client_id, Some(secret));
            }
            None => form.push(("client_id", &self.settings.client_id)),
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| GatewayError::Oidc(format!("token endpoint: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(GatewayError::Oidc(format!(
                "token endpoint answered {status}: {body}"
            )));
        }
        response
            .json::<TokenResponse>()
            .await
            .map_err(|e| GatewayError::Oidc(format!("token endpoint: {e}")))
    }

    async fn session_from(
        &self,
        tokens: TokenResponse,
        previous: Option<&Session>,
        session_ttl: Duration,
    ) -> Result<(Session, Caller), GatewayError> {
        let caller = self
            .access
            .validate(&tokens.access_token)
            .await
            .map_err(|e| GatewayError::Oidc(format!("access token rejected: {e}")))?;
        let now = now_secs();
        let access_expires_at = caller
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .or_else(|| tokens.expires_in.map(|s| now + s))
            .unwrap_or(now);
        let session = Session {
            subject: caller.subject.clone(),
            username: caller.username.clone(),
            roles: caller.roles.iter().map(|r| r.claim().to_owned()).collect(),
            access_token: tokens.access_token,
            refresh_token: tokens
                .refresh_token
                .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
            id_token: tokens
                .id_token
                .or_else(|| previous.and_then(|p| p.id_token.clone())),
            access_expires_at,
            expires_at: previous
                .map(|p| p.expires_at)
                .unwrap_or(now + session_ttl.as_secs()),
        };
        Ok((session, caller))
    }

    /// A session with a fresh access token, from the session's refresh token.
    pub async fn refresh(&self, session: &Session) -> Result<Session, GatewayError> {
        let refresh_token = session
            .refresh_token
            .as_deref()
            .ok_or_else(|| GatewayError::Oidc("the session has no refresh token".into()))?;
        let tokens = self
            .token_request(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .await?;
        let (fresh, _) = self
            .session_from(tokens, Some(session), Duration::ZERO)
            .await?;
        if fresh.subject != session.subject {
            return Err(GatewayError::Oidc(
                "the refreshed token names another subject".into(),
            ));
        }
        Ok(fresh)
    }

    /// Validates the access token of an `authorization` header (for `/auth/session`).
    pub async fn authenticate(&self, authorization: &str) -> Result<Caller, ccm_auth::AuthError> {
        self.access.authenticate(Some(authorization)).await
    }
}

fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_configured() -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "login-not-configured",
        "browser login is not configured on this gateway (no OIDC issuer)",
    )
    .into_response()
}

fn issuer_problem(e: &GatewayError) -> Problem {
    tracing::warn!(error = %e, "OIDC issuer request failed");
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "issuer-unavailable",
        format!("the identity provider could not complete the request: {e}"),
    )
}

/// A safe local `return_to`: a path starting with one `/` (no scheme, no `//host`).
fn safe_return_to(raw: Option<&str>) -> Result<String, Problem> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok("/".into());
    };
    let ok = raw.len() <= MAX_RETURN_TO
        && raw.starts_with('/')
        && !raw.starts_with("//")
        && !raw.starts_with("/\\")
        && !raw.chars().any(char::is_control);
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(Problem::field(
            "return_to",
            "must be a local path starting with a single '/'",
        ))
    }
}

/// Query of `/auth/login`.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    /// Where to go after the login (a local path; default `/`).
    pub return_to: Option<String>,
    /// Passed on to the issuer as the OIDC `login_hint` (pre-fills the user name).
    pub login_hint: Option<String>,
}

/// `GET /auth/login`.
pub(crate) async fn login(
    State(state): State<SharedState>,
    Query(query): Query<LoginQuery>,
) -> Response {
    let Some(login) = &state.login else {
        return not_configured();
    };
    let return_to = match safe_return_to(query.return_to.as_deref()) {
        Ok(r) => r,
        Err(p) => return p.with_instance("/auth/login").into_response(),
    };
    let discovery = match login.discovery().await {
        Ok(d) => d,
        Err(e) => return issuer_problem(&e).into_response(),
    };
    let login_state = random_token();
    let pending = PendingLogin {
        verifier: random_token(),
        nonce: random_token(),
        return_to,
    };
    let bytes = match serde_json::to_vec(&pending) {
        Ok(b) => b,
        Err(e) => return session::store_problem(e.to_string()).into_response(),
    };
    if let Err(e) = state
        .sessions
        .put(&session::login_key(&login_state), bytes, LOGIN_STATE_TTL)
        .await
    {
        return session::store_problem(e.to_string()).into_response();
    }
    let mut url = match url::Url::parse(&discovery.authorization_endpoint) {
        Ok(u) => u,
        Err(e) => {
            return issuer_problem(&GatewayError::Oidc(format!("authorization_endpoint: {e}")))
                .into_response();
        }
    };
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &login.settings.client_id)
        .append_pair("redirect_uri", &login.settings.redirect_url)
        .append_pair("scope", &login.settings.scopes)
        .append_pair("state", &login_state)
        .append_pair("nonce", &pending.nonce)
        .append_pair("code_challenge", &pkce_challenge(&pending.verifier))
        .append_pair("code_challenge_method", "S256");
    if let Some(hint) = query.login_hint.as_deref().filter(|h| !h.is_empty()) {
        url.query_pairs_mut().append_pair("login_hint", hint);
    }
    tracing::info!("login started; redirecting to the issuer");
    see_other(url.as_str())
}

/// Query of `/auth/callback`.
#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    /// The authorization code.
    pub code: Option<String>,
    /// The state sent at login.
    pub state: Option<String>,
    /// An OAuth error from the issuer.
    pub error: Option<String>,
    /// Its description.
    pub error_description: Option<String>,
}

/// `GET /auth/callback`.
pub(crate) async fn callback(
    State(state): State<SharedState>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    const PATH: &str = "/auth/callback";
    let Some(login) = &state.login else {
        return not_configured();
    };
    let Some(login_state) = query.state.filter(|s| !s.is_empty()) else {
        return Problem::field("state", "missing")
            .with_instance(PATH)
            .into_response();
    };
    let pending = match state.sessions.take(&session::login_key(&login_state)).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<PendingLogin>(&bytes) {
            Ok(p) => p,
            Err(e) => return session::store_problem(e.to_string()).into_response(),
        },
        Ok(None) => {
            return Problem::field(
                "state",
                "unknown or expired login state; start again at /auth/login",
            )
            .with_instance(PATH)
            .into_response();
        }
        Err(e) => return session::store_problem(e.to_string()).into_response(),
    };
    if let Some(error) = query.error {
        let detail = match query.error_description {
            Some(d) => format!("the identity provider refused the login: {error}: {d}"),
            None => format!("the identity provider refused the login: {error}"),
        };
        return unauthenticated(&detail).with_instance(PATH).into_response();
    }
    let Some(code) = query.code.filter(|c| !c.is_empty()) else {
        return Problem::field("code", "missing")
            .with_instance(PATH)
            .into_response();
    };
    let tokens = match login
        .token_request(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &login.settings.redirect_url),
            ("code_verifier", &pending.verifier),
        ])
        .await
    {
        Ok(t) => t,
        Err(e) => return issuer_problem(&e).with_instance(PATH).into_response(),
    };
    let Some(id_token) = tokens.id_token.clone() else {
        return unauthenticated("the identity provider returned no id token")
            .with_instance(PATH)
            .into_response();
    };
    let id_claims = match login.id.validate(&id_token).await {
        Ok(c) => c,
        Err(e) => {
            return unauthenticated(&format!("the id token was rejected: {e}"))
                .with_instance(PATH)
                .into_response();
        }
    };
    if id_claims.claims.get("nonce").and_then(|v| v.as_str()) != Some(pending.nonce.as_str()) {
        return unauthenticated("the id token's nonce does not match the login")
            .with_instance(PATH)
            .into_response();
    }
    let (session, caller) = match login
        .session_from(tokens, None, state.settings.session_ttl)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return unauthenticated(&e.to_string())
                .with_instance(PATH)
                .into_response();
        }
    };
    if caller.subject != id_claims.subject {
        return unauthenticated("the access token and id token name different subjects")
            .with_instance(PATH)
            .into_response();
    }
    let id = random_token();
    if let Err(p) = session::save(state.sessions.as_ref(), &id, &session).await {
        return p.into_response();
    }
    tracing::info!(subject = %session.subject, roles = ?session.roles, "login completed; session created");
    let mut response = see_other(&pending.return_to);
    let cookie = session_cookie(
        &id,
        state.settings.session_ttl,
        state.settings.cookie_secure,
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `GET|POST /auth/logout`.
pub(crate) async fn logout(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let mut id_token = None;
    if let Some(id) = session::cookie_session_id(&headers) {
        let key = session::session_key(&id);
        if let Ok(Some(bytes)) = state.sessions.take(&key).await
            && let Ok(s) = serde_json::from_slice::<Session>(&bytes)
        {
            tracing::info!(subject = %s.subject, "logout; session deleted");
            id_token = s.id_token;
        }
    }
    let mut location = "/".to_owned();
    if let Some(login) = &state.login
        && let Ok(discovery) = login.discovery().await
        && let Some(end) = &discovery.end_session_endpoint
        && let Ok(mut url) = url::Url::parse(end)
    {
        let mut back = url::Url::parse(&login.settings.redirect_url).ok();
        if let Some(b) = back.as_mut() {
            b.set_path("/");
            b.set_query(None);
        }
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &login.settings.client_id);
            if let Some(b) = &back {
                q.append_pair("post_logout_redirect_uri", b.as_str());
            }
            if let Some(t) = &id_token {
                q.append_pair("id_token_hint", t);
            }
        }
        location = url.to_string();
    }
    let mut response = see_other(&location);
    let cookie = session_cookie("", Duration::ZERO, state.settings.cookie_secure);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// Answer of `/auth/session`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// Always true in a 200 answer.
    pub authenticated: bool,
    /// How: `session` (cookie), `bearer` (authorization header) or `none` (auth disabled).
    pub via: &'static str,
    /// Token subject.
    pub subject: String,
    /// `preferred_username`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// ccm roles.
    pub roles: Vec<String>,
    /// When the session ends (Unix seconds); absent for bearer callers and with auth disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When the current access token expires (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<u64>,
}

/// `GET /auth/session`.
pub(crate) async fn session_info(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    const PATH: &str = "/auth/session";
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    if let (Some(login), Some(h)) = (
        &state.login,
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    ) {
        return match login.authenticate(h).await {
            Ok(caller) => (
                no_store,
                Json(SessionInfo {
                    authenticated: true,
                    via: "bearer",
                    subject: caller.subject.clone(),
                    username: caller.username.clone(),
                    roles: caller.roles.iter().map(|r| r.claim().to_owned()).collect(),
                    expires_at: None,
                    access_token_expires_at: caller.claims.get("exp").and_then(|v| v.as_u64()),
                }),
            )
                .into_response(),
            Err(e) => {
                let mut p = unauthenticated(&e.to_string());
                p.www_authenticate = e.www_authenticate().or(p.www_authenticate.take());
                p.with_instance(PATH).into_response()
            }
        };
    }
    if state.settings.insecure_no_auth {
        let anon = Caller::anonymous_admin();
        return (
            no_store,
            Json(SessionInfo {
                authenticated: true,
                via: "none",
                subject: anon.subject,
                username: anon.username,
                roles: anon.roles.iter().map(|r| r.claim().to_owned()).collect(),
                expires_at: None,
                access_token_expires_at: None,
            }),
        )
            .into_response();
    }
    match session::current(&state, &headers).await {
        Ok(Some((_, s))) => (
            no_store,
            Json(SessionInfo {
                authenticated: true,
                via: "session",
                subject: s.subject,
                username: s.username,
                roles: s.roles,
                expires_at: Some(s.expires_at),
                access_token_expires_at: Some(s.access_expires_at),
            }),
        )
            .into_response(),
        Ok(None) => unauthenticated("not logged in; log in at /auth/login")
            .with_instance(PATH)
            .into_response(),
        Err(p) => p.with_instance(PATH).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        // RFC 7636, appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn return_to_must_stay_local() {
        assert_eq!(safe_return_to(None).unwrap(), "/");
        assert_eq!(
            safe_return_to(Some("/workers?x=1")).unwrap(),
            "/workers?x=1"
        );
        for bad in [
            "//evil.test/",
            "https://evil.test/",
            "/\\evil.test",
            "workers",
        ] {
            assert!(safe_return_to(Some(bad)).is_err(), "{bad}");
        }
    }
}
