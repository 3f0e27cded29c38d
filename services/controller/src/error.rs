//! The crate's one error type.

/// Everything the controller can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The configuration is invalid (bad flag, missing setting).
    #[error("configuration: {0}")]
    Config(String),
    /// A call to the control plane failed.
    #[error("control plane {call}: {status}")]
    Plane {
        /// The RPC, e.g. `TransitionInstance`.
        call: &'static str,
        /// The gRPC status it returned.
        status: Box<tonic::Status>,
    },
    /// This replica is no longer the leader (or never was): the fence was refused.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// A cloud call failed.
    #[error("cloud: {0}")]
    Cloud(#[from] ccm_cloud::CloudError),
    /// A CML call failed.
    #[error("CML: {0}")]
    Cml(#[from] ccm_cml::CmlError),
    /// The lab artifact could not be fetched or does not match its definition version.
    #[error("artifact: {0}")]
    Artifact(String),
    /// A domain rule refused something (lab rewrite, state machine, stored data).
    #[error("domain: {0}")]
    Domain(String),
    /// The assessment platform refused or could not be reached.
    #[error("assessment platform: {0}")]
    Assessment(String),
    /// Coordination (leader election) failed.
    #[error("coordination: {0}")]
    Coord(#[from] ccm_coord::CoordError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Runtime(#[from] ccm_runtime::RuntimeError),
}

impl ControllerError {
    /// Whether this is a configuration mistake (the process should exit with a usage error).
    pub fn is_config(&self) -> bool {
        matches!(self, ControllerError::Config(_))
    }

    /// Wraps a status of control-plane call `call`; a refused fence becomes [`Self::NotLeader`].
    pub fn plane(call: &'static str, status: tonic::Status) -> Self {
        let stale = status.code() == tonic::Code::FailedPrecondition
            && status.message().contains("no longer the leader")
            || status.code() == tonic::Code::PermissionDenied
                && status.message().contains("fence holder");
        if stale {
            ControllerError::NotLeader(format!("{call}: {}", status.message()))
        } else {
            ControllerError::Plane {
                call,
                status: Box::new(status),
            }
        }
    }

    /// The gRPC code of a failed control-plane call, if this is one.
    pub fn plane_code(&self) -> Option<tonic::Code> {
        match self {
            ControllerError::Plane { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the object was changed by someone else meanwhile (re-read and look again).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.plane_code(),
            Some(tonic::Code::FailedPrecondition | tonic::Code::Aborted)
        )
    }
}

/// Result with [`ControllerError`].
pub type Result<T, E = ControllerError> = std::result::Result<T, E>;
