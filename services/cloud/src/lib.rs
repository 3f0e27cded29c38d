//! # ccm-cloud — the clouds workers run on
//!
//! | module | what it holds |
//! |---|---|
//! | [`provider`] | the [`CloudProvider`] trait and its types |
//! | [`error`] | [`CloudError`], classified for the controller (retryable or not) |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod provider;

pub use error::CloudError;
pub use provider::{
    CloudImage, CloudInstance, CloudProvider, InstanceState, LaunchRequest, ListFilter,
};
