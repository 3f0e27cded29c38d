//! Running a scheduler process (`ccm serve scheduler`): connect to etcd and the control plane,
//! serve `SchedulerService` with health and reflection, campaign, and on shutdown report
//! NOT_SERVING, resign the leadership and drain.

use std::future::Future;
use std::sync::Arc;

use ccm_auth::{AuthLayer, Authenticator, ServiceTokenSource};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator};
use ccm_core::clock::SystemClock;
use ccm_runtime::client::PlaneClient;
use ccm_runtime::server::{Server, ServerSettings, ServiceSet};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, SchedulerError};
use crate::scheduler::Scheduler;
use crate::settings::SchedulerArgs;

/// The auth layer of the scheduler's own API: JWT validation against `--auth-issuer-url`, or
/// none with `--insecure-no-auth`.
pub fn auth_layer(args: &SchedulerArgs) -> Result<AuthLayer> {
    if args.insecure_no_auth {
        tracing::warn!(
            "authentication is DISABLED (--insecure-no-auth): every caller of the scheduler API is an admin, and no service token is sent to the control plane"
        );
        return Ok(AuthLayer::disabled());
    }
    let issuer = args.auth_issuer_url.clone().ok_or_else(|| {
        SchedulerError::Config("--auth-issuer-url is required unless --insecure-no-auth".into())
    })?;
    let config = ccm_auth::AuthConfig::new(issuer, args.auth_audiences.clone());
    let authenticator =
        Authenticator::new(config).map_err(|e| SchedulerError::Auth(e.to_string()))?;
    Ok(AuthLayer::new(authenticator))
}

/// Runs a scheduler replica from its flags until `shutdown` completes.
pub async fn run<F>(args: &SchedulerArgs, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let settings = args.settings()?;
    let credentials = args.credentials()?;
    let auth = auth_layer(args)?;
    let (tokens, _refresher) = match credentials {
        Some(c) => {
            let source =
                ServiceTokenSource::new(c).map_err(|e| SchedulerError::Auth(e.to_string()))?;
            if let Err(e) = source.token().await {
                tracing::warn!(error = %e, "no service token yet; calls to the control plane fail until the identity provider answers");
            }
            let refresher = source.spawn_refresher();
            (Some(source), Some(refresher))
        }
        None => (None, None),
    };
    let plane = PlaneClient::connect(&settings.control_plane_url, tokens).await?;
    let coord: Arc<dyn Coordinator> = Arc::new(
        EtcdCoordinator::connect(
            EtcdConfig::new(args.etcd_endpoints.clone()).key_prefix(args.etcd_prefix.clone()),
        )
        .await?,
    );
    tracing::info!(replica = %settings.replica_id, control_plane = %settings.control_plane_url, "scheduler starting");
    let server_settings = ServerSettings {
        listen_addr: settings.listen_addr,
        ..ServerSettings::default()
    };
    let scheduler = Scheduler::new(settings, plane, coord, Arc::new(SystemClock))?;
    let mut set = ServiceSet::new(&server_settings);
    set.add(crate::service::server(scheduler.clone()))?;
    let bound = Server::new(server_settings, set)
        .with_layer(auth)
        .bind()
        .await?;
    tracing::info!(addr = %bound.local_addr(), "scheduler API listening");
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        bound.run(async move { stop.cancelled().await })
    });
    let election = tokio::spawn({
        let scheduler = scheduler.clone();
        let stop = stop.clone();
        async move { scheduler.run(stop).await }
    });
    shutdown.await;
    tracing::info!("shutting down: NOT_SERVING, resigning leadership");
    stop.cancel();
    let elected = election
        .await
        .map_err(|e| SchedulerError::Config(format!("scheduler task: {e}")))?;
    let served = server
        .await
        .map_err(|e| SchedulerError::Config(format!("server task: {e}")))?;
    elected?;
    served?;
    Ok(())
}
