//! [`HttpCmlClient`]: the [`CmlClient`] over HTTP(S), and [`HttpCmlClientFactory`], which hands
//! out one cached client per worker endpoint.
//!
//! Behaviour (see `docs/cml.md`):
//! - `POST /api/v0/authenticate` with `{username, password}`; the reply is a JSON string (the
//!   bearer token). The token is cached and shared by concurrent calls (one authentication at a
//!   time).
//! - Every authenticated call that gets a 401 drops the cached token, authenticates once more and
//!   repeats the call once. A 401 means CML did nothing, so this is safe for POSTs too (the legacy
//!   service authenticated per operation and needed it only for GET/PUT/DELETE).
//! - Each call has a timeout ([`DEFAULT_TIMEOUT`], [`DEREGISTRATION_TIMEOUT`] for the licence
//!   deregistration).
//! - Status mapping: 401/403 → [`CmlError::Auth`], 404 → [`CmlError::NotFound`], 409 and 429 →
//!   [`CmlError::Busy`], other 4xx → [`CmlError::Rejected`] with CML's `description`, 5xx,
//!   connection failures, unexpected redirects and unreadable bodies → [`CmlError::Unavailable`],
//!   timeouts → [`CmlError::Timeout`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::client::{
    AllStats, CmlClient, Deregistration, DomInfo, ImportedLab, LabAction, LabInfo, Licensing,
    SystemHealth, SystemInformation, SystemStats, TelemetryEvent,
};
use crate::error::CmlError;

/// Timeout of every CML call except the licence deregistration (the legacy service's 30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of `DELETE /api/v0/licensing/deregistration` (it talks to Cisco's licence servers).
/// A deregistration that times out counts as done ([`Deregistration::TimedOut`]), as in the
/// legacy service.
pub const DEREGISTRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// CML ships with a self-signed certificate, so certificates are not verified by default (the
/// legacy `CML_WORKER_API_VERIFY_SSL=false`).
pub const DEFAULT_ACCEPT_INVALID_CERTS: bool = true;
/// The CML API user of the legacy service (`CML_WORKER_API_USERNAME`).
pub const DEFAULT_USERNAME: &str = "admin";
/// The `User-Agent` of every call.
pub const USER_AGENT: &str = concat!("ccm-cml/", env!("CARGO_PKG_VERSION"));
/// Longest excerpt of a non-JSON error body kept in an error message.
pub const MAX_ERROR_BODY_CHARS: usize = 512;

/// Characters escaped in a path segment (a lab id): everything but unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A secret string (a password): compared and cloned normally, never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// Where and how to reach one CML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmlEndpoint {
    /// `http(s)://host[:port][/prefix]`; every API path (`/api/v0/...`) is appended to it, so a
    /// prefix such as the simulator's `/{instance_id}` is kept.
    pub base_url: String,
    /// API user.
    pub username: String,
    /// API password.
    pub password: Secret,
    /// Skip certificate verification ([`DEFAULT_ACCEPT_INVALID_CERTS`]).
    pub accept_invalid_certs: bool,
    /// Timeout of each call ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Timeout of the licence deregistration ([`DEREGISTRATION_TIMEOUT`]).
    pub deregistration_timeout: Duration,
}

impl CmlEndpoint {
    /// An endpoint with the default certificate policy and timeouts.
    pub fn new(
        base_url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Self {
        CmlEndpoint {
            base_url: base_url.into(),
            username: username.into(),
            password: password.into(),
            accept_invalid_certs: DEFAULT_ACCEPT_INVALID_CERTS,
            timeout: DEFAULT_TIMEOUT,
            deregistration_timeout: DEREGISTRATION_TIMEOUT,
        }
    }
}

/// Checks `base_url` and returns it without trailing slashes.
fn normalize_base_url(base_url: &str) -> Result<String, CmlError> {
    let parsed = url::Url::parse(base_url)
        .map_err(|e| CmlError::InvalidEndpoint(format!("{base_url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CmlError::InvalidEndpoint(format!(
            "{base_url:?}: scheme must be http or https"
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(CmlError::InvalidEndpoint(format!("{base_url:?}: no host")));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(CmlError::InvalidEndpoint(format!(
            "{base_url:?}: must not carry a query or fragment"
        )));
    }
    Ok(base_url.trim_end_matches('/').to_owned())
}

/// Builds the shared HTTP client (no redirects: the API never redirects).
fn build_http(accept_invalid_certs: bool) -> Result<reqwest::Client, CmlError> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .tls_danger_accept_invalid_certs(accept_invalid_certs)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| CmlError::InvalidEndpoint(format!("HTTP client: {}", error_chain(&e))))
}

/// A request body.
enum Body {
    Json(serde_json::Value),
    Raw {
        content_type: &'static str,
        text: String,
    },
}

/// One API call.
struct Call {
    /// What the call is, for errors and spans (e.g. `import`).
    what: &'static str,
    method: Method,
    /// Path (and query) below the base URL, starting with `/api/v0/`.
    path: String,
    body: Option<Body>,
    timeout: Duration,
}

impl Call {
    fn new(what: &'static str, method: Method, path: String, timeout: Duration) -> Self {
        Call {
            what,
            method,
            path,
            body: None,
            timeout,
        }
    }
}

/// A response read in full.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

/// The CML REST API over HTTP(S). Cheap to share (`Arc`); one cached token per client.
pub struct HttpCmlClient {
    endpoint: CmlEndpoint,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<String>>,
}

impl fmt::Debug for HttpCmlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCmlClient")
            .field("base_url", &self.endpoint.base_url)
            .field("username", &self.endpoint.username)
            .field("timeout", &self.endpoint.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpCmlClient {
    /// A client for `endpoint`. Fails on a base URL that is not `http(s)://host...`.
    pub fn new(endpoint: CmlEndpoint) -> Result<Self, CmlError> {
        let http = build_http(endpoint.accept_invalid_certs)?;
        Self::with_http(endpoint, http)
    }

    /// A client sharing an existing HTTP client (its connection pool and TLS policy).
    fn with_http(mut endpoint: CmlEndpoint, http: reqwest::Client) -> Result<Self, CmlError> {
        endpoint.base_url = normalize_base_url(&endpoint.base_url)?;
        Ok(HttpCmlClient {
            endpoint,
            http,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The base URL calls go to (without a trailing slash).
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    /// Drops the cached token: the next call authenticates again.
    pub async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    fn lab_path(lab_id: &str, suffix: &str) -> String {
        format!(
            "/api/v0/labs/{}{suffix}",
            utf8_percent_encode(lab_id, PATH_SEGMENT)
        )
    }

    /// Sends `call` once, with `token` as the bearer when given, and reads the whole body.
    async fn send(&self, call: &Call, token: Option<&str>) -> Result<Reply, CmlError> {
        let url = format!("{}{}", self.endpoint.base_url, call.path);
        let mut request = self
            .http
            .request(call.method.clone(), &url)
            .timeout(call.timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        match &call.body {
            Some(Body::Json(value)) => request = request.json(value),
            Some(Body::Raw { content_type, text }) => {
                request = request
                    .header(header::CONTENT_TYPE, *content_type)
                    .body(text.clone());
            }
            None => {}
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                CmlError::Timeout(format!("{} after {:?}", call.what, call.timeout))
            } else {
                CmlError::Unavailable(format!("{}: {}", call.what, error_chain(&e)))
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?.to_vec();
        tracing::debug!(status = status.as_u16(), bytes = body.len(), "CML replied");
        Ok(Reply { status, body })
    }

    /// POST /api/v0/authenticate → the token.
    async fn authenticate(&self) -> Result<String, CmlError> {
        let mut call = Call::new(
            "authenticate",
            Method::POST,
            "/api/v0/authenticate".into(),
            self.endpoint.timeout,
        );
        call.body = Some(Body::Json(serde_json::json!({
            "username": self.endpoint.username,
            "password": self.endpoint.password.expose(),
        })));
        let reply = check(self.send(&call, None).await?, call.what)?;
        let token: String = parse_json(&reply, call.what)?;
        if token.is_empty() {
            return Err(CmlError::Unavailable(
                "authenticate: CML returned an empty token".into(),
            ));
        }
        tracing::debug!(base_url = %self.endpoint.base_url, "authenticated to CML");
        Ok(token)
    }

    /// The cached token, authenticating first when there is none.
    async fn token(&self) -> Result<String, CmlError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            return Ok(token.clone());
        }
        let token = self.authenticate().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Drops `used` from the cache unless another call already replaced it.
    async fn invalidate(&self, used: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_deref() == Some(used) {
            *cached = None;
        }
    }

    /// Sends an authenticated call; on a 401 re-authenticates once and repeats it.
    /// Returns the reply whatever its status.
    async fn authed(&self, call: &Call) -> Result<Reply, CmlError> {
        self.authed_split(call).await?
    }

    /// [`Self::authed`], keeping apart a failed authentication (outer error) and a failed call
    /// (inner error), so the deregistration can treat only its own timeout as done.
    async fn authed_split(&self, call: &Call) -> Result<Result<Reply, CmlError>, CmlError> {
        let span = tracing::debug_span!(
            "cml_call",
            call = call.what,
            method = %call.method,
            path = %call.path,
            base_url = %self.endpoint.base_url,
        );
        async {
            let token = self.token().await?;
            let reply = match self.send(call, Some(&token)).await {
                Ok(reply) if reply.status == StatusCode::UNAUTHORIZED => reply,
                other => return Ok(other),
            };
            drop(reply);
            tracing::debug!("CML answered 401: re-authenticating once");
            self.invalidate(&token).await;
            let token = self.token().await?;
            Ok(self.send(call, Some(&token)).await)
        }
        .instrument(span)
        .await
    }

    /// An authenticated call that must succeed (2xx).
    async fn call_ok(&self, call: Call) -> Result<Reply, CmlError> {
        let reply = self.authed(&call).await?;
        check(reply, call.what)
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        path: String,
    ) -> Result<T, CmlError> {
        let call = Call::new(what, Method::GET, path, self.endpoint.timeout);
        let reply = self.call_ok(call).await?;
        parse_json(&reply, what)
    }
}

/// The error chain of `e` on one line (reqwest hides the cause, e.g. "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// CML's error text: `description` of a JSON object, a JSON string, or the body (shortened).
fn description(status: StatusCode, body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        match &value {
            serde_json::Value::Object(map) => {
                if let Some(text) = map.get("description").and_then(|d| d.as_str()) {
                    return text.to_owned();
                }
            }
            serde_json::Value::String(text) => return text.clone(),
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no description")
            .to_owned();
    }
    text.chars().take(MAX_ERROR_BODY_CHARS).collect()
}

/// Maps a non-2xx status to the error.
fn status_error(what: &str, status: StatusCode, body: &[u8]) -> CmlError {
    let text = description(status, body);
    let code = status.as_u16();
    match code {
        401 | 403 => CmlError::Auth(format!("{what}: {code} {text}")),
        404 => CmlError::NotFound(format!("{what}: {text}")),
        409 | 429 => CmlError::Busy(format!("{what}: {code} {text}")),
        400..=499 => CmlError::Rejected {
            status: code,
            message: text,
        },
        _ => CmlError::Unavailable(format!("{what}: HTTP {code} {text}")),
    }
}

/// Passes a 2xx reply, maps anything else.
fn check(reply: Reply, what: &str) -> Result<Reply, CmlError> {
    if reply.status.is_success() {
        Ok(reply)
    } else {
        Err(status_error(what, reply.status, &reply.body))
    }
}

fn parse_json<T: DeserializeOwned>(reply: &Reply, what: &str) -> Result<T, CmlError> {
    serde_json::from_slice(&reply.body)
        .map_err(|e| CmlError::Unavailable(format!("{what}: unreadable response body: {e}")))
}

/// `system_stats` → [`SystemStats`]: `all` as is, `computes.*.stats.dominfo` summed.
fn system_stats_from(raw: serde_json::Value) -> Result<SystemStats, CmlError> {
    let bad = |e: serde_json::Error| {
        CmlError::Unavailable(format!("system_stats: unreadable response body: {e}"))
    };
    if !raw.is_object() {
        return Err(CmlError::Unavailable(
            "system_stats: response body is not an object".into(),
        ));
    }
    let all = match raw.get("all").filter(|v| v.is_object()) {
        Some(all) => serde_json::from_value::<AllStats>(all.clone()).map_err(bad)?,
        None => AllStats::default(),
    };
    let mut dominfo = DomInfo::default();
    if let Some(computes) = raw.get("computes").and_then(|c| c.as_object()) {
        for compute in computes.values() {
            let Some(info) = compute.pointer("/stats/dominfo").filter(|v| v.is_object()) else {
                continue;
            };
            let info = serde_json::from_value::<DomInfo>(info.clone()).map_err(bad)?;
            dominfo.allocated_cpus += info.allocated_cpus;
            dominfo.allocated_memory += info.allocated_memory;
            dominfo.total_nodes += info.total_nodes;
            dominfo.running_nodes += info.running_nodes;
        }
    }
    Ok(SystemStats { all, dominfo, raw })
}

/// `licensing` → [`Licensing`].
fn licensing_from(raw: serde_json::Value) -> Result<Licensing, CmlError> {
    if !raw.is_object() {
        return Err(CmlError::Unavailable(
            "licensing: response body is not an object".into(),
        ));
    }
    let text = |pointer: &str| {
        raw.pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Ok(Licensing {
        registration_status: text("/registration/status"),
        authorization_status: text("/authorization/status"),
        is_enterprise: raw
            .pointer("/product_license/is_enterprise")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        raw,
    })
}

#[async_trait]
impl CmlClient for HttpCmlClient {
    async fn system_information(&self) -> Result<SystemInformation, CmlError> {
        let call = Call::new(
            "system_information",
            Method::GET,
            "/api/v0/system_information".into(),
            self.endpoint.timeout,
        );
        let reply = check(self.send(&call, None).await?, call.what)?;
        parse_json(&reply, call.what)
    }

    async fn system_health(&self) -> Result<SystemHealth, CmlError> {
        self.get_json("system_health", "/api/v0/system_health".into())
            .await
    }

    async fn system_stats(&self) -> Result<SystemStats, CmlError> {
        let raw: serde_json::Value = self
            .get_json("system_stats", "/api/v0/system_stats".into())
            .await?;
        system_stats_from(raw)
    }

    async fn licensing(&self) -> Result<Licensing, CmlError> {
        let raw: serde_json::Value = self
            .get_json("licensing", "/api/v0/licensing".into())
            .await?;
        licensing_from(raw)
    }

    async fn register_license(&self, token: &str, reregister: bool) -> Result<(), CmlError> {
        let mut call = Call::new(
            "licence registration",
            Method::POST,
            "/api/v0/licensing/registration".into(),
            self.endpoint.timeout,
        );
        call.body = Some(Body::Json(
            serde_json::json!({ "token": token, "reregister": reregister }),
        ));
        self.call_ok(call).await.map(|_| ())
    }

    async fn deregister_license(&self) -> Result<Deregistration, CmlError> {
        let call = Call::new(
            "licence deregistration",
            Method::DELETE,
            "/api/v0/licensing/deregistration".into(),
            self.endpoint.deregistration_timeout,
        );
        let reply = match self.authed_split(&call).await? {
            Ok(reply) => reply,
            Err(CmlError::Timeout(detail)) => {
                tracing::warn!(%detail, "licence deregistration timed out; counted as done");
                return Ok(Deregistration::TimedOut);
            }
            Err(e) => return Err(e),
        };
        match reply.status {
            StatusCode::ACCEPTED => Ok(Deregistration::LocalOnly),
            status if status.is_success() => Ok(Deregistration::Done),
            status => Err(status_error(call.what, status, &reply.body)),
        }
    }

    async fn list_labs(&self) -> Result<Vec<String>, CmlError> {
        self.get_json("list labs", "/api/v0/labs?show_all=true".into())
            .await
    }

    async fn get_lab(&self, lab_id: &str) -> Result<LabInfo, CmlError> {
        self.get_json("get lab", Self::lab_path(lab_id, "")).await
    }

    async fn import_lab(&self, yaml: &str, title: Option<&str>) -> Result<ImportedLab, CmlError> {
        let mut path = String::from("/api/v0/import");
        if let Some(title) = title {
            path.push('?');
            path.push_str(
                &url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("title", title)
                    .finish(),
            );
        }
        let mut call = Call::new("import", Method::POST, path, self.endpoint.timeout);
        // The legacy service sends the YAML with this content type, and CML accepts it.
        call.body = Some(Body::Raw {
            content_type: "application/json",
            text: yaml.to_owned(),
        });
        let reply = self.call_ok(call).await?;
        let imported: ImportedLab = parse_json(&reply, "import")?;
        if imported.id.is_empty() {
            return Err(CmlError::Unavailable(
                "import: CML returned no lab id".into(),
            ));
        }
        Ok(imported)
    }

    async fn lab_action(&self, lab_id: &str, action: LabAction) -> Result<(), CmlError> {
        let what = match action {
            LabAction::Start => "start lab",
            LabAction::Stop => "stop lab",
            LabAction::Wipe => "wipe lab",
        };
        let path = Self::lab_path(lab_id, &format!("/{}", action.as_str()));
        let call = Call::new(what, Method::PUT, path, self.endpoint.timeout);
        self.call_ok(call).await.map(|_| ())
    }

    async fn delete_lab(&self, lab_id: &str) -> Result<(), CmlError> {
        let call = Call::new(
            "delete lab",
            Method::DELETE,
            Self::lab_path(lab_id, ""),
            self.endpoint.timeout,
        );
        self.call_ok(call).await.map(|_| ())
    }

    async fn download_lab(&self, lab_id: &str) -> Result<String, CmlError> {
        let call = Call::new(
            "download lab",
            Method::GET,
            Self::lab_path(lab_id, "/download"),
            self.endpoint.timeout,
        );
        let reply = self.call_ok(call).await?;
        String::from_utf8(reply.body)
            .map_err(|_| CmlError::Unavailable("download lab: the YAML is not UTF-8".into()))
    }

    async fn telemetry_events(&self) -> Result<Vec<TelemetryEvent>, CmlError> {
        self.get_json("telemetry events", "/api/v0/telemetry/events".into())
            .await
    }
}

/// Hands out the [`CmlClient`] of a worker from its endpoint URL (what the controller uses).
pub trait CmlClientFactory: Send + Sync + fmt::Debug {
    /// The client for the CML at `base_url` (`https://10.0.0.5`,
    /// `http://127.0.0.1:9000/i-0abc`, ...). Repeated calls with the same URL return the same
    /// client (and so share its token).
    fn client(&self, base_url: &str) -> Result<Arc<dyn CmlClient>, CmlError>;
}

/// [`CmlClientFactory`] of [`HttpCmlClient`]s: one credential set and certificate policy for the
/// whole fleet, one shared connection pool, one cached client per base URL.
pub struct HttpCmlClientFactory {
    template: CmlEndpoint,
    http: reqwest::Client,
    clients: Mutex<HashMap<String, Arc<HttpCmlClient>>>,
}

impl fmt::Debug for HttpCmlClientFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCmlClientFactory")
            .field("username", &self.template.username)
            .field("accept_invalid_certs", &self.template.accept_invalid_certs)
            .field("timeout", &self.template.timeout)
            .field("clients", &self.len())
            .finish()
    }
}

impl HttpCmlClientFactory {
    /// A factory whose clients use `settings` (its `base_url` is ignored: each client gets the
    /// URL it is asked for).
    pub fn new(settings: CmlEndpoint) -> Result<Self, CmlError> {
        let http = build_http(settings.accept_invalid_certs)?;
        Ok(HttpCmlClientFactory {
            template: settings,
            http,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The concrete client for `base_url` (cached).
    pub fn http_client(&self, base_url: &str) -> Result<Arc<HttpCmlClient>, CmlError> {
        let key = normalize_base_url(base_url)?;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(Arc::clone(client));
        }
        let mut endpoint = self.template.clone();
        endpoint.base_url = key.clone();
        let client = Arc::new(HttpCmlClient::with_http(endpoint, self.http.clone())?);
        clients.insert(key, Arc::clone(&client));
        Ok(client)
    }

    /// Drops the cached client of `base_url` (e.g. the worker is gone). Returns whether one was
    /// cached.
    pub fn forget(&self, base_url: &str) -> bool {
        let Ok(key) = normalize_base_url(base_url) else {
            return false;
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .is_some()
    }

    /// How many clients are cached.
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no client is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CmlClientFactory for HttpCmlClientFactory {
    fn client(&self, base_url: &str) -> Result<Arc<dyn CmlClient>, CmlError> {
        Ok(self.http_client(base_url)? as Arc<dyn CmlClient>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug() {
        let endpoint = CmlEndpoint::new("https://cml", "admin", "hunter2");
        let text = format!("{endpoint:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }

    #[test]
    fn base_urls_are_checked_and_normalized() {
        assert_eq!(
            normalize_base_url("http://127.0.0.1:9/i-0abc/").unwrap(),
            "http://127.0.0.1:9/i-0abc"
        );
        for bad in ["ftp://x", "not a url", "https://x/?a=b", "https://x/#f"] {
            assert!(
                matches!(normalize_base_url(bad), Err(CmlError::InvalidEndpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn descriptions_come_from_json_or_body() {
        let s = StatusCode::BAD_REQUEST;
        assert_eq!(
            description(s, br#"{"description":"bad token","code":400}"#),
            "bad token"
        );
        assert_eq!(
            description(s, br#""Already deregistered""#),
            "Already deregistered"
        );
        assert_eq!(description(s, b"plain text"), "plain text");
        assert_eq!(description(s, b""), "Bad Request");
        assert_eq!(description(s, &[b'x'; 2000]).len(), MAX_ERROR_BODY_CHARS);
    }

    #[test]
    fn dominfo_is_summed_across_computes() {
        let raw = serde_json::json!({
            "all": {"cpu": {"count": 8, "percent": 12.5},
                    "memory": {"total": 100, "free": 60, "used": 40},
                    "disk": {"total": 10, "free": 5, "used": 5}},
            "computes": {
                "a": {"stats": {"dominfo": {"allocated_cpus": 2, "allocated_memory": 1024,
                                            "total_nodes": 3, "running_nodes": 2}}},
                "b": {"stats": {"dominfo": {"allocated_cpus": 1, "allocated_memory": 512,
                                            "total_nodes": 1, "running_nodes": 1}}},
                "c": {"hostname": "no stats"}
            }
        });
        let stats = system_stats_from(raw).unwrap();
        assert_eq!(stats.all.cpu.count, 8);
        assert_eq!(stats.all.memory.used, 40);
        assert_eq!(
            stats.dominfo,
            DomInfo {
                allocated_cpus: 3,
                allocated_memory: 1536,
                total_nodes: 4,
                running_nodes: 3
            }
        );
        assert!(matches!(
            system_stats_from(serde_json::json!([1])),
            Err(CmlError::Unavailable(_))
        ));
    }
}
