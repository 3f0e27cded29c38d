//! `ccm serve scheduler`.

use crate::error::CliError;

/// Runs the scheduler until interrupted.
pub fn run(_args: &ccm_scheduler::SchedulerArgs) -> Result<(), CliError> {
    Err(CliError::NotAvailableYet {
        command: "serve scheduler".into(),
        what: "the scheduler process is being built",
    })
}
