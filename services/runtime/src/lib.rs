//! # ccm-runtime — what every ccm service runs on
//!
//! | module | what it holds |
//! |---|---|
//! | [`server`] | the tonic server: [`server::ServiceSet`], health, reflection, request id, tracing, deadline, concurrency limit, an auth layer slot, graceful shutdown |
//! | [`client`] | [`client::PlaneClient`]: a channel to the control plane carrying the service token and the W3C `traceparent`; typed clients; [`client::fence`] |
//! | [`metrics`] | [`metrics::Metrics`]: the process's Prometheus registry (counters, gauges, histograms with labels); [`metrics::MetricsServer`] serves `/metrics` |
//! | [`telemetry`] | [`telemetry::init`]: the global `tracing` subscriber — log format, OpenTelemetry spans, OTLP export; trace-context propagation helpers |
//! | [`error`] | [`error::RuntimeError`] |
//!
//! The control plane, the scheduler and the controller each register their gRPC services in a
//! [`server::ServiceSet`] and run a [`server::Server`]; nothing here knows which service it runs.
//!
//! A service's `main` does, in order: [`telemetry::init`] (inside the Tokio runtime; keep the
//! guard until the end), [`metrics::Metrics::global`] to register its own metrics,
//! [`metrics::MetricsServer::bind`] + `run` for `/metrics`, then its gRPC server.
//! `docs/observability.md` lists every metric and explains tracing, logs and audit trace ids.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod metrics;
pub mod server;
pub mod telemetry;

pub use error::{BoxError, RuntimeError};
pub use metrics::{Metrics, MetricsServer};
pub use server::{BoundServer, Server, ServerSettings, ServiceSet};
