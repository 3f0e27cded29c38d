//! `ccm serve controller`: one controller replica in the foreground until SIGINT or SIGTERM.
//!
//! It campaigns in the `controller` election on etcd (the control plane's etcd and key prefix)
//! and reconciles instances and workers and runs the autoscaler while it leads; it serves
//! ControllerService, health and reflection on `--listen-addr` either way. On a signal it
//! reports NOT_SERVING, resigns the leadership (a standby takes over at once) and drains its API
//! calls.

use ccm_control_plane::config::LogFormat;
use ccm_controller::{ControllerArgs, ControllerError};

use crate::error::CliError;

/// Runs the controller until interrupted.
pub fn run(args: &ControllerArgs) -> Result<(), CliError> {
    crate::logging::init(&LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime
        .block_on(ccm_controller::run::run(args, super::shutdown_signal()))
        .map_err(controller_error)
}

/// Maps a controller error to the CLI's: configuration mistakes are usage errors.
fn controller_error(e: ControllerError) -> CliError {
    if e.is_config() {
        CliError::Usage(e.to_string())
    } else {
        CliError::Failed(e.to_string())
    }
}
