//! # ccm-cml — the CML REST API client
//!
//! | module | what it holds |
//! |---|---|
//! | [`client`] | the [`CmlClient`] trait and the API's types |
//! | [`error`] | [`CmlError`] |
//! | [`http`] | [`HttpCmlClient`] (reqwest, rustls), [`CmlEndpoint`], [`HttpCmlClientFactory`] |
//!
//! Tests run the client against the CML simulator (`ccm-cml-sim`) over real HTTP; see
//! `docs/cml.md`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod http;

pub use client::CmlClient;
pub use error::CmlError;
pub use http::{CmlClientFactory, CmlEndpoint, HttpCmlClient, HttpCmlClientFactory, Secret};
