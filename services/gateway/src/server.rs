//! The HTTP server: the router, the generic API handler, health and readiness.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use prost_reflect::DynamicMessage;
use tonic::client::Grpc;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::codec::DynamicCodec;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::oidc::Login;
use crate::problem::Problem;
use crate::routes::{Route, RouteMatch, RouteTable};
use crate::session::{self, SessionStore};
use crate::transcode::{self, DEFAULT_UNARY_TIMEOUT, FORWARDED_HEADERS, MAX_BODY_BYTES};
use crate::{GatewaySettings, openapi, sse, ui};

/// Prefix of the transcoded API paths.
pub const API_PREFIX: &str = "/v1/";
/// The SSE alias of `EventService.WatchEvents` (the contract's own route,
/// `GET /v1/events:watch`, is served as SSE too).
pub const EVENTS_STREAM_PATH: &str = "/v1/events:stream";
/// Header carrying the request id, generated when the client sends none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Timeout of the readiness probe's health check of the control plane.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect timeout of the backend channels.
pub const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The gRPC channels to the processes behind the gateway.
#[derive(Debug, Clone)]
pub struct Backends {
    control_plane: Channel,
    scheduler: Option<Channel>,
    controller: Option<Channel>,
}

fn lazy_channel(url: &str) -> Result<Channel, GatewayError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| GatewayError::Endpoint {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(BACKEND_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Backends {
    /// Channels (connected lazily) to the configured endpoints.
    pub fn new(settings: &GatewaySettings) -> Result<Self, GatewayError> {
        Ok(Self {
            control_plane: lazy_channel(&settings.control_plane_url)?,
            scheduler: settings
                .scheduler_url
                .as_deref()
                .map(lazy_channel)
                .transpose()?,
            controller: settings
                .controller_url
                .as_deref()
                .map(lazy_channel)
                .transpose()?,
        })
    }

    /// The channel of the process serving `route`.
    fn channel_for(&self, route: &Route) -> Result<Channel, Problem> {
        let missing = |what: &str, flag: &str| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend-not-configured",
                format!("{what} is not configured on this gateway ({flag})"),
            )
        };
        match route.served_by.as_str() {
            "scheduler" => self
                .scheduler
                .clone()
                .ok_or_else(|| missing("the scheduler", "--scheduler-url")),
            "controller" => self
                .controller
                .clone()
                .ok_or_else(|| missing("the controller", "--controller-url")),
            _ => Ok(self.control_plane.clone()),
        }
    }
}

/// Shared state of the handlers.
pub(crate) struct AppState {
    pub(crate) settings: GatewaySettings,
    pub(crate) routes: RouteTable,
    pub(crate) backends: Backends,
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) login: Option<Login>,
    pub(crate) metrics: Metrics,
    pub(crate) openapi: Bytes,
}

pub(crate) type SharedState = Arc<AppState>;

/// Builds gateways.
#[derive(Debug)]
pub struct Gateway;

/// A gateway bound to its address, not yet serving.
pub struct BoundGateway {
    listener: tokio::net::TcpListener,
    router: Router,
    addr: SocketAddr,
}

impl std::fmt::Debug for BoundGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundGateway")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Gateway {
    /// The gateway's router (for embedding, or for tests with tower's `oneshot`).
    pub async fn router(settings: GatewaySettings) -> Result<Router, GatewayError> {
        let routes = RouteTable::from_descriptors(ccm_proto::descriptor_pool())?;
        let backends = Backends::new(&settings)?;
        let sessions = session::store_for(&settings).await?;
        let login = match &settings.oidc {
            Some(oidc) => Some(Login::new(oidc.clone())?),
            None => None,
        };
        let openapi = Bytes::from(openapi::document_json(&routes, settings.oidc.as_ref())?);
        let state = Arc::new(AppState {
            settings,
            routes,
            backends,
            sessions,
            login,
            metrics: Metrics::new(),
            openapi,
        });
        Ok(Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(openapi_json))
            .route("/api/docs", get(api_docs))
            .route("/auth/login", get(crate::oidc::login))
            .route("/auth/callback", get(crate::oidc::callback))
            .route(
                "/auth/logout",
                get(crate::oidc::logout).post(crate::oidc::logout),
            )
            .route("/auth/session", get(crate::oidc::session_info))
            .fallback(fallback)
            .with_state(state))
    }

    /// Builds the gateway and binds its listen address.
    pub async fn bind(settings: GatewaySettings) -> Result<BoundGateway, GatewayError> {
        let addr = settings.listen_addr;
        let router = Self::router(settings).await?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Bind { addr, source })?;
        tracing::info!(%addr, "gateway bound");
        Ok(BoundGateway {
            listener,
            router,
            addr,
        })
    }
}

impl BoundGateway {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight (open SSE
    /// streams are closed).
    pub async fn run<F>(self, shutdown: F) -> Result<(), GatewayError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(GatewayError::Serve)
    }
}

async fn healthz() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], "ok\n")
}

/// Ready when the control plane answers its gRPC health check with SERVING.
async fn readyz(State(state): State<SharedState>) -> Response {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut client = HealthClient::new(state.backends.control_plane.clone());
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(READY_CHECK_TIMEOUT);
    let outcome = tokio::time::timeout(READY_CHECK_TIMEOUT, client.check(request)).await;
    let (ok, detail) = match outcome {
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => {
            (true, "control plane: SERVING".to_owned())
        }
        Ok(Ok(r)) => (false, format!("control plane: {:?}", r.get_ref().status())),
        Ok(Err(status)) => (false, format!("control plane: {}", status.message())),
        Err(_) => (
            false,
            format!("control plane: no answer within {READY_CHECK_TIMEOUT:?}"),
        ),
    };
    if ok {
        ([(header::CACHE_CONTROL, "no-store")], format!("{detail}\n")).into_response()
    } else {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", detail).into_response()
    }
}

async fn metrics_text(State(state): State<SharedState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e).into_response(),
    }
}

async fn openapi_json(State(state): State<SharedState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        state.openapi.clone(),
    )
        .into_response()
}

async fn api_docs() -> Response {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(openapi::DOCS_PAGE),
    )
        .into_response()
}

/// Everything that is not a fixed route: the transcoded API under `/v1/`, else the UI.
async fn fallback(State(state): State<SharedState>, request: Request) -> Response {
    if request.uri().path().starts_with(API_PREFIX) {
        api(state, request).await
    } else {
        ui::serve(&state.settings.ui_dir, request).await
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The generic API handler: route, authenticate, transcode, call, answer.
async fn api(state: SharedState, request: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let id = request_id(&parts.headers);
    if let Ok(v) = HeaderValue::from_str(&id) {
        parts.headers.insert(REQUEST_ID_HEADER, v);
    }
    let path = parts.uri.path().to_owned();
    let (label, mut response) = match dispatch(&state, &mut parts, body).await {
        Ok((label, response)) => (label, response),
        Err((label, problem)) => (
            label,
            problem
                .with_instance(&path)
                .with_request_id(&id)
                .into_response(),
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    state
        .metrics
        .observe(&label, response.status().as_u16(), started.elapsed());
    response
}

type Dispatched = Result<(String, Response), (String, Problem)>;

async fn dispatch(state: &AppState, parts: &mut http::request::Parts, body: Body) -> Dispatched {
    let path = parts.uri.path().to_owned();
    let found = if path == EVENTS_STREAM_PATH && parts.method == Method::GET {
        state
            .routes
            .routes()
            .iter()
            .find(|r| r.is_streaming() && r.rpc.full_name() == sse::WATCH_METHOD)
            .map(|r| (r, Vec::new()))
    } else {
        match state.routes.find(&parts.method, &path) {
            RouteMatch::Found(route, params) => Some((route, params)),
            RouteMatch::MethodNotAllowed(allowed) => {
                let mut p = Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    format!("{} is not allowed on {path}", parts.method),
                );
                p.allow = allowed;
                return Err(("unmatched".into(), p));
            }
            RouteMatch::NotFound => None,
        }
    };
    let Some((route, params)) = found else {
        return Err((
            "unmatched".into(),
            Problem::new(
                StatusCode::NOT_FOUND,
                "route-not-found",
                format!("no API route {} {path}; see /openapi.json", parts.method),
            ),
        ));
    };
    let label = route.label();
    let fail = |p: Problem| (label.clone(), p);
    let authorization = session::authorization(state, &parts.headers)
        .await
        .map_err(fail)?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            fail(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the request body could not be read (limit {MAX_BODY_BYTES} bytes): {e}"),
            ))
        })?;
    if !bytes.is_empty() && !route.body.is_empty() {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(fail(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!("the request body must be application/json, not {content_type}"),
            )));
        }
    }
    let mut message =
        transcode::build_request(route, &params, parts.uri.query(), &bytes).map_err(fail)?;
    let channel = state.backends.channel_for(route).map_err(fail)?;
    let metadata = metadata_from(&parts.headers, authorization.as_ref());
    if route.is_streaming() {
        sse::apply_last_event_id(&mut message, &parts.headers).map_err(fail)?;
        let response = sse::relay(
            channel,
            route,
            message,
            metadata,
            state.settings.sse_heartbeat,
        )
        .await
        .map_err(fail)?;
        return Ok((label, response));
    }
    let timeout = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(DEFAULT_UNARY_TIMEOUT, |t| t.min(DEFAULT_UNARY_TIMEOUT));
    let reply = call_unary(channel, route, message, metadata, timeout)
        .await
        .map_err(|s| fail(Problem::from_status(&s)))?;
    let json = transcode::response_json(&reply, &route.response_body).map_err(fail)?;
    let response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json,
    )
        .into_response();
    Ok((label, response))
}

/// Parses a gRPC timeout header value (`100m`, `5S`).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC metadata of a call: the forwarded headers and the authorization decided on.
pub(crate) fn metadata_from(
    headers: &HeaderMap,
    authorization: Option<&HeaderValue>,
) -> Vec<(
    MetadataKey<tonic::metadata::Ascii>,
    MetadataValue<tonic::metadata::Ascii>,
)> {
    let mut out = Vec::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(*name)
            && let (Ok(k), Ok(v)) = (
                MetadataKey::from_bytes(name.as_bytes()),
                MetadataValue::try_from(value.as_bytes()),
            )
        {
            out.push((k, v));
        }
    }
    if let Some(value) = authorization
        && let Ok(v) = MetadataValue::try_from(value.as_bytes())
    {
        out.push((MetadataKey::from_static("authorization"), v));
    }
    out
}

pub(crate) fn grpc_request(
    message: DynamicMessage,
    metadata: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
) -> tonic::Request<DynamicMessage> {
    let mut request = tonic::Request::new(message);
    for (k, v) in metadata {
        request.metadata_mut().insert(k, v);
    }
    request
}

pub(crate) fn grpc_path(route: &Route) -> Result<http::uri::PathAndQuery, Problem> {
    http::uri::PathAndQuery::try_from(ccm_proto::grpc_path(&route.rpc)).map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "contract",
            format!("bad gRPC path: {e}"),
        )
    })
}

async fn call_unary(
    channel: Channel,
    route: &Route,
    message: DynamicMessage,
    metadata: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    timeout: Duration,
) -> Result<DynamicMessage, tonic::Status> {
    let path = grpc_path(route).map_err(|p| tonic::Status::internal(p.detail.clone()))?;
    let mut request = grpc_request(message, metadata);
    request.set_timeout(timeout);
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("backend not reachable: {e}")))?;
    let codec = DynamicCodec::new(route.rpc.output());
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}
