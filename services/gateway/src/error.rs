//! The one error type of the gateway.

/// Everything the gateway can fail with outside of a single request (requests answer with a
/// problem document, see [`crate::problem`]).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is unusable.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// The contracts' descriptors could not be turned into routes (a bad `google.api.http`
    /// rule); a build of the contracts is broken.
    #[error("contracts: {0}")]
    Contract(String),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server stopped with an error.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    /// A backend endpoint URL is invalid.
    #[error("backend endpoint {url:?}: {reason}")]
    Endpoint {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The OIDC issuer could not be reached or answered something unusable.
    #[error("OIDC: {0}")]
    Oidc(String),
    /// The session store failed.
    #[error("session store: {0}")]
    Session(String),
}

impl GatewayError {
    /// True when the error is a configuration mistake (exit code EX_CONFIG).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Endpoint { .. })
    }
}
