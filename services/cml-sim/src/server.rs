//! The HTTP side: routes, multi-host path rewriting, gates (latency, unreachable, ready, auth).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::options::{DEFAULT_HOST, FaultPatch, MAX_HOSTS, SimOptions};
use crate::state::{ApiError, Host, LabAction};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(serde_json::json!({"code": self.status, "description": self.description})),
        )
            .into_response()
    }
}

/// Every simulated CML of one server, by host name.
pub(crate) struct Sim {
    opts: Arc<SimOptions>,
    hosts: Mutex<BTreeMap<String, Arc<Host>>>,
}

/// The host a request addresses (set by [`rewrite`]).
#[derive(Debug, Clone)]
struct HostName(String);

/// Whether `name` can name a simulated CML in a path (`i-0abc`, `worker-1.local`, ...).
pub(crate) fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "api"
        && name != "_sim"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

impl Sim {
    pub(crate) fn new(opts: SimOptions) -> Self {
        Sim {
            opts: Arc::new(opts),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }

    /// The simulated CML `name`, created on first use.
    pub(crate) fn host(&self, name: &str) -> Result<Arc<Host>, ApiError> {
        if !valid_host_name(name) {
            return Err(ApiError::new(404, format!("invalid host name {name:?}")));
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(host) = hosts.get(name) {
            return Ok(Arc::clone(host));
        }
        if hosts.len() >= MAX_HOSTS {
            return Err(ApiError::new(
                503,
                format!("the simulator already holds {MAX_HOSTS} hosts"),
            ));
        }
        tracing::debug!(host = name, "simulated CML created");
        let host = Arc::new(Host::new(name.to_owned(), Arc::clone(&self.opts)));
        hosts.insert(name.to_owned(), Arc::clone(&host));
        Ok(host)
    }

    pub(crate) fn host_names(&self) -> Vec<String> {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// Multi-host mode: `/{host}/api/v0/...` and `/{host}/_sim/...` become `/api/v0/...` and
/// `/_sim/...` for host `{host}`; unprefixed paths address [`DEFAULT_HOST`].
pub(crate) fn rewrite(mut req: Request) -> Request {
    let path = req.uri().path().to_owned();
    let mut host = DEFAULT_HOST.to_owned();
    let is_api = |rest: &str| {
        rest == "/api" || rest.starts_with("/api/") || rest == "/_sim" || rest.starts_with("/_sim/")
    };
    if !is_api(&path)
        && let Some(stripped) = path.strip_prefix('/')
        && let Some((first, rest_without_slash)) = stripped.split_once('/')
    {
        let rest = format!("/{rest_without_slash}");
        if valid_host_name(first) && is_api(&rest) {
            let path_and_query = match req.uri().query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest,
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = path_and_query.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                    host = first.to_owned();
                }
            }
        }
    }
    req.extensions_mut().insert(HostName(host));
    req
}

/// Resolves the request's host and hands it to the handlers as `Extension<Arc<Host>>`.
async fn resolve_host(State(sim): State<Arc<Sim>>, mut req: Request, next: Next) -> Response {
    let name = req
        .extensions()
        .get::<HostName>()
        .map(|h| h.0.clone())
        .unwrap_or_else(|| DEFAULT_HOST.to_owned());
    match sim.host(&name) {
        Ok(host) => {
            req.extensions_mut().insert(host);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

fn host_of(req: &Request) -> Result<Arc<Host>, ApiError> {
    req.extensions()
        .get::<Arc<Host>>()
        .cloned()
        .ok_or_else(|| ApiError::new(500, "no host resolved"))
}

/// Injected latency and unreachability, for every `/api/v0` call.
async fn gate(req: Request, next: Next) -> Response {
    let host = match host_of(&req) {
        Ok(host) => host,
        Err(e) => return e.into_response(),
    };
    let (latency, unreachable) = host.gate();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if unreachable {
        return ApiError::new(503, "CML is unreachable (simulated).").into_response();
    }
    next.run(req).await
}

/// A CML that is not ready answers only `system_information`.
async fn require_ready(req: Request, next: Next) -> Response {
    match host_of(&req) {
        Ok(host) if host.is_ready() => next.run(req).await,
        Ok(_) => {
            ApiError::new(503, "CML is starting: the controller is not ready yet.").into_response()
        }
        Err(e) => e.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn require_auth(req: Request, next: Next) -> Response {
    let host = match host_of(&req) {
        Ok(host) => host,
        Err(e) => return e.into_response(),
    };
    match host.authorize(bearer(req.headers())) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let mut response = e.into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("{what}: {e}")))
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

async fn authenticate(
    Extension(host): Extension<Arc<Host>>,
    body: Bytes,
) -> Result<Json<String>, ApiError> {
    let creds: Credentials = parse_body(&body, "authenticate")?;
    host.authenticate(&creds.username, &creds.password)
        .map(Json)
}

async fn system_information(Extension(host): Extension<Arc<Host>>) -> Json<serde_json::Value> {
    Json(host.system_information())
}

async fn system_health(Extension(host): Extension<Arc<Host>>) -> Json<serde_json::Value> {
    Json(host.system_health())
}

async fn system_stats(Extension(host): Extension<Arc<Host>>) -> Json<serde_json::Value> {
    Json(host.system_stats())
}

async fn licensing(Extension(host): Extension<Arc<Host>>) -> Json<serde_json::Value> {
    Json(host.licensing())
}

#[derive(Deserialize)]
struct Registration {
    token: String,
    #[serde(default)]
    reregister: bool,
}

async fn register(
    Extension(host): Extension<Arc<Host>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let request: Registration = parse_body(&body, "registration")?;
    host.register(&request.token, request.reregister)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deregister(Extension(host): Extension<Arc<Host>>) -> Result<StatusCode, ApiError> {
    let status = host.deregister()?;
    Ok(StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT))
}

async fn list_labs(Extension(host): Extension<Arc<Host>>) -> Json<Vec<String>> {
    Json(host.list_labs())
}

async fn get_lab(
    Extension(host): Extension<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    host.get_lab(&id).map(Json)
}

async fn delete_lab(
    Extension(host): Extension<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    host.delete_lab(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn download(
    Extension(host): Extension<Arc<Host>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let yaml = host.download(&id)?;
    Ok(([(header::CONTENT_TYPE, "application/x-yaml")], yaml).into_response())
}

async fn lab_action(
    State(sim): State<Arc<Sim>>,
    Extension(host): Extension<Arc<Host>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let action = match action.as_str() {
        "start" => LabAction::Start,
        "stop" => LabAction::Stop,
        "wipe" => LabAction::Wipe,
        other => {
            return Err(ApiError::new(
                404,
                format!("unknown lab operation {other:?}"),
            ));
        }
    };
    host.pre_action(&id, action)?;
    if action == LabAction::Start && !sim.opts.start_duration.is_zero() {
        tokio::time::sleep(sim.opts.start_duration).await;
    }
    host.lab_action(&id, action)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ImportQuery {
    title: Option<String>,
}

async fn import(
    State(sim): State<Arc<Sim>>,
    Extension(host): Extension<Arc<Host>>,
    Query(query): Query<ImportQuery>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !sim.opts.import_duration.is_zero() {
        tokio::time::sleep(sim.opts.import_duration).await;
    }
    if host.take_import_fault() {
        return Err(ApiError::new(
            500,
            "The API at /api/v0/import encountered an unexpected error (simulated).",
        ));
    }
    let yaml = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(400, "the lab is not UTF-8 text"))?;
    let id = host.import(yaml, query.title)?;
    Ok(Json(serde_json::json!({"id": id, "warnings": []})))
}

async fn telemetry(Extension(host): Extension<Arc<Host>>) -> Json<serde_json::Value> {
    Json(host.telemetry())
}

async fn api_not_found(uri: Uri) -> ApiError {
    ApiError::new(404, format!("no such API: {}", uri.path()))
}

// ---- admin ----

async fn admin_state(Extension(host): Extension<Arc<Host>>) -> Json<crate::HostSnapshot> {
    Json(host.snapshot())
}

async fn admin_hosts(State(sim): State<Arc<Sim>>) -> Json<Vec<String>> {
    Json(sim.host_names())
}

async fn admin_faults(
    Extension(host): Extension<Arc<Host>>,
    body: Bytes,
) -> Result<Json<crate::Faults>, ApiError> {
    let patch: FaultPatch = parse_body(&body, "faults")?;
    Ok(Json(host.patch_faults(&patch)))
}

async fn admin_clear_faults(Extension(host): Extension<Arc<Host>>) -> Json<crate::Faults> {
    Json(host.clear_faults())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryInput {
    category: String,
    #[serde(default)]
    data: serde_json::Value,
}

async fn admin_telemetry(
    Extension(host): Extension<Arc<Host>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let event: TelemetryInput = parse_body(&body, "telemetry event")?;
    if event.category.trim().is_empty() {
        return Err(ApiError::new(400, "telemetry event: empty category"));
    }
    let data = if event.data.is_null() {
        serde_json::json!({})
    } else {
        event.data
    };
    host.push_telemetry(&event.category, data);
    Ok(StatusCode::NO_CONTENT)
}

async fn admin_reset(Extension(host): Extension<Arc<Host>>) -> StatusCode {
    host.reset();
    StatusCode::NO_CONTENT
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(404, format!("not found: {}", uri.path()))
}

/// The whole application (before the multi-host rewrite).
pub(crate) fn router(sim: Arc<Sim>) -> Router {
    let protected = Router::new()
        .route("/system_health", get(system_health))
        .route("/system_stats", get(system_stats))
        .route("/licensing", get(licensing))
        .route("/licensing/registration", post(register))
        .route(
            "/licensing/deregistration",
            axum::routing::delete(deregister),
        )
        .route("/labs", get(list_labs))
        .route("/labs/{id}", get(get_lab).delete(delete_lab))
        .route("/labs/{id}/download", get(download))
        .route("/labs/{id}/{action}", put(lab_action))
        .route("/import", post(import))
        .route("/telemetry/events", get(telemetry))
        .route_layer(middleware::from_fn(require_auth));
    let ready = Router::new()
        .route("/authenticate", post(authenticate))
        .merge(protected)
        .route_layer(middleware::from_fn(require_ready));
    let api = Router::new()
        .route("/system_information", get(system_information))
        .merge(ready)
        .fallback(api_not_found)
        .layer(middleware::from_fn(gate))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&sim),
            resolve_host,
        ));
    let admin = Router::new()
        .route("/state", get(admin_state))
        .route("/hosts", get(admin_hosts))
        .route("/faults", post(admin_faults).delete(admin_clear_faults))
        .route("/telemetry", post(admin_telemetry))
        .route("/reset", post(admin_reset))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&sim),
            resolve_host,
        ));
    Router::new()
        .nest("/api/v0", api)
        .nest("/_sim", admin)
        .fallback(not_found)
        .with_state(sim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(uri: &str) -> (String, String) {
        let req = Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let req = rewrite(req);
        let host = req.extensions().get::<HostName>().unwrap().0.clone();
        (host, req.uri().to_string())
    }

    #[test]
    fn host_prefixes_are_stripped() {
        assert_eq!(
            rewritten("/api/v0/labs"),
            ("default".into(), "/api/v0/labs".into())
        );
        assert_eq!(
            rewritten("/i-0abc/api/v0/labs?show_all=true"),
            ("i-0abc".into(), "/api/v0/labs?show_all=true".into())
        );
        assert_eq!(
            rewritten("/i-0abc/_sim/state"),
            ("i-0abc".into(), "/_sim/state".into())
        );
        // Not an API path: left alone (404 later).
        assert_eq!(
            rewritten("/i-0abc/other"),
            ("default".into(), "/i-0abc/other".into())
        );
        assert_eq!(
            rewritten("/a%20b/api/v0/labs"),
            ("default".into(), "/a%20b/api/v0/labs".into())
        );
    }

    #[test]
    fn host_names_are_restricted() {
        for ok in ["i-0abc123", "worker.1", "a_b"] {
            assert!(valid_host_name(ok), "{ok}");
        }
        for bad in ["", "api", "_sim", "..", "a b", "a/b", &"x".repeat(129)] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }
}
