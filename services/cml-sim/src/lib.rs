//! # ccm-cml-sim — a CML REST API simulator
//!
//! An HTTP server (axum) that speaks the subset of the CML REST API v0 ccm uses
//! (`ccm-cml`'s `CmlClient`), for dev mode (`ccm dev`), simulations and tests. One server can
//! stand in for the CML of every worker of a fleet (multi-host mode).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ccm_cml_sim::SimError> {
//! use ccm_cml_sim::{CmlSim, SimOptions};
//! let sim = CmlSim::start(SimOptions::default()).await?;
//! let default_cml = sim.base_url();          // http://127.0.0.1:PORT  → host "default"
//! let worker_cml = sim.host_url("i-0abc");   // http://127.0.0.1:PORT/i-0abc → host "i-0abc"
//! # let _ = (default_cml, worker_cml);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! | module | what it holds |
//! |---|---|
//! | [`options`] | [`SimOptions`], [`Faults`], [`FaultPatch`], defaults |
//! | [`state`] | one simulated CML ([`Host`]) and the admin snapshot ([`HostSnapshot`]) |
//! | [`topology`] | reading an imported lab YAML |
//!
//! Routes (every `/api/v0` and `/_sim` path also exists below `/{host}`):
//!
//! | path | |
//! |---|---|
//! | `POST /api/v0/authenticate` | `{username,password}` → JSON string token; 403 on bad credentials |
//! | `GET /api/v0/system_information` | no auth; `ready` |
//! | `GET /api/v0/system_health`, `system_stats`, `licensing`, `telemetry/events` | bearer |
//! | `POST /api/v0/licensing/registration`, `DELETE /api/v0/licensing/deregistration` | bearer |
//! | `GET /api/v0/labs`, `GET/DELETE /api/v0/labs/{id}`, `GET .../download`, `PUT .../start\|stop\|wipe` | bearer |
//! | `POST /api/v0/import[?title=]` | bearer; raw YAML body |
//! | `GET /_sim/state`, `GET /_sim/hosts`, `POST/DELETE /_sim/faults`, `POST /_sim/telemetry`, `POST /_sim/reset` | admin, no auth |
//!
//! See `docs/cml.md` for the model, the admin API and what is not simulated.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod options;
mod server;
pub mod state;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use options::{FaultPatch, Faults, LicenceMode, SimOptions};
pub use state::{Host, HostSnapshot, LabSnapshot, LabState, NodeSnapshot};

/// How long [`SimHandle::shutdown`] waits for in-flight requests before it aborts the server.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the simulator failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A host name that cannot appear in a path, or too many hosts.
    #[error("invalid simulated host: {0}")]
    Host(String),
}

/// Starts simulators.
#[derive(Debug, Clone, Copy)]
pub struct CmlSim;

impl CmlSim {
    /// Binds `options.listen:options.port` (port 0 picks a free one) and serves until the
    /// handle is shut down or dropped.
    pub async fn start(options: SimOptions) -> Result<SimHandle, SimError> {
        let addr = SocketAddr::new(options.listen, options.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr, source })?;
        let sim = Arc::new(server::Sim::new(options));
        let app = server::router(Arc::clone(&sim));
        let app = tower::Layer::layer(&tower::util::MapRequestLayer::new(server::rewrite), app);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let service = axum::ServiceExt::<axum::extract::Request>::into_make_service(app);
            axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        tracing::info!(%addr, "CML simulator listening");
        Ok(SimHandle {
            addr,
            sim,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server (gracefully, in the background).
pub struct SimHandle {
    addr: SocketAddr,
    sim: Arc<server::Sim>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the base URL of the default simulated CML.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/{host}`: the base URL of simulated CML `host` (multi-host mode).
    pub fn host_url(&self, host: &str) -> String {
        format!("http://{}/{host}", self.addr)
    }

    /// The simulated CML `host` (created on first use; [`options::DEFAULT_HOST`] is the
    /// unprefixed one).
    pub fn host(&self, host: &str) -> Result<Arc<Host>, SimError> {
        self.sim
            .host(host)
            .map_err(|e| SimError::Host(e.description))
    }

    /// The admin snapshot of `host` (what `GET /_sim/state` returns).
    pub fn state(&self, host: &str) -> Result<HostSnapshot, SimError> {
        Ok(self.host(host)?.snapshot())
    }

    /// Changes the faults of `host` (what `POST /_sim/faults` does).
    pub fn set_faults(&self, host: &str, patch: &FaultPatch) -> Result<Faults, SimError> {
        Ok(self.host(host)?.patch_faults(patch))
    }

    /// The hosts created so far.
    pub fn hosts(&self) -> Vec<String> {
        self.sim.host_names()
    }

    /// Stops the server: waits up to [`SHUTDOWN_GRACE`] for in-flight requests, then aborts.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "CML simulator stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "CML simulator task failed"),
                Err(_) => {
                    tracing::warn!("CML simulator did not stop in time; aborting");
                    task.abort();
                }
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
