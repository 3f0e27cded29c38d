//! The gRPC services of the control plane, each in its own module, all registered by
//! [`register_all`].
//!
//! Every handler follows the same shape: validate the request (collecting every violation),
//! read what it needs through [`crate::app::App`], decide with `ccm-core`, build one
//! [`crate::record::Mutation`] (documents + audit + CloudEvents) and commit it. Caller identity
//! comes from the auth layer ([`caller_of`]); owner-scoped RPCs restrict users to their own
//! resources with [`Scope`].

use ccm_auth::{Access, Caller};

use crate::app::App;
use crate::error::{ApiError, ControlPlaneError};
use crate::record::Origin;
use crate::server::ServiceSet;

pub mod definitions;
pub mod events;
pub mod instances;
pub mod internal;
pub mod templates;
pub mod workers;

/// Registers every control-plane service on `set`.
pub fn register_all(set: &mut ServiceSet, app: &App) -> Result<(), ControlPlaneError> {
    set.add(definitions::server(app.clone()))?;
    set.add(templates::server(app.clone()))?;
    set.add(instances::server(app.clone()))?;
    set.add(workers::server(app.clone()))?;
    // WatchEvents streams end when the server shuts down.
    let shutdown = set.shutdown_token();
    set.add(events::server(app.clone(), shutdown))?;
    set.add(internal::server(app.clone()))?;
    Ok(())
}

/// The caller of a request and what it may see, as the auth layer admitted it.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Who calls.
    pub caller: Caller,
    /// Whether the caller is limited to resources it owns.
    pub own_only: bool,
}

impl Scope {
    /// `true` when the caller may see or act on a resource owned by `owner_id`.
    pub fn permits(&self, owner_id: &str) -> bool {
        !self.own_only || self.caller.subject == owner_id
    }

    /// `NOT_FOUND` for a resource the caller may not see (its existence is not revealed).
    pub fn check<T>(
        &self,
        owner_id: &str,
        resource_type: &str,
        id: &str,
        value: T,
    ) -> Result<T, ApiError> {
        if self.permits(owner_id) {
            Ok(value)
        } else {
            Err(ApiError::not_found(resource_type, id))
        }
    }

    /// The origin to record for changes this caller makes.
    pub fn origin(&self, method: &str, request_id: Option<&str>) -> Origin {
        let roles = &self.caller.roles;
        let origin = if roles.contains(&ccm_proto::v1::Role::Service)
            && !roles.contains(&ccm_proto::v1::Role::Admin)
        {
            Origin::service(&self.caller.subject)
        } else {
            Origin::user(&self.caller.subject)
        };
        origin.in_call(method, request_id)
    }
}

/// The caller of `request` as the auth layer admitted it.
///
/// With auth disabled (`ccm dev`) the layer admits an anonymous admin; a request that reached a
/// handler without passing the layer at all is refused (fail closed).
pub fn caller_of<T>(request: &tonic::Request<T>) -> Result<Scope, ApiError> {
    let caller = ccm_auth::caller_from_request(request)
        .cloned()
        .ok_or_else(|| ApiError::unauthenticated("no authenticated caller", None))?;
    let access = ccm_auth::access_from_request(request).unwrap_or(Access::ALL);
    Ok(Scope {
        caller,
        own_only: access.own_only,
    })
}
