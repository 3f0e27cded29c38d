//! # ccm-controller — leader-elected reconcilers and the autoscaler
//!
//! The controller turns what the control plane records into what runs: it launches, starts,
//! stops and terminates EC2 workers through a [`ccm_cloud::CloudProvider`], imports, starts,
//! stops and deletes labs on the workers' CML through a [`ccm_cml::CmlClient`], observes both,
//! and reports everything back through the control plane's fenced InternalService. Only the
//! leader of the election `controller` acts; standbys serve the read API and wait.
//!
//! | module | what it holds |
//! |---|---|
//! | [`controller`] | [`Controller`]: leader election, the level-triggered loop, the pass |
//! | [`instances`] | the instance reconciler (instantiate, slot end, collection, teardown, orphans) |
//! | [`workers`] | the worker reconciler (launch, start, stop, terminate, EC2 + CML observation, tags) and worker operations (licence, refresh, lab control) |
//! | [`autoscaler`] | `ccm_core::autoscale::plan` applied: scale up, restart, drain, stop, terminate, wait, halt |
//! | [`service`] | the ControllerService gRPC API |
//! | [`cml`] | the CML endpoint template and client factory |
//! | [`plane`] | the control-plane reads and fenced writes |
//! | [`run`] | `ccm serve controller`: the production wiring |
//! | [`status`] | reconciler counters and the fleet summary |
//! | [`config`] | [`ControllerArgs`] (`ccm serve controller`) and [`ControllerSettings`] |
//! | [`error`] | [`ControllerError`] |
//!
//! docs/controller.md is the operator's guide.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod autoscaler;
pub mod cml;
pub mod config;
pub mod controller;
pub mod error;
pub mod instances;
pub mod plane;
pub mod run;
pub mod service;
pub mod status;
pub mod workers;

pub use cml::{CmlClientFactory, EndpointTemplate};
pub use config::{CloudKind, ControllerArgs, ControllerSettings, LaunchSettings};
pub use controller::{Controller, ControllerDeps, ManualRequest, PassReport};
pub use error::ControllerError;
pub use plane::Fence;
