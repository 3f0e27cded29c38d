//! The one error type of the `ccm` binary, and its exit codes (BSD sysexits).

use std::path::PathBuf;

/// Exit code for bad command-line usage (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for input data that is invalid (EX_DATAERR).
pub const EXIT_DATA: u8 = 65;
/// Exit code for a feature this build does not provide yet (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for an internal failure of a running service (EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;
/// Exit code for a configuration error (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code for a file that cannot be read or written (EX_IOERR).
pub const EXIT_IO: u8 = 74;

/// Everything a `ccm` command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The subcommand exists but is not built yet.
    #[error("`ccm {command}` is not available yet in this build: {what}")]
    NotAvailableYet {
        /// The subcommand as typed.
        command: String,
        /// What it will do and what it waits for.
        what: &'static str,
    },
    /// Wrong arguments.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The input breaks a domain rule.
    #[error(transparent)]
    Domain(#[from] ccm_core::CoreError),
    /// A service failed to start or stopped with an error.
    #[error(transparent)]
    Service(#[from] ccm_control_plane::ControlPlaneError),
    /// The async runtime could not be started.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    /// A service (scheduler, controller, gateway, or a `ccm dev` component) failed.
    #[error("{0}")]
    Failed(String),
    /// The compiled-in contracts could not be read.
    #[error("contracts: {0}")]
    Contracts(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotAvailableYet { .. } => EXIT_UNAVAILABLE,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Io { .. } => EXIT_IO,
            CliError::Domain(_) | CliError::Contracts(_) => EXIT_DATA,
            CliError::Service(e) if e.is_config() => EXIT_CONFIG,
            CliError::Service(_) | CliError::Runtime(_) | CliError::Failed(_) => EXIT_SOFTWARE,
        }
    }

    /// A line of advice to print after the error, if there is one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::NotAvailableYet { .. } => {
                Some("see the Status section of README.md for what works today")
            }
            _ => None,
        }
    }
}
