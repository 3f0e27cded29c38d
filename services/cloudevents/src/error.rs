//! The one error type of this crate.

/// What is wrong with an event, an HTTP message carrying events, or a sink configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudEventError {
    /// A required context attribute (`id`, `source`, `specversion`, `type`) is absent.
    #[error("CloudEvent attribute {0:?} is required")]
    MissingAttribute(String),
    /// An attribute is present but its value (or an extension's name) is not acceptable.
    #[error("CloudEvent attribute {name:?} is invalid: {reason}")]
    InvalidAttribute {
        /// The attribute (or extension) name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `specversion` is not `1.0`, the only version this crate speaks.
    #[error("CloudEvents spec version {0:?} is not supported (only \"1.0\")")]
    UnsupportedSpecVersion(String),
    /// The message is not well-formed: bad JSON, wrong JSON shape, bad base64, bad UTF-8.
    #[error("malformed CloudEvent: {0}")]
    Malformed(String),
    /// The HTTP message is neither structured, batched nor binary CloudEvents.
    #[error("not a CloudEvents HTTP message: {0}")]
    NotACloudEvent(String),
    /// A sink configuration cannot be used.
    #[error("invalid CloudEvents sink configuration: {0}")]
    Config(String),
}

impl CloudEventError {
    /// Shorthand for [`CloudEventError::InvalidAttribute`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> CloudEventError {
        CloudEventError::InvalidAttribute {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
