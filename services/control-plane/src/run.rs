//! Running the control plane from its configuration: build the store, the coordinator, the
//! CloudEvents sink, the artifact fetcher and the auth layer the configuration names, register
//! every service, serve until the shutdown signal, then flush the sink.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ccm_artifacts::{ArtifactFetcher, DefaultFetcher, FetcherConfig};
use ccm_auth::{AuthLayer, Authenticator};
use ccm_cloudevents::{EventFactory, HttpSink, SinkConfig, SinkHandle};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator, InProcessCoordinator};
use ccm_core::clock::SystemClock;
use ccm_store::{MongoStore, SqliteStore, Store};

use crate::app::{App, AppSettings};
use crate::config::{ControlPlaneConfig, CoordinationBackend, StoreConfig};
use crate::error::ControlPlaneError;
use crate::server::{Server, ServerSettings, ServiceSet};
use crate::services::register_all;

/// How long the CloudEvents sink may keep flushing after the server stopped.
pub const SINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Runs the control plane until `shutdown` completes, then drains calls and flushes events.
pub async fn run<F>(config: &ControlPlaneConfig, shutdown: F) -> Result<(), ControlPlaneError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let Assembly { app, auth, sink } = assemble(config).await?;
    if let Some(path) = &config.templates_seed_file {
        let report = crate::seed::seed_templates_file(&app, path)
            .await
            .map_err(|e| ControlPlaneError::Setup(format!("seeding {}: {e}", path.display())))?;
        tracing::info!(created = ?report.created, skipped = ?report.skipped, "worker templates seeded");
    }
    let settings = ServerSettings::from(config);
    let mut set = ServiceSet::new(&settings);
    register_all(&mut set, &app)?;
    let bound = Server::new(settings, set).with_layer(auth).bind().await?;
    tracing::info!(
        addr = %bound.local_addr(),
        store = app.store.backend(),
        "control plane serving"
    );
    let result = bound.run(shutdown).await;
    let stats = sink.shutdown(SINK_FLUSH_TIMEOUT).await;
    tracing::info!(?stats, "CloudEvents sink flushed");
    result.map_err(Into::into)
}
