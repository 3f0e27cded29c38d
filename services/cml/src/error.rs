//! The crate's error type.

/// Why a CML call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmlError {
    /// Authentication failed (401/403 after a re-authentication).
    #[error("CML authentication failed: {0}")]
    Auth(String),
    /// The lab (or other resource) does not exist (404).
    #[error("not found on CML: {0}")]
    NotFound(String),
    /// CML refused the request (4xx), with its description.
    #[error("CML rejected the request ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// CML's `description`, or the body.
        message: String,
    },
    /// CML is busy with a conflicting operation (409).
    #[error("CML is busy: {0}")]
    Busy(String),
    /// The call timed out.
    #[error("CML call timed out: {0}")]
    Timeout(String),
    /// CML could not be reached or failed (connection, 5xx, bad body).
    #[error("CML unavailable: {0}")]
    Unavailable(String),
    /// The client's configuration is unusable (e.g. a base URL that is not an http(s) URL).
    #[error("invalid CML endpoint: {0}")]
    InvalidEndpoint(String),
}

impl CmlError {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CmlError::Busy(_) | CmlError::Timeout(_) | CmlError::Unavailable(_)
        )
    }
}
