//! # ccm-cml — the CML REST API client
//!
//! | module | what it holds |
//! |---|---|
//! | [`client`] | the [`CmlClient`] trait and the API's types |
//! | [`error`] | [`CmlError`] |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;

pub use client::CmlClient;
pub use error::CmlError;
