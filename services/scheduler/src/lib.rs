//! # ccm-scheduler — leader-elected placement of booked instances
//!
//! The scheduler keeps a queue of the PENDING instances, ordered by time slot start then booking
//! time, and places each one when it enters its lead window (slot start − [`lookahead`]; ASAP
//! bookings at once). Decisions are made by `ccm-core` ([`ccm_core::placement::place_batch`]) on
//! a fleet snapshot it keeps current from the control plane's change feed, and committed in
//! batches through `InternalService.CommitPlacements`, fenced with the leader epoch. Instances
//! that fit nowhere stay PENDING with a kube-scheduler style "why pending" condition.
//!
//! Only the leader of the `scheduler` election places; every replica serves
//! `SchedulerService` (status, and the what-if `Plan`, which standbys answer from a fresh list).
//! See `docs/scheduler.md`.
//!
//! | module | what it holds |
//! |---|---|
//! | [`settings`] | [`SchedulerSettings`], every default as a constant, and [`SchedulerArgs`] (the `ccm serve scheduler` flags) |
//! | [`world`] | [`world::World`]: the scheduler's view of workers, templates, definitions and instances, kept by lists and watch events |
//! | [`scheduler`] | [`Scheduler`]: election, the watch/relist loop, cycles, commits, why-pending conditions |
//! | [`service`] | the `SchedulerService` gRPC server (status, plan) |
//! | [`run`] | running a scheduler process from [`SchedulerArgs`] |
//! | [`error`] | [`SchedulerError`] |
//!
//! [`lookahead`]: SchedulerSettings::lookahead

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod run;
pub mod scheduler;
pub mod service;
pub mod settings;
pub mod world;

pub use error::SchedulerError;
pub use scheduler::{CycleStats, Scheduler, StatusSnapshot};
pub use settings::{SchedulerArgs, SchedulerSettings, ScorePolicy};
