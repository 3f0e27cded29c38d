//! # ccm-core — the domain of ccm
//!
//! Everything ccm decides, with no I/O: no network, no files, no async runtime, no system clock
//! (time comes in through [`clock::Clock`]). The services (control plane, scheduler, controller)
//! feed it snapshots and act on what it returns; that keeps every rule here testable in
//! microseconds and identical in production, in `ccm dev` and in `ccm simulate`.
//!
//! | module | what it holds |
//! |---|---|
//! | [`model`] | entities and value types: definitions, instances, workers, templates, capacity |
//! | [`instance`], [`worker`] | the instance and worker state machines (domain.md §2, §11) |
//! | [`capacity`] | capacity over time: bookings as intervals and peak use across a window |
//! | [`ports`] | the per-worker port allocator |
//! | [`fleet`] | the fleet snapshot the scheduler and autoscaler decide on |
//! | [`placement`] | filters with reason codes, scoring, batch placement, "why pending" |
//! | [`autoscale`] | scale-up and scale-down decisions |
//! | [`labyaml`] | the `${PORT_<NAME>}` rewrite of CML lab files |
//! | [`version`] | semver of definitions and artifact hashes |
//! | [`defaults`] | every default number, named and documented |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod autoscale;
pub mod capacity;
pub mod clock;
pub mod defaults;
pub mod error;
pub mod fleet;
pub mod instance;
pub mod labyaml;
pub mod model;
pub mod placement;
pub mod ports;
pub mod version;
pub mod worker;

pub use error::{CoreError, CoreResult};
