//! Service identity for the scheduler and controller: OAuth 2.0 client credentials, a cached
//! access token refreshed before it expires, and a tonic interceptor adding it to calls.
//!
//! ```no_run
//! # async fn demo(channel: tonic::transport::Channel) -> Result<(), ccm_auth::AuthError> {
//! use ccm_auth::{ClientCredentials, ServiceTokenSource};
//! use ccm_proto::v1::internal_service_client::InternalServiceClient;
//!
//! let source = ServiceTokenSource::new(ClientCredentials {
//!     token_url: "https://idp/realms/ccm/protocol/openid-connect/token".into(),
//!     client_id: "scheduler".into(),
//!     client_secret: "…".into(),
//!     scope: None,
//! })?;
//! source.token().await?; // first token now: fail fast on bad credentials
//! let _refresher = source.spawn_refresher(); // keep it fresh while the client lives
//! let client = InternalServiceClient::with_interceptor(channel, source.interceptor());
//! # let _ = client; Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tonic::metadata::MetadataValue;

use crate::config::DEFAULT_HTTP_TIMEOUT;
use crate::error::AuthError;

/// A token is refreshed this long before it expires (or at half its lifetime when that is
/// shorter), so calls never carry a token about to expire in flight.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// Lifetime assumed when the token endpoint does not say (`expires_in` absent).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// First retry delay of the background refresher after a failed refresh; doubles per failure.
pub const REFRESH_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest delay between two retries of the background refresher.
pub const MAX_REFRESH_RETRY_DELAY: Duration = Duration::from_secs(30);

/// OAuth 2.0 client credentials of a confidential client (Keycloak: a client with service
/// accounts enabled and the `service` realm role on its service account).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// The token endpoint (Keycloak: `{issuer}/protocol/openid-connect/token`).
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret (sent with HTTP Basic authentication; never logged).
    pub client_secret: String,
    /// Optional `scope` parameter.
    pub scope: Option<String>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    refresh_at: Instant,
    expires_at: Instant,
}

struct SourceInner {
    credentials: ClientCredentials,
    http: reqwest::Client,
    current: RwLock<Option<CachedToken>>,
    refresh: tokio::sync::Mutex<()>,
    background_refresh: AtomicBool,
    fetches: AtomicU64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct TokenErrorResponse {
    error: Option<String>,
    error_description: Option<String>,
}

/// Fetches and caches a client-credentials access token. Cheap to clone (shared cache).
#[derive(Clone)]
pub struct ServiceTokenSource {
    inner: Arc<SourceInner>,
}

impl std::fmt::Debug for ServiceTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokenSource")
            .field("credentials", &self.inner.credentials)
            .field("fetches", &self.fetch_count())
            .finish_non_exhaustive()
    }
}

impl ServiceTokenSource {
    /// A source for `credentials`; fetches nothing yet.
    pub fn new(credentials: ClientCredentials) -> Result<Self, AuthError> {
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_HTTP_TIMEOUT)
            .build()
            .map_err(|e| AuthError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(SourceInner {
                credentials,
                http,
                current: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(()),
                background_refresh: AtomicBool::new(false),
                fetches: AtomicU64::new(0),
            }),
        })
    }

    /// How many tokens were fetched so far.
    pub fn fetch_count(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Option<CachedToken> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cached token while it has not expired (it may be due for a refresh).
    pub fn cached(&self) -> Option<String> {
        self.snapshot()
            .filter(|t| Instant::now() < t.expires_at)
            .map(|t| t.token)
    }

    /// A valid token: the cached one until its refresh time, otherwise a new one. If the
    /// refresh fails while the cached token is still valid, the cached token is returned.
    pub async fn token(&self) -> Result<String, AuthError> {
        match self.refresh_if_due().await {
            Ok(token) => Ok(token),
            Err(err) => {
                tracing::warn!(client_id = %self.inner.credentials.client_id, error = %err,
                    "refreshing the service token failed");
                self.cached().ok_or(err)
            }
        }
    }

    /// The cached token until its refresh time, otherwise a newly fetched one (errors when the
    /// fetch fails, even if the cached token is still valid).
    async fn refresh_if_due(&self) -> Result<String, AuthError> {
        let fresh = |t: &CachedToken| Instant::now() < t.refresh_at;
        if let Some(t) = self.snapshot().filter(fresh) {
            return Ok(t.token);
        }
        let _guard = self.inner.refresh.lock().await;
        if let Some(t) = self.snapshot().filter(fresh) {
            return Ok(t.token);
        }
        let fetched = self.fetch().await?;
        let token = fetched.token.clone();
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(fetched);
        Ok(token)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(client_id = %self.inner.credentials.client_id))]
    async fn fetch(&self) -> Result<CachedToken, AuthError> {
        let creds = &self.inner.credentials;
        let started = Instant::now();
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &creds.scope {
            form.push(("scope", scope.as_str()));
        }
        let url = &creds.token_url;
        let response = self
            .inner
            .http
            .post(url)
            .basic_auth(&creds.client_id, Some(&creds.client_secret))
            .form(&form)
            .send()
            .await
            .map_err(|e| AuthError::IssuerUnavailable(format!("POST {url}: {e}")))?;
        let status = response.status();
        if status.is_server_error() {
            return Err(AuthError::IssuerUnavailable(format!(
                "POST {url} answered {status}"
            )));
        }
        if !status.is_success() {
            let body: Option<TokenErrorResponse> = response.json().await.ok();
            let (error, description) = body
                .map(|b| (b.error, b.error_description))
                .unwrap_or_default();
            return Err(AuthError::TokenRequestRejected(format!(
                "{status}: {} {}",
                error.unwrap_or_default(),
                description.unwrap_or_default()
            )));
        }
        let body: TokenResponse = response
            .json()
            .await
            .map_err(|e| AuthError::IssuerUnavailable(format!("POST {url}: bad response: {e}")))?;
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let lifetime = body
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 2);
        tracing::debug!(lifetime_s = lifetime.as_secs(), "fetched a service token");
        Ok(CachedToken {
            token: body.access_token,
            refresh_at: started + lifetime - margin,
            expires_at: started + lifetime,
        })
    }

    /// Starts a refresh on the current tokio runtime unless one is already running.
    fn refresh_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let source = self.clone();
        runtime.spawn(async move {
            let _ = source.token().await;
            source
                .inner
                .background_refresh
                .store(false, Ordering::Release);
        });
    }

    /// Keeps the token fresh in the background (refreshing at its refresh time, retrying with
    /// backoff on failure) until the returned handle is dropped or every clone of the source is.
    /// Needs a tokio runtime.
    pub fn spawn_refresher(&self) -> RefreshTask {
        let weak: Weak<SourceInner> = Arc::downgrade(&self.inner);
        let handle = tokio::spawn(async move {
            let mut retry = REFRESH_RETRY_DELAY;
            let mut failed = false;
            loop {
                let wait = {
                    let Some(inner) = weak.upgrade() else { break };
                    let source = ServiceTokenSource { inner };
                    match (failed, source.snapshot()) {
                        (false, Some(t)) => t.refresh_at.saturating_duration_since(Instant::now()),
                        (false, None) => Duration::ZERO,
                        (true, _) => retry,
                    }
                };
                tokio::time::sleep(wait).await;
                let Some(inner) = weak.upgrade() else { break };
                let source = ServiceTokenSource { inner };
                match source.refresh_if_due().await {
                    Ok(_) => {
                        failed = false;
                        retry = REFRESH_RETRY_DELAY;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in = ?retry,
                            "background refresh of the service token failed");
                        if failed {
                            retry = (retry * 2).min(MAX_REFRESH_RETRY_DELAY);
                        }
                        failed = true;
                    }
                }
            }
        });
        RefreshTask { handle }
    }

    /// A tonic interceptor adding `authorization: Bearer <token>` from this source.
    pub fn interceptor(&self) -> ServiceTokenInterceptor {
        ServiceTokenInterceptor {
            source: self.clone(),
        }
    }
}

/// The background refresher of a [`ServiceTokenSource`]; stops when dropped.
#[derive(Debug)]
pub struct RefreshTask {
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for RefreshTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Adds the service token to every call. Interceptors cannot wait, so it uses the cached token
/// (starting a background refresh when it is due) and, when there is no valid token yet, fails
/// the call with `UNAVAILABLE` (retryable) while a refresh runs. Call
/// [`ServiceTokenSource::token`] once before the first call, and keep a
/// [`ServiceTokenSource::spawn_refresher`] running, to never see that.
#[derive(Debug, Clone)]
pub struct ServiceTokenInterceptor {
    source: ServiceTokenSource,
}

impl tonic::service::Interceptor for ServiceTokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let now = Instant::now();
        let Some(current) = self.source.snapshot().filter(|t| now < t.expires_at) else {
            self.source.refresh_in_background();
            return Err(tonic::Status::unavailable(
                "no service token yet: fetching one from the identity provider",
            ));
        };
        if now >= current.refresh_at {
            self.source.refresh_in_background();
        }
        let value = MetadataValue::try_from(format!("Bearer {}", current.token))
            .map_err(|_| tonic::Status::internal("service token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
