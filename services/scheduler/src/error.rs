//! The crate's one error type.

use ccm_control_plane::ApiError;

/// Everything the scheduler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The settings or flags are invalid (bad URL, zero batch size, …).
    #[error("invalid scheduler configuration: {0}")]
    Config(String),
    /// A call to the control plane failed.
    #[error("control plane {call}: {status}")]
    Plane {
        /// The RPC, e.g. `InstanceService.ListInstances`.
        call: &'static str,
        /// What it answered.
        status: Box<tonic::Status>,
    },
    /// The control plane refused a fenced call because this replica no longer leads.
    #[error("leadership lost: the control plane refused the fence ({0})")]
    Deposed(String),
    /// The change feed ended or lost events; the scheduler re-lists.
    #[error("watch interrupted: {0}")]
    Watch(String),
    /// Data read from the control plane could not be understood.
    #[error("unreadable {what}: {message}")]
    Decode {
        /// What was being read.
        what: String,
        /// Why it could not be used.
        message: String,
    },
    /// The coordinator failed (campaign arguments, backend down).
    #[error(transparent)]
    Coord(#[from] ccm_coord::CoordError),
    /// The gRPC server or client could not be set up.
    #[error(transparent)]
    Runtime(#[from] ccm_runtime::RuntimeError),
    /// The service token could not be set up.
    #[error("service token: {0}")]
    Auth(String),
}

impl SchedulerError {
    /// A failed control-plane call, recognising a refused fence.
    pub fn plane(call: &'static str, status: tonic::Status) -> Self {
        let refused = matches!(
            status.code(),
            tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
        ) && (status.message().contains("epoch")
            || status.message().contains("leader"));
        if refused {
            return SchedulerError::Deposed(format!("{call}: {}", status.message()));
        }
        SchedulerError::Plane {
            call,
            status: Box::new(status),
        }
    }

    /// Whether this is a configuration error (exit code EX_CONFIG).
    pub fn is_config(&self) -> bool {
        matches!(self, SchedulerError::Config(_) | SchedulerError::Auth(_))
    }

    /// The gRPC status a SchedulerService call answers with.
    pub fn into_status(self) -> tonic::Status {
        match self {
            SchedulerError::Plane { call, status } => {
                ApiError::unavailable(format!("control plane {call}: {}", status.message()), None)
                    .into_status()
            }
            SchedulerError::Decode { what, message } => {
                ApiError::internal_msg(format!("unreadable {what}: {message}")).into_status()
            }
            other => ApiError::unavailable(other.to_string(), None).into_status(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;
