//! # ccm-control-plane — the control plane's framework
//!
//! The control plane is the only writer of ccm's state: it serves the public gRPC API
//! (definitions, instances, workers, templates, events) and the internal API the scheduler and
//! controller commit through. This crate holds the framework those services plug into:
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`config::ControlPlaneConfig`]: defaults → TOML → `CCM_*` → flags, validation, `effective_toml` |
//! | [`server`] | the tonic server from `ccm-runtime`, re-exported |
//! | [`error`] | [`error::ApiError`] — the one mapping of failures to gRPC statuses with `google.rpc` details — and the crate's [`error::ControlPlaneError`] |
//! | [`validate`] | [`validate::Violations`] and the reusable input checks (names, ids, URIs, enums, time slots, labels, lab YAML) |
//! | [`convert`] | proto ↔ domain conversions (`ccm_proto::v1` ↔ `ccm_core::model`), with field paths on every error |
//! | [`paging`] | page sizes and opaque, kind-tagged, checksummed page tokens |
//! | [`app`] | [`app::App`]: store, coordinator, event sink, clock, artifact fetcher; commit and fences |
//! | [`repo`] | the `ccm.v1` entities as store documents ([`repo::Entity`]) |
//! | [`record`] | [`record::Mutation`]: writes, audit records and CloudEvents committed together |
//!
//! The gRPC service implementations (DefinitionService, InstanceService, …) are built on these
//! modules; they register with one line each in a [`server::ServiceSet`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod convert;
pub mod error;
pub mod paging;
pub mod record;
pub mod repo;
pub mod run;
pub mod seed;
/// The gRPC server, from `ccm-runtime` (re-exported under its old path).
pub use ccm_runtime::server;
pub mod services;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;

pub use config::{ControlPlaneArgs, ControlPlaneConfig};
pub use error::{ApiError, ControlPlaneError};
pub use server::{BoundServer, Server, ServerSettings, ServiceSet};
pub use validate::Violations;
