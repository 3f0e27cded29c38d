//! `ccm` — one binary for every ccm service and for the people who run them.
//!
//! `ccm dev` runs the whole system on one machine; `ccm serve <service>` runs one service in
//! production; the remaining subcommands are offline tools over the domain and the contracts.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod error;
mod logging;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
