//! The crate's error type.

/// Why a cloud call failed, classified the way the controller acts on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// The instance or image does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An account or capacity limit (`InstanceLimitExceeded`, `InsufficientInstanceCapacity`).
    #[error("quota or capacity limit: {0}")]
    Quota(String),
    /// Credentials are missing, wrong or lack permission.
    #[error("not authorised: {0}")]
    Auth(String),
    /// The request itself is wrong (bad AMI, subnet, security group, parameter).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Throttled (`RequestLimitExceeded`) after the provider's own retries.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The cloud could not be reached or failed (network, 5xx); retry later.
    #[error("cloud unavailable: {0}")]
    Unavailable(String),
}

impl CloudError {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled(_) | CloudError::Unavailable(_) | CloudError::Quota(_)
        )
    }
}
