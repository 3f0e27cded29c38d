//! The crate's error type.

/// A boxed error, as tower services return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a server could not be set up or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Two services with the same gRPC name were registered.
    #[error("gRPC service {0} is registered twice")]
    DuplicateService(String),
    /// The reflection service could not be built from the descriptor sets.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The control-plane client could not be set up.
    #[error("control-plane client: {0}")]
    Client(String),
    /// A metric could not be registered or encoded, or the metrics listener failed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// Tracing, OTLP export or logging could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(String),
}
