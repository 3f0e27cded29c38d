//! `ccm serve gateway`: the HTTP/JSON gateway in the foreground until SIGINT or SIGTERM.

use ccm_control_plane::config::LogFormat;
use ccm_gateway::{Gateway, GatewayArgs, GatewaySettings};

use crate::error::CliError;

/// Runs the gateway until interrupted.
pub fn run(args: &GatewayArgs) -> Result<(), CliError> {
    crate::logging::init(&LogFormat::Text);
    let settings = GatewaySettings::from_args(args).map_err(gateway_error)?;
    if settings.insecure_no_auth {
        tracing::warn!(
            addr = %settings.listen_addr,
            "AUTHENTICATION IS DISABLED (--insecure-no-auth): no login, API calls go to the \
             services without a token"
        );
    }
    super::block_on_service(async {
        let bound = Gateway::bind(settings).await.map_err(gateway_error)?;
        tracing::info!(
            "gateway listening on http://{} (API docs: /api/docs)",
            bound.local_addr()
        );
        bound
            .run(super::shutdown_signal())
            .await
            .map_err(gateway_error)
    })?
}

/// Maps a gateway error to the CLI's: configuration mistakes are usage errors.
fn gateway_error(e: ccm_gateway::GatewayError) -> CliError {
    super::service_error(e.is_config(), e)
}
