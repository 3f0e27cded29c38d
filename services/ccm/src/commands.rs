//! What each subcommand does.

use crate::cli::{Cli, Command, ConfigCommand, ServeCommand};
use crate::error::CliError;

mod api;
mod lab;
mod serve;
mod serve_controller;
mod serve_gateway;
mod serve_scheduler;

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
        Command::Serve {
            service: ServeCommand::Scheduler(args),
        } => serve_scheduler::run(&args),
        Command::Serve {
            service: ServeCommand::Controller(args),
        } => serve_controller::run(&args),
        Command::Serve {
            service: ServeCommand::Gateway(args),
        } => serve_gateway::run(&args),
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
