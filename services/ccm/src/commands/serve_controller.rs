//! `ccm serve controller`: one controller replica in the foreground until SIGINT or SIGTERM.
//!
//! It campaigns in the `controller` election on etcd (the control plane's etcd and key prefix)
//! and reconciles instances and workers and runs the autoscaler while it leads; it serves
//! ControllerService, health and reflection on `--listen-addr` either way. On a signal it
//! reports NOT_SERVING, resigns the leadership (a standby takes over at once) and drains its API
//! calls.

use ccm_control_plane::config::LogFormat;
use ccm_controller::ControllerArgs;

use crate::error::CliError;

/// Runs the controller until interrupted.
pub fn run(args: &ControllerArgs) -> Result<(), CliError> {
    crate::logging::init(&LogFormat::Text);
    super::block_on_service(ccm_controller::run::run(args, super::shutdown_signal()))?
        .map_err(|e| super::service_error(e.is_config(), e))
}
