//! `ccm serve scheduler`: one scheduler replica in the foreground until SIGINT or SIGTERM.
//!
//! It campaigns in the `scheduler` election on etcd (the control plane's etcd and key prefix)
//! and places instances while it leads; it serves SchedulerService, health and reflection on
//! `--listen-addr` either way. On a signal it reports NOT_SERVING, resigns the leadership (a
//! standby takes over at once) and drains its API calls.

use ccm_control_plane::config::LogFormat;
use ccm_scheduler::SchedulerArgs;

use crate::error::CliError;

/// Runs the scheduler until interrupted.
pub fn run(args: &SchedulerArgs) -> Result<(), CliError> {
    crate::logging::init(&LogFormat::Text);
    super::block_on_service(ccm_scheduler::run::run(args, super::shutdown_signal()))?
        .map_err(|e| super::service_error(e.is_config(), e))
}
