//! A CML REST API simulator (HTTP server) for dev mode, simulations and tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
