//! # ccm-proto — ccm's contracts
//!
//! The gRPC/Protobuf contracts of ccm (package `ccm.v1`, sources in
//! `proto/ccm/v1/*.proto`), compiled at build time:
//!
//! - [`v1`]: the prost messages (each implementing
//!   [`prost_reflect::ReflectMessage`]) and the tonic clients and servers of
//!   every service (`v1::definition_service_server::DefinitionServiceServer`,
//!   `v1::instance_service_client::InstanceServiceClient`, …);
//! - [`google::api`]: the `google.api.http` rule types ([`google::api::HttpRule`]);
//! - [`FILE_DESCRIPTOR_SET`]: the encoded `FileDescriptorSet` of all of it,
//!   including imports (google/api, the well-known types) and source info
//!   (doc comments), for gRPC server reflection, the gateway's transcoding and
//!   OpenAPI, and the tests;
//! - [`descriptor_pool`]: that set decoded once.
//!
//! On top of the descriptors, small typed helpers read the contract's custom
//! options, so that the auth layer and the gateway enforce and route from the
//! one table in the `.proto` files instead of a hand-written copy:
//!
//! - [`method_authz`] / [`all_method_authz`]: the `(ccm.v1.authz)` rule of an
//!   RPC (roles allowed, owner scoping), and [`authorize`] to evaluate one;
//! - [`http_rule`] / [`all_http_rules`]: the `google.api.http` rule of an RPC;
//! - [`service_info`]: the `(ccm.v1.service_info)` of a service (public or
//!   internal, which process serves it).
//!
//! Methods are named either by their gRPC path (`/ccm.v1.WorkerService/DrainWorker`)
//! or by their full protobuf name (`ccm.v1.WorkerService.DrainWorker`).

#![deny(missing_docs)]

use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, MethodDescriptor, ReflectMessage, Value,
};

/// Generated code for package `ccm.v1`: messages, enums, clients and servers.
#[allow(missing_docs, rustdoc::bare_urls, rustdoc::broken_intra_doc_links)]
pub mod v1 {
    tonic::include_proto!("ccm.v1");
}

/// Generated code for the vendored `google.api` annotation protos.
pub mod google {
    /// `google.api`: `HttpRule`, `CustomHttpPattern`, `FieldBehavior`.
    #[allow(missing_docs, rustdoc::bare_urls, rustdoc::broken_intra_doc_links)]
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// The protobuf package of the contracts.
pub const PACKAGE: &str = "ccm.v1";

/// Full name of the method option that declares the roles of an RPC.
pub const AUTHZ_EXTENSION: &str = "ccm.v1.authz";

/// Full name of the service option that declares visibility and serving process.
pub const SERVICE_INFO_EXTENSION: &str = "ccm.v1.service_info";

/// Full name of the method option that maps an RPC to HTTP.
pub const HTTP_EXTENSION: &str = "google.api.http";

/// The encoded `google.protobuf.FileDescriptorSet` of every ccm proto and
/// everything it imports, with source info (comments). Serve it with
/// tonic-reflection (`register_encoded_file_descriptor_set`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ccm_descriptor_set.bin"));

/// The descriptor pool of [`FILE_DESCRIPTOR_SET`], decoded on first use.
///
/// # Panics
///
/// Panics if the embedded descriptor set does not decode, which would mean
/// the build produced a broken file; the crate's tests decode it.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| match DescriptorPool::decode(FILE_DESCRIPTOR_SET) {
        Ok(pool) => pool,
        Err(err) => panic!("ccm-proto: embedded file descriptor set is invalid: {err}"),
    })
}

/// Finds a method by gRPC path (`/ccm.v1.Svc/Method`) or full name
/// (`ccm.v1.Svc.Method`).
pub fn find_method(pool: &DescriptorPool, method: &str) -> Option<MethodDescriptor> {
    let trimmed = method.strip_prefix('/').unwrap_or(method);
    let (service, name) = trimmed
        .rsplit_once('/')
        .or_else(|| trimmed.rsplit_once('.'))?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == name)
}

/// The gRPC path of a method: `/ccm.v1.Svc/Method`.
pub fn grpc_path(method: &MethodDescriptor) -> String {
    format!("/{}/{}", method.parent_service().full_name(), method.name())
}

/// Reads extension `extension` from an options message and converts it to `T`.
fn read_extension<T>(pool: &DescriptorPool, options: &DynamicMessage, extension: &str) -> Option<T>
where
    T: ReflectMessage + Default,
{
    let ext: ExtensionDescriptor = pool.get_extension_by_name(extension)?;
    if !options.has_extension(&ext) {
        return None;
    }
    match options.get_extension(&ext).as_ref() {
        Value::Message(message) => message.transcode_to::<T>().ok(),
        _ => None,
    }
}

/// The `(ccm.v1.authz)` rule of a method, if the method exists and has one.
///
/// `method` is a gRPC path (`/ccm.v1.Svc/Method`) or a full name
/// (`ccm.v1.Svc.Method`).
pub fn method_authz(pool: &DescriptorPool, method: &str) -> Option<v1::AuthzRule> {
    let method = find_method(pool, method)?;
    read_extension(pool, &method.options(), AUTHZ_EXTENSION)
}

/// Every RPC of package `ccm.v1` that declares an authz rule, keyed by gRPC
/// path (`/ccm.v1.Svc/Method`), in service then method declaration order.
pub fn all_method_authz() -> Vec<(String, v1::AuthzRule)> {
    let pool = descriptor_pool();
    pool.services()
        .filter(|s| s.package_name() == PACKAGE)
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter_map(|m| {
            read_extension(pool, &m.options(), AUTHZ_EXTENSION).map(|rule| (grpc_path(&m), rule))
        })
        .collect()
}

/// The `google.api.http` rule of a method of the embedded contracts, if any.
///
/// `method` is a gRPC path (`/ccm.v1.Svc/Method`) or a full name
/// (`ccm.v1.Svc.Method`). Internal RPCs have none.
pub fn http_rule(method: &str) -> Option<google::api::HttpRule> {
    http_rule_in(descriptor_pool(), method)
}

/// Like [`http_rule`], against any pool.
pub fn http_rule_in(pool: &DescriptorPool, method: &str) -> Option<google::api::HttpRule> {
    let method = find_method(pool, method)?;
    read_extension(pool, &method.options(), HTTP_EXTENSION)
}

/// Every RPC of package `ccm.v1` with a `google.api.http` rule, keyed by gRPC
/// path, in service then method declaration order.
pub fn all_http_rules() -> Vec<(String, google::api::HttpRule)> {
    let pool = descriptor_pool();
    pool.services()
        .filter(|s| s.package_name() == PACKAGE)
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter_map(|m| {
            read_extension(pool, &m.options(), HTTP_EXTENSION).map(|rule| (grpc_path(&m), rule))
        })
        .collect()
}

/// The `(ccm.v1.service_info)` of a service (`ccm.v1.WorkerService`), if any.
pub fn service_info(pool: &DescriptorPool, service: &str) -> Option<v1::ServiceInfo> {
    let service = pool.get_service_by_name(service)?;
    read_extension(pool, &service.options(), SERVICE_INFO_EXTENSION)
}

/// The outcome of checking a caller's roles against an [`v1::AuthzRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzDecision {
    /// None of the caller's roles is allowed: `PERMISSION_DENIED` / HTTP 403.
    Denied,
    /// Allowed on any resource.
    Allowed,
    /// Allowed, but only on resources the caller owns (`owner_id == sub`):
    /// lists are filtered and other resources answer `NOT_FOUND`.
    OwnResourcesOnly,
}

/// Evaluates `rule` for a caller holding `caller_roles`.
///
/// The rule's role list is an explicit any-of list (the hierarchy is already
/// expanded in the contracts). An owner-scoped rule limits callers that hold
/// none of `ROLE_ADMIN`, `ROLE_MANAGER`, `ROLE_SERVICE` to their own
/// resources.
pub fn authorize(rule: &v1::AuthzRule, caller_roles: &[v1::Role]) -> AuthzDecision {
    use v1::Role;
    let allowed = caller_roles
        .iter()
        .any(|held| *held != Role::Unspecified && rule.roles().any(|r| r == *held));
    if !allowed {
        return AuthzDecision::Denied;
    }
    let unscoped = caller_roles
        .iter()
        .any(|held| matches!(held, Role::Admin | Role::Manager | Role::Service));
    if rule.owner_scoped && !unscoped {
        AuthzDecision::OwnResourcesOnly
    } else {
        AuthzDecision::Allowed
    }
}

impl v1::Role {
    /// Maps a token realm role ("admin", "manager", "user", "viewer",
    /// "service", "assessment"; case-insensitive) to a [`v1::Role`].
    pub fn from_claim(claim: &str) -> Option<Self> {
        match claim.to_ascii_lowercase().as_str() {
            "admin" => Some(Self::Admin),
            "manager" => Some(Self::Manager),
            "user" => Some(Self::User),
            "viewer" => Some(Self::Viewer),
            "service" => Some(Self::Service),
            "assessment" => Some(Self::Assessment),
            _ => None,
        }
    }

    /// The token realm role name of this role ("" for `Unspecified`).
    pub fn claim(self) -> &'static str {
        match self {
            Self::Unspecified => "",
            Self::Admin => "admin",
            Self::Manager => "manager",
            Self::User => "user",
            Self::Viewer => "viewer",
            Self::Service => "service",
            Self::Assessment => "assessment",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::Role;

    fn rule(roles: &[Role], owner_scoped: bool) -> v1::AuthzRule {
        v1::AuthzRule {
            roles: roles.iter().map(|r| *r as i32).collect(),
            owner_scoped,
        }
    }

    #[test]
    fn authorize_any_of_and_owner_scoping() {
        let r = rule(&[Role::Admin, Role::Manager, Role::User], true);
        assert_eq!(authorize(&r, &[Role::Viewer]), AuthzDecision::Denied);
        assert_eq!(authorize(&r, &[]), AuthzDecision::Denied);
        assert_eq!(
            authorize(&r, &[Role::User]),
            AuthzDecision::OwnResourcesOnly
        );
        assert_eq!(
            authorize(&r, &[Role::User, Role::Manager]),
            AuthzDecision::Allowed
        );
        assert_eq!(authorize(&r, &[Role::Admin]), AuthzDecision::Allowed);
        let unscoped = rule(&[Role::Admin, Role::User], false);
        assert_eq!(authorize(&unscoped, &[Role::User]), AuthzDecision::Allowed);
        let nothing = rule(&[Role::Unspecified], false);
        assert_eq!(
            authorize(&nothing, &[Role::Unspecified]),
            AuthzDecision::Denied
        );
    }

    #[test]
    fn role_claims_round_trip() {
        for role in [
            Role::Admin,
            Role::Manager,
            Role::User,
            Role::Viewer,
            Role::Service,
            Role::Assessment,
        ] {
            assert_eq!(Role::from_claim(role.claim()), Some(role));
        }
        assert_eq!(Role::from_claim("ADMIN"), Some(Role::Admin));
        assert_eq!(Role::from_claim("guest"), None);
    }

    #[test]
    fn find_method_accepts_both_spellings() {
        let pool = descriptor_pool();
        let a = find_method(pool, "/ccm.v1.WorkerService/DrainWorker");
        let b = find_method(pool, "ccm.v1.WorkerService.DrainWorker");
        assert!(a.is_some());
        assert_eq!(a, b);
        assert!(find_method(pool, "/ccm.v1.WorkerService/Nope").is_none());
        assert!(find_method(pool, "nonsense").is_none());
    }

    #[test]
    fn known_rules() {
        let pool = descriptor_pool();
        let drain = method_authz(pool, "/ccm.v1.WorkerService/DrainWorker");
        assert_eq!(drain, Some(rule(&[Role::Admin], false)));
        let http = http_rule("/ccm.v1.WorkerService/DrainWorker");
        assert_eq!(
            http.and_then(|r| r.pattern),
            Some(google::api::http_rule::Pattern::Post(
                "/v1/workers/{worker_id}:drain".into()
            ))
        );
        assert!(http_rule("/ccm.v1.InternalService/CommitPlacements").is_none());
        let internal = service_info(pool, "ccm.v1.InternalService");
        assert_eq!(
            internal.map(|i| i.visibility()),
            Some(v1::ServiceVisibility::Internal)
        );
    }
}
