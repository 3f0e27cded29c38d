//! # ccm-testkit — real components for tests
//!
//! Each module starts one real dependency on a free loopback port for the duration of a test and
//! stops it when dropped. The test command (`scripts/test`) installs the programs; a harness that
//! cannot find its program fails with a message saying how to install it, it never skips.
//!
//! | module | component |
//! |---|---|
//! | [`etcd`] | Debian's `etcd` server (v3 API) |
//! | [`moto`] | the moto server (EC2 and S3 emulator) |
//! | [`oidc`] | an OIDC issuer with Keycloak's URL layout issuing real RS256 tokens |

#![warn(missing_docs)]

pub mod etcd;
pub mod moto;
pub mod oidc;
pub mod ports;
