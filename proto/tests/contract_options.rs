//! The contract's per-RPC options are complete and coherent:
//!
//! - every service declares `(ccm.v1.service_info)`;
//! - every RPC declares `(ccm.v1.authz)` with at least one role, following
//!   the RBAC rules of domain.md §9 (InternalService = service only, Ingest =
//!   admin + assessment, the role hierarchy admin ⊃ manager ⊃ user ⊃ viewer
//!   on public RPCs, viewers never on mutations);
//! - every RPC except InternalService's has a `google.api.http` rule under
//!   `/v1/` whose path variables and body name real request fields;
//!   InternalService has none.
//!
//! The checks are functions returning violations, and the last tests feed
//! them a deliberately broken service to prove they can fail.

use std::collections::{BTreeSet, HashSet};

use ccm_proto::google::api::{HttpRule, http_rule::Pattern};
use ccm_proto::v1::{AuthzRule, Role, ServiceVisibility};
use ccm_proto::{
    PACKAGE, all_http_rules, all_method_authz, descriptor_pool, http_rule_in, method_authz,
};
use prost_reflect::{DescriptorPool, Kind, MessageDescriptor, MethodDescriptor, ServiceDescriptor};
use prost_types::{
    DescriptorProto, FileDescriptorProto, MethodDescriptorProto, ServiceDescriptorProto,
};

const INTERNAL_SERVICE: &str = "ccm.v1.InternalService";

fn services(pool: &DescriptorPool) -> Vec<ServiceDescriptor> {
    pool.services()
        .filter(|s| s.package_name() == PACKAGE)
        .collect()
}

fn path(m: &MethodDescriptor) -> String {
    format!("/{}/{}", m.parent_service().full_name(), m.name())
}

/// Verbs that change state: a viewer must never be allowed on them.
fn is_mutation(name: &str) -> bool {
    const READ_PREFIXES: &[&str] = &["Get", "List", "Watch", "Plan"];
    !READ_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn authz_violations(pool: &DescriptorPool) -> Vec<String> {
    let mut out = Vec::new();
    for service in services(pool) {
        let info = ccm_proto::service_info(pool, service.full_name());
        match &info {
            None => out.push(format!("{}: no (ccm.v1.service_info)", service.full_name())),
            Some(info) => {
                let internal = service.full_name() == INTERNAL_SERVICE;
                let want = if internal {
                    ServiceVisibility::Internal
                } else {
                    ServiceVisibility::Public
                };
                if info.visibility() != want {
                    out.push(format!(
                        "{}: visibility {:?}, want {want:?}",
                        service.full_name(),
                        info.visibility()
                    ));
                }
                if !["control-plane", "scheduler", "controller"].contains(&info.served_by.as_str())
                {
                    out.push(format!(
                        "{}: served_by {:?}",
                        service.full_name(),
                        info.served_by
                    ));
                }
            }
        }
        for method in service.methods() {
            let p = path(&method);
            let Some(rule) = method_authz(pool, &p) else {
                out.push(format!("{p}: no (ccm.v1.authz) option"));
                continue;
            };
            let roles: BTreeSet<Role> = rule.roles().collect();
            if rule.roles.is_empty() {
                out.push(format!("{p}: authz lists no role"));
                continue;
            }
            if roles.contains(&Role::Unspecified) || roles.len() != rule.roles.len() {
                out.push(format!(
                    "{p}: authz has ROLE_UNSPECIFIED, unknown or duplicate roles"
                ));
            }
            if service.full_name() == INTERNAL_SERVICE {
                if roles != BTreeSet::from([Role::Service]) || rule.owner_scoped {
                    out.push(format!(
                        "{p}: internal RPCs are ROLE_SERVICE only, got {roles:?}"
                    ));
                }
                continue;
            }
            if method.name() == "IngestEvent" {
                if roles != BTreeSet::from([Role::Admin, Role::Assessment]) {
                    out.push(format!("{p}: Ingest is admin + assessment, got {roles:?}"));
                }
                continue;
            }
            if roles.contains(&Role::Assessment) {
                out.push(format!("{p}: ROLE_ASSESSMENT only on IngestEvent"));
            }
            if !roles.contains(&Role::Admin) {
                out.push(format!("{p}: admin must be allowed on every public RPC"));
            }
            // Hierarchy: a lower role implies every higher one.
            let ladder = [Role::Admin, Role::Manager, Role::User, Role::Viewer];
            for (i, lower) in ladder.iter().enumerate() {
                if roles.contains(lower) {
                    for higher in &ladder[..i] {
                        if !roles.contains(higher) {
                            out.push(format!("{p}: allows {lower:?} but not {higher:?}"));
                        }
                    }
                }
            }
            if is_mutation(method.name()) && roles.contains(&Role::Viewer) {
                out.push(format!("{p}: viewers must not call mutations"));
            }
        }
    }
    out
}

/// Field path `a.b.c` of `msg` resolved to a singular scalar field.
fn scalar_field(msg: &MessageDescriptor, field_path: &str) -> Result<(), String> {
    let mut current = msg.clone();
    let segments: Vec<&str> = field_path.split('.').collect();
    for (i, seg) in segments.iter().enumerate() {
        let field = current
            .get_field_by_name(seg)
            .ok_or_else(|| format!("{} has no field {seg}", current.full_name()))?;
        if field.is_list() || field.is_map() {
            return Err(format!("{field_path}: {seg} is repeated"));
        }
        match field.kind() {
            Kind::Message(m) if i + 1 < segments.len() => current = m,
            Kind::Message(_) => return Err(format!("{field_path}: ends in a message")),
            _ if i + 1 < segments.len() => return Err(format!("{field_path}: {seg} is a scalar")),
            _ => {}
        }
    }
    Ok(())
}

fn check_binding(
    method: &MethodDescriptor,
    rule: &HttpRule,
    nested: bool,
    seen: &mut HashSet<(String, String)>,
    out: &mut Vec<String>,
) {
    let p = path(method);
    let (verb, template) = match &rule.pattern {
        Some(Pattern::Get(t)) => ("GET", t),
        Some(Pattern::Put(t)) => ("PUT", t),
        Some(Pattern::Post(t)) => ("POST", t),
        Some(Pattern::Delete(t)) => ("DELETE", t),
        Some(Pattern::Patch(t)) => ("PATCH", t),
        Some(Pattern::Custom(c)) => {
            out.push(format!("{p}: custom HTTP verb {} not used by ccm", c.kind));
            return;
        }
        None => {
            out.push(format!("{p}: http rule without a pattern"));
            return;
        }
    };
    if !template.starts_with("/v1/") {
        out.push(format!("{p}: path {template} is not under /v1/"));
    }
    if !seen.insert((verb.to_owned(), template.clone())) {
        out.push(format!("{p}: {verb} {template} is bound twice"));
    }
    let input = method.input();
    // Path variables: {field.path} or {field.path=pattern}.
    let mut rest = template.as_str();
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            out.push(format!("{p}: unbalanced braces in {template}"));
            break;
        };
        let var = &rest[start + 1..start + len];
        let field_path = var.split('=').next().unwrap_or(var);
        if let Err(e) = scalar_field(&input, field_path) {
            out.push(format!("{p}: path variable {{{var}}}: {e}"));
        }
        rest = &rest[start + len + 1..];
    }
    match rule.body.as_str() {
        "" => {}
        _ if verb == "GET" || verb == "DELETE" => {
            out.push(format!("{p}: {verb} must not have a body"));
        }
        "*" => {}
        field => {
            if input.get_field_by_name(field).is_none() {
                out.push(format!(
                    "{p}: body field {field} not in {}",
                    input.full_name()
                ));
            }
        }
    }
    if verb != "GET" && verb != "DELETE" && rule.body.is_empty() {
        out.push(format!("{p}: {verb} without a body mapping"));
    }
    if !rule.response_body.is_empty()
        && method
            .output()
            .get_field_by_name(&rule.response_body)
            .is_none()
    {
        out.push(format!(
            "{p}: response_body {} not in output",
            rule.response_body
        ));
    }
    if method.is_server_streaming() && verb != "GET" {
        out.push(format!("{p}: streaming RPCs are GET (relayed as SSE)"));
    }
    if nested && !rule.additional_bindings.is_empty() {
        out.push(format!("{p}: additional bindings nest only one level"));
    }
    for extra in &rule.additional_bindings {
        check_binding(method, extra, true, seen, out);
    }
}

fn http_violations(pool: &DescriptorPool) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for service in services(pool) {
        for method in service.methods() {
            let p = path(&method);
            let rule = http_rule_in(pool, &p);
            if service.full_name() == INTERNAL_SERVICE {
                if rule.is_some() {
                    out.push(format!("{p}: internal RPCs must not be mapped to HTTP"));
                }
                continue;
            }
            match rule {
                None => out.push(format!("{p}: no google.api.http rule")),
                Some(rule) => check_binding(&method, &rule, false, &mut seen, &mut out),
            }
            if method.is_client_streaming() {
                out.push(format!("{p}: client streaming cannot be transcoded"));
            }
        }
    }
    out
}

fn count_methods(pool: &DescriptorPool) -> usize {
    services(pool).iter().map(|s| s.methods().len()).sum()
}

#[test]
fn every_rpc_declares_roles() {
    let pool = descriptor_pool();
    assert!(count_methods(pool) > 0);
    let violations = authz_violations(pool);
    assert!(
        violations.is_empty(),
        "authz violations:\n{}",
        violations.join("\n")
    );
    // The crate's table covers every RPC, and every entry has a role.
    let table = all_method_authz();
    assert_eq!(table.len(), count_methods(pool));
    assert!(table.iter().all(|(_, rule)| !rule.roles.is_empty()));
}

#[test]
fn every_public_rpc_has_an_http_rule_and_internal_ones_none() {
    let pool = descriptor_pool();
    let violations = http_violations(pool);
    assert!(
        violations.is_empty(),
        "http violations:\n{}",
        violations.join("\n")
    );
    let internal = pool
        .get_service_by_name(INTERNAL_SERVICE)
        .expect("InternalService exists");
    assert_eq!(
        all_http_rules().len(),
        count_methods(pool) - internal.methods().len()
    );
}

#[test]
fn rbac_matrix_spot_checks() {
    let pool = descriptor_pool();
    let roles = |m: &str| -> BTreeSet<Role> {
        method_authz(pool, m)
            .unwrap_or_else(|| panic!("{m} has no authz"))
            .roles()
            .collect()
    };
    let scoped = |m: &str| method_authz(pool, m).is_some_and(|r: AuthzRule| r.owner_scoped);
    use Role::*;
    assert_eq!(
        roles("/ccm.v1.WorkerService/DrainWorker"),
        BTreeSet::from([Admin])
    );
    assert_eq!(
        roles("/ccm.v1.WorkerService/CancelWorkerDrain"),
        BTreeSet::from([Admin])
    );
    assert_eq!(
        roles("/ccm.v1.ControllerService/Reconcile"),
        BTreeSet::from([Admin])
    );
    assert_eq!(
        roles("/ccm.v1.DefinitionService/CreateDefinition"),
        BTreeSet::from([Admin])
    );
    assert_eq!(
        roles("/ccm.v1.DefinitionService/SyncDefinition"),
        BTreeSet::from([Admin, Manager])
    );
    assert_eq!(
        roles("/ccm.v1.EventService/IngestEvent"),
        BTreeSet::from([Admin, Assessment])
    );
    assert!(roles("/ccm.v1.SchedulerService/Plan").contains(&Viewer));
    assert!(roles("/ccm.v1.SchedulerService/GetSchedulerStatus").contains(&Viewer));
    assert!(roles("/ccm.v1.ControllerService/GetControllerStatus").contains(&Viewer));
    assert!(!roles("/ccm.v1.InstanceService/CreateInstance").contains(&Viewer));
    assert!(scoped("/ccm.v1.InstanceService/CreateInstance"));
    assert!(scoped("/ccm.v1.InstanceService/StopInstance"));
    assert!(!scoped("/ccm.v1.WorkerService/ListWorkers"));
    for (m, rule) in all_method_authz() {
        if m.starts_with("/ccm.v1.InternalService/") {
            assert_eq!(rule.roles().collect::<Vec<_>>(), vec![Service], "{m}");
        }
    }
}

#[test]
fn streaming_is_only_watch() {
    let pool = descriptor_pool();
    let streaming: Vec<String> = services(pool)
        .iter()
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter(|m| m.is_server_streaming() || m.is_client_streaming())
        .map(|m| path(&m))
        .collect();
    assert_eq!(
        streaming,
        vec!["/ccm.v1.EventService/WatchEvents".to_owned()]
    );
}

/// The real pool plus a service whose only RPC has no options at all.
fn pool_with_unannotated_service() -> DescriptorPool {
    let mut pool = descriptor_pool().clone();
    let file = FileDescriptorProto {
        name: Some("ccm/v1/zz_broken.proto".into()),
        package: Some(PACKAGE.into()),
        syntax: Some("proto3".into()),
        message_type: vec![
            DescriptorProto {
                name: Some("BrokenRequest".into()),
                ..Default::default()
            },
            DescriptorProto {
                name: Some("BrokenResponse".into()),
                ..Default::default()
            },
        ],
        service: vec![ServiceDescriptorProto {
            name: Some("BrokenService".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Broken".into()),
                input_type: Some(".ccm.v1.BrokenRequest".into()),
                output_type: Some(".ccm.v1.BrokenResponse".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    pool.add_file_descriptor_proto(file)
        .expect("broken test file is a valid descriptor");
    pool
}

#[test]
fn checks_catch_a_missing_authz_and_http_rule() {
    let pool = pool_with_unannotated_service();
    let authz = authz_violations(&pool);
    assert!(
        authz
            .iter()
            .any(|v| v.contains("/ccm.v1.BrokenService/Broken: no (ccm.v1.authz)")),
        "{authz:?}"
    );
    assert!(
        authz
            .iter()
            .any(|v| v.contains("ccm.v1.BrokenService: no (ccm.v1.service_info)"))
    );
    let http = http_violations(&pool);
    assert_eq!(
        http,
        vec!["/ccm.v1.BrokenService/Broken: no google.api.http rule".to_owned()]
    );
}

#[test]
fn http_checks_catch_bad_bindings() {
    let pool = descriptor_pool();
    let method = ccm_proto::find_method(pool, "/ccm.v1.WorkerService/DrainWorker").expect("method");
    let mut out = Vec::new();
    let bad = HttpRule {
        pattern: Some(Pattern::Get("/v2/workers/{nope}".into())),
        body: "*".into(),
        ..Default::default()
    };
    check_binding(&method, &bad, false, &mut HashSet::new(), &mut out);
    assert!(out.iter().any(|v| v.contains("not under /v1/")), "{out:?}");
    assert!(out.iter().any(|v| v.contains("{nope}")), "{out:?}");
    assert!(
        out.iter().any(|v| v.contains("GET must not have a body")),
        "{out:?}"
    );
}

/// Convention violations: paging fields on List RPCs, resource_version on
/// mutable resources, `*_UNSPECIFIED = 0` enums.
fn convention_violations(pool: &DescriptorPool) -> Vec<String> {
    let mut out = Vec::new();
    let has = |m: &MessageDescriptor, field: &str, kind: Kind| {
        m.get_field_by_name(field)
            .is_some_and(|f| f.kind() == kind && !f.is_list())
    };
    for service in services(pool) {
        for method in service.methods() {
            let p = path(&method);
            if method.name().starts_with("List") {
                let (input, output) = (method.input(), method.output());
                if !has(&input, "page_size", Kind::Int32)
                    || !has(&input, "page_token", Kind::String)
                {
                    out.push(format!("{p}: request lacks page_size/page_token"));
                }
                if !has(&output, "next_page_token", Kind::String) {
                    out.push(format!("{p}: response lacks next_page_token"));
                }
            }
        }
    }
    for name in [
        "ccm.v1.LabletDefinition",
        "ccm.v1.LabletInstance",
        "ccm.v1.CmlWorker",
        "ccm.v1.WorkerTemplate",
        "ccm.v1.WorkerOperation",
    ] {
        match pool.get_message_by_name(name) {
            Some(m) if has(&m, "resource_version", Kind::Int64) => {}
            _ => out.push(format!("{name}: no int64 resource_version")),
        }
    }
    for en in pool.all_enums().filter(|e| e.package_name() == PACKAGE) {
        let zero = en.values().find(|v| v.number() == 0);
        if !zero.is_some_and(|v| v.name().ends_with("_UNSPECIFIED")) {
            out.push(format!(
                "{}: zero value must be *_UNSPECIFIED",
                en.full_name()
            ));
        }
    }
    out
}

#[test]
fn conventions_hold() {
    let violations = convention_violations(descriptor_pool());
    assert!(
        violations.is_empty(),
        "convention violations:\n{}",
        violations.join("\n")
    );
}
