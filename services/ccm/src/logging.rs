//! Log output and tracing of the services, set up by `ccm_runtime::telemetry`: `tracing` to
//! standard error as text or JSON lines (with `trace_id` / `span_id`), filtered by `RUST_LOG`
//! (default `ccm_runtime::telemetry::DEFAULT_LOG_FILTER`), W3C trace ids on every span, and OTLP export when an
//! endpoint is configured.

use ccm_control_plane::config::LogFormat;
use ccm_runtime::telemetry::{self, TelemetryGuard, TelemetrySettings};

/// Installs the global subscriber with logs only (no trace export), once; later calls do
/// nothing.
pub fn init(format: &LogFormat) {
    let settings = TelemetrySettings {
        log_format: runtime_format(*format),
        ..TelemetrySettings::default()
    };
    if let Ok(guard) = telemetry::init(&settings) {
        // Nothing is exported, so there is nothing to flush: keep the tracer for the whole
        // process.
        std::mem::forget(guard);
    }
}

/// Installs the global subscriber with `settings` (OTLP export included). Call it inside the
/// Tokio runtime; keep the guard until the service has stopped and drop it before the runtime
/// (it flushes the last spans).
pub fn init_telemetry(
    settings: &TelemetrySettings,
) -> Result<TelemetryGuard, ccm_runtime::RuntimeError> {
    telemetry::init(settings)
}

fn runtime_format(format: LogFormat) -> telemetry::LogFormat {
    match format {
        LogFormat::Text => telemetry::LogFormat::Text,
        LogFormat::Json => telemetry::LogFormat::Json,
    }
}
