//! Prometheus metrics of the gateway: requests by route and status, and their latency.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Labels = Vec<(String, String)>;

fn new_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// The gateway's metrics registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with the gateway's metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ccm_gateway");
        let requests = Family::<Labels, Counter>::default();
        let latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(new_histogram);
        registry.register(
            "http_requests",
            "API requests by route (method and path template) and HTTP status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "API request latency by route, until the response headers (SSE: until the stream opened)",
            latency.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
        }
    }

    /// Records one request of `route` answered with `status` after `elapsed`.
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("route".to_owned(), route.to_owned()),
                ("status".to_owned(), status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route".to_owned(), route.to_owned())])
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, String> {
        let mut out = String::new();
        encode(&mut out, &self.registry).map_err(|e| e.to_string())?;
        Ok(out)
    }
}
