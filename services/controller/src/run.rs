//! `ccm serve controller`: one controller replica from its flags, until shutdown.
//!
//! Builds the production wiring — etcd coordination (the control plane's etcd and prefix), the
//! cloud (`aws`: EC2; `simulated`: an in-memory cloud on the system clock), the HTTP CML client
//! factory, the control-plane client with its service token, the artifact fetcher — serves
//! ControllerService (health, reflection) on `--listen-addr`, and campaigns for leadership. On
//! shutdown: health NOT_SERVING, leadership resigned (a standby takes over at once), API calls
//! drained.

use std::future::Future;
use std::sync::Arc;

use ccm_artifacts::{DefaultFetcher, FetcherConfig};
use ccm_auth::{ClientCredentials, ServiceTokenSource};
use ccm_cloud::{AwsSettings, CloudProvider, Ec2Provider, SimulatedCloud, SimulatedConfig};
use ccm_cml::http::{CmlEndpoint, HttpCmlClientFactory};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator};
use ccm_core::clock::{Clock, SystemClock};
use ccm_runtime::client::PlaneClient;
use ccm_runtime::server::{Server, ServerSettings, ServiceSet};
use tokio_util::sync::CancellationToken;

use crate::config::{CloudKind, ControllerArgs};
use crate::controller::{Controller, ControllerDeps};
use crate::error::{ControllerError, Result};

/// Runs one replica until `shutdown` completes.
pub async fn run<F>(args: &ControllerArgs, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send,
{
    let settings = args.settings()?;
    if args.etcd_endpoints.is_empty() {
        return Err(ControllerError::Config(
            "etcd_endpoints is required: the controller's leadership is fenced on the control \
             plane's etcd"
                .into(),
        ));
    }
    let tokens = match (
        &args.auth_token_url,
        &args.auth_client_id,
        &args.auth_client_secret,
    ) {
        _ if args.insecure_no_auth => {
            tracing::warn!("running WITHOUT a service token (--insecure-no-auth)");
            None
        }
        (Some(url), Some(id), Some(secret)) => {
            let source = ServiceTokenSource::new(ClientCredentials {
                token_url: url.clone(),
                client_id: id.clone(),
                client_secret: secret.clone(),
                scope: None,
            })
            .map_err(|e| ControllerError::Config(format!("service token: {e}")))?;
            Some(source)
        }
        _ => {
            return Err(ControllerError::Config(
                "auth_token_url, auth_client_id and auth_client_secret are required unless \
                 --insecure-no-auth"
                    .into(),
            ));
        }
    };
    let _refresher = tokens.as_ref().map(ServiceTokenSource::spawn_refresher);
    let plane = PlaneClient::connect(&args.control_plane_url, tokens).await?;
    let coordinator: Arc<dyn Coordinator> = Arc::new(
        EtcdCoordinator::connect(
            EtcdConfig::new(args.etcd_endpoints.clone()).key_prefix(args.etcd_prefix.clone()),
        )
        .await?,
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let cloud: Arc<dyn CloudProvider> = match args.cloud {
        CloudKind::Aws => {
            let region = args.aws_region.clone().ok_or_else(|| {
                ControllerError::Config("aws_region is required with --cloud aws".into())
            })?;
            let mut aws = AwsSettings::new(region);
            aws.endpoint_url = args.aws_endpoint_url.clone();
            Arc::new(Ec2Provider::new(aws).await?)
        }
        CloudKind::Simulated => Arc::new(SimulatedCloud::new(
            clock.clone(),
            SimulatedConfig {
                boot_time: chrono::Duration::seconds(
                    i64::try_from(args.simulated_boot_seconds).unwrap_or(i64::MAX),
                ),
                ..SimulatedConfig::default()
            },
        )),
    };
    let mut endpoint = CmlEndpoint::new(
        "https://cml.invalid",
        args.cml_username.clone(),
        args.cml_password.clone(),
    );
    endpoint.accept_invalid_certs = !args.cml_verify_tls;
    let cml = Arc::new(HttpCmlClientFactory::new(endpoint)?);
    let fetcher = Arc::new(
        DefaultFetcher::new(FetcherConfig {
            allow_http: args.artifacts_allow_http,
            ..FetcherConfig::default()
        })
        .map_err(|e| ControllerError::Config(format!("artifact fetcher: {e}")))?,
    );
    let controller = Controller::new(
        settings,
        ControllerDeps {
            cloud,
            cml,
            coordinator,
            plane,
            clock,
            fetcher,
        },
    )?;

    let server_settings = ServerSettings {
        listen_addr: args.listen_addr,
        ..ServerSettings::default()
    };
    let mut services = ServiceSet::new(&server_settings);
    services.add(crate::service::server(controller.clone()))?;
    let bound = Server::new(server_settings, services).bind().await?;
    tracing::info!(addr = %bound.local_addr(), replica = %controller.settings().replica_id, "controller serving");

    let stop = CancellationToken::new();
    let leader = {
        let controller = controller.clone();
        let stop = stop.clone();
        tokio::spawn(async move { controller.run(stop).await })
    };
    let server_stop = stop.clone();
    let server = tokio::spawn(bound.run(async move { server_stop.cancelled().await }));
    shutdown.await;
    tracing::info!("shutting down: resigning leadership");
    stop.cancel();
    let led = leader
        .await
        .map_err(|e| ControllerError::Config(format!("leader task: {e}")))?;
    let served = server
        .await
        .map_err(|e| ControllerError::Config(format!("server task: {e}")))?;
    led?;
    served?;
    Ok(())
}
