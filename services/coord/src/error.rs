//! The crate's error type.

/// Why a coordination operation failed.
///
/// Each variant documents the gRPC status code a service should answer with when the error
/// reaches an RPC boundary; [`CoordError::grpc_code`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// The coordination backend could not be reached or did not answer in time (etcd down,
    /// partitioned, restarting, or a request timed out). Retryable.
    ///
    /// gRPC: `UNAVAILABLE`.
    #[error("coordination backend unavailable: {0}")]
    Unavailable(String),
    /// The caller passed an invalid name, key, TTL, revision or lease configuration.
    ///
    /// gRPC: `INVALID_ARGUMENT`.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend answered something this crate does not expect (a bug or an incompatible
    /// backend version).
    ///
    /// gRPC: `INTERNAL`.
    #[error("internal coordination error: {0}")]
    Internal(String),
}

impl CoordError {
    /// The gRPC status code this error maps to at an RPC boundary.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            CoordError::Unavailable(_) => tonic::Code::Unavailable,
            CoordError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            CoordError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CoordError::Unavailable(_))
    }
}

impl From<CoordError> for tonic::Status {
    fn from(err: CoordError) -> Self {
        tonic::Status::new(err.grpc_code(), err.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;
