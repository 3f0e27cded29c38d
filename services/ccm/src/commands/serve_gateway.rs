//! `ccm serve gateway`.

use crate::error::CliError;

/// Runs the gateway until interrupted.
pub fn run(_args: &ccm_gateway::GatewayArgs) -> Result<(), CliError> {
    Err(CliError::NotAvailableYet {
        command: "serve gateway".into(),
        what: "the gateway process is being built",
    })
}
