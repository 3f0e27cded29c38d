//! The per-call middleware every request goes through, outermost first:
//!
//! 1. **request id** — the client's `x-request-id` (1..=[`MAX_REQUEST_ID_LEN`] visible ASCII
//!    characters) or a fresh UUID; put back on the request (header and [`RequestId`] extension),
//!    held in a task-local for error mapping (see [`current_request_id`]), and echoed on the response (initial
//!    metadata, or the trailers of a trailers-only error);
//! 2. **tracing** — one `rpc` span per call with `rpc.method`, `request_id`, and, when the call
//!    ends, `grpc.code` and `latency_ms` (also logged as an `rpc finished` event). For streams the
//!    call ends with the trailers, so the latency covers the whole stream;
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

use crate::error::BoxError;

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
}

/// The request id of the call being served, if the caller runs inside one (unary handlers and
/// the polling of a streaming response body do).
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
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

        let span = tracing::info_span!(
            "rpc",
            rpc.method = %method,
            request_id = %id,
            grpc.code = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let record = CallRecord {
            span: span.clone(),
            started,
            public,
            in_flight: Some(in_flight),
            done: false,
        };

        let task_id = id.clone();
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
            Ok(observe(response, record, task_id))
        };
        Box::pin(REQUEST_ID.scope(id, fut.instrument(span)))
    }
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
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: Option<tonic::Code>, note: &str) {
        if self.done {
            return;
        }
        self.done = true;
        self.in_flight.take();
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let code_name = code.map_or("NONE", code_name);
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
fn observe(response: GrpcResponse, mut record: CallRecord, request_id: String) -> GrpcResponse {
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
        request_id,
    };
    http::Response::from_parts(parts, tonic::body::Body::new(observed))
}

/// A response body that reports the call's status when its trailers pass, and polls the inner
/// body inside the call's span and request-id scope (so streaming handlers log and map errors
/// with the request id).
struct ObservedBody {
    inner: tonic::body::Body,
    record: CallRecord,
    request_id: String,
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
        let polled =
            REQUEST_ID.sync_scope(this.request_id.clone(), || Pin::new(inner).poll_frame(cx));
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
