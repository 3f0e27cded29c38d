//! The controller: leader-elected reconcilers and the autoscaler.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Command-line flags of `ccm serve controller` (filled in as the service is built).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ControllerArgs {}
