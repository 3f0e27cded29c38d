//! Running the control plane from its configuration: build the store, the coordinator, the
//! CloudEvents sink, the artifact fetcher and the auth layer the configuration names, register
//! every service, serve `/metrics` (`metrics_addr`) and purge the audit and scaling logs past
//! their retention ([`Retention`], every `audit.purge_interval`) in the background, serve gRPC
//! until the shutdown signal, then stop the background work and flush the sink.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ccm_runtime::metrics::{Counter, Gauge, Metrics, MetricsServer};
use ccm_store::LogKind;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use ccm_artifacts::{ArtifactFetcher, DefaultFetcher, FetcherConfig};
use ccm_auth::{AuthLayer, Authenticator};
use ccm_cloudevents::{EventFactory, HttpSink, SinkConfig, SinkHandle};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator, InProcessCoordinator};
use ccm_core::clock::SystemClock;
use ccm_store::{MongoStore, SqliteStore, Store};

use crate::app::{App, AppSettings};
use crate::config::{AuditConfig, ControlPlaneConfig, CoordinationBackend, StoreConfig};
use crate::error::ControlPlaneError;
use crate::server::{Server, ServerSettings, ServiceSet};
use crate::services::register_all;

/// How long the CloudEvents sink may keep flushing after the server stopped.
pub const SINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// `service.name` of the control plane's spans.
pub const SERVICE_NAME: &str = "ccm-control-plane";
/// Counter of log entries purged past their retention (label `log`: `audit`,
/// `scaling_decision`).
pub const METRIC_LOG_PURGED: &str = "ccm_control_plane_log_entries_purged_total";
/// Counter of purge runs (labels `log`, `outcome`: `ok`, `error`).
pub const METRIC_LOG_PURGES: &str = "ccm_control_plane_log_purges_total";
/// Gauge: Unix time (seconds) of the last successful purge (label `log`).
pub const METRIC_LOG_LAST_PURGE: &str = "ccm_control_plane_log_last_purge_timestamp_seconds";

/// The parts of a running control plane, built from its configuration.
pub struct Assembly {
    /// The application state.
    pub app: App,
    /// The auth layer (disabled with `insecure_no_auth`).
    pub auth: AuthLayer,
    /// The CloudEvents sink, to flush on shutdown.
    pub sink: SinkHandle,
}

/// Opens the store the configuration names.
pub async fn open_store(config: &ControlPlaneConfig) -> Result<Arc<dyn Store>, ControlPlaneError> {
    match &config.store {
        StoreConfig::Sqlite { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ControlPlaneError::Setup(format!("creating {}: {e}", dir.display()))
                })?;
            }
            let store = if path.as_os_str() == ":memory:" {
                SqliteStore::open_in_memory()
            } else {
                SqliteStore::open(path)
            }
            .map_err(|e| ControlPlaneError::Setup(format!("opening {}: {e}", path.display())))?;
            Ok(Arc::new(store))
        }
        StoreConfig::MongoDb { uri, database } => {
            let store = MongoStore::connect(uri.expose(), database)
                .await
                .map_err(|e| ControlPlaneError::Setup(format!("connecting to MongoDB: {e}")))?;
            Ok(Arc::new(store))
        }
    }
}

/// Connects the coordinator the configuration names.
pub async fn open_coordinator(
    config: &ControlPlaneConfig,
) -> Result<Arc<dyn Coordinator>, ControlPlaneError> {
    match &config.coordination.backend {
        CoordinationBackend::InProcess => Ok(Arc::new(InProcessCoordinator::default())),
        CoordinationBackend::Etcd { endpoints, prefix } => {
            let etcd = EtcdConfig::new(endpoints.clone()).key_prefix(prefix.clone());
            let coord = EtcdCoordinator::connect(etcd)
                .await
                .map_err(|e| ControlPlaneError::Setup(format!("connecting to etcd: {e}")))?;
            Ok(Arc::new(coord))
        }
    }
}

/// Builds everything the configuration names.
pub async fn assemble(config: &ControlPlaneConfig) -> Result<Assembly, ControlPlaneError> {
    let store = open_store(config).await?;
    let coord = open_coordinator(config).await?;
    let (sink, _task) = HttpSink::spawn(SinkConfig {
        url: config.cloudevents.sink_url.clone(),
        ..SinkConfig::default()
    })
    .map_err(|e| ControlPlaneError::Setup(format!("CloudEvents sink: {e}")))?;
    let fetcher: Arc<dyn ArtifactFetcher> = Arc::new(
        DefaultFetcher::new(FetcherConfig::default())
            .map_err(|e| ControlPlaneError::Setup(format!("artifact fetcher: {e}")))?,
    );
    let auth = if config.auth.insecure_no_auth {
        tracing::warn!("authentication is DISABLED (--insecure-no-auth): every caller is an admin");
        AuthLayer::disabled()
    } else {
        let issuer = config.auth.issuer_url.clone().ok_or_else(|| {
            ControlPlaneError::Setup("auth.issuer_url is required unless insecure_no_auth".into())
        })?;
        let mut auth_config = ccm_auth::AuthConfig::new(issuer, config.auth.audiences.clone());
        auth_config.jwks_url = config.auth.jwks_url.clone();
        let authenticator = Authenticator::new(auth_config)
            .map_err(|e| ControlPlaneError::Setup(format!("auth: {e}")))?;
        AuthLayer::new(authenticator)
    };
    let app = App {
        store,
        coord,
        events: Arc::new(sink.clone()),
        factory: EventFactory::new(config.cloudevents.source.clone()),
        clock: Arc::new(SystemClock),
        fetcher,
        settings: AppSettings::default(),
    };
    Ok(Assembly { app, auth, sink })
}

impl From<&ControlPlaneConfig> for ccm_runtime::telemetry::TelemetrySettings {
    fn from(c: &ControlPlaneConfig) -> Self {
        ccm_runtime::telemetry::TelemetrySettings {
            service_name: SERVICE_NAME.to_owned(),
            log_format: match c.telemetry.log_format {
                crate::config::LogFormat::Text => ccm_runtime::telemetry::LogFormat::Text,
                crate::config::LogFormat::Json => ccm_runtime::telemetry::LogFormat::Json,
            },
            otlp_endpoint: c.telemetry.otlp_endpoint.clone(),
            ..ccm_runtime::telemetry::TelemetrySettings::default()
        }
    }
}

/// Purges the audit records and scaling decisions older than their retention
/// (`audit.retention`, `audit.scaling_retention`), counting what it deleted in
/// [`METRIC_LOG_PURGED`] and each run in [`METRIC_LOG_PURGES`].
#[derive(Clone)]
pub struct Retention {
    store: Arc<dyn Store>,
    audit: Duration,
    scaling: Duration,
    purged: Counter,
    runs: Counter,
    last_purge: Gauge,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("audit", &self.audit)
            .field("scaling", &self.scaling)
            .finish_non_exhaustive()
    }
}

/// What one purge did: per log, the entries deleted or the error.
#[derive(Debug)]
pub struct PurgeReport {
    /// One line per log.
    pub logs: Vec<(LogKind, Result<u64, ccm_store::StoreError>)>,
}

impl PurgeReport {
    /// Entries deleted from `log` (0 if it failed).
    pub fn deleted(&self, log: LogKind) -> u64 {
        self.logs
            .iter()
            .find(|(l, _)| *l == log)
            .and_then(|(_, r)| r.as_ref().ok().copied())
            .unwrap_or(0)
    }
}

impl Retention {
    /// A purger of `store`'s logs with `config`'s retentions, recording into `metrics`.
    pub fn new(
        store: Arc<dyn Store>,
        config: &AuditConfig,
        metrics: &Metrics,
    ) -> Result<Self, ControlPlaneError> {
        Ok(Retention {
            store,
            audit: config.retention,
            scaling: config.scaling_retention,
            purged: metrics.counter(
                METRIC_LOG_PURGED,
                "Audit and scaling-log entries deleted past their retention, by log.",
                &["log"],
            )?,
            runs: metrics.counter(
                METRIC_LOG_PURGES,
                "Retention purges run, by log and outcome (ok, error).",
                &["log", "outcome"],
            )?,
            last_purge: metrics.gauge(
                METRIC_LOG_LAST_PURGE,
                "Unix time of the last successful retention purge, by log.",
                &["log"],
            )?,
        })
    }

    /// Purges both logs once, as of `now`: entries older than `now - retention` go.
    pub async fn purge_once(&self, now: DateTime<Utc>) -> PurgeReport {
        let mut logs = Vec::new();
        for (log, retention) in [
            (LogKind::Audit, self.audit),
            (LogKind::ScalingDecision, self.scaling),
        ] {
            let result = self.purge_log(log, retention, now).await;
            logs.push((log, result));
        }
        PurgeReport { logs }
    }

    async fn purge_log(
        &self,
        log: LogKind,
        retention: Duration,
        now: DateTime<Utc>,
    ) -> Result<u64, ccm_store::StoreError> {
        let cutoff = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let span = tracing::info_span!(
            "log_purge",
            reason = "retention",
            log = %log,
            retention_h = retention.as_secs() / 3600,
            %cutoff,
            deleted = tracing::field::Empty,
        );
        let _entered = span.enter();
        match self.store.purge_log(log, cutoff).await {
            Ok(deleted) => {
                span.record("deleted", deleted);
                self.purged.inc_by(&[log.as_str()], deleted);
                self.runs.inc(&[log.as_str(), "ok"]);
                self.last_purge.set(&[log.as_str()], Utc::now().timestamp());
                tracing::info!(deleted, "log entries past their retention purged");
                Ok(deleted)
            }
            Err(e) => {
                self.runs.inc(&[log.as_str(), "error"]);
                tracing::warn!(error = %e, "purging log entries failed; retried next interval");
                Err(e)
            }
        }
    }

    /// Purges at once and then every `interval` until `stop` is cancelled.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {
                    self.purge_once(Utc::now()).await;
                }
            }
        }
    }
}

/// A control plane bound to its addresses, with its background tasks (metrics listener, log
/// retention) running; [`BoundControlPlane::run`] serves until shutdown.
pub struct BoundControlPlane {
    server: ccm_runtime::BoundServer,
    sink: SinkHandle,
    background: CancellationToken,
    retention_task: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<Result<(), ccm_runtime::RuntimeError>>>,
}

impl std::fmt::Debug for BoundControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundControlPlane")
            .field("addr", &self.server.local_addr())
            .finish_non_exhaustive()
    }
}

/// Seeds the templates, starts the metrics listener and the retention job, registers every
/// service and binds the gRPC listen address (`ccm serve control-plane` and `ccm dev`).
pub async fn bind(
    config: &ControlPlaneConfig,
    assembly: Assembly,
) -> Result<BoundControlPlane, ControlPlaneError> {
    let Assembly { app, auth, sink } = assembly;
    if let Some(path) = &config.templates_seed_file {
        let report = crate::seed::seed_templates_file(&app, path)
            .await
            .map_err(|e| ControlPlaneError::Setup(format!("seeding {}: {e}", path.display())))?;
        tracing::info!(created = ?report.created, skipped = ?report.skipped, "worker templates seeded");
    }
    let metrics = Metrics::global().clone();
    let background = CancellationToken::new();
    // Stops the background tasks if binding fails below.
    let stop_background = background.clone().drop_guard();
    let metrics_task =
        match config.metrics_addr {
            Some(addr) => {
                let listener = MetricsServer::bind(addr, metrics.clone()).await.map_err(|e| {
                ControlPlaneError::Setup(format!(
                    "metrics_addr {addr}: {e} (choose another address, or \"none\" to serve no \
                     metrics)"
                ))
            })?;
                let stop = background.clone();
                Some(tokio::spawn(
                    listener.run(async move { stop.cancelled().await }),
                ))
            }
            None => None,
        };
    let retention = Retention::new(app.store.clone(), &config.audit, &metrics)?;
    let retention_task =
        tokio::spawn(retention.run(config.audit.purge_interval, background.clone()));

    let settings = ServerSettings::from(config);
    let mut set = ServiceSet::new(&settings);
    register_all(&mut set, &app)?;
    let server = Server::new(settings, set)
        .with_layer(auth)
        .with_metrics(metrics)
        .bind()
        .await?;
    tracing::info!(
        addr = %server.local_addr(),
        store = app.store.backend(),
        metrics_addr = ?config.metrics_addr,
        "control plane serving"
    );
    let background = stop_background.disarm();
    Ok(BoundControlPlane {
        server,
        sink,
        background,
        retention_task,
        metrics_task,
    })
}

impl BoundControlPlane {
    /// The gRPC address (useful with port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` completes, then drains calls, stops the background tasks and
    /// flushes the CloudEvents sink.
    pub async fn run<F>(self, shutdown: F) -> Result<(), ControlPlaneError>
    where
        F: Future<Output = ()>,
    {
        let BoundControlPlane {
            server,
            sink,
            background,
            retention_task,
            metrics_task,
        } = self;
        let result = server.run(shutdown).await;
        background.cancel();
        let _ = retention_task.await;
        if let Some(task) = metrics_task {
            match task.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics listener failed"),
                Err(e) => tracing::warn!(error = %e, "metrics listener task failed"),
                Ok(Ok(())) => {}
            }
        }
        let stats = sink.shutdown(SINK_FLUSH_TIMEOUT).await;
        tracing::info!(?stats, "CloudEvents sink flushed");
        result.map_err(Into::into)
    }
}

/// Runs the control plane until `shutdown` completes, then drains calls and flushes events.
pub async fn run<F>(config: &ControlPlaneConfig, shutdown: F) -> Result<(), ControlPlaneError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let assembly = assemble(config).await?;
    bind(config, assembly).await?.run(shutdown).await
}
