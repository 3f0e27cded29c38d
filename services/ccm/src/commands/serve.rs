//! `ccm serve …`: run one service in the foreground until SIGINT or SIGTERM.

use ccm_control_plane::{ControlPlaneArgs, ControlPlaneConfig};

use crate::error::CliError;

/// Runs the control plane with the layered configuration: logs and traces as `telemetry.*`
/// says (OTLP export set up inside the runtime, flushed after the server stopped), `/metrics`
/// on `metrics_addr`.
pub fn control_plane(args: &ControlPlaneArgs) -> Result<(), CliError> {
    let config = ControlPlaneConfig::load(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let telemetry = runtime
        .block_on(async { crate::logging::init_telemetry(&(&config).into()) })
        .map_err(|e| CliError::Service(e.into()))?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let result = runtime.block_on(async {
        ccm_control_plane::run::run(&config, super::shutdown_signal()).await?;
        Ok(())
    });
    // Outside the runtime, before it is dropped: the last spans are exported on its connections.
    drop(telemetry);
    result
}
