//! What each subcommand does.

use crate::cli::{Cli, Command, ConfigCommand, ServeCommand};
use crate::error::CliError;

mod api;
mod dev;
mod lab;
mod serve;
mod serve_controller;
mod serve_gateway;
mod serve_scheduler;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Dev(args) => dev::run(&args),
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

/// Runs a long-running service command's future to completion on a new multi-threaded Tokio
/// runtime.
pub(crate) fn block_on_service<F: std::future::Future>(fut: F) -> Result<F::Output, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    Ok(runtime.block_on(fut))
}

/// Maps a service's error to the CLI's: configuration mistakes (`is_config`) are usage errors,
/// everything else a failure.
pub(crate) fn service_error(is_config: bool, e: impl std::fmt::Display) -> CliError {
    if is_config {
        CliError::Usage(e.to_string())
    } else {
        CliError::Failed(e.to_string())
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: how every long-running command is stopped.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
