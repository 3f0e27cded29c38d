//! What each subcommand does.

use crate::cli::{Cli, Command, ConfigCommand, ServeCommand};
use crate::error::CliError;

mod api;
mod lab;
mod serve;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Dev(_) => Err(CliError::NotAvailableYet {
            command: "dev".into(),
            what: "it will run the control plane, scheduler, controller and gateway in one \
                   process on SQLite with a simulated fleet and the web UI",
        }),
        Command::Serve {
            service: ServeCommand::ControlPlane(args),
        } => serve::control_plane(&args),
        Command::Serve { service } => Err(CliError::NotAvailableYet {
            command: format!("serve {}", service.service().name()),
            what: "the scheduler, controller and gateway processes are not built yet; the control plane is (`ccm serve control-plane`)",
        }),
        Command::Simulate { .. } => Err(CliError::NotAvailableYet {
            command: "simulate".into(),
            what: "it will replay bookings through the real scheduler and controller on a \
                   virtual clock",
        }),
        Command::Config {
            command: ConfigCommand::Print(args),
        } => {
            let config = ccm_control_plane::ControlPlaneConfig::load(&args)?;
            print!("{}", config.effective_toml());
            Ok(())
        }
        Command::Lab { command } => lab::run(command),
        Command::Api { command } => api::run(command),
    }
}
