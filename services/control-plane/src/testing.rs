//! A whole control plane for tests (feature `testing`): every service, served over real gRPC
//! on a free loopback port, on an in-memory SQLite store, the in-process coordinator, a
//! [`MemorySink`] for CloudEvents and a [`ManualClock`] the test moves.
//!
//! Auth is off unless a test gives an [`ccm_auth::AuthLayer`] (then real tokens are needed,
//! e.g. from `ccm_testkit::oidc`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ccm_artifacts::{ArtifactFetcher, DefaultFetcher, FetcherConfig};
use ccm_auth::AuthLayer;
use ccm_cloudevents::{EventFactory, MemorySink};
use ccm_coord::{Coordinator, InProcessCoordinator};
use ccm_core::clock::ManualClock;
use ccm_store::{SqliteStore, Store};
use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::app::{App, AppSettings};
use crate::error::ControlPlaneError;
use crate::server::{Server, ServerSettings, ServiceSet};
use crate::services::register_all;

/// Where the test clock starts: 2030-01-15 09:00 UTC, a Tuesday.
pub fn test_epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 15, 9, 0, 0)
        .single()
        .unwrap_or_default()
}

/// What to build the test plane with; `Default` gives the in-memory everything.
#[derive(Default)]
pub struct TestOptions {
    /// Use this store instead of a fresh in-memory SQLite.
    pub store: Option<Arc<dyn Store>>,
    /// Use this coordinator instead of a fresh in-process one.
    pub coord: Option<Arc<dyn Coordinator>>,
    /// Use this artifact fetcher instead of the default one (file, http allowed, s3).
    pub fetcher: Option<Arc<dyn ArtifactFetcher>>,
    /// Put this auth layer in front of the services (default: none, every call is an
    /// anonymous admin).
    pub auth: Option<AuthLayer>,
    /// Application settings.
    pub settings: Option<AppSettings>,
}

/// A running control plane.
pub struct TestPlane {
    /// The application state the services share.
    pub app: App,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The clock the test moves.
    pub clock: Arc<ManualClock>,
    /// The CloudEvents emitted so far.
    pub sink: Arc<MemorySink>,
    /// The in-process coordinator, when the plane made its own.
    pub coord: Arc<dyn Coordinator>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ccm_runtime::RuntimeError>>>,
}

impl TestPlane {
    /// Starts a plane with the defaults.
    pub async fn start() -> Result<TestPlane, ControlPlaneError> {
        TestPlane::start_with(TestOptions::default()).await
    }

    /// Starts a plane built from `options`.
    pub async fn start_with(options: TestOptions) -> Result<TestPlane, ControlPlaneError> {
        let store: Arc<dyn Store> = match options.store {
            Some(s) => s,
            None => Arc::new(
                SqliteStore::open_in_memory()
                    .map_err(|e| ControlPlaneError::Setup(format!("test store: {e}")))?,
            ),
        };
        let coord: Arc<dyn Coordinator> = options
            .coord
            .unwrap_or_else(|| Arc::new(InProcessCoordinator::default()));
        let fetcher: Arc<dyn ArtifactFetcher> = match options.fetcher {
            Some(f) => f,
            None => Arc::new(
                DefaultFetcher::new(FetcherConfig {
                    allow_http: true,
                    ..FetcherConfig::default()
                })
                .map_err(|e| ControlPlaneError::Setup(format!("test fetcher: {e}")))?,
            ),
        };
        let clock = Arc::new(ManualClock::new(test_epoch()));
        let sink = Arc::new(MemorySink::new());
        let app = App {
            store,
            coord: coord.clone(),
            events: sink.clone(),
            factory: EventFactory::default(),
            clock: clock.clone(),
            fetcher,
            settings: options.settings.unwrap_or_default(),
        };
        let settings = ServerSettings {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerSettings::default()
        };
        let mut set = ServiceSet::new(&settings);
        register_all(&mut set, &app)?;
        let server =
            Server::new(settings, set).with_layer(options.auth.unwrap_or_else(AuthLayer::disabled));
        let bound = server.bind().await?;
        let addr = bound.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = rx.await;
        }));
        Ok(TestPlane {
            app,
            addr,
            clock,
            sink,
            coord,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// A gRPC channel to the plane.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// Stops the plane and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), ControlPlaneError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| ControlPlaneError::Setup(format!("server task: {e}")))?
                .map_err(Into::into),
            None => Ok(()),
        }
    }
}

impl Drop for TestPlane {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
