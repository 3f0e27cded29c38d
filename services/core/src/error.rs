//! The one error type of `ccm-core`.
//!
//! Every fallible domain operation returns [`CoreError`]. The services map these variants to gRPC
//! status codes in one place (the control plane's error mapping), so each variant documents the
//! code it is meant to become.

use crate::model::{InstanceState, WorkerState};

/// Result alias for domain operations.
pub type CoreResult<T> = Result<T, CoreError>;

/// Everything the domain can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    // ---- state machines (→ FAILED_PRECONDITION) ----
    /// An instance was asked to move along an edge that domain.md §2.1 does not allow.
    #[error("instance cannot move from {from} to {to}: {why}")]
    InvalidInstanceTransition {
        /// State the instance is in.
        from: InstanceState,
        /// State that was requested.
        to: InstanceState,
        /// Human-readable reason the edge is refused.
        why: String,
    },
    /// A worker was asked to move along an edge that domain.md §2.2 does not allow.
    #[error("worker cannot move from {from} to {to}: {why}")]
    InvalidWorkerTransition {
        /// State the worker is in.
        from: WorkerState,
        /// State that was requested.
        to: WorkerState,
        /// Human-readable reason the edge is refused.
        why: String,
    },

    // ---- ports (→ RESOURCE_EXHAUSTED / INVALID_ARGUMENT) ----
    /// Fewer free ports than requested are left in the worker's range.
    #[error("port range {range_start}-{range_end} exhausted: {requested} requested, {free} free")]
    PortsExhausted {
        /// First port of the worker's range.
        range_start: u16,
        /// Last port of the worker's range (inclusive).
        range_end: u16,
        /// Ports asked for.
        requested: usize,
        /// Ports still free.
        free: usize,
    },
    /// A port range that is empty, reversed or outside 1..=65535.
    #[error("invalid port range {start}-{end}: {why}")]
    InvalidPortRange {
        /// First port.
        start: u32,
        /// Last port (inclusive).
        end: u32,
        /// What is wrong with it.
        why: String,
    },

    // ---- lab YAML (→ INVALID_ARGUMENT) ----
    /// The lab file is not YAML, or not a CML lab.
    #[error("invalid lab YAML: {0}")]
    InvalidLabYaml(String),
    /// A `${PORT_<NAME>}` placeholder that names no port of the template.
    #[error("unknown port placeholder {placeholder} at {location}")]
    UnknownPlaceholder {
        /// The placeholder text, e.g. `${PORT_SERIAL_9}`.
        placeholder: String,
        /// Where it was found, e.g. `nodes[1].tags[0]`.
        location: String,
    },
    /// A port of the template that no placeholder in the lab refers to.
    #[error("port {port_name:?} of the port template has no placeholder in the lab")]
    PortWithoutPlaceholder {
        /// The port's name, e.g. `serial_1`.
        port_name: String,
    },
    /// A port of the template that was not given a number to substitute.
    #[error("port {port_name:?} has no allocated port number")]
    PortNotAllocated {
        /// The port's name.
        port_name: String,
    },

    // ---- versions (→ INVALID_ARGUMENT) ----
    /// Not a strict `MAJOR.MINOR.PATCH` version.
    #[error("invalid version {input:?}: {why}")]
    InvalidVersion {
        /// What was given.
        input: String,
        /// What is wrong with it.
        why: String,
    },

    // ---- validation (→ INVALID_ARGUMENT) ----
    /// A field that breaks a domain rule; `field` is the path a client can show.
    #[error("{field}: {message}")]
    Invalid {
        /// Field path, e.g. `resource_requirements.cpu_cores`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl CoreError {
    /// Shorthand for [`CoreError::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
