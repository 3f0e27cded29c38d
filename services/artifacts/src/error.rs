//! The one error type of this crate.

/// Why an artifact could not be fetched.
///
/// Every variant names the artifact by its URI with credentials, query and fragment removed (see
/// [`redact_uri`](crate::redact_uri)), so errors can be logged and returned to API callers as is.
/// [`ArtifactError::grpc_code`] gives the gRPC status code each variant maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// The URI cannot be used: malformed, an unsupported scheme, a relative or non-local `file:`
    /// path, a `..` segment, `http://` while plain HTTP is not allowed, an invalid bucket name,
    /// or a path that is not a regular file. Not retryable. gRPC `INVALID_ARGUMENT`.
    #[error("invalid artifact URI {uri}: {reason}")]
    InvalidUri {
        /// The (redacted) URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing is there: no such file, HTTP 404/410, S3 `NoSuchKey`/`NoSuchBucket`. Not
    /// retryable. gRPC `NOT_FOUND`.
    #[error("artifact {uri} not found: {detail}")]
    NotFound {
        /// The (redacted) URI.
        uri: String,
        /// What the source said.
        detail: String,
    },
    /// The source refused: file permissions, a `file:` path outside the configured root
    /// directory, HTTP 401/403, S3 `AccessDenied` or bad credentials. Not retryable. gRPC
    /// `PERMISSION_DENIED`.
    #[error("access to artifact {uri} denied: {detail}")]
    Denied {
        /// The (redacted) URI.
        uri: String,
        /// What the source said.
        detail: String,
    },
    /// The artifact is larger than the configured maximum (announced or seen while streaming).
    /// Not retryable. gRPC `RESOURCE_EXHAUSTED`.
    #[error("artifact {uri} is larger than the limit of {limit} bytes{}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge {
        /// The (redacted) URI.
        uri: String,
        /// The limit in bytes.
        limit: u64,
        /// The size, when the source announced it.
        size: Option<u64>,
    },
    /// The source could not be reached or failed temporarily: connection refused, DNS, TLS,
    /// timeouts, HTTP 408/429/5xx, S3 `SlowDown`/`InternalError`, an interrupted body, an I/O
    /// error reading a file. Retryable. gRPC `UNAVAILABLE`.
    #[error("artifact {uri} unavailable: {detail}")]
    Unavailable {
        /// The (redacted) URI.
        uri: String,
        /// What went wrong.
        detail: String,
    },
    /// The source answered with something else that will not change by retrying: another HTTP
    /// 4xx, too many redirects or a redirect to plain HTTP, an S3 object in an archive storage
    /// class. Not retryable. gRPC `FAILED_PRECONDITION`.
    #[error("artifact {uri} cannot be fetched: {detail}")]
    Failed {
        /// The (redacted) URI.
        uri: String,
        /// What went wrong.
        detail: String,
    },
    /// The fetcher itself is misconfigured (HTTP client or S3 client cannot be built, missing
    /// credentials). Not retryable. gRPC `INTERNAL`.
    #[error("artifact fetcher misconfigured: {0}")]
    Config(String),
}

impl ArtifactError {
    /// The gRPC status code for this error (see each variant).
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ArtifactError::InvalidUri { .. } => tonic::Code::InvalidArgument,
            ArtifactError::NotFound { .. } => tonic::Code::NotFound,
            ArtifactError::Denied { .. } => tonic::Code::PermissionDenied,
            ArtifactError::TooLarge { .. } => tonic::Code::ResourceExhausted,
            ArtifactError::Unavailable { .. } => tonic::Code::Unavailable,
            ArtifactError::Failed { .. } => tonic::Code::FailedPrecondition,
            ArtifactError::Config(_) => tonic::Code::Internal,
        }
    }

    /// `true` when trying again later may succeed (only [`ArtifactError::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ArtifactError::Unavailable { .. })
    }
}

impl From<ArtifactError> for tonic::Status {
    fn from(err: ArtifactError) -> Self {
        tonic::Status::new(err.grpc_code(), err.to_string())
    }
}
