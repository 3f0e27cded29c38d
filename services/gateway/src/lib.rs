//! The gateway: HTTP/JSON transcoding, SSE, OIDC login, OpenAPI and the web UI.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Command-line flags of `ccm serve gateway` (filled in as the service is built).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct GatewayArgs {}
