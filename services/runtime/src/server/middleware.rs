//! The per-call middleware every request goes through, outermost first:
//!
//! 1. **request id** — the client's `x-request-id` (1..=[`MAX_REQUEST_ID_LEN`] visible ASCII
//!    characters) or a fresh UUID; put back on the request (header and [`RequestId`] extension),
//!    held in a task-local for error mapping (see [`current_request_id`]), and echoed on the response (initial
//!    metadata, or the trailers of a trailers-only error);
//! 2. **tracing and metrics** — one `rpc` span per call with `rpc.method`, `request_id`,
//!    `trace_id`, and, when the call ends, `grpc.code` and `latency_ms` (also logged as an
//!    `rpc finished` event). For streams the call ends with the trailers, so the latency covers
//!    the whole stream. The span is a child of the caller's span when the call carries a W3C
//!    `traceparent` (see [`crate::telemetry`]); its trace id is held in a task-local
//!    ([`current_trace_id`]) for audit records. The call is counted in the gRPC server metrics
//!    (requests by service/method/code, latency, in flight; see [`crate::metrics`]);
//! 3. **deadline** — the shorter of the client's `grpc-timeout` and the server's request timeout
//!    bounds the time until the response starts (queueing included); when it passes the handler
//!    is dropped and the client gets `DEADLINE_EXCEEDED`. A server stream, once open, is not cut;
//! 4. **concurrency limit** — at most N application calls run their handlers at once (a permit
//!    is held until the handler has produced its response); further calls wait, within their
//!    deadline. Health checks and reflection are not limited, so a saturated server still
//!    answers its health probes;
//! 5. the **extra layer** (authentication / authorisation, plugged in by the auth crate) and the
//!    application services — or, for `grpc.health.v1.Health/*` and `grpc.reflection.*`, the
//!    public services, which skip the extra layer (probes and `grpcurl list` need no token).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::Frame;
use tokio::sync::Semaphore;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::error::{BoxError, RuntimeError};
use crate::metrics::{Counter, DEFAULT_LATENCY_BUCKETS, Gauge, Histogram, Metrics};

/// The HTTP request type of gRPC calls.
pub type GrpcRequest = http::Request<tonic::body::Body>;
/// The HTTP response type of gRPC calls.
pub type GrpcResponse = http::Response<tonic::body::Body>;
/// A type-erased gRPC service: what the extra layer wraps and returns.
pub type BoxedGrpcService = BoxCloneService<GrpcRequest, GrpcResponse, BoxError>;

/// Header (gRPC metadata key) carrying the request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest client-supplied request id kept; longer (or non-ASCII) ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Path prefix of the health service (served without the extra layer or concurrency limit).
pub const HEALTH_PATH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Path prefix of the reflection services (served without the extra layer or concurrency
/// limit).
pub const REFLECTION_PATH_PREFIX: &str = "/grpc.reflection.";

tokio::task_local! {
    static REQUEST_ID: String;
    static TRACE_ID: String;
}

/// The request id of the call being served, if the caller runs inside one (unary handlers and
/// the polling of a streaming response body do).
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The W3C trace id (32 lowercase hex digits) of the call being served, if the caller runs
/// inside one: the caller's (from its `traceparent`) or, for a call without one, the id of the
/// trace the call started. Set in the same places as [`current_request_id`].
pub fn current_trace_id() -> Option<String> {
    TRACE_ID.try_with(Clone::clone).ok()
}

/// The request id of a call, as a request extension (`request.extensions().get::<RequestId>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The request id of a tonic request, as set by the middleware.
pub fn request_id<T>(request: &tonic::Request<T>) -> Option<&str> {
    request
        .extensions()
        .get::<RequestId>()
        .map(RequestId::as_str)
}

/// Whether a path is served by the public services (health, reflection).
pub fn is_public_path(path: &str) -> bool {
    path.starts_with(HEALTH_PATH_PREFIX) || path.starts_with(REFLECTION_PATH_PREFIX)
}

fn valid_request_id(value: &HeaderValue) -> Option<String> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit `H`, `M`, `S`, `m`, `u`, `n`.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Settings of the middleware.
#[derive(Debug, Clone)]
pub(crate) struct MiddlewareSettings {
    pub(crate) request_timeout: Duration,
    pub(crate) concurrency: Arc<Semaphore>,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) metrics: GrpcMetrics,
}

/// Name of the gRPC server request counter (labels `service`, `method`, `code`).
pub const METRIC_REQUESTS: &str = "ccm_grpc_server_requests_total";
/// Name of the gRPC server latency histogram, seconds (labels `service`, `method`).
pub const METRIC_DURATION: &str = "ccm_grpc_server_request_duration_seconds";
/// Name of the gauge of gRPC calls in flight (labels `service`, `method`).
pub const METRIC_IN_FLIGHT: &str = "ccm_grpc_server_in_flight_requests";
/// The `service` / `method` label value of calls to paths the server does not know (kept out
/// of the labels so a client cannot create series at will).
pub const UNKNOWN_LABEL: &str = "unknown";

/// The gRPC server metrics, recorded by the middleware.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetrics {
    requests: Counter,
    duration: Histogram,
    in_flight: Gauge,
    known_methods: Arc<std::collections::HashSet<String>>,
    known_services: Arc<std::collections::HashSet<String>>,
}

impl GrpcMetrics {
    /// Registers the metrics in `metrics`; `methods` are the full paths
    /// (`/pkg.Service/Method`) and `services` the names labelled as they are.
    pub(crate) fn register(
        metrics: &Metrics,
        services: impl IntoIterator<Item = String>,
        methods: impl IntoIterator<Item = String>,
    ) -> Result<Self, RuntimeError> {
        Ok(GrpcMetrics {
            requests: metrics.counter(
                METRIC_REQUESTS,
                "gRPC calls finished, by service, method and status code.",
                &["service", "method", "code"],
            )?,
            duration: metrics.histogram(
                METRIC_DURATION,
                "Time from the start of a gRPC call to its status (streams: to the trailers).",
                &["service", "method"],
                DEFAULT_LATENCY_BUCKETS,
            )?,
            in_flight: metrics.gauge(
                METRIC_IN_FLIGHT,
                "gRPC calls started and not finished.",
                &["service", "method"],
            )?,
            known_methods: Arc::new(methods.into_iter().collect()),
            known_services: Arc::new(services.into_iter().collect()),
        })
    }

    /// The `service` and `method` labels of a path.
    fn labels(&self, path: &str) -> (String, String) {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        if self.known_methods.contains(path) {
            (service.to_owned(), method.to_owned())
        } else if self.known_services.contains(service) {
            (service.to_owned(), UNKNOWN_LABEL.to_owned())
        } else {
            (UNKNOWN_LABEL.to_owned(), UNKNOWN_LABEL.to_owned())
        }
    }
}

/// The metric series of one call; the in-flight gauge is decremented when it is dropped.
struct CallMetrics {
    metrics: GrpcMetrics,
    service: String,
    method: String,
    finished: bool,
}

impl CallMetrics {
    fn start(metrics: &GrpcMetrics, path: &str) -> Self {
        let (service, method) = metrics.labels(path);
        metrics.in_flight.inc(&[&service, &method]);
        CallMetrics {
            metrics: metrics.clone(),
            service,
            method,
            finished: false,
        }
    }

    fn finish(&mut self, code: &str, elapsed: Duration) {
        if self.finished {
            return;
        }
        self.finished = true;
        let labels = [self.service.as_str(), self.method.as_str()];
        self.metrics.in_flight.dec(&labels);
        self.metrics
            .requests
            .inc(&[&self.service, &self.method, code]);
        self.metrics.duration.observe_duration(&labels, elapsed);
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .in_flight
                .dec(&[self.service.as_str(), self.method.as_str()]);
        }
    }
}

/// The middleware service (see the module docs).
#[derive(Clone)]
pub(crate) struct RpcService {
    app: BoxedGrpcService,
    public: BoxedGrpcService,
    settings: MiddlewareSettings,
}

impl RpcService {
    pub(crate) fn new(
        app: BoxedGrpcService,
        public: BoxedGrpcService,
        settings: MiddlewareSettings,
    ) -> Self {
        RpcService {
            app,
            public,
            settings,
        }
    }
}

fn status_response(status: tonic::Status) -> GrpcResponse {
    status.into_http::<tonic::body::Body>()
}

fn grpc_code_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get(tonic::Status::GRPC_STATUS)
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

impl Service<GrpcRequest> for RpcService {
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<GrpcResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited inside the call (`oneshot`), under the deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: GrpcRequest) -> Self::Future {
        let started = Instant::now();
        let id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(valid_request_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let id_header = HeaderValue::from_str(&id).ok();
        if let Some(value) = &id_header {
            req.headers_mut().insert(REQUEST_ID_HEADER, value.clone());
        }
        req.extensions_mut().insert(RequestId(id.clone()));

        let method = req.uri().path().to_owned();
        let public = is_public_path(&method);
        let client_timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let server_timeout = self.settings.request_timeout;
        let (deadline, deadline_source) = match client_timeout {
            Some(t) if t < server_timeout => (t, "the client's grpc-timeout"),
            _ => (server_timeout, "the server's request timeout"),
        };

        let svc = if public {
            self.public.clone()
        } else {
            self.app.clone()
        };
        let semaphore = (!public).then(|| self.settings.concurrency.clone());
        let in_flight = InFlight::enter(&self.settings.in_flight);
        let call_metrics = CallMetrics::start(&self.settings.metrics, &method);

        let span = tracing::info_span!(
            "rpc",
            otel.name = %method.strip_prefix('/').unwrap_or(&method),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.method = %method,
            request_id = %id,
            trace_id = tracing::field::Empty,
            grpc.code = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let parent = crate::telemetry::extract_context(req.headers());
        let trace_id = crate::telemetry::adopt_parent(&span, &parent);
        span.record("trace_id", trace_id.as_str());
        let record = CallRecord {
            span: span.clone(),
            started,
            public,
            in_flight: Some(in_flight),
            metrics: call_metrics,
            done: false,
        };

        let task_ids = TaskIds {
            request_id: id.clone(),
            trace_id: trace_id.clone(),
        };
        let fut = async move {
            let work = async move {
                let _permit = match semaphore {
                    Some(s) => s.acquire_owned().await.ok(),
                    None => None,
                };
                svc.oneshot(req).await
            };
            let mut response = match tokio::time::timeout(deadline, work).await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => status_response(tonic::Status::from_error(err)),
                Err(_) => status_response(tonic::Status::deadline_exceeded(format!(
                    "deadline exceeded: no response within {} ms ({deadline_source})",
                    deadline.as_millis()
                ))),
            };
            if let Some(value) = id_header {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            Ok(observe(response, record, task_ids))
        };
        Box::pin(REQUEST_ID.scope(id, TRACE_ID.scope(trace_id, fut.instrument(span))))
    }
}

/// The ids held in task-locals while a call's handler or response body runs.
#[derive(Clone)]
struct TaskIds {
    request_id: String,
    trace_id: String,
}

/// Counts a call as in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The end of one call: logs `rpc finished` once, with the code and latency.
struct CallRecord {
    span: tracing::Span,
    started: Instant,
    public: bool,
    in_flight: Option<InFlight>,
    metrics: CallMetrics,
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: Option<tonic::Code>, note: &str) {
        if self.done {
            return;
        }
        self.done = true;
        self.in_flight.take();
        let elapsed = self.started.elapsed();
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let code_name = code.map_or("NONE", code_name);
        self.metrics.finish(code_name, elapsed);
        self.span.record("grpc.code", code_name);
        self.span.record("latency_ms", latency_ms);
        let _entered = self.span.enter();
        let server_side = matches!(
            code,
            None | Some(
                tonic::Code::Internal
                    | tonic::Code::Unknown
                    | tonic::Code::DataLoss
                    | tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
            )
        );
        if server_side {
            self.span.record("otel.status_code", "ERROR");
        }
        if self.public {
            tracing::debug!(grpc.code = code_name, latency_ms, note, "rpc finished");
        } else if server_side {
            tracing::warn!(grpc.code = code_name, latency_ms, note, "rpc finished");
        } else {
            tracing::info!(grpc.code = code_name, latency_ms, note, "rpc finished");
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.done {
            self.finish(
                Some(tonic::Code::Cancelled),
                "the response was dropped before it completed (client went away or the \
                 connection closed)",
            );
        }
    }
}

/// The upper-snake name of a gRPC code, as in the spec (`DEADLINE_EXCEEDED`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Logs the call's end: at once for a trailers-only response (the status is in the headers),
/// otherwise when the body's trailers pass (or the body ends or is dropped).
fn observe(response: GrpcResponse, mut record: CallRecord, ids: TaskIds) -> GrpcResponse {
    if let Some(code) = grpc_code_of(response.headers()) {
        record.finish(Some(code), "trailers-only response");
        return response;
    }
    let (parts, body) = response.into_parts();
    if http_body::Body::is_end_stream(&body) {
        record.finish(None, "response without a grpc-status");
        return http::Response::from_parts(parts, body);
    }
    let observed = ObservedBody {
        inner: body,
        record,
        ids,
    };
    http::Response::from_parts(parts, tonic::body::Body::new(observed))
}

/// A response body that reports the call's status when its trailers pass, and polls the inner
/// body inside the call's span and request-id / trace-id scope (so streaming handlers log and
/// map errors with the request id).
struct ObservedBody {
    inner: tonic::body::Body,
    record: CallRecord,
    ids: TaskIds,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let span = this.record.span.clone();
        let _entered = span.enter();
        let inner = &mut this.inner;
        let ids = this.ids.clone();
        let polled = REQUEST_ID.sync_scope(ids.request_id, || {
            TRACE_ID.sync_scope(ids.trace_id, || Pin::new(inner).poll_frame(cx))
        });
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.record.finish(grpc_code_of(trailers), "");
                }
            }
            Poll::Ready(Some(Err(status))) => {
                this.record
                    .finish(Some(status.code()), "response body failed");
            }
            Poll::Ready(None) => this.record.finish(None, "response ended without trailers"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
