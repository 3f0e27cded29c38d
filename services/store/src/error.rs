//! [`StoreError`], the one error type of this crate, and what each variant is meant to become at
//! the gRPC edge of the control plane.

use crate::model::Kind;

/// The result type of every fallible operation of this crate.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything a [`Store`](crate::Store) can refuse or fail with.
///
/// The variants are precise enough for the control plane to answer its callers without parsing
/// messages; each says which gRPC status code it is meant to become.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The document (or log entry) does not exist. → gRPC `NOT_FOUND`.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// A [`Kind`] or [`LogKind`](crate::LogKind) name.
        kind: String,
        /// The id that was asked for.
        id: String,
    },

    /// A document (or log entry) with this id already exists. → gRPC `ALREADY_EXISTS`.
    #[error("{kind} {id:?} already exists")]
    AlreadyExists {
        /// A [`Kind`] or [`LogKind`](crate::LogKind) name.
        kind: String,
        /// The id that is taken.
        id: String,
    },

    /// Optimistic concurrency failed: the document is at `actual`, the write expected
    /// `expected`. Nothing of the batch (or of the `apply_each` item) was written.
    /// → gRPC `ABORTED` (the caller re-reads and retries).
    #[error("{kind} {id:?} is at resource_version {actual}, the write expected {expected}")]
    Conflict {
        /// The document's kind.
        kind: Kind,
        /// The document's id.
        id: String,
        /// The version the write was conditional on.
        expected: i64,
        /// The version the document has.
        actual: i64,
    },

    /// A unique claim `(namespace, key)` is held by another document. Nothing of the batch (or
    /// of the `apply_each` item) was written. → gRPC `ALREADY_EXISTS` when the claim is the
    /// resource's identity (e.g. a definition's name and version), `FAILED_PRECONDITION` when it
    /// is a resource the write needs (e.g. a port on a worker); the control plane knows which.
    #[error("claim {namespace}/{key:?} is held by {holder_kind} {holder_id:?}")]
    ClaimTaken {
        /// The claim's namespace.
        namespace: String,
        /// The claim's key.
        key: String,
        /// The kind of the document holding it.
        holder_kind: Kind,
        /// The id of the document holding it.
        holder_id: String,
    },

    /// A [`Write::GuardNoneMatch`](crate::Write::GuardNoneMatch) found a matching document
    /// (e.g. a worker still uses the template being deleted). Nothing of the batch (or of the
    /// `apply_each` item) was written. → gRPC `FAILED_PRECONDITION`.
    #[error("precondition failed: {kind} {id:?} matches a guard that must match nothing")]
    GuardFailed {
        /// The kind the guard looked at.
        kind: Kind,
        /// The id of one matching document.
        id: String,
    },

    /// A query, filter or page token is malformed or outside the limits.
    /// → gRPC `INVALID_ARGUMENT`.
    #[error("invalid query: {0}")]
    InvalidQuery(String),

    /// A document, claim, log entry or write is malformed or outside the limits (empty id,
    /// NUL character, body that is not a JSON object, negative expected version…).
    /// → gRPC `INVALID_ARGUMENT`.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The backend cannot be reached or is too busy right now (SQLite busy timeout, MongoDB
    /// server selection, network, transaction retries exhausted). Safe to retry later.
    /// → gRPC `UNAVAILABLE`.
    #[error("store unavailable: {0}")]
    Unavailable(String),

    /// Anything else the backend reported (corrupt data, unsupported server, schema newer than
    /// this build…). → gRPC `INTERNAL`.
    #[error("store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// The gRPC status code name this error is meant to become (`ClaimTaken` maps to
    /// `ALREADY_EXISTS` here; the control plane turns it into `FAILED_PRECONDITION` where the
    /// claim is not the resource's identity).
    pub fn grpc_code_name(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "NOT_FOUND",
            StoreError::AlreadyExists { .. } | StoreError::ClaimTaken { .. } => "ALREADY_EXISTS",
            StoreError::Conflict { .. } => "ABORTED",
            StoreError::GuardFailed { .. } => "FAILED_PRECONDITION",
            StoreError::InvalidQuery(_) | StoreError::InvalidInput(_) => "INVALID_ARGUMENT",
            StoreError::Unavailable(_) => "UNAVAILABLE",
            StoreError::Backend(_) => "INTERNAL",
        }
    }

    pub(crate) fn not_found(kind: impl Into<String>, id: impl Into<String>) -> Self {
        StoreError::NotFound {
            kind: kind.into(),
            id: id.into(),
        }
    }

    pub(crate) fn already_exists(kind: impl Into<String>, id: impl Into<String>) -> Self {
        StoreError::AlreadyExists {
            kind: kind.into(),
            id: id.into(),
        }
    }
}
