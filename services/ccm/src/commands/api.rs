//! `ccm api routes`: the RPCs compiled into this binary, with their HTTP routes and roles, read
//! from the contracts' descriptors (the same table the auth layer and the gateway use).

use std::fmt::Write as _;

use ccm_proto::google::api::{HttpRule, http_rule::Pattern};
use ccm_proto::v1::Role;

use crate::cli::ApiCommand;
use crate::error::CliError;

/// Runs `ccm api …`.
pub fn run(command: ApiCommand) -> Result<(), CliError> {
    match command {
        ApiCommand::Routes { service } => {
            print!("{}", routes_table(service.as_deref())?);
            Ok(())
        }
    }
}

/// One line per RPC: `Service.Method  VERB /path  roles`.
pub fn routes_table(only_service: Option<&str>) -> Result<String, CliError> {
    let pool = ccm_proto::descriptor_pool();
    let services: Vec<_> = pool
        .services()
        .filter(|s| s.package_name() == ccm_proto::PACKAGE)
        .filter(|s| only_service.is_none_or(|name| s.name() == name || s.full_name() == name))
        .collect();
    if services.is_empty() {
        let known: Vec<_> = pool
            .services()
            .filter(|s| s.package_name() == ccm_proto::PACKAGE)
            .map(|s| s.name().to_string())
            .collect();
        return Err(CliError::Usage(format!(
            "no service {:?}; known services: {}",
            only_service.unwrap_or_default(),
            known.join(", ")
        )));
    }
    let mut out = String::new();
    for service in services {
        for method in service.methods() {
            let full = method.full_name().to_string();
            let routes = ccm_proto::http_rule_in(pool, &full)
                .map(|rule| describe_routes(&rule))
                .unwrap_or_else(|| "(gRPC only)".to_string());
            let authz = ccm_proto::method_authz(pool, &full).ok_or_else(|| {
                CliError::Contracts(format!("{full} declares no roles (ccm.v1.authz)"))
            })?;
            let mut roles: Vec<&str> = authz
                .roles()
                .filter(|r| *r != Role::Unspecified)
                .map(Role::claim)
                .collect();
            roles.dedup();
            let stream = if method.is_server_streaming() {
                " (stream)"
            } else {
                ""
            };
            let own = if authz.owner_scoped {
                " (own resources for users)"
            } else {
                ""
            };
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "{:<52} {:<58} {}{}",
                format!("{}.{}{}", service.name(), method.name(), stream),
                routes,
                roles.join(","),
                own
            );
        }
    }
    Ok(out)
}

fn describe_routes(rule: &HttpRule) -> String {
    let mut parts = vec![describe_pattern(rule)];
    parts.extend(rule.additional_bindings.iter().map(describe_pattern));
    parts.join(" | ")
}

fn describe_pattern(rule: &HttpRule) -> String {
    match &rule.pattern {
        Some(Pattern::Get(p)) => format!("GET {p}"),
        Some(Pattern::Put(p)) => format!("PUT {p}"),
        Some(Pattern::Post(p)) => format!("POST {p}"),
        Some(Pattern::Delete(p)) => format!("DELETE {p}"),
        Some(Pattern::Patch(p)) => format!("PATCH {p}"),
        Some(Pattern::Custom(c)) => format!("{} {}", c.kind, c.path),
        None => "(no pattern)".to_string(),
    }
}
