//! The command line, declared with clap.

use std::path::PathBuf;

use ccm_control_plane::ControlPlaneArgs;
use clap::{Args, Parser, Subcommand};

/// ccm runs Cisco Modeling Labs lablets on a fleet of AWS EC2 workers: it places booked labs on
/// workers (or grows the fleet in time), rewrites them with their ports, starts them on CML,
/// hands them to assessment and grading, tears them down, and stops idle workers.
#[derive(Debug, Parser)]
#[command(name = "ccm", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine: every service in one process, SQLite, in-process
    /// coordination, a simulated cloud with CML simulators, and the web UI.
    Dev(DevArgs),
    /// Run one service (production: one process per container).
    Serve {
        /// Which service.
        #[command(subcommand)]
        service: ServeCommand,
    },
    /// Replay a trace of bookings through the real scheduler and controller on a virtual clock.
    Simulate {
        /// Bookings to replay (JSON lines).
        #[arg(long)]
        trace: PathBuf,
    },
    /// Show the effective configuration.
    Config {
        /// What to show.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with CML lab files offline: check port placeholders, rewrite ports.
    Lab {
        /// What to do.
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Inspect the API contracts compiled into this binary.
    Api {
        /// What to show.
        #[command(subcommand)]
        command: ApiCommand,
    },
}

/// Options of `ccm dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the embedded store keeps its data.
    #[arg(long, default_value = ".ccm-dev")]
    pub data_dir: PathBuf,
    /// Port of the gateway (web UI, HTTP API); 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// gRPC port of the control plane; the scheduler and controller take the next two. 0 picks
    /// free ones.
    #[arg(long, default_value_t = 50051)]
    pub grpc_port: u16,
    /// The built web UI.
    #[arg(long, default_value = "web/dist")]
    pub ui_dir: PathBuf,
    /// Do not create the demo definitions and bookings.
    #[arg(long)]
    pub no_seed: bool,
}

/// `ccm serve …`
#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// The single writer of state: public and internal gRPC APIs.
    ControlPlane(Box<ControlPlaneArgs>),
    /// Leader-elected placement of booked instances.
    Scheduler(Box<ccm_scheduler::SchedulerArgs>),
    /// Leader-elected reconcilers and the autoscaler.
    Controller(Box<ccm_controller::ControllerArgs>),
    /// HTTP/JSON, SSE, OIDC login and the web UI.
    Gateway(Box<ccm_gateway::GatewayArgs>),
}

/// `ccm config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration of the control plane (defaults → file → environment →
    /// flags), secrets redacted.
    Print(Box<ControlPlaneArgs>),
}

/// `ccm lab …`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Check a lab file against a port template: every `${PORT_<NAME>}` placeholder names a port
    /// and every port has a placeholder.
    Validate {
        /// The CML lab YAML file (`-` for standard input).
        file: PathBuf,
        /// A port of the template, by name (repeat for each port), e.g. `--port serial_1`.
        #[arg(long = "port", value_name = "NAME")]
        ports: Vec<String>,
    },
    /// Replace the port placeholders with port numbers and print the lab.
    Rewrite {
        /// The CML lab YAML file (`-` for standard input).
        file: PathBuf,
        /// A port assignment `NAME=PORT` (repeat for each port), e.g. `--port serial_1=5041`.
        #[arg(long = "port", value_name = "NAME=PORT")]
        ports: Vec<String>,
        /// Write the result here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// `ccm api …`
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// List every RPC with its HTTP route and the roles it needs.
    Routes {
        /// Only this service (e.g. `InstanceService`).
        #[arg(long)]
        service: Option<String>,
    },
}
