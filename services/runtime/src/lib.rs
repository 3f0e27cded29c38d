//! # ccm-runtime — what every ccm service runs on
//!
//! | module | what it holds |
//! |---|---|
//! | [`server`] | the tonic server: [`server::ServiceSet`], health, reflection, request id, tracing, deadline, concurrency limit, an auth layer slot, graceful shutdown |
//! | [`client`] | [`client::PlaneClient`]: a channel to the control plane carrying the service token; typed clients; [`client::fence`] |
//! | [`error`] | [`error::RuntimeError`] |
//!
//! The control plane, the scheduler and the controller each register their gRPC services in a
//! [`server::ServiceSet`] and run a [`server::Server`]; nothing here knows which service it runs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod server;

pub use error::{BoxError, RuntimeError};
pub use server::{BoundServer, Server, ServerSettings, ServiceSet};
