//! `ccm serve controller`.

use crate::error::CliError;

/// Runs the controller until interrupted.
pub fn run(_args: &ccm_controller::ControllerArgs) -> Result<(), CliError> {
    Err(CliError::NotAvailableYet {
        command: "serve controller".into(),
        what: "the controller process is being built",
    })
}
