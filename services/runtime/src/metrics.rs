//! Prometheus metrics: one registry per process ([`Metrics::global`]), handles to register
//! counters, gauges and histograms with labels, and a small HTTP listener serving `/metrics`
//! ([`MetricsServer`]).
//!
//! ```no_run
//! # async fn example() -> Result<(), ccm_runtime::RuntimeError> {
//! use ccm_runtime::metrics::{Metrics, MetricsServer, DEFAULT_LATENCY_BUCKETS};
//!
//! let metrics = Metrics::global();
//! // Register once at start-up (registering the same name again returns the same series).
//! let placements = metrics.counter(
//!     "ccm_scheduler_placements_total",
//!     "Instances placed on a worker, by outcome.",
//!     &["outcome"],
//! )?;
//! let queue = metrics.gauge("ccm_scheduler_queue_depth", "Instances waiting.", &[])?;
//! let cycle = metrics.histogram(
//!     "ccm_scheduler_cycle_duration_seconds",
//!     "Duration of one scheduling cycle.",
//!     &["trigger"],
//!     DEFAULT_LATENCY_BUCKETS,
//! )?;
//!
//! // Record: label values in the order the label names were given.
//! placements.inc(&["placed"]);
//! queue.set(&[], 12);
//! cycle.observe(&["timer"], 0.042);
//!
//! // Serve /metrics (the gRPC server records its own metrics in the same registry).
//! let server = MetricsServer::bind("127.0.0.1:9464".parse().unwrap(), metrics.clone()).await?;
//! tokio::spawn(server.run(std::future::pending()));
//! # Ok(()) }
//! ```
//!
//! # Names
//!
//! Metric names match `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*` (not
//! starting with `__`). A counter is always exposed with the `_total` suffix: register it with or
//! without it, the exposed name is the same. Every ccm metric starts with `ccm_` and the
//! component (`ccm_grpc_server_…`, `ccm_scheduler_…`); `docs/observability.md` lists them all.
//!
//! Registering a name a second time with the same kind and label names returns a handle to the
//! same series (two servers in one process share the gRPC metrics); a different kind, help or
//! label set is an error ([`RuntimeError::Metrics`]).
//!
//! Label values are given by position. A handle called with the wrong number of values records
//! under padded (`""`) or truncated values and logs a warning once: a programming error must not
//! fail a request.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter as PCounter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge as PGauge;
use prometheus_client::metrics::histogram::Histogram as PHistogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::RuntimeError;

/// The address `/metrics` is served on by default (the control plane's; other services pick
/// their own port; see `docs/observability.md`).
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);
/// The path metrics are served on.
pub const METRICS_PATH: &str = "/metrics";
/// The `Content-Type` of the exposition (OpenMetrics text, which Prometheus scrapes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Latency buckets, in seconds, for request and cycle durations: 1 ms to 30 s.
pub const DEFAULT_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How long the metrics listener waits for open scrapes to finish once shut down.
pub const METRICS_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

type Labels = Vec<(Arc<str>, String)>;
/// The label names of a family, in order.
type LabelList = Arc<[Arc<str>]>;

/// Builds histograms with the family's buckets.
#[derive(Clone)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<PHistogram> for Buckets {
    fn new_metric(&self) -> PHistogram {
        PHistogram::new(self.0.iter().copied())
    }
}

#[derive(Clone)]
enum Series {
    Counter(Family<Labels, PCounter>),
    Gauge(Family<Labels, PGauge>),
    Histogram(Family<Labels, PHistogram, Buckets>, Arc<[f64]>),
}

impl Series {
    fn kind(&self) -> &'static str {
        match self {
            Series::Counter(_) => "counter",
            Series::Gauge(_) => "gauge",
            Series::Histogram(..) => "histogram",
        }
    }
}

struct Entry {
    help: String,
    labels: Arc<[Arc<str>]>,
    series: Series,
}

struct Inner {
    registry: Mutex<Registry>,
    entries: Mutex<HashMap<String, Entry>>,
}

/// A metrics registry. Cloning is cheap (the registry is shared). Most code uses
/// [`Metrics::global`]; tests make their own with [`Metrics::new`].
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .inner
            .entries
            .lock()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Metrics").field("names", &names).finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Metrics {
    /// A new, empty registry.
    pub fn new() -> Self {
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The process's registry: what [`crate::server::Server`] records into unless given another
    /// with [`crate::server::Server::with_metrics`], and what a service's `/metrics` serves.
    pub fn global() -> &'static Metrics {
        static GLOBAL: OnceLock<Metrics> = OnceLock::new();
        GLOBAL.get_or_init(Metrics::new)
    }

    /// A counter (monotonic, `u64`) with the given label names. `name` may end in `_total`
    /// or not; it is exposed with it.
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<Counter, RuntimeError> {
        let base = name.strip_suffix("_total").unwrap_or(name);
        let (series, labels) =
            self.register(base, help, labels, || Series::Counter(Family::default()))?;
        match series {
            Series::Counter(family) => Ok(Counter {
                family,
                labels: LabelNames::new(base, labels),
            }),
            other => Err(kind_conflict(base, other.kind(), "counter")),
        }
    }

    /// A gauge (`i64`, goes up and down) with the given label names.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Result<Gauge, RuntimeError> {
        let (series, labels) =
            self.register(name, help, labels, || Series::Gauge(Family::default()))?;
        match series {
            Series::Gauge(family) => Ok(Gauge {
                family,
                labels: LabelNames::new(name, labels),
            }),
            other => Err(kind_conflict(name, other.kind(), "gauge")),
        }
    }

    /// A histogram (`f64` observations; seconds for durations) with the given label names and
    /// bucket upper bounds (finite, strictly increasing; `+Inf` is implied).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<Histogram, RuntimeError> {
        if buckets.is_empty()
            || buckets.iter().any(|b| !b.is_finite())
            || buckets.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(RuntimeError::Metrics(format!(
                "histogram {name}: buckets must be finite and strictly increasing, got {buckets:?}"
            )));
        }
        let bounds: Arc<[f64]> = buckets.into();
        let (series, labels) = self.register(name, help, labels, || {
            Series::Histogram(
                Family::new_with_constructor(Buckets(bounds.clone())),
                bounds.clone(),
            )
        })?;
        match series {
            Series::Histogram(family, existing) => {
                if *existing != *bounds {
                    return Err(RuntimeError::Metrics(format!(
                        "histogram {name} is already registered with buckets {existing:?}"
                    )));
                }
                Ok(Histogram {
                    family,
                    labels: LabelNames::new(name, labels),
                })
            }
            other => Err(kind_conflict(name, other.kind(), "histogram")),
        }
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        make: impl FnOnce() -> Series,
    ) -> Result<(Series, LabelList), RuntimeError> {
        if !valid_metric_name(name) {
            return Err(RuntimeError::Metrics(format!(
                "invalid metric name {name:?}: expected [a-zA-Z_:][a-zA-Z0-9_:]*"
            )));
        }
        for label in labels {
            if !valid_label_name(label) {
                return Err(RuntimeError::Metrics(format!(
                    "metric {name}: invalid label name {label:?}: expected [a-zA-Z_][a-zA-Z0-9_]* \
                     not starting with __"
                )));
            }
        }
        if let Some((i, dup)) = labels
            .iter()
            .enumerate()
            .find(|(i, l)| labels[..*i].contains(l))
        {
            return Err(RuntimeError::Metrics(format!(
                "metric {name}: label {dup:?} is given twice (position {i})"
            )));
        }
        let mut entries =
            self.inner.entries.lock().map_err(|_| {
                RuntimeError::Metrics("the metrics registry lock is poisoned".into())
            })?;
        if let Some(entry) = entries.get(name) {
            let same_labels = entry.labels.len() == labels.len()
                && entry.labels.iter().zip(labels).all(|(a, b)| &**a == *b);
            if !same_labels || entry.help != help {
                return Err(RuntimeError::Metrics(format!(
                    "metric {name} is already registered with labels {:?} and help {:?}",
                    entry.labels, entry.help
                )));
            }
            return Ok((entry.series.clone(), entry.labels.clone()));
        }
        let series = make();
        {
            let mut registry = self.inner.registry.lock().map_err(|_| {
                RuntimeError::Metrics("the metrics registry lock is poisoned".into())
            })?;
            match &series {
                Series::Counter(f) => registry.register(name, help, f.clone()),
                Series::Gauge(f) => registry.register(name, help, f.clone()),
                Series::Histogram(f, _) => registry.register(name, help, f.clone()),
            }
        }
        let label_names: Arc<[Arc<str>]> = labels.iter().map(|l| Arc::from(*l)).collect();
        entries.insert(
            name.to_owned(),
            Entry {
                help: help.to_owned(),
                labels: label_names.clone(),
                series: series.clone(),
            },
        );
        Ok((series, label_names))
    }

    /// The exposition in the OpenMetrics text format (what `/metrics` answers).
    pub fn encode(&self) -> Result<String, RuntimeError> {
        let registry =
            self.inner.registry.lock().map_err(|_| {
                RuntimeError::Metrics("the metrics registry lock is poisoned".into())
            })?;
        let mut out = String::new();
        encode(&mut out, &registry)
            .map_err(|e| RuntimeError::Metrics(format!("encoding metrics: {e}")))?;
        Ok(out)
    }
}

fn kind_conflict(name: &str, existing: &str, wanted: &str) -> RuntimeError {
    RuntimeError::Metrics(format!(
        "metric {name} is already registered as a {existing}, not a {wanted}"
    ))
}

/// The label names of a handle, and the once-only warning about a wrong number of values.
#[derive(Clone)]
struct LabelNames {
    metric: Arc<str>,
    names: Arc<[Arc<str>]>,
    warned: Arc<AtomicBool>,
}

impl std::fmt::Debug for LabelNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labels")
            .field("metric", &self.metric)
            .field("names", &self.names)
            .finish()
    }
}

impl LabelNames {
    fn new(metric: &str, names: Arc<[Arc<str>]>) -> Self {
        LabelNames {
            metric: Arc::from(metric),
            names,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set(&self, values: &[&str]) -> Labels {
        if values.len() != self.names.len() && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                metric = %self.metric,
                expected = ?self.names,
                got = ?values,
                "metric recorded with the wrong number of label values (padded/truncated)"
            );
        }
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.clone(),
                    values.get(i).copied().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// A counter family: [`Counter::inc`] with the label values.
#[derive(Clone, Debug)]
pub struct Counter {
    family: Family<Labels, PCounter>,
    labels: LabelNames,
}

impl Counter {
    /// Adds one to the series with these label values.
    pub fn inc(&self, values: &[&str]) {
        self.family.get_or_create(&self.labels.set(values)).inc();
    }

    /// Adds `n`.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        self.family
            .get_or_create(&self.labels.set(values))
            .inc_by(n);
    }

    /// The current value (0 for a series never recorded).
    pub fn get(&self, values: &[&str]) -> u64 {
        self.family
            .get(&self.labels.set(values))
            .map_or(0, |c| c.get())
    }
}

/// A gauge family.
#[derive(Clone, Debug)]
pub struct Gauge {
    family: Family<Labels, PGauge>,
    labels: LabelNames,
}

impl Gauge {
    /// Sets the series with these label values to `v`.
    pub fn set(&self, values: &[&str], v: i64) {
        self.family.get_or_create(&self.labels.set(values)).set(v);
    }

    /// Adds one.
    pub fn inc(&self, values: &[&str]) {
        self.family.get_or_create(&self.labels.set(values)).inc();
    }

    /// Subtracts one.
    pub fn dec(&self, values: &[&str]) {
        self.family.get_or_create(&self.labels.set(values)).dec();
    }

    /// Adds `delta` (negative: subtracts).
    pub fn add(&self, values: &[&str], delta: i64) {
        self.family
            .get_or_create(&self.labels.set(values))
            .inc_by(delta);
    }

    /// The current value (0 for a series never recorded).
    pub fn get(&self, values: &[&str]) -> i64 {
        self.family
            .get(&self.labels.set(values))
            .map_or(0, |g| g.get())
    }
}

/// A histogram family.
#[derive(Clone, Debug)]
pub struct Histogram {
    family: Family<Labels, PHistogram, Buckets>,
    labels: LabelNames,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Buckets").field(&self.0).finish()
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, values: &[&str], v: f64) {
        self.family
            .get_or_create(&self.labels.set(values))
            .observe(v);
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, values: &[&str], d: Duration) {
        self.observe(values, d.as_secs_f64());
    }
}

/// A bound `/metrics` listener (plain HTTP/1.1; `GET /metrics` only, anything else 404/405).
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Metrics,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free one, see [`MetricsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, RuntimeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        tracing::info!(addr = %local_addr, path = METRICS_PATH, "metrics listener bound");
        Ok(MetricsServer {
            listener,
            local_addr,
            metrics,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes; open scrapes then get
    /// [`METRICS_SHUTDOWN_TIMEOUT`] to finish.
    pub async fn run<F>(self, shutdown: F) -> Result<(), RuntimeError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        use axum::routing::get;
        let MetricsServer {
            listener,
            local_addr,
            metrics,
        } = self;
        let app = axum::Router::new()
            .route(METRICS_PATH, get(scrape))
            .with_state(metrics);
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopped_tx.send(());
        });
        let mut serve = std::pin::pin!(serve.into_future());
        tokio::select! {
            result = &mut serve => {
                return result.map_err(|e| RuntimeError::Metrics(format!("metrics listener {local_addr}: {e}")));
            }
            _ = stopped_rx => {}
        }
        match tokio::time::timeout(METRICS_SHUTDOWN_TIMEOUT, serve).await {
            Ok(result) => {
                tracing::info!(addr = %local_addr, "metrics listener stopped");
                result.map_err(|e| {
                    RuntimeError::Metrics(format!("metrics listener {local_addr}: {e}"))
                })
            }
            Err(_) => {
                tracing::warn!(addr = %local_addr, "metrics scrapes still open at shutdown; abandoned");
                Ok(())
            }
        }
    }
}

async fn scrape(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match metrics.encode() {
        Ok(text) => ([(http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_are_encoded_with_their_labels() {
        let m = Metrics::new();
        let c = m
            .counter("ccm_test_things_total", "Things.", &["kind"])
            .unwrap();
        c.inc(&["a"]);
        c.inc_by(&["b"], 3);
        let g = m.gauge("ccm_test_depth", "Depth.", &[]).unwrap();
        g.set(&[], 7);
        g.dec(&[]);
        let h = m
            .histogram("ccm_test_seconds", "Time.", &["op"], &[0.1, 1.0])
            .unwrap();
        h.observe(&["x"], 0.5);
        let text = m.encode().unwrap();
        assert!(
            text.contains("ccm_test_things_total{kind=\"a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ccm_test_things_total{kind=\"b\"} 3"),
            "{text}"
        );
        assert!(text.contains("ccm_test_depth 6"), "{text}");
        assert!(
            text.contains("ccm_test_seconds_bucket{le=\"1.0\",op=\"x\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ccm_test_seconds_count{op=\"x\"} 1"),
            "{text}"
        );
        assert_eq!(c.get(&["b"]), 3);
        assert_eq!(c.get(&["never"]), 0);
        assert_eq!(g.get(&[]), 6);
    }

    #[test]
    fn registering_again_shares_the_series_and_conflicts_are_refused() {
        let m = Metrics::new();
        let a = m.counter("ccm_test_calls", "Calls.", &["code"]).unwrap();
        let b = m
            .counter("ccm_test_calls_total", "Calls.", &["code"])
            .unwrap();
        a.inc(&["OK"]);
        assert_eq!(b.get(&["OK"]), 1, "same series");
        assert!(m.gauge("ccm_test_calls", "Calls.", &["code"]).is_err());
        assert!(m.counter("ccm_test_calls", "Calls.", &["other"]).is_err());
        assert!(
            m.counter("ccm_test_calls", "Other help.", &["code"])
                .is_err()
        );
        let h = m.histogram("ccm_test_h", "H.", &[], &[1.0, 2.0]).unwrap();
        h.observe(&[], 1.5);
        assert!(m.histogram("ccm_test_h", "H.", &[], &[1.0, 3.0]).is_err());
    }

    #[test]
    fn bad_names_labels_and_buckets_are_refused() {
        let m = Metrics::new();
        for bad in ["", "1abc", "with-dash", "sp ace"] {
            let e = m.counter(bad, "x", &[]).unwrap_err();
            assert!(e.to_string().contains("invalid metric name"), "{e}");
        }
        for bad in ["__reserved", "a-b", "9x"] {
            let e = m.gauge("ccm_ok", "x", &[bad]).unwrap_err();
            assert!(e.to_string().contains("invalid label name"), "{e}");
        }
        assert!(m.gauge("ccm_dup", "x", &["a", "a"]).is_err());
        for bad in [&[][..], &[1.0, 1.0], &[2.0, 1.0], &[f64::NAN]] {
            assert!(m.histogram("ccm_h", "x", &[], bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wrong_number_of_label_values_records_padded_values() {
        let m = Metrics::new();
        let c = m.counter("ccm_test_pad", "Pad.", &["a", "b"]).unwrap();
        c.inc(&["x"]);
        c.inc(&["x", "y", "z"]);
        let text = m.encode().unwrap();
        assert!(
            text.contains("ccm_test_pad_total{a=\"x\",b=\"\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ccm_test_pad_total{a=\"x\",b=\"y\"} 1"),
            "{text}"
        );
    }
}
