//! # ccm-cloud — the clouds workers run on
//!
//! | module | what it holds |
//! |---|---|
//! | [`provider`] | the [`CloudProvider`] trait and its types |
//! | [`error`] | [`CloudError`], classified for the controller (retryable or not) |
//! | [`aws`] | [`aws::Ec2Provider`]: EC2 through aws-sdk-ec2 (tested against the moto server) |
//! | [`simulated`] | [`simulated::SimulatedCloud`]: in memory, driven by a clock, with failure injection |
//! | `conformance` | (feature `conformance`) the checks every provider must pass |
//!
//! docs/cloud.md describes the EC2 calls, IAM permissions, error classes, retries and tags.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aws;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod provider;
pub mod simulated;

pub use aws::{AwsCredentials, AwsSettings, Ec2Provider};
pub use error::CloudError;
pub use provider::{
    CloudImage, CloudInstance, CloudProvider, InstanceState, LaunchRequest, ListFilter,
};
pub use simulated::{SimulatedCloud, SimulatedConfig};
