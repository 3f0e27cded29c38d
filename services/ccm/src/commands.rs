//! What each subcommand does.

use crate::cli::{Cli, Command, ConfigCommand};
use crate::error::CliError;

mod api;
mod lab;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Dev(_) => Err(CliError::NotAvailableYet {
            command: "dev".into(),
            what: "it will run the control plane, scheduler, controller and gateway in one \
                   process on SQLite with a simulated fleet and the web UI",
        }),
        Command::Serve { service } => Err(CliError::NotAvailableYet {
            command: format!("serve {}", service.name()),
            what: "the services are being built on the contracts and domain core in this build",
        }),
        Command::Simulate { .. } => Err(CliError::NotAvailableYet {
            command: "simulate".into(),
            what: "it will replay bookings through the real scheduler and controller on a \
                   virtual clock",
        }),
        Command::Config {
            command: ConfigCommand::Print,
        } => Err(CliError::NotAvailableYet {
            command: "config print".into(),
            what: "configuration arrives with the services",
        }),
        Command::Lab { command } => lab::run(command),
        Command::Api { command } => api::run(command),
    }
}
