//! Tracing, trace-context propagation, OTLP export and log output of every ccm service.
//!
//! # Setting up a process
//!
//! ```no_run
//! # fn example() -> Result<(), ccm_runtime::RuntimeError> {
//! use ccm_runtime::telemetry::{self, LogFormat, TelemetrySettings};
//!
//! let runtime = tokio::runtime::Runtime::new().expect("runtime");
//! // Inside the runtime: the OTLP exporter's gRPC channel needs it.
//! let guard = runtime.block_on(async {
//!     telemetry::init(&TelemetrySettings {
//!         service_name: "ccm-scheduler".into(),
//!         log_format: LogFormat::Json,
//!         otlp_endpoint: Some("http://otel-collector:4317".into()),
//!         ..TelemetrySettings::default()
//!     })
//! })?;
//! // … runtime.block_on(serve(…)) …
//! drop(guard); // flushes the spans not exported yet (outside the runtime, before it is dropped)
//! # Ok(()) }
//! ```
//!
//! [`init`] installs the global `tracing` subscriber:
//!
//! - an `EnvFilter` from [`TelemetrySettings::log_filter`], else `RUST_LOG`, else
//!   [`DEFAULT_LOG_FILTER`];
//! - the OpenTelemetry layer (always: every span gets a W3C trace id and span id, used in logs,
//!   audit records and outgoing `traceparent` headers); spans are exported over OTLP/gRPC only
//!   when [`TelemetrySettings::otlp_endpoint`] is set (batched; flushed when the
//!   [`TelemetryGuard`] is dropped);
//! - logs on standard error: text lines, or one JSON object per line carrying `trace_id` and
//!   `span_id` (those of the innermost span the event is in) next to tracing-subscriber's usual
//!   `timestamp`, `level`, `target`, `fields`, `span` and `spans`.
//!
//! # Propagation
//!
//! The server middleware reads `traceparent` / `tracestate` from incoming gRPC metadata and
//! makes the call's `rpc` span a child of the caller's span ([`extract_context`]).
//! [`crate::client::PlaneClient`] writes the current span's context into every outgoing call
//! ([`inject_current`]); other clients (the gateway's HTTP → gRPC hop, a reqwest call) use
//! [`inject_current`] / [`extract_context`] on their own header maps.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing::dispatcher::WeakDispatch;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error::RuntimeError;

/// The log filter when neither the settings nor `RUST_LOG` give one.
pub const DEFAULT_LOG_FILTER: &str = "info";
/// Directives added to the default filter: the transport crates' own chatter stays out of the
/// logs and, above all, out of the exported traces.
pub const DEFAULT_QUIET_DIRECTIVES: &[&str] = &[
    "h2=warn",
    "hyper=warn",
    "hyper_util=warn",
    "tower=warn",
    "opentelemetry=warn",
    "opentelemetry_sdk=warn",
    "opentelemetry_otlp=warn",
];
/// Longest time one OTLP export may take.
pub const DEFAULT_OTLP_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time dropping the [`TelemetryGuard`] waits for the last spans to be exported.
pub const TELEMETRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The `service.name` resource attribute when none is given.
pub const DEFAULT_SERVICE_NAME: &str = "ccm";
/// The W3C trace-context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C trace-state header.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id`.
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// `service.name` of exported spans (`ccm-control-plane`, `ccm-scheduler`, …).
    pub service_name: String,
    /// Log output format.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive string; `None`: `RUST_LOG`, else [`DEFAULT_LOG_FILTER`] with
    /// [`DEFAULT_QUIET_DIRECTIVES`].
    pub log_filter: Option<String>,
    /// OTLP/gRPC endpoint spans are exported to (`http://collector:4317`); `None`: no export.
    pub otlp_endpoint: Option<String>,
    /// Longest time one export may take.
    pub otlp_timeout: Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            log_format: LogFormat::Text,
            log_filter: None,
            otlp_endpoint: None,
            otlp_timeout: DEFAULT_OTLP_EXPORT_TIMEOUT,
        }
    }
}

/// Keeps the tracer provider alive; dropping it exports the spans still buffered (waiting at
/// most [`TELEMETRY_FLUSH_TIMEOUT`]). Drop it outside the Tokio runtime (or on a multi-thread
/// runtime) and before the runtime itself: the export runs on the runtime's connections.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.exporting)
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports the buffered spans now (blocking; same rules as dropping the guard).
    pub fn flush(&self) -> Result<(), RuntimeError> {
        let Some(provider) = &self.provider else {
            return Ok(());
        };
        let provider = provider.clone();
        off_runtime(move || provider.force_flush())
            .map_err(|e| RuntimeError::Telemetry(format!("flushing spans: {e}")))
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) =
                off_runtime(move || provider.shutdown_with_timeout(TELEMETRY_FLUSH_TIMEOUT))
        {
            // The subscriber may already be gone at exit: standard error is the last resort.
            eprintln!("ccm: flushing spans at exit failed: {e}");
        }
    }
}

/// Runs a blocking OpenTelemetry call without blocking a runtime thread the export needs.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => f(),
    }
}

/// Installs the global subscriber (see the module docs), logging to standard error. Call it
/// once, early, inside the Tokio runtime when an OTLP endpoint is set. A second call fails: a
/// global subscriber exists.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, RuntimeError> {
    init_with_writer(settings, std::io::stderr)
}

/// [`init`], with the log lines written to `writer` instead of standard error (tests, or a
/// process that logs to a file).
pub fn init_with_writer<W>(
    settings: &TelemetrySettings,
    writer: W,
) -> Result<TelemetryGuard, RuntimeError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = match &settings.log_filter {
        Some(directives) => EnvFilter::try_new(directives)
            .map_err(|e| RuntimeError::Telemetry(format!("log filter {directives:?}: {e}")))?,
        None => match std::env::var(EnvFilter::DEFAULT_ENV) {
            Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
                .map_err(|e| RuntimeError::Telemetry(format!("RUST_LOG {directives:?}: {e}")))?,
            _ => default_filter()?,
        },
    };

    let exporting = settings.otlp_endpoint.is_some();
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build(),
    );
    if let Some(endpoint) = &settings.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RuntimeError::Telemetry(
                "OTLP export must be set up inside the Tokio runtime".into(),
            ));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(settings.otlp_timeout)
            .build()
            .map_err(|e| RuntimeError::Telemetry(format!("OTLP exporter for {endpoint}: {e}")))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("ccm");
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let dispatch = Arc::new(OnceLock::new());
    let fmt_layer = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonWithTraceIds {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
                dispatch: dispatch.clone(),
            })
            .with_writer(writer)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(fmt_layer)
        .with(DispatchCapture(dispatch))
        .try_init()
        .map_err(|e| {
            RuntimeError::Telemetry(format!("a global tracing subscriber is already set: {e}"))
        })?;
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(endpoint = %endpoint, service = %settings.service_name, "exporting traces over OTLP");
    }
    Ok(TelemetryGuard {
        provider: Some(provider),
        exporting,
    })
}

fn default_filter() -> Result<EnvFilter, RuntimeError> {
    let mut filter = EnvFilter::try_new(DEFAULT_LOG_FILTER)
        .map_err(|e| RuntimeError::Telemetry(format!("default log filter: {e}")))?;
    for directive in DEFAULT_QUIET_DIRECTIVES {
        let parsed = directive
            .parse()
            .map_err(|e| RuntimeError::Telemetry(format!("directive {directive}: {e}")))?;
        filter = filter.add_directive(parsed);
    }
    Ok(filter)
}

/// Hands the JSON formatter the dispatcher it runs in, to look up span contexts.
struct DispatchCapture(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> Layer<S> for DispatchCapture {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

/// tracing-subscriber's JSON line plus `trace_id` and `span_id`.
struct JsonWithTraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N, F> FormatEvent<S, N> for JsonWithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let span_context = ctx.parent_span().and_then(|span| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let sc = cx.span().span_context().clone();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), Some(sc.span_id().to_string())))
        });
        let ids = span_context.or_else(|| crate::server::current_trace_id().map(|t| (t, None)));
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let trimmed = line.trim_end();
        let Some(body) = trimmed.strip_suffix('}') else {
            return writer.write_str(&line);
        };
        writer.write_str(body)?;
        write!(writer, ",\"trace_id\":\"{trace_id}\"")?;
        if let Some(span_id) = span_id {
            write!(writer, ",\"span_id\":\"{span_id}\"")?;
        }
        writer.write_str("}\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Propagation
// ---------------------------------------------------------------------------------------------

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The remote parent context in `traceparent` / `tracestate` headers (HTTP headers or gRPC
/// metadata as headers). Invalid or missing headers give an empty context.
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The `traceparent` (and `tracestate`, if any) an outgoing call made now should carry: the
/// current span's context when the OpenTelemetry layer is installed; otherwise, inside a served
/// call, the call's trace id with a fresh parent id; otherwise none.
pub fn current_trace_headers() -> Vec<(&'static str, String)> {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        let mut carrier = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        return [TRACEPARENT_HEADER, TRACESTATE_HEADER]
            .into_iter()
            .filter_map(|k| carrier.remove(k).filter(|v| !v.is_empty()).map(|v| (k, v)))
            .collect();
    }
    match crate::server::current_trace_id() {
        Some(trace_id) => vec![(
            TRACEPARENT_HEADER,
            format!("00-{trace_id}-{}-01", random_span_id()),
        )],
        None => Vec::new(),
    }
}

/// Writes [`current_trace_headers`] into HTTP `headers`. Returns whether `traceparent` was
/// written.
pub fn inject_current(headers: &mut http::HeaderMap) -> bool {
    let mut written = false;
    for (key, value) in current_trace_headers() {
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            headers.insert(key, value);
            written |= key == TRACEPARENT_HEADER;
        }
    }
    written
}

/// Writes [`current_trace_headers`] into gRPC `metadata` (what [`crate::client::PlaneClient`]
/// does on every call). Returns whether `traceparent` was written.
pub fn inject_current_metadata(metadata: &mut tonic::metadata::MetadataMap) -> bool {
    let mut written = false;
    for (key, value) in current_trace_headers() {
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_str()) {
            metadata.insert(key, value);
            written |= key == TRACEPARENT_HEADER;
        }
    }
    written
}

/// The W3C trace id (32 lowercase hex digits) of the current span, if the OpenTelemetry layer
/// is installed and the span is enabled; else that of the call being served
/// ([`crate::server::current_trace_id`]), if any.
pub fn trace_id_of_current_span() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        return Some(sc.trace_id().to_string());
    }
    crate::server::current_trace_id()
}

/// Makes `span` (a call's span) a child of `parent` and returns the call's trace id: the span's
/// own (OpenTelemetry layer installed), else the parent's, else a fresh random one.
pub(crate) fn adopt_parent(span: &tracing::Span, parent: &opentelemetry::Context) -> String {
    let parent_sc = parent.span().span_context().clone();
    if parent_sc.is_valid() {
        // Fails only without the OpenTelemetry layer (or for a disabled span): then the ids
        // below come from the parent itself.
        let _ = span.set_parent(parent.clone());
    }
    let own = span.context().span().span_context().clone();
    if own.is_valid() {
        return own.trace_id().to_string();
    }
    if parent_sc.is_valid() {
        return parent_sc.trace_id().to_string();
    }
    random_trace_id()
}

/// A random, valid W3C trace id.
fn random_trace_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    if id.bytes().all(|b| b == b'0') {
        id.replace_range(31.., "1");
    }
    id
}

/// A random, valid W3C parent (span) id.
fn random_span_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(16);
    if id.bytes().all(|b| b == b'0') {
        id.replace_range(15.., "1");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_extracted_and_bad_ones_are_ignored() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT_HEADER,
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let cx = extract_context(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(TRACEPARENT_HEADER, http::HeaderValue::from_static(bad));
            assert!(
                !extract_context(&headers).span().span_context().is_valid(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_span_without_the_layer_adopts_the_parent_trace_id_or_a_fresh_one() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT_HEADER,
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let span = tracing::info_span!("rpc");
        assert_eq!(
            adopt_parent(&span, &extract_context(&headers)),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let a = adopt_parent(&span, &opentelemetry::Context::new());
        let b = adopt_parent(&span, &opentelemetry::Context::new());
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        let s = random_span_id();
        assert_eq!(s.len(), 16);
    }
}
