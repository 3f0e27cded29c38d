//! Browser sessions: server-side state behind an opaque, HttpOnly cookie.
//!
//! A session holds the tokens of one login (access, refresh, id token) and who logged in. The
//! cookie carries only a random id (256 bits, base64url); stores key sessions by the SHA-256 of
//! that id, so a dump of the store holds no usable cookie. Sessions end at an absolute expiry
//! (`session_ttl`); the access token is refreshed with the refresh token when it is within
//! [`REFRESH_MARGIN`] of its expiry.
//!
//! Two stores: [`MemoryStore`] (one gateway) and [`RedisStore`] (replicas share sessions and
//! pending logins, so a login may start on one replica and finish on another).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::GatewaySettings;
use crate::error::GatewayError;
use crate::problem::Problem;
use crate::server::AppState;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "ccm_session";
/// Refresh the access token when it expires within this margin.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// How long a started login (state, PKCE verifier, nonce) waits for its callback.
pub const LOGIN_STATE_TTL: Duration = Duration::from_secs(600);
/// Prefix of every key the gateway writes to Redis.
pub const REDIS_KEY_PREFIX: &str = "ccm:gateway:";
/// Bytes of randomness in a session id, a login state and a PKCE verifier.
pub const RANDOM_BYTES: usize = 32;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A random URL-safe token of [`RANDOM_BYTES`] bytes.
pub fn random_token() -> String {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::fill(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One logged-in browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The token subject.
    pub subject: String,
    /// `preferred_username`.
    pub username: Option<String>,
    /// ccm role names from the access token.
    pub roles: Vec<String>,
    /// The access token forwarded as `authorization: Bearer …`.
    pub access_token: String,
    /// The refresh token, when the issuer gave one.
    pub refresh_token: Option<String>,
    /// The id token (for RP-initiated logout's `id_token_hint`).
    pub id_token: Option<String>,
    /// When the access token expires (Unix seconds).
    pub access_expires_at: u64,
    /// When the session ends (Unix seconds).
    pub expires_at: u64,
}

/// A login between `/auth/login` and `/auth/callback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLogin {
    /// The PKCE code verifier.
    pub verifier: String,
    /// The nonce the id token must carry.
    pub nonce: String,
    /// Where to send the browser after the login (a local path).
    pub return_to: String,
}

/// Where sessions and pending logins live. Values are opaque bytes with a time to live.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores `value` under `key` for `ttl`.
    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), GatewayError>;
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError>;
    /// Removes and returns the value under `key` (atomically: one caller gets it).
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError>;
    /// Removes `key`.
    async fn delete(&self, key: &str) -> Result<(), GatewayError>;
}

/// Entries kept before a put sweeps out the expired ones.
pub const MEMORY_SWEEP_THRESHOLD: usize = 1024;

/// Sessions in this process (a single gateway).
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Vec<u8>, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), GatewayError> {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MEMORY_SWEEP_THRESHOLD {
            entries.retain(|_, (_, until)| *until > now);
        }
        entries.insert(key.to_owned(), (value, now + ttl));
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        let now = Instant::now();
        let mut entries = self.lock();
        match entries.get(key) {
            Some((value, until)) if *until > now => Ok(Some(value.clone())),
            Some(_) => {
                entries.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .remove(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v))
    }

    async fn delete(&self, key: &str) -> Result<(), GatewayError> {
        self.lock().remove(key);
        Ok(())
    }
}

/// Sessions in Redis, shared by every gateway replica pointed at it.
#[derive(Clone)]
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> GatewayError {
    GatewayError::Session(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`).
    pub async fn connect(url: &str) -> Result<Self, GatewayError> {
        let client = redis::Client::open(url)
            .map_err(|e| GatewayError::Config(format!("redis URL {url:?}: {e}")))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(redis_err)?;
        Ok(Self { conn })
    }

    fn key(key: &str) -> String {
        format!("{REDIS_KEY_PREFIX}{key}")
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), GatewayError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(Self::key(key))
            .arg(value)
            .arg("PX")
            .arg(millis)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        redis::cmd("GET")
            .arg(Self::key(key))
            .query_async::<Option<Vec<u8>>>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, GatewayError> {
        redis::cmd("GETDEL")
            .arg(Self::key(key))
            .query_async::<Option<Vec<u8>>>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }

    async fn delete(&self, key: &str) -> Result<(), GatewayError> {
        redis::cmd("DEL")
            .arg(Self::key(key))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }
}

/// The store the settings ask for.
pub async fn store_for(settings: &GatewaySettings) -> Result<Arc<dyn SessionStore>, GatewayError> {
    Ok(match &settings.redis_url {
        Some(url) => Arc::new(RedisStore::connect(url).await?),
        None => Arc::new(MemoryStore::default()),
    })
}

/// The store key of session id `id`.
pub fn session_key(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("session:{hex}")
}

/// The store key of a pending login.
pub fn login_key(state: &str) -> String {
    format!("login:{state}")
}

/// Saves `session` under `id` until its expiry.
pub async fn save(store: &dyn SessionStore, id: &str, session: &Session) -> Result<(), Problem> {
    let ttl = Duration::from_secs(session.expires_at.saturating_sub(now_secs()).max(1));
    let bytes = serde_json::to_vec(session).map_err(|e| store_problem(e.to_string()))?;
    store
        .put(&session_key(id), bytes, ttl)
        .await
        .map_err(|e| store_problem(e.to_string()))
}

pub(crate) fn store_problem(detail: String) -> Problem {
    tracing::error!(%detail, "session store failed");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "session-store-unavailable",
        format!("the session store is unavailable: {detail}"),
    )
}

/// The session id in the request's cookies.
pub fn cookie_session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value of a session cookie (`max_age` 0 clears it).
pub fn session_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The 401 of a request without credentials.
pub fn unauthenticated(detail: &str) -> Problem {
    let mut p = Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail);
    p.grpc_status = Some("UNAUTHENTICATED".into());
    p.www_authenticate = Some(format!("Bearer realm=\"{}\"", ccm_auth::CHALLENGE_REALM));
    p
}

/// Loads the session of the request's cookie, refreshing its access token when it is about
/// to expire. `Ok(None)`: no cookie. A cookie naming no live session is a 401.
pub(crate) async fn current(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, Problem> {
    let Some(id) = cookie_session_id(headers) else {
        return Ok(None);
    };
    let bytes = state
        .sessions
        .get(&session_key(&id))
        .await
        .map_err(|e| store_problem(e.to_string()))?;
    let Some(bytes) = bytes else {
        return Err(unauthenticated(
            "the session has expired or was logged out; log in again at /auth/login",
        ));
    };
    let mut session: Session = serde_json::from_slice(&bytes)
        .map_err(|e| store_problem(format!("unreadable session: {e}")))?;
    let now = now_secs();
    if session.expires_at <= now {
        let _ = state.sessions.delete(&session_key(&id)).await;
        return Err(unauthenticated(
            "the session has expired; log in again at /auth/login",
        ));
    }
    if session.access_expires_at <= now + REFRESH_MARGIN.as_secs() {
        let Some(login) = &state.login else {
            return Err(unauthenticated("no OIDC issuer configured"));
        };
        match login.refresh(&session).await {
            Ok(refreshed) => {
                session = refreshed;
                save(state.sessions.as_ref(), &id, &session).await?;
                tracing::info!(subject = %session.subject, "session access token refreshed");
            }
            Err(why) => {
                tracing::info!(subject = %session.subject, %why, "session refresh failed; session ended");
                let _ = state.sessions.delete(&session_key(&id)).await;
                return Err(unauthenticated(
                    "the session could not be refreshed; log in again at /auth/login",
                ));
            }
        }
    }
    Ok(Some((id, session)))
}

/// The `authorization` value to send upstream for this request:
/// the client's own header (bearer pass-through), else the session's access token, else none
/// when auth is off; a 401 problem when auth is on and there is neither.
pub(crate) async fn authorization(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, Problem> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return Ok(Some(value.clone()));
    }
    if state.settings.insecure_no_auth {
        return Ok(None);
    }
    match current(state, headers).await? {
        Some((_, session)) => HeaderValue::from_str(&format!("Bearer {}", session.access_token))
            .map(Some)
            .map_err(|_| unauthenticated("the session's access token is not a valid header")),
        None => Err(unauthenticated(
            "a bearer token (authorization header) or a session (log in at /auth/login) is required",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_expires_and_takes_once() {
        let store = MemoryStore::default();
        store
            .put("a", b"1".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.get("a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.take("a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.take("a").await.unwrap(), None);
        store
            .put("b", b"2".to_vec(), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.get("b").await.unwrap(), None);
    }

    #[test]
    fn cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; ccm_session=abc; x=y"),
        );
        assert_eq!(cookie_session_id(&headers).as_deref(), Some("abc"));
        let c = session_cookie("abc", Duration::from_secs(10), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.ends_with("Secure"));
        assert_ne!(session_key("abc"), session_key("abd"));
        assert!(!session_key("abc").contains("abc"));
        assert_ne!(random_token(), random_token());
    }
}
