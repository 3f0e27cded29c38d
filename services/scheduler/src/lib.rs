//! The scheduler: leader-elected placement of booked instances.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Command-line flags of `ccm serve scheduler` (filled in as the service is built).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct SchedulerArgs {}
